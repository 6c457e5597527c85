"""RecentAttrs (fusecache/attrs.py): a regular file's stat answers GETATTRs for a moment, never across a change made here."""

from __future__ import annotations

import stat

import pytest
import trio

from fusecache.attrs import RecentAttrs
from fusecache.backing import Attr


def _attr(size: int, mode: int = stat.S_IFREG | 0o644) -> Attr:
    return Attr(ino=7, mode=mode, nlink=1, uid=0, gid=0, size=size, rdev=0, blocks=0, atime_ns=0, mtime_ns=size, ctime_ns=size)


class Backing:
    """A stat that returns the file's size now, optionally held until released, and counts its calls."""

    def __init__(self) -> None:
        self.size = 100
        self.mode = stat.S_IFREG | 0o644
        self.calls = 0
        self.gate: trio.Event | None = None
        self.fail: OSError | None = None

    async def lstat(self) -> Attr:
        self.calls += 1
        seen = self.size  # what the backing holds when the stat is made
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return _attr(seen, self.mode)


def run(body) -> None:  # type: ignore[no-untyped-def]
    trio.run(body)


def test_a_regular_files_stat_answers_again_within_the_window_then_is_made_again():
    async def body() -> None:
        attrs, b = RecentAttrs(reuse=0.2), Backing()
        first, fresh = await attrs.stat(1, b.lstat)
        assert fresh and first.size == 100 and b.calls == 1
        b.size = 200  # (another host: seen once the window has passed)
        again, fresh = await attrs.stat(1, b.lstat)
        assert not fresh and again.size == 100 and b.calls == 1
        await trio.sleep(0.25)
        later, fresh = await attrs.stat(1, b.lstat)
        assert fresh and later.size == 200 and b.calls == 2
        assert (attrs.asked, attrs.stats) == (3, 2)

    run(body)


def test_a_change_made_here_is_never_answered_from_before_it():
    async def body() -> None:
        attrs, b = RecentAttrs(reuse=10), Backing()
        await attrs.stat(1, b.lstat)
        with attrs.changing(1):
            b.size = 300  # a write through the mount
            during, fresh = await attrs.stat(1, b.lstat)  # (the kernel may ask while the write is in flight)
            assert fresh and during.size == 300
            b.size = 310  # the write goes on: while it is in flight, every ask is a stat
            during, fresh = await attrs.stat(1, b.lstat)
            assert fresh and during.size == 310
        after, fresh = await attrs.stat(1, b.lstat)
        assert fresh and after.size == 310  # the stats made during the change were not kept
        kept, fresh = await attrs.stat(1, b.lstat)
        assert not fresh and kept.size == 310
        await attrs.stat(2, b.lstat)
        with attrs.changing(1):
            pass
        _, fresh = await attrs.stat(2, b.lstat)
        assert not fresh  # a change of one file leaves the others' entries
        with attrs.changing(None):  # names changed (a rename, an unlink...): every entry goes
            pass
        _, fresh = await attrs.stat(2, b.lstat)
        assert fresh

    run(body)


def test_a_stat_that_overlapped_a_change_is_answered_but_not_kept():
    async def body() -> None:
        attrs, b = RecentAttrs(reuse=10), Backing()
        b.gate = trio.Event()
        got: list[Attr] = []

        async def ask() -> None:
            got.append((await attrs.stat(1, b.lstat))[0])

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask)
            await trio.sleep(0.01)  # its stat is in flight, with the old size
            with attrs.changing(1):
                b.size = 400
            b.gate.set()
        assert got[0].size == 100
        b.gate = None
        now, fresh = await attrs.stat(1, b.lstat)
        assert fresh and now.size == 400

    run(body)


def test_asks_while_a_stat_is_in_flight_share_it():
    async def body() -> None:
        attrs, b = RecentAttrs(reuse=10), Backing()
        b.gate = trio.Event()
        got: list[tuple[Attr, bool]] = []

        async def ask() -> None:
            got.append(await attrs.stat(1, b.lstat))

        async with trio.open_nursery() as nursery:
            for _ in range(16):
                nursery.start_soon(ask)
            await trio.sleep(0.01)
            b.gate.set()
        assert b.calls == 1
        assert sorted(fresh for _, fresh in got) == [False] * 15 + [True]
        assert {a.size for a, _ in got} == {100}

    run(body)


def test_a_failed_stat_is_each_askers_error_and_nothing_is_kept():
    async def body() -> None:
        attrs, b = RecentAttrs(reuse=10), Backing()
        b.gate = trio.Event()
        b.fail = FileNotFoundError(2, "gone")
        errors: list[BaseException] = []

        async def ask() -> None:
            try:
                await attrs.stat(1, b.lstat)
            except OSError as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(ask)
            await trio.sleep(0.01)
            b.gate.set()
        assert len(errors) == 3  # the one that asked, and each waiter's own stat after it
        b.fail, b.gate = None, None
        attr, fresh = await attrs.stat(1, b.lstat)
        assert fresh and attr.size == 100

    run(body)


@pytest.mark.parametrize("mode", [stat.S_IFDIR | 0o755, stat.S_IFLNK | 0o777])
def test_anything_but_a_regular_file_is_stat_ed_every_time(mode: int):
    async def body() -> None:
        attrs, b = RecentAttrs(reuse=10), Backing()
        b.mode = mode
        for _ in range(3):
            _, fresh = await attrs.stat(1, b.lstat)
            assert fresh
        assert b.calls == 3

    run(body)


def test_forgetting_an_inode_drops_its_entry():
    async def body() -> None:
        attrs, b = RecentAttrs(reuse=10), Backing()
        await attrs.stat(1, b.lstat)
        attrs.forget(1)
        _, fresh = await attrs.stat(1, b.lstat)
        assert fresh and b.calls == 2

    run(body)
