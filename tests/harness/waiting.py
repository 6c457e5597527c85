"""Waiting for something to become true, with a bound: the one such wait the tests and benchmarks share.

A bound on a wait is not a timing assertion: it only turns "never happened"
into a failure that names what never happened, instead of a hung run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class WaitTimeout(AssertionError):
    """What was waited for never happened within the bound (an AssertionError, so pytest shows it as a failure)."""


def wait_for(cond: Callable[[], T], what: str, timeout: float = 60.0, interval: float = 0.1) -> T:
    """Call `cond` every `interval` seconds until it returns something true, and return that; give up after `timeout`."""
    deadline = time.monotonic() + timeout
    while not (value := cond()):
        if time.monotonic() >= deadline:
            raise WaitTimeout(f"gave up waiting for {what} after {timeout:g} s")
        time.sleep(interval)
    return value
