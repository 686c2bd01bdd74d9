"""The server side of a link: one PostgreSQL connection, its login and its byte stream.

A ``ServerConn`` logs in once (a coroutine: the slow path), then lives in its pool, idle or
linked to one client. While linked, every chunk PostgreSQL sends is walked for headers and
written to the client as it arrived; ReadyForQuery tells the pool when the server is free.
"""

from __future__ import annotations

import asyncio
import logging
import math
import ssl
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Protocol, cast

from pgproxy.core import params as tracked
from pgproxy.core import state_guard
from pgproxy.core.histograms import Histogram
from pgproxy.core.states import ServerState
from pgproxy.protocol import codes, messages
from pgproxy.protocol.framing import MAX_SERVER_LOGIN_MESSAGE, BadFrame, next_message
from pgproxy.protocol.prepared import ServerStatements
from pgproxy.protocol.server_login import Credential, ServerAuthenticator, ServerAuthError
from pgproxy.protocol.stream import STATUS_IDLE, BackendScanner
from pgproxy.sockopts import apply_keepalive
from pgproxy.stats import next_connection_id

if TYPE_CHECKING:
    from pgproxy.client_rules import ClientTimeouts
    from pgproxy.config import PoolSettings
    from pgproxy.core.state_guard import Guard, SessionState
    from pgproxy.protocol.prepared import Registry
    from pgproxy.protocol.stream import FrontendScanner
    from pgproxy.stats import LoginFailureReason, PoolStats
    from pgproxy.tls import ServerTls

log = logging.getLogger("pgproxy.server")

_INT32 = struct.Struct("!I")

# The server states (pgproxy.core.states), as module names: the hot path reads them often.
LOGIN: Final = ServerState.LOGIN
IDLE: Final = ServerState.IDLE
ACTIVE: Final = ServerState.ACTIVE
RESET: Final = ServerState.RESET
TESTED: Final = ServerState.TESTED
CLOSED: Final = ServerState.CLOSED
BEING_CANCELED: Final = ServerState.BEING_CANCELED

CANCEL_TIMEOUT: Final = 5.0  # seconds to deliver a CancelRequest to PostgreSQL
CLOSE_GRACE: Final = 5.0  # seconds PostgreSQL has to close after Terminate

# Write-buffer marks: past HIGH the peer's reading pauses, under LOW it resumes.
WRITE_HIGH_WATER: Final = 256 * 1024
WRITE_LOW_WATER: Final = 64 * 1024


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


class LinkedClient(asyncio.Protocol):
    """The client side of a link as a server and its pool see it: its stream, its counters
    and a way to end it. pgproxy.core.client's ClientConn is its one subclass.

    A base class rather than a ``typing.Protocol`` because of the compiled build: mypyc
    reaches the attributes of a class it knows through native slots and calls its methods
    through a vtable, while an object typed by a Protocol costs a dictionary lookup per
    attribute on the hot path. (It lives here, below the client, to keep the import graph
    one-way.)
    """

    id: int
    user: str
    database: str
    transport: asyncio.Transport
    send: Callable[[bytes], object]  # transport.write (see ServerConn.send)
    scan: FrontendScanner
    params: tracked.ParamValues
    server: ServerConn | None
    outstanding: int  # ReadyForQuery replies the client still waits for
    wait_started_at: float  # (0: not waiting for a server)
    request_at: float
    write_paused: bool
    terminated: bool
    closed: bool
    leaks_logged: set[str] | None
    timeouts: ClientTimeouts  # (the janitor's, for clients waiting in a pool)
    wait_notified: float
    # A replication connection's (pgproxy.core.replication).
    cancel_key: bytes | None
    replication_slot: asyncio.Semaphore | None  # held while relaying

    @property
    def application_name(self) -> str:
        raise NotImplementedError

    @property
    def address(self) -> str:
        """ip:port or unix(pid), for logs."""
        raise NotImplementedError

    def describe(self) -> str:
        """The client as log lines name it."""
        raise NotImplementedError

    def flush_pending(self) -> None:
        """Send the server what arrived while the client waited for it."""
        raise NotImplementedError

    def fatal(self, sqlstate: str, text: str, *, reason: LoginFailureReason | None = None) -> None:
        """Send an ErrorResponse and close."""
        raise NotImplementedError

    def start_relay(self, server: ServerConn) -> None:
        """Relay bytes both ways untouched from now on (a replication connection)."""
        raise NotImplementedError


class HostChooser(Protocol):
    """What opening a server needs of a pool's host policy (pgproxy.core.hosts'
    HostPolicy: target_session_attrs, max_replica_lag)."""

    async def connect(
        self, timeout: float, factory: type[ServerConn], startup: dict[str, str]
    ) -> ServerConn: ...


class ServerOwner:
    """The pool that owns a server as the server sees it; pgproxy.core.pool's Pool is its
    one subclass. A base class for the same reason as LinkedClient."""

    name: str
    database: str
    user: str
    settings: PoolSettings
    stats: PoolStats
    target: ServerTarget
    host_index: int
    server_tls: ServerTls
    credential_for: Callable[[str], Credential | None] | None
    statement_mode: bool
    statement_registry: Registry
    guard: Guard
    query_histogram: Histogram | None
    host_policy: HostChooser | None

    def change_server_state(
        self, server: ServerConn, state: ServerState, client: LinkedClient | None = None, *,
        oldest: bool = False,
    ) -> None:  # fmt: skip
        raise NotImplementedError

    def transaction_done(self, client: LinkedClient, server: ServerConn, now: float) -> None:
        raise NotImplementedError

    def suspect_transaction_done(
        self, client: LinkedClient, server: ServerConn, now: float
    ) -> None:
        raise NotImplementedError

    def retire(self, server: ServerConn) -> None:
        raise NotImplementedError

    def server_closed(self, server: ServerConn) -> None:
        raise NotImplementedError

    def reset_done(self, server: ServerConn) -> None:
        raise NotImplementedError

    def check_done(self, server: ServerConn) -> None:
        raise NotImplementedError

    def state_checked(self, server: ServerConn, found: SessionState | str) -> None:
        raise NotImplementedError

    def state_check_failed(self, reason: str) -> None:
        raise NotImplementedError

    def cancel_running_query(self, server: ServerConn) -> None:
        raise NotImplementedError


class ServerLoginError(Exception):
    """Logging in to PostgreSQL failed; ``sqlstate`` and ``message`` are fit for the client."""

    def __init__(
        self, sqlstate: str, message: str, *, unreachable: bool = False,
        transient: bool | None = None, severity: str = "",
    ) -> None:  # fmt: skip
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message
        self.severity = severity  # the server's ErrorResponse's (FATAL), "" for pgproxy's own
        self.unreachable = unreachable  # no connection was made: another host may do
        # PostgreSQL could not be reached, or was starting up or shutting down (57P03):
        # worth waiting for, unlike a refusal (authentication, unknown database, TLS).
        self.transient = (
            sqlstate in (codes.CONNECTION_FAILURE, codes.CANNOT_CONNECT_NOW)
            if transient is None
            else transient
        )


class ServerConn(asyncio.Protocol):
    """One connection to PostgreSQL, owned by a pool."""

    def __init__(self, pool: ServerOwner) -> None:
        self.pool = pool
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        # The transport's write, bound once: compiled, ``transport.write(...)`` looks the
        # method up by name at each call (the transport is uvloop's, not a native class).
        self.send: Callable[[bytes], object] = None  # type: ignore[assignment]
        # Set by its pool's change_server_state only; LOGIN until the pool takes it.
        self.state: ServerState = LOGIN
        self.client: LinkedClient | None = None
        self.scan = BackendScanner()
        self.params: tracked.ParamValues = tracked.EMPTY
        # Everything the server reported at login, in order: the pool's welcome to clients.
        self.login_params: list[tuple[str, str]] = []
        self.backend_pid = 0
        self.backend_key = b""
        self.connected_at = 0.0
        self.idle_since = 0.0
        self.checked_at = 0.0  # last server_check_query (or release) time
        self.holds_budget = False  # counted in its pool's ServerBudgets until it closes
        self.linked_at = 0.0
        self.query_started = 0.0  # when the request now running was sent (query_time)
        self.clock = time.monotonic
        self.id = next_connection_id()
        self.expires_at = math.inf  # closed once free after this time (server_lifetime)
        # idle_transaction_timeout / query_timeout bookkeeping, kept by the janitor: the
        # client's request count and our reply count when they last changed, and when.
        self.idle_tx_requests = -1
        self.idle_tx_since = 0.0
        self.replies = 0  # ReadyForQuery messages forwarded to clients
        self.progress_mark: tuple[int, int] = (-1, -1)
        self.progress_since = 0.0
        self.cancelled_mark: tuple[int, int] | None = None
        # Leak detection, kept by the janitor: since when a session-mode client has sat
        # idle in a transaction (0: it has not), and the episode last reported.
        self.leak_since = 0.0
        self.leak_mark = -1.0
        self.write_paused = False
        self._login_buffer = bytearray()
        self._login_wakeup: asyncio.Future[None] | None = None
        self._lost = False
        self.closing = False  # pgproxy said Terminate: its close is not a loss
        self.tls = False
        self.host = ""  # which of the target's hosts it is connected to
        self.cancels_in_flight = 0  # cancel requests sent for its backend, not yet answered
        # Named prepared statements: set at the first link of a client that uses them, and
        # the client they are tied to in the current link (None: not tied yet).
        self.statements: ServerStatements | None = None
        self.statements_client: LinkedClient | None = None
        self.last_client: LinkedClient | None = None  # the client it was last linked to
        # At the end of a transaction with nothing owed, the pool's transaction_done runs;
        # once the scanner has flagged a reply that may leave session state
        # (``scan.suspect``), its suspect_transaction_done, which checks the session first
        # (set by _chunk, where such replies are walked: the quick path pays nothing for
        # the guard).
        self.suspect_done = False
        # transaction_state_guard (pgproxy.core.state_guard), kept by the pool: the session
        # state found at the last check (None: not known yet), before any client, the
        # state its reset query leaves, and the state check under way (its replies, why
        # it runs, for whom).
        self.known_state: state_guard.SessionState | None = None
        self.clean_state: state_guard.SessionState | None = None  # at login, or last reset
        self.reset_state: state_guard.SessionState | None = None
        self.check_reply: bytearray | None = None
        self.check_purpose = ""
        self.check_client: LinkedClient | None = None
        self.state_checked_at = 0.0
        self.checked_replies = 0  # ``replies`` at the last state check

    # -- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = transport = cast(asyncio.Transport, transport)
        self.send = transport.write
        transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)

    def data_received(self, data: bytes) -> None:
        """Walk the chunk's headers and forward it to the linked client (the hot path)."""
        if self.state is LOGIN:
            self._login_buffer += data
            self._wake_login()
            return
        scan = self.scan
        scan.feed(data)
        client = self.client
        if not scan.quick or client is None:
            self._chunk(data, client)
            return
        # (The scanner's quick walk: the chunk goes to the client as it is.)
        ready = scan.ready
        if ready and scan.status != STATUS_IDLE and self.pool.statement_mode:
            self._transaction_in_statement_mode(client)
            return
        client.send(data)
        self.pool.stats.sent_bytes += len(data)
        if ready:
            self._answered(client, ready)

    def _chunk(self, data: bytes, client: LinkedClient | None) -> None:
        # Every other chunk: parameters reported, a corrupt stream, DEALLOCATE ALL, no
        # client linked, hidden or cut replies, a COPY starting or ending.
        scan = self.scan
        if scan.params is not None:
            self._apply_params(scan.params)
        if scan.error is not None:
            log.error("server %s: %s; closing", self.pool.name, scan.error)
            self.pool.retire(self)  # off the idle list now, not when the close is reported
            if client is not None:  # (unlinked by the retirement: told now)
                client.fatal(codes.CONNECTION_FAILURE, "server conn crashed?")
            return
        if scan.deallocated:
            self._deallocated(client)
        if client is None:
            self._unlinked_data(data)
            return
        if scan.ready and scan.status != STATUS_IDLE and self.pool.statement_mode:
            self._transaction_in_statement_mode(client)
            return
        out = scan.out
        start = scan.forward_from
        if out is not None:  # (prepared statements: replies cut out, a split held back)
            if len(out):
                client.send(out)
        elif start == 0:
            client.send(data)
        elif start < len(data):
            client.send(data[start:])
        self.pool.stats.sent_bytes += len(data)
        if scan.copy_started or scan.copy_finished:
            self._copy_progress(client)
        if scan.suspect:
            self.suspect_done = True
        if scan.ready:
            self._answered(client, scan.ready)

    @staticmethod
    def _transaction_in_statement_mode(client: LinkedClient) -> None:
        # As PgBouncer: the client never sees this ReadyForQuery, so the error arrives
        # as the answer to its BEGIN rather than while it is idle.
        client.fatal(
            codes.PROTOCOL_VIOLATION, "transaction blocks not allowed in statement pooling mode"
        )

    def _answered(self, client: LinkedClient, ready: int) -> None:
        # ``ready`` ReadyForQuery messages went to the client: time the request, and give
        # the server back at the end of a transaction with nothing more owed.
        now = self.clock()
        pool = self.pool
        took = now - self.query_started
        pool.stats.query_time += took
        histogram = pool.query_histogram
        if histogram is not None:
            histogram.observe(took)
        self.query_started = now  # a pipelined request runs from here
        self.replies += ready
        outstanding = client.outstanding = client.outstanding - ready
        if outstanding <= 0 and self.scan.status == STATUS_IDLE and not client.scan.holds_server:
            if self.suspect_done:
                pool.suspect_transaction_done(client, self, now)
            else:
                pool.transaction_done(client, self, now)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if self.state is LOGIN:  # (the login fails; nothing of the pool's to give back)
            self.pool.change_server_state(self, CLOSED)
            self._wake_login()
            return
        client = self.client
        if client is not None:
            client.fatal(codes.CONNECTION_FAILURE, "server conn crashed?")
        self.pool.server_closed(self)

    def pause_writing(self) -> None:
        # PostgreSQL is not reading fast enough: stop reading from the client that feeds it.
        self.write_paused = True
        if self.client is not None:
            self.client.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.client is not None:
            self.client.transport.resume_reading()

    # -- linked operation -------------------------------------------------------------

    def _copy_progress(self, client: LinkedClient) -> None:
        # A COPY FROM STDIN started or ended in this chunk (see BackendScanner). At the end,
        # what the client is still owed is what it asked after its CopyDone/CopyFail:
        # PostgreSQL ignored the Syncs that reached it during the COPY.
        if self.scan.copy_started:
            client.scan.copy_end_seen = False
        if self.scan.copy_finished:
            client.outstanding = client.scan.requests_after_copy_end()
            if self.statements is not None:
                # The Syncs PostgreSQL ignored will get no ReadyForQuery: count again.
                self.statements.align(
                    self.scan.batches_done - self.scan.ready, 0,
                    client.scan.requests_total, client.outstanding,
                )  # fmt: skip

    def _deallocated(self, client: LinkedClient | None) -> None:
        # DEALLOCATE ALL or DISCARD ALL ran: nothing is prepared here any more, and the
        # linked client's names are gone (PgBouncer clears them too). Handled whether or
        # not a client is linked (a reset or check query), so that no flag is left over.
        self.scan.deallocated = False
        if self.statements is not None:
            self.statements.forget_all()
        if client is not None and client.scan.statements is not None:
            client.scan.statements.forget_all()

    def link_statements(self, client: LinkedClient, *, at_link: bool = False) -> ServerStatements:
        """Linked to a client that uses named prepared statements: close stray names left
        by an earlier client (replies hidden; only at the link, before any client byte),
        and tie its requests to our batches (any time during the link: the relation of
        requests sent to replies received holds throughout)."""
        pool = self.pool
        statements = self.statements
        if statements is None:
            statements = self.statements = ServerStatements(
                pool.statement_registry, pool.stats, pool.settings.max_prepared_statements
            )
            self.scan.statements = statements
            self.scan.ledger = statements.ledger
        statements.capacity = pool.settings.max_prepared_statements
        self.statements_client = client
        if statements.strays and at_link:
            self.scan.hidden += 1
            self.transport.write(statements.cleanup())
        scan = self.scan
        statements.align(
            scan.batches_done, scan.hidden, client.scan.requests_total, client.outstanding
        )
        return statements

    def _apply_params(self, reported: list[tuple[str, str]]) -> None:
        values = self.params
        for name, value in reported:
            values = tracked.with_value(values, name, value)
        self.params = values
        if self.client is not None:
            # What the server reports while linked (a client's SET, or our sync after
            # normalisation such as 'ISO' → 'ISO, MDY') is the client's value from now on.
            client_values = self.client.params
            for name, value in reported:
                client_values = tracked.with_value(client_values, name, value)
            self.client.params = client_values

    def sync_params(self, wanted: tracked.ParamValues) -> None:
        """Make the server's tracked parameters equal ``wanted``; the replies are hidden."""
        sql = tracked.sync_sql(wanted, self.params)
        if sql is not None:
            self.run_hidden(sql)
        # Equal values share the tuple, so the next check is `is`. After a sync the server
        # holds them too: PostgreSQL reports a normalised value ('ISO' → 'ISO, MDY') as
        # ParameterStatus, which then updates both sides; a parameter it does not report
        # (track_extra_parameters such as search_path) is not set again at every link.
        self.params = wanted

    def run_hidden(self, sql: str) -> None:
        """Send a query whose replies, up to its ReadyForQuery, no client will see."""
        self.scan.hidden += 1
        self.scan.hidden_failed = False
        self.transport.write(messages.query(sql))

    def check_state(self, purpose: str, client: LinkedClient | None) -> None:
        """Run the state check (transaction_state_guard); its replies are hidden and kept
        for ``Pool.state_checked``. The pool has made the server TESTED."""
        self.scan.suspect = False
        self.suspect_done = False
        self.check_purpose = purpose
        self.check_client = client
        self.check_reply = bytearray()
        self.state_checked_at = self.clock()
        self.checked_replies = self.replies
        version = next((v for n, v in self.login_params if n == "server_version"), "")
        self.run_hidden(state_guard.check_query(version))

    def _unlinked_data(self, data: bytes) -> None:
        scan = self.scan
        reply = self.check_reply
        if reply is not None and self.state is TESTED:
            reply += data
            if scan.hidden == 0:
                self.check_reply = None
                if scan.status != STATUS_IDLE:
                    log.warning("server %s: the state check failed; closing", self.pool.name)
                    self.pool.retire(self)
                    return
                self.pool.state_checked(self, state_guard.parse_check(bytes(reply)))
            return
        if (self.state is RESET or self.state is TESTED) and scan.hidden == 0:
            if scan.hidden_failed or scan.status != STATUS_IDLE:
                query = "server_reset_query" if self.state is RESET else "server_check_query"
                log.warning("server %s: %s failed; closing", self.pool.name, query)
                self.pool.retire(self)
            elif self.state is RESET:
                self.pool.reset_done(self)
            else:
                self.pool.check_done(self)
        elif self.state is IDLE and messages.error_response_in(data):
            # PostgreSQL ends a backend (pg_terminate_backend, a shutdown) with a FATAL
            # ErrorResponse, then closes: off the idle list now rather than when the close
            # arrives, a few loop turns later, so that no client is linked to it meanwhile.
            log.info("S-%d %s: idle server sent an error; closing", self.id, self.pool.name)
            self.pool.retire(self)
        # Anything else an unlinked server sends (a NOTICE) has no reader; connection_lost
        # handles a closing server.

    def close(self) -> None:
        """Say goodbye to PostgreSQL; the pool forgets it in connection_lost.

        PostgreSQL closes the connection when its backend has exited, so waiting for that
        (rather than closing our end at once) makes connection_lost mean "the backend is
        gone", which max_db_connections counts on. A backend that does not answer within
        CLOSE_GRACE seconds is cut off.
        """
        if self._lost or self.closing or self.transport is None:
            return
        log.debug("S-%d %s: closing (state %s)", self.id, self.pool.name, self.state.value)
        self.closing = True
        self.transport.write(messages.TERMINATE)
        asyncio.get_running_loop().call_later(CLOSE_GRACE, self.transport.close)

    @property
    def is_clean(self) -> bool:
        """Idle outside a transaction with nothing owed: safe to hand to anyone."""
        return self.scan.status == STATUS_IDLE and self.scan.hidden == 0 and not self._lost

    # -- login (slow path) ------------------------------------------------------------

    def _wake_login(self) -> None:
        waiter = self._login_wakeup
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _more_login_data(self, if_lost: str) -> None:
        """Wait until PostgreSQL sends more during the login; raise ServerLoginError with
        ``if_lost`` if it has closed the connection."""
        if self._lost:
            raise ServerLoginError(codes.CONNECTION_FAILURE, if_lost)
        self._login_wakeup = asyncio.get_running_loop().create_future()
        await self._login_wakeup
        self._login_wakeup = None

    async def _read_login_message(self) -> tuple[int, bytes]:
        while True:
            try:
                message = next_message(self._login_buffer, MAX_SERVER_LOGIN_MESSAGE)
            except BadFrame:
                raise ServerLoginError(
                    codes.PROTOCOL_VIOLATION, "invalid message from server during login"
                ) from None
            if message is not None:
                return message
            await self._more_login_data("server closed the connection during login")

    async def _run_connect_query(self, sql: str) -> None:
        """connect_query, still inside the login: its rows are dropped, its parameter
        changes kept; an error fails the login (PgBouncer closes that connection too)."""
        self.transport.write(messages.query(sql))
        failure: ServerLoginError | None = None
        while True:
            type_byte, payload = await self._read_login_message()
            if type_byte == messages.ERROR_RESPONSE and failure is None:
                fields = messages.parse_error_fields(payload)
                failure = ServerLoginError(
                    fields.get("C", codes.CONNECTION_FAILURE),
                    "connect_query failed: " + fields.get("M", "error"),
                )
            elif type_byte == messages.PARAMETER_STATUS:
                name, value = messages.parse_parameter_status(payload)
                self.login_params = [(n, v) for n, v in self.login_params if n != name]
                self.login_params.append((name, value))
                self.params = tracked.with_value(self.params, name, value)
            elif type_byte == messages.READY_FOR_QUERY:
                self.scan.status = payload[0] if payload else STATUS_IDLE
                if failure is not None:
                    raise failure
                return

    async def _first_state_check(self) -> None:
        """transaction_state_guard: what the session holds before any client (after
        connect_query), still inside the login, so that the pool counts the server as
        opening until then. A failed check fails nothing: the server is not checked."""
        version = next((v for n, v in self.login_params if n == "server_version"), "")
        self.transport.write(messages.query(state_guard.check_query(version)))
        reply = bytearray()
        while True:
            type_byte, payload = await self._read_login_message()
            reply.append(type_byte)
            reply += _INT32.pack(len(payload) + 4)
            reply += payload
            if type_byte == messages.READY_FOR_QUERY:
                self.scan.status = payload[0] if payload else STATUS_IDLE
                break
        found = state_guard.parse_check(bytes(reply))
        if isinstance(found, str):
            self.pool.state_check_failed(found)
        else:
            self.known_state = self.clean_state = found
        self.state_checked_at = self.clock()

    async def negotiate_tls(self, tls: ServerTls, host: str) -> None:
        """SSLRequest, then the TLS handshake if PostgreSQL says 'S'; raise
        ServerLoginError if TLS is required and the server has none."""
        self.transport.write(messages.SSL_REQUEST)
        while not self._login_buffer:
            await self._more_login_data("server closed the connection")
        answer = bytes(self._login_buffer)
        self._login_buffer.clear()
        if answer == b"N":
            if tls.required:
                raise ServerLoginError(
                    codes.CONNECTION_FAILURE,
                    f"server does not support TLS (server_tls_sslmode = {tls.mode})",
                    transient=False,
                )
            return
        if answer != b"S":  # also: bytes after the 'S' would be injected, not TLS
            raise ServerLoginError(codes.PROTOCOL_VIOLATION, "invalid answer to SSLRequest")
        assert tls.context is not None
        loop = asyncio.get_running_loop()
        transport = await loop.start_tls(self.transport, self, tls.context, server_hostname=host)
        if transport is None:
            raise ServerLoginError(codes.CONNECTION_FAILURE, "TLS handshake failed")
        transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        self.transport = transport
        self.send = transport.write
        self.tls = True

    async def login(
        self, user: str, password: Credential | None, dbname: str,
        startup: dict[str, str] | None = None,
    ) -> None:  # fmt: skip
        """Run the startup and authentication exchange; raise ServerLoginError on failure.
        ``startup``: more startup parameters (a replication connection's)."""
        self.transport.write(
            messages.startup_message({"user": user, "database": dbname, **(startup or {})})
        )
        authenticator = ServerAuthenticator(user, password)
        while True:
            type_byte, payload = await self._read_login_message()
            if type_byte == messages.AUTHENTICATION:
                try:
                    reply = authenticator.respond(payload)
                except ServerAuthError as exc:
                    raise ServerLoginError(codes.INVALID_AUTHORIZATION, str(exc)) from None
                if reply is not None:
                    self.transport.write(reply)
            elif type_byte == messages.PARAMETER_STATUS:
                name, value = messages.parse_parameter_status(payload)
                self.login_params.append((name, value))
                self.params = tracked.with_value(self.params, name, value)
            elif type_byte == messages.BACKEND_KEY_DATA:
                self.backend_pid = _INT32.unpack_from(payload, 0)[0]
                self.backend_key = payload[4:]
            elif type_byte == messages.READY_FOR_QUERY:
                self.scan.status = payload[0] if payload else STATUS_IDLE
                if self.pool.settings.connect_query and not startup:
                    await self._run_connect_query(self.pool.settings.connect_query)
                if self.pool.guard != "off" and not startup:
                    await self._first_state_check()
                return  # (still LOGIN: the pool takes it from here)
            elif type_byte == messages.ERROR_RESPONSE:
                fields = messages.parse_error_fields(payload)
                raise ServerLoginError(
                    fields.get("C", codes.CONNECTION_FAILURE),
                    fields.get("M", "server login failed"),
                    severity=fields.get("V") or fields.get("S") or "",
                )
            # NoticeResponse and NegotiateProtocolVersion need no answer.


async def connect_server(
    pool: ServerOwner,
    timeout: float,
    *,
    factory: type[ServerConn] | None = None,
    startup: dict[str, str] | None = None,
) -> ServerConn:
    """Open and log in a new server connection for ``pool``; raise ServerLoginError.

    With several hosts in the target, each is tried in turn from the pool's current one
    (``Pool.host_index``; load_balance_hosts decides whether the next connection starts
    at the following host or stays on the one that worked). ``factory`` and ``startup``
    (more startup parameters): a replication connection's."""
    if pool.host_policy is not None:  # target_session_attrs, max_replica_lag (hosts.py)
        return await pool.host_policy.connect(timeout, factory or ServerConn, startup or {})
    target = pool.target
    hosts = target.hosts
    error: ServerLoginError | None = None
    deadline = time.monotonic() + timeout
    for _ in range(len(hosts)):
        index = pool.host_index % len(hosts)
        host = hosts[index]
        try:
            server = await connect_host(
                pool, host, max(0.001, deadline - time.monotonic()), factory or ServerConn,
                startup or {},
            )  # fmt: skip
        except ServerLoginError as exc:
            error = exc
            if not exc.unreachable:
                raise
            pool.host_index = index + 1  # the next attempt starts at the next host
            continue
        if target.round_robin:
            pool.host_index = index + 1
        return server
    assert error is not None
    raise error


async def connect_host(
    pool: ServerOwner, host: str, timeout: float, factory: type[ServerConn], startup: dict[str, str]
) -> ServerConn:
    """Open and log in a server connection to one of ``pool``'s hosts; raise
    ServerLoginError (``unreachable`` when no connection was made)."""
    loop = asyncio.get_running_loop()
    target = pool.target
    server: ServerConn | None = None
    try:
        async with asyncio.timeout(timeout):
            if host.startswith("/"):
                path = f"{host}/.s.PGSQL.{target.port}"
                _, server = await loop.create_unix_connection(lambda: factory(pool), path)
            else:
                _, server = await loop.create_connection(lambda: factory(pool), host, target.port)
                apply_keepalive(server.transport.get_extra_info("socket"), pool.settings.keepalive)
            server.connected_at = time.monotonic()
            server.host = host
            if pool.settings.log_connections:  # (PgBouncer's wording)
                local = server.transport.get_extra_info("sockname")
                log.info(
                    "S-%d %s/%s@%s:%d new connection to server (from %s)",
                    server.id, pool.database, target.user, host, target.port,
                    f"{local[0]}:{local[1]}" if isinstance(local, tuple) else "unix socket",
                )  # fmt: skip
            tls = pool.server_tls
            if tls.context is not None and not host.startswith("/"):
                await server.negotiate_tls(tls, host)
            credential: Credential | None = target.password
            if credential is None and pool.credential_for is not None:
                credential = pool.credential_for(target.user)
            await server.login(target.user, credential, target.dbname, startup)
            log.debug(
                "S-%d %s: logged in to %s:%d, backend pid %d",
                server.id, pool.name, host, target.port, server.backend_pid,
            )  # fmt: skip
    except TimeoutError:
        _log_closing(pool, host, server, "connect timeout")
        if server is not None:
            server.transport.close()
        raise ServerLoginError(
            codes.CONNECTION_FAILURE,
            "server connection timed out (server_connect_timeout)",
            unreachable=server is None,
        ) from None
    except ServerLoginError as refusal:  # PostgreSQL refused the login
        # (Its own name: compiled, one name takes one exception type in a function.)
        _log_closing(pool, host, server, refusal.message)
        if server is not None:
            server.transport.close()
        raise
    except ssl.SSLError as exc:  # (an OSError: a certificate or protocol problem)
        if server is not None:
            server.transport.close()
        raise ServerLoginError(
            codes.CONNECTION_FAILURE, f"TLS with server failed: {exc}", transient=False
        ) from None
    except OSError as exc:
        _log_closing(pool, host, server, f"connect failed ({exc.strerror or exc})")
        if server is not None:
            server.transport.close()
        raise ServerLoginError(
            codes.CONNECTION_FAILURE,
            f"could not connect to server at {host}:{target.port}: {exc.strerror or exc}",
            unreachable=True,
        ) from None
    except BaseException:
        if server is not None:
            server.transport.close()
        raise
    return server


def _log_closing(pool: ServerOwner, host: str, server: ServerConn | None, reason: str) -> None:
    """A server connection that never served, as PgBouncer's log_disconnections shows it
    ("connect failed", "connect timeout", or PostgreSQL's refusal)."""
    if pool.settings.log_disconnections:
        target = pool.target
        log.info(
            "S-%s %s/%s@%s:%d closing because: %s (age=0s)",
            server.id if server is not None else "-", pool.database, target.user, host,
            target.port, reason,
        )  # fmt: skip


async def cancel_backend(
    target: ServerTarget, process_id: int, secret_key: bytes, host: str = ""
) -> None:
    """Deliver a CancelRequest for a server's backend on a fresh connection (best effort);
    ``host``: the one of the target's hosts that backend runs on (default: the first)."""
    host = host or target.hosts[0]
    try:
        async with asyncio.timeout(CANCEL_TIMEOUT):
            if host.startswith("/"):
                path = f"{host}/.s.PGSQL.{target.port}"
                reader, writer = await asyncio.open_unix_connection(path)
            else:
                reader, writer = await asyncio.open_connection(host, target.port)
            writer.write(messages.cancel_request(process_id, secret_key))
            await writer.drain()
            await reader.read()  # PostgreSQL closes the connection when it is done
            writer.close()
    except (OSError, TimeoutError) as exc:
        log.warning("cancel request to %r failed: %s", target, exc)
