"""Would a writer process of its own spare reads what admission costs them? Reads with the in-process writer
against reads beside the same writer's work in another process.

Owns the answer to issue 13's "admission must not slow reads that happen at the
same time (the writer competes for the GIL on 2 cores: measure, and move it to
a process of its own if that is what the numbers say)". A fresh mount with an
empty cache over a file warm in the host page cache; fio reads it whole in
1 MiB O_DIRECT reads (psync, 1 job), in these setups, alternated in every
repeat so the machine's noise hits them alike:

- no-cache: `fusecache mount --no-cache` (the issue's baseline);
- default: the default (second-chance) mount, which admits nothing a guest
  reads: the reads with no writer at work;
- inclusive: `--admit inclusive`, every chunk read offered to the daemon's own
  writer thread (it names, checks and copies pages and commits them, yielding
  the GIL to reads: `store_queue.Pacer`; it refuses what it is too far behind
  to take);
- process: the default mount, while a process of its own runs the store's
  writer (`Store.apply` of 1 MiB batches of new pages into a store of its own,
  as fast as it can): what a writer process would take from reads on this
  machine's cores, without the GIL;
- idle process: the same at SCHED_IDLE (it runs only on a core nothing else
  wants).

Each figure is the median over the repeats; ratios are paired (same repeat):
time over no-cache, time over default (admission's cost on the reads), and
how fast each writer committed pages meanwhile (MiB/s: the stand-in's over its
whole run, inclusive's what it had committed when the reads ended over their
time, and the chunks it refused).

    .venv/bin/python -m bench.writer_process [--repeats 9] [--size-mib 256] [--dir /var/tmp]

Prints a table; writes bench/results/writer_process.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from bench.coldpath import Bench
from bench.common import MIB, REPO, assert_nothing_mounted_under, fusecache_stats, print_table, run_fio, warm_page_cache, write_results

SETUPS = ("no-cache", "default", "inclusive", "process", "idle process")  # the process setups mount the default
CHUNK = 64 << 10


def stand_in(cache_dir: str, idle: bool) -> int:
    """The writer in a process of its own: `Store.apply` of 1 MiB batches of new pages until SIGTERM; prints the
    MiB committed and the seconds it ran (JSON) and exits."""
    from fusecache.geometry import PAGE_SIZE
    from fusecache.store import Store
    from fusecache.store.writer import WriteBatch

    if idle:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    stop = False

    def on_term(*_: Any) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    store = Store(cache_dir, 1 << 30)
    base = os.urandom(MIB)
    version = (1, 2, 3, 4)
    store.apply(WriteBatch(files=[(1, 1, version)]))
    print("ready", flush=True)
    batches = 0
    t0 = time.monotonic()
    try:
        while not stop:
            data = bytearray(base)
            for at in range(0, MIB, PAGE_SIZE):
                struct.pack_into("<Q", data, at, batches * MIB + at)  # every page new: nothing deduplicated
            chunk0 = batches * (MIB // CHUNK)
            store.apply(WriteBatch(admit=[(1, 1, chunk0 + i, bytes(data[i * CHUNK : (i + 1) * CHUNK])) for i in range(MIB // CHUNK)]))
            batches += 1
    finally:
        store.close()
    print(json.dumps({"admitted_mib": batches, "seconds": time.monotonic() - t0}), flush=True)
    return 0


@contextlib.contextmanager
def writer_process(work: str, idle: bool) -> Iterator[dict[str, Any]]:
    """A stand-in writer process while the body runs; yields a dict that gets its "admitted_mib" and "seconds" at the end."""
    cache_dir = tempfile.mkdtemp(prefix="writer-", dir=work)
    cmd = [sys.executable, "-m", "bench.writer_process", "--stand-in", cache_dir] + (["--idle"] if idle else [])
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
    out: dict[str, Any] = {}
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise SystemExit(f"the stand-in writer did not start (exit status {proc.wait(30)})")
        yield out
    finally:
        proc.terminate()
        stdout, _ = proc.communicate(timeout=60)
        with contextlib.suppress(ValueError, IndexError):
            out.update(json.loads(stdout.strip().splitlines()[-1]))
        shutil.rmtree(cache_dir, ignore_errors=True)


def run(bench: Bench, setup: str) -> dict[str, Any]:
    """One whole read of `bench`'s file through a fresh mount of `setup` (the process setups: the default mount)."""
    warm_page_cache(bench.image)
    with bench.mount(REPO, "default" if setup.endswith("process") else setup) as mp:
        with writer_process(bench.work, setup == "idle process") if setup.endswith("process") else contextlib.nullcontext({}) as other:
            r = run_fio(os.path.join(mp, os.path.basename(bench.image)), "read", "1M", direct=True, io_size=bench.size)
        stats = fusecache_stats(mp) or {}
    rate = other["admitted_mib"] / other["seconds"] if other.get("seconds") else None
    if setup == "inclusive":  # (committed by the time the reads ended: its rate over the reads)
        rate = (stats.get("store") or {}).get("admitted_chunks", 0) * CHUNK / MIB / r.runtime_s
    return {"seconds": r.runtime_s, "p50_us": r.p50_us, "admitted_mib_s": rate, "skipped_chunks": stats.get("skipped_admissions", 0)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--repeats", type=int, default=9, help="runs per setup, alternated (default 9)")
    p.add_argument("--size-mib", type=int, default=256, help="size of the file read whole (default 256)")
    p.add_argument("--dir", default="/var/tmp", help="where the file, caches and mountpoints go: not tmpfs (default /var/tmp)")
    p.add_argument("--stand-in", metavar="CACHE_DIR", help=argparse.SUPPRESS)
    p.add_argument("--idle", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.stand_in:
        return stand_in(args.stand_in, args.idle)
    work = tempfile.mkdtemp(prefix="fusecache-writer-", dir=args.dir)
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in SETUPS}
    try:
        bench = Bench(work, args.size_mib, 0)  # (bench/coldpath.py's: the file, and a fresh mount with an empty cache)
        for i in range(args.repeats):
            for setup in SETUPS:
                runs[setup].append(run(bench, setup))
            print(f"repeat {i + 1}/{args.repeats}: " + ", ".join(f"{s} {runs[s][-1]['seconds']:.3f} s" for s in SETUPS), file=sys.stderr)
    finally:
        assert_nothing_mounted_under(work)
        shutil.rmtree(work, ignore_errors=True)
    rows, table = [], []
    for setup in SETUPS:
        rs = runs[setup]

        def paired(base: str, rs: list[dict[str, Any]] = rs) -> tuple[float, float, float]:
            ratios = [r["seconds"] / b["seconds"] for r, b in zip(rs, runs[base], strict=True)]
            return statistics.median(ratios), min(ratios), max(ratios)

        nc, de = paired("no-cache"), paired("default")
        admitted = [r["admitted_mib_s"] for r in rs if r["admitted_mib_s"] is not None]
        row = {
            "setup": setup, "seconds": statistics.median(r["seconds"] for r in rs), "p50_us": statistics.median(r["p50_us"] for r in rs),
            "over_no_cache": nc, "over_default": de,
            "admitted_mib_s": statistics.median(admitted) if admitted else None,
            "skipped_chunks": statistics.median(r["skipped_chunks"] for r in rs) if setup == "inclusive" else None,
        }  # fmt: skip
        rows.append(row)
        table.append([
            setup, f"{row['seconds']:.3f}", f"{row['p50_us']:.0f}",
            f"{nc[0]:.2f} ({nc[1]:.2f}-{nc[2]:.2f})", f"{de[0]:.2f} ({de[1]:.2f}-{de[2]:.2f})",
            "" if row["admitted_mib_s"] is None else f"{row['admitted_mib_s']:.0f}"
            + ("" if row["skipped_chunks"] is None else f" ({row['skipped_chunks']:.0f} chunks refused)"),
        ])  # fmt: skip
    print_table(
        f"cold 1 MiB sequential reads of a {args.size_mib} MiB file, median of {args.repeats} (paired ratios: median (min-max))",
        ["setup", "seconds", "p50 µs", "time / no-cache", "time / default", "the writer's MiB/s committed"],
        table,
    )
    print(f"wrote {write_results('writer_process', {'settings': vars(args), 'rows': rows, 'runs': runs})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
