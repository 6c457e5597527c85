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
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from fusecache.store import Store, WriteBatch
from fusecache.version import Version

log = logging.getLogger(__name__)

Key = tuple[int, int, int]  # (ino, generation, chunk)

MAX_PENDING_ADMIT_BYTES = 128 << 20  # past this, misses are served but not admitted
MAX_BATCH_ADMITS = 1024


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
    ) -> None:
        self.store = store
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

    # ---- what readers see before the writer commits ------------------------
    @property
    def settled(self) -> bool:
        """Nothing admitted or dropped is waiting: the store alone answers every read."""
        return not self._pending and not self._dropped

    def pending(self, key: Key) -> bytes | None:
        return self._pending.get(key)

    def is_dropped(self, key: Key) -> bool:
        return key in self._dropped

    @property
    def queued(self) -> int:
        """Changes queued or being applied: not yet committed."""
        return self._seq - self._committed

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
        if self._pending_admit_bytes + len(data) > MAX_PENDING_ADMIT_BYTES:
            self.skipped_admissions += 1
            return False
        self._pending_admit_bytes += len(data)
        self._pending[key] = data
        self._enqueue("admit", ((*key, data), owner))
        return True

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
            await self.drain()

    async def drain(self) -> None:
        """Apply everything queued now, one batch at a time, in the writer thread."""
        while self._queue:
            batch, last = self._take_batch()
            try:
                await trio.to_thread.run_sync(self._apply, batch, limiter=self._writer_limiter)
            except Exception:
                log.exception("the cache store failed to apply a batch: those chunks are not cached")
            for ino, gen, chunk, data in batch.admit:
                self._pending_admit_bytes -= len(data)
                if self._pending.get((ino, gen, chunk)) is data:
                    del self._pending[(ino, gen, chunk)]
            self._committed = last
            if self._dropped:
                self._dropped = {k: s for k, s in self._dropped.items() if s > last}
            if batch.admit and self._on_committed is not None:
                self._on_committed(len(batch.admit))

    def _apply(self, batch: WriteBatch) -> None:
        batch.peer_holds = self._peer_holds
        self.store.apply(batch)

    async def close(self) -> None:
        """Apply what is queued (even when cancelled: the store is closed after this)."""
        with trio.CancelScope(shield=True):
            await self.drain()
