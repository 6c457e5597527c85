"""Hit ratios of the store's eviction orders (LRU, S3-FIFO) on a skewed trace with scans.

Owns the measurement behind the store's default eviction. The trace is a disk
of `--chunks` 64 KiB chunks read with Zipf-distributed popularity (a hot set
of system files), interrupted now and then by a large sequential scan (a VM
booting, a backup reading the whole disk). Every access goes through the
same eviction classes `fusecache.store.eviction` holds, with inclusive admission (every
miss is admitted) and one slot per chunk, at several cache sizes.

    .venv/bin/python -m bench.eviction [--chunks 20000] [--accesses 1000000] [--seed 1]

Prints a table; writes bench/results/eviction.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import time

from fusecache.store.eviction import EVICTIONS

CACHE_FRACTIONS = (0.01, 0.025, 0.05, 0.1, 0.2)


def make_trace(chunks: int, accesses: int, alpha: float, scan_every: int, scan_len: tuple[int, int], seed: int) -> list[tuple[int, bool]]:
    """(chunk, part of a scan) per access: Zipf over a shuffled disk, with sequential scans mixed in."""
    rng = random.Random(seed)
    ranked = list(range(chunks))
    rng.shuffle(ranked)  # popular chunks are spread over the disk, as files are
    weights = list(itertools.accumulate(1 / (rank + 1) ** alpha for rank in range(chunks)))
    trace: list[tuple[int, bool]] = []
    while len(trace) < accesses:
        trace.extend((c, False) for c in rng.choices(ranked, cum_weights=weights, k=scan_every))
        length = rng.randint(*scan_len)
        start = rng.randrange(chunks - length)
        trace.extend((c, True) for c in range(start, start + length))
    return trace[:accesses]


def replay(eviction_name: str, capacity: int, trace: list[tuple[int, bool]]) -> dict[str, float]:
    eviction = EVICTIONS[eviction_name]()
    hits = zipf_hits = zipf_accesses = 0

    def weigh(key: object) -> int:
        return 0  # one slot per chunk, no sharing, no peers: pure recency/frequency

    for chunk, in_scan in trace:
        hit = chunk in eviction
        if hit:
            eviction.touch(chunk)
        else:
            eviction.insert(chunk)
            while len(eviction) > capacity:
                eviction.evict_one(weigh)
        hits += hit
        if not in_scan:
            zipf_accesses += 1
            zipf_hits += hit
    return {"hit_ratio": hits / len(trace), "zipf_hit_ratio": zipf_hits / zipf_accesses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=20000, help="disk size in chunks")
    parser.add_argument("--accesses", type=int, default=1000000)
    parser.add_argument("--alpha", type=float, default=0.9, help="Zipf skew")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    scan_every, scan_len = 30000, (args.chunks // 8, args.chunks // 3)
    trace = make_trace(args.chunks, args.accesses, args.alpha, scan_every, scan_len, args.seed)
    scanned = sum(in_scan for _, in_scan in trace)
    print(
        f"trace: {len(trace)} accesses over {args.chunks} chunks, Zipf alpha {args.alpha}, {scanned} ({scanned / len(trace):.0%}) in scans"
    )
    results = []
    print(f"{'cache':>14} {'eviction':>8} {'hit ratio':>10} {'zipf part':>10} {'time s':>7}")
    for fraction in CACHE_FRACTIONS:
        capacity = int(args.chunks * fraction)
        for name in EVICTIONS:
            t = time.perf_counter()
            r = replay(name, capacity, trace)
            elapsed = time.perf_counter() - t
            results.append({"cache_chunks": capacity, "cache_fraction": fraction, "eviction": name, **r})
            print(f"{capacity:>7} ({fraction:>5.1%}) {name:>8} {r['hit_ratio']:>10.3f} {r['zipf_hit_ratio']:>10.3f} {elapsed:>7.1f}")
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "eviction.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(
            {
                "trace": {
                    "chunks": args.chunks,
                    "accesses": len(trace),
                    "alpha": args.alpha,
                    "scan_every": scan_every,
                    "scan_len": scan_len,
                    "scan_accesses": scanned,
                    "seed": args.seed,
                },
                "admission": "inclusive",
                "results": results,
            },
            f,
            indent=2,
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
