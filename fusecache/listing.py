"""`fusecache ls`: per image, what this cache holds of it, what is pinned, shared with other images, and on peers.

The daemon side (`Listing.ls`, the control verb `ls`) counts from the store
in a worker thread (a scan of the image's chunks and their pages' refcounts:
too long for the loop on a large cache), then asks the peers' summaries on
the loop. Images are named by the path they were opened or pinned by in this
mount; a cached file not opened since the mount started is looked up in the
backing tree. The command side prints the table (`table_lines`) or JSON.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import trio

from fusecache.backing import OffLoop
from fusecache.errors import CommandError
from fusecache.files import Files
from fusecache.peer_reads import PeerReads
from fusecache.pins import Pins, human, walk_images
from fusecache.stats import ImageHoldings, PinStats, from_json
from fusecache.version import UNKNOWN


class Listing:
    def __init__(self, backing: OffLoop, files: Files, pins: Pins, peer_reads: PeerReads | None) -> None:
        self.backing = backing
        self.files = files
        self.pins = pins
        self.peer_reads = peer_reads

    def handlers(self) -> dict[str, Any]:
        return {"ls": self.ls}

    async def ls(self, request: dict[str, Any]) -> dict[str, Any]:
        image = request.get("image")
        if image is not None and not isinstance(image, str):
            raise CommandError("ls takes image: a path in the mount")
        files, store = self.files, self.files.store
        names = files.names()
        pinned = self.pins.paths()
        for ino, path in pinned.items():
            names.setdefault(ino, path)
        sizes: dict[int, int] = {}
        if image is not None:
            try:
                attr = await self.backing.lstat(image)
            except OSError as exc:
                raise CommandError(f"no image {image} in this mount ({exc.strerror}): give a path under the mount point")
            inos = [attr.ino]
            names[attr.ino] = image
            sizes[attr.ino] = attr.size
        else:
            inos = sorted(set(await trio.to_thread.run_sync(store.iter_files)) | files.known() | set(pinned))
            if any(i not in names for i in inos):
                for path, attr in await self.backing.run(walk_images, self.backing.sync):
                    if attr.ino in inos and attr.ino not in names:
                        names[attr.ino] = path
                        sizes[attr.ino] = attr.size
        out = []
        for ino in inos:
            st = files.get(ino)
            held = await trio.to_thread.run_sync(store.holdings, ino, st.gen)
            peer = 0
            if self.peer_reads is not None and st.version is not None and st.version != UNKNOWN:
                peers = self.peer_reads.peers
                for n, (c, nbytes) in enumerate(zip(held.chunks, held.chunk_bytes, strict=True)):
                    if peers.may_hold_location(ino, st.version, c):
                        peer += nbytes
                    if n % 1000 == 999:
                        await trio.sleep(0)
            name = names.get(ino)
            size = sizes.get(ino)
            if size is None and st.version is not None and st.version != UNKNOWN:
                size = st.version.size
            pinned_by = self.pins.covering(ino)
            if image is None and not held.chunks and pinned_by is None:
                continue  # known, nothing cached, not pinned: not worth a line
            out.append(
                ImageHoldings(
                    image=name or f"(inode {ino})", ino=ino, size=size if name else None,
                    cached_bytes=held.cached_bytes, chunks=len(held.chunks), pinned=pinned_by is not None, pinned_by=pinned_by,
                    shared_bytes=held.shared_bytes, peer_bytes=peer,
                )
            )  # fmt: skip
        out.sort(key=lambda h: h.image)
        return {"images": [dataclasses.asdict(h) for h in out], "pins": dataclasses.asdict(self.pins.stats())}


def table_lines(reply: dict[str, Any]) -> list[str]:
    """The `fusecache ls` table."""
    images = [from_json(ImageHoldings, i) for i in reply.get("images", [])]
    pins = from_json(PinStats, reply.get("pins", {}))
    if not images:
        lines = ["nothing cached or pinned yet"]
    else:
        width = max(12, *(len(h.image) for h in images))
        lines = [f"{'image':<{width}}  {'size':>10}  {'cached':>10}  {'pinned':>8}  {'shared':>10}  {'on peers':>10}"]
        for h in images:
            pinned = "-" if not h.pinned else "yes" if h.pinned_by == h.image else "chain"
            size = "-" if h.size is None else human(h.size)
            cached, shared, peers = human(h.cached_bytes), human(h.shared_bytes), human(h.peer_bytes)
            lines.append(f"{h.image:<{width}}  {size:>10}  {cached:>10}  {pinned:>8}  {shared:>10}  {peers:>10}")
        chained = sorted({h.pinned_by for h in images if h.pinned and h.pinned_by != h.image and h.pinned_by})
        if chained:
            lines.append(f"(chain: pinned as the backing file of {', '.join(chained)})")
    lines.append(f"pinned: {human(pins.allocated_bytes)} of a {human(pins.budget)} pin budget" + (
        f" ({', '.join(os.path.basename(p.image) + ('' if p.by == 'pin' else ' by ' + p.by) for p in pins.pins)})" if pins.pins else ""
    ))  # fmt: skip
    return lines
