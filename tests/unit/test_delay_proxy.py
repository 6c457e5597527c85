"""The delay proxy (tests/harness/delay_proxy.py): fractional delays, byte counts, bytes intact and in order.

No timing is asserted (the machine is shared); the benchmarks report the round trips they measured.
"""

from __future__ import annotations

import os
import socket
import threading

from tests.harness.delay_proxy import DelayProxy


def _echo_server() -> tuple[socket.socket, int]:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)

    def serve() -> None:
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            with c:
                while data := c.recv(65536):
                    c.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    return srv, srv.getsockname()[1]


def test_sub_millisecond_delay_forwards_every_byte_in_order_and_counts_them() -> None:
    srv, port = _echo_server()
    try:
        with DelayProxy([port], delay_ms=0.1) as proxy:
            assert "0.1" in proxy.proc.args  # passed as a fraction, not rounded to whole ms
            assert proxy.counts() == (0, 0)
            sent = b""
            got = b""
            with socket.create_connection(("127.0.0.1", proxy.ports[port])) as c:
                for i in range(200):
                    msg = os.urandom(1 + i * 97 % 5000)
                    c.sendall(msg)
                    sent += msg
                    while len(got) < len(sent):
                        got += c.recv(65536)
            assert got == sent
            assert proxy.counts() == (len(sent), len(sent))  # down (server to client), up
    finally:
        srv.close()
