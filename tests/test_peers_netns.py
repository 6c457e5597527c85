"""Peers as separate hosts: daemons in network namespaces, veth links, delay and corruption in between.

Each host is a `fusecache mount` daemon whose network is a namespace made by
`tests/harness/netns.py` (a bridge, one veth per host, 10.213.x.y addresses that exist
only inside those namespaces); every mount is in this process's mount
namespace, and all hosts share one backing directory (the stand-in for the
NFS export). Between an asking host and the peer it asks runs a link proxy
(a userspace TCP proxy reusing tests/harness/delay_proxy.py, since this kernel has
no netem) that adds delay and can corrupt the peer's CHUNK frames.

What `test_peers_mount.py` (loopback) does not cover, and this does:
a peer killed or cut off in the middle of a transfer, peers behind a round
trip longer or shorter than the deadline, a peer whose blocks arrive
corrupted (on the wire, or correctly MAC'd but wrong), staleness across a
delayed link, and hosts that hold the peer port with idle connections (from
another host, and from a keyed peer's own address). No timing is asserted
beyond generous "returns within N s".

`python -m tests.test_peers_netns idle HOST:PORT N [hello]` (run inside a
namespace with nsenter) is that last attacker: N connections that never send
a byte (or only a well-formed HELLO) and reconnect as soon as they are
closed, until SIGTERM.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from fusecache.peers import PeerStats
from tests.harness.netns import Host, Net, leftovers
from tests.harness.waiting import wait_for
from tests.mounting import stats

pytestmark = [pytest.mark.mount, pytest.mark.netns]
MiB = 1 << 20


def peer(mp: str, address: str) -> PeerStats:
    return stats(mp).peers.peers[address]


def read_all(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture
def key_file(tmp_path: Path) -> str:
    path = tmp_path / "cluster.key"
    path.write_bytes(os.urandom(32))
    path.chmod(0o600)
    return str(path)


@pytest.fixture
def make_net(tmp_path: Path) -> Iterator[Callable[[int], Net]]:
    """Networks of N hosts; every mount, proxy and namespace is removed afterwards, pass or fail."""
    nets: list[Net] = []

    def make(hosts: int) -> Net:
        net = Net(tmp_path, hosts)
        nets.append(net)
        return net

    try:
        yield make
    finally:
        for net in nets:
            net.close()
        assert not leftovers(tmp_path), f"left behind: {leftovers(tmp_path)}"


class Cluster:
    """Starts hosts of one net on one backing with one key; `start(host, peers, timeout)`."""

    def __init__(self, net: Net, backing: str, key_file: str, tmp: Path) -> None:
        self.net, self.backing, self.key_file, self.tmp = net, backing, key_file, tmp

    def start(self, host: Host, peers: Sequence[str] = (), timeout: str = "0.5", *extra: str, allow_net: bool = True) -> str:
        # Peers here connect through link proxies, from their own address to --peer 127.0.0.1:...:
        # the server accepts the whole bridge (--peer-allow) unless a test says otherwise.
        allow = ["--peer-allow", host.addr.rsplit(".", 1)[0] + ".0/24"] if allow_net else []
        args = ["--admit", "inclusive", "--cache-dir", str(self.tmp / f"cache-{host.ns}"), "--cache-size", "256M",
                "--listen", host.peer_address, "--cluster-key-file", self.key_file, "--peer-timeout", timeout,
                *allow, *[a for p in peers for a in ("--peer", p)], *extra]  # fmt: skip
        return self.net.mount(host, self.backing, *args).mountpoint


@pytest.fixture
def images(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    root.mkdir()
    return root


def knows(mp: str, address: str, locations: int) -> bool:
    p = peer(mp, address)
    return p.up and p.summary_locations >= locations


@pytest.mark.parametrize("how", ["killed", "vanished"])
def test_a_peer_that_dies_mid_transfer_costs_a_bounded_wait(make_net, images, tmp_path, key_file, how):
    """killed: SIGKILL, its kernel closes the sockets. vanished: its link goes down first, so
    nothing more arrives at all (no FIN, no RST) and only the deadline and silence tell."""
    size = 48 * MiB
    data = os.urandom(size)
    (images / "k.img").write_bytes(data)
    net = make_net(2)
    a, b = net.hosts
    cl = Cluster(net, str(images), key_file, tmp_path)
    link = net.proxy(b, a, delay_ms=1)
    ma = cl.start(a)
    mb = cl.start(b, [link.address], "0.5")
    assert read_all(os.path.join(ma, "k.img")) == data
    wait_for(lambda: knows(mb, link.address, size // (64 * 1024)), "a's summary at b")
    a_pid = net.mounts[0].pid
    assert a_pid is not None

    got = bytearray()
    done = threading.Event()
    failure: list[BaseException] = []

    def reader() -> None:
        try:
            with open(os.path.join(mb, "k.img"), "rb") as f:
                while block := f.read(MiB):
                    got.extend(block)
        except BaseException as e:  # reported by the test thread
            failure.append(e)
        finally:
            done.set()

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    wait_for(lambda: len(got) >= 4 * MiB or done.is_set(), "b's first peer bytes", 30)
    if how == "vanished":
        net.link_down(a)
    os.kill(a_pid, signal.SIGKILL)
    killed_at = time.monotonic()
    assert done.wait(90), "the read on b did not return after its peer died"
    assert not failure, failure
    print(f"\n{how}: the read finished {time.monotonic() - killed_at:.2f} s after the kill")
    assert bytes(got) == data
    wait_for(lambda: not peer(mb, link.address).up, "b to mark a down", 20)
    img = stats(mb).images["k.img"]
    assert img.peer_bytes > 0 and img.backing_bytes > 0, img  # both sides of the kill
    assert img.peer_bytes + img.backing_bytes == size, img


def test_peer_hits_need_a_deadline_longer_than_the_round_trip(make_net, images, tmp_path, key_file):
    size = 8 * MiB
    data = os.urandom(size)
    (images / "d.img").write_bytes(data)
    net = make_net(3)
    a, b, c = net.hosts
    cl = Cluster(net, str(images), key_file, tmp_path)
    slow_b = net.proxy(b, a, delay_ms=2)  # 2 ms each way: a round trip of 4 ms and more
    slow_c = net.proxy(c, a, delay_ms=2)
    ma = cl.start(a)
    mb = cl.start(b, [slow_b.address], "0.5")  # deadline well over the round trip
    mc = cl.start(c, [slow_c.address], "0.001")  # deadline under it
    assert read_all(os.path.join(ma, "d.img")) == data
    wait_for(lambda: knows(mb, slow_b.address, 128) and knows(mc, slow_c.address, 128), "a's summary at b and c")

    assert read_all(os.path.join(mb, "d.img")) == data
    img = stats(mb).images["d.img"]
    assert img.peer_bytes == size and img.backing_bytes == 0, img
    pb = peer(mb, slow_b.address)
    assert pb.rtt_ms > 3.5, pb  # the proxy's delay is really on the path (a lower bound, not a timing)

    assert read_all(os.path.join(mc, "d.img")) == data
    img = stats(mc).images["d.img"]
    assert img.peer_bytes == 0 and img.backing_bytes == size, img
    pc = peer(mc, slow_c.address)
    assert pc.requests > 0 and pc.abandoned > 0 and pc.hits_taken == 0, pc  # asked, gave up at the deadline
    assert pc.up, pc  # a slow peer is not a dead one


def test_a_peer_whose_blocks_arrive_corrupted_is_never_served(make_net, images, tmp_path, key_file):
    """A data byte of every CHUNK flipped on the path: the frame MAC, which covers every byte, catches it; the
    peer is counted, banned (no reconnect loop), and every byte comes from the backing."""
    size = 4 * MiB
    data = os.urandom(size)
    (images / "c.img").write_bytes(data)
    net = make_net(2)
    a, b = net.hosts
    cl = Cluster(net, str(images), key_file, tmp_path)
    bad = net.proxy(b, a, corrupt="wire")
    ma = cl.start(a)
    mb = cl.start(b, [bad.address], "0.5")
    assert read_all(os.path.join(ma, "c.img")) == data
    wait_for(lambda: knows(mb, bad.address, 64), "a's summary at b")

    assert read_all(os.path.join(mb, "c.img")) == data
    img = stats(mb).images["c.img"]
    assert img.peer_bytes == 0 and img.backing_bytes == size, img
    p = peer(mb, bad.address)
    assert p.hits_taken == 0, p
    assert "wrong MAC" in Path(net.mounts[1].log).read_text()
    assert p.protocol_errors >= 1 and p.connects == 1 and not p.up, p  # counted, and banned: no reconnect loop
    # A second read is served right too (from b's own cache now, or the backing).
    assert read_all(os.path.join(mb, "c.img")) == data


def test_a_file_changed_on_the_backing_is_not_served_stale_across_a_slow_link(make_net, images, tmp_path, key_file):
    size = 2 * MiB
    (images / "v.img").write_bytes(b"1" * size)
    net = make_net(2)
    a, b = net.hosts
    cl = Cluster(net, str(images), key_file, tmp_path)
    link = net.proxy(b, a, delay_ms=1)
    ma = cl.start(a)
    mb = cl.start(b, [link.address], "0.5")
    assert read_all(os.path.join(ma, "v.img")) == b"1" * size
    wait_for(lambda: knows(mb, link.address, 32), "a's summary at b")
    with open(images / "v.img", "r+b") as f:  # another host rewrites the image on NFS
        f.write(b"2" * size)
    assert read_all(os.path.join(mb, "v.img")) == b"2" * size
    assert stats(mb).images["v.img"].peer_bytes == 0


def test_namespaces_are_gone_after_a_net_closes(tmp_path):
    net = Net(tmp_path, 2)
    names = [net.switch, *(h.ns for h in net.hosts)]
    net.close()
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert not any(n in listed for n in names)


class IdleFlood:
    """`count` idle connections from namespace `ns` to `target` that reconnect when closed, in a process of their own."""

    def __init__(self, ns: str, target: str, count: int, hello: bool = False) -> None:
        root = Path(__file__).resolve().parent.parent
        cmd = ["nsenter", f"--net=/run/netns/{ns}", sys.executable, "-m", "tests.test_peers_netns", "idle", target, str(count)]
        cmd += ["hello"] if hello else []
        self.proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line.startswith("READY"):
            self.stop()
            raise RuntimeError(f"idle flood from {ns} did not start: {line!r}")

    def stop(self) -> int:
        """Stop it by PID; the number of connections it made."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            out, _ = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        return int(out.split()[-1]) if out and out.split()[-1].isdigit() else 0


@pytest.mark.parametrize("talking", [False, True], ids=["silent", "hello"])
def test_idle_connections_from_anywhere_do_not_keep_a_keyed_peer_out(make_net, images, tmp_path, key_file, talking):
    """64 idle reconnecting connections from a host that is no peer (refused at accept) and 64
    from the keyed peer's own address (held in the bounded pending table, oldest dropped):
    the keyed peer still connects and serves. hello: those from the peer's address send a
    well-formed HELLO first, so they look like a peer's handshake until the proof is due."""
    size = 4 * MiB
    data = os.urandom(size)
    (images / "p.img").write_bytes(data)
    net = make_net(3)
    a, b, c = net.hosts
    cl = Cluster(net, str(images), key_file, tmp_path)
    ma = cl.start(a, [b.peer_address], allow_net=False)  # a accepts b's address only
    assert read_all(os.path.join(ma, "p.img")) == data
    floods = [IdleFlood(c.ns, a.peer_address, 64), IdleFlood(b.ns, a.peer_address, 64, hello=talking)]
    try:
        wait_for(lambda: (h := stats(ma).peers.handshakes).not_allowed >= 64 and h.dropped >= 64, "the floods at a")
        # The handshake itself, timed from b's namespace while both floods run: every one succeeds.
        probe = subprocess.run(
            ["nsenter", f"--net=/run/netns/{b.ns}", sys.executable, "-m", "tests.test_peers_netns", "handshakes",
             a.peer_address, key_file, "20"],
            cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert probe.returncode == 0, probe.stderr
        results = [line.split() for line in probe.stdout.splitlines()]
        times = sorted(float(t) for t, _ in results)
        retried = sum(int(n) > 1 for _, n in results)
        print(f"\n20 keyed connects from b's address under both floods: median {times[10] * 1000:.1f} ms, "
              f"max {times[-1] * 1000:.1f} ms, {retried} needed a retry")
        assert len(times) == 20 and times[-1] < 5.0  # a generous bound: each one got through
        mb = cl.start(b, [a.peer_address], allow_net=False)
        started = time.monotonic()
        wait_for(lambda: knows(mb, a.peer_address, size // (64 * 1024)), "b to connect to a and get its summary", 20)
        print(f"\nb connected to a and had its summary {time.monotonic() - started:.2f} s after its mount returned")
        assert read_all(os.path.join(mb, "p.img")) == data
        img = stats(mb).images["p.img"]
        assert img.peer_bytes == size and img.backing_bytes == 0, img
        hs = stats(ma).peers.handshakes
        assert hs.authenticated >= 1 and hs.peak_pending <= 32, hs  # one source: its share of the table
        assert set(stats(ma).peers.served) == {b.addr}, stats(ma).peers.served  # no record of c at all
    finally:
        made = [f.stop() for f in floods]
    print(f"idle connections made: from c {made[0]}, from b's address {made[1]}; a's handshakes: {stats(ma).peers.handshakes}")


async def _idle(target: str, count: int, hello: bool) -> None:
    from fusecache.peers.protocol import HEADER, HELLO, _hello

    host, port = target.rsplit(":", 1)
    made = 0
    ready = asyncio.Event()

    async def one() -> None:
        nonlocal made
        while True:
            try:
                reader, writer = await asyncio.open_connection(host, int(port))
            except OSError:
                await asyncio.sleep(0.01)
                continue
            made += 1
            if made >= count:
                ready.set()
            try:
                if hello:
                    body = _hello(os.urandom(32))
                    writer.write(HEADER.pack(HELLO, 0, 0, len(body)) + body)
                await reader.read()  # until the server closes it
            except OSError:
                pass
            writer.close()

    tasks = [asyncio.create_task(one()) for _ in range(count)]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await ready.wait()
    print("READY", flush=True)
    await stop.wait()
    for t in tasks:
        t.cancel()
    print(made, flush=True)


def _handshakes(target: str, key_file: str, count: int) -> None:
    """`count` keyed connects one after another, each retried as PeerSet retries (50 ms, doubling);
    prints each one's seconds and attempts; exits 1 if one has not succeeded after 10 s."""
    import trio

    from fusecache.peers.protocol import ProtocolError, client_handshake

    host, port = target.rsplit(":", 1)
    key = Path(key_file).read_bytes()

    async def main() -> None:
        for _ in range(count):
            started = trio.current_time()
            attempts, backoff = 0, 0.05
            with trio.fail_after(10):
                while True:
                    attempts += 1
                    try:
                        stream = await trio.open_tcp_stream(host, int(port))
                        async with stream:
                            await client_handshake(stream, key)
                        break
                    except (ProtocolError, OSError, trio.BrokenResourceError):
                        await trio.sleep(backoff)
                        backoff *= 2
            print(f"{trio.current_time() - started:.6f} {attempts}", flush=True)

    trio.run(main)


if __name__ == "__main__":
    if sys.argv[1:2] == ["idle"] and len(sys.argv) in (4, 5):
        asyncio.run(_idle(sys.argv[2], int(sys.argv[3]), sys.argv[4:] == ["hello"]))
    elif sys.argv[1:2] == ["handshakes"] and len(sys.argv) == 5:
        _handshakes(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        sys.exit("usage: python -m tests.test_peers_netns idle HOST:PORT N [hello] | handshakes HOST:PORT KEYFILE N")
