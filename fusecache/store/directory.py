"""The `Store`: one cache directory, open, with its reads (`reader.py`) and writes (`writer.py`) wired to the same files.

It builds each part from explicit handles (the LMDB environment and tables,
the slab, the eviction order, the counters), hands every call to the part
that owns it, and marks a clean shutdown on `close` (unless it was
`taint`ed: it missed changes, so the next open starts empty). `open_empty`
and `replace_files` rebuild it empty in place, for a degraded cache.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import Any

from fusecache.errors import QuietError
from fusecache.geometry import CHUNK_SIZE
from fusecache.stats import ShareStats, StoreStats
from fusecache.store.check import problems
from fusecache.store.eviction import EVICTIONS, Shares
from fusecache.store.layout import PAGE_SIZE, Location, pack_key
from fusecache.store.opening import CacheFiles
from fusecache.store.reader import Holdings, Reader
from fusecache.store.writer import WriteBatch, Writer, unpinned
from fusecache.version import Version

# Loc entries (chunks) per chunk of capacity: holes and dedup let a cache
# hold more chunks than its slots alone would bound, but metadata must stay
# bounded too.
CHUNKS_PER_CAPACITY_CHUNK = 8
COUNTERS = (
    "hits", "misses", "admitted_chunks", "skipped_chunks", "evicted_chunks", "dropped_chunks", "verify_failures", "healed_pages",
    "evicted_resident",
)  # fmt: skip


class Store:
    """Pages and chunks in one cache directory; see the package docstring for the rules."""

    page_size = PAGE_SIZE

    def __init__(
        self,
        cache_dir: str,
        capacity: int,
        *,
        chunk_size: int = CHUNK_SIZE,
        reset: bool = False,
        eviction: str = "s3fifo",
        names_key: bytes | None = None,
    ) -> None:
        """`names_key`: the key pages are named with (`identity.cluster_names_key` when peering), None: the cache's own."""
        self.cache_dir = os.path.abspath(cache_dir)
        self.chunk_size = chunk_size
        if chunk_size <= 0 or chunk_size % PAGE_SIZE:
            raise QuietError(f"cache dir {self.cache_dir}: chunk size {chunk_size} is not a multiple of {PAGE_SIZE}; pick one that is")
        if capacity < chunk_size:
            raise QuietError(
                f"cache dir {self.cache_dir}: cache size {capacity} bytes is smaller than one chunk ({chunk_size} bytes); "
                "pass a larger --cache-size"
            )
        nslots = capacity // PAGE_SIZE
        if nslots > 0xFFFFFFFF:
            raise QuietError(
                f"cache dir {self.cache_dir}: cache size {capacity} bytes is over the 16 TiB limit; pass a smaller --cache-size"
            )
        self.max_chunks = CHUNKS_PER_CAPACITY_CHUNK * (capacity // chunk_size)
        if eviction not in EVICTIONS:
            raise QuietError(f"unknown eviction policy {eviction!r}; choose one of {', '.join(EVICTIONS)}")
        # Per-owner shares over the chosen order: no guest's admissions flush another's chunks (eviction.Shares).
        self._eviction_name = eviction
        self._eviction = Shares(EVICTIONS[eviction], capacity // chunk_size)
        self._tainted = False
        self._names_key = names_key
        # Bumped from the loop and the writer thread without a lock: a lost count is harmless.
        self._counters = dict.fromkeys(COUNTERS, 0)
        self._files = CacheFiles(
            self.cache_dir,
            nslots,
            chunk_size=chunk_size,
            max_chunks=self.max_chunks,
            reset=reset,
            counters=self._counters,
            eviction=self._eviction,
            names_key=names_key,
        )
        self._nslots = nslots
        self._wire()

    def _wire(self) -> None:
        """The reader and the writer over the open files (at open, and after a rebuild)."""
        env, tables, slab, keys = self._files.env, self._files.tables, self._files.slab, self._files.keys
        assert env is not None and tables is not None and slab is not None and keys is not None
        self.keys = keys
        chunk_size = self.chunk_size
        self._reader = Reader(env, tables, slab, self._eviction, self._counters, chunk_size=chunk_size, keys=keys)
        # Pinned inodes' chunks stay out of the eviction order; only the writer changes this set.
        self._pinned = set(self._reader.pins())
        self._eviction.load(unpinned(self._files.order, self._pinned))
        self._writer = Writer(
            env, tables, slab, self._eviction, self._counters,
            chunk_size=chunk_size, max_chunks=self.max_chunks, pinned=self._pinned, keys=keys,
        )  # fmt: skip

    # --- reads (any thread, lock-free) -----------------------------------

    def read_chunk(self, ino: int, gen: int, chunk: int, lo: int = 0, hi: int | None = None) -> bytes | None:
        """Bytes [lo, hi) of the chunk, clamped to its length (shorter than chunk_size at EOF), verified.

        None if the chunk is absent or a page overlapping [lo, hi) fails its check.
        Only those pages are read; the whole chunk is checked with one hash.
        """
        return self._reader.read_chunk(ino, gen, chunk, lo, hi)

    def read_chunks(self, ino: int, gen: int, first: int, last: int, lo: int = 0, hi: int | None = None) -> list[bytes | None]:
        """`read_chunk` of chunks first..last under one read transaction: one request's chunks.

        lo is the offset of the request in chunk `first`, hi its end in chunk
        `last` (None: the chunk's end); the chunks between are read whole. One
        entry per chunk; after a chunk shorter than chunk_size (end of file)
        the entries are None, not looked up.
        """
        return self._reader.read_chunks(ino, gen, first, last, lo, hi)

    def read_span(
        self, ino: int, gen: int, first: int, last: int, lo: int = 0, hi: int | None = None, missing: Any = None
    ) -> bytes | memoryview | None:
        """A whole request in one buffer, copied once: chunks first..last as `read_chunks` reads them, joined.

        Every chunk is copied straight into one buffer and verified there (the
        chunk digest for a whole chunk, page digests for the pages of a
        partial first or last one), so no second copy joins them. Returns a
        read-only memoryview, or bytes for a request inside one chunk (pyfuse3
        replies from any buffer), shorter at end of file; None unless every chunk is a verified hit, and then counts
        no hits or misses: ask `read_chunks` for the per-chunk answer. `missing` (not None): returned instead, the
        miss counted, when the request is inside one chunk and the index has no entry for it (a miss, as
        `all_missing` would say: no second look needed).
        """
        return self._reader.read_span(ino, gen, first, last, lo, hi, missing)

    def file_record(self, ino: int) -> tuple[int, Version] | None:
        """(gen, version) recorded for `ino`, or None."""
        return self._reader.file_record(ino)

    def location(self, ino: int, gen: int, chunk: int) -> Location | None:
        """A held chunk's loc entry, decoded (its pages, slots, digests), or None."""
        return self._reader.location(ino, gen, chunk)

    def chunk_digests(self, ino: int, gen: int, chunk: int) -> list[bytes] | None:
        """Name of each page of a held chunk (`keys.zero_name` for a hole), or None: what a peer asks for."""
        return self._reader.chunk_digests(ino, gen, chunk)

    def read_page(self, digest: bytes) -> bytes | None:
        """One page (4096 bytes) by name, verified; None if not held."""
        return self._reader.read_page(digest)

    def iter_digests(self) -> Iterator[bytes]:
        """Every stored page's name."""
        return self._reader.iter_keys(self._reader.tables.pages)

    def read_location(self, ino: int, version: tuple[int, int, int, int], chunk: int) -> bytes | None:
        """For a peer: the chunk, verified, only if the held record of `ino` has exactly `version`."""
        return self._reader.peer_chunk(ino, version, chunk)

    def iter_locations(self) -> Iterator[tuple[int, Version, int]]:
        """(ino, version, chunk) of every held chunk of a file's current generation: the peers' location summary."""
        return self._reader.iter_locations()

    def all_missing(self, ino: int, gen: int, first: int, last: int) -> bool:
        """Whether the store holds none of chunks first..last (one scan of the index's keys); if so they count as
        misses, as `read_chunks` would count them. The cold path's look-up: nothing is decoded or copied."""
        if self._reader.holds_any(ino, gen, first, last):
            return False
        self._counters["misses"] += last - first + 1
        return True

    def held_chunks(self, ino: int, gen: int, first: int, last: int) -> set[int]:
        """Which of chunks first..last of (ino, gen) the store holds (one read transaction, keys only)."""
        return self._reader.held_chunks(ino, gen, first, last)

    def pins(self) -> dict[int, str]:
        """The pinned inodes, as committed (ino -> the image path it was pinned by)."""
        return self._reader.pins()

    def holdings(self, ino: int, gen: int) -> Holdings:
        """What is held of one generation of a file: chunks, bytes, bytes shared with other files (a scan: off the loop)."""
        return self._reader.holdings(ino, gen)

    def iter_files(self) -> list[int]:
        """The inode of every file with a record (for dropping the whole cache)."""
        return self._reader.iter_files()

    def stats(self) -> StoreStats:
        chunks, free, logical = self._reader.totals()
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
            shares=self.shares(),
            **self._counters,
        )

    def shares(self) -> dict[str, ShareStats]:
        """Per owner (guest, the host, chunks of an earlier run): chunks held and the share it is owed."""
        share = self._eviction.share()
        return {owner: ShareStats(held_chunks=n, share_chunks=share) for owner, n in self._eviction.held().items()}

    def check(self) -> list[str]:
        """Problems the integrity checker finds (empty: consistent). Only while no batch is being applied."""
        r = self._reader
        with r.env.begin(buffers=True) as txn:
            return problems(txn, r.tables, r.slab.view, r.slab.nslots, self.chunk_size, self.keys)

    # --- writes (one writer thread) --------------------------------------

    def apply(self, batch: WriteBatch) -> None:
        """Apply one batch: releases and evictions commit first, then admissions (see the package docstring)."""
        reader = self._reader
        reader.batch_started()  # the hit index forgets every location before any changes
        try:
            self._writer.apply(batch)
        finally:
            reader.batch_ended()

    def evict_first(self, keys: Iterable[tuple[int, int, int]]) -> None:
        """Hint (any thread): these (ino, gen, chunk) are held by a guest itself; when room is needed they go first."""
        self._writer.evict_first.add(pack_key(*k) for k in keys)

    def close(self) -> None:
        """Make everything durable and mark a clean shutdown (a tainted store: close so that the next open starts empty)."""
        if self._tainted:
            self._files.close_tainted()
        else:
            # Pinned chunks last: the saved order must hold every loc key to be used at the next open.
            self._files.close_clean(self._eviction.order() + self._reader.keys_of(self._pinned))

    def taint(self) -> None:
        """The store missed a drop or a record it was given: it must not be trusted after a restart."""
        self._tainted = True

    # --- rebuilding (a degraded cache) -----------------------------------

    def close_files(self) -> None:
        """Close the open files without the clean mark, before `open_empty` (their room is needed); reads fail until
        `replace_files` (on the thread that reads the store)."""
        self._tainted = True
        self._files.close()

    def open_empty(self) -> CacheFiles:
        """This cache directory wiped and opened empty (any thread, after `close_files`), for `replace_files`."""
        return CacheFiles(
            self.cache_dir,
            self._nslots,
            chunk_size=self.chunk_size,
            max_chunks=self.max_chunks,
            reset=True,
            counters=self._counters,
            eviction=Shares(EVICTIONS[self._eviction_name], self._nslots * PAGE_SIZE // self.chunk_size),
            names_key=self._names_key,
            owned=True,
        )

    def replace_files(self, files: CacheFiles) -> None:
        """Serve from `files` (from `open_empty`) from now on, and close the old ones (on the thread that reads the store)."""
        old = self._files
        self._files = files
        self._eviction = files.eviction
        self._tainted = False
        self._wire()
        old.close()

    def abandon(self) -> None:
        """Close without the clean-shutdown mark: what a killed process leaves (tests of recovery use it)."""
        self._files.close()
