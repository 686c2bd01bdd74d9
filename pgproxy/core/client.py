"""The client side of a link: an application's connection to pgproxy.

A ``ClientConn`` feeds the client's first bytes to the login state machine
(``pgproxy.protocol.client_login``) and carries out what it asks: writes, the TLS
handshake, auth_query, the pool's first server login (coroutines: the slow path). Once
logged in, it forwards every chunk the client sends to the server its pool links to it,
walking only message headers on the way. What it needs of the proxy around it comes
through ``ClientServices``, which the daemon fills once, and the ``ClientHost``
interface below, met by ``pgproxy.services.daemon``'s Daemon.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pwd
import socket
import ssl
import struct
import time
from asyncio import sslproto
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, Literal, Protocol, TypeVar, cast

from pgproxy import __version__
from pgproxy.auth_query import UNKNOWN_USER, AuthQueryError
from pgproxy.client_rules import ClientRules, ClientTimeouts
from pgproxy.config import AuthType
from pgproxy.core import params as tracked
from pgproxy.core.replication import ReplicationMode, replication_mode, start_replication
from pgproxy.core.server import (
    WRITE_HIGH_WATER,
    WRITE_LOW_WATER,
    LinkedClient,
    ServerConn,
    ServerLoginError,
)
from pgproxy.core.states import ClientState
from pgproxy.hba import HbaRefusal, login_method
from pgproxy.protocol import codes, messages
from pgproxy.protocol.client_auth import Method as PasswordMethod
from pgproxy.protocol.client_auth import Secret
from pgproxy.protocol.client_login import Action as LoginAction
from pgproxy.protocol.client_login import (
    Authenticated,
    ClientLogin,
    DirectTls,
    ForwardCancel,
    LoginFacts,
    LookUpSecret,
    Refuse,
    Send,
    StartTls,
    Startup,
)
from pgproxy.protocol.prepared import ClientStatements, Plan
from pgproxy.protocol.startup import (
    StartupMessage,
)
from pgproxy.protocol.stream import FrontendScanner
from pgproxy.stats import LoginFailureReason, login_failure_reason, next_connection_id
from pgproxy.tls import ALPN

if TYPE_CHECKING:
    from collections import Counter

    from pgproxy.config import Settings
    from pgproxy.core.pool import Pool
    from pgproxy.hba import HbaRules
    from pgproxy.protocol.server_login import Credential

log = logging.getLogger("pgproxy.client")

# Client states.
STARTUP: Final = "startup"  # reading SSLRequest / StartupMessage
LOGIN: Final = "login"  # authenticating, waiting for the pool's welcome
READY: Final = "ready"  # logged in: the hot path
CONSOLE: Final = "console"  # logged in to the admin console
TLS: Final = "tls"  # answered 'S' to an SSLRequest, or got a ClientHello: the handshake runs
CLOSED: Final = "closed"
RELAY: Final = "relay"  # a replication connection: bytes pass both ways untouched

_PEER_CREDENTIALS = struct.Struct("3i")  # SO_PEERCRED: pid, uid, gid
_INT32 = struct.Struct("!I")

# Bytes a waiting client may send before its reading is paused.
PENDING_LIMIT: Final = 256 * 1024
# Seconds a client has to read its FATAL error before the connection is closed under it.
CLOSE_GRACE: Final = 2.0
# A client's timeouts until its login resolves them (frozen: one object serves all).
_DEFAULT_TIMEOUTS: Final = ClientTimeouts()
# The clock, read through a compiled static rather than the time module's attribute
# (compiled, ``time.monotonic()`` is a lookup by name before the call).
_clock: Final = time.monotonic


# The services a login calls are base classes rather than typing.Protocols, as
# LinkedClient is (pgproxy.core.server): compiled, a call through a class mypyc knows goes
# through its vtable, while a call on a Protocol-typed object costs a method lookup by
# name and Python's argument parsing, a dozen times per login. Each has one subclass, in
# pgproxy.services.


class LoginCredentials:
    """What a login checks a client against (pgproxy.services.credentials)."""

    client_tls: ssl.SSLContext | None  # None: no TLS for clients
    client_tls_binding: bytes | None  # SCRAM-SHA-256-PLUS data
    hba: HbaRules | None

    def secret_for(self, user: str) -> Secret | None:
        raise NotImplementedError

    def knows_user(self, database: str, user: str) -> bool | None:
        raise NotImplementedError

    async def lookup_secret(self, database: str, user: str) -> Secret | None:
        raise NotImplementedError

    def auth_database_problem(self, database: str) -> str | None:
        raise NotImplementedError

    def remember(self, user: str, credential: Credential) -> None:
        raise NotImplementedError


class ClientRegistry:
    """Where a client finds its pool, is counted in and out, and gets its cancel key
    (pgproxy.services.registry)."""

    clients: set[ClientConn]
    login_failures: Counter[LoginFailureReason]
    login_timeouts: int

    def pool_for(self, database: str, user: str) -> Pool | None:
        raise NotImplementedError

    def client_rules(self, database: str, user: str) -> ClientRules | None:
        raise NotImplementedError

    def admit_client(
        self, database: str, user: str, rules: ClientRules | None, *, console: bool = False,
        exempt: bool = False,
    ) -> str | None:  # fmt: skip
        raise NotImplementedError

    def client_left(self, database: str, user: str) -> None:
        raise NotImplementedError

    def client_count(self) -> int:
        raise NotImplementedError

    def clients_changed(self) -> None:
        raise NotImplementedError

    def register_cancel_key(self, client: ClientConn) -> bytes:
        raise NotImplementedError

    def forget_cancel_key(self, key: bytes) -> None:
        raise NotImplementedError

    def forward_cancel(self, process_id: int, secret_key: bytes) -> None:
        raise NotImplementedError


class ConsoleSession(Protocol):
    """The admin console's side of a client logged in to it (pgproxy.services.admin.console)."""

    peer: bool  # another worker of this pgproxy asking for this worker's own rows

    def feed(self, data: bytes) -> None: ...

    def stop(self) -> None: ...


class ConsoleDoor(Protocol):
    """How a client reaches the admin console: which database names lead there, who may
    enter, and the session it gets."""

    @property
    def name(self) -> str: ...  # the name console clients are counted and shown under

    @property
    def welcome_params(self) -> tuple[tuple[str, str], ...]: ...

    def may_log_in(self, user: str, local_admin: bool) -> bool: ...

    def is_peer(self, application_name: str | None) -> bool: ...

    def open(self, client: ClientConn, *, local_admin: bool, peer: bool) -> ConsoleSession: ...


class DatabaseGate:
    """Whether new clients are taken: a shutdown under way, a disabled database
    (pgproxy.services.pause_state)."""

    @property
    def shutting_down(self) -> bool:
        raise NotImplementedError

    def is_disabled(self, database: str) -> bool:
        raise NotImplementedError


# client_tls_sslmode values that refuse a TCP client without TLS.
_TLS_REQUIRED: Final = frozenset({"require", "verify-ca", "verify-full"})


class LoginSettings:
    """The settings every login reads, taken from the Settings once per configuration
    (the host makes a new one with each): in the compiled build their reads are C field
    loads, where each attribute of the pydantic model costs a trip through its
    ``__getattr__`` hook."""

    def __init__(self, settings: Settings, console_databases: frozenset[str]) -> None:
        """``console_databases``: the database names that lead to the admin console."""
        self.console_databases = console_databases
        self.max_packet_size: int = settings.max_packet_size
        self.max_client_conn: int = settings.max_client_conn
        self.tls_required = settings.client_tls_sslmode in _TLS_REQUIRED
        self.auth_type: AuthType = settings.auth_type
        self.scram_iterations: int = settings.scram_iterations
        self.ignored_startup_parameters = frozenset(
            name.lower() for name in settings.ignore_startup_parameters
        )
        self.log_connections: bool = settings.log_connections
        self.log_disconnections: bool = settings.log_disconnections
        # What logins derived from each startup packet (by StartupMessage.key), for the
        # next client that sends the same bytes: its tracked settings, and its parameter
        # values on a pool's servers with the pool's welcome values they were made from.
        # (With a connection per transaction, each login would otherwise redo both: about
        # 6,000 instructions.) Bounded as the packets' own cache is.
        self._settings_by_key: dict[bytes, dict[str, str]] = {}
        self._params_by_key: dict[bytes, tuple[tracked.ParamValues, tracked.ParamValues]] = {}

    def settings_of(self, startup: StartupMessage) -> dict[str, str]:
        """The tracked settings ``startup`` asks for (tracked.startup_settings, which
        raises UnsupportedParameter for one pgproxy cannot keep). Shared: not to be
        changed."""
        key = startup.key
        known = self._settings_by_key.get(key)
        if known is None:
            known = tracked.startup_settings(startup.params, self.ignored_startup_parameters)
            _keep(self._settings_by_key, key, known)
        return known

    def params_of(
        self, key: bytes, settings: dict[str, str], welcome: tracked.ParamValues
    ) -> tracked.ParamValues:
        """``welcome`` (a pool's server values) updated with ``settings``, those of the
        startup packet ``key`` (b"": none to keep them under)."""
        known = self._params_by_key.get(key)
        if known is not None and known[0] is welcome:
            return known[1]
        values = tracked.from_pairs(settings, welcome)
        _keep(self._params_by_key, key, (welcome, values))
        return values


# How many startup packets' settings and values a LoginSettings keeps (see settings_of).
_KEPT_STARTUPS: Final = 1024
_Kept = TypeVar("_Kept")


def _keep(kept: dict[bytes, _Kept], key: bytes, value: _Kept) -> None:
    """Keep ``value`` under a startup packet's ``key`` (none without one); a full
    dictionary starts afresh."""
    if key:
        if len(kept) >= _KEPT_STARTUPS:
            kept.clear()
        kept[key] = value


class ClientHost(Protocol):
    """What a client connection needs of the proxy around it (pgproxy.services.daemon's Daemon)."""

    @property
    def settings(self) -> Settings: ...

    @property
    def credentials(self) -> LoginCredentials: ...

    @property
    def registry(self) -> ClientRegistry: ...

    @property
    def pauses(self) -> DatabaseGate: ...

    @property
    def consoles(self) -> ConsoleDoor: ...


class ClientServices:
    """What every client connection reads of the proxy around it, held by a compiled
    object. Read through ``ClientHost`` (the daemon, an interpreted object), each is a
    lookup by name: seven per login. One per daemon, which replaces ``login_settings``
    at each reload."""

    def __init__(self, host: ClientHost, login_settings: LoginSettings) -> None:
        self.host = host
        self.registry: ClientRegistry = host.registry
        self.credentials: LoginCredentials = host.credentials
        self.pauses: DatabaseGate = host.pauses
        self.login_settings = login_settings


class ClientConn(LinkedClient):
    """One application connection."""

    def __init__(self, services: ClientServices, unix: bool = False) -> None:
        self.services = services
        self.unix = unix  # accepted on the Unix socket
        self.id = next_connection_id()
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.send: Callable[[bytes], object] = None  # type: ignore[assignment]  # (its write)
        self.state = STARTUP
        self.console: ConsoleSession | None = None
        self.peer_pid = 0  # the client's process id, known over a Unix socket
        self.peer_uid = -1
        self.request_at = 0.0  # when its last request was sent (SHOW CLIENTS)
        self.timeouts = _DEFAULT_TIMEOUTS  # resolved for its user and database at login
        self.local_admin = False  # console user 'pgbouncer' from our own OS user
        self.to_console = False  # its startup packet names the console's database
        self._settings: dict[str, str] = {}  # tracked settings from the startup packet
        self._login_settings: LoginSettings | None = None  # read at the login's start
        # The login's state machine (sans-I/O), with the TLS context it may offer.
        self._tls_context = self.services.credentials.client_tls
        self._login = ClientLogin(tls_offered=self._tls_context is not None)
        self.closed = False
        self.pool: Pool = None  # type: ignore[assignment]
        self.server: ServerConn | None = None
        self.scan = FrontendScanner(services.login_settings.max_packet_size)
        self.params: tracked.ParamValues = tracked.EMPTY
        self.user = ""
        self.database = ""
        self.outstanding = 0  # ReadyForQuery replies the client still waits for
        self.wait_started_at = 0.0  # since when it waits for a server (0: it does not)
        self.wait_notified = 0.0  # the wait_started_at of the wait query_wait_notify told
        self.write_paused = False
        self.cancel_key: bytes | None = None  # process id and secret (cancel.new_key)
        self.terminated = False  # left with a Terminate message rather than vanishing
        self.admitted = False  # counted in the registry's db_clients / user_clients
        # client_idle_timeout bookkeeping, kept by the janitor (its request count at the
        # pass where it last changed, and when that was).
        self.idle_requests = 0
        self.idle_since = 0.0
        self.connected_at = 0.0
        self._address: str | None = None  # see ``address``
        self.replication: ReplicationMode = "none"
        self.replication_slot: asyncio.Semaphore | None = None  # held while relaying
        self.close_reason = ""  # why pgproxy ended it (log_disconnections)
        # The kinds of session state it was found to leave on a server (each logged once).
        self.leaks_logged: set[str] | None = None
        # What arrived while waiting for a server: chunks, or plans (named statements).
        self._pending: list[bytes | Plan] = []
        self._pending_size = 0
        self._paused_while_waiting = False
        self._login_task: asyncio.Task[None] | None = None

    # -- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = transport = cast(asyncio.Transport, transport)
        self.send = transport.write
        transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        self.connected_at = _clock()
        self.services.registry.clients.add(self)
        self.services.registry.clients_changed()
        if self.unix:
            self._read_peer_credentials()
        # (A TCP client's keepalive options came from the listening socket: sockopts.)

    @property
    def address(self) -> str:
        """``ip:port`` or ``unix(pid)``, for logs: made at the first log line that needs
        it, not per login (the transport keeps the peer's address after the close)."""
        if self._address is None:
            peer = self.transport.get_extra_info("peername") if self.transport else None
            if isinstance(peer, tuple):
                host = f"[{peer[0]}]" if ":" in peer[0] else peer[0]
                self._address = f"{host}:{peer[1]}"
            else:
                self._address = f"unix({self.peer_pid})" if self.peer_pid else "unix"
        return self._address

    def _read_peer_credentials(self) -> None:
        sock = self.transport.get_extra_info("socket")
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEER_CREDENTIALS.size)
            self.peer_pid, self.peer_uid, _ = _PEER_CREDENTIALS.unpack(raw)
        except (OSError, AttributeError, struct.error):
            pass  # not a Unix socket after all, or no credentials: nobody special

    @property
    def application_name(self) -> str:
        """The client's application_name (from its startup packet or a later SET)."""
        index = tracked.tracked_index("application_name")
        return (self.params[index] if index is not None else "") or ""

    @property
    def pool_state(self) -> ClientState:
        """What it does as its pool sees it: where Pool.change_client_state put it."""
        if self.wait_started_at:
            return ClientState.WAITING
        return ClientState.ACTIVE if self.server is not None else ClientState.IDLE

    @property
    def tls(self) -> bool:
        """The connection is encrypted."""
        return self._login.tls

    @property
    def logged_in(self) -> bool:
        """Past the login: a pool client (waiting, linked or not) or a console session."""
        return self.state is READY or self.state is CONSOLE

    def data_received(self, data: bytes) -> None:
        """Walk the chunk's headers and forward it to the linked server (the hot path)."""
        if self.state is not READY:
            self._early_data(data)
            return
        scan = self.scan
        scan.feed(data)
        if scan.error is not None:
            self._bad_message(data, scan.error_at, scan.error)
            return
        if scan.terminate_at >= 0:
            self._terminate(data, scan.terminate_at, scan.requests)
            return
        requests = scan.requests
        owed = self.outstanding
        self.outstanding = owed + requests
        pool = self.pool
        stats = pool.stats
        stats.received_bytes += len(data)
        stats.query_count += requests
        plan = scan.plan  # None unless named prepared statements are in the chunk
        server = self.server
        if server is None:
            if self.wait_started_at:  # (waiting: what pool_state says, read quicker)
                self._keep_pending(data if plan is None else plan)
                return
            server = pool.acquire(self)
            if server is None:
                if not self.closed:  # queued (not refused by max_waiting)
                    self._keep_pending(data if plan is None else plan)
                return
        elif requests and owed <= 0:
            server.query_started = server.clock()  # query_time runs from here
        if plan is None:
            server.send(data)
        else:
            self._send_plan(server, plan)

    def _send(self, server: ServerConn, item: bytes | Plan) -> None:
        """Forward a chunk as it is, or a plan rendered for ``server`` (slow paths)."""
        if isinstance(item, bytes):
            if item:
                server.send(item)
        else:
            self._send_plan(server, item)

    def _send_plan(self, server: ServerConn, plan: Plan) -> None:
        statements = self.scan.statements
        assert statements is not None
        server_statements = server.statements
        if server.statements_client is not self or server_statements is None:
            server_statements = server.link_statements(self)  # the first named one here
        out = server_statements.render(plan, statements)
        if len(out):
            server.send(out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._release()

    def eof_received(self) -> bool:
        # The client half-closed: nothing more will come; close our side too.
        return False

    def describe(self) -> str:
        """``C-<id> db/user@address``, as the logs name a client (PgBouncer's form)."""
        who = f"{self.database or '(nodb)'}/{self.user or '(nouser)'}"
        return f"C-{self.id} {who}@{self.address or '(unknown)'}"

    def _release(self) -> None:
        """Leave every list and give back the server; safe to call more than once."""
        if self.closed:
            return
        self.closed = True
        if self.replication_slot is not None:
            self.replication_slot.release()
            self.replication_slot = None
        if self.state is RELAY and self.server is not None:
            relay_server, self.server = self.server, None
            relay_server.client = None
            relay_server.transport.close()  # (never pooled: PostgreSQL ends the walsender)
        internal = self.console is not None and self.console.peer  # another worker
        if self.user and self.services.login_settings.log_disconnections and not internal:
            # (Clients that never sent a startup packet, such as port probes, are not
            # logged: they would drown the rest.)
            reason = self.close_reason or (
                "client close request" if self.terminated else "client unexpected eof"
            )
            age = _clock() - self.connected_at
            log.info("%s closing because: %s (age=%ds)", self.describe(), reason, age)
        self.state = CLOSED
        self.services.registry.clients.discard(self)
        self.services.registry.clients_changed()
        if self.admitted:
            self.services.registry.client_left(self.database, self.user)
        if self.cancel_key is not None:
            self.services.registry.forget_cancel_key(self.cancel_key)
        if self.scan.statements is not None:
            unsent = [plan for plan in self._pending if not isinstance(plan, bytes)]
            self.scan.statements.release(unsent)
        if self._login_task is not None and not self._login_task.done():
            self._login_task.cancel()
        if self.console is not None:
            self.console.stop()
        if self.pool is not None:
            self.pool.client_gone(self)

    def pause_writing(self) -> None:
        # The application reads slowly: stop reading from the server that feeds it.
        self.write_paused = True
        if self.server is not None:
            self.server.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.server is not None:
            self.server.transport.resume_reading()

    # -- waiting for a server ----------------------------------------------------------

    def _keep_pending(self, data: bytes | Plan) -> None:
        self._pending.append(data)
        if isinstance(data, bytes):
            self._pending_size += len(data)
        else:
            self._pending_size += sum(len(item) for item in data if isinstance(item, bytes))
        if self._pending_size > PENDING_LIMIT and not self._paused_while_waiting:
            self._paused_while_waiting = True
            self.transport.pause_reading()

    def flush_pending(self) -> None:
        """Linked after waiting: send what arrived meanwhile, in order."""
        server = self.server
        assert server is not None
        pending = self._pending
        if pending:
            if len(pending) == 1 and type(pending[0]) is bytes:  # the usual: one chunk
                server.send(pending[0])
            else:
                self._flush_several(server)
            pending.clear()
            self._pending_size = 0
        if self.terminated:
            self._leave()
        elif self._paused_while_waiting:
            self._paused_while_waiting = False
            if not server.write_paused:
                self.transport.resume_reading()

    def _flush_several(self, server: ServerConn) -> None:
        # Consecutive chunks in one write; plans rendered for this server in order.
        chunks: list[bytes] = []
        for item in self._pending:
            if isinstance(item, bytes):
                chunks.append(item)
                continue
            if chunks:
                server.send(b"".join(chunks))
                chunks.clear()
            self._send_plan(server, item)
        if chunks:
            server.send(chunks[0] if len(chunks) == 1 else b"".join(chunks))

    # -- errors and endings ------------------------------------------------------------

    def fatal(self, sqlstate: str, text: str, *, reason: LoginFailureReason | None = None) -> None:
        """Send a FATAL error and end this client; its server is released at once.

        A client not yet logged in is counted as a failed login under ``reason``, or the
        reason its SQLSTATE implies when the caller does not know better."""
        if self.closed or self.transport.is_closing():
            return
        if not self.logged_in:
            self.services.registry.login_failures[reason or login_failure_reason(sqlstate)] += 1
        if self.services.host.settings.log_pooler_errors:
            # PgBouncer's log_pooler_errors: an error pgproxy itself sends is a problem to
            # look at, except the goodbye of a shutdown.
            level = logging.INFO if sqlstate == codes.ADMIN_SHUTDOWN else logging.WARNING
            log.log(level, "%s pooler error: %s", self.describe(), text)
        self.close_reason = text
        self._release()
        self.transport.write(messages.fatal(sqlstate, text))
        # Closing with unread input makes the kernel send RST, and the client may then lose
        # the error before reading it. Half-close instead (FIN after the error), ignore what
        # still arrives, and close for good when the client does or after a grace period.
        if self.transport.can_write_eof():
            self.transport.write_eof()
            asyncio.get_running_loop().call_later(CLOSE_GRACE, self.transport.close)
        else:
            self.transport.close()

    def _bad_message(self, data: bytes, offset: int, reason: str) -> None:
        # Forward the well-formed messages before the bad one, then end this client only.
        server = self.server
        if server is not None:
            self.outstanding += self.scan.requests
            self._send(server, data[:offset] if self.scan.plan is None else self.scan.plan)
        self.fatal(codes.PROTOCOL_VIOLATION, reason)

    def _terminate(self, data: bytes, offset: int, requests: int) -> None:
        # What came before Terminate still reaches the server (a pipelined INSERT must
        # commit as it would without pgproxy); what follows it is ignored.
        self.terminated = True
        self.state = CLOSED  # input after Terminate is dropped
        plan = self.scan.plan
        if offset > 0 or plan:
            self.outstanding += requests
            server = self.server
            if server is None and self.pool_state is not ClientState.WAITING:
                server = self.pool.acquire(self)
            before = data[:offset] if plan is None else plan
            if server is None:  # queued: flush_pending sends it, then closes
                self._keep_pending(before)
                return
            self._send(server, before)
        self._leave()

    def _leave(self) -> None:
        self.transport.close()
        self._release()

    # -- startup and login (slow path) -------------------------------------------------

    def _early_data(self, data: bytes) -> None:
        if self.closed or self.terminated:
            return  # input after a FATAL error or a Terminate is dropped
        if self.state is RELAY:
            assert self.server is not None
            self.server.send(data)
            return
        if self.state is CONSOLE:
            assert self.console is not None
            self.console.feed(data)
            return
        try:
            self._act(self._login.receive(data))
        except Exception:
            self._internal_error("authentication" if self.state is LOGIN else "login")

    def _act(self, actions: list[LoginAction]) -> None:
        """Carry out what the login state machine asks, in order."""
        for action in actions:
            if self.closed:
                return
            if isinstance(action, Send):
                self.transport.write(action.data)
            elif isinstance(action, Startup):
                self.state = LOGIN
                try:
                    self._begin_login(action.packet)
                except Exception:
                    self._internal_error("login")
            elif isinstance(action, LookUpSecret):
                loop = asyncio.get_running_loop()
                self._login_task = loop.create_task(self._look_up_secret())
            elif isinstance(action, Authenticated):
                if action.credential is not None:
                    self.services.credentials.remember(self.user, action.credential)
                self._after_auth()
            elif isinstance(action, Refuse):
                if action.log is not None:
                    log.warning("%s", action.log)
                self.fatal(action.sqlstate, action.text)
            elif isinstance(action, StartTls):
                self.state = TLS
                self._login_task = asyncio.get_running_loop().create_task(self._start_tls())
            elif isinstance(action, DirectTls):
                self._direct_tls(action.hello)
            elif isinstance(action, ForwardCancel):
                self.services.registry.forward_cancel(action.process_id, action.secret_key)
                self._leave()

    def _direct_tls(self, hello_bytes: bytes) -> None:
        """PostgreSQL 17's direct TLS (sslnegotiation=direct): the client opens with a TLS
        ClientHello instead of an SSLRequest.

        loop.start_tls cannot serve here: it starts the handshake on bytes still to be
        read from the socket, and the hello has already been read (it is how a direct TLS
        client is told from others; peeking at the socket instead would bypass the event
        loop's transport). So the TLS protocol is set up by hand, as loop.start_tls does
        inside, and fed the hello first; its application transport, which start_tls would
        return, is then only reachable through SSLProtocol's _get_app_transport."""
        context = self._tls_context
        assert context is not None  # (the login offers TLS only with a context)
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        tls = sslproto.SSLProtocol(
            loop, self, context, waiter, server_side=True, call_connection_made=False,
            ssl_handshake_timeout=10,
        )  # fmt: skip
        raw = self.transport
        raw.set_protocol(tls)
        tls.connection_made(raw)
        hello = memoryview(hello_bytes)
        while hello:
            buffer = tls.get_buffer(len(hello))
            size = min(len(buffer), len(hello))
            buffer[:size] = hello[:size]
            tls.buffer_updated(size)
            hello = hello[size:]
        self.state = TLS
        self._login_task = loop.create_task(self._finish_direct_tls(tls, waiter))

    async def _finish_direct_tls(
        self, tls: sslproto.SSLProtocol, waiter: asyncio.Future[None]
    ) -> None:
        try:
            await waiter
        except (OSError, ConnectionError, TimeoutError) as exc:
            log.info("client direct TLS handshake failed: %s", exc)
            self.transport.close()
            self._release()
            return
        # (What loop.start_tls returns; typeshed does not know the method.)
        transport = cast(asyncio.Transport, tls._get_app_transport())  # type: ignore[attr-defined]
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is None or ssl_object.selected_alpn_protocol() != ALPN:
            # PostgreSQL requires ALPN 'postgresql' on direct TLS (no cross-protocol use).
            log.info("client direct TLS without ALPN %s: closed", ALPN)
            transport.close()
            self._release()
            return
        self._tls_established(transport)

    def _tls_established(self, transport: asyncio.Transport) -> None:
        transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        self.transport = transport
        self.send = transport.write
        self.state = STARTUP
        self._act(self._login.tls_established())

    async def _start_tls(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._tls_context is not None  # (the login offers TLS only with a context)
        try:
            transport = await loop.start_tls(
                self.transport, self, self._tls_context, server_side=True,
                ssl_handshake_timeout=10,
            )  # fmt: skip
        except (OSError, ConnectionError, TimeoutError) as exc:  # ssl.SSLError is an OSError
            log.info("client TLS handshake failed: %s", exc)
            self.transport.close()
            self._release()
            return
        if transport is None or self.closed:
            return
        self._tls_established(transport)

    def _begin_login(self, startup: StartupMessage) -> None:
        """Checks that need no I/O; then finish at once, or in a task if a server must
        be reached first (the pool's first login, to learn the server's parameters)."""
        settings = self._login_settings = self.services.login_settings
        user = startup.user
        if not user:
            self.fatal(
                codes.INVALID_AUTHORIZATION, "no PostgreSQL user name specified in startup packet"
            )
            return
        self.user = user
        self.database = startup.database
        try:
            self.replication = replication_mode(startup.replication)
        except ValueError as exc:
            self.fatal(codes.PROTOCOL_VIOLATION, str(exc))
            return
        self.to_console = console = self.database in settings.console_databases
        if self.replication != "none":
            pass  # (its startup parameters all go to its own server, as the client sent them)
        elif not console:  # (the console keeps no settings)
            try:
                self._settings = settings.settings_of(startup)
            except tracked.UnsupportedParameter as exc:
                self.fatal(codes.PROTOCOL_VIOLATION, str(exc))
                return
        if startup.minor_version > 0 or startup.protocol_options:
            self.transport.write(messages.negotiate_protocol_version(0, startup.protocol_options))
        if self.services.registry.client_count() > settings.max_client_conn:
            self.fatal(
                codes.PROTOCOL_VIOLATION, "no more connections allowed (max_client_conn)",
                reason="limit_reached",
            )  # fmt: skip
            return
        if (
            settings.tls_required
            and not self.tls
            and isinstance(self.transport.get_extra_info("peername"), tuple)
        ):
            # (Unix-socket clients cannot use TLS and need none: PgBouncer lets them in.)
            self.fatal(codes.INVALID_AUTHORIZATION, "SSL required")
            return
        # PgBouncer's rule: the user 'pgbouncer' over the Unix socket, from the daemon's
        # own OS user, reaches the console without a password.
        self.local_admin = console and user == "pgbouncer" and self.peer_uid == os.getuid()
        method: PasswordMethod | Literal["trust"] | None
        auth_type = settings.auth_type
        if self.local_admin:
            method = "trust"
        elif auth_type == "hba":
            method = self._hba_method()
            if method is None:
                return  # refused
        elif auth_type == "cert":
            if not self._certificate_names_user():
                return  # refused
            method = "trust"
        else:
            method = auth_type
        trusted = self.local_admin or console  # (no user to look for: admin_users decide)
        password = method != "trust"
        facts = LoginFacts(
            method=method,
            secret=self.services.credentials.secret_for(user) if password else None,
            # (For the console, auth_query runs in the global auth_dbname; without one,
            # PgBouncer's "bouncer config error": see auth_database_problem. Under trust,
            # ``known`` says whether auth_query must be asked; this flag is not read.)
            auth_query=(
                password and self.services.host.settings.auth_user_for(self.database) is not None
            ),
            known=True if trusted else self.services.credentials.knows_user(self.database, user),
            iterations=settings.scram_iterations,
            channel_binding=self.services.credentials.client_tls_binding,
        )
        self._act(self._login.choose(user, facts))

    async def _look_up_secret(self) -> None:
        """auth_query, then the password exchange (none under trust)."""
        problem = self.services.credentials.auth_database_problem(self.database)
        if problem is not None:
            self.fatal(codes.INVALID_AUTHORIZATION, problem)
            return
        try:
            secret = await self.services.credentials.lookup_secret(self.database, self.user)
        except AuthQueryError as exc:
            self.fatal(codes.CONNECTION_FAILURE, exc.client_message)
            return
        except Exception:
            self._internal_error("auth_query")
            return
        if self.closed:
            return
        try:
            unknown = secret is UNKNOWN_USER
            self._act(self._login.secret_found(None if unknown else secret, unknown_user=unknown))
        except Exception:
            self._internal_error("authentication")

    def _certificate_names_user(self) -> bool:
        """cert: the client's (verified) certificate has the user name as its CN; else the
        client is refused here."""
        if self.user in self._certificate_names():
            return True
        self.fatal(
            codes.INVALID_AUTHORIZATION, f'certificate authentication failed for user "{self.user}"'
        )
        return False

    def _certificate_names(self) -> list[str]:
        """The common names in the client's verified TLS certificate."""
        ssl_object = self.transport.get_extra_info("ssl_object")
        cert = ssl_object.getpeercert() if ssl_object is not None else None
        return [value for rdn in (cert or {}).get("subject", ()) for key, value in rdn
                if key == "commonName"]  # fmt: skip

    def _os_user(self) -> str | None:
        """The OS user at the other end of the Unix socket (None: unknown)."""
        try:
            return pwd.getpwuid(self.peer_uid).pw_name
        except (KeyError, OverflowError):  # an unknown uid, or none (-1)
            return None

    def _hba_method(self) -> PasswordMethod | Literal["trust"] | None:
        """auth_type = hba: the method of the first matching rule, after its own checks
        (reject, cert, peer); None when the client has been refused."""
        rules = self.services.credentials.hba
        assert rules is not None
        peer = self.transport.get_extra_info("peername")
        method = login_method(
            rules, peer=peer[0] if isinstance(peer, tuple) else None, tls=self.tls,
            database=self.database, user=self.user, replication=self.replication == "physical",
            certificate_names=self._certificate_names, os_user=self._os_user,
        )  # fmt: skip
        if isinstance(method, HbaRefusal):
            self.fatal(codes.INVALID_AUTHORIZATION, method.message)
            return None
        return method

    def _after_auth(self) -> None:
        startup = self._login.startup
        assert startup is not None
        user = self.user
        if self.to_console:
            self._console_login(startup)
            return
        if self.services.pauses.shutting_down:
            self.fatal(codes.PROTOCOL_VIOLATION, "pooler is shutting down")
            return
        pool = self.services.registry.pool_for(self.database, user)
        if pool is None:
            self.fatal(
                codes.PROTOCOL_VIOLATION, f"no such database: {self.database}",
                reason="no_such_database",
            )  # fmt: skip
            return
        if self.services.pauses.is_disabled(self.database):
            self.fatal(codes.PROTOCOL_VIOLATION, f'database "{self.database}" is disabled')
            return
        rules = self.services.registry.client_rules(self.database, user)
        if rules is not None:
            self.timeouts = rules.timeouts
        refusal = self.services.registry.admit_client(self.database, user, rules)
        if refusal is not None:
            self.fatal(codes.PROTOCOL_VIOLATION, refusal, reason="limit_reached")
            return
        self.admitted = True
        if self.replication != "none":
            self.cancel_key = self.services.registry.register_cancel_key(self)
            if self.services.login_settings.log_connections:
                log.info("%s login: replication=%s", self.describe(), self.replication)
            self._login_task = asyncio.get_running_loop().create_task(
                self._replicate(pool, startup)
            )
            return
        if pool.welcome is not None:
            self._finish_login(pool, startup)
        else:
            loop = asyncio.get_running_loop()
            self._login_task = loop.create_task(self._await_welcome(pool, startup))

    async def _replicate(self, pool: Pool, startup: StartupMessage) -> None:
        try:
            await start_replication(self, pool, startup.params)
        except Exception:
            self._internal_error("replication login")

    def statements_setting_changed(self) -> None:
        """max_prepared_statements changed (RELOAD, SET): map named statements from now
        on, or stop, as PgBouncer does; a client in a transaction keeps its way until the
        next reload (its requests in flight were mapped the old way)."""
        if self.server is not None or self._pending or self.console is not None:
            return
        enabled = self.pool.settings.max_prepared_statements > 0
        if enabled and self.scan.statements is None:
            self.scan.statements = ClientStatements(self.pool.statement_registry, self.pool.stats)
        elif not enabled and self.scan.statements is not None:
            self.scan.statements.release([])
            self.scan.statements = None

    def start_relay(self, server: ServerConn) -> None:
        """From now on, bytes go between this client and ``server`` untouched."""
        self.server = server
        self.state = RELAY
        early = self._login.logged_in()
        if early:  # sent behind the startup packet
            server.transport.write(early)

    async def _await_welcome(self, pool: Pool, startup: StartupMessage) -> None:
        try:
            while pool.paused:  # a paused database opens no server, not even for a login
                await asyncio.sleep(0.05)
            await pool.ensure_welcome()
            if not self.closed:
                self._finish_login(pool, startup)
        except ServerLoginError as exc:
            # (Its SQLSTATE may be PostgreSQL's 28P01: the pool's login, not the client's.)
            self.fatal(exc.sqlstate, exc.message, reason="server_login_failed")
        except Exception:
            self._internal_error("login")

    def _console_login(self, startup: StartupMessage) -> None:
        local_admin = self.local_admin
        consoles = self.services.host.consoles
        if not consoles.may_log_in(self.user, local_admin):
            log.warning("console login refused for user %s", self.user)
            self.fatal(codes.INVALID_AUTHORIZATION, "not allowed")
            return
        # Another worker of this pgproxy asking for this worker's own rows (workers = N).
        peer = local_admin and consoles.is_peer(startup.params.get("application_name"))
        if not peer:
            refusal = self.services.registry.admit_client(
                consoles.name, self.user, None, console=True, exempt=local_admin
            )
            if refusal is not None:
                self.fatal(codes.PROTOCOL_VIOLATION, refusal, reason="limit_reached")
                return
            self.database = consoles.name  # (counted under one name, whichever was used)
            self.admitted = True
        self.console = consoles.open(self, local_admin=local_admin, peer=peer)
        if self.services.login_settings.log_connections and not peer:
            log.info("%s login: console, tls=%s", self.describe(), "yes" if self.tls else "no")
        self.cancel_key = self.services.registry.register_cancel_key(self)
        statuses = [messages.parameter_status("server_version", f"{__version__}/pgproxy")]
        welcome = consoles.welcome_params
        statuses.extend(messages.parameter_status(name, value) for name, value in welcome)
        self.transport.write(self._login.welcome(b"".join(statuses), self.cancel_key))
        self.state = CONSOLE
        early = self._login.logged_in()
        if early:  # queries pipelined behind the login
            self.console.feed(early)

    def _internal_error(self, during: str) -> None:
        # A bug must end this client only, with an error it can read, never the daemon.
        log.exception("client %s@%s: internal error during %s", self.user, self.database, during)
        self.fatal(codes.INTERNAL_ERROR, f"pgproxy internal error during {during}")

    def _finish_login(self, pool: Pool, startup: StartupMessage) -> None:
        self.pool = pool
        pool.stats.client_logins += 1
        settings = self._login_settings
        if TYPE_CHECKING:  # (_begin_login set it)
            assert settings is not None
        # (A pool client's settings came from ``startup``: see _begin_login.)
        self.params = settings.params_of(startup.key, self._settings, pool.welcome_values)
        if settings.log_connections:
            log.info(
                "%s login: tls=%s application_name=%s",
                self.describe(), "yes" if self.tls else "no", self.application_name,
            )  # fmt: skip
        if pool.tracks_statements:
            self.scan.statements = ClientStatements(pool.statement_registry, pool.stats)
        self.cancel_key = self.services.registry.register_cancel_key(self)
        self.idle_since = _clock()
        self.transport.write(
            self._login.welcome(pool.parameter_statuses(self.params), self.cancel_key)
        )
        self.state = READY
        early = self._login.logged_in()
        if early:  # the client pipelined its first query behind the login
            self.data_received(early)


def accept_client(services: ClientServices, unix: bool = False) -> ClientConn:
    """A new client connection's protocol: the listeners' factory. (Called from compiled
    code, ClientConn's constructor runs natively. Called through the class, CPython's type
    call looks ``__new__`` and ``__init__`` up by name and parses their arguments, since
    asyncio.Protocol, a Python class, is among its bases: about 8,000 instructions more
    per connection.)"""
    return ClientConn(services, unix)
