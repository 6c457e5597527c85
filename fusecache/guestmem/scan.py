"""Scanning a guest's RAM for the pages fusecache served it: which are still resident, which the guest evicted.

Owns: `scan` (one pass, blocking, CPU-bound: run it in a worker thread) and
`GuestMemoryScanner` (the async side: trio.to_thread with a limiter, and a
CPU budget shared by every guest). A pass reads the two fingerprint words of
every 4 KiB page of guest RAM (16 bytes per page through process_vm_readv,
IOV_MAX pieces per call), drops pages whose words are both zero (free and
ballooned memory: no evidence), matches the rest against the served pages'
sorted keys with numpy, and confirms each candidate by reading the whole page
and comparing its digest (the index's digest function). A served page whose content is in RAM is
resident; one whose content is not is evicted. When several served locations
hold the same content and RAM holds fewer copies than there are locations,
all of them are reported evicted: which copy went is unknowable, and
admitting the content again costs the store only a location (it dedups).
Each evicted page is reported once (forgotten by the index); pages served
within the grace period are not judged (counted as resident).

Privacy: the words and pages read live in buffers of one pass and are
dropped with it; only keys derived from them are compared, and nothing read
is logged or kept.
"""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import trio

from ..geometry import PAGE_SIZE
from .locate import GuestRam, Reason, Unscannable, same_process, still_mapped
from .procmem import IOV_MAX, ProcMemError, read_scattered
from .served import DIGEST_DTYPE, Locations, ServedPages, Snapshot, fingerprint_keys

BLOCK_PAGES = 1 << 15  # pages of guest RAM per block of the word pass (128 MiB of RAM, 512 KiB of words); a stop is checked per block
DEFAULT_CPU_FRACTION = 0.05  # of one core, for all guests' scans together


@dataclass
class ScanResult:
    """What one pass found. `resident` and `evicted` partition the judged served pages."""

    resident: Locations
    evicted: Locations
    young: int  # served within the grace period: not judged, to be taken as resident
    no_evidence: int  # served pages never indexed (both fingerprint words zero), since the index was made
    ram_pages: int  # 4 KiB pages of guest RAM read
    zero_word_pages: int  # of those, pages whose two words are both zero (no evidence)
    candidates: int  # RAM pages whose key matched a served page's
    confirmed: int  # of those, pages whose full digest matched
    wall_s: float
    cpu_s: float  # this thread's CPU time (user + system)
    timings: dict[str, float] = field(default_factory=dict)  # wall seconds by phase: snapshot, words, match, confirm, settle


def _failure(ram: GuestRam, err: ProcMemError) -> Unscannable:
    if err.errno == errno.ESRCH:
        return Unscannable(Reason.PROCESS_GONE, f"process {ram.pid}")
    if err.errno in (errno.EPERM, errno.EACCES):
        return Unscannable(Reason.NO_PERMISSION, f"process {ram.pid}")
    # EFAULT: part of the range is not mapped any more; say why if the process or its mapping went.
    return still_mapped(ram) or Unscannable(Reason.MAPPING_NOT_FOUND, f"process {ram.pid}: {err.strerror}")


class _Stopped(Exception):
    pass


def _read_words(ram: GuestRam, offsets: tuple[int, int], should_stop: Callable[[], bool] | None) -> np.ndarray:
    """The two fingerprint words of every page of ram: a (pages, 2) uint64 array.

    Adjacent words are one 16-byte piece per page: the kernel's cost is per piece (it pins the page for each).
    """
    pages = ram.size // PAGE_SIZE
    words = np.empty((pages, 2), dtype=np.uint64)
    lo, hi = sorted(offsets)
    pieces = [(lo, 16)] if hi == lo + 8 else [(lo, 8), (hi, 8)]
    block = min(pages, BLOCK_PAGES)
    remote = np.empty((block, len(pieces), 2), dtype=np.uint64)
    remote[:, :, 1] = [length for _, length in pieces]
    pattern = np.arange(block, dtype=np.uint64)[:, None] * np.uint64(PAGE_SIZE) + np.array([off for off, _ in pieces], dtype=np.uint64)
    for first in range(0, pages, BLOCK_PAGES):
        if should_stop is not None and should_stop():
            raise _Stopped
        n = min(BLOCK_PAGES, pages - first)
        remote[:n, :, 0] = pattern[:n] + np.uint64(ram.address + first * PAGE_SIZE)
        read_scattered(ram.pid, remote[:n].reshape(-1, 2), words[first : first + n])
    # Read in address order; the index's key takes them in its own order.
    return words if tuple(offsets) == (lo, hi) else words[:, ::-1]


def _page_digests(ram: GuestRam, pages: np.ndarray, digest: Callable[[memoryview], bytes]) -> np.ndarray:
    """digest() of each listed page of ram, read whole (as DIGEST_DTYPE)."""
    if len(pages) == 0:
        return np.zeros(0, dtype=DIGEST_DTYPE)
    out: list[bytes] = []
    buf = np.empty((min(len(pages), IOV_MAX), PAGE_SIZE), dtype=np.uint8)
    remote = np.empty((min(len(pages), IOV_MAX), 2), dtype=np.uint64)
    remote[:, 1] = PAGE_SIZE
    view = memoryview(buf).cast("B")
    for first in range(0, len(pages), IOV_MAX):
        batch = pages[first : first + IOV_MAX]
        n = len(batch)
        remote[:n, 0] = batch.astype(np.uint64) * np.uint64(PAGE_SIZE) + np.uint64(ram.address)
        read_scattered(ram.pid, remote[:n], buf[:n])
        out.extend(digest(view[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]) for i in range(n))
    buf.fill(0)  # guest content does not outlive the pass, even in freed memory
    return np.array(out, dtype=DIGEST_DTYPE)


def _classify(snap: Snapshot, cand_digests: np.ndarray) -> tuple[np.ndarray, int]:
    """A bool per snapshot entry: resident (its content is in RAM at least as many times as locations hold it);
    and how many candidate RAM pages were confirmed (their whole-page digest is a served page's).

    Counted per content, never per (RAM page, location) pair: a page held many times and served from many
    places costs no more than its two counts.
    """
    contents, content_of, locations = np.unique(snap.digests, return_inverse=True, return_counts=True)
    resident = np.zeros(len(snap.digests), dtype=bool)
    if len(contents) == 0 or len(cand_digests) == 0:
        return resident, 0
    at = np.minimum(np.searchsorted(contents, cand_digests), len(contents) - 1)
    confirmed = contents[at] == cand_digests
    copies = np.bincount(at[confirmed], minlength=len(contents))
    resident = (copies >= locations)[content_of]
    return resident, int(np.count_nonzero(confirmed))


def scan(ram: GuestRam, served: ServedPages, should_stop: Callable[[], bool] | None = None) -> ScanResult | Unscannable:
    """One pass over the guest's RAM against `served` (blocking: call it from a worker thread).

    Returns why not (an Unscannable) if the process or its mapping went away
    or may not be read; the index is then left as it was. `should_stop` is
    polled between blocks: when it says so the pass ends early with
    Reason.STOPPED, changing nothing.
    """
    t0, c0 = time.monotonic(), time.thread_time()
    timings: dict[str, float] = {}
    gone = still_mapped(ram)
    if gone is not None:
        return gone
    snap = served.snapshot()
    t1 = time.monotonic()
    timings["snapshot"] = t1 - t0
    try:
        words = _read_words(ram, served.words, should_stop)
        timings["words"] = time.monotonic() - t1
        t1 = time.monotonic()
        w0, w1 = words[:, 0], words[:, 1]
        evidence = np.flatnonzero((w0 | w1) != 0)
        ram_keys = fingerprint_keys(w0[evidence], w1[evidence])
        del words, w0, w1
        if len(snap.keys):
            pos = np.minimum(np.searchsorted(snap.keys, ram_keys), len(snap.keys) - 1)
            hit = snap.keys[pos] == ram_keys
        else:
            hit = np.zeros(len(ram_keys), dtype=bool)
        cand_pages = evidence[hit]
        t2 = time.monotonic()
        timings["match"] = t2 - t1
        if should_stop is not None and should_stop():
            raise _Stopped
        cand_digests = _page_digests(ram, cand_pages, served.digest)
        timings["confirm"] = time.monotonic() - t2
    except ProcMemError as e:
        return _failure(ram, e)
    except _Stopped:
        return Unscannable(Reason.STOPPED, f"process {ram.pid}")
    # Everything read must have come from the guest's process: a PID reused mid-pass spoils the pass.
    gone = same_process(ram)
    if gone is not None:
        return gone
    if should_stop is not None and should_stop():
        return Unscannable(Reason.STOPPED, f"process {ram.pid}")
    t3 = time.monotonic()
    resident, confirmed = _classify(snap, cand_digests)
    evicted_idx = np.flatnonzero(~resident)
    served.settle(snap, evicted_idx)
    timings["settle"] = time.monotonic() - t3
    return ScanResult(
        resident=served.locations(snap, np.flatnonzero(resident)),
        evicted=served.locations(snap, evicted_idx),
        young=snap.young,
        no_evidence=snap.no_evidence,
        ram_pages=ram.size // PAGE_SIZE,
        zero_word_pages=ram.size // PAGE_SIZE - len(evidence),
        candidates=len(cand_pages),
        confirmed=confirmed,
        wall_s=time.monotonic() - t0,
        cpu_s=time.thread_time() - c0,
        timings=timings,
    )


class ScanBudget:
    """Keeps all guests' scans within `cpu_fraction` of one core: after a pass that used c CPU seconds, the next waits c / fraction."""

    def __init__(self, cpu_fraction: float = DEFAULT_CPU_FRACTION) -> None:
        if not 0 < cpu_fraction <= 1:
            raise ValueError("cpu_fraction must be in (0, 1]")
        self.cpu_fraction = cpu_fraction
        self.next_start = -float("inf")  # trio clock

    async def wait_turn(self) -> None:
        await trio.sleep_until(self.next_start)

    def charge(self, started: float, cpu_s: float) -> None:
        self.next_start = max(self.next_start, started) + cpu_s / self.cpu_fraction


class GuestMemoryScanner:
    """Runs scans off the trio loop: one worker thread at a time by default (the limiter), within a CPU budget."""

    def __init__(self, cpu_fraction: float = DEFAULT_CPU_FRACTION, limiter: trio.CapacityLimiter | None = None) -> None:
        self.budget = ScanBudget(cpu_fraction)
        self.limiter = limiter or trio.CapacityLimiter(1)

    async def scan(self, ram: GuestRam, served: ServedPages, urgent: bool = False) -> ScanResult | Unscannable:
        """One pass, when the budget allows; a cancelled caller stops the pass at its next block, changing nothing.

        An urgent pass (a balloon just moved) starts without waiting its turn; its CPU is still charged, so
        the background passes after it wait the longer.
        """
        if not urgent:
            await self.budget.wait_turn()
        stop = threading.Event()
        started = trio.current_time()
        try:
            result = await trio.to_thread.run_sync(scan, ram, served, stop.is_set, limiter=self.limiter, abandon_on_cancel=True)
        finally:
            stop.set()
        if isinstance(result, ScanResult):
            self.budget.charge(started, result.cpu_s)
        return result
