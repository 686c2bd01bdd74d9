"""Whole messages off a buffer, for the slow paths that read one message at a time: a
client's password exchange, a console query, a server's login; and ``int32_at``, which
reads a 32-bit length or code out of bytes for the stream walks, the startup packet and
``messages.error_response_in``.

(The hot path never frames: ``stream``'s scanners walk headers across chunks instead.)
"""

from __future__ import annotations

import struct

from mypy_extensions import i64

_LENGTH = struct.Struct("!I")  # (next_message's buffer is a bytearray: int32_at takes bytes)


def int32_at(data: bytes, position: i64) -> i64:
    """The unsigned big-endian 32-bit integer at ``position`` (a message's length is at
    the position of its type byte + 1).

    Read byte by byte into native 64-bit integers (``i64``: compiled, plain machine
    shifts; as Python, plain ints): the compiled read is about 40 instructions, where
    shifting tagged ints calls a runtime helper per shift (124), and struct.unpack_from
    builds a tuple (about 600).
    """
    high: i64 = data[position]
    second: i64 = data[position + 1]
    third: i64 = data[position + 2]
    low: i64 = data[position + 3]
    return high << 24 | second << 16 | third << 8 | low


def header(type_byte: bytes, length: int) -> bytes:
    """A message's type byte and its length field (which counts itself and what follows).

    int.to_bytes is a primitive of the compiled build, where struct.pack is a method call
    that parses its arguments: about 600 instructions, paid per rewritten Bind or Parse.
    """
    return type_byte + length.to_bytes(4, "big")


# The longest message each slow path takes. Password and SASL messages and console queries
# are short; a server's login replies (ParameterStatus, an error with its detail) may be
# longer, and come from a server pgproxy was configured to trust.
MAX_CLIENT_MESSAGE = 64 * 1024
MAX_SERVER_LOGIN_MESSAGE = 1024 * 1024


class BadFrame(ValueError):
    """A message header with a length below 4 or above the caller's limit, or a type
    the caller does not take."""


def next_message(
    buffer: bytearray, max_length: int, *, only: int | None = None
) -> tuple[int, bytes] | None:
    """Take the first complete message (type byte, payload) off ``buffer``; None while
    it is incomplete; raise BadFrame for a length below 4 or above ``max_length``, or a
    type byte other than ``only`` (when given)."""
    if len(buffer) < 5:
        return None
    if only is not None and buffer[0] != only:
        raise BadFrame(f"unexpected message type {buffer[0]:#04x}")
    length = _LENGTH.unpack_from(buffer, 1)[0]
    if length < 4 or length > max_length:
        raise BadFrame(f"invalid message length {length}")
    if len(buffer) < 1 + length:
        return None
    type_byte = buffer[0]
    payload = bytes(buffer[5 : 1 + length])
    del buffer[: 1 + length]
    return type_byte, payload
