"""Pins: images whose cached chunks eviction never takes, within a budget, and the `pin`/`unpin` verbs.

An operator pins an image (`fusecache pin MNT IMAGE`, or `--pin GLOB` at
mount) so that a golden image stays cached through a backup scan. Pinning a
qcow2 overlay pins its backing chain too (resolved with `qemu-img info
--backing-chain`, run as a subprocess on the image's path in the mount: off
the loop, and through the mount so an nfs:// backing needs nothing more).
The store keeps pinned inodes out of its eviction order and persists them
(meta `pins`), so pins survive a remount; this module decides what is pinned:
each pinned file's label records its path and the pins that cover it. The
budget: the allocated size on the backing of every pinned file, counted once,
may not exceed --pin-budget of --cache-size; a pin past it is refused.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import shutil
import stat
from typing import Any

import trio

from fusecache import mounts
from fusecache.backing import Attr, Backing, OffLoop
from fusecache.errors import CommandError, QuietError
from fusecache.stats import PinInfo, PinStats
from fusecache.store import Store
from fusecache.store_queue import StoreQueue

log = logging.getLogger(__name__)

QEMU_IMG_TIMEOUT = 60.0
MAX_WALK = 100_000  # entries a --pin glob looks at in the backing tree


def allocated(attr: Attr) -> int:
    """What a file can occupy in the cache at most: its allocated bytes (holes are not cached), at most its size."""
    return min(attr.size, attr.blocks * 512) if attr.blocks else attr.size


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class Pins:
    """What is pinned on one mount: per pinned image, its chain; per pinned inode, its path and the pins covering it."""

    def __init__(self, mountpoint: str, backing: OffLoop, store: Store, queue: StoreQueue, *, budget: int, globs: list[str]) -> None:
        self.mountpoint = mountpoint
        self.backing = backing
        self.queue = queue
        self.budget = budget
        self.globs = list(globs)
        # ino -> {"path": its path, "pins": {image: how}}; persisted as the store's labels
        self._files: dict[int, dict[str, Any]] = {}
        self._sizes: dict[int, int] = {}  # ino -> allocated bytes when pinned
        for ino, label in store.pins().items():
            try:
                rec = json.loads(label)
                self._files[ino] = {"path": str(rec["path"]), "pins": {str(k): str(v) for k, v in rec["pins"].items()}}
                self._sizes[ino] = int(rec.get("allocated", 0))
            except (ValueError, KeyError, TypeError, AttributeError):
                log.warning("a pin record in the cache is malformed: ino %d is not pinned any more", ino)

    def handlers(self) -> dict[str, Any]:
        return {"pin": self.pin, "unpin": self.unpin}

    # ---- what is pinned ------------------------------------------------------------
    def images(self) -> dict[str, PinInfo]:
        """Each pinned image (named by a pin or --pin), with its chain, overlay first."""
        out: dict[str, PinInfo] = {}
        for ino, rec in sorted(self._files.items(), key=lambda kv: kv[1]["path"]):
            for image, how in rec["pins"].items():
                info = out.setdefault(image, PinInfo(image=image, by=how))
                if rec["path"] == image:
                    info.chain.insert(0, rec["path"])
                else:
                    info.chain.append(rec["path"])
                info.allocated_bytes += self._sizes.get(ino, 0)
        return dict(sorted(out.items()))

    def paths(self) -> dict[int, str]:
        """Every pinned inode's path in the mount."""
        return {ino: rec["path"] for ino, rec in self._files.items()}

    def covering(self, ino: int) -> str | None:
        """The image whose pin covers `ino` (itself first), or None when it is not pinned."""
        rec = self._files.get(ino)
        if rec is None:
            return None
        return rec["path"] if rec["path"] in rec["pins"] else min(rec["pins"])

    def stats(self) -> PinStats:
        total = sum(self._sizes.get(i, 0) for i in self._files)
        return PinStats(budget=self.budget, allocated_bytes=total, pins=list(self.images().values()))

    def _persist(self) -> None:
        labels = {
            ino: json.dumps({"path": rec["path"], "pins": rec["pins"], "allocated": self._sizes.get(ino, 0)}, sort_keys=True)
            for ino, rec in self._files.items()
        }
        self.queue.set_pins(labels)

    # ---- the verbs -------------------------------------------------------------------
    async def pin(self, request: dict[str, Any]) -> dict[str, Any]:
        image = request.get("image")
        if not isinstance(image, str):
            raise CommandError("pin needs image: a path in the mount")
        return self._summary(await self._add(image, "pin"))

    def _summary(self, info: PinInfo) -> dict[str, Any]:
        s = self.stats()
        return {"image": info.image, "chain": info.chain, "allocated_bytes": info.allocated_bytes,
                "pinned_bytes": s.allocated_bytes, "budget": s.budget}  # fmt: skip

    async def unpin(self, request: dict[str, Any]) -> dict[str, Any]:
        image = request.get("image")
        if not isinstance(image, str):
            raise CommandError("unpin needs image: a path in the mount")
        if image not in self.images():
            raise CommandError(f"{image} is not pinned: `fusecache ls {self.mountpoint}` shows what is")
        self._remove(image)
        self._persist()
        log.info("unpinned %s", image)
        return {"image": image, "pinned_bytes": self.stats().allocated_bytes, "budget": self.budget}

    def _remove(self, image: str) -> None:
        for ino in list(self._files):
            rec = self._files[ino]
            rec["pins"].pop(image, None)
            if not rec["pins"]:
                del self._files[ino]
                self._sizes.pop(ino, None)

    async def _add(self, image: str, how: str) -> PinInfo:
        """Pin `image` and its backing chain, unless that takes the pinned total past the budget."""
        try:
            attr = await self.backing.lstat(image)
        except OSError as exc:
            raise CommandError(f"no image {image} in this mount ({exc.strerror}): give a path under the mount point")
        if not stat.S_ISREG(attr.mode):
            raise CommandError(f"{image} is not a regular file: give an image file")
        chain = [image, *[p for p in await self.backing_chain(image) if p != image]]
        attrs: dict[int, tuple[str, Attr]] = {}
        for path in chain:
            try:
                a = attr if path == image else await self.backing.lstat(path)
            except OSError as exc:
                raise CommandError(f"{image}'s backing file {path} cannot be read ({exc.strerror}): fix the chain, or pin files one by one")
            attrs.setdefault(a.ino, (path, a))
        sizes = dict(self._sizes)
        for ino, (_, a) in attrs.items():
            sizes[ino] = allocated(a)
        total = sum(sizes[i] for i in {*self._files, *attrs})
        mine = sum(allocated(a) for _, a in attrs.values())
        if total > self.budget:
            raise CommandError(
                f"pinning {image} ({human(mine)}{' with its backing chain' if len(attrs) > 1 else ''}) would pin {human(total)}, "
                f"over the pin budget of {human(self.budget)}: unpin an image, or mount with a larger --cache-size or --pin-budget"
            )
        for ino, (path, a) in attrs.items():
            rec = self._files.setdefault(ino, {"path": path, "pins": {}})
            rec["path"] = path
            if rec["pins"].get(image) != "pin":  # an explicit pin outlives the --pin that also matches it
                rec["pins"][image] = how
            self._sizes[ino] = allocated(a)
        self._persist()
        log.info("pinned %s (%s)%s", image, how, f" with {', '.join(chain[1:])}" if len(chain) > 1 else "")
        return self.images()[image]

    async def backing_chain(self, image: str) -> list[str]:
        """The image's backing files, as paths in the mount (overlay first); files outside the mount are left out."""
        qemu_img = shutil.which("qemu-img")
        if qemu_img is None:
            log.info("qemu-img is not installed: %s is pinned without its backing chain (install qemu-utils)", image)
            return [image]
        target = os.path.join(self.mountpoint, image)
        with trio.move_on_after(QEMU_IMG_TIMEOUT) as scope:
            proc = await trio.run_process(
                [qemu_img, "info", "-U", "--backing-chain", "--output=json", target], capture_stdout=True, capture_stderr=True, check=False
            )
        if scope.cancelled_caught:
            raise CommandError(f"qemu-img did not read {image}'s backing chain within {QEMU_IMG_TIMEOUT:.0f} s: see the daemon's log")
        if proc.returncode != 0:
            why = (proc.stderr.decode(errors="replace").strip().splitlines() or ["no reason given"])[-1]
            raise CommandError(f"qemu-img cannot read {image}'s backing chain: {why}")
        try:
            layers = json.loads(proc.stdout)
            names = [layer["filename"] for layer in layers]
        except (ValueError, KeyError, TypeError):
            raise CommandError(f"qemu-img gave no backing chain for {image}: pin its files one by one")
        out = []
        here = os.path.realpath(self.mountpoint)
        prev_dir = os.path.dirname(target)
        for name in names:
            full = os.path.normpath(name if os.path.isabs(name) else os.path.join(prev_dir, name))
            prev_dir = os.path.dirname(full)
            rel = os.path.relpath(full, here)
            if rel.startswith(".."):
                log.info("%s: backing file %s is outside the mount: not pinned (not cached here)", image, full)
                continue
            out.append(rel)
        return out

    # ---- --pin GLOB at mount -----------------------------------------------------------
    def check_globs(self, backing: Backing) -> list[str]:
        """At mount, before serving (inline): the images --pin matches; QuietError when they alone exceed the budget."""
        if not self.globs:
            return []
        matched: dict[str, Attr] = {}
        for path, attr in walk_images(backing):
            if any(fnmatch.fnmatchcase(path, g) for g in self.globs):
                matched[path] = attr
        sizes = {ino: self._sizes.get(ino, 0) for ino, rec in self._files.items() if self._kept(rec)}
        ours = {a.ino: allocated(a) for a in matched.values()}
        total = sum({**sizes, **ours}.values())
        if total > self.budget:
            kept = f" with what is pinned already ({human(sum(sizes.values()))})" if sizes else ""
            raise QuietError(
                f"--pin {' '.join(self.globs)} matches {len(matched)} images of {human(sum(ours.values()))}: {human(total)}{kept}, "
                f"over the pin budget of {human(self.budget)}: pin fewer images, `fusecache unpin` some, or give a larger "
                "--cache-size or --pin-budget"
            )
        return sorted(matched)

    def _kept(self, rec: dict[str, Any]) -> bool:
        """Whether a pinned file stays pinned at this mount: some pin of it is not a --pin this mount dropped."""
        wanted = {f"--pin {g}" for g in self.globs}
        return any(not how.startswith("--pin ") or how in wanted for how in rec["pins"].values())

    async def apply_globs(self, matched: list[str]) -> None:
        """Once the mount serves: drop --pin pins no longer asked for and pins of files gone, then pin what --pin matched."""
        wanted = {f"--pin {g}" for g in self.globs}
        stale = {img for img, info in self.images().items() if info.by.startswith("--pin ") and info.by not in wanted}
        for img in stale:
            self._remove(img)
        if stale:
            log.info("unpinned %s: pinned by a --pin this mount does not give", ", ".join(sorted(stale)))
        # A pinned file deleted while unmounted, its inode number reused: the pin must not pass to the newcomer.
        gone = []
        for ino, rec in list(self._files.items()):
            try:
                same = (await self.backing.lstat(rec["path"])).ino == ino
            except OSError:
                same = False
            if not same:
                gone.append(rec["path"])
                del self._files[ino]
                self._sizes.pop(ino, None)
        if gone:
            log.info("unpinned %s: not the pinned file any more (deleted or replaced)", ", ".join(sorted(gone)))
        if stale or gone:
            self._persist()
        if not matched:
            return
        while (entry := mounts.find_mount(self.mountpoint)) is None or entry.fstype != mounts.FSTYPE:
            await trio.sleep(0.05)  # qemu-img reads the chain through the mount: wait until it is there
        for path in matched:
            glob = next(g for g in self.globs if fnmatch.fnmatchcase(path, g))
            try:
                await self._add(path, f"--pin {glob}")
            except CommandError as exc:
                log.warning("--pin %s: %s", glob, exc)


def walk_images(backing: Backing) -> list[tuple[str, Attr]]:
    """Every regular file under the backing's root (at most MAX_WALK entries), as (relative path, attributes)."""
    out: list[tuple[str, Attr]] = []
    todo = [""]
    seen = 0
    while todo and seen < MAX_WALK:
        d = todo.pop()
        try:
            names = backing.listdir(d)
        except OSError:
            continue
        for name in names:
            seen += 1
            path = os.path.join(d, name) if d else name
            try:
                attr = backing.lstat(path)
            except OSError:
                continue
            if stat.S_ISDIR(attr.mode):
                todo.append(path)
            elif stat.S_ISREG(attr.mode):
                out.append((path, attr))
    return out
