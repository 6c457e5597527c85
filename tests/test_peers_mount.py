"""Several hosts on one machine: fusecache mounts that share one backing and each other's caches."""

from __future__ import annotations

import os
import socket
import time

import pytest

from tests.harness.waiting import wait_for
from tests.mounting import free_port, is_mounted, run_fusecache, stats

pytestmark = pytest.mark.mount
MiB = 1 << 20


def read_all(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture
def key_file(tmp_path):
    path = tmp_path / "cluster.key"
    path.write_bytes(os.urandom(32))
    path.chmod(0o600)
    return str(path)


def cluster(mounter, images, tmp_path, n: int, key_args: list[str]) -> list:
    ports = [free_port() for _ in range(n)]
    hosts = []
    for i in range(n):
        peers = [a for p in ports if p != ports[i] for a in ("--peer", f"127.0.0.1:{p}")]
        hosts.append(
            mounter.mount(
                images.spec, "--admit", "inclusive", "--cache-dir", str(tmp_path / f"cache{i}"),
                "--listen", f"127.0.0.1:{ports[i]}", *peers, *key_args, "--peer-timeout", "0.5",
            )
        )
    return hosts


def peers_know(mp: str, locations: int) -> bool:
    return all(p.up and p.summary_locations >= locations for p in stats(mp).peers.peers.values())


def test_a_block_read_on_one_host_is_a_peer_hit_on_the_others(mounter, images, tmp_path, key_file):
    data = os.urandom(4 * MiB)
    with open(images.path("base.img"), "wb") as f:
        f.write(data)
    a, b, c = cluster(mounter, images, tmp_path, 3, ["--cluster-key-file", key_file])
    assert read_all(os.path.join(a.mountpoint, "base.img")) == data
    # b learns what a holds from a's next summary (rebuilt at most every 5 s after a change)
    wait_for(lambda: any(p.summary_locations >= 64 for p in stats(b.mountpoint).peers.peers.values()), "a's summary")
    assert read_all(os.path.join(b.mountpoint, "base.img")) == data
    img = stats(b.mountpoint).images["base.img"]
    assert img.peer_bytes == len(data) and img.backing_bytes == 0
    taken = sum(p.hits_taken for p in stats(b.mountpoint).peers.peers.values())
    assert taken == 64  # each chunk fetched once, whether a request or the readahead asked for it
    # a sequential read from a peer is read ahead: most of its chunks were there before their request came
    fetch = stats(b.mountpoint).fetch
    assert fetch is not None and 32 <= fetch.peer_read_ahead_used <= fetch.peer_read_ahead_chunks <= 64, fetch
    assert all(p.corrupt_blocks == 0 for p in stats(b.mountpoint).peers.peers.values())
    assert read_all(os.path.join(c.mountpoint, "base.img")) == data  # the third host: from a (or b, once b's summary says so)
    assert stats(c.mountpoint).images["base.img"].peer_bytes == len(data)
    # the dedup across hosts, as each mount reports it: c holds what a also holds, and says so
    wait_for(lambda: stats(c.mountpoint).peers.cluster.chunks_also_on_peers == 64, "c's cluster counters")
    held = stats(c.mountpoint).peers.cluster
    assert held.chunks_only_here == 0 and held.peer_bytes_taken == len(data)


def test_a_file_changed_on_the_backing_is_not_served_stale_by_a_peer(mounter, images, tmp_path, key_file):
    with open(images.path("v.img"), "wb") as f:
        f.write(b"1" * 2 * MiB)
    a, b = cluster(mounter, images, tmp_path, 2, ["--cluster-key-file", key_file])
    read_all(os.path.join(a.mountpoint, "v.img"))
    wait_for(lambda: any(p.summary_locations >= 32 for p in stats(b.mountpoint).peers.peers.values()), "a's summary")
    images.write_behind("v.img", b"2" * 2 * MiB)  # another host rewrites the image on NFS
    assert read_all(os.path.join(b.mountpoint, "v.img")) == b"2" * 2 * MiB
    assert stats(b.mountpoint).images["v.img"].peer_bytes == 0


def test_a_peer_with_the_wrong_key_learns_nothing(mounter, images, tmp_path, key_file):
    with open(images.path("s.img"), "wb") as f:
        f.write(os.urandom(MiB))
    port_a = free_port()
    a = mounter.mount(images.spec, "--admit", "inclusive", "--cache-dir", str(tmp_path / "ca"),
                      "--listen", f"127.0.0.1:{port_a}", "--peer-allow", "127.0.0.1", "--cluster-key-file", key_file)
    read_all(os.path.join(a.mountpoint, "s.img"))
    other = tmp_path / "other.key"
    other.write_bytes(os.urandom(32))
    other.chmod(0o600)
    b = mounter.mount(images.spec, "--admit", "inclusive", "--cache-dir", str(tmp_path / "cb"),
                      "--peer", f"127.0.0.1:{port_a}", "--cluster-key-file", str(other))
    time.sleep(1.5)
    read_all(os.path.join(b.mountpoint, "s.img"))
    s = stats(b.mountpoint)
    assert s.images["s.img"].peer_bytes == 0
    peer = s.peers.peers[f"127.0.0.1:{port_a}"]
    assert not peer.up and peer.summary_locations == 0
    served = stats(a.mountpoint).peers
    assert served.served == {}  # no record of any address that never authenticated
    assert served.handshakes.failed >= 1 and served.handshakes.authenticated == 0, served.handshakes


def test_peering_needs_a_key(images, tmp_path):
    mp = tmp_path / "m"
    mp.mkdir()
    proc = run_fusecache("mount", images.spec, str(mp), "--peer", "10.1.2.3:7070", "--cache-dir", str(tmp_path / "c"))
    assert proc.returncode != 0 and "cluster-key-file" in proc.stderr and proc.stderr.count("\n") == 1
    proc = run_fusecache("mount", images.spec, str(mp), "--peer", "10.1.2.3:7070", "--peer-insecure", "--cache-dir", str(tmp_path / "c"))
    assert proc.returncode != 0 and "refused" in proc.stderr and proc.stderr.count("\n") == 1
    loose = tmp_path / "loose.key"
    loose.write_bytes(os.urandom(32))
    loose.chmod(0o644)
    proc = run_fusecache("mount", images.spec, str(mp), "--peer", "10.1.2.3:7070", "--cluster-key-file", str(loose))
    assert proc.returncode != 0 and "chmod 600" in proc.stderr
    assert not is_mounted(str(mp))


def test_listen_address_in_use_fails_the_mount(images, tmp_path, key_file):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        mp = tmp_path / "m"
        mp.mkdir()
        proc = run_fusecache("mount", images.spec, str(mp), "--listen", f"127.0.0.1:{port}", "--peer-allow", "127.0.0.0/8",
                             "--cluster-key-file", key_file,
                             "--cache-dir", str(tmp_path / "c"), "--log-file", str(tmp_path / "log"))
    assert proc.returncode != 0 and "cannot listen" in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert not is_mounted(str(mp))


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--listen", "127.0.0.1:7070"], "would accept no one"),
        (["--listen", "127.0.0.1:7070", "--peer-allow", "10.0.0.0/33"], "--peer-allow 10.0.0.0/33 is not a network"),
    ],
)
def test_a_listen_that_accepts_no_one_or_a_bad_network_is_refused(images, tmp_path, key_file, args, says):
    mp = tmp_path / "m"
    mp.mkdir()
    proc = run_fusecache("mount", images.spec, str(mp), *args, "--cluster-key-file", key_file, "--cache-dir", str(tmp_path / "c"))
    assert proc.returncode != 0 and says in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert not is_mounted(str(mp))
