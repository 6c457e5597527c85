"""The libnfs 4.0 binding: ctypes prototypes, structs, the one async-completion callback, and
`Attr` from libnfs's stat. Loaded on first use; bound to libnfs 4.0's soname on purpose (see
`_load_libnfs`). Only `nfs.py` uses it."""

from __future__ import annotations

import ctypes
import itertools
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
    PP = ctypes.POINTER(ctypes.c_void_p)
    sigs: dict[str, tuple[Any, list[Any]]] = {
        "nfs_init_context": (P, []),
        "nfs_destroy_context": (None, [P]),
        "nfs_get_error": (S, [P]),
        "nfs_set_timeout": (None, [P, Int]),
        "nfs4_set_client_name": (None, [P, S]),
        "nfs_set_dircache": (None, [P, Int]),
        "nfs_parse_url_dir": (ctypes.POINTER(_Url), [P, S]),
        "nfs_destroy_url": (None, [ctypes.POINTER(_Url)]),
        "nfs_mount": (Int, [P, S, S]),
        "nfs_lstat64": (Int, [P, S, ctypes.POINTER(_Stat64)]),
        "nfs_stat64": (Int, [P, S, ctypes.POINTER(_Stat64)]),
        "nfs_free_nfsfh": (None, [P]),
        "nfs_fstat64": (Int, [P, P, ctypes.POINTER(_Stat64)]),
        "nfs_statvfs64": (Int, [P, S, ctypes.POINTER(_StatVfs64)]),
        "nfs_open": (Int, [P, S, Int, PP]),
        "nfs_create": (Int, [P, S, Int, Int, PP]),
        "nfs_close": (Int, [P, P]),
        "nfs_pread": (Int, [P, P, U64, U64, P]),
        "nfs_pwrite": (Int, [P, P, U64, U64, P]),
        "nfs_fsync": (Int, [P, P]),
        "nfs_ftruncate": (Int, [P, P, U64]),
        "nfs_truncate": (Int, [P, S, U64]),
        "nfs_chmod": (Int, [P, S, Int]),
        "nfs_fchmod": (Int, [P, P, Int]),
        "nfs_lchown": (Int, [P, S, Int, Int]),
        "nfs_lutimes": (Int, [P, S, ctypes.POINTER(_TimeVal)]),
        "nfs_mkdir2": (Int, [P, S, Int]),
        "nfs_rmdir": (Int, [P, S]),
        "nfs_unlink": (Int, [P, S]),
        "nfs_rename": (Int, [P, S, S]),
        "nfs_symlink": (Int, [P, S, S]),
        "nfs_readlink2": (Int, [P, S, ctypes.POINTER(ctypes.c_char_p)]),
        "nfs_link": (Int, [P, S, S]),
        "nfs_mknod": (Int, [P, S, Int, Int]),
        "nfs_opendir": (Int, [P, S, PP]),
        "nfs_readdir": (ctypes.POINTER(_DirEnt), [P, P]),
        "nfs_closedir": (None, [P, P]),
        "nfs_pwrite_async": (Int, [P, P, U64, U64, P, _NfsCb, P]),
        "nfs_get_fd": (Int, [P]),
        "nfs_which_events": (Int, [P]),
        "nfs_service": (Int, [P, Int]),
    }
    for name, (res, args) in sigs.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    return lib


_lib: ctypes.CDLL | None = None
# Async calls report to one C callback for the life of the process (libnfs may
# call it until a context is destroyed): it files each status under the
# caller's token, and drops those whose caller has given up.
_async_results: dict[int, dict[int, int]] = {}
_tokens = itertools.count(1)
_NfsCb = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)


@_NfsCb
def _on_async_done(status: int, nfs: int | None, data: int | None, private: int | None) -> None:
    token, index = divmod(private or 0, 1 << 20)
    results = _async_results.get(token)
    if results is not None:
        results[index] = status


_libc = ctypes.CDLL(None)
_libc.free.argtypes = [ctypes.c_void_p]


def _nfs() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        _lib = _load_libnfs()
    return _lib


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
