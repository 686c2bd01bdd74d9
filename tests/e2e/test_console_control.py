"""The admin console's control commands, RELOAD, SET, signals and shutdown, end to end:
psql and psycopg against real pgproxy processes in front of a real PostgreSQL.

Console sessions use psycopg's ``ClientCursor``: it always sends a simple Query ('Q')
message (``psycopg/client_cursor.py`` calls ``pgconn.send_query``), whereas psycopg's
default cursor switches to Parse/Bind/Execute for parameters or after
``prepare_threshold`` runs of one query, which the console refuses.

Each test gets a proxy of its own. Pools log in to PostgreSQL as roles only this module
uses, so ``pg_stat_activity`` counts exactly the servers of the proxy under test. Every
wait is bounded: what the test expects to block runs in a thread (still running after
``PENDING`` seconds = blocked), everything else runs under a ``PROMPT`` deadline, so a
proxy that hangs fails a test rather than stalling the suite.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
import tomli_w

from pgproxy.embedded import EmbeddedPostgres
from tests.support import ProxyFactory, ProxyProcess, proxy_config, psql

ROLE = "ctluser"  # the forced server user of "appdb"
ROLE2 = "ctluser2"  # the forced server user of "otherdb" (also PostgreSQL's appdb)
PASSWORD = "ctl-secret"
ADMIN = "admin"
STATS = "stats"
#: Seconds a "does not complete" check waits: the work must still be pending after this.
PENDING = 0.5
#: Upper bound of every wait for something that should happen promptly.
PROMPT = 10.0

Conn = psycopg.Connection[Any]


# -- threads and deadlines -----------------------------------------------------------------


class InThread:
    """``fn()`` in a daemon thread; ``result`` or ``error`` once it has ended."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self._fn = fn
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.result = self._fn()
        except BaseException as exc:  # reported by the test through .error
            self.error = exc

    def done(self, timeout: float) -> bool:
        """Whether ``fn`` ended within ``timeout`` seconds."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def value(self, timeout: float = PROMPT) -> Any:
        """``fn``'s return value; fails if it did not end in time or raised."""
        assert self.done(timeout), f"still running after {timeout:g} s"
        if self.error is not None:
            raise AssertionError(f"failed: {self.error!r}") from self.error
        return self.result


def _bounded(fn: Callable[[], Any], timeout: float = PROMPT) -> Any:
    """``fn()``, failing the test if it takes longer than ``timeout``; its exception
    propagates as is."""
    job = InThread(fn)
    assert job.done(timeout), f"did not complete within {timeout:g} s"
    if job.error is not None:
        raise job.error
    return job.result


def _query(conn: Conn, sql: str) -> Any:
    """The first column of the first row of ``sql`` (unbounded: for threads)."""
    row = conn.execute(sql.encode()).fetchone()
    assert row is not None
    return row[0]


def _fetch(conn: Conn, sql: str) -> Any:
    """``_query`` that must complete promptly."""
    return _bounded(lambda: _query(conn, sql))


def _commit(conn: Conn) -> None:
    _bounded(conn.commit)


def _wait_for(condition: Callable[[], bool], what: str, seconds: float = PROMPT) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# -- PostgreSQL side -----------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def ctl_roles(pg: EmbeddedPostgres) -> None:
    """Two roles only these tests log in to PostgreSQL as."""
    for role in (ROLE, ROLE2):
        pg.create_role(role, PASSWORD)
        grants = f"GRANT ALL ON TABLE t TO {role}; GRANT ALL ON SEQUENCE t_id_seq TO {role};"
        pg.sql(grants, "appdb")


@pytest.fixture(scope="module")
def superuser(pg: EmbeddedPostgres) -> Iterator[Conn]:
    """A direct superuser connection to PostgreSQL, for pg_stat_activity."""
    with psycopg.connect(pg.superuser_dsn("appdb"), autocommit=True) as conn:
        yield conn


def _servers(superuser: Conn, role: str = ROLE) -> set[int]:
    """Backend pids of ``role`` in PostgreSQL's appdb right now."""
    rows = superuser.execute(
        "select pid from pg_stat_activity where usename = %s and datname = 'appdb'", (role,)
    ).fetchall()
    return {row[0] for row in rows}


def _sleeping(superuser: Conn, role: str) -> bool:
    row = superuser.execute(
        "select count(*) from pg_stat_activity"
        " where usename = %s and query like 'select pg_sleep%%'",
        (role,),
    ).fetchone()
    return row is not None and row[0] > 0


# -- proxies and their clients -------------------------------------------------------------


def _entry(pg: EmbeddedPostgres, user: str = ROLE, **extra: Any) -> dict[str, Any]:
    return {
        "host": "127.0.0.1",
        "port": pg.port,
        "dbname": "appdb",
        "user": user,
        "password": PASSWORD,
        **extra,
    }


def _config(pg: EmbeddedPostgres, *, other: bool = False, **overrides: Any) -> dict[str, Any]:
    """Transaction mode, admin_users = [admin], stats_users = [stats]; ``appdb`` served as
    ROLE, and with ``other`` also ``otherdb`` served as ROLE2."""
    databases = {"appdb": _entry(pg)}
    if other:
        databases["otherdb"] = _entry(pg, ROLE2)
    overrides.setdefault("databases", databases)
    overrides.setdefault("pool_mode", "transaction")
    return proxy_config(pg, admin_users=[ADMIN], stats_users=[STATS], **overrides)


def _write_config(proxy: ProxyProcess, config: dict[str, Any]) -> None:
    with open(proxy.config_path, "wb") as config_file:
        tomli_w.dump(config, config_file)


def _connect_client(proxy: ProxyProcess, dbname: str = "appdb", **kwargs: Any) -> Conn:
    kwargs.setdefault("autocommit", True)
    kwargs.setdefault("connect_timeout", 5)
    kwargs.setdefault("prepare_threshold", None)  # transaction pooling: never prepare
    return psycopg.connect(proxy.dsn(dbname=dbname, user="app"), **kwargs)


def _login_error(proxy: ProxyProcess, dbname: str = "appdb") -> str:
    """The FATAL error a new client of ``dbname`` gets at login."""
    with pytest.raises(psycopg.OperationalError) as refused:
        _bounded(lambda: _connect_client(proxy, dbname).close())
    message = str(refused.value)
    assert "FATAL" in message, message
    return message


def _refused_once_shutting_down(proxy: ProxyProcess) -> str:
    """Poll new logins until one is refused (a signal is handled asynchronously): as
    PgBouncer, a shutting-down pgproxy stops listening on TCP."""
    deadline = time.monotonic() + PROMPT
    while True:
        try:
            _bounded(lambda: _connect_client(proxy).close())
        except psycopg.OperationalError as exc:
            if "Connection refused" in str(exc):
                return str(exc)
            # (A connection the kernel queued just as the listener closed is dropped; one
            # accepted just before it closed is told at login, as PgBouncer does.)
            assert any(
                sign in str(exc)
                for sign in (
                    "closed the connection unexpectedly",
                    "Connection reset by peer",
                    "pooler is shutting down",
                )
            ), str(exc)
        assert time.monotonic() < deadline, "new logins were never refused"
        time.sleep(0.05)


def _still_running(proxy: ProxyProcess) -> bool:
    """pgproxy is still running ``PENDING`` seconds from now."""
    with contextlib.suppress(subprocess.TimeoutExpired):
        proxy.popen.wait(PENDING)
    return proxy.alive()


def _exit_code(proxy: ProxyProcess, seconds: float = PROMPT) -> int:
    try:
        return proxy.popen.wait(seconds)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"pgproxy did not exit; log:\n{proxy.log_tail()}") from None


class Console:
    """A psycopg console session; every command goes as a simple Query message."""

    def __init__(self, proxy: ProxyProcess, user: str = ADMIN, dbname: str = "pgbouncer") -> None:
        self.conn: Conn = _bounded(
            lambda: psycopg.connect(
                proxy.dsn(dbname=dbname, user=user),
                autocommit=True,
                connect_timeout=5,
                cursor_factory=psycopg.ClientCursor,
            )
        )

    def _run(self, command: str) -> str:
        return self.conn.execute(command.encode()).statusmessage or ""

    def run(self, command: str) -> str:
        """Run ``command``; return its CommandComplete tag."""
        tag: str = _bounded(lambda: self._run(command))
        return tag

    def run_in_thread(self, command: str) -> InThread:
        """Run ``command`` in a thread (for PAUSE and WAIT_CLOSE, which wait)."""
        return InThread(lambda: self._run(command))

    def show(self, what: str) -> list[dict[str, Any]]:
        """``SHOW what`` as a list of {column: value} rows."""

        def fetch() -> list[dict[str, Any]]:
            cursor = self.conn.execute(f"SHOW {what}".encode())
            assert cursor.description is not None
            names = [column.name for column in cursor.description]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

        rows: list[dict[str, Any]] = _bounded(fetch)
        return rows

    def state(self) -> dict[str, str]:
        return {row["key"]: row["value"] for row in self.show("STATE")}

    def database(self, name: str) -> dict[str, Any]:
        rows = [row for row in self.show("DATABASES") if row["name"] == name]
        assert len(rows) == 1, rows
        return rows[0]

    def config(self, key: str) -> dict[str, Any]:
        rows = [row for row in self.show("CONFIG") if row["key"] == key]
        assert len(rows) == 1, rows
        return rows[0]

    def error(self, command: str) -> psycopg.Error:
        """The ERROR ``command`` answers with; the session must stay usable."""
        with pytest.raises(psycopg.Error) as failed:
            self.run(command)
        assert not self.conn.closed and not self.conn.broken, f"{command!r} ended the session"
        return failed.value


def _message(error: psycopg.Error) -> str:
    return error.diag.message_primary or ""


class Connections:
    """Opens clients and console sessions; at the end of the test stops their proxies
    first (so a thread blocked in a query wakes up), then closes them."""

    def __init__(self) -> None:
        self.proxies: list[ProxyProcess] = []
        self.conns: list[Conn] = []

    def _track(self, proxy: ProxyProcess) -> None:
        if proxy not in self.proxies:
            self.proxies.append(proxy)

    def client(self, proxy: ProxyProcess, dbname: str = "appdb", **kwargs: Any) -> Conn:
        """A pool client (autocommit unless told otherwise)."""
        self._track(proxy)
        conn: Conn = _bounded(lambda: _connect_client(proxy, dbname, **kwargs))
        self.conns.append(conn)
        return conn

    def console(self, proxy: ProxyProcess, user: str = ADMIN) -> Console:
        """A console session of ``user``."""
        self._track(proxy)
        console = Console(proxy, user)
        self.conns.append(console.conn)
        return console

    def close(self) -> None:
        for proxy in self.proxies:
            proxy.stop()
        for conn in self.conns:
            conn.close()


@pytest.fixture
def conns() -> Iterator[Connections]:
    connections = Connections()
    yield connections
    connections.close()


# -- PAUSE / RESUME / SUSPEND --------------------------------------------------------------


def test_pause_waits_for_the_open_transaction_and_holds_new_queries_until_resume(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory, conns: Connections, superuser: Conn
) -> None:
    proxy = proxy_factory(_config(pg))
    console = conns.console(proxy)
    holder = conns.client(proxy, autocommit=False)
    waiter = conns.client(proxy)
    assert _fetch(waiter, "select 1") == 1
    holder_pid = _fetch(holder, "select pg_backend_pid()")  # its transaction stays open
    assert holder_pid in _servers(superuser)
    pause = conns.console(proxy).run_in_thread("PAUSE")
    assert not pause.done(PENDING), "PAUSE returned while a transaction was open"
    # The open transaction goes on on its server; a new one waits.
    assert _fetch(holder, "select 2") == 2
    query = InThread(lambda: _query(waiter, "select 'after resume'"))
    assert not query.done(PENDING), "a query was served while PAUSE was pending"
    _commit(holder)
    assert pause.value() == "PAUSE"
    _wait_for(lambda: not _servers(superuser), "every server to be closed by PAUSE")
    assert console.state() == {"active": "no", "paused": "yes", "suspended": "no"}
    assert not query.done(PENDING), "a query was served while paused"
    assert not _servers(superuser)
    # Errors while paused.
    for command in ("PAUSE", "PAUSE appdb", "SUSPEND", "KILL", "KILL appdb"):
        assert _message(console.error(command)) == "already suspended/paused", command
    assert console.run("RESUME") == "RESUME"
    assert query.value() == "after resume"
    assert console.state() == {"active": "yes", "paused": "no", "suspended": "no"}
    assert _message(console.error("RESUME")) == "pooler is not paused/suspended"
    assert _fetch(holder, "select 3") == 3
    _commit(holder)


def test_suspend_closes_servers_and_resume_serves_the_waiters(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory, conns: Connections, superuser: Conn
) -> None:
    proxy = proxy_factory(_config(pg))
    console = conns.console(proxy)
    client = conns.client(proxy)
    assert _fetch(client, "select 1") == 1
    assert _servers(superuser)
    assert console.run("SUSPEND") == "SUSPEND"
    _wait_for(lambda: not _servers(superuser), "every server to be closed by SUSPEND")
    assert console.state() == {"active": "no", "paused": "no", "suspended": "yes"}
    assert _message(console.error("PAUSE")) == "already suspended/paused"
    query = InThread(lambda: _query(client, "select 5"))
    assert not query.done(PENDING), "a query was served while suspended"
    assert console.run("RESUME") == "RESUME"
    assert query.value() == 5
    assert console.state()["active"] == "yes"


def test_pause_and_resume_one_database(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory, conns: Connections, superuser: Conn
) -> None:
    proxy = proxy_factory(_config(pg, other=True))
    console = conns.console(proxy)
    app = conns.client(proxy)
    other = conns.client(proxy, "otherdb")
    assert _fetch(app, "select 1") == 1
    assert _fetch(other, "select 1") == 1
    assert _servers(superuser, ROLE2)
    assert console.run("PAUSE otherdb") == "PAUSE"
    _wait_for(lambda: not _servers(superuser, ROLE2), "otherdb's servers to be closed")
    assert console.database("otherdb")["paused"] == 1
    assert console.database("appdb")["paused"] == 0
    assert console.state()["paused"] == "no"  # only one database is paused
    query = InThread(lambda: _query(other, "select 'other'"))
    assert not query.done(PENDING), "a query of the paused database was served"
    assert _fetch(app, "select 'app'") == "app"  # the other database is untouched
    assert _servers(superuser, ROLE)
    # Errors.
    assert _message(console.error("RESUME appdb")) == "database appdb is not paused"
    assert _message(console.error("PAUSE nosuchdb")) == "no such database: nosuchdb"
    assert _message(console.error("RESUME nosuchdb")) == "no such database: nosuchdb"
    assert _message(console.error("PAUSE pgbouncer")) == "cannot pause admin db: pgbouncer"
    assert console.run("RESUME otherdb") == "RESUME"
    assert query.value() == "other"
    assert console.database("otherdb")["paused"] == 0
    assert _message(console.error("RESUME otherdb")) == "database otherdb is not paused"


# -- DISABLE / ENABLE ----------------------------------------------------------------------


def test_disable_refuses_new_logins_and_enable_restores_them(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory, conns: Connections
) -> None:
    proxy = proxy_factory(_config(pg))
    console = conns.console(proxy)
    existing = conns.client(proxy)
    assert _fetch(existing, "select 1") == 1
    assert console.run("DISABLE appdb") == "DISABLE"
    assert 'database "appdb" is disabled' in _login_error(proxy)
    result = psql(["-c", "select 1"], port=proxy.port, user="app", timeout=PROMPT)
    assert result.returncode != 0
    assert 'FATAL:  database "appdb" is disabled' in result.stderr
    assert console.database("appdb")["disabled"] == 1
    assert _fetch(existing, "select 2") == 2  # a connected client is not affected
    assert console.run("ENABLE appdb") == "ENABLE"
    assert console.database("appdb")["disabled"] == 0
    assert _fetch(conns.client(proxy), "select 3") == 3
    assert _message(console.error("DISABLE")) == "a database is required"
    assert _message(console.error("ENABLE")) == "a database is required"
    assert _message(console.error("DISABLE nosuchdb")) == "no such database: nosuchdb"


# -- RECONNECT / WAIT_CLOSE ----------------------------------------------------------------


def test_reconnect_replaces_the_server_after_the_open_transaction(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory, conns: Connections, superuser: Conn
) -> None:
    proxy = proxy_factory(_config(pg, default_pool_size=1))
    console = conns.console(proxy)
    tag = f"reconnect-{uuid.uuid4().hex[:12]}"
    conn = conns.client(proxy, autocommit=False)
    before = _fetch(conn, "select pg_backend_pid()")  # the pool's only server, held
    assert console.run("RECONNECT") == "RECONNECT"
    server = [row for row in console.show("SERVERS") if row["remote_pid"] == before]
    assert len(server) == 1, console.show("SERVERS")
    assert server[0]["close_needed"] == 1
    wait_close = conns.console(proxy).run_in_thread("WAIT_CLOSE")
    assert not wait_close.done(PENDING), "WAIT_CLOSE returned while the server was in use"
    # The open transaction is not broken.
    assert _fetch(conn, "select pg_backend_pid()") == before
    _bounded(lambda: conn.execute("insert into t (v) values (%s)", (tag,)))
    _commit(conn)
    assert wait_close.value() == "WAIT_CLOSE"
    after = _fetch(conn, "select pg_backend_pid()")  # the next transaction
    _commit(conn)
    assert after != before
    _wait_for(lambda: before not in _servers(superuser), "the old server to go")
    row = superuser.execute("select count(*) from t where v = %s", (tag,)).fetchone()
    assert row == (1,)
    # RECONNECT of one database; WAIT_CLOSE of it returns once its idle server is gone.
    assert console.run("RECONNECT appdb") == "RECONNECT"
    assert console.run("WAIT_CLOSE appdb") == "WAIT_CLOSE"
    assert _fetch(conn, "select pg_backend_pid()") not in (before, after)
    _commit(conn)
    assert _message(console.error("RECONNECT nosuchdb")) == "no such database: nosuchdb"


# -- KILL / KILL_CLIENT --------------------------------------------------------------------


def test_kill_database_drops_its_clients_and_servers_then_holds_queries(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory, conns: Connections, superuser: Conn
) -> None:
    proxy = proxy_factory(_config(pg, other=True))
    console = conns.console(proxy)
    idle, busy = conns.client(proxy), conns.client(proxy)
    other = conns.client(proxy, "otherdb")
    assert _fetch(idle, "select 1") == 1
    assert _fetch(other, "select 1") == 1
    sleeper = InThread(lambda: busy.execute("select pg_sleep(30)"))
    _wait_for(lambda: _sleeping(superuser, ROLE), "the sleeping query")
    assert console.run("KILL appdb") == "KILL"
    assert sleeper.done(PROMPT), "KILL left a running query alone"
    assert isinstance(sleeper.error, psycopg.Error), sleeper.result
    assert sleeper.error.diag.severity == "FATAL"
    assert sleeper.error.diag.message_primary == "database removed"
    with pytest.raises(psycopg.OperationalError) as killed:
        _fetch(idle, "select 1")
    assert killed.value.diag.severity == "FATAL"
    assert killed.value.diag.message_primary == "database removed"
    _wait_for(lambda: not _servers(superuser, ROLE), "appdb's servers to be gone")
    assert _fetch(other, "select 'other'") == "other"  # another database is untouched
    assert _servers(superuser, ROLE2)
    assert console.database("appdb")["paused"] == 1
    # A new client logs in; its query waits until RESUME.
    newcomer = conns.client(proxy)
    query = InThread(lambda: _query(newcomer, "select 'resumed'"))
    assert not query.done(PENDING), "a query ran on a killed (paused) database"
    assert not _servers(superuser, ROLE)
    assert console.run("RESUME appdb") == "RESUME"
    assert query.value() == "resumed"
    assert _message(console.error("KILL nosuchdb")) == "no such database: nosuchdb"
    assert _message(console.error("KILL pgbouncer")) == "cannot kill admin db: pgbouncer"


def test_kill_without_argument_drops_every_client_but_the_console(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory, conns: Connections, superuser: Conn
) -> None:
    proxy = proxy_factory(_config(pg, other=True))
    console = conns.console(proxy)
    clients = [conns.client(proxy), conns.client(proxy, "otherdb")]
    for conn in clients:
        assert _fetch(conn, "select 1") == 1
    assert console.run("KILL") == "KILL"
    for conn in clients:
        with pytest.raises(psycopg.OperationalError) as killed:
            _fetch(conn, "select 1")
        assert killed.value.diag.message_primary == "database removed"
    _wait_for(
        lambda: not _servers(superuser, ROLE) and not _servers(superuser, ROLE2),
        "every server to be gone",
    )
    assert console.state()["paused"] == "yes"  # the console session survived
    assert console.run("RESUME") == "RESUME"
    assert _fetch(conns.client(proxy, "otherdb"), "select 2") == 2


def test_kill_client_drops_only_that_client(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory, conns: Connections
) -> None:
    proxy = proxy_factory(_config(pg))
    console = conns.console(proxy)
    victim = conns.client(proxy, application_name="victim")
    bystander = conns.client(proxy, application_name="bystander")
    assert _fetch(victim, "select 1") == 1
    assert _fetch(bystander, "select 1") == 1
    rows = [row for row in console.show("CLIENTS") if row["application_name"] == "victim"]
    assert len(rows) == 1, rows
    victim_id = rows[0]["id"]
    assert console.run(f"KILL_CLIENT {victim_id}") == "KILL_CLIENT"
    with pytest.raises(psycopg.OperationalError) as killed:
        _fetch(victim, "select 1")
    assert killed.value.diag.severity == "FATAL"
    assert killed.value.diag.message_primary == "admin forced disconnect"
    assert _fetch(bystander, "select 'alive'") == "alive"
    _wait_for(
        lambda: all(row["application_name"] != "victim" for row in console.show("CLIENTS")),
        "the killed client to leave SHOW CLIENTS",
    )
    assert _message(console.error(f"KILL_CLIENT {victim_id}")) == "client not found"
    assert _message(console.error("KILL_CLIENT 987654321")) == "client not found"
    assert _message(console.error("KILL_CLIENT abc")) == "invalid client pointer supplied"
    assert _fetch(bystander, "select 'still alive'") == "still alive"


# -- RELOAD and SET ------------------------------------------------------------------------


def test_reload_resizes_adds_and_removes_databases(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory, conns: Connections, superuser: Conn
) -> None:
    config = _config(pg, other=True, default_pool_size=5)
    config["databases"]["appdb"]["pool_size"] = 2
    proxy = proxy_factory(config)
    console = conns.console(proxy)
    assert console.database("appdb")["pool_size"] == 2
    holders = [conns.client(proxy, autocommit=False) for _ in range(3)]
    leaving = conns.client(proxy, "otherdb")
    assert _fetch(leaving, "select 1") == 1
    # Two transactions hold the pool's two servers; the third waits.
    for holder in holders[:2]:
        assert _fetch(holder, "select 1") == 1
    third = InThread(lambda: _query(holders[2], "select 'third'"))
    assert not third.done(PENDING), "a pool of size 2 served a third transaction"
    assert len(_servers(superuser, ROLE)) == 2
    changed = {**config, "databases": dict(config["databases"])}
    changed["databases"]["appdb"] = {**config["databases"]["appdb"], "pool_size": 3}
    del changed["databases"]["otherdb"]
    changed["databases"]["newdb"] = _entry(pg, ROLE2)
    _write_config(proxy, changed)
    assert console.run("RELOAD") == "RELOAD"
    assert third.value() == "third"  # the pool grew to 3 at once
    assert len(_servers(superuser, ROLE)) == 3
    assert console.database("appdb")["pool_size"] == 3
    names = [row["name"] for row in console.show("DATABASES")]
    assert "newdb" in names
    assert "otherdb" not in names
    assert _fetch(conns.client(proxy, "newdb"), "select current_user") == ROLE2
    assert "no such database: otherdb" in _login_error(proxy, "otherdb")
    assert _fetch(leaving, "select 'finishing'") == "finishing"  # connected: goes on
    for holder in holders:
        _commit(holder)


def test_reload_of_a_new_server_address_replaces_busy_servers_once_free(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory, conns: Connections, superuser: Conn
) -> None:
    proxy = proxy_factory(_config(pg, default_pool_size=1))
    console = conns.console(proxy)
    conn = conns.client(proxy, autocommit=False)
    before = _fetch(conn, "select pg_backend_pid()")  # over TCP, held in a transaction
    # The same PostgreSQL, now through its Unix socket.
    _write_config(proxy, {**proxy.config, "databases": {"appdb": _entry(pg, host=pg.socket_dir)}})
    assert console.run("RELOAD") == "RELOAD"
    server = [row for row in console.show("SERVERS") if row["remote_pid"] == before]
    assert len(server) == 1, console.show("SERVERS")
    assert server[0]["close_needed"] == 1
    wait_close = conns.console(proxy).run_in_thread("WAIT_CLOSE appdb")
    assert not wait_close.done(PENDING), "WAIT_CLOSE returned while the server was in use"
    assert _fetch(conn, "select pg_backend_pid()") == before  # the transaction goes on
    _commit(conn)
    assert wait_close.value() == "WAIT_CLOSE"
    after = _fetch(conn, "select pg_backend_pid()")
    _commit(conn)
    assert after != before
    row = superuser.execute("select client_addr from pg_stat_activity where pid = %s", (after,))
    assert row.fetchone() == (None,)  # a Unix-socket connection: the new address is used


def test_reload_of_new_server_tls_settings_replaces_servers_once_free(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory, conns: Connections
) -> None:
    """PgBouncer's rule: a server made under other server TLS settings is obsolete, and
    closed once free (the idle ones at the RELOAD)."""
    proxy = proxy_factory(_config(pg, default_pool_size=1))
    console = conns.console(proxy)
    conn = conns.client(proxy, autocommit=False)
    before = _fetch(conn, "select pg_backend_pid()")
    _commit(conn)
    # "allow": plain first (the test cluster has no TLS), so the new server works too.
    _write_config(proxy, {**proxy.config, "server_tls_sslmode": "allow"})
    assert console.run("RELOAD") == "RELOAD"
    after = _fetch(conn, "select pg_backend_pid()")
    _commit(conn)
    assert after != before
    assert "server TLS settings changed: obsolete connections" in proxy.log_text()
    # A RELOAD that changes nothing of it keeps the server.
    assert console.run("RELOAD") == "RELOAD"
    assert _fetch(conn, "select pg_backend_pid()") == after


def test_reload_that_demotes_an_admin_applies_to_open_sessions(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory, conns: Connections
) -> None:
    proxy = proxy_factory(_config(pg))
    console = conns.console(proxy)
    assert console.run("RECONNECT") == "RECONNECT"
    _write_config(proxy, {**proxy.config, "admin_users": ["someone"], "stats_users": [ADMIN]})
    assert console.run("RELOAD") == "RELOAD"
    assert _message(console.error("RECONNECT")) == "admin access needed"
    assert _message(console.error("RELOAD")) == "admin access needed"
    assert console.state()["active"] == "yes"  # SHOW is still allowed to a stats user


@pytest.mark.parametrize("broken", ["syntax", "bad-value"])
def test_reload_of_a_broken_file_fails_and_keeps_the_running_config(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory, conns: Connections, broken: str
) -> None:
    config = _config(pg)
    config["databases"]["appdb"]["pool_size"] = 2
    proxy = proxy_factory(config)
    console = conns.console(proxy)
    connected = conns.client(proxy)
    assert _fetch(connected, "select 1") == 1
    if broken == "syntax":
        proxy.config_path.write_text("[[[ not toml\n" + proxy.config_path.read_text())
    else:
        _write_config(proxy, {**proxy.config, "pool_mode": "no-such-mode"})
    error = console.error("RELOAD")
    assert error.diag.sqlstate == "F0000"
    assert _message(error) == "RELOAD failed, see logs for additional details"
    assert console.database("appdb")["pool_size"] == 2
    assert console.config("pool_mode")["value"] == "transaction"
    assert _fetch(connected, "select 2") == 2
    assert _fetch(conns.client(proxy), "select 3") == 3
    assert proxy.alive()


def test_server_round_robin_takes_the_server_idle_longest(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory, conns: Connections
) -> None:
    """PgBouncer's default hands the next transaction the server used last (LIFO: the load
    on as few servers as can take it); with server_round_robin, here set from the console,
    the one idle longest, so that the pool's servers take turns."""
    proxy = proxy_factory(_config(pg, default_pool_size=3))
    console = conns.console(proxy)
    holders = [conns.client(proxy, autocommit=False) for _ in range(3)]
    opened = [_fetch(holder, "select pg_backend_pid()") for holder in holders]
    assert len(set(opened)) == 3
    for holder in holders:
        _commit(holder)  # released in this order: opened[0] has been idle longest
    client = conns.client(proxy)
    assert [_fetch(client, "select pg_backend_pid()") for _ in range(4)] == [opened[2]] * 4
    assert console.run("SET server_round_robin = 1") == "SET server_round_robin=1"
    assert console.config("server_round_robin")["value"] == "1"
    turns = [_fetch(client, "select pg_backend_pid()") for _ in range(6)]
    assert turns == [opened[0], opened[1], opened[2]] * 2


def test_set_default_pool_size_resizes_pools_at_once(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory, conns: Connections, superuser: Conn
) -> None:
    proxy = proxy_factory(_config(pg, default_pool_size=5))  # appdb has no pool_size
    console = conns.console(proxy)
    holders = [conns.client(proxy, autocommit=False) for _ in range(3)]
    first, second = holders[:2]
    pids = {_fetch(holder, "select pg_backend_pid()") for holder in holders}
    assert len(pids) == 3
    for holder in holders:
        _commit(holder)
    assert console.run("SET default_pool_size = 1") == "SET default_pool_size=1"
    assert console.config("default_pool_size")["value"] == "1"
    assert console.database("appdb")["pool_size"] == 1
    _wait_for(lambda: len(_servers(superuser)) <= 1, "the idle servers above 1 to close")
    assert _fetch(first, "select 1") == 1  # holds the only server
    query = InThread(lambda: _query(second, "select 'second'"))
    assert not query.done(PENDING), "a pool of size 1 served two transactions"
    assert len(_servers(superuser)) == 1
    _commit(first)
    assert query.value() == "second"
    _commit(second)
    # And it grows again.
    assert console.run("SET default_pool_size TO 2") == "SET default_pool_size=2"
    assert console.config("default_pool_size")["value"] == "2"
    assert _fetch(first, "select 1") == 1
    assert _fetch(second, "select 'both'") == "both"
    _commit(first)
    _commit(second)
    # Errors: nothing changes.
    for command in ("SET no_such_key = 1", "SET default_pool_size = 'lots'"):
        error = console.error(command)
        assert _message(error) == "SET failed", command
        assert error.diag.message_detail, command
    error = console.error("SET listen_port = 7000")  # restart-only
    assert _message(error) == "SET failed"
    assert console.config("default_pool_size")["value"] == "2"
    assert console.config("listen_port")["value"] == str(proxy.port)


def test_set_reaches_the_next_login(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory, conns: Connections
) -> None:
    # A login reads its settings from a snapshot the daemon makes with each configuration:
    # SET (as RELOAD) must replace it before the next client arrives.
    proxy = proxy_factory(_config(pg))
    console = conns.console(proxy)
    client = conns.client(proxy)
    assert _fetch(client, "select 1") == 1  # two clients now: the console and this one
    assert console.run("SET max_client_conn = 2") == "SET max_client_conn=2"
    assert "no more connections allowed (max_client_conn)" in _login_error(proxy)
    assert console.run("SET max_client_conn = 3") == "SET max_client_conn=3"
    assert _fetch(conns.client(proxy), "select 'third'") == "third"


# -- signals -------------------------------------------------------------------------------


def test_sighup_reloads_the_config_file(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory, conns: Connections
) -> None:
    proxy = proxy_factory(_config(pg))
    console = conns.console(proxy)
    assert "no such database: newdb" in _login_error(proxy, "newdb")
    changed = {**proxy.config, "databases": {**proxy.config["databases"]}}
    changed["databases"]["newdb"] = _entry(pg, ROLE2)
    _write_config(proxy, changed)
    os.kill(proxy.pid, signal.SIGHUP)
    _wait_for(
        lambda: any(row["name"] == "newdb" for row in console.show("DATABASES")),
        "newdb in SHOW DATABASES after SIGHUP",
    )
    assert _fetch(conns.client(proxy, "newdb"), "select current_user") == ROLE2


def test_sigusr1_pauses_and_sigusr2_resumes(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory, conns: Connections, superuser: Conn
) -> None:
    proxy = proxy_factory(_config(pg))
    console = conns.console(proxy)
    client = conns.client(proxy)
    assert _fetch(client, "select 1") == 1
    os.kill(proxy.pid, signal.SIGUSR1)
    _wait_for(lambda: console.state()["paused"] == "yes", "SHOW STATE paused=yes")
    assert console.state()["active"] == "no"
    _wait_for(lambda: not _servers(superuser), "the servers to be closed")
    query = InThread(lambda: _query(client, "select 'resumed'"))
    assert not query.done(PENDING), "a query was served while paused by SIGUSR1"
    os.kill(proxy.pid, signal.SIGUSR2)
    assert query.value() == "resumed"
    assert console.state() == {"active": "yes", "paused": "no", "suspended": "no"}


# -- shutdown ------------------------------------------------------------------------------


@pytest.mark.parametrize("trigger", ["SIGTERM", "SHUTDOWN WAIT_FOR_CLIENTS"])
def test_shutdown_waits_for_the_clients(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory, conns: Connections, trigger: str
) -> None:
    proxy = proxy_factory(_config(pg))
    console = conns.console(proxy)
    client = conns.client(proxy)
    assert _fetch(client, "select 1") == 1
    if trigger == "SIGTERM":
        os.kill(proxy.pid, signal.SIGTERM)
    else:
        assert console.run(trigger) == "SHUTDOWN"
    assert "Connection refused" in _refused_once_shutting_down(proxy)
    assert _still_running(proxy), "pgproxy exited with a client connected"
    for index in range(3):  # the connected client keeps working, in new transactions
        assert _fetch(client, f"select {index}") == index
    assert console.state()["active"] == "yes"  # the console still answers
    assert proxy.alive()
    client.close()
    # The console session, still open, does not keep pgproxy running.
    assert _exit_code(proxy) == 0


@pytest.mark.parametrize("trigger", ["SIGINT", "SHUTDOWN WAIT_FOR_SERVERS"])
def test_shutdown_waits_for_the_open_transactions(
    pg: EmbeddedPostgres,
    proxy_factory: ProxyFactory,
    conns: Connections,
    superuser: Conn,
    trigger: str,
) -> None:
    proxy = proxy_factory(_config(pg))
    console = conns.console(proxy)
    tag = f"shutdown-{uuid.uuid4().hex[:12]}"
    tx = conns.client(proxy, autocommit=False)
    idle = conns.client(proxy)
    assert _fetch(idle, "select 1") == 1
    _bounded(lambda: tx.execute("insert into t (v) values (%s)", (tag,)))
    if trigger == "SIGINT":
        os.kill(proxy.pid, signal.SIGINT)
    else:
        assert console.run(trigger) == "SHUTDOWN"
    assert "Connection refused" in _refused_once_shutting_down(proxy)
    assert _still_running(proxy), "pgproxy exited under an open transaction"
    assert console.state()["active"] == "yes"  # the console still answers
    # No new transaction starts: as PgBouncer, its client is told "server shutting down"
    # at once; the open one goes on and commits.
    late = InThread(lambda: _query(idle, "select 'late'"))
    assert late.done(PROMPT)
    assert isinstance(late.error, psycopg.OperationalError), late.result
    assert "server shutting down" in str(late.error)
    assert "closing because: server shutting down" in proxy.log_text()
    _bounded(lambda: tx.execute("insert into t (v) values (%s)", (tag,)))
    _commit(tx)
    assert _exit_code(proxy) == 0
    row = superuser.execute("select count(*) from t where v = %s", (tag,)).fetchone()
    assert row == (2,)


def test_shutdown_wait_for_servers_closes_the_clients_already_waiting(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory, conns: Connections
) -> None:
    """A client queued for a server when SHUTDOWN WAIT_FOR_SERVERS comes is closed with
    PgBouncer's "server shutting down"; the transaction holding the server finishes."""
    proxy = proxy_factory(_config(pg, default_pool_size=1))
    console = conns.console(proxy)
    holder = conns.client(proxy, autocommit=False)
    assert _fetch(holder, "select 1") == 1  # the only server, held in a transaction
    waiter = conns.client(proxy)
    waiting = InThread(lambda: _query(waiter, "select 'waited'"))
    assert not waiting.done(PENDING), "the waiter got a server the holder has"
    assert console.run("SHUTDOWN WAIT_FOR_SERVERS") == "SHUTDOWN"
    assert waiting.done(PROMPT)
    assert isinstance(waiting.error, psycopg.OperationalError), waiting.result
    assert "server shutting down" in str(waiting.error)
    assert _fetch(holder, "select 2") == 2  # the open transaction goes on
    _commit(holder)
    assert _exit_code(proxy) == 0


@pytest.mark.parametrize("how", ["second SIGTERM", "second SIGINT", "SIGQUIT", "SHUTDOWN"])
def test_immediate_exit(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory, conns: Connections, how: str
) -> None:
    proxy = proxy_factory(_config(pg))
    console = conns.console(proxy)
    # An open transaction: neither waiting shutdown could end while it lasts.
    tx = conns.client(proxy, autocommit=False)
    assert _fetch(tx, "select 1") == 1
    if how.startswith("second "):
        signum = signal.SIGTERM if how.endswith("SIGTERM") else signal.SIGINT
        os.kill(proxy.pid, signum)
        _refused_once_shutting_down(proxy)  # the first one has been handled
        assert _still_running(proxy)
        os.kill(proxy.pid, signum)
    elif how == "SIGQUIT":
        os.kill(proxy.pid, signal.SIGQUIT)
    else:
        # pgproxy may exit before or after its answer reaches the console.
        with contextlib.suppress(psycopg.OperationalError):
            assert console.run("SHUTDOWN") == "SHUTDOWN"
    assert _exit_code(proxy, 5) == 0


# -- access --------------------------------------------------------------------------------

CONTROL_COMMANDS = [
    "PAUSE",
    "PAUSE appdb",
    "RESUME",
    "RESUME appdb",
    "SUSPEND",
    "DISABLE appdb",
    "ENABLE appdb",
    "RECONNECT",
    "RECONNECT appdb",
    "KILL",
    "KILL appdb",
    "KILL_CLIENT 1",
    "WAIT_CLOSE",
    "WAIT_CLOSE appdb",
    "RELOAD",
    "SHUTDOWN",
    "SHUTDOWN WAIT_FOR_SERVERS",
    "SHUTDOWN WAIT_FOR_CLIENTS",
    "SET default_pool_size = 1",
]


def test_a_stats_user_may_run_no_control_command(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory, conns: Connections
) -> None:
    proxy = proxy_factory(_config(pg))
    stats = conns.console(proxy, STATS)
    client = conns.client(proxy)
    assert _fetch(client, "select 1") == 1
    for command in CONTROL_COMMANDS:
        error = stats.error(command)
        assert _message(error) == "admin access needed", command
        assert error.diag.sqlstate == "08P01", command
    # Nothing happened.
    assert stats.state() == {"active": "yes", "paused": "no", "suspended": "no"}
    appdb = stats.database("appdb")
    assert (appdb["paused"], appdb["disabled"]) == (0, 0)
    assert stats.config("default_pool_size")["value"] == "5"
    assert _fetch(client, "select 2") == 2
    result = psql(["-c", "PAUSE"], port=proxy.port, dbname="pgbouncer", user=STATS, timeout=PROMPT)
    assert result.returncode != 0
    assert "admin access needed" in result.stderr
    assert proxy.alive()


def test_console_access_through_psql_and_psycopg(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory, conns: Connections
) -> None:
    proxy = proxy_factory(_config(pg))
    # psql -c: an admin runs control commands (and the alias database name works).
    for dbname in ("pgbouncer", "pgproxy"):
        result = psql(
            ["-c", "RECONNECT"], port=proxy.port, dbname=dbname, user=ADMIN, timeout=PROMPT
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "RECONNECT"
    result = psql(
        ["-c", "PAUSE nosuchdb"], port=proxy.port, dbname="pgbouncer", user=ADMIN, timeout=PROMPT
    )
    assert result.returncode != 0
    assert "no such database: nosuchdb" in result.stderr
    # Neither admin nor stats user: FATAL at login.
    with pytest.raises(psycopg.OperationalError) as refused:
        conns.console(proxy, "app")
    assert "not allowed" in str(refused.value)
    # psycopg's pgconn.exec_ sends a simple Query too.
    conn = conns.console(proxy).conn
    answer = _bounded(lambda: conn.pgconn.exec_(b"RECONNECT appdb"))
    assert answer.status == psycopg.pq.ExecStatus.COMMAND_OK
    assert answer.command_status == b"RECONNECT"
    # The default cursor with prepare=True sends Parse/Bind/Execute: refused, then closed.
    with pytest.raises(psycopg.Error) as extended:
        _bounded(lambda: psycopg.Cursor(conn).execute(b"SHOW STATE", prepare=True))
    assert _message(extended.value) == "extended query protocol not supported by admin console"
    with pytest.raises(psycopg.OperationalError):
        _bounded(lambda: conn.execute(b"SHOW STATE"))
    assert proxy.alive()
