"""The store against real LMDB and a real slab in tmp_path: contents, dedup, eviction, crashes, bad dirs."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import lmdb
import pytest

from fusecache.errors import QuietError
from fusecache.stats import ShareStats
from fusecache.store import PAGE_SIZE, Store, WriteBatch
from fusecache.store.layout import pack_key

CHUNK = 65536
REPO = Path(__file__).resolve().parents[2]

# Shared with the SIGKILL child: chunk contents are a pure function of the
# key, so whatever survived a kill can be checked. Pages come from a pool
# (dedup across chunks) with holes, and the last chunk of a file is short.
CONTENT_SRC = """
import random
POOL = [bytes(4096)] + [random.Random(k).randbytes(4096) for k in range(1, 200)]
def content(ino, gen, chunk):
    pages = [POOL[(ino * 7919 + gen * 104729 + chunk * 613 + j * 97) % len(POOL)] for j in range(16)]
    data = b"".join(pages)
    return data[:10000] if chunk == 7 else data
"""
_ns: dict = {}
exec(CONTENT_SRC, _ns)
content = _ns["content"]

CHILD_SRC = (
    CONTENT_SRC
    + """
import sys
from fusecache.store import Store, WriteBatch
store = Store(sys.argv[1], 64 * 4096)
rng = random.Random(int(sys.argv[2]))
print("ready", flush=True)
while True:
    b = WriteBatch()
    for _ in range(rng.randint(1, 6)):
        ino, gen, chunk = rng.randint(1, 4), rng.randint(1, 2), rng.randint(0, 7)
        b.admit.append((ino, gen, chunk, content(ino, gen, chunk)))
    if rng.random() < 0.2:
        b.files.append((rng.randint(1, 4), rng.randint(1, 2), (0, 0, 0, 0)))
    if rng.random() < 0.2:
        b.drop.append((rng.randint(1, 4), rng.randint(1, 2), rng.randint(0, 7)))
    store.apply(b)
"""
)


def unique(n: int = CHUNK) -> bytes:
    return os.urandom(n)


def admit(store: Store, *items: tuple[int, int, int, bytes]) -> None:
    store.apply(WriteBatch(admit=list(items)))


def slots_of(store: Store, ino: int, gen: int, chunk: int) -> dict[int, int]:
    """Page index -> slot of each stored page of a chunk."""
    loc = store.location(ino, gen, chunk)
    assert loc is not None
    return {i: slot for i, _, slot in loc.pages()}


def is_run(store: Store, ino: int, gen: int, chunk: int) -> bool:
    loc = store.location(ino, gen, chunk)
    assert loc is not None
    return loc.run


def write_slab(store: Store, offset: int, data: bytes) -> None:
    """Overwrite bytes of pages.slab behind the store's back (disk damage)."""
    fd = os.open(os.path.join(store.cache_dir, "pages.slab"), os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def damage(store: Store, slot: int) -> None:
    write_slab(store, slot * PAGE_SIZE, b"torn" * 1024)


def check_integrity(store: Store) -> None:
    """fusecache.store.check on the open store: refcounts, free extents, slots, every page's bytes, chunk digests, records."""
    assert store.check() == []


def test_hit_miss_and_file_record(tmp_path: Path) -> None:
    store = Store(str(tmp_path), 1 << 20)
    data = unique()
    store.apply(WriteBatch(admit=[(5, 1, 0, data)], files=[(5, 1, (CHUNK, 2, 3, 4))]))
    assert store.read_chunk(5, 1, 0) == data
    assert store.read_chunk(5, 1, 1) is None
    assert store.read_chunk(5, 2, 0) is None
    assert store.file_record(5) == (1, (CHUNK, 2, 3, 4))
    assert store.file_record(6) is None
    digests = store.chunk_digests(5, 1, 0)
    assert digests is not None and len(digests) == 16
    assert store.read_page(digests[3]) == data[3 * PAGE_SIZE : 4 * PAGE_SIZE]
    assert store.read_page(b"\x01" * 16) is None
    assert sorted(store.iter_digests()) == sorted(digests)
    stats = store.stats()
    assert (stats.hits, stats.misses, stats.chunks) == (1, 2, 1)
    store.close()


def test_a_peer_reads_a_chunk_only_at_the_held_version(tmp_path: Path) -> None:
    store = Store(str(tmp_path), 1 << 20)
    version = (CHUNK + 5000, 2, 3, 4)
    data, tail = unique(), bytes(PAGE_SIZE) + unique(904)  # a hole, then a short last page
    store.apply(WriteBatch(admit=[(5, 1, 0, data), (5, 1, 1, tail)], files=[(5, 1, version)]))
    assert store.read_location(5, version, 0) == data
    assert store.read_location(5, version, 1) == tail
    assert store.read_location(5, (CHUNK + 5000, 2, 3, 5), 0) is None  # another version of the file
    assert store.read_location(5, version, 2) is None  # not held
    assert store.read_location(6, version, 0) is None  # no record
    damage(store, slots_of(store, 5, 1, 0)[5])
    assert store.read_location(5, version, 0) is None  # a page fails its check: not served
    store.close()


def test_dedup_stores_pages_once(tmp_path: Path) -> None:
    store = Store(str(tmp_path), 1 << 20)
    data = unique()
    admit(store, (1, 1, 0, data), (2, 1, 0, data), (2, 1, 1, data[:PAGE_SIZE] * 16))
    assert store.read_chunk(1, 1, 0) == store.read_chunk(2, 1, 0) == data
    assert store.read_chunk(2, 1, 1) == data[:PAGE_SIZE] * 16
    stats = store.stats()
    assert stats.pages_used == 16
    assert stats.logical_bytes == 3 * CHUNK
    assert stats.dedup_ratio == 3.0
    check_integrity(store)


def test_holes_take_no_slots(tmp_path: Path) -> None:
    store = Store(str(tmp_path), 1 << 20)
    mixed = bytes(PAGE_SIZE) * 8 + unique(8 * PAGE_SIZE)
    admit(store, (1, 1, 0, bytes(CHUNK)), (1, 1, 1, mixed))
    assert store.read_chunk(1, 1, 0) == bytes(CHUNK)
    assert store.read_chunk(1, 1, 1) == mixed
    assert store.stats().pages_used == 8
    assert store.stats().logical_bytes == 8 * PAGE_SIZE
    holes = store.chunk_digests(1, 1, 0)
    assert holes is not None and store.read_page(holes[0]) == bytes(PAGE_SIZE)


def test_partial_chunk_at_eof(tmp_path: Path) -> None:
    store = Store(str(tmp_path), 1 << 20)
    tail = unique(5000)
    admit(store, (1, 1, 9, tail), (1, 1, 10, b""))
    assert store.read_chunk(1, 1, 9) == tail
    assert store.read_chunk(1, 1, 10) == b""
    assert store.stats().logical_bytes == 5000
    # The padded last page dedups with a full page of the same bytes.
    admit(store, (2, 1, 0, tail[4096:] + bytes(8192 - 5000)))
    assert store.stats().pages_used == 2


def test_admitting_longer_than_a_chunk_is_a_bug(tmp_path: Path) -> None:
    store = Store(str(tmp_path), 1 << 20)
    with pytest.raises(ValueError):
        admit(store, (1, 1, 0, bytes(CHUNK + 1)))


@pytest.mark.parametrize("eviction", ["s3fifo", "lru"])
def test_eviction_keeps_the_bound_and_the_hot_chunks(tmp_path: Path, eviction: str) -> None:
    store = Store(str(tmp_path), 16 * CHUNK, eviction=eviction)
    hot = {(1, 1, c): unique() for c in range(3)}
    admit(store, *((*k, v) for k, v in hot.items()))
    admitted = {}
    for n in range(60):
        for k, v in hot.items():
            assert store.read_chunk(*k) == v
        key = (2, 1, n)
        admitted[key] = unique()
        admit(store, (*key, admitted[key]))
        assert store.stats().pages_used <= 16 * 16
    stats = store.stats()
    assert stats.evicted_chunks >= 60 + 3 - 16
    assert stats.chunks <= 16
    kept = [k for k, v in admitted.items() if store.read_chunk(*k) == v]
    assert (2, 1, 59) in kept and len(kept) <= 13
    check_integrity(store)


def admit_for(store: Store, owner: str, items: list[tuple[int, int, int, bytes]]) -> None:
    store.apply(WriteBatch(admit=items, owners={item[:3]: owner for item in items}))


@pytest.mark.parametrize("eviction", ["s3fifo", "lru"])
def test_an_owner_over_its_share_evicts_its_own_chunks_first(tmp_path: Path, eviction: str) -> None:
    """A guest admitting far more than its share (a lying guest) cannot flush another guest's chunks within theirs."""
    store = Store(str(tmp_path), 12 * CHUNK, eviction=eviction)  # owners: the host, honest, liar: 4 chunks each
    honest = {(1, 1, c): unique() for c in range(4)}
    admit_for(store, "honest", [(*k, v) for k, v in honest.items()])
    liar = {}
    for n in range(10):  # 40 chunks, in batches of 4 and one of 20
        batch = [(2, 1, 4 * n + c, unique()) for c in range(4)]
        liar.update({item[:3]: item[3] for item in batch})
        admit_for(store, "liar", batch)
    big = [(2, 1, 100 + c, unique()) for c in range(20)]
    admit_for(store, "liar", big)
    assert all(store.read_chunk(*k) == v for k, v in honest.items())  # every byte of the honest guest's share, intact
    shares = store.stats().shares
    assert shares["honest"].held_chunks == 4 and shares["honest"].share_chunks == 4
    assert shares["liar"].held_chunks <= 8  # its share and the host's unused one
    assert store.stats().chunks <= 12
    check_integrity(store)


def test_shares_leave_room_to_one_owner_while_the_cache_has_it(tmp_path: Path) -> None:
    """Shares bind only when the cache is full: one guest alone may fill it, in one batch."""
    store = Store(str(tmp_path), 12 * CHUNK)
    items = [(1, 1, c, unique()) for c in range(12)]
    admit_for(store, "vm", items)
    assert all(store.read_chunk(*item[:3]) == item[3] for item in items)
    assert store.stats().shares["vm"].held_chunks == 12
    # then another guest's admissions take from the one over its share, down to its share (12 / 3 owners)
    admit_for(store, "vm2", [(2, 1, c, unique()) for c in range(4)])
    shares = store.stats().shares
    assert shares["vm"].held_chunks == 8 and shares["vm2"].held_chunks == 4


def test_chunks_of_an_earlier_run_have_no_share(tmp_path: Path) -> None:
    store = Store(str(tmp_path), 8 * CHUNK)
    admit_for(store, "vm", [(1, 1, c, unique()) for c in range(8)])
    store.close()
    store = Store(str(tmp_path), 8 * CHUNK)
    assert store.stats().shares == {"(earlier run)": ShareStats(8, 8)}
    admit_for(store, "vm", [(2, 1, c, unique()) for c in range(2)])
    assert store.stats().shares["(earlier run)"].held_chunks == 6  # they go first, whatever the order
    store.close()


def test_a_scan_does_not_flush_the_hot_set(tmp_path: Path) -> None:
    store = Store(str(tmp_path), 8 * CHUNK)  # the default eviction, S3-FIFO
    hot = {c: unique() for c in range(3)}
    admit(store, *((1, 1, c, v) for c, v in hot.items()))
    for _ in range(2):
        assert all(store.read_chunk(1, 1, c) == v for c, v in hot.items())
    for c in range(30):  # a backup reading a region three times the cache, once
        admit(store, (2, 1, c, unique()))
    assert all(store.read_chunk(1, 1, c) == v for c, v in hot.items())


def test_a_batch_larger_than_the_cache_is_partly_skipped(tmp_path: Path) -> None:
    store = Store(str(tmp_path), 4 * CHUNK)
    batch = [(1, 1, c, unique()) for c in range(10)]
    admit(store, *batch)
    stats = store.stats()
    assert stats.pages_used <= 64
    assert stats.skipped_chunks == 6
    assert [store.read_chunk(*k) == d for *k, d in batch].count(True) == 4
    check_integrity(store)


def test_chunk_count_is_bounded_too(tmp_path: Path) -> None:
    store = Store(str(tmp_path), CHUNK)
    for c in range(store.max_chunks + 5):
        admit(store, (1, 1, c, bytes(CHUNK)))  # holes: no slots, but metadata
    assert store.stats().chunks == store.max_chunks


def test_shared_pages_are_kept_longer(tmp_path: Path) -> None:
    store = Store(str(tmp_path), 3 * CHUNK, eviction="lru")
    shared, b, d = unique(), unique(), unique()
    admit(store, (1, 1, 0, shared), (2, 1, 0, b), (3, 1, 0, shared), (4, 1, 0, d))
    admit(store, (5, 1, 0, unique()))
    assert store.read_chunk(1, 1, 0) == shared  # spared: its pages are shared
    assert store.read_chunk(2, 1, 0) is None
    check_integrity(store)


def test_pages_a_peer_holds_are_evicted_first(tmp_path: Path) -> None:
    store = Store(str(tmp_path), 4 * CHUNK)
    chunks = {c: unique() for c in range(4)}
    admit(store, *((1, 1, c, v) for c, v in chunks.items()))
    store.close()
    store = Store(str(tmp_path), 4 * CHUNK)  # all in the main queue now
    for c, v in chunks.items():
        assert store.read_chunk(1, 1, c) == v  # each earns another lap
    held = set(store.chunk_digests(1, 1, 2) or [])
    store.apply(WriteBatch(admit=[(1, 1, 9, unique())], peer_holds=lambda digest: digest in held))
    assert [store.read_chunk(1, 1, c) is not None for c in range(4)] == [True, True, False, True]


def test_warm_reopen(tmp_path: Path) -> None:
    store = Store(str(tmp_path), 1 << 20)
    data = {c: unique() for c in range(5)}
    store.apply(WriteBatch(admit=[(1, 3, c, v) for c, v in data.items()], files=[(1, 3, (1, 2, 3, 4))]))
    before = store.stats()
    store.close()
    store = Store(str(tmp_path), 1 << 20)
    assert all(store.read_chunk(1, 3, c) == v for c, v in data.items())
    assert store.file_record(1) == (3, (1, 2, 3, 4))
    for k in ("pages_used", "logical_bytes", "chunks"):
        assert getattr(store.stats(), k) == getattr(before, k)
    check_integrity(store)
    store.close()


def test_recency_survives_a_clean_restart(tmp_path: Path) -> None:
    store = Store(str(tmp_path), 4 * CHUNK, eviction="lru")
    admit(store, *((1, 1, c, unique()) for c in range(4)))
    assert store.read_chunk(1, 1, 0) is not None  # now the most recent
    store.close()
    store = Store(str(tmp_path), 4 * CHUNK, eviction="lru")
    admit(store, (1, 1, 9, unique()))
    assert store.read_chunk(1, 1, 0) is not None
    assert store.read_chunk(1, 1, 1) is None


def test_a_damaged_page_is_a_miss_and_healed_by_readmission(tmp_path: Path) -> None:
    store = Store(str(tmp_path), 1 << 20)
    data = unique()
    admit(store, (1, 1, 0, data))
    damage(store, slots_of(store, 1, 1, 0)[5])
    assert store.read_chunk(1, 1, 0) is None
    assert store.stats().verify_failures == 1
    admit(store, (2, 1, 0, data))  # same content from another image: dedup finds the page, and repairs it
    assert store.read_chunk(1, 1, 0) == store.read_chunk(2, 1, 0) == data
    assert store.stats().healed_pages == 1


def test_a_chunk_aligned_span_of_whole_runs_is_one_checked_copy(tmp_path: Path) -> None:
    """A request of whole chunks, each a full run of slots (a guest's large aligned read): its bytes, and a damaged
    page anywhere in it a miss (counted once), never its bytes; holes, a short last chunk and a missing chunk as before."""
    store = Store(str(tmp_path), 1 << 20)
    data = {c: unique() for c in range(4)}
    admit(store, *((1, 1, c, v) for c, v in data.items()))
    assert all(is_run(store, 1, 1, c) for c in data)
    span = store.read_span(1, 1, 0, 3)
    assert isinstance(span, bytes) and span == b"".join(data.values())
    assert store.read_span(1, 1, 1, 2, 0, CHUNK) == data[1] + data[2]
    assert store.stats().hits == 6 and store.stats().verify_failures == 0
    damage(store, slots_of(store, 1, 1, 2)[15])  # the last page of the third chunk
    assert store.read_span(1, 1, 0, 3) is None
    assert store.stats().verify_failures == 1
    assert store.read_span(1, 1, 0, 1) == data[0] + data[1]  # the chunks before it still hit
    assert store.read_span(1, 1, 3, 4) is None  # chunk 4 was never admitted: a miss
    # a chunk of holes and a short last chunk among whole runs: the general path, the same bytes
    holes, short = bytes(CHUNK), unique(5000)
    admit(store, (2, 1, 0, data[0]), (2, 1, 1, holes), (2, 1, 2, short))
    assert store.read_span(2, 1, 0, 2) == data[0] + holes + short
    assert store.stats().verify_failures == 1


def test_iter_digests_lists_every_page_once(tmp_path: Path) -> None:
    store = Store(str(tmp_path), 320 * CHUNK)
    for n in range(4):  # more pages than one read transaction's worth (4096)
        admit(store, *((1, 1, n * 80 + c, unique()) for c in range(80)))
    digests = list(store.iter_digests())
    assert len(digests) == len(set(digests)) == store.stats().pages_used == 5120


def test_gen_bump_forget_and_drop(tmp_path: Path) -> None:
    store = Store(str(tmp_path), 1 << 20)
    old, new, other = unique(), unique(), unique()
    store.apply(WriteBatch(admit=[(1, 1, 0, old), (1, 1, 1, old), (2, 1, 0, other)], files=[(1, 1, (0, 0, 0, 0))]))
    store.apply(WriteBatch(admit=[(1, 2, 0, new)], files=[(1, 2, (1, 0, 0, 0))]))
    assert store.read_chunk(1, 1, 0) is None and store.read_chunk(1, 1, 1) is None
    assert store.read_chunk(1, 2, 0) == new
    # An admission of a superseded generation is stale: skipped.
    admit(store, (1, 1, 0, old))
    assert store.read_chunk(1, 1, 0) is None
    store.apply(WriteBatch(drop=[(2, 1, 0)]))
    assert store.read_chunk(2, 1, 0) is None
    store.apply(WriteBatch(forget_files=[1]))
    assert store.read_chunk(1, 2, 0) is None and store.file_record(1) is None
    assert store.stats().pages_used == 0 and store.stats().chunks == 0
    check_integrity(store)


def test_readmission_replaces_the_chunk(tmp_path: Path) -> None:
    store = Store(str(tmp_path), 1 << 20)
    a, b = unique(), unique()
    admit(store, (1, 1, 0, a))
    admit(store, (1, 1, 0, b), (2, 1, 0, a))  # a's pages change owner within one batch
    assert store.read_chunk(1, 1, 0) == b and store.read_chunk(2, 1, 0) == a
    assert store.stats().pages_used == 32
    check_integrity(store)


def test_slot_reuse_under_an_old_reader_is_a_miss(tmp_path: Path) -> None:
    store = Store(str(tmp_path), CHUNK)  # room for exactly one chunk
    a, b = unique(), unique()
    admit(store, (1, 1, 0, a))
    old_view = store._reader.env.begin(buffers=True)
    admit(store, (2, 1, 0, b))  # evicts a and reuses its slots
    assert store._reader.chunk_in(old_view, pack_key(1, 1, 0)) is None
    old_view.abort()
    assert store.stats().verify_failures == 1
    assert store.read_chunk(1, 1, 0) is None
    assert store.read_chunk(2, 1, 0) == b


def test_concurrent_reader_never_sees_wrong_bytes(tmp_path: Path) -> None:
    store = Store(str(tmp_path), 8 * CHUNK)
    stop = threading.Event()

    def writer() -> None:
        rng = random.Random(1)
        while not stop.is_set():
            keys = [(rng.randint(1, 4), 1, rng.randint(0, 7)) for _ in range(3)]
            admit(store, *((*k, content(*k)) for k in keys))

    thread = threading.Thread(target=writer)
    thread.start()
    rng = random.Random(2)
    hits = 0
    deadline = time.monotonic() + 1.0
    try:
        while time.monotonic() < deadline:
            k = (rng.randint(1, 4), 1, rng.randint(0, 7))
            got = store.read_chunk(*k)
            assert got is None or got == content(*k)
            hits += got is not None
            lo = rng.randrange(CHUNK)
            part = store.read_chunk(*k, lo, lo + rng.randrange(3 * PAGE_SIZE))
            assert part is None or part == content(*k)[lo : lo + len(part)]
            span = store.read_span(k[0], 1, 0, 7, lo, None)
            assert span is None or bytes(span) == content(k[0], 1, 0)[lo:] + b"".join(content(k[0], 1, c) for c in range(1, 8))
            whole = store.read_span(k[0], 1, 0, 7)  # chunk-aligned: one checked copy of whole runs
            assert whole is None or whole == b"".join(content(k[0], 1, c) for c in range(8))
    finally:
        stop.set()
        thread.join()
    assert hits > 0
    check_integrity(store)


def test_sigkill_during_admission_never_serves_wrong_bytes(tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(CHILD_SRC)
    cache = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    rng = random.Random(3)
    held = 0
    for round_ in range(10):
        child = subprocess.Popen([sys.executable, str(script), str(cache), str(round_)], stdout=subprocess.PIPE, env=env)
        assert child.stdout is not None and child.stdout.readline() == b"ready\n"
        time.sleep(rng.uniform(0.0, 0.3))
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
        # Check after every kill: a later round could evict or repair what this one broke.
        store = Store(str(cache), 64 * 4096)
        for ino in range(1, 5):
            for gen in (1, 2):
                for chunk in range(8):
                    got = store.read_chunk(ino, gen, chunk)
                    assert got is None or got == content(ino, gen, chunk)
                    held += got is not None
        assert store.stats().verify_failures == 0, f"round {round_}: a committed page lost its content"
        check_integrity(store)
        store.abandon()  # no clean close: the next child opens a cache that was killed
    assert held > 0


def test_host_crash_wipes_but_a_clean_reboot_keeps(tmp_path: Path, caplog: pytest.LogCaptureFixture, expect_log) -> None:
    expect_log("host crashed")
    state_file = tmp_path / "state.json"

    def other_boot() -> None:
        state = json.loads(state_file.read_text())
        state_file.write_text(json.dumps({**state, "boot_id": "another-boot"}))

    data = unique()
    store = Store(str(tmp_path), 1 << 20)
    admit(store, (1, 1, 0, data))
    store.close()
    other_boot()  # closed cleanly, then rebooted
    store = Store(str(tmp_path), 1 << 20)
    assert store.read_chunk(1, 1, 0) == data
    store.abandon()  # a killed process on a host that stays up: what LMDB committed is kept
    store = Store(str(tmp_path), 1 << 20)
    assert store.read_chunk(1, 1, 0) == data
    store.abandon()  # as if the host went down with the cache open
    other_boot()
    store = Store(str(tmp_path), 1 << 20)
    assert store.read_chunk(1, 1, 0) is None
    assert "host crashed" in caplog.text


def test_capacity_grow_and_shrink(tmp_path: Path) -> None:
    store = Store(str(tmp_path), 4 * CHUNK)
    data = {c: unique() for c in range(4)}
    admit(store, *((1, 1, c, v) for c, v in data.items()))
    store.close()
    store = Store(str(tmp_path), 8 * CHUNK)
    assert all(store.read_chunk(1, 1, c) == v for c, v in data.items())
    admit(store, *((2, 1, c, unique()) for c in range(4)))
    store.close()
    store = Store(str(tmp_path), 2 * CHUNK)
    assert store.stats().pages_used <= 32
    assert os.path.getsize(tmp_path / "pages.slab") == 2 * CHUNK
    assert all(store.read_chunk(1, 1, c) in (None, v) for c, v in data.items())
    check_integrity(store)
    admit(store, (3, 1, 0, unique()))
    check_integrity(store)


def _bad_format(tmp_path: Path, **changes: object) -> None:
    Store(str(tmp_path), 1 << 20).close()
    env = lmdb.open(str(tmp_path / "meta.lmdb"), max_dbs=6)
    with env.begin(write=True, db=env.open_db(b"meta")) as txn:
        marker = json.loads(txn.get(b"format"))
        txn.put(b"format", json.dumps({**marker, **changes}).encode())
    env.close()


@pytest.mark.parametrize(
    ("changes", "where", "message"),
    [
        ({"format": 0}, "state", "older fusecache"),
        ({"format": 99}, "state", "newer fusecache"),
        ({"chunk_size": 131072}, "state", "131072-byte chunks"),
        ({"page_size": 8192}, "state", "8192-byte pages"),
        ({"program": "other"}, "state", "no record of how it was closed"),
        ({"format": 0}, "lmdb", "digest differs"),
    ],
)
def test_another_format_starts_empty(
    tmp_path: Path, expect_log, caplog: pytest.LogCaptureFixture, changes: dict, where: str, message: str
) -> None:
    """A cache of another format, or whose metadata changed after a clean close, is wiped with one line, not refused."""
    expect_log(message)
    store = Store(str(tmp_path), 1 << 20)
    admit(store, (1, 1, 0, unique()))
    store.close()
    if where == "lmdb":
        _bad_format(tmp_path, **changes)
    else:
        state = json.loads((tmp_path / "state.json").read_text())
        (tmp_path / "state.json").write_text(json.dumps({**state, **changes}))
    store = Store(str(tmp_path), 1 << 20)
    assert store.stats().chunks == 0 and store.read_chunk(1, 1, 0) is None
    assert message in caplog.text and "starting empty" in caplog.text
    store.close()
    assert Store(str(tmp_path), 1 << 20).stats().chunks == 0


def test_bad_dirs_are_quiet_errors(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(QuietError, match="not a fusecache cache"):
        Store(str(foreign), 1 << 20)
    with pytest.raises(QuietError, match="not a fusecache cache"):
        Store(str(foreign), 1 << 20, reset=True)  # reset never deletes what is not ours
    assert (foreign / "notes.txt").read_text() == "mine"

    other_lmdb = tmp_path / "other"
    (other_lmdb / "meta.lmdb").mkdir(parents=True)
    lmdb.open(str(other_lmdb / "meta.lmdb")).close()
    with pytest.raises(QuietError, match="not a fusecache cache"):
        Store(str(other_lmdb), 1 << 20)


    with pytest.raises(QuietError, match="unknown eviction policy"):
        Store(str(tmp_path / "policy"), 1 << 20, eviction="fifo")
    with pytest.raises(QuietError, match="smaller than one chunk"):
        Store(str(tmp_path / "tiny"), CHUNK - 1)

    busy = Store(str(tmp_path / "busy"), 1 << 20)
    with pytest.raises(QuietError, match="in use"):
        Store(str(tmp_path / "busy"), 1 << 20)
    with pytest.raises(QuietError, match="in use"):
        Store(str(tmp_path / "busy"), 1 << 20, reset=True)
    busy.close()


def test_reset_starts_empty_even_from_a_corrupt_cache(tmp_path: Path) -> None:
    store = Store(str(tmp_path), 1 << 20)
    admit(store, (1, 1, 0, unique()))
    store.close()
    (tmp_path / "meta.lmdb" / "data.mdb").write_bytes(b"garbage" * 5000)
    store = Store(str(tmp_path), 1 << 20, reset=True)
    assert store.read_chunk(1, 1, 0) is None
    assert store.stats().pages_used == 0
    data = unique()
    admit(store, (1, 1, 0, data))
    assert store.read_chunk(1, 1, 0) == data


# --- ranges, the chunk digest, runs of slots ----------------------------------


RANGES = [
    (0, None),
    (0, CHUNK),
    (0, 1),
    (1, 2),
    (100, 5000),
    (4096, 8192),
    (4095, 4097),
    (8191, 3 * 4096 + 1),
    (5 * 4096, 9 * 4096),
    (CHUNK - 1, CHUNK),
    (CHUNK - 5000, None),
    (1000, CHUNK + 999),
    (CHUNK, None),
    (CHUNK + 10, CHUNK + 20),
    (30, 30),
    (40, 20),
]


def test_ranges_of_dense_sparse_and_short_chunks(tmp_path: Path) -> None:
    store = Store(str(tmp_path), 1 << 20)
    dense = unique()
    pool = [unique(PAGE_SIZE) for _ in range(3)]
    # Holes, a page twice, pages another chunk holds: not one run of slots.
    sparse = b"".join([pool[0], bytes(PAGE_SIZE), pool[1], pool[0], *[bytes(PAGE_SIZE)] * 5, dense[:PAGE_SIZE], *[pool[2]] * 6])
    short = unique(3 * PAGE_SIZE + 700)
    short_hole_end = unique(PAGE_SIZE) + bytes(2000)
    chunks = {0: dense, 1: sparse, 2: short, 3: short_hole_end, 4: bytes(CHUNK)}
    admit(store, *((1, 1, c, v) for c, v in chunks.items()))
    assert is_run(store, 1, 1, 0) and is_run(store, 1, 1, 2)
    assert not is_run(store, 1, 1, 1) and not is_run(store, 1, 1, 3) and not is_run(store, 1, 1, 4)
    for c, data in chunks.items():
        assert store.read_chunk(1, 1, c) == data
        for lo, hi in RANGES:
            assert store.read_chunk(1, 1, c, lo, hi) == data[lo:hi], (c, lo, hi)
            assert store.read_chunk(1, 1, c, lo=lo) == data[lo:]
            span = store.read_span(1, 1, c, c, lo, hi)
            assert span is not None and bytes(span) == data[lo:hi], (c, lo, hi)
        span = store.read_span(1, 1, 0, 2, 1000, 2000)  # dense, sparse, short: one buffer
        assert span is not None and bytes(span) == dense[1000:] + sparse + short[:2000]
    assert store.read_chunk(1, 1, 9, 0, 10) is None
    assert store.stats().verify_failures == 0
    check_integrity(store)


@pytest.mark.parametrize("layout", ["run", "scattered"])
def test_a_damaged_page_fails_only_the_ranges_that_hold_it(tmp_path: Path, layout: str) -> None:
    store = Store(str(tmp_path), 1 << 20)
    data = unique()
    if layout == "scattered":
        # The last page is shared with an earlier chunk: this chunk's slots are not one run.
        admit(store, (2, 1, 0, bytes(CHUNK - PAGE_SIZE) + data[-PAGE_SIZE:]))
    admit(store, (1, 1, 0, data))
    assert is_run(store, 1, 1, 0) == (layout == "run")
    damage(store, slots_of(store, 1, 1, 0)[5])
    assert store.read_chunk(1, 1, 0, 0, 5 * PAGE_SIZE) == data[: 5 * PAGE_SIZE]  # pages 0-4
    assert store.read_chunk(1, 1, 0, 6 * PAGE_SIZE, None) == data[6 * PAGE_SIZE :]  # pages 6-15
    assert store.read_chunks(1, 1, 0, 0, 6 * PAGE_SIZE, None) == [data[6 * PAGE_SIZE :]]
    span = store.read_span(1, 1, 0, 0, 6 * PAGE_SIZE + 1, None)
    assert span is not None and bytes(span) == data[6 * PAGE_SIZE + 1 :]
    assert store.stats().verify_failures == 0
    assert store.read_span(1, 1, 0, 0, 5 * PAGE_SIZE, 5 * PAGE_SIZE + 1) is None
    assert store.read_span(1, 1, 0, 0) is None
    assert store.stats().verify_failures == 2
    assert store.read_chunk(1, 1, 0, 5 * PAGE_SIZE + 100, 5 * PAGE_SIZE + 200) is None  # inside page 5
    assert store.read_chunk(1, 1, 0, 4 * PAGE_SIZE, 6 * PAGE_SIZE + 1) is None  # across it
    assert store.read_chunk(1, 1, 0) is None  # the whole chunk: its digest fails
    assert store.read_chunks(1, 1, 0, 0, 0, None) == [None]
    assert store.stats().verify_failures == 6
    admit(store, (1, 1, 0, data))  # the same bytes again: healed
    assert store.read_chunk(1, 1, 0) == data
    check_integrity(store)


def test_the_chunk_digest_covers_every_byte(tmp_path: Path) -> None:
    """A whole-chunk read is checked with one hash, not per page: damage anywhere fails it, even in a short last page."""
    store = Store(str(tmp_path), 1 << 20)
    tail = unique(5 * PAGE_SIZE + 123)
    admit(store, (1, 1, 0, tail))
    last = slots_of(store, 1, 1, 0)[5]
    write_slab(store, last * PAGE_SIZE + 122, b"\xff")
    assert store.read_chunk(1, 1, 0) is None
    assert store.read_chunk(1, 1, 0, 0, 5 * PAGE_SIZE) == tail[: 5 * PAGE_SIZE]
    write_slab(store, last * PAGE_SIZE + 122, tail[-1:])
    write_slab(store, last * PAGE_SIZE + 200, b"\xff")  # past the end: padding the page digest covers
    assert store.read_chunk(1, 1, 0) == tail
    assert store.read_chunk(1, 1, 0, 5 * PAGE_SIZE, None) is None


def test_read_chunks_is_read_chunk_per_chunk(tmp_path: Path) -> None:
    store = Store(str(tmp_path), 1 << 20)
    chunks = {c: unique() for c in range(4)}
    chunks[2] = bytes(CHUNK // 2) + unique(CHUNK // 2)
    chunks[4] = unique(10000)  # end of file
    admit(store, *((1, 1, c, v) for c, v in chunks.items() if c != 3))  # 3 is a miss
    for first, last, lo, hi in [(0, 0, 0, None), (0, 3, 100, 200), (1, 2, CHUNK - 1, 1), (2, 6, 0, None), (4, 6, 9000, 5), (5, 6, 0, None)]:
        got = store.read_chunks(1, 1, first, last, lo, hi)
        want = []
        for c in range(first, last + 1):
            data = chunks.get(c) if c != 3 else None
            if data is not None:
                data = data[lo if c == first else 0 : hi if c == last and hi is not None else CHUNK]
            want.append(data)
        if last >= 5:
            want[5 - first :] = [None] * (last - 4)  # past the short chunk: not looked up
        assert got == want, (first, last, lo, hi)
        # read_span: the same bytes joined, or None unless every chunk up to the end of the file hits.
        parts: list[bytes] | None = []
        for c, data in enumerate(got, first):
            if data is None:
                parts = None
                break
            parts.append(data)
            if len(chunks[c]) < CHUNK:
                break
        span = store.read_span(1, 1, first, last, lo, hi)
        assert (None if span is None else bytes(span)) == (None if parts is None else b"".join(parts)), (first, last, lo, hi)
    assert store.stats().verify_failures == 0


def test_slots_are_allocated_in_runs_and_reused(tmp_path: Path) -> None:
    store = Store(str(tmp_path), 8 * CHUNK, eviction="lru")
    first = {c: unique() for c in range(8)}
    admit(store, *((1, 1, c, v) for c, v in first.items()))
    assert all(is_run(store, 1, 1, c) for c in first)
    assert store.stats().pages_used == 128
    # Free every other chunk: four 16-slot extents that do not touch.
    store.apply(WriteBatch(drop=[(1, 1, c) for c in (0, 2, 4, 6)]))
    check_integrity(store)
    held = sorted(slots_of(store, 1, 1, 1).values())
    admit(store, (2, 1, 0, unique()), (2, 1, 1, unique()))
    assert is_run(store, 2, 1, 0) and is_run(store, 2, 1, 1)
    assert min(slots_of(store, 2, 1, 0).values()) == 0  # the lowest extent first
    assert held[0] not in slots_of(store, 2, 1, 0).values()
    # Frees that touch merge: dropping chunks 1 and 3 joins them with the free extent between them.
    store.apply(WriteBatch(drop=[(1, 1, 1), (1, 1, 3)]))
    check_integrity(store)
    big = [(3, 1, c, unique()) for c in range(3)]
    admit(store, *big)
    assert all(is_run(store, 3, 1, c) for c in range(3))
    for *k, v in big:
        assert store.read_chunk(*k) == v
    # A full cache: admissions evict and reuse the freed slots, in runs when they can.
    for n in range(20):
        admit(store, (4, 1, n, unique()), (4, 1, n + 100, bytes(CHUNK // 2) + unique(CHUNK // 2)))
        check_integrity(store)
        assert store.read_chunk(4, 1, n) is not None
    assert store.stats().pages_used <= 128
    assert store.stats().verify_failures == 0


def test_same_key_twice_in_one_batch(tmp_path: Path) -> None:
    store = Store(str(tmp_path), 1 << 20)
    a, b = unique(), unique()
    admit(store, (1, 1, 0, a), (1, 1, 0, b))
    assert store.read_chunk(1, 1, 0) == b
    check_integrity(store)
    admit(store, (1, 1, 0, a), (1, 1, 0, a))
    assert store.read_chunk(1, 1, 0) == a
    assert store.stats().pages_used == 16
    check_integrity(store)


# --- fusecache check -----------------------------------------------------------


def run_check(cache_dir: Path) -> subprocess.CompletedProcess[str]:
    """The real command, as an operator runs it."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "fusecache", "check", str(cache_dir)], capture_output=True, text=True, env=env, timeout=120
    )


def snapshot(cache_dir: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under the cache dir: its bytes and mtime."""
    return {str(p): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(cache_dir.rglob("*")) if p.is_file()}


def filled_cache(cache_dir: Path) -> dict[tuple[int, int, int], bytes]:
    """A closed cache with dense, sparse, shared and short chunks and a file record."""
    store = Store(str(cache_dir), 1 << 20)
    shared = unique()
    chunks = {(1, 1, 0): shared, (1, 1, 1): bytes(CHUNK // 2) + unique(CHUNK // 2), (2, 1, 0): shared, (2, 1, 3): unique(5000)}
    store.apply(WriteBatch(admit=[(*k, v) for k, v in chunks.items()], files=[(1, 1, (3 * CHUNK, 1, 2, 3))]))
    store.close()
    return chunks


def test_check_a_consistent_cache(tmp_path: Path) -> None:
    filled_cache(tmp_path)
    before = snapshot(tmp_path)
    done = run_check(tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines() == [f"{tmp_path}: consistent (4 chunks, 26 pages, 230 of 256 slots free)"]
    assert done.stderr == ""
    assert snapshot(tmp_path) == before  # read-only: not a byte nor an mtime changed


def test_check_names_damaged_slab_bytes(tmp_path: Path) -> None:
    filled_cache(tmp_path)
    store = Store(str(tmp_path), 1 << 20)
    slot = slots_of(store, 2, 1, 3)[1]  # the short chunk's last, partial page
    store.close()
    fd = os.open(tmp_path / "pages.slab", os.O_RDWR)
    at = slot * PAGE_SIZE + 7
    os.pwrite(fd, bytes([os.pread(fd, 1, at)[0] ^ 0xFF]), at)  # (a byte that differs: the page's bytes are random)
    os.close(fd)
    done = run_check(tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"{tmp_path}: 3 problems (4 chunks, 26 pages, 230 of 256 slots free)"
    assert any(f"slot {slot}: its bytes do not match page" in line for line in lines[1:])
    page_check = f"bytes at slot {slot} do not match its check"
    assert any("chunk 3 of inode 2 generation 1: page " in line and page_check in line for line in lines[1:])
    assert any("chunk 3 of inode 2 generation 1: its bytes in the slab do not match its chunk digest" in line for line in lines[1:])


def test_check_names_a_wrong_refcount_and_a_stale_generation(tmp_path: Path) -> None:
    filled_cache(tmp_path)
    env = lmdb.open(str(tmp_path / "meta.lmdb"), max_dbs=6)
    pages, files = env.open_db(b"pages"), env.open_db(b"files")
    with env.begin(write=True) as txn:
        digest, value = next(iter(txn.cursor(db=pages)))
        slot, count = int.from_bytes(value[:4], "big"), int.from_bytes(value[4:], "big")
        txn.put(digest, value[:4] + (count + 1).to_bytes(4, "big"), db=pages)
        ino = (1).to_bytes(8, "big")
        txn.put(ino, (2).to_bytes(8, "big") + bytes(txn.get(ino, db=files))[8:], db=files)  # the record says generation 2
    env.close()
    done = run_check(tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"page {bytes(digest).hex()} at slot {slot} has refcount {count + 1}, but {count} chunks name it" in done.stdout
    assert "chunk 0 of inode 1 generation 1: the file's record is generation 2" in done.stdout


def test_check_refuses_what_it_cannot_check(tmp_path: Path) -> None:
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("mine")
    done = run_check(tmp_path / "notes")
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.splitlines() == [
        f"fusecache: cache dir {tmp_path / 'notes'}: is not a fusecache cache (no meta.lmdb or pages.slab); give the --cache-dir of a mount"
    ]
    done = run_check(tmp_path / "absent")
    assert done.returncode == 2 and len(done.stderr.splitlines()) == 1 and "does not exist" in done.stderr

    other = tmp_path / "other"
    (other / "meta.lmdb").mkdir(parents=True)
    lmdb.open(str(other / "meta.lmdb")).close()
    (other / "pages.slab").write_bytes(b"")
    done = run_check(other)
    assert done.returncode == 2 and len(done.stderr.splitlines()) == 1 and "not a fusecache cache" in done.stderr

    store = Store(str(tmp_path / "busy"), 1 << 20)  # held open: a mounted daemon's cache
    try:
        done = run_check(tmp_path / "busy")
    finally:
        store.close()
    assert done.returncode == 2 and len(done.stderr.splitlines()) == 1 and "in use by a fusecache process" in done.stderr
    assert run_check(tmp_path / "busy").returncode == 0


@pytest.mark.parametrize("eviction", ["s3fifo", "lru"])
def test_a_pinned_file_survives_a_scan_and_a_restart(tmp_path: Path, eviction: str) -> None:
    store = Store(str(tmp_path), 16 * CHUNK, eviction=eviction)
    golden = {c: unique() for c in range(6)}
    admit(store, *((1, 1, c, v) for c, v in golden.items()))
    store.apply(WriteBatch(pins={1: "golden.img"}))
    assert store.pins() == {1: "golden.img"}
    for c in range(60):  # a backup scan of an image nearly four times the cache
        admit(store, (2, 1, c, unique()))
    assert all(store.read_chunk(1, 1, c) == v for c, v in golden.items())
    assert store.stats().chunks <= 16
    check_integrity(store)
    store.close()
    store = Store(str(tmp_path), 16 * CHUNK, eviction=eviction)  # pins survive a restart
    assert store.pins() == {1: "golden.img"}
    for c in range(60, 120):
        admit(store, (2, 1, c, unique()))
    assert all(store.read_chunk(1, 1, c) == v for c, v in golden.items())
    store.apply(WriteBatch(pins={}))  # unpinned: evictable again
    for c in range(120, 180):
        admit(store, (2, 1, c, unique()))
    assert [store.read_chunk(1, 1, c) for c in golden].count(None) == len(golden)
    check_integrity(store)
    store.close()


def test_a_cache_full_of_pinned_chunks_skips_admissions(tmp_path: Path) -> None:
    store = Store(str(tmp_path), 4 * CHUNK)
    golden = [(1, 1, c, unique()) for c in range(4)]
    admit(store, *golden)
    store.apply(WriteBatch(pins={1: "golden.img"}))
    admit(store, (2, 1, 0, unique()))
    assert all(store.read_chunk(*k) == d for *k, d in golden)
    assert store.read_chunk(2, 1, 0) is None and store.stats().skipped_chunks == 1
    check_integrity(store)


def test_holdings_count_bytes_shared_with_other_files(tmp_path: Path) -> None:
    store = Store(str(tmp_path), 1 << 20)
    shared, own = unique(), unique()
    admit(store, (1, 1, 0, shared), (1, 1, 1, own), (1, 1, 2, bytes(CHUNK)), (2, 1, 5, shared))
    h = store.holdings(1, 1)
    assert h.chunks == [0, 1, 2] and h.cached_bytes == 2 * CHUNK and h.shared_bytes == CHUNK
    assert store.holdings(2, 1).shared_bytes == CHUNK and store.holdings(3, 1).chunks == []


def test_the_hit_index_never_outlives_a_change(tmp_path: Path) -> None:
    """One-chunk reads remember locations (the hit index); a drop, a new admission or an eviction is seen at once."""
    store = Store(str(tmp_path), 8 * CHUNK, eviction="lru")
    old, new = unique(), unique()
    admit(store, (1, 1, 0, old))
    for _ in range(2):  # the second read comes from the index
        span = store.read_span(1, 1, 0, 0, PAGE_SIZE, 2 * PAGE_SIZE)
        assert span is not None and bytes(span) == old[PAGE_SIZE : 2 * PAGE_SIZE]
    store.apply(WriteBatch(drop=[(1, 1, 0)]))  # the guest wrote over it
    assert store.read_span(1, 1, 0, 0, PAGE_SIZE, 2 * PAGE_SIZE) is None
    admit(store, (1, 1, 0, new))
    span = store.read_span(1, 1, 0, 0, PAGE_SIZE, 2 * PAGE_SIZE)
    assert span is not None and bytes(span) == new[PAGE_SIZE : 2 * PAGE_SIZE]
    for c in range(1, 12):  # a scan larger than the cache evicts chunk 0 and reuses its slots
        admit(store, (2, 1, c, unique()))
    assert store.read_span(1, 1, 0, 0, PAGE_SIZE, 2 * PAGE_SIZE) is None
    assert store.stats().verify_failures == 0
    check_integrity(store)


def test_a_location_read_while_a_batch_ran_is_not_remembered(tmp_path: Path) -> None:
    store = Store(str(tmp_path), 8 * CHUNK)
    reader = store._reader
    key = pack_key(1, 1, 0)
    epoch = reader._epoch
    reader.batch_started()  # a batch started and ended between the read and the remembering
    reader.batch_ended()
    reader._remember(key, b"stale", epoch)
    assert key not in reader._hit_index
    reader.batch_started()  # read while a batch runs
    reader._remember(key, b"stale", reader._epoch)
    assert key not in reader._hit_index
    reader.batch_ended()


def test_reads_beside_the_writer_never_return_a_dropped_chunk(tmp_path: Path) -> None:
    """Batches on another thread while the loop thread keeps reading: after each batch returns, reads see it."""
    store = Store(str(tmp_path), 16 * CHUNK)
    stop = threading.Event()
    wrong: list[tuple[int, int]] = []
    current: dict[int, bytes | None] = {}

    def keep_reading() -> None:
        while not stop.is_set():
            for c in range(4):
                span = store.read_span(1, 1, c, c, 0, PAGE_SIZE)
                if span is not None and bytes(span) not in contents[c]:
                    wrong.append((c, len(span)))

    contents: dict[int, set[bytes]] = {c: set() for c in range(4)}
    for c in range(4):
        data = unique()
        contents[c].add(data[:PAGE_SIZE])
        admit(store, (1, 1, c, data))
        current[c] = data
    reader = threading.Thread(target=keep_reading)
    reader.start()
    try:
        for i in range(60):
            c = i % 4
            store.apply(WriteBatch(drop=[(1, 1, c)]))
            after_drop = store.read_span(1, 1, c, c, 0, PAGE_SIZE)
            assert after_drop is None, i
            data = unique()
            contents[c].add(data[:PAGE_SIZE])
            admit(store, (1, 1, c, data))
            span = store.read_span(1, 1, c, c, 0, PAGE_SIZE)
            assert span is not None and bytes(span) == data[:PAGE_SIZE], i
    finally:
        stop.set()
        reader.join()
    assert not wrong
    check_integrity(store)


def test_all_missing_is_one_look_and_counts_misses(tmp_path: Path) -> None:
    """The cold path's look-up: none of a range held (other files, generations and chunks around it do not count)."""
    store = Store(str(tmp_path / "cache"), 16 << 20)
    try:
        store.apply(WriteBatch(files=[(7, 1, (1, 2, 3, 4)), (8, 1, (1, 2, 3, 4))]))
        store.apply(WriteBatch(admit=[(7, 1, 5, os.urandom(CHUNK)), (8, 1, 0, os.urandom(CHUNK))]))
        misses = store.stats().misses
        assert not store.all_missing(7, 1, 5, 5) and not store.all_missing(7, 1, 0, 5) and not store.all_missing(7, 1, 5, 9)
        assert store.stats().misses == misses  # a range with a held chunk counts nothing: read_chunks will
        assert store.all_missing(7, 1, 0, 4) and store.all_missing(7, 1, 6, 100) and store.all_missing(7, 2, 0, 100)
        assert store.all_missing(6, 1, 0, 100) and store.all_missing(9, 1, 0, 10)
        assert store.stats().misses == misses + 5 + 95 + 101 + 101 + 11
    finally:
        store.close()
