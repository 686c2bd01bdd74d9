"""The periodic maintenance pass: every timer of every pool, a few times a second.

One callback walks the pools instead of a timer object per connection (PgBouncer's
janitor does the same, three times a second).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pgproxy.config import Settings
    from pgproxy.pool import Pool

INTERVAL = 1 / 3  # seconds between passes


class Janitor:
    """Runs ``maintain`` every INTERVAL seconds on the running loop until stopped."""

    def __init__(self, pools: Callable[[], Iterable[Pool]], settings: Callable[[], Settings]):
        self._pools = pools
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
        """One pass: end waits past query_wait_timeout; pool life cycle (Pool.maintain)."""
        query_wait_timeout = self._settings().query_wait_timeout
        for pool in self._pools():
            if query_wait_timeout > 0 and pool.waiters:
                pool.expire_waiters(now, query_wait_timeout)
            pool.maintain(now)
