"""What the cache asks of its peers: chunks of a file's current version within one bounded wait,
whether a peer holds a chunk (for admission by reference), and how much of this cache a peer
also holds (the dedup across hosts, counted every few seconds for stats).

Readahead from peers: a sequential stream (detected per open file, in chunks) that reads from
peers gets the chunks after its request fetched in the background, a window that grows with
the stream (READ_AHEAD_MAX chunks at most), of the chunks a peer's summary says it holds and
this cache does not. What comes back waits in a bounded buffer (READY_BYTES, oldest dropped
first) until a request asks for it, which then costs no round trip; a request for a chunk
still being fetched ahead waits for that fetch, as for any other. Each fetched-ahead chunk
keeps the file's version it was asked for (its key) and the file's stamp then (generation,
write epoch): it serves a request only while both are still the file's, so a write through
this mount, or a change seen from elsewhere, is never answered with bytes from before it.
Nothing fetched ahead is admitted: a request that takes it offers it for admission as any
peer answer. Bytes from the NFS server are never read ahead for chunks a peer holds (the
fetcher reads ahead only for what went to the backing).
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING

import trio

from fusecache.fetch import Reader
from fusecache.files import Files
from fusecache.geometry import CHUNK_SIZE
from fusecache.store_queue import Key
from fusecache.version import UNKNOWN, Version

if TYPE_CHECKING:
    from fusecache.peers import PeerSet

log = logging.getLogger(__name__)

CLUSTER_SAMPLE = 200_000  # locations looked at per count of cluster holdings
READ_AHEAD_MAX = 16  # chunks fetched ahead of a sequential stream at most (1 MiB)
READY_BYTES = 16 << 20  # chunks fetched ahead and not yet asked for, at most
READ_AHEAD_TASKS = 8  # fetches ahead in flight at once (each one chunk from one peer)
QUEUE_SLACK = 4  # requests a stream's request may come behind its neighbours and still count as sequential
READ_AHEAD_QUEUED = 256  # chunks waiting to be fetched ahead, at most (the oldest, least likely still useful, dropped)

Stamp = Hashable  # the file's (generation, write epoch) when a fetch ahead was asked; None while a write is in flight


class _Stream:
    __slots__ = ("ahead", "next", "run")

    def __init__(self) -> None:
        self.next = -1  # the chunk a sequential next request would start in
        self.run = 0  # sequential requests in a row
        self.ahead = -1  # the last chunk fetched ahead so far


class _Flight:
    """One chunk being fetched from the peers: whoever asks for it meanwhile waits for this answer."""

    __slots__ = ("data", "done", "joined")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.data: bytes | None = None
        self.joined = 0  # requests waiting for this answer besides the one that asked (or the readahead)


class PeerReads:
    def __init__(self, peers: PeerSet, files: Files) -> None:
        self.peers = peers
        self.files = files
        # Chunks being fetched, by (ino, version, chunk): guests booting from one image ask for the same
        # chunks at once, and each must not cost the peer (and the link) another copy. Keyed by version, so
        # a read after a change never waits for the old bytes.
        self._flights: dict[tuple[int, Version, int], _Flight] = {}
        self.joined = 0  # fetches that waited for another's answer instead of asking the peers again
        # fetched ahead, not yet asked for: (ino, version, chunk) -> (the file's stamp when asked, bytes), oldest first
        self._ready: collections.OrderedDict[tuple[int, Version, int], tuple[Stamp, bytes]] = collections.OrderedDict()
        self._ready_bytes = 0
        self._streams: dict[Hashable, _Stream] = {}
        self._todo: collections.deque[tuple[tuple[int, Version, int], Stamp, Callable[[], Stamp | None]]] = collections.deque()
        self._lot = trio.lowlevel.ParkingLot()  # readahead tasks with nothing to fetch
        self.read_ahead = 0  # chunks fetched ahead from peers
        self.read_ahead_used = 0  # of those, asked for by a request (in flight, or kept) before they were dropped
        self.read_ahead_errors = 0  # fetches ahead that failed with an error of ours (logged; the request reads anyway)

    async def run(self) -> None:
        """The readahead's fetching tasks; cancel to stop."""
        async with trio.open_nursery() as nursery:
            for _ in range(READ_AHEAD_TASKS):
                nursery.start_soon(self._fetch_ahead)

    def closed(self, stream: Hashable) -> None:
        """An open file closed: forget its stream."""
        self._streams.pop(stream, None)

    async def _location(self, ino: int, version: Version, c: int, deadline: float, stamp: Stamp | None = None) -> bytes | None:
        """Chunk c from the peers (`PeerSet.fetch_location`), asked once however many requests want it meanwhile.

        `stamp`: the file's stamp now (a request's; None: not a request, or a write in flight): a chunk fetched
        ahead under that stamp is the answer, no round trip.
        """
        key = (ino, version, c)
        if stamp is not None:
            ready = self._ready.pop(key, None)
            if ready is not None:
                self._ready_bytes -= len(ready[1])
                if ready[0] == stamp:
                    self.read_ahead_used += 1
                    return ready[1]
        flight = self._flights.get(key)
        if flight is not None:
            self.joined += 1
            flight.joined += 1
            with trio.move_on_at(deadline):
                await flight.done.wait()
            return flight.data
        return (await self._fly(key, deadline)).data

    async def _fly(self, key: tuple[int, Version, int], deadline: float) -> _Flight:
        """Ask the peers for one chunk, as the one flight for it: whoever wants it meanwhile waits for this answer."""
        flight = self._flights[key] = _Flight()
        try:
            flight.data = await self.peers.fetch_location(*key, deadline)
        finally:
            del self._flights[key]
            flight.done.set()  # an answer, or None (not held, timed out, cancelled): then each reads the backing
        return flight

    async def fetch(
        self, ino: int, version: Version, chunks: list[int], timeout: float | None = None, ahead: Reader | None = None
    ) -> dict[int, bytes]:
        """Chunks that peers send within one bounded wait (each checked against its page digests by PeerSet).

        The wait is --peer-timeout unless `timeout` is given (a warm, which no guest waits for, can wait longer).
        `ahead`: the request's open file (a guest's read): its stream is read ahead, and what was read ahead
        for it answers it.
        """
        peers = self.peers
        deadline = trio.current_time() + (peers.fetch_timeout if timeout is None else timeout)
        stamp = None
        if ahead is not None:
            stamp = ahead.stamp()
            if stamp is not None:
                self._note(ahead, ino, version, chunks[0], chunks[-1], stamp)
        if len(chunks) == 1:  # the common case (a request within one chunk): no nursery, no task to start
            data = await self._location(ino, version, chunks[0], deadline, stamp)
            return {} if data is None else {chunks[0]: data}
        offered: dict[int, bytes] = {}

        async def one(c: int) -> None:
            data = await self._location(ino, version, c, deadline, stamp)
            if data is not None:
                offered[c] = data

        async with trio.open_nursery() as nursery:
            for c in chunks:
                nursery.start_soon(one, c)
        return offered

    def _note(self, ahead: Reader, ino: int, version: Version, first: int, last: int, stamp: Stamp) -> None:
        """Sequential detection for the request's open file; a sequential stream's next chunks are queued to fetch ahead."""
        s = self._streams.get(ahead.stream)
        if s is None:
            s = self._streams[ahead.stream] = _Stream()
        # (a request may start in the chunk the last one ended in; and some slack: a guest's queue depth reorders
        # neighbouring requests, one of up to QUEUE_SLACK requests issued together may come after those beyond it)
        n = last - first + 1
        if s.next >= 0 and s.next - QUEUE_SLACK * n - 1 <= first <= s.next + n:
            s.run += 1
            s.next = max(s.next, last + 1)
        else:
            s.run = 0
            s.ahead = -1
            s.next = last + 1
        if s.run == 0:
            return
        window = min(READ_AHEAD_MAX, 2 << min(s.run, 4))
        start, end = max(s.ahead + 1, last + 1), last + window
        if ahead.size is not None:
            end = min(end, (ahead.size - 1) // CHUNK_SIZE)
        if start > end or s.ahead - last > window // 2:
            return  # (topped up once half the window is read)
        s.ahead = end
        held = ahead.held_in(start, end)
        peers, flights, ready = self.peers, self._flights, self._ready
        for c in range(start, end + 1):
            key = (ino, version, c)
            if c in held or key in flights or key in ready or not peers.may_hold_location(ino, version, c):
                continue
            self._todo.append((key, stamp, ahead.stamp))
        while len(self._todo) > READ_AHEAD_QUEUED:
            self._todo.popleft()
        if self._todo:
            self._lot.unpark_all()

    async def _fetch_ahead(self) -> None:
        """One readahead task: fetch queued chunks one at a time; keep each answer while the file's stamp holds.

        A readahead is a guess: whatever fails in one (a bug included) is logged and dropped, never the mount's
        tasks; a request for that chunk asks the peers itself, then the backing."""
        todo = self._todo
        while True:
            while not todo:
                await self._lot.park()
            try:
                await self._fetch_one_ahead(*todo.popleft())
            except Exception:
                self.read_ahead_errors += 1
                if self.read_ahead_errors & (self.read_ahead_errors - 1) == 0:  # the 1st, 2nd, 4th, 8th...
                    log.exception("reading ahead from peers failed (%d times so far); requests ask for themselves", self.read_ahead_errors)

    async def _fetch_one_ahead(self, key: tuple[int, Version, int], stamp: Stamp, stamp_now: Callable[[], Stamp | None]) -> None:
        if key in self._flights or key in self._ready or stamp_now() != stamp:
            return
        flight = await self._fly(key, trio.current_time() + self.peers.fetch_timeout)
        data = flight.data
        if data is None:
            return
        self.read_ahead += 1
        if flight.joined:  # requests asked for it while it was fetched: they had this answer
            self.read_ahead_used += 1
            return
        if stamp_now() != stamp:
            return  # a write came between
        self._ready[key] = (stamp, data)
        self._ready_bytes += len(data)
        while self._ready_bytes > READY_BYTES:
            self._ready_bytes -= len(self._ready.popitem(last=False)[1][1])

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
