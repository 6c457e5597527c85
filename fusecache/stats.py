"""The figures a mount reports, as types, and their one JSON form.

Each producer fills its own type (`Store.stats` -> `StoreStats`, admission
-> `AdmissionStats`, the read path -> `ImageCounters`, peers -> their
`PeerStats`/`RemoteStats`); `Mount.stats` puts them in one `MountStats`;
the control socket sends `to_json()`; `fusecache stats`, `fusecache top`,
the Prometheus exporter, the demo and the tests read it back with
`MountStats.from_json`. One name per figure: a new stat is a field here and
in its producer.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar

from fusecache.peers import HandshakeStats, PeerStats, RemoteStats

T = TypeVar("T")


@dataclasses.dataclass(slots=True)
class ImageCounters:
    """One image's reads and writes since the mount started."""

    reads: int = 0
    hit_bytes: int = 0
    peer_bytes: int = 0
    backing_bytes: int = 0
    hit_chunks: int = 0
    miss_chunks: int = 0
    admitted_chunks: int = 0
    writes: int = 0
    write_bytes: int = 0
    invalidations: int = 0

    @property
    def read_bytes(self) -> int:
        return self.hit_bytes + self.peer_bytes + self.backing_bytes


@dataclasses.dataclass
class ShareStats:
    """One owner's part of the cache: chunks held, and its share (chunks it keeps whoever else admits)."""

    held_chunks: int = 0
    share_chunks: int = 0


@dataclasses.dataclass
class StoreStats:
    """The store: how full, how deduplicated, and what its readers and writer did."""

    capacity: int = 0
    page_size: int = 0
    chunk_size: int = 0
    pages_used: int = 0
    bytes_stored: int = 0
    logical_bytes: int = 0
    dedup_ratio: float = 1.0
    chunks: int = 0
    max_chunks: int = 0
    hits: int = 0
    misses: int = 0
    admitted_chunks: int = 0
    skipped_chunks: int = 0
    evicted_chunks: int = 0
    dropped_chunks: int = 0
    verify_failures: int = 0
    healed_pages: int = 0
    evicted_resident: int = 0  # of evicted_chunks, chunks a scan found a guest still holding (evicted first)
    shares: dict[str, ShareStats] = dataclasses.field(default_factory=dict)  # per owner: a guest, "(host)", "(earlier run)"


@dataclasses.dataclass
class GuestAdmission:
    """What second-chance admission knows of one guest: its recent reads and what its shrinks admitted."""

    # How its evictions are known: "scan" (its memory is read: exact), "estimate" (balloon statistics, bounded by
    # what the host checks); "" for the host's own reads.
    mode: str = ""
    scan_off: str = ""  # why its memory is not scanned (no permission, its QEMU exited, --no-guest-scan), when it is not
    recent_bytes: int = 0
    recent_chunks: int = 0
    recent_limit: int = 0
    shrinks: int = 0
    evicted_estimate: int = 0
    admitted_chunks: int = 0
    admitted_bytes: int = 0
    from_staging: int = 0
    from_backing: int = 0
    by_reference: int = 0  # evicted chunks a peer already held: left there, not stored twice
    aged_out: int = 0  # bytes of reads the guest had dropped on its own before a shrink
    scans: int = 0
    scan_cpu_s: float = 0.0
    scanned_bytes: int = 0  # guest RAM read by scans, in total
    served_pages: int = 0  # pages in the index of what it was served (not yet judged evicted)
    evicted_pages: int = 0  # served pages scans found evicted (each once)
    resident_pages: int = 0  # served pages the last scan found still held by the guest


@dataclasses.dataclass
class AdmissionStats:
    mode: str = ""
    staging_bytes: int = 0
    staging_capacity: int = 0
    staged_chunks: int = 0
    guests: dict[str, GuestAdmission] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class BalloonGuest:
    """One guest as the balloon monitor sees it, with what admission did for it."""

    running: bool = False
    source: str | None = None
    images: list[str] = dataclasses.field(default_factory=list)
    actual: int | None = None
    target: int | None = None
    stats: dict[str, int] = dataclasses.field(default_factory=dict)
    shrinks: int = 0
    balloon_bytes: int = 0
    evicted_estimate: int = 0
    memory: int | None = None  # the guest's RAM size as the host knows it (QMP memory summary, libvirt maxMemory)
    mode: str = ""
    scan_off: str = ""
    recent_bytes: int = 0
    recent_chunks: int = 0
    recent_limit: int = 0
    admitted_chunks: int = 0
    admitted_bytes: int = 0
    from_staging: int = 0
    from_backing: int = 0
    by_reference: int = 0
    aged_out: int = 0
    scans: int = 0
    scan_cpu_s: float = 0.0
    scanned_bytes: int = 0  # guest RAM read by scans, in total
    served_pages: int = 0  # pages in the index of what it was served (not yet judged evicted)
    evicted_pages: int = 0  # served pages scans found evicted (each once)
    resident_pages: int = 0  # served pages the last scan found still held by the guest


@dataclasses.dataclass
class BalloonStats:
    sources: list[str] = dataclasses.field(default_factory=list)
    guests: dict[str, BalloonGuest] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class ClusterStats:
    """How much of this cache a peer also holds (sampled), and what crossed hosts."""

    chunks_also_on_peers: int = 0
    chunks_only_here: int = 0
    sampled: int = 0
    peer_bytes_taken: int = 0
    bytes_given: int = 0


@dataclasses.dataclass
class PeeringStats:
    listen: str | None = None
    peers: dict[str, PeerStats] = dataclasses.field(default_factory=dict)
    served: dict[str, RemoteStats] = dataclasses.field(default_factory=dict)
    cluster: ClusterStats = dataclasses.field(default_factory=ClusterStats)
    handshakes: HandshakeStats = dataclasses.field(default_factory=HandshakeStats)


@dataclasses.dataclass
class WarmProgress:
    """One `fusecache warm` job in the daemon: what it set out to read and how far it got."""

    id: int = 0
    images: list[str] = dataclasses.field(default_factory=list)
    state: str = "running"  # running, done, cancelled, failed
    total_bytes: int = 0  # the bytes of the ranges to warm
    done_bytes: int = 0  # of which looked at: already cached, or fetched
    cached_bytes: int = 0  # already cached: skipped
    peer_bytes: int = 0  # fetched from peers
    backing_bytes: int = 0  # fetched from the backing
    rate_limit: int = 0  # bytes/s fetched at most (0: no limit)
    started: float = 0.0  # time.time()
    elapsed: float = 0.0  # seconds running (up to now, or to the end)
    current: str = ""  # the image being warmed
    error: str | None = None


@dataclasses.dataclass
class PinInfo:
    """One pinned image: pinned by name (`fusecache pin` or --pin) or as part of a pinned overlay's backing chain."""

    image: str = ""
    chain: list[str] = dataclasses.field(default_factory=list)  # the image and its backing files in the mount, overlay first
    by: str = "pin"  # "pin", or "--pin GLOB"
    allocated_bytes: int = 0  # what the chain occupies on the backing: what the budget counts


@dataclasses.dataclass
class PinStats:
    budget: int = 0  # bytes
    allocated_bytes: int = 0  # of every pinned chain, counted once per file
    pins: list[PinInfo] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class ImageHoldings:
    """`fusecache ls`: what one image has in this cache."""

    image: str = ""
    ino: int = 0
    size: int | None = None  # on the backing; None when no name in the mount is known for it
    cached_bytes: int = 0
    chunks: int = 0
    pinned: bool = False
    pinned_by: str | None = None  # the image whose pin covers it (itself, or an overlay over it)
    shared_bytes: int = 0  # cached bytes whose pages another image holds too (dedup)
    peer_bytes: int = 0  # cached bytes of chunks a peer's summary says it holds too


@dataclasses.dataclass
class HealthStats:
    """The cache's state (`health.py`): caching, degraded (passthrough) or rebuilding, why, and the faults served from the backing."""

    state: str = "caching"
    reason: str = ""
    since: float = 0.0  # time.time() of the last change of state
    faults: dict[str, int] = dataclasses.field(default_factory=dict)  # layer -> faults served from the backing
    degradations: int = 0
    rebuilds: int = 0
    rebuild_failures: int = 0


@dataclasses.dataclass(slots=True)
class AttrStats:
    """The kernel's attribute requests for regular files (GETATTR), since the mount started (`fusecache.attrs`)."""

    getattrs: int = 0  # GETATTRs of regular files
    backing_stats: int = 0  # of which were answered by a stat of the backing (the rest: a stat of a moment before)
    direct_io_opens: int = 0  # opens with O_DIRECT, answered with FUSE's direct I/O (their reads ask no attributes)


@dataclasses.dataclass(slots=True)
class FetchStats:
    """The miss path's reads from the backing (`fusecache.fetch.Fetcher`), since the mount started."""

    critical_reads: int = 0  # reads a request waited for, its own pages
    critical_bytes: int = 0
    background_reads: int = 0  # the rest of chunks a stream touched, and readahead
    background_bytes: int = 0
    background_batches: int = 0  # hand-offs to a worker thread for them
    buffer_hits: int = 0  # requests whose pages were found buffered or in flight
    readahead_chunks: int = 0
    stale_dropped: int = 0
    # blocks the buffer let go to stay within its bound (least recently used first), and the bytes they held: a
    # buffer too small for what its guests read together re-reads those bytes from the backing
    evicted_blocks: int = 0
    evicted_bytes: int = 0
    # requests that waited for a read already in flight (readahead a stream caught up with, or a neighbour's read),
    # and for how long in all: readahead that falls behind its streams shows here
    waited_requests: int = 0
    waited_seconds: float = 0.0
    # reads of the backing answered on the event loop, no thread hand-off (`OffLoop.pread`: the host page cache of a
    # backing directory, or an NFS READ sent and waited for there): every request read, of any path
    loop_reads: int = 0
    loop_bytes: int = 0
    # chunks fetched ahead from peers for sequential streams (`PeerReads`), and how many of them a request then took
    peer_read_ahead_chunks: int = 0
    peer_read_ahead_used: int = 0


@dataclasses.dataclass
class MountStats:
    """Everything `fusecache stats --json` shows. With --no-cache, `store` and `admission` are None."""

    mountpoint: str = ""
    backing: str = ""
    pid: int = 0
    started: float = 0.0
    open_files: int = 0
    store: StoreStats | None = None
    admission: AdmissionStats | None = None
    images: dict[str, ImageCounters] = dataclasses.field(default_factory=dict)
    queue: int = 0  # changes queued for the store, not yet committed
    skipped_admissions: int = 0  # misses not admitted because the writer was too far behind
    balloon: BalloonStats = dataclasses.field(default_factory=BalloonStats)
    peers: PeeringStats = dataclasses.field(default_factory=PeeringStats)
    pins: PinStats = dataclasses.field(default_factory=PinStats)
    warms: list[WarmProgress] = dataclasses.field(default_factory=list)
    health: HealthStats | None = None  # None with --no-cache
    fetch: FetchStats | None = None  # None with --no-cache
    attrs: AttrStats = dataclasses.field(default_factory=AttrStats)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> MountStats:
        """The stats a daemon sent; fields it did not send keep their defaults, unknown ones are ignored."""
        return from_json(cls, obj)


def from_json(cls: type[T], obj: Any) -> T:
    """A dataclass (and the dataclasses inside it) from its `dataclasses.asdict` form."""
    return _decode(cls, obj)  # type: ignore[no-any-return]


def _decode(tp: Any, value: Any) -> Any:
    if value is None:
        return None
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        hints = typing.get_type_hints(tp)
        names = {f.name for f in dataclasses.fields(tp)}
        return tp(**{k: _decode(hints[k], v) for k, v in value.items() if k in names})
    origin = typing.get_origin(tp)
    if origin is dict:
        _, vt = typing.get_args(tp)
        return {k: _decode(vt, v) for k, v in value.items()}
    if origin is list:
        (it,) = typing.get_args(tp)
        return [_decode(it, v) for v in value]
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return _decode(inner[0], value) if len(inner) == 1 else value
    return value
