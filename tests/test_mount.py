"""The real `fusecache mount` as a subprocess: every operation, O_DIRECT, fio --verify, bad input."""

from __future__ import annotations

import errno
import hashlib
import json
import mmap
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time

import pytest

from fusecache.daemon import process_running
from tests.mounting import is_mounted, run_fusecache, stats

pytestmark = pytest.mark.mount


def sha(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@pytest.fixture
def backing(tmp_path):
    d = tmp_path / "images"
    d.mkdir()
    return d


def test_metadata_operations(mounter, backing):
    m = mounter.mount(str(backing))
    mp = m.mountpoint
    p = os.path.join(mp, "disk.img")
    with open(p, "wb") as f:
        f.write(b"x" * 10000)
    assert (backing / "disk.img").stat().st_size == 10000
    os.truncate(p, 4096)
    assert os.stat(p).st_size == 4096 == (backing / "disk.img").stat().st_size
    os.chmod(p, 0o600)
    assert stat.S_IMODE((backing / "disk.img").stat().st_mode) == 0o600
    os.chown(p, 107, 114)
    assert (os.stat(p).st_uid, os.stat(p).st_gid) == (107, 114)
    os.utime(p, ns=(1_000_000_000, 2_000_000_000))
    assert os.stat(p).st_mtime_ns == 2_000_000_000 == (backing / "disk.img").stat().st_mtime_ns
    os.mkdir(os.path.join(mp, "pool"))
    os.rename(p, os.path.join(mp, "pool", "vm1.img"))
    assert sorted(os.listdir(mp)) == ["pool"]
    assert os.listdir(os.path.join(mp, "pool")) == ["vm1.img"]
    os.symlink("pool/vm1.img", os.path.join(mp, "current"))
    assert os.readlink(os.path.join(mp, "current")) == "pool/vm1.img"
    assert os.path.getsize(os.path.join(mp, "current")) == 4096
    os.link(os.path.join(mp, "pool", "vm1.img"), os.path.join(mp, "hard"))
    assert os.stat(os.path.join(mp, "hard")).st_nlink == 2
    assert os.stat(os.path.join(mp, "hard")).st_ino == os.stat(os.path.join(mp, "pool", "vm1.img")).st_ino
    os.setxattr(os.path.join(mp, "hard"), "user.libvirt.label", b"svirt_image_t:s0:c1,c2")
    assert os.getxattr(os.path.join(backing, "hard"), "user.libvirt.label") == b"svirt_image_t:s0:c1,c2"
    assert "user.libvirt.label" in os.listxattr(os.path.join(mp, "hard"))
    os.removexattr(os.path.join(mp, "hard"), "user.libvirt.label")
    with pytest.raises(OSError) as e:
        os.getxattr(os.path.join(mp, "hard"), "user.libvirt.label")
    assert e.value.errno == errno.ENODATA
    st = os.statvfs(mp)
    assert st.f_blocks == os.statvfs(backing).f_blocks
    os.unlink(os.path.join(mp, "hard"))
    os.unlink(os.path.join(mp, "current"))
    with open(os.path.join(mp, "pool", "new"), "wb") as f:
        f.write(b"new")
    os.replace(os.path.join(mp, "pool", "new"), os.path.join(mp, "pool", "vm1.img"))  # replace by rename
    with open(os.path.join(mp, "pool", "vm1.img"), "rb") as f:
        assert f.read() == b"new"
    with pytest.raises(OSError) as e:
        os.rmdir(os.path.join(mp, "pool"))
    assert e.value.errno == errno.ENOTEMPTY
    os.unlink(os.path.join(mp, "pool", "vm1.img"))
    os.rmdir(os.path.join(mp, "pool"))
    assert os.listdir(mp) == [] == os.listdir(backing)
    with pytest.raises(FileNotFoundError):
        os.stat(os.path.join(mp, "nope"))


def test_inode_numbers_are_stable(mounter, backing):
    (backing / "a.img").write_bytes(b"a")
    m = mounter.mount(str(backing))
    p = os.path.join(m.mountpoint, "a.img")
    first = os.stat(p).st_ino
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2\n")  # the kernel forgets the inode; fusecache sees forget()
    assert os.stat(p).st_ino == first == (backing / "a.img").stat().st_ino
    os.rename(p, os.path.join(m.mountpoint, "b.img"))
    assert os.stat(os.path.join(m.mountpoint, "b.img")).st_ino == first


def test_unlinked_open_file_works_until_closed(mounter, backing):
    m = mounter.mount(str(backing))
    p = os.path.join(m.mountpoint, "tmp.img")
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, b"before", 0)
        os.unlink(p)
        assert not os.path.exists(p)
        os.pwrite(fd, b" after", 6)
        assert os.pread(fd, 100, 0) == b"before after"
        assert os.fstat(fd).st_size == 12
    finally:
        os.close(fd)


def test_o_direct_aligned_reads_and_writes(mounter, backing):
    m = mounter.mount(str(backing))
    p = os.path.join(m.mountpoint, "direct.img")
    buf = mmap.mmap(-1, 1 << 20)  # page-aligned, as O_DIRECT needs
    pattern = os.urandom(1 << 20)
    buf.write(pattern)
    fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o644)
    try:
        assert os.pwritev(fd, [buf], 4096) == 1 << 20
        out = mmap.mmap(-1, 1 << 20)
        assert os.preadv(fd, [out], 4096) == 1 << 20
        assert bytes(out) == pattern
        small = mmap.mmap(-1, 4096)
        assert os.preadv(fd, [small], 4096 + 65536) == 4096
        assert bytes(small) == pattern[65536 : 65536 + 4096]
    finally:
        os.close(fd)
    with open(backing / "direct.img", "rb") as f:
        f.seek(4096)
        assert f.read() == pattern


def test_two_processes_share_one_file(mounter, backing):
    m = mounter.mount(str(backing))
    p = os.path.join(m.mountpoint, "shared.img")
    with open(p, "wb") as f:
        f.truncate(1 << 20)
    writer = (
        "import os,sys\n"
        "fd=os.open(sys.argv[1],os.O_RDWR)\n"
        "for i in range(256): os.pwrite(fd, bytes([i])*4096, i*4096)\n"
        "os.fsync(fd)\n"
    )
    subprocess.run([sys.executable, "-c", writer, p], check=True, timeout=60)
    reader = (
        "import os,sys\n"
        "fd=os.open(sys.argv[1],os.O_RDONLY|os.O_DIRECT)\n"
        "import mmap\n"
        "b=mmap.mmap(-1,4096)\n"
        "bad=[i for i in range(256) if os.preadv(fd,[b],i*4096)!=4096 or bytes(b)!=bytes([i])*4096]\n"
        "print(len(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", reader, p], check=True, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "0"


def test_fio_verify_through_the_mount(mounter, backing):
    m = mounter.mount(str(backing))
    cmd = [
        "fio", "--name=verify", f"--directory={m.mountpoint}", "--filename=disk.img", "--size=96M",
        "--rw=randwrite", "--bs=4k,64k", "--bsrange=4k-256k", "--direct=1", "--ioengine=psync", "--numjobs=3",
        "--offset_increment=32M", "--size=32M", "--verify=crc32c", "--do_verify=1", "--verify_fatal=1",
        "--output-format=terse", "--verify_state_save=0",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (backing / "disk.img").stat().st_size == 96 << 20
    assert sha(os.path.join(m.mountpoint, "disk.img")) == sha(str(backing / "disk.img"))


def test_queued_o_direct_reads_ask_the_kernel_for_no_attributes(mounter, backing):
    """A guest's cache=none disk: O_DIRECT reads, 16 in flight (QEMU aio=native), well past --attr-timeout. An
    O_DIRECT open is served with FUSE direct I/O, whose reads ask for no attributes. Served as cached I/O, the
    kernel asked for the image's attributes before nearly every read once they had timed out (a GETATTR, a
    backing stat, the read waiting for it): warm reads at queue depth 16 took 2.5x as long (bench/qemu_bench.py
    --count 40000). A buffered open keeps the page cache. (The bytes of O_DIRECT reads and writes, now direct
    I/O, are checked by test_fio_verify_through_the_mount.)"""
    m = mounter.mount(str(backing), "--attr-timeout", "0.1")
    path = os.path.join(m.mountpoint, "guest.img")
    with open(path, "wb") as f:
        f.write(os.urandom(16 << 20))
    before = stats(m.mountpoint).attrs
    read = ["fio", "--name=guest", f"--filename={path}", "--size=16M", "--rw=read", "--bs=64k", "--direct=1",
            "--ioengine=libaio", "--iodepth=16", "--time_based", "--runtime=1.5", "--output-format=json"]  # fmt: skip
    proc = subprocess.run(read, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr
    reads = json.loads(proc.stdout)["jobs"][0]["read"]["total_ios"]
    after = stats(m.mountpoint).attrs
    assert reads >= 1000, f"only {reads} reads in 1.5 s: too few to tell"
    asked = after.getattrs - before.getattrs
    assert asked <= 20, f"the kernel asked for the image's attributes {asked} times during {reads} O_DIRECT reads"
    assert after.direct_io_opens > before.direct_io_opens
    with open(path, "rb") as f:  # a buffered open: the page cache as before (no direct I/O)
        f.read(4096)
    assert stats(m.mountpoint).attrs.direct_io_opens == after.direct_io_opens


def test_permissions_are_honoured(mounter, backing):
    (backing / "secret.img").write_bytes(b"tenant data")
    os.chmod(backing / "secret.img", 0o600)
    (backing / "public.img").write_bytes(b"public")
    os.chmod(backing / "public.img", 0o644)
    os.chmod(backing, 0o755)
    mp = tempfile.mkdtemp(prefix="fusecache-perm-")  # pytest's tmp dirs are 0700: nobody could not reach it
    os.chmod(mp, 0o755)
    try:
        _check_permissions(mounter.mount(str(backing), "--allow-other", mountpoint=mp), backing)
    finally:
        mounter.cleanup()
        os.rmdir(mp)


def _check_permissions(m, backing):
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    denied = subprocess.run([*as_nobody, "cat", os.path.join(m.mountpoint, "secret.img")], capture_output=True, text=True)
    assert denied.returncode != 0 and "Permission denied" in denied.stderr
    allowed = subprocess.run([*as_nobody, "cat", os.path.join(m.mountpoint, "public.img")], capture_output=True, text=True)
    assert allowed.stdout == "public"
    w = subprocess.run([*as_nobody, "touch", os.path.join(m.mountpoint, "x")], capture_output=True, text=True)
    assert w.returncode != 0 and not (backing / "x").exists()
    # the daemon runs as root: what a user creates through the mount is that user's, on the backing too
    os.mkdir(backing / "drop")
    os.chmod(backing / "drop", 0o777)
    for make in (["touch", "f"], ["mkdir", "d"]):
        made = subprocess.run([*as_nobody, make[0], os.path.join(m.mountpoint, "drop", make[1])], capture_output=True, text=True)
        assert made.returncode == 0, made.stderr
        st = (backing / "drop" / make[1]).stat()
        assert (st.st_uid, st.st_gid) == (65534, 65534), f"{make[1]} belongs to {st.st_uid}:{st.st_gid}, not its creator"


def test_enospc_from_the_backing_reaches_the_writer(mounter, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(small)], check=True)
    try:
        m = mounter.mount(str(small))
        with pytest.raises(OSError) as e, open(os.path.join(m.mountpoint, "big.img"), "wb") as f:
            for _ in range(64):
                f.write(b"\0" * 65536)
                f.flush()
        assert e.value.errno == errno.ENOSPC
        assert "big.img: No space left on device" in m.log_text()
        mounter.unmount(m)
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


def test_sigterm_unmounts_and_umount_ends_the_daemon(mounter, backing):
    m = mounter.mount(str(backing))
    os.kill(m.pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while is_mounted(m.mountpoint):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    m2 = mounter.mount(str(backing), mountpoint=m.mountpoint)
    mounter.unmount(m2)
    assert not process_running(m2.pid), "umount returns once the daemon has exited"


# ---- bad input: one clear line, a non-zero exit, nothing left mounted ---------------
def _fails(args: list[str], *needles: str, **kw) -> None:
    proc = run_fusecache(*args, **kw)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_bad_backing(tmp_path):
    mp = tmp_path / "mnt"
    mp.mkdir()
    _fails(["mount", str(tmp_path / "nope"), str(mp)], "does not exist")
    (tmp_path / "file").write_bytes(b"")
    _fails(["mount", str(tmp_path / "file"), str(mp)], "not a directory")
    assert not is_mounted(str(mp))


def test_bad_mountpoint(mounter, backing, tmp_path):
    _fails(["mount", str(backing), str(tmp_path / "nope")], "does not exist", "mkdir")
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_bytes(b"")
    _fails(["mount", str(backing), str(full)], "not empty")
    m = mounter.mount(str(backing))
    _fails(["mount", str(backing), m.mountpoint], "already a fusecache mount", "umount")
    assert not is_mounted(str(full))


def test_bad_options_and_commands(backing, tmp_path):
    _fails(["mount", str(backing)], "MOUNTPOINT")
    _fails(["mount", str(backing), str(tmp_path), "--attr-timeout", "soon"], "attr-timeout")
    _fails(["frobnicate"], "invalid choice")
    _fails(["umount", str(tmp_path)], "not mounted")
    _fails(["umount", "/proc"], "not a fusecache mount")


def test_no_dev_fuse(backing, tmp_path):
    mp = tmp_path / "mnt"
    mp.mkdir()
    if shutil.which("unshare") is None:
        pytest.fail("unshare (util-linux) is needed for this test")
    script = f"mount -t tmpfs none /dev && exec {sys.executable} -m fusecache mount {backing} {mp}"
    proc = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert proc.stderr.strip().count("\n") == 0 and "/dev/fuse does not exist" in proc.stderr
    assert not is_mounted(str(mp))


def test_log_file_that_cannot_be_written(backing, tmp_path):
    mp = tmp_path / "mnt"
    mp.mkdir()
    _fails(["mount", str(backing), str(mp), "--log-file", "/proc/nope/log"], "log file", "--log-file")
    assert not is_mounted(str(mp))


def test_foreground_tells_systemd_when_ready_and_sigterm_unmounts(backing, tmp_path):
    """Type=notify: READY=1 on $NOTIFY_SOCKET once the mount serves; systemd's stop (SIGTERM) unmounts."""
    import socket

    (backing / "vm.img").write_bytes(b"ready")
    mp = tmp_path / "mnt"
    mp.mkdir()
    notify = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(notify))
        sock.settimeout(30)
        env = {**os.environ, "NOTIFY_SOCKET": str(notify)}
        daemon = subprocess.Popen([sys.executable, "-m", "fusecache", "mount", str(backing), str(mp), "--foreground", "--no-cache"],
                                  env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            assert sock.recv(4096) == b"READY=1"
            with open(mp / "vm.img", "rb") as f:
                assert f.read() == b"ready"
            daemon.send_signal(signal.SIGTERM)
            assert daemon.wait(timeout=30) == 0
            assert not is_mounted(str(mp))
        finally:
            if daemon.poll() is None:
                daemon.kill()
            subprocess.run(["fusermount3", "-u", "-z", str(mp)], capture_output=True)
