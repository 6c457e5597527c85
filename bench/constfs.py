"""The floor of a fusecache hit: the real daemon, every read answered with constant bytes.

`python -m bench.constfs BACKING MOUNTPOINT` serves `fusecache mount BACKING
MOUNTPOINT --no-cache --foreground` in this process, with one change made here
and nowhere in fusecache: the data path's `read` returns a view of a constant
buffer and touches nothing else (no backing read, no cache). What is left is
everything a hit shares with any answer: pyfuse3, the daemon's loop and
settings, `FuseOperations` (the FUSE adapter), the kernel's round trip, and a
reply copied out of one hot buffer. A warm hit's own cost is its distance from
this floor (`bench/qemu_bench.py`, `bench/hitpath.py` mount it beside the
ceiling). The bytes are wrong on purpose: nothing may check them.

Stopped by SIGTERM or SIGINT, as a fusecache daemon is.
"""

from __future__ import annotations

import sys

from fusecache import cli
from fusecache.cache import Passthrough

MAX_READ = 1 << 20  # the largest FUSE read request (256 pages)
_CONSTANT = memoryview(bytes(range(256)) * (MAX_READ // 256))


async def _constant_read(self: Passthrough, f: object, offset: int, size: int) -> memoryview:
    return _CONSTANT[:size]


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m bench.constfs BACKING MOUNTPOINT", file=sys.stderr)
        return 2
    Passthrough.read = _constant_read  # type: ignore[method-assign]
    return cli.main(["mount", argv[0], argv[1], "--no-cache", "--foreground"])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
