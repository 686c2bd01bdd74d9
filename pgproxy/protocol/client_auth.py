"""Clients' side of a login to pgproxy: asking for and checking a password (sans I/O).

``ClientAuthenticator.start`` gives the first Authentication request to send; ``step``
takes each PasswordMessage payload ('p': a password, an md5 answer, or a SASL message) and
returns what to send back and whether the exchange succeeded, failed or goes on. SCRAM
verifiers come from scramp; the server side of the exchange is ``ScramExchange``. An unknown
user goes through the same exchange with a made-up secret
and fails the same way as a wrong password, so user names cannot be probed.

No login attempt costs a key derivation (PBKDF2, a millisecond of the event loop at 4096
iterations): the keys of a plain-password secret are derived once and kept in a
``ScramKeyCache``, and an unknown user's made-up keys take no derivation at all (as in
PostgreSQL's mock authentication). Either way the salt a client sees for a user name is the
same at every attempt, as that of a stored verifier is.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import struct
from dataclasses import dataclass
from typing import Literal

import scramp

from pgproxy.protocol import codes, messages
from pgproxy.protocol.server_login import Credential, Md5Hash, ScramKeys

Method = Literal["plain", "md5", "scram-sha-256"]
SCRAM = "SCRAM-SHA-256"
SCRAM_PLUS = "SCRAM-SHA-256-PLUS"
CHANNEL_BINDING_TYPE = "tls-server-end-point"
_INT32 = struct.Struct("!i")
# A per-process key for made-up SCRAM salts and keys: the same user gets the same salt each
# time (as a real one would), but nobody can compute it. Made at import, in the supervisor
# before it forks: every worker has the same one, so salts do not change from worker to
# worker either (unlike a real user's, which would give unknown names away).
_MOCK_KEY = secrets.token_bytes(32)
# PostgreSQL's salt length (SCRAM_DEFAULT_SALT_LEN).
_SALT_LENGTH = 16

# (salt, stored key, server key, iterations): what a SCRAM proof is checked with.
Verifier = tuple[bytes, bytes, bytes, int]


class BadSecret(ValueError):
    """A stored secret is neither a password, an md5 hash nor a SCRAM verifier."""


class ScramRefused(Exception):
    """A SCRAM message asks for something PostgreSQL refuses with an error of its own
    (``sqlstate``, ``message``) rather than as a failed password."""

    def __init__(self, sqlstate: str, message: str) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message


@dataclass(frozen=True, slots=True)
class Secret:
    """What pgproxy stores for a user: a plain password, PostgreSQL's md5 hash
    (``md5`` + md5(password + user)), or a SCRAM-SHA-256 verifier."""

    kind: Literal["plain", "md5", "scram"]
    value: str

    def __repr__(self) -> str:  # never shows the value
        return f"Secret({self.kind})"


def parse_secret(text: str) -> Secret:
    """Recognise a stored secret's kind as PostgreSQL and PgBouncer do."""
    if text.startswith("SCRAM-SHA-256$"):
        _scram_verifier(text)  # validates
        return Secret("scram", text)
    if len(text) == 35 and text.startswith("md5") and _is_hex(text[3:]):
        return Secret("md5", text)
    return Secret("plain", text)


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)


def _scram_verifier(text: str) -> Verifier:
    """(salt, stored key, server key, iterations) of 'SCRAM-SHA-256$i:salt$stored:server'."""
    try:
        _, params, keys = text.split("$")
        iterations, salt = params.split(":")
        stored_key, server_key = keys.split(":")
        return (
            base64.b64decode(salt, validate=True),
            base64.b64decode(stored_key, validate=True),
            base64.b64decode(server_key, validate=True),
            int(iterations),
        )
    except (ValueError, binascii.Error):
        raise BadSecret("malformed SCRAM-SHA-256 secret") from None


class ScramKeyCache:
    """SCRAM keys derived from plain-password secrets, once per (user, password,
    iterations) rather than at every login attempt.

    The salt is a keyed hash of the user name and password (the per-process key above):
    the same at every attempt, also after the entry was evicted, and new when the password
    changes, as a stored verifier's would be. Entries are found by another keyed hash of
    the pair, so the cache holds no password. At most ``limit`` entries are kept (the
    oldest goes first): the secrets come from the configuration, the auth_file or
    auth_query, never from what a client sends, so only that many users' derivations
    could ever be repeated.
    """

    def __init__(self, limit: int = 10_000) -> None:
        self._limit = limit
        self._verifiers: dict[tuple[bytes, int], Verifier] = {}
        # Key derivations done so far: a test counts them; a login attempt adds none once
        # its secret is here.
        self.derivations = 0

    def __len__(self) -> int:
        return len(self._verifiers)

    def verifier(self, user: str, password: str, iterations: int) -> Verifier:
        """The SCRAM-SHA-256 verifier of ``user``'s plain ``password`` (derived at most
        once while it stays cached)."""
        pair = _length_prefixed(user) + _length_prefixed(password)
        digest = hmac.new(_MOCK_KEY, b"plain\0" + pair, hashlib.sha512).digest()
        key = (digest[_SALT_LENGTH:], iterations)
        found = self._verifiers.get(key)
        if found is None:
            found = scramp.ScramMechanism(SCRAM).make_auth_info(
                password, iteration_count=iterations, salt=digest[:_SALT_LENGTH]
            )
            self.derivations += 1
            if len(self._verifiers) >= self._limit:
                del self._verifiers[next(iter(self._verifiers))]
            self._verifiers[key] = found
        return found


#: The keys of every plain-password secret this process has checked a SCRAM login with.
SCRAM_KEYS = ScramKeyCache()


def mock_verifier(user: str, iterations: int) -> Verifier:
    """A made-up verifier for a user without a SCRAM secret (unknown, or md5-stored), as
    PostgreSQL's mock authentication makes one: a salt that is the same at every attempt
    for the same name, and keys that match no proof. Keyed hashes, no key derivation: it
    costs what the lookup of a real verifier does."""
    name = _length_prefixed(user)
    digest = hmac.new(_MOCK_KEY, b"mock\0" + name, hashlib.sha512).digest()
    server_key = hmac.new(_MOCK_KEY, b"mock server key\0" + name, hashlib.sha256).digest()
    return digest[:_SALT_LENGTH], digest[_SALT_LENGTH : _SALT_LENGTH + 32], server_key, iterations


def _length_prefixed(text: str) -> bytes:
    data = messages.wire(text)
    return _INT32.pack(len(data)) + data


def md5_hash(user: str, password: str) -> str:
    """PostgreSQL's stored md5 secret for ``user``'s ``password``."""
    # (PostgreSQL hashes the role name's bytes, whatever they are: messages.wire.)
    return "md5" + hashlib.md5(messages.wire(password + user)).hexdigest()


def failure_message(user: str) -> str:
    """PostgreSQL's (and PgBouncer's) words for every failed password login."""
    return f'password authentication failed for user "{user}"'


class ClientAuthenticator:
    """One client's password exchange under ``method`` (PgBouncer's choice of exchange:
    md5 asks a user stored with a SCRAM secret for SCRAM instead)."""

    def __init__(
        self,
        method: Method,
        user: str,
        secret: Secret | None,
        iterations: int,
        channel_binding: bytes | None = None,
        keys: ScramKeyCache | None = None,
    ) -> None:
        self.user = user
        self._keys = SCRAM_KEYS if keys is None else keys
        # tls-server-end-point data (the hash of pgproxy's certificate) when the client
        # came over TLS: SCRAM-SHA-256-PLUS is offered then.
        self._channel_binding = channel_binding
        self._secret = secret
        self._iterations = iterations
        self._salt = b""
        self._scram: ScramExchange | None = None
        # After a failed exchange: (SQLSTATE, message) when the client must be told
        # something else than that its password was wrong.
        self.refusal: tuple[str, str] | None = None
        # After a successful exchange: what pgproxy may log in to PostgreSQL with as this
        # user (passthrough): the password, the md5 hash, or the SCRAM keys.
        self.credential: Credential | None = None
        if method == "md5" and (secret is None or secret.kind != "scram"):
            self.exchange = "md5"
        elif method == "plain":
            self.exchange = "plain"
        else:
            self.exchange = "scram"

    def start(self) -> bytes:
        """The first Authentication request."""
        if self.exchange == "plain":
            return messages.authentication(messages.AUTH_CLEARTEXT)
        if self.exchange == "md5":
            self._salt = secrets.token_bytes(4)
            return messages.authentication(messages.AUTH_MD5, self._salt)
        # SCRAM without channel binding: -PLUS needs TLS (issue #4's TLS part).
        offered = [SCRAM_PLUS, SCRAM] if self._channel_binding is not None else [SCRAM]
        names = b"".join(messages.cstring(name) for name in offered)
        return messages.authentication(messages.AUTH_SASL, names + b"\0")

    def step(self, payload: bytes) -> tuple[bytes, bool | None]:
        """Check one PasswordMessage payload: (reply, True ok / False failed / None more)."""
        try:
            if self.exchange == "plain":
                return b"", self._check_plain(_cstring(payload))
            if self.exchange == "md5":
                return b"", self._check_md5(_cstring(payload))
            return self._scram_step(payload)
        except ScramRefused as exc:
            self.refusal = (exc.sqlstate, exc.message)
            return b"", False
        except (ValueError, KeyError, UnicodeDecodeError, struct.error, binascii.Error):
            return b"", False

    # -- the exchanges ----------------------------------------------------------------------

    def _check_plain(self, password: str) -> bool:
        ok = self._check_plain_password(password)
        if ok:
            self.credential = password
        return ok

    def _check_plain_password(self, password: str) -> bool:
        secret = self._secret
        if secret is None:
            return False
        if secret.kind == "plain":
            return hmac.compare_digest(password.encode(), secret.value.encode())
        if secret.kind == "md5":
            return hmac.compare_digest(md5_hash(self.user, password), secret.value)
        salt, stored_key, server_key, iterations = _scram_verifier(secret.value)
        mechanism = scramp.ScramMechanism(SCRAM)
        _, stored, server, _ = mechanism.make_auth_info(
            password, iteration_count=iterations, salt=salt
        )
        return hmac.compare_digest(stored, stored_key) and hmac.compare_digest(server, server_key)

    def _check_md5(self, answer: str) -> bool:
        secret = self._secret
        if secret is None or secret.kind == "scram":
            return False
        stored = secret.value if secret.kind == "md5" else md5_hash(self.user, secret.value)
        expected = "md5" + hashlib.md5(stored[3:].encode("ascii") + self._salt).hexdigest()
        ok = hmac.compare_digest(answer, expected)
        if ok:
            self.credential = secret.value if secret.kind == "plain" else Md5Hash(secret.value)
        return ok

    def _scram_step(self, payload: bytes) -> tuple[bytes, bool | None]:
        if self._scram is None:
            mechanism_name, rest = payload.split(b"\0", 1)
            mechanism = mechanism_name.decode()
            if mechanism == SCRAM_PLUS and self._channel_binding is None:
                return b"", False
            if mechanism not in (SCRAM, SCRAM_PLUS):
                return b"", False
            length = _INT32.unpack_from(rest, 0)[0]
            binding = self._channel_binding if mechanism == SCRAM_PLUS else None
            # A client that could bind ('y') but saw no PLUS offered when we did offer it
            # was downgraded by someone in between (RFC 5802 5.1).
            self._scram = ScramExchange(
                *self._verifier(), binding=binding, plus_offered=self._channel_binding is not None
            )
            server_first = self._scram.server_first(rest[4 : 4 + length].decode("utf-8"))
            return messages.authentication(messages.AUTH_SASL_CONTINUE, server_first), None
        server_final = self._scram.server_final(payload.decode("utf-8"))
        secret = self._secret
        if server_final is None or secret is None or secret.kind == "md5":
            return b"", False  # a wrong proof, or the made-up verifier
        if secret.kind == "plain":
            self.credential = secret.value
        else:
            salt, _, server_key, iterations = _scram_verifier(secret.value)
            self.credential = ScramKeys(self._scram.client_key, server_key, salt, iterations)
        return messages.authentication(messages.AUTH_SASL_FINAL, server_final), True

    def _verifier(self) -> Verifier:
        """(salt, stored key, server key, iterations) the client's proof is checked with;
        no key derivation unless a plain password's keys are not cached yet."""
        secret = self._secret
        if secret is not None and secret.kind == "scram":
            return _scram_verifier(secret.value)
        if secret is not None and secret.kind == "plain":
            return self._keys.verifier(self.user, secret.value, self._iterations)
        # Unknown user or an md5 secret (no SCRAM possible): a made-up verifier, so that
        # the exchange looks like a real one and then fails like a wrong password.
        return mock_verifier(self.user, self._iterations)


class ScramExchange:
    """The server side of SCRAM-SHA-256 (RFC 5802, 7677) without channel binding.

    scramp (used for verifiers and for pgproxy's own server logins) refuses the empty
    SCRAM user name that libpq sends (PostgreSQL takes the user from the startup packet and
    ignores it), so this side of the exchange is the RFC's few lines of HMAC here.
    """

    def __init__(
        self,
        salt: bytes,
        stored_key: bytes,
        server_key: bytes,
        iterations: int,
        *,
        binding: bytes | None = None,
        plus_offered: bool = False,
    ):
        self._binding = binding  # SCRAM-SHA-256-PLUS: the tls-server-end-point data
        self._plus_offered = plus_offered
        self._salt = salt
        self._stored_key = stored_key
        self._server_key = server_key
        self._iterations = iterations
        self._nonce = ""
        self._header = ""
        self._messages = ""
        self.client_key = b""  # recovered from a valid proof (SCRAM passthrough)

    def server_first(self, client_first: str) -> bytes:
        """Answer the client-first message; raise ValueError if it is malformed, and
        ScramRefused if it names an authorization identity."""
        header, authzid, bare = _gs2_split(client_first)
        if self._binding is not None:
            if not header.startswith(f"p={CHANNEL_BINDING_TYPE},"):
                raise ValueError("SCRAM-SHA-256-PLUS needs tls-server-end-point binding")
        elif header.startswith("p"):
            raise ValueError("channel binding without SCRAM-SHA-256-PLUS")
        elif header.startswith("y") and self._plus_offered:
            raise ValueError("channel binding downgrade")
        if authzid.startswith("a="):
            # PostgreSQL's refusal (and PgBouncer's): the user is the startup packet's,
            # and logging in as someone else is not on offer.
            raise ScramRefused(
                codes.FEATURE_NOT_SUPPORTED,
                "client uses authorization identity, but it is not supported",
            )
        if authzid:
            raise ValueError("malformed GS2 header")
        attributes = _attributes(bare)
        client_nonce = attributes["r"]
        if not client_nonce:
            raise ValueError("empty nonce")
        self._header = header
        self._nonce = client_nonce + base64.b64encode(secrets.token_bytes(18)).decode()
        salt = base64.b64encode(self._salt).decode()
        first = f"r={self._nonce},s={salt},i={self._iterations}"
        self._messages = f"{bare},{first}"
        return first.encode()

    def server_final(self, client_final: str) -> bytes | None:
        """Check the client's proof: the server-final message, or None if it is wrong."""
        without_proof, _, proof_attribute = client_final.rpartition(",p=")
        attributes = _attributes(without_proof)
        if attributes.get("r") != self._nonce:
            return None
        binding_input = self._header.encode() + (self._binding or b"")
        expected_binding = base64.b64encode(binding_input).decode()
        if attributes.get("c") != expected_binding:
            return None
        proof = base64.b64decode(proof_attribute, validate=True)
        auth_message = f"{self._messages},{without_proof}".encode()
        signature = hmac.new(self._stored_key, auth_message, hashlib.sha256).digest()
        if len(proof) != len(signature):
            return None
        client_key = bytes(a ^ b for a, b in zip(proof, signature, strict=True))
        if not hmac.compare_digest(hashlib.sha256(client_key).digest(), self._stored_key):
            return None
        self.client_key = client_key
        server_signature = hmac.new(self._server_key, auth_message, hashlib.sha256).digest()
        return b"v=" + base64.b64encode(server_signature)


def _gs2_split(client_first: str) -> tuple[str, str, str]:
    """('n,,' or 'y,,' header, authzid, client-first-bare)."""
    flag, authzid, bare = client_first.split(",", 2)
    if flag not in ("n", "y") and not flag.startswith("p="):
        raise ValueError("bad GS2 header")
    return f"{flag},{authzid},", authzid, bare


def _attributes(message: str) -> dict[str, str]:
    result: dict[str, str] = {}
    for part in message.split(","):
        key, separator, value = part.partition("=")
        if not separator or len(key) != 1:
            raise ValueError("malformed SCRAM attribute")
        result.setdefault(key, value)
    return result


def _cstring(payload: bytes) -> str:
    end = payload.find(b"\0")
    if end < 0:
        raise ValueError("unterminated string")
    return payload[:end].decode("utf-8")
