"""The miss path (fusecache/fetch.py) over a fake backing in memory: no FUSE, no root needed for these.

The fake records every pread (handle, offset, size) and can hold reads at a
gate, which makes the races of the read path happen on purpose.
"""

from __future__ import annotations

import errno
import itertools
import os
import threading
from collections.abc import Callable, Collection
from typing import Any

import hypothesis as hyp
import hypothesis.strategies as hst
import trio

from fusecache.backing import OffLoop
from fusecache.fetch import Fetcher, Reader, _bit_runs
from fusecache.geometry import CHUNK_SIZE as CS
from fusecache.geometry import PAGE_SIZE as PS


class _Handle:
    def __init__(self, ino: int) -> None:
        self.ino = ino
        self.closed = False


class _Stat:
    def __init__(self, ino: int) -> None:
        self.ino = ino


class FakeBacking:
    """Files in memory; every pread is logged; `hold` makes matching reads wait for `release`."""

    description = "fake"

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = {path: bytearray(data) for path, data in files.items()}
        self.inos = {path: n for n, path in enumerate(sorted(files), start=100)}
        self.reads: list[tuple[int, int, int]] = []  # (ino, offset, size)
        self.lock = threading.Lock()
        self.hold: Callable[[int, int], bool] = lambda offset, size: False
        self.gate = threading.Event()
        self.held = threading.Event()  # set once a held read has its bytes and waits
        self.handles: list[_Handle] = []

    def _path(self, ino: int) -> str:
        return next(p for p, i in self.inos.items() if i == ino)

    def open(self, path: str, flags: int) -> _Handle:
        h = _Handle(self.inos[path])
        with self.lock:
            self.handles.append(h)
        return h

    def fstat(self, h: _Handle) -> _Stat:
        return _Stat(h.ino)

    def close(self, h: _Handle) -> None:
        h.closed = True

    def pread(self, h: _Handle, offset: int, size: int) -> bytes:
        if h.closed:
            raise OSError(errno.EBADF, "closed")
        data = bytes(self.files[self._path(h.ino)][offset : offset + size])  # the bytes as they are now
        with self.lock:
            self.reads.append((h.ino, offset, size))
        if self.hold(offset, size):
            self.held.set()
            self.gate.wait(10)
        return data

    def write(self, path: str, offset: int, data: bytes) -> None:
        self.files[path][offset : offset + len(data)] = data

    def read_counts(self, ino: int, size: int) -> list[int]:
        """How many times each page of the file was read from the backing."""
        counts = [0] * (-(-size // PS))
        for i, offset, n in self.reads:
            if i != ino:
                continue
            for p in range(offset // PS, min(len(counts), -(-(offset + n) // PS))):
                counts[p] += 1
        return counts


class File:
    """One open file of the fake, with the cache's file state the fetcher's Reader sees."""

    def __init__(self, backing: FakeBacking, path: str, fh: int = 1) -> None:
        self.backing = backing
        self.path = path
        self.handle = backing.open(path, os.O_RDONLY)
        self.fh = fh
        self.gen = 1
        self.epoch = 0
        self.writing = 0
        self.offers: list[tuple[int, bytes]] = []
        self.held: set[int] = set()  # chunks the cache holds (readahead skips them)

    @property
    def ino(self) -> int:
        return self.handle.ino

    def reader(self, size_known: bool = True) -> Reader:
        size = len(self.backing.files[self.path]) if size_known else None
        return Reader(self.ino, self.path, self.handle, self.fh, size, self.stamp, self.offer, self.held.__contains__)

    def stamp(self) -> Any:
        return None if self.writing else (self.gen, self.epoch)

    def offer(self, pieces: list[tuple[int, bytes]], taken: Collection[int]) -> list[int]:
        self.offers += pieces
        return []


async def read(fetcher: Fetcher, f: File, offset: int, size: int, span: bool = True, **kw: Any) -> bytes:
    """What the cache's read does on a miss: `read_span` when it takes the request, else `read` per chunk."""
    if span:
        got_span = await fetcher.read_span(f.reader(**kw), offset, size)
        if got_span is not None:
            return bytes(got_span)
    first, last = offset // CS, (offset + size - 1) // CS
    needs = [(c, offset - c * CS if c == first else 0, offset + size - c * CS if c == last else CS) for c in range(first, last + 1)]
    got = await fetcher.read(f.reader(**kw), needs)
    out = []
    for c, lo, hi in needs:
        piece = bytes(got[c][lo:hi])
        out.append(piece)
        if len(piece) < hi - lo:
            break
    return b"".join(out)


async def settle(fetcher: Fetcher) -> None:
    """Wait until the background runners have nothing queued or in flight."""
    for _ in range(1000):
        await trio.sleep(0.005)
        if not fetcher._queue and not any(e.loading for e in fetcher._chunks.values()):
            return
    raise AssertionError("background work did not finish")


def run_with_fetcher(backing: FakeBacking, body: Callable[[Fetcher], Any], **kw: Any) -> None:
    async def main() -> None:
        fetcher = Fetcher(OffLoop(backing), **kw)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fetcher.run)
            await body(fetcher)
            nursery.cancel_scope.cancel()

    trio.run(main)


def counted(fetcher: Fetcher) -> int:
    """The bytes the buffer's bound counts, summed afresh over the buffered blocks."""
    return sum(e.held.bit_count() for e in fetcher._chunks.values()) * fetcher.ps


def test_the_buffer_is_bounded_by_bytes_so_scattered_small_reads_keep_whole_blocks():
    """A boot's small scattered reads (a block entry of one page each) do not push a whole block out of a buffer
    that has room for all their bytes; whole blocks beyond the bound do push out the oldest, counted."""
    bs = 4 * CS
    data = os.urandom(64 * bs)
    backing = FakeBacking({"disk.img": data})
    f = File(backing, "disk.img")

    async def body(fetcher: Fetcher) -> None:
        assert await read(fetcher, f, 0, bs) == data[:bs]  # block 0, whole
        for b in range(40, 0, -1):  # 40 blocks of one page each, backwards (no stream): 40 entries, 160 KiB
            at = b * bs + PS * (b % 16)
            assert await read(fetcher, f, at, PS) == data[at : at + PS]
        assert fetcher._bytes == counted(fetcher) == bs + 40 * PS
        assert fetcher.counters.evicted_blocks == 0
        before = len(backing.reads)
        assert await read(fetcher, f, CS, CS) == data[CS : 2 * CS]  # (no longer the stream: no readahead)
        assert len(backing.reads) == before, "a block that fits the buffer's bytes was read again"
        for b in range(41, 49):  # 8 whole blocks more: 2 MiB against the bound of 1 MiB
            assert await read(fetcher, f, b * bs, bs) == data[b * bs : (b + 1) * bs]
        await settle(fetcher)
        assert fetcher._bytes == counted(fetcher) <= 4 * bs
        assert (0, 0) not in {(e.ino - f.ino, e.block) for e in fetcher._chunks.values()}
        assert fetcher.counters.evicted_blocks > 0
        assert fetcher.counters.evicted_bytes >= bs + 40 * PS

    run_with_fetcher(backing, body, block_size=bs, buffer_bytes=4 * bs)


def test_edge_chunks_are_read_from_the_backing_once():
    """128 KiB sequential reads starting at 4 KiB: each byte of the file is read from the backing once, no more."""
    size = 2 << 20
    data = os.urandom(size)
    backing = FakeBacking({"disk.img": data})
    f = File(backing, "disk.img")

    async def body(fetcher: Fetcher) -> None:
        pos = 4096
        while pos < size:
            got = await read(fetcher, f, pos, 128 << 10)
            assert got == data[pos : pos + (128 << 10)]
            pos += len(got)
        await settle(fetcher)

    run_with_fetcher(backing, body)
    counts = backing.read_counts(f.ino, size)
    assert max(counts) == 1, f"pages read more than once: {[p for p, n in enumerate(counts) if n > 1][:10]}"
    assert counts[0] == 0, "the page before the stream's first request was read: nobody asked for it"
    # every chunk read whole was complete once and offered once, with its own bytes (not chunk 0: its first page was never asked for)
    assert sorted({c for c, _ in f.offers}) == list(range(1, size // CS))  # (offered at each request's touch)
    assert all(d == data[c * CS : (c + 1) * CS] for c, d in f.offers)


def test_the_chunks_a_request_completes_are_offered_in_one_call():
    """A 1 MiB request offers its sixteen chunks to admission together (one call, not one per chunk), whether it
    read them itself or found them read ahead; readahead a later request touches is offered with that request."""
    mib = 1 << 20
    data = os.urandom(4 * mib)
    backing = FakeBacking({"disk.img": data})
    f = File(backing, "disk.img")
    calls: list[list[int]] = []

    def offer(pieces: list[tuple[int, bytes]], taken: Collection[int]) -> list[int]:
        calls.append([c for c, _ in pieces])
        f.offers += pieces
        return []

    f.offer = offer  # type: ignore[method-assign]

    async def body(fetcher: Fetcher) -> None:
        for i in range(3):
            assert await read(fetcher, f, i * mib, mib) == data[i * mib : (i + 1) * mib]

    run_with_fetcher(backing, body)
    per = mib // CS
    for i in range(3):
        assert list(range(i * per, (i + 1) * per)) in calls, f"request {i}'s chunks were not offered together: {calls}"
    assert all(d == data[c * CS : (c + 1) * CS] for c, d in f.offers)


def test_a_random_miss_reads_only_its_pages_and_a_chunk_read_whole_is_offered():
    """A 4 KiB miss that is not part of a sequential stream reads its 4 KiB and nothing more; a chunk whose pages
    all come to be read by requests is offered whole, once."""
    data = os.urandom(4 * CS)
    backing = FakeBacking({"disk.img": data})
    f = File(backing, "disk.img")

    async def body(fetcher: Fetcher) -> None:
        got = await read(fetcher, f, CS + 8192, 4096)
        assert got == data[CS + 8192 : CS + 12288]
        await settle(fetcher)
        assert backing.reads == [(f.ino, CS + 8192, 4096)], "bytes nobody asked for were read"
        assert not f.offers  # not complete
        # the guest reads the rest of the chunk, backwards (never sequential): each page once, then it is whole
        for at in range(CS - 4096, -1, -4096):
            if at != 8192:
                assert await read(fetcher, f, CS + at, 4096) == data[CS + at : CS + at + 4096]
        await settle(fetcher)

    run_with_fetcher(backing, body)
    assert f.offers == [(1, data[CS : 2 * CS])]
    assert backing.read_counts(f.ino, len(data)) == [0] * 16 + [1] * 16 + [0] * 32


def test_a_sequential_streams_chunk_is_completed_in_the_background_off_the_critical_path():
    """In a sequential stream a miss waits for its own pages only; the rest of its chunk comes in the background."""
    data = os.urandom(4 * CS)
    backing = FakeBacking({"disk.img": data})
    f = File(backing, "disk.img")

    async def body(fetcher: Fetcher) -> None:
        assert await read(fetcher, f, 0, 4096) == data[:4096]  # starts the stream
        backing.hold = lambda offset, size: offset != 4096  # every read but the next request's own waits
        with trio.fail_after(5):
            got = await read(fetcher, f, 4096, 4096)  # returns while the background reads are held
        assert got == data[4096:8192]
        assert (f.ino, 4096, 4096) in backing.reads
        assert not f.offers  # not complete yet
        backing.gate.set()
        await settle(fetcher)

    run_with_fetcher(backing, body)
    assert (0, data[:CS]) in f.offers
    assert max(backing.read_counts(f.ino, len(data))) == 1


def test_concurrent_requests_for_one_chunk_read_it_once():
    data = os.urandom(4 * CS)
    backing = FakeBacking({"disk.img": data})
    f = File(backing, "disk.img")
    backing.hold = lambda offset, size: True
    results: list[bytes] = []

    async def reader(offset: int, size: int) -> None:
        results.append(await read(fetcher_ref[0], f, offset, size))

    fetcher_ref: list[Fetcher] = []

    async def body(fetcher: Fetcher) -> None:
        fetcher_ref.append(fetcher)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader, 0, CS)
            await trio.to_thread.run_sync(backing.held.wait, 5)  # the first read is in the backing now
            for _ in range(3):
                nursery.start_soon(reader, 0, CS)
            nursery.start_soon(reader, 4096, 8192)
            await trio.sleep(0.05)
            backing.gate.set()
        await settle(fetcher)

    run_with_fetcher(backing, body)
    assert sorted(results, key=len) == [data[4096 : 4096 + 8192]] + [data[:CS]] * 4
    assert backing.read_counts(f.ino, len(data))[: CS // PS] == [1] * (CS // PS)
    assert {c for c, _ in f.offers} == {0}


def test_a_write_racing_a_background_completion_never_caches_old_bytes():
    """The background read of the rest of a chunk returns the bytes from before a write: they are neither served nor offered."""
    old = os.urandom(2 * CS)
    backing = FakeBacking({"disk.img": old})
    f = File(backing, "disk.img")
    # a stream's second request queues the rest of chunk 0 (pages 2..15, with what it reads ahead): that read waits
    backing.hold = lambda offset, size: offset == 8192 and size > 4096
    new = os.urandom(CS - 8192)

    async def body(fetcher: Fetcher) -> None:
        assert await read(fetcher, f, 0, 4096) == old[:4096]
        assert await read(fetcher, f, 4096, 4096) == old[4096:8192]  # sequential now: the rest goes in the background
        assert await trio.to_thread.run_sync(backing.held.wait, 5), "the completion was never read"
        # a write, as the cache does it: epoch bumped at start and end, the backing written in between
        f.writing += 1
        f.epoch += 1
        backing.write("disk.img", 8192, new)
        # a read while the write is in flight reads the backing directly
        assert await read(fetcher, f, 8192, 4096) == new[:4096]
        f.writing -= 1
        f.epoch += 1
        backing.gate.set()  # the completion returns its old bytes now
        await settle(fetcher)
        assert await read(fetcher, f, 8192, CS - 8192) == new
        assert await read(fetcher, f, 0, CS) == old[:8192] + new
        await settle(fetcher)

    run_with_fetcher(backing, body)
    now = old[:8192] + new + old[CS:]
    assert any(c == 0 for c, _ in f.offers), "the chunk read after the write is offered"
    for c, d in f.offers:
        assert d == now[c * CS : (c + 1) * CS], "an offered chunk held bytes from before the write"


def test_readahead_follows_a_sequential_stream_and_stops_at_end_of_file():
    size = 5 * CS + 12345  # not on a page or chunk boundary
    data = os.urandom(size)
    backing = FakeBacking({"disk.img": data})
    f = File(backing, "disk.img")

    async def body(fetcher: Fetcher) -> None:
        for pos in range(0, 2 * CS, 16384):
            assert await read(fetcher, f, pos, 16384) == data[pos : pos + 16384]
        await settle(fetcher)
        assert fetcher.counters.readahead_chunks > 0
        before = len(backing.reads)
        # the rest of the file is read ahead already: the next requests wait for no backing read
        pos = 2 * CS
        while pos < size:
            got = await read(fetcher, f, pos, 16384)
            assert got == data[pos : pos + 16384]
            pos += 16384
        await settle(fetcher)
        assert len(backing.reads) == before, backing.reads[before:]

    run_with_fetcher(backing, body)
    assert all(offset < size for _, offset, _ in backing.reads), "a read started past end of file"
    assert max(backing.read_counts(f.ino, size)) == 1
    assert sorted({c for c, _ in f.offers}) == list(range(6))
    assert dict(f.offers)[5] == data[5 * CS :]


def test_readahead_skips_chunks_the_cache_holds():
    """A stream re-reading a file the cache holds parts of: readahead reads none of the held chunks."""
    size = 16 * CS
    data = os.urandom(size)
    backing = FakeBacking({"disk.img": data})
    f = File(backing, "disk.img")
    f.held = set(range(3, 16, 2))  # every other chunk from 3 on is a hit: the cache would serve it

    async def body(fetcher: Fetcher) -> None:
        for pos in range(0, 3 * CS, 16384):
            assert await read(fetcher, f, pos, 16384) == data[pos : pos + 16384]
        await settle(fetcher)
        assert fetcher.counters.readahead_chunks > 0

    run_with_fetcher(backing, body)
    counts = backing.read_counts(f.ino, size)
    assert not any(counts[c * 16 + p] for c in f.held for p in range(16)), "a chunk the cache holds was read ahead"
    assert max(counts) == 1


def test_random_reads_get_no_readahead():
    data = os.urandom(64 * CS)
    backing = FakeBacking({"disk.img": data})
    f = File(backing, "disk.img")

    async def body(fetcher: Fetcher) -> None:
        for c in (40, 3, 17, 60, 9):
            assert await read(fetcher, f, c * CS + 4096, 4096) == data[c * CS + 4096 : c * CS + 8192]
        await settle(fetcher)
        assert fetcher.counters.readahead_chunks == 0

    run_with_fetcher(backing, body)
    assert {off // CS for _, off, _ in backing.reads} == {40, 3, 17, 60, 9}


def test_a_large_request_is_read_in_parallel_parts():
    data = os.urandom(32 * CS)
    backing = FakeBacking({"disk.img": data})
    f = File(backing, "disk.img")

    async def body(fetcher: Fetcher) -> None:
        assert await read(fetcher, f, 0, 1 << 20, span=False) == data[: 1 << 20]
        assert fetcher.counters.critical_reads == 4

    run_with_fetcher(backing, body, parallel_part=256 << 10, readahead_max=0)
    assert sorted(off for _, off, _ in backing.reads) == [0, 256 << 10, 512 << 10, 768 << 10]


def test_a_failed_read_is_the_requests_error_and_is_not_remembered():
    data = os.urandom(2 * CS)
    backing = FakeBacking({"disk.img": data})
    f = File(backing, "disk.img")
    failing = [True]
    real = backing.pread

    def pread(h: _Handle, offset: int, size: int) -> bytes:
        if failing[0]:
            raise OSError(errno.EIO, "i/o error")
        return real(h, offset, size)

    backing.pread = pread  # type: ignore[method-assign]

    async def body(fetcher: Fetcher) -> None:
        try:
            await read(fetcher, f, 0, 4096)
        except OSError as exc:
            assert exc.errno == errno.EIO
        else:
            raise AssertionError("the backing's error was not raised")
        await settle(fetcher)
        failing[0] = False
        assert await read(fetcher, f, 0, CS) == data[:CS]

    run_with_fetcher(backing, body)


def test_background_reads_use_the_fetchers_own_handle_and_close_it():
    data = os.urandom(4 * CS)
    backing = FakeBacking({"disk.img": data})
    f = File(backing, "disk.img")

    async def body(fetcher: Fetcher) -> None:
        assert await read(fetcher, f, 0, 4096) == data[:4096]
        assert await read(fetcher, f, 4096, 4096) == data[4096:8192]  # sequential: the rest of the chunk is read ahead
        f.handle.closed = True  # the guest's file closes while the rest of the chunk is read
        await settle(fetcher)
        fetcher.closed(f.fh, f.ino)
        await settle(fetcher)
        await trio.sleep(0.05)

    run_with_fetcher(backing, body)
    assert set(f.offers) == {(0, data[:CS])}
    ours = [h for h in backing.handles if h is not f.handle]
    assert ours and all(h.closed for h in ours)


def test_a_chunk_the_writer_refused_is_offered_again_at_the_next_read():
    """A writer too far behind refuses an offer: the chunk, still buffered, is offered again when read again
    (a request offers a complete chunk at each touch: admission sees every read)."""
    data = os.urandom(2 * CS)
    backing = FakeBacking({"disk.img": data})
    f = File(backing, "disk.img")
    answers = [False, True]
    said_taken: list[list[int]] = []

    def offer(pieces: list[tuple[int, bytes]], taken: Collection[int]) -> list[int]:
        f.offers += pieces
        said_taken.append(sorted(taken))
        took = answers.pop(0) if answers else True
        return [] if took else [c for c, _ in pieces]

    f.offer = offer  # type: ignore[method-assign]

    async def body(fetcher: Fetcher) -> None:
        assert await read(fetcher, f, 0, CS) == data[:CS]  # read whole, offered, refused
        assert await read(fetcher, f, 0, CS) == data[:CS]  # from the buffer: offered again, taken
        assert await read(fetcher, f, 0, CS) == data[:CS]  # a third read is offered too (the cache's offer skips what it holds)

    run_with_fetcher(backing, body)
    assert f.offers[:2] == [(0, data[:CS]), (0, data[:CS])]
    # the offer is told which chunks admission took at an earlier touch (those alone the cache can hold): not the
    # refused one, then the one taken
    assert said_taken[:3] == [[], [], [0]]
    assert max(backing.read_counts(f.ino, CS)) == 1  # chunk 0 read once (a re-read counts as a stream: chunk 1 may be read ahead)


def test_while_the_writer_takes_nothing_no_offer_is_built_and_the_chunks_are_offered_at_their_next_touch():
    """`room` says the writer takes nothing (inclusive admission, too far behind): a request's complete chunks are
    counted to `refused`, no offer is made, and they are offered at their next touch once it has room; a chunk taken
    at an earlier touch is neither offered nor counted while it has none."""
    data = os.urandom(2 * CS)
    backing = FakeBacking({"disk.img": data})
    f = File(backing, "disk.img")
    room = [False]
    refused: list[int] = []

    async def body(fetcher: Fetcher) -> None:
        fetcher.room = lambda: room[0]
        fetcher.refused = refused.append
        assert await read(fetcher, f, 0, 2 * CS) == data
        assert (f.offers, refused) == ([], [2])
        room[0] = True
        assert await read(fetcher, f, 0, 2 * CS) == data  # from the buffer: offered now
        assert sorted((c, bytes(piece)) for c, piece in f.offers) == [(0, data[:CS]), (1, data[CS:])]
        room[0] = False
        assert await read(fetcher, f, 0, CS) == data[:CS]  # taken at the touch before: not counted
        assert (len(f.offers), refused) == (2, [2])

    run_with_fetcher(backing, body)
    assert max(backing.read_counts(f.ino, CS)) == 1


def test_a_stream_catching_up_with_its_readahead_gets_a_view_of_it_once_it_lands():
    """1 MiB sequential reads: a request whose pages are all being read ahead waits for that read and is served as a
    view of its bytes (no copy), each byte read from the backing once; a failed readahead is read by the request."""
    size = 8 << 20
    data = os.urandom(size)
    backing = FakeBacking({"disk.img": data})
    f = File(backing, "disk.img")
    mib = 1 << 20

    async def body(fetcher: Fetcher) -> None:
        assert await read(fetcher, f, 0, mib) == data[:mib]
        backing.hold = lambda offset, size: offset == 2 * mib  # the next request's readahead is held in the backing
        assert await read(fetcher, f, mib, mib) == data[mib : 2 * mib]  # sequential now: readahead goes out
        assert await trio.to_thread.run_sync(backing.held.wait, 5)
        hits = fetcher.counters.buffer_hits
        async with trio.open_nursery() as nursery:
            got: list[memoryview | None] = []

            async def ask() -> None:
                got.append(await fetcher.read_span(f.reader(), 2 * mib, mib))

            nursery.start_soon(ask)
            await trio.sleep(0.05)
            assert not got  # it waits for the read in flight rather than reading the bytes again
            backing.gate.set()
        view = got[0]
        assert view is not None and bytes(view) == data[2 * mib : 3 * mib]
        assert isinstance(view.obj, bytes) and len(view.obj) >= mib  # a view of the readahead's own bytes
        assert fetcher.counters.buffer_hits > hits
        assert fetcher.counters.waited_requests == 1 and fetcher.counters.waited_seconds >= 0.05  # (counted, for metrics)
        backing.hold = lambda offset, size: False
        for at in range(3 * mib, size, mib):
            assert await read(fetcher, f, at, mib) == data[at : at + mib]
        await settle(fetcher)

    run_with_fetcher(backing, body)
    assert max(backing.read_counts(f.ino, size)) == 1


def test_a_request_waiting_for_a_failed_readahead_reads_its_bytes_itself():
    size = 4 << 20
    data = os.urandom(size)
    backing = FakeBacking({"disk.img": data})
    f = File(backing, "disk.img")
    mib = 1 << 20
    reached, gate = threading.Event(), threading.Event()
    real_pread = backing.pread

    def pread(h: _Handle, offset: int, n: int) -> bytes:
        if h is not f.handle and offset == 2 * mib and not reached.is_set():  # the readahead (the fetcher's own handle)
            reached.set()
            gate.wait(10)
            raise OSError(errno.EIO, "readahead lost")
        return real_pread(h, offset, n)

    backing.pread = pread  # type: ignore[method-assign]

    async def body(fetcher: Fetcher) -> None:
        assert await read(fetcher, f, 0, mib) == data[:mib]
        assert await read(fetcher, f, mib, mib) == data[mib : 2 * mib]  # sequential: readahead of 2 MiB on goes out
        assert await trio.to_thread.run_sync(reached.wait, 5)
        got: list[bytes] = []

        async def ask() -> None:
            got.append(await read(fetcher, f, 2 * mib, mib))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask)
            await trio.sleep(0.05)
            assert not got  # waiting for the readahead in flight
            gate.set()  # which fails
        assert got == [data[2 * mib : 3 * mib]]
        assert await read(fetcher, f, 3 * mib, mib) == data[3 * mib :]
        await settle(fetcher)

    run_with_fetcher(backing, body)


class PageCacheFake(FakeBacking):
    """A fake whose pages in `cached` are in a host page cache: `pread_cached` reads them on the loop, as
    `LocalBacking` does with RWF_NOWAIT (the bytes from `offset` on up to the first page not cached)."""

    def __init__(self, files: dict[str, bytes], cached: Callable[[int], bool]) -> None:
        super().__init__(files)
        self.cached = cached
        self.loop_reads: list[tuple[int, int, int]] = []
        self.loop_thread = threading.get_ident()

    def pread_cached(self, h: _Handle, offset: int, size: int) -> bytes | None:
        assert threading.get_ident() == self.loop_thread
        n = 0
        while n < size and self.cached((offset + n) // PS):
            n += PS
        if n == 0:
            return None
        data = bytes(self.files[self._path(h.ino)][offset : offset + min(n, size)])
        with self.lock:
            self.reads.append((h.ino, offset, len(data)))
            self.loop_reads.append((h.ino, offset, len(data)))
        return data


def test_misses_the_page_cache_holds_are_read_on_the_loop_each_page_once():
    """Misses answered from the host page cache on the loop (no thread, no claim) keep every rule of the miss path:
    right bytes, each page read from the backing once (a stream's background reads skip the pages the loop read),
    complete chunks offered with their own bytes."""
    size = 16 * CS
    data = os.urandom(size)
    backing = PageCacheFake({"disk.img": data}, lambda page: True)
    f = File(backing, "disk.img")

    async def body(fetcher: Fetcher) -> None:
        for at in range(0, 4 * CS, PS):  # a stream of 4 KiB reads: its chunks' rest and readahead in the background
            assert await read(fetcher, f, at, PS) == data[at : at + PS]
        await settle(fetcher)
        for at in (13 * CS + 5 * PS, 9 * CS, 11 * CS - PS):  # random misses beyond the readahead
            assert await read(fetcher, f, at, 3 * PS) == data[at : at + 3 * PS]
        await settle(fetcher)

    run_with_fetcher(backing, body)
    counts = backing.read_counts(f.ino, size)
    assert max(counts) == 1, f"pages read more than once: {[p for p, n in enumerate(counts) if n > 1][:10]}"
    assert backing.loop_reads, "no miss was read on the loop"
    assert len(backing.loop_reads) < len(backing.reads), "the stream's background reads did not go to threads"
    assert all(d == data[c * CS : (c + 1) * CS] for c, d in f.offers)
    assert {0, 1, 2, 3} <= {c for c, _ in f.offers}


def test_a_miss_partly_in_the_page_cache_reads_only_the_rest_in_a_thread():
    """What the page cache holds of a miss's start is read on the loop, only the rest in a worker thread; a
    neighbour that needs those pages meanwhile waits for that read rather than reading them again."""
    data = os.urandom(4 * CS)
    backing = PageCacheFake({"disk.img": data}, lambda page: page % 4 == 0)
    backing.hold = lambda offset, size: True  # the thread's read waits at the gate
    f = File(backing, "disk.img")
    other = File(backing, "disk.img", fh=2)  # another open file (not part of f's stream): no readahead
    got: dict[str, bytes] = {}

    async def body(fetcher: Fetcher) -> None:
        async def first() -> None:
            got["first"] = await read(fetcher, f, CS, 3 * PS)

        async def neighbour() -> None:
            got["neighbour"] = await read(fetcher, other, CS + PS, PS)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(first)
            await trio.to_thread.run_sync(backing.held.wait, 10)
            nursery.start_soon(neighbour)
            await trio.sleep(0.05)
            backing.gate.set()
        await settle(fetcher)

    run_with_fetcher(backing, body)
    assert got == {"first": data[CS : CS + 3 * PS], "neighbour": data[CS + PS : CS + 2 * PS]}
    assert backing.loop_reads == [(f.ino, CS, PS)]
    assert backing.reads == [(f.ino, CS, PS), (f.ino, CS + PS, 2 * PS)], "bytes were read twice, or beyond the requests"


@hyp.settings(max_examples=500, deadline=None)
@hyp.given(bits=hst.integers(min_value=0, max_value=(1 << 300) - 1))
def test_bit_runs_are_the_runs_of_set_bits(bits: int) -> None:
    runs = _bit_runs(bits)
    assert sum(((1 << count) - 1) << first for first, count in runs) == bits
    assert all(count > 0 for _, count in runs)
    # lowest first, never two runs touching (each run is maximal)
    assert all(a + n < b for (a, n), (b, _) in itertools.pairwise(runs))


# (offset, size) of one request, and whether the cache would hand it to `read_span` first
_REQUEST = hst.tuples(hst.integers(min_value=0, max_value=40 * PS), hst.integers(min_value=1, max_value=80 * PS), hst.booleans())


@hyp.settings(max_examples=60, deadline=None, suppress_health_check=[hyp.HealthCheck.too_slow])
@hyp.given(
    block_size=hst.sampled_from([CS, 4 * CS, 16 * CS]),
    requests=hst.lists(
        hst.tuples(hst.integers(min_value=0, max_value=1), _REQUEST, hst.integers(min_value=1, max_value=6)), min_size=1, max_size=12
    ),
    tail=hst.integers(min_value=0, max_value=CS - 1),
)
def test_any_mix_of_requests_gets_the_files_bytes_and_offers_only_whole_chunks(
    block_size: int, requests: list[tuple[int, tuple[int, int, bool], int]], tail: int
) -> None:
    """Whatever the block size and the requests (two open files; runs of neighbouring requests make streams, with
    readahead; random ones read only their pages; some go to `read` per chunk): every answer is the file's bytes,
    and every chunk offered for admission is a whole chunk of the file (or its end) with its own bytes."""
    size = 40 * PS * 2 + tail  # (the last chunk ends inside the file)
    data = os.urandom(size)
    backing = FakeBacking({"disk.img": data})
    files = [File(backing, "disk.img", fh=1), File(backing, "disk.img", fh=2)]

    async def body(fetcher: Fetcher) -> None:
        for which, (offset, length, span), run in requests:
            f = files[which]
            for k in range(run):  # `run` neighbouring requests: a stream from the second on
                at = offset + k * length
                if at >= size:
                    break
                assert await read(fetcher, f, at, length, span=span) == data[at : at + length]
                assert fetcher._bytes == counted(fetcher) <= fetcher.buffer_bytes
        await settle(fetcher)
        assert fetcher._bytes == counted(fetcher) <= fetcher.buffer_bytes

    run_with_fetcher(backing, body, block_size=block_size, buffer_bytes=8 * CS)
    for f in files:
        for c, piece in f.offers:
            assert bytes(piece) == data[c * CS : (c + 1) * CS], f"chunk {c} offered with the wrong bytes"


def test_a_request_offers_the_chunks_it_read_and_no_others_of_its_block():
    """Chunks share a buffer entry (a block): a request offers only the chunks it read, complete, not the block's others."""
    data = os.urandom(8 * CS)
    backing = FakeBacking({"disk.img": data})
    f = File(backing, "disk.img")

    async def body(fetcher: Fetcher) -> None:
        assert await read(fetcher, f, 0, CS) == data[:CS]
        assert await read(fetcher, f, 5 * CS, CS) == data[5 * CS : 6 * CS]  # not sequential: nothing read ahead
        assert await read(fetcher, f, 2 * CS + PS, PS) == data[2 * CS + PS : 2 * CS + 2 * PS]  # chunk 2 incomplete
        await settle(fetcher)

    run_with_fetcher(backing, body)
    assert [c for c, _ in f.offers] == [0, 5]
    assert backing.read_counts(f.ino, len(data)) == [1] * 16 + [0] * 17 + [1] + [0] * 46 + [1] * 16 + [0] * 32


def test_a_read_ahead_chunk_is_the_fetchers_until_a_request_reads_it_and_a_held_one_never_is():
    """`read_ahead` (the cache skips its store lookups for such a chunk) is per chunk inside a block: true for a
    chunk read ahead that no request has read, false once one has, and false for a chunk readahead skipped because
    the cache holds it (that request must find it in the store)."""
    data = os.urandom(16 * CS)
    backing = FakeBacking({"disk.img": data})
    f = File(backing, "disk.img")
    f.held = {6}

    async def body(fetcher: Fetcher) -> None:
        for at in range(0, 2 * CS, 16384):  # a stream: readahead over the rest of the block, but chunk 6
            assert await read(fetcher, f, at, 16384) == data[at : at + 16384]
        await settle(fetcher)
        stamp = f.stamp()
        assert fetcher.read_ahead(f.ino, 4 * CS, stamp) and fetcher.read_ahead(f.ino, 7 * CS + PS, stamp)
        assert not fetcher.read_ahead(f.ino, 6 * CS, stamp), "a chunk the cache holds was taken for readahead"
        assert not fetcher.read_ahead(f.ino, CS, stamp), "a chunk a request read is still taken for readahead"
        assert not fetcher.read_ahead(f.ino, 4 * CS, (stamp[0] + 1, stamp[1])), "readahead of other content"
        assert await read(fetcher, f, 4 * CS, PS) == data[4 * CS : 4 * CS + PS]
        assert not fetcher.read_ahead(f.ino, 4 * CS, stamp)

    run_with_fetcher(backing, body)
    assert not any(backing.read_counts(f.ino, len(data))[6 * 16 : 7 * 16])


def test_a_request_inside_a_block_read_whole_is_known_to_be_buffered():
    """`buffered` (the cache skips the store for such a request): true for a request inside one block that one read
    brought whole (or is bringing), false across blocks, for a block read in parts, and for other content."""
    mib = 1 << 20
    data = os.urandom(4 * mib)
    backing = FakeBacking({"disk.img": data})
    f = File(backing, "disk.img")

    async def body(fetcher: Fetcher) -> None:
        assert await read(fetcher, f, 0, 4096) == data[:4096]  # block 0: in parts from here on
        for at in range(4096, 10 * 65536, 65536):  # a stream: readahead reads blocks 1.. whole
            assert await read(fetcher, f, at, 65536) == data[at : at + 65536]
        await settle(fetcher)
        stamp = f.stamp()
        assert fetcher.buffered(f.ino, mib + 4096, 200 << 10, stamp)
        assert not fetcher.buffered(f.ino, 2 * mib - 4096, 8192, stamp), "a request across two blocks"
        assert not fetcher.buffered(f.ino, 8192, 4096, stamp), "a block read in parts is never one view"
        assert not fetcher.buffered(f.ino, mib, 4096, (stamp[0] + 1, stamp[1])), "another content"
        view = await fetcher.read_span(f.reader(), mib + 4096, 200 << 10)
        assert view is not None and bytes(view) == data[mib + 4096 : mib + 4096 + (200 << 10)]
        # admission took the chunks that request completed: they are the store's now, a re-read of them a hit
        assert f.offers and not fetcher.buffered(f.ino, mib + 4096, 200 << 10, stamp)
        assert fetcher.buffered(f.ino, mib + (256 << 10), 4096, stamp), "a chunk of the block nobody read is still the buffer's"

    run_with_fetcher(backing, body)
    assert max(backing.read_counts(f.ino, len(data))) == 1


def test_a_request_whose_pages_were_read_by_earlier_requests_is_answered_from_the_buffer_in_one_step():
    """A request inside one block whose pages earlier random reads brought, each read its own (a boot's re-reads, a
    second guest reading what the first just read): `read_span` answers it from those reads' bytes, nothing read
    again, whether one read holds all its pages or several do, unaligned, and at end of file."""
    size = 3 * CS + 1000  # (end of file inside chunk 3, page 48)
    data = os.urandom(size)
    backing = FakeBacking({"disk.img": data})
    # one open file per request: none of them is a sequential stream, so each reads its own pages and no more
    files = iter(File(backing, "disk.img", fh=fh) for fh in itertools.count(1))

    async def span(fetcher: Fetcher, offset: int, n: int) -> bytes | None:
        got = await fetcher.read_span(next(files).reader(), offset, n)
        return None if got is None else bytes(got)

    async def body(fetcher: Fetcher) -> None:
        # earlier reads: pages 5 and 6 (one read each), pages 20-23 (one read), the last page (past end of file)
        for offset, n in ((5 * PS, PS), (6 * PS, PS), (20 * PS, 4 * PS), (48 * PS, PS)):
            assert await span(fetcher, offset, n) == data[offset : offset + n]
        reads = list(backing.reads)
        hits = fetcher.counters.buffer_hits
        for offset, n in (
            (5 * PS, PS),  # a page one read brought
            (5 * PS + 100, 2 * PS - 200),  # across the pages of two reads, unaligned
            (21 * PS + 7, 2 * PS),  # inside one read of several pages, unaligned
            (48 * PS + 500, 3000),  # past end of file: the file's bytes up to its end
        ):
            assert await span(fetcher, offset, n) == data[offset : offset + n], (offset, n)
        assert backing.reads == reads, "pages already buffered were read again"
        assert fetcher.counters.buffer_hits == hits + 4
        # a request with one page buffered and one not is not the buffer's alone: `read` reads the missing page
        assert await span(fetcher, 6 * PS, 2 * PS) is None
        assert await read(fetcher, next(files), 6 * PS, 2 * PS) == data[6 * PS : 8 * PS]
        assert backing.reads == [*reads, (next(files).ino, 7 * PS, PS)]

    run_with_fetcher(backing, body, block_size=4 * CS)
