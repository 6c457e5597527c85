"""pyfuse3's request loop (fusecache/fuse_loop.py): a readable fd is taken at once, anything else is trio's wait.

No FUSE: a socket pair stands for the session's fd. Every mount in the other
tiers serves its requests through this loop.
"""

from __future__ import annotations

import socket

import pyfuse3
import pytest
import trio

from fusecache import fuse_loop


@pytest.fixture
def trios_waits(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The fds trio's own `wait_readable` was asked to wait for (it still waits)."""
    asked: list[int] = []
    real = trio.lowlevel.wait_readable

    async def recording(fd: int) -> None:
        asked.append(fd)
        await real(fd)

    monkeypatch.setattr(trio.lowlevel, "wait_readable", recording)
    return asked


def test_a_queued_request_is_taken_without_trios_wait(trios_waits: list[int]) -> None:
    lowlevel = fuse_loop._Lowlevel()
    a, b = socket.socketpair()
    with a, b:
        b.send(b"x")

        async def go() -> None:
            with trio.fail_after(5):
                await lowlevel.wait_readable(a.fileno())
                await lowlevel.wait_readable(a.fileno())  # still queued: still at once

        trio.run(go)
    assert trios_waits == []


def test_nothing_queued_is_trios_wait_until_a_request_comes(trios_waits: list[int]) -> None:
    lowlevel = fuse_loop._Lowlevel()
    a, b = socket.socketpair()
    fd = a.fileno()
    with a, b:
        seen: list[str] = []

        async def waiter() -> None:
            await lowlevel.wait_readable(a.fileno())
            seen.append("request")

        async def go() -> None:
            with trio.move_on_after(0.05):  # nothing comes: the wait is cancelled, as trio's is
                await lowlevel.wait_readable(a.fileno())
                seen.append("woke with nothing queued")
            with trio.fail_after(5):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(waiter)
                    await trio.sleep(0.05)
                    assert seen == []  # still waiting
                    b.send(b"x")

        trio.run(go)
        assert seen == ["request"]
    assert trios_waits == [fd, fd]


def test_a_closed_session_fd_ends_the_wait_as_trio_does(trios_waits: list[int]) -> None:
    """`pyfuse3.terminate()` wakes a waiting worker with `notify_closing`: ClosedResourceError, which pyfuse3
    takes as the end of its loop."""
    lowlevel = fuse_loop._Lowlevel()
    a, b = socket.socketpair()
    with a, b:

        ended: list[type[BaseException]] = []

        async def waiter() -> None:
            try:
                await lowlevel.wait_readable(a.fileno())
            except trio.ClosedResourceError as exc:
                ended.append(type(exc))

        async def go() -> None:
            with trio.fail_after(5):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(waiter)
                    await trio.sleep(0.02)
                    trio.lowlevel.notify_closing(a.fileno())

        trio.run(go)
    assert ended == [trio.ClosedResourceError]


def test_a_hung_up_fd_is_trios_answer(trios_waits: list[int]) -> None:
    """A hang-up (the kernel's end going away) is not a request: trio's wait answers it (epoll reports it)."""
    lowlevel = fuse_loop._Lowlevel()
    a, b = socket.socketpair()
    fd = a.fileno()
    with a:
        b.close()

        async def go() -> None:
            with trio.fail_after(5):
                await lowlevel.wait_readable(a.fileno())

        trio.run(go)
    assert trios_waits == [fd]


def test_install_gives_pyfuse3_trio_with_the_fast_wait_and_uninstall_takes_it_back() -> None:
    assert pyfuse3.trio is trio
    try:
        assert fuse_loop.install()
        seen = pyfuse3.trio
        assert isinstance(seen.lowlevel, fuse_loop._Lowlevel)
        # every name pyfuse3 uses besides wait_readable is trio's own
        assert seen.Lock is trio.Lock and seen.open_nursery is trio.open_nursery
        assert seen.ClosedResourceError is trio.ClosedResourceError
        assert seen.lowlevel.current_task is trio.lowlevel.current_task
        assert seen.lowlevel.notify_closing is trio.lowlevel.notify_closing
        assert seen.lowlevel.current_trio_token is trio.lowlevel.current_trio_token
        assert not fuse_loop.install()  # already installed: pyfuse3 is not on trio itself, nothing changes
        assert pyfuse3.trio is seen
    finally:
        fuse_loop.uninstall()
    assert pyfuse3.trio is trio


def test_install_leaves_another_mode_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    other = object()
    monkeypatch.setattr(pyfuse3, "trio", other)
    assert not fuse_loop.install()
    assert pyfuse3.trio is other
