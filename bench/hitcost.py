"""What a warm hit costs the daemon's own code: `Cache.read` of this tree against a baseline revision's, in CPU time.

Owns the before/after figure for the hit path of issue 13 ("everything a hit
does beyond the store read is cheap enough"). Through the mount the figure is
a ratio to the FUSE ceiling (bench/hitpath.py), which on a shared 2-core
machine moves with every other process; this one does not: each worker builds
the read path in process exactly as a mount does (a `Store`, its
`StoreQueue`, `Files`, `Cache` with inclusive admission over a local backing
directory, the cyclic collector set as the daemon sets it), warms it with whole-file reads until the writer has committed
everything, then times `Cache.read` hits in the calling thread's CPU time
(`time.thread_time_ns`: waiting for a core is not counted):

- 4 KiB at random page-aligned offsets (a guest's random reads);
- 64 KiB whole chunks in order (QEMU at queue depth, `bench/qemu_bench.py`);
- 1 MiB in order (sequential streams).

The baseline is another git revision (`--baseline`, default `main`) extracted
with `git archive`; workers alternate, baseline first then this tree, `--runs`
times, and the figure is the median of the paired ratios (this / baseline).

    .venv/bin/python -m bench.hitcost [--runs 7] [--baseline main] [--dir /var/tmp]

Prints a table; writes bench/results/hitcost.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys

from bench.common import READ_PATH, paired_runs, print_table, write_results

# Runs in a worker whose path starts with one tree: only the API both trees share.
WORKER = READ_PATH + r"""
SIZE = 64 << 20
out = {}
with tempfile.TemporaryDirectory(dir=sys.argv[1]) as work:
    backing, store, queue, offloop, files, cache = read_path(work, SIZE, 2 * SIZE, lambda files, offloop: admission.Inclusive())

    async def go():
        handle = await offloop.open("disk.img", os.O_RDONLY)
        f = OpenFile(1, 1, "disk.img", handle, await offloop.fstat(handle), False)
        await cache.opened(f)
        for _ in range(2):
            for off in range(0, SIZE, MIB):
                await cache.read(f, off, MIB)
            await queue.drain()
        rng = random.Random(1)
        patterns = {
            "4 KiB random": (4096, [rng.randrange(SIZE // 4096) * 4096 for _ in range(20000)]),
            "64 KiB in order": (65536, list(range(0, SIZE, 65536)) * 4),
            "1 MiB in order": (MIB, list(range(0, SIZE, MIB)) * 4),
        }
        before = sum(c.hit_chunks for c in cache.images.values()), sum(c.miss_chunks for c in cache.images.values())
        for name, (size, offsets) in patterns.items():
            for off in offsets[:200]:
                await cache.read(f, off, size)
            t = time.thread_time_ns()
            for off in offsets:
                await cache.read(f, off, size)
            out[name] = (time.thread_time_ns() - t) / len(offsets) / 1e3
        misses = sum(c.miss_chunks for c in cache.images.values()) - before[1]
        if misses:
            raise SystemExit(f"{misses} misses while timing hits: the warm-up did not cache the file")
        await offloop.close(handle)

    collect_as_the_daemon()
    try:
        trio.run(go)
    finally:
        store.close()
        backing.shutdown()
print(json.dumps(out))
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--runs", type=int, default=7, help="paired runs (default 7)")
    p.add_argument("--baseline", default="main", help="git revision to compare with (default main)")
    p.add_argument("--dir", default="/var/tmp", help="where the scratch files and caches go (not tmpfs)")
    args = p.parse_args()
    runs = paired_runs(WORKER, args.baseline, args.runs, args.dir)
    rows, figures = [], {}
    for name in runs["baseline"][0]:
        b = statistics.median(r[name] for r in runs["baseline"])
        t = statistics.median(r[name] for r in runs["this tree"])
        ratio = statistics.median(tr[name] / br[name] for br, tr in zip(runs["baseline"], runs["this tree"], strict=True))
        figures[name] = {"baseline_us": b, "this_tree_us": t, "ratio": ratio}
        rows.append([name, f"{b:.2f} µs", f"{t:.2f} µs", f"{ratio:.2f}"])
    print_table(f"Cache.read of a warm hit, CPU µs per call (median of {args.runs} paired runs; baseline {args.baseline})",
                ["read", "baseline", "this tree", "this / baseline"], rows)
    print(f"wrote {write_results('hitcost', {'settings': vars(args), 'figures': figures, 'runs': runs})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
