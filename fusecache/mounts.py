"""What is mounted where, read from /proc/self/mountinfo, and where each mount keeps its runtime files.

Checks never stat a mountpoint: a FUSE mount whose daemon died answers every
stat with ENOTCONN, and a hung one does not answer at all.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re

FSTYPE = "fuse.fusecache"


@dataclasses.dataclass(frozen=True)
class MountEntry:
    mountpoint: str
    fstype: str
    source: str
    device: str  # "major:minor", names the mount's bdi in /sys/class/bdi


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounts() -> list[MountEntry]:
    entries = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            rfields = right.split()
            if len(fields) < 5 or len(rfields) < 2:
                continue
            entries.append(MountEntry(_unescape(fields[4]), rfields[0], _unescape(rfields[1]), fields[2]))
    return entries


def find_mount(mountpoint: str) -> MountEntry | None:
    """The mount at exactly `mountpoint` (the last one, if several are stacked), or None.

    The path is only normalised, never resolved: resolving stats the mount itself.
    """
    mp = os.path.abspath(mountpoint)
    found = None
    for m in mounts():
        if m.mountpoint == mp:
            found = m
    return found


def fusecache_mounts() -> list[MountEntry]:
    return [m for m in mounts() if m.fstype == FSTYPE]


def runtime_dir(mountpoint: str) -> str:
    """Where the daemon for `mountpoint` keeps its pid file and control socket (owner-only)."""
    if os.geteuid() == 0:
        base = "/run/fusecache"
    else:
        base = os.path.join(os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/fusecache-{os.getuid()}", "fusecache")
    key = hashlib.sha256(os.path.abspath(mountpoint).encode()).hexdigest()[:16]
    return os.path.join(base, key)
