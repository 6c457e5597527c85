"""What reading the NFSv4 change attribute costs: fstat and open+fstat+close, with and without it.

Owns the figure behind `NfsBacking.read_change` (fusecache/backing/nfs_change.py):
on NFSv4, `fstat` adds one GETATTR of its own (PUTFH + GETATTR on a side
connection) to libnfs's. Measured on tests/nfs_server.py's ganesha through its
loopback bridge, warm, one call at a time, in one run: the baseline is the
same backing with `read_change` off. Figures are medians of `--calls` calls,
repeated `--runs` times (the median run is reported).

It also measures what bounds NFSv3 (no change attribute): the export
filesystem's coarse timestamp tick (2000 files each written once, nobody
looking, then their ctimes compared), and how many of 200 pairs of
back-to-back writes by a second client look like one version to a first
client that reads the attributes between them, over v3 and v4.

    .venv/bin/python bench/nfs_change.py [--runs 3] [--calls 500]

Writes bench/results/nfs_change.json.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import print_table, write_results
from tests.nfs_server import NfsServer

from fusecache.backing.nfs import NfsBacking


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


def timestamp_tick(directory: Path, files: int = 2000) -> dict[str, float]:
    """Write `files` files once each with no stat in between; the ctimes they got show the coarse tick."""
    fds = [os.open(directory / f"tick{i}", os.O_CREAT | os.O_RDWR, 0o600) for i in range(files)]
    try:
        start = time.perf_counter()
        for fd in fds:
            os.pwrite(fd, b"x", 0)
        elapsed = time.perf_counter() - start
        ctimes = sorted({os.fstat(fd).st_ctime_ns for fd in fds})
    finally:
        for fd in fds:
            os.close(fd)
    steps = [b - a for a, b in itertools.pairwise(ctimes)]
    return {"writes": files, "seconds": elapsed, "distinct_ctimes": len(ctimes), "smallest_step_ms": min(steps, default=0) / 1e6}


def pairs_alike(srv: NfsServer, version: int, pairs: int = 200) -> int:
    """Pairs of back-to-back writes by one client that look like one version to another."""
    reader, writer = NfsBacking.from_url(srv.url(version)), NfsBacking.from_url(srv.url(version))
    try:
        fh, wfh = reader.open("f", os.O_RDONLY), writer.open("f", os.O_RDWR)
        alike = 0
        for i in range(pairs):
            writer.pwrite(wfh, bytes([i % 256]) * 4096, 0)
            first = reader.fstat(fh).version
            writer.pwrite(wfh, bytes([(i + 1) % 256]) * 4096, 0)
            alike += reader.fstat(fh).version == first
        reader.close(fh)
        writer.close(wfh)
        return alike
    finally:
        reader.shutdown()
        writer.shutdown()


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
        tick = timestamp_tick(srv.export_dir)
        alike = {f"v{v}": pairs_alike(srv, v) for v in (3, 4)}
    result = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
    base, with_change = result["without change"], result["with change"]
    rows = [
        [op, f"{base[key]:.0f} µs", f"{with_change[key]:.0f} µs", f"+{with_change[key] - base[key]:.0f} µs",
         f"{with_change[key] / base[key]:.2f}x"]
        for op, key in (("fstat", "fstat_us"), ("open + fstat + close", "open_fstat_close_us"))
    ]  # fmt: skip
    print_table(f"NFSv4 change attribute, ganesha on loopback, median of {args.calls} calls, {args.runs} runs",
                ["call", "without change", "with change", "cost", "ratio"], rows)
    print(f"export filesystem: {tick['writes']} writes in {tick['seconds'] * 1000:.0f} ms got {tick['distinct_ctimes']} distinct ctimes "
          f"(smallest step {tick['smallest_step_ms']:.1f} ms)")
    print(f"pairs of back-to-back writes that looked like one version (of 200): v3 {alike['v3']}, v4 {alike['v4']}")
    path = write_results("nfs_change", {"runs": args.runs, "calls": args.calls, "results": result, "all_runs": runs,
                                        "timestamp_tick": tick, "pairs_alike_of_200": alike})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
