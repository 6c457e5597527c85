"""Hosts sharing caches: backing bytes saved, peer-hit latency vs an NFS read, and summary costs vs N.

Every host is a `fusecache mount` daemon in a network namespace of its own
(tests/harness/netns.py: a bridge, one veth per host, addresses only inside those
namespaces), all on one backing directory (the stand-in for the NFS export).

1. Backing bytes (N = 2..4): the hosts read the same images in turn, like
   guests booting from shared images, once with no peering and once as a full
   mesh; the bytes each host read from the backing, summed over the hosts.
2. Peer-hit latency, from the reading host's view, per 64 KiB chunk: O_DIRECT
   64 KiB reads through the mount of chunks a peer holds (the reader admits
   nothing, so every read is a peer hit), with the link between them behind
   the delay proxy (tests/harness/delay_proxy.py's delayed connection, `D` ms each
   way). Against, at the same `D`: (a) a plain TCP request/response of 64 KiB
   through the same proxy, between the same namespaces; (b) a real NFSv4 read:
   nfs-ganesha (tests/harness/nfs_server.py) behind a delay proxy, read through a
   `fusecache --no-cache` mount (so both sides pay the same FUSE path); the
   three take turns, 10 reads each, so all see the same load. And the floor,
   `--no-cache` on the local directory. With `--qemu-depth N`, also QEMU's own
   block layer (`qemu-img bench`, 64 KiB O_DIRECT) at depth 1 and N, peer vs NFS.
   And sequential streams (`--stream-mib`): 128 KiB O_DIRECT reads in order, peer
   vs NFS taking turns: what readahead (from peers, and the fetcher's from NFS) is for.
3. Summary size and lookup cost: Bloom bytes per GiB of cache (the server's
   own sizing: pages at capacity, locations at 2x chunks), and the
   candidate-selection cost of one fetch (`may_hold` over every peer, the
   work each local miss does) measured for 1..128 peers; then, on paper,
   memory, refresh traffic and false-positive asks of a full mesh vs N.

Prints tables and a headline line; writes bench/results/cluster.json.

    .venv/bin/python -m bench.cluster [--hosts 2 3 4] [--delays 0 1 2] [--no-nfs] [--qemu-depth 16]

Run as root (network namespaces, FUSE). Light on purpose: 2 shared cores.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from fusecache.peers.protocol import SUMMARY_LOCATIONS
from fusecache.peers.summary import BloomFilter, bytes_per_gib
from tests.harness.delay_proxy import DelayProxy
from tests.harness.netns import Host, LinkProxy, Net, unmount
from tests.harness.waiting import wait_for

ROOT = Path(__file__).resolve().parent.parent

MiB = 1 << 20
GiB = 1 << 30
CHUNK = 64 * 1024

_RAW_SERVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(4)
print("READY", flush=True)
body = bytes(65536)
while True:
    c, _ = s.accept()
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while True:
        req = b""
        while len(req) < 48:
            part = c.recv(48 - len(req))
            if not part:
                break
            req += part
        if len(req) < 48:
            break
        c.sendall(body)
    c.close()
"""

_RAW_CLIENT = """
import json, socket, sys, time
c = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
for line in sys.stdin:  # a count of request/responses to time; their seconds back as one JSON line
    out = []
    for i in range(int(line)):
        t = time.perf_counter()
        c.sendall(bytes(48))
        got = 0
        while got < 65536:
            got += len(c.recv(65536 - got))
        out.append(time.perf_counter() - t)
    print(json.dumps(out), flush=True)
"""
BLOCK = 10  # reads per turn when the peer hits and the plain TCP requests take turns


def fc_stats(mp: str) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "fusecache", "stats", mp, "--json"], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr)
    return json.loads(proc.stdout)


def read_file(path: str) -> int:
    n = 0
    with open(path, "rb") as f:
        while block := f.read(MiB):
            n += len(block)
    return n


def direct_reads(path: str, offsets: Iterable[int], size: int = CHUNK) -> list[float]:
    """Seconds per O_DIRECT read of `size` bytes (64 KiB) at each offset, one at a time."""
    buf = mmap.mmap(-1, size)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        out = []
        for off in offsets:
            t = time.perf_counter()
            n = os.preadv(fd, [buf], off)
            out.append(time.perf_counter() - t)
            assert n == size, n
        return out
    finally:
        os.close(fd)
        buf.close()


def stream_read(path: str, start: int, length: int, request: int = 128 << 10) -> float:
    """Seconds to read [start, start + length) in order, O_DIRECT, `request` bytes at a time (a guest's sequential
    reads): what readahead is for."""
    return sum(direct_reads(path, range(start, start + length, request), request))


def summarise(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    return {"n": len(s), "p50_ms": 1000 * s[len(s) // 2], "p90_ms": 1000 * s[int(len(s) * 0.9)], "mean_ms": 1000 * statistics.fmean(s)}


def host_args(host: Host, cache_dir: Path, key_file: str, peers: list[str], admit: str = "inclusive") -> list[str]:
    return ["--admit", admit, "--cache-dir", str(cache_dir), "--cache-size", "512M", "--cluster-key-file", key_file,
            "--listen", host.peer_address, "--peer-allow", host.addr.rsplit(".", 1)[0] + ".0/24",  # peers come through proxies too
            "--peer-timeout", "0.5", *[a for p in peers for a in ("--peer", p)]]  # fmt: skip


# ---- 1. backing bytes --------------------------------------------------------------
def backing_bytes(work: Path, images: Path, names: list[str], key_file: str, n: int, peering: bool) -> dict[str, Any]:
    with Net(work / f"bb-{n}-{int(peering)}", n) as net:
        mps = []
        for i, h in enumerate(net.hosts):
            peers = [o.peer_address for o in net.hosts if o is not h] if peering else []
            args = host_args(h, work / f"bb-cache-{n}-{int(peering)}-{i}", key_file, peers)
            if not peering:
                args = args[: args.index("--cluster-key-file")]
            mps.append(net.mount(h, str(images), *args).mountpoint)
        total_chunks = sum(-(-os.path.getsize(images / name) // CHUNK) for name in names)
        t0 = time.monotonic()
        waited = 0.0
        for i, mp in enumerate(mps):
            if peering and i > 0:
                # "in turn": the next guest boots once the previous host's summary is out
                w = time.monotonic()
                wait_for(lambda mp=mp: any(p["up"] and p["summary_locations"] >= total_chunks
                                           for p in fc_stats(mp)["peers"]["peers"].values()), "a peer's summary", 30)  # fmt: skip
                waited += time.monotonic() - w
            for name in names:
                read_file(os.path.join(mp, name))
        elapsed = time.monotonic() - t0
        per_host = []
        for mp in mps:
            imgs = fc_stats(mp)["images"]
            per_host.append({k: sum(v[k] for v in imgs.values()) for k in ("backing_bytes", "peer_bytes", "hit_bytes")})
    return {
        "hosts": n, "peering": peering, "per_host": per_host,
        "backing_bytes": sum(h["backing_bytes"] for h in per_host), "peer_bytes": sum(h["peer_bytes"] for h in per_host),
        "seconds": elapsed, "summary_wait_s": waited,
    }  # fmt: skip


# ---- 2. latency ----------------------------------------------------------------------
def latency(work: Path, images: Path, name: str, key_file: str, delays: list[float], reads: int, nfs: bool,
            qemu_depth: int = 0, stream_mib: int = 0) -> dict[str, Any]:  # fmt: skip
    size = os.path.getsize(images / name)
    rng = random.Random(1)
    offsets = [rng.randrange(size // CHUNK) * CHUNK for _ in range(reads)]
    out: dict[str, Any] = {"reads": reads, "delays_ms": delays, "rows": []}
    with Net(work / "lat", 2) as net:
        a, b = net.hosts
        ma = net.mount(a, str(images), *host_args(a, work / "lat-cache-a", key_file, []))
        read_file(os.path.join(ma.mountpoint, name))  # a holds every chunk
        raw_server = subprocess.Popen(["nsenter", f"--net=/run/netns/{a.ns}", sys.executable, "-c", _RAW_SERVER, a.addr, "7071"],
                                      stdout=subprocess.PIPE, text=True)  # fmt: skip
        try:
            assert raw_server.stdout and raw_server.stdout.readline().strip() == "READY"
            passthrough = net.mount(b, str(images), "--no-cache")
            local = summarise(direct_reads(os.path.join(passthrough.mountpoint, name), offsets))
            unmount(passthrough)
            net.mounts.remove(passthrough)
            out["local_passthrough"] = local
            for d in delays:
                link = net.proxy(b, a, delay_ms=d)
                # second-chance with no balloon admits nothing: every read of b is a peer hit
                mb = net.mount(b, str(images), *host_args(b, work / f"lat-cache-b-{d}", key_file, [link.address], "second-chance"))
                def knows(mp: str = mb.mountpoint, addr: str = link.address) -> bool:
                    return fc_stats(mp)["peers"]["peers"][addr]["summary_locations"] >= size // CHUNK

                wait_for(knows, "a's summary at b")
                raw_link = LinkProxy(b.ns, f"{a.addr}:7071", delay_ms=d)
                net.proxies.append(raw_link)
                raw_client = _RawClient(b, raw_link.port)
                path = os.path.join(mb.mountpoint, name)
                direct_reads(path, offsets[:10])  # warm the connection
                raw_client.reads(5)
                before = fc_stats(mb.mountpoint)["images"][name]
                # Taking turns, BLOCK reads each: the machine's load drifts, and all see the same drift.
                samples: dict[str, list[float]] = {"peer": [], "tcp": [], "nfs": []}
                try:
                    with contextlib.ExitStack() as stack:
                        nfs_path = None
                        if nfs and "nfs_error" not in out:
                            try:
                                nfs_path = stack.enter_context(_nfs_reader(work, images, name, d))
                                direct_reads(nfs_path, offsets[:10])
                            except Exception as e:  # report, do not fail the other results
                                out["nfs_error"] = f"{type(e).__name__}: {e}"
                        for i in range(0, reads, BLOCK):
                            samples["peer"] += direct_reads(path, offsets[i : i + BLOCK])
                            samples["tcp"] += raw_client.reads(len(offsets[i : i + BLOCK]))
                            if nfs_path is not None:
                                samples["nfs"] += direct_reads(nfs_path, offsets[i : i + BLOCK])
                        qemu = _qemu_depths(path, nfs_path, qemu_depth, reads) if qemu_depth else None
                        # Sequential streams: 128 KiB reads in order over `stream_mib`, peer and NFS taking turns, two
                        # regions 2 x stream_mib apart (b admits nothing: each pass is read from a again)
                        stream: dict[str, Any] | None = None
                        if stream_mib:
                            length = stream_mib * MiB
                            stream = {"bytes": length, "peer_s": [], "nfs_s": []}
                            for k in range(2):
                                at = (2 * k * length) % max(size - length, 1) // MiB * MiB
                                stream["peer_s"].append(stream_read(path, at, length))
                                if nfs_path is not None:
                                    stream["nfs_s"].append(stream_read(nfs_path, at, length))
                finally:
                    raw_client.close()
                peer = summarise(samples["peer"])
                raw = summarise(samples["tcp"])
                after = fc_stats(mb.mountpoint)["images"][name]
                peer["peer_bytes"] = after["peer_bytes"] - before["peer_bytes"]
                peer["backing_bytes"] = after["backing_bytes"] - before["backing_bytes"]
                peer["rtt_ms"] = fc_stats(mb.mountpoint)["peers"]["peers"][link.address]["rtt_ms"]
                unmount(mb)
                net.mounts.remove(mb)
                row = {"delay_ms": d, "peer_hit": peer, "tcp_64k": raw, "nfs_64k": summarise(samples["nfs"]) if samples["nfs"] else None,
                       "qemu_img_bench": qemu, "stream": stream}  # fmt: skip
                out["rows"].append(row)
        finally:
            raw_server.terminate()
            raw_server.wait(5)
    return out


def _qemu_depths(peer_path: str, nfs_path: str | None, depth: int, count: int) -> list[dict[str, Any]]:
    """Peer hits through QEMU's own block layer: `qemu-img bench` (64 KiB reads, O_DIRECT) at depth 1 and
    `depth`, the peer mount and the NFS mount taking turns, 2 rounds each; seconds per run."""
    def run(path: str, d: int) -> float:
        proc = subprocess.run(["qemu-img", "bench", "-f", "raw", "-t", "none", "-n", "-d", str(d), "-s", str(CHUNK), "-S", str(CHUNK),
                               "-c", str(count), path], capture_output=True, text=True, timeout=600, check=True)  # fmt: skip
        return float(proc.stdout.split("Run completed in ")[1].split()[0])

    out = []
    for d in (1, depth):
        times: dict[str, list[float]] = {"peer": [], "nfs": []}
        for _ in range(2):
            times["peer"].append(run(peer_path, d))
            if nfs_path is not None:
                times["nfs"].append(run(nfs_path, d))
        out.append({"depth": d, "reads": count, **{f"{k}_s": v for k, v in times.items() if v}})
    return out


class _RawClient:
    """A plain TCP client in `b`'s namespace, connected through the proxy on its port `port`."""

    def __init__(self, b: Host, port: int) -> None:
        self.proc = subprocess.Popen(["nsenter", f"--net=/run/netns/{b.ns}", sys.executable, "-c", _RAW_CLIENT, str(port)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip

    def reads(self, n: int) -> list[float]:
        """Seconds per 64 KiB request/response, `n` of them one at a time."""
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(f"{n}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the raw TCP client exited ({self.proc.wait()})")
        return json.loads(line)

    def close(self) -> None:
        assert self.proc.stdin
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@contextlib.contextmanager
def _nfs_reader(work: Path, images: Path, name: str, d: float) -> Iterator[str]:
    """`name` on nfs-ganesha (tests/harness/nfs_server.py) behind a delay proxy of `d` ms each way,
    read through a `fusecache --no-cache` mount: yields the file's path on that mount.

    Up only while one delay's reads take turns: ganesha's rpcbind runs in an
    `unshare --mount` namespace, which holds a copy of every FUSE mount on the
    machine while it lives (ours come down after it stops).
    """
    from tests.harness.nfs_server import NfsServer
    from tests.mounting import force_unmount

    with NfsServer(work / f"nfs-{d}") as srv:
        (srv.export_dir / name).write_bytes((images / name).read_bytes())
        with DelayProxy([srv.nfs_port], delay_ms=d) as slow:
            url = f"nfs://127.0.0.1:{slow.ports[srv.nfs_port]}/export?version=4"
            mp = work / f"nfs-mnt-{d}"
            mp.mkdir(exist_ok=True)
            proc = subprocess.run([sys.executable, "-m", "fusecache", "mount", url, str(mp), "--no-cache",
                                   "--log-file", str(work / f"nfs-{d}.log")], capture_output=True, text=True, timeout=120)  # fmt: skip
            if proc.returncode != 0:
                raise RuntimeError(proc.stderr.strip())
            pid = int(proc.stderr.split("daemon pid ")[1].split()[0].rstrip(","))
            try:
                yield os.path.join(mp, name)
            finally:
                subprocess.run(["fusermount3", "-u", str(mp)], capture_output=True, check=False)
                force_unmount(str(mp), pid)


# ---- 3. summaries --------------------------------------------------------------------
def summaries(peer_counts: list[int]) -> dict[str, Any]:
    pages_per_gib, locations_per_gib = bytes_per_gib()
    per_gib = pages_per_gib + 2 * locations_per_gib  # the server sizes locations at 2x chunks
    keys = 100_000
    bloom = BloomFilter.for_capacity(keys)
    rng = random.Random(2)
    for _ in range(keys):
        bloom.add(rng.randbytes(48))
    misses = [rng.randbytes(48) for _ in range(2000)]

    class _Fake:
        """Stands in for a connected peer in `PeerSet._fetch`'s candidate selection."""

        def __init__(self) -> None:
            self.summaries = {SUMMARY_LOCATIONS: bloom}
            self.queue = object()
            self.rtt = 0.001

        def may_hold(self, kind: int, key: bytes) -> bool:
            b = self.summaries.get(kind)
            return self.queue is not None and b is not None and key in b

    lookups = []
    for n in peer_counts:
        peers = [_Fake() for _ in range(n)]
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            for key in misses:
                sorted((p for p in peers if p.may_hold(SUMMARY_LOCATIONS, key)), key=lambda p: p.rtt or 0.0)
            best = min(best, (time.perf_counter() - t) / len(misses))
        fp = sum(key in bloom for key in misses) / len(misses)
        lookups.append({"peers": n, "us_per_miss": best * 1e6, "false_positive": fp})
    return {"bytes_per_gib": per_gib, "pages_bytes_per_gib": pages_per_gib, "locations_bytes_per_gib": 2 * locations_per_gib,
            "lookup": lookups}  # fmt: skip


def on_paper(per_gib: int, us_per_peer: float, cache_gib: int = 64, interval_s: float = 60.0) -> list[dict[str, float]]:
    """Full-mesh costs per host vs N, for `cache_gib` per host and a summary every `interval_s`."""
    rows = []
    for n in (4, 16, 32, 64, 128, 256, 1024):
        summary = per_gib * cache_gib
        rows.append({
            "hosts": n,
            "summary_mb": summary / 1e6,
            "held_mb": (n - 1) * summary / 1e6,  # every other host's summary, in memory
            "held_pct_of_cache": 100 * (n - 1) * summary / (cache_gib * GiB),
            "refresh_in_mb_s": (n - 1) * summary / interval_s / 1e6,  # and as much out
            "lookup_us_per_miss": n * us_per_peer,
            "false_asks_per_miss": (n - 1) * 0.01,
            "p_miss_pays_an_rtt": 1 - 0.99 ** (n - 1),
        })  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hosts", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--images", type=int, default=2, help="shared images every host reads")
    ap.add_argument("--image-mib", type=int, default=32)
    ap.add_argument("--delays", type=float, nargs="+", default=[0.0, 1.0, 2.0], help="one-way ms (sub-ms honoured)")
    ap.add_argument("--reads", type=int, default=200, help="64 KiB reads per latency sample")
    ap.add_argument("--no-nfs", action="store_true", help="skip the ganesha NFS baseline")
    ap.add_argument("--qemu-depth", type=int, default=0, help="also time qemu-img bench at depth 1 and this depth (peer vs NFS)")
    ap.add_argument("--stream-mib", type=int, default=8, help="also time sequential 128 KiB reads of this much, peer vs NFS (0: skip)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "cluster.json"))
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        sys.exit("cluster.py makes network namespaces and FUSE mounts: run it as root")

    result: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version()},
                              "args": vars(args)}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="fc-cluster-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        images = work / "images"
        images.mkdir()
        names = [f"img{i}.raw" for i in range(args.images)]
        for name in names:
            (images / name).write_bytes(os.urandom(args.image_mib * MiB))
        key_file = work / "cluster.key"
        key_file.write_bytes(os.urandom(32))
        key_file.chmod(0o600)

        print(f"== 1. backing bytes: {args.images} images x {args.image_mib} MiB read by every host in turn")
        print(f"{'hosts':>5} {'peering':>8} {'backing MiB':>12} {'peer MiB':>9} {'saved':>7} {'s':>6}")
        result["backing"] = []
        for n in args.hosts:
            for peering in (False, True):
                r = backing_bytes(work, images, names, str(key_file), n, peering)
                result["backing"].append(r)
                base = next(x["backing_bytes"] for x in result["backing"] if x["hosts"] == n and not x["peering"])
                print(f"{n:>5} {peering!s:>8} {r['backing_bytes'] / MiB:>12.0f} {r['peer_bytes'] / MiB:>9.0f} "
                      f"{base / max(r['backing_bytes'], 1):>6.2f}x {r['seconds']:>6.1f}")  # fmt: skip

        print(f"\n== 2. per 64 KiB chunk, O_DIRECT, one at a time, {args.reads} reads (ms)")
        lat = latency(work, images, names[0], str(key_file), args.delays, args.reads, not args.no_nfs, args.qemu_depth, args.stream_mib)
        result["latency"] = lat
        lp = lat["local_passthrough"]
        print(f"local --no-cache passthrough (floor): p50 {lp['p50_ms']:.3f} p90 {lp['p90_ms']:.3f}")
        print(f"{'one-way':>7} {'peer hit p50/p90':>17} {'tcp 64K p50/p90':>16} {'nfs 64K p50/p90':>16} {'peer/nfs':>9} {'peer/tcp':>9}")
        for row in lat["rows"]:
            p, t, nf = row["peer_hit"], row["tcp_64k"], row.get("nfs_64k")
            nfs_txt = f"{nf['p50_ms']:.2f}/{nf['p90_ms']:.2f}" if nf else "-"
            ratio = f"{p['p50_ms'] / nf['p50_ms']:.2f}" if nf else "-"
            print(f"{row['delay_ms']:>5.1f}ms {p['p50_ms']:>8.2f}/{p['p90_ms']:<8.2f} {t['p50_ms']:>7.2f}/{t['p90_ms']:<8.2f} "
                  f"{nfs_txt:>16} {ratio:>9} {p['p50_ms'] / t['p50_ms']:>9.2f}")  # fmt: skip
            if p["backing_bytes"]:
                print(f"   (warning: {p['backing_bytes']} bytes of the peer-hit sample came from the backing)")
        if "nfs_error" in lat:
            print(f"nfs baseline failed: {lat['nfs_error']}")
        if args.stream_mib:
            print(f"\nsequential 128 KiB O_DIRECT reads of {args.stream_mib} MiB, two passes each, peer and NFS taking turns (MB/s)")
            for row in lat["rows"]:
                st = row["stream"]
                rates = {k: [st["bytes"] / t / 1e6 for t in st[f"{k}_s"]] for k in ("peer", "nfs")}
                ratio = f"peer/nfs time {sum(st['peer_s']) / sum(st['nfs_s']):.2f}x" if st["nfs_s"] else ""
                txt = "  ".join(f"{k} {'/'.join(f'{r:.0f}' for r in v)}" for k, v in rates.items() if v)
                print(f"{row['delay_ms']:>5.1f}ms: {txt}  {ratio}")
        if args.qemu_depth:
            print(f"\nqemu-img bench, 64 KiB O_DIRECT reads, {args.reads} per run, 2 runs each, peer and NFS taking turns (reads/s)")
            for row in lat["rows"]:
                for q in row["qemu_img_bench"] or []:
                    rate = {k: [q["reads"] / t for t in q.get(f"{k}_s", [])] for k in ("peer", "nfs")}
                    txt = "  ".join(f"{k} {'/'.join(f'{r:.0f}' for r in v)}" for k, v in rate.items() if v)
                    print(f"{row['delay_ms']:>5.1f}ms depth {q['depth']:>2}: {txt}")
        # At the same round trip a peer hit and an NFS read are both one round trip; a peer
        # pays off when it is nearer (same rack) than the filer: peer at d1 vs NFS at d2.
        ref_key = "nfs_64k" if all(r.get("nfs_64k") for r in lat["rows"]) else "tcp_64k"
        cross = {f"{p['delay_ms']:g}": {f"{q['delay_ms']:g}": p["peer_hit"]["p50_ms"] / q[ref_key]["p50_ms"] for q in lat["rows"]}
                 for p in lat["rows"]}  # fmt: skip
        lat["cross_ratio"] = {"reference": ref_key, "peer_delay_vs_reference_delay": cross}
        print(f"\npeer hit p50 / {ref_key} p50, peer link one-way (rows) vs reference one-way (columns):")
        print("        " + "".join(f"{c + ' ms':>9}" for c in cross[next(iter(cross))]))
        for d, cols in cross.items():
            print(f"{d + ' ms':>8}" + "".join(f"{v:>9.2f}" for v in cols.values()))

    print("\n== 3. summaries")
    s = summaries([1, 2, 4, 8, 16, 32, 64, 128])
    result["summaries"] = s
    print(f"Bloom summary per GiB of cache: {s['bytes_per_gib'] / 1e3:.0f} kB (pages {s['pages_bytes_per_gib'] / 1e3:.0f} kB"
          f" + locations at 2x chunks {s['locations_bytes_per_gib'] / 1e3:.0f} kB)")  # fmt: skip
    print(f"{'peers':>6} {'µs per miss':>12} {'µs per peer':>12} {'fp':>6}")
    for r in s["lookup"]:
        print(f"{r['peers']:>6} {r['us_per_miss']:>12.2f} {r['us_per_miss'] / r['peers']:>12.2f} {r['false_positive']:>6.3f}")
    big = s["lookup"][-1]
    us_per_peer = big["us_per_miss"] / big["peers"]
    paper = on_paper(s["bytes_per_gib"], us_per_peer)
    result["on_paper"] = {"cache_gib": 64, "interval_s": 60, "rows": paper}
    print("\non paper, full mesh, 64 GiB cache per host, summaries every 60 s:")
    print(f"{'hosts':>6} {'summary MB':>11} {'held MB':>8} {'% of cache':>11} {'in MB/s':>8} {'lookup µs':>10} {'P(miss pays RTT)':>17}")
    for r in paper:
        print(f"{r['hosts']:>6} {r['summary_mb']:>11.1f} {r['held_mb']:>8.0f} {r['held_pct_of_cache']:>11.2f} "
              f"{r['refresh_in_mb_s']:>8.2f} {r['lookup_us_per_miss']:>10.1f} {r['p_miss_pays_an_rtt']:>17.2f}")  # fmt: skip

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    nmax = max(args.hosts)
    b0 = next(x for x in result["backing"] if x["hosts"] == nmax and not x["peering"])["backing_bytes"]
    b1 = next(x for x in result["backing"] if x["hosts"] == nmax and x["peering"])["backing_bytes"]
    row = next((r for r in lat["rows"] if r["delay_ms"] == 1.0), lat["rows"][-1])
    ref = row.get("nfs_64k") or row["tcp_64k"]
    ref_name = "NFS" if row.get("nfs_64k") else "TCP"
    near = lat["rows"][0]
    near_ratio = near["peer_hit"]["p50_ms"] / ref["p50_ms"]
    print(f"\nHEADLINE cluster: {nmax} hosts read {b0 / MiB:.0f} MiB from the backing alone, {b1 / MiB:.0f} MiB with peers "
          f"({b0 / max(b1, 1):.1f}x less); peer hit p50 {row['peer_hit']['p50_ms']:.2f} ms vs {ref_name} 64 KiB read "
          f"{ref['p50_ms']:.2f} ms at {row['delay_ms']:g} ms one way ({row['peer_hit']['p50_ms'] / ref['p50_ms']:.2f}x; goal < 0.5x), "
          f"a peer {near['delay_ms']:g} ms away {near['peer_hit']['p50_ms']:.2f} ms ({near_ratio:.2f}x); "
          f"summaries {s['bytes_per_gib'] / 1e3:.0f} kB/GiB, {us_per_peer:.2f} µs per peer per miss")  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
