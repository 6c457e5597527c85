"""The `fusecache` command: parsing, one-line errors, exit codes. Each command's work lives in its own module."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys

from fusecache import __version__, options
from fusecache.errors import QuietError


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the problem and where help is."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise QuietError(f"{message} (see `{self.prog} --help`)", exitcode=2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fusecache", description="A second-chance page cache for the disks of virtual machines.")
    p.add_argument("--version", action="version", version=f"fusecache {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    m = sub.add_parser("mount", help="mount a cached view of an image directory or NFS export")
    m.add_argument("backing", metavar="BACKING", help="the image directory (an NFS mount) or nfs://SERVER[:PORT]/EXPORT[?version=3|4]")
    m.add_argument("mountpoint", metavar="MOUNTPOINT", help="an empty directory; point libvirt's disk paths here")
    m.add_argument("-f", "--foreground", action="store_true", help="serve in this process (systemd Type=notify) instead of a daemon")
    m.add_argument(
        "--allow-other",
        action="store_true",
        help="let other users (libvirt-qemu) open files; non-root needs user_allow_other in /etc/fuse.conf",
    )
    m.add_argument("--debug", action="store_true", help="log every request")
    m.add_argument("--log-file", metavar="PATH", help="the daemon's log (default /var/log/fusecache/MOUNTPOINT.log)")
    m.add_argument("--attr-timeout", type=seconds, default=options.ATTR_TIMEOUT, metavar="SECONDS",
                   help=f"kernel attribute cache time (default {options.ATTR_TIMEOUT:g})")
    m.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    m.add_argument("--metrics", type=address, metavar="ADDRESS:PORT", help="serve Prometheus metrics here (e.g. 127.0.0.1:9477)")
    c = m.add_argument_group("cache")
    c.add_argument("--cache-dir", metavar="DIR", help="where the block cache lives (default /var/cache/fusecache/MOUNTPOINT)")
    c.add_argument("--cache-size", type=size, default=options.CACHE_SIZE, metavar="SIZE",
                   help=f"the cache's bound, e.g. 8G (default {options.CACHE_SIZE >> 30}G)")
    c.add_argument("--reset-cache", action="store_true", help="empty the cache dir first (a corrupt, foreign or old-format cache)")
    c.add_argument("--no-cache", action="store_true", help="plain passthrough: no cache at all")
    c.add_argument(
        "--admit",
        choices=list(options.ADMIT_CHOICES),
        default=options.ADMIT,
        help="second-chance: chunks guests evict, found by scanning their memory or estimated from their balloons (default); "
             "inclusive: every chunk read",
    )
    c.add_argument("--balloon", action="append", default=[], metavar="SOURCE",
                   help="watch guests' balloons: qmp:/path/to/qmp.sock (repeatable) or libvirt[:URI]")
    c.add_argument("--staging-size", type=size, metavar="SIZE",
                   help="recently read chunks kept so admission need not read them again (default: a quarter of --cache-size, "
                        f"at most {options.MAX_STAGING_SIZE >> 20}M, with --balloon; none without: nothing would read it)")
    c.add_argument("--no-guest-scan", action="store_true",
                   help="never read guests' memory: know what they evicted from balloon statistics only (less exact; "
                        "scanning reads guest RAM only to fingerprint it and keeps or logs none of it)")
    c.add_argument("--guest-scan-cpu", type=core_share, default=options.GUEST_SCAN_CPU, metavar="FRACTION",
                   help=f"share of one core background scans of guest memory may use (default {options.GUEST_SCAN_CPU:g})")
    pr = m.add_argument_group("peers")
    pr.add_argument("--listen", metavar="ADDRESS:PORT", help="serve this host's cache to peers here (e.g. 0.0.0.0:7070)")
    pr.add_argument("--peer", action="append", default=[], metavar="HOST:PORT", help="a host that mounts the same export (repeatable)")
    pr.add_argument("--peer-allow", action="append", default=[], metavar="CIDR",
                    help="also accept peer connections from this network (repeatable; --peer hosts always are)")
    pr.add_argument("--cluster-key-file", metavar="PATH", help="the shared key peers authenticate with (mode 0600)")
    pr.add_argument("--peer-insecure", action="store_true", help="peer without a key: for tests on loopback only, refused elsewhere")
    pr.add_argument("--peer-timeout", type=seconds, default=options.PEER_TIMEOUT, metavar="SECONDS",
                    help=f"how long a miss waits for peers before reading the backing (default {options.PEER_TIMEOUT:g})")
    c.add_argument("--pin", action="append", default=[], metavar="GLOB",
                   help="pin the images matching GLOB (a path in the mount, e.g. 'golden/*.qcow2'; repeatable), "
                        "with their backing chains: their cached blocks are not evicted")
    c.add_argument("--pin-budget", type=fraction, default=options.PIN_BUDGET, metavar="FRACTION",
                   help=f"the fraction of --cache-size pinned images may occupy (default {options.PIN_BUDGET:g})")
    c.add_argument("--revalidate", type=seconds, default=options.REVALIDATE, metavar="SECONDS",
                   help=f"how often an open file's version is checked against the backing (default {options.REVALIDATE:g})")

    t = sub.add_parser("top", help="a live dashboard of hit ratios")
    t.add_argument("mountpoints", metavar="MOUNTPOINT", nargs="*", help="the mounts to watch (default: every fusecache mount)")
    t.add_argument("--once", action="store_true", help="print one frame and exit (for scripts)")
    t.add_argument("--interval", type=seconds, default=1.0, metavar="SECONDS", help="refresh period (default 1)")

    st = sub.add_parser("stats", help="print a mount's counters")
    st.add_argument("mountpoint", metavar="MOUNTPOINT")
    st.add_argument("--json", action="store_true", help="all counters as JSON")

    a = sub.add_parser("admit", help="admit a byte range of an image into the cache now")
    a.add_argument("mountpoint", metavar="MOUNTPOINT")
    a.add_argument("image", metavar="IMAGE", help="the image, as a path in the mount")
    a.add_argument("offset", type=size, metavar="OFFSET", help="bytes, or with K/M/G/T")
    a.add_argument("length", type=size, metavar="LENGTH", help="bytes, or with K/M/G/T")

    w = sub.add_parser(
        "warm",
        help="read images into the cache now (from peers or the backing), skipping what is cached",
        description="Read images into the cache before a guest needs them: from a peer that holds a block, else from "
        "the backing; what is cached is skipped. A progress bar on a terminal, one summary line otherwise. Ctrl-C stops "
        "the warm and keeps what it cached (exit 130). A warm is background work: it fetches at most --rate bytes/s "
        f"(default {options.WARM_RATE >> 20}M), a quarter of it while guests read, and yields to the store's writer: at the "
        "default rate, guests' 4 KiB random cache hits ran at 0.49-1.17x (median 0.80x) their IOPS without a warm and "
        "misses were not slowed; with --rate 0, hits ran at 0.07-0.41x (bench/warm.py).",
    )
    w.add_argument("mountpoint", metavar="MOUNTPOINT")
    w.add_argument("images", metavar="IMAGE", nargs="+", help="images, as paths in the mount")
    w.add_argument("--range", type=byte_range, metavar="OFFSET:LENGTH", help="warm only this range of each image (K/M/G/T units)")
    w.add_argument("--rate", type=size, metavar="SIZE",
                   help=f"bytes per second fetched at most, 0 for no limit (default {options.WARM_RATE >> 20}M)")
    w.add_argument("--json", action="store_true", help="one JSON object at the end, for scripts")

    pn = sub.add_parser("pin", help="keep an image's cached blocks from eviction (a qcow2 overlay: with its backing chain)")
    pn.add_argument("mountpoint", metavar="MOUNTPOINT")
    pn.add_argument("image", metavar="IMAGE", help="the image, as a path in the mount")
    up = sub.add_parser("unpin", help="let a pinned image's blocks be evicted again")
    up.add_argument("mountpoint", metavar="MOUNTPOINT")
    up.add_argument("image", metavar="IMAGE", help="the image, as it was pinned")

    ls = sub.add_parser("ls", help="per image: bytes cached, pinned, shared with other images, on peers")
    ls.add_argument("mountpoint", metavar="MOUNTPOINT")
    ls.add_argument("image", metavar="IMAGE", nargs="?", help="one image, as a path in the mount (default: every image the cache knows)")
    ls.add_argument("--json", action="store_true", help="as JSON")

    d = sub.add_parser("drop", help="drop the cached chunks of one image, or of all")
    d.add_argument("mountpoint", metavar="MOUNTPOINT")
    d.add_argument("image", metavar="IMAGE", nargs="?", help="the image, as a path in the mount (default: every image)")

    r = sub.add_parser("recover", help="rebuild a mount's cache empty now (the way back from a degraded cache)")
    r.add_argument("mountpoint", metavar="MOUNTPOINT")

    ck = sub.add_parser("check", help="check an unmounted cache directory's integrity (read-only)")
    ck.add_argument("cache_dir", metavar="CACHE_DIR", help="the mount's --cache-dir; exit 0 consistent, 1 problems found, 2 not checkable")

    u = sub.add_parser("umount", aliases=["unmount"], help="unmount and stop the daemon")
    u.add_argument("mountpoint", metavar="MOUNTPOINT")
    u.add_argument("-z", "--lazy", action="store_true", help="detach now even if busy; the daemon ends when the last user does")
    return p


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def size(text: str) -> int:
    """'8G', '512M', '4096', '1.5T' -> bytes (binary units)."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] in _UNITS else ""
    try:
        value = float(t[: len(t) - len(unit)])
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: use a number with K, M, G or T, e.g. 8G")
    # float() takes "inf" and "nan": neither is a size (int() of them is an internal error).
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: use a finite number with K, M, G or T, e.g. 8G")
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative: give a size of zero or more")
    if value * _UNITS[unit] >= 1 << 63:
        raise argparse.ArgumentTypeError(f"{text!r} is too large: give a size below 8E, e.g. 8G")
    return int(value * _UNITS[unit])


def byte_range(text: str) -> tuple[int, int]:
    """'1G:512M' -> (offset, length)."""
    offset, sep, length = text.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r} is not OFFSET:LENGTH, e.g. 0:512M")
    return size(offset), size(length)


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a fraction: give a number from 0 to 1, e.g. 0.5")
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not between 0 and 1: give a fraction of --cache-size, e.g. 0.5")
    return value


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds")
    # nan compares false with everything (--revalidate nan would never revalidate); inf never ends.
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds: give a finite number, e.g. 2")
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative: give zero or more seconds")
    return value


def core_share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a share of one core: give a number above 0, at most 1 (e.g. 0.05)")
    return value


def address(text: str) -> tuple[str, int]:
    """'127.0.0.1:9477', '[::1]:9477', ':9477' -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not ADDRESS:PORT, e.g. 127.0.0.1:9477")
    return host.strip("[]") or "0.0.0.0", int(port)


def _image_path(mountpoint: str, image: str) -> str:
    """IMAGE as a path relative to the mount's root (it may be given absolute, under the mount)."""
    if os.path.isabs(image):
        rel = os.path.relpath(os.path.abspath(image), os.path.abspath(mountpoint))
        if rel.startswith(".."):
            raise QuietError(f"{image} is not under {mountpoint}: give the image's path in the mount")
        return rel
    return os.path.normpath(image)


def _mount(args: argparse.Namespace, argv: list[str]) -> int:
    from fusecache import daemon

    opts = options.MountOptions(
        backing=args.backing,
        mountpoint=args.mountpoint,
        foreground=args.foreground,
        allow_other=args.allow_other,
        debug=args.debug,
        # The daemon runs from another directory: a relative path would name another file there.
        log_file=os.path.abspath(args.log_file) if args.log_file else None,
        ready_fd=args.ready_fd,
        attr_timeout=args.attr_timeout,
        cache=not args.no_cache,
        cache_dir=args.cache_dir,
        cache_size=args.cache_size,
        reset_cache=args.reset_cache,
        admit=args.admit,
        balloon=args.balloon,
        staging_size=args.staging_size,
        guest_scan=not args.no_guest_scan,
        guest_scan_cpu=args.guest_scan_cpu,
        revalidate=args.revalidate,
        metrics=args.metrics,
        listen=args.listen,
        peers=args.peer,
        peer_allow=args.peer_allow,
        cluster_key_file=args.cluster_key_file,
        peer_insecure=args.peer_insecure,
        peer_timeout=args.peer_timeout,
        pin=args.pin,
        pin_budget=args.pin_budget,
    )
    if args.pin and args.no_cache:
        raise QuietError("--pin keeps cached blocks: it cannot be used with --no-cache")
    if args.cache_size < options.MIN_CACHE_SIZE and not args.no_cache:
        raise QuietError(f"--cache-size {args.cache_size} is too small: give at least 1M (e.g. 8G), or --no-cache")
    if args.foreground:
        daemon.setup_logging(args.debug)
        daemon.serve(opts)
    else:
        daemon.start(opts, argv)
    return 0


def _umount(args: argparse.Namespace, argv: list[str]) -> int:
    from fusecache import daemon

    daemon.umount(args.mountpoint, lazy=args.lazy)
    return 0


def _stats(args: argparse.Namespace, argv: list[str]) -> int:
    from fusecache import control

    reply = control.request(args.mountpoint, "stats")
    if args.json:
        print(json.dumps(reply, indent=2, sort_keys=True))
    else:
        from fusecache.stats import MountStats
        from fusecache.top import summary_lines

        print("\n".join(summary_lines(MountStats.from_json(reply))))
    return 0


def _top(args: argparse.Namespace, argv: list[str]) -> int:
    from fusecache import top

    return top.main(args.mountpoints, once=args.once, interval=args.interval)


def _admit(args: argparse.Namespace, argv: list[str]) -> int:
    from fusecache import control

    image = _image_path(args.mountpoint, args.image)
    reply = control.request(args.mountpoint, "admit", timeout=3600, image=image, offset=args.offset, length=args.length)
    print(f"admitted {reply['admitted_chunks']} chunks of {image}")
    return 0


def _warm(args: argparse.Namespace, argv: list[str]) -> int:
    from fusecache import warm

    images = [_image_path(args.mountpoint, i) for i in args.images]
    offset, length = args.range if args.range else (0, None)
    return warm.main(args.mountpoint, images, offset, length, args.rate, args.json)


def _pin(args: argparse.Namespace, argv: list[str]) -> int:
    from fusecache import control
    from fusecache.top import human

    image = _image_path(args.mountpoint, args.image)
    reply = control.request(args.mountpoint, "pin", timeout=120, image=image)
    chain = reply["chain"][1:]
    print(f"pinned {image}" + (f" with its backing chain {', '.join(chain)}" if chain else "")
          + f": {human(reply['pinned_bytes'])} of a {human(reply['budget'])} pin budget pinned")  # fmt: skip
    return 0


def _unpin(args: argparse.Namespace, argv: list[str]) -> int:
    from fusecache import control
    from fusecache.top import human

    image = _image_path(args.mountpoint, args.image)
    reply = control.request(args.mountpoint, "unpin", image=image)
    print(f"unpinned {image}: {human(reply['pinned_bytes'])} of a {human(reply['budget'])} pin budget pinned")
    return 0


def _ls(args: argparse.Namespace, argv: list[str]) -> int:
    from fusecache import control
    from fusecache.listing import table_lines

    image = _image_path(args.mountpoint, args.image) if args.image else None
    reply = control.request(args.mountpoint, "ls", timeout=120, image=image)
    if args.json:
        print(json.dumps(reply, indent=2, sort_keys=True))
    else:
        print("\n".join(table_lines(reply)))
    return 0


def _drop(args: argparse.Namespace, argv: list[str]) -> int:
    from fusecache import control

    image = _image_path(args.mountpoint, args.image) if args.image else None
    reply = control.request(args.mountpoint, "drop", image=image)
    print(f"dropped the cached chunks of {image or 'every image'} ({reply['dropped_files']} files)")
    return 0


def _recover(args: argparse.Namespace, argv: list[str]) -> int:
    from fusecache import control

    reply = control.request(args.mountpoint, "recover", timeout=600)
    print(f"{args.mountpoint}: the cache store was rebuilt empty; state {reply['state']}")
    return 0


def _check(args: argparse.Namespace, argv: list[str]) -> int:
    from fusecache.store import check

    return check.main(args.cache_dir)


COMMANDS = {"mount": _mount, "umount": _umount, "unmount": _umount, "stats": _stats, "top": _top, "admit": _admit, "drop": _drop}
COMMANDS["check"] = _check
COMMANDS.update({"warm": _warm, "pin": _pin, "unpin": _unpin, "ls": _ls})
COMMANDS["recover"] = _recover


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args, argv)
    except QuietError as exc:
        print(f"fusecache: {exc.message}", file=sys.stderr)
        return exc.exitcode
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a bug: one line for the user, the traceback for the log
        logging.getLogger("fusecache").debug("internal error", exc_info=True)
        print(f"fusecache: internal error: {type(exc).__name__}: {exc} (rerun with --debug, and report it)", file=sys.stderr)
        return 70
