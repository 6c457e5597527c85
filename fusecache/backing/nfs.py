"""A backing that speaks NFS itself (libnfs 4.0 through ctypes): `nfs://server/export`.

Owns: the URL, a pool of NFS connections, open-file
handles usable from any thread, timeouts and recovery from a server that went
away. The FUSE layer calls every method from worker threads, but one: a read
of a file already open on a free context is made from the trio loop itself
(`pread_on_loop`: the async READ sent there, its socket waited for by trio),
which spares a cold read the thread hand-off; anything else, and any failure
there, goes to `pread` in a thread. The ctypes binding itself is `libnfs.py`.

Why one module of ~900 lines: the context pool, the per-context opens behind
each handle, remounts after a transport failure and silly renames are one
state machine under one lock; split across files, its rules would be too.

Threads and connections. A libnfs context is one TCP connection and is not
thread-safe, so the backing keeps a pool of them (`connections`, default 8)
and every call checks one out for its duration. A libnfs file handle belongs
to the context that opened it, so an `NfsHandle` holds the file's path and
fileid, and takes a reference to the file's open on whichever context serves
a call, opening it there the first time (checked to be the same fileid). All
handles of a file share one open per context (see `_ref`: NFSv4 needs that).
Closing drops each reference on its own context.

Large requests. One READ at a time is round-trip bound once the server is a
network away, so a pread larger than `_SPLIT` is cut into pieces read at once
on several contexts (the calling thread reads the first, a small thread pool
the rest). NFSv4 writes go in pieces of `_V4_WRITE_MAX` (libnfs 4.0 cannot
encode a larger NFSv4 WRITE), spread the same way.

Failures. Every call has a timeout (`timeout`, default 10 s, libnfs's own
RPC timeout). A call that fails on the transport (timeout, reset, refused)
raises OSError(EIO); the context is then remounted before its next use, which
is what NFSv4 needs after a server restart (its client state is gone) and
harmless for NFSv3. The first such failure logs one line naming the server
and path; the first call started after it that succeeds logs that the server
is back. Calls are made through libnfs's async API and waited for here
(`_run`; libnfs.py says why never its blocking calls), so a connection freed
with requests still queued is safe: their answers go to nobody.

Unlinked-but-open files: like the kernel NFS client, unlinking (or renaming
over) a file this backing has open renames it to `.fusecache-nfs-*` in the
same directory instead ("silly rename"), and removes it at the last close.
Other clients' unlinks cannot be seen: a read then fails with ESTALE.

Versions. `fstat` on NFSv4 also returns the change attribute, read with a
GETATTR of our own on a side connection per context (`nfs_change.py`: libnfs
4.0 does not expose it), with size, mtime and ctime from that same reply; if
that fails the attributes are libnfs's with change 0 (a version that differs,
so at worst cached blocks are dropped). `lstat` leaves change at 0: versions
are only taken from open files. NFSv3 has no change attribute: two writes
within one timestamp tick of the server's filesystem look like one version
(README, "Versions on NFS").

libnfs 4.0's NFSv4 has rough edges, worked around here: path SETATTRs run on
a connection of their own, creates fix up mode and times, writes are split
(above), and each context has its own client name. Not available through it:
the NFSv4 change attribute (read on the side, above), extended attributes
(ENOTSUP), RENAME_EXCHANGE (EINVAL), and nanosecond times (utimens is sent
with microsecond precision). NFSv3 (the default) has none of these issues.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import dataclasses
import errno
import itertools
import logging
import os
import posixpath
import select
import socket
import stat
import threading
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

import trio

from fusecache.backing import Attr, StatFs
from fusecache.backing.libnfs import (
    Reply,
    _attr,
    _nfs,
    _nfs_held,
    _on_reply,
    _replies,
    _Stat64,
    _StatVfs64,
    _TimeVal,
    _tokens,
)
from fusecache.backing.nfs_change import ChangeReader, file_handle
from fusecache.errors import QuietError

log = logging.getLogger(__name__)

# Reads above this size are split into pieces of this size, read in parallel.
_SPLIT = 256 * 1024
_DEFAULT_CONNECTIONS = 8
# libnfs 4.0 encodes an NFSv4 COMPOUND into a 4 KiB buffer: a WRITE carrying
# more than ~3.9 KiB fails ("Failed to encode COMPOUND4args"), so NFSv4
# writes go in pieces this size (room left for the largest file handle).
_V4_WRITE_MAX = 3584
_DEFAULT_TIMEOUT = 10.0
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
# What libnfs returns when the transport failed rather than the server saying no.
# (libnfs reports a request cancelled by a dropped connection as EINTR.)
_TRANSPORT_ERRNOS = {
    errno.EIO, errno.EINTR, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED,
    errno.ENOTCONN, errno.EPIPE, errno.ESHUTDOWN, errno.EHOSTUNREACH, errno.ENETUNREACH,
}  # fmt: skip
# libnfs calls that step the NFSv4 open-owner's sequence id (directly, or by
# the OPEN and CLOSE that libnfs wraps around a path SETATTR).
_V4_SEQID_CALLS = {"nfs_open", "nfs_create", "nfs_close", "nfs_truncate", "nfs_chmod", "nfs_lchown", "nfs_lutimes"}


def _into_struct(out: ctypes.Structure) -> Callable[[int, int], None]:
    return lambda data, status: ctypes.memmove(ctypes.addressof(out), data, ctypes.sizeof(out)) and None


def _into_pointer(out: ctypes.c_void_p) -> Callable[[int, int], None]:
    def keep(data: int, status: int) -> None:
        out.value = data

    return keep


def _into_buffer(out: ctypes.Array[ctypes.c_char]) -> Callable[[int, int], None]:
    return lambda data, status: ctypes.memmove(out, data, min(status, len(out))) and None


def _into_list(out: list[bytes]) -> Callable[[int, int], None]:
    return lambda data, status: out.append(ctypes.string_at(data))


# The calls whose blocking form writes a result through its last argument (see NfsBacking._run).
_RESULTS: dict[str, Callable[[Any], Callable[[int, int], None]]] = {
    "nfs_lstat64": _into_struct,
    "nfs_stat64": _into_struct,
    "nfs_fstat64": _into_struct,
    "nfs_statvfs64": _into_struct,
    "nfs_open": _into_pointer,
    "nfs_create": _into_pointer,
    "nfs_opendir": _into_pointer,
    "nfs_pread": _into_buffer,
    "nfs_readlink": _into_list,
}
# libnfs's _async function for each blocking call's name, looked up once.
_submit: dict[str, Any] = {}
# Only these open flags mean anything to libnfs's nfs_open; O_DIRECT and the
# like are dropped for the same reason LocalBacking drops them.
_OPEN_FLAGS = os.O_ACCMODE | os.O_TRUNC | os.O_SYNC
_URL_FORM = "nfs://SERVER[:PORT]/EXPORT[/subdir][?version=3|4]"


class _Context:
    """One libnfs context (one TCP connection); `gen` counts its remounts."""

    def __init__(self, ident: int) -> None:
        self.ident = ident
        self.ptr: int | None = None
        self.gen = 0
        self.broken = True
        self.started = 0.0  # when the current checkout began
        self.change: ChangeReader | None = None  # NFSv4: GETATTRs of the change attribute, on a connection of their own
        self.msg = ""  # the last call's error text, from its answer
        self.poller = select.poll()  # watches `polled`, the connection's socket (see NfsBacking._service)
        self.polled = -1

    def error(self) -> str:
        if self.msg:
            return self.msg
        msg = _nfs().nfs_get_error(self.ptr) if self.ptr else None
        return msg.decode(errors="replace") if msg else "no error text"


class NfsHandle:
    """An open NFS file, usable from any thread (see the module docstring)."""

    def __init__(self, path: str, flags: int, fileid: int) -> None:
        self.path = path
        self.flags = flags
        self.fileid = fileid
        self.on: dict[int, int] = {}  # context ident -> that context's gen when this handle took a reference there
        self.lock = threading.Lock()
        self.unlink_on_close = False
        self.closed = False


class _Open:
    """One libnfs open of one file on one context, shared by every NfsHandle of that file there."""

    def __init__(self, gen: int, ptr: int, writable: bool) -> None:
        self.gen, self.ptr, self.writable, self.refs = gen, ptr, writable, 0


class NfsBacking:
    """The tree of an NFS export, spoken to over `connections` libnfs contexts."""

    def __init__(
        self,
        server: str,
        export: str,
        *,
        port: int | None = None,
        version: int = 3,
        mount_port: int | None = None,
        subdir: str = "",
        connections: int = _DEFAULT_CONNECTIONS,
        timeout: float = _DEFAULT_TIMEOUT,
    ) -> None:
        self.server = server
        self.export = export
        self.port = port
        self.version = version
        self.mount_port = mount_port
        self.timeout = timeout
        self._prefix = "/" + subdir.strip("/") if subdir.strip("/") else ""
        where = f"{server}:{port}" if port else server
        self.description = f"nfs://{where}{export}{self._prefix}"
        self._connections = max(1, connections)  # the general pool, without the SETATTR one
        self._contexts = [_Context(i) for i in range(self._connections)]
        # NFSv4 only: path SETATTRs (chmod, chown, utimens, truncate) get a
        # connection of their own. libnfs 4.0 does them as OPEN, SETATTR,
        # CLOSE, and that CLOSE also ends the open state of any handle to the
        # same file on the same connection: later reads and writes through
        # it fail (BAD_STATEID, BAD_SEQID). This connection never keeps a file open.
        self._setattr_ctx = _Context(len(self._contexts)) if version == 4 else None
        if self._setattr_ctx is not None:
            self._contexts.append(self._setattr_ctx)
        self._free = list(self._contexts)
        self._cond = threading.Condition()
        self._lock = threading.Lock()  # the open-file registry and _down_since
        self._open: dict[str, set[NfsHandle]] = {}
        # (context ident, fileid) -> the file's one open on that context. Only
        # the thread holding a context touches its entries: no lock needed.
        self._opens: dict[tuple[int, int], _Open] = {}
        self._down_since: float | None = None  # when the server was first seen failing
        self._shut = False
        self.cancelled_requests = 0  # requests still queued on connections when they were freed
        self._silly = itertools.count()
        # NFSv4: read the change attribute in fstat (off when the server does not give it).
        self.read_change = version == 4
        self._executor = concurrent.futures.ThreadPoolExecutor(max(1, connections - 1), thread_name_prefix="fusecache-nfs")

    # ---- construction from a URL -------------------------------------------------

    @classmethod
    def from_url(cls, url: str, *, connections: int = _DEFAULT_CONNECTIONS, timeout: float = _DEFAULT_TIMEOUT) -> NfsBacking:
        """Parse `nfs://SERVER[:PORT]/EXPORT[/subdir][?version=3|4]` and mount the export once to check it.

        Query parameters besides `version`: `mountport=N` (NFSv3: the MOUNT
        port, skipping the portmapper), `timeout=SECONDS`, `connections=N`.
        An export of several components is found by trying the longest
        prefix of the path first; what is left over is the subdirectory.
        """
        try:
            parts = urllib.parse.urlsplit(url)
            query = urllib.parse.parse_qs(parts.query, strict_parsing=bool(parts.query))
            port = parts.port
        except ValueError as e:
            raise QuietError(f"bad NFS URL {url} ({e}): write it as {_URL_FORM}")
        if parts.scheme != "nfs" or not parts.hostname or parts.fragment or parts.username:
            raise QuietError(f"bad NFS URL {url}: write it as {_URL_FORM}")
        path = posixpath.normpath(urllib.parse.unquote(parts.path)) if parts.path else ""
        if not path.startswith("/") or path == "/" or path.startswith("//"):
            raise QuietError(f"bad NFS URL {url}: it names no export; write it as {_URL_FORM}")

        def one(name: str, allowed: tuple[str, ...] | None = None) -> str | None:
            values = query.pop(name, [])
            if len(values) > 1 or (values and allowed and values[0] not in allowed):
                raise QuietError(f"bad NFS URL {url}: bad {name}={values}; write it as {_URL_FORM}")
            return values[0] if values else None

        version = int(one("version", ("3", "4")) or 3)
        try:
            mount_port = int(one("mountport") or 0) or None
            timeout = float(one("timeout") or timeout)
            connections = int(one("connections") or connections)
        except ValueError:
            raise QuietError(f"bad NFS URL {url}: mountport, timeout and connections take numbers")
        if query:
            raise QuietError(f"bad NFS URL {url}: unknown option {', '.join(sorted(query))}; write it as {_URL_FORM}")
        if timeout <= 0 or connections < 1:
            raise QuietError(f"bad NFS URL {url}: timeout and connections must be positive")

        components = path.strip("/").split("/")
        errors: list[_MountError] = []
        # The server knows where the export ends; we don't: try /a/b/c, /a/b, /a.
        for n in range(len(components), 0, -1):
            backing = cls(
                parts.hostname, "/" + "/".join(components[:n]), port=port, version=version, mount_port=mount_port,
                subdir="/".join(components[n:]), connections=connections, timeout=timeout,
            )  # fmt: skip
            try:
                backing._check_mount()
                return backing
            except _MountError as e:
                backing.shutdown()
                errors.append(e)
                if e.mounted or e.err not in (errno.ENOENT, errno.EACCES, errno.EPERM):
                    break  # the export or the server is the answer: shorter paths won't help
        # The last error is the most telling: an export that mounted but lacks
        # the subdirectory, else the shortest path the server refused.
        where = f"{parts.hostname}:{port}" if port else parts.hostname
        raise _quiet_mount_error(where, version, errors[-1])

    def _check_mount(self) -> None:
        # Without the automatic mount, whose failure would be a plain EIO.
        ctx = self._acquire(self._contexts[0], mount=False)
        try:
            self._mount(ctx)
            # The mount checked the export; the root must also be there and be a directory.
            st = _Stat64()
            rc = self._run(ctx, "nfs_lstat64", self._p("").encode(), st)
            if rc < 0:
                raise _MountError(self.export + self._prefix, -rc, ctx.error(), mounted=True)
            if not stat.S_ISDIR(st.mode):
                raise _MountError(self.export + self._prefix, errno.ENOTDIR, "not a directory", mounted=True)
        finally:
            self._release(ctx)

    # ---- the context pool ----------------------------------------------------------

    def _libnfs_url(self) -> bytes:
        args = {"version": str(self.version)}
        if self.port:
            args["nfsport"] = str(self.port)
        if self.mount_port:
            args["mountport"] = str(self.mount_port)
        server = f"[{self.server}]" if ":" in self.server else self.server
        return f"nfs://{server}{urllib.parse.quote(self.export)}?{urllib.parse.urlencode(args)}".encode()

    def _mount(self, ctx: _Context) -> None:
        """(Re)create ctx's connection and mount; raises _MountError."""
        lib = _nfs()
        if ctx.change is not None:
            ctx.change.close()  # the server may have restarted: a fresh connection for it too
        if ctx.ptr:
            # Handles opened on the old connection are dropped with it (gen changes).
            self._retire(ctx)
        ptr = lib.nfs_init_context()
        if not ptr:
            raise _MountError(self.export, errno.ENOMEM, "nfs_init_context failed")
        ctx.ptr = ptr
        lib.nfs_set_timeout(ptr, int(self.timeout * 1000))
        # Other hosts change the export: a per-connection directory cache
        # would serve their old listings (and differ between our connections).
        lib.nfs_set_dircache(ptr, 0)
        # NFSv4 identifies a client by name: contexts sharing libnfs's default
        # name (hostname-based) would keep cancelling each other's client ID.
        lib.nfs4_set_client_name(ptr, f"fusecache.{socket.gethostname()}.{os.getpid()}.{id(self):x}.{ctx.ident}.{ctx.gen}".encode())
        url = lib.nfs_parse_url_dir(ptr, self._libnfs_url())
        if not url:
            raise _MountError(self.export, errno.EINVAL, ctx.error())
        try:
            rc = self._run(ctx, "nfs_mount", url.contents.server, url.contents.path)
        finally:
            lib.nfs_destroy_url(url)
        if rc < 0:
            raise _MountError(self.export, -rc, ctx.error())
        for key in [k for k in self._opens if k[0] == ctx.ident]:
            del self._opens[key]  # they died with the old connection
        ctx.gen += 1
        ctx.broken = False

    def _retire(self, ctx: _Context) -> None:
        """Free ctx's libnfs context. What is still queued on it is cancelled, answering to nobody (see _run)."""
        ptr, ctx.ptr = ctx.ptr, None
        ctx.poller, ctx.polled = select.poll(), -1  # its socket's number will be reused
        queued = _nfs_held().nfs_queue_length(ptr)
        if queued > 0:
            with self._lock:
                self.cancelled_requests += queued
            log.debug("freeing NFS connection %d to %s with %d request(s) still queued", ctx.ident, self.description, queued)
        _nfs().nfs_destroy_context(ptr)

    def _acquire(self, want: _Context | None = None, mount: bool = True) -> _Context:
        """Check out `want`, or any general context; (re)mount it first if it is broken and `mount`."""
        with self._cond:
            while (ctx := self._pick(want)) is None:
                self._cond.wait()
            if self._shut and mount:
                raise OSError(errno.EIO, f"{self.description} is shut down")
            self._free.remove(ctx)
        ctx.started = time.monotonic()
        if ctx.broken and mount:
            try:
                self._mount(ctx)
            except _MountError as e:
                self._release(ctx)
                self._failed(e.err, e.msg, "mount", self.export)
                raise OSError(errno.EIO, f"NFS server {self.server} unavailable: {e.msg}")
        return ctx

    def _pick(self, want: _Context | None) -> _Context | None:
        if want is not None:
            return want if want in self._free else None
        # Most recently used first: its handles are likely open already.
        return next((c for c in reversed(self._free) if c is not self._setattr_ctx), None)

    def _release(self, ctx: _Context) -> None:
        with self._cond:
            self._free.append(ctx)
            self._cond.notify_all()

    def _failed(self, err: int, msg: str, op: str, path: str) -> None:
        with self._lock:
            if self._down_since is not None:
                return
            self._down_since = time.monotonic()
        log.error("NFS server %s not responding (%s %s: %s): calls fail with EIO until it is back", self.description, op, path or "/", msg)

    def _ok(self, ctx: _Context) -> None:
        # Only a call that started after the failure proves the server back:
        # one already in flight may still complete and must not flap the state.
        if self._down_since is not None:
            with self._lock:
                back = self._down_since is not None and ctx.started > self._down_since
                if back:
                    self._down_since = None
            if back:
                log.warning("NFS server %s is back", self.description)

    def _check(self, ctx: _Context, rc: int, op: str, path: str) -> int:
        """Turn a libnfs return code into a result or an OSError; note transport failures."""
        if rc >= 0:
            self._ok(ctx)
            return rc
        err = -rc
        msg = ctx.error()
        if err in _TRANSPORT_ERRNOS:
            ctx.broken = True
            self._failed(err, msg, op, path)
            raise OSError(errno.EIO, f"NFS {op} failed: {msg}", path)
        log.debug("NFS %s %s: %s", op, path, msg)
        raise OSError(err, os.strerror(err), path)

    def _run(self, ctx: _Context, fn: str, *args: Any) -> int:
        """Make libnfs call `fn` on ctx and wait for its answer; its return code (-errno on failure).

        `fn` names libnfs's blocking call, and `args` are its arguments, but
        the call is made through its _async form (libnfs.py says why): a
        result the blocking call would write through its last argument is
        written into that argument (a struct, a c_void_p, a buffer, a list)
        from the answer. A connection that fails or stalls for `timeout`
        gives -ETIMEDOUT and marks ctx broken; what is still queued on it
        answers to nobody.
        """
        keep = _RESULTS.get(fn)
        into = keep(args[-1]) if keep is not None else None
        if keep is not None:
            args = args[:-1]
        ctx.msg = ""
        reply = Reply(into)
        token = next(_tokens)
        _replies[token] = reply
        try:
            submit = _submit.get(fn)
            if submit is None:  # a mount may resolve a name: it gives up the GIL
                submit = _submit[fn] = getattr(_nfs() if fn == "nfs_mount" else _nfs_held(), fn + "_async")
            if submit(ctx.ptr, *args, _on_reply, token) < 0:
                rc = -errno.EIO
            elif not self._service(ctx, lambda: reply.done):
                rc = -errno.ETIMEDOUT
            else:
                rc = reply.status
                ctx.msg = reply.msg
        finally:
            del _replies[token]
        if rc < 0 and self.version == 4 and fn in _V4_SEQID_CALLS:
            # The server counts a failed OPEN or CLOSE in the open-owner's
            # sequence, libnfs 4.0 does not: its next OPEN on this connection
            # would repeat a sequence id, and the server would answer it with
            # its cached reply to the failed one. Only a new connection resyncs.
            ctx.broken = True
        return rc

    def _call(self, op: str, path: str, fn: str, *args: Any, on: _Context | None = None) -> int:
        """Run one path-based libnfs call on a pooled context (or on `on`)."""
        ctx = self._acquire(on)
        try:
            return self._check(ctx, self._run(ctx, fn, self._p(path).encode(), *args), op, path)
        finally:
            self._release(ctx)

    def _p(self, path: str) -> str:
        return f"{self._prefix}/{path}" if path else (self._prefix or "/")

    # ---- attributes and directories --------------------------------------------------

    def lstat(self, path: str) -> Attr:
        st = _Stat64()
        self._call("lstat", path, "nfs_lstat64", st)
        return _attr(st)

    def listdir(self, path: str) -> list[str]:
        lib = _nfs()
        ctx = self._acquire()
        try:
            d = ctypes.c_void_p()
            self._check(ctx, self._run(ctx, "nfs_opendir", self._p(path).encode(), d), "opendir", path)
            names = []
            try:
                while ent := lib.nfs_readdir(ctx.ptr, d):
                    name = os.fsdecode(ent.contents.name)
                    if name not in (".", ".."):
                        names.append(name)
            finally:
                lib.nfs_closedir(ctx.ptr, d)
            return sorted(names)
        finally:
            self._release(ctx)

    def statfs(self) -> StatFs:
        s = _StatVfs64()
        self._call("statfs", "", "nfs_statvfs64", s)
        return StatFs(s.bsize, s.frsize, s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.favail, s.namemax)

    # ---- open files ----------------------------------------------------------------

    def open(self, path: str, flags: int) -> NfsHandle:
        ctx = self._acquire()
        try:
            # The fileid first: if the file is open on this context already,
            # that open is shared (a second one would break NFSv4, see _ref).
            st = _Stat64()
            self._check(ctx, self._run(ctx, "nfs_stat64", self._p(path).encode(), st), "open", path)
            if stat.S_ISDIR(st.mode) and flags & os.O_ACCMODE != os.O_RDONLY:
                raise OSError(errno.EISDIR, os.strerror(errno.EISDIR), path)
            handle = NfsHandle(path, flags, st.ino)
            ptr = self._ref(ctx, handle, path)
            if flags & os.O_TRUNC:
                try:
                    self._check(ctx, self._run(ctx, "nfs_ftruncate", ptr, 0), "truncate", path)
                except OSError:
                    self._unref(ctx, handle.fileid)
                    raise
            handle.on[ctx.ident] = ctx.gen
        finally:
            self._release(ctx)
        return self._registered(handle)

    def create(self, path: str, flags: int, mode: int) -> NfsHandle:
        # Always create exclusively, so we know whether the file is new: only
        # a new file takes `mode`, as with open(2). (libnfs's NFSv4 create is
        # exclusive whatever the flags, and fails on an existing file.)
        ctx = self._acquire()
        try:
            out = ctypes.c_void_p()
            access = flags & os.O_ACCMODE
            rc = self._run(ctx, "nfs_create", self._p(path).encode(), access | os.O_EXCL, stat.S_IMODE(mode), out)
            if rc == -errno.EEXIST and not flags & os.O_EXCL:
                existing = True
            else:
                existing = False
                self._check(ctx, rc, "create", path)
                st = _Stat64()
                rc = self._run(ctx, "nfs_fstat64", out, st)
                if rc < 0:
                    self._run(ctx, "nfs_close", out)
                    self._check(ctx, rc, "fstat", path)
                handle = NfsHandle(path, flags, st.ino)
                # A new file: no open of it can exist here (a stale entry is from a deleted file's reused fileid).
                self._opens[(ctx.ident, st.ino)] = opened = _Open(ctx.gen, out.value or 0, access != os.O_RDONLY)
                opened.refs = 1
                handle.on[ctx.ident] = ctx.gen
        finally:
            self._release(ctx)
        if existing:
            return self.open(path, flags)
        self._registered(handle)
        if self.version == 4:
            # An NFSv4 exclusive create parks its verifier in the new file's
            # atime and mtime until a SETATTR replaces them (RFC 7530 16.16.5),
            # and libnfs sends none: set mode and times as a create would.
            if stat.S_IMODE(self.fstat(handle).mode) != stat.S_IMODE(mode):
                self._fcall("chmod", handle, "nfs_fchmod", stat.S_IMODE(mode))
            now = time.time_ns()
            self.utimens(path, now, now)
        return handle

    def _registered(self, handle: NfsHandle) -> NfsHandle:
        with self._lock:
            self._open.setdefault(handle.path, set()).add(handle)
        return handle

    def _ref(self, ctx: _Context, fh: NfsHandle, path: str) -> int:
        """A reference to fh's file's open on ctx (opening it there if needed); the libnfs nfsfh.

        One open per file per context, whatever the number of handles: with
        NFSv4 all opens of a file by one client share one server state, and
        libnfs 4.0 closes that state at the first CLOSE; the next CLOSE then
        desynchronises its sequence ids and every later OPEN on the connection
        fails with BAD_SEQID. (Harmless for NFSv3, and it saves RPCs there.)
        """
        lib = _nfs()
        writable = fh.flags & os.O_ACCMODE != os.O_RDONLY
        opened = self._opens.get((ctx.ident, fh.fileid))
        if opened is None or (writable and not opened.writable):
            out = ctypes.c_void_p()
            # Never truncate or create here: the file exists, and was opened once already.
            mode = os.O_RDWR if writable else os.O_RDONLY
            self._check(ctx, self._run(ctx, "nfs_open", self._p(path).encode(), mode, out), "open", path)
            st = _Stat64()
            rc = self._run(ctx, "nfs_fstat64", out, st)
            if rc < 0 or st.ino != fh.fileid:
                if opened is None:
                    self._run(ctx, "nfs_close", out)
                else:
                    lib.nfs_free_nfsfh(out)  # a CLOSE would end the shared state too
                self._check(ctx, rc, "fstat", path)
                # Another client removed or replaced the file we had open.
                raise OSError(errno.ESTALE, os.strerror(errno.ESTALE), path)
            if opened is None:
                opened = self._opens[(ctx.ident, fh.fileid)] = _Open(ctx.gen, out.value or 0, writable)
            else:
                # An upgrade to read-write: the server's state now goes by the
                # new open's stateid; the old nfsfh is freed without a CLOSE.
                lib.nfs_free_nfsfh(opened.ptr)
                opened.ptr, opened.writable = out.value or 0, True
        opened.refs += 1
        return opened.ptr

    def _unref(self, ctx: _Context, fileid: int) -> None:
        opened = self._opens.get((ctx.ident, fileid))
        if opened is None or opened.gen != ctx.gen:
            return  # died with a remount
        opened.refs -= 1
        if opened.refs == 0:
            del self._opens[(ctx.ident, fileid)]
            if not ctx.broken:
                self._run(ctx, "nfs_close", opened.ptr)

    def _fh_on(self, ctx: _Context, fh: NfsHandle) -> int:
        """fh's libnfs nfsfh on ctx, taking a reference there first if needed."""
        with fh.lock:
            if fh.closed:
                raise OSError(errno.EBADF, "NFS handle is closed", fh.path)
            gen = fh.on.get(ctx.ident)
            path = fh.path
        if gen == ctx.gen:
            return self._opens[(ctx.ident, fh.fileid)].ptr
        ptr = self._ref(ctx, fh, path)
        with fh.lock:
            late = fh.closed  # closed while we opened: close() has already swept fh.on
            if not late:
                fh.on[ctx.ident] = ctx.gen
        if late:
            self._unref(ctx, fh.fileid)
            raise OSError(errno.EBADF, "NFS handle is closed", fh.path)
        return ptr

    def _fcall(self, op: str, fh: NfsHandle, fn: str, *args: Any) -> int:
        ctx = self._acquire()
        try:
            nfsfh = self._fh_on(ctx, fh)
            return self._check(ctx, self._run(ctx, fn, nfsfh, *args), op, fh.path)
        finally:
            self._release(ctx)

    def fstat(self, fh: NfsHandle) -> Attr:
        st = _Stat64()
        ctx = self._acquire()
        try:
            nfsfh = self._fh_on(ctx, fh)
            self._check(ctx, self._run(ctx, "nfs_fstat64", nfsfh, st), "fstat", fh.path)
            attr = _attr(st)
            return self._with_change(ctx, nfsfh, fh, attr) if self.version == 4 and self.read_change else attr
        finally:
            self._release(ctx)

    def _with_change(self, ctx: _Context, nfsfh: int, fh: NfsHandle, attr: Attr) -> Attr:
        """`attr` with the change attribute, and size and times from the same GETATTR (NFSv4)."""
        if ctx.change is None:
            ctx.change = ChangeReader(self.server, self.port or 2049, self.timeout)
        try:
            got = ctx.change.read(file_handle(nfsfh))
            if got.fileid != fh.fileid:
                raise OSError(errno.EIO, f"GETATTR answered for fileid {got.fileid}, not {fh.fileid}")
        except OSError as e:
            if e.errno == errno.ENOTSUP:
                self.read_change = False
                log.warning("%s: %s; file versions rest on size, mtime and ctime", self.description, e.strerror)
            elif e.errno not in (errno.ESTALE, errno.ENOENT):
                log.warning("%s: reading the change attribute of %s failed (%s): this version of it goes without",
                            self.description, fh.path, e.strerror or e)
            return attr
        return dataclasses.replace(attr, size=got.size, mtime_ns=got.mtime_ns, ctime_ns=got.ctime_ns, change=got.change)

    def pread(self, fh: NfsHandle, offset: int, size: int) -> bytes:
        if size <= 0:
            return b""
        buf = bytearray(size)
        if size <= _SPLIT:
            n = self._pread_into(fh, buf, 0, offset, size)
            return bytes(memoryview(buf)[:n])
        pieces = [(start, min(_SPLIT, size - start)) for start in range(0, size, _SPLIT)]
        futures = [self._executor.submit(self._pread_into, fh, buf, start, offset + start, n) for start, n in pieces[1:]]
        try:
            counts = [self._pread_into(fh, buf, 0, offset, pieces[0][1])]
        finally:
            # Wait for every piece even on failure: they write into buf.
            concurrent.futures.wait(futures)
        counts += [f.result() for f in futures]
        total = 0
        for (_, want), got in zip(pieces, counts, strict=True):
            total += got
            if got < want:  # end of file (or a short read): what follows is not contiguous
                break
        return bytes(memoryview(buf)[:total])

    async def pread_on_loop(self, fh: NfsHandle, offset: int, size: int) -> bytes | None:
        """One READ from the trio loop itself, no worker thread: libnfs's async call, its socket waited for by trio.

        Only where it cannot block: a context that is free and mounted, on which `fh` is open already, and at most
        `_SPLIT` bytes. Returns None otherwise, and on a failure that another connection may not share (an error
        answer, a connection that failed, cancellation): the caller then reads with `pread` in a thread, which
        mounts, opens, reports errors and marks the server down as it always did. A server silent for `timeout`
        is EIO at once, as in a thread (a second try would double the guest's wait). A connection that failed or
        timed out here is marked broken, as `_service` does.
        """
        if not 0 < size <= _SPLIT or self._shut:
            return None
        with self._cond:
            ready = (c for c in reversed(self._free) if c is not self._setattr_ctx and not c.broken and fh.on.get(c.ident) == c.gen)
            ctx = next(ready, None)
            if ctx is None:
                return None
            self._free.remove(ctx)
        ctx.started = time.monotonic()
        token = 0
        done = False
        try:
            opened = self._opens.get((ctx.ident, fh.fileid))
            if opened is None or fh.closed or opened.gen != ctx.gen:
                done = True  # nothing asked: the connection is as it was
                return None
            buf = bytearray(size)
            reply = Reply(_into_buffer((ctypes.c_char * size).from_buffer(buf)))
            token = next(_tokens)
            _replies[token] = reply
            if _nfs_held().nfs_pread_async(ctx.ptr, opened.ptr, offset, size, _on_reply, token) < 0:
                return None
            answered = await self._service_on_loop(ctx, reply)
            if answered is None:
                self._check(ctx, -errno.ETIMEDOUT, "read", fh.path)  # (marks ctx broken, logs the server down, raises EIO)
            if not answered:
                return None
            done = True
            if reply.status < 0:
                if -reply.status in _TRANSPORT_ERRNOS:
                    ctx.broken = True
                return None
            self._ok(ctx)
            return bytes(memoryview(buf)[: reply.status])
        finally:
            if token:
                del _replies[token]
            if not done:
                ctx.broken = True  # a request may still be queued on it: only a new connection is clean
            self._release(ctx)

    async def _service_on_loop(self, ctx: _Context, reply: Reply) -> bool | None:
        """`_service` on the trio loop: wait for ctx's socket with trio, let libnfs read or write, until `reply` is
        done (True); False if the connection failed, None if it stalled for `timeout`. (trio waits on the socket
        only while it is not being serviced: libnfs closes or replaces it only inside nfs_service.)"""
        # nfs_service with the GIL held: on the loop it reads at most one answer of INLINE_MAX bytes, and giving the
        # GIL up there would let a worker or the store's writer take it, the loop then waiting for it back
        lib, ptr = _nfs_held(), ctx.ptr
        service = lib.nfs_service
        with trio.move_on_after(self.timeout):
            while not reply.done:
                fd = lib.nfs_get_fd(ptr)
                if fd < 0:
                    return False
                if lib.nfs_which_events(ptr) & select.POLLOUT:
                    # the request is queued: a socket with room takes it now (libnfs keeps what the socket refuses),
                    # with no trip through trio's scheduler for a wake-up it would give at once; only what it
                    # refused waits for the socket to be writable, then goes round again
                    if service(ptr, select.POLLOUT) < 0:
                        return False
                    if lib.nfs_which_events(ptr) & select.POLLOUT:
                        await trio.lowlevel.wait_writable(fd)
                    continue
                await trio.lowlevel.wait_readable(fd)
                if service(ptr, select.POLLIN) < 0:
                    return False
            return True
        return None

    def _pread_into(self, fh: NfsHandle, buf: bytearray, at: int, offset: int, size: int) -> int:
        target = (ctypes.c_char * size).from_buffer(buf, at)
        return self._fcall("read", fh, "nfs_pread", offset, size, target)

    def pwrite(self, fh: NfsHandle, data: bytes, offset: int) -> int:
        data = bytes(data)
        if not data:
            return 0
        piece = _V4_WRITE_MAX if self.version == 4 else len(data)
        if len(data) <= piece:
            return self._pwrite_range(fh, data, 0, len(data), offset, piece)
        # Many pieces (NFSv4): contiguous runs of them on several connections at once.
        runs = min(self._connections, -(-len(data) // piece))
        run = -(-len(data) // (runs * piece)) * piece
        spans = [(start, min(start + run, len(data))) for start in range(0, len(data), run)]
        futures = [self._executor.submit(self._pwrite_range, fh, data, a, b, offset + a, piece) for a, b in spans[1:]]
        try:
            counts = [self._pwrite_range(fh, data, *spans[0], offset, piece)]
        finally:
            concurrent.futures.wait(futures)
        counts += [f.result() for f in futures]
        total = 0
        for (a, b), got in zip(spans, counts, strict=True):
            total += got
            if got < b - a:  # a short write: what follows is not contiguous
                break
        return total

    def _pwrite_range(self, fh: NfsHandle, data: bytes, start: int, end: int, offset: int, piece: int) -> int:
        """Write data[start:end] at offset, `piece` bytes per WRITE, on one connection; bytes written.

        Several pieces are sent at once (libnfs's async API): one at a time,
        NFSv4's small pieces would cost a round trip each.
        """
        ctx = self._acquire()
        try:
            nfsfh = self._fh_on(ctx, fh)
            base = ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value or 0  # data's own buffer, no copy
            if end - start <= piece:
                return self._check(ctx, self._run(ctx, "nfs_pwrite", nfsfh, offset, end - start, base + start), "write", fh.path)
            pieces = [(at, min(piece, end - at)) for at in range(start, end, piece)]
            replies: dict[int, Reply] = {}
            try:
                for at, n in pieces:
                    # libnfs encodes the data into its request here: `data` need not outlive the call.
                    token = next(_tokens)
                    _replies[token] = replies[token] = Reply()
                    if _nfs_held().nfs_pwrite_async(ctx.ptr, nfsfh, offset + at - start, n, base + at, _on_reply, token) < 0:
                        self._check(ctx, -errno.EIO, "write", fh.path)
                if not self._service(ctx, lambda: all(r.done for r in replies.values())):
                    self._check(ctx, -errno.ETIMEDOUT, "write", fh.path)
            finally:
                for token in replies:
                    del _replies[token]
            done = 0
            for (_, n), reply in zip(pieces, replies.values(), strict=True):
                ctx.msg = reply.msg
                got = self._check(ctx, reply.status, "write", fh.path)
                done += got
                if got < n:  # a short write: what follows is not contiguous
                    break
            return done
        finally:
            self._release(ctx)

    def _service(self, ctx: _Context, finished: Callable[[], bool]) -> bool:
        """Run ctx's event loop until `finished()`; False (ctx broken) if the connection failed or stalled for `timeout`."""
        lib = _nfs_held()
        service = _nfs().nfs_service  # gives up the GIL: it reads whole answers off the socket
        ptr, poller = ctx.ptr, ctx.poller
        deadline = time.monotonic() + self.timeout
        while not finished():
            fd = lib.nfs_get_fd(ptr)  # changes when libnfs reconnects
            if fd != ctx.polled:
                if ctx.polled >= 0:
                    poller.unregister(ctx.polled)
                ctx.polled = fd
                if fd >= 0:
                    poller.register(fd, lib.nfs_which_events(ptr))
            elif fd >= 0:
                poller.modify(fd, lib.nfs_which_events(ptr))
            ready = poller.poll(100)
            if service(ptr, ready[0][1] if ready else 0) < 0 or (not ready and time.monotonic() > deadline):
                # Requests may still be queued on it: only a new connection is clean.
                ctx.broken = True
                return False
        return True

    def fsync(self, fh: NfsHandle, datasync: bool) -> None:
        # COMMIT is per file on the server: it covers unstable writes sent on any context.
        self._fcall("fsync", fh, "nfs_fsync")

    def ftruncate(self, fh: NfsHandle, size: int) -> None:
        self._fcall("truncate", fh, "nfs_ftruncate", size)

    def close(self, fh: NfsHandle) -> None:
        with fh.lock:
            if fh.closed:
                return
            fh.closed = True
            on = dict(fh.on)
            fh.on.clear()
        for ident, gen in on.items():
            ctx = self._acquire(self._contexts[ident], mount=False)
            try:
                if ctx.gen == gen:  # else its open died with a remount
                    self._unref(ctx, fh.fileid)
            finally:
                self._release(ctx)
        with self._lock:
            holders = self._open.get(fh.path, set())
            holders.discard(fh)
            if holders:
                return
            self._open.pop(fh.path, None)
        if fh.unlink_on_close:
            try:
                self._call("unlink", fh.path, "nfs_unlink")
            except OSError as e:
                log.warning("could not remove %s on %s after its last close: %s", fh.path, self.description, e)

    # ---- metadata by path ------------------------------------------------------------

    def truncate(self, path: str, size: int) -> None:
        self._call("truncate", path, "nfs_truncate", size, on=self._setattr_ctx)

    def chmod(self, path: str, mode: int) -> None:
        self._call("chmod", path, "nfs_chmod", stat.S_IMODE(mode), on=self._setattr_ctx)

    def chown(self, path: str, uid: int, gid: int) -> None:
        self._call("chown", path, "nfs_lchown", uid, gid, on=self._setattr_ctx)

    def utimens(self, path: str, atime_ns: int | None, mtime_ns: int | None) -> None:
        if atime_ns is None or mtime_ns is None:
            a = self.lstat(path)
            atime_ns = a.atime_ns if atime_ns is None else atime_ns
            mtime_ns = a.mtime_ns if mtime_ns is None else mtime_ns
        times = (_TimeVal * 2)(_TimeVal(*divmod(atime_ns // 1000, 1_000_000)), _TimeVal(*divmod(mtime_ns // 1000, 1_000_000)))
        self._call("utimens", path, "nfs_lutimes", times, on=self._setattr_ctx)

    def mkdir(self, path: str, mode: int) -> None:
        self._call("mkdir", path, "nfs_mkdir2", stat.S_IMODE(mode))

    def rmdir(self, path: str) -> None:
        self._call("rmdir", path, "nfs_rmdir")

    def unlink(self, path: str) -> None:
        if not self._silly_rename(path):
            self._call("unlink", path, "nfs_unlink")

    def _silly_rename(self, path: str) -> bool:
        """If `path` is open here, rename it aside to be removed at its last close (as NFS clients do)."""
        with self._lock:
            holders = self._open.get(path)
            if not holders:
                return False
            fileid = next(iter(holders)).fileid
        aside = posixpath.join(posixpath.dirname(path), f".fusecache-nfs-{fileid:x}-{os.getpid()}-{next(self._silly)}")
        self._call("rename", path, "nfs_rename", self._p(aside).encode())
        self._moved(path, aside)
        with self._lock:
            for h in self._open.get(aside, ()):
                h.unlink_on_close = True
        return True

    def _moved(self, old: str, new: str) -> None:
        """Point open handles at their file's new path (and those under a renamed directory)."""
        with self._lock:
            for path in [p for p in self._open if p == old or p.startswith(old + "/")]:
                moved = new + path[len(old) :]
                holders = self._open.pop(path)
                for h in holders:
                    with h.lock:
                        h.path = moved
                self._open.setdefault(moved, set()).update(holders)

    def rename(self, old: str, new: str, flags: int) -> None:
        if flags & _RENAME_EXCHANGE or flags & ~(_RENAME_NOREPLACE | _RENAME_EXCHANGE):
            raise OSError(errno.EINVAL, "NFS has no atomic exchange", old)
        if flags & _RENAME_NOREPLACE:
            # NFS rename always replaces; this check and the rename are not atomic.
            try:
                self.lstat(new)
            except FileNotFoundError:
                pass
            else:
                raise OSError(errno.EEXIST, os.strerror(errno.EEXIST), new)
        if new != old:
            self._silly_rename(new)
        self._call("rename", old, "nfs_rename", self._p(new).encode())
        self._moved(old, new)

    def symlink(self, target: str, path: str) -> None:
        ctx = self._acquire()
        try:
            # nfs_symlink(target, linkpath): the target is stored verbatim, never prefixed.
            self._check(ctx, self._run(ctx, "nfs_symlink", os.fsencode(target), self._p(path).encode()), "symlink", path)
        finally:
            self._release(ctx)

    def readlink(self, path: str) -> str:
        out: list[bytes] = []
        ctx = self._acquire()
        try:
            self._check(ctx, self._run(ctx, "nfs_readlink", self._p(path).encode(), out), "readlink", path)
        finally:
            self._release(ctx)
        return os.fsdecode(out[0] if out else b"")

    def link(self, existing: str, new: str) -> None:
        self._call("link", existing, "nfs_link", self._p(new).encode())

    def mknod(self, path: str, mode: int, rdev: int) -> None:
        self._call("mknod", path, "nfs_mknod", mode, rdev)

    # ---- extended attributes: not in NFSv3, and libnfs has none for v4 ----------------

    def getxattr(self, path: str, name: str) -> bytes:
        raise OSError(errno.ENOTSUP, "NFS export has no extended attributes", path)

    def setxattr(self, path: str, name: str, value: bytes, flags: int) -> None:
        raise OSError(errno.ENOTSUP, "NFS export has no extended attributes", path)

    def listxattr(self, path: str) -> list[str]:
        return []

    def removexattr(self, path: str, name: str) -> None:
        raise OSError(errno.ENOTSUP, "NFS export has no extended attributes", path)

    def shutdown(self) -> None:
        """Close every connection (waiting for calls in progress). Open handles die with them; later calls fail with EIO."""
        with self._cond:
            if self._shut:
                return
            self._shut = True
        self._executor.shutdown(wait=True)
        for ctx in self._contexts:
            ctx = self._acquire(ctx, mount=False)
            if ctx.ptr:
                self._retire(ctx)
            if ctx.change is not None:
                ctx.change.close()
            ctx.broken = True


class _MountError(Exception):
    """A failed mount of `export`; `mounted`: the export mounted, the path in it is what failed."""

    def __init__(self, export: str, err: int, msg: str, mounted: bool = False) -> None:
        super().__init__(msg)
        self.export, self.err, self.msg, self.mounted = export, err, msg, mounted


def _quiet_mount_error(where: str, version: int, e: _MountError) -> QuietError:
    text = e.msg.lower()
    if "resolv" in text or "invalid address" in text:
        return QuietError(f"cannot resolve NFS server {where.rsplit(':', 1)[0]}: check the name in the nfs:// URL")
    if e.mounted:
        what = "is not a directory" if e.err == errno.ENOTDIR else f"cannot be opened ({os.strerror(e.err)})"
        return QuietError(f"nfs://{where}{e.export} {what}: give the directory in the export that holds the images")
    if e.err in (errno.EACCES, errno.EPERM):
        # NFSv3 servers (ganesha among them) answer MNT3ERR_ACCES for unknown exports too.
        return QuietError(
            f"NFS server {where} refused to let this host mount {e.export} ({e.msg}): "
            "check that the export exists and that its access list allows this client"
        )
    if e.err == errno.ENOENT:
        return QuietError(f"NFS server {where} has no export {e.export} ({e.msg}): check the path against the server's exports")
    return QuietError(f"NFS server {where} is not reachable over NFSv{version} ({e.msg}): check the address and that the server is running")


__all__ = ["NfsBacking", "NfsHandle"]
