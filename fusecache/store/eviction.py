"""Eviction: which held chunk the store gives up next when an admission needs room (S3-FIFO by default, or LRU).

An eviction order holds loc keys. `touch` runs on the loop thread on every
hit, everything else on the writer thread; one lock makes them safe and is
held only for a few dict operations. `evict_one(weigh)` removes and returns a
victim; weigh(key) is -1 when a peer holds the chunk's pages (cheap to lose),
+1 when its pages are mostly shared with other chunks (valuable: spared
once), else 0. bench/eviction.py compares the two on a skewed trace.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Hashable, Iterable
from typing import Protocol

Key = Hashable  # the store's keys are packed loc keys (bytes); bench/eviction.py uses ints


class Eviction(Protocol):
    """What the store asks of an eviction order."""

    name: str

    def __len__(self) -> int: ...
    def __contains__(self, key: Key) -> bool: ...
    def touch(self, key: Key) -> None:
        """A hit (loop thread)."""

    def insert(self, key: Key) -> None:
        """An admission."""

    def remove(self, key: Key) -> None:
        """A drop: the chunk is gone."""

    def evict_one(self, weigh: Callable[[Key], int]) -> Key | None:
        """Remove and return the next victim; None when empty."""

    def load(self, keys: Iterable[Key]) -> None:
        """Forget everything, then hold `keys` (victim first): a reopened cache, or one rebuilt after a failed write."""

    def order(self) -> list[Key]:
        """Every key, victim first (persisted across a clean restart)."""


class LruEviction:
    """Least recently used first."""

    name = "lru"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._order: collections.OrderedDict[Key, None] = collections.OrderedDict()
        self._spared: set[Key] = set()

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, key: Key) -> bool:
        return key in self._order

    def touch(self, key: Key) -> None:
        with self._lock:
            if key in self._order:
                self._order.move_to_end(key)

    def insert(self, key: Key) -> None:
        with self._lock:
            self._order[key] = None
            self._order.move_to_end(key)

    def remove(self, key: Key) -> None:
        with self._lock:
            self._order.pop(key, None)
            self._spared.discard(key)

    def evict_one(self, weigh: Callable[[Key], int]) -> Key | None:
        while True:
            with self._lock:
                if not self._order:
                    return None
                key, _ = self._order.popitem(last=False)
            if key not in self._spared and weigh(key) > 0:
                with self._lock:
                    self._spared.add(key)
                    self._order[key] = None
                continue
            self._spared.discard(key)
            return key

    def load(self, keys: Iterable[Key]) -> None:
        with self._lock:
            self._order = collections.OrderedDict.fromkeys(keys)
            self._spared = set()

    def order(self) -> list[Key]:
        with self._lock:
            return list(self._order)


class S3FifoEviction:
    """S3-FIFO (Yang et al., SOSP 2023): scan-resistant with FIFO queues only.

    New chunks enter a small FIFO (10%); those hit while there move to the
    main FIFO, the rest leave at once and are remembered in a ghost FIFO, so a
    chunk that comes back soon goes straight to main. A large sequential scan
    thus washes through the small queue without flushing the hot set. Main is
    a CLOCK: a chunk hit since its last pass gets another lap.
    """

    name = "s3fifo"
    SMALL_FRACTION = 0.1
    MAX_FREQ = 3

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._small: collections.OrderedDict[Key, None] = collections.OrderedDict()
        self._main: collections.OrderedDict[Key, None] = collections.OrderedDict()
        self._ghost: collections.OrderedDict[Key, None] = collections.OrderedDict()
        self._freq: dict[Key, int] = {}
        self._spared: set[Key] = set()

    def __len__(self) -> int:
        return len(self._freq)

    def __contains__(self, key: Key) -> bool:
        return key in self._freq

    def touch(self, key: Key) -> None:
        with self._lock:
            f = self._freq.get(key)
            if f is not None and f < self.MAX_FREQ:
                self._freq[key] = f + 1

    def insert(self, key: Key) -> None:
        with self._lock:
            if key in self._freq:
                if self._freq[key] < self.MAX_FREQ:
                    self._freq[key] += 1
                return
            self._freq[key] = 0
            if key in self._ghost:  # evicted from small recently: it is not one-hit
                del self._ghost[key]
                self._main[key] = None
            else:
                self._small[key] = None

    def load(self, keys: Iterable[Key]) -> None:
        """All in the main queue: what survived a restart is not new."""
        with self._lock:
            self._main = collections.OrderedDict.fromkeys(keys)
            self._freq = dict.fromkeys(self._main, 0)
            self._small = collections.OrderedDict()
            self._ghost = collections.OrderedDict()
            self._spared = set()

    def remove(self, key: Key) -> None:
        with self._lock:
            if self._freq.pop(key, None) is not None:
                self._small.pop(key, None)
                self._main.pop(key, None)
            self._spared.discard(key)

    def evict_one(self, weigh: Callable[[Key], int]) -> Key | None:
        while True:
            with self._lock:
                if not self._freq:
                    return None
                from_small = bool(self._small) and (len(self._small) >= self.SMALL_FRACTION * len(self._freq) or not self._main)
                if from_small:
                    key, _ = self._small.popitem(last=False)
                    if self._freq[key] > 0:
                        self._freq[key] = 0
                        self._main[key] = None
                        continue
                    del self._freq[key]
                    self._ghost[key] = None
                    while len(self._ghost) > max(len(self._main), 1):
                        self._ghost.popitem(last=False)
                    self._spared.discard(key)
                    return key
                key, _ = self._main.popitem(last=False)
                freq = self._freq[key]
            w = weigh(key)
            with self._lock:
                if w >= 0 and freq > 0:
                    self._freq[key] = freq - 1
                    self._main[key] = None
                    continue
                if w > 0 and key not in self._spared:
                    self._spared.add(key)
                    self._main[key] = None
                    continue
                del self._freq[key]
                self._spared.discard(key)
                return key

    def order(self) -> list[Key]:
        """Small then main (all reload into main)."""
        with self._lock:
            return [*self._small, *self._main]


class EvictFirst:
    """Chunks some guest still holds in its own page cache (a scan of its memory found them): a hint.

    The host copy of such a chunk is the one least needed (true exclusivity:
    host memory holds what guests do not), so when the store needs room these
    go before the eviction order's victims. Bounded; the loop adds, the writer
    takes (deque appends and pops are atomic). A stale hint (the guest dropped
    the chunk since) costs that chunk's second chance, never a wrong byte.
    """

    def __init__(self, limit: int = 1 << 16) -> None:
        self._keys: collections.deque[Key] = collections.deque(maxlen=limit)

    def add(self, keys: Iterable[Key]) -> None:
        self._keys.extend(keys)

    def take(self) -> Key | None:
        try:
            return self._keys.popleft()
        except IndexError:
            return None

    def __len__(self) -> int:
        return len(self._keys)


EVICTIONS: dict[str, type[LruEviction] | type[S3FifoEviction]] = {"s3fifo": S3FifoEviction, "lru": LruEviction}
