"""workers = N: one supervisor, N processes on one port, acting as one pgproxy."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
import tomli_w

from pgproxy.embedded import EmbeddedPostgres
from pgproxy.protocol import messages
from tests.e2e.test_bad_input import RawClient, error_fields
from tests.support import ProxyFactory, ProxyProcess, proxy_config, wait_for

POOL_SIZE = 3


def _worker_dirs(proxy: ProxyProcess, count: int) -> list[Path]:
    """The workers' own socket directories, from the supervisor's start-up line."""
    found: list[str] = []

    def logged() -> bool:
        found[:] = re.findall(r"their own sockets in (\S+)\)", proxy.log_text())
        return bool(found)

    wait_for(logged, 10, "the supervisor's start-up line")
    root = Path(found[0])
    dirs = [root / f"worker-{index}" for index in range(count)]
    port = proxy.port
    wait_for(lambda: all((path / f".s.PGSQL.{port}").exists() for path in dirs), 20, "every worker")
    return dirs


def _workers(proxy: ProxyProcess) -> list[int]:
    out = subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(proxy.pid)], capture_output=True, text=True
    ).stdout
    return sorted(int(pid) for pid in out.split())


def _via(path: Path, proxy: ProxyProcess, dbname: str = "appdb") -> dict[str, Any]:
    return {"host": str(path), "port": proxy.port, "dbname": dbname, "user": "app",
            "autocommit": True, "prepare_threshold": None}  # fmt: skip


@pytest.fixture(params=[2, 3], ids=["2-workers", "3-workers"])
def workers(request: pytest.FixtureRequest) -> int:
    count: int = request.param
    return count


def _start(pg: EmbeddedPostgres, factory: ProxyFactory, count: int) -> ProxyProcess:
    return factory(
        proxy_config(pg, workers=count, default_pool_size=POOL_SIZE, admin_users=["app"])
    )


def test_pool_size_caps_the_sum_over_workers(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory, workers: int
) -> None:
    proxy = _start(pg, proxy_factory, workers)
    dirs = _worker_dirs(proxy, workers)
    failures: list[BaseException] = []
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        try:
            with psycopg.connect(pg.superuser_dsn("postgres"), autocommit=True) as superuser:
                while not done.is_set():
                    row = superuser.execute(
                        "select count(*) from pg_stat_activity"
                        " where datname = 'appdb' and usename = 'app'"
                    ).fetchone()
                    assert row is not None
                    peak[0] = max(peak[0], int(row[0]))
                    time.sleep(0.01)
        except BaseException as exc:
            failures.append(exc)

    def client(number: int) -> None:
        try:
            # Half through the workers' own sockets, so that every worker has clients.
            target = (
                _via(dirs[number % workers], proxy)
                if number % 2
                else {"conninfo": proxy.dsn(), "autocommit": True}
            )
            with psycopg.connect(**target) as conn:
                for _ in range(8):
                    conn.execute("select pg_sleep(0.02)")
        except BaseException as exc:
            failures.append(exc)

    sampler = threading.Thread(target=sample)
    sampler.start()
    threads = [threading.Thread(target=client, args=(number,)) for number in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    done.set()
    sampler.join(timeout=10)
    assert not failures, failures[0]
    assert 1 <= peak[0] <= POOL_SIZE, peak[0]


def test_cancel_sent_to_another_worker(pg: EmbeddedPostgres, proxy_factory: ProxyFactory) -> None:
    import socket

    proxy = _start(pg, proxy_factory, 2)
    dirs = _worker_dirs(proxy, 2)
    for owner, other in ((0, 1), (1, 0)):
        with RawClient(proxy.port) as client:
            client.sock.close()
            client.sock = socket.socket(socket.AF_UNIX)
            client.sock.settimeout(10)
            client.sock.connect(str(dirs[owner] / f".s.PGSQL.{proxy.port}"))
            welcome = client.login()
            key = next(payload for kind, payload in welcome if kind == b"K")
            client.send(messages.query("select pg_sleep(30)"))
            time.sleep(0.3)
            with socket.socket(socket.AF_UNIX) as raw:
                raw.settimeout(5)
                raw.connect(str(dirs[other] / f".s.PGSQL.{proxy.port}"))
                raw.sendall(messages.cancel_request(int.from_bytes(key[:4], "big"), key[4:]))
                raw.recv(16)
            replies = client.read_until(b"Z", timeout=10, errors_ok=True)
            errors = [error_fields(payload) for kind, payload in replies if kind == b"E"]
            assert errors and errors[0]["C"] == "57014", replies


def test_a_killed_worker_is_restarted_and_others_keep_their_clients(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory
) -> None:
    proxy = _start(pg, proxy_factory, 2)
    dirs = _worker_dirs(proxy, 2)
    before = _workers(proxy)
    assert len(before) == 2
    with psycopg.connect(**_via(dirs[1], proxy)) as survivor:
        assert survivor.execute("select 1").fetchone() == (1,)
        victim = next(pid for pid in before if _serves(pid, dirs[0], proxy))
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: len(_workers(proxy)) == 2 and victim not in _workers(proxy), 20,
                 "the supervisor to restart the worker")  # fmt: skip
        for index in range(5):  # the other worker's client never noticed
            assert survivor.execute("select %s::int", [index]).fetchone() == (index,)
    wait_for(lambda: _answers(dirs[0], proxy), 20, "the new worker on its socket")
    assert "restarting it (1 restarts so far)" in proxy.log_text()


def _serves(pid: int, path: Path, proxy: ProxyProcess) -> bool:
    """Whether process ``pid`` holds the listening socket in ``path`` (a worker's own)."""
    socket_path = str(path / f".s.PGSQL.{proxy.port}")
    inodes = {
        parts[6]
        for parts in (line.split() for line in Path("/proc/net/unix").read_text().splitlines())
        if len(parts) >= 8 and parts[7] == socket_path
    }
    fds = Path(f"/proc/{pid}/fd")
    links = [os.readlink(fds / fd) for fd in os.listdir(fds)]
    return any(link.startswith("socket:[") and link[8:-1] in inodes for link in links)


def _answers(path: Path, proxy: ProxyProcess) -> bool:
    try:
        with psycopg.connect(**_via(path, proxy), connect_timeout=2) as conn:
            return conn.execute("select 1").fetchone() == (1,)
    except psycopg.OperationalError:
        return False


def test_reload_reaches_every_worker_and_sigterm_drains_them_all(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory
) -> None:
    proxy = _start(pg, proxy_factory, 2)
    dirs = _worker_dirs(proxy, 2)
    config = dict(proxy.config, default_pool_size=7)
    proxy.config_path.write_text(tomli_w.dumps(config))
    os.kill(proxy.pid, signal.SIGHUP)

    def reloaded(path: Path) -> bool:
        with psycopg.connect(**_via(path, proxy, "pgbouncer")) as console:
            rows = console.execute("show config").fetchall()
        return ("default_pool_size", "7") in [(row[0], row[1]) for row in rows]

    for path in dirs:
        wait_for(lambda path=path: reloaded(path), 10, f"the reload in {path.name}")
    # SIGTERM: every worker stops taking clients, the connected ones go on.
    with psycopg.connect(proxy.dsn(), autocommit=True) as client:
        client.execute("select 1")
        os.kill(proxy.pid, signal.SIGTERM)
        time.sleep(0.5)
        assert proxy.alive()
        for index in range(3):
            assert client.execute("select %s::int", [index]).fetchone() == (index,)
    proxy.popen.wait(timeout=20)
    assert proxy.popen.returncode == 0
    assert not _workers(proxy)


def _stats_totals(console: psycopg.Connection[Any]) -> dict[str, int]:
    cursor = console.execute("show stats_totals")
    names = [column.name for column in cursor.description or ()]
    for row in cursor.fetchall():
        record = dict(zip(names, row, strict=True))
        if record["database"] == "appdb":
            return {key: int(value) for key, value in record.items() if key != "database"}
    return {}


def test_one_console_for_all_workers(pg: EmbeddedPostgres, proxy_factory: ProxyFactory) -> None:
    proxy = _start(pg, proxy_factory, 2)
    dirs = _worker_dirs(proxy, 2)
    with psycopg.connect(
        proxy.dsn(dbname="pgbouncer"), autocommit=True, prepare_threshold=None
    ) as console:
        before = _stats_totals(console).get("xact_count", 0)
        # Transactions on each worker (through its own socket), clients left connected.
        clients = [
            psycopg.connect(**_via(path, proxy), application_name=f"worker-client-{index}")
            for index, path in enumerate(dirs)
        ]
        try:
            for count, client in zip((7, 5), clients, strict=True):
                for _ in range(count):
                    client.execute("select 1")
            wait_for(
                lambda: _stats_totals(console).get("xact_count", 0) - before == 12, 10,
                "12 transactions in SHOW STATS_TOTALS",
            )  # fmt: skip
            cursor = console.execute("show clients")
            names = [column.name for column in cursor.description or ()]
            shown = [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
            ids = {row["id"] for row in shown}
            assert len(ids) >= 3  # both workers' clients (and this console session)
            pools = console.execute("show pools").fetchall()
            app = [row for row in pools if row[0] == "appdb"]
            assert len(app) == 1 and app[0][2] + app[0][3] == 2  # cl_active + cl_waiting
            # A control command reaches every worker.
            console.execute("set default_pool_size = 9")
            for path in dirs:
                with psycopg.connect(**_via(path, proxy, "pgbouncer")) as own:
                    rows = own.execute("show config").fetchall()
                    assert ("default_pool_size", "9") in [(row[0], row[1]) for row in rows]
            # KILL_CLIENT finds a client whichever worker holds it: the second worker's,
            # asked through the first worker's own socket.
            victim = next(r["id"] for r in shown if r["application_name"] == "worker-client-1")
            with psycopg.connect(**_via(dirs[0], proxy, "pgbouncer")) as first:
                first.execute(f"kill_client {victim}")
            with pytest.raises(psycopg.OperationalError):
                clients[1].execute("select 1")
            assert clients[0].execute("select 1").fetchone() == (1,)
        finally:
            for client in clients:
                client.close()


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_one_metrics_endpoint_for_all_workers(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory
) -> None:
    from tests.support import free_port

    metrics_port = free_port()
    proxy = proxy_factory(
        proxy_config(pg, workers=2, default_pool_size=POOL_SIZE, metrics_port=metrics_port)
    )
    dirs = _worker_dirs(proxy, 2)
    pool = (("database", "appdb"), ("user", "app"))
    before = _scrape(metrics_port).get(("pgproxy_transactions_total", pool), 0.0)
    clients = [psycopg.connect(**_via(path, proxy)) for path in dirs]
    try:
        for count, client in zip((4, 6), clients, strict=True):
            for _ in range(count):
                client.execute("select 1")
        wait_for(
            lambda: _scrape(metrics_port).get(("pgproxy_transactions_total", pool), 0.0)
            - before == 10, 10, "10 transactions in /metrics",
        )  # fmt: skip
        # A failed login on each worker.
        for path in dirs:
            with pytest.raises(psycopg.OperationalError, match="no such database"):
                psycopg.connect(**_via(path, proxy, "nosuchdb"))
        samples = _scrape(metrics_port)
        assert samples[("pgproxy_pool_max_size", pool)] == POOL_SIZE  # not doubled
        assert samples[("pgproxy_client_connections", ())] >= 2  # both workers' clients
        assert samples[("pgproxy_up", ())] == 1
        count = samples[("pgproxy_query_duration_seconds_count", pool)]
        assert count >= 10  # both workers' histograms
        failed = ("pgproxy_client_login_failures_total", (("reason", "no_such_database"),))
        assert samples[failed] == 2
        appdb = (("database", "appdb"),)
        assert samples[("pgproxy_database_client_connections", appdb)] == 2
        assert samples[("pgproxy_database_max_client_connections", appdb)] == 0
        assert samples[("pgproxy_max_client_conn", ())] == 100  # the setting, not doubled
        # Process figures: the workers' memory adds up; their file limit and the start
        # of the oldest one do not.
        pids = _workers(proxy)
        assert len(pids) == 2
        rss = [_rss(pid) for pid in pids]
        assert samples[("process_resident_memory_bytes", ())] > 1.5 * max(rss)
        assert samples[("process_max_fds", ())] == _max_fds(pids[0]) == _max_fds(pids[1])
        oldest = min(_start_time(pid) for pid in pids)
        assert samples[("process_start_time_seconds", ())] == pytest.approx(oldest, abs=0.02)
        assert samples[("process_cpu_seconds_total", ())] > 0
        # /readyz: ready while every worker answers; a stuck worker makes it say so.
        assert _readyz(metrics_port) == (200, [])
        stuck = next(pid for pid in _workers(proxy) if _serves(pid, dirs[1], proxy))
        os.kill(stuck, signal.SIGSTOP)
        try:
            assert _readyz(metrics_port) == (503, ["worker 1 not answering"])
        finally:
            os.kill(stuck, signal.SIGCONT)
        assert _readyz(metrics_port) == (200, [])
    finally:
        for client in clients:
            client.close()


def _rss(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    return int(next(line for line in status if line.startswith("VmRSS:")).split()[1]) * 1024


def _max_fds(pid: int) -> int:
    limits = Path(f"/proc/{pid}/limits").read_text().splitlines()
    return int(next(line for line in limits if line.startswith("Max open files")).split()[3])


def _start_time(pid: int) -> float:
    """When ``pid`` started, in seconds since the epoch (as ProcessCollector reckons it)."""
    boot = next(
        float(line.split()[1])
        for line in Path("/proc/stat").read_text().splitlines()
        if line.startswith("btime ")
    )
    stat = Path(f"/proc/{pid}/stat").read_text()
    ticks = float(stat[stat.rindex(")") + 1 :].split()[19])
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def _readyz(port: int) -> tuple[int, list[str]]:
    import json
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=20) as answer:
            return answer.status, json.loads(answer.read()).get("reasons", [])
    except urllib.error.HTTPError as refused:
        return refused.code, json.loads(refused.read()).get("reasons", [])


def test_client_caps_hold_for_the_sum_over_workers(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(
        proxy_config(
            pg, workers=2, max_client_conn=4, max_db_client_connections=3, admin_users=["app"]
        )
    )
    dirs = _worker_dirs(proxy, 2)
    clients = []
    try:
        for number in range(3):  # spread over both workers
            clients.append(psycopg.connect(**_via(dirs[number % 2], proxy)))
        for path in dirs:
            with pytest.raises(psycopg.OperationalError, match="max_db_client_connections"):
                psycopg.connect(**_via(path, proxy)).close()
        # The console is a client too: the fourth connection fills max_client_conn.
        console = psycopg.connect(**_via(dirs[1], proxy, "pgbouncer"))
        clients.append(console)
        for path in dirs:
            with pytest.raises(psycopg.OperationalError, match="max_client_conn"):
                psycopg.connect(**_via(path, proxy, "pgbouncer")).close()
        clients.pop(0).close()
        wait_for(lambda: _answers(dirs[0], proxy), 10, "room for a client again")
    finally:
        for client in clients:
            client.close()


def test_a_busy_worker_gives_its_extra_servers_to_a_waiting_one(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory
) -> None:
    """Worker 0 holds the whole pool_size and always has clients waiting, so it never has
    an idle server to give up; worker 1's clients must still be served while worker 0's
    keep running (each worker has a fair share, given back at the ends of transactions)."""
    # (Without the give-back, worker 1's queries would wait until worker 0's clients left:
    # query_wait_timeout turns that into a failure here.)
    proxy = proxy_factory(proxy_config(pg, workers=2, default_pool_size=4, query_wait_timeout=5))
    dirs = _worker_dirs(proxy, 2)
    stop = threading.Event()
    failures: list[BaseException] = []
    busy_queries = [0]

    def busy() -> None:  # 8 clients on 4 servers: worker 0 always has waiters
        try:
            with psycopg.connect(**_via(dirs[0], proxy)) as conn:
                for _ in range(2000):  # bounded: stopped long before
                    if stop.is_set():
                        return
                    conn.execute("select pg_sleep(0.02)")
                    busy_queries[0] += 1
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=busy) for _ in range(8)]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: busy_queries[0] >= 100, 20, "worker 0 busy on every server")
        started = busy_queries[0]
        # Worker 1's clients: each of their queries needs one of worker 0's places.
        with psycopg.connect(**_via(dirs[1], proxy)) as conn:
            for _ in range(10):
                conn.execute("select pg_sleep(0.02)", prepare=False)
        served_meanwhile = busy_queries[0] - started
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    assert not failures, failures[0]
    assert served_meanwhile > 0  # worker 0 was still running while worker 1 got served


def test_show_hosts_adds_up_the_servers_of_every_worker(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory
) -> None:
    entry = {"host": "127.0.0.1", "port": pg.port, "user": "app", "password": "app-secret"}
    databases = {"appdb": {**entry, "target_session_attrs": "primary"}}
    proxy = proxy_factory(proxy_config(pg, workers=2, admin_users=["app"], databases=databases))
    dirs = _worker_dirs(proxy, 2)
    clients = [psycopg.connect(**_via(path, proxy)) for path in dirs]
    try:
        for client in clients:
            assert client.execute("select 1").fetchone() == (1,)
        with psycopg.connect(
            proxy.dsn(dbname="pgbouncer"), autocommit=True, prepare_threshold=None
        ) as console:
            cursor = console.execute("show hosts")
            names = [column.name for column in cursor.description or ()]
            rows = [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
        assert len(rows) == 1  # one row per database and host, not per worker
        assert rows[0]["host"] == "127.0.0.1" and rows[0]["role"] == "primary"
        assert rows[0]["state"] == "serving" and rows[0]["servers"] == 2
    finally:
        for client in clients:
            client.close()
