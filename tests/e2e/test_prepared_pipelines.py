"""Random pipelines of named-statement commands: through pgproxy (transaction mode, two
servers that keep two statements each, the client moved between them) every command gets
what PostgreSQL itself answers on a direct connection, errors and skips included."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import pq

from pgproxy.embedded import EmbeddedPostgres
from tests.support import ProxyFactory, ProxyProcess, proxy_config

NAMES = (b"a", b"b", b"c", b"d")
QUERIES = (
    b"select 1",
    b"select $1::int + 1",
    b"select 'two'",
    b"selec broken",  # a syntax error: the Parse fails
    b"select 1 / ($1::int - 3)",  # fails when executed with 3
)
PIPELINES = 100


@pytest.fixture(scope="module")
def proxy_small(pg: EmbeddedPostgres, module_proxy_factory: ProxyFactory) -> ProxyProcess:
    return module_proxy_factory(proxy_config(pg, default_pool_size=2, max_prepared_statements=2))


def _pipeline(rng: random.Random) -> list[tuple[str, Any]]:
    """Commands: prepare, execute, describe, close (on random names), and a final sync."""
    commands: list[tuple[str, Any]] = []
    for _ in range(rng.randint(1, 6)):
        name = rng.choice(NAMES)
        kind = rng.choice(("prepare", "prepare", "execute", "execute", "describe", "close"))
        if kind == "prepare":
            commands.append((kind, (name, rng.choice(QUERIES))))
        elif kind == "execute":
            value = str(rng.choice((1, 3, 7))).encode()
            commands.append((kind, (name, rng.choice(([], [value])))))
        else:
            commands.append((kind, name))
    return commands


def _run(pgconn: pq.abc.PGconn, commands: list[tuple[str, Any]]) -> list[tuple[str, str]]:
    """Send ``commands`` as one pipeline and Sync; each command's (status, SQLSTATE)."""
    pgconn.enter_pipeline_mode()
    try:
        for kind, args in commands:
            if kind == "prepare":
                pgconn.send_prepare(args[0], args[1])
            elif kind == "execute":
                # The statement may have no parameter: send what it takes, on both sides.
                pgconn.send_query_prepared(args[0], args[1])
            elif kind == "describe":
                pgconn.send_describe_prepared(args)
            else:
                pgconn.send_close_prepared(args)
        pgconn.pipeline_sync()
        pgconn.flush()
        outcomes: list[tuple[str, str]] = []
        while True:
            result = pgconn.get_result()
            if result is None:
                continue
            status = pq.ExecStatus(result.status)
            if status == pq.ExecStatus.PIPELINE_SYNC:
                break
            sqlstate = result.error_field(pq.DiagnosticField.SQLSTATE) or b""
            rows = [result.get_value(0, 0)] if result.ntuples else []
            outcomes.append((f"{status.name} {rows}", sqlstate.decode()))
        # (Everything is read: after the Sync's result the connection is idle.)
        assert pgconn.get_result() is None
        return outcomes
    finally:
        if pgconn.pipeline_status != pq.PipelineStatus.OFF:
            pgconn.exit_pipeline_mode()


@pytest.fixture
def connections(pg: EmbeddedPostgres, proxy_small: ProxyProcess) -> Iterator[tuple[Any, ...]]:
    direct = psycopg.connect(pg.dsn("app", "app-secret", "appdb"), autocommit=True)
    proxied = psycopg.connect(proxy_small.dsn(), autocommit=True)
    holder = psycopg.connect(proxy_small.dsn(), autocommit=True)
    yield direct, proxied, holder
    for conn in (direct, proxied, holder):
        conn.close()


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_random_pipelines_answer_as_postgresql_does(
    connections: tuple[Any, ...], seed: int
) -> None:
    direct, proxied, holder = connections
    rng = random.Random(seed)
    for number in range(PIPELINES):
        commands = _pipeline(rng)
        holding = rng.random() < 0.4
        if holding:  # another client holds a server: this one may land on the other
            holder.execute("begin")
            holder.execute("select 1")
        try:
            expected = _run(direct.pgconn, commands)
            got = _run(proxied.pgconn, commands)
        finally:
            if holding:
                holder.execute("rollback")
        assert got == expected, (seed, number, commands)
