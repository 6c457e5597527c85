"""The integrity checker: is a cache directory consistent with itself? Read-only; for tests and for `fusecache check CACHE_DIR`.

It checks the meta counters, the free extents (sorted, apart, inside the
slab, adding up to free_slots), the pages table (each slot distinct, in the
slab, not free, its refcount equal to the loc entries that name it, the
slab's bytes at the slot having its name), every loc entry (it decodes,
its pages are in the pages table at the slots it names, the RUN flag tells
the truth, each page's bytes have its check, the chunk's bytes its chunk
digest, logical bytes add up); names and checks are made with the cache's
`keys` file (`fusecache/identity.py`)
and the file records (a chunk of a recorded file has the record's generation).

A cache in use is not checked: the daemon holds an exclusive flock on
pages.slab and its writer reuses slots under any reader, so slab bytes read
beside it could disagree with the index without anything being wrong. The
check takes the same flock shared for its whole run (a daemon cannot start
meanwhile) and opens LMDB read-only without its lock file (no writer can
exist while the flock is held): nothing in the directory is written.
"""

from __future__ import annotations

import collections
import fcntl
import itertools
import mmap
import os
from typing import Any

import lmdb

from fusecache.errors import QuietError
from fusecache.identity import ContentKeys
from fusecache.store.layout import (
    INO,
    KEYS_FILE,
    LMDB_DIR,
    LOC_KEY,
    PAGE_SIZE,
    RUN,
    SHIFT,
    SLAB_FILE,
    TABLES,
    U32,
    U64,
    Tables,
    decode_file,
    decode_loc,
    decode_page,
    loc_size,
    pages_of,
)
from fusecache.store.opening import format_problem, read_marker

_SHOWN = 50  # problems printed by the command; the count says how many more


def problems(
    txn: lmdb.Transaction, tables: Tables, slab: memoryview | mmap.mmap, nslots: int, chunk_size: int, keys: ContentKeys
) -> list[str]:
    """Everything inconsistent in the store as `txn` sees it, one line each (empty: consistent)."""
    out: list[str] = []
    meta = {bytes(k): bytes(v) for k, v in txn.cursor(db=tables.meta)}
    for name, size in ((b"slots", 4), (b"free_slots", 4), (b"logical_bytes", 8)):
        if len(meta.get(name, b"")) != size:
            out.append(f"meta {name.decode()} is missing or malformed")
            return out
    (slots,) = U32.unpack(meta[b"slots"])
    (free_slots,) = U32.unpack(meta[b"free_slots"])
    (logical,) = U64.unpack(meta[b"logical_bytes"])
    if slots != nslots:
        out.append(f"meta slots says {slots}, the slab holds {nslots}")
    if meta.get(b"keys") != keys.fingerprint():
        out.append("meta keys is not the fingerprint of the keys file: its pages were named with other keys")
        return out

    # Free extents.
    extents = []
    for k, v in txn.cursor(db=tables.free):
        if len(k) != 4 or len(v) != 4:
            out.append(f"free extent {bytes(k).hex()} is malformed")
            continue
        extents.append((U32.unpack(k)[0], U32.unpack(v)[0]))
    for (a, n), (b, _) in itertools.pairwise(extents):
        if a + n > b:
            out.append(f"free extents at slot {a} (+{n}) and {b} overlap")
        elif a + n == b:
            out.append(f"free extents at slot {a} (+{n}) and {b} touch: they should have been merged")
    for a, n in extents:
        if n == 0 or a + n > nslots:
            out.append(f"free extent at slot {a} (+{n}) is empty or runs past the slab's end ({nslots} slots)")
    free = {slot for a, n in extents for slot in range(a, min(a + n, nslots))}
    if sum(n for _, n in extents) != free_slots:
        out.append(f"meta free_slots says {free_slots}, the free extents hold {sum(n for _, n in extents)}")

    # Pages: where each is, and that its bytes are there.
    pages: dict[bytes, tuple[int, int]] = {}
    owner: dict[int, bytes] = {}
    for k, v in txn.cursor(db=tables.pages):
        digest = bytes(k)
        if len(digest) != 16 or len(v) != 8:
            out.append(f"page {digest.hex()} has a malformed entry")
            continue
        slot, count = decode_page(v)
        pages[digest] = (slot, count)
        if slot >= nslots:
            out.append(f"page {digest.hex()} is at slot {slot}, past the slab's end ({nslots} slots)")
            continue
        if slot in owner:
            out.append(f"slot {slot} holds two pages ({owner[slot].hex()} and {digest.hex()})")
        owner[slot] = digest
        if slot in free:
            out.append(f"slot {slot} holds page {digest.hex()} and is also free")
        if keys.name(slab[slot << SHIFT : (slot + 1) << SHIFT]) != digest:
            out.append(f"slot {slot}: its bytes do not match page {digest.hex()}")
    if len(owner) + len(free) != nslots:
        out.append(f"{nslots - len(owner) - len(free)} slots are neither used by a page nor free")

    # Files, then loc entries.
    gens: dict[int, int] = {}
    for k, v in txn.cursor(db=tables.files):
        if len(k) != INO.size or len(v) != 40:
            out.append(f"file record {bytes(k).hex()} is malformed")
            continue
        gens[INO.unpack(k)[0]] = decode_file(v)[0]
    refs: collections.Counter[bytes] = collections.Counter()
    held = 0
    for k, v in txn.cursor(db=tables.loc):
        if len(k) != LOC_KEY.size:
            out.append(f"loc key {bytes(k).hex()} is malformed")
            continue
        ino, gen, chunk = LOC_KEY.unpack(k)
        where = f"chunk {chunk} of inode {ino} generation {gen}"
        try:
            loc = decode_loc(v)
        except Exception:  # struct.error and friends: any undecodable value is a finding, not a crash
            out.append(f"{where}: its loc entry does not decode")
            continue
        if len(v) != loc_size(loc.length, len(loc.slots)) or loc.length > chunk_size:
            out.append(f"{where}: its loc entry is {len(v)} bytes for a {loc.length}-byte chunk")
            continue
        if loc.present >> pages_of(loc.length):
            out.append(f"{where}: pages past its end are marked present")
        if ino in gens and gens[ino] != gen:
            out.append(f"{where}: the file's record is generation {gens[ino]}")
        held += loc.held_bytes()
        refs.update(loc.digests)
        buf = bytearray(pages_of(loc.length) << SHIFT)
        for (i, digest, slot), check in zip(loc.pages(), loc.checks, strict=True):
            rec = pages.get(digest)
            if rec is None:
                out.append(f"{where}: page {i} ({digest.hex()}) is not in the pages table")
            elif rec[0] != slot:
                out.append(f"{where}: page {i} names slot {slot}, the pages table slot {rec[0]}")
            if slot < nslots:
                buf[i << SHIFT : (i + 1) << SHIFT] = slab[slot << SHIFT : (slot + 1) << SHIFT]
                if keys.check(slab[slot << SHIFT : (slot + 1) << SHIFT]) != check:
                    out.append(f"{where}: page {i}'s bytes at slot {slot} do not match its check")
        run = (
            len(loc.slots) == pages_of(loc.length)
            and len(loc.slots) > 0
            and list(loc.slots) == list(range(loc.slots[0], loc.slots[0] + len(loc.slots)))
        )
        if bool(loc.flags & RUN) != run:
            out.append(
                f"{where}: its RUN flag is {'set' if loc.flags & RUN else 'clear'} but its slots {'are' if run else 'are not'} one run"
            )
        if keys.check(memoryview(buf)[: loc.length]) != loc.chunk_digest:
            out.append(f"{where}: its bytes in the slab do not match its chunk digest")
    for digest, (slot, count) in pages.items():
        if refs.get(digest, 0) != count:
            out.append(f"page {digest.hex()} at slot {slot} has refcount {count}, but {refs.get(digest, 0)} chunks name it")
    if held != logical:
        out.append(f"meta logical_bytes says {logical}, the chunks hold {held}")
    return out


class Report:
    """What a check of one cache directory found."""

    def __init__(self, cache_dir: str, found: list[str], counts: dict[str, int]) -> None:
        self.cache_dir = cache_dir
        self.problems = found
        self.counts = counts

    @property
    def consistent(self) -> bool:
        return not self.problems

    def verdict(self) -> str:
        c = self.counts
        what = f"{c['chunks']} chunks, {c['pages']} pages, {c['free']} of {c['slots']} slots free"
        if self.consistent:
            return f"{self.cache_dir}: consistent ({what})"
        return f"{self.cache_dir}: {len(self.problems)} problems ({what})"


def check_cache(cache_dir: str) -> Report:
    """Check a cache directory no process is using. QuietError (exit 2) if it is not a cache, or is in use."""
    cache_dir = os.path.abspath(cache_dir)
    lmdb_path, slab_path = os.path.join(cache_dir, LMDB_DIR), os.path.join(cache_dir, SLAB_FILE)

    def unusable(what: str, fix: str) -> QuietError:
        return QuietError(f"cache dir {cache_dir}: {what}; {fix}", exitcode=2)

    if not os.path.isdir(cache_dir):
        raise unusable("does not exist or is not a directory", "give the --cache-dir of a mount")
    if not os.path.isfile(os.path.join(lmdb_path, "data.mdb")) or not os.path.isfile(slab_path):
        raise unusable("is not a fusecache cache (no meta.lmdb or pages.slab)", "give the --cache-dir of a mount")
    try:
        fd = os.open(slab_path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise unusable(f"cannot open pages.slab: {e.strerror}", "run the check as the cache's owner")
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise unusable("is in use by a fusecache process", "unmount it (fusecache umount MOUNTPOINT), then check")
        try:
            env = lmdb.open(lmdb_path, readonly=True, lock=False, max_dbs=len(TABLES), subdir=True, create=False)
        except lmdb.Error as e:
            return Report(cache_dir, [f"meta.lmdb cannot be opened: {e}"], dict.fromkeys(("chunks", "pages", "free", "slots"), 0))
        try:
            return _check_env(cache_dir, env, fd, unusable)
        finally:
            env.close()
    finally:
        os.close(fd)


def _check_env(cache_dir: str, env: lmdb.Environment, fd: int, unusable: Any) -> Report:
    try:
        tables = Tables(*(env.open_db(name, create=False) for name in TABLES))
    except lmdb.NotFoundError:
        raise unusable("is not a fusecache cache (named databases missing)", "give the --cache-dir of a mount")
    with env.begin(buffers=True) as txn:
        marker = read_marker(txn.get(b"format", db=tables.meta))
        if marker is None:
            raise unusable("is not a fusecache cache (no format marker)", "give the --cache-dir of a mount")
        problem = format_problem(marker, None)
        if problem is not None:
            raise unusable(problem[0], "check it with the fusecache that wrote it")
        chunk_size = marker["chunk_size"]
        raw = txn.get(b"slots", db=tables.meta)
        nslots = U32.unpack(raw)[0] if raw is not None and len(raw) == 4 else 0
        size = os.fstat(fd).st_size
        counts = {
            "chunks": txn.stat(tables.loc)["entries"],
            "pages": txn.stat(tables.pages)["entries"],
            "free": sum(U32.unpack(v)[0] for v in txn.cursor(db=tables.free).iternext(keys=False) if len(v) == 4),
            "slots": nslots,
        }
        if size < nslots * PAGE_SIZE:
            return Report(cache_dir, [f"pages.slab is truncated ({size} bytes, expected {nslots * PAGE_SIZE})"], counts)
        keys = _read_keys(cache_dir, unusable)
        if nslots == 0:
            return Report(cache_dir, problems(txn, tables, b"", 0, chunk_size, keys), counts)  # type: ignore[arg-type]
        with mmap.mmap(fd, nslots * PAGE_SIZE, prot=mmap.PROT_READ) as slab_map:
            view = memoryview(slab_map)
            try:
                found = problems(txn, tables, view, nslots, chunk_size, keys)
            finally:
                view.release()
    return Report(cache_dir, found, counts)


def _read_keys(cache_dir: str, unusable: Any) -> ContentKeys:
    try:
        with open(os.path.join(cache_dir, KEYS_FILE), "rb") as f:
            keys = ContentKeys.from_bytes(f.read())
    except OSError as e:
        raise unusable(f"cannot read its keys file: {e.strerror}", "run the check as the cache's owner")
    if keys is None:
        raise unusable("its keys file is damaged", "mount it to start it empty")
    return keys


def main(cache_dir: str) -> int:
    """`fusecache check CACHE_DIR`: the verdict, then each problem; 0 when consistent, 1 when not (2 via QuietError)."""
    report = check_cache(cache_dir)
    print(report.verdict())
    for line in report.problems[:_SHOWN]:
        print(f"  {line}")
    if len(report.problems) > _SHOWN:
        print(f"  ... and {len(report.problems) - _SHOWN} more")
    return 0 if report.consistent else 1
