"""Dedup on real VM images: two independently built Debian root filesystems through the real Store.

The images come from `bench/images.py` (debootstrap + mkfs.ext4, cached under
`~/.cache/fusecache/images/`): the first run builds them (about 1.5 minutes, needs
Debian's package mirror), later runs reuse them. Without the mirror the test
is skipped with the builder's one-line reason.

Files land at different offsets in independently built images, so only the
4 KiB pages the store deduplicates line up between them; the store must find
that sharing, account for it exactly, and give every byte back.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from pathlib import Path

import pytest
import xxhash

from bench.images import ImagesUnavailable, build_images
from fusecache.store import PAGE_SIZE, Store, WriteBatch

CHUNK = 65536
ZERO_DIGEST = xxhash.xxh3_128_digest(bytes(PAGE_SIZE))  # the oracle's own naming: plain xxh3-128, not the store's
BATCH = 128  # chunks per apply


@pytest.fixture(scope="module")
def two_images() -> list[Path]:
    try:
        return build_images(["minbase", "server"])
    except ImagesUnavailable as e:
        pytest.skip(str(e))


def _chunks(path: Path) -> Iterator[tuple[int, bytes]]:
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mm:
        for c in range((len(mm) + CHUNK - 1) // CHUNK):
            yield c, mm[c * CHUNK : (c + 1) * CHUNK]


def _pages(path: Path) -> list[bytes]:
    """The xxh3-128 digest of every non-zero 4 KiB page of the image."""
    out = []
    for _, data in _chunks(path):
        view = memoryview(data)
        for i in range(0, len(data), PAGE_SIZE):
            d = xxhash.xxh3_128_digest(view[i : i + PAGE_SIZE])
            if d != ZERO_DIGEST:
                out.append(d)
    return out


def test_two_independent_images_dedup_at_4k_pages_and_read_back_exactly(two_images, tmp_path):
    capacity = sum(p.stat().st_size for p in two_images)  # room for everything: nothing may be evicted
    store = Store(str(tmp_path / "cache"), capacity, chunk_size=CHUNK)
    try:
        for ino, path in enumerate(two_images, 1):
            batch = []
            for c, data in _chunks(path):
                batch.append((ino, 1, c, data))
                if len(batch) == BATCH:
                    store.apply(WriteBatch(admit=batch))
                    batch = []
            store.apply(WriteBatch(admit=batch))

        st = store.stats()
        assert st.skipped_chunks == 0 and st.evicted_chunks == 0
        # The store's accounting is exactly fixed 4 KiB page dedup with zero pages as holes.
        pages = [_pages(p) for p in two_images]
        assert st.logical_bytes == sum(map(len, pages)) * PAGE_SIZE
        assert st.bytes_stored == len(set().union(*pages)) * PAGE_SIZE
        assert st.dedup_ratio > 1.2, f"dedup of two independently built images only {st.dedup_ratio:.2f}x"

        for ino, path in enumerate(two_images, 1):
            for c, data in _chunks(path):
                got = store.read_chunk(ino, 1, c)
                assert got is not None, f"chunk {c} of {path.name} is not held"
                assert got == data, f"chunk {c} of {path.name} reads back different bytes"
        assert store.stats().verify_failures == 0
    finally:
        store.close()
