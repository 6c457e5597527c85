"""OffLoop's own worker threads (fusecache/backing/__init__.py): results, errors, the thread bound, cancellation.

No FUSE and no real backing: the calls are plain functions.
"""

from __future__ import annotations

import errno
import threading
import time

import trio

from fusecache.backing import OffLoop


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
