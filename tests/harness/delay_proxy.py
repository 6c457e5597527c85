"""A userspace TCP delay proxy: the stand-in for a network, since this kernel has no netem.

Owns one thing: forwarding TCP connections from 127.0.0.1 to upstream ports,
each byte held back by a fixed one-way delay in each direction (so a round
trip gains twice the delay), order preserved, any number of connections.

With `--netns NAME` the upstream side is inside that network namespace: the
proxy binds its listening sockets in the namespace it started in, then joins
NAME before connecting anywhere. The NFS test server (tests/harness/nfs_server.py)
uses this as the bridge from the host's loopback to a server that lives in a
namespace of its own, so no address other than 127.0.0.1 is ever involved.

Run it as a process (tests and bench do so through `DelayProxy`, which stops
it by PID):

    python -m tests.harness.delay_proxy --delay-ms 1 [--netns NAME] 2049 [20048 ...]

It prints one line, `READY <port> [<port> ...]`, the local port for each
upstream port in order, then serves until SIGTERM. The delay is a float:
sub-millisecond delays (0.1 ms one way = 0.2 ms round trip) are kept, not
rounded to the event loop's millisecond (see `main`).

It counts the bytes it forwards: on SIGUSR1 it prints `BYTES <down> <up>`
(server to client, client to server, since it started), which
`DelayProxy.counts()` reads. Benchmarks use it as an independent count of
what a client read from the server, bytes on the wire.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import ctypes
import os
import selectors
import signal
import socket
import subprocess
import sys
import time

_CLONE_NEWNET = 0x40000000


def join_netns(name: str) -> None:
    """Move this thread (and threads it starts later) into network namespace `name`."""
    # os.setns exists only from Python 3.12; the proxy is single-threaded at
    # this point, so joining affects every socket it creates from now on.
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"setns into network namespace {name}: {os.strerror(e)}")
    finally:
        os.close(fd)


class _Half(asyncio.Protocol):
    """One end of a proxied connection: what it receives goes out the other end `delay` later.

    Chunks wait in a FIFO with their due times and one timer drains it, so
    order is kept whatever the clock's resolution. Flow control follows the
    data: when the far end cannot write, this end stops reading.
    """

    def __init__(self, delay: float, tally: list[int] | None = None, slot: int = 0) -> None:
        self.delay = delay
        self.tally = tally  # bytes received by this end are added to tally[slot]
        self.slot = slot
        self.transport: asyncio.Transport | None = None
        self.peer: _Half | None = None
        self.early: list[bytes | None] = []  # received before the far end was connected
        self.queue: collections.deque[tuple[float, bytes | None]] = collections.deque()
        self.timer: asyncio.TimerHandle | None = None
        self.ended = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def attach(self, peer: _Half) -> None:
        self.peer = peer
        for data in self.early:
            self._send(data)
        self.early.clear()

    def data_received(self, data: bytes) -> None:
        if self.tally is not None:
            self.tally[self.slot] += len(data)
        self._send(data)

    def eof_received(self) -> bool:
        self._send(None)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._send(None)

    def _send(self, data: bytes | None) -> None:
        """Pass data (None: end of stream) to the far end, now or after the delay."""
        if self.ended:
            return
        self.ended = data is None
        if self.peer is None:
            self.early.append(data)
            return
        if self.delay <= 0 and not self.queue:
            self.peer.deliver(data)
            return
        self.queue.append((time.monotonic() + self.delay, data))
        if self.timer is None:
            self._arm()

    def _arm(self) -> None:
        loop = asyncio.get_running_loop()
        self.timer = loop.call_later(max(0.0, self.queue[0][0] - time.monotonic()), self._drain)

    def _drain(self) -> None:
        self.timer = None
        now = time.monotonic()
        while self.queue and self.queue[0][0] <= now:
            assert self.peer is not None
            self.peer.deliver(self.queue.popleft()[1])
        if self.queue:
            self._arm()

    def deliver(self, data: bytes | None) -> None:
        """Write data from the far end to this end's socket (None: close it)."""
        if self.transport is None or self.transport.is_closing():
            return
        if data is None:
            self.transport.close()
        else:
            self.transport.write(data)

    def pause_writing(self) -> None:
        if self.peer and self.peer.transport:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer and self.peer.transport and not self.peer.transport.is_closing():
            self.peer.transport.resume_reading()


async def _serve(listeners: list[tuple[socket.socket, int]], delay: float) -> None:
    loop = asyncio.get_running_loop()
    tally = [0, 0]  # bytes from servers (down), bytes from clients (up)

    def report() -> None:
        print("BYTES", *tally, flush=True)

    async def connect(client: _Half, upstream_port: int) -> None:
        try:
            _, upstream = await loop.create_connection(lambda: _Half(delay, tally, 0), "127.0.0.1", upstream_port)
        except OSError:
            # Server down: drop the client the way a dead server's host would.
            client.deliver(None)
            return
        upstream.attach(client)
        client.attach(upstream)

    def accepted(upstream_port: int) -> _Half:
        client = _Half(delay, tally, 1)
        tasks.add(task := loop.create_task(connect(client, upstream_port)))
        task.add_done_callback(tasks.discard)
        return client

    tasks: set[asyncio.Task[None]] = set()
    servers = [await loop.create_server(lambda p=port: accepted(p), sock=sock) for sock, port in listeners]
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, report)
    # READY only now: a SIGUSR1 sent before the handler was set would have killed the proxy.
    print("READY", *(s.getsockname()[1] for s, _ in listeners), flush=True)
    await stop.wait()
    for s in servers:
        s.close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay added in each direction")
    ap.add_argument("--netns", help="connect upstream inside this network namespace")
    ap.add_argument("upstream_ports", type=int, nargs="+", help="ports on 127.0.0.1 (in --netns) to forward to")
    args = ap.parse_args(argv)
    listeners = []
    for port in args.upstream_ports:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        listeners.append((sock, port))
    if args.netns:
        join_netns(args.netns)
    fine_timers()
    # select() takes a float timeout; asyncio's default epoll loop rounds every wait up to a whole
    # millisecond, which made any delay under 1 ms one way come out as ~1.1 ms.
    with asyncio.Runner(loop_factory=lambda: asyncio.SelectorEventLoop(selectors.SelectSelector())) as runner:
        runner.run(_serve(listeners, args.delay_ms / 1000.0))


def fine_timers() -> None:
    """Make this process's timed waits end on time: Linux lets a wait overrun by the thread's
    timer slack (50 µs by default) to batch wake-ups, which adds up to a few hundred µs per
    round trip through the proxy (a 0.1 ms delay one way gave 0.5 ms round trips, not 0.28).
    1 ns: a sub-ms delay comes out as asked."""
    PR_SET_TIMERSLACK = 29
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0)


def stop_process(proc: subprocess.Popen[str]) -> None:
    """Stop a proxy process by its PID: SIGTERM, SIGKILL after 5 s; close its pipe."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout:
        proc.stdout.close()


class DelayProxy:
    """A running proxy process, for tests and benchmarks: `ports` maps upstream -> local port.

    `listen_netns`: listen on 127.0.0.1 of that network namespace instead of
    ours (a daemon running in a netns host of tests/harness/netns.py reaches the
    server through it); `netns` is where upstream is, as for the command.
    """

    def __init__(self, upstream_ports: list[int], delay_ms: float = 0.0, netns: str | None = None,
                 listen_netns: str | None = None) -> None:  # fmt: skip
        cmd = [sys.executable, os.path.abspath(__file__), "--delay-ms", repr(float(delay_ms))]
        if netns:
            cmd += ["--netns", netns]
        if listen_netns:  # nsenter execs (no fork for a network namespace): the PID stays the proxy's
            cmd = ["nsenter", f"--net=/run/netns/{listen_netns}", *cmd]
        self.proc = subprocess.Popen([*cmd, *map(str, upstream_ports)], stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().split() if self.proc.stdout else []
        if not line or line[0] != "READY":
            self.stop()
            raise RuntimeError(f"delay proxy did not start (exit {self.proc.returncode})")
        self.ports = dict(zip(upstream_ports, map(int, line[1:]), strict=True))

    def counts(self) -> tuple[int, int]:
        """Bytes forwarded so far: (server to client, client to server)."""
        assert self.proc.stdout is not None
        self.proc.send_signal(signal.SIGUSR1)
        while True:
            line = self.proc.stdout.readline().split()
            if not line:
                raise RuntimeError(f"delay proxy gone (exit {self.proc.poll()})")
            if line[0] == "BYTES":
                return int(line[1]), int(line[2])

    def stop(self) -> None:
        stop_process(self.proc)

    def __enter__(self) -> DelayProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    main()
