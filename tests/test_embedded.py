"""Tests of the throwaway cluster (pgproxy.embedded) and of the shared test fixtures."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from pgproxy.embedded import EmbeddedPostgres, find_pg_bindir, free_port, pid_running
from tests.support import ProxyProcess, conninfo, proxy_config, psql


def test_find_pg_bindir_has_server_binaries() -> None:
    bindir = find_pg_bindir()
    for name in ("initdb", "pg_ctl", "postgres", "psql"):
        assert os.access(os.path.join(bindir, name), os.X_OK), name


def test_find_pg_bindir_error_mentions_bootstrap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PGPROXY_PG_BINDIR", raising=False)
    monkeypatch.setattr("pgproxy.embedded.glob.glob", lambda pattern: [])
    monkeypatch.setattr("pgproxy.embedded.shutil.which", lambda name: None)
    with pytest.raises(RuntimeError, match=r"scripts/bootstrap\.sh"):
        find_pg_bindir()


def test_free_port_is_bindable() -> None:
    port = free_port()
    assert 1024 <= port <= 65535
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_sql_select_1(pg: EmbeddedPostgres) -> None:
    assert pg.sql("select 1") == "1"
    assert pg.sql("select current_user") == "postgres"


def test_sql_error_raises_with_stderr(pg: EmbeddedPostgres) -> None:
    with pytest.raises(RuntimeError, match="no_such_table"):
        pg.sql("select * from no_such_table")


def test_server_settings(pg: EmbeddedPostgres) -> None:
    assert pg.sql("show password_encryption") == "scram-sha-256"
    assert pg.sql("show fsync") == "off"
    assert pg.sql("show max_connections") == "300"
    assert pg.sql("show listen_addresses") == "127.0.0.1"
    assert pg.sql("show port") == str(pg.port)


def test_scram_login_over_tcp(pg: EmbeddedPostgres) -> None:
    with psycopg.connect(pg.dsn("app", "app-secret", "appdb"), connect_timeout=10) as conn:
        row = conn.execute("select current_user, current_database()").fetchone()
        assert row == ("app", "appdb")
        conn.execute("insert into t (v) values ('x')")


def test_wrong_password_fails(pg: EmbeddedPostgres) -> None:
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(pg.dsn("app", "wrong", "appdb"), connect_timeout=10)


@pytest.mark.parametrize(
    ("user", "password"),
    [("md5user", "md5-secret"), ("plainuser", "plain-secret"), ("trustuser", "")],
)
def test_other_roles_login_and_use_table(pg: EmbeddedPostgres, user: str, password: str) -> None:
    with psycopg.connect(pg.dsn(user, password, "appdb"), connect_timeout=10) as conn:
        assert conn.execute("select current_user").fetchone() == (user,)
        conn.execute("insert into t (v) values (%s)", (user,))
        conn.execute("create temp table scratch (x int)")
        count = conn.execute("select count(*) from t where v = %s", (user,)).fetchone()
        assert count is not None and count[0] >= 1


def test_md5user_stored_as_md5(pg: EmbeddedPostgres) -> None:
    stored = pg.sql("select rolpassword from pg_authid where rolname = 'md5user'")
    assert stored.startswith("md5")
    assert pg.sql("select rolpassword from pg_authid where rolname = 'app'").startswith(
        "SCRAM-SHA-256$"
    )
    assert pg.sql("select rolpassword is null from pg_authid where rolname = 'trustuser'") == "t"


def test_table_owned_by_app(pg: EmbeddedPostgres) -> None:
    owner = pg.sql("select tableowner from pg_tables where tablename = 't'", dbname="appdb")
    assert owner == "app"


def test_create_role_quotes_names_and_passwords(pg: EmbeddedPostgres) -> None:
    name, password = 'we"ird Role', "it's a \\ secret"
    pg.create_role(name, password)
    with psycopg.connect(pg.dsn(name, password, "postgres"), connect_timeout=10) as conn:
        assert conn.execute("select current_user").fetchone() == (name,)


def test_superuser_dsn_and_env(pg: EmbeddedPostgres) -> None:
    with psycopg.connect(pg.superuser_dsn("appdb")) as conn:
        assert conn.execute("select current_user").fetchone() == ("postgres",)
    result = subprocess.run(
        ["psql", "-X", "-A", "-t", "-c", "select current_database()"],
        env=pg.env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert result.stdout.strip() == "postgres"


def test_psql_helper_against_server(pg: EmbeddedPostgres) -> None:
    result = psql(["-A", "-t", "-c", "select current_user"], port=pg.port, password="app-secret")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "app"
    result = psql(["-A", "-t"], port=pg.port, user="trustuser", input="select 40 + 2;\n")
    assert result.stdout.strip() == "42"
    failed = psql(["-c", "select 1"], port=pg.port, password="nope")
    assert failed.returncode != 0
    assert "password authentication failed" in failed.stderr


def test_run_as_owner_runs_as_cluster_owner(pg: EmbeddedPostgres) -> None:
    result = pg.run_as_owner(["id", "-un"])
    assert result.returncode == 0
    expected = "postgres" if os.geteuid() == 0 else subprocess.getoutput("id -un")
    assert result.stdout.strip() == expected


@pytest.mark.e2e
def test_start_stop_removes_everything() -> None:
    pg = EmbeddedPostgres(password_encryption="md5", extra_conf={"work_mem": "8MB"})
    pg.start()
    try:
        base, pid = pg.base_dir, pg.postmaster_pid
        assert base and os.path.isdir(pg.data_dir)
        assert pid is not None and pid_running(pid)
        assert pg.sql("show password_encryption") == "md5"
        assert pg.sql("show work_mem") == "8MB"
    finally:
        pg.stop()
    assert not os.path.exists(base)
    assert not pid_running(pid)
    pg.stop()  # idempotent


@pytest.mark.e2e
def test_stop_kills_a_hung_postmaster() -> None:
    """pg_ctl stop failing (here: no data dir any more) still gets the postmaster killed."""
    with EmbeddedPostgres() as pg:
        pid = pg.postmaster_pid
        assert pid is not None
        os.kill(pid, 0)
        # Make pg_ctl useless: it will not find the data directory.
        pg.data_dir = os.path.join(pg.base_dir, "missing")
        pg.stop()
        assert not pid_running(pid)


@pytest.mark.e2e
def test_start_failure_reports_log() -> None:
    pg = EmbeddedPostgres(extra_conf={"no_such_setting_xyz": "1"})
    with pytest.raises(RuntimeError, match="no_such_setting_xyz"):
        pg.start()
    assert pg.base_dir == ""


def test_proxy_config_defaults_and_overrides(pg: EmbeddedPostgres) -> None:
    config = proxy_config(pg)
    assert config["pool_mode"] == "transaction"
    assert config["databases"]["appdb"]["port"] == pg.port
    other = proxy_config(pg, pool_mode="session", databases={"x": {"host": "h"}}, listen_addr=None)
    assert other["pool_mode"] == "session"
    assert other["databases"] == {"x": {"host": "h"}}
    assert "listen_addr" not in other


def test_conninfo_quoting() -> None:
    password = "a b'c\\ d=e"
    parsed = conninfo_to_dict(conninfo(host="127.0.0.1", password=password, port=5))
    assert parsed == {"host": "127.0.0.1", "password": password, "port": "5"}


def test_proxy_process_stop_escalates(tmp_path: Path) -> None:
    """ProxyProcess.stop: SIGINT, SIGQUIT, then SIGKILL after the timeout; idempotent."""
    script = (
        "import signal, time\n"
        "for s in (signal.SIGINT, signal.SIGQUIT, signal.SIGTERM):\n"
        "    signal.signal(s, signal.SIG_IGN)\n"
        "time.sleep(60)"
    )
    popen = subprocess.Popen([sys.executable, "-c", script])
    proc = ProxyProcess(
        popen,
        port=1,
        config={},
        workdir=tmp_path,
        config_path=tmp_path / "c.toml",
        log_path=tmp_path / "log",
    )
    assert proc.alive()
    time.sleep(0.3)  # let it install the handler
    assert proc.stop(timeout=0.5) == -9
    assert not proc.alive()
    assert proc.stop() == -9
    assert proc.dsn(sslmode="disable") == (
        "host='127.0.0.1' port='1' dbname='appdb' user='app' sslmode='disable'"
    )


def test_a_free_port_for_the_cluster_is_none_of_those_to_avoid(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The OS may hand out a port again until it is bound: the caller's own (the demo's
    # pgproxy port) must not become the cluster's.
    ports = iter([5001, 5002, 5001, 5003])
    monkeypatch.setattr("pgproxy.embedded.free_port", lambda: next(ports))
    assert EmbeddedPostgres(avoid=(5001, 5002)).port == 5003
