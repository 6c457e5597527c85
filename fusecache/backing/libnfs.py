"""The libnfs 4.0 binding: ctypes prototypes, structs, the one callback every answer comes to, and
`Attr` from libnfs's stat. Loaded on first use; bound to libnfs 4.0's soname on purpose (see
`_load_libnfs`). Only `nfs.py` uses it."""

from __future__ import annotations

import ctypes
import errno
import itertools
from collections.abc import Callable
from typing import Any

from fusecache.backing import Attr
from fusecache.errors import QuietError


class _Stat64(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_uint64)
        for name in (
            "dev", "ino", "mode", "nlink", "uid", "gid", "rdev", "size", "blksize", "blocks",
            "atime", "mtime", "ctime", "atime_nsec", "mtime_nsec", "ctime_nsec", "used",
        )
    ]  # fmt: skip


class _StatVfs64(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_uint64)
        for name in ("bsize", "frsize", "blocks", "bfree", "bavail", "files", "ffree", "favail", "fsid", "flag", "namemax")
    ]


class _DirEnt(ctypes.Structure):
    # Only the leading fields are read; the struct is always libnfs-allocated.
    _fields_ = [("next", ctypes.c_void_p), ("name", ctypes.c_char_p)]


class _Url(ctypes.Structure):
    _fields_ = [("server", ctypes.c_char_p), ("path", ctypes.c_char_p), ("file", ctypes.c_char_p)]


class _TimeVal(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long)]


def _load_libnfs() -> ctypes.CDLL:
    # Bound to libnfs 4.0's soname on purpose: libnfs 5 (libnfs.so.16) swapped
    # nfs_pread/nfs_pwrite's arguments, which these prototypes would misread.
    try:
        lib = ctypes.CDLL("libnfs.so.13")
    except OSError:
        raise QuietError("libnfs 4.0 (libnfs.so.13) is not installed: apt-get install libnfs13, or mount the export and give its path")
    P, Int, U64, S = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint64, ctypes.c_char_p
    sigs: dict[str, tuple[Any, list[Any]]] = {
        "nfs_init_context": (P, []),
        "nfs_destroy_context": (None, [P]),
        "nfs_get_error": (S, [P]),
        "nfs_set_timeout": (None, [P, Int]),
        "nfs4_set_client_name": (None, [P, S]),
        "nfs_set_dircache": (None, [P, Int]),
        "nfs_parse_url_dir": (ctypes.POINTER(_Url), [P, S]),
        "nfs_destroy_url": (None, [ctypes.POINTER(_Url)]),
        "nfs_mount_async": (Int, [P, S, S, _NfsCb, P]),
        "nfs_free_nfsfh": (None, [P]),
        "nfs_readdir": (ctypes.POINTER(_DirEnt), [P, P]),
        "nfs_closedir": (None, [P, P]),
        "nfs_get_fd": (Int, [P]),
        "nfs_which_events": (Int, [P]),
        "nfs_service": (Int, [P, Int]),
        "nfs_queue_length": (Int, [P]),
    }
    for name, (res, args) in sigs.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    # Calls that never block: made with the GIL held (a thread that gave it up
    # would wait to get it back once per call, on a machine whose loop wants it).
    held = ctypes.PyDLL("libnfs.so.13")
    asyncs: dict[str, list[Any]] = {
        "nfs_lstat64_async": [P, S],
        "nfs_stat64_async": [P, S],
        "nfs_fstat64_async": [P, P],
        "nfs_statvfs64_async": [P, S],
        "nfs_open_async": [P, S, Int],
        "nfs_create_async": [P, S, Int, Int],
        "nfs_close_async": [P, P],
        "nfs_pread_async": [P, P, U64, U64],
        "nfs_pwrite_async": [P, P, U64, U64, P],
        "nfs_fsync_async": [P, P],
        "nfs_ftruncate_async": [P, P, U64],
        "nfs_truncate_async": [P, S, U64],
        "nfs_chmod_async": [P, S, Int],
        "nfs_fchmod_async": [P, P, Int],
        "nfs_lchown_async": [P, S, Int, Int],
        "nfs_lutimes_async": [P, S, ctypes.POINTER(_TimeVal)],
        "nfs_mkdir2_async": [P, S, Int],
        "nfs_rmdir_async": [P, S],
        "nfs_unlink_async": [P, S],
        "nfs_rename_async": [P, S, S],
        "nfs_symlink_async": [P, S, S],
        "nfs_readlink_async": [P, S],
        "nfs_link_async": [P, S, S],
        "nfs_mknod_async": [P, S, Int, Int],
        "nfs_opendir_async": [P, S],
    }
    for name, args in asyncs.items():
        fn = getattr(held, name)
        fn.restype, fn.argtypes = Int, [*args, _NfsCb, P]
    # nfs_service reads answers: a worker thread calls `lib`'s (it gives the GIL up while it reads one of up to
    # 1 MiB); the loop calls this one (`NfsBacking.pread_on_loop`: answers of at most 256 KiB, the GIL kept)
    for name in ("nfs_get_fd", "nfs_which_events", "nfs_queue_length", "nfs_service"):
        fn = getattr(held, name)
        fn.restype, fn.argtypes = sigs[name]
    global _held
    _held = held
    return lib


_lib: ctypes.CDLL | None = None
_held: ctypes.PyDLL | None = None
# Every call that reaches the server is made through libnfs's _async form and
# waited for by its caller (NfsBacking._run), never through libnfs's blocking
# forms: those keep the slot their answer goes to in their own C stack frame,
# and one that returns early on a failed connection leaves its request queued
# and pointing there. Freeing that connection later "cancels" the request by
# writing into the dead frame: a crash, or a word of another call's stack
# changed. An async request carries only a token, and every answer comes to
# the one callback below, which drops tokens that nobody waits for any more.
_tokens = itertools.count(1)
_NfsCb = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)


class Reply:
    """One async call's answer: `status` (>= 0, or -errno) and `msg` on failure; `into(data, status)` keeps its result."""

    __slots__ = ("done", "into", "msg", "status")

    def __init__(self, into: Callable[[int, int], None] | None = None) -> None:
        self.done = False
        self.status = 0
        self.msg = ""
        self.into = into


_replies: dict[int, Reply] = {}


@_NfsCb
def _on_reply(status: int, nfs: int | None, data: int | None, private: int | None) -> None:
    reply = _replies.get(private or 0)
    if reply is None:
        return  # its caller has given up (or a failed connection is being freed)
    try:
        if status < 0:
            reply.msg = ctypes.string_at(data).decode(errors="replace") if data else ""
        elif reply.into is not None and data:
            reply.into(data, status)
    except Exception as e:  # never let an exception out into C
        status, reply.msg = -errno.EIO, f"reading the answer failed: {e}"
    reply.status = status
    reply.done = True




def _nfs() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        _lib = _load_libnfs()
    return _lib


def _nfs_held() -> ctypes.PyDLL:
    """libnfs's calls that never block, made without giving up the GIL (the _async ones but nfs_mount_async)."""
    _nfs()
    assert _held is not None
    return _held


def _attr(st: _Stat64) -> Attr:
    return Attr(
        ino=st.ino,
        mode=st.mode,
        nlink=st.nlink,
        uid=st.uid,
        gid=st.gid,
        size=st.size,
        rdev=st.rdev,
        # From bytes used, in 512-byte units like st_blocks: libnfs's own
        # blocks field counts 512-byte units for v3 but 4 KiB ones for v4.
        blocks=(st.used + 511) // 512,
        atime_ns=st.atime * 1_000_000_000 + st.atime_nsec,
        mtime_ns=st.mtime * 1_000_000_000 + st.mtime_nsec,
        ctime_ns=st.ctime * 1_000_000_000 + st.ctime_nsec,
    )
