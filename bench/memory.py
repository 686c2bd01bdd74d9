"""pgproxy's memory while a client reads a multi-GB result slowly.

    .venv/bin/python bench/memory.py [--gigabytes 2] [--read-rate-mb 200]

Starts a throwaway PostgreSQL and pgproxy (transaction mode), then a raw protocol client
streams ``--gigabytes`` of ``COPY ... TO STDOUT`` and of a plain ``SELECT`` through pgproxy,
reading at most ``--read-rate-mb`` MB/s, while pgproxy's RSS is sampled from /proc. Prints
the baseline and peak RSS of each run; the target is a peak under 100 MB.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

from pgproxy.embedded import EmbeddedPostgres, free_port
from pgproxy.protocol import messages

ROW_BYTES = 1000


def rss_mb(pid: int) -> float:
    """Resident set size of ``pid`` in MB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def read_message(sock: socket.socket) -> tuple[bytes, bytes]:
    header = _recv_exact(sock, 5)
    length = struct.unpack("!I", header[1:])[0]
    return header[:1], _recv_exact(sock, length - 4)


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("proxy closed the connection")
        data += chunk
    return data


def login(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock.sendall(messages.startup_message({"user": "bench", "database": "bench"}))
    while read_message(sock)[0] != b"Z":
        pass
    return sock


def stream_slowly(port: int, sql: str, total_bytes: int, rate_mb: float) -> int:
    """Send ``sql`` and read everything at no more than ``rate_mb`` MB/s; returns bytes read."""
    sock = login(port)
    sock.sendall(messages.query(sql))
    received = 0
    started = time.monotonic()
    tail = b""
    while True:
        chunk = sock.recv(256 * 1024)
        if not chunk:
            raise ConnectionError("proxy closed the connection mid-result")
        received += len(chunk)
        tail = (tail + chunk)[-6:]
        if tail[:1] == b"Z" and tail[1:5] == b"\x00\x00\x00\x05":
            break
        ahead = received / (rate_mb * 1024 * 1024) - (time.monotonic() - started)
        if ahead > 0:
            time.sleep(ahead)
    sock.close()
    return received


def measure(pid: int, port: int, sql: str, total: int, rate: float, label: str) -> None:
    baseline = rss_mb(pid)
    peak = baseline
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.2):
            peak = max(peak, rss_mb(pid))

    sampler = threading.Thread(target=sample)
    sampler.start()
    started = time.monotonic()
    try:
        received = stream_slowly(port, sql, total, rate)
    finally:
        done.set()
        sampler.join()
    seconds = time.monotonic() - started
    print(
        f"| {label} | {received / 1e9:.2f} GB | {seconds:.1f} s | {baseline:.1f} MB | "
        f"{peak:.1f} MB | {'OK' if peak < 100 else 'OVER 100 MB'} |",
        flush=True,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gigabytes", type=float, default=2.0)
    parser.add_argument("--read-rate-mb", type=float, default=200.0)
    args = parser.parse_args()
    rows = int(args.gigabytes * 1e9 / ROW_BYTES)
    with EmbeddedPostgres() as postgres, tempfile.TemporaryDirectory() as workdir:
        postgres.create_role("bench", "bench-secret")
        postgres.create_database("bench", owner="bench")
        port = free_port()
        config = os.path.join(workdir, "pgproxy.toml")
        with open(config, "w") as config_file:
            config_file.write(
                f'listen_port = {port}\npool_mode = "transaction"\n'
                f'[databases.bench]\nhost = "127.0.0.1"\nport = {postgres.port}\n'
                'user = "bench"\npassword = "bench-secret"\n'
            )
        proxy = subprocess.Popen([sys.executable, "-m", "pgproxy", "-c", config])
        try:
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    time.sleep(0.1)
            print(
                f"pgproxy pid {proxy.pid}; {rows} rows of {ROW_BYTES} bytes; "
                f"client reads at most {args.read_rate_mb:.0f} MB/s\n"
            )
            print("| stream | size | time | RSS before | RSS peak | target < 100 MB |")
            print("|---|---|---|---|---|---|")
            body = f"select repeat('x', {ROW_BYTES - 8}) from generate_series(1, {rows})"
            measure(
                proxy.pid,
                port,
                f"copy ({body}) to stdout",
                rows * ROW_BYTES,
                args.read_rate_mb,
                "COPY TO STDOUT",
            )
            measure(proxy.pid, port, body, rows * ROW_BYTES, args.read_rate_mb, "SELECT")
        finally:
            proxy.send_signal(signal.SIGTERM)
            proxy.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
