"""A boot storm: N real guests boot from one base image on NFS, plain NFS against fusecache cold, warm and with a peer.

Issue 13's end-to-end row. N QEMU TCG guests (tests/harness/tinyguest.py) each
boot from their own qcow2 overlay over one raw base image, both on the mount
(`qemu-img create -f qcow2 -F raw -b base.img`, as libvirt does; QEMU opens
the overlay with cache=none), with the NFS server (nfs-ganesha,
tests/harness/nfs_server.py) behind the delay proxy at 0.2 ms and 2 ms round
trip, and read what a boot reads. Per row: bytes read from NFS, bytes the
guests read, and the guest-visible read time.

Decisions, and why:

- What a boot reads. The base image is an ext4 (`mkfs.ext4 -b 4096 -d`, the
  guest's page size, as real root filesystems are) holding a real Debian
  userland copied from this host: first the files a Debian boot reads, in
  the order it reads them -- the kernel and initrd (what the bootloader
  reads; here the guest's own), the ELF closure (`ldd`) of systemd, journald,
  udevd, logind, networkd, resolved, dbus, agetty, login, bash, mount, fsck
  and python3, systemd's unit files and udev rules, then the python3 stdlib
  modules a cloud-init-like program imports (the .pyc files python reads);
  then, up to the image size, more of /usr/lib that a boot does not read (a
  boot reads a part of its disk). The list is stored in the image
  (`/bootstorm.list`, and `/bootstorm.sh` that runs a command on them). The
  guest's "boot" mounts the disk read-only and reads every listed file whole,
  in order (`cat`, 32 files per command), timed inside the guest
  with /proc/uptime (10 ms resolution; reads take seconds). Whole files
  over-read what a real boot touches (it maps libraries and faults in only
  some pages) and a real boot spreads its reads over CPU work: this is a
  read-heavy boot, honest about its bytes, not a replayed trace. After the
  timed read every guest computes md5sum of every file (from its page cache,
  untimed) and the bench compares them with the host's: a wrong byte fails
  the run.
- Plain NFS: this kernel has no NFS client, so "plain NFS" is `fusecache
  mount --no-cache` over the same nfs:// backing (FUSE + libnfs, nothing
  cached), as bench/cluster.py does. The table says so.
- Admission. One-host rows use the default mount (second chance): it
  admits what a guest evicts (known from its balloon or a scan of its RAM),
  and guests that boot, read and restart evict nothing, so its store stays
  empty; its warm hits come from the fetcher's buffer of recently fetched
  chunks (64 MiB, fusecache/fetch.py), which holds a boot smaller than that.
  `--heavy-mib 100` (a boot of ~150 MiB) with `--modes second-chance
  inclusive` shows the difference: there the default warm storm reads its
  bytes from NFS again and only inclusive keeps them. The peer rows use
  inclusive: a host that stored nothing has nothing to share.
- Setups per round trip and N: plain NFS; fusecache cold (fresh cache dir,
  first boot); fusecache warm (the same guests and overlays booted again,
  cache kept, guests restarted so their own page cache is cold); two hosts
  with peers (hosts in network namespaces, tests/harness/netns.py: host A's
  N guests boot, then host B's; B has its own empty cache and asks A; the
  peer link is behind a delay proxy at the same round trip as NFS, a peer no
  nearer than the filer). The row is host B's.
- Bytes from NFS are counted outside fusecache: the delay proxy in front of
  ganesha counts the bytes it forwarded server to client (NFS replies on the
  wire, RPC headers and GETATTRs included); ganesha's own /proc/PID/io rchar
  (its file reads, all hosts) is given too. Guest bytes are the sum of each
  guest's own /sys/block/vda/stat sectors read.
- Timing. 2 shared cores: N=8 TCG guests measure CPU more than I/O (each
  guest emulates its CPU in software; 8 of them on 2 cores queue for the
  CPU), and other engineers' jobs add noise. Ratios against plain NFS are
  taken in one run, setups alternated per N. Medians and maxima over the N
  guests of one storm, one storm per row: read them as rough.
- ganesha serves from the host page cache (the image was just written): NFS
  here is the network plus the server, not a disk.

    .venv/bin/python -m bench.bootstorm [--quick] [--rtt-ms 0.2 2] [--guests 1 4 8] [--modes second-chance inclusive]

Runs as root (network namespaces, FUSE). Default ~16 min, --quick ~3 min.
Prints a table; writes bench/results/bootstorm.json (bootstorm-quick.json
with --quick). Every guest, mount, proxy, ganesha and namespace started is
stopped by PID in finally blocks. A missing part: one line, exit 2.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import hashlib
import importlib.util
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import MIB, _wait_reserve, assert_nothing_mounted_under, fusecache_mount, fusecache_stats, print_table, write_results

REPO = Path(__file__).resolve().parent.parent
LIST_NAME = "bootstorm.list"
SCRIPT_NAME = "bootstorm.sh"  # `sh bootstorm.sh CMD` runs CMD on the listed files, in order, SCRIPT_FILES at a time
SCRIPT_FILES = 32
BASE_NAME = "base.img"
NFS_PORT = 2049  # tests/harness/nfs_server.NFS_PORT, inside the server's namespace

# What a Debian boot runs, in about the order it starts them (those this host has).
BOOT_PROGRAMS = [
    "/usr/lib/systemd/systemd", "/usr/lib/systemd/systemd-journald", "/usr/lib/systemd/systemd-udevd",
    "/usr/bin/udevadm", "/usr/sbin/fsck.ext4", "/usr/bin/mount", "/usr/lib/systemd/systemd-modules-load",
    "/usr/lib/systemd/systemd-sysctl", "/usr/lib/systemd/systemd-random-seed", "/usr/lib/systemd/systemd-logind",
    "/usr/bin/dbus-daemon", "/usr/lib/systemd/systemd-networkd", "/usr/lib/systemd/systemd-resolved",
    "/usr/lib/systemd/systemd-timesyncd", "/usr/sbin/agetty", "/usr/bin/login", "/usr/bin/bash", "/usr/bin/systemctl",
    "/usr/bin/python3.11", "/usr/sbin/sshd", "/usr/sbin/cron",
]  # fmt: skip
BOOT_CONFIG_DIRS = ["/usr/lib/systemd/system", "/usr/lib/udev/rules.d", "/usr/lib/tmpfiles.d", "/usr/lib/sysctl.d"]
# What cloud-init (python) imports at its start, roughly: the stdlib modules a boot's python reads.
PY_IMPORTS = (
    "argparse,asyncio,base64,configparser,contextlib,copy,ctypes,datetime,email.mime.multipart,email.parser,"
    "glob,gzip,hashlib,http.client,io,ipaddress,json,logging.handlers,math,os,platform,random,re,shlex,shutil,"
    "signal,socket,sqlite3,ssl,stat,string,struct,subprocess,tempfile,textwrap,threading,time,traceback,uuid,"
    "urllib.parse,urllib.request,xml.dom.minidom,xml.etree.ElementTree,zlib,unittest,pydoc,tarfile,zipfile,"
    "multiprocessing,concurrent.futures,decimal,fractions,statistics,csv,pickle,pprint,difflib,inspect,typing"
)
FILLER_DIRS = ["/usr/lib/x86_64-linux-gnu", "/usr/share/locale", "/usr/lib/python3.11"]


class Missing(Exception):
    """A part this benchmark needs is not here (one line for the user, exit 2)."""


# ---- the userland: a base image and what a boot reads from it ----------------------------------
@dataclass
class Userland:
    base: Path  # the raw ext4 image, in the export
    files: list[str]  # paths inside the image, in the order a boot reads them
    md5: dict[str, str]  # path inside the image -> md5 of its content
    read_bytes: int  # bytes of the listed files
    image_bytes: int


def _elf_closure(programs: list[str]) -> list[str]:
    """Each program that exists, then the libraries ldd says it loads (real paths, first seen first)."""
    out: list[str] = []
    for prog in programs:
        if not os.path.isfile(prog):
            continue
        out.append(os.path.realpath(prog))
        ldd = subprocess.run(["ldd", prog], capture_output=True, text=True, check=False).stdout
        for line in ldd.splitlines():
            found = re.search(r"(/\S+) \(0x", line)
            if found:
                out.append(os.path.realpath(found.group(1)))
    return out


def _python_modules() -> list[str]:
    """The files python3 reads importing PY_IMPORTS: each module's .pyc where it has one, else its .py or .so."""
    py = "/usr/bin/python3.11" if os.path.exists("/usr/bin/python3.11") else shutil.which("python3") or "python3"
    code = (
        "import importlib.util, sys\n"
        f"for m in {PY_IMPORTS!r}.split(','): __import__(m)\n"
        "for m in list(sys.modules.values()):\n"
        "    f = getattr(m, '__file__', None)\n"
        "    if not f: continue\n"
        "    if f.endswith('.py'):\n"
        "        c = importlib.util.cache_from_source(f)\n"
        "        import os\n"
        "        f = c if os.path.exists(c) else f\n"
        "    print(f)\n"
    )
    proc = subprocess.run([py, "-S", "-c", code], capture_output=True, text=True, check=False, env={"PATH": "/usr/bin:/bin"})
    return [os.path.realpath(p) for p in proc.stdout.splitlines() if p.startswith("/usr/")]


_PLAIN_NAME = re.compile(r"[A-Za-z0-9_./+@:-]+")  # names the guest's shell takes as they are


def boot_files(budget: int) -> list[str]:
    """Host files a Debian boot reads, in boot order, no repeats, cut at `budget` bytes."""
    ordered = _elf_closure(BOOT_PROGRAMS)
    for d in BOOT_CONFIG_DIRS:
        if os.path.isdir(d):
            ordered += sorted(os.path.join(d, n) for n in os.listdir(d))
    ordered += _python_modules()
    seen: set[str] = set()
    out, total = [], 0
    for p in ordered:
        if p in seen or not os.path.isfile(p) or os.path.islink(p) or not _PLAIN_NAME.fullmatch(p):
            continue
        seen.add(p)
        size = os.path.getsize(p)
        if size == 0 or total + size > budget:
            continue
        out.append(p)
        total += size
    return out


def filler_files(exclude: set[str], budget: int) -> list[str]:
    """More of the userland that a boot does not read, up to `budget` bytes."""
    out, total = [], 0
    for d in FILLER_DIRS:
        for root, dirs, names in os.walk(d):
            dirs.sort()
            for n in sorted(names):
                p = os.path.join(root, n)
                if p in exclude or os.path.islink(p) or not os.path.isfile(p):
                    continue
                size = os.path.getsize(p)
                if total + size > budget:
                    if total > budget - MIB:
                        return out
                    continue
                out.append(p)
                total += size
    return out


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(MIB):
            h.update(block)
    return h.hexdigest()


def build_userland(export: Path, kernel: Path, initrd: Path, read_mib: int, image_mib: int, work: Path, heavy_mib: int = 0) -> Userland:
    """The base image in `export`: the boot's files (kernel and initrd first), then filler, and the list.

    `heavy_mib`: a heavier boot (an application starting after it): that much more of /usr/lib is read too."""
    boot = [("boot/vmlinuz", str(kernel)), ("boot/initrd.img", str(initrd))]
    boot += [(p.lstrip("/"), p) for p in boot_files(read_mib * MIB - sum(os.path.getsize(s) for _, s in boot))]
    if heavy_mib:
        boot += [(p.lstrip("/"), p) for p in filler_files({s for _, s in boot}, heavy_mib * MIB) if _PLAIN_NAME.fullmatch(p)]
    read_bytes = sum(os.path.getsize(s) for _, s in boot)
    filler = [(p.lstrip("/"), p) for p in filler_files({s for _, s in boot}, max(0, image_mib * MIB - read_bytes))]
    staging = work / "userland"
    shutil.rmtree(staging, ignore_errors=True)
    for rel, src in boot + filler:
        dst = staging / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
    (staging / LIST_NAME).write_text("".join(rel + "\n" for rel, _ in boot))
    # The guest runs this, not `xargs`: busybox xargs mangled names at its buffer's edge on a 741-file list
    # (a name cut short, others passed twice), on a local disk too.
    names = [rel for rel, _ in boot]
    lines = [" ".join(names[i : i + SCRIPT_FILES]) for i in range(0, len(names), SCRIPT_FILES)]
    (staging / SCRIPT_NAME).write_text("".join(f'"$@" {line}\n' for line in lines))
    md5 = {rel: _md5(staging / rel) for rel, _ in boot}
    content = sum(os.path.getsize(staging / rel) for rel, _ in boot + filler)
    size_mib = content * 12 // 10 // MIB + 48
    base = export / BASE_NAME
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-E", "lazy_itable_init=0,lazy_journal_init=0", "-d", str(staging),
                    str(base), f"{size_mib}M"], check=True, capture_output=True)  # fmt: skip
    shutil.rmtree(staging, ignore_errors=True)
    return Userland(base, [rel for rel, _ in boot], md5, read_bytes, content)


# ---- guests ------------------------------------------------------------------------------------
_READ = (
    f"cd /mnt && read a b < /proc/uptime && sh {SCRIPT_NAME} cat > /dev/null && read c d < /proc/uptime"
    " && echo BS $a $c $(cat /sys/block/vda/stat)"
)


@dataclass
class GuestResult:
    read_s: float  # guest-visible time of the boot's reads
    guest_bytes: int  # what the guest read from its disk (sectors read x 512), since it started
    bad_files: list[str] = field(default_factory=list)  # md5 mismatches, or files it could not read


def make_overlays(mountpoint: str, names: list[str]) -> list[str]:
    """One qcow2 overlay per guest on the mount over the base image there (as libvirt does)."""
    paths = []
    for name in names:
        path = os.path.join(mountpoint, name)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", BASE_NAME, path],
                       check=True, capture_output=True, timeout=120)  # fmt: skip
        paths.append(path)
    return paths


def _boot_read(g: Any) -> tuple[float, int]:
    out = g.check(_READ, timeout=1800)
    fields = out[out.index("BS ") :].split()
    return float(fields[2]) - float(fields[1]), int(fields[3 + 2]) * 512


def _verify(g: Any, md5: dict[str, str]) -> list[str]:
    out = g.check(f"cd /mnt && sh {SCRIPT_NAME} md5sum", timeout=1800)
    seen = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2:
            seen[parts[1]] = parts[0]
    bad = [name for name, digest in md5.items() if seen.get(name) != digest]
    hashed = sum(1 for line in out.splitlines() if len(line.split()) == 2)
    return bad + ([f"({hashed} files hashed for {len(md5)} listed)"] if hashed != len(md5) else [])


def storm(build: Any, disks: list[str], work: Path, userland: Userland, after_reads: Callable[[], None] | None = None,
          memory_mib: int = 384, verify: bool = True) -> list[GuestResult]:  # fmt: skip
    """Boot one guest per disk at once, let them all read the boot's files at once, then check what they read.

    `after_reads` runs once every guest has read (before the untimed checksums): where the caller samples counters.
    """
    from tests.harness.tinyguest import Guest

    guests = [Guest(work / f"g{i}", build) for i in range(len(disks))]
    try:
        with concurrent.futures.ThreadPoolExecutor(len(guests)) as ex:
            list(ex.map(lambda gd: gd[0].start(gd[1], memory_mib=memory_mib, disk_format="qcow2", name=f"bs-{gd[2]}",
                                               boot_timeout=600), zip(guests, disks, range(len(disks)), strict=True)))  # fmt: skip
            reads = list(ex.map(_boot_read, guests))
            if after_reads is not None:
                after_reads()
            bad = list(ex.map(lambda g: _verify(g, userland.md5), guests)) if verify else [[] for _ in guests]
    finally:
        for g in guests:
            g.stop()
    return [GuestResult(t, b, x) for (t, b), x in zip(reads, bad, strict=True)]


# ---- counting what NFS served ------------------------------------------------------------------
def _rchar(pid: int) -> int:
    with open(f"/proc/{pid}/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


class Meter:
    """Bytes NFS served to some proxies (server to client, on the wire) and ganesha's file reads, between marks."""

    def __init__(self, proxies: list[Any], ganesha_pid: int) -> None:
        self.proxies = proxies
        self.ganesha_pid = ganesha_pid
        self.start: tuple[int, int] = (0, 0)
        self.end: tuple[int, int] = (0, 0)

    def sample(self) -> tuple[int, int]:
        return sum(p.counts()[0] for p in self.proxies), _rchar(self.ganesha_pid)

    def mark_start(self) -> None:
        self.start = self.sample()

    def mark_end(self) -> None:
        self.end = self.sample()

    @property
    def nfs_bytes(self) -> int:
        return self.end[0] - self.start[0]

    @property
    def ganesha_rchar(self) -> int:
        return self.end[1] - self.start[1]


def row(rtt: float, n: int, setup: str, meter: Meter, results: list[GuestResult], **extra: Any) -> dict[str, Any]:
    times = [r.read_s for r in results]
    return {
        "rtt_ms": rtt, "guests": n, "setup": setup, "nfs_bytes": meter.nfs_bytes, "ganesha_rchar": meter.ganesha_rchar,
        "guest_bytes": sum(r.guest_bytes for r in results), "read_s": times, "read_s_median": statistics.median(times),
        "read_s_max": max(times), "bad_files": sum(len(r.bad_files) for r in results),
        "bad_examples": [f for r in results for f in r.bad_files][:5], **extra,
    }  # fmt: skip


def wait_drained(mountpoint: str, timeout: float = 180.0) -> dict[str, Any] | None:
    """The daemon's stats once its admission queue is empty and its store stopped growing (or at the timeout)."""
    deadline = time.monotonic() + timeout
    last, stats = -1, None
    while time.monotonic() < deadline:
        stats = fusecache_stats(mountpoint)
        if stats is None:
            return None
        chunks = stats.get("store", {}).get("chunks", 0)
        if not stats.get("queue") and chunks == last:
            return stats
        last = chunks
        time.sleep(1.0)
    return stats


# ---- the setups --------------------------------------------------------------------------------
@dataclass
class Ctx:
    work: Path
    srv: Any  # NfsServer
    build: Any  # GuestBuild
    userland: Userland
    memory_mib: int
    verify: bool
    cache_size: str = "1G"
    rows: list[dict[str, Any]] = field(default_factory=list)

    def url(self, port: int) -> str:
        return f"nfs://127.0.0.1:{port}/export?version=4"


def _say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _report(r: dict[str, Any]) -> None:
    fetch = r.get("fetch")
    kinds = ""
    if fetch:
        kinds = (f"  (fetched: waited for {fetch['critical_bytes'] / MIB:.1f} MiB, background {fetch['background_bytes'] / MIB:.1f}, "
                 f"evicted from the fetch buffer {fetch.get('evicted_bytes', 0) / MIB:.1f})")  # fmt: skip
    ahead = r.get("peer_read_ahead")
    if ahead:
        kinds = (f"  (from peers {r.get('peer_bytes', 0) / MIB:.1f} MiB; chunks read ahead {ahead['peer_read_ahead_chunks']}, "
                 f"of them taken by a request {ahead['peer_read_ahead_used']})")  # fmt: skip
    _say(f"  {r['setup']:<28} NFS {r['nfs_bytes'] / MIB:8.1f} MiB  guests {r['guest_bytes'] / MIB:7.1f} MiB  "
         f"read median {r['read_s_median']:6.2f} s max {r['read_s_max']:6.2f} s  bad files {r['bad_files']}{kinds}")  # fmt: skip


def run_plain(ctx: Ctx, rtt: float, n: int, proxy: Any) -> dict[str, Any]:
    """`--no-cache` over nfs://: every guest read goes to NFS (the stand-in for a kernel NFS client)."""
    tag = f"plain-{rtt:g}-{n}"
    meter = Meter([proxy], ctx.srv.ganesha.pid)
    with fusecache_mount(ctx.url(proxy.ports[NFS_PORT]), str(ctx.work / f"mnt-{tag}"), ["--no-cache"], str(ctx.work / f"{tag}.log")) as mp:
        disks = make_overlays(mp, [f"ov-{tag}-{i}.qcow2" for i in range(n)])
        meter.mark_start()
        results = storm(ctx.build, disks, ctx.work / tag, ctx.userland, meter.mark_end, ctx.memory_mib, ctx.verify)
    r = row(rtt, n, "plain NFS (--no-cache)", meter, results)
    _report(r)
    return r


def run_cache(ctx: Ctx, rtt: float, n: int, proxy: Any, mode: str) -> list[dict[str, Any]]:
    """One host, a fresh cache: the cold storm, then the same guests again (restarted) on the warm cache."""
    tag = f"{mode}-{rtt:g}-{n}"
    opts = ["--cache-dir", str(ctx.work / f"cache-{tag}"), "--cache-size", ctx.cache_size]
    if mode == "inclusive":
        opts += ["--admit", "inclusive"]
    label = "fusecache" if mode == "second-chance" else "fusecache inclusive"
    out = []
    with fusecache_mount(ctx.url(proxy.ports[NFS_PORT]), str(ctx.work / f"mnt-{tag}"), opts, str(ctx.work / f"{tag}.log")) as mp:
        disks = make_overlays(mp, [f"ov-{tag}-{i}.qcow2" for i in range(n)])
        before: dict[str, Any] = (fusecache_stats(mp) or {}).get("fetch") or {}
        for phase in ("cold", "warm"):
            meter = Meter([proxy], ctx.srv.ganesha.pid)
            meter.mark_start()
            results = storm(ctx.build, disks, ctx.work / f"{tag}-{phase}", ctx.userland, meter.mark_end, ctx.memory_mib, ctx.verify)
            stats = wait_drained(mp)
            store = (stats or {}).get("store", {})
            # the miss path's reads this phase, by kind: what requests waited for, and the rest of their chunks and
            # readahead read in the background (fusecache/fetch.py)
            after: dict[str, Any] = (stats or {}).get("fetch") or {}
            kinds = ("critical_bytes", "background_bytes", "readahead_chunks", "evicted_bytes")
            fetch = {k: after.get(k, 0) - before.get(k, 0) for k in kinds}
            before = after
            r = row(rtt, n, f"{label} {phase}", meter, results, mode=mode, phase=phase, store_chunks=store.get("chunks"), fetch=fetch)
            _report(r)
            out.append(r)
    return out


def run_peers(ctx: Ctx, rtt: float, n: int, key_file: Path) -> dict[str, Any]:
    """Two hosts (netns), inclusive: A's guests boot, then B's; B's misses go to A first. The row is B's."""
    from bench.cluster import fc_stats, host_args
    from tests.harness.delay_proxy import DelayProxy
    from tests.harness.netns import Net

    tag = f"peers-{rtt:g}-{n}"
    one_way = rtt / 2
    with contextlib.ExitStack() as stack:
        net = stack.enter_context(Net(ctx.work / tag, 2))
        a, b = net.hosts
        pa = stack.enter_context(DelayProxy([NFS_PORT], one_way, netns=ctx.srv.netns, listen_netns=a.ns))
        pb = stack.enter_context(DelayProxy([NFS_PORT], one_way, netns=ctx.srv.netns, listen_netns=b.ns))
        ma = net.mount(a, ctx.url(pa.ports[NFS_PORT]), *host_args(a, ctx.work / f"cache-{tag}-a", str(key_file), [], "inclusive"))
        link = net.proxy(b, a, delay_ms=one_way)
        b_args = host_args(b, ctx.work / f"cache-{tag}-b", str(key_file), [link.address], "inclusive")
        mb = net.mount(b, ctx.url(pb.ports[NFS_PORT]), *b_args)
        for m in (ma, mb):
            _wait_reserve(m.log, 120)
        meter_a = Meter([pa], ctx.srv.ganesha.pid)
        meter_a.mark_start()
        ra = storm(ctx.build, make_overlays(ma.mountpoint, [f"ov-{tag}-a{i}.qcow2" for i in range(n)]), ctx.work / f"{tag}-a",
                   ctx.userland, meter_a.mark_end, ctx.memory_mib, ctx.verify)  # fmt: skip
        held = (wait_drained(ma.mountpoint) or {}).get("store", {}).get("chunks", 0)

        def knows() -> bool:
            p = fc_stats(mb.mountpoint)["peers"]["peers"].get(link.address, {})
            return bool(p.get("up")) and p.get("summary_locations", 0) >= held

        deadline = time.monotonic() + 120
        while not knows() and time.monotonic() < deadline:
            time.sleep(0.5)
        summary_known = knows()
        disks_b = make_overlays(mb.mountpoint, [f"ov-{tag}-b{i}.qcow2" for i in range(n)])
        start = fc_stats(mb.mountpoint)
        before, ahead_before = start["images"], start.get("fetch") or {}
        meter_b = Meter([pb], ctx.srv.ganesha.pid)
        meter_b.mark_start()
        rb = storm(ctx.build, disks_b, ctx.work / f"{tag}-b", ctx.userland, meter_b.mark_end, ctx.memory_mib, ctx.verify)
        end = fc_stats(mb.mountpoint)
        after, ahead_after = end["images"], end.get("fetch") or {}
        peer_bytes = sum(v.get("peer_bytes", 0) for v in after.values()) - sum(v.get("peer_bytes", 0) for v in before.values())
        # B's readahead from A: chunks fetched ahead of its guests' streams, and how many a request then took
        ahead = {k: ahead_after.get(k, 0) - ahead_before.get(k, 0) for k in ("peer_read_ahead_chunks", "peer_read_ahead_used")}
    r = row(rtt, n, "peers: host B after A (incl.)", meter_b, rb, peer_bytes=peer_bytes, host_a=row(rtt, n, "host A", meter_a, ra),
            a_summary_known=summary_known, peer_read_ahead=ahead)
    _report(r)
    return r


# ---- main --------------------------------------------------------------------------------------
def check_parts() -> None:
    if os.geteuid() != 0:
        raise Missing("bootstorm makes network namespaces and FUSE mounts: run it as root")
    for tool in ("qemu-system-x86_64", "qemu-img", "ganesha.nfsd", "rpcbind", "mkfs.ext4", "ip", "nsenter", "fusermount3", "ldd"):
        if shutil.which(tool) is None and not any(os.path.exists(os.path.join(d, tool)) for d in ("/usr/sbin", "/sbin")):
            raise Missing(f"{tool} is not installed (`make deps`)")
    if not os.path.exists("/dev/fuse"):
        raise Missing("no /dev/fuse: FUSE cannot mount here")
    if importlib.util.find_spec("fusecache.backing.nfs") is None:
        raise Missing("this fusecache has no nfs:// backing")


def measure_rtt(one_way_ms: float, samples: int = 300) -> float:
    """Median round trip (ms) of a 100-byte ping-pong through a delay proxy at `one_way_ms`, to a local echo."""
    import socket
    import threading

    from tests.harness.delay_proxy import DelayProxy

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]

    def echo() -> None:
        with contextlib.suppress(OSError):
            c, _ = srv.accept()
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while data := c.recv(4096):
                c.sendall(data)
            c.close()

    t = threading.Thread(target=echo, daemon=True)
    t.start()
    try:
        with DelayProxy([port], delay_ms=one_way_ms) as p, socket.create_connection(("127.0.0.1", p.ports[port])) as c:
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            out = []
            for _ in range(samples):
                t0 = time.perf_counter()
                c.sendall(bytes(100))
                got = 0
                while got < 100:
                    got += len(c.recv(4096))
                out.append(time.perf_counter() - t0)
        return 1000 * statistics.median(out)
    finally:
        srv.close()


@contextlib.contextmanager
def environment(work: Path, read_mib: int, image_mib: int, heavy_mib: int = 0) -> Iterator[tuple[Any, Any, Userland]]:
    """ganesha (own netns) with the base image in its export, and the guest build."""
    from tests.harness.nfs_server import NfsServer
    from tests.harness.tinyguest import GuestUnavailable, build_guest

    try:
        build = build_guest()
    except (GuestUnavailable, subprocess.CalledProcessError, OSError) as e:
        raise Missing(f"the tiny guest cannot be built here: {e}") from e
    with NfsServer(work / "nfs") as srv:
        userland = build_userland(srv.export_dir, build.kernel, build.initramfs, read_mib, image_mib, work, heavy_mib)
        yield srv, build, userland


def table(rows: list[dict[str, Any]]) -> None:
    out = []
    for r in rows:
        same = [p for p in rows if p["rtt_ms"] == r["rtt_ms"] and p["guests"] == r["guests"]]
        plain = next((p for p in same if p["setup"].startswith("plain")), None)
        t_ratio = f"{r['read_s_median'] / plain['read_s_median']:.2f}x" if plain else "-"
        b_ratio = f"{r['nfs_bytes'] / plain['nfs_bytes']:.2f}x" if plain and plain["nfs_bytes"] else "-"
        out.append([f"{r['rtt_ms']:g}", str(r["guests"]), r["setup"], f"{r['nfs_bytes'] / MIB:.1f}", f"{r['ganesha_rchar'] / MIB:.1f}",
                    f"{r['guest_bytes'] / MIB:.1f}", f"{r['read_s_median']:.2f}", f"{r['read_s_max']:.2f}", t_ratio, b_ratio,
                    "ok" if not r["bad_files"] else f"{r['bad_files']} BAD"])  # fmt: skip
    print_table(
        "boot storm: N TCG guests, qcow2 overlays over one base image on the mount, NFS behind a delay proxy "
        "(plain NFS = fusecache --no-cache over nfs://: this kernel has no NFS client)",
        ["RTT ms", "N", "setup", "NFS MiB (wire)", "ganesha rchar MiB", "guests read MiB", "read s median", "read s max",
         "time vs plain", "NFS bytes vs plain", "md5"],
        out,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="N = 1, 4; 0.2 ms only; a smaller userland (~6 min)")
    ap.add_argument("--rtt-ms", type=float, nargs="+", help="round trips to NFS (the proxy delays half each way)")
    ap.add_argument("--guests", type=int, nargs="+", help="N: guests per storm")
    ap.add_argument("--modes", nargs="+", choices=["second-chance", "inclusive"],
                    help="admission of the one-host rows (default: second-chance, the default mount; peers are inclusive)")
    ap.add_argument("--no-peers", action="store_true", help="skip the two-host rows")
    ap.add_argument("--read-mib", type=int, help="bytes a boot reads (the list is cut there)")
    ap.add_argument("--image-mib", type=int, help="userland in the base image")
    ap.add_argument("--heavy-mib", type=int, default=0,
                    help="read this much more of /usr/lib after the boot's files (a boot larger than the fetch buffer)")
    ap.add_argument("--memory-mib", type=int, default=384)
    ap.add_argument("--no-verify", action="store_true", help="skip the guests' md5sum of what they read")
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--out", help="results name under bench/results (default bootstorm, bootstorm-quick, bootstorm-heavy)")
    args = ap.parse_args(argv)
    rtts = args.rtt_ms or ([0.2] if args.quick else [0.2, 2.0])
    ns = args.guests or ([1, 4] if args.quick else [1, 4, 8])
    modes = args.modes or ["second-chance"]
    read_mib = args.read_mib or (32 if args.quick else 160)
    image_mib = args.image_mib or (96 if args.quick else 200)
    try:
        check_parts()
    except Missing as e:
        print(f"bootstorm: {e}", file=sys.stderr)
        return 2

    t_start = time.monotonic()
    result: dict[str, Any] = {"args": vars(args), "rtts_ms": rtts, "guests": ns, "modes": modes, "rows": []}
    with tempfile.TemporaryDirectory(prefix="fc-bootstorm-", dir=args.dir) as tmp:
        work = Path(tmp)
        try:
            with environment(work, read_mib, image_mib + args.heavy_mib, args.heavy_mib) as (srv, build, userland):
                from tests.harness.delay_proxy import DelayProxy

                result["userland"] = {
                    "read_bytes": userland.read_bytes, "files": len(userland.files),
                    "image_content_bytes": userland.image_bytes, "base_image_bytes": userland.base.stat().st_size,
                }  # fmt: skip
                _say(f"userland: a boot reads {len(userland.files)} files, {userland.read_bytes / MIB:.0f} MiB, of "
                     f"{userland.image_bytes / MIB:.0f} MiB in the image")  # fmt: skip
                result["measured_rtt_ms"] = {f"{rtt:g}": measure_rtt(rtt / 2) for rtt in [0.0, *rtts]}
                _say(f"proxy round trips measured (ms, echo, p50): {result['measured_rtt_ms']}")
                ctx = Ctx(work, srv, build, userland, args.memory_mib, not args.no_verify)
                key_file = work / "cluster.key"
                key_file.write_bytes(os.urandom(32))
                key_file.chmod(0o600)
                for rtt in rtts:
                    with DelayProxy([NFS_PORT], delay_ms=rtt / 2, netns=srv.netns) as proxy:
                        for n in ns:
                            _say(f"RTT {rtt:g} ms, N={n}")
                            result["rows"].append(run_plain(ctx, rtt, n, proxy))
                            for mode in modes:
                                result["rows"] += run_cache(ctx, rtt, n, proxy, mode)
                    if not args.no_peers:
                        for n in ns:
                            result["rows"].append(run_peers(ctx, rtt, n, key_file))
        except Missing as e:
            print(f"bootstorm: {e}", file=sys.stderr)
            return 2
        finally:
            assert_nothing_mounted_under(str(work))
    result["seconds"] = time.monotonic() - t_start
    table(result["rows"])
    name = "bootstorm-quick" if args.quick else "bootstorm"
    path = write_results(args.out or (f"{name}-heavy" if args.heavy_mib else name), result)
    bad = sum(r["bad_files"] for r in result["rows"])
    print(f"{'every guest read the right bytes' if not bad else f'{bad} FILES READ WRONG'}; {result['seconds'] / 60:.1f} min; wrote {path}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
