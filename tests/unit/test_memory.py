"""The memory reserve (fusecache/memory.py): after it, bytes a cache keeps alive reuse touched pages, in huge pages.

Counted in page faults (the process's minor faults), not time: 1 MiB of fresh
memory written once is 256 faults; reusing touched heap pages is none.
"""

from __future__ import annotations

import resource
from pathlib import Path

import pytest

from fusecache import memory

MiB = 1 << 20


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def test_bytes_kept_alive_after_the_reserve_fault_no_fresh_pages():
    assert memory.keep_freed_memory(), "glibc's malloc took the settings"
    assert memory.touch(64 * MiB) == 64 * MiB
    before = minor_faults()
    kept = [bytes([n]) * MiB for n in range(48)]  # written whole, all alive at once, as a staging buffer holds reads
    faults = minor_faults() - before
    assert len(kept) == 48
    assert faults < 48 * 256 // 4, f"{faults} page faults for 48 MiB kept: the reserve's pages were not reused"


def test_the_reserve_is_in_huge_pages_where_the_kernel_offers_them():
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not thp.exists() or "[never]" in thp.read_text():
        pytest.skip("this kernel has transparent huge pages off")
    memory.keep_freed_memory()
    assert memory.touch(64 * MiB) == 64 * MiB
    # (a reserve touched earlier in this process is reused, already in huge pages: the total is what counts)
    assert memory.huge_page_bytes() >= 48 * MiB, f"{memory.huge_page_bytes() >> 20} MiB in huge pages after a 64 MiB reserve"


def test_the_reserve_is_put_in_huge_pages_range_by_range():
    # blocks a chunk header apart are one range; a heap continued elsewhere is another (no madvise over the gap)
    step = memory.BLOCK + 16
    blocks = [1 << 30, (1 << 30) + step, (1 << 30) + 2 * step, 1 << 40]
    assert memory._runs(list(reversed(blocks))) == [(1 << 30, (1 << 30) + 2 * step + memory.BLOCK), (1 << 40, (1 << 40) + memory.BLOCK)]
