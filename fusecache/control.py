"""The control socket: one per mount, serving statistics and taking commands.

A unix stream socket in the mount's runtime directory (owner-only: the
directory is 0700 and the socket 0600, so only the daemon's user, root in
production, can talk to it). One JSON object per line each way: a request
`{"cmd": "stats"}` gets one reply `{"ok": true, ...}` or `{"ok": false,
"error": "..."}`; a connection may carry several requests. Replies carry
counts and names, never file content.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from fusecache import mounts
from fusecache.errors import CommandError, QuietError

log = logging.getLogger(__name__)

MAX_REQUEST = 64 * 1024
Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


def socket_path(mountpoint: str) -> str:
    return os.path.join(mounts.runtime_dir(mountpoint), "control.sock")


async def serve(path: str, handlers: dict[str, Handler], task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Listen on `path` until cancelled; each request is dispatched to handlers[cmd]."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    os.chmod(os.path.dirname(path), 0o700)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        await sock.bind(path)
    finally:
        os.umask(old)
    sock.listen(16)
    listener = trio.SocketListener(sock)
    task_status.started()
    try:
        await trio.serve_listeners(lambda stream: _session(stream, handlers), [listener])
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)


async def _session(stream: trio.SocketStream, handlers: dict[str, Handler]) -> None:
    buf = b""
    async with stream:
        try:
            while True:
                while b"\n" not in buf:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    buf += data
                    if len(buf) > MAX_REQUEST:
                        await stream.send_all(_line({"ok": False, "error": "request too large"}))
                        return
                line, buf = buf.split(b"\n", 1)
                await stream.send_all(_line(await _dispatch(line, handlers)))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return


async def _dispatch(line: bytes, handlers: dict[str, Handler]) -> dict[str, Any]:
    try:
        request = json.loads(line)
        if not isinstance(request, dict):
            raise ValueError("not an object")
    except ValueError:
        return {"ok": False, "error": "malformed request: send one JSON object per line"}
    cmd = request.get("cmd")
    handler = handlers.get(cmd) if isinstance(cmd, str) else None
    if handler is None:
        return {"ok": False, "error": f"unknown command {cmd!r}: one of {', '.join(sorted(handlers))}"}
    try:
        return {"ok": True, **await handler(request)}
    except CommandError as exc:
        return {"ok": False, "error": str(exc)}
    except Exception:
        log.exception("control command %s failed", cmd)
        return {"ok": False, "error": f"{cmd} failed inside the daemon: see its log"}


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def request(mountpoint: str, cmd: str, timeout: float = 10.0, **args: Any) -> dict[str, Any]:
    """One request to the daemon of `mountpoint` (blocking; for the command line and `top`)."""
    entry = mounts.find_mount(mountpoint)
    if entry is None or entry.fstype != mounts.FSTYPE:
        raise QuietError(f"{mountpoint} is not a fusecache mount: give the mount point of a running `fusecache mount`")
    path = socket_path(entry.mountpoint)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(path)
            s.sendall(_line({"cmd": cmd, **args}))
            buf = b""
            while not buf.endswith(b"\n"):
                data = s.recv(1 << 20)
                if not data:
                    break
                buf += data
        except FileNotFoundError:
            raise QuietError(f"the daemon of {mountpoint} has no control socket ({path}): is it running? see its log")
        except PermissionError:
            raise QuietError(f"no permission to talk to the daemon of {mountpoint}: run as the user that mounted it (root)")
        except TimeoutError:
            raise QuietError(f"the daemon of {mountpoint} did not answer within {timeout:.0f} s: see its log")
        except OSError as exc:
            if exc.errno == errno.ECONNREFUSED:
                raise QuietError(f"the daemon of {mountpoint} is not running (stale socket): `fusecache umount {mountpoint}`")
            raise QuietError(f"cannot reach the daemon of {mountpoint}: {exc.strerror}")
    try:
        reply = json.loads(buf)
    except ValueError:
        raise QuietError(f"the daemon of {mountpoint} closed the connection without answering: see its log")
    if not reply.get("ok"):
        raise QuietError(str(reply.get("error", "the daemon refused the request")))
    reply.pop("ok", None)
    return reply
