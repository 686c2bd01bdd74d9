"""TCP options for client and server sockets (PgBouncer's tcp_keepalive and tcp_keep*).

Server sockets get them when they connect. Client sockets inherit them from the listening
socket they were accepted on (Linux copies a listener's socket options, keepalive timer
included, into every connection it accepts): set once per listener, and again at RELOAD,
rather than with one to four system calls at every login.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
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


# The system's defaults for the options a 0 leaves alone (what an option set on a listener
# before a RELOAD goes back to), with the socket option each one sets.
_SYSTEM_DEFAULTS = (
    ("count", socket.TCP_KEEPCNT, "/proc/sys/net/ipv4/tcp_keepalive_probes"),
    ("idle", socket.TCP_KEEPIDLE, "/proc/sys/net/ipv4/tcp_keepalive_time"),
    ("interval", socket.TCP_KEEPINTVL, "/proc/sys/net/ipv4/tcp_keepalive_intvl"),
)


def set_listener_keepalive(sock: Any, keepalive: TcpKeepalive | None) -> None:
    """Set (or clear) the options on a listening TCP socket, for the clients it accepts
    from now on; a Unix socket is left alone. An option at 0 gets the system's default."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, int(keepalive is not None))
    if keepalive is None:
        return
    for field, option, default_path in _SYSTEM_DEFAULTS:
        value = getattr(keepalive, field) or _system_default(default_path)
        if value:
            sock.setsockopt(socket.IPPROTO_TCP, option, value)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, keepalive.user_timeout_ms)


def _system_default(path: str) -> int:
    try:
        return int(Path(path).read_text())
    except (OSError, ValueError):
        return 0  # unknown: left as it is
