"""What a pool does while PostgreSQL refuses it: back off, remember why, raise the alarm.

psycopg_pool's reconnection model with PgBouncer's names: after a failed server connect or
login the pool waits before trying again, the wait doubling from 0.25 s (±10% jitter) up to
``server_login_retry``; the last error is kept so that a client whose login needs a server
fails at once with it instead of hammering PostgreSQL; once the failures have lasted
``reconnect_timeout`` the ``reconnect_failed`` command runs (once per outage), and the
attempts go on.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import shlex
from collections.abc import Callable, Coroutine
from typing import Any

log = logging.getLogger("pgproxy.reconnect")

INITIAL_DELAY = 0.25  # a restart that refuses connections briefly costs little
FAST_RETRY = 0.1  # seconds between attempts while PostgreSQL starts up or shuts down
BACKOFF = 2.0
JITTER = 0.1
HOOK_TIMEOUT = 60.0  # seconds a reconnect_failed command may run


class Reconnect:
    """Backoff state of one pool's server logins."""

    def __init__(
        self,
        *,
        pool_name: str,
        database: str,
        user: str,
        max_delay: float,
        timeout: float,
        hook: str | None,
        spawn: Callable[[Coroutine[Any, Any, None]], None],
    ) -> None:
        self.pool_name = pool_name
        self.database = database
        self.user = user
        self.max_delay = max_delay
        self.timeout = timeout
        self.hook = hook
        self._spawn = spawn
        self.failing_since: float | None = None
        self.last_failed_at = 0.0  # when the last failure was recorded
        self.retry_at = 0.0
        self.delay = 0.0
        self.last_error: Exception | None = None
        self.failures = 0  # consecutive failed attempts
        self.hook_runs = 0  # reconnect_failed events, ever
        self._hook_outage: float | None = None  # failing_since of the outage it fired for

    def may_try(self, now: float) -> bool:
        """Whether a new connection attempt is allowed now."""
        return now >= self.retry_at

    def waiting(self, now: float) -> bool:
        """Failing, and the next attempt is not due yet."""
        return self.failing_since is not None and now < self.retry_at

    def failed(
        self, now: float, error: Exception, message: str, started_at: float | None = None,
        *, starting_or_stopping: bool = False,
    ) -> None:  # fmt: skip
        """Record a failed attempt and schedule the next one.

        An attempt that started before the last failure was recorded was in flight with
        it: one round, so it neither doubles the wait nor counts as another attempt.
        ``starting_or_stopping`` (PostgreSQL's 57P03): retried every FAST_RETRY seconds
        while it lasts, since the server is about to be back (or gone)."""
        if (
            started_at is not None
            and self.failing_since is not None
            and started_at < self.last_failed_at
        ):
            self.last_error = error
            return
        self.last_failed_at = now
        if self.failing_since is None:
            self.failing_since = now
            self.delay = INITIAL_DELAY
        else:
            self.delay *= BACKOFF
        if self.max_delay > 0:
            self.delay = min(self.delay, self.max_delay)
        if starting_or_stopping:
            self.delay = INITIAL_DELAY / BACKOFF  # (another kind of failure next: INITIAL_DELAY)
        wait = self.delay * (1 + JITTER * (2 * random.random() - 1))
        if starting_or_stopping:
            wait = FAST_RETRY
        self.retry_at = now + wait
        self.last_error = error
        self.failures += 1
        log.warning(
            "pool %s: server login failed: %s (attempt %d); next attempt in %.2f s",
            self.pool_name,
            message,
            self.failures,
            wait,
        )
        outage = now - self.failing_since
        if self.timeout > 0 and outage >= self.timeout and self._hook_outage != self.failing_since:
            self._hook_outage = self.failing_since
            self.hook_runs += 1
            log.error(
                "pool %s: reconnect_failed: no server for %.1f s: %s",
                self.pool_name,
                outage,
                message,
            )
            if self.hook:
                self._spawn(self._run_hook(message))

    def succeeded(self) -> None:
        """A server logged in: the outage (if any) is over."""
        if self.failing_since is not None:
            log.info("pool %s: server login works again", self.pool_name)
        self.failing_since = None
        self.retry_at = 0.0
        self.failures = 0
        self.last_error = None

    async def _run_hook(self, message: str) -> None:
        assert self.hook is not None
        env = dict(os.environ)
        env.update(
            PGPROXY_DATABASE=self.database,
            PGPROXY_USER=self.user,
            PGPROXY_ERROR=message,
            PGPROXY_POOL=self.pool_name,
        )
        try:
            process = await asyncio.create_subprocess_exec(*shlex.split(self.hook), env=env)
        except OSError as exc:
            log.error("pool %s: reconnect_failed command cannot start: %s", self.pool_name, exc)
            return
        try:
            status = await asyncio.wait_for(process.wait(), HOOK_TIMEOUT)
        except TimeoutError:
            process.kill()
            log.error("pool %s: reconnect_failed command timed out; killed", self.pool_name)
            return
        if status != 0:
            log.error("pool %s: reconnect_failed command exited %d", self.pool_name, status)
