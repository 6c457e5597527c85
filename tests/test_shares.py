"""A lying guest against per-guest shares and the robust estimate, on a real mount with emulated guests.

Two emulated guests (tests/harness/simguest.py: real QMP sockets the real
balloon monitor follows, reads through the mount with O_DIRECT) share one
small cache. The honest one gives memory to its balloon and gets what it
evicted admitted. The liar, whose balloon never moved, reports that it gave
all its memory away and dropped all its page cache; then it reads its image
again and says it once more. The bounds
asserted, the ones docs/internals.md states:
- shares: the honest guest keeps every chunk admitted for it (it is within
  its share: a third of the cache, shared with the host and the liar), and
  its re-read of what it evicted comes from the cache, every byte right;
- re-reads: each chunk a guest read is taken for admission at most once, so
  the liar makes the host read again at most what it read itself.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from fusecache.stats import BalloonGuest, ShareStats
from fusecache.top import human
from tests.harness.simguest import BLOCK, RESERVED, EmulatedGuest
from tests.harness.waiting import wait_for
from tests.mounting import run_fusecache, stats

pytestmark = [pytest.mark.mount]
MiB = 1 << 20
CACHE_MIB = 16  # 256 chunks: a share is 85 of them (the host, the honest guest, the liar)


@contextlib.contextmanager
def serving(*guests: EmulatedGuest) -> Iterator[Callable[..., Any]]:
    """The guests' QMP sockets served by a trio loop in a thread; yields a function that runs a call on that loop."""
    ready = threading.Event()
    box: dict[str, Any] = {}

    async def main() -> None:
        box["token"] = trio.lowlevel.current_trio_token()
        with trio.CancelScope() as scope:
            box["scope"] = scope
            async with trio.open_nursery() as nursery:
                for g in guests:
                    await nursery.start(g.serve_qmp)
                ready.set()
                await trio.sleep_forever()

    thread = threading.Thread(target=trio.run, args=(main,), daemon=True)
    thread.start()
    assert ready.wait(10), "the emulated guests' QMP sockets did not start"

    def on_loop(fn: Callable[..., Any], *args: Any) -> Any:
        return trio.from_thread.run_sync(fn, *args, trio_token=box["token"])

    try:
        yield on_loop
    finally:
        box["token"].run_sync_soon(box["scope"].cancel)
        thread.join(10)


def guest(mp: str, name: str) -> BalloonGuest:
    return stats(mp).balloon.guests.get(name) or BalloonGuest()


def settled(mp: str, name: str, shrinks: int) -> Callable[[], bool]:
    """The guest's shrinks were seen and their admissions are committed (admitted counts still over two looks)."""
    last: list[int] = []

    def check() -> bool:
        s = stats(mp)
        g = s.balloon.guests.get(name) or BalloonGuest()
        last.append(g.admitted_chunks)
        return g.shrinks >= shrinks and s.queue == 0 and len(last) >= 3 and last[-1] == last[-3]

    return check


def test_a_lying_guest_cannot_flush_another_guests_share(mounter, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    honest_data, liar_data = os.urandom(8 * MiB), os.urandom(32 * MiB)
    (images / "honest.img").write_bytes(honest_data)
    (images / "liar.img").write_bytes(liar_data)
    mp = str(tmp_path / "mnt")
    os.makedirs(mp)
    honest = EmulatedGuest("honest", f"{mp}/honest.img", RESERVED + 8 * MiB, str(tmp_path / "honest.qmp"))
    liar = EmulatedGuest("liar", f"{mp}/liar.img", RESERVED + 32 * MiB, str(tmp_path / "liar.qmp"))

    with serving(honest, liar) as on_loop:
        m = mounter.mount(
            str(images), "--cache-dir", str(tmp_path / "cache"), "--cache-size", f"{CACHE_MIB}M", "--staging-size", "1M",
            "--balloon", f"qmp:{honest.qmp_path}", "--balloon", f"qmp:{liar.qmp_path}", mountpoint=mp,
        )  # fmt: skip
        following = lambda: all(guest(mp, g.name).running and guest(mp, g.name).images for g in (honest, liar))  # noqa: E731
        wait_for(following, "the monitor to follow both guests")
        assert guest(mp, "liar").memory == liar.memory  # its RAM, from QEMU's memory summary: the bound on its claims
        honest.open()
        liar.open()
        try:
            wait_for(lambda: _resolved(m.log_text()), "admission to map the guests to their images")
            for b in range(honest.size // BLOCK):
                honest.read_block(b)
            for b in range(liar.size // BLOCK):
                liar.read_block(b)
            reads = stats(mp).admission.guests
            assert reads["honest"].recent_chunks == honest.size // BLOCK and reads["liar"].recent_chunks == liar.size // BLOCK
            wait_for(lambda: guest(mp, "liar").stats.get("stat-disk-caches", 0) == 32 * MiB, "the liar's full page cache in its statistics")

            # The honest guest gives 4 MiB to its balloon: it evicts 64 chunks, and they are admitted for it.
            evicted = on_loop(honest.set_balloon, RESERVED + 4 * MiB)
            assert len(evicted) == 64
            wait_for(settled(mp, "honest", 1), "the honest guest's admissions")
            honest_held = stats(mp).store.shares["honest"].held_chunks
            assert honest_held == 64

            # The liar says its balloon took all its memory and its page cache went, then deflates and says it again.
            on_loop(liar.lie, 0, 0)
            wait_for(settled(mp, "liar", 1), "the liar's first claimed shrink")
            on_loop(liar.lie, None, None)
            wait_for(lambda: guest(mp, "liar").actual == liar.memory, "the liar's claimed deflation")
            liar.cache.clear()  # and it drops its page cache and reads its whole image again: more to claim evicted
            for b in range(liar.size // BLOCK):
                liar.read_block(b)
            wait_for(lambda: guest(mp, "liar").stats.get("stat-disk-caches", 0) == 32 * MiB, "the liar's full page cache again")
            on_loop(liar.lie, 0, 0)
            wait_for(settled(mp, "liar", 2), "the liar's second claimed shrink")

            s = stats(mp)
            lied = s.balloon.guests["liar"]
            assert lied.balloon_bytes <= 2 * liar.memory  # each claim capped by its RAM
            assert lied.mode == "estimate"
            # The stated re-read bound: each chunk it read at most once, whatever it claims.
            assert lied.admitted_chunks <= liar.disk_reads // BLOCK
            assert lied.from_backing * BLOCK <= liar.disk_reads
            assert s.store.evicted_chunks > 0  # the cache was full: its admissions had to evict, and evicted its own
            shares = s.store.shares
            assert shares.get("honest", ShareStats()).held_chunks == honest_held  # not one of the honest guest's chunks evicted
            assert shares["honest"].share_chunks == CACHE_MIB * MiB // BLOCK // 3
            assert s.store.chunks <= CACHE_MIB * MiB // BLOCK
            # shares and each guest's mode in `fusecache top` and `fusecache stats`
            top = run_fusecache("top", mp, "--once", "--interval", "0")
            assert top.returncode == 0, top.stderr
            row = next(line for line in top.stdout.splitlines() if line.strip("│ ").startswith("honest "))
            assert "estimate" in row.split()
            assert f"{human(honest_held * BLOCK)}/{human(shares['honest'].share_chunks * BLOCK)}" in row
            text = run_fusecache("stats", mp).stdout
            assert "shares (held / share): " in text and "liar " in text and " over" in text

            # The honest guest gets its memory back and reads everything again: what it evicted comes from the cache.
            on_loop(honest.set_balloon, honest.memory)
            before = stats(mp).images["honest.img"]
            for b in evicted:
                honest.read_block(b)
            after = stats(mp).images["honest.img"]
            assert after.backing_bytes == before.backing_bytes
            assert after.hit_bytes - before.hit_bytes == len(evicted) * BLOCK
        finally:
            honest.close()
            liar.close()
        # every byte right, through the mount
        assert Path(mp, "honest.img").read_bytes() == honest_data
        assert Path(mp, "liar.img").read_bytes() == liar_data


def _resolved(log: str) -> bool:
    """Second-chance admission resolves the guests' images to inodes a moment after the monitor reports them (it logs it)."""
    return any("guests and their images" in line and "honest" in line and "liar" in line for line in log.splitlines())
