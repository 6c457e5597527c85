"""A process whose NFS calls are in flight when the server dies; it then remounts and shuts down.

Run by tests/test_nfs_backing.py (test_calls_in_flight_when_the_server_dies),
driven by lines on stdin: it prints `reading` once its reader threads are
busy, reads a line (the server is dead), waits for every reader to fail,
prints `failed`, reads a line (the server is back), reads the whole file
again (which remounts the failed connections), shuts the backing down and
prints `read DIGEST` and `cancelled N` (NfsBacking.cancelled_requests).

The reader threads get 64 MiB stacks, more than glibc keeps cached for reuse
(40 MiB), so a thread's stack is unmapped as soon as the thread ends: a write
into a finished call's frame is then a crash, not a silent change.

    python -m tests.harness.nfs_inflight URL PATH SIZE
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import sys
import threading

from fusecache.backing.nfs import NfsBacking

READERS = 6


def main() -> None:
    url, path, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
    backing = NfsBacking.from_url(url)
    fh = backing.open(path, os.O_RDWR)
    errors: list[int | None] = []

    def read() -> None:
        try:
            while True:  # 1 MiB is read in pieces on several connections at once
                backing.pread(fh, random.randrange(0, size - (1 << 20)), random.choice([4096, 65536, 1 << 20]))
        except OSError as e:
            errors.append(e.errno)

    def write() -> None:
        block = random.randbytes(1024 * 1024)
        try:
            while True:  # past the end of what is read back
                backing.pwrite(fh, block, size)
        except OSError as e:
            errors.append(e.errno)

    threading.stack_size(64 << 20)
    threads = [threading.Thread(target=read) for _ in range(READERS)] + [threading.Thread(target=write)]
    for t in threads:
        t.start()
    print("reading", flush=True)
    sys.stdin.readline()
    for t in threads:
        t.join()
    print("failed", " ".join(sorted({errno.errorcode.get(e or 0, str(e)) for e in errors})), flush=True)
    sys.stdin.readline()
    again = backing.open(path, os.O_RDONLY)
    for attempt in range(3):
        try:
            data = backing.pread(again, 0, size)
            break
        except OSError as e:  # the first call after a restart may still meet a dead connection
            if e.errno != errno.EIO or attempt == 2:
                raise
    backing.close(again)
    backing.close(fh)
    backing.shutdown()
    print("read", hashlib.sha256(data).hexdigest(), flush=True)
    print("cancelled", backing.cancelled_requests, flush=True)


if __name__ == "__main__":
    main()
