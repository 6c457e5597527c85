"""The peer server: answers other hosts' requests from the local store, publishes summaries.

This module owns the listening side: who may connect at all (the configured
peers and `--peer-allow` networks: any other source is closed at accept, before
a byte is read), the table of handshakes in progress (bounded per source and in
total; a new connection drops the oldest pending one rather than being refused,
so idle connections cannot keep a keyed peer out), the handshake with each
connecting host, the per-host and total bounds on requests in flight (a host that sends
faster than it reads stops being read, through TCP backpressure, and cannot
grow our memory or take more than its share of the trio loop), the answers
(from a `PageProvider`, called inline: it is an LMDB read of a few µs), and
the Bloom summaries it builds from the provider and sends to every client.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import ipaddress
import logging
import math
import socket
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

import trio

from fusecache.geometry import PAGES_PER_CHUNK
from fusecache.peers.protocol import (
    CHUNK,
    CHUNK_SIZE,
    ERROR,
    ERROR_INTERNAL,
    GET_PAGE,
    NOT_FOUND,
    PAGE,
    PAGE_SIZE,
    PING,
    PONG,
    REQUEST_SIZES,
    SUMMARY,
    SUMMARY_DIGESTS,
    SUMMARY_LOCATIONS,
    FramedStream,
    FrameWriter,
    ProtocolError,
    Version,
    decode_location,
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
# Names in the allow-list (peers given by host name) are looked up again this often.
RESOLVE_INTERVAL = 60.0
# After accepting a connection that dropped a pending handshake, wait this long before the next accept.
DROP_PACE = 0.002
# At most one log line this often about connections refused or dropped before authentication.
PREAUTH_LOG_INTERVAL = 10.0

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class PageProvider(Protocol):
    """What the server serves from: the local store. Every call is synchronous and
    cheap (an LMDB read) and runs on the trio thread. The iterators may be
    suspended between items while the loop serves other work."""

    def read_page(self, digest: bytes) -> bytes | None:
        """The page named `digest`, or None if it is not held."""
        ...

    def read_location(self, ino: int, version: Version, chunk: int) -> bytes | None:
        """Chunk `chunk` of file `ino`, verified, only if the held record of `ino` has exactly `version`; else None."""
        ...

    def iter_digests(self) -> Iterable[bytes]: ...

    def iter_locations(self) -> Iterable[tuple[int, Version, int]]: ...


@dataclasses.dataclass
class RemoteStats:
    """What one remote host (by IP address) asked of this server."""

    connections: int = 0
    protocol_errors: int = 0
    requests: int = 0
    hits_given: int = 0
    not_found: int = 0
    errors: int = 0
    bytes_out: int = 0
    in_flight: int = 0
    peak_in_flight: int = 0


@dataclasses.dataclass
class HandshakeStats:
    """Connections before authentication, for the whole server: no per-address state is
    kept for hosts that have not authenticated (an address could be anyone's)."""

    accepted: int = 0  # from an allowed source, handshake started
    authenticated: int = 0
    not_allowed: int = 0  # from a source that is no configured peer nor in --peer-allow: closed at once
    dropped: int = 0  # pending handshakes dropped to make room for a newer one
    timed_out: int = 0
    failed: int = 0  # wrong proof, bad HELLO, another version or geometry
    pending: int = 0
    peak_pending: int = 0


@dataclasses.dataclass(eq=False)
class _Pending:
    ip: str
    scope: trio.CancelScope
    talked: bool = False  # its HELLO has arrived
    dropped: bool = False


class PendingHandshakes:
    """Handshakes in progress: at most `per_source` from one address and `total` in all.

    A new connection is never refused for room: it drops an older pending one
    instead, from its own address if that address is at its share, else from
    the address holding the most. Within an address, the oldest connection that
    has not yet sent its HELLO goes first, then the oldest. An honest peer
    finishes its handshake in two round trips; connections that sit idle, or
    reconnect as soon as they are closed, only ever displace each other.
    """

    def __init__(self, total: int, per_source: int) -> None:
        self.total = total
        self.per_source = per_source
        self._by_ip: dict[str, list[_Pending]] = {}
        self.count = 0

    def add(self, ip: str, scope: trio.CancelScope) -> tuple[_Pending, _Pending | None]:
        """Register a handshake; returns it and the one dropped for it (already cancelled), if any."""
        mine = self._by_ip.get(ip, [])
        victim = None
        if len(mine) >= self.per_source:
            victim = self._pick(mine)
        elif self.count >= self.total:
            victim = self._pick(max(self._by_ip.values(), key=len))
        if victim is not None:
            victim.dropped = True
            victim.scope.cancel()
            self.remove(victim)
        entry = _Pending(ip, scope)
        self._by_ip.setdefault(ip, []).append(entry)
        self.count += 1
        return entry, victim

    def remove(self, entry: _Pending) -> None:
        entries = self._by_ip.get(entry.ip)
        if entries is None or entry not in entries:
            return
        entries.remove(entry)
        self.count -= 1
        if not entries:
            del self._by_ip[entry.ip]

    @staticmethod
    def _pick(entries: list[_Pending]) -> _Pending:
        return next((e for e in entries if not e.talked), entries[0])


class AllowList:
    """The sources the server accepts connections from: the configured peers' addresses
    (names looked up at start and every RESOLVE_INTERVAL) and explicit networks."""

    def __init__(self, entries: Sequence[str]) -> None:
        self.networks: list[Network] = []
        self.names: list[str] = []
        self._resolved: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
        self._by_name: dict[str, set[ipaddress.IPv4Address | ipaddress.IPv6Address]] = {}
        for entry in entries:
            try:
                self.networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                self.names.append(entry)

    def __bool__(self) -> bool:
        return bool(self.networks or self.names)

    def allows(self, ip: str) -> bool:
        try:
            addr = ipaddress.ip_address(ip.split("%", 1)[0])
        except ValueError:
            return False
        if addr.version == 6 and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return addr in self._resolved or any(addr in net for net in self.networks)

    async def resolve(self) -> None:
        """Look the names up again; a name that does not resolve keeps its old addresses."""
        found: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
        for name in self.names:
            try:
                infos = await trio.socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
            except OSError as e:
                log.warning("peer %s: cannot look up its address (%s): connections from it are refused until it resolves", name, e)
                found |= self._by_name.get(name, set())
                continue
            addrs = {ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in infos}
            self._by_name[name] = addrs
            found |= addrs
        self._resolved = found


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
    """Serves the local store to authenticated peers on `listen` ('host:port').

    `allow`: who may connect at all: peer addresses ('host:port', as given to
    --peer), IP addresses, networks ('10.0.0.0/24'), or host names. A
    connection from anywhere else is closed at accept. Empty: nobody.
    """

    def __init__(
        self,
        listen: str,
        key: bytes | None,
        provider: PageProvider,
        *,
        allow: Sequence[str] = (),
        capacity_pages: int = 1 << 18,
        capacity_locations: int | None = None,
        summary_interval: float = 60.0,
        min_summary_interval: float = 5.0,
        change_fraction: float = 0.05,
        max_in_flight_per_peer: int = 32,
        max_in_flight: int = 256,
        handshake_timeout: float = 2.0,
        idle_timeout: float = 60.0,
        max_handshakes: int = 128,
        max_handshakes_per_source: int = 32,
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
        self._allow = AllowList([_allow_entry(a) for a in allow])
        self._pending = PendingHandshakes(max_handshakes, max_handshakes_per_source)
        self._handshake_stats = HandshakeStats()
        self._preauth_logged_at = -math.inf
        self._preauth_unlogged = 0
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
        if not self._allow:
            log.warning("peer server on %s: no --peer and no --peer-allow: every connection will be refused", self._host or "*")
        await self._allow.resolve()
        listeners = await trio.open_tcp_listeners(self._port, host=self._host or None)
        try:
            async with trio.open_nursery() as nursery:
                if self._allow.names:
                    nursery.start_soon(self._resolve_forever)
                for listener in listeners:
                    nursery.start_soon(self._accept_forever, listener, nursery)
                self.port = listeners[0].socket.getsockname()[1]
                log.info("peer server listening on %s:%d", self._host or "*", self.port)
                nursery.start_soon(self._summarise_forever)
                task_status.started(self.port)
        finally:
            for listener in listeners:
                listener.socket.close()

    async def _accept_forever(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        """Accept connections and decide at once who may start a handshake (see module docstring).

        After a connection that dropped a pending handshake, the next accept waits
        DROP_PACE: connections that reconnect as fast as they are dropped then
        cycle at most 1/DROP_PACE times a second, so an honest handshake has at
        least `per_source` * DROP_PACE to send its HELLO (its place in the kernel's
        accept queue costs it a few ms at most)."""
        while True:
            try:
                stream = await listener.accept()
            except OSError as e:
                if e.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS):
                    raise
                log.error("peer server: cannot accept (%s): out of file descriptors or memory; retrying", e.strerror)
                await trio.sleep(0.1)
                continue
            hs = self._handshake_stats
            try:
                ip = stream.socket.getpeername()[0]
            except OSError:  # already gone
                stream.socket.close()
                continue
            if not self._allow.allows(ip):
                hs.not_allowed += 1
                stream.socket.close()  # before reading a byte: no state, no answer
                self._note_preauth("refused: not a configured peer nor in --peer-allow", ip)
                continue
            scope = trio.CancelScope(deadline=trio.current_time() + self._handshake_timeout)
            pending, dropped = self._pending.add(ip, scope)
            hs.accepted += 1
            hs.peak_pending = max(hs.peak_pending, self._pending.count)
            nursery.start_soon(self._serve_connection, stream, pending)
            if dropped is not None:
                hs.dropped += 1
                self._note_preauth(f"a pending handshake from {dropped.ip} dropped to make room", ip)
                await trio.sleep(DROP_PACE)

    def note_change(self, count: int = 1) -> None:
        """The store admitted or evicted `count` pages: a summary is rebuilt early once
        the changes reach `change_fraction` of what the last one held."""
        self._changes += count
        held = self._summary_items
        if self._changes >= self._change_fraction * held:
            self._changed_a_lot.set()

    def stats(self) -> dict[str, RemoteStats]:
        """Per remote IP address that authenticated: what it asked and what it was given."""
        return dict(self._stats)

    def handshake_stats(self) -> HandshakeStats:
        """Connections before authentication, for the whole server."""
        return dataclasses.replace(self._handshake_stats, pending=self._pending.count)

    async def _resolve_forever(self) -> None:
        while True:
            await trio.sleep(RESOLVE_INTERVAL)
            await self._allow.resolve()

    def _note_preauth(self, what: str, ip: str) -> None:
        """One log line per PREAUTH_LOG_INTERVAL about refused or dropped connections, not one
        each: whoever can reach the port must not be able to flood the log."""
        now = trio.current_time()
        if now - self._preauth_logged_at < PREAUTH_LOG_INTERVAL:
            self._preauth_unlogged += 1
            return
        more = f" ({self._preauth_unlogged} more such events since the last line)" if self._preauth_unlogged else ""
        log.warning("peer connection from %s: %s%s", ip, what, more)
        self._preauth_logged_at = now
        self._preauth_unlogged = 0

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
        digests = await self._filled(max(self._capacity_pages, self._summary_items * 11 // 10), self._provider.iter_digests)
        locations = await self._filled(
            max(self._capacity_locations, self._summary_locations * 11 // 10),
            lambda: (encode_location(*location) for location in self._provider.iter_locations()),
        )
        generation = self._summary.generation + 1 if self._summary else 1
        parts = encode_summary(generation, SUMMARY_DIGESTS, digests) + encode_summary(generation, SUMMARY_LOCATIONS, locations)
        self._summary = _Summary(generation, parts)
        self._summary_items = digests.items
        self._summary_locations = locations.items
        self._summary_ready.set()
        self._summary_ready = trio.Event()
        log.debug("peer summary %d: %d pages, %d locations, %d bytes", generation, digests.items, locations.items,
                  len(digests.bits) + len(locations.bits))

    async def _filled(self, capacity: int, keys: Callable[[], Iterable[bytes]]) -> BloomFilter:
        """A filter of every key, sized for `capacity`; built again, sized for what it holds,
        if that came out too full for clients to accept (more keys than the sizing expected)."""
        for _ in range(2):
            bloom = BloomFilter.for_capacity(capacity)
            for i, key in enumerate(keys()):
                bloom.add(key)
                if i % SUMMARY_BATCH == SUMMARY_BATCH - 1:
                    await trio.sleep(0)
            if bloom.plausible() is None:
                break
            capacity = bloom.items * 11 // 10
        return bloom

    async def _serve_connection(self, stream: trio.SocketStream, pending: _Pending) -> None:
        # One connection's failure must not end the server.
        try:
            await self._serve_authenticated(stream, pending)
        except Exception:
            log.exception("serving a peer connection failed")

    async def _serve_authenticated(self, stream: trio.SocketStream, pending: _Pending) -> None:
        ip = pending.ip
        hs = self._handshake_stats
        async with stream:
            framed = None
            scope = pending.scope

            def talked() -> None:
                pending.talked = True

            try:
                with scope:
                    framed = await server_handshake(stream, self._key, talked)
            except ProtocolError as e:
                hs.failed += 1
                self._note_preauth(f"refused: {e}", ip)
                return
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            finally:
                self._pending.remove(pending)
            if framed is None:
                if not pending.dropped:
                    hs.timed_out += 1
                    self._note_preauth(f"did not authenticate within {self._handshake_timeout:.1f} s", ip)
                return
            hs.authenticated += 1
            remote = self._stats.setdefault(ip, RemoteStats())
            remote.connections += 1
            conn = _Connection(framed, remote, self._peer_slots.setdefault(ip, trio.Semaphore(self._per_peer)))
            writer = FrameWriter(framed)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._write, writer, nursery.cancel_scope)
                    nursery.start_soon(self._send_summaries, conn, writer)
                    try:
                        await self._read(conn, writer)
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

    async def _read(self, conn: _Connection, writer: FrameWriter) -> None:
        framed = conn.framed
        # One scope for the connection, its deadline moved on by each frame (not a scope per frame).
        with trio.move_on_after(self._idle_timeout) as idle:
            while True:
                frame = await framed.receive()
                if frame is None:
                    return
                idle.deadline = trio.current_time() + self._idle_timeout
                type_, request_id, payload = frame
                if type_ not in REQUEST_SIZES:
                    raise ProtocolError(f"unknown or unexpected message type {type_}")
                if len(payload) != REQUEST_SIZES[type_]:
                    raise ProtocolError(f"message type {type_} with {len(payload)} bytes of payload")
                # One slot of this host's share and one of the total per request,
                # held until its answer is written: when they run out we stop
                # reading, and TCP pushes back on the sender. Taken without a
                # pass through the loop when free (a peer hit waits for this task).
                try:
                    conn.slots.acquire_nowait()
                except trio.WouldBlock:
                    await conn.slots.acquire()
                try:
                    try:
                        self._total.acquire_nowait()
                    except trio.WouldBlock:
                        await self._total.acquire()
                except BaseException:
                    conn.slots.release()
                    raise
                conn.in_flight += 1
                conn.remote.in_flight += 1
                conn.remote.peak_in_flight = max(conn.remote.peak_in_flight, conn.remote.in_flight)
                conn.remote.requests += 1
                answer_type, answer = self._answer(type_, payload, conn.remote)
                # Written from this task when the socket takes it whole (no hand-off), else queued.
                writer.send_nowait(answer_type, request_id, answer, functools.partial(self._written, conn, len(answer)))
                if framed.buffered:
                    # The next request is already here and would be read without I/O (which yields):
                    # yield once per request anyway, after the answer, so a flood shares the loop.
                    await trio.lowlevel.checkpoint()
        raise ProtocolError(f"nothing received for {self._idle_timeout:.0f} s")

    def _written(self, conn: _Connection, size: int) -> None:
        conn.remote.bytes_out += size
        self._done(conn)

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
            data = self._provider.read_location(*decode_location(payload))
            if data is None:
                remote.not_found += 1
                return NOT_FOUND, b""
            if not 0 < len(data) <= CHUNK_SIZE:
                raise ValueError(f"the provider returned a chunk of {len(data)} bytes")
            remote.hits_given += 1
            return CHUNK, bytes(data)
        except Exception:
            remote.errors += 1
            log.exception("answering a peer's request of type %d failed", type_)
            return ERROR, encode_error(ERROR_INTERNAL, "internal error")

    @staticmethod
    async def _write(writer: FrameWriter, scope: trio.CancelScope) -> None:
        try:
            await writer.run()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            scope.cancel()

    async def _send_summaries(self, conn: _Connection, writer: FrameWriter) -> None:
        sent = 0
        while True:
            ready = self._summary_ready
            summary = self._summary
            if summary is not None and summary.generation != sent:
                # One generation queued at a time: a slow reader is not sent
                # every summary built meanwhile, only the latest.
                written = trio.Event()
                for part in summary.parts[:-1]:
                    writer.send_nowait(SUMMARY, 0, part)
                writer.send_nowait(SUMMARY, 0, summary.parts[-1], written.set)
                conn.remote.bytes_out += sum(map(len, summary.parts))
                sent = summary.generation
                await written.wait()
                continue
            await ready.wait()



def _allow_entry(entry: str) -> str:
    """A peer's 'host:port' -> its host; an address, network or name as it is."""
    try:
        ipaddress.ip_network(entry, strict=False)
        return entry
    except ValueError:
        pass
    if ":" in entry and entry.rpartition(":")[2].isdigit():
        return split_address(entry)[0]
    return entry
