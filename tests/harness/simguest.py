"""An emulated guest, for the demo and the benchmarks: what a VM does to fusecache, without booting one.

It has what matters to a hypervisor cache: a page cache (an LRU of 64 KiB
blocks, as big as its memory allows) over its disk image, read through the
fusecache mount with O_DIRECT like QEMU with cache=none; a balloon that, when
inflated, takes memory away and so makes the page cache evict its oldest
blocks; and a QMP socket that answers the balloon monitor the way QEMU does
(`query-balloon`, `guest-stats` with `stat-disk-caches`, `query-block`,
`query-memory-size-summary`, BALLOON_CHANGE events), so the real monitor and
second-chance path run. A guest can lie, as a hostile tenant's could: set
`claim_actual` and `claim_disk_caches` and it reports those instead of the
truth (both numbers come from the guest's balloon driver in a real VM).
Real guests under QEMU are in tests/harness/tinyguest.py; this one boots in no time.
"""

from __future__ import annotations

import collections
import contextlib
import json
import mmap
import os
import random
import socket
import time
from typing import Any

import trio

BLOCK = 65536
RESERVED = 16 << 20  # memory the emulated kernel and programs keep: not page cache


class EmulatedGuest:
    def __init__(self, name: str, image: str, memory: int, qmp_path: str) -> None:
        self.name = name
        self.image = image
        self.memory = memory
        self.actual = memory
        self.qmp_path = qmp_path
        self.cache: collections.OrderedDict[int, None] = collections.OrderedDict()
        self.disk_reads = 0  # bytes the guest had to read from its disk (the mount)
        self.guest_hits = 0  # bytes served by its own page cache
        self._events: list[trio.MemorySendChannel[dict[str, Any]]] = []
        self._fd = -1
        self._buf = mmap.mmap(-1, BLOCK)  # page-aligned, as O_DIRECT needs
        self.size = 0
        self.claim_actual: int | None = None  # a lying guest's balloon 'actual', reported instead of the truth
        self.claim_disk_caches: int | None = None  # and its stat-disk-caches

    @property
    def cache_capacity(self) -> int:
        return max(0, (self.actual - RESERVED) // BLOCK)

    def open(self) -> None:
        self._fd = os.open(self.image, os.O_RDONLY | os.O_DIRECT)
        self.size = os.fstat(self._fd).st_size

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    # ---- the workload ----------------------------------------------------------
    def read_block(self, block: int) -> None:
        if block in self.cache:
            self.cache.move_to_end(block)
            self.guest_hits += BLOCK
            return
        n = os.preadv(self._fd, [self._buf], block * BLOCK)
        self.disk_reads += n
        self.cache[block] = None
        self._shrink_cache()

    def zipf_blocks(self, count: int, seed: int, skew: float = 1.1) -> list[int]:
        """Block numbers drawn from a Zipf-like distribution over the image (a few hot blocks, a long tail)."""
        nblocks = self.size // BLOCK
        rng = random.Random(seed)
        ranks = list(range(nblocks))
        rng.shuffle(ranks)  # hot blocks scattered over the image, not at its start
        weights = [1 / (i + 1) ** skew for i in range(nblocks)]
        return [ranks[i] for i in rng.choices(range(nblocks), weights=weights, k=count)]

    def _shrink_cache(self) -> list[int]:
        evicted = []
        while len(self.cache) > self.cache_capacity:
            evicted.append(self.cache.popitem(last=False)[0])
        return evicted

    # ---- the balloon ---------------------------------------------------------------
    def set_balloon(self, actual: int) -> list[int]:
        """The host moved the balloon: the guest now has `actual` bytes and evicts what no longer fits.

        Returns the blocks its page cache evicted, oldest first (the benchmarks' exact view of it).
        """
        self.actual = actual
        evicted = self._shrink_cache()
        self._balloon_event()
        return evicted

    def lie(self, actual: int | None, disk_caches: int | None) -> None:
        """From now on report these (None: the truth) to the host, as a guest's driver can; nothing else changes."""
        self.claim_actual, self.claim_disk_caches = actual, disk_caches
        self._balloon_event()

    @property
    def reported_actual(self) -> int:
        return self.actual if self.claim_actual is None else self.claim_actual

    def _balloon_event(self) -> None:
        for ch in list(self._events):
            with contextlib.suppress(trio.WouldBlock, trio.BrokenResourceError):
                ch.send_nowait({"event": "BALLOON_CHANGE", "data": {"actual": self.reported_actual}, "timestamp": _stamp()})

    def guest_stats(self) -> dict[str, int]:
        cached = len(self.cache) * BLOCK
        if self.claim_disk_caches is not None:
            cached = self.claim_disk_caches
        return {
            "stat-disk-caches": cached,
            "stat-total-memory": self.actual,
            "stat-free-memory": max(0, self.actual - RESERVED - cached),
            "stat-available-memory": max(0, self.actual - RESERVED),
        }

    # ---- QMP -----------------------------------------------------------------------
    async def serve_qmp(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.qmp_path)
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.bind(self.qmp_path)
        os.chmod(self.qmp_path, 0o600)
        sock.listen(4)
        task_status.started()
        await trio.serve_listeners(self._session, [trio.SocketListener(sock)])

    async def _session(self, stream: trio.SocketStream) -> None:
        send, receive = trio.open_memory_channel[dict[str, Any]](64)
        self._events.append(send)
        lock = trio.Lock()  # events and replies share the stream: one message at a time

        async def reply(obj: dict[str, Any]) -> None:
            async with lock:
                await stream.send_all(_line(obj))

        try:
            async with stream, trio.open_nursery() as nursery:
                await reply({"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}}, "capabilities": []}})

                async def events() -> None:
                    async for ev in receive:
                        await reply(ev)

                nursery.start_soon(events)
                buf = b""
                while True:
                    data = await stream.receive_some(65536)
                    if not data:
                        break
                    buf += data
                    while b"\n" in buf:
                        line, buf = buf.split(b"\n", 1)
                        if line.strip():
                            await reply(self._answer(json.loads(line)))
                nursery.cancel_scope.cancel()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self._events.remove(send)

    def _answer(self, req: dict[str, Any]) -> dict[str, Any]:
        cmd, args = req.get("execute"), req.get("arguments", {})
        out: dict[str, Any] = {"id": req["id"]} if "id" in req else {}
        if cmd == "qom-list":
            result: Any = [{"name": "balloon0", "type": "child<virtio-balloon-pci>"}] if args.get("path") == "/machine/peripheral" else []
        elif cmd == "qom-get" and args.get("property") == "guest-stats":
            result = {"stats": self.guest_stats(), "last-update": int(time.time())}
        elif cmd == "qom-get":
            result = 1
        elif cmd == "query-balloon":
            result = {"actual": self.reported_actual}
        elif cmd == "query-memory-size-summary":
            result = {"base-memory": self.memory}
        elif cmd == "query-name":
            result = {"name": self.name}
        elif cmd == "query-block":
            result = [{"device": "virtio0", "inserted": {"image": {"filename": self.image, "format": "raw"}}}]
        elif cmd in ("qmp_capabilities", "qom-set"):
            result = {}
        else:
            return {**out, "error": {"class": "CommandNotFound", "desc": f"The command {cmd} has not been found"}}
        return {**out, "return": result}


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj).encode() + b"\r\n"


def _stamp() -> dict[str, int]:
    t = time.time()
    return {"seconds": int(t), "microseconds": int((t % 1) * 1e6)}
