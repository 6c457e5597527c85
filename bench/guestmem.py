"""Reading guest memory: what a scan costs, what matching costs, what the served-page index holds, which fingerprint words.

Owns the measurements behind `fusecache.guestmem`:

1. scan: a stand-in guest (a child process holding --ram-mib of RAM in one
   private anonymous mapping with guard pages, as QEMU maps guest RAM):
   --served-mib of pages of the host's /usr files, which the index says were
   served, then a third of the rest other /usr pages, the remainder zero, all
   touched. Timed, each the median of --repeats: the baseline, the whole RAM
   read through /proc/PID/mem and one xxh3-64 per page looked up in a set (the
   plain method first measured here); `scan()` itself, with the fingerprint
   words at 0 and 2048 (two 8-byte pieces per page) and at 2040 and 2048
   (one 16-byte piece, the default). Reported per GiB of guest RAM: CPU seconds of the
   scanning thread, wall seconds, the word pass and the confirmation, the
   candidates and how many the full digest refuted, and the ratio to the
   baseline.
2. match: N served keys against the 262,144 keys of 1 GiB of RAM: sorting
   the served keys and `searchsorted` (what the scan does) against `np.isin`.
3. index: host memory per GiB of served pages (ServedPages' arrays), and the
   CPU cost of recording a 64 KiB and a 1 MiB reply on the read path, with
   the digests computed by the index or passed in (the batched indexing
   included, amortised).
4. fingerprint words: on the host's own files under /usr (OS files, like
   guest images), for several pairs of word offsets: the share of pages
   that are no evidence (both words zero) and the share of pages whose key
   another page with different content shares (each such page is a wasted
   whole-page check).

    .venv/bin/python -m bench.guestmem [--ram-mib 1024] [--served-mib 256] [--repeats 3] [--usr-mib 256]

Needs root (it reads another process's memory). Prints a table per part and
writes bench/results/guestmem.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import xxhash

from bench.common import print_table, write_results
from fusecache.geometry import PAGE_SIZE
from fusecache.guestmem import FINGERPRINT_WORDS, GuestRam, ScanResult, ServedPages, locate_ram, scan
from fusecache.guestmem.served import PAGE_RECORD_BYTES, fingerprint_keys

GIB = 1 << 30
MIB = 1 << 20
BLOCK = 64 * MIB

CHILD = r"""
import ctypes, sys
path, size = sys.argv[1], int(sys.argv[2])
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
base = libc.mmap(None, size + 2 * 4096, 0, 0x22, -1, 0)  # as QEMU maps guest RAM: guard pages either side
addr = libc.mmap(base + 4096, size, 3, 0x32, -1, 0)
ram = memoryview((ctypes.c_char * size).from_address(addr)).cast("B")
with open(path, "rb") as f:
    n = f.readinto(ram)
ram[n:] = bytes(size - n)  # touched: a guest's RAM is resident, zero or not
print("ready", flush=True)
sys.stdin.read()
"""


def median_of(repeats: int, fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """(median wall s, median thread CPU s, last result) of fn run `repeats` times."""
    walls, cpus, result = [], [], None
    for _ in range(repeats):
        w, c = time.monotonic(), time.thread_time()
        result = fn()
        walls.append(time.monotonic() - w)
        cpus.append(time.thread_time() - c)
    return statistics.median(walls), statistics.median(cpus), result


def baseline_full_hash(ram: GuestRam, served_hashes: set[int]) -> int:
    """The plain method: every page of RAM read whole, one xxh3-64 per page, a set lookup."""
    fd = os.open(f"/proc/{ram.pid}/mem", os.O_RDONLY)
    found = 0
    try:
        for off in range(0, ram.size, 16 * MIB):
            block = os.pread(fd, 16 * MIB, ram.address + off)
            found += sum(1 for i in range(0, len(block), PAGE_SIZE) if xxhash.xxh3_64_intdigest(block[i : i + PAGE_SIZE]) in served_hashes)
    finally:
        os.close(fd)
    return found


def part_scan(args: argparse.Namespace, tmp: str) -> tuple[list[list[str]], dict[str, Any]]:
    size, served, other = args.ram_mib * MIB, args.served_mib * MIB, (args.ram_mib - args.served_mib) // 3 * MIB
    content = usr_pages(served + other)
    served, other = min(served, content.nbytes), content.nbytes - min(served, content.nbytes)
    image = os.path.join(tmp, "ram.bin")
    with open(image, "wb") as f:
        f.write(content.tobytes())
    child = subprocess.Popen([sys.executable, "-c", CHILD, image, str(size)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        os.unlink(image)
        ram = locate_ram(child.pid, size)
        assert isinstance(ram, GuestRam), str(ram)
        served_bytes = memoryview(content).cast("B")[:served]
        hashes = {xxhash.xxh3_64_intdigest(served_bytes[i : i + PAGE_SIZE]) for i in range(0, served, PAGE_SIZE)}
        gib = size / GIB
        base_wall, base_cpu, _ = median_of(args.repeats, lambda: baseline_full_hash(ram, hashes))
        rows = [["whole RAM hashed (baseline)", f"{base_cpu / gib:.3f}", f"{base_wall / gib:.3f}", "", "", "", "", "1.00"]]
        data: dict[str, Any] = {
            "ram_mib": args.ram_mib, "served_mib": served / MIB, "other_mib": other / MIB, "repeats": args.repeats,
            "content": "pages of /usr files; the rest of RAM zero",
            "baseline_cpu_s_per_gib": base_cpu / gib, "baseline_wall_s_per_gib": base_wall / gib, "layouts": {},
        }  # fmt: skip
        for words in ((0, 2048), FINGERPRINT_WORDS):
            index = ServedPages(size // PAGE_SIZE, grace=0, words=words)
            index.record(1, 1, 0, served_bytes)

            def one_scan(index: ServedPages = index) -> ScanResult:
                result = scan(ram, index)
                assert isinstance(result, ScanResult), str(result)
                index.record(1, 1, 0, served_bytes)  # judged again next time
                return result

            wall, cpu, r = median_of(args.repeats, one_scan)
            assert len(r.evicted) == 0
            t = r.timings
            rows.append([f"scan(), words at {words[0]} and {words[1]}", f"{cpu / gib:.3f}", f"{wall / gib:.3f}",
                         f"{t['words'] / gib:.3f}", f"{t['confirm'] / gib:.3f}", f"{r.candidates:,}", f"{r.candidates - r.confirmed:,}",
                         f"{cpu / base_cpu:.2f}"])  # fmt: skip
            data["layouts"][f"{words[0]},{words[1]}"] = {
                "cpu_s_per_gib": cpu / gib, "wall_s_per_gib": wall / gib, "phases_wall_s": t, "candidates": r.candidates,
                "confirmed": r.confirmed, "resident": len(r.resident), "no_evidence_served": index.no_evidence,
                "confirm_us_per_candidate": t["confirm"] / max(1, r.candidates) * 1e6, "cpu_vs_baseline": cpu / base_cpu,
            }  # fmt: skip
    finally:
        child.stdin.close()
        child.wait()
    return rows, data


def part_match(repeats: int) -> tuple[list[list[str]], dict[str, Any]]:
    rng = np.random.default_rng(3)
    ram_keys = rng.integers(0, 2**63, size=GIB // PAGE_SIZE, dtype=np.uint64)
    rows, data = [], {}
    for n in (1 << 16, 1 << 18, 1 << 20):
        served = np.concatenate([ram_keys[: n // 2], rng.integers(0, 2**63, size=n - n // 2, dtype=np.uint64)])

        def sorted_search(served: np.ndarray = served) -> int:
            keys = np.sort(served)
            pos = np.minimum(np.searchsorted(keys, ram_keys), len(keys) - 1)
            return int(np.count_nonzero(keys[pos] == ram_keys))

        def isin(served: np.ndarray = served) -> int:
            return int(np.count_nonzero(np.isin(ram_keys, served)))

        s_wall, _, s_hits = median_of(repeats, sorted_search)
        i_wall, _, i_hits = median_of(repeats, isin)
        assert s_hits == i_hits
        rows.append([f"{n:,}", f"{s_wall * 1e3:.1f}", f"{i_wall * 1e3:.1f}", f"{s_wall / i_wall:.2f}"])
        data[str(n)] = {"sort_searchsorted_ms": s_wall * 1e3, "isin_ms": i_wall * 1e3}
    return rows, data


def part_index(repeats: int) -> tuple[list[list[str]], dict[str, Any]]:
    per_gib = ServedPages(capacity=GIB // PAGE_SIZE).nbytes
    rows = [["host memory per GiB of served pages", f"{per_gib / MIB:.1f} MiB ({PAGE_RECORD_BYTES} B per page, {per_gib / GIB:.2%})"]]
    data: dict[str, Any] = {"bytes_per_gib_served": per_gib, "bytes_per_page": PAGE_RECORD_BYTES}
    for size in (64 * 1024, MIB):
        replies = [os.urandom(size) for _ in range(max(8, 16 * MIB // size))]
        digests = [[xxhash.xxh3_128_digest(r[i : i + PAGE_SIZE]) for i in range(0, size, PAGE_SIZE)] for r in replies]
        index = ServedPages(capacity=GIB // PAGE_SIZE, grace=1.0)  # one long-lived index, as a guest has
        offsets = iter(range(0, 1 << 50, size))

        def record(with_digests: bool, replies: list[bytes] = replies, digests: list[list[bytes]] = digests) -> None:
            for i, r in enumerate(replies):
                index.record(1, 1, next(offsets), r, digests[i] if with_digests else None)  # noqa: B023 - used at once

        for with_digests in (False, True):
            _, cpu, _ = median_of(repeats, lambda with_digests=with_digests: record(with_digests))
            what = "given" if with_digests else "computed"
            rows.append([f"record a {size // 1024} KiB reply, digests {what}", f"{cpu / len(replies) * 1e6:.1f} us CPU"])
            data[f"record_{size // 1024}k_cpu_us_digests_{what}"] = cpu / len(replies) * 1e6
    return rows, data


def usr_pages(limit: int) -> np.ndarray:
    """Whole pages of regular files under /usr, up to `limit` bytes: a (pages, 512) uint64 array."""
    parts, total = [], 0
    for root, _dirs, files in os.walk("/usr"):
        for name in sorted(files):
            path = os.path.join(root, name)
            try:
                if not os.path.isfile(path) or os.path.islink(path):
                    continue
                with open(path, "rb") as f:
                    data = f.read(limit - total)
            except OSError:
                continue
            whole = len(data) // PAGE_SIZE * PAGE_SIZE
            if whole:
                parts.append(np.frombuffer(data[:whole], dtype=np.uint64).reshape(-1, PAGE_SIZE // 8))
                total += whole
            if total >= limit:
                return np.concatenate(parts)
    return np.concatenate(parts)


def part_words(usr_mib: int) -> tuple[list[list[str]], dict[str, Any]]:
    pages = usr_pages(usr_mib * MIB)
    content = np.array([xxhash.xxh3_64_intdigest(p.tobytes()) for p in pages], dtype=np.uint64)
    rows, data = [], {}
    for offsets in ((0, 2048), (0, 8), (2040, 2048), (0, 4088), (8, 2056), (1024, 3072), (4080, 4088)):
        w0, w1 = pages[:, offsets[0] // 8], pages[:, offsets[1] // 8]
        evidence = (w0 | w1) != 0
        keys = fingerprint_keys(w0[evidence], w1[evidence])
        # Pages whose key is shared with a page of other content: distinct (key, content) pairs per key > 1.
        pairs = np.unique(np.stack([keys, content[evidence]], axis=1), axis=0)
        ukeys, counts = np.unique(pairs[:, 0], return_counts=True)
        shared = np.isin(keys, ukeys[counts > 1])
        no_ev = 1 - evidence.mean()
        rows.append([f"{offsets[0]}, {offsets[1]}", f"{no_ev:.2%}", f"{shared.mean():.2%}"])
        data[f"{offsets[0]},{offsets[1]}"] = {"no_evidence": float(no_ev), "key_shared_with_other_content": float(shared.mean())}
    data["pages"] = len(pages)
    return rows, data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ram-mib", type=int, default=1024)
    ap.add_argument("--served-mib", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--usr-mib", type=int, default=256)
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/guestmem.py reads another process's memory: run it as root")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="fc-bench-guestmem-") as tmp:
        rows, results["scan"] = part_scan(args, tmp)
    print_table(f"Scanning {args.ram_mib} MiB of guest RAM ({results['scan']['served_mib']:.0f} MiB served), median of {args.repeats}",
                ["method", "CPU s/GiB", "wall s/GiB", "words s/GiB", "confirm s/GiB", "candidates", "refuted", "CPU vs baseline"],
                rows)  # fmt: skip
    rows, results["match"] = part_match(args.repeats)
    print_table("Matching N served keys against 1 GiB of RAM (262,144 keys)",
                ["served keys", "sort + searchsorted ms", "np.isin ms", "ratio"], rows)  # fmt: skip
    rows, results["index"] = part_index(args.repeats)
    print_table("The served-page index", ["what", "figure"], rows)
    rows, results["fingerprint_words"] = part_words(args.usr_mib)
    print_table(f"Fingerprint word offsets on {results['fingerprint_words']['pages']:,} pages of /usr files",
                ["word offsets", "no evidence (both zero)", "key shared with other content"], rows)  # fmt: skip
    print(write_results("guestmem", results))


if __name__ == "__main__":
    main()
