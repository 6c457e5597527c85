"""Admission: which blocks a read brings into the cache, and when.

`Inclusive` admits every block a guest reads, at once. Second-chance (the
research's exclusive mode) is added with the balloon monitor: it remembers
what each guest read and admits it when the guest's balloon makes it evict.
The cache asks its admission object once per block read from the backing.
"""

from __future__ import annotations

from typing import Protocol

from fusecache.inodes import OpenFile


class Admission(Protocol):
    name: str

    def on_miss(self, f: OpenFile, gen: int, chunk: int, data: bytes) -> bool:
        """A block was read from the backing: True to admit it now."""
        ...

    def stats(self) -> dict[str, object]: ...


class Inclusive:
    """Admit every block read (for hosts without ballooning, and for comparison)."""

    name = "inclusive"

    def on_miss(self, f: OpenFile, gen: int, chunk: int, data: bytes) -> bool:
        return True

    def stats(self) -> dict[str, object]:
        return {"mode": self.name}
