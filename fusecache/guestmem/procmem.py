"""Reading another process's memory with process_vm_readv(2), batched through numpy iovec arrays.

Owns: the one system call the guest-memory scan is built on, and what its
failures mean. The remote side is a numpy array of (address, length) pairs;
the local side is one contiguous numpy buffer the kernel fills in order, so
one call reads up to IOV_MAX pieces of the other process. ctypes releases the
GIL around the call, so a scan in a worker thread leaves the trio loop free.
A failure is a `ProcMemError` carrying why (the process is gone, no
permission, the range is no longer mapped); callers turn it into a typed
result, never a traceback.
"""

from __future__ import annotations

import ctypes
import errno
import os

import numpy as np

IOV_MAX = 1024  # the kernel's limit on iovecs per side of one call (UIO_MAXIOV)

_libc = ctypes.CDLL(None, use_errno=True)
_process_vm_readv = _libc.process_vm_readv
_process_vm_readv.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
_process_vm_readv.restype = ctypes.c_ssize_t


class ProcMemError(OSError):
    """process_vm_readv failed; errno says why (ESRCH: gone, EPERM: no permission, EFAULT: not mapped)."""


def read_scattered(pid: int, remote: np.ndarray, out: np.ndarray) -> None:
    """Fill `out` (contiguous, writable) with the pieces of process `pid` that `remote` names, in order.

    `remote` is a uint64 array of shape (n, 2): (address, length) per piece,
    with the lengths summing to out.nbytes. Raises ProcMemError if any piece
    cannot be read (a short read means the range was unmapped under us).
    """
    if remote.dtype != np.uint64 or remote.ndim != 2 or remote.shape[1] != 2 or not remote.flags.c_contiguous:
        raise ValueError("remote must be a C-contiguous uint64 array of shape (n, 2)")
    if not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError("out must be a contiguous writable array")
    local = np.empty(2, dtype=np.uint64)
    lengths = remote[:, 1]
    done = 0
    for first in range(0, len(remote), IOV_MAX):
        batch = remote[first : first + IOV_MAX]
        want = int(lengths[first : first + IOV_MAX].sum())
        local[0] = out.ctypes.data + done
        local[1] = want
        got = _process_vm_readv(pid, local.ctypes.data, 1, batch.ctypes.data, len(batch), 0)
        if got < 0:
            err = ctypes.get_errno()
            raise ProcMemError(err, f"process_vm_readv of process {pid}: {os.strerror(err)}")
        if got != want:
            raise ProcMemError(errno.EFAULT, f"process_vm_readv of process {pid}: short read ({got} of {want} bytes): range unmapped")
        done += want
    if done != out.nbytes:
        raise ValueError(f"remote pieces sum to {done} bytes, out holds {out.nbytes}")
