"""Exact second chance wired into admission, and the store's "evict first" hint, without QEMU.

A real child process stands in for QEMU: one private anonymous mapping of a
size nothing else in it has (as QEMU holds guest RAM), holding some of the
pages the cache served; the policy scans it through the same path a guest
gets. Real store, real backing directory, no FUSE, no root (a process may
read its own child's memory).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import trio

from fusecache.admission import SecondChance, chunk_keys
from fusecache.balloon import GuestState, Shrink
from fusecache.geometry import PAGE_SIZE
from fusecache.guestmem import GuestMemoryScanner, GuestRam, Locations, Reason, Unscannable, locate_ram
from fusecache.store import Store
from fusecache.store.writer import WriteBatch
from tests.unit.test_admission import CountingBacking, MiB, make_cache, open_file, parts, run, settle

CS = 65536
RAM_PAGES = 1031  # a size no other mapping of the child has

CHILD = r"""
import ctypes, sys
path, size = sys.argv[1], int(sys.argv[2])
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
base = libc.mmap(None, size + 2 * 4096, 0, 0x22, -1, 0)  # PROT_NONE guard either side: no merging with a neighbour
addr = libc.mmap(base + 4096, size, 3, 0x32, -1, 0)
ram = memoryview((ctypes.c_char * size).from_address(addr)).cast("B")
with open(path, "rb") as f:
    f.readinto(ram)
print("ready", flush=True)
for line in sys.stdin:
    page = int(line)
    ram[page * 4096 : page * 4096 + 4096] = bytes(4096)  # the guest drops a page and zeroes it
    print("ok", flush=True)
"""


class RamChild:
    def __init__(self, path: str, content: bytes) -> None:
        with open(path, "wb") as f:
            f.write(content)
        self.size = len(content)
        self.proc = subprocess.Popen([sys.executable, "-c", CHILD, path, str(self.size)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "ready"

    def drop(self, page: int) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{page}\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "ok"

    def ram(self) -> GuestRam:
        ram = locate_ram(self.proc.pid, self.size)
        assert isinstance(ram, GuestRam), str(ram)
        return ram

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def env(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    store = Store(str(tmp_path / "cache"), 64 * MiB)
    yield images, CountingBacking(str(images)), store
    store.close()


@pytest.fixture
def child_of(tmp_path):
    children: list[RamChild] = []

    def make(content: bytes) -> RamChild:
        c = RamChild(str(tmp_path / f"ram{len(children)}.bin"), content)
        children.append(c)
        return c

    yield make
    for c in children:
        c.stop()


async def until(cond, what: str, timeout: float = 30.0) -> None:
    """A bounded wait (a failure names what never happened), not a timing assertion."""
    with trio.move_on_after(timeout):
        while not cond():
            await trio.sleep(0.05)
        return
    pytest.fail(f"gave up waiting for {what}")


def test_pages_served_and_gone_from_guest_memory_are_admitted_whole_chunks_and_nothing_else(env, tmp_path, child_of):
    images, backing, store = env
    data = os.urandom(4 * MiB)  # 64 chunks
    (images / "vm1.img").write_bytes(data)
    # The "guest" holds the first 2 MiB it will be served (chunks 0..31) and random pages: the rest it has evicted.
    ram = bytearray(os.urandom(RAM_PAGES * PAGE_SIZE))
    ram[: 2 * MiB] = data[: 2 * MiB]
    child = child_of(bytes(ram))
    mountpoint = str(tmp_path / "mnt")
    offloop, files = parts(backing, store)
    policy = SecondChance(mountpoint, files, offloop, staging_bytes=8 * MiB, scanner=GuestMemoryScanner(cpu_fraction=1.0))
    cache = make_cache(offloop, files, policy)
    image = mountpoint + "/vm1.img"

    def held() -> set[int]:
        ino = os.stat(images / "vm1.img").st_ino
        return {c for c in range(64) if store.location(ino, files.get(ino).gen, c) is not None}

    async def go():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, cache)
            policy.on_guests({"vm1": GuestState("vm1", [image], 16 * MiB, None, {}, ram=child.ram())})
            assert policy.stats().guests["vm1"].mode == "scan"
            await trio.sleep(0.1)  # the policy resolves the image to its inode
            f = open_file(backing, "vm1.img")
            assert await cache.read(f, 0, 4 * MiB) == data
            await until(lambda: held() == set(range(32, 64)), "the evicted half to be admitted")
            # The estimate is not used for a scanned guest: a shrink admits nothing by itself.
            policy.on_shrink(Shrink("vm1", [image], 1 * MiB, 1 * MiB))
            # Page 3 of chunk 5 leaves the guest's memory: its whole chunk is admitted (and only it).
            child.drop(5 * 16 + 3)
            await until(lambda: 5 in held(), "the chunk of a dropped page to be admitted")
            await settle(cache)
            assert held() == {5, *range(32, 64)}
            hits = cache.images["vm1.img"].hit_bytes
            assert await cache.read(f, 32 * CS, 32 * CS) == data[32 * CS :]
            assert cache.images["vm1.img"].hit_bytes - hits == 32 * CS
            nursery.cancel_scope.cancel()

    trio.run(go)
    g = policy.stats().guests["vm1"]
    assert g.mode == "scan" and g.scans >= 2 and g.shrinks == 1
    assert g.evicted_pages == 32 * 16 + 1
    assert g.admitted_chunks == 33 and g.from_staging == 33
    assert g.resident_pages >= 31 * 16  # what the guest still holds: no host copy needed


def test_a_guest_whose_memory_cannot_be_read_falls_back_to_the_estimate(env, tmp_path, child_of, expect_log):
    expect_log("cannot scan its memory any more")
    images, backing, store = env
    data = os.urandom(2 * MiB)
    (images / "vm1.img").write_bytes(data)
    child = child_of(os.urandom(RAM_PAGES * PAGE_SIZE))
    mountpoint = str(tmp_path / "mnt")
    offloop, files = parts(backing, store)
    policy = SecondChance(mountpoint, files, offloop, staging_bytes=8 * MiB, scanner=GuestMemoryScanner(cpu_fraction=1.0))
    cache = make_cache(offloop, files, policy)
    image = mountpoint + "/vm1.img"
    no_perm = Unscannable(Reason.NO_PERMISSION, "process 1")

    async def go():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, cache)
            policy.on_guests({
                "vm1": GuestState("vm1", [image], 16 * MiB, None, {}, ram=no_perm),
                "vm2": GuestState("vm2", [], 16 * MiB, None, {}, ram=child.ram()),
            })  # fmt: skip
            assert policy.stats().guests["vm1"].mode == "estimate"
            assert policy.stats().guests["vm1"].scan_off == str(no_perm)
            await trio.sleep(0.1)
            f = open_file(backing, "vm1.img")
            assert await cache.read(f, 0, 2 * MiB) == data
            policy.on_shrink(Shrink("vm1", [image], MiB, MiB))
            await until(lambda: policy.stats().guests["vm1"].admitted_chunks == 16, "the estimate's admissions")
            # vm2's QEMU exits: its scans stop, and it is said to be estimated from then on.
            child.stop()
            await until(lambda: policy.stats().guests["vm2"].mode == "estimate", "vm2 to fall back")
            nursery.cancel_scope.cancel()

    trio.run(go)
    assert policy.stats().guests["vm2"].scan_off.startswith(Reason.PROCESS_GONE.value)


def test_chunks_a_guest_still_holds_are_evicted_first(tmp_path):
    store = Store(str(tmp_path / "cache"), 16 * CS)  # room for 16 chunks of random pages
    try:
        chunk = {c: os.urandom(CS) for c in range(32)}
        store.apply(WriteBatch(files=[(9, 1, (1, 2, 3, 4))], admit=[(9, 1, c, chunk[c]) for c in range(16)]))
        store.evict_first([(9, 1, 7), (9, 1, 99)])  # 99 is not held: skipped
        store.apply(WriteBatch(admit=[(9, 1, 16, chunk[16])]))
        held = {c for c in range(17) if store.location(9, 1, c) is not None}
        assert 7 not in held and len(held) == 16
        assert store.stats().evicted_resident == 1
    finally:
        store.close()


def test_chunk_keys_of_page_locations():
    import numpy as np

    locs = Locations(np.array([1, 1, 1, 2], dtype=np.uint64), np.array([3, 3, 3, 3], dtype=np.uint64),
                     np.array([0, 15, 16, 17], dtype=np.uint64))  # fmt: skip
    assert chunk_keys(locs) == [(1, 3, 0), (1, 3, 1), (2, 3, 1)]
    whole = Locations(np.full(17, 1, dtype=np.uint64), np.full(17, 3, dtype=np.uint64), np.arange(17, dtype=np.uint64))
    assert chunk_keys(whole, whole=True) == [(1, 3, 0)]  # chunk 1 has one page of 16 in the set
