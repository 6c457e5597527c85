"""Admission: which chunks a read brings into the cache, and when (what *leaves* the cache is
eviction, the store's business).

An admission policy sees each miss (`on_miss`, the chunks one read completed,
together: a 1 MiB read is sixteen chunks, one call) and each write (`written`);
it admits through a small `AdmissionTarget` (admit these chunks if still
current; read these again for admission) and looks images up on the
backing: it never sees the cache's read path. A new policy is a class here.

`Inclusive` admits every chunk a guest reads, at once: for hosts without
ballooning, and for comparison.

`SecondChance` is the exclusive mode of the hypervisor-cache research: a
chunk a guest reads is *not* stored (the guest holds it in its own page
cache; a second copy would waste host memory). Its location is remembered in
that guest's recently-read list, oldest first, and its bytes are kept for a
while in a bounded staging buffer. When the balloon monitor reports that the
guest gave up memory, the oldest entries of its list, up to the bytes its
page cache lost, are what it most likely evicted: those are admitted, from
the staging buffer when it still has them, else read again from the backing
in the background (never on the read path).

Exact second chance (issue 12), for a guest whose memory fusecache can read
(`fusecache.guestmem`; QEMU's RAM found by the balloon monitor): every reply
served to the guest (hits and misses) is recorded in that guest's index of
served pages; a scan of its RAM tells which served pages it no longer holds:
those it evicted, whatever made it (its balloon, or its own memory pressure).
Their chunks are admitted, from staging, else read again in the background.
A chunk is the unit of a hit, so a chunk with any evicted page is admitted
whole (its other pages cost at most 60 KiB, deduplicated, and the re-read of
the evicted one is then a hit). Served pages a scan finds still resident
need no host copy: chunks the guest holds whole are handed to the store as
"evict first".
Scans run at once when the balloon moves, and in the background within a CPU
budget (`--guest-scan-cpu`). Balloon estimates are then not used for that
guest. A guest whose memory cannot be read (no permission, encrypted memory,
shared-memory RAM, `--no-guest-scan`) keeps the estimate below; stats say
which mode each guest is in. Privacy: guest memory is read only to
fingerprint it; nothing read is kept or logged (`fusecache.guestmem.scan`).

Estimated second chance, for the other guests:
Which guest read a chunk: each guest's open images (from QMP `query-block`
or the libvirt domain XML) are resolved to backing inodes; a read of an
image counts for every guest that has it open (a shared base image is in
the lists of all its guests, and admitted when any of them shrinks).
Reads of images no guest has open are neither listed nor staged (`wants`):
no shrink could admit them; `fusecache admit` admits a range explicitly.

The estimate is robust against a guest that lies: a guest controls both its
balloon's `actual` and its `stat-disk-caches`. What the page cache held
before the balloon moved is the guest's last report *plus what it read
through the mount since* (its statistics lag its reads); how much it gave up
is capped by the monitor (`balloon.Shrink`) by what the host can check (its
RAM size), never taken from `actual` alone. Each chunk read is
taken at most once, so a guest can make the host re-read at most what it
read itself, and its admissions are charged to its own share of the cache
(`fusecache.store.eviction.Shares`): they evict its own chunks first once it
is over its share, never another guest's below theirs. Each guest has at
most one admission job queued: a flood of shrinks from one guest cannot
crowd out another's.

Bookkeeping: one entry per 64 KiB chunk read, 179 bytes measured
(tests/unit/test_admission.py::test_bookkeeping_bytes_per_gib_of_reads), so 2.8 MiB
per GiB of guest reads; a guest's list is bounded by its memory (it cannot
have evicted more than it held).
"""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import numpy as np
import trio

from fusecache.backing import OffLoop
from fusecache.geometry import PAGES_PER_CHUNK
from fusecache.guestmem import GuestMemoryScanner, GuestRam, Locations, Reason, ScanResult, ServedPages, Unscannable
from fusecache.inodes import OpenFile
from fusecache.stats import AdmissionStats, GuestAdmission

if TYPE_CHECKING:
    from fusecache.balloon import GuestState, Shrink

log = logging.getLogger(__name__)

HOST = "(host)"
DEFAULT_RECENT_LIMIT = 4 << 30  # bytes of reads remembered for a guest whose memory size is not known yet
CHECKPOINT_EVERY = 0.25  # seconds between marks of a guest's read total (for "read since its last report")
# Marks kept: 8.5 minutes of continuous reading, ~220 KB at most per guest. A shrink's baseline report is
# seconds old (polled every second, a shrink reported within PENDING_MAX); an older one counts every read.
CHECKPOINTS = 2048
Key = tuple[int, int, int]  # (ino, gen, chunk)
Piece = tuple[int, bytes | memoryview]  # (chunk, its bytes)
SCAN_EVERY = 1.0  # seconds at least between background scans of one guest (the CPU budget may make it longer)


class AdmissionTarget(Protocol):
    """Where admitted chunks go (`fusecache.files.Files`): the never-stale checks happen there."""

    async def admit_current(self, key: Key, data: bytes, wait: bool = False, owner: str | None = None) -> bool:
        """Admit a chunk read earlier unless its file changed since; with `wait`, wait out a busy writer.

        owner: the guest it is admitted for (its share of the cache pays for it); None for the host.
        """
        ...

    async def read_for_admission(self, path: str, keys: list[Key]) -> list[tuple[Key, bytes]]:
        """Read chunks of one file again from the backing; those that changed meanwhile are left out."""
        ...

    def holds(self, key: Key) -> bool:
        """Whether the store holds this chunk now (or is about to)."""
        ...

    def evict_first(self, keys: list[Key]) -> None:
        """Hint the store: a guest holds these chunks itself."""
        ...


class Admission(Protocol):
    name: str
    # True: `on_miss` admits every piece offered without looking at it, so an offer the writer could not take
    # need not be built (the fetcher counts its chunks as refused instead); False: it sees every miss, admitting
    # or not (second chance keeps its recently-read lists from them)
    passes_misses_through: bool

    def wants(self, ino: int) -> bool:
        """Whether chunks read from this file now are worth offering (`on_miss`): asked once per request, so cheap."""
        ...

    def on_miss(self, f: OpenFile, gen: int, pieces: list[Piece]) -> list[Piece]:
        """Chunks were read from the backing, (chunk, bytes) each: those to admit now."""
        ...

    def served(self, f: OpenFile, gen: int, offset: int, data: bytes | memoryview) -> None:
        """A reply went to the guest (a hit or a miss): `data`, at byte `offset` of generation `gen`."""
        ...

    def written(self, ino: int, chunks: range) -> None:
        """These chunks of `ino` were just written: staged copies are stale."""
        ...

    def stats(self) -> AdmissionStats: ...

    async def run(self) -> None: ...


class Inclusive:
    """Admit every chunk read."""

    name = "inclusive"
    passes_misses_through = True

    def wants(self, ino: int) -> bool:
        return True

    def on_miss(self, f: OpenFile, gen: int, pieces: list[Piece]) -> list[Piece]:
        return pieces

    def served(self, f: OpenFile, gen: int, offset: int, data: bytes | memoryview) -> None:
        pass

    def written(self, ino: int, chunks: range) -> None:
        pass

    def stats(self) -> AdmissionStats:
        return AdmissionStats(self.name)

    async def run(self) -> None:
        pass


@dataclasses.dataclass
class GuestReads:
    """One guest's recently-read chunks, oldest first, and what its shrinks admitted."""

    recent: collections.OrderedDict[Key, int] = dataclasses.field(default_factory=collections.OrderedDict)
    recent_bytes: int = 0
    limit: int = DEFAULT_RECENT_LIMIT
    shrinks: int = 0
    evicted_estimate: int = 0
    admitted_chunks: int = 0
    admitted_bytes: int = 0
    from_staging: int = 0
    from_backing: int = 0
    by_reference: int = 0  # evicted chunks a peer already held: left there, one hop away, not stored twice
    aged_out: int = 0  # bytes of reads the guest had dropped on its own before a shrink: not admitted
    mode: str = "estimate"  # how evictions are known: "scan" or "estimate" (stats.GuestAdmission)
    scan_off: str = ""  # why its memory is not scanned, when it is not
    scans: int = 0
    scan_cpu_s: float = 0.0
    scanned_bytes: int = 0
    evicted_pages: int = 0
    resident_pages: int = 0
    read_total: int = 0  # bytes the guest read through the mount (misses: it did not hold them)
    # (time.monotonic(), read_total) every CHECKPOINT_EVERY while it reads: what it read since a given time
    marks: collections.deque[tuple[float, int]] = dataclasses.field(default_factory=lambda: collections.deque(maxlen=CHECKPOINTS))

    def add(self, key: Key, nbytes: int, now: float | None = None) -> None:
        self.add_many([(key, nbytes)], now)

    def add_many(self, reads: list[tuple[Key, int]], now: float | None = None) -> None:
        """Chunks read together, (key, bytes) each, oldest first."""
        now = time.monotonic() if now is None else now
        if not self.marks or now - self.marks[-1][0] >= CHECKPOINT_EVERY:
            self.marks.append((now, self.read_total))
        recent = self.recent
        for key, nbytes in reads:
            self.read_total += nbytes
            if key in recent:
                recent.move_to_end(key)  # read again: now the newest
                continue
            recent[key] = nbytes
            self.recent_bytes += nbytes
        while self.recent_bytes > self.limit:
            _, n = recent.popitem(last=False)
            self.recent_bytes -= n

    def read_since(self, when: float) -> int:
        """Bytes read since `when` (time.monotonic()), rounded up to the mark before it: never an undercount."""
        for t, total in reversed(self.marks):
            if t <= when:
                return self.read_total - total
        return self.read_total  # older than every mark kept (or no reads): all of them

    def forget_older_than_newest(self, nbytes: int) -> int:
        """Drop entries beyond the newest `nbytes`: the guest's page cache cannot hold them any more."""
        dropped = 0
        while self.recent and self.recent_bytes > nbytes:
            _, n = self.recent.popitem(last=False)
            self.recent_bytes -= n
            dropped += n
        return dropped

    def take_oldest(self, nbytes: int) -> list[Key]:
        taken: list[Key] = []
        got = 0
        while self.recent and got < nbytes:
            key, n = self.recent.popitem(last=False)
            self.recent_bytes -= n
            got += n
            taken.append(key)
        return taken


class StagingBuffer:
    """Bytes of recently read chunks, bounded, least recently staged dropped first."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._data: collections.OrderedDict[Key, bytes] = collections.OrderedDict()

    def put(self, key: Key, data: bytes) -> None:
        if self.capacity <= 0:
            return
        old = self._data.pop(key, None)
        if old is not None:
            self.used -= len(old)
        self._data[key] = data
        self.used += len(data)
        while self.used > self.capacity:
            _, dropped = self._data.popitem(last=False)
            self.used -= len(dropped)

    def put_many(self, reads: list[tuple[Key, int]], pieces: list[Piece]) -> None:
        """`put` for chunks read together: (key, bytes) in `reads`, their bytes in `pieces` (chunk, bytes)."""
        if self.capacity <= 0:
            return
        data = self._data
        for (key, n), (_, piece) in zip(reads, pieces, strict=True):
            old = data.pop(key, None)
            if old is not None:
                self.used -= len(old)
            data[key] = piece
            self.used += n
        while self.used > self.capacity:
            _, dropped = data.popitem(last=False)
            self.used -= len(dropped)

    def pop(self, key: Key) -> bytes | None:
        data = self._data.pop(key, None)
        if data is not None:
            self.used -= len(data)
        return data

    def discard_chunks(self, ino: int, chunks: range) -> None:
        for key in [k for k in self._data if k[0] == ino and k[2] in chunks]:
            self.pop(key)

    def __len__(self) -> int:
        return len(self._data)


@dataclasses.dataclass
class GuestScan:
    """A guest whose memory is scanned: where its RAM is, what it was served, and what wakes its next scan."""

    ram: GuestRam
    served: ServedPages
    wake: trio.Event = dataclasses.field(default_factory=trio.Event)
    cancel: trio.CancelScope = dataclasses.field(default_factory=trio.CancelScope)


def chunk_keys(locs: Locations, whole: bool = False) -> list[Key]:
    """The distinct (ino, gen, chunk) of a set of page locations (numpy: a scan may name hundreds of thousands).

    With `whole`, only chunks all of whose pages are in the set.
    """
    if len(locs) == 0:
        return []
    table, counts = np.unique(
        np.stack([locs.ino, locs.gen, locs.page // np.uint64(PAGES_PER_CHUNK)], axis=1), axis=0, return_counts=True
    )
    if whole:
        table = table[counts >= PAGES_PER_CHUNK]
    return [(int(i), int(g), int(c)) for i, g, c in table.tolist()]


def _malloc_trim() -> None:
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc


class SecondChance:
    """Admit what a guest evicts when its balloon inflates (see the module docstring)."""

    name = "second-chance"
    passes_misses_through = False

    def __init__(
        self,
        mountpoint: str,
        target: AdmissionTarget,
        backing: OffLoop,
        *,
        staging_bytes: int,
        peer_holds: Callable[[Key], bool] | None = None,
        scanner: GuestMemoryScanner | None = None,
    ) -> None:
        self.mountpoint = os.path.abspath(mountpoint)
        self._target = target
        self._backing = backing
        self.staging = StagingBuffer(staging_bytes)
        self.guests: dict[str, GuestReads] = collections.defaultdict(GuestReads)
        self._guests_of: dict[int, set[str]] = {}  # backing ino -> guests with it open
        self._paths: dict[int, str] = {}  # backing ino -> a path to reopen it by
        # One message per guest with work queued (`_queued`): one guest's shrinks cannot crowd out another's.
        self._send, self._receive = trio.open_memory_channel[str](256)
        self._queued: dict[str, list[Key]] = {}
        self._images_changed = trio.Event()
        self._guest_images: dict[str, list[str]] = {}
        # (ino, gen, chunk) -> True when a peer already holds that chunk: admitted "by reference", not stored
        self.peer_holds = peer_holds
        # Guests whose memory is scanned (exact second chance); None: scanning is off (--no-guest-scan).
        self.scanner = scanner
        self.scans: dict[str, GuestScan] = {}
        self._nursery: trio.Nursery | None = None

    # ---- the read path (inline, on the loop) ---------------------------------
    def wants(self, ino: int) -> bool:
        """Only reads of a guest's images: no shrink admits anyone else's (the guest-less reads were a list no
        balloon ever emptied, and their staged bytes were never read; offering them cost a cold 1 MiB stream
        a fifth of the loop's CPU: bench/misscost.py, 0.81x without)."""
        return ino in self._guests_of

    def on_miss(self, f: OpenFile, gen: int, pieces: list[Piece]) -> list[Piece]:
        ino = f.ino
        guests = self._guests_of.get(ino)
        if not guests:
            return []  # (the fetcher asks `wants` first: it does not offer these)
        self._paths[ino] = f.path
        reads = [((ino, gen, c), len(data)) for c, data in pieces]
        now = time.monotonic()
        for guest in guests:
            self.guests[guest].add_many(reads, now)
        self.staging.put_many(reads, pieces)
        return []

    def served(self, f: OpenFile, gen: int, offset: int, data: bytes | memoryview) -> None:
        if not self.scans:
            return
        for guest in self._guests_of.get(f.ino, ()):
            sc = self.scans.get(guest)
            if sc is not None:
                sc.served.record(f.ino, gen, offset, data)

    def written(self, ino: int, chunks: range) -> None:
        self.staging.discard_chunks(ino, chunks)

    # ---- from the balloon monitor (on the loop, must not block) ----------------
    def on_guests(self, guests: dict[str, GuestState]) -> None:
        self._guest_images = {name: list(g.images) for name, g in guests.items()}
        for name, g in guests.items():
            reads = self.guests[name]
            if g.actual:
                reads.limit = max(g.actual, 64 << 20)
            if isinstance(g.ram, GuestRam) and self.scanner is not None:
                sc = self.scans.get(name)
                if sc is None or sc.ram != g.ram:
                    if sc is not None:
                        sc.cancel.cancel()
                    self.scans[name] = GuestScan(g.ram, ServedPages.for_ram(g.ram.size))
                    reads.mode = "scan"
                    if self._nursery is not None:
                        self._nursery.start_soon(self._scan_guest, name, self.scans[name])
            elif name not in self.scans:
                reads.mode = "estimate"
                reads.scan_off = str(g.ram) if isinstance(g.ram, Unscannable) else "scanning is off (--no-guest-scan)"
        for name in [n for n in self.scans if n not in guests]:
            self.scans.pop(name).cancel.cancel()  # the guest is gone: so is its index
        self._images_changed.set()

    def on_balloon(self, guest: str) -> None:
        """The guest's balloon moved: scan its memory now (what it evicts shows within seconds)."""
        sc = self.scans.get(guest)
        if sc is not None:
            sc.wake.set()

    def on_shrink(self, shrink: Shrink) -> None:
        reads = self.guests[shrink.guest]
        reads.shrinks += 1
        reads.evicted_estimate += shrink.evicted_estimate
        sc = self.scans.get(shrink.guest)
        if sc is not None:
            sc.wake.set()  # its scans know what it evicted: the estimate is not used
            return
        if shrink.cache_before is not None:
            # What the guest evicted comes from what it still held: at most its page cache just before
            # the balloon moved, i.e. the newest reads. Older ones it had already dropped on its own.
            # "Just before" is its last report plus what it read since: the report predates its latest reads.
            before = shrink.cache_before
            if shrink.cache_before_at is not None:
                before += reads.read_since(shrink.cache_before_at)
            reads.aged_out += reads.forget_older_than_newest(before)
        keys = reads.take_oldest(shrink.evicted_estimate)
        log.info(
            "guest %s gave %d MiB to its balloon, ~%d MiB of page cache: admitting its %d oldest reads",
            shrink.guest, shrink.balloon_bytes >> 20, shrink.evicted_estimate >> 20, len(keys),
        )
        self._enqueue(shrink.guest, keys)

    def _enqueue(self, guest: str, keys: list[Key]) -> None:
        """Queue chunks a guest evicted for admission (the background task admits them)."""
        if not keys:
            return
        queued = self._queued.get(guest)
        if queued is not None:
            queued += keys  # its job is still waiting: it takes these too
            return
        try:
            self._send.send_nowait(guest)
        except trio.WouldBlock:
            log.warning("admission queue full: guest %s's evicted chunks are not admitted", guest)
            return
        self._queued[guest] = keys

    # ---- background work --------------------------------------------------------
    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._resolve_images)
            for name, sc in self.scans.items():
                nursery.start_soon(self._scan_guest, name, sc)
            async for guest in self._receive:
                await self._admit(guest, self._queued.pop(guest, []))

    async def _scan_guest(self, name: str, sc: GuestScan) -> None:
        """Scan one guest's memory until it goes: at once when its balloon moves, else within the CPU budget."""
        assert self.scanner is not None
        reads = self.guests[name]
        with sc.cancel:
            while True:
                with trio.move_on_after(SCAN_EVERY):
                    await sc.wake.wait()
                urgent = sc.wake.is_set()
                sc.wake = trio.Event()
                result = await self.scanner.scan(sc.ram, sc.served, urgent=urgent)
                if isinstance(result, Unscannable):
                    if result.reason is Reason.STOPPED:
                        continue
                    log.warning("guest %s: cannot scan its memory any more (%s): balloon estimates from now on", name, result)
                    reads.mode, reads.scan_off = "estimate", str(result)
                    if self.scans.get(name) is sc:
                        del self.scans[name]
                    return
                await self._scanned(name, reads, result)

    async def _scanned(self, guest: str, reads: GuestReads, result: ScanResult) -> None:
        reads.scans += 1
        reads.scan_cpu_s += result.cpu_s
        reads.scanned_bytes += result.ram_pages * 4096
        reads.evicted_pages += len(result.evicted)
        reads.resident_pages = len(result.resident) + result.young
        # Only chunks the guest holds whole: a chunk with a page it evicted (now or before) needs its host copy.
        resident = chunk_keys(result.resident, whole=True)
        if resident:
            self._target.evict_first(resident)
        evicted = [k for k in chunk_keys(result.evicted) if not self._target.holds(k)]
        if evicted:
            log.info("guest %s evicted %d pages (%d chunks not held): admitting them", guest, len(result.evicted), len(evicted))
            self._enqueue(guest, evicted)

    async def _admit(self, guest: str, keys: list[Key]) -> None:
        try:
            await self._admit_keys(guest, keys)
        finally:
            # 64 KiB staging buffers come from malloc's heap: give what was freed back to the system
            await trio.to_thread.run_sync(_malloc_trim)

    async def _admit_keys(self, guest: str, keys: list[Key]) -> None:
        target = self._target
        reads = self.guests[guest]
        refetch: dict[int, list[Key]] = collections.defaultdict(list)
        for key in keys:
            data = self.staging.pop(key)
            if self.peer_holds is not None and self.peer_holds(key):
                reads.by_reference += 1
                continue
            if data is None:
                refetch[key[0]].append(key)
                continue
            if await target.admit_current(key, data, wait=True, owner=guest):
                reads.from_staging += 1
                self._count(reads, len(data))
        for ino, ks in refetch.items():
            path = self._paths.get(ino)
            if path is None:
                continue
            for key, data in await target.read_for_admission(path, ks):
                if await target.admit_current(key, data, wait=True, owner=guest):
                    reads.from_backing += 1
                    self._count(reads, len(data))

    @staticmethod
    def _count(reads: GuestReads, nbytes: int) -> None:
        reads.admitted_chunks += 1
        reads.admitted_bytes += nbytes

    async def _resolve_images(self) -> None:
        """Keep `_guests_of` (backing ino -> guests) current as guests come and go."""
        while True:
            await self._images_changed.wait()
            self._images_changed = trio.Event()
            owners: dict[int, set[str]] = collections.defaultdict(set)
            for guest, images in self._guest_images.items():
                for image in images:
                    rel = self._relative(image)
                    if rel is None:
                        continue
                    try:
                        attr = await self._backing.lstat(rel)
                    except OSError as exc:
                        log.debug("guest %s image %s: %s", guest, image, exc.strerror)
                        continue
                    owners[attr.ino].add(guest)
                    self._paths.setdefault(attr.ino, rel)
            self._guests_of = dict(owners)
            log.info("guests and their images: %s", {g: sorted(i) for g, i in self._guest_images.items()})

    def _relative(self, image: str) -> str | None:
        """The image's path inside the backing, if it is opened through this mount."""
        path = os.path.abspath(image)
        if path.startswith(self.mountpoint + os.sep):
            return path[len(self.mountpoint) + 1 :]
        return None

    def _served_pages(self, guest: str) -> int:
        sc = self.scans.get(guest)
        return len(sc.served) if sc is not None else 0

    def stats(self) -> AdmissionStats:
        return AdmissionStats(
            mode=self.name,
            staging_bytes=self.staging.used,
            staging_capacity=self.staging.capacity,
            staged_chunks=len(self.staging),
            guests={
                name: GuestAdmission(
                    recent_bytes=r.recent_bytes,
                    recent_chunks=len(r.recent),
                    recent_limit=r.limit,
                    shrinks=r.shrinks,
                    evicted_estimate=r.evicted_estimate,
                    admitted_chunks=r.admitted_chunks,
                    admitted_bytes=r.admitted_bytes,
                    from_staging=r.from_staging,
                    from_backing=r.from_backing,
                    by_reference=r.by_reference,
                    aged_out=r.aged_out,
                    mode=r.mode,
                    scan_off=r.scan_off,
                    scans=r.scans,
                    scan_cpu_s=r.scan_cpu_s,
                    scanned_bytes=r.scanned_bytes,
                    served_pages=self._served_pages(name),
                    evicted_pages=r.evicted_pages,
                    resident_pages=r.resident_pages,
                )
                for name, r in sorted(self.guests.items())
            },
        )
