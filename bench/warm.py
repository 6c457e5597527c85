"""What a running `fusecache warm` costs the guests' reads on the same mount.

One mount (`--admit second-chance` with no balloon: nothing enters the
cache but what `warm` puts there) over a local directory of three images of
random bytes: `hot.img` (warmed before any run: every read a hit),
`cold.img` (never warmed: every read a miss) and `bulk.img` (what the
concurrent warm reads). fio reads `hot.img` or `cold.img` with 4 KiB random
reads, psync, O_DIRECT (QEMU `cache=none`), 1 job, time-based, first with
nothing else running (the baseline), then while `fusecache warm MNT
bulk.img --rate R` runs in a loop (drop, warm, again) for the whole fio
run. Setups alternate within each repeat; the figure is the median over the
repeats of IOPS with the warm over IOPS without it, in the same repeat. The
backing stays in the host page cache (a miss is the cheapest backing read
there is: the slowdown of misses is the largest it gets).

    .venv/bin/python -m bench.warm [--quick] [--repeats 3] [--runtime 8] [--rates 64M,16M,0] [--dir /var/tmp]

Prints a table; writes bench/results/warm.json (warm-quick.json with --quick).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import tempfile
import threading
from typing import Any

from bench.common import (
    FUSECACHE,
    MIB,
    REPO,
    assert_nothing_mounted_under,
    fmt_iops,
    fusecache_mount,
    fusecache_stats,
    make_random_file,
    print_table,
    run_fio,
    warm_page_cache,
    write_results,
)
from fusecache.cli import size


def fusecache(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FUSECACHE, *args], capture_output=True, text=True, timeout=600, cwd=REPO)


class WarmLoop:
    """`fusecache warm MNT bulk.img --rate R` again and again (dropping it between) until stopped; stopping Ctrl-Cs it."""

    def __init__(self, mountpoint: str, rate: int) -> None:
        self.mountpoint, self.rate = mountpoint, rate
        self.stop = threading.Event()
        self.fetched = 0
        self.seconds = 0.0
        self.proc: subprocess.Popen[str] | None = None
        self.error: str | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            cmd = [*FUSECACHE, "warm", self.mountpoint, "bulk.img", "--rate", str(self.rate), "--json"]
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
            out, err = self.proc.communicate()
            if self.proc.returncode < 0 or (self.proc.returncode == 130 and not out):
                continue  # stopped before it started a job
            if self.proc.returncode not in (0, 130):
                self.error = f"fusecache warm failed: {err.strip()}"
                return
            job = json.loads(out)
            self.fetched += job["backing_bytes"] + job["peer_bytes"]
            self.seconds += job["elapsed"]
            fusecache("drop", self.mountpoint, "bulk.img")

    def __enter__(self) -> WarmLoop:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # the warm cancels itself in the daemon, as on Ctrl-C
        self.thread.join()
        if self.error:
            raise RuntimeError(self.error)


def measure(mountpoint: str, target: str, rate: int | None, runtime: float) -> dict[str, Any]:
    path = os.path.join(mountpoint, target)
    if rate is None:
        r = run_fio(path, "randread", "4k", runtime=runtime)
        return {"iops": r.iops, "p50_us": r.p50_us, "p99_us": r.p99_us}
    with WarmLoop(mountpoint, rate) as loop:
        r = run_fio(path, "randread", "4k", runtime=runtime)
    return {"iops": r.iops, "p50_us": r.p50_us, "p99_us": r.p99_us,
            "warm_bytes_per_s": loop.fetched / loop.seconds if loop.seconds else 0.0}  # fmt: skip


def _rate(rate: int) -> str:
    return "unlimited" if rate == 0 else f"{rate / MIB:g} MiB/s"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run: 1 repeat of 3 s, small files")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--runtime", type=float, default=8.0, help="seconds per fio run")
    ap.add_argument("--rates", default="64M,16M,0", help="warm rates to try (0: no limit)")
    ap.add_argument("--dir", default="/var/tmp", help="where the images and cache live")
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.runtime = 1, 3.0
    rates = [size(r) for r in args.rates.split(",")]
    mib = {"hot.img": 64, "cold.img": 256, "bulk.img": 256} if args.quick else {"hot.img": 128, "cold.img": 512, "bulk.img": 512}
    work = tempfile.mkdtemp(prefix="fusecache-bench-warm-", dir=args.dir)
    results: dict[str, Any] = {"runtime_s": args.runtime, "repeats": args.repeats, "rates": rates, "files_mib": mib, "runs": []}
    try:
        images = os.path.join(work, "images")
        os.makedirs(images)
        for name, n in mib.items():
            warm_page_cache(make_random_file(os.path.join(images, name), n))
        opts = ["--cache-dir", os.path.join(work, "cache"), "--cache-size", "2G"]
        with fusecache_mount(images, os.path.join(work, "mnt"), opts, os.path.join(work, "daemon.log")) as mp:
            proc = fusecache("warm", mp, "hot.img", "--rate", "0")
            if proc.returncode != 0:
                raise RuntimeError(f"warming hot.img failed: {proc.stderr.strip()}")
            for repeat in range(args.repeats):
                for target in ("hot.img", "cold.img"):
                    base = measure(mp, target, None, args.runtime)
                    run = {"repeat": repeat, "target": target, "baseline": base, "with_warm": {}}
                    for rate in rates:
                        w = measure(mp, target, rate, args.runtime)
                        w["ratio"] = w["iops"] / base["iops"]
                        run["with_warm"][str(rate)] = w
                    results["runs"].append(run)
                    ratios = ", ".join(f"rate {_rate(r)}: {run['with_warm'][str(r)]['ratio']:.2f}x" for r in rates)
                    print(f"repeat {repeat} {target}: alone {fmt_iops(base['iops'])}; {ratios}", flush=True)
            st = fusecache_stats(mp)
            results["hot_backing_bytes"] = st["images"]["hot.img"]["backing_bytes"] if st else None
    finally:
        assert_nothing_mounted_under(work)
        shutil.rmtree(work, ignore_errors=True)
    rows = []
    summary: dict[str, Any] = {}
    for target, what in (("hot.img", "4 KiB random hits"), ("cold.img", "4 KiB random misses")):
        runs = [r for r in results["runs"] if r["target"] == target]
        base = statistics.median(r["baseline"]["iops"] for r in runs)
        for rate in rates:
            ratios = [r["with_warm"][str(rate)]["ratio"] for r in runs]
            got = statistics.median(r["with_warm"][str(rate)]["warm_bytes_per_s"] for r in runs)
            med = statistics.median(ratios)
            summary[f"{target}@{rate}"] = {"ratio_median": med, "ratio_min": min(ratios), "ratio_max": max(ratios), "warm_bytes_per_s": got}
            rows.append([what, fmt_iops(base), _rate(rate), f"{got / MIB:.0f} MiB/s",
                         f"{med:.2f}x", f"{min(ratios):.2f}-{max(ratios):.2f}"])  # fmt: skip
    results["summary"] = summary
    print_table(
        f"guest reads while a warm runs: fio 4 KiB random, O_DIRECT, {args.runtime:g} s, median of {args.repeats}",
        ["guest reads", "alone", "warm --rate", "warm got", "with warm / alone", "range"],
        rows,
    )
    print(write_results("warm-quick" if args.quick else "warm", results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
