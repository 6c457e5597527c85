"""The miss path: reading chunks from the backing once, with only the requested bytes on the critical path.

`Fetcher` owns every backing read a cache miss makes. A request that misses
reads only the pages it needs (a large request in parallel parts). For a
sequential stream (detected per open file) the rest of each chunk it touched
and readahead are read in the background by a few runner tasks that batch
many reads into one worker-thread hand-off; a request that is not sequential
reads nothing more than its own pages (the backing never reads more than the
guests asked for, but at the end of a stream's readahead). Fetched pages land
in a bounded buffer of recently fetched blocks, which is also the
single-flight table: a request that needs a page already buffered takes it
from there, one that needs a page being read waits for that read, so a byte
is read from the backing at most once for neighbouring requests. A chunk
that is complete and that a request touched is offered for admission
(`Reader.offer`) until it is taken (a writer too far behind refuses it: the
next request offers it again).

The buffer's unit is a block (BLOCK_SIZE, aligned): a run of the store's
chunks kept as one entry. Every page, chunk and request rule above is the
same as if each chunk had its own entry (pages are tracked one by one, a
chunk is offered when its own pages are all read, readahead is whole chunks
and skips the chunks the cache holds); what the block saves is the entry
itself: a sequential stream creates, claims, fills and evicts one entry per
MiB, not sixteen (bench/misscost.py's 1 MiB row), and a block read whole is
one view of its read.
The buffer's bound is bytes (BUFFER_BYTES), not blocks: each block counts
the pages read, being read or wanted in it, so a block holding one 4 KiB
page (a qcow2 table, a directory) costs 4 KiB of it, not a block's worth.

Never stale: every buffered block carries the file's stamp (the cache's
generation and write epoch) from when it was created; a block whose stamp is
no longer the file's is dropped when next looked up, bytes that come back
after the stamp moved only serve the request that asked for them, and while
a write is in flight (stamp None) reads bypass the buffer entirely.

Background reads never use the handle of a guest's open file (it may be
closed, and its descriptor reused, while a read is queued): the fetcher opens
its own handle per file, checks it is the same file (inode), and closes it
when the file's last open file closes.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Collection, Hashable, Iterable
from typing import Any

import trio

from fusecache.backing import OffLoop
from fusecache.geometry import CHUNK_SIZE, PAGE_SIZE
from fusecache.stats import FetchStats

log = logging.getLogger(__name__)

# (chunk, bytes) each, and which of those chunks admission took at an earlier touch (the cache may hold them now;
# the rest were not held when they were fetched); returns the chunks not taken
Offer = Callable[[list[tuple[int, bytes | memoryview]], Collection[int]], Collection[int]]
BUFFER_BYTES = 64 << 20  # recently fetched blocks kept for the next requests
# the buffer's unit, a multiple of the chunk: at 64 KiB (one entry per chunk) a cold 1 MiB stream cost the loop
# ~145 µs of CPU per MiB against ~65 for --no-cache, at 256 KiB ~75, at 1 MiB ~55 (/tmp paired runs, issue 13)
BLOCK_SIZE = 1 << 20
# bytes read ahead of a sequential stream, at most. The window grows with the stream (16x its requests at most: 2 MiB
# for 128 KiB requests); a long stream of 1 MiB requests topped up 1 MiB at a time paid a hand-off and its wake-ups
# per request (bench/miss_profile.py's CPU table). Linux's NFS client read 15 x rsize ahead (15 MiB) before 5.4.
# At 8 MiB a stream of 1 MiB requests was topped up with ~3 MiB left ahead, and caught up with the 4 MiB batch in
# flight at its start (a batch's reads come back together) about every 8 MiB: 74-80 of 512 requests waited 0.07-0.09 s
# of a 0.37-0.39 s pass; at 16 MiB 43-59 waited 0.04-0.05 s (3 bench/coldpath.py runs, 1-9 repeats each, issue 13)
READAHEAD_MAX = 16 << 20
PARALLEL_PART = 256 << 10  # a critical-path read larger than this is split into parts read in parallel
PARALLEL_MAX = 4
BATCH_BYTES = 4 << 20  # background bytes handed to one worker thread at a time
# one background pread at most (a block read whole keeps a view of its read: this bounds what one pins); at least
# BLOCK_SIZE, so that a block read ahead whole is one read and one view
READ_MAX = 1 << 20
RUNNERS = 2  # background runner tasks (each one worker thread at a time)
GATHER = 0.005  # seconds background work that no stream waits for gathers before its hand-off (a batch, not a hop per chunk)
HANDLES_MAX = 64  # the fetcher's own backing handles, least recently used closed first


@dataclasses.dataclass(slots=True)
class Reader:
    """One read of one open file, as the fetcher sees it (built by the cache per request)."""

    ino: int  # the file's identity in the cache
    path: str  # a backing path to open it by, for background reads (checked against `ino`)
    handle: Any  # the open file's backing handle: used only during the request
    stream: Hashable  # the open file, for sequential detection
    size: int | None  # the file's size as last seen (readahead stops there), None if not known
    stamp: Callable[[], Hashable | None]  # the file's content stamp now; None while a write is in flight
    # complete chunks a request touched, (chunk, bytes) each, for admission (read-only), all in one call, with those of
    # them admission took at an earlier touch; returns the chunks not taken: offered again at their next touch.
    # None: admission wants nothing of this file now (nothing offered)
    offer: Offer | None
    held: Callable[[int], bool] = lambda chunk: False  # the cache holds this chunk already: readahead skips it
    # which of chunks first..last the cache holds, in one look (one index scan, not a lookup per chunk); None: ask `held`
    held_range: Callable[[int, int], set[int]] | None = None

    def held_in(self, first: int, last: int) -> set[int]:
        """Which of chunks first..last the cache holds: one look for them all when the cache gives one."""
        if self.held_range is not None:
            return self.held_range(first, last)
        return {c for c in range(first, last + 1) if self.held(c)}


class _Block:
    """A buffered block: its bytes; which pages are read (`valid`), being read (`loading`), for the background to read
    (`want`); which of its chunks a request read (`touched`) and admission took (`offered`)."""

    __slots__ = (
        "base", "block", "data", "done", "held", "ino", "length", "loading", "offer", "offered", "part_of", "parts", "path",
        "stamp", "stamp_now", "touched", "valid", "want",
    )

    def __init__(self, r: Reader, block: int, stamp: Hashable) -> None:
        self.ino = r.ino
        self.block = block
        self.path = r.path
        self.stamp = stamp  # the file's stamp when this block was created
        self.stamp_now = r.stamp
        self.offer = r.offer
        # the bytes: a bytearray filled page by page, or, when one read brought the whole block, a view of
        # that read's (immutable) bytes, `base` = (those bytes, the block's offset in them): no copy made
        self.data: bytearray | memoryview | None = None
        self.base: tuple[bytes, int] | None = None
        # pages read before `data` exists: (pages, a read's bytes, the block's offset in them). A 4 KiB miss keeps
        # its read's bytes here rather than touching a fresh buffer (first touch of memory is slow here: ~0.43 GiB/s);
        # a chunk read out of them, or offered, is copied out of them alone (`_assemble`); only a block complete in
        # parts is copied into one buffer of its own, once, when a request reads from it (`_materialize`)
        self.parts: list[tuple[int, bytes, int]] = []
        # page -> the index in `parts` of the read that brought it: a request's pages are found in one look each, not
        # by a walk over every part (a block of a random workload gathers up to one part per page)
        self.part_of: dict[int, int] = {}
        self.valid = 0  # bit p: page p is read (or known to lie beyond end of file)
        self.held = 0  # the pages the buffer's bound counts for this block: every page ever read, being read or wanted
        self.loading = 0  # bit p: a read of page p is in flight
        self.want = 0  # bit p: the background reads page p when it takes this block (readahead, the rest of a stream's chunk)
        self.length: int | None = None  # bytes before end of file, once a read came back short
        self.done: list[tuple[int, trio.Event]] = []  # (pages, set when their read ends)
        self.touched = 0  # bit i: a request read from chunk i of the block (offered when complete)
        self.offered = 0  # bit i: admission took chunk i

    def current(self) -> bool:
        """Whether the file's content is still the one this block's bytes were read from."""
        return self.stamp_now() == self.stamp


@dataclasses.dataclass(slots=True)
class _Stream:
    """Sequential detection for one open file."""

    next: int = -1  # where the next sequential request would start
    run: int = 0  # sequential requests in a row
    ahead: int = 0  # readahead has been queued up to here
    last: tuple[int, int] = (-1, -1)  # the last request noted, (offset, end)


class Fetcher:
    """Chunks from the backing for cache misses (see the module docstring)."""

    def __init__(
        self,
        backing: OffLoop,
        *,
        chunk_size: int = CHUNK_SIZE,
        block_size: int = BLOCK_SIZE,
        page_size: int = PAGE_SIZE,
        buffer_bytes: int = BUFFER_BYTES,
        readahead_max: int = READAHEAD_MAX,
        parallel_part: int = PARALLEL_PART,
        runners: int = RUNNERS,
    ) -> None:
        if chunk_size % page_size or block_size % chunk_size or block_size > READ_MAX:
            raise ValueError(f"a block ({block_size}) is whole chunks ({chunk_size}) of whole pages ({page_size}), at most {READ_MAX}")
        self.backing = backing
        self.cs = chunk_size
        self.bs = block_size
        self.ps = page_size
        self.cpb = block_size // chunk_size  # chunks per block
        self.ppc = chunk_size // page_size  # pages per chunk
        self.ppb = block_size // page_size  # pages per block
        self.full = (1 << self.ppb) - 1
        self.chunk_full = (1 << self.ppc) - 1
        # the bound is on bytes, not blocks: a boot's scattered small reads each make a block entry of a few pages
        # (qcow2 tables, directories), and a bound of 64 blocks let them push out the base image's whole blocks
        self.buffer_bytes = max(buffer_bytes, block_size)
        self._bytes = 0  # the pages counted (`_Block.held`) over the buffered blocks, in bytes
        self.readahead_max = readahead_max
        self.parallel_part = parallel_part
        self.runners = runners
        self.counters = FetchStats()
        self._chunks: collections.OrderedDict[tuple[int, int], _Block] = collections.OrderedDict()  # (ino, block) -> entry
        self._streams: dict[Hashable, _Stream] = {}
        self._open: collections.Counter[int] = collections.Counter()  # ino -> open streams seen
        self._queue: collections.OrderedDict[tuple[int, int], _Block] = collections.OrderedDict()
        self._queued = trio.Event()
        self._hurry = trio.Event()  # set while queued work is readahead or the rest of a sequential stream's chunk
        self._handles: collections.OrderedDict[int, Any] = collections.OrderedDict()  # ino -> our own handle
        self._to_close: list[Any] = []
        # Set by the cache when admission takes whatever is offered (`--admit inclusive`): whether the writer would
        # take a chunk now. While it says no, the complete chunks a touch would offer are counted to `refused`, no
        # offer is built (it would be refused whole), and they are offered again at their next touch, as refused
        # ones are. None: every offer is made (second chance sees each read, admitting or not). A cold stream
        # outruns the writer, which takes about one chunk in eight then: building and refusing the rest kept
        # `_offer` 59 ms of a 0.58 s cold 1 GiB stream on the loop (wall), 29 ms with the count.
        self.room: Callable[[], bool] | None = None
        self.refused: Callable[[int], None] = lambda chunks: None

    # ---- the critical path --------------------------------------------------
    async def read(self, r: Reader, needs: list[tuple[int, int, int]]) -> dict[int, memoryview]:
        """For each (chunk, lo, hi): a view `v` of the chunk with `v[lo:hi]` its bytes (shorter at end of file)."""
        stamp = r.stamp()
        if stamp is None:
            return await self._direct(r, needs)
        cs, cpb = self.cs, self.cpb
        wanted: dict[int, list[int]] = {}  # block -> [the pages this request needs, its chunks (bits)]
        for c, lo, hi in needs:
            b, i = divmod(c, cpb)
            w = wanted.get(b)
            if w is None:
                w = wanted[b] = [0, 0]
            w[0] |= self._pages(i * cs + lo, i * cs + hi)
            w[1] |= 1 << i
        urgent = self._note_stream(r, needs[0][0] * cs + needs[0][1], needs[-1][0] * cs + needs[-1][2])
        entries = {b: self._entry(r, b, stamp) for b in wanted}
        spans = [(entries[b], w[1]) for b, w in wanted.items()]
        for e, bits in spans:
            e.touched |= bits
        while True:
            mine: list[tuple[_Block, int, int]] = []  # (entry, block, pages this request reads)
            waits: list[trio.Event] = []
            for b, (pages, _) in wanted.items():
                e = entries[b]
                missing = pages & ~e.valid
                if not missing:
                    continue
                busy = missing & e.loading
                if busy:
                    waits += [ev for p, ev in e.done if p & busy]
                own = missing & ~e.loading
                if own:
                    mine.append((e, b, own))
            if not mine and not waits:
                break
            if len(mine) < len(wanted) or waits:
                self.counters.buffer_hits += 1
            events = [self._claim(e, pages) for e, _, pages in mine]
            self._queue_rest(spans, urgent)
            if mine:
                await self._read_now(r, mine, events)
            if waits:
                await self._wait(waits)
        self._queue_rest(spans, urgent)
        out: dict[int, memoryview] = {}
        for c, lo, hi in needs:
            b, i = divmod(c, cpb)
            e = entries[b]
            at = i * cs
            end = max(0, hi if e.length is None else min(hi, e.length - at))
            if e.parts and e.valid == self.full:
                self._materialize(e)  # complete, in parts: into one buffer once, not a copy per request
            if e.parts:
                out[c] = self._assemble(e, at, end, own=len(needs) == 1)
            elif e.data is None:
                out[c] = memoryview(b"")
            elif e.base is not None:
                out[c] = e.data[at : at + end]  # a view of a read's immutable bytes
            elif len(needs) == 1:
                # the caller may hand this one piece on as the answer: give it bytes of its own, not our buffer
                out[c] = memoryview(bytes(lo) + e.data[at + lo : at + end])
            else:
                out[c] = memoryview(e.data).toreadonly()[at : at + end]  # the caller joins the pieces at once
        self._offer(spans, r.offer)
        return out

    async def read_span(self, r: Reader, offset: int, size: int, *, noted: bool = False) -> memoryview | None:
        """A request none of whose bytes are buffered or being read: one read, its bytes returned without a copy.

        Also a request wholly inside one earlier read's bytes (readahead): a view of them, once the reads in
        flight for it have come back (a sequential stream usually finds its readahead still loading). Anything
        else (some pages buffered, some not; a write in flight) is None: use `read`.
        `noted`: this request was counted for sequential detection already (it waited for readahead).
        """
        stamp = r.stamp()
        if stamp is None or size <= 0:
            return None
        bs = self.bs
        first, last = offset // bs, (offset + size - 1) // bs
        if first == last:
            e = self._chunks.get((r.ino, first))
            lo = offset - first * bs
            if e is None:
                if not noted:
                    # (the common cold case: a request inside one block nobody has read or queued)
                    return await self._read_fresh(r, [(first, lo, lo + size)], offset, size, stamp)
            elif e.stamp == stamp:
                if e.base is not None:
                    # (a stream's request inside a block read whole: its view, without the lists below)
                    return self._view(r, [(first, e, self._chunk_bits(lo, lo + size))], offset, size, noted, e.base[0], e.base[1] + lo)
                pages = _covering(lo, lo + size, self.ps)
                if not (e.valid | e.loading) & pages:
                    if not noted:
                        # (a random request in a block others read pages of: none of its own pages there yet)
                        return await self._read_fresh(r, [(first, lo, lo + size)], offset, size, stamp)
                elif e.valid & pages == pages:
                    return self._buffered(r, first, e, lo, offset, size, noted)
            found = [e]  # (looked up once)
        else:
            found = [self._chunks.get((r.ino, b)) for b in range(first, last + 1)]
        needs = [(b, offset - b * bs if b == first else 0, offset + size - b * bs if b == last else bs) for b in range(first, last + 1)]
        found = [e if e is not None and e.stamp == stamp else None for e in found]
        e0 = found[0]
        base = e0.base if e0 is not None else None
        if base is not None and all(
            e is not None and e.base is not None and e.base[0] is base[0] and e.base[1] == base[1] + i * bs for i, e in enumerate(found)
        ):
            views = [(b, e, self._chunk_bits(lo, hi)) for (b, lo, hi), e in zip(needs, found, strict=True)]
            return self._view(r, views, offset, size, noted, base[0], base[1] + needs[0][1])  # type: ignore[arg-type]
        if any(e is not None and (e.valid | e.loading) & self._pages(lo, hi) for e, (_, lo, hi) in zip(found, needs, strict=True)):
            waits = None if noted else self._in_flight(found, needs)
            if not waits:
                return None
            # every page it needs is buffered or being read: wait for those reads (as `read` would), then look
            # again: readahead read in requests' sizes serves the request as one view, no copy, no join
            self._note_stream(r, offset, offset + size)  # before waiting: the stream's next readahead goes out meanwhile
            await self._wait(waits)
            return await self.read_span(r, offset, size, noted=True)
        if noted:
            return None
        return await self._read_fresh(r, needs, offset, size, stamp)

    def _view(
        self, r: Reader, blocks: list[tuple[int, _Block, int]], offset: int, size: int, noted: bool, data: bytes, at: int
    ) -> memoryview:
        """`read_span` of a request wholly inside one read's bytes (`data`, the request's first byte at `at`), over
        `blocks` ((block, entry, the request's chunks in it) each): a view of them, no copy."""
        self._served(r, blocks, offset, size, noted)
        return memoryview(data)[at : at + size]

    def _served(self, r: Reader, blocks: list[tuple[int, _Block, int]], offset: int, size: int, noted: bool) -> bool:
        """What a request the buffer answers does to it, over `blocks` ((block, entry, the request's chunks in it)
        each): counted, its entries made young, its chunks touched, the stream noted (unless `noted`: done before it
        waited), its complete chunks offered. Returns whether the stream is sequential."""
        self.counters.buffer_hits += 1
        chunks = self._chunks
        for b, e, bits in blocks:
            chunks.move_to_end((r.ino, b))  # the LRU's young end (found there just now, its stamp current)
            e.touched |= bits
        # (its readahead may evict the oldest entries: not these, just moved)
        urgent = False if noted else self._note_stream(r, offset, offset + size)
        self._offer([(e, bits) for _, e, bits in blocks], r.offer)
        return urgent

    def _buffered(self, r: Reader, b: int, e: _Block, lo: int, offset: int, size: int, noted: bool) -> memoryview:
        """`read_span` of a request inside block `b` (entry `e`, of the file's current content, not read whole by one
        read) all of whose pages are read: its bytes, copied once (as `read` answers it, without its lists)."""
        end = lo + size if e.length is None else max(lo, min(lo + size, e.length))
        if e.parts and e.valid == self.full:
            self._materialize(e)  # complete, in parts: into one buffer once, not a copy per request
        if e.parts:
            out = self._assemble(e, lo, end - lo)
        elif e.data is None:
            out = memoryview(b"")  # (every page it asked for lies beyond end of file)
        else:
            out = memoryview(bytes(memoryview(e.data)[lo:end]))
        bits = _covering(lo, lo + size, self.cs)
        urgent = self._served(r, [(b, e, bits)], offset, size, noted)
        self._queue_rest(((e, bits),), urgent)  # (a block not read whole: the rest of a stream's chunk may be unread)
        return out

    async def _read_fresh(self, r: Reader, needs: list[tuple[int, int, int]], offset: int, size: int, stamp: Hashable) -> memoryview:
        """`read_span` of a request none of whose pages is buffered or being read: one read, a view of its bytes."""
        ps, cs = self.ps, self.cs
        urgent = self._note_stream(r, offset, offset + size)
        start = offset // ps * ps
        end = -(-(offset + size) // ps) * ps
        # (plain loops, not comprehensions: most requests are one block, and a comprehension is a call of its own)
        fills: list[tuple[_Block, int, int]] = []  # (entry, block, the request's pages in it)
        spans: list[tuple[_Block, int]] = []  # (entry, the request's chunks in it)
        for b, lo, hi in needs:
            e = self._entry(r, b, stamp)
            bits = _covering(lo, hi, cs)
            e.touched |= bits
            fills.append((e, b, _covering(lo, hi, ps)))
            spans.append((e, bits))
        head = self.backing.pread_cached(r.handle, start, end - start)
        # the host page cache held it all: read on the loop with nothing awaited, so no neighbour can come between
        # the entries' creation and their filling (no claim, no event to wait on); else claim, then read the rest
        claims = None
        if head is None or len(head) != end - start:
            claims = []
            for e, _, pages in fills:
                claims.append(self._claim(e, pages))
            self._queue_rest(spans, urgent)
        try:
            data = head if claims is None else await self.backing.pread_rest(r.handle, start, end - start, head)
            for e, b, pages in fills:
                self._fill(e, b, pages, start, data, end - start)
        finally:
            if claims is not None:
                for (e, _, pages), ev in zip(fills, claims, strict=True):
                    self._release(e, pages, ev)
        self.counters.critical_reads += 1
        self.counters.critical_bytes += end - start
        self._queue_rest(spans, urgent)
        self._offer(spans, r.offer)
        return memoryview(data)[offset - start : offset - start + size]

    async def _wait(self, waits: list[trio.Event]) -> None:
        """Wait for reads in flight that a request needs (readahead it caught up with, or a neighbour's read)."""
        t0 = time.perf_counter()
        for ev in waits:
            await ev.wait()
        self.counters.waited_requests += 1
        self.counters.waited_seconds += time.perf_counter() - t0

    def read_ahead(self, ino: int, offset: int, stamp: Hashable) -> bool:
        """Whether the chunk at byte `offset` of `ino` is readahead (of content `stamp`: read, being read or queued)
        no request has read yet: a request starting there is `read_span`'s, with no more looks in the store (it was
        not held when read ahead; a re-read of a chunk goes the usual way, a hit if it is held)."""
        e = self._chunks.get((ino, offset // self.bs))
        if e is None or e.stamp != stamp:
            return False
        i = offset % self.bs // self.cs
        return not e.touched >> i & 1 and e.want >> i * self.ppc & self.chunk_full != 0

    def buffered(self, ino: int, offset: int, size: int, stamp: Hashable) -> bool:
        """Whether a request inside one block of `ino` finds all its pages there (of content `stamp`), read or being
        read by one read of the whole block: `read_span` answers it with a view of that read, and the cache need
        not look in the store first (what the buffer holds is the file's current content, and no backing read is
        made for it). A stream whose requests are not chunk-aligned starts each request in a chunk its previous
        request touched, so `read_ahead` does not take it. Not when admission took one of the request's chunks:
        that chunk is the store's (or its queue's) now, and its read a hit, counted as one."""
        b = offset // self.bs
        if size <= 0 or (offset + size - 1) // self.bs != b:
            return False
        e = self._chunks.get((ino, b))
        if e is None or e.stamp != stamp:
            return False
        lo = offset - b * self.bs
        if e.offered & self._chunk_bits(lo, lo + size):
            return False  # admission took one of its chunks: the store or its queue answers for it, a hit
        if e.base is not None:
            return True  # read whole by one read
        if e.data is not None or e.parts:
            return False  # read in parts: never one view
        pages = self._pages(lo, lo + size)
        return pages & e.loading == pages  # nothing read yet, the request's pages being read (readahead, whole blocks)

    def _in_flight(self, found: list[_Block | None], needs: list[tuple[int, int, int]]) -> list[trio.Event] | None:
        """The reads to wait for when every page of `needs` is buffered or being read and some are being read; else None."""
        waits: list[trio.Event] = []
        for e, (_, lo, hi) in zip(found, needs, strict=True):
            if e is None:
                return None
            need = self._pages(lo, hi) & ~e.valid
            if need & ~e.loading:
                return None  # some page is neither: `read` reads it
            if need:
                waits += [ev for pages, ev in e.done if pages & need and ev not in waits]
        return waits or None

    def _pages(self, lo: int, hi: int) -> int:
        """The page bits covering bytes [lo, hi) of a block."""
        return _covering(lo, hi, self.ps)

    def _chunk_bits(self, lo: int, hi: int) -> int:
        """The chunk bits covering bytes [lo, hi) of a block."""
        return _covering(lo, hi, self.cs)

    def _chunk_pages(self, bits: int) -> int:
        """The page bits of the chunks in `bits`."""
        pages, ppc = 0, self.ppc
        for first, count in _bit_runs(bits):
            pages |= ((1 << count * ppc) - 1) << first * ppc
        return pages

    def _entry(self, r: Reader, b: int, stamp: Hashable) -> _Block:
        key = (r.ino, b)
        e = self._chunks.get(key)
        if e is not None and e.stamp != stamp:
            self.counters.stale_dropped += 1
            del self._chunks[key]
            self._forget(e)
            e = None
        if e is None:
            e = self._chunks[key] = _Block(r, b, stamp)
            if self._bytes > self.buffer_bytes:
                self._shrink()
        else:
            self._chunks.move_to_end(key)
        return e

    def _count(self, e: _Block, pages: int) -> None:
        """Pages of e read, being read or wanted now: the buffer's bound counts them (once) while e is buffered."""
        new = pages & ~e.held
        if new and e.held >= 0:
            e.held |= new
            self._bytes += new.bit_count() * self.ps
            if self._bytes > self.buffer_bytes:
                self._shrink()

    def _forget(self, e: _Block) -> int:
        """e left the buffer: its pages no longer count (reads still in flight for it fill it for their requests).
        Returns the bytes it counted."""
        freed = max(e.held, 0).bit_count() * self.ps
        self._bytes -= freed
        e.held = -1
        return freed

    def _shrink(self) -> None:
        """Evict the least recently used blocks until the buffer is within its bound (the youngest always stays).

        Any block may go, one being read or read from included: whoever holds it still fills it and reads it."""
        chunks = self._chunks
        while self._bytes > self.buffer_bytes and len(chunks) > 1:
            key, old = chunks.popitem(last=False)
            self._queue.pop(key, None)
            self.counters.evicted_blocks += 1
            self.counters.evicted_bytes += self._forget(old)

    def _claim(self, e: _Block, pages: int, ev: trio.Event | None = None) -> trio.Event:
        self._count(e, pages)
        e.loading |= pages
        ev = trio.Event() if ev is None else ev
        e.done.append((pages, ev))
        return ev

    def _release(self, e: _Block, pages: int, ev: trio.Event) -> None:
        """A read of `pages` ended (filled or failed): waiters look again."""
        e.loading &= ~pages
        done = e.done
        if len(done) == 1:  # (the usual case, without a comprehension's call)
            if done[0][1] is ev:
                e.done = []
        else:
            e.done = [(p, x) for p, x in done if x is not ev]
        ev.set()

    def _fill(self, e: _Block, b: int, pages: int, start: int, data: bytes, asked: int) -> None:
        """Copy the bytes of a read that started at file offset `start` into e's `pages`."""
        if pages & ~e.held:
            self._count(e, pages)  # (claimed before, but for a read of the page cache made without a claim)
        base = b * self.bs
        if len(data) < asked:  # end of file inside this read
            eof = start + len(data)
            length = min(max(eof - base, 0), self.bs)
            e.length = length if e.length is None else min(e.length, length)
        at = base - start
        if pages == self.full and not e.valid and e.data is None and len(data) >= at + self.bs and isinstance(data, bytes):
            e.data = memoryview(data)[at : at + self.bs]  # the whole block from one read: keep a view, copy nothing
            e.base = (data, at)
            e.valid = self.full
            return
        if e.data is None and isinstance(data, bytes):
            part_of, i = e.part_of, len(e.parts)
            e.parts.append((pages, data, at))
            for first, count in _bit_runs(pages):
                for page in range(first, first + count):
                    part_of[page] = i
        else:
            self._materialize(e)
            assert isinstance(e.data, bytearray)
            self._copy(e.data, pages, data, at)
        e.valid |= pages

    def _materialize(self, e: _Block) -> None:
        """Give e a buffer of its own holding every page read so far: when a read brings bytes that are not `bytes`
        (`parts` keep a read's own bytes otherwise), and when a block read in parts is complete and read out (one
        copy of it, not one per request)."""
        if e.data is None:
            e.data = bytearray(self.bs)
            self._count(e, self.full)  # (a whole block's buffer, whatever its pages)
        assert isinstance(e.data, bytearray) or not e.parts
        for pages, data, at in e.parts:
            self._copy(e.data, pages, data, at)  # type: ignore[arg-type]
        e.parts = []
        e.part_of = {}

    def _assemble(self, e: _Block, at: int, n: int, *, own: bool = True) -> memoryview:
        """Bytes [at, at + n) of a block read in parts (pages not read are zeros): as bytes of their own (`own`: an
        answer is immutable, as a read's own bytes are), else a read-only view of a buffer (the caller joins it)."""
        if n <= 0:
            return memoryview(b"")
        ps, parts, part_of = self.ps, e.parts, e.part_of
        first, last = at // ps, (at + n - 1) // ps
        i = part_of.get(first, -1)
        if i >= 0 and all(part_of.get(p, -1) == i for p in range(first + 1, last + 1)):
            _, data, off = parts[i]  # (the usual case: one read holds every page asked for: one copy, no zeroing)
            piece = bytes(memoryview(data)[off + at : off + at + n])
            if len(piece) == n:
                return memoryview(piece)
        buf = bytearray(n)
        p = first
        while p <= last:  # runs of pages from one read, each copied at once; pages not read stay zeros
            i, q = part_of.get(p, -1), p
            while q < last and part_of.get(q + 1, -1) == i:
                q += 1
            if i >= 0:
                _, data, off = parts[i]
                lo, hi = max(at, p * ps), min(at + n, (q + 1) * ps)
                piece = memoryview(data)[off + lo : off + hi]
                buf[lo - at : lo - at + len(piece)] = piece
            p = q + 1
        return memoryview(bytes(buf)) if own else memoryview(buf).toreadonly()

    def _copy(self, buf: bytearray, pages: int, data: bytes, at: int, shift: int = 0) -> None:
        """Pages `pages` of a read's bytes (the block's offset in them: `at`) into `buf`, which holds the block from `shift` on."""
        view = memoryview(data)
        room = len(buf)
        for first, count in _bit_runs(pages):
            lo = first * self.ps
            piece = view[at + lo : at + lo + count * self.ps]
            dst = lo - shift
            if dst + len(piece) > room:
                piece = piece[: max(0, room - dst)]
            buf[dst : dst + len(piece)] = piece

    async def _read_now(self, r: Reader, mine: list[tuple[_Block, int, int]], events: list[trio.Event]) -> None:
        """Read this request's own pages with its own handle: contiguous runs, large ones in parallel parts."""
        pieces = [(e, b, pages, ev) for (e, b, pages), ev in zip(mine, events, strict=True)]
        parts = self._split(self._runs(pieces))
        try:
            if len(parts) == 1:
                start, size, _ = parts[0]
                self._filled(parts[0], await self.backing.pread(r.handle, start, size))
            else:
                async with trio.open_nursery() as nursery:
                    for part in parts:
                        nursery.start_soon(self._read_part, r.handle, part)
        finally:
            for e, _, pages, ev in pieces:
                self._release(e, pages, ev)
        self.counters.critical_reads += len(parts)
        self.counters.critical_bytes += sum(size for _, size, _ in parts)

    async def _read_part(self, handle: Any, part: tuple[int, int, list[tuple[_Block, int, int]]]) -> None:
        # (in a thread whatever the page cache holds: the parts of a large read are copied in parallel, off the loop)
        self._filled(part, await self.backing.run(self.backing.sync.pread, handle, part[0], part[1]))

    def _filled(self, part: tuple[int, int, list[tuple[_Block, int, int]]], data: bytes) -> None:
        start, size, members = part
        for e, b, pages in members:
            self._fill(e, b, pages, start, data, size)

    def _runs(self, pieces: list[tuple[_Block, int, int, Any]]) -> list[tuple[int, int, list[tuple[_Block, int, int]]]]:
        """Contiguous byte runs over (entry, block, pages): [(start, size, [(entry, block, contiguous pages)])]."""
        runs: list[tuple[int, int, list[tuple[_Block, int, int]]]] = []
        for e, b, pages, _ in sorted(pieces, key=lambda x: x[1]):
            for first, count in ((0, self.ppb),) if pages == self.full else _bit_runs(pages):
                start = b * self.bs + first * self.ps
                bits = ((1 << count) - 1) << first
                if runs and runs[-1][0] + runs[-1][1] == start:
                    s, n, members = runs[-1]
                    runs[-1] = (s, n + count * self.ps, [*members, (e, b, bits)])
                else:
                    runs.append((start, count * self.ps, [(e, b, bits)]))
        return runs

    def _split(self, runs: list[tuple[int, int, list[tuple[_Block, int, int]]]]) -> list[tuple[int, int, list[tuple[_Block, int, int]]]]:
        """Runs larger than `parallel_part` cut on page boundaries into up to PARALLEL_MAX parts read in parallel."""
        if self.parallel_part <= 0:
            return runs
        out = []
        ps, bs = self.ps, self.bs
        for start, size, members in runs:
            n = min(PARALLEL_MAX, -(-size // self.parallel_part))
            if n <= 1:
                out.append((start, size, members))
                continue
            per = -(-size // (n * ps)) * ps
            for cut in range(start, start + size, per):
                stop = min(cut + per, start + size)
                group = []
                for e, b, bits in members:
                    lo, hi = max(cut - b * bs, 0), min(stop - b * bs, bs)
                    if lo < hi and bits & self._pages(lo, hi):
                        group.append((e, b, bits & self._pages(lo, hi)))
                out.append((cut, stop - cut, group))
        return out

    async def _direct(self, r: Reader, needs: list[tuple[int, int, int]]) -> dict[int, memoryview]:
        """A write is in flight: read exactly the request, keep nothing."""
        first, last = needs[0][0], needs[-1][0]
        start = first * self.cs + needs[0][1]
        end = last * self.cs + needs[-1][2]
        data = await self.backing.pread(r.handle, start, end - start)
        self.counters.critical_reads += 1
        self.counters.critical_bytes += end - start
        out = {}
        for c, lo, hi in needs:
            buf = bytearray(hi)
            piece = data[c * self.cs + lo - start : c * self.cs + hi - start]
            buf[lo : lo + len(piece)] = piece
            out[c] = memoryview(buf)[: lo + len(piece)]
        return out

    def _offer(self, spans: Iterable[tuple[_Block, int]], offer: Offer | None, *, background: bool = False) -> None:
        """Offer the complete chunks among `spans` ((entry, chunk bits) each) that a request touched, still of the
        file's current content.

        A request offers the chunks it read at each touch, with its own `offer`, in one call (admission sees every
        read a guest makes, as when every re-read was a miss; the cache's offer skips chunks it already holds: it
        is told which of them admission took at an earlier touch, the only ones it can hold);
        `background` work offers each touched chunk once, with the creating request's offer, until taken. An offer
        of None (admission wants nothing of the file: no guest reads it) offers nothing; nor does any offer while
        `room` says the writer takes nothing (its chunks are counted as refused).
        """
        if offer is None and not background:
            return
        cs, ppc, cf, cpb, chunks = self.cs, self.ppc, self.chunk_full, self.cpb, self._chunks
        full = self.room is not None and not self.room()  # the writer takes nothing now: count, build nothing
        refused = 0
        groups: dict[int, tuple[Offer, list[tuple[_Block, int]], list[tuple[int, bytes | memoryview]], list[int]]] = {}
        stamps: dict[int, Hashable] = {}  # ino -> its stamp now (one look per file)
        for e, bits in spans:
            fn = e.offer if background else offer
            if background:
                bits &= ~e.offered
            if fn is None or not bits or chunks.get((e.ino, e.block)) is not e:
                continue  # not wanted, taken already, or replaced or evicted
            now = None
            while bits:
                low = bits & -bits
                bits ^= low
                i = low.bit_length() - 1
                if e.valid >> i * ppc & cf != cf:
                    continue  # not complete
                if now is None:
                    now = stamps[e.ino] if e.ino in stamps else stamps.setdefault(e.ino, e.stamp_now())
                    if now != e.stamp:
                        break  # the file changed since
                at = i * cs
                length = cs if e.length is None else min(cs, e.length - at)
                if length <= 0:
                    continue
                if full:
                    refused += not e.offered >> i & 1  # (one taken at an earlier touch is held or queued: not refused)
                    continue
                # a view of a read's immutable bytes is offered as it is; bytes of ours are copied
                if e.base is not None:
                    data: bytes | memoryview = e.data[at : at + length]  # type: ignore[index]
                elif e.parts:
                    data = self._assemble(e, at, length)
                elif e.data is not None:
                    data = bytes(e.data[at : at + length])
                else:
                    continue
                group = groups.get(id(fn))
                if group is None:
                    group = groups[id(fn)] = (fn, [], [], [])
                group[1].append((e, i))
                group[2].append((e.block * cpb + i, data))
                if e.offered >> i & 1:
                    group[3].append(e.block * cpb + i)
        if refused:
            self.refused(refused)
        for fn, members, pieces, taken in groups.values():
            not_taken = fn(pieces, taken)
            for e, i in members:
                if e.block * cpb + i not in not_taken:
                    e.offered |= 1 << i

    # ---- sequential streams and background work -----------------------------
    def _note_stream(self, r: Reader, offset: int, end: int) -> bool:
        """Sequential detection per open file; a sequential stream gets readahead queued past its request [offset, end).

        True when the stream is sequential (its background work is waited for soon).
        """
        size = end - offset
        s = self._streams.get(r.stream)
        if s is None:
            s = self._streams[r.stream] = _Stream()
            self._open[r.ino] += 1
        if s.last == (offset, end):
            # the same request again (`read` after `read_span` declined it, or a guest reading one range twice in
            # a row): no step forward, so it neither makes a stream sequential nor reads further ahead
            return s.run > 0
        s.last = (offset, end)
        # a little slack: a guest's queue depth can reorder neighbouring requests
        if s.next >= 0 and s.next - size <= offset <= s.next + size:
            s.run += 1
        else:
            s.run = 0
            s.ahead = 0
        s.next = max(s.next, end) if s.run else end
        if s.run == 0:
            return False
        if self.readahead_max <= 0:
            return True
        window = min(self.readahead_max, max(size, 128 << 10) << min(s.run, 4))
        # to a block's end: a block read ahead whole is one read and one view of it; a window ending inside a block
        # left the rest of that block to the next top-up, a second read, and every request in it a copy
        limit = -(-(end + window) // self.bs) * self.bs
        if r.size is not None:
            limit = min(limit, r.size)  # readahead stops at end of file
        start = max(s.ahead, end)
        if start >= limit or s.ahead - end > window // 2:
            return True  # (topped up once half the window is read: half as many hand-offs as a top-up per request)
        s.ahead = limit
        stamp = r.stamp()
        if stamp is None:
            return True
        cs, cpb, ppc = self.cs, self.cpb, self.ppc
        first, last = start // cs, (limit - 1) // cs  # the chunks read ahead: whole ones, as admission takes them
        # one look at the index for them all
        held = r.held_in(first, last)
        ino, buffered, queue, cf = r.ino, self._chunks, self._queue, self.chunk_full
        queued = 0
        for b in range(first // cpb, last // cpb + 1):
            lo, hi = max(first, b * cpb), min(last, b * cpb + cpb - 1)  # its chunks in the window
            if not held or not any(c in held for c in range(lo, hi + 1)):
                pages = ((1 << (hi - lo + 1) * ppc) - 1) << (lo - b * cpb) * ppc
                n = hi - lo + 1
            else:  # a hit when the stream gets there: reading it again would be bytes nobody needs
                pages = n = 0
                for c in range(lo, hi + 1):
                    if c not in held:
                        pages |= cf << (c - b * cpb) * ppc
                        n += 1
                if not pages:
                    continue
            key = (ino, b)
            e = buffered.get(key)
            if e is None:
                e = buffered[key] = _Block(r, b, stamp)  # (as `_entry`; the buffer's bound kept below)
            else:
                e = self._entry(r, b, stamp)  # (replaces it if stale)
                if e.length is not None or not pages & ~(e.valid | e.loading):
                    continue  # ends the file (read to its end already), or read or being read
            e.want |= pages
            self._count(e, pages)
            queue[key] = e
            queued += n
        self._shrink()
        if queued:
            self.counters.readahead_chunks += queued
            self._queued.set()
            self._hurry.set()
        return True

    def _queue_rest(self, spans: Iterable[tuple[_Block, int]], sequential: bool) -> None:
        """Queue the unread pages of the chunks a sequential stream's request touched ((entry, chunk bits) each): it
        reads them next.

        A request that is not part of a sequential stream gets nothing read
        beyond its own pages: the backing never reads more than the guests
        asked for (a chunk whose pages all come to be read is admitted then).
        """
        if not sequential:
            return
        queued = False
        for e, bits in spans:
            pages = self._chunk_pages(bits)
            if pages & ~(e.valid | e.loading) and e.length is None and e.current():
                e.want |= pages
                self._count(e, pages)
                self._queue[(e.ino, e.block)] = e
                queued = True
        if queued:
            self._queued.set()
            self._hurry.set()

    def closed(self, stream: Hashable, ino: int) -> None:
        """An open file closed: forget its stream; the file's last one lets our own handle go."""
        if self._streams.pop(stream, None) is None:
            return
        self._open[ino] -= 1
        if self._open[ino] <= 0:
            del self._open[ino]
            handle = self._handles.pop(ino, None)
            if handle is not None:
                self._to_close.append(handle)
                self._queued.set()

    async def run(self) -> None:
        """The background runners; cancel to stop (our own handles are closed then)."""
        try:
            async with trio.open_nursery() as nursery:
                for _ in range(self.runners):
                    nursery.start_soon(self._runner)
        finally:
            handles = [*self._handles.values(), *self._to_close]
            self._handles.clear()
            self._to_close = []
            with trio.CancelScope(shield=True):
                await self.backing.run(_close_all, self.backing.sync, handles)

    async def _runner(self) -> None:
        while True:
            await self._queued.wait()
            if not self._hurry.is_set():
                with trio.move_on_after(GATHER):
                    await self._hurry.wait()
            work = self._take()
            if work is None:
                self._queued = trio.Event()
                self._hurry = trio.Event()
                continue
            await self._background(*work)

    def _take(self) -> tuple[dict[int, tuple[str, Any]], list[Any], list[_Read]] | None:
        """Claim up to BATCH_BYTES of queued pages: ({ino: (path, our handle or None)}, handles to close, reads)."""
        reads: list[_Read] = []
        files: dict[int, tuple[str, Any]] = {}
        stamps: dict[int, Hashable] = {}  # ino -> its stamp now (one look per file)
        total = 0
        ev = trio.Event()  # one for the whole batch: its reads come back together, in one hand-off
        queue, chunks, full, ppb, bs, ps = self._queue, self._chunks, self.full, self.ppb, self.bs, self.ps
        last: _Read | None = None
        while queue and total < BATCH_BYTES:
            key, e = queue.popitem(last=False)
            if chunks.get(key) is not e or e.length is not None:
                continue  # evicted, or ends the file (already read to its end)
            ino, b = key
            now = stamps[ino] if ino in stamps else stamps.setdefault(ino, e.stamp_now())
            if now != e.stamp:
                continue  # stale since it was queued
            pages = e.want & ~(e.valid | e.loading)
            if not pages:
                continue
            e.loading |= pages  # (as `_claim`)
            e.done.append((pages, ev))
            if ino not in files:
                files[ino] = (e.path, self._handles.get(ino))
            for first, count in ((0, ppb),) if pages == full else _bit_runs(pages):
                start = b * bs + first * ps
                nbytes = count * ps
                member = (e, b, ((1 << count) - 1) << first, ev)
                if last is not None and last.ino == ino and last.start + last.size == start and last.size + nbytes <= READ_MAX:
                    last.size += nbytes
                    last.members.append(member)
                else:
                    last = _Read(ino, start, nbytes, [member])
                    reads.append(last)
                total += nbytes
        if not self._queue:
            self._hurry = trio.Event()
        closing, self._to_close = self._to_close, []
        if not reads and not closing:
            return None
        return files, closing, reads

    async def _background(self, files: dict[int, tuple[str, Any]], closing: list[Any], reads: list[_Read]) -> None:
        """One hand-off: open what needs opening, read everything, close what is done; then fill on the loop."""
        plan = [(rd.ino, rd.start, rd.size) for rd in reads]
        try:
            opened, results = await self.backing.run(_batch, self.backing.sync, files, closing, plan)
        except BaseException:
            for rd in reads:
                for e, _, pages, ev in rd.members:
                    self._release(e, pages, ev)
            raise
        self.counters.background_batches += 1
        for ino, handle in opened.items():
            if ino in self._open:
                self._handles[ino] = handle
                while len(self._handles) > HANDLES_MAX:
                    self._to_close.append(self._handles.popitem(last=False)[1])
            else:
                self._to_close.append(handle)  # its last open file closed meanwhile
        stamps: dict[int, Hashable] = {}  # ino -> its stamp now (the same for every entry of one file)
        events = set()
        touched: dict[int, _Block] = {}  # (an entry may be in two reads of the batch: offered once)
        for rd, got in zip(reads, results, strict=True):
            ok = isinstance(got, bytes)
            if ok:
                self.counters.background_reads += 1
                self.counters.background_bytes += rd.size
            for e, b, pages, ev in rd.members:
                # bytes read while the file's content moved are not kept: nobody asked for them
                if ok:
                    now = stamps[e.ino] if e.ino in stamps else stamps.setdefault(e.ino, e.stamp_now())
                    if now == e.stamp:
                        self._fill(e, b, pages, rd.start, got, rd.size)  # (a whole block read whole: a view of it)
                e.loading &= ~pages
                done = e.done
                e.done = [] if len(done) == 1 and done[0][1] is ev else [(p, x) for p, x in done if x is not ev]
                events.add(ev)
                if e.touched:  # (readahead nobody has asked for yet is offered when a request touches it)
                    touched[id(e)] = e
        self._offer([(e, e.touched) for e in touched.values()], None, background=True)
        for ev in events:
            ev.set()  # (as `_release`: the waiters look again, now that every page of the batch is filled)


@dataclasses.dataclass(slots=True)
class _Read:
    """One background pread: contiguous bytes of one file, over the pages of one or more blocks."""

    ino: int
    start: int
    size: int
    members: list[tuple[_Block, int, int, trio.Event]]  # (entry, block, pages, the claim's event)


def _batch(
    sync: Any, files: dict[int, tuple[str, Any]], closing: list[Any], plan: list[tuple[int, int, int]]
) -> tuple[dict[int, Any], list[Any]]:
    """In a worker thread: open the files that have no handle of ours yet, read, close what is done."""
    handles: dict[int, Any] = {}
    opened: dict[int, Any] = {}
    for ino, (path, handle) in files.items():
        if handle is not None:
            handles[ino] = handle
            continue
        try:
            h = sync.open(path, os.O_RDONLY)
        except OSError as exc:
            log.debug("%s: no background reads: %s", path, exc.strerror)
            continue
        try:
            same = sync.fstat(h).ino == ino
        except OSError:
            same = False
        if not same:
            sync.close(h)  # the name now holds another file
            continue
        handles[ino] = opened[ino] = h
    results: list[Any] = []
    for ino, start, size in plan:
        h = handles.get(ino)
        if h is None:
            results.append(None)
            continue
        try:
            results.append(sync.pread(h, start, size))
        except OSError as exc:
            results.append(exc)
    _close_all(sync, closing)
    return opened, results


def _close_all(sync: Any, handles: list[Any]) -> None:
    for h in handles:
        try:
            sync.close(h)
        except OSError:
            pass


def _covering(lo: int, hi: int, unit: int) -> int:
    """The bits of the `unit`-sized pieces (bit i: bytes [i * unit, (i + 1) * unit)) that bytes [lo, hi) touch."""
    first, last = lo // unit, (hi - 1) // unit
    return ((1 << (last + 1)) - 1) & ~((1 << first) - 1)


def _bit_runs(bits: int) -> list[tuple[int, int]]:
    """Runs of set bits, lowest first: [(first bit, count)]."""
    runs = []
    while bits:
        first = (bits & -bits).bit_length() - 1
        ones = bits >> first
        count = (~ones & (ones + 1)).bit_length() - 1  # the run's length: where its first clear bit is
        runs.append((first, count))
        bits &= ~(((1 << count) - 1) << first)
    return runs
