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
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, Final

from mypy_extensions import mypyc_attr

from pgproxy.config import EMPTY_CHECK_QUERY, PoolMode, PoolSettings
from pgproxy.core import params as tracked
from pgproxy.core import state_guard
from pgproxy.core.histograms import Histogram, PoolHistograms
from pgproxy.core.reconnect import Reconnect
from pgproxy.core.server import (
    ACTIVE,
    BEING_CANCELED,
    CLOSED,
    IDLE,
    LOGIN,
    RESET,
    TESTED,
    HostChooser,
    LinkedClient,
    ServerConn,
    ServerLoginError,
    ServerOwner,
    ServerTarget,
    cancel_backend,
    connect_server,
)
from pgproxy.core.state_guard import Guard, RecentLeaks, SessionState, StateLeak
from pgproxy.core.states import ClientState, ServerState
from pgproxy.protocol import codes, messages
from pgproxy.protocol.prepared import Registry
from pgproxy.protocol.server_login import Credential
from pgproxy.stats import PoolStats
from pgproxy.tls import ServerTls

log = logging.getLogger("pgproxy.pool")

# Client states as the pool sees them (module names: the hot path reads them).
CLIENT_IDLE: Final = ClientState.IDLE
CLIENT_WAITING: Final = ClientState.WAITING
CLIENT_ACTIVE: Final = ClientState.ACTIVE

# Why a state check runs (transaction_state_guard): the first on a server that was not
# checked at its login (the guard was off then), the one after its reset query ran (both
# only learn the state), after a transaction whose replies carried a suspect tag, and the
# janitor's on an idle server. (A new server's first check is part of its login.)
CHECK_FIRST: Final = "first"
CHECK_AFTER_RESET: Final = "after reset"
CHECK_RELEASE: Final = "release"
CHECK_PERIODIC: Final = "periodic"

_KIND_WORDS = {
    "set": "settings changed by SET",
    "listen": "LISTEN channels",
    "prepare": "SQL PREPAREd statements",
    "cursor": "WITH HOLD cursors",
    "temp_table": "temporary tables",
    "advisory_lock": "session advisory locks",
}

NO_SERVER_TLS = ServerTls("disable", None)

# Opens and logs in one server for a pool within a timeout; raises ServerLoginError.
Connector = Callable[["Pool", float], Awaitable[ServerConn]]

# Seconds a queued request does not retry opening a server after a budget refused one. A
# local budget wakes its pools when a place frees (ServerBudget.release); one shared with
# other workers cannot, so queued requests poll it, and the janitor retries too.
BUDGET_RETRY: Final = 0.02


NO_SERVER_TLS = ServerTls("disable", None)  # server_tls_sslmode = disable


# Compiled, a class refuses Python subclasses unless told: workers.SharedServerBudget is one.
@mypyc_attr(allow_interpreted_subclasses=True)
class ServerBudget:
    """A cap on server connections shared by several pools: max_db_connections for the
    pools of one database, max_user_connections for the pools of one user, and with
    workers a pool's pool_size over all of them.

    What every budget does; how places are counted is its implementation's:
    ``LocalServerBudget`` counts this process's servers, ``workers.SharedServerBudget``
    those of every worker.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit  # 0: no limit
        self.evicting = False  # an idle server is closing to make room
        self.pools: list[Pool] = []  # (each pool adds itself when it is made)

    @property
    def used(self) -> int:
        """Servers connecting or connected under this budget, counted until their
        connection is really closed: PostgreSQL counts a closing backend too."""
        raise NotImplementedError

    @property
    def full(self) -> bool:
        """No server may be opened under this budget now."""
        raise NotImplementedError

    def take(self, reserve: bool) -> bool:
        """Take a place for a server about to be opened (``reserve``: a reserve_pool one)."""
        raise NotImplementedError

    def give_back(self) -> None:
        """A place taken for a server that was not opened after all."""
        raise NotImplementedError

    def evict_idle(self, needy: Pool) -> None:
        """Make room for ``needy``'s waiting clients: close one idle server of another pool
        under this budget; the room exists once that connection has closed
        (Pool.server_closed wakes ``needy``)."""
        if not self.evicting:
            self._close_idle_of_another(needy)

    def _close_idle_of_another(self, needy: Pool) -> bool:
        for pool in self.pools:
            if pool is not needy and pool.idle:
                self.evicting = True
                pool.retire(pool.idle[0])
                return True
        return False

    def release(self) -> None:
        """A server under this budget has closed: its place is free; wake a waiting pool."""
        self.give_back()
        self.evicting = False
        for pool in self.pools:
            if pool.waiters:
                pool.grow_blocked_until = 0.0
                pool.grow()


class LocalServerBudget(ServerBudget):
    """A ServerBudget of this process alone (no workers)."""

    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.count = 0

    @property
    def used(self) -> int:
        return self.count

    @property
    def full(self) -> bool:
        return 0 < self.limit <= self.count

    def take(self, reserve: bool) -> bool:
        if 0 < self.limit <= self.count:
            return False
        self.count += 1
        return True

    def give_back(self) -> None:
        self.count -= 1


class Pool(ServerOwner):
    """Server connections for one (database, user) and the clients that share them."""

    def __init__(
        self,
        database: str,
        user: str,
        target: ServerTarget,
        settings: PoolSettings,
        budgets: tuple[ServerBudget, ...] = (),
        *,
        paused: bool = False,
        server_tls: ServerTls = NO_SERVER_TLS,
        credential_for: Callable[[str], Credential | None] | None = None,
        statement_registry: Registry | None = None,
        query_wait_timeout: float = 0.0,
        histograms: PoolHistograms | None = None,
        connect: Connector = connect_server,
    ) -> None:
        """``budgets``: the caps this pool's servers count under (each learns of the pool
        here); ``paused``: its database is paused (PAUSE/KILL); ``server_tls``: how servers
        ask for TLS; ``credential_for``: the passthrough credential of a user when the
        target has no password; ``statement_registry``: the named prepared statements
        shared by every pool of the daemon; ``query_wait_timeout``: the one in force for the
        pool's user (a metrics gauge); ``histograms``: observe waits, queries and
        transactions (None: metrics off); ``connect``: opens and logs in one server."""
        self.database = database
        self.user = user
        self.name = f"{database}/{user}"
        self.target = target
        self.host_index = 0  # the target's host the next server connection tries first
        # target_session_attrs / max_replica_lag over the hosts (None: connect in order).
        # target_session_attrs, max_replica_lag: set by pgproxy.core.hosts (a HostPolicy).
        self.host_policy: HostChooser | None = None
        self.settings = settings
        self.mode: PoolMode = settings.mode
        self._take_settings(settings)
        self.budgets = budgets
        for budget in budgets:
            budget.pools.append(self)
        self.statement_mode = settings.mode == "statement"
        self.releases_at_idle = settings.mode != "session"
        self.guard: Guard = _guard(settings)
        self.state_leaks = RecentLeaks()  # SHOW LEAKS
        self._check_failure_logged = False
        # A list per server state (pgproxy.core.states), kept by change_server_state (an
        # ACTIVE server is held by its client instead); and every logged-in server,
        # whatever its state.
        # The longest idle first. A list, not a deque: compiled, its append, pop and [-1]
        # are native operations, and only the rare ``oldest`` return inserts at the front.
        self.idle: list[ServerConn] = []
        self.used: set[ServerConn] = set()  # RESET
        self.tested: set[ServerConn] = set()
        self.being_canceled: set[ServerConn] = set()
        self.servers: set[ServerConn] = set()
        self.oversized = False  # more servers than max_servers: close them as they free up
        # Clients queued for a server (kept by change_client_state), first come first served.
        self.waiters: deque[LinkedClient] = deque()
        self.connecting = 0
        # Places for replication connections (pgproxy.core.replication), made at the first one.
        self.replication_slots: asyncio.Semaphore | None = None
        self.grow_blocked_until = 0.0  # (monotonic) see BUDGET_RETRY
        # Workers: servers to close at the ends of transactions, their places wanted by
        # another worker whose clients wait below its share (SharedServerBudget.balance).
        self.give_back = 0
        # PAUSE, KILL, SUSPEND or a waiting shutdown: no server is handed out or opened,
        # and each one is closed as it comes free.
        self.paused = paused
        # SHUTDOWN WAIT_FOR_SERVERS: a client that needs a server is told goodbye instead.
        self.shutting_down = False
        self.stats = PoolStats()
        # Histograms for /metrics (None when metrics are off: nothing is observed), and the
        # hot path's shortcuts to two of them (see ``measure``).
        self.histograms: PoolHistograms | None = None
        self.query_histogram: Histogram | None = None
        self.transaction_histogram: Histogram | None = None
        if histograms is not None:
            self.measure(histograms)
        self.query_wait_timeout = query_wait_timeout  # for this pool's user (a metrics gauge)
        self.server_tls = server_tls
        # Named prepared statements: shared by every pool of the daemon.
        self.statement_registry = (
            statement_registry if statement_registry is not None else Registry()
        )
        # Passthrough: the server login's credential when the target has no password.
        self.credential_for = credential_for
        self.connect = connect
        # ParameterStatus values of the first server: what every client is told at login.
        self.welcome: list[tuple[str, str]] | None = None
        self.welcome_values: tracked.ParamValues = tracked.EMPTY
        # The ParameterStatus messages of a welcome, per set of client values (logins of
        # one application mostly share one).
        self._greetings: dict[tracked.ParamValues, bytes] = {}
        self._last_greeted: tracked.ParamValues | None = None  # and its greeting:
        self._last_greeting = b""
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
        self.query_histogram = histograms.query
        self.transaction_histogram = histograms.transaction

    def size_limit(self, reserve: bool) -> int:
        """Servers this pool may have (with its reserve when ``reserve``)."""
        return self.max_servers if reserve else self.size

    # -- states: the one place each changes -------------------------------------------

    def change_server_state(
        self, server: ServerConn, state: ServerState, client: LinkedClient | None = None, *,
        oldest: bool = False,
    ) -> None:  # fmt: skip
        """Set ``server``'s state and move it to that state's list in one step (taken off
        the list of the state it leaves).

        ACTIVE means linked to ``client``: entering it makes the link (the client is
        ACTIVE from then on), leaving it ends the link. Into IDLE a server goes to the warm
        end of the idle list, or with ``oldest`` to the end whose servers have been idle
        longest. A server leaving LOGIN joins ``servers``; one entering CLOSED leaves it
        for good. This is the critical section: plain code in one callback.
        """
        # (The hot path makes two changes per transaction, IDLE -> ACTIVE and back: they
        # are tested first. An ACTIVE server is on no list: its client holds it.)
        old = server.state
        if old is IDLE:
            idle = self.idle
            if idle[-1] is server:  # (the usual: the warmest server is taken)
                idle.pop()
            else:
                idle.remove(server)
        elif old is ACTIVE:
            linked = server.client
            if TYPE_CHECKING:  # (an ACTIVE server always has one)
                assert linked is not None
            linked.request_at = server.query_started  # SHOW CLIENTS request_time
            linked.server = None
            server.client = None
            server.last_client = linked
            # Each side was paused for the other's sake only: unlinked, both may read again.
            if linked.write_paused:
                server.transport.resume_reading()
            if server.write_paused:
                linked.transport.resume_reading()
        elif old is CLOSED:
            if state is CLOSED:
                return
            raise ValueError(f"server {server.id} is closed: it cannot become {state}")
        elif old is LOGIN:
            if state is not CLOSED:
                self.servers.add(server)
                self.oversized = len(self.servers) > self.max_servers
        else:
            self._list_of(old).remove(server)
        server.state = state
        if state is ACTIVE:
            if TYPE_CHECKING:  # (callers always pass one)
                assert client is not None
            client.server = server
            server.client = client
            server.linked_at = server.query_started = server.clock()
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
        elif state is IDLE:
            if oldest:
                self.idle.insert(0, server)
            else:
                self.idle.append(server)
        elif state is CLOSED:
            self.servers.discard(server)
            self.oversized = len(self.servers) > self.max_servers
        else:
            self._list_of(state).add(server)

    def _list_of(self, state: ServerState) -> set[ServerConn]:
        """The list of the servers in ``state`` (RESET, TESTED or BEING_CANCELED)."""
        if state is RESET:
            return self.used
        if state is TESTED:
            return self.tested
        assert state is BEING_CANCELED
        return self.being_canceled

    def change_client_state(
        self, client: LinkedClient, state: ClientState, server: ServerConn | None = None, *,
        first: bool = False,
    ) -> None:  # fmt: skip
        """Move a client that has no server to where ``state`` keeps it, which is its
        state as this pool sees it (``LinkedClient.pool_state`` reads it back): WAITING on
        the queue of waiters (``first``: at its head; ``wait_started_at`` says since
        when), IDLE off it, ACTIVE linked to ``server`` (off the queue if it waited).

        A link is the server's state as much as the client's: change_server_state makes
        it (asked here) and ends it when the server moves on."""
        if client.wait_started_at:  # leaving WAITING: off the queue
            waiters = self.waiters
            if waiters[0] is client:  # (the usual: the first waiter is served)
                waiters.popleft()
            else:
                waiters.remove(client)
            client.wait_started_at = 0.0
        if state is CLIENT_ACTIVE:
            if TYPE_CHECKING:  # (callers always pass one)
                assert server is not None
            self.change_server_state(server, ACTIVE, client)
        elif state is CLIENT_WAITING:
            client.wait_started_at = time.monotonic()
            if first:
                self.waiters.appendleft(client)
            else:
                self.waiters.append(client)

    # -- the critical section: linking clients and servers ---------------------------

    def acquire(self, client: LinkedClient) -> ServerConn | None:
        """Link an idle server to ``client`` now, or queue the client and return None."""
        if self.idle and not self.paused:
            # LIFO, PgBouncer's default: the warmest server, the load on as few as can take
            # it. server_round_robin: the one idle longest, the load spread over them all.
            server = self.idle[0] if self.round_robin else self.idle[-1]
            if self.check_before_use:  # server_check_delay = 0: test it first
                self.change_client_state(client, CLIENT_WAITING, first=True)
                self._test(server, client.wait_started_at)
                return None
            # (A client with no server and not queued: its link is all there is to make.)
            self.change_server_state(server, ACTIVE, client)
            histograms = self.histograms
            if histograms is not None:
                histograms.wait.first += 1  # no wait: the first bucket (observe(0.0))
            return server
        if self.shutting_down:
            client.fatal(codes.ADMIN_SHUTDOWN, "server shutting down")
            return None
        if 0 < self.settings.max_waiting <= len(self.waiters):
            self.stats.requests_errors += 1
            client.fatal(codes.TOO_MANY_CONNECTIONS, "too many clients waiting (max_waiting)")
            return None
        self.stats.requests_queued += 1
        self.change_client_state(client, CLIENT_WAITING)
        now = client.wait_started_at
        # (grow has nothing to do in a full pool, nor right after a budget said no.)
        if len(self.servers) + self.connecting < self.size and now >= self.grow_blocked_until:
            self.grow()
        return None

    def hand_over(self, server: ServerConn, now: float = 0.0) -> None:
        """The hand-over of a clean server (see _hand_over): a null pool's closes a server
        nobody waits for. (A method that tests a flag, not a bound method kept in an
        attribute: compiled, a native call, where calling an attribute parses its
        arguments, once per transaction.)"""
        if self.null_pool:
            self._hand_over_or_close(server, now)
        else:
            self._hand_over(server, now)

    def _hand_over(self, server: ServerConn, now: float = 0.0) -> None:
        """A clean server its client let go (the link ends with the change made here): to
        the first waiter, or onto the idle list.

        A server past its lifetime is closed instead (a new one is opened in the background
        if a client waits or the pool is under min_pool_size).
        """
        if server.cancels_in_flight:
            # A cancel request for its last client may still reach the backend: nobody
            # else gets it until PostgreSQL has answered them all (else the next client's
            # query could be the one cancelled).
            self.change_server_state(server, BEING_CANCELED)
            return
        if not now:
            now = time.monotonic()
        if now >= server.expires_at or self.oversized or self.paused or self.give_back:
            # Past its lifetime, the pool was shrunk or paused, or (workers) its place goes
            # to another worker's waiting clients.
            if self.give_back:
                self.give_back -= 1
            self.retire(server)
            return
        waiters = self.waiters
        while waiters:
            client = waiters[0]
            if client.closed:
                self.change_client_state(client, CLIENT_IDLE)
                continue
            waited = now - client.wait_started_at
            stats = self.stats
            stats.wait_time += waited
            stats.waiters_served += 1
            if self.histograms is not None:
                self.histograms.wait.observe(waited)
            self.change_client_state(client, CLIENT_ACTIVE, server)
            client.flush_pending()
            return
        self.change_server_state(server, IDLE)
        server.idle_since = server.checked_at = now

    def _hand_over_or_close(self, server: ServerConn, now: float = 0.0) -> None:
        """null_pool's hand-over: a server nobody waits for is closed rather than kept
        idle, so that each transaction (or session) runs on a fresh server unless a client
        already waits for this one."""
        if server.cancels_in_flight or self.give_back or self.oldest_waiter() is not None:
            self._hand_over(server, now)
        else:
            self.retire(server)

    def transaction_done(self, client: LinkedClient, server: ServerConn, now: float) -> None:
        """ReadyForQuery 'I' with nothing outstanding: count it; free the server if due.
        (ServerConn calls this, or, after a reply that may leave session state,
        suspect_transaction_done.)"""
        stats = self.stats
        stats.xact_count += 1
        if self.releases_at_idle:
            client.outstanding = 0  # never carry a miscount into the next transaction
            held = now - server.linked_at
            stats.xact_time += held
            histogram = self.transaction_histogram
            if histogram is not None:
                histogram.observe(held)
            # (The link ends with the server's next state: idle, another client's, reset,
            # checked or closed.)
            if self.reset_query:  # server_reset_query_always
                self._released(client, server, now)
                return
            self.hand_over(server, now)

    def suspect_transaction_done(
        self, client: LinkedClient, server: ServerConn, now: float
    ) -> None:  # fmt: skip
        """transaction_done for a server whose replies carried a command that may leave
        session state (the BackendScanner's ``suspect``): the same, but its session is
        checked (transaction_state_guard) before anyone else gets it."""
        server.suspect_done = False
        if not self.releases_at_idle or self.guard == "off":
            self.transaction_done(client, server, now)
            return
        # (transaction_done's count, kept apart so that its own path pays nothing.)
        stats = self.stats
        stats.xact_count += 1
        client.outstanding = 0
        held = now - server.linked_at
        stats.xact_time += held
        if self.transaction_histogram is not None:
            self.transaction_histogram.observe(held)
        self._released(client, server, now)

    def _released(self, client: LinkedClient, server: ServerConn, now: float) -> None:
        """A clean server its client let go: checked for the session state the client may
        have left, reset (session mode, server_reset_query_always), or handed over."""
        if server.scan.suspect and self.guard != "off":
            self._check_state(server, CHECK_RELEASE, client)
        elif self.reset_query:
            self._reset(server)
        else:
            self.hand_over(server, now)

    def _reset(self, server: ServerConn) -> None:
        query = self.settings.reset_query
        if not query:  # (transaction_state_guard = reset without a server_reset_query)
            self.retire(server)
            return
        self.change_server_state(server, RESET)
        server.run_hidden(query)

    def client_gone(self, client: LinkedClient) -> None:
        """``client`` disconnected: leave the queue, and free or close its server."""
        server = client.server
        if server is None:
            self.change_client_state(client, CLIENT_IDLE)  # (off the queue if it waited)
            return
        # (The link ends with the server's next state, below.)
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
                self._check_state(server, CHECK_AFTER_RESET, None)
                return
            server.known_state = server.clean_state = server.reset_state
        self.hand_over(server)

    # -- transaction_state_guard -------------------------------------------------------

    def check_idle_state(self, server: ServerConn) -> None:
        """The janitor's state check of an idle server (off the idle list meanwhile)."""
        self._check_state(server, CHECK_PERIODIC, server.last_client)

    def _check_state(self, server: ServerConn, purpose: str, client: LinkedClient | None) -> None:
        self.change_server_state(server, TESTED)
        server.check_state(purpose, client)

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
            self.hand_over(server)

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
        self, client: LinkedClient | None, left: list[tuple[str, str]], purpose: str,
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
        self._test(server, now)

    def _test(self, server: ServerConn, now: float) -> None:
        query = self.settings.check_query
        self.change_server_state(server, TESTED)
        server.checked_at = now
        # PgBouncer's default, <empty>, is an empty query: the cheapest round trip.
        server.run_hidden("" if query == EMPTY_CHECK_QUERY else query)

    def check_done(self, server: ServerConn) -> None:
        """The check passed: to a waiter, or back to the idle list keeping its idle age."""
        if self.waiters or self.paused:  # (_hand_over closes it if the pool is paused)
            self.hand_over(server)
        else:
            # It has been idle longest: back to that end, its idle age kept.
            self.change_server_state(server, IDLE, oldest=True)

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
        self.change_server_state(server, CLOSED)

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
                self.hand_over(server)

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
            server = await self.connect(self, self.connect_timeout)
        except ServerLoginError as exc:
            self.stats.connections_errors += 1
            self.connecting -= 1
            self._give_back_budget()
            # (As PgBouncer logs it: "server login failed: FATAL database "x" does not exist".)
            logged = f"{exc.severity} {exc.message}" if exc.severity else exc.message
            self.reconnect.failed(
                time.monotonic(), exc, logged, started,
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
        # Logged in: one of the pool's servers (idle for the instant until its hand-over,
        # which counts it against max_servers like the others).
        self.change_server_state(server, IDLE)
        if self.welcome is None:
            self.welcome = list(server.login_params)
            self.welcome_values = server.params
        outcome.set_result(None)
        server.scan.guard(self.guard != "off")
        self.hand_over(server)

    def _refuse_waiters(self, error: ServerLoginError) -> None:
        """PostgreSQL refused the login (PgBouncer's kill_pool_logins): while the pool has
        no server that will serve again (none, or only ones RECONNECT or a changed
        configuration made obsolete), its queued clients get that error now rather than a
        timeout later. An unreachable server, or one starting up or shutting down (57P03),
        is waited for instead: it is likely back soon, and the clients' transactions then
        run."""
        if error.transient or any(server.expires_at != 0.0 for server in self.servers):
            return
        for client in list(self.waiters):
            self.change_client_state(client, CLIENT_IDLE)
            client.fatal(error.sqlstate, error.message)

    def parameter_statuses(self, values: tracked.ParamValues) -> bytes:
        """The ParameterStatus messages that welcome a client whose tracked settings are
        ``values``: the first server's parameters, the client's own values for the tracked
        ones. Built once per set of values (a few hundred kept)."""
        if values is self._last_greeted:  # (the same login again: no tuple hashed)
            return self._last_greeting
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
        self._last_greeted, self._last_greeting = values, found
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

    def _take_settings(self, settings: PoolSettings) -> None:
        """What the pool reads from its settings on its paths, kept as its own fields (the
        settings are an interpreted object): at creation and at every reconfigure."""
        self.tracks_statements = settings.max_prepared_statements > 0  # read at each login
        self.size = settings.size
        self.min_size = min(settings.min_size, settings.size)
        self.max_servers = settings.size + settings.reserve_size  # more: close when free
        self.reset_query = (
            settings.reset_query if settings.mode == "session" or settings.reset_always else ""
        )
        self.connect_timeout = settings.connect_timeout
        self.null_pool = settings.null_pool  # (see hand_over)
        self.single_use = settings.lifetime == 0  # PgBouncer's server_lifetime = 0
        # server_check_delay = 0: every idle server is tested before a client gets it.
        self.check_before_use = bool(settings.check_query) and settings.check_delay == 0
        self.round_robin = settings.round_robin  # server_round_robin: see acquire

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
                    self._check_state(server, CHECK_FIRST, None)
        for server in self.servers:
            if server.statements is not None and settings.max_prepared_statements > 0:
                server.statements.capacity = settings.max_prepared_statements
        self.settings = settings
        self._take_settings(settings)
        self.oversized = len(self.servers) > self.max_servers
        self.reconnect.max_delay = settings.login_retry
        self.reconnect.timeout = settings.reconnect_timeout
        self.reconnect.hook = settings.reconnect_failed
        if target != self.target:
            self.target = target
            if self.servers:
                log.info(
                    "pool %s: database configuration changed: its servers are closed once "
                    "free", self.name,
                )  # fmt: skip
            for server in self.servers:
                server.expires_at = 0.0
        excess = len(self.servers) - self.size - settings.reserve_size
        for server in list(self.idle):
            if server.expires_at == 0.0 or excess > 0:
                excess -= 1
                self.retire(server)
        self.grow()

    # -- console control -------------------------------------------------------------------

    def shut_down(self) -> None:
        """SHUTDOWN WAIT_FOR_SERVERS (PgBouncer's words and rule): the transactions under
        way finish; a client that asks for a server from now on is closed with "server
        shutting down", and so are those already waiting, at the janitor's next pass (as
        PgBouncer's janitor does)."""
        self.shutting_down = True

    def refuse_waiters_on_shutdown(self) -> None:
        """The janitor's part of ``shut_down``: the clients still waiting are closed."""
        for client in list(self.waiters):
            client.fatal(codes.ADMIN_SHUTDOWN, "server shutting down")

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
        """How many servers are in each state (the lengths of its lists); 'login' counts
        those being opened."""
        return Counter({
            LOGIN: self.connecting, IDLE: len(self.idle),
            ACTIVE: sum(1 for server in self.servers if server.state is ACTIVE),
            RESET: len(self.used), TESTED: len(self.tested),
            BEING_CANCELED: len(self.being_canceled),
        })  # fmt: skip

    def oldest_waiter(self) -> LinkedClient | None:
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
