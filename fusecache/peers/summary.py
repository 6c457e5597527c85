"""Bloom filters: the summaries a peer publishes of the pages and locations it holds.

This module owns the filter (sizing, hashing, membership, the wire encoding of
its bits) and nothing else. A key is hashed once with xxh3-128 under a salt
chosen per summary, and its k bit positions come from the two 64-bit halves
(Kirsch-Mitzenmacher double hashing): with 1% false positives that is 9.6
bits, 1.2 bytes, per key. A fresh salt per summary means that a key which
happens to be a false positive in one summary is not in the next.
"""

from __future__ import annotations

import math
import secrets

import xxhash

FALSE_POSITIVE_RATE = 0.01
# A summary whose bits say "may hold" for more than this share of keys it does not
# hold is refused (`plausible`). An honest filter at its sized capacity is at 1%,
# at 1.5x its capacity at ~6%; the server re-sizes one that came out fuller. A
# filter with every bit set (a host that claims to hold everything, and so makes
# second chance skip every admission as "held by a peer") is at 100%.
MAX_FALSE_POSITIVE_RATE = 0.10
_MASK64 = (1 << 64) - 1


class BloomFilter:
    """A set of byte strings with false positives and no false negatives."""

    def __init__(self, nbits: int, hashes: int, salt: int, bits: bytearray | None = None, items: int = 0) -> None:
        self.nbits = nbits
        self.hashes = hashes
        self.salt = salt
        self.bits = bits if bits is not None else bytearray((nbits + 7) // 8)
        self.items = items

    @classmethod
    def for_capacity(cls, items: int, rate: float = FALSE_POSITIVE_RATE) -> BloomFilter:
        """An empty filter that holds `items` keys at the false-positive `rate`."""
        nbits = max(64, math.ceil(-max(items, 1) * math.log(rate) / math.log(2) ** 2))
        hashes = max(1, round(nbits / max(items, 1) * math.log(2)))
        return cls(nbits, hashes, secrets.randbits(64))

    def add(self, key: bytes) -> None:
        h = xxhash.xxh3_128_intdigest(key, self.salt)
        step = (h >> 64) | 1
        pos = (h & _MASK64) % self.nbits
        bits, nbits = self.bits, self.nbits
        for _ in range(self.hashes):
            bits[pos >> 3] |= 1 << (pos & 7)
            pos = (pos + step) % nbits
        self.items += 1

    def fill(self) -> float:
        """The share of bits set."""
        return int.from_bytes(self.bits, "little").bit_count() / self.nbits

    def false_positive_rate(self, fill: float | None = None) -> float:
        """The share of keys not held that this filter says may be held: fill ** hashes."""
        return (self.fill() if fill is None else fill) ** self.hashes

    def plausible(self, fill: float | None = None) -> str | None:
        """Why no honest host sends this filter, or None if one could.

        Two limits: its false-positive rate (fill ** k) is above
        MAX_FALSE_POSITIVE_RATE; or it has more bits set than `items` keys can
        set (expected fill 1 - exp(-k items / nbits), plus four standard
        deviations and 1%): a host that claims few keys and sets many bits.
        """
        fill = self.fill() if fill is None else fill
        rate = self.false_positive_rate(fill)
        if rate > MAX_FALSE_POSITIVE_RATE:
            limit = MAX_FALSE_POSITIVE_RATE
            return f"{fill:.0%} of its bits are set: it would claim {rate:.0%} of what it does not hold (limit {limit:.0%})"
        expected = 1 - math.exp(-self.hashes * self.items / self.nbits)
        slack = 4 * math.sqrt(max(expected * (1 - expected), 1 / self.nbits) / self.nbits) + 0.01
        if fill > expected + slack:
            return f"{fill:.0%} of its bits are set, more than {self.items} keys can set ({expected:.0%})"
        return None

    def __contains__(self, key: bytes) -> bool:
        h = xxhash.xxh3_128_intdigest(key, self.salt)
        step = (h >> 64) | 1
        pos = (h & _MASK64) % self.nbits
        bits, nbits = self.bits, self.nbits
        for _ in range(self.hashes):
            if not bits[pos >> 3] >> (pos & 7) & 1:
                return False
            pos = (pos + step) % nbits
        return True


def bytes_per_gib(rate: float = FALSE_POSITIVE_RATE, page_size: int = 4096, chunk_size: int = 65536) -> tuple[int, int]:
    """Summary bytes per GiB of cache: (digest filter, location filter at one location per chunk)."""
    gib = 1 << 30
    return (
        len(BloomFilter.for_capacity(gib // page_size, rate).bits),
        len(BloomFilter.for_capacity(gib // chunk_size, rate).bits),
    )
