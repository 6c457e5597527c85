"""fusecache's overhead as a plain passthrough: fio on the backing file, then on the same file through a mount.

Owns the question "what does going through fusecache cost when there is no
cache to help?". A file of random bytes on the root disk is kept warm in the
host page cache, so both sides read memory, not the disk. fio reads it with
psync, 4 KiB random and 128 KiB / 1 MiB sequential, 1 and 2 jobs, time-based:

- backing: the file itself, buffered (`--direct=0`): the reads the daemon
  itself makes (it opens the backing without O_DIRECT whatever the guest asks),
  served from the page cache. O_DIRECT on the backing would measure the disk.
- fusecache: the file through `fusecache mount --no-cache` (plain
  passthrough), with O_DIRECT, as QEMU's `cache=none` reads: every read
  reaches the daemon.

Backing and fusecache runs alternate within each repeat; each figure is the
median of the repeats; the ratio is fusecache / backing.

    .venv/bin/python -m bench.passthrough [--quick] [--runtime 5] [--repeats 3] [--size-mib 1024] [--dir /var/tmp]

Prints a table; writes bench/results/passthrough.json (passthrough-quick.json with --quick, a smoke run).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
from typing import Any

from bench.common import (
    FioResult,
    MountUnavailable,
    assert_nothing_mounted_under,
    fmt_bw,
    fmt_iops,
    fusecache_mount,
    make_random_file,
    median_result,
    print_table,
    run_fio,
    warm_page_cache,
    write_results,
)

PATTERNS = (("4k random", "randread", "4k"), ("128k seq", "read", "128k"), ("1M seq", "read", "1M"))
JOBS = (1, 2)


def _figure(pattern: str, r: FioResult) -> str:
    return fmt_iops(r.iops) if pattern == "4k random" else fmt_bw(r.bw)


def _ratio(pattern: str, fuse: FioResult, backing: FioResult) -> float:
    return fuse.iops / backing.iops if pattern == "4k random" else fuse.bw / backing.bw


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v.as_dict() if isinstance(v, FioResult) else v for k, v in row.items()}


def measure(work: str, size_mib: int, runtime: float, repeats: int) -> list[dict[str, Any]]:
    """Run every pattern x jobs on the backing and through a mount; one dict per table row."""
    os.makedirs(os.path.join(work, "backing"))
    image = make_random_file(os.path.join(work, "backing", "disk.img"), size_mib)
    warm_page_cache(image)
    runs: dict[tuple[str, int, str], list[FioResult]] = {}
    with contextlib.ExitStack() as stack:
        try:
            mp = stack.enter_context(
                fusecache_mount(os.path.dirname(image), os.path.join(work, "mnt"), ["--no-cache"], os.path.join(work, "daemon.log"))
            )
            through, error = os.path.join(mp, "disk.img"), None
        except MountUnavailable as exc:
            through, error = None, str(exc)
        for _ in range(repeats):
            for pattern, rw, bs in PATTERNS:
                for jobs in JOBS:
                    runs.setdefault((pattern, jobs, "backing"), []).append(
                        run_fio(image, rw, bs, numjobs=jobs, direct=False, runtime=runtime)
                    )
                    if through is not None:
                        runs.setdefault((pattern, jobs, "fusecache"), []).append(
                            run_fio(through, rw, bs, numjobs=jobs, direct=True, runtime=runtime)
                        )
    rows: list[dict[str, Any]] = []
    for pattern, _, _ in PATTERNS:
        for jobs in JOBS:
            backing = median_result(runs[(pattern, jobs, "backing")])
            fuse = median_result(runs[(pattern, jobs, "fusecache")]) if through is not None else None
            rows.append(
                {
                    "pattern": pattern,
                    "jobs": jobs,
                    "backing": backing,
                    "fusecache": fuse,
                    "ratio": _ratio(pattern, fuse, backing) if fuse else None,
                    "error": error,
                }
            )
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--quick", action="store_true", help="a smoke run: 1 s per run, 1 repeat, a 256 MiB file")
    p.add_argument("--runtime", type=float, default=5.0, help="seconds per fio run (default 5)")
    p.add_argument("--repeats", type=int, default=3, help="runs per figure, the median is kept (default 3)")
    p.add_argument("--size-mib", type=int, default=1024, help="size of the test file (default 1024)")
    p.add_argument("--dir", default="/var/tmp", help="where the test file and mountpoint go: not tmpfs (default /var/tmp)")
    args = p.parse_args()
    if args.quick:
        args.runtime, args.repeats, args.size_mib = 1.0, 1, 256
    work = tempfile.mkdtemp(prefix="fusecache-bench-", dir=args.dir)
    try:
        rows = measure(work, args.size_mib, args.runtime, args.repeats)
    finally:
        assert_nothing_mounted_under(work)
        shutil.rmtree(work, ignore_errors=True)
    table = [
        [
            str(r["pattern"]),
            str(r["jobs"]),
            _figure(str(r["pattern"]), r["backing"]),
            _figure(str(r["pattern"]), r["fusecache"]) if r["fusecache"] else "not available",
            f"{r['ratio']:.3f}" if r["ratio"] is not None else "-",
        ]
        for r in rows
    ]
    title = f"fusecache passthrough vs backing (page cache): {args.runtime:g} s runs, median of {args.repeats}"
    print_table(title, ["pattern", "jobs", "backing", "fusecache", "ratio"], table)
    if rows[0]["error"]:
        print(f"fusecache not available: {rows[0]['error']}")
    settings = {
        "runtime_s": args.runtime,
        "repeats": args.repeats,
        "size_mib": args.size_mib,
        "ioengine": "psync",
        "backing_direct": False,
        "fusecache_direct": True,
    }
    results = {"settings": settings, "rows": [_jsonable(r) for r in rows]}
    print(f"wrote {write_results('passthrough-quick' if args.quick else 'passthrough', results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
