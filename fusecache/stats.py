"""The figures a mount reports, as types: what each producer fills and what `fusecache stats`,
`fusecache top`, the Prometheus exporter and the tests read. One name per figure."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(slots=True)
class ImageCounters:
    """One image's reads and writes since the mount started."""

    reads: int = 0
    hit_bytes: int = 0
    peer_bytes: int = 0
    backing_bytes: int = 0
    hit_chunks: int = 0
    miss_chunks: int = 0
    admitted_chunks: int = 0
    writes: int = 0
    write_bytes: int = 0
    invalidations: int = 0
