"""ServerAuthenticator: pgproxy's answers to PostgreSQL's Authentication requests.

The SCRAM tests drive a real scramp server with the payloads framed as PostgreSQL frames
them: an Authentication message's payload is an int32 request code followed by its data.
"""

from __future__ import annotations

import base64
import hashlib
import struct

import pytest
import scramp

from pgproxy.protocol import messages
from pgproxy.protocol.server_login import ServerAuthenticator, ServerAuthError, md5_password

USER = "app"
PASSWORD = "app-secret"


def request(code: int, data: bytes = b"") -> bytes:
    """The payload of an Authentication ('R') message, as PostgreSQL sends it."""
    return struct.pack("!i", code) + data


def password_payload(reply: bytes | None) -> bytes:
    """The payload of a PasswordMessage / SASL response ('p'), checking its framing."""
    assert reply is not None
    assert reply[:1] == b"p"
    (length,) = struct.unpack_from("!I", reply, 1)
    assert length == len(reply) - 1
    return reply[5:]


def sasl_offer(*mechanisms: str) -> bytes:
    """AuthenticationSASL: each mechanism NUL-terminated, then an empty string."""
    return request(messages.AUTH_SASL, b"".join(m.encode() + b"\0" for m in mechanisms) + b"\0")


def parse_initial_response(payload: bytes) -> tuple[str, str]:
    """(mechanism, client-first-message) of a SASLInitialResponse payload."""
    mechanism, _, rest = payload.partition(b"\0")
    (size,) = struct.unpack_from("!i", rest, 0)
    data = rest[4:]
    assert size == len(data)
    return mechanism.decode(), data.decode()


class ScramServerSide:
    """PostgreSQL's half of a SCRAM-SHA-256 exchange, played by scramp."""

    def __init__(self, password: str, auth_info: tuple[bytes, bytes, bytes, int] | None = None):
        mechanism = scramp.ScramMechanism("SCRAM-SHA-256")
        self.auth_info = auth_info or mechanism.make_auth_info(password, iteration_count=4096)
        self.users: list[str] = []

        def lookup(user: str) -> tuple[bytes, bytes, bytes, int]:
            self.users.append(user)
            return self.auth_info

        self.server = mechanism.make_server(lookup)

    def continue_payload(self, client_first: str) -> bytes:
        self.server.set_client_first(client_first)
        return request(messages.AUTH_SASL_CONTINUE, self.server.get_server_first().encode())

    def final_payload(self, client_final: str) -> bytes:
        self.server.set_client_final(client_final)
        return request(messages.AUTH_SASL_FINAL, self.server.get_server_final().encode())


def scram_until_final(
    authenticator: ServerAuthenticator, server: ScramServerSide
) -> tuple[bytes, str]:
    """Run the exchange up to the server's SASLFinal; return it and the client's final."""
    offer = sasl_offer("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256")
    mechanism, client_first = parse_initial_response(password_payload(authenticator.respond(offer)))
    assert mechanism == "SCRAM-SHA-256"
    assert client_first.startswith("n,,")  # no channel binding: pgproxy talks plain TCP
    reply = authenticator.respond(server.continue_payload(client_first))
    client_final = password_payload(reply).decode()
    assert client_final.startswith("c=biws,")  # base64("n,,")
    return server.final_payload(client_final), client_final


def test_scram_sha_256_against_scramp_server() -> None:
    authenticator = ServerAuthenticator(USER, PASSWORD)
    server = ScramServerSide(PASSWORD)
    final, _ = scram_until_final(authenticator, server)
    assert authenticator.respond(final) is None  # SASLFinal needs no answer
    assert not authenticator.done
    assert authenticator.respond(request(messages.AUTH_OK)) is None
    assert authenticator.done


def test_scram_non_ascii_password() -> None:
    password = "pässwörd ✓"
    authenticator = ServerAuthenticator(USER, password)
    final, _ = scram_until_final(authenticator, ScramServerSide(password))
    assert authenticator.respond(final) is None


def test_scram_wrong_password_is_refused_by_the_server() -> None:
    authenticator = ServerAuthenticator(USER, "not-the-password")
    server = ScramServerSide(PASSWORD)
    offer = sasl_offer("SCRAM-SHA-256")
    _, client_first = parse_initial_response(password_payload(authenticator.respond(offer)))
    client_final = password_payload(
        authenticator.respond(server.continue_payload(client_first))
    ).decode()
    with pytest.raises(scramp.ScramException):
        server.server.set_client_final(client_final)


def test_scram_server_error_in_final_message() -> None:
    authenticator = ServerAuthenticator(USER, PASSWORD)
    server = ScramServerSide(PASSWORD)
    scram_until_final(authenticator, server)
    with pytest.raises(ServerAuthError, match="signature"):
        authenticator.respond(request(messages.AUTH_SASL_FINAL, b"e=invalid-proof"))


def test_scram_tampered_server_signature() -> None:
    authenticator = ServerAuthenticator(USER, PASSWORD)
    final, _ = scram_until_final(authenticator, ScramServerSide(PASSWORD))
    signature = base64.b64decode(final[4:].decode()[2:])
    forged = bytes([signature[0] ^ 1]) + signature[1:]
    with pytest.raises(ServerAuthError, match="server SCRAM signature is invalid"):
        authenticator.respond(request(messages.AUTH_SASL_FINAL, b"v=" + base64.b64encode(forged)))


def test_scram_impostor_server_without_server_key() -> None:
    # A server that knows StoredKey (enough to check the client's proof) but not ServerKey
    # cannot produce a valid signature: pgproxy must refuse it.
    mechanism = scramp.ScramMechanism("SCRAM-SHA-256")
    salt, stored_key, _, iterations = mechanism.make_auth_info(PASSWORD, iteration_count=4096)
    impostor = ScramServerSide(PASSWORD, (salt, stored_key, b"\x00" * 32, iterations))
    authenticator = ServerAuthenticator(USER, PASSWORD)
    final, _ = scram_until_final(authenticator, impostor)
    with pytest.raises(ServerAuthError, match="server SCRAM signature is invalid"):
        authenticator.respond(final)
    assert PASSWORD not in str(final)


def test_scram_bad_server_first_message() -> None:
    authenticator = ServerAuthenticator(USER, PASSWORD)
    authenticator.respond(sasl_offer("SCRAM-SHA-256"))
    # The server nonce must extend the client's: a foreign nonce is an attack or a bug.
    bad = b"r=someoneelsesnonce,s=" + base64.b64encode(b"salt") + b",i=4096"
    with pytest.raises(ServerAuthError, match="SCRAM exchange failed"):
        authenticator.respond(request(messages.AUTH_SASL_CONTINUE, bad))


def test_scram_plus_only_offer_is_refused() -> None:
    authenticator = ServerAuthenticator(USER, PASSWORD)
    with pytest.raises(ServerAuthError) as info:
        authenticator.respond(sasl_offer("SCRAM-SHA-256-PLUS"))
    assert str(info.value) == "server offered no supported SASL mechanism: SCRAM-SHA-256-PLUS"


def test_sasl_continue_or_final_without_sasl() -> None:
    authenticator = ServerAuthenticator(USER, PASSWORD)
    with pytest.raises(ServerAuthError, match="SASLContinue without SASL"):
        authenticator.respond(request(messages.AUTH_SASL_CONTINUE, b"r=x,s=eA==,i=4096"))
    with pytest.raises(ServerAuthError, match="SASLFinal without SASL"):
        authenticator.respond(request(messages.AUTH_SASL_FINAL, b"v=eA=="))


def postgres_md5(user: str, password: str, salt: bytes) -> bytes:
    """PostgreSQL's formula (pg_md5_encrypt twice), computed here independently."""
    stored = "md5" + hashlib.md5(password.encode() + user.encode()).hexdigest()
    return ("md5" + hashlib.md5(stored[3:].encode() + salt).hexdigest()).encode()


@pytest.mark.parametrize(
    "user, password, salt",
    [
        ("md5user", "md5-secret", b"\x01\x02\x03\x04"),
        ("u", "", b"\x00\x00\x00\x00"),
        ("ünï", "pä$$", b"\xff\xfe\xfd\xfc"),
    ],
)
def test_md5_answer(user: str, password: str, salt: bytes) -> None:
    authenticator = ServerAuthenticator(user, password)
    reply = authenticator.respond(request(messages.AUTH_MD5, salt))
    expected = postgres_md5(user, password, salt)
    assert password_payload(reply) == expected + b"\0"
    assert md5_password(user, password, salt).encode() == expected
    assert len(expected) == 35


def test_md5_known_vector() -> None:
    # pg_authid stores 'md5' || md5('secret' || 'postgres') for role postgres, password
    # secret; the answer to salt 'abcd' is 'md5' || md5(that hex digest || salt).
    assert hashlib.md5(b"secretpostgres").hexdigest() == "53f48b7c4b76a86ce72276c5755f217d"
    assert md5_password("postgres", "secret", b"abcd") == "md568a34aeb823f3662497ea0b9fb65e46a"


def test_cleartext_answer() -> None:
    authenticator = ServerAuthenticator("plainuser", "plain-secret")
    reply = authenticator.respond(request(messages.AUTH_CLEARTEXT))
    assert reply == b"p\x00\x00\x00\x11plain-secret\x00"
    assert not authenticator.done


@pytest.mark.parametrize(
    "payload, method",
    [
        (request(messages.AUTH_CLEARTEXT), "password"),
        (request(messages.AUTH_MD5, b"salt"), "md5"),
        (sasl_offer("SCRAM-SHA-256"), "SCRAM-SHA-256"),
    ],
)
def test_missing_password(payload: bytes, method: str) -> None:
    authenticator = ServerAuthenticator("trustuser", None)
    with pytest.raises(ServerAuthError) as info:
        authenticator.respond(payload)
    assert str(info.value) == (
        f'wrong password type: server asked for {method} authentication for user "trustuser" '
        "but no password is configured"
    )


def test_trust_needs_no_password() -> None:
    authenticator = ServerAuthenticator("trustuser", None)
    assert authenticator.respond(request(messages.AUTH_OK)) is None
    assert authenticator.done


@pytest.mark.parametrize("code", [2, 6, 7, 8, 9, 13, 99, -1])
def test_unknown_code(code: int) -> None:
    # KerberosV5, SCMCredential, GSS, GSSContinue, SSPI, ... are not supported.
    authenticator = ServerAuthenticator(USER, PASSWORD)
    with pytest.raises(ServerAuthError) as info:
        authenticator.respond(request(code, b"\0\0\0\0"))
    assert str(info.value) == f"unsupported authentication method requested by server: {code}"
    assert PASSWORD not in str(info.value)


def test_errors_never_contain_the_password() -> None:
    authenticator = ServerAuthenticator(USER, PASSWORD)
    for payload in (
        sasl_offer("SCRAM-SHA-1"),
        request(messages.AUTH_SASL_FINAL, b"v=AAAA"),
        request(7),
    ):
        with pytest.raises(ServerAuthError) as info:
            authenticator.respond(payload)
        assert PASSWORD not in str(info.value)


def test_authentication_ok_before_sasl_final_is_refused() -> None:
    authenticator = ServerAuthenticator(USER, PASSWORD)
    server = ScramServerSide(PASSWORD)
    offer = sasl_offer("SCRAM-SHA-256")
    _, client_first = parse_initial_response(password_payload(authenticator.respond(offer)))
    authenticator.respond(server.continue_payload(client_first))
    # An impostor skips SASLFinal (it could not compute the signature) and says OK.
    with pytest.raises(ServerAuthError):
        authenticator.respond(request(messages.AUTH_OK))


def test_non_utf8_sasl_continue_is_a_server_auth_error() -> None:
    authenticator = ServerAuthenticator(USER, PASSWORD)
    authenticator.respond(sasl_offer("SCRAM-SHA-256"))
    with pytest.raises(ServerAuthError):
        authenticator.respond(request(messages.AUTH_SASL_CONTINUE, b"r=\xff\xfe,s=eA==,i=4096"))
