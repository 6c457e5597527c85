"""Per-file state and the never-stale rules: which cached chunks of a file are still its content.

For every file the cache has seen: its *generation* (one version of its
content; location keys carry it), the backing's version last seen, a write
*epoch* and the writes in flight. The rules, in one place:
- At open, every `revalidate` seconds and whenever the kernel asks for a known
  file's attributes, the backing's version (size, mtime, ctime, NFS change)
  is compared with the one recorded; if another host
  changed it, the generation is bumped in memory at once, so no old chunk is
  found again. Truncate and unlink bump it too.
- A write goes to the backing first; the chunks it touched are then dropped
  (queued, and a miss until committed) before the write returns; an
  extending write also drops the old end-of-file chunk.
- The backing's version after our write is adopted as ours only if its
  version just before the write (fstat, pwrite, fstat in one worker call)
  was one we knew: the recorded one, or one our own overlapping writes left.
  Otherwise another host changed the file since the last check: a new
  generation, as at a revalidation. A write is thus a check too.
- A chunk read from the backing is admitted only if no write to that file
  started or ended while it was read (the epoch) and the generation is
  unchanged (`Snapshot.still_current`, `admit_current`).
- Fail closed: when the cache cannot keep these rules (a failed batch of
  drops or records, a fault in a write's bookkeeping), the files concerned
  get a new generation in memory before the write returns, and the store is
  tainted so a restart starts it empty (`fail_closed`, `batch_failed`).
`Files` is also what admission admits through (`admit_current`,
`read_for_admission`): admission never sees the read path.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections import defaultdict
from typing import NamedTuple

import trio

from fusecache import health
from fusecache.backing import Attr, OffLoop
from fusecache.stats import ImageCounters
from fusecache.store import Store, WriteBatch
from fusecache.store_queue import Key, StoreQueue
from fusecache.version import UNKNOWN, Version

log = logging.getLogger(__name__)

# Versions remembered from overlapping writes of ours: past this, a write that finds another
# is taken as another host's change (a needless new generation, never a stale byte).
MAX_OWN_VERSIONS = 256


@dataclasses.dataclass(slots=True)
class FileState:
    ino: int
    gen: int
    version: Version | None  # None: not known; adopt the backing's at the next check
    checked: float = 0.0  # time.monotonic() of the last version check
    epoch: int = 0  # bumped when a write starts and when it ends
    writing: int = 0  # writes in flight
    # Versions our own writes left while other writes of ours were in flight: a write that
    # overlapped them may find one of these before it (cleared when no write is in flight).
    own: set[Version] = dataclasses.field(default_factory=set)


class Snapshot(NamedTuple):
    """A file's state when a backing read started: the read may be admitted only if nothing changed since."""

    gen: int
    epoch: int
    quiet: bool  # no write was in flight when the read started

    def still_current(self, st: FileState) -> bool:
        return self.quiet and st.writing == 0 and st.epoch == self.epoch and st.gen == self.gen


class Files:
    """Every known file's state, its name, its counters, and the rules above."""

    def __init__(self, backing: OffLoop, store: Store, queue: StoreQueue, *, revalidate: float) -> None:
        self.backing = backing
        self.store = store
        self.queue = queue
        self.revalidate = revalidate
        self.chunk_size = store.chunk_size
        self._files: dict[int, FileState] = {}
        self._names: dict[int, str] = {}  # ino -> the name it was last opened by
        self.images: dict[str, ImageCounters] = defaultdict(ImageCounters)
        self.health = queue.health
        queue.on_failed = self.batch_failed
        queue.on_rebuilt = self.rebuilt

    def get(self, ino: int) -> FileState:
        st = self._files.get(ino)
        if st is None:
            # degraded: the store may be unreadable; nothing of it is served until it is rebuilt empty
            rec = self.store.file_record(ino) if self.health.caching else None
            st = FileState(ino, rec[0], Version(*rec[1])) if rec else FileState(ino, 1, None)
            self._files[ino] = st
        return st

    def known(self) -> set[int]:
        return set(self._files)

    def names(self) -> dict[int, str]:
        """ino -> the path each known file was last opened by."""
        return dict(self._names)

    def name(self, ino: int) -> str:
        return self._names.get(ino, str(ino))

    def counters(self, name: str) -> ImageCounters:
        return self.images[name]

    # ---- versions ------------------------------------------------------------
    def opened(self, path: str, attr: Attr) -> FileState:
        """`path` was opened with these attributes (close-to-open: read at this open)."""
        self._names[attr.ino] = path
        st = self.get(attr.ino)
        self.check(st, attr)
        return st

    def check(self, st: FileState, attr: Attr) -> None:
        version = attr.version
        st.checked = time.monotonic()
        if st.version == version:
            return
        if st.version is not None:
            # changed behind our back (another host, or a tool on the NFS server)
            self._new_generation(st)
            self.images[self.name(st.ino)].invalidations += 1
            log.info("%s changed on the backing: its cached chunks are dropped", self.name(st.ino))
        st.version = version
        self.queue.record_file(st.ino, st.gen, version)

    def attributes_seen(self, attr: Attr) -> None:
        """The kernel asked for a known file's attributes (getattr) and got `attr`: a check too.

        A buffered reader's kernel drops its cached pages when it sees a new mtime here; the
        generation must move now, or the next read would refill them with the old version's
        chunks, kept until the file is closed. Skipped while our own writes are in flight (their
        before/after fstats judge those) and for a file whose version is not known yet.
        """
        st = self._files.get(attr.ino)
        if st is None or st.writing or st.version is None or st.version == UNKNOWN:
            return
        seen = attr.version
        if seen.change == 0 and st.version.change != 0:
            # getattr stats by name, and on NFSv4 that carries no change attribute (only an open
            # file's fstat does): compare the rest, and leave the version to the next fstat check.
            if seen[:3] != st.version[:3]:
                self._new_generation(st)
                self.images[self.name(st.ino)].invalidations += 1
                log.info("%s changed on the backing: its cached chunks are dropped", self.name(st.ino))
                st.checked = 0.0  # the next read checks with fstat at once, and records that version
            return
        self.check(st, attr)

    def fresh(self, ino: int) -> FileState | None:
        """The file's state when it is known and its version was checked within `revalidate` seconds, else None.

        The hit path's shortcut: no coroutine when nothing needs the backing (`revalidated` otherwise).
        """
        st = self._files.get(ino)
        if st is not None and time.monotonic() - st.checked < self.revalidate:
            return st
        return None

    async def revalidated(self, ino: int, handle: object) -> FileState:
        """The file's state, its version checked against the backing if `revalidate` seconds have passed."""
        st = self._files.get(ino) or self.get(ino)  # the hit path: one dict lookup when the file is known
        if time.monotonic() - st.checked >= self.revalidate:
            self.check(st, await self.backing.fstat(handle))
        return st

    def resized(self, ino: int) -> None:
        st = self.get(ino)
        self._new_generation(st)
        st.version = None
        self.queue.record_file(st.ino, st.gen, UNKNOWN)

    def unlinked(self, ino: int) -> None:
        """Forget the file's cached content (unlinked, or dropped by command)."""
        st = self.get(ino)
        self._new_generation(st)
        st.version = None
        self.queue.forget_file(ino)

    @staticmethod
    def _new_generation(st: FileState) -> None:
        """Nothing of the old generation is found again (its location keys no longer match)."""
        st.gen += 1

    # ---- failing closed --------------------------------------------------------
    def fail_closed(self, ino: int, layer: str, exc: BaseException) -> None:
        """The cache's part of a write to `ino` failed: nothing cached of that file may be found again."""
        self.health.fault(layer, exc, "the write went to the backing; the file's cached chunks are abandoned")
        st = self._files.get(ino)
        if st is None:  # the store could not even say which generation it holds: stop trusting it
            self.health.degrade(f"the record of inode {ino} could not be read: {type(exc).__name__}: {exc}")
            st = self._files[ino] = FileState(ino, 1, None)
        self._new_generation(st)
        st.version = None
        self.store.taint()

    def batch_failed(self, batch: WriteBatch) -> None:
        """A batch did not commit: its drops, records and forgets are lost, so every file they touch moves on.

        Called before the batch's dropped marks are cleared, so no read finds the old chunks in between.
        """
        inos = {ino for ino, _, _ in batch.drop} | {ino for ino, _, _ in batch.files} | set(batch.forget_files)
        for ino in inos:
            st = self._files.get(ino)
            if st is None:
                continue
            self._new_generation(st)
            self.queue.record_file(ino, st.gen, st.version if st.version is not None else UNKNOWN)
        if inos:
            self.store.taint()

    def rebuilt(self) -> None:
        """The store was rebuilt empty: record again every file we know, at its current generation."""
        for st in self._files.values():
            self.queue.record_file(st.ino, st.gen, st.version if st.version is not None else UNKNOWN)

    # ---- writes ----------------------------------------------------------------
    def write_started(self, st: FileState) -> Version | None:
        """Returns the version before the write, for `write_ended`."""
        st.writing += 1
        st.epoch += 1
        return st.version

    def write_ended(self, st: FileState, offset: int, nbytes: int) -> range:
        """Drop the chunks the write touched (whether or not it succeeded); returns them."""
        st.writing -= 1
        st.epoch += 1
        if health.faults:
            health.inject("writer")
        cs = self.chunk_size
        touched = range(offset // cs, (offset + nbytes - 1) // cs + 1) if nbytes else range(0)
        for c in touched:
            self.queue.drop((st.ino, st.gen, c))
        return touched

    def write_done(self, st: FileState, before: Version | None, pre: Attr, attr: Attr) -> None:
        """The write succeeded: the backing had `pre` just before it and has `attr` after it.

        `attr`'s version is adopted as our own change only if `pre`'s is a version we knew when
        the write started (`before`), or the one recorded since, or one our overlapping writes
        left; else another host changed the file meanwhile, and its cached chunks must go.
        """
        if before is None:
            self.resized(st.ino)  # the old size is not known: the old end-of-file chunk cannot be found
        elif pre.version not in (before, st.version) and pre.version not in st.own:
            self._new_generation(st)
            self.images[self.name(st.ino)].invalidations += 1
            log.info("%s changed on the backing before our write: its cached chunks are dropped", self.name(st.ino))
        elif attr.size != before.size:
            # the chunk that held the old end of file is short in the store: it must not end reads early
            self.queue.drop((st.ino, st.gen, before.size // self.chunk_size))
        if st.writing and len(st.own) < MAX_OWN_VERSIONS:
            st.own.add(attr.version)
        elif not st.writing:
            st.own.clear()
        st.version = attr.version
        st.checked = time.monotonic()  # the fstat before the write was a check
        self.queue.record_file(st.ino, st.gen, attr.version)

    # ---- admission -------------------------------------------------------------
    def is_current(self, key: Key) -> bool:
        """Whether a chunk read earlier may still be admitted: same generation, not dropped, not being written."""
        st = self.get(key[0])
        return st.gen == key[1] and not self.queue.is_dropped(key) and not st.writing

    def holds(self, key: Key) -> bool:
        """Whether the store holds this chunk now, or is about to (queued, not dropped)."""
        if self.queue.is_dropped(key):
            return False
        return self.queue.pending(key) is not None or self.store.location(*key) is not None

    def evict_first(self, keys: list[Key]) -> None:
        """A hint for the store's eviction: a guest holds these chunks itself, so the store's copies go first."""
        self.store.evict_first(keys)

    def admit(self, key: Key, data: bytes, name: str | None = None, owner: str | None = None) -> bool:
        """Queue a chunk for the store (False when the writer is too far behind, or the cache is degraded), counted.

        owner: the guest it is admitted for, whose share of the cache it counts in (None: the host).
        """
        return self.admit_many([(key, data)], name or self.name(key[0]), owner) == 1

    def admit_many(self, chunks: list[tuple[Key, bytes]], name: str, owner: str | None = None) -> int:
        """Queue chunks of image `name`, (key, bytes) each, in order, counted: how many were taken, the first n (none
        while the cache is degraded); owner as in `admit`."""
        if not self.health.caching:
            return 0
        n = self.queue.admit_many(chunks, owner)
        self.images[name].admitted_chunks += n
        return n

    async def admit_current(self, key: Key, data: bytes, wait: bool = False, owner: str | None = None) -> bool:
        """Admit a chunk read earlier, unless its file has changed since or is being written.

        With `wait`, a writer too far behind is waited for rather than the chunk skipped; owner as in `admit`.
        """
        while self.is_current(key):
            if self.admit(key, data, owner=owner):
                return True
            if not wait:
                return False
            await trio.sleep(0.01)
        return False

    async def read_for_admission(self, path: str, keys: list[Key]) -> list[tuple[Key, bytes]]:
        """Read chunks of one file again from the backing, in a worker thread, for a delayed admission.

        Chunks written or regenerated while this ran are left out (the
        epoch check of the read path, for a read that is not a guest's).
        """
        if not keys:
            return []
        st = self.get(keys[0][0])
        epoch, gen = st.epoch, st.gen
        cs = self.chunk_size
        sync = self.backing.sync

        def read_all() -> list[tuple[Key, bytes]]:
            out = []
            h = sync.open(path, os.O_RDONLY)
            try:
                if sync.fstat(h).ino != keys[0][0]:
                    return []  # the name now holds another file
                for key in sorted(keys):
                    data = sync.pread(h, key[2] * cs, cs)
                    if data:
                        out.append((key, data))
            finally:
                sync.close(h)
            return out

        try:
            got = await self.backing.run(read_all)
        except OSError as exc:
            log.info("%s: cannot read it again for admission: %s", path, exc.strerror)
            return []
        if st.epoch != epoch or st.gen != gen or st.writing:
            return []
        return got
