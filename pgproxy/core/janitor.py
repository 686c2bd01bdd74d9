"""The periodic maintenance pass: every timer of every pool, a few times a second.

One callback walks the pools instead of a timer object per connection (PgBouncer's
janitor does the same, three times a second). Each timeout is a function over a pool (or a
client) below: it reads state the hot path keeps anyway (request and reply counts, link
times) and acts through the pool's and the client's own methods.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from pgproxy.core.client import LOGIN, READY
from pgproxy.core.hosts import HostPolicy
from pgproxy.core.states import ClientState
from pgproxy.protocol import codes, messages
from pgproxy.protocol.stream import STATUS_IDLE

if TYPE_CHECKING:
    from pgproxy.config import Settings
    from pgproxy.core.client import ClientConn
    from pgproxy.core.pool import Pool
    from pgproxy.core.server import ServerConn

log = logging.getLogger("pgproxy.janitor")

INTERVAL = 1 / 3  # seconds between passes


class Janitor:
    """Runs ``maintain`` every INTERVAL seconds on the running loop until stopped."""

    def __init__(
        self,
        pools: Callable[[], Iterable[Pool]],
        clients: Callable[[], Iterable[ClientConn]],
        settings: Callable[[], Settings],
        every_pass: Callable[[float], None] | None = None,
    ):
        self._every_pass = every_pass
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
            self.maintain(time.monotonic())
        finally:
            self._handle = self._loop.call_later(INTERVAL, self._tick)

    def maintain(self, now: float) -> None:
        """One pass: client timeouts, then each pool's timeouts and life cycle (recycle).

        Timeouts are each client's own (its user's, database's or the global setting).
        """
        settings = self._settings()
        if self._every_pass is not None:
            self._every_pass(now)
        for client in self._clients():
            if client.state is READY:
                if client.timeouts.client_idle > 0:
                    expire_idle_client(client, now, client.timeouts.client_idle)
            elif not client.logged_in and settings.client_login_timeout > 0:
                expire_login(client, now, settings.client_login_timeout)
        for pool in self._pools():
            if pool.waiters and pool.shutting_down:  # (SHUTDOWN WAIT_FOR_SERVERS)
                pool.refuse_waiters_on_shutdown()
            if pool.waiters:
                expire_waiters(pool, now)
                if settings.query_wait_notify > 0:
                    notify_waiters(pool, now, settings.query_wait_notify)
            if pool.servers:
                expire_idle_transactions(pool, now)
                expire_queries(pool, now)
                expire_transactions(pool, now)
            if settings.leak_detection_threshold > 0 and pool.servers:
                detect_leaks(pool, now, settings.leak_detection_threshold)
            recycle(pool, now)
            policy = pool.host_policy
            if isinstance(policy, HostPolicy):  # roles and lag of the hosts (hosts.py)
                policy.topology.maintain(pool, now)
            if pool.guard != "off" and pool.idle and pool.settings.state_check_period > 0:
                check_idle_state(pool, now, pool.settings.state_check_period)


def recycle(pool: Pool, now: float) -> None:
    """The janitor's pass over this pool: shrink, recycle, keep min_pool_size, reserve."""
    idle = pool.idle
    # Servers past their lifetime that sit idle are closed now (busy ones on release).
    for server in [server for server in idle if now >= server.expires_at]:
        pool.retire(server)
    # Above min_pool_size, the server idle longest goes, one per pass (psycopg_pool's
    # ShrinkPool): a burst's servers drain gradually rather than all at once.
    timeout = pool.settings.idle_timeout
    if (
        timeout > 0
        and idle
        and len(pool.servers) > pool.min_size
        and now - idle[0].idle_since >= timeout
    ):
        pool.retire(idle[0])
    # server_check_query: test servers idle longer than server_check_delay, in the
    # background (each leaves the idle list while it runs).
    check_query = pool.settings.check_query
    if check_query and pool.settings.check_delay > 0:  # (0: tested at each use instead)
        deadline = now - pool.settings.check_delay
        for server in [server for server in idle if server.checked_at <= deadline]:
            pool.check(server, check_query, now)
    # Background openings: up to min_pool_size, and for waiters whose attempt failed
    # (retried here once the backoff allows).
    if len(pool.servers) + pool.connecting < pool.min_size or pool.connecting < len(pool.waiters):
        pool.grow()
    # reserve_pool_size: once the first waiter has waited reserve_pool_timeout, open one
    # extra server per pass, up to the reserve (PgBouncer's behaviour).
    settings = pool.settings
    if (
        settings.reserve_size
        and not pool.paused
        and pool.waiters
        and now - pool.waiters[0].wait_started_at >= settings.reserve_timeout
        and pool.connecting < len(pool.waiters)
        and len(pool.servers) + pool.connecting < pool.size + settings.reserve_size
        and pool.reconnect.may_try(now)
        and pool.take_budgets(reserve=True)
    ):
        log.info("pool %s: taking connection from reserve_pool", pool.name)  # (PgBouncer's words)
        pool.open_server()


def check_idle_state(pool: Pool, now: float, period: float) -> None:
    """transaction_state_guard: check the session state of idle servers that served a
    client since their last check, at most once per ``period`` seconds each. It finds what
    no command tag shows (session advisory locks, temporary tables made by CREATE TABLE AS
    or SELECT INTO, SET inside a transaction block, set_config), blamed on the last client
    of the server."""
    due = [
        server
        for server in pool.idle
        if server.replies != server.checked_replies and now - server.state_checked_at >= period
    ]
    for server in due:
        pool.check_idle_state(server)


def expire_idle_transactions(pool: Pool, now: float) -> None:
    """End clients idle inside a transaction for their idle_transaction_timeout.

    Idle means: the last reply said 'in transaction' and the client has asked nothing
    since. The janitor notices it by comparing the client's request count between passes,
    so the hot path pays nothing for this timeout.
    """
    for server in list(pool.servers):
        client = server.client
        if client is None or client.outstanding > 0 or server.scan.status == STATUS_IDLE:
            continue
        timeout = client.timeouts.idle_transaction
        if timeout <= 0:
            continue
        requests = client.scan.requests_total
        if server.idle_tx_requests != requests:
            server.idle_tx_requests = requests
            server.idle_tx_since = now
        elif now - server.idle_tx_since >= timeout:
            pool.stats.timeouts["idle_transaction"] += 1
            client.fatal(codes.PROTOCOL_VIOLATION, "idle transaction timeout")


def expire_queries(pool: Pool, now: float) -> None:
    """query_timeout: cancel a request that has had no reply for the client's timeout.

    Progress is the pair (client's requests, replies forwarded); the janitor notes when
    it last changed. A cancelled request is not cancelled again.
    """
    for server in list(pool.servers):
        client = server.client
        if client is None or client.outstanding <= 0:
            continue
        timeout = client.timeouts.query
        if timeout <= 0:
            continue
        mark = (client.scan.requests_total, server.replies)
        if mark != server.progress_mark:
            server.progress_mark = mark
            server.progress_since = now
        elif now - server.progress_since >= timeout and server.cancelled_mark != mark:
            server.cancelled_mark = mark
            pool.stats.timeouts["query"] += 1
            log.info("pool %s: query_timeout: cancelling a request", pool.name)
            pool.cancel_running_query(server)


def expire_transactions(pool: Pool, now: float) -> None:
    """transaction_timeout (transaction/statement mode): end over-long transactions."""
    if not pool.releases_at_idle:
        return
    for server in list(pool.servers):
        client = server.client
        if client is None:
            continue
        timeout = client.timeouts.transaction
        if timeout > 0 and now - server.linked_at >= timeout:
            pool.stats.timeouts["transaction"] += 1
            client.fatal(codes.PROTOCOL_VIOLATION, "transaction timeout")


def expire_waiters(pool: Pool, now: float) -> None:
    """End the waits older than each client's query_wait_timeout."""
    expired = [
        client
        for client in pool.waiters
        if 0 < client.timeouts.query_wait <= now - client.wait_started_at
    ]
    for client in expired:
        waited = now - client.wait_started_at
        pool.change_client_state(client, ClientState.IDLE)
        pool.stats.requests_errors += 1
        pool.stats.timeouts["query_wait"] += 1
        if pool.histograms is not None:  # the wait p99 must show the waits that failed
            pool.histograms.wait.observe(waited)
        client.fatal(codes.PROTOCOL_VIOLATION, "query_wait_timeout")


def notify_waiters(pool: Pool, now: float, after: float) -> None:
    """query_wait_notify: tell a client queued that long that it waits (once per wait)."""
    for client in pool.waiters:
        started = client.wait_started_at
        if started and client.wait_notified != started and now - started >= after:
            client.wait_notified = started
            client.transport.write(
                messages.notice_response(
                    f"No server connection available in {pool.database} backend, "
                    "client being queued"
                )
            )


def expire_login(client: ClientConn, now: float, timeout: float) -> None:
    """client_login_timeout: a client still logging in after ``timeout`` seconds."""
    if not client.closed and now - client.connected_at >= timeout:
        # PgBouncer's wording tells a stalled client from one waiting for a dead server.
        client.services.registry.login_timeouts += 1
        if client.state is LOGIN:
            client.fatal(
                codes.PROTOCOL_VIOLATION, "client_login_timeout (server down)", reason="timeout"
            )
        else:
            client.fatal(codes.PROTOCOL_VIOLATION, "client_login_timeout", reason="timeout")


def expire_idle_client(client: ClientConn, now: float, timeout: float) -> None:
    """client_idle_timeout: end a logged-in client that has no server and sent nothing."""
    if client.state is not READY or client.pool_state is not ClientState.IDLE:
        return
    requests = client.scan.requests_total
    if requests != client.idle_requests:
        client.idle_requests = requests
        client.idle_since = now
    elif now - client.idle_since >= timeout:
        client.pool.stats.timeouts["client_idle"] += 1
        client.fatal(codes.PROTOCOL_VIOLATION, "client_idle_timeout")


def held_for(pool: Pool, server: ServerConn, now: float) -> float:
    """How long the client linked to ``server`` has held it, as leak detection counts:
    transaction mode, since the transaction began; session mode, since it was last seen
    idle inside a transaction (0 when it is not). Kept up to date by ``detect_leaks``."""
    client = server.client
    if client is None:
        return 0.0
    if pool.releases_at_idle:
        return now - server.linked_at
    return now - server.leak_since if server.leak_since else 0.0


def detect_leaks(pool: Pool, now: float, threshold: float) -> None:
    """leak_detection_threshold (HikariCP's idea, for a proxy): log and count a client that
    holds a server too long, once per episode. Nothing is killed."""
    for server in list(pool.servers):
        client = server.client
        if client is None:
            server.leak_since = 0.0
            continue
        if not pool.releases_at_idle:
            idle_in_transaction = server.scan.status != STATUS_IDLE and client.outstanding <= 0
            if not idle_in_transaction:
                server.leak_since = 0.0
                continue
            if not server.leak_since:
                server.leak_since = now
        episode = server.linked_at if pool.releases_at_idle else server.leak_since
        held = held_for(pool, server, now)
        if held >= threshold and server.leak_mark != episode:
            server.leak_mark = episode
            pool.stats.leaks += 1
            peer = client.transport.get_extra_info("peername")
            log.warning(
                "leak: client %d (user %s, database %s, application_name %r, address %s, "
                "state %s) has held a server for %.1f s (leak_detection_threshold %g s)",
                client.id, client.user, client.database, client.application_name,
                peer[0] if isinstance(peer, tuple) else "unix",
                "active" if client.outstanding > 0 else "idle in transaction", held, threshold,
            )  # fmt: skip
