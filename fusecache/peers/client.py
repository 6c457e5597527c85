"""The peer client: connections to every peer, their summaries, and fetches with a deadline.

This module owns the asking side. `PeerSet` keeps one authenticated
connection per peer (reconnecting with backoff), holds each peer's latest
Bloom summaries, measures each peer's round trip, and fetches a page or a
chunk from the peers whose summary says they may hold it, fastest first,
giving up at a deadline so the caller can read the backing instead. A page
received is checked against the name it was asked by, a chunk against its
length in the file's version (its bytes are the frame MAC's); a peer that
sends a wrong one is dropped and left alone for `ban_seconds`.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import random
from collections.abc import Callable

import trio

from fusecache.peers.protocol import (
    CHUNK,
    CHUNK_SIZE,
    ERROR,
    GET_LOCATION,
    GET_PAGE,
    MAX_HASHES,
    MAX_SUMMARY_BYTES,
    NOT_FOUND,
    PAGE,
    PAGE_SIZE,
    PING,
    PONG,
    SUMMARY,
    SUMMARY_DIGESTS,
    SUMMARY_HEAD,
    SUMMARY_LOCATIONS,
    BadFrame,
    Frame,
    FramedStream,
    FrameWriter,
    ProtocolError,
    Version,
    client_handshake,
    encode_location,
    hole_digest,
    names_key,
    page_matches,
    session_key,
    split_address,
)
from fusecache.peers.server import PeerServer
from fusecache.peers.summary import BloomFilter

log = logging.getLogger(__name__)

LOST = -1  # a local answer type: the connection went down before the answer came
RTT_WEIGHT = 0.2  # of each new sample in the round-trip EWMA
MIN_HEDGE = 0.0005  # ask the next peer after max(2 rtt, this) without an answer
FIRST_BACKOFF = 0.05

Answer = tuple["_Peer", int, bytes]


class _Answers:
    """Where the answers to one fetch arrive, from the connections' reading tasks.

    A memory channel did this, at about three times the Python per answer (its
    checkpoints and bookkeeping): the one waiting task is woken directly. Unbounded
    by construction: a fetch asks each peer at most once.
    """

    __slots__ = ("_items", "_task")

    def __init__(self) -> None:
        self._items: collections.deque[Answer] = collections.deque()
        self._task: trio.lowlevel.Task | None = None

    @property
    def ready(self) -> bool:
        """Whether an answer is here: `receive` returns it without waiting."""
        return bool(self._items)

    def send_nowait(self, answer: Answer) -> None:
        self._items.append(answer)
        if self._task is not None:
            task, self._task = self._task, None
            trio.lowlevel.reschedule(task)

    async def receive(self) -> Answer:
        if not self._items:
            self._task = trio.lowlevel.current_task()

            def abort(_: object) -> trio.lowlevel.Abort:
                self._task = None
                return trio.lowlevel.Abort.SUCCEEDED

            await trio.lowlevel.wait_task_rescheduled(abort)
        return self._items.popleft()


@dataclasses.dataclass
class PeerStats:
    """One peer as this host sees it. `hits_given` is what our server gave that host."""

    up: bool = False
    rtt_ms: float | None = None
    connects: int = 0
    requests: int = 0
    hits_taken: int = 0
    hits_given: int = 0
    not_found: int = 0
    errors: int = 0
    abandoned: int = 0  # requests given up on: deadline passed, or another peer answered first
    corrupt_blocks: int = 0
    protocol_errors: int = 0  # sessions that ended on a bad frame (wrong MAC, malformed): the peer is then banned
    summaries_refused: int = 0  # summaries fuller than an honest one can be (see BloomFilter.plausible): not used
    lost: int = 0  # requests in flight when a session ended
    peak_outstanding: int = 0  # most requests waiting for an answer on the connection at once
    bytes_in: int = 0
    bytes_out: int = 0
    summary_pages: int = 0
    summary_locations: int = 0


@dataclasses.dataclass
class _SummaryInProgress:
    generation: int
    bloom: BloomFilter
    received: int = 0
    ones: int = 0  # bits set in the parts received


class _Peer:
    """One peer's connection state; touched only on the trio thread."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.host, self.port = split_address(address)
        self.ip: str | None = None
        self.stats = PeerStats()
        self.rtt: float | None = None
        self.banned_until = 0.0
        self.summaries: dict[int, BloomFilter] = {}
        self.in_progress: dict[int, _SummaryInProgress] = {}
        self.pending: dict[int, tuple[_Answers | None, float]] = {}
        self.writer: FrameWriter | None = None  # while connected
        self.scope: trio.CancelScope | None = None
        self.connected = False  # authenticated, until `_keep_connected` notes the end
        # Reading the connection's frames (see `PeerSet._lead`): one task at a time, the connection's reading
        # task or a fetch that leads. All None / False between connections.
        self.framed: FramedStream | None = None
        self.leading = False  # a fetch reads the socket: the reading task is parked on `lot`
        self.waiting: trio.CancelScope | None = None  # the reading task's wait on the socket, which a fetch cancels to lead
        self.lot = trio.lowlevel.ParkingLot()  # where the reading task waits while a fetch leads
        self.failure: BaseException | None = None  # what ended a lead's reading: the reading task raises it
        self.quiet: trio.CancelScope | None = None  # the reading task's silence limit, moved on by every frame
        self._next_id = 0

    def may_hold(self, kind: int, key: bytes) -> bool:
        bloom = self.summaries.get(kind)
        return self.writer is not None and bloom is not None and key in bloom

    def new_request_id(self) -> int:
        while True:
            self._next_id = (self._next_id + 1) & 0xFFFFFFFF
            if self._next_id and self._next_id not in self.pending:
                return self._next_id

    def note_rtt(self, sample: float) -> None:
        self.rtt = sample if self.rtt is None else (1 - RTT_WEIGHT) * self.rtt + RTT_WEIGHT * sample


class PeerSet:
    """Connections to `peers` ('host:port' each), and fetches from them."""

    def __init__(
        self,
        peers: list[str],
        key: bytes | None,
        *,
        fetch_timeout: float = 0.005,
        connect_timeout: float = 1.0,
        ping_interval: float = 1.0,
        ban_seconds: float = 60.0,
        max_backoff: float = 5.0,
        max_outstanding: int = 256,
        server: PeerServer | None = None,
    ) -> None:
        self._key = session_key(key, peers)
        self._names = names_key(key)  # the store's names key when peering: assemble gives it the same
        self._hole = hole_digest(self._names)
        self._peers = [_Peer(a) for a in peers]
        self.fetch_timeout = fetch_timeout
        self._connect_timeout = connect_timeout
        self._ping_interval = ping_interval
        self._ban_seconds = ban_seconds
        self._max_backoff = max_backoff
        self._max_outstanding = max_outstanding
        self._server = server

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep every peer connected until cancelled. Fetches before a peer is up return None."""
        async with trio.open_nursery() as nursery:
            for peer in self._peers:
                nursery.start_soon(self._keep_connected, peer)
            task_status.started()

    def may_hold(self, digest: bytes) -> bool:
        """Whether some reachable peer's summary says it may hold the page `digest`."""
        return any(p.may_hold(SUMMARY_DIGESTS, digest) for p in self._peers)

    def may_hold_location(self, ino: int, version: Version, chunk: int) -> bool:
        """Whether some reachable peer's summary says it may hold that chunk of that version of the file."""
        key = encode_location(ino, version, chunk)
        return any(p.may_hold(SUMMARY_LOCATIONS, key) for p in self._peers)

    def stats(self) -> dict[str, PeerStats]:
        given = self._server.stats() if self._server is not None else {}
        out = {}
        for peer in self._peers:
            s = dataclasses.replace(peer.stats, up=peer.writer is not None)
            s.rtt_ms = peer.rtt * 1000 if peer.rtt is not None else None
            if peer.ip in given:
                s.hits_given = given[peer.ip].hits_given
            out[peer.address] = s
        return out

    async def fetch_page(self, digest: bytes, deadline: float | None = None) -> bytes | None:
        """The page named `digest` from a peer, checked, or None by `deadline` (trio clock;
        default now + fetch_timeout)."""
        if digest == self._hole:
            return bytes(PAGE_SIZE)

        def check(type_: int, payload: bytes) -> bytes | None:
            if type_ == PAGE and page_matches(self._names, payload, digest):
                return payload
            raise ProtocolError(f"a wrong page for {digest.hex()}")

        return await self._fetch(GET_PAGE, digest, SUMMARY_DIGESTS, digest, check, deadline)

    async def fetch_location(self, ino: int, version: Version, chunk: int, deadline: float | None = None) -> bytes | None:
        """Chunk `chunk` of version `version` of file `ino` from a peer, or None by `deadline` (trio clock;
        default now + fetch_timeout). The frame's MAC says a host of the cluster sent these bytes, and
        their length must be that chunk's in that version (its size is part of the version)."""
        location = encode_location(ino, version, chunk)
        length = min(CHUNK_SIZE, version[0] - chunk * CHUNK_SIZE)
        if length <= 0:
            return None

        def check(type_: int, payload: bytes) -> bytes | None:
            if type_ == CHUNK and len(payload) == length:
                return payload
            raise ProtocolError(f"a wrong chunk for ino {ino} chunk {chunk} ({len(payload)} bytes, not {length})")

        return await self._fetch(GET_LOCATION, location, SUMMARY_LOCATIONS, location, check, deadline)

    async def _fetch(
        self,
        type_: int,
        payload: bytes,
        kind: int,
        key: bytes,
        check: Callable[[int, bytes], bytes | None],
        deadline: float | None,
    ) -> bytes | None:
        now = trio.current_time()
        deadline = now + self.fetch_timeout if deadline is None else deadline
        candidates = sorted((p for p in self._peers if p.may_hold(kind, key)), key=lambda p: p.rtt or 0.0)
        if not candidates:
            return None
        answers = _Answers()
        asked: dict[_Peer, int] = {}
        untried = collections.deque(candidates)

        def ask_next() -> _Peer | None:
            while untried:
                peer = untried.popleft()
                if self._ask(peer, type_, payload, answers, asked):
                    return peer
            return None

        last = ask_next()
        try:
            with trio.move_on_at(deadline):
                while asked:
                    # Hedge: a peer slower than twice its usual round trip may be
                    # stuck; ask the next one too and take whichever answers first.
                    answer = None
                    if last and untried:
                        with trio.move_on_at(trio.current_time() + max(2 * (last.rtt or 0.0), MIN_HEDGE)):
                            answer = await self._wait(answers, asked)
                    else:  # no one left to hedge with: no scope to set up and tear down
                        answer = await self._wait(answers, asked)
                    if answer is None:
                        last = ask_next() or last
                        continue
                    peer, answer_type, answer_payload = answer
                    del asked[peer]
                    if answer_type in (NOT_FOUND, ERROR, LOST):
                        peer.stats.not_found += answer_type == NOT_FOUND
                        peer.stats.errors += answer_type == ERROR
                    else:
                        try:
                            block = check(answer_type, answer_payload)
                        except ProtocolError as e:
                            self._drop(peer, str(e))
                        else:
                            peer.stats.hits_taken += 1
                            peer.stats.bytes_in += len(answer_payload)
                            return block
                    if not asked:
                        last = ask_next()
            return None
        finally:
            for peer, request_id in asked.items():
                peer.pending.pop(request_id, None)
                peer.stats.abandoned += 1

    async def _wait(self, answers: _Answers, asked: dict[_Peer, int]) -> Answer:
        """The next answer of a fetch: read from the socket by the fetch itself (`_lead`) when it waits for one
        peer whose socket nobody else is reading, else handed over by the connections' reading tasks."""
        if len(asked) == 1 and not answers.ready:
            peer = next(iter(asked))
            if not peer.leading and peer.framed is not None:
                await self._lead(peer, answers)
        return await answers.receive()

    async def _lead(self, peer: _Peer, answers: _Answers) -> None:
        """Read `peer`'s frames in this (the fetch's) task until `answers` has one, or the reading stops.

        The connection's reading task would otherwise read the answer and wake the fetch: a trio loop pass and
        its own next receive between the answer's arrival and the fetch (~50 us of a peer hit here). The reading
        task steps aside (its wait on the socket is cancelled, which takes effect at once) and is woken when the
        fetch is done; frames for other fetches read meanwhile are handed to them as the reading task would.
        A fault of the connection met here is left for the reading task to raise (`failure`): it ends the
        connection, and every fetch waiting on it, this one too, gets LOST.
        """
        framed = peer.framed
        assert framed is not None
        sock = framed.socket
        assert sock is not None  # (a connection made by `_connect_and_serve`: TCP)
        peer.leading = True
        if peer.waiting is not None:
            peer.waiting.cancel()
        try:
            taken = 0
            while not answers.ready and peer.framed is framed and peer.failure is None:
                try:
                    frame = framed.receive_nowait(sock.fileno())
                    if frame is None:
                        await trio.lowlevel.wait_readable(sock)
                        continue
                    self._take(peer, frame)
                except (ProtocolError, OSError, trio.ClosedResourceError) as exc:
                    if peer.framed is framed:  # (a socket closed under the wait: the connection has ended)
                        peer.failure = exc
                    return
                taken += 1
                if taken % 16 == 0:  # a stream of others' frames: let the rest of the loop run too
                    await trio.lowlevel.checkpoint()
        finally:
            peer.leading = False
            peer.lot.unpark_all()

    def _ask(self, peer: _Peer, type_: int, payload: bytes, answers: _Answers, asked: dict[_Peer, int]) -> bool:
        if peer.writer is None or len(peer.pending) >= self._max_outstanding:
            return False
        request_id = peer.new_request_id()
        peer.writer.send_nowait(type_, request_id, payload)
        peer.pending[request_id] = (answers, trio.current_time())
        peer.stats.peak_outstanding = max(peer.stats.peak_outstanding, len(peer.pending))
        peer.stats.requests += 1
        peer.stats.bytes_out += len(payload)
        asked[peer] = request_id
        return True

    def _drop(self, peer: _Peer, reason: str) -> None:
        """`peer` sent a block that fails its digests: disconnect, and ask it nothing for a while."""
        peer.stats.corrupt_blocks += 1
        peer.banned_until = trio.current_time() + self._ban_seconds
        peer.summaries.clear()
        log.warning("peer %s sent %s: disconnecting it for %.0f s", peer.address, reason, self._ban_seconds)
        if peer.scope is not None:
            peer.scope.cancel()

    async def _keep_connected(self, peer: _Peer) -> None:
        backoff = FIRST_BACKOFF
        last_reason = None
        while True:
            await trio.sleep_until(peer.banned_until)
            reason = "disconnected"
            bad_frames = False
            try:
                await self._connect_and_serve(peer)
            except* ProtocolError as group:
                reason = "; ".join(str(e) for e in group.exceptions)
                bad_frames = any(isinstance(e, BadFrame) for e in group.exceptions)
            except* (OSError, trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError) as group:
                reason = "unreachable: " + "; ".join(str(e) or type(e).__name__ for e in group.exceptions)
            if bad_frames and peer.banned_until <= trio.current_time():
                # A peer (or the path to it) that sends frames failing their MAC is broken or tampered
                # with: leave it alone for a while instead of reconnecting in a tight loop.
                peer.stats.protocol_errors += 1
                peer.banned_until = trio.current_time() + self._ban_seconds
                log.warning("peer %s: %s: not asked again for %.0f s", peer.address, reason, self._ban_seconds)
                peer.connected = False
                last_reason = reason
                continue
            if peer.connected:
                if peer.banned_until <= trio.current_time():  # a drop was logged by `_drop`
                    log.warning("peer %s is down: %s", peer.address, reason)
                peer.connected = False
                backoff = FIRST_BACKOFF
            elif reason != last_reason:  # one line per new reason, not one per retry
                log.warning("peer %s: %s", peer.address, reason)
            last_reason = reason
            await trio.sleep(backoff * random.uniform(0.8, 1.2))  # jitter: peers do not reconnect in step
            backoff = min(2 * backoff, self._max_backoff)

    async def _connect_and_serve(self, peer: _Peer) -> None:
        with trio.fail_after(self._connect_timeout):
            stream = await trio.open_tcp_stream(peer.host, peer.port)
            try:
                started = trio.current_time()
                framed = await client_handshake(stream, self._key)
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise
        async with stream:
            peer.ip = stream.socket.getpeername()[0]
            peer.framed, peer.failure = framed, None
            peer.note_rtt((trio.current_time() - started) / 2)  # the handshake is two round trips
            peer.connected = True
            peer.stats.connects += 1
            writer = FrameWriter(framed)
            log.info("peer %s is up", peer.address)
            try:
                async with trio.open_nursery() as nursery:
                    peer.scope = nursery.cancel_scope
                    peer.writer = writer
                    nursery.start_soon(self._write, writer, nursery.cancel_scope)
                    nursery.start_soon(self._ping, peer)
                    try:
                        await self._read(peer, framed)
                    finally:
                        nursery.cancel_scope.cancel()
            finally:
                peer.writer = peer.scope = peer.framed = peer.quiet = peer.waiting = None
                peer.in_progress.clear()
                for answers, _ in peer.pending.values():
                    if answers is not None:
                        peer.stats.lost += 1
                        answers.send_nowait((peer, LOST, b""))
                peer.pending.clear()

    @staticmethod
    async def _write(writer: FrameWriter, scope: trio.CancelScope) -> None:
        # Requests go out from the fetch's own task when the socket takes them whole
        # (FrameWriter); this task writes the rest: a fetch that gives up at its
        # deadline never leaves half a frame behind.
        try:
            await writer.run()
        finally:
            scope.cancel()

    async def _ping(self, peer: _Peer) -> None:
        # Keeps the round-trip estimate fresh for idle peers and detects dead ones.
        while peer.writer is not None:
            request_id = peer.new_request_id()
            peer.pending[request_id] = (None, trio.current_time())
            peer.writer.send_nowait(PING, request_id, b"")
            await trio.sleep(self._ping_interval)

    async def _read(self, peer: _Peer, framed: FramedStream) -> None:
        """Read the connection's frames, except while a fetch does (`_lead`), until it fails or falls silent."""
        silence = 3 * self._ping_interval
        sock = framed.socket
        assert sock is not None
        # One scope for the connection, its deadline moved on by each frame (not a scope per frame).
        with trio.move_on_after(silence) as peer.quiet:
            taken = 0
            while True:
                if peer.leading:
                    await peer.lot.park()
                    continue
                if peer.failure is not None:
                    raise peer.failure
                frame = framed.receive_nowait(sock.fileno())
                if frame is None:
                    with trio.CancelScope() as peer.waiting:
                        await trio.lowlevel.wait_readable(sock)
                    peer.waiting = None
                    continue
                self._take(peer, frame)
                taken += 1
                if taken % 16 == 0:  # a stream of frames: let the rest of the loop run too
                    await trio.lowlevel.checkpoint()
        raise ProtocolError(f"no answer for {silence:.1f} s")

    def _take(self, peer: _Peer, frame: Frame) -> None:
        """One frame received from `peer`: a summary part, or an answer for the fetch waiting for it."""
        now = trio.current_time()
        quiet, silence = peer.quiet, 3 * self._ping_interval
        if quiet is not None and now + silence - quiet.deadline > silence / 8:  # not per frame: moving a deadline costs a peer hit µs
            quiet.deadline = now + silence
        type_, request_id, payload = frame
        if type_ == SUMMARY:
            self._take_summary_part(peer, payload)
        elif type_ in (PAGE, CHUNK, NOT_FOUND, ERROR, PONG):
            waiting = peer.pending.pop(request_id, None)
            if waiting is None:
                return  # an answer its fetch stopped waiting for
            answers, sent_at = waiting
            peer.note_rtt(now - sent_at)
            if answers is not None:
                answers.send_nowait((peer, type_, payload))
        else:
            raise BadFrame(f"unknown or unexpected message type {type_}")

    def _take_summary_part(self, peer: _Peer, payload: bytes) -> None:
        if len(payload) <= SUMMARY_HEAD.size:
            raise BadFrame("SUMMARY without filter bytes")
        generation, kind, hashes, reserved, salt, nbits, items, offset = SUMMARY_HEAD.unpack_from(payload)
        data = payload[SUMMARY_HEAD.size :]
        nbytes = (nbits + 7) // 8
        if kind not in (SUMMARY_DIGESTS, SUMMARY_LOCATIONS) or reserved or not 1 <= hashes <= MAX_HASHES:
            raise BadFrame(f"SUMMARY of kind {kind} with {hashes} hashes")
        if nbits < 64 or nbytes > MAX_SUMMARY_BYTES or offset + len(data) > nbytes:
            raise BadFrame(f"SUMMARY of {nbits} bits, part at {offset}")
        part = peer.in_progress.get(kind)
        if offset == 0:
            part = peer.in_progress[kind] = _SummaryInProgress(generation, BloomFilter(nbits, hashes, salt, bytearray(nbytes), items))
        elif part is None or (part.generation, part.received, part.bloom.nbits, part.bloom.salt) != (generation, offset, nbits, salt):
            raise BadFrame("SUMMARY parts out of order")
        part.bloom.bits[offset : offset + len(data)] = data
        part.received += len(data)
        part.ones += int.from_bytes(data, "little").bit_count()  # counted per part: the cost is spread like the parts
        if part.received == nbytes:
            del peer.in_progress[kind]
            why = part.bloom.plausible(part.ones / nbits)
            if why is not None:
                # A host with the key could otherwise claim every block: its summary would make
                # second chance skip every admission here, and send every miss to it first.
                peer.stats.summaries_refused += 1
                log.warning("peer %s: its %s summary is refused: %s; the previous one stays in use",
                            peer.address, "page" if kind == SUMMARY_DIGESTS else "location", why)
                return
            peer.summaries[kind] = part.bloom
            if kind == SUMMARY_DIGESTS:
                peer.stats.summary_pages = items
            else:
                peer.stats.summary_locations = items
