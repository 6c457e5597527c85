"""The writer thread yields the GIL to reads (`store_queue.Pacer`): it sleeps between stretches of its work only while
reads are active, the store it writes is the same either way, and the read path gives the pacer its count of reads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from fusecache import store_queue
from fusecache.store import Store, WriteBatch
from fusecache.store_queue import Pacer
from tests.unit.test_cache_unit import CS, mem_cache, open_file

MiB = 1 << 20


def test_the_pacer_yields_only_while_reads_move(monkeypatch) -> None:
    slept: list[float] = []
    monkeypatch.setattr(store_queue.time, "sleep", slept.append)
    reads = [0]
    now = [100.0]
    monkeypatch.setattr(store_queue.time, "monotonic", lambda: now[0])
    pacer = Pacer(lambda: reads[0])
    pacer()  # no read ever made: (the count starts where it is) nothing to yield to
    reads[0] = 5
    pacer()  # reads moved: they are active
    now[0] += store_queue.READS_ACTIVE / 2
    pacer()  # still within READS_ACTIVE of the last move
    now[0] += store_queue.READS_ACTIVE
    pacer()  # the reads paused: the writer runs at full speed
    Pacer()()  # a pacer with no reads to watch never sleeps
    # the first sleep follows no stretch (the least); the second a stretch of READS_ACTIVE / 2 (its share's worth)
    share = store_queue.DUTY
    second = max(store_queue.YIELD, store_queue.READS_ACTIVE / 2 * (1 - share) / share)
    assert slept == pytest.approx([store_queue.YIELD, second])
    assert pacer.yields == 2


def test_the_writer_keeps_its_share_of_the_time_while_reads_move(monkeypatch) -> None:
    now = [100.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    monkeypatch.setattr(store_queue.time, "sleep", sleep)
    monkeypatch.setattr(store_queue.time, "monotonic", lambda: now[0])
    reads = [0]
    pacer = Pacer(lambda: reads[0])
    pacer.begin()
    stretches = [0.001, 0.004, 0.00001, 0.5]
    for work in stretches:
        now[0] += work  # a stretch of the writer's work (or of its wait for the GIL)
        reads[0] += 1  # reads keep moving
        pacer()
    share = store_queue.DUTY
    expected = [min(store_queue.YIELD_MAX, max(store_queue.YIELD, w * (1 - share) / share)) for w in stretches]
    assert slept == pytest.approx(expected)
    assert 0.001 / (0.001 + slept[0]) == pytest.approx(share)  # within the bounds: work is DUTY of the time
    assert expected[2] == store_queue.YIELD and expected[3] == store_queue.YIELD_MAX
    # a new batch: the time the writer waited for work before it is no stretch
    now[0] += 60
    pacer.begin()
    now[0] += 0.001
    reads[0] += 1
    pacer()
    assert slept[-1] == pytest.approx(expected[0])
    # reads paused: no sleep, and the next stretch starts from the last call
    now[0] += 1
    pacer()
    assert len(slept) == len(stretches) + 1
    now[0] += 0.002
    reads[0] += 1
    pacer()
    assert slept[-1] == pytest.approx(0.002 * (1 - share) / share)


def test_a_paced_batch_writes_the_same_store(tmp_path: Path) -> None:
    calls = [0]

    def pace() -> None:
        calls[0] += 1

    chunks = [os.urandom(CS) for _ in range(40)]
    stores = []
    for name, p in (("plain", None), ("paced", pace)):
        store = Store(str(tmp_path / name), 16 * MiB)
        store.apply(WriteBatch(files=[(7, 1, (1, 2, 3, 4))]))
        store.apply(WriteBatch(admit=[(7, 1, c, data) for c, data in enumerate(chunks)], pace=p))
        stores.append(store)
    try:
        assert calls[0] >= len(chunks)  # at least once per chunk named, and between slices
        for c, data in enumerate(chunks):
            assert stores[0].read_chunk(7, 1, c) == stores[1].read_chunk(7, 1, c) == data
    finally:
        for store in stores:
            store.close()


def test_the_cache_gives_the_writer_its_reads(tmp_path: Path) -> None:
    backing, cache = mem_cache(str(tmp_path / "cache"))
    store, queue = cache.store, cache.queue
    backing.put("a.img", os.urandom(4 * CS))
    backing.put("b.img", os.urandom(4 * CS))

    async def go() -> tuple[int, int]:
        before = queue.pacer.reads()  # type: ignore[misc]
        a = await open_file(cache, backing, "a.img")
        b = await open_file(cache, backing, "b.img")
        await cache.read(a, 0, CS)
        await cache.read(b, CS, 100)
        await cache.read(a, 0, CS)
        await queue.drain()
        return before, queue.pacer.reads()  # type: ignore[misc]

    try:
        before, after = trio.run(go)
    finally:
        store.close()
    assert after - before == 3
