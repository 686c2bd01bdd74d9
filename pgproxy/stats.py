"""Counters per pool, and the snapshots that turn them into PgBouncer's averages.

The hot path bumps plain fields of ``PoolStats``; nothing here runs per query. Every
``stats_period`` the janitor takes a snapshot of each pool's counters; SHOW STATS reports
averages over the window from the older of the last two snapshots to now, as PgBouncer does.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Final, Literal, get_args

from pgproxy.protocol import codes
from pgproxy.protocol.prepared import StatementCounters

# Why a client's login failed (pgproxy_client_login_failures_total{reason}): the password or
# authorization (auth_failed), an unknown database, a client cap (limit_reached), the pool's
# own login to PostgreSQL (server_login_failed), client_login_timeout, anything else.
LoginFailureReason = Literal[
    "auth_failed", "no_such_database", "limit_reached", "server_login_failed", "timeout", "other",
]  # fmt: skip
LOGIN_FAILURE_REASONS: Final[tuple[LoginFailureReason, ...]] = get_args(LoginFailureReason)


def login_failure_reason(sqlstate: str) -> LoginFailureReason:
    """The reason a login that ended with ``sqlstate`` is counted under, when the code that
    refused it did not name one (ClientConn.fatal's ``reason``). The SQLSTATE alone cannot
    tell everything: PostgreSQL refusing the pool's own login also sends 28P01, and
    pgproxy's PgBouncer-worded refusals (no such database, the client caps) are 08P01."""
    if sqlstate in (codes.INVALID_PASSWORD, codes.INVALID_AUTHORIZATION):
        return "auth_failed"
    if sqlstate == codes.TOO_MANY_CONNECTIONS:
        return "limit_reached"
    return "other"


USEC: Final = 1_000_000


class _Ids:
    """The last connection id given out (a native field in the compiled build, where a
    module-level itertools.count would be a globals lookup and a generic call per id)."""

    def __init__(self) -> None:
        self.last = 0


# Clients and servers share one sequence of ids (SHOW CLIENTS/SERVERS "id", KILL_CLIENT).
_IDS: Final = _Ids()


def set_connection_id_base(base: int) -> None:
    """Number connections from ``base`` on (each worker its own range: ids stay unique in
    a console that shows every worker)."""
    _IDS.last = base


def next_connection_id() -> int:
    """A new connection id, unique within this process."""
    _IDS.last += 1
    return _IDS.last


class PoolStats(StatementCounters):
    """Plain counters bumped on the hot path; the console and metrics read them (and,
    from StatementCounters, those of named prepared statements).

    Times are float seconds here; the console reports them in microseconds.
    """

    __slots__ = (
        "client_logins",
        "connections_errors",
        "connections_lost",
        "connections_num",
        "connections_time",
        "leaks",
        "query_count",
        "query_time",
        "received_bytes",
        "requests_errors",
        "requests_queued",
        "returns_bad",
        "sent_bytes",
        "server_assignment_count",
        "state_leaks",
        "timeouts",
        "wait_time",
        "waiters_served",
        "xact_count",
        "xact_time",
    )

    def __init__(self) -> None:
        super().__init__()
        # PgBouncer's SHOW STATS figures.
        self.server_assignment_count = 0
        self.xact_count = 0
        self.query_count = 0
        self.received_bytes = 0
        self.sent_bytes = 0
        self.xact_time = 0.0
        self.query_time = 0.0
        self.wait_time = 0.0
        # psycopg_pool's figures (SHOW POOL_STATS).
        self.requests_queued = 0  # requests that had to wait for a server
        self.waiters_served = 0  # of the assignments, those that went to a waiter
        self.requests_errors = 0  # waits that ended in an error (timeout, max_waiting)
        self.returns_bad = 0  # servers given back in a state nobody else may see
        self.connections_num = 0  # server connections opened
        self.connections_time = 0.0  # seconds spent opening them
        self.connections_errors = 0  # failed attempts to open one
        self.connections_lost = 0  # servers that PostgreSQL (or the network) closed
        # Slow-path events (metrics).
        self.client_logins = 0
        self.leaks = 0  # clients that held a server past leak_detection_threshold
        self.timeouts: Counter[str] = Counter()  # by kind: query_wait, query, ...
        # Session state left on servers (transaction_state_guard), by kind: set, listen, ...
        self.state_leaks: Counter[str] = Counter()


@dataclass(slots=True)
class Totals:
    """A snapshot (or a sum) of the SHOW STATS counters; times in seconds."""

    server_assignment_count: int = 0
    xact_count: int = 0
    query_count: int = 0
    received_bytes: int = 0
    sent_bytes: int = 0
    xact_time: float = 0.0
    query_time: float = 0.0
    wait_time: float = 0.0
    client_parse_count: int = 0
    server_parse_count: int = 0
    bind_count: int = 0

    @classmethod
    def of(cls, stats: PoolStats) -> Totals:
        """The current values of ``stats``."""
        return cls(**{name: getattr(stats, name) for name in _TOTAL_FIELDS})

    def add(self, other: Totals) -> None:
        """Add ``other`` into this sum."""
        for name in _TOTAL_FIELDS:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def figures(self) -> list[int]:
        """PgBouncer's order: assignments, xacts, queries, received, sent, xact_time,
        query_time, wait_time (µs), client parses, server parses, binds."""
        return [
            self.server_assignment_count,
            self.xact_count,
            self.query_count,
            self.received_bytes,
            self.sent_bytes,
            int(self.xact_time * USEC),
            int(self.query_time * USEC),
            int(self.wait_time * USEC),
            self.client_parse_count,
            self.server_parse_count,
            self.bind_count,
        ]

    def averages(self, older: Totals, seconds: float) -> list[int]:
        """PgBouncer's averages from ``older`` to this: rates per second, and the mean time
        per transaction, per query and per assignment (µs), in ``figures`` order."""
        if seconds <= 0:
            return [0] * 11

        def rate(now: int, then: int) -> int:
            return int((now - then) / seconds)

        def mean(time_now: float, time_then: float, count: int) -> int:
            return int((time_now - time_then) * USEC / count) if count > 0 else 0

        xacts = self.xact_count - older.xact_count
        queries = self.query_count - older.query_count
        assignments = self.server_assignment_count - older.server_assignment_count
        return [
            rate(self.server_assignment_count, older.server_assignment_count),
            rate(self.xact_count, older.xact_count),
            rate(self.query_count, older.query_count),
            rate(self.received_bytes, older.received_bytes),
            rate(self.sent_bytes, older.sent_bytes),
            mean(self.xact_time, older.xact_time, xacts),
            mean(self.query_time, older.query_time, queries),
            mean(self.wait_time, older.wait_time, assignments),
            rate(self.client_parse_count, older.client_parse_count),
            rate(self.server_parse_count, older.server_parse_count),
            rate(self.bind_count, older.bind_count),
        ]


_TOTAL_FIELDS: Final = tuple(field.name for field in fields(Totals))


# The console's counters in a StatsWindow (beside the pools' (database, user) keys).
CONSOLE_STATS_KEY: Final = "console"


class StatsWindow:
    """The two most recent snapshots per pool key, taken every ``stats_period``."""

    def __init__(self, now: float) -> None:
        # PgBouncer starts with a one-second-old empty snapshot.
        self.older_at = now - 1.0
        self.newer_at = now
        self.older: dict[object, Totals] = {}
        self.newer: dict[object, Totals] = {}

    def due(self, now: float, period: float) -> bool:
        """Whether a new snapshot should be taken."""
        return now - self.newer_at >= period

    def snapshot(self, now: float, pools: Iterable[tuple[object, PoolStats]]) -> None:
        """Take a snapshot of every pool's counters."""
        self.older, self.older_at = self.newer, self.newer_at
        self.newer = {key: Totals.of(stats) for key, stats in pools}
        self.newer_at = now

    def older_totals(self, key: object) -> Totals:
        """The older snapshot of a pool (zeros if the pool is newer than it)."""
        return self.older.get(key) or Totals()
