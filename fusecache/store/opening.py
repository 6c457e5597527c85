"""Opening a cache directory: the lock, format checks, recovery after a host crash, resizing the slab, the clean-close mark.

A directory that is not a fusecache cache, a corrupt meta.lmdb or slab, an
older or newer format, or other page/chunk sizes raise QuietError naming the
fix; `reset` deletes only the store's own two entries. A host crash (boot id
changed without a clean close) wipes the cache with a warning: contents are
re-derivable. So does a change of the content keys its pages were named and
checked with (`keys`, 0600, made at creation; its names key derived from the
cluster key when the mount has one, so a new cluster key starts it empty). A
capacity change grows the slab, or shrinks it by dropping the
chunks that hold slots past the new end. An exclusive flock on pages.slab
keeps a second process out (`fusecache check` takes it shared).
"""

from __future__ import annotations

import fcntl
import json
import logging
import mmap
import os
import shutil
import struct

import lmdb

from fusecache.errors import QuietError
from fusecache.identity import ContentKeys
from fusecache.store.eviction import Eviction
from fusecache.store.layout import (
    FORMAT_VERSION,
    KEYS_FILE,
    LMDB_DIR,
    LOC_KEY,
    PAGE_SIZE,
    PROGRAM,
    SLAB_FILE,
    TABLES,
    U32,
    U64,
    Key,
    Slab,
    Tables,
    decode_loc,
    format_marker,
)
from fusecache.store.writer import WriteTxn

log = logging.getLogger("fusecache.store")

# Files a cache directory may hold besides ours (a dedicated filesystem's lost+found).
_TOLERATED = {"lost+found"}


def boot_id() -> str:
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


def _boot_time() -> int:
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("btime "):
                return int(line.split()[1])
    return 0


def read_marker(raw: bytes | memoryview | None) -> dict | None:
    """The meta format marker, or None if it is not a fusecache one."""
    try:
        marker = json.loads(bytes(raw)) if raw is not None else None
    except ValueError:
        return None
    return marker if isinstance(marker, dict) and marker.get("program") == PROGRAM else None


def format_problem(marker: dict, chunk_size: int | None) -> tuple[str, str] | None:
    """(what, fix) if a cache with this marker cannot be used here (chunk_size None: any chunk size)."""
    version = marker.get("format")
    if version != FORMAT_VERSION:
        age = "an older" if isinstance(version, int) and version < FORMAT_VERSION else "a newer"
        return f"was written by {age} fusecache (format {version}, this one reads {FORMAT_VERSION})", "pass --reset-cache to start empty"
    if marker.get("page_size") != PAGE_SIZE:
        return f"uses {marker.get('page_size')}-byte pages, not {PAGE_SIZE}", "pass --reset-cache to start empty"
    if chunk_size is not None and marker.get("chunk_size") != chunk_size:
        return (
            f"uses {marker.get('chunk_size')}-byte chunks, not {chunk_size}",
            f"pass --reset-cache to start empty, or use chunk size {marker.get('chunk_size')}",
        )
    return None


class CacheFiles:
    """One cache directory's files, open for the store: the lock, the LMDB environment and tables, the slab.

    `order` is the eviction order to start with (victim first): as persisted
    by a clean close, else the loc keys in key order.
    """

    def __init__(
        self,
        cache_dir: str,
        nslots: int,
        *,
        chunk_size: int,
        max_chunks: int,
        reset: bool,
        counters: dict[str, int],
        eviction: Eviction,
        names_key: bytes | None = None,
    ) -> None:
        self.cache_dir = cache_dir
        self._names_key = names_key  # None: the cache's own (drawn at creation, kept)
        self.keys: ContentKeys | None = None
        self.nslots = nslots
        self.chunk_size = chunk_size
        self.max_chunks = max_chunks
        self._counters = counters
        self._eviction = eviction  # only handed to WriteTxn for a resize, which does not touch it
        self.env: lmdb.Environment | None = None
        self.tables: Tables | None = None
        self.slab: Slab | None = None
        self.order: list[Key] = []
        self._fd = -1
        self._lmdb_path = os.path.join(cache_dir, LMDB_DIR)
        self._slab_path = os.path.join(cache_dir, SLAB_FILE)
        self._keys_path = os.path.join(cache_dir, KEYS_FILE)
        try:
            os.makedirs(cache_dir, exist_ok=True)
        except OSError as e:
            raise QuietError(f"cache dir {cache_dir}: cannot create it: {e.strerror}; pick a writable --cache-dir")
        try:
            if reset:
                if os.path.isfile(self._slab_path):
                    self._lock_dir()  # never wipe a cache another process is using
                self._wipe()
            self._open()
        except BaseException:
            self.close()
            raise

    def _fail(self, what: str, fix: str = "pass --reset-cache to start empty") -> QuietError:
        return QuietError(f"cache dir {self.cache_dir}: {what}; {fix}")

    def _wipe(self) -> None:
        """Remove the cache's own files, and nothing else in the directory."""
        self.close()
        if os.path.isdir(self._lmdb_path) and not os.path.islink(self._lmdb_path):
            shutil.rmtree(self._lmdb_path)
        if os.path.isfile(self._slab_path):
            os.unlink(self._slab_path)
        if os.path.isfile(self._keys_path):
            os.unlink(self._keys_path)

    def _open(self) -> None:
        names = set(os.listdir(self.cache_dir))
        if LMDB_DIR not in names or not os.path.isdir(self._lmdb_path):
            foreign = sorted(names - {SLAB_FILE, KEYS_FILE, KEYS_FILE + ".new"} - _TOLERATED)
            if foreign:
                raise self._fail(
                    f"holds files that are not a fusecache cache ({', '.join(foreign[:3])})", "pick an empty or new --cache-dir"
                )
            fresh = True
        else:
            fresh = False
        self._lock_dir()
        try:
            self.env = self._open_env(fresh)
        except lmdb.Error as e:
            if not fresh and self._written_before_boot():
                log.warning("cache dir %s: metadata unreadable after a host restart (%s); starting empty", self.cache_dir, e)
                self._wipe()
                return self._open()
            raise self._fail(f"meta.lmdb is corrupt ({e})")
        try:
            with self.env.begin() as txn:
                meta = {bytes(k): bytes(v) for k, v in txn.cursor(db=self.tables.meta)}
            if fresh:
                self.keys = self._new_keys()
                meta = self._init_meta(self.keys)
            else:
                self._check_format(meta.get(b"format"))
                if meta.get(b"boot_id", b"").decode(errors="replace") != boot_id() and meta.get(b"clean") != b"\x01":
                    log.warning("cache dir %s: the host crashed while the cache was open; starting empty", self.cache_dir)
                    self._wipe()
                    return self._open()
                self.keys = self._read_keys()
                if (
                    self.keys is None
                    or meta.get(b"keys") != self.keys.fingerprint()
                    or (self._names_key is not None and self.keys.names_key != self._names_key)
                ):
                    # Its pages were named with other keys: under these they would not be found, or worse.
                    log.warning(
                        "cache dir %s: its pages were named with other content keys (a new cluster key, or its keys file "
                        "lost); starting empty", self.cache_dir,
                    )
                    self._wipe()
                    return self._open()
            self._open_slab(meta, fresh)
            self.order = self._saved_order(meta)
        except (lmdb.Error, KeyError, struct.error) as e:  # damage below a valid header: a broken page or missing key
            raise self._fail(f"meta.lmdb is corrupt ({e!r})")

    def _lock_dir(self) -> None:
        """Own the directory: two processes writing one slab would corrupt it."""
        self._fd = os.open(self._slab_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise self._fail("is in use by another fusecache process", "stop it or pick another --cache-dir")

    def _open_env(self, fresh: bool) -> lmdb.Environment:
        # Metadata per slot (pages + free entries) and per chunk (loc), doubled
        # for B-tree slack and copy-on-write; only address space, not disk.
        map_size = (64 << 20) + 2 * (self.nslots * 96 + self.max_chunks * (64 + self.chunk_size // PAGE_SIZE * 24))
        # sync=False: see the package docstring (a host crash wipes the cache).
        env = lmdb.open(self._lmdb_path, map_size=map_size, max_dbs=6, sync=False, metasync=False, readahead=False, max_readers=256)
        try:
            self.tables = Tables(*(env.open_db(name, create=fresh) for name in TABLES))
        except lmdb.NotFoundError:
            env.close()
            raise self._fail(
                "meta.lmdb is not a fusecache cache (named databases missing)", "pick another --cache-dir or pass --reset-cache"
            )
        except lmdb.Error:
            env.close()
            raise
        return env

    def _written_before_boot(self) -> bool:
        try:
            return os.stat(os.path.join(self._lmdb_path, "data.mdb")).st_mtime < _boot_time()
        except OSError:
            return False

    def _check_format(self, raw: bytes | None) -> None:
        marker = read_marker(raw)
        if marker is None:
            raise self._fail("meta.lmdb is not a fusecache cache (no format marker)", "pick another --cache-dir or pass --reset-cache")
        problem = format_problem(marker, self.chunk_size)
        if problem is not None:
            raise self._fail(*problem)

    def _new_keys(self) -> ContentKeys:
        """Fresh content keys, written to the keys file (0600, replaced whole) before any page is named with them."""
        keys = ContentKeys.new(self._names_key)
        tmp = self._keys_path + ".new"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)  # whatever the umask, and if a stale .new was there
            os.write(fd, keys.to_bytes())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self._keys_path)
        return keys

    def _read_keys(self) -> ContentKeys | None:
        try:
            with open(self._keys_path, "rb") as f:
                return ContentKeys.from_bytes(f.read())
        except FileNotFoundError:
            return None
        except OSError as e:
            raise self._fail(f"cannot read its keys file: {e.strerror}")

    def _init_meta(self, keys: ContentKeys) -> dict[bytes, bytes]:
        assert self.env is not None and self.tables is not None
        meta = {
            b"format": format_marker(self.chunk_size),
            b"keys": keys.fingerprint(),
            b"slots": U32.pack(0),
            b"free_slots": U32.pack(0),
            b"logical_bytes": U64.pack(0),
        }
        with self.env.begin(write=True, db=self.tables.meta) as txn:
            for k, v in meta.items():
                txn.put(k, v)
        return meta

    def _open_slab(self, meta: dict[bytes, bytes], fresh: bool) -> None:
        assert self.env is not None and self.tables is not None
        (old_slots,) = U32.unpack(meta[b"slots"])
        size = os.fstat(self._fd).st_size
        if not fresh and size < old_slots * PAGE_SIZE:
            raise self._fail(f"pages.slab is truncated ({size} bytes, expected {old_slots * PAGE_SIZE})")
        if self.nslots > old_slots:
            # Grow the file before the metadata says it is larger (a crash in between is harmless).
            os.ftruncate(self._fd, self.nslots * PAGE_SIZE)
        # The file is at least the new size now (a shrink truncates it below, after the commit).
        slab_map = mmap.mmap(self._fd, self.nslots * PAGE_SIZE, prot=mmap.PROT_READ)
        self.slab = Slab(self._fd, self.nslots, slab_map, memoryview(slab_map))
        with self.env.begin(write=True) as txn:
            w = WriteTxn(txn, self.tables, self.slab, self._eviction, self._counters, max_chunks=self.max_chunks)
            if self.nslots < old_slots:
                self._shrink(w)
            elif self.nslots > old_slots:
                w.free_run(old_slots, self.nslots - old_slots)
                w.finish()
            txn.put(b"slots", U32.pack(self.nslots), db=self.tables.meta)
            txn.put(b"boot_id", boot_id().encode(), db=self.tables.meta)
            txn.put(b"clean", b"\x00", db=self.tables.meta)
        # The "not clean" mark must be durable before any unsynced write lands.
        self.env.sync(True)
        if size > self.nslots * PAGE_SIZE:
            os.ftruncate(self._fd, self.nslots * PAGE_SIZE)

    def _shrink(self, w: WriteTxn) -> None:
        """Drop every chunk holding a slot past the new end, then forget those slots."""
        doomed = [bytes(k) for k, v in w.txn.cursor(db=w.tables.loc) if any(slot >= self.nslots for slot in decode_loc(v).slots)]
        for key in doomed:
            w.remove_chunk(key)
        w.truncate()
        w.finish()
        self._counters["evicted_chunks"] += len(doomed)
        if doomed:
            log.info("cache dir %s: shrinking dropped %d chunks", self.cache_dir, len(doomed))

    def _saved_order(self, meta: dict[bytes, bytes]) -> list[Key]:
        """The eviction order as persisted by a clean close, else the loc keys in key order; the saved one is then deleted."""
        assert self.env is not None and self.tables is not None
        with self.env.begin(write=True) as txn:
            entries = txn.stat(self.tables.loc)["entries"]
            order = meta.get(b"order", b"") if meta.get(b"clean") == b"\x01" else b""
            keys = [order[i : i + LOC_KEY.size] for i in range(0, len(order), LOC_KEY.size)]
            if len(keys) != entries:
                keys = [bytes(k) for k in txn.cursor(db=self.tables.loc).iternext(values=False)]
            txn.delete(b"order", db=self.tables.meta)
        return keys

    def close_clean(self, order: list[Key]) -> None:
        """Make everything durable, save the eviction order and mark a clean shutdown; then close."""
        if self.env is None or self.tables is None:
            return
        os.fsync(self._fd)
        with self.env.begin(write=True) as txn:
            txn.put(b"order", b"".join(order), db=self.tables.meta)
            txn.put(b"clean", b"\x01", db=self.tables.meta)
        self.env.sync(True)
        self.close()

    def close(self) -> None:
        """Close the files without the clean mark (what a crash leaves; the next open keeps what was committed)."""
        if self.env is not None:
            self.env.close()
            self.env = None
        if self.slab is not None:
            self.slab.view.release()
            self.slab.map.close()
            self.slab = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
