"""Login flood: unauthenticated clients that only start SCRAM exchanges, and a victim client.

    .venv/bin/python bench/login_flood.py [--threads 6] [--duration 5] [--samples 200]
                                          [--kinds scram,unknown,plain]

Starts a throwaway PostgreSQL and pgproxy (``auth_type = scram-sha-256``; an auth_file with
``app``'s SCRAM verifier copied from pg_authid and ``plainuser`` with a plain password;
transaction pooling, otherwise the defaults). Then, for each kind of user name the flood
uses (``scram``: app, ``unknown``: a name pgproxy does not know, ``plain``: plainuser):

1. flood: ``--threads`` threads, in a process of their own (so that the victim's timings do
   not share their interpreter), each open connection after connection for ``--duration``
   seconds and send a StartupMessage and a SASLInitialResponse (SCRAM-SHA-256
   client-first) at once, read up to the server-first message (SASLContinue) and reset the
   connection. Meanwhile the victim, a psycopg connection logged in beforehand, runs
   ``select 1`` every 2 ms. Reported: exchanges/s, and the victim's latency p50/p99
   (also measured once without any flood, first).
2. failed exchanges: ``--samples`` whole exchanges per kind, the kinds taken in turn, each a
   new connection that sends a client-final message with a wrong proof and reads the FATAL
   error; reported: the p50 time from connect to the error, and whether the salt was the
   same in every attempt (it should be, for every kind: a salt that changes, or differs
   between kinds in how it behaves, tells which user names exist).

Every loop is bounded by a deadline or a count; PostgreSQL, pgproxy and the flood process are
stopped at the end, on error and on Ctrl-C.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import multiprocessing
import os
import secrets
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing.queues import Queue
from pathlib import Path

import psycopg

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pgproxy.embedded import EmbeddedPostgres, free_port  # noqa: E402
from pgproxy.protocol import messages  # noqa: E402

KINDS = {"scram": "app", "unknown": "nobody", "plain": "plainuser"}
_INT32 = struct.Struct("!i")
AUTH_SASL_CONTINUE = 11
#: Seconds any one socket operation may take.
SOCKET_TIMEOUT = 5.0


def sasl_initial_response(client_first: bytes) -> bytes:
    """SASLInitialResponse ('p'): mechanism name, int32 length, client-first message."""
    body = b"SCRAM-SHA-256\0" + _INT32.pack(len(client_first)) + client_first
    return b"p" + _INT32.pack(4 + len(body)) + body


def opening(user: str) -> tuple[bytes, str]:
    """A StartupMessage and SASLInitialResponse for ``user``, and the client-first-bare."""
    nonce = base64.b64encode(secrets.token_bytes(18)).decode()
    bare = f"n=,r={nonce}"
    startup = messages.startup_message({"user": user, "database": "appdb"})
    return startup + sasl_initial_response(f"n,,{bare}".encode()), bare


class Reader:
    """Backend messages from a blocking socket, every read bounded by ``deadline``."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline
        self.buffer = bytearray()

    def message(self) -> tuple[bytes, bytes] | None:
        """(type byte, payload), or None if the connection closed or the deadline passed."""
        while True:
            if len(self.buffer) >= 5:
                length = _INT32.unpack_from(self.buffer, 1)[0]
                if len(self.buffer) >= 1 + length:
                    message = bytes(self.buffer[:1]), bytes(self.buffer[5 : 1 + length])
                    del self.buffer[: 1 + length]
                    return message
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                return None
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except OSError:  # (TimeoutError included)
                return None
            if not chunk:
                return None
            self.buffer += chunk


def server_first(reader: Reader) -> str | None:
    """Read up to SASLContinue; its server-first message, or None (an error, a close)."""
    for _ in range(10):  # AuthenticationSASL, then SASLContinue
        message = reader.message()
        if message is None or message[0] != b"R":
            return None
        if _INT32.unpack_from(message[1], 0)[0] == AUTH_SASL_CONTINUE:
            return message[1][4:].decode()
    return None


def reset(sock: socket.socket) -> None:
    """Close with a TCP reset: no TIME_WAIT left behind on this side for each attempt."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def flood_thread(port: int, user: str, until: float, counts: list[int]) -> None:
    """Start SCRAM exchanges until ``until``; counts[0] += done, counts[1] += failed."""
    done = failed = 0
    while time.monotonic() < until:
        packet, _ = opening(user)
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT)
        except OSError:
            failed += 1
            time.sleep(0.01)
            continue
        try:
            sock.sendall(packet)
            reply = server_first(Reader(sock, time.monotonic() + SOCKET_TIMEOUT))
        except OSError:
            reply = None
        finally:
            reset(sock)
        if reply is None:
            failed += 1
        else:
            done += 1
    counts[0] += done  # (list += under the GIL: each thread adds once, at its end)
    counts[1] += failed


def flood(port: int, user: str, threads: int, duration: float, out: Queue[tuple[int, int]]) -> None:
    """The flood process: ``threads`` threads for ``duration`` seconds; (done, failed) to
    ``out``."""
    counts = [0, 0]
    until = time.monotonic() + duration
    workers = [
        threading.Thread(target=flood_thread, args=(port, user, until, counts))
        for _ in range(threads)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(duration + 2 * SOCKET_TIMEOUT + 5)
    out.put((counts[0], counts[1]))


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def victim_latencies(conn: psycopg.Connection[tuple[int]], seconds: float) -> list[float]:
    """`select 1` every 2 ms for ``seconds``: each one's latency in ms."""
    latencies: list[float] = []
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        started = time.perf_counter()
        conn.execute("select 1").fetchone()
        latencies.append((time.perf_counter() - started) * 1000)
        time.sleep(0.002)
    return latencies


def flood_run(
    port: int, conn: psycopg.Connection[tuple[int]], user: str, threads: int, duration: float
) -> tuple[float, list[float], int]:
    """(exchanges/s, the victim's latencies during the flood, failed attempts)."""
    context = multiprocessing.get_context("spawn")
    out: Queue[tuple[int, int]] = context.Queue()
    process = context.Process(target=flood, args=(port, user, threads, duration + 0.5, out))
    process.start()
    try:
        time.sleep(0.5)  # (the spawned interpreter starts and the flood begins)
        latencies = victim_latencies(conn, duration)
        done, failed = out.get(timeout=duration + 3 * SOCKET_TIMEOUT + 30)
    finally:
        process.join(10)
        if process.is_alive():
            process.kill()
            process.join(10)
    return done / (duration + 0.5), latencies, failed


def failed_exchange(port: int, user: str) -> tuple[float, str]:
    """One whole exchange with a wrong proof: (ms from connect to the FATAL, the salt)."""
    packet, _ = opening(user)
    started = time.perf_counter()
    sock = socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT)
    try:
        sock.sendall(packet)
        reader = Reader(sock, time.monotonic() + SOCKET_TIMEOUT)
        first = server_first(reader)
        if first is None:
            raise RuntimeError(f"no server-first message for {user}")
        attributes = dict(part.split("=", 1) for part in first.split(","))
        proof = base64.b64encode(secrets.token_bytes(32)).decode()
        final = f"c=biws,r={attributes['r']},p={proof}".encode()
        sock.sendall(b"p" + _INT32.pack(4 + len(final)) + final)
        message = reader.message()
        took = (time.perf_counter() - started) * 1000
    finally:
        reset(sock)
    if message is None or message[0] != b"E":
        raise RuntimeError(f"expected an ErrorResponse for {user}, got {message!r}")
    code = messages.parse_error_fields(message[1]).get("C")
    if code != "28P01":
        raise RuntimeError(f"expected 28P01 for {user}, got {code}")
    return took, attributes["s"]


def start_proxy(pg: EmbeddedPostgres, workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    """pgproxy with SCRAM client authentication, as tests/support.py starts it."""
    verifier = pg.sql("SELECT rolpassword FROM pg_authid WHERE rolname = 'app'").strip()
    userlist = workdir / "userlist.txt"
    userlist.write_text(f'"app" "{verifier}"\n"plainuser" "plain-secret"\n')
    port = free_port()
    config = workdir / "pgproxy.toml"
    config.write_text(
        f'listen_addr = "127.0.0.1"\nlisten_port = {port}\npool_mode = "transaction"\n'
        'default_pool_size = 4\nmetrics_port = 0\nauth_type = "scram-sha-256"\n'
        f'auth_file = "{userlist}"\n'
        f'[databases.appdb]\nhost = "127.0.0.1"\nport = {pg.port}\nuser = "app"\n'
        'password = "app-secret"\n'
    )
    with open(workdir / "pgproxy.log", "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "pgproxy", "-c", str(config)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
        )  # fmt: skip
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"pgproxy exited with {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return process, port
        time.sleep(0.05)
    stop(process)
    raise RuntimeError("pgproxy did not start listening")


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after 10 s."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def run(args: argparse.Namespace, pg: EmbeddedPostgres, port: int) -> None:
    kinds = args.kinds.split(",")
    dsn = f"host=127.0.0.1 port={port} dbname=appdb user=app password=app-secret"
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        victim_latencies(conn, 0.5)  # warm-up: the pool's server exists
        idle = victim_latencies(conn, min(args.duration, 3))
        print(f"pgproxy pid {args.pid}; {args.threads} flood threads, {args.duration:g} s each")
        print(
            f"victim select 1 without flood: p50 {statistics.median(idle):.3f} ms, "
            f"p99 {percentile(idle, 0.99):.3f} ms ({len(idle)} queries)"
        )
        print()
        print("| flood user | exchanges/s | failed | victim p50 ms | victim p99 ms | queries |")
        print("|------------|------------:|-------:|--------------:|--------------:|--------:|")
        for kind in kinds:
            rate, latencies, failed = flood_run(
                port, conn, KINDS[kind], args.threads, args.duration
            )
            print(f"| {kind} ({KINDS[kind]}) | {rate:.0f} | {failed} | "
                  f"{statistics.median(latencies):.3f} | {percentile(latencies, 0.99):.3f} | "
                  f"{len(latencies)} |", flush=True)  # fmt: skip
    if args.samples:
        times: dict[str, list[float]] = {kind: [] for kind in kinds}
        salts: dict[str, set[str]] = {kind: set() for kind in kinds}
        for kind in kinds:  # one unmeasured attempt each (a plain password's first derivation)
            failed_exchange(port, KINDS[kind])
        for _ in range(args.samples):
            for kind in kinds:  # in turn, so that drift in the machine's load hits all alike
                took, salt = failed_exchange(port, KINDS[kind])
                times[kind].append(took)
                salts[kind].add(salt)
        print()
        print("| user | failed exchange p50 ms | p90 ms | salts seen |")
        print("|------|-----------------------:|-------:|-----------:|")
        for kind in kinds:
            print(f"| {kind} ({KINDS[kind]}) | {statistics.median(times[kind]):.3f} | "
                  f"{percentile(times[kind], 0.9):.3f} | {len(salts[kind])} |")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=6, help="flood threads (default 6)")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per flood")
    parser.add_argument(
        "--samples", type=int, default=200, help="timed failed exchanges per kind (0: none)"
    )
    parser.add_argument(
        "--kinds", default=",".join(KINDS), help="flood user kinds, of: " + ", ".join(KINDS)
    )
    args = parser.parse_args()
    unknown = set(args.kinds.split(",")) - set(KINDS)
    if unknown:
        parser.error(f"unknown kinds: {', '.join(sorted(unknown))}")
    with tempfile.TemporaryDirectory(prefix="pgproxy-flood-") as tmp:
        pg = EmbeddedPostgres()
        pg.start()
        process = None
        try:
            pg.create_role("app", "app-secret")
            pg.create_database("appdb", owner="app")
            process, port = start_proxy(pg, Path(tmp))
            args.pid = process.pid
            run(args, pg, port)
        finally:
            if process is not None:
                stop(process)
            pg.stop()
    return 0


if __name__ == "__main__":
    os.environ.pop("PGPASSWORD", None)  # (the victim's password is in its DSN)
    sys.exit(main())
