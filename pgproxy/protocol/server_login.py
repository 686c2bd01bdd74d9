"""pgproxy's side of a server login: answers PostgreSQL's Authentication requests.

Sans-I/O: ``ServerAuthenticator.respond`` takes the payload of an Authentication ('R')
message and returns the bytes to send back (or None when nothing is sent). SCRAM-SHA-256
uses scramp, which also verifies the server's signature.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import struct
from dataclasses import dataclass

import scramp

from pgproxy.protocol import messages

_INT32 = struct.Struct("!i")


@dataclass(frozen=True, slots=True)
class ScramKeys:
    """What passthrough knows of a user without the password: the SCRAM ClientKey
    recovered from the client's own proof, and the verifier it belongs to."""

    client_key: bytes
    server_key: bytes
    salt: bytes
    iterations: int

    def __repr__(self) -> str:  # never shows a key
        return "ScramKeys(...)"


@dataclass(frozen=True, slots=True)
class Md5Hash:
    """PostgreSQL's stored md5 secret: enough to answer an md5 challenge."""

    value: str

    def __repr__(self) -> str:
        return "Md5Hash(...)"


Credential = str | Md5Hash | ScramKeys  # a password, or what passthrough has instead


class ServerAuthError(Exception):
    """The server asked for something pgproxy cannot answer (no password, unknown method)."""


def md5_password(user: str, password: str, salt: bytes) -> str:
    """PostgreSQL's md5 response: 'md5' + md5(md5(password + user) + salt)."""
    inner = hashlib.md5(messages.wire(password + user)).hexdigest()
    return "md5" + hashlib.md5(inner.encode("ascii") + salt).hexdigest()


class ServerAuthenticator:
    """Answers one login's Authentication requests with ``user``'s ``password``."""

    def __init__(self, user: str, password: Credential | None) -> None:
        self.user = user
        self._password = password
        self._scram: scramp.ScramClient | _ScramKeysClient | None = None
        self._server_verified = False  # SCRAM: the server proved it knows the password
        self.done = False

    def _need_password(self, method: str) -> str:
        if self._password is None:
            raise ServerAuthError(
                # ("wrong password type": PgBouncer's words, which tools match.)
                f"wrong password type: server asked for {method} authentication for user "
                f'"{self.user}" but no password is configured'
            )
        if not isinstance(self._password, str):
            known = "an md5 hash" if isinstance(self._password, Md5Hash) else "SCRAM keys"
            raise ServerAuthError(
                f"wrong password type: server asked for {method} authentication for user "
                f'"{self.user}" but pgproxy only has {known} for it (passthrough), no password'
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
            salt = payload[4:8]
            if isinstance(self._password, Md5Hash):  # passthrough: the hash is enough
                answer = "md5" + hashlib.md5(self._password.value[3:].encode() + salt).hexdigest()
                return messages.password_message(messages.cstring(answer))
            password = self._need_password("md5")
            return messages.password_message(
                messages.cstring(md5_password(self.user, password, salt))
            )
        if code == messages.AUTH_SASL:
            mechanisms = [m.decode() for m in payload[4:].split(b"\0") if m]
            if "SCRAM-SHA-256" not in mechanisms:
                raise ServerAuthError(
                    "server offered no supported SASL mechanism: " + ", ".join(mechanisms)
                )
            if isinstance(self._password, ScramKeys):  # passthrough
                keys_client = _ScramKeysClient(self._password)
                self._scram = keys_client
                first = keys_client.client_first().encode("utf-8")
                return messages.sasl_initial_response("SCRAM-SHA-256", first)
            password = self._need_password("SCRAM-SHA-256")
            # Channel binding (-PLUS) needs TLS; pgproxy offers plain SCRAM-SHA-256 only. The
            # server takes the user from the startup packet; the SCRAM user name is a formality.
            # (scramp refuses a name with bytes that are not UTF-8, and an empty one.)
            name = self.user if messages.is_utf8(self.user) else "*"
            client = scramp.ScramClient(["SCRAM-SHA-256"], name, password)
            self._scram = client
            first = client.get_client_first().encode("utf-8")
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


class _ScramKeysClient:
    """The client side of SCRAM-SHA-256 from a recovered ClientKey instead of a password
    (RFC 5802: the proof is ClientKey XOR HMAC(H(ClientKey), AuthMessage)). It only works
    when the server's salt and iterations are those of the verifier the key came from."""

    def __init__(self, keys: ScramKeys) -> None:
        self._keys = keys
        self._nonce = base64.b64encode(secrets.token_bytes(18)).decode()
        self._bare = f"n=,r={self._nonce}"
        self._auth_message = b""

    def client_first(self) -> str:
        return "n,," + self._bare

    def set_server_first(self, server_first: str) -> None:
        attributes = dict(part.split("=", 1) for part in server_first.split(",") if "=" in part)
        nonce = attributes.get("r", "")
        if not nonce.startswith(self._nonce) or len(nonce) == len(self._nonce):
            raise ServerAuthError("SCRAM exchange failed: bad server nonce")
        salt = base64.b64decode(attributes.get("s", ""))
        if salt != self._keys.salt or int(attributes.get("i", "0")) != self._keys.iterations:
            raise ServerAuthError(
                "SCRAM passthrough impossible: the server's SCRAM secret for this user is not "
                "the one pgproxy has (another salt or iteration count)"
            )
        without_proof = f"c=biws,r={nonce}"
        self._auth_message = f"{self._bare},{server_first},{without_proof}".encode()
        self._without_proof = without_proof

    def get_client_final(self) -> str:
        stored_key = hashlib.sha256(self._keys.client_key).digest()
        signature = hmac.new(stored_key, self._auth_message, hashlib.sha256).digest()
        proof = bytes(a ^ b for a, b in zip(self._keys.client_key, signature, strict=True))
        return f"{self._without_proof},p={base64.b64encode(proof).decode()}"

    def set_server_final(self, server_final: str) -> None:
        expected = hmac.new(self._keys.server_key, self._auth_message, hashlib.sha256).digest()
        if not hmac.compare_digest(server_final.encode(), b"v=" + base64.b64encode(expected)):
            raise ServerAuthError("server SCRAM signature is invalid")
