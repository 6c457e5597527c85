"""The store's hit-path reads, this tree's against a baseline revision's, interleaved and timed in CPU time.

Owns the before/after figure for changes to the store's read code. Both
stores hold the same chunks of random data; each round times a few hundred
calls of one operation on one store then on the other (the order alternates
by round), so load on a shared machine falls on both alike. Times are the
calling thread's CPU time (`time.thread_time_ns`): waiting for a core is not
counted. Reported per operation: the median µs per call of each, and the
median over rounds of the paired ratio this/baseline (1.00 = the same).
`--baseline` must name a revision whose store is one module,
fusecache/store.py (36b2b9b or older), as `bench/store_profile.py` loads it.

    .venv/bin/python -m bench.store_reads_paired [--baseline 36b2b9b] [--rounds 61] [--dir /var/tmp]

Prints a table; writes bench/results/store_reads_paired.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable

from bench.common import print_table, write_results
from bench.store_profile import baseline_module
from fusecache import store as current

CHUNK = 65536
HELD = 256  # chunks held by each store (16 MiB)
CALLS = 200  # calls per timed stretch


def operations() -> dict[str, Callable[[object, int], object]]:
    """What the cache's hit path asks of the store (read_span first, read_chunks when a span is not all hits), and peers' read_chunk."""
    return {
        "read_span, 1 MiB (16 whole chunks)": lambda s, i: s.read_span(1, 1, (i % 16) * 16, (i % 16) * 16 + 15),
        "read_span, 128 KiB across 3 chunks": lambda s, i: s.read_span(1, 1, i % 200, i % 200 + 2, 4096, 4096),
        "read_span, 4 KiB inside a chunk": lambda s, i: s.read_span(1, 1, i % HELD, i % HELD, 8192, 12288),
        "read_chunks, 1 MiB": lambda s, i: s.read_chunks(1, 1, (i % 16) * 16, (i % 16) * 16 + 15),
        "read_chunk, whole": lambda s, i: s.read_chunk(1, 1, i % HELD),
        "read_chunk, 4 KiB": lambda s, i: s.read_chunk(1, 1, i % HELD, 8192, 12288),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="36b2b9b", help="git revision of the single-module store to compare with")
    parser.add_argument("--rounds", type=int, default=61)
    parser.add_argument("--dir", default="/var/tmp", help="where the scratch caches go (a real disk, not tmpfs)")
    args = parser.parse_args()
    big = bytes(8 << 20)  # raise glibc's mmap threshold first, as bench/store_profile.py explains
    del big
    held = [os.urandom(CHUNK) for _ in range(HELD)]
    impls = {"baseline": baseline_module(args.baseline), "this": current}
    stores = {}
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        for name, mod in impls.items():
            store = mod.Store(os.path.join(d, name), 4 * HELD * CHUNK)
            store.apply(mod.WriteBatch(admit=[(1, 1, c, data) for c, data in enumerate(held)]))
            stores[name] = store
        assert bytes(stores["this"].read_span(1, 1, 0, 15)) == bytes(stores["baseline"].read_span(1, 1, 0, 15)) == b"".join(held[:16])
        figures = {}
        rows = []
        for op, fn in operations().items():
            us: dict[str, list[float]] = {name: [] for name in stores}
            for rnd in range(args.rounds):
                for name in ("baseline", "this") if rnd % 2 else ("this", "baseline"):
                    store = stores[name]
                    t = time.thread_time_ns()
                    for i in range(CALLS):
                        fn(store, i)
                    us[name].append((time.thread_time_ns() - t) / CALLS / 1000)
            ratio = statistics.median(b / a for a, b in zip(us["baseline"], us["this"], strict=True))
            figures[op] = {
                "baseline_us": statistics.median(us["baseline"]),
                "this_us": statistics.median(us["this"]),
                "this_over_baseline": ratio,
            }
            rows.append([op, f"{figures[op]['baseline_us']:.2f}", f"{figures[op]['this_us']:.2f}", f"{ratio:.3f}"])
        for store in stores.values():
            assert store.stats().verify_failures == 0
            store.close()
    print_table(
        f"store reads, CPU µs per call, median of {args.rounds} interleaved rounds",
        ["operation", f"baseline ({args.baseline})", "this tree", "this/baseline"],
        rows,
    )
    out = write_results(
        "store_reads_paired", {"baseline": args.baseline, "rounds": args.rounds, "calls_per_round": CALLS, "figures": figures}
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
