"""Building one mount's parts, in dependency order, and taking them down in reverse.

options -> backing -> store -> peer server and peer set -> store queue ->
files -> peer reads -> admission -> cache -> pins -> balloon monitor ->
control verbs (admit/drop, warm jobs, pin/unpin, ls). Every part gets what
it depends on in its constructor; each part's teardown is registered on an
AsyncExitStack right after it is built, so a failure at any step (a foreign
cache, a port in use) undoes exactly what was built. Background tasks (the
writer, admission, peers, the balloon monitor, warm jobs, the --pin task)
run in a nursery on the same stack, cancelled first on the way out. The
daemon (`daemon.py`) owns the process around it: checks, FUSE, readiness,
signals. A new part is built here, and nowhere else.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import trio

from fusecache import memory
from fusecache.admission import Admission, Inclusive, SecondChance
from fusecache.backing import OffLoop, open_backing
from fusecache.cache import Cache, Passthrough
from fusecache.commands import Commands
from fusecache.control import Handler
from fusecache.errors import QuietError, find_in
from fusecache.fetch import BUFFER_BYTES
from fusecache.files import Files
from fusecache.guestmem import GuestMemoryScanner
from fusecache.health import Health
from fusecache.listing import Listing
from fusecache.options import MountOptions, default_cache_dir
from fusecache.peer_reads import READY_BYTES, PeerReads
from fusecache.peers import HandshakeStats
from fusecache.pins import Pins
from fusecache.stats import AttrStats, BalloonGuest, BalloonStats, ClusterStats, MountStats, PeeringStats, StoreStats
from fusecache.store import Store
from fusecache.store_queue import MAX_PENDING_ADMIT_BYTES, StoreQueue
from fusecache.warming import Warmer

if TYPE_CHECKING:
    from fusecache.balloon import BalloonMonitor
    from fusecache.peers import PeerServer, PeerSet

log = logging.getLogger(__name__)

CLUSTER_COUNT_EVERY = 10.0  # seconds between counts of what a peer also holds


@dataclasses.dataclass
class Mount:
    """One mount's built parts; `cache` and what hangs off it are None with --no-cache."""

    opts: MountOptions
    backing: OffLoop
    root_ino: int
    data: Cache | Passthrough
    cache: Cache | None = None
    admission: Admission | None = None
    second_chance: SecondChance | None = None
    monitor: BalloonMonitor | None = None
    peer_server: PeerServer | None = None
    peer_set: PeerSet | None = None
    peer_reads: PeerReads | None = None
    commands: Commands | None = None
    warmer: Warmer | None = None
    pins: Pins | None = None
    listing: Listing | None = None
    started: float = dataclasses.field(default_factory=time.time)
    cluster: ClusterStats = dataclasses.field(default_factory=ClusterStats)

    def handlers(self) -> dict[str, Handler]:
        """The control verbs this mount answers besides stats."""
        out: dict[str, Handler] = {}
        for part in (self.commands, self.warmer, self.pins, self.listing):
            if part is not None:
                out.update(part.handlers())
        return out

    async def count_holdings(self) -> None:
        """Every few seconds: how much of this cache a peer also holds (the dedup across hosts)."""
        assert self.peer_reads is not None and self.cache is not None
        while True:
            also, only = await self.peer_reads.cluster_holdings()
            server = self.peer_server
            self.cluster = ClusterStats(
                chunks_also_on_peers=also,
                chunks_only_here=only,
                sampled=also + only,
                peer_bytes_taken=sum(c.peer_bytes for c in self.cache.images.values()),
                bytes_given=sum(s.bytes_out for s in server.stats().values()) if server is not None else 0,
            )
            await trio.sleep(CLUSTER_COUNT_EVERY)

    def stats(self, open_files: int, attrs: AttrStats) -> MountStats:
        """Every figure of this mount (`fusecache stats --json` is its JSON form); `attrs`: the FUSE layer's."""
        opts = self.opts
        out = MountStats(opts.mountpoint, opts.backing, os.getpid(), self.started, open_files, attrs=attrs)
        cache = self.cache
        if cache is not None:
            out.admission = cache.admission.stats()
            out.images = {name: dataclasses.replace(c) for name, c in sorted(cache.images.items())}
            try:
                out.store = cache.store.stats()
            except Exception as exc:  # a broken store does not take the figures down with it
                cache.health.fault("store.read", exc, "its figures are left out of stats")
                out.store = StoreStats()
            out.health = cache.health.stats()
            offloop = self.backing
            out.fetch = dataclasses.replace(cache.fetcher.counters, loop_reads=offloop.inline_reads, loop_bytes=offloop.inline_bytes)
            if self.peer_reads is not None:
                out.fetch.peer_read_ahead_chunks = self.peer_reads.read_ahead
                out.fetch.peer_read_ahead_used = self.peer_reads.read_ahead_used
            out.queue = cache.queue.queued
            out.skipped_admissions = cache.queue.skipped_admissions
        if self.pins is not None:
            out.pins = self.pins.stats()
        if self.warmer is not None:
            out.warms = self.warmer.progress()
        monitor = self.monitor
        guests = {name: BalloonGuest(**g) for name, g in monitor.snapshot()["guests"].items()} if monitor is not None else {}
        if out.admission is not None:
            for name, reads in out.admission.guests.items():
                guest = guests.setdefault(name, BalloonGuest())
                for field in dataclasses.fields(reads):
                    setattr(guest, field.name, getattr(reads, field.name))
        out.balloon = BalloonStats([str(s) for s in monitor.sources] if monitor is not None else [], guests)
        out.peers = PeeringStats(
            opts.listen,
            self.peer_set.stats() if self.peer_set is not None else {},
            self.peer_server.stats() if self.peer_server is not None else {},
            dataclasses.replace(self.cluster),
            self.peer_server.handshake_stats() if self.peer_server is not None else HandshakeStats(),
        )
        return out


@contextlib.asynccontextmanager
async def assemble(opts: MountOptions) -> AsyncIterator[Mount]:
    """Build every part of the mount `opts` describes; yield it running; tear it down on the way out.

    Raises QuietError (after tearing down what was built) when a part cannot be built.
    """
    async with contextlib.AsyncExitStack() as stack:
        if opts.cache:
            memory.keep_freed_memory()  # before any worker thread has a malloc arena of its own
        backing = open_backing(opts.backing)
        stack.callback(backing.shutdown)
        try:
            root = backing.lstat("")
        except OSError as exc:
            raise QuietError(f"cannot read the backing {opts.backing}: {exc.strerror}")
        offloop = OffLoop(backing)
        if not opts.cache:
            yield Mount(opts, offloop, root.ino, Passthrough(offloop))
            return

        cache_dir = opts.cache_dir or default_cache_dir(opts.mountpoint)
        store = Store(cache_dir, opts.cache_size, reset=opts.reset_cache, names_key=_names_key(opts))
        stack.push_async_callback(_close_store, store)  # last: after the queue has drained into it
        st = store.stats()
        log.info("cache %s: %d of %d bytes held, %d chunks", cache_dir, st.bytes_stored, st.capacity, st.chunks)

        peer_server, peer_set = _peers(opts, store)
        queue = StoreQueue(
            store,
            on_committed=peer_server.note_change if peer_server is not None else None,
            peer_holds=peer_set.may_hold if peer_set is not None else None,
            health=Health(),
        )
        stack.push_async_callback(queue.close)  # applies what is queued before the store closes
        files = Files(offloop, store, queue, revalidate=opts.revalidate)
        peer_reads = PeerReads(peer_set, files) if peer_set is not None else None

        second_chance: SecondChance | None = None
        admission: Admission
        if opts.admit == "inclusive":
            admission = Inclusive()
        else:
            second_chance = admission = SecondChance(
                opts.mountpoint,
                files,
                offloop,
                staging_bytes=opts.staging_bytes,
                peer_holds=peer_reads.holds if peer_reads is not None else None,
                scanner=GuestMemoryScanner(opts.guest_scan_cpu) if opts.guest_scan and opts.balloon else None,
            )
            if not opts.balloon:
                log.info("second-chance admission with no --balloon source: chunks enter the cache only by `fusecache admit`")
        cache = Cache(offloop, files, queue, admission, peer_reads=peer_reads)
        pins = Pins(opts.mountpoint, offloop, store, queue, budget=opts.pin_budget_bytes, globs=opts.pin)
        pin_matches = pins.check_globs(backing)  # inline: nothing is served yet; refuses a --pin over the budget
        warmer = Warmer(offloop, files, queue, peer_reads)

        monitor = None
        if opts.balloon and second_chance is not None:
            from fusecache.balloon import BalloonMonitor

            monitor = BalloonMonitor(
                opts.balloon,
                on_shrink=second_chance.on_shrink,
                on_guests=second_chance.on_guests,
                on_balloon=second_chance.on_balloon,
                locate_ram=second_chance.scanner is not None,
            )

        mount = Mount(
            opts, offloop, root.ino, cache,
            cache=cache, admission=admission, second_chance=second_chance, monitor=monitor,
            peer_server=peer_server, peer_set=peer_set, peer_reads=peer_reads, commands=Commands(offloop, files, queue),
            warmer=warmer, pins=pins, listing=Listing(offloop, files, pins, peer_reads),
        )  # fmt: skip

        nursery = await stack.enter_async_context(trio.open_nursery())
        stack.callback(nursery.cancel_scope.cancel)  # unwinds first: the tasks end before the queue drains
        nursery.start_soon(queue.run)
        nursery.start_soon(queue.watch)
        nursery.start_soon(admission.run)
        nursery.start_soon(cache.fetcher.run)  # background reads of the miss path (closes its own handles when cancelled)
        kept = BUFFER_BYTES + (opts.staging_bytes if second_chance is not None else MAX_PENDING_ADMIT_BYTES)
        kept += READY_BYTES if peer_reads is not None else 0
        nursery.start_soon(_touch_reserve, kept)
        await nursery.start(warmer.run)
        nursery.start_soon(pins.apply_globs, pin_matches)
        if monitor is not None:
            nursery.start_soon(monitor.run)
        if peer_server is not None:
            try:
                await nursery.start(peer_server.run)
            except (OSError, BaseExceptionGroup) as exc:
                err = find_in(exc, OSError)
                if err is None:
                    raise
                raise QuietError(f"cannot listen for peers on {opts.listen}: {err.strerror}; choose another --listen address")
            log.info("serving peers on %s", opts.listen)
        if peer_set is not None:
            await nursery.start(peer_set.run)
            nursery.start_soon(mount.count_holdings)
            assert peer_reads is not None
            nursery.start_soon(peer_reads.run)  # readahead from peers
        yield mount


async def _touch_reserve(nbytes: int) -> None:
    """The memory the cache's buffers keep alive at most, touched now rather than on the first cold pass."""
    t0 = time.monotonic()
    touched = await trio.to_thread.run_sync(memory.touch, nbytes)
    log.info(
        "memory reserve: %d MiB touched in %.1f s (the process has %d MiB in huge pages)",
        touched >> 20, time.monotonic() - t0, memory.huge_page_bytes() >> 20,
    )  # fmt: skip


async def _close_store(store: Store) -> None:
    """Marks a clean shutdown; runs even when the mount is being cancelled."""
    with trio.CancelScope(shield=True):
        await trio.to_thread.run_sync(store.close)


def cluster_key(opts: MountOptions) -> bytes | None:
    """The key peers authenticate with; refuses peering without one unless --peer-insecure on loopback."""
    if not opts.peering:
        return None
    if not opts.cache:
        raise QuietError("--peer and --listen share the cache: they cannot be used with --no-cache")
    from fusecache.peers.protocol import INSECURE_REFUSED, load_cluster_key, session_key

    if opts.cluster_key_file:
        key = load_cluster_key(opts.cluster_key_file)
    elif opts.peer_insecure:
        key = None
    else:
        raise QuietError(INSECURE_REFUSED)
    session_key(key, [*opts.peers, *([opts.listen] if opts.listen else [])])  # refuses insecure peering off loopback
    if opts.listen and not opts.peers and not opts.peer_allow:
        raise QuietError(f"--listen {opts.listen} would accept no one: peers connect only from --peer hosts and --peer-allow networks; "
                         "add --peer HOST:PORT or --peer-allow CIDR")
    for net in opts.peer_allow:
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            raise QuietError(f"--peer-allow {net} is not a network: write it as an address or CIDR, e.g. 10.0.0.0/24")
    return key


def _names_key(opts: MountOptions) -> bytes | None:
    """The key the store names pages with: the cluster's when peering (all hosts name a page alike), else the cache's own."""
    if not opts.peering:
        return None
    from fusecache.peers.protocol import names_key

    return names_key(cluster_key(opts))


def _peers(opts: MountOptions, store: Store) -> tuple[PeerServer | None, PeerSet | None]:
    """The peer server and peer set this mount's options ask for (the server is started later)."""
    if not opts.peering:
        return None, None
    from fusecache.peers import PeerServer, PeerSet

    key = cluster_key(opts)
    server = (
        PeerServer(opts.listen, key, store, capacity_pages=opts.summary_pages, allow=[*opts.peers, *opts.peer_allow])
        if opts.listen
        else None
    )
    peerset = PeerSet(opts.peers, key, fetch_timeout=opts.peer_timeout, server=server) if opts.peers else None
    return server, peerset
