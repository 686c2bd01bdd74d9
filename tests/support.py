"""Reusable test helpers (not fixtures): run the proxy as a subprocess, build its config, psql.

Test modules import these with ``from tests.support import ...``; the fixtures that use them
live in ``tests/conftest.py``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import tomli_w

from pgproxy.embedded import EmbeddedPostgres, find_pg_bindir, free_port

REPO_ROOT = Path(__file__).resolve().parent.parent

#: Every password the tests use: none may ever appear in a proxy's log.
TEST_SECRETS = (
    "app-secret", "md5-secret", "plain-secret", "life-secret", "client-secret",
    "authq-secret", "authfn-secret", "expired-secret", "ctl-secret", "mux-secret",
    "cached-old", "cached-new",
)  # fmt: skip
#: Filled by ProxyProcess.cleanup; conftest fails the session if anything lands here.
LEAKED_SECRETS: list[str] = []

#: How long start_proxy waits for the listening port.
PROXY_START_TIMEOUT = 15.0
#: How long stop() waits for the proxy to exit before SIGKILL.
PROXY_STOP_TIMEOUT = 10.0

# libpq variables that must not leak from the developer's shell into the tests.
_PG_ENV_VARS = frozenset(
    {
        "PGHOST",
        "PGHOSTADDR",
        "PGPORT",
        "PGDATABASE",
        "PGUSER",
        "PGPASSWORD",
        "PGPASSFILE",
        "PGSERVICE",
        "PGSERVICEFILE",
        "PGOPTIONS",
        "PGSSLMODE",
        "PGREQUIRESSL",
        "PGCONNECT_TIMEOUT",
        "PGTARGETSESSIONATTRS",
        "PGCLIENTENCODING",
        "PSQLRC",
    }
)


def _conninfo_value(value: object) -> str:
    text = str(value)
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def conninfo(**params: object) -> str:
    """Build a libpq ``key=value`` conninfo string, quoting every value."""
    return " ".join(f"{k}={_conninfo_value(v)}" for k, v in params.items() if v is not None)


def _drop_none(value: Any) -> Any:
    """TOML has no null: remove None values (so an override of None deletes a key)."""
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [_drop_none(v) for v in value if v is not None]
    return value


def _tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


class ProxyProcess:
    """A pgproxy started as ``python -m pgproxy -c <config.toml>`` in its own temp dir."""

    def __init__(
        self,
        popen: subprocess.Popen[bytes],
        *,
        port: int,
        config: dict[str, Any],
        workdir: Path,
        config_path: Path,
        log_path: Path,
    ) -> None:
        self.popen = popen
        self.port = port
        self.pid = popen.pid
        self.config = config
        self.workdir = workdir
        self.config_path = config_path
        self.log_path = log_path
        self.returncode: int | None = None

    def __repr__(self) -> str:
        state = "alive" if self.alive() else f"exited {self.popen.returncode}"
        return f"<ProxyProcess pid={self.pid} port={self.port} {state}>"

    def log_text(self) -> str:
        """Everything the proxy wrote to stdout/stderr so far."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        """The last ``lines`` lines of the proxy's output."""
        return _tail(self.log_text(), lines)

    def dsn(self, dbname: str = "appdb", user: str = "app", **extra: object) -> str:
        """libpq conninfo to reach ``dbname`` through this proxy; ``extra`` adds keys."""
        return conninfo(host="127.0.0.1", port=self.port, dbname=dbname, user=user, **extra)

    def alive(self) -> bool:
        """Whether the proxy process is still running."""
        return self.popen.poll() is None

    def stop(self, timeout: float = PROXY_STOP_TIMEOUT) -> int | None:
        """SIGINT (shut down once no server is in use), then SIGQUIT (now) after half of
        ``timeout`` seconds, then SIGKILL. Idempotent. Returns the exit code."""
        for signum, wait in ((signal.SIGINT, timeout / 2), (signal.SIGQUIT, timeout / 2)):
            if self.popen.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(wait)
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            self.popen.wait(10)
        self.returncode = self.popen.returncode
        return self.returncode

    def cleanup(self) -> None:
        """Stop the proxy, check its whole log for test passwords, remove its temp dir."""
        self.stop()
        text = self.log_text()
        LEAKED_SECRETS.extend(
            f"{self.workdir}: {secret!r}" for secret in TEST_SECRETS if secret in text
        )
        shutil.rmtree(self.workdir, ignore_errors=True)


def port_open(port: int) -> bool:
    """Whether 127.0.0.1:``port`` accepts a TCP connection now."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def start_proxy(config: dict[str, Any], *, timeout: float = PROXY_START_TIMEOUT) -> ProxyProcess:
    """Write ``config`` as TOML, launch the proxy on it and wait until its port accepts TCP.

    Raises:
        RuntimeError: the process exited, or the port did not open within ``timeout`` seconds
            (the message holds the tail of the proxy's output).
    """
    workdir = Path(tempfile.mkdtemp(prefix="pgproxy-test-"))
    config_path = workdir / "pgproxy.toml"
    config_path.write_text(tomli_w.dumps(_drop_none(config)), encoding="utf-8")
    return launch_proxy(
        workdir, ["-c", str(config_path)], int(config["listen_port"]), config, timeout=timeout
    )


def launch_proxy(
    workdir: Path,
    args: list[str],
    port: int,
    config: dict[str, Any],
    *,
    timeout: float = PROXY_START_TIMEOUT,
) -> ProxyProcess:
    """Run ``python -m pgproxy *args`` (output to ``workdir``/pgproxy.log, which the
    returned process owns) and wait until 127.0.0.1:``port`` accepts TCP."""
    config_path = workdir / "pgproxy.toml"
    log_path = workdir / "pgproxy.log"
    env = {k: v for k, v in os.environ.items() if k not in _PG_ENV_VARS}
    env["PYTHONUNBUFFERED"] = "1"
    with open(log_path, "wb") as log:
        popen = subprocess.Popen(
            [sys.executable, "-m", "pgproxy", *args],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            env=env,
        )
    proc = ProxyProcess(
        popen,
        port=port,
        config=config,
        workdir=workdir,
        config_path=config_path,
        log_path=log_path,
    )
    deadline = time.monotonic() + timeout
    try:
        while True:
            if popen.poll() is not None:
                raise RuntimeError(
                    f"pgproxy exited with code {popen.returncode} before listening on "
                    f"127.0.0.1:{port}; output:\n{proc.log_tail()}"
                )
            if port_open(port):
                return proc
            if time.monotonic() >= deadline:
                proc.stop()
                raise RuntimeError(
                    f"pgproxy did not listen on 127.0.0.1:{port} within {timeout:g}s; "
                    f"output:\n{proc.log_tail()}"
                )
            time.sleep(0.05)
    except BaseException:
        proc.cleanup()  # the output is in the message; nobody else holds this process
        raise


class ProxyFactory:
    """Callable that starts proxies (see :func:`start_proxy`) and cleans them all up."""

    def __init__(self) -> None:
        self.started: list[ProxyProcess] = []

    def __call__(
        self, config: dict[str, Any], *, timeout: float = PROXY_START_TIMEOUT
    ) -> ProxyProcess:
        """Start a proxy with ``config``; it is stopped by :meth:`close`."""
        proc = start_proxy(config, timeout=timeout)
        self.started.append(proc)
        return proc

    def close(self) -> None:
        """Stop every proxy this factory started and remove their temp dirs."""
        while self.started:
            self.started.pop().cleanup()


def proxy_config(pg: EmbeddedPostgres, **overrides: Any) -> dict[str, Any]:
    """The default test config for a proxy in front of ``pg``'s ``appdb``.

    ``overrides`` replace top-level keys (a given ``databases`` replaces the default one);
    an override of ``None`` removes the key.
    """
    config: dict[str, Any] = {
        "listen_addr": "127.0.0.1",
        "listen_port": free_port(),
        "pool_mode": "transaction",
        "default_pool_size": 5,
        # Many proxies run at once: no metrics listener unless a test asks for one.
        "metrics_port": 0,
        "databases": {
            "appdb": {
                "host": "127.0.0.1",
                "port": pg.port,
                "user": "app",
                "password": "app-secret",
            }
        },
    }
    config.update(overrides)
    return {k: v for k, v in config.items() if v is not None}


def psql(
    args: list[str],
    *,
    port: int,
    dbname: str = "appdb",
    user: str = "app",
    input: str | None = None,
    password: str | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    """Run ``psql -X -w -h 127.0.0.1 -p port -U user -d dbname *args`` and capture its output.

    ``-w`` makes psql fail rather than prompt when a password is needed; pass ``password``
    (sent as PGPASSWORD) or put it in ``env``. Does not raise on a non-zero exit.
    """
    full_env = {k: v for k, v in os.environ.items() if k not in _PG_ENV_VARS}
    full_env["PGCONNECT_TIMEOUT"] = "10"
    if password is not None:
        full_env["PGPASSWORD"] = password
    if env:
        full_env.update(env)
    argv = [
        os.path.join(find_pg_bindir(), "psql"),
        "-X", "-w", "-h", "127.0.0.1", "-p", str(port), "-U", user, "-d", dbname,
        *args,
    ]  # fmt: skip
    return subprocess.run(
        argv,
        input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        check=False,
    )


def connect(proxy: ProxyProcess, **kwargs: Any) -> psycopg.Connection[Any]:
    """A psycopg connection through ``proxy`` (autocommit, 10 s connect timeout by default);
    ``dbname`` and ``user`` go into the DSN, everything else to ``psycopg.connect``."""
    dsn_keys = {key: kwargs.pop(key) for key in ("dbname", "user") if key in kwargs}
    kwargs.setdefault("autocommit", True)
    kwargs.setdefault("connect_timeout", 10)
    return psycopg.connect(proxy.dsn(**dsn_keys), **kwargs)


def assert_healthy(proxy: ProxyProcess, **dsn: Any) -> None:
    """The daemon runs and a fresh psycopg connection answers ``select 1``."""
    assert proxy.alive(), f"pgproxy died; log:\n{proxy.log_tail()}"
    with connect(proxy, **dsn) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    assert proxy.alive(), f"pgproxy died; log:\n{proxy.log_tail()}"


def wait_for(condition: Callable[[], bool], seconds: float, what: str) -> None:
    """Poll ``condition`` every 50 ms until it holds; fail naming ``what`` after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


class Peak:
    """The largest value ``sample()`` returned while the ``with`` block ran.

    ``sample`` is called every ``interval`` seconds in a thread (a psycopg connection may be
    shared with it: psycopg connections are thread-safe).
    """

    def __init__(self, sample: Callable[[], int], interval: float = 0.01) -> None:
        self._sample = sample
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)
        self.value = 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.value = max(self.value, self._sample())
            time.sleep(self._interval)

    def __enter__(self) -> Peak:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(10)


class BackgroundQuery:
    """``conn.execute(sql)`` in a thread; ``errors`` holds the psycopg error it raised, if any."""

    def __init__(self, conn: psycopg.Connection[Any], sql: str) -> None:
        self.errors: list[psycopg.Error] = []
        self._thread = threading.Thread(target=self._run, args=(conn, sql))
        self._thread.start()

    def _run(self, conn: psycopg.Connection[Any], sql: str) -> None:
        try:
            conn.execute(sql.encode())
        except psycopg.Error as exc:
            self.errors.append(exc)

    def join(self, timeout: float) -> None:
        """Wait for the query to end (at most ``timeout`` seconds)."""
        self._thread.join(timeout)
