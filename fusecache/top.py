"""`fusecache top` and the plain text of `fusecache stats`: what an operator reads.

`top` polls each mount's control socket about once a second and draws one
panel per mount: where reads came from (local hits, peer hits, misses), the
rates since the previous poll, a minute of throughput as a sparkline, the
cache's fill and health, and the balloon and peer tables when the daemon
has them. Rates are computed here from the daemon's cumulative counters, so
the daemon keeps no per-viewer state. A mount that disappears stays on
screen, marked gone. Keys are read from the terminal in cbreak mode between
polls, and the terminal is always put back the way it was.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import select
import signal
import sys
import termios
import time
import tty
from collections.abc import Iterator
from typing import Any

from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from fusecache import control, mounts
from fusecache.errors import QuietError
from fusecache.peers import PeerStats
from fusecache.stats import AttrStats, BalloonGuest, ImageCounters, MountStats, PinStats, StoreStats, WarmProgress

HISTORY = 60.0  # seconds of throughput the sparkline covers
SPARK_WIDTH = 30  # characters: one per HISTORY / SPARK_WIDTH seconds
STATS_TIMEOUT = 2.0  # a hung daemon delays a refresh by at most this
ONCE_WIDTH = 100
WARM_SHOWN = 60.0  # seconds a finished warm job stays on screen


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def hit_ratio(c: ImageCounters) -> float | None:
    total = c.read_bytes
    return (c.hit_bytes + c.peer_bytes) / total if total else None


def summary_lines(stats: MountStats) -> list[str]:
    """A few lines for `fusecache stats MOUNTPOINT` (the --json form has everything)."""
    lines = [f"{stats.mountpoint}: backing {stats.backing}, daemon pid {stats.pid}, {stats.open_files} open files"]
    lines.append(attrs_text(stats.attrs))
    store = stats.store
    if store is None:
        lines.append("no cache (--no-cache): every read goes to the backing")
        return lines
    health = stats.health
    if health is not None and health.state != "caching":
        lines.append(f"cache {health.state.upper()}: passthrough, every read and write goes to the backing ({health.reason}); "
                     f"`fusecache recover {stats.mountpoint}` rebuilds it now")
    if health is not None and health.faults:
        lines.append("faults served from the backing: " + ", ".join(f"{k} {v}" for k, v in sorted(health.faults.items())))
    lines.append(
        f"cache: {human(store.bytes_stored)} of {human(store.capacity)} stored, "
        f"{human(store.logical_bytes)} logical, dedup {store.dedup_ratio:.2f}x, "
        f"{store.chunks} chunks, {store.evicted_chunks} evicted"
    )
    if stats.admission is not None:
        lines.append(f"admission: {stats.admission.mode}")
        for name, ga in stats.admission.guests.items():
            if ga.mode:
                how = "memory scan" if ga.mode == "scan" else ga.mode + (f" ({ga.scan_off})" if ga.scan_off else "")
                lines.append(f"  guest {name}: evictions known by {how}")
    if store.shares:
        lines.append(f"shares (held / share): {share_text(store)}")
    images = stats.images
    if images:
        width = max(12, *(len(n) for n in images))
        lines.append(f"{'image':<{width}}  {'reads':>8}  {'hit%':>6}  {'hit':>10}  {'peer':>10}  {'backing':>10}  {'admitted':>8}")
        for name, c in images.items():
            r = hit_ratio(c)
            lines.append(
                f"{name:<{width}}  {c.reads:>8}  {'-' if r is None else f'{100 * r:.1f}':>6}  {human(c.hit_bytes):>10}  "
                f"{human(c.peer_bytes):>10}  {human(c.backing_bytes):>10}  {c.admitted_chunks:>8}"
            )
    return lines


def attrs_text(a: AttrStats) -> str:
    """The kernel's attribute requests: one much larger than the backing stats it cost is a storm (examples/README.md)."""
    return (f"attributes: {a.getattrs} GETATTRs of files, {a.backing_stats} answered by a backing stat; "
            f"{a.direct_io_opens} O_DIRECT opens served with direct I/O")


def share_text(store: StoreStats) -> str:
    """Each owner's part of the cache, "name held/share", "over" when it holds more than its share (it evicts its own first)."""
    cs = store.chunk_size
    parts = []
    for owner, sh in store.shares.items():
        over = " over" if sh.held_chunks > sh.share_chunks and not owner.startswith("(earlier") else ""
        parts.append(f"{owner} {human(sh.held_chunks * cs)}/{human(sh.share_chunks * cs)}{over}")
    return ", ".join(parts)


# ---- what is watched: samples and the rates between them ---------------------------


@dataclasses.dataclass
class Rate:
    reads: float  # requests per second
    bytes: float  # bytes per second


@dataclasses.dataclass
class MountView:
    """One watched mount: its latest stats, the rates since the sample before, and a minute of throughput."""

    mountpoint: str
    stats: MountStats | None = None
    sampled: float = 0.0  # time.monotonic() of `stats`
    error: str | None = None  # why the latest poll got no stats; None when it did
    gone: bool = False  # no longer mounted (or never was)
    rates: dict[str, Rate] = dataclasses.field(default_factory=dict)  # per image
    total: Rate | None = None
    history: collections.deque[tuple[float, float]] = dataclasses.field(default_factory=collections.deque)  # (time, bytes/s)

    def update(self, stats: MountStats, now: float) -> None:
        prev, prev_t = self.stats, self.sampled
        self.rates, self.total = {}, None
        # The counters only grow while one daemon runs; a restarted one counts from zero: no rate across it.
        if prev is not None and prev.pid == stats.pid and now > prev_t:
            dt = now - prev_t
            for name, c in stats.images.items():
                o = prev.images.get(name) or ImageCounters()
                self.rates[name] = Rate((c.reads - o.reads) / dt, (c.read_bytes - o.read_bytes) / dt)
            self.total = Rate(sum(r.reads for r in self.rates.values()), sum(r.bytes for r in self.rates.values()))
            self.history.append((now, self.total.bytes))
        while self.history and self.history[0][0] < now - HISTORY:
            self.history.popleft()
        self.stats, self.sampled, self.error, self.gone = stats, now, None, False

    def fail(self, message: str, gone: bool) -> None:
        self.error, self.gone = message, gone
        self.rates, self.total = {}, None


def poll(view: MountView) -> None:
    """Fetch `view`'s stats, or record why they could not be had."""
    entry = mounts.find_mount(view.mountpoint)
    if entry is None or entry.fstype != mounts.FSTYPE:
        view.fail("gone: not mounted any more" if view.stats is not None else "not mounted", gone=True)
        return
    try:
        stats = MountStats.from_json(control.request(view.mountpoint, "stats", timeout=STATS_TIMEOUT))
    except QuietError as exc:
        view.fail(exc.message, gone=False)
        return
    view.update(stats, time.monotonic())


class Dashboard:
    """The mounts on screen: the named ones, or every fusecache mount as they come and go."""

    def __init__(self, named: list[str]) -> None:
        self.watch_all = not named
        self.views: dict[str, MountView] = {mp: MountView(mp) for mp in named}

    def refresh(self) -> None:
        if self.watch_all:
            for m in mounts.fusecache_mounts():
                self.views.setdefault(m.mountpoint, MountView(m.mountpoint))
        for view in self.views.values():
            poll(view)


def check_named(mountpoints: list[str]) -> list[str]:
    """The named mountpoints, absolute, or a QuietError for the first one that is not a fusecache mount."""
    out = []
    for mp in mountpoints:
        entry = mounts.find_mount(mp)
        if entry is None:
            raise QuietError(f"{mp} is not mounted: give the mount point of a running `fusecache mount` (or none, to watch all)")
        if entry.fstype != mounts.FSTYPE:
            raise QuietError(f"{mp} is not a fusecache mount (it is {entry.fstype}): give a fusecache mount point")
        out.append(entry.mountpoint)
    return out


# ---- drawing -------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Glyphs:
    """Characters that depend on what the terminal can show."""

    spark: str
    full: str
    empty: str
    dash: str


UNICODE = Glyphs(spark="▁▂▃▄▅▆▇█", full="█", empty="░", dash="—")
ASCII = Glyphs(spark="_.-:=+*#", full="#", empty=".", dash="-")


def _glyphs(console: Console) -> Glyphs:
    return UNICODE if console.encoding.lower().startswith("utf") else ASCII


def _short(n: float) -> str:
    """A byte count in at most 6 characters: 0, 512K, 20.0M, 1.5G."""
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1024 or unit == "T":
            return f"{n:.0f}{unit}" if unit in ("", "K") else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}P"


def _mbs(rate: float) -> str:
    return f"{rate / 1e6:.1f}"


def _duration(seconds: float) -> str:
    s = int(max(seconds, 0))
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def sparkline(history: collections.deque[tuple[float, float]], now: float, g: Glyphs) -> str:
    """The last HISTORY seconds in SPARK_WIDTH characters, oldest left; a blank where there is no sample yet."""
    step = HISTORY / SPARK_WIDTH
    buckets: list[list[float]] = [[] for _ in range(SPARK_WIDTH)]
    for t, v in history:
        i = SPARK_WIDTH - 1 - int((now - t) / step)
        if 0 <= i < SPARK_WIDTH:
            buckets[i].append(v)
    means = [sum(b) / len(b) if b else None for b in buckets]
    peak = max((m for m in means if m is not None), default=0.0)
    top = len(g.spark) - 1
    return "".join(
        " " if m is None else g.spark[0] if peak <= 0 else g.spark[min(top, round(m / peak * top))] for m in means
    )


def _bar(fraction: float, width: int, g: Glyphs) -> str:
    n = round(max(0.0, min(1.0, fraction)) * width)
    return g.full * n + g.empty * (width - n)


def _split(local: int, peer: int, miss: int) -> Text:
    total = local + peer + miss
    if not total:
        return Text("no reads yet", style="dim")
    t = Text()
    for label, n, style in (("local", local, "green"), ("peer", peer, "cyan"), ("miss", miss, "red")):
        if t:
            t.append(" · ")
        t.append(f"{label} {100 * n / total:.1f}%", style=style)
        t.append(f" ({human(n)})")
    return t


def _totals(images: dict[str, ImageCounters]) -> tuple[int, int, int]:
    return (
        sum(c.hit_bytes for c in images.values()),
        sum(c.peer_bytes for c in images.values()),
        sum(c.backing_bytes for c in images.values()),
    )


def _cell(n: int, total: int) -> str:
    return f"{_short(n)} {100 * n / total:3.0f}%" if total else _short(n)


def _images_table(view: MountView, g: Glyphs) -> Table:
    table = Table(box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False, expand=True, show_edge=False)
    table.add_column("image", ratio=1, min_width=12, overflow="ellipsis", no_wrap=True)
    for name in ("reads/s", "MB/s", "hit%", "local", "peer", "miss", "admitted"):
        table.add_column(name, justify="right", no_wrap=True)
    for name, c in (view.stats.images if view.stats is not None else {}).items():
        rate = view.rates.get(name)
        total = c.read_bytes
        r = hit_ratio(c)
        table.add_row(
            name,
            g.dash if rate is None else f"{rate.reads:.0f}",
            g.dash if rate is None else _mbs(rate.bytes),
            g.dash if r is None else f"{100 * r:.1f}",
            _cell(c.hit_bytes, total),
            _cell(c.peer_bytes, total),
            _cell(c.backing_bytes, total),
            str(c.admitted_chunks),
        )
    return table


def _balloon_table(guests: dict[str, BalloonGuest], g: Glyphs, store: StoreStats | None) -> Table:
    table = Table(title="balloon", title_justify="left", box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False, show_edge=False)
    table.add_column("guest", overflow="ellipsis", no_wrap=True, max_width=30)
    for name in ("state", "mode", "target", "actual", "evicted", "admitted", "cache held/share"):
        table.add_column(name, justify="right", no_wrap=True)

    def size(v: Any) -> str:
        return g.dash if v is None else human(v)

    shares = store.shares if store is not None else {}
    for name, s in guests.items():
        state = Text("running", style="green") if s.running else Text("stopped", style="dim")
        # A scanned guest's evictions are found in its memory; the others' are estimated from its balloon statistics.
        scanned = s.mode == "scan"
        evicted = s.evicted_pages * 4096 if scanned else s.evicted_estimate
        mode = Text("memory scan", style="green") if scanned else Text(s.mode or g.dash, style="yellow" if s.mode else "dim")
        sh = shares.get(name)
        if sh is None or store is None:
            share = Text(g.dash)
        else:
            held = sh.held_chunks * store.chunk_size
            over = sh.held_chunks > sh.share_chunks  # it evicts its own chunks first
            share = Text(f"{human(held)}/{human(sh.share_chunks * store.chunk_size)}", style="yellow" if over else "")
        table.add_row(
            name, state, mode, size(s.target), size(s.actual), size(evicted), size(s.admitted_bytes), share
        )
    return table


def _peers_table(peers: dict[str, PeerStats], g: Glyphs) -> Table:
    table = Table(title="peers", title_justify="left", box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False, show_edge=False)
    table.add_column("peer", overflow="ellipsis", no_wrap=True, max_width=30)
    for name in ("state", "rtt ms", "hits given", "hits taken", "errors"):
        table.add_column(name, justify="right", no_wrap=True)
    for name, p in peers.items():
        state = Text("up", style="green") if p.up else Text("down", style="bold red")
        table.add_row(
            name,
            state,
            g.dash if p.rtt_ms is None else f"{p.rtt_ms:.2f}",
            str(p.hits_given),
            str(p.hits_taken),
            str(p.errors),
        )
    return table


def _warm_line(p: WarmProgress, g: Glyphs) -> Text:
    """One warm job: its bar, bytes, rate and time left (or how it ended)."""
    fetched = p.peer_bytes + p.backing_bytes
    rate = fetched / p.elapsed if p.elapsed > 0 else 0.0
    fill = p.done_bytes / p.total_bytes if p.total_bytes else 1.0
    t = Text(f"warm #{p.id} ")
    t.append(_bar(fill, 10, g), style="green" if p.state == "running" else "dim")
    t.append(f" {human(p.done_bytes)} / {human(p.total_bytes)} ({100 * fill:.0f}%)  {_mbs(rate)} MB/s")
    if p.state == "running":
        left = (p.total_bytes - p.done_bytes) / rate if rate > 0 else None
        t.append(f"  ETA {g.dash if left is None else _duration(left)}")
    else:
        t.append(f"  {p.state}", style="bold red" if p.state == "failed" else "dim")
    t.append(f"  {', '.join(p.images)}", style="dim")
    return t


def _pins_line(pins: PinStats) -> Text:
    t = Text(f"pinned {human(pins.allocated_bytes)} of {human(pins.budget)}: ")
    t.append(", ".join(p.image + (f" (+{len(p.chain) - 1} backing)" if len(p.chain) > 1 else "") for p in pins.pins), style="magenta")
    return t


def _mount_panel(view: MountView, now: float, g: Glyphs) -> Panel:
    s = view.stats
    title = Text(view.mountpoint, style="bold")
    if view.gone or s is None:
        style = "bold red" if view.gone else "yellow"
        body: list[RenderableType] = [Text(view.error or "waiting for the first sample", style=style)]
        if s is not None:
            body.append(Text(f"last seen {_duration(now - view.sampled)} ago, backing {s.backing or g.dash}", style="dim"))
        return Panel(Group(*body), title=title, title_align="left", border_style="red" if view.gone else "yellow")
    lines: list[RenderableType] = []
    head = Text(f"{s.backing or g.dash}  pid {s.pid or g.dash}")
    if s.started:
        head.append(f"  up {_duration(time.time() - s.started)}")
    head.append(f"  {s.open_files} open files  admission {s.admission.mode if s.admission is not None else g.dash}")
    head.append(f"  getattr {s.attrs.getattrs} (stat {s.attrs.backing_stats})")
    lines.append(head)
    if view.error:  # mounted, but this poll failed: show the last figures, and why they are old
        lines.append(Text(f"{view.error} (figures from {_duration(now - view.sampled)} ago)", style="bold yellow"))
    health = s.health
    if health is not None and health.state != "caching":
        warn = f"cache {health.state.upper()} (passthrough): {health.reason}; `fusecache recover` rebuilds it"
        lines.append(Text(warn, style="bold red"))
    if health is not None and health.faults:
        faults = ", ".join(f"{k} {v}" for k, v in sorted(health.faults.items()))
        lines.append(Text(f"faults served from the backing: {faults}", style="yellow"))
    store = s.store
    if store is not None:
        cap = store.capacity
        stored = store.bytes_stored
        fill = stored / cap if cap else 0.0
        t = Text("cache  ")
        t.append(_bar(fill, 10, g), style="magenta")
        t.append(f" {human(stored)} / {human(cap)} ({100 * fill:.0f}%)  dedup {store.dedup_ratio:.2f}x")
        t.append(f"  evicted {store.evicted_chunks}  verify failures ")
        failures = store.verify_failures
        t.append(str(failures), style="bold red" if failures else "")
        lines.append(t)
        if len(store.shares) > 1:  # one owner alone has the whole cache: nothing to show
            lines.append(Text(f"shares {share_text(store)}"))
    else:
        lines.append(Text("no cache (--no-cache): every read goes to the backing", style="dim"))
    rate = Text("reads  ")
    if view.total is None:
        rate.append(f"{g.dash} /s  {g.dash} MB/s ")
    else:
        rate.append(f"{view.total.reads:.0f}/s  {_mbs(view.total.bytes)} MB/s ")
    rate.append(sparkline(view.history, now, g), style="cyan")
    peak = max((v for _, v in view.history), default=None)
    rate.append(f" peak {g.dash if peak is None else _mbs(peak)} MB/s, last {HISTORY:.0f} s", style="dim")
    lines.append(rate)
    images = s.images
    lines.append(Text("hits   ").append_text(_split(*_totals(images))))
    if images:
        lines.append(_images_table(view, g))
    if s.pins.pins:
        lines.append(_pins_line(s.pins))
    for job in s.warms:
        if job.state == "running" or time.time() - (job.started + job.elapsed) < WARM_SHOWN:
            lines.append(_warm_line(job, g))
    guests = s.balloon.guests
    peers = s.peers.peers
    if guests:
        lines.append(_balloon_table(guests, g, store))
    if peers:
        lines.append(_peers_table(peers, g))
    # what is on but has nothing to show yet, or "—" for what this mount does not do
    idle = []
    if not guests:
        sources = s.balloon.sources
        idle.append(f"balloon: watching {', '.join(sources)}, no guests yet" if sources else f"balloon {g.dash}")
    if not peers:
        idle.append(f"peers: serving on {s.peers.listen}, none to ask" if s.peers.listen else f"peers {g.dash}")
    if idle:
        lines.append(Text("  ".join(idle), style="dim"))
    return Panel(Group(*lines), title=title, title_align="left", border_style="blue")


def render(dash: Dashboard, g: Glyphs, footer: str | None) -> RenderableType:
    now = time.monotonic()
    parts: list[RenderableType] = [_mount_panel(v, now, g) for v in dash.views.values()]
    if not parts:
        parts.append(Text("no fusecache mounts: waiting for one (`fusecache mount BACKING MOUNTPOINT`)", style="yellow"))
    if footer:
        parts.append(Text(footer, style="dim"))
    return Group(*parts)


# ---- the command ---------------------------------------------------------------------
def main(mountpoints: list[str], once: bool = False, interval: float = 1.0) -> int:
    """`fusecache top`: a live dashboard on a terminal; one plain frame with --once or when stdout is not one.

    Exit status 0, or 1 when --once could not get every mount's stats.
    """
    dash = Dashboard(check_named(mountpoints))
    if once or not sys.stdout.isatty():
        return _once(dash, interval)
    return _live(dash, max(interval, 0.1))


def _once(dash: Dashboard, interval: float) -> int:
    dash.refresh()
    if not dash.views:
        raise QuietError("no fusecache mounts: mount one with `fusecache mount BACKING MOUNTPOINT`")
    if interval > 0:  # two samples, so the frame has rates
        time.sleep(interval)
        dash.refresh()
    console = Console(width=ONCE_WIDTH, color_system=None, highlight=False, emoji=False)
    console.print(render(dash, _glyphs(console), footer=None))
    return 1 if any(v.error for v in dash.views.values()) else 0


def _live(dash: Dashboard, interval: float) -> int:
    # COLUMNS and LINES, when exported, would pin rich to one size: the screen must follow the terminal's resizes
    environ = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    console = Console(highlight=False, emoji=False, _environ=environ)
    glyphs = _glyphs(console)
    footer = f"q or Ctrl-C quits; refreshes every {interval:g} s"
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    try:
        with contextlib.ExitStack() as stack:
            keys = stack.enter_context(_cbreak(sys.stdin))
            stack.enter_context(_signals(wake_w))
            live = stack.enter_context(Live(console=console, screen=True, auto_refresh=False, transient=True))
            fds = [wake_r, *([keys] if keys is not None else [])]
            deadline = time.monotonic()
            while True:
                dash.refresh()
                live.update(render(dash, glyphs, footer), refresh=True)
                deadline = max(deadline + interval, time.monotonic())
                while (left := deadline - time.monotonic()) > 0:
                    ready, _, _ = select.select(fds, [], [], left)
                    if keys in ready:
                        typed = os.read(keys, 64)
                        if b"q" in typed or b"Q" in typed:
                            return 0
                        if not typed:  # the terminal hung up: stop listening to it, or select spins
                            fds.remove(keys)
                    if wake_r in ready:
                        os.read(wake_r, 64)
                        # the terminal changed size: draw the same figures at the new size now
                        live.update(render(dash, glyphs, footer), refresh=True)
    except KeyboardInterrupt:
        return 0
    finally:
        os.close(wake_r)
        os.close(wake_w)


@contextlib.contextmanager
def _cbreak(stream: Any) -> Iterator[int | None]:
    """Keys without Enter and without echo; the terminal's settings are restored however we leave."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        fd = -1
    if fd < 0 or not os.isatty(fd):
        yield None  # no keyboard (stdin redirected): Ctrl-C still quits
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield fd
    finally:
        termios.tcsetattr(fd, termios.TCSAFLUSH, saved)


@contextlib.contextmanager
def _signals(wake_fd: int) -> Iterator[None]:
    """SIGWINCH wakes the loop to redraw; SIGTERM and SIGHUP leave through the cleanup like Ctrl-C does."""

    def resized(signum: int, frame: Any) -> None:
        with contextlib.suppress(BlockingIOError):
            os.write(wake_fd, b"w")

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    handlers = {signal.SIGWINCH: resized, signal.SIGTERM: stop, signal.SIGHUP: stop}
    saved = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
