"""Named prepared statements in transaction mode (max_prepared_statements), with psycopg.

psycopg's low-level connection (``conn.pgconn``) sends Parse/Bind/Describe/Close exactly as
libpq does, so the errors and pipeline positions below are what any driver would see.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from psycopg import pq

from pgproxy.embedded import EmbeddedPostgres
from tests.support import ProxyFactory, ProxyProcess, proxy_config, psql

Conn = psycopg.Connection[tuple[Any, ...]]


@pytest.fixture(scope="module")
def proxy_one(pg: EmbeddedPostgres, module_proxy_factory: ProxyFactory) -> ProxyProcess:
    """Transaction mode over two servers, each keeping at most 3 statements prepared."""
    return module_proxy_factory(
        proxy_config(pg, default_pool_size=2, max_prepared_statements=3, admin_users=["app"])
    )


def _connect(proxy: ProxyProcess, **kwargs: Any) -> Conn:
    return psycopg.connect(proxy.dsn(), autocommit=True, **kwargs)


def _ok(result: pq.PGresult) -> pq.PGresult:
    assert result.status in (pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK), (
        result.error_message
    )
    return result


def _error(result: pq.PGresult) -> tuple[str, str]:
    assert result.status == pq.ExecStatus.FATAL_ERROR
    sqlstate = result.error_field(pq.DiagnosticField.SQLSTATE) or b""
    message = result.error_field(pq.DiagnosticField.MESSAGE_PRIMARY) or b""
    return sqlstate.decode(), message.decode()


def _value(result: pq.PGresult) -> bytes | None:
    return _ok(result).get_value(0, 0)


@pytest.fixture
def held_server(proxy_one: ProxyProcess) -> Iterator[Conn]:
    """A client holding one of the two servers in a transaction (so others get the other)."""
    with _connect(proxy_one) as conn:
        conn.execute("begin")
        conn.execute("select 1")
        yield conn
        conn.execute("rollback")


def _backend(conn: Conn) -> int:
    row = conn.execute("select pg_backend_pid()").fetchone()
    assert row is not None
    return int(row[0])


def test_a_name_follows_its_client_to_another_server(proxy_one: ProxyProcess) -> None:
    with _connect(proxy_one) as conn, _connect(proxy_one) as other:
        pgconn = conn.pgconn
        _ok(pgconn.prepare(b"double", b"select $1::int * 2"))
        first = _backend(conn)
        # Keep that server busy elsewhere: the next transaction lands on the other one.
        moved = False
        for _ in range(20):
            other.execute("begin")
            held = _backend(other)
            if held == first:
                assert _value(pgconn.exec_prepared(b"double", [b"21"])) == b"42"
                assert _backend(conn) != first
                moved = True
            other.execute("rollback")
            if moved:
                break
        assert moved, "the other client never got the first server"
        assert _value(pgconn.exec_prepared(b"double", [b"5"])) == b"10"
        described = _ok(pgconn.describe_prepared(b"double"))
        assert described.nparams == 1 and described.nfields == 1


def test_errors_are_postgresql_s_own(proxy_one: ProxyProcess) -> None:
    with _connect(proxy_one) as conn:
        pgconn = conn.pgconn
        assert _error(pgconn.exec_prepared(b"nope", [])) == (
            "26000",
            'prepared statement "nope" does not exist',
        )
        assert _error(pgconn.describe_prepared(b"nope"))[0] == "26000"
        _ok(pgconn.prepare(b"twice", b"select 1"))
        assert _error(pgconn.prepare(b"twice", b"select 2")) == (
            "42P05",
            'prepared statement "twice" already exists',
        )
        assert _value(pgconn.exec_prepared(b"twice", [])) == b"1"  # the first one stands
        # Inside a transaction the error aborts it, as PostgreSQL's does.
        conn.execute("begin")
        assert _error(pgconn.prepare(b"twice", b"select 3"))[0] == "42P05"
        assert pgconn.transaction_status == pq.TransactionStatus.INERROR
        conn.execute("rollback")
        # A Parse that fails leaves no name behind: the name can be used again.
        assert _error(pgconn.prepare(b"broken", b"selec 1"))[0] == "42601"
        _ok(pgconn.prepare(b"broken", b"select 'fixed'"))
        assert _value(pgconn.exec_prepared(b"broken", [])) == b"fixed"
        # And the connection still works for everything else.
        assert conn.execute("select 41 + 1").fetchone() == (42,)


def test_close_and_deallocate_all_forget_names(proxy_one: ProxyProcess) -> None:
    with _connect(proxy_one) as conn:
        pgconn = conn.pgconn
        _ok(pgconn.prepare(b"s1", b"select 'one'"))
        _ok(pgconn.close_prepared(b"s1"))
        assert _error(pgconn.exec_prepared(b"s1", []))[0] == "26000"
        _ok(pgconn.prepare(b"s1", b"select 'uno'"))  # the name is free again
        assert _value(pgconn.exec_prepared(b"s1", [])) == b"uno"
        _ok(pgconn.close_prepared(b"never-prepared"))  # no error, as PostgreSQL
        _ok(pgconn.prepare(b"s2", b"select 'two'"))
        conn.execute("deallocate all")
        assert _error(pgconn.exec_prepared(b"s1", []))[0] == "26000"
        assert _error(pgconn.exec_prepared(b"s2", []))[0] == "26000"
        _ok(pgconn.prepare(b"s2", b"select 'dos'"))
        assert _value(pgconn.exec_prepared(b"s2", [])) == b"dos"
        conn.execute("discard all")
        assert _error(pgconn.exec_prepared(b"s2", []))[0] == "26000"


def test_sql_deallocate_of_a_protocol_level_name(
    proxy_one: ProxyProcess, held_server: Conn
) -> None:
    """DEALLOCATE (a simple Query, as DBD::Pg and psycopg send it) of a name pgproxy maps:
    answered by the server as PostgreSQL would, whichever server the client has."""
    with _connect(proxy_one) as conn:
        pgconn = conn.pgconn
        _ok(pgconn.prepare(b"Mixed Case", b"select $1::int * 3"))
        assert _value(pgconn.exec_prepared(b"Mixed Case", [b"14"])) == b"42"
        result = _ok(pgconn.exec_(b'DEALLOCATE "Mixed Case";'))
        assert result.command_status == b"DEALLOCATE"
        assert _error(pgconn.exec_prepared(b"Mixed Case", [b"1"])) == (
            "26000",
            'prepared statement "Mixed Case" does not exist',
        )
        _ok(pgconn.prepare(b"Mixed Case", b"select 'again'"))  # the name is free again
        assert _value(pgconn.exec_prepared(b"Mixed Case", [])) == b"again"
        # Inside a transaction: it succeeds, and the transaction goes on.
        _ok(pgconn.prepare(b"lower", b"select 2"))
        conn.execute("begin")
        assert _ok(pgconn.exec_(b"deallocate prepare LOWER")).command_status == b"DEALLOCATE"
        assert pgconn.transaction_status == pq.TransactionStatus.INTRANS
        assert conn.execute("select 1").fetchone() == (1,)
        conn.execute("commit")
        assert _error(pgconn.exec_prepared(b"lower", []))[0] == "26000"
        # In an aborted transaction it fails as PostgreSQL's would, and the name stays.
        _ok(pgconn.prepare(b"kept", b"select 'kept'"))
        conn.execute("begin")
        assert _error(pgconn.exec_(b"select 1/0"))[0] == "22012"
        assert _error(pgconn.exec_(b"DEALLOCATE kept"))[0] == "25P02"
        conn.execute("rollback")
        assert _value(pgconn.exec_prepared(b"kept", [])) == b"kept"
        # A name pgproxy does not map goes to the server as written.
        assert _error(pgconn.exec_(b"DEALLOCATE unknown_name")) == (
            "26000",
            'prepared statement "unknown_name" does not exist',
        )
        # SQL-level PREPARE and its DEALLOCATE within one transaction are PostgreSQL's.
        conn.execute("begin")
        conn.execute("prepare sqlside as select 5")
        assert conn.execute("execute sqlside").fetchone() == (5,)
        conn.execute("deallocate sqlside")
        conn.execute("commit")


def test_sql_prepare_and_execute_follow_their_client(proxy_one: ProxyProcess) -> None:
    """SQL PREPARE / EXECUTE / DEALLOCATE (simple Queries) outside transactions: mapped
    like protocol-level names, so EXECUTE works on whichever server the client gets."""
    # (prepare_threshold=None: psycopg would prepare statements of its own, and send
    # DEALLOCATE ALL after the failed transaction below.)
    with _connect(proxy_one, prepare_threshold=None) as conn, _connect(proxy_one) as other:
        pgconn = conn.pgconn
        assert _ok(pgconn.exec_(b"PREPARE add1 (int) AS SELECT $1 + 1")).command_status == (
            b"PREPARE"
        )
        _ok(pgconn.exec_(b"prepare ins(text) as insert into t (v) values ($1)"))
        first = _backend(conn)
        servers = set()
        for round_ in range(20):
            # Another client holds a server in a transaction every other round, so that
            # EXECUTE runs on both servers, most of them without the statement yet.
            if round_ % 2:
                other.execute("begin")
                other.execute("select 1")
            result = _ok(pgconn.exec_(b"EXECUTE add1(%d);" % round_))
            assert result.get_value(0, 0) == b"%d" % (round_ + 1)
            assert result.command_status == b"SELECT 1"
            inserted = _ok(pgconn.exec_(b"execute INS('sqlprep-%d')" % round_))
            assert inserted.command_status == b"INSERT 0 1" and inserted.nfields == 0
            servers.add(_backend(conn))
            if round_ % 2:
                other.execute("rollback")
        assert len(servers) == 2 and first in servers
        row = conn.execute("select count(*) from t where v like 'sqlprep-%'").fetchone()
        assert row == (20,)
        # PostgreSQL's errors, in their place.
        assert _error(pgconn.exec_(b"PREPARE add1 AS SELECT 2")) == (
            "42P05",
            'prepared statement "add1" already exists',
        )
        assert _error(pgconn.exec_(b"EXECUTE add1(1, 2)"))[0] == "42601"
        assert _error(pgconn.exec_(b"EXECUTE nope"))[0] == "26000"
        assert _error(pgconn.exec_(b"PREPARE broken AS SELEC 1"))[0] == "42601"
        assert _error(pgconn.exec_(b"EXECUTE broken"))[0] == "26000"
        conn.execute("begin")
        assert _error(pgconn.exec_(b"select 1/0"))[0] == "22012"
        assert _error(pgconn.exec_(b"EXECUTE add1(1)"))[0] == "25P02"
        conn.execute("rollback")
        assert _value(pgconn.exec_(b"EXECUTE add1(1)")) == b"2"
        # No server is left holding an SQL-level prepared statement of pgproxy's.
        for client in (conn, other):
            row = client.execute(
                "select count(*) from pg_prepared_statements where from_sql"
            ).fetchone()
            assert row == (0,)
        assert _ok(pgconn.exec_(b"DEALLOCATE add1")).command_status == b"DEALLOCATE"
        assert _error(pgconn.exec_(b"EXECUTE add1(1)"))[0] == "26000"
        conn.execute("delete from t where v like 'sqlprep-%'")


def test_sql_prepare_and_execute_from_psql(proxy_one: ProxyProcess) -> None:
    commands = [
        "PREPARE seven AS SELECT 7 AS n",
        "EXECUTE seven",
        "DEALLOCATE seven",
        "EXECUTE seven",
    ]
    args = ["-At"] + [arg for command in commands for arg in ("-c", command)]
    done = psql(args, port=proxy_one.port)
    assert done.stdout.splitlines() == ["PREPARE", "7", "DEALLOCATE"]
    assert 'prepared statement "seven" does not exist' in done.stderr


def test_psycopg_prepare_and_deallocate_from_many_threads(proxy_one: ProxyProcess) -> None:
    """More clients than servers, each preparing a name, running it, and deallocating it
    with SQL (in autocommit and in transactions), over and over."""
    failures: list[str] = []

    def worker(number: int) -> None:
        try:
            with _connect(proxy_one) as conn:
                pgconn = conn.pgconn
                for round_ in range(15):
                    name = f"stmt_{number}".encode()
                    query = f"select $1::int + {round_ % 4}".encode()
                    _ok(pgconn.prepare(name, query))
                    value = _value(pgconn.exec_prepared(name, [str(number).encode()]))
                    assert value == str(number + round_ % 4).encode()
                    if round_ % 2:
                        conn.execute("begin")
                        conn.execute("select 1")
                        _ok(pgconn.exec_(b"DEALLOCATE " + name))
                        conn.execute("commit")
                    else:
                        _ok(pgconn.exec_(b"DEALLOCATE " + name))
        except Exception as exc:
            failures.append(f"{number}: {exc!r}")

    threads = [threading.Thread(target=worker, args=(number,)) for number in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=90)
    assert not failures


def test_more_statements_than_a_server_keeps(proxy_one: ProxyProcess) -> None:
    # Eight statements through servers that keep three: each use may close the least
    # recently used one and prepare its own again, unseen by the client.
    with _connect(proxy_one) as conn:
        pgconn = conn.pgconn
        for number in range(8):
            _ok(pgconn.prepare(f"q{number}".encode(), f"select {number} + $1::int".encode()))
        for round_ in range(3):
            for number in range(8):
                got = _value(pgconn.exec_prepared(f"q{number}".encode(), [b"100"]))
                assert got == str(number + 100).encode(), (round_, number)


def test_psycopg_prepares_at_once_from_many_threads(proxy_one: ProxyProcess) -> None:
    failures: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            with _connect(proxy_one, prepare_threshold=0) as conn:
                for index in range(40):
                    query = f"select %s::int + {index % 6}, {worker}"
                    row = conn.execute(query, [index]).fetchone()  # type: ignore[arg-type]
                    assert row == (index + index % 6, worker)
                    if index % 10 == 0:
                        with conn.transaction():
                            conn.execute("select %s::int", [index])
                            conn.execute("insert into t (v) values (%s)", [f"ps-{worker}"])
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(worker,)) for worker in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not failures, failures[0]


def _pipeline_outcomes(conn: Conn) -> list[object]:
    """What a psycopg pipeline of prepared statements with an error in the middle sees.

    (psycopg raises the error at the next call that reads results, which depends on when
    the replies arrive: any call after the bad one may raise it, so all are guarded.)
    """
    errors: list[str] = []
    skipped: psycopg.Cursor[Any] | None = None
    skipped_row: object = "no result"
    first_row: object = None
    try:
        with conn.pipeline() as pipeline:
            first = conn.execute("select %s::int", [1], prepare=True)
            try:
                conn.execute("select 1 / %s::int", [0], prepare=True)
                skipped = conn.execute("select %s::text", ["skipped"], prepare=True)
                pipeline.sync()
            except psycopg.Error as exc:
                errors.append(type(exc).__name__)
            first_row = first.fetchone()
            if skipped is not None:
                with contextlib.suppress(psycopg.Error):
                    skipped_row = skipped.fetchone()
    except psycopg.errors.PipelineAborted:
        pass  # (raised again on leaving the pipeline, sometimes)
    outcomes: list[object] = [errors, first_row, skipped_row]
    # Statements that were skipped were never prepared: they work now, prepared or not.
    for _ in range(3):
        outcomes.append(conn.execute("select %s::text", ["ran"], prepare=True).fetchone())
        outcomes.append(conn.execute("select 1 / %s::int", [1], prepare=True).fetchone())
    return outcomes


def test_pipeline_with_an_error_skips_to_sync(
    pg: EmbeddedPostgres, proxy_one: ProxyProcess
) -> None:
    direct = pg.dsn("app", "app-secret", "appdb")
    with psycopg.connect(direct, autocommit=True, prepare_threshold=0) as conn:
        expected = _pipeline_outcomes(conn)
    assert expected[:3] == [["DivisionByZero"], (1,), "no result"]
    with _connect(proxy_one, prepare_threshold=0) as conn:
        assert _pipeline_outcomes(conn) == expected


def _stats(admin: Conn) -> dict[str, Decimal]:
    cursor = admin.execute("show stats")
    names = [column.name for column in cursor.description or ()]
    for row in cursor.fetchall():
        record = dict(zip(names, row, strict=True))
        if record["database"] == "appdb":
            return {key: Decimal(value) for key, value in record.items() if key != "database"}
    raise AssertionError("no appdb row in SHOW STATS")


def test_show_stats_counts_client_and_server_parses(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(
        proxy_config(pg, default_pool_size=1, admin_users=["app"], stats_period=1)
    )
    with (
        _connect(proxy, prepare_threshold=0) as conn,
        psycopg.connect(proxy.dsn(dbname="pgbouncer"), autocommit=True) as admin,
    ):
        admin.cursor().execute("show stats", prepare=False)
        for index in range(10):
            assert conn.execute("select %s::int", [index]).fetchone() == (index,)
        with _connect(proxy, prepare_threshold=0) as other:
            for index in range(5):
                assert other.execute("select %s::int", [index]).fetchone() == (index,)
        totals = _stats(admin)
    assert totals["total_client_parse_count"] == 2  # one Parse per client
    assert totals["total_server_parse_count"] == 1  # one server: prepared there once
    assert totals["total_bind_count"] == 15
