"""Content identity in the store: chosen xxh3 collisions stay apart, and the keys file (0600) decides what a cache's names mean."""

from __future__ import annotations

import os
import stat

import pytest
import xxhash

from fusecache.identity import ContentKeys, cluster_names_key
from fusecache.store import PAGE_SIZE, Store, WriteBatch
from tests.test_collisions import colliding_pages

MiB = 1 << 20


def test_a_chosen_xxh3_collision_is_two_pages_and_each_chunk_reads_back_its_own(tmp_path):
    ours, theirs = colliding_pages(os.urandom(PAGE_SIZE))
    rest = os.urandom(15 * PAGE_SIZE)
    assert ours != theirs and xxhash.xxh3_128_digest(ours + rest) == xxhash.xxh3_128_digest(theirs + rest)
    store = Store(str(tmp_path / "cache"), 8 * MiB)
    try:
        store.apply(WriteBatch(admit=[(1, 1, 0, ours + rest), (2, 1, 0, theirs + rest), (3, 1, 0, ours), (4, 1, 0, theirs)]))
        assert store.read_chunk(1, 1, 0) == ours + rest and store.read_chunk(2, 1, 0) == theirs + rest
        assert store.read_chunk(3, 1, 0) == ours and store.read_chunk(4, 1, 0) == theirs
        assert store.read_chunk(2, 1, 0, 0, 4096) == theirs  # the page check path too
        assert store.stats().pages_used == 2 + 15 and store.stats().verify_failures == 0
        assert store.check() == []
    finally:
        store.close()


def test_the_keys_file_is_0600_and_kept_across_opens(tmp_path):
    cache = tmp_path / "cache"
    store = Store(str(cache), 4 * MiB)
    keys = store.keys
    store.apply(WriteBatch(admit=[(1, 1, 0, os.urandom(PAGE_SIZE))]))
    store.close()
    assert stat.S_IMODE(os.stat(cache / "keys").st_mode) == 0o600
    store = Store(str(cache), 4 * MiB)
    try:
        assert store.keys == keys and store.stats().chunks == 1
    finally:
        store.close()


def test_each_cache_draws_its_own_keys_unless_given_a_cluster_names_key(tmp_path):
    a, b = Store(str(tmp_path / "a"), 4 * MiB), Store(str(tmp_path / "b"), 4 * MiB)
    names = cluster_names_key(b"k" * 32)
    c, d = Store(str(tmp_path / "c"), 4 * MiB, names_key=names), Store(str(tmp_path / "d"), 4 * MiB, names_key=names)
    try:
        assert a.keys.names_key != b.keys.names_key and a.keys.seed != b.keys.seed
        assert c.keys.names_key == d.keys.names_key == names and c.keys.seed != d.keys.seed  # seeds stay each cache's own
    finally:
        for s in (a, b, c, d):
            s.close()


@pytest.mark.parametrize("change", ["another cluster key", "keys file lost", "keys file damaged"])
def test_a_cache_named_under_other_keys_starts_empty(tmp_path, change, expect_log):
    expect_log("named with other content keys")
    cache = tmp_path / "cache"
    store = Store(str(cache), 4 * MiB, names_key=cluster_names_key(b"k" * 32))
    store.apply(WriteBatch(admit=[(1, 1, 0, os.urandom(PAGE_SIZE))]))
    store.close()
    names = cluster_names_key(b"k" * 32)
    if change == "another cluster key":
        names = cluster_names_key(b"o" * 32)
    elif change == "keys file lost":
        os.unlink(cache / "keys")
    else:
        (cache / "keys").write_bytes(b"not keys")
    store = Store(str(cache), 4 * MiB, names_key=names)
    try:
        assert store.stats().chunks == 0 and store.stats().pages_used == 0
        assert store.keys.names_key == names
    finally:
        store.close()


def test_keys_round_trip_and_refuse_other_bytes():
    keys = ContentKeys.new()
    assert ContentKeys.from_bytes(keys.to_bytes()) == keys
    assert ContentKeys.from_bytes(b"") is None and ContentKeys.from_bytes(keys.to_bytes()[:-1]) is None
    assert keys.is_zero(bytes(PAGE_SIZE)) and not keys.is_zero(b"\0" * (PAGE_SIZE - 1) + b"\1")
