"""The FUSE ceiling and floor: a minimal read-only pyfuse3 filesystem serving one file.

Loads SOURCE_FILE into memory and serves it as the only file of MOUNTPOINT,
under the same name. Every handler answers inline (no awaits), and a read is a
zero-copy slice of the loaded bytes: the fastest a single-threaded pyfuse3
daemon can answer, which is what fusecache's hit path is measured against
(MEASURED.md's "pyfuse3, bytes from a dict"). Prints "ready" on stdout once
mounted; unmounts on SIGTERM or SIGINT.

With `--fusecache-loop`, its pyfuse3 waits for requests as the fusecache
daemon's does (`fusecache/fuse_loop.py`: a request already queued is read at
once): the ceiling with the daemon's loop, so the loop's gain is the
distance between the two ceilings.

With `--nfs URL`, SOURCE_FILE is a file of that NFS export instead, and each
read is one blocking libnfs read (`fusecache.backing.nfs.NfsBacking`, the code
the daemon reads NFS with) made inline: the least any pyfuse3 filesystem that
reads NFS adds to an NFS read, one request at a time (bench/nfs_floor.py).

    .venv/bin/python -m bench.memfs [--fusecache-loop] SOURCE_FILE MOUNTPOINT
    .venv/bin/python -m bench.memfs --nfs nfs://HOST/EXPORT?version=3 NAME MOUNTPOINT
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import stat
import sys
from typing import TYPE_CHECKING

import pyfuse3
import trio

if TYPE_CHECKING:
    from fusecache.backing.nfs import NfsBacking

FILE_INODE = 2
TIMEOUT = 3600.0  # nothing ever changes: let the kernel cache names and attributes


class OneFile(pyfuse3.Operations):
    """The root directory with one read-only file of `size` bytes; `read` is the subclass's."""

    def __init__(self, name: bytes, size: int) -> None:
        super().__init__()
        self.name = name
        self.size = size

    def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        if inode == pyfuse3.ROOT_INODE:
            a.st_mode, a.st_nlink, a.st_size = stat.S_IFDIR | 0o555, 2, 0
        else:
            a.st_mode, a.st_nlink, a.st_size = stat.S_IFREG | 0o444, 1, self.size
        a.st_uid, a.st_gid = os.getuid(), os.getgid()
        a.st_blksize = 4096
        a.st_blocks = (a.st_size + 511) // 512
        a.attr_timeout = a.entry_timeout = TIMEOUT
        return a

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        if inode not in (pyfuse3.ROOT_INODE, FILE_INODE):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(inode)

    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if parent_inode != pyfuse3.ROOT_INODE or name != self.name:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(FILE_INODE)

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        if start_id == 0:
            pyfuse3.readdir_reply(token, self.name, self._attr(FILE_INODE), 1)

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if inode != FILE_INODE:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise pyfuse3.FUSEError(errno.EROFS)
        return pyfuse3.FileInfo(fh=FILE_INODE)


class MemoryFile(OneFile):
    """The file's bytes are in memory: a read is a view of them."""

    def __init__(self, name: bytes, data: bytes) -> None:
        super().__init__(name, len(data))
        self.data = memoryview(data)

    async def read(self, fh: int, off: int, size: int) -> memoryview:
        return self.data[off : off + size]


class NfsFile(OneFile):
    """The file is on NFS: a read is one blocking libnfs read, made inline (the loop waits for it)."""

    def __init__(self, name: bytes, backing: NfsBacking) -> None:
        self.backing = backing
        self.handle = backing.open(os.fsdecode(name), os.O_RDONLY)
        super().__init__(name, backing.fstat(self.handle).size)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return self.backing.pread(self.handle, off, size)


async def _serve() -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stop_on_signals)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


async def _stop_on_signals() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            pyfuse3.terminate()
            return


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--nfs", metavar="URL", help="serve SOURCE_FILE of this NFS export, read at each request")
    p.add_argument("--fusecache-loop", action="store_true", help="wait for requests as the fusecache daemon does (fusecache/fuse_loop.py)")
    p.add_argument("source", metavar="SOURCE_FILE")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    args = p.parse_args()
    name = os.fsencode(os.path.basename(args.source))
    backing = None
    if args.nfs:
        from fusecache.backing.nfs import NfsBacking

        backing = NfsBacking.from_url(args.nfs)
        ops: OneFile = NfsFile(name, backing)
    else:
        with open(args.source, "rb") as f:
            data = f.read()  # reading touches every page: no first-touch cost while measuring
        ops = MemoryFile(name, data)
    pyfuse3.init(ops, args.mountpoint, [*pyfuse3.default_options, "fsname=memfs", "subtype=memfs", "ro"])
    if args.fusecache_loop:
        from fusecache import fuse_loop

        fuse_loop.install()
    try:
        print("ready", flush=True)
        trio.run(_serve)
    finally:
        pyfuse3.close(unmount=True)
        if backing is not None:
            backing.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
