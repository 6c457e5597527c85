"""Reading what a guest holds from its memory: locating RAM, the served-page index, the scan.

Tier 1: a real child process stands in for QEMU. It holds a private
anonymous mapping of a size nothing else in it has (as QEMU holds guest RAM),
filled with pages the test serves it; the test scans it through the same API
a guest gets, while the child overwrites, copies or zeroes pages on command,
or exits mid-scan. Tier 2: a real guest under QEMU TCG reads a file of its
ext4 disk (4 KiB blocks); the test indexes the disk image's pages as served,
scans, and finds the file resident; after the balloon takes the guest's
memory, evicted.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import trio
import xxhash

from fusecache.geometry import PAGE_SIZE, PAGES_PER_CHUNK
from fusecache.guestmem import (
    FINGERPRINT_WORDS,
    PAGE_RECORD_BYTES,
    GuestMemoryScanner,
    GuestRam,
    Location,
    Reason,
    ScanResult,
    ServedPages,
    Unscannable,
    libvirt_base_memory,
    locate_libvirt_guest,
    locate_qemu,
    locate_qmp_guest,
    locate_ram,
    qmp_socket_pid,
    scan,
)
from fusecache.qmp import open_qmp
from tests.guest import CommandChannel, Guest, domain_xml

CHILD = r"""
import ctypes, sys
path, size = sys.argv[1], int(sys.argv[2])
# As QEMU maps guest RAM (qemu_ram_mmap): reserve with PROT_NONE, map read-write inside, a guard page either side,
# so the kernel cannot merge the mapping with a neighbouring anonymous one.
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
MAP_PRIVATE, MAP_ANONYMOUS, MAP_FIXED = 0x02, 0x20, 0x10
base = libc.mmap(None, size + 2 * 4096, 0, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
addr = libc.mmap(base + 4096, size, 3, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0)
assert addr == base + 4096, ctypes.get_errno()
ram = memoryview((ctypes.c_char * size).from_address(addr)).cast("B")
with open(path, "rb") as f:
    f.readinto(ram)
print("ready", flush=True)
for line in sys.stdin:
    cmd, *args = line.split()
    if cmd == "put":  # put PAGE OFFSET HEX
        page, off, data = int(args[0]), int(args[1]), bytes.fromhex(args[2])
        ram[page * 4096 + off : page * 4096 + off + len(data)] = data
    elif cmd == "copy":  # copy SRC DST
        src, dst = int(args[0]), int(args[1])
        ram[dst * 4096 : dst * 4096 + 4096] = ram[src * 4096 : src * 4096 + 4096]
    elif cmd == "load":  # load PAGE PATH: a page's content from a file
        with open(args[1], "rb") as f:
            ram[int(args[0]) * 4096 : int(args[0]) * 4096 + 4096] = f.read(4096)
    print("ok", flush=True)
"""

RAM_PAGES = 2053  # a size no other mapping of the child has: the scan finds "guest RAM" by size, as in QEMU
INO, GEN = 7, 3


class RamChild:
    """A process holding RAM_PAGES pages of known content in one private anonymous mapping."""

    def __init__(self, workdir: Path, content: bytes) -> None:
        self.workdir = workdir
        self.content = bytearray(content)  # what the child's mapping holds, page for page
        self.size = len(content)
        src = workdir / "ram.bin"
        src.write_bytes(content)
        self.proc = subprocess.Popen([sys.executable, "-c", CHILD, str(src), str(self.size)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
        assert self.proc.stdout.readline().strip() == "ready"
        src.unlink()
        self.pid = self.proc.pid

    def _do(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "ok"

    def put(self, page: int, offset: int, data: bytes) -> None:
        self._do(f"put {page} {offset} {data.hex()}")
        self.content[page * PAGE_SIZE + offset : page * PAGE_SIZE + offset + len(data)] = data

    def overwrite(self, page: int) -> None:
        """The guest reuses the page for something else."""
        self.put(page, 0, os.urandom(PAGE_SIZE))

    def copy(self, src: int, dst: int) -> None:
        self._do(f"copy {src} {dst}")
        self.content[dst * PAGE_SIZE : (dst + 1) * PAGE_SIZE] = self.page(src)

    def page(self, i: int) -> bytes:
        return bytes(self.content[i * PAGE_SIZE : (i + 1) * PAGE_SIZE])

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
        self.proc.wait()

    def ram(self) -> GuestRam:
        ram = locate_ram(self.pid, self.size)
        assert isinstance(ram, GuestRam), str(ram)
        return ram


def random_pages(n: int) -> bytearray:
    return bytearray(os.urandom(n * PAGE_SIZE))


ZERO_PAGES = (5, 6)  # all-zero pages: no evidence
BLIND_PAGES = (9,)  # non-zero, but zero at both fingerprint words: no evidence either


@pytest.fixture
def child(tmp_path):
    content = random_pages(RAM_PAGES)
    for p in ZERO_PAGES:
        content[p * PAGE_SIZE : (p + 1) * PAGE_SIZE] = bytes(PAGE_SIZE)
    for p in BLIND_PAGES:
        for off in FINGERPRINT_WORDS:
            content[p * PAGE_SIZE + off : p * PAGE_SIZE + off + 8] = bytes(8)
    c = RamChild(tmp_path, bytes(content))
    try:
        yield c
    finally:
        c.kill()


def loc(page: int, ino: int = INO, gen: int = GEN) -> Location:
    return Location(ino, gen, page // PAGES_PER_CHUNK, page % PAGES_PER_CHUNK)


def run_scan(ram: GuestRam, served: ServedPages) -> ScanResult:
    result = scan(ram, served)
    assert isinstance(result, ScanResult), str(result)
    return result


def evidence_pages() -> set[int]:
    return set(range(RAM_PAGES)) - set(ZERO_PAGES) - set(BLIND_PAGES)


def test_locate_finds_the_mapping_by_size_and_it_holds_the_content(child):
    ram = child.ram()
    assert ram.pid == child.pid and ram.size == child.size
    fd = os.open(f"/proc/{child.pid}/mem", os.O_RDONLY)
    try:
        assert os.pread(fd, child.size, ram.address) == bytes(child.content)
    finally:
        os.close(fd)
    missing = locate_ram(child.pid, child.size + PAGE_SIZE)
    assert isinstance(missing, Unscannable) and missing.reason is Reason.MAPPING_NOT_FOUND
    not_qemu = locate_qemu(child.pid, child.size)
    assert isinstance(not_qemu, Unscannable) and not_qemu.reason is Reason.NOT_QEMU


def test_ram_in_shared_memory_is_refused_before_anything_is_read():
    """A memfd RAM backend: reading the holes the balloon punched would allocate them again (measured: it does)."""
    size = RAM_PAGES * PAGE_SIZE
    holder = subprocess.Popen([sys.executable, "-c", (
        "import mmap, os, sys\n"
        f"fd = os.memfd_create('pc.ram'); os.ftruncate(fd, {size}); ram = mmap.mmap(fd, {size})\n"
        "print('ready', flush=True); sys.stdin.read()\n"
    )], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "ready"
        result = locate_ram(holder.pid, size)
        assert isinstance(result, Unscannable) and result.reason is Reason.SHARED_RAM
    finally:
        holder.stdin.close()
        holder.wait()


def test_scan_finds_served_pages_resident_then_exactly_the_overwritten_ones_evicted(child):
    ram = child.ram()
    served = ServedPages.for_ram(ram.size, grace=0)
    # Served in two replies, the second not starting on a page boundary: its leading partial page is not indexed.
    half = RAM_PAGES // 2 * PAGE_SIZE
    assert served.record(INO, GEN, 0, child.content[:half]) + served.record(INO, GEN, half - 100, child.content[half - 100 :]) > 0
    assert served.no_evidence == len(ZERO_PAGES) + len(BLIND_PAGES)
    assert len(served) == len(evidence_pages())

    first = run_scan(ram, served)
    assert set(first.resident) == {loc(p) for p in evidence_pages()}
    assert len(first.evicted) == 0
    assert first.confirmed == len(evidence_pages()) and first.zero_word_pages == len(ZERO_PAGES) + len(BLIND_PAGES)

    gone = [3, 17, 700, 2052]
    for p in gone:
        child.overwrite(p)
    second = run_scan(ram, served)
    assert set(second.evicted) == {loc(p) for p in gone}
    assert set(second.resident) == {loc(p) for p in evidence_pages() - set(gone)}
    assert second.evicted.by_chunk() == {(INO, GEN, p // PAGES_PER_CHUNK): 1 << (p % PAGES_PER_CHUNK) for p in gone}

    # Reported once: the index forgets what it reported evicted.
    third = run_scan(ram, served)
    assert len(third.evicted) == 0 and len(third.resident) == len(second.resident)
    assert len(served) == len(evidence_pages()) - len(gone)


@pytest.mark.parametrize("words", [(0, 2048), (3000 // 8 * 8, 512)])
def test_other_fingerprint_layouts_scan_the_same(child, words):
    """Words apart are read as two pieces per page; words in either order work."""
    ram = child.ram()
    served = ServedPages(capacity=RAM_PAGES, grace=0, words=words)
    served.record(INO, GEN, 0, child.content[: 1000 * PAGE_SIZE])  # a large reply: words taken out with numpy
    for first in range(1000, RAM_PAGES, 10):  # small ones: sliced out page by page
        served.record(INO, GEN, first * PAGE_SIZE, child.content[first * PAGE_SIZE : (first + 10) * PAGE_SIZE])
    held = {p for p in range(RAM_PAGES) if p not in ZERO_PAGES}  # page 9 is evidence here: its zeroed words are not these
    assert len(served) == len(held)
    for p in (1, 64, 1999):
        child.overwrite(p)
    result = run_scan(ram, served)
    assert set(result.evicted) == {loc(p) for p in (1, 64, 1999)}
    assert set(result.resident) == {loc(p) for p in held - {1, 64, 1999}}


def test_a_page_served_again_is_judged_by_its_newest_record(child, tmp_path):
    ram = child.ram()
    served = ServedPages.for_ram(ram.size, grace=0)
    served.record(INO, GEN, 0, child.content)
    old = child.page(40)
    child.overwrite(40)
    assert set(run_scan(ram, served).evicted) == {loc(40)}
    # The guest reads the page again (the host serves it again), and holds it.
    (tmp_path / "p").write_bytes(old)
    child._do(f"load 40 {tmp_path / 'p'}")
    child.content[40 * PAGE_SIZE : 41 * PAGE_SIZE] = old
    served.record(INO, GEN, 40 * PAGE_SIZE, old)
    served.record(INO, GEN, 40 * PAGE_SIZE, old)  # twice: one location, one entry judged
    result = run_scan(ram, served)
    assert loc(40) in set(result.resident) and len(result.evicted) == 0
    assert len(result.resident) == len(evidence_pages())
    assert len(served) == len(evidence_pages())  # the superseded record is forgotten


def test_content_served_from_several_locations_is_resident_only_if_ram_holds_as_many_copies(child):
    ram = child.ram()
    served = ServedPages.for_ram(ram.size, grace=0)
    # Page 100's content served from two places (another file, another page): the child holds it once.
    served.record(INO, GEN, 100 * PAGE_SIZE, child.page(100))
    served.record(INO + 1, GEN, 0, child.page(100))
    served.record(INO, GEN, 101 * PAGE_SIZE, child.page(101))
    one_copy = run_scan(ram, served)
    assert set(one_copy.evicted) == {loc(100), loc(0, ino=INO + 1)}  # which copy went is unknowable: both re-admitted
    assert set(one_copy.resident) == {loc(101)}

    served.record(INO, GEN, 100 * PAGE_SIZE, child.page(100))
    served.record(INO + 1, GEN, 0, child.page(100))
    child.copy(100, 200)  # now the guest holds two copies
    two_copies = run_scan(ram, served)
    assert set(two_copies.resident) == {loc(100), loc(0, ino=INO + 1), loc(101)}
    assert len(two_copies.evicted) == 0


def test_a_page_with_the_same_fingerprint_words_but_other_content_is_not_resident(child):
    ram = child.ram()
    served = ServedPages.for_ram(ram.size, grace=0)
    served.record(INO, GEN, 300 * PAGE_SIZE, child.page(300))
    original = child.page(300)
    child.overwrite(300)
    # Page 301 gets page 300's two fingerprint words: a candidate, refuted by the full digest.
    for off in FINGERPRINT_WORDS:
        child.put(301, off, original[off : off + 8])
    result = run_scan(ram, served)
    assert result.candidates == 1 and result.confirmed == 0
    assert set(result.evicted) == {loc(300)}


def test_pages_served_within_the_grace_period_are_not_judged(child):
    ram = child.ram()
    served = ServedPages.for_ram(ram.size, grace=3600.0)
    served.record(INO, GEN, 0, os.urandom(PAGE_SIZE * 3))  # content the guest does not hold
    result = run_scan(ram, served)
    assert result.young == 3 and len(result.evicted) == 0 and len(result.resident) == 0
    assert len(served) == 3


def test_the_index_is_bounded_and_drops_the_oldest_first(child):
    ram = child.ram()
    served = ServedPages(capacity=256, grace=0)
    assert served.nbytes == 256 * PAGE_RECORD_BYTES
    for first in range(0, 1000, 10):
        served.record(INO, GEN, first * PAGE_SIZE, child.content[first * PAGE_SIZE : (first + 10) * PAGE_SIZE])
    served_pages = [p for p in range(1000) if p in evidence_pages()]
    assert len(served) <= 256 and served.dropped == len(served_pages) - len(served)
    result = run_scan(ram, served)
    assert set(result.resident) == {loc(p) for p in served_pages[-len(served) :]}


def test_a_process_that_exits_mid_scan_is_a_typed_result(child):
    ram = child.ram()
    served = ServedPages.for_ram(ram.size, grace=0)
    served.record(INO, GEN, 0, child.content)
    for kill_at in (1, 2):  # before the word pass; between the word pass and the full-page checks
        c = RamChild(child.workdir, bytes(child.content))
        try:
            calls = 0

            def stop(c: RamChild = c, kill_at: int = kill_at) -> bool:
                nonlocal calls
                calls += 1
                if calls == kill_at:
                    c.kill()
                return False

            calls = 0
            result = scan(c.ram(), served, should_stop=stop)
            assert isinstance(result, Unscannable) and result.reason is Reason.PROCESS_GONE, result
        finally:
            c.kill()
    assert len(served) == len(evidence_pages())  # a failed pass changes nothing


def test_pages_recorded_and_dropped_during_a_scan_are_kept_straight(child):
    """The read path records while a scan runs (here: from the scan's own stop check, after its snapshot), enough to
    drop the oldest entries for capacity: the scan still reports exactly what it judged, and forgets only that."""
    ram = child.ram()
    served = ServedPages(capacity=600, grace=0)
    served.record(INO, GEN, 0, child.content[: 500 * PAGE_SIZE])
    assert len(served) == 497
    for p in (100, 450):
        child.overwrite(p)
    recorded_during = False

    def record_meanwhile() -> bool:
        nonlocal recorded_during
        if not recorded_during:
            recorded_during = True
            served.record(INO, GEN, 1000 * PAGE_SIZE, child.content[1000 * PAGE_SIZE : 1200 * PAGE_SIZE])
            assert served.dropped == 97  # pages 0-99: the oldest
        return False

    result = scan(ram, served, should_stop=record_meanwhile)
    assert isinstance(result, ScanResult), str(result)
    assert set(result.evicted) == {loc(100), loc(450)}
    assert set(result.resident) == {loc(p) for p in set(range(500)) - {5, 6, 9, 100, 450}}
    after = run_scan(ram, served)
    assert len(after.evicted) == 0
    assert set(after.resident) == {loc(p) for p in set(range(101, 500)) - {450}} | {loc(p) for p in range(1000, 1200)}


def test_a_stopped_scan_changes_nothing(child):
    ram = child.ram()
    served = ServedPages.for_ram(ram.size, grace=0)
    served.record(INO, GEN, 0, child.content)
    child.overwrite(8)
    result = scan(ram, served, should_stop=lambda: True)
    assert isinstance(result, Unscannable) and result.reason is Reason.STOPPED
    assert set(run_scan(ram, served).evicted) == {loc(8)}


def test_a_gone_process_or_a_reused_pid_is_a_typed_result(child):
    ram = child.ram()
    served = ServedPages.for_ram(ram.size, grace=0)
    served.record(INO, GEN, 0, child.content)
    reused = GuestRam(pid=ram.pid, start_time=ram.start_time + 1, address=ram.address, size=ram.size)
    result = scan(reused, served)
    assert isinstance(result, Unscannable) and result.reason is Reason.PROCESS_GONE
    child.kill()
    for result in (scan(ram, served), locate_ram(ram.pid, ram.size)):
        assert isinstance(result, Unscannable) and result.reason is Reason.PROCESS_GONE, result
    assert "gone" in str(result)


def test_reading_guest_memory_without_privilege_is_a_typed_result(child):
    """fusecache as another user without CAP_SYS_PTRACE (it may still read this checkout): no permission, said so."""
    start_time = child.ram().start_time
    probe = (
        "from fusecache.guestmem import GuestRam, ServedPages, locate_ram, scan\n"
        f"print(locate_ram({child.pid}, {child.size}).reason.name)\n"
        f"print(scan(GuestRam({child.pid}, {start_time}, 0, {child.size}), ServedPages(16)).reason.name)\n"
    )
    caps = "+dac_override,+dac_read_search"  # to run the checkout's Python under /root: file access, not ptrace
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", f"--inh-caps={caps}", f"--ambient-caps={caps}", "--"]
    proc = subprocess.run([*nobody, sys.executable, "-c", probe], capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["NO_PERMISSION", "NO_PERMISSION"]


def test_the_async_scanner_runs_in_a_thread_and_charges_its_budget(child):
    ram = child.ram()
    served = ServedPages.for_ram(ram.size, grace=0)
    served.record(INO, GEN, 0, child.content)
    child.overwrite(11)

    async def main() -> tuple[ScanResult | Unscannable, float, float]:
        scanner = GuestMemoryScanner(cpu_fraction=0.5)
        started = trio.current_time()
        result = await scanner.scan(ram, served)
        return result, started, scanner.budget.next_start

    result, started, next_start = trio.run(main)
    assert isinstance(result, ScanResult) and set(result.evicted) == {loc(11)}
    assert next_start >= started + result.cpu_s / 0.5 - 1e-9  # the next scan waits for the budget


def test_libvirt_base_memory_leaves_out_hotplugged_dimms():
    xml = """<domain><memory unit='KiB'>1572864</memory><devices>
      <memory model='dimm'><target><size unit='MiB'>512</size></target></memory></devices></domain>"""
    assert libvirt_base_memory(xml) == 1 << 30
    assert libvirt_base_memory("<domain><memory unit='GiB'>2</memory></domain>") == 2 << 30


def test_qmp_socket_pid_names_the_listener(tmp_path):
    import socket

    path = str(tmp_path / "s.sock")
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(path)
        listener.listen(1)
        assert qmp_socket_pid(path) == os.getpid()  # credentials come from listen(): no accept needed
    gone = qmp_socket_pid(path)
    assert isinstance(gone, Unscannable) and gone.reason is Reason.NO_PID


def test_served_pages_bytes_per_page_are_as_documented():
    served = ServedPages(capacity=1000)
    assert served.nbytes == 1000 * PAGE_RECORD_BYTES == 1000 * 32
    data = np.random.default_rng(1).integers(0, 255, size=PAGE_SIZE * 4, dtype=np.uint8).tobytes()
    assert served.record(1, 1, 0, data) == 4


# -- a real guest


GUEST_MIB = 256
FILE_MIB = 48
BALLOON_MIB = 96


def make_disk_4k(image: Path, files: dict[str, bytes], size_mib: int) -> None:
    """An ext4 image with 4 KiB blocks (mkfs picks 1 KiB below 512 MB): guest page-cache pages line up with image pages."""
    with tempfile.TemporaryDirectory(prefix="fc-disk-") as tmp:
        for name, data in files.items():
            (Path(tmp) / name).write_bytes(data)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-E", "lazy_itable_init=0,lazy_journal_init=0", "-d", tmp,
                        str(image), f"{size_mib}M"], check=True, capture_output=True)  # fmt: skip


def ram_digests(ram: GuestRam) -> set[bytes]:
    """The oracle: the xxh3-128 of every page of the guest's RAM, read whole through /proc/PID/mem."""
    fd = os.open(f"/proc/{ram.pid}/mem", os.O_RDONLY)
    try:
        out = set()
        for off in range(0, ram.size, 16 << 20):
            block = os.pread(fd, 16 << 20, ram.address + off)
            out.update(xxhash.xxh3_128_digest(block[i : i + PAGE_SIZE]) for i in range(0, len(block), PAGE_SIZE))
        return out
    finally:
        os.close(fd)


def wait_for(cond, what: str, timeout: float = 60.0):
    """Bound on waiting (a failure names what never happened), not a timing assertion."""
    deadline = time.monotonic() + timeout
    while not (value := cond()):
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.5)
    return value


class ImagePages:
    """The disk image as fusecache served it: every page indexed as served; which pages hold the guest's file."""

    def __init__(self, image: bytes, file_content: bytes) -> None:
        self.image = image
        file_pages = {file_content[i : i + PAGE_SIZE] for i in range(0, len(file_content), PAGE_SIZE)}
        self.file_pages = {p for p in range(len(image) // PAGE_SIZE) if image[p * PAGE_SIZE : (p + 1) * PAGE_SIZE] in file_pages}
        assert len(self.file_pages) == len(file_content) // PAGE_SIZE  # random content: every page once
        self.file_digests = {self.digest(p) for p in self.file_pages}

    def digest(self, p: int) -> bytes:
        return xxhash.xxh3_128_digest(self.image[p * PAGE_SIZE : (p + 1) * PAGE_SIZE])

    def judge(self, ram: GuestRam, served: ServedPages) -> tuple[set[int], set[int]]:
        """One scan with every image page served anew: the file's pages found resident, and evicted.

        Checked against the oracle, page for page: a page is resident exactly
        when its bytes are somewhere in guest RAM. The oracle is read before and
        after the scan and must agree on the file's pages (the guest may still be settling).
        """
        for _ in range(20):
            served.record(INO, GEN, 0, self.image)
            before = ram_digests(ram) & self.file_digests
            result = run_scan(ram, served)
            after = ram_digests(ram) & self.file_digests
            if before == after:
                break
            time.sleep(1)
        else:
            pytest.fail("the guest's memory never held still for a scan")
        resident = {loc.chunk * PAGES_PER_CHUNK + loc.page for loc in result.resident} & self.file_pages
        evicted = {loc.chunk * PAGES_PER_CHUNK + loc.page for loc in result.evicted} & self.file_pages
        assert resident | evicted == self.file_pages
        assert resident == {p for p in self.file_pages if self.digest(p) in after}
        print(f"file pages: {len(resident)} resident, {len(evicted)} evicted of {len(self.file_pages)}; "
              f"scan {result.wall_s:.2f} s, {result.cpu_s:.2f} s CPU for {ram.size >> 20} MiB; "
              f"{result.candidates} candidates, {result.confirmed} confirmed")  # fmt: skip
        return resident, evicted


@pytest.mark.mount
@pytest.mark.guest
def test_real_guest_holds_the_file_it_read_until_the_balloon_or_free_page_reporting_takes_it(mounter, guest_build, tmp_path):
    content = os.urandom(FILE_MIB << 20)
    backing = tmp_path / "images"
    backing.mkdir()
    make_disk_4k(backing / "guest.img", {"f": content}, size_mib=FILE_MIB + 40)
    pages = ImagePages((backing / "guest.img").read_bytes(), content)
    m = mounter.mount(str(backing), "--cache-dir", str(tmp_path / "cache"), "--cache-size", "256M")
    qmp_sock = tmp_path / "qmp.sock"
    with Guest(tmp_path / "guest", guest_build) as g:
        # Free page reporting (a host-side device property; the guest's stock virtio_balloon driver does the rest) hands
        # memory the guest frees back to QEMU, which discards it: evicted page-cache pages then leave guest RAM at once.
        g.start(os.path.join(m.mountpoint, "guest.img"), memory_mib=GUEST_MIB, qmp_sock=qmp_sock,
                extra=["-global", "virtio-balloon-pci.free-page-reporting=on"])  # fmt: skip

        async def locate() -> GuestRam | Unscannable:
            async with open_qmp(str(qmp_sock)) as qmp:
                return await locate_qmp_guest(qmp)

        ram = trio.run(locate)
        assert isinstance(ram, GuestRam), str(ram)
        assert ram.pid == g.pid and ram.size == GUEST_MIB << 20
        served = ServedPages.for_ram(ram.size, grace=0)

        assert g.check("md5sum /mnt/f").split()[0] == hashlib.md5(content).hexdigest()
        resident, evicted = pages.judge(ram, served)
        assert resident == pages.file_pages and not evicted

        # The balloon takes most of the guest's memory: what it evicted is found evicted, what it kept resident.
        g.balloon(BALLOON_MIB)
        resident, evicted = pages.judge(ram, served)
        assert len(evicted) > len(pages.file_pages) // 4
        assert len(resident) * PAGE_SIZE <= g.meminfo()["Cached"]

        # Given its memory back, the guest reads the file again and holds all of it; then drops its caches.
        g.balloon(GUEST_MIB)
        assert g.check("md5sum /mnt/f").split()[0] == hashlib.md5(content).hexdigest()
        resident, evicted = pages.judge(ram, served)
        assert resident == pages.file_pages
        g.check("sync; echo 3 > /proc/sys/vm/drop_caches")
        # Reporting runs a couple of seconds after memory is freed, in 2 MiB blocks: wait for most of the file to go.
        wait_for(lambda: len(pages.judge(ram, served)[1]) > len(pages.file_pages) // 2, "free page reporting to discard the file's pages")


@pytest.mark.guest
@pytest.mark.libvirt
def test_libvirt_guest_ram_is_found_through_its_pidfile_and_domain_xml(guest_build, tmp_path, request):
    content = os.urandom(16 << 20)
    make_disk_4k(tmp_path / "guest.img", {"f": content}, size_mib=48)
    pages = ImagePages((tmp_path / "guest.img").read_bytes(), content)
    daemon = request.getfixturevalue("libvirtd")
    name = f"fc-gm-{os.getpid()}"
    work = tmp_path / "dom"
    work.mkdir()
    (work / "dom.xml").write_text(domain_xml(name, guest_build, tmp_path / "guest.img", work, memory_mib=GUEST_MIB))
    daemon.virsh("create", str(work / "dom.xml"))
    channel = CommandChannel(work / "cmd.sock")
    try:
        channel.connect(10)
        channel.wait_ready(60)
        # libvirtd runs in its own mount namespace: its /run/libvirt is workdir/run.
        ram = locate_libvirt_guest(name, daemon.virsh("dumpxml", name), state_dir=str(daemon.workdir / "run" / "qemu"))
        assert isinstance(ram, GuestRam), str(ram)
        assert ram.size == GUEST_MIB << 20
        served = ServedPages.for_ram(ram.size, grace=0)
        channel.check("cat /mnt/f > /dev/null")
        resident, evicted = pages.judge(ram, served)
        assert resident == pages.file_pages and not evicted
        missing = locate_libvirt_guest("no-such-domain", "<domain/>", state_dir=str(daemon.workdir / "run" / "qemu"))
        assert isinstance(missing, Unscannable) and missing.reason is Reason.NO_PID
    finally:
        channel.close()
        daemon.virsh("destroy", name)
