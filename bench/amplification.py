"""Cold reads: bytes the daemon reads from the backing per byte requested, and time, against `--no-cache`.

The oracle for "bytes read from the backing" is the daemon's own
`/proc/PID/io` `rchar` (the store and LMDB are mmapped; /dev/fuse requests
add a few bytes): independent of fusecache's counters. After each run the
program waits until `rchar` has stopped moving, so background fetches
(readahead, the rest of a chunk) are counted too.

Patterns, each on a fresh mount with a fresh cache dir, the backing file warm
in the host page cache (the strictest test of the miss path's own cost):
- 128K seq @4K: 128 KiB sequential O_DIRECT reads starting at 4 KiB (not on
  a 64 KiB boundary), to the end of the file (a Python reader);
- 1M seq: fio, psync, O_DIRECT, 1 MiB reads of the whole file;
- 4k random: fio, psync, O_DIRECT, `--rand-mib` of 4 KiB reads, none repeated;
- 128K runs of 4: fio, psync, O_DIRECT, `--rand-mib` of 128 KiB reads in runs
  of 4 in a row at random places (`randread:4`): readahead's worst case, what
  it reads past the end of each run is never asked for.
Setups: `--no-cache` (the baseline), the default (second-chance) mount, `--admit inclusive`.

    .venv/bin/python -m bench.amplification [--size-mib 256] [--rand-mib 16] [--repeats 3] [--dir /var/tmp]
    PYTHONPATH=/work/main .venv/bin/python -m bench.amplification --name amplification-main   # another tree's code

Prints a table; writes bench/results/NAME.json (default amplification).
"""

from __future__ import annotations

import argparse
import contextlib
import mmap
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from bench.common import (
    MIB,
    assert_nothing_mounted_under,
    fusecache_mount,
    make_random_file,
    print_table,
    run_fio,
    warm_page_cache,
    write_results,
)

SETUPS = {"no-cache": ["--no-cache"], "second-chance": [], "inclusive": ["--admit", "inclusive"]}
PATTERNS = ("128K seq @4K", "1M seq", "4k random", "128K runs of 4")
SETTLE = 0.5  # seconds rchar must stay still to count as settled


def daemon_pid(mountpoint: str) -> int:
    """The pid of the fusecache daemon serving `mountpoint` (found by its command line)."""
    target = os.path.abspath(mountpoint).encode()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if b"mount" in args and target in args and not any(a.endswith(b"fio") for a in args):
            return int(name)
    raise RuntimeError(f"no daemon found for {mountpoint}")


def rchar(pid: int) -> int:
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/{pid}/io has no rchar")


def settled_rchar(pid: int, timeout: float = 30.0) -> int:
    """rchar once it has stopped moving (background fetches finished)."""
    deadline = time.monotonic() + timeout
    last = rchar(pid)
    while time.monotonic() < deadline:
        time.sleep(SETTLE)
        now = rchar(pid)
        if now == last:
            return now
        last = now
    return last


def read_seq_direct(path: str, start: int, block: int) -> tuple[int, float]:
    """O_DIRECT sequential reads of `block` bytes from `start` to EOF: (bytes requested, seconds)."""
    buf = mmap.mmap(-1, block)  # page-aligned, as O_DIRECT needs
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    requested = 0
    try:
        size = os.fstat(fd).st_size
        t0 = time.perf_counter()
        pos = start
        while pos < size:
            n = os.preadv(fd, [buf], pos)
            requested += block
            if n <= 0:
                break
            pos += n
        elapsed = time.perf_counter() - t0
    finally:
        os.close(fd)
        buf.close()
    return min(requested, size - start), elapsed


class Bench:
    def __init__(self, work: str, size_mib: int, rand_mib: int) -> None:
        self.work = work
        self.size_mib = size_mib
        self.rand_bytes = rand_mib * MIB
        os.makedirs(os.path.join(work, "backing"))
        self.image = make_random_file(os.path.join(work, "backing", "disk.img"), size_mib)
        self._n = 0

    @contextlib.contextmanager
    def mount(self, setup: str) -> Iterator[str]:
        self._n += 1
        options = list(SETUPS[setup])
        if setup != "no-cache":
            options += ["--cache-dir", os.path.join(self.work, f"cache{self._n}"), "--cache-size", "2G"]
        mnt = os.path.join(self.work, f"mnt{self._n}")
        try:
            with fusecache_mount(os.path.dirname(self.image), mnt, options, os.path.join(self.work, f"daemon{self._n}.log")) as mp:
                yield mp
        finally:  # each cache dir reserves its whole --cache-size (fallocate): 27 runs would hold 54 GiB
            shutil.rmtree(os.path.join(self.work, f"cache{self._n}"), ignore_errors=True)

    def run(self, setup: str, pattern: str) -> dict[str, Any]:
        """One cold run on a fresh mount: requested bytes, backing bytes (rchar), seconds."""
        warm_page_cache(self.image)
        with self.mount(setup) as mp:
            path = os.path.join(mp, "disk.img")
            pid = daemon_pid(mp)
            before = settled_rchar(pid)
            if pattern == "128K seq @4K":
                requested, seconds = read_seq_direct(path, 4096, 128 << 10)
            elif pattern == "1M seq":
                r = run_fio(path, "read", "1M", direct=True, io_size=self.size_mib * MIB)
                requested, seconds = r.io_bytes, r.runtime_s
            elif pattern == "128K runs of 4":
                r = run_fio(path, "randread:4", "128k", direct=True, io_size=self.rand_bytes)
                requested, seconds = r.io_bytes, r.runtime_s
            else:
                r = run_fio(path, "randread", "4k", direct=True, io_size=self.rand_bytes)
                requested, seconds = r.io_bytes, r.runtime_s
            backing = settled_rchar(pid) - before
        return {"requested": requested, "backing": backing, "seconds": seconds}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--size-mib", type=int, default=256, help="size of the test file (default 256)")
    p.add_argument("--rand-mib", type=int, default=16, help="MiB read per 4k random run (default 16)")
    p.add_argument("--repeats", type=int, default=3, help="runs per figure, the median is kept (default 3)")
    p.add_argument("--patterns", default=",".join(PATTERNS), help="comma-separated subset of: " + ", ".join(PATTERNS))
    p.add_argument("--name", default="amplification", help="results file name (default amplification)")
    p.add_argument("--dir", default="/var/tmp", help="where the file, caches and mountpoints go: not tmpfs (default /var/tmp)")
    args = p.parse_args()
    patterns = [x.strip() for x in args.patterns.split(",") if x.strip()]
    work = tempfile.mkdtemp(prefix="fusecache-amp-", dir=args.dir)
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {s: {pt: [] for pt in patterns} for s in SETUPS}
    try:
        bench = Bench(work, args.size_mib, args.rand_mib)
        for _ in range(args.repeats):
            for pattern in patterns:
                for setup in SETUPS:  # setups alternate within a repeat: noise hits them alike
                    runs[setup][pattern].append(bench.run(setup, pattern))
    finally:
        assert_nothing_mounted_under(work)
        shutil.rmtree(work, ignore_errors=True)
    rows = []
    table = []
    for pattern in patterns:
        base = statistics.median(r["seconds"] for r in runs["no-cache"][pattern])
        for setup in SETUPS:
            rs = runs[setup][pattern]
            amp = statistics.median(r["backing"] / r["requested"] for r in rs)
            secs = statistics.median(r["seconds"] for r in rs)
            rows.append(
                {"pattern": pattern, "setup": setup, "backing_over_requested": amp, "seconds": secs, "time_over_no_cache": secs / base}
            )
            table.append([pattern, setup, f"{amp:.3f}", f"{secs:.3f}", f"{secs / base:.2f}"])
    print_table(
        f"cold reads, {args.size_mib} MiB file warm in the host page cache, median of {args.repeats}; code from {_code_dir()}",
        ["pattern", "setup", "backing / requested (rchar)", "seconds", "time / no-cache"],
        table,
    )
    print(f"wrote {write_results(args.name, {'settings': vars(args), 'code': _code_dir(), 'rows': rows, 'runs': runs})}")
    return 0


def _code_dir() -> str:
    import fusecache

    return os.path.dirname(os.path.dirname(os.path.abspath(fusecache.__file__)))


if __name__ == "__main__":
    sys.exit(main())
