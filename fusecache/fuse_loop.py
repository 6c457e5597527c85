"""pyfuse3's request loop: a worker that finds a request already queued takes it without waiting on trio's I/O.

`pyfuse3.main()` runs workers that, for every request, take pyfuse3's read
lock (a trio checkpoint: cancellation and the other tasks' turn) and then
`await trio.lowlevel.wait_readable(session_fd)` before reading it. trio's
wait always parks the task: it registers the fd with epoll (an `epoll_ctl`),
and the task runs again only after the scheduler's next `epoll_wait` reports
the fd, even when the kernel has requests queued already, which under load
(a guest's queue depth above one, or the next request of a stream issued
while the last reply was being sent) it nearly always has.

`install()` gives pyfuse3 a `trio` whose `lowlevel.wait_readable` polls the
fd first (`poll`, zero timeout): readable now, it returns at once; otherwise
(an idle mount) it is trio's own wait, unchanged. pyfuse3 reads the name
`trio` from its module's globals at each call, and `pyfuse3.asyncio.enable()`
swaps it the same way for its asyncio shim: this is pyfuse3's own seam, and
nothing else of trio changes (every other name is trio's).

What stays as it was:

- a checkpoint per request: pyfuse3 waits only inside `async with read_lock`,
  whose acquire is one, so a busy mount still lets the daemon's other tasks
  (the admission queue, the control socket, signals) run between requests,
  and a cancelled loop stops at its next request;
- stopping: `pyfuse3.terminate()` sets the session's exit flag, which
  pyfuse3 checks under the lock before it waits, and wakes a waiting task
  through trio (`notify_closing`): an idle wait is trio's;
- a request the kernel takes back between the poll and pyfuse3's read (one
  interrupted before the daemon read it) leaves the read to wait for the next
  one: trio's epoll-then-read has the same window.

Measured (README, "Speed"; `bench.qemu_bench`, 64 KiB at queue depth 16,
CPU a request): stock pyfuse3 serving a file from memory 37.7-41.2 µs, the
same with this loop 26.7-28.9 µs; the daemon on a warm hit 41.0-41.6 µs
before it, 33.9-34.6 µs with it.
"""

from __future__ import annotations

import logging
import select
from typing import Any

import pyfuse3
import trio

log = logging.getLogger(__name__)

_ELSE = select.POLLERR | select.POLLHUP | select.POLLNVAL  # what trio's wait is left to answer


class _Lowlevel:
    """`trio.lowlevel`, but `wait_readable` returns at once for an fd that is readable now."""

    def __init__(self) -> None:
        self._polls: dict[int, Any] = {}  # fd -> a poll object watching it for POLLIN (pyfuse3 has one fd)

    def __getattr__(self, name: str) -> Any:
        return getattr(trio.lowlevel, name)

    async def wait_readable(self, fd: int) -> None:
        polls = self._polls.get(fd)
        if polls is None:
            polls = self._polls[fd] = select.poll()
            polls.register(fd, select.POLLIN)
        ready = polls.poll(0)
        if ready and ready[0][1] & _ELSE == 0:  # readable, and nothing else
            return  # a request is queued: pyfuse3 reads it now
        # Nothing queued, or anything else the poll says (an error, a hang-up, a closed fd): trio's own wait
        # answers it as it always has.
        await trio.lowlevel.wait_readable(fd)


class _Trio:
    """The `trio` module as pyfuse3 sees it once installed: trio, with `_Lowlevel` as `lowlevel`."""

    def __init__(self) -> None:
        self.lowlevel = _Lowlevel()

    def __getattr__(self, name: str) -> Any:
        return getattr(trio, name)


def install() -> bool:
    """Give pyfuse3 the loop above (before `pyfuse3.main()`). False, and nothing changed, when pyfuse3 does not
    use trio itself right now (its asyncio mode, or another build): it then runs as it came."""
    if getattr(pyfuse3, "trio", None) is not trio:
        log.info("pyfuse3's request loop left as it is: pyfuse3 is not running on trio itself")
        return False
    pyfuse3.trio = _Trio()  # type: ignore[attr-defined]
    return True


def uninstall() -> None:
    """pyfuse3's own loop again (tests)."""
    if isinstance(getattr(pyfuse3, "trio", None), _Trio):
        pyfuse3.trio = trio  # type: ignore[attr-defined]
