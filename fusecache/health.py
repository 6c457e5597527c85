"""The cache's health: whether the store is trusted, why not, and the faults that led there.

A fusecache mount sits in every guest's I/O path and the backing is the
truth, so a fault of the cache (the store, admission, peers, the writer)
never reaches a guest: the request it hit is served from the backing, and
the fault is logged (at most one line per layer every `LOG_EVERY` seconds,
with its cause) and counted here. States:

- ``caching``: the store serves hits and takes admissions;
- ``degraded``: passthrough: reads and writes go to the backing, nothing is
  admitted, nothing is served from the store. Entered after
  `DEGRADE_AFTER` store faults (a failed read, a failed batch) with no
  successful batch between them; the reason names the last one;
- ``rebuilding``: still passthrough, while an empty store replaces the old
  one (automatically `REBUILD_AFTER` seconds after degrading, doubling up to
  `REBUILD_MAX` while rebuilds fail, or now by `fusecache recover MNT`);
  success -> ``caching``, failure -> ``degraded``.

Fault injection is for tests only: FUSECACHE_FAULTS (read once at daemon
start; a comma list of `FAULT_LAYERS`) makes those layers raise
`InjectedFault`, and its presence (even empty) enables the `faults` control
verb that changes the list. Unset, every injection point is one test of a
module-level empty frozenset.
"""

from __future__ import annotations

import logging
import os
import time

from fusecache.stats import HealthStats

log = logging.getLogger(__name__)

CACHING, DEGRADED, REBUILDING = "caching", "degraded", "rebuilding"
STATES = (CACHING, DEGRADED, REBUILDING)
FAULT_LAYERS = ("store.read", "store.apply", "admission", "peers.fetch", "writer")
STORE_LAYERS = frozenset({"store.read", "store.apply", "writer"})  # faults that count towards degrading
DEGRADE_AFTER = 5
LOG_EVERY = 10.0
REBUILD_AFTER = 60.0
REBUILD_MAX = 600.0

FAULTS_ENV = "FUSECACHE_FAULTS"
faults: frozenset[str] = frozenset()  # injected faults (tests only): empty unless FUSECACHE_FAULTS names layers


class InjectedFault(RuntimeError):
    """A fault raised on purpose by a test, at one layer."""

    def __init__(self, layer: str) -> None:
        super().__init__(f"injected fault at {layer}")
        self.layer = layer


def inject(layer: str) -> None:
    """Raise InjectedFault if a test asked for a fault at `layer` (call only behind `if faults:`)."""
    if layer in faults:
        raise InjectedFault(layer)


def faults_enabled() -> bool:
    return FAULTS_ENV in os.environ


def set_faults(layers: list[str]) -> None:
    global faults
    unknown = sorted(set(layers) - set(FAULT_LAYERS))
    if unknown:
        raise ValueError(f"unknown fault layers {', '.join(unknown)}: choose from {', '.join(FAULT_LAYERS)}")
    faults = frozenset(layers)


def load_faults_from_env() -> None:
    """At daemon start: the faults a test asked for (nothing when FUSECACHE_FAULTS is unset)."""
    raw = os.environ.get(FAULTS_ENV)
    if raw is None:
        return
    set_faults([x.strip() for x in raw.split(",") if x.strip()])
    log.warning("fault injection is on (%s=%r): a test-only setting", FAULTS_ENV, raw)


def layer_of(exc: BaseException, default: str) -> str:
    """Which layer a fault came from: an injected fault says so; else the caller's guess."""
    return exc.layer if isinstance(exc, InjectedFault) else default


class Health:
    """One mount's health: its state, the faults per layer, rate-limited logging."""

    def __init__(self) -> None:
        self.state = CACHING
        self.reason = ""
        self.since = time.time()
        self.faults: dict[str, int] = {}
        self.degradations = 0
        self.rebuilds = 0
        self.rebuild_failures = 0
        self.rebuild_delay = REBUILD_AFTER
        self._store_faults = 0  # store faults since the last good batch
        self._logged: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    @property
    def caching(self) -> bool:
        return self.state == CACHING

    def fault(self, layer: str, exc: BaseException, what: str = "served from the backing") -> None:
        """A fault at `layer`: counted, logged (rate-limited), and towards degrading if it is the store's."""
        self.faults[layer] = self.faults.get(layer, 0) + 1
        cause = f"{type(exc).__name__}: {exc}"
        now = time.monotonic()
        if now - self._logged.get(layer, -LOG_EVERY) >= LOG_EVERY:
            more = self._suppressed.pop(layer, 0)
            log.warning("cache fault at %s (%s): %s%s", layer, cause, what, f" ({more} more since the last line)" if more else "")
            self._logged[layer] = now
        else:
            self._suppressed[layer] = self._suppressed.get(layer, 0) + 1
        if layer in STORE_LAYERS and self.state == CACHING:
            self._store_faults += 1
            if self._store_faults >= DEGRADE_AFTER:
                self.degrade(f"{self._store_faults} store faults in a row, the last at {layer}: {cause}")

    def store_ok(self) -> None:
        """A batch committed: the store works."""
        self._store_faults = 0

    def degrade(self, reason: str) -> None:
        if self.state == DEGRADED:
            return
        self._set(DEGRADED, reason)
        self.degradations += 1
        log.error("cache degraded to passthrough (%s): every read and write goes to the backing until the store is rebuilt "
                  "(automatically, or now with `fusecache recover MOUNTPOINT`)", reason)

    def rebuilding(self) -> None:
        self._set(REBUILDING, f"rebuilding an empty store (was: {self.reason})")

    def rebuilt(self) -> None:
        self.rebuilds += 1
        self._store_faults = 0
        self.rebuild_delay = REBUILD_AFTER
        self._set(CACHING, "")
        log.warning("cache store rebuilt empty: caching again")

    def rebuild_failed(self, exc: BaseException) -> None:
        self.rebuild_failures += 1
        self.rebuild_delay = min(REBUILD_MAX, self.rebuild_delay * 2)
        self._set(DEGRADED, f"rebuilding the store failed: {type(exc).__name__}: {exc}")
        log.error("cache store rebuild failed (%s: %s): still passthrough, next try in %.0f s", type(exc).__name__, exc, self.rebuild_delay)

    def _set(self, state: str, reason: str) -> None:
        self.state, self.reason, self.since = state, reason, time.time()

    def stats(self) -> HealthStats:
        return HealthStats(self.state, self.reason, self.since, dict(self.faults), self.degradations, self.rebuilds, self.rebuild_failures)
