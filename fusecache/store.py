"""The local store: content-deduplicated 4 KiB pages served as 64 KiB chunks.

The store owns one cache directory: an LMDB environment (`meta.lmdb/`) that
holds every piece of metadata, and `pages.slab`, a fixed-size file of
capacity/4096 slots of 4096 bytes that holds page contents. A chunk (an
aligned `chunk_size` piece of one version of one file) is a list of pages; a
page is stored once however many chunks, files and images hold it (the
dedup), and a page of zeros (a hole) is not stored at all. It knows nothing
of files beyond their inode, generation and version, nor of FUSE or peers.

Threads and transactions
------------------------
- Exactly one thread writes: `apply` (the cache's writer thread). Each call
  is one write transaction, or two when it admits: the first releases (drops,
  forgets, generation bumps, eviction) and commits, the second admits. A slot
  freed in a transaction is reused only by a later one, so a crash between a
  page write and the commit that references it never leaves a committed page
  entry pointing at overwritten data.
- Page data is written with `os.pwritev` into free slots *before* the commit
  that references them; LMDB is opened without fsync (a SIGKILLed process
  loses nothing committed, the OS page cache has it; a host crash wipes).
  An admission batch allocates its new pages in runs of adjacent slots
  (lowest free extent first), so a chunk's pages usually sit in one run and
  are written, and later read, with one call. Admissions are applied
  ADMIT_SLICE chunks at a time (one getmulti, one allocation, pwritev per
  run, one putmulti per table): the writer's Python stretches stay short and
  the LMDB and pwritev calls between them release the GIL to the loop.
- Readers (`read_chunk`, `read_chunks`, `read_span`, `read_page`, ... on the
  trio loop) take an LMDB read transaction (MVCC: they never wait for the
  writer) and copy bytes out of a read-only mmap of the slab. The writer may
  reuse a slot a reader's older view still points at, so every byte served
  is copied first and then checked against a digest: the chunk digest when
  the whole chunk is read (one hash), else the digest of each page
  overlapping the range read (pages outside it are neither read nor
  checked). A mismatch is a miss (`verify_failures`), never wrong data.
- Recency is kept in memory by an eviction policy (`S3FifoPolicy` by
  default, `LruPolicy`; bench/eviction.py compares them); the loop thread
  touches it on every hit under a short lock, the writer asks it for victims.
  It is rebuilt at open from the order saved by a clean close, else from the
  loc keys. Eviction runs when an admission needs more slots than are free,
  or more loc entries than `max_chunks` (holes cost no slots, but metadata);
  a chunk whose pages are mostly shared with other chunks is spared once, one
  whose pages a peer holds (`set_peer_holds`) loses its second chance.

Opening
-------
A directory that is not a fusecache cache, a corrupt meta.lmdb or slab, an
older or newer format, or other page/chunk sizes raise QuietError naming the
fix; `reset` deletes only the store's own two entries. A host crash (boot id
changed without a clean close) wipes the cache with a warning: contents are
re-derivable. A capacity change grows the slab, or shrinks it by dropping the
chunks that hold slots past the new end. An flock on pages.slab keeps a
second process out.

On-disk format (version FORMAT_VERSION; all integers big-endian)
----------------------------------------------------------------
- `files`: ino u64 -> gen u64, size i64, mtime_ns i64, ctime_ns i64, change i64.
- `loc`: ino u64, gen u64, chunk_no u32 -> a header of length u32, flags u8
  and the chunk digest (xxh3-128 of the chunk's `length` bytes, holes as
  zeros: 16 bytes); then a presence bitmap of ceil(pages/8) bytes (page i is
  bit i%8 of byte i//8; set = stored, clear = a hole); then the slot (u32) of
  each stored page in page order; then the xxh3-128 digest (16 bytes) of each
  stored page in the same order. pages = ceil(length/4096); a partial last
  page is hashed and stored padded with zeros (the chunk digest covers only
  `length` bytes). Flag bit 0 (RUN): every page is stored, in consecutive
  slots starting at the first slot, so the chunk is one slice of the slab.
- `pages`: digest (16 bytes) -> slot u32, refcount u32.
- `free`: first slot u32 -> count u32: the free extents (runs of free slots),
  never adjacent (freeing merges neighbours), none past the slab's end.
- `meta`: b"format" -> JSON {"program": "fusecache", "format": N,
  "page_size": 4096, "chunk_size": C}; b"boot_id" -> ASCII boot id of the
  host that last opened it; b"clean" -> b"\\x01" after `close`, b"\\x00" while
  open; b"slots" -> u32 slot count of pages.slab; b"free_slots" -> u32 total
  of the free extents; b"logical_bytes" -> u64 non-hole bytes held by loc
  entries; b"order" (only after a clean close) -> the loc keys in eviction
  order, victim first.
- `pages.slab`: slot s holds a page at byte offset s * 4096.
"""

from __future__ import annotations

import collections
import dataclasses
import fcntl
import json
import logging
import mmap
import os
import shutil
import struct
import threading
from collections.abc import Callable, Iterable, Iterator, Set
from typing import Any

import lmdb
import xxhash

from fusecache.errors import QuietError
from fusecache.stats import StoreStats

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
PAGE_SIZE = 4096
PROGRAM = "fusecache"
ZERO_PAGE = bytes(PAGE_SIZE)
# Stands for a hole in `chunk_digests`; `read_page` answers it with zeros.
ZERO_DIGEST = xxhash.xxh3_128_digest(ZERO_PAGE)
# Loc entries (chunks) per chunk of capacity: holes and dedup let a cache
# hold more chunks than its slots alone would bound, but metadata must stay
# bounded too.
CHUNKS_PER_CAPACITY_CHUNK = 8

_FILE = struct.Struct(">Q4q")
_INO = struct.Struct(">Q")
_LOC_KEY = struct.Struct(">QQI")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_PAGE = struct.Struct(">II")
_EXTENT = struct.Struct(">I")  # a free extent's count (its key is the first slot, _U32)
_LOC_HEAD = struct.Struct(">IB16s")  # length, flags, chunk digest
_RUN = 1  # loc flag: every page stored, in consecutive slots
_IOV_MAX = 1024
# Admissions per stretch of Python work in `apply`; the LMDB and pwritev calls between stretches release the GIL.
ADMIT_SLICE = 64
_SHIFT = PAGE_SIZE.bit_length() - 1
# Files a cache directory may hold besides ours (a dedicated filesystem's lost+found).
_TOLERATED = {"lost+found"}

Key = bytes  # a packed loc key: _LOC_KEY.pack(ino, gen, chunk)


@dataclasses.dataclass
class WriteBatch:
    """One `Store.apply` call's worth of changes, applied in one go by the writer thread.

    Order: forget_files, files, drop, then admit. An admission for a generation
    other than the file's recorded one is a read of a superseded version: skipped.
    """

    admit: list[tuple[int, int, int, bytes]] = dataclasses.field(default_factory=list)
    drop: list[tuple[int, int, int]] = dataclasses.field(default_factory=list)
    files: list[tuple[int, int, tuple[int, int, int, int]]] = dataclasses.field(default_factory=list)
    forget_files: list[int] = dataclasses.field(default_factory=list)


# --- eviction policies ----------------------------------------------------
#
# A policy orders loc keys for eviction. `touch` runs on the loop thread on
# every hit, everything else on the writer thread; one lock makes them safe
# and is held only for a few dict operations. `evict_one(weigh)` removes and
# returns a victim; weigh(key) is -1 when a peer holds the chunk's pages (cheap
# to lose), +1 when its pages are mostly shared with other chunks (valuable:
# spared once), else 0.


class LruPolicy:
    """Least recently used first."""

    name = "lru"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._order: collections.OrderedDict[Key, None] = collections.OrderedDict()
        self._spared: set[Key] = set()

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, key: Key) -> bool:
        return key in self._order

    def touch(self, key: Key) -> None:
        with self._lock:
            if key in self._order:
                self._order.move_to_end(key)

    def insert(self, key: Key) -> None:
        with self._lock:
            self._order[key] = None
            self._order.move_to_end(key)

    def remove(self, key: Key) -> None:
        with self._lock:
            self._order.pop(key, None)
            self._spared.discard(key)

    def evict_one(self, weigh: Callable[[Key], int]) -> Key | None:
        while True:
            with self._lock:
                if not self._order:
                    return None
                key, _ = self._order.popitem(last=False)
            if key not in self._spared and weigh(key) > 0:
                with self._lock:
                    self._spared.add(key)
                    self._order[key] = None
                continue
            self._spared.discard(key)
            return key

    def order(self) -> list[Key]:
        """Keys, victim first (persisted across a clean restart)."""
        with self._lock:
            return list(self._order)


class S3FifoPolicy:
    """S3-FIFO (Yang et al., SOSP 2023): scan-resistant with FIFO queues only.

    New chunks enter a small FIFO (10%); those hit while there move to the
    main FIFO, the rest leave at once and are remembered in a ghost FIFO, so a
    chunk that comes back soon goes straight to main. A large sequential scan
    thus washes through the small queue without flushing the hot set. Main is
    a CLOCK: a chunk hit since its last pass gets another lap.
    """

    name = "s3fifo"
    SMALL_FRACTION = 0.1
    MAX_FREQ = 3

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._small: collections.OrderedDict[Key, None] = collections.OrderedDict()
        self._main: collections.OrderedDict[Key, None] = collections.OrderedDict()
        self._ghost: collections.OrderedDict[Key, None] = collections.OrderedDict()
        self._freq: dict[Key, int] = {}
        self._spared: set[Key] = set()

    def __len__(self) -> int:
        return len(self._freq)

    def __contains__(self, key: Key) -> bool:
        return key in self._freq

    def touch(self, key: Key) -> None:
        with self._lock:
            f = self._freq.get(key)
            if f is not None and f < self.MAX_FREQ:
                self._freq[key] = f + 1

    def insert(self, key: Key) -> None:
        with self._lock:
            if key in self._freq:
                if self._freq[key] < self.MAX_FREQ:
                    self._freq[key] += 1
                return
            self._freq[key] = 0
            if key in self._ghost:  # evicted from small recently: it is not one-hit
                del self._ghost[key]
                self._main[key] = None
            else:
                self._small[key] = None

    def load(self, keys: Iterable[Key]) -> None:
        """Start with `keys` (victim first) in the main queue: what survived a restart is not new."""
        with self._lock:
            for key in keys:
                self._freq[key] = 0
                self._main[key] = None

    def remove(self, key: Key) -> None:
        with self._lock:
            if self._freq.pop(key, None) is not None:
                self._small.pop(key, None)
                self._main.pop(key, None)
            self._spared.discard(key)

    def evict_one(self, weigh: Callable[[Key], int]) -> Key | None:
        while True:
            with self._lock:
                if not self._freq:
                    return None
                from_small = bool(self._small) and (len(self._small) >= self.SMALL_FRACTION * len(self._freq) or not self._main)
                if from_small:
                    key, _ = self._small.popitem(last=False)
                    if self._freq[key] > 0:
                        self._freq[key] = 0
                        self._main[key] = None
                        continue
                    del self._freq[key]
                    self._ghost[key] = None
                    while len(self._ghost) > max(len(self._main), 1):
                        self._ghost.popitem(last=False)
                    self._spared.discard(key)
                    return key
                key, _ = self._main.popitem(last=False)
                freq = self._freq[key]
            w = weigh(key)
            with self._lock:
                if w >= 0 and freq > 0:
                    self._freq[key] = freq - 1
                    self._main[key] = None
                    continue
                if w > 0 and key not in self._spared:
                    self._spared.add(key)
                    self._main[key] = None
                    continue
                del self._freq[key]
                self._spared.discard(key)
                return key

    def order(self) -> list[Key]:
        """Keys, victim first (persisted across a clean restart; all reload into main)."""
        with self._lock:
            return [*self._small, *self._main]


POLICIES: dict[str, type[LruPolicy] | type[S3FifoPolicy]] = {"s3fifo": S3FifoPolicy, "lru": LruPolicy}


_REFS: dict[int, struct.Struct] = {}


def _refs_struct(n: int) -> struct.Struct:
    """n slots then n digests: a loc value's arrays, unpacked in one call."""
    st = _REFS.get(n)
    if st is None:
        st = _REFS[n] = struct.Struct(f">{n}I" + "16s" * n)
    return st


def _decode_loc(value: bytes | memoryview) -> tuple[int, list[tuple[int, bytes, int]]]:
    """A loc value -> (chunk length, [(page index, digest, slot) for each stored page])."""
    length, _, _ = _LOC_HEAD.unpack_from(value)
    npages = (length + PAGE_SIZE - 1) >> _SHIFT
    nbytes = (npages + 7) >> 3
    pos = _LOC_HEAD.size + nbytes
    present = int.from_bytes(value[_LOC_HEAD.size : pos], "little")
    n = present.bit_count()
    arrays = _refs_struct(n).unpack_from(value, pos)
    pages = range(npages) if n == npages else [i for i in range(npages) if present >> i & 1]
    return length, list(zip(pages, arrays[n:], arrays[:n], strict=True))


def _encode_loc(length: int, chunk_digest: bytes, present: int, slots: list[int], digests: list[bytes]) -> bytes:
    """present: bit i set for each stored page i; slots and digests: of the stored pages, in page order."""
    npages = (length + PAGE_SIZE - 1) >> _SHIFT
    n = len(slots)
    run = n == npages and n > 0 and slots[-1] - slots[0] == n - 1 and slots == list(range(slots[0], slots[0] + n))
    return (
        _LOC_HEAD.pack(length, _RUN if run else 0, chunk_digest)
        + present.to_bytes((npages + 7) >> 3, "little")
        + _refs_struct(n).pack(*slots, *digests)
    )


def _held_bytes(length: int, present: int) -> int:
    """Non-hole bytes of a chunk (logical bytes for the dedup ratio)."""
    if not length:
        return 0
    last = (length - 1) >> _SHIFT
    held = present.bit_count() << _SHIFT
    return held - ((last + 1) << _SHIFT) + length if present >> last & 1 else held


def _runs(slots: Iterable[int]) -> list[tuple[int, int]]:
    """Ascending slots -> (first, count) of each run of consecutive ones."""
    runs: list[tuple[int, int]] = []
    start = end = -1
    for slot in slots:
        if slot == end:
            end += 1
            continue
        if end >= 0:
            runs.append((start, end - start))
        start, end = slot, slot + 1
    if end >= 0:
        runs.append((start, end - start))
    return runs


def _boot_id() -> str:
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


def _boot_time() -> int:
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("btime "):
                return int(line.split()[1])
    return 0


class _Admission:
    """One chunk to admit, hashed before the write transaction starts."""

    __slots__ = ("chunk_digest", "data", "key", "length", "pages", "present")

    def __init__(self, key: Key, data: bytes) -> None:
        self.key = key
        self.length = len(data)
        self.chunk_digest = xxhash.xxh3_128_digest(data)
        npages = (self.length + PAGE_SIZE - 1) >> _SHIFT
        if self.length != npages << _SHIFT:
            data = bytes(data) + bytes((npages << _SHIFT) - self.length)
        self.data = view = memoryview(data)
        # (page index, digest) of the stored pages; holes are left out.
        digest = xxhash.xxh3_128_digest
        pages = [(i, digest(view[i << _SHIFT : (i + 1) << _SHIFT])) for i in range(npages)]
        self.pages = [p for p in pages if p[1] != ZERO_DIGEST]
        if len(self.pages) == npages:
            self.present = (1 << npages) - 1
        else:
            self.present = 0
            for i, _ in self.pages:
                self.present |= 1 << i


class Store:
    """Pages and chunks in one cache directory; see the module docstring for the rules."""

    page_size = PAGE_SIZE

    def __init__(self, cache_dir: str, capacity: int, *, chunk_size: int = 65536, reset: bool = False, policy: str = "s3fifo") -> None:
        self.cache_dir = os.path.abspath(cache_dir)
        self.chunk_size = chunk_size
        if chunk_size <= 0 or chunk_size % PAGE_SIZE:
            raise QuietError(f"cache dir {self.cache_dir}: chunk size {chunk_size} is not a multiple of {PAGE_SIZE}; pick one that is")
        if capacity < chunk_size:
            raise QuietError(
                f"cache dir {self.cache_dir}: cache size {capacity} bytes is smaller than one chunk ({chunk_size} bytes); "
                "pass a larger --cache-size"
            )
        self._nslots = capacity // PAGE_SIZE
        if self._nslots > 0xFFFFFFFF:
            raise QuietError(
                f"cache dir {self.cache_dir}: cache size {capacity} bytes is over the 16 TiB limit; pass a smaller --cache-size"
            )
        self.max_chunks = CHUNKS_PER_CAPACITY_CHUNK * (capacity // chunk_size)
        if policy not in POLICIES:
            raise QuietError(f"unknown eviction policy {policy!r}; choose one of {', '.join(POLICIES)}")
        self._policy = POLICIES[policy]()
        self._peer_holds: Callable[[bytes], bool] = lambda digest: False
        # Bumped from the loop and the writer thread without a lock: a lost count is harmless.
        self._counters = dict.fromkeys(
            ("hits", "misses", "admitted_chunks", "skipped_chunks", "evicted_chunks", "dropped_chunks", "verify_failures", "healed_pages"),
            0,
        )
        self._env: lmdb.Environment | None = None
        self._slab_fd = -1
        self._mmap: mmap.mmap | None = None
        self._slab: memoryview | None = None
        self._lmdb_path = os.path.join(self.cache_dir, "meta.lmdb")
        self._slab_path = os.path.join(self.cache_dir, "pages.slab")
        try:
            os.makedirs(self.cache_dir, exist_ok=True)
        except OSError as e:
            raise QuietError(f"cache dir {self.cache_dir}: cannot create it: {e.strerror}; pick a writable --cache-dir")
        try:
            if reset:
                if os.path.isfile(self._slab_path):
                    self._lock_dir()  # never wipe a cache another process is using
                self._wipe()
            self._open()
        except BaseException:
            self._close_files()
            raise

    # --- opening -----------------------------------------------------------

    def _fail(self, what: str, fix: str = "pass --reset-cache to start empty") -> QuietError:
        return QuietError(f"cache dir {self.cache_dir}: {what}; {fix}")

    def _wipe(self) -> None:
        """Remove the cache's own files, and nothing else in the directory."""
        self._close_files()
        if os.path.isdir(self._lmdb_path) and not os.path.islink(self._lmdb_path):
            shutil.rmtree(self._lmdb_path)
        if os.path.isfile(self._slab_path):
            os.unlink(self._slab_path)

    def _open(self) -> None:
        names = set(os.listdir(self.cache_dir))
        if "meta.lmdb" not in names or not os.path.isdir(self._lmdb_path):
            foreign = sorted(names - {"pages.slab"} - _TOLERATED)
            if foreign:
                raise self._fail(
                    f"holds files that are not a fusecache cache ({', '.join(foreign[:3])})", "pick an empty or new --cache-dir"
                )
            fresh = True
        else:
            fresh = False
        self._lock_dir()
        try:
            self._env = self._open_env(fresh)
        except lmdb.Error as e:
            if not fresh and self._written_before_boot():
                log.warning("cache dir %s: metadata unreadable after a host restart (%s); starting empty", self.cache_dir, e)
                self._wipe()
                return self._open()
            raise self._fail(f"meta.lmdb is corrupt ({e})")
        try:
            with self._env.begin() as txn:
                meta = {bytes(k): bytes(v) for k, v in txn.cursor(db=self._meta)}
            if fresh:
                meta = self._init_meta()
            else:
                self._check_format(meta.get(b"format"))
                if meta.get(b"boot_id", b"").decode(errors="replace") != _boot_id() and meta.get(b"clean") != b"\x01":
                    log.warning("cache dir %s: the host crashed while the cache was open; starting empty", self.cache_dir)
                    self._wipe()
                    return self._open()
            self._open_slab(meta, fresh)
            self._load_policy(meta)
        except (lmdb.Error, KeyError, struct.error) as e:  # damage below a valid header: a broken page or missing key
            raise self._fail(f"meta.lmdb is corrupt ({e!r})")

    def _lock_dir(self) -> None:
        """Own the directory: two processes writing one slab would corrupt it."""
        self._slab_fd = os.open(self._slab_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._slab_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise self._fail("is in use by another fusecache process", "stop it or pick another --cache-dir")

    def _open_env(self, fresh: bool) -> lmdb.Environment:
        # Metadata per slot (pages + free entries) and per chunk (loc), doubled
        # for B-tree slack and copy-on-write; only address space, not disk.
        map_size = (64 << 20) + 2 * (self._nslots * 96 + self.max_chunks * (64 + self.chunk_size // PAGE_SIZE * 24))
        # sync=False: see the module docstring (a host crash wipes the cache).
        env = lmdb.open(self._lmdb_path, map_size=map_size, max_dbs=6, sync=False, metasync=False, readahead=False, max_readers=256)
        try:
            dbs = [env.open_db(name, create=fresh) for name in (b"meta", b"files", b"loc", b"pages", b"free")]
        except lmdb.NotFoundError:
            env.close()
            raise self._fail(
                "meta.lmdb is not a fusecache cache (named databases missing)", "pick another --cache-dir or pass --reset-cache"
            )
        except lmdb.Error:
            env.close()
            raise
        self._meta, self._files, self._loc, self._pages, self._free = dbs
        return env

    def _written_before_boot(self) -> bool:
        try:
            return os.stat(os.path.join(self._lmdb_path, "data.mdb")).st_mtime < _boot_time()
        except OSError:
            return False

    def _format_marker(self) -> bytes:
        return json.dumps({"program": PROGRAM, "format": FORMAT_VERSION, "page_size": PAGE_SIZE, "chunk_size": self.chunk_size}).encode()

    def _check_format(self, raw: bytes | None) -> None:
        try:
            marker = json.loads(raw) if raw is not None else None
        except ValueError:
            marker = None
        if not isinstance(marker, dict) or marker.get("program") != PROGRAM:
            raise self._fail("meta.lmdb is not a fusecache cache (no format marker)", "pick another --cache-dir or pass --reset-cache")
        version = marker.get("format")
        if version != FORMAT_VERSION:
            age = "an older" if isinstance(version, int) and version < FORMAT_VERSION else "a newer"
            raise self._fail(f"was written by {age} fusecache (format {version}, this one reads {FORMAT_VERSION})")
        if marker.get("page_size") != PAGE_SIZE:
            raise self._fail(f"uses {marker.get('page_size')}-byte pages, not {PAGE_SIZE}")
        if marker.get("chunk_size") != self.chunk_size:
            raise self._fail(
                f"uses {marker.get('chunk_size')}-byte chunks, not {self.chunk_size}",
                f"pass --reset-cache to start empty, or use chunk size {marker.get('chunk_size')}",
            )

    def _init_meta(self) -> dict[bytes, bytes]:
        meta = {b"format": self._format_marker(), b"slots": _U32.pack(0), b"free_slots": _U32.pack(0), b"logical_bytes": _U64.pack(0)}
        with self._env.begin(write=True, db=self._meta) as txn:
            for k, v in meta.items():
                txn.put(k, v)
        return meta

    def _open_slab(self, meta: dict[bytes, bytes], fresh: bool) -> None:
        assert self._env is not None
        (old_slots,) = _U32.unpack(meta[b"slots"])
        size = os.fstat(self._slab_fd).st_size
        if not fresh and size < old_slots * PAGE_SIZE:
            raise self._fail(f"pages.slab is truncated ({size} bytes, expected {old_slots * PAGE_SIZE})")
        if self._nslots > old_slots:
            # Grow the file before the metadata says it is larger (a crash in between is harmless).
            os.ftruncate(self._slab_fd, self._nslots * PAGE_SIZE)
        with self._env.begin(write=True) as txn:
            if self._nslots < old_slots:
                self._shrink(txn)
            elif self._nslots > old_slots:
                w = _WriteTxn(self, txn)
                w.free_run(old_slots, self._nslots - old_slots)
                w.finish()
            txn.put(b"slots", _U32.pack(self._nslots), db=self._meta)
            txn.put(b"boot_id", _boot_id().encode(), db=self._meta)
            txn.put(b"clean", b"\x00", db=self._meta)
        # The "not clean" mark must be durable before any unsynced write lands.
        self._env.sync(True)
        if size > self._nslots * PAGE_SIZE:
            os.ftruncate(self._slab_fd, self._nslots * PAGE_SIZE)
        self._mmap = mmap.mmap(self._slab_fd, self._nslots * PAGE_SIZE, prot=mmap.PROT_READ)
        self._slab = memoryview(self._mmap)

    def _shrink(self, txn: lmdb.Transaction) -> None:
        """Drop every chunk holding a slot past the new end, then forget those slots."""
        w = _WriteTxn(self, txn)
        doomed = [bytes(k) for k, v in txn.cursor(db=self._loc) if any(slot >= self._nslots for _, _, slot in _decode_loc(v)[1])]
        for key in doomed:
            w.remove_chunk(key)
        w.truncate()
        w.finish()
        self._counters["evicted_chunks"] += len(doomed)
        if doomed:
            log.info("cache dir %s: shrinking dropped %d chunks", self.cache_dir, len(doomed))

    def _load_policy(self, meta: dict[bytes, bytes]) -> None:
        """Rebuild eviction order: as persisted by a clean close, else in key order."""
        assert self._env is not None
        with self._env.begin(write=True) as txn:
            entries = txn.stat(self._loc)["entries"]
            order = meta.get(b"order", b"") if meta.get(b"clean") == b"\x01" else b""
            keys = [order[i : i + _LOC_KEY.size] for i in range(0, len(order), _LOC_KEY.size)]
            if len(keys) != entries:
                keys = [bytes(k) for k in txn.cursor(db=self._loc).iternext(values=False)]
            txn.delete(b"order", db=self._meta)
        policy = type(self._policy)()
        if isinstance(policy, S3FifoPolicy):
            policy.load(keys)
        else:
            for key in keys:
                policy.insert(key)
        self._policy = policy

    def _close_files(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None
        if self._slab is not None:
            self._slab.release()
            self._slab = None
        if self._mmap is not None:
            self._mmap.close()
            self._mmap = None
        if self._slab_fd >= 0:
            os.close(self._slab_fd)
            self._slab_fd = -1

    # --- reads (loop thread, lock-free) ----------------------------------

    def read_chunk(self, ino: int, gen: int, chunk: int, lo: int = 0, hi: int | None = None) -> bytes | None:
        """Bytes [lo, hi) of the chunk, clamped to its length (shorter than chunk_size at EOF), verified.

        None if the chunk is absent or a page overlapping [lo, hi) fails its check.
        Only those pages are read; the whole chunk is checked with one hash.
        """
        key = _LOC_KEY.pack(ino, gen, chunk)
        with self._env.begin(db=self._loc, buffers=True) as txn:
            data = self._read_chunk(txn, key, lo, hi)
        if data is None:
            self._counters["misses"] += 1
            return None
        self._counters["hits"] += 1
        self._policy.touch(key)
        return data

    def read_chunks(self, ino: int, gen: int, first: int, last: int, lo: int = 0, hi: int | None = None) -> list[bytes | None]:
        """`read_chunk` of chunks first..last under one read transaction: one request's chunks.

        lo is the offset of the request in chunk `first`, hi its end in chunk
        `last` (None: the chunk's end); the chunks between are read whole. One
        entry per chunk; after a chunk shorter than chunk_size (end of file)
        the entries are None, not looked up.
        """
        out: list[bytes | None] = []
        hits: list[Key] = []
        cs = self.chunk_size
        with self._env.begin(db=self._loc, buffers=True) as txn:
            for c in range(first, last + 1):
                key = _LOC_KEY.pack(ino, gen, c)
                data = self._read_chunk(txn, key, lo if c == first else 0, hi if c == last else None)
                out.append(data)
                if data is None:
                    continue
                hits.append(key)
                if len(data) < (hi if c == last and hi is not None else cs) - (lo if c == first else 0):
                    out.extend([None] * (last - c))  # end of file
                    break
        self._counters["hits"] += len(hits)
        self._counters["misses"] += len(out) - len(hits)
        for key in hits:
            self._policy.touch(key)
        return out

    def _read_chunk(self, txn: lmdb.Transaction, key: Key, lo: int = 0, hi: int | None = None) -> bytes | None:
        value = txn.get(key, db=self._loc)
        if value is None:
            return None
        length, flags, chunk_digest = _LOC_HEAD.unpack_from(value)
        if hi is None or hi > length:
            hi = length
        lo = max(lo, 0)
        if lo >= hi:
            return b""
        npages = (length + PAGE_SIZE - 1) >> _SHIFT
        pos = _LOC_HEAD.size + ((npages + 7) >> 3)
        mm = self._mmap
        whole = lo == 0 and hi == length
        if flags & _RUN:
            (first_slot,) = _U32.unpack_from(value, pos)
            if first_slot + npages > self._nslots:
                self._counters["verify_failures"] += 1
                return None
            base = first_slot << _SHIFT
            if whole:
                # Copy first, verify the copy: the writer may be reusing a slot right now.
                data = mm[base : base + length]
                if xxhash.xxh3_128_digest(data) != chunk_digest:
                    self._counters["verify_failures"] += 1
                    return None
                return data
            p0, p1 = lo >> _SHIFT, (hi - 1) >> _SHIFT
            data = mm[base + (p0 << _SHIFT) : base + ((p1 + 1) << _SHIFT)]
            dpos = pos + 4 * npages + 16 * p0
            digests = bytes(value[dpos : dpos + 16 * (p1 - p0 + 1)])
            view = memoryview(data)
            for j in range(p1 - p0 + 1):
                if xxhash.xxh3_128_digest(view[j << _SHIFT : (j + 1) << _SHIFT]) != digests[16 * j : 16 * j + 16]:
                    self._counters["verify_failures"] += 1
                    return None
        else:
            p0, p1 = (0, npages - 1) if whole else (lo >> _SHIFT, (hi - 1) >> _SHIFT)
            present = int.from_bytes(value[_LOC_HEAD.size : pos], "little")
            n = present.bit_count()
            arrays = _refs_struct(n).unpack_from(value, pos)
            k = (present & ((1 << p0) - 1)).bit_count()  # index of page p0's slot, if stored
            parts: list[bytes] = []
            checks: list[tuple[int, bytes]] = []
            start = end = -1
            nslots = self._nslots
            for i in range(p0, p1 + 1):
                if present >> i & 1:
                    slot = arrays[k]
                    if slot >= nslots:
                        self._counters["verify_failures"] += 1
                        return None
                    if not whole:
                        checks.append(((i - p0) << _SHIFT, arrays[n + k]))
                    k += 1
                    if slot == end:
                        end += 1
                        continue
                    if end >= 0:
                        parts.append(mm[start << _SHIFT : end << _SHIFT])
                    start, end = slot, slot + 1
                else:
                    if end >= 0:
                        parts.append(mm[start << _SHIFT : end << _SHIFT])
                        end = -1
                    parts.append(ZERO_PAGE)
            if end >= 0:
                parts.append(mm[start << _SHIFT : end << _SHIFT])
            data = parts[0] if len(parts) == 1 else b"".join(parts)
            if whole:
                if len(data) != length:
                    data = data[:length]
                if xxhash.xxh3_128_digest(data) != chunk_digest:
                    self._counters["verify_failures"] += 1
                    return None
                return data
            view = memoryview(data)
            for off, digest in checks:
                if xxhash.xxh3_128_digest(view[off : off + PAGE_SIZE]) != digest:
                    self._counters["verify_failures"] += 1
                    return None
        lo -= p0 << _SHIFT
        hi -= p0 << _SHIFT
        return data if lo == 0 and hi == len(data) else data[lo:hi]

    def read_span(self, ino: int, gen: int, first: int, last: int, lo: int = 0, hi: int | None = None) -> memoryview | None:
        """A whole request in one buffer, copied once: chunks first..last as `read_chunks` reads them, joined.

        Every chunk is copied straight into one buffer and verified there (the
        chunk digest for a whole chunk, page digests for the pages of a
        partial first or last one), so no second copy joins them. Returns a
        read-only memoryview (pyfuse3 replies from any buffer), shorter at end
        of file; None unless every chunk is a verified hit, and then counts
        no hits or misses: ask `read_chunks` for the per-chunk answer.
        """
        cs = self.chunk_size
        buf = bytearray((last - first + 1) * cs)  # zeros: holes are not copied
        view = memoryview(buf)
        slab, nslots = self._slab, self._nslots
        full_pages = cs >> _SHIFT
        run_at = _LOC_HEAD.size + ((full_pages + 7) >> 3)
        whole_from = first if lo <= 0 else first + 1  # chunks from here to whole_to are read whole
        whole_to = last if hi is None or hi >= cs else last - 1
        digest = xxhash.xxh3_128_digest
        pos = begin = 0
        keys = []
        with self._env.begin(db=self._loc, buffers=True) as txn:
            for c in range(first, last + 1):
                key = _LOC_KEY.pack(ino, gen, c)
                value = txn.get(key)
                if value is None:
                    return None
                length, flags, chunk_digest = _LOC_HEAD.unpack_from(value)
                if flags & _RUN and length == cs and whole_from <= c <= whole_to:
                    # The common case: a whole chunk, one run of slots: one copy, one hash.
                    (slot,) = _U32.unpack_from(value, run_at)
                    if slot + full_pages > nslots:
                        self._counters["verify_failures"] += 1
                        return None
                    view[pos : pos + cs] = slab[slot << _SHIFT : (slot << _SHIFT) + cs]
                    if digest(view[pos : pos + cs]) != chunk_digest:
                        self._counters["verify_failures"] += 1
                        return None
                    keys.append(key)
                    pos += cs
                    continue
                clo = lo if c == first else 0
                chi = length if c != last or hi is None or hi > length else hi
                if clo >= chi:
                    break  # the request starts at or past the end of the file
                keys.append(key)
                npages = (length + PAGE_SIZE - 1) >> _SHIFT
                whole = clo == 0 and chi == length
                p0, p1 = (0, npages - 1) if whole else (clo >> _SHIFT, (chi - 1) >> _SHIFT)
                if c == first:
                    begin = clo - (p0 << _SHIFT)
                head = _LOC_HEAD.size + ((npages + 7) >> 3)
                if flags & _RUN:
                    (slot,) = _U32.unpack_from(value, head)
                    if slot + npages > nslots:
                        self._counters["verify_failures"] += 1
                        return None
                    a = (slot + p0) << _SHIFT
                    n = length if whole else (p1 + 1 - p0) << _SHIFT
                    view[pos : pos + n] = slab[a : a + n]
                    checks = [] if whole else list(zip(range(p0, p1 + 1), range(p0, p1 + 1), strict=True))
                    digests_at = head + 4 * npages
                else:
                    present = int.from_bytes(value[_LOC_HEAD.size : head], "little")
                    count = present.bit_count()
                    arrays = _refs_struct(count).unpack_from(value, head)
                    k = (present & ((1 << p0) - 1)).bit_count()
                    checks = []
                    for i in range(p0, p1 + 1):
                        if present >> i & 1:
                            slot = arrays[k]
                            if slot >= nslots:
                                self._counters["verify_failures"] += 1
                                return None
                            at = pos + ((i - p0) << _SHIFT)
                            view[at : at + PAGE_SIZE] = slab[slot << _SHIFT : (slot + 1) << _SHIFT]
                            checks.append((i, k))
                            k += 1
                    digests_at = head + 4 * count
                # Verify the copy: the writer may be reusing a slot right now.
                if whole:
                    ok = xxhash.xxh3_128_digest(view[pos : pos + length]) == chunk_digest
                    pos += length
                else:
                    ok = True
                    for i, k in checks:
                        at = pos + ((i - p0) << _SHIFT)
                        d = digests_at + 16 * k
                        if xxhash.xxh3_128_digest(view[at : at + PAGE_SIZE]) != bytes(value[d : d + 16]):
                            ok = False
                            break
                    pos += chi - (p0 << _SHIFT)  # the next chunk's bytes follow this one's
                if not ok:
                    self._counters["verify_failures"] += 1
                    return None
                if length < cs:
                    break  # end of file
        self._counters["hits"] += len(keys)
        for key in keys:
            self._policy.touch(key)
        return view[begin:pos].toreadonly()

    def file_record(self, ino: int) -> tuple[int, tuple[int, int, int, int]] | None:
        """(gen, version) recorded for `ino`, or None."""
        with self._env.begin(db=self._files, buffers=True) as txn:
            value = txn.get(_INO.pack(ino))
            if value is None:
                return None
            gen, size, mtime_ns, ctime_ns, change = _FILE.unpack(value)
        return gen, (size, mtime_ns, ctime_ns, change)

    def chunk_digests(self, ino: int, gen: int, chunk: int) -> list[bytes] | None:
        """Digest of each page of a held chunk (ZERO_DIGEST for a hole), or None: what a peer asks for."""
        with self._env.begin(db=self._loc, buffers=True) as txn:
            value = txn.get(_LOC_KEY.pack(ino, gen, chunk))
            if value is None:
                return None
            length, refs = _decode_loc(value)
        digests = [ZERO_DIGEST] * ((length + PAGE_SIZE - 1) >> _SHIFT)
        for i, digest, _ in refs:
            digests[i] = digest
        return digests

    def read_page(self, digest: bytes) -> bytes | None:
        """One page (4096 bytes) by content hash, verified; None if not held."""
        if digest == ZERO_DIGEST:
            return ZERO_PAGE
        with self._env.begin(db=self._pages, buffers=True) as txn:
            value = txn.get(digest)
            if value is None:
                return None
            slot, _ = _PAGE.unpack(value)
        if slot >= self._nslots:
            self._counters["verify_failures"] += 1
            return None
        page = self._mmap[slot << _SHIFT : (slot + 1) << _SHIFT]
        if xxhash.xxh3_128_digest(page) != digest:
            self._counters["verify_failures"] += 1
            return None
        return page

    def _iter_keys(self, db: Any) -> Iterator[bytes]:
        """Every key of `db`, read in short transactions of 4096 keys: a long one would pin LMDB pages."""
        start = b""
        while True:
            with self._env.begin(db=db) as txn:
                cur = txn.cursor()
                if not cur.set_range(start):
                    return
                batch = []
                for key in cur.iternext(values=False):
                    batch.append(key)
                    if len(batch) == 4096:
                        break
            yield from batch
            if len(batch) < 4096:
                return
            start = batch[-1] + b"\x00"

    def iter_digests(self) -> Iterator[bytes]:
        """Every stored page's digest."""
        return self._iter_keys(self._pages)

    def read_location(self, ino: int, version: tuple[int, int, int, int], chunk: int) -> tuple[bytes, list[bytes]] | None:
        """For a peer: the chunk and its page digests, only if the held record of `ino` has exactly `version`."""
        rec = self.file_record(ino)
        if rec is None or rec[1] != version:
            return None
        gen = rec[0]
        data = self.read_chunk(ino, gen, chunk)
        digests = self.chunk_digests(ino, gen, chunk)
        if data is None or digests is None:
            return None
        return data, digests

    def iter_locations(self) -> Iterator[tuple[int, tuple[int, int, int, int], int]]:
        """(ino, version, chunk) of every held chunk of a file's current generation: the peers' location summary."""
        with self._env.begin(db=self._files) as txn:
            files = {_INO.unpack(k)[0]: _FILE.unpack(v) for k, v in txn.cursor().iternext()}
        for key in self._iter_keys(self._loc):
            ino, gen, chunk = _LOC_KEY.unpack(key)
            rec = files.get(ino)
            if rec is not None and rec[0] == gen and rec[1] >= 0:
                yield ino, tuple(rec[1:]), chunk

    def iter_files(self) -> list[int]:
        """The inode of every file with a record (for dropping the whole cache)."""
        with self._env.begin(db=self._files) as txn:
            return [_INO.unpack(k)[0] for k in txn.cursor().iternext(values=False)]

    def stats(self) -> StoreStats:
        with self._env.begin(buffers=True) as txn:
            chunks = txn.stat(self._loc)["entries"]
            (free,) = _U32.unpack(txn.get(b"free_slots", db=self._meta))
            (logical,) = _U64.unpack(txn.get(b"logical_bytes", db=self._meta))
        used = self._nslots - free
        return StoreStats(
            capacity=self._nslots * PAGE_SIZE,
            page_size=PAGE_SIZE,
            chunk_size=self.chunk_size,
            pages_used=used,
            bytes_stored=used * PAGE_SIZE,
            logical_bytes=logical,
            dedup_ratio=logical / (used * PAGE_SIZE) if used else 1.0,
            chunks=chunks,
            max_chunks=self.max_chunks,
            **self._counters,
        )

    # --- writes (one writer thread) --------------------------------------

    def set_peer_holds(self, holds: Callable[[bytes], bool]) -> None:
        """Tell eviction which pages a peer also holds (digest -> bool): those are cheaper to lose."""
        self._peer_holds = holds

    def apply(self, batch: WriteBatch, peer_holds: Callable[[bytes], bool] | None = None) -> None:
        """Apply one batch: releases and evictions commit first, then admissions (see module docstring).

        `peer_holds` (digest -> bool) tells eviction which pages a peer also holds: those are cheaper to lose.
        """
        if peer_holds is not None:
            self._peer_holds = peer_holds
        if any(len(data) > self.chunk_size for *_, data in batch.admit):
            raise ValueError(f"an admitted chunk is longer than the chunk size {self.chunk_size}")
        admissions = [_Admission(_LOC_KEY.pack(ino, gen, chunk), data) for ino, gen, chunk, data in batch.admit]
        try:
            with self._env.begin(write=True) as txn:
                w = _WriteTxn(self, txn)
                for ino in batch.forget_files:
                    w.forget_file(ino)
                for ino, gen, version in batch.files:
                    w.record_file(ino, gen, version)
                for ino, gen, chunk in batch.drop:
                    key = _LOC_KEY.pack(ino, gen, chunk)
                    if w.remove_chunk(key):
                        self._policy.remove(key)
                        self._counters["dropped_chunks"] += 1
                admissions = w.make_room(admissions)
                w.finish()
            if admissions:
                with self._env.begin(write=True) as txn:
                    w = _WriteTxn(self, txn)
                    w.admit(admissions)
                    w.finish()
        except BaseException:
            # The policy was changed in step with a transaction that did not commit.
            self._load_policy({})
            raise

    def close(self) -> None:
        """Make everything durable and mark a clean shutdown."""
        if self._env is None:
            return
        os.fsync(self._slab_fd)
        with self._env.begin(write=True) as txn:
            txn.put(b"order", b"".join(self._policy.order()), db=self._meta)
            txn.put(b"clean", b"\x01", db=self._meta)
        self._env.sync(True)
        self._close_files()


class _WriteTxn:
    """The writer's view of one write transaction: refcounts, slots and the policy kept in step."""

    def __init__(self, store: Store, txn: lmdb.Transaction) -> None:
        self.s = store
        self.txn = txn
        (self.free_count,) = _U32.unpack(txn.get(b"free_slots", db=store._meta))
        (self.logical,) = _U64.unpack(txn.get(b"logical_bytes", db=store._meta))
        # Freed here, reusable only after this transaction commits.
        self.freed: list[int] = []

    def finish(self) -> None:
        s, txn = self.s, self.txn
        for start, count in _runs(sorted(slot for slot in self.freed if slot < s._nslots)):
            self.free_run(start, count)
        self.freed = []
        txn.put(b"free_slots", _U32.pack(self.free_count), db=s._meta)
        txn.put(b"logical_bytes", _U64.pack(self.logical), db=s._meta)

    def free_run(self, start: int, count: int) -> None:
        """Add slots start..start+count-1 to the free extents, merged with adjacent ones."""
        txn, free = self.txn, self.s._free
        self.free_count += count
        after = txn.pop(_U32.pack(start + count), db=free)
        if after is not None:
            count += _EXTENT.unpack(after)[0]
        cur = txn.cursor(db=free)
        if (cur.set_range(_U32.pack(start)) and cur.prev()) or cur.last():
            (prev,) = _U32.unpack(cur.key())
            (prev_count,) = _EXTENT.unpack(cur.value())
            if prev < start and prev + prev_count == start:
                cur.put(cur.key(), _EXTENT.pack(prev_count + count))
                return
        txn.put(_U32.pack(start), _EXTENT.pack(count), db=free)

    def alloc(self, n: int) -> list[tuple[int, int]]:
        """Take n free slots, lowest extents first: (first, count) runs. The caller checked n <= free_count."""
        runs = []
        self.free_count -= n
        cur = self.txn.cursor(db=self.s._free)
        if n and not cur.first():
            raise AssertionError("free extents do not add up to free_slots")
        while n > 0:
            (start,) = _U32.unpack(cur.key())
            (count,) = _EXTENT.unpack(cur.value())
            cur.delete()
            if count > n:
                self.txn.put(_U32.pack(start + n), _EXTENT.pack(count - n), db=self.s._free)
                count = n
            runs.append((start, count))
            n -= count
            if n and not cur.key():
                raise AssertionError("free extents do not add up to free_slots")
        return runs

    def truncate(self) -> None:
        """Forget free extents past the slab's end (after a shrink)."""
        txn, free, end = self.txn, self.s._free, self.s._nslots
        cur = txn.cursor(db=free)
        if (cur.set_range(_U32.pack(end)) and cur.prev()) or cur.last():
            (start,) = _U32.unpack(cur.key())
            (count,) = _EXTENT.unpack(cur.value())
            if start < end < start + count:
                cur.put(cur.key(), _EXTENT.pack(end - start))
                self.free_count -= start + count - end
        if cur.set_range(_U32.pack(end)):
            while cur.key():
                self.free_count -= _EXTENT.unpack(cur.value())[0]
                cur.delete()

    def free_slots(self) -> int:
        """Slots usable by the next transaction."""
        return self.free_count + len(self.freed)

    def refcount(self, digest: bytes) -> int:
        value = self.txn.get(digest, db=self.s._pages)
        return 0 if value is None else _PAGE.unpack(value)[1]

    def release(self, value: bytes) -> list[bytes]:
        """Drop one reference to each page of a loc value; return the digests whose last reference went."""
        length, _, _ = _LOC_HEAD.unpack_from(value)
        npages = (length + PAGE_SIZE - 1) >> _SHIFT
        pos = _LOC_HEAD.size + ((npages + 7) >> 3)
        present = int.from_bytes(value[_LOC_HEAD.size : pos], "little")
        n = present.bit_count()
        digests = _refs_struct(n).unpack_from(value, pos)[n:]
        self.logical -= _held_bytes(length, present)
        gone = []
        txn, pages = self.txn, self.s._pages
        counts = dict.fromkeys(digests, 1)
        if len(counts) != n:  # a page twice in the chunk
            counts = collections.Counter(digests)
        updates = []
        for digest, page in txn.cursor(db=pages).getmulti(list(counts)):
            slot, count = _PAGE.unpack(page)
            count -= counts[digest]
            if count <= 0:
                txn.delete(digest, db=pages)
                self.freed.append(slot)
                gone.append(digest)
            else:
                updates.append((digest, _PAGE.pack(slot, count)))
        if updates:
            txn.cursor(db=pages).putmulti(updates)
        return gone

    def remove_chunk(self, key: Key) -> list[bytes] | None:
        """Delete one loc entry; the digests it freed, or None if it was not there."""
        value = self.txn.pop(key, db=self.s._loc)
        return None if value is None else self.release(value)

    def _remove_ino(self, ino: int, keep_gen: int | None) -> None:
        prefix = _INO.pack(ino)
        cur = self.txn.cursor(db=self.s._loc)
        doomed = []
        if cur.set_range(prefix):
            for key in cur.iternext(values=False):
                if key[:8] != prefix:
                    break
                if keep_gen is None or _LOC_KEY.unpack(key)[1] != keep_gen:
                    doomed.append(bytes(key))
        for key in doomed:
            self.remove_chunk(key)
            self.s._policy.remove(key)
        self.s._counters["dropped_chunks"] += len(doomed)

    def forget_file(self, ino: int) -> None:
        self.txn.delete(_INO.pack(ino), db=self.s._files)
        self._remove_ino(ino, None)

    def record_file(self, ino: int, gen: int, version: tuple[int, int, int, int]) -> None:
        old = self.txn.get(_INO.pack(ino), db=self.s._files)
        self.txn.put(_INO.pack(ino), _FILE.pack(gen, *version), db=self.s._files)
        if old is None or _U64.unpack_from(old)[0] != gen:
            self._remove_ino(ino, gen)

    def weigh(self, key: Key) -> int:
        """-1: a peer holds every page evicting it would free; +1: most of its pages are shared; else 0."""
        value = self.txn.get(key, db=self.s._loc)
        if value is None:
            return 0
        shared = freeable = peer = 0
        digests = sorted({digest for _, digest, _ in _decode_loc(value)[1]})
        for digest, page in self.txn.cursor(db=self.s._pages).getmulti(digests):
            if _PAGE.unpack(page)[1] > 1:
                shared += 1
            else:
                freeable += 1
                peer += self.s._peer_holds(digest)
        if freeable and peer == freeable:
            return -1
        return 1 if shared > freeable else 0

    def make_room(self, admissions: list[_Admission]) -> list[_Admission]:
        """Evict until the admissions fit; return those that will be admitted (all, unless the batch exceeds the cache)."""
        s = self.s
        files = s._files
        fitting: list[_Admission] = []
        digests: set[bytes] = set()
        for a in admissions:
            ino, gen, _ = _LOC_KEY.unpack(a.key)
            record = self.txn.get(_INO.pack(ino), db=files)
            if record is not None and _U64.unpack_from(record)[0] != gen:
                s._counters["skipped_chunks"] += 1  # a read of a version already superseded
                continue
            new_digests = {d for _, d in a.pages} - digests
            if len(digests) + len(new_digests) > s._nslots or len(fitting) >= s.max_chunks:
                s._counters["skipped_chunks"] += 1
                continue
            digests |= new_digests
            fitting.append(a)
        needed = len(digests) - len(self.txn.cursor(db=s._pages).getmulti(sorted(digests)))
        keys = {a.key for a in fitting}
        new_chunks = len(keys) - len(self.txn.cursor(db=s._loc).getmulti(sorted(keys)))
        free = self.free_slots()
        evicted = 0
        while free < needed or len(s._policy) + new_chunks > s.max_chunks:
            key = s._policy.evict_one(self.weigh)
            if key is None:
                break
            gone = self.remove_chunk(key) or []
            free += len(gone)
            needed += sum(1 for d in gone if d in digests)
            new_chunks += key in keys
            evicted += 1
        s._counters["evicted_chunks"] += evicted
        return fitting

    def admit(self, admissions: list[_Admission]) -> None:
        """Admit in slices of ADMIT_SLICE chunks; old versions of re-admitted chunks are released last."""
        # A key admitted twice in one batch: the last one wins.
        admissions = list({a.key: a for a in admissions}.values())
        replaced: list[bytes] = []
        written: set[bytes] = set()  # pages written by this transaction: not compared again
        for k in range(0, len(admissions), ADMIT_SLICE):
            replaced += self._admit_slice(admissions[k : k + ADMIT_SLICE], written)
        # Last: their pages may be the new ones too.
        for value in replaced:
            self.release(value)

    def _admit_slice(self, admissions: list[_Admission], written: set[bytes]) -> list[bytes]:
        """One getmulti for the pages, one allocation, one pwritev per run of slots, one putmulti per table.

        Returns the loc values the admitted chunks replace. Between the Python
        stretches, LMDB and pwritev calls release the GIL to the loop thread.
        """
        s, txn = self.s, self.txn
        pages_db, loc_db = s._pages, s._loc
        wanted = list({d for a in admissions for _, d in a.pages})
        known = {bytes(d): _PAGE.unpack(v) for d, v in txn.cursor(db=pages_db).getmulti(wanted)}
        fresh: list[bytes] = []  # digests of new pages, in admission order
        fresh_pages: list[memoryview] = []
        fresh_set: set[bytes] = set()
        admitted: list[_Admission] = []
        for a in admissions:
            new = [(i, d) for i, d in a.pages if d not in known and d not in fresh_set]
            if new:
                if len({d for _, d in new}) != len(new):  # a page twice in one chunk
                    seen: set[bytes] = set()
                    new = [(i, d) for i, d in new if not (d in seen or seen.add(d))]
                if len(new) > self.free_count - len(fresh):
                    s._counters["skipped_chunks"] += 1
                    continue
                fresh_set.update(d for _, d in new)
                fresh += [d for _, d in new]
                data = a.data
                fresh_pages += [data[i << _SHIFT : (i + 1) << _SHIFT] for i, _ in new]
            admitted.append(a)
        # Slots for the new pages, lowest extents first; each run written with one pwritev before the commit.
        slot_of = {d: slot for d, (slot, _) in known.items()}
        slots: list[int] = []
        fd, pos = s._slab_fd, 0
        for start, count in self.alloc(len(fresh)):
            for j in range(0, count, _IOV_MAX):
                os.pwritev(fd, fresh_pages[pos + j : pos + min(count, j + _IOV_MAX)], (start + j) << _SHIFT)
            slots += range(start, start + count)
            pos += count
        slot_of.update(zip(fresh, slots, strict=True))
        self._heal(admitted, known.keys() - written, slot_of)
        written.update(fresh)
        counts = collections.Counter([d for a in admitted for _, d in a.pages])
        base = {d: count for d, (_, count) in known.items()}
        txn.cursor(db=pages_db).putmulti([(d, _PAGE.pack(slot_of[d], base.get(d, 0) + n)) for d, n in counts.items()])
        entries = {}
        for a in admitted:
            digests = [d for _, d in a.pages]
            entries[a.key] = _encode_loc(a.length, a.chunk_digest, a.present, [slot_of[d] for d in digests], digests)
            self.logical += _held_bytes(a.length, a.present)
            s._policy.insert(a.key)
        loc = txn.cursor(db=loc_db)
        replaced = [bytes(v) for _, v in loc.getmulti(list(entries))]
        loc.putmulti(sorted(entries.items()))
        s._counters["admitted_chunks"] += len(admitted)
        return replaced

    def _heal(self, admitted: list[_Admission], known: Set[bytes], slot_of: dict[bytes, int]) -> None:
        """Rewrite a page whose slot lost its content (disk damage): we hold the right bytes.

        Checks each page this batch shares with earlier ones, by hashing the slab in place: one hash
        (the chunk digest) when the chunk's pages are exactly one run of slots, else one per page.
        """
        s = self.s
        slab, fd = s._slab, s._slab_fd
        digest = xxhash.xxh3_128_digest
        seen: set[bytes] = set()
        for a in admitted:
            todo = [(slot_of[d], i, d) for i, d in a.pages if d in known and d not in seen]
            if not todo:
                continue
            seen.update(d for _, d in a.pages)
            first = todo[0][0]
            npages = len(a.data) >> _SHIFT
            if (
                len(todo) == npages
                and a.length == npages << _SHIFT
                and todo[-1][0] == first + npages - 1
                and digest(slab[first << _SHIFT : (first + npages) << _SHIFT]) == a.chunk_digest
                and [slot for slot, _, _ in todo] == list(range(first, first + npages))
            ):
                continue
            for slot, i, d in todo:
                if digest(slab[slot << _SHIFT : (slot + 1) << _SHIFT]) != d:
                    os.pwrite(fd, a.data[i << _SHIFT : (i + 1) << _SHIFT], slot << _SHIFT)
                    s._counters["healed_pages"] += 1
