"""Finding a guest's RAM: the QEMU process behind a guest and the one mapping in it that is the guest's memory.

Owns: the QEMU PID (the peer of a QMP unix socket, by SO_PEERCRED; a libvirt
domain's pidfile), the guest's RAM size (QMP `query-memory-size-summary`
base-memory; libvirt's domain XML), the mapping in /proc/PID/maps that holds
it, and the identity check that keeps a reused PID from being taken for the
guest. QEMU keeps guest RAM in one anonymous read-write mapping of exactly the
RAM size; under TCG a ~1 GiB `rwxp` code buffer sits beside it, which the
permissions rule out. RAM in shared memory (memfd, hugetlbfs) is refused:
reading its holes would allocate them. Every failure is an `Unscannable`
value saying why (no permission, no such mapping, the process is gone):
callers fall back to estimates, nothing raises.
"""

from __future__ import annotations

import enum
import errno
import os
import socket
import struct
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..qmp import QmpClient

LIBVIRT_QEMU_STATE = "/run/libvirt/qemu"


class Reason(enum.Enum):
    """Why a guest's memory cannot be scanned."""

    NO_PERMISSION = "no permission to read the QEMU process's memory (run fusecache as root, or with CAP_SYS_PTRACE)"
    PROCESS_GONE = "the QEMU process is gone"
    MAPPING_NOT_FOUND = "no mapping of the guest's RAM size in the QEMU process"
    MAPPING_AMBIGUOUS = "several mappings of the guest's RAM size in the QEMU process"
    SHARED_RAM = "the guest's RAM is shared memory (memfd or hugetlbfs): reading it would allocate what the guest gave back"
    NOT_QEMU = "the process is not QEMU"
    NO_PID = "the QEMU process is not known"
    NO_SIZE = "the guest's RAM size is not known"
    STOPPED = "the scan was stopped before it finished"


@dataclass(frozen=True)
class Unscannable:
    """A guest whose memory cannot be scanned, and why (`reason`; `detail` names the process or file)."""

    reason: Reason
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.reason.value}: {self.detail}" if self.detail else self.reason.value


@dataclass(frozen=True)
class GuestRam:
    """Where a guest's RAM is: process `pid` (started at `start_time`, in clock ticks since boot), [address, address + size)."""

    pid: int
    start_time: int
    address: int
    size: int


def _start_time(pid: int) -> int | Unscannable:
    """Field 22 of /proc/PID/stat: with the PID, names one process for the life of the host."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return Unscannable(Reason.PROCESS_GONE, f"process {pid}")
    except PermissionError:
        return Unscannable(Reason.NO_PERMISSION, f"/proc/{pid}/stat")
    except OSError:
        return Unscannable(Reason.PROCESS_GONE, f"process {pid}")
    # The command name (field 2) may hold spaces and parentheses: fields start after the last ')'.
    return int(stat[stat.rindex(b")") + 2 :].split()[19])


def same_process(ram: GuestRam) -> Unscannable | None:
    """None if ram.pid is still the process ram was found in; else why not (it exited; its PID was reused)."""
    now = _start_time(ram.pid)
    if isinstance(now, Unscannable):
        return now
    if now != ram.start_time:
        return Unscannable(Reason.PROCESS_GONE, f"process {ram.pid} exited (its PID now names another process)")
    return None


def _mappings(pid: int) -> list[tuple[int, int, str, int, str]] | Unscannable:
    """(start, end, perms, inode, path) of every mapping of pid."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return Unscannable(Reason.PROCESS_GONE, f"process {pid}")
    except PermissionError:
        return Unscannable(Reason.NO_PERMISSION, f"/proc/{pid}/maps")
    except OSError as e:
        # Reading a process that is exiting can fail with ESRCH.
        if e.errno == errno.ESRCH:
            return Unscannable(Reason.PROCESS_GONE, f"process {pid}")
        return Unscannable(Reason.MAPPING_NOT_FOUND, f"/proc/{pid}/maps: {e.strerror or e}")
    out = []
    for line in lines:
        fields = line.split(maxsplit=5)
        lo, _, hi = fields[0].partition("-")
        out.append((int(lo, 16), int(hi, 16), fields[1], int(fields[4]), fields[5] if len(fields) > 5 else ""))
    return out


def _is_ram_mapping(perms: str, inode: int, path: str) -> bool:
    """Anonymous private read-write memory (maybe named): QEMU's default RAM. Reading a page the guest never
    touched or gave back maps the shared zero page: it allocates nothing."""
    return perms.startswith("rw") and "x" not in perms and perms[3] == "p" and inode == 0 and (not path or path.startswith("[anon:"))


def _is_shared_ram(perms: str, path: str) -> bool:
    """A memfd or hugetlbfs RAM backend (memory-backend-memfd / -file, libvirt's memoryBacking). Reading a hole in
    it faults a page in: a scan would take back the memory the guest's balloon returned, so it is refused."""
    return perms.startswith("rw") and perms[3] == "s" and (path.startswith("/memfd:") or "hugepages" in path)


def locate_ram(pid: int, size: int) -> GuestRam | Unscannable:
    """The mapping of exactly `size` bytes in process pid that is a guest's RAM, or why there is none."""
    if size <= 0:
        return Unscannable(Reason.NO_SIZE, f"process {pid}")
    start_time = _start_time(pid)
    if isinstance(start_time, Unscannable):
        return start_time
    maps = _mappings(pid)
    if isinstance(maps, Unscannable):
        return maps
    found = [(lo, hi) for lo, hi, perms, inode, path in maps if hi - lo == size and _is_ram_mapping(perms, inode, path)]
    if not found:
        if any(hi - lo == size and _is_shared_ram(perms, path) for lo, hi, perms, _, path in maps):
            return Unscannable(Reason.SHARED_RAM, f"process {pid}")
        return Unscannable(Reason.MAPPING_NOT_FOUND, f"process {pid}, {size} bytes")
    if len(found) > 1:
        return Unscannable(Reason.MAPPING_AMBIGUOUS, f"process {pid}: {len(found)} mappings of {size} bytes")
    if not os.access(f"/proc/{pid}/mem", os.R_OK):
        return Unscannable(Reason.NO_PERMISSION, f"/proc/{pid}/mem")
    return GuestRam(pid=pid, start_time=start_time, address=found[0][0], size=size)


def still_mapped(ram: GuestRam) -> Unscannable | None:
    """None if ram's process is the same and still maps the range as it did; else why not."""
    gone = same_process(ram)
    if gone is not None:
        return gone
    maps = _mappings(ram.pid)
    if isinstance(maps, Unscannable):
        return maps
    for lo, hi, perms, inode, path in maps:
        if lo <= ram.address and ram.address + ram.size <= hi and _is_ram_mapping(perms, inode, path):
            return None
    return Unscannable(Reason.MAPPING_NOT_FOUND, f"process {ram.pid} no longer maps {ram.size} bytes at {ram.address:#x}")


def peer_pid(sock: socket.socket) -> int | None:
    """The PID of the process at the other end of a connected unix socket (SO_PEERCRED), or None.

    For a QMP socket that QEMU listens on, this is QEMU's PID even before
    QEMU accepts the connection: the kernel records the listener's
    credentials at listen().
    """
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    pid = struct.unpack("3i", creds)[0]
    return pid if pid > 0 else None


def qmp_socket_pid(path: str) -> int | Unscannable:
    """The PID of the process listening on the unix socket at path: connects, asks the kernel, closes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5.0)
        try:
            s.connect(path)
        except OSError as e:
            return Unscannable(Reason.NO_PID, f"cannot connect to {path}: {e.strerror or e}")
        pid = peer_pid(s)
    return pid if pid is not None else Unscannable(Reason.NO_PID, f"no peer credentials on {path}")


def _is_qemu(pid: int) -> Unscannable | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv0 = f.read().split(b"\0", 1)[0]
    except FileNotFoundError:
        return Unscannable(Reason.PROCESS_GONE, f"process {pid}")
    except PermissionError:
        return Unscannable(Reason.NO_PERMISSION, f"/proc/{pid}/cmdline")
    if b"qemu" not in os.path.basename(argv0):
        return Unscannable(Reason.NOT_QEMU, f"process {pid} runs {argv0.decode(errors='replace')!r}")
    return None


async def locate_qmp_guest(qmp: QmpClient) -> GuestRam | Unscannable:
    """The RAM of the guest behind an open QMP connection: QEMU's PID from the socket, the size from QMP."""
    from ..qmp import QmpClosed, QmpError, QmpTimeout

    pid = qmp.peer_pid
    if pid is None:
        return Unscannable(Reason.NO_PID, "no peer credentials on the QMP socket")
    try:
        summary = await qmp.execute("query-memory-size-summary")
    except (QmpError, QmpClosed, QmpTimeout) as e:
        return Unscannable(Reason.NO_SIZE, str(e))
    return locate_qemu(pid, int(summary.get("base-memory", 0)))


def locate_qemu(pid: int, size: int) -> GuestRam | Unscannable:
    """locate_ram, after checking that pid runs QEMU."""
    not_qemu = _is_qemu(pid)
    return not_qemu if not_qemu is not None else locate_ram(pid, size)


def libvirt_pid(name: str, state_dir: str = LIBVIRT_QEMU_STATE) -> int | Unscannable:
    """The QEMU PID of a running libvirt domain, from the pidfile libvirt's QEMU driver keeps."""
    path = os.path.join(state_dir, f"{name}.pid")
    try:
        with open(path) as f:
            return int(f.read().strip())
    except FileNotFoundError:
        return Unscannable(Reason.NO_PID, f"no pidfile {path} (is the domain running on this host's libvirtd?)")
    except PermissionError:
        return Unscannable(Reason.NO_PERMISSION, path)
    except ValueError:
        return Unscannable(Reason.NO_PID, f"{path} holds no PID")


def libvirt_base_memory(xml: str) -> int:
    """A domain's base RAM in bytes from its XML: <memory> less any hot-plugged DIMMs (mapped apart)."""
    units = {"b": 1, "bytes": 1, "k": 1024, "kib": 1024, "m": 1 << 20, "mib": 1 << 20, "g": 1 << 30, "gib": 1 << 30,
             "kb": 1000, "mb": 10**6, "gb": 10**9, "t": 1 << 40, "tib": 1 << 40, "tb": 10**12}  # fmt: skip

    def size(el: ET.Element | None) -> int:
        if el is None or not (el.text or "").strip():
            return 0
        return int(el.text.strip()) * units[el.get("unit", "KiB").lower()]

    root = ET.fromstring(xml)
    dimms = sum(size(dev.find("./target/size")) for dev in root.iterfind("./devices/memory"))
    return size(root.find("./memory")) - dimms


def locate_libvirt_guest(name: str, xml: str, state_dir: str = LIBVIRT_QEMU_STATE) -> GuestRam | Unscannable:
    """The RAM of a running libvirt domain, given its name and live XML (run in a worker thread: it reads /proc)."""
    pid = libvirt_pid(name, state_dir)
    if isinstance(pid, Unscannable):
        return pid
    return locate_qemu(pid, libvirt_base_memory(xml))
