"""systemd's readiness protocol (sd_notify), as PgBouncer 1.24 speaks it.

Under ``Type=notify`` (or ``notify-reload``, systemd 253 and newer) systemd passes a datagram
socket in ``NOTIFY_SOCKET``; pgproxy says READY=1 once it listens, RELOADING=1 / READY=1
around a reload, and STOPPING=1 when it begins to shut down. Without the variable every
call does nothing.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("pgproxy.sdnotify")


def notify(*fields: str) -> None:
    """Send ``fields`` (``KEY=value`` lines) to systemd, if it is listening."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall("\n".join(fields).encode())
    except OSError as exc:
        log.warning("cannot notify systemd at NOTIFY_SOCKET: %s", exc)


def ready(main_pid: int, status: str) -> None:
    """Listening: systemd may start what depends on pgproxy."""
    notify("READY=1", f"MAINPID={main_pid}", f"STATUS={status}")


def reloading() -> None:
    """A reload begins (notify-reload wants the monotonic clock in microseconds)."""
    notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")


def reloaded() -> None:
    """The reload is over (applied or refused)."""
    notify("READY=1")


def stopping() -> None:
    """The shutdown begins."""
    notify("STOPPING=1")
