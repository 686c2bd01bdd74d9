"""A pool per (database, user): idle servers, waiting clients, and the linking of the two.

The critical section is plain synchronous code in one event loop: ``acquire`` either pops
an idle server and links it in the same callback, or queues the client (FIFO); a server
that becomes free goes to the first waiter before it goes to the idle list. New servers
are always opened by background tasks, never in a client's own path.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter, deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mypy_extensions import mypyc_attr

from pgproxy import params as tracked
from pgproxy import state_guard
from pgproxy.config import EMPTY_CHECK_QUERY, PoolMode, PoolSettings
from pgproxy.metrics import PoolHistograms
from pgproxy.protocol import codes, messages
from pgproxy.protocol.auth import Credential
from pgproxy.protocol.prepared import Registry
from pgproxy.reconnect import Reconnect
from pgproxy.server import (
    ACTIVE,
    BEING_CANCELED,
    IDLE,
    RESET,
    TESTED,
    ServerConn,
    ServerLoginError,
    cancel_backend,
    connect_server,
)
from pgproxy.state_guard import Guard, RecentLeaks, SessionState, StateLeak
from pgproxy.stats import PoolStats
from pgproxy.tls import ServerTls

if TYPE_CHECKING:
    from pgproxy.client import ClientConn

log = logging.getLogger("pgproxy.pool")

# Why a state check runs (transaction_state_guard): the first on a server that was not
# checked at its login (the guard was off then), the one after its reset query ran (both
# only learn the state), after a transaction whose replies carried a suspect tag, and the
# janitor's on an idle server. (A new server's first check is part of its login.)
CHECK_FIRST = "first"
CHECK_AFTER_RESET = "after reset"
CHECK_RELEASE = "release"
CHECK_PERIODIC = "periodic"

_KIND_WORDS = {
    "set": "settings changed by SET",
    "listen": "LISTEN channels",
    "prepare": "SQL PREPAREd statements",
    "cursor": "WITH HOLD cursors",
    "temp_table": "temporary tables",
    "advisory_lock": "session advisory locks",
}

# Seconds a queued request does not retry opening a server after a budget refused one. A
# local budget wakes its pools when a place frees (ServerBudget.release); one shared with
# other workers cannot, so queued requests poll it, and the janitor retries too.
BUDGET_RETRY = 0.02


@dataclass(frozen=True, slots=True)
class ServerTarget:
    """Where a pool's servers connect and as whom (the password is never logged)."""

    host: str  # one host, or several separated by commas
    port: int
    dbname: str
    user: str
    password: str | None
    round_robin: bool = True  # load_balance_hosts = round-robin

    @property
    def hosts(self) -> tuple[str, ...]:
        """The hosts to try, in order."""
        return tuple(part.strip() for part in self.host.split(",") if part.strip()) or ("",)

    def __repr__(self) -> str:
        return f"ServerTarget({self.user}@{self.host}:{self.port}/{self.dbname})"


# Compiled, a class refuses Python subclasses unless told: workers.SharedServerBudget is one.
@mypyc_attr(allow_interpreted_subclasses=True)
class ServerBudget:
    """A cap on server connections shared by several pools: max_db_connections for the
    pools of one database, max_user_connections for the pools of one user."""

    def __init__(self, limit: int) -> None:
        self.limit = limit  # 0: no limit
        # Servers connecting or connected in the pools below, counted until their
        # connection is really closed: PostgreSQL counts a closing backend too.
        self.used = 0
        self.evicting = False  # an idle server is closing to make room
        self.pools: list[Pool] = []

    @property
    def full(self) -> bool:
        """No server may be opened under this budget now."""
        return 0 < self.limit <= self.used

    def evict_idle(self, needy: Pool) -> None:
        """Close one idle server of another pool under this budget to make room; the
        room exists once that connection has closed (Pool.server_closed wakes ``needy``)."""
        if self.evicting:
            return
        for pool in self.pools:
            if pool is not needy and pool.idle:
                self.evicting = True
                pool.retire(pool.idle[0])
                return

    def take(self, reserve: bool) -> bool:
        """Take a place for a server about to be opened (``reserve``: a reserve_pool one)."""
        if self.full:
            return False
        self.used += 1
        return True

    def give_back(self) -> None:
        """A place taken for a server that was not opened after all."""
        self.used -= 1

    def release(self) -> None:
        """A server under this budget has closed: its place is free; wake a waiting pool."""
        self.give_back()
        self.evicting = False
        for pool in self.pools:
            if pool.waiters:
                pool.grow_blocked_until = 0.0
                pool.grow()


class Pool:
    """Server connections for one (database, user) and the clients that share them."""

    def __init__(
        self,
        database: str,
        user: str,
        target: ServerTarget,
        settings: PoolSettings,
        budgets: tuple[ServerBudget, ...] = (),
    ) -> None:
        self.database = database
        self.user = user
        self.name = f"{database}/{user}"
        self.target = target
        self.host_index = 0  # the target's host the next server connection tries first
        self.settings = settings
        self.mode: PoolMode = settings.mode
        self.size = settings.size
        self.min_size = min(settings.min_size, settings.size)
        self.reset_query = (
            settings.reset_query if settings.mode == "session" or settings.reset_always else ""
        )
        self.connect_timeout = settings.connect_timeout
        self.budgets = budgets
        for budget in budgets:
            budget.pools.append(self)
        self.statement_mode = settings.mode == "statement"
        self.releases_at_idle = settings.mode != "session"
        self.guard: Guard = _guard(settings)
        self.state_leaks = RecentLeaks()  # SHOW LEAKS
        self._check_failure_logged = False
        self.null_pool = settings.null_pool
        self.single_use = settings.lifetime == 0  # PgBouncer's server_lifetime = 0
        # server_check_delay = 0: every idle server is tested before a client gets it.
        self.check_before_use = bool(settings.check_query) and settings.check_delay == 0
        self.max_servers = settings.size + settings.reserve_size  # more: close when free
        self.idle: deque[ServerConn] = deque()
        self.waiters: deque[ClientConn] = deque()
        self.servers: set[ServerConn] = set()  # logged-in servers in any state
        self.connecting = 0
        # Places for replication connections (pgproxy.replication), made at the first one.
        self.replication_slots: asyncio.Semaphore | None = None
        self.grow_blocked_until = 0.0  # (monotonic) see BUDGET_RETRY
        # Workers: servers to close at the ends of transactions, their places wanted by
        # another worker whose clients wait below its share (SharedServerBudget.balance).
        self.give_back = 0
        # PAUSE, KILL, SUSPEND or a waiting shutdown: no server is handed out or opened,
        # and each one is closed as it comes free.
        self.paused = False
        self.stats = PoolStats()
        # Histograms for /metrics (None when metrics are off: nothing is observed), and the
        # hot path's shortcuts to two of them (see ``measure``).
        self.histograms: PoolHistograms | None = None
        self.record_query: Callable[[float], None] | None = None
        self.record_transaction: Callable[[float], None] | None = None
        self.query_wait_timeout = 0.0  # in force for this pool's user (a metrics gauge)
        self.server_tls = ServerTls("disable", None)  # set by the daemon
        # Named prepared statements: shared by every pool of the daemon (set by it).
        self.statement_registry = Registry()
        # Passthrough: the server login's credential when the target has no password.
        self.credential_for: Callable[[str], Credential | None] | None = None
        # ParameterStatus values of the first server: what every client is told at login.
        self.welcome: list[tuple[str, str]] | None = None
        self.welcome_values: tracked.ParamValues = tracked.EMPTY
        # The ParameterStatus messages of a welcome, per set of client values (logins of
        # one application mostly share one).
        self._greetings: dict[tracked.ParamValues, bytes] = {}
        self._welcome_attempt: asyncio.Future[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop = asyncio.get_running_loop()
        self.reconnect = Reconnect(
            pool_name=self.name,
            database=database,
            user=user,
            max_delay=settings.login_retry,
            timeout=settings.reconnect_timeout,
            hook=settings.reconnect_failed,
            spawn=self._track,
        )

    def measure(self, histograms: PoolHistograms) -> None:
        """Observe this pool's waits, connects, queries and transactions in ``histograms``."""
        self.histograms = histograms
        self.record_query = histograms.query.record
        self.record_transaction = histograms.transaction.record

    def size_limit(self, reserve: bool) -> int:
        """Servers this pool may have (with its reserve when ``reserve``)."""
        return self.max_servers if reserve else self.size

    # -- the critical section: linking clients and servers ---------------------------

    def acquire(self, client: ClientConn) -> ServerConn | None:
        """Link an idle server to ``client`` now, or queue the client and return None."""
        if self.idle and not self.paused:
            server = self.idle.pop()  # LIFO: the warmest server, as PgBouncer does
            if self.check_before_use:  # server_check_delay = 0: test it first
                client.wait_started_at = time.monotonic()
                self.waiters.appendleft(client)
                self._test(server, client.wait_started_at)
                return None
            self._link(client, server)
            histograms = self.histograms
            if histograms is not None:
                histograms.wait.counts[0] += 1  # no wait: the first bucket
            return server
        if 0 < self.settings.max_waiting <= len(self.waiters):
            self.stats.requests_errors += 1
            client.fatal(codes.TOO_MANY_CONNECTIONS, "too many clients waiting (max_waiting)")
            return None
        self.stats.requests_queued += 1
        client.wait_started_at = now = time.monotonic()
        self.waiters.append(client)
        # (grow has nothing to do in a full pool, nor right after a budget said no.)
        if len(self.servers) + self.connecting < self.size and now >= self.grow_blocked_until:
            self.grow()
        return None

    def _link(self, client: ClientConn, server: ServerConn) -> None:
        client.server = server
        server.client = client
        server.state = ACTIVE
        server.linked_at = server.query_started = time.monotonic()
        self.stats.server_assignment_count += 1
        if self.single_use:  # server_lifetime = 0: closed when this client lets it go
            server.expires_at = server.connected_at
        if client.write_paused:
            server.transport.pause_reading()
        if server.write_paused:
            client.transport.pause_reading()
        if client.params is not server.params:  # (equal values are one tuple: params.py)
            server.sync_params(client.params)
        # Named prepared statements: tied to this link now if the client has any, if the
        # server has stray names to close first, or at the server's first link (from then
        # on it counts the replies the ledger needs); else at the client's first named
        # statement (_send_plan), so that a link is as cheap as before for the rest.
        server.statements_client = None
        scan = client.scan
        statements = scan.statements
        if statements is not None:
            # Every request from here on goes to this server (those before were answered):
            # where the client's unnamed statement was parsed (ClientStatements).
            statements.link_start = scan.requests_total - client.outstanding
            if server.statements is None or statements.names or server.statements.strays:
                server.link_statements(client, at_link=True)

    def _unlink(self, client: ClientConn, server: ServerConn) -> None:
        client.request_at = server.query_started  # SHOW CLIENTS request_time
        client.server = None
        server.client = None
        server.last_client = client
        # Each side was paused for the other's sake only: unlinked, both may read again.
        if client.write_paused:
            server.transport.resume_reading()
        if server.write_paused:
            client.transport.resume_reading()

    def _hand_over(self, server: ServerConn, now: float = 0.0) -> None:
        """A clean, unlinked server: to the first waiter, or onto the idle list.

        A server past its lifetime is closed instead (a new one is opened in the background
        if a client waits or the pool is under min_pool_size), and so is any server nobody
        waits for in a null pool.
        """
        if server.cancels_in_flight:
            # A cancel request for its last client may still reach the backend: nobody
            # else gets it until PostgreSQL has answered them all (else the next client's
            # query could be the one cancelled).
            server.state = BEING_CANCELED
            return
        if not now:
            now = time.monotonic()
        if (
            now >= server.expires_at
            or len(self.servers) > self.max_servers
            or self.paused
            or self.give_back
        ):
            # Past its lifetime, the pool was shrunk or paused, or (workers) its place goes
            # to another worker's waiting clients.
            if self.give_back:
                self.give_back -= 1
            self.retire(server)
            return
        waiters = self.waiters
        while waiters:
            client = waiters.popleft()
            if client.closed:
                continue
            waited = now - client.wait_started_at
            stats = self.stats
            stats.wait_time += waited
            stats.waiters_served += 1
            if self.histograms is not None:
                self.histograms.wait.record(waited)
            self._link(client, server)
            client.flush_pending()
            return
        if self.null_pool:
            self.retire(server)
            return
        server.state = IDLE
        server.idle_since = server.checked_at = now
        self.idle.append(server)

    def transaction_done(self, client: ClientConn, server: ServerConn, now: float) -> None:
        """ReadyForQuery 'I' with nothing outstanding: count it; free the server if due.
        (ServerConn calls it through its ``transaction_done``: this, or, after a reply
        that may leave session state, suspect_transaction_done.)"""
        stats = self.stats
        stats.xact_count += 1
        if self.releases_at_idle:
            client.outstanding = 0  # never carry a miscount into the next transaction
            held = now - server.linked_at
            stats.xact_time += held
            record = self.record_transaction
            if record is not None:
                record(held)
            self._unlink(client, server)
            if self.reset_query:  # server_reset_query_always
                self._released(client, server, now)
                return
            self._hand_over(server, now)

    def suspect_transaction_done(
        self, client: ClientConn, server: ServerConn, now: float
    ) -> None:  # fmt: skip
        """transaction_done for a server whose replies carried a command that may leave
        session state (the BackendScanner's ``suspect``): the same, but its session is
        checked (transaction_state_guard) before anyone else gets it."""
        server.transaction_done = self.transaction_done
        if not self.releases_at_idle or self.guard == "off":
            self.transaction_done(client, server, now)
            return
        # (transaction_done's count, kept apart so that its own path pays nothing.)
        stats = self.stats
        stats.xact_count += 1
        client.outstanding = 0
        held = now - server.linked_at
        stats.xact_time += held
        if self.record_transaction is not None:
            self.record_transaction(held)
        self._unlink(client, server)
        self._released(client, server, now)

    def _released(self, client: ClientConn, server: ServerConn, now: float) -> None:
        """A clean server its client let go: checked for the session state the client may
        have left, reset (session mode, server_reset_query_always), or handed over."""
        if server.scan.suspect and self.guard != "off":
            server.check_state(CHECK_RELEASE, client)
        elif self.reset_query:
            self._reset(server)
        else:
            self._hand_over(server, now)

    def _reset(self, server: ServerConn) -> None:
        query = self.settings.reset_query
        if not query:  # (transaction_state_guard = reset without a server_reset_query)
            self.retire(server)
            return
        server.state = RESET
        server.run_hidden(query)

    def client_gone(self, client: ClientConn) -> None:
        """``client`` disconnected: leave the queue, and free or close its server."""
        server = client.server
        if server is None:
            if client.wait_started_at and client in self.waiters:
                self.waiters.remove(client)
            return
        self._unlink(client, server)
        clean = server.is_clean and client.outstanding <= 0 and not client.scan.holds_server
        if not clean:
            # In a transaction, or replies still owed: nobody else may ever see this state.
            # A vanished client's running query would keep its backend busy (and its locks
            # held) until it finished: cancel it, then close; PostgreSQL rolls back.
            # A client that said Terminate after its last query wants that query to run.
            if client.outstanding > 0 and not client.terminated:
                self.cancel_running_query(server)
            self.stats.returns_bad += 1
            self.retire(server)
        else:
            self._released(client, server, 0.0)

    def reset_done(self, server: ServerConn) -> None:
        """The reset query finished cleanly: the server is as new."""
        if self.guard != "off":
            # What the state check will compare with from now on: what the reset query
            # leaves (learnt once per server).
            if server.reset_state is None:
                server.check_state(CHECK_AFTER_RESET, None)
                return
            server.known_state = server.clean_state = server.reset_state
        self._hand_over(server)

    # -- transaction_state_guard -------------------------------------------------------

    def check_idle_state(self, server: ServerConn) -> None:
        """The janitor's state check of an idle server (off the idle list meanwhile)."""
        self.idle.remove(server)
        server.check_state(CHECK_PERIODIC, server.last_client)

    def state_checked(self, server: ServerConn, found: SessionState | str) -> None:
        """The state check on ``server`` answered: report what its last client left, then
        reset the server (transaction_state_guard = reset) or hand it over."""
        purpose, client = server.check_purpose, server.check_client
        server.check_client = None
        if isinstance(found, str):
            self.state_check_failed(found)
            # Unverified: under ``reset``, reset it all the same.
            reset = purpose == CHECK_RELEASE and self.guard == "reset"
        else:
            known, clean = server.known_state, server.clean_state
            server.known_state = found
            if purpose == CHECK_AFTER_RESET:
                server.reset_state = found
            if known is None or clean is None or purpose == CHECK_AFTER_RESET:
                server.clean_state = found
            left = []
            compare = purpose in (CHECK_RELEASE, CHECK_PERIODIC)  # (the others only learn)
            if compare and known is not None and clean is not None:
                left = state_guard.changes(known, found, clean)
            reset = bool(left) and self.guard == "reset"
            if left:
                resets = reset or (purpose == CHECK_RELEASE and bool(self.reset_query))
                self._state_leaked(client, left, purpose, resets)
        if reset or (purpose == CHECK_RELEASE and self.reset_query):
            self._reset(server)
        elif purpose == CHECK_PERIODIC:
            self.check_done(server)
        else:
            self._hand_over(server)

    def state_check_failed(self, reason: str) -> None:
        """A state check failed (a permission revoked, say): logged once per pool; that
        server's state is then not known, nor checked against."""
        if not self._check_failure_logged:
            self._check_failure_logged = True
            log.warning(
                "pool %s: the transaction_state_guard check failed (%s); session state left "
                "by clients is not detected on that server", self.name, reason,
            )  # fmt: skip

    def _state_leaked(
        self, client: ClientConn | None, left: list[tuple[str, str]], purpose: str,
        resets: bool,
    ) -> None:  # fmt: skip
        """Count, list and log (once per client and kind) the state ``client`` left;
        ``resets``: the server is reset (or closed) before anyone else gets it."""
        now = time.monotonic()
        action = "reset" if resets else "kept"
        if resets and not self.settings.reset_query:
            outcome = "the server is closed (no server_reset_query to reset it with)"
        elif resets:
            outcome = "server_reset_query runs before anyone else gets the server"
        else:
            outcome = "the next client of that server inherits it (transaction_state_guard = warn)"
        peer = client.transport.get_extra_info("peername") if client is not None else None
        for kind, detail in left:
            self.stats.state_leaks[kind] += 1
            self.state_leaks.add(
                StateLeak(
                    client.id if client is not None else 0,
                    client.user if client is not None else "",
                    self.database,
                    client.application_name if client is not None else "",
                    peer, kind, detail, action, now, now,
                )
            )  # fmt: skip
            if client is not None:
                if client.leaks_logged is None:
                    client.leaks_logged = set()
                elif kind in client.leaks_logged:
                    continue
                client.leaks_logged.add(kind)
            who = (
                f"client {client.id} (user {client.user}, database {client.database}, "
                f"application_name {client.application_name!r}, address {client.address})"
                if client is not None
                else "a client"
            )
            how = (
                "at the end of a transaction"
                if purpose == CHECK_RELEASE
                else "(found on an idle server it was the last to use)"
            )
            log.warning(
                "session state leak: %s left %s (%s) on its server %s; %s",
                who, _KIND_WORDS.get(kind, kind), detail, how, outcome,
            )  # fmt: skip

    def check(self, server: ServerConn, query: str, now: float) -> None:
        """server_check_query: test an idle server off the idle list (PgBouncer's 'tested')."""
        self.idle.remove(server)
        self._test(server, now)

    def _test(self, server: ServerConn, now: float) -> None:
        query = self.settings.check_query
        server.state = TESTED
        server.checked_at = now
        # PgBouncer's default, <empty>, is an empty query: the cheapest round trip.
        server.run_hidden("" if query == EMPTY_CHECK_QUERY else query)

    def check_done(self, server: ServerConn) -> None:
        """The check passed: to a waiter, or back to the idle list keeping its idle age."""
        if self.waiters or self.paused:  # (_hand_over closes it if the pool is paused)
            self._hand_over(server)
        else:
            server.state = IDLE
            self.idle.appendleft(server)  # it has been idle longest: keep the order

    def retire(self, server: ServerConn) -> None:
        """Close a server pgproxy no longer wants. It leaves the pool's lists now, not when
        the transport reports the close, so that nobody can be handed a closing server."""
        self._forget(server)
        server.close()

    def server_closed(self, server: ServerConn) -> None:
        """A server connection ended (by us or by PostgreSQL): forget it, replace if needed."""
        self._forget(server)
        if not server.closing:
            self.stats.connections_lost += 1  # PostgreSQL or the network closed it
        if server.holds_budget:
            server.holds_budget = False
            for budget in self.budgets:
                budget.release()
        self.grow()

    def _forget(self, server: ServerConn) -> None:
        if server.statements is not None:
            server.statements.release()
            server.statements = server.scan.statements = server.scan.ledger = None
        self.servers.discard(server)
        if server in self.idle:
            self.idle.remove(server)

    # -- background growth -------------------------------------------------------------

    def grow(self) -> None:
        # One new server per waiting client, and up to min_pool_size, within the pool size;
        # always opened in the background, and not while backing off after failures.
        if self.paused or not self.reconnect.may_try(time.monotonic()):
            return
        while len(self.servers) + self.connecting < self.size and (
            self.connecting < len(self.waiters)
            or len(self.servers) + self.connecting < self.min_size
        ):
            if not self.take_budgets():
                return
            self.open_server()

    def take_budgets(self, reserve: bool = False) -> bool:
        """Take a place in every budget for one more server (all or none); open_server
        must follow a True. Past max_db_connections / max_user_connections (or, with
        workers, the shared pool_size), a pool with waiters takes the place of another
        pool's idle server (PgBouncer instead waits for that server's idle timeout); a pool
        merely below min_pool_size waits."""
        taken: list[ServerBudget] = []
        for budget in self.budgets:
            if not budget.take(reserve):
                for held in taken:
                    held.give_back()
                if self.waiters:
                    budget.evict_idle(self)
                self.grow_blocked_until = time.monotonic() + BUDGET_RETRY
                return False
            taken.append(budget)
        return True

    async def _wait_for_budget(self) -> bool:
        # A first login needs a server like a waiting client does: under a full budget it
        # takes an idle sibling's place, within the connect timeout. True: it returns with
        # the places taken; False: without, because another first login started the
        # attempt meanwhile (its outcome is all this login needs; waiting on for a place
        # of its own could last the whole timeout while the pool sits full and serving).
        deadline = time.monotonic() + self.connect_timeout
        while not self.take_budgets():
            if self._attempting_welcome():
                return False
            if time.monotonic() >= deadline:
                raise ServerLoginError(
                    codes.TOO_MANY_CONNECTIONS,
                    "no server connection available (max_db_connections/max_user_connections)",
                )
            for budget in self.budgets:
                if budget.full:
                    budget.evict_idle(self)
            await asyncio.sleep(0.05)
        return True

    def _attempting_welcome(self) -> bool:
        return self._welcome_attempt is not None and not self._welcome_attempt.done()

    def _give_back_budget(self) -> None:
        for budget in self.budgets:
            budget.give_back()

    def cancel_running_query(self, server: ServerConn) -> None:
        """Ask PostgreSQL to cancel what ``server`` runs now (background, best effort)."""
        if server.backend_key:
            server.cancels_in_flight += 1
            self._track(self._cancel(server))

    async def _cancel(self, server: ServerConn) -> None:
        try:
            await cancel_backend(self.target, server.backend_pid, server.backend_key, server.host)
        finally:
            server.cancels_in_flight -= 1
            if server.cancels_in_flight == 0 and server.state is BEING_CANCELED:
                self._hand_over(server)


    def _track(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = self._loop.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def open_server(self) -> asyncio.Future[None]:
        """Start a background task that opens one server; its future tells how it went."""
        outcome: asyncio.Future[None] = self._loop.create_future()
        # Its failure is the pool's to handle (backoff, queued clients): marked as read so
        # that an outcome nobody awaits is never reported as an unretrieved exception.
        outcome.add_done_callback(_mark_read)
        self.connecting += 1
        # (Its budget places, taken before, are given back by server_closed, or below if
        # the attempt fails.)
        self._track(self._open_server(outcome))
        return outcome

    async def _open_server(self, outcome: asyncio.Future[None]) -> None:
        started = time.monotonic()
        try:
            server = await connect_server(self, self.connect_timeout)
        except ServerLoginError as exc:
            self.stats.connections_errors += 1
            self.connecting -= 1
            self._give_back_budget()
            self.reconnect.failed(
                time.monotonic(), exc, exc.message, started,
                starting_or_stopping=exc.sqlstate == codes.CANNOT_CONNECT_NOW,
            )  # fmt: skip
            outcome.set_exception(exc)
            self._refuse_waiters(exc)
            return
        except asyncio.CancelledError:
            self.connecting -= 1
            self._give_back_budget()
            outcome.cancel()
            raise
        except Exception:
            self.stats.connections_errors += 1
            self.connecting -= 1
            self._give_back_budget()
            log.exception("pool %s: unexpected error opening a server", self.name)
            error = ServerLoginError(codes.INTERNAL_ERROR, "server connection failed")
            self.reconnect.failed(time.monotonic(), error, error.message)
            outcome.set_exception(error)
            return
        self.connecting -= 1
        self.stats.connections_num += 1
        took = time.monotonic() - started
        self.stats.connections_time += took
        if self.histograms is not None:
            self.histograms.connect.observe(took)
        server.holds_budget = True
        self.reconnect.succeeded()
        if self.settings.lifetime > 0:
            # Each server's lifetime is cut by up to 10% so that servers opened together
            # are not all recycled together.
            server.expires_at = server.connected_at + self.settings.lifetime * (
                1 - 0.1 * random.random()
            )
        self.servers.add(server)
        if self.welcome is None:
            self.welcome = list(server.login_params)
            self.welcome_values = server.params
        outcome.set_result(None)
        server.scan.guard(self.guard != "off")
        self._hand_over(server)

    def _refuse_waiters(self, error: ServerLoginError) -> None:
        """PostgreSQL refused the login (PgBouncer's kill_pool_logins): while the pool has
        no server, its queued clients get that error now rather than a timeout later.
        An unreachable server, or one starting up or shutting down (57P03), is waited for
        instead: it is likely back soon, and the clients' transactions then run."""
        if self.servers or error.transient:
            return
        waiters, self.waiters = self.waiters, deque()
        for client in waiters:
            client.wait_started_at = 0.0
            client.fatal(error.sqlstate, error.message)

    def parameter_statuses(self, values: tracked.ParamValues) -> bytes:
        """The ParameterStatus messages that welcome a client whose tracked settings are
        ``values``: the first server's parameters, the client's own values for the tracked
        ones. Built once per set of values (a few hundred kept)."""
        found = self._greetings.get(values)
        if found is None:
            assert self.welcome is not None
            parts = []
            for name, value in self.welcome:
                index = tracked.tracked_index(name)
                shown = values[index] if index is not None else value
                parts.append(messages.parameter_status(name, shown))
            if len(self._greetings) >= 256:
                self._greetings.clear()
            found = self._greetings[values] = b"".join(parts)
        return found

    async def ensure_welcome(self) -> None:
        """Make sure the server's welcome parameters are known: log in one server if needed.

        Concurrent first logins share one attempt. When PostgreSQL refuses the login, its
        ServerLoginError reaches them all; when it cannot be reached or is starting up or
        shutting down, they keep waiting for the next attempt (as PgBouncer's waiting
        logins do; client_login_timeout bounds the wait). A login that arrives while the
        pool backs off gets the last error at once (server_login_retry).
        """
        if self.welcome is not None:
            return
        last_error = self.reconnect.last_error
        if isinstance(last_error, ServerLoginError) and self.reconnect.failing_since is not None:
            # PgBouncer's fast fail: until a login works again, a new client gets the last
            # error at once, and the pool tries again in the background when the backoff
            # allows (else nothing would ever try).
            if self.reconnect.may_try(time.monotonic()):
                self._track(self._start_welcome_attempt())
            raise ServerLoginError(
                last_error.sqlstate,
                f"server login has been failing, cached error: {last_error.message} "
                "(server_login_retry)",
                transient=False,
            )
        # (Not `while self.welcome is None`: after the test above mypy takes the attribute
        # for None for good, and compiled code checks each read against that, though the
        # attempt awaited below sets it.)
        while not self._has_welcome():
            await self._start_welcome_attempt()
            assert self._welcome_attempt is not None
            try:
                await asyncio.shield(self._welcome_attempt)
            except ServerLoginError as exc:
                if not exc.transient:
                    raise
                await asyncio.sleep(max(0.05, self.reconnect.retry_at - time.monotonic()))

    def _has_welcome(self) -> bool:
        return self.welcome is not None

    async def _start_welcome_attempt(self) -> None:
        """Open the pool's first server, unless an attempt is under way (it is shared)."""
        if self._attempting_welcome():
            return
        placed = await self._wait_for_budget()
        if placed and not self._attempting_welcome() and self.welcome is None:
            self._welcome_attempt = self.open_server()
        elif placed:  # another first login started one meanwhile: share its outcome
            self._give_back_budget()

    # -- reload ----------------------------------------------------------------------------

    def reconfigure(self, settings: PoolSettings, target: ServerTarget) -> None:
        """Apply reloaded settings: sizes, timeouts, limits and the mode, now.

        A smaller pool closes idle servers now and busy ones as they come free; a larger
        one opens servers for its waiters at once. Servers of a changed target (host, port,
        database, user or password) are replaced as they come free. A new pool_mode holds
        from each client's next transaction (as in PgBouncer); max_prepared_statements
        from each server's next statement.
        """
        if settings.mode != self.mode:
            log.info("pool %s: pool_mode %s -> %s", self.name, self.mode, settings.mode)
            self.mode = settings.mode
            self.statement_mode = settings.mode == "statement"
            self.releases_at_idle = settings.mode != "session"
        guard = _guard(settings)
        if guard != self.guard:
            self.guard = guard
            for server in self.servers:
                server.scan.guard(guard != "off")
            if guard != "off":
                # What the idle servers hold now is no client's doing: learnt first. (A
                # linked server's is learnt by the check after its client's transaction.)
                for server in [server for server in self.idle if server.known_state is None]:
                    self.idle.remove(server)
                    server.check_state(CHECK_FIRST, None)
        for server in self.servers:
            if server.statements is not None and settings.max_prepared_statements > 0:
                server.statements.capacity = settings.max_prepared_statements
        self.settings = settings
        self.size = settings.size
        self.null_pool = settings.null_pool
        self.single_use = settings.lifetime == 0
        self.check_before_use = bool(settings.check_query) and settings.check_delay == 0
        self.max_servers = settings.size + settings.reserve_size
        self.min_size = min(settings.min_size, settings.size)
        self.reset_query = (
            settings.reset_query if settings.mode == "session" or settings.reset_always else ""
        )
        self.connect_timeout = settings.connect_timeout
        self.reconnect.max_delay = settings.login_retry
        self.reconnect.timeout = settings.reconnect_timeout
        self.reconnect.hook = settings.reconnect_failed
        if target != self.target:
            self.target = target
            for server in self.servers:
                server.expires_at = 0.0  # "database configuration changed"
        excess = len(self.servers) - self.size - settings.reserve_size
        for server in list(self.idle):
            if server.expires_at == 0.0 or excess > 0:
                excess -= 1
                self.retire(server)
        self.grow()

    # -- console control -------------------------------------------------------------------

    def pause(self) -> None:
        """Hand out no server and open none; close each as it comes free (idle ones now)."""
        self.paused = True
        for server in list(self.idle):
            self.retire(server)

    def resume(self) -> None:
        """Serve again: open servers for the clients that waited meanwhile."""
        self.paused = False
        self.grow()

    def reconnect_all(self) -> None:
        """Close every server once it is free (RECONNECT): the idle ones now."""
        for server in self.servers:
            server.expires_at = 0.0
        for server in list(self.idle):
            self.retire(server)

    @property
    def close_needed(self) -> int:
        """Servers marked to be closed once free (RECONNECT, a changed target)."""
        return sum(1 for server in self.servers if server.expires_at == 0.0)

    def server_states(self) -> Counter[str]:
        """How many servers are in each state; 'login' counts those being opened."""
        states = Counter(server.state for server in self.servers)
        states["login"] = self.connecting
        return states

    def oldest_waiter(self) -> ClientConn | None:
        """The client that has waited longest for a server, if any still waits."""
        return next((client for client in self.waiters if not client.closed), None)

    @property
    def linked(self) -> int:
        """Servers linked to a client now."""
        return sum(1 for server in self.servers if server.client is not None)

    # -- shutdown ------------------------------------------------------------------------

    def close_all(self) -> None:
        """Close every server now (shutdown)."""
        for server in list(self.servers):
            server.close()
        for task in list(self._tasks):
            task.cancel()


def _guard(settings: PoolSettings) -> Guard:
    """transaction_state_guard in force: off in session mode, where nobody else gets the
    server until the client leaves (and server_reset_query runs)."""
    return "off" if settings.mode == "session" else settings.state_guard


def _mark_read(outcome: asyncio.Future[None]) -> None:
    if not outcome.cancelled():
        outcome.exception()
