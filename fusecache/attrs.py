"""A regular file's attributes as a backing stat gave them a moment ago: the kernel's GETATTR storms cost one stat.

With reads queued, the kernel's cached-I/O read path asks for a file's
attributes before nearly every read once they have timed out (7,404
GETATTRs for 8,547 O_DIRECT reads at queue depth 16, `--attr-timeout`
0.1: tests/test_mount.py), each a backing stat in a worker thread (an NFS
GETATTR round trip on `nfs://`) that the read waits for. O_DIRECT opens
are served with FUSE direct I/O, which asks nothing (fs.py); buffered
readers still ask. `RecentAttrs` answers a GETATTR of a regular file with
what a stat of it returned less than `reuse` seconds ago, and makes
GETATTRs that come while a stat is in flight wait for that one stat.

Never older than the rules allow:
- nothing changed through this mount is answered from before the change:
  every change made here (a write, a truncate or other setattr, an
  extended attribute set or removed, an open with O_TRUNC; for names, any
  create, link, unlink, rename, mkdir, rmdir, symlink or mknod, and the
  chown that hands a new object to its creator, which void every file's
  entry) marks the file, or all, at its start and at its end,
  and an entry is kept and used only if its stat began after the last mark
  and no change is in flight;
- another host's change is seen at most `reuse` seconds later than without
  this (README, "How long another host's change can go unseen": the bound
  is `--revalidate` + `--attr-timeout`, and `reuse` is far below either);
- directories, symbolic links and the like are always stat'ed.

On the loop thread only: no locks.
"""

from __future__ import annotations

import contextlib
import stat
import time
from collections.abc import Awaitable, Callable, Iterator

import trio

from fusecache.backing import Attr

REUSE = 0.05  # seconds a regular file's stat answers the kernel's GETATTRs


class RecentAttrs:
    """Recent stats of regular files, by FUSE inode (see the module docstring)."""

    def __init__(self, reuse: float = REUSE) -> None:
        self.reuse = reuse
        self.asked = 0  # GETATTRs of regular files answered by `stat`
        self.stats = 0  # of which a backing stat was made for
        self._tick = 0  # bumped at the start and the end of every change
        self._changed: dict[int, int] = {}  # inode -> the tick of its last change mark
        self._names_changed = 0  # the tick of the last change of names (voids every entry)
        self._changing: dict[int | None, int] = {}  # changes in flight: inode (None: names) -> how many
        self._seen: dict[int, tuple[float, int, Attr]] = {}  # inode -> (its stat began, tick then, attributes)
        self._asking: dict[int, trio.Event] = {}  # inode -> set when the stat in flight for it ends

    def _valid(self, inode: int, began_tick: int) -> bool:
        return (
            began_tick >= self._changed.get(inode, 0)
            and began_tick >= self._names_changed
            and not self._changing.get(inode)
            and not self._changing.get(None)
        )

    def recent(self, inode: int) -> Attr | None:
        """The attributes of `inode` if a stat that began less than `reuse` seconds ago, after its last change, gave them."""
        entry = self._seen.get(inode)
        if entry is None:
            return None
        began, tick, attr = entry
        if time.monotonic() - began < self.reuse and self._valid(inode, tick):
            return attr
        del self._seen[inode]
        return None

    async def stat(self, inode: int, do_stat: Callable[[], Awaitable[Attr]]) -> tuple[Attr, bool]:
        """`inode`'s attributes: a recent stat's, the one in flight's, or `do_stat()`'s. Also whether a stat was made
        for this call (its answer is a fresh look at the backing: a check of the file's version)."""
        self.asked += 1
        attr = self.recent(inode)
        if attr is not None:
            return attr, False
        asking = self._asking.get(inode)
        if asking is not None:
            await asking.wait()
            attr = self.recent(inode)
            if attr is not None:
                return attr, False
        began, tick = time.monotonic(), self._tick
        done = None
        if inode not in self._asking:  # (else a waiter whose stat came back void asks alone, not registered)
            done = self._asking[inode] = trio.Event()
        try:
            self.stats += 1
            attr = await do_stat()
        finally:
            if done is not None:
                del self._asking[inode]
                done.set()
        if stat.S_ISREG(attr.mode) and self._valid(inode, tick):
            self._seen[inode] = (began, tick, attr)
        return attr, True

    @contextlib.contextmanager
    def changing(self, inode: int | None) -> Iterator[None]:
        """Around a change made through the mount to `inode`'s attributes, or to names (None: every entry)."""
        self._mark(inode)
        self._changing[inode] = self._changing.get(inode, 0) + 1
        try:
            yield
        finally:
            n = self._changing[inode] - 1
            if n:
                self._changing[inode] = n
            else:
                del self._changing[inode]
            self._mark(inode)

    def _mark(self, inode: int | None) -> None:
        self._tick += 1
        if inode is None:
            self._names_changed = self._tick
            self._seen.clear()
        else:
            self._changed[inode] = self._tick
            self._seen.pop(inode, None)

    def forget(self, inode: int) -> None:
        """The kernel forgot `inode`: its entry and marks go (unless a stat of it is in flight: that one's check needs them)."""
        self._seen.pop(inode, None)
        if inode not in self._asking and not self._changing.get(inode):
            self._changed.pop(inode, None)
