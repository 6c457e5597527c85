"""The local store: content-deduplicated 4 KiB pages served as 64 KiB chunks, in one cache directory.

The store owns one cache directory: an LMDB environment (`meta.lmdb/`) that
holds every piece of metadata, and `pages.slab`, a fixed-size file of
capacity/4096 slots of 4096 bytes that holds page contents. A chunk (an
aligned `chunk_size` piece of one version of one file) is a list of pages; a
page is stored once however many chunks, files and images hold it (the
dedup: pages are told apart by their name, a keyed BLAKE3 no tenant can
collide without the cache's keys, `fusecache/identity.py`), and a page of
zeros (a hole) is not stored at all. It knows nothing of files beyond their
inode, generation and version, nor of FUSE or peers.

Modules: `layout` (the on-disk format, encoded and decoded once),
`eviction` (S3-FIFO, LRU), `opening` (lock, format checks, crash recovery,
resizing), `reader` (verified reads), `writer` (batches, write
transactions), `directory` (`Store`, which wires them to one directory's
files), `check` (the read-only integrity checker behind `fusecache check`).

Transactions and locking
------------------------
- One process per cache directory: `opening` takes an exclusive flock on
  pages.slab (`fusecache check` takes it shared, so it never runs beside a
  daemon).
- Exactly one thread writes LMDB: whoever calls `Store.apply` (the cache's
  writer thread, one batch at a time). Each call is one write transaction,
  or two when it admits: the first applies forgets, file records, drops and
  the evictions that make room, and commits; the second admits. A slot
  freed in a transaction is reused only by a later one, so a crash between
  a page write and the commit that references it never leaves a committed
  page entry pointing at overwritten data.
- Page data is written with `os.pwritev` into free slots *before* the
  commit that references them. LMDB runs without fsync: a SIGKILLed process
  loses nothing committed (the OS page cache has it); after a host crash
  (boot id changed, no clean close) the cache is wiped, as its contents
  are re-derivable. `state.json` (outside LMDB, fsynced; `opening`) says
  "not clean" from open, before any unsynced write; `close` fsyncs the
  slab, saves the eviction order, syncs LMDB and records a clean close with
  data.mdb's size and digest, checked at the next open: anything damaged,
  truncated or of another format is wiped, never trusted, never refused.
- An admission batch allocates its new pages in runs of adjacent slots
  (lowest free extent first), so a chunk's pages usually sit in one run and
  are written, and later read, with one call; admissions are applied
  ADMIT_SLICE chunks at a time so the writer's Python stretches stay short
  and the LMDB and pwritev calls between them release the GIL to the loop;
  a batch's `pace` is called between stretches (the queue's `Pacer` sleeps
  there while reads are active, so the loop gets the GIL at once).
- Readers (`read_chunk`, `read_chunks`, `read_span`, `read_page`, ... on the
  trio loop) take their own LMDB read transaction (MVCC: they never wait
  for the writer) and copy bytes out of a read-only map of the slab. The
  writer may reuse a slot an older view still points at, so every byte
  served is copied first and then checked against a digest: the chunk
  digest when the whole chunk is read, else the digest of each page
  overlapping the range read. A mismatch is a miss (`verify_failures`),
  never wrong data.
- The eviction order lives in memory (`eviction.py`); the loop thread
  touches it on every hit under a short lock, the writer asks it for
  victims. It is rebuilt at open from the order saved by a clean close,
  else from the loc keys, and from the loc keys again if a write
  transaction fails. Eviction runs when an admission needs more slots than
  are free, or more loc entries than `max_chunks`; a chunk whose pages are
  mostly shared is spared once, one whose pages a peer holds
  (`WriteBatch.peer_holds`) loses its second chance.
- Pins: the inodes in meta `pins` (set by a batch's `pins`, in the first
  transaction) are kept out of the eviction order, so their chunks are never
  victims; they still count against `max_chunks` and the slots. Keeping
  pinned content within the cache is the caller's budget (`pins.py`).
"""

from fusecache.store.directory import CHUNKS_PER_CAPACITY_CHUNK, Store
from fusecache.store.eviction import EVICTIONS, Eviction, LruEviction, S3FifoEviction
from fusecache.store.layout import CHUNK_SIZE, FORMAT_VERSION, PAGE_SIZE, ZERO_PAGE, Location
from fusecache.store.writer import ADMIT_SLICE, WriteBatch

__all__ = [
    "ADMIT_SLICE",
    "CHUNKS_PER_CAPACITY_CHUNK",
    "CHUNK_SIZE",
    "EVICTIONS",
    "FORMAT_VERSION",
    "PAGE_SIZE",
    "ZERO_PAGE",
    "Eviction",
    "Location",
    "LruEviction",
    "S3FifoEviction",
    "Store",
    "WriteBatch",
]
