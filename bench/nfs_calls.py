"""NfsBacking's cost per call, this tree against another revision's, on one nfs-ganesha.

Owns the measurement behind how `fusecache/backing/nfs.py` waits for libnfs
(its async calls and its own event loop, instead of libnfs's blocking calls):
what that costs a read. One ganesha (tests/harness/nfs_server.py, in a network
namespace of its own, straight to the server: no added round trip, so the
client's own cost is the largest share) exports a file of random bytes, warm
in the host page cache. Worker processes alternate between the baseline's
tree and this one (baseline first), each with a fresh `NfsBacking`:

- 4 KiB preads at random offsets, one at a time (the same offsets in every
  worker): p50, p99 and CPU µs per call (the process's CPU time, so load on
  the machine moves it little);
- the same reads made from a trio loop with `pread_on_loop` (the daemon's cold
  read of an open file: libnfs's async call, its socket waited for by trio):
  p50 and CPU µs per call, against the blocking `pread` above, which a thread
  makes (a tree without `pread_on_loop` leaves these rows out);
- the whole file in 1 MiB preads, one at a time (each split over several
  connections, as the daemon does): MB/s.

Ratios are this tree over the baseline, paired run by run: median (min-max).

    .venv/bin/python -m bench.nfs_calls --baseline REV [--runs 5] [--version 3] [--size-mib 128] [--reads 3000]

Prints a table; writes bench/results/nfs_calls.json. Must run as root.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.common import REPO, baseline_tree, print_table, run_in_tree, write_results

WORKER = r"""
import json, os, random, sys, time
from fusecache.backing.nfs import NfsBacking

url, size, reads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
backing = NfsBacking.from_url(url)
fh = backing.open("img", os.O_RDONLY)
rnd = random.Random(1)
offsets = [rnd.randrange(0, size // 4096) * 4096 for _ in range(reads + 200)]
for off in offsets[:200]:  # connections up, handles open
    backing.pread(fh, off, 4096)
lat = []
cpu0 = time.process_time()
for off in offsets[200:]:
    t = time.perf_counter()
    backing.pread(fh, off, 4096)
    lat.append(time.perf_counter() - t)
cpu = (time.process_time() - cpu0) / reads
on_loop = getattr(backing, "pread_on_loop", None)
loop_figures = {}
if on_loop is not None:
    import trio

    async def from_the_loop():
        for off in offsets[:200]:  # the loop's context up, the file open on it
            await on_loop(fh, off, 4096)
        out, cpu0 = [], time.process_time()
        for off in offsets[200:]:
            t = time.perf_counter()
            if await on_loop(fh, off, 4096) is None:
                raise SystemExit("pread_on_loop declined a read of an open file on a free connection")
            out.append(time.perf_counter() - t)
        return out, (time.process_time() - cpu0) / reads

    loop_lat, loop_cpu = trio.run(from_the_loop)
    loop_lat.sort()
    loop_figures = {"on loop p50 µs": loop_lat[len(loop_lat) // 2] * 1e6, "on loop CPU µs / 4 KiB call": loop_cpu * 1e6}
t = time.perf_counter()
for off in range(0, size, 1 << 20):
    backing.pread(fh, off, 1 << 20)
mbs = size / (time.perf_counter() - t) / 1e6
backing.close(fh)
backing.shutdown()
lat.sort()
print(json.dumps({
    "p50 µs": lat[len(lat) // 2] * 1e6,
    "p99 µs": lat[int(len(lat) * 0.99)] * 1e6,
    "CPU µs / 4 KiB call": cpu * 1e6,
    "1 MiB seq MB/s": mbs,
    **loop_figures,
}))
"""

FIGURES = ("p50 µs", "p99 µs", "CPU µs / 4 KiB call", "on loop p50 µs", "on loop CPU µs / 4 KiB call", "1 MiB seq MB/s")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", required=True, help="git revision to compare with (e.g. HEAD~1)")
    p.add_argument("--runs", type=int, default=5, help="workers per tree, alternating (default 5)")
    p.add_argument("--version", type=int, choices=(3, 4), default=3, help="NFS version (default 3)")
    p.add_argument("--size-mib", type=int, default=128, help="file size, read whole in 1 MiB reads (default 128)")
    p.add_argument("--reads", type=int, default=3000, help="4 KiB reads per worker (default 3000)")
    p.add_argument("--dir", default="/var/tmp", help="scratch directory for the export and the baseline tree")
    args = p.parse_args()
    if os.geteuid() != 0:
        print("bench.nfs_calls: run as root (nfs-ganesha runs in a network namespace)", file=sys.stderr)
        return 2
    sys.path.insert(0, REPO)
    from tests.harness.nfs_server import NfsServer

    size = args.size_mib << 20
    runs: dict[str, list[dict[str, Any]]] = {"baseline": [], "this tree": []}
    with tempfile.TemporaryDirectory(dir=args.dir) as work, NfsServer(Path(work)) as server, baseline_tree(args.baseline, args.dir) as base:
        (server.export_dir / "img").write_bytes(random.randbytes(size))
        worker_args = (server.url(args.version), str(size), str(args.reads))
        for _ in range(args.runs):
            runs["baseline"].append(run_in_tree(WORKER, base, *worker_args))
            runs["this tree"].append(run_in_tree(WORKER, REPO, *worker_args))
    rows = []
    ratios: dict[str, list[float]] = {}
    for fig in FIGURES:
        if fig not in runs["this tree"][0]:
            continue
        ratios[fig] = [t[fig] / b[fig] for b, t in zip(runs["baseline"], runs["this tree"], strict=True) if fig in b]
        rows.append([
            fig,
            f"{statistics.median(r[fig] for r in runs['baseline']):.1f}" if ratios[fig] else "-",
            f"{statistics.median(r[fig] for r in runs['this tree']):.1f}",
            f"{statistics.median(ratios[fig]):.2f} ({min(ratios[fig]):.2f}-{max(ratios[fig]):.2f})" if ratios[fig] else "-",
        ])  # fmt: skip
    print_table(
        f"NfsBacking calls, NFSv{args.version} straight to ganesha, {args.runs} workers per tree, median",
        ["figure", f"baseline {args.baseline}", "this tree", "this / baseline"],
        rows,
    )
    path = write_results("nfs_calls", {"settings": vars(args), "runs": runs, "ratios": ratios})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
