"""The data path: where file contents come from and go to.

`Passthrough` sends every read and write to the backing file (in a worker
thread): the mount without a cache, and the baseline every cache result is
measured against.
"""

from __future__ import annotations

from fusecache.backing import OffLoop
from fusecache.inodes import OpenFile


class Passthrough:
    """No cache: reads and writes go straight to the backing file."""

    def __init__(self, backing: OffLoop) -> None:
        self.backing = backing

    async def read(self, f: OpenFile, offset: int, size: int) -> bytes:
        return await self.backing.pread(f.handle, offset, size)

    async def write(self, f: OpenFile, offset: int, data: bytes) -> int:
        return await self.backing.pwrite(f.handle, data, offset)

    async def opened(self, f: OpenFile) -> None:
        pass

    def closed(self, f: OpenFile) -> None:
        pass

    def resized(self, ino: int, size: int) -> None:
        pass

    def unlinked(self, ino: int) -> None:
        pass
