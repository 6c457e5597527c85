"""The control verbs that change what is cached: `admit` (a byte range of an image, now),
`drop` (one image's cached chunks, or every image's) and `recover` (rebuild the store empty now,
the way out of a degraded cache); with FUSECACHE_FAULTS set (tests only), `faults` too. Each
takes the control socket's request and answers with counts or the state, or refuses with a
`CommandError` naming what is wrong."""

from __future__ import annotations

import os
from typing import Any

import trio

from fusecache import health
from fusecache.backing import OffLoop
from fusecache.control import Handler
from fusecache.errors import CommandError
from fusecache.files import Files
from fusecache.store_queue import StoreQueue

ADMIT_READ = 1 << 20  # an admit command reads the backing this much at a time


class Commands:
    def __init__(self, backing: OffLoop, files: Files, queue: StoreQueue) -> None:
        self.backing = backing
        self.files = files
        self.queue = queue

    def handlers(self) -> dict[str, Handler]:
        verbs: dict[str, Handler] = {"admit": self.admit, "drop": self.drop, "recover": self.recover}
        if health.faults_enabled():
            verbs["faults"] = self.faults
        return verbs

    async def recover(self, request: dict[str, Any]) -> dict[str, Any]:
        """Rebuild the store empty now (the cache serves from the backing meanwhile); answers the state after."""
        await self.queue.rebuild()
        h = self.queue.health
        if not h.caching:
            raise CommandError(f"rebuilding the store failed: {h.reason}; the mount stays in passthrough")
        return {"state": h.state}

    async def faults(self, request: dict[str, Any]) -> dict[str, Any]:
        """Tests only (FUSECACHE_FAULTS set): which layers raise injected faults from now on."""
        layers = request.get("layers")
        if not isinstance(layers, list) or not all(isinstance(x, str) for x in layers):
            raise CommandError("faults takes layers: a list of layer names")
        try:
            health.set_faults(layers)
        except ValueError as exc:
            raise CommandError(str(exc))
        return {"layers": sorted(health.faults)}

    async def admit(self, request: dict[str, Any]) -> dict[str, Any]:
        """Admit a byte range of an image now (for external agents that know what a guest evicted)."""
        path, offset, length = request.get("image"), request.get("offset"), request.get("length")
        if not isinstance(path, str) or not isinstance(offset, int) or not isinstance(length, int) or offset < 0 or length < 0:
            raise CommandError("admit needs image (a path in the mount), offset >= 0 and length >= 0")
        files = self.files
        if not files.health.caching:
            raise CommandError(f"the cache is {files.health.state} ({files.health.reason}): nothing is admitted; "
                               "run `fusecache recover MOUNTPOINT` to rebuild it")
        sync = self.backing.sync
        try:
            handle = await self.backing.open(path, os.O_RDONLY)
        except OSError as exc:
            raise CommandError(f"cannot open {path}: {exc.strerror}")
        admitted = 0
        try:
            attr = await self.backing.fstat(handle)
            st = files.opened(path, attr)
            cs = files.chunk_size
            pos = offset // cs * cs
            end = min(offset + length, attr.size)
            while pos < end:
                n = min(ADMIT_READ, (end - pos + cs - 1) // cs * cs)
                gen, epoch = st.gen, st.epoch
                data = await self.backing.run(sync.pread, handle, pos, n)
                for i in range(0, len(data), cs):
                    if st.gen != gen or st.epoch != epoch or st.writing:
                        break
                    while not files.admit((st.ino, gen, (pos + i) // cs), data[i : i + cs], path):
                        if not files.health.caching:
                            raise CommandError(f"the cache degraded while admitting ({files.health.reason})")
                        await trio.sleep(0.01)  # the writer is behind: wait for it rather than skip
                    admitted += 1
                if len(data) < n:
                    break
                pos += n
        except OSError as exc:
            raise CommandError(f"reading {path}: {exc.strerror}")
        finally:
            await self.backing.close(handle)
        return {"image": path, "admitted_chunks": admitted}

    async def drop(self, request: dict[str, Any]) -> dict[str, Any]:
        """Forget the cached chunks of one image, or of every image."""
        path = request.get("image")
        if path is not None:
            if not isinstance(path, str):
                raise CommandError("drop takes image: a path in the mount")
            try:
                attr = await self.backing.lstat(path)
            except OSError as exc:
                raise CommandError(f"cannot find {path}: {exc.strerror}")
            self.files.unlinked(attr.ino)
            return {"dropped_files": 1}
        inos = self.files.known() | set(await self.backing.run(self.files.store.iter_files))
        for ino in inos:
            self.files.unlinked(ino)
        return {"dropped_files": len(inos)}
