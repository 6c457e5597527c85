"""Real VM disk images for dedup tests and benchmarks: Debian 12 root filesystems in raw ext4.

Each image is built on the fly, never committed: `debootstrap --variant=minbase
bookworm` into a scratch directory with its own package set, then `mkfs.ext4
-q -d ROOTFS IMAGE 1G` (a sparse 1 GiB raw image), then the directory is
deleted. Every image is built independently, so files land at different
offsets in each: the case a content-deduplicating cache meets when guests
were installed separately rather than cloned from one golden image.

The images are cached under `~/.cache/fusecache/images/<VERSION>/NAME.img`
(`$XDG_CACHE_HOME` if set), beside the test guest's kernel, so a fresh clone
reuses what an earlier one built; change VERSION or a package set and the next
run builds a new set. A build works in `NAME.partial/` and `NAME.img.partial`,
and the image appears only by an atomic rename when complete, so an
interrupted run leaves no half-built image: its leftovers are deleted and the
image rebuilt. A lock file keeps two processes from building at once.
Downloaded packages are kept in `<VERSION>/debs/` and shared by the builds
(the file systems are still made separately); `NAME.json` records how long its
build took.

Use `build_images()` (-> list of image paths) from tests and benchmarks, or run
`python -m bench.images [NAME...]`. Without Debian's mirror (or without root,
debootstrap or mkfs.ext4) it raises `ImagesUnavailable` with one line saying
why; run as a script it prints that line and exits 1.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from tests.harness.tinyguest import CACHE_DIR as GUEST_CACHE_DIR

VERSION = "bookworm-minbase-v1"
CACHE_DIR = GUEST_CACHE_DIR.parent / "images" / VERSION  # beside the test guest's kernel
MIRROR = "http://deb.debian.org/debian"
SUITE = "bookworm"
IMAGE_SIZE = "1G"
# name -> packages added to minbase. Built (and returned) in this order.
IMAGES: dict[str, tuple[str, ...]] = {
    "minbase": (),
    "server": ("python3", "openssh-server", "curl"),
    "web": ("nginx", "git"),
}


class ImagesUnavailable(Exception):
    """The images cannot be built here; the message is one line saying why."""


def _check_tools() -> None:
    for tool, package in (("debootstrap", "debootstrap"), ("mkfs.ext4", "e2fsprogs")):
        if shutil.which(tool) is None:
            raise ImagesUnavailable(f"building the Debian test images needs {tool}: apt-get install {package}")
    url = f"{MIRROR}/dists/{SUITE}/Release"
    try:
        with urllib.request.urlopen(url, timeout=15) as r:
            r.read(1)
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise ImagesUnavailable(f"cannot build the Debian test images: {url} is unreachable ({reason})")


def _run(cmd: list[str], log: Path, lock_fd: int) -> None:
    with open(log, "ab") as out:
        out.write(f"$ {' '.join(cmd)}\n".encode())
        out.flush()
        # The child holds the lock too: if we die, a rerun waits for an orphaned debootstrap before cleaning up.
        rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, pass_fds=(lock_fd,)).returncode
    if rc:
        tail = [line for line in log.read_text(errors="replace").splitlines() if line.strip()][-1:]
        raise ImagesUnavailable(f"{cmd[0]} failed (exit {rc}): {tail[0] if tail else 'no output'} (log: {log})")


def _build_one(name: str, packages: tuple[str, ...], lock_fd: int) -> None:
    rootfs = CACHE_DIR / f"{name}.partial"
    partial = CACHE_DIR / f"{name}.img.partial"
    log = CACHE_DIR / f"{name}.log"
    debs = CACHE_DIR / "debs"
    debs.mkdir(exist_ok=True)
    log.unlink(missing_ok=True)
    start = time.monotonic()
    cmd = ["debootstrap", "--variant=minbase", f"--cache-dir={debs}"]
    if packages:
        cmd.append("--include=" + ",".join(packages))
    _run([*cmd, SUITE, str(rootfs), MIRROR], log, lock_fd)
    bootstrapped = time.monotonic()
    _run(["mkfs.ext4", "-q", "-F", "-d", str(rootfs), str(partial), IMAGE_SIZE], log, lock_fd)
    os.replace(partial, CACHE_DIR / f"{name}.img")
    _remove_rootfs(rootfs)
    end = time.monotonic()
    record = {"packages": list(packages), "debootstrap_s": round(bootstrapped - start, 1), "mkfs_s": round(end - bootstrapped, 1)}
    (CACHE_DIR / f"{name}.json").write_text(json.dumps(record) + "\n")


def _remove_rootfs(rootfs: Path) -> None:
    """Delete a scratch root filesystem, first unmounting what a killed debootstrap left mounted in it.

    debootstrap mounts proc and sys in the target (and in containers binds host
    devices): deleting through a mount would delete the host's files.
    """
    prefix = f"{rootfs}/"

    def mounts() -> list[str]:
        with open("/proc/self/mountinfo") as f:
            return sorted((p for p in (line.split()[4] for line in f) if p.startswith(prefix)), key=len, reverse=True)

    for point in mounts():
        subprocess.run(["umount", "-l", point], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    left = mounts()
    if left:
        raise ImagesUnavailable(f"{left[0]} is still mounted: unmount it, then rerun")
    shutil.rmtree(rootfs)


def _clear_partials() -> None:
    """Remove what an interrupted build left behind (only our own `.partial` names)."""
    for p in CACHE_DIR.glob("*.partial"):
        if p.is_dir() and not p.is_symlink():
            _remove_rootfs(p)
        else:
            p.unlink()


def build_images(names: Sequence[str] | None = None) -> list[Path]:
    """The raw ext4 images named (default: all of IMAGES, in order), building the missing ones first."""
    names = list(IMAGES) if names is None else list(names)
    unknown = [n for n in names if n not in IMAGES]
    if unknown:
        raise ValueError(f"unknown image {unknown[0]!r}; choose from {', '.join(IMAGES)}")
    paths = [CACHE_DIR / f"{n}.img" for n in names]
    if all(p.is_file() for p in paths):
        return paths
    if os.geteuid() != 0:  # before the cache directory is touched: a user could not write there either
        raise ImagesUnavailable("building the Debian test images needs root (debootstrap)")
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with open(CACHE_DIR / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another process is building them: wait, then reuse what it built
            print(f"images: waiting for another process building {CACHE_DIR}", file=sys.stderr)
            fcntl.flock(lock, fcntl.LOCK_EX)
        missing = [n for n, p in zip(names, paths, strict=True) if not p.is_file()]
        if missing:
            _check_tools()
            _clear_partials()
            for name in missing:
                _build_one(name, IMAGES[name], lock.fileno())
    return paths


def main(argv: list[str]) -> int:
    try:
        for path in build_images(argv or None):
            print(path)
    except (ImagesUnavailable, ValueError) as e:
        print(f"images: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("images: interrupted; the next run deletes the partial build and starts it again", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
