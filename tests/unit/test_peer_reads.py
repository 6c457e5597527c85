"""PeerReads' single flight: requests wanting the same chunk at once cost the peers one fetch of it."""

from __future__ import annotations

import trio

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
