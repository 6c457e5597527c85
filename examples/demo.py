"""`make demo`: fusecache end to end on its own sample images, in about a minute, with nothing else set up.

Two hosts (two fusecache mounts on this machine, peers of each other over
loopback) share one image directory, the embedded default: a base image and
a clone of it that differs in a few places. Three emulated guests
(`tests/harness/simguest.py`) read their disks with a skewed pattern: vm1 (base) and
vm2 (the clone) on host1, vm3 (the base, later) on host2. Partway, host1
inflates its guests' balloons: they evict page cache, fusecache's balloon
monitor sees it over QMP, and second-chance admission stores what they
evicted. Then vm3 boots on host2 and finds host1's blocks one hop away, and
vm1 and vm2 get their memory back and read again: from the cache, not the
backing. When QEMU is installed, a real guest (vm0: a Debian kernel and a
busybox userland under QEMU TCG, `tests/harness/tinyguest.py`) does the same on
host1 with its disk on the mount. `fusecache top` shows it live when there
is a terminal; a summary is printed at the end either way.

Run from the repository root as `python -m examples.demo` (`make demo` does):
the guests come from the test harness, `tests.harness`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from fusecache.errors import QuietError
from fusecache.stats import BalloonGuest, ImageCounters, MountStats, StoreStats
from tests.harness.simguest import EmulatedGuest
from tests.harness.tinyguest import Guest, GuestBuild, GuestUnavailable, build_guest, make_disk

MiB = 1 << 20
REAL_GUEST_MIB = 256  # vm0's memory; its balloon goes down to REAL_BALLOON_MIB
REAL_BALLOON_MIB = 96
REAL_FILE = 96 * MiB
IMAGE = 96 * MiB
MEMORY = 80 * MiB
READS = 3000  # 64 KiB reads per guest per phase
FUSECACHE = [sys.executable, "-m", "fusecache"]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FUSECACHE, *args], capture_output=True, text=True, timeout=120)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make_images(d: str) -> None:
    """base.img: 96 MiB with a quarter of it zeros (holes, as in real images); clone.img: base with 8 MiB rewritten."""
    rng = open("/dev/urandom", "rb")  # noqa: SIM115 - closed below
    with rng, open(os.path.join(d, "base.img"), "wb") as base:
        for i in range(IMAGE // MiB):
            base.write(bytes(MiB) if i % 4 == 3 else rng.read(MiB))
    shutil.copyfile(os.path.join(d, "base.img"), os.path.join(d, "clone.img"))
    with open("/dev/urandom", "rb") as r, open(os.path.join(d, "clone.img"), "r+b") as clone:
        for off in range(0, 8 * MiB, MiB):
            clone.seek(off * 11)
            clone.write(r.read(MiB))


def _stats(mp: str) -> MountStats:
    """The mount's stats as `fusecache stats --json` gives them (empty ones if it cannot)."""
    proc = _run("stats", mp, "--json")
    return MountStats.from_json(json.loads(proc.stdout)) if proc.returncode == 0 else MountStats(queue=1)


class Demo:
    def __init__(self, work: str) -> None:
        self.work = work
        self.images = os.path.join(work, "images")
        self.hosts = [os.path.join(work, "host1"), os.path.join(work, "host2")]
        self.mounted: list[str] = []
        self.top: subprocess.Popen[bytes] | None = None
        self.real: Guest | None = None
        self.real_build: GuestBuild | None = None
        self.real_sum = ""

    def mount(self, host: str, port: int, peer: int, balloons: list[str]) -> None:
        os.makedirs(host)
        args = ["mount", self.images, host, "--cache-dir", host + ".cache", "--cache-size", "256M",
                "--log-file", host + ".log", "--listen", f"127.0.0.1:{port}", "--peer", f"127.0.0.1:{peer}",
                "--peer-insecure", "--peer-timeout", "0.05"]
        for b in balloons:
            args += ["--balloon", f"qmp:{b}"]
        proc = _run(*args)
        if proc.returncode != 0:
            raise QuietError(f"the demo could not mount fusecache: {proc.stderr.strip()}")
        self.mounted.append(host)

    def unmount_all(self) -> None:
        for mp in reversed(self.mounted):
            if _run("umount", mp).returncode != 0:
                subprocess.run(["fusermount3", "-u", "-z", mp], capture_output=True)
        self.mounted.clear()

    def prepare_real_guest(self, say: Any) -> None:
        """vm0's kernel, initramfs and disk (in the images directory), if QEMU is here."""
        if shutil.which("qemu-system-x86_64") is None:
            say("no QEMU here: the demo runs emulated guests only")
            return
        try:
            self.real_build = build_guest()
        except (GuestUnavailable, OSError, subprocess.CalledProcessError) as exc:
            say(f"cannot build a real guest here ({exc}): the demo runs emulated guests only")
            return
        data = os.urandom(REAL_FILE)
        make_disk(Path(self.images) / "vm0.img", {"data": data}, block_size=4096)  # guest pages line up with image pages
        self.real_sum = hashlib.md5(data).hexdigest()

    def stop_real_guest(self) -> None:
        if self.real is not None:
            self.real.stop()
            self.real = None

    def start_top(self) -> None:
        if sys.stdout.isatty() and os.environ.get("TERM", "dumb") != "dumb":
            self.top = subprocess.Popen([*FUSECACHE, "top", *self.hosts])

    def stop_top(self) -> None:
        if self.top is not None:
            self.top.send_signal(signal.SIGINT)
            try:
                self.top.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.top.kill()
            self.top = None


async def _phase(guests: list[EmulatedGuest], seed: int) -> None:
    async with trio.open_nursery() as nursery:
        for i, g in enumerate(guests):
            blocks = g.zipf_blocks(READS, seed + i)
            nursery.start_soon(trio.to_thread.run_sync, lambda g=g, b=blocks: [g.read_block(x) for x in b])


async def _wait_admitted(mp: str, guests: list[str], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = await trio.to_thread.run_sync(_stats, mp)
        g = s.balloon.guests
        if all(name in g and g[name].admitted_chunks > 0 for name in guests) and s.queue == 0:
            return
        await trio.sleep(0.5)


async def _wait_peer_knows(mp: str, chunks: int, timeout: float = 20.0) -> None:
    """Until the host at `mp` has a summary from its peer covering `chunks` locations (refreshed every few seconds)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = await trio.to_thread.run_sync(_stats, mp)
        if any(p.summary_locations >= chunks for p in s.peers.peers.values()):
            return
        await trio.sleep(0.5)


async def _demo(demo: Demo, say: Any) -> dict[str, Any]:
    host1, host2 = demo.hosts
    sock = os.path.join(demo.work, "{}.qmp")
    vm1 = EmulatedGuest("vm1", os.path.join(host1, "base.img"), MEMORY, sock.format("vm1"))
    vm2 = EmulatedGuest("vm2", os.path.join(host1, "clone.img"), MEMORY, sock.format("vm2"))
    vm3 = EmulatedGuest("vm3", os.path.join(host2, "base.img"), MEMORY, sock.format("vm3"))
    async with trio.open_nursery() as nursery:
        for g in (vm1, vm2, vm3):
            await nursery.start(g.serve_qmp)
        p1, p2 = _free_port(), _free_port()
        say("mounting two hosts (fusecache peers on loopback) over the sample images")
        vm0_qmp = os.path.join(demo.work, "vm0.qmp")
        real = [vm0_qmp] if demo.real_build is not None else []
        await trio.to_thread.run_sync(demo.mount, host1, p1, p2, [vm1.qmp_path, vm2.qmp_path, *real])
        await trio.to_thread.run_sync(demo.mount, host2, p2, p1, [vm3.qmp_path])
        if demo.real_build is not None:
            say("vm0, a real guest under QEMU, boots on host1 with its disk on the mount")
            demo.real = Guest(Path(demo.work) / "vm0", demo.real_build)
            await trio.to_thread.run_sync(
                # Free page reporting: what the guest evicts leaves its RAM at once, so fusecache's scans of it see the eviction.
                lambda: demo.real.start(os.path.join(host1, "vm0.img"), memory_mib=REAL_GUEST_MIB, qmp_sock=vm0_qmp, name="vm0",
                                        extra=["-global", "virtio-balloon-pci.free-page-reporting=on"])
            )
        demo.start_top()
        for g in (vm1, vm2, vm3):
            g.open()
        await trio.sleep(2)  # the balloon monitors find the guests
        say("vm1 and vm2 read their disks on host1 (cold: from the backing)")
        await _phase([vm1, vm2], seed=1)
        first = (vm1.disk_reads, vm2.disk_reads)
        await trio.sleep(2.5)  # the guests settle; the monitor's next polls see their full page caches
        say("host1 inflates vm1's and vm2's balloons: they evict page cache; fusecache admits what they evicted")
        for g in (vm1, vm2):
            g.set_balloon(MEMORY // 3)
        await _wait_admitted(host1, ["vm1", "vm2"])
        store = (await trio.to_thread.run_sync(_stats, host1)).store
        held = store.chunks if store is not None else 1
        await _wait_peer_knows(host2, held)
        say("vm3 boots on host2 from the same base image: host1's blocks are one hop away")
        await _phase([vm3], seed=1)
        say("vm1 and vm2 get their memory back and read again")
        for g in (vm1, vm2):
            g.set_balloon(MEMORY)
        await _phase([vm1, vm2], seed=1)
        real = await _real_guest(demo, host1, say) if demo.real is not None else None
        await trio.sleep(1.5)  # one more refresh of top
        nursery.cancel_scope.cancel()
    for g in (vm1, vm2, vm3):
        g.close()
    return {
        "real": real,
        "first": first,
        "again": (vm1.disk_reads - first[0], vm2.disk_reads - first[1]),
        "host1": await trio.to_thread.run_sync(_stats, host1),
        "host2": await trio.to_thread.run_sync(_stats, host2),
    }


async def _real_guest(demo: Demo, host1: str, say: Any) -> dict[str, Any]:
    """vm0 reads its file, its balloon inflates, it gets its memory back and reads the file again."""
    g = demo.real
    assert g is not None
    say("vm0 reads a 96 MiB file, then its balloon takes 160 MiB, then gives it back")
    first = (await trio.to_thread.run_sync(g.check, "md5sum /mnt/data")).split()[0]
    await trio.sleep(2.5)  # the monitor's polls see vm0's page cache
    await trio.to_thread.run_sync(g.balloon, REAL_BALLOON_MIB)
    await _wait_admitted(host1, ["vm0"])
    await trio.to_thread.run_sync(g.balloon, REAL_GUEST_MIB)
    before = (await trio.to_thread.run_sync(_stats, host1)).images["vm0.img"]
    say("vm0 reads the file again")
    again = (await trio.to_thread.run_sync(g.check, "md5sum /mnt/data")).split()[0]
    after = await trio.to_thread.run_sync(_stats, host1)
    img = after.images["vm0.img"]
    return {
        "checksums_right": first == again == demo.real_sum,
        "hit": img.hit_bytes - before.hit_bytes,
        "backing": img.backing_bytes - before.backing_bytes,
        "guest": after.balloon.guests.get("vm0") or BalloonGuest(),
    }


def _summary(r: dict[str, Any]) -> list[str]:
    h1: MountStats = r["host1"]
    h2: MountStats = r["host2"]
    lines = ["", "fusecache demo: what happened"]
    for name, image in (("vm1", "base.img"), ("vm2", "clone.img")):
        c = h1.images.get(image) or ImageCounters()
        lines.append(
            f"  {name} on host1 ({image}): read {c.backing_bytes / MiB:.0f} MiB from the backing, "
            f"then {c.hit_bytes / MiB:.0f} MiB from the cache after its balloon inflated"
        )
    c3 = h2.images.get("base.img") or ImageCounters()
    lines.append(
        f"  vm3 on host2 (base.img): {c3.peer_bytes / MiB:.0f} MiB from host1's cache (peer hits), "
        f"{c3.backing_bytes / MiB:.0f} MiB from the backing"
    )
    for name in ("vm1", "vm2"):
        g = h1.balloon.guests.get(name) or BalloonGuest()
        lines.append(
            f"  {name}'s balloon: ~{g.evicted_estimate / MiB:.0f} MiB evicted by the guest, "
            f"{g.admitted_bytes / MiB:.0f} MiB admitted"
        )
    real = r.get("real")
    if real:
        g0 = real["guest"]
        lines.append(
            f"  vm0, a real QEMU guest on host1: ~{g0.evicted_estimate / MiB:.0f} MiB evicted when its balloon inflated, "
            f"{g0.admitted_bytes / MiB:.0f} MiB admitted; its re-read: {real['hit'] / MiB:.0f} MiB from the cache, "
            f"{real['backing'] / MiB:.0f} MiB from the backing; checksums {'right' if real['checksums_right'] else 'WRONG'}"
        )
    store = h1.store or StoreStats()
    saved = sum(c.hit_bytes + c.peer_bytes for h in (h1, h2) for c in h.images.values())
    total = saved + sum(c.backing_bytes for h in (h1, h2) for c in h.images.values())
    lines.append(
        f"  host1's cache: {store.bytes_stored / MiB:.0f} MiB stored for {store.logical_bytes / MiB:.0f} MiB of image data "
        f"(dedup {store.dedup_ratio:.2f}x: the clone shares the base's pages; zero pages take no space)"
    )
    lines.append(f"  reads that did not go to the backing: {saved / MiB:.0f} of {total / MiB:.0f} MiB ({100 * saved / max(total, 1):.0f}%)")
    return lines


def main() -> int:
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        print("fusecache demo: run it as root on a machine with /dev/fuse (it mounts FUSE filesystems)", file=sys.stderr)
        return 1
    work = tempfile.mkdtemp(prefix="fusecache-demo-")
    demo = Demo(work)
    quiet = sys.stdout.isatty()

    def say(msg: str) -> None:
        if not quiet or demo.top is None:
            print(f"-- {msg}", flush=True)

    try:
        os.makedirs(demo.images)
        say(f"making sample images in {demo.images}")
        _make_images(demo.images)
        demo.prepare_real_guest(say)
        result = trio.run(_demo, demo, say)
    except QuietError as exc:
        print(f"fusecache demo: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        demo.stop_top()
        demo.stop_real_guest()
        demo.unmount_all()
        if os.environ.get("FUSECACHE_DEMO_KEEP"):
            print(f"-- kept {work} (FUSECACHE_DEMO_KEEP is set)")
        else:
            with contextlib.suppress(OSError):
                shutil.rmtree(work)
    print("\n".join(_summary(result)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
