"""pgproxy started on a pgbouncer.ini, the way a script written for PgBouncer starts it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgproxy.embedded import EmbeddedPostgres
from tests.support import REPO_ROOT, ProxyProcess, free_port, launch_proxy, wait_for


def _show(admin: psycopg.Connection[Any], command: str) -> list[dict[str, Any]]:
    cursor = admin.execute(command)
    names = [column.name for column in cursor.description or ()]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


@pytest.fixture
def ini_proxy(pg: EmbeddedPostgres) -> Any:
    workdir = Path(tempfile.mkdtemp(prefix="pgproxy-test-"))
    port = free_port()
    (workdir / "databases.ini").write_text(
        "[databases]\n"
        f"appdb = host=127.0.0.1 port={pg.port} user=app password=app-secret pool_size=3\n"
        f"otherdb = host=127.0.0.1 port={pg.port} dbname=appdb user=app password=app-secret"
        " pool_mode=session\n"
    )
    ini = workdir / "pgbouncer.ini"
    ini.write_text(
        "; as a PgBouncer harness writes it\n"
        "[pgbouncer]\n"
        "listen_addr = 127.0.0.1\n"
        "listen_port = 1\n"
        f"listen_port = {port}\n"  # repeated: the last wins
        f"unix_socket_dir = {workdir}\n"
        f"logfile = {workdir}/pgbouncer.log\n"
        f"pidfile = {workdir}/pgbouncer.pid\n"
        "auth_type = trust\n"
        "pool_mode = transaction\n"
        "default_pool_size = 2\n"
        "query_wait_timeout = 7\n"
        "admin_users = app\n"
        "disable_pqexec = 1\n"
        f"%include {workdir}/databases.ini\n"
    )
    # PgBouncer's command line: the file as the argument, -q for no stderr logging.
    proxy = launch_proxy(workdir, ["-q", "-v", str(ini)], port, {"listen_port": port})
    yield proxy, workdir
    proxy.cleanup()


def test_started_on_a_pgbouncer_ini(ini_proxy: tuple[ProxyProcess, Path]) -> None:
    proxy, workdir = ini_proxy
    pidfile = workdir / "pgbouncer.pid"
    assert pidfile.read_text().strip() == str(proxy.pid)
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        assert conn.execute("select current_database()").fetchone() == ("appdb",)
    # PgBouncer's default host is its own unix_socket_dir: the socket is there.
    with psycopg.connect(
        host=str(workdir), port=proxy.port, dbname="otherdb", user="app", autocommit=True
    ) as conn:
        assert conn.execute("select current_database()").fetchone() == ("appdb",)
    with psycopg.connect(proxy.dsn(dbname="pgbouncer"), autocommit=True) as admin:
        config = {row["key"]: row["value"] for row in _show(admin, "SHOW CONFIG")}
        assert config["pool_mode"] == "transaction"
        assert config["default_pool_size"] == "2"
        assert config["query_wait_timeout"] in ("7", "7.0")
        databases = {row["name"]: row for row in _show(admin, "SHOW DATABASES")}
        assert databases["appdb"]["pool_size"] == 3
        assert databases["otherdb"]["pool_mode"] == "session"
        admin.execute("RELOAD")
    log = workdir / "pgbouncer.log"
    wait_for(lambda: "configuration reloaded" in log.read_text(), 10, "the reload in the log")
    text = log.read_text()
    assert "disable_pqexec not carried over" in text
    assert "app-secret" not in text
    # -q: nothing on stderr (the process output), everything in the logfile.
    assert proxy.log_text() == ""
    proxy.stop()
    assert proxy.returncode == 0
    assert not pidfile.exists()


def test_a_live_pidfile_refuses_a_second_start(
    ini_proxy: tuple[ProxyProcess, Path],
) -> None:
    proxy, workdir = ini_proxy
    second = subprocess.run(
        [sys.executable, "-m", "pgproxy", str(workdir / "pgbouncer.ini")],
        capture_output=True, text=True, timeout=30, cwd=REPO_ROOT,
    )  # fmt: skip
    assert second.returncode == 1
    assert "another instance running?" in second.stderr
    assert proxy.alive()
    os.kill(proxy.pid, signal.SIGHUP)  # reload: the logfile is reopened (rotation)
    (workdir / "pgbouncer.log").rename(workdir / "pgbouncer.log.1")
    os.kill(proxy.pid, signal.SIGHUP)
    wait_for(
        lambda: (
            (workdir / "pgbouncer.log").exists()
            and "configuration reloaded" in (workdir / "pgbouncer.log").read_text()
        ),
        10,
        "a new logfile after rotation",
    )


@pytest.mark.parametrize(
    ("flag", "expected"), [("--version", "pgproxy "), ("-V", "pgproxy "), ("--help", "-q")]
)
def test_pgbouncer_flags(flag: str, expected: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pgproxy", flag],
        capture_output=True, text=True, timeout=30, cwd=REPO_ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert expected in result.stdout
