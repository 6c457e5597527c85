"""The balloon monitor: which guests run, which images they have open, and when they shrink.

Owns: following guests through their sources (QEMU QMP sockets, libvirt),
each guest's memory state (balloon actual and target, the guest's own
memory statistics), and turning balloon inflation into `Shrink` reports for
admission. It knows nothing of the cache or the store: the caller decides
what a shrink means (second-chance admission of that guest's oldest reads).

Sources (`--balloon SPEC`, repeatable):

- `qmp:/path/to/sock`: one QEMU's QMP socket. The monitor turns on the
  balloon's statistics polling (`guest-stats-polling-interval`), follows
  BALLOON_CHANGE events and polls `query-balloon` and `guest-stats` every
  second; `query-block` gives the images (whole backing chains).
- `libvirt`, `libvirt:URI` or a bare `qemu...://` URI: every running domain
  of that libvirt daemon, followed as domains start and stop, by polling
  `listAllDomains`, `memoryStats()` and the live domain XML every second.
  libvirt-python blocks, so every call runs in a worker thread (one at a
  time per connection), never on the trio loop.

A guest that disappears, a socket that closes, libvirtd restarting: logged
once, retried with capped exponential backoff; `run()` never raises.

How a shrink is measured (`_ShrinkTracker`): while the balloon holds still,
the baseline (balloon actual and the guest's page cache, `stat-disk-caches`)
follows the guest. When actual falls, the monitor waits until the balloon
has held still and the guest has sent two statistics samples, taken after
the last change, that agree on the page cache (the guest's kswapd goes on
reclaiming a little after the balloon stops), or until STATS_WAIT has
passed; then it reports the whole drop since the baseline as one Shrink and
takes the current state as the new baseline. An inflation still moving after
PENDING_MAX is reported in parts. With 1 s statistics this puts a Shrink
about 2-3 s after the balloon stops.

What a guest reports is not trusted beyond what the host can check: the
balloon's `actual` and `stat-disk-caches` both come from the guest. A
shrink is capped by the guest's RAM size (QMP `query-memory-size-summary`,
libvirt's maximum memory: set by the host) and, where the source reports
a target (libvirt's current memory, `dom.info()`), by the drop from the
baseline down to it. That cap is weak: libvirt updates a running domain's
current memory from the balloon's BALLOON_CHANGE events, i.e. from the
guest. QEMU does not tell one QMP client the balloon target another client
set. So the bound relied on is the RAM size; the further bounds are
admission's (each read taken once, per-guest shares of the cache). `Shrink.cache_before_at` says
when the baseline's page-cache figure was reported, so admission can add
what the guest read since.
"""

from __future__ import annotations

import json
import logging
import os
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from .errors import QuietError
from .qmp import QmpClient, QmpClosed, QmpError, QmpTimeout, open_qmp

log = logging.getLogger(__name__)

POLL_INTERVAL = 1.0  # seconds between polls of each guest; also the guest's stats polling interval
IMAGES_EVERY = 5  # re-read a guest's images every this many polls (disks are rarely hot-plugged)
BACKOFF_START = 0.5
BACKOFF_CAP = 30.0
SHRINK_MIN = 1 << 20  # smaller balloon moves are noise (the guest rounds to pages and chunks)
STATS_WAIT = 5.0  # after the balloon stops, wait this long at most for fresh guest statistics
PENDING_MAX = 15.0  # report a long, still-moving inflation in parts at least this often
LIBVIRT_CALL_TIMEOUT = 30.0

SPEC_FORMS = "qmp:/path/to/qmp.sock, libvirt, libvirt:URI or a qemu:///... URI"

# libvirt's memoryStats() keys, in KiB (fault counts are counts), renamed to QEMU's guest-stats names.
_LIBVIRT_STATS = {
    "swap_in": "stat-swap-in",
    "swap_out": "stat-swap-out",
    "major_fault": "stat-major-faults",
    "minor_fault": "stat-minor-faults",
    "unused": "stat-free-memory",
    "available": "stat-total-memory",
    "usable": "stat-available-memory",
    "disk_caches": "stat-disk-caches",
    "hugetlb_pgalloc": "stat-htlb-pgalloc",
    "hugetlb_pgfail": "stat-htlb-pgfail",
}
_LIBVIRT_COUNTS = {"major_fault", "minor_fault", "hugetlb_pgalloc", "hugetlb_pgfail"}


@dataclass(frozen=True)
class QmpSource:
    """One QEMU's QMP socket."""

    path: str

    def __str__(self) -> str:
        return f"qmp:{self.path}"


@dataclass(frozen=True)
class LibvirtSource:
    """A libvirt connection; uri None means libvirt's default."""

    uri: str | None

    def __str__(self) -> str:
        return f"libvirt:{self.uri}" if self.uri else "libvirt"


Source = QmpSource | LibvirtSource


def parse_source(spec: str) -> Source:
    """A balloon source spec, validated; QuietError naming the spec and the accepted forms if it is bad."""
    if spec.startswith("qmp:"):
        path = spec[4:]
        if path.startswith("//"):
            path = path[2:]
        if path and not path.endswith("/"):
            return QmpSource(os.path.abspath(path))
    elif spec == "libvirt":
        _need_libvirt(spec)
        return LibvirtSource(None)
    elif spec.startswith("libvirt:") and spec[8:]:
        _need_libvirt(spec)
        return LibvirtSource(spec[8:])
    elif spec.split("://", 1)[0].split("+", 1)[0] == "qemu" and "://" in spec:
        _need_libvirt(spec)
        return LibvirtSource(spec)
    raise QuietError(f"bad balloon source {spec!r}: expected {SPEC_FORMS}")


def _need_libvirt(spec: str) -> None:
    try:
        import libvirt  # noqa: F401
    except ImportError:
        raise QuietError(f"balloon source {spec!r} needs libvirt-python: pip install 'fusecache[libvirt]'")


@dataclass
class GuestState:
    """One running guest as the monitor sees it."""

    name: str
    images: list[str]  # absolute host paths of the files the guest has open as disks, backing chains included
    actual: int  # guest memory now, bytes (balloon 'actual')
    target: int | None  # what the host asked the balloon for, bytes; None when the source cannot tell (QMP)
    stats: dict[str, int]  # guest statistics by QEMU's names (stat-disk-caches, stat-free-memory, ...), bytes; fault counts are counts
    source: str = ""
    memory: int | None = None  # RAM the host gave the guest, bytes (a bound on anything it reports); None: not known


@dataclass
class Shrink:
    """A guest gave up memory to its balloon.

    evicted_estimate is how many bytes of page cache the guest most likely
    dropped. When the guest reports `stat-disk-caches`: the fall of that
    statistic from just before the balloon moved to a sample taken after it
    stopped and the cache stopped falling, clamped to [0, balloon_bytes]
    (beyond what the balloon took, a fall is the guest's own doing, e.g.
    deleted files, not eviction). When the guest reports no statistics, or
    none fresh within STATS_WAIT: balloon_bytes itself (the balloon takes
    free memory first, so this overestimates for a guest with much free
    memory). balloon_bytes is what the guest reports, capped by what the
    host can check (the module docstring).
    """

    guest: str
    images: list[str]
    balloon_bytes: int  # how much the balloon took since the last report
    evicted_estimate: int
    cache_before: int | None = None  # the guest's page cache (stat-disk-caches) just before the balloon moved
    cache_before_at: float | None = None  # time.monotonic() when cache_before was reported (None: not known)


@dataclass
class _Totals:
    shrinks: int = 0
    balloon_bytes: int = 0
    evicted_estimate: int = 0


class _ShrinkTracker:
    """Per-guest shrink accounting over successive polls (see the module docstring)."""

    def __init__(self, actual: int, cache: int | None, memory: int | None = None, now: float | None = None) -> None:
        self.memory = memory
        actual = self._clamp(actual)
        self.base_actual = actual
        self.base_cache = self._clamp(cache) if cache is not None else None
        self.base_at: float | None = now  # when base_cache was reported
        self.pending_since: float | None = None
        self.last_actual = actual
        self.changed_at = 0.0
        self.changed_stamp: int | None = None
        self.sample: tuple[int, int] | None = None  # (stamp, cache) of the last sample taken after the balloon stopped

    def _clamp(self, n: int) -> int:
        """A figure the guest reports, within what it can have: [0, its RAM]."""
        return max(0, min(n, self.memory)) if self.memory is not None else max(0, n)

    def update(
        self, actual: int, cache: int | None, stamp: int | None, now: float, target: int | None = None
    ) -> tuple[int, int, int | None, float | None] | None:
        """Feed one poll: (balloon_bytes, evicted_estimate, cache_before, cache_before_at) when a shrink is complete, else None.

        cache is stat-disk-caches in bytes (None if the guest does not report
        it); stamp is the guest's last statistics update (any increasing
        counter: QEMU's last-update seconds; None if the source has none);
        target is what the host asked the balloon for (None: not known).
        """
        actual = self._clamp(actual)
        cache = self._clamp(cache) if cache is not None else None
        if self.pending_since is None:
            if actual > self.base_actual - SHRINK_MIN:
                self.base_actual, self.base_cache, self.last_actual = actual, cache, actual
                self.base_at = _reported_at(stamp, now)
                return None
            self.pending_since = now
        if actual != self.last_actual:
            self.last_actual, self.changed_at, self.changed_stamp = actual, now, stamp
            self.sample = None
            if now - self.pending_since < PENDING_MAX:
                return None
        # A balloon still moving after PENDING_MAX is reported in parts, each against the latest sample.
        too_long = now - self.pending_since >= PENDING_MAX
        waited = too_long or now - self.changed_at >= STATS_WAIT
        fresh = stable = False
        if cache is not None and stamp is None:
            # No timestamps: trust the statistics once the balloon has been still for STATS_WAIT.
            fresh = stable = waited
        elif cache is not None and stamp is not None and (too_long or self.changed_stamp is None or stamp > self.changed_stamp):
            # Sampled after the balloon stopped. The guest's kswapd may still be reclaiming towards its
            # watermark, so wait for two such samples that agree before taking the cache's fall.
            fresh = True
            if self.sample is None or stamp != self.sample[0]:
                stable = self.sample is not None and abs(cache - self.sample[1]) < SHRINK_MIN
                self.sample = (stamp, cache)
        if not stable and not waited:
            return None
        balloon = self.base_actual - actual
        if target is not None:
            # the host asked the balloon to go from the baseline down to target: a larger drop is the guest's claim
            balloon = min(balloon, max(self.base_actual - self._clamp(target), 0))
        cache_before, cache_before_at = self.base_cache, self.base_at
        if fresh and self.base_cache is not None and cache is not None:
            evicted = min(max(self.base_cache - cache, 0), max(balloon, 0))
        else:
            evicted = max(balloon, 0)
        self.base_actual, self.base_cache, self.base_at = actual, cache, _reported_at(stamp, now)
        self.pending_since = None
        self.last_actual, self.changed_stamp, self.sample = actual, None, None
        if balloon < SHRINK_MIN:
            return None
        return balloon, evicted, cache_before, cache_before_at


def _reported_at(stamp: int | None, now: float) -> float:
    """time.monotonic() of a statistics report stamped `stamp` (wall-clock seconds, QEMU's and libvirt's), else now.

    The stamp is the host's (QEMU notes when the report arrived), rounded down: never later than the report.
    """
    if stamp is None:
        return now
    return now - max(0.0, time.time() - stamp)


class _Backoff:
    """Capped exponential backoff that logs a failure once, not at every retry."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.delay = BACKOFF_START
        self.failing: str | None = None

    def ok(self) -> None:
        if self.failing is not None:
            log.info("balloon: %s: back", self.what)
        self.failing = None
        self.delay = BACKOFF_START

    def failed(self, err: BaseException) -> None:
        # Nurseries wrap a lone failure in a group: log the failure itself.
        while isinstance(err, BaseExceptionGroup) and len(err.exceptions) == 1:
            err = err.exceptions[0]
        msg = f"{type(err).__name__}: {err}"
        if msg != self.failing:
            if isinstance(err, (OSError, QmpError, QmpTimeout, QmpClosed)) or type(err).__name__ == "libvirtError":
                log.warning("balloon: %s: %s (retrying every <= %.0f s)", self.what, msg, BACKOFF_CAP)
            else:
                log.error("balloon: %s: unexpected failure (retrying)", self.what, exc_info=err)
        self.failing = msg

    async def sleep(self) -> None:
        await trio.sleep(self.delay)
        self.delay = min(self.delay * 2, BACKOFF_CAP)


class BalloonMonitor:
    """Follows every source's guests; calls on_shrink when one gives memory to its balloon.

    on_guests is called with the whole `guests` dict whenever a guest appears,
    disappears or its images change (not on every statistics poll). Both
    callbacks run on the trio loop and must not block; an exception from one
    is logged and the monitor carries on.
    """

    def __init__(
        self,
        sources: list[str],
        on_shrink: Callable[[Shrink], None],
        on_guests: Callable[[dict[str, GuestState]], None],
    ) -> None:
        self.sources = [parse_source(s) for s in sources]
        self.on_shrink = on_shrink
        self.on_guests = on_guests
        self.guests: dict[str, GuestState] = {}
        self._totals: dict[str, _Totals] = {}
        self._trackers: dict[str, _ShrinkTracker] = {}

    async def run(self) -> None:
        """Follow every source until cancelled."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.sleep_forever)  # with no sources, still run until cancelled
            for src in self.sources:
                if isinstance(src, QmpSource):
                    nursery.start_soon(self._follow_qmp, src)
                else:
                    nursery.start_soon(self._follow_libvirt, src)

    def snapshot(self) -> dict[str, Any]:
        """JSON-able view for stats and `fusecache top`: every guest seen, running or not."""
        out: dict[str, Any] = {}
        for name in sorted(set(self.guests) | set(self._totals)):
            g = self.guests.get(name)
            t = self._totals.get(name, _Totals())
            out[name] = {
                "running": g is not None,
                "source": g.source if g else None,
                "images": list(g.images) if g else [],
                "actual": g.actual if g else None,
                "target": g.target if g else None,
                "stats": dict(g.stats) if g else {},
                "shrinks": t.shrinks,
                "balloon_bytes": t.balloon_bytes,
                "evicted_estimate": t.evicted_estimate,
                "memory": g.memory if g else None,
            }
        return {"guests": out}

    # -- shared bookkeeping

    def _claim_name(self, name: str, source: Source) -> str:
        """A guest key unique across sources: two QEMUs may share a -name."""
        g = self.guests.get(name)
        if g is None or g.source == str(source):
            return name
        return f"{name}@{source}"

    def _guest_up(self, state: GuestState) -> None:
        self.guests[state.name] = state
        self._totals.setdefault(state.name, _Totals())
        self._trackers[state.name] = _ShrinkTracker(state.actual, state.stats.get("stat-disk-caches"), state.memory, time.monotonic())
        log.info("balloon: guest %s up (%s), images %s", state.name, state.source, state.images)
        self._notify_guests()

    def _guest_down(self, name: str) -> None:
        if self.guests.pop(name, None) is not None:
            self._trackers.pop(name, None)
            log.info("balloon: guest %s gone", name)
            self._notify_guests()

    def _observe(
        self, name: str, actual: int, target: int | None, stats: dict[str, int], stamp: int | None, images: list[str] | None
    ) -> None:
        """One poll's worth of a guest's state: update the live view, report a finished shrink."""
        g = self.guests[name]
        g.actual, g.target, g.stats = actual, target, stats
        if images is not None and images != g.images:
            g.images = images
            self._notify_guests()
        result = self._trackers[name].update(actual, stats.get("stat-disk-caches"), stamp, time.monotonic(), target)
        if result is None:
            return
        balloon_bytes, evicted, cache_before, cache_before_at = result
        t = self._totals[name]
        t.shrinks += 1
        t.balloon_bytes += balloon_bytes
        t.evicted_estimate += evicted
        shrink = Shrink(
            guest=name, images=list(g.images), balloon_bytes=balloon_bytes, evicted_estimate=evicted,
            cache_before=cache_before, cache_before_at=cache_before_at,
        )  # fmt: skip
        log.info("balloon: %s shrank by %d MiB, evicted ~%d MiB", name, balloon_bytes >> 20, evicted >> 20)
        try:
            self.on_shrink(shrink)
        except Exception:
            log.exception("balloon: on_shrink failed for %s", name)

    def _notify_guests(self) -> None:
        try:
            self.on_guests(self.guests)
        except Exception:
            log.exception("balloon: on_guests failed")

    # -- QMP

    async def _follow_qmp(self, src: QmpSource) -> None:
        backoff = _Backoff(str(src))
        while True:
            name: list[str] = []  # set once the guest is registered, so it can be removed whatever happens
            try:
                async with open_qmp(src.path) as qmp:
                    await self._serve_qmp(qmp, src, backoff, name)
                raise QmpClosed("QMP connection closed (the guest shut down or was killed)")
            except Exception as e:
                backoff.failed(e)
            finally:
                if name:
                    self._guest_down(name[0])
            await backoff.sleep()

    async def _serve_qmp(self, qmp: QmpClient, src: QmpSource, backoff: _Backoff, registered: list[str]) -> None:
        qname = (await qmp.execute("query-name")).get("name") or os.path.splitext(os.path.basename(src.path))[0]
        device = await _find_balloon(qmp)
        if device is None:
            raise QmpError("qom-list", "DeviceNotFound", "the guest has no virtio-balloon device")
        interval = await qmp.execute("qom-get", {"path": device, "property": "guest-stats-polling-interval"})
        if not interval or interval > POLL_INTERVAL:
            await qmp.execute("qom-set", {"path": device, "property": "guest-stats-polling-interval", "value": int(POLL_INTERVAL)})
        actual, stats, stamp = await _qmp_memory(qmp, device)
        images = _block_images(await qmp.execute("query-block"))
        name = self._claim_name(qname, src)
        memory = await _qmp_ram_size(qmp)
        self._guest_up(GuestState(name=name, images=images, actual=actual, target=None, stats=stats, source=str(src), memory=memory))
        registered.append(name)
        backoff.ok()
        wake = trio.Event()
        async with trio.open_nursery() as nursery:

            async def follow_events() -> None:
                # BALLOON_CHANGE (QEMU sends at most one a second) polls at once rather than at the next tick.
                async for event in qmp.events:
                    if event.get("event") == "BALLOON_CHANGE":
                        wake.set()
                    elif event.get("event") == "SHUTDOWN":
                        break
                nursery.cancel_scope.cancel()

            nursery.start_soon(follow_events)
            polls = 0
            while True:
                with trio.move_on_after(POLL_INTERVAL):
                    await wake.wait()
                wake = trio.Event()
                polls += 1
                actual, stats, stamp = await _qmp_memory(qmp, device)
                images = _block_images(await qmp.execute("query-block")) if polls % IMAGES_EVERY == 0 else None
                self._observe(name, actual, None, stats, stamp, images)

    # -- libvirt

    async def _follow_libvirt(self, src: LibvirtSource) -> None:
        import libvirt

        # libvirt prints every error to stderr by default; the monitor logs what matters itself.
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
        backoff = _Backoff(str(src))

        while True:
            # One call at a time on a connection. A fresh limiter per connection: a call stuck on a hung
            # libvirtd keeps its thread (and token) until it returns, and must not hold up the next connection.
            limiter = trio.CapacityLimiter(1)

            async def call(fn: Callable[..., Any], *args: Any, limiter: trio.CapacityLimiter = limiter) -> Any:
                # Without a libvirt event loop there are no keepalives: a hung daemon is noticed by this timeout.
                with trio.move_on_after(LIBVIRT_CALL_TIMEOUT):
                    return await trio.to_thread.run_sync(fn, *args, limiter=limiter, abandon_on_cancel=True)
                raise TimeoutError(f"libvirt did not answer {getattr(fn, '__name__', fn)} in {LIBVIRT_CALL_TIMEOUT:.0f} s")

            mine: dict[str, str] = {}  # domain UUID -> guest name, for the guests this source registered
            conn = None
            try:
                conn = await call(libvirt.open, src.uri)
                backoff.ok()
                polls = 0
                while True:
                    want_images = set(mine) if polls % IMAGES_EVERY == 0 else set()
                    domains = await call(_libvirt_poll, conn, set(mine), want_images)
                    polls += 1
                    for uuid in set(mine) - set(domains):
                        self._guest_down(mine.pop(uuid))
                    for uuid, d in domains.items():
                        if uuid not in mine:
                            name = self._claim_name(d["name"], src)
                            mine[uuid] = name
                            self._guest_up(
                                GuestState(name, d["images"] or [], d["actual"], d["target"], d["stats"], str(src), memory=d["memory"])
                            )
                        else:
                            self._observe(mine[uuid], d["actual"], d["target"], d["stats"], d["stamp"], d["images"])
                    await trio.sleep(POLL_INTERVAL)
            except Exception as e:
                backoff.failed(e)
            finally:
                for name in mine.values():
                    self._guest_down(name)
                if conn is not None:
                    with trio.CancelScope(shield=True):
                        try:
                            await call(conn.close)
                        except Exception:
                            pass  # a connection whose daemon went away may fail to close: nothing to do
            await backoff.sleep()


async def _find_balloon(qmp: QmpClient) -> str | None:
    """The QOM path of the guest's virtio-balloon device (PCI or CCW proxy), or None.

    Devices with an id live under /machine/peripheral (libvirt names it
    balloon0), others under /machine/peripheral-anon/device[N]; both are
    searched by type rather than trusting a fixed path.
    """
    for parent in ("/machine/peripheral", "/machine/peripheral-anon"):
        try:
            children = await qmp.execute("qom-list", {"path": parent})
        except QmpError:
            continue
        for child in children:
            ctype = child.get("type", "")
            if ctype.startswith("child<virtio-balloon"):
                return f"{parent}/{child['name']}"
    return None


async def _qmp_ram_size(qmp: QmpClient) -> int | None:
    """The guest's base RAM, bytes, as QEMU was started with it (not the guest's claim); None if QEMU cannot say."""
    try:
        size = (await qmp.execute("query-memory-size-summary")).get("base-memory")
    except QmpError:
        return None
    return int(size) if isinstance(size, int) and size > 0 else None


def _clean_stats(raw: dict[str, Any]) -> dict[str, int]:
    # QEMU reports a statistic the guest never sent as -1, which reaches JSON as 2**64 - 1.
    return {k: int(v) for k, v in raw.items() if isinstance(v, int) and 0 <= v < 1 << 63}


async def _qmp_memory(qmp: QmpClient, device: str) -> tuple[int, dict[str, int], int | None]:
    """(balloon actual, guest stats, stats timestamp) of a QMP guest."""
    actual = int((await qmp.execute("query-balloon"))["actual"])
    try:
        gs = await qmp.execute("qom-get", {"path": device, "property": "guest-stats"})
    except QmpError:
        # "guest hasn't updated any stats yet": its driver is not loaded yet, or it never reports statistics.
        return actual, {}, None
    return actual, _clean_stats(gs.get("stats", {})), gs.get("last-update") or None


def _json_filenames(spec: Any) -> list[str]:
    """The file names inside a `json:{...}` pseudo-filename (QEMU uses one for images with options)."""
    if isinstance(spec, dict):
        names = [spec["filename"]] if isinstance(spec.get("filename"), str) else []
        return names + [n for k, v in spec.items() if k != "filename" for n in _json_filenames(v)]
    if isinstance(spec, list):
        return [n for v in spec for n in _json_filenames(v)]
    return []


def _block_images(devices: list[dict[str, Any]]) -> list[str]:
    """Absolute paths of every image in query-block's answer, following backing chains."""
    out: list[str] = []
    for dev in devices:
        image = dev.get("inserted", {}).get("image")
        while image:
            fname = image.get("filename", "")
            try:
                names = _json_filenames(json.loads(fname[5:])) if fname.startswith("json:") else [fname]
            except ValueError:
                names = []  # not JSON after all: no path to take from it
            for n in names:
                # Only local files: nbd://, iscsi:// and friends have no host path to map to a mount.
                if n.startswith("/") and os.path.abspath(n) not in out:
                    out.append(os.path.abspath(n))
            image = image.get("backing-image")
    return out


def _xml_images(xml: str) -> list[str]:
    """Absolute paths of a libvirt domain's disks (file or block), backing stores included."""
    out: list[str] = []
    root = ET.fromstring(xml)
    for disk in root.iterfind("./devices/disk"):
        for source in disk.iter("source"):
            path = source.get("file") or source.get("dev")
            if path and path.startswith("/") and os.path.abspath(path) not in out:
                out.append(os.path.abspath(path))
    return out


def _libvirt_poll(conn: Any, known: set[str], want_images: set[str]) -> dict[str, dict[str, Any]]:
    """One poll of a libvirt connection, run in a worker thread: every running domain's state by UUID.

    New domains get their statistics period set (libvirt leaves it off) and
    their images read; known ones have their images re-read when in
    want_images. A domain that stops between listing and querying is left
    out; a dead connection raises libvirtError.
    """
    import libvirt

    out: dict[str, dict[str, Any]] = {}
    for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
        try:
            uuid = dom.UUIDString()
            if uuid not in known:
                try:
                    dom.setMemoryStatsPeriod(int(POLL_INTERVAL), libvirt.VIR_DOMAIN_AFFECT_LIVE)
                except libvirt.libvirtError as e:
                    log.debug("balloon: %s: no statistics period: %s", dom.name(), e)
            raw = dom.memoryStats()
            info = dom.info()
            images = _xml_images(dom.XMLDesc(0)) if uuid not in known or uuid in want_images else None
            name = dom.name()
        except libvirt.libvirtError as e:
            if e.get_error_code() in (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_OPERATION_INVALID):
                continue
            raise
        stats = {
            qname: int(raw[key]) * (1 if key in _LIBVIRT_COUNTS else 1024)
            for key, qname in _LIBVIRT_STATS.items()
            if key in raw and 0 <= int(raw[key]) < 1 << 53
        }
        out[uuid] = {
            "name": name,
            "images": images,
            "actual": int(raw.get("actual", info[2])) * 1024,
            "target": int(info[2]) * 1024,
            "memory": int(info[1]) * 1024,  # maximum memory: the host's setting
            "stats": stats,
            "stamp": raw.get("last_update") or None,
        }
    return out
