"""Reads from a real NFS server directly, through fusecache cold, and through fusecache warm, at 0, 0.5 and 2 ms added round trip.

Owns the issue's NFS goal: warm 4 KiB hits at least 20x faster than reading
NFS directly when the server is 2 ms away. The server is tests/harness/nfs_server.py's
nfs-ganesha in a network namespace of its own, exporting one image of random
bytes (NFSv3). For each added round trip a tests/harness/delay_proxy.py process sits
in front of it (it takes a one-way delay: half the round trip each way), and
every client below goes through that proxy:

- nfs: `fusecache.backing.nfs.NfsBacking` in this process (libnfs, the same
  code the daemon uses): 4 KiB reads at random offsets one at a time (p50,
  p99, IOPS), and the whole image in 1 MiB reads one at a time (MB/s);
- cold: `fusecache mount nfs://... --admit inclusive` on a fresh, empty cache
  dir (a new mount for every run), then fio psync O_DIRECT: `--rand-reads`
  4 KiB reads at random offsets (each offset once: fio's random map, same
  offsets every run: fio's fixed seed), and the whole image in 1 MiB reads;
- warm: one such mount whose cache was filled first by whole-image 1 MiB
  reads, repeated until `fusecache stats --json` shows every chunk stored and
  the admission queue empty; then the same fio runs, except that 4 KiB
  random reads every block of the image once (hits take ~30 µs: a few
  thousand would be too short for fio's millisecond runtime).

The table also gives each proxy's measured GETATTR p50 (one RPC on an open
file): what the round trip really is, server and libnfs included.

The server reads from the host page cache throughout (the image was just
written), so "nfs" is the network plus libnfs, not a disk. Each figure is the
median of `--repeats` runs; speedups are ratios from this one run.

    .venv/bin/python -m bench.nfs [--quick] [--repeats 3] [--size-mib 256] [--rand-reads 2000] [--dir /var/tmp]

Prints a table, the goal check and a one-line headline for the README;
writes bench/results/nfs.json (nfs-quick.json with --quick, a ~1 minute
smoke run). Must run as root (network namespaces). Whatever happens, mounts
come down, the proxies and the server stop (by PID) and the namespace goes.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import (
    MIB,
    FioResult,
    MountUnavailable,
    assert_nothing_mounted_under,
    fmt_bw,
    fusecache_mount,
    fusecache_stats,
    print_table,
    run_fio,
    write_results,
)
from fusecache.backing.nfs import NfsBacking
from tests.harness.delay_proxy import DelayProxy
from tests.harness.nfs_server import EXPORT, MOUNT_PORT, NFS_PORT, NfsServer

KIB = 1024
IMAGE = "disk.img"
ROUND_TRIPS_MS = (0.0, 0.5, 2.0)
SETUPS = ("nfs", "cold", "warm")
PATTERNS = ("4k random", "1M seq")
GOAL_RTT_MS = 2.0
GOAL_SPEEDUP = 20.0  # warm 4 KiB IOPS >= 20 x NFS 4 KiB IOPS at GOAL_RTT_MS
MAX_PRIME_PASSES = 5
DRAIN_TIMEOUT = 120.0


# ---- directly from NFS ----------------------------------------------------------------
def nfs_random_4k(backing: NfsBacking, size: int, count: int) -> dict[str, float]:
    """`count` 4 KiB preads at distinct random offsets, one at a time (fixed seed): latency percentiles and IOPS."""
    offsets = random.Random(1).sample(range(size // (4 * KIB)), count)
    fh = backing.open(IMAGE, os.O_RDONLY)
    try:
        lat = []
        for block in offsets:
            t = time.perf_counter()
            if len(backing.pread(fh, block * 4 * KIB, 4 * KIB)) != 4 * KIB:
                raise RuntimeError("short NFS read")
            lat.append(time.perf_counter() - t)
    finally:
        backing.close(fh)
    lat.sort()
    return {
        "iops": len(lat) / sum(lat),
        "bw": len(lat) * 4 * KIB / sum(lat),
        "p50_us": statistics.median(lat) * 1e6,
        "p99_us": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e6,
        "runtime_s": sum(lat),
    }


def nfs_sequential_1m(backing: NfsBacking, size: int) -> dict[str, float]:
    """The whole image in 1 MiB preads, one at a time (NfsBacking splits each across its connections)."""
    fh = backing.open(IMAGE, os.O_RDONLY)
    try:
        t = time.perf_counter()
        for off in range(0, size, MIB):
            if len(backing.pread(fh, off, MIB)) != MIB:
                raise RuntimeError("short NFS read")
        elapsed = time.perf_counter() - t
    finally:
        backing.close(fh)
    return {"bw": size / elapsed, "iops": size / MIB / elapsed, "runtime_s": elapsed}


def nfs_getattr_rtt(backing: NfsBacking, count: int = 200) -> float:
    """The p50 of one GETATTR on an open file, in µs: the round trip the proxy really adds, plus the server's cost."""
    fh = backing.open(IMAGE, os.O_RDONLY)
    try:
        lat = []
        for _ in range(count):
            t = time.perf_counter()
            backing.fstat(fh)
            lat.append(time.perf_counter() - t)
    finally:
        backing.close(fh)
    return statistics.median(lat) * 1e6


# ---- through fusecache ------------------------------------------------------------------
class Run:
    """The work directory, image size and fio amounts of one benchmark run."""

    def __init__(self, work: str, size: int, rand_reads: int, cache_size: str) -> None:
        self.work = work
        self.size = size
        self.rand_reads = rand_reads
        self.cache_size = cache_size
        self._n = 0

    def _fresh(self, what: str) -> str:
        self._n += 1
        return os.path.join(self.work, f"{what}{self._n}")

    def mount(self, url: str) -> contextlib.AbstractContextManager[str]:
        """`fusecache mount URL` with a fresh, empty cache dir, inclusive admission."""
        options = ["--cache-dir", self._fresh("cache"), "--cache-size", self.cache_size, "--admit", "inclusive"]
        return fusecache_mount(url, self._fresh("mnt"), options, self._fresh("daemon") + ".log")

    def fio(self, mountpoint: str, pattern: str, whole: bool = False) -> FioResult:
        """One fio run of `pattern`; `whole`: 4 KiB random reads of every block of the image, not `rand_reads`."""
        path = os.path.join(mountpoint, IMAGE)
        if pattern == "4k random":
            return run_fio(path, "randread", "4k", direct=True, io_size=self.size if whole else self.rand_reads * 4 * KIB)
        return run_fio(path, "read", "1M", direct=True, io_size=self.size)


def progress(message: str) -> None:
    """A timestamped progress line on stderr: where a long run is, and which step took the time."""
    print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


def _settled_stats(mountpoint: str) -> dict[str, Any]:
    """The daemon's counters once its admission queue is empty (or after DRAIN_TIMEOUT)."""
    deadline = time.monotonic() + DRAIN_TIMEOUT
    while True:
        stats = fusecache_stats(mountpoint)  # None: the control socket did not answer; ask again
        if (stats is not None and not stats.get("queue")) or time.monotonic() > deadline:
            return stats or {}
        time.sleep(0.1)


def _fully_cached(stats: dict[str, Any], size: int) -> bool:
    store = stats.get("store", {})
    chunk = store.get("chunk_size") or 1
    return stats.get("queue") == 0 and store.get("chunks", 0) >= -(-size // chunk)


def prime(run: Run, mountpoint: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Read the whole image until the cache holds all of it (at most MAX_PRIME_PASSES passes).

    Returns each pass's fio figures with the chunks stored and queue length after it, and the last stats.
    """
    passes: list[dict[str, Any]] = []
    stats: dict[str, Any] = {}
    for _ in range(MAX_PRIME_PASSES):
        fio = run.fio(mountpoint, "1M seq")
        stats = _settled_stats(mountpoint)
        passes.append({**fio.as_dict(), "chunks_after": stats.get("store", {}).get("chunks"), "queue_after": stats.get("queue")})
        if _fully_cached(stats, run.size):
            break
    return passes, stats


def _image_counters(stats: dict[str, Any] | None) -> dict[str, int]:
    return dict((stats or {}).get("images", {}).get(IMAGE, {}))


# ---- one round trip -------------------------------------------------------------------------
def measure_round_trip(run: Run, server: NfsServer, rtt_ms: float, repeats: int) -> dict[str, Any]:
    """All setups and patterns behind a proxy adding `rtt_ms`: medians, every run, and the daemons' counters."""
    runs: dict[str, dict[str, list[dict[str, float]]]] = {s: {p: [] for p in PATTERNS} for s in SETUPS}
    counters: dict[str, Any] = {"cold": []}
    with contextlib.ExitStack() as stack:
        proxy = stack.enter_context(DelayProxy([NFS_PORT, MOUNT_PORT], delay_ms=rtt_ms / 2, netns=server.netns))
        url = f"nfs://127.0.0.1:{proxy.ports[NFS_PORT]}{EXPORT}?version=3&mountport={proxy.ports[MOUNT_PORT]}"
        backing = NfsBacking.from_url(url)
        stack.callback(backing.shutdown)
        nfs_random_4k(backing, run.size, min(50, run.rand_reads))  # connections up, server cache warm
        getattr_us = nfs_getattr_rtt(backing)
        progress(f"+{rtt_ms:g} ms: GETATTR p50 {getattr_us:.0f} µs; priming the warm mount")
        warm = stack.enter_context(run.mount(url))
        passes, primed = prime(run, warm)
        counters["prime_passes"] = passes
        counters["primed"] = {
            "store": primed.get("store"),
            "queue": primed.get("queue"),
            "skipped_admissions": primed.get("skipped_admissions"),
            "image": _image_counters(primed),
        }
        counters["fully_cached"] = _fully_cached(primed, run.size)
        for i in range(repeats):
            progress(f"+{rtt_ms:g} ms: repeat {i + 1}: nfs")
            runs["nfs"]["4k random"].append(nfs_random_4k(backing, run.size, run.rand_reads))
            runs["nfs"]["1M seq"].append(nfs_sequential_1m(backing, run.size))
            for pattern in PATTERNS:
                progress(f"+{rtt_ms:g} ms: repeat {i + 1}: cold {pattern}")
                with run.mount(url) as cold:
                    runs["cold"][pattern].append(run.fio(cold, pattern).as_dict())
                    stats = fusecache_stats(cold) or {}
                    skipped = stats.get("skipped_admissions")
                    counters["cold"].append({"pattern": pattern, "skipped_admissions": skipped, **_image_counters(stats)})
                    progress(f"+{rtt_ms:g} ms: repeat {i + 1}: cold {pattern} read; unmounting")
                progress(f"+{rtt_ms:g} ms: repeat {i + 1}: warm {pattern}")
                # Hits take ~30 µs: the whole image gives fio's ms-resolution runtime enough to measure.
                runs["warm"][pattern].append(run.fio(warm, pattern, whole=True).as_dict())
        after = _image_counters(fusecache_stats(warm))
        before = counters["primed"]["image"]
        counters["warm_runs"] = {k: after.get(k, 0) - before.get(k, 0) for k in ("hit_chunks", "miss_chunks")}
    medians = {s: {p: _median(runs[s][p]) for p in PATTERNS} for s in SETUPS}
    speedups = {p: _rate(p, medians["warm"][p]) / _rate(p, medians["nfs"][p]) for p in PATTERNS}
    return {
        "rtt_ms": rtt_ms,
        "getattr_p50_us": getattr_us,
        "medians": medians,
        "warm_over_nfs": speedups,
        "runs": runs,
        "counters": counters,
    }


def _median(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def _rate(pattern: str, r: dict[str, float]) -> float:
    return r["iops"] if pattern == "4k random" else r["bw"]


# ---- output ---------------------------------------------------------------------------------
def _figure(pattern: str, r: dict[str, float]) -> str:
    if pattern == "4k random":
        return f"{r['iops']:,.0f} IOPS, p50 {r['p50_us']:,.0f} µs, p99 {r['p99_us']:,.0f} µs"
    return fmt_bw(r["bw"])


def headline(results: list[dict[str, Any]]) -> str:
    """One line for the README: 4 KiB and 1 MiB, NFS vs warm, at the goal's round trip."""
    r = next(x for x in results if x["rtt_ms"] == GOAL_RTT_MS)
    nfs, warm = r["medians"]["nfs"], r["medians"]["warm"]
    return (
        f"NFS {GOAL_RTT_MS:g} ms away: warm 4 KiB random reads p50 {warm['4k random']['p50_us']:.0f} µs vs "
        f"{nfs['4k random']['p50_us']:.0f} µs from NFS ({r['warm_over_nfs']['4k random']:.0f}x the IOPS); "
        f"1 MiB sequential {fmt_bw(warm['1M seq']['bw'])} vs {fmt_bw(nfs['1M seq']['bw'])} "
        f"({r['warm_over_nfs']['1M seq']:.1f}x)"
    )


@contextlib.contextmanager
def served_image(size_mib: int, where: str, prefix: str) -> Iterator[tuple[str, NfsServer]]:
    """A scratch directory under `where`, and nfs-ganesha exporting IMAGE (`size_mib` MiB of random bytes) from it:
    (the directory, the server). Afterwards the server is stopped and the directory gone, nothing mounted under
    it (asserted); meanwhile SIGTERM unwinds like Ctrl-C, so that still happens."""
    work = tempfile.mkdtemp(prefix=prefix, dir=where)
    try:
        with terminate_cleanly(), NfsServer(Path(work) / "server") as server:
            with open(server.export_dir / IMAGE, "wb") as f:
                for _ in range(size_mib):
                    f.write(os.urandom(MIB))
            yield work, server
    finally:
        assert_nothing_mounted_under(work)
        shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def terminate_cleanly() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so the mounts, proxies and server still come down."""

    def raise_exit(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, raise_exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--quick", action="store_true", help="a smoke run (~1 min): 1 repeat, a 64 MiB image, 300 random reads")
    p.add_argument("--repeats", type=int, default=3, help="runs per figure, the median is kept (default 3)")
    p.add_argument("--size-mib", type=int, default=256, help="size of the image, read whole by 1M seq (default 256)")
    p.add_argument("--rand-reads", type=int, default=2000, help="4 KiB random reads per run (default 2000)")
    p.add_argument("--cache-size", default="2G", help="--cache-size of the mounts; must hold the image (default 2G)")
    p.add_argument("--dir", default="/var/tmp", help="where the export, caches and mountpoints go: not tmpfs (default /var/tmp)")
    args = p.parse_args()
    if args.quick:
        args.repeats, args.size_mib, args.rand_reads = 1, 64, 300
    if os.geteuid() != 0:
        print("bench/nfs.py needs root: the NFS server runs in a network namespace of its own", file=sys.stderr)
        return 2
    size = args.size_mib * MIB
    results: list[dict[str, Any]] = []
    try:
        with served_image(args.size_mib, args.dir, "fusecache-bench-nfs-") as (work, server):
            run = Run(work, size, args.rand_reads, args.cache_size)
            for rtt in ROUND_TRIPS_MS:
                t = time.monotonic()
                results.append(measure_round_trip(run, server, rtt, args.repeats))
                print(f"+{rtt:g} ms round trip measured in {time.monotonic() - t:.0f} s", flush=True)
    except (MountUnavailable, RuntimeError) as exc:  # no ganesha, a mount that failed, fio failing: one line
        print(f"bench/nfs.py: {exc}", file=sys.stderr)
        return 1

    rows = []
    for r in results:
        for pattern in PATTERNS:
            med = r["medians"]
            speedup = r["warm_over_nfs"][pattern]
            rtt = f"+{r['rtt_ms']:g} ms (GETATTR {r['getattr_p50_us'] / 1000:.2f} ms)"
            rows.append([rtt, pattern, *(_figure(pattern, med[s][pattern]) for s in SETUPS), f"{speedup:.1f}x"])
    print_table(
        f"NFSv3 (ganesha) {args.size_mib} MiB image, {args.rand_reads} random 4 KiB reads per run, one at a time; "
        f"fusecache via fio psync O_DIRECT; median of {args.repeats}",
        ["added round trip", "pattern", "NFS (NfsBacking)", "fusecache cold", "fusecache warm", "warm / NFS"],
        rows,
    )
    for r in results:
        c = r["counters"]
        store = (c["primed"] or {}).get("store") or {}
        print(
            f"+{r['rtt_ms']:g} ms: warm mount primed by {len(c['prime_passes'])} pass(es), "
            f"{store.get('chunks', '?')} chunks stored, fully cached: {c['fully_cached']}, "
            f"{c['primed'].get('skipped_admissions')} admissions skipped; "
            f"warm runs: {c['warm_runs']['hit_chunks']} chunk hits, {c['warm_runs']['miss_chunks']} misses"
        )
    goal = next(r for r in results if r["rtt_ms"] == GOAL_RTT_MS)["warm_over_nfs"]["4k random"]
    met = goal >= GOAL_SPEEDUP
    print(f"goal: warm 4 KiB >= {GOAL_SPEEDUP:g}x NFS at +{GOAL_RTT_MS:g} ms: {goal:.1f}x, {'met' if met else 'NOT MET'}")
    line = headline(results)
    print(f"headline: {line}")
    settings = {**{k: v for k, v in vars(args).items() if k != "dir"}, "nfs_version": 3, "ioengine": "psync", "direct": True}
    data = {
        "settings": settings,
        "goal": {"rtt_ms": GOAL_RTT_MS, "min_speedup": GOAL_SPEEDUP, "speedup": goal, "met": met},
        "headline": line,
        "results": results,
    }
    print(f"wrote {write_results('nfs-quick' if args.quick else 'nfs', data)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
