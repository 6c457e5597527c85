"""What the cache asks of its peers: chunks of a file's current version within one bounded wait,
whether a peer holds a chunk (for admission by reference), and how much of this cache a peer
also holds (the dedup across hosts, counted every few seconds for stats)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from fusecache.files import Files
from fusecache.store_queue import Key
from fusecache.version import UNKNOWN, Version

if TYPE_CHECKING:
    from fusecache.peers import PeerSet

CLUSTER_SAMPLE = 200_000  # locations looked at per count of cluster holdings


class _Flight:
    """One chunk being fetched from the peers: whoever asks for it meanwhile waits for this answer."""

    __slots__ = ("data", "done")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.data: bytes | None = None


class PeerReads:
    def __init__(self, peers: PeerSet, files: Files) -> None:
        self.peers = peers
        self.files = files
        # Chunks being fetched, by (ino, version, chunk): guests booting from one image ask for the same
        # chunks at once, and each must not cost the peer (and the link) another copy. Keyed by version, so
        # a read after a change never waits for the old bytes.
        self._flights: dict[tuple[int, Version, int], _Flight] = {}
        self.joined = 0  # fetches that waited for another's answer instead of asking the peers again

    async def _location(self, ino: int, version: Version, c: int, deadline: float) -> bytes | None:
        """Chunk c from the peers (`PeerSet.fetch_location`), asked once however many requests want it meanwhile."""
        key = (ino, version, c)
        flight = self._flights.get(key)
        if flight is not None:
            self.joined += 1
            with trio.move_on_at(deadline):
                await flight.done.wait()
            return flight.data
        flight = self._flights[key] = _Flight()
        try:
            flight.data = await self.peers.fetch_location(ino, version, c, deadline)
        finally:
            del self._flights[key]
            flight.done.set()  # an answer, or None (not held, timed out, cancelled): then each reads the backing
        return flight.data

    async def fetch(self, ino: int, version: Version, chunks: list[int], timeout: float | None = None) -> dict[int, bytes]:
        """Chunks that peers send within one bounded wait (each checked against its page digests by PeerSet).

        The wait is --peer-timeout unless `timeout` is given (a warm, which no guest waits for, can wait longer).
        """
        peers = self.peers
        deadline = trio.current_time() + (peers.fetch_timeout if timeout is None else timeout)
        if len(chunks) == 1:  # the common case (a request within one chunk): no nursery, no task to start
            data = await self._location(ino, version, chunks[0], deadline)
            return {} if data is None else {chunks[0]: data}
        offered: dict[int, bytes] = {}

        async def one(c: int) -> None:
            data = await self._location(ino, version, c, deadline)
            if data is not None:
                offered[c] = data

        async with trio.open_nursery() as nursery:
            for c in chunks:
                nursery.start_soon(one, c)
        return offered

    def holds(self, key: Key) -> bool:
        """Whether a peer's summary says it holds this chunk of the file's current version."""
        st = self.files.get(key[0])
        if st.gen != key[1] or st.version is None or st.version == UNKNOWN:
            return False
        return self.peers.may_hold_location(key[0], st.version, key[2])

    async def cluster_holdings(self, limit: int = CLUSTER_SAMPLE) -> tuple[int, int]:
        """(chunks held here that a peer also holds, chunks held only here), over a sample of up to `limit`."""
        also = only = 0
        for n, (ino, version, chunk) in enumerate(self.files.store.iter_locations()):
            if n >= limit:
                break
            if self.peers.may_hold_location(ino, version, chunk):
                also += 1
            else:
                only += 1
            if n % 1000 == 999:
                await trio.sleep(0)  # let requests in
        return also, only
