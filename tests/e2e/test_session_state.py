"""transaction_state_guard: session state a transaction-mode client leaves on a server
outside a transaction, against a real PostgreSQL.

One server (pool_size 1), so client B gets the server client A just used. For each kind of
state: with ``off`` B inherits it; with ``warn`` it is counted
(pgproxy_session_state_leaks_total), logged and listed in SHOW LEAKS, and B still inherits
it; with ``reset`` B does not.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest

from pgproxy.embedded import EmbeddedPostgres, free_port
from tests.e2e.test_metrics import APP, _proxy, _value, scrape
from tests.support import ProxyFactory, ProxyProcess, connect, psql, wait_for

STATE_LEAKS = "pgproxy_session_state_leaks_total"
KINDS = ("set", "listen", "prepare", "cursor", "temp_table", "advisory_lock")


@dataclass(frozen=True)
class Kind:
    name: str  # the metric's kind label
    leave: tuple[str, ...]  # what client A runs, each outside a transaction (autocommit)
    probe: str  # what client B runs to see the state: one value
    left: object  # B's value when the state is there
    clean: object  # and when it is not
    tag_visible: bool = True  # False: only the janitor's periodic check finds it
    # Settings the case needs: SQL PREPARE is mapped (no leak) unless max_prepared_statements
    # is 0; see test_a_mapped_sql_prepare_is_no_leak.
    settings: tuple[tuple[str, int], ...] = ()


CASES = [
    Kind("set", ("SET search_path = pg_catalog, leaked",), "show search_path",
         "pg_catalog, leaked", '"$user", public'),
    Kind("set", ("SET statement_timeout = 54321",), "show statement_timeout", "54321ms", "0"),
    Kind("listen", ("LISTEN pgproxy_leak",),
         "select count(*) from pg_listening_channels()", 1, 0),
    Kind("prepare", ("PREPARE pgproxy_leak AS select 1",),
         "select count(*) from pg_prepared_statements where from_sql", 1, 0,
         settings=(("max_prepared_statements", 0),)),
    Kind("cursor", ("DECLARE pgproxy_leak CURSOR WITH HOLD FOR select 1",),
         "select count(*) from pg_cursors", 1, 0),
    Kind("temp_table", ("CREATE TEMP TABLE pgproxy_leak (x int)",),
         "select to_regclass('pg_temp.pgproxy_leak') is not null", True, False),
    Kind("advisory_lock", ("select pg_advisory_lock(4242)",),
         "select count(*) from pg_locks where locktype = 'advisory' and pid = pg_backend_pid()",
         1, 0, tag_visible=False),
]  # fmt: skip
IDS = [f"{case.name}-{case.leave[0].split()[1]}" for case in CASES]


def _guarded(
    pg: EmbeddedPostgres, factory: ProxyFactory, guard: str, **overrides: Any
) -> ProxyProcess:
    overrides.setdefault("transaction_state_check_period", 0.5)
    return _proxy(
        pg, factory, default_pool_size=1, transaction_state_guard=guard,
        metrics_port=free_port(), **overrides,
    )  # fmt: skip


def _leaks(proxy: ProxyProcess) -> dict[str, float]:
    samples = scrape(proxy)
    return {kind: _value(samples, STATE_LEAKS, (*APP, ("kind", kind))) for kind in KINDS}


def _show_leaks(proxy: ProxyProcess) -> list[dict[str, str]]:
    shown = psql(
        ["-A", "-F", "|", "-c", "SHOW LEAKS"], port=proxy.port, dbname="pgbouncer", user="admin"
    )
    assert shown.returncode == 0, shown.stderr
    header, *rows = shown.stdout.splitlines()[:-1]  # (the last line: "(n rows)")
    names = header.split("|")
    return [dict(zip(names, row.split("|"), strict=True)) for row in rows]


def _seen_by_b(proxy: ProxyProcess, case: Kind) -> object:
    with connect(proxy) as b:
        row = b.execute(case.probe).fetchone()
        assert row is not None
        return row[0]


def _wait_counted(proxy: ProxyProcess, kind: str) -> None:
    wait_for(lambda: _leaks(proxy)[kind] >= 1, 10, f"a {kind} leak to be counted")


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_off_the_next_client_inherits_the_state(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory, case: Kind
) -> None:
    proxy = _guarded(pg, proxy_factory, "off", **dict(case.settings))
    with connect(proxy, application_name="leaky-app") as a:
        for sql in case.leave:
            a.execute(sql)
    assert _seen_by_b(proxy, case) == case.left
    assert _leaks(proxy) == dict.fromkeys(KINDS, 0)
    assert "session state leak" not in proxy.log_text()


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_warn_counts_logs_and_lists_the_leak(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory, case: Kind
) -> None:
    proxy = _guarded(pg, proxy_factory, "warn", **dict(case.settings))
    with connect(proxy, application_name="leaky-app") as a:
        for sql in case.leave:
            a.execute(sql)
        if not case.tag_visible:  # (found by the janitor once the server is idle)
            _wait_counted(proxy, case.name)
    # (A has its reply before the check that follows its transaction has answered; B's
    # query waits for the check.)
    assert _seen_by_b(proxy, case) == case.left  # warn only tells
    counted = _leaks(proxy)
    assert counted == {kind: int(kind == case.name) for kind in KINDS}
    log = proxy.log_text()
    lines = [line for line in log.splitlines() if "session state leak" in line]
    assert len(lines) == 1, lines
    assert "leaky-app" in lines[0] and "user app" in lines[0], lines[0]
    assert "transaction_state_guard = warn" in lines[0]
    rows = [row for row in _show_leaks(proxy) if row["kind"] == case.name]
    assert len(rows) == 1, rows
    row = rows[0]
    assert row["application_name"] == "leaky-app"
    assert row["user"] == "app" and row["database"] == "appdb"
    assert row["state"] == "kept" and row["count"] == "1"
    assert int(row["id"]) > 0
    if case.name == "set":
        assert case.leave[0].split()[1] in row["detail"]  # the setting's name


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_reset_cleans_the_server_before_the_next_client(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory, case: Kind
) -> None:
    proxy = _guarded(pg, proxy_factory, "reset", **dict(case.settings))
    with connect(proxy, application_name="leaky-app") as a:
        for sql in case.leave:
            a.execute(sql)
        _wait_counted(proxy, case.name)
    assert _seen_by_b(proxy, case) == case.clean
    assert _leaks(proxy)[case.name] == 1
    (row,) = [row for row in _show_leaks(proxy) if row["kind"] == case.name]
    assert row["state"] == "reset"
    assert "server_reset_query runs before anyone else gets the server" in proxy.log_text()
    # The server was reset, not replaced, and serves on with a clean slate.
    assert _seen_by_b(proxy, case) == case.clean
    assert _leaks(proxy)[case.name] == 1


def test_set_local_tracked_parameters_and_undone_state_are_not_leaks(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory
) -> None:
    proxy = _guarded(pg, proxy_factory, "warn")
    with connect(proxy, autocommit=False) as a:
        a.execute("SET LOCAL statement_timeout = 1000")  # inside BEGIN ... COMMIT
        a.execute("select 1")
        a.commit()
    with connect(proxy) as a:
        # Tracked parameters: pgproxy carries them per client.
        a.execute("SET application_name = 'tracked'")
        a.execute("SET TimeZone = 'Europe/Paris'")
        a.execute("SET DateStyle = 'German'")
        a.execute("SET IntervalStyle = 'iso_8601'")
        a.execute("SET standard_conforming_strings = on")  # (the value it had)
        # SET LOCAL in a transaction block opened and closed in one query; state undone in
        # the transaction that made it.
        a.pgconn.exec_(b"BEGIN; SET LOCAL search_path = nowhere; COMMIT")
        a.pgconn.exec_(b"LISTEN x; UNLISTEN x")
        a.pgconn.exec_(b"PREPARE p AS select 1; EXECUTE p; DEALLOCATE p")
        a.pgconn.exec_(b"SET work_mem = '8MB'; RESET work_mem")
        a.execute("SET search_path TO DEFAULT")
    with connect(proxy) as b:
        assert b.execute("show application_name").fetchone() == ("",)
        assert b.execute("show search_path").fetchone() == ('"$user", public',)
    time.sleep(1.5)  # (the janitor's check of the idle server, every 0.5 s, finds nothing)
    assert _leaks(proxy) == dict.fromkeys(KINDS, 0)
    assert "session state leak" not in proxy.log_text()
    assert [row for row in _show_leaks(proxy) if row["kind"] != "held"] == []


def test_undoing_an_earlier_clients_set_is_no_leak(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory
) -> None:
    proxy = _guarded(pg, proxy_factory, "warn")
    with connect(proxy, application_name="leaky") as a:
        a.execute("SET statement_timeout = 54321")
        a.execute("SET search_path = pg_catalog, leaked")
    with connect(proxy, application_name="tidy") as b:
        b.execute("SET statement_timeout = 0")
        b.execute("SET search_path TO DEFAULT")
        b.execute("SET search_path = pg_catalog, other")  # (this one is a leak)
    wait_for(lambda: _leaks(proxy)["set"] == 3, 10, "three SET leaks")
    rows = [row for row in _show_leaks(proxy) if row["kind"] == "set"]
    assert {(row["application_name"], row["count"]) for row in rows} == {
        ("leaky", "2"),
        ("tidy", "1"),
    }


def test_the_check_survives_a_leaked_statement_timeout(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory
) -> None:
    """SET statement_timeout = 1 outside a transaction: the check itself runs with the
    timeouts off, finds it, and reset puts the server back."""
    proxy = _guarded(pg, proxy_factory, "reset")
    with connect(proxy) as a:
        a.pgconn.exec_(b"SET statement_timeout = 1; SET lock_timeout = 1")
    with connect(proxy) as b:
        assert b.execute("show statement_timeout").fetchone() == ("0",)
        assert b.execute("show lock_timeout").fetchone() == ("0",)
    assert _leaks(proxy)["set"] == 1
    (row,) = [row for row in _show_leaks(proxy) if row["kind"] == "set"]
    assert row["detail"] == "lock_timeout, statement_timeout"


def test_set_inside_a_transaction_block_is_found_by_the_periodic_check(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory
) -> None:
    """A plain SET inside BEGIN ... COMMIT outlives the transaction; its tag cannot be told
    from SET LOCAL's, so the janitor's check of the idle server finds it."""
    proxy = _guarded(pg, proxy_factory, "warn")
    with connect(proxy, autocommit=False, application_name="in-block") as a:
        a.execute("SET search_path = pg_catalog, leaked")
        a.commit()
        _wait_counted(proxy, "set")
    (row,) = [row for row in _show_leaks(proxy) if row["kind"] == "set"]
    assert row["application_name"] == "in-block"
    assert row["detail"] == "search_path"
    assert "found on an idle server it was the last to use" in proxy.log_text()


def test_a_leak_is_logged_once_per_client_and_counted_each_time(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory
) -> None:
    proxy = _guarded(pg, proxy_factory, "reset")
    with connect(proxy, application_name="repeat") as a:
        for value in range(1, 4):  # (each one a transaction of its own, reset after)
            a.execute(f"SET statement_timeout = {value * 1000}")
    wait_for(lambda: _leaks(proxy)["set"] == 3, 10, "three leaks to be counted")
    lines = [line for line in proxy.log_text().splitlines() if "session state leak" in line]
    assert len(lines) == 1, lines
    (row,) = [row for row in _show_leaks(proxy) if row["kind"] == "set"]
    assert row["count"] == "3"


def test_statement_mode_is_guarded_too(pg: EmbeddedPostgres, proxy_factory: ProxyFactory) -> None:
    proxy = _guarded(pg, proxy_factory, "reset", pool_mode="statement")
    with connect(proxy) as a:
        a.execute("LISTEN pgproxy_leak")
    with connect(proxy) as b:
        assert b.execute("select count(*) from pg_listening_channels()").fetchone() == (0,)
    assert _leaks(proxy)["listen"] == 1


def test_session_mode_is_not_guarded(pg: EmbeddedPostgres, proxy_factory: ProxyFactory) -> None:
    """Session mode: the state is the session's own, and server_reset_query cleans it."""
    proxy = _guarded(pg, proxy_factory, "warn", pool_mode="session")
    with connect(proxy) as a:
        a.execute("LISTEN pgproxy_leak")
        assert a.execute("select count(*) from pg_listening_channels()").fetchone() == (1,)
    with connect(proxy) as b:
        assert b.execute("select count(*) from pg_listening_channels()").fetchone() == (0,)
    assert _leaks(proxy)["listen"] == 0


def test_the_guard_follows_a_reload(pg: EmbeddedPostgres, proxy_factory: ProxyFactory) -> None:
    proxy = _guarded(pg, proxy_factory, "off")
    with connect(proxy) as a:
        a.execute("select 1")  # the server is open (never checked: off)
    admin = psql(
        ["-c", "SET transaction_state_guard = 'reset'"],
        port=proxy.port, dbname="pgbouncer", user="admin",
    )  # fmt: skip
    assert admin.returncode == 0, admin.stderr
    with connect(proxy) as a:
        a.execute("LISTEN pgproxy_leak")  # (the idle server's state was learnt at the SET)
    with connect(proxy) as b:
        assert b.execute("select count(*) from pg_listening_channels()").fetchone() == (0,)
    assert _leaks(proxy)["listen"] == 1


def test_a_client_that_leaves_after_its_set_is_checked_too(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory
) -> None:
    proxy = _guarded(pg, proxy_factory, "reset")
    conn = psycopg.connect(proxy.dsn(), autocommit=True)
    conn.execute("SET search_path = leaked")
    conn.close()
    with connect(proxy) as b:
        assert b.execute("show search_path").fetchone() == ('"$user", public',)
    assert _leaks(proxy)["set"] == 1
    assert "session state leak: client" in proxy.log_text()


def test_a_mapped_sql_prepare_is_no_leak(pg: EmbeddedPostgres, proxy_factory: ProxyFactory) -> None:
    """With max_prepared_statements on, SQL PREPARE is mapped like a protocol-level Parse:
    the statement follows its client and nothing is left for the next one."""
    proxy = _guarded(pg, proxy_factory, "warn", max_prepared_statements=10)
    with connect(proxy, application_name="tidy-app", prepare_threshold=None) as a:
        a.execute("PREPARE pgproxy_mapped AS select 41 + 1")
        prepare_case = next(case for case in CASES if case.name == "prepare")
        assert _seen_by_b(proxy, prepare_case) == 0  # (pg_prepared_statements, from SQL)
        row = a.execute("EXECUTE pgproxy_mapped").fetchone()
        assert row == (42,)
    assert _leaks(proxy) == dict.fromkeys(KINDS, 0)
    assert "session state leak" not in proxy.log_text()
