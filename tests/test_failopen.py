"""Failing open on a real mount: no fault of the cache reaches a guest.

A cache dir on a small real tmpfs (smaller than the working set and than the
asked --cache-size), filled behind the daemon's back while fio --verify
reads and writes through the mount; a cache dir whose data.mdb and slab are
truncated or overwritten with garbage while unmounted; a fault injected at
each layer through FUSECACHE_FAULTS (test-only) and the `faults` control
verb. Every time: no error at the guest, the daemon alive, the backing's
bytes, and the state saying what happened.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import subprocess
import threading
import time
import urllib.request

import pytest

from fusecache import control
from tests.mounting import free_port, is_mounted, run_fusecache, stats

pytestmark = pytest.mark.mount
MiB = 1 << 20
INCLUSIVE = ("--admit", "inclusive")


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 48 MiB tmpfs for the cache dir; unmounted after the test (lazily if the daemon still holds it)."""
    path = tmp_path / "small"
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        if is_mounted(str(path)):
            subprocess.run(["umount", str(path)], capture_output=True)
        if is_mounted(str(path)):
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def random_file(path: str, size: int, seed: int) -> bytes:
    data = hashlib.shake_256(seed.to_bytes(8, "little")).digest(size)
    with open(path, "wb") as f:
        f.write(data)
    return data


def read_all(path: str, bs: int = MiB) -> bytes:
    with open(path, "rb", buffering=0) as f:
        out = []
        while chunk := f.read(bs):
            out.append(chunk)
        return b"".join(out)


def fill(path: str) -> None:
    """Fill the filesystem holding `path` until it says ENOSPC."""
    with open(path, "wb") as f, contextlib.suppress(OSError):
        block = b"\xa5" * MiB
        while True:
            f.write(block)
            f.flush()


def fio_verify(directory: str, size_mib: int, jobs: int) -> subprocess.CompletedProcess[str]:
    cmd = [
        "fio", "--name=failopen", f"--directory={directory}", "--filename=vm.img", f"--size={size_mib}M",
        f"--offset_increment={size_mib}M", f"--numjobs={jobs}", "--rw=randrw", "--rwmixread=60", "--bsrange=4k-128k",
        "--direct=1", "--ioengine=psync", "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0",
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900)


def alive(pid: int | None) -> bool:
    assert pid is not None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_cache_size_the_filesystem_cannot_hold_is_refused_in_one_line(mounter, tmp_path, small_tmpfs):
    images = tmp_path / "images"
    images.mkdir()
    mp = tmp_path / "mp"
    mp.mkdir()
    proc = run_fusecache("mount", str(images), str(mp), "--cache-dir", str(small_tmpfs / "c"), "--cache-size", "256M")
    assert proc.returncode != 0 and not is_mounted(str(mp))
    line = proc.stderr.strip()
    assert "\n" not in line and "Traceback" not in line, line
    assert "MiB free" in line and "--cache-size 256M" in line and "or less" in line, line
    fits = line.split("pass --cache-size ")[1].split("M")[0]
    assert 16 <= int(fits) < 48
    m = mounter.mount(str(images), *INCLUSIVE, "--cache-dir", str(small_tmpfs / "c"), "--cache-size", f"{fits}M", mountpoint=str(mp))
    assert alive(m.pid)


def test_fio_verify_on_a_small_tmpfs_filled_behind_the_daemons_back(mounter, tmp_path, small_tmpfs, expect_log):
    """Working set 96 MiB, cache 32 MiB on a 48 MiB tmpfs; mid-run the tmpfs is filled. No error, right bytes."""
    images = tmp_path / "images"
    images.mkdir()
    m = mounter.mount(str(images), *INCLUSIVE, "--cache-dir", str(small_tmpfs / "c"), "--cache-size", "32M")
    filler = threading.Timer(3.0, fill, args=(str(small_tmpfs / "filler"),))
    filler.start()
    try:
        proc = fio_verify(m.mountpoint, 32, 3)
    finally:
        filler.join()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    assert alive(m.pid) and is_mounted(m.mountpoint)
    # and again with the filesystem full from the start: everything the cache writes now fails
    proc = fio_verify(m.mountpoint, 32, 3)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    assert read_all(os.path.join(m.mountpoint, "vm.img")) == read_all(str(images / "vm.img"))
    assert alive(m.pid)
    s = stats(m.mountpoint)
    assert s.health is not None and s.health.faults.get("store.apply", 0) > 0, s.health  # the full tmpfs was felt, not shown
    # room again: the operator's command brings the cache back without a remount
    os.unlink(small_tmpfs / "filler")
    proc = run_fusecache("recover", m.mountpoint)
    assert proc.returncode == 0, proc.stderr
    assert stats(m.mountpoint).health.state == "caching"
    assert read_all(os.path.join(m.mountpoint, "vm.img")) == read_all(str(images / "vm.img"))


def _garble(path: str, n: int, rng: random.Random) -> None:
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        for _ in range(n):
            f.seek(rng.randrange(size))
            f.write(rng.randbytes(rng.randrange(1, 4096)))


@pytest.mark.parametrize(
    "damage",
    ["truncate data.mdb, garble the slab", "garble data.mdb, truncate the slab", "garble the slab only", "garble data.mdb only"],
)
def test_a_damaged_cache_comes_up_by_itself_and_serves_the_backings_bytes(mounter, tmp_path, damage):
    images = tmp_path / "images"
    images.mkdir()
    data = {f"{i}.img": random_file(str(images / f"{i}.img"), 4 * MiB, i) for i in range(3)}
    cache = tmp_path / "cache"
    m = mounter.mount(str(images), *INCLUSIVE, "--cache-dir", str(cache), "--cache-size", "64M")
    for name in data:
        read_all(os.path.join(m.mountpoint, name))
    deadline = time.monotonic() + 30
    while stats(m.mountpoint).queue:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    mounter.unmount(m)
    rng = random.Random(damage)
    mdb, slab = str(cache / "meta.lmdb" / "data.mdb"), str(cache / "pages.slab")
    if "truncate data.mdb" in damage:
        os.truncate(mdb, os.path.getsize(mdb) // 3)
    if "garble data.mdb" in damage:
        _garble(mdb, 40, rng)
    if "truncate the slab" in damage:
        os.truncate(slab, os.path.getsize(slab) // 2)
    if "garble the slab" in damage:
        _garble(slab, 40, rng)
    logs = []
    for _ in range(2):  # the first mount after the damage, and a warm one after it
        m = mounter.mount(str(images), *INCLUSIVE, "--cache-dir", str(cache), "--cache-size", "64M")
        for name, want in data.items():
            assert read_all(os.path.join(m.mountpoint, name)) == want
        s = stats(m.mountpoint)
        assert s.health is not None and s.health.state == "caching"
        mounter.unmount(m)
        logs.append(m.log_text())
    log = logs[0]
    assert "starting empty" not in logs[1]  # closed cleanly after the rebuild: kept
    if damage == "garble the slab only":
        assert "starting empty" not in log  # the index is intact: bad pages are misses, then admitted again
    else:
        assert "starting empty" in log


@pytest.mark.parametrize("layer", ["store.read", "store.apply", "admission", "peers.fetch", "writer"])
def test_a_fault_injected_at_each_layer_is_served_from_the_backing(mounter, tmp_path, monkeypatch, layer):
    monkeypatch.setenv("FUSECACHE_FAULTS", "")  # enables the test-only `faults` verb; no fault yet
    images = tmp_path / "images"
    images.mkdir()
    want = random_file(str(images / "a.img"), 4 * MiB, 1)
    peer = ("--peer", f"127.0.0.1:{free_port()}", "--peer-insecure", "--peer-timeout", "0.2") if layer == "peers.fetch" else ()
    m = mounter.mount(str(images), *INCLUSIVE, "--cache-dir", str(tmp_path / "cache"), *peer)
    path = os.path.join(m.mountpoint, "a.img")
    assert read_all(path) == want
    control.request(m.mountpoint, "faults", layers=[layer])
    with open(path, "r+b", buffering=0) as f:
        f.seek(MiB)
        f.write(b"written under a fault")
    want = want[:MiB] + b"written under a fault" + want[MiB + 21 :]
    with open(path, "rb", buffering=0) as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    for _ in range(3):
        assert read_all(path) == want
        time.sleep(0.3)  # let the writer try (and fail) its batches
    s = stats(m.mountpoint)
    assert s.health is not None and s.health.faults.get(layer, 0) > 0, s.health
    assert alive(m.pid)
    control.request(m.mountpoint, "faults", layers=[])
    assert read_all(path) == want


def test_repeated_store_faults_degrade_to_passthrough_shown_everywhere_and_recover_brings_it_back(mounter, tmp_path, monkeypatch):
    monkeypatch.setenv("FUSECACHE_FAULTS", "")
    images = tmp_path / "images"
    images.mkdir()
    want = random_file(str(images / "a.img"), 2 * MiB, 2)
    port = free_port()
    m = mounter.mount(str(images), *INCLUSIVE, "--cache-dir", str(tmp_path / "cache"), "--metrics", f"127.0.0.1:{port}")
    path = os.path.join(m.mountpoint, "a.img")
    assert read_all(path) == want
    control.request(m.mountpoint, "faults", layers=["store.read"])
    for _ in range(8):
        assert read_all(path) == want
    s = stats(m.mountpoint)
    assert s.health.state == "degraded" and "store faults" in s.health.reason
    text = run_fusecache("stats", m.mountpoint).stdout
    assert "cache DEGRADED" in text and "fusecache recover" in text
    top = run_fusecache("top", "--once", m.mountpoint).stdout
    assert "DEGRADED" in top
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        metrics = r.read().decode()
    assert 'fusecache_cache_state{state="degraded"} 1.0' in metrics, metrics
    assert 'fusecache_cache_faults_total{layer="store.read"}' in metrics
    control.request(m.mountpoint, "faults", layers=[])
    assert read_all(path) == want  # passthrough
    proc = run_fusecache("recover", m.mountpoint)
    assert proc.returncode == 0 and "rebuilt" in proc.stdout, proc.stderr
    s = stats(m.mountpoint)
    assert s.health.state == "caching" and s.health.rebuilds == 1 and s.store.chunks == 0
    assert read_all(path) == want
    assert read_all(path) == want
    assert stats(m.mountpoint).images["a.img"].hit_chunks > 0
