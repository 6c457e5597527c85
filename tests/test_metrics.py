"""Prometheus metrics of a real mount: scraped over HTTP, parsed, and checked against `fusecache stats --json`."""

from __future__ import annotations

import os
import socket
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fusecache.metrics import metric_families
from fusecache.stats import MountStats
from tests.mounting import force_unmount, free_port, is_mounted, run_fusecache, stats

pytestmark = pytest.mark.mount

WAIT = 30.0  # a bound on how long the snapshot may take to catch up, not a measurement


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample as {(name, sorted labels): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def read_all(path: str) -> None:
    with open(path, "rb") as f:
        while f.read(1 << 20):
            pass


def test_metrics_agree_with_stats(mounter, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "vm1.img").write_bytes(os.urandom(4 << 20))
    (images / "vm2.img").write_bytes(os.urandom(1 << 20))
    port = free_port()
    m = mounter.mount(
        str(images), "--cache-dir", str(tmp_path / "cache"), "--cache-size", "64M", "--admit", "inclusive",
        "--metrics", f"127.0.0.1:{port}",
    )
    for _ in range(2):  # a miss then a hit for every block
        read_all(os.path.join(m.mountpoint, "vm1.img"))
    read_all(os.path.join(m.mountpoint, "vm2.img"))
    with open(os.path.join(m.mountpoint, "vm2.img"), "r+b") as f:
        f.write(b"x" * 4096)

    # the daemon publishes a snapshot every second: wait until the scrape has caught up with the reads
    st = stats(m.mountpoint)
    deadline = time.monotonic() + WAIT
    while True:
        samples = scrape(port)
        if samples.get(("fusecache_reads_total", (("image", "vm2.img"),))) == st.images["vm2.img"].reads:
            break
        assert time.monotonic() < deadline, "the metrics never caught up with the stats"
        time.sleep(0.2)
    st = stats(m.mountpoint)

    for image, c in st.images.items():
        for key, source in (("hit_bytes", "hit"), ("peer_bytes", "peer"), ("backing_bytes", "backing")):
            assert samples[("fusecache_read_bytes_total", (("image", image), ("source", source)))] == getattr(c, key)
        for key, name in (
            ("reads", "fusecache_reads_total"),
            ("admitted_chunks", "fusecache_admitted_chunks_total"),
            ("write_bytes", "fusecache_write_bytes_total"),
            ("invalidations", "fusecache_invalidations_total"),
        ):
            assert samples[(name, (("image", image),))] == getattr(c, key), name
    assert samples[("fusecache_read_bytes_total", (("image", "vm1.img"), ("source", "hit")))] == 4 << 20
    assert samples[("fusecache_write_bytes_total", (("image", "vm2.img"),))] == 4096
    store = st.store
    assert samples[("fusecache_cache_capacity_bytes", ())] == store.capacity == 64 << 20
    assert samples[("fusecache_cache_stored_bytes", ())] == store.bytes_stored
    assert samples[("fusecache_cache_logical_bytes", ())] == store.logical_bytes
    assert samples[("fusecache_cache_dedup_ratio", ())] == pytest.approx(store.dedup_ratio)
    assert samples[("fusecache_cache_evicted_chunks_total", ())] == store.evicted_chunks
    assert samples[("fusecache_cache_verify_failures_total", ())] == store.verify_failures
    # every byte served from the backing was fetched first: the fetcher's counters are in the snapshot too
    fetched = samples[("fusecache_fetch_critical_bytes_total", ())] + samples[("fusecache_fetch_background_bytes_total", ())]
    assert fetched >= (4 << 20) + (1 << 20)
    assert ("fusecache_fetch_waited_seconds_total", ()) in samples and st.fetch is not None
    assert samples[("fusecache_fetch_evicted_bytes_total", ())] == st.fetch.evicted_bytes
    # the images were just written (in the host page cache): their cold reads were answered on the loop, no thread
    assert st.fetch.loop_reads > 0 and samples[("fusecache_fetch_loop_reads_total", ())] <= st.fetch.loop_reads
    assert samples[("fusecache_open_files", ())] == 0
    # Prometheus naming: our metrics under fusecache_, the process collector's under process_
    assert all(name.startswith(("fusecache_", "process_")) for name, _ in samples)


def test_balloon_and_peer_metrics_appear_when_the_stats_have_them():
    # the shape the balloon monitor and the peer client publish (see balloon.py, peers/client.py)
    families = metric_families(MountStats.from_json({
        "open_files": 1,
        "balloon": {"guests": {"vm1": {"running": True, "target": 2 << 30, "actual": 3 << 30, "shrinks": 2,
                                       "evicted_estimate": 1 << 28, "admitted_bytes": 1 << 27},
                               "vm2": {"running": False, "target": None, "actual": None}}},
        "peers": {"peers": {"host2:7070": {"up": True, "rtt_ms": 0.25, "hits_given": 5, "hits_taken": 7}}},
    }))
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}
    assert samples[("fusecache_balloon_target_bytes", (("guest", "vm1"),))] == 2 << 30
    assert samples[("fusecache_balloon_admitted_bytes_total", (("guest", "vm1"),))] == 1 << 27
    assert samples[("fusecache_guest_running", (("guest", "vm2"),))] == 0
    assert ("fusecache_balloon_actual_bytes", (("guest", "vm2"),)) not in samples  # unknown, not zero
    assert samples[("fusecache_peer_up", (("peer", "host2:7070"),))] == 1
    assert samples[("fusecache_peer_rtt_seconds", (("peer", "host2:7070"),))] == pytest.approx(0.00025)
    assert samples[("fusecache_peer_hits_taken_total", (("peer", "host2:7070"),))] == 7


def test_a_port_in_use_fails_the_mount_with_one_line(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = run_fusecache(
            "mount", str(images), str(mnt), "--cache-dir", str(tmp_path / "cache"), "--log-file", str(tmp_path / "log"),
            "--metrics", f"127.0.0.1:{port}",
        )
    try:
        assert proc.returncode != 0
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, proc.stderr
        assert f"127.0.0.1:{port}" in lines[0] and "in use" in lines[0], lines[0]
        assert not is_mounted(str(mnt))
    finally:
        force_unmount(str(mnt), None)
