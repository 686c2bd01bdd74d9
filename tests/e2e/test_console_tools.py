"""Tools written for PgBouncer's console work against pgproxy unchanged.

- spreaker's prometheus-pgbouncer-exporter (Python, psycopg2): its collector runs SHOW
  STATS, POOLS, DATABASES and CONFIG and reads the columns by name; every scrape must
  succeed (its ``pgbouncer_up`` gauge) and the figures must match a known workload.
- prometheus-community's pgbouncer_exporter (Go) logs in with ``extra_float_digits`` in its
  startup packet and parses ``SHOW VERSION``: checked here with a raw socket.
"""

from __future__ import annotations

import re
import socket
import struct
import warnings
from collections.abc import Iterator
from typing import Any

import pytest

from pgproxy.embedded import EmbeddedPostgres
from tests.support import ProxyFactory, ProxyProcess, connect, proxy_config

with warnings.catch_warnings():
    warnings.simplefilter("ignore", SyntaxWarning)  # the exporter compares strings with 'is'
    from prometheus_pgbouncer_exporter.collector import PgbouncerMetricsCollector
    from prometheus_pgbouncer_exporter.config import PgbouncerConfig

TRANSACTIONS = 25


@pytest.fixture(scope="module")
def proxy(pg: EmbeddedPostgres, module_proxy_factory: ProxyFactory) -> ProxyProcess:
    return module_proxy_factory(
        proxy_config(pg, admin_users=["admin"], stats_users=["stats"], max_client_conn=77)
    )


@pytest.fixture(scope="module")
def scraped(proxy: ProxyProcess) -> Iterator[dict[tuple[str, tuple[str, ...]], Any]]:
    """One scrape by the exporter after TRANSACTIONS transactions through the proxy."""
    # (No prepared statements: psycopg's Parse+Sync would be a transaction of its own.)
    with connect(proxy, prepare_threshold=None) as conn:
        for _ in range(TRANSACTIONS):
            conn.execute("select 1")
    config = PgbouncerConfig(
        {"dsn": f"postgresql://stats:@127.0.0.1:{proxy.port}/pgbouncer", "connect_timeout": 5}
    )
    metrics = PgbouncerMetricsCollector(config).collect()
    yield {
        (metric["name"], tuple(sorted(metric["labels"].items()))): metric["value"]
        for metric in metrics
    }


def test_every_scrape_of_the_exporter_succeeds(scraped: dict[Any, Any]) -> None:
    assert scraped[("pgbouncer_up", ())] == 1


def test_the_exporter_reads_the_workload(scraped: dict[Any, Any]) -> None:
    appdb = (("database", "appdb"),)
    assert scraped[("pgbouncer_stats_transactions_total", appdb)] == TRANSACTIONS
    assert scraped[("pgbouncer_stats_queries_total", appdb)] == TRANSACTIONS
    assert scraped[("pgbouncer_stats_received_bytes_total", appdb)] > 0
    assert scraped[("pgbouncer_stats_sent_bytes_total", appdb)] > 0
    assert scraped[("pgbouncer_stats_queries_duration_microseconds", appdb)] > 0
    pool = (("database", "appdb"), ("user", "app"))
    assert scraped[("pgbouncer_pools_server_idle_connections", pool)] == 1
    assert scraped[("pgbouncer_pools_client_active_connections", pool)] == 0
    assert scraped[("pgbouncer_pools_client_maxwait_seconds", pool)] == 0
    database = (("backend_database", "appdb"), ("database", "appdb"))
    assert scraped[("pgbouncer_databases_database_pool_size", database)] == 5
    assert scraped[("pgbouncer_databases_database_current_connections", database)] == 1
    assert scraped[("pgbouncer_config_max_client_conn", ())] == 77


def _message(sock: socket.socket) -> tuple[bytes, bytes]:
    header = b""
    while len(header) < 5:
        chunk = sock.recv(5 - len(header))
        assert chunk, "connection closed"
        header += chunk
    length = struct.unpack("!I", header[1:])[0]
    body = b""
    while len(body) < length - 4:
        chunk = sock.recv(length - 4 - len(body))
        assert chunk, "connection closed"
        body += chunk
    return header[:1], body


def test_startup_with_extra_float_digits_and_the_version_string(proxy: ProxyProcess) -> None:
    params = b"user\0stats\0database\0pgbouncer\0extra_float_digits\x003\0\0"
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(struct.pack("!II", 8 + len(params), 196608) + params)
        for _ in range(50):
            kind, body = _message(sock)
            assert kind != b"E", body
            if kind == b"Z":
                break
        query = b"SHOW VERSION;\0"
        sock.sendall(b"Q" + struct.pack("!I", 4 + len(query)) + query)
        kind, body = _message(sock)
        assert kind == b"T"
        kind, body = _message(sock)
        assert kind == b"D"
        version = body[6:].decode()
    # What version-parsing tools look for: "PgBouncer X.Y.Z" at the start.
    match = re.match(r"PgBouncer (\d+)\.(\d+)\.(\d+)", version)
    assert match is not None, version
    assert tuple(map(int, match.groups())) >= (1, 25, 0)
    assert "pgproxy" in version
