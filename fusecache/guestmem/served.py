"""The pages fusecache served one guest: a bounded index of their fingerprints, digests and locations.

Owns: `ServedPages`, what a scan of the guest's RAM is matched against, and
the fingerprint both sides compute. Per served 4 KiB page it keeps 32 bytes
in numpy arrays (PAGE_RECORD_BYTES): the fingerprint key (8), the first 16
bytes of the caller's digest (16), and the location packed as a file number
into a small (ino, gen) table and the page's number in the file (8). Nothing
of the content is kept beyond those. The index holds at most as many pages as
the guest has RAM (it cannot hold more at once); past that the oldest are
dropped first. Re-serving a location supersedes its earlier record.

The fingerprint is two adjacent 8-byte words of the page, at bytes 2040 and
2048 (FINGERPRINT_WORDS): the 16 bytes a scan reads per page of guest RAM, in
one piece. Measured (`bench/guestmem.py`), on pages of real OS files: words
at 0 and 2048 make slightly better evidence (1.9% of pages have both words
zero against 2.8%; 4.8% share their key with a page of other content against
8.6%), but they are two pieces per page, and the kernel's cost is per piece
(it pins the page for each): over three runs the scan took 0.46-0.51 CPU s
per GiB with them and 0.32-0.37 with one piece, the extra refuted candidates
costing almost nothing.
The middle of a page is past any header at its start (file-format magic,
which byte 0 and byte 8 share across many files: 12.7% shared keys). A page
whose two words are both zero (all-zero pages, short file tails) is no
evidence either way: it is counted (`no_evidence`) and kept out of the index.

Threads: `record` runs on the trio loop (the read path); a scan takes a
`snapshot` and later `settle`s it from a worker thread. One lock guards the
arrays; it is held for an append, a snapshot copy or a settle.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import xxhash

from ..geometry import PAGE_SIZE, PAGES_PER_CHUNK

Digest = Callable[[bytes | memoryview], bytes]

FINGERPRINT_WORDS = (2040, 2048)  # byte offsets in a page of the two 8-byte words a scan reads (one 16-byte piece)
DIGEST_BYTES = 16  # of the caller's digest, kept to confirm a candidate: 128 bits
DIGEST_DTYPE = np.dtype(f"S{DIGEST_BYTES}")  # fixed-width bytes: sortable and searchable as one value
PAGE_RECORD_BYTES = 8 + DIGEST_BYTES + 8  # key, digest, packed location
_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd: multiplying by it is a bijection on 64-bit words
FILE_BITS = 24  # a packed location: file number (an index into the (ino, gen) table), then the page number in the file
PAGE_BITS = 64 - FILE_BITS
RECENT_GRACE = 1.0  # seconds: pages served this recently are not judged by a scan (the reply may not be in guest RAM yet)
DROP_FRACTION = 8  # when full, drop the oldest 1/8 at once: one array move per many records
FLUSH_PAGES = 1024  # index queued replies once they hold this many pages: the numpy work is per batch, not per reply


def default_digest(data: bytes | memoryview) -> bytes:
    return xxhash.xxh3_128_digest(data)


def fingerprint_keys(w0: np.ndarray, w1: np.ndarray) -> np.ndarray:
    """One 64-bit key per page from its two fingerprint words (a collision only costs a full-page check)."""
    return w0 ^ (w1 * _MIX)


class Location(NamedTuple):
    """Where a served page came from: image inode, file generation, 64 KiB chunk, page in the chunk."""

    ino: int
    gen: int
    chunk: int
    page: int


@dataclass(frozen=True)
class Locations:
    """A set of served page locations, held as arrays (a scan may name hundreds of thousands)."""

    ino: np.ndarray  # uint64
    gen: np.ndarray  # uint64
    page: np.ndarray  # uint64, the page's number in the file

    def __len__(self) -> int:
        return len(self.page)

    def __iter__(self) -> Iterator[Location]:
        for ino, gen, page in zip(self.ino.tolist(), self.gen.tolist(), self.page.tolist(), strict=True):
            yield Location(ino, gen, page // PAGES_PER_CHUNK, page % PAGES_PER_CHUNK)

    def by_chunk(self) -> dict[tuple[int, int, int], int]:
        """(ino, gen, chunk) -> a bit mask of its pages in this set (bit i: page i of the chunk)."""
        out: dict[tuple[int, int, int], int] = {}
        for ino, gen, chunk, page in self:
            key = (ino, gen, chunk)
            out[key] = out.get(key, 0) | (1 << page)
        return out


@dataclass
class Snapshot:
    """The served pages a scan judges: copies, so recording goes on meanwhile. Keys sorted, with the rest in the same order."""

    keys: np.ndarray  # uint64, sorted
    digests: np.ndarray  # DIGEST_DTYPE
    locs: np.ndarray  # uint64 packed locations
    positions: np.ndarray  # int64: where each entry was in the index when the snapshot was taken
    judged_below: int  # entries at positions below this were old enough to judge
    young: int  # entries served within the grace period: not judged, counted as resident
    dropped_before: int  # ServedPages.dropped when the snapshot was taken
    files: list[tuple[int, int]]  # the (ino, gen) table, as it was
    renumbered: int  # ServedPages' renumbering count then
    no_evidence: int  # ServedPages.no_evidence then


class ServedPages:
    """The pages served to one guest, at most `capacity` of them (the guest's RAM in pages), oldest dropped first."""

    def __init__(
        self, capacity: int, digest: Digest = default_digest, grace: float = RECENT_GRACE, words: tuple[int, int] = FINGERPRINT_WORDS
    ) -> None:
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        if len(words) != 2 or any(w % 8 or not 0 <= w <= PAGE_SIZE - 8 for w in words) or words[0] == words[1]:
            raise ValueError("words must be two distinct 8-byte-aligned offsets within a page")
        self.capacity = capacity
        self.words = words  # the scan reads these: the fingerprint layout belongs to the index
        self.digest = digest
        self.grace = grace
        self._keys = np.zeros(capacity, dtype=np.uint64)
        self._digests = np.zeros(capacity, dtype=DIGEST_DTYPE)
        self._locs = np.zeros(capacity, dtype=np.uint64)
        self._n = 0
        self._files: list[tuple[int, int]] = []
        self._file_no: dict[tuple[int, int], int] = {}
        self._recent: deque[tuple[float, int]] = deque()  # (when, where its pages start) per record: for the grace period
        # Replies not yet indexed: ((ino, gen), first page, fingerprint words, digests, when).
        self._pending: list[tuple[tuple[int, int], int, bytes, Sequence[bytes], float]] = []
        self._pending_pages = 0
        self._renumbered = 0  # times the (ino, gen) table was renumbered: a snapshot's packed locations are then stale
        self._lock = threading.Lock()
        self._recorded = 0
        self._no_evidence = 0
        self._dropped = 0

    @classmethod
    def for_ram(cls, ram_bytes: int, digest: Digest = default_digest, grace: float = RECENT_GRACE) -> ServedPages:
        """An index holding at most as many pages as a guest with ram_bytes of RAM can."""
        return cls(max(1, ram_bytes // PAGE_SIZE), digest, grace)

    def _counted(self, value: Callable[[], int]) -> int:
        with self._lock:
            self._flush()
            return value()

    def __len__(self) -> int:
        """Pages indexed."""
        return self._counted(lambda: self._n)

    @property
    def recorded(self) -> int:
        """Pages ever entered into the index."""
        return self._counted(lambda: self._recorded)

    @property
    def no_evidence(self) -> int:
        """Served pages whose fingerprint words are both zero: never indexed, never judged."""
        return self._counted(lambda: self._no_evidence)

    @property
    def dropped(self) -> int:
        """Pages dropped, oldest first, to stay within capacity."""
        return self._counted(lambda: self._dropped)

    @property
    def nbytes(self) -> int:
        """Host memory the index holds (its arrays at capacity; the (ino, gen) table is small)."""
        return self._keys.nbytes + self._digests.nbytes + self._locs.nbytes

    def record(self, ino: int, gen: int, offset: int, data: bytes | memoryview, digests: Sequence[bytes] | None = None) -> int:
        """Note that `data`, read at byte `offset` of file (ino, gen), was served to the guest. Returns the whole pages noted.

        Only whole pages at page-aligned file offsets count: the guest's page
        cache pages line up with them. `digests`, if given, are the digests of
        those whole pages in order, made with this index's digest function
        (the store may already hold them); else they are computed here, one
        call per page. This runs in the read path: it only slices out the
        fingerprint words and queues them; the numpy work is done for many
        replies at once (`_flush`), when enough are queued or a scan asks.
        """
        view = memoryview(data).cast("B")
        skip = -offset % PAGE_SIZE
        first_page = (offset + skip) // PAGE_SIZE
        end = skip + (len(view) - skip) // PAGE_SIZE * PAGE_SIZE
        if end <= skip:
            return 0
        npages = (end - skip) // PAGE_SIZE
        if digests is not None and len(digests) != npages:
            raise ValueError(f"{len(digests)} digests for {npages} pages")
        if first_page + npages > 1 << PAGE_BITS:
            raise ValueError(f"offset {offset} is beyond the {PAGE_SIZE << PAGE_BITS} bytes a location can name")
        w0, w1 = self.words
        if npages >= 32:  # a few numpy calls beat a slice per page
            flat = np.frombuffer(view[skip:end], dtype=np.uint64)
            words = np.stack([flat[w0 // 8 :: PAGE_SIZE // 8], flat[w1 // 8 :: PAGE_SIZE // 8]], axis=1).tobytes()
        elif w1 == w0 + 8:
            words = b"".join([view[p : p + 16] for p in range(skip + w0, end, PAGE_SIZE)])
        else:
            words = b"".join([view[p + w : p + w + 8] for p in range(skip, end, PAGE_SIZE) for w in (w0, w1)])
        if digests is None:
            digest = self.digest
            digests = [digest(view[p : p + PAGE_SIZE]) for p in range(skip, end, PAGE_SIZE)]
        with self._lock:
            self._pending.append(((ino, gen), first_page, words, digests, time.monotonic()))
            self._pending_pages += npages
            if self._pending_pages >= FLUSH_PAGES:
                self._flush()
        return npages

    def _flush(self) -> None:
        """Index the queued replies (with the lock held)."""
        if not self._pending:
            return
        pending, self._pending, self._pending_pages = self._pending, [], 0
        counts = np.array([len(d) for _, _, _, d, _ in pending], dtype=np.int64)
        words = np.frombuffer(b"".join([w for _, _, w, _, _ in pending]), dtype=np.uint64).reshape(-1, 2)
        w0, w1 = words[:, 0], words[:, 1]
        evidence = (w0 | w1) != 0
        keep = np.flatnonzero(evidence)
        starts = np.cumsum(counts) - counts
        reply = np.repeat(np.arange(len(pending)), counts)
        in_reply = (np.arange(len(reply)) - starts[reply]).astype(np.uint64)
        page = np.repeat(np.array([fp for _, fp, _, _, _ in pending], dtype=np.uint64), counts) + in_reply
        fno = np.repeat(np.array([self._file_number(*f) for f, _, _, _, _ in pending], dtype=np.uint64), counts)
        digests = np.array([d for _, _, _, ds, _ in pending for d in ds], dtype=DIGEST_DTYPE)
        self._no_evidence += len(reply) - len(keep)
        self._recorded += len(keep)
        if len(keep) == 0:
            return
        keys = fingerprint_keys(w0[keep], w1[keep])
        locs = (fno[keep] << np.uint64(PAGE_BITS)) | page[keep]
        first = self._append(keys, digests[keep], locs)
        if self.grace > 0:
            # Where each reply's pages start in the index, for the grace period (replies with no evidence start where the next does).
            kept_before = np.searchsorted(keep, starts)
            cutoff = time.monotonic() - self.grace
            self._recent.extend((t, max(0, first + k)) for (*_, t), k in zip(pending, kept_before.tolist(), strict=True) if t >= cutoff)
            while len(self._recent) > 1 and self._recent[1][0] < cutoff:
                self._recent.popleft()

    def _file_number(self, ino: int, gen: int) -> int:
        no = self._file_no.get((ino, gen))
        if no is None:
            if len(self._files) >= 1 << FILE_BITS:
                self._prune_files()
                if len(self._files) >= 1 << FILE_BITS:
                    raise OverflowError("more distinct (ino, gen) files in one guest's index than it can number")
            no = len(self._files)
            self._files.append((ino, gen))
            self._file_no[(ino, gen)] = no
        return no

    def _prune_files(self) -> None:
        """Renumber the (ino, gen) table to the files the index still holds pages of."""
        used, inverse = np.unique(self._locs[: self._n] >> np.uint64(PAGE_BITS), return_inverse=True)
        self._files = [self._files[int(f)] for f in used]
        self._file_no = {f: i for i, f in enumerate(self._files)}
        mask = np.uint64((1 << PAGE_BITS) - 1)
        self._locs[: self._n] = (inverse.astype(np.uint64) << np.uint64(PAGE_BITS)) | (self._locs[: self._n] & mask)
        self._renumbered += 1

    def _append(self, keys: np.ndarray, digests: np.ndarray, locs: np.ndarray) -> int:
        """Append entries (dropping the oldest if full); the index the first entry got (negative if even it was dropped)."""
        cut = 0
        if len(keys) > self.capacity:  # a batch larger than the guest: only its last pages can be resident
            cut = len(keys) - self.capacity
            keys, digests, locs = keys[cut:], digests[cut:], locs[cut:]
            self._dropped += cut
        if self._n + len(keys) > self.capacity:
            drop = max(self._n + len(keys) - self.capacity, self.capacity // DROP_FRACTION)
            self._drop_oldest(min(drop, self._n))
        lo, hi = self._n, self._n + len(keys)
        self._keys[lo:hi] = keys
        self._digests[lo:hi] = digests
        self._locs[lo:hi] = locs
        self._n = hi
        return lo - cut

    def _drop_oldest(self, k: int) -> None:
        n = self._n
        self._keys[: n - k] = self._keys[k:n]
        self._digests[: n - k] = self._digests[k:n]
        self._locs[: n - k] = self._locs[k:n]
        self._n = n - k
        self._dropped += k
        self._recent = deque((t, max(0, m - k)) for t, m in self._recent)

    def snapshot(self) -> Snapshot:
        """The entries a scan judges: all but those served within the grace period; of several records of one location, the newest."""
        with self._lock:
            self._flush()
            judged = self._n
            if self.grace > 0:
                cutoff = time.monotonic() - self.grace
                judged = next((start for t, start in self._recent if t >= cutoff), self._n)
            keys = self._keys[:judged].copy()
            digests = self._digests[:judged].copy()
            all_locs = self._locs[: self._n].copy()
            files = list(self._files)
            dropped = self._dropped
            no_evidence = self._no_evidence
            renumbered = self._renumbered
        # Newest record per location wins; a young one supersedes older ones, which are then not judged either.
        _, first_from_end = np.unique(all_locs[::-1], return_index=True)
        newest = len(all_locs) - 1 - first_from_end
        positions = newest[newest < judged]
        positions = positions[np.argsort(keys[positions], kind="stable")]
        return Snapshot(
            keys=keys[positions], digests=digests[positions], locs=all_locs[positions], positions=positions.astype(np.int64),
            judged_below=judged, young=len(all_locs) - judged, dropped_before=dropped, files=files, renumbered=renumbered,
            no_evidence=no_evidence,
        )  # fmt: skip

    def settle(self, snap: Snapshot, evicted: np.ndarray) -> None:
        """Forget the snapshot entries at indices `evicted` (into the snapshot's arrays): they were reported evicted, once.

        Superseded records of locations the snapshot judged are forgotten too.
        Entries dropped for capacity since the snapshot are already gone.
        """
        with self._lock:
            shift = self._dropped - snap.dropped_before
            gone = snap.positions[evicted] - shift
            gone = gone[gone >= 0]
            keep = np.ones(self._n, dtype=bool)
            keep[gone] = False
            # Older records of a judged location are superseded: forget them (not those recorded since the snapshot).
            old_end = max(0, snap.judged_below - shift)
            if len(snap.locs) and old_end and snap.renumbered == self._renumbered:
                dup = np.isin(self._locs[:old_end], snap.locs)
                newest = snap.positions - shift
                dup[newest[newest >= 0]] = False
                keep[:old_end] &= ~dup
            if keep.all():
                return
            n = int(keep.sum())
            self._keys[:n] = self._keys[: self._n][keep]
            self._digests[:n] = self._digests[: self._n][keep]
            self._locs[:n] = self._locs[: self._n][keep]
            # Record boundaries for the grace period move down by the entries removed before them.
            removed_before = np.cumsum(~keep)
            self._recent = deque((t, m - int(removed_before[m - 1]) if m > 0 else 0) for t, m in self._recent)
            self._n = n
            if len(self._files) > 4096 and len(self._files) > 2 * n:
                self._prune_files()

    def locations(self, snap: Snapshot, idx: np.ndarray) -> Locations:
        """The locations of snapshot entries at indices idx."""
        locs = snap.locs[idx]
        files = np.array(snap.files, dtype=np.uint64).reshape(-1, 2)
        fno = (locs >> np.uint64(PAGE_BITS)).astype(np.int64)
        return Locations(files[fno, 0], files[fno, 1], locs & np.uint64((1 << PAGE_BITS) - 1))
