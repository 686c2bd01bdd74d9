"""Real clients (psycopg sync and async, psql, pgbench) through pgproxy in every pool mode."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from pgproxy.embedded import EmbeddedPostgres
from tests.support import Peak, ProxyFactory, ProxyProcess, proxy_config, psql

MODES = ["session", "transaction", "statement"]


@pytest.fixture(params=MODES)
def proxy(request: pytest.FixtureRequest) -> ProxyProcess:
    """Each module-scoped proxy in turn, one per pool mode."""
    name = {"session": "proxy_session", "transaction": "proxy_tx", "statement": "proxy_statement"}
    proxy_process: ProxyProcess = request.getfixturevalue(name[request.param])
    return proxy_process


@pytest.fixture(params=["session", "transaction"])
def proxy_with_transactions(request: pytest.FixtureRequest) -> ProxyProcess:
    """The proxies whose mode allows transaction blocks."""
    name = {"session": "proxy_session", "transaction": "proxy_tx"}
    proxy_process: ProxyProcess = request.getfixturevalue(name[request.param])
    return proxy_process


def _mode(proxy: ProxyProcess) -> str:
    mode: str = proxy.config["pool_mode"]
    return mode


def _tag() -> str:
    return uuid.uuid4().hex[:12]


# -- basic traffic in every mode -------------------------------------------------------------


def test_autocommit_and_explicit_transactions(proxy: ProxyProcess) -> None:
    tag = _tag()
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        assert conn.execute("select 1 + 1").fetchone() == (2,)
        conn.execute("insert into t (v) values (%s)", (tag + "-auto",))
        if _mode(proxy) != "statement":
            with conn.transaction():
                conn.execute("insert into t (v) values (%s)", (tag + "-commit",))
            with pytest.raises(ZeroDivisionError), conn.transaction():
                conn.execute("insert into t (v) values (%s)", (tag + "-rollback",))
                raise ZeroDivisionError
    with psycopg.connect(proxy.dsn(), autocommit=True) as other:
        rows = other.execute("select v from t where v like %s order by v", (tag + "%",)).fetchall()
    expected = [(tag + "-auto",)]
    if _mode(proxy) != "statement":
        expected = [(tag + "-auto",), (tag + "-commit",)]
    assert rows == expected


def test_error_inside_transaction_then_recovery(proxy_with_transactions: ProxyProcess) -> None:
    tag = _tag()
    with psycopg.connect(proxy_with_transactions.dsn()) as conn:
        conn.execute("insert into t (v) values (%s)", (tag,))
        with pytest.raises(psycopg.errors.UndefinedTable):
            conn.execute("select * from no_such_table")
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("select 1")
        conn.rollback()
        assert conn.execute("select count(*) from t where v = %s", (tag,)).fetchone() == (0,)
        conn.commit()


def test_multi_statement_simple_query(proxy: ProxyProcess) -> None:
    result = psql(["-A", "-t", "-c", "select 1; select 'two'; select 3"], port=proxy.port)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1", "two", "3"]
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        cursor = conn.cursor()
        cursor.execute("select 10; select 20")  # no parameters: one simple Query message
        assert cursor.fetchone() == (10,)
        assert cursor.nextset()
        assert cursor.fetchone() == (20,)


def test_large_result(proxy: ProxyProcess) -> None:
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        rows = conn.execute(
            "select i, repeat('x', 100) from generate_series(1, 200000) as i"
        ).fetchall()
    assert len(rows) == 200000
    assert sum(row[0] for row in rows) == 200000 * 200001 // 2
    assert all(len(row[1]) == 100 for row in rows[:1000])


def test_copy_in_and_out(proxy: ProxyProcess) -> None:
    tag = _tag()
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        cursor = conn.cursor()
        with cursor.copy("COPY t (v) FROM STDIN") as copy:
            for index in range(5000):
                copy.write_row((f"{tag}-{index}",))
        assert conn.execute("select count(*) from t where v like %s", (tag + "-%",)).fetchone() == (
            5000,
        )
        received = []
        with cursor.copy(
            "COPY (select v from t where v like %s order by id) TO STDOUT", (tag + "-%",)
        ) as copy:
            for row in copy.rows():
                received.append(row[0])
        assert received == [f"{tag}-{index}" for index in range(5000)]
    # psql's \copy uses the same protocol path with a different client.
    result = psql(
        ["-c", f"\\copy (select v from t where v = '{tag}-7') to stdout"], port=proxy.port
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{tag}-7"


def test_notices_reach_the_client(proxy: ProxyProcess) -> None:
    received: list[str] = []
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.add_notice_handler(
            lambda diagnostic: received.append(diagnostic.message_primary or "")
        )
        conn.execute("do $$ begin raise notice 'hello from %', 'plpgsql'; end $$")
    assert received == ["hello from plpgsql"]
    result = psql(["-c", "do $$ begin raise notice 'psql notice'; end $$"], port=proxy.port)
    assert result.returncode == 0
    assert "NOTICE:  psql notice" in result.stderr


async def test_async_clients(proxy: ProxyProcess) -> None:
    async def one(index: int) -> int:
        async with await psycopg.AsyncConnection.connect(proxy.dsn(), autocommit=True) as conn:
            cursor = await conn.execute("select %s::int * 2", (index,))
            row = await cursor.fetchone()
            assert row is not None
            value: int = row[0]
            return value

    results = await asyncio.gather(*(one(index) for index in range(20)))
    assert results == [index * 2 for index in range(20)]


def test_psql_script(proxy: ProxyProcess) -> None:
    script = "\\set n 41\nselect :n + 1 as answer;\n\\echo done\n"
    result = psql(["-A", "-t", "-f", "-"], port=proxy.port, input=script)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["42", "done"]


# -- mode-specific semantics -------------------------------------------------------------------


def test_statement_mode_refuses_transaction_blocks(proxy_statement: ProxyProcess) -> None:
    with psycopg.connect(proxy_statement.dsn()) as conn:
        with pytest.raises(psycopg.OperationalError) as error:
            conn.execute("select 1")  # psycopg opens a transaction block first
        assert "transaction blocks not allowed in statement pooling mode" in str(error.value)
    # The proxy is fine and autocommit statements work.
    with psycopg.connect(proxy_statement.dsn(), autocommit=True) as conn:
        assert conn.execute("select 5").fetchone() == (5,)


def test_session_mode_keeps_session_state_and_resets_it(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(proxy_config(pg, pool_mode="session", default_pool_size=1))
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute("create temp table scratch (x int)")
        conn.execute("insert into scratch values (1)")
        backend = conn.execute("select pg_backend_pid()").fetchone()
        assert conn.execute("select count(*) from scratch").fetchone() == (1,)
        conn.execute("set work_mem = '7MB'")
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        # Same server (pool of one), but DISCARD ALL ran in between.
        assert conn.execute("select pg_backend_pid()").fetchone() == backend
        assert conn.execute("show work_mem").fetchone() != ("7MB",)
        with pytest.raises(psycopg.errors.UndefinedTable):
            conn.execute("select * from scratch")


def test_transaction_mode_shares_one_server_between_clients(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(proxy_config(pg, pool_mode="transaction", default_pool_size=1))
    first = psycopg.connect(proxy.dsn(), autocommit=True)
    second = psycopg.connect(proxy.dsn(), autocommit=True)
    try:
        for _ in range(5):
            pid_a = first.execute("select pg_backend_pid()").fetchone()
            pid_b = second.execute("select pg_backend_pid()").fetchone()
            assert pid_a == pid_b
    finally:
        first.close()
        second.close()


# -- multiplexing and isolation ----------------------------------------------------------------


@pytest.fixture(scope="module")
def mux_user(pg: EmbeddedPostgres) -> str:
    """A role used only by the multiplexing test, so pg_stat_activity can count its servers."""
    pg.create_role("muxuser", "mux-secret")
    pg.sql("GRANT ALL ON TABLE t TO muxuser; GRANT ALL ON SEQUENCE t_id_seq TO muxuser;", "appdb")
    return "muxuser"


def test_200_clients_on_pool_of_5(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory, mux_user: str
) -> None:
    databases = {
        "appdb": {"host": "127.0.0.1", "port": pg.port, "user": mux_user, "password": "mux-secret"}
    }
    proxy = proxy_factory(
        proxy_config(
            pg,
            pool_mode="transaction",
            default_pool_size=5,
            max_client_conn=400,
            databases=databases,
        )
    )
    tag = _tag()

    async def client(index: int) -> tuple[int, int]:
        async with await psycopg.AsyncConnection.connect(proxy.dsn()) as conn:
            for step in range(3):
                async with conn.transaction():
                    await conn.execute("insert into t (v) values (%s)", (f"{tag}-{index}-{step}",))
                    await conn.execute("select pg_sleep(0.002)")
            cursor = await conn.execute(
                "select count(*) from t where v like %s", (f"{tag}-{index}-%",)
            )
            row = await cursor.fetchone()
            assert row is not None
            await conn.commit()
            return index, row[0]

    async def run_all() -> list[tuple[int, int]]:
        return await asyncio.gather(*(client(index) for index in range(200)))

    def servers_now() -> int:
        row = admin.execute(
            "select count(*) from pg_stat_activity where usename = %s", (mux_user,)
        ).fetchone()
        assert row is not None
        count: int = row[0]
        return count

    with (
        psycopg.connect(pg.superuser_dsn("appdb"), autocommit=True) as admin,
        Peak(servers_now) as servers,
    ):
        results = asyncio.run(asyncio.wait_for(run_all(), 90))
    assert sorted(results) == [(index, 3) for index in range(200)]
    with psycopg.connect(pg.superuser_dsn("appdb")) as admin:
        row = admin.execute("select count(*) from t where v like %s", (tag + "-%",)).fetchone()
    assert row == (600,)
    assert 1 <= servers.value <= 5


def test_uncommitted_insert_is_invisible_to_others(proxy_tx: ProxyProcess) -> None:
    tag = _tag()
    writer = psycopg.connect(proxy_tx.dsn())
    try:
        writer.execute("insert into t (v) values (%s)", (tag,))
        with psycopg.connect(proxy_tx.dsn(), autocommit=True) as reader:
            for _ in range(10):  # whichever server the reader gets
                assert reader.execute("select count(*) from t where v = %s", (tag,)).fetchone() == (
                    0,
                )
        writer.rollback()
    finally:
        writer.close()


_HOLDER = """
import sys, time, psycopg
conn = psycopg.connect(sys.argv[1])
conn.execute("insert into t (v) values (%s)", (sys.argv[2],))
if sys.argv[3] == "busy":
    print("ready", flush=True)
    conn.execute("select pg_sleep(60)")
else:
    print("ready", flush=True)
    time.sleep(60)
"""


@pytest.mark.parametrize("phase", ["idle", "busy"])
def test_client_killed_mid_transaction(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory, phase: str
) -> None:
    proxy = proxy_factory(proxy_config(pg, pool_mode="transaction", default_pool_size=2))
    tag = _tag()
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, proxy.dsn(), tag, phase],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "ready"
        time.sleep(0.3)  # let the busy variant reach pg_sleep
        os.kill(holder.pid, signal.SIGKILL)
    finally:
        holder.wait(10)
    with psycopg.connect(pg.superuser_dsn("appdb"), autocommit=True) as admin:
        deadline = time.monotonic() + 10
        while True:
            stuck = admin.execute(
                "select count(*) from pg_stat_activity where usename = 'app'"
                " and (state like 'idle in transaction%%' or query like '%%pg_sleep(60)%%')"
                " and pid <> pg_backend_pid()"
            ).fetchone()
            if stuck == (0,) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert stuck == (0,)
        assert admin.execute("select count(*) from t where v = %s", (tag,)).fetchone() == (0,)
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
        assert conn.execute("select count(*) from t where v = %s", (tag,)).fetchone() == (0,)


# -- tracked parameters ------------------------------------------------------------------------


def test_each_client_keeps_its_own_parameters_on_a_shared_server(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(proxy_config(pg, pool_mode="transaction", default_pool_size=1))
    tokyo = psycopg.connect(proxy.dsn(application_name="app-tokyo"), autocommit=True)
    york = psycopg.connect(proxy.dsn(application_name="app-york"), autocommit=True)
    try:
        tokyo.execute("set timezone = 'Asia/Tokyo'")
        york.execute("set timezone = 'America/New_York'")
        for _ in range(3):
            assert tokyo.execute("show timezone").fetchone() == ("Asia/Tokyo",)
            assert york.execute("show timezone").fetchone() == ("America/New_York",)
            assert tokyo.execute("show application_name").fetchone() == ("app-tokyo",)
            assert york.execute("show application_name").fetchone() == ("app-york",)
            # One server for both: the values really are switched on it.
            assert (
                tokyo.execute("select pg_backend_pid()").fetchone()
                == york.execute("select pg_backend_pid()").fetchone()
            )
        assert tokyo.info.parameter_status("TimeZone") == "Asia/Tokyo"
        assert york.info.parameter_status("TimeZone") == "America/New_York"
    finally:
        tokyo.close()
        york.close()


def test_startup_parameters_are_applied(pg: EmbeddedPostgres, proxy_tx: ProxyProcess) -> None:
    env = {"PGDATESTYLE": "SQL, DMY", "PGTZ": "Europe/Paris", "PGAPPNAME": "psql-params"}
    result = psql(
        ["-A", "-t", "-c", "show datestyle", "-c", "show timezone", "-c", "show application_name"],
        port=proxy_tx.port,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:3] == ["SQL, DMY", "Europe/Paris", "psql-params"]


# -- pgbench -----------------------------------------------------------------------------------


def _pgbench(pg: EmbeddedPostgres, port: int, *args: str) -> subprocess.CompletedProcess[str]:
    command = [os.path.join(pg.bindir, "pgbench"), *args, "-h", "127.0.0.1", "-p", str(port)]
    return subprocess.run(
        [*command, "-U", "app", "appdb"], capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="module")
def pgbench_ready(pg: EmbeddedPostgres, proxy_session: ProxyProcess) -> Iterator[None]:
    """pgbench tables in appdb, created through the proxy (COPY and VACUUM included)."""
    result = _pgbench(pg, proxy_session.port, "-i", "-s", "1", "-q")
    assert result.returncode == 0, result.stderr
    yield


@pytest.mark.parametrize(
    "options",
    [["-S"], [], ["-S", "-M", "extended"], ["-M", "extended"]],
    ids=["select-only", "tpcb", "select-extended", "tpcb-extended"],
)
def test_pgbench_through_transaction_mode(
    pg: EmbeddedPostgres, proxy_tx: ProxyProcess, pgbench_ready: None, options: list[str]
) -> None:
    result = _pgbench(pg, proxy_tx.port, *options, "-c", "8", "-j", "2", "-T", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "number of failed transactions: 0" in result.stdout
    processed = [line for line in result.stdout.splitlines() if "actually processed" in line]
    assert processed and int(processed[0].split(":")[1].split("/")[0]) > 100


# -- COPY through the extended protocol (PostgreSQL ignores Syncs during COPY FROM STDIN) -------


def _extended_copy_in(conn: psycopg.Connection[tuple[object, ...]], rows: bytes) -> str:
    """COPY FROM STDIN sent as Parse/Bind/Execute/Sync, as libpq does with parameters."""
    pgconn = conn.pgconn
    pgconn.send_query_params(b"COPY t (v) FROM STDIN", None)
    result = pgconn.get_result()
    assert result is not None and result.status == psycopg.pq.ExecStatus.COPY_IN
    pgconn.put_copy_data(rows)
    pgconn.put_copy_end()
    errors = []
    while (result := pgconn.get_result()) is not None:
        errors.append(result.error_message.decode())
    return "".join(errors)


@pytest.mark.parametrize("outcome", ["ok", "bad-data"])
def test_extended_protocol_copy_releases_the_server(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory, outcome: str
) -> None:
    proxy = proxy_factory(
        proxy_config(pg, pool_mode="transaction", default_pool_size=1, query_wait_timeout=5)
    )
    tag = _tag()
    first = psycopg.connect(proxy.dsn(), autocommit=True)
    second = psycopg.connect(proxy.dsn(), autocommit=True)
    try:
        rows = f"{tag}\n".encode() if outcome == "ok" else b"a\tb\tc\n"
        error = _extended_copy_in(first, rows)
        assert ("extra data after last expected column" in error) == (outcome == "bad-data")
        # The pool's only server must be free again: the other client gets it at once.
        assert second.execute("select count(*) from t where v = %s", (tag,)).fetchone() == (
            (1,) if outcome == "ok" else (0,)
        )
        assert first.execute("select 1").fetchone() == (1,)
    finally:
        first.close()
        second.close()


# -- cancellation and the Unix socket ------------------------------------------------------------


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_cancel_request_reaches_the_running_query(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory, mode: str
) -> None:
    proxy = proxy_factory(proxy_config(pg, pool_mode=mode))
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        timer = threading.Timer(0.5, conn.cancel_safe)
        started = time.monotonic()
        timer.start()
        try:
            with pytest.raises(psycopg.errors.QueryCanceled):
                conn.execute("select pg_sleep(30)")
        finally:
            timer.cancel()
        assert time.monotonic() - started < 15
        assert conn.execute("select 1").fetchone() == (1,)


def test_cancel_with_an_unknown_key_does_nothing(proxy_tx: ProxyProcess) -> None:
    from pgproxy.protocol import messages

    with psycopg.connect(proxy_tx.dsn(), autocommit=True) as conn:
        with socket.create_connection(("127.0.0.1", proxy_tx.port), timeout=5) as raw:
            raw.sendall(messages.cancel_request(12345, b"\x00\x01\x02\x03"))
            assert raw.recv(100) == b""  # the proxy just closes
        assert conn.execute("select pg_sleep(0.2), 7").fetchone() == ("", 7)


def test_unix_socket_listener(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    proxy = proxy_factory(proxy_config(pg, unix_socket_dir=str(tmp_path)))
    assert (tmp_path / f".s.PGSQL.{proxy.port}").exists()
    with psycopg.connect(
        host=str(tmp_path), port=proxy.port, dbname="appdb", user="app", autocommit=True
    ) as conn:
        assert conn.execute("select current_user").fetchone() == ("app",)


def test_query_pipelined_before_terminate_still_commits(proxy_tx: ProxyProcess) -> None:
    from pgproxy.protocol import messages

    tag = _tag()
    with socket.create_connection(("127.0.0.1", proxy_tx.port), timeout=10) as raw:
        raw.sendall(messages.startup_message({"user": "app", "database": "appdb"}))
        received = b""
        while not received.endswith(messages.ready_for_query()):
            chunk = raw.recv(65536)
            assert chunk
            received += chunk
        # One packet: an autocommit INSERT and Terminate, without waiting for the reply.
        raw.sendall(messages.query(f"insert into t (v) values ('{tag}')") + messages.TERMINATE)
    with psycopg.connect(proxy_tx.dsn(), autocommit=True) as conn:
        deadline = time.monotonic() + 10
        while conn.execute("select count(*) from t where v = %s", (tag,)).fetchone() != (1,):
            assert time.monotonic() < deadline, "the pipelined INSERT was lost"
            time.sleep(0.05)
