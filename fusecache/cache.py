"""The read path: where a request's bytes come from, chunk by chunk.

`Cache` serves each chunk of a request from the location index (ino,
generation, chunk) -> the store's verified bytes (a hit, inline on the trio
thread), or what is admitted but not yet committed (`StoreQueue.pending`);
else from peers that may hold it (`PeerReads`), else from the backing in a
worker thread (a miss), and offers what it fetched to the admission policy.
Writes go to the backing; which cached chunks they make stale is decided by
`Files` (the never-stale rules live there, the writer queue in
`store_queue.py`). `Passthrough` sends everything to the backing: the mount
with no cache, and the baseline.

`Cache.read` and `Cache.write` are the error boundary (docs/internals.md,
"Failing open"): a fault of the cache side (the store, admission, peers, the
write path's bookkeeping) is counted and logged by `Health` and the request
is served from the backing; only the backing's own errors (`BackingError`
inside, the OSError outside) reach the guest. A write whose bookkeeping
failed fails closed: its file gets a new generation before it returns.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from typing import Any

from fusecache import health
from fusecache.admission import Admission, Piece
from fusecache.backing import Attr, Backing, OffLoop
from fusecache.fetch import Fetcher, Reader
from fusecache.files import Files, FileState, Snapshot
from fusecache.inodes import OpenFile
from fusecache.peer_reads import PeerReads
from fusecache.stats import ImageCounters
from fusecache.store_queue import StoreQueue
from fusecache.version import UNKNOWN

log = logging.getLogger(__name__)
MISSING = object()  # `_hit`'s answer for a one-chunk request the index has no entry for


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

    def attributes_seen(self, attr: Attr) -> None:
        pass


class BackingError(Exception):
    """The backing's own error inside the read path: the guest gets it (the backing would have given it too)."""

    def __init__(self, error: OSError) -> None:
        super().__init__(error)
        self.error = error


class Cache:
    """The read path over a store (through `files` and `queue`), with peers when `peer_reads` is given."""

    def __init__(
        self,
        backing: OffLoop,
        files: Files,
        queue: StoreQueue,
        admission: Admission,
        *,
        peer_reads: PeerReads | None = None,
    ) -> None:
        self.backing = backing
        self.files = files
        self.queue = queue
        self.store = files.store
        self.admission = admission
        self.peer_reads = peer_reads
        self.chunk_size = files.chunk_size
        self.fetcher = Fetcher(backing, chunk_size=self.chunk_size)
        self.images: dict[str, ImageCounters] = files.images  # the same counters, one hop shorter on the hit path
        # open file (fh) -> (what its Reader was built from, the Reader): reused by its next miss while that holds
        self._readers: dict[int, tuple[tuple[Any, ...], FileState, Reader]] = {}
        self.health = queue.health
        queue.pacer.reads = self._read_count  # the writer yields the GIL while reads are active
        if admission.passes_misses_through:
            self.fetcher.room = self._admission_room
            self.fetcher.refused = self._admissions_refused

    # ---- the file's life (from fs.py) ------------------------------------------
    # Each reads the file's record from the store the first time: a fault there fails closed, never the request.
    async def opened(self, f: OpenFile) -> None:
        try:
            self.files.opened(f.path, f.attr)  # close-to-open: f.attr was read at this open
        except Exception as exc:
            self.files.fail_closed(f.ino, health.layer_of(exc, "store.read"), exc)

    def closed(self, f: OpenFile) -> None:
        self._readers.pop(f.fh, None)
        self.fetcher.closed(f.fh, f.ino)
        if self.peer_reads is not None:
            self.peer_reads.closed(f.fh)

    def resized(self, ino: int, size: int) -> None:
        try:
            self.files.resized(ino)
        except Exception as exc:
            self.files.fail_closed(ino, health.layer_of(exc, "store.read"), exc)

    def unlinked(self, ino: int) -> None:
        try:
            self.files.unlinked(ino)
        except Exception as exc:
            self.files.fail_closed(ino, health.layer_of(exc, "store.read"), exc)

    def attributes_seen(self, attr: Attr) -> None:
        self.files.attributes_seen(attr)

    def _read_count(self) -> int:
        """Reads so far, every image (in the writer thread: a snapshot of the values, taken under the GIL in one call)."""
        return sum(c.reads for c in list(self.images.values()))

    # ---- reads ------------------------------------------------------------
    async def read(self, f: OpenFile, offset: int, size: int) -> bytes | memoryview:
        """The error boundary of reads: the cache's answer, else (degraded, or a fault of the cache) the backing's."""
        if self.health.state is not health.CACHING:
            return await self.backing.pread(f.handle, offset, size)
        try:
            st = self.files.fresh(f.ino) if size > 0 else None
            span = self._hit(f, offset, size, st)  # the warm case, inline: no coroutine below this one
            absent = span is MISSING
            if span is not None and not absent:
                return span
            if absent and self.peer_reads is None:
                return await self._read(f, offset, size, st, True)  # (its cold path is the fetcher's, first thing)
            fetcher = self.fetcher
            if st is not None and not st.writing and (
                fetcher.read_ahead(st.ino, offset, stamp := (st.gen, st.epoch)) or fetcher.buffered(st.ino, offset, size, stamp)
            ):
                # a sequential stream's next request, read ahead (or all in the fetcher's buffer already): straight
                # there, none of `_read`'s lookups (its index, the queue's changes) for what was not held when read
                counters, cs = self.images[f.path], self.chunk_size
                span = await self._all_missed(f, st, offset, size, counters, (offset + size - 1) // cs - offset // cs + 1)
                if span is not None:
                    counters.reads += 1
                    return span
                st, absent = None, False  # (awaited since: `_read` looks again)
            return await self._read(f, offset, size, st, absent)
        except BackingError as exc:
            raise exc.error from None
        except Exception as exc:
            self.health.fault(health.layer_of(exc, "store.read"), exc)
            return await self.backing.pread(f.handle, offset, size)

    def _hit(self, f: OpenFile, offset: int, size: int, st: FileState | None) -> bytes | memoryview | None:
        """The common warm case: the whole request from the store, copied once and verified; None otherwise.

        `st`: the file's state if fresh (`Files.fresh`), else None. None also when the file's version is due
        for a check or changes are queued for the store: `_read` then does everything (it does not look the
        request up in the store a second time unless the queue holds changes). MISSING: a request inside one
        chunk the index has no entry for, nothing queued (a miss, counted: `_read` need not look again).
        """
        if st is None or not self.queue.settled:
            return None
        if health.faults:
            health.inject("store.read")
        cs = self.chunk_size
        first, last = offset // cs, (offset + size - 1) // cs
        span = self.store.read_span(st.ino, st.gen, first, last, offset - first * cs, offset + size - last * cs, MISSING)
        if span is None or span is MISSING:
            return span
        counters = self.images[f.path]
        counters.reads += 1
        counters.hit_bytes += len(span)
        counters.hit_chunks += last - first + 1
        self.admission.served(f, st.gen, offset, span)
        return span

    async def _read(self, f: OpenFile, offset: int, size: int, st: FileState | None, absent: bool = False) -> bytes | memoryview:
        """Everything `_hit` does not take: misses, partial hits, what is queued for the store, a version check.

        `st`: the file's state if `read` found it fresh just now (nothing awaited since), else None. `absent`:
        `_hit` found the request's one chunk missing from the index then (and counted the miss).
        """
        if size <= 0:
            return b""
        fresh = st is not None
        if st is None:
            try:
                st = await self.files.revalidated(f.ino, f.handle)
            except OSError as exc:
                raise BackingError(exc) from exc
        if health.faults:
            health.inject("store.read")
        cs = self.chunk_size
        first, last = offset // cs, (offset + size - 1) // cs
        lo, hi = offset - first * cs, offset + size - last * cs
        counters = self.images[f.path]
        counters.reads += 1
        queue = self.queue
        if queue.settled and not fresh:
            # `_hit` did not look (the version was due for a check): the whole request copied once and verified
            span = self.store.read_span(st.ino, st.gen, first, last, lo, hi)
            if span is not None:
                counters.hit_bytes += len(span)
                counters.hit_chunks += last - first + 1
                self.admission.served(f, st.gen, offset, span)
                return span

        # (a chunk dropped and not yet committed is a miss whatever the store holds: all_missing is stricter)
        cold = (
            self.peer_reads is None
            and not queue.any_pending(st.ino, st.gen, first, last)
            and (absent or self.store.all_missing(st.ino, st.gen, first, last))
        )
        if cold:
            # the cold path: nothing of it held or queued
            span = await self._all_missed(f, st, offset, size, counters, last - first + 1)
            if span is not None:
                return span

        def bounds(c: int) -> tuple[int, int]:
            """The part of chunk c the request covers."""
            return (lo if c == first else 0), (hi if c == last else cs)

        # (a cold request the fetcher did not take whole, or one `_hit` found absent and peers may hold: counted as
        # misses already, nothing to look up again)
        stored = [None] * (last - first + 1) if cold or absent else self.store.read_chunks(st.ino, st.gen, first, last, lo, hi)
        pieces: dict[int, bytes] = {}
        need: list[int] = []
        for i, c in enumerate(range(first, last + 1)):
            lo_c, hi_c = bounds(c)
            key = (st.ino, st.gen, c)
            if queue.is_dropped(key):
                piece = None
            else:
                pending = queue.pending(key)
                piece = pending[lo_c:hi_c] if pending is not None else stored[i]
            if piece is None:
                need.append(c)
                continue
            pieces[c] = piece
            if len(piece) < hi_c - lo_c:
                break  # end of file inside this chunk: nothing after it
        from_peers: set[int] = set()
        if len(need) == last - first + 1 and self.peer_reads is None:
            span = await self._all_missed(f, st, offset, size, counters, len(need))
            if span is not None:
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
        reply = out[0] if len(out) == 1 else b"".join(out)
        self.admission.served(f, st.gen, offset, reply)
        return reply

    async def _all_missed(
        self, f: OpenFile, st: FileState, offset: int, size: int, counters: ImageCounters, chunks: int
    ) -> bytes | memoryview | None:
        """Every chunk of the request missed: one backing read (or a view of readahead) is the answer, no copy.

        None when the fetcher does not take the request whole (then it is read chunk by chunk).
        """
        try:
            span = await self.fetcher.read_span(self._reader(f, st), offset, size)
        except OSError as exc:
            raise BackingError(exc) from exc
        if span is not None:
            counters.backing_bytes += len(span)
            counters.miss_chunks += chunks
            self.admission.served(f, st.gen, offset, span)
        return span

    async def _fetch(
        self, f: OpenFile, st: FileState, need: list[int], bounds: Callable[[int], tuple[int, int]]
    ) -> tuple[dict[int, bytes | memoryview], set[int]]:
        """Missing chunks: from peers that may hold them, else through the fetcher (fusecache/fetch.py).

        Each value v has the chunk's requested bytes at v[lo:hi] (`bounds`).
        """
        got: dict[int, bytes | memoryview] = {}
        from_peers: set[int] = set()
        reader = self._reader(f, st)
        if self.peer_reads is not None and st.version is not None and st.version != UNKNOWN:
            try:
                if health.faults:
                    health.inject("peers.fetch")
                offered = await self.peer_reads.fetch(st.ino, st.version, need, ahead=reader)
            except Exception as exc:  # the peers are a cache too: their fault is a miss
                self.health.fault(health.layer_of(exc, "peers.fetch"), exc, "read from the backing instead")
                offered = {}
            for c, piece in offered.items():
                got[c] = piece
                from_peers.add(c)
            pieces = [(c, piece) for c, piece in offered.items() if piece]
            if pieces and reader.offer is not None:
                reader.offer(pieces, ())  # (none was held: they were missing)
        rest = [(c, *bounds(c)) for c in need if c not in got]
        if rest:
            try:
                got.update(await self.fetcher.read(reader, rest))
            except OSError as exc:
                raise BackingError(exc) from exc
        return got, from_peers

    def _reader(self, f: OpenFile, st: FileState) -> Reader:
        """The fetcher's view of one read of `f`: its stamp, and the admission offer for chunks it completes.

        Built once per open file and state: a miss of the same open file, with the file's generation, write
        epoch, writes in flight, size and admission's interest unchanged, reuses it (the stamp it reads is live).
        """
        size = st.version.size if st.version is not None and st.version.size >= 0 else None
        wants = self.admission.wants(st.ino)
        key = (f.handle, f.path, st.gen, st.epoch, st.writing == 0, size, wants)
        got = self._readers.get(f.fh)
        if got is not None and got[1] is st and got[0] == key:
            return got[2]
        reader = self._new_reader(f, st, size, wants)
        self._readers[f.fh] = (key, st, reader)
        return reader

    def _new_reader(self, f: OpenFile, st: FileState, size: int | None, wants: bool) -> Reader:
        snap = Snapshot(st.gen, st.epoch, st.writing == 0)

        queue, store = self.queue, self.store

        def held_range(first: int, last: int, index: bool = True) -> set[int]:
            """Which of chunks first..last the cache holds: one scan of the index's keys (none without `index`: the
            caller knows none is there), then the queue's changes on top (a chunk dropped and not yet committed is
            not held, one admitted and not yet committed is)."""
            out = store.held_chunks(st.ino, st.gen, first, last) if index else set()
            if not queue.settled:
                for c in range(first, last + 1):
                    key = (st.ino, st.gen, c)
                    if queue.is_dropped(key):
                        out.discard(c)
                    elif queue.pending(key) is not None:
                        out.add(c)
            return out

        def offer(pieces: list[Piece], taken: Collection[int]) -> Collection[int]:
            """Offer fetched chunks, (chunk, bytes) each, for admission, unless a write or a new generation overlapped
            their fetch.

            Admission sees every read (the recently-read lists); a chunk already held or queued is not admitted
            twice. Only the chunks admission took at an earlier touch (`taken`) can be in the index (the rest were
            not held when they were fetched): the index is scanned once if one of them is offered, else only the
            queue is asked (a chunk admitted meanwhile by another way in, and committed too, is then admitted
            again: the store keeps one copy). Returns the chunks the writer, too far behind, did not take: the fetcher
            offers them again later. A fault of admission or of the store here is counted; the chunks are served
            all the same.
            """
            if not snap.still_current(st):
                return ()
            try:
                if health.faults:
                    health.inject("admission")
                admit = self.admission.on_miss(f, snap.gen, pieces)
                if admit:
                    chunks = [c for c, _ in admit]
                    held_now = held_range(min(chunks), max(chunks), index=any(c in taken for c in chunks))
                    todo = [((st.ino, snap.gen, c), piece) for c, piece in admit if c not in held_now]
                    taken_now = self.files.admit_many(todo, f.path)  # (one call for the offer, not one per chunk)
                    return [key[2] for key, _ in todo[taken_now:]]
            except Exception as exc:  # the chunks are served all the same; they are only not admitted
                self.health.fault(health.layer_of(exc, "admission"), exc, "the chunk is served, not admitted")
            return ()

        return Reader(
            st.ino, f.path, f.handle, f.fh, size, lambda: None if st.writing else (st.gen, st.epoch),
            offer if wants else None, held_range=held_range,
        )  # fmt: skip

    def _admission_room(self) -> bool:
        """Whether the writer would take a chunk offered now (`Fetcher.room`): not while it is too far behind, nor
        while the cache is degraded (`Files.admit_many` takes nothing then)."""
        return self.health.caching and self.queue.has_room(self.chunk_size)

    def _admissions_refused(self, chunks: int) -> None:
        """The fetcher built no offer for these chunks (`Fetcher.refused`): counted as the writer's refusals would be."""
        if self.health.caching:
            self.queue.skipped_admissions += chunks

    # ---- writes -----------------------------------------------------------
    async def write(self, f: OpenFile, offset: int, data: bytes) -> int:
        """The error boundary of writes: the backing's write happens once, whatever the cache does.

        A fault of the cache's bookkeeping around it fails closed (`Files.fail_closed`: a new
        generation for the file) and the write returns what the backing said.
        """
        files = self.files
        try:
            st = files.get(f.ino)
            before = files.write_started(st)
        except Exception as exc:
            files.fail_closed(f.ino, health.layer_of(exc, "writer"), exc)
            return await self.backing.pwrite(f.handle, data, offset)
        try:
            written, pre, attr = await self.backing.run(_pwrite_and_stat, self.backing.sync, f.handle, data, offset)
        finally:
            try:
                touched = files.write_ended(st, offset, len(data))
                if touched:
                    self.admission.written(st.ino, touched)
            except Exception as exc:
                files.fail_closed(f.ino, health.layer_of(exc, "writer"), exc)
        try:
            files.write_done(st, before, pre, attr)
        except Exception as exc:
            files.fail_closed(f.ino, health.layer_of(exc, "writer"), exc)
        counters = files.images[f.path]
        counters.writes += 1
        counters.write_bytes += written
        return written


def _pwrite_and_stat(backing: Backing, handle: object, data: bytes, offset: int) -> tuple[int, Attr, Attr]:
    """(bytes written, attributes just before, just after): `Files.write_done` adopts the after only if the before was known."""
    pre = backing.fstat(handle)
    n = backing.pwrite(handle, data, offset)
    return n, pre, backing.fstat(handle)

