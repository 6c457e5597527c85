"""The backing tree: the image directory fusecache mirrors.

A backing is either a local directory (in production a kernel NFS mount) or an
NFS export spoken to directly (`nfs://server/export`). Both implement
`Backing`. Every method is *blocking*: the FUSE layer never calls one on the
trio thread, it hands it to a worker thread (`OffLoop`). Two reads are the
exception, made on the loop without a hand-off: a local directory's
`pread_cached`, which never waits (RWF_NOWAIT: what the host page cache
holds), and NFS's `pread_on_loop`, a coroutine that waits for its answer
under trio. Either may decline (None); the read then goes to a thread. Paths are
relative to the backing root, '' is the root itself, components joined by '/'.
Failures raise OSError with the right errno; callers turn that into FUSEError.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import outcome
import trio

from fusecache.version import Version


@dataclasses.dataclass(frozen=True, slots=True)
class Attr:
    """Attributes of a backing object, the subset FUSE and the cache need."""

    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    size: int
    rdev: int
    blocks: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    # NFS change attribute where the protocol has one, else 0.
    change: int = 0

    @property
    def version(self) -> Version:
        """What identifies one version of a file's content (close-to-open check)."""
        return Version(self.size, self.mtime_ns, self.ctime_ns, self.change)

    @classmethod
    def from_stat(cls, st: Any) -> Attr:
        return cls(
            ino=st.st_ino,
            mode=st.st_mode,
            nlink=st.st_nlink,
            uid=st.st_uid,
            gid=st.st_gid,
            size=st.st_size,
            rdev=st.st_rdev,
            blocks=st.st_blocks,
            atime_ns=st.st_atime_ns,
            mtime_ns=st.st_mtime_ns,
            ctime_ns=st.st_ctime_ns,
        )


@dataclasses.dataclass(frozen=True, slots=True)
class StatFs:
    bsize: int
    frsize: int
    blocks: int
    bfree: int
    bavail: int
    files: int
    ffree: int
    favail: int
    namemax: int


class Handle(Protocol):
    """An open backing file. Opaque to callers; only its backing uses it."""


class Backing(Protocol):
    """A tree of files. Every call may block (network): run it off the trio loop."""

    description: str  # for log lines: "/mnt/nfs/images" or "nfs://srv/export"

    def lstat(self, path: str) -> Attr: ...
    def listdir(self, path: str) -> list[str]: ...
    def open(self, path: str, flags: int) -> Handle: ...
    def create(self, path: str, flags: int, mode: int) -> Handle: ...
    def fstat(self, fh: Handle) -> Attr: ...
    def pread(self, fh: Handle, offset: int, size: int) -> bytes: ...
    def pwrite(self, fh: Handle, data: bytes, offset: int) -> int: ...
    def fsync(self, fh: Handle, datasync: bool) -> None: ...
    def ftruncate(self, fh: Handle, size: int) -> None: ...
    def close(self, fh: Handle) -> None: ...
    def truncate(self, path: str, size: int) -> None: ...
    def chmod(self, path: str, mode: int) -> None: ...
    def chown(self, path: str, uid: int, gid: int) -> None: ...
    def utimens(self, path: str, atime_ns: int | None, mtime_ns: int | None) -> None: ...
    def mkdir(self, path: str, mode: int) -> None: ...
    def rmdir(self, path: str) -> None: ...
    def unlink(self, path: str) -> None: ...
    def rename(self, old: str, new: str, flags: int) -> None: ...
    def symlink(self, target: str, path: str) -> None: ...
    def readlink(self, path: str) -> str: ...
    def link(self, existing: str, new: str) -> None: ...
    def mknod(self, path: str, mode: int, rdev: int) -> None: ...
    def statfs(self) -> StatFs: ...
    def getxattr(self, path: str, name: str) -> bytes: ...
    def setxattr(self, path: str, name: str, value: bytes, flags: int) -> None: ...
    def listxattr(self, path: str) -> list[str]: ...
    def removexattr(self, path: str, name: str) -> None: ...
    def shutdown(self) -> None: ...


def open_backing(spec: str) -> Backing:
    """Build the backing for a BACKING argument: a directory or an nfs:// URL."""
    if spec.startswith("nfs://"):
        from fusecache.backing.nfs import NfsBacking

        return NfsBacking.from_url(spec)
    from fusecache.backing.local import LocalBacking

    return LocalBacking.from_path(spec)


class OffLoop:
    """A backing whose every call runs in a worker thread and is awaited.

    The backing is NFS in production, where any call, even a stat, can block
    for a server timeout; a blocking call on the trio thread would stall every
    request of every guest. So every backing call goes through this wrapper,
    none is made on the loop.

    The threads are our own, persistent (up to `threads`, started as calls
    need them), fed by a queue; a result wakes its task with
    `TrioToken.run_sync_soon`. bench/handoff.py measured this at 0.67-0.78x the
    time of `trio.to_thread.run_sync` for one call at a time and 0.2-0.24x with
    8 calls in flight (to_thread: ~100-125 µs a call here). A call cannot be
    cancelled once handed over (as with to_thread's default): the backing call
    runs to its end and its result is delivered.

    Reads (`pread`) of at most INLINE_MAX bytes are first tried on the loop:
    a local directory's page cache (`LocalBacking.pread_cached`), or an NFS
    READ sent and waited for under trio (`NfsBacking.pread_on_loop`). They
    need no thread unless declined.
    """

    def __init__(self, backing: Backing, threads: int = 32) -> None:
        self.sync = backing
        self.description = backing.description
        # the backing's reads that cannot wait (a local directory's page cache), made on the loop; None: every read
        # goes to a thread (NFS, libnfs)
        self._cached: Callable[[Any, int, int], bytes | None] | None = getattr(backing, "pread_cached", None)
        # NFS (libnfs): a read made from the loop itself, its socket waited for by trio; None when it cannot be
        self._on_loop: Callable[[Any, int, int], Awaitable[bytes | None]] | None = getattr(backing, "pread_on_loop", None)
        self.inline_reads = 0  # reads answered whole on the loop (page cache or NFS), no thread
        self.inline_bytes = 0
        self._max = threads
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0  # threads waiting for a job, less jobs queued that no thread has taken yet

    async def run(self, fn: Any, *args: Any) -> Any:
        """Run `fn(*args)` (a few backing calls made together) in a worker thread."""
        task = trio.lowlevel.current_task()
        token = trio.lowlevel.current_trio_token()
        with self._lock:
            start = self._idle <= 0 and self._threads < self._max
            if start:
                self._threads += 1
            else:
                self._idle -= 1  # a waiting thread takes this job (or, at the limit, it waits its turn)
        self._jobs.put((token, task, fn, args))
        if start:
            threading.Thread(target=self._work, name="fusecache-backing", daemon=True).start()
        return await trio.lowlevel.wait_task_rescheduled(_cannot_abort)

    async def pread(self, handle: Any, offset: int, size: int) -> bytes:
        """A backing read: on the loop when the host page cache holds it (no hand-off), else in a worker thread.

        A thread round trip costs a cold read more than the read itself when the bytes are in the page cache
        (bench/handoff.py: ~100-300 µs a call here against ~5 µs for the read). Only reads of at most
        INLINE_MAX bytes are tried (a larger copy would hold the loop longer than a hand-off costs it). What the
        page cache holds of the start of a read is kept: only the rest is read in the thread (bytes read from
        the backing stay the bytes asked for).
        """
        return await self.pread_rest(handle, offset, size, self.pread_cached(handle, offset, size))

    def pread_cached(self, handle: Any, offset: int, size: int) -> bytes | None:
        """What the host page cache holds of a read's start, on the loop, without waiting (`LocalBacking.pread_cached`).

        The bytes from `offset` on that it holds (all `size` of them: the read is answered, counted in
        `inline_reads`; fewer; b""), or None when it cannot tell (no page cache to ask, a read larger than
        INLINE_MAX). Anything but the whole read: `pread_rest` reads the rest.
        """
        cached = self._cached
        if cached is None or not 0 < size <= INLINE_MAX:
            return None
        head = cached(handle, offset, size)
        if head is not None and len(head) == size:
            self.inline_reads += 1
            self.inline_bytes += size
        return head

    async def pread_rest(self, handle: Any, offset: int, size: int, head: bytes | None) -> bytes:
        """`pread` given what `pread_cached` answered for it: only what `head` lacks is read, in a worker thread.

        `head` None (no page cache could tell): an NFS backing's read is sent from the loop first.
        """
        if head is not None:
            if len(head) == size:
                return head
            if head:
                return head + await self.run(self.sync.pread, handle, offset + len(head), size - len(head))
            return await self.run(self.sync.pread, handle, offset, size)
        on_loop = self._on_loop
        if on_loop is not None and 0 < size <= INLINE_MAX:
            got = await on_loop(handle, offset, size)
            if got is not None:
                self.inline_reads += 1
                self.inline_bytes += len(got)
                return got
        return await self.run(self.sync.pread, handle, offset, size)

    def _work(self) -> None:
        while True:
            token, task, fn, args = self._jobs.get()
            result = outcome.capture(fn, *args)
            try:
                token.run_sync_soon(trio.lowlevel.reschedule, task, result)
            except trio.RunFinishedError:
                pass  # the loop that asked is gone
            del token, task, fn, args, result
            with self._lock:
                self._idle += 1

    def __getattr__(self, name: str) -> Any:
        fn = getattr(self.sync, name)

        async def call(*args: Any) -> Any:
            return await self.run(fn, *args)

        call.__name__ = name
        return call


INLINE_MAX = 256 << 10  # the largest read `OffLoop.pread` tries on the loop (fetch.py's PARALLEL_PART: larger reads go in parallel parts)


def _cannot_abort(_: Any) -> Any:
    return trio.lowlevel.Abort.FAILED
