"""Peers: hosts that mount the same export share their caches over authenticated TCP.

`PeerServer` answers other hosts from the local store and publishes Bloom
summaries of what it holds; `PeerSet` keeps connections to the other hosts
and fetches verified pages and chunks from them within a deadline. The wire
protocol is specified in `docs/peer-protocol.md` and lives in `protocol.py`.
"""

from fusecache.peers.client import PeerSet, PeerStats
from fusecache.peers.protocol import Version, hole_digest, load_cluster_key, names_key, page_digest
from fusecache.peers.server import HandshakeStats, PageProvider, PeerServer, RemoteStats
from fusecache.peers.summary import BloomFilter

__all__ = [
    "BloomFilter",
    "HandshakeStats",
    "PageProvider",
    "PeerServer",
    "PeerSet",
    "PeerStats",
    "RemoteStats",
    "Version",
    "hole_digest",
    "load_cluster_key",
    "names_key",
    "page_digest",
]
