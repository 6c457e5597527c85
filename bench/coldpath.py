"""The cold miss path against `--no-cache`, for one or more code trees in one run (before and after, alternated).

Each run is a fresh mount with a fresh, empty cache dir over a file warm in
the host page cache (the strictest test of the miss path's own cost); fio
reads with psync and O_DIRECT (QEMU `cache=none`), 1 job:

- 1M seq: the whole file once, in 1 MiB reads;
- 4k random: `--rand-mib` of 4 KiB reads at random offsets, none repeated;
- 128K runs of 4: `--rand-mib` of 128 KiB reads in runs of 4 in a row at
  random places (fio `randread:4`): a guest reading small files, the
  readahead's worst case (whatever it reads past a run is never read);
- 4k re-read: the same 4 KiB reads (fio's fixed seed) twice in a row, the
  second pass measured: what a second guest pays for what the first just
  read (the fetcher's buffer of recent reads answers it; its backing bytes
  show whether anything was read again).

Setups: `--no-cache` (the baseline), the default (second-chance) mount,
`--admit inclusive`. Every (tree, setup) pair runs once per repeat, in
alternation, so the machine's noise hits them alike; each figure is the median
of the repeats and every ratio is taken against the same tree's `--no-cache`
runs of the same repeats. On a shared machine the time ratio is noisy; the
table also gives the best run over the best run, the median p50 latency
ratio, and the daemon's CPU seconds (all threads, /proc/PID/stat) during
the reads over no-cache's: the work the cache adds, less disturbed by load;
and the daemon's peak resident memory (VmHWM), its buffers and memory reserve; and the requests that waited
for a read already in flight (readahead a stream caught up with), with the seconds they waited (`fusecache
stats --json`'s fetch counters); and, for `--admit inclusive`, its time over the default mount's in the same
repeat (paired): what admitting every chunk read (the writer naming, copying and committing them while the reads
go on) costs those reads, since the default mount admits nothing a guest reads; with the chunks its writer had
committed when the reads ended and those it refused meanwhile (too far behind). Bytes read from the backing are counted by the
daemon's `/proc/PID/io` rchar once it has stopped moving (background reads
included), an oracle independent of fusecache's own counters.

    .venv/bin/python -m bench.coldpath [--tree before=/work/main] [--tree after=.] [--repeats 5] [--size-mib 512]
    .venv/bin/python -m bench.coldpath --nfs-rtt 0.2 ...   # the backing is NFS (root)

With `--nfs-rtt MS` the backing is `nfs://` to tests/harness/nfs_server.py's
nfs-ganesha behind a tests/harness/delay_proxy.py adding MS of round trip
(the server reads from its host page cache): `--no-cache` over that URL is
then the floor of the FUSE hop over NFS, and each ratio is against it.
rchar does not see libnfs's socket reads (the column reads ~0.02 then):
bytes from an NFS backing are bench/amplification.py's business.

A tree is a directory holding a `fusecache` package (its daemon runs with that
directory as its working directory). Prints a table; writes
bench/results/coldpath.json (or --name).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

from bench.amplification import daemon_pid, settled_rchar
from bench.common import (
    MIB,
    REPO,
    assert_nothing_mounted_under,
    fusecache_mount,
    fusecache_stats,
    make_random_file,
    print_table,
    run_fio,
    warm_page_cache,
    write_results,
)

SETUPS = {"no-cache": ["--no-cache"], "default": [], "inclusive": ["--admit", "inclusive"]}
PATTERNS = ("1M seq", "4k random", "4k re-read", "128K runs of 4")


class Bench:
    def __init__(self, work: str, size_mib: int, rand_mib: int, backing_dir: str | None = None, url: str | None = None) -> None:
        self.work = work
        self.size = size_mib * MIB
        self.rand_bytes = rand_mib * MIB
        backing_dir = backing_dir or os.path.join(work, "backing")
        os.makedirs(backing_dir, exist_ok=True)
        self.image = make_random_file(os.path.join(backing_dir, "disk.img"), size_mib)
        self.backing = url or backing_dir  # what the mounts mount
        self._n = 0

    @contextlib.contextmanager
    def mount(self, code: str, setup: str) -> Iterator[str]:
        self._n += 1
        options = list(SETUPS[setup])
        if setup != "no-cache":
            options += ["--cache-dir", os.path.join(self.work, f"cache{self._n}"), "--cache-size", "2G"]
        mnt = os.path.join(self.work, f"mnt{self._n}")
        log = os.path.join(self.work, f"daemon{self._n}.log")
        try:
            with fusecache_mount(self.backing, mnt, options, log, code=code) as mp:
                yield mp
        finally:
            shutil.rmtree(os.path.join(self.work, f"cache{self._n}"), ignore_errors=True)

    def run(self, code: str, setup: str, pattern: str) -> dict[str, Any]:
        warm_page_cache(self.image)
        with self.mount(code, setup) as mp:
            path = os.path.join(mp, "disk.img")
            pid = daemon_pid(mp)
            if pattern == "4k re-read":
                run_fio(path, "randread", "4k", direct=True, io_size=self.rand_bytes)  # the first pass, not measured
            before = settled_rchar(pid)
            cpu0 = daemon_cpu(pid)
            if pattern == "1M seq":
                r = run_fio(path, "read", "1M", direct=True, io_size=self.size)
            elif pattern == "128K runs of 4":
                r = run_fio(path, "randread:4", "128k", direct=True, io_size=self.rand_bytes)
            else:
                r = run_fio(path, "randread", "4k", direct=True, io_size=self.rand_bytes)
            cpu = daemon_cpu(pid) - cpu0  # (read at once: the writer's catching up afterwards is not the reads' cost)
            stats = fusecache_stats(mp) or {}
            fetch = stats.get("fetch") or {}  # (--no-cache has no fetcher: zeros)
            backing = settled_rchar(pid) - before
            peak = daemon_peak_rss(pid)
        return {"seconds": r.runtime_s, "requested": r.io_bytes, "backing": backing, "p50_us": r.p50_us, "bw": r.bw, "cpu_s": cpu,
                "peak_rss_mib": peak,
                "waited_requests": fetch.get("waited_requests", 0), "waited_s": fetch.get("waited_seconds", 0.0),
                # chunks the writer had committed when the reads ended, and those refused meanwhile (it was too far behind)
                "admitted_chunks": (stats.get("store") or {}).get("admitted_chunks", 0),
                "skipped_admissions": stats.get("skipped_admissions", 0)}  # fmt: skip


def daemon_peak_rss(pid: int) -> float:
    """The daemon's peak resident memory so far, MiB (/proc/PID/status VmHWM): its buffers, its memory reserve."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def daemon_cpu(pid: int) -> float:
    """CPU seconds (user + system, every thread) the daemon has used: less disturbed by a busy machine than time."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--tree", action="append", default=[], help="NAME=DIR: code to measure (repeatable; default this tree)")
    p.add_argument("--size-mib", type=int, default=512, help="size of the test file, read whole by 1M seq (default 512)")
    p.add_argument("--rand-mib", type=int, default=16, help="MiB read per 4k random run (default 16)")
    p.add_argument("--repeats", type=int, default=5, help="runs per figure, the median is kept (default 5)")
    p.add_argument("--patterns", default=",".join(PATTERNS), help="comma-separated subset of: " + ", ".join(PATTERNS))
    p.add_argument("--setups", default=",".join(SETUPS), help="comma-separated subset of: " + ", ".join(SETUPS))
    p.add_argument("--name", default="coldpath", help="results file name (default coldpath)")
    p.add_argument("--dir", default="/var/tmp", help="where the file, caches and mountpoints go: not tmpfs (default /var/tmp)")
    p.add_argument("--nfs-rtt", type=float, default=None, help="back the mounts by NFS (ganesha) this many ms away (root)")
    args = p.parse_args()
    trees = dict(t.split("=", 1) for t in args.tree) or {"this": REPO}
    trees = {name: os.path.abspath(d) for name, d in trees.items()}
    patterns = [x.strip() for x in args.patterns.split(",") if x.strip()]
    setups = [x.strip() for x in args.setups.split(",") if x.strip()]
    if "no-cache" not in setups:
        setups.insert(0, "no-cache")
    work = tempfile.mkdtemp(prefix="fusecache-cold-", dir=args.dir)
    runs: dict[str, dict[str, dict[str, list[dict[str, Any]]]]] = {t: {s: {pt: [] for pt in patterns} for s in setups} for t in trees}
    try:
        with contextlib.ExitStack() as stack:
            if args.nfs_rtt is None:
                bench = Bench(work, args.size_mib, args.rand_mib)
            else:
                from pathlib import Path

                from tests.harness.delay_proxy import DelayProxy
                from tests.harness.nfs_server import EXPORT, MOUNT_PORT, NFS_PORT, NfsServer

                server = stack.enter_context(NfsServer(Path(work) / "server"))
                proxy = stack.enter_context(DelayProxy([NFS_PORT, MOUNT_PORT], delay_ms=args.nfs_rtt / 2, netns=server.netns))
                url = f"nfs://127.0.0.1:{proxy.ports[NFS_PORT]}{EXPORT}?version=3&mountport={proxy.ports[MOUNT_PORT]}"
                bench = Bench(work, args.size_mib, args.rand_mib, backing_dir=str(server.export_dir), url=url)
            for _ in range(args.repeats):
                for pattern in patterns:
                    for setup in setups:
                        for tree, code in trees.items():  # trees and setups alternate within a repeat
                            runs[tree][setup][pattern].append(bench.run(code, setup, pattern))
    finally:
        assert_nothing_mounted_under(work)
        shutil.rmtree(work, ignore_errors=True)
    rows, table = [], []
    for pattern in patterns:
        for tree in trees:
            base = runs[tree]["no-cache"][pattern]
            default = runs[tree]["default"][pattern] if "default" in setups else None
            for setup in setups:
                rs = runs[tree][setup][pattern]
                ratios = [r["seconds"] / b["seconds"] for r, b in zip(rs, base, strict=True)]
                # what admitting costs the reads it admits (inclusive's writer at work; the default admits nothing read)
                over_default = None if default is None or setup in ("no-cache", "default") else [
                    r["seconds"] / d["seconds"] for r, d in zip(rs, default, strict=True)
                ]  # fmt: skip
                row = {
                    "pattern": pattern, "tree": tree, "setup": setup,
                    "seconds": statistics.median(r["seconds"] for r in rs),
                    "p50_us": statistics.median(r["p50_us"] for r in rs),
                    "time_over_no_cache": statistics.median(ratios),
                    "ratio_min": min(ratios), "ratio_max": max(ratios),
                    # the least disturbed runs of each: best time over best time
                    "best_over_best": min(r["seconds"] for r in rs) / min(b["seconds"] for b in base),
                    "p50_over_no_cache": statistics.median(r["p50_us"] / b["p50_us"] for r, b in zip(rs, base, strict=True)),
                    "cpu_over_no_cache": statistics.median(r["cpu_s"] for r in rs) / max(statistics.median(b["cpu_s"] for b in base), 1e-9),
                    "backing_over_requested": statistics.median(r["backing"] / r["requested"] for r in rs),
                    "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in rs),
                    "waited_requests": statistics.median(r.get("waited_requests", 0) for r in rs),
                    "waited_s": statistics.median(r.get("waited_s", 0.0) for r in rs),
                    "time_over_default": statistics.median(over_default) if over_default else None,
                    "over_default_min": min(over_default) if over_default else None,
                    "over_default_max": max(over_default) if over_default else None,
                    "admitted_chunks": statistics.median(r.get("admitted_chunks", 0) for r in rs),
                    "skipped_admissions": statistics.median(r.get("skipped_admissions", 0) for r in rs),
                }  # fmt: skip
                rows.append(row)
                table.append([
                    pattern, tree, setup, f"{row['seconds']:.3f}", f"{row['p50_us']:.0f}",
                    f"{row['time_over_no_cache']:.2f} ({row['ratio_min']:.2f}-{row['ratio_max']:.2f})",
                    f"{row['best_over_best']:.2f}", f"{row['p50_over_no_cache']:.2f}", f"{row['cpu_over_no_cache']:.2f}",
                    f"{row['backing_over_requested']:.3f}", f"{row['peak_rss_mib']:.0f}",
                    f"{row['waited_requests']:.0f} / {row['waited_s']:.3f}",
                    f"{row['time_over_default']:.3f} ({row['over_default_min']:.2f}-{row['over_default_max']:.2f}); "
                    f"{row['admitted_chunks']:.0f} admitted, {row['skipped_admissions']:.0f} skipped" if over_default else "",
                ])  # fmt: skip
    print_table(
        f"cold reads, {args.size_mib} MiB file warm in the host page cache"
        + (f", over NFS +{args.nfs_rtt:g} ms" if args.nfs_rtt is not None else "")
        + f", median of {args.repeats} (paired ratio: median (min-max))",
        [
            "pattern",
            "tree",
            "setup",
            "seconds",
            "p50 µs",
            "time / no-cache",
            "best / best",
            "p50 / no-cache",
            "daemon CPU / no-cache",
            "backing / requested",
            "peak RSS MiB",
            "waits (requests / s)",
            "time / default",
        ],
        table,
    )
    print(f"wrote {write_results(args.name, {'settings': vars(args), 'trees': trees, 'rows': rows, 'runs': runs})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
