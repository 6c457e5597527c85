"""The research experiment: guests re-reading what their balloon made them evict, with no cache, inclusive and second-chance.

Owns the end-to-end measurement behind second-chance admission. N emulated
guests (`tests/harness/simguest.py`: a page-cache LRU over a disk image read with
O_DIRECT through a real fusecache mount, a balloon, a QMP socket the real
balloon monitor talks to) each read their own image (incompressible random
data, larger than the guest's memory) with Zipf-distributed popularity.

Per mode, on a fresh mount and cache directory:

1. phase 1: every guest runs the workload (cold: everything comes from the
   backing); 2.5 s of settling, so the monitor's polls see the full page caches;
2. every balloon inflates to a third of the guest's memory: the guests evict
   page cache (the emulated guest reports exactly which blocks); second-chance
   admits what the monitor says they evicted, and the benchmark waits until
   that has settled (every guest shrank, admissions stopped, queue empty); the
   other modes wait the same time;
3. the balloons deflate and phase 2 runs the very same workload again.

Modes: `--no-cache` (passthrough), `--admit inclusive`, and second-chance (the
default, one `--balloon qmp:SOCK` per guest), the two cached modes at the same
`--cache-size`. A fourth row, on the small cache: second-chance with a lying
guest beside the others. It reads its whole image (as large as the others')
in phase 1; after the honest guests' admissions have settled it reports that
its balloon took all its memory and its page cache is gone (its balloon never
moved). Measured: how many of the honest guests' cached chunks that cost them
(per-guest shares: none while they are within their share), how much the
liar made the host read again against what it read itself (each read is
taken once: at most 1x), and the honest guests' evicted-and-re-read bytes
served from the cache, against the plain second-chance row of the same run. Two variants: a cache big enough for everything the guests
read, and a small one (a quarter of the guests' phase-1 disk reads), where
inclusive fills the cache with blocks the guests still hold.

Measured per mode: the guests' disk reads (bytes they asked of the mount) and
wall time per phase; fusecache's hit and backing bytes per phase (stats
deltas; with no cache, every guest disk read is a backing read); what the
guests evicted at inflation and then re-read; which of those re-reads the
cache could serve (exact: the cache's location index, read-only from LMDB,
taken after admission settled and before phase 2: in second-chance nothing is
admitted in phase 2, so this is exactly what phase 2 hits; in inclusive a
chunk can still be evicted before its re-read when the cache is full, so it is
an upper bound there); host memory (store bytes, plus second-chance's staging
buffer; the daemon's VmRSS and RssAnon as a second view).

    .venv/bin/python -m bench.secondchance [--quick] [--guests 3] [--reads 10000] [--staging-size MIB] [--dir /var/tmp]

Needs root and /dev/fuse. Prints a table per variant and a headline; writes
bench/results/secondchance.json (-quick, -stagingNM in the name with those options).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import itertools
import os
import shutil
import struct
import sys
import tempfile
import time
from typing import Any

import lmdb
import trio

from bench.common import (
    MIB,
    MountUnavailable,
    assert_nothing_mounted_under,
    fusecache_mount,
    fusecache_stats,
    make_random_file,
    print_table,
    warm_page_cache,
    write_results,
)
from tests.harness.simguest import BLOCK, RESERVED, EmulatedGuest

MODES = ("no-cache", "inclusive", "second-chance")
LYING = "second-chance + liar"
LIAR = "liar"
SETTLE_BEFORE_INFLATION = 2.5  # the monitor's polls must see the full page caches before the balloon moves
ADMISSION_TIMEOUT = 30.0
DEFAULT_WAIT = 6.0  # the non-second-chance modes' wait, when second-chance did not run to measure it
_LOC_KEY = struct.Struct(">QQI")  # fusecache.store's location key: (ino, generation, chunk)


# ---- the workload, without I/O: what sizes to choose -----------------------------
def simulate_phase1(capacity: int, blocks: list[int]) -> tuple[int, int]:
    """(disk reads, distinct blocks) of one guest's phase 1: its page-cache LRU of `capacity` blocks, in blocks."""
    cache: collections.OrderedDict[int, None] = collections.OrderedDict()
    misses = 0
    for b in blocks:
        if b in cache:
            cache.move_to_end(b)
            continue
        misses += 1
        cache[b] = None
        while len(cache) > capacity:
            cache.popitem(last=False)
    return misses, len(set(blocks))


def zipf_sequences(guests: list[EmulatedGuest], reads: int, skew: float) -> list[list[int]]:
    """Each guest's block sequence: the same in both phases (the workload runs again)."""
    return [g.zipf_blocks(reads, seed=1 + i, skew=skew) for i, g in enumerate(guests)]


# ---- observations of the daemon ----------------------------------------------------
def cached_chunks(cache_dir: str) -> set[tuple[int, int]]:
    """(backing ino, chunk) of every chunk in the cache's location index, read-only from its LMDB (any generation)."""
    env = lmdb.open(os.path.join(cache_dir, "meta.lmdb"), readonly=True, lock=True, max_dbs=6)
    try:
        db = env.open_db(b"loc", create=False)
        with env.begin(db=db) as txn:
            return {(ino, chunk) for ino, _, chunk in (_LOC_KEY.unpack(k) for k in txn.cursor().iternext(values=False))}
    finally:
        env.close()


def daemon_memory(pid: int | None) -> dict[str, int]:
    """VmRSS, RssAnon and RssFile of the daemon, bytes (empty if it cannot be read)."""
    out: dict[str, int] = {}
    if pid is None:
        return out
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


def _io(stats: dict[str, Any] | None) -> dict[str, int]:
    """Summed per-image counters (hit, peer, backing bytes; admitted chunks)."""
    images = (stats or {}).get("images") or {}
    keys = ("hit_bytes", "peer_bytes", "backing_bytes", "admitted_chunks", "reads")
    return {k: sum(c.get(k, 0) for c in images.values()) for k in keys}


def _memory(stats: dict[str, Any] | None) -> dict[str, int]:
    """Host memory the cache uses, as fusecache reports it, plus the daemon's RSS."""
    s = stats or {}
    store = s.get("store") or {}
    staging = (s.get("admission") or {}).get("staging_bytes", 0)
    return {
        "bytes_stored": store.get("bytes_stored", 0),
        "staging_bytes": staging,
        "cache_memory": store.get("bytes_stored", 0) + staging,
        "evicted_chunks": store.get("evicted_chunks", 0),
        **daemon_memory(s.get("pid")),
    }


def _delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after.get(k, 0) - before.get(k, 0) for k in after}


# ---- one mode ---------------------------------------------------------------------------
class GuestRun:
    """One emulated guest's side of a run: its reads per phase, timed, and what it evicted."""

    def __init__(self, guest: EmulatedGuest, blocks: list[int]) -> None:
        self.guest = guest
        self.blocks = blocks
        self.phases: list[dict[str, float]] = []
        self.evicted: list[int] = []
        self.held: set[int] = set()  # in its page cache right after inflation
        self.reread_evicted: list[int] = []  # evicted at inflation, then read from disk again in phase 2 (first time)

    def run_phase(self) -> None:
        """The workload once; disk reads (guest page-cache misses) are timed one by one."""
        g = self.guest
        disk0, disk_time = g.disk_reads, 0.0
        evicted, seen = set(self.evicted), set()
        start = time.perf_counter()
        for b in self.blocks:
            if b in g.cache:
                g.read_block(b)
                continue
            if b in evicted and b not in seen:
                self.reread_evicted.append(b)
                seen.add(b)
            t = time.perf_counter()
            g.read_block(b)
            disk_time += time.perf_counter() - t
        wall = time.perf_counter() - start
        n = (g.disk_reads - disk0) // BLOCK
        self.phases.append(
            {"seconds": wall, "disk_bytes": g.disk_reads - disk0, "disk_reads": n, "us_per_disk_read": 1e6 * disk_time / max(n, 1)}
        )


async def _phase(runs: list[GuestRun]) -> float:
    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for r in runs:
            nursery.start_soon(trio.to_thread.run_sync, r.run_phase)
    return time.perf_counter() - start


async def _stats(mp: str) -> dict[str, Any] | None:
    return await trio.to_thread.run_sync(fusecache_stats, mp)


async def _wait_monitor(mp: str, names: list[str], timeout: float = 20.0) -> None:
    """Until the balloon monitor follows every guest and knows its images."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        guests = ((await _stats(mp)) or {}).get("balloon", {}).get("guests", {})
        if all(guests.get(n, {}).get("running") and guests[n].get("images") for n in names):
            await trio.sleep(1.0)  # the policy resolves the images to inodes in the background
            return
        await trio.sleep(0.25)
    raise RuntimeError(f"the balloon monitor of {mp} did not find guests {names} in {timeout:.0f} s")


async def _wait_admission(mp: str, names: list[str]) -> tuple[float, bool]:
    """Until every guest shrank and admissions stopped (queue empty, counts unchanged over a poll): (seconds, settled)."""
    start = time.monotonic()
    last: tuple[int, ...] | None = None
    while time.monotonic() - start < ADMISSION_TIMEOUT:
        s = (await _stats(mp)) or {}
        guests = s.get("balloon", {}).get("guests", {})
        shrunk = all(guests.get(n, {}).get("shrinks", 0) >= 1 for n in names)
        counts = tuple(guests.get(n, {}).get("admitted_chunks", 0) for n in names)
        if shrunk and s.get("queue", 1) == 0 and counts == last:
            return time.monotonic() - start, True
        last = counts if shrunk else None
        await trio.sleep(0.5)
    return time.monotonic() - start, False


def _held(cached: set[tuple[int, int]], inos: list[int]) -> int:
    return sum(1 for ino, _ in cached if ino in inos)


async def _lie(mp: str, liar: EmulatedGuest, cache_dir: str, inos: list[int], names: list[str]) -> dict[str, Any]:
    """The liar claims its balloon took everything and its page cache is gone; what that cost the others and the host.

    An honest guest holding more than its share (the cache had room) may lose the excess; what it held within
    its share it must keep: `honest_lost_within_share_bytes` is the figure the shares promise to keep at 0.
    """
    before = await trio.to_thread.run_sync(cached_chunks, cache_dir)
    liar.lie(0, 0)
    seconds, settled = await _wait_admission(mp, [LIAR])
    after = await trio.to_thread.run_sync(cached_chunks, cache_dir)
    s = (await _stats(mp)) or {}
    g = s.get("balloon", {}).get("guests", {}).get(LIAR, {})
    shares = (s.get("store") or {}).get("shares") or {}
    share = shares.get(LIAR, {})
    within = 0
    for ino, name in zip(inos, names, strict=True):
        owed = shares.get(name, {}).get("share_chunks", share.get("share_chunks", 0))
        within += max(0, min(_held(before, [ino]), owed) - _held(after, [ino]))
    return {
        "admission_seconds": seconds,
        "admission_settled": settled,
        "liar_read_bytes": liar.disk_reads,
        "liar_claimed_balloon_bytes": g.get("balloon_bytes", 0),
        "liar_admitted_bytes": g.get("admitted_bytes", 0),
        "liar_reread_bytes": g.get("from_backing", 0) * BLOCK,  # what it made the host read again
        "liar_held_bytes": share.get("held_chunks", 0) * BLOCK,
        "liar_share_bytes": share.get("share_chunks", 0) * BLOCK,
        "honest_held_before_bytes": _held(before, inos) * BLOCK,
        "honest_held_after_bytes": _held(after, inos) * BLOCK,
        "honest_lost_bytes": len({c for c in before if c[0] in inos} - after) * BLOCK,
        "honest_lost_within_share_bytes": within * BLOCK,
    }


async def run_mode(mode: str, cfg: dict[str, Any], work: str, wait: float | None) -> dict[str, Any]:
    """One mode on a fresh mount and cache: the two phases around a balloon inflation; its figures."""
    tag = f"{mode}-{cfg['variant']}".replace(" + ", "-")
    mp, cache_dir = os.path.join(work, "mnt-" + tag), os.path.join(work, "cache-" + tag)
    names = [f"vm{i + 1}" for i in range(cfg["guests"])]
    guests = [EmulatedGuest(n, os.path.join(mp, f"{n}.img"), cfg["memory"], os.path.join(work, f"{n}-{tag}.qmp")) for n in names]
    runs = [GuestRun(g, blocks) for g, blocks in zip(guests, cfg["sequences"], strict=True)]
    liar = EmulatedGuest(LIAR, os.path.join(mp, f"{LIAR}.img"), cfg["memory"], os.path.join(work, f"{LIAR}-{tag}.qmp"))
    options = ["--cache-dir", cache_dir, "--cache-size", str(cfg["cache_size"]), "--reset-cache"]
    if mode == "no-cache":
        options = ["--no-cache"]
    elif mode == "inclusive":
        options += ["--admit", "inclusive"]
    else:
        if mode == LYING:
            guests.append(liar)
        options += [a for g in guests for a in ("--balloon", f"qmp:{g.qmp_path}")]
        if cfg["staging_mib"] is not None:
            options += ["--staging-size", f"{cfg['staging_mib']}M"]
    out: dict[str, Any] = {"mode": mode}
    async with trio.open_nursery() as nursery:
        for g in guests:
            await nursery.start(g.serve_qmp)
        try:
            with fusecache_mount(cfg["images"], mp, options, os.path.join(work, tag + ".log")):
                for g in guests:
                    g.open()
                try:
                    if mode in ("second-chance", LYING):
                        await _wait_monitor(mp, [g.name for g in guests])
                    s0 = await _stats(mp)
                    out["phase1_seconds"] = await _phase(runs)
                    if mode == LYING:  # it reads its whole image, then holds it (its page cache is as large as the others')
                        await trio.to_thread.run_sync(lambda: [liar.read_block(b) for b in range(liar.size // BLOCK)])
                    s1 = await _stats(mp)
                    mem1 = _memory(s1)  # the staging buffer at its fullest: every phase-1 read, up to its capacity
                    await trio.sleep(SETTLE_BEFORE_INFLATION)
                    for r in runs:
                        r.evicted = r.guest.set_balloon(cfg["memory"] // 3)
                        r.held = set(r.guest.cache)
                    if mode in ("second-chance", LYING):
                        out["admission_seconds"], out["admission_settled"] = await _wait_admission(mp, names)
                        if mode == LYING:
                            out["lying"] = await _lie(mp, liar, cache_dir, cfg["inos"], names)
                    else:
                        await trio.sleep(wait if wait is not None else DEFAULT_WAIT)
                    s2 = await _stats(mp)
                    mem2 = _memory(s2)  # now: the daemon's RSS is gone once it is unmounted
                    cached = await trio.to_thread.run_sync(cached_chunks, cache_dir) if mode != "no-cache" else set()
                    for r in runs:
                        r.guest.set_balloon(cfg["memory"])
                    out["phase2_seconds"] = await _phase(runs)
                    s3 = await _stats(mp)
                    mem3 = _memory(s3)
                finally:
                    for g in guests:
                        g.close()
        finally:
            nursery.cancel_scope.cancel()
    out.update(_figures(mode, cfg, runs, (s0, s1, s2, s3), cached))
    out["memory_end_phase1"], out["memory_after_admission"], out["memory_end"] = mem1, mem2, mem3
    out["phase2_hit_bytes_per_cache_byte"] = out["phase2"]["hit_bytes"] / mem2["cache_memory"] if mem2["cache_memory"] else 0.0
    return out


def _figures(mode: str, cfg: dict[str, Any], runs: list[GuestRun], stats: tuple[Any, ...], cached: set[tuple[int, int]]) -> dict[str, Any]:
    s0, s1, s2, s3 = stats
    inos = cfg["inos"]
    guests: dict[str, Any] = {}
    for r, ino in zip(runs, inos, strict=True):
        name = r.guest.name
        evicted = set(r.evicted)
        served = [b for b in r.reread_evicted if (ino, b) in cached]
        sc = ((s2 or {}).get("balloon", {}).get("guests", {}) or {}).get(name, {})
        in_cache = {c for i, c in cached if i == ino}
        guests[name] = {
            "phase1": r.phases[0],
            "phase2": r.phases[1],
            "evicted_bytes": len(evicted) * BLOCK,
            "evicted_reread_bytes": len(r.reread_evicted) * BLOCK,
            "evicted_reread_cached_bytes": len(served) * BLOCK,
            "evicted_cached_bytes": len(evicted & in_cache) * BLOCK,
            "cached_bytes": len(in_cache) * BLOCK,
            "cached_still_in_guest_bytes": len(r.held & in_cache) * BLOCK,  # held twice: the waste exclusivity avoids
            "cached_evicted_before_inflation_bytes": len(in_cache - evicted - r.held) * BLOCK,
            "monitor_evicted_estimate": sc.get("evicted_estimate"),
            "admitted_bytes": sc.get("admitted_bytes"),
            "admitted_from_staging": sc.get("from_staging"),
            "admitted_from_backing": sc.get("from_backing"),
        }
    disk = [sum(g[p]["disk_bytes"] for g in guests.values()) for p in ("phase1", "phase2")]
    if mode == "no-cache":
        io1 = {"hit_bytes": 0, "backing_bytes": disk[0]}
        io2 = {"hit_bytes": 0, "backing_bytes": disk[1]}
    else:
        io1, io2 = _delta(_io(s1), _io(s0)), _delta(_io(s3), _io(s2))
    evicted_reread = sum(g["evicted_reread_bytes"] for g in guests.values())
    # Second-chance reads again what its staging buffer no longer held: backing reads too, outside the image counters.
    refetched = sum((g["admitted_from_backing"] or 0) * BLOCK for g in guests.values())
    served = sum(g["evicted_reread_cached_bytes"] for g in guests.values())
    hit2 = io2["hit_bytes"] / max(io2["hit_bytes"] + io2["backing_bytes"], 1)
    return {
        "guests": guests,
        "guest_disk_bytes": disk,
        "phase1": io1,
        "phase2": io2,
        "phase2_hit_ratio": hit2,
        "admission_backing_bytes": refetched,
        "monitor_evicted_estimate_bytes": sum(g["monitor_evicted_estimate"] or 0 for g in guests.values()),
        "admitted_bytes": sum(g["admitted_bytes"] or 0 for g in guests.values()),
        "backing_after_inflation_bytes": refetched + io2["backing_bytes"],
        "evicted_bytes": sum(g["evicted_bytes"] for g in guests.values()),
        "evicted_reread_bytes": evicted_reread,
        "evicted_reread_cached_bytes": served,
        # The goal: of what the guests evicted and read again, the share the backing no longer serves.
        "evicted_reread_cut": served / evicted_reread if evicted_reread else 0.0,
        # Conservative view from counters alone: all phase-2 backing bytes against what was evicted and re-read.
        "phase2_backing_over_evicted_reread": io2["backing_bytes"] / evicted_reread if evicted_reread else 0.0,
    }


# ---- the whole run ------------------------------------------------------------------------
def _config(args: argparse.Namespace, images: str, variant: str, cache_size: int, sequences: list[list[int]]) -> dict[str, Any]:
    return {
        "variant": variant,
        "guests": args.guests,
        "memory": args.memory * MIB,
        "image": args.image * MIB,
        "reads": args.reads,
        "skew": args.skew,
        "cache_size": cache_size,
        "staging_mib": args.staging_size,
        "images": images,
        "inos": [os.stat(os.path.join(images, f"vm{i + 1}.img")).st_ino for i in range(args.guests)],
        "sequences": sequences,
    }


def run_variant(cfg: dict[str, Any], work: str, modes: tuple[str, ...] = MODES, wait: float | None = None) -> dict[str, Any]:
    """The modes at one cache size; second-chance first, so the others wait as long as its admission took."""
    results: dict[str, Any] = {}
    for mode in sorted(modes, key=lambda m: m not in ("second-chance", LYING)):
        print(f"-- {cfg['variant']} cache ({cfg['cache_size'] / MIB:.0f} MiB): {mode}", flush=True)
        try:
            results[mode] = trio.run(run_mode, mode, cfg, work, wait)
        except MountUnavailable as exc:
            results[mode] = {"mode": mode, "unavailable": str(exc)}
            continue
        if mode == "second-chance":
            wait = results[mode].get("admission_seconds")
    return {"cache_size": cfg["cache_size"], "modes": {m: results[m] for m in (*MODES, LYING) if m in results}}


def inclusive_for_hit_ratio(points: list[tuple[int, float]], ratio: float) -> int | None:
    """The cache size inclusive needs for `ratio` in phase 2, linear between measured (size, ratio) points; None beyond them."""
    points = sorted(points)
    for (s0, r0), (s1, r1) in itertools.pairwise(points):
        if r0 <= ratio <= r1 and r1 > r0:
            return int(s0 + (s1 - s0) * (ratio - r0) / (r1 - r0))
    return None


def _mib(n: float) -> str:
    return f"{n / MIB:.1f}"


def _us(r: dict[str, Any], phase: str) -> str:
    guests = r["guests"].values()
    n = sum(g[phase]["disk_reads"] for g in guests)
    return f"{sum(g[phase]['us_per_disk_read'] * g[phase]['disk_reads'] for g in guests) / max(n, 1):.0f}"


def print_variant(name: str, v: dict[str, Any]) -> None:
    io_rows, mem_rows = [], []
    for mode in MODES:
        r = v["modes"][mode]
        if "unavailable" in r:
            io_rows.append([mode, *["n/a"] * 12])
            mem_rows.append([mode, *["n/a"] * 10])
            continue
        cut = f"{100 * r['evicted_reread_cut']:.1f}%" + (" (<=)" if mode == "inclusive" else "")
        io_rows.append(
            [
                mode,
                _mib(r["phase1"]["backing_bytes"]),
                _mib(r["guest_disk_bytes"][1]),
                _mib(r["phase2"]["hit_bytes"]),
                _mib(r["phase2"]["backing_bytes"]),
                _mib(r["admission_backing_bytes"]),
                f"{100 * r['phase2_hit_ratio']:.1f}%",
                _mib(r["evicted_bytes"]),
                _mib(r["evicted_reread_bytes"]),
                cut,
                f"{100 * r['phase2_backing_over_evicted_reread']:.0f}%",
                f"{r['phase1_seconds']:.2f} / {r['phase2_seconds']:.2f}",
                f"{_us(r, 'phase1')} / {_us(r, 'phase2')}",
            ]
        )
        m = r["memory_after_admission"]
        g = r["guests"].values()
        mem_rows.append(
            [
                mode,
                _mib(m["bytes_stored"]),
                f"{_mib(r['memory_end_phase1']['staging_bytes'])} / {_mib(m['staging_bytes'])}",
                _mib(m["cache_memory"]),
                f"{_mib(m.get('VmRSS', 0))} / {_mib(m.get('RssAnon', 0))}",
                _mib(sum(x["evicted_cached_bytes"] for x in g)),
                _mib(sum(x["cached_still_in_guest_bytes"] for x in g)),
                _mib(sum(x["cached_evicted_before_inflation_bytes"] for x in g)),
                f"{100 * r['phase2_hit_ratio']:.1f}%",
                f"{r['phase2_hit_bytes_per_cache_byte']:.2f}",
            ]
        )
    print_table(
        f"{name} cache, {v['cache_size'] / MIB:.0f} MiB: reads (MiB; p1/p2 = phase 1/2)",
        [
            "mode",
            "p1 backing",
            "p2 guest disk",
            "p2 hit",
            "p2 backing",
            "admission refetch",
            "p2 hit ratio",
            "evicted at inflation",
            "evicted, re-read",
            "of those cached",
            "p2 backing / re-read",
            "time p1 / p2 s",
            "us per disk read p1 / p2",
        ],
        io_rows,
    )
    print_table(
        f"{name} cache, {v['cache_size'] / MIB:.0f} MiB: host memory after admission settled (MiB) and what the cache held",
        [
            "mode",
            "stored",
            "staging end p1 / now",
            "stored + staging",
            "daemon RSS / anon",
            "held: evicted at inflation",
            "held: still in guest",
            "held: evicted before inflation",
            "p2 hit ratio",
            "p2 hit bytes per cache byte",
        ],
        mem_rows,
    )


def print_lying(v: dict[str, Any]) -> None:
    plain, lying = v["modes"].get("second-chance", {}), v["modes"].get(LYING, {})
    if "lying" not in lying or "evicted_reread_cut" not in plain:
        return
    x = lying["lying"]
    print_table(
        f"a lying guest beside the others, {v['cache_size'] / MIB:.0f} MiB cache (MiB)",
        [
            "mode",
            "honest: evicted, re-read, cached",
            "same, no liar",
            "honest held before / after the lie",
            "honest lost (within share)",
            "liar read",
            "liar claimed",
            "liar made host re-read",
            "re-read / read",
            "liar held / share",
        ],
        [
            [
                LYING,
                f"{100 * lying['evicted_reread_cut']:.1f}%",
                f"{100 * plain['evicted_reread_cut']:.1f}%",
                f"{_mib(x['honest_held_before_bytes'])} / {_mib(x['honest_held_after_bytes'])}",
                f"{_mib(x['honest_lost_bytes'])} ({_mib(x['honest_lost_within_share_bytes'])})",
                _mib(x["liar_read_bytes"]),
                _mib(x["liar_claimed_balloon_bytes"]),
                _mib(x["liar_reread_bytes"]),
                f"{x['liar_reread_bytes'] / max(x['liar_read_bytes'], 1):.2f}",
                f"{_mib(x['liar_held_bytes'])} / {_mib(x['liar_share_bytes'])}",
            ]
        ],
    )


def headline(variants: dict[str, Any]) -> str:
    parts = []
    for name, v in variants.items():
        sc, inc = v["modes"]["second-chance"], v["modes"]["inclusive"]
        if "unavailable" in sc or "unavailable" in inc:
            continue
        msc, minc = sc["memory_after_admission"], inc["memory_after_admission"]
        parts.append(
            f"{name} cache {v['cache_size'] / MIB:.0f} MiB: second-chance had {100 * sc['evicted_reread_cut']:.0f}% of the "
            f"{_mib(sc['evicted_reread_bytes'])} MiB guests evicted and re-read cached (goal 90%); phase-2 hit ratio "
            f"{100 * sc['phase2_hit_ratio']:.0f}% with {_mib(msc['cache_memory'])} MiB host memory "
            f"({_mib(msc['bytes_stored'])} stored + {_mib(msc['staging_bytes'])} staging) vs inclusive "
            f"{100 * inc['phase2_hit_ratio']:.0f}% with {_mib(minc['cache_memory'])} MiB"
        )
    lying = variants.get("small", {}).get("modes", {}).get(LYING, {})
    if "lying" in lying:
        x = lying["lying"]
        parts.append(
            f"a lying guest cost the others {_mib(x['honest_lost_within_share_bytes'])} MiB of cached chunks within their shares "
            f"({_mib(x['honest_lost_bytes'])} beyond) and made the host re-read "
            f"{x['liar_reread_bytes'] / max(x['liar_read_bytes'], 1):.2f}x what it read"
        )
    return "secondchance: " + "; ".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 small guests, fewer reads: a check that it works")
    parser.add_argument("--guests", type=int, default=3)
    parser.add_argument("--memory", type=int, default=96, help="guest memory, MiB")
    parser.add_argument("--image", type=int, default=256, help="image per guest, MiB")
    parser.add_argument("--reads", type=int, default=10000, help="64 KiB reads per guest per phase")
    parser.add_argument("--skew", type=float, default=1.1, help="Zipf exponent")
    parser.add_argument("--dir", default="/var/tmp", help="where images, caches and mounts go")
    parser.add_argument("--staging-size", type=int, metavar="MIB", help="second-chance's --staging-size (default: fusecache's)")
    args = parser.parse_args()
    if args.quick:
        args.guests, args.memory, args.image, args.reads = 2, 64, 128, 5000
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        print("secondchance: run as root on a machine with /dev/fuse (it mounts fusecache)", file=sys.stderr)
        return 1
    if args.memory * MIB // 3 <= RESERVED:
        print(f"secondchance: --memory {args.memory} leaves no page cache after inflation to a third; pass at least 64", file=sys.stderr)
        return 1
    work = tempfile.mkdtemp(prefix="fc-secondchance-", dir=args.dir)
    try:
        images = os.path.join(work, "images")
        os.makedirs(images)
        print(f"-- {args.guests} images of {args.image} MiB of random data in {images}", flush=True)
        for i in range(args.guests):
            warm_page_cache(make_random_file(os.path.join(images, f"vm{i + 1}.img"), args.image))
        # the liar's image: as large as its page cache, so it holds all of it
        liar_mib = max((args.memory * MIB - RESERVED) // MIB, 1)
        warm_page_cache(make_random_file(os.path.join(images, f"{LIAR}.img"), liar_mib))
        probe = [EmulatedGuest(f"vm{i + 1}", os.path.join(images, f"vm{i + 1}.img"), args.memory * MIB, "") for i in range(args.guests)]
        for g in probe:
            g.size = args.image * MIB
        sequences = zipf_sequences(probe, args.reads, args.skew)
        capacity = probe[0].cache_capacity
        sims = [simulate_phase1(capacity, s) for s in sequences]
        phase1_reads = sum(m for m, _ in sims) * BLOCK
        distinct = sum(d for _, d in sims) * BLOCK
        big = (distinct * 5 // 4 + MIB - 1) // MIB * MIB
        small = max(phase1_reads // 4 // MIB, 1) * MIB
        print(
            f"-- workload: phase-1 guest disk reads {_mib(phase1_reads)} MiB, {_mib(distinct)} MiB distinct; "
            f"caches {_mib(big)} and {_mib(small)} MiB",
            flush=True,
        )
        variants = {}
        for name, size in (("large", big), ("small", small)):
            variants[name] = run_variant(_config(args, images, name, size, sequences), work, (*MODES, LYING) if name == "small" else MODES)
        wait = variants["small"]["modes"]["second-chance"].get("admission_seconds")
        sweep = {}
        # More inclusive sizes, to see what it needs for second-chance's hit ratio: its curve is a cliff near `distinct`.
        sizes = {phase1_reads // 2 // MIB * MIB, phase1_reads * 3 // 4 // MIB * MIB, distinct * 9 // 10 // MIB * MIB}
        for size in () if args.quick else sorted(sizes):
            r = run_variant(_config(args, images, f"sweep{size // MIB}", size, sequences), work, ("inclusive",), wait)
            sweep[size] = r["modes"]["inclusive"]
        assert_nothing_mounted_under(work)
    finally:
        assert_nothing_mounted_under(work)
        shutil.rmtree(work, ignore_errors=True)
    for name, v in variants.items():
        print_variant(name, v)
    print_lying(variants["small"])
    inclusive = [(v["cache_size"], v["modes"]["inclusive"]) for v in variants.values()]
    points = [(size, r["phase2_hit_ratio"]) for size, r in inclusive if "phase2_hit_ratio" in r]
    points += [(size, r["phase2_hit_ratio"]) for size, r in sweep.items() if "phase2_hit_ratio" in r]
    matched = {}
    for name, v in variants.items():
        sc = v["modes"]["second-chance"]
        if "phase2_hit_ratio" in sc:
            need = inclusive_for_hit_ratio(points, sc["phase2_hit_ratio"])
            matched[name] = {
                "second_chance_hit_ratio": sc["phase2_hit_ratio"],
                "inclusive_cache_size_for_it": need,
                "second_chance_memory": sc["memory_after_admission"]["cache_memory"],
                "second_chance_stored": sc["memory_after_admission"]["bytes_stored"],
            }
    print_table(
        "inclusive's phase-2 hit ratio by cache size, and what it needs for second-chance's hit ratio",
        ["cache MiB", "inclusive p2 hit ratio"],
        [[f"{s / MIB:.0f}", f"{100 * r:.1f}%"] for s, r in sorted(points)],
    )
    for name, m in matched.items():
        need = m["inclusive_cache_size_for_it"]
        print(
            f"  {name}: second-chance {100 * m['second_chance_hit_ratio']:.1f}% with {_mib(m['second_chance_stored'])} MiB stored "
            f"({_mib(m['second_chance_memory'])} with staging); inclusive needs {'?' if need is None else _mib(need)} MiB for that"
        )
    line = headline(variants)
    params = {k: getattr(args, k) for k in ("guests", "memory", "image", "reads", "skew", "staging_size")}
    name = "secondchance" + ("-quick" if args.quick else "") + ("" if args.staging_size is None else f"-staging{args.staging_size}M")
    path = write_results(
        name,
        {
            "params": {**params, "block": BLOCK, "phase1_guest_disk_bytes_simulated": phase1_reads, "distinct_bytes": distinct},
            "variants": variants,
            "inclusive_sweep": {str(k): v for k, v in sweep.items()},
            "inclusive_hit_ratio_by_size": [[s, r] for s, r in sorted(points)],
            "memory_for_equal_hit_ratio": matched,
            "headline": line,
        },
    )
    print(line)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
