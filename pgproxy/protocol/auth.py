"""pgproxy's side of a server login: answers PostgreSQL's Authentication requests.

Sans-I/O: ``ServerAuthenticator.respond`` takes the payload of an Authentication ('R')
message and returns the bytes to send back (or None when nothing is sent). SCRAM-SHA-256
uses scramp, which also verifies the server's signature.
"""

from __future__ import annotations

import hashlib
import struct

import scramp

from pgproxy.protocol import messages

_INT32 = struct.Struct("!i")


class ServerAuthError(Exception):
    """The server asked for something pgproxy cannot answer (no password, unknown method)."""


def md5_password(user: str, password: str, salt: bytes) -> str:
    """PostgreSQL's md5 response: 'md5' + md5(md5(password + user) + salt)."""
    inner = hashlib.md5((password + user).encode("utf-8")).hexdigest()
    return "md5" + hashlib.md5(inner.encode("ascii") + salt).hexdigest()


class ServerAuthenticator:
    """Answers one login's Authentication requests with ``user``'s ``password``."""

    def __init__(self, user: str, password: str | None) -> None:
        self.user = user
        self._password = password
        self._scram: scramp.ScramClient | None = None
        self._server_verified = False  # SCRAM: the server proved it knows the password
        self.done = False

    def _need_password(self, method: str) -> str:
        if self._password is None:
            raise ServerAuthError(
                f'server asked for {method} authentication for user "{self.user}" '
                "but no password is configured"
            )
        return self._password

    def respond(self, payload: bytes) -> bytes | None:
        """Reply to an Authentication message payload; None when no reply is due."""
        if len(payload) < 4:
            raise ServerAuthError("malformed authentication request from server")
        try:
            return self._respond(_INT32.unpack_from(payload, 0)[0], payload)
        except UnicodeDecodeError:
            raise ServerAuthError("malformed authentication request from server") from None

    def _respond(self, code: int, payload: bytes) -> bytes | None:
        if code == messages.AUTH_OK:
            if self._scram is not None and not self._server_verified:
                # A server that skips SASLFinal never proved it knows the password.
                raise ServerAuthError("server ended SCRAM authentication without its proof")
            self.done = True
            return None
        if code == messages.AUTH_CLEARTEXT:
            password = self._need_password("password")
            return messages.password_message(messages.cstring(password))
        if code == messages.AUTH_MD5:
            password = self._need_password("md5")
            salt = payload[4:8]
            return messages.password_message(
                messages.cstring(md5_password(self.user, password, salt))
            )
        if code == messages.AUTH_SASL:
            mechanisms = [m.decode() for m in payload[4:].split(b"\0") if m]
            if "SCRAM-SHA-256" not in mechanisms:
                raise ServerAuthError(
                    "server offered no supported SASL mechanism: " + ", ".join(mechanisms)
                )
            password = self._need_password("SCRAM-SHA-256")
            # Channel binding (-PLUS) needs TLS; pgproxy offers plain SCRAM-SHA-256 only. The
            # server takes the user from the startup packet; the SCRAM user name is a formality.
            self._scram = scramp.ScramClient(["SCRAM-SHA-256"], self.user, password)
            first = self._scram.get_client_first().encode("utf-8")
            return messages.sasl_initial_response("SCRAM-SHA-256", first)
        if code == messages.AUTH_SASL_CONTINUE:
            if self._scram is None:
                raise ServerAuthError("SASLContinue without SASL")
            try:
                self._scram.set_server_first(payload[4:].decode("utf-8"))
            except scramp.ScramException as exc:
                raise ServerAuthError(f"SCRAM exchange failed: {exc}") from None
            final = self._scram.get_client_final().encode("utf-8")
            return messages.password_message(final)
        if code == messages.AUTH_SASL_FINAL:
            if self._scram is None:
                raise ServerAuthError("SASLFinal without SASL")
            try:
                self._scram.set_server_final(payload[4:].decode("utf-8"))
            except scramp.ScramException as exc:
                raise ServerAuthError(f"server SCRAM signature is invalid: {exc}") from None
            self._server_verified = True
            return None
        raise ServerAuthError(f"unsupported authentication method requested by server: {code}")
