"""Python time per transaction on pgproxy's hot path, without sockets or PostgreSQL.

    .venv/bin/python bench/hotpath.py [--transactions N] [--repeat R] [--profile]

Drives the real ClientConn, ServerConn and Pool objects with in-memory transports: each
client sends a pgbench-like request (a simple Query, or an unnamed Parse/Bind/Describe/
Execute/Sync batch), each linked server answers with the reply PostgreSQL would send, and
the pool links and unlinks them as it does in transaction mode (named prepared statements
on, metrics histograms on). It prints the microseconds of Python per transaction: what
pgproxy adds on top of the two reads and two writes any pooler pays (those are measured by
``bench/run.py``, which splits a pooler's CPU into user and kernel time). Deterministic
enough to compare two versions of the code on a noisy machine; best of ``--repeat`` runs.
Another checkout: ``PYTHONPATH=/path/to/it .venv/bin/python bench/hotpath.py``.
``--profile`` adds a cProfile of select16: each function's share of the time in its own
code (cProfile inflates calls, so small functions look dearer than they are).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import gc
import io
import pstats
import struct
import sys
import time
from collections.abc import Callable
from typing import Any

import uvloop

from pgproxy.config import PoolSettings, Settings
from pgproxy.core import client as client_module
from pgproxy.core import params as tracked
from pgproxy.core.client import READY, ClientConn
from pgproxy.core.histograms import PoolHistograms
from pgproxy.core.pool import Pool
from pgproxy.core.server import IDLE, ServerConn, ServerTarget
from pgproxy.protocol.messages import startup_message
from pgproxy.protocol.prepared import ClientStatements
from pgproxy.services.daemon import Daemon
from pgproxy.testing import CountingTransport


def message(type_byte: bytes, payload: bytes = b"") -> bytes:
    """One protocol message."""
    return type_byte + struct.pack("!I", len(payload) + 4) + payload


SQL = b"SELECT abalance FROM pgbench_accounts WHERE aid = "
SIMPLE = message(b"Q", SQL + b"4242;\0")
EXTENDED = (
    message(b"P", b"\0" + SQL + b"$1;\0\0\0")
    + message(b"B", b"\0\0\0\0\0\x01\0\0\0\x044242\0\0")
    + message(b"D", b"P\0")
    + message(b"E", b"\0\0\0\0\0")
    + message(b"S")
)
ROWS = (
    message(b"T", b"\0\x01abalance\0" + b"\0" * 18)
    + message(b"D", b"\0\x01\0\0\0\x010")
    + message(b"C", b"SELECT 1\0")
    + message(b"Z", b"I")
)


def completed(tag: bytes, status: bytes = b"T") -> bytes:
    """A statement's reply without rows: CommandComplete, ReadyForQuery."""
    return message(b"C", tag + b"\0") + message(b"Z", status)


def query(sql: bytes) -> bytes:
    """A simple Query message."""
    return message(b"Q", sql + b"\0")


# pgbench's default script (TPC-B-like), protocol simple: seven round trips in a transaction.
TPCB = [
    (query(b"BEGIN;"), completed(b"BEGIN")),
    (query(b"UPDATE pgbench_accounts SET abalance = abalance + -4 WHERE aid = 4242;"),
     completed(b"UPDATE 1")),
    (SIMPLE, ROWS[: -len(message(b"Z", b"I"))] + message(b"Z", b"T")),
    (query(b"UPDATE pgbench_tellers SET tbalance = tbalance + -4 WHERE tid = 7;"),
     completed(b"UPDATE 1")),
    (query(b"UPDATE pgbench_branches SET bbalance = bbalance + -4 WHERE bid = 1;"),
     completed(b"UPDATE 1")),
    (query(b"INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) "
           b"VALUES (7, 1, 4242, -4, CURRENT_TIMESTAMP);"),
     completed(b"INSERT 0 1")),
    (query(b"END;"), completed(b"COMMIT", b"I")),
]  # fmt: skip
SCENARIOS = {
    # name: (clients, [(request, reply), ...]: the round trips of one transaction)
    "select16": (16, [(SIMPLE, ROWS)]),
    "select100": (100, [(SIMPLE, ROWS)]),
    "extended16": (16, [(EXTENDED, message(b"1") + message(b"2") + ROWS)]),
    "tpcb16": (16, TPCB),
}
SERVERS = 20
LOGINS = 20_000

# pgbench -C: every transaction is a new connection: an SSLRequest (refused: 'N'), the
# StartupMessage, one select, Terminate. (The server has the settings the clients ask for,
# as it has after the first client: no SET at the link.)
SSL_REQUEST = struct.pack("!II", 8, 80877103)
STARTUP = startup_message({"user": "bench", "database": "bench", "application_name": "pgbench"})
TERMINATE = message(b"X")
WELCOME = [
    ("application_name", "pgbench"), ("client_encoding", "UTF8"), ("DateStyle", "ISO, MDY"),
    ("integer_datetimes", "on"), ("IntervalStyle", "postgres"), ("is_superuser", "off"),
    ("server_encoding", "UTF8"), ("server_version", "15.18"),
    ("session_authorization", "bench"), ("standard_conforming_strings", "on"),
    ("TimeZone", "UTC"),
]  # fmt: skip


def attach(conn: Any, transport: CountingTransport) -> None:
    """Give a server or client connection its transport, as connection_made would."""
    conn.transport = transport
    # (Older checkouts, to compare with, write through the transport: they have no send.)
    with contextlib.suppress(AttributeError):
        conn.send = transport.write


class ClosingTransport(CountingTransport):
    """A client's socket: it has a peer, and closing it ends the connection at once."""

    def __init__(self, protocol: asyncio.BaseProtocol) -> None:
        super().__init__()
        self.protocol: asyncio.BaseProtocol | None = protocol

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def close(self) -> None:
        protocol, self.protocol = self.protocol, None  # (as uvloop's transports drop theirs)
        if protocol is not None:
            protocol.connection_lost(None)


async def logins(count: int) -> float:
    """Seconds of Python per login for pgbench -C's pattern (connection, SSLRequest,
    StartupMessage under trust, one select on the pool's one server, Terminate)."""
    settings = Settings.model_validate(
        {
            "databases": {"bench": {"host": "127.0.0.1", "port": 1, "user": "bench"}},
            "pool_mode": "transaction",
            "log_connections": False,
            "log_disconnections": False,
        }
    )
    daemon = Daemon(settings)
    pool = daemon.registry.pool_for("bench", "bench")
    assert pool is not None
    pool.measure(PoolHistograms(120.0))
    pool.welcome = list(WELCOME)
    pool.welcome_values = tracked.from_pairs(dict(WELCOME))
    server = ServerConn(pool)
    attach(server, CountingTransport())
    server.params = pool.welcome_values
    pool.change_server_state(server, IDLE)
    # The listeners' factory (older checkouts, to compare with, call the class).
    new_client: Callable[[Any], ClientConn] = getattr(client_module, "accept_client", ClientConn)
    services: Any = getattr(daemon, "client_services", daemon)  # (older checkouts: none)
    started = time.perf_counter()
    for _ in range(count):
        client = new_client(services)
        client.connection_made(ClosingTransport(client))
        client.data_received(SSL_REQUEST)
        client.data_received(STARTUP)
        client.data_received(SIMPLE)
        server.data_received(ROWS)
        client.data_received(TERMINATE)
    took = time.perf_counter() - started
    assert pool.stats.xact_count == count and not daemon.registry.clients
    return took / count


async def run(clients: int, steps: list[tuple[bytes, bytes]], transactions: int) -> float:
    """Seconds of Python per transaction for one scenario."""
    # (A transaction of several round trips keeps its server: no client may wait for one.)
    assert len(steps) == 1 or clients <= SERVERS
    settings = PoolSettings(mode="transaction", size=SERVERS, max_prepared_statements=200)
    pool = Pool("bench", "bench", ServerTarget("127.0.0.1", 1, "bench", "bench", None), settings)
    pool.measure(PoolHistograms(120.0))
    values = tracked.from_pairs({"client_encoding": "UTF8"})
    servers = []
    for _ in range(SERVERS):
        server = ServerConn(pool)
        attach(server, CountingTransport())
        server.params = values
        # transaction_state_guard (warn by default) watches the replies, as Pool does for
        # the servers it opens. (Older checkouts, to compare with, have no guard.)
        guard = getattr(server.scan, "guard", None)
        if guard is not None:
            guard(getattr(pool, "guard", "off") != "off")
        pool.change_server_state(server, IDLE)  # logged in: onto the idle list
        servers.append(server)
    daemon = Daemon(Settings(max_packet_size=1 << 30))  # (nothing started: no loop work)
    services: Any = getattr(daemon, "client_services", daemon)  # (older checkouts: none)
    linked = []
    for _ in range(clients):
        client = ClientConn(services)
        attach(client, CountingTransport())
        client.state = READY
        client.pool = pool
        client.params = values
        client.scan.statements = ClientStatements(pool.statement_registry, pool.stats)
        linked.append(client)
    done = 0
    started = time.perf_counter()
    *within, (request, reply) = steps
    while done < transactions:
        # The round trips inside the transaction: every client is linked, every server
        # answers once.
        for inner_request, inner_reply in within:
            for client in linked:
                client.data_received(inner_request)
            for server in servers:
                if server.client is not None:
                    server.data_received(inner_reply)
        # The last (or only) one: every client sends its request (in a one-statement
        # transaction, the first SERVERS get a server, the rest wait); then servers answer
        # until every client has had its reply.
        for client in linked:
            client.data_received(request)
        answering = True
        while answering:
            answering = False
            for server in servers:
                if server.client is not None:
                    server.data_received(reply)
                    done += 1
                    answering = True
        # (A checkout whose histograms sort their observations in bulk: the janitor's job,
        # a few times a second.)
        fold = getattr(pool.histograms, "fold", None)
        if fold is not None:
            fold()
    took = time.perf_counter() - started
    assert pool.stats.xact_count == done and not pool.waiters
    return took / done


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--transactions", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="also a cProfile of select16")
    args = parser.parse_args()
    gc.freeze()  # (as the daemon does once started: pgproxy.cli)
    print(f"| scenario | µs of Python per transaction (best of {args.repeat}) |")
    print("|:--|--:|")
    for name, (clients, steps) in SCENARIOS.items():
        best = min(uvloop.run(run(clients, steps, args.transactions)) for _ in range(args.repeat))
        print(f"| {name} | {best * 1e6:.2f} |")
    best = min(uvloop.run(logins(LOGINS)) for _ in range(args.repeat))
    print(f"| login (a connection per transaction: µs per login) | {best * 1e6:.2f} |")
    if args.profile:
        print()
        print(profile(args.transactions))
    return 0


def profile(transactions: int) -> str:
    """select16 under cProfile: the functions by time in their own code (Markdown)."""
    clients, steps = SCENARIOS["select16"]
    profiler = cProfile.Profile()
    profiler.enable()
    uvloop.run(run(clients, steps, transactions))
    profiler.disable()
    stats = pstats.Stats(profiler, stream=io.StringIO())
    rows = stats.stats  # type: ignore[attr-defined]  # (documented, not in the stubs)
    total = sum(row[2] for row in rows.values())
    lines = ["| own % | calls per transaction | function |", "|--:|--:|:--|"]
    top = sorted(rows.items(), key=lambda item: -item[1][2])[:12]
    for (filename, line, function), (_, calls, own, _, _) in top:
        where = f"{filename.rsplit('/', 1)[-1]}:{line}" if line else filename
        share = 100 * own / total
        lines.append(f"| {share:.1f} | {calls / transactions:.2f} | `{function}` ({where}) |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
