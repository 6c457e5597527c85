"""A mount's options: every default `fusecache mount` has, written once, and every size derived
from --cache-size. The command line's argparse defaults and help read them from here; the
daemon and `assemble` read `MountOptions`. A new option goes here first."""

from __future__ import annotations

import dataclasses
import os

from fusecache.geometry import PAGE_SIZE

ATTR_TIMEOUT = 1.0  # seconds the kernel may cache attributes
CACHE_SIZE = 2 << 30
MIN_CACHE_SIZE = 1 << 20  # below this the store cannot hold its own metadata usefully
ADMIT = "second-chance"
ADMIT_CHOICES = ("second-chance", "inclusive")
REVALIDATE = 2.0  # seconds between checks of an open file's version against the backing
PEER_TIMEOUT = 0.005  # seconds a miss waits for peers before it reads the backing
MAX_STAGING_SIZE = 256 << 20  # staging is a quarter of the cache, at most this
GUEST_SCAN_CPU = 0.05  # of one core, for the background scans of every guest's memory together (balloon-driven ones are extra)
PIN_BUDGET = 0.5  # the fraction of --cache-size pinned images may occupy
# `fusecache warm` fetches at most this many bytes/s by default (bench/warm.py measures what it costs guest reads).
WARM_RATE = 64 << 20


def pin_budget(cache_size: int, fraction: float) -> int:
    """Bytes pinned images may occupy: their allocated size on the backing, summed."""
    return int(cache_size * fraction)


def staging_size(cache_size: int) -> int:
    """The default staging buffer: recently read chunks kept so admission need not read them again."""
    return min(MAX_STAGING_SIZE, cache_size // 4)


def summary_pages(cache_size: int) -> int:
    """How many pages the peer summary is sized for: every page the cache can hold."""
    return cache_size // PAGE_SIZE


@dataclasses.dataclass
class MountOptions:
    backing: str
    mountpoint: str
    foreground: bool = False
    allow_other: bool = False
    debug: bool = False
    log_file: str | None = None
    ready_fd: int | None = None
    attr_timeout: float = ATTR_TIMEOUT
    cache: bool = True
    cache_dir: str | None = None
    cache_size: int = CACHE_SIZE
    reset_cache: bool = False
    admit: str = ADMIT
    balloon: list[str] = dataclasses.field(default_factory=list)
    staging_size: int | None = None  # None: derived from cache_size (`staging_bytes`)
    guest_scan: bool = True  # read guests' memory to know what they evicted (exact second chance); False: estimates only
    guest_scan_cpu: float = GUEST_SCAN_CPU
    revalidate: float = REVALIDATE
    metrics: tuple[str, int] | None = None
    listen: str | None = None
    peers: list[str] = dataclasses.field(default_factory=list)
    peer_allow: list[str] = dataclasses.field(default_factory=list)  # networks the peer server accepts besides --peer hosts
    cluster_key_file: str | None = None
    peer_insecure: bool = False
    peer_timeout: float = PEER_TIMEOUT
    pin: list[str] = dataclasses.field(default_factory=list)  # globs of images pinned at mount
    pin_budget: float = PIN_BUDGET  # a fraction of cache_size

    @property
    def staging_bytes(self) -> int:
        """The staging buffer's bound. Only admission on a guest's eviction reads it, and evictions are known only
        from a --balloon source (its shrinks, or scans of the guest RAM it locates): without one the default is none
        (`fusecache admit` reads the backing itself)."""
        if self.staging_size is not None:
            return self.staging_size
        return staging_size(self.cache_size) if self.balloon else 0

    @property
    def summary_pages(self) -> int:
        return summary_pages(self.cache_size)

    @property
    def pin_budget_bytes(self) -> int:
        return pin_budget(self.cache_size, self.pin_budget)

    @property
    def peering(self) -> bool:
        return bool(self.peers or self.listen)


def _mount_name(mountpoint: str) -> str:
    return os.path.realpath(mountpoint).strip("/").replace("/", "-") or "root"


def default_log_file(mountpoint: str) -> str:
    if os.geteuid() == 0:
        base = "/var/log/fusecache"
    else:
        base = os.path.join(os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state"), "fusecache")
    return os.path.join(base, f"{_mount_name(mountpoint)}.log")


def default_cache_dir(mountpoint: str) -> str:
    if os.geteuid() == 0:
        base = "/var/cache/fusecache"
    else:
        base = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fusecache")
    return os.path.join(base, _mount_name(mountpoint))
