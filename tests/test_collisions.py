"""Chosen collisions: two different pages that plain xxh3-128 names alike must stay two pages.

XXH3's public default secret lets anyone build such a pair in microseconds: in
a stripe of the first block, each 8-byte word w adds w to one accumulator and
lo32(w ^ s) * hi32(w ^ s) to another (s: the secret's word there). Pick two
words of one lane whose XOR with their secret words has zero low 32 bits: both
products are zero whatever the high halves, so moving 2^32 from one word to the
other changes the page and not one accumulator. A tenant who gets one such page
into its image and the other into a victim's must not make the cache serve its
bytes to the victim.
"""

from __future__ import annotations

import hashlib
import os
import struct

import pytest
import xxhash

from fusecache.store import CHUNK_SIZE, PAGE_SIZE
from tests.harness.waiting import wait_for
from tests.mounting import run_fusecache, stats

pytestmark = pytest.mark.mount

# The first 16 bytes of XXH3's default secret (xxhash.h, XXH3_kSecret): the secret words of lane 0 in stripes 0 and 1.
XXH3_SECRET_HEAD = bytes.fromhex("b8fe6c3923a44bbe7c01812cf721ad1c")
STRIPE = 64


def colliding_pages(filler: bytes) -> tuple[bytes, bytes]:
    """Two 4 KiB pages, equal to `filler` but in two words, that plain xxh3-128 cannot tell apart."""
    w0, w1 = struct.unpack("<QQ", XXH3_SECRET_HEAD)
    a = (int.from_bytes(filler[0:8], "little") & ~0xFFFFFFFF) | (w0 & 0xFFFFFFFF)  # lane 0 of stripe 0
    b = (int.from_bytes(filler[STRIPE : STRIPE + 8], "little") & ~0xFFFFFFFF) | (w1 & 0xFFFFFFFF)  # lane 0 of stripe 1
    one, two = bytearray(filler), bytearray(filler)
    struct.pack_into("<Q", one, 0, a)
    struct.pack_into("<Q", one, STRIPE, b)
    struct.pack_into("<Q", two, 0, (a + (1 << 32)) % (1 << 64))
    struct.pack_into("<Q", two, STRIPE, (b - (1 << 32)) % (1 << 64))
    return bytes(one), bytes(two)


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_a_chosen_xxh3_collision_is_stored_twice_and_each_image_reads_its_own_bytes(mounter, tmp_path):
    ours, theirs = colliding_pages(hashlib.shake_256(b"filler").digest(PAGE_SIZE))
    rest = hashlib.shake_256(b"the same rest").digest(CHUNK_SIZE - PAGE_SIZE)  # the rest of the chunk: shared, deduped
    # The pair collides under plain xxh3-128, as a page and inside a whole chunk: else this test proves nothing.
    assert ours != theirs
    assert xxhash.xxh3_128_digest(ours) == xxhash.xxh3_128_digest(theirs)
    assert xxhash.xxh3_128_digest(ours + rest) == xxhash.xxh3_128_digest(theirs + rest)

    backing = tmp_path / "images"
    backing.mkdir()
    (backing / "tenant.img").write_bytes(ours + rest)
    (backing / "victim.img").write_bytes(theirs + rest)
    cache = str(tmp_path / "cache")
    for attempt in ("fresh", "after a remount"):
        m = mounter.mount(str(backing), "--admit", "inclusive", "--cache-dir", cache, "--cache-size", "64M")
        tenant, victim = os.path.join(m.mountpoint, "tenant.img"), os.path.join(m.mountpoint, "victim.img")
        for _ in range(2):  # the first read admits, the second is served from the store
            assert read(tenant) == ours + rest, attempt
            assert read(victim) == theirs + rest, attempt
            wait_for(lambda: stats(m.mountpoint).queue == 0, "the store's writer to commit")  # noqa: B023 - called at once
        s = stats(m.mountpoint)
        assert s.store is not None
        assert s.store.hits >= 2, attempt  # the second reads were hits, not the backing again
        assert s.store.verify_failures == 0, attempt
        # Two pages for the pair, fifteen shared for the rest.
        assert s.store.pages_used == 2 + (CHUNK_SIZE - PAGE_SIZE) // PAGE_SIZE, attempt
        mounter.unmount(m)
        check = run_fusecache("check", cache)
        assert check.returncode == 0, check.stdout + check.stderr
