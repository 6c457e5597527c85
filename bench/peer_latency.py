"""Peer hits over loopback, and the cost of Bloom summaries as a cache grows.

Runs a `PeerServer` over an in-memory store in a child process (so client and
server do not share one trio loop) and measures, from a `PeerSet` in this
process, the latency of verified 4 KiB page and 64 KiB chunk fetches, one at a
time (p50/p99) and with 16 in flight (hits/s). Then builds Bloom summaries
of 1e4..1e6 digests (1e7 extrapolated) and measures bytes, build cost per
key and lookup cost. Prints a table; writes bench/results/peer_latency.json.

    .venv/bin/python -m bench.peer_latency [--fetches 3000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time

import trio

from fusecache.peers import BloomFilter, PeerServer, PeerSet, names_key, page_digest
from fusecache.peers.summary import bytes_per_gib

VERSION = (1 << 30, 1, 2, 3)
PAGES = 2048
CHUNKS = 256


def make_store(seed: int, key: bytes) -> tuple[dict[bytes, bytes], dict[int, tuple[bytes, list[bytes]]]]:
    """Pages and chunks named as the hosts of cluster key `key` name them."""
    names = names_key(key)
    rng = random.Random(seed)
    pages = {}
    for _ in range(PAGES):
        page = rng.randbytes(4096)
        pages[page_digest(names, page)] = page
    chunks = {}
    for n in range(CHUNKS):
        data = rng.randbytes(65536)
        chunks[n] = data
    return pages, chunks


class MemoryStore:
    def __init__(self, key: bytes) -> None:
        self.pages, self.chunks = make_store(1, key)

    def read_page(self, digest: bytes) -> bytes | None:
        return self.pages.get(digest)

    def read_location(self, ino: int, version: tuple[int, int, int, int], chunk: int) -> bytes | None:
        return self.chunks.get(chunk) if (ino, version) == (7, VERSION) else None

    def iter_digests(self) -> list[bytes]:
        return list(self.pages)

    def iter_locations(self) -> list[tuple[int, tuple[int, int, int, int], int]]:
        return [(7, VERSION, n) for n in self.chunks]


def serve(key: bytes) -> None:
    async def main() -> None:
        server = PeerServer("127.0.0.1:0", key, MemoryStore(key), capacity_pages=PAGES, allow=["127.0.0.1"])
        async with trio.open_nursery() as nursery:
            port = await nursery.start(server.run)
            print(port, flush=True)

    trio.run(main)


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure_fetches(port: int, key: bytes, fetches: int) -> dict[str, dict[str, float]]:
    digests = list(make_store(1, key)[0])
    results = {}
    async with trio.open_nursery() as nursery:
        peers = PeerSet([f"127.0.0.1:{port}"], key)
        await nursery.start(peers.run)
        while not peers.stats()[f"127.0.0.1:{port}"].summary_locations:
            await trio.sleep(0.01)

        async def page(i: int) -> bytes | None:
            return await peers.fetch_page(digests[i % len(digests)], trio.current_time() + 1)

        async def chunk(i: int) -> bytes | None:
            return await peers.fetch_location(7, VERSION, i % CHUNKS, trio.current_time() + 1)

        for name, fetch in (("page 4 KiB", page), ("chunk 64 KiB", chunk)):
            for i in range(200):  # warm up
                await fetch(i)
            samples = []
            for i in range(fetches):
                started = time.perf_counter()
                assert await fetch(i) is not None
                samples.append(time.perf_counter() - started)
            done = 0

            async def worker(w: int, until: float, fetch=fetch) -> None:
                nonlocal done
                i = w
                while time.perf_counter() < until:
                    assert await fetch(i) is not None
                    done += 1
                    i += 16

            started = time.perf_counter()
            async with trio.open_nursery() as workers:
                for w in range(16):
                    workers.start_soon(worker, w, started + 2.0)
            rate = done / (time.perf_counter() - started)
            results[name] = {
                "p50_us": percentile(samples, 0.5) * 1e6,
                "p99_us": percentile(samples, 0.99) * 1e6,
                "mean_us": statistics.fmean(samples) * 1e6,
                "hits_per_s_16_in_flight": rate,
            }
        nursery.cancel_scope.cancel()
    return results


def measure_summaries() -> list[dict[str, float | bool]]:
    rows = []
    for n in (10_000, 100_000, 1_000_000):
        bloom = BloomFilter.for_capacity(n)
        keys = [os.urandom(16) for _ in range(n)]
        started = time.perf_counter()
        for k in keys:
            bloom.add(k)
        build = (time.perf_counter() - started) / n
        probes = keys[:20_000]
        started = time.perf_counter()
        assert all(k in bloom for k in probes)
        hit = (time.perf_counter() - started) / len(probes)
        misses = [os.urandom(16) for _ in range(20_000)]
        started = time.perf_counter()
        false_positives = sum(k in bloom for k in misses)
        miss = (time.perf_counter() - started) / len(misses)
        rows.append({"keys": n, "bytes": len(bloom.bits), "build_us_per_key": build * 1e6, "build_s": build * n,
                     "lookup_hit_us": hit * 1e6, "lookup_miss_us": miss * 1e6,
                     "false_positive_rate": false_positives / len(misses), "extrapolated": False})
    last = rows[-1]
    n = 10_000_000
    rows.append({**last, "keys": n, "bytes": len(BloomFilter.for_capacity(n).bits), "build_s": last["build_us_per_key"] * n / 1e6,
                 "extrapolated": True})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fetches", type=int, default=3000)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(sys.stdin.buffer.read(32))
        return

    key = os.urandom(32)
    child = subprocess.Popen([sys.executable, __file__, "--serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        child.stdin.write(key)
        child.stdin.close()
        port = int(child.stdout.readline())
        fetches = trio.run(measure_fetches, port, key, args.fetches)
    finally:
        child.terminate()
        child.wait()
    summaries = measure_summaries()
    digest_bytes, location_bytes = bytes_per_gib()

    print("peer hit over loopback (server in another process; verified, MAC'd)")
    print(f"{'fetch':<14}{'p50 µs':>9}{'p99 µs':>9}{'mean µs':>9}{'hits/s, 16 in flight':>22}")
    for name, r in fetches.items():
        print(f"{name:<14}{r['p50_us']:>9.0f}{r['p99_us']:>9.0f}{r['mean_us']:>9.0f}{r['hits_per_s_16_in_flight']:>22.0f}")
    print()
    print("Bloom summary at 1% false positives (build and lookup in pure Python)")
    print(f"{'keys':>12}{'bytes':>13}{'build s':>9}{'µs/key':>8}{'hit µs':>8}{'miss µs':>8}{'fp %':>7}")
    for r in summaries:
        mark = " (extrapolated)" if r["extrapolated"] else ""
        print(f"{r['keys']:>12,}{r['bytes']:>13,}{r['build_s']:>9.2f}{r['build_us_per_key']:>8.2f}{r['lookup_hit_us']:>8.2f}"
              f"{r['lookup_miss_us']:>8.2f}{100 * r['false_positive_rate']:>7.2f}{mark}")
    print()
    print(f"summary bytes per GiB of cache: {digest_bytes:,} (pages) + {location_bytes:,} (locations, one per 64 KiB chunk)")

    os.makedirs(os.path.join(os.path.dirname(__file__), "results"), exist_ok=True)
    out = os.path.join(os.path.dirname(__file__), "results", "peer_latency.json")
    with open(out, "w") as f:
        json.dump({"host": platform.node(), "python": platform.python_version(), "fetches": fetches, "summaries": summaries,
                   "summary_bytes_per_gib": {"pages": digest_bytes, "locations": location_bytes}}, f, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
