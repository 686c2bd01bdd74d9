"""/metrics, /healthz, /readyz, leak detection and log output, against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import os
import platform
import signal
import socket
import struct
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pgproxy import BUILD, __version__
from pgproxy.compiled import build_kind
from pgproxy.embedded import EmbeddedPostgres, free_port
from tests.support import (
    ProxyFactory,
    ProxyProcess,
    assert_healthy,
    connect,
    proxy_config,
    psql,
    wait_for,
)
from tests.test_deploy_monitoring import EXPORTED

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
APP = (("database", "appdb"), ("user", "app"))


def _proxy(pg: EmbeddedPostgres, factory: ProxyFactory, **overrides: Any) -> ProxyProcess:
    overrides.setdefault("metrics_port", free_port())
    overrides.setdefault("admin_users", ["admin"])
    proxy = factory(proxy_config(pg, **overrides))
    # The factory waits for the client port; the metrics listener is bound just after it,
    # and a test that asks at once could find it closed on a busy machine.
    wait_for(lambda: _accepts(proxy.config["metrics_port"]), 10, "the metrics listener")
    return proxy


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _get(proxy: ProxyProcess, path: str) -> tuple[int, str]:
    url = f"http://127.0.0.1:{proxy.config['metrics_port']}{path}"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def scrape(proxy: ProxyProcess) -> Samples:
    status, text = _get(proxy, "/metrics")
    assert status == 200, text
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def _value(samples: Samples, name: str, labels: tuple[tuple[str, str], ...] = APP) -> float:
    return samples[(name, tuple(sorted(labels)))]


def test_metrics_count_a_known_workload(pg: EmbeddedPostgres, proxy_factory: ProxyFactory) -> None:
    proxy = _proxy(pg, proxy_factory)
    with connect(proxy, prepare_threshold=None) as conn:
        for _ in range(20):
            conn.execute("select 1")
        during = scrape(proxy)
    after = scrape(proxy)
    assert _value(after, "pgproxy_up", ()) == 1
    assert _value(after, "pgproxy_transactions_total") == 20
    assert _value(after, "pgproxy_queries_total") == 20
    assert _value(after, "pgproxy_server_assignments_total") == 20
    assert _value(after, "pgproxy_client_logins_total") == 1
    assert _value(after, "pgproxy_received_bytes_total") > 0
    assert _value(after, "pgproxy_sent_bytes_total") > 0
    # Every assignment was one observed wait (here none: the server was idle after the
    # first, which waited for its server to open).
    assert _value(after, "pgproxy_client_wait_seconds_count") == 20
    assert _value(after, "pgproxy_query_duration_seconds_count") == 20
    assert _value(after, "pgproxy_transaction_duration_seconds_count") == 20
    assert _value(after, "pgproxy_server_connect_seconds_count") == 1
    assert _value(after, "pgproxy_server_connect_attempts_total") == 1
    assert 0 < _value(after, "pgproxy_server_connect_seconds_sum") < 5
    inf = (*APP, ("le", "+Inf"))
    assert _value(after, "pgproxy_client_wait_seconds_bucket", inf) == 20
    # Buckets reach past query_wait_timeout (120 s by default).
    wait_le = {dict(labels)["le"] for name, labels in after if name.endswith("wait_seconds_bucket")}
    assert {"120.0", "240.0", "300.0"} <= wait_le
    assert _value(after, "pgproxy_pool_max_size") == 5
    assert _value(after, "pgproxy_pool_min_size") == 0
    assert _value(after, "pgproxy_pool_size") == 1
    assert _value(after, "pgproxy_pool_servers", (*APP, ("state", "idle"))) == 1
    assert _value(after, "pgproxy_pool_servers", (*APP, ("state", "active"))) == 0
    assert _value(during, "pgproxy_pool_clients", (*APP, ("state", "idle"))) == 1
    assert _value(after, "pgproxy_pool_clients", (*APP, ("state", "idle"))) == 0
    assert _value(after, "pgproxy_query_wait_timeout_seconds") == 120
    # Nothing finer than a pool: the only labels are these.
    labels = {key for _, pairs in after for key, _ in pairs}
    assert labels <= {
        "database", "user", "state", "kind", "le", "reason", "version", "python", "build",
    }  # fmt: skip


def test_exported_series_are_the_documented_contract(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory
) -> None:
    """What a real pgproxy exports is exactly the list the rules, the dashboard and the
    README are checked against (tests/test_deploy_monitoring.py). (The hosts' series need
    a database that chooses among its hosts: target_session_attrs.)"""
    entry = {"host": "127.0.0.1", "port": pg.port, "user": "app", "password": "app-secret"}
    databases = {"appdb": {**entry, "target_session_attrs": "read-write"}}
    proxy = _proxy(pg, proxy_factory, databases=databases)
    assert_healthy(proxy)  # a pool exists: its series too
    exported = {name for name, _ in scrape(proxy)}
    assert exported == EXPORTED - {"up"}  # (up is Prometheus's own)


def test_health_endpoints(pg: EmbeddedPostgres, proxy_factory: ProxyFactory) -> None:
    proxy = _proxy(pg, proxy_factory)
    assert _get(proxy, "/healthz") == (200, '{"status": "ok"}\n')
    status, body = _get(proxy, "/readyz")
    assert status == 200, body
    assert json.loads(body) == {"status": "ready"}
    assert _get(proxy, "/nope")[0] == 404


def test_readyz_follows_postgres(pg: EmbeddedPostgres, proxy_factory: ProxyFactory) -> None:
    proxy = _proxy(pg, proxy_factory)
    assert_healthy(proxy)  # a pool with an idle server
    pg.shut_down()
    try:
        wait_for(lambda: _get(proxy, "/readyz")[0] == 503, 10, "/readyz to say 503")
        answer = json.loads(_get(proxy, "/readyz")[1])
        assert answer["status"] == "not ready"
        assert any("appdb" in reason for reason in answer["reasons"]), answer
        assert _get(proxy, "/healthz")[0] == 200  # alive, just not ready
    finally:
        pg.start_again()
    wait_for(lambda: _get(proxy, "/readyz")[0] == 200, 15, "/readyz to say 200 again")
    assert_healthy(proxy)


def test_timeouts_are_counted_by_kind(pg: EmbeddedPostgres, proxy_factory: ProxyFactory) -> None:
    proxy = _proxy(pg, proxy_factory, default_pool_size=1, query_wait_timeout=1)
    with connect(proxy, autocommit=False) as holder:
        holder.execute("select 1")  # holds the only server
        with connect(proxy) as waiter, pytest.raises(psycopg.OperationalError):
            waiter.execute("select 2")
        holder.rollback()
    samples = scrape(proxy)
    assert _value(samples, "pgproxy_timeouts_total", (*APP, ("kind", "query_wait"))) == 1
    # The failed wait is in the wait histogram: above 1 s, so past the 1.0 bucket.
    assert _value(samples, "pgproxy_client_wait_seconds_count") == 2  # holder + waiter
    assert _value(samples, "pgproxy_client_wait_seconds_bucket", (*APP, ("le", "1.0"))) == 1
    assert _value(samples, "pgproxy_timeouts_total", (*APP, ("kind", "query"))) == 0


def test_a_leak_is_logged_counted_and_listed(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory
) -> None:
    proxy = _proxy(pg, proxy_factory, leak_detection_threshold=0.5)
    with connect(proxy, autocommit=False, application_name="leaky-job") as holder:
        holder.execute("select 1")  # a transaction left open
        wait_for(
            lambda: _value(scrape(proxy), "pgproxy_leaks_total") == 1, 5, "the leak to be counted"
        )
        shown = psql(
            ["-A", "-F", "|", "-c", "SHOW LEAKS"], port=proxy.port, dbname="pgbouncer", user="admin"
        )
        assert shown.returncode == 0, shown.stderr
        header, row = shown.stdout.splitlines()[:2]
        leak = dict(zip(header.split("|"), row.split("|"), strict=True))
        assert leak["application_name"] == "leaky-job"
        assert leak["state"] == "idle in transaction"
        assert int(leak["held_us"]) >= 500_000
        time.sleep(1.0)  # still held: counted once per episode, not once per pass
        assert _value(scrape(proxy), "pgproxy_leaks_total") == 1
        holder.rollback()  # nothing was killed: the transaction is still the client's
    assert "leak: client" in proxy.log_text()
    assert "leaky-job" in proxy.log_text()


def test_one_series_set_per_pool_whatever_the_clients(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory
) -> None:
    proxy = _proxy(pg, proxy_factory, max_client_conn=200)
    assert_healthy(proxy)
    before = set(scrape(proxy))

    async def clients() -> None:
        gate = asyncio.Semaphore(50)

        async def one(index: int) -> None:
            async with gate:
                conn = await psycopg.AsyncConnection.connect(
                    proxy.dsn(application_name=f"client-{index}"), autocommit=True
                )
                async with conn:
                    await conn.execute("select 1")

        await asyncio.gather(*(one(index) for index in range(500)))

    asyncio.run(asyncio.wait_for(clients(), 120))
    after = scrape(proxy)
    assert set(after) == before
    assert _value(after, "pgproxy_client_logins_total") == 501


def test_json_logs_and_the_stats_line(pg: EmbeddedPostgres, proxy_factory: ProxyFactory) -> None:
    proxy = _proxy(pg, proxy_factory, log_format="json", stats_period=1)
    assert_healthy(proxy)

    def stats_lines() -> list[dict[str, Any]]:
        entries = [json.loads(line) for line in proxy.log_text().splitlines() if line.strip()]
        return [entry for entry in entries if entry["message"].startswith("stats: ")]

    wait_for(lambda: len(stats_lines()) >= 2, 10, "two stats lines")
    entry = stats_lines()[-1]
    assert entry["logger"] == "pgproxy.stats"
    assert entry["level"] == "info"
    assert "xacts/s" in entry["message"] and "wait" in entry["message"]
    proxy.popen.send_signal(signal.SIGHUP)
    wait_for(lambda: "configuration reloaded" in proxy.log_text(), 10, "the reload")


def test_metrics_stay_up_while_a_shutdown_drains(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory
) -> None:
    proxy = _proxy(pg, proxy_factory)
    with connect(proxy) as client:
        client.execute("select 1")
        proxy.popen.send_signal(signal.SIGTERM)  # waits for this client to leave
        wait_for(lambda: _value(scrape(proxy), "pgproxy_shutting_down", ()) == 1, 5, "the drain")
        status, body = _get(proxy, "/readyz")
        assert status == 503
        assert "shutting down" in json.loads(body)["reasons"]
        assert client.execute("select 2").fetchone() == (2,)
    assert proxy.popen.wait(10) == 0


def _database_entry(pg: EmbeddedPostgres, **extra: Any) -> dict[str, Any]:
    return {
        "host": "127.0.0.1", "port": pg.port, "dbname": "appdb", "user": "app",
        "password": "app-secret", **extra,
    }  # fmt: skip


def test_process_and_build_metrics(pg: EmbeddedPostgres, proxy_factory: ProxyFactory) -> None:
    """ProcessCollector's figures are pgproxy's own process, next to its build."""
    launched = time.time()
    proxy = _proxy(pg, proxy_factory)
    assert_healthy(proxy)
    samples = scrape(proxy)
    build = (("build", BUILD), ("python", platform.python_version()), ("version", __version__))
    assert _value(samples, "pgproxy_build_info", build) == 1
    assert build_kind() == BUILD  # what runs here (tests/conftest.py checks the expected one)
    assert _value(samples, "pgproxy_info", (("version", __version__),)) == 1
    # Checked against what the kernel says of the proxy's pid.
    proc = Path(f"/proc/{proxy.pid}")
    status = dict(line.split(":", 1) for line in (proc / "status").read_text().splitlines())
    rss = int(status["VmRSS"].split()[0]) * 1024
    assert rss / 2 < _value(samples, "process_resident_memory_bytes", ()) < rss * 2
    assert _value(samples, "process_virtual_memory_bytes", ()) > rss / 2
    open_fds = len(os.listdir(proc / "fd"))
    assert abs(_value(samples, "process_open_fds", ()) - open_fds) <= 4
    limits = (proc / "limits").read_text().splitlines()
    soft_limit = next(line for line in limits if line.startswith("Max open files"))
    assert _value(samples, "process_max_fds", ()) == int(soft_limit.split()[3])
    assert launched - 1 <= _value(samples, "process_start_time_seconds", ()) <= time.time()
    assert _value(samples, "process_cpu_seconds_total", ()) > 0


def test_client_limits_are_exported(pg: EmbeddedPostgres, proxy_factory: ProxyFactory) -> None:
    proxy = _proxy(
        pg, proxy_factory, max_client_conn=50, max_db_client_connections=10,
        users={"app": {"max_user_client_connections": 7}},
        databases={"appdb": _database_entry(pg), "capped": _database_entry(
            pg, max_db_client_connections=2)},
    )  # fmt: skip
    held = [connect(proxy) for _ in range(3)] + [connect(proxy, dbname="capped")]
    try:
        for conn in held:
            conn.execute("select 1")
        samples = scrape(proxy)
        assert _value(samples, "pgproxy_max_client_conn", ()) == 50
        assert _value(samples, "pgproxy_client_connections", ()) == 4
        appdb, capped = (("database", "appdb"),), (("database", "capped"),)
        console = (("database", "pgbouncer"),)
        assert _value(samples, "pgproxy_database_client_connections", appdb) == 3
        assert _value(samples, "pgproxy_database_max_client_connections", appdb) == 10
        assert _value(samples, "pgproxy_database_client_connections", capped) == 1
        assert _value(samples, "pgproxy_database_max_client_connections", capped) == 2
        assert _value(samples, "pgproxy_database_client_connections", console) == 0
        assert _value(samples, "pgproxy_database_max_client_connections", console) == 10
        app = (("user", "app"),)
        assert _value(samples, "pgproxy_user_client_connections", app) == 4
        assert _value(samples, "pgproxy_user_max_client_connections", app) == 7
    finally:
        for conn in held:
            conn.close()
    wait_for(
        lambda: _value(scrape(proxy), "pgproxy_user_client_connections", (("user", "app"),))
        == 0, 5, "the clients to be counted out",
    )  # fmt: skip


def _silent_until_closed(port: int, data: bytes = b"", timeout: float = 10) -> bytes:
    """Connect, send ``data``, and read what the proxy says until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        return received


def test_login_failures_are_counted_by_reason(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory
) -> None:
    proxy = _proxy(
        pg, proxy_factory, auth_type="plain", client_login_timeout=1,
        users={"app": {"password": "app-secret"}},
        databases={
            "appdb": _database_entry(pg),
            "capped": _database_entry(pg, max_db_client_connections=1),
            # PostgreSQL refuses the pool's own login: 28P01 too, but not the client's fault.
            "badlogin": _database_entry(pg, password="not-the-password"),
        },
    )  # fmt: skip

    def refused(**params: Any) -> str:
        params.setdefault("password", "app-secret")
        with pytest.raises(psycopg.OperationalError) as failure:
            connect(proxy, **params)
        return str(failure.value)

    assert "password authentication failed" in refused(password="wrong")
    assert "password authentication failed" in refused(password="wrong-again")
    assert "no such database" in refused(dbname="nosuchdb")
    with connect(proxy, dbname="capped", password="app-secret"):
        assert "max_db_client_connections" in refused(dbname="capped")
    assert "password authentication failed" in refused(dbname="badlogin")
    # Connected, silent: client_login_timeout ends it.
    assert b"client_login_timeout" in _silent_until_closed(proxy.port)
    # A startup packet of an unknown protocol version: none of the above.
    answer = _silent_until_closed(proxy.port, struct.pack("!II", 8, 0x00090000))
    assert b"unsupported frontend protocol" in answer

    samples = scrape(proxy)
    failures = {
        dict(labels)["reason"]: value
        for (name, labels), value in samples.items()
        if name == "pgproxy_client_login_failures_total"
    }
    assert failures == {
        "auth_failed": 2, "no_such_database": 1, "limit_reached": 1,
        "server_login_failed": 1, "timeout": 1, "other": 1,
    }  # fmt: skip
    assert _value(samples, "pgproxy_timeouts_total", (("database", ""), ("user", ""),
                  ("kind", "client_login"))) == 1  # fmt: skip
    assert _value(samples, "pgproxy_client_logins_total", (("database", "capped"),
                  ("user", "app"))) == 1  # fmt: skip
    assert "not-the-password" not in proxy.log_text()


def _status_line(port: int, request: bytes) -> bytes:
    """The status line of pgproxy's answer to a raw HTTP request."""
    return _silent_until_closed(port, request).split(b"\r\n", 1)[0]


def test_http_status_lines_carry_a_reason_phrase(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory
) -> None:
    proxy = _proxy(
        pg, proxy_factory,
        databases={"appdb": _database_entry(pg),
                   # Nothing listens there: /readyz says 503.
                   "gone": {"host": "127.0.0.1", "port": free_port(), "user": "app"}},
    )  # fmt: skip
    port = proxy.config["metrics_port"]

    def get(path: str, method: str = "GET") -> bytes:
        request = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        return _status_line(port, request.encode())

    assert get("/metrics") == b"HTTP/1.1 200 OK"
    assert get("/healthz") == b"HTTP/1.1 200 OK"
    assert get("/nope") == b"HTTP/1.1 404 Not Found"
    assert get("/metrics", "POST") == b"HTTP/1.1 405 Method Not Allowed"
    wait_for(
        lambda: get("/readyz") == b"HTTP/1.1 503 Service Unavailable", 10,
        "/readyz to answer 503 Service Unavailable",
    )  # fmt: skip
