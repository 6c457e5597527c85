"""Failing open without FUSE: faults injected at each layer are served from the backing, a failed
batch fails closed, repeated store faults degrade to passthrough and a rebuild brings the cache
back; a cache damaged on disk (garbage, truncation, a killed process) opens empty or right, never
wrong and never with a signal."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import trio

from fusecache import health
from fusecache.store import Store, WriteBatch
from fusecache.store.opening import largest_fitting, lmdb_problem, room_needed
from tests.unit.test_cache_unit import CS, mem_cache, open_file

MiB = 1 << 20


@pytest.fixture
def parts(tmp_path):
    backing, cache = mem_cache(str(tmp_path / "cache"), 16 * MiB)
    yield backing, cache
    health.set_faults([])
    cache.store.close()


@pytest.mark.parametrize("layer", ["store.read", "admission", "writer", "store.apply"])
def test_an_injected_fault_is_served_from_the_backing(parts, expect_log, layer):
    expect_log("cache fault at")
    backing, cache = parts
    data = os.urandom(3 * CS)
    backing.put("a.img", data)

    async def go():
        f = await open_file(cache, backing, "a.img")
        await cache.read(f, 0, 3 * CS)
        await cache.queue.drain()
        health.set_faults([layer])
        written = await cache.write(f, CS, b"new bytes")
        await cache.queue.drain()
        got = bytes(await cache.read(f, 0, 3 * CS))
        await cache.queue.drain()
        health.set_faults([])
        again = bytes(await cache.read(f, 0, 3 * CS))
        return written, got, again

    written, got, again = trio.run(go)
    want = data[:CS] + b"new bytes" + data[CS + 9 :]
    assert written == 9 and got == want and again == want
    assert cache.health.faults.get(layer, 0) >= 1
    assert cache.health.state == health.CACHING


def test_a_failed_batch_of_drops_fails_closed_and_taints_the_store(tmp_path, expect_log):
    expect_log("cache fault at", "starting empty")
    backing, cache = mem_cache(str(tmp_path / "cache"), 16 * MiB)
    store, queue, files = cache.store, cache.queue, cache.files
    data = os.urandom(2 * CS)
    backing.put("a.img", data)

    async def go():
        f = await open_file(cache, backing, "a.img")
        await cache.read(f, 0, 2 * CS)
        await queue.drain()
        gen = files.get(f.ino).gen
        health.set_faults(["store.apply"])
        await cache.write(f, 0, b"X" * 100)
        await queue.drain()  # the drop did not commit: the store still holds the old chunk under the old generation
        health.set_faults([])
        assert files.get(f.ino).gen > gen
        return bytes(await cache.read(f, 0, 200))

    try:
        got = trio.run(go)
    finally:
        health.set_faults([])
    assert got == b"X" * 100 + data[100:200]
    store.close()
    reopened = Store(str(tmp_path / "cache"), 16 * MiB)  # the old chunk is under a record the store missed: not trusted
    assert reopened.stats().chunks == 0
    reopened.close()


def test_repeated_store_faults_degrade_to_passthrough_and_a_rebuild_brings_the_cache_back(parts, expect_log):
    expect_log("cache fault at", "degraded", "rebuilt")
    backing, cache = parts
    data = os.urandom(4 * CS)
    backing.put("a.img", data)

    async def go():
        f = await open_file(cache, backing, "a.img")
        health.set_faults(["store.read"])
        for _ in range(health.DEGRADE_AFTER):
            assert bytes(await cache.read(f, 0, 4 * CS)) == data
        assert cache.health.state == health.DEGRADED
        health.set_faults([])
        before = backing.preads
        assert bytes(await cache.read(f, 0, 4 * CS)) == data  # passthrough: the backing, nothing admitted
        assert backing.preads == before + 1 and cache.queue.settled
        await cache.queue.rebuild()
        assert cache.health.state == health.CACHING and cache.store.stats().chunks == 0
        await cache.write(f, 10, b"after")
        assert bytes(await cache.read(f, 0, 4 * CS)) == data[:10] + b"after" + data[15:]
        await cache.queue.drain()
        return cache.store.stats().chunks

    chunks = trio.run(go)
    assert chunks == 4
    s = cache.health.stats()
    assert s.degradations == 1 and s.rebuilds == 1 and s.faults["store.read"] >= health.DEGRADE_AFTER


def _filled(path: Path) -> dict[tuple[int, int, int], bytes]:
    store = Store(str(path), 4 * MiB)
    held = {(1, 1, c): os.urandom(CS) for c in range(24)}
    store.apply(WriteBatch(files=[(1, 1, (1, 2, 3, 4))], admit=[(*k, v) for k, v in held.items()]))
    store.close()
    return held


def _read_all(path: Path, held: dict) -> int:
    """Opens the cache (it must open), reads every chunk: right or absent, never wrong. Returns how many were right."""
    store = Store(str(path), 4 * MiB)
    right = 0
    for key, data in held.items():
        got = store.read_chunk(*key)
        assert got is None or got == data
        right += got is not None
    store.close()
    return right


def _garbage(path: Path, n: int, rng: random.Random) -> None:
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        for _ in range(n):
            f.seek(rng.randrange(size))
            f.write(rng.randbytes(rng.randrange(1, 600)))


@pytest.mark.parametrize("seed", range(3))
def test_garbage_in_data_mdb_or_the_slab_opens_right_or_empty(tmp_path, expect_log, seed):
    expect_log("starting empty")
    rng = random.Random(seed)
    held = _filled(tmp_path)
    _garbage(tmp_path / "meta.lmdb" / "data.mdb", 30, rng)
    assert _read_all(tmp_path, held) == 0  # the digest in state.json caught it: wiped
    held = _filled(tmp_path)
    _garbage(tmp_path / "pages.slab", 30, rng)
    right = _read_all(tmp_path, held)  # the slab's garbage is caught by the verified copy: misses
    assert 0 < right < len(held)


@pytest.mark.parametrize("which", ["data.mdb", "pages.slab"])
@pytest.mark.parametrize("clean", [True, False])
def test_truncated_files_open_empty_never_a_sigbus(tmp_path, expect_log, which, clean):
    expect_log("starting empty")
    held = _filled(tmp_path)
    if not clean:  # a killed process: the state file says "not clean, this boot"
        store = Store(str(tmp_path), 4 * MiB)
        store.abandon()
    target = tmp_path / ("meta.lmdb" if which == "data.mdb" else "") / which
    os.truncate(target, os.path.getsize(target) // 3)
    assert _read_all(tmp_path, held) == 0


def test_a_killed_process_keeps_its_cache(tmp_path):
    held = _filled(tmp_path)
    store = Store(str(tmp_path), 4 * MiB)
    store.abandon()
    assert json.loads((tmp_path / "state.json").read_text())["clean"] is False
    assert _read_all(tmp_path, held) == len(held)


def test_lmdb_problem_reads_the_meta_pages(tmp_path):
    _filled(tmp_path)
    data = tmp_path / "meta.lmdb" / "data.mdb"
    assert lmdb_problem(str(data)) is None
    os.truncate(data, os.path.getsize(data) - 4096)
    assert "truncated" in (lmdb_problem(str(data)) or "")
    data.write_bytes(b"\0" * 3 * 4096)
    assert "no valid LMDB meta page" in (lmdb_problem(str(data)) or "")


@pytest.mark.parametrize("free", [0, 9 * MiB, 48 * MiB, 1 << 40])
def test_the_largest_fitting_size_fits(free):
    fits = largest_fitting(free)
    assert fits == 0 or room_needed(fits) <= free
    assert room_needed(fits + MiB) > free


def test_health_rate_limits_its_lines(caplog, expect_log):
    expect_log("cache fault at")
    h = health.Health()
    for _ in range(100):
        h.fault("admission", RuntimeError("boom"))
    assert caplog.text.count("cache fault at admission") == 1
    assert h.faults == {"admission": 100} and h.state == health.CACHING  # admission faults never degrade


def test_a_write_while_degraded_means_the_next_open_starts_empty(tmp_path, expect_log):
    """Drops are not applied while degraded: a store closed then (no rebuild yet) must not be trusted again."""
    expect_log("cache fault at", "degraded", "starting empty")
    backing, cache = mem_cache(str(tmp_path / "cache"), 16 * MiB)
    store, queue = cache.store, cache.queue
    data = os.urandom(2 * CS)
    backing.put("a.img", data)

    async def go():
        f = await open_file(cache, backing, "a.img")
        await cache.read(f, 0, 2 * CS)
        await queue.drain()
        cache.health.degrade("a test")
        await cache.write(f, 0, b"Y" * 10)
        await queue.close()

    trio.run(go)
    assert store.stats().chunks == 2  # the old chunks are still there, under a record that is now wrong
    store.close()
    reopened = Store(str(tmp_path / "cache"), 16 * MiB)
    assert reopened.stats().chunks == 0
    reopened.close()
