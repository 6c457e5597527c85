"""Warm hits through QEMU's own block layer, against the FUSE ceiling, in one run.

Owns the issue's row "warm 64 KiB reads at queue depth 16 through QEMU's block
layer": `qemu-img bench -f raw -t none -n -d 16 -s 65536 -c COUNT FILE` (no
guest; `-t none` is O_DIRECT as a guest's `cache=none` disk, `-n` native AIO,
16 requests in flight) reads the same file from:

- ceiling: `bench/memfs.py`, the file served from memory, answered inline
  by stock pyfuse3 (the goal's reference);
- ceiling-loop: the same, its pyfuse3 waiting for requests as the daemon's
  does (`memfs.py --fusecache-loop`, fusecache/fuse_loop.py): the loop's gain
  is the distance between the two ceilings, and warm against this row is
  the goal's ratio with the loop in the ceiling too;
- warm: a `fusecache mount --admit inclusive` whose cache was filled first
  (bench/hitpath.py's priming: whole-file reads until the stats say it is all
  cached);
- no-cache: `fusecache mount --no-cache`, for scale;
- floor: the daemon answering every read with constant bytes
  (`bench/constfs.py`): what any answer costs, so a warm hit's own cost is
  its distance from this row.

qemu-img bench reads COUNT requests from offset 0 on, wrapping at the end of
the file. Setups alternate within each repeat; each figure is the median of
the repeats, and "paired" the median over repeats of the ceiling's time
over the setup's in the same repeat (the machine's drift cancels); the goal
is warm >= 0.9x the ceiling's throughput, judged on the medians.

A run lasts longer than the mount's `--attr-timeout` (1 s), as a guest's
reads do: a shorter one never sees what the kernel does once the image's
attributes time out (until 2026-12-03 it asked for them before nearly every
queued read: `--count 8192` ran 0.5 s and hid it; docs/internals.md,
"Never stale"). The ceiling's own attributes never time out.

    .venv/bin/python -m bench.qemu_bench [--repeats 5] [--size-mib 512] [--count 32768] [--dir /var/tmp]

Prints a table, with the CPU time of the process serving each mount (memfs,
the daemon; every thread) per request; writes bench/results/qemu_bench.json.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from bench.common import (
    MIB,
    MountUnavailable,
    assert_nothing_mounted_under,
    fmt_bw,
    print_table,
    with_server_cpu,
    write_results,
)
from bench.hitpath import Bench, prime

GOAL = 0.9
SETUPS = ("ceiling", "ceiling-loop", "warm", "no-cache", "floor")


def qemu_img_bench(path: str, count: int, depth: int, size: int) -> float:
    """Seconds qemu-img bench takes for `count` reads of `size` bytes at queue depth `depth` (its own figure)."""
    cmd = ["qemu-img", "bench", "-f", "raw", "-t", "none", "-n", "-d", str(depth), "-s", str(size), "-c", str(count), path]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    wall = time.perf_counter() - t0
    m = re.search(r"Run completed in ([0-9.]+) seconds", out)
    return float(m.group(1)) if m else wall


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--repeats", type=int, default=5, help="runs per setup, the median is kept (default 5)")
    p.add_argument("--size-mib", type=int, default=512, help="size of the test file (default 512)")
    p.add_argument("--count", type=int, default=32768, help="requests per qemu-img bench run (default 32768: 2 GiB, ~2 s)")
    p.add_argument("--depth", type=int, default=16, help="requests in flight (default 16)")
    p.add_argument("--block", type=int, default=65536, help="bytes per request (default 65536)")
    p.add_argument("--dir", default="/var/tmp", help="where the test file, cache and mountpoints go: not tmpfs (default /var/tmp)")
    args = p.parse_args()
    if shutil.which("qemu-img") is None:
        print("qemu-img is not installed: install qemu-utils (make deps)", file=sys.stderr)
        return 2
    work = tempfile.mkdtemp(prefix="fusecache-qemu-bench-", dir=args.dir)
    runs: dict[str, list[float]] = {s: [] for s in SETUPS}
    cpu: dict[str, list[float]] = {s: [] for s in SETUPS}  # the serving process's CPU µs per request
    primed: dict[str, Any] | None = None
    try:
        bench = Bench(work, args.size_mib, 0, "2G", cold_backing=False)
        with contextlib.ExitStack() as stack:
            mounts = {
                "ceiling": stack.enter_context(bench.memfs()),
                "ceiling-loop": stack.enter_context(bench.memfs(fusecache_loop=True)),
                "warm": stack.enter_context(bench.cached()),
                "no-cache": stack.enter_context(bench.fusecache(["--no-cache"])),
                "floor": stack.enter_context(bench.floor()),
            }
            _, primed = prime(bench, mounts["warm"])
            for _ in range(args.repeats):
                for setup in SETUPS:
                    if setup == "no-cache":
                        bench.prepare_backing()
                    path = os.path.join(mounts[setup], "disk.img")
                    seconds, ns = with_server_cpu(mounts[setup], qemu_img_bench, path, args.count, args.depth, args.block)
                    runs[setup].append(seconds)
                    if ns is not None:
                        cpu[setup].append(ns / 1e3 / args.count)
    except MountUnavailable as exc:
        print(f"a mount could not start: {exc}", file=sys.stderr)
        return 1
    finally:
        assert_nothing_mounted_under(work)
        shutil.rmtree(work, ignore_errors=True)
    nbytes = args.count * args.block
    med = {s: statistics.median(runs[s]) for s in SETUPS}
    ratio = med["ceiling"] / med["warm"]  # throughput ratio: same bytes, time inverse
    paired = {s: _paired(runs["ceiling"], runs[s]) for s in SETUPS}
    warm_over_loop = _paired(runs["ceiling-loop"], runs["warm"])  # the goal's ratio with the loop in the ceiling too
    cached = (primed or {}).get("store", {}).get("logical_bytes", 0)
    print_table(
        f"qemu-img bench -t none -n -d {args.depth} -s {args.block} -c {args.count}, {args.size_mib} MiB file, "
        f"median of {args.repeats} ({cached / MIB:.0f} MiB cached before the warm runs)",
        ["setup", "seconds", "throughput", "/ ceiling", "paired", "server CPU µs / request"],
        [
            [s, f"{med[s]:.3f}", fmt_bw(nbytes / med[s]), f"{med['ceiling'] / med[s]:.2f}", f"{paired[s]:.2f}", _cpu(cpu[s])]
            for s in SETUPS
        ],
    )
    print(
        f"warm / ceiling = {ratio:.2f}, paired {paired['warm']:.2f} (goal >= {GOAL}: {'met' if ratio >= GOAL else 'NOT met'}); "
        f"the ceiling with the daemon's loop {paired['ceiling-loop']:.2f} (warm / it, paired: {warm_over_loop:.2f}); "
        f"the floor (constant bytes) {paired['floor']:.2f}"
    )
    results = {
        "settings": {k: v for k, v in vars(args).items() if k != "dir"},
        "seconds": runs,
        "median_seconds": med,
        "warm_over_ceiling": ratio,
        "paired_ceiling_over_setup": paired,
        "warm_over_ceiling_loop_paired": warm_over_loop,
        "goal_met": ratio >= GOAL,
        "cached_bytes_before_warm_runs": cached,
        "server_cpu_us_per_request": cpu,
    }
    print(f"wrote {write_results('qemu_bench', results)}")
    return 0


def _paired(reference: list[float], setup: list[float]) -> float:
    """The median over repeats of the reference's seconds over the setup's in the same repeat: the setup's
    throughput over the reference's, the machine's drift cancelled."""
    return statistics.median(r / s for r, s in zip(reference, setup, strict=True))


def _cpu(samples: list[float]) -> str:
    return f"{statistics.median(samples):.1f}" if samples else "-"


if __name__ == "__main__":
    sys.exit(main())
