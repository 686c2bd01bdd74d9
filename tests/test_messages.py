"""Message builders (exact wire bytes) and the parsers that read them back."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgproxy.protocol import messages
from pgproxy.protocol.startup import CancelRequest, StartupMessage, parse_startup

TEXT = st.text(alphabet=st.characters(exclude_categories=("Cs",), exclude_characters="\0"))


def split_message(data: bytes) -> tuple[bytes, bytes]:
    """(type byte, payload) of one message, checking its self-inclusive length field."""
    (length,) = struct.unpack_from("!I", data, 1)
    assert length == len(data) - 1
    return data[:1], data[5:]


def test_message_header() -> None:
    assert messages.message(b"Q", b"select 1\0") == b"Q\x00\x00\x00\x0dselect 1\x00"
    assert messages.message(b"S") == b"S\x00\x00\x00\x04"


def test_cstring() -> None:
    assert messages.cstring("abc") == b"abc\0"
    assert messages.cstring("") == b"\0"
    assert messages.cstring("é") == b"\xc3\xa9\0"
    assert messages.cstring("a\0b") == b"ab\0"  # an embedded NUL would end the string early
    assert messages.cstring("\ud800x") == b"?x\0"  # unencodable: replaced, never raises


@pytest.mark.parametrize(
    "status, expected",
    [
        (None, b"Z\x00\x00\x00\x05I"),
        (b"I", b"Z\x00\x00\x00\x05I"),
        (b"T", b"Z\x00\x00\x00\x05T"),
        (b"E", b"Z\x00\x00\x00\x05E"),
    ],
)
def test_ready_for_query(status: bytes | None, expected: bytes) -> None:
    built = messages.ready_for_query() if status is None else messages.ready_for_query(status)
    assert built == expected


def test_backend_key_data() -> None:
    assert messages.backend_key_data(1234, b"\xde\xad\xbe\xef") == (
        b"K\x00\x00\x00\x0c\x00\x00\x04\xd2\xde\xad\xbe\xef"
    )
    long_key = bytes(range(32))  # protocol 3.2 allows up to 256 bytes
    built = messages.backend_key_data(2**31 - 1, long_key)
    assert built == b"K" + struct.pack("!I", 40) + b"\x7f\xff\xff\xff" + long_key


@given(st.integers(-(2**31), 2**31 - 1), st.binary(min_size=4, max_size=256))
def test_backend_key_data_is_type_length_signed_pid_key(process_id: int, key: bytes) -> None:
    built = messages.backend_key_data(process_id, key)
    assert built == struct.pack("!cIi", b"K", 8 + len(key), process_id) + key


def test_negotiate_protocol_version() -> None:
    assert messages.negotiate_protocol_version(0, []) == (
        b"v\x00\x00\x00\x0c" + b"\x00\x03\x00\x00" + b"\x00\x00\x00\x00"
    )
    assert messages.negotiate_protocol_version(0, ["_pq_.a", "_pq_.bc"]) == (
        b"v\x00\x00\x00\x1b"
        + b"\x00\x03\x00\x00"
        + b"\x00\x00\x00\x02"
        + b"_pq_.a\x00"
        + b"_pq_.bc\x00"
    )
    assert messages.negotiate_protocol_version(2, [])[5:9] == b"\x00\x03\x00\x02"


def test_cancel_request() -> None:
    built = messages.cancel_request(1234, b"\x01\x02\x03\x04")
    assert built == (
        b"\x00\x00\x00\x10"  # length 16
        + b"\x04\xd2\x16\x2e"  # 1234 << 16 | 5678
        + b"\x00\x00\x04\xd2"
        + b"\x01\x02\x03\x04"
    )
    assert parse_startup(built) == (CancelRequest(1234, b"\x01\x02\x03\x04"), 16)


def test_cancel_request_long_key_round_trip() -> None:
    key = bytes(range(256))
    built = messages.cancel_request(99, key)
    assert parse_startup(built) == (CancelRequest(99, key), 12 + 256)


def test_authentication_requests() -> None:
    assert messages.AUTHENTICATION_OK == b"R\x00\x00\x00\x08\x00\x00\x00\x00"
    assert messages.authentication(messages.AUTH_OK) == messages.AUTHENTICATION_OK
    assert messages.authentication(messages.AUTH_MD5, b"salt") == (
        b"R\x00\x00\x00\x0c\x00\x00\x00\x05salt"
    )
    assert messages.authentication(messages.AUTH_SASL, b"SCRAM-SHA-256\0\0") == (
        b"R\x00\x00\x00\x17\x00\x00\x00\x0aSCRAM-SHA-256\x00\x00"
    )


def test_terminate_query_and_password() -> None:
    assert messages.TERMINATE == b"X\x00\x00\x00\x04"
    assert messages.query("select 1") == b"Q\x00\x00\x00\x0dselect 1\x00"
    assert messages.password_message(b"pw\0") == b"p\x00\x00\x00\x07pw\x00"


def test_sasl_initial_response() -> None:
    built = messages.sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=abc")
    type_byte, payload = split_message(built)
    assert type_byte == b"p"
    assert payload == b"SCRAM-SHA-256\x00" + b"\x00\x00\x00\x0b" + b"n,,n=,r=abc"


def test_startup_message_bytes() -> None:
    built = messages.startup_message({"user": "bob"})
    assert built == b"\x00\x00\x00\x12\x00\x03\x00\x00user\x00bob\x00\x00"


def test_error_response_fields() -> None:
    built = messages.error_response("42P01", 'relation "t" does not exist')
    type_byte, payload = split_message(built)
    assert type_byte == b"E"
    assert payload.endswith(b"\0\0")
    assert messages.parse_error_fields(payload) == {
        "S": "ERROR",
        "V": "ERROR",
        "C": "42P01",
        "M": 'relation "t" does not exist',
    }


def test_fatal_with_detail() -> None:
    built = messages.fatal("53300", "too many clients", detail="max_client_conn is 100")
    type_byte, payload = split_message(built)
    assert type_byte == b"E"
    assert messages.parse_error_fields(payload) == {
        "S": "FATAL",
        "V": "FATAL",
        "C": "53300",
        "M": "too many clients",
        "D": "max_client_conn is 100",
    }


def test_notice_response() -> None:
    type_byte, payload = split_message(messages.notice_response("hello"))
    assert type_byte == b"N"
    assert messages.parse_error_fields(payload) == {
        "S": "NOTICE",
        "V": "NOTICE",
        "C": "00000",
        "M": "hello",
    }


def test_parse_error_fields_of_a_postgresql_error() -> None:
    # As PostgreSQL 16 sends it, with file/line/routine fields.
    payload = (
        b'SFATAL\0VFATAL\0C28P01\0Mpassword authentication failed for user "app"\0'
        b"Fauth.c\0L323\0Rauth_failed\0\0"
    )
    fields = messages.parse_error_fields(payload)
    assert fields["C"] == "28P01"
    assert fields["M"] == 'password authentication failed for user "app"'
    assert fields["R"] == "auth_failed"
    assert set(fields) == {"S", "V", "C", "M", "F", "L", "R"}


def test_parse_error_fields_invalid_utf8_is_replaced() -> None:
    assert messages.parse_error_fields(b"Mbad \xff byte\0\0") == {"M": "bad \ufffd byte"}


def test_parameter_status_bytes_and_parse() -> None:
    built = messages.parameter_status("TimeZone", "UTC")
    assert built == b"S\x00\x00\x00\x11TimeZone\x00UTC\x00"
    assert messages.parse_parameter_status(built[5:]) == ("TimeZone", "UTC")


@settings(max_examples=100, deadline=None)
@given(
    sqlstate=st.text(alphabet="0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=5, max_size=5),
    text=TEXT,
    detail=st.none() | TEXT,
    severity=st.sampled_from(["ERROR", "FATAL", "PANIC"]),
)
def test_error_response_round_trip(
    sqlstate: str, text: str, detail: str | None, severity: str
) -> None:
    built = messages.error_response(sqlstate, text, severity=severity, detail=detail)
    type_byte, payload = split_message(built)
    assert type_byte == b"E"
    expected = {"S": severity, "V": severity, "C": sqlstate, "M": text}
    if detail:
        expected["D"] = detail
    assert messages.parse_error_fields(payload) == expected


@settings(max_examples=100, deadline=None)
@given(name=TEXT, value=TEXT)
def test_parameter_status_round_trip(name: str, value: str) -> None:
    type_byte, payload = split_message(messages.parameter_status(name, value))
    assert type_byte == b"S"
    assert messages.parse_parameter_status(payload) == (name, value)


@settings(max_examples=100, deadline=None)
@given(
    params=st.dictionaries(
        TEXT.filter(lambda key: key != "" and not key.startswith("_pq_.")),
        TEXT,
        max_size=6,
    ).filter(lambda p: sum(len(k.encode()) + len(v.encode()) + 2 for k, v in p.items()) < 9000)
)
def test_startup_message_round_trip(params: dict[str, str]) -> None:
    built = messages.startup_message(params)
    assert parse_startup(built) == (StartupMessage(0, params, []), len(built))


@settings(max_examples=100, deadline=None)
@given(process_id=st.integers(0, 2**31 - 1), key=st.binary(min_size=4, max_size=256))
def test_cancel_request_round_trip(process_id: int, key: bytes) -> None:
    built = messages.cancel_request(process_id, key)
    assert parse_startup(built) == (CancelRequest(process_id, key), len(built))


def test_error_response_in_reads_whole_messages_only() -> None:
    fatal = messages.fatal("57P01", "terminating connection due to administrator command")
    notice = messages.notice_response("careful", severity="WARNING")
    assert messages.error_response_in(fatal)
    assert messages.error_response_in(notice + fatal)
    assert not messages.error_response_in(notice)
    assert not messages.error_response_in(fatal[:-1])  # ends inside the message
    assert not messages.error_response_in(fatal[3:])  # starts inside it
    assert not messages.error_response_in(b"")
