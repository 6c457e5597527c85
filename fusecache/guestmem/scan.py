"""Scanning a guest's RAM for the pages fusecache served it: which are still resident, which the guest evicted.

Owns: `scan` (one pass, blocking, CPU-bound: run it in a worker thread) and
`GuestMemoryScanner` (the async side: trio.to_thread with a limiter, and a
CPU budget shared by every guest). A pass reads the two fingerprint words of
every 4 KiB page of guest RAM (16 bytes per page through process_vm_readv,
IOV_MAX pieces per call), drops pages whose words are both zero (free and
ballooned memory: no evidence), matches the rest against the served pages'
sorted keys with numpy, and confirms each candidate by reading the whole page
and comparing the caller's digest. A served page whose content is in RAM is
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
from .served import DIGEST_BYTES, FINGERPRINT_WORDS, Locations, ServedPages, Snapshot, fingerprint_keys

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
    timings: dict[str, float] = field(default_factory=dict)  # wall seconds by phase: words, match, confirm, settle


def _failure(ram: GuestRam, err: ProcMemError) -> Unscannable:
    if err.errno == errno.ESRCH:
        return Unscannable(Reason.PROCESS_GONE, f"process {ram.pid}")
    if err.errno in (errno.EPERM, errno.EACCES):
        return Unscannable(Reason.NO_PERMISSION, f"process {ram.pid}")
    # EFAULT: part of the range is not mapped any more; say why if the process or its mapping went.
    return still_mapped(ram) or Unscannable(Reason.MAPPING_NOT_FOUND, f"process {ram.pid}: {err.strerror}")


class _Stopped(Exception):
    pass


def _read_words(ram: GuestRam, should_stop: Callable[[], bool] | None) -> np.ndarray:
    """The two fingerprint words of every page of ram: a (pages, 2) uint64 array."""
    pages = ram.size // PAGE_SIZE
    words = np.empty((pages, 2), dtype=np.uint64)
    offsets = np.array(FINGERPRINT_WORDS, dtype=np.uint64)
    remote = np.empty((min(pages, BLOCK_PAGES), 2, 2), dtype=np.uint64)
    remote[:, :, 1] = 8
    page_offsets = np.arange(min(pages, BLOCK_PAGES), dtype=np.uint64) * np.uint64(PAGE_SIZE)
    pattern = page_offsets[:, None] + offsets[None, :]
    for first in range(0, pages, BLOCK_PAGES):
        if should_stop is not None and should_stop():
            raise _Stopped
        n = min(BLOCK_PAGES, pages - first)
        remote[:n, :, 0] = pattern[:n] + np.uint64(ram.address + first * PAGE_SIZE)
        read_scattered(ram.pid, remote[:n].reshape(-1, 2), words[first : first + n])
    return words


def _page_digests(ram: GuestRam, pages: np.ndarray, digest: Callable[[memoryview], bytes]) -> np.ndarray:
    """The first DIGEST_BYTES of digest() of each listed page of ram, read whole."""
    out = np.empty((len(pages), DIGEST_BYTES), dtype=np.uint8)
    if len(pages) == 0:
        return out
    buf = np.empty((min(len(pages), IOV_MAX), PAGE_SIZE), dtype=np.uint8)
    remote = np.empty((min(len(pages), IOV_MAX), 2), dtype=np.uint64)
    remote[:, 1] = PAGE_SIZE
    view = memoryview(buf).cast("B")
    for first in range(0, len(pages), IOV_MAX):
        batch = pages[first : first + IOV_MAX]
        n = len(batch)
        remote[:n, 0] = batch.astype(np.uint64) * np.uint64(PAGE_SIZE) + np.uint64(ram.address)
        read_scattered(ram.pid, remote[:n], buf[:n])
        for i in range(n):
            out[first + i] = np.frombuffer(digest(view[i * PAGE_SIZE : (i + 1) * PAGE_SIZE])[:DIGEST_BYTES], dtype=np.uint8)
    buf.fill(0)  # guest content does not outlive the pass, even in freed memory
    return out


def _classify(snap: Snapshot, cand_keys: np.ndarray, cand_digests: np.ndarray) -> tuple[np.ndarray, int]:
    """A bool per snapshot entry: resident (its content is in RAM at least as many times as locations hold it);
    and how many candidate RAM pages were confirmed (their whole-page digest matched a served page's)."""
    left = np.searchsorted(snap.keys, cand_keys, side="left")
    right = np.searchsorted(snap.keys, cand_keys, side="right")
    counts = right - left
    ram_idx = np.repeat(np.arange(len(cand_keys)), counts)
    starts = np.repeat(left - np.cumsum(counts) + counts, counts)
    entry_idx = starts + np.arange(len(ram_idx))
    same = np.all(cand_digests[ram_idx] == snap.digests[entry_idx], axis=1)
    ram_idx, entry_idx = ram_idx[same], entry_idx[same]
    resident = np.zeros(len(snap.keys), dtype=bool)
    if len(ram_idx) == 0:
        return resident, 0
    # Per content: locations served with it (pairs per RAM copy) against copies in RAM (pairs per location).
    locations_per_copy = np.bincount(ram_idx, minlength=len(cand_keys))
    copies_per_location = np.bincount(entry_idx, minlength=len(snap.keys))
    enough = copies_per_location[entry_idx] >= locations_per_copy[ram_idx]
    resident[entry_idx[enough]] = True
    return resident, int(np.count_nonzero(locations_per_copy))


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
    no_evidence = served.no_evidence
    try:
        words = _read_words(ram, should_stop)
        t1 = time.monotonic()
        timings["words"] = t1 - t0
        w0, w1 = words[:, 0], words[:, 1]
        evidence = np.flatnonzero((w0 | w1) != 0)
        ram_keys = fingerprint_keys(w0[evidence], w1[evidence])
        del words, w0, w1
        if len(snap.keys):
            pos = np.minimum(np.searchsorted(snap.keys, ram_keys), len(snap.keys) - 1)
            hit = snap.keys[pos] == ram_keys
        else:
            hit = np.zeros(len(ram_keys), dtype=bool)
        cand_pages, cand_keys = evidence[hit], ram_keys[hit]
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
    resident, confirmed = _classify(snap, cand_keys, cand_digests)
    evicted_idx = np.flatnonzero(~resident)
    served.settle(snap, evicted_idx)
    timings["settle"] = time.monotonic() - t3
    return ScanResult(
        resident=served.locations(snap, np.flatnonzero(resident)),
        evicted=served.locations(snap, evicted_idx),
        young=snap.young,
        no_evidence=no_evidence,
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

    async def scan(self, ram: GuestRam, served: ServedPages) -> ScanResult | Unscannable:
        """One pass, when the budget allows; a cancelled caller stops the pass at its next block, changing nothing."""
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
