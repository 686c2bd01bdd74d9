"""Malformed, hostile and vanishing clients on raw sockets: the proxy answers or drops them
with a protocol error and keeps serving everybody else.

Every socket here has a timeout and every read loop a deadline, so a proxy that stops
answering fails a test instead of hanging it.
"""

from __future__ import annotations

import contextlib
import random
import socket
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from pgproxy.embedded import EmbeddedPostgres
from pgproxy.protocol import messages
from tests.support import ProxyFactory, ProxyProcess, proxy_config

_INT32 = struct.Struct("!I")

SSL_REQUEST = _INT32.pack(8) + _INT32.pack(80877103)
GSSENC_REQUEST = _INT32.pack(8) + _INT32.pack(80877104)
PROTOCOL_3_2 = (3 << 16) | 2  # 196610

#: Seconds any single raw-socket wait may take.
WAIT = 5.0


# -- a raw protocol client ---------------------------------------------------------------------


class Closed(Exception):
    """The proxy closed the connection."""


class RawClient:
    """A blocking socket speaking just enough of the protocol, with a deadline on every read."""

    def __init__(self, port: int, timeout: float = WAIT) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buffer = bytearray()
        self.eof = False

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def abort(self) -> None:
        """Close with a TCP reset rather than a FIN (SO_LINGER 0)."""
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self, deadline: float) -> None:
        """Read one more chunk into the buffer; raise Closed at EOF, TimeoutError past deadline."""
        if self.eof:
            raise Closed
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no data from the proxy before the deadline")
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            chunk = b""
        except TimeoutError:
            raise TimeoutError("no data from the proxy before the deadline") from None
        if not chunk:
            self.eof = True
            raise Closed
        self.buffer += chunk

    def read_bytes(self, count: int, timeout: float = WAIT) -> bytes:
        deadline = time.monotonic() + timeout
        while len(self.buffer) < count:
            self._fill(deadline)
        data = bytes(self.buffer[:count])
        del self.buffer[:count]
        return data

    def read_message(self, timeout: float = WAIT) -> tuple[bytes, bytes]:
        """(type byte, payload) of the next backend message; Closed at a clean EOF."""
        deadline = time.monotonic() + timeout
        while True:
            if len(self.buffer) >= 5:
                length = _INT32.unpack_from(self.buffer, 1)[0]
                assert length >= 4, f"bad length {length} from the proxy"
                if len(self.buffer) >= 1 + length:
                    type_byte = bytes(self.buffer[:1])
                    payload = bytes(self.buffer[5 : 1 + length])
                    del self.buffer[: 1 + length]
                    return type_byte, payload
            try:
                self._fill(deadline)
            except Closed:
                assert not self.buffer, f"connection closed inside a message: {self.buffer!r}"
                raise

    def read_until(
        self, type_byte: bytes, timeout: float = WAIT, *, errors_ok: bool = False
    ) -> list[tuple[bytes, bytes]]:
        """Messages up to and including the first of ``type_byte``.

        An ErrorResponse on the way fails the test unless ``errors_ok``.
        """
        deadline = time.monotonic() + timeout
        seen: list[tuple[bytes, bytes]] = []
        while True:
            message = self.read_message(max(deadline - time.monotonic(), 0.01))
            seen.append(message)
            if message[0] == type_byte:
                return seen
            assert errors_ok or message[0] != b"E", error_fields(message[1])

    def login(
        self, user: str = "app", database: str = "appdb", version: int = 196608, **extra: str
    ) -> list[tuple[bytes, bytes]]:
        """Send a StartupMessage and read up to ReadyForQuery."""
        self.send(messages.startup_message({"user": user, "database": database, **extra}, version))
        return self.read_until(b"Z")

    def simple_query(self, sql: str) -> list[tuple[bytes, bytes]]:
        self.send(messages.query(sql))
        return self.read_until(b"Z")

    def expect_fatal(self, timeout: float = WAIT) -> dict[str, str]:
        """The next message is an ErrorResponse; then the proxy closes. Returns its fields."""
        type_byte, payload = self.read_message(timeout)
        assert type_byte == b"E", (type_byte, payload)
        fields = error_fields(payload)
        self.expect_closed(timeout)
        return fields

    def expect_closed(self, timeout: float = WAIT) -> list[tuple[bytes, bytes]]:
        """Read until the proxy closes the connection; return what arrived before."""
        deadline = time.monotonic() + timeout
        seen: list[tuple[bytes, bytes]] = []
        with contextlib.suppress(Closed):
            for _ in range(100_000):
                seen.append(self.read_message(max(deadline - time.monotonic(), 0.01)))
        assert self.eof, "the proxy did not close the connection"
        return seen

    def drain(self, timeout: float) -> None:
        """Read and discard until EOF or ``timeout`` (no failure either way)."""
        deadline = time.monotonic() + timeout
        with contextlib.suppress(Closed, TimeoutError, OSError):
            for _ in range(100_000):
                self._fill(deadline)
                self.buffer.clear()


def error_fields(payload: bytes) -> dict[str, str]:
    return messages.parse_error_fields(payload)


def query_rows(reply: list[tuple[bytes, bytes]]) -> list[list[str | None]]:
    """The DataRow values of a simple-query reply, as text."""
    rows: list[list[str | None]] = []
    for type_byte, payload in reply:
        if type_byte != b"D":
            continue
        count = struct.unpack_from("!H", payload, 0)[0]
        position = 2
        row: list[str | None] = []
        for _ in range(count):
            length = struct.unpack_from("!i", payload, position)[0]
            position += 4
            if length < 0:
                row.append(None)
            else:
                row.append(payload[position : position + length].decode())
                position += length
        rows.append(row)
    return rows


# -- health checks -----------------------------------------------------------------------------


def select_one(proxy: ProxyProcess, timeout: float = 10.0, **dsn: Any) -> tuple[Any, ...] | None:
    """``select 1`` through the proxy with psycopg, in a thread so that a hang is bounded."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            with psycopg.connect(proxy.dsn(**dsn), autocommit=True, connect_timeout=5) as conn:
                outcome["row"] = conn.execute("select 1").fetchone()
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), (
        f"select 1 through the proxy hung for {timeout:g}s; proxy log:\n{proxy.log_tail()}"
    )
    if "error" in outcome:
        raise AssertionError(f"select 1 through the proxy failed: {outcome['error']!r}")
    row: tuple[Any, ...] | None = outcome["row"]
    return row


def assert_healthy(proxy: ProxyProcess) -> None:
    """The daemon is running and a fresh psycopg connection answers ``select 1``."""
    assert proxy.alive(), f"pgproxy died; log:\n{proxy.log_tail()}"
    assert select_one(proxy) == (1,)
    assert proxy.alive(), f"pgproxy died; log:\n{proxy.log_tail()}"


@pytest.fixture
def proxy(proxy_tx: ProxyProcess) -> Iterator[ProxyProcess]:
    """The module's transaction-mode proxy, checked healthy after each test."""
    yield proxy_tx
    assert_healthy(proxy_tx)


@pytest.fixture
def single_server_proxy(pg: EmbeddedPostgres, proxy_factory: ProxyFactory) -> ProxyProcess:
    """A transaction-mode proxy with one server: the next client gets the same server."""
    return proxy_factory(proxy_config(pg, default_pool_size=1))


# -- (a) garbage instead of a startup packet ---------------------------------------------------


def _random_garbage() -> bytes:
    rng = random.Random(20240501)
    for _ in range(1000):
        data = rng.randbytes(64)
        length = _INT32.unpack_from(data, 0)[0]
        if length < 8 or length > 10000:  # a length PostgreSQL itself would refuse
            return data
    raise AssertionError("unreachable")


def _startup_with_body(body: bytes) -> bytes:
    """A protocol 3.0 StartupMessage with ``body`` as its (possibly malformed) parameters."""
    return _INT32.pack(8 + len(body)) + _INT32.pack(196608) + body


GARBAGE = {
    "random-bytes": _random_garbage(),
    "length-0xffffffff": b"\xff\xff\xff\xff" + _INT32.pack(196608) + b"user\0app\0\0",
    "length-zero": b"\0\0\0\0" + b"\0" * 12,
    "length-4": _INT32.pack(4) + b"\0" * 12,
    "http-request": b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    "tls-client-hello": bytes.fromhex("160301012c010001280303") + bytes(32),
    "unterminated-params": _startup_with_body(b"user\0app"),
    "odd-param-count": _startup_with_body(b"user\0app\0x\0\0"),
    "empty-param-name": _startup_with_body(b"\0app\0\0"),
}


@pytest.mark.parametrize("garbage", GARBAGE.values(), ids=GARBAGE.keys())
def test_garbage_startup_gets_protocol_violation(proxy: ProxyProcess, garbage: bytes) -> None:
    with RawClient(proxy.port) as client:
        client.send(garbage)
        fields = client.expect_fatal()
    assert fields["C"] == "08P01", fields
    assert fields["S"] == "FATAL", fields
    assert fields["M"], fields


def _startup_bytes(**params: bytes) -> bytes:
    """A StartupMessage whose values are the given bytes, whatever their encoding."""
    return _startup_with_body(
        b"".join(key.encode() + b"\0" + value + b"\0" for key, value in params.items()) + b"\0"
    )


def _show_clients(port: int, user: bytes, password: bytes) -> bytes:
    """The DataRows of the console's SHOW CLIENTS (auth_type plain), as raw bytes."""
    with RawClient(port) as console:
        console.send(_startup_bytes(user=user, database=b"pgbouncer"))
        assert console.read_message() == (b"R", _INT32.pack(3))
        console.send(password)
        console.read_until(b"Z")
        reply = console.simple_query("SHOW CLIENTS")
    return b"".join(payload for kind, payload in reply if kind == b"D")


def test_startup_values_that_are_not_utf8(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory
) -> None:
    """PostgreSQL (and PgBouncer) take startup values whatever their encoding, such as an
    application_name in LATIN1: the client logs in, gets its own bytes back in the
    ParameterStatus, and runs queries; the server, which cannot take those bytes in SQL
    (its encoding is UTF-8), is given them as \\xNN. User and database names in UTF-8 still
    match the configured ones, and their LATIN1 spellings do not."""
    entry = {"host": "127.0.0.1", "port": pg.port, "dbname": "appdb", "user": "app",
             "password": "app-secret"}  # fmt: skip
    proxy = proxy_factory(
        proxy_config(
            pg,
            auth_type="plain",
            users={"björn": {"password": "client-secret"}},
            admin_users=["björn"],
            databases={"dbé": entry},
        )
    )
    password = messages.message(b"p", b"client-secret\0")
    app_name = b"caf\xe9 \xff"
    with RawClient(proxy.port) as client:
        user, database = "björn".encode(), "dbé".encode()
        client.send(_startup_bytes(user=user, database=database, application_name=app_name))
        assert client.read_message() == (b"R", _INT32.pack(3))  # cleartext password
        client.send(password)
        welcome = client.read_until(b"Z")
        assert welcome[0] == (b"R", _INT32.pack(0))
        assert (b"S", b"application_name\0" + app_name + b"\0") in welcome
        assert app_name in _show_clients(proxy.port, user, password)  # as the client sent it
        reply = client.simple_query("select 1")
        assert query_rows(reply) == [["1"]]
        assert not [payload for kind, payload in reply if kind == b"S"]  # (the SET's: hidden)
        assert query_rows(client.simple_query("show application_name")) == [[r"caf\xe9 \xff"]]
        assert query_rows(client.simple_query("select current_user")) == [["app"]]  # dbé's
        # The server reported its value as ParameterStatus: the client's now.
        assert rb"caf\xe9 \xff" in _show_clients(proxy.port, user, password)
    # Names are bytes: björn's and dbé's LATIN1 spellings are other names.
    with RawClient(proxy.port) as client:
        client.send(_startup_bytes(user="björn".encode("latin-1"), database="dbé".encode()))
        assert client.read_message() == (b"R", _INT32.pack(3))
        client.send(password)
        type_byte, payload = client.read_message()
        assert type_byte == b"E" and b'for user "bj\xf6rn"\0' in payload, payload
        assert error_fields(payload)["C"] == "28P01"
    with RawClient(proxy.port) as client:
        client.send(_startup_bytes(user="björn".encode(), database="dbé".encode("latin-1")))
        assert client.read_message() == (b"R", _INT32.pack(3))
        client.send(password)
        type_byte, payload = client.read_message()
        assert type_byte == b"E" and b"no such database: db\xe9\0" in payload, payload
    log = proxy.log_text()
    assert r"application_name=caf\xe9 \xff" in log, proxy.log_tail()
    assert proxy.alive()


def test_unsupported_protocol_major_version(proxy: ProxyProcess) -> None:
    with RawClient(proxy.port) as client:
        client.send(messages.startup_message({"user": "app"}, version=(2 << 16)))
        fields = client.expect_fatal()
    # PostgreSQL answers an unsupported protocol with 0A000 too.
    assert fields["C"] == "0A000", fields
    assert "unsupported frontend protocol 2.0" in fields["M"]


# -- (b) truncated packets ---------------------------------------------------------------------


def test_half_a_startup_packet_then_close(proxy: ProxyProcess) -> None:
    startup = messages.startup_message({"user": "app", "database": "appdb"})
    for cut in (2, 6, len(startup) // 2, len(startup) - 1):
        with RawClient(proxy.port) as client:
            client.send(startup[:cut])
    with RawClient(proxy.port) as client:
        client.send(startup[: len(startup) // 2])
        client.abort()


_QUERY = messages.query("select 'the rest of this query never arrives'")

# The server may only go to another client when the bytes forwarded to it end on a message
# boundary; these leave it inside a message (or a header) before the client goes away.
TRUNCATED = {
    "query-header-complete": [_QUERY[: len(_QUERY) // 2]],
    "query-header-split": [_QUERY[:3]],
    "copydata-partial": [messages.message(b"d", b"x" * 200)[:50]],
    "bad-length-after-split-header": [b"P", b"\x00\x00\x00\x01"],
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("chunks", TRUNCATED.values(), ids=TRUNCATED.keys())
def test_half_a_message_after_login_then_close(
    single_server_proxy: ProxyProcess, chunks: list[bytes]
) -> None:
    proxy = single_server_proxy
    assert select_one(proxy) == (1,)  # the one server exists and is idle
    with RawClient(proxy.port) as client:
        client.login()
        for chunk in chunks:  # separate TCP segments: the proxy sees each on its own
            client.send(chunk)
            time.sleep(0.1)
        client.drain(timeout=0.2)
    # The next client gets the only server (or its replacement): it must work.
    assert proxy.alive(), proxy.log_tail()
    for _ in range(3):
        assert select_one(proxy, timeout=3) == (1,)
    assert_healthy(proxy)


@pytest.mark.timeout(60)
def test_copy_error_while_client_is_inside_a_copydata_message(
    single_server_proxy: ProxyProcess,
) -> None:
    proxy = single_server_proxy
    assert select_one(proxy) == (1,)
    with RawClient(proxy.port, timeout=3.0) as client:
        client.login()
        client.send(messages.query("copy t (id, v) from stdin"))
        client.read_until(b"G")  # CopyInResponse
        # A bad first row, then the start of the next CopyData in the same segment:
        # PostgreSQL fails the COPY (ErrorResponse, ReadyForQuery 'I') while the rest of
        # the second message is still to come.
        rest_of_rows = b"1\tfine\n" * 100
        second = messages.message(b"d", rest_of_rows)
        client.send(messages.message(b"d", b"not-a-number\tx\n") + second[:20])
        reply = client.read_until(b"Z", timeout=3, errors_ok=True)
        assert error_fields(reply[-2][1])["C"] == "22P02", reply
        # Another client asks for the only server now.
        other: dict[str, Any] = {}
        worker = threading.Thread(
            target=lambda: other.update(row=select_one(proxy, timeout=8)), daemon=True
        )
        worker.start()
        time.sleep(0.3)
        # The COPY client finishes its message (PostgreSQL ignores CopyData after a failed
        # COPY), says CopyDone and runs another query on the same connection.
        client.send(second[20:] + messages.message(b"c"))
        assert query_rows(client.simple_query("select 8")) == [["8"]]
    worker.join(10)
    assert other.get("row") == (1,), other
    assert_healthy(proxy)


_COPYDATA = messages.message(b"d", b"y" * 100)

TERMINATE_CASES = {
    "header-split-1": [messages.TERMINATE[:1], messages.TERMINATE[1:]],
    "header-split-3": [messages.TERMINATE[:3], messages.TERMINATE[3:]],
    "after-a-message-tail": [_COPYDATA[:10], _COPYDATA[10:] + messages.TERMINATE],
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("chunks", TERMINATE_CASES.values(), ids=TERMINATE_CASES.keys())
def test_terminate_in_a_later_packet(
    single_server_proxy: ProxyProcess, chunks: list[bytes]
) -> None:
    proxy = single_server_proxy
    assert select_one(proxy) == (1,)
    with RawClient(proxy.port) as client:
        client.login()
        for chunk in chunks:  # separate TCP segments
            client.send(chunk)
            time.sleep(0.1)
        # The client asked to leave: the proxy closes the connection without an error.
        assert client.expect_closed(timeout=3) == []
    for _ in range(3):
        assert select_one(proxy, timeout=3) == (1,)
    assert_healthy(proxy)


def test_half_a_query_while_another_client_works(proxy: ProxyProcess) -> None:
    with psycopg.connect(proxy.dsn(), autocommit=True, connect_timeout=5) as other:
        with RawClient(proxy.port) as client:
            client.login()
            client.send(_QUERY[: len(_QUERY) // 2])
            assert other.execute("select 2").fetchone() == (2,)
        assert other.execute("select 3").fetchone() == (3,)


# -- (c) oversized message ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_packet_proxy(
    pg: EmbeddedPostgres, module_proxy_factory: ProxyFactory
) -> Iterator[ProxyProcess]:
    proxy = module_proxy_factory(proxy_config(pg, max_packet_size=1024))
    yield proxy


def _query_of_length(length: int) -> bytes:
    """A valid Query message whose length field is exactly ``length``."""
    sql = "select 1 --"
    padding = length - 4 - len(sql) - 1
    return messages.query(sql + "x" * padding)


def test_oversized_message_is_refused(small_packet_proxy: ProxyProcess) -> None:
    proxy = small_packet_proxy
    with RawClient(proxy.port) as client:
        client.login()
        client.send(b"Q" + _INT32.pack(5000) + b"select 1" + b"x" * 100)
        fields = client.expect_fatal()
    assert fields["C"] == "08P01", fields
    assert "max_packet_size" in fields["M"], fields
    assert_healthy(proxy)


def test_message_at_max_packet_size_passes(small_packet_proxy: ProxyProcess) -> None:
    proxy = small_packet_proxy
    with RawClient(proxy.port) as client:
        client.login()
        at_limit = _query_of_length(1024)
        assert _INT32.unpack_from(at_limit, 1)[0] == 1024
        client.send(at_limit)
        assert query_rows(client.read_until(b"Z")) == [["1"]]
        over = _query_of_length(1025)
        client.send(over)
        fields = client.expect_fatal()
    assert fields["C"] == "08P01", fields
    assert_healthy(proxy)


def test_oversized_message_after_a_good_one_in_the_same_packet(
    small_packet_proxy: ProxyProcess,
) -> None:
    proxy = small_packet_proxy
    with RawClient(proxy.port) as client:
        client.login()
        client.send(messages.query("select 7") + b"Q" + _INT32.pack(4096) + b"x" * 64)
        seen = client.expect_closed()
    types = [type_byte for type_byte, _ in seen]
    assert types[-1] == b"E", seen
    assert error_fields(seen[-1][1])["C"] == "08P01"
    assert_healthy(proxy)


# -- (d) unknown message type ------------------------------------------------------------------


@pytest.mark.parametrize("type_byte", [b"y", b"\x00", b"Z", b"\xff"])
def test_unknown_message_type_after_login(proxy: ProxyProcess, type_byte: bytes) -> None:
    with RawClient(proxy.port) as client:
        client.login()
        client.send(messages.message(type_byte, b"whatever"))
        fields = client.expect_fatal()
    assert fields["C"] == "08P01", fields
    assert fields["S"] == "FATAL", fields
    assert str(type_byte[0]) in fields["M"], fields


# -- (e) encryption requests -------------------------------------------------------------------


@pytest.mark.parametrize("request_packet", [SSL_REQUEST, GSSENC_REQUEST], ids=["ssl", "gssenc"])
def test_encryption_request_is_declined_then_login_works(
    proxy: ProxyProcess, request_packet: bytes
) -> None:
    with RawClient(proxy.port) as client:
        client.send(request_packet)
        assert client.read_bytes(1) == b"N"
        client.login()
        assert query_rows(client.simple_query("select 40 + 2")) == [["42"]]
        client.send(messages.TERMINATE)
        client.expect_closed()


def test_gssenc_then_ssl_then_login(proxy: ProxyProcess) -> None:
    # libpq with gssencmode=prefer and sslmode=prefer asks for both, in this order.
    with RawClient(proxy.port) as client:
        client.send(GSSENC_REQUEST)
        assert client.read_bytes(1) == b"N"
        client.send(SSL_REQUEST)
        assert client.read_bytes(1) == b"N"
        client.login()
        assert query_rows(client.simple_query("select 1")) == [["1"]]


# -- (f) protocol negotiation ------------------------------------------------------------------


def _negotiate_fields(payload: bytes) -> tuple[int, list[str]]:
    newest, count = struct.unpack_from("!ii", payload, 0)
    names = [part.decode() for part in payload[8:].split(b"\0") if part]
    assert len(names) == count, payload
    return newest, names


def test_protocol_3_2_with_unknown_option_is_negotiated(proxy: ProxyProcess) -> None:
    with RawClient(proxy.port) as client:
        welcome = client.login(version=PROTOCOL_3_2, **{"_pq_.foo": "bar"})
        types = [type_byte for type_byte, _ in welcome]
        assert types[0] == b"v", welcome
        assert types.index(b"v") < types.index(b"R")
        newest, names = _negotiate_fields(welcome[0][1])
        assert names == ["_pq_.foo"]
        assert newest == 3 << 16  # 3.0: the whole version number, as PostgreSQL sends it
        auth = [payload for type_byte, payload in welcome if type_byte == b"R"]
        assert auth == [_INT32.pack(0)]  # AuthenticationOk, once
        key_data = [payload for type_byte, payload in welcome if type_byte == b"K"]
        assert len(key_data) == 1 and len(key_data[0]) == 8  # a 3.0 key: pid + 4 bytes
        assert query_rows(client.simple_query("select current_user")) == [["app"]]


def test_protocol_3_0_gets_no_negotiation(proxy: ProxyProcess) -> None:
    with RawClient(proxy.port) as client:
        welcome = client.login()
    assert b"v" not in [type_byte for type_byte, _ in welcome]


# -- (g) random bytes after login --------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_proxy(pg: EmbeddedPostgres, module_proxy_factory: ProxyFactory) -> ProxyProcess:
    """A proxy of its own for the property test, shared by all its examples."""
    return module_proxy_factory(proxy_config(pg, default_pool_size=2))


@pytest.mark.timeout(90)
@settings(
    max_examples=50,
    deadline=None,
    database=None,
    phases=(Phase.explicit, Phase.generate),
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(junk=st.binary(min_size=1, max_size=300))
@example(junk=b"S\x00\x00\x00\x04")  # a lone Sync: answered with ReadyForQuery
@example(junk=b"d\x00\x00\x00\x08abcd")  # a complete CopyData outside COPY: ignored
@example(junk=b"\x00")  # an invalid type byte the scanner cannot see yet: PostgreSQL quits
@example(junk=b"Q\x00\x00")  # half a Query header: must not prefix the next query
def test_random_bytes_after_login_never_hurt_others(fuzz_proxy: ProxyProcess, junk: bytes) -> None:
    proxy = fuzz_proxy
    with RawClient(proxy.port, timeout=2.0) as client:
        client.login()
        with contextlib.suppress(OSError):
            client.send(junk)
        client.drain(timeout=0.3)
    assert proxy.alive(), proxy.log_tail()
    assert select_one(proxy, timeout=3) == (1,)


def test_random_bytes_proxy_is_still_healthy(fuzz_proxy: ProxyProcess) -> None:
    # Runs after the property test: whatever it left behind, the daemon still serves.
    assert_healthy(fuzz_proxy)


# -- (h) a client that vanishes while its result streams ---------------------------------------


def _stuck_backends(pg: EmbeddedPostgres, since: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(pg.superuser_dsn("appdb"), autocommit=True, connect_timeout=5) as conn:
        return conn.execute(
            "select pid, state, left(query, 60) from pg_stat_activity"
            " where usename = 'app' and datname = 'appdb' and backend_start >= %s"
            " and state in ('active', 'idle in transaction', 'idle in transaction (aborted)')",
            (since,),
        ).fetchall()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("goodbye", ["close", "reset"])
def test_client_vanishes_mid_result(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory, goodbye: str
) -> None:
    with psycopg.connect(pg.superuser_dsn("appdb"), autocommit=True) as conn:
        row = conn.execute("select now()").fetchone()
        assert row is not None
        started = row[0]
    proxy = proxy_factory(proxy_config(pg, pool_mode="transaction", default_pool_size=2))
    for _ in range(2):
        client = RawClient(proxy.port)
        try:
            client.login()
            client.send(messages.query("select repeat('x', 1000) from generate_series(1, 200000)"))
            deadline = time.monotonic() + WAIT
            while len(client.buffer) < 256 * 1024:
                client._fill(deadline)
        finally:
            if goodbye == "reset":
                client.abort()
            else:
                client.close()
        assert select_one(proxy, timeout=10) == (1,)
    # The abandoned queries are cancelled and their servers closed or returned clean.
    stuck: list[tuple[Any, ...]] = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        stuck = _stuck_backends(pg, started)
        if not stuck:
            break
        time.sleep(0.1)
    assert not stuck, f"server connections left busy: {stuck}\n{proxy.log_tail()}"
    assert_healthy(proxy)
