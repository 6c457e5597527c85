"""NfsBacking against a real nfs-ganesha (tests/harness/nfs_server.py), NFSv3 and NFSv4, no mocks.

Owns: every Backing method over nfs://, concurrency on one file, a server
that dies, hangs or restarts under the client, a second client's writes, and
the one-line errors of from_url.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

from fusecache.backing import OffLoop
from fusecache.backing.nfs import NfsBacking
from fusecache.errors import QuietError
from tests.harness.nfs_server import DENIED_EXPORT, NFS_PORT, DelayProxy, NfsServer, nfs_server  # noqa: F401  (nfs_server is a fixture)

pytestmark = [pytest.mark.nfs, pytest.mark.timeout(120)]

VERSIONS = [pytest.param(3, id="v3"), pytest.param(4, id="v4")]
# Short enough that the failure tests finish quickly, long enough for a loaded 2-core machine.
TIMEOUT = 3


@pytest.fixture(params=VERSIONS)
def version(request: pytest.FixtureRequest) -> int:
    return request.param


@pytest.fixture
def backing(nfs_server: NfsServer, version: int) -> Iterator[NfsBacking]:  # noqa: F811
    b = NfsBacking.from_url(f"{nfs_server.url(version)}&timeout={TIMEOUT}")
    yield b
    b.shutdown()


@pytest.fixture
def area(nfs_server: NfsServer, backing: NfsBacking, request: pytest.FixtureRequest) -> tuple[str, Path]:  # noqa: F811
    """A fresh directory per test: its path in the backing and on the host."""
    name = request.node.name.replace("[", "-").replace("]", "")
    host = nfs_server.export_dir / name
    host.mkdir()
    return name, host


def test_lstat_and_listdir(backing: NfsBacking, area: tuple[str, Path]) -> None:
    d, host = area
    (host / "b").write_bytes(b"12345")
    (host / "a").mkdir()
    assert backing.listdir(d) == ["a", "b"]
    a = backing.lstat(f"{d}/b")
    st = os.lstat(host / "b")
    assert (a.ino, a.size, a.mode, a.nlink, a.uid, a.gid) == (st.st_ino, 5, st.st_mode, 1, st.st_uid, st.st_gid)
    assert a.mtime_ns == st.st_mtime_ns
    assert stat.S_ISDIR(backing.lstat(f"{d}/a").mode)
    assert stat.S_ISDIR(backing.lstat("").mode)
    with pytest.raises(FileNotFoundError):
        backing.lstat(f"{d}/missing")
    with pytest.raises(FileNotFoundError):
        backing.listdir(f"{d}/missing")


def test_create_write_read_truncate_fsync(backing: NfsBacking, area: tuple[str, Path]) -> None:
    d, host = area
    fh = backing.create(f"{d}/f", os.O_RDWR | os.O_CREAT, 0o640)
    try:
        assert backing.pwrite(fh, b"hello world", 0) == 11
        assert backing.pwrite(fh, b"W", 6) == 1
        backing.fsync(fh, False)
        backing.fsync(fh, True)
        assert backing.pread(fh, 0, 100) == b"hello World"
        assert backing.pread(fh, 6, 3) == b"Wor"
        assert backing.pread(fh, 50, 10) == b""
        assert backing.fstat(fh).size == 11
        backing.ftruncate(fh, 5)
        assert backing.fstat(fh).size == 5
    finally:
        backing.close(fh)
    assert (host / "f").read_bytes() == b"hello"
    st = os.stat(host / "f")
    assert stat.S_IMODE(st.st_mode) == 0o640
    # Real times, not an NFSv4 exclusive-create verifier parked in them.
    assert abs(st.st_mtime - time.time()) < 3600 and abs(st.st_atime - time.time()) < 3600
    backing.truncate(f"{d}/f", 2)
    assert (host / "f").read_bytes() == b"he"
    with pytest.raises(FileExistsError):
        backing.create(f"{d}/f", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    fh = backing.create(f"{d}/f", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    backing.close(fh)
    assert (host / "f").read_bytes() == b""
    with pytest.raises(FileNotFoundError):
        backing.open(f"{d}/missing", os.O_RDONLY)


def test_large_read_crosses_pieces(backing: NfsBacking, area: tuple[str, Path]) -> None:
    d, host = area
    data = random.randbytes(3 * 1024 * 1024 + 4321)
    (host / "big").write_bytes(data)
    fh = backing.open(f"{d}/big", os.O_RDONLY)
    try:
        assert backing.pread(fh, 0, len(data) + 1000) == data
        assert backing.pread(fh, 1000, 1024 * 1024) == data[1000 : 1000 + 1024 * 1024]
        assert backing.pread(fh, len(data) - 10, 1024 * 1024) == data[-10:]
    finally:
        backing.close(fh)


def test_large_write(backing: NfsBacking, area: tuple[str, Path]) -> None:
    d, host = area
    data = random.randbytes(2 * 1024 * 1024 + 777)
    fh = backing.create(f"{d}/big", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        assert backing.pwrite(fh, data, 0) == len(data)
        assert backing.pwrite(fh, data[:5000], 10) == 5000
        backing.fsync(fh, False)
    finally:
        backing.close(fh)
    assert (host / "big").read_bytes() == data[:10] + data[:5000] + data[5010:]


def test_rename_unlink_mkdir_rmdir(backing: NfsBacking, area: tuple[str, Path]) -> None:
    d, host = area
    backing.mkdir(f"{d}/sub", 0o755)
    assert (host / "sub").is_dir()
    with pytest.raises(FileExistsError):
        backing.mkdir(f"{d}/sub", 0o755)
    (host / "sub" / "x").write_bytes(b"x")
    with pytest.raises(OSError) as e:
        backing.rmdir(f"{d}/sub")
    assert e.value.errno in (errno.ENOTEMPTY, errno.EEXIST)
    backing.rename(f"{d}/sub/x", f"{d}/y", 0)
    assert (host / "y").read_bytes() == b"x"
    (host / "z").write_bytes(b"z")
    with pytest.raises(FileExistsError):
        backing.rename(f"{d}/y", f"{d}/z", 1)  # RENAME_NOREPLACE
    backing.rename(f"{d}/y", f"{d}/z", 0)
    assert (host / "z").read_bytes() == b"x"
    backing.unlink(f"{d}/z")
    backing.rmdir(f"{d}/sub")
    assert backing.listdir(d) == []
    with pytest.raises(FileNotFoundError):
        backing.unlink(f"{d}/z")


def test_symlink_readlink_link(backing: NfsBacking, area: tuple[str, Path]) -> None:
    d, host = area
    (host / "t").write_bytes(b"target")
    backing.symlink("t", f"{d}/s")
    assert os.readlink(host / "s") == "t"
    assert backing.readlink(f"{d}/s") == "t"
    assert stat.S_ISLNK(backing.lstat(f"{d}/s").mode)
    backing.link(f"{d}/t", f"{d}/h")
    assert os.stat(host / "h").st_ino == os.stat(host / "t").st_ino
    assert backing.lstat(f"{d}/t").nlink == 2


def test_chmod_chown_utimens(backing: NfsBacking, area: tuple[str, Path]) -> None:
    d, host = area
    (host / "f").write_bytes(b"")
    backing.chmod(f"{d}/f", 0o100600)
    assert stat.S_IMODE(os.stat(host / "f").st_mode) == 0o600
    backing.chown(f"{d}/f", 1234, 5678)
    assert (os.stat(host / "f").st_uid, os.stat(host / "f").st_gid) == (1234, 5678)
    backing.utimens(f"{d}/f", 1_000_000_000_123_456_000, 2_000_000_000_654_321_000)
    st = os.stat(host / "f")
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_000_123_456_000, 2_000_000_000_654_321_000)
    backing.utimens(f"{d}/f", None, 3_000_000_000_000_000_000)
    st = os.stat(host / "f")
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_000_123_456_000, 3_000_000_000_000_000_000)
    assert backing.lstat(f"{d}/f").mtime_ns == 3_000_000_000_000_000_000


def test_setattr_on_open_file_then_open_more(backing: NfsBacking, area: tuple[str, Path]) -> None:
    """What the FUSE layer does on create (chown the new, open file), then more opens on the same connections."""
    d, host = area
    for i in range(4):
        fh = backing.create(f"{d}/f{i}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        backing.chown(f"{d}/f{i}", 0, 0)
        backing.chmod(f"{d}/f{i}", 0o600)
        backing.pwrite(fh, b"data", 0)
        backing.close(fh)
    assert backing.listdir(d) == ["f0", "f1", "f2", "f3"]
    assert all((host / f"f{i}").read_bytes() == b"data" for i in range(4))


def test_statfs_and_xattrs(backing: NfsBacking, area: tuple[str, Path]) -> None:
    d, _ = area
    s = backing.statfs()
    assert s.blocks > 0 and s.bsize > 0 and s.namemax > 0
    assert backing.listxattr(d) == []
    with pytest.raises(OSError) as e:
        backing.getxattr(d, "user.x")
    assert e.value.errno == errno.ENOTSUP


def test_unlinked_open_file_stays_readable(backing: NfsBacking, area: tuple[str, Path]) -> None:
    d, host = area
    (host / "f").write_bytes(b"still here")
    fh = backing.open(f"{d}/f", os.O_RDONLY)
    try:
        backing.unlink(f"{d}/f")
        assert "f" not in backing.listdir(d)
        assert backing.pread(fh, 0, 100) == b"still here"
        (host / "g").write_bytes(b"new")
        backing.rename(f"{d}/g", f"{d}/f", 0)  # over a name that is free again
    finally:
        backing.close(fh)
    assert os.listdir(host) == ["f"]  # the renamed-aside file went at the last close
    # Renaming over an open file keeps the open one readable too.
    fh = backing.open(f"{d}/f", os.O_RDONLY)
    try:
        (host / "h").write_bytes(b"replacement")
        backing.rename(f"{d}/h", f"{d}/f", 0)
        assert backing.pread(fh, 0, 100) == b"new"
    finally:
        backing.close(fh)
    assert os.listdir(host) == ["f"]
    assert (host / "f").read_bytes() == b"replacement"


def test_open_file_follows_rename(backing: NfsBacking, area: tuple[str, Path]) -> None:
    d, host = area
    (host / "dir").mkdir()
    (host / "dir" / "f").write_bytes(random.randbytes(2 * 1024 * 1024))
    fh = backing.open(f"{d}/dir/f", os.O_RDONLY)
    try:
        backing.rename(f"{d}/dir", f"{d}/moved", 0)
        # A large read lands on connections that never opened the file yet.
        assert backing.pread(fh, 0, 2 * 1024 * 1024) == (host / "moved" / "f").read_bytes()
    finally:
        backing.close(fh)


def test_many_threads_read_one_file(backing: NfsBacking, area: tuple[str, Path]) -> None:
    d, host = area
    data = random.randbytes(8 * 1024 * 1024)
    (host / "img").write_bytes(data)
    fh = backing.open(f"{d}/img", os.O_RDONLY)
    errors: list[BaseException] = []

    def reader(seed: int) -> None:
        rnd = random.Random(seed)
        try:
            for _ in range(40):
                size = rnd.choice([4096, 65536, 1024 * 1024, 1024 * 1024 + 17])
                off = rnd.randrange(0, len(data))
                got = backing.pread(fh, off, size)
                assert got == data[off : off + size], (off, size)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(16)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads)
        assert not errors, errors[0]
    finally:
        backing.close(fh)


def test_second_client_write_is_seen(nfs_server: NfsServer, backing: NfsBacking, version: int, area: tuple[str, Path]) -> None:  # noqa: F811
    d, host = area
    (host / "f").write_bytes(b"a" * 1000)
    fh = backing.open(f"{d}/f", os.O_RDONLY)
    before = backing.fstat(fh)
    other = NfsBacking.from_url(nfs_server.url(version))
    try:
        ofh = other.open(f"{d}/f", os.O_RDWR)
        other.pwrite(ofh, b"b" * 3000, 500)
        other.fsync(ofh, False)
        other.close(ofh)
        after = backing.fstat(fh)
        assert after.version != before.version
        assert after.size == 3500 == backing.lstat(f"{d}/f").size
        assert backing.pread(fh, 0, 4000) == b"a" * 500 + b"b" * 3000
    finally:
        backing.close(fh)
        other.shutdown()


def test_two_writes_in_one_tick_are_two_versions(nfs_server: NfsServer, backing: NfsBacking, version: int, area: tuple[str, Path]) -> None:  # noqa: F811
    """Another client writes the same bytes' worth twice, back to back (well within one 4 ms
    timestamp tick of the server's clock); we look between the writes and after. On v4 the change
    attribute (read with our own GETATTR) tells them apart. On v3 only the times can: whether they
    do depends on the server's kernel and filesystem (README, "Versions on NFS"), so v3 is counted
    and printed, not asserted."""
    d, host = area
    (host / "f").write_bytes(b"a" * 8192)
    fh = backing.open(f"{d}/f", os.O_RDONLY)
    other = NfsBacking.from_url(nfs_server.url(version))
    try:
        ofh = other.open(f"{d}/f", os.O_RDWR)
        alike = 0
        for i in range(50):
            other.pwrite(ofh, bytes([i]) * 4096, 0)
            first = backing.fstat(fh)
            other.pwrite(ofh, bytes([i + 100]) * 4096, 0)
            second = backing.fstat(fh)
            alike += first.version == second.version
            assert first.size == second.size == 8192
            if version == 4:
                assert first.change != 0 and second.change != first.change, (first, second)
                st = os.stat(host / "f")
                # ganesha's VFS change attribute is max(mtime, ctime) in ns; our GETATTR reads it and the times together
                assert second.change == max(second.mtime_ns, second.ctime_ns) == max(st.st_mtime_ns, st.st_ctime_ns)
            else:
                assert first.change == second.change == 0  # NFSv3 has none: versions rest on size and times
        print(f"\nNFSv{version}: {alike} of 50 pairs of back-to-back writes looked like one version")
        if version == 4:
            assert alike == 0
        other.close(ofh)
    finally:
        backing.close(fh)
        other.shutdown()


def test_lstat_carries_no_change_attribute(backing: NfsBacking, area: tuple[str, Path]) -> None:
    d, host = area
    (host / "f").write_bytes(b"x")
    assert backing.lstat(f"{d}/f").change == 0  # versions come from open files only (fstat)


def _busy(backing: NfsBacking, path: str, n: int, stop: threading.Event) -> tuple[list[threading.Thread], list[BaseException]]:
    """n threads reading `path` and one writing 1 MiB blocks to it, until a call fails; each records its error."""
    errors: list[BaseException] = []
    fh = backing.open(path, os.O_RDWR)

    def read() -> None:
        while not stop.is_set():
            backing.pread(fh, random.randrange(0, 4 * 1024 * 1024), random.choice([4096, 1024 * 1024]))

    def write() -> None:
        block = random.randbytes(1024 * 1024)
        while not stop.is_set():
            backing.pwrite(fh, block, 4 * 1024 * 1024)

    def run(work: Callable[[], None]) -> None:
        try:
            work()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(work,)) for work in [read] * n + [write]]
    for t in threads:
        t.start()
    return threads, errors


def test_reads_are_made_from_the_loop_without_a_thread(
    backing: NfsBacking, area: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read of a file open on a free connection is made from the trio loop (`pread_on_loop`): right bytes, no
    worker thread, its request sent at once (no wait for a socket with room to say so); many at once share the
    connections, and those that find none free go to a thread."""
    d, host = area
    data = random.randbytes(1024 * 1024 + 1000)
    (host / "img").write_bytes(data)
    off = OffLoop(backing)
    fh = backing.open(f"{d}/img", os.O_RDONLY)
    spans = [(0, 4096), (4096 * 7, 65536), (len(data) - 1000, 4096), (len(data), 4096), (12345, 256 * 1024)]
    writable_waits = []
    wait_writable = trio.lowlevel.wait_writable

    async def counted(fd: int) -> None:
        writable_waits.append(fd)
        await wait_writable(fd)

    monkeypatch.setattr(trio.lowlevel, "wait_writable", counted)

    async def main() -> None:
        for offset, size in spans:
            assert await off.pread(fh, offset, size) == data[offset : offset + size]
        assert off._threads == 0  # not one worker thread started
        assert not writable_waits, "a lone read waited for its idle socket to be writable before sending"
        got: dict[int, bytes] = {}

        async def one(i: int) -> None:
            got[i] = await off.pread(fh, i * 4096, 4096)

        async with trio.open_nursery() as nursery:
            for i in range(32):
                nursery.start_soon(one, i)
        assert all(got[i] == data[i * 4096 : (i + 1) * 4096] for i in range(32))

    try:
        trio.run(main)
        assert off.inline_reads >= len(spans) - 1  # (the read at the end of the file gets no bytes: any path)
    finally:
        backing.close(fh)


@pytest.mark.parametrize("ver", VERSIONS)
def test_a_read_from_the_loop_when_the_server_dies_is_the_threads_error(tmp_path: Path, ver: int, expect_log: Callable[..., None]) -> None:
    """The loop's read gives up (its connection marked broken), the thread's read reports EIO as before, and
    reads from the loop resume once the server is back."""
    expect_log("not responding", "is back")
    data = random.randbytes(256 * 1024)
    with NfsServer(tmp_path) as server:
        (server.export_dir / "img").write_bytes(data)
        backing = NfsBacking.from_url(f"{server.url(ver)}&timeout={TIMEOUT}")
        off = OffLoop(backing)
        try:
            fh = backing.open("img", os.O_RDONLY)
            assert trio.run(off.pread, fh, 4096, 4096) == data[4096:8192]
            assert off.inline_reads == 1
            server.kill()
            with pytest.raises(OSError) as failed:
                trio.run(off.pread, fh, 8192, 4096)
            assert failed.value.errno == errno.EIO
            server.start()
            for _ in range(3):
                try:
                    got = trio.run(off.pread, fh, 0, 65536)
                    break
                except OSError as e:
                    assert e.errno == errno.EIO  # the first read after a restart may meet the old connection
            assert got == data[:65536]
            before = off.inline_reads
            assert trio.run(off.pread, fh, 65536, 4096) == data[65536 : 65536 + 4096]
            assert off.inline_reads == before + 1
            backing.close(fh)
        finally:
            backing.shutdown()


def _stop_every_thread(pid: int) -> None:
    """SIGSTOP `pid` and wait until each of its threads is stopped: kill() returns before they all are, and a
    thread that had not stopped yet could still answer the next request."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 10
    while True:
        states = []
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                states.append((task / "stat").read_text().rsplit(")", 1)[1].split()[0])
            except (OSError, IndexError):
                continue  # a thread that ended meanwhile
        if all(s in "Tt" for s in states):
            return
        assert time.monotonic() < deadline, f"ganesha's threads did not all stop: {states}"
        time.sleep(0.01)


def test_a_read_from_the_loop_of_a_silent_server_is_eio_without_a_second_try(tmp_path: Path, expect_log: Callable[..., None]) -> None:
    """A server that stops answering: the loop's read gives EIO after its timeout and logs the server down, as a
    thread's read would, rather than handing the read to a thread to wait a second timeout."""
    expect_log("not responding")
    with NfsServer(tmp_path) as server:
        data = random.randbytes(65536)
        (server.export_dir / "img").write_bytes(data)
        backing = NfsBacking.from_url(f"{server.url(3)}&timeout={TIMEOUT}")
        off = OffLoop(backing)
        try:
            fh = backing.open("img", os.O_RDONLY)
            assert trio.run(off.pread, fh, 0, 4096) == data[:4096]
            assert server.ganesha is not None
            _stop_every_thread(server.ganesha.pid)
            try:
                with pytest.raises(OSError) as failed:
                    got = trio.run(off.pread, fh, 4096, 4096)
                    pytest.fail(f"a stopped server's read answered {len(got)} bytes, the file's: {got == data[4096:8192]}")
            finally:
                os.kill(server.ganesha.pid, signal.SIGCONT)
            assert failed.value.errno == errno.EIO
            assert off._threads == 0  # no second try in a thread
        finally:
            backing.shutdown()


@pytest.mark.parametrize("failure", ["killed", "hung"])
@pytest.mark.parametrize("ver", VERSIONS)
def test_server_failure_gives_eio_then_recovers(
    tmp_path: Path, ver: int, failure: str, caplog: pytest.LogCaptureFixture, expect_log: Callable[..., None]
) -> None:
    expect_log("not responding", "is back")
    with NfsServer(tmp_path) as server:
        (server.export_dir / "img").write_bytes(random.randbytes(4 * 1024 * 1024))
        backing = NfsBacking.from_url(f"{server.url(ver)}&timeout={TIMEOUT}")
        stop = threading.Event()
        try:
            threads, errors = _busy(backing, "img", 4, stop)
            assert server.ganesha is not None
            if failure == "killed":
                server.kill()
            else:  # alive but silent: only the timeout can end the calls
                _stop_every_thread(server.ganesha.pid)
            for t in threads:
                # No hang: each thread ends with an error after at most a couple of timeouts.
                t.join(10 * TIMEOUT)
            assert not any(t.is_alive() for t in threads)
            assert len(errors) == len(threads)
            assert all(isinstance(e, OSError) and e.errno == errno.EIO for e in errors), errors
            down = [r for r in caplog.records if "not responding" in r.getMessage()]
            assert len(down) == 1 and "127.0.0.1" in down[0].getMessage()
            if failure == "hung":
                os.kill(server.ganesha.pid, signal.SIGCONT)
                server.stop()
            server.start()
            # Calls resume on the same backing, handles included, with no remount by the caller.
            fh = backing.open("img", os.O_RDONLY)
            for _ in range(3):
                try:
                    data = backing.pread(fh, 0, 1024 * 1024)
                    break
                except OSError as e:
                    # The first call after a restart may still meet the old connection.
                    assert e.errno == errno.EIO
            assert data == (server.export_dir / "img").read_bytes()[: 1024 * 1024]
            backing.close(fh)
            assert any("is back" in r.getMessage() for r in caplog.records)
        finally:
            stop.set()
            backing.shutdown()


@pytest.mark.parametrize("ver", VERSIONS)
def test_calls_in_flight_when_the_server_dies(tmp_path: Path, ver: int) -> None:
    """A connection that fails under a call can leave the call's request queued in libnfs.
    With libnfs's blocking calls that request pointed into the call's finished C
    stack frame, and freeing the connection (a remount, or shutdown) wrote there:
    CI crashed on it once. The process (tests/harness/nfs_inflight.py) gives its
    readers stacks that are unmapped when they end, so such a write is a crash;
    it must exit cleanly and read the right bytes after the restart. Until a
    connection was freed with a request still queued, the hazard was not made:
    it is tried again."""
    data = random.randbytes(8 * 1024 * 1024)
    with NfsServer(tmp_path) as server:
        (server.export_dir / "img").write_bytes(data)
        for _ in range(5):
            proc = subprocess.Popen(
                [sys.executable, "-m", "tests.harness.nfs_inflight", f"{server.url(ver)}&timeout={TIMEOUT}", "img", str(len(data))],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent,
            )  # fmt: skip
            try:
                assert proc.stdin is not None and proc.stdout is not None
                assert proc.stdout.readline() == "reading\n"
                time.sleep(0.2)
                server.kill()
                proc.stdin.write("\n")
                proc.stdin.flush()
                assert proc.stdout.readline() == "failed EIO\n"
                server.start()
                out, _ = proc.communicate("\n", timeout=60)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                if server.ganesha is None:
                    server.start()
            assert proc.returncode == 0, f"the process died (exit {proc.returncode}; -11 is SIGSEGV) after: {out!r}"
            lines = dict(line.split(" ", 1) for line in out.splitlines())
            assert lines["read"] == hashlib.sha256(data).hexdigest()
            if int(lines["cancelled"]) > 0:
                break
        else:
            pytest.fail("in 5 tries no connection was freed with a request still queued: the hazard was never made")


@pytest.mark.parametrize(
    "url",
    [
        "nfs:/127.0.0.1/export",
        "nfs://",
        "nfs://127.0.0.1",
        "nfs://127.0.0.1/",
        "http://127.0.0.1/export",
        "nfs://127.0.0.1:notaport/export",
        "nfs://127.0.0.1/export?version=5",
        "nfs://127.0.0.1/export?colour=blue",
        "nfs://127.0.0.1/export?timeout=soon",
    ],
)
def test_bad_url(url: str) -> None:
    with pytest.raises(QuietError) as e:
        NfsBacking.from_url(url)
    assert "\n" not in str(e.value) and "nfs://" in str(e.value)


def test_unknown_export(nfs_server: NfsServer, version: int) -> None:  # noqa: F811
    with pytest.raises(QuietError) as e:
        NfsBacking.from_url(nfs_server.url(version, "/no-such-export"))
    assert "\n" not in str(e.value) and "/no-such-export" in str(e.value)


def test_subdirectory_of_export(nfs_server: NfsServer, version: int) -> None:  # noqa: F811
    sub = nfs_server.export_dir / f"images-v{version}"
    sub.mkdir(exist_ok=True)
    (sub / "vm.img").write_bytes(b"disk")
    b = NfsBacking.from_url(nfs_server.url(version, f"/export/images-v{version}"))
    try:
        assert b.listdir("") == ["vm.img"]
        assert b.lstat("vm.img").size == 4
    finally:
        b.shutdown()


def test_permission_denied(nfs_server: NfsServer, version: int) -> None:  # noqa: F811
    with pytest.raises(QuietError) as e:
        NfsBacking.from_url(nfs_server.url(version, DENIED_EXPORT))
    assert "\n" not in str(e.value) and DENIED_EXPORT in str(e.value)


@pytest.mark.parametrize("ver", VERSIONS)
def test_unreachable_server(ver: int) -> None:
    # Port 1 on the host's loopback: nothing listens there, the connection is refused.
    url = "nfs://127.0.0.1:1/export?version=4" if ver == 4 else "nfs://127.0.0.1:1/export?version=3&mountport=1"
    with pytest.raises(QuietError) as e:
        NfsBacking.from_url(url + "&timeout=2")
    assert "\n" not in str(e.value) and "127.0.0.1:1" in str(e.value) and "not reachable" in str(e.value)


def test_through_delay_proxy(nfs_server: NfsServer, area: tuple[str, Path]) -> None:  # noqa: F811
    """NFSv4 over the delay proxy (tests/harness/delay_proxy.py): many connections, bytes intact and in order."""
    d, host = area
    data = random.randbytes(4 * 1024 * 1024 + 99)
    (host / "img").write_bytes(data)
    with DelayProxy([NFS_PORT], delay_ms=1, netns=nfs_server.netns) as proxy:
        b = NfsBacking.from_url(f"nfs://127.0.0.1:{proxy.ports[NFS_PORT]}/export?version=4")
        try:
            fh = b.open(f"{d}/img", os.O_RDONLY)
            assert b.pread(fh, 0, len(data)) == data
            assert b.pread(fh, 12345, 4096) == data[12345 : 12345 + 4096]
            b.close(fh)
        finally:
            b.shutdown()


def test_handles_of_one_file_share_a_connection(nfs_server: NfsServer, version: int, area: tuple[str, Path]) -> None:  # noqa: F811
    """Two handles of one file, read-only then read-write, on a single connection; the connection stays usable."""
    d, host = area
    (host / "f").write_bytes(b"0123456789")
    (host / "g").write_bytes(b"g")
    b = NfsBacking.from_url(f"{nfs_server.url(version)}&connections=1")
    try:
        ro = b.open(f"{d}/f", os.O_RDONLY)
        rw = b.open(f"{d}/f", os.O_RDWR)
        assert b.pwrite(rw, b"AB", 0) == 2
        assert b.pread(ro, 0, 4) == b"AB23"
        b.close(ro)
        assert b.pwrite(rw, b"C", 2) == 1
        assert b.pread(rw, 0, 4) == b"ABC3"
        b.close(rw)
        g = b.open(f"{d}/g", os.O_RDONLY)
        assert b.pread(g, 0, 1) == b"g"
        b.close(g)
    finally:
        b.shutdown()
    assert (host / "f").read_bytes() == b"ABC3456789"


def test_failed_opens_leave_connection_usable(nfs_server: NfsServer, version: int, area: tuple[str, Path]) -> None:  # noqa: F811
    """Failed OPENs on a connection that holds a file open (NFSv4 sequence ids must stay in step)."""
    d, host = area
    (host / "f").write_bytes(b"ffff")
    (host / "g").write_bytes(b"gggg")
    b = NfsBacking.from_url(f"{nfs_server.url(version)}&connections=1")
    try:
        f = b.open(f"{d}/f", os.O_RDONLY)
        with pytest.raises(FileExistsError):
            b.create(f"{d}/g", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        g = b.create(f"{d}/g", os.O_RDWR | os.O_CREAT, 0o644)  # exists: opened, not created
        assert b.pread(g, 0, 10) == b"gggg"
        with pytest.raises(FileNotFoundError):
            b.open(f"{d}/missing", os.O_RDONLY)
        assert b.pread(f, 0, 10) == b"ffff"
        b.close(g)
        b.close(f)
        h = b.open(f"{d}/g", os.O_RDONLY)
        assert b.pread(h, 0, 10) == b"gggg"
        b.close(h)
    finally:
        b.shutdown()
