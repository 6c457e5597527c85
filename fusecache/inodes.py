"""Inode numbers, the backing paths they stand for, and kernel lookup counts.

fusecache hands the kernel the backing file's own inode number (the NFS
fileid), so inode numbers are stable for the life of the mount and the same
on every host mounting the export. The one exception is the root: FUSE
requires it to be ROOT_INODE, so the root's backing number and ROOT_INODE
trade places (`to_fuse` is its own inverse).

An inode can have several names (hard links); the table keeps every name it
has seen. A name is forgotten when it is unlinked or renamed away; an inode is
forgotten when the kernel's lookup count reaches zero. All of this runs on
the trio thread only: no locks.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pyfuse3

from fusecache.backing import Attr


class InodeTable:
    """Maps FUSE inode numbers to backing paths ('' is the root)."""

    def __init__(self, root_backing_ino: int) -> None:
        self._root_backing = root_backing_ino
        self._paths: dict[int, set[str]] = {pyfuse3.ROOT_INODE: {""}}
        self._lookups: dict[int, int] = {}

    def to_fuse(self, backing_ino: int) -> int:
        if backing_ino == self._root_backing:
            return pyfuse3.ROOT_INODE
        if backing_ino == pyfuse3.ROOT_INODE:
            return self._root_backing
        return backing_ino

    to_backing = to_fuse  # the mapping is an involution

    def path(self, inode: int) -> str | None:
        """One current name of `inode`, or None if it has none (unlinked, or forgotten)."""
        names = self._paths.get(inode)
        if not names:
            return None
        return min(names)  # deterministic choice among hard links

    def child(self, parent: int, name: bytes) -> str | None:
        base = self.path(parent)
        if base is None:
            return None
        n = name.decode("utf-8", "surrogateescape")
        return f"{base}/{n}" if base else n

    def remember(self, inode: int, path: str, lookup: bool = True) -> None:
        """Record that `inode` is reachable at `path`; count one kernel lookup if `lookup`."""
        self._paths.setdefault(inode, set()).add(path)
        if lookup:
            self._lookups[inode] = self._lookups.get(inode, 0) + 1

    def forget(self, inode: int, nlookup: int) -> None:
        left = self._lookups.get(inode, 0) - nlookup
        if left > 0:
            self._lookups[inode] = left
            return
        self._lookups.pop(inode, None)
        if inode != pyfuse3.ROOT_INODE:
            self._paths.pop(inode, None)

    def remove_name(self, path: str) -> None:
        """`path` no longer exists (unlink, rmdir, replaced by rename)."""
        for names in self._paths.values():
            if path in names:
                names.discard(path)
                return

    def rename(self, old: str, new: str) -> None:
        """Everything at or below `old` now lives at `new` (a directory moves its subtree)."""
        prefix = old + "/"
        for names in self._paths.values():
            moved = {n for n in names if n == old or n.startswith(prefix)}
            for n in moved:
                names.discard(n)
                names.add(new + n[len(old):])

    def exchange(self, a: str, b: str) -> None:
        """RENAME_EXCHANGE: the subtrees at `a` and `b` trade places."""
        tmp = "\0exchange"
        self.rename(a, tmp)
        self.rename(b, a)
        self.rename(tmp, b)

    def __len__(self) -> int:
        return len(self._paths)


@dataclasses.dataclass(slots=True, eq=False)
class OpenFile:
    """One open of a file through the mount: what read and write need."""

    fh: int
    inode: int
    path: str  # the name it was opened by, for log lines
    handle: Any  # the backing's handle
    attr: Attr  # the backing's attributes at open (identity and version)
    writable: bool

    @property
    def ino(self) -> int:
        """The file's identity in the cache: the backing inode number (NFS fileid)."""
        return self.attr.ino
