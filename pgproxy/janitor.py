"""The periodic maintenance pass: every timer of every pool, a few times a second.

One callback walks the pools instead of a timer object per connection (PgBouncer's
janitor does the same, three times a second).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pgproxy.client import ClientConn
    from pgproxy.config import Settings
    from pgproxy.pool import Pool

INTERVAL = 1 / 3  # seconds between passes


class Janitor:
    """Runs ``maintain`` every INTERVAL seconds on the running loop until stopped."""

    def __init__(
        self,
        pools: Callable[[], Iterable[Pool]],
        clients: Callable[[], Iterable[ClientConn]],
        settings: Callable[[], Settings],
    ):
        self._pools = pools
        self._clients = clients
        self._settings = settings
        self._loop = asyncio.get_running_loop()
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        """Schedule the first pass."""
        self._handle = self._loop.call_later(INTERVAL, self._tick)

    def stop(self) -> None:
        """Cancel the next pass."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _tick(self) -> None:
        try:
            self.maintain(self._loop.time())
        finally:
            self._handle = self._loop.call_later(INTERVAL, self._tick)

    def maintain(self, now: float) -> None:
        """One pass: client timeouts, then each pool's (and its life cycle, Pool.maintain)."""
        settings = self._settings()
        if settings.client_idle_timeout > 0:
            for client in self._clients():
                client.check_idle(now, settings.client_idle_timeout)
        for pool in self._pools():
            if settings.query_wait_timeout > 0 and pool.waiters:
                pool.expire_waiters(now, settings.query_wait_timeout)
            if settings.idle_transaction_timeout > 0:
                pool.expire_idle_transactions(now, settings.idle_transaction_timeout)
            if settings.query_timeout > 0:
                pool.expire_queries(now, settings.query_timeout)
            if settings.transaction_timeout > 0:
                pool.expire_transactions(now, settings.transaction_timeout)
            pool.maintain(now)
