"""TCP options for client and server sockets (PgBouncer's tcp_keepalive and tcp_keep*)."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class TcpKeepalive:
    """Keepalive settings; a 0 leaves the system's default for that option."""

    count: int = 0
    idle: int = 0
    interval: int = 0
    user_timeout_ms: int = 0


def keepalive_from(settings: Any) -> TcpKeepalive | None:
    """The keepalive to apply under ``settings`` (None: tcp_keepalive is off)."""
    if not settings.tcp_keepalive:
        return None
    return TcpKeepalive(
        settings.tcp_keepcnt,
        settings.tcp_keepidle,
        settings.tcp_keepintvl,
        settings.tcp_user_timeout,
    )


def apply_keepalive(sock: socket.socket | None, keepalive: TcpKeepalive | None) -> None:
    """Set the options on a TCP socket; a Unix socket (or none) is left alone."""
    if keepalive is None or sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if keepalive.count:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, keepalive.count)
        if keepalive.idle:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, keepalive.idle)
        if keepalive.interval:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, keepalive.interval)
        if keepalive.user_timeout_ms:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, keepalive.user_timeout_ms)
    except OSError:
        pass  # the peer is already gone: nothing to keep alive
