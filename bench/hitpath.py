"""The cache's hit and miss paths against the FUSE ceiling and plain passthrough, in one run.

Owns the issue's two goals: a warm cache serves reads at >= 0.9x the ceiling
(`bench/memfs.py`: the same file from memory, answered inline), and a cold
cache costs <= 1.1x the time of plain passthrough (`--no-cache`). fio reads a
file of random bytes with psync and O_DIRECT (QEMU `cache=none`), 1 job:

- 1M seq: the whole file, once, in 1 MiB reads;
- 4k random: `--rand-mib` of 4 KiB reads at random offsets, none repeated
  (fio's random map), same offsets every run (fio's fixed seed).

Every run is size-based, not time-based, so a cold run reads each block once
and really is cold. The six setups:

- ceiling: memfs serving the file from memory (stock pyfuse3: the goal's
  reference);
- ceiling-loop: the same, its pyfuse3 waiting for requests as the daemon's
  does (`memfs.py --fusecache-loop`, fusecache/fuse_loop.py): the loop's gain
  is the distance between the two ceilings, and warm against this one is
  the goal's ratio with the loop in the ceiling too;
- floor: the daemon answering every read with constant bytes
  (`bench/constfs.py`): what any answer costs, so a hit's own cost is the
  warm row's distance from this one;
- no-cache: `fusecache mount --no-cache`;
- cold: `fusecache mount --cache-dir (fresh, empty) --cache-size --admit inclusive`,
  a new mount and cache dir for every run;
- warm: one such mount whose cache was filled before any run by full
  sequential reads of the file, repeated until `fusecache stats` says the
  whole file is cached (at most 5; the passes and counters are reported).

The backing file stays warm in the host page cache (the strictest test of the
miss path's own cost) unless `--cold-backing` drops it before each no-cache
and cold run. Setups alternate within each repeat; each figure is the median
of the repeats. A setup whose mount cannot start (an option this build lacks)
is reported as "not available".

    .venv/bin/python -m bench.hitpath [--quick] [--repeats 3] [--size-mib 1024] [--rand-mib 64] [--cold-backing] [--dir /var/tmp]

Prints a table; writes bench/results/hitpath.json (hitpath-quick.json with --quick, a smoke run).
A second table gives, per setup, the CPU time of the process serving the
mount (memfs, the daemon; every thread, from /proc/PID/task/*/schedstat)
per request: at queue depth 1 a server whose CPU per request is close to
the time per request (1 / IOPS) is bound by its own CPU, not by waiting.

`--boundary` measures instead what the error boundary (issue 10: every read
inside a try, served from the backing on a fault of the cache) costs a hit,
in one process: a warm cache's `Cache.read` (the boundary, then the read
path) against `Cache._hit`, else `Cache._read` (the read path alone, what `read` was before
the boundary), on the same store and file, alternating, 64 KiB and 1 MiB
reads (the median of `--repeats` x 10 paired passes, which goes first alternating); writes bench/results/hitpath-boundary.json.

    .venv/bin/python -m bench.hitpath --boundary [--repeats 3] [--dir /var/tmp]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from bench.common import (
    MIB,
    FioResult,
    MountUnavailable,
    assert_nothing_mounted_under,
    constfs_mount,
    drop_page_cache,
    fmt_bw,
    fmt_iops,
    fusecache_mount,
    fusecache_stats,
    make_random_file,
    median_result,
    memfs_mount,
    print_table,
    run_fio,
    run_fio_served,
    warm_page_cache,
    write_results,
)

SETUPS = ("ceiling", "ceiling-loop", "floor", "no-cache", "cold", "warm")
WARM_GOAL = 0.9  # warm >= 0.9 x ceiling (bandwidth / IOPS)
COLD_GOAL = 1.1  # cold time <= 1.1 x no-cache time
MAX_PRIME_PASSES = 5
DRAIN_TIMEOUT = 120.0


class Bench:
    """The test file, the work directory, and the mounts of one run."""

    def __init__(self, work: str, size_mib: int, rand_mib: int, cache_size: str, cold_backing: bool) -> None:
        self.work = work
        self.size = size_mib * MIB
        self.rand_bytes = rand_mib * MIB
        self.cache_size = cache_size
        self.cold_backing = cold_backing
        os.makedirs(os.path.join(work, "backing"))
        self.image = make_random_file(os.path.join(work, "backing", "disk.img"), size_mib)
        self._n = 0

    def patterns(self) -> dict[str, tuple[str, str, int]]:
        """name -> (fio rw, block size, bytes read per run)."""
        return {"1M seq": ("read", "1M", self.size), "4k random": ("randread", "4k", self.rand_bytes)}

    def _fresh(self, what: str) -> str:
        self._n += 1
        return os.path.join(self.work, f"{what}{self._n}")

    def fusecache(self, options: list[str]) -> contextlib.AbstractContextManager[str]:
        return fusecache_mount(os.path.dirname(self.image), self._fresh("mnt"), options, self._fresh("daemon") + ".log")

    def cached(self) -> contextlib.AbstractContextManager[str]:
        """A mount with a fresh, empty cache dir."""
        return self.fusecache(["--cache-dir", self._fresh("cache"), "--cache-size", self.cache_size, "--admit", "inclusive"])

    def memfs(self, fusecache_loop: bool = False) -> contextlib.AbstractContextManager[str]:
        """The ceiling; with `fusecache_loop`, its pyfuse3 waits for requests as the daemon's does."""
        return memfs_mount(self.image, self._fresh("mnt"), fusecache_loop=fusecache_loop)

    def floor(self) -> contextlib.AbstractContextManager[str]:
        """The daemon answering every read with constant bytes (`bench/constfs.py`): a hit's floor."""
        return constfs_mount(os.path.dirname(self.image), self._fresh("mnt"), self._fresh("floor") + ".log")

    def read(self, mountpoint: str, pattern: str, from_backing: bool) -> FioResult:
        """One measured fio run of `pattern` on the file under `mountpoint`, with the serving process's CPU per request."""
        rw, bs, nbytes = self.patterns()[pattern]
        if from_backing:
            self.prepare_backing()
        return run_fio_served(mountpoint, os.path.join(mountpoint, "disk.img"), rw, bs, direct=True, io_size=nbytes)

    def prepare_backing(self) -> None:
        """Drop or warm the backing file in the host page cache, as `--cold-backing` says."""
        if self.cold_backing:
            drop_page_cache(self.image)
        else:
            warm_page_cache(self.image)


def _try_mount(stack: contextlib.ExitStack, mount: Callable[[], contextlib.AbstractContextManager[str]]) -> tuple[str | None, str | None]:
    """(mountpoint, None), or (None, why it is not available)."""
    try:
        return stack.enter_context(mount()), None
    except MountUnavailable as exc:
        return None, str(exc)


def _image_counters(stats: dict[str, Any] | None) -> dict[str, int]:
    return (stats or {}).get("images", {}).get("disk.img", {})


def _settled_stats(mountpoint: str) -> dict[str, Any] | None:
    """The daemon's counters once its admission queue is empty (or after DRAIN_TIMEOUT)."""
    deadline = time.monotonic() + DRAIN_TIMEOUT
    while True:
        stats = fusecache_stats(mountpoint)
        if stats is None or not stats.get("queue") or time.monotonic() > deadline:
            return stats
        time.sleep(0.1)


def prime(bench: Bench, mountpoint: str) -> tuple[list[FioResult], dict[str, Any] | None]:
    """Read the whole file until the cache holds all of it (stats say so), at most MAX_PRIME_PASSES times.

    One pass is not always enough: the cache skips admissions while its writer
    is far behind. Without stats (an older build) one pass is all it gets.
    """
    passes = []
    stats = None
    for _ in range(MAX_PRIME_PASSES):
        bench.prepare_backing()
        passes.append(run_fio(os.path.join(mountpoint, "disk.img"), "read", "1M", direct=True, io_size=bench.size))
        stats = _settled_stats(mountpoint)
        if stats is None or stats.get("store", {}).get("logical_bytes", 0) >= bench.size:
            break
    return passes, stats


def measure(bench: Bench, repeats: int) -> tuple[dict[str, dict[str, list[FioResult]]], dict[str, str], dict[str, Any]]:
    """Runs per setup and pattern, why each unavailable setup is, and the daemons' counters (priming, cold runs, warm runs)."""
    runs: dict[str, dict[str, list[FioResult]]] = {s: {p: [] for p in bench.patterns()} for s in SETUPS}
    unavailable: dict[str, str] = {}
    counters: dict[str, Any] = {"prime_passes": [], "cold": []}
    with contextlib.ExitStack() as stack:
        mounts: dict[str, str | None] = {}
        setups = (
            ("ceiling", bench.memfs),
            ("ceiling-loop", lambda: bench.memfs(fusecache_loop=True)),
            ("floor", bench.floor),
            ("no-cache", lambda: bench.fusecache(["--no-cache"])),
            ("warm", bench.cached),
        )
        for setup, mount in setups:
            mounts[setup], why = _try_mount(stack, mount)
            if why:
                unavailable[setup] = why
        if mounts["warm"] is not None:
            passes, primed = prime(bench, mounts["warm"])
            counters["prime_passes"] = [r.as_dict() for r in passes]
            counters["primed"] = primed
        for _ in range(repeats):
            for pattern in bench.patterns():
                for setup in ("ceiling", "ceiling-loop", "floor"):  # nothing of theirs comes from the backing
                    if mounts[setup]:
                        runs[setup][pattern].append(bench.read(mounts[setup], pattern, from_backing=False))
                if mounts["no-cache"]:
                    runs["no-cache"][pattern].append(bench.read(mounts["no-cache"], pattern, from_backing=True))
                if "cold" not in unavailable:
                    try:
                        with bench.cached() as mp:
                            runs["cold"][pattern].append(bench.read(mp, pattern, from_backing=True))
                            cold = fusecache_stats(mp) or {}
                            counters["cold"].append(
                                {"pattern": pattern, "skipped_admissions": cold.get("skipped_admissions"), **_image_counters(cold)}
                            )
                    except MountUnavailable as exc:
                        unavailable["cold"] = str(exc)
                if mounts["warm"]:
                    runs["warm"][pattern].append(bench.read(mounts["warm"], pattern, from_backing=False))
        if mounts["warm"]:
            before, after = _image_counters(counters.get("primed")), _image_counters(fusecache_stats(mounts["warm"]))
            counters["warm_runs"] = {k: after.get(k, 0) - before.get(k, 0) for k in ("hit_chunks", "miss_chunks")}
    return runs, unavailable, counters


def _figure(pattern: str, r: FioResult | None) -> str:
    if r is None:
        return "not available"
    if pattern == "4k random":
        return f"{fmt_iops(r.iops)}, p50 {r.p50_us:.0f} µs"
    return f"{fmt_bw(r.bw)} ({r.runtime_s:.2f} s)"


def summarize(runs: dict[str, dict[str, list[FioResult]]], patterns: list[str]) -> list[dict[str, Any]]:
    """One row per pattern: median per setup, the two goal ratios and whether each is met (None: not measurable)."""
    rows = []
    for pattern in patterns:
        med = {s: median_result(runs[s][pattern]) if runs[s][pattern] else None for s in SETUPS}
        ceiling, nocache, cold, warm = (med[s] for s in ("ceiling", "no-cache", "cold", "warm"))
        rate: Callable[[FioResult], float] = (lambda r: r.iops) if pattern == "4k random" else (lambda r: r.bw)
        warm_ratio = rate(warm) / rate(ceiling) if warm and ceiling else None
        cold_ratio = cold.runtime_s / nocache.runtime_s if cold and nocache else None
        rows.append(
            {
                "pattern": pattern,
                **{s: (r.as_dict() if r else None) for s, r in med.items()},
                "warm_over_ceiling": warm_ratio,
                "warm_over_ceiling_paired": _paired(runs["warm"][pattern], runs["ceiling"][pattern], rate),
                "floor_over_ceiling_paired": _paired(runs["floor"][pattern], runs["ceiling"][pattern], rate),
                "warm_over_ceiling_loop_paired": _paired(runs["warm"][pattern], runs["ceiling-loop"][pattern], rate),
                "warm_goal_met": None if warm_ratio is None else warm_ratio >= WARM_GOAL,
                "cold_time_over_no_cache": cold_ratio,
                "cold_goal_met": None if cold_ratio is None else cold_ratio <= COLD_GOAL,
                "_medians": med,
            }
        )
    return rows


def _cpu_ratio(warm: FioResult | None, ceiling: FioResult | None) -> str:
    if not warm or not ceiling or not warm.server_cpu_us or not ceiling.server_cpu_us:
        return "-"
    return f"{warm.server_cpu_us / ceiling.server_cpu_us:.2f}"


def _paired(runs: list[FioResult], ceiling: list[FioResult], rate: Callable[[FioResult], float]) -> float | None:
    """The median over repeats of a setup's rate over the ceiling's in the same repeat (the machine's drift cancels)."""
    pairs = list(zip(runs, ceiling, strict=False))
    return statistics.median(rate(a) / rate(b) for a, b in pairs) if pairs else None


def _ratio(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}"


def _verdict(ratio: float | None, met: bool | None) -> str:
    if ratio is None:
        return "-"
    return f"{ratio:.2f} {'yes' if met else 'NO'}"


def boundary(work: str, repeats: int) -> int:
    """The boundary's cost on a hit: `Cache.read` against `Cache._hit`/`_read` alone, same warm store, alternating."""
    import statistics

    import trio

    from fusecache.admission import Inclusive
    from fusecache.backing import OffLoop, open_backing
    from fusecache.cache import Cache
    from fusecache.files import Files
    from fusecache.inodes import OpenFile
    from fusecache.store import Store
    from fusecache.store_queue import StoreQueue

    size = 64 * MIB
    os.makedirs(os.path.join(work, "backing"))
    make_random_file(os.path.join(work, "backing", "disk.img"), size // MIB)
    backing = open_backing(os.path.join(work, "backing"))
    store = Store(os.path.join(work, "cache"), 2 * size)
    queue = StoreQueue(store)
    offloop = OffLoop(backing)
    files = Files(offloop, store, queue, revalidate=3600.0)
    cache = Cache(offloop, files, queue, Inclusive())
    rows, results = [], {}

    async def go() -> None:
        handle = await offloop.open("disk.img", os.O_RDONLY)
        f = OpenFile(1, 1, "disk.img", handle, await offloop.fstat(handle), False)
        await cache.opened(f)
        for off in range(0, size, MIB):  # warm: every chunk admitted and committed
            await cache.read(f, off, MIB)
        await queue.drain()
        for bs in (64 << 10, MIB):
            offsets = list(range(0, size, bs))
            times: dict[str, list[float]] = {"before (no boundary)": [], "after (boundary)": []}
            async def no_boundary(f: OpenFile, off: int, size: int) -> bytes | memoryview:
                return cache._hit(f, off, size, cache.files.fresh(f.ino)) or await cache._read(f, off, size)

            pair = [("before (no boundary)", no_boundary), ("after (boundary)", cache.read)]
            for i in range(repeats * 10):
                for name, read in pair if i % 2 else pair[::-1]:  # alternating which goes first
                    t0 = time.perf_counter()
                    for off in offsets:
                        await read(f, off, bs)
                    times[name].append((time.perf_counter() - t0) / len(offsets))
            before, after = (statistics.median(v) for v in times.values())
            ratio = statistics.median(a / b for b, a in zip(*times.values(), strict=True))  # paired: the same moment's load
            results[f"{bs >> 10}k"] = {"before_us": before * 1e6, "after_us": after * 1e6, "after_over_before": ratio}
            rows.append([f"{bs >> 10} KiB hit", f"{before * 1e6:.1f} us", f"{after * 1e6:.1f} us", f"{ratio:.3f}"])
        await offloop.close(handle)

    try:
        trio.run(go)
        hits = sum(c.hit_chunks for c in cache.images.values())
        misses = sum(c.miss_chunks for c in cache.images.values())
    finally:
        store.close()
        backing.shutdown()
    print_table(f"the error boundary on the hit path: one process, warm store, median of {repeats * 10} paired passes",
                ["read", "before", "after", "after/before"], rows)
    print(f"hits {hits}, misses {misses} (the misses are the warming pass)")
    path = write_results("hitpath-boundary", {"settings": {"repeats": repeats * 10, "file_mib": size // MIB}, "rows": results,
                                              "hit_chunks": hits, "miss_chunks": misses})
    print(f"wrote {path}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--boundary", action="store_true", help="the error boundary's cost on a hit, in one process (see above)")
    p.add_argument("--quick", action="store_true", help="a smoke run: 1 repeat, a 256 MiB file, 16 MiB of random reads")
    p.add_argument("--repeats", type=int, default=3, help="runs per figure, the median is kept (default 3)")
    p.add_argument("--size-mib", type=int, default=1024, help="size of the test file, read whole by 1M seq (default 1024)")
    p.add_argument("--rand-mib", type=int, default=64, help="MiB read per 4k random run (default 64)")
    p.add_argument("--cache-size", default="2G", help="--cache-size of the cached mounts; must hold the file (default 2G)")
    p.add_argument("--cold-backing", action="store_true", help="drop the backing file from the page cache before no-cache and cold runs")
    p.add_argument("--dir", default="/var/tmp", help="where the test file, caches and mountpoints go: not tmpfs (default /var/tmp)")
    args = p.parse_args()
    if args.boundary:
        work = tempfile.mkdtemp(prefix="fusecache-bench-", dir=args.dir)
        try:
            return boundary(work, args.repeats)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    if args.quick:
        args.repeats, args.size_mib, args.rand_mib = 1, 256, 16
    work = tempfile.mkdtemp(prefix="fusecache-bench-", dir=args.dir)
    try:
        bench = Bench(work, args.size_mib, args.rand_mib, args.cache_size, args.cold_backing)
        runs, unavailable, counters = measure(bench, args.repeats)
        patterns = list(bench.patterns())
    finally:
        assert_nothing_mounted_under(work)
        shutil.rmtree(work, ignore_errors=True)
    rows = summarize(runs, patterns)
    table = [
        [
            r["pattern"],
            *(_figure(r["pattern"], r["_medians"][s]) for s in SETUPS),
            _verdict(r["warm_over_ceiling"], r["warm_goal_met"]),
            _ratio(r["warm_over_ceiling_paired"]),
            _ratio(r["floor_over_ceiling_paired"]),
            _ratio(r["warm_over_ceiling_loop_paired"]),
            _verdict(r["cold_time_over_no_cache"], r["cold_goal_met"]),
        ]
        for r in rows
    ]
    backing = "dropped from" if args.cold_backing else "warm in"
    print_table(
        f"hit path: O_DIRECT psync, 1 job, {args.size_mib} MiB file ({backing} the page cache), median of {args.repeats}",
        [
            "pattern",
            *SETUPS,
            f"warm/ceiling >= {WARM_GOAL}",
            "paired",
            "floor/ceiling paired",
            "warm/ceiling-loop paired",
            f"cold/no-cache time <= {COLD_GOAL}",
        ],
        table,
    )
    print_table(
        "CPU per request of the process serving the mount (every thread; µs, median): at queue depth 1 a server "
        "whose CPU per request is near the time per request is CPU-bound",
        ["pattern", *SETUPS, "warm/ceiling"],
        [
            [
                r["pattern"],
                *(f"{m.server_cpu_us:.1f}" if (m := r["_medians"][s]) and m.server_cpu_us else "-" for s in SETUPS),
                _cpu_ratio(r["_medians"]["warm"], r["_medians"]["ceiling"]),
            ]
            for r in rows
        ],
    )
    passes = [FioResult(**r) for r in counters["prime_passes"]]
    if passes:
        primed = counters.get("primed") or {}
        print(
            f"warm mount primed by {len(passes)} full 1M seq read(s): {', '.join(_figure('1M seq', r) for r in passes)}; "
            f"then {primed.get('store', {}).get('logical_bytes', 0) / MIB:.0f} of {args.size_mib} MiB cached, "
            f"{primed.get('skipped_admissions', '?')} admissions skipped"
        )
    if "warm_runs" in counters:
        print(f"warm runs: {counters['warm_runs']['hit_chunks']} chunk hits, {counters['warm_runs']['miss_chunks']} misses")
    for c in counters["cold"]:
        print(f"cold {c['pattern']} run: {c.get('admitted_chunks')} chunks admitted, {c.get('skipped_admissions')} admissions skipped")
    for setup, why in unavailable.items():
        print(f"{setup}: not available: {why}")
    settings = {**{k: v for k, v in vars(args).items() if k != "dir"}, "ioengine": "psync", "direct": True, "numjobs": 1}
    results = {
        "settings": settings,
        "rows": [{k: v for k, v in r.items() if k != "_medians"} for r in rows],
        "counters": counters,
        "unavailable": unavailable,
        "runs": {s: {p: [r.as_dict() for r in rs] for p, rs in by.items()} for s, by in runs.items()},
    }
    print(f"wrote {write_results('hitpath-quick' if args.quick else 'hitpath', results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
