"""Listening sockets: TCP on listen_addr:listen_port and, optionally, a Unix socket."""

from __future__ import annotations

import asyncio
import os
import socket
from typing import TYPE_CHECKING

from pgproxy.client import ClientConn

if TYPE_CHECKING:
    from pgproxy.daemon import Daemon

BACKLOG = 1024


def unix_socket_path(directory: str, port: int) -> str:
    """PostgreSQL's socket file name, so that ``psql -h DIR -p PORT`` finds it."""
    return os.path.join(directory, f".s.PGSQL.{port}")


async def start_listeners(daemon: Daemon) -> list[asyncio.Server]:
    """Open every configured listener; raise OSError if one cannot be bound."""
    loop = asyncio.get_running_loop()
    settings = daemon.settings
    listeners: list[asyncio.Server] = []

    def factory() -> ClientConn:
        return ClientConn(daemon)

    if settings.listen_addr:
        hosts = (
            None
            if settings.listen_addr.strip() == "*"
            else [host.strip() for host in settings.listen_addr.split(",") if host.strip()]
        )
        listeners.append(
            await loop.create_server(
                factory,
                host=hosts,
                port=settings.listen_port,
                family=socket.AF_UNSPEC,
                reuse_address=True,
                # Several processes on one port (each with its own Unix socket).
                reuse_port=settings.so_reuseport,
                backlog=BACKLOG,
            )
        )
    if settings.unix_socket_dir:
        path = unix_socket_path(settings.unix_socket_dir, settings.listen_port)
        if os.path.exists(path):
            os.unlink(path)  # a stale socket from a previous run
        listeners.append(await loop.create_unix_server(factory, path=path, backlog=BACKLOG))
    return listeners


async def listen_on(daemon: Daemon, sock: socket.socket) -> asyncio.Server:
    """Serve clients on a listening socket bound by someone else (the workers'
    supervisor binds the Unix socket once for all of them)."""
    loop = asyncio.get_running_loop()
    return await loop.create_unix_server(lambda: ClientConn(daemon), sock=sock, backlog=BACKLOG)
