"""pgproxy's own login to PostgreSQL: SCRAM, md5, cleartext and trust, wrong passwords,
entries without a user, and a server that is not there."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import psycopg
import pytest

from pgproxy.embedded import EmbeddedPostgres
from pgproxy.protocol import messages
from tests.support import (
    ProxyFactory,
    ProxyProcess,
    assert_healthy,
    connect,
    proxy_config,
    psql,
)

WRONG_PASSWORD = "wrong-Pa55word-7f3c91"


def _entry(pg: EmbeddedPostgres, **fields: Any) -> dict[str, Any]:
    return {"host": "127.0.0.1", "port": pg.port, "dbname": "appdb", **fields}


def _closed_port() -> int:
    """A port nothing listens on: bound, then closed."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture(scope="module")
def login_proxy(pg: EmbeddedPostgres, module_proxy_factory: ProxyFactory) -> ProxyProcess:
    """One proxy with an entry per server login method (and the failure cases)."""
    databases = {
        "scram": _entry(pg, user="app", password="app-secret"),
        "md5": _entry(pg, user="md5user", password="md5-secret"),
        "cleartext": _entry(pg, user="plainuser", password="plain-secret"),
        "trust": _entry(pg, user="trustuser"),
        "wrongpw": _entry(pg, user="app", password=WRONG_PASSWORD),
        "nopw": _entry(pg, user="app"),
        "clientuser": _entry(pg, password="md5-secret"),
        "down": {"host": "127.0.0.1", "port": _closed_port(), "dbname": "appdb"},
    }
    return module_proxy_factory(proxy_config(pg, databases=databases, server_connect_timeout=2))


# -- each method -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("database", "server_user"),
    [("scram", "app"), ("md5", "md5user"), ("cleartext", "plainuser"), ("trust", "trustuser")],
)
def test_server_login_method(
    pg: EmbeddedPostgres, login_proxy: ProxyProcess, database: str, server_user: str
) -> None:
    # The client's own user name does not matter when the entry forces one.
    with connect(login_proxy, dbname=database, user="someone") as conn:
        row = conn.execute("select current_user, current_database()").fetchone()
        assert row == (server_user, "appdb")
        tag = f"login-{database}-{time.monotonic_ns()}"
        conn.execute("insert into t (v) values (%s)", (tag,))
        assert conn.execute("select count(*) from t where v = %s", (tag,)).fetchone() == (1,)
    # And the method really was the one the server asked for.
    with psycopg.connect(pg.superuser_dsn(), autocommit=True) as su:
        rows = su.execute(
            "select count(*) from pg_stat_activity where usename = %s and datname = 'appdb'",
            (server_user,),
        ).fetchone()
        assert rows is not None and rows[0] >= 1
    assert_healthy(login_proxy, dbname=database)


def test_psql_through_each_method(login_proxy: ProxyProcess) -> None:
    for database, server_user in (("scram", "app"), ("md5", "md5user"), ("trust", "trustuser")):
        result = psql(["-tA", "-c", "select current_user"], port=login_proxy.port, dbname=database)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == server_user
    assert_healthy(login_proxy, dbname="scram")


# -- failures ----------------------------------------------------------------------------------


def test_wrong_server_password(login_proxy: ProxyProcess) -> None:
    for _ in range(2):  # a second try fails the same way (no cached half-state)
        with pytest.raises(psycopg.OperationalError) as refused:
            connect(login_proxy, dbname="wrongpw")
        message = str(refused.value)
        assert 'password authentication failed for user "app"' in message
        assert WRONG_PASSWORD not in message
    result = psql(["-c", "select 1"], port=login_proxy.port, dbname="wrongpw")
    assert result.returncode != 0
    assert 'password authentication failed for user "app"' in result.stderr
    assert WRONG_PASSWORD not in result.stderr + result.stdout
    log = login_proxy.log_text()
    assert 'password authentication failed for user "app"' in log  # the failure is logged...
    assert WRONG_PASSWORD not in log  # ...but never the password
    assert_healthy(login_proxy, dbname="scram")


def test_wrong_server_password_sqlstate(login_proxy: ProxyProcess) -> None:
    with pytest.raises(psycopg.OperationalError) as refused:
        connect(login_proxy, dbname="wrongpw")
    # libpq keeps no SQLSTATE for a failed connection attempt (psycopg's is None then);
    # when it does, it must be PostgreSQL's. The raw ErrorResponse always carries it.
    assert refused.value.sqlstate in (None, "28P01")
    fields = _raw_login_error(login_proxy, "wrongpw")
    assert fields["C"] == "28P01", fields
    assert fields["S"] == "FATAL", fields
    # (A second login while the pool's logins fail gets PgBouncer's cached-error wording.)
    assert fields["M"] in (
        'password authentication failed for user "app"',
        "server login has been failing, cached error: password authentication failed for "
        'user "app" (server_login_retry)',
    ), fields
    assert WRONG_PASSWORD not in repr(fields)
    assert_healthy(login_proxy, dbname="scram")


def _raw_login_error(proxy: ProxyProcess, database: str) -> dict[str, str]:
    """Log in on a raw socket and return the fields of the ErrorResponse that must follow."""
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(messages.startup_message({"user": "app", "database": database}))
        data = b""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if len(data) >= 5 and len(data) >= 1 + int.from_bytes(data[1:5], "big"):
                break
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    assert data[:1] == b"E", data
    length = int.from_bytes(data[1:5], "big")
    return messages.parse_error_fields(data[5 : 1 + length])


def test_missing_server_password(login_proxy: ProxyProcess) -> None:
    with pytest.raises(psycopg.OperationalError) as refused:
        connect(login_proxy, dbname="nopw")
    assert "no password is configured" in str(refused.value)
    assert_healthy(login_proxy, dbname="scram")


def test_entry_without_user_logs_in_as_the_client(login_proxy: ProxyProcess) -> None:
    with connect(login_proxy, dbname="clientuser", user="md5user") as conn:
        assert conn.execute("select current_user").fetchone() == ("md5user",)
    # Another client name gets its own login with the same password, and fails cleanly.
    with pytest.raises(psycopg.OperationalError) as refused:
        connect(login_proxy, dbname="clientuser", user="app")
    assert 'password authentication failed for user "app"' in str(refused.value)
    # trust needs no password: the entry's is ignored.
    with connect(login_proxy, dbname="clientuser", user="trustuser") as conn:
        assert conn.execute("select current_user").fetchone() == ("trustuser",)
    assert_healthy(login_proxy, dbname="clientuser", user="md5user")


def _login_error(proxy: ProxyProcess, dbname: str) -> tuple[str, float]:
    """The error a login to ``dbname`` meets, and how long the one that got it took.

    As in PgBouncer, a first login whose server cannot be reached (or closes, or does not
    answer) waits for it (here until the client's own connect_timeout); a login that comes
    while the pool backs off gets the pool's last error at once."""
    with pytest.raises(psycopg.OperationalError) as first:
        connect(proxy, dbname=dbname, connect_timeout=2)
    if "timeout expired" not in str(first.value):
        return str(first.value), 0.0
    started = time.monotonic()
    with pytest.raises(psycopg.OperationalError) as refused:
        connect(proxy, dbname=dbname)
    return str(refused.value), time.monotonic() - started


def test_server_down(login_proxy: ProxyProcess) -> None:
    message, elapsed = _login_error(login_proxy, "down")
    port = login_proxy.config["databases"]["down"]["port"]
    assert f"could not connect to server at 127.0.0.1:{port}" in message, message
    assert "refused" in message.lower(), message
    assert elapsed < 3, elapsed
    assert_healthy(login_proxy, dbname="scram")


def test_server_down_for_many_clients_at_once(login_proxy: ProxyProcess) -> None:
    # Concurrent first logins share one attempt at a time and wait for the server (their
    # own connect_timeout ends the wait); none is left hanging in pgproxy.
    errors: list[str] = []

    def attempt() -> None:
        try:
            connect(login_proxy, dbname="down", connect_timeout=2).close()
            errors.append("connected?!")
        except psycopg.OperationalError as exc:
            errors.append(str(exc))

    started = time.monotonic()
    threads = [threading.Thread(target=attempt, daemon=True) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert not any(thread.is_alive() for thread in threads)
    assert time.monotonic() - started < 5
    assert len(errors) == 8
    assert all(
        "could not connect to server" in error or "timeout expired" in error for error in errors
    ), errors
    message, elapsed = _login_error(login_proxy, "down")
    assert "could not connect to server" in message and elapsed < 3, (message, elapsed)
    assert_healthy(login_proxy, dbname="scram")


class FakeServer:
    """A TCP listener that misbehaves as a PostgreSQL server, on a thread with a deadline."""

    def __init__(self, behaviour: str, lifetime: float = 15.0) -> None:
        self.behaviour = behaviour
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port: int = self.sock.getsockname()[1]
        self.accepted = 0
        self._stop = threading.Event()
        self._deadline = time.monotonic() + lifetime
        self._held: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set() and time.monotonic() < self._deadline:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            conn.settimeout(1.0)
            if self.behaviour == "silent":
                self._held.append(conn)  # never answer; closed in close()
                continue
            try:
                conn.recv(1024)  # the startup packet
                if self.behaviour == "garbage":
                    conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                elif self.behaviour == "bad-auth":
                    conn.sendall(b"R" + (12).to_bytes(4, "big") + (42).to_bytes(4, "big") + b"xxxx")
                    conn.recv(1024)
            except OSError:
                pass
            finally:
                conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for conn in self._held:
            conn.close()
        self.sock.close()


@pytest.mark.parametrize(
    ("behaviour", "expected", "sqlstate"),
    [
        ("silent", "server connection timed out (server_connect_timeout)", "08006"),
        ("close", "server closed the connection during login", "08006"),
        ("garbage", "invalid message from server during login", "08P01"),
        ("bad-auth", "unsupported authentication method requested by server: 42", "28000"),
        # With server_tls_sslmode = prefer an SSLRequest goes first: garbage answers it.
        ("garbage-tls", "invalid answer to SSLRequest", "08P01"),
    ],
    ids=["silent", "close", "garbage", "bad-auth", "garbage-tls"],
)
def test_misbehaving_server(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory, behaviour: str, expected: str, sqlstate: str
) -> None:
    tls = behaviour.endswith("-tls")
    fake = FakeServer(behaviour.removesuffix("-tls"))
    try:
        proxy = proxy_factory(
            proxy_config(
                pg,
                server_tls_sslmode="prefer" if tls else "disable",
                server_connect_timeout=1,
                databases={
                    "fake": {"host": "127.0.0.1", "port": fake.port, "dbname": "appdb"},
                    "appdb": _entry(pg, user="app", password="app-secret"),
                },
            )
        )
        message, elapsed = _login_error(proxy, "fake")
        assert expected in message, message
        assert elapsed < 3, elapsed
        assert fake.accepted >= 1
        assert _raw_login_error(proxy, "fake")["C"] == sqlstate
    finally:
        fake.close()
    assert_healthy(proxy)


def test_a_password_changed_after_reconnect_fails_the_waiting_clients(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory
) -> None:
    """PgBouncer's kill_pool_logins after RECONNECT: the only server left is obsolete (busy,
    closed once free), so a refused login fails the queued clients with PostgreSQL's error
    at once instead of keeping them waiting; the server's refusal is logged as
    PgBouncer logs it."""
    pg.create_role("pwchange", "first-Pa55", superuser=True)
    databases = {"appdb": _entry(pg, user="pwchange", password="first-Pa55")}
    proxy = proxy_factory(
        proxy_config(pg, default_pool_size=2, databases=databases, admin_users=["app"])
    )
    try:
        with connect(proxy, autocommit=False) as holder, connect(proxy) as waiter:
            assert holder.execute("select 1").fetchone() == (1,)  # holds its server
            pg.sql("ALTER ROLE pwchange PASSWORD 'second-Pa55'")
            with connect(proxy, dbname="pgbouncer", user="app") as console:
                console.execute("RECONNECT")
            started = time.monotonic()
            with pytest.raises(psycopg.OperationalError, match="password authentication"):
                waiter.execute("select 1")
            assert time.monotonic() - started < 30  # (not the query_wait_timeout)
            assert holder.execute("select 2").fetchone() == (2,)  # the holder goes on
            holder.rollback()
        assert 'closing because: password authentication failed for user "pwchange"' in (
            proxy.log_text()
        )
    finally:
        pg.sql("ALTER ROLE pwchange PASSWORD 'first-Pa55'")
