"""The FUSE layer: a pyfuse3 `Operations` that is a protocol adapter only.

It turns kernel requests into calls on the backing tree (through `OffLoop`,
so no backing call runs on the trio thread) and on the data path (the cache,
or plain passthrough), and OSError into errno. It decides nothing about
caching. Built from injected objects, so tests can call it without mounting.

Errors: a backing failure is logged here, once, with the path it concerns;
expected ones (ENOENT on lookup, EEXIST, ENOTEMPTY, a missing xattr...) only
at debug level.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import stat
from collections.abc import Iterator
from typing import Any, Protocol

import pyfuse3

from fusecache.attrs import RecentAttrs
from fusecache.backing import Attr, OffLoop
from fusecache.inodes import InodeTable, OpenFile
from fusecache.stats import AttrStats

log = logging.getLogger(__name__)

# errno values that are answers, not failures: not worth a warning
_EXPECTED = frozenset(
    {errno.ENOENT, errno.EEXIST, errno.ENOTEMPTY, errno.ENODATA, errno.ENOTDIR, errno.EISDIR, errno.EXDEV,
     errno.ERANGE, errno.ENOTSUP, errno.EACCES, errno.EPERM, errno.ENAMETOOLONG, errno.EINVAL, errno.ELOOP}
)
# flags the backing must never see: O_DIRECT (QEMU cache=none) would make unaligned
# backing reads fail; O_APPEND would make pwrite ignore the kernel's offset.
_O_DIRECT = getattr(os, "O_DIRECT", 0)
_STRIP = _O_DIRECT | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_NOCTTY


class DataPath(Protocol):
    """Where file contents come from and go to: `cache.Cache` or `cache.Passthrough`."""

    async def read(self, f: OpenFile, offset: int, size: int) -> bytes | memoryview: ...
    async def write(self, f: OpenFile, offset: int, data: bytes) -> int: ...
    async def opened(self, f: OpenFile) -> None: ...
    def closed(self, f: OpenFile) -> None: ...
    def resized(self, ino: int, size: int) -> None: ...
    def unlinked(self, ino: int) -> None: ...
    def attributes_seen(self, attr: Attr) -> None: ...


def fuse_error(exc: OSError, what: str) -> pyfuse3.FUSEError:
    """The FUSEError for `exc`, logged with `what` (a path) unless it is an expected answer."""
    code = exc.errno or errno.EIO
    if code in _EXPECTED:
        log.debug("%s: %s", what, os.strerror(code))
    else:
        log.warning("%s: %s", what, os.strerror(code))
    return pyfuse3.FUSEError(code)


@contextlib.contextmanager
def _errno(what: str) -> Iterator[None]:
    """Turn OSError raised inside into FUSEError (see `fuse_error`)."""
    try:
        yield
    except OSError as exc:
        raise fuse_error(exc, what) from None


class FuseOperations(pyfuse3.Operations):
    """A read-write passthrough of the backing tree, with file data through `data`."""

    enable_writeback_cache = False  # writes must reach the backing before they return

    def __init__(self, backing: OffLoop, data: DataPath, inodes: InodeTable, attr_timeout: float = 1.0) -> None:
        super().__init__()
        self.backing = backing
        self.data = data
        self.inodes = inodes
        self.attr_timeout = attr_timeout
        self.attrs = RecentAttrs()  # GETATTRs of a regular file within a moment share one stat
        self.direct_io_opens = 0
        self._fhs = itertools.count(1)
        self._open: dict[int, OpenFile] = {}
        self._open_by_inode: dict[int, set[OpenFile]] = {}
        self._dirs: dict[int, list[str]] = {}
        self._dir_paths: dict[int, str] = {}
        self._is_root = os.geteuid() == 0

    # ---- helpers -------------------------------------------------------
    def _entry(self, attr: Attr) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = self.inodes.to_fuse(attr.ino)
        e.generation = 0
        e.entry_timeout = self.attr_timeout
        e.attr_timeout = self.attr_timeout
        e.st_mode = attr.mode
        e.st_nlink = attr.nlink
        e.st_uid = attr.uid
        e.st_gid = attr.gid
        e.st_rdev = attr.rdev
        e.st_size = attr.size
        e.st_blksize = 4096
        e.st_blocks = attr.blocks
        e.st_atime_ns = attr.atime_ns
        e.st_mtime_ns = attr.mtime_ns
        e.st_ctime_ns = attr.ctime_ns
        return e

    def _path(self, inode: int) -> str:
        p = self.inodes.path(inode)
        if p is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return p

    def _child(self, parent: int, name: bytes) -> str:
        p = self.inodes.child(parent, name)
        if p is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return p

    def _an_open_file(self, inode: int) -> OpenFile | None:
        files = self._open_by_inode.get(inode)
        return next(iter(files)) if files else None

    async def _new_entry(self, path: str) -> pyfuse3.EntryAttributes:
        """Attributes of a just-created or just-looked-up name; counts one kernel lookup."""
        with _errno(path):
            attr = await self.backing.lstat(path)
        self.inodes.remember(self.inodes.to_fuse(attr.ino), path)
        return self._entry(attr)

    async def _give_to_caller(self, path: str, ctx: pyfuse3.RequestContext) -> None:
        """A daemon running as root creates as root: hand the new object to whoever asked."""
        if not self._is_root or (ctx.uid == 0 and ctx.gid == 0):
            return
        gid = ctx.gid
        parent = path.rpartition("/")[0]
        with _errno(parent or "/"):
            pattr = await self.backing.lstat(parent)
        if pattr.mode & stat.S_ISGID:
            gid = pattr.gid
        with self.attrs.changing(None), _errno(path):  # (a new object's owner: no stat from before it is answered)
            await self.backing.chown(path, ctx.uid, gid)

    # ---- names and attributes -----------------------------------------
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return await self._new_entry(self._child(parent_inode, name))

    async def forget(self, inode_list: Any) -> None:
        for inode, nlookup in inode_list:
            self.inodes.forget(inode, nlookup)
            if self.inodes.path(inode) is None:
                self.attrs.forget(inode)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        path = self.inodes.path(inode)
        if path is not None:
            try:
                # (a regular file stat'ed a moment ago, or being stat'ed now, answers from that stat: attrs.py)
                attr, fresh = await self.attrs.stat(inode, lambda: self.backing.lstat(path))
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise fuse_error(exc, path) from None
            else:
                if self.inodes.to_fuse(attr.ino) == inode:
                    if fresh:
                        # The kernel drops its cached pages when it sees a new mtime here: the data
                        # path must not then refill them with the old version's chunks.
                        self.data.attributes_seen(attr)
                    return self._entry(attr)
        # no name any more (unlinked while open) or the name now holds another file
        f = self._an_open_file(inode)
        if f is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        with _errno(f.path):
            attr = await self.backing.fstat(f.handle)
        self.data.attributes_seen(attr)
        return self._entry(attr)

    async def setattr(
        self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields, fh: int | None, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        f = self._open.get(fh) if fh is not None else None
        path = self.inodes.path(inode)
        what = path if path is not None else (f.path if f else "?")
        with self.attrs.changing(inode), _errno(what):
            if fields.update_size:
                if f is not None:
                    await self.backing.ftruncate(f.handle, attr.st_size)
                else:
                    await self.backing.truncate(self._path(inode), attr.st_size)
                self.data.resized(self.inodes.to_backing(inode), attr.st_size)
            if fields.update_mode:
                await self.backing.chmod(self._path(inode), attr.st_mode)
            if fields.update_uid or fields.update_gid:
                uid = attr.st_uid if fields.update_uid else -1
                gid = attr.st_gid if fields.update_gid else -1
                await self.backing.chown(self._path(inode), uid, gid)
            if fields.update_atime or fields.update_mtime:
                await self.backing.utimens(
                    self._path(inode),
                    attr.st_atime_ns if fields.update_atime else None,
                    attr.st_mtime_ns if fields.update_mtime else None,
                )
        return await self.getattr(inode, ctx)

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        path = self._path(inode)
        with _errno(path):
            return os.fsencode(await self.backing.readlink(path))

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        with _errno(self.backing.description):
            s = await self.backing.statfs()
        d = pyfuse3.StatvfsData()
        d.f_bsize, d.f_frsize, d.f_blocks, d.f_bfree, d.f_bavail = s.bsize, s.frsize, s.blocks, s.bfree, s.bavail
        d.f_files, d.f_ffree, d.f_favail, d.f_namemax = s.files, s.ffree, s.favail, s.namemax
        return d

    # ---- directories -----------------------------------------------------
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        path = self._path(inode)
        with _errno(path):
            names = await self.backing.listdir(path)
        fh = next(self._fhs)
        self._dirs[fh] = names
        self._dir_paths[fh] = path
        return fh

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        names = self._dirs[fh]
        base = self._dir_paths[fh]
        batch = names[start_id : start_id + 256]
        paths = [f"{base}/{n}" if base else n for n in batch]

        def lstat_all() -> list[Attr | None]:
            out: list[Attr | None] = []
            for p in paths:
                try:
                    out.append(self.backing.sync.lstat(p))
                except FileNotFoundError:
                    out.append(None)  # removed since opendir
            return out

        with _errno(base or "/"):
            attrs = await self.backing.run(lstat_all)
        for i, (name, path, attr) in enumerate(zip(batch, paths, attrs, strict=True)):
            if attr is None:
                continue
            if not pyfuse3.readdir_reply(token, os.fsencode(name), self._entry(attr), start_id + i + 1):
                return
            self.inodes.remember(self.inodes.to_fuse(attr.ino), path)
        if start_id + len(batch) < len(names):
            await self.readdir(fh, start_id + len(batch), token)

    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)
        self._dir_paths.pop(fh, None)

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        pass  # the backing's directories are made durable by the backing (NFS commits metadata synchronously)

    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        path = self._child(parent_inode, name)
        with self.attrs.changing(None), _errno(path):
            await self.backing.mkdir(path, mode)
        await self._give_to_caller(path, ctx)
        return await self._new_entry(path)

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        path = self._child(parent_inode, name)
        with self.attrs.changing(None), _errno(path):
            await self.backing.rmdir(path)
        self.inodes.remove_name(path)

    # ---- names -----------------------------------------------------------
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        path = self._child(parent_inode, name)
        with self.attrs.changing(None), _errno(path):
            attr = await self.backing.lstat(path)
            await self.backing.unlink(path)
        self.inodes.remove_name(path)
        if attr.nlink <= 1:
            self.data.unlinked(attr.ino)

    async def rename(
        self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes, flags: int, ctx: pyfuse3.RequestContext
    ) -> None:
        old = self._child(parent_inode_old, name_old)
        new = self._child(parent_inode_new, name_new)

        def stat_then_rename() -> Attr | None:
            try:
                replaced = self.backing.sync.lstat(new)
            except FileNotFoundError:
                replaced = None
            self.backing.sync.rename(old, new, flags)
            return replaced

        with self.attrs.changing(None), _errno(f"{old} -> {new}"):
            replaced = await self.backing.run(stat_then_rename)
        if flags & pyfuse3.RENAME_EXCHANGE:
            self.inodes.exchange(old, new)
            return
        if replaced is not None:
            self.inodes.remove_name(new)
            if replaced.nlink <= 1 and not stat.S_ISDIR(replaced.mode):
                self.data.unlinked(replaced.ino)
        self.inodes.rename(old, new)

    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        path = self._child(parent_inode, name)
        with self.attrs.changing(None), _errno(path):
            await self.backing.symlink(os.fsdecode(target), path)
        await self._give_to_caller(path, ctx)
        return await self._new_entry(path)

    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        existing = self._path(inode)
        path = self._child(new_parent_inode, new_name)
        with self.attrs.changing(None), _errno(path):
            await self.backing.link(existing, path)
        return await self._new_entry(path)

    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        path = self._child(parent_inode, name)
        with self.attrs.changing(None), _errno(path):
            await self.backing.mknod(path, mode, rdev)
        await self._give_to_caller(path, ctx)
        return await self._new_entry(path)

    # ---- extended attributes (libvirt and security modules label images) ----
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        path = self._path(inode)
        with _errno(path):
            return await self.backing.getxattr(path, os.fsdecode(name))

    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        path = self._path(inode)
        with self.attrs.changing(inode), _errno(path):
            await self.backing.setxattr(path, os.fsdecode(name), value, 0)

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        path = self._path(inode)
        with _errno(path):
            return [os.fsencode(n) for n in await self.backing.listxattr(path)]

    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        path = self._path(inode)
        with self.attrs.changing(inode), _errno(path):
            await self.backing.removexattr(path, os.fsdecode(name))

    # ---- open files ------------------------------------------------------
    def _register(self, inode: int, path: str, handle: Any, attr: Attr, flags: int) -> OpenFile:
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        f = OpenFile(next(self._fhs), inode, path, handle, attr, writable)
        self._open[f.fh] = f
        self._open_by_inode.setdefault(inode, set()).add(f)
        return f

    def _with_attr(self, opener: Any, *args: Any) -> tuple[Any, Attr]:
        """In a worker thread: open (or create) a backing file and read its attributes; never leak the handle."""
        h = opener(*args)
        try:
            return h, self.backing.sync.fstat(h)
        except BaseException:
            self.backing.sync.close(h)
            raise

    def _file_info(self, f: OpenFile, flags: int) -> pyfuse3.FileInfo:
        # keep_cache=False: like an NFS client's close-to-open, every open drops the
        # kernel's cached pages, so a file changed on another host is read afresh.
        # direct_io for an O_DIRECT open (QEMU cache=none): its reads bypass the page cache anyway, and
        # the kernel's cached-read path asks for the file's attributes before every read once they have
        # timed out; under queued reads the answers never catch up (a GETATTR for every read, measured:
        # attrs.py), so guests' reads took twice as long. Direct I/O reads ask nothing; fusecache checks
        # the file's version itself every --revalidate seconds (files.py), which is what bounds an
        # O_DIRECT reader's view of another host's change (README).
        direct = bool(flags & _O_DIRECT)
        if direct:
            self.direct_io_opens += 1
        return pyfuse3.FileInfo(fh=f.fh, keep_cache=False, direct_io=direct)

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        path = self._path(inode)
        with self.attrs.changing(inode) if flags & os.O_TRUNC else contextlib.nullcontext(), _errno(path):
            handle, attr = await self.backing.run(self._with_attr, self.backing.sync.open, path, flags & ~_STRIP)
        f = self._register(inode, path, handle, attr, flags)
        if flags & os.O_TRUNC:
            self.data.resized(attr.ino, 0)
        await self.data.opened(f)
        return self._file_info(f, flags)

    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        path = self._child(parent_inode, name)
        flags = (flags & ~_STRIP) | (flags & os.O_EXCL)
        with self.attrs.changing(None), _errno(path):
            handle, attr = await self.backing.run(self._with_attr, self.backing.sync.create, path, flags, mode)
        await self._give_to_caller(path, ctx)
        inode = self.inodes.to_fuse(attr.ino)
        self.inodes.remember(inode, path)
        f = self._register(inode, path, handle, attr, flags)
        self.data.resized(attr.ino, attr.size)  # a new file may reuse a freed inode number
        await self.data.opened(f)
        return self._file_info(f, flags), await self.getattr(inode, ctx)

    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:
        f = self._open[fh]
        try:  # not `with _errno`: a generator context manager costs a hit a measurable share of its time
            return await self.data.read(f, off, size)
        except OSError as exc:
            raise fuse_error(exc, f.path) from None

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        f = self._open[fh]
        with self.attrs.changing(f.inode), _errno(f.path):
            return await self.data.write(f, off, buf)

    async def flush(self, fh: int) -> None:
        pass  # writes are written through before they return: nothing is held back

    async def fsync(self, fh: int, datasync: bool) -> None:
        f = self._open[fh]
        with _errno(f.path):
            await self.backing.fsync(f.handle, datasync)

    async def release(self, fh: int) -> None:
        f = self._open.pop(fh)
        files = self._open_by_inode.get(f.inode)
        if files is not None:
            files.discard(f)
            if not files:
                del self._open_by_inode[f.inode]
        self.data.closed(f)
        with _errno(f.path):
            await self.backing.close(f.handle)

    def open_files(self) -> int:
        return len(self._open)

    def attr_stats(self) -> AttrStats:
        return AttrStats(self.attrs.asked, self.attrs.stats, self.direct_io_opens)
