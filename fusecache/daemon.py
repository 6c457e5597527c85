"""Starting, serving and stopping one mount.

`start` is what `fusecache mount` runs: it checks everything it can in the
calling process (so a bad argument is one line and nothing is mounted), then
starts the daemon as a new process (`--foreground` plus a readiness pipe) and
returns only when the mount is ready or with the error that stopped it.
`serve` is the daemon: it mounts, tells whoever waits (the pipe, or systemd
through NOTIFY_SOCKET) that the mount is ready, serves requests until it is
unmounted or sent SIGTERM/SIGINT/SIGHUP, and always unmounts on the way out.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import Any

import pyfuse3
import trio

from fusecache import control, fuse_loop, health, mounts
from fusecache.assemble import assemble, cluster_key
from fusecache.backing import open_backing
from fusecache.errors import QuietError, find_in
from fusecache.fs import FuseOperations
from fusecache.inodes import InodeTable
from fusecache.options import MountOptions, default_log_file
from fusecache.stats import MountStats

SWITCH_INTERVAL = 0.0005  # seconds: how long another thread may hold the GIL while the loop waits for it
# The cyclic GC's thresholds while serving (Python's: 700, 10, 10). Requests make few cycles but many
# short-lived objects; at the defaults a cold 1 MiB request paid 13-326 µs of collections and a full one
# (the eviction orders, the hit index, readahead state) 20-80 ms; at these, 0-24 µs (measured for issue 13).
GC_THRESHOLDS = (20_000, 20, 100)

log = logging.getLogger("fusecache")

READY_TIMEOUT = 180.0  # an NFS server that does not answer takes its timeout to say so


# ---- checks made before anything is mounted ---------------------------------
def check_mountpoint(mountpoint: str) -> str:
    """The mountpoint's real path, or a QuietError saying what is wrong with it."""
    entry = mounts.find_mount(mountpoint)
    if entry is None:
        mp = os.path.realpath(mountpoint)  # safe: nothing is mounted there to answer the stat
        entry = mounts.find_mount(mp)
    else:
        mp = os.path.abspath(mountpoint)
    if entry is not None:
        if entry.fstype == mounts.FSTYPE:
            raise QuietError(f"{mountpoint} is already a fusecache mount: run `fusecache umount {mountpoint}` first")
        raise QuietError(f"{mountpoint} is already a mount point ({entry.fstype}): unmount it or choose an empty directory")
    try:
        names = os.listdir(mp)
    except FileNotFoundError:
        raise QuietError(f"mount point {mountpoint} does not exist: create it with `mkdir -p {mountpoint}`")
    except NotADirectoryError:
        raise QuietError(f"mount point {mountpoint} is not a directory: give an empty directory")
    except PermissionError:
        raise QuietError(f"mount point {mountpoint} is not readable by this user: run as root or fix its permissions")
    if names:
        raise QuietError(f"mount point {mountpoint} is not empty: mount on an empty directory")
    return mp


def check_fuse(allow_other: bool) -> None:
    if not os.path.exists("/dev/fuse"):
        raise QuietError("/dev/fuse does not exist: load the FUSE module (`modprobe fuse`) or give the container /dev/fuse")
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        raise QuietError("no permission to open /dev/fuse: run as root, or add this user to the group that owns /dev/fuse")
    if os.geteuid() != 0:
        if shutil.which("fusermount3") is None:
            raise QuietError("fusermount3 is not installed: install the fuse3 package (apt-get install fuse3) or run as root")
        if allow_other and not _fuse_conf_allows_other():
            raise QuietError("--allow-other needs `user_allow_other` in /etc/fuse.conf when not run as root: add that line")


def _fuse_conf_allows_other() -> bool:
    try:
        with open("/etc/fuse.conf") as f:
            return any(line.split("#")[0].strip() == "user_allow_other" for line in f)
    except OSError:
        return False


# ---- the command: start a daemon and wait for it ----------------------------
def start(opts: MountOptions, argv: list[str]) -> None:
    """Check, start the daemon process, return when the mount is ready (or raise QuietError)."""
    opts.mountpoint = check_mountpoint(opts.mountpoint)
    check_fuse(opts.allow_other)
    _check_balloon(opts)
    cluster_key(opts)
    open_backing(opts.backing).shutdown()  # a bad BACKING is the caller's error: say so here
    log_file = opts.log_file or default_log_file(opts.mountpoint)
    try:
        os.makedirs(os.path.dirname(log_file), exist_ok=True)
        logf = open(log_file, "ab")  # noqa: SIM115 - handed to the child, closed below
    except OSError as exc:
        raise QuietError(f"cannot write the log file {log_file}: {exc.strerror}; pass --log-file PATH")
    r, w = os.pipe()
    cmd = [sys.executable, "-m", "fusecache", *argv, "--foreground", "--ready-fd", str(w), "--log-file", log_file]
    with logf:
        child = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, pass_fds=(w,), start_new_session=True, close_fds=True
        )
    os.close(w)
    try:
        message = _wait_ready(r, child)
    finally:
        os.close(r)
    if message != "READY":
        raise QuietError(message)
    print(f"fusecache: mounted {opts.backing} on {opts.mountpoint} (daemon pid {child.pid}, log {log_file})", file=sys.stderr)


def _wait_ready(r: int, child: subprocess.Popen[bytes]) -> str:
    deadline = time.monotonic() + READY_TIMEOUT
    buf = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([r], [], [], 0.5)
        if ready:
            chunk = os.read(r, 4096)
            buf += chunk
            if b"\n" in buf or not chunk:
                line = buf.split(b"\n", 1)[0].decode(errors="replace").strip()
                if line:
                    return line
                code = child.wait()
                return f"the daemon exited with status {code} before the mount was ready: see its log"
    child.terminate()
    return f"the mount was not ready after {READY_TIMEOUT:.0f} s: see the daemon's log"


# ---- the daemon ----------------------------------------------------------------
class Readiness:
    """Tells whoever waits that the mount is ready or why it failed: a pipe, and/or systemd."""

    def __init__(self, fd: int | None) -> None:
        self._fd = fd

    def _send(self, line: str) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.write(self._fd, (line + "\n").encode())
                os.close(self._fd)
            self._fd = None

    def ready(self) -> None:
        self._send("READY")
        _sd_notify("READY=1")

    def failed(self, message: str) -> None:
        self._send(message)
        _sd_notify(f"STATUS={message}")


def _sd_notify(state: str) -> None:
    """systemd's notify protocol (Type=notify): one datagram to $NOTIFY_SOCKET."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(state.encode(), addr)


def setup_logging(debug: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not debug:
        logging.getLogger("pyfuse3").setLevel(logging.WARNING)


def serve(opts: MountOptions) -> None:
    """Mount and serve in this process until unmounted or signalled. Raises QuietError on start failures."""
    readiness = Readiness(opts.ready_fd)
    # The loop serves every request; a worker or the store's writer holding the GIL makes it wait up to the
    # switch interval (5 ms by default, ~40 cache hits): bench/warm.py measured what a shorter one gives back.
    sys.setswitchinterval(SWITCH_INTERVAL)
    try:
        opts.mountpoint = check_mountpoint(opts.mountpoint)
        check_fuse(opts.allow_other)
        try:
            trio.run(_main, opts, readiness)
        except BaseExceptionGroup as group:
            quiet = find_in(group, QuietError)
            if quiet is None:
                raise
            raise quiet from None
    except QuietError as exc:
        readiness.failed(exc.message)
        raise


async def _main(opts: MountOptions, readiness: Readiness) -> None:
    health.load_faults_from_env()  # tests only; nothing when FUSECACHE_FAULTS is unset
    async with assemble(opts) as mount:
        ops = FuseOperations(mount.backing, mount.data, InodeTable(mount.root_ino), attr_timeout=opts.attr_timeout)
        # From here on nothing may stat the mountpoint before pyfuse3.main serves it: it would wait for itself.
        rundir = mounts.runtime_dir(opts.mountpoint)
        fuse_options = set(pyfuse3.default_options) | {f"fsname={opts.backing}", "subtype=fusecache"}
        if opts.allow_other:
            fuse_options.add("allow_other")
        try:
            pyfuse3.init(ops, opts.mountpoint, fuse_options)
        except RuntimeError as exc:
            raise QuietError(f"FUSE refused to mount on {opts.mountpoint} ({exc}): check /dev/fuse and that nothing else mounts there")
        log.info("mounted %s on %s (pid %d)", opts.backing, opts.mountpoint, os.getpid())
        try:
            os.makedirs(rundir, mode=0o700, exist_ok=True)
            with open(os.path.join(rundir, "pid"), "w") as f:
                f.write(f"{os.getpid()}\n")

            async def stats(request: dict[str, Any]) -> dict[str, Any]:
                return mount.stats(ops.open_files(), ops.attr_stats()).to_json()

            async def snapshot() -> MountStats:
                return mount.stats(ops.open_files(), ops.attr_stats())

            async with trio.open_nursery() as nursery:
                nursery.start_soon(_stop_on_signals)
                await nursery.start(control.serve, os.path.join(rundir, "control.sock"), {"stats": stats, **mount.handlers()})
                if opts.metrics:
                    from fusecache import metrics

                    await nursery.start(metrics.serve, opts.metrics, snapshot)
                _raise_readahead(opts.mountpoint)
                # What start built (a reopened store's eviction order can be a million keys) lives as long as the
                # mount: out of the collector's sight, so no full collection walks it again.
                gc.freeze()
                gc.set_threshold(*GC_THRESHOLDS)
                readiness.ready()
                fuse_loop.install()  # a request already queued is read without a trip through trio's epoll
                await pyfuse3.main()
                nursery.cancel_scope.cancel()
        finally:
            pyfuse3.close(unmount=True)
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(rundir, "pid"))
            log.info("unmounted %s", opts.mountpoint)


def _check_balloon(opts: MountOptions) -> None:
    if not opts.balloon:
        return
    from fusecache.balloon import parse_source

    for spec in opts.balloon:
        parse_source(spec)  # raises QuietError naming the bad spec
    if not opts.cache or opts.admit != "second-chance":
        raise QuietError("--balloon feeds second-chance admission: drop --no-cache / use --admit second-chance, or drop --balloon")


async def _stop_on_signals() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("%s: unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()
            return


def _raise_readahead(mountpoint: str, kib: int = 1024) -> None:
    """Let buffered sequential reads arrive as 1 MiB requests instead of 128 KiB ones.

    Measured here: cold sequential reads 1.45-1.67x faster. FUSE rejects
    max_readahead as a mount option, but the mount's bdi takes it afterwards.
    """
    entry = mounts.find_mount(mountpoint)
    if entry is None:
        return
    try:
        with open(f"/sys/class/bdi/{entry.device}/read_ahead_kb", "w") as f:
            f.write(str(kib))
    except OSError as exc:
        log.debug("could not raise readahead for %s: %s", mountpoint, exc.strerror)


# ---- umount ----------------------------------------------------------------
def umount(mountpoint: str, lazy: bool = False, wait: float = 30.0) -> None:
    mp = os.path.abspath(mountpoint)  # not realpath: a dead or hung mount answers no stat
    entry = mounts.find_mount(mp)
    if entry is None:
        raise QuietError(f"{mountpoint} is not mounted")
    if entry.fstype != mounts.FSTYPE:
        raise QuietError(f"{mountpoint} is not a fusecache mount (it is {entry.fstype}): use umount")
    pid = _daemon_pid(mp)
    cmd = ["fusermount3", "-u", *(["-z"] if lazy else []), mp]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        err = proc.stderr.strip()
        if "busy" in err:
            raise QuietError(f"{mountpoint} is busy: stop what uses it (`fuser -vm {mountpoint}`) or pass --lazy")
        raise QuietError(f"could not unmount {mountpoint}: {err or 'fusermount3 failed'}")
    if pid is not None and not lazy:
        _wait_exit(pid, wait)


def process_running(pid: int) -> bool:
    """Whether `pid` is still running. A zombie has exited: only its parent (init, for a daemon) has yet to reap it."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _daemon_pid(mp: str) -> int | None:
    try:
        with open(os.path.join(mounts.runtime_dir(mp), "pid")) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _wait_exit(pid: int, wait: float) -> None:
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if not process_running(pid):
            return
        time.sleep(0.02)
    raise QuietError(f"the daemon (pid {pid}) did not exit {wait:.0f} s after unmounting: see its log")


