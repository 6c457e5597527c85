"""A QMP (QEMU Machine Protocol) client in trio over a unix socket.

Owns: the QMP wire protocol only — the greeting, capability negotiation,
commands matched to their replies by `id` (so many may be in flight at
once), the asynchronous event stream, timeouts and clean close. It knows
nothing about balloons or guests; `balloon.py` builds on it.

qemu.qmp on PyPI is asyncio-only, and QMP is small: one JSON object per
line each way. Every command is sent with a fresh `id`; one reader task
routes each reply to the waiting caller by that id and every message without
one that carries "event" to the event channel.

    async with open_qmp("/run/vm1.qmp") as qmp:
        print(await qmp.execute("query-balloon"))
        async for event in qmp.events:
            ...
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0
COMMAND_TIMEOUT = 10.0
# Events are dropped (and counted) past this many unread: a slow consumer must never stall the reader, which also delivers replies.
EVENT_BUFFER = 1024


class QmpError(Exception):
    """QEMU answered a command with an error."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"QMP {command}: {error_class}: {desc}")
        self.command = command
        self.error_class = error_class
        self.desc = desc


class QmpClosed(ConnectionError):
    """The QMP connection is closed (QEMU exited or the socket was shut)."""


class QmpTimeout(TimeoutError):
    """QEMU did not answer in time."""


class _Lines:
    """Reads whole JSON lines off a stream."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.buf = bytearray()

    async def next(self) -> dict[str, Any]:
        while True:
            nl = self.buf.find(b"\n")
            if nl >= 0:
                line = bytes(self.buf[:nl])
                del self.buf[: nl + 1]
                if line.strip():
                    msg = json.loads(line)
                    if not isinstance(msg, dict):
                        raise ValueError(f"QMP sent a non-object: {line[:200]!r}")
                    return msg
                continue
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                raise QmpClosed("QMP socket closed")
            self.buf += chunk


class QmpClient:
    """One negotiated QMP connection. Make it with `open_qmp`."""

    def __init__(self, stream: trio.SocketStream, lines: _Lines, greeting: dict[str, Any], command_timeout: float) -> None:
        self.greeting = greeting
        self.command_timeout = command_timeout
        self._stream = stream
        self._lines = lines
        self._send_lock = trio.Lock()
        self._ids = itertools.count(1)
        self._pending: dict[str, trio.MemorySendChannel[dict[str, Any]]] = {}
        self._closed: BaseException | None = None
        self._event_send, self.events = trio.open_memory_channel[dict[str, Any]](EVENT_BUFFER)
        self.events_dropped = 0

    @property
    def closed(self) -> bool:
        return self._closed is not None

    @property
    def peer_pid(self) -> int | None:
        """QEMU's PID: the peer of the unix socket (SO_PEERCRED), or None if the kernel cannot tell."""
        from .guestmem.locate import peer_pid

        return peer_pid(self._stream.socket)

    async def execute(self, command: str, arguments: dict[str, Any] | None = None, timeout: float | None = None) -> Any:
        """Run one command; its "return" value. Raises QmpError, QmpClosed or QmpTimeout."""
        if self._closed is not None:
            raise QmpClosed(f"QMP {command}: connection closed ({self._closed})")
        msg_id = f"fc-{next(self._ids)}"
        msg: dict[str, Any] = {"execute": command, "id": msg_id}
        if arguments:
            msg["arguments"] = arguments
        send, receive = trio.open_memory_channel[dict[str, Any]](1)
        self._pending[msg_id] = send
        sending = sent = False
        try:
            with trio.fail_after(self.command_timeout if timeout is None else timeout):
                async with self._send_lock:
                    sending = True
                    await self._stream.send_all(json.dumps(msg).encode() + b"\n")
                    sent = True
                try:
                    reply = await receive.receive()
                except trio.EndOfChannel:
                    raise QmpClosed(f"QMP {command}: connection closed ({self._closed})")
        except trio.TooSlowError:
            if sending and not sent:
                # Cut off mid-line, the stream can carry no more commands.
                self._shut(QmpTimeout(f"QMP {command}: sending timed out"))
            raise QmpTimeout(f"QMP {command}: no answer in {self.command_timeout if timeout is None else timeout} s")
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            raise QmpClosed(f"QMP {command}: {e}")
        finally:
            # A reply arriving after a timeout finds no waiter and is dropped by the reader.
            self._pending.pop(msg_id, None)
        if "error" in reply:
            err = reply["error"]
            raise QmpError(command, str(err.get("class", "GenericError")), str(err.get("desc", err)))
        return reply.get("return")

    async def _reader(self) -> None:
        try:
            while True:
                msg = await self._lines.next()
                if "id" in msg:
                    waiter = self._pending.pop(str(msg["id"]), None)
                    if waiter is not None:
                        waiter.send_nowait(msg)
                elif "event" in msg:
                    try:
                        self._event_send.send_nowait(msg)
                    except trio.WouldBlock:
                        self.events_dropped += 1
                else:
                    # Only a command QEMU could not parse gets an answer without our id.
                    log.warning("QMP: unexpected message without id: %s", str(msg)[:200])
        except (QmpClosed, trio.BrokenResourceError, trio.ClosedResourceError, OSError, ValueError) as e:
            self._shut(e)
        finally:
            self._shut(QmpClosed("QMP client closed"))

    def _shut(self, reason: BaseException) -> None:
        if self._closed is not None:
            return
        self._closed = reason
        # Wake every waiter: closing its channel makes receive() raise EndOfChannel.
        for waiter in self._pending.values():
            waiter.close()
        self._pending.clear()
        self._event_send.close()


@asynccontextmanager
async def open_qmp(
    path: str,
    connect_timeout: float = CONNECT_TIMEOUT,
    command_timeout: float = COMMAND_TIMEOUT,
) -> AsyncIterator[QmpClient]:
    """Connect to QEMU's QMP socket at path, read the greeting, leave capability negotiation mode.

    The connection and its reader task live for the `async with` block and are
    closed when it ends. Raises QmpTimeout if the whole handshake takes longer
    than connect_timeout, OSError if the socket cannot be reached.
    """
    try:
        with trio.fail_after(connect_timeout):
            stream = await trio.open_unix_socket(path)
    except trio.TooSlowError:
        raise QmpTimeout(f"QMP {path}: no connection in {connect_timeout} s")
    async with stream:
        lines = _Lines(stream)
        try:
            with trio.fail_after(connect_timeout):
                greeting = await lines.next()
        except trio.TooSlowError:
            raise QmpTimeout(f"QMP {path}: no greeting in {connect_timeout} s")
        except (trio.BrokenResourceError, OSError) as e:
            raise QmpClosed(f"QMP {path}: {e}")
        if "QMP" not in greeting:
            raise QmpClosed(f"QMP {path}: not a QMP greeting: {str(greeting)[:200]}")
        client = QmpClient(stream, lines, greeting, command_timeout)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client._reader)
                try:
                    await client.execute("qmp_capabilities", timeout=connect_timeout)
                    yield client
                finally:
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # The reader never raises, so a group holds just the body's exception: hand it to the caller unwrapped.
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise
