"""A real NFS server for tests: nfs-ganesha (VFS FSAL) in a network namespace of its own.

Owns: creating the namespace, rpcbind and ganesha inside it, the bridge that
makes the server reachable from the host's loopback, and tearing all of it
down by PID (and the namespace by name) whatever the test did.

Shape, and why:

- `ip netns add fc-nfs-PID-N`, loopback up. Nothing else is configured in it:
  no veth, no address but 127.0.0.1 inside.
- rpcbind runs in that namespace *and* in a private mount namespace with a
  tmpfs on /run (`unshare --mount` + `nsenter --net`), so its socket and
  state files never touch the host's /run. ganesha is started with
  `nsenter --mount=<rpcbind's mount ns> --net=<the netns>` so it registers with
  that rpcbind; it listens on 2049 (NFS) and 20048 (MOUNT) in the namespace.
- The bridge is `tests/harness/delay_proxy.py` with no delay: it listens on
  127.0.0.1 *in the host namespace* and connects to 127.0.0.1:2049/20048
  *inside* the server's namespace. So every client reaches the server at
  `nfs://127.0.0.1:PORT/...` from the host: this test process using
  `NfsBacking` in-process, and a `fusecache mount` daemon started as a plain
  subprocess (its FUSE mount lands in the host mount namespace, as it must).
  No traffic goes anywhere but 127.0.0.0/8 (host or namespace loopback).
- NFSv4 needs only the NFS port. NFSv3 needs MOUNT as well; the v3 URL names
  both ports (`?version=3&mountport=M`) so the client skips the portmapper,
  which stays inside the namespace.

`stop()` and `start()` stop and restart ganesha only (the namespace, rpcbind
and the bridge stay), for server-restart tests; a client sees exactly what it
would see when a real server restarts: its connection reset, then refused
until the server is back.

Use it from conftest with `from tests.harness.nfs_server import nfs_server  # noqa: F401`
(module-scoped fixture), or directly as a context manager: `with
NfsServer(tmpdir) as srv: ...`.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.delay_proxy import DelayProxy  # re-exported for tests

NFS_PORT = 2049
MOUNT_PORT = 20048
EXPORT = "/export"
DENIED_EXPORT = "/denied"
_counter = itertools.count()

_CONFIG = """
NFS_CORE_PARAM {{
    NFS_Port = {nfs_port}; MNT_Port = {mount_port};
    Protocols = 3, 4; Enable_NLM = false; Enable_RQUOTA = false;
    # v3 clients mount the same path v4 clients see, not the host directory.
    Mount_Path_Pseudo = true;
}}
NFSV4 {{
    Graceless = true; RecoveryRoot = {state};
    # libnfs sends and expects numeric owners ("0"), not user@domain.
    Allow_Numeric_Owners = true; Only_Numeric_Owners = true;
}}
EXPORT {{
    Export_Id = 1; Path = {path}; Pseudo = {pseudo};
    Access_Type = RW; Squash = No_Root_Squash; SecType = sys;
    Protocols = 3, 4; Transports = TCP;
    FSAL {{ Name = VFS; }}
}}
# An export nobody may mount, for permission-denied tests.
EXPORT {{
    Export_Id = 2; Path = {denied}; Pseudo = {denied_pseudo};
    Access_Type = None; SecType = sys; Protocols = 3, 4; Transports = TCP;
    FSAL {{ Name = VFS; }}
}}
LOG {{ Default_Log_Level = EVENT; }}
"""


def _wait_dead(proc: subprocess.Popen[bytes], timeout: float) -> None:
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


_RPCBIND_SH = (
    "for m in $(awk '$3 ~ /^fuse/ {print $2}' /proc/self/mounts); do umount -l \"$m\" 2>/dev/null; done; "
    "mount -t tmpfs fusecache-test-run /run && exec rpcbind -f -w"
)


class NfsServer:
    """ganesha exporting `workdir/export` in namespace `netns`, reachable through 127.0.0.1.

    Attributes: `export_dir` (the exported directory on the host), `url_v3`,
    `url_v4` (host-side URLs of the export), `url(version, export)` for
    another export (`DENIED_EXPORT` is one no client may mount), `netns`,
    `nfs_port` / `mount_port` (host-side ports of the bridge).
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.export_dir = self.workdir / "export"
        self.export_dir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "state").mkdir(exist_ok=True)
        (self.workdir / "denied").mkdir(exist_ok=True)
        self.config = self.workdir / "ganesha.conf"
        self.config.write_text(
            _CONFIG.format(
                nfs_port=NFS_PORT,
                mount_port=MOUNT_PORT,
                state=self.workdir / "state",
                path=self.export_dir,
                pseudo=EXPORT,
                denied=self.workdir / "denied",
                denied_pseudo=DENIED_EXPORT,
            )
        )
        self.netns = f"fc-nfs-{os.getpid()}-{next(_counter)}"
        self.rpcbind: subprocess.Popen[bytes] | None = None
        self.ganesha: subprocess.Popen[bytes] | None = None
        self.bridge: DelayProxy | None = None
        self._starts = 0
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    def _setup(self) -> None:
        subprocess.run(["ip", "netns", "add", self.netns], check=True)
        subprocess.run(["ip", "-n", self.netns, "link", "set", "lo", "up"], check=True)
        # The private mount namespace starts as a copy of ours, FUSE mounts included: a copy would keep
        # such a mount's daemon alive after `fusermount3 -u` in our namespace, so drop them there first.
        # rpcbind -f stays in the foreground, so the PID we hold is rpcbind's
        # own (unshare, nsenter and sh all exec) and its mount namespace is
        # the one with the private /run that ganesha must share.
        self.rpcbind = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "--", "nsenter", f"--net=/run/netns/{self.netns}",
             "sh", "-c", _RPCBIND_SH],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 5
        while not self._rpcbind_ready():
            if self.rpcbind.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("rpcbind did not start in the test namespace")
            time.sleep(0.01)
        self.bridge = DelayProxy([NFS_PORT, MOUNT_PORT], netns=self.netns)
        self.nfs_port = self.bridge.ports[NFS_PORT]
        self.mount_port = self.bridge.ports[MOUNT_PORT]
        self.url_v4 = self.url(4)
        self.url_v3 = self.url(3)
        self.start()

    def url(self, version: int, export: str = EXPORT) -> str:
        """The host-side URL of `export` for NFS `version` (3 or 4)."""
        if version == 3:
            return f"nfs://127.0.0.1:{self.nfs_port}{export}?version=3&mountport={self.mount_port}"
        return f"nfs://127.0.0.1:{self.nfs_port}{export}?version=4"

    def _rpcbind_ready(self) -> bool:
        assert self.rpcbind is not None
        try:
            mnt = os.readlink(f"/proc/{self.rpcbind.pid}/ns/mnt")
            comm = Path(f"/proc/{self.rpcbind.pid}/comm").read_text().strip()
        except OSError:
            return False
        return comm == "rpcbind" and mnt != os.readlink("/proc/self/ns/mnt")

    @property
    def log(self) -> Path:
        return self.workdir / f"ganesha-{self._starts}.log"

    def start(self) -> None:
        """Start ganesha (again) and wait until it serves."""
        assert self.rpcbind is not None and self.ganesha is None
        self._starts += 1
        log = self.log
        self.ganesha = subprocess.Popen(
            ["nsenter", f"--mount=/proc/{self.rpcbind.pid}/ns/mnt", f"--net=/run/netns/{self.netns}",
             "ganesha.nfsd", "-F", "-f", str(self.config), "-L", str(log), "-p", str(self.workdir / "ganesha.pid")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while b"NFS SERVER INITIALIZED" not in (log.read_bytes() if log.exists() else b""):
            if self.ganesha.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                self.stop()
                raise RuntimeError(f"ganesha did not start; log {log}:\n{tail}")
            time.sleep(0.01)

    def stop(self) -> None:
        """Stop ganesha by PID (SIGTERM; it takes 1.5-2 s), SIGKILL if it lingers."""
        if self.ganesha is not None:
            if self.ganesha.poll() is None:
                self.ganesha.send_signal(signal.SIGTERM)
            _wait_dead(self.ganesha, 10)
            self.ganesha = None

    def kill(self) -> None:
        """Kill ganesha at once (SIGKILL): a server that dies, not one that shuts down."""
        if self.ganesha is not None:
            self.ganesha.kill()
            self.ganesha.wait()
            self.ganesha = None

    def close(self) -> None:
        """Stop everything this server started, by PID, and delete its namespace."""
        self.stop()
        if self.bridge is not None:
            self.bridge.stop()
            self.bridge = None
        if self.rpcbind is not None:
            if self.rpcbind.poll() is None:
                self.rpcbind.terminate()
            _wait_dead(self.rpcbind, 5)
            self.rpcbind = None
        subprocess.run(["ip", "netns", "delete", self.netns], stderr=subprocess.DEVNULL, check=False)

    def __enter__(self) -> NfsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@pytest.fixture(scope="module")
def nfs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NfsServer]:
    """A running ganesha shared by a test module; tests that stop it must start it again."""
    with NfsServer(tmp_path_factory.mktemp("nfs")) as server:
        yield server
