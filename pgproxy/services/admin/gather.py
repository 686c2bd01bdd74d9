"""One console over ``workers = N``: SHOW gathers every worker's rows, commands reach all.

A worker's console asks its peers over their own Unix sockets, as the local admin
``pgbouncer`` with the application name ``PEER_APPLICATION`` (such a session answers for
its own worker only, so nothing is asked twice), and merges the answers table by table:
per-connection tables are concatenated; per-pool, per-database and per-user tables add up
what is counted per worker (clients, servers, traffic), keep what is configured or already
global (sizes, limits, the shared server counts), and weigh mean times by their counts.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import psycopg

from pgproxy.services.admin.resultset import Column, Value

if TYPE_CHECKING:
    from pgproxy.services.workers import WorkerContext

log = logging.getLogger("pgproxy.admin")

PEER_APPLICATION = "pgproxy-worker-peer"
# A SHOW only peer sessions have: the worker's metrics in the text exposition format.
METRICS_TEXT = "pgproxy_metrics_text"
PEER_TIMEOUT = 5.0  # seconds a peer has to answer

Rows = list[list[Value]]


@dataclass(frozen=True)
class Merge:
    """How a SHOW table's rows from several workers become one table."""

    keys: tuple[str, ...] = ()  # none: rows are concatenated (or name/value rows)
    summed: frozenset[str] = frozenset()
    maxed: frozenset[str] = frozenset()
    weighted: dict[str, str] = field(default_factory=dict)  # mean column → weight column


_TOTALS = ("server_assignment_count", "xact_count", "query_count")
_POOL_COUNTS = frozenset({
    "cl_active", "cl_waiting", "cl_active_cancel_req", "cl_waiting_cancel_req", "sv_active",
    "sv_active_cancel", "sv_being_canceled", "sv_idle", "sv_used", "sv_tested", "sv_login",
})  # fmt: skip
_STAT_COUNTS = frozenset(
    prefix + name
    for prefix in ("total_", "avg_")
    for name in (*_TOTALS, "received", "sent", "recv", "xact_time", "query_time", "wait_time",
                 "client_parse_count", "server_parse_count", "bind_count")
) - {"avg_xact_time", "avg_query_time", "avg_wait_time"}  # fmt: skip
_MEAN_TIMES = {"xact_time": "xact_count", "query_time": "query_count",
               "wait_time": "server_assignment_count"}  # fmt: skip

MERGES: dict[str, Merge] = {
    **{table: Merge() for table in ("clients", "servers", "sockets", "active_sockets", "leaks")},
    "pools": Merge(("database", "user"), _POOL_COUNTS, frozenset({"maxwait", "maxwait_us"})),
    "stats": Merge(
        ("database",),
        _STAT_COUNTS,
        weighted={"avg_" + time: "avg_" + count for time, count in _MEAN_TIMES.items()},
    ),
    "stats_totals": Merge(
        ("database",),
        frozenset(
            {
                *_TOTALS,
                "bytes_received",
                "bytes_sent",
                "xact_time",
                "query_time",
                "wait_time",
                "client_parse_count",
                "server_parse_count",
                "bind_count",
            }
        ),
    ),
    "stats_averages": Merge(
        ("database",),
        frozenset(
            {
                *_TOTALS,
                "bytes_received",
                "bytes_sent",
                "avg_client_parse_count",
                "avg_server_parse_count",
                "avg_bind_count",
            }
        ),
        weighted=dict(_MEAN_TIMES),
    ),
    "pool_stats": Merge(
        ("database", "user"),
        frozenset(
            {
                "pool_size",
                "pool_available",
                "requests_waiting",
                "usage_ms",
                "requests_num",
                "requests_queued",
                "requests_wait_ms",
                "requests_errors",
                "returns_bad",
                "connections_num",
                "connections_ms",
                "connections_errors",
                "connections_lost",
            }
        ),
    ),
    # current_connections counts servers under a shared budget: already the global figure.
    "databases": Merge(
        ("name",), frozenset({"current_client_connections"}), frozenset({"paused", "disabled"})
    ),
    "users": Merge(("name",), frozenset({"current_client_connections"})),
    # Each worker checks the hosts itself: its own view first, the servers of all.
    "hosts": Merge(("database", "host"), frozenset({"servers"})),
}

# Name/value tables (merge_named_values).
NAMED_MERGES: dict[str, Merge] = {
    "lists": Merge(
        summed=frozenset(
            {"used_clients", "login_clients", "used_servers", "free_clients", "free_servers"}
        )
    ),
    "totals": Merge(
        weighted={"avg_" + time: "avg_" + count for time, count in _MEAN_TIMES.items()}
    ),
}


def merge_table(merge: Merge, cols: Sequence[Column], tables: Sequence[Rows]) -> Rows:
    """``tables`` (this worker's first) as one table."""
    if not merge.keys:
        return [row for rows in tables for row in rows]
    names = [col.name for col in cols]
    where = {name: index for index, name in enumerate(names)}
    key_at = [where[key] for key in merge.keys]
    merged: dict[tuple[Value, ...], list[Value]] = {}
    for rows in tables:
        for row in rows:
            key = tuple(row[index] for index in key_at)
            current = merged.get(key)
            if current is None:
                merged[key] = list(row)
            else:
                _combine(merge, where, current, row)
    return list(merged.values())


def _combine(merge: Merge, where: dict[str, int], into: list[Value], row: list[Value]) -> None:
    # Weighted means first, while the weights are still per worker.
    for mean, weight in merge.weighted.items():
        if mean in where and weight in where:
            a, b = _number(into[where[mean]]), _number(row[where[mean]])
            wa, wb = _number(into[where[weight]]), _number(row[where[weight]])
            into[where[mean]] = int((a * wa + b * wb) / (wa + wb)) if wa + wb else 0
    for name in merge.summed:
        if name in where:
            into[where[name]] = _number(into[where[name]]) + _number(row[where[name]])
    for name in merge.maxed:
        if name in where:
            into[where[name]] = max(_number(into[where[name]]), _number(row[where[name]]))


def _number(value: Value | Decimal) -> int:
    return int(value) if value is not None else 0


def merge_named_values(merge: Merge, rows_by_worker: Sequence[Rows]) -> Rows:
    """A name/value table (SHOW TOTALS, SHOW LISTS): rows named in ``merge.summed`` add up
    (every row when it is empty), mean times (``merge.weighted``) are weighed by the row
    of their count, the rest are this worker's."""
    values: dict[str, list[int]] = {}
    for rows in rows_by_worker:
        for name, value in rows:
            values.setdefault(str(name), []).append(_number(value))
    merged: Rows = []
    for name, per_worker in values.items():
        weight = merge.weighted.get(name)
        if weight is not None:
            weights = values.get(weight, [])
            total = sum(weights)
            mean = sum(v * w for v, w in zip(per_worker, weights, strict=False))
            merged.append([name, int(mean / total) if total else 0])
        elif not merge.summed or name in merge.summed:
            merged.append([name, sum(per_worker)])
        else:
            merged.append([name, per_worker[0]])
    return merged


async def _ask_others(worker: WorkerContext, port: int, query: str) -> list[tuple[int, Any]]:
    """(worker index, its rows or the exception it raised) for every other worker."""
    others = [index for index in range(worker.count) if index != worker.index]
    answers = await asyncio.gather(
        *(_ask(worker.socket_dir(index), port, query) for index in others),
        return_exceptions=True,
    )
    return list(zip(others, answers, strict=True))


async def peer_rows(worker: WorkerContext, query: str, port: int) -> list[Rows]:
    """The rows ``query`` gives on every other worker (a worker that cannot answer gives
    none, logged)."""
    rows: list[Rows] = []
    for index, answer in await _ask_others(worker, port, query):
        if isinstance(answer, BaseException):
            log.warning("console: worker %d did not answer %r: %s", index, query, answer)
        else:
            rows.append(answer)
    return rows


async def silent_peers(worker: WorkerContext, port: int) -> list[int]:
    """The other workers that do not answer their console now (dead, restarting, stuck)."""
    answers = await _ask_others(worker, port, "SHOW VERSION")
    return [index for index, answer in answers if isinstance(answer, BaseException)]


async def peer_commands(worker: WorkerContext, query: str, port: int) -> list[str | None]:
    """Run a control command on every other worker: None where it succeeded, else the
    error message."""
    answers = await _ask_others(worker, port, query)
    return [str(answer) if isinstance(answer, BaseException) else None
            for _, answer in answers]  # fmt: skip


async def _ask(socket_dir: str, port: int, query: str) -> Rows:
    async with asyncio.timeout(PEER_TIMEOUT):
        conn = await psycopg.AsyncConnection.connect(
            host=socket_dir, port=port, dbname="pgbouncer", user="pgbouncer",
            application_name=PEER_APPLICATION, autocommit=True, prepare_threshold=None,
        )  # fmt: skip
        try:
            cursor = await conn.execute(query.encode())
            if cursor.description is None:
                return []
            return [list(row) for row in await cursor.fetchall()]
        finally:
            await conn.close()
