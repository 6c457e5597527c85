"""Peers over real trio TCP on loopback, serving from a fake in-memory provider.

Every test runs its own server on 127.0.0.1 port 0. Tests that misbehave on
purpose speak the protocol by hand with the primitives of
`fusecache.peers.protocol`. No test asserts a timing beyond "gave up by the
deadline plus generous slack".
"""

from __future__ import annotations

import contextlib
import os
import random
import struct
from collections.abc import AsyncIterator

import hypothesis.strategies as st
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings

from fusecache.errors import QuietError
from fusecache.geometry import CHUNK_SIZE, PAGE_SIZE
from fusecache.peers import BloomFilter, PeerServer, PeerSet, RemoteStats, Version, hole_digest, load_cluster_key, names_key, page_digest
from fusecache.peers.client import Answer, _Answers
from fusecache.peers.protocol import (
    CHUNK,
    GET_LOCATION,
    GET_PAGE,
    HEADER,
    HELLO,
    HELLO_BODY,
    MAGIC,
    MAX_PAYLOAD,
    PAGE,
    PING,
    PONG,
    REQUEST_SIZES,
    SUMMARY,
    SUMMARY_DIGESTS,
    SUMMARY_LOCATIONS,
    VERSION,
    AuthError,
    BadFrame,
    FramedStream,
    FrameWriter,
    ProtocolError,
    client_handshake,
    encode_location,
    encode_summary,
    page_matches,
    server_handshake,
)
from fusecache.peers.server import PendingHandshakes
from fusecache.store import Store

KEY = b"k" * 32
NAMES = names_key(KEY)  # what the hosts of KEY's cluster name pages with


def name(page: bytes) -> bytes:
    return page_digest(NAMES, page)
SLACK = 2.0  # seconds past a deadline a loaded CI machine may take to notice it
# A file of 7 whole chunks and a short eighth (what FakeStore holds of it): a chunk's length is its version's.
VERSION_A: Version = (7 * CHUNK_SIZE + 14 * PAGE_SIZE + 100, 1_700_000_000_000_000_000, 1_700_000_000_000_000_001, 7)


class FakeStore:
    """The provider: pages by digest, chunks by (ino, version, chunk_no)."""

    def __init__(self, pages: int = 64, chunks: int = 8, key: bytes | None = KEY) -> None:
        self.pages: dict[bytes, bytes] = {}
        self.locations: dict[tuple[int, Version, int], bytes] = {}
        names = names_key(key)  # a store names pages as its cluster does

        def name(page: bytes) -> bytes:
            return page_digest(names, page)

        for _ in range(pages):
            page = os.urandom(4096)
            self.pages[name(page)] = page
        for n in range(chunks):
            # A hole in the middle, and VERSION_A's short tail on its last chunk.
            length = min(CHUNK_SIZE, VERSION_A[0] - n * CHUNK_SIZE)
            self.locations[(42, VERSION_A, n)] = os.urandom(4096 * 5) + bytes(4096) + os.urandom(length - 6 * 4096)

    def read_page(self, digest: bytes) -> bytes | None:
        return self.pages.get(digest)

    def read_location(self, ino: int, version: Version, chunk: int) -> bytes | None:
        return self.locations.get((ino, version, chunk))

    def iter_digests(self) -> list[bytes]:
        return list(self.pages)

    def iter_locations(self) -> list[tuple[int, Version, int]]:
        return list(self.locations)


class CorruptingStore(FakeStore):
    """A peer with a broken store: a page with a flipped byte, a chunk one byte short of its version's length."""

    def read_page(self, digest: bytes) -> bytes | None:
        page = self.pages.get(digest)
        return None if page is None else bytes([page[0] ^ 1]) + page[1:]

    def read_location(self, ino: int, version: Version, chunk: int) -> bytes | None:
        data = self.locations.get((ino, version, chunk))
        return None if data is None else data[:-1]


@contextlib.asynccontextmanager
async def serving(store: FakeStore, key: bytes | None = KEY, **kwargs: object) -> AsyncIterator[PeerServer]:
    async with trio.open_nursery() as nursery:
        kwargs.setdefault("allow", ["127.0.0.0/8"])
        server = PeerServer("127.0.0.1:0", key, store, **kwargs)
        await nursery.start(server.run)
        yield server
        nursery.cancel_scope.cancel()


@contextlib.asynccontextmanager
async def peer_set(ports: list[int], key: bytes | None = KEY, **kwargs: object) -> AsyncIterator[PeerSet]:
    async with trio.open_nursery() as nursery:
        peers = PeerSet([f"127.0.0.1:{p}" for p in ports], key, **kwargs)
        await nursery.start(peers.run)
        yield peers
        nursery.cancel_scope.cancel()


async def wait_for_summaries(peers: PeerSet) -> None:
    """Until some peer is up and both its summaries have arrived."""
    with trio.fail_after(10):
        while not any(s.up and s.summary_pages > 0 and s.summary_locations > 0 for s in peers.stats().values()):
            await trio.sleep(0.01)


def hello_frame(page_size: int = PAGE_SIZE) -> bytes:
    """A client's HELLO, sent by hand."""
    return HEADER.pack(HELLO, 0, 0, HELLO_BODY.size) + HELLO_BODY.pack(MAGIC, VERSION, os.urandom(32), page_size, CHUNK_SIZE)


def far() -> float:
    """A deadline for tests that check answers, not giving up."""
    return trio.current_time() + 5


async def read_to_eof(stream: trio.SocketStream) -> bytes:
    received = b""
    with trio.fail_after(10):
        while True:
            try:
                data = await stream.receive_some(65536)
            except trio.BrokenResourceError:  # the server reset: what we sent was left unread
                return received
            if not data:
                return received
            received += data


async def answers_until_eof(framed: FramedStream) -> list[int]:
    """Types of the frames the server sends until it closes, summaries left out."""
    types = []
    with trio.fail_after(10):
        while True:
            try:
                frame = await framed.receive()
            except (trio.BrokenResourceError, ProtocolError):  # closed, perhaps mid-summary
                return types
            if frame is None:
                return types
            if frame[0] != SUMMARY:
                types.append(frame[0])


async def still_serves(server: PeerServer, store: FakeStore) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    async with stream:
        framed = await client_handshake(stream, KEY)
        digest = next(iter(store.pages))
        await framed.send(GET_PAGE, 9, digest)
        with trio.fail_after(10):
            while (frame := await framed.receive()) is not None and frame[0] == SUMMARY:
                pass
        assert frame == (PAGE, 9, store.pages[digest])


def test_fetch_by_digest_and_by_location() -> None:
    store = FakeStore()

    async def main() -> None:
        async with serving(store) as server, peer_set([server.port], server=server) as peers:
            await wait_for_summaries(peers)
            for digest, page in store.pages.items():
                assert peers.may_hold(digest)
                assert await peers.fetch_page(digest, far()) == page
            for (ino, version, n), data in store.locations.items():
                assert await peers.fetch_location(ino, version, n, far()) == data
            # Another version of the same file is not this content: never asked, never served.
            other = (VERSION_A[0], VERSION_A[1] + 1, *VERSION_A[2:])
            assert await peers.fetch_location(42, other, 0, far()) is None
            unknown = os.urandom(16)
            assert await peers.fetch_page(unknown, far()) is None
            stats = peers.stats()[f"127.0.0.1:{server.port}"]
            assert stats.up and stats.rtt_ms is not None and stats.corrupt_blocks == 0
            assert stats.hits_taken == len(store.pages) + len(store.locations)
            assert stats.hits_given == stats.hits_taken  # this host is its own peer here

    trio.run(main)


def test_many_concurrent_requests_share_one_connection() -> None:
    store = FakeStore(pages=200)

    async def main() -> None:
        async with serving(store) as server, peer_set([server.port]) as peers:
            await wait_for_summaries(peers)
            results: dict[bytes, bytes | None] = {}

            async def fetch(digest: bytes) -> None:
                results[digest] = await peers.fetch_page(digest, far())

            async def fetch_chunk(n: int) -> None:
                results[bytes([n])] = await peers.fetch_location(42, VERSION_A, n, far())

            async with trio.open_nursery() as nursery:
                for digest in store.pages:
                    nursery.start_soon(fetch, digest)
                for n in range(len(store.locations)):
                    nursery.start_soon(fetch_chunk, n)
            assert all(results[d] == p for d, p in store.pages.items())
            assert all(results[bytes([n])] == store.locations[(42, VERSION_A, n)] for n in range(len(store.locations)))
            remote = server.stats()["127.0.0.1"]
            # Many requests were outstanding on the one connection at once. (The server writes each
            # answer as it reads its request when the socket takes it, so its own in-flight count can
            # stay at 1: the concurrency is seen from the asking side.)
            assert remote.connections == 1 and peers.stats()[f"127.0.0.1:{server.port}"].peak_outstanding > 1

    trio.run(main)


def test_a_fetch_reads_its_own_answer_and_the_connection_reader_reads_again_after(monkeypatch) -> None:
    """A fetch waiting on one peer reads the socket itself (no hand-off from the connection's reading task), and
    gives the socket back when it is done or gives up: the reading task then reads the pings' answers again."""
    store = FakeStore()
    takers = []
    handed = _Answers.send_nowait

    def recording(answers: _Answers, answer: Answer) -> None:
        takers.append(trio.lowlevel.current_task())
        handed(answers, answer)

    monkeypatch.setattr(_Answers, "send_nowait", recording)

    async def main() -> None:
        async with serving(store) as server, peer_set([server.port], ping_interval=0.05) as peers:
            await wait_for_summaries(peers)
            address = f"127.0.0.1:{server.port}"
            (ino, version, n), _ = next(iter(store.locations.items()))
            # Given up at once (its deadline has passed): the fetch stops reading in its wait; its answer comes
            # later, to no one.
            assert await peers.fetch_location(ino, version, n, trio.current_time()) is None
            takers.clear()
            for (ino, version, n), data in store.locations.items():
                assert await peers.fetch_location(ino, version, n, far()) == data
            assert takers == [trio.lowlevel.current_task()] * len(store.locations)
            # Nobody leads now: were the reading task not reading, the silence limit (3 pings) would end the
            # connection and a new one would be made.
            await trio.sleep(1)
            stats = peers.stats()[address]
            assert stats.up and stats.connects == 1 and stats.lost == 0 and stats.abandoned == 1

    trio.run(main)


def test_wrong_key_is_refused_and_learns_nothing(expect_log) -> None:
    expect_log("refused: wrong proof", "closed during authentication")
    store = FakeStore()

    async def main() -> None:
        async with serving(store) as server:
            # By hand: the server answers HELLO with its nonce, and after a wrong proof
            # sends nothing at all (no proof of its own, no data) and closes.
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            async with stream:
                await stream.send_all(hello_frame())
                await stream.send_all(HEADER.pack(2, 0, 0, 32) + os.urandom(32))
                received = await read_to_eof(stream)
            assert len(received) == HEADER.size + HELLO_BODY.size and received[0] == HELLO
            # Through the client: a wrong key never comes up and fetches nothing.
            with pytest.raises(AuthError):
                stream = await trio.open_tcp_stream("127.0.0.1", server.port)
                async with stream:
                    await client_handshake(stream, b"x" * 32)
            async with peer_set([server.port], key=b"x" * 32) as peers:
                await trio.sleep(0.3)
                assert not peers.stats()[f"127.0.0.1:{server.port}"].up
                assert await peers.fetch_page(next(iter(store.pages))) is None
            assert server.handshake_stats().failed >= 2
            assert "127.0.0.1" not in server.stats()  # no per-address record of a host that never authenticated

    trio.run(main)


def test_a_client_refuses_a_server_without_the_key() -> None:
    async def impostor(stream: trio.SocketStream) -> None:
        with contextlib.suppress(AuthError, trio.BrokenResourceError):
            await server_handshake(stream, b"x" * 32)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(trio.serve_tcp, impostor, 0)
            port = listeners[0].socket.getsockname()[1]
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                with pytest.raises(AuthError):
                    await client_handshake(stream, KEY)
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_frames_written_directly_or_queued_arrive_whole_in_order_and_macd() -> None:
    """FrameWriter writes from the caller's task while the socket takes a frame whole, and queues
    the rest (and everything after it) for its task: the far end reads every frame, in the order
    sent, each passing its MAC (sequence numbers follow the wire), however the writes split."""
    sizes = [10, MAX_PAYLOAD, 0, 70_000, 5, MAX_PAYLOAD, 1, 3 * PAGE_SIZE] * 3

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            # A connection we hold both ends of (the kernel completes the connect before the accept).
            (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
            a = await trio.open_tcp_stream("127.0.0.1", listener.socket.getsockname()[1])
            b = await listener.accept()
            a.socket.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_SNDBUF, 8192)  # make writes split
            sender, receiver = FramedStream(a), FramedStream(b)
            sender.start_session(b"s" * 32, b"r" * 32)
            receiver.start_session(b"r" * 32, b"s" * 32)
            writer = FrameWriter(sender)
            nursery.start_soon(writer.run)
            written: list[int] = []
            for i, size in enumerate(sizes):
                writer.send_nowait(PAGE, i, bytes([i]) * size, lambda i=i: written.append(i))
            assert written[:1] == [0] and len(written) < len(sizes)  # the first went out directly, later ones queued
            with trio.fail_after(30):
                for i, size in enumerate(sizes):
                    frame = await receiver.receive()
                    assert frame is not None and frame[:2] == (PAGE, i) and frame[2] == bytes([i]) * size
                while len(written) < len(sizes):
                    await trio.sleep(0.01)
            assert written == list(range(len(sizes)))
            for s in (a, b, listener):
                await s.aclose()
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_frames_arrive_whole_however_the_reads_split_them() -> None:
    """The receive buffer is read into in place, compacted when a frame runs past its end and grown for a large one:
    every frame comes out whole and in order, whether taken by `receive` or `receive_nowait`, however the stream
    was cut."""
    rng = random.Random(5)
    sizes = [rng.choice([0, 1, 26, PAGE_SIZE, CHUNK_SIZE, CHUNK_SIZE + 7, 300_000, MAX_PAYLOAD]) for _ in range(60)]
    payloads = [rng.randbytes(size) for size in sizes]

    async def main() -> None:
        (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
        a = await trio.open_tcp_stream("127.0.0.1", listener.socket.getsockname()[1])
        b = await listener.accept()
        sender, receiver = FramedStream(a), FramedStream(b)
        sender.start_session(b"s" * 32, b"r" * 32)
        receiver.start_session(b"r" * 32, b"s" * 32)
        wire = b"".join(sender.encode(CHUNK, i, payload) for i, payload in enumerate(payloads))

        async def send() -> None:
            at = 0
            while at < len(wire):
                n = rng.choice([1, 9, 4096, 65_000, 200_000])
                await a.send_all(wire[at : at + n])
                at += n
                await trio.sleep(0)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            with trio.fail_after(30):
                for i, payload in enumerate(payloads):
                    if i % 2:
                        frame = await receiver.receive()
                    else:
                        while (frame := receiver.receive_nowait(b.socket.fileno())) is None:
                            await trio.lowlevel.wait_readable(b.socket)
                    assert frame == (CHUNK, i, payload)
        assert receiver.buffered == 0
        await a.aclose()
        with trio.fail_after(10):
            assert await receiver.receive() is None  # a clean end, between frames
        for stream in (b, listener):
            await stream.aclose()

    trio.run(main)


def test_a_frame_is_sealed_every_byte_authenticated_and_its_payload_encrypted() -> None:
    """A flip in a frame's type, request id, payload or tag ends the connection: a CHUNK's data too (version 4
    left that to the page names its receiver hashed). And what goes on the wire is not the payload: disk images
    hold tenants' data (version 4 sent it in the clear)."""
    data = os.urandom(3 * PAGE_SIZE + 100)
    page = b"tenant data " * 341  # 4092 bytes anyone would recognise on the wire

    async def one(type_: int, body: bytes, flip: int | None) -> tuple[int, int, bytes] | None:
        a, b = trio.testing.memory_stream_pair()
        sender, receiver = FramedStream(a), FramedStream(b)
        sender.start_session(b"s" * 32, b"r" * 32)
        receiver.start_session(b"r" * 32, b"s" * 32)
        frame = bytearray(sender.encode(type_, 7, body))
        if flip is not None:
            frame[flip] ^= 0x01
        await a.send_all(bytes(frame))
        return await receiver.receive()

    async def main() -> None:
        sender = FramedStream(trio.testing.memory_stream_pair()[0])
        sender.start_session(b"s" * 32, b"r" * 32)
        frame = sender.encode(PAGE, 7, page)
        assert len(frame) == HEADER.size + len(page) + 16 and b"tenant data" not in frame
        assert sender.encode(PAGE, 7, page)[HEADER.size :] != frame[HEADER.size :]  # a fresh nonce each frame
        for type_ in (CHUNK, PAGE):
            assert await one(type_, data, None) == (type_, 7, data)
            for flip in (0, 2, 5, HEADER.size, HEADER.size + 2 * PAGE_SIZE + 17, HEADER.size + len(data) - 1, HEADER.size + len(data)):
                with pytest.raises(BadFrame, match="wrong MAC"):
                    await one(type_, data, flip)
        # The same frame sent again (replayed) or under the other direction's key fails too.
        a, b = trio.testing.memory_stream_pair()
        sender, receiver = FramedStream(a), FramedStream(b)
        sender.start_session(b"s" * 32, b"r" * 32)
        receiver.start_session(b"r" * 32, b"s" * 32)
        frame = bytes(sender.encode(CHUNK, 7, data))
        await a.send_all(frame + frame)
        assert await receiver.receive() == (CHUNK, 7, data)
        with pytest.raises(BadFrame, match="wrong MAC"):
            await receiver.receive()
        a, b = trio.testing.memory_stream_pair()
        sender, receiver = FramedStream(a), FramedStream(b)
        sender.start_session(b"s" * 32, b"r" * 32)
        receiver.start_session(b"s" * 32, b"r" * 32)  # the sender's own key for what it receives: a reflected frame
        await a.send_all(bytes(sender.encode(CHUNK, 7, data)))
        with pytest.raises(BadFrame, match="wrong MAC"):
            await receiver.receive()

    trio.run(main)


def half_answering_server(store: FakeStore, then: str):
    """A peer that authenticates, publishes its locations, then dies (`then`='close') or
    hangs (`then`='hang') halfway through its first CHUNK."""

    async def handler(stream: trio.SocketStream) -> None:
        framed = await server_handshake(stream, KEY)
        bloom = BloomFilter.for_capacity(100)
        for location in store.locations:
            bloom.add(encode_location(*location))
        for part in encode_summary(1, SUMMARY_LOCATIONS, bloom):
            await framed.send(SUMMARY, 0, part)
        while (frame := await framed.receive()) is not None:
            type_, request_id, _ = frame
            if type_ == PING:
                await framed.send(PONG, request_id)
            elif type_ == GET_LOCATION:
                whole = framed.encode(CHUNK, request_id, store.locations[(42, VERSION_A, 0)])
                await stream.send_all(whole[: len(whole) // 2])
                if then == "hang":
                    await trio.sleep_forever()
                await stream.aclose()
                return

    return handler


@pytest.mark.parametrize("then", ["close", "hang"])
def test_peer_dying_mid_transfer_costs_only_the_deadline(then: str, expect_log) -> None:
    expect_log("is down")
    store = FakeStore()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(trio.serve_tcp, half_answering_server(store, then), 0)
            port = listeners[0].socket.getsockname()[1]
            async with peer_set([port]) as peers:
                with trio.fail_after(10):
                    while not peers.stats()[f"127.0.0.1:{port}"].summary_locations:
                        await trio.sleep(0.01)
                deadline = trio.current_time() + 0.2
                assert await peers.fetch_location(42, VERSION_A, 0, deadline) is None
                assert trio.current_time() <= deadline + SLACK
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_a_stuck_peer_is_hedged_around(expect_log) -> None:
    expect_log("is down")
    store = FakeStore()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(trio.serve_tcp, half_answering_server(store, "hang"), 0)
            stuck = listeners[0].socket.getsockname()[1]
            async with serving(store) as server, peer_set([stuck, server.port]) as peers:
                await wait_for_summaries(peers)
                with trio.fail_after(10):
                    while not peers.stats()[f"127.0.0.1:{stuck}"].summary_locations:
                        await trio.sleep(0.01)
                # Whichever is asked first, the answer comes from the live peer.
                for n in range(len(store.locations)):
                    assert await peers.fetch_location(42, VERSION_A, n, far()) == store.locations[(42, VERSION_A, n)]
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_a_restarted_peer_is_reconnected(expect_log) -> None:
    expect_log("is down", "unreachable")
    store = FakeStore()

    async def main() -> None:
        async with serving(store) as server:
            port = server.port
        async with peer_set([port], max_backoff=0.2) as peers:
            address = f"127.0.0.1:{port}"
            await trio.sleep(0.3)
            assert not peers.stats()[address].up
            async with trio.open_nursery() as nursery:
                await nursery.start(PeerServer(address, KEY, store, allow=["127.0.0.1"]).run)
                await wait_for_summaries(peers)
                digest = next(iter(store.pages))
                assert await peers.fetch_page(digest, far()) == store.pages[digest]
                nursery.cancel_scope.cancel()
            with trio.fail_after(10):
                while peers.stats()[address].up:
                    await trio.sleep(0.01)

    trio.run(main)


def test_corrupt_blocks_are_rejected_counted_and_the_peer_dropped(expect_log) -> None:
    expect_log("sent a wrong")
    store = CorruptingStore()

    async def main() -> None:
        async with serving(store) as server, peer_set([server.port], ban_seconds=30) as peers:
            address = f"127.0.0.1:{server.port}"
            await wait_for_summaries(peers)
            assert await peers.fetch_location(42, VERSION_A, 0, far()) is None
            stats = peers.stats()[address]
            assert stats.corrupt_blocks == 1 and stats.hits_taken == 0
            await trio.sleep(0.2)
            assert not peers.stats()[address].up
            # Not asked again while banned, though it holds the page.
            digest = next(iter(store.pages))
            assert not peers.may_hold(digest)
            assert await peers.fetch_page(digest, far()) is None
            assert peers.stats()[address].requests == stats.requests

        # A wrong page by digest is caught the same way.
        async with serving(store) as server, peer_set([server.port]) as peers:
            await wait_for_summaries(peers)
            assert await peers.fetch_page(next(iter(store.pages)), far()) is None
            assert peers.stats()[f"127.0.0.1:{server.port}"].corrupt_blocks == 1

    trio.run(main)


MUTATIONS = ["none", "flags", "longer", "shorter", "huge", "mac", "truncate"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(garbage=st.binary(max_size=200))
def test_garbage_before_authentication_is_refused(garbage: bytes, expect_log) -> None:
    expect_log("refused")
    store = FakeStore(pages=4, chunks=1)

    async def main() -> None:
        async with serving(store) as server:
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            async with stream:
                with contextlib.suppress(trio.BrokenResourceError):
                    await stream.send_all(garbage)
                    await stream.send_eof()
                received = await read_to_eof(stream)
            # At most the server's HELLO: never a proof, never data.
            assert len(received) <= HEADER.size + HELLO_BODY.size
            await still_serves(server, store)

    trio.run(main)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(
    type_=st.one_of(st.sampled_from(sorted(REQUEST_SIZES)), st.integers(0, 255)),
    request_id=st.integers(0, 2**32 - 1),
    payload=st.one_of(st.binary(max_size=64), st.sampled_from([b"", bytes(16), bytes(48)])),
    mutation=st.sampled_from(MUTATIONS),
)
def test_malformed_frames_close_the_connection(type_: int, request_id: int, payload: bytes, mutation: str, expect_log) -> None:
    expect_log("closing the connection")
    store = FakeStore(pages=4, chunks=1)

    async def main() -> None:
        async with serving(store) as server:
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            async with stream:
                framed = await client_handshake(stream, KEY)
                frame = bytearray(framed.encode(type_, request_id, payload))
                if mutation == "flags":
                    frame[1] = 1
                elif mutation in ("longer", "shorter", "huge"):
                    length = {"longer": len(payload) + 1, "shorter": max(len(payload) - 1, 0), "huge": MAX_PAYLOAD + 1}[mutation]
                    frame[6:10] = struct.pack("!I", length)
                elif mutation == "mac":
                    frame[-1] ^= 0x80
                elif mutation == "truncate":
                    del frame[-3:]
                with contextlib.suppress(trio.BrokenResourceError):
                    await stream.send_all(bytes(frame))
                    await stream.send_eof()
                answers = await answers_until_eof(framed)
            well_formed = mutation == "none" or (mutation == "shorter" and not payload)
            if not (well_formed and REQUEST_SIZES.get(type_) == len(payload)):
                assert answers == []
            await still_serves(server, store)

    trio.run(main)


def test_an_oversized_frame_is_refused_before_its_payload(expect_log) -> None:
    expect_log("over the limit")
    store = FakeStore(pages=4, chunks=1)

    async def main() -> None:
        async with serving(store) as server:
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            async with stream:
                framed = await client_handshake(stream, KEY)
                # Only the header: the server must not wait for 16 MiB that never come.
                await stream.send_all(HEADER.pack(GET_PAGE, 0, 1, 16 << 20))
                assert await answers_until_eof(framed) == []
            assert server.stats()["127.0.0.1"].protocol_errors == 1
            await still_serves(server, store)

    trio.run(main)


def test_a_flood_from_one_peer_is_bounded_and_others_are_served() -> None:
    store = FakeStore(pages=64)
    per_peer = 8

    async def flood(port: int) -> None:
        # From another loopback address, so it is another peer; it never reads.
        stream = await trio.open_tcp_stream("127.0.0.1", port, local_address="127.0.0.2")
        async with stream:
            framed = await client_handshake(stream, KEY)
            digest = next(iter(store.pages))
            request = b"".join(framed.encode(GET_PAGE, i, digest) for i in range(256))
            while True:
                await stream.send_all(request)

    async def main() -> None:
        async with (
            serving(store, max_in_flight_per_peer=per_peer, max_in_flight=4 * per_peer) as server,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(flood, server.port)
            # Wait until the server stops reading the flood: its answers fill the
            # socket buffers, its slots fill, and its request count stands still.
            with trio.fail_after(20):
                seen = -1
                while "127.0.0.2" not in server.stats() or server.stats()["127.0.0.2"].requests != seen:
                    seen = server.stats().get("127.0.0.2", RemoteStats()).requests
                    await trio.sleep(0.3)
            assert server.stats()["127.0.0.2"].in_flight == per_peer
            async with peer_set([server.port]) as peers:
                await wait_for_summaries(peers)
                for digest, page in store.pages.items():
                    assert await peers.fetch_page(digest, far()) == page
            flooder = server.stats()["127.0.0.2"]
            assert flooder.peak_in_flight == per_peer and flooder.requests == seen
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_pages_and_holes_are_named_as_the_store_names_them(tmp_path) -> None:
    store = Store(str(tmp_path / "cache"), 1 << 20, names_key=NAMES)
    try:
        assert hole_digest(NAMES) == store.keys.zero_name
        page = os.urandom(4096)
        assert name(page) == store.keys.name(page)
    finally:
        store.close()
    assert name(bytes(100)) == hole_digest(NAMES)  # a short tail of zeros is a hole too
    tail = os.urandom(100)
    assert page_matches(NAMES, tail, name(tail + bytes(4096 - 100)))
    assert not page_matches(NAMES, b"", hole_digest(NAMES))
    # Another cluster's key names every page otherwise; with no key (--peer-insecure), a public one.
    assert page_digest(names_key(b"o" * 32), page) != name(page) != page_digest(names_key(None), page)


def test_summary_false_positive_rate_is_near_one_percent() -> None:
    bloom = BloomFilter.for_capacity(20_000)
    for _ in range(20_000):
        bloom.add(os.urandom(16))
    false_positives = sum(os.urandom(16) in bloom for _ in range(20_000))
    assert false_positives / 20_000 < 0.03
    assert len(bloom.bits) < 20_000 * 1.3  # ~1.2 bytes per key at 1%


def test_summary_has_no_false_negatives_over_the_wire() -> None:
    store = FakeStore(pages=3000)

    async def main() -> None:
        async with serving(store, capacity_pages=3000) as server, peer_set([server.port]) as peers:
            await wait_for_summaries(peers)
            assert all(peers.may_hold(d) for d in store.pages)
            false_positives = sum(peers.may_hold(os.urandom(16)) for _ in range(3000))
            assert false_positives / 3000 < 0.05

    trio.run(main)


def test_summary_is_rebuilt_when_the_store_changed_a_lot() -> None:
    store = FakeStore(pages=10)

    async def main() -> None:
        async with (
            serving(store, summary_interval=3600, min_summary_interval=0.05) as server,
            peer_set([server.port]) as peers,
        ):
            await wait_for_summaries(peers)
            page = os.urandom(4096)
            store.pages[name(page)] = page
            assert not peers.may_hold(name(page))
            server.note_change()
            with trio.fail_after(10):
                while not peers.may_hold(name(page)):
                    await trio.sleep(0.01)
            assert await peers.fetch_page(name(page), far()) == page

    trio.run(main)


def test_peering_without_a_key_only_on_loopback() -> None:
    store = FakeStore(pages=4, key=None)

    async def main() -> None:
        async with serving(store, key=None) as server, peer_set([server.port], key=None) as peers:
            await wait_for_summaries(peers)
            digest = next(iter(store.pages))
            assert await peers.fetch_page(digest, far()) == store.pages[digest]

    trio.run(main)
    with pytest.raises(QuietError, match="cluster-key-file"):
        PeerSet(["127.0.0.1:7070", "10.0.0.2:7070"], None)
    with pytest.raises(QuietError, match="cluster-key-file"):
        PeerServer("0.0.0.0:7070", None, store)
    with pytest.raises(QuietError, match="cluster-key-file"):
        PeerSet(["host2:7070"], None)
    PeerSet(["localhost:7070", "[::1]:7070"], None)


def test_load_cluster_key(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "cluster.key")
    with pytest.raises(QuietError, match="does not exist"):
        load_cluster_key(path)
    with open(path, "wb") as f:
        f.write(os.urandom(32))
    os.chmod(path, 0o644)
    with pytest.raises(QuietError, match="chmod 600"):
        load_cluster_key(path)
    os.chmod(path, 0o600)
    assert len(load_cluster_key(path)) == 32
    with open(path, "wb") as f:
        f.write(b"short")
    with pytest.raises(QuietError, match="fewer than 16"):
        load_cluster_key(path)


# ---- who may connect, and handshakes in progress (issue 11, item 3) ------------------


def test_a_source_not_allowed_is_closed_unanswered(expect_log) -> None:
    expect_log("not a configured peer")
    store = FakeStore(pages=4)

    async def main() -> None:
        async with serving(store, allow=["127.0.0.1"]) as server:
            stream = await trio.open_tcp_stream("127.0.0.1", server.port, local_address="127.0.0.3")
            async with stream:
                with contextlib.suppress(trio.BrokenResourceError):
                    await stream.send_all(hello_frame())
                assert await read_to_eof(stream) == b""  # not even a nonce
            hs = server.handshake_stats()
            assert hs.not_allowed == 1 and hs.accepted == 0
            assert server.stats() == {}
            await still_serves(server, store)

    trio.run(main)


async def hold_idle(port: int, count: int, source: str, stop: trio.Event, made: list[int]) -> None:
    """`count` connections that never send a byte and reconnect as soon as they are closed."""

    async def one() -> None:
        while not stop.is_set():
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port, local_address=source)
            except OSError:
                await trio.sleep(0.01)
                continue
            made[0] += 1
            async with stream:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await read_to_eof(stream)

    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(one)
        await stop.wait()
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("source", ["127.0.0.1", "127.0.0.2"], ids=["same-address", "other-address"])
def test_idle_connections_do_not_keep_a_keyed_peer_out(source: str, expect_log) -> None:
    """64 idle connections that reconnect when closed, from the keyed peer's own address or from
    another allowed one: the keyed peer still connects and is served."""
    expect_log("dropped to make room", "did not authenticate")
    store = FakeStore(pages=8)

    async def main() -> None:
        async with serving(store, handshake_timeout=2.0) as server, trio.open_nursery() as nursery:
            stop, made = trio.Event(), [0]
            nursery.start_soon(hold_idle, server.port, 64, source, stop, made)
            with trio.fail_after(10):
                while server.handshake_stats().dropped < 64:
                    await trio.sleep(0.01)
            async with peer_set([server.port]) as peers:
                await wait_for_summaries(peers)
                digest = next(iter(store.pages))
                assert await peers.fetch_page(digest, far()) == store.pages[digest]
            hs = server.handshake_stats()
            assert hs.peak_pending <= 32 + 1 and hs.authenticated >= 1, hs  # the flood's share, and the keyed peer
            print(f"\n{made[0]} idle connections made, {hs.dropped} dropped")
            stop.set()
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_pending_handshakes_drop_the_oldest_silent_one_first() -> None:
    table = PendingHandshakes(total=4, per_source=2)
    a1, _ = table.add("a", trio.CancelScope())
    a2, _ = table.add("a", trio.CancelScope())
    a1.talked = True
    a3, dropped = table.add("a", trio.CancelScope())
    assert dropped is a2 and a2.scope.cancel_called and table.count == 2  # a1 talked: a2 goes first
    a4, dropped = table.add("a", trio.CancelScope())
    assert dropped is a3  # a3 is silent
    b1, _ = table.add("b", trio.CancelScope())
    table.add("b", trio.CancelScope())
    _, dropped = table.add("c", trio.CancelScope())  # full: from the address holding the most (a tie: the first)
    assert dropped is a4 and table.count == 4
    table.remove(b1)
    table.remove(b1)  # twice is harmless
    assert table.count == 3


def test_a_host_of_another_geometry_is_refused_with_the_reason(expect_log) -> None:
    expect_log("8192-byte pages")
    store = FakeStore(pages=4)

    async def odd_server(stream: trio.SocketStream) -> None:
        framed = FramedStream(stream)
        with contextlib.suppress(Exception):
            await framed.receive()
            await framed.send(HELLO, 0, HELLO_BODY.pack(MAGIC, VERSION, os.urandom(32), 8192, CHUNK_SIZE))

    async def main() -> None:
        async with serving(store) as server:
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            async with stream:
                await stream.send_all(hello_frame(page_size=8192))
                received = await read_to_eof(stream)
            # The server sent its own HELLO (so the client can tell why) and nothing more.
            assert len(received) == HEADER.size + HELLO_BODY.size and received[0] == HELLO
            assert server.handshake_stats().failed == 1
            async with trio.open_nursery() as nursery:
                listeners = await nursery.start(trio.serve_tcp, odd_server, 0)
                port = listeners[0].socket.getsockname()[1]
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                async with stream:
                    with pytest.raises(ProtocolError, match="8192-byte pages and 65536-byte chunks, this host 4096 and 65536"):
                        await client_handshake(stream, KEY)
                nursery.cancel_scope.cancel()

    trio.run(main)


# ---- summaries a keyed peer may not send (issue 11, item 4) -------------------------


def test_an_honest_summary_is_plausible_and_a_full_one_is_not() -> None:
    bloom = BloomFilter.for_capacity(5000)
    for _ in range(5000):
        bloom.add(os.urandom(16))
    assert bloom.plausible() is None
    for _ in range(2500):  # 1.5x its capacity: more false positives, still what an honest host may send
        bloom.add(os.urandom(16))
    assert bloom.plausible() is None
    full = BloomFilter(bloom.nbits, bloom.hashes, bloom.salt, bytearray(b"\xff" * len(bloom.bits)), items=10**9)
    assert "claim 100%" in full.plausible()
    liar = BloomFilter(bloom.nbits, bloom.hashes, bloom.salt, bytearray(bloom.bits), items=100)
    assert "more than 100 keys can set" in liar.plausible()


@pytest.mark.parametrize("lie", ["every-bit", "few-items"])
def test_a_keyed_peer_claiming_everything_is_not_believed(lie: str, expect_log) -> None:
    """A host holding the key sends a summary with every bit set (or far more bits than its
    item count): it is refused, so it cannot make this host skip admissions or ask it for everything."""
    expect_log("summary is refused")
    store = FakeStore(pages=64)

    async def liar(stream: trio.SocketStream) -> None:
        with contextlib.suppress(Exception):
            framed = await server_handshake(stream, KEY)
            honest = BloomFilter.for_capacity(1000)
            for digest in store.pages:
                honest.add(digest)
            await framed.send(SUMMARY, 0, encode_summary(1, SUMMARY_DIGESTS, honest)[0])
            bits = bytearray(b"\xff" * len(honest.bits)) if lie == "every-bit" else bytearray(b"\x55" * len(honest.bits))
            items = 10**6 if lie == "every-bit" else 64
            for part in encode_summary(2, SUMMARY_DIGESTS, BloomFilter(honest.nbits, honest.hashes, 7, bits, items)):
                await framed.send(SUMMARY, 0, part)
            while (frame := await framed.receive()) is not None:
                if frame[0] == PING:
                    await framed.send(PONG, frame[1])

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(trio.serve_tcp, liar, 0)
            port = listeners[0].socket.getsockname()[1]
            async with peer_set([port]) as peers:
                with trio.fail_after(10):
                    while peers.stats()[f"127.0.0.1:{port}"].summaries_refused == 0:
                        await trio.sleep(0.01)
                assert all(peers.may_hold(d) for d in store.pages)  # the honest summary before it stays
                assert sum(peers.may_hold(os.urandom(16)) for _ in range(2000)) < 100
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_the_allow_list_takes_peer_addresses_names_and_networks() -> None:
    async def main() -> None:
        from fusecache.peers.server import AllowList, _allow_entry

        allow = AllowList([_allow_entry(a) for a in ["localhost:7070", "[::1]:7070", "10.1.0.0/16", "192.0.2.7"]])
        await allow.resolve()
        assert allow.allows("127.0.0.1") and allow.allows("::1")  # localhost, looked up
        assert allow.allows("10.1.200.3") and allow.allows("::ffff:10.1.0.9") and allow.allows("192.0.2.7")
        assert not allow.allows("10.2.0.1") and not allow.allows("192.0.2.8") and not allow.allows("not an address")
        assert not AllowList([])

    trio.run(main)
