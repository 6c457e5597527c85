"""libnfs (ctypes) vs nfs-rs on one ganesha export, at 0 and 2 ms added round trip.

Owns the measurement behind the choice of NFS client library for
`fusecache/backing/nfs.py`: 4 KiB random reads (one at a time: latency) and
1 MiB sequential reads (one at a time: throughput) from a warm server, for
NFSv3 and NFSv4 (libnfs 4.0 speaks v4.0, nfs-rs v4.1), plus `NfsBacking`
itself (its pool of connections and split large reads, with and without the
split), and NfsBacking's 1 MiB sequential writes.

The server is tests/harness/nfs_server.py's ganesha in its own network namespace,
which this process joins. Three paths: straight to the server ("no proxy"),
through tests/harness/delay_proxy.py with no delay (its own cost), and through it
with 1 ms each way (+2 ms round trip: a server a real network away).

    .venv/bin/python -m bench.nfs_raw [--runs 3] [--file-mib 64]

Writes bench/results/nfs_raw.json and bench/results/nfs_raw.md.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import platform
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import nfs_rs

from fusecache.backing import libnfs
from fusecache.backing import nfs as fnfs
from tests.harness.delay_proxy import DelayProxy, join_netns
from tests.harness.nfs_server import MOUNT_PORT, NFS_PORT, NfsServer

HERE = Path(__file__).resolve().parent

KiB, MiB = 1024, 1024 * 1024
Reader = Callable[[int, int], bytes]


def _raw_libnfs() -> ctypes.CDLL:
    """libnfs 4.0 with the prototypes of the blocking calls this bench times.

    Its own handle: fusecache's binding (fusecache/backing/libnfs.py) declares
    only the async calls it uses. The blocking calls are safe here (one
    context, freed only after its calls succeeded), not in the daemon.
    """
    libnfs._nfs()  # the same library, loaded (or a one-line error) as fusecache does
    lib = ctypes.CDLL("libnfs.so.13")
    P, Int, U64, S = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint64, ctypes.c_char_p
    sigs = {
        "nfs_init_context": (P, []),
        "nfs_destroy_context": (None, [P]),
        "nfs_get_error": (S, [P]),
        "nfs_set_timeout": (None, [P, Int]),
        "nfs_parse_url_dir": (ctypes.POINTER(libnfs._Url), [P, S]),
        "nfs_destroy_url": (None, [ctypes.POINTER(libnfs._Url)]),
        "nfs_mount": (Int, [P, S, S]),
        "nfs_open": (Int, [P, S, Int, ctypes.POINTER(ctypes.c_void_p)]),
        "nfs_close": (Int, [P, P]),
        "nfs_pread": (Int, [P, P, U64, U64, P]),
    }
    for name, (res, args) in sigs.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    return lib


class LibnfsFile:
    """One libnfs context, one open file: the raw library, no pool."""

    def __init__(self, port: int, mount_port: int, version: int, name: str) -> None:
        self.lib = lib = _raw_libnfs()
        self.ctx = lib.nfs_init_context()
        lib.nfs_set_timeout(self.ctx, 10_000)
        url = lib.nfs_parse_url_dir(self.ctx, f"nfs://127.0.0.1/export?version={version}&nfsport={port}&mountport={mount_port}".encode())
        rc = lib.nfs_mount(self.ctx, url.contents.server, url.contents.path)
        lib.nfs_destroy_url(url)
        if rc < 0:
            raise OSError(-rc, lib.nfs_get_error(self.ctx).decode())
        self.fh = ctypes.c_void_p()
        rc = lib.nfs_open(self.ctx, f"/{name}".encode(), os.O_RDONLY, ctypes.byref(self.fh))
        if rc < 0:
            raise OSError(-rc, lib.nfs_get_error(self.ctx).decode())

    def pread(self, offset: int, size: int) -> bytes:
        # The same buffer handling as NfsBacking, so only the NFS side differs.
        buf = bytearray(size)
        n = self.lib.nfs_pread(self.ctx, self.fh, offset, size, (ctypes.c_char * size).from_buffer(buf))
        if n < 0:
            raise OSError(-n, "pread")
        return bytes(memoryview(buf)[:n])

    def close(self) -> None:
        self.lib.nfs_close(self.ctx, self.fh)
        self.lib.nfs_destroy_context(self.ctx)


class NfsRsFile:
    def __init__(self, port: int, mount_port: int, version: int, name: str) -> None:
        versions = ["3"] if version == 3 else ["4.1"]
        self.client = nfs_rs.Client.connect(
            "nfs://127.0.0.1/export", versions=versions, nfs_port=port, mount_port=mount_port, noresvport=True, operation_timeout=10
        )
        self.file = self.client.open(f"/{name}", "rb")

    def pread(self, offset: int, size: int) -> bytes:
        return self.file.read_at(offset, size)

    def close(self) -> None:
        self.file.close()
        self.client.close()


class BackingFile:
    """fusecache's NfsBacking: 8 connections, reads over 256 KiB split across them (unless split=False)."""

    def __init__(self, port: int, mount_port: int, version: int, name: str, split: bool = True) -> None:
        q = f"version={version}&mountport={mount_port}" if version == 3 else "version=4"
        self.backing = fnfs.NfsBacking.from_url(f"nfs://127.0.0.1:{port}/export?{q}")
        self.fh = self.backing.open(name, os.O_RDONLY)
        self.wfh = self.backing.create(f"{name}.written", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.split = split

    def pread(self, offset: int, size: int) -> bytes:
        if self.split:
            return self.backing.pread(self.fh, offset, size)
        buf = bytearray(size)
        n = self.backing._pread_into(self.fh, buf, 0, offset, size)
        return bytes(buf[:n])

    def pwrite(self, data: bytes, offset: int) -> int:
        return self.backing.pwrite(self.wfh, data, offset)

    def close(self) -> None:
        self.backing.close(self.fh)
        self.backing.close(self.wfh)
        self.backing.shutdown()


class UnsplitBackingFile(BackingFile):
    def __init__(self, port: int, mount_port: int, version: int, name: str) -> None:
        super().__init__(port, mount_port, version, name, split=False)


def random_4k(f: LibnfsFile | NfsRsFile | BackingFile, file_size: int, count: int) -> dict[str, float]:
    rnd = random.Random(1)
    offsets = [rnd.randrange(0, file_size // (4 * KiB)) * 4 * KiB for _ in range(count)]
    lat = []
    for off in offsets:
        t = time.perf_counter()
        if len(f.pread(off, 4 * KiB)) != 4 * KiB:
            raise RuntimeError("short read")
        lat.append(time.perf_counter() - t)
    return {"p50_us": statistics.median(lat) * 1e6, "iops": len(lat) / sum(lat)}


def sequential_1m(f: LibnfsFile | NfsRsFile | BackingFile, file_size: int) -> dict[str, float]:
    t = time.perf_counter()
    for off in range(0, file_size, MiB):
        if len(f.pread(off, MiB)) != MiB:
            raise RuntimeError("short read")
    return {"MBps": file_size / (time.perf_counter() - t) / 1e6}


def sequential_write_1m(f: BackingFile, size: int) -> dict[str, float]:
    block = random.randbytes(MiB)
    t = time.perf_counter()
    for off in range(0, size, MiB):
        if f.pwrite(block, off) != MiB:
            raise RuntimeError("short write")
    f.backing.fsync(f.wfh, False)
    return {"write_MBps": size / (time.perf_counter() - t) / 1e6}


def median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: round(statistics.median(r[k] for r in runs), 1) for k in runs[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--file-mib", type=int, default=64)
    args = ap.parse_args()
    file_size = args.file_mib * MiB
    results: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp, NfsServer(Path(tmp)) as server:
        (server.export_dir / "big").write_bytes(random.randbytes(file_size))
        # From here on this process (and every thread and proxy it starts)
        # lives in the server's namespace: the "none" row then measures the
        # libraries with no proxy in the way.
        join_netns(server.netns)
        for path in ("none", 0, 2):
            with contextlib.ExitStack() as stack:
                if path == "none":
                    port, mport = NFS_PORT, MOUNT_PORT
                else:
                    proxy = stack.enter_context(DelayProxy([NFS_PORT, MOUNT_PORT], delay_ms=path / 2))
                    port, mport = proxy.ports[NFS_PORT], proxy.ports[MOUNT_PORT]
                clients: list[tuple[str, type[LibnfsFile | NfsRsFile | BackingFile]]] = [
                    ("libnfs", LibnfsFile),
                    ("nfs-rs", NfsRsFile),
                    ("NfsBacking", BackingFile),
                    ("NfsBacking, no split", UnsplitBackingFile),
                ]
                for version in (3, 4):
                    for name, cls in clients:
                        f = cls(port, mport, version, "big")
                        try:
                            sequential_1m(f, file_size)  # warm the server's cache and the connection
                            count = 300 if path == 2 else 2000
                            rand = median_of([random_4k(f, file_size, count) for _ in range(args.runs)])
                            seq = median_of([sequential_1m(f, file_size) for _ in range(args.runs)])
                            if isinstance(f, BackingFile) and f.split:
                                # Writes only through NfsBacking: NFSv4 ones need its workarounds.
                                write_size = file_size if path != 2 else file_size // 4
                                seq |= median_of([sequential_write_1m(f, write_size) for _ in range(args.runs)])
                        finally:
                            f.close()
                        rtt = "no proxy" if path == "none" else f"proxy +{path} ms"
                        row = {"client": name, "nfs": f"v{version}", "path": rtt, **rand, **seq}
                        print(row, flush=True)
                        results.append(row)
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    meta = {"machine": platform.node(), "cpus": os.cpu_count(), "file_mib": args.file_mib, "runs": args.runs}
    (out / "nfs_raw.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    lines = [
        "| client | NFS | path (added round trip) | 4 KiB random p50 | 4 KiB random IOPS | 1 MiB sequential | 1 MiB sequential write |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        write = f"{r['write_MBps']:.0f} MB/s" if "write_MBps" in r else "-"
        lines.append(
            f"| {r['client']} | {r['nfs']} | {r['path']} | {r['p50_us']:.0f} µs | {r['iops']:.0f} | {r['MBps']:.0f} MB/s | {write} |"
        )
    table = "\n".join(lines)
    (out / "nfs_raw.md").write_text(f"# libnfs vs nfs-rs ({meta})\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()
