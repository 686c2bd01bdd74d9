"""Unit tests for the client login state machine (pgproxy.protocol.client_login), with bytes."""

from __future__ import annotations

import hashlib

import scramp

from pgproxy.protocol import codes, messages
from pgproxy.protocol.client_auth import md5_hash, parse_secret
from pgproxy.protocol.client_login import (
    Authenticated,
    ClientLogin,
    DirectTls,
    ForwardCancel,
    LoginFacts,
    LookUpSecret,
    Phase,
    Refuse,
    Send,
    StartTls,
    Startup,
)

SSL_REQUEST = b"\x00\x00\x00\x08\x04\xd2\x16\x2f"
GSSENC_REQUEST = b"\x00\x00\x00\x08\x04\xd2\x16\x30"
STARTUP = messages.startup_message({"user": "app", "database": "appdb"})


def _facts(method: str, secret: str | None = None, *, auth_query: bool = False,
           known: bool | None = True) -> LoginFacts:  # fmt: skip
    stored = parse_secret(secret) if secret is not None else None
    return LoginFacts(method, stored, auth_query, known, 4096, None)  # type: ignore[arg-type]


def _password(login: ClientLogin, secret: str | None, method: str = "md5") -> list[object]:
    """A login past its StartupMessage, asked for ``method`` against ``secret``."""
    assert isinstance(login.receive(STARTUP)[0], Startup)
    return list(login.choose("app", _facts(method, secret)))


def test_startup_message_asks_for_the_checks() -> None:
    login = ClientLogin(tls_offered=False)
    assert login.receive(STARTUP[:7]) == []  # incomplete: nothing yet
    actions = login.receive(STARTUP[7:])
    assert len(actions) == 1 and isinstance(actions[0], Startup)
    assert actions[0].packet.params == {"user": "app", "database": "appdb"}
    assert login.phase is Phase.CHECKS


def test_ssl_request_without_tls_is_answered_n() -> None:
    login = ClientLogin(tls_offered=False)
    actions = login.receive(SSL_REQUEST + GSSENC_REQUEST + STARTUP)
    assert actions[:2] == [Send(b"N"), Send(b"N")]
    assert isinstance(actions[2], Startup)


def test_ssl_request_with_tls_starts_the_handshake() -> None:
    login = ClientLogin(tls_offered=True)
    assert login.receive(SSL_REQUEST) == [Send(b"S"), StartTls()]
    assert login.phase is Phase.TLS
    assert login.tls_established() == []
    assert login.tls and login.phase is Phase.STARTUP
    assert login.receive(SSL_REQUEST) == [Send(b"N")]  # (already encrypted)


def test_bytes_behind_an_ssl_request_are_refused() -> None:
    login = ClientLogin(tls_offered=True)
    assert login.receive(SSL_REQUEST + STARTUP) == [
        Refuse(codes.PROTOCOL_VIOLATION, "unexpected data after SSLRequest")
    ]
    assert login.phase is Phase.ENDED


def test_direct_tls_hello() -> None:
    hello = b"\x16\x03\x01\x00\x05hello"
    assert ClientLogin(tls_offered=True).receive(hello) == [DirectTls(hello)]
    # Without TLS a ClientHello is a bad startup packet.
    actions = ClientLogin(tls_offered=False).receive(hello)
    assert len(actions) == 1 and isinstance(actions[0], Refuse)


def test_cancel_request_is_forwarded() -> None:
    cancel = messages.cancel_request(42, b"\x01\x02\x03\x04")
    assert ClientLogin(tls_offered=False).receive(cancel) == [
        ForwardCancel(42, b"\x01\x02\x03\x04")
    ]


def test_trust_authenticates_at_once_and_keeps_pipelined_bytes() -> None:
    login = ClientLogin(tls_offered=False)
    query = messages.query("SELECT 1")
    assert isinstance(login.receive(STARTUP + query)[0], Startup)
    assert login.choose("app", _facts("trust")) == [Authenticated(None)]
    assert login.phase is Phase.ADMISSION
    welcome = login.welcome(messages.parameter_status("TimeZone", "UTC"), b"\0\0\0\x07key!")
    assert welcome == (
        messages.AUTHENTICATION_OK
        + messages.parameter_status("TimeZone", "UTC")
        + messages.backend_key_data(7, b"key!")
        + messages.ready_for_query()
    )
    assert login.logged_in() == query
    assert login.phase is Phase.DONE


def test_md5_exchange() -> None:
    login = ClientLogin(tls_offered=False)
    actions = _password(login, "secret")
    assert isinstance(actions[0], Send) and actions[0].data[:1] == b"R"
    salt = actions[0].data[-4:]
    inner = md5_hash("app", "secret")[3:]
    answer = "md5" + hashlib.md5(inner.encode() + salt).hexdigest()
    done = login.receive(messages.password_message(answer.encode() + b"\0"))
    assert len(done) == 1 and isinstance(done[0], Authenticated)
    assert login.phase is Phase.ADMISSION


def test_wrong_password_is_refused_with_postgresql_words() -> None:
    login = ClientLogin(tls_offered=False)
    _password(login, "secret", "plain")
    refusal = login.receive(messages.password_message(b"wrong\0"))
    assert refusal == [
        Refuse(
            codes.INVALID_PASSWORD,
            'password authentication failed for user "app"',
            "client app: password authentication failed",
        )
    ]
    assert login.phase is Phase.ENDED


def test_a_message_other_than_a_password_is_refused() -> None:
    login = ClientLogin(tls_offered=False)
    _password(login, "secret", "plain")
    assert login.receive(messages.query("SELECT 1")) == [
        Refuse(codes.PROTOCOL_VIOLATION, "expected a password response")
    ]


def test_scram_exchange_in_pieces() -> None:
    login = ClientLogin(tls_offered=False)
    _password(login, "secret", "scram-sha-256")
    client = scramp.ScramClient(["SCRAM-SHA-256"], "app", "secret")
    first = messages.sasl_initial_response("SCRAM-SHA-256", client.get_client_first().encode())
    # The message arrives split in two chunks: nothing happens before it is whole.
    assert login.receive(first[:3]) == []
    (challenge,) = login.receive(first[3:])
    assert isinstance(challenge, Send)
    client.set_server_first(challenge.data[9:].decode())
    final = login.receive(messages.password_message(client.get_client_final().encode()))
    assert isinstance(final[0], Send) and isinstance(final[1], Authenticated)
    assert final[1].credential is not None  # the SCRAM keys, for passthrough


def test_auth_query_wait_holds_the_bytes() -> None:
    login = ClientLogin(tls_offered=False)
    login.receive(STARTUP)
    assert login.choose("app", _facts("plain", auth_query=True)) == [LookUpSecret()]
    assert login.phase is Phase.LOOKUP
    assert login.receive(messages.password_message(b"secret\0")) == []  # (held)
    actions = login.secret_found(parse_secret("secret"))
    assert isinstance(actions[0], Send)  # the cleartext request ...
    assert isinstance(actions[1], Authenticated)  # ... answered by the held message


def test_a_stored_secret_needs_no_auth_query() -> None:
    login = ClientLogin(tls_offered=False)
    login.receive(STARTUP)
    actions = login.choose("app", _facts("md5", "secret", auth_query=True))
    assert isinstance(actions[0], Send) and login.phase is Phase.PASSWORD


def test_trust_checks_the_user() -> None:
    login = ClientLogin(tls_offered=False)
    login.receive(STARTUP)
    assert login.choose("app", _facts("trust", known=False)) == [
        Refuse(codes.INVALID_AUTHORIZATION, '"trust" authentication failed')
    ]
    login = ClientLogin(tls_offered=False)
    login.receive(STARTUP)
    assert login.choose("app", _facts("trust", known=None)) == [LookUpSecret()]
    assert login.secret_found(None, unknown_user=True) == [
        Refuse(codes.INVALID_AUTHORIZATION, "no such user")
    ]
    login = ClientLogin(tls_offered=False)
    login.receive(STARTUP)
    login.choose("app", _facts("trust", known=None))
    assert login.secret_found(None) == [Authenticated(None)]  # (trust: no password)
