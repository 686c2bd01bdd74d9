"""Incremental header walks over the two byte streams of a linked client and server.

Each scanner is fed the chunks exactly as the socket delivered them and keeps only the
offset of the next header across chunks (``remaining``) plus, rarely, the few bytes of a
header split between two chunks (``carry``). It reads the type byte and length of every
message and the payload of only the few messages routing needs (ReadyForQuery's status,
ParameterStatus). It never copies a chunk except to join a split header, and it allocates
nothing per message. The caller forwards the chunk itself; the scanner only reports.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from mypy_extensions import i64

from pgproxy.protocol.framing import int32_at
from pgproxy.protocol.prepared import (
    MAX_SQL_QUERY,
    MIN_SQL_QUERY,
    ClientStatements,
    Plan,
    StatementError,
)

if TYPE_CHECKING:
    from collections import deque

    from pgproxy.protocol.prepared import Pending, ServerStatements

# Final names and lookup tables frozen to bytes let mypyc compile the walks below to plain
# C (pgproxy/compiled.py).


# What a frontend message type means for routing (indexed by the type byte).
_INVALID: Final = 0
_PLAIN: Final = 1  # CopyData: forwarded, no reply expected by itself
_REQUEST: Final = 2  # Query / FunctionCall: one ReadyForQuery will answer it
_SYNC: Final = 3  # Sync: one ReadyForQuery answers it, and it closes an extended-protocol batch
_EXTENDED: Final = 4  # Execute / Flush: a batch is open until Sync
_TERMINATE: Final = 5
_COPY_END: Final = 6  # CopyDone / CopyFail: the end of the client's COPY data
# Extended-protocol messages that may name a prepared statement (all kinds from _PARSE on).
_PARSE: Final = 7
_BIND: Final = 8
_CLOSE: Final = 9
_DESCRIBE: Final = 10

_frontend_kind = bytearray(256)
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
    (b"D", _DESCRIBE),
    (b"C", _CLOSE),
    (b"H", _EXTENDED),
    (b"X", _TERMINATE),
):
    _frontend_kind[_type[0]] = _kind
_FRONTEND_KIND: Final = bytes(_frontend_kind)

_STATEMENT: Final = ord("S")  # Describe/Close of a statement (not a portal)
_QUERY: Final = ord("Q")
# A simple Query (with named statements in use) of a length that may be an SQL PREPARE,
# EXECUTE or DEALLOCATE (as a message length: the text, its NUL and the length field), and
# the bytes such a query can start with: PREPARE from any client, the other two only from
# a client that may have names (``named_parse``).
_MIN_SQL: Final = MIN_SQL_QUERY + 5
_MAX_SQL: Final = MAX_SQL_QUERY + 5
_prepare_start = bytearray(256)
for _start in b"pP \t\n\r\f\v":
    _prepare_start[_start] = 1
_PREPARE_START: Final = bytes(_prepare_start)
_named_sql_start = bytearray(_prepare_start)
for _start in b"eEdD":
    _named_sql_start[_start] = 1
_NAMED_SQL_START: Final = bytes(_named_sql_start)
# The quick walk keeps the chunk that holds a client's unnamed Parse (rather than copy the
# Parse out of it) when it is no larger than this: a large one is not kept alive for it.
_KEEP_CHUNK: Final = 4096
_READY_FOR_QUERY: Final = ord("Z")
_PARAMETER_STATUS: Final = ord("S")
_ERROR_RESPONSE: Final = ord("E")
_COMMAND_COMPLETE: Final = ord("C")
_COPY_IN_RESPONSE: Final = ord("G")
_COPY_BOTH_RESPONSE: Final = ord("W")
_NO_DATA: Final = ord("n")

# Backend message types the walk looks at; every other type is skipped by one index test.
_backend_interesting = bytearray(256)
for _type_code in b"ZSECGW":
    _backend_interesting[_type_code] = 1
_BACKEND_INTERESTING: Final = bytes(_backend_interesting)
# What feed's quick walk does with each backend message type (0: skip it).
_READY: Final = 1  # ReadyForQuery
# ParseComplete, BindComplete, CloseComplete (counted with named statements):
_COMPLETION: Final = 2
# CommandComplete (with named statements: DEALLOCATE ALL; with the state guard):
_TAG: Final = 3
_STOP: Final = 4  # ParameterStatus, CopyInResponse, CopyBothResponse: _walk handles them
_quick_actions = bytearray(256)
for _message_type, _action in ((b"Z", _READY), (b"S", _STOP), (b"G", _STOP), (b"W", _STOP)):
    _quick_actions[_message_type[0]] = _action
_counting_actions = bytearray(_quick_actions)
for _message_type in (b"1", b"2", b"3"):
    _counting_actions[_message_type[0]] = _COMPLETION
_counting_actions[ord("C")] = _TAG
# Without named statements but with the state guard: CommandComplete is looked at too.
_tag_actions = bytearray(_quick_actions)
_tag_actions[ord("C")] = _TAG
_QUICK_ACTIONS: Final = bytes(_quick_actions)
_COUNTING_ACTIONS: Final = bytes(_counting_actions)
_TAG_ACTIONS: Final = bytes(_tag_actions)

# CommandComplete tags the walks act on. The quick walk tells them from every other tag by
# their message length and first letter (``_TAG_FIRST[length]``); _walk compares them whole.
_DEALLOCATE_TAGS: Final = (b"DEALLOCATE ALL\0", b"DISCARD ALL\0")  # named statements are gone
# transaction_state_guard: tags of commands that may leave state in the session (SET only
# when the server was idle before it: see BackendScanner).
_SET_TAG: Final = b"SET\0"
_STATE_TAGS: Final = (_SET_TAG, b"LISTEN\0", b"PREPARE\0", b"DECLARE CURSOR\0", b"CREATE TABLE\0")
_first_letters = bytearray(32)
for _tag in (*_DEALLOCATE_TAGS, *_STATE_TAGS):
    # (Tags of one length share their first letter: DEALLOCATE ALL and DECLARE CURSOR.)
    assert _first_letters[len(_tag) + 4] in (0, _tag[0]), _tag
    _first_letters[len(_tag) + 4] = _tag[0]
_TAG_FIRST: Final = bytes(_first_letters)
# The lengths of all of them, whether or not the guard is on (the state guard's tags are
# rare), and those below 4: malformed, for _walk to report. A table indexed by length
# (nonzero: such a length), as _TAG_FIRST, rather than a set: compiled, reading a byte is
# a few instructions where a set lookup hashes an int object. Lengths past its end are of
# none of them.
_tag_lengths = bytearray(len(_TAG_FIRST))
for _length in (*range(4), *[len(tag) + 4 for tag in (*_DEALLOCATE_TAGS, *_STATE_TAGS)]):
    _tag_lengths[_length] = 1
_TAG_LENGTHS: Final = bytes(_tag_lengths)
_TAG_LENGTHS_END: Final = len(_TAG_LENGTHS)
_STATE_TAG_SET: Final = frozenset(_STATE_TAGS)
# In prepared mode ParseComplete, BindComplete and CloseComplete are counted too, and
# NoData is looked at (one of pgproxy's own is cut out: see ServerStatements.render).
_COMPLETIONS: Final = frozenset(b"123")
_backend_prepared = bytearray(_backend_interesting)
for _type_code in (*_COMPLETIONS, _NO_DATA):
    _backend_prepared[_type_code] = 1
_BACKEND_PREPARED: Final = bytes(_backend_prepared)
# ParameterStatus messages are read whole; a server's are small (names and short values).
MAX_PARAMETER_STATUS: Final = 64 * 1024
STATUS_IDLE: Final = ord("I")
STATUS_IN_TRANSACTION: Final = ord("T")
STATUS_FAILED: Final = ord("E")


class FrontendScanner:
    """Walks client→server messages: counts requests, tracks open batches, finds Terminate.

    After each ``feed``: ``requests`` is how many ReadyForQuery replies the chunk asks for,
    ``terminate_at`` is the chunk offset of a Terminate message (-1 if none), and ``error``
    describes a malformed message (None if the chunk is well formed) with ``error_at`` its
    offset. ``batch_open`` persists across chunks: extended-protocol messages were sent and
    no Sync closed them yet. ``holds_server`` is true when the server cannot change hands
    even at ReadyForQuery: a batch is open, or a message has only partly been sent (its
    remaining bytes would reach whichever server the client had next).

    Named prepared statements (``statements`` set: transaction and statement mode): a named
    Parse, Bind, Describe or Close is handed to the client's ClientStatements, and the chunk
    is then forwarded through ``plan`` (None: forward the chunk as it is) — pieces of it,
    rewritten messages and ops for the server to render. These four messages are held back
    until they are complete (``held``), since their names decide how they are sent; the
    plan of a chunk that completes none of them is empty. ``open_pbc`` counts the
    Parse/Bind/Close messages since the last request, to place each in the server's replies.
    The client's last unnamed Parse is recorded in its ClientStatements, and a Bind or
    Describe of the unnamed statement in a chunk that does not have that Parse before it
    gets a plan (the server may need the Parse again). A simple Query that may be an SQL
    ``PREPARE`` is read, and once the client may have names (``named_parse``: it sent a
    named Parse or a PREPARE), one that may be an ``EXECUTE`` or ``DEALLOCATE`` of one of
    them: these get a plan too (held back, like the statement messages, until whole).

    For COPY FROM STDIN: PostgreSQL ignores Syncs that arrive while it is in copy-in mode
    (libpq sends one after Execute and another after CopyDone). ``requests_total`` counts
    every request ever sent and ``requests_at_copy_end`` its value at the first CopyDone or
    CopyFail since ``copy_end_seen`` was last cleared (by the server side, when a COPY
    starts), so the requests still owed when the COPY ends are the difference.
    """

    __slots__ = (
        "at_boundary",
        "batch_open",
        "carry",
        "copy_end_seen",
        "error",
        "error_at",
        "held",
        "holds_server",
        "max_packet_size",
        "named_parse",
        "open_pbc",
        "plan",
        "remaining",
        "requests",
        "requests_at_copy_end",
        "requests_total",
        "sql_start",
        "statements",
        "terminate_at",
    )

    def __init__(self, max_packet_size: int) -> None:
        self.max_packet_size = max_packet_size
        self.remaining = 0
        self.carry = b""
        self.batch_open = False
        self.holds_server = False
        self.requests = 0
        self.requests_total = 0
        self.requests_at_copy_end = 0
        self.copy_end_seen = False
        self.terminate_at = -1
        self.error: str | None = None
        self.error_at = -1
        self.statements: ClientStatements | None = None
        self.plan: Plan | None = None
        self.held: bytearray | None = None
        self.open_pbc = 0
        # The client sent a named Parse or a PREPARE (it may have names): its simple
        # Queries that may be an EXECUTE or DEALLOCATE of a name are read (set once, for
        # cheap tests).
        self.named_parse = False
        self.sql_start = _PREPARE_START  # the first bytes of Queries to read (see feed)
        # The next chunk starts with a message header: nothing carried, held or left over.
        self.at_boundary = True

    def feed(self, data: bytes) -> None:
        """Walk the headers in ``data``, continuing from where the previous chunk ended."""
        if self.at_boundary:
            size: i64 = len(data)
            if (
                size > 5
                and data[0] == _QUERY
                and int32_at(data, 1) == size - 1
                and size <= self.max_packet_size
            ):
                # The most common chunk by far: one whole simple Query (unless it may be
                # an SQL PREPARE, EXECUTE or DEALLOCATE: _walk reads it).
                if (
                    self.statements is not None
                    and _MIN_SQL < size <= _MAX_SQL + 1  # (the message's length + 1)
                    and self.sql_start[data[5]]
                ):
                    self._walk(data)
                    return
                self.requests = 1
                self.requests_total += 1
                self.plan = None
                self.open_pbc = 0
                self.holds_server = self.batch_open
                return
            if self._quick_walk(data):
                return
        self._walk(data)

    def _quick_walk(self, data: bytes) -> bool:
        """The common chunk, starting at a header: simple queries, unnamed extended-protocol
        messages, CopyData. Walks it without changing anything and, if every message was
        one of those (and none but the last is split), sets the state _walk would have set
        and says True; else False, and _walk does it all. (Its rules for the messages it
        takes are _walk's, repeated for speed; test_stream checks that the two agree.)"""
        kinds = _FRONTEND_KIND
        limit = self.max_packet_size
        statements = self.statements
        size: i64 = len(data)
        position: i64 = 0
        requests = 0
        open_pbc = self.open_pbc
        batch_open = self.batch_open
        parse_at = -1  # the chunk's last unnamed Parse (named statements in use)
        last = size - 5  # the last offset where a whole header fits
        while position < size:
            if position > last:
                return False  # a split header: carried by _walk
            type_byte = data[position]
            length = int32_at(data, position + 1)
            if length < 4 or length > limit:
                return False
            kind = kinds[type_byte]
            end = position + 1 + length
            if kind == _REQUEST:
                if (
                    statements is not None
                    and type_byte == _QUERY
                    and _MIN_SQL <= length <= _MAX_SQL
                    and (end > size or self.sql_start[data[position + 5]])
                ):
                    return False  # perhaps an SQL PREPARE, EXECUTE or DEALLOCATE: _walk
                requests += 1
                open_pbc = 0
            elif kind >= _PARSE:
                if statements is not None:  # a named statement, or a split one: _walk
                    if end > size or length < 6:
                        return False
                    if kind == _PARSE:
                        if data[position + 5]:
                            return False
                        parse_at = position
                        parse_end = end
                        parse_batch = requests
                    elif kind == _BIND:
                        if data[position + 5] or data[position + 6]:
                            return False
                        if parse_at < 0 and statements.unnamed is not None:
                            return False  # the unnamed statement, maybe not here: _walk
                    elif data[position + 5] == _STATEMENT and (
                        data[position + 6]
                        or (kind == _DESCRIBE and parse_at < 0 and statements.unnamed is not None)
                    ):
                        return False
                batch_open = True
                if kind != _DESCRIBE:
                    open_pbc += 1
            elif kind == _SYNC:
                requests += 1
                open_pbc = 0
                batch_open = False
            elif kind == _EXTENDED:
                batch_open = True
            elif kind != _PLAIN:
                return False  # Terminate, the end of a COPY, an invalid type: _walk
            position = end
        if parse_at >= 0 and statements is not None:
            # The chunk itself is kept (no copy; the Parse is found again if it is ever
            # needed), unless it is large.
            statements.unnamed = data if size <= _KEEP_CHUNK else data[parse_at:parse_end]
            statements.unnamed_batch = self.requests_total + parse_batch
        self.requests = requests
        self.requests_total += requests
        self.open_pbc = open_pbc
        self.batch_open = batch_open
        self.plan = None
        self.remaining = position - size
        self.holds_server = batch_open or position != size
        self.at_boundary = position == size
        return True

    def _walk(self, data: bytes) -> None:
        self.requests = 0
        self.terminate_at = -1
        plan: Plan | None = None
        self.plan = None
        size: i64 = len(data)
        position: i64 = self.remaining
        base: i64 = 0
        if self.held is not None:  # a statement message held back: is it complete now?
            held = self.held
            held += data
            if not self._held_complete(held):
                self.plan = []
                self.holds_server = True
                return
            data = bytes(held)
            self.held = None
            size = len(data)
            position = 0
            self.plan = plan = []  # (the held bytes were not forwarded: all of data goes)
        elif position >= size:  # the whole chunk is payload of a message already walked
            self.remaining = position - size
            self.holds_server = self.batch_open or self.remaining > 0
            self.at_boundary = not self.remaining
            return
        elif len(self.carry):  # a header was split between chunks: join it (rare, < 5 bytes)
            base = len(self.carry)
            data = self.carry + data
            self.carry = b""
            size = len(data)
        kinds = _FRONTEND_KIND
        limit = self.max_packet_size
        statements = self.statements
        terminate_split = False
        requests = 0
        open_pbc = self.open_pbc
        batch_open = self.batch_open
        copied: i64 = base  # plan: data before this offset is in the plan already
        stop: i64 = -1  # plan: the offset where forwarding stops (Terminate, an error, a hold)
        parsed = False  # an unnamed Parse was walked (its server gets what follows)
        while position + 5 <= size:
            type_byte = data[position]
            length = int32_at(data, position + 1)
            kind = kinds[type_byte]
            if kind == _INVALID or length < 4 or length > limit:
                self._fail(type_byte, length, position - base)
                stop = position
                break
            if kind >= _PARSE:  # Parse, Bind, Close, Describe
                batch_open = True
                if statements is not None:
                    end = position + 1 + length
                    if end > size:  # its name decides how it is sent: hold it whole
                        stop = position
                        break
                    if length < 6:
                        named = 0  # malformed: PostgreSQL will say so
                    elif kind == _PARSE:
                        named = data[position + 5]
                    elif kind == _BIND:
                        named = data[position + 5] or data[position + 6]
                    else:
                        named = data[position + 6] if data[position + 5] == _STATEMENT else 0
                    if named:
                        if plan is None:
                            self.plan = plan = []
                        if position > copied:
                            plan.append(data[copied:position])
                        try:
                            copied = self._statement(
                                kind, data, position, end, self.requests_total + requests,
                                open_pbc, plan,
                            )  # fmt: skip
                        except StatementError as exc:
                            self.error = str(exc)
                            self.error_at = position - base
                            stop = position
                            break
                    elif length < 6:
                        pass
                    elif kind == _PARSE:
                        parsed = True
                        statements.unnamed = data[position:end]
                        statements.unnamed_batch = self.requests_total + requests
                    elif (
                        (kind == _BIND or (kind == _DESCRIBE and data[position + 5] == _STATEMENT))
                        and not parsed
                        and statements.unnamed is not None
                    ):
                        if plan is None:
                            self.plan = plan = []
                        if position > copied:
                            plan.append(data[copied:position])
                            copied = position
                        statements.use_unnamed(self.requests_total + requests, open_pbc, plan)
                if kind != _DESCRIBE:
                    open_pbc += 1
            elif kind == _REQUEST:
                if (
                    statements is not None
                    and type_byte == _QUERY
                    and _MIN_SQL <= length <= _MAX_SQL
                    and (position + 5 >= size or self.sql_start[data[position + 5]])
                ):
                    end = position + 1 + length
                    if end > size:  # perhaps a PREPARE, EXECUTE or DEALLOCATE: hold it whole
                        stop = position
                        break
                    op = None
                    if not data[end - 1]:
                        op = statements.sql(
                            data[position:end], self.requests_total + requests, open_pbc
                        )
                    if op is not None:
                        if plan is None:
                            self.plan = plan = []
                        if position > copied:
                            plan.append(data[copied:position])
                        plan.append(op)
                        copied = end
                        self.named_parse = True
                        self.sql_start = _NAMED_SQL_START
                requests += 1
                open_pbc = 0
            elif kind == _SYNC:
                requests += 1
                open_pbc = 0
                batch_open = False
            elif kind == _EXTENDED:
                batch_open = True
            elif kind == _TERMINATE:
                # The header may have begun in the carried bytes, already forwarded: then
                # the server holds part of a message and must never serve anyone else.
                terminate_split = position < base
                self.terminate_at = max(position - base, 0)
                stop = max(position, base)
                position = size  # the client is leaving: what follows is ignored
                break
            elif kind == _COPY_END and not self.copy_end_seen:
                self.copy_end_seen = True
                self.requests_at_copy_end = self.requests_total + requests
            position += 1 + length
        else:
            if position < size:
                if statements is not None and (
                    kinds[data[position]] >= _PARSE or data[position] == _QUERY
                ):
                    stop = position  # a statement message's header is split: hold it
                else:
                    self.carry = data[position:]
        if stop >= 0 and statements is not None and self.error is None and self.terminate_at < 0:
            # Held back: an incomplete statement message, from ``stop`` to the end.
            self.held = bytearray(data[stop:])
            if plan is None:
                self.plan = plan = []
            position = size
        if plan is not None:
            end_of_plan = size if stop < 0 else stop
            if end_of_plan > copied:
                plan.append(data[copied:end_of_plan])
        self.remaining = position - size if position > size else 0
        self.requests = requests
        self.requests_total += requests
        self.open_pbc = open_pbc
        self.batch_open = batch_open
        self.holds_server = (
            batch_open or position != size or terminate_split or self.held is not None
        )
        self.at_boundary = (
            position == size and self.terminate_at < 0 and self.held is None and not len(self.carry)
        )

    def _held_complete(self, held: bytearray) -> bool:
        if len(held) < 5:
            return False
        length = held[1] << 24 | held[2] << 16 | held[3] << 8 | held[4]
        if held[0] == _QUERY and not (
            _MIN_SQL <= length <= _MAX_SQL and (len(held) < 6 or self.sql_start[held[5]])
        ):
            return True  # (not a PREPARE, EXECUTE or DEALLOCATE: walked as it comes)
        # (A bad length is reported by the walk.)
        return length < 4 or length > self.max_packet_size or len(held) >= 1 + length

    def _statement(self, kind: int, data: bytes, position: int, end: int, batch: int,
                   index: int, plan: Plan) -> int:  # fmt: skip
        """Plan the named statement message data[position:end]; the offset from which the
        chunk is forwarded as written (see ClientStatements)."""
        statements = self.statements
        assert statements is not None
        if kind == _PARSE:
            self.named_parse = True
            self.sql_start = _NAMED_SQL_START
            return statements.parse(data, position, end, batch, index, plan)
        if kind == _BIND:
            return statements.bind(data, position, end, batch, index, plan)
        if kind == _DESCRIBE:
            return statements.describe(data, position, end, batch, index, plan)
        return statements.close(data, position, end, batch, index, plan)

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
    and ``error`` a description of a corrupt stream (None normally). ``quick`` says the
    chunk took the common path (a linked server's reply, nothing hidden, cut, withheld or
    copied, no ParameterStatus): then only ``ready`` and ``status`` need a look.

    Named prepared statements (``statements`` set): ``batches_done`` counts every
    ReadyForQuery and ``replies`` the ParseComplete/BindComplete/CloseComplete messages since
    the last one, which settle the entries of the server's ledger; a reply pgproxy caused is
    cut out of the stream. Then the bytes for the client are ``out`` (None: the chunk from
    ``forward_from`` as before), and a message split between chunks is held back until it
    is whole (it might be one to cut). ``deallocated`` says a DEALLOCATE ALL or DISCARD ALL
    completed in the chunk. ``cut_no_data``: the next reply is to a Describe of pgproxy's
    own (a rewritten EXECUTE), and a NoData there is cut out too.

    COPY FROM STDIN: ``copy_in`` is true from CopyInResponse to the CommandComplete or
    ErrorResponse that ends it. A chunk where a COPY started sets ``copy_started``; one where
    it ended sets ``copy_finished``, and then ``ready`` counts only the ReadyForQuery messages
    after the end: the caller settles what is owed at that point (the Syncs PostgreSQL
    ignored during the COPY are not) before subtracting ``ready``.

    transaction_state_guard (``guard(True)``): ``suspect`` is set when a reply for the
    client (not a hidden one) completes a command that may leave state in the session —
    CommandComplete ``LISTEN``, ``PREPARE``, ``DECLARE CURSOR``, ``CREATE TABLE``, or
    ``SET`` run while the server was idle (the last ReadyForQuery said 'I': outside a
    transaction block, so neither ``SET LOCAL`` nor a ``SET`` inside ``BEGIN`` … ``COMMIT``).
    The owner clears it. The quick walk tells these tags from others by length and first
    letter, and leaves the few that match (and COMMIT's or SELECT's never do) to _walk.
    """

    __slots__ = (
        "batches_done",
        "carry",
        "copy_finished",
        "copy_in",
        "copy_started",
        "cut_no_data",
        "deallocated",
        "error",
        "forward_from",
        "guarded",
        "hidden",
        "hidden_failed",
        "ledger",
        "out",
        "params",
        "quick",
        "quick_actions",
        "ready",
        "remaining",
        "replies",
        "statements",
        "status",
        "suspect",
        "withheld",
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
        self.statements: ServerStatements | None = None
        self.ledger: deque[Pending] | None = None
        self.batches_done = 0
        self.replies = 0
        self.out: bytes | None = None
        self.withheld = False  # the carry was not forwarded (prepared mode)
        self.deallocated = False
        self.cut_no_data = False
        self.quick = False  # the quick walk handled the chunk: only ``ready`` to look at
        # transaction_state_guard: off until ``guard(True)``.
        self.guarded = False
        self.suspect = False
        self.quick_actions = _QUICK_ACTIONS  # (the quick walk's table without named statements)

    def guard(self, on: bool) -> None:
        """Watch (or stop watching) the client's replies for commands that may leave
        session state (``suspect``)."""
        self.guarded = on
        self.quick_actions = _TAG_ACTIONS if on else _QUICK_ACTIONS
        if not on:
            self.suspect = False

    def feed(self, data: bytes) -> None:
        """Walk the headers in ``data``, continuing from where the previous chunk ended."""
        self.ready = 0
        self.params = None
        self.out = None
        self.copy_started = self.copy_finished = False
        self.quick = False
        size: i64 = len(data)
        position: i64 = self.remaining
        if position >= size:
            self.remaining = position - size
            self.forward_from = size if self.hidden else 0
            return
        statements = self.statements
        if self.hidden or len(self.carry) or self.copy_in or self.withheld or self.ledger:
            self._walk(data, position, 0)
            return
        # The common case, a linked server's reply with nothing hidden, carried, withheld
        # or to be cut, and no COPY: a quick walk that reads only ReadyForQuery and, when
        # named statements are in use, counts the replies the ledger will need and looks
        # for DEALLOCATE ALL (with the state guard, for its tags too). At anything else that
        # matters (ParameterStatus, a COPY starting, a bad length, a message split at the
        # end, a tag of interest), _walk takes over.
        counting = statements is not None
        actions = _COUNTING_ACTIONS if counting else self.quick_actions
        ready = 0
        last = size - 5  # the last offset where a whole header fits
        while position <= last:
            type_byte = data[position]
            length = int32_at(data, position + 1)
            action = actions[type_byte]
            if not action and length > 3:
                position += 1 + length
            elif action == _READY and length == 5 and position < last:
                self.status = data[position + 5]
                ready += 1
                position += 6
                if counting:
                    self.batches_done += 1
                    self.replies = 0
            elif action == _COMPLETION and length == 4:
                self.replies += 1
                position += 5
            elif action == _TAG and (
                length >= _TAG_LENGTHS_END or not _TAG_LENGTHS[length]
            ):  # (no tag to act on)
                position += 1 + length
            elif (
                action == _TAG
                and length > 3  # (a bad length is in _TAG_LENGTHS too: _walk reports it)
                and position < last
                and data[position + 5] != _TAG_FIRST[length]
            ):  # (a tag of such a length, but another one: COMMIT is not LISTEN)
                position += 1 + length
            else:
                break
        if position < size:
            self._walk(data, position, ready)
            return
        self.remaining = position - size
        self.ready = ready
        self.forward_from = 0
        self.quick = True

    def _walk(self, data: bytes, position: int, ready: int) -> None:
        # Every case: from ``position`` (``ready`` ReadyForQuery messages counted before it).
        original_size = len(data)
        base = 0
        withheld = self.withheld
        if self.carry:  # a header or a small message was split between chunks: join it
            base = len(self.carry)
            data = self.carry + data
            self.carry = b""
            self.withheld = False
        size = len(data)
        hidden = self.hidden
        forward_from = size if hidden else (0 if withheld else base)
        statements = self.statements
        interesting = _BACKEND_INTERESTING if statements is None else _BACKEND_PREPARED
        cuts: list[int] | None = None  # start, end, start, end... of replies to cut out
        while position + 5 <= size:
            type_byte = data[position]
            length = int32_at(data, position + 1)
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
                if statements is not None:
                    if self.ledger:
                        statements.batch_ended(self.batches_done)
                    self.batches_done += 1
                    self.replies = 0
                    self.cut_no_data = False
            elif type_byte == _PARAMETER_STATUS:
                if length > MAX_PARAMETER_STATUS:  # it would be carried whole: cap it
                    self.error = f"ParameterStatus of {length} bytes from server"
                    break
                if end > size:
                    break
                self._parameter_status(data[position + 5 : end])
            elif type_byte in _COMPLETIONS:  # (prepared mode only)
                ledger = self.ledger
                if ledger:
                    entry = ledger[0]
                    if entry.batch == self.batches_done and entry.index == self.replies:
                        ledger.popleft()
                        assert statements is not None
                        statements.settle(entry, True)
                        if entry.hide:
                            if cuts is None:
                                cuts = []
                            cuts += (position, end)
                            self.cut_no_data = entry.hide_no_data
                self.replies += 1
            elif type_byte == _NO_DATA:  # (prepared mode only)
                if self.cut_no_data:
                    self.cut_no_data = False
                    if cuts is None:
                        cuts = []
                    cuts += (position, end)
            elif type_byte in (_ERROR_RESPONSE, _COMMAND_COMPLETE):
                if hidden and type_byte == _ERROR_RESPONSE:
                    self.hidden_failed = True
                if self.copy_in:
                    self.copy_in = False
                    self.copy_finished = True
                    ready = 0
                if (
                    type_byte == _COMMAND_COMPLETE
                    and length < _TAG_LENGTHS_END
                    and _TAG_LENGTHS[length]
                    and (statements is not None or self.guarded)
                    and (position + 5 >= size or data[position + 5] == _TAG_FIRST[length])
                ):  # (a tag the quick walk would not skip either: read it whole)
                    if end > size:
                        break
                    tag = data[position + 5 : end]
                    if tag in _DEALLOCATE_TAGS:
                        if statements is not None:
                            self.deallocated = True
                    elif (
                        self.guarded
                        and not hidden
                        and tag in _STATE_TAG_SET
                        and (tag != _SET_TAG or self.status == STATUS_IDLE)
                    ):
                        self.suspect = True
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
        if statements is None:
            self.forward_from = min(max(forward_from - base, 0), original_size)
            return
        # Prepared mode: a split message is withheld until whole; replies are cut out.
        stop = position if self.carry else size
        self.withheld = bool(self.carry)
        if cuts is None and not withheld and stop == size:
            self.forward_from = min(max(forward_from - base, 0), original_size)
            return
        pieces = []
        start = forward_from
        if cuts is not None:
            for at in range(0, len(cuts), 2):
                if cuts[at] > start:
                    pieces.append(data[start : cuts[at]])
                start = max(start, cuts[at + 1])
        if stop > start:
            pieces.append(data[start:stop])
        self.out = b"".join(pieces)
        self.forward_from = 0

    def _parameter_status(self, payload: bytes) -> None:
        name, _, rest = payload.partition(b"\0")
        value = rest.split(b"\0", 1)[0]
        if self.params is None:
            self.params = []
        self.params.append((name.decode("utf-8", "replace"), value.decode("utf-8", "replace")))
