"""The boot storm benchmark's smallest case, as a test: one guest, one round trip, cold then warm, one host.

Runs `bench/bootstorm.py`'s own code: a base image of real userland files on
nfs-ganesha behind the delay proxy at 0.2 ms round trip, a qcow2 overlay on a
default fusecache mount, a TCG guest that reads the boot's files and then
md5sums them. Asserts what must hold whatever the machine's speed: the guest
read the right bytes both times (its md5sum of every file matches the
host's), and the warm boot read fewer bytes from NFS than the cold one (bytes
counted by the delay proxy, outside fusecache). No timing is asserted.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.bootstorm import NFS_PORT, Ctx, environment, run_cache
from tests.harness.delay_proxy import DelayProxy

pytestmark = [pytest.mark.mount, pytest.mark.nfs, pytest.mark.guest]


def test_warm_boot_reads_less_from_nfs_and_every_byte_is_right(guest_build, tmp_path: Path) -> None:
    with environment(tmp_path, read_mib=24, image_mib=40) as (srv, build, userland):
        assert len(userland.md5) > 10 and userland.read_bytes > 4 << 20
        ctx = Ctx(tmp_path, srv, build, userland, memory_mib=256, verify=True, cache_size="256M")
        with DelayProxy([NFS_PORT], delay_ms=0.1, netns=srv.netns) as proxy:
            cold, warm = run_cache(ctx, 0.2, 1, proxy, "second-chance")
    for r in (cold, warm):
        assert r["bad_files"] == 0, f"{r['phase']}: files read wrong in the guest: {r['bad_examples']}"
        assert r["guest_bytes"] >= userland.read_bytes  # the guest really read the boot's files from its disk
    assert cold["nfs_bytes"] >= userland.read_bytes  # a cold boot's bytes all came from NFS
    assert warm["nfs_bytes"] < cold["nfs_bytes"]
