"""Tests for the balloon monitor (fusecache.balloon) and its QMP client (fusecache.qmp).

Without a guest: source spec validation, the shrink arithmetic on scripted
polls, and the QMP client against a scripted QMP server (concurrent replies
matched by id, errors, timeouts, events, a server that goes away).

With a real guest (QEMU TCG, `-m guest`): the guest fills its page cache
from a 256 MiB file, the host inflates the balloon, and the monitor's
Shrink is compared with what the guest's /proc/meminfo says it dropped; a
guest killed under the monitor is logged and followed again when it comes
back. With libvirt (`-m libvirt`): the same through a private libvirtd and
`virsh setmem`.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from fusecache.balloon import (
    STATS_WAIT,
    BalloonMonitor,
    LibvirtSource,
    QmpSource,
    Shrink,
    _block_images,
    _ShrinkTracker,
    _xml_images,
    parse_source,
)
from fusecache.errors import QuietError
from fusecache.qmp import QmpClosed, QmpError, QmpTimeout, open_qmp
from tests.guest import CommandChannel, Guest, GuestBuild, Libvirtd, domain_xml, make_disk

MiB = 1 << 20
FILE_MIB = 256
GUEST_MIB = 512
BALLOON_MIB = 170  # about a third of the guest


# -- source specs


@pytest.mark.parametrize("spec", ["", "qmp:", "qmp:/run/dir/", "libvirt:", "/run/vm1.qmp", "xen:///system", "QMP:/x", "lib virt"])
def test_bad_source_spec_is_one_clear_line(spec: str) -> None:
    with pytest.raises(QuietError) as info:
        parse_source(spec)
    msg = str(info.value)
    assert "\n" not in msg
    assert repr(spec) in msg
    assert "qmp:/path/to/qmp.sock" in msg and "libvirt:URI" in msg


def test_good_source_specs() -> None:
    assert parse_source("qmp:/run/vm1.qmp") == QmpSource("/run/vm1.qmp")
    assert parse_source("libvirt") == LibvirtSource(None)
    assert parse_source("libvirt:qemu:///system") == LibvirtSource("qemu:///system")
    assert parse_source("qemu+ssh://host/system") == LibvirtSource("qemu+ssh://host/system")


def test_monitor_rejects_bad_spec() -> None:
    with pytest.raises(QuietError):
        BalloonMonitor(["qmp:/ok.sock", "nonsense"], lambda s: None, lambda g: None)


# -- which images a guest has open


def test_images_follow_backing_chains() -> None:
    devices = [
        {"device": "cd0"},  # an empty drive
        {
            "device": "vda",
            "inserted": {
                "image": {
                    "filename": "/mnt/fc/vm1.qcow2",
                    "backing-image": {"filename": 'json:{"driver": "raw", "file": {"driver": "file", "filename": "/mnt/fc/base.raw"}}'},
                }
            },
        },
        {"device": "vdb", "inserted": {"image": {"filename": "nbd://server/export"}}},
    ]
    assert _block_images(devices) == ["/mnt/fc/vm1.qcow2", "/mnt/fc/base.raw"]
    xml = """<domain><devices>
      <disk type='file'><source file='/mnt/fc/vm1.qcow2'/>
        <backingStore type='file'><source file='/mnt/fc/base.qcow2'/><backingStore/></backingStore></disk>
      <disk type='block'><source dev='/dev/vg/data'/></disk>
      <disk type='network'><source protocol='nbd' name='x'/></disk>
      <disk type='file' device='cdrom'/>
    </devices></domain>"""
    assert _xml_images(xml) == ["/mnt/fc/vm1.qcow2", "/mnt/fc/base.qcow2", "/dev/vg/data"]


# -- shrink arithmetic, on scripted polls (times are fake)


def test_tracker_reports_cache_drop_once_stats_are_fresh() -> None:
    t = _ShrinkTracker(512 * MiB, 300 * MiB)
    assert t.update(512 * MiB, 310 * MiB, stamp=10, now=0) is None  # baseline follows the guest
    assert t.update(400 * MiB, 310 * MiB, stamp=11, now=1) is None  # inflating
    assert t.update(170 * MiB, 250 * MiB, stamp=12, now=2) is None  # still moving
    assert t.update(170 * MiB, 250 * MiB, stamp=12, now=3) is None  # still, but no sample since it stopped
    assert t.update(170 * MiB, 120 * MiB, stamp=13, now=4) is None  # a sample, but the guest may still be reclaiming
    assert t.update(170 * MiB, 100 * MiB, stamp=14, now=5) is None  # it was
    assert t.update(170 * MiB, 100 * MiB, stamp=14, now=5.5) is None  # no new sample
    assert t.update(170 * MiB, 100 * MiB, stamp=15, now=6)[:3] == (342 * MiB, 210 * MiB, 310 * MiB)  # two samples agree
    assert t.update(170 * MiB, 100 * MiB, stamp=16, now=7) is None  # reported once


def test_tracker_bounds_a_lying_guest_by_what_the_host_checks() -> None:
    """actual and stat-disk-caches come from the guest: a shrink is capped by its RAM and by the host's target."""
    # Over QMP (no target): a guest claiming 8 GiB of actual and then none gave up at most its 512 MiB of RAM.
    t = _ShrinkTracker(8 << 30, 8 << 30, memory=512 * MiB, now=0)
    t.update(0, 0, stamp=None, now=1)
    assert t.update(0, 0, stamp=None, now=1 + STATS_WAIT)[:3] == (512 * MiB, 512 * MiB, 512 * MiB)
    # With libvirt's target: the host asked for 384 MiB; a guest claiming to have given everything gave 128 MiB.
    t = _ShrinkTracker(512 * MiB, 400 * MiB, memory=512 * MiB, now=0)
    t.update(0, 0, stamp=None, now=1, target=384 * MiB)
    assert t.update(0, 0, stamp=None, now=1 + STATS_WAIT, target=384 * MiB)[:3] == (128 * MiB, 128 * MiB, 400 * MiB)
    # A balloon the host never asked to move (target unchanged) is no shrink at all.
    t = _ShrinkTracker(512 * MiB, 400 * MiB, memory=512 * MiB, now=0)
    t.update(0, 0, stamp=None, now=1, target=512 * MiB)
    assert t.update(0, 0, stamp=None, now=1 + STATS_WAIT, target=512 * MiB) is None


def test_tracker_says_when_the_cache_figure_was_reported() -> None:
    t = _ShrinkTracker(512 * MiB, 300 * MiB, now=0)
    t.update(512 * MiB, 310 * MiB, stamp=None, now=7)  # the last report before the balloon moved, seen at 7
    t.update(256 * MiB, 310 * MiB, stamp=None, now=8)
    assert t.update(256 * MiB, 200 * MiB, stamp=None, now=8 + STATS_WAIT) == (256 * MiB, 110 * MiB, 310 * MiB, 7)


def test_tracker_clamps_and_falls_back() -> None:
    t = _ShrinkTracker(512 * MiB, 400 * MiB)
    t.update(412 * MiB, 400 * MiB, stamp=1, now=0)
    t.update(412 * MiB, 50 * MiB, stamp=2, now=1)
    # The cache fell by more than the balloon took: only the balloon's part counts.
    assert t.update(412 * MiB, 50 * MiB, stamp=3, now=2)[:3] == (100 * MiB, 100 * MiB, 400 * MiB)
    # Statistics that stop coming: after STATS_WAIT the last fresh sample is used.
    t = _ShrinkTracker(512 * MiB, 300 * MiB)
    t.update(256 * MiB, 300 * MiB, stamp=1, now=0)
    assert t.update(256 * MiB, 200 * MiB, stamp=2, now=1) is None
    assert t.update(256 * MiB, 200 * MiB, stamp=2, now=STATS_WAIT)[:3] == (256 * MiB, 100 * MiB, 300 * MiB)
    # A guest without statistics: after STATS_WAIT the balloon delta is the estimate.
    t = _ShrinkTracker(512 * MiB, None)
    t.update(256 * MiB, None, stamp=None, now=0)
    assert t.update(256 * MiB, None, stamp=None, now=1) is None
    assert t.update(256 * MiB, None, stamp=None, now=STATS_WAIT)[:3] == (256 * MiB, 256 * MiB, None)
    # Deflating, or inflating and deflating back, is no shrink.
    t = _ShrinkTracker(256 * MiB, 10 * MiB)
    assert t.update(512 * MiB, 10 * MiB, stamp=1, now=0) is None
    t.update(400 * MiB, 10 * MiB, stamp=2, now=1)
    t.update(512 * MiB, 10 * MiB, stamp=3, now=2)
    assert t.update(512 * MiB, 10 * MiB, stamp=4, now=3) is None


# -- the QMP client against a scripted server


async def _scripted_qemu(path: str, greet: bool, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Serve one QMP connection: 'slow' is answered only after 'fast', 'never' never, 'bye' hangs up."""
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await listener.bind(path)
    listener.listen()
    task_status.started()
    conn, _ = await listener.accept()
    listener.close()
    async with trio.SocketStream(conn) as stream:
        if not greet:
            await trio.sleep_forever()

        async def send(msg: dict[str, Any]) -> None:
            await stream.send_all(json.dumps(msg).encode() + b"\n")

        await send({"QMP": {"version": {}, "capabilities": []}})
        buf, held = b"", None
        while True:
            chunk = await stream.receive_some(4096)
            if not chunk:
                return
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                msg = json.loads(line)
                cmd, mid = msg["execute"], msg["id"]
                if cmd == "slow":
                    held = mid
                elif cmd == "fast":
                    await send({"return": {"fast": 1}, "id": mid})
                    await send({"return": {"slow": 1}, "id": held})
                elif cmd == "bad":
                    await send({"error": {"class": "GenericError", "desc": "no such thing"}, "id": mid})
                elif cmd == "emit":
                    await send({"event": "BALLOON_CHANGE", "data": {"actual": 42}, "timestamp": {}})
                    await send({"return": {}, "id": mid})
                elif cmd == "bye":
                    return
                elif cmd != "never":
                    await send({"return": {}, "id": mid})


def test_qmp_client(tmp_path: Path) -> None:
    path = str(tmp_path / "qmp.sock")

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(_scripted_qemu, path, True)
            async with open_qmp(path, connect_timeout=5) as qmp:
                results: dict[str, Any] = {}

                async def run(cmd: str) -> None:
                    results[cmd] = await qmp.execute(cmd)

                async with trio.open_nursery() as inner:
                    inner.start_soon(run, "slow")
                    await trio.sleep(0.1)  # 'slow' goes out first
                    inner.start_soon(run, "fast")
                assert results == {"slow": {"slow": 1}, "fast": {"fast": 1}}

                with pytest.raises(QmpError, match="no such thing") as err:
                    await qmp.execute("bad")
                assert err.value.error_class == "GenericError"

                with pytest.raises(QmpTimeout):
                    await qmp.execute("never", timeout=0.2)

                await qmp.execute("emit")
                event = qmp.events.receive_nowait()
                assert event["event"] == "BALLOON_CHANGE" and event["data"]["actual"] == 42

                with pytest.raises(QmpClosed):
                    await qmp.execute("bye")
                with pytest.raises(QmpClosed):
                    await qmp.execute("query-status")
                assert [e async for e in qmp.events] == []  # the event stream ends with the connection

    trio.run(main)


def test_qmp_connect_timeout(tmp_path: Path) -> None:
    path = str(tmp_path / "qmp.sock")

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(_scripted_qemu, path, False)
            with pytest.raises(QmpTimeout):
                async with open_qmp(path, connect_timeout=0.3):
                    pass
            nursery.cancel_scope.cancel()
        with pytest.raises(OSError):
            async with open_qmp(str(tmp_path / "missing.sock")):
                pass

    trio.run(main)


# -- a real guest under QEMU TCG


@pytest.fixture(scope="module")
def disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_disk(tmp_path_factory.mktemp("disk") / "disk.img", {"f": FILE_MIB * MiB})


@pytest.fixture
def guest(guest_build: GuestBuild, disk: Path, tmp_path: Path) -> Iterator[Guest]:
    with Guest(tmp_path / "guest", guest_build) as g:
        g.start(disk, memory_mib=GUEST_MIB)
        yield g


async def _until(cond: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll cond until it is true; fail naming what was awaited. A bound on waiting, not a timing assertion."""
    with trio.move_on_after(timeout):
        while not (value := cond()):
            await trio.sleep(0.2)
        return value
    pytest.fail(f"gave up waiting for {what} after {timeout} s")


async def _fill_cache(run: Callable[[str], str], monitor: BalloonMonitor, name: str) -> None:
    """Read the whole file in the guest and wait until its reported page cache shows it."""
    await trio.to_thread.run_sync(run, "md5sum /mnt/f")
    full = FILE_MIB * MiB * 9 // 10
    await _until(lambda: monitor.guests[name].stats.get("stat-disk-caches", 0) >= full, 30, "the guest's stats to show the read")


def _check_estimate(shrink: Shrink, before: dict[str, int], after: dict[str, int]) -> None:
    dropped = before["Cached"] - after["Cached"]
    print(
        f"guest Cached {before['Cached'] / MiB:.0f} -> {after['Cached'] / MiB:.0f} MiB (dropped {dropped / MiB:.0f} MiB); "
        f"balloon took {shrink.balloon_bytes / MiB:.0f} MiB; evicted_estimate {shrink.evicted_estimate / MiB:.0f} MiB"
    )
    assert dropped > 64 * MiB, "the balloon should have pushed the file out of the guest's cache"
    assert shrink.evicted_estimate > dropped // 2
    assert shrink.evicted_estimate <= 2 * shrink.balloon_bytes


@pytest.mark.guest
def test_qmp_source_reports_shrink(guest: Guest, disk: Path) -> None:
    shrinks: list[Shrink] = []
    seen: list[dict[str, Any]] = []
    monitor = BalloonMonitor([f"qmp:{guest.qmp_sock}"], shrinks.append, lambda g: seen.append(dict(g)))

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(monitor.run)
            await _until(lambda: "fc-guest" in monitor.guests, 30, "the monitor to see the guest")
            assert monitor.guests["fc-guest"].images == [str(disk)]
            assert seen and "fc-guest" in seen[-1]
            await _fill_cache(guest.check, monitor, "fc-guest")
            before = await trio.to_thread.run_sync(guest.meminfo)
            actual = await trio.to_thread.run_sync(guest.balloon, BALLOON_MIB)
            after = await trio.to_thread.run_sync(guest.meminfo)
            await _until(lambda: shrinks, 30, "a Shrink")
            shrink = shrinks[0]
            assert shrink.guest == "fc-guest" and shrink.images == [str(disk)]
            assert abs(shrink.balloon_bytes - (GUEST_MIB * MiB - actual)) <= 16 * MiB
            _check_estimate(shrink, before, after)
            snap = json.loads(json.dumps(monitor.snapshot()))
            g = snap["guests"]["fc-guest"]
            assert g["running"] and g["shrinks"] == 1
            assert g["evicted_estimate"] == shrink.evicted_estimate and g["actual"] == actual
            nursery.cancel_scope.cancel()

    trio.run(main)


@pytest.mark.guest
def test_monitor_survives_guest_death(
    guest_build: GuestBuild,
    disk: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    expect_log: Callable[..., None],
) -> None:
    expect_log("balloon: qmp:")  # each failure, logged once
    caplog.set_level(logging.INFO, logger="fusecache.balloon")
    sock = tmp_path / "vm.qmp"
    missing = tmp_path / "nowhere.qmp"
    monitor = BalloonMonitor([f"qmp:{sock}", f"qmp:{missing}"], lambda s: None, lambda g: None)
    first = Guest(tmp_path / "first", guest_build)
    second = Guest(tmp_path / "second", guest_build)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(monitor.run)
            await trio.to_thread.run_sync(lambda: first.start(disk, qmp_sock=sock))
            await _until(lambda: "fc-guest" in monitor.guests, 30, "the first guest")
            first.kill()
            await _until(lambda: "fc-guest" not in monitor.guests, 30, "the monitor to drop the dead guest")
            await trio.to_thread.run_sync(lambda: second.start(disk, qmp_sock=sock))
            await _until(lambda: "fc-guest" in monitor.guests, 60, "the monitor to find the guest again")
            assert monitor.guests["fc-guest"].images == [str(disk)]
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        first.stop()
        second.stop()
    missing_logs = [r for r in caplog.records if r.levelno == logging.WARNING and str(missing) in r.getMessage()]
    print("\n".join(r.getMessage() for r in caplog.records))
    assert len(missing_logs) == 1, "a source that keeps failing the same way is logged once"
    assert any("gone" in r.getMessage() for r in caplog.records)


# -- libvirt


@pytest.mark.guest
@pytest.mark.libvirt
def test_libvirt_source_reports_shrink(
    libvirtd: Libvirtd,
    guest_build: GuestBuild,
    disk: Path,
    tmp_path: Path,
    expect_log: Callable[..., None],
) -> None:
    expect_log("balloon: libvirt:")  # while libvirtd restarts
    name = f"fc-test-{os.getpid()}"
    work = tmp_path / "dom"
    work.mkdir()
    (work / "dom.xml").write_text(domain_xml(name, guest_build, disk, work, memory_mib=GUEST_MIB))
    shrinks: list[Shrink] = []
    present: list[bool] = []  # is the domain among the guests, at each on_guests call
    monitor = BalloonMonitor([f"libvirt:{libvirtd.uri}"], shrinks.append, lambda g: present.append(name in g))
    channel = CommandChannel(work / "cmd.sock")

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(monitor.run)
            await trio.to_thread.run_sync(libvirtd.virsh, "create", str(work / "dom.xml"))
            await trio.to_thread.run_sync(channel.connect, 10)
            await trio.to_thread.run_sync(channel.wait_ready, 60)
            await _until(lambda: name in monitor.guests, 30, "the monitor to see the domain")
            assert monitor.guests[name].images == [str(disk)]
            await _fill_cache(channel.check, monitor, name)
            before = await trio.to_thread.run_sync(channel.meminfo)
            await trio.to_thread.run_sync(libvirtd.virsh, "setmem", name, f"{BALLOON_MIB}M", "--live")
            shrink = await _until(lambda: shrinks and shrinks[0], 60, "a Shrink")
            after = await trio.to_thread.run_sync(channel.meminfo)
            assert shrink.guest == name and shrink.images == [str(disk)]
            assert monitor.guests[name].target == BALLOON_MIB * MiB
            _check_estimate(shrink, before, after)
            # libvirtd restarting: the monitor loses the connection, reconnects, and finds the domain again.
            mark = len(present)
            await trio.to_thread.run_sync(libvirtd.restart)
            await _until(lambda: False in present[mark:], 30, "the monitor to notice libvirtd went away")
            await _until(lambda: present[-1], 60, "the monitor to reconnect to libvirtd")
            await trio.to_thread.run_sync(libvirtd.virsh, "destroy", name)
            await _until(lambda: name not in monitor.guests, 30, "the monitor to drop the destroyed domain")
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        channel.close()
