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
