"""Two pgproxy processes on one port (so_reuseport): cancel requests reach the process that
issued the key wherever they land (peering), and a restart drops no client."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
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
from tests.support import ProxyProcess, free_port, launch_proxy, proxy_config, wait_for


class Group:
    """Processes sharing one TCP port, each with its own Unix socket directory."""

    def __init__(self, pg: EmbeddedPostgres) -> None:
        self.pg = pg
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="pgproxy-peers-"))
        self.processes: dict[int, ProxyProcess] = {}

    def socket_dir(self, peer_id: int) -> Path:
        path = self.root / f"peer{peer_id}"
        path.mkdir(exist_ok=True)
        return path

    def start(self, peer_id: int, peers: tuple[int, ...] = (1, 2)) -> ProxyProcess:
        config = proxy_config(
            self.pg,
            listen_port=self.port,
            so_reuseport=True,
            peer_id=peer_id,
            unix_socket_dir=str(self.socket_dir(peer_id)),
            peers={str(peer): {"host": str(self.socket_dir(peer)), "port": self.port}
                   for peer in peers},
        )  # fmt: skip
        workdir = self.root / f"work{peer_id}"
        workdir.mkdir()
        (workdir / "pgproxy.toml").write_text(tomli_w.dumps(config))
        process = launch_proxy(workdir, ["-c", str(workdir / "pgproxy.toml")], self.port, config)
        self.processes[peer_id] = process
        # The shared port may answer already (another process): wait for this one's socket.
        wait_for(lambda: self._answers(peer_id), 20, f"peer {peer_id} on its socket")
        return process

    def _answers(self, peer_id: int) -> bool:
        try:
            with psycopg.connect(**self.via_socket(peer_id), connect_timeout=2):
                return True
        except psycopg.OperationalError:
            return False

    def via_socket(self, peer_id: int) -> dict[str, Any]:
        return {"host": str(self.socket_dir(peer_id)), "port": self.port,
                "dbname": "appdb", "user": "app"}  # fmt: skip

    def close(self) -> None:
        for process in self.processes.values():
            process.cleanup()


@pytest.fixture
def group(pg: EmbeddedPostgres) -> Any:
    processes = Group(pg)
    yield processes
    processes.close()


def _send_cancel(socket_dir: Path, port: int, process_id: int, secret: bytes) -> None:
    import socket

    with socket.socket(socket.AF_UNIX) as raw:
        raw.settimeout(5)
        raw.connect(str(socket_dir / f".s.PGSQL.{port}"))
        raw.sendall(messages.cancel_request(process_id, secret))
        raw.recv(16)


def _long_query_cancelled_via(group: Group, owner: int, via: Path | None) -> None:
    """A client of ``owner`` runs pg_sleep(30); its key is sent to ``via`` (a process's
    socket) or to the shared TCP port (None): the query must end cancelled."""
    import socket

    with RawClient(group.port) as client:
        client.sock.close()
        client.sock = socket.socket(socket.AF_UNIX)
        client.sock.settimeout(10)
        client.sock.connect(str(group.socket_dir(owner) / f".s.PGSQL.{group.port}"))
        welcome = client.login()
        key = next(payload for kind, payload in welcome if kind == b"K")
        process_id, secret = int.from_bytes(key[:4], "big"), key[4:]
        client.send(messages.query("select pg_sleep(30)"))
        time.sleep(0.3)
        started = time.monotonic()
        if via is None:
            with socket.create_connection(("127.0.0.1", group.port), timeout=5) as raw:
                raw.sendall(messages.cancel_request(process_id, secret))
                raw.recv(16)
        else:
            _send_cancel(via, group.port, process_id, secret)
        replies = client.read_until(b"Z", timeout=10, errors_ok=True)
        errors = [error_fields(payload) for kind, payload in replies if kind == b"E"]
        assert errors and errors[0]["C"] == "57014", replies
        assert time.monotonic() - started < 10


def test_cancel_requests_reach_the_issuing_process(group: Group) -> None:
    group.start(1)
    group.start(2)
    # The console shows the group (the process's own entry left out, as PgBouncer).
    with psycopg.connect(
        host=str(group.socket_dir(1)), port=group.port, dbname="pgbouncer", user="pgbouncer",
        autocommit=True,
    ) as console:  # fmt: skip
        peers = console.execute("show peers").fetchall()
        assert peers == [(2, str(group.socket_dir(2)), group.port, 0)]
        lists = dict(console.execute("show lists").fetchall())
        assert lists["peers"] == 1
    for owner, other in ((1, 2), (2, 1)):
        _long_query_cancelled_via(group, owner, group.socket_dir(other))  # forwarded
        _long_query_cancelled_via(group, owner, group.socket_dir(owner))  # direct
        _long_query_cancelled_via(group, owner, None)  # whichever gets the TCP connection
    # A key naming a peer nobody configured, or forwarded too often, cancels nothing.
    with psycopg.connect(**group.via_socket(1), autocommit=True) as conn:
        timer = threading.Timer(
            0.3, _send_cancel, (group.socket_dir(2), group.port, (9 << 16) | 1, b"abcd")
        )
        timer.start()
        assert conn.execute("select pg_sleep(1), 1").fetchone() == ("", 1)
        timer.join()


def _reset_while_queued(exc: psycopg.Error) -> bool:
    """A connection attempt reset before login (not a session dropped)."""
    text = str(exc)
    return text.startswith("connection failed") and (
        "Connection reset by peer" in text or "closed the connection unexpectedly" in text
    )


def _refused_on_socket(group: Group) -> bool:
    try:
        psycopg.connect(**group.via_socket(1), connect_timeout=2).close()
    except psycopg.OperationalError as exc:
        assert "pooler is shutting down" in str(exc), str(exc)
        return True
    return False


def test_restart_on_the_same_port_drops_no_client(pg: EmbeddedPostgres, group: Group) -> None:
    old = group.start(1)
    env = {**os.environ, "PGPASSWORD": "app-secret"}
    script = group.root / "select.sql"
    script.write_text("select 1;\n")
    bench = subprocess.Popen(
        [os.path.join(pg.bindir, "pgbench"), "-n", "-f", str(script), "-c", "4", "-j", "2",
         "-T", "8",
         "-h", "127.0.0.1", "-p", str(group.port), "-U", "app", "appdb"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    failures: list[str] = []
    resets = [0]  # connection attempts the kernel had queued on the closing listener
    served = [0]
    stop = threading.Event()

    def reconnecting() -> None:  # a client that connects anew for every query
        while not stop.is_set():
            try:
                with psycopg.connect(
                    host="127.0.0.1", port=group.port, dbname="appdb", user="app",
                    connect_timeout=5, autocommit=True,
                ) as conn:  # fmt: skip
                    conn.execute("select 1")
                    served[0] += 1
            except psycopg.Error as exc:
                if _reset_while_queued(exc):
                    resets[0] += 1
                else:
                    failures.append(str(exc))
            time.sleep(0.02)

    worker = threading.Thread(target=reconnecting)
    worker.start()
    try:
        time.sleep(2)
        group.start(2)  # the new process, on the same port
        os.kill(old.pid, signal.SIGTERM)  # the old one stops listening and drains
        # Its Unix socket stays open, for the console only (as PgBouncer's).
        wait_for(lambda: _refused_on_socket(group), 10, "logins refused on the old socket")
        with psycopg.connect(
            host=str(group.socket_dir(1)), port=group.port, dbname="pgbouncer",
            user="pgbouncer", autocommit=True,
        ) as console:  # fmt: skip
            assert console.execute("show version").fetchone() is not None
        stdout, stderr = bench.communicate(timeout=60)
        old.popen.wait(timeout=30)  # gone once pgbench's clients have left
        before = served[0]
        wait_for(lambda: served[0] > before + 5, 10, "reconnecting clients served by the new")
    finally:
        stop.set()
        worker.join(timeout=30)
        if bench.poll() is None:
            bench.kill()
            bench.wait(10)
    assert bench.returncode == 0, stdout + stderr
    assert "number of failed transactions: 0" in stdout
    assert old.popen.returncode == 0
    assert not failures, failures[:3]
    # A connection queued on the old listener at the instant it closes is reset (docs/operations.md:
    # net.ipv4.tcp_migrate_req); that is at most the one or two in flight then.
    assert resets[0] <= 2, resets[0]
    assert group.processes[2].alive()
