"""Reading what a guest holds from its memory, without changing the guest: exact second chance.

Owns: finding a guest's RAM in its QEMU process (`locate`), the per-guest
index of the pages fusecache served it (`served`), reading another process's
memory (`procmem`) and the scan that tells which served pages the guest
still holds and which it evicted (`scan`). A served page whose content is no
longer anywhere in the guest's RAM was evicted: that is what second chance
admits. Where a guest's memory cannot be read, every entry point returns an
`Unscannable` saying why instead of raising, and the caller falls back to
balloon estimates.

    served = ServedPages.for_ram(ram.size)          # per guest
    served.record(ino, gen, offset, data)           # on the read path, for each reply
    ram = await locate_qmp_guest(qmp)               # GuestRam or Unscannable
    result = await scanner.scan(ram, served)        # ScanResult or Unscannable
    for (ino, gen, chunk), pages in result.evicted.by_chunk().items(): ...
"""

from .locate import (
    GuestRam,
    Reason,
    Unscannable,
    libvirt_base_memory,
    libvirt_pid,
    locate_libvirt_guest,
    locate_qemu,
    locate_qmp_guest,
    locate_ram,
    peer_pid,
    qmp_socket_pid,
)
from .scan import GuestMemoryScanner, ScanBudget, ScanResult, scan
from .served import FINGERPRINT_WORDS, PAGE_RECORD_BYTES, Location, Locations, ServedPages, default_digest

__all__ = [
    "FINGERPRINT_WORDS",
    "PAGE_RECORD_BYTES",
    "GuestMemoryScanner",
    "GuestRam",
    "Location",
    "Locations",
    "Reason",
    "ScanBudget",
    "ScanResult",
    "ServedPages",
    "Unscannable",
    "default_digest",
    "libvirt_base_memory",
    "libvirt_pid",
    "locate_libvirt_guest",
    "locate_qemu",
    "locate_qmp_guest",
    "locate_ram",
    "peer_pid",
    "qmp_socket_pid",
    "scan",
]
