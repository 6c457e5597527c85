"""Microseconds per store operation, for 4 KiB and 64 KiB chunks.

Owns the per-operation cost model of `fusecache.store`: xxh3-128 of one
chunk, a loc lookup (read transaction + get), a page get by digest with
verification, a whole `read_chunk` (lookup, copy out of the slab, verify every
page), and a batched put (`apply` of 1000 admissions, per chunk, into slots
freed by an earlier batch: the steady state of a full cache). Also the cost of
one small LMDB commit with and without fsync, which decides the store's
`sync=False`. Memory is warmed before anything is timed; each figure is the
median of `--runs` runs.

    .venv/bin/python bench/store_profile.py [--runs 5] [--dir /var/tmp]

Prints a table; writes bench/results/store_profile.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import lmdb
import xxhash

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fusecache.store import _LOC_KEY, Store, WriteBatch

CHUNKS = 1000  # held chunks for the read figures, and admissions per put batch
SIZES = (4096, 65536)


def per_op_us(fn: Callable[[int], object], n: int, runs: int) -> float:
    """Median over runs of the time per call of fn(i) for i in range(n), in µs."""
    for i in range(n):  # warm
        fn(i)
    samples = []
    for _ in range(runs):
        t = time.perf_counter_ns()
        for i in range(n):
            fn(i)
        samples.append((time.perf_counter_ns() - t) / n / 1000)
    return statistics.median(samples)


def profile_chunk_size(chunk_size: int, runs: int, base: str) -> dict[str, float]:
    with tempfile.TemporaryDirectory(dir=base) as d:
        store = Store(d, 4 * CHUNKS * chunk_size, chunk_size=chunk_size)
        held = [os.urandom(chunk_size) for _ in range(CHUNKS)]
        store.apply(WriteBatch(admit=[(1, 1, c, data) for c, data in enumerate(held)], files=[(1, 1, (0, 0, 0, 0))]))
        digests = [xxhash.xxh3_128_digest(data[:4096]) for data in held]  # each chunk's first page
        keys = [_LOC_KEY.pack(1, 1, c) for c in range(CHUNKS)]

        def loc_lookup(i: int) -> object:
            with store._env.begin(buffers=True) as txn:
                return txn.get(keys[i], db=store._loc)

        result = {
            "xxh3_128": per_op_us(lambda i: xxhash.xxh3_128_digest(held[i]), CHUNKS, runs),
            "loc_lookup": per_op_us(loc_lookup, CHUNKS, runs),
            "page_get_verified": per_op_us(lambda i: store.read_page(digests[i]), CHUNKS, runs),
            "read_chunk": per_op_us(lambda i: store.read_chunk(1, 1, i), CHUNKS, runs),
        }
        assert store.read_chunk(1, 1, 7) == held[7]

        # Steady-state puts: each timed batch reuses the slots the previous one freed.
        batches = [[(2, 1, c, os.urandom(chunk_size)) for c in range(CHUNKS)] for _ in range(2)]
        store.apply(WriteBatch(admit=batches[1]))  # warm the slots
        samples = []
        for run in range(runs):
            store.apply(WriteBatch(forget_files=[2]))
            t = time.perf_counter_ns()
            store.apply(WriteBatch(admit=batches[run % 2]))
            samples.append((time.perf_counter_ns() - t) / CHUNKS / 1000)
        result["batched_put"] = statistics.median(samples)
        store.close()
    return result


def commit_us(sync: bool, runs: int, base: str) -> float:
    with tempfile.TemporaryDirectory(dir=base) as d:
        env = lmdb.open(d, map_size=1 << 26, sync=sync, metasync=sync)

        def commit(i: int) -> None:
            with env.begin(write=True) as txn:
                txn.put(i.to_bytes(4, "big"), b"x" * 100)

        result = per_op_us(commit, 200, runs)
        env.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dir", default="/var/tmp", help="where the scratch caches go (a real disk, not tmpfs)")
    args = parser.parse_args()
    figures = {f"{size // 1024}KiB": profile_chunk_size(size, args.runs, args.dir) for size in SIZES}
    commits = {"sync": commit_us(True, args.runs, args.dir), "nosync": commit_us(False, args.runs, args.dir)}
    ops = list(figures["4KiB"])
    print(f"{'µs per operation':<28}" + "".join(f"{name:>10}" for name in figures))
    for op in ops:
        print(f"{op:<28}" + "".join(f"{figures[name][op]:>10.2f}" for name in figures))
    print(f"{'lmdb commit, fsync':<28}{commits['sync']:>10.1f}")
    print(f"{'lmdb commit, no fsync':<28}{commits['nosync']:>10.1f}")
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "store_profile.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(
            {"unit": "us_per_op", "runs": args.runs, "chunks_per_batch": CHUNKS, "chunk_sizes": figures, "lmdb_commit": commits},
            f,
            indent=2,
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
