"""The first packet on a client connection: SSL/GSS requests, CancelRequest, StartupMessage.

``parse_startup`` is pure: it takes the bytes received so far and returns the packet and how
many bytes it used, None when more bytes are needed, or raises StartupError for bad input.

Parameter names and values are bytes to PostgreSQL, which takes them whatever their
encoding (a client in LATIN1 may send its application_name in LATIN1). They are decoded
without loss (``messages.from_wire``): valid UTF-8 as usual, so that user and database names
match as before, and any other byte as a surrogate escape that ``messages.wire`` turns back
into the same byte wherever the value is sent on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from pgproxy.protocol import codes
from pgproxy.protocol.framing import int32_at
from pgproxy.protocol.messages import from_wire

CANCEL_REQUEST_CODE: Final = 80877102
SSL_REQUEST_CODE: Final = 80877103
GSSENC_REQUEST_CODE: Final = 80877104
PROTOCOL_3_0: Final = 3 << 16
# PostgreSQL's own cap on a startup packet (MAX_STARTUP_PACKET_LENGTH).
MAX_STARTUP_PACKET: Final = 10000
# Protocol 3.2 cancel keys may be up to 256 bytes.
MAX_CANCEL_KEY: Final = 256


class StartupError(Exception):
    """A bad first packet; ``sqlstate`` and ``message`` go to the client as FATAL."""

    def __init__(self, sqlstate: str, message: str) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message


# The packets are dataclasses for their repr and equality, with __init__ written out: a
# generated __init__ stays interpreted in the compiled build (about 500 ns a packet against
# 30), and they are not frozen because a frozen dataclass refuses the assignments of a
# written __init__.
@dataclass(slots=True)
class SSLRequest:
    """The client asks for TLS (answered 'N' until TLS is supported)."""

    def __init__(self) -> None:
        pass


@dataclass(slots=True)
class GSSEncRequest:
    """The client asks for GSSAPI encryption (always answered 'N')."""

    def __init__(self) -> None:
        pass


@dataclass(slots=True)
class CancelRequest:
    """A cancel key sent on a fresh connection."""

    process_id: int
    secret_key: bytes

    def __init__(self, process_id: int, secret_key: bytes) -> None:
        self.process_id = process_id
        self.secret_key = secret_key


@dataclass(slots=True)
class StartupMessage:
    """A v3 StartupMessage: requested minor version, parameters and ``_pq_.`` options.

    ``key`` is the packet's bytes after its length (b"" if it was not parsed from one):
    every client that sends the same bytes gets the same object (see parse_startup), so
    that what a login derives from it can be kept under ``key`` too. Nothing may change
    it.
    """

    minor_version: int
    params: dict[str, str]
    protocol_options: list[str]
    key: bytes = field(compare=False, repr=False)
    # Read from ``params`` once per packet rather than at each login: ``user`` ("" if
    # none), ``database`` (the user's name if none), ``replication`` (None if none).
    user: str = field(init=False, compare=False, repr=False)
    database: str = field(init=False, compare=False, repr=False)
    replication: str | None = field(init=False, compare=False, repr=False)

    def __init__(
        self, minor_version: int, params: dict[str, str], protocol_options: list[str] | None = None,
        key: bytes = b"",
    ) -> None:  # fmt: skip
        self.minor_version = minor_version
        self.params = params
        self.protocol_options = [] if protocol_options is None else protocol_options
        self.key = key
        self.user = params.get("user", "")
        self.database = params.get("database") or self.user
        self.replication = params.get("replication")


StartupPacket = SSLRequest | GSSEncRequest | CancelRequest | StartupMessage

# (One of each for every connection: they hold nothing.)
_SSL_REQUEST: Final = SSLRequest()
_GSSENC_REQUEST: Final = GSSEncRequest()


def _bad_header(buffer: bytes) -> StartupError:
    # PgBouncer's wording, with the first bytes in hex so an operator can tell what arrived.
    return StartupError(codes.PROTOCOL_VIOLATION, f"bad packet header: '{buffer[:8].hex()}'")


def _parse_params(body: bytes) -> tuple[dict[str, str], list[str]]:
    if not body or body[-1] != 0:
        raise StartupError(
            codes.PROTOCOL_VIOLATION,
            "invalid startup packet layout: expected terminator as last byte",
        )
    # key\0value\0 ... \0: without the terminator, every string still ends in NUL.
    strings = body[:-1]
    if strings and strings[-1] != 0:
        raise StartupError(
            codes.PROTOCOL_VIOLATION,
            "invalid startup packet layout: expected terminator as last byte",
        )
    # Decoded in one go: NUL is a character of its own in UTF-8, so no byte sequence, valid
    # or not, runs from one string into the next, and the strings come out as if each
    # were decoded alone.
    parts = from_wire(strings).split("\0")[:-1]
    if len(parts) % 2:
        raise StartupError(codes.PROTOCOL_VIOLATION, "invalid startup packet layout")
    params: dict[str, str] = {}
    options: list[str] = []
    for index in range(0, len(parts), 2):
        key = parts[index]
        value = parts[index + 1]
        if not key:
            raise StartupError(codes.PROTOCOL_VIOLATION, "invalid startup packet layout")
        if key.startswith("_pq_."):
            options.append(key)
        else:
            params[key] = value
    return params, options


def parse_startup(buffer: bytes) -> tuple[StartupPacket, int] | None:
    """Parse the packet at the start of ``buffer``; None if it is not complete yet."""
    if len(buffer) < 4:
        return None
    length = int32_at(buffer, 0)
    if length < 8 or length > MAX_STARTUP_PACKET:
        raise _bad_header(buffer)
    if len(buffer) < 8:
        return None
    code = int32_at(buffer, 4)
    if code in (SSL_REQUEST_CODE, GSSENC_REQUEST_CODE):
        if length != 8:
            raise _bad_header(buffer)
        return (_SSL_REQUEST if code == SSL_REQUEST_CODE else _GSSENC_REQUEST), 8
    if code == CANCEL_REQUEST_CODE:
        if length < 16 or length > 12 + MAX_CANCEL_KEY:
            raise _bad_header(buffer)
        if len(buffer) < length:
            return None
        process_id = int32_at(buffer, 8)
        return CancelRequest(process_id, bytes(buffer[12:length])), length
    major, minor = code >> 16, code & 0xFFFF
    if major != 3:
        raise StartupError(
            codes.FEATURE_NOT_SUPPORTED,
            f"unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.0",
        )
    if len(buffer) < length:
        return None
    key = buffer[4:length]  # (not bytes(...): compiled, a call of the type by name)
    message = _PARSED.get(key)
    if message is None:
        params, options = _parse_params(key[4:])
        message = StartupMessage(minor, params, options, key)
        if len(_PARSED) >= _PARSED_LIMIT:
            _PARSED.clear()
        _PARSED[key] = message
    return message, length


# The startup packets parsed so far, by their bytes after the length. A pooler's clients
# send a few distinct ones (an application's user, database and application_name), each
# again at every connection (pgbench -C, PHP, serverless functions): parsed once, a
# login skips about 7,000 instructions of decoding, splitting and dict building. Bounded:
# a client may send anything before it is authenticated, and a full cache starts afresh.
_PARSED: Final[dict[bytes, StartupMessage]] = {}
_PARSED_LIMIT: Final = 1024
