"""Fixtures shared by every tier of the test suite."""

from __future__ import annotations

import logging
import os

import pytest

from tests.guest import guest_build, libvirtd  # noqa: F401 - fixtures for every test module
from tests.mounting import Mounter


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


@pytest.fixture(params=["dir"])
def images(request, tmp_path):
    """The image store under test; every cache test runs once per kind of backing."""
    root = tmp_path / "images"
    root.mkdir()
    return LocalImages(str(root))
