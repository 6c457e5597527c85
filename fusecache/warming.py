"""Warming: reading images into the cache before a guest needs them, as background jobs of the daemon.

`fusecache warm` starts a job over the control socket (`warm`), polls it
(`warm-status`) and cancels it on Ctrl-C (`warm-cancel`); `top` shows the
jobs. A job reads its images' chunks in order, WARM_READ at a time: chunks
already cached (held by the store, or queued for it) are skipped; the rest
come from a peer whose summary says it holds them, else from the backing,
and are admitted under the never-stale rules of `Files` (a chunk read while
its file was written or regenerated is not admitted). A job is background
work: one fetch in flight, a byte rate limit on what it fetches (a quarter of
it while guests are reading), and it waits for the store's writer to catch up
instead of filling its queue, so the guests' own admissions are not refused
because of it. What a cancelled job
admitted stays cached. Finished jobs are kept a while for the last poll.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import stat
import time
from typing import Any

import trio

from fusecache.backing import OffLoop
from fusecache.errors import CommandError
from fusecache.files import Files, Snapshot
from fusecache.options import WARM_RATE
from fusecache.peer_reads import PeerReads
from fusecache.stats import WarmProgress
from fusecache.store_queue import StoreQueue
from fusecache.version import UNKNOWN

log = logging.getLogger(__name__)

WARM_READ = 1 << 20  # bytes fetched per step
QUEUE_ROOM = 32 << 20  # a job waits while more than this is admitted and not yet committed
PEER_WAIT = 0.5  # seconds a job waits for peers before reading the backing (no guest is waiting)
# While guests read (a guest request since the job's last step), a job fetches at this share of its rate:
# background priority. bench/warm.py measures what guests' reads cost with and without it.
BUSY_SHARE = 0.25
KEEP_FINISHED = 600.0  # seconds a finished job stays visible
MAX_FINISHED = 16


@dataclasses.dataclass
class _Job:
    progress: WarmProgress
    ranges: list[tuple[str, int, int | None]]  # image, offset, length (None: to the end)
    scope: trio.CancelScope = dataclasses.field(default_factory=trio.CancelScope)
    ended: trio.Event = dataclasses.field(default_factory=trio.Event)
    started: float = dataclasses.field(default_factory=time.monotonic)
    finished: float | None = None
    next_at: float = 0.0  # time.monotonic() before which the next fetch may not start (the pacing)
    guest_reads: int = -1  # the guests' read count at the last step


class Warmer:
    """The warm jobs of one mount; `run` is their nursery (started by `assemble`)."""

    def __init__(self, backing: OffLoop, files: Files, queue: StoreQueue, peer_reads: PeerReads | None) -> None:
        self.backing = backing
        self.files = files
        self.queue = queue
        self.peer_reads = peer_reads
        self._jobs: dict[int, _Job] = {}
        self._next_id = 1
        self._nursery: trio.Nursery | None = None

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def handlers(self) -> dict[str, Any]:
        return {"warm": self.start, "warm-status": self.status, "warm-cancel": self.cancel}

    def progress(self) -> list[WarmProgress]:
        """Every job still kept, oldest first, with its elapsed time brought up to now."""
        self._forget_old()
        out = []
        for job in self._jobs.values():
            p = dataclasses.replace(job.progress)
            p.elapsed = (job.finished or time.monotonic()) - job.started
            out.append(p)
        return out

    # ---- the verbs ---------------------------------------------------------------
    async def start(self, request: dict[str, Any]) -> dict[str, Any]:
        images, offset, length, rate = request.get("images"), request.get("offset", 0), request.get("length"), request.get("rate")
        if not isinstance(images, list) or not images or not all(isinstance(i, str) for i in images):
            raise CommandError("warm needs images: a list of paths in the mount")
        if not isinstance(offset, int) or offset < 0 or not (length is None or (isinstance(length, int) and length >= 0)):
            raise CommandError("warm takes offset >= 0 and length >= 0 (or none: to the end)")
        if rate is None:
            rate = WARM_RATE
        if not isinstance(rate, int) or rate < 0:
            raise CommandError("warm takes rate: bytes per second, 0 for no limit")
        if self._nursery is None:
            raise CommandError("the mount is not ready to warm yet: try again")
        total = 0
        for path in images:
            try:
                attr = await self.backing.lstat(path)
            except OSError as exc:
                raise CommandError(f"no image {path} in this mount ({exc.strerror}): give a path under the mount point")
            if not stat.S_ISREG(attr.mode):
                raise CommandError(f"{path} is not a regular file: give an image file")
            end = attr.size if length is None else min(attr.size, offset + length)
            total += max(0, end - offset)
        job = _Job(
            WarmProgress(id=self._next_id, images=list(images), total_bytes=total, rate_limit=rate, started=time.time()),
            [(path, offset, length) for path in images],
        )
        self._next_id += 1
        self._jobs[job.progress.id] = job
        self._nursery.start_soon(self._warm, job)
        log.info("warm %d: %s (%d bytes, rate %s)", job.progress.id, ", ".join(images), total, rate or "unlimited")
        return {"id": job.progress.id}

    def _job(self, request: dict[str, Any]) -> _Job:
        job = self._jobs.get(request.get("id"))  # type: ignore[arg-type]
        if job is None:
            raise CommandError(f"no warm job {request.get('id')!r} on this mount (finished jobs are kept {KEEP_FINISHED:.0f} s)")
        return job

    async def status(self, request: dict[str, Any]) -> dict[str, Any]:
        job = self._job(request)
        p = dataclasses.replace(job.progress)
        p.elapsed = (job.finished or time.monotonic()) - job.started
        return dataclasses.asdict(p)

    async def cancel(self, request: dict[str, Any]) -> dict[str, Any]:
        """Stop a job; what it admitted stays. Answers once it has stopped."""
        job = self._job(request)
        job.scope.cancel()
        await job.ended.wait()
        return await self.status(request)

    # ---- the work ----------------------------------------------------------------
    def _forget_old(self) -> None:
        now = time.monotonic()
        finished = [j for j in self._jobs.values() if j.finished is not None]
        for n, job in enumerate(finished):
            if now - job.finished > KEEP_FINISHED or len(finished) - n > MAX_FINISHED:  # type: ignore[operator]
                del self._jobs[job.progress.id]

    async def _warm(self, job: _Job) -> None:
        p = job.progress
        try:
            with job.scope:
                for path, offset, length in job.ranges:
                    p.current = path
                    await self._warm_image(job, path, offset, length)
                p.state = "done"
            if job.scope.cancelled_caught:
                p.state = "cancelled"
        except OSError as exc:
            p.state, p.error = "failed", f"{p.current}: {exc.strerror}"
        except Exception as exc:
            log.exception("warm %d failed", p.id)
            p.state, p.error = "failed", f"{type(exc).__name__} inside the daemon: see its log"
        finally:
            job.finished = time.monotonic()
            job.ended.set()
            log.info("warm %d %s: %d of %d bytes, %d already cached, %d from peers, %d from the backing",
                     p.id, p.state, p.done_bytes, p.total_bytes, p.cached_bytes, p.peer_bytes, p.backing_bytes)  # fmt: skip

    async def _warm_image(self, job: _Job, path: str, offset: int, length: int | None) -> None:
        files, queue, store = self.files, self.queue, self.files.store
        handle = await self.backing.open(path, os.O_RDONLY)
        try:
            attr = await self.backing.fstat(handle)
            st = files.opened(path, attr)
            cs = files.chunk_size
            end = attr.size if length is None else min(attr.size, offset + length)
            if end <= offset:
                return
            step = max(1, WARM_READ // cs)
            last = (end - 1) // cs
            for c0 in range(offset // cs, last + 1, step):
                c1 = min(c0 + step - 1, last)
                lo, hi = max(c0 * cs, offset), min((c1 + 1) * cs, end)
                gen = st.gen
                held = store.held_chunks(st.ino, gen, c0, c1)
                need = []
                for c in range(c0, c1 + 1):
                    key = (st.ino, gen, c)
                    if queue.is_dropped(key) or (c not in held and queue.pending(key) is None):
                        need.append(c)
                if need:
                    fetched = await self._fetch(job, path, handle, st, need)
                    job.progress.cached_bytes += max(0, hi - lo - sum(_overlap(c, cs, lo, hi) for c in need))
                else:
                    fetched = 0
                    job.progress.cached_bytes += hi - lo
                job.progress.done_bytes += hi - lo
                await self._pace(job, fetched)
        finally:
            with trio.CancelScope(shield=True):
                await self.backing.close(handle)

    async def _fetch(self, job: _Job, path: str, handle: object, st: Any, need: list[int]) -> int:
        """Fetch and admit the chunks `need` of one step; returns the bytes fetched."""
        files, queue, cs = self.files, self.queue, self.files.chunk_size
        while queue.pending_admit_bytes > QUEUE_ROOM:  # the writer is behind: leave the room to guests' admissions
            await trio.sleep(0.01)
        snap = Snapshot(st.gen, st.epoch, st.writing == 0)
        got: dict[int, bytes] = {}
        from_peers = 0
        if self.peer_reads is not None and st.version is not None and st.version != UNKNOWN:
            ask = [c for c in need if self.peer_reads.holds((st.ino, snap.gen, c))]
            if ask:
                got = await self.peer_reads.fetch(st.ino, st.version, ask, timeout=PEER_WAIT)
                from_peers = sum(len(d) for d in got.values())
        rest = [c for c in need if c not in got]
        from_backing = 0
        for run in _runs(rest):
            data = await self.backing.run(files.backing.sync.pread, handle, run[0] * cs, len(run) * cs)
            from_backing += len(data)
            for i, c in enumerate(run):
                piece = data[i * cs : (i + 1) * cs]
                if piece:
                    got[c] = piece
        job.progress.peer_bytes += from_peers
        job.progress.backing_bytes += from_backing
        for c in sorted(got):
            key = (st.ino, snap.gen, c)
            while snap.still_current(st) and not files.admit(key, got[c], path):
                await trio.sleep(0.01)  # the writer is too far behind: wait rather than skip
        return from_peers + from_backing

    async def _pace(self, job: _Job, fetched: int) -> None:
        """Keep the bytes fetched under the job's rate, a quarter of it while guests read; yield to the loop either way."""
        reads = sum(c.reads for c in self.files.images.values())
        busy = job.guest_reads >= 0 and reads != job.guest_reads
        job.guest_reads = reads
        rate = job.progress.rate_limit * (BUSY_SHARE if busy else 1.0)
        now = time.monotonic()
        if rate and fetched:
            job.next_at = max(job.next_at, now) + fetched / rate
        if job.next_at > now:
            await trio.sleep(job.next_at - now)
        else:
            await trio.sleep(0)


def _overlap(c: int, cs: int, lo: int, hi: int) -> int:
    return max(0, min((c + 1) * cs, hi) - max(c * cs, lo))


def _runs(chunks: list[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    for c in chunks:
        if runs and runs[-1][-1] + 1 == c:
            runs[-1].append(c)
        else:
            runs.append([c])
    return runs
