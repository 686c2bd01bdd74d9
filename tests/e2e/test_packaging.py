"""The container's entrypoint and health check, run outside a container (no Docker daemon
here): pgproxy configured by the environment alone, as `docker run -e ...` would."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psycopg

from pgproxy.embedded import EmbeddedPostgres
from tests.support import REPO_ROOT, free_port, wait_for
from tests.test_deploy_packaging import healthcheck_command

ENTRYPOINT = REPO_ROOT / "deploy" / "container" / "entrypoint.sh"


def _port_open(port: int) -> bool:
    try:
        with psycopg.connect(
            host="127.0.0.1", port=port, dbname="appdb", user="app", connect_timeout=1
        ):
            return True
    except psycopg.OperationalError:
        return False


def test_entrypoint_with_an_environment_only_config(pg: EmbeddedPostgres, tmp_path: Path) -> None:
    port, metrics_port = free_port(), free_port()
    databases = {
        "appdb": {"host": "127.0.0.1", "port": pg.port, "user": "app", "password": "app-secret"}
    }
    env = {
        "PATH": f"{REPO_ROOT / '.venv' / 'bin'}:{os.environ['PATH']}",
        # No file at the config path: the environment alone configures pgproxy.
        "PGPROXY_CONFIG_FILE": str(tmp_path / "absent.toml"),
        # What the image sets, with free ports instead of 6432 and 9433.
        "PGPROXY_LISTEN_ADDR": "127.0.0.1",
        "PGPROXY_METRICS_ADDR": "127.0.0.1",
        "PGPROXY_LISTEN_PORT": str(port),
        "PGPROXY_METRICS_PORT": str(metrics_port),
        "PGPROXY_POOL_MODE": "transaction",
        "PGPROXY_DATABASES": json.dumps(databases),
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    log = tmp_path / "entrypoint.log"
    with open(log, "wb") as output:
        process = subprocess.Popen(
            ["sh", str(ENTRYPOINT)], env=env, stdout=output, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, cwd=tmp_path,
        )  # fmt: skip
    try:
        wait_for(lambda: process.poll() is not None or _port_open(port), 20, "pgproxy listening")
        assert process.poll() is None, log.read_text()
        with psycopg.connect(
            host="127.0.0.1", port=port, dbname="appdb", user="app", autocommit=True
        ) as conn:
            assert conn.execute("select current_setting('application_name') is not null")
        # The image's HEALTHCHECK command, pointed at this instance's metrics port.
        command = [part.replace(":9433/", f":{metrics_port}/") for part in healthcheck_command()]
        command[0] = str(REPO_ROOT / ".venv" / "bin" / "python")
        assert subprocess.run(command, timeout=10).returncode == 0
        # STOPSIGNAL SIGTERM: no client left, so pgproxy exits at once, cleanly.
        os.kill(process.pid, signal.SIGTERM)
        started = time.monotonic()
        assert process.wait(timeout=15) == 0, log.read_text()
        assert time.monotonic() - started < 15
        assert "app-secret" not in log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
