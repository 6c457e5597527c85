"""The store, while it becomes a package: fusecache/store.py moved here whole (the next commit splits it)."""

from fusecache.store.reader import *  # noqa: F403
from fusecache.store.reader import _LOC_KEY, _PAGE, _RUN, _decode_loc  # noqa: F401
