"""Scale checks: many idle clients, and a burst of clients against a small pool.

    .venv/bin/python bench/scale.py [--idle 10000] [--burst 2000] [--workers 1]

Starts a throwaway PostgreSQL and pgproxy (transaction mode, pool_size 20), then:

1. idle: opens ``--idle`` client connections that log in and stay idle, while one other
   client runs `select 1` transactions in a loop; reports pgproxy's RSS (all its
   processes) before and after, the bytes per idle client, and the longest transaction
   the running client saw while the idle ones connected (does accepting them stall it?).
2. burst: ``--burst`` clients connect at once and each runs `select pg_sleep(0.05)`;
   reports how many were served and how many refused (and with which error), and the
   most server connections pg_stat_activity showed (sampled every 10 ms): never above
   pool_size (x workers never: the cap is global).

Client sockets are raw asyncio streams speaking just the startup exchange and simple
queries, so that the load generator itself stays small. The script raises its own open
files limit to the hard limit; pgproxy raises its own at start.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import resource
import struct
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from pathlib import Path

import psycopg

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.run import child_pids  # noqa: E402
from pgproxy.embedded import EmbeddedPostgres, free_port  # noqa: E402
from pgproxy.protocol import messages  # noqa: E402

POOL_SIZE = 20


def rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` and its children (pgproxy's workers)."""
    total = 0
    for one in [pid, *child_pids(pid)]:
        try:
            for line in Path(f"/proc/{one}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


async def read_message(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    header = await reader.readexactly(5)
    length = struct.unpack("!I", header[1:])[0]
    return header[:1], await reader.readexactly(length - 4)


async def until_ready(reader: asyncio.StreamReader) -> str | None:
    """Read up to ReadyForQuery; the error message if an ErrorResponse came first."""
    error = None
    while True:
        kind, payload = await read_message(reader)
        if kind == b"E":
            fields = messages.parse_error_fields(payload)
            error = fields.get("M", "error")
            if fields.get("S") == "FATAL":
                return error
        if kind == b"Z":
            return error


async def login(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, str | None]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(messages.startup_message({"user": "app", "database": "appdb"}))
    try:
        error = await until_ready(reader)
    except asyncio.IncompleteReadError:
        error = "connection closed"
    return reader, writer, error


def start(
    pg: EmbeddedPostgres, workdir: Path, workers: int, max_clients: int
) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    config = workdir / "pgproxy.toml"
    config.write_text(
        f'listen_addr = "127.0.0.1"\nlisten_port = {port}\npool_mode = "transaction"\n'
        f"default_pool_size = {POOL_SIZE}\nmax_client_conn = {max_clients}\nworkers = {workers}\n"
        "metrics_port = 0\n"
        f'[databases.appdb]\nhost = "127.0.0.1"\nport = {pg.port}\nuser = "app"\n'
        'password = "app-secret"\n'
    )
    log = open(workdir / "pgproxy.log", "wb")  # noqa: SIM115
    process = subprocess.Popen(
        [sys.executable, "-m", "pgproxy", "-c", str(config)], stdout=log, stderr=log, cwd=REPO
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with psycopg.connect(host="127.0.0.1", port=port, dbname="appdb", user="app"):
                return process, port
        except psycopg.OperationalError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("pgproxy did not start")


def busy_client(
    port: int, measuring: Event, stop: Event, results: Queue[tuple[int, float]]
) -> None:
    """Run `select 1` in a loop (its own process: the logins' load generator must not
    delay it); from ``measuring`` on, count the transactions and keep the slowest."""
    with psycopg.connect(host="127.0.0.1", port=port, dbname="appdb", user="app") as conn:
        conn.autocommit = True
        done, slowest = 0, 0.0
        while not stop.is_set():
            started = time.monotonic()
            conn.execute("select 1")
            if measuring.is_set():
                slowest = max(slowest, time.monotonic() - started)
                done += 1
    results.put((done, slowest))


async def idle_run(pid: int, port: int, count: int) -> None:
    context = multiprocessing.get_context("spawn")
    measuring, stop = context.Event(), context.Event()
    results: Queue[tuple[int, float]] = context.Queue()
    busy = context.Process(target=busy_client, args=(port, measuring, stop, results))
    busy.start()
    await asyncio.sleep(2)  # (spawned: the interpreter starts and logs in)
    measuring.set()
    before = rss_bytes(pid)
    started = time.monotonic()
    connections = []
    refused: dict[str, int] = {}
    for first in range(0, count, 500):  # in waves, to stay under the listen backlog
        wave = await asyncio.gather(
            *(login(port) for _ in range(first, min(first + 500, count))), return_exceptions=True
        )
        for item in wave:
            if isinstance(item, BaseException):
                refused[type(item).__name__] = refused.get(type(item).__name__, 0) + 1
            elif item[2] is not None:
                refused[item[2]] = refused.get(item[2], 0) + 1
                item[1].close()
            else:
                connections.append(item)
    took = time.monotonic() - started
    await asyncio.sleep(2)
    after = rss_bytes(pid)
    stop.set()
    done, slowest = results.get(timeout=30)
    busy.join(30)
    held = len(connections)
    print(f"idle: {held} of {count} clients logged in and held in {took:.1f} s; refused: {refused}")
    print(
        f"idle: pgproxy RSS {before / 2**20:.1f} MB before, {after / 2**20:.1f} MB with them "
        f"= {(after - before) / max(held, 1):.0f} bytes per idle client"
    )
    print(
        f"idle: the running client (its own process) did {done} transactions meanwhile, "
        f"the slowest {slowest * 1000:.1f} ms"
    )
    for _, writer, _ in connections:
        writer.close()


async def burst_run(pg: EmbeddedPostgres, port: int, count: int) -> None:
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        with psycopg.connect(pg.superuser_dsn("postgres"), autocommit=True) as superuser:
            while not stop.is_set():
                row = superuser.execute(
                    "select count(*) from pg_stat_activity where usename = 'app'"
                ).fetchone()
                peak[0] = max(peak[0], int(row[0]) if row else 0)
                time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()

    async def one() -> str:
        try:
            reader, writer, error = await login(port)
        except OSError as exc:
            return f"connect: {exc.strerror or exc}"
        if error is not None:
            writer.close()
            return error
        writer.write(messages.query("select pg_sleep(0.05)"))
        error = await until_ready(reader)
        writer.close()
        return error or "served"

    started = time.monotonic()
    outcomes: dict[str, int] = {}
    for outcome in await asyncio.gather(*(one() for _ in range(count))):
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    took = time.monotonic() - started
    stop.set()
    sampler.join()
    print(f"burst: {count} clients in {took:.1f} s: {outcomes}")
    print(
        f"burst: most server connections seen in pg_stat_activity: {peak[0]} "
        f"(pool_size {POOL_SIZE})"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idle", type=int, default=10_000)
    parser.add_argument("--burst", type=int, default=2_000)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with tempfile.TemporaryDirectory(prefix="pgproxy-scale-") as tmp:
        pg = EmbeddedPostgres(extra_conf={"max_connections": "200"})
        pg.start()
        process = None
        try:
            pg.create_role("app", "app-secret")
            pg.create_database("appdb", owner="app")
            limit = args.idle + args.burst + 100
            process, port = start(pg, Path(tmp), args.workers, limit)
            print(f"pgproxy workers={args.workers}, pool_size {POOL_SIZE}, max_client_conn {limit}")
            if args.idle:
                asyncio.run(idle_run(process.pid, port, args.idle))
            if args.burst:
                asyncio.run(burst_run(pg, port, args.burst))
        finally:
            if process is not None:
                process.terminate()
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()
            pg.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
