"""The mount(8) helper: `mount -t fuse.fusecache` for real, and its option translation."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys

import pytest

from fusecache import mounts
from tests.mounting import Mount, is_mounted

pytestmark = pytest.mark.mount

HELPER = os.path.join(os.path.dirname(__file__), "..", "mount_helpers", "mount.fusecache")
SBIN_LINK = "/sbin/mount.fuse.fusecache"  # where mount(8) looks for the helper of type fuse.fusecache


@pytest.fixture
def helper(tmp_path):
    """The helper installed in a directory of its own, with a `fusecache` next to it that runs this checkout."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    installed = bindir / "mount.fusecache"
    shutil.copy(HELPER, installed)
    fusecache = bindir / "fusecache"
    fusecache.write_text(f'#!/bin/sh\nexec {sys.executable} -m fusecache "$@"\n')
    for p in (installed, fusecache):
        p.chmod(p.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return str(installed)


@pytest.fixture
def mount_type(helper):
    """Makes `mount -t fuse.fusecache` find the helper, for this test only."""
    if os.path.lexists(SBIN_LINK):
        pytest.skip(f"{SBIN_LINK} is installed on this machine: not replacing it")
    os.symlink(helper, SBIN_LINK)
    try:
        yield
    finally:
        os.unlink(SBIN_LINK)


@pytest.fixture
def backing(tmp_path):
    d = tmp_path / "images"
    d.mkdir()
    (d / "vm1.img").write_bytes(os.urandom(1 << 20))
    return d


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=120)


def daemon_pid(mountpoint: str) -> int | None:
    try:
        with open(os.path.join(mounts.runtime_dir(mountpoint), "pid")) as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def test_mount_t_fuse_fusecache(mount_type, mounter, backing, tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    log = tmp_path / "daemon.log"
    opts = f"cache_dir={tmp_path / 'cache'},cache_size=64M,log_file={log},_netdev,nofail,x-systemd.requires=nfs.mount,defaults,rw"
    proc = run("mount", "-t", "fuse.fusecache", "-o", opts, str(backing), str(mnt))
    if is_mounted(str(mnt)):  # the mounter fixture unmounts it whatever happens next
        mounter.mounts.append(Mount(str(backing), str(mnt), daemon_pid(str(mnt)), str(log)))
    assert proc.returncode == 0, proc.stderr
    assert mounts.find_mount(str(mnt)).fstype == "fuse.fusecache"
    assert (mnt / "vm1.img").read_bytes() == (backing / "vm1.img").read_bytes()
    assert run(sys.executable, "-m", "fusecache", "stats", str(mnt), "--json").stdout.count('"capacity": 67108864') == 1
    umount = run("umount", str(mnt))
    assert umount.returncode == 0, umount.stderr
    assert not is_mounted(str(mnt))


@pytest.mark.parametrize(
    ("opts", "message"),
    [
        ("cache_size=64M,bogus", "unknown option 'bogus'"),
        ("ro", "no read-only mode"),
        ("cache_size", "option 'cache_size' needs a value"),
        ("allow_other=yes", "option 'allow_other' takes no value"),
    ],
)
def test_a_bad_option_is_one_line_and_nothing_is_mounted(mount_type, backing, tmp_path, opts, message):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = run("mount", "-t", "fuse.fusecache", "-o", opts, str(backing), str(mnt))
    assert proc.returncode != 0
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert message in proc.stderr
    assert not is_mounted(str(mnt))


def test_options_become_fusecache_arguments(helper, backing, tmp_path):
    # -f: mount(8)'s fake mode; with -v the helper prints the command it would run
    opts = (
        "_netdev,x-systemd.automount,noauto,nosuid,nodev,cache_dir=/var/cache/fc,cache-size=8G,allow_other,"
        "peer=h2:7070,peer=h3:7070,cluster_key_file=/etc/fusecache/cluster.key,balloon=libvirt,listen=0.0.0.0:7070,"
        "metrics=127.0.0.1:9477,admit=second-chance,revalidate=5,log_file=/var/log/fc.log"
    )
    proc = run(helper, str(backing), str(tmp_path / "mnt"), "-fnv", "-o", opts)
    assert proc.returncode == 0, proc.stderr
    words = proc.stderr.split(": ", 1)[1].split()
    assert words[1:4] == ["mount", str(backing), str(tmp_path / "mnt")]
    assert words[0] == os.path.join(os.path.dirname(helper), "fusecache")
    assert words[4:] == [
        "--cache-dir", "/var/cache/fc", "--cache-size", "8G", "--allow-other", "--peer", "h2:7070", "--peer", "h3:7070",
        "--cluster-key-file", "/etc/fusecache/cluster.key", "--balloon", "libvirt", "--listen", "0.0.0.0:7070",
        "--metrics", "127.0.0.1:9477", "--admit", "second-chance", "--revalidate", "5", "--log-file", "/var/log/fc.log",
    ]


def test_sloppy_mode_ignores_unknown_options(helper, backing, tmp_path):
    proc = run(helper, str(backing), str(tmp_path / "mnt"), "-sfv", "-o", "bogus,cache_size=1G")
    assert proc.returncode == 0, proc.stderr
    assert "ignoring unknown option 'bogus'" in proc.stderr
    assert proc.stderr.rstrip().endswith("--cache-size 1G")
