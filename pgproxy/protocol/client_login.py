"""A client's login to pgproxy as a state machine over bytes (sans-I/O).

Everything that decides what comes next in a login lives here, as in h11: the first
packets (SSLRequest, GSSENCRequest, CancelRequest, a TLS ClientHello, StartupMessage), the
password exchange (cleartext, md5, SCRAM), the wait for auth_query's answer, and the bytes
a client pipelines behind its login. ``ClientLogin`` is fed bytes and events and returns
actions; ``pgproxy.core.client``'s ClientConn performs them (writes, TLS, the pool) and makes
the decisions that need the proxy around it (which method, which secret, which pool),
handing their outcome back as events.

    STARTUP ──SSLRequest, TLS offered──▶ TLS ──tls_established──▶ STARTUP
    STARTUP ──StartupMessage──▶ CHECKS ──choose(trust, known user)──▶ ADMISSION
                                  │ └──choose(no secret: auth_query)──▶ LOOKUP ─┐
                                  └──choose(password method)──▶ PASSWORD ◀──────┘
                                                   (LOOKUP ──secret_found──▶ PASSWORD)
    PASSWORD ──exchange done──▶ ADMISSION ──logged_in──▶ DONE
    any ──Refuse / CancelRequest──▶ ENDED
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final, Literal

from pgproxy.protocol import codes, messages
from pgproxy.protocol.client_auth import ClientAuthenticator, Secret, failure_message
from pgproxy.protocol.client_auth import Method as PasswordMethod
from pgproxy.protocol.framing import MAX_CLIENT_MESSAGE, BadFrame, next_message
from pgproxy.protocol.server_login import Credential
from pgproxy.protocol.startup import (
    CancelRequest,
    GSSEncRequest,
    SSLRequest,
    StartupError,
    StartupMessage,
    parse_startup,
)

_TLS_HANDSHAKE = b"\x16"  # the first byte of a TLS record carrying a handshake
_READY_IDLE = messages.ready_for_query()


class Phase(enum.Enum):
    """Where a login is."""

    STARTUP = "startup"  # reading the first packets
    TLS = "tls"  # 'S' answered or a ClientHello seen: the caller runs the handshake
    CHECKS = "checks"  # a StartupMessage arrived: the caller chooses the login
    LOOKUP = "lookup"  # waiting for the user's secret from auth_query
    PASSWORD = "password"  # the password exchange runs
    ADMISSION = "admission"  # authenticated: the caller finds the pool and welcomes
    DONE = "done"  # logged in: bytes go to the pool or the console now
    ENDED = "ended"  # refused, or a cancel request served


# The actions (and LoginFacts) are dataclasses for their repr and equality, with __init__
# written out: a generated __init__ stays interpreted in the compiled build (about 500 ns
# an object against 30), and a login builds several. Not frozen, because a frozen
# dataclass refuses the assignments of a written __init__.
@dataclass(slots=True)
class Send:
    """Write ``data`` to the client."""

    data: bytes

    def __init__(self, data: bytes) -> None:
        self.data = data


@dataclass(slots=True)
class StartTls:
    """Run the TLS handshake (server side) on the connection; then ``tls_established``."""

    def __init__(self) -> None:
        pass


@dataclass(slots=True)
class DirectTls:
    """The client opened with a TLS ClientHello (PostgreSQL 17's sslnegotiation=direct):
    run the handshake, feeding it ``hello`` first; then ``tls_established``."""

    hello: bytes

    def __init__(self, hello: bytes) -> None:
        self.hello = hello


@dataclass(slots=True)
class ForwardCancel:
    """A CancelRequest: cancel what this key's owner runs, then close the connection."""

    process_id: int
    secret_key: bytes

    def __init__(self, process_id: int, secret_key: bytes) -> None:
        self.process_id = process_id
        self.secret_key = secret_key


@dataclass(slots=True)
class Refuse:
    """End the client with this FATAL error; ``log``: what to log first, if anything."""

    sqlstate: str
    text: str
    log: str | None = None

    def __init__(self, sqlstate: str, text: str, log: str | None = None) -> None:
        self.sqlstate = sqlstate
        self.text = text
        self.log = log


@dataclass(slots=True)
class Startup:
    """A StartupMessage: check it, then give the facts of the login to ``choose``."""

    packet: StartupMessage

    def __init__(self, packet: StartupMessage) -> None:
        self.packet = packet


@dataclass(slots=True)
class LookUpSecret:
    """Ask auth_query for the user's secret; then ``secret_found``."""

    def __init__(self) -> None:
        pass


@dataclass(slots=True)
class Authenticated:
    """The client proved who it is; ``credential``: what its password exchange proved
    (for server logins without a password), None under trust."""

    credential: Credential | None

    def __init__(self, credential: Credential | None) -> None:
        self.credential = credential


Action = (
    Send | StartTls | DirectTls | ForwardCancel | Refuse | Startup | LookUpSecret | Authenticated
)
_NO_ENCRYPTION: Final = Send(b"N")  # the answer to an SSLRequest or a GSSENCRequest
_TRUSTED: Final = Authenticated(None)  # (the action of every trust login)


@dataclass(slots=True)
class LoginFacts:
    """What the proxy says about a client once its StartupMessage passed the checks: the
    login its rules ask for, and what is known of its user."""

    method: PasswordMethod | Literal["trust"]
    secret: Secret | None  # the stored secret (auth_file, [users]); None: none stored
    auth_query: bool  # a missing secret may come from auth_query
    known: bool | None  # under trust: the user exists (None: auth_query must tell)
    iterations: int  # for a SCRAM verifier made from a plain password
    channel_binding: bytes | None  # SCRAM-SHA-256-PLUS data, used over TLS only

    def __init__(
        self,
        method: PasswordMethod | Literal["trust"],
        secret: Secret | None,
        auth_query: bool,
        known: bool | None,
        iterations: int,
        channel_binding: bytes | None,
    ) -> None:
        self.method = method
        self.secret = secret
        self.auth_query = auth_query
        self.known = known
        self.iterations = iterations
        self.channel_binding = channel_binding


# The phases as compiled-in constants: mypyc reads a Final name from a C static, while
# ``Phase.X`` is an attribute lookup on the enum class at every use.
_ADMISSION: Final = Phase.ADMISSION
_CHECKS: Final = Phase.CHECKS
_DONE: Final = Phase.DONE
_ENDED: Final = Phase.ENDED
_LOOKUP: Final = Phase.LOOKUP
_PASSWORD: Final = Phase.PASSWORD
_STARTUP: Final = Phase.STARTUP
_TLS: Final = Phase.TLS


class ClientLogin:
    """One client's login, from its first byte to its welcome."""

    def __init__(self, *, tls_offered: bool) -> None:
        """``tls_offered``: pgproxy has a TLS context for clients."""
        self.phase = _STARTUP
        self.tls = False  # the connection is encrypted
        self._tls_offered = tls_offered
        self._buffer = bytearray()
        self._auth: ClientAuthenticator | None = None
        self.startup: StartupMessage | None = None
        self._user = ""
        self._facts: LoginFacts | None = None  # given by ``choose``

    def receive(self, data: bytes) -> list[Action]:
        """Bytes from the client, before it is logged in."""
        if self.phase is _STARTUP:
            # (The usual first packets come whole, one per chunk: parsed where they are.)
            return self._startup_packets(self._take_buffer() + data if self._buffer else data)
        self._buffer += data
        if self.phase is _PASSWORD:
            return self._password_messages()
        return []  # (kept: pipelined behind the login, or ignored once it ended)

    def tls_established(self) -> list[Action]:
        """The handshake that StartTls or DirectTls asked for is done."""
        self.tls = True
        self.phase = _STARTUP
        return self._startup_packets(self._take_buffer())

    def _take_buffer(self) -> bytes:
        taken = bytes(self._buffer)
        self._buffer.clear()
        return taken

    def choose(self, user: str, facts: LoginFacts) -> list[Action]:
        """The StartupMessage passed the checks: log ``user`` in as ``facts`` say.

        A password method asks for the password before anything about the database is
        said, so that neither user nor database names can be probed; a user with no
        stored secret is looked up first when auth_query may know it, else goes through
        the same exchange and fails. Trust lets a known user in at once."""
        self._user, self._facts = user, facts
        if facts.method != "trust":
            if facts.secret is None and facts.auth_query:
                self.phase = _LOOKUP
                return [LookUpSecret()]
            return self._authenticate(facts.secret)
        if facts.known is None:  # auth_query says (trust: no password asked after it)
            self.phase = _LOOKUP
            return [LookUpSecret()]
        if not facts.known:
            self.refused()
            return [Refuse(codes.INVALID_AUTHORIZATION, '"trust" authentication failed')]
        return self._authenticate(None)

    def secret_found(self, secret: Secret | None, *, unknown_user: bool = False) -> list[Action]:
        """auth_query's answer: ``secret`` (None: an expired user), or ``unknown_user``."""
        if unknown_user:
            # PgBouncer's answer too (it cannot mock the exchange here either).
            self.refused()
            return [Refuse(codes.INVALID_AUTHORIZATION, "no such user")]
        return self._authenticate(secret)

    def _authenticate(self, secret: Secret | None) -> list[Action]:
        facts = self._facts
        assert facts is not None
        if facts.method == "trust":
            self.phase = _ADMISSION
            return [_TRUSTED]
        self._auth = ClientAuthenticator(
            facts.method, self._user, secret, facts.iterations,
            facts.channel_binding if self.tls else None,
        )  # fmt: skip
        self.phase = _PASSWORD
        return [Send(self._auth.start()), *self._password_messages()]

    def refused(self) -> None:
        """The caller ended the login (a check failed)."""
        self.phase = _ENDED
        self._auth = None

    def welcome(self, parameter_statuses: bytes, cancel_key: bytes) -> bytes:
        """What a client admitted to a pool or the console is told: AuthenticationOk, the
        ParameterStatus messages, its cancel key (BackendKeyData: ``cancel_key`` is its
        process id and secret), ReadyForQuery idle."""
        assert self.phase is _ADMISSION
        return b"".join(
            (
                messages.AUTHENTICATION_OK,
                parameter_statuses,
                messages.backend_key_data_of(cancel_key),
                _READY_IDLE,
            )
        )

    def logged_in(self) -> bytes:
        """The welcome is sent: from now on the caller reads the client's bytes itself.
        Returns what the client sent behind its login (its first query, say)."""
        self.phase = _DONE
        return self._take_buffer() if self._buffer else b""

    # -- the phases ---------------------------------------------------------------------

    def _startup_packets(self, data: bytes) -> list[Action]:
        """The first packets in ``data``; what follows them is kept in the buffer."""
        if self._tls_offered and not self.tls and data[:1] == _TLS_HANDSHAKE:
            # (Without TLS a ClientHello is garbage like any other: 08P01 below.)
            self.phase = _TLS
            return [DirectTls(data)]
        actions: list[Action] = []
        while self.phase is _STARTUP:
            try:
                result = parse_startup(data)
            except StartupError as exc:
                self.phase = _ENDED
                actions.append(Refuse(exc.sqlstate, exc.message))
                break
            if result is None:
                break
            packet, used = result
            data = data[used:]
            if isinstance(packet, SSLRequest) and self._tls_offered and not self.tls:
                if data:
                    # Bytes sent before the handshake would be read as if they came
                    # through TLS.
                    self.phase = _ENDED
                    actions.append(
                        Refuse(codes.PROTOCOL_VIOLATION, "unexpected data after SSLRequest")
                    )
                    break
                self.phase = _TLS
                actions += [Send(b"S"), StartTls()]
            elif isinstance(packet, (SSLRequest, GSSEncRequest)):
                # (A tuple, not ``A | B``: compiled, two type checks, no union built.)
                actions.append(_NO_ENCRYPTION)
            elif isinstance(packet, CancelRequest):
                self.phase = _ENDED
                actions.append(ForwardCancel(packet.process_id, packet.secret_key))
            elif isinstance(packet, StartupMessage):
                self.phase = _CHECKS
                self.startup = packet
                actions.append(Startup(packet))
        if data:  # a partial packet, or what the client sent behind its StartupMessage
            self._buffer += data
        return actions

    def _password_messages(self) -> list[Action]:
        """The password exchange over the complete messages received so far."""
        actions: list[Action] = []
        buffer = self._buffer
        while (auth := self._auth) is not None:
            try:
                message = next_message(buffer, MAX_CLIENT_MESSAGE, only=ord("p"))
            except BadFrame:
                self.refused()
                actions.append(Refuse(codes.PROTOCOL_VIOLATION, "expected a password response"))
                break
            if message is None:
                break
            reply, outcome = auth.step(message[1])
            if reply:
                actions.append(Send(reply))
            if outcome is False:
                self.refused()
                if auth.refusal is not None:  # (the same for every user, known or not)
                    sqlstate, text = auth.refusal
                    actions.append(Refuse(sqlstate, text, f"client {auth.user}: {text}"))
                else:
                    text = failure_message(auth.user)
                    why = f"client {auth.user}: password authentication failed"
                    actions.append(Refuse(codes.INVALID_PASSWORD, text, why))
                break
            if outcome is True:
                self._auth = None
                self.phase = _ADMISSION
                actions.append(Authenticated(auth.credential))
        return actions
