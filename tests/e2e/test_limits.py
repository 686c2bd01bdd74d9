"""Limits and routing: max_client_conn, unknown databases, query_wait_timeout, FIFO waiting,
the ``*`` database entry and per-user pool modes."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import psycopg
import pytest

from pgproxy.embedded import EmbeddedPostgres
from tests.support import (
    ProxyFactory,
    ProxyProcess,
    assert_healthy,
    connect,
    proxy_config,
    psql,
)


class Worker:
    """Runs ``target`` in a daemon thread and keeps its result or exception."""

    def __init__(self, target: Callable[[], Any]) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self.finished_at = 0.0

        def run() -> None:
            try:
                self.result = target()
            except BaseException as exc:
                self.error = exc
            finally:
                self.finished_at = time.monotonic()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def join(self, timeout: float) -> Any:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"worker still running after {timeout:g}s"
        if self.error is not None:
            raise self.error
        return self.result


# -- max_client_conn ---------------------------------------------------------------------------


def test_max_client_conn(pg: EmbeddedPostgres, proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory(proxy_config(pg, max_client_conn=3))
    with ExitStack() as stack:
        clients = [stack.enter_context(connect(proxy)) for _ in range(3)]
        for index, conn in enumerate(clients):
            assert conn.execute("select %s::int", (index,)).fetchone() == (index,)
        with pytest.raises(psycopg.OperationalError) as refused:
            connect(proxy)
        assert "no more connections allowed (max_client_conn)" in str(refused.value)
        # psql sees the same refusal.
        result = psql(["-c", "select 1"], port=proxy.port)
        assert result.returncode != 0
        assert "no more connections allowed (max_client_conn)" in result.stderr
        # The three connected clients are unaffected.
        for conn in clients:
            assert conn.execute("select 1").fetchone() == (1,)
        clients.pop().close()
        # The proxy learns of the close asynchronously: allow it a moment.
        deadline = time.monotonic() + 5
        while True:
            try:
                replacement = stack.enter_context(connect(proxy))
                break
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        assert replacement.execute("select 4").fetchone() == (4,)
        with pytest.raises(psycopg.OperationalError, match="max_client_conn"):
            connect(proxy)
    assert_healthy(proxy)


# -- unknown database --------------------------------------------------------------------------


def test_unknown_database(proxy_tx: ProxyProcess) -> None:
    with pytest.raises(psycopg.OperationalError) as refused:
        connect(proxy_tx, dbname="nodb")
    assert "no such database: nodb" in str(refused.value)
    result = psql(["-c", "select 1"], port=proxy_tx.port, dbname="nodb")
    assert result.returncode != 0
    assert "no such database: nodb" in result.stderr
    assert_healthy(proxy_tx)


# -- query_wait_timeout ------------------------------------------------------------------------


def test_query_wait_timeout(pg: EmbeddedPostgres, proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory(
        proxy_config(pg, pool_mode="transaction", default_pool_size=1, query_wait_timeout=1)
    )
    with connect(proxy, autocommit=False) as holder:
        holder.execute("select 1")  # BEGIN; select 1: the only server stays linked
        with connect(proxy) as waiter:
            started = time.monotonic()
            with pytest.raises(psycopg.OperationalError) as timed_out:
                waiter.execute("select 2")
            waited = time.monotonic() - started
        assert "query_wait_timeout" in str(timed_out.value)
        assert timed_out.value.sqlstate == "08P01"
        assert 0.9 <= waited < 4, waited
        # The holder's transaction is untouched.
        assert holder.execute("select 3").fetchone() == (3,)
        holder.commit()
    assert_healthy(proxy)


# -- FIFO order of waiting clients -------------------------------------------------------------


def test_waiting_clients_are_served_in_arrival_order(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(proxy_config(pg, pool_mode="transaction", default_pool_size=1))
    tag = uuid.uuid4().hex[:12]

    def insert(name: str) -> tuple[int, Any]:
        with connect(proxy) as conn:
            row = conn.execute(
                "insert into t (v) values (%s) returning id, clock_timestamp()",
                (f"{tag}-{name}",),
            ).fetchone()
            assert row is not None
            return row[0], row[1]

    with connect(proxy, autocommit=False) as holder:
        holder.execute("select 1")  # holds the only server
        workers: dict[str, Worker] = {}
        for name in ("B", "C", "D"):
            workers[name] = Worker(lambda name=name: insert(name))
            time.sleep(0.3)  # each one queued well before the next arrives
        assert all(worker.thread.is_alive() for worker in workers.values())
        holder.commit()
    results = {name: worker.join(10) for name, worker in workers.items()}
    ids = [results[name][0] for name in ("B", "C", "D")]
    stamps = [results[name][1] for name in ("B", "C", "D")]
    assert ids == sorted(ids), results
    assert stamps == sorted(stamps), results
    assert_healthy(proxy)


# -- the "*" database entry --------------------------------------------------------------------


def test_fallback_entry_serves_any_database_under_its_own_name(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory
) -> None:
    entry = {"host": "127.0.0.1", "port": pg.port, "user": "app", "password": "app-secret"}
    proxy = proxy_factory(proxy_config(pg, databases={"*": entry}))
    with connect(proxy, dbname="appdb") as conn:
        assert conn.execute("select current_database(), current_user").fetchone() == (
            "appdb",
            "app",
        )
        assert conn.execute("select count(*) >= 0 from t").fetchone() == (True,)
    with connect(proxy, dbname="postgres") as conn:
        assert conn.execute("select current_database()").fetchone() == ("postgres",)
    # A name PostgreSQL does not know gets PostgreSQL's own error.
    with pytest.raises(psycopg.OperationalError, match='database "nodb" does not exist'):
        connect(proxy, dbname="nodb")
    assert_healthy(proxy)


def test_named_entry_wins_over_fallback(pg: EmbeddedPostgres, proxy_factory: ProxyFactory) -> None:
    server = {"host": "127.0.0.1", "port": pg.port, "user": "app", "password": "app-secret"}
    proxy = proxy_factory(
        proxy_config(pg, databases={"*": server, "alias": {**server, "dbname": "appdb"}})
    )
    with connect(proxy, dbname="alias") as conn:
        assert conn.execute("select current_database()").fetchone() == ("appdb",)
    assert_healthy(proxy)


# -- per-user pool mode ------------------------------------------------------------------------


def test_user_pool_mode_overrides_the_database_and_global_mode(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory
) -> None:
    # No forced user: each client's own name logs in (trustuser needs no password; the
    # entry's password is md5user's).
    entry = {"host": "127.0.0.1", "port": pg.port, "password": "md5-secret"}
    proxy = proxy_factory(
        proxy_config(
            pg,
            pool_mode="transaction",
            databases={"appdb": entry},
            users={"trustuser": {"pool_mode": "statement"}},
        )
    )
    with connect(proxy, user="trustuser") as conn:
        with pytest.raises(psycopg.OperationalError) as refused:
            conn.execute("begin")
        assert "transaction blocks not allowed in statement pooling mode" in str(refused.value)
    with connect(proxy, user="trustuser", autocommit=False) as conn:
        with pytest.raises(psycopg.OperationalError) as refused:
            conn.execute("select 1")  # psycopg opens a transaction block first
        assert "transaction blocks not allowed in statement pooling mode" in str(refused.value)
    with connect(proxy, user="trustuser") as conn:
        assert conn.execute("select current_user").fetchone() == ("trustuser",)
    with connect(proxy, user="md5user", autocommit=False) as conn:
        assert conn.execute("select current_user").fetchone() == ("md5user",)
        conn.execute("select 2")  # still in the same transaction block
        conn.commit()
    assert_healthy(proxy, user="md5user")
    assert_healthy(proxy, user="trustuser")


# -- per-user and per-database timeout overrides ------------------------------------------------


def test_a_user_timeout_overrides_the_global_one(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory
) -> None:
    """[users.NAME] query_timeout applies to that user's clients only.

    No forced user here, so each client logs in to PostgreSQL as itself: trustuser (trust)
    and md5user (the entry's password).
    """
    proxy = proxy_factory(
        proxy_config(
            pg,
            default_pool_size=1,
            databases={"appdb": {"host": "127.0.0.1", "port": pg.port, "password": "md5-secret"}},
            users={"trustuser": {"query_timeout": 1}},
        )
    )
    # query_timeout: only trustuser has one.
    with connect(proxy, user="trustuser") as trusted:
        with pytest.raises(psycopg.errors.QueryCanceled):
            trusted.execute("select pg_sleep(10)")
        assert trusted.execute("select 1").fetchone() == (1,)  # the session goes on
    with connect(proxy, user="md5user") as other:
        assert other.execute("select pg_sleep(1.5), 2").fetchone() == ("", 2)
    assert_healthy(proxy, user="md5user")


def test_database_query_wait_timeout_and_the_user_override(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(
        proxy_config(
            pg,
            default_pool_size=1,
            query_wait_timeout=120,
            databases={
                "appdb": {
                    "host": "127.0.0.1",
                    "port": pg.port,
                    "password": "md5-secret",
                    "query_wait_timeout": 1,
                }
            },
            users={"trustuser": {"query_wait_timeout": 30}},
        )
    )
    # md5user's pool of one server is held by a transaction: its next client times out
    # after the database's 1 s, not the global 120 s.
    with connect(proxy, user="md5user", autocommit=False) as holder:
        holder.execute("select 1")
        with connect(proxy, user="md5user") as waiter:
            started = time.monotonic()
            with pytest.raises(psycopg.OperationalError, match="query_wait_timeout"):
                waiter.execute("select 2")
            assert time.monotonic() - started < 5
        holder.commit()
    # trustuser's own setting (30 s) wins over the database's: it waits past 1 s and is
    # served when the holder commits.
    with connect(proxy, user="trustuser", autocommit=False) as holder:
        holder.execute("select 1")
        with connect(proxy, user="trustuser") as waiter:
            worker = Worker(lambda: waiter.execute("select 3").fetchone())
            time.sleep(2.0)
            assert worker.thread.is_alive()  # still waiting, past the database's 1 s
            holder.commit()
            assert worker.join(10) == (3,)
    assert_healthy(proxy, user="trustuser")


# -- startup parameters ------------------------------------------------------------------------


def test_startup_options_and_unsupported_parameters(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(proxy_config(pg, ignore_startup_parameters="extra_float_digits"))
    # A tracked setting through options reaches the server (and follows the client).
    shown = psql(
        ["-A", "-t", "-c", "SHOW TimeZone"],
        port=proxy.port,
        env={"PGOPTIONS": "-c TimeZone=Pacific/Auckland"},
    )
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.strip() == "Pacific/Auckland"
    # A setting pgproxy cannot carry between servers is refused, not dropped silently.
    refused = psql(["-c", "select 1"], port=proxy.port, env={"PGOPTIONS": "-c search_path=x"})
    assert refused.returncode != 0
    assert "unsupported startup parameter in options: search_path" in refused.stderr
    assert_healthy(proxy)
