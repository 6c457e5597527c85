"""Exact second chance on real guests: how much of what a guest evicted and re-read comes from the cache, scans against the estimate.

Owns the end-to-end measurement behind issue 12. Real QEMU TCG guests
(`tests/harness/tinyguest.py`: a Debian kernel and a busybox initramfs, an
ext4 disk with 4 KiB blocks on a real fusecache mount, `cache=none`, free page
reporting on the balloon) evict in three ways, each followed by re-reads:

- `balloon`: the guest reads a 160 MiB file, its balloon goes 384 -> 128 MiB at
  once (its statistics still predate its reads), then back; it reads the file again;
- `zipf`: a 160 MiB guest reads 64 KiB blocks of a 384 MiB file with Zipf
  popularity (4000 reads, exponent 0.7), no balloon: its own memory pressure evicts; then
  the very same reads again;
- `moving`: the guest re-reads the 160 MiB file in a loop (8 times, 3 s apart)
  while its balloon goes to 128 MiB and back.

In every scenario the guest had read all of it before, so every byte of the
re-read phase that reaches fusecache is a byte it evicted and read again: the
share of those served from the cache (hit bytes over hit + backing, stats
deltas) is the figure. Modes, each on a fresh mount and cache: `scan` (the
default: the daemon scans the guest's RAM), `estimate` (`--no-guest-scan`:
balloon statistics), and for `zipf` also `inclusive` (`--admit inclusive`,
every read admitted). Also measured: scan CPU seconds per GiB of guest RAM
scanned (the daemon's own count), and host memory per GiB of guest reads:
the store's bytes plus the staging buffer in use plus the served-page index
(32 bytes per page of guest RAM) — second chance against inclusive at the
hit ratio each reaches.

    .venv/bin/python -m bench.exactchance [--scenarios balloon,zipf,moving] [--modes scan,estimate,inclusive] [--dir /var/tmp]

Needs root, /dev/fuse and QEMU. Prints a table; writes bench/results/exactchance.json.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import MIB, assert_nothing_mounted_under, fusecache_mount, fusecache_stats, print_table, write_results
from tests.harness.tinyguest import Guest, build_guest, make_disk

CHUNK = 64 << 10
GIB = 1 << 30
INDEX_BYTES_PER_PAGE = 32  # fusecache.guestmem.PAGE_RECORD_BYTES
FPR = ["-global", "virtio-balloon-pci.free-page-reporting=on"]
MODE_OPTIONS = {"scan": [], "estimate": ["--no-guest-scan"], "inclusive": ["--admit", "inclusive"]}


def wait_for(cond: Callable[[], Any], what: str, timeout: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := cond()):
        if time.monotonic() > deadline:
            raise RuntimeError(f"gave up waiting for {what}")
        time.sleep(0.5)
    return value


class Run:
    """One guest on one fresh mount, and the daemon's figures for it."""

    def __init__(self, mp: str, guest: Guest, ram_mib: int) -> None:
        self.mp, self.g, self.ram_mib = mp, guest, ram_mib
        self.mark: dict[str, Any] = {}  # the image's counters when the re-read phase started

    def phase_start(self) -> None:
        self.mark = self.image()

    def stats(self) -> dict[str, Any]:
        s = fusecache_stats(self.mp)
        assert s is not None, "no stats from the daemon"
        return s

    def guest(self) -> dict[str, Any]:
        return self.stats().get("balloon", {}).get("guests", {}).get("fc-guest", {})

    def image(self) -> dict[str, Any]:
        return self.stats().get("images", {}).get("guest.img", {})

    def settled(self, mode: str, scans_after: int = 3) -> None:
        """What the scans (or the estimate) found is admitted and committed."""
        if mode == "scan":
            start = self.guest().get("scans", 0)
            wait_for(lambda: self.guest().get("scans", 0) >= start + scans_after, "scans")
        else:
            time.sleep(8)  # the estimate waits for two fresh statistics samples after the balloon stops
        last = [-1]

        def still() -> bool:
            s = self.stats()
            admitted = s.get("balloon", {}).get("guests", {}).get("fc-guest", {}).get("admitted_chunks", 0)
            done = s.get("queue", 0) == 0 and admitted == last[0]
            last[0] = admitted
            return done

        time.sleep(1)
        wait_for(still, "admissions to settle")


def balloon(run: Run, mode: str, content: bytes) -> None:
    md5 = hashlib.md5(content).hexdigest()
    assert run.g.check("md5sum /mnt/f").split()[0] == md5
    run.g.balloon(128)
    run.settled(mode)
    run.g.balloon(384)
    run.phase_start()
    assert run.g.check("md5sum /mnt/f").split()[0] == md5


def zipf(run: Run, mode: str, content: bytes) -> None:
    chunks = len(content) // CHUNK
    rng = random.Random(12)
    weights = [1 / (k + 1) ** 0.7 for k in range(chunks)]
    perm = list(range(chunks))
    rng.shuffle(perm)
    offsets = [perm[k] for k in rng.choices(range(chunks), weights, k=4000)]
    want = [hashlib.md5(content[c * CHUNK : (c + 1) * CHUNK]).hexdigest() for c in offsets]
    script = "for c in " + " ".join(map(str, offsets)) + "; do dd if=/mnt/f bs=65536 skip=$c count=1 2>/dev/null | md5sum; done"

    def one_pass() -> None:
        assert [w for w in run.g.check(script, timeout=1800).split() if len(w) == 32] == want, "the guest read wrong bytes"

    one_pass()
    run.settled(mode)
    run.phase_start()
    one_pass()


def moving(run: Run, mode: str, content: bytes) -> None:
    md5 = hashlib.md5(content).hexdigest()
    assert run.g.check("md5sum /mnt/f").split()[0] == md5
    if mode == "scan":
        run.settled(mode, scans_after=1)
    run.phase_start()
    out: list[str] = []
    loop = "for i in 1 2 3 4 5 6 7 8; do md5sum /mnt/f; sleep 3; done"
    reader = threading.Thread(target=lambda: out.append(run.g.check(loop, timeout=1800)))
    reader.start()
    try:
        time.sleep(2)
        run.g.balloon(128)
        time.sleep(15)
        run.g.balloon(384)
    finally:
        reader.join()
    assert out and out[0].split()[::2] == [md5] * 8, "the guest read wrong bytes"


SCENARIOS: dict[str, tuple[Callable[[Run, str, bytes], None], int, int]] = {
    # name: (workload, guest RAM MiB, file MiB)
    "balloon": (balloon, 384, 160),
    "zipf": (zipf, 160, 384),
    "moving": (moving, 384, 160),
}


def one(scenario: str, mode: str, build: Any, workdir: str) -> dict[str, Any]:
    workload, ram_mib, file_mib = SCENARIOS[scenario]
    content = os.urandom(file_mib * MIB)
    images = os.path.join(workdir, "images")
    os.makedirs(images)
    make_disk(Path(images) / "guest.img", {"f": content}, size_mib=file_mib * 11 // 10 + 40, block_size=4096)
    qmp = os.path.join(workdir, "qmp.sock")
    follow = [] if mode == "inclusive" else ["--balloon", f"qmp:{qmp}"]  # inclusive admission follows no balloon
    opts = ["--cache-dir", os.path.join(workdir, "cache"), "--cache-size", "1G", *follow, *MODE_OPTIONS[mode]]
    mount = fusecache_mount(images, os.path.join(workdir, "mnt"), opts, os.path.join(workdir, "daemon.log"))
    with mount as mp, Guest(Path(workdir) / "guest", build) as g:
        g.start(os.path.join(mp, "guest.img"), memory_mib=ram_mib, qmp_sock=qmp, extra=FPR)
        run = Run(mp, g, ram_mib)
        if follow:
            wait_for(lambda: run.guest().get("running"), "the monitor to find the guest")
        if mode == "scan":
            wait_for(lambda: run.guest().get("mode") == "scan", "the daemon to scan the guest")
        t0 = time.monotonic()
        workload(run, mode, content)
        wall = time.monotonic() - t0
        after, s = run.image(), run.stats()
        gv = run.guest()
        g.stop()
    before = run.mark
    hit = after.get("hit_bytes", 0) - before.get("hit_bytes", 0)
    backing = after.get("backing_bytes", 0) - before.get("backing_bytes", 0)
    guest_reads = after.get("hit_bytes", 0) + after.get("backing_bytes", 0)
    store_bytes = s.get("store", {}).get("bytes_stored", 0)
    staging = s.get("admission", {}).get("staging_bytes", 0)
    index = (ram_mib * MIB // 4096) * INDEX_BYTES_PER_PAGE if mode == "scan" else 0
    host = store_bytes + staging + index
    return {
        "scenario": scenario, "mode": mode, "guest_ram_mib": ram_mib, "file_mib": file_mib, "wall_s": wall,
        "reread_hit_bytes": hit, "reread_backing_bytes": backing,
        "reread_share_from_cache": hit / (hit + backing) if hit + backing else None,
        "guest_read_bytes": guest_reads, "admitted_bytes": gv.get("admitted_bytes", 0),
        "evicted_found_bytes": gv.get("evicted_pages", 0) * 4096, "evicted_estimate_bytes": gv.get("evicted_estimate", 0),
        "scans": gv.get("scans", 0), "scan_cpu_s": gv.get("scan_cpu_s", 0.0), "scanned_bytes": gv.get("scanned_bytes", 0),
        "scan_cpu_s_per_gib": gv.get("scan_cpu_s", 0.0) / (gv["scanned_bytes"] / GIB) if gv.get("scanned_bytes") else None,
        "store_bytes": store_bytes, "staging_bytes": staging, "index_bytes": index, "host_bytes": host,
        "host_bytes_per_gib_read": host / (guest_reads / GIB) if guest_reads else None,
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenarios", default="balloon,zipf,moving")
    ap.add_argument("--modes", default="scan,estimate,inclusive", help="inclusive runs for zipf only (the memory comparison)")
    ap.add_argument("--dir", default=None, help="where the images and caches go (default: a temporary directory)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/exactchance.py mounts FUSE and reads guests' memory: run it as root")
    if shutil.which("qemu-system-x86_64") is None:
        sys.exit("bench/exactchance.py needs qemu-system-x86_64: apt-get install qemu-system-x86")
    build = build_guest()
    results: list[dict[str, Any]] = []
    base = tempfile.mkdtemp(prefix="fc-bench-exact-", dir=args.dir)
    try:
        for scenario in args.scenarios.split(","):
            for mode in args.modes.split(","):
                if mode == "inclusive" and scenario != "zipf":
                    continue
                workdir = os.path.join(base, f"{scenario}-{mode}")
                os.makedirs(workdir)
                r = one(scenario, mode, build, workdir)
                results.append(r)
                print(f"{scenario}/{mode}: {r['reread_share_from_cache']!r} of re-reads from the cache", flush=True)
                shutil.rmtree(workdir, ignore_errors=True)
    finally:
        assert_nothing_mounted_under(base)
        shutil.rmtree(base, ignore_errors=True)

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f}%"

    rows = [
        [r["scenario"], r["mode"], pct(r["reread_share_from_cache"]), f"{(r['reread_hit_bytes'] + r['reread_backing_bytes']) / MIB:.0f}",
         f"{r['evicted_found_bytes'] / MIB:.0f}" if r["mode"] == "scan" else f"~{r['evicted_estimate_bytes'] / MIB:.0f}",
         f"{r['admitted_bytes'] / MIB:.0f}", "-" if r["scan_cpu_s_per_gib"] is None else f"{r['scan_cpu_s_per_gib']:.3f}",
         f"{r['scan_cpu_s']:.2f} / {r['wall_s']:.0f}", f"{r['host_bytes'] / MIB:.0f}",
         "-" if r["host_bytes_per_gib_read"] is None else f"{r['host_bytes_per_gib_read'] / MIB:.0f}"]
        for r in results
    ]  # fmt: skip
    print_table(
        "Evicted and re-read bytes served from the cache, per scenario and mode (real TCG guests, free page reporting on)",
        ["scenario", "mode", "from cache", "re-read MiB", "evicted MiB (found / ~est.)", "admitted MiB", "scan CPU s/GiB",
         "scan CPU s / wall s", "host MiB", "host MiB per GiB read"],
        rows,
    )  # fmt: skip
    print(write_results("exactchance", {"runs": results}))


if __name__ == "__main__":
    main()
