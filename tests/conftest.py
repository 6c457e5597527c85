"""Fixtures shared by every tier of the test suite, and the skips that let each tier run wherever its parts are.

The unit tier (tests/unit/) needs nothing but Python and a writable temporary
directory: it runs as any user. The other tiers need real parts: tests marked
`mount` need root and /dev/fuse, `nfs` nfs-ganesha (and root, for its network
namespace), `netns` network namespaces, `guest` QEMU, `libvirt` libvirtd. A
test whose part is missing here is skipped with a line saying what is
missing, before any of its fixtures starts; the rest of the suite still runs.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import shutil

import pytest

from tests.guest import guest_build, libvirtd  # noqa: F401 - fixtures for every test module
from tests.harness.nfs_server import nfs_server  # noqa: F401 - a fixture
from tests.mounting import Mounter

PARTS = ("mount", "nfs", "netns", "guest", "libvirt")  # the markers in pyproject.toml that name a real part


def _not_root(why: str) -> str | None:
    return None if os.geteuid() == 0 else f"needs root: {why} (run `make test` as root)"


def _not_installed(*tools: str) -> str | None:
    for tool in tools:
        if shutil.which(tool) is None:
            # Debian keeps mkfs.ext4, ip, rpcbind in sbin, which is off a normal user's PATH.
            if found := next((d for d in ("/usr/sbin", "/sbin") if os.path.exists(os.path.join(d, tool))), None):
                return f"{tool} is in {found}, which is not on PATH: add {found} to PATH"
            return f"{tool} not installed (`make deps` installs it)"
    return None


@functools.cache
def missing(part: str) -> str | None:
    """Why the part a test marker names cannot run on this machine, or None when it can."""
    if part == "mount":
        if not os.path.exists("/dev/fuse"):
            return "no /dev/fuse on this machine: FUSE cannot mount here"
        return _not_root("it mounts FUSE filesystems") or _not_installed("fusermount3")
    if part == "nfs":
        return _not_root("the NFS server runs in a network namespace of its own") or _not_installed(
            "ganesha.nfsd", "rpcbind", "ip", "nsenter", "unshare"
        )
    if part == "netns":
        return _not_root("it makes network namespaces") or _not_installed("ip", "nsenter")
    if part == "guest":
        return _not_installed("qemu-system-x86_64", "mkfs.ext4", "cpio")
    if part == "libvirt":
        if importlib.util.find_spec("libvirt") is None:
            return "libvirt-python not installed (the `libvirt` extra: `make venv`)"
        return _not_root("libvirtd runs in system mode") or _not_installed("libvirtd", "virsh")
    raise ValueError(f"no such part: {part}")


def require(part: str) -> None:
    """Skip the current test, saying why, when `part` cannot run here."""
    if reason := missing(part):
        pytest.skip(f"{part}: {reason}")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Skip a test whose marked parts are missing before any of its fixtures (a server, a guest) starts."""
    for part in PARTS:
        if item.get_closest_marker(part) is not None:
            require(part)


@pytest.fixture
def mounter(tmp_path):
    """Mounts the real `fusecache` command; everything it mounted is unmounted afterwards, pass or fail."""
    require("mount")
    m = Mounter(str(tmp_path))
    try:
        yield m
    finally:
        m.cleanup()


@pytest.fixture(autouse=True)
def no_unexpected_warnings(caplog):
    """A test fails if fusecache logged a warning or error it did not expect (mark it with `expect_log`)."""
    caplog.set_level(logging.WARNING, logger="fusecache")
    yield
    allowed = getattr(caplog, "expected_patterns", ())
    bad = [
        r for r in caplog.get_records("call")
        if r.levelno >= logging.WARNING and r.name.startswith("fusecache") and not any(p in r.getMessage() for p in allowed)
    ]
    assert not bad, "unexpected log lines: " + "; ".join(f"{r.levelname} {r.name}: {r.getMessage()}" for r in bad)


@pytest.fixture
def expect_log(caplog):
    """Call with substrings of warnings this test expects fusecache to log."""

    def expect(*patterns: str) -> None:
        caplog.expected_patterns = (*getattr(caplog, "expected_patterns", ()), *patterns)

    return expect


class LocalImages:
    """A backing that is a plain directory: `spec` is what `fusecache mount` takes, `path()` writes behind its back."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.spec = root

    def path(self, name: str) -> str:
        return os.path.join(self.root, name)

    def write_behind(self, name: str, data: bytes, keep_mtime: bool = False) -> None:
        """Another host rewrites an image in place (same size), optionally putting its mtime back."""
        st = os.stat(self.path(name))
        with open(self.path(name), "r+b") as f:
            f.write(data)
        if keep_mtime:
            os.utime(self.path(name), ns=(st.st_atime_ns, st.st_mtime_ns))


class NfsImages(LocalImages):
    """A subdirectory of a real NFS export (nfs-ganesha in its own network namespace), mounted as nfs://."""

    def __init__(self, server, version: int, name: str) -> None:
        super().__init__(os.path.join(str(server.export_dir), name))
        os.makedirs(self.root)
        base = server.url(version)
        path, _, query = base.partition("?")
        self.spec = f"{path.rstrip('/')}/{name}" + (f"?{query}" if query else "")

    def write_behind(self, name: str, data: bytes, keep_mtime: bool = False) -> None:
        """Another NFS client rewrites the image: through the server, as another host would (a write
        straight into the exported directory would bypass ganesha's attribute cache and no client could see it)."""
        from fusecache.backing.nfs import NfsBacking

        client = NfsBacking.from_url(self.spec)
        try:
            before = client.lstat(name)
            h = client.open(name, os.O_RDWR)
            try:
                client.pwrite(h, data, 0)
            finally:
                client.close(h)
            if keep_mtime:
                client.utimens(name, before.atime_ns, before.mtime_ns)
        finally:
            client.shutdown()


@pytest.fixture(params=["dir", "nfs3", "nfs4"])
def images(request, tmp_path):
    """The image store under test; every cache test runs once per kind of backing: a directory, NFSv3, NFSv4."""
    if request.param == "dir":
        root = tmp_path / "images"
        root.mkdir()
        return LocalImages(str(root))
    require("nfs")
    server = request.getfixturevalue("nfs_server")
    return NfsImages(server, int(request.param[-1]), f"{request.node.name}".replace("[", "-").replace("]", "")[:80])
