"""Where a cold miss spends its time: py-spy samples of the daemon while fio reads through a default mount.

A fresh default (second-chance) mount with an empty cache dir over a file
warm in the host page cache; fio reads it with psync and O_DIRECT (1 MiB
sequential, or 4 KiB random) while `py-spy record` samples every thread of
the daemon; each sample's innermost frame is sorted into a few places (the
loop waiting in epoll, the loop/thread hand-off, the backing pread, the FUSE
reply, cache.py, fetch.py, admission, store lookups). Worker threads waiting
for a job are sampled too (py-spy cannot tell that wait from work): read the
hand-off row as an upper bound. Run it with another tree's code on
PYTHONPATH to profile that tree (as bench/amplification.py).

A second table (with `perf`, Debian linux-perf) is where the daemon's CPU
goes per MiB of a cold 1 MiB sequential read, `--no-cache` against the
default mount, every thread, kernel included: `perf record` of the daemon
while fio reads the whole file once, its samples sorted into the kernel's
copies (the pread into our buffer, the FUSE reply out of it), the
scheduler (wake-ups, context switches, futexes), the rest of the kernel,
the Python interpreter, and other libraries; the figures are the samples'
CPU time divided by the MiB read (the ratio between two mounts is what
counts: the absolute time moves with the machine). `--baseline REV` adds
that revision's default mount (`git archive`) to the table; each figure is
the median of `--repeats` runs, the setups alternating.

    .venv/bin/python -m bench.miss_profile [--seconds 6] [--size-mib 512] [--repeats 3] [--baseline REV]

Prints the tables; writes bench/results/miss_profile.json.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from bench.amplification import daemon_pid
from bench.common import (
    MIB,
    REPO,
    assert_nothing_mounted_under,
    baseline_tree,
    fusecache_mount,
    make_random_file,
    print_table,
    run_fio,
    warm_page_cache,
    write_results,
)

PLACES = (
    ("loop idle (epoll wait)", ("get_events", "_epoll_wait")),
    ("hand-off (threads, wake-ups)", ("_thread_cache.py", "_wakeup_socketpair.py", "OffLoop._work", "OffLoop.run", "_threads.py",
                                      "_update_registrations", "wait_task_rescheduled")),
    ("backing pread", ("LocalBacking.pread",)),
    ("FUSE reply (pyfuse3)", ("async_wrapper",)),
    ("cache.py", ("/cache.py",)),
    ("fetch.py", ("/fetch.py",)),
    ("admission (policy.py)", ("/policy.py", "/admission.py")),
    ("store lookups", ("/store/", "/store_queue.py", "/files.py")),
)
# perf's symbols, sorted into where the CPU goes (the first match wins; "[k]" marks a kernel symbol)
CPU_PLACES = (
    ("kernel: copies (pread in, FUSE reply out)", ("_copy_to_iter", "__pi_memcpy", "fuse_copy", "copy_page_to_iter", "clear_page", "gup_")),
    ("kernel: scheduler, wake-ups, futexes", ("finish_task_switch", "spin_unlock_irqrestore", "futex", "schedule", "try_to_wake_up")),
    ("kernel: other", ("[k]",)),
    ("Python interpreter", ("python3",)),
)
PATTERNS = {"1M seq": ("read", "1M", 4096 * MIB), "4k random": ("randread", "4k", 64 * MIB)}


def place(frame: str) -> str:
    for name, marks in PLACES:
        if any(m in frame for m in marks):
            return name
    return "other"


def profile(image: str, work: str, n: int, pattern: str, seconds: float) -> dict[str, float]:
    rw, bs, io_size = PATTERNS[pattern]
    warm_page_cache(image)
    out = os.path.join(work, f"profile{n}.txt")
    options = ["--cache-dir", os.path.join(work, f"cache{n}")]
    with fusecache_mount(os.path.dirname(image), os.path.join(work, f"mnt{n}"), options, os.path.join(work, f"daemon{n}.log")) as mp:
        pid = daemon_pid(mp)
        fio = subprocess.Popen(
            ["fio", "--name=p", f"--filename={os.path.join(mp, os.path.basename(image))}", f"--rw={rw}", f"--bs={bs}",
             f"--io_size={io_size}", "--direct=1", "--ioengine=psync", "--readonly", "--invalidate=0", "--output-format=terse"],
            stdout=subprocess.DEVNULL,
        )
        try:
            time.sleep(1)
            spy = shutil.which("py-spy", path=os.path.dirname(sys.executable)) or shutil.which("py-spy") or "py-spy"
            subprocess.run([spy, "record", "-p", str(pid), "-d", str(int(seconds)), "-r", "1000", "-f", "raw", "-o", out, "--nonblocking"],
                           capture_output=True, check=True, timeout=seconds + 60)
        finally:
            fio.terminate()
            fio.wait()
    counts: collections.Counter[str] = collections.Counter()
    with open(out) as f:
        for line in f:
            stack, n_samples = line.rstrip().rsplit(" ", 1)
            counts[place(stack.split(";")[-1])] += int(n_samples)
    total = sum(counts.values()) or 1
    return {name: counts[name] / total for name in [p for p, _ in PLACES] + ["other"]}


def cpu_split(image: str, work: str, n: int, options: list[str], size_mib: int, code: str = REPO) -> dict[str, float] | None:
    """perf-sampled CPU ms per MiB of the daemon (tree `code`'s), by place, while fio reads the whole image once (1 MiB,
    O_DIRECT); None without perf."""
    perf = shutil.which("perf")
    if perf is None:
        return None
    warm_page_cache(image)
    data = os.path.join(work, f"perf{n}.data")
    log_file = os.path.join(work, f"daemon{n}.log")
    with fusecache_mount(os.path.dirname(image), os.path.join(work, f"mnt{n}"), options, log_file, code=code) as mp:
        rec = subprocess.Popen([perf, "record", "-F", "2000", "-p", str(daemon_pid(mp)), "-o", data],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            time.sleep(1)  # perf attached
            run_fio(os.path.join(mp, os.path.basename(image)), "read", "1M", direct=True, io_size=size_mib * MIB)
        finally:
            rec.send_signal(signal.SIGINT)
            rec.wait(timeout=60)
    report = subprocess.run([perf, "report", "-i", data, "--no-children", "-g", "none", "--sort", "dso,sym", "-F", "period,dso,sym",
                             "--stdio"], capture_output=True, text=True, check=True).stdout  # fmt: skip
    ns: collections.Counter[str] = collections.Counter()
    for line in report.splitlines():
        fields = line.split(None, 1)
        if len(fields) < 2 or not fields[0].isdigit():
            continue
        rest = fields[1]
        name = next((pl for pl, marks in CPU_PLACES if any(m in rest for m in marks)), "other libraries")
        ns[name] += int(fields[0])  # cpu-clock: the period is nanoseconds
    return {name: ns[name] / 1e6 / size_mib for name in [pl for pl, _ in CPU_PLACES] + ["other libraries"]}


def _median_split(runs: list[dict[str, float] | None]) -> dict[str, float] | None:
    """Per place, the median over runs (the total row is the median of the runs' totals, in the table)."""
    if not runs or any(r is None for r in runs):
        return None
    out = {name: statistics.median(r[name] for r in runs) for name in runs[0]}  # type: ignore[index]
    out["total"] = statistics.median(sum(r.values()) for r in runs)  # type: ignore[union-attr]
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--seconds", type=float, default=6)
    p.add_argument("--size-mib", type=int, default=512)
    p.add_argument("--name", default="miss_profile")
    p.add_argument("--dir", default="/var/tmp")
    p.add_argument("--repeats", type=int, default=3, help="runs per setup of the CPU split, the median is kept (default 3)")
    p.add_argument("--baseline", default="", help="also the CPU split of this git revision's default mount (e.g. main)")
    args = p.parse_args()
    work = tempfile.mkdtemp(prefix="fusecache-prof-", dir=args.dir)
    shares: dict[str, dict[str, float]] = {}
    try:
        os.makedirs(os.path.join(work, "backing"))
        image = make_random_file(os.path.join(work, "backing", "disk.img"), args.size_mib)
        for n, pattern in enumerate(PATTERNS):
            shares[pattern] = profile(image, work, n, pattern, args.seconds)
        setups = [("--no-cache", ["--no-cache"], REPO), ("default", ["--cache-dir", os.path.join(work, "cache-cpu")], REPO)]
        with contextlib.ExitStack() as stack:
            if args.baseline:
                base = stack.enter_context(baseline_tree(args.baseline, work))
                setups.append((f"default @{args.baseline}", ["--cache-dir", os.path.join(work, "cache-cpu-base")], base))
            runs: dict[str, list[dict[str, float] | None]] = {setup: [] for setup, _, _ in setups}
            for r in range(args.repeats):  # setups alternate within a repeat: noise hits them alike
                for n, (setup, options, code) in enumerate(setups):
                    runs[setup].append(cpu_split(image, work, 10 + len(setups) * r + n, options, args.size_mib, code))
                    if options[0] == "--cache-dir":
                        shutil.rmtree(options[1], ignore_errors=True)  # cold again next time (and it reserves its whole size)
        split = {setup: _median_split(rs) for setup, rs in runs.items()}
    finally:
        assert_nothing_mounted_under(work)
        shutil.rmtree(work, ignore_errors=True)
    names = [pl for pl, _ in PLACES] + ["other"]
    print_table("cold misses, default mount: share of the daemon's py-spy samples (innermost frame)", ["place", *PATTERNS],
                [[name, *(f"{100 * shares[pt][name]:.1f}%" for pt in PATTERNS)] for name in names])
    if any(v is None for v in split.values()):
        print("no perf here (Debian: apt-get install linux-perf): the CPU split is left out")
    else:
        a = split["--no-cache"]
        rows = []
        for name in a:
            vals = [v[name] for v in split.values()]  # type: ignore[index]
            rows.append([name, *(f"{x:.3f}" for x in vals), f"{vals[1] - vals[0]:+.3f}"])
        title = f"cold 1 MiB sequential: daemon CPU ms per MiB read, every thread (perf), {args.size_mib} MiB, median of {args.repeats}"
        print_table(title,
                    ["place", *split, "default - no-cache"], rows)  # fmt: skip
    print(f"wrote {write_results(args.name, {'settings': vars(args), 'shares': shares, 'cpu_ms_per_mib': split})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
