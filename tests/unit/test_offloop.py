"""OffLoop's own worker threads (fusecache/backing/__init__.py): results, errors, the thread bound, cancellation.

No FUSE; the calls are plain functions, but for the reads a local directory's page cache answers on the loop.
"""

from __future__ import annotations

import errno
import os
import threading
import time

import pytest
import trio

from fusecache.backing import INLINE_MAX, OffLoop
from fusecache.backing.local import LocalBacking


class _Nothing:
    description = "none"

    def ident(self) -> int:
        return threading.get_ident()


def test_results_and_errors_come_back_to_the_caller():
    off = OffLoop(_Nothing())  # type: ignore[arg-type]

    def fail() -> None:
        raise OSError(errno.EIO, "backing broke")

    async def main() -> None:
        assert await off.run(lambda a, b: a + b, 2, 3) == 5
        assert await off.ident() != threading.get_ident()  # ran off the loop's thread
        try:
            await off.run(fail)
        except OSError as exc:
            assert exc.errno == errno.EIO
        else:
            raise AssertionError("the error was not raised")

    trio.run(main)


def test_many_calls_at_once_finish_and_never_exceed_the_thread_bound():
    off = OffLoop(_Nothing(), threads=4)  # type: ignore[arg-type]
    lock = threading.Lock()
    running = [0, 0]  # now, most

    def work(i: int) -> int:
        with lock:
            running[0] += 1
            running[1] = max(running[1], running[0])
        time.sleep(0.01)
        with lock:
            running[0] -= 1
        return i * i

    results: dict[int, int] = {}

    async def one(i: int) -> None:
        results[i] = await off.run(work, i)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for i in range(40):
                nursery.start_soon(one, i)

    trio.run(main)
    assert results == {i: i * i for i in range(40)}
    assert running[1] == 4
    assert threading.active_count() >= 1


def test_a_call_runs_to_its_end_when_its_caller_is_cancelled():
    off = OffLoop(_Nothing())  # type: ignore[arg-type]
    done = threading.Event()

    def slow() -> str:
        time.sleep(0.1)
        done.set()
        return "finished"

    async def main() -> None:
        got = None
        with trio.move_on_after(0.01):
            got = await off.run(slow)
        assert got == "finished"  # delivered: a backing call is never abandoned half way
        assert done.is_set()

    trio.run(main)


def test_one_offloop_serves_successive_trio_runs():
    off = OffLoop(_Nothing())  # type: ignore[arg-type]

    async def main() -> int:
        return await off.run(lambda: 7)

    assert trio.run(main) == 7
    assert trio.run(main) == 7


# ---- reads the host page cache holds: on the loop, no thread ------------------------------------------------------


class _Cached:
    """A backing whose page cache holds `cached` bytes of each read's start (None: it cannot tell)."""

    description = "cached"

    def __init__(self, data: bytes, cached: int | None) -> None:
        self.data, self.cached = data, cached
        self.preads: list[tuple[int, int]] = []  # (offset, size) of the reads made in a thread
        self.tried: list[tuple[int, int]] = []

    def pread_cached(self, fh: object, offset: int, size: int) -> bytes | None:
        self.tried.append((offset, size))
        assert threading.current_thread() is threading.main_thread()  # on the loop
        return None if self.cached is None else self.data[offset : offset + min(size, self.cached)]

    def pread(self, fh: object, offset: int, size: int) -> bytes:
        assert threading.current_thread() is not threading.main_thread()
        self.preads.append((offset, size))
        return self.data[offset : offset + size]


def test_only_what_the_page_cache_lacks_is_read_in_a_thread():
    data = os.urandom(1 << 20)
    for cached, threaded in [(None, [(4096, 12288)]), (0, [(4096, 12288)]), (4096, [(8192, 8192)]), (12288, [])]:
        b = _Cached(data, cached)
        off = OffLoop(b)  # type: ignore[arg-type]
        assert trio.run(off.pread, None, 4096, 12288) == data[4096 : 4096 + 12288]
        assert b.preads == threaded, cached  # the bytes read from the backing are the bytes asked for, once
        assert off.inline_reads == (1 if cached == 12288 else 0)
    b = _Cached(data, 1 << 20)
    off = OffLoop(b)  # type: ignore[arg-type]
    assert trio.run(off.pread, None, 0, INLINE_MAX + 4096) == data[: INLINE_MAX + 4096]
    assert b.tried == [] and b.preads == [(0, INLINE_MAX + 4096)]  # a large read is not made on the loop


def test_a_local_read_the_page_cache_holds_needs_no_thread(tmp_path):
    data = os.urandom(3 * 4096 + 100)
    (tmp_path / "disk.img").write_bytes(data)  # (just written: in the page cache)
    backing = LocalBacking(str(tmp_path))
    off = OffLoop(backing)
    fd = backing.open("disk.img", os.O_RDONLY)
    try:
        got = trio.run(off.pread, fd, 4096, 8192)
        if not backing.nowait:
            pytest.skip(f"{tmp_path}'s filesystem cannot read without waiting (RWF_NOWAIT)")
        assert got == data[4096 : 4096 + 8192]
        assert off.inline_reads == 1 and off._threads == 0  # no worker thread was ever started
        # across the end of the file: the page cache's bytes, then the rest (nothing) asked of a thread
        assert trio.run(off.pread, fd, 2 * 4096, 8192) == data[2 * 4096 :]
        assert off.inline_reads == 1
    finally:
        backing.close(fd)


def test_a_filesystem_that_cannot_read_without_waiting_turns_inline_reads_off(tmp_path, monkeypatch):
    data = os.urandom(8192)
    (tmp_path / "disk.img").write_bytes(data)
    backing = LocalBacking(str(tmp_path))
    off = OffLoop(backing)
    fd = backing.open("disk.img", os.O_RDONLY)
    calls = []

    def preadv(*args: object) -> int:  # as NFS or FUSE answer RWF_NOWAIT
        calls.append(args)
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(os, "preadv", preadv)
    try:
        assert trio.run(off.pread, fd, 0, 4096) == data[:4096]
        assert trio.run(off.pread, fd, 4096, 4096) == data[4096:]
        assert len(calls) <= 1 and not backing.nowait  # asked once at most, then never again
        assert off.inline_reads == 0
    finally:
        backing.close(fd)
