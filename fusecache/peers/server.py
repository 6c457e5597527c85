"""The peer server: answers other hosts' requests from the local store, publishes summaries.

This module owns the listening side: the handshake with each connecting host,
the per-host and total bounds on requests in flight (a host that sends
faster than it reads stops being read, through TCP backpressure, and cannot
grow our memory or take more than its share of the trio loop), the answers
(from a `PageProvider`, called inline: it is an LMDB read of a few µs), and
the Bloom summaries it builds from the provider and sends to every client.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Iterable
from typing import Protocol

import trio

from fusecache.peers.protocol import (
    CHUNK,
    CHUNK_SIZE,
    DIGEST_SIZE,
    ERROR,
    ERROR_INTERNAL,
    GET_PAGE,
    NOT_FOUND,
    PAGE,
    PAGE_SIZE,
    PAGES_PER_CHUNK,
    PING,
    PONG,
    REQUEST_SIZES,
    SUMMARY,
    SUMMARY_DIGESTS,
    SUMMARY_LOCATIONS,
    FramedStream,
    ProtocolError,
    Version,
    decode_location,
    encode_chunk,
    encode_error,
    encode_location,
    encode_summary,
    server_handshake,
    session_key,
    split_address,
)
from fusecache.peers.summary import BloomFilter

log = logging.getLogger(__name__)

# Yield to the loop this often while iterating the provider for a summary.
SUMMARY_BATCH = 512


class PageProvider(Protocol):
    """What the server serves from: the local store. Every call is synchronous and
    cheap (an LMDB read) and runs on the trio thread. The iterators may be
    suspended between items while the loop serves other work."""

    def read_page(self, digest: bytes) -> bytes | None:
        """The page named `digest`, or None if it is not held."""
        ...

    def read_location(self, ino: int, version: Version, chunk: int) -> tuple[bytes, list[bytes]] | None:
        """Chunk `chunk` of file `ino` and its page digests, only if the held record of
        `ino` has exactly `version`; else None."""
        ...

    def iter_digests(self) -> Iterable[bytes]: ...

    def iter_locations(self) -> Iterable[tuple[int, Version, int]]: ...


@dataclasses.dataclass
class RemoteStats:
    """What one remote host (by IP address) asked of this server."""

    connections: int = 0
    refused: int = 0  # failed authentication
    protocol_errors: int = 0
    requests: int = 0
    hits_given: int = 0
    not_found: int = 0
    errors: int = 0
    bytes_out: int = 0
    in_flight: int = 0
    peak_in_flight: int = 0


@dataclasses.dataclass
class _Connection:
    framed: FramedStream
    remote: RemoteStats
    slots: trio.Semaphore  # this host's share of answers in flight
    in_flight: int = 0


@dataclasses.dataclass(frozen=True)
class _Summary:
    generation: int
    parts: list[bytes]  # encoded SUMMARY payloads, shared by every connection


class PeerServer:
    """Serves the local store to authenticated peers on `listen` ('host:port')."""

    def __init__(
        self,
        listen: str,
        key: bytes | None,
        provider: PageProvider,
        *,
        capacity_pages: int = 1 << 18,
        capacity_locations: int | None = None,
        summary_interval: float = 60.0,
        min_summary_interval: float = 5.0,
        change_fraction: float = 0.05,
        max_in_flight_per_peer: int = 32,
        max_in_flight: int = 256,
        handshake_timeout: float = 2.0,
        idle_timeout: float = 60.0,
        max_handshakes: int = 32,
    ) -> None:
        self._key = session_key(key, [listen])
        self._host, self._port = split_address(listen)
        self.port = self._port  # the bound port once running (listen on port 0 picks one)
        self._provider = provider
        self._capacity_pages = capacity_pages
        # Deduplication lets one page serve several locations, so allow 2x the chunks.
        self._capacity_locations = capacity_locations or 2 * capacity_pages // PAGES_PER_CHUNK
        self._summary_interval = summary_interval
        self._min_summary_interval = min_summary_interval
        self._change_fraction = change_fraction
        self._per_peer = max_in_flight_per_peer
        self._total = trio.Semaphore(max_in_flight)
        self._handshake_timeout = handshake_timeout
        self._idle_timeout = idle_timeout
        self._max_handshakes = max_handshakes
        self._handshaking = 0
        self._peer_slots: dict[str, trio.Semaphore] = {}
        self._stats: dict[str, RemoteStats] = {}
        self._summary: _Summary | None = None
        self._summary_ready = trio.Event()
        self._summary_items = 0  # pages in the last summary
        self._summary_locations = 0
        self._changes = 0
        self._changed_a_lot = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen and serve until cancelled; `task_status.started(port)` once listening."""
        async with trio.open_nursery() as nursery:
            serve = functools.partial(trio.serve_tcp, self._serve_connection, self._port, host=self._host or None)
            listeners = await nursery.start(serve)
            self.port = listeners[0].socket.getsockname()[1]
            log.info("peer server listening on %s:%d", self._host or "*", self.port)
            nursery.start_soon(self._summarise_forever)
            task_status.started(self.port)

    def note_change(self, count: int = 1) -> None:
        """The store admitted or evicted `count` pages: a summary is rebuilt early once
        the changes reach `change_fraction` of what the last one held."""
        self._changes += count
        held = self._summary_items
        if self._changes >= self._change_fraction * held:
            self._changed_a_lot.set()

    def stats(self) -> dict[str, RemoteStats]:
        """Per remote IP address: what it asked and what it was given."""
        return dict(self._stats)

    async def _summarise_forever(self) -> None:
        while True:
            self._changes = 0
            self._changed_a_lot = trio.Event()
            try:
                await self._build_summary()
            except Exception:
                log.exception("building the peer summary failed; peers keep the previous one")
            await trio.sleep(self._min_summary_interval)
            with trio.move_on_after(max(0.0, self._summary_interval - self._min_summary_interval)):
                await self._changed_a_lot.wait()

    async def _build_summary(self) -> None:
        # Size for the configured capacity, or for what was held last time if more.
        digests = BloomFilter.for_capacity(max(self._capacity_pages, self._summary_items * 11 // 10))
        for i, digest in enumerate(self._provider.iter_digests()):
            digests.add(digest)
            if i % SUMMARY_BATCH == SUMMARY_BATCH - 1:
                await trio.sleep(0)
        locations = BloomFilter.for_capacity(max(self._capacity_locations, self._summary_locations * 11 // 10))
        for i, location in enumerate(self._provider.iter_locations()):
            locations.add(encode_location(*location))
            if i % SUMMARY_BATCH == SUMMARY_BATCH - 1:
                await trio.sleep(0)
        generation = self._summary.generation + 1 if self._summary else 1
        parts = encode_summary(generation, SUMMARY_DIGESTS, digests) + encode_summary(generation, SUMMARY_LOCATIONS, locations)
        self._summary = _Summary(generation, parts)
        self._summary_items = digests.items
        self._summary_locations = locations.items
        self._summary_ready.set()
        self._summary_ready = trio.Event()
        log.debug("peer summary %d: %d pages, %d locations, %d bytes", generation, digests.items, locations.items,
                  len(digests.bits) + len(locations.bits))

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        # trio.serve_tcp ends the whole server if a handler raises: none may.
        try:
            await self._serve_authenticated(stream)
        except Exception:
            log.exception("serving a peer connection failed")

    async def _serve_authenticated(self, stream: trio.SocketStream) -> None:
        ip = stream.socket.getpeername()[0]
        remote = self._stats.setdefault(ip, RemoteStats())
        async with stream:
            if self._handshaking >= self._max_handshakes:
                log.warning("peer %s: refused, %d handshakes already in progress", ip, self._handshaking)
                return
            self._handshaking += 1
            framed = None
            try:
                with trio.move_on_after(self._handshake_timeout):
                    framed = await server_handshake(stream, self._key)
            except ProtocolError as e:
                remote.refused += 1
                log.warning("peer %s: refused: %s", ip, e)
                return
            except trio.BrokenResourceError:
                return
            finally:
                self._handshaking -= 1
            if framed is None:
                log.warning("peer %s: did not authenticate within %.1f s", ip, self._handshake_timeout)
                return
            remote.connections += 1
            conn = _Connection(framed, remote, self._peer_slots.setdefault(ip, trio.Semaphore(self._per_peer)))
            queue_in, queue_out = trio.open_memory_channel[tuple[int, int, bytes, trio.Event | None]](math.inf)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._write, conn, queue_out, nursery.cancel_scope)
                    nursery.start_soon(self._send_summaries, queue_in)
                    try:
                        await self._read(conn, queue_in)
                    except ProtocolError as e:
                        remote.protocol_errors += 1
                        log.warning("peer %s: closing the connection: %s", ip, e)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass
                    nursery.cancel_scope.cancel()
            finally:
                # Answers never written still hold their slots.
                for _ in range(conn.in_flight):
                    self._done(conn)

    async def _read(self, conn: _Connection, queue: trio.MemorySendChannel) -> None:
        while True:
            with trio.move_on_after(self._idle_timeout):
                frame = await conn.framed.receive()
                if frame is None:
                    return
                type_, request_id, payload = frame
                if type_ not in REQUEST_SIZES:
                    raise ProtocolError(f"unknown or unexpected message type {type_}")
                if len(payload) != REQUEST_SIZES[type_]:
                    raise ProtocolError(f"message type {type_} with {len(payload)} bytes of payload")
                # One slot of this host's share and one of the total per request,
                # held until its answer is written: when they run out we stop
                # reading, and TCP pushes back on the sender.
                await conn.slots.acquire()
                try:
                    await self._total.acquire()
                except BaseException:
                    conn.slots.release()
                    raise
                conn.in_flight += 1
                conn.remote.in_flight += 1
                conn.remote.peak_in_flight = max(conn.remote.peak_in_flight, conn.remote.in_flight)
                conn.remote.requests += 1
                answer_type, answer = self._answer(type_, payload, conn.remote)
                queue.send_nowait((answer_type, request_id, answer, None))
                continue
            raise ProtocolError(f"nothing received for {self._idle_timeout:.0f} s")

    def _done(self, conn: _Connection) -> None:
        conn.in_flight -= 1
        conn.remote.in_flight -= 1
        conn.slots.release()
        self._total.release()

    def _answer(self, type_: int, payload: bytes, remote: RemoteStats) -> tuple[int, bytes]:
        try:
            if type_ == PING:
                return PONG, b""
            if type_ == GET_PAGE:
                page = self._provider.read_page(payload)
                if page is None:
                    remote.not_found += 1
                    return NOT_FOUND, b""
                if not 0 < len(page) <= PAGE_SIZE:
                    raise ValueError(f"the provider returned a page of {len(page)} bytes")
                remote.hits_given += 1
                return PAGE, bytes(page)
            found = self._provider.read_location(*decode_location(payload))
            if found is None:
                remote.not_found += 1
                return NOT_FOUND, b""
            data, digests = found
            pages = -(-len(data) // PAGE_SIZE)
            if not (0 < len(data) <= CHUNK_SIZE and len(digests) == pages and all(len(d) == DIGEST_SIZE for d in digests)):
                raise ValueError(f"the provider returned a chunk of {len(data)} bytes with {len(digests)} digests")
            remote.hits_given += 1
            return CHUNK, encode_chunk(bytes(data), digests)
        except Exception:
            remote.errors += 1
            log.exception("answering a peer's request of type %d failed", type_)
            return ERROR, encode_error(ERROR_INTERNAL, "internal error")

    async def _write(self, conn: _Connection, queue: trio.MemoryReceiveChannel, scope: trio.CancelScope) -> None:
        try:
            async for type_, request_id, payload, written in queue:
                await conn.framed.send(type_, request_id, payload)
                conn.remote.bytes_out += len(payload)
                if type_ != SUMMARY:
                    self._done(conn)
                elif written is not None:
                    written.set()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            scope.cancel()

    async def _send_summaries(self, queue: trio.MemorySendChannel) -> None:
        sent = 0
        while True:
            ready = self._summary_ready
            summary = self._summary
            if summary is not None and summary.generation != sent:
                # One generation queued at a time: a slow reader is not sent
                # every summary built meanwhile, only the latest.
                written = trio.Event()
                for part in summary.parts[:-1]:
                    queue.send_nowait((SUMMARY, 0, part, None))
                queue.send_nowait((SUMMARY, 0, summary.parts[-1], written))
                sent = summary.generation
                await written.wait()
                continue
            await ready.wait()

