"""What a cold miss costs the daemon's own code: `Cache.read` misses of this tree against a baseline revision's.

Owns the before/after figure for the cold rows of issue 13 (a cold 1 MiB
sequential read on a default mount against `--no-cache`). Through the mount
(bench/amplification.py) the time moves with every other process on a shared
2-core machine; this one does not. Each worker builds the read path in process
as a mount does (a `Store`, its `StoreQueue`, `Files`, `Cache` with
second-chance admission and the daemon's staging buffer, the fetcher's
background runners, over a local backing directory whose file is warm in the
host page cache; the cyclic collector set as the daemon sets it) and reads,
cold:

- 1 MiB in order through a 256 MiB file, twice (second chance stores
  nothing a guest reads: the second pass is as cold as the first);
- 4 KiB at random page-aligned offsets, none read before;
- the same 4 KiB reads again, at once: every page is in the fetcher's buffer
  of recent reads (second chance stores nothing), as a second guest reading
  what the first just read finds it; no backing read.

For each it records the event loop's CPU time per request
(`time.thread_time_ns` on the trio thread: what every other request of every
guest waits behind) and the whole process's (worker threads included), and
the same for `--no-cache`'s read (`Passthrough`) in the same worker: the
baseline of the issue's goal, and the floor.

The baseline revision (`--baseline`, default `main`) is extracted with
`git archive`; workers alternate, baseline first, `--runs` times; figures are
medians, ratios medians of the paired ratios.

    .venv/bin/python -m bench.misscost [--runs 5] [--baseline main] [--dir /var/tmp]

Prints a table; writes bench/results/misscost.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys

from bench.common import READ_PATH, paired_runs, print_table, write_results

# Runs in a worker whose path starts with one tree: only the API both trees share.
WORKER = READ_PATH + r"""
from fusecache import memory

SIZE = 256 << 20
out = {}
with tempfile.TemporaryDirectory(dir=sys.argv[1]) as work:
    memory.keep_freed_memory()  # as the daemon: the memory its buffers keep alive touched before reads need it
    memory.touch(64 * MIB + 256 * MIB)
    def second_chance(files, offloop):
        return admission.SecondChance(os.path.join(work, "mnt"), files, offloop, staging_bytes=256 * MIB)

    backing, store, queue, offloop, files, cache = read_path(work, SIZE, 2 << 30, second_chance)
    policy = cache.admission
    plain = Passthrough(offloop)
    rng = random.Random(1)
    randoms = rng.sample(range(SIZE // 4096), 4000)
    patterns = {
        "1 MiB in order": (MIB, list(range(0, SIZE, MIB)) * 2),
        "4 KiB random": (4096, [p * 4096 for p in randoms]),
        "4 KiB random, again": (4096, [p * 4096 for p in randoms]),  # (each page in the fetcher's buffer now)
    }

    async def timed(read, f, size, offsets):
        p, t, w = time.process_time_ns(), time.thread_time_ns(), time.perf_counter_ns()
        for off in offsets:
            data = await read(f, off, size)
            if len(data) != size:
                raise SystemExit(f"short read at {off}: {len(data)}")
        return ((time.thread_time_ns() - t) / len(offsets) / 1e3, (time.process_time_ns() - p) / len(offsets) / 1e3,
                (time.perf_counter_ns() - w) / len(offsets) / 1e3)

    async def go():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(queue.run)
            nursery.start_soon(policy.run)
            nursery.start_soon(cache.fetcher.run)
            handle = await offloop.open("disk.img", os.O_RDONLY)
            f = OpenFile(1, 1, "disk.img", handle, await offloop.fstat(handle), False)
            await cache.opened(f)
            for name, (size, offsets) in patterns.items():
                out[name] = {"no-cache": await timed(plain.read, f, size, offsets), "cache": await timed(cache.read, f, size, offsets)}
            hits = sum(c.hit_chunks for c in cache.images.values())
            if hits:
                raise SystemExit(f"{hits} hits: the reads were meant to be cold")
            cache.closed(f)
            await offloop.close(handle)
            nursery.cancel_scope.cancel()

    collect_as_the_daemon()
    try:
        trio.run(go)
    finally:
        store.close()
        backing.shutdown()
print(json.dumps(out))
"""

MEASURES = ("loop CPU", "process CPU", "wall")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--runs", type=int, default=5, help="paired runs (default 5)")
    p.add_argument("--baseline", default="main", help="git revision to compare with (default main)")
    p.add_argument("--dir", default="/var/tmp", help="where the scratch files and caches go (not tmpfs)")
    args = p.parse_args()
    runs = paired_runs(WORKER, args.baseline, args.runs, args.dir)
    rows, figures = [], {}
    for pattern in runs["this tree"][0]:
        for i, measure in enumerate(MEASURES):
            fig: dict[str, float] = {}
            for tree in ("baseline", "this tree"):
                fig[f"{tree} µs"] = statistics.median(r[pattern]["cache"][i] for r in runs[tree])
                fig[f"{tree} / no-cache"] = statistics.median(r[pattern]["cache"][i] / r[pattern]["no-cache"][i] for r in runs[tree])
            fig["no-cache µs"] = statistics.median(r[pattern]["no-cache"][i] for r in runs["this tree"])
            fig["this / baseline"] = statistics.median(
                tr[pattern]["cache"][i] / br[pattern]["cache"][i] for br, tr in zip(runs["baseline"], runs["this tree"], strict=True)
            )
            figures[f"{pattern}, {measure}"] = fig
            rows.append([
                pattern, measure, f"{fig['no-cache µs']:.1f}", f"{fig['baseline µs']:.1f} ({fig['baseline / no-cache']:.2f}x)",
                f"{fig['this tree µs']:.1f} ({fig['this tree / no-cache']:.2f}x)", f"{fig['this / baseline']:.2f}",
            ])  # fmt: skip
    print_table(
        f"cold Cache.read, µs per request (median of {args.runs} paired runs; baseline {args.baseline}); (x): / no-cache in the same run",
        ["read", "measure", "no-cache", "baseline", "this tree", "this / baseline"],
        rows,
    )
    print(f"wrote {write_results('misscost', {'settings': vars(args), 'figures': figures, 'runs': runs})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
