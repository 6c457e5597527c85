"""A page's identity and the checks of copied bytes: the keys they are made with, and the two digests.

Two digests, for two jobs (docs/internals.md, "Content identity", says why):
- a page's *name* is the keyed BLAKE3 of its 4096 bytes, truncated to 16
  bytes: the store dedups pages by it, and peers ask for pages, list them in
  summaries and check what they receive by it. Without the key no one can
  build two pages with one name.
- a *check* is the XXH3-128 of bytes copied out of the slab, seeded with the
  cache's own secret seed: it tells a reused or torn slot from the bytes the
  location entry was made for, on the hit path, at ~25 GB/s.

The keys live in a 0600 file in the cache directory (`ContentKeys`): the
seed is always the cache's own, drawn at creation; the names key is drawn
at creation too, unless the mount has a cluster key, from which every host
of the cluster derives the same one (`cluster_names_key`), so that all
name a page alike.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import hmac
import secrets
from collections.abc import Callable

import blake3
import xxhash

from fusecache.geometry import PAGE_SIZE

NAME_SIZE = 16
KEY_SIZE = 32
ZERO_PAGE = bytes(PAGE_SIZE)
_FILE_MAGIC = b"fusecache content keys v1\n"
_NAMES_LABEL = b"fusecache page identity v1"


def page_name(key: bytes, page: bytes | memoryview) -> bytes:
    """The name of a page under `key`: keyed BLAKE3 of its bytes padded with zeros to PAGE_SIZE, 16 bytes."""
    if len(page) < PAGE_SIZE:
        page = bytes(page).ljust(PAGE_SIZE, b"\0")
    return blake3.blake3(page, key=key).digest(NAME_SIZE)


def cluster_names_key(cluster_key: bytes | None) -> bytes:
    """The names key every host of a cluster derives from its cluster key.

    None (peering with --peer-insecure, loopback only) derives a public key:
    names are then still a cryptographic hash (a collision costs a 2^64 search),
    but one anyone can compute offline.
    """
    return hmac.digest(cluster_key or b"", _NAMES_LABEL, "sha256")


@dataclasses.dataclass(frozen=True)
class ContentKeys:
    """One cache's keys: the names key (BLAKE3) and the check seed (XXH3-128)."""

    names_key: bytes
    seed: int

    def __post_init__(self) -> None:
        if len(self.names_key) != KEY_SIZE or not 0 <= self.seed < 1 << 64:
            raise ValueError("a names key is 32 bytes and a seed 64 bits")
        # A partial, not a method: the hit path calls it per chunk, and a Python frame costs more than the hash.
        object.__setattr__(self, "check", functools.partial(xxhash.xxh3_128_digest, seed=self.seed))
        object.__setattr__(self, "zero_name", self.name(ZERO_PAGE))
        object.__setattr__(self, "zero_check", self.check(ZERO_PAGE))

    check: Callable[[bytes | memoryview], bytes] = dataclasses.field(init=False, repr=False, compare=False)
    zero_name: bytes = dataclasses.field(init=False, repr=False)
    zero_check: bytes = dataclasses.field(init=False, repr=False)

    @classmethod
    def new(cls, names_key: bytes | None = None) -> ContentKeys:
        """Fresh keys: a random seed, and `names_key` or a random one."""
        return cls(names_key if names_key is not None else secrets.token_bytes(KEY_SIZE), secrets.randbits(64))

    def name(self, page: bytes | memoryview) -> bytes:
        return page_name(self.names_key, page)

    def is_zero(self, page: bytes | memoryview) -> bool:
        """Whether a whole page is all zeros (a hole), given it: one hash, the bytes compared only if it matches."""
        return self.check(page) == self.zero_check and page == ZERO_PAGE

    def fingerprint(self) -> bytes:
        """What the store records to tell, at the next open, that its pages were named and checked with these keys."""
        return hashlib.sha256(b"fusecache keys fingerprint\n" + self.to_bytes()).digest()[:16]

    def to_bytes(self) -> bytes:
        return _FILE_MAGIC + self.names_key + self.seed.to_bytes(8, "big")

    @classmethod
    def from_bytes(cls, raw: bytes) -> ContentKeys | None:
        """The keys a file holds, or None if it does not hold keys."""
        if len(raw) != len(_FILE_MAGIC) + KEY_SIZE + 8 or not raw.startswith(_FILE_MAGIC):
            return None
        body = raw[len(_FILE_MAGIC) :]
        return cls(body[:KEY_SIZE], int.from_bytes(body[KEY_SIZE:], "big"))
