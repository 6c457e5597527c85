"""Hosts in network namespaces for peer tests and benchmarks: a switch, veth links, link proxies.

Owns: making a small private network (one namespace per host plus one
"switch" namespace holding a bridge; each host gets a veth pair whose other
end is a bridge port), running `fusecache mount` daemons inside a host's
network namespace, running link proxies (delay, and byte corruption) between
hosts, and tearing all of it down, pass or fail.

Shape, and why:

- Namespaces are `fcpn-<pid>-<n>-sw` (the bridge `br0`, no address) and
  `fcpn-<pid>-<n>-h<i>` (loopback plus `eth0` with `10.213.<n>.<i+1>/24`).
  Addresses exist only inside namespaces made here and nothing routes out
  of them: the switch has no uplink, and hosts have no route but their /24.
- A daemon is started with `nsenter --net=/run/netns/HOST fusecache mount ...`:
  it joins only the network namespace, so its FUSE mount lands in the
  caller's mount namespace (`ip netns exec` would make a new one). Its
  control socket is a unix socket on the filesystem, so `fusecache stats`
  works from anywhere.
- A link proxy (`python -m tests.harness.netns proxy ...`, run in the *asking* host's
  namespace) listens on that namespace's 127.0.0.1 and connects over the
  veth to the peer's address. It reuses `tests/harness/delay_proxy.py`'s delayed
  half-connection (every byte held back `--delay-ms` one way, order kept),
  and can corrupt the server's CHUNK frames: `wire` flips a data byte (the
  frame MAC covers every byte of a frame since protocol version 5: it no
  longer matches).
- `Net.close()` unmounts every mount (`force_unmount`: umount, fusermount3,
  then the daemon by PID), stops every proxy by PID, then deletes the
  namespaces, whatever happened before.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import os
import re
import selectors
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.harness.delay_proxy import _Half, fine_timers, stop_process
from tests.mounting import Mount, force_unmount, is_mounted, stop_pid

ROOT = Path(__file__).resolve().parents[2]  # the repository: `python -m tests.harness.netns` runs from there

PEER_PORT = 7070
_counter = itertools.count()


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")


@dataclasses.dataclass
class Host:
    """One host: its namespace, its address on the bridge, and its mount once started."""

    ns: str
    addr: str
    mount: Mount | None = None

    @property
    def peer_address(self) -> str:
        return f"{self.addr}:{PEER_PORT}"


class LinkProxy:
    """A proxy in namespace `ns` from 127.0.0.1:`port` to `upstream`, with a delay and optional corruption."""

    def __init__(self, ns: str, upstream: str, delay_ms: float = 0.0, corrupt: str = "none") -> None:
        cmd = ["nsenter", f"--net=/run/netns/{ns}", sys.executable, "-m", "tests.harness.netns", "proxy",
               "--delay-ms", str(delay_ms), "--corrupt", corrupt, upstream]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        line = self.proc.stdout.readline().split() if self.proc.stdout else []
        if len(line) != 2 or line[0] != "READY":
            self.stop()
            raise RuntimeError(f"link proxy did not start (exit {self.proc.returncode})")
        self.port = int(line[1])
        self.address = f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        stop_process(self.proc)


class Net:
    """A private network of `hosts` namespaces on one bridge; `close()` removes everything it made."""

    def __init__(self, workdir: str | os.PathLike[str], hosts: int) -> None:
        self.workdir = Path(workdir)
        self.n = next(_counter)
        prefix = f"fcpn-{os.getpid()}-{self.n}"
        self.switch = f"{prefix}-sw"
        self.hosts: list[Host] = []
        self.proxies: list[LinkProxy] = []
        self.mounts: list[Mount] = []
        self._made: list[str] = []
        subnet = 10 + (os.getpid() + self.n) % 240  # third octet: distinct per net, private anyway
        try:
            self._add_ns(self.switch)
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
            for i in range(hosts):
                ns = f"{prefix}-h{i}"
                self._add_ns(ns)
                _ip("-n", self.switch, "link", "add", f"v{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
                _ip("-n", self.switch, "link", "set", f"v{i}", "master", "br0", "up")
                addr = f"10.213.{subnet}.{i + 1}"
                _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
                _ip("-n", ns, "link", "set", "eth0", "up")
                self.hosts.append(Host(ns, addr))
        except BaseException:
            self.close()
            raise

    def _add_ns(self, name: str) -> None:
        _ip("netns", "add", name)
        self._made.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    def proxy(self, src: Host, dst: Host, delay_ms: float = 0.0, corrupt: str = "none") -> LinkProxy:
        """A proxy on `src`'s loopback to `dst`'s peer port: give `src` its `.address` as --peer."""
        p = LinkProxy(src.ns, dst.peer_address, delay_ms, corrupt)
        self.proxies.append(p)
        return p

    def mount(self, host: Host, backing: str, *args: str) -> Mount:
        """`fusecache mount` run in `host`'s network namespace; the mount is in ours."""
        i = self.hosts.index(host)
        mp = self.workdir / f"net{self.n}-mnt{i}"
        mp.mkdir(parents=True, exist_ok=True)
        log = str(self.workdir / f"net{self.n}-daemon{i}.log")
        cmd = ["nsenter", f"--net=/run/netns/{host.ns}", sys.executable, "-m", "fusecache",
               "mount", backing, str(mp), "--log-file", log, *args]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        m = re.search(r"daemon pid (\d+)", proc.stderr)
        mnt = Mount(backing, str(mp), int(m.group(1)) if m else None, log)
        if proc.returncode != 0:
            msg = f"fusecache mount in {host.ns} failed ({proc.returncode}): {proc.stderr.strip()}"
            raise AssertionError(msg + "\n" + mnt.log_text()[-3000:])
        self.mounts.append(mnt)
        deadline = time.monotonic() + 10
        while not os.path.ismount(mp):
            assert time.monotonic() < deadline, "mount did not appear"
            time.sleep(0.02)
        host.mount = mnt
        return mnt

    def link_down(self, host: Host) -> None:
        """Take `host` off the network without a word: no FIN, no RST, packets just vanish."""
        _ip("-n", host.ns, "link", "set", "eth0", "down")

    def close(self) -> None:
        for mnt in reversed(self.mounts):
            unmount(mnt)
        self.mounts.clear()
        for p in self.proxies:
            with contextlib.suppress(Exception):
                p.stop()
        self.proxies.clear()
        for name in reversed(self._made):
            subprocess.run(["ip", "netns", "delete", name], capture_output=True, check=False, timeout=30)
        self._made.clear()

    def __enter__(self) -> Net:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def unmount(mnt: Mount) -> None:
    """Unmount, then stop the daemon by PID after a short grace (SIGTERM, then SIGKILL).

    Not `fusecache umount`, which waits 30 s for the daemon to exit: a daemon
    does not see its unmount while another mount namespace still holds a copy
    of the mount (any `unshare --mount` made while it was mounted, e.g. the
    rpcbind of tests/harness/nfs_server.py), and SIGTERM is what ends it then.
    """
    for cmd in (["fusermount3", "-u", mnt.mountpoint], ["fusermount3", "-u", "-z", mnt.mountpoint]):
        if not is_mounted(mnt.mountpoint):
            break
        with contextlib.suppress(subprocess.TimeoutExpired):
            subprocess.run(cmd, capture_output=True, timeout=30)
    if mnt.pid is not None:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and os.path.exists(f"/proc/{mnt.pid}"):
            time.sleep(0.05)
        stop_pid(mnt.pid, grace=5)
    if is_mounted(mnt.mountpoint):  # last resort, as tests/mounting.py does
        with contextlib.suppress(Exception):
            force_unmount(mnt.mountpoint, mnt.pid)


def leftovers(workdir: str | os.PathLike[str]) -> list[str]:
    """Mounts under `workdir` and namespaces of this process that are still there (should be none)."""
    out = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines() if line.split()[4].startswith(str(workdir))]
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout.split()
    return out + [n for n in names if n.startswith(f"fcpn-{os.getpid()}-")]


# ---- the link proxy process ---------------------------------------------------------
class _Corrupter:
    """Parses the server-to-client byte stream into frames and spoils CHUNK data."""

    HEADER_SIZE = 10
    TAG_SIZE = 16

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.buffer = bytearray()
        self.plain_frames = 2  # HELLO and AUTH come without a MAC
        self.spoiled = 0

    def server_data(self, data: bytes) -> bytes:
        self.buffer += data
        out = bytearray()
        while len(self.buffer) >= self.HEADER_SIZE:
            type_, length = self.buffer[0], int.from_bytes(self.buffer[6:10], "big")
            tag = self.TAG_SIZE if self.plain_frames == 0 else 0
            total = self.HEADER_SIZE + length + tag
            if len(self.buffer) < total:
                break
            frame = bytearray(self.buffer[:total])
            del self.buffer[:total]
            if self.plain_frames:
                self.plain_frames -= 1
            elif type_ == 34 and self.mode == "wire" and length:  # CHUNK: a data byte, which the frame MAC covers
                frame[10 + length // 2] ^= 0x5A
                self.spoiled += 1
            out += frame
        return bytes(out)


class _CorruptHalf(_Half):
    """The server-facing half: what the server sends passes through the corrupter first."""

    def __init__(self, delay: float, corrupter: _Corrupter) -> None:
        super().__init__(delay)
        self.corrupter = corrupter

    def data_received(self, data: bytes) -> None:
        if self.corrupter.mode == "none":
            super().data_received(data)
            return
        spoiled = self.corrupter.server_data(data)
        if spoiled:
            super().data_received(spoiled)


async def _serve_proxy(sock: socket.socket, upstream: tuple[str, int], delay: float, mode: str) -> None:
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()

    async def connect(client: _Half, corrupter: _Corrupter) -> None:
        try:
            _, server = await loop.create_connection(lambda: _CorruptHalf(delay, corrupter), *upstream)
        except OSError:
            client.deliver(None)
            return
        server.attach(client)
        client.attach(server)

    def accepted() -> _Half:
        corrupter = _Corrupter(mode)
        client = _Half(delay)
        tasks.add(task := loop.create_task(connect(client, corrupter)))
        task.add_done_callback(tasks.discard)
        return client

    server = await loop.create_server(accepted, sock=sock)
    stop = asyncio.Event()
    import signal

    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    server.close()


def _proxy_main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m tests.harness.netns proxy", description="a link proxy: delay, and CHUNK corruption")
    ap.add_argument("--delay-ms", type=float, default=0.0)
    ap.add_argument("--corrupt", choices=["none", "wire"], default="none")
    ap.add_argument("upstream", help="host:port of the peer server")
    args = ap.parse_args(argv)
    host, port = args.upstream.rsplit(":", 1)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    print("READY", sock.getsockname()[1], flush=True)
    # The delay proxy's loop and timer slack, so a delay comes out the same through either
    # proxy (asyncio's default epoll loop rounds every wait up to a whole millisecond).
    fine_timers()
    with asyncio.Runner(loop_factory=lambda: asyncio.SelectorEventLoop(selectors.SelectSelector())) as runner:
        runner.run(_serve_proxy(sock, (host, int(port)), args.delay_ms / 1000.0, args.corrupt))


if __name__ == "__main__":
    if sys.argv[1:2] == ["proxy"]:
        _proxy_main(sys.argv[2:])
    else:
        sys.exit("usage: python -m tests.harness.netns proxy [--delay-ms D] [--corrupt none|wire] HOST:PORT")
