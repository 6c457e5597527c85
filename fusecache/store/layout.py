"""The store's on-disk format: the LMDB tables' keys and values and the slab of pages, each encoded and decoded here once.

Format version FORMAT_VERSION; all integers big-endian.

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
  host that last opened it; b"clean" -> b"\\x01" after a clean close, b"\\x00"
  while open; b"slots" -> u32 slot count of pages.slab; b"free_slots" -> u32
  total of the free extents; b"logical_bytes" -> u64 non-hole bytes held by
  loc entries; b"order" (only after a clean close) -> the loc keys in
  eviction order, victim first; b"pins" (only once something was pinned) -> JSON
  {"INO": LABEL, ...}: the inodes whose chunks eviction never takes, each with
  a string the store does not read (`pins.py` keeps its record there: the
  file's path and the pins that cover it).
- `pages.slab`: slot s holds a page at byte offset s * 4096.

A loc value is decoded two ways, both here: `decode_loc` into a `Location`
(the writer, the checker, peers' digest lists), and the hit path's fast view
(`whole_run_head`, `loc_head`, `page_digests`, `loc_refs`), which reads only the
fields a read needs without building lists.
"""

from __future__ import annotations

import dataclasses
import json
import mmap
from collections.abc import Iterable
from struct import Struct
from typing import Any, NamedTuple

import xxhash

from fusecache.geometry import CHUNK_SIZE, PAGE_SIZE
from fusecache.version import Version

__all__ = ["CHUNK_SIZE", "PAGE_SIZE"]

FORMAT_VERSION = 2
PROGRAM = "fusecache"
ZERO_PAGE = bytes(PAGE_SIZE)
# Stands for a hole in a chunk's digest list; reading it gives zeros.
ZERO_DIGEST = xxhash.xxh3_128_digest(ZERO_PAGE)
SHIFT = PAGE_SIZE.bit_length() - 1  # offset >> SHIFT = page index
LMDB_DIR = "meta.lmdb"
SLAB_FILE = "pages.slab"
TABLES = (b"meta", b"files", b"loc", b"pages", b"free")

LOC_KEY = Struct(">QQI")  # ino, gen, chunk number
INO = Struct(">Q")  # a files key, and the prefix of an inode's loc keys
U32 = Struct(">I")  # a slot number; meta slots and free_slots; a free extent's key (first slot) and value (count)
U64 = Struct(">Q")  # meta logical_bytes
LOC_HEAD = Struct(">IB16s")  # length, flags, chunk digest
RUN = 1  # loc flag: every page stored, in consecutive slots
_FILE = Struct(">Q4q")
_PAGE = Struct(">II")

Key = bytes  # a packed loc key: LOC_KEY.pack(ino, gen, chunk)

pack_key = LOC_KEY.pack
unpack_key = LOC_KEY.unpack


class Tables(NamedTuple):
    """The named LMDB databases of one open environment."""

    meta: Any
    files: Any
    loc: Any
    pages: Any
    free: Any


@dataclasses.dataclass
class Slab:
    """pages.slab, open: the fd the writer writes pages with and the read-only map readers copy from."""

    fd: int
    nslots: int
    map: mmap.mmap
    view: memoryview  # of `map`: slices of it copy nothing until assigned into a buffer


def pages_of(length: int) -> int:
    """Pages of a chunk of `length` bytes (a partial last page counts)."""
    return (length + PAGE_SIZE - 1) >> SHIFT


def format_marker(chunk_size: int) -> bytes:
    return json.dumps({"program": PROGRAM, "format": FORMAT_VERSION, "page_size": PAGE_SIZE, "chunk_size": chunk_size}).encode()


# --- files ---------------------------------------------------------------------


def encode_file(gen: int, version: tuple[int, int, int, int]) -> bytes:
    return _FILE.pack(gen, *version)


def decode_file(value: bytes | memoryview) -> tuple[int, Version]:
    """A files value -> (generation, version)."""
    gen, size, mtime_ns, ctime_ns, change = _FILE.unpack(value)
    return gen, Version(size, mtime_ns, ctime_ns, change)


def file_gen(value: bytes | memoryview) -> int:
    return U64.unpack_from(value)[0]


# --- pins ----------------------------------------------------------------------


def encode_pins(pins: dict[int, str]) -> bytes:
    return json.dumps({str(ino): path for ino, path in sorted(pins.items())}).encode()


def decode_pins(raw: bytes | memoryview | None) -> dict[int, str]:
    """The pinned inodes (a malformed value pins nothing: pins are a preference, the cache stays usable)."""
    if raw is None:
        return {}
    try:
        obj = json.loads(bytes(raw))
        return {int(ino): str(path) for ino, path in obj.items()}
    except (ValueError, AttributeError, TypeError):
        return {}


# --- pages ---------------------------------------------------------------------


def encode_page(slot: int, refcount: int) -> bytes:
    return _PAGE.pack(slot, refcount)


def decode_page(value: bytes | memoryview) -> tuple[int, int]:
    """A pages value -> (slot, refcount)."""
    return _PAGE.unpack(value)


# --- loc -----------------------------------------------------------------------

_REFS: dict[int, Struct] = {}


def refs_struct(n: int) -> Struct:
    """n slots then n digests: a loc value's arrays, unpacked in one call."""
    st = _REFS.get(n)
    if st is None:
        st = _REFS[n] = Struct(f">{n}I" + "16s" * n)
    return st


class Location(NamedTuple):
    """A loc value, decoded whole."""

    length: int
    flags: int
    chunk_digest: bytes
    present: int  # bit i set: page i is stored; clear: a hole
    slots: tuple[int, ...]  # of the stored pages, in page order
    digests: tuple[bytes, ...]  # of the stored pages, in page order

    @property
    def run(self) -> bool:
        return bool(self.flags & RUN)

    def pages(self) -> list[tuple[int, bytes, int]]:
        """(page index, digest, slot) of each stored page."""
        npages = pages_of(self.length)
        n = len(self.slots)
        indexes = range(npages) if n == npages else [i for i in range(npages) if self.present >> i & 1]
        return list(zip(indexes, self.digests, self.slots, strict=True))

    def held_bytes(self) -> int:
        return held_bytes(self.length, self.present)


def decode_loc(value: bytes | memoryview) -> Location:
    length, flags, chunk_digest = LOC_HEAD.unpack_from(value)
    at = LOC_HEAD.size + ((pages_of(length) + 7) >> 3)
    present = int.from_bytes(value[LOC_HEAD.size : at], "little")
    n = present.bit_count()
    arrays = refs_struct(n).unpack_from(value, at)
    return Location(length, flags, chunk_digest, present, arrays[:n], arrays[n:])


def loc_size(length: int, stored: int) -> int:
    """Bytes of a loc value of a chunk of `length` bytes with `stored` pages (the checker's sanity bound)."""
    return LOC_HEAD.size + ((pages_of(length) + 7) >> 3) + 20 * stored


def encode_loc(length: int, chunk_digest: bytes, present: int, slots: list[int], digests: list[bytes]) -> bytes:
    """present: bit i set for each stored page i; slots and digests: of the stored pages, in page order."""
    npages = pages_of(length)
    n = len(slots)
    run = n == npages and n > 0 and slots[-1] - slots[0] == n - 1 and slots == list(range(slots[0], slots[0] + n))
    return (
        LOC_HEAD.pack(length, RUN if run else 0, chunk_digest)
        + present.to_bytes((npages + 7) >> 3, "little")
        + refs_struct(n).pack(*slots, *digests)
    )


def held_bytes(length: int, present: int) -> int:
    """Non-hole bytes of a chunk (logical bytes for the dedup ratio)."""
    if not length:
        return 0
    last = (length - 1) >> SHIFT
    held = present.bit_count() << SHIFT
    return held - ((last + 1) << SHIFT) + length if present >> last & 1 else held


# The hit path's view: the fields a read needs, straight from the value's bytes.


def loc_head(value: bytes | memoryview) -> tuple[int, int, bytes, int, int, int]:
    """(length, flags, chunk digest, pages, refs_at, first slot): refs_at is where the slot array starts.

    The first slot is that of a RUN chunk (its pages are slots first..first+pages-1), else -1: one
    call gives the common hit everything it needs.
    """
    length, flags, chunk_digest = LOC_HEAD.unpack_from(value)
    npages = (length + PAGE_SIZE - 1) >> SHIFT
    refs_at = LOC_HEAD.size + ((npages + 7) >> 3)
    return length, flags, chunk_digest, npages, refs_at, U32.unpack_from(value, refs_at)[0] if flags & RUN else -1


def whole_run_head(chunk_size: int) -> Struct:
    """The common hit's one-call view of a loc value: (length, flags, chunk digest, first slot).

    Meaningful only when flags has RUN and length == chunk_size (a whole chunk in one run of
    slots): otherwise read the value with `loc_head`. A value shorter than the struct (a chunk
    of holes) raises struct.error.
    """
    return Struct(f">IB16s{(pages_of(chunk_size) + 7) >> 3}xI")


def page_digests(value: bytes | memoryview, refs_at: int, stored: int, k0: int, k1: int) -> bytes:
    """The digests of stored pages k0..k1 (indexes among the stored pages), concatenated, 16 bytes each."""
    at = refs_at + 4 * stored + 16 * k0
    return bytes(value[at : at + 16 * (k1 - k0 + 1)])


def loc_refs(value: bytes | memoryview, refs_at: int) -> tuple[int, int, tuple[Any, ...]]:
    """(presence bitmap, stored pages n, (n slots..., n digests...)) of a chunk that is not one RUN."""
    present = int.from_bytes(value[LOC_HEAD.size : refs_at], "little")
    n = present.bit_count()
    return present, n, refs_struct(n).unpack_from(value, refs_at)


def runs(slots: Iterable[int]) -> list[tuple[int, int]]:
    """Ascending slots -> (first, count) of each run of consecutive ones."""
    out: list[tuple[int, int]] = []
    start = end = -1
    for slot in slots:
        if slot == end:
            end += 1
            continue
        if end >= 0:
            out.append((start, end - start))
        start, end = slot, slot + 1
    if end >= 0:
        out.append((start, end - start))
    return out
