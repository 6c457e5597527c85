"""The data path: where file contents come from and go to.

`Cache` is the read path of DESIGN.md: for each chunk of a request, the
location index (ino, generation, chunk) -> the store's verified bytes (a
hit, served inline on the trio thread); else the backing file, read in a
worker thread (a miss), and offered to the admission policy. `Passthrough`
sends everything to the backing: the mount with no cache, and the baseline.

Never stale, in four rules:
- A file's *generation* names one version of its content. At open and every
  `revalidate` seconds the backing's version (size, mtime, ctime, NFS
  change) is compared with the one recorded; if another host changed it, the
  generation is bumped in memory at once, so no old chunk is found again.
  Truncate and unlink bump it too.
- A write goes to the backing first; the chunks it touched are then marked
  dropped in memory (`FileState.dropped`) before the write returns, and the
  drop is queued for the store. A dropped chunk is a miss until the store
  has committed the drop.
- A chunk read from the backing is admitted only if no write to that file
  started or ended while it was being read (`FileState.epoch`), and the
  generation is unchanged: a read that raced a write never caches old bytes.
- The writer task applies queued changes in order, in one worker thread at a
  time (the store's single writer), batched.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections import defaultdict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from fusecache.backing import Attr, OffLoop
from fusecache.fetch import Fetcher, Reader
from fusecache.inodes import OpenFile
from fusecache.policy import Admission
from fusecache.store import Store, WriteBatch

if TYPE_CHECKING:
    from fusecache.peers import PeerSet

log = logging.getLogger(__name__)

UNKNOWN_VERSION = (-1, -1, -1, -1)
MAX_PENDING_ADMIT_BYTES = 128 << 20  # past this, misses are served but not admitted: reads never wait for the writer
MAX_BATCH_ADMITS = 1024
ADMIT_READ = 1 << 20  # an admit command reads the backing this much at a time


class Passthrough:
    """No cache: reads and writes go straight to the backing file."""

    def __init__(self, backing: OffLoop) -> None:
        self.backing = backing

    async def read(self, f: OpenFile, offset: int, size: int) -> bytes:
        return await self.backing.pread(f.handle, offset, size)

    async def write(self, f: OpenFile, offset: int, data: bytes) -> int:
        return await self.backing.pwrite(f.handle, data, offset)

    async def opened(self, f: OpenFile) -> None:
        pass

    def closed(self, f: OpenFile) -> None:
        pass

    def resized(self, ino: int, size: int) -> None:
        pass

    def unlinked(self, ino: int) -> None:
        pass

    def stats(self) -> dict[str, Any]:
        return {"cache": None}

    async def run(self) -> None:
        pass

    async def close(self) -> None:
        pass


@dataclasses.dataclass(slots=True)
class FileState:
    ino: int
    gen: int
    version: tuple[int, int, int, int] | None  # None: not known; adopt the backing's at the next check
    checked: float = 0.0  # time.monotonic() of the last version check
    epoch: int = 0  # bumped when a write starts and when it ends
    writing: int = 0  # writes in flight
    dropped: dict[int, int] = dataclasses.field(default_factory=dict)  # chunk -> queue seq of its drop


@dataclasses.dataclass(slots=True)
class ImageCounters:
    reads: int = 0
    hit_bytes: int = 0
    peer_bytes: int = 0
    backing_bytes: int = 0
    hit_chunks: int = 0
    miss_chunks: int = 0
    admitted_chunks: int = 0
    writes: int = 0
    write_bytes: int = 0
    invalidations: int = 0


class Cache:
    """The read path over a `Store`, with invalidation on writes and on version changes."""

    def __init__(
        self, backing: OffLoop, store: Store, admission: Admission, *, revalidate: float = 2.0, peers: PeerSet | None = None
    ) -> None:
        self.backing = backing
        self.peers = peers
        self.on_committed: Callable[[int], None] = lambda admitted: None  # tells the peer server its summary aged
        self.store = store
        self.admission = admission
        self.revalidate = revalidate
        self.chunk_size = store.chunk_size
        self._files: dict[int, FileState] = {}
        self.fetcher = Fetcher(backing, chunk_size=self.chunk_size)
        self.images: dict[str, ImageCounters] = defaultdict(ImageCounters)
        self._names: dict[int, str] = {}  # ino -> the name it was last opened by
        # the writer's queue: (seq, kind, item); seq orders drops against admissions
        self._queue: list[tuple[int, str, Any]] = []
        self._seq = 0
        self._committed = 0
        self._pending_admit_bytes = 0
        self._pending: dict[tuple[int, int, int], bytes] = {}  # admitted, not yet committed: served from here
        self._wakeup = trio.Event()
        self._writer_limiter = trio.CapacityLimiter(1)
        self.skipped_admissions = 0

    # ---- file state and versions --------------------------------------------
    def _file(self, ino: int) -> FileState:
        st = self._files.get(ino)
        if st is None:
            rec = self.store.file_record(ino)
            st = FileState(ino, rec[0], rec[1]) if rec else FileState(ino, 1, None)
            self._files[ino] = st
        return st

    def _check_version(self, st: FileState, attr: Attr) -> None:
        version = attr.version
        st.checked = time.monotonic()
        if st.version == version:
            return
        if st.version is not None:
            # changed behind our back (another host, or a tool on the NFS server)
            _new_generation(st)
            self.images[self._names.get(st.ino, str(st.ino))].invalidations += 1
            log.info("%s changed on the backing: its cached blocks are dropped", self._names.get(st.ino, st.ino))
        st.version = version
        self._enqueue("file", (st.ino, st.gen, version))

    def _bump(self, st: FileState) -> None:
        _new_generation(st)
        st.version = None
        self._enqueue("file", (st.ino, st.gen, UNKNOWN_VERSION))

    async def opened(self, f: OpenFile) -> None:
        self._names[f.ino] = f.path
        self._check_version(self._file(f.ino), f.attr)  # close-to-open: f.attr was read at this open

    def closed(self, f: OpenFile) -> None:
        self.fetcher.closed(f.fh, f.ino)

    def resized(self, ino: int, size: int) -> None:
        self._bump(self._file(ino))

    def unlinked(self, ino: int) -> None:
        st = self._file(ino)
        _new_generation(st)
        st.version = None
        self._enqueue("forget", ino)

    async def _state(self, f: OpenFile) -> FileState:
        st = self._file(f.ino)
        if time.monotonic() - st.checked >= self.revalidate:
            self._check_version(st, await self.backing.fstat(f.handle))
        return st

    # ---- reads ------------------------------------------------------------
    async def read(self, f: OpenFile, offset: int, size: int) -> bytes | memoryview:
        if size <= 0:
            return b""
        st = await self._state(f)
        cs = self.chunk_size
        first, last = offset // cs, (offset + size - 1) // cs
        lo, hi = offset - first * cs, offset + size - last * cs
        counters = self.images[f.path]
        counters.reads += 1
        if not st.dropped and not self._pending:
            # the common warm case: the whole request copied once into one buffer and verified there
            span = self.store.read_span(st.ino, st.gen, first, last, lo, hi)
            if span is not None:
                counters.hit_bytes += len(span)
                counters.hit_chunks += last - first + 1
                return span

        def bounds(c: int) -> tuple[int, int]:
            """The part of chunk c the request covers."""
            return (lo if c == first else 0), (hi if c == last else cs)

        stored = self.store.read_chunks(st.ino, st.gen, first, last, lo, hi)
        pieces: dict[int, bytes] = {}
        need: list[int] = []
        for i, c in enumerate(range(first, last + 1)):
            lo_c, hi_c = bounds(c)
            if c in st.dropped:
                piece = None
            else:
                pending = self._pending.get((st.ino, st.gen, c))
                piece = pending[lo_c:hi_c] if pending is not None else stored[i]
            if piece is None:
                need.append(c)
                continue
            pieces[c] = piece
            if len(piece) < hi_c - lo_c:
                break  # end of file inside this chunk: nothing after it
        from_peers: set[int] = set()
        if len(need) == last - first + 1 and self.peers is None:
            # all of it missed: one backing read whose bytes are the answer, no copy
            span = await self.fetcher.read_span(self._reader(f, st), offset, size)
            if span is not None:
                counters.backing_bytes += len(span)
                counters.miss_chunks += len(need)
                return span
        if need:
            got, from_peers = await self._fetch(f, st, need, bounds)
            for c, data in got.items():
                lo_c, hi_c = bounds(c)
                pieces[c] = data[lo_c:hi_c]
        out = []
        for c in range(first, last + 1):
            piece = pieces.get(c)
            if piece is None:
                break  # beyond end of file
            if piece:
                out.append(piece)
                if c in from_peers:
                    counters.peer_bytes += len(piece)
                    counters.miss_chunks += 1
                elif c in need:
                    counters.backing_bytes += len(piece)
                    counters.miss_chunks += 1
                else:
                    counters.hit_bytes += len(piece)
                    counters.hit_chunks += 1
            lo_c, hi_c = bounds(c)
            if len(piece) < hi_c - lo_c:
                break  # end of file
        return out[0] if len(out) == 1 else b"".join(out)

    async def _fetch(
        self, f: OpenFile, st: FileState, need: list[int], bounds: Callable[[int], tuple[int, int]]
    ) -> tuple[dict[int, bytes | memoryview], set[int]]:
        """Missing chunks: from peers that may hold them, else through the fetcher (fusecache/fetch.py).

        Each value v has the chunk's requested bytes at v[lo:hi] (`bounds`).
        """
        got: dict[int, bytes | memoryview] = {}
        from_peers: set[int] = set()
        reader = self._reader(f, st)
        if self.peers is not None and st.version is not None and st.version != UNKNOWN_VERSION:
            for c, piece in (await self._ask_peers(st.ino, st.version, need)).items():
                got[c] = piece
                from_peers.add(c)
                reader.offer(c, piece)
        rest = [(c, *bounds(c)) for c in need if c not in got]
        if rest:
            got.update(await self.fetcher.read(reader, rest))
        return got, from_peers

    def _reader(self, f: OpenFile, st: FileState) -> Reader:
        """The fetcher's view of one read of `f`: its stamp, and the admission offer for chunks it completes."""
        gen, epoch, quiet = st.gen, st.epoch, st.writing == 0

        def offer(c: int, piece: bytes | memoryview) -> None:
            """Offer a fetched chunk for admission, unless a write or a new generation overlapped its fetch."""
            if quiet and st.writing == 0 and st.epoch == epoch and st.gen == gen and piece and self.admission.on_miss(f, gen, c, piece):
                self.admit(st.ino, gen, c, piece, f.path)

        size = st.version[0] if st.version is not None and st.version[0] >= 0 else None
        return Reader(st.ino, f.path, f.handle, f.fh, size, lambda: None if st.writing else (st.gen, st.epoch), offer)

    async def _ask_peers(self, ino: int, version: tuple[int, int, int, int], chunks: list[int]) -> dict[int, bytes]:
        """Chunks that peers send within one bounded wait (each checked against its page digests by PeerSet)."""
        peers = self.peers
        assert peers is not None
        deadline = trio.current_time() + peers.fetch_timeout
        offered: dict[int, bytes] = {}

        async def one(c: int) -> None:
            data = await peers.fetch_location(ino, version, c, deadline)
            if data is not None:
                offered[c] = data

        async with trio.open_nursery() as nursery:
            for c in chunks:
                nursery.start_soon(one, c)
        return offered

    async def admit_current(self, key: tuple[int, int, int], data: bytes, wait: bool = False) -> bool:
        """Admit a chunk read earlier, unless its file has changed since (generation) or is being written."""
        ino, gen, chunk = key
        st = self._file(ino)
        if st.gen != gen or chunk in st.dropped or st.writing:
            return False
        while not self.admit(ino, gen, chunk, data):
            if not wait:
                return False
            await trio.sleep(0.01)  # the writer is behind: wait for it
            if st.gen != gen or chunk in st.dropped or st.writing:
                return False
        return True

    async def read_for_admission(self, path: str, keys: list[tuple[int, int, int]]) -> list[tuple[tuple[int, int, int], bytes]]:
        """Read chunks again from the backing, in a worker thread, for a delayed admission.

        Chunks written or regenerated while this ran are left out (the
        epoch check of the read path, for a read that is not a guest's).
        """
        if not keys:
            return []
        st = self._file(keys[0][0])
        epoch, gen = st.epoch, st.gen
        cs = self.chunk_size
        sync = self.backing.sync

        def read_all() -> list[tuple[tuple[int, int, int], bytes]]:
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

    def peer_holds(self, key: tuple[int, int, int]) -> bool:
        """Whether a peer's summary says it holds this chunk of the file's current version."""
        st = self._file(key[0])
        if self.peers is None or st.gen != key[1] or st.version is None or st.version == UNKNOWN_VERSION:
            return False
        return self.peers.may_hold_location(key[0], st.version, key[2])

    async def cluster_holdings(self, limit: int = 200_000) -> dict[str, int]:
        """Chunks held here that a peer also holds, and chunks held only here (a sample of up to `limit`)."""
        also = only = 0
        if self.peers is None:
            return {"chunks_also_on_peers": 0, "chunks_only_here": 0, "sampled": 0}
        for n, (ino, version, chunk) in enumerate(self.store.iter_locations()):
            if n >= limit:
                break
            if self.peers.may_hold_location(ino, version, chunk):
                also += 1
            else:
                only += 1
            if n % 1000 == 999:
                await trio.sleep(0)  # let requests in
        return {"chunks_also_on_peers": also, "chunks_only_here": only, "sampled": also + only}

    def admit(self, ino: int, gen: int, chunk: int, data: bytes, name: str | None = None) -> bool:
        """Queue one chunk for the store; False (not admitted) when the writer is too far behind."""
        if self._pending_admit_bytes + len(data) > MAX_PENDING_ADMIT_BYTES:
            self.skipped_admissions += 1
            return False
        self._pending_admit_bytes += len(data)
        self._pending[(ino, gen, chunk)] = data
        self._enqueue("admit", (ino, gen, chunk, data))
        self.images[name or self._names.get(ino, str(ino))].admitted_chunks += 1
        return True

    # ---- writes -----------------------------------------------------------
    async def write(self, f: OpenFile, offset: int, data: bytes) -> int:
        st = self._file(f.ino)
        before = st.version
        st.writing += 1
        st.epoch += 1
        written = 0
        try:
            written, attr = await self.backing.run(_pwrite_and_stat, self.backing.sync, f.handle, data, offset)
        finally:
            st.writing -= 1
            st.epoch += 1
            if data:
                cs = self.chunk_size
                touched = range(offset // cs, (offset + len(data) - 1) // cs + 1)
                for c in touched:
                    st.dropped[c] = self._enqueue("drop", (st.ino, st.gen, c))
                self.admission.written(st.ino, touched)
        if before is None:
            self._bump(st)  # the old size is not known: the old end-of-file chunk cannot be found
        elif attr.size != before[0]:
            # the chunk that held the old end of file is short in the store: it must not end reads early
            old_eof = before[0] // self.chunk_size
            st.dropped[old_eof] = self._enqueue("drop", (st.ino, st.gen, old_eof))
        # our own write changed the version: adopt it rather than treat it as another host's change
        st.version = attr.version
        st.checked = time.monotonic()
        self._enqueue("file", (st.ino, st.gen, attr.version))
        counters = self.images[f.path]
        counters.writes += 1
        counters.write_bytes += written
        return written

    # ---- the writer -------------------------------------------------------
    def _enqueue(self, kind: str, item: Any) -> int:
        self._seq += 1
        self._queue.append((self._seq, kind, item))
        self._wakeup.set()
        return self._seq

    def _take_batch(self) -> tuple[WriteBatch, int]:
        """The next batch: releases, then admissions, never a release queued after an admission.

        The store applies a batch's releases before its admissions; cutting the
        batch there keeps queue order (an admission followed by the drop of the
        same chunk must end dropped).
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
                batch.admit.append(item)
            elif admits:
                break
            elif kind == "drop":
                batch.drop.append(item)
            elif kind == "file":
                batch.files.append(item)
            else:
                batch.forget_files.append(item)
            taken += 1
            last = seq
        del self._queue[:taken]
        return batch, last

    async def run(self) -> None:
        """The writer task, and the admission policy's background work."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.admission.run)
            nursery.start_soon(self.fetcher.run)
            await self._write_loop()

    async def _write_loop(self) -> None:
        """Applies queued changes to the store, one batch at a time, in a worker thread."""
        while True:
            await self._wakeup.wait()
            self._wakeup = trio.Event()
            await self._drain()

    async def _drain(self) -> None:
        while self._queue:
            batch, last = self._take_batch()
            try:
                await trio.to_thread.run_sync(self.store.apply, batch, limiter=self._writer_limiter)
            except Exception:
                log.exception("the cache store failed to apply a batch: those blocks are not cached")
            for ino, gen, chunk, data in batch.admit:
                self._pending_admit_bytes -= len(data)
                if self._pending.get((ino, gen, chunk)) is data:
                    del self._pending[(ino, gen, chunk)]
            self._committed = last
            if batch.admit:
                self.on_committed(len(batch.admit))
            for st in self._files.values():
                if st.dropped:
                    st.dropped = {c: s for c, s in st.dropped.items() if s > last}

    async def close(self) -> None:
        """Apply what is queued, then close the store (marks a clean shutdown)."""
        with trio.CancelScope(shield=True):
            await self._drain()
            await trio.to_thread.run_sync(self.store.close)

    # ---- commands from the control socket -------------------------------------
    def control_handlers(self) -> dict[str, Any]:
        return {"admit": self._cmd_admit, "drop": self._cmd_drop}

    async def _cmd_admit(self, request: dict[str, Any]) -> dict[str, Any]:
        """Admit a byte range of an image now (for external agents that know what a guest evicted)."""
        from fusecache.control import CommandError

        path, offset, length = request.get("image"), request.get("offset"), request.get("length")
        if not isinstance(path, str) or not isinstance(offset, int) or not isinstance(length, int) or offset < 0 or length < 0:
            raise CommandError("admit needs image (a path in the mount), offset >= 0 and length >= 0")
        sync = self.backing.sync
        try:
            handle = await self.backing.open(path, os.O_RDONLY)
        except OSError as exc:
            raise CommandError(f"cannot open {path}: {exc.strerror}")
        admitted = 0
        try:
            attr = await self.backing.fstat(handle)
            self._names[attr.ino] = path
            st = self._file(attr.ino)
            self._check_version(st, attr)
            cs = self.chunk_size
            pos = offset // cs * cs
            end = min(offset + length, attr.size)
            while pos < end:
                n = min(ADMIT_READ, (end - pos + cs - 1) // cs * cs)
                gen, epoch = st.gen, st.epoch
                data = await self.backing.run(sync.pread, handle, pos, n)
                for i in range(0, len(data), cs):
                    piece = data[i : i + cs]
                    if st.gen != gen or st.epoch != epoch or st.writing:
                        break
                    while not self.admit(st.ino, gen, (pos + i) // cs, piece, path):
                        await trio.sleep(0.01)  # the writer is behind: wait for it rather than skip
                    admitted += 1
                if len(data) < n:
                    break
                pos += n
        except OSError as exc:
            raise CommandError(f"reading {path}: {exc.strerror}")
        finally:
            await self.backing.close(handle)
        return {"image": path, "admitted_chunks": admitted}

    async def _cmd_drop(self, request: dict[str, Any]) -> dict[str, Any]:
        """Forget the cached blocks of one image, or of every image."""
        from fusecache.control import CommandError

        path = request.get("image")
        if path is not None:
            if not isinstance(path, str):
                raise CommandError("drop takes image: a path in the mount")
            try:
                attr = await self.backing.lstat(path)
            except OSError as exc:
                raise CommandError(f"cannot find {path}: {exc.strerror}")
            self.unlinked(attr.ino)
            return {"dropped_files": 1}
        inos = set(self._files) | set(await self.backing.run(self.store.iter_files))
        for ino in inos:
            self.unlinked(ino)
        return {"dropped_files": len(inos)}

    def stats(self) -> dict[str, Any]:
        return {
            "admission": self.admission.stats(),
            "images": {name: dataclasses.asdict(c) for name, c in sorted(self.images.items())},
            "store": self.store.stats(),
            "queue": self._seq - self._committed,  # queued or being applied: not yet committed
            "skipped_admissions": self.skipped_admissions,
        }


def _new_generation(st: FileState) -> None:
    """The file's cached content is no longer its content: nothing of the old generation is found again."""
    st.gen += 1
    st.dropped.clear()


def _pwrite_and_stat(backing: Any, handle: Any, data: bytes, offset: int) -> tuple[int, Attr]:
    n = backing.pwrite(handle, data, offset)
    return n, backing.fstat(handle)

