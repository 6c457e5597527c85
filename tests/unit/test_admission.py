"""The cache and its admission policies, without FUSE: a real store and a real backing directory."""

from __future__ import annotations

import os
import tracemalloc

import pytest
import trio

from fusecache.admission import HOST, Admission, GuestReads, Inclusive, SecondChance
from fusecache.backing import OffLoop
from fusecache.backing.local import LocalBacking
from fusecache.balloon import GuestState, Shrink
from fusecache.cache import Cache
from fusecache.files import Files
from fusecache.inodes import OpenFile
from fusecache.peer_reads import PeerReads
from fusecache.store import Store
from fusecache.store_queue import StoreQueue

MiB = 1 << 20
CS = 65536


class CountingBacking(LocalBacking):
    def __init__(self, root: str) -> None:
        super().__init__(root)
        self.preads = 0

    def pread(self, fh, offset, size):
        self.preads += 1
        return super().pread(fh, offset, size)

    def pread_cached(self, fh, offset, size):  # (a read the page cache answers, on the loop: a read all the same)
        data = super().pread_cached(fh, offset, size)
        if data:
            self.preads += 1
        return data


@pytest.fixture
def env(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    backing = CountingBacking(str(images))
    store = Store(str(tmp_path / "cache"), 64 * MiB)
    yield images, backing, store
    store.close()


def open_file(backing: LocalBacking, path: str, fh: int = 1) -> OpenFile:
    h = backing.open(path, os.O_RDWR)
    return OpenFile(fh, 0, path, h, backing.fstat(h), True)


def parts(backing: LocalBacking, store: Store) -> tuple[OffLoop, Files]:
    """What a cache and its admission policy share: the backing and the per-file state over the store's queue."""
    offloop = OffLoop(backing)
    return offloop, Files(offloop, store, StoreQueue(store), revalidate=2.0)


def make_cache(offloop: OffLoop, files: Files, admission: Admission, peer_reads=None) -> Cache:
    return Cache(offloop, files, files.queue, admission, peer_reads=peer_reads)


async def run(cache: Cache) -> None:
    """The background work of a mount: the store's writer and the admission policy."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(cache.queue.run)
        nursery.start_soon(cache.admission.run)


async def settle(cache: Cache) -> None:
    for _ in range(200):
        await trio.sleep(0.01)
        if cache.queue.empty:
            return


def test_second_chance_admits_what_the_guest_evicted(env, tmp_path):
    images, backing, store = env
    data = os.urandom(4 * MiB)
    (images / "vm1.img").write_bytes(data)
    mountpoint = str(tmp_path / "mnt")
    offloop, files = parts(backing, store)
    policy = SecondChance(mountpoint, files, offloop, staging_bytes=2 * MiB)  # half staged, half read again
    cache = make_cache(offloop, files, policy)

    async def go():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, cache)
            policy.on_guests({"vm1": GuestState("vm1", [mountpoint + "/vm1.img"], 512 * MiB, None, {})})
            await trio.sleep(0.1)  # the policy resolves the image to its inode
            f = open_file(backing, "vm1.img")
            assert await cache.read(f, 0, 4 * MiB) == data
            await settle(cache)
            assert store.stats().chunks == 0  # second chance: nothing stored on first read
            reads = backing.preads
            policy.on_shrink(Shrink("vm1", [mountpoint + "/vm1.img"], 3 * MiB, 3 * MiB))
            await trio.sleep(0.3)
            await settle(cache)
            refetched = backing.preads - reads
            hits_before = cache.images["vm1.img"].hit_bytes
            assert await cache.read(f, 0, 4 * MiB) == data
            nursery.cancel_scope.cancel()
        return refetched, cache.images["vm1.img"].hit_bytes - hits_before

    refetched, hit = trio.run(go)
    g = policy.stats().guests["vm1"]
    assert g.admitted_chunks == 48  # the oldest 3 MiB of its reads
    assert g.from_backing > 0 and g.from_staging > 0 and refetched >= 1
    assert hit == 3 * MiB
    assert g.admitted_bytes == 3 * MiB


def second_chance(env, tmp_path, *names: str) -> tuple[LocalBacking, str, SecondChance, Cache]:
    """1 MiB random images `names`, and a cache with second-chance admission (256 MiB staged) over them:
    (backing, mountpoint, policy, cache)."""
    images, backing, store = env
    for name in names:
        (images / name).write_bytes(os.urandom(MiB))
    mountpoint = str(tmp_path / "mnt")
    offloop, files = parts(backing, store)
    policy = SecondChance(mountpoint, files, offloop, staging_bytes=256 * MiB)
    return backing, mountpoint, policy, make_cache(offloop, files, policy)


def test_staged_block_written_since_is_read_again(env, tmp_path):
    images = env[0]
    backing, mountpoint, policy, cache = second_chance(env, tmp_path, "a.img")

    async def go():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, cache)
            policy.on_guests({"vm": GuestState("vm", [mountpoint + "/a.img"], 512 * MiB, None, {})})
            await trio.sleep(0.1)  # the policy resolves the image to its inode
            f = open_file(backing, "a.img")
            await cache.read(f, 0, MiB)
            assert policy.staging.used == MiB
            await cache.write(f, 100, b"new bytes")
            keys = [k for k in policy.guests["vm"].recent if k[2] == 0]
            nursery.start_soon(policy._admit, "vm", keys)
            await trio.sleep(0.3)
            await settle(cache)
            data = await cache.read(f, 0, 200)
            nursery.cancel_scope.cancel()
        return data

    data = trio.run(go)
    assert data[100:109] == b"new bytes"
    assert (images / "a.img").read_bytes()[:200] == data


def test_reads_of_an_image_no_guest_has_open_are_neither_listed_nor_staged(env, tmp_path):
    """No shrink can admit them: recording them was work (and memory) for nothing. Once a guest opens the
    image, its reads are listed and staged."""
    backing, mountpoint, policy, cache = second_chance(env, tmp_path, "a.img", "b.img")

    async def go():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, cache)
            a, b = open_file(backing, "a.img"), open_file(backing, "b.img", fh=2)
            for off in range(0, MiB, 128 << 10):  # a sequential stream: its readahead too
                await cache.read(a, off, 128 << 10)
            await trio.sleep(0.1)  # (background reads land)
            assert not policy.guests and policy.staging.used == 0 and not policy.wants(a.ino)
            policy.on_guests({"vm": GuestState("vm", [mountpoint + "/b.img"], 512 * MiB, None, {})})
            await trio.sleep(0.1)
            assert policy.wants(b.ino) and not policy.wants(a.ino)
            await cache.read(a, 0, MiB)
            await cache.read(b, 0, MiB)
            nursery.cancel_scope.cancel()

    trio.run(go)
    assert set(policy.guests) == {"vm"}
    assert {k[2] for k in policy.guests["vm"].recent} == set(range(MiB // CS))
    assert policy.staging.used == MiB  # b's bytes only
    assert HOST not in policy.stats().guests


def test_concurrent_misses_of_one_block_read_the_backing_once(env):
    images, backing, store = env
    (images / "b.img").write_bytes(os.urandom(CS * 4))
    cache = make_cache(*parts(backing, store), Inclusive())

    async def go():
        f = open_file(backing, "b.img")
        results = []

        async def reader():
            results.append(await cache.read(f, 4096, 8192))

        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(reader)
        return results

    results = trio.run(go)
    assert len(set(results)) == 1 and len(results[0]) == 8192
    assert backing.preads == 1


def test_guest_reads_are_bounded_and_oldest_first():
    g = GuestReads(limit=10 * CS)
    for c in range(15):
        g.add((1, 1, c), CS)
    g.add((1, 1, 7), CS)  # read again: newest now
    assert g.recent_bytes == 10 * CS
    assert g.take_oldest(3 * CS) == [(1, 1, 5), (1, 1, 6), (1, 1, 8)]


def test_chunks_read_together_are_remembered_as_if_read_one_by_one():
    """`add_many` (the chunks of one request) keeps the same list, totals and marks as `add` for each in turn."""
    one, many = GuestReads(limit=10 * CS), GuestReads(limit=10 * CS)
    batches = [[(1, 1, c) for c in range(6)], [(1, 1, 3), (1, 1, 9)], [(2, 1, c) for c in range(5)]]
    for n, batch in enumerate(batches):
        for key in batch:
            one.add(key, CS, now=100.0 + n)
        many.add_many([(key, CS) for key in batch], now=100.0 + n)
    assert list(many.recent.items()) == list(one.recent.items())
    assert (many.recent_bytes, many.read_total, list(many.marks)) == (one.recent_bytes, one.read_total, list(one.marks))
    assert many.read_since(101.0) == one.read_since(101.0) == 7 * CS


def test_bookkeeping_bytes_per_gib_of_reads():
    """Measured, printed for the README: what remembering one GiB of guest reads costs."""
    g = GuestReads(limit=1 << 40)
    n = (1 << 30) // CS
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for c in range(n):
        g.add((123456789, 3, c), CS)
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    per_entry = used / n
    print(f"second-chance bookkeeping: {per_entry:.0f} bytes per 64 KiB chunk, {used / MiB:.1f} MiB per GiB of reads")
    assert 50 < per_entry < 400


class PeersHolding:
    """Stands in for PeerSet: its summaries say it holds the chunks in `held` (any version)."""

    fetch_timeout = 0.001

    def __init__(self, held: set[int]) -> None:
        self.held = held

    def may_hold_location(self, ino, version, chunk) -> bool:
        return chunk in self.held

    async def fetch_location(self, ino, version, chunk, deadline):
        return None


def test_evicted_chunks_a_peer_holds_are_admitted_by_reference(env, tmp_path):
    images, backing, store = env
    (images / "vm.img").write_bytes(os.urandom(MiB))
    mountpoint = str(tmp_path / "mnt")
    offloop, files = parts(backing, store)
    peer_reads = PeerReads(PeersHolding(set(range(0, 16, 2))), files)
    policy = SecondChance(mountpoint, files, offloop, staging_bytes=256 * MiB, peer_holds=peer_reads.holds)
    cache = make_cache(offloop, files, policy, peer_reads)

    async def go():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, cache)
            policy.on_guests({"vm": GuestState("vm", [mountpoint + "/vm.img"], 512 * MiB, None, {})})
            await trio.sleep(0.1)
            f = open_file(backing, "vm.img")
            await cache.read(f, 0, MiB)
            policy.on_shrink(Shrink("vm", [], MiB, MiB))
            await trio.sleep(0.3)
            await settle(cache)
            nursery.cancel_scope.cancel()

    trio.run(go)
    g = policy.stats().guests["vm"]
    assert g.by_reference == 8 and g.admitted_chunks == 8  # the even chunks stay on the peer
    assert store.stats().chunks == 8


def test_a_shrink_admits_from_what_the_guest_could_still_hold():
    """Reads older than the guest's page cache size were dropped by the guest itself before the balloon moved."""
    policy = SecondChance("/mnt", None, None, staging_bytes=0)  # type: ignore[arg-type]  # on_shrink uses neither
    reads = policy.guests["vm"]
    reads.limit = 100 * CS
    for c in range(100):
        reads.add((1, 1, c), CS)
    sent = []
    policy._send = type("S", (), {"send_nowait": lambda self, item: sent.append(item)})()
    policy.on_shrink(Shrink("vm", [], 20 * CS, 10 * CS, cache_before=40 * CS))
    # the guest held at most the newest 40 reads (60..99); it evicted the oldest 10 of those
    assert sent == ["vm"] and policy._queued["vm"] == [(1, 1, c) for c in range(60, 70)]
    assert policy.stats().guests["vm"].aged_out == 60 * CS


def test_before_is_the_last_report_plus_what_the_guest_read_since():
    """A report predates the guest's latest reads: those are in its page cache too, and not aged out."""
    policy = SecondChance("/mnt", None, None, staging_bytes=0)  # type: ignore[arg-type]  # on_shrink uses neither
    reads = policy.guests["vm"]
    reads.limit = 100 * CS
    for c in range(60):
        reads.add((1, 1, c), CS, now=100.0 + c * 0.2)  # reads 0..59, 0.2 s apart
    policy._send = type("S", (), {"send_nowait": lambda self, item: None})()
    # it reported 20 chunks of page cache at t=108 (after read 40), then read 41..59 (19 more, 20 with the mark's rounding)
    policy.on_shrink(Shrink("vm", [], 30 * CS, 30 * CS, cache_before=20 * CS, cache_before_at=108.0))
    held = policy._queued["vm"]
    assert held[0] == (1, 1, 20) and len(held) == 30  # the newest 20 + 20: 20..59; the oldest 30 of those evicted
    assert policy.stats().guests["vm"].aged_out == 20 * CS


def test_one_guest_has_at_most_one_admission_job_queued():
    """A guest that reports shrink after shrink cannot fill the admission queue another guest needs."""
    policy = SecondChance("/mnt", None, None, staging_bytes=0)  # type: ignore[arg-type]
    sent: list[str] = []
    policy._send = type("S", (), {"send_nowait": lambda self, item: sent.append(item)})()
    for c in range(1000):
        policy.guests["liar"].add((1, 1, c), CS)
        policy.on_shrink(Shrink("liar", [], CS, CS))
    policy.guests["honest"].add((2, 1, 0), CS)
    policy.on_shrink(Shrink("honest", [], CS, CS))
    assert sent == ["liar", "honest"]
    assert len(policy._queued["liar"]) == 1000 and policy._queued["honest"] == [(2, 1, 0)]


def test_each_read_is_taken_once_whatever_the_guest_claims():
    """The re-read bound: a guest claiming shrink after shrink gets each chunk it read admitted at most once."""
    policy = SecondChance("/mnt", None, None, staging_bytes=0)  # type: ignore[arg-type]
    policy._send = type("S", (), {"send_nowait": lambda self, item: None})()
    for c in range(50):
        policy.guests["liar"].add((1, 1, c), CS)
    for _ in range(20):
        policy.on_shrink(Shrink("liar", [], 1 << 30, 1 << 30, cache_before=1 << 30))
    assert len(policy._queued["liar"]) == 50
    assert policy.stats().guests["liar"].mode == "estimate"
