"""The cold 4 KiB row over NFS taken apart: NFS read directly, the floor of any pyfuse3 filesystem over NFS, and fusecache.

Owns the decomposition of issue 13's "cold 4 KiB random / NFS read directly"
row. One nfs-ganesha (tests/harness/nfs_server.py, in a network namespace of
its own, NFSv3) exports a file of random bytes, warm in the server's page
cache; for each added round trip a tests/harness/delay_proxy.py process sits
in front of it, and every reader below goes through that proxy. In each
repeat, in this order, each reads 4 KiB at random offsets, one at a time:

- direct: `fusecache.backing.nfs.NfsBacking` in this process (libnfs, the code
  the daemon reads NFS with), `--reads` distinct offsets;
- floor: `bench/memfs.py --nfs --fusecache-loop`, a pyfuse3 filesystem whose
  read handler is one blocking libnfs read of the same file, made inline, its
  requests taken as the daemon takes them (fusecache/fuse_loop.py): the FUSE
  hop and nothing else, what any pyfuse3 filesystem reading NFS adds at least
  (until 2026-12-04 stock pyfuse3's loop: slower);
- no-cache: `fusecache mount URL --no-cache`;
- default: `fusecache mount URL` (second-chance admission), a fresh mount with
  an empty cache in every repeat, so every read is a cold miss.

The three FUSE setups are read by fio (psync, O_DIRECT as QEMU's cache=none,
1 job, `--reads` distinct offsets: fio's random map with its fixed seed, the
same in every repeat and setup). Figures are medians over the repeats of each
run's p50; ratios are of those medians, all from this one run:

- floor / direct: the FUSE hop's share, no code of ours in it;
- no-cache / floor: fusecache's daemon reading NFS (the loop, libnfs's async
  API) against one blocking read inline;
- default / no-cache: the cache's own miss path (look-ups, the fetch buffer,
  admission's bookkeeping);
- default / direct: the issue's row (goal <= 1.1x at LAN distance).

Also each FUSE setup's server CPU per request (every thread of the process
serving the mount, /proc/PID/task/*/schedstat), and each proxy's GETATTR p50
(one RPC on an open file: what the round trip really is, server and libnfs
included).

    .venv/bin/python -m bench.nfs_floor [--rtts 0 0.5 2] [--repeats 3] [--reads 500] [--size-mib 64] [--dir /var/tmp]

Prints a table; writes bench/results/nfs_floor.json. Must run as root
(network namespaces). Whatever happens, mounts come down, the proxies and the
server stop (by PID) and the namespace goes.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from typing import Any

from bench.common import (
    MIB,
    MountUnavailable,
    fusecache_mount,
    memfs_mount,
    print_table,
    run_fio_served,
    write_results,
)
from bench.nfs import IMAGE, nfs_getattr_rtt, nfs_random_4k, progress, served_image
from fusecache.backing.nfs import NfsBacking
from tests.harness.delay_proxy import DelayProxy
from tests.harness.nfs_server import EXPORT, MOUNT_PORT, NFS_PORT, NfsServer

KIB = 1024
SETUPS = ("direct", "floor", "no-cache", "default")
RATIOS = (("floor", "direct"), ("no-cache", "floor"), ("default", "no-cache"), ("default", "direct"))


def fio_4k(mountpoint: str, reads: int) -> dict[str, float]:
    """`reads` 4 KiB O_DIRECT reads at random offsets, one at a time: p50, p99, IOPS and the server's CPU per read."""
    result = run_fio_served(mountpoint, os.path.join(mountpoint, IMAGE), "randread", "4k", io_size=reads * 4 * KIB)
    return {"p50_us": result.p50_us, "p99_us": result.p99_us, "iops": result.iops, "server_cpu_us": result.server_cpu_us}


def measure(work: str, server: NfsServer, rtt_ms: float, size: int, reads: int, repeats: int) -> dict[str, Any]:
    """Every setup, `repeats` times in turn, behind a proxy adding `rtt_ms`."""
    runs: dict[str, list[dict[str, float]]] = {s: [] for s in SETUPS}
    with contextlib.ExitStack() as stack:
        proxy = stack.enter_context(DelayProxy([NFS_PORT, MOUNT_PORT], delay_ms=rtt_ms / 2, netns=server.netns))
        url = f"nfs://127.0.0.1:{proxy.ports[NFS_PORT]}{EXPORT}?version=3&mountport={proxy.ports[MOUNT_PORT]}"
        backing = NfsBacking.from_url(url)
        stack.callback(backing.shutdown)
        nfs_random_4k(backing, size, min(50, reads))  # connections up, server cache warm
        getattr_us = nfs_getattr_rtt(backing)
        for i in range(repeats):
            where = f"+{rtt_ms:g} ms, repeat {i + 1}"
            progress(f"{where}: direct")
            runs["direct"].append(nfs_random_4k(backing, size, reads))
            progress(f"{where}: floor (memfs --nfs)")
            with memfs_mount(IMAGE, os.path.join(work, f"floor-{rtt_ms:g}-{i}"), nfs=url, fusecache_loop=True) as mp:
                runs["floor"].append(fio_4k(mp, reads))
            for setup, options in (("no-cache", ["--no-cache"]), ("default", [])):
                progress(f"{where}: fusecache {setup}")
                name = f"{setup}-{rtt_ms:g}-{i}"
                cache = ["--cache-dir", os.path.join(work, f"cache-{name}"), "--cache-size", "1G"]
                with fusecache_mount(url, os.path.join(work, f"mnt-{name}"), [*cache, *options], os.path.join(work, f"{name}.log")) as mp:
                    runs[setup].append(fio_4k(mp, reads))
    p50 = {s: statistics.median(r["p50_us"] for r in runs[s]) for s in SETUPS}
    cpu = {s: statistics.median(r["server_cpu_us"] for r in runs[s]) for s in SETUPS if s != "direct"}
    return {
        "rtt_ms": rtt_ms,
        "getattr_p50_us": getattr_us,
        "p50_us": p50,
        "server_cpu_us": cpu,
        "ratios": {f"{a} / {b}": p50[a] / p50[b] for a, b in RATIOS},
        "runs": runs,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--rtts", type=float, nargs="+", default=[0.0, 0.5, 2.0], help="added round trips, ms (default 0 0.5 2)")
    p.add_argument("--repeats", type=int, default=3, help="turns of every setup per round trip; medians are kept (default 3)")
    p.add_argument("--reads", type=int, default=500, help="4 KiB reads per setup and turn (default 500)")
    p.add_argument("--size-mib", type=int, default=64, help="size of the file read (default 64)")
    p.add_argument("--dir", default="/var/tmp", help="where the export, caches and mountpoints go: not tmpfs (default /var/tmp)")
    args = p.parse_args()
    if os.geteuid() != 0:
        print("bench/nfs_floor.py needs root: the NFS server runs in a network namespace of its own", file=sys.stderr)
        return 2
    if args.reads * 4 * KIB > args.size_mib * MIB:
        print(f"bench/nfs_floor.py: --reads {args.reads} distinct 4 KiB reads do not fit in --size-mib {args.size_mib}", file=sys.stderr)
        return 2
    size = args.size_mib * MIB
    results: list[dict[str, Any]] = []
    try:
        with served_image(args.size_mib, args.dir, "fusecache-bench-nfs-floor-") as (work, server):
            for rtt in args.rtts:
                t = time.monotonic()
                results.append(measure(work, server, rtt, size, args.reads, args.repeats))
                progress(f"+{rtt:g} ms measured in {time.monotonic() - t:.0f} s")
    except (MountUnavailable, RuntimeError) as exc:  # no ganesha, a mount that failed, fio failing: one line
        print(f"bench/nfs_floor.py: {exc}", file=sys.stderr)
        return 1

    rows = []
    for r in results:
        p50, cpu, ratio = r["p50_us"], r["server_cpu_us"], r["ratios"]
        rows.append([
            f"+{r['rtt_ms']:g} ms (GETATTR {r['getattr_p50_us'] / 1e3:.2f} ms)",
            *(f"{p50[s]:,.0f}" + (f" ({cpu[s]:.0f})" if s in cpu else "") for s in SETUPS),
            *(f"{ratio[f'{a} / {b}']:.2f}x" for a, b in RATIOS),
        ])  # fmt: skip
    print_table(
        f"cold 4 KiB random reads over NFSv3 (ganesha), one at a time, {args.reads} per turn: p50 µs, median of {args.repeats} "
        "turns (server CPU µs per read)",
        ["added round trip", *SETUPS, *(f"{a} / {b}" for a, b in RATIOS)],
        rows,
    )
    print(f"wrote {write_results('nfs_floor', {'settings': vars(args), 'results': results})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
