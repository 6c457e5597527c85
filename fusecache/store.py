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
- Page data is written with `os.pwrite` into free slots *before* the commit
  that references them; LMDB is opened without fsync (a SIGKILLed process
  loses nothing committed, the OS page cache has it; a host crash wipes).
- Readers (`read_chunk`, `read_page`, ... on the trio loop) take an LMDB read
  transaction (MVCC: they never wait for the writer) and copy pages out of a
  read-only mmap of the slab. The writer may reuse a slot a reader's older
  view still points at, so every page is copied first and then checked
  against its xxh3-128 digest: a mismatch is a miss (`verify_failures`),
  never wrong data.
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
- `loc`: ino u64, gen u64, chunk_no u32 -> length u32, then a presence bitmap
  of ceil(pages/8) bytes (page i is bit i%8 of byte i//8; set = stored,
  clear = a hole), then for each stored page in order: xxh3-128
  digest (16 bytes) + slot u32. pages = ceil(length/4096); a partial last
  page is hashed and stored padded with zeros.
- `pages`: digest (16 bytes) -> slot u32, refcount u32.
- `free`: slot u32 -> empty. Slots below the high-water mark that are free;
  slots at or above it were never used.
- `meta`: b"format" -> JSON {"program": "fusecache", "format": N,
  "page_size": 4096, "chunk_size": C}; b"boot_id" -> ASCII boot id of the
  host that last opened it; b"clean" -> b"\\x01" after `close`, b"\\x00" while
  open; b"slots" -> u32 slot count of pages.slab; b"high_water" -> u32;
  b"logical_bytes" -> u64 non-hole bytes held by loc entries; b"order" (only
  after a clean close) -> the loc keys in eviction order, victim first.
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
from collections.abc import Callable, Iterable, Iterator

import lmdb
import xxhash

from fusecache.errors import QuietError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
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
_PAGE_REF = struct.Struct(">16sI")
_PAGE = struct.Struct(">II")
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


def _decode_loc(value: bytes | memoryview) -> tuple[int, list[tuple[int, bytes, int]]]:
    """A loc value -> (chunk length, [(page index, digest, slot) for each stored page])."""
    (length,) = _U32.unpack_from(value)
    npages = (length + PAGE_SIZE - 1) >> _SHIFT
    nbytes = (npages + 7) >> 3
    present = int.from_bytes(value[4 : 4 + nbytes], "little")
    pos = 4 + nbytes
    refs = []
    for i in range(npages):
        if present >> i & 1:
            digest, slot = _PAGE_REF.unpack_from(value, pos)
            refs.append((i, digest, slot))
            pos += _PAGE_REF.size
    return length, refs


def _encode_loc(length: int, refs: list[tuple[int, bytes, int]]) -> bytes:
    npages = (length + PAGE_SIZE - 1) >> _SHIFT
    present = 0
    parts = []
    for i, digest, slot in refs:
        present |= 1 << i
        parts.append(_PAGE_REF.pack(digest, slot))
    return _U32.pack(length) + present.to_bytes((npages + 7) >> 3, "little") + b"".join(parts)


def _held_bytes(length: int, refs: list[tuple[int, bytes, int]]) -> int:
    """Non-hole bytes of a chunk (logical bytes for the dedup ratio)."""
    last = (length - 1) >> _SHIFT
    return sum(PAGE_SIZE if i != last else length - (last << _SHIFT) for i, _, _ in refs)


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

    __slots__ = ("data", "key", "length", "pages")

    def __init__(self, key: Key, data: bytes) -> None:
        self.key = key
        self.length = len(data)
        npages = (self.length + PAGE_SIZE - 1) >> _SHIFT
        if self.length != npages << _SHIFT:
            data = bytes(data) + bytes((npages << _SHIFT) - self.length)
        self.data = memoryview(data)
        # (page index, digest) of the stored pages; holes are left out.
        self.pages = []
        for i in range(npages):
            digest = xxhash.xxh3_128_digest(self.data[i << _SHIFT : (i + 1) << _SHIFT])
            if digest != ZERO_DIGEST:
                self.pages.append((i, digest))


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
        meta = {b"format": self._format_marker(), b"slots": _U32.pack(0), b"high_water": _U32.pack(0), b"logical_bytes": _U64.pack(0)}
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
        cur = txn.cursor(db=self._free)
        if cur.set_range(_U32.pack(self._nslots)):
            while cur.delete():
                pass
        w.high_water = min(w.high_water, self._nslots)
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

    def read_chunk(self, ino: int, gen: int, chunk: int) -> bytes | None:
        """The chunk's bytes (shorter than chunk_size at EOF), verified; None if absent or any page fails."""
        key = _LOC_KEY.pack(ino, gen, chunk)
        with self._env.begin(db=self._loc, buffers=True) as txn:
            data = self._read_chunk(txn, key)
        if data is None:
            self._counters["misses"] += 1
            return None
        self._counters["hits"] += 1
        self._policy.touch(key)
        return data

    def _read_chunk(self, txn: lmdb.Transaction, key: Key) -> bytes | None:
        value = txn.get(key, db=self._loc)
        if value is None:
            return None
        length, refs = _decode_loc(value)
        slab = self._slab
        parts: list[bytes | memoryview] = [ZERO_PAGE] * ((length + PAGE_SIZE - 1) >> _SHIFT)
        for i, _, slot in refs:
            if slot >= self._nslots:
                self._counters["verify_failures"] += 1
                return None
            parts[i] = slab[slot << _SHIFT : (slot + 1) << _SHIFT]
        # Copy first, verify the copy: the writer may be reusing a slot right now.
        data = b"".join(parts)
        view = memoryview(data)
        for i, digest, _ in refs:
            if xxhash.xxh3_128_digest(view[i << _SHIFT : (i + 1) << _SHIFT]) != digest:
                self._counters["verify_failures"] += 1
                return None
        return data if len(data) == length else data[:length]

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
        page = bytes(self._slab[slot << _SHIFT : (slot + 1) << _SHIFT])
        if xxhash.xxh3_128_digest(page) != digest:
            self._counters["verify_failures"] += 1
            return None
        return page

    def iter_digests(self) -> Iterator[bytes]:
        """Every stored page's digest. Reads in short transactions: an open one would pin LMDB pages."""
        start = b""
        while True:
            with self._env.begin(db=self._pages) as txn:
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
        start = b""
        while True:
            with self._env.begin(db=self._loc) as txn:
                cur = txn.cursor()
                if not cur.set_range(start):
                    return
                batch = []
                for key in cur.iternext(values=False):
                    batch.append(key)
                    if len(batch) == 4096:
                        break
            for key in batch:
                ino, gen, chunk = _LOC_KEY.unpack(key)
                rec = files.get(ino)
                if rec is not None and rec[0] == gen and rec[1] >= 0:
                    yield ino, tuple(rec[1:]), chunk
            if len(batch) < 4096:
                return
            start = batch[-1] + b"\x00"

    def iter_files(self) -> list[int]:
        """The inode of every file with a record (for dropping the whole cache)."""
        with self._env.begin(db=self._files) as txn:
            return [_INO.unpack(k)[0] for k in txn.cursor().iternext(values=False)]

    def stats(self) -> dict[str, int | float]:
        with self._env.begin(buffers=True) as txn:
            free = txn.stat(self._free)["entries"]
            chunks = txn.stat(self._loc)["entries"]
            (high_water,) = _U32.unpack(txn.get(b"high_water", db=self._meta))
            (logical,) = _U64.unpack(txn.get(b"logical_bytes", db=self._meta))
        used = high_water - free
        return {
            "capacity": self._nslots * PAGE_SIZE,
            "page_size": PAGE_SIZE,
            "chunk_size": self.chunk_size,
            "pages_used": used,
            "bytes_stored": used * PAGE_SIZE,
            "logical_bytes": logical,
            "dedup_ratio": logical / (used * PAGE_SIZE) if used else 1.0,
            "chunks": chunks,
            "max_chunks": self.max_chunks,
            **self._counters,
        }

    # --- writes (one writer thread) --------------------------------------

    def set_peer_holds(self, holds: Callable[[bytes], bool]) -> None:
        """Tell eviction which pages a peer also holds (digest -> bool): those are cheaper to lose."""
        self._peer_holds = holds

    def apply(self, batch: WriteBatch) -> None:
        """Apply one batch: releases and evictions commit first, then admissions (see module docstring)."""
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
        (self.high_water,) = _U32.unpack(txn.get(b"high_water", db=store._meta))
        (self.logical,) = _U64.unpack(txn.get(b"logical_bytes", db=store._meta))
        # Freed here, reusable only after this transaction commits.
        self.freed: list[int] = []

    def finish(self) -> None:
        s, txn = self.s, self.txn
        for slot in self.freed:
            if slot < s._nslots:
                txn.put(_U32.pack(slot), b"", db=s._free)
        txn.put(b"high_water", _U32.pack(self.high_water), db=s._meta)
        txn.put(b"logical_bytes", _U64.pack(self.logical), db=s._meta)

    def free_slots(self) -> int:
        """Slots usable by the next transaction."""
        return self.txn.stat(self.s._free)["entries"] + len(self.freed) + self.s._nslots - self.high_water

    def refcount(self, digest: bytes) -> int:
        value = self.txn.get(digest, db=self.s._pages)
        return 0 if value is None else _PAGE.unpack(value)[1]

    def release(self, value: bytes) -> list[bytes]:
        """Drop one reference to each page of a loc value; return the digests whose last reference went."""
        length, refs = _decode_loc(value)
        self.logical -= _held_bytes(length, refs)
        gone = []
        pages = self.s._pages
        for _, digest, _ in refs:
            slot, count = _PAGE.unpack(self.txn.get(digest, db=pages))
            if count <= 1:
                self.txn.delete(digest, db=pages)
                self.freed.append(slot)
                gone.append(digest)
            else:
                self.txn.put(digest, _PAGE.pack(slot, count - 1), db=pages)
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
        for _, digest, _ in _decode_loc(value)[1]:
            if self.refcount(digest) > 1:
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
        needed = sum(1 for d in digests if self.txn.get(d, db=s._pages) is None)
        keys = {a.key for a in fitting}
        new_chunks = sum(1 for k in keys if self.txn.get(k, db=s._loc) is None)
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

    def _alloc(self) -> int | None:
        cur = self.txn.cursor(db=self.s._free)
        if cur.first():
            (slot,) = _U32.unpack(cur.key())
            cur.delete()
            return slot
        if self.high_water < self.s._nslots:
            self.high_water += 1
            return self.high_water - 1
        return None

    def admit(self, admissions: list[_Admission]) -> None:
        s, txn = self.s, self.txn
        pages, loc = s._pages, s._loc
        fd, slab = s._slab_fd, s._slab
        replaced = []
        for a in admissions:
            unknown = {d for _, d in a.pages if txn.get(d, db=pages) is None}
            if len(unknown) > self.free_slots() - len(self.freed):
                s._counters["skipped_chunks"] += 1
                continue
            refs = []
            for i, digest in a.pages:
                page = a.data[i << _SHIFT : (i + 1) << _SHIFT]
                value = txn.get(digest, db=pages)
                if value is None:
                    slot = self._alloc()
                    assert slot is not None  # counted above
                    os.pwrite(fd, page, slot << _SHIFT)  # before the commit that references it
                    txn.put(digest, _PAGE.pack(slot, 1), db=pages)
                else:
                    slot, count = _PAGE.unpack(value)
                    if bytes(slab[slot << _SHIFT : (slot + 1) << _SHIFT]) != page:
                        # Heal a page whose slot lost its content (disk damage): we hold the right bytes.
                        os.pwrite(fd, page, slot << _SHIFT)
                        s._counters["healed_pages"] += 1
                    txn.put(digest, _PAGE.pack(slot, count + 1), db=pages)
                refs.append((i, digest, slot))
            old = txn.get(a.key, db=loc)
            if old is not None:
                replaced.append(bytes(old))
            txn.put(a.key, _encode_loc(a.length, refs), db=loc)
            self.logical += _held_bytes(a.length, refs)
            s._policy.insert(a.key)
            s._counters["admitted_chunks"] += 1
        # Old versions of re-admitted chunks last: their pages may be the new ones too.
        for value in replaced:
            self.release(value)
