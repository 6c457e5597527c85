"""Eviction: which held chunk the store gives up next when an admission needs room (S3-FIFO by default, or LRU).

An eviction order holds loc keys. `touch` runs on the loop thread on every
hit, everything else on the writer thread; one lock makes them safe and is
held only for a few dict operations. `Shares` (what the store holds) takes no
lock on a hit at all: a touch is one append to a bounded deque, applied to the
orders by the writer thread before it picks a victim or persists the order. `evict_one(weigh)` removes and returns a
victim; weigh(key) is -1 when a peer holds the chunk's pages (cheap to lose),
+1 when its pages are mostly shared with other chunks (valuable: spared
once), else 0. bench/eviction.py compares the two on a skewed trace.

`Shares` puts per-owner shares over either order: every chunk is tagged
with the owner it was admitted for (a guest's name, or the host), each owner
has an order of its own, and a victim is taken from the owner furthest over
its share, so an owner over its share evicts its own chunks first and no
owner can flush another's chunks below that one's share.
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

HOST = "(host)"  # the owner of chunks admitted for no guest (reads of images no guest has open, `fusecache admit`)
UNOWNED = "(earlier run)"  # chunks reloaded at open: who admitted them is not persisted; they have no share


class Shares:
    """Per-owner shares of the cache over one eviction order per owner (S3-FIFO or LRU).

    Share sizing: `capacity_chunks` (the cache's size in chunks) split equally
    among the owners seen: the host, every owner holding chunks, and every
    owner of the batch being made room for. Equal, not weighted by guest RAM:
    a share is what protects a tenant from the others, and a guest's RAM is
    not the cache it is owed. A share counts chunks (64 KiB each, whatever
    their holes or dedup). Shares only matter when the cache is full: an owner
    may hold more than its share while there is room.

    Charging: a chunk is charged to the owner it was first admitted for; a
    later admission of the same chunk for another guest (a shared base image,
    dedup) leaves the charge where it is. Owners live in memory only: chunks
    reloaded at open belong to `UNOWNED`, which has no share and so goes first.

    Victims (`evict_one`): `expect(incoming)` says how many chunks each owner
    is about to admit; the victim's owner is the one with the highest
    (held + incoming) / share among those holding chunks (`UNOWNED` first),
    and that owner's own order picks the chunk. So an owner over its share
    evicts its own chunks first; another owner loses chunks only while it is
    itself the furthest over its share.
    """

    # Hits not yet applied to the orders. A hit only appends here (atomic, no lock: the hit path is the
    # loop's hottest code); the writer applies them before any change to the orders (so a hit counts
    # against the orders as they were when it happened: a pinned chunk's hits do not follow it out of its
    # pin), before it picks a victim and before it lists the order. Bounded: past it the oldest touches
    # are lost, which costs recency, never a byte.
    TOUCHES_PENDING = 1 << 16

    def __init__(self, make: Callable[[], Eviction], capacity_chunks: int) -> None:
        self.name = make().name
        self._make = make
        self.capacity_chunks = max(1, capacity_chunks)
        self._lock = threading.Lock()
        self._orders: dict[str, Eviction] = {}
        self._owner: dict[Key, str] = {}
        self._incoming: dict[str, int] = {}
        self._touched: collections.deque[Key] = collections.deque(maxlen=self.TOUCHES_PENDING)

    def __len__(self) -> int:
        return len(self._owner)

    def __contains__(self, key: Key) -> bool:
        return key in self._owner

    def touch(self, key: Key) -> None:
        """A hit (loop thread): recorded, applied by the writer (`apply_touches`)."""
        self._touched.append(key)

    def apply_touches(self) -> None:
        """Apply the hits recorded since the last call to the owners' orders (writer thread)."""
        touched = self._touched
        while touched:
            try:
                key = touched.popleft()
            except IndexError:
                return
            order = self._orders.get(self._owner.get(key, ""))
            if order is not None:
                order.touch(key)

    def insert(self, key: Key, owner: str | None = None) -> None:
        self.apply_touches()  # hits made before this change apply to the orders as they were then
        owner = owner or HOST
        with self._lock:
            held_by = self._owner.get(key)
            if held_by is not None and held_by != UNOWNED:
                owner = held_by  # charged to whoever admitted it first
            elif held_by == UNOWNED:
                self._orders[UNOWNED].remove(key)
            self._owner[key] = owner
            order = self._orders.get(owner)
            if order is None:
                order = self._orders[owner] = self._make()
        order.insert(key)

    def remove(self, key: Key) -> None:
        self.apply_touches()
        with self._lock:
            owner = self._owner.pop(key, None)
            order = self._orders.get(owner) if owner is not None else None
        if order is not None:
            order.remove(key)

    def expect(self, incoming: dict[str, int]) -> None:
        """The chunks each owner is about to admit (writer thread, before `evict_one`)."""
        self._incoming = dict(incoming)

    def share(self) -> int:
        """Chunks each owner is owed now."""
        with self._lock:
            return self._share()

    def _share(self) -> int:
        return max(1, self.capacity_chunks // len(self._owners_seen()))

    def _owners_seen(self) -> set[str]:
        seen = {HOST, *self._incoming}
        seen.update(o for o, order in self._orders.items() if len(order))
        seen.discard(UNOWNED)
        return seen

    def held(self) -> dict[str, int]:
        """Chunks held per owner (owners holding none left out)."""
        with self._lock:
            return {o: len(order) for o, order in sorted(self._orders.items()) if len(order)}

    def _victim_owner(self) -> str | None:
        share = self._share()
        best, best_over = None, -1.0
        for owner, order in self._orders.items():
            n = len(order)
            if not n:
                continue
            if owner == UNOWNED:
                return owner
            over = (n + self._incoming.get(owner, 0)) / share
            if over > best_over:
                best, best_over = owner, over
        return best

    def evict_one(self, weigh: Callable[[Key], int]) -> Key | None:
        self.apply_touches()
        while True:
            with self._lock:
                owner = self._victim_owner()
                if owner is None:
                    return None
                order = self._orders[owner]
            key = order.evict_one(weigh)
            if key is None:
                continue  # emptied meanwhile (a drop): pick again
            with self._lock:
                self._owner.pop(key, None)
            return key

    def load(self, keys: Iterable[Key]) -> None:
        """Reloaded chunks: owner unknown (`UNOWNED`)."""
        order = self._make()
        order.load(keys)
        self._touched.clear()
        with self._lock:
            self._orders = {UNOWNED: order}
            self._owner = dict.fromkeys(order.order(), UNOWNED)
            self._incoming = {}

    def order(self) -> list[Key]:
        """Every key, the owners' orders one after another (all reload as `UNOWNED`)."""
        self.apply_touches()
        with self._lock:
            orders = list(self._orders.values())
        return [k for order in orders for k in order.order()]
