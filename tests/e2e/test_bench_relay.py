"""bench/relay.py, the floor the benchmark compares pgproxy with, really relays: several
processes accept on one port, each session reaches PostgreSQL, a server outlives its
session, SIGTERM stops them all."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg

from bench.run import child_pids
from pgproxy.embedded import EmbeddedPostgres, free_port, pid_running

RELAY = Path(__file__).resolve().parents[2] / "bench" / "relay.py"


def test_relay_serves_sessions_from_every_process(pg: EmbeddedPostgres) -> None:
    port = free_port()
    relay = subprocess.Popen(
        [sys.executable, str(RELAY), "--port", str(port), "--server-port", str(pg.port),
         "--processes", "2"],
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        children: set[int] = set()
        while time.monotonic() < deadline and len(children) < 1:
            children = set(child_pids(relay.pid))
            time.sleep(0.05)
        assert len(children) == 1, "the relay did not fork its second process"
        dsn = f"host=127.0.0.1 port={port} dbname=appdb user=app password=app-secret"
        backends: list[int] = []
        for _ in range(100):  # bounded: twenty sessions, one after the other
            try:
                with psycopg.connect(dsn, connect_timeout=5) as conn:
                    row = conn.execute("SELECT pg_backend_pid(), 6 * 7").fetchone()
            except psycopg.OperationalError:
                time.sleep(0.1)  # the second process may not be listening yet
                continue
            assert row is not None and row[1] == 42
            backends.append(row[0])
            if len(backends) >= 20:
                break
        assert len(backends) >= 20
        # A server outlives its session: each process keeps its one for the next client.
        assert 1 <= len(set(backends)) <= 2, backends
        # Sessions at the same time each get their own server.
        with psycopg.connect(dsn) as first, psycopg.connect(dsn) as second:
            one = first.execute("SELECT pg_backend_pid()").fetchone()
            other = second.execute("SELECT pg_backend_pid()").fetchone()
        assert one is not None and other is not None and one[0] != other[0]
        # Which process accepted is the kernel's choice; both must be listening.
        listening = subprocess.run(
            ["ss", "-ltnpH", f"sport = :{port}"], capture_output=True, text=True, check=True
        ).stdout
        assert f"pid={relay.pid}," in listening
        assert all(f"pid={child}," in listening for child in children), listening
    finally:
        relay.send_signal(signal.SIGTERM)
        try:
            status = relay.wait(15)
        except subprocess.TimeoutExpired:
            for pid in (relay.pid, *children):  # never leave a process behind
                if pid_running(pid):
                    os.kill(pid, signal.SIGKILL)
            relay.wait(5)
            raise
    assert status == 0
    assert not any(pid_running(child) for child in children)
