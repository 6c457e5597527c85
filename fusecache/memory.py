"""The daemon's memory reserve: heap pages touched once, before reads need them, for the bytes a cache keeps alive.

First touch of fresh memory runs at ~0.43 GiB/s on these machines
(MEASURED.md): a 1 MiB read whose bytes are kept (by the staging buffer, the
fetcher's buffer, the admission queue) costs ~2.4 ms against ~0.5 ms for one
whose bytes are freed and reused, so a cold pass through a cache cost 2.8x a
`--no-cache` pass (bench/amplification.py). glibc's malloc is asked to keep
one arena (reads are allocated in worker threads), to serve reads up to
32 MiB from the heap rather than fresh mmaps, and not to hand freed memory
back by itself; then `touch` allocates the reserve, writes it once and frees
it, in a worker thread (ctypes calls release the GIL), so later allocations
reuse touched pages. The reserve is what those buffers hold at most once
full: the daemon's memory after a first pass is the same, it is reached
earlier. The reserve is then moved into 2 MiB pages (transparent huge
pages, where the kernel offers them): a cold 1 MiB stream copies every byte
into and out of those buffers, and with 4 KiB pages each copy missed the
TLB every page (issue 13: the default mount's CPU per cold MiB 1.65x
`--no-cache`'s before, 1.09x after; bench/coldpath.py). `SecondChance`
still gives freed memory back on purpose after a shrink (malloc_trim). Not
glibc: nothing is done.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
MMAP_THRESHOLD = 32 << 20  # a read is at most 1 MiB (FUSE's largest request); background reads at most 1 MiB too
BLOCK = 1 << 20
HUGE_PAGE = 2 << 20  # x86-64's transparent huge page
MADV_HUGEPAGE = 14
MADV_COLLAPSE = 25


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt  # noqa: B018  # glibc only
    except (OSError, AttributeError):
        return None
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def keep_freed_memory() -> bool:
    """Set malloc up to reuse what it frees (call before worker threads start); False when malloc is not glibc's."""
    libc = _libc()
    if libc is None:
        return False
    ok = all(libc.mallopt(param, value) == 1 for param, value in (
        (M_ARENA_MAX, 1), (M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, 1 << 30),
    ))  # fmt: skip
    if not ok:
        log.debug("malloc did not take the reserve's settings")
    return ok


def touch(nbytes: int) -> int:
    """Allocate `nbytes` of heap in 1 MiB blocks, write each once, put them in huge pages, free them all (in a
    worker thread). Returns bytes touched."""
    libc = _libc()
    if libc is None or nbytes <= 0:
        return 0
    blocks = []
    try:
        for _ in range(-(-nbytes // BLOCK)):
            block = libc.malloc(BLOCK)
            if not block:
                break
            blocks.append(block)
        for block in blocks:
            libc.memset(block, 0, BLOCK)
        for start, end in _runs(blocks):
            _huge_pages(libc, start, end)
    finally:
        for block in reversed(blocks):
            libc.free(block)
    return len(blocks) * BLOCK


def _runs(blocks: list[int]) -> list[tuple[int, int]]:
    """The address ranges the blocks lie in: consecutive ones (the heap's, a chunk header apart) make one range;
    a gap of a huge page or more (a heap continued elsewhere) starts another."""
    runs: list[tuple[int, int]] = []
    for block in sorted(blocks):
        if runs and block - runs[-1][1] < HUGE_PAGE:
            runs[-1] = (runs[-1][0], block + BLOCK)
        else:
            runs.append((block, block + BLOCK))
    return runs


def huge_page_bytes() -> int:
    """Bytes of this process's anonymous memory in transparent huge pages (/proc/self/smaps_rollup), 0 if unknown."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1]) << 10
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _huge_pages(libc: ctypes.CDLL, start: int, end: int) -> None:
    """Back the whole huge pages within [start, end), touched already, by 2 MiB pages: MADV_HUGEPAGE (where
    transparent huge pages are "madvise", Debian's default) and MADV_COLLAPSE (Linux 6.1: now, not when
    khugepaged gets to it). The copies into and out of the buffers the reserve holds then miss the TLB far less
    (a cold 1 MiB stream: issue 13). Where the kernel says no (huge pages off, an older kernel), a debug line."""
    lo = (start + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1)
    hi = end & ~(HUGE_PAGE - 1)
    if hi <= lo:
        return
    if libc.madvise(lo, hi - lo, MADV_HUGEPAGE) != 0 or libc.madvise(lo, hi - lo, MADV_COLLAPSE) != 0:
        log.debug("the memory reserve stays in 4 KiB pages (madvise refused: transparent huge pages off, or a kernel before 6.1)")
