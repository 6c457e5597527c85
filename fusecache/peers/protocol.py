"""The peer wire protocol: frames, limits, the authenticated handshake, block checks.

This module owns everything both ends of a peer connection must agree on
(`docs/peer-protocol.md` is the spec): the frame layout and every length
limit, the message encodings, the HMAC-SHA256 challenge-response handshake
(whose HELLO carries the protocol version and the page and chunk sizes of
`fusecache.geometry`: hosts that differ refuse each other, naming why)
and the sealing of every later frame (AES-256-GCM under the session keys it derives), the page digest
rule (a page's name, keyed BLAKE3 under a key derived from the cluster key:
`fusecache/identity.py`; an all-zero page has a name any host answers
by itself), and the checks on
keys and addresses done before any socket is opened. The server and the
client build on `FramedStream`; neither parses bytes itself.
"""

from __future__ import annotations

import collections
import hmac
import ipaddress
import logging
import os
import secrets
import stat
import struct
from collections.abc import Callable, Sequence

import trio
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fusecache.errors import QuietError
from fusecache.geometry import CHUNK_SIZE, PAGE_SIZE
from fusecache.identity import NAME_SIZE, cluster_names_key, page_name
from fusecache.peers.summary import BloomFilter

log = logging.getLogger(__name__)

# Version 2: HELLO carries the page and chunk sizes (hosts built with other units refuse each other).
# Version 3: frame MACs are keyed BLAKE3, not HMAC-SHA256 (a 64 KiB CHUNK's MAC: ~12 µs, not ~45, at each end).
# Version 4: a CHUNK frame's MAC covers its header, page count and page names, not its data: the receiver checks
# every data byte against those names (keyed BLAKE3 under the names key), so each byte is checked once, not twice
# (~16 µs of BLAKE3 per 64 KiB chunk at each end).
# Version 5: every frame after the handshake is sealed with AES-256-GCM: its payload encrypted, its header and payload
# authenticated (~21 µs per 64 KiB, against ~73 for the sixteen page names a version 4 receiver hashed, and ~23 for
# one keyed BLAKE3 call); a CHUNK carries its data only.
VERSION = 5
MAGIC = b"FCPEER"

DIGEST_SIZE = NAME_SIZE
# A page is named by the keyed BLAKE3 of its 4096 bytes (a file's short last
# page padded with zeros), under the names key every host derives from the
# cluster key (`names_key`). An all-zero page, a hole, is never stored or
# sent: any host answers its name (`hole_digest`) with zeros by itself.

# Frame: type u8, flags u8, request id u32, payload length u32, payload, then (after the handshake)
# a 16-byte tag. After the handshake the payload is encrypted with AES-256-GCM under the direction's
# session key, with the direction's frame sequence number as the nonce and the header as associated
# data: the tag authenticates header and payload.
HEADER = struct.Struct("!BBII")
TAG_SIZE = 16
MAX_PAYLOAD = 1024 * 1024
# Before authentication only HELLO and AUTH are allowed, and both are tiny:
# an unauthenticated host cannot make us buffer more than this.
MAX_PREAUTH_PAYLOAD = 64
# A connection's receive buffer: before authentication (HELLO and AUTH), and after (a 64 KiB chunk's frame, several
# answers at once, a SUMMARY part; a larger frame grows it).
PREAUTH_BUFFER = 1024
RECEIVE_BUFFER = 512 * 1024
NONCE_SIZE = 32
MIN_KEY_SIZE = 16

# Message types.
HELLO = 1
AUTH = 2
GET_PAGE = 16
GET_LOCATION = 17
PING = 18
SUMMARY = 32
PAGE = 33
CHUNK = 34
NOT_FOUND = 35
ERROR = 36
PONG = 37

HELLO_BODY = struct.Struct(f"!{len(MAGIC)}sH{NONCE_SIZE}sII")  # magic, version, nonce, page size, chunk size
HELLO_PREFIX = struct.Struct(f"!{len(MAGIC)}sH")  # what every version's HELLO starts with
# (ino, size, mtime_ns, ctime_ns, change, chunk_no): a location, and the bytes
# the location summary hashes.
LOCATION = struct.Struct("!QQqqQQ")
ERROR_HEAD = struct.Struct("!H")
MAX_ERROR_TEXT = 256
# generation, kind, k, reserved, salt, nbits, items, offset; then filter bytes.
SUMMARY_HEAD = struct.Struct("!IBBHQQQQ")
SUMMARY_DIGESTS = 0
SUMMARY_LOCATIONS = 1
MAX_SUMMARY_BYTES = 128 * 1024 * 1024  # ~1.1e8 items at 1%: a 400 GiB cache
MAX_HASHES = 16
# Filter bytes per SUMMARY frame: small enough that answers to requests are
# not queued long behind a summary on the same connection.
SUMMARY_PART = 256 * 1024

ERROR_INTERNAL = 1

# Payload lengths every request and fixed-size answer must have exactly.
REQUEST_SIZES = {GET_PAGE: DIGEST_SIZE, GET_LOCATION: LOCATION.size, PING: 0}

Version = tuple[int, int, int, int]  # (size, mtime_ns, ctime_ns, change)
Frame = tuple[int, int, bytes]  # (type, request id, payload), received and checked
_END = object()  # `FramedStream._pull`: a clean end of stream


class ProtocolError(Exception):
    """The other end broke the protocol; the connection is closed with a log line."""


class BadFrame(ProtocolError):
    """A frame that fails its MAC or breaks the format: a broken peer, or tampering on the path."""


class AuthError(ProtocolError):
    """The other end does not hold the cluster key (or is not a fusecache peer)."""


def names_key(cluster_key: bytes | None) -> bytes:
    """The key pages are named with on the wire, in summaries and in every peering host's store."""
    return cluster_names_key(cluster_key)


def page_digest(names: bytes, page: bytes | memoryview) -> bytes:
    """The name of a page under the names key `names`: keyed BLAKE3 of its bytes padded with zeros to PAGE_SIZE."""
    return page_name(names, page)


def hole_digest(names: bytes) -> bytes:
    """The name of an all-zero page under `names`."""
    return page_name(names, bytes(PAGE_SIZE))


def page_matches(names: bytes, page: bytes | memoryview, digest: bytes) -> bool:
    """Whether `page` (at most PAGE_SIZE bytes, not empty) is the page named `digest`."""
    return 0 < len(page) <= PAGE_SIZE and page_name(names, page) == digest


def encode_location(ino: int, version: Version, chunk: int) -> bytes:
    size, mtime_ns, ctime_ns, change = version
    return LOCATION.pack(ino, size, mtime_ns, ctime_ns, change, chunk)


def decode_location(payload: bytes) -> tuple[int, Version, int]:
    ino, size, mtime_ns, ctime_ns, change, chunk = LOCATION.unpack(payload)
    return ino, (size, mtime_ns, ctime_ns, change), chunk


def encode_error(code: int, text: str) -> bytes:
    return ERROR_HEAD.pack(code) + text.encode()[:MAX_ERROR_TEXT]


def encode_summary(generation: int, kind: int, bloom: BloomFilter) -> list[bytes]:
    """The SUMMARY payloads that carry `bloom`, in the order they must be sent."""
    bits = bytes(bloom.bits)
    head = (generation, kind, bloom.hashes, 0, bloom.salt, bloom.nbits, bloom.items)
    return [SUMMARY_HEAD.pack(*head, offset) + bits[offset : offset + SUMMARY_PART] for offset in range(0, len(bits), SUMMARY_PART)]


class FramedStream:
    """One peer connection as a sequence of frames, sealed (encrypted and authenticated) once the handshake is done.

    `receive()` returns one checked frame; `seal()` builds one frame to send.
    Frames must be sent in the order they were sealed (the tag covers a
    per-direction sequence number, so a frame replayed, dropped or reordered
    on the path is detected).

    Received bytes land in one buffer per connection, read into in place
    (`os.readv`) from a socket: a receive into a fresh bytes object, then
    appended to a buffer, copies every byte once more (~4 µs per 64 KiB under
    the daemon's malloc settings; under glibc's defaults its fresh pages cost
    ~55 µs more). The frame's plaintext, decrypted out of the buffer, is the
    one copy of a payload.
    """

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        # The plain socket under the stream, read (and written, `FrameWriter`) in place without trio's stream
        # calls; None for other streams (tests run the protocol over memory streams too).
        self.socket = stream.socket if isinstance(stream, trio.SocketStream) else None
        self._buffer = bytearray(PREAUTH_BUFFER)
        self._start = self._end = 0  # the bytes received and not yet taken as frames: _buffer[_start:_end]
        self._send_aead: AESGCM | None = None
        self._receive_aead: AESGCM | None = None
        self._send_seq = 0
        self._receive_seq = 0

    @property
    def buffered(self) -> int:
        """Bytes received and not yet returned as frames."""
        return self._end - self._start

    def start_session(self, send_key: bytes, receive_key: bytes) -> None:
        self._send_aead, self._receive_aead = AESGCM(send_key), AESGCM(receive_key)
        if len(self._buffer) < RECEIVE_BUFFER:
            self._room(RECEIVE_BUFFER)

    def seal(self, type_: int, request_id: int, payload: bytes = b"") -> tuple[bytes, bytes]:
        """One frame to send, as (header, the rest): two pieces, for a gathered write (no copy to join them)."""
        header = HEADER.pack(type_, 0, request_id, len(payload))
        if self._send_aead is None:
            return header, payload
        sealed = self._send_aead.encrypt(_nonce(self._send_seq), payload, header)  # the payload encrypted, then the tag
        self._send_seq += 1
        return header, sealed

    def encode(self, type_: int, request_id: int, payload: bytes = b"") -> bytes:
        """One frame to send, whole."""
        return b"".join(self.seal(type_, request_id, payload))

    async def send(self, type_: int, request_id: int, payload: bytes = b"") -> None:
        await self.stream.send_all(self.encode(type_, request_id, payload))

    async def receive(self) -> Frame | None:
        """The next frame as (type, request id, payload), or None at a clean end of stream.

        As a trio stream's receive: a checkpoint, unless the frame was whole in the buffer already.
        """
        got = self._next()
        if not isinstance(got, int):
            return got
        sock = self.socket
        if sock is None:
            return await self._receive_from_stream(got)
        await trio.lowlevel.checkpoint_if_cancelled()
        frame = self._pull(sock.fileno())
        if frame is not None:
            await trio.lowlevel.cancel_shielded_checkpoint()  # (read without waiting: yield once, as trio's streams do)
        while frame is None:
            await trio.lowlevel.wait_readable(sock)
            frame = self._pull(sock.fileno())
        return None if frame is _END else frame

    async def _receive_from_stream(self, got: int) -> Frame | None:
        while True:
            self._room(got)
            data = await self.stream.receive_some(len(self._buffer) - self._end)
            if not data:
                if not self.buffered:
                    return None
                raise ProtocolError("connection closed in the middle of a frame")
            self._buffer[self._end : self._end + len(data)] = data
            self._end += len(data)
            got = self._next()
            if not isinstance(got, int):
                return got

    def receive_nowait(self, fd: int) -> Frame | None:
        """The next frame if it is whole in the buffer or the socket `fd` (non-blocking) has the rest now; None if
        not yet. For a task that waits for `fd` to be readable itself (the peer client: fusecache/peers/client.py).
        An end of stream raises ProtocolError, as does a bad frame; a broken socket, OSError."""
        frame = self._pull(fd)
        if frame is _END:
            raise ProtocolError("the peer closed the connection")
        return frame

    def _pull(self, fd: int) -> Frame | object | None:
        """The next frame, reading the socket `fd` (non-blocking) as far as it needs and has; None if it has no more
        now; _END at a clean end of stream (nothing held). An end in the middle of a frame raises ProtocolError."""
        while isinstance(got := self._next(), int):
            try:
                n = self._read_into(fd, got)
            except BlockingIOError:
                return None
            if not n:
                if self.buffered:
                    raise ProtocolError("connection closed in the middle of a frame")
                return _END
        return got

    def _read_into(self, fd: int, need: int) -> int:
        """One read of `fd` into the buffer's free end, with room for `need` bytes from the first not taken: the
        count (0: end of stream); BlockingIOError if nothing is there."""
        self._room(need)
        with memoryview(self._buffer) as view, view[self._end :] as free:
            n = os.readv(fd, (free,))
        self._end += n
        return n

    def _room(self, need: int) -> None:
        """Room in the buffer for `need` bytes from the first not taken, and at least one free byte after what is held."""
        buffer, start, end = self._buffer, self._start, self._end
        if start + need <= len(buffer) and end < len(buffer):
            return
        held = end - start
        if start:
            buffer[:held] = buffer[start:end]  # (rare: a frame split by a read, at the buffer's end)
            self._start, self._end = 0, held
        if need > len(buffer) or held >= len(buffer):
            buffer.extend(bytes(max(need, held + 1) - len(buffer)))

    def _next(self) -> Frame | int:
        """The next frame, checked and taken from the buffer; else how many bytes it needs from the first not taken.

        The header is checked as soon as it is whole: an oversized frame is refused before its payload.
        """
        start = self._start
        held = self._end - start
        if held < HEADER.size:
            return HEADER.size
        type_, flags, request_id, length = HEADER.unpack_from(self._buffer, start)
        limit = MAX_PAYLOAD if self._receive_aead is not None else MAX_PREAUTH_PAYLOAD
        if length > limit:
            raise BadFrame(f"frame of {length} bytes, over the limit of {limit}")
        if flags != 0:
            raise BadFrame(f"frame with unknown flags {flags:#x}")
        end = HEADER.size + length
        whole = end + TAG_SIZE if self._receive_aead is not None else end
        if held < whole:
            return whole
        with memoryview(self._buffer) as view:
            if self._receive_aead is None:
                payload = bytes(view[start + HEADER.size : start + end])  # the one copy of the payload
            else:
                try:  # the tag is checked before a byte is decrypted; the plaintext is the one copy
                    payload = self._receive_aead.decrypt(
                        _nonce(self._receive_seq), view[start + HEADER.size : start + whole], view[start : start + HEADER.size]
                    )
                except InvalidTag:
                    raise BadFrame("frame with a wrong MAC (altered or injected on the path)") from None
                self._receive_seq += 1
        if whole == held:
            self._start = self._end = 0
        else:
            self._start = start + whole
        return type_, request_id, payload


class FrameWriter:
    """The one writer of a connection's frames, for any number of tasks: `send_nowait` never waits.

    A frame goes to the socket at once from the caller's task when nothing is queued
    ahead of it and the socket takes all of it (the common case: a request, or an
    answer on a quiet connection), saving the hand-off to the writing task and its
    scheduling (two loop passes per frame); otherwise it queues, and `run` writes
    the queue in order. Frames are sealed in the order they go out (the sequence
    numbers follow the wire), and a frame is never left half written by a caller
    that stops waiting. `on_written` is called once the whole frame is in the socket.
    """

    def __init__(self, framed: FramedStream) -> None:
        self.framed = framed
        self._socket = framed.socket  # written directly only when a plain socket
        # (encoded bytes or None, type, request id, payload, on_written)
        self._queue: collections.deque[tuple[bytes | memoryview | None, int, int, bytes, Callable[[], None] | None]] = collections.deque()
        self._busy = False
        self._lot = trio.lowlevel.ParkingLot()

    def send_nowait(self, type_: int, request_id: int, payload: bytes = b"", on_written: Callable[[], None] | None = None) -> None:
        if self._queue or self._busy or self._socket is None:
            self._queue.append((None, type_, request_id, payload, on_written))
            self._lot.unpark()
            return
        pieces = self.framed.seal(type_, request_id, payload)
        size = len(pieces[0]) + len(pieces[1])
        try:
            # The descriptor is asked for each time: a closed socket says -1 (EBADF here), never a reused number.
            # (Gathered: the header and the sealed payload are not copied into one frame first.)
            n = os.writev(self._socket.fileno(), pieces)
        except OSError:  # full (EAGAIN), or broken: the writing task meets any error and ends the connection
            n = 0
        if n == size:
            if on_written is not None:
                on_written()
            return
        self._queue.append((memoryview(b"".join(pieces))[n:], type_, request_id, payload, on_written))
        self._lot.unpark()

    async def run(self) -> None:
        """Write what is queued, in order, until cancelled or the stream breaks."""
        queue = self._queue
        while True:
            while not queue:
                await self._lot.park()
            encoded, type_, request_id, payload, on_written = queue.popleft()
            self._busy = True
            try:
                await self.framed.stream.send_all(self.framed.encode(type_, request_id, payload) if encoded is None else encoded)
            finally:
                self._busy = False
            if on_written is not None:
                on_written()


def _nonce(seq: int) -> bytes:
    """The GCM nonce of a direction's frame number `seq`: never repeated under a session key, which no other
    direction or connection has."""
    return seq.to_bytes(12, "big")


def _proof(key: bytes, label: bytes, client_nonce: bytes, server_nonce: bytes) -> bytes:
    return hmac.digest(key, b"fusecache-peer v1 " + label + client_nonce + server_nonce, "sha256")


def _hello(nonce: bytes) -> bytes:
    return HELLO_BODY.pack(MAGIC, VERSION, nonce, PAGE_SIZE, CHUNK_SIZE)


async def _receive_hello(framed: FramedStream) -> bytes:
    """The other end's HELLO, read and checked for the magic only: `check_hello` does the rest."""
    frame = await framed.receive()
    if frame is None:
        raise ProtocolError("closed before HELLO")
    type_, _, payload = frame
    if type_ != HELLO or len(payload) < HELLO_PREFIX.size:
        raise ProtocolError(f"expected HELLO, got a frame of type {type_} and {len(payload)} bytes")
    if HELLO_PREFIX.unpack_from(payload)[0] != MAGIC:
        raise ProtocolError("not a fusecache peer (bad magic in HELLO)")
    return payload


def check_hello(payload: bytes) -> bytes:
    """The nonce of a HELLO from a host that speaks our version with our page and chunk sizes;
    else ProtocolError naming what differs (every version's HELLO starts with magic and version)."""
    version = HELLO_PREFIX.unpack_from(payload)[1]
    if version != VERSION:
        raise ProtocolError(f"speaks peer protocol version {version}, this host speaks {VERSION}: run one fusecache version on every host")
    if len(payload) != HELLO_BODY.size:
        raise ProtocolError(f"a version {version} HELLO of {len(payload)} bytes, not {HELLO_BODY.size}")
    _, _, nonce, page_size, chunk_size = HELLO_BODY.unpack(payload)
    if (page_size, chunk_size) != (PAGE_SIZE, CHUNK_SIZE):
        raise ProtocolError(
            f"uses {page_size}-byte pages and {chunk_size}-byte chunks, this host {PAGE_SIZE} and {CHUNK_SIZE}: "
            "build every host with the same fusecache"
        )
    return nonce


async def _receive_proof(framed: FramedStream) -> bytes:
    frame = await framed.receive()
    if frame is None:
        raise AuthError("closed during authentication (the other end holds a different cluster key?)")
    type_, _, payload = frame
    if type_ != AUTH or len(payload) != 32:
        raise ProtocolError(f"expected AUTH, got a frame of type {type_} and {len(payload)} bytes")
    return payload


def _session_keys(key: bytes, client_nonce: bytes, server_nonce: bytes) -> tuple[bytes, bytes]:
    """(client-to-server, server-to-client) session keys, fresh for every connection."""
    return _proof(key, b"c2s", client_nonce, server_nonce), _proof(key, b"s2c", client_nonce, server_nonce)


async def client_handshake(stream: trio.abc.Stream, key: bytes) -> FramedStream:
    """Authenticate to a server: HELLO both ways, our proof first, then the server's."""
    framed = FramedStream(stream)
    client_nonce = secrets.token_bytes(NONCE_SIZE)
    await framed.send(HELLO, 0, _hello(client_nonce))
    server_nonce = check_hello(await _receive_hello(framed))
    await framed.send(AUTH, 0, _proof(key, b"client", client_nonce, server_nonce))
    if not hmac.compare_digest(await _receive_proof(framed), _proof(key, b"server", client_nonce, server_nonce)):
        raise AuthError("the server's proof is wrong: it does not hold our cluster key")
    c2s, s2c = _session_keys(key, client_nonce, server_nonce)
    framed.start_session(send_key=c2s, receive_key=s2c)
    return framed


async def server_handshake(stream: trio.abc.Stream, key: bytes, on_hello: Callable[[], None] | None = None) -> FramedStream:
    """Authenticate a client. The server proves itself only after the client did, so a
    host without the key receives nothing computed from the key: only a random nonce.
    `on_hello` is called once the client's HELLO has arrived (the server's table of
    pending handshakes drops silent connections before talking ones)."""
    framed = FramedStream(stream)
    hello = await _receive_hello(framed)
    if on_hello is not None:
        on_hello()
    server_nonce = secrets.token_bytes(NONCE_SIZE)
    # Our HELLO goes out before theirs is judged, so a client of another version or
    # geometry learns why it is refused (it checks ours) rather than seeing a bare close.
    await framed.send(HELLO, 0, _hello(server_nonce))
    client_nonce = check_hello(hello)
    if not hmac.compare_digest(await _receive_proof(framed), _proof(key, b"client", client_nonce, server_nonce)):
        raise AuthError("wrong proof: the client does not hold this cluster key")
    await framed.send(AUTH, 0, _proof(key, b"server", client_nonce, server_nonce))
    c2s, s2c = _session_keys(key, client_nonce, server_nonce)
    framed.start_session(send_key=s2c, receive_key=c2s)
    return framed


def split_address(address: str) -> tuple[str, int]:
    """'host:port', '[v6]:port' or ':port' (all addresses) -> (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise QuietError(f"peer address {address!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name other than localhost: it could resolve anywhere


INSECURE_REFUSED = (
    "peering without --cluster-key-file is refused: disk images hold tenants' data; "
    "make a key with `head -c 32 /dev/urandom > /etc/fusecache/cluster.key`"
)


def session_key(key: bytes | None, addresses: Sequence[str]) -> bytes:
    """The key to authenticate with. None (--peer-insecure) is allowed only when every
    address is loopback; it then becomes the empty key, so the same handshake and
    frame MACs run and an insecure host can never pair with a keyed one."""
    if key is None:
        if not all(is_loopback(split_address(a)[0]) for a in addresses):
            raise QuietError(INSECURE_REFUSED)
        return b""
    if len(key) < MIN_KEY_SIZE:
        raise QuietError(f"the cluster key has {len(key)} bytes, fewer than {MIN_KEY_SIZE}: {INSECURE_REFUSED.split('; ')[-1]}")
    return key


def load_cluster_key(path: str) -> bytes:
    """The cluster key: the whole content of `path`, which only its owner may read."""
    make = f"make one with `head -c 32 /dev/urandom > {path} && chmod 600 {path}`"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise QuietError(f"cluster key file {path} does not exist: {make}")
    except PermissionError:
        raise QuietError(f"cluster key file {path} is not readable by this user: run as its owner")
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode
        if mode & 0o077:
            raise QuietError(
                f"cluster key file {path} is open to group or others (mode {stat.S_IMODE(mode):04o}): `chmod 600 {path}`"
            )
        key = f.read()
    if len(key) < MIN_KEY_SIZE:
        raise QuietError(f"cluster key file {path} holds {len(key)} bytes, fewer than {MIN_KEY_SIZE}: {make}")
    return key
