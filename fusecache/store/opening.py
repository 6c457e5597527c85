"""Opening a cache directory: the lock, damage checks, wiping, reserving room, resizing the slab, the clean-close record.

The cache is re-derivable, so a cache that cannot be trusted is wiped and
rebuilt with one log line, never refused: `state.json` (fsynced, outside
LMDB, see `layout`) is read before LMDB is opened. After a clean close,
data.mdb's size and xxh3 and the slab's size must match it (garbage inside
LMDB pages can crash LMDB itself, so LMDB is not asked); while open it says
"not clean", so a host crash (another boot id) wipes, and a killed process
(same boot) keeps what LMDB committed once data.mdb is at least as long as
its meta pages declare (never a SIGBUS). A missing or other-format record,
a different page or chunk size, LMDB failing to open, or content keys other
than the ones its pages were named with (`keys`, 0600, made at creation; its
names key derived from the cluster key when the mount has one, so a new
cluster key starts it empty) also wipe. A
directory holding files that are not ours is refused (QuietError): only the
store's own entries are ever deleted. The slab is reserved with fallocate
(refused in one line naming the free space and the largest --cache-size
that fits). A capacity change grows the slab, or shrinks it by dropping the
chunks that hold slots past the new end. An exclusive flock on pages.slab
keeps a second process out (`fusecache check` takes it shared).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import mmap
import os
import shutil
import struct

import lmdb
import xxhash

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
    STATE_FILE,
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
_LMDB_MAGIC = 0xBEEFC0DE
MIB = 1 << 20
META_RESERVE = 8 * MIB  # room kept for data.mdb beyond 1/META_SHARE of the slab
META_SHARE = 16


def room_needed(capacity: int) -> int:
    """Bytes a cache of `capacity` needs on its filesystem: the slab and room for its metadata."""
    return capacity + META_RESERVE + capacity // META_SHARE


def largest_fitting(free: int) -> int:
    """The largest --cache-size (whole MiB) whose `room_needed` fits in `free` bytes (0: none)."""
    return max(0, (free - META_RESERVE) * META_SHARE // (META_SHARE + 1)) // MIB * MIB


def lmdb_problem(path: str) -> str | None:
    """What is wrong with an LMDB data file at a glance (no LMDB call), or None: the meta pages, and the size they declare."""
    try:
        with open(path, "rb") as f:
            head = f.read(2 * PAGE_SIZE)
            size = os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        return "meta.lmdb/data.mdb is missing"
    if len(head) < 2 * PAGE_SIZE:
        return f"meta.lmdb/data.mdb is truncated ({size} bytes)"
    best = None
    for off in (0, PAGE_SIZE):
        magic, version = struct.unpack_from("<II", head, off + 16)
        (psize,) = struct.unpack_from("<I", head, off + 40)
        last_pg, txnid = struct.unpack_from("<QQ", head, off + 136)
        if magic == _LMDB_MAGIC and version == 1 and psize == PAGE_SIZE and (best is None or txnid > best[1]):
            best = (last_pg, txnid)
    if best is None:
        return "meta.lmdb/data.mdb has no valid LMDB meta page"
    if size < (best[0] + 1) * PAGE_SIZE:
        return f"meta.lmdb/data.mdb is truncated ({size} bytes, its meta page says {(best[0] + 1) * PAGE_SIZE})"
    return None


def file_digest(path: str) -> str:
    """xxh3-64 of a whole file, hex."""
    h = xxhash.xxh3_64()
    with open(path, "rb") as f:
        while block := f.read(4 * MIB):
            h.update(block)
    return h.hexdigest()


def read_state(path: str) -> dict | None:
    """state.json as a dict, or None if it is missing or unreadable."""
    try:
        with open(path, "rb") as f:
            state = json.loads(f.read())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def write_state(path: str, state: dict) -> None:
    """Replace state.json durably: a new file, fsynced, renamed over the old, the directory fsynced."""
    tmp = path + ".new"
    with open(tmp, "wb") as f:
        f.write(json.dumps(state).encode())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def boot_id() -> str:
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


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
        owned: bool = False,
    ) -> None:
        """owned: this process already holds the directory (a rebuild while the old files are open): reset without locking first."""
        self.cache_dir = cache_dir
        self._names_key = names_key  # None: the cache's own (drawn at creation, kept)
        self.keys: ContentKeys | None = None
        self.nslots = nslots
        self.chunk_size = chunk_size
        self.max_chunks = max_chunks
        self._counters = counters
        self.eviction = eviction  # only handed to WriteTxn for a resize, which does not touch it
        self.env: lmdb.Environment | None = None
        self.tables: Tables | None = None
        self.slab: Slab | None = None
        self.order: list[Key] = []
        self._fd = -1
        self._lmdb_path = os.path.join(cache_dir, LMDB_DIR)
        self._slab_path = os.path.join(cache_dir, SLAB_FILE)
        self._keys_path = os.path.join(cache_dir, KEYS_FILE)
        self._state_path = os.path.join(cache_dir, STATE_FILE)
        self._data_path = os.path.join(self._lmdb_path, "data.mdb")
        self._wiped = False
        try:
            os.makedirs(cache_dir, exist_ok=True)
        except OSError as e:
            raise QuietError(f"cache dir {cache_dir}: cannot create it: {e.strerror}; pick a writable --cache-dir")
        try:
            if reset:
                if os.path.isfile(self._slab_path) and not owned:
                    self._lock_dir()  # never wipe a cache another process is using
                self._wipe()
            self._open()
        except BaseException:
            self.close()
            raise

    def _fail(self, what: str, fix: str = "pass --reset-cache to start empty") -> QuietError:
        return QuietError(f"cache dir {self.cache_dir}: {what}; {fix}")

    def _wipe(self) -> None:
        """Remove the cache's own files, and nothing else in the directory (a lock held stays held: its inode goes)."""
        fd, self._fd = self._fd, -1
        self.close()
        self._fd = fd
        if os.path.isdir(self._lmdb_path) and not os.path.islink(self._lmdb_path):
            shutil.rmtree(self._lmdb_path)
        for path in (self._slab_path, self._state_path, self._keys_path):
            if os.path.isfile(path):
                os.unlink(path)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _start_over(self, why: str) -> None:
        """The cache cannot be trusted: wipe it and open it empty, with one line saying why."""
        if self._wiped:  # already empty and new: the trouble is not the cache's content
            raise self._fail(why, "check the cache filesystem, or pick another --cache-dir")
        log.warning("cache dir %s: %s; starting empty", self.cache_dir, why)
        self._wipe()
        self._wiped = True
        self._open()

    def _open(self) -> None:
        names = set(os.listdir(self.cache_dir))
        ours = {SLAB_FILE, STATE_FILE, STATE_FILE + ".new", KEYS_FILE, KEYS_FILE + ".new"}
        if LMDB_DIR not in names or not os.path.isdir(self._lmdb_path):
            foreign = sorted(names - ours - _TOLERATED)
            if foreign:
                raise self._fail(
                    f"holds files that are not a fusecache cache ({', '.join(foreign[:3])})", "pick an empty or new --cache-dir"
                )
            fresh = True
        else:
            if SLAB_FILE not in names and STATE_FILE not in names:  # an LMDB of someone else's: never wiped
                raise self._fail("meta.lmdb is not a fusecache cache (no pages.slab beside it)", "pick another --cache-dir")
            fresh = False
        self._lock_dir()
        if not fresh:
            why = self._damage()
            if why is not None:
                return self._start_over(why)
        try:
            self.env = self._open_env(fresh)
            with self.env.begin() as txn:
                meta = {bytes(k): bytes(v) for k, v in txn.cursor(db=self.tables.meta)}
            if fresh:
                self.keys = self._new_keys()
                meta = self._init_meta(self.keys)
            else:
                self._check_format(meta.get(b"format"))
                self.keys = self._read_keys()
                if (
                    self.keys is None
                    or meta.get(b"keys") != self.keys.fingerprint()
                    or (self._names_key is not None and self.keys.names_key != self._names_key)
                ):
                    # Its pages were named with other keys: under these they would not be found, or worse.
                    return self._start_over("its pages were named with other content keys (a new cluster key, or its keys file lost)")
        except (lmdb.Error, KeyError, struct.error, ValueError) as e:  # damage below a valid header: a broken page or missing key
            return self._start_over(f"meta.lmdb is damaged ({e!r})")
        try:
            self._open_slab(meta, fresh)
            self.order = self._saved_order(meta)
        except (lmdb.Error, KeyError, struct.error, ValueError) as e:
            return self._start_over(f"meta.lmdb is damaged ({e!r})")

    def _damage(self) -> str | None:
        """Why the cache on disk cannot be trusted (checked before LMDB is opened), or None."""
        state = read_state(self._state_path)
        if state is None or state.get("program") != PROGRAM:
            return "it has no record of how it was closed (a crash while it was created, or an older fusecache)"
        problem = format_problem(state, self.chunk_size)
        if problem is not None:
            return f"it {problem[0]}"
        try:
            slab_size = os.path.getsize(self._slab_path)
        except OSError:
            return "pages.slab is missing"
        if slab_size != state.get("slab_size"):
            return f"pages.slab is {slab_size} bytes, not the {state.get('slab_size')} it was closed with"
        if not state.get("clean"):
            if state.get("boot_id") != boot_id():
                return "the host crashed while the cache was open"
            # the process died but the host did not: what LMDB committed is in the page cache
            return lmdb_problem(self._data_path)
        try:
            data_size = os.path.getsize(self._data_path)
        except OSError:
            return "meta.lmdb/data.mdb is missing"
        if data_size != state.get("data_size"):
            return f"meta.lmdb/data.mdb is {data_size} bytes, not the {state.get('data_size')} it was closed with"
        if file_digest(self._data_path) != state.get("data_xxh3"):
            return "meta.lmdb/data.mdb changed since it was closed (its digest differs)"
        return None

    def _write_state(self, clean: bool, **more: object) -> None:
        state = {**json.loads(format_marker(self.chunk_size)), "boot_id": boot_id(), "clean": clean}
        write_state(self._state_path, {**state, "slab_size": self.nslots * PAGE_SIZE, **more})

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

    def _check_format(self, raw: bytes | None) -> None:
        marker = read_marker(raw)
        if marker is None:
            raise ValueError("no format marker")
        problem = format_problem(marker, self.chunk_size)
        if problem is not None:
            raise ValueError(f"it {problem[0]}")

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
            raise ValueError(f"pages.slab is truncated ({size} bytes, expected {old_slots * PAGE_SIZE})")
        # Reserve the slab (grown before the metadata says it is larger: a crash in between is harmless),
        # so a full filesystem is an error now, never a lost page write or a SIGBUS later.
        self._reserve()
        # The file is at least the new size now and allocated (a shrink truncates it below, after the commit).
        if os.fstat(self._fd).st_size < self.nslots * PAGE_SIZE:
            raise self._fail("pages.slab could not be grown", "check the cache filesystem")
        self._write_state(False)  # from here on, a crash leaves the cache "not clean"
        slab_map = mmap.mmap(self._fd, self.nslots * PAGE_SIZE, prot=mmap.PROT_READ)
        self.slab = Slab(self._fd, self.nslots, slab_map, memoryview(slab_map))
        with self.env.begin(write=True) as txn:
            w = WriteTxn(txn, self.tables, self.slab, self.eviction, self._counters, max_chunks=self.max_chunks)
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

    def _reserve(self) -> None:
        """fallocate the slab, after checking there is room for it and for the metadata."""
        want = self.nslots * PAGE_SIZE
        st = os.fstat(self._fd)
        vfs = os.statvfs(self.cache_dir)
        free = vfs.f_bavail * vfs.f_frsize + min(st.st_blocks * 512, want)  # what the slab holds now counts as room
        try:
            data = os.path.getsize(self._data_path)
        except OSError:
            data = 0
        need = room_needed(want)
        if need > free + data:
            self._refuse_room(free + data)
        try:
            os.posix_fallocate(self._fd, 0, want)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                self._refuse_room(free + data)
            raise self._fail(f"cannot reserve {want >> 20} MiB for pages.slab: {e.strerror}", "check the cache filesystem")

    def _refuse_room(self, free: int) -> None:
        fits = largest_fitting(free)
        fix = "pick a --cache-dir with more room"
        if fits >= self.chunk_size:
            fix = f"pass --cache-size {fits >> 20}M or less, or {fix}"
        raise self._fail(
            f"its filesystem has {free >> 20} MiB free, too little for --cache-size {(self.nslots * PAGE_SIZE) >> 20}M "
            f"and its metadata ({room_needed(self.nslots * PAGE_SIZE) >> 20} MiB)",
            fix,
        )

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
        """Make everything durable, save the eviction order and record a clean shutdown (with data.mdb's digest); then close.

        If any of it fails the files are closed all the same, not clean: the next open starts empty.
        """
        if self.env is None or self.tables is None:
            return
        try:
            os.fsync(self._fd)
            with self.env.begin(write=True) as txn:
                txn.put(b"order", b"".join(order), db=self.tables.meta)
                txn.put(b"clean", b"\x01", db=self.tables.meta)
            self.env.sync(True)
            self.env.close()
            self.env = None
            self._write_state(True, data_size=os.path.getsize(self._data_path), data_xxh3=file_digest(self._data_path))
        except (OSError, lmdb.Error) as e:
            log.warning("cache dir %s: could not close it cleanly (%s); the next mount starts it empty", self.cache_dir, e)
        finally:
            self.close()

    def close_tainted(self) -> None:
        """Close, and make sure the next open starts empty (the store missed changes it must not forget)."""
        try:
            os.unlink(self._state_path)
        except OSError:
            pass
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
