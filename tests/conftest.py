"""Fixtures shared by every tier of the test suite."""

from __future__ import annotations

import logging
import os

import pytest

from tests.guest import guest_build, libvirtd  # noqa: F401 - fixtures for every test module
from tests.mounting import Mounter
from tests.nfs_server import nfs_server  # noqa: F401 - a fixture


def pytest_configure(config: pytest.Config) -> None:
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        raise pytest.UsageError("the fusecache tests mount real filesystems: run them as root on a machine with /dev/fuse")


@pytest.fixture
def mounter(tmp_path):
    """Mounts the real `fusecache` command; everything it mounted is unmounted afterwards, pass or fail."""
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
    server = request.getfixturevalue("nfs_server")
    return NfsImages(server, int(request.param[-1]), f"{request.node.name}".replace("[", "-").replace("]", "")[:80])
