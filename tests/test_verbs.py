"""The operators' verbs on real mounts: `warm`, `pin`/`unpin` and `--pin`, `ls`, and what `top` shows of them.

Bytes read from the backing are counted twice: by the mount's per-image
counters, and independently by the daemon's /proc/PID/io rchar (the store is
mmapped, so nearly everything the daemon reads is the backing).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import signal
import subprocess

import pytest

from fusecache.stats import ImageHoldings, from_json
from tests.harness.waiting import wait_for
from tests.mounting import FUSECACHE, run_fusecache, stats
from tests.test_peers_mount import cluster, key_file  # noqa: F401 - a fixture

pytestmark = pytest.mark.mount
MiB = 1 << 20


def write_random(path: str, size: int, seed: int) -> bytes:
    data = hashlib.shake_256(seed.to_bytes(8, "little")).digest(size)
    with open(path, "wb") as f:
        f.write(data)
    return data


def rchar(pid: int) -> int:
    with open(f"/proc/{pid}/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def read_direct(path: str, offset: int = 0, length: int | None = None) -> bytes:
    """The file (or a range) with O_DIRECT, 1 MiB at a time (QEMU's cache=none): every read reaches the daemon, no readahead."""
    buf = mmap.mmap(-1, MiB)  # page-aligned, as O_DIRECT needs
    out = []
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        off = offset
        while (length is None or off < offset + length) and (n := os.preadv(fd, [buf], off)):
            out.append(buf[:n])
            off += n
    finally:
        os.close(fd)
    return b"".join(out)


def ls(mountpoint: str, image: str | None = None) -> dict[str, ImageHoldings]:
    proc = run_fusecache("ls", mountpoint, *([image] if image else []), "--json")
    assert proc.returncode == 0, proc.stderr
    return {i["image"]: from_json(ImageHoldings, i) for i in json.loads(proc.stdout)["images"]}


def one_line_error(proc: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fusecache: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_warm_then_a_direct_read_reads_nothing_from_the_backing(mounter, images, tmp_path):
    data = write_random(images.path("golden.img"), 24 * MiB + 5000, 1)  # a partial last chunk too
    m = mounter.mount(images.spec, "--cache-dir", str(tmp_path / "cache"))  # the default second-chance admission
    proc = run_fusecache("warm", m.mountpoint, "golden.img")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("warmed 24.0 MiB of 24.0 MiB of golden.img") and len(proc.stdout.splitlines()) == 1
    assert "0 B already cached" in proc.stdout
    before, rchar_before = stats(m.mountpoint).images["golden.img"], rchar(m.pid)
    assert read_direct(os.path.join(m.mountpoint, "golden.img")) == data
    after, rchar_after = stats(m.mountpoint).images["golden.img"], rchar(m.pid)
    assert after.backing_bytes == before.backing_bytes == 0 and after.peer_bytes == 0
    assert after.hit_bytes - before.hit_bytes == len(data)
    assert rchar_after - rchar_before < MiB  # FUSE request headers and control requests, not 24 MiB of image
    # a second warm finds everything cached and reads nothing
    proc = run_fusecache("warm", m.mountpoint, "golden.img", "--json")
    assert proc.returncode == 0, proc.stderr
    job = json.loads(proc.stdout)
    assert job["state"] == "done" and job["cached_bytes"] == job["total_bytes"] == len(data)
    assert job["backing_bytes"] == job["peer_bytes"] == 0
    held = ls(m.mountpoint, "golden.img")["golden.img"]
    assert held.cached_bytes == len(data) and held.size == len(data) and not held.pinned


def test_warm_a_range_and_two_images(mounter, tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    a = write_random(str(root / "a.img"), 8 * MiB, 2)
    write_random(str(root / "b.img"), 8 * MiB, 3)
    m = mounter.mount(str(root), "--cache-dir", str(tmp_path / "cache"))
    proc = run_fusecache("warm", m.mountpoint, "a.img", os.path.join(m.mountpoint, "b.img"), "--range", "1M:2M", "--json")
    assert proc.returncode == 0, proc.stderr
    job = json.loads(proc.stdout)
    assert job["images"] == ["a.img", "b.img"] and job["total_bytes"] == job["done_bytes"] == 4 * MiB
    held = ls(m.mountpoint)
    assert held["a.img"].cached_bytes == held["b.img"].cached_bytes == 2 * MiB
    before = stats(m.mountpoint).images.get("a.img")
    assert read_direct(os.path.join(m.mountpoint, "a.img"), MiB, 2 * MiB) == a[MiB : 3 * MiB]
    after = stats(m.mountpoint).images["a.img"]
    assert after.backing_bytes == (before.backing_bytes if before else 0)


def test_a_pinned_image_survives_a_scan_of_a_larger_image_and_a_remount(mounter, tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    golden = write_random(str(root / "golden.img"), 6 * MiB, 4)
    write_random(str(root / "backup.img"), 48 * MiB, 5)  # three times the cache
    args = ("--cache-dir", str(tmp_path / "cache"), "--cache-size", "16M", "--admit", "inclusive")
    m = mounter.mount(str(root), *args)
    proc = run_fusecache("pin", m.mountpoint, "golden.img")
    assert proc.returncode == 0 and proc.stdout.startswith("pinned golden.img: 6.0 MiB of a 8.0 MiB pin budget"), proc.stdout + proc.stderr
    assert run_fusecache("warm", m.mountpoint, "golden.img").returncode == 0
    for _ in range(2):  # a backup scan, twice: every chunk of it is admitted and evicts something
        read_direct(os.path.join(m.mountpoint, "backup.img"))
    wait_for(lambda: stats(m.mountpoint).queue == 0, "the writer to catch up")
    assert stats(m.mountpoint).store.evicted_chunks > 0
    held = ls(m.mountpoint)
    assert held["golden.img"].pinned and held["golden.img"].cached_bytes == len(golden)
    assert held["backup.img"].cached_bytes < 16 * MiB
    before = stats(m.mountpoint).images["golden.img"].backing_bytes  # qemu-img's look at it, when pinning
    assert read_direct(os.path.join(m.mountpoint, "golden.img")) == golden
    assert stats(m.mountpoint).images["golden.img"].backing_bytes == before
    mounter.unmount(m)

    m = mounter.mount(str(root), *args)  # pins survive a remount
    held = ls(m.mountpoint)
    assert held["golden.img"].pinned and held["golden.img"].cached_bytes == len(golden)
    read_direct(os.path.join(m.mountpoint, "backup.img"))
    assert read_direct(os.path.join(m.mountpoint, "golden.img")) == golden
    assert stats(m.mountpoint).images["golden.img"].backing_bytes == 0
    # unpinned, it goes the way of any chunk
    proc = run_fusecache("unpin", m.mountpoint, "golden.img")
    assert proc.returncode == 0 and proc.stdout.startswith("unpinned golden.img"), proc.stderr
    for _ in range(2):
        read_direct(os.path.join(m.mountpoint, "backup.img"))
    wait_for(lambda: stats(m.mountpoint).queue == 0, "the writer to catch up")
    assert ls(m.mountpoint, "golden.img")["golden.img"].cached_bytes < len(golden)


def test_pin_at_mount_by_glob_and_the_budget(mounter, tmp_path):
    root = tmp_path / "images"
    (root / "golden").mkdir(parents=True)
    write_random(str(root / "golden" / "a.img"), 3 * MiB, 6)
    write_random(str(root / "golden" / "b.img"), 3 * MiB, 7)
    write_random(str(root / "big.img"), 6 * MiB, 8)
    cache = ("--cache-dir", str(tmp_path / "cache"), "--cache-size", "16M")
    # over the budget at mount: refused in one line, nothing mounted
    mp = tmp_path / "refused"
    mp.mkdir()
    log = str(tmp_path / "r.log")
    proc = run_fusecache("mount", str(root), str(mp), *cache, "--pin", "*.img", "--pin-budget", "0.5", "--log-file", log)
    one_line_error(proc, 1, "pin budget", "--pin-budget")
    assert not os.path.ismount(mp)
    m = mounter.mount(str(root), *cache, "--pin", "golden/*")
    wait_for(lambda: len(stats(m.mountpoint).pins.pins) == 2, "the --pin images to be pinned")
    pins = stats(m.mountpoint).pins
    assert [p.image for p in pins.pins] == ["golden/a.img", "golden/b.img"] and {p.by for p in pins.pins} == {"--pin golden/*"}
    assert pins.allocated_bytes == 6 * MiB and pins.budget == 8 * MiB
    top = run_fusecache("top", "--once", "--interval", "0", m.mountpoint)
    assert "pinned 6.0 MiB of 8.0 MiB: golden/a.img, golden/b.img" in top.stdout, top.stdout
    # a pin past the budget: refused in one line, nothing changed
    one_line_error(run_fusecache("pin", m.mountpoint, "big.img"), 1, "big.img", "over the pin budget of 8.0 MiB")
    assert stats(m.mountpoint).pins.allocated_bytes == 6 * MiB
    mounter.unmount(m)
    m = mounter.mount(str(root), *cache)  # no --pin now: what only --pin pinned is unpinned
    wait_for(lambda: not stats(m.mountpoint).pins.pins, "the --pin pins to go")


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img not installed (`make deps` installs qemu-utils)")
def test_pinning_a_qcow2_overlay_pins_its_backing_chain(mounter, tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    write_random(str(tmp_path / "base.raw"), 4 * MiB, 9)
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(tmp_path / "base.raw"), str(root / "base.qcow2")], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(root / "vm1.qcow2")], check=True)
    m = mounter.mount(str(root), "--cache-dir", str(tmp_path / "cache"))
    proc = run_fusecache("pin", m.mountpoint, "vm1.qcow2")
    assert proc.returncode == 0 and "with its backing chain base.qcow2" in proc.stdout, proc.stdout + proc.stderr
    held = ls(m.mountpoint)
    assert held["vm1.qcow2"].pinned_by == "vm1.qcow2" and held["base.qcow2"].pinned_by == "vm1.qcow2"
    assert stats(m.mountpoint).pins.pins[0].chain == ["vm1.qcow2", "base.qcow2"]
    text = run_fusecache("ls", m.mountpoint).stdout
    assert "chain" in text and "pinned as the backing file of vm1.qcow2" in text
    assert run_fusecache("unpin", m.mountpoint, "vm1.qcow2").returncode == 0
    assert not stats(m.mountpoint).pins.pins and not any(h.pinned for h in ls(m.mountpoint).values())


def test_warm_from_a_peer(mounter, images, tmp_path, key_file):  # noqa: F811 - the fixture
    data = write_random(images.path("golden.img"), 4 * MiB, 10)
    a, b = cluster(mounter, images, tmp_path, 2, ["--cluster-key-file", key_file])
    assert read_direct(os.path.join(a.mountpoint, "golden.img")) == data  # host a caches it (inclusive)
    wait_for(lambda: any(p.summary_locations >= 64 for p in stats(b.mountpoint).peers.peers.values()), "a's summary on b")
    proc = run_fusecache("warm", b.mountpoint, "golden.img", "--json")
    assert proc.returncode == 0, proc.stderr
    job = json.loads(proc.stdout)
    assert job["peer_bytes"] == len(data) and job["backing_bytes"] == 0
    assert ls(b.mountpoint)["golden.img"].peer_bytes == len(data)
    assert read_direct(os.path.join(b.mountpoint, "golden.img")) == data
    img = stats(b.mountpoint).images["golden.img"]
    assert img.hit_bytes == len(data) and img.backing_bytes == img.peer_bytes == 0


def test_ctrl_c_stops_the_warm_and_keeps_what_it_cached(mounter, tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    data = write_random(str(root / "golden.img"), 64 * MiB, 11)
    m = mounter.mount(str(root), "--cache-dir", str(tmp_path / "cache"))
    cmd = [*FUSECACHE, "warm", m.mountpoint, "golden.img", "--rate", "4M"]
    # Ctrl-C reaches a command run in a terminal's foreground; a suite started in the background of a
    # non-interactive shell (nohup, `&`) has SIGINT ignored, and its children inherit that: give the command
    # a terminal's default, or Python never turns SIGINT into KeyboardInterrupt and the warm runs to its end
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    try:
        wait_for(lambda: any(w.done_bytes >= 2 * MiB for w in stats(m.mountpoint).warms), "the warm to make progress")
        # top shows the running warm
        top = run_fusecache("top", "--once", "--interval", "0", m.mountpoint)
        assert top.returncode == 0 and "warm #1" in top.stdout and "ETA" in top.stdout, top.stdout
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert out.startswith("cancelled: warmed ") and err == ""
    (job,) = stats(m.mountpoint).warms
    assert job.state == "cancelled" and 0 < job.done_bytes < len(data)
    wait_for(lambda: stats(m.mountpoint).queue == 0, "the writer to catch up")
    kept = ls(m.mountpoint)["golden.img"].cached_bytes
    assert kept >= job.backing_bytes - MiB and kept < len(data)  # what it fetched stays cached (bar the last step's admissions)
    assert stats(m.mountpoint).warms[0].done_bytes == job.done_bytes  # it stopped
    # warming again fetches only the rest
    again = json.loads(run_fusecache("warm", m.mountpoint, "golden.img", "--rate", "0", "--json").stdout)
    assert again["cached_bytes"] == kept and again["backing_bytes"] == len(data) - kept
    assert read_direct(os.path.join(m.mountpoint, "golden.img")) == data


def test_bad_input_is_one_line_each(mounter, tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    write_random(str(root / "a.img"), MiB, 12)
    m = mounter.mount(str(root), "--cache-dir", str(tmp_path / "cache"))
    mp = m.mountpoint
    one_line_error(run_fusecache("warm", mp, "nope.img"), 1, "no image nope.img")
    one_line_error(run_fusecache("warm", str(tmp_path), "a.img"), 1, "not a fusecache mount")
    one_line_error(run_fusecache("warm", mp, "a.img", "--range", "12"), 2, "OFFSET:LENGTH")
    one_line_error(run_fusecache("warm", mp, "/elsewhere/a.img"), 1, "is not under")
    one_line_error(run_fusecache("pin", mp, "nope.img"), 1, "no image nope.img")
    one_line_error(run_fusecache("pin", str(tmp_path), "a.img"), 1, "not a fusecache mount")
    one_line_error(run_fusecache("unpin", mp, "a.img"), 1, "a.img is not pinned")
    one_line_error(run_fusecache("ls", mp, "nope.img"), 1, "no image nope.img")
    one_line_error(run_fusecache("ls", str(tmp_path)), 1, "not a fusecache mount")
    one_line_error(run_fusecache("pin", mp, "."), 1, "not a regular file")
    mp2 = tmp_path / "nocache"
    mp2.mkdir()
    one_line_error(run_fusecache("mount", str(root), str(mp2), "--no-cache", "--pin", "*"), 1, "--no-cache")


def test_a_pin_does_not_pass_to_a_file_that_replaced_the_pinned_one(mounter, tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    write_random(str(root / "a.img"), MiB, 13)
    args = ("--cache-dir", str(tmp_path / "cache"))
    m = mounter.mount(str(root), *args)
    assert run_fusecache("pin", m.mountpoint, "a.img").returncode == 0
    mounter.unmount(m)
    os.rename(root / "a.img", root / "old.img")  # keeps its inode: the pin must not follow the name to another file
    write_random(str(root / "a.img"), MiB, 14)
    m = mounter.mount(str(root), *args)
    wait_for(lambda: not stats(m.mountpoint).pins.pins, "the stale pin to go")
