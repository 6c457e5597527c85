"""Writing the store: a batch of file records, drops and admissions applied in LMDB write transactions on the writer thread.

The `Writer` owns nothing but what it is given: the LMDB environment and its
tables, the open slab, the eviction order and the counters. A `WriteTxn` is
one write transaction's view: refcounts, free extents, slots and the eviction
order kept in step. The rules it keeps (one writer thread, releases commit
before admissions, page bytes written before the commit that references them)
are the package docstring's.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import os
from collections.abc import Callable, Set

import lmdb

from fusecache.identity import ContentKeys
from fusecache.store.eviction import HOST, EvictFirst, Eviction, Shares
from fusecache.store.layout import (
    INO,
    SHIFT,
    U32,
    U64,
    ZERO_PAGE,
    Key,
    Slab,
    Tables,
    decode_loc,
    decode_page,
    encode_file,
    encode_loc,
    encode_page,
    encode_pins,
    file_gen,
    held_bytes,
    pack_key,
    pages_of,
    runs,
    unpack_key,
)

# Admissions per stretch of Python work in `apply`; the LMDB and pwritev calls between stretches release the GIL,
# and the batch's `pace` is called between them.
ADMIT_SLICE = 4
MAKE_ROOM_SLICE = 32  # admissions weighed by `make_room` between two calls of `pace`
_IOV_MAX = 1024


def _no_peer_holds(digest: bytes) -> bool:
    return False


def _no_pace() -> None:
    pass


@dataclasses.dataclass
class WriteBatch:
    """One `Store.apply` call's worth of changes, applied in one go by the writer thread.

    Order: pins, forget_files, files, drop, then admit. An admission for a generation
    other than the file's recorded one is a read of a superseded version: skipped.
    peer_holds(name) tells eviction which pages a peer also holds: those are
    cheaper to lose (None: no peer holds anything). pins, when given, replaces
    the pinned inodes (ino -> a label the store keeps for its caller): their chunks
    leave the eviction order, and those of inodes no longer pinned return to it.
    owners names, per admitted (ino, gen, chunk), the guest it is admitted for
    (absent: the host); it is charged to that owner's share (`eviction.Shares`).
    pace() is called between short stretches of the writer's Python work (naming
    one chunk's pages, admitting one slice): it may sleep to leave the GIL to
    reads (`store_queue.Pacer`).
    """

    admit: list[tuple[int, int, int, bytes]] = dataclasses.field(default_factory=list)
    drop: list[tuple[int, int, int]] = dataclasses.field(default_factory=list)
    files: list[tuple[int, int, tuple[int, int, int, int]]] = dataclasses.field(default_factory=list)
    forget_files: list[int] = dataclasses.field(default_factory=list)
    peer_holds: Callable[[bytes], bool] | None = None
    pins: dict[int, str] | None = None
    owners: dict[tuple[int, int, int], str] = dataclasses.field(default_factory=dict)
    pace: Callable[[], None] | None = None


class Admission:
    """One chunk to admit, named and checked before the write transaction starts."""

    __slots__ = ("checks", "chunk_digest", "data", "key", "length", "owner", "pages", "present")

    def __init__(self, key: Key, data: bytes, keys: ContentKeys, owner: str = HOST) -> None:
        self.key = key
        self.owner = owner
        self.length = len(data)
        check, name, zero = keys.check, keys.name, keys.zero_check
        self.chunk_digest = check(data)
        npages = pages_of(self.length)
        if self.length != npages << SHIFT:
            data = bytes(data) + bytes((npages << SHIFT) - self.length)
        self.data = view = memoryview(data)
        # (page index, name) of the stored pages, and their checks in the same order; holes are left out.
        self.pages: list[tuple[int, bytes]] = []
        self.checks: list[bytes] = []
        for i in range(npages):
            page = view[i << SHIFT : (i + 1) << SHIFT]
            c = check(page)
            if c == zero and page == ZERO_PAGE:
                continue
            self.pages.append((i, name(page)))
            self.checks.append(c)
        if len(self.pages) == npages:
            self.present = (1 << npages) - 1
        else:
            self.present = 0
            for i, _ in self.pages:
                self.present |= 1 << i


class Writer:
    """Applies batches (one thread at a time: the cache's writer).

    `pinned` is the store's set of pinned inodes: their chunks are never in the
    eviction order (so never victims); the writer alone changes it, after the
    commit that records the change.
    """

    def __init__(
        self,
        env: lmdb.Environment,
        tables: Tables,
        slab: Slab,
        eviction: Eviction,
        counters: dict[str, int],
        *,
        chunk_size: int,
        max_chunks: int,
        keys: ContentKeys,
        pinned: set[int] | None = None,
    ) -> None:
        self.env, self.tables, self.slab, self.eviction, self.counters = env, tables, slab, eviction, counters
        self.keys = keys
        self.chunk_size = chunk_size
        self.max_chunks = max_chunks
        self.evict_first = EvictFirst()
        self.pinned: set[int] = pinned if pinned is not None else set()

    def apply(self, batch: WriteBatch) -> None:
        """Releases and evictions commit first, then admissions in a second transaction (package docstring)."""
        if any(len(data) > self.chunk_size for *_, data in batch.admit):
            raise ValueError(f"an admitted chunk is longer than the chunk size {self.chunk_size}")
        owners = batch.owners
        pace = batch.pace or _no_pace
        admissions = []
        for ino, gen, chunk, data in batch.admit:
            pace()
            admissions.append(Admission(pack_key(ino, gen, chunk), data, self.keys, owners.get((ino, gen, chunk), HOST)))
        peer_holds = batch.peer_holds or _no_peer_holds
        new_pins: set[int] | None = None
        try:
            with self.env.begin(write=True) as txn:
                w = self.txn(txn, peer_holds)
                if batch.pins is not None:
                    new_pins = set(batch.pins)
                    txn.put(b"pins", encode_pins(batch.pins), db=self.tables.meta)
                    w.repin(self.pinned, new_pins)
                for ino in batch.forget_files:
                    w.forget_file(ino)
                for ino, gen, version in batch.files:
                    w.record_file(ino, gen, version)
                for ino, gen, chunk in batch.drop:
                    key = pack_key(ino, gen, chunk)
                    if w.remove_chunk(key):
                        self.eviction.remove(key)
                        self.counters["dropped_chunks"] += 1
                admissions = w.make_room(admissions, pace)
                w.finish()
            if new_pins is not None:
                self.pinned.clear()
                self.pinned.update(new_pins)
            if admissions:
                with self.env.begin(write=True) as txn:
                    w = self.txn(txn, peer_holds)
                    w.admit(admissions, pace)
                    w.finish()
        except BaseException:
            # The eviction order was changed in step with a transaction that did not commit.
            with self.env.begin(db=self.tables.loc) as txn:
                keys = [bytes(k) for k in txn.cursor().iternext(values=False)]
            self.eviction.load(unpinned(keys, self.pinned))
            raise

    def txn(self, txn: lmdb.Transaction, peer_holds: Callable[[bytes], bool] = _no_peer_holds) -> WriteTxn:
        return WriteTxn(
            txn, self.tables, self.slab, self.eviction, self.counters,
            max_chunks=self.max_chunks, peer_holds=peer_holds, pinned=self.pinned, keys=self.keys,
            evict_first=self.evict_first,
        )  # fmt: skip


def unpinned(keys: list[Key], pinned: Set[int]) -> list[Key]:
    """The loc keys eviction may take: those of inodes not pinned."""
    if not pinned:
        return keys
    return [k for k in keys if INO.unpack_from(k)[0] not in pinned]


class WriteTxn:
    """The writer's view of one write transaction: refcounts, slots and the eviction order kept in step."""

    def __init__(
        self,
        txn: lmdb.Transaction,
        tables: Tables,
        slab: Slab,
        eviction: Eviction,
        counters: dict[str, int],
        *,
        max_chunks: int,
        peer_holds: Callable[[bytes], bool] = _no_peer_holds,
        keys: ContentKeys | None = None,
        pinned: Set[int] = frozenset(),
        evict_first: EvictFirst | None = None,
    ) -> None:
        self.txn, self.tables, self.slab, self.eviction, self.counters = txn, tables, slab, eviction, counters
        self.keys = keys  # needed only to admit (a resize only releases)
        self.max_chunks = max_chunks
        self.peer_holds = peer_holds
        self.pinned = pinned
        self.evict_first = evict_first
        (self.free_count,) = U32.unpack(txn.get(b"free_slots", db=tables.meta))
        (self.logical,) = U64.unpack(txn.get(b"logical_bytes", db=tables.meta))
        # Freed here, reusable only after this transaction commits.
        self.freed: list[int] = []

    def finish(self) -> None:
        for start, count in runs(sorted(slot for slot in self.freed if slot < self.slab.nslots)):
            self.free_run(start, count)
        self.freed = []
        self.txn.put(b"free_slots", U32.pack(self.free_count), db=self.tables.meta)
        self.txn.put(b"logical_bytes", U64.pack(self.logical), db=self.tables.meta)

    def free_run(self, start: int, count: int) -> None:
        """Add slots start..start+count-1 to the free extents, merged with adjacent ones."""
        txn, free = self.txn, self.tables.free
        self.free_count += count
        after = txn.pop(U32.pack(start + count), db=free)
        if after is not None:
            count += U32.unpack(after)[0]
        cur = txn.cursor(db=free)
        if (cur.set_range(U32.pack(start)) and cur.prev()) or cur.last():
            (prev,) = U32.unpack(cur.key())
            (prev_count,) = U32.unpack(cur.value())
            if prev < start and prev + prev_count == start:
                cur.put(cur.key(), U32.pack(prev_count + count))
                return
        txn.put(U32.pack(start), U32.pack(count), db=free)

    def alloc(self, n: int) -> list[tuple[int, int]]:
        """Take n free slots, lowest extents first: (first, count) runs. The caller checked n <= free_count."""
        out = []
        self.free_count -= n
        cur = self.txn.cursor(db=self.tables.free)
        if n and not cur.first():
            raise AssertionError("free extents do not add up to free_slots")
        while n > 0:
            (start,) = U32.unpack(cur.key())
            (count,) = U32.unpack(cur.value())
            cur.delete()
            if count > n:
                self.txn.put(U32.pack(start + n), U32.pack(count - n), db=self.tables.free)
                count = n
            out.append((start, count))
            n -= count
            if n and not cur.key():
                raise AssertionError("free extents do not add up to free_slots")
        return out

    def truncate(self) -> None:
        """Forget free extents past the slab's end (after a shrink)."""
        txn, free, end = self.txn, self.tables.free, self.slab.nslots
        cur = txn.cursor(db=free)
        if (cur.set_range(U32.pack(end)) and cur.prev()) or cur.last():
            (start,) = U32.unpack(cur.key())
            (count,) = U32.unpack(cur.value())
            if start < end < start + count:
                cur.put(cur.key(), U32.pack(end - start))
                self.free_count -= start + count - end
        if cur.set_range(U32.pack(end)):
            while cur.key():
                self.free_count -= U32.unpack(cur.value())[0]
                cur.delete()

    def free_slots(self) -> int:
        """Slots usable by the next transaction."""
        return self.free_count + len(self.freed)

    def release(self, value: bytes) -> list[bytes]:
        """Drop one reference to each page of a loc value; return the digests whose last reference went."""
        loc = decode_loc(value)
        digests = loc.digests
        self.logical -= loc.held_bytes()
        gone = []
        txn, pages = self.txn, self.tables.pages
        counts = dict.fromkeys(digests, 1)
        if len(counts) != len(digests):  # a page twice in the chunk
            counts = collections.Counter(digests)
        updates = []
        for digest, page in txn.cursor(db=pages).getmulti(list(counts)):
            slot, count = decode_page(page)
            count -= counts[digest]
            if count <= 0:
                txn.delete(digest, db=pages)
                self.freed.append(slot)
                gone.append(digest)
            else:
                updates.append((digest, encode_page(slot, count)))
        if updates:
            txn.cursor(db=pages).putmulti(updates)
        return gone

    def remove_chunk(self, key: Key) -> list[bytes] | None:
        """Delete one loc entry; the digests it freed, or None if it was not there."""
        value = self.txn.pop(key, db=self.tables.loc)
        return None if value is None else self.release(value)

    def _remove_ino(self, ino: int, keep_gen: int | None) -> None:
        prefix = INO.pack(ino)
        cur = self.txn.cursor(db=self.tables.loc)
        doomed = []
        if cur.set_range(prefix):
            for key in cur.iternext(values=False):
                if key[:8] != prefix:
                    break
                if keep_gen is None or unpack_key(key)[1] != keep_gen:
                    doomed.append(bytes(key))
        for key in doomed:
            self.remove_chunk(key)
            self.eviction.remove(key)
        self.counters["dropped_chunks"] += len(doomed)

    def _keys_of(self, ino: int) -> list[bytes]:
        prefix = INO.pack(ino)
        cur = self.txn.cursor(db=self.tables.loc)
        keys = []
        if cur.set_range(prefix):
            for key in cur.iternext(values=False):
                if key[:8] != prefix:
                    break
                keys.append(bytes(key))
        return keys

    def repin(self, old: Set[int], new: Set[int]) -> None:
        """Newly pinned inodes' chunks leave the eviction order; unpinned ones' return to it."""
        for ino in new - old:
            for key in self._keys_of(ino):
                self.eviction.remove(key)
        for ino in old - new:
            for key in self._keys_of(ino):
                self.eviction.insert(key)

    def forget_file(self, ino: int) -> None:
        self.txn.delete(INO.pack(ino), db=self.tables.files)
        self._remove_ino(ino, None)

    def record_file(self, ino: int, gen: int, version: tuple[int, int, int, int]) -> None:
        old = self.txn.get(INO.pack(ino), db=self.tables.files)
        self.txn.put(INO.pack(ino), encode_file(gen, version), db=self.tables.files)
        if old is None or file_gen(old) != gen:
            self._remove_ino(ino, gen)

    def weigh(self, key: Key) -> int:
        """-1: a peer holds every page evicting it would free; +1: most of its pages are shared; else 0."""
        value = self.txn.get(key, db=self.tables.loc)
        if value is None:
            return 0
        shared = freeable = peer = 0
        digests = sorted(set(decode_loc(value).digests))
        for digest, page in self.txn.cursor(db=self.tables.pages).getmulti(digests):
            if decode_page(page)[1] > 1:
                shared += 1
            else:
                freeable += 1
                peer += self.peer_holds(digest)
        if freeable and peer == freeable:
            return -1
        return 1 if shared > freeable else 0

    def make_room(self, admissions: list[Admission], pace: Callable[[], None] = _no_pace) -> list[Admission]:
        """Evict until the admissions fit; return those that will be admitted (all, unless the batch exceeds the cache)."""
        files, nslots = self.tables.files, self.slab.nslots
        fitting: list[Admission] = []
        digests: set[bytes] = set()
        shares = self.eviction if isinstance(self.eviction, Shares) else None
        share = shares.share() if shares is not None else 0
        incoming: dict[str, int] = collections.Counter()
        room = self.free_slots()  # slots free now: beyond its share, an owner admits only into these
        for n, a in enumerate(admissions):
            if n % MAKE_ROOM_SLICE == MAKE_ROOM_SLICE - 1:
                pace()
            ino, gen, _ = unpack_key(a.key)
            record = self.txn.get(INO.pack(ino), db=files)
            if record is not None and file_gen(record) != gen:
                self.counters["skipped_chunks"] += 1  # a read of a version already superseded
                continue
            new_digests = {d for _, d in a.pages} - digests
            if len(digests) + len(new_digests) > nslots or len(fitting) >= self.max_chunks:
                self.counters["skipped_chunks"] += 1
                continue
            if shares is not None and incoming[a.owner] >= share and len(new_digests) > room:
                # Past a whole share in one batch, room would come from other owners' chunks while this one
                # may hold none of its own yet: not admitted (it would only evict this batch's own admissions).
                self.counters["skipped_chunks"] += 1
                continue
            room -= len(new_digests)
            incoming[a.owner] += 1
            digests |= new_digests
            fitting.append(a)
        needed = len(digests) - len(self.txn.cursor(db=self.tables.pages).getmulti(sorted(digests)))
        keys = {a.key for a in fitting}
        new_chunks = len(keys) - len(self.txn.cursor(db=self.tables.loc).getmulti(sorted(keys)))
        free = self.free_slots()
        evicted = 0
        if shares is not None:
            shares.expect(incoming)
        # The loc entries, not the eviction order's length: pinned chunks count against max_chunks too.
        while free < needed or self.txn.stat(self.tables.loc)["entries"] + new_chunks > self.max_chunks:
            key = self._hinted_victim() or self.eviction.evict_one(self.weigh)
            if key is None:
                break
            gone = self.remove_chunk(key) or []
            free += len(gone)
            needed += sum(1 for d in gone if d in digests)
            new_chunks += key in keys
            evicted += 1
        self.counters["evicted_chunks"] += evicted
        return fitting

    def _hinted_victim(self) -> Key | None:
        """A held chunk some guest still holds itself (`EvictFirst`), taken out of the eviction order; None if none."""
        hints = self.evict_first
        while hints is not None and (key := hints.take()) is not None:
            if key in self.eviction and INO.unpack_from(key)[0] not in self.pinned:
                self.eviction.remove(key)
                self.counters["evicted_resident"] += 1
                return key
        return None

    def admit(self, admissions: list[Admission], pace: Callable[[], None] = _no_pace) -> None:
        """Admit in slices of ADMIT_SLICE chunks (`pace` between them); old versions of re-admitted chunks are released last."""
        # A key admitted twice in one batch: the last one wins.
        admissions = list({a.key: a for a in admissions}.values())
        replaced: list[bytes] = []
        written: set[bytes] = set()  # pages written by this transaction: not compared again
        for k in range(0, len(admissions), ADMIT_SLICE):
            if k:
                pace()
            replaced += self._admit_slice(admissions[k : k + ADMIT_SLICE], written)
        # Last: their pages may be the new ones too.
        for value in replaced:
            self.release(value)

    def _admit_slice(self, admissions: list[Admission], written: set[bytes]) -> list[bytes]:
        """One getmulti for the pages, one allocation, one pwritev per run of slots, one putmulti per table.

        Returns the loc values the admitted chunks replace. Between the Python
        stretches, LMDB and pwritev calls release the GIL to the loop thread.
        """
        txn = self.txn
        pages_db, loc_db = self.tables.pages, self.tables.loc
        wanted = list({d for a in admissions for _, d in a.pages})
        known = {bytes(d): decode_page(v) for d, v in txn.cursor(db=pages_db).getmulti(wanted)}
        fresh: list[bytes] = []  # digests of new pages, in admission order
        fresh_pages: list[memoryview] = []
        fresh_set: set[bytes] = set()
        admitted: list[Admission] = []
        for a in admissions:
            new = [(i, d) for i, d in a.pages if d not in known and d not in fresh_set]
            if new:
                if len({d for _, d in new}) != len(new):  # a page twice in one chunk
                    seen: set[bytes] = set()
                    new = [(i, d) for i, d in new if not (d in seen or seen.add(d))]
                if len(new) > self.free_count - len(fresh):
                    self.counters["skipped_chunks"] += 1
                    continue
                fresh_set.update(d for _, d in new)
                fresh += [d for _, d in new]
                data = a.data
                fresh_pages += [data[i << SHIFT : (i + 1) << SHIFT] for i, _ in new]
            admitted.append(a)
        # Slots for the new pages, lowest extents first; each run written with one pwritev before the commit.
        slot_of = {d: slot for d, (slot, _) in known.items()}
        slots: list[int] = []
        fd, pos = self.slab.fd, 0
        for start, count in self.alloc(len(fresh)):
            for j in range(0, count, _IOV_MAX):
                n = min(count, j + _IOV_MAX) - j
                if os.pwritev(fd, fresh_pages[pos + j : pos + j + n], (start + j) << SHIFT) != n << SHIFT:
                    raise OSError(errno.EIO, "short write to pages.slab")  # the batch fails: nothing refers to those slots
            slots += range(start, start + count)
            pos += count
        slot_of.update(zip(fresh, slots, strict=True))
        self._heal(admitted, known.keys() - written, slot_of)
        written.update(fresh)
        counts = collections.Counter([d for a in admitted for _, d in a.pages])
        base = {d: count for d, (_, count) in known.items()}
        txn.cursor(db=pages_db).putmulti([(d, encode_page(slot_of[d], base.get(d, 0) + n)) for d, n in counts.items()])
        entries = {}
        for a in admitted:
            digests = [d for _, d in a.pages]
            entries[a.key] = encode_loc(a.length, a.chunk_digest, a.present, [slot_of[d] for d in digests], a.checks, digests)
            self.logical += held_bytes(a.length, a.present)
            if self.pinned and INO.unpack_from(a.key)[0] in self.pinned:
                pass  # a pinned chunk is never a victim: it stays out of the eviction order
            elif isinstance(self.eviction, Shares):
                self.eviction.insert(a.key, a.owner)
            else:
                self.eviction.insert(a.key)
        loc = txn.cursor(db=loc_db)
        replaced = [bytes(v) for _, v in loc.getmulti(list(entries))]
        loc.putmulti(sorted(entries.items()))
        self.counters["admitted_chunks"] += len(admitted)
        return replaced

    def _heal(self, admitted: list[Admission], known: Set[bytes], slot_of: dict[bytes, int]) -> None:
        """Rewrite a page whose slot lost its content (disk damage): we hold the right bytes.

        Checks each page this batch shares with earlier ones, by hashing the slab in place: one hash
        (the chunk digest) when the chunk's pages are exactly one run of slots, else one per page.
        """
        slab, fd = self.slab.view, self.slab.fd
        assert self.keys is not None
        digest = self.keys.check
        seen: set[bytes] = set()
        for a in admitted:
            todo = [(slot_of[d], i, c) for (i, d), c in zip(a.pages, a.checks, strict=True) if d in known and d not in seen]
            if not todo:
                continue
            seen.update(d for _, d in a.pages)
            first = todo[0][0]
            npages = len(a.data) >> SHIFT
            if (
                len(todo) == npages
                and a.length == npages << SHIFT
                and todo[-1][0] == first + npages - 1
                and digest(slab[first << SHIFT : (first + npages) << SHIFT]) == a.chunk_digest
                and [slot for slot, _, _ in todo] == list(range(first, first + npages))
            ):
                continue
            for slot, i, c in todo:
                if digest(slab[slot << SHIFT : (slot + 1) << SHIFT]) != c:
                    os.pwrite(fd, a.data[i << SHIFT : (i + 1) << SHIFT], slot << SHIFT)
                    self.counters["healed_pages"] += 1
