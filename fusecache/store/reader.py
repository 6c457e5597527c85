"""Reading the store: verified copies of chunks, ranges and pages, file records and listings, on any thread.

The `Reader` is given the LMDB environment and tables, the open slab, the
eviction order (touched on every hit) and the counters. Every read takes its
own LMDB read transaction (MVCC: it never waits for the writer), or for a
request inside one chunk the location the hit index remembered (valid only
between batches: `batch_started`, `batch_ended`), and copies
bytes out of the read-only slab map; the writer may be reusing a slot an
older view still points at, so every byte is checked after it is copied: the
chunk digest when a whole chunk is read (one hash), else the check of each
page overlapping the range read (seeded xxh3-128: `fusecache/identity.py`).
A mismatch is a miss (`verify_failures`), never wrong data.
"""

from __future__ import annotations

import collections
import dataclasses
import struct
from collections.abc import Iterable, Iterator
from typing import Any

import lmdb
import xxhash

from fusecache.identity import ContentKeys
from fusecache.store.eviction import Eviction
from fusecache.store.layout import (
    INO,
    LOC_HEAD,
    PAGE_SIZE,
    RUN,
    SHIFT,
    U32,
    U64,
    ZERO_PAGE,
    Key,
    Location,
    Slab,
    Tables,
    decode_file,
    decode_loc,
    decode_page,
    decode_pins,
    loc_head,
    loc_refs,
    pack_key,
    page_digests,
    unpack_key,
    whole_run_head,
)
from fusecache.version import UNKNOWN, Version

# Keys per read transaction when listing a table: a long transaction would pin LMDB pages.
_LIST_BATCH = 4096
_NOT_RUNS = object()  # `_whole_runs`: not every chunk is a whole run (the general path reads it)


@dataclasses.dataclass
class Holdings:
    """What the store holds of one generation of one file."""

    chunks: list[int] = dataclasses.field(default_factory=list)  # chunk numbers held
    chunk_bytes: list[int] = dataclasses.field(default_factory=list)  # non-hole bytes of each
    cached_bytes: int = 0  # non-hole bytes of those chunks
    shared_bytes: int = 0  # of which pages some other file (or another of its generations) holds too


class Reader:
    """The store's reads: lock-free, verified, safe beside the one writer."""

    def __init__(
        self,
        env: lmdb.Environment,
        tables: Tables,
        slab: Slab,
        eviction: Eviction,
        counters: dict[str, int],
        *,
        chunk_size: int,
        keys: ContentKeys,
    ) -> None:
        self.env, self.tables, self.slab, self.eviction, self.counters = env, tables, slab, eviction, counters
        self.keys = keys
        self._seed = keys.seed  # the checks below call xxhash with it directly: the hit path's hash
        self.chunk_size = chunk_size
        self._whole_run_head = whole_run_head(chunk_size).unpack_from
        full = chunk_size >> SHIFT
        self._run_checks_at = LOC_HEAD.size + ((full + 7) >> 3) + 4 * full  # page checks of a whole RUN chunk's value
        self._run_value_len = self._run_checks_at + 16 * full  # what a read of it needs: through its page checks
        # The hit index: loc values of chunks found by one-chunk reads, so a warm hit skips LMDB (a read
        # transaction costs a 4 KiB hit a third of its time). Valid only between batches: `batch_started`
        # and `batch_ended` (the writer thread, around every batch) empty it and move `_epoch` on (odd while
        # a batch runs), and a value read from LMDB is kept only if no batch started or ended meanwhile (see
        # `_remember`). A kept value can still point at slots an admission reuses: every byte is verified
        # after the copy, as for any read. Bounded: past HIT_INDEX_LIMIT chunks, no more are added.
        self._hit_index: dict[Key, bytes] = {}
        self._epoch = 0

    HIT_INDEX_LIMIT = 1 << 15  # loc values (~0.4 KiB each, kept through their checks): 2 GiB of chunks

    def batch_started(self) -> None:
        """The writer is about to change the tables (writer thread): forget every remembered location."""
        self._epoch += 1
        self._hit_index.clear()

    def batch_ended(self) -> None:
        """The batch committed or failed (writer thread): forget again what was remembered meanwhile."""
        self._hit_index.clear()
        self._epoch += 1

    def _remember(self, key: Key, value: bytes, epoch: int) -> None:
        """Keep `value`, read from LMDB while `_epoch` was `epoch`, unless a batch ran since (then it may be stale).

        Stored first, checked after: a batch that starts before the store clears it; one that starts and
        ends between the read and the store moves the epoch on, and the value is taken back out.
        """
        index = self._hit_index
        if epoch & 1 or len(index) >= self.HIT_INDEX_LIMIT:
            return
        if len(value) > self._run_value_len and value[4] & RUN and U32.unpack_from(value)[0] == self.chunk_size:
            value = value[: self._run_value_len]  # a whole run is read with its checks alone: not its pages' names
        index[key] = value
        if self._epoch != epoch:
            index.pop(key, None)

    def read_chunk(self, ino: int, gen: int, chunk: int, lo: int = 0, hi: int | None = None) -> bytes | None:
        key = pack_key(ino, gen, chunk)
        with self.env.begin(db=self.tables.loc, buffers=True) as txn:
            data = self.chunk_in(txn, key, lo, hi)
        if data is None:
            self.counters["misses"] += 1
            return None
        self.counters["hits"] += 1
        self.eviction.touch(key)
        return data

    def read_chunks(self, ino: int, gen: int, first: int, last: int, lo: int = 0, hi: int | None = None) -> list[bytes | None]:
        out: list[bytes | None] = []
        hits: list[Key] = []
        cs = self.chunk_size
        with self.env.begin(db=self.tables.loc, buffers=True) as txn:
            for c in range(first, last + 1):
                key = pack_key(ino, gen, c)
                data = self.chunk_in(txn, key, lo if c == first else 0, hi if c == last else None)
                out.append(data)
                if data is None:
                    continue
                hits.append(key)
                if len(data) < (hi if c == last and hi is not None else cs) - (lo if c == first else 0):
                    out.extend([None] * (last - c))  # end of file
                    break
        self.counters["hits"] += len(hits)
        self.counters["misses"] += len(out) - len(hits)
        for key in hits:
            self.eviction.touch(key)
        return out

    def _run_pages(self, value: bytes | memoryview, lo: int, hi: int | None) -> bytes | None:
        """`chunk_of`'s common case in as few steps as Python allows: bytes [lo, hi) of a full-length chunk in
        one run of slots, only its pages copied, each checked (the chunk digest when all of them are read).

        None when the value is anything else, or when a check fails (`chunk_of` then decides, and counts it).
        """
        try:
            length, flags, chunk_digest, slot = self._whole_run_head(value)
        except struct.error:  # too short to be a whole run: a chunk of holes
            return None
        cs = self.chunk_size
        if not flags & RUN or length != cs or slot + (cs >> SHIFT) > self.slab.nslots or lo < 0:
            return None
        if hi is None or hi > cs:
            hi = cs
        if lo >= hi:
            return None
        p0, p1 = lo >> SHIFT, (hi - 1) >> SHIFT
        a = (slot + p0) << SHIFT
        data = self.slab.map[a : a + ((p1 + 1 - p0) << SHIFT)]  # copy first, verify the copy: a slot may be reused now
        digest, seed = xxhash.xxh3_128_digest, self._seed
        if p1 == p0:
            at = self._run_checks_at + 16 * p0
            if digest(data, seed) != value[at : at + 16]:
                return None
        elif p0 == 0 and p1 == (cs >> SHIFT) - 1:
            if digest(data, seed) != chunk_digest:
                return None
        else:
            view = memoryview(data)
            at = self._run_checks_at + 16 * p0
            for j in range(p1 + 1 - p0):
                if digest(view[j << SHIFT : (j + 1) << SHIFT], seed) != value[at + 16 * j : at + 16 * j + 16]:
                    return None
        lo -= p0 << SHIFT
        hi -= p0 << SHIFT
        return data if lo == 0 and hi == len(data) else data[lo:hi]

    def chunk_in(self, txn: lmdb.Transaction, key: Key, lo: int = 0, hi: int | None = None) -> bytes | None:
        """Bytes [lo, hi) of one chunk as `txn` sees it, verified; None if absent or a page read fails its check."""
        value = txn.get(key, db=self.tables.loc)
        if value is None:
            return None
        return self.chunk_of(value, lo, hi)

    def chunk_of(self, value: bytes | memoryview, lo: int = 0, hi: int | None = None) -> bytes | None:
        """Bytes [lo, hi) of the chunk whose loc value is `value`, verified; None if a page read fails its check."""
        data = self._run_pages(value, lo, hi)  # the common case: a full-length chunk in one run of slots
        if data is not None:
            return data
        # Everything else, and a run whose check failed (read again here, and counted).
        seed = self._seed
        length, flags, chunk_digest, npages, refs_at, first_slot = loc_head(value)
        if hi is None or hi > length:
            hi = length
        lo = max(lo, 0)
        if lo >= hi:
            return b""
        mm = self.slab.map
        whole = lo == 0 and hi == length
        if flags & RUN:
            if first_slot + npages > self.slab.nslots:
                self.counters["verify_failures"] += 1
                return None
            base = first_slot << SHIFT
            if whole:
                # Copy first, verify the copy: the writer may be reusing a slot right now.
                data = mm[base : base + length]
                if xxhash.xxh3_128_digest(data, seed) != chunk_digest:
                    self.counters["verify_failures"] += 1
                    return None
                return data
            p0, p1 = lo >> SHIFT, (hi - 1) >> SHIFT
            data = mm[base + (p0 << SHIFT) : base + ((p1 + 1) << SHIFT)]
            digests = page_digests(value, refs_at, npages, p0, p1)
            view = memoryview(data)
            for j in range(p1 - p0 + 1):
                if xxhash.xxh3_128_digest(view[j << SHIFT : (j + 1) << SHIFT], seed) != digests[16 * j : 16 * j + 16]:
                    self.counters["verify_failures"] += 1
                    return None
        else:
            p0, p1 = (0, npages - 1) if whole else (lo >> SHIFT, (hi - 1) >> SHIFT)
            present, n, arrays = loc_refs(value, refs_at)
            k = (present & ((1 << p0) - 1)).bit_count()  # index of page p0's slot, if stored
            parts: list[bytes] = []
            checks: list[tuple[int, bytes]] = []
            start = end = -1
            nslots = self.slab.nslots
            for i in range(p0, p1 + 1):
                if present >> i & 1:
                    slot = arrays[k]
                    if slot >= nslots:
                        self.counters["verify_failures"] += 1
                        return None
                    if not whole:
                        checks.append(((i - p0) << SHIFT, arrays[n + k]))
                    k += 1
                    if slot == end:
                        end += 1
                        continue
                    if end >= 0:
                        parts.append(mm[start << SHIFT : end << SHIFT])
                    start, end = slot, slot + 1
                else:
                    if end >= 0:
                        parts.append(mm[start << SHIFT : end << SHIFT])
                        end = -1
                    parts.append(ZERO_PAGE)
            if end >= 0:
                parts.append(mm[start << SHIFT : end << SHIFT])
            data = parts[0] if len(parts) == 1 else b"".join(parts)
            if whole:
                if len(data) != length:
                    data = data[:length]
                if xxhash.xxh3_128_digest(data, seed) != chunk_digest:
                    self.counters["verify_failures"] += 1
                    return None
                return data
            view = memoryview(data)
            for off, digest in checks:
                if xxhash.xxh3_128_digest(view[off : off + PAGE_SIZE], seed) != digest:
                    self.counters["verify_failures"] += 1
                    return None
        lo -= p0 << SHIFT
        hi -= p0 << SHIFT
        return data if lo == 0 and hi == len(data) else data[lo:hi]

    def read_span(
        self, ino: int, gen: int, first: int, last: int, lo: int = 0, hi: int | None = None, missing: Any = None
    ) -> bytes | memoryview | None:
        if first == last:
            # One chunk (every request of 64 KiB or less that does not straddle two): its location from the
            # hit index, else LMDB; copied straight out of the map into a bytes of the request's pages.
            key = pack_key(ino, gen, first)
            value = self._hit_index.get(key)
            if value is None:
                epoch = self._epoch
                with self.env.begin(db=self.tables.loc) as txn:
                    value = txn.get(key)
                if value is None:
                    if missing is not None:
                        self.counters["misses"] += 1
                    return missing
                self._remember(key, value, epoch)
            data = self.chunk_of(value, lo, hi)
            if data is None:
                return None
            if data:
                self.counters["hits"] += 1
                self.eviction.touch(key)
            return data
        cs = self.chunk_size
        slab, nslots = self.slab.view, self.slab.nslots
        full_pages = cs >> SHIFT
        whole_from = first if lo <= 0 else first + 1  # chunks from here to whole_to are read whole
        whole_to = last if hi is None or hi >= cs else last - 1
        digest, seed = xxhash.xxh3_128_digest, self._seed
        whole_head = self._whole_run_head
        pos = begin = 0
        keys = []
        with self.env.begin(db=self.tables.loc, buffers=True) as txn:
            head = txn.get(pack_key(ino, gen, first))
            if head is None:
                return None  # a miss (the cold path): no buffer zeroed for nothing (1 MiB: ~0.1 ms, more if never touched)
            if whole_from == first and whole_to == last:
                whole = self._whole_runs(txn, head, ino, gen, first, last)
                if whole is not _NOT_RUNS:
                    return whole
            buf = bytearray((last - first + 1) * cs)  # zeros: holes are not copied
            view = memoryview(buf)
            for c in range(first, last + 1):
                key = pack_key(ino, gen, c)
                value = head if c == first else txn.get(key)
                if value is None:
                    return None
                if whole_from <= c <= whole_to:
                    try:
                        length, flags, chunk_digest, slot = whole_head(value)
                    except struct.error:  # too short to be a whole run: a chunk of holes
                        flags = 0
                    if flags & RUN and length == cs:
                        # The common case: a whole chunk, one run of slots: one copy, one hash.
                        if slot + full_pages > nslots:
                            self.counters["verify_failures"] += 1
                            return None
                        view[pos : pos + cs] = slab[slot << SHIFT : (slot << SHIFT) + cs]
                        if digest(view[pos : pos + cs], seed) != chunk_digest:
                            self.counters["verify_failures"] += 1
                            return None
                        keys.append(key)
                        pos += cs
                        continue
                length, flags, chunk_digest, npages, head, slot = loc_head(value)
                clo = lo if c == first else 0
                chi = length if c != last or hi is None or hi > length else hi
                if clo >= chi:
                    break  # the request starts at or past the end of the file
                keys.append(key)
                whole = clo == 0 and chi == length
                p0, p1 = (0, npages - 1) if whole else (clo >> SHIFT, (chi - 1) >> SHIFT)
                if c == first:
                    begin = clo - (p0 << SHIFT)
                if flags & RUN:
                    if slot + npages > nslots:
                        self.counters["verify_failures"] += 1
                        return None
                    a = (slot + p0) << SHIFT
                    n = length if whole else (p1 + 1 - p0) << SHIFT
                    view[pos : pos + n] = slab[a : a + n]
                    checks = [] if whole else list(zip(range(p0, p1 + 1), range(p0, p1 + 1), strict=True))
                    digests_at = head + 4 * npages
                else:
                    present, count, arrays = loc_refs(value, head)
                    k = (present & ((1 << p0) - 1)).bit_count()
                    checks = []
                    for i in range(p0, p1 + 1):
                        if present >> i & 1:
                            slot = arrays[k]
                            if slot >= nslots:
                                self.counters["verify_failures"] += 1
                                return None
                            at = pos + ((i - p0) << SHIFT)
                            view[at : at + PAGE_SIZE] = slab[slot << SHIFT : (slot + 1) << SHIFT]
                            checks.append((i, k))
                            k += 1
                    digests_at = head + 4 * count
                # Verify the copy: the writer may be reusing a slot right now.
                if whole:
                    ok = digest(view[pos : pos + length], seed) == chunk_digest
                    pos += length
                else:
                    ok = True
                    for i, k in checks:
                        at = pos + ((i - p0) << SHIFT)
                        d = digests_at + 16 * k
                        if digest(view[at : at + PAGE_SIZE], seed) != bytes(value[d : d + 16]):
                            ok = False
                            break
                    pos += chi - (p0 << SHIFT)  # the next chunk's bytes follow this one's
                if not ok:
                    self.counters["verify_failures"] += 1
                    return None
                if length < cs:
                    break  # end of file
        self.counters["hits"] += len(keys)
        for key in keys:
            self.eviction.touch(key)
        return view[begin:pos].toreadonly()

    def _whole_runs(self, txn: Any, head: Any, ino: int, gen: int, first: int, last: int) -> bytes | object | None:
        """`read_span` of whole chunks first..last when every one is a full-length run of slots (a chunk-aligned
        request of several chunks: what a guest's large reads are): the slab's runs joined into one `bytes` (no
        zeroed buffer first: 1 MiB saves its zeroing, ~24 µs), then each chunk checked in that copy. None: a miss
        or a failed check (counted); _NOT_RUNS: some chunk is not a whole run (holes, a short or scattered
        chunk), nothing counted, for the general path. `head` is chunk `first`'s value, read in `txn`."""
        cs, shift = self.chunk_size, SHIFT
        full, nslots, slab = cs >> shift, self.slab.nslots, self.slab.view
        whole_head = self._whole_run_head
        runs: list[memoryview] = []
        sums: list[bytes] = []
        keys: list[bytes] = []
        for c in range(first, last + 1):
            key = pack_key(ino, gen, c)
            value = head if c == first else txn.get(key)
            if value is None:
                return None
            try:
                length, flags, chunk_digest, slot = whole_head(value)
            except struct.error:  # too short to be a whole run: a chunk of holes
                return _NOT_RUNS
            if not flags & RUN or length != cs:
                return _NOT_RUNS
            if slot + full > nslots:
                self.counters["verify_failures"] += 1
                return None
            runs.append(slab[slot << shift : (slot << shift) + cs])
            sums.append(chunk_digest)
            keys.append(key)
        data = b"".join(runs)  # the one copy
        runs.clear()  # (no view of the slab outlives the copy)
        # Verify the copy: the writer may be reusing a slot right now.
        digest, seed = xxhash.xxh3_128_digest, self._seed
        with memoryview(data) as view:
            for i, chunk_digest in enumerate(sums):
                if digest(view[i * cs : (i + 1) * cs], seed) != chunk_digest:
                    self.counters["verify_failures"] += 1
                    return None
        self.counters["hits"] += len(keys)
        for key in keys:
            self.eviction.touch(key)
        return data

    def file_record(self, ino: int) -> tuple[int, Version] | None:
        with self.env.begin(db=self.tables.files, buffers=True) as txn:
            value = txn.get(INO.pack(ino))
            return None if value is None else decode_file(value)

    def location(self, ino: int, gen: int, chunk: int) -> Location | None:
        with self.env.begin(db=self.tables.loc, buffers=True) as txn:
            value = txn.get(pack_key(ino, gen, chunk))
            return None if value is None else decode_loc(value)

    def peer_chunk(self, ino: int, version: Version, chunk: int) -> bytes | None:
        """A chunk, verified, only if the record of `ino` has exactly `version`: one read transaction (a peer hit
        waits for it), so the bytes are those of that version."""
        with self.env.begin(buffers=True) as txn:
            value = txn.get(INO.pack(ino), db=self.tables.files)
            if value is None:
                return None
            gen, held = decode_file(value)
            if held != version:
                return None
            key = pack_key(ino, gen, chunk)
            data = self.chunk_in(txn, key)
            if data is None:
                self.counters["misses"] += 1
                return None
        self.counters["hits"] += 1
        self.eviction.touch(key)
        return data

    def chunk_digests(self, ino: int, gen: int, chunk: int) -> list[bytes] | None:
        loc = self.location(ino, gen, chunk)
        if loc is None:
            return None
        digests = [self.keys.zero_name] * ((loc.length + PAGE_SIZE - 1) >> SHIFT)
        for i, digest, _ in loc.pages():
            digests[i] = digest
        return digests

    def read_page(self, digest: bytes) -> bytes | None:
        if digest == self.keys.zero_name:
            return ZERO_PAGE
        with self.env.begin(db=self.tables.pages, buffers=True) as txn:
            value = txn.get(digest)
            if value is None:
                return None
            slot, _ = decode_page(value)
        if slot >= self.slab.nslots:
            self.counters["verify_failures"] += 1
            return None
        page = self.slab.map[slot << SHIFT : (slot + 1) << SHIFT]
        if self.keys.name(page) != digest:  # a peer's request: the name itself, not the (cheaper) check
            self.counters["verify_failures"] += 1
            return None
        return page

    def iter_keys(self, db: Any) -> Iterator[bytes]:
        """Every key of `db`, read in short transactions of _LIST_BATCH keys."""
        start = b""
        while True:
            with self.env.begin(db=db) as txn:
                cur = txn.cursor()
                if not cur.set_range(start):
                    return
                batch = []
                for key in cur.iternext(values=False):
                    batch.append(key)
                    if len(batch) == _LIST_BATCH:
                        break
            yield from batch
            if len(batch) < _LIST_BATCH:
                return
            start = batch[-1] + b"\x00"

    def iter_locations(self) -> Iterator[tuple[int, Version, int]]:
        with self.env.begin(db=self.tables.files) as txn:
            files = {INO.unpack(k)[0]: decode_file(v) for k, v in txn.cursor().iternext()}
        for key in self.iter_keys(self.tables.loc):
            ino, gen, chunk = unpack_key(key)
            rec = files.get(ino)
            if rec is not None and rec[0] == gen and rec[1] != UNKNOWN:  # a version not known is not offered
                yield ino, rec[1], chunk

    def pins(self) -> dict[int, str]:
        with self.env.begin(db=self.tables.meta, buffers=True) as txn:
            return decode_pins(txn.get(b"pins"))

    def held_chunks(self, ino: int, gen: int, first: int, last: int) -> set[int]:
        """Which of chunks first..last of (ino, gen) are held (keys only: nothing is read or verified)."""
        out = set()
        end = pack_key(ino, gen, last)
        with self.env.begin(db=self.tables.loc) as txn:
            cur = txn.cursor()
            if cur.set_range(pack_key(ino, gen, first)):
                for key in cur.iternext(values=False):
                    if key > end:
                        break
                    out.add(unpack_key(key)[2])
        return out

    def holds_any(self, ino: int, gen: int, first: int, last: int) -> bool:
        """Whether any of chunks first..last of (ino, gen) is held: one cursor seek, keys only."""
        with self.env.begin(db=self.tables.loc) as txn:
            cur = txn.cursor()
            return cur.set_range(pack_key(ino, gen, first)) and cur.key() <= pack_key(ino, gen, last)

    def keys_of(self, inos: Iterable[int]) -> list[Key]:
        """Every loc key of these inodes, any generation."""
        out: list[Key] = []
        with self.env.begin(db=self.tables.loc) as txn:
            cur = txn.cursor()
            for ino in sorted(inos):
                prefix = INO.pack(ino)
                if cur.set_range(prefix):
                    for key in cur.iternext(values=False):
                        if key[:8] != prefix:
                            break
                        out.append(bytes(key))
        return out

    def holdings(self, ino: int, gen: int) -> Holdings:
        """The chunks held of (ino, gen), their bytes, and how many of those bytes are pages shared with other chunks' files.

        One read transaction over the file's loc entries and their pages: run it off the loop for a large file.
        """
        out = Holdings()
        prefix = pack_key(ino, gen, 0)[:16]
        own: collections.Counter[bytes] = collections.Counter()
        with self.env.begin(buffers=True) as txn:
            cur = txn.cursor(db=self.tables.loc)
            if cur.set_range(prefix):
                for key, value in cur.iternext():
                    if bytes(key[:16]) != prefix:
                        break
                    loc = decode_loc(value)
                    out.chunks.append(unpack_key(key)[2])
                    out.chunk_bytes.append(loc.held_bytes())
                    out.cached_bytes += out.chunk_bytes[-1]
                    own.update(loc.digests)
            pages = txn.cursor(db=self.tables.pages)
            for digest, value in pages.getmulti(sorted(own)):
                n = own[bytes(digest)]
                if decode_page(value)[1] > n:
                    out.shared_bytes += n * PAGE_SIZE
        out.shared_bytes = min(out.shared_bytes, out.cached_bytes)
        return out

    def iter_files(self) -> list[int]:
        with self.env.begin(db=self.tables.files) as txn:
            return [INO.unpack(k)[0] for k in txn.cursor().iternext(values=False)]

    def totals(self) -> tuple[int, int, int]:
        """(loc entries, free slots, logical bytes), as the last commit left them."""
        with self.env.begin(buffers=True) as txn:
            chunks = txn.stat(self.tables.loc)["entries"]
            (free,) = U32.unpack(txn.get(b"free_slots", db=self.tables.meta))
            (logical,) = U64.unpack(txn.get(b"logical_bytes", db=self.tables.meta))
        return chunks, free, logical
