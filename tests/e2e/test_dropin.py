"""What a PgBouncer user meets when swapping the binary: two processes on one host from
pgbouncer.ini files, the Unix socket and the metrics port at start, the logs
(log_connections, log_disconnections, log_pooler_errors, escaped control characters), the
tcp_keep* options, connect_query, host lists, server_reset_query_always,
track_extra_parameters, server_lifetime = 0, replication connections and the
prepared_statements columns."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import tomli_w

from pgproxy.embedded import EmbeddedPostgres, find_pg_bindir
from tests.support import (
    REPO_ROOT,
    ProxyFactory,
    ProxyProcess,
    free_port,
    launch_proxy,
    port_open,
    proxy_config,
    wait_for,
)

DEFAULT_METRICS_PORT = 9433


def _rows(conn: psycopg.Connection[Any], command: str) -> list[dict[str, Any]]:
    cursor = conn.execute(command)
    names = [column.name for column in cursor.description or ()]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def _ini_text(pg: EmbeddedPostgres, workdir: Path, port: int, extra: str = "") -> str:
    return (
        "[databases]\n"
        f"appdb = host=127.0.0.1 port={pg.port} user=app password=app-secret\n"
        "[pgbouncer]\n"
        "listen_addr = 127.0.0.1\n"
        f"listen_port = {port}\n"
        f"unix_socket_dir = {workdir}\n"
        "auth_type = trust\n"
        "admin_users = app\n" + extra
    )


@pytest.fixture
def workdirs() -> Iterator[list[Path]]:
    made: list[Path] = []

    def _cleanup() -> None:
        for path in made:
            subprocess.run(["rm", "-rf", str(path)], check=False)

    yield made
    _cleanup()


def _workdir(made: list[Path]) -> Path:
    path = Path(tempfile.mkdtemp(prefix="pgproxy-test-"))
    made.append(path)
    return path


def _run(args: list[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run pgproxy to its exit (a start that must fail)."""
    return subprocess.run(
        [sys.executable, "-m", "pgproxy", *args], cwd=REPO_ROOT, capture_output=True,
        text=True, timeout=timeout, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def test_two_proxies_from_two_ini_files_share_a_host(
    pg: EmbeddedPostgres, workdirs: list[Path]
) -> None:
    """As two PgBouncers with their own ports: both start and serve, whatever holds the
    default metrics port (at most one of them gets it; the other says so and runs on)."""
    socket_dir = _workdir(workdirs)  # one socket directory for both, as /tmp would be
    proxies: list[ProxyProcess] = []
    try:
        for _ in range(2):
            workdir = _workdir(workdirs)
            port = free_port()
            ini = workdir / "pgbouncer.ini"
            ini.write_text(_ini_text(pg, socket_dir, port))
            proxies.append(launch_proxy(workdir, [str(ini)], port, {"listen_port": port}))
        for proxy in proxies:
            with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
                assert conn.execute("select 1").fetchone() == (1,)
            path = socket_dir / f".s.PGSQL.{proxy.port}"
            with psycopg.connect(host=str(socket_dir), port=proxy.port, dbname="appdb",
                                 user="app", autocommit=True) as conn:  # fmt: skip
                assert conn.execute("select 1").fetchone() == (1,)
            assert path.exists()
        served = [f"metrics on 127.0.0.1:{DEFAULT_METRICS_PORT}" in p.log_text() for p in proxies]
        warned = ["metrics_port 9433 (the default) cannot be bound" in p.log_text()
                  for p in proxies]  # fmt: skip
        assert served.count(True) <= 1
        assert all(s != w for s, w in zip(served, warned, strict=True)), [
            p.log_tail() for p in proxies
        ]
    finally:
        for proxy in proxies:
            proxy.cleanup()
    # Each one removed its socket when it stopped.
    assert not list(socket_dir.glob(".s.PGSQL.*"))


def test_a_live_unix_socket_is_not_taken_over_and_a_stale_one_is(
    pg: EmbeddedPostgres, workdirs: list[Path], proxy_factory: ProxyFactory
) -> None:
    socket_dir = _workdir(workdirs)
    first = proxy_factory(proxy_config(pg, unix_socket_dir=str(socket_dir)))
    second_dir = _workdir(workdirs)
    config = second_dir / "second.toml"
    pidfile = second_dir / "second.pid"
    config.write_text(
        f'listen_addr = ""\nlisten_port = {first.port}\nunix_socket_dir = "{socket_dir}"\n'
        f'metrics_port = 0\npidfile = "{pidfile}"\n'
    )
    result = _run(["-c", str(config)])
    assert result.returncode == 1
    assert f"unix socket {socket_dir}/.s.PGSQL.{first.port} is in use" in result.stderr
    assert not pidfile.exists()  # a failed start leaves nothing behind
    with psycopg.connect(host=str(socket_dir), port=first.port, dbname="appdb", user="app",
                         autocommit=True) as conn:  # fmt: skip
        assert conn.execute("select 1").fetchone() == (1,)  # the first one still serves

    # A socket file nobody listens on (a process that was killed) is replaced.
    stale_dir = _workdir(workdirs)
    port = free_port()
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(stale_dir / f".s.PGSQL.{port}"))
    stale.close()
    proxy = proxy_factory(proxy_config(pg, listen_port=port, unix_socket_dir=str(stale_dir)))
    with psycopg.connect(host=str(stale_dir), port=proxy.port, dbname="appdb", user="app",
                         autocommit=True) as conn:  # fmt: skip
        assert conn.execute("select 1").fetchone() == (1,)


def test_an_explicit_metrics_port_that_is_taken_stops_the_start(
    pg: EmbeddedPostgres, workdirs: list[Path]
) -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    taken = holder.getsockname()[1]
    try:
        workdir = _workdir(workdirs)
        port = free_port()
        ini = workdir / "pgbouncer.ini"
        # pgproxy's own keys are settable in a pgbouncer.ini too.
        ini.write_text(
            _ini_text(pg, workdir, port, f"metrics_port = {taken}\npidfile = {workdir}/p.pid\n")
        )
        result = _run([str(ini)])
        assert result.returncode == 1
        assert f"metrics_port {taken}: Address already in use" in result.stderr
        assert not (workdir / f".s.PGSQL.{port}").exists()
        assert not (workdir / "p.pid").exists()
        assert not port_open(port)
    finally:
        holder.close()


def test_an_unknown_ini_key_fails_the_check_and_the_start(
    pg: EmbeddedPostgres, workdirs: list[Path]
) -> None:
    workdir = _workdir(workdirs)
    ini = workdir / "pgbouncer.ini"
    ini.write_text(_ini_text(pg, workdir, free_port(), "max_client_con = 10\n"))
    for args in (["--check", str(ini)], [str(ini)]):
        result = _run(args)
        assert result.returncode == 1
        assert f"{ini}:9: unknown setting max_client_con" in result.stderr


def test_an_ini_without_auth_type_asks_for_a_password(
    pg: EmbeddedPostgres, workdirs: list[Path]
) -> None:
    """PgBouncer's default auth_type is md5: an ini that does not set it never lets
    clients in without a password."""
    workdir = _workdir(workdirs)
    port = free_port()
    (workdir / "userlist.txt").write_text('"app" "app-secret"\n')
    ini = workdir / "pgbouncer.ini"
    ini.write_text(
        _ini_text(pg, workdir, port, f"auth_file = {workdir}/userlist.txt\n").replace(
            "auth_type = trust\n", ""
        )
    )
    proxy = launch_proxy(workdir, [str(ini)], port, {"listen_port": port})
    try:
        with pytest.raises(psycopg.OperationalError, match="password"):
            psycopg.connect(proxy.dsn(), connect_timeout=5)
        with psycopg.connect(proxy.dsn(password="app-secret"), autocommit=True) as conn:
            assert conn.execute("select 1").fetchone() == (1,)
    finally:
        proxy.cleanup()


def test_logs_name_the_client_and_escape_what_it_sent(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(proxy_config(pg))
    with psycopg.connect(proxy.dsn(application_name="logged-app"), autocommit=True) as conn:
        conn.execute("select 1")
        local_port = conn.execute("select 1").fetchone()  # (a second request)
        assert local_port == (1,)
    with pytest.raises(psycopg.OperationalError, match="no such database: nope"):
        psycopg.connect(proxy.dsn(dbname="nope"), connect_timeout=5)
    forged = "evil\n2026-01-01 00:00:00,000 WARNING pgproxy: FORGED"
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(proxy.dsn(dbname="nope", user=forged), connect_timeout=5)

    def logged() -> bool:
        return proxy.log_text().count("closing because") >= 3

    wait_for(logged, 10, "three disconnections in the log")
    text = proxy.log_text()
    assert re.search(r"INFO pgproxy\.client: C-\d+ appdb/app@127\.0\.0\.1:\d+ login: tls=no "
                     r"application_name=logged-app", text), text  # fmt: skip
    assert re.search(r"C-\d+ appdb/app@127\.0\.0\.1:\d+ closing because: client close request "
                     r"\(age=\d+s\)", text), text  # fmt: skip
    # log_pooler_errors: an error pgproxy sent, at WARNING, with the address.
    assert re.search(
        r"WARNING pgproxy\.client: C-\d+ nope/app@127\.0\.0\.1:\d+ pooler error: "
        r"no such database: nope",
        text,
    ), text
    # The user name's newline is written as \x0a: no line of the log starts with it.
    assert "nope/evil\\x0a2026-01-01 00:00:00,000 WARNING pgproxy: FORGED@127.0.0.1" in text
    assert not any(line.startswith("2026-01-01") for line in text.splitlines())


def test_the_three_log_switches_turn_the_lines_off(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(
        proxy_config(pg, log_connections=False, log_disconnections=False,
                     log_pooler_errors=False)
    )  # fmt: skip
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute("select 1")
    with pytest.raises(psycopg.OperationalError, match="no such database"):
        psycopg.connect(proxy.dsn(dbname="nope"), connect_timeout=5)
    text = proxy.log_text()
    assert "login:" not in text and "closing because" not in text
    assert "pooler error" not in text


def _keepalive_timers(pid: int) -> list[str]:
    """ss's timer column of pgproxy's established TCP sockets."""
    out = subprocess.run(["ss", "-tnpoH", "state", "established"], capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    return [line for line in out.splitlines() if f"pid={pid}," in line]


def test_tcp_keepalive_on_client_and_server_sockets(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(proxy_config(pg, tcp_keepidle=77, tcp_keepintvl=5, tcp_keepcnt=3))
    # ss shows the socket's pending timer: keepalive once the last data is acknowledged.
    keepalive = re.compile(r"timer:\(keepalive,(?:(\d+)min)?(?:(\d+)(?:\.\d+)?sec)?")
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute("select 1")

        def both_sides_keepalive() -> bool:
            lines = _keepalive_timers(proxy.pid)
            client_side = [line for line in lines if f"127.0.0.1:{proxy.port} " in line]
            server_side = [line for line in lines if f"127.0.0.1:{pg.port} " in line]
            timers = [keepalive.search(line) for line in client_side + server_side]
            # (At most 77 s: tcp_keepidle, not the system default of 2 hours.)
            return bool(client_side and server_side) and all(
                timer is not None and int(timer.group(1) or 0) * 60 + int(timer.group(2) or 0) <= 77
                for timer in timers
            )

        wait_for(both_sides_keepalive, 5, "keepalive timers on both sides")
    off = proxy_factory(proxy_config(pg, tcp_keepalive=False))
    with psycopg.connect(off.dsn(), autocommit=True) as conn:
        conn.execute("select 1")
        assert not any("keepalive" in line for line in _keepalive_timers(off.pid))
    # Client sockets inherit the options of the listening socket: a reload (SIGHUP) sets
    # them there, for the clients that connect from then on.
    with open(off.config_path, "wb") as config_file:
        tomli_w.dump(proxy_config(pg, listen_port=off.port, tcp_keepidle=77), config_file)
    os.kill(off.pid, signal.SIGHUP)

    def new_client_keepalive() -> bool:
        with psycopg.connect(off.dsn(), autocommit=True) as conn:
            conn.execute("select 1")
            for _ in range(20):  # (the timer shows once the last data is acknowledged)
                lines = _keepalive_timers(off.pid)
                client_side = [line for line in lines if f"127.0.0.1:{off.port} " in line]
                if client_side and all(keepalive.search(line) for line in client_side):
                    return True
                time.sleep(0.05)
        return False

    wait_for(new_client_keepalive, 10, "a keepalive timer on a client's socket after the reload")


def test_connect_query_and_a_host_list(pg: EmbeddedPostgres, proxy_factory: ProxyFactory) -> None:
    databases = {
        "appdb": {
            # Nothing listens on 127.0.0.9: the next host is used, and kept (disable).
            "host": "127.0.0.9,127.0.0.1", "port": pg.port, "user": "app",
            "password": "app-secret", "load_balance_hosts": "disable",
            "connect_query": "set enable_seqscan = off",
        }
    }  # fmt: skip
    proxy = proxy_factory(
        proxy_config(pg, databases=databases, pool_mode="session", admin_users="app")
    )
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        assert conn.execute("show enable_seqscan").fetchone() == ("off",)
    with psycopg.connect(proxy.dsn(dbname="pgbouncer"), autocommit=True) as admin:
        (row,) = [r for r in _rows(admin, "SHOW DATABASES") if r["name"] == "appdb"]
        assert row["load_balance_hosts"] == "disable"
        assert {server["addr"] for server in _rows(admin, "SHOW SERVERS")} == {"127.0.0.1"}


def test_a_failing_connect_query_fails_the_login(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory
) -> None:
    databases = {"appdb": {"host": "127.0.0.1", "port": pg.port, "user": "app",
                           "password": "app-secret", "connect_query": "select nope"}}  # fmt: skip
    proxy = proxy_factory(proxy_config(pg, databases=databases))
    with pytest.raises(psycopg.OperationalError, match="connect_query failed"):
        psycopg.connect(proxy.dsn(), connect_timeout=5)


def test_server_reset_query_always(pg: EmbeddedPostgres, proxy_factory: ProxyFactory) -> None:
    """Transaction mode, one server: a session setting made outside a transaction is
    reset before the next client gets the server only with server_reset_query_always."""
    for always, expected in ((False, "1234ms"), (True, "0")):
        proxy = proxy_factory(
            proxy_config(pg, default_pool_size=1, server_reset_query_always=always)
        )
        with psycopg.connect(proxy.dsn(), autocommit=True) as first:
            first.execute("set statement_timeout = 1234")
        with psycopg.connect(proxy.dsn(), autocommit=True) as second:
            assert second.execute("show statement_timeout").fetchone() == (expected,)


def test_track_extra_parameters(pg: EmbeddedPostgres, proxy_factory: ProxyFactory) -> None:
    plain = proxy_factory(proxy_config(pg))
    with pytest.raises(psycopg.OperationalError, match="unsupported startup parameter"):
        psycopg.connect(plain.dsn(options="-c search_path=pg_catalog"), connect_timeout=5)
    proxy = proxy_factory(proxy_config(pg, track_extra_parameters=["search_path"],
                                       default_pool_size=2))  # fmt: skip
    with (
        psycopg.connect(proxy.dsn(options="-c search_path=pg_catalog"), autocommit=True) as a,
        psycopg.connect(proxy.dsn(), autocommit=True) as b,
    ):
        for _ in range(3):  # each one keeps its own value, whichever server it gets
            assert a.execute("show search_path").fetchone() == ("pg_catalog",)
            assert b.execute("show search_path").fetchone() == ('"$user", public',)


def test_server_lifetime_zero_uses_a_server_once(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(proxy_config(pg, server_lifetime=0, default_pool_size=1))
    pids = set()
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        for _ in range(3):
            pids.add(conn.execute("select pg_backend_pid()").fetchone())
    assert len(pids) == 3  # a new server for each transaction (PgBouncer's meaning of 0)


def test_prepared_statements_columns(pg: EmbeddedPostgres, proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory(proxy_config(pg, admin_users="app"))
    with (
        psycopg.connect(proxy.dsn(), autocommit=True, prepare_threshold=0) as conn,
        psycopg.connect(proxy.dsn(dbname="pgbouncer"), autocommit=True) as admin,
    ):
        with conn.transaction():
            conn.execute("select %s::int", [1])
            conn.execute("select %s::text", ["x"])
            servers = [s for s in _rows(admin, "SHOW SERVERS") if s["state"] == "active"]
            assert [s["prepared_statements"] for s in servers] == [2]
        clients = [c for c in _rows(admin, "SHOW CLIENTS") if c["database"] == "appdb"]
        assert [c["prepared_statements"] for c in clients] == [2]


def test_environment_overrides_are_logged_without_their_values(
    pg: EmbeddedPostgres, workdirs: list[Path]
) -> None:
    workdir = _workdir(workdirs)
    port = free_port()
    config = workdir / "pgproxy.toml"
    config.write_text(
        f'listen_addr = "127.0.0.1"\nlisten_port = {port}\ndefault_pool_size = 3\n'
        "metrics_port = 0\n"
        f'[databases.appdb]\nhost = "127.0.0.1"\nport = {pg.port}\nuser = "app"\n'
        'password = "app-secret"\n'
    )
    env = {**os.environ, "PGPROXY_DEFAULT_POOL_SIZE": "4", "PGPROXY_MAX_CLIENT_CONN": "48213"}
    result = subprocess.run(
        [sys.executable, "-m", "pgproxy", "--check", "-c", str(config)], cwd=REPO_ROOT,
        capture_output=True, text=True, env=env, timeout=30,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (
        "default_pool_size: set by PGPROXY_DEFAULT_POOL_SIZE, overriding the config file"
        in result.stderr
    )
    assert "max_client_conn: set by PGPROXY_MAX_CLIENT_CONN" in result.stderr
    assert "48213" not in result.stderr and "= 4" not in result.stderr


def test_the_image_does_not_override_the_files_listen_addr() -> None:
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    assert "PGPROXY_LISTEN_ADDR" not in dockerfile and "PGPROXY_METRICS_ADDR" not in dockerfile
    entrypoint = (REPO_ROOT / "deploy" / "container" / "entrypoint.sh").read_text()
    # Only the environment-only configuration listens on every address by default.
    before_env_only = entrypoint.split('exec pgproxy -c "$config"')[0]
    assert "PGPROXY_LISTEN_ADDR" not in before_env_only


def _superuser_proxy(pg: EmbeddedPostgres, proxy_factory: ProxyFactory, **extra: Any) -> Any:
    entry = {"host": pg.socket_dir, "port": pg.port, "user": pg.superuser}
    # libpq names the database "replication" in a physical replication connection (as
    # PgBouncer, pgproxy finds the entry by that name; PostgreSQL ignores it).
    databases = {"appdb": entry, "replication": entry}
    return proxy_factory(proxy_config(pg, databases=databases, **extra))


def test_logical_replication_connection(pg: EmbeddedPostgres, proxy_factory: ProxyFactory) -> None:
    proxy = _superuser_proxy(pg, proxy_factory)
    dsn = proxy.dsn(user=pg.superuser, replication="database", application_name="repl-app")
    with psycopg.connect(dsn, autocommit=True) as conn:
        system = conn.execute("IDENTIFY_SYSTEM").fetchone()
        assert system is not None and system[3] == "appdb"  # (systemid, timeline, xlogpos, db)
        assert conn.execute("show application_name").fetchone() == ("repl-app",)
        backend = conn.info.backend_pid
    # Its server was its own and is gone with it: not pooled for anyone else.
    with psycopg.connect(proxy.dsn(user=pg.superuser), autocommit=True) as conn:
        assert conn.execute("select pg_backend_pid()").fetchone() != (backend,)
    wait_for(
        lambda: pg.sql("select count(*) from pg_stat_replication").strip().endswith("0"),
        10,
        "the walsender to end",
    )


def test_pg_basebackup_through_pgproxy(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    proxy = _superuser_proxy(pg, proxy_factory)
    target = tmp_path / "backup"
    result = subprocess.run(
        [os.path.join(find_pg_bindir(), "pg_basebackup"), "--dbname",
         proxy.dsn(user=pg.superuser), "-D", str(target), "--checkpoint=fast",
         "-X", "stream", "--no-sync"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (target / "PG_VERSION").exists() and (target / "backup_label").exists()


def test_replication_connections_wait_for_a_place_in_the_pool(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory
) -> None:
    """pool_size caps replication connections too; the next one waits for a place."""
    proxy = _superuser_proxy(pg, proxy_factory, default_pool_size=1, query_wait_timeout=1)
    dsn = proxy.dsn(user=pg.superuser, replication="database")
    with psycopg.connect(dsn, autocommit=True) as first:
        first.execute("IDENTIFY_SYSTEM")
        with pytest.raises(psycopg.OperationalError, match="query_wait_timeout"):
            psycopg.connect(dsn, connect_timeout=5)
    with psycopg.connect(dsn, autocommit=True) as again:  # the place is free again
        assert again.execute("IDENTIFY_SYSTEM").fetchone() is not None


def test_sd_notify_ready_reloading_stopping(
    pg: EmbeddedPostgres, workdirs: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """What systemd's Type=notify (and notify-reload) reads from NOTIFY_SOCKET."""
    workdir = _workdir(workdirs)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(workdir / "notify"))
    listener.settimeout(10)
    monkeypatch.setenv("NOTIFY_SOCKET", str(workdir / "notify"))
    port = free_port()
    ini = workdir / "pgbouncer.ini"
    ini.write_text(_ini_text(pg, workdir, port))
    proxy = launch_proxy(workdir, [str(ini)], port, {"listen_port": port})
    try:
        ready = listener.recv(4096).decode().splitlines()
        assert ready[:2] == ["READY=1", f"MAINPID={proxy.pid}"]
        assert ready[2].startswith("STATUS=listening on 127.0.0.1:")
        os.kill(proxy.pid, 1)  # SIGHUP, as systemd's reload sends it
        reloading = listener.recv(4096).decode().splitlines()
        assert reloading[0] == "RELOADING=1" and reloading[1].startswith("MONOTONIC_USEC=")
        assert listener.recv(4096) == b"READY=1"
        os.kill(proxy.pid, 15)  # SIGTERM
        assert listener.recv(4096) == b"STOPPING=1"
    finally:
        proxy.cleanup()
        listener.close()
