"""What the FUSE benchmarks share: mounts that always come down, fio runs, test files, tables and JSON.

`fusecache_mount` runs the real `fusecache mount` command as a subprocess and,
whatever happens, unmounts it again (`fusecache umount`, then `fusermount3 -u
-z`, then SIGTERM to the daemon pid the mount printed). A mount that fails to
start (for instance an option this build does not have yet) raises
`MountUnavailable`, which a benchmark reports as "not available" instead of
crashing. `memfs_mount` does the same for `bench/memfs.py`, the ceiling.
`run_fio` runs one fio job with JSON output and returns its bandwidth, IOPS,
runtime and completion-latency percentiles. These machines are noisy and
shared: a benchmark compares ratios taken in one run, each figure the median
of a few short repeats.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH_DIR)
RESULTS_DIR = os.path.join(BENCH_DIR, "results")
FUSECACHE = [sys.executable, "-m", "fusecache"]
MIB = 1 << 20
T = TypeVar("T")


class MountUnavailable(Exception):
    """A mount that could not be started; the message is the command's own error line."""


# ---- mounts ------------------------------------------------------------------
def is_mounted(path: str) -> bool:
    """Whether something is mounted at exactly `path`, from mountinfo (never stats the mount)."""
    path = os.path.abspath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _stop_pid(pid: int, grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds: the pid is one this benchmark started."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not _alive(pid):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and _alive(pid):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            time.sleep(0.05)


def _wait_mounted(mountpoint: str, timeout: float, proc: subprocess.Popen[Any] | None = None) -> None:
    """Until `mountpoint` is mounted; MountUnavailable after `timeout` seconds, or at once if `proc` (the process
    that serves it) has exited."""
    deadline = time.monotonic() + timeout
    while not is_mounted(mountpoint):
        if proc is not None and proc.poll() is not None:
            raise MountUnavailable(f"the server of {mountpoint} exited with status {proc.returncode} before it was mounted")
        if time.monotonic() > deadline:
            raise MountUnavailable(f"{mountpoint} was not mounted after {timeout:.0f} s")
        time.sleep(0.02)


def _force_unmount(mountpoint: str, pid: int | None) -> None:
    if is_mounted(mountpoint):
        with contextlib.suppress(subprocess.TimeoutExpired):
            subprocess.run([*FUSECACHE, "umount", mountpoint], capture_output=True, timeout=60, cwd=REPO)
    if is_mounted(mountpoint):
        with contextlib.suppress(subprocess.TimeoutExpired):
            subprocess.run(["fusermount3", "-u", "-z", mountpoint], capture_output=True, timeout=30)
    if pid is not None:
        _stop_pid(pid)


@contextlib.contextmanager
def fusecache_mount(backing: str, mountpoint: str, options: Sequence[str], log_file: str, code: str = REPO) -> Iterator[str]:
    """`fusecache mount BACKING MOUNTPOINT OPTIONS...` with the `fusecache` package of tree `code` (default this
    one); yields the mountpoint; always unmounts."""
    os.makedirs(mountpoint, exist_ok=True)
    cmd = [*FUSECACHE, "mount", backing, mountpoint, "--log-file", log_file, *options]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=code)
    found = re.search(r"daemon pid (\d+)", proc.stderr)
    pid = int(found.group(1)) if found else None
    try:
        if proc.returncode != 0:
            lines = proc.stderr.strip().splitlines()
            raise MountUnavailable(lines[-1] if lines else f"fusecache mount exited with status {proc.returncode}")
        _wait_mounted(mountpoint, 10)
        if "--no-cache" not in options:
            _wait_reserve(log_file, 120)
        yield mountpoint
    finally:
        _force_unmount(mountpoint, pid)


@contextlib.contextmanager
def constfs_mount(backing: str, mountpoint: str, log_file: str) -> Iterator[str]:
    """`bench/constfs.py BACKING MOUNTPOINT` (the daemon answering every read with constant bytes: a hit's floor);
    yields the mountpoint; always unmounted and stopped."""
    os.makedirs(mountpoint, exist_ok=True)
    with open(log_file, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.constfs", backing, mountpoint], stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=REPO
        )
    try:
        _wait_mounted(mountpoint, 30, proc)
        yield mountpoint
    finally:
        _force_unmount(mountpoint, proc.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)


def _wait_reserve(log_file: str, timeout: float) -> None:
    """Until the daemon has touched its memory reserve (fusecache/memory.py), which it does once at start,
    before guests run: a cold run measured during it would time the mount's start, not its reads.
    Code without a reserve (another tree on PYTHONPATH) is not waited for."""
    if importlib.util.find_spec("fusecache.memory") is None:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), open(log_file) as f:
            if "memory reserve:" in f.read():
                return
        time.sleep(0.1)


@contextlib.contextmanager
def memfs_mount(source: str, mountpoint: str, timeout: float = 120, nfs: str | None = None, fusecache_loop: bool = False) -> Iterator[str]:
    """`bench/memfs.py SOURCE MOUNTPOINT` (serves `os.path.basename(source)`); always unmounted and stopped.
    `nfs`: SOURCE is a file of that NFS export, read at each request (`memfs.py --nfs`). `fusecache_loop`: its
    pyfuse3 waits for requests as the daemon's does (`memfs.py --fusecache-loop`)."""
    os.makedirs(mountpoint, exist_ok=True)
    proc = subprocess.Popen(
        [
            sys.executable,
            os.path.join(BENCH_DIR, "memfs.py"),
            *(["--nfs", nfs] if nfs else []),
            *(["--fusecache-loop"] if fusecache_loop else []),
            source,
            mountpoint,
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()  # memfs prints "ready" or exits
        if line != "ready":
            raise MountUnavailable(f"memfs did not start (exit status {proc.wait(timeout)})")
        _wait_mounted(mountpoint, timeout)
        yield mountpoint
    finally:
        if proc.poll() is None:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        if is_mounted(mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", mountpoint], capture_output=True, timeout=30)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def fusecache_stats(mountpoint: str) -> dict[str, Any] | None:
    """The daemon's counters (`fusecache stats --json`), or None when this build or mount has none."""
    proc = subprocess.run([*FUSECACHE, "stats", "--json", mountpoint], capture_output=True, text=True, timeout=30, cwd=REPO)
    if proc.returncode != 0:
        return None
    try:
        return json.loads(proc.stdout)
    except ValueError:
        return None


def assert_nothing_mounted_under(directory: str) -> None:
    """Raise if any mount is left below `directory` (a benchmark must never leave one behind)."""
    prefix = os.path.abspath(directory) + "/"
    with open("/proc/self/mountinfo") as f:
        left = [line.split()[4] for line in f if line.split()[4].startswith(prefix)]
    if left:
        raise RuntimeError(f"mounts left behind: {left}")


# ---- files and the page cache ---------------------------------------------------
@contextlib.contextmanager
def baseline_tree(revision: str, scratch: str) -> Iterator[str]:
    """This repository at `revision`, extracted with `git archive` into a directory under `scratch` (removed after)."""
    import shutil
    import tempfile

    base = tempfile.mkdtemp(prefix="fusecache-baseline-", dir=scratch)
    try:
        archive = subprocess.run(["git", "-C", REPO, "archive", revision], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", base], input=archive, check=True)
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def run_in_tree(program: str, tree: str, *args: str) -> dict[str, Any]:
    """Run `program` (Python source printing one JSON object) with `tree` first on its path; its JSON.

    How a benchmark times another revision's code beside this one's: each in a process of its own.
    """
    env = {**os.environ, "PYTHONPATH": tree}
    proc = subprocess.run([sys.executable, "-c", program, *args], cwd=tree, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"the benchmark's worker for {tree} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout)


# The head of a worker (`run_in_tree`) that builds the read path in process, as a mount does (bench/hitcost.py,
# bench/misscost.py): only names every tree compared has.
READ_PATH = """
import json, os, random, sys, tempfile, time
import trio
from fusecache import admission
from fusecache.backing import OffLoop, open_backing
from fusecache.cache import Cache, Passthrough
from fusecache.files import Files
from fusecache.inodes import OpenFile
from fusecache.store import Store
from fusecache.store_queue import StoreQueue

MIB = 1 << 20


def read_path(work, size, store_size, policy):
    \"""work/backing/disk.img, `size` random bytes warm in the host page cache, and the read path over it: (backing,
    store, queue, offloop, files, cache); `policy(files, offloop)` is its admission. Close the store and shut the
    backing down after.\"""
    os.makedirs(os.path.join(work, "backing"))
    path = os.path.join(work, "backing", "disk.img")
    with open(path, "wb") as f:
        for i in range(0, size, MIB):
            f.write(random.Random(i).randbytes(min(MIB, size - i)))
    with open(path, "rb", buffering=0) as f:
        while f.read(8 * MIB):
            pass
    backing = open_backing(os.path.join(work, "backing"))
    store = Store(os.path.join(work, "cache"), store_size)
    queue = StoreQueue(store)
    offloop = OffLoop(backing)
    files = Files(offloop, store, queue, revalidate=3600.0)
    return backing, store, queue, offloop, files, Cache(offloop, files, queue, policy(files, offloop))


def collect_as_the_daemon():
    \"""The cyclic collector as a mount runs it while serving (what was built so far frozen, its thresholds): at
    Python's defaults a cold 1 MiB stream pays collections the daemon never makes.\"""
    import gc
    try:
        from fusecache.daemon import GC_THRESHOLDS
    except ImportError:  # a tree from before the daemon set them
        return
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
"""


def paired_runs(program: str, revision: str, runs: int, scratch: str) -> dict[str, list[dict[str, Any]]]:
    """`program` (see `run_in_tree`, given `scratch` as its argument) run `runs` times in `revision`'s tree and in
    this one, alternating (baseline first): {"baseline": [...], "this tree": [...]}, one JSON object a run."""
    out: dict[str, list[dict[str, Any]]] = {"baseline": [], "this tree": []}
    with baseline_tree(revision, scratch) as base:
        for _ in range(runs):
            out["baseline"].append(run_in_tree(program, base, scratch))
            out["this tree"].append(run_in_tree(program, REPO, scratch))
    return out


def make_random_file(path: str, mib: int) -> str:
    """A file of `mib` MiB of incompressible random bytes (zero pages would be holes in the cache)."""
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(os.urandom(MIB))
        f.flush()
        os.fsync(f.fileno())
    return path


def drop_page_cache(path: str) -> None:
    """Evict `path` from the host page cache, so the next read comes from the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def warm_page_cache(path: str) -> None:
    """Read `path` once with buffered reads so that it sits in the host page cache."""
    with open(path, "rb", buffering=0) as f:
        while f.read(8 * MIB):
            pass


# ---- the serving process's CPU ----------------------------------------------------
def server_pid(mountpoint: str) -> int | None:
    """The process serving `mountpoint` (a fusecache daemon, memfs): the one whose arguments name it."""
    want = os.path.abspath(mountpoint).encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        with contextlib.suppress(OSError), open(f"/proc/{entry}/cmdline", "rb") as f:
            if want in f.read().split(b"\0"):
                return int(entry)
    return None


def _thread_cpu_ns(pid: int) -> dict[str, int]:
    """On-CPU time so far of each live thread of `pid`, by thread id (/proc/PID/task/*/schedstat: nanoseconds, not
    clock ticks)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/schedstat") as f:
            out[tid] = int(f.read().split()[0])
    return out


def with_server_cpu(mountpoint: str, work: Callable[..., T], *args: Any, **kwargs: Any) -> tuple[T, int | None]:
    """`work(*args, **kwargs)`'s result, and the nanoseconds the process serving `mountpoint` (`server_pid`) spent on CPU
    meanwhile, every thread (None: no such process). Each live thread's own difference is summed, so a thread
    that exits meanwhile (an idle worker timing out) takes only its time during the work with it, never its past."""
    pid = server_pid(mountpoint)
    before = _thread_cpu_ns(pid) if pid else {}
    result = work(*args, **kwargs)
    if not pid:
        return result, None
    return result, sum(ns - before.get(tid, 0) for tid, ns in _thread_cpu_ns(pid).items())


# ---- fio -------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class FioResult:
    """One fio job group (all jobs summed): bytes/s, IOPS, runtime, completion latency percentiles in µs."""

    bw: float
    iops: float
    runtime_s: float
    io_bytes: int
    p50_us: float
    p99_us: float
    server_cpu_us: float = 0.0  # CPU time of the process serving the mount, every thread, per request (0: not measured)

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


def run_fio(
    filename: str,
    rw: str,
    bs: str,
    *,
    numjobs: int = 1,
    direct: bool = True,
    runtime: float | None = None,
    io_size: int | None = None,
    timeout: float = 600,
) -> FioResult:
    """One psync fio job group reading `filename`: time-based when `runtime` is given, else `io_size` bytes per job.

    `invalidate=0` keeps fio from dropping the page cache of the file first: the
    backing file is meant to stay warm unless the benchmark drops it itself.
    """
    cmd = [
        "fio",
        "--name=bench",
        f"--filename={filename}",
        f"--rw={rw}",
        f"--bs={bs}",
        f"--direct={int(direct)}",
        "--ioengine=psync",
        f"--numjobs={numjobs}",
        "--group_reporting",
        "--readonly",
        "--invalidate=0",
        "--output-format=json",
    ]
    if runtime is not None:
        cmd += [f"--runtime={runtime}s", "--time_based"]
    if io_size is not None:
        cmd += [f"--io_size={io_size}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    start = proc.stdout.find("{")  # fio may print warnings before the JSON
    if proc.returncode != 0 or start < 0:
        raise RuntimeError(f"fio failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    read = json.loads(proc.stdout[start:])["jobs"][0]["read"]
    pct = read["clat_ns"].get("percentile", {})
    return FioResult(
        bw=float(read["bw_bytes"]),
        iops=float(read["iops"]),
        runtime_s=read["runtime"] / 1000,
        io_bytes=int(read["io_bytes"]),
        p50_us=pct.get("50.000000", 0) / 1000,
        p99_us=pct.get("99.000000", 0) / 1000,
    )


def run_fio_served(mountpoint: str, filename: str, rw: str, bs: str, **kwargs: Any) -> FioResult:
    """`run_fio` of `filename` under `mountpoint`, with the CPU time per request of the process serving the mount
    (`with_server_cpu`) in `server_cpu_us` (left 0 when no process names the mountpoint). `bs`: 4k, 64k, 1M and the like."""
    result, cpu_ns = with_server_cpu(mountpoint, run_fio, filename, rw, bs, **kwargs)
    if cpu_ns is None:
        return result
    requests = result.io_bytes / (int(bs[:-1]) << {"k": 10, "M": 20}[bs[-1]])
    return dataclasses.replace(result, server_cpu_us=cpu_ns / 1e3 / max(requests, 1))


def median_result(results: Sequence[FioResult]) -> FioResult:
    """Field-by-field median of repeats of one measurement."""
    fields = [f.name for f in dataclasses.fields(FioResult)]
    med = {name: statistics.median(getattr(r, name) for r in results) for name in fields}
    med["io_bytes"] = int(med["io_bytes"])
    return FioResult(**med)


# ---- output ----------------------------------------------------------------------
def fmt_bw(bytes_per_s: float) -> str:
    if bytes_per_s >= 1e9:
        return f"{bytes_per_s / 1e9:.2f} GB/s"
    return f"{bytes_per_s / 1e6:.0f} MB/s"


def fmt_iops(iops: float) -> str:
    return f"{iops / 1000:.1f}k IOPS"


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """A rich table when rich is installed, else aligned plain text."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max([len(c), *(len(r[i]) for r in rows)]) for i, c in enumerate(columns)]
        print(title)
        for line in (columns, *rows):
            print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)))
        return
    table = Table()
    for i, c in enumerate(columns):
        table.add_column(c, justify="left" if i == 0 else "right")
    for r in rows:
        table.add_row(*r)
    console = Console(width=200)
    console.print(title)
    console.print(table)


def write_results(name: str, data: dict[str, Any]) -> str:
    """Write `data` plus host facts to bench/results/NAME.json; returns the path."""
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, f"{name}.json")
    meta = {
        "host": platform.node(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    with open(path, "w") as f:
        json.dump({"meta": meta, **data}, f, indent=2)
        f.write("\n")
    return path
