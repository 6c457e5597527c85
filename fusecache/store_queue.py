"""The queue of changes to the store, and the one writer task that applies them.

Everything that changes the store goes through here, in order: file records
(generation, version), forgotten files, pins, dropped chunks and admitted chunks.
Until the writer has committed them, what is queued is visible to readers
from here: an admitted chunk is served from `pending`, a dropped chunk is a
miss (`is_dropped`). The writer applies the queue in batches, one worker
thread at a time (the store's single writer); a batch is the releases queued
before the next admissions, then those admissions, so queue order holds (an
admission followed by the drop of the same chunk ends dropped). Admissions
are refused, not waited for, when the writer is too far behind: reads never
wait for the writer.

A batch that fails to commit is a fault (`Health`); its files get new
generations (`on_failed`, set by `Files`) before its dropped marks are
cleared, so nothing it meant to drop is served again. While the cache is
degraded nothing is applied (the store is rebuilt empty before it serves
again); `rebuild` replaces the store with an empty one, under the writer's
lock, and `watch` does so by itself some time after the cache degraded.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import trio

from fusecache import health
from fusecache.health import Health
from fusecache.store import Store, WriteBatch
from fusecache.version import Version

log = logging.getLogger(__name__)

Key = tuple[int, int, int]  # (ino, generation, chunk)

MAX_PENDING_ADMIT_BYTES = 128 << 20  # past this, misses are served but not admitted
READS_ACTIVE = 0.002  # seconds: reads this recent mean guests are reading now (the writer yields the GIL to them)
YIELD = 0.0002  # seconds the writer thread sleeps at least, GIL released, between stretches of work while reads are active
# While reads are active the writer works at most this share of the time: after a stretch of t seconds it sleeps
# t * (1 - DUTY) / DUTY (YIELD at least, YIELD_MAX at most). A cold 1 MiB stream on `--admit inclusive`, time /
# `--no-cache`, two bench/coldpath.py runs of 7 and 11 alternated repeats: a fixed YIELD 1.33x and 1.25x, DUTY 0.25
# 1.10x and 1.10x, 0.1 1.26x and 1.07x (the writer's thread CPU during a ~1 s read of 1 GiB: 0.10-0.11 s with the fixed
# YIELD, 0.05 s at 0.25). At 0.01 (a writer all but idle while reads run) inclusive still read 1.16x the default
# mount's time (0.25: 1.24x in that run): what is left of admission's cost is not the writer's share (issue 13)
DUTY = 0.25
YIELD_MAX = 0.02
MAX_BATCH_ADMITS = 1024
RETRY_AFTER = 1.0  # seconds the writer waits after a failed batch: a failing store is not hammered


class Pacer:
    """Keeps the writer thread from delaying the reads that happen while it works (issue 13).

    The writer's work is mostly Python holding the GIL (naming pages: ~2-3 µs
    of keyed BLAKE3 each, and the GIL is held through it; the index
    bookkeeping around the slab write), and it takes a core's time from the
    reads on a small host. So while reads are active the writer works in
    short stretches (one chunk named, one slice admitted) and sleeps between
    them, GIL released, for as long as keeps its share of the time at `DUTY`:
    a stretch that took t seconds (of work, or of waiting for the GIL the
    loop held) is followed by t * (1 - DUTY) / DUTY of sleep. Admission goes
    on at a part of its speed, full speed once reads pause. Reads count as
    active when `reads()` (a count the read path keeps anyway) moved within
    the last `READS_ACTIVE` seconds. `begin` marks the start of a batch (the
    writer waited for work before it: no stretch). Called in the writer
    thread only.
    """

    def __init__(self, reads: Callable[[], int] | None = None) -> None:
        self.reads = reads  # None: nothing to yield to
        self.yields = 0
        self._seen = 0
        self._moved = 0.0
        self._resumed = 0.0  # when the stretch of work now running began

    def begin(self) -> None:
        """A batch starts: its first stretch starts now."""
        self._resumed = time.monotonic()

    def __call__(self) -> None:
        if self.reads is None:
            return
        n = self.reads()
        now = time.monotonic()
        if n != self._seen:
            self._seen = n
            self._moved = now
        if now - self._moved < READS_ACTIVE:
            self.yields += 1
            stretch = now - self._resumed
            time.sleep(min(YIELD_MAX, max(YIELD, stretch * (1 - DUTY) / DUTY)))
            now = time.monotonic()
        self._resumed = now


class StoreQueue:
    """Queued changes to `store`, visible before commit, applied in order by `run`.

    on_committed(n) is called after each batch that admitted n chunks (the peer
    server's summary has aged); peer_holds (page digest -> bool) is passed to
    every `Store.apply` so eviction prefers pages a peer also holds.
    """

    def __init__(
        self,
        store: Store,
        *,
        on_committed: Callable[[int], None] | None = None,
        peer_holds: Callable[[bytes], bool] | None = None,
        health: Health | None = None,
    ) -> None:
        self.store = store
        self.health = health if health is not None else Health()
        self.on_failed: Callable[[WriteBatch], None] | None = None  # a batch did not commit (Files fails closed)
        self.on_rebuilt: Callable[[], None] | None = None  # the store is empty and new (Files records its files again)
        self._rebuilds = 0  # a batch taken before a rebuild is not applied after it
        self._on_committed = on_committed
        self._peer_holds = peer_holds
        self._queue: list[tuple[int, str, object]] = []  # (seq, kind, item); seq orders drops against admissions
        self._seq = 0
        self._committed = 0
        self._pending_admit_bytes = 0
        self._pending: dict[Key, bytes] = {}  # admitted, not yet committed: served from here
        self._dropped: dict[Key, int] = {}  # dropped, not yet committed: a miss; key -> seq of the drop
        self._wakeup = trio.Event()
        self._writer_limiter = trio.CapacityLimiter(1)
        self.skipped_admissions = 0
        self.pacer = Pacer()  # the read path gives it its count of reads (`Cache`)

    # ---- what readers see before the writer commits ------------------------
    @property
    def settled(self) -> bool:
        """Nothing admitted or dropped is waiting: the store alone answers every read."""
        return not self._pending and not self._dropped

    def pending(self, key: Key) -> bytes | None:
        return self._pending.get(key)

    def is_dropped(self, key: Key) -> bool:
        return key in self._dropped

    def any_pending(self, ino: int, gen: int, first: int, last: int) -> bool:
        """Whether any of chunks first..last of (ino, gen) is admitted and not yet committed (served from `pending`)."""
        pending = self._pending
        return bool(pending) and any((ino, gen, c) in pending for c in range(first, last + 1))

    @property
    def queued(self) -> int:
        """Changes queued or being applied: not yet committed."""
        return self._seq - self._committed

    def has_room(self, size: int) -> bool:
        """Whether a chunk of `size` bytes admitted now would be taken: the one bound `admit_many` applies (not past
        MAX_PENDING_ADMIT_BYTES pending), asked by the cache too before it builds an offer (`Fetcher.room`)."""
        return self._pending_admit_bytes + size <= MAX_PENDING_ADMIT_BYTES

    @property
    def pending_admit_bytes(self) -> int:
        """Bytes admitted and not yet committed (admissions are refused past MAX_PENDING_ADMIT_BYTES)."""
        return self._pending_admit_bytes

    @property
    def empty(self) -> bool:
        return not self._queue

    # ---- queueing ------------------------------------------------------------
    def record_file(self, ino: int, gen: int, version: Version) -> None:
        self._enqueue("file", (ino, gen, version))

    def forget_file(self, ino: int) -> None:
        self._enqueue("forget", ino)

    def set_pins(self, pins: dict[int, str]) -> None:
        """Replace the pinned inodes (ino -> image path): applied in queue order, persisted by the store."""
        self._enqueue("pins", dict(pins))

    def drop(self, key: Key) -> None:
        self._dropped[key] = self._enqueue("drop", key)

    def admit(self, key: Key, data: bytes, owner: str | None = None) -> bool:
        """Queue one chunk for the store, charged to `owner`'s share (None: the host); False when the writer is too far behind."""
        return self.admit_many([(key, data)], owner) == 1

    def admit_many(self, chunks: list[tuple[Key, bytes]], owner: str | None = None) -> int:
        """Queue chunks, (key, bytes) each, in order, charged to `owner`'s share: how many were taken, the first n
        (past MAX_PENDING_ADMIT_BYTES pending, the writer is too far behind: the rest are refused and counted)."""
        n = 0
        for key, data in chunks:
            if not self.has_room(len(data)):
                break
            self._pending_admit_bytes += len(data)
            self._pending[key] = data
            self._enqueue("admit", ((*key, data), owner))
            n += 1
        self.skipped_admissions += len(chunks) - n
        return n

    def _enqueue(self, kind: str, item: object) -> int:
        self._seq += 1
        self._queue.append((self._seq, kind, item))
        self._wakeup.set()
        return self._seq

    # ---- the writer ----------------------------------------------------------
    def _take_batch(self) -> tuple[WriteBatch, int]:
        """The next batch: releases, then admissions, never a release queued after an admission.

        The store applies a batch's releases before its admissions; cutting the
        batch there keeps queue order.
        """
        batch = WriteBatch()
        admits = 0
        taken = 0
        last = self._committed
        for seq, kind, item in self._queue:
            if kind == "admit":
                if admits >= MAX_BATCH_ADMITS:
                    break
                admits += 1
                chunk, owner = item  # type: ignore[misc]
                batch.admit.append(chunk)
                if owner is not None:
                    batch.owners[chunk[:3]] = owner
            elif admits:
                break
            elif kind == "drop":
                batch.drop.append(item)  # type: ignore[arg-type]
            elif kind == "file":
                batch.files.append(item)  # type: ignore[arg-type]
            elif kind == "pins":
                batch.pins = item  # type: ignore[assignment]
            else:
                batch.forget_files.append(item)  # type: ignore[arg-type]
            taken += 1
            last = seq
        del self._queue[:taken]
        return batch, last

    async def run(self) -> None:
        """The writer task: applies queued changes until cancelled."""
        while True:
            await self._wakeup.wait()
            self._wakeup = trio.Event()
            if not await self.drain():
                await trio.sleep(RETRY_AFTER)
                self._wakeup.set()

    async def drain(self) -> bool:
        """Apply everything queued now, one batch at a time, in the writer thread; False when a batch failed
        (what is queued after it waits for the next call)."""
        while self._queue:
            batch, last = self._take_batch()
            rebuilds = self._rebuilds
            if self.health.caching:
                try:
                    await trio.to_thread.run_sync(self._apply, batch, rebuilds, limiter=self._writer_limiter)
                except Exception as exc:
                    if self.on_failed is not None:
                        self.on_failed(batch)  # before the dropped marks below are cleared
                    what = "the batch is lost: its chunks are not cached, its files get new generations"
                    self.health.fault(health.layer_of(exc, "store.apply"), exc, what)
                    self._settle(batch, last, rebuilds)
                    return False
                self.health.store_ok()
                self._settle(batch, last, rebuilds, committed=True)
            else:  # degraded: nothing is applied; the store is rebuilt empty before it serves again
                self.store.taint()  # and if it is not (unmounted first), the next mount starts it empty
                self._settle(batch, last, rebuilds)
        return True

    def _settle(self, batch: WriteBatch, last: int, rebuilds: int, committed: bool = False) -> None:
        """A batch is done with (committed, failed or discarded): what it held is no longer pending or dropped here."""
        if rebuilds != self._rebuilds:
            return  # the rebuild cleared everything this batch held
        for ino, gen, chunk, data in batch.admit:
            self._pending_admit_bytes -= len(data)
            if self._pending.get((ino, gen, chunk)) is data:
                del self._pending[(ino, gen, chunk)]
        self._committed = last
        if self._dropped:
            self._dropped = {k: s for k, s in self._dropped.items() if s > last}
        if committed and batch.admit and self._on_committed is not None:
            self._on_committed(len(batch.admit))

    def _apply(self, batch: WriteBatch, rebuilds: int) -> None:
        if rebuilds != self._rebuilds:
            return  # taken before the store was rebuilt: what it admits may be stale, what it drops is gone
        if health.faults:
            health.inject("store.apply")
        batch.peer_holds = self._peer_holds
        batch.pace = self.pacer
        self.pacer.begin()
        self.store.apply(batch)

    # ---- rebuilding ------------------------------------------------------------
    async def rebuild(self) -> None:
        """Replace the store with an empty one (passthrough meanwhile); the state says how it went."""
        self.health.rebuilding()
        async with self._writer_limiter:  # no batch is being applied
            self._rebuilds += 1
            self._queue.clear()
            self._pending.clear()
            self._dropped.clear()
            self._pending_admit_bytes = 0
            self._committed = self._seq
            try:
                self.store.close_files()  # on the loop: no store read runs meanwhile; later ones fail, and are faults
                fresh = await trio.to_thread.run_sync(self.store.open_empty)
            except Exception as exc:
                self.health.rebuild_failed(exc)
                return
            self.store.replace_files(fresh)  # on the loop: no store read runs meanwhile
        if self.on_rebuilt is not None:
            self.on_rebuilt()
        self.health.rebuilt()

    async def watch(self, every: float = 1.0) -> None:
        """Rebuild the store some time after the cache degraded (`Health.rebuild_delay`, growing while rebuilds fail)."""
        while True:
            await trio.sleep(every)
            h = self.health
            if h.state == health.DEGRADED and time.time() - h.since >= h.rebuild_delay:
                await self.rebuild()

    async def close(self) -> None:
        """Apply what is queued (even when cancelled: the store is closed after this)."""
        with trio.CancelScope(shield=True):
            while not await self.drain() and self.health.caching:
                pass  # a failing store degrades after a few tries; then what is left is discarded
