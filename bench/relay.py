"""The floor for a Python proxy: a byte relay on uvloop with no pooling logic and no parsing.

    .venv/bin/python bench/relay.py --port PORT --server-port PGPORT [--processes N]

Each client connection is paired with a connection to PostgreSQL and every chunk is
written to the other side as it arrived. ``--processes N`` forks N - 1 more processes
accepting on the same port (SO_REUSEPORT), as pgproxy's workers do. ``bench/run.py --relay
N`` runs it next to the poolers: whatever pgproxy does per transaction, it cannot cost less
than this, so the relay's tps against PgBouncer's is the ceiling for pgproxy on that
machine.

A server connection outlives its client. The first client on a new server logs in through
it with its password, untouched, and the relay keeps the server's welcome (its
ParameterStatus, BackendKeyData and ReadyForQuery messages). When a client that sent only
simple queries sends Terminate, the relay keeps the server for the next client instead of
closing it (after the extended protocol, named statements may be left on it: it is
closed, as a pooler would have to reset it); that client gets
AuthenticationOk and the kept welcome at once, as from a pooler under trust (an SSLRequest
is answered 'N', as pgbench's own would be by this PostgreSQL). So with pgbench ``-C`` (a
connection per transaction) the relay does per login only what any pooler must: accept,
answer the startup packet, forward the query and the reply, close. It is the floor for
the CPU of pgproxy's login as the plain relay is for its transactions. Its ``-C`` tps is a
session pooler's, though: it keeps the server from the login to the Terminate, where a
transaction pooler gives it back at each ReadyForQuery, and on this machine that alone
leaves the cores more idle under ``pgbench -C`` (PgBouncer in session mode ran it 7-26%
faster than in transaction mode in three rounds; bench/RESULTS.md, 2026-12-07).

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
from typing import Final, cast

import uvloop

# Back-pressure as pgproxy's: stop reading one side while the other's buffer is full.
WRITE_HIGH_WATER: Final = 256 * 1024
WRITE_LOW_WATER: Final = 64 * 1024
TERMINATE: Final = b"X\x00\x00\x00\x04"
QUERY: Final = ord("Q")
SSL_REQUEST: Final = b"\x00\x00\x00\x08\x04\xd2\x16\x2f"
GSSENC_REQUEST: Final = b"\x00\x00\x00\x08\x04\xd2\x16\x30"
AUTHENTICATION_OK: Final = b"R\x00\x00\x00\x08\x00\x00\x00\x00"
WELCOME_TYPES: Final = b"SKZ"  # ParameterStatus, BackendKeyData, ReadyForQuery


class Side(asyncio.Protocol):
    """One socket of a client/server pair; forwards what it reads to ``peer``."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: Side | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None:
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


class ServerSide(Side):
    """A PostgreSQL connection; kept for the next client when its client terminates."""

    def __init__(self) -> None:
        super().__init__()
        self.login_bytes: bytearray | None = bytearray()  # until its first ReadyForQuery
        self.welcome = b""

    def data_received(self, data: bytes) -> None:
        if self.login_bytes is not None:
            self._watch_login(data)
        super().data_received(data)

    def _watch_login(self, data: bytes) -> None:
        """Keep the welcome of the login relayed through it (read once per server)."""
        assert self.login_bytes is not None
        if not self.login_bytes and data == b"N":
            return  # PostgreSQL's answer to an SSLRequest, not a message
        self.login_bytes += data
        buffer, position, kept = self.login_bytes, 0, [AUTHENTICATION_OK]
        while position + 5 <= len(buffer):
            end = position + 1 + int.from_bytes(buffer[position + 1 : position + 5], "big")
            if end > len(buffer):
                return
            kind = buffer[position]
            if kind in WELCOME_TYPES:
                kept.append(bytes(buffer[position:end]))
            if kind == ord("Z"):
                self.welcome = b"".join(kept)
                self.login_bytes = None
                return
            position = end

    def connection_lost(self, exc: Exception | None) -> None:
        with contextlib.suppress(ValueError):
            IDLE_SERVERS.remove(self)
        super().connection_lost(exc)


IDLE_SERVERS: list[ServerSide] = []  # logged in, between clients


class ClientSide(Side):
    """A client connection: takes a kept server, or opens one and logs in through it."""

    server_port = 0

    def __init__(self) -> None:
        super().__init__()
        self.early = bytearray()  # its first bytes, until it has a server
        self.simple = True  # each chunk it sent began with a simple Query ('Q')
        self.connecting = False  # a new server is on its way: it gets all of ``early``

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if not IDLE_SERVERS:
            self._open_server()

    def _open_server(self) -> None:
        self.connecting = True
        asyncio.get_running_loop().create_task(self._connect())

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is None:
            self._before_server(data)
        elif data == TERMINATE:
            self._give_back(peer)
        elif peer.transport is not None:
            if data[0] != QUERY and isinstance(peer, ServerSide) and peer.login_bytes is None:
                self.simple = False  # (past the login: its packets are not queries)
            peer.transport.write(data)

    def _before_server(self, data: bytes) -> None:
        """Answer the TLS requests and the startup packet with a kept server's welcome."""
        self.early += data
        if self.connecting:
            return  # (_connect forwards all of it)
        assert self.transport is not None
        while len(self.early) >= 8:
            length = int.from_bytes(self.early[:4], "big")
            if bytes(self.early[:8]) in (SSL_REQUEST, GSSENC_REQUEST):
                self.transport.write(b"N")
            elif len(self.early) < length:
                return
            elif not IDLE_SERVERS:  # (taken by another client since it connected)
                self._open_server()
                return
            else:
                server = IDLE_SERVERS.pop()
                server.peer, self.peer = self, server
                self.transport.write(server.welcome)
                rest = bytes(self.early[length:])
                if rest and server.transport is not None:
                    server.transport.write(rest)
                return
            del self.early[:length]

    def _give_back(self, server: Side) -> None:
        server.peer = self.peer = None
        assert isinstance(server, ServerSide)
        if server.login_bytes is None and self.simple:
            IDLE_SERVERS.append(server)
        elif server.transport is not None:
            server.transport.close()
        if self.transport is not None:
            self.transport.close()

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, server = await loop.create_connection(ServerSide, "127.0.0.1", self.server_port)
        except OSError:
            if self.transport is not None:
                self.transport.close()
            return
        if self.transport is None or self.transport.is_closing():
            if server.transport is not None:
                server.transport.close()
            return
        server.peer, self.peer = self, server
        assert server.transport is not None
        if self.early:
            server.transport.write(bytes(self.early))
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
