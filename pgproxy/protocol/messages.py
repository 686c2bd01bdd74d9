"""Builders for the backend messages pgproxy writes itself, and a parser for error fields.

These run on login, errors and parameter sync: never once per forwarded message.
"""

from __future__ import annotations

import struct
from typing import Final

from pgproxy.protocol.framing import header, int32_at

_INT16 = struct.Struct("!h")
_INT32 = struct.Struct("!i")
_HEADER = struct.Struct("!cI")

# Message type bytes (as ints, which is what indexing bytes gives).
AUTHENTICATION = ord("R")
BACKEND_KEY_DATA = ord("K")
COMMAND_COMPLETE = ord("C")
ERROR_RESPONSE = ord("E")
NEGOTIATE_PROTOCOL_VERSION = ord("v")
NOTICE_RESPONSE = ord("N")
PARAMETER_STATUS = ord("S")
READY_FOR_QUERY = ord("Z")

AUTH_OK = 0
AUTH_CLEARTEXT = 3
AUTH_MD5 = 5
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12


def message(type_byte: bytes, payload: bytes = b"") -> bytes:
    """One protocol message: type byte, int32 length (self-inclusive), payload."""
    return _HEADER.pack(type_byte, len(payload) + 4) + payload


def from_wire(data: bytes) -> str:
    """Text a client sent, decoded without loss: UTF-8, and each byte that is not part of
    valid UTF-8 kept as a surrogate escape (U+DC80 to U+DCFF), which ``wire`` turns back
    into that byte. Valid UTF-8 decodes as usual, so names compare as they always did."""
    return data.decode("utf-8", "surrogateescape")


def wire(text: str) -> bytes:
    """``text`` as bytes on the wire: UTF-8, and the bytes of a client's that were not
    (see ``from_wire``) as the client sent them. Another lone surrogate (none comes from a
    client's bytes) is written as '?'."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace")


def printable(text: str) -> str:
    """``text`` for places that need valid UTF-8 (metrics labels): a client's byte that
    was not UTF-8 shown as ``\\xNN``."""
    return wire(text).decode("utf-8", "backslashreplace")


def is_utf8(text: str) -> bool:
    """Whether ``text`` holds no byte that was not UTF-8 (see ``from_wire``)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def cstring(text: str) -> bytes:
    """A NUL-terminated string as the protocol writes it (``wire``'s bytes)."""
    try:
        data = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        data = text.encode("utf-8", "replace")
    return data.replace(b"\0", b"") + b"\0"


def _fields(severity: str, sqlstate: str, text: str, detail: str | None) -> bytes:
    body = b"S" + cstring(severity) + b"V" + cstring(severity) + b"C" + cstring(sqlstate)
    body += b"M" + cstring(text)
    if detail:
        body += b"D" + cstring(detail)
    return body + b"\0"


def error_response(
    sqlstate: str, text: str, *, severity: str = "ERROR", detail: str | None = None
) -> bytes:
    """ErrorResponse ('E') with severity, SQLSTATE and message (and optional detail)."""
    return message(b"E", _fields(severity, sqlstate, text, detail))


def fatal(sqlstate: str, text: str, *, detail: str | None = None) -> bytes:
    """ErrorResponse with severity FATAL: the connection closes after it."""
    return error_response(sqlstate, text, severity="FATAL", detail=detail)


def notice_response(
    text: str, *, sqlstate: str = "00000", severity: str = "NOTICE", detail: str | None = None
) -> bytes:
    """NoticeResponse ('N')."""
    return message(b"N", _fields(severity, sqlstate, text, detail))


def parameter_status(name: str, value: str) -> bytes:
    """ParameterStatus ('S')."""
    return message(b"S", cstring(name) + cstring(value))


def backend_key_data(process_id: int, secret_key: bytes) -> bytes:
    """BackendKeyData ('K'): process id and secret key (4 bytes in protocol 3.0)."""
    return backend_key_data_of(process_id.to_bytes(4, "big", signed=True) + secret_key)


def backend_key_data_of(key: bytes) -> bytes:
    """BackendKeyData ('K') carrying ``key``: a process id (int32) and a secret."""
    # (int.to_bytes, a primitive of the compiled build, where struct.pack is a method call
    # that parses its arguments: every login sends one.)
    return header(b"K", 4 + len(key)) + key


def ready_for_query(status: bytes = b"I") -> bytes:
    """ReadyForQuery ('Z') with transaction status I, T or E."""
    return message(b"Z", status)


def authentication(code: int, data: bytes = b"") -> bytes:
    """Authentication ('R') request with its int32 code and data."""
    return message(b"R", _INT32.pack(code) + data)


# A literal: compiled, other modules read it as a constant, not as this module's attribute.
AUTHENTICATION_OK: Final = b"R\x00\x00\x00\x08\x00\x00\x00\x00"


def negotiate_protocol_version(newest_minor: int, unrecognized: list[str]) -> bytes:
    """NegotiateProtocolVersion ('v'): the newest 3.x version supported, unrecognized
    ``_pq_.`` options. (The protocol docs say "minor version", but PostgreSQL and PgBouncer
    send the whole version number, 3 << 16 | minor, and libpq 18 reads it so.)"""
    payload = _INT32.pack(3 << 16 | newest_minor) + _INT32.pack(len(unrecognized))
    payload += b"".join(cstring(option) for option in unrecognized)
    return message(b"v", payload)


def query(sql: str) -> bytes:
    """Simple-protocol Query ('Q')."""
    return message(b"Q", cstring(sql))


def password_message(payload: bytes) -> bytes:
    """PasswordMessage / SASLResponse ('p') carrying ``payload`` as is."""
    return message(b"p", payload)


def sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    """SASLInitialResponse ('p'): mechanism name, int32 length, initial client data."""
    return message(b"p", cstring(mechanism) + _INT32.pack(len(data)) + data)


TERMINATE = message(b"X")
SSL_REQUEST = struct.pack("!II", 8, 80877103)


def startup_message(params: dict[str, str], version: int = 196608) -> bytes:
    """StartupMessage: int32 length, int32 version (3.0), key/value C strings, terminator."""
    body = _INT32.pack(version) + b"".join(cstring(k) + cstring(v) for k, v in params.items())
    body += b"\0"
    return _INT32.pack(len(body) + 4) + body


def cancel_request(process_id: int, secret_key: bytes) -> bytes:
    """CancelRequest packet for a server's (process id, secret key)."""
    body = _INT32.pack(80877102) + _INT32.pack(process_id) + secret_key
    return _INT32.pack(len(body) + 4) + body


def parse_data_row(data: bytes, position: int, end: int) -> list[str | None]:
    """The values of the DataRow whose payload is data[position:end], as text (None for
    NULL); ValueError if its values run past ``end``."""
    count = _INT16.unpack_from(data, position)[0]
    position += 2
    values: list[str | None] = []
    for _ in range(count):
        length = _INT32.unpack_from(data, position)[0]
        position += 4
        if length < 0:
            values.append(None)
            continue
        values.append(data[position : position + length].decode("utf-8", "replace"))
        position += length
    if position > end:
        raise ValueError("DataRow overrun")
    return values


def error_response_in(chunk: bytes) -> bool:
    """Whether ``chunk``, read as whole messages from its first byte to its last, holds an
    ErrorResponse (False when it does not read so: it starts or ends inside a message)."""
    position = 0
    found = False
    while position + 5 <= len(chunk):
        found = found or chunk[position] == 0x45  # 'E'
        length = int32_at(chunk, position + 1)
        if length < 4:
            return False
        position += 1 + length
    return found and position == len(chunk)


def parse_error_fields(payload: bytes) -> dict[str, str]:
    """Fields of an ErrorResponse/NoticeResponse payload, keyed by their one-letter codes."""
    fields: dict[str, str] = {}
    for part in payload.split(b"\0"):
        if part:
            fields[chr(part[0])] = part[1:].decode("utf-8", "replace")
    return fields


def parse_parameter_status(payload: bytes) -> tuple[str, str]:
    """(name, value) of a ParameterStatus payload."""
    name, _, rest = payload.partition(b"\0")
    value = rest.split(b"\0", 1)[0]
    return name.decode("utf-8", "replace"), value.decode("utf-8", "replace")
