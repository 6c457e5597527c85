"""Mounting the real `fusecache` command in tests, and always unmounting it.

`Mounter.mount()` runs `fusecache mount` as a subprocess, waits for
`os.path.ismount`, and remembers the daemon's PID. `Mounter.cleanup()` (run by
the `mounter` fixture even when the test fails) unmounts with `fusecache
umount`, then `fusermount3 -u`, then `-z`, and stops the daemon by its PID with
SIGTERM, then SIGKILL, if it is still there; then it deletes the slabs of the
cache dirs its mounts used (a mount reserves its whole slab on disk, and
pytest keeps old temporary directories). A test mount without --cache-size
gets TEST_CACHE_SIZE, not the 2 GiB default.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

from fusecache.daemon import process_running as daemon_running  # a zombie counts as exited
from fusecache.options import default_cache_dir
from fusecache.stats import MountStats

FUSECACHE = [sys.executable, "-m", "fusecache"]
TEST_CACHE_SIZE = "256M"


@dataclasses.dataclass
class Mount:
    backing: str
    mountpoint: str
    pid: int | None
    log: str

    def log_text(self) -> str:
        try:
            with open(self.log) as f:
                return f.read()
        except OSError:
            return ""


def run_fusecache(*args: str, timeout: float = 120, **kw: object) -> subprocess.CompletedProcess[str]:
    if args and args[0] == "mount" and "--cache-size" not in args and "--no-cache" not in args:
        args = (*args, "--cache-size", TEST_CACHE_SIZE)  # the slab is reserved on disk: tests keep it small
    return subprocess.run([*FUSECACHE, *args], capture_output=True, text=True, timeout=timeout, **kw)  # type: ignore[call-overload]


def stats(mountpoint: str) -> MountStats:
    """`fusecache stats MOUNTPOINT --json`: what the mount's daemon reports about itself, read through its types."""
    proc = run_fusecache("stats", mountpoint, "--json")
    assert proc.returncode == 0, proc.stderr
    return MountStats.from_json(json.loads(proc.stdout))


def is_mounted(path: str) -> bool:
    path = os.path.abspath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


class Mounter:
    def __init__(self, tmp: str) -> None:
        self.tmp = tmp
        self.mounts: list[Mount] = []
        self._n = 0
        self._cache_dirs: set[str] = set()  # every cache dir a mount used, explicit or the default one

    def mount(self, backing: str, *args: str, mountpoint: str | None = None) -> Mount:
        if mountpoint is None:
            self._n += 1
            mountpoint = os.path.join(self.tmp, f"mnt{self._n}")
            os.makedirs(mountpoint, exist_ok=True)
        log = os.path.join(self.tmp, f"daemon{self._n}.log")
        if "--cache-dir" in args:
            self._cache_dirs.add(args[args.index("--cache-dir") + 1])
        elif "--no-cache" not in args:
            self._cache_dirs.add(default_cache_dir(os.path.abspath(mountpoint)))
        proc = run_fusecache("mount", backing, mountpoint, "--log-file", log, *args)
        if proc.returncode != 0:
            raise AssertionError(f"fusecache mount failed ({proc.returncode}): {proc.stderr.strip()}\n{_read(log)}")
        deadline = time.monotonic() + 10
        while not os.path.ismount(mountpoint):
            assert time.monotonic() < deadline, "mount did not appear"
            time.sleep(0.02)
        m = re.search(r"daemon pid (\d+)", proc.stderr)
        mnt = Mount(backing, os.path.abspath(mountpoint), int(m.group(1)) if m else None, log)
        self.mounts.append(mnt)
        return mnt

    def unmount(self, m: Mount) -> None:
        proc = run_fusecache("umount", m.mountpoint, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert not is_mounted(m.mountpoint)
        self.mounts.remove(m)

    def cleanup(self) -> None:
        for m in reversed(self.mounts):
            force_unmount(m.mountpoint, m.pid)
        self.mounts.clear()
        for cache_dir in self._cache_dirs:
            if cache_dir.startswith("/var/cache/fusecache/"):
                shutil.rmtree(cache_dir, ignore_errors=True)  # named after a test's mountpoint: nobody else's
            else:
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(cache_dir, "pages.slab"))
        self._cache_dirs.clear()


def force_unmount(mountpoint: str, pid: int | None) -> None:
    """Unmount by every means, then stop the daemon by PID: nothing may stay mounted."""
    if is_mounted(mountpoint):
        with contextlib.suppress(subprocess.TimeoutExpired):
            run_fusecache("umount", mountpoint, timeout=30)
    for cmd in (["fusermount3", "-u", mountpoint], ["fusermount3", "-u", "-z", mountpoint]):
        if not is_mounted(mountpoint):
            break
        with contextlib.suppress(subprocess.TimeoutExpired):
            subprocess.run(cmd, capture_output=True, timeout=30)
    if pid is not None:
        stop_pid(pid)


def stop_pid(pid: int, grace: float = 10.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    return
            if not daemon_running(pid):
                return  # gone, or a zombie waiting for init to reap it
            time.sleep(0.05)


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()[-4000:]
    except OSError:
        return ""


def free_port() -> int:
    """A TCP port on 127.0.0.1 for a daemon to listen on, free now and below the kernel's ephemeral range.

    A port the kernel handed out (bind to port 0) is an ephemeral one: any
    outgoing connection made before the daemon listens (another daemon's NFS
    connections, say) may take it, and the mount then fails with EADDRINUSE.
    """
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        low = int(f.read().split()[0])
    for _ in range(200):
        port = random.randrange(10000, low) if low > 10100 else 0
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError("no free TCP port below the ephemeral range on 127.0.0.1")
