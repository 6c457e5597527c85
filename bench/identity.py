"""What naming pages by keyed BLAKE3 and checking slots with seeded xxh3 costs: this tree's store against a baseline's, in one run.

Owns the before/after figures of issue 11's content identity. The baseline
is the store of another git revision (`--baseline`, default `main`:
pages named and checked by plain xxh3-128), extracted with `git archive`
into a scratch directory; each run starts one worker process per tree (the
tree first on its path), alternating, with the same data (a fixed seed):

- hits: `read_chunk` of a whole 64 KiB chunk, of 4 KiB out of one (the page
  check), and `read_span` of a 1 MiB request (16 chunks into one buffer);
  µs per call, over 1000 held chunks of random bytes;
- admission: `apply` of batches of 100 chunks, MB/s: random data into free
  slots (every page new: named and checked), and the same data again under
  other inodes (every page known: dedup).

Also the raw hashes on this machine: xxh3-128 plain and seeded, BLAKE3 keyed
and BLAKE2b keyed, of a 4 KiB page and a 64 KiB chunk. Each figure is the
median of `--runs` runs, and the best run beside it (on a shared machine,
what the code itself costs).

    .venv/bin/python -m bench.identity [--runs 5] [--baseline main] [--dir /var/tmp]

Prints a table; writes bench/results/identity.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import timeit

import blake3
import xxhash

from bench.common import paired_runs

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# Runs in a worker whose path starts with one tree: only the Store API both trees share.
WORKER = r"""
import json, os, random, sys, tempfile, time
from fusecache.store import Store, WriteBatch

CHUNKS, BATCH, CS = 1000, 100, 65536
rng = random.Random(11)
data = [rng.randbytes(CS) for _ in range(CHUNKS)]
out = {}
with tempfile.TemporaryDirectory(dir=sys.argv[1]) as d:
    store = Store(os.path.join(d, "cache"), 512 << 20)
    try:
        def admit(ino):
            t = time.perf_counter()
            for b in range(0, CHUNKS, BATCH):
                store.apply(WriteBatch(admit=[(ino, 1, c, data[c]) for c in range(b, b + BATCH)]))
            return CHUNKS * CS / (time.perf_counter() - t) / 1e6

        out["admit new pages MB/s"] = admit(1)
        out["admit known pages (dedup) MB/s"] = admit(2)

        def per_call(fn, n=CHUNKS):
            for i in range(min(n, 200)):
                fn(i)
            t = time.perf_counter()
            for i in range(n):
                fn(i)
            return (time.perf_counter() - t) / n * 1e6

        assert store.read_chunk(1, 1, 5) == data[5]
        out["hit: whole 64 KiB chunk µs"] = per_call(lambda i: store.read_chunk(1, 1, i))
        out["hit: 4 KiB of a chunk µs"] = per_call(lambda i: store.read_chunk(1, 1, i, 8192, 12288))
        out["hit: 1 MiB span µs"] = per_call(lambda i: store.read_span(1, 1, (i % 60) * 16, (i % 60) * 16 + 15), 300)
    finally:
        store.close()
print(json.dumps(out))
"""


def raw_hashes() -> dict[str, float]:
    key, seed = os.urandom(32), int.from_bytes(os.urandom(8), "big")
    out = {}
    for size, label in ((4096, "4 KiB"), (65536, "64 KiB")):
        d = os.urandom(size)
        for name, fn in (
            ("xxh3-128", lambda d=d: xxhash.xxh3_128_digest(d)),
            ("xxh3-128 seeded", lambda d=d: xxhash.xxh3_128_digest(d, seed)),
            ("BLAKE3 keyed", lambda d=d: blake3.blake3(d, key=key).digest(16)),
            ("BLAKE2b keyed", lambda d=d: hashlib.blake2b(d, key=key, digest_size=16).digest()),
        ):
            n = 20000 if size == 4096 else 2000
            out[f"{name} of {label} µs"] = min(timeit.repeat(fn, number=n, repeat=5)) / n * 1e6
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--baseline", default="main", help="git revision of the baseline store (default main)")
    p.add_argument("--dir", default="/var/tmp", help="where the scratch caches go")
    args = p.parse_args()
    runs = paired_runs(WORKER, args.baseline, args.runs, args.dir)
    median = {who: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for who, rs in runs.items()}
    # The best run of each: on a machine shared with other work, the cost the code itself adds.
    best = {who: {k: (max if k.endswith("MB/s") else min)(r[k] for r in rs) for k in rs[0]} for who, rs in runs.items()}
    hashes = raw_hashes()
    print(f"{'figure':34} {'baseline':>10} {'this tree':>10} {'ratio':>7}   {'best: baseline':>14} {'this tree':>10} {'ratio':>7}")
    for k in median["baseline"]:
        b, t = median["baseline"][k], median["this tree"][k]
        bb, bt = best["baseline"][k], best["this tree"][k]
        print(f"{k:34} {b:10.2f} {t:10.2f} {t / b:7.2f}   {bb:14.2f} {bt:10.2f} {bt / bb:7.2f}")
    print()
    for k, v in hashes.items():
        print(f"{k:34} {v:10.2f}")
    out = os.path.join(ROOT, "bench", "results", "identity.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        figures = {"baseline": args.baseline, "runs": args.runs, "median": median, "best": best, "all_runs": runs}
        json.dump({**figures, "raw_hashes_us": hashes}, f, indent=2)
    print(f"wrote {os.path.relpath(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
