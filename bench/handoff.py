"""The hand-off between the trio loop and the threads that do backing I/O: what one call costs, by mechanism.

Every backing call runs in a worker thread (`OffLoop`); a cache miss pays at
least one round trip loop -> thread -> loop. Measured here, in one run, for a
4 KiB `os.pread` of a file warm in the page cache and for a call that does
nothing, one call at a time (the latency a lone miss pays) and 8 tasks at once:

- inline: the call on the loop itself (the floor; not allowed for a backing);
- to_thread: `trio.to_thread.run_sync` with a CapacityLimiter (OffLoop today);
- pool: persistent threads fed by a `queue.SimpleQueue`, each result handed
  back with `TrioToken.run_sync_soon` rescheduling the waiting task (no
  limiter, no per-call thread-cache bookkeeping);
- batch of 8 / batch of 32: one to_thread hop that makes that many calls (the
  background runners of fusecache/fetch.py do this), per call.

    .venv/bin/python -m bench.handoff [--calls 20000] [--repeats 3]

Prints a table (µs per call, median of repeats, and the ratio to to_thread);
writes bench/results/handoff.json.
"""

from __future__ import annotations

import argparse
import os
import queue
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import outcome
import trio

from bench.common import print_table, write_results


class ThreadPool:
    """Persistent worker threads; a call's result wakes its task through the trio token."""

    def __init__(self, threads: int) -> None:
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._token = trio.lowlevel.current_trio_token()
        self._threads = [threading.Thread(target=self._work, daemon=True) for _ in range(threads)]
        for t in self._threads:
            t.start()

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            task, fn, args = job
            self._token.run_sync_soon(trio.lowlevel.reschedule, task, outcome.capture(fn, *args))

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        task = trio.lowlevel.current_task()
        self._jobs.put((task, fn, args))
        return await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)

    def close(self) -> None:
        for _ in self._threads:
            self._jobs.put(None)


async def measure(mechanism: str, fn: Callable[[], Any], calls: int, tasks: int) -> float:
    """Seconds per call with `tasks` tasks each making calls/tasks calls through `mechanism`."""
    limiter = trio.CapacityLimiter(32)
    pool = ThreadPool(8) if mechanism == "pool" else None
    batch = {"batch of 8": 8, "batch of 32": 32}.get(mechanism, 1)

    def many(n: int) -> None:
        for _ in range(n):
            fn()

    async def worker(n: int) -> None:
        if mechanism == "inline":
            for _ in range(n):
                fn()
                await trio.lowlevel.checkpoint()
        elif mechanism == "to_thread":
            for _ in range(n):
                await trio.to_thread.run_sync(fn, limiter=limiter)
        elif pool is not None:
            for _ in range(n):
                await pool.run(fn)
        else:
            for _ in range(n // batch):
                await trio.to_thread.run_sync(many, batch, limiter=limiter)

    try:
        t0 = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(tasks):
                nursery.start_soon(worker, calls // tasks)
        return (time.perf_counter() - t0) / calls
    finally:
        if pool is not None:
            pool.close()


MECHANISMS = ("inline", "to_thread", "pool", "batch of 8", "batch of 32")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--calls", type=int, default=20000)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    with tempfile.NamedTemporaryFile(dir="/var/tmp") as tmp:
        tmp.write(os.urandom(64 << 20))
        tmp.flush()
        fd = tmp.fileno()
        offsets = iter(range(0, 1 << 62, 4096))

        def pread4k() -> bytes:
            return os.pread(fd, 4096, next(offsets) % (64 << 20))

        def nothing() -> None:
            return None

        results: dict[str, dict[str, list[float]]] = {}
        for _ in range(args.repeats):
            for fname, fn in (("pread 4 KiB", pread4k), ("nothing", nothing)):
                for tasks in (1, 8):
                    for m in MECHANISMS:
                        key = f"{fname}, {tasks} task{'s' if tasks > 1 else ''}"
                        results.setdefault(key, {}).setdefault(m, []).append(trio.run(measure, m, fn, args.calls, tasks))
    rows = []
    table = []
    for key, by in results.items():
        med = {m: statistics.median(v) * 1e6 for m, v in by.items()}
        rows.append({"case": key, "us_per_call": med, "over_to_thread": {m: med[m] / med["to_thread"] for m in med}})
        table.append([key, *(f"{med[m]:.1f} ({med[m] / med['to_thread']:.2f})" for m in MECHANISMS)])
    print_table(f"µs per call (ratio to to_thread), median of {args.repeats}, {args.calls} calls each", ["case", *MECHANISMS], table)
    print(f"wrote {write_results('handoff', {'settings': vars(args), 'rows': rows})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
