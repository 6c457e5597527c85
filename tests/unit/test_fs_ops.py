"""The Operations class called directly, without mounting: errno translation and the inode table."""

from __future__ import annotations

import errno
import os
import types

import pyfuse3
import pytest
import trio

from fusecache.backing import OffLoop
from fusecache.backing.local import LocalBacking
from fusecache.cache import Passthrough
from fusecache.errors import QuietError
from fusecache.fs import FuseOperations
from fusecache.inodes import InodeTable

CTX = types.SimpleNamespace(uid=0, gid=0, pid=os.getpid(), umask=0o022)


@pytest.fixture
def ops(tmp_path):
    backing = OffLoop(LocalBacking(str(tmp_path)))
    return FuseOperations(backing, Passthrough(backing), InodeTable(os.lstat(tmp_path).st_ino))


def run(fn, *args):
    return trio.run(fn, *args)


def test_lookup_returns_backing_inode_and_root_maps_to_root_inode(ops, tmp_path):
    (tmp_path / "a").write_bytes(b"x")
    e = run(ops.lookup, pyfuse3.ROOT_INODE, b"a", CTX)
    assert e.st_ino == os.lstat(tmp_path / "a").st_ino
    assert run(ops.getattr, pyfuse3.ROOT_INODE, CTX).st_ino == pyfuse3.ROOT_INODE


def test_missing_name_is_enoent(ops):
    with pytest.raises(pyfuse3.FUSEError) as e:
        run(ops.lookup, pyfuse3.ROOT_INODE, b"nope", CTX)
    assert e.value.errno == errno.ENOENT


def test_create_write_read_release(ops, tmp_path):
    async def go():
        fi, e = await ops.create(pyfuse3.ROOT_INODE, b"img", 0o644, os.O_RDWR, CTX)
        assert await ops.write(fi.fh, 0, b"hello world") == 11
        assert await ops.read(fi.fh, 6, 100) == b"world"
        await ops.release(fi.fh)
        return e

    e = run(go)
    assert (tmp_path / "img").read_bytes() == b"hello world"
    assert e.st_ino == os.lstat(tmp_path / "img").st_ino
    assert ops.open_files() == 0


def test_o_direct_is_not_passed_to_the_backing(ops, tmp_path):
    (tmp_path / "d").write_bytes(b"abc" * 100)

    async def go():
        e = await ops.lookup(pyfuse3.ROOT_INODE, b"d", CTX)
        fi = await ops.open(e.st_ino, os.O_RDONLY | os.O_DIRECT, CTX)
        data = await ops.read(fi.fh, 1, 5)  # unaligned: would be EINVAL with O_DIRECT on the backing
        await ops.release(fi.fh)
        return data

    assert run(go) == b"bcabc"


def test_rename_moves_subtree_in_inode_table(ops, tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_bytes(b"1")

    async def go():
        d = await ops.lookup(pyfuse3.ROOT_INODE, b"d", CTX)
        f = await ops.lookup(d.st_ino, b"f", CTX)
        await ops.rename(pyfuse3.ROOT_INODE, b"d", pyfuse3.ROOT_INODE, b"e", 0, CTX)
        return ops.inodes.path(f.st_ino)

    assert run(go) == "e/f"
    assert (tmp_path / "e" / "f").exists()


def test_rename_noreplace_and_exchange(ops, tmp_path):
    (tmp_path / "a").write_bytes(b"A")
    (tmp_path / "b").write_bytes(b"B")

    async def go():
        a = await ops.lookup(pyfuse3.ROOT_INODE, b"a", CTX)
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.rename(pyfuse3.ROOT_INODE, b"a", pyfuse3.ROOT_INODE, b"b", pyfuse3.RENAME_NOREPLACE, CTX)
        assert e.value.errno == errno.EEXIST
        await ops.rename(pyfuse3.ROOT_INODE, b"a", pyfuse3.ROOT_INODE, b"b", pyfuse3.RENAME_EXCHANGE, CTX)
        return ops.inodes.path(a.st_ino)

    assert run(go) == "b"
    assert (tmp_path / "b").read_bytes() == b"A"
    assert (tmp_path / "a").read_bytes() == b"B"


def test_unlinked_open_file_keeps_working(ops, tmp_path):
    (tmp_path / "f").write_bytes(b"data")

    async def go():
        e = await ops.lookup(pyfuse3.ROOT_INODE, b"f", CTX)
        fi = await ops.open(e.st_ino, os.O_RDWR, CTX)
        await ops.unlink(pyfuse3.ROOT_INODE, b"f", CTX)
        await ops.write(fi.fh, 4, b"more")
        attr = await ops.getattr(e.st_ino, CTX)
        data = await ops.read(fi.fh, 0, 100)
        await ops.release(fi.fh)
        with pytest.raises(pyfuse3.FUSEError):
            await ops.getattr(e.st_ino, CTX)
        return attr.st_size, data

    assert run(go) == (8, b"datamore")


def test_forget_drops_inode_after_last_lookup(ops, tmp_path):
    (tmp_path / "f").write_bytes(b"")

    async def go():
        e = await ops.lookup(pyfuse3.ROOT_INODE, b"f", CTX)
        await ops.lookup(pyfuse3.ROOT_INODE, b"f", CTX)
        await ops.forget([(e.st_ino, 1)])
        still = ops.inodes.path(e.st_ino)
        await ops.forget([(e.st_ino, 1)])
        return still, ops.inodes.path(e.st_ino)

    assert run(go) == ("f", None)


def test_xattrs_roundtrip_and_missing_is_enodata(ops, tmp_path):
    (tmp_path / "f").write_bytes(b"")

    async def go():
        e = await ops.lookup(pyfuse3.ROOT_INODE, b"f", CTX)
        await ops.setxattr(e.st_ino, b"user.label", b"v1", CTX)
        names = await ops.listxattr(e.st_ino, CTX)
        value = await ops.getxattr(e.st_ino, b"user.label", CTX)
        with pytest.raises(pyfuse3.FUSEError) as err:
            await ops.getxattr(e.st_ino, b"user.none", CTX)
        return names, value, err.value.errno

    names, value, code = run(go)
    assert b"user.label" in names and value == b"v1" and code == errno.ENODATA


def test_files_created_for_a_user_belong_to_that_user(ops, tmp_path):
    """A daemon running as root hands what it creates to the caller; any other daemon cannot, and owns it itself."""
    ctx = types.SimpleNamespace(uid=1234, gid=2345, pid=1, umask=0o022)
    owner = (1234, 2345) if os.geteuid() == 0 else (os.geteuid(), os.getegid())

    async def go():
        fi, _ = await ops.create(pyfuse3.ROOT_INODE, b"u", 0o600, os.O_WRONLY, ctx)
        await ops.release(fi.fh)
        await ops.mkdir(pyfuse3.ROOT_INODE, b"dir", 0o755, ctx)

    run(go)
    for name in ("u", "dir"):
        st = os.lstat(tmp_path / name)
        assert (st.st_uid, st.st_gid) == owner


def test_backing_errors_become_errno_and_are_logged(ops, tmp_path, caplog, expect_log):
    expect_log("No space left")
    (tmp_path / "f").write_bytes(b"")

    class Full:
        def __getattr__(self, name):
            return getattr(LocalBacking(str(tmp_path)), name)

        def pwrite(self, fh, data, offset):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    backing = OffLoop(Full())
    ops2 = FuseOperations(backing, Passthrough(backing), InodeTable(os.lstat(tmp_path).st_ino))

    async def go():
        e = await ops2.lookup(pyfuse3.ROOT_INODE, b"f", CTX)
        fi = await ops2.open(e.st_ino, os.O_WRONLY, CTX)
        try:
            await ops2.write(fi.fh, 0, b"x")
        finally:
            await ops2.release(fi.fh)

    with pytest.raises(pyfuse3.FUSEError) as err:
        run(go)
    assert err.value.errno == errno.ENOSPC
    assert any("f: No space left on device" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_bad_backing_is_one_line(tmp_path, kind):
    path = tmp_path / "x"
    if kind == "file":
        path.write_bytes(b"")
    with pytest.raises(QuietError) as e:
        LocalBacking.from_path(str(path))
    assert "\n" not in e.value.message and str(path) in e.value.message
