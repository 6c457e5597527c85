"""Prometheus metrics: the control socket's counters in Prometheus' text format (being written)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import trio


async def serve(
    address: tuple[str, int], stats: Callable[[], Awaitable[dict[str, Any]]], task_status: Any = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve /metrics on `address` until cancelled; `stats()` gives the same dict as `fusecache stats --json`."""
    raise NotImplementedError("metrics are being written")
