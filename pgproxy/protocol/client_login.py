"""A client's login to pgproxy as a state machine over bytes (sans-I/O).

Everything that decides what comes next in a login lives here, as in h11: the first
packets (SSLRequest, GSSENCRequest, CancelRequest, a TLS ClientHello, StartupMessage), the
password exchange (cleartext, md5, SCRAM), the wait for auth_query's answer, and the bytes
a client pipelines behind its login. ``ClientLogin`` is fed bytes and events and returns
actions; ``pgproxy.core.client``'s ClientConn performs them (writes, TLS, the pool) and makes
the decisions that need the proxy around it (which method, which secret, which pool),
handing their outcome back as events.

    STARTUP ──SSLRequest, TLS offered──▶ TLS ──tls_established──▶ STARTUP
    STARTUP ──StartupMessage──▶ CHECKS ──authenticate(trust)──▶ ADMISSION
                                  │ └──wait_for_secret──▶ LOOKUP ──authenticate──┐
                                  └──authenticate(password method)──▶ PASSWORD ◀─┘
    PASSWORD ──exchange done──▶ ADMISSION ──logged_in──▶ DONE
    any ──Refuse / CancelRequest──▶ ENDED
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal

from pgproxy.protocol import codes
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

TLS_HANDSHAKE = 0x16  # the first byte of a TLS record carrying a handshake


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


@dataclass(frozen=True, slots=True)
class Send:
    """Write ``data`` to the client."""

    data: bytes


@dataclass(frozen=True, slots=True)
class StartTls:
    """Run the TLS handshake (server side) on the connection; then ``tls_established``."""


@dataclass(frozen=True, slots=True)
class DirectTls:
    """The client opened with a TLS ClientHello (PostgreSQL 17's sslnegotiation=direct):
    run the handshake, feeding it ``hello`` first; then ``tls_established``."""

    hello: bytes


@dataclass(frozen=True, slots=True)
class ForwardCancel:
    """A CancelRequest: cancel what this key's owner runs, then close the connection."""

    process_id: int
    secret_key: bytes


@dataclass(frozen=True, slots=True)
class Refuse:
    """End the client with this FATAL error; ``log``: what to log first, if anything."""

    sqlstate: str
    text: str
    log: str | None = None


@dataclass(frozen=True, slots=True)
class Startup:
    """A StartupMessage: choose the login (``authenticate``, ``wait_for_secret``)."""

    packet: StartupMessage


@dataclass(frozen=True, slots=True)
class Authenticated:
    """The client proved who it is; ``credential``: what its password exchange proved
    (for server logins without a password), None under trust."""

    credential: Credential | None


Action = Send | StartTls | DirectTls | ForwardCancel | Refuse | Startup | Authenticated


class ClientLogin:
    """One client's login, from its first byte to its welcome."""

    def __init__(self, *, tls_offered: bool) -> None:
        """``tls_offered``: pgproxy has a TLS context for clients."""
        self.phase = Phase.STARTUP
        self.tls = False  # the connection is encrypted
        self._tls_offered = tls_offered
        self._buffer = bytearray()
        self._auth: ClientAuthenticator | None = None
        self.startup: StartupMessage | None = None

    def receive(self, data: bytes) -> list[Action]:
        """Bytes from the client, before it is logged in."""
        self._buffer += data
        if self.phase is Phase.STARTUP:
            return self._startup_packets()
        if self.phase is Phase.PASSWORD:
            return self._password_messages()
        return []  # (kept: pipelined behind the login, or ignored once it ended)

    def tls_established(self) -> list[Action]:
        """The handshake that StartTls or DirectTls asked for is done."""
        self.tls = True
        self.phase = Phase.STARTUP
        return self._startup_packets()

    def wait_for_secret(self) -> None:
        """The user's secret comes from auth_query: hold the client meanwhile."""
        self.phase = Phase.LOOKUP

    def authenticate(
        self, method: PasswordMethod | Literal["trust"], user: str, secret: Secret | None,
        iterations: int, channel_binding: bytes | None,
    ) -> list[Action]:  # fmt: skip
        """Run the login chosen for the StartupMessage: none under trust, else the
        password exchange of ``method`` against ``secret`` (None: an unknown user, who
        goes through the same exchange and fails)."""
        if method == "trust":
            self.phase = Phase.ADMISSION
            return [Authenticated(None)]
        self._auth = ClientAuthenticator(
            method, user, secret, iterations, channel_binding if self.tls else None
        )
        self.phase = Phase.PASSWORD
        return [Send(self._auth.start()), *self._password_messages()]

    def refused(self) -> None:
        """The caller ended the login (a check failed)."""
        self.phase = Phase.ENDED
        self._auth = None

    def logged_in(self) -> bytes:
        """The welcome is sent: from now on the caller reads the client's bytes itself.
        Returns what the client sent behind its login (its first query, say)."""
        self.phase = Phase.DONE
        early = bytes(self._buffer)
        self._buffer.clear()
        return early

    # -- the phases ---------------------------------------------------------------------

    def _startup_packets(self) -> list[Action]:
        buffer = self._buffer
        if buffer[:1] == b"\x16" and self._tls_offered and not self.tls:
            # (Without TLS a ClientHello is garbage like any other: 08P01 below.)
            self.phase = Phase.TLS
            hello = bytes(buffer)
            buffer.clear()
            return [DirectTls(hello)]
        actions: list[Action] = []
        while self.phase is Phase.STARTUP:
            try:
                result = parse_startup(bytes(buffer))
            except StartupError as exc:
                self.phase = Phase.ENDED
                actions.append(Refuse(exc.sqlstate, exc.message))
                break
            if result is None:
                break
            packet, used = result
            del buffer[:used]
            if isinstance(packet, SSLRequest) and self._tls_offered and not self.tls:
                if buffer:
                    # Bytes sent before the handshake would be read as if they came
                    # through TLS.
                    self.phase = Phase.ENDED
                    actions.append(
                        Refuse(codes.PROTOCOL_VIOLATION, "unexpected data after SSLRequest")
                    )
                    break
                self.phase = Phase.TLS
                actions += [Send(b"S"), StartTls()]
            elif isinstance(packet, SSLRequest | GSSEncRequest):
                actions.append(Send(b"N"))
            elif isinstance(packet, CancelRequest):
                self.phase = Phase.ENDED
                actions.append(ForwardCancel(packet.process_id, packet.secret_key))
            elif isinstance(packet, StartupMessage):
                self.phase = Phase.CHECKS
                self.startup = packet
                actions.append(Startup(packet))
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
                self.phase = Phase.ADMISSION
                actions.append(Authenticated(auth.credential))
        return actions
