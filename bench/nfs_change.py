"""What reading the NFSv4 change attribute costs: fstat and open+fstat+close, with and without it.

Owns the figure behind `NfsBacking.read_change` (fusecache/backing/nfs_change.py):
on NFSv4, `fstat` adds one GETATTR of its own (PUTFH + GETATTR on a side
connection) to libnfs's. Measured on tests/nfs_server.py's ganesha through its
loopback bridge, warm, one call at a time, in one run: the baseline is the
same backing with `read_change` off. Figures are medians of `--calls` calls,
repeated `--runs` times (the median run is reported).

    .venv/bin/python bench/nfs_change.py [--runs 3] [--calls 500]

Writes bench/results/nfs_change.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import print_table, write_results

from fusecache.backing.nfs import NfsBacking
from tests.nfs_server import NfsServer


def _median_us(fn, calls: int) -> float:
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def measure(backing: NfsBacking, calls: int) -> dict[str, float]:
    fh = backing.open("f", os.O_RDONLY)
    try:
        out = {"fstat_us": _median_us(lambda: backing.fstat(fh), calls)}
    finally:
        backing.close(fh)

    def open_stat_close() -> None:
        h = backing.open("f", os.O_RDONLY)
        backing.fstat(h)
        backing.close(h)

    out["open_fstat_close_us"] = _median_us(open_stat_close, calls)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--calls", type=int, default=500)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp, NfsServer(Path(tmp)) as srv:
        (srv.export_dir / "f").write_bytes(os.urandom(1 << 20))
        runs: dict[str, list[dict[str, float]]] = {"without change": [], "with change": []}
        for _ in range(args.runs):
            for name, read_change in (("without change", False), ("with change", True)):
                backing = NfsBacking.from_url(srv.url(4), connections=1)
                backing.read_change = read_change
                try:
                    measure(backing, 20)  # warm: connections, server caches
                    runs[name].append(measure(backing, args.calls))
                finally:
                    backing.shutdown()
    result = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
    base, with_change = result["without change"], result["with change"]
    rows = [
        [op, f"{base[key]:.0f} µs", f"{with_change[key]:.0f} µs", f"+{with_change[key] - base[key]:.0f} µs",
         f"{with_change[key] / base[key]:.2f}x"]
        for op, key in (("fstat", "fstat_us"), ("open + fstat + close", "open_fstat_close_us"))
    ]  # fmt: skip
    print_table(f"NFSv4 change attribute, ganesha on loopback, median of {args.calls} calls, {args.runs} runs",
                ["call", "without change", "with change", "cost", "ratio"], rows)
    path = write_results("nfs_change", {"runs": args.runs, "calls": args.calls, "results": result, "all_runs": runs})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
