"""A backing that is a local directory: in production, a kernel NFS mount of the export.

Plain os calls on paths under the root. Every call may block (the directory is
usually on NFS), so the FUSE layer runs them in worker threads. Files are
opened without O_DIRECT whatever the guest asked for: the cache and the
kernel NFS client do their own alignment, and O_DIRECT on the backing would
make every unaligned read fail with EINVAL.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat

from fusecache.backing import Attr, StatFs
from fusecache.errors import QuietError

_libc = ctypes.CDLL(None, use_errno=True)
_AT_FDCWD = -100
_DROP_FLAGS = getattr(os, "O_DIRECT", 0) | os.O_NOCTTY
_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 0)
# the filesystem (or kernel) cannot read without waiting: NFS, FUSE, ... (no FMODE_NOWAIT), or no preadv2
_NOWAIT_UNSUPPORTED = frozenset({errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL})


class LocalBacking:
    """The tree under `root`, which must be a directory."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.description = root
        self.nowait = bool(_RWF_NOWAIT)  # pread_cached may answer: off for good once the filesystem says it cannot

    @classmethod
    def from_path(cls, spec: str) -> LocalBacking:
        root = os.path.abspath(spec)
        if not os.path.exists(root):
            raise QuietError(f"backing directory {spec} does not exist: give the image directory (an NFS mount) or an nfs:// URL")
        if not os.path.isdir(root):
            raise QuietError(f"backing {spec} is not a directory: give the image directory (an NFS mount) or an nfs:// URL")
        if not os.access(root, os.R_OK | os.X_OK):
            raise QuietError(f"backing directory {spec} is not readable by this user: run as root or fix its permissions")
        return cls(root)

    def _p(self, path: str) -> str:
        return os.path.join(self.root, path) if path else self.root

    # attributes and directories
    def lstat(self, path: str) -> Attr:
        return Attr.from_stat(os.lstat(self._p(path)))

    def listdir(self, path: str) -> list[str]:
        return sorted(os.listdir(self._p(path)))

    def statfs(self) -> StatFs:
        s = os.statvfs(self.root)
        return StatFs(s.f_bsize, s.f_frsize, s.f_blocks, s.f_bfree, s.f_bavail, s.f_files, s.f_ffree, s.f_favail, s.f_namemax)

    # open files: the handle is the file descriptor
    def open(self, path: str, flags: int) -> int:
        return os.open(self._p(path), (flags & ~_DROP_FLAGS) | os.O_CLOEXEC)

    def create(self, path: str, flags: int, mode: int) -> int:
        return os.open(self._p(path), (flags & ~_DROP_FLAGS) | os.O_CREAT | os.O_CLOEXEC, mode)

    def fstat(self, fh: int) -> Attr:
        return Attr.from_stat(os.fstat(fh))

    def pread(self, fh: int, offset: int, size: int) -> bytes:
        return os.pread(fh, size, offset)

    def pread_cached(self, fh: int, offset: int, size: int) -> bytes | None:
        """What the host page cache holds of bytes [offset, offset + size), without waiting: safe on the loop.

        One `preadv2(RWF_NOWAIT)`: the bytes from `offset` on that are in the page cache (fewer than `size` when the
        rest is not, or at end of file; b"" when none is), or None when this read cannot tell (the file is not in
        the page cache at `offset`, a read error: the caller reads in a worker thread, which reports the error).
        A filesystem that cannot read without waiting (NFS, FUSE: EOPNOTSUPP) turns this off for the backing.
        """
        if not self.nowait:
            return None
        buf = bytearray(size)
        try:
            n = os.preadv(fh, [buf], offset, _RWF_NOWAIT)
        except OSError as exc:
            if exc.errno in _NOWAIT_UNSUPPORTED:
                self.nowait = False
            return None
        return bytes(buf) if n == size else bytes(memoryview(buf)[:n])

    def pwrite(self, fh: int, data: bytes, offset: int) -> int:
        return os.pwrite(fh, data, offset)

    def fsync(self, fh: int, datasync: bool) -> None:
        (os.fdatasync if datasync else os.fsync)(fh)

    def ftruncate(self, fh: int, size: int) -> None:
        os.ftruncate(fh, size)

    def close(self, fh: int) -> None:
        os.close(fh)

    # metadata by path
    def truncate(self, path: str, size: int) -> None:
        os.truncate(self._p(path), size)

    def chmod(self, path: str, mode: int) -> None:
        os.chmod(self._p(path), stat.S_IMODE(mode))

    def chown(self, path: str, uid: int, gid: int) -> None:
        os.chown(self._p(path), uid, gid, follow_symlinks=False)

    def utimens(self, path: str, atime_ns: int | None, mtime_ns: int | None) -> None:
        p = self._p(path)
        if atime_ns is None or mtime_ns is None:
            st = os.lstat(p)
            atime_ns = st.st_atime_ns if atime_ns is None else atime_ns
            mtime_ns = st.st_mtime_ns if mtime_ns is None else mtime_ns
        os.utime(p, ns=(atime_ns, mtime_ns), follow_symlinks=False)

    def mkdir(self, path: str, mode: int) -> None:
        os.mkdir(self._p(path), mode)

    def rmdir(self, path: str) -> None:
        os.rmdir(self._p(path))

    def unlink(self, path: str) -> None:
        os.unlink(self._p(path))

    def rename(self, old: str, new: str, flags: int) -> None:
        if not flags:
            os.rename(self._p(old), self._p(new))
            return
        # RENAME_NOREPLACE / RENAME_EXCHANGE need renameat2, which os does not wrap.
        rc = _libc.renameat2(_AT_FDCWD, os.fsencode(self._p(old)), _AT_FDCWD, os.fsencode(self._p(new)), ctypes.c_uint(flags))
        if rc != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e), old)

    def symlink(self, target: str, path: str) -> None:
        os.symlink(target, self._p(path))

    def readlink(self, path: str) -> str:
        return os.readlink(self._p(path))

    def link(self, existing: str, new: str) -> None:
        os.link(self._p(existing), self._p(new), follow_symlinks=False)

    def mknod(self, path: str, mode: int, rdev: int) -> None:
        os.mknod(self._p(path), mode, rdev)

    # extended attributes (libvirt's DAC/SELinux labels live here)
    def getxattr(self, path: str, name: str) -> bytes:
        return os.getxattr(self._p(path), name, follow_symlinks=False)

    def setxattr(self, path: str, name: str, value: bytes, flags: int) -> None:
        os.setxattr(self._p(path), name, value, flags, follow_symlinks=False)

    def listxattr(self, path: str) -> list[str]:
        return os.listxattr(self._p(path), follow_symlinks=False)

    def removexattr(self, path: str, name: str) -> None:
        os.removexattr(self._p(path), name, follow_symlinks=False)

    def shutdown(self) -> None:
        pass


__all__ = ["LocalBacking"]
