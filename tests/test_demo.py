"""`make demo` is the first thing a new user runs: run it as CI would (no terminal) and read its summary."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.mounting import is_mounted

pytestmark = [pytest.mark.mount, pytest.mark.guest]

REPO = Path(__file__).resolve().parent.parent  # `make demo` runs `python -m examples.demo` from here


def test_the_demo_runs_and_its_summary_shows_the_cache_working():
    proc = subprocess.run([sys.executable, "-m", "examples.demo"], capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "Traceback" not in out + proc.stderr
    for vm in ("vm1", "vm2"):
        hit = re.search(rf"{vm} on host1 .* then (\d+) MiB from the cache", out)
        assert hit and int(hit.group(1)) > 0, out
    peer = re.search(r"vm3 on host2 .*: (\d+) MiB from host1's cache", out)
    assert peer and int(peer.group(1)) > 0, out
    real = re.search(r"vm0, a real QEMU guest .* its re-read: (\d+) MiB from the cache, (\d+) MiB from the backing; checksums (\w+)", out)
    assert real and int(real.group(1)) > 0 and real.group(3) == "right", out
    work = re.search(r"making sample images in (\S+)/images", out)
    assert work and not any(is_mounted(f"{work.group(1)}/host{i}") for i in (1, 2))
