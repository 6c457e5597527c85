"""PeerReads' single flight (requests wanting the same chunk at once cost the peers one fetch of it) and its readahead."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

from fusecache.fetch import Reader
from fusecache.geometry import CHUNK_SIZE as CS
from fusecache.peer_reads import PeerReads
from fusecache.version import Version

V1, V2 = Version(1 << 20, 1, 1, 0), Version(1 << 20, 2, 2, 0)


class CountingPeers:
    """Stands in for PeerSet: answers every chunk after `delay` seconds (None for chunks in `missing`), counting asks."""

    fetch_timeout = 5.0

    def __init__(self, delay: float, missing: frozenset[int] = frozenset()) -> None:
        self.delay, self.missing = delay, missing
        self.asked: list[tuple[int, Version, int]] = []

    async def fetch_location(self, ino: int, version: Version, chunk: int, deadline: float) -> bytes | None:
        self.asked.append((ino, version, chunk))
        await trio.sleep(self.delay)
        return None if chunk in self.missing else bytes([chunk]) * 8 + version.mtime_ns.to_bytes(8, "big")


def test_concurrent_asks_for_one_chunk_are_one_fetch() -> None:
    peers = CountingPeers(0.05, missing=frozenset({9}))
    reads = PeerReads(peers, files=None)  # type: ignore[arg-type]  # fetch needs no files
    got: list[dict[int, bytes]] = []

    async def ask(version: Version, chunks: list[int]) -> None:
        got.append(await reads.fetch(7, version, chunks))

    async def go() -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(8):  # eight guests booting from one image
                nursery.start_soon(ask, V1, [3])
            nursery.start_soon(ask, V1, [3, 4, 9])
            nursery.start_soon(ask, V2, [3])  # another version of the file: never the old bytes

    trio.run(go)
    assert sorted(peers.asked) == sorted([(7, V1, 3), (7, V1, 4), (7, V1, 9), (7, V2, 3)])
    v1_3 = bytes([3]) * 8 + (1).to_bytes(8, "big")
    assert got.count({3: v1_3}) == 8
    assert {3: v1_3, 4: bytes([4]) * 8 + (1).to_bytes(8, "big")} in got  # chunk 9: no peer had it
    assert {3: bytes([3]) * 8 + (2).to_bytes(8, "big")} in got
    assert reads.joined == 8  # seven of the eight, and the three-chunk ask's chunk 3
    assert not reads._flights


def test_a_waiter_gives_up_at_its_own_deadline_and_a_later_ask_fetches_again() -> None:
    peers = CountingPeers(0.3)
    reads = PeerReads(peers, files=None)  # type: ignore[arg-type]
    results: dict[str, dict[int, bytes]] = {}

    async def go() -> None:
        async def slow() -> None:
            results["first"] = await reads.fetch(7, V1, [1])

        async def hurried() -> None:
            await trio.sleep(0.01)
            results["hurried"] = await reads.fetch(7, V1, [1], timeout=0.05)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(slow)
            nursery.start_soon(hurried)
        results["later"] = await reads.fetch(7, V1, [1])

    trio.run(go)
    assert results["hurried"] == {}  # it read the backing instead of waiting past its deadline
    assert results["first"] == results["later"] != {}
    assert len(peers.asked) == 2  # once for the first two, again for the later ask (nothing kept after a flight)


class AheadPeers(CountingPeers):
    """CountingPeers whose summary says they hold every chunk but `absent`, and whose answers carry `content` (bumped by a write)."""

    def __init__(self, delay: float, absent: frozenset[int] = frozenset(), slow_from: int | None = None) -> None:
        super().__init__(delay)
        self.absent = absent
        self.content = 0
        self.slow_from = slow_from  # chunks from this one on take 5x `delay`

    def may_hold_location(self, ino: int, version: Version, chunk: int) -> bool:
        return chunk not in self.absent

    async def fetch_location(self, ino: int, version: Version, chunk: int, deadline: float) -> bytes | None:
        content = self.content  # the bytes as they are when asked
        self.asked.append((ino, version, chunk))
        await trio.sleep(self.delay * (5 if self.slow_from is not None and chunk >= self.slow_from else 1))
        return None if chunk in self.absent else bytes([chunk, content]) * 4


class _File:
    """An open file as the cache's Reader shows it: a stamp a write moves, a size, chunks the cache holds."""

    def __init__(self, chunks: int, held: set[int]) -> None:
        self.epoch = 0
        self.writing = False
        self.reader = Reader(7, "disk.img", None, 1, chunks * CS, self.stamp, None, held_range=lambda a, b: held & set(range(a, b + 1)))

    def stamp(self) -> tuple[int, int] | None:
        return None if self.writing else (1, self.epoch)


def _with_readahead(peers: AheadPeers, body: Callable[[PeerReads], Awaitable[None]]) -> PeerReads:
    reads = PeerReads(peers, files=None)  # type: ignore[arg-type]

    async def go() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reads.run)
            await body(reads)
            nursery.cancel_scope.cancel()

    trio.run(go)
    return reads


def test_a_sequential_stream_from_peers_is_read_ahead_and_each_chunk_fetched_once() -> None:
    """Two-chunk requests in order: from the second on, the chunks after them are fetched in the background; a
    request then finds its chunks there (no round trip) or in flight (waits for that fetch). Every chunk is asked
    of the peers once, none the cache holds, none no peer holds, none past the end of the file."""
    peers = AheadPeers(0.01, absent=frozenset({11}))
    f = _File(24, held={7})

    async def body(reads: PeerReads) -> None:
        for first in range(0, 24, 2):
            want = [c for c in (first, first + 1) if c not in (7,)]
            got = await reads.fetch(7, V1, want, ahead=f.reader)
            assert got == {c: bytes([c, 0]) * 4 for c in want if c != 11}
            await trio.sleep(0.03)  # the guest's own time between reads: the readahead lands meanwhile

    reads = _with_readahead(peers, body)
    asked = [c for _, _, c in peers.asked]
    # (chunk 11 is asked once, by its request: the readahead skips what no peer's summary holds)
    assert sorted(asked) == sorted(set(asked)), "a chunk was fetched twice"
    assert set(asked) == set(range(24)) - {7}
    assert reads.read_ahead_used >= 15 and reads.read_ahead >= reads.read_ahead_used
    assert not reads._flights


def test_random_reads_from_peers_get_no_readahead() -> None:
    peers = AheadPeers(0.001)
    f = _File(64, held=set())

    async def body(reads: PeerReads) -> None:
        for c in (40, 3, 17, 60, 9, 33):
            assert await reads.fetch(7, V1, [c], ahead=f.reader) == {c: bytes([c, 0]) * 4}
        await trio.sleep(0.02)

    reads = _with_readahead(peers, body)
    assert [c for _, _, c in peers.asked] == [40, 3, 17, 60, 9, 33]
    assert reads.read_ahead == 0


def test_chunks_fetched_ahead_never_answer_a_request_after_a_write() -> None:
    """A write through the mount moves the file's stamp: what was fetched ahead before it is not served after it,
    whether it landed before the write or while the write was in flight; the chunks are fetched again."""
    peers = AheadPeers(0.01)
    f = _File(32, held=set())

    async def body(reads: PeerReads) -> None:
        for c in range(3):
            assert await reads.fetch(7, V1, [c], ahead=f.reader) == {c: bytes([c, 0]) * 4}
        await trio.sleep(0.05)
        assert reads._ready, "nothing was fetched ahead"
        # a write: in flight (no stamp), the content moves, it ends (a new epoch)
        f.writing = True
        peers.content = 1
        f.writing = False
        f.epoch += 1
        assert await reads.fetch(7, V1, [3], ahead=f.reader) == {3: bytes([3, 1]) * 4}
        assert await reads.fetch(7, V1, [4], ahead=f.reader) == {4: bytes([4, 1]) * 4}

    _with_readahead(peers, body)
    assert [c for _, _, c in peers.asked].count(3) == 2


def test_a_chunk_fetched_ahead_while_a_write_is_in_flight_is_not_kept() -> None:
    peers = AheadPeers(0.01, slow_from=2)
    f = _File(32, held=set())

    async def body(reads: PeerReads) -> None:
        for c in range(2):
            await reads.fetch(7, V1, [c], ahead=f.reader)
        assert len(reads._flights) == 4  # chunks 2-5, fetched ahead
        f.writing = True  # while they are in flight
        await trio.sleep(0.1)
        assert not reads._flights
        f.writing = False
        f.epoch += 1
        assert not reads._ready
        assert reads.read_ahead == 4

    _with_readahead(peers, body)


def test_a_stream_whose_requests_come_reordered_by_queue_depth_is_still_read_ahead() -> None:
    """QEMU keeps several requests of a guest in flight: neighbours arrive out of order (here in pairs swapped).
    That is still one sequential stream: it is read ahead, and no chunk is fetched twice."""
    peers = AheadPeers(0.01)
    f = _File(40, held=set())

    async def body(reads: PeerReads) -> None:
        order = [0, 4, 2, 8, 6, 12, 10, 16, 14, 20, 18, 24, 22, 28, 26, 32, 30]
        for first in order:
            got = await reads.fetch(7, V1, [first, first + 1], ahead=f.reader)
            assert got == {c: bytes([c, 0]) * 4 for c in (first, first + 1)}
            await trio.sleep(0.03)

    reads = _with_readahead(peers, body)
    asked = [c for _, _, c in peers.asked]
    assert sorted(asked) == sorted(set(asked)), "a chunk was fetched twice"
    assert reads.read_ahead_used >= 16


class FailingPeers(AheadPeers):
    """AheadPeers whose fetches of chunks in `broken` raise (a bug of ours, not a peer's answer)."""

    def __init__(self, delay: float, broken: frozenset[int]) -> None:
        super().__init__(delay)
        self.broken = broken

    async def fetch_location(self, ino: int, version: Version, chunk: int, deadline: float) -> bytes | None:
        if chunk in self.broken:
            raise RuntimeError(f"a bug fetching chunk {chunk}")
        return await super().fetch_location(ino, version, chunk, deadline)


def test_a_failing_readahead_is_logged_and_dropped_and_the_rest_goes_on(expect_log: Callable[..., None]) -> None:
    """Readahead is a guess: an error in one fetch ahead does not take its task (or the mount's nursery) down."""
    expect_log("reading ahead from peers failed")
    peers = FailingPeers(0.005, broken=frozenset({5, 6}))
    f = _File(24, held=set())

    async def body(reads: PeerReads) -> None:
        for c in range(4):
            await reads.fetch(7, V1, [c], ahead=f.reader)
            await trio.sleep(0.02)
        for c in range(7, 16):  # (a request for 5 or 6 would raise here too: the cache counts that as a fault)
            assert await reads.fetch(7, V1, [c], ahead=f.reader) == {c: bytes([c, 0]) * 4}
            await trio.sleep(0.02)

    reads = _with_readahead(peers, body)
    assert reads.read_ahead_errors == 2  # (logged both times: the 1st and 2nd)
    assert reads.read_ahead_used >= 6


def test_a_request_that_joins_a_chunk_still_being_fetched_ahead_counts_as_a_use() -> None:
    """A stream with no time between its requests catches its readahead in flight: each request waits for that
    fetch, and each chunk fetched ahead is counted as used, once, whether it was taken from the buffer or in flight."""
    peers = AheadPeers(0.01)
    f = _File(32, held=set())

    async def body(reads: PeerReads) -> None:
        for c in range(32):
            assert await reads.fetch(7, V1, [c], ahead=f.reader) == {c: bytes([c, 0]) * 4}

    reads = _with_readahead(peers, body)
    assert sorted(c for _, _, c in peers.asked) == list(range(32))  # each chunk asked once
    assert reads.joined > 0  # (the case at hand: requests came while their chunk was in flight)
    assert reads.read_ahead > 16
    assert reads.read_ahead_used == reads.read_ahead  # the whole file was read: every chunk fetched ahead was used
