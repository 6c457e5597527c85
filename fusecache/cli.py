"""The `fusecache` command: parsing, one-line errors, exit codes. Each command's work lives in its own module."""

from __future__ import annotations

import argparse
import logging
import sys

from fusecache import __version__
from fusecache.errors import QuietError


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the problem and where help is."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise QuietError(f"{self.prog}: {message} (see `{self.prog} --help`)", exitcode=2)


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
    m.add_argument("--attr-timeout", type=float, default=1.0, metavar="SECONDS", help="kernel attribute cache time (default 1)")
    m.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)

    u = sub.add_parser("umount", aliases=["unmount"], help="unmount and stop the daemon")
    u.add_argument("mountpoint", metavar="MOUNTPOINT")
    u.add_argument("-z", "--lazy", action="store_true", help="detach now even if busy; the daemon ends when the last user does")
    return p


def _mount(args: argparse.Namespace, argv: list[str]) -> int:
    from fusecache import daemon

    opts = daemon.MountOptions(
        backing=args.backing,
        mountpoint=args.mountpoint,
        foreground=args.foreground,
        allow_other=args.allow_other,
        debug=args.debug,
        log_file=args.log_file,
        ready_fd=args.ready_fd,
        attr_timeout=args.attr_timeout,
    )
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


COMMANDS = {"mount": _mount, "umount": _umount, "unmount": _umount}


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
