"""Incremental header walks over the two byte streams of a linked client and server.

Each scanner is fed the chunks exactly as the socket delivered them and keeps only the
offset of the next header across chunks (``remaining``) plus, rarely, the few bytes of a
header split between two chunks (``carry``). It reads the type byte and length of every
message and the payload of only the few messages routing needs (ReadyForQuery's status,
ParameterStatus). It never copies a chunk except to join a split header, and it allocates
nothing per message. The caller forwards the chunk itself; the scanner only reports.
"""

from __future__ import annotations

import struct

_LENGTH = struct.Struct("!I").unpack_from

# What a frontend message type means for routing (indexed by the type byte).
_INVALID = 0
_PLAIN = 1  # CopyData: forwarded, no reply expected by itself
_REQUEST = 2  # Query / FunctionCall: one ReadyForQuery will answer it
_SYNC = 3  # Sync: one ReadyForQuery answers it, and it closes an extended-protocol batch
_EXTENDED = 4  # Parse / Bind / Execute / Describe / Close / Flush: a batch is open until Sync
_TERMINATE = 5
_COPY_END = 6  # CopyDone / CopyFail: the end of the client's COPY data
_PARSE = 7  # Parse: an extended-protocol message, counted for SHOW STATS
_BIND = 8  # Bind: likewise

_FRONTEND_KIND = bytearray(256)
for _type, _kind in (
    (b"d", _PLAIN),
    (b"c", _COPY_END),
    (b"f", _COPY_END),
    (b"Q", _REQUEST),
    (b"F", _REQUEST),
    (b"S", _SYNC),
    (b"P", _PARSE),
    (b"B", _BIND),
    (b"E", _EXTENDED),
    (b"D", _EXTENDED),
    (b"C", _EXTENDED),
    (b"H", _EXTENDED),
    (b"X", _TERMINATE),
):
    _FRONTEND_KIND[_type[0]] = _kind

_READY_FOR_QUERY = ord("Z")
_PARAMETER_STATUS = ord("S")
_ERROR_RESPONSE = ord("E")
_COMMAND_COMPLETE = ord("C")
_COPY_IN_RESPONSE = ord("G")
_COPY_BOTH_RESPONSE = ord("W")

# Backend message types the walk looks at; every other type is skipped by one index test.
_BACKEND_INTERESTING = bytearray(256)
for _type_code in b"ZSECGW":
    _BACKEND_INTERESTING[_type_code] = 1
# ParameterStatus messages are read whole; a server's are small (names and short values).
MAX_PARAMETER_STATUS = 64 * 1024
STATUS_IDLE = ord("I")
STATUS_IN_TRANSACTION = ord("T")
STATUS_FAILED = ord("E")


class FrontendScanner:
    """Walks client→server messages: counts requests, tracks open batches, finds Terminate.

    After each ``feed``: ``requests`` is how many ReadyForQuery replies the chunk asks for,
    ``parses`` and ``binds`` count its Parse and Bind messages (for SHOW STATS),
    ``terminate_at`` is the chunk offset of a Terminate message (-1 if none), and ``error``
    describes a malformed message (None if the chunk is well formed) with ``error_at`` its
    offset. ``batch_open`` persists across chunks: extended-protocol messages were sent and
    no Sync closed them yet. ``holds_server`` is true when the server cannot change hands
    even at ReadyForQuery: a batch is open, or a message has only partly been sent (its
    remaining bytes would reach whichever server the client had next).

    For COPY FROM STDIN: PostgreSQL ignores Syncs that arrive while it is in copy-in mode
    (libpq sends one after Execute and another after CopyDone). ``requests_total`` counts
    every request ever sent and ``requests_at_copy_end`` its value at the first CopyDone or
    CopyFail since ``copy_end_seen`` was last cleared (by the server side, when a COPY
    starts), so the requests still owed when the COPY ends are the difference.
    """

    __slots__ = (
        "batch_open",
        "binds",
        "carry",
        "copy_end_seen",
        "error",
        "error_at",
        "holds_server",
        "max_packet_size",
        "parses",
        "remaining",
        "requests",
        "requests_at_copy_end",
        "requests_total",
        "terminate_at",
    )

    def __init__(self, max_packet_size: int) -> None:
        self.max_packet_size = max_packet_size
        self.remaining = 0
        self.carry = b""
        self.batch_open = False
        self.holds_server = False
        self.requests = 0
        self.parses = 0
        self.binds = 0
        self.requests_total = 0
        self.requests_at_copy_end = 0
        self.copy_end_seen = False
        self.terminate_at = -1
        self.error: str | None = None
        self.error_at = -1

    def feed(self, data: bytes) -> None:
        """Walk the headers in ``data``, continuing from where the previous chunk ended."""
        self.requests = self.parses = self.binds = 0
        self.terminate_at = -1
        size = len(data)
        position = self.remaining
        if position >= size:  # the whole chunk is payload of a message already walked
            self.remaining = position - size
            self.holds_server = self.batch_open or self.remaining > 0
            return
        base = 0
        if self.carry:  # a header was split between chunks: join it (rare, < 5 bytes)
            base = len(self.carry)
            data = self.carry + data
            self.carry = b""
            size = len(data)
        kinds = _FRONTEND_KIND
        limit = self.max_packet_size
        terminate_split = False
        requests = parses = binds = 0
        batch_open = self.batch_open
        while position + 5 <= size:
            kind = kinds[data[position]]
            length = _LENGTH(data, position + 1)[0]
            if kind == _INVALID or length < 4 or length > limit:
                self._fail(data[position], length, position - base)
                break
            if kind == _REQUEST:
                requests += 1
            elif kind == _SYNC:
                requests += 1
                batch_open = False
            elif kind == _EXTENDED:
                batch_open = True
            elif kind == _PARSE:
                batch_open = True
                parses += 1
            elif kind == _BIND:
                batch_open = True
                binds += 1
            elif kind == _TERMINATE:
                # The header may have begun in the carried bytes, already forwarded: then
                # the server holds part of a message and must never serve anyone else.
                terminate_split = position < base
                self.terminate_at = max(position - base, 0)
                position = size  # the client is leaving: what follows is ignored
                break
            elif kind == _COPY_END and not self.copy_end_seen:
                self.copy_end_seen = True
                self.requests_at_copy_end = self.requests_total + requests
            position += 1 + length
        else:
            if position < size:
                self.carry = data[position:]
        self.remaining = position - size if position > size else 0
        self.requests = requests
        self.parses = parses
        self.binds = binds
        self.requests_total += requests
        self.batch_open = batch_open
        self.holds_server = batch_open or position != size or terminate_split

    def requests_after_copy_end(self) -> int:
        """Requests sent after the client ended its COPY data (0 if it has not yet)."""
        if not self.copy_end_seen:
            return 0
        return self.requests_total - self.requests_at_copy_end

    def _fail(self, type_byte: int, length: int, offset: int) -> None:
        if _FRONTEND_KIND[type_byte] == _INVALID:
            self.error = f"invalid frontend message type {type_byte}"
        elif length < 4:
            self.error = f"invalid message length {length}"
        else:
            self.error = f"message of {length} bytes exceeds max_packet_size"
        self.error_at = offset


class BackendScanner:
    """Walks server→client messages: ReadyForQuery statuses, ParameterStatus, hidden replies.

    ``hidden`` counts ReadyForQuery replies still owed to queries pgproxy injected itself
    (parameter sync, reset query): everything up to and including them is swallowed.
    After each ``feed``: ``ready`` is the number of ReadyForQuery messages for the client,
    ``status`` the last transaction status seen (persistent), ``forward_from`` the chunk
    offset where the client's bytes start (0 unless hidden replies led the chunk; the chunk
    length if all of it was hidden), ``params`` the (name, value) pairs of ParameterStatus
    messages (None if there were none), ``hidden_failed`` whether an injected query failed,
    and ``error`` a description of a corrupt stream (None normally).

    COPY FROM STDIN: ``copy_in`` is true from CopyInResponse to the CommandComplete or
    ErrorResponse that ends it. A chunk where a COPY started sets ``copy_started``; one where
    it ended sets ``copy_finished``, and then ``ready`` counts only the ReadyForQuery messages
    after the end: the caller settles what is owed at that point (the Syncs PostgreSQL
    ignored during the COPY are not) before subtracting ``ready``.
    """

    __slots__ = (
        "carry",
        "copy_finished",
        "copy_in",
        "copy_started",
        "error",
        "forward_from",
        "hidden",
        "hidden_failed",
        "params",
        "ready",
        "remaining",
        "status",
    )

    def __init__(self) -> None:
        self.copy_in = False
        self.copy_started = False
        self.copy_finished = False
        self.remaining = 0
        self.carry = b""
        self.hidden = 0
        self.hidden_failed = False
        self.status = STATUS_IDLE
        self.ready = 0
        self.forward_from = 0
        self.params: list[tuple[str, str]] | None = None
        self.error: str | None = None

    def feed(self, data: bytes) -> None:
        """Walk the headers in ``data``, continuing from where the previous chunk ended."""
        self.ready = 0
        self.params = None
        self.copy_started = self.copy_finished = False
        original_size = len(data)
        position = self.remaining
        if position >= original_size:
            self.remaining = position - original_size
            self.forward_from = original_size if self.hidden else 0
            return
        base = 0
        if self.carry:  # a header or a small message was split between chunks: join it
            base = len(self.carry)
            data = self.carry + data
            self.carry = b""
        size = len(data)
        hidden = self.hidden
        forward_from = size if hidden else base
        ready = 0
        interesting = _BACKEND_INTERESTING
        while position + 5 <= size:
            type_byte = data[position]
            length = _LENGTH(data, position + 1)[0]
            if length < 4:
                self.error = f"invalid message length {length} from server"
                break
            end = position + 1 + length
            if not interesting[type_byte]:
                position = end
                continue
            if type_byte == _READY_FOR_QUERY:
                if length != 5:
                    self.error = f"invalid ReadyForQuery length {length} from server"
                    break
                if end > size:
                    break
                self.status = data[position + 5]
                if hidden:
                    hidden -= 1
                    if not hidden:
                        forward_from = end
                else:
                    ready += 1
            elif type_byte == _PARAMETER_STATUS:
                if length > MAX_PARAMETER_STATUS:  # it would be carried whole: cap it
                    self.error = f"ParameterStatus of {length} bytes from server"
                    break
                if end > size:
                    break
                self._parameter_status(data[position + 5 : end])
            elif type_byte in (_ERROR_RESPONSE, _COMMAND_COMPLETE):
                if hidden and type_byte == _ERROR_RESPONSE:
                    self.hidden_failed = True
                if self.copy_in:
                    self.copy_in = False
                    self.copy_finished = True
                    ready = 0
            else:  # CopyInResponse / CopyBothResponse
                self.copy_in = self.copy_started = True
            position = end
        if position < size and self.error is None:
            self.carry = data[position:]
            self.remaining = 0
        else:
            self.remaining = position - size
        self.hidden = hidden
        self.ready = ready
        self.forward_from = min(max(forward_from - base, 0), original_size)

    def _parameter_status(self, payload: bytes) -> None:
        name, _, rest = payload.partition(b"\0")
        value = rest.split(b"\0", 1)[0]
        if self.params is None:
            self.params = []
        self.params.append((name.decode("utf-8", "replace"), value.decode("utf-8", "replace")))
