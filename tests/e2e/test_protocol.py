"""Protocol details through transaction mode: Flush without Sync, function calls, large
messages, NOTIFY, protocol 3.2 clients, and what a cancel key may and may not cancel."""

from __future__ import annotations

import socket
import struct
import threading
import time
from typing import Any

import psycopg
import pytest

from pgproxy.embedded import EmbeddedPostgres
from pgproxy.protocol import messages
from pgproxy.protocol.prepared import parse_message
from tests.e2e.test_bad_input import RawClient
from tests.support import ProxyFactory, ProxyProcess, proxy_config

Conn = psycopg.Connection[tuple[Any, ...]]
SYNC = b"S\0\0\0\x04"
FLUSH = b"H\0\0\0\x04"


def _bind(statement: bytes) -> bytes:
    body = b"\0" + statement + b"\0" + b"\0\0" + b"\0\0" + b"\0\0"
    return b"B" + struct.pack("!I", 4 + len(body)) + body


EXECUTE = b"E\0\0\0\x09\0\0\0\0\0"


@pytest.fixture(scope="module")
def proxy_two(pg: EmbeddedPostgres, module_proxy_factory: ProxyFactory) -> ProxyProcess:
    return module_proxy_factory(proxy_config(pg, default_pool_size=2))


def test_flush_without_sync_keeps_the_server(proxy_two: ProxyProcess) -> None:
    with RawClient(proxy_two.port) as raw:
        raw.login()
        raw.send(
            parse_message(b"", b"select pg_backend_pid()\0\0\0") + _bind(b"") + EXECUTE + FLUSH
        )
        replies = raw.read_until(b"C")
        assert [kind for kind, _ in replies] == [b"1", b"2", b"D", b"C"]
        pid = replies[2][1]
        # No Sync yet: the batch is open and the same server answers the next part.
        raw.send(
            parse_message(b"named", b"select pg_backend_pid()\0\0\0")
            + _bind(b"named") + EXECUTE + FLUSH
        )  # fmt: skip
        replies = raw.read_until(b"C")
        assert [kind for kind, _ in replies] == [b"1", b"2", b"D", b"C"]
        assert replies[2][1] == pid
        raw.send(SYNC)
        assert raw.read_until(b"Z")[-1] == (b"Z", b"I")


def test_function_call(proxy_two: ProxyProcess) -> None:
    with psycopg.connect(proxy_two.dsn(), autocommit=True) as conn:
        row = conn.execute("select 'int4pl'::regproc::oid").fetchone()
        assert row is not None
        oid = int(row[0])
    with RawClient(proxy_two.port) as raw:
        raw.login()
        args = b"".join(struct.pack("!I", len(value)) + value for value in (b"2", b"40"))
        body = struct.pack("!IHHH", oid, 1, 0, 2) + args + struct.pack("!H", 0)
        raw.send(b"F" + struct.pack("!I", 4 + len(body)) + body)
        replies = raw.read_until(b"Z")
        assert replies[0][0] == b"V"
        assert replies[0][1] == struct.pack("!I", 2) + b"42"


@pytest.mark.parametrize("prepare", [False, True], ids=["unnamed", "named"])
def test_large_bind_and_data_row(proxy_two: ProxyProcess, prepare: bool) -> None:
    big = "x" * (3 * 1024 * 1024) + "end"
    with psycopg.connect(proxy_two.dsn(), autocommit=True) as conn:
        for _ in range(2):
            row = conn.execute(
                "select length(%s::text), %s::text", [big, big], prepare=prepare
            ).fetchone()
            assert row is not None and row[0] == len(big) and row[1] == big


def test_notify_reaches_a_listening_session(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(proxy_config(pg, pool_mode="session"))
    with (
        psycopg.connect(proxy.dsn(), autocommit=True) as listener,
        psycopg.connect(proxy.dsn(), autocommit=True) as sender,
    ):
        listener.execute("listen pgproxy_channel")
        sender.execute("notify pgproxy_channel, 'hello'")
        received = next(listener.notifies(timeout=10, stop_after=1))
        assert (received.channel, received.payload) == ("pgproxy_channel", "hello")


def test_protocol_3_2_client_is_answered_with_3_0(proxy_two: ProxyProcess) -> None:
    with psycopg.connect(proxy_two.dsn(), autocommit=True, max_protocol_version="3.2") as conn:
        assert conn.pgconn.protocol_version == 3
        assert conn.execute("select 1").fetchone() == (1,)


# -- cancellation -------------------------------------------------------------------------------


def _sleep_completes(conn: Conn, seconds: float, cancel: Any) -> None:
    """Run pg_sleep on ``conn`` while ``cancel`` is sent: it must complete regardless."""
    timer = threading.Timer(seconds / 3, cancel)
    timer.start()
    try:
        assert conn.execute(f"select pg_sleep({seconds}), 'done'").fetchone() == ("", "done")
    finally:
        timer.cancel()
        timer.join()


def test_cancel_safe_within_a_second(proxy_two: ProxyProcess) -> None:
    with psycopg.connect(proxy_two.dsn(), autocommit=True) as conn:
        timer = threading.Timer(0.3, conn.cancel_safe)
        started = time.monotonic()
        timer.start()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("select pg_sleep(30)")
        # (The bound is loose for a loaded CI machine; bench notes give measured figures.)
        assert time.monotonic() - started < 10
        timer.join()
        assert conn.execute("select 1").fetchone() == (1,)


def test_keys_of_gone_or_idle_clients_cancel_nothing(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory
) -> None:
    # One server: whatever runs, runs on the server the other clients used last.
    proxy = proxy_factory(proxy_config(pg, default_pool_size=1))
    with psycopg.connect(proxy.dsn(), autocommit=True) as busy:
        with psycopg.connect(proxy.dsn(), autocommit=True) as gone:
            gone.execute("select 1")
            gone_cancel = gone.pgconn.get_cancel()
        _sleep_completes(busy, 1.0, gone_cancel.cancel)
        with psycopg.connect(proxy.dsn(), autocommit=True) as idle:
            idle.execute("select 1")  # it used the server, and is linked to none now
            _sleep_completes(busy, 1.0, idle.cancel_safe)
        forged = bytes([0x5A] * 4)
        _sleep_completes(busy, 1.0, lambda: _send_cancel(proxy.port, 4242, forged))
        # A protocol 3.2 key (longer than 4 bytes) that nobody holds: nothing either.
        _sleep_completes(busy, 1.0, lambda: _send_cancel(proxy.port, 4242, bytes(32)))


def _send_cancel(port: int, process_id: int, key: bytes) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        raw.sendall(messages.cancel_request(process_id, key))
        raw.recv(16)
