"""PgBouncer's semantics where its own test suite checks them: trust and the auth_file,
the auth database, cancel requests and the next client, query_wait_notify, server checks
at server_check_delay = 0, settings changed on running pools, console counts, and the
first login's wait for a server that cannot be reached."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgproxy.embedded import EmbeddedPostgres, free_port
from tests.support import ProxyFactory, connect, proxy_config


def _rows(conn: psycopg.Connection[Any], command: str) -> list[dict[str, Any]]:
    cursor = conn.execute(command)
    names = [column.name for column in cursor.description or ()]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def test_trust_knows_only_the_auth_files_users(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    """auth_type = trust with an auth_file: PgBouncer's rule that the user must be in it
    (or be a database's forced user)."""
    userlist = tmp_path / "userlist.txt"
    userlist.write_text('"app" ""\n')
    databases = {
        "appdb": {"host": "127.0.0.1", "port": pg.port, "user": "app", "password": "app-secret"},
        "forced": {"host": "127.0.0.1", "port": pg.port, "dbname": "appdb", "user": "md5user",
                   "password": "md5-secret"},
    }  # fmt: skip
    proxy = proxy_factory(proxy_config(pg, auth_file=str(userlist), databases=databases))
    with connect(proxy, user="app") as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    with connect(proxy, dbname="forced", user="md5user") as conn:  # a forced user is known
        assert conn.execute("select current_user").fetchone() == ("md5user",)
    with pytest.raises(psycopg.OperationalError, match='"trust" authentication failed'):
        connect(proxy, user="stranger")


def test_a_disabled_auth_database_refuses_auth_query_logins(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory
) -> None:
    pg.create_role("semantics_lookup", "authq-secret", superuser=True)
    proxy = proxy_factory(
        proxy_config(
            pg, auth_type="md5", auth_user="semantics_lookup", auth_dbname="authdb",
            admin_users="app", users={"semantics_lookup": {"password": "authq-secret"},
                                      "app": {"password": "app-secret"}},
            databases={
                "appdb": {"host": "127.0.0.1", "port": pg.port},
                "authdb": {"host": "127.0.0.1", "port": pg.port, "dbname": "appdb"},
            },
        )
    )  # fmt: skip
    with pytest.raises(psycopg.OperationalError, match="no such user"):
        connect(proxy, user="nobody_at_all", password="x")
    with connect(proxy, dbname="pgbouncer", password="app-secret") as admin:
        admin.execute("DISABLE authdb")
    with pytest.raises(psycopg.OperationalError, match='authentication database "authdb" is'):
        connect(proxy, user="md5user", password="md5-secret")


def test_the_console_cannot_be_an_auth_dbname(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory
) -> None:
    """A database entry whose auth_dbname is the console's: auth_query logins fail with
    PgBouncer's error and log line (a global auth_dbname = "pgbouncer" is refused when the
    configuration is read: tests/test_config.py)."""
    pg.create_role("semantics_lookup2", "authq-secret", superuser=True)
    proxy = proxy_factory(
        proxy_config(
            pg, auth_type="md5", auth_user="semantics_lookup2",
            users={"semantics_lookup2": {"password": "authq-secret"}},
            databases={"appdb": {"host": "127.0.0.1", "port": pg.port,
                                 "auth_dbname": "pgbouncer"}},
        )
    )  # fmt: skip
    with pytest.raises(psycopg.OperationalError, match="bouncer config error"):
        connect(proxy, user="md5user", password="md5-secret")
    assert 'cannot use the reserved "pgbouncer" database as an auth_dbname' in proxy.log_text()


def test_auth_query_failures_are_told_as_pgbouncer_tells_them(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory
) -> None:
    """auth_user's login fails: the client gets the server's error; the query fails:
    "bouncer config error", and the server's error is in the log."""
    pg.create_role("semantics_lookup3", "authq-secret", superuser=True)
    proxy = proxy_factory(
        proxy_config(
            pg, auth_type="md5", auth_user="semantics_lookup3",
            users={"semantics_lookup3": {"password": "authq-secret"}},
            databases={
                "nosuchdb": {"host": "127.0.0.1", "port": pg.port},
                "badquery": {"host": "127.0.0.1", "port": pg.port, "dbname": "appdb",
                             "auth_query": "SELECT usename, passwd FROM not_pg_shadow "
                                           "WHERE usename = $1"},
            },
        )
    )  # fmt: skip
    with pytest.raises(psycopg.OperationalError, match='database "nosuchdb" does not exist'):
        connect(proxy, dbname="nosuchdb", user="md5user", password="md5-secret")
    with pytest.raises(psycopg.OperationalError, match="bouncer config error"):
        connect(proxy, dbname="badquery", user="md5user", password="md5-secret")
    assert 'relation "not_pg_shadow" does not exist' in proxy.log_text()


def test_a_cancel_in_flight_never_reaches_the_next_client(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory
) -> None:
    """One server: a's query is cancelled by many concurrent requests while b waits for
    that server; b's query must run to its end (PgBouncer's cancel race test)."""
    proxy = proxy_factory(proxy_config(pg, default_pool_size=1))
    a, b = connect(proxy), connect(proxy)
    try:
        outcome: dict[str, BaseException | None] = {}

        def run(name: str, conn: psycopg.Connection[Any], seconds: float) -> None:
            try:
                conn.execute(f"select pg_sleep({seconds})")
                outcome[name] = None
            except BaseException as exc:
                outcome[name] = exc

        first = threading.Thread(target=run, args=("a", a, 5))
        first.start()
        time.sleep(0.5)
        second = threading.Thread(target=run, args=("b", b, 1))
        second.start()
        time.sleep(0.5)
        cancels = [threading.Thread(target=a.cancel) for _ in range(40)]
        for thread in cancels:
            thread.start()
        for thread in [*cancels, first, second]:
            thread.join(15)
        assert isinstance(outcome["a"], psycopg.errors.QueryCanceled)
        assert outcome["b"] is None
    finally:
        a.close()
        b.close()


def test_query_wait_notify(pg: EmbeddedPostgres, proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory(proxy_config(pg, default_pool_size=1, query_wait_notify=1))
    holder, waiter = connect(proxy), connect(proxy)
    notices: list[str] = []
    waiter.add_notice_handler(lambda diag: notices.append(diag.message_primary or ""))
    try:
        holding = threading.Thread(target=holder.execute, args=("select pg_sleep(2.5)",))
        holding.start()
        time.sleep(0.3)
        waiter.execute("select 1")  # queued ~2 s behind the holder
        holding.join(10)
        assert notices == ["No server connection available in appdb backend, client being queued"]
        waiter.execute("select 1")  # no wait: no notice
        assert len(notices) == 1
    finally:
        holder.close()
        waiter.close()


def test_server_check_delay_zero_tests_a_server_before_each_use(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory
) -> None:
    # The check counts itself in a session variable of the backend; the session reset
    # (DISCARD ALL) clears it when each client leaves, before the next check.
    check = (
        "select set_config('pgproxy.checks', (coalesce(nullif(current_setting("
        "'pgproxy.checks', true), ''), '0')::int + 1)::text, false)"
    )
    proxy = proxy_factory(
        proxy_config(pg, server_check_delay=0, server_check_query=check, pool_mode="session",
                     default_pool_size=1)
    )  # fmt: skip
    seen = []
    for _ in range(3):
        with connect(proxy) as conn:
            seen.append(
                conn.execute(
                    "select pg_backend_pid(), current_setting('pgproxy.checks', true)"
                ).fetchone()
            )
    assert len({pid for pid, _ in seen}) == 1  # one server, kept
    assert [checks for _, checks in seen] == ["1", "1", "1"]  # checked before each use


def test_pool_mode_and_prepared_statements_change_on_running_pools(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(proxy_config(pg, pool_mode="statement", admin_users="app"))
    conn = connect(proxy)  # the pool exists, in statement mode
    with pytest.raises(psycopg.OperationalError, match="statement pooling mode"):  # noqa: SIM117
        with conn.transaction():
            conn.execute("select 1")
    conn.close()
    with connect(proxy, dbname="pgbouncer") as admin:
        admin.execute("SET pool_mode = transaction")
        admin.execute("SET max_prepared_statements = 0")
    with connect(proxy, prepare_threshold=0) as conn:
        with conn.transaction():  # transaction mode now
            conn.execute("select %s::int", [1])
        # 0 turns the mapping off: the client's own name is on the server.
        names = conn.execute("select name from pg_prepared_statements").fetchall()
        assert names and not any(name.startswith("PGPROXY_") for (name,) in names), names


def test_console_sessions_count_in_the_client_limits_and_stats(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(
        proxy_config(pg, admin_users="app", stats_users="md5user",
                     users={"app": {"password": "app-secret"},
                            "md5user": {"password": "md5-secret"}})
    )  # fmt: skip
    with connect(proxy, dbname="pgbouncer", password="app-secret") as admin:
        admin.execute("SET max_db_client_connections = 1")
        # A stats user over the limit is refused; an admin user never is.
        with pytest.raises(psycopg.OperationalError, match="max_db_client_connections"):
            connect(proxy, dbname="pgbouncer", user="md5user", password="md5-secret")
        with connect(proxy, dbname="pgbouncer", password="app-secret") as second:
            (row,) = [r for r in _rows(second, "SHOW DATABASES") if r["name"] == "pgbouncer"]
            assert (row["max_client_connections"], row["current_client_connections"]) == (1, 2)
        before = {r["name"]: r["value"] for r in _rows(admin, "SHOW TOTALS")}
        after = {r["name"]: r["value"] for r in _rows(admin, "SHOW TOTALS")}
        # Each console query counts as a transaction of the pgbouncer database.
        assert after["total_query_count"] == before["total_query_count"] + 1


def test_a_first_login_waits_for_a_server_that_comes_up(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory
) -> None:
    """Nothing listens on the server's port when the client logs in: it waits, and is
    served once the port answers (here a second PostgreSQL port is simulated by a relay
    started 1.5 s later)."""
    port = free_port()
    databases = {"late": {"host": "127.0.0.1", "port": port, "dbname": "appdb", "user": "app",
                          "password": "app-secret"}}  # fmt: skip
    proxy = proxy_factory(proxy_config(pg, databases=databases, server_login_retry=0.5))
    stop = threading.Event()

    def relay() -> None:
        time.sleep(1.5)
        listener = socket.create_server(("127.0.0.1", port))
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            upstream = socket.create_connection(("127.0.0.1", pg.port))
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pipe, args=(source, sink, stop), daemon=True).start()
        listener.close()

    thread = threading.Thread(target=relay, daemon=True)
    thread.start()
    try:
        started = time.monotonic()
        with connect(proxy, dbname="late", connect_timeout=10) as conn:
            assert conn.execute("select 1").fetchone() == (1,)
        assert 1.0 < time.monotonic() - started < 5
    finally:
        stop.set()
        thread.join(5)


def _pipe(source: Any, sink: Any, stop: threading.Event) -> None:
    source.settimeout(0.2)
    try:
        while not stop.is_set():
            try:
                data = source.recv(65536)
            except TimeoutError:
                continue
            if not data:
                break
            sink.sendall(data)
    except OSError:
        pass
    finally:
        sink.close()
