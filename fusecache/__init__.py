"""fusecache: a second-chance page cache for the disks of virtual machines."""

__version__ = "0.1.0"
