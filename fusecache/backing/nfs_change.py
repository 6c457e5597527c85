"""The NFSv4 change attribute, read with a GETATTR of our own (libnfs 4.0 does not expose it).

Owns: one small ONC RPC client per libnfs context that sends a single NFSv4.0
COMPOUND, PUTFH(the file's handle) + GETATTR(change, size, fileid,
time_metadata, time_modify), and decodes the answer. All five come from one
GETATTR, so a version (size, mtime, ctime, change) is one snapshot of the
file. libnfs 4.0's `nfs_fstat64` asks for neither the change attribute nor
has a field for it, and its raw COMPOUND API takes C structures whose layout
is private; this speaks the documented wire format instead (RFC 5531 for
RPC, RFC 7530 for NFSv4.0: no client ID or state is needed for a GETATTR).

The file handle is read from libnfs's `struct nfsfh`, whose first member is
`struct nfs_fh { int len; char *val; }` in libnfs 4.0 (the soname is pinned
in nfs.py); the fileid the server returns is checked against the one the
backing recorded at open, so a misread handle is an error, never a wrong
version. AUTH_SYS with this process's uid and gid, like libnfs; as root, from
a reserved port, like libnfs, for servers that require one.
"""

from __future__ import annotations

import ctypes
import errno
import os
import random
import socket
import struct
from typing import NamedTuple

_NFS_PROGRAM = 100003
_NFS_V4 = 4
_COMPOUND = 1
_OP_PUTFH = 22
_OP_GETATTR = 9
# Attribute numbers (RFC 7530 5.8): bitmap word 0 holds 0-31, word 1 holds 32-63.
_CHANGE, _SIZE, _FILEID, _TIME_METADATA, _TIME_MODIFY = 3, 4, 20, 52, 53
_REQUEST = (1 << _CHANGE | 1 << _SIZE | 1 << _FILEID, 1 << (_TIME_METADATA - 32) | 1 << (_TIME_MODIFY - 32))
_MAX_RECORD = 64 * 1024
_MAX_FH = 128


class ChangeAttrs(NamedTuple):
    change: int
    size: int
    fileid: int
    ctime_ns: int
    mtime_ns: int


def file_handle(nfsfh: int) -> bytes:
    """The NFS file handle inside a libnfs 4.0 `struct nfsfh *` (see the module docstring)."""
    length = ctypes.c_int.from_address(nfsfh).value
    val = ctypes.c_void_p.from_address(nfsfh + ctypes.sizeof(ctypes.c_void_p)).value
    if not 0 < length <= _MAX_FH or not val:
        raise OSError(errno.EIO, f"libnfs file handle of {length} bytes: not the layout this module reads")
    return ctypes.string_at(val, length)


class ChangeReader:
    """One TCP connection to the NFS server for GETATTRs; not thread-safe (one per libnfs context)."""

    def __init__(self, server: str, port: int, timeout: float) -> None:
        self.server, self.port, self.timeout = server, port, timeout
        self._sock: socket.socket | None = None
        self._xid = random.getrandbits(32)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def read(self, fh: bytes) -> ChangeAttrs:
        """GETATTR on `fh`; OSError(EIO) on a transport failure (the connection is then remade),
        OSError(errno of the NFS status) if the server refuses."""
        try:
            if self._sock is None:
                self._sock = self._connect()
            self._xid = (self._xid + 1) & 0xFFFFFFFF
            self._sock.sendall(_record(_call(self._xid, fh)))
            reply = self._receive_record()
        except (OSError, struct.error) as e:
            self.close()
            raise OSError(errno.EIO, f"NFSv4 GETATTR of the change attribute failed: {e}") from None
        try:
            return _decode_reply(reply, self._xid)
        except struct.error:
            self.close()
            raise OSError(errno.EIO, "NFSv4 GETATTR: a reply too short to decode") from None

    def _connect(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.server else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            if os.geteuid() == 0:
                # Servers exporting with "secure" (knfsd's default) take only reserved ports.
                for port in random.sample(range(600, 1024), 20):
                    try:
                        sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
                        break
                    except OSError:
                        continue
            sock.connect((self.server, self.port))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        except BaseException:
            sock.close()
            raise

    def _receive_record(self) -> bytes:
        assert self._sock is not None
        out = b""
        while True:
            (mark,) = struct.unpack("!I", self._receive(4))
            length = mark & 0x7FFFFFFF
            if len(out) + length > _MAX_RECORD:
                raise OSError(errno.EIO, f"a reply of {len(out) + length} bytes to a GETATTR")
            out += self._receive(length)
            if mark & 0x80000000:
                return out

    def _receive(self, n: int) -> bytes:
        assert self._sock is not None
        buf = bytearray()
        while len(buf) < n:
            chunk = self._sock.recv(n - len(buf))
            if not chunk:
                raise OSError(errno.ECONNRESET, "the NFS server closed the connection")
            buf += chunk
        return bytes(buf)


def _opaque(data: bytes) -> bytes:
    return struct.pack("!I", len(data)) + data + bytes(-len(data) % 4)


def _record(body: bytes) -> bytes:
    return struct.pack("!I", 0x80000000 | len(body)) + body


def _call(xid: int, fh: bytes) -> bytes:
    machine = socket.gethostname().encode()[:255]
    cred = struct.pack("!I", 0) + _opaque(machine) + struct.pack("!III", os.getuid(), os.getgid(), 0)
    header = struct.pack("!IIIIII", xid, 0, 2, _NFS_PROGRAM, _NFS_V4, _COMPOUND)
    auth = struct.pack("!I", 1) + _opaque(cred) + struct.pack("!II", 0, 0)  # AUTH_SYS, then a null verifier
    # COMPOUND4args: tag "", minorversion 0, two operations.
    ops = struct.pack("!I", _OP_PUTFH) + _opaque(fh) + struct.pack("!IIII", _OP_GETATTR, 2, *_REQUEST)
    return header + auth + struct.pack("!III", 0, 0, 2) + ops


def _decode_reply(reply: bytes, xid: int) -> ChangeAttrs:
    got_xid, msg_type, reply_stat = struct.unpack_from("!III", reply, 0)
    if got_xid != xid or msg_type != 1:
        raise OSError(errno.EIO, f"NFSv4 GETATTR: reply to another call (xid {got_xid}, type {msg_type})")
    if reply_stat != 0:
        raise OSError(errno.EACCES, "NFSv4 GETATTR: the server denied the RPC (credentials)")
    pos = 12
    _, verf_len = struct.unpack_from("!II", reply, pos)
    pos += 8 + verf_len + (-verf_len % 4)
    (accept_stat,) = struct.unpack_from("!I", reply, pos)
    if accept_stat != 0:
        raise OSError(errno.EIO, f"NFSv4 GETATTR: the server did not accept the call (accept_stat {accept_stat})")
    pos += 4
    status, tag_len = struct.unpack_from("!II", reply, pos)
    pos += 8 + tag_len + (-tag_len % 4)
    (count,) = struct.unpack_from("!I", reply, pos)
    pos += 4
    for _ in range(count):
        op, op_status = struct.unpack_from("!II", reply, pos)
        pos += 8
        if op_status != 0:
            raise _nfs4_error(op, op_status)
        if op == _OP_GETATTR:
            return _decode_fattr(reply, pos)
    raise _nfs4_error(_OP_GETATTR, status or 10006)  # NFS4ERR_SERVERFAULT: no GETATTR result at all


def _decode_fattr(reply: bytes, pos: int) -> ChangeAttrs:
    (words,) = struct.unpack_from("!I", reply, pos)
    mask = struct.unpack_from(f"!{words}I", reply, pos + 4)
    pos += 4 + 4 * words
    bits = sum(w << (32 * i) for i, w in enumerate(mask))
    wanted = _REQUEST[0] | _REQUEST[1] << 32
    if bits & wanted != wanted:
        missing = [n for n in (_CHANGE, _SIZE, _FILEID, _TIME_METADATA, _TIME_MODIFY) if not bits >> n & 1]
        raise OSError(errno.ENOTSUP, f"the NFS server does not return attributes {missing}")
    if bits & ~wanted:
        raise OSError(errno.EIO, f"NFSv4 GETATTR: attributes not asked for ({bits & ~wanted:#x})")
    pos += 4  # the attrlist4 length: values follow in attribute-number order
    change, size, fileid = struct.unpack_from("!QQQ", reply, pos)
    pos += 24
    c_sec, c_nsec, m_sec, m_nsec = struct.unpack_from("!qIqI", reply, pos)
    return ChangeAttrs(change, size, fileid, c_sec * 1_000_000_000 + c_nsec, m_sec * 1_000_000_000 + m_nsec)


# NFSv4 status -> errno for the few a GETATTR by handle can give.
_NFS4_ERRNO = {1: errno.EPERM, 2: errno.ENOENT, 5: errno.EIO, 13: errno.EACCES, 70: errno.ESTALE, 10001: errno.EBADF,
               10014: errno.ESTALE}  # fmt: skip


def _nfs4_error(op: int, status: int) -> OSError:
    return OSError(_NFS4_ERRNO.get(status, errno.EIO), f"NFSv4 GETATTR: operation {op} failed with status {status}")
