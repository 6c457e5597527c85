"""`fusecache warm`: start a warm job in a mount's daemon and follow it to the end.

The daemon does the work (`warming.py`); this command starts the job, polls
its progress over the control socket and shows it: a rich progress bar
(bytes, rate, ETA) on a terminal, one summary line otherwise, one JSON object
with --json. Ctrl-C (or SIGTERM) cancels the job in the daemon through
`warm-cancel`, keeps what it admitted, prints the summary and exits 130.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from typing import Any

from fusecache import control
from fusecache.stats import WarmProgress, from_json
from fusecache.top import human

POLL = 0.25  # seconds between polls of the job's progress


def summary(p: WarmProgress) -> str:
    rate = (p.peer_bytes + p.backing_bytes) / p.elapsed if p.elapsed > 0 else 0.0
    state = {"done": "warmed", "cancelled": "cancelled: warmed", "failed": "failed: warmed", "running": "warming"}.get(p.state, p.state)
    line = (
        f"{state} {human(p.done_bytes)} of {human(p.total_bytes)} of {', '.join(p.images)} in {p.elapsed:.1f} s: "
        f"{human(p.cached_bytes)} already cached, {human(p.peer_bytes)} from peers, {human(p.backing_bytes)} from the backing "
        f"({human(rate)}/s)"
    )
    return line + (f"; {p.error}" if p.error else "")


def main(mountpoint: str, images: list[str], offset: int, length: int | None, rate: int | None, as_json: bool) -> int:
    args: dict[str, Any] = {"images": images, "offset": offset, "length": length}
    if rate is not None:
        args["rate"] = rate
    # SIGTERM leaves like Ctrl-C does: the job is cancelled, not left running unseen
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        job = control.request(mountpoint, "warm", **args)["id"]
        try:
            p = _follow_bar(mountpoint, job) if sys.stdout.isatty() and not as_json else _follow(mountpoint, job)
        except KeyboardInterrupt:
            p = from_json(WarmProgress, control.request(mountpoint, "warm-cancel", timeout=60, id=job))
    finally:
        signal.signal(signal.SIGTERM, previous)
    if as_json:
        print(json.dumps(_asdict(p), sort_keys=True))
    else:
        print(summary(p), file=sys.stdout if p.state in ("done", "cancelled") else sys.stderr)
    return {"done": 0, "cancelled": 130}.get(p.state, 1)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _asdict(p: WarmProgress) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(p)


def _status(mountpoint: str, job: int) -> WarmProgress:
    return from_json(WarmProgress, control.request(mountpoint, "warm-status", id=job))


def _follow(mountpoint: str, job: int) -> WarmProgress:
    while True:
        p = _status(mountpoint, job)
        if p.state != "running":
            return p
        time.sleep(POLL)


def _follow_bar(mountpoint: str, job: int) -> WarmProgress:
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[detail]}", style="dim"),
        transient=True,
    ) as bar:
        p = _status(mountpoint, job)
        task = bar.add_task("warm", total=p.total_bytes or None, detail="")
        while True:
            name = p.current.rsplit("/", 1)[-1] or "warm"
            detail = f"cached {human(p.cached_bytes)} · peers {human(p.peer_bytes)} · backing {human(p.backing_bytes)}"
            bar.update(task, completed=p.done_bytes, description=name, detail=detail)
            if p.state != "running":
                return p
            time.sleep(POLL)
            p = _status(mountpoint, job)
