"""The floor for a Python proxy: a byte relay on uvloop with no pooling and no parsing.

    .venv/bin/python bench/relay.py --port PORT --server-port PGPORT [--processes N]

Each client connection gets its own connection to PostgreSQL (session relay: pgbench's
authentication goes through untouched) and every chunk is written to the other side as it
arrived. ``--processes N`` forks N - 1 more processes accepting on the same port
(SO_REUSEPORT), as pgproxy's workers do. ``bench/run.py --relay N`` runs it next to the
poolers: whatever pgproxy does per transaction, it cannot cost less than this, so the
relay's tps against PgBouncer's is the ceiling for pgproxy on that machine.

With as many clients as a pooler has servers (the 16-client scenarios against a pool of
20), PostgreSQL runs the same number of backends behind the relay as behind a pooler. With
more clients than that, the relay would open one backend per client: not comparable, so
``run.py`` leaves the relay out of those scenarios.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Sequence
from typing import cast

import uvloop

# Back-pressure as pgproxy's: stop reading one side while the other's buffer is full.
WRITE_HIGH_WATER = 256 * 1024
WRITE_LOW_WATER = 64 * 1024


class Side(asyncio.Protocol):
    """One socket of a client/server pair; forwards what it reads to ``peer``."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: Side | None = None
        self.early: list[bytes] = []  # the client's first bytes, before the server is up

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is None or peer.transport is None:
            self.early.append(data)
        else:
            peer.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.close()

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


class ClientSide(Side):
    """A client connection: opens its own server connection, then relays."""

    server_port = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, server = await loop.create_connection(Side, "127.0.0.1", self.server_port)
        except OSError:
            if self.transport is not None:
                self.transport.close()
            return
        server.peer, self.peer = self, server
        assert server.transport is not None
        for chunk in self.early:
            server.transport.write(chunk)
        self.early.clear()


async def serve(port: int) -> None:
    """Accept on 127.0.0.1:``port`` (shared with the other processes) until SIGTERM."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    # (uvloop sets TCP_NODELAY on every TCP transport, as pgproxy's are.)
    server = await loop.create_server(ClientSide, "127.0.0.1", port, reuse_port=True)
    await stop.wait()
    server.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="zero-logic uvloop byte relay (bench floor)")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--server-port", type=int, required=True)
    parser.add_argument("--processes", type=int, default=1)
    args = parser.parse_args(argv)
    ClientSide.server_port = args.server_port
    children: list[int] = []
    for _ in range(args.processes - 1):
        pid = os.fork()
        if pid == 0:
            children = []
            break
        children.append(pid)
    try:
        uvloop.run(serve(args.port))
    finally:
        for pid in children:  # the first process stops the others, by pid
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for pid in children:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
