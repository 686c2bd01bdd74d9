"""The pooling core in one process: the real Pool, ServerConn and ClientConn objects over
in-memory transports (pgproxy.testing), with a connector that logs servers in without
PostgreSQL. Each test checks who got which server, in which order, and what bytes and
errors reached each side; time is passed to the janitor's functions rather than waited."""

from __future__ import annotations

import asyncio
import time

import pytest

from pgproxy.core import janitor
from pgproxy.core import params as tracked
from pgproxy.core.pool import LocalServerBudget, Pool
from pgproxy.core.server import ServerConn, ServerLoginError
from pgproxy.core.states import ServerState
from pgproxy.protocol import codes, messages
from pgproxy.services.workers import SharedBudgets, SharedServerBudget
from tests.inprocess import (
    BEGIN,
    IN_TRANSACTION,
    QUERY,
    ROWS,
    MemoryPostgres,
    Setup,
    error_of,
    received,
    settle,
    terminated,
    writes,
)


async def test_a_client_gets_a_server_opened_for_it_and_then_an_idle_one_at_once() -> None:
    setup = Setup()
    pool = setup.pool()
    client = setup.client(pool)
    client.data_received(QUERY)
    assert client.pool_state == "waiting" and list(pool.waiters) == [client]
    await settle()
    [server] = setup.postgres.opened
    assert client.server is server and server.client is client
    assert writes(server) == QUERY  # what arrived while it waited
    assert client.pool_state == "active" and server.state == "active"
    server.data_received(ROWS)
    assert received(client) == ROWS
    assert client.server is None and server.client is None
    assert list(pool.idle) == [server] and server.state == "idle"
    assert client.pool_state == "idle"
    # The next transaction is linked in the same call, to the same server.
    client.data_received(QUERY)
    assert client.server is server and writes(server) == QUERY
    assert pool.stats.xact_count == 1 and pool.stats.requests_queued == 1
    assert pool.server_states()["active"] == 1


async def test_waiting_clients_are_served_first_come_first_served() -> None:
    setup = Setup(default_pool_size=1)
    pool = setup.pool()
    clients = [setup.client(pool) for _ in range(4)]
    for client in clients:
        client.data_received(QUERY)
    await settle()
    [server] = setup.postgres.opened  # pool_size 1: one server for all four
    served = []
    for _ in range(len(clients)):
        client = server.client
        assert client is not None
        served.append(client)
        assert writes(server) == QUERY
        server.data_received(ROWS)
        assert received(client) == ROWS
    assert served == clients
    assert not pool.waiters and list(pool.idle) == [server]
    assert pool.stats.waiters_served == 4


async def test_a_transaction_keeps_its_server_until_it_ends() -> None:
    setup = Setup(default_pool_size=1)
    pool = setup.pool()
    first, second = setup.client(pool), setup.client(pool)
    first.data_received(BEGIN)
    await settle()
    [server] = setup.postgres.opened
    writes(server)
    server.data_received(IN_TRANSACTION)
    second.data_received(QUERY)
    assert server.client is first and list(pool.waiters) == [second]
    first.data_received(messages.query("COMMIT"))
    server.data_received(messages.message(b"C", b"COMMIT\0") + messages.ready_for_query())
    assert server.client is second and writes(server) == messages.query("COMMIT") + QUERY


async def test_pool_size_caps_the_servers_opened() -> None:
    setup = Setup(default_pool_size=2)
    pool = setup.pool()
    clients = [setup.client(pool) for _ in range(5)]
    for client in clients:
        client.data_received(QUERY)
    await settle()
    assert len(setup.postgres.opened) == 2 and len(pool.servers) == 2
    assert [client.server is not None for client in clients] == [True, True] + [False] * 3
    assert list(pool.waiters) == clients[2:]


async def test_max_waiting_refuses_a_client_with_53300() -> None:
    setup = Setup(default_pool_size=1, max_waiting=1)
    pool = setup.pool()
    first, second = setup.client(pool), setup.client(pool)
    setup.postgres.hold = asyncio.Event()
    first.data_received(QUERY)
    second.data_received(QUERY)
    assert error_of(received(second)) == (
        codes.TOO_MANY_CONNECTIONS,
        "too many clients waiting (max_waiting)",
    )
    assert list(pool.waiters) == [first] and pool.stats.requests_errors == 1
    setup.postgres.hold.set()
    await settle()
    assert first.server is not None


async def test_a_database_budget_takes_the_idle_server_of_another_users_pool() -> None:
    setup = Setup()
    budget = LocalServerBudget(1)  # max_db_connections = 1, shared by two users' pools
    pool_a = setup.pool(user="a", budgets=(budget,))
    pool_b = setup.pool(user="b", budgets=(budget,))
    client_a, client_b = setup.client(pool_a), setup.client(pool_b)
    client_a.data_received(QUERY)
    await settle()
    [server_a] = setup.postgres.opened
    server_a.data_received(ROWS)
    assert list(pool_a.idle) == [server_a] and budget.used == 1
    client_b.data_received(QUERY)
    # Full: pool b's waiter closes pool a's idle server; its place is free once closed.
    assert terminated(server_a) and not pool_a.idle and budget.used == 1
    await settle()
    assert len(setup.postgres.opened) == 1 and client_b.server is None
    MemoryPostgres.backend_exits(server_a)
    await settle()
    [_, server_b] = setup.postgres.opened
    assert client_b.server is server_b and server_b.pool is pool_b
    assert writes(server_b) == QUERY and budget.used == 1


async def test_a_user_budget_holds_a_waiter_while_the_other_pool_is_busy() -> None:
    setup = Setup()
    budget = LocalServerBudget(1)  # max_user_connections = 1 over two databases
    pool_one = setup.pool(database="one", budgets=(budget,))
    pool_two = setup.pool(database="two", budgets=(budget,))
    busy, waiting = setup.client(pool_one), setup.client(pool_two)
    busy.data_received(BEGIN)
    await settle()
    [server] = setup.postgres.opened
    server.data_received(IN_TRANSACTION)
    waiting.data_received(QUERY)
    await settle()
    # Nothing idle to take: the waiter waits, no server is opened past the budget.
    assert len(setup.postgres.opened) == 1 and list(pool_two.waiters) == [waiting]
    assert not terminated(server) and budget.full
    busy.data_received(messages.query("COMMIT"))
    server.data_received(messages.message(b"C", b"COMMIT\0") + messages.ready_for_query())
    # The freed server is idle in pool one; the janitor's pass makes room for pool two.
    pool_two.grow_blocked_until = 0.0
    janitor.recycle(pool_two, time.monotonic())
    assert terminated(server)
    MemoryPostgres.backend_exits(server)
    await settle()
    assert waiting.server is setup.postgres.opened[1] and budget.used == 1


async def test_a_budget_shared_by_workers_counts_every_workers_servers() -> None:
    setup = Setup()
    shared = SharedBudgets(2)
    mine = SharedServerBudget(shared, 0, "db:db", 2)
    theirs = SharedServerBudget(shared, 1, "db:db", 2)
    assert theirs.take(reserve=False) and theirs.take(reserve=False)  # the other worker
    pool = setup.pool(budgets=(mine,))
    client = setup.client(pool)
    client.data_received(QUERY)
    await settle()
    assert not setup.postgres.opened and list(pool.waiters) == [client]
    assert mine.used == theirs.used == 2
    theirs.give_back()
    pool.grow_blocked_until = 0.0
    janitor.recycle(pool, time.monotonic())
    await settle()
    assert client.server is setup.postgres.opened[0] and mine.used == 2


async def test_query_wait_timeout_ends_the_wait_with_08p01() -> None:
    setup = Setup(query_wait_timeout=5.0)
    pool = setup.pool()
    client = setup.client(pool)
    setup.postgres.hold = asyncio.Event()
    client.data_received(QUERY)
    janitor.expire_waiters(pool, client.wait_started_at + 4.0)
    assert list(pool.waiters) == [client]
    janitor.expire_waiters(pool, client.wait_started_at + 5.0)
    assert error_of(received(client)) == (codes.PROTOCOL_VIOLATION, "query_wait_timeout")
    assert not pool.waiters and client.closed
    assert pool.stats.timeouts["query_wait"] == 1
    setup.postgres.hold.set()
    await settle()
    # The server opened for it stays idle for the next client.
    assert list(pool.idle) == setup.postgres.opened


async def test_server_idle_timeout_closes_the_longest_idle_server_above_min_pool_size() -> None:
    setup = Setup(server_idle_timeout=10.0, min_pool_size=1)
    pool = setup.pool()
    clients = [setup.client(pool) for _ in range(2)]
    for client in clients:
        client.data_received(QUERY)
    await settle()
    first, second = setup.postgres.opened
    first.data_received(ROWS)
    second.data_received(ROWS)
    assert list(pool.idle) == [first, second]
    now = second.idle_since + 10.0
    janitor.recycle(pool, now)
    assert terminated(first) and not terminated(second) and list(pool.idle) == [second]
    janitor.recycle(pool, now)  # min_pool_size = 1: the last one stays
    assert not terminated(second) and pool.servers == {second}


async def test_a_login_refused_by_postgresql_reaches_the_waiting_clients() -> None:
    setup = Setup()
    pool = setup.pool()
    clients = [setup.client(pool) for _ in range(2)]
    setup.postgres.refuse = ServerLoginError(
        codes.INVALID_PASSWORD, "password authentication failed"
    )
    for client in clients:
        client.data_received(QUERY)
    await settle()
    for client in clients:
        assert error_of(received(client)) == (
            codes.INVALID_PASSWORD,
            "password authentication failed",
        )
    assert not pool.waiters and pool.stats.connections_errors >= 1


async def test_a_client_that_leaves_inside_a_transaction_closes_its_server() -> None:
    setup = Setup()
    pool = setup.pool()
    client = setup.client(pool)
    client.data_received(BEGIN)
    await settle()
    [server] = setup.postgres.opened
    server.data_received(IN_TRANSACTION)
    client.connection_lost(None)
    assert terminated(server) and server not in pool.servers and pool.stats.returns_bad == 1


async def test_null_pool_closes_a_server_nobody_waits_for() -> None:
    setup = Setup(null_pool=True, default_pool_size=1)
    pool = setup.pool()
    first, second = setup.client(pool), setup.client(pool)
    first.data_received(QUERY)
    second.data_received(QUERY)
    await settle()
    [server] = setup.postgres.opened
    server.data_received(ROWS)
    # A waiter gets it as in any pool ...
    assert server.client is second and not terminated(server)
    server.data_received(ROWS)
    # ... but with nobody waiting it is closed rather than kept idle.
    assert terminated(server) and not pool.idle and not pool.servers


async def test_reserve_pool_opens_an_extra_server_after_reserve_pool_timeout() -> None:
    setup = Setup(default_pool_size=1, reserve_pool_size=1, reserve_pool_timeout=3.0)
    pool = setup.pool()
    first, second = setup.client(pool), setup.client(pool)
    first.data_received(BEGIN)
    await settle()
    [server] = setup.postgres.opened
    second.data_received(QUERY)
    janitor.recycle(pool, second.wait_started_at + 2.0)
    await settle()
    assert len(setup.postgres.opened) == 1 and list(pool.waiters) == [second]
    janitor.recycle(pool, second.wait_started_at + 3.0)
    await settle()
    [_, reserve] = setup.postgres.opened
    assert second.server is reserve and first.server is server
    assert writes(reserve) == QUERY
    # Once the reserve is full nothing more is opened.
    third = setup.client(pool)
    third.data_received(QUERY)
    janitor.recycle(pool, third.wait_started_at + 10.0)
    await settle()
    assert len(setup.postgres.opened) == 2 and list(pool.waiters) == [third]


@pytest.mark.parametrize("mode", ["session", "transaction"])
async def test_pool_mode_decides_when_the_server_goes_back(mode: str) -> None:
    setup = Setup(pool_mode=mode, server_reset_query="")
    pool = setup.pool()
    client = setup.client(pool)
    client.data_received(QUERY)
    await settle()
    [server] = setup.postgres.opened
    server.data_received(ROWS)
    if mode == "session":
        assert client.server is server and not pool.idle
        client.connection_lost(None)
    assert client.server is None and list(pool.idle) == [server]


def where(pool: Pool, server: ServerConn) -> str:
    """The pool's list that holds ``server`` ('linked' for an active one)."""
    places = {
        "idle": server in pool.idle, "reset": server in pool.used,
        "tested": server in pool.tested, "being_canceled": server in pool.being_canceled,
        "active": server.client is not None,
    }  # fmt: skip
    found = [name for name, holds in places.items() if holds]
    assert len(found) <= 1, found
    return found[0] if found else "closed"


async def test_a_servers_state_is_always_the_list_that_holds_it() -> None:
    setup = Setup(pool_mode="session", server_reset_query="DISCARD ALL")
    pool = setup.pool()
    client = setup.client(pool)
    client.data_received(QUERY)
    await settle()
    [server] = setup.postgres.opened
    seen = [(server.state, where(pool, server))]
    server.data_received(ROWS)
    client.connection_lost(None)  # session mode: the reset query runs before reuse
    seen.append((server.state, where(pool, server)))
    assert writes(server) == QUERY + messages.query("DISCARD ALL")
    server.data_received(messages.message(b"C", b"DISCARD ALL\0") + messages.ready_for_query())
    seen.append((server.state, where(pool, server)))
    pool.check(server, "SELECT 1", time.monotonic())  # server_check_query
    seen.append((server.state, where(pool, server)))
    server.data_received(messages.message(b"I") + messages.ready_for_query())
    seen.append((server.state, where(pool, server)))
    pool.retire(server)
    seen.append((server.state, where(pool, server)))
    assert seen == [
        ("active", "active"),
        ("reset", "reset"),
        ("idle", "idle"),
        ("tested", "tested"),
        ("idle", "idle"),
        ("closed", "closed"),
    ]
    assert pool.server_states() == {
        "login": 0,
        "idle": 0,
        "active": 0,
        "reset": 0,
        "tested": 0,
        "being_canceled": 0,
    }
    with pytest.raises(ValueError, match="is closed"):
        pool.change_server_state(server, ServerState.IDLE)  # a closed server stays closed


async def test_a_corrupt_server_stream_ends_its_client_and_the_server() -> None:
    setup = Setup()
    pool = setup.pool()
    client = setup.client(pool)
    client.data_received(QUERY)
    await settle()
    [server] = setup.postgres.opened
    server.data_received(b"T\x00\x00\x00\x02")  # a length below 4: not PostgreSQL's stream
    assert error_of(received(client)) == (codes.CONNECTION_FAILURE, "server conn crashed?")
    assert terminated(server) and server.state == "closed" and not pool.servers
    assert client.closed and client.server is None


async def test_a_welcome_shows_the_clients_own_values_for_the_tracked_parameters() -> None:
    setup = Setup()
    pool = setup.pool()
    pool.welcome = [("client_encoding", "UTF8"), ("server_version", "15.0")]
    utf8 = tracked.from_pairs({"client_encoding": "UTF8"})
    latin1 = tracked.from_pairs({"client_encoding": "LATIN1"})
    version = messages.parameter_status("server_version", "15.0")
    as_utf8 = messages.parameter_status("client_encoding", "UTF8") + version
    as_latin1 = messages.parameter_status("client_encoding", "LATIN1") + version
    # The same values again (the last ones are kept by identity), other values, an equal
    # tuple that is another object.
    assert pool.parameter_statuses(utf8) == as_utf8
    assert pool.parameter_statuses(utf8) == as_utf8
    assert pool.parameter_statuses(latin1) == as_latin1
    assert pool.parameter_statuses(tuple(list(utf8))) == as_utf8
    assert pool.parameter_statuses(latin1) == as_latin1
