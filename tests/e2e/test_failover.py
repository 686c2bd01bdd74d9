"""High availability with a real primary and a real streaming standby.

The two clusters share a port number and differ by unix socket directory (the standby has
no TCP listener), so one database entry lists both as hosts. pgproxy follows
``target_session_attrs`` over them: ``appdb`` (read-write) follows the primary through a
promotion without a reload, and its read-only twin ``appdb_ro`` (prefer-standby,
``max_replica_lag``) reads from the standby while it keeps up, from the primary otherwise.
"""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pgproxy.embedded import EmbeddedPostgres, free_port
from tests.support import ProxyFactory, ProxyProcess, connect, proxy_config, wait_for

CLIENTS = 4
MAX_LAG_SECONDS = 1.0


class Pair:
    """A primary and its streaming standby (pg_basebackup -R), on one port number."""

    def __init__(self) -> None:
        self.primary = EmbeddedPostgres(extra_conf={"cluster_name": "primary"})
        self.standby = EmbeddedPostgres(
            port=self.primary.port, extra_conf={"cluster_name": "standby"}
        )
        self.standby.host = ""  # no TCP: the primary holds that port on 127.0.0.1

    def start(self) -> None:
        self.primary.start()
        self.primary.create_role("app", "app-secret")
        self.primary.create_database("appdb", owner="app")
        self.primary.sql(
            "SET ROLE app;\n"
            "CREATE TABLE acked (client int, n int, PRIMARY KEY (client, n));\n"
            "CREATE TABLE filler (v text);\n",
            dbname="appdb",
        )
        self.standby.start_as_standby_of(self.primary)

    def stop(self) -> None:
        self.standby.stop()
        self.primary.stop()


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    clusters = Pair()
    try:
        clusters.start()
        yield clusters
    finally:
        clusters.stop()


@pytest.fixture(scope="module")
def ha_proxy(pair: Pair) -> Iterator[ProxyProcess]:
    factory = ProxyFactory()
    hosts = f"{pair.primary.socket_dir},{pair.standby.socket_dir}"
    config = proxy_config(
        pair.primary,
        listen_port=free_port(),
        server_check_delay=1,
        metrics_port=free_port(),
        query_wait_timeout=60,
        admin_users=["app"],
        databases={
            "appdb": {
                "host": hosts,
                "port": pair.primary.port,
                "user": "app",
                "password": "app-secret",
                "target_session_attrs": "read-write",
            },
            "appdb_ro": {
                "replica_of": "appdb",
                "max_replica_lag": f"{MAX_LAG_SECONDS:g}s",
            },
        },
    )
    try:
        yield factory(config)
    finally:
        factory.close()


def _metrics(proxy: ProxyProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    url = f"http://127.0.0.1:{proxy.config['metrics_port']}/metrics"
    wait_for(lambda: _answers(url), 10, "the metrics listener")
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except OSError:
        return False


def _served_by_standby(proxy: ProxyProcess, dbname: str) -> bool:
    with connect(proxy, dbname=dbname) as conn:
        row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
    assert row is not None
    return bool(row[0])


def _hosts(proxy: ProxyProcess) -> list[dict[str, Any]]:
    with connect(proxy, dbname="pgbouncer") as conn:
        cur = conn.execute("SHOW HOSTS")
        names = [column.name for column in cur.description or []]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def _row(proxy: ProxyProcess, database: str, host: str) -> dict[str, Any]:
    """The SHOW HOSTS row of ``host`` for ``database`` ({} before its first pool)."""
    rows = _hosts(proxy)
    return next((r for r in rows if r["database"] == database and r["host"] == host), {})


def test_reads_go_to_the_standby_while_it_keeps_up(pair: Pair, ha_proxy: ProxyProcess) -> None:
    primary_host, standby_host = pair.primary.socket_dir, pair.standby.socket_dir
    with connect(ha_proxy) as conn:  # writes: the primary
        conn.execute("INSERT INTO filler VALUES ('x')")
        row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
        assert row == (False,)
    # The first login already tells the roles (in_hot_standby): reads go to the standby.
    assert _served_by_standby(ha_proxy, "appdb_ro")
    wait_for(
        lambda: _row(ha_proxy, "appdb_ro", standby_host).get("lag") is not None,
        30, "the host check to measure the standby's lag",
    )  # fmt: skip
    assert _row(ha_proxy, "appdb", primary_host)["role"] == "primary"
    assert _row(ha_proxy, "appdb_ro", standby_host)["role"] == "standby"
    wait_for(  # (replay may trail the last insert for a moment on a busy machine)
        lambda: _row(ha_proxy, "appdb_ro", standby_host)["state"] == "serving", 30,
        "the standby to be within max_replica_lag",
    )  # fmt: skip
    assert _row(ha_proxy, "appdb", standby_host)["state"] == "unfit"

    pair.standby.sql("SELECT pg_wal_replay_pause()")
    try:
        # The standby receives but does not replay: it falls behind as the primary writes.
        def moved_off() -> bool:
            with connect(ha_proxy) as conn:
                conn.execute("INSERT INTO filler VALUES ('y')")
            return not _served_by_standby(ha_proxy, "appdb_ro")

        wait_for(moved_off, 30, "reads to leave the lagging standby")
        row = _row(ha_proxy, "appdb_ro", standby_host)
        assert row["state"] == "lagging"
        assert float(row["lag"]) > MAX_LAG_SECONDS
        assert row["lag_bytes"] > 0  # the primary's WAL position is past the replayed one
        lag = ("pgproxy_replica_lag_seconds", (("database", "appdb_ro"), ("host", standby_host)))
        assert _metrics(ha_proxy)[lag] > MAX_LAG_SECONDS
        # Still readable meanwhile, from the primary (prefer-standby's fallback).
        assert _row(ha_proxy, "appdb_ro", primary_host)["state"] == "serving"
    finally:
        pair.standby.sql("SELECT pg_wal_replay_resume()")
    wait_for(
        lambda: _served_by_standby(ha_proxy, "appdb_ro"), 30,
        "reads to return to the standby once it caught up",
    )  # fmt: skip


class Writers:
    """Clients committing numbered rows through pgproxy; each keeps what was acknowledged."""

    def __init__(self, proxy: ProxyProcess) -> None:
        self.proxy = proxy
        self.acked: list[list[int]] = [[] for _ in range(CLIENTS)]
        self.ack_times: list[float] = []
        self.served_by: list[str] = []  # the cluster_name of the server, per ack
        self.errors: list[str] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._run, args=(client,)) for client in range(CLIENTS)
        ]

    def __enter__(self) -> Writers:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)

    def _run(self, client: int) -> None:
        n = 0
        conn: psycopg.Connection[Any] | None = None
        deadline = time.monotonic() + 120  # bounded whatever happens
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                if conn is None:
                    conn = connect(self.proxy)
                n += 1
                with conn.transaction():
                    server = conn.execute(
                        "INSERT INTO acked VALUES (%s, %s) "
                        "RETURNING current_setting('cluster_name')",
                        (client, n),
                    ).fetchone()
                with self.lock:
                    self.acked[client].append(n)
                    self.ack_times.append(time.monotonic())
                    self.served_by.append(server[0] if server else "")
            except psycopg.Error as exc:
                with self.lock:
                    self.errors.append(str(exc).strip())
                if conn is not None:
                    conn.close()
                conn = None
                time.sleep(0.05)
            time.sleep(0.01)
        if conn is not None:
            conn.close()

    def acks(self) -> int:
        with self.lock:
            return len(self.ack_times)

    def first_ack_on(self, cluster_name: str) -> float | None:
        """When the first commit served by the cluster ``cluster_name`` was acknowledged."""
        with self.lock:
            pairs = zip(self.ack_times, self.served_by, strict=True)
            return next((t for t, server in pairs if server == cluster_name), None)


def test_failover_follows_the_promoted_standby(pair: Pair, ha_proxy: ProxyProcess) -> None:
    standby_host = pair.standby.socket_dir
    with Writers(ha_proxy) as writers:
        wait_for(lambda: writers.acks() >= 50, 30, f"writes through pgproxy: {writers.errors}")
        pair.primary.shut_down()  # pg_ctl stop -m fast: the standby gets every WAL record
        promote_called_at = time.monotonic()
        pair.standby.promote()
        promoted_at = time.monotonic()
        wait_for(
            lambda: writers.first_ack_on("standby") is not None, 60,
            "a commit on the promoted standby",
        )  # fmt: skip
        first = writers.first_ack_on("standby")
        assert first is not None
        # Reported, not asserted (timing): how long clients waited for the new primary.
        print(
            f"\nfirst commit on the new primary {first - promote_called_at:.3f} s after "
            f"pg_ctl promote was called ({first - promoted_at:+.3f} s from its return); "
            f"client errors: {writers.errors}"
        )
        after = writers.acks()
        wait_for(lambda: writers.acks() >= after + 50, 30, "writes on the new primary")
    # Every acknowledged commit is on the new primary.
    rows = pair.standby.sql("SELECT client, n FROM acked", dbname="appdb")
    stored = {tuple(map(int, line.split("|"))) for line in rows.splitlines() if line}
    acked = {(client, n) for client, numbers in enumerate(writers.acked) for n in numbers}
    assert acked, "no commit was acknowledged"
    assert acked <= stored, sorted(acked - stored)[:10]
    # Without any RELOAD: the console shows the move.
    row = _row(ha_proxy, "appdb", standby_host)
    assert row["role"] == "primary" and row["state"] == "serving"
    with connect(ha_proxy) as conn:
        assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (False,)
    samples = _metrics(ha_proxy)
    at = (("database", "appdb"), ("host", standby_host))
    assert samples[("pgproxy_failovers_total", (("database", "appdb"),))] == 1
    assert samples[("pgproxy_host_role", (*at, ("role", "primary")))] == 1
    assert samples[("pgproxy_host_up", at)] == 1
    gone = (("database", "appdb"), ("host", pair.primary.socket_dir))
    assert samples[("pgproxy_host_up", gone)] == 0
    # Clients saw errors only for the transactions in flight when the primary went away
    # (one per client at most): the others waited for the new primary.
    assert len(writers.errors) <= CLIENTS, writers.errors
    assert all("query_wait_timeout" not in error for error in writers.errors), writers.errors
