"""The units every part agrees on: a page (the unit of deduplication) and a chunk
(an aligned piece of an image file, the unit of the location index, of a hit and of
a peer transfer). The store, the cache and the peer protocol all take them from here;
the peer hello carries them so two hosts built differently refuse each other."""

PAGE_SIZE = 4096
CHUNK_SIZE = 64 * 1024
PAGES_PER_CHUNK = CHUNK_SIZE // PAGE_SIZE
