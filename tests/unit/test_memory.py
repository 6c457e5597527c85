"""The memory reserve (fusecache/memory.py): after it, bytes a cache keeps alive reuse touched pages.

Counted in page faults (the process's minor faults), not time: 1 MiB of fresh
memory written once is 256 faults; reusing touched heap pages is none.
"""

from __future__ import annotations

import resource

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
