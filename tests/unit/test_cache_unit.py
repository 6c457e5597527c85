"""The cache without FUSE and without root: an in-memory backing, a real store in a temporary
directory, the parts built as assemble builds them. Hits, misses, never-stale on writes and
on changes made behind the cache's back, and the order of admissions and drops."""

from __future__ import annotations

import dataclasses
import os
import threading
from typing import Any

import pytest
import trio

from fusecache import store_queue
from fusecache.admission import Inclusive, SecondChance
from fusecache.backing import Attr, OffLoop
from fusecache.cache import Cache
from fusecache.files import Files
from fusecache.geometry import CHUNK_SIZE
from fusecache.inodes import OpenFile
from fusecache.store import Store
from fusecache.store_queue import StoreQueue

CS = CHUNK_SIZE
MiB = 1 << 20


@dataclasses.dataclass
class MemFile:
    ino: int
    data: bytearray
    mtime_ns: int = 1


class MemBacking:
    """A backing of files in memory that counts its reads; `gate`, when set, holds every pread's bytes until opened."""

    description = "memory"

    def __init__(self) -> None:
        self.files: dict[str, MemFile] = {}
        self.preads = 0
        self.gate: threading.Event | None = None
        self.reading = threading.Event()

    def put(self, path: str, data: bytes) -> None:
        old = self.files.get(path)
        ino = old.ino if old else len(self.files) + 100
        self.files[path] = MemFile(ino, bytearray(data), (old.mtime_ns + 1) if old else 1)

    def _attr(self, f: MemFile) -> Attr:
        return Attr(f.ino, 0o100644, 1, 0, 0, len(f.data), 0, 0, 0, f.mtime_ns, f.mtime_ns)

    def lstat(self, path: str) -> Attr:
        return self._attr(self.files[path])

    def open(self, path: str, flags: int) -> str:
        if path not in self.files:
            raise FileNotFoundError(2, os.strerror(2))
        return path

    def fstat(self, fh: str) -> Attr:
        return self._attr(self.files[fh])

    def pread(self, fh: str, offset: int, size: int) -> bytes:
        self.preads += 1
        data = bytes(self.files[fh].data[offset : offset + size])
        if self.gate is not None:  # the bytes are read; they arrive only when the gate opens
            self.reading.set()
            self.gate.wait(10)
        return data

    def pwrite(self, fh: str, data: bytes, offset: int) -> int:
        f = self.files[fh]
        if len(f.data) < offset:
            f.data.extend(bytes(offset - len(f.data)))
        f.data[offset : offset + len(data)] = data
        f.mtime_ns += 1
        return len(data)

    def close(self, fh: str) -> None:
        pass


def mem_cache(directory: str, size: int = 64 * MiB) -> tuple[MemBacking, Cache]:
    """A Cache (inclusive admission) over a fresh MemBacking and a new store in `directory`; close `cache.store` after."""
    backing = MemBacking()
    store = Store(directory, size)
    queue = StoreQueue(store)
    offloop = OffLoop(backing)  # type: ignore[arg-type]  # duck-typed: the calls the cache makes
    files = Files(offloop, store, queue, revalidate=3600.0)
    return backing, Cache(offloop, files, queue, Inclusive())


@pytest.fixture
def mem(tmp_path):
    backing, cache = mem_cache(str(tmp_path / "cache"))
    yield backing, cache
    cache.store.close()


def opened(backing: MemBacking, path: str) -> OpenFile:
    return OpenFile(1, 1, path, path, backing.lstat(path), True)


async def open_file(cache: Cache, backing: MemBacking, path: str) -> OpenFile:
    f = opened(backing, path)
    await cache.opened(f)
    return f


def test_a_miss_reads_the_backing_then_the_same_bytes_are_a_hit(mem):
    backing, cache = mem
    data = os.urandom(4 * CS + 100)
    backing.put("a.img", data)

    async def go():
        f = await open_file(cache, backing, "a.img")
        first = bytes(await cache.read(f, 0, 5 * CS))
        await cache.queue.drain()
        reads = backing.preads
        second = bytes(await cache.read(f, 1000, 3 * CS))
        tail = bytes(await cache.read(f, 4 * CS, CS))  # the short last chunk, and past end of file
        return first, second, tail, backing.preads - reads

    first, second, tail, extra = trio.run(go)
    assert first == data
    assert second == data[1000 : 1000 + 3 * CS]
    assert tail == data[4 * CS :]
    assert extra == 0
    c = cache.images["a.img"]
    assert c.hit_chunks == 5 and c.miss_chunks == 5 and c.admitted_chunks == 5


def test_admitted_chunks_are_served_before_the_writer_commits(mem):
    backing, cache = mem
    data = os.urandom(2 * CS)
    backing.put("a.img", data)

    async def go():
        f = await open_file(cache, backing, "a.img")
        await cache.read(f, 0, 2 * CS)
        assert not cache.queue.settled  # nothing drained yet: served from the queue's pending admissions
        reads = backing.preads
        again = bytes(await cache.read(f, 0, 2 * CS))
        return again, backing.preads - reads

    again, extra = trio.run(go)
    assert again == data and extra == 0


@pytest.mark.parametrize("drain_between", [False, True])
def test_a_write_is_read_back_at_once_never_the_cached_bytes(mem, drain_between):
    backing, cache = mem
    backing.put("a.img", os.urandom(3 * CS))

    async def go():
        f = await open_file(cache, backing, "a.img")
        await cache.read(f, 0, 3 * CS)
        if drain_between:
            await cache.queue.drain()
        await cache.write(f, CS + 10, b"fresh bytes")
        now = bytes(await cache.read(f, CS, 64))
        await cache.queue.drain()
        later = bytes(await cache.read(f, CS, 64))
        return now, later

    now, later = trio.run(go)
    expected = bytes(backing.files["a.img"].data[CS : CS + 64])
    assert now[10:21] == b"fresh bytes"
    assert now == later == expected


def test_an_extending_write_does_not_leave_the_old_end_of_file_short(mem):
    backing, cache = mem
    backing.put("a.img", b"x" * (CS + 100))

    async def go():
        f = await open_file(cache, backing, "a.img")
        await cache.read(f, 0, 2 * CS)
        await cache.queue.drain()
        await cache.write(f, 2 * CS, b"y" * 10)
        await cache.queue.drain()
        return bytes(await cache.read(f, 0, 2 * CS + 10))

    got = trio.run(go)
    assert got == bytes(backing.files["a.img"].data)
    assert len(got) == 2 * CS + 10


def test_a_change_behind_the_cache_is_seen_at_the_next_open(mem):
    backing, cache = mem
    backing.put("a.img", b"old!" * (CS // 4))

    async def go():
        f = await open_file(cache, backing, "a.img")
        await cache.read(f, 0, CS)
        await cache.queue.drain()
        backing.put("a.img", b"new!" * (CS // 4))  # another host wrote it: new mtime
        f = await open_file(cache, backing, "a.img")
        return bytes(await cache.read(f, 0, 8))

    assert trio.run(go) == b"new!new!"
    assert cache.images["a.img"].invalidations == 1


def test_a_read_that_raced_a_write_is_not_admitted(mem):
    backing, cache = mem
    backing.put("a.img", b"o" * CS)

    async def go():
        f = await open_file(cache, backing, "a.img")
        gate = backing.gate = threading.Event()
        got: list[bytes] = []

        async def reader():
            got.append(bytes(await cache.read(f, 0, CS)))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await trio.to_thread.run_sync(backing.reading.wait, 10)  # the read is inside the backing now
            backing.gate = None
            await cache.write(f, 0, b"n" * 16)
            gate.set()
        await cache.queue.drain()
        return got[0], bytes(await cache.read(f, 0, CS))  # the whole chunk: complete, so offered for admission

    raced, now = trio.run(go)
    assert raced == b"o" * CS  # read before the write landed: a correct answer to a read that raced it
    assert now[:16] == b"n" * 16  # but not admitted: the next read sees the write
    assert cache.images["a.img"].admitted_chunks == 1  # only the re-read after the write, not the raced read


def test_an_admission_then_a_drop_of_one_chunk_ends_dropped(mem):
    _, cache = mem
    queue = cache.queue
    key = (7, 1, 0)

    async def go():
        queue.record_file(7, 1, backing_version())
        assert queue.admit(key, b"a" * CS)
        queue.drop(key)
        assert queue.is_dropped(key)
        await queue.drain()

    trio.run(go)
    assert cache.store.read_chunks(7, 1, 0, 0) == [None]
    assert not queue.is_dropped(key)  # committed: the store alone answers now


def test_a_drop_then_an_admission_of_one_chunk_ends_admitted(mem):
    _, cache = mem
    queue = cache.queue
    key = (7, 1, 0)

    async def go():
        queue.record_file(7, 1, backing_version())
        queue.drop(key)
        assert queue.admit(key, b"a" * CS)
        await queue.drain()

    trio.run(go)
    assert cache.store.read_chunks(7, 1, 0, 0) == [b"a" * CS]


def backing_version():
    from fusecache.version import Version

    return Version(CS, 1, 1, 0)


def _change_behind(backing: MemBacking, path: str, offset: int, data: bytes) -> None:
    """Another host writes into the file in place: new bytes, new mtime, same size."""
    f = backing.files[path]
    f.data[offset : offset + len(data)] = data
    f.mtime_ns += 1000


def test_a_write_through_the_cache_does_not_hide_another_hosts_change(mem, tmp_path):
    backing, cache = mem
    backing.put("a.img", b"old!" * (12 * CS // 4))

    async def go():
        f = await open_file(cache, backing, "a.img")
        await cache.read(f, 0, CS)  # chunk 0 cached
        await cache.queue.drain()
        _change_behind(backing, "a.img", 0, b"new!" * (CS // 4))
        await cache.write(f, 10 * CS, b"ours")  # our write, after the other host's
        await cache.queue.drain()
        held_open = bytes(await cache.read(f, 0, 8))
        reopened = bytes(await cache.read(await open_file(cache, backing, "a.img"), 0, 8))
        return held_open, reopened

    held_open, reopened = trio.run(go)
    assert held_open == reopened == b"new!new!"
    assert cache.images["a.img"].invalidations == 1
    # The store forgot the old chunk 0 too: a restart cannot serve it (to us or to peers) under the new version.
    gen, version = cache.files.store.file_record(backing.files["a.img"].ino)
    assert cache.files.store.read_chunk(backing.files["a.img"].ino, gen, 0) in (None, b"new!" * (CS // 4))
    assert tuple(version)[1] == backing.files["a.img"].mtime_ns


def test_our_own_writes_keep_the_files_cached_chunks(mem):
    backing, cache = mem
    backing.put("a.img", os.urandom(12 * CS))

    async def go():
        f = await open_file(cache, backing, "a.img")
        await cache.read(f, 0, CS)
        await cache.queue.drain()
        for i in range(5):
            await cache.write(f, (5 + i) * CS, b"ours")
        await cache.queue.drain()
        reads = backing.preads
        got = bytes(await cache.read(f, 0, CS))
        return got, backing.preads - reads

    got, extra = trio.run(go)
    assert got == bytes(backing.files["a.img"].data[:CS]) and extra == 0
    assert cache.images["a.img"].invalidations == 0


def test_overlapping_writes_of_ours_are_not_taken_for_another_host(mem):
    backing, cache = mem
    backing.put("a.img", os.urandom(12 * CS))

    async def go():
        f = await open_file(cache, backing, "a.img")
        await cache.read(f, 0, CS)
        await cache.queue.drain()
        async with trio.open_nursery() as n:
            for i in range(8):
                n.start_soon(cache.write, f, (4 + i) * CS, b"ours %d" % i)
        await cache.queue.drain()
        return bytes(await cache.read(f, 0, CS))

    assert trio.run(go) == bytes(backing.files["a.img"].data[:CS])


def test_getattr_by_name_without_a_change_attribute_does_not_drop_an_nfs4_files_chunks(mem):
    """NFSv4: fstat carries the change attribute, a stat by name does not; only a real difference is a change."""
    backing, cache = mem
    backing.put("a.img", os.urandom(2 * CS))
    with_change = lambda attr: dataclasses.replace(attr, change=attr.mtime_ns * 10)  # noqa: E731
    plain_fstat = backing.fstat
    backing.fstat = lambda fh: with_change(plain_fstat(fh))  # type: ignore[method-assign]

    async def go():
        f = await open_file(cache, backing, "a.img")
        await cache.read(f, 0, 2 * CS)
        await cache.queue.drain()
        cache.attributes_seen(backing.lstat("a.img"))  # same size and times, change 0: the same version
        reads = backing.preads
        same = bytes(await cache.read(f, 0, 2 * CS)) == bytes(backing.files["a.img"].data[: 2 * CS])
        hit = backing.preads == reads
        _change_behind(backing, "a.img", 0, b"new!" * 4)
        cache.attributes_seen(backing.lstat("a.img"))  # another mtime: changed
        return same, hit, bytes(await cache.read(f, 0, 16))

    same, hit, after = trio.run(go)
    assert same and hit  # served from the store: no new generation
    assert after == b"new!" * 4
    assert cache.images["a.img"].invalidations == 1


def test_a_streams_read_ahead_chunks_are_served_without_reads_lookups(tmp_path):
    """A sequential stream's next request, read ahead, comes from the fetcher's buffer after one look for a hit, none
    of `_read`'s (the index again, the queue's changes); once admitted, a re-read of the same chunks is a hit again."""
    backing, cache = mem_cache(str(tmp_path / "cache"))
    cache = Cache(cache.backing, cache.files, cache.queue, SecondChance(str(tmp_path / "mnt"), cache.files, cache.backing, staging_bytes=0))
    data = os.urandom(8 * MiB)
    backing.put("a.img", data)
    store = cache.store
    looks: list[str] = []
    for name in ("read_span", "all_missing", "read_chunks"):
        real = getattr(store, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            looks.append(_name)
            return _real(*args, **kwargs)

        setattr(store, name, counted)

    async def go():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cache.fetcher.run)
            f = await open_file(cache, backing, "a.img")
            got, looked = [], []
            for off in range(0, 8 * MiB, MiB):
                before = len(looks)
                got.append(bytes(await cache.read(f, off, MiB)))
                looked.append(looks[before:])
            key = (f.ino, cache.files.fresh(f.ino).gen, 64)
            assert await cache.files.admit_current(key, data[4 * MiB : 4 * MiB + CS], wait=True)
            await cache.queue.drain()
            again = bytes(await cache.read(f, 4 * MiB, CS))
            nursery.cancel_scope.cancel()
        return got, looked, cache.images["a.img"].hit_bytes, again

    try:
        got, looked, hit, again = trio.run(go)
    finally:
        store.close()
    assert b"".join(got) == data and again == data[4 * MiB : 4 * MiB + CS]
    assert "all_missing" in looked[0]  # the stream's first request: nothing read ahead yet
    assert looked[2:] == [["read_span"]] * 6, looked  # read ahead: the hit check only
    assert hit == CS  # admitted meanwhile: a re-read is a hit


def test_a_files_misses_share_one_reader_until_its_state_changes(mem):
    """The fetcher's Reader is built once per open file and reused by its next misses; a write through the file
    (a new write epoch) or a new generation builds another, so chunks read after them are admitted as they are."""
    backing, cache = mem
    data = os.urandom(4 * CS)
    backing.put("a.img", data)

    async def go():
        f = await open_file(cache, backing, "a.img")
        st = cache.files.fresh(f.ino)
        first = cache._reader(f, st)
        assert cache._reader(f, st) is first, "a second miss with nothing changed built a new reader"
        assert bytes(await cache.read(f, 0, CS)) == data[:CS]
        assert cache._reader(f, st) is first
        await cache.write(f, CS + 10, b"w" * 10)  # the file's write epoch moves
        after_write = cache._reader(f, st)
        assert after_write is not first
        assert bytes(await cache.read(f, CS, CS)) == data[CS : CS + 10] + b"w" * 10 + data[CS + 20 : 2 * CS]
        await cache.queue.drain()
        assert cache.images["a.img"].admitted_chunks == 2, "a chunk read after the write was not admitted"
        gen = st.gen
        backing.put("a.img", data[::-1])  # changed behind the cache's back: a new generation at the next open
        f = await open_file(cache, backing, "a.img")
        st = cache.files.fresh(f.ino)
        assert st.gen != gen
        assert cache._reader(f, st) is not after_write
        assert bytes(await cache.read(f, 0, CS)) == data[::-1][:CS]
        cache.closed(f)
        assert f.fh not in cache._readers, "a closed file's reader was kept"

    trio.run(go)


def test_a_one_chunk_miss_looks_the_index_up_once(mem, monkeypatch):
    """A cold request inside one chunk is found missing by the hit path's own look-up: the cold path takes it
    without a second look at the index (`all_missing`), and the store counts one miss for it, not two."""
    backing, cache = mem
    data = os.urandom(4 * CS)
    backing.put("a.img", data)
    looks: list[tuple[int, int]] = []
    all_missing = cache.store.all_missing

    def counted(ino: int, gen: int, first: int, last: int) -> bool:
        looks.append((first, last))
        return all_missing(ino, gen, first, last)

    monkeypatch.setattr(cache.store, "all_missing", counted)

    async def go():
        f = await open_file(cache, backing, "a.img")
        misses = cache.store.stats().misses
        for at in (CS + 4096, 3 * CS, 8192):
            assert bytes(await cache.read(f, at, 4096)) == data[at : at + 4096]
        one_chunk = cache.store.stats().misses - misses
        assert bytes(await cache.read(f, 2 * CS - 4096, 8192)) == data[2 * CS - 4096 : 2 * CS + 4096]  # two chunks
        return one_chunk

    assert trio.run(go) == 3
    assert looks == [(1, 2)], f"the index was looked up again for one-chunk misses: {looks}"


class StubPeerReads:
    """Stands in for PeerReads: peers that hold the chunks in `held` of `data`, every ask recorded."""

    def __init__(self, data: bytes, held: set[int]) -> None:
        self.data, self.held = data, held
        self.asked: list[list[int]] = []

    async def fetch(self, ino, version, chunks, timeout=None, ahead=None):
        self.asked.append(list(chunks))
        return {c: self.data[c * CS : (c + 1) * CS] for c in chunks if c in self.held}

    def closed(self, stream) -> None:
        pass


def test_with_peers_a_one_chunk_miss_looks_the_store_up_once_and_asks_them(mem, monkeypatch):
    """With peers, a request inside one chunk the hit path found missing goes to the peers without a second look
    at the store (`read_chunks`), counted as one miss; what no peer holds comes from the backing. A request over
    two chunks still takes the general path's look."""
    backing, cache = mem
    data = os.urandom(8 * CS)
    backing.put("a.img", data)
    peers = cache.peer_reads = StubPeerReads(data, held={3, 5, 6})
    looks: list[tuple[int, int]] = []
    read_chunks = cache.store.read_chunks

    def counted(ino, gen, first, last, lo, hi):
        looks.append((first, last))
        return read_chunks(ino, gen, first, last, lo, hi)

    monkeypatch.setattr(cache.store, "read_chunks", counted)

    async def go():
        f = await open_file(cache, backing, "a.img")
        misses, preads = cache.store.stats().misses, backing.preads
        for at in (3 * CS + 4096, CS + 8192):  # a peer holds chunk 3, none holds chunk 1
            assert bytes(await cache.read(f, at, 4096)) == data[at : at + 4096]
            await cache.queue.drain()  # (what admission took: the hit path looks only when nothing is queued)
        one_chunk = cache.store.stats().misses - misses, backing.preads - preads
        assert bytes(await cache.read(f, 6 * CS - 4096, 8192)) == data[6 * CS - 4096 : 6 * CS + 4096]
        return one_chunk

    assert trio.run(go) == (2, 1)  # two misses counted once each; the backing read only chunk 1
    assert peers.asked == [[3], [1], [5, 6]]
    assert looks == [(5, 6)], f"the store was looked up again for one-chunk misses: {looks}"
    assert cache.images["a.img"].peer_bytes == 4096 + 8192


def test_a_stream_not_aligned_to_chunks_is_served_from_the_fetchers_buffer_without_the_general_path(mem, monkeypatch):
    """128 KiB requests from 4 KiB on (each starts in a chunk its predecessor read, so it is not "read ahead"): once
    the stream's readahead has whole blocks in the fetcher's buffer, a request inside one is answered from there,
    without `_read`'s looks at the index and the admission queue; every answer is the file's bytes. (Admission wants
    nothing of the file, as second chance with no guest reading it: nothing it reads is admitted.)"""
    backing, cache = mem
    monkeypatch.setattr(cache.admission, "wants", lambda ino: False)
    data = os.urandom(8 * MiB)
    backing.put("a.img", data)
    general: list[int] = []
    real = cache._read

    async def counted(f: OpenFile, offset: int, size: int, *args: Any) -> Any:
        general.append(offset)
        return await real(f, offset, size, *args)

    monkeypatch.setattr(cache, "_read", counted)
    step = 128 << 10
    requests = range(4096, len(data) - step, step)

    async def go():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cache.fetcher.run)
            f = await open_file(cache, backing, "a.img")
            for at in requests:
                assert bytes(await cache.read(f, at, step)) == data[at : at + step]
                await trio.sleep(0.001)  # (a guest's next request comes later: the readahead lands meanwhile)
            nursery.cancel_scope.cancel()

    trio.run(go)
    # the first requests (before the stream has readahead) and those crossing a block's end take it; the rest do not
    assert len(general) < len(requests) // 3, f"{len(general)} of {len(requests)} requests took the general path"


def test_a_cold_read_admits_its_chunks_in_one_call_without_asking_the_index_again(mem, monkeypatch):
    """A cold 1 MiB read admits its sixteen chunks (inclusive) in one call to the queue, each once, with its own
    bytes, and does not look the index up again after the fetch (the cold path's look found none held). An offer
    looks up only the chunks admission took at an earlier touch (the only ones the cache can hold), in one scan;
    a chunk queued already is not queued twice."""
    backing, cache = mem
    data = os.urandom(2 * MiB)
    backing.put("a.img", data)
    looks: list[tuple[int, int]] = []
    calls: list[int] = []
    held_chunks, admit_many = cache.store.held_chunks, cache.files.admit_many

    def counted(ino: int, gen: int, first: int, last: int) -> set[int]:
        looks.append((first, last))
        return held_chunks(ino, gen, first, last)

    def counted_admit(chunks, name, owner=None):
        calls.append(len(chunks))
        return admit_many(chunks, name, owner)

    monkeypatch.setattr(cache.store, "held_chunks", counted)
    monkeypatch.setattr(cache.files, "admit_many", counted_admit)
    per = MiB // CS

    async def go():
        f = await open_file(cache, backing, "a.img")
        assert bytes(await cache.read(f, MiB, MiB)) == data[MiB:]
        assert (looks, calls) == ([], [per]), "a cold read's chunks: no second look, one admission call"
        assert cache.images["a.img"].admitted_chunks == per
        reader = cache._reader(f, cache.files.get(f.ino))
        pieces = [(c, data[c * CS : (c + 1) * CS]) for c in range(per, 2 * per)]
        assert not reader.offer(pieces, ())  # queued already (not committed): not queued twice
        assert cache.images["a.img"].admitted_chunks == per
        await cache.queue.drain()
        reads = backing.preads
        assert bytes(await cache.read(f, MiB, MiB)) == data[MiB:]  # a hit: each chunk was admitted with its own bytes
        assert backing.preads == reads
        looks.clear()
        assert not reader.offer(pieces, [c for c, _ in pieces])  # taken before, held now: one scan, nothing queued
        assert looks == [(per, 2 * per - 1)], f"the index was looked up per chunk: {looks}"
        assert cache.images["a.img"].admitted_chunks == per

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cache.queue.run)
            await go()
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_admitting_many_takes_what_fits_in_order_as_admitting_one_by_one(tmp_path, monkeypatch):
    """`StoreQueue.admit_many` takes the chunks that fit under the pending bound, in order; the rest are refused and
    counted as skipped, as `admit` one by one would; the writer commits exactly the ones taken, with their bytes."""
    monkeypatch.setattr(store_queue, "MAX_PENDING_ADMIT_BYTES", 3 * CS)
    store = Store(str(tmp_path / "cache"), 16 * MiB)
    queue = StoreQueue(store)
    chunks = [((1, 1, c), os.urandom(CS)) for c in range(5)]
    try:
        assert queue.admit_many(chunks) == 3
        assert (queue.skipped_admissions, queue.pending_admit_bytes) == (2, 3 * CS)
        assert [queue.pending(k) is not None for k, _ in chunks] == [True] * 3 + [False] * 2
        assert queue.admit_many(chunks[3:]) == 0  # full: nothing more until the writer commits
        trio.run(queue.drain)
        assert (queue.settled, queue.pending_admit_bytes) == (True, 0)
        assert queue.admit_many(chunks[3:]) == 2
        trio.run(queue.drain)
        for key, data in chunks:
            assert bytes(store.read_span(key[0], key[1], key[2], key[2], 0, CS)) == data
    finally:
        store.close()


def test_while_the_writer_is_too_far_behind_a_miss_builds_no_offer_and_counts_its_chunks_refused(mem, monkeypatch):
    """Inclusive admission, a writer too far behind to take a chunk: a cold read's chunks are counted as refused, as
    the writer's refusals are, without an offer built or admission asked (it would be refused whole); they are
    served all the same and offered at their next read once the writer has room. An offer it can take in part is
    made as before (the chunks that fit are taken, the rest counted)."""
    monkeypatch.setattr(store_queue, "MAX_PENDING_ADMIT_BYTES", 3 * CS)
    backing, cache = mem
    data = os.urandom(2 * MiB)
    backing.put("a.img", data)
    per = MiB // CS
    asked: list[int] = []
    on_miss = cache.admission.on_miss

    def counted(f, gen, pieces):
        asked.append(len(pieces))
        return on_miss(f, gen, pieces)

    monkeypatch.setattr(cache.admission, "on_miss", counted)

    async def go():
        f = await open_file(cache, backing, "a.img")
        counters = cache.images["a.img"]
        assert bytes(await cache.read(f, 0, MiB)) == data[:MiB]  # room for three: offered, three taken
        assert (asked, counters.admitted_chunks, cache.queue.skipped_admissions) == ([per], 3, per - 3)
        assert bytes(await cache.read(f, MiB, MiB)) == data[MiB:]  # no room: served, no offer, all counted
        assert (asked, counters.admitted_chunks, cache.queue.skipped_admissions) == ([per], 3, 2 * per - 3)
        await cache.queue.drain()
        assert bytes(await cache.read(f, MiB, MiB)) == data[MiB:]  # room again: offered at this read
        assert (asked, counters.admitted_chunks, cache.queue.skipped_admissions) == ([per, per], 6, 3 * per - 6)
        await cache.queue.drain()
        reads = backing.preads
        assert bytes(await cache.read(f, MiB, 3 * CS)) == data[MiB : MiB + 3 * CS]  # the chunks taken are hits
        assert backing.preads == reads

    trio.run(go)


def test_a_stream_re_reading_what_admission_took_counts_hits_not_the_fetchers_buffer(mem):
    """Inclusive admission takes a stream's chunks as it reads them: a second pass over them, before the writer has
    committed them, is answered from the admission queue and counted as hits, although the fetcher's buffer still
    holds every block whole (the buffer does not take requests whose chunks admission took)."""
    backing, cache = mem
    data = os.urandom(4 * MiB)
    backing.put("a.img", data)
    step = 128 << 10
    requests = range(4096, len(data) - step, step)

    async def go():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cache.fetcher.run)  # (the writer is not running: what is admitted stays queued)
            f = await open_file(cache, backing, "a.img")
            for _ in range(2):
                for at in requests:
                    assert bytes(await cache.read(f, at, step)) == data[at : at + step]
                    await trio.sleep(0.001)
                if _ == 0:
                    first = cache.images["a.img"].hit_bytes
            nursery.cancel_scope.cancel()
        return first

    first = trio.run(go)
    c = cache.images["a.img"]
    second_pass = len(requests) * step
    # the first pass's last chunks complete in the background after their requests: a few bytes of the second pass
    # may still be read from the buffer; all but those are hits
    assert c.hit_bytes - first >= second_pass - 2 * CS, f"{c.hit_bytes - first} of {second_pass} bytes counted as hits"
