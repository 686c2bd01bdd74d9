"""Back-pressure: a client that does not read stalls PostgreSQL, not pgproxy's memory.

The memory target itself (RSS under 100 MB for a multi-GB result) is measured by
bench/memory.py; here the mechanism is checked: while the client reads nothing, pgproxy
stops reading from the server, so the PostgreSQL backend blocks writing to its socket.
"""

from __future__ import annotations

import socket
import struct
import time

import psycopg

from pgproxy.embedded import EmbeddedPostgres
from pgproxy.protocol import messages
from tests.support import ProxyFactory, assert_healthy, proxy_config

ROWS = 300_000
ROW_TEXT = 1000


def _read_until_ready(sock: socket.socket, deadline: float) -> int:
    """Read until a ReadyForQuery; returns the number of bytes read."""
    received = 0
    tail = b""
    while time.monotonic() < deadline:
        chunk = sock.recv(1 << 20)
        assert chunk, "pgproxy closed the connection"
        received += len(chunk)
        tail = (tail + chunk)[-6:]
        if tail[:1] == b"Z" and tail[1:5] == struct.pack("!I", 5):
            return received
    raise AssertionError("no ReadyForQuery before the deadline")


def test_stalled_client_stalls_the_server_not_the_proxy(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(proxy_config(pg, pool_mode="transaction", default_pool_size=2))
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=30) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.sendall(
            messages.startup_message(
                {"user": "app", "database": "appdb", "application_name": "stalled-reader"}
            )
        )
        _read_until_ready(sock, time.monotonic() + 15)
        sock.sendall(
            messages.query(f"select repeat('x', {ROW_TEXT}) from generate_series(1, {ROWS})")
        )
        # ~300 MB are due; the client reads nothing. PostgreSQL must end up blocked on its
        # socket, and stay blocked, because pgproxy stopped reading from it. (Without
        # back-pressure it blocks only in passing while pgproxy drains it into memory.)
        query = (
            "select count(*) from pg_stat_activity where application_name = 'stalled-reader'"
            " and state = 'active' and wait_event = 'ClientWrite'"
        )
        with psycopg.connect(pg.superuser_dsn("appdb"), autocommit=True) as admin:

            def blocked() -> bool:
                return admin.execute(query).fetchone() == (1,)

            deadline = time.monotonic() + 20
            while not blocked():
                assert time.monotonic() < deadline, "the backend never blocked on ClientWrite"
                time.sleep(0.1)
            for _ in range(30):  # 3 s: long enough for pgproxy to drain 300 MB if it could
                time.sleep(0.1)
                assert blocked(), "the backend got unblocked while the client read nothing"
        # Now read it all: every row arrives, nothing was lost or reordered.
        received = _read_until_ready(sock, time.monotonic() + 120)
    row_message = 1 + 4 + 2 + 4 + ROW_TEXT  # DataRow: type, length, column count, size, data
    assert received > ROWS * row_message
    assert_healthy(proxy)
