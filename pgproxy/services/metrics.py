"""Prometheus metrics: histograms the hot path feeds, and a collector read at scrape time.

The hot path only bumps plain counters (``PoolStats``) and counts durations in their
histogram buckets (``Histogram.observe``). Everything
else — gauges of clients and servers per state, counters, the histograms' cumulative
buckets — is read from the live pools when Prometheus scrapes, in the event loop's thread,
so no lock is needed. Labels: ``database`` and ``user`` of a pool, never anything finer
(a client, a query).
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from pgproxy import BUILD, __version__
from pgproxy.core.histograms import Histogram
from pgproxy.core.state_guard import KINDS as STATE_LEAK_KINDS
from pgproxy.protocol.messages import printable
from pgproxy.services.admin import CONSOLE_DATABASE
from pgproxy.stats import LOGIN_FAILURE_REASONS

if TYPE_CHECKING:
    # (The daemon as the console and /metrics see it: an interface pgproxy.services.daemon meets.)
    from pgproxy.core.pool import Pool
    from pgproxy.services.control import DaemonView as Daemon

HOST_ROLES = ("primary", "standby", "unknown")  # the roles pgproxy.core.hosts tells apart

TIMEOUT_KINDS = (
    "query_wait", "query", "idle_transaction", "transaction", "client_idle", "client_login",
)  # fmt: skip
POOL_LABELS = ("database", "user")
# (ServerConn state, metric label): a server running the session reset is PgBouncer's 'used'.
SERVER_STATES = (
    ("active", "active"), ("idle", "idle"), ("reset", "used"), ("tested", "tested"),
    ("login", "login"),
)  # fmt: skip


class PgproxyCollector(Collector):
    """Reads the daemon's pools at scrape time."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def collect(self) -> Iterator[Metric]:
        daemon = self.daemon
        pools = list(daemon.registry.pools.values())
        now = daemon.loop_time()
        yield _gauge("pgproxy_up", "1 while pgproxy serves.", 1)
        info = GaugeMetricFamily("pgproxy_info", "pgproxy's version.", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        build = GaugeMetricFamily(
            "pgproxy_build_info",
            "pgproxy's version, the Python version and the build (compiled, pure or partial).",
            labels=["version", "python", "build"],
        )
        build.add_metric([__version__, platform.python_version(), BUILD], 1)
        yield build
        yield _gauge(
            "pgproxy_shutting_down",
            "1 while a shutdown waits for servers or clients.",
            int(daemon.pauses.shutdown_mode is not None),
        )
        clients = len(daemon.registry.clients)
        yield _gauge("pgproxy_client_connections", "Client connections.", clients)
        yield from _client_limits(daemon)
        failures = CounterMetricFamily(
            "pgproxy_client_login_failures",
            "Client logins that ended in an error, by reason.",
            labels=["reason"],
        )
        for reason in LOGIN_FAILURE_REASONS:  # every one, at 0 until it happens
            failures.add_metric([reason], daemon.registry.login_failures[reason])
        yield failures
        yield from _pool_gauges(daemon, pools, now)
        yield from _pool_counters(daemon, pools)
        yield from _pool_histograms(pools)
        yield from _host_metrics(daemon)


def _host_metrics(daemon: Daemon) -> Iterator[Metric]:
    """The hosts of databases with target_session_attrs, several hosts or max_replica_lag
    (SHOW HOSTS), by database entry."""
    labels = ["database", "host"]
    up = GaugeMetricFamily(
        "pgproxy_host_up", "1 if the host answered its last login or check, else 0.", labels=labels
    )
    role = GaugeMetricFamily(
        "pgproxy_host_role",
        "1 for the host's role as last seen (primary, standby or unknown).",
        labels=[*labels, "role"],
    )
    lag = GaugeMetricFamily(
        "pgproxy_replica_lag_seconds",
        "Seconds a standby's replay is behind (0 when it has replayed all it received, "
        "and for the primary).",
        labels=labels,
    )
    failovers = CounterMetricFamily(
        "pgproxy_failovers",
        "Times the primary moved to another of the database's hosts.",
        labels=["database"],
    )
    for topology in daemon.registry.topologies:
        for database in sorted({pool.database for pool in topology.policies}):
            failovers.add_metric([database], topology.failovers)
            for host in topology.hosts.values():
                up.add_metric([database, host.name], 1 if host.up else 0)
                for name in HOST_ROLES:
                    role.add_metric([database, host.name, name], int(host.role == name))
                if host.role == "primary":
                    lag.add_metric([database, host.name], 0.0)
                elif host.lag_seconds is not None:
                    lag.add_metric([database, host.name], host.lag_seconds)
    yield up
    yield role
    yield lag
    yield failovers


def _client_limits(daemon: Daemon) -> Iterator[Metric]:
    """Client counts next to the caps that refuse logins, so that "near the limit" can be
    alerted on before clients are refused."""
    settings = daemon.settings
    yield _gauge(
        "pgproxy_max_client_conn",
        "The max_client_conn setting (pgproxy_client_connections counts against it).",
        settings.max_client_conn,
    )
    db_count = GaugeMetricFamily(
        "pgproxy_database_client_connections",
        "Logged-in clients of a database (max_db_client_connections counts them).",
        labels=["database"],
    )
    db_limit = GaugeMetricFamily(
        "pgproxy_database_max_client_connections",
        "max_db_client_connections in force for the database (0: no limit).",
        labels=["database"],
    )
    # The databases SHOW DATABASES lists: the console, the configured ones, and those a
    # client reached through '*'.
    names = [CONSOLE_DATABASE, *(name for name in settings.databases if name != "*")]
    names += sorted({pool.database for pool in daemon.registry.pools.values()} - set(names))
    for name in names:
        entry = settings.database(name) if name != CONSOLE_DATABASE else None
        if entry is not None:
            limit = settings.client_limits_for(entry, "")[0]
        elif name == CONSOLE_DATABASE:
            limit = settings.max_db_client_connections
        else:
            continue  # removed by a reload: its clients are leaving
        db_count.add_metric([name], daemon.registry.db_clients.get(name, 0))
        db_limit.add_metric([name], limit)
    yield db_count
    yield db_limit
    user_count = GaugeMetricFamily(
        "pgproxy_user_client_connections",
        "Logged-in clients of a user (max_user_client_connections counts them).",
        labels=["user"],
    )
    user_limit = GaugeMetricFamily(
        "pgproxy_user_max_client_connections",
        "max_user_client_connections in force for the user (0: no limit).",
        labels=["user"],
    )
    # The users SHOW USERS lists: configured, with a pool, or with clients now. (Not every
    # name ever seen: under trust any name may log in, and the series would pile up.)
    users = set(settings.users) | {pool.user for pool in daemon.registry.pools.values()}
    users |= {user for user, count in daemon.registry.user_clients.items() if count > 0}
    for user in sorted(users):
        user_count.add_metric([user], daemon.registry.user_clients.get(user, 0))
        user_limit.add_metric([user], settings.max_user_client_connections_for(user))
    yield user_count
    yield user_limit


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _labels(pool: Pool) -> list[str]:
    # (Names come from clients and may hold bytes that are not UTF-8; labels must be.)
    return [printable(pool.database), printable(pool.user)]


def _pool_gauges(daemon: Daemon, pools: list[Pool], now: float) -> Iterator[Metric]:
    clients = GaugeMetricFamily(
        "pgproxy_pool_clients", "Logged-in clients by state.", labels=[*POOL_LABELS, "state"]
    )
    servers = GaugeMetricFamily(
        "pgproxy_pool_servers", "Server connections by state.", labels=[*POOL_LABELS, "state"]
    )
    size = GaugeMetricFamily(
        "pgproxy_pool_size", "Server connections open or opening.", labels=POOL_LABELS
    )
    min_size = GaugeMetricFamily(
        "pgproxy_pool_min_size", "Configured min_pool_size.", labels=POOL_LABELS
    )
    max_size = GaugeMetricFamily(
        "pgproxy_pool_max_size", "Configured pool size (the cap).", labels=POOL_LABELS
    )
    oldest = GaugeMetricFamily(
        "pgproxy_pool_oldest_wait_seconds",
        "How long the oldest waiting client has waited.",
        labels=POOL_LABELS,
    )
    paused = GaugeMetricFamily(
        "pgproxy_pool_paused", "1 while the pool is paused (PAUSE, KILL).", labels=POOL_LABELS
    )
    wait_timeout = GaugeMetricFamily(
        "pgproxy_query_wait_timeout_seconds",
        "The query_wait_timeout in force for the pool's user and database (0: none).",
        labels=POOL_LABELS,
    )
    census, _ = daemon.registry.client_census()
    for pool in pools:
        labels = _labels(pool)
        for state in ("active", "waiting", "idle"):
            clients.add_metric([*labels, state], census[pool][state])
        states = pool.server_states()
        for state, name in SERVER_STATES:
            servers.add_metric([*labels, name], states[state])
        size.add_metric(labels, len(pool.servers) + pool.connecting)
        min_size.add_metric(labels, pool.min_size)
        max_size.add_metric(labels, pool.size)
        first = pool.oldest_waiter()
        oldest.add_metric(labels, max(now - first.wait_started_at, 0.0) if first else 0.0)
        paused.add_metric(labels, int(pool.paused))
        wait_timeout.add_metric(labels, pool.query_wait_timeout)
    yield from (clients, servers, size, min_size, max_size, oldest, paused, wait_timeout)


_COUNTERS = (
    ("pgproxy_transactions", "Transactions pooled.", "xact_count"),
    ("pgproxy_queries", "Requests pooled (each answered by one ReadyForQuery).", "query_count"),
    ("pgproxy_received_bytes", "Bytes received from clients.", "received_bytes"),
    ("pgproxy_sent_bytes", "Bytes sent to clients.", "sent_bytes"),
    ("pgproxy_server_assignments", "Times a server was linked to a client.",
     "server_assignment_count"),
    ("pgproxy_client_logins", "Client logins.", "client_logins"),
    ("pgproxy_server_connect_errors", "Failed attempts to open a server connection.",
     "connections_errors"),
    ("pgproxy_servers_lost", "Servers closed by PostgreSQL or the network.", "connections_lost"),
    ("pgproxy_servers_returned_broken", "Servers given back in a state nobody may see.",
     "returns_bad"),
    ("pgproxy_leaks", "Clients that held a server past leak_detection_threshold.", "leaks"),
)  # fmt: skip


def _pool_counters(daemon: Daemon, pools: list[Pool]) -> Iterator[Metric]:
    for name, documentation, field in _COUNTERS:
        family = CounterMetricFamily(name, documentation, labels=POOL_LABELS)
        for pool in pools:
            family.add_metric(_labels(pool), getattr(pool.stats, field))
        yield family
    attempts = CounterMetricFamily(
        "pgproxy_server_connect_attempts",
        "Attempts to open a server connection.",
        labels=POOL_LABELS,
    )
    hooks = CounterMetricFamily(
        "pgproxy_reconnect_failed",
        "Outages that lasted reconnect_timeout (the reconnect_failed hook ran).",
        labels=POOL_LABELS,
    )
    for pool in pools:
        stats = pool.stats
        attempts.add_metric(_labels(pool), stats.connections_num + stats.connections_errors)
        hooks.add_metric(_labels(pool), pool.reconnect.hook_runs)
    yield attempts
    yield hooks
    timeouts = CounterMetricFamily(
        "pgproxy_timeouts", "Timeouts by kind.", labels=[*POOL_LABELS, "kind"]
    )
    for pool in pools:
        for kind in TIMEOUT_KINDS:
            if kind != "client_login":
                timeouts.add_metric([*_labels(pool), kind], pool.stats.timeouts.get(kind, 0))
    # A login timeout happens before the client has a pool.
    timeouts.add_metric(["", "", "client_login"], daemon.registry.login_timeouts)
    yield timeouts
    state_leaks = CounterMetricFamily(
        "pgproxy_session_state_leaks",
        "Session state clients left on servers outside a transaction (transaction_state_guard),"
        " by kind: set, listen, prepare, cursor, temp_table, advisory_lock.",
        labels=[*POOL_LABELS, "kind"],
    )
    for pool in pools:
        for kind in STATE_LEAK_KINDS:
            state_leaks.add_metric([*_labels(pool), kind], pool.stats.state_leaks.get(kind, 0))
    yield state_leaks


_HISTOGRAMS = (
    ("pgproxy_client_wait_seconds",
     "Time a client waited for a server (0: one was idle; waits ended by "
     "query_wait_timeout included).", "wait"),
    ("pgproxy_server_connect_seconds", "Time to open and log in a server connection.",
     "connect"),
    ("pgproxy_query_duration_seconds", "Time from a request to its ReadyForQuery.", "query"),
    ("pgproxy_transaction_duration_seconds",
     "Time a server was linked for one transaction (transaction and statement mode).",
     "transaction"),
)  # fmt: skip


def _pool_histograms(pools: Iterable[Pool]) -> Iterator[Metric]:
    measured = [pool for pool in pools if pool.histograms is not None]
    for name, documentation, field in _HISTOGRAMS:
        family = HistogramMetricFamily(name, documentation, labels=POOL_LABELS)
        for pool in measured:
            assert pool.histograms is not None
            histogram: Histogram = getattr(pool.histograms, field)
            family.add_metric(_labels(pool), histogram.buckets(), histogram.sum)
        yield family


def registry_for(daemon: Daemon) -> CollectorRegistry:
    """A registry holding pgproxy's collector and the process's own figures (memory, CPU,
    file descriptors, start time: prometheus-client's ProcessCollector), and nothing
    global."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PgproxyCollector(daemon))
    # Each process reads its own /proc entry: with workers = N every worker reports itself
    # and merge_expositions combines them (the supervisor, which serves no client, is not
    # in the figures).
    ProcessCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The text exposition format of everything in ``registry``."""
    return generate_latest(registry)


# -- workers = N: one /metrics for all of them ----------------------------------------------

# Series that describe configuration or state rather than count: not added up over workers
# but combined by the function given (by family name: a counter's without ``_total``).
_NOT_ADDED: dict[str, Callable[[float, float], float]] = {
    "pgproxy_up": max,
    "pgproxy_info": max,
    "pgproxy_build_info": max,
    # Every worker has the same limit; the pgproxy started when its oldest worker did.
    "process_max_fds": max,
    "process_start_time_seconds": min,
    "pgproxy_shutting_down": max,
    # Client caps hold for the sum over workers: the same limit in each (the counts add up).
    "pgproxy_max_client_conn": max,
    "pgproxy_database_max_client_connections": max,
    "pgproxy_user_max_client_connections": max,
    "pgproxy_pool_min_size": max,
    "pgproxy_pool_max_size": max,
    "pgproxy_pool_paused": max,
    "pgproxy_query_wait_timeout_seconds": max,
    "pgproxy_pool_oldest_wait_seconds": max,
    # Every worker checks the hosts itself: the same figures, seen N times.
    "pgproxy_host_up": max,
    "pgproxy_host_role": max,
    "pgproxy_replica_lag_seconds": max,
    "pgproxy_failovers": max,
}


def merge_expositions(texts: Sequence[str]) -> bytes:
    """Several workers' text expositions as one: counts, sizes and histograms added up,
    configuration and state series (``_NOT_ADDED``) combined as listed; the same series
    names and labels as one process would show, no worker label."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(
                    family.name, family.documentation, family.type
                )
                values[family.name] = {}
            combine = _NOT_ADDED.get(family.name)
            samples = values[family.name]
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key not in samples:
                    samples[key] = sample.value
                elif combine is not None:
                    samples[key] = combine(samples[key], sample.value)
                else:
                    samples[key] = samples[key] + sample.value
    for name, family in families.items():
        for (sample_name, labels), value in values[name].items():
            family.add_sample(sample_name, dict(labels), value)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(list(families.values())))
    return generate_latest(registry)


class _Fixed(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        yield from self.families
