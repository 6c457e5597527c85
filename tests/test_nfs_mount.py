"""fusecache over nfs:// on a real mount: a server that dies and comes back, another host writing, bad URLs.

The cache suite itself (tests/test_cache.py) already runs over NFSv3 and
NFSv4 through the `images` fixture; this file holds what only NFS has.
"""

from __future__ import annotations

import mmap
import os
import random
import threading
import time

import pytest

from tests.mounting import is_mounted, run_fusecache, stats

pytestmark = [pytest.mark.mount, pytest.mark.nfs]
MiB = 1 << 20


def with_timeout(url: str, seconds: int) -> str:
    return url + ("&" if "?" in url else "?") + f"timeout={seconds}"


@pytest.fixture
def export(nfs_server, request):
    name = request.node.name.replace("[", "-").replace("]", "")
    d = os.path.join(str(nfs_server.export_dir), name)
    os.makedirs(d)
    return d, name


def url_of(nfs_server, version: int, name: str) -> str:
    path, _, query = nfs_server.url(version).partition("?")
    return f"{path.rstrip('/')}/{name}?{query}"


@pytest.mark.parametrize("version", [3, 4])
def test_dead_server_is_eio_not_a_hang_and_reads_resume(mounter, nfs_server, export, tmp_path, expect_log, version):
    expect_log("nfs", "Input/output error", "EIO", "timed out", "unreachable", "server")
    d, name = export
    data = os.urandom(16 * MiB)  # room past the mount's readahead (a few MiB): the read at 12 MiB must reach the server
    with open(os.path.join(d, "vm.img"), "wb") as f:
        f.write(data)
    m = mounter.mount(with_timeout(url_of(nfs_server, version, name), 2), "--admit", "inclusive",
                      "--cache-dir", str(tmp_path / "cache"))
    p = os.path.join(m.mountpoint, "vm.img")
    fd = os.open(p, os.O_RDONLY)
    try:
        assert os.pread(fd, MiB, 0) == data[:MiB]  # the first MiB is now cached
        time.sleep(0.5)
        nfs_server.kill()
        try:
            assert os.pread(fd, MiB, 0) == data[:MiB], "a cached block is served while the server is down"
            result: list[object] = []
            reader = threading.Thread(target=lambda: result.append(_pread(fd, MiB, 12 * MiB)), daemon=True)
            reader.start()
            reader.join(timeout=60)
            assert not reader.is_alive(), "a read with the server down must fail, not hang"
            assert isinstance(result[0], OSError) and result[0].errno == 5, result
            assert is_mounted(m.mountpoint)  # the mount stays (a stat of its root would ask the dead server)
            os.kill(m.pid, 0)  # and its daemon lives
        finally:
            nfs_server.start()
        deadline = time.monotonic() + 60
        while True:  # the server is back: reads resume without a remount
            got = _pread(fd, MiB, 12 * MiB)
            if got == data[12 * MiB : 13 * MiB]:
                break
            assert time.monotonic() < deadline, f"reads did not resume: {got!r}"[:200]
            time.sleep(0.5)
    finally:
        os.close(fd)
    assert "server" in m.log_text() or "nfs" in m.log_text().lower()


@pytest.mark.parametrize("version", [3, 4])
def test_cold_reads_are_answered_from_the_loop(mounter, nfs_server, export, tmp_path, version):
    """A guest's cold reads (O_DIRECT, as QEMU's cache=none) of an open image are sent to the server from the
    daemon's event loop, no thread hand-off (`NfsBacking.pread_on_loop`), and come back right."""
    d, name = export
    data = os.urandom(8 * MiB)
    with open(os.path.join(d, "vm.img"), "wb") as f:
        f.write(data)
    m = mounter.mount(url_of(nfs_server, version, name), "--admit", "inclusive", "--cache-dir", str(tmp_path / "cache"))
    fd = os.open(os.path.join(m.mountpoint, "vm.img"), os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, 4096)  # (page-aligned, as O_DIRECT wants)
    try:
        for page in random.Random(7).sample(range(8 * MiB // 4096), 64):
            assert os.preadv(fd, [buf], page * 4096) == 4096
            assert buf[:] == data[page * 4096 : (page + 1) * 4096]
    finally:
        os.close(fd)
    fetch = stats(m.mountpoint).fetch
    assert fetch is not None and fetch.critical_reads >= 64
    assert fetch.loop_reads >= fetch.critical_reads // 2  # (a read that finds no free connection goes to a thread)


def _pread(fd: int, n: int, off: int) -> bytes | OSError:
    try:
        return os.pread(fd, n, off)
    except OSError as exc:
        return exc


def test_another_host_writing_through_fusecache_is_seen_at_next_open(mounter, nfs_server, export, tmp_path):
    d, name = export
    with open(os.path.join(d, "shared.img"), "wb") as f:
        f.write(b"a" * 2 * MiB)
    url = url_of(nfs_server, 3, name)
    host1 = mounter.mount(url, "--admit", "inclusive", "--cache-dir", str(tmp_path / "c1"))
    host2 = mounter.mount(url, "--admit", "inclusive", "--cache-dir", str(tmp_path / "c2"))
    with open(os.path.join(host1.mountpoint, "shared.img"), "rb") as f:
        assert f.read() == b"a" * 2 * MiB  # host1 caches it
    time.sleep(0.5)
    with open(os.path.join(host2.mountpoint, "shared.img"), "r+b") as f:
        f.write(b"b" * MiB)  # host2 writes through its own fusecache, to NFS
    with open(os.path.join(host1.mountpoint, "shared.img"), "rb") as f:
        assert f.read() == b"b" * MiB + b"a" * MiB


@pytest.mark.parametrize(
    "url, needle",
    [
        ("nfs://", "URL"),
        ("nfs://127.0.0.1:1/export", "127.0.0.1"),
        ("nfs://127.0.0.1:2049/x?version=7", "version"),
    ],
)
def test_bad_nfs_urls_are_one_line(tmp_path, url, needle):
    mp = tmp_path / "m"
    mp.mkdir()
    proc = run_fusecache("mount", with_timeout(url, 2) if "version=7" not in url else url, str(mp), timeout=120)
    assert proc.returncode != 0 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert needle in proc.stderr
    assert not is_mounted(str(mp))


def test_unknown_export_is_one_line(nfs_server, tmp_path):
    mp = tmp_path / "m"
    mp.mkdir()
    path, _, query = nfs_server.url(3).partition("?")
    url = path.rsplit("/", 1)[0] + "/no-such-export?" + query
    proc = run_fusecache("mount", url, str(mp), timeout=120)
    assert proc.returncode != 0 and proc.stderr.count("\n") == 1, proc.stderr
    assert "export" in proc.stderr
    assert not is_mounted(str(mp))
