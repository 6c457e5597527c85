"""Microseconds per store operation, and admission MB/s: this tree's store against a baseline revision's.

Owns the per-operation cost model of `fusecache.store`. Both stores (this
tree's, and `fusecache/store.py` as of `--baseline`, loaded from git: a
revision from before the store became a package, 36b2b9b or older; by
default 5ec3a75, the last format-1 store) run the same workload in a
scratch cache of 64 KiB chunks (or `--chunk-size`):

- reads, over 1000 held chunks of random data: a loc lookup (read
  transaction + get), a page get by digest with verification, a whole-chunk
  `read_chunk`, 4 KiB out of a chunk (`read_chunk(..., lo, hi)`; the baseline
  reads the whole chunk and slices, as the cache did), and a 1 MiB request
  (16 chunks joined into one bytes: per-chunk `read_chunk`, and
  `read_chunks` under one transaction where the store has it; and
  `read_span`, which copies the chunks straight into one buffer);
- admission MB/s, `apply` of 1000-chunk batches: random data into free slots
  (no dedup), the same data again under other keys (full dedup: every page
  known), and random data into a full cache (every admission evicts).

Also the cost of one small LMDB commit with and without fsync, which decides
the store's `sync=False`. Memory is warmed before anything is timed; each
figure is the median of `--runs` runs.

    .venv/bin/python -m bench.store_profile [--runs 5] [--dir /var/tmp] [--baseline REV]

Prints a table; writes bench/results/store_profile.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from types import ModuleType

import lmdb
import xxhash

from fusecache import store as current

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")

CHUNKS = 1000  # held chunks for the read figures, and admissions per put batch
REQUEST = 1 << 20  # the largest FUSE request
BASELINE = "5ec3a75"  # the last store of format 1: per-page verify, one slot at a time


def baseline_module(rev: str) -> ModuleType:
    """fusecache/store.py as of git revision `rev`, imported under another name."""
    source = subprocess.run(["git", "-C", ROOT, "show", f"{rev}:fusecache/store.py"], check=True, capture_output=True).stdout
    fd, path = tempfile.mkstemp(suffix=".py", prefix="store_baseline_")
    with os.fdopen(fd, "wb") as f:
        f.write(source)
    try:
        spec = importlib.util.spec_from_file_location("fusecache_store_baseline", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
    finally:
        os.unlink(path)
    return module


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


def admission_mb_s(mod: ModuleType, store: object, runs: int, setup: Callable[[int], list[tuple[int, int, int, bytes]]]) -> float:
    """Median MB/s of `apply` of one batch of admissions; setup(run) (untimed) prepares the cache and returns the batch."""
    samples = []
    for run in range(runs):
        batch = setup(run)
        t = time.perf_counter_ns()
        store.apply(mod.WriteBatch(admit=batch))
        samples.append(sum(len(d) for *_, d in batch) / ((time.perf_counter_ns() - t) / 1e9) / 1e6)
    return statistics.median(samples)


def profile(mod: ModuleType, chunk_size: int, runs: int, base: str) -> dict[str, float]:
    per_request = max(REQUEST // chunk_size, 1)
    page = mod.PAGE_SIZE
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory(dir=base) as d:
        store = mod.Store(d, 4 * CHUNKS * chunk_size, chunk_size=chunk_size)
        held = [os.urandom(chunk_size) for _ in range(CHUNKS)]
        store.apply(mod.WriteBatch(admit=[(1, 1, c, data) for c, data in enumerate(held)], files=[(1, 1, (0, 0, 0, 0))]))
        # Each chunk's first page, by the name the store gives it (keyed BLAKE3 since format 3; xxh3-128 before).
        name = store.keys.name if hasattr(store, "keys") else xxhash.xxh3_128_digest
        digests = [name(data[:page]) for data in held]
        if hasattr(mod, "_LOC_KEY"):  # a single-module store: a baseline
            keys = [mod._LOC_KEY.pack(1, 1, c) for c in range(CHUNKS)]
            env, loc_db = store._env, store._loc
        else:
            from fusecache.store.layout import pack_key

            keys = [pack_key(1, 1, c) for c in range(CHUNKS)]
            env, loc_db = store._reader.env, store._reader.tables.loc
        offsets = [(i * 7 % (chunk_size // page)) * page for i in range(CHUNKS)]  # a page inside each chunk
        has_range = hasattr(mod.Store, "read_chunks") and hasattr(mod.Store, "read_span")

        def loc_lookup(i: int) -> object:
            with env.begin(buffers=True) as txn:
                return txn.get(keys[i], db=loc_db)

        def page_in_chunk(i: int) -> object:
            lo = offsets[i]
            if has_range:
                return store.read_chunk(1, 1, i, lo, lo + page)
            data = store.read_chunk(1, 1, i)
            return data[lo : lo + page]

        nreq = CHUNKS // per_request  # requests over distinct chunks; the 1 MiB figures cycle through them 8 times

        def request_per_chunk(i: int) -> object:
            first = (i % nreq) * per_request
            return b"".join([store.read_chunk(1, 1, c) for c in range(first, first + per_request)])

        def request_one_txn(i: int) -> object:
            first = (i % nreq) * per_request
            return b"".join(store.read_chunks(1, 1, first, first + per_request - 1, 0, None))

        figures["xxh3_128 of a chunk"] = per_op_us(lambda i: xxhash.xxh3_128_digest(held[i]), CHUNKS, runs)
        figures["loc lookup"] = per_op_us(loc_lookup, CHUNKS, runs)
        figures["read_page (verified)"] = per_op_us(lambda i: store.read_page(digests[i]), CHUNKS, runs)
        figures["read_chunk, whole"] = per_op_us(lambda i: store.read_chunk(1, 1, i), CHUNKS, runs)
        figures["4 KiB in a chunk"] = per_op_us(page_in_chunk, CHUNKS, runs)
        figures[f"{REQUEST >> 20} MiB, read_chunk each + join"] = per_op_us(request_per_chunk, 8 * nreq, runs)
        if has_range:
            figures[f"{REQUEST >> 20} MiB, read_chunks + join"] = per_op_us(request_one_txn, 8 * nreq, runs)
            figures[f"{REQUEST >> 20} MiB, read_span (one copy)"] = per_op_us(
                lambda i: store.read_span(1, 1, (i % nreq) * per_request, (i % nreq + 1) * per_request - 1), 8 * nreq, runs
            )
            assert b"".join(store.read_chunks(1, 1, 0, per_request - 1, 0, None)) == b"".join(held[:per_request])
            assert store.read_span(1, 1, 0, per_request - 1, 10, 20) == b"".join(held[:per_request])[10 : -chunk_size + 20]
            assert store.read_chunk(1, 1, 3, offsets[3], offsets[3] + page) == held[3][offsets[3] : offsets[3] + page]
        assert store.read_chunk(1, 1, 7) == held[7]
        assert store.stats().verify_failures == 0

        # Admission. Free slots: each run forgets what the previous one admitted (untimed).
        batches = [[(2, 1, c, os.urandom(chunk_size)) for c in range(CHUNKS)] for _ in range(2)]
        store.apply(mod.WriteBatch(admit=batches[1]))  # warm the slots

        def into_free_slots(run: int) -> list[tuple[int, int, int, bytes]]:
            store.apply(mod.WriteBatch(forget_files=[2]))
            return batches[run % 2]

        figures["admit MB/s, new pages"] = admission_mb_s(mod, store, runs, into_free_slots)

        # Full dedup: ino 2 holds the data, ino 3 admits the same bytes.
        def all_known(run: int) -> list[tuple[int, int, int, bytes]]:
            store.apply(mod.WriteBatch(forget_files=[2, 3], admit=batches[0]))
            return [(3, 1, c, data) for _, _, c, data in batches[0]]

        figures["admit MB/s, all pages known"] = admission_mb_s(mod, store, runs, all_known)
        store.apply(mod.WriteBatch(forget_files=[1, 2, 3]))

        # A full cache: every admission evicts (the steady state of a busy cache).
        for n in range(4):
            store.apply(mod.WriteBatch(admit=[(4 + n, 1, c, os.urandom(chunk_size)) for c in range(CHUNKS)]))

        def evicting(run: int) -> list[tuple[int, int, int, bytes]]:
            return [(10 + run, 1, c, os.urandom(chunk_size)) for c in range(CHUNKS)]

        figures["admit MB/s, evicting"] = admission_mb_s(mod, store, runs, evicting)
        assert store.stats().pages_used <= 4 * CHUNKS * chunk_size // page
        store.close()
    return figures


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
    parser.add_argument(
        "--baseline", default=BASELINE, help=f"git revision of the store to compare with ('' for none; default {BASELINE}, format 1)"
    )
    parser.add_argument("--chunk-size", type=int, default=65536)
    args = parser.parse_args()
    # Free one large mmapped block first: glibc then raises its mmap and trim thresholds, as a
    # running daemon's has long done. Without it, whichever store runs first pays page faults on
    # every 64 KiB-1 MiB allocation (the heap top is trimmed and refaulted) and looks 2-10x slower.
    big = bytes(8 << 20)
    del big
    impls = {}
    if args.baseline:
        impls[f"before ({args.baseline})"] = baseline_module(args.baseline)
    impls["after"] = current
    figures = {name: profile(mod, args.chunk_size, args.runs, args.dir) for name, mod in impls.items()}
    commits = {"sync": commit_us(True, args.runs, args.dir), "nosync": commit_us(False, args.runs, args.dir)}
    ops = list(dict.fromkeys(op for f in reversed(figures.values()) for op in f))
    print(f"{args.chunk_size // 1024} KiB chunks{'':<22}" + "".join(f"{name:>16}" for name in figures))
    for op in ops:
        row = "".join(f"{figures[name][op]:>16.2f}" if op in figures[name] else f"{'-':>16}" for name in figures)
        print(f"{op + ('' if 'MB/s' in op else ', µs'):<36}{row}")
    print(f"{'lmdb commit, fsync, µs':<36}{commits['sync']:>16.1f}")
    print(f"{'lmdb commit, no fsync, µs':<36}{commits['nosync']:>16.1f}")
    out = os.path.join(ROOT, "bench", "results", "store_profile.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(
            {
                "unit": "us_per_op unless MB/s",
                "runs": args.runs,
                "chunk_size": args.chunk_size,
                "chunks_per_batch": CHUNKS,
                "stores": figures,
                "lmdb_commit_us": commits,
            },
            f,
            indent=2,
        )
    print(f"wrote {os.path.normpath(out)}")


if __name__ == "__main__":
    main()
