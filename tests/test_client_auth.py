"""Unit tests for client authentication (sans I/O) and the auth_file reader."""

from __future__ import annotations

import base64
import hashlib
import hmac
import struct
from pathlib import Path

import pytest
import scramp

from pgproxy.config import ConfigError
from pgproxy.protocol.client_auth import (
    BadSecret,
    ClientAuthenticator,
    ScramKeyCache,
    md5_hash,
    parse_secret,
)
from pgproxy.userlist import read_userlist


def _verifier(password: str) -> str:
    salt, stored, server, iterations = scramp.ScramMechanism().make_auth_info(
        password, iteration_count=4096
    )
    salt_text, stored_text, server_text = (
        base64.b64encode(v).decode() for v in (salt, stored, server)
    )
    return f"SCRAM-SHA-256${iterations}:{salt_text}${stored_text}:{server_text}"


def test_secret_kinds() -> None:
    assert parse_secret("hunter2").kind == "plain"
    assert parse_secret(md5_hash("u", "pw")).kind == "md5"
    assert parse_secret(_verifier("pw")).kind == "scram"
    assert "pw" not in repr(parse_secret("pw"))
    with pytest.raises(BadSecret):
        parse_secret("SCRAM-SHA-256$broken")


def _sasl_initial(client_first: str) -> bytes:
    data = client_first.encode()
    return b"SCRAM-SHA-256\0" + struct.pack("!i", len(data)) + data


@pytest.mark.parametrize("stored", ["plain", "scram"])
@pytest.mark.parametrize("scram_user", ["u", ""])  # libpq sends an empty SCRAM user name
def test_scram_exchange(stored: str, scram_user: str) -> None:
    secret = parse_secret("pw" if stored == "plain" else _verifier("pw"))
    for password, accepted in (("pw", True), ("wrong", False)):
        auth = ClientAuthenticator("scram-sha-256", "u", secret, 4096)
        assert auth.start()[9:].startswith(b"SCRAM-SHA-256\0")
        nonce = "rOprNGfwEbeRWgbNEkqO"
        client_first_bare = f"n={scram_user},r={nonce}"
        reply, outcome = auth.step(_sasl_initial("n,," + client_first_bare))
        assert outcome is None
        server_first = reply[9:].decode()
        # The client's side, computed here from the RFC (scramp refuses an empty name).
        attributes = dict(part.split("=", 1) for part in server_first.split(","))
        salted = hashlib.pbkdf2_hmac(
            "sha256", password.encode(), base64.b64decode(attributes["s"]), int(attributes["i"])
        )
        client_key = hashlib_hmac(salted, b"Client Key")
        without_proof = f"c=biws,r={attributes['r']}"
        auth_message = f"{client_first_bare},{server_first},{without_proof}".encode()
        signature = hashlib_hmac(hashlib.sha256(client_key).digest(), auth_message)
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        final = f"{without_proof},p={base64.b64encode(proof).decode()}".encode()
        reply, outcome = auth.step(final)
        assert outcome is accepted
        if accepted:
            server_signature = hashlib_hmac(hashlib_hmac(salted, b"Server Key"), auth_message)
            assert reply[9:] == b"v=" + base64.b64encode(server_signature)


def hashlib_hmac(key: bytes, message: bytes) -> bytes:
    return hmac.new(key, message, hashlib.sha256).digest()


def test_unknown_user_and_channel_binding_fail() -> None:
    auth = ClientAuthenticator("scram-sha-256", "ghost", None, 4096)
    auth.start()
    reply, outcome = auth.step(_sasl_initial("n,,n=,r=abc"))
    assert outcome is None and reply  # the exchange looks real ...
    _, outcome = auth.step(b"c=biws,r=abc,p=AAAA")
    assert outcome is False  # ... and fails
    binding = ClientAuthenticator("scram-sha-256", "u", parse_secret("pw"), 4096)
    binding.start()
    assert binding.step(_sasl_initial("p=tls-server-end-point,,n=,r=abc"))[1] is False


def _server_first_salt(auth: ClientAuthenticator) -> str:
    """Start a SCRAM exchange; the salt of the server-first message."""
    auth.start()
    reply, outcome = auth.step(_sasl_initial("n,,n=,r=abc"))
    assert outcome is None, reply
    attributes = dict(part.split("=", 1) for part in reply[9:].decode().split(","))
    return attributes["s"]


def test_plain_password_keys_are_derived_once_per_secret() -> None:
    """A login attempt for a user with a plain password costs no key derivation once the
    secret's keys are cached, and sees the same salt every time."""
    keys = ScramKeyCache()
    secret = parse_secret("pw")
    salts = [
        _server_first_salt(ClientAuthenticator("scram-sha-256", "u", secret, 4096, keys=keys))
        for _ in range(3)
    ]
    assert keys.derivations == 1 and len(keys) == 1
    assert salts[0] == salts[1] == salts[2]
    # Another user, or another password: keys of their own (and another salt).
    other_user = ClientAuthenticator("scram-sha-256", "v", secret, 4096, keys=keys)
    new_password = ClientAuthenticator("scram-sha-256", "u", parse_secret("pw2"), 4096, keys=keys)
    assert len({salts[0], _server_first_salt(other_user), _server_first_salt(new_password)}) == 3
    assert keys.derivations == 3
    # The cached keys still check passwords: right one accepted, wrong one refused.
    for password, accepted in (("pw", True), ("wrong", False)):
        auth = ClientAuthenticator("scram-sha-256", "u", secret, 4096, keys=keys)
        auth.start()
        assert _scram_login(auth, b"SCRAM-SHA-256", "n,,", b"", password) is accepted
    assert keys.derivations == 3
    # Bounded: past the limit the oldest entry goes.
    small = ScramKeyCache(limit=2)
    for user in ("a", "b", "c", "a"):
        _server_first_salt(ClientAuthenticator("scram-sha-256", user, secret, 4096, keys=small))
    assert len(small) == 2 and small.derivations == 4


def test_unknown_and_md5_users_get_a_stable_mock_salt_without_derivation() -> None:
    keys = ScramKeyCache()
    for secret in (None, parse_secret(md5_hash("u", "pw"))):
        first, second = (
            _server_first_salt(ClientAuthenticator("scram-sha-256", "u", secret, 4096, keys=keys))
            for _ in range(2)
        )
        assert first == second
        assert len(base64.b64decode(first)) == 16  # as long as PostgreSQL's salts
    other = _server_first_salt(ClientAuthenticator("scram-sha-256", "w", None, 4096, keys=keys))
    assert other != first
    assert keys.derivations == 0


@pytest.mark.parametrize("known", [True, False])
def test_an_authorization_identity_is_refused(known: bool) -> None:
    """As PostgreSQL: 'n,a=someone,' is refused with an error of its own (the same for
    every user), not ignored; a GS2 field that is not 'a=' is malformed."""
    secret = parse_secret("pw") if known else None
    auth = ClientAuthenticator("scram-sha-256", "u", secret, 4096)
    auth.start()
    assert auth.step(_sasl_initial("n,a=other,n=,r=abc")) == (b"", False)
    assert auth.refusal == (
        "0A000",
        "client uses authorization identity, but it is not supported",
    )
    malformed = ClientAuthenticator("scram-sha-256", "u", secret, 4096)
    malformed.start()
    assert malformed.step(_sasl_initial("n,x,n=,r=abc")) == (b"", False)
    assert malformed.refusal is None  # a failed login like a wrong password


@pytest.mark.parametrize("stored", ["pw", "md5"])
def test_md5_exchange(stored: str) -> None:
    secret = parse_secret("pw" if stored == "pw" else md5_hash("u", "pw"))
    for password, accepted in (("pw", True), ("wrong", False)):
        auth = ClientAuthenticator("md5", "u", secret, 4096)
        request = auth.start()
        assert struct.unpack("!I", request[5:9])[0] == 5
        salt = request[9:13]
        inner = hashlib.md5(f"{password}u".encode()).hexdigest()
        answer = "md5" + hashlib.md5(inner.encode() + salt).hexdigest()
        assert auth.step(answer.encode() + b"\0") == (b"", accepted)


def test_md5_asks_a_scram_user_for_scram_and_plain_checks_every_kind() -> None:
    assert ClientAuthenticator("md5", "u", parse_secret(_verifier("pw")), 4096).exchange == "scram"
    for stored in ("pw", md5_hash("u", "pw"), _verifier("pw")):
        auth = ClientAuthenticator("plain", "u", parse_secret(stored), 4096)
        auth.start()
        assert auth.step(b"pw\0") == (b"", True)
        again = ClientAuthenticator("plain", "u", parse_secret(stored), 4096)
        again.start()
        assert again.step(b"pX\0") == (b"", False)
    garbage = ClientAuthenticator("plain", "u", parse_secret("pw"), 4096)
    garbage.start()
    assert garbage.step(b"no terminator") == (b"", False)


def test_userlist(tmp_path: Path) -> None:
    path = tmp_path / "userlist.txt"
    path.write_text('; comment\n# another\n\n"alice" "pw"\n  "bo""b"   "md5' + "0" * 32 + '"\n')
    secrets = read_userlist(str(path))
    assert secrets["alice"].kind == "plain"
    assert secrets['bo"b'].kind == "md5"
    for bad in ('"alice"\n', 'alice "pw"\n', '"alice" "pw\n', '"a" "SCRAM-SHA-256$x"\n'):
        path.write_text(bad)
        with pytest.raises(ConfigError, match="line 1") as error:
            read_userlist(str(path))
        assert "pw" not in str(error.value)
    with pytest.raises(ConfigError, match="cannot read"):
        read_userlist(str(tmp_path / "missing"))


def _scram_login(
    auth: ClientAuthenticator, mechanism: bytes, header: str, cbind: bytes, password: str = "pw"
) -> bool | None:
    """A whole SCRAM exchange for ``password`` with the given GS2 header; the outcome."""
    nonce = "fyko+d2lbbFgONRv9qkxdawL"
    bare = f"n=,r={nonce}"
    first = (header + bare).encode()
    reply, outcome = auth.step(mechanism + b"\0" + struct.pack("!i", len(first)) + first)
    if outcome is not None:
        return outcome
    server_first = reply[9:].decode()
    attributes = dict(part.split("=", 1) for part in server_first.split(","))
    salted = hashlib.pbkdf2_hmac(
        "sha256", password.encode(), base64.b64decode(attributes["s"]), int(attributes["i"])
    )
    client_key = hashlib_hmac(salted, b"Client Key")
    binding = base64.b64encode(header.encode() + cbind).decode()
    without_proof = f"c={binding},r={attributes['r']}"
    message = f"{bare},{server_first},{without_proof}".encode()
    signature = hashlib_hmac(hashlib.sha256(client_key).digest(), message)
    proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
    return auth.step(f"{without_proof},p={base64.b64encode(proof).decode()}".encode())[1]


def test_channel_binding() -> None:
    cert_hash = hashlib.sha256(b"pgproxy's certificate").digest()
    secret = parse_secret("pw")

    def new() -> ClientAuthenticator:
        auth = ClientAuthenticator("scram-sha-256", "u", secret, 4096, cert_hash)
        assert auth.start()[9:] == b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0"
        return auth

    plus = b"SCRAM-SHA-256-PLUS"
    assert _scram_login(new(), plus, "p=tls-server-end-point,,", cert_hash) is True
    # Bound to another certificate (a man in the middle): refused.
    assert _scram_login(new(), plus, "p=tls-server-end-point,,", b"x" * 32) is False
    # Plain SCRAM stays possible; 'y' (binding supported, none seen) means a downgrade.
    assert _scram_login(new(), b"SCRAM-SHA-256", "n,,", b"") is True
    assert _scram_login(new(), b"SCRAM-SHA-256", "y,,", b"") is False
    # Without TLS there is no PLUS to choose.
    plain = ClientAuthenticator("scram-sha-256", "u", secret, 4096)
    plain.start()
    assert _scram_login(plain, plus, "p=tls-server-end-point,,", cert_hash) is False
