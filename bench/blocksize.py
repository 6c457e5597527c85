"""Block size on real images: dedup ratio and store hit throughput at 4, 16 and 64 KiB.

Owns the numbers behind the store's two sizes (pages deduplicated at 4 KiB,
served as 64 KiB chunks), measured on the independently built Debian root
filesystems of `bench/images.py` (built on first use, then cached).

1. Dedup of aligned fixed blocks of 4, 16 and 64 KiB by xxh3-128, zero blocks
   left out as holes: non-zero data per image (counted in 4 KiB pages, the
   same yardstick for every block size), bytes stored for each image alone and
   for all of them together, and the ratio of the two.
2. The same through a real `Store` (4 KiB pages, 64 KiB chunks): every chunk
   of every image admitted into a cache big enough for all of them, then
   `stats()`; it must agree with the 4 KiB row of (1).
3. Hit cost: one `Store` per chunk size (4, 16, 64 KiB) holding every chunk of
   every image; timed `read_chunk` calls over a random sample of the chunks
   that hold data, and over all of them in order. Reported as MB/s, µs per
   chunk (what one guest request smaller than a chunk costs) and µs per 4 KiB
   delivered (what large requests cost). This runs inline on the FUSE loop.
   Each figure is the median of `--runs` passes after one untimed warm pass.

    .venv/bin/python -m bench.blocksize [--runs 3] [--sample 20000] [--dir /var/tmp]

Prints the tables and a recommendation computed from them; writes
bench/results/blocksize.json.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import mmap
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import xxhash

from bench.common import print_table, write_results
from bench.images import ImagesUnavailable, build_images
from fusecache.store import Store, WriteBatch

KIB = 1024
MIB = 1 << 20
PAGE = 4 * KIB
SIZES = (4 * KIB, 16 * KIB, 64 * KIB)
STORE_CHUNK = 64 * KIB  # the store's default chunk size, for the two-level row
ADMIT_BATCH_BYTES = 8 * MIB  # admissions per `apply`, in image bytes
# The FUSE loop's own cost per request (pyfuse3 from memory, MEASURED.md): a hit
# path that adds less than this to a request is not what limits the mount.
FUSE_REQUEST_US = 28.0


@contextlib.contextmanager
def _open(path: Path) -> Iterator[mmap.mmap]:
    """The image, mapped read-only."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mm:
        yield mm


def nonzero_blocks(path: Path, block: int) -> dict[int, bytes]:
    """Block index -> xxh3-128 digest of every aligned `block`-byte block of the image that is not all zeros."""
    zero = xxhash.xxh3_128_digest(bytes(block))
    out = {}
    with _open(path) as mm:
        view = memoryview(mm)
        try:
            for i in range(len(mm) // block):
                d = xxhash.xxh3_128_digest(view[i * block : (i + 1) * block])
                if d != zero:
                    out[i] = d
        finally:
            view.release()
    return out


def dedup_table(images: list[Path]) -> dict[str, Any]:
    """Non-zero data and bytes stored after fixed-block dedup, per block size, per image and all together."""
    pages = [nonzero_blocks(p, PAGE) for p in images]
    nonzero = [len(p) * PAGE for p in pages]
    result: dict[str, Any] = {"images": [p.stem for p in images], "nonzero_bytes": nonzero, "sizes": {}}
    for size in SIZES:
        digests = pages if size == PAGE else [nonzero_blocks(p, size) for p in images]
        alone = [len(set(d.values())) * size for d in digests]
        together = len(set().union(*(d.values() for d in digests))) * size
        pairs = {
            f"{images[a].stem}+{images[b].stem}": (len(set(digests[a].values()) | set(digests[b].values())) * size, nonzero[a] + nonzero[b])
            for a, b in itertools.combinations(range(len(images)), 2)
        }
        result["sizes"][str(size)] = {
            "stored_pairs": {k: stored for k, (stored, _) in pairs.items()},
            "ratio_pairs": {k: data / stored for k, (stored, data) in pairs.items()},
            "stored_alone": alone,
            "stored_together": together,
            "ratio_alone": [n / s for n, s in zip(nonzero, alone, strict=True)],
            "ratio_together": sum(nonzero) / together,
            "cross_image_gain": sum(alone) / together,
        }
    return result


def admit_images(store: Store, images: list[Path]) -> float:
    """Admit every chunk of every image (inode i+1, generation 1); returns the seconds it took."""
    size = store.chunk_size
    per_batch = max(1, ADMIT_BATCH_BYTES // size)
    start = time.perf_counter()
    for ino, path in enumerate(images, 1):
        with _open(path) as mm:
            nchunks = (len(mm) + size - 1) // size
            for first in range(0, nchunks, per_batch):
                batch = [(ino, 1, c, mm[c * size : (c + 1) * size]) for c in range(first, min(nchunks, first + per_batch))]
                store.apply(WriteBatch(admit=batch))
    return time.perf_counter() - start


def _store_stats(images: list[Path], base: str, capacity: int) -> dict[str, int | float]:
    with tempfile.TemporaryDirectory(dir=base, prefix="fc-blocksize-") as d:
        store = Store(d, capacity, chunk_size=STORE_CHUNK)
        try:
            admit_images(store, images)
            st = store.stats()
        finally:
            store.close()
    return {k: getattr(st, k) for k in ("logical_bytes", "bytes_stored", "dedup_ratio", "chunks", "skipped_chunks", "evicted_chunks")}


def store_dedup(images: list[Path], base: str, capacity: int) -> dict[str, Any]:
    """The real store's stats after admitting each image alone, and all of them together."""
    return {"alone": [_store_stats([p], base, capacity) for p in images], "together": _store_stats(images, base, capacity)}


def _time_reads(store: Store, keys: list[tuple[int, int]], runs: int) -> float:
    """Median seconds for one pass of read_chunk over keys (after an untimed warm pass); every read must hit."""
    samples = []
    for run in range(runs + 1):
        t = time.perf_counter()
        for ino, chunk in keys:
            if store.read_chunk(ino, 1, chunk) is None:
                raise RuntimeError(f"chunk {chunk} of inode {ino} missed: the store did not hold every image")
        if run:
            samples.append(time.perf_counter() - t)
    return statistics.median(samples)


def hit_throughput(images: list[Path], base: str, capacity: int, sample: int, runs: int) -> dict[str, Any]:
    """read_chunk cost per chunk size, over a random sample of data-holding chunks and over all of them in order."""
    data_pages = [sorted(nonzero_blocks(p, PAGE)) for p in images]
    out: dict[str, Any] = {}
    rng = random.Random(1)
    for size in SIZES:
        per = size // PAGE
        held = [(ino, c) for ino, pages in enumerate(data_pages, 1) for c in sorted({i // per for i in pages})]
        random_keys = rng.sample(held, min(sample, len(held)))
        with tempfile.TemporaryDirectory(dir=base, prefix="fc-blocksize-") as d:
            store = Store(d, capacity, chunk_size=size)
            try:
                admit_s = admit_images(store, images)
                rand_s = _time_reads(store, random_keys, runs)
                seq_s = _time_reads(store, held, runs)
            finally:
                store.close()
        total = sum(map(os.path.getsize, images))
        row: dict[str, Any] = {"data_chunks": len(held), "admit_s": admit_s, "admit_mb_s": total / admit_s / 1e6}
        for name, n, secs in (("random", len(random_keys), rand_s), ("sequential", len(held), seq_s)):
            us = secs / n * 1e6
            row[name] = {"chunks": n, "us_per_chunk": us, "us_per_4k": us / per, "mb_s": size / us}
        out[str(size)] = row
    return out


def recommend(dedup: dict[str, Any], hits: dict[str, Any]) -> str:
    """A page size from the dedup numbers and a chunk size from the hit costs."""
    stored = {int(s): v["stored_together"] for s, v in dedup["sizes"].items()}
    best = min(stored.values())
    # The largest block that stores within 5% of the best (larger blocks: fewer index entries).
    page = max(s for s, v in stored.items() if v <= 1.05 * best)
    # The chunk size with the cheapest sequential 4 KiB, among those whose random hit (one whole chunk)
    # costs no more than the FUSE request it serves.
    fits = {int(s): v for s, v in hits.items() if v["random"]["us_per_chunk"] <= FUSE_REQUEST_US} or {int(s): v for s, v in hits.items()}
    chunk = min(fits, key=lambda s: fits[s]["sequential"]["us_per_4k"])
    small = hits[str(min(SIZES))]
    return (
        f"recommendation: dedup pages of {page // KIB} KiB "
        f"({dedup['sizes'][str(page)]['ratio_together']:.2f}x on all images together; "
        + ", ".join(f"{s // KIB} KiB {v['ratio_together']:.2f}x" for s, v in ((int(k), v) for k, v in dedup["sizes"].items()) if s != page)
        + f"), served as chunks of {chunk // KIB} KiB (a random hit {fits[chunk]['random']['us_per_chunk']:.1f} µs "
        f"<= the {FUSE_REQUEST_US:.0f} µs FUSE request; sequential {fits[chunk]['sequential']['us_per_4k']:.2f} µs per 4 KiB "
        f"vs {small['sequential']['us_per_4k']:.2f} µs with {min(SIZES) // KIB} KiB chunks)"
    )


def _mib(n: float) -> str:
    return f"{n / MIB:.0f} MiB"


def print_tables(dedup: dict[str, Any], store: dict[str, Any], hits: dict[str, Any]) -> None:
    names = dedup["images"]
    nonzero = dedup["nonzero_bytes"]
    per_image = ", ".join(f"{n} {_mib(b)}" for n, b in zip(names, nonzero, strict=True))
    print(f"non-zero data (4 KiB pages): {per_image}, total {_mib(sum(nonzero))}")
    pair_names = list(dedup["sizes"][str(PAGE)]["stored_pairs"])
    rows = []
    for size, v in dedup["sizes"].items():
        rows.append([
            f"{int(size) // KIB} KiB blocks",
            *(f"{_mib(s)} ({r:.2f}x)" for s, r in zip(v["stored_alone"], v["ratio_alone"], strict=True)),
            *(f"{_mib(v['stored_pairs'][k])} ({v['ratio_pairs'][k]:.2f}x)" for k in pair_names),
            _mib(v["stored_together"]),
            f"{v['ratio_together']:.2f}x",
            f"{v['cross_image_gain']:.2f}x",
        ])
    together = store["together"]
    rows.append([
        "Store: 4 KiB pages, 64 KiB chunks",
        *(f"{_mib(a['bytes_stored'])} ({a['dedup_ratio']:.2f}x)" for a in store["alone"]),
        *("-" for _ in pair_names),
        _mib(together["bytes_stored"]),
        f"{together['dedup_ratio']:.2f}x",
        f"{sum(a['bytes_stored'] for a in store['alone']) / together['bytes_stored']:.2f}x",
    ])
    print_table(
        "Dedup: bytes stored (zero blocks are holes); ratio = non-zero data / stored",
        ["", *(f"{n} alone" for n in names), *pair_names, "all together", "ratio, all", "sum alone / together"],
        rows,
    )
    rows = []
    for size, v in hits.items():
        r, s = v["random"], v["sequential"]
        rows.append([
            f"{int(size) // KIB} KiB chunks",
            f"{r['us_per_chunk']:.1f}",
            f"{r['us_per_4k']:.2f}",
            f"{r['mb_s']:.0f}",
            f"{s['us_per_chunk']:.1f}",
            f"{s['us_per_4k']:.2f}",
            f"{s['mb_s']:.0f}",
            f"{v['data_chunks']}",
            f"{v['admit_mb_s']:.0f}",
        ])
    print_table(
        "Hits: Store.read_chunk (LMDB lookup + copy out of the slab + xxh3 verify of each page), inline",
        ["", "random µs/chunk", "random µs/4KiB", "random MB/s", "seq µs/chunk", "seq µs/4KiB", "seq MB/s", "data chunks", "admit MB/s"],
        rows,
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="timed passes per figure (median)")
    ap.add_argument("--sample", type=int, default=20000, help="chunks in the random sample")
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="where the temporary caches go")
    args = ap.parse_args()
    try:
        images = build_images()
    except ImagesUnavailable as e:
        print(f"blocksize: {e}", file=sys.stderr)
        return 1
    # Every non-zero page of every image fits with room to spare: nothing is evicted.
    capacity = sum(os.path.getsize(p) for p in images)
    dedup = dedup_table(images)
    store = store_dedup(images, args.dir, capacity)
    hits = hit_throughput(images, args.dir, capacity, args.sample, args.runs)
    print_tables(dedup, store, hits)
    line = recommend(dedup, hits)
    print(line)
    path = write_results("blocksize", {"dedup": dedup, "store": store, "hits": hits, "recommendation": line, "runs": args.runs})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
