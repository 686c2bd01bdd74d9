"""Listening sockets: TCP on listen_addr:listen_port and, optionally, a Unix socket."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import grp
import os
import socket
from typing import TYPE_CHECKING

from pgproxy.core.client import ClientServices, accept_client

if TYPE_CHECKING:
    from pgproxy.config import Settings

BACKLOG = 1024


def unix_socket_path(directory: str, port: int) -> str:
    """PostgreSQL's socket file name, so that ``psql -h DIR -p PORT`` finds it."""
    return os.path.join(directory, f".s.PGSQL.{port}")


def claim_unix_socket(path: str) -> None:
    """Make ``path`` free for a new socket: raise OSError if a live process listens on it
    (a second pgproxy must not take a running one's socket), remove it if it is stale."""
    if not os.path.exists(path):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a socket left by a process that is gone
        return
    except OSError:
        pass  # not a socket we can reach: let the bind below say why
    else:
        raise OSError(errno.EADDRINUSE, f"unix socket {path} is in use by another process")
    finally:
        probe.close()


def remove_unix_socket(settings: Settings) -> None:
    """Remove this process's Unix socket file (at exit, or after a failed start)."""
    if settings.unix_socket_dir:
        with contextlib.suppress(OSError):
            os.unlink(unix_socket_path(settings.unix_socket_dir, settings.listen_port))


def set_socket_access(path: str, settings: Settings) -> None:
    """unix_socket_mode and unix_socket_group on the socket file at ``path``."""
    os.chmod(path, settings.unix_socket_mode)
    if settings.unix_socket_group:
        try:
            group_id = grp.getgrnam(settings.unix_socket_group).gr_gid
        except KeyError:
            raise OSError(
                errno.EINVAL, f"unix_socket_group {settings.unix_socket_group}: no such group"
            ) from None
        os.chown(path, -1, group_id)


async def start_listeners(clients: ClientServices) -> list[asyncio.Server]:
    """Open every configured listener; raise OSError if one cannot be bound (nothing is
    left open or created then)."""
    settings = clients.host.settings
    listeners: list[asyncio.Server] = []
    socket_path = None
    if settings.unix_socket_dir:
        socket_path = unix_socket_path(settings.unix_socket_dir, settings.listen_port)
        claim_unix_socket(socket_path)
    try:
        await _bind(clients, listeners, socket_path)
    except BaseException:
        for listener in listeners:
            listener.close()
        if socket_path is not None:
            # (claim_unix_socket left no file there: one there now is ours.)
            with contextlib.suppress(OSError):
                os.unlink(socket_path)
        raise
    return listeners


async def _bind(
    clients: ClientServices, listeners: list[asyncio.Server], socket_path: str | None
) -> None:
    loop = asyncio.get_running_loop()
    settings = clients.host.settings
    # (A partial calls the compiled factory with no Python frame: one per accepted client.)
    factory = functools.partial(accept_client, clients)

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
    if socket_path is not None:
        unix_factory = functools.partial(accept_client, clients, True)
        listeners.append(
            await loop.create_unix_server(unix_factory, path=socket_path, backlog=BACKLOG)
        )
        set_socket_access(socket_path, settings)


async def listen_on(clients: ClientServices, sock: socket.socket) -> asyncio.Server:
    """Serve clients on a listening socket bound by someone else (the workers'
    supervisor binds the Unix socket once for all of them)."""
    loop = asyncio.get_running_loop()
    factory = functools.partial(accept_client, clients, True)
    return await loop.create_unix_server(factory, sock=sock, backlog=BACKLOG)
