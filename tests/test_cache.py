"""The cache on a real mount: hits, dedup, eviction, restarts, crashes, staleness, bad cache dirs.

Every test here takes `images`, a backing that is a local directory today and
an NFS export too (see `images` in conftest): the same suite, parametrized.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import threading
import time

import pytest

from fusecache import options
from fusecache.stats import ImageCounters, MountStats
from tests.mounting import force_unmount, is_mounted, run_fusecache, stats

pytestmark = pytest.mark.mount
MiB = 1 << 20
INCLUSIVE = ("--admit", "inclusive")  # these tests exercise the store; second-chance has its own


def image_counters(mountpoint: str, name: str) -> ImageCounters:
    return stats(mountpoint).images[name]


def wait_queue_empty(mountpoint: str) -> MountStats:
    deadline = time.monotonic() + 30
    while True:
        s = stats(mountpoint)
        if s.queue == 0:
            return s
        assert time.monotonic() < deadline, "the writer never caught up"
        time.sleep(0.05)


def read_all(path: str, bs: int = MiB) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        out = []
        off = 0
        while chunk := os.pread(fd, bs, off):
            out.append(chunk)
            off += len(chunk)
        return b"".join(out)
    finally:
        os.close(fd)


def write_random(path: str, size: int, seed: int) -> bytes:
    data = hashlib.shake_256(seed.to_bytes(8, "little")).digest(size)
    with open(path, "wb") as f:
        f.write(data)
    return data


def test_hits_after_first_read(mounter, images, tmp_path):
    data = write_random(images.path("a.img"), 3 * MiB + 1234, 1)
    m = mounter.mount(images.spec, *INCLUSIVE, "--cache-dir", str(tmp_path / "cache"))
    p = os.path.join(m.mountpoint, "a.img")
    assert read_all(p) == data
    wait_queue_empty(m.mountpoint)
    first = image_counters(m.mountpoint, "a.img")
    assert first.backing_bytes == len(data) and first.hit_bytes == 0
    assert read_all(p, bs=4096) == data  # small unaligned-to-chunk requests, partial last chunk
    second = image_counters(m.mountpoint, "a.img")
    assert second.hit_bytes == len(data) and second.backing_bytes == len(data)


def test_dedup_two_images_share_blocks(mounter, images, tmp_path):
    common = write_random(images.path("base.img"), 4 * MiB, 2)
    with open(images.path("clone.img"), "wb") as f:
        f.write(common[: 2 * MiB] + b"\0" * MiB + common[3 * MiB :])  # a clone with a hole punched in it
    m = mounter.mount(images.spec, *INCLUSIVE, "--cache-dir", str(tmp_path / "cache"))
    read_all(os.path.join(m.mountpoint, "base.img"))
    read_all(os.path.join(m.mountpoint, "clone.img"))
    store = wait_queue_empty(m.mountpoint).store
    assert store.bytes_stored == 4 * MiB  # the clone added nothing: its pages are the base's, its hole is free
    assert store.logical_bytes == 7 * MiB
    assert store.dedup_ratio == pytest.approx(7 / 4)


def test_eviction_keeps_the_bound_and_the_bytes(mounter, images, tmp_path):
    data = write_random(images.path("big.img"), 24 * MiB, 3)
    m = mounter.mount(images.spec, *INCLUSIVE, "--cache-dir", str(tmp_path / "cache"), "--cache-size", "4M")
    p = os.path.join(m.mountpoint, "big.img")
    for _ in range(2):
        assert read_all(p) == data
        store = wait_queue_empty(m.mountpoint).store
        assert store.bytes_stored <= store.capacity == 4 * MiB
    assert store.evicted_chunks > 0


def test_warm_restart(mounter, images, tmp_path):
    data = write_random(images.path("w.img"), 2 * MiB, 4)
    cache = str(tmp_path / "cache")
    m = mounter.mount(images.spec, *INCLUSIVE, "--cache-dir", cache)
    read_all(os.path.join(m.mountpoint, "w.img"))
    wait_queue_empty(m.mountpoint)
    mounter.unmount(m)
    m = mounter.mount(images.spec, *INCLUSIVE, "--cache-dir", cache)
    assert read_all(os.path.join(m.mountpoint, "w.img")) == data
    c = image_counters(m.mountpoint, "w.img")
    assert c.hit_bytes == len(data) and c.backing_bytes == 0


def test_sigkill_during_admission_then_every_byte_right(mounter, images, tmp_path):
    data = write_random(images.path("k.img"), 48 * MiB, 5)
    cache = str(tmp_path / "cache")
    for round_ in range(3):
        m = mounter.mount(images.spec, *INCLUSIVE, "--cache-dir", cache)
        p = os.path.join(m.mountpoint, "k.img")
        reader = threading.Thread(target=_read_ignoring_errors, args=(p,), daemon=True)
        reader.start()
        time.sleep(0.2 + 0.15 * round_)  # mid-admission: the writer is busy with batches
        os.kill(m.pid, signal.SIGKILL)
        reader.join(timeout=30)
        force_unmount(m.mountpoint, m.pid)
        mounter.mounts.remove(m)
        assert not is_mounted(m.mountpoint)
    m = mounter.mount(images.spec, *INCLUSIVE, "--cache-dir", cache)
    assert read_all(os.path.join(m.mountpoint, "k.img")) == data
    s = stats(m.mountpoint)
    assert s.store.verify_failures == 0 or s.images["k.img"].backing_bytes > 0


def _read_ignoring_errors(path: str) -> None:
    try:
        read_all(path)
    except OSError:
        pass  # the daemon was killed under us


def test_changed_behind_our_back_is_never_served_stale(mounter, images, tmp_path):
    write_random(images.path("s.img"), 2 * MiB, 6)
    m = mounter.mount(images.spec, *INCLUSIVE, "--cache-dir", str(tmp_path / "cache"), "--revalidate", "0.5")
    p = os.path.join(m.mountpoint, "s.img")
    read_all(p)
    wait_queue_empty(m.mountpoint)
    fd = os.open(p, os.O_RDONLY | os.O_DIRECT)  # held open across the change: revalidation must catch it
    try:
        new = hashlib.shake_256(b"seven").digest(2 * MiB)
        images.write_behind("s.img", new, keep_mtime=True)  # another host rewrote it, same size, even the same mtime
        assert read_all(p) == new  # a new open: close-to-open
        time.sleep(0.6)
        import mmap

        buf = mmap.mmap(-1, MiB)
        os.preadv(fd, [buf], 0)
        assert bytes(buf) == new[:MiB]
    finally:
        os.close(fd)
    assert image_counters(m.mountpoint, "s.img").invalidations >= 1


def test_writes_through_the_mount_are_read_back(mounter, images, tmp_path):
    write_random(images.path("rw.img"), 4 * MiB, 8)
    m = mounter.mount(images.spec, *INCLUSIVE, "--cache-dir", str(tmp_path / "cache"))
    p = os.path.join(m.mountpoint, "rw.img")
    before = read_all(p)
    wait_queue_empty(m.mountpoint)
    fd = os.open(p, os.O_RDWR)
    try:
        os.pwrite(fd, b"X" * 5000, 65536 - 100)  # spans two chunks
        expect = before[: 65536 - 100] + b"X" * 5000 + before[65536 - 100 + 5000 :]
        assert os.pread(fd, 4 * MiB, 0) == expect
        os.pwrite(fd, b"tail", 4 * MiB + 10)  # extends the file past a hole
        expect = expect + b"\0" * 10 + b"tail"
        assert read_all(p) == expect
        os.ftruncate(fd, MiB)
        assert read_all(p) == expect[:MiB]
    finally:
        os.close(fd)
    with open(images.path("rw.img"), "rb") as f:
        assert f.read() == expect[:MiB]


def test_rename_unlink_and_replace(mounter, images, tmp_path):
    a = write_random(images.path("a.img"), MiB, 9)
    b = write_random(images.path("b.img"), MiB, 10)
    m = mounter.mount(images.spec, *INCLUSIVE, "--cache-dir", str(tmp_path / "cache"))
    mp = m.mountpoint
    read_all(os.path.join(mp, "a.img"))
    read_all(os.path.join(mp, "b.img"))
    wait_queue_empty(mp)
    os.rename(os.path.join(mp, "a.img"), os.path.join(mp, "b.img"))  # replace by rename
    assert read_all(os.path.join(mp, "b.img")) == a
    os.unlink(os.path.join(mp, "b.img"))
    c = write_random(os.path.join(mp, "b.img"), MiB, 11)  # may reuse the freed inode number
    assert read_all(os.path.join(mp, "b.img")) == c != b


def test_fio_verify_with_the_cache(mounter, images, tmp_path):
    m = mounter.mount(images.spec, *INCLUSIVE, "--cache-dir", str(tmp_path / "cache"), "--cache-size", "32M")
    cmd = [
        "fio", "--name=cache", f"--directory={m.mountpoint}", "--filename=vm.img", "--size=24M", "--offset_increment=24M",
        "--numjobs=3", "--rw=randrw", "--rwmixread=60", "--bsrange=4k-128k", "--direct=1", "--ioengine=psync",
        "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0", "--loops=2",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    with open(images.path("vm.img"), "rb") as f:
        assert hashlib.sha256(f.read()).digest() == hashlib.sha256(read_all(os.path.join(m.mountpoint, "vm.img"))).digest()


def test_admit_and_drop_commands(mounter, images, tmp_path):
    data = write_random(images.path("x.img"), 2 * MiB, 12)
    m = mounter.mount(images.spec, *INCLUSIVE, "--cache-dir", str(tmp_path / "cache"))
    proc = run_fusecache("admit", m.mountpoint, os.path.join(m.mountpoint, "x.img"), "0", "1M")
    assert proc.returncode == 0, proc.stderr
    assert "admitted 16 chunks" in proc.stdout
    wait_queue_empty(m.mountpoint)
    assert read_all(os.path.join(m.mountpoint, "x.img")) == data
    c = image_counters(m.mountpoint, "x.img")
    assert c.hit_bytes == MiB and c.backing_bytes == MiB
    assert run_fusecache("drop", m.mountpoint, "x.img").returncode == 0
    read_all(os.path.join(m.mountpoint, "x.img"))
    assert image_counters(m.mountpoint, "x.img").backing_bytes == 3 * MiB
    assert run_fusecache("drop", m.mountpoint).returncode == 0
    bad = run_fusecache("admit", m.mountpoint, "nope.img", "0", "1M")
    assert bad.returncode != 0 and "nope.img" in bad.stderr and bad.stderr.count("\n") == 1


# ---- bad cache dirs and values: one line, nothing mounted ----------------------------
def _mount_fails(images, mp, *args) -> str:
    os.makedirs(mp, exist_ok=True)
    proc = run_fusecache("mount", images.spec, mp, "--log-file", mp + ".log", *args)
    assert proc.returncode != 0
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert not is_mounted(mp)
    return proc.stderr


def test_foreign_and_corrupt_cache_dirs(mounter, images, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("not a cache")
    err = _mount_fails(images, str(tmp_path / "m1"), "--cache-dir", str(foreign))
    assert "not a fusecache cache" in err and "--cache-dir" in err and (foreign / "thesis.tex").exists()

    cache = tmp_path / "cache"
    m = mounter.mount(images.spec, *INCLUSIVE, "--cache-dir", str(cache))
    mounter.unmount(m)
    with open(cache / "meta.lmdb" / "data.mdb", "r+b") as f:
        f.write(b"\xde\xad" * 4096)
    err = _mount_fails(images, str(tmp_path / "m2"), "--cache-dir", str(cache))
    assert "--reset-cache" in err
    mounter.mount(images.spec, *INCLUSIVE, "--cache-dir", str(cache), "--reset-cache")


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--cache-size", "8Q"], "not a size"),
        (["--cache-size", "0"], "too small"),
        (["--revalidate", "-1"], "negative"),
        (["--admit", "everything"], "invalid choice"),
    ],
)
def test_bad_cache_options(images, tmp_path, args, needle):
    assert needle in _mount_fails(images, str(tmp_path / "m"), "--cache-dir", str(tmp_path / "c"), *args)


def _pread_direct(fd: int, offset: int, length: int) -> bytes:
    import mmap

    buf = mmap.mmap(-1, length)  # O_DIRECT wants an aligned buffer
    n = os.preadv(fd, [buf], offset)
    return bytes(buf[:n])


def test_a_write_through_the_mount_does_not_hide_another_hosts_change(mounter, images, tmp_path):
    cs = 64 * 1024
    write_random(images.path("w.img"), 12 * cs, 11)
    cache = str(tmp_path / "cache")
    m = mounter.mount(images.spec, *INCLUSIVE, "--cache-dir", cache, "--revalidate", "3600")
    p = os.path.join(m.mountpoint, "w.img")
    fd = os.open(p, os.O_RDWR | os.O_DIRECT)  # a guest's disk: open all along
    try:
        _pread_direct(fd, 0, 12 * cs)  # chunk 0 (and the rest) cached
        wait_queue_empty(m.mountpoint)
        theirs = hashlib.shake_256(b"another host").digest(cs)
        images.write_behind("w.img", theirs)  # another host changes chunk 0
        os.pwrite(fd, b"ours".ljust(4096, b"\0"), 10 * cs)  # then we write chunk 10, before any check of ours
    finally:
        os.close(fd)
    for _ in range(3):  # fresh opens: the version after our write is not taken as ours alone
        assert read_all(p)[:cs] == theirs
    wait_queue_empty(m.mountpoint)
    assert image_counters(m.mountpoint, "w.img").invalidations >= 1
    mounter.unmount(m)
    m = mounter.mount(images.spec, *INCLUSIVE, "--cache-dir", cache, "--revalidate", "3600")
    p = os.path.join(m.mountpoint, "w.img")
    whole = read_all(p)
    assert whole[:cs] == theirs and whole[10 * cs : 10 * cs + 4] == b"ours"  # nor after a restart


@pytest.mark.parametrize("direct", [True, False], ids=["o_direct", "buffered"])
def test_held_open_sees_a_change_within_the_bound(mounter, images, tmp_path, direct):
    revalidate, attr_timeout = options.REVALIDATE, options.ATTR_TIMEOUT  # the defaults: 2 s and 1 s
    write_random(images.path("h.img"), 2 * MiB, 12)
    m = mounter.mount(images.spec, *INCLUSIVE, "--cache-dir", str(tmp_path / "cache"),
                      "--revalidate", str(revalidate), "--attr-timeout", str(attr_timeout))
    p = os.path.join(m.mountpoint, "h.img")
    fd = os.open(p, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    try:
        def read() -> bytes:
            return _pread_direct(fd, 0, MiB) if direct else os.pread(fd, MiB, 0)

        read()
        wait_queue_empty(m.mountpoint)
        read()  # a hit, in the kernel's page cache too when buffered
        new = hashlib.shake_256(b"changed while held open").digest(2 * MiB)
        images.write_behind("h.img", new)
        # The README's bound: once --revalidate plus --attr-timeout have passed, a read has the new
        # bytes, however often the file was read meanwhile (a read in between must not pin old bytes).
        until = time.monotonic() + revalidate + attr_timeout + 0.2
        while time.monotonic() < until:
            read()
            time.sleep(0.05)
        assert read() == new[:MiB]
    finally:
        os.close(fd)
