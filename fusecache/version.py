"""One version of a file's content, as the backing reports it: what the cache compares
at open and every --revalidate seconds, what location keys and peer requests carry."""

from __future__ import annotations

from typing import NamedTuple


class Version(NamedTuple):
    size: int
    mtime_ns: int
    ctime_ns: int
    change: int  # the NFSv4 change attribute where the server gives one, else 0


UNKNOWN = Version(-1, -1, -1, -1)  # the one spelling of "not known": never equal to a backing's version
