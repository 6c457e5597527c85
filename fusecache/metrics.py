"""Prometheus metrics: the counters of `fusecache stats --json` in Prometheus' text format over HTTP.

prometheus_client's HTTP server answers scrapes in its own threads, and those
threads must never call into trio. So the trio side takes a stats snapshot
every second and replaces one reference; the collector only reads that
reference. Each snapshot is a fresh `MountStats` that nobody mutates after it is
published, so the scrape threads need no lock. Metrics carry counts and
names (images, guests, peers), never file content.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any

import trio
from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from fusecache.errors import QuietError
from fusecache.peers import PeerStats
from fusecache.stats import BalloonGuest, HealthStats, ImageCounters, MountStats, StoreStats

log = logging.getLogger(__name__)

REFRESH = 1.0  # seconds between snapshots: a scrape sees counters at most this old

# (stats key, metric name without _total, help) for the per-image counters
_IMAGE_COUNTERS = (
    ("reads", "fusecache_reads", "Read requests served, per image."),
    ("admitted_chunks", "fusecache_admitted_chunks", "Chunks admitted into the cache, per image."),
    ("writes", "fusecache_writes", "Write requests, per image."),
    ("write_bytes", "fusecache_write_bytes", "Bytes written through to the backing, per image."),
    ("invalidations", "fusecache_invalidations", "Times an image's cached chunks were invalidated (a write or a change behind our back)."),
)
_FETCH_COUNTERS = (
    ("critical_bytes", "fusecache_fetch_critical_bytes", "Bytes read from the backing while a request waited (its own pages)."),
    ("background_bytes", "fusecache_fetch_background_bytes", "Bytes read from the backing in the background (readahead, rest of chunks)."),
    ("readahead_chunks", "fusecache_fetch_readahead_chunks", "Chunks queued for readahead of sequential streams."),
    ("buffer_hits", "fusecache_fetch_buffer_hits", "Requests served from bytes fetched or being fetched for another request."),
    ("evicted_bytes", "fusecache_fetch_evicted_bytes", "Bytes of fetched blocks let go to keep the fetch buffer within its bound."),
    ("waited_requests", "fusecache_fetch_waited_requests", "Requests that waited for a backing read in flight (readahead caught up with)."),
    ("waited_seconds", "fusecache_fetch_waited_seconds", "Seconds requests spent waiting for backing reads already in flight."),
    ("peer_read_ahead_chunks", "fusecache_fetch_peer_read_ahead_chunks", "Chunks fetched ahead from peers for sequential streams."),
    ("peer_read_ahead_used", "fusecache_fetch_peer_read_ahead_used", "Chunks fetched ahead from peers that a request then read."),
    ("loop_reads", "fusecache_fetch_loop_reads", "Backing reads answered on the event loop, no thread hand-off (page cache, or NFS)."),
)
_ATTR_COUNTERS = (
    ("getattrs", "fusecache_getattrs", "The kernel's attribute requests (GETATTR) for regular files."),
    ("backing_stats", "fusecache_getattr_backing_stats", "GETATTRs of regular files answered by a stat of the backing."),
    ("direct_io_opens", "fusecache_direct_io_opens", "Opens with O_DIRECT, served with FUSE direct I/O."),
)
_READ_SOURCES = (("hit_bytes", "hit"), ("peer_bytes", "peer"), ("backing_bytes", "backing"))
_PEER_COUNTERS = (
    ("hits_given", "fusecache_peer_hits_given", "Chunks this host served to the peer."),
    ("hits_taken", "fusecache_peer_hits_taken", "Chunks the peer served to this host."),
    ("requests", "fusecache_peer_requests", "Requests sent to the peer."),
    ("not_found", "fusecache_peer_not_found", "Requests the peer answered with not found."),
    ("errors", "fusecache_peer_errors", "Requests to the peer that failed."),
    ("corrupt_blocks", "fusecache_peer_corrupt_blocks", "Chunks from the peer that failed their hash check."),
    ("bytes_in", "fusecache_peer_received_bytes", "Bytes received from the peer."),
    ("bytes_out", "fusecache_peer_sent_bytes", "Bytes sent to the peer."),
)


class StatsCollector(Collector):
    """Turns the latest published stats snapshot into metric families at each scrape."""

    def __init__(self) -> None:
        self.snapshot = MountStats()

    def collect(self) -> Iterator[Metric]:
        return iter(metric_families(self.snapshot))


def metric_families(stats: MountStats) -> list[Metric]:
    """The metric families for one mount's stats."""
    out: list[Metric] = []
    open_files = GaugeMetricFamily("fusecache_open_files", "Files open through the mount.")
    open_files.add_metric([], stats.open_files)
    out.append(open_files)
    if stats.started:
        started = GaugeMetricFamily("fusecache_start_time_seconds", "When the daemon started, seconds since the epoch.")
        started.add_metric([], stats.started)
        out.append(started)
    out += _image_families(stats.images)
    if stats.store is not None:
        out += _store_families(stats.store)
    if stats.health is not None:
        out += _health_families(stats.health)
    if stats.fetch is not None:
        out += _scalars(CounterMetricFamily, stats.fetch, _FETCH_COUNTERS)
    out += _scalars(CounterMetricFamily, stats.attrs, _ATTR_COUNTERS)
    if stats.balloon.guests:
        out += _balloon_families(stats.balloon.guests)
    if stats.peers.peers:
        out += _peer_families(stats.peers.peers)
    return out


def _image_families(images: dict[str, ImageCounters]) -> list[Metric]:
    read_bytes = CounterMetricFamily("fusecache_read_bytes", "Bytes read, per image and where they came from.", labels=["source", "image"])
    counters = [(key, CounterMetricFamily(name, text, labels=["image"])) for key, name, text in _IMAGE_COUNTERS]
    for image, c in images.items():
        for key, source in _READ_SOURCES:
            read_bytes.add_metric([source, image], getattr(c, key))
        for key, family in counters:
            family.add_metric([image], getattr(c, key))
    return [read_bytes, *(family for _, family in counters)]


def _scalars(kind: type[GaugeMetricFamily | CounterMetricFamily], source: object, table: Iterable[tuple[str, str, str]]) -> list[Metric]:
    """One family of `kind` per (field, name, help) of `table`, with no labels: its one sample is source.field."""
    out: list[Metric] = []
    for key, name, text in table:
        family = kind(name, text)
        family.add_metric([], getattr(source, key))
        out.append(family)
    return out


def _health_families(health: HealthStats) -> list[Metric]:
    state = GaugeMetricFamily(
        "fusecache_cache_state", "1 for the cache's state (caching, degraded: passthrough, rebuilding), 0 for the others.", labels=["state"]
    )
    for name in ("caching", "degraded", "rebuilding"):
        state.add_metric([name], 1 if health.state == name else 0)
    faults = CounterMetricFamily("fusecache_cache_faults", "Faults of the cache, per layer, served from the backing.", labels=["layer"])
    for layer, n in sorted(health.faults.items()):
        faults.add_metric([layer], n)
    degradations = CounterMetricFamily("fusecache_cache_degradations", "Times the cache degraded itself to passthrough.")
    degradations.add_metric([], health.degradations)
    return [state, faults, degradations]


def _store_families(store: StoreStats) -> list[Metric]:
    out = _scalars(GaugeMetricFamily, store, (
        ("capacity", "fusecache_cache_capacity_bytes", "The cache's size bound."),
        ("bytes_stored", "fusecache_cache_stored_bytes", "Bytes the cache holds (each shared page once)."),
        ("logical_bytes", "fusecache_cache_logical_bytes", "Bytes the cached chunks stand for (shared pages counted per use)."),
        ("dedup_ratio", "fusecache_cache_dedup_ratio", "Logical bytes over stored bytes."),
        ("chunks", "fusecache_cache_chunks", "Chunks held."),
    ))  # fmt: skip
    out += _scalars(CounterMetricFamily, store, (
        ("evicted_chunks", "fusecache_cache_evicted_chunks", "Chunks evicted to stay under the size bound."),
        ("verify_failures", "fusecache_cache_verify_failures", "Stored pages that failed their hash check (served as misses)."),
    ))  # fmt: skip
    if store.shares:
        held = GaugeMetricFamily(
            "fusecache_cache_share_held_bytes", "Bytes of chunks admitted for each owner (a guest, the host).", labels=["owner"]
        )
        share = GaugeMetricFamily(
            "fusecache_cache_share_bytes", "Each owner's share: what it keeps whatever others admit.", labels=["owner"]
        )
        for owner, sh in store.shares.items():
            held.add_metric([owner], sh.held_chunks * store.chunk_size)
            share.add_metric([owner], sh.share_chunks * store.chunk_size)
        out += [held, share]
    return out


def _balloon_families(guests: dict[str, BalloonGuest]) -> list[Metric]:
    running = GaugeMetricFamily("fusecache_guest_running", "1 if the guest runs now, 0 if it was seen and stopped.", labels=["guest"])
    target = GaugeMetricFamily("fusecache_balloon_target_bytes", "The guest's balloon target: memory it should keep.", labels=["guest"])
    actual = GaugeMetricFamily("fusecache_balloon_actual_bytes", "The guest's memory now.", labels=["guest"])
    shrinks = CounterMetricFamily("fusecache_balloon_shrinks", "Times the guest gave memory to its balloon.", labels=["guest"])
    evicted = CounterMetricFamily(
        "fusecache_balloon_evicted_estimate_bytes", "Page cache the guest is estimated to have dropped when it shrank.", labels=["guest"]
    )
    admitted = CounterMetricFamily("fusecache_balloon_admitted_bytes", "Bytes admitted because the guest shrank.", labels=["guest"])
    for name, g in guests.items():
        running.add_metric([name], 1 if g.running else 0)
        # a stopped guest has no memory figures: leave the series out rather than report a false zero
        if g.target is not None:
            target.add_metric([name], g.target)
        if g.actual is not None:
            actual.add_metric([name], g.actual)
        shrinks.add_metric([name], g.shrinks)
        evicted.add_metric([name], g.evicted_estimate)
        admitted.add_metric([name], g.admitted_bytes)
    return [running, target, actual, shrinks, evicted, admitted]


def _peer_families(peers: dict[str, PeerStats]) -> list[Metric]:
    up = GaugeMetricFamily("fusecache_peer_up", "1 if the peer is connected.", labels=["peer"])
    rtt = GaugeMetricFamily("fusecache_peer_rtt_seconds", "Round-trip time to the peer, last measured.", labels=["peer"])
    counters = [(key, CounterMetricFamily(name, text, labels=["peer"])) for key, name, text in _PEER_COUNTERS]
    for name, p in peers.items():
        up.add_metric([name], 1 if p.up else 0)
        if p.rtt_ms is not None:
            rtt.add_metric([name], p.rtt_ms / 1000)
        for key, family in counters:
            family.add_metric([name], getattr(p, key))
    return [up, rtt, *(family for _, family in counters)]


async def serve(
    address: tuple[str, int], stats: Callable[[], Awaitable[MountStats]], task_status: Any = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve /metrics on `address` until cancelled; `stats()` gives the mount's stats.

    Raises QuietError before `task_status.started()` if the address cannot be bound.
    """
    host, port = address
    collector = StatsCollector()
    collector.snapshot = await stats()  # the first scrape already sees real counters
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    ProcessCollector(registry=registry)  # the daemon's own CPU, memory and open fds
    try:
        server, _thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        msg = f"cannot serve metrics on {host}:{port}: {exc.strerror}; choose another --metrics ADDRESS:PORT"
        log.error("%s", msg)
        raise QuietError(msg)
    log.info("serving Prometheus metrics on http://%s:%d/metrics", host, port)
    task_status.started()
    failing = False
    try:
        while True:
            await trio.sleep(REFRESH)
            try:
                collector.snapshot = await stats()
                failing = False
            except Exception:
                # metrics are an observer: a bug here must not take the mount down; scrapes keep the last snapshot
                if not failing:
                    log.exception("taking a stats snapshot for metrics failed; scrapes see the last good one")
                failing = True
    finally:
        # shutdown() waits for the server's poll loop (up to 0.5 s): off the trio thread, and even when cancelled
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(server.shutdown)
        server.server_close()
