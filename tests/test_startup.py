"""parse_startup: the first packet of a client connection."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgproxy.protocol import codes, messages
from pgproxy.protocol.startup import (
    _PARSED,
    _PARSED_LIMIT,
    CANCEL_REQUEST_CODE,
    GSSENC_REQUEST_CODE,
    MAX_STARTUP_PACKET,
    SSL_REQUEST_CODE,
    CancelRequest,
    GSSEncRequest,
    SSLRequest,
    StartupError,
    StartupMessage,
    parse_startup,
)


def int32(*values: int) -> bytes:
    return b"".join(struct.pack("!I", value) for value in values)


def packet(code: int, body: bytes = b"") -> bytes:
    """An untyped startup-phase packet: int32 length, int32 code, body."""
    return int32(8 + len(body), code) + body


def startup(body: bytes, minor: int = 0) -> bytes:
    return packet(3 << 16 | minor, body)


def test_ssl_request() -> None:
    data = packet(SSL_REQUEST_CODE)
    assert data == b"\x00\x00\x00\x08\x04\xd2\x16\x2f"
    assert parse_startup(data) == (SSLRequest(), 8)


def test_gssenc_request() -> None:
    assert parse_startup(packet(GSSENC_REQUEST_CODE)) == (GSSEncRequest(), 8)


def test_ssl_request_followed_by_startup_uses_eight_bytes() -> None:
    data = packet(SSL_REQUEST_CODE) + messages.startup_message({"user": "bob"})
    result = parse_startup(data)
    assert result == (SSLRequest(), 8)
    follow = parse_startup(data[8:])
    assert follow is not None
    assert follow[0] == StartupMessage(0, {"user": "bob"}, [])


@pytest.mark.parametrize("code", [SSL_REQUEST_CODE, GSSENC_REQUEST_CODE])
def test_ssl_and_gss_requests_must_be_eight_bytes(code: int) -> None:
    with pytest.raises(StartupError) as info:
        parse_startup(packet(code, b"\0\0\0\0"))
    assert info.value.sqlstate == codes.PROTOCOL_VIOLATION
    assert info.value.message.startswith("bad packet header")


def test_cancel_request_with_four_byte_key() -> None:
    data = packet(CANCEL_REQUEST_CODE, int32(4242) + b"\x01\x02\x03\x04")
    assert len(data) == 16
    assert parse_startup(data) == (CancelRequest(4242, b"\x01\x02\x03\x04"), 16)


@pytest.mark.parametrize("key_size", [32, 256])
def test_cancel_request_with_protocol_3_2_long_key(key_size: int) -> None:
    key = bytes(range(256))[:key_size]
    data = packet(CANCEL_REQUEST_CODE, int32(7) + key)
    assert parse_startup(data + b"trailing") == (CancelRequest(7, key), 12 + key_size)


def test_cancel_request_incomplete_returns_none() -> None:
    data = packet(CANCEL_REQUEST_CODE, int32(7) + b"k" * 32)
    for end in range(len(data)):
        assert parse_startup(data[:end]) is None, end


@pytest.mark.parametrize("key_size", [0, 3, 257, 1000])
def test_cancel_request_key_size_out_of_range(key_size: int) -> None:
    with pytest.raises(StartupError) as info:
        parse_startup(packet(CANCEL_REQUEST_CODE, int32(7) + b"k" * key_size))
    assert info.value.sqlstate == codes.PROTOCOL_VIOLATION
    assert "bad packet header" in info.value.message


def test_startup_message_with_params() -> None:
    body = b"user\0alice\0database\0appdb\0application_name\0psql\0\0"
    data = startup(body)
    assert parse_startup(data) == (
        StartupMessage(0, {"user": "alice", "database": "appdb", "application_name": "psql"}, []),
        len(data),
    )


def test_startup_message_protocol_options_and_minor_version() -> None:
    body = b"user\0alice\0_pq_.test_option\0on\0_pq_.other\0\0options\0-c x=1\0\0"
    data = startup(body, minor=2)
    result = parse_startup(data)
    assert result is not None
    packet_, used = result
    assert used == len(data)
    assert isinstance(packet_, StartupMessage)
    assert packet_.minor_version == 2
    assert packet_.protocol_options == ["_pq_.test_option", "_pq_.other"]
    # _pq_. options are not parameters
    assert packet_.params == {"user": "alice", "options": "-c x=1"}


def test_startup_message_empty_values_and_no_params() -> None:
    assert parse_startup(startup(b"\0")) == (StartupMessage(0, {}, []), 9)
    assert parse_startup(startup(b"user\0\0\0")) == (StartupMessage(0, {"user": ""}, []), 15)


def test_a_startup_message_names_its_user_database_and_replication() -> None:
    alice = StartupMessage(0, {"user": "alice", "database": "appdb", "replication": "true"})
    assert (alice.user, alice.database, alice.replication) == ("alice", "appdb", "true")
    # No database: the user's name. No user: "" (the login refuses it).
    bob = StartupMessage(0, {"user": "bob", "database": ""})
    assert (bob.user, bob.database, bob.replication) == ("bob", "bob", None)
    nobody = StartupMessage(0, {})
    assert (nobody.user, nobody.database) == ("", "")


def test_the_same_startup_packet_is_parsed_once() -> None:
    body = b"user\0alice\0database\0appdb\0application_name\0app\0\0"
    data = startup(body)
    first = parse_startup(data)
    # Again, arriving with a query behind it: the same object.
    again = parse_startup(data + b"Q\0\0\0\x0dselect 1\0")
    assert first is not None and again is not None
    assert again == (first[0], len(data))
    assert again[0] is first[0]
    assert first[0].key == data[4:]
    # Another minor version is another packet.
    other = parse_startup(startup(body, minor=2))
    assert other is not None
    assert other[0] is not first[0]
    assert isinstance(other[0], StartupMessage) and other[0].minor_version == 2
    assert other[0].params == first[0].params


def test_the_parsed_packets_kept_are_bounded() -> None:
    for number in range(_PARSED_LIMIT + 10):
        parse_startup(startup(b"user\0u%d\0\0" % number))
        assert len(_PARSED) <= _PARSED_LIMIT
    result = parse_startup(startup(b"user\0u1\0\0"))
    assert result is not None and result[0] == StartupMessage(0, {"user": "u1"}, [])


def test_a_bad_packet_is_never_kept() -> None:
    data = startup(b"user\0alice\0database\0")  # a key without its value
    for _ in range(2):
        with pytest.raises(StartupError):
            parse_startup(data)
    assert data[4:] not in _PARSED


def test_startup_message_utf8() -> None:
    body = "user\0ålice\0application_name\0café ☕\0\0".encode()
    result = parse_startup(startup(body))
    assert result is not None
    assert result[0] == StartupMessage(0, {"user": "ålice", "application_name": "café ☕"}, [])


def test_startup_message_incomplete_returns_none_for_every_prefix() -> None:
    data = messages.startup_message({"user": "alice", "database": "appdb"})
    for end in range(len(data)):
        assert parse_startup(data[:end]) is None, end
    assert parse_startup(data) is not None


def test_bytes_after_the_packet_are_not_used() -> None:
    data = messages.startup_message({"user": "u"})
    result = parse_startup(data + messages.query("select 1"))
    assert result is not None
    assert result[1] == len(data)


@pytest.mark.parametrize("length", [0, 1, 4, 7])
def test_length_below_eight_is_a_bad_header(length: int) -> None:
    data = int32(length) + b"\x00\x03\x00\x00"
    with pytest.raises(StartupError) as info:
        parse_startup(data)
    assert info.value.sqlstate == "08P01"
    assert info.value.message == f"bad packet header: '{data.hex()}'"
    # Detected from the length field alone, before the rest arrives.
    with pytest.raises(StartupError):
        parse_startup(data[:4])


def test_length_above_limit_is_a_bad_header() -> None:
    # Probably a TLS ClientHello or HTTP sent to the wrong port.
    with pytest.raises(StartupError) as info:
        parse_startup(int32(MAX_STARTUP_PACKET + 1))
    assert info.value.sqlstate == codes.PROTOCOL_VIOLATION
    assert info.value.message.startswith("bad packet header: '")
    with pytest.raises(StartupError, match="bad packet header"):
        parse_startup(b"GET / HTTP/1.1\r\n\r\n")


def test_length_at_limit_is_accepted() -> None:
    assert MAX_STARTUP_PACKET == 10000
    prefix = b"user\0u\0application_name\0"
    value = b"v" * (MAX_STARTUP_PACKET - 8 - len(prefix) - 2)
    data = startup(prefix + value + b"\0\0")
    assert len(data) == MAX_STARTUP_PACKET
    result = parse_startup(data)
    assert result is not None
    assert result[0] == StartupMessage(0, {"user": "u", "application_name": value.decode()}, [])


@pytest.mark.parametrize(
    "body",
    [
        b"",  # no terminator at all
        b"user\0alice",  # last value not terminated
        b"user\0alice\0\0x",  # bytes after the terminator
    ],
)
def test_missing_terminator(body: bytes) -> None:
    with pytest.raises(StartupError) as info:
        parse_startup(startup(body))
    assert info.value.sqlstate == codes.PROTOCOL_VIOLATION
    assert info.value.message.startswith("invalid startup packet layout")


def test_missing_terminator_after_odd_number_of_strings() -> None:
    # "user", "alice", "database" and no empty string to end the list: PostgreSQL says
    # "invalid startup packet layout: expected terminator as last byte".
    with pytest.raises(StartupError) as info:
        parse_startup(startup(b"user\0alice\0database\0"))
    assert info.value.message == "invalid startup packet layout: expected terminator as last byte"


@pytest.mark.parametrize(
    "body",
    [
        b"user\0alice\0database\0\0",  # a key without a value
        b"user\0\0",  # "user" then the terminator: the value is missing
        b"\0alice\0\0",  # an empty key
    ],
)
def test_bad_key_value_layout(body: bytes) -> None:
    with pytest.raises(StartupError) as info:
        parse_startup(startup(body))
    assert info.value.sqlstate == codes.PROTOCOL_VIOLATION
    assert info.value.message.startswith("invalid startup packet layout")


@pytest.mark.parametrize("major, minor", [(2, 0), (1, 0), (4, 0), (0, 0)])
def test_unsupported_protocol_version(major: int, minor: int) -> None:
    data = packet(major << 16 | minor, b"user\0alice\0\0")
    with pytest.raises(StartupError) as info:
        parse_startup(data)
    assert info.value.sqlstate == "0A000"
    assert info.value.message == (
        f"unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.0"
    )


def test_unsupported_protocol_reported_before_the_whole_packet_arrives() -> None:
    data = packet(2 << 16, b"user\0alice\0\0" + b"x" * 100)
    with pytest.raises(StartupError) as info:
        parse_startup(data[:8])
    assert info.value.sqlstate == codes.FEATURE_NOT_SUPPORTED


@pytest.mark.parametrize(
    "body", [b"user\0\xff\xfe\0\0", b"us\xc3er\0alice\0\0", b"application_name\0caf\xe9\0\0"]
)
def test_bytes_that_are_not_utf8_are_kept(body: bytes) -> None:
    """PostgreSQL takes startup values whatever their encoding: so does pgproxy, and
    writes them on as they came."""
    result = parse_startup(startup(body))
    assert result is not None
    packet_ = result[0]
    assert isinstance(packet_, StartupMessage)
    assert messages.startup_message(packet_.params) == startup(body)


def test_utf8_names_decode_as_before_and_other_bytes_escape() -> None:
    body = b"user\0\xc3\xa5lice\0database\0d\xe9\0application_name\0caf\xe9\xff\0\0"
    result = parse_startup(startup(body))
    assert result is not None and isinstance(result[0], StartupMessage)
    params = result[0].params
    assert params["user"] == "ålice"  # valid UTF-8: matched against names as before
    assert params["database"] == "d\udce9"  # never equal to 'dé' (its UTF-8 spelling)
    assert messages.wire(params["application_name"]) == b"caf\xe9\xff"
    assert messages.printable(params["application_name"]) == r"caf\xe9\xff"
    assert not messages.is_utf8(params["database"]) and messages.is_utf8(params["user"])
    # A NUL-terminated string carries the same bytes (ParameterStatus, server logins).
    assert messages.cstring(params["application_name"]) == b"caf\xe9\xff\0"
    assert messages.cstring("\ud800") == b"?\0"  # (not a client's byte: replaced)


@settings(max_examples=200, deadline=None)
@given(strings=st.lists(st.binary(min_size=1, max_size=12).filter(lambda b: b"\0" not in b)))
def test_any_bytes_round_trip(strings: list[bytes]) -> None:
    pairs = {key: value for key, value in zip(strings[::2], strings[1::2], strict=False)
             if not key.startswith(b"_pq_.")}  # fmt: skip
    body = b"".join(key + b"\0" + value + b"\0" for key, value in pairs.items()) + b"\0"
    result = parse_startup(startup(body))
    assert result is not None and isinstance(result[0], StartupMessage)
    assert {messages.wire(k): messages.wire(v) for k, v in result[0].params.items()} == pairs


def test_startup_error_carries_sqlstate_and_message() -> None:
    error = StartupError("08P01", "boom")
    assert (error.sqlstate, error.message, str(error)) == ("08P01", "boom", "boom")


# -- properties ------------------------------------------------------------------------

NAME = st.text(
    alphabet=st.characters(exclude_categories=("Cs",), exclude_characters="\0"),
    min_size=1,
    max_size=12,
).filter(lambda key: not key.startswith("_pq_."))
VALUE = st.text(
    alphabet=st.characters(exclude_categories=("Cs",), exclude_characters="\0"), max_size=30
)


@settings(max_examples=100, deadline=None)
@given(params=st.dictionaries(NAME, VALUE, max_size=8), minor=st.integers(0, 0xFFFF))
def test_startup_message_round_trip(params: dict[str, str], minor: int) -> None:
    data = messages.startup_message(params, version=3 << 16 | minor)
    assert parse_startup(data) == (StartupMessage(minor, params, []), len(data))
    parsed = parse_startup(data)
    assert parsed is not None and isinstance(parsed[0], StartupMessage)
    assert parsed[0].user == params.get("user", "")
    assert parsed[0].database == (params.get("database") or params.get("user", ""))
    for end in (0, 3, 4, 7, 8, len(data) - 1):
        if 0 <= end < len(data):
            assert parse_startup(data[:end]) is None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.one_of(
        st.binary(max_size=300),
        # A plausible header then random bytes: reaches the body parsers more often.
        st.tuples(
            st.integers(0, 400),
            st.sampled_from([3 << 16, 3 << 16 | 2, CANCEL_REQUEST_CODE, SSL_REQUEST_CODE]),
            st.binary(max_size=400),
        ).map(lambda t: int32(t[0], t[1]) + t[2]),
    )
)
def test_random_bytes_raise_only_startup_error(data: bytes) -> None:
    try:
        result = parse_startup(data)
    except StartupError as exc:
        assert exc.sqlstate in (codes.PROTOCOL_VIOLATION, codes.FEATURE_NOT_SUPPORTED)
        assert exc.message
        return
    if result is None:  # needs more bytes: a longer buffer must not be required to be whole
        assert len(data) < 8 or len(data) < struct.unpack_from("!I", data)[0]
        return
    packet_, used = result
    assert 8 <= used <= len(data)
    assert used == struct.unpack_from("!I", data)[0]
    assert isinstance(packet_, SSLRequest | GSSEncRequest | CancelRequest | StartupMessage)
