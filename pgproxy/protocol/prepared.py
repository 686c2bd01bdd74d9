"""Named prepared statements across pooled servers (transaction and statement mode).

PgBouncer ≥ 1.21 semantics (``max_prepared_statements``): a client's protocol-level named
statements live under pgproxy's own names on the servers, one name per distinct query text
and parameter types (``PGPROXY_n``), and a statement is prepared on whichever server the
client has when it needs it. Three parts, all free of I/O:

- ``Registry`` (proxy-wide): one ``Statement`` per distinct Parse body, counted by the
  clients' names and the servers' caches that refer to it, forgotten at zero.
- ``ClientStatements`` (per client): names → Statements. The FrontendScanner hands it each
  named Parse/Bind/Describe/Close and it writes the chunk's *plan*: byte pieces to forward
  (rewritten where a name is) and *ops* whose bytes depend on the server that gets them.
- ``ServerStatements`` (per server): the statements prepared there (an LRU of at most
  ``max_prepared_statements``) and the *ledger*: replies in flight that pgproxy must hide,
  or that decide whether a client's Parse or Close took effect. ``render`` turns a plan into
  the bytes for this server; the BackendScanner settles ledger entries as replies arrive.

How the ledger finds a reply without tracking every message: ParseComplete, BindComplete and
CloseComplete answer Parse, Bind and Close one for one, in order, and after an error the
server skips everything up to the next Sync. So a Parse/Bind/Close is named by (the batch it
is in, its index among the batch's Parse/Bind/Close messages); the backend side counts
ReadyForQuery (batches) and those three replies within a batch. An entry whose reply has not
come when its batch's ReadyForQuery does was skipped after an error: it is undone.

Errors are PostgreSQL's own, from the server, in their place in the pipeline: an unknown
name is forwarded as the client wrote it (the server has no such statement), and a name
already in use is made to collide on the server (see ``_DUPLICATE``).

Two more driver habits: SQL ``DEALLOCATE name`` of a mapped name (a simple Query, see
``deallocate_name`` and ``_DEALLOCATE_MESSAGES``), and Bind of the unnamed statement in
another batch than its Parse (see ClientStatements).
"""

from __future__ import annotations

import struct
from collections import deque
from typing import Final

from mypy_extensions import i64

from pgproxy.protocol.framing import header

_HEADER: Final = struct.Struct("!cI")
_S: Final = ord("S")

# Plan op kinds.
_PARSE: Final = 0  # the client prepares a name
_USE: Final = 1  # a Bind/Describe of the statement follows: prepare it here first if missing
_CLOSE: Final = 2  # the client's Close of a name follows
# The name is in use: a Parse of an empty query under the client's own name goes first (its
# reply hidden), so the client's Parse (``raw``) fails on the server with PostgreSQL's own
# error, where PostgreSQL would raise it, and aborts the transaction as it would. The
# stray name is closed at the next link.
_DUPLICATE: Final = 3
# A Bind or Describe of the unnamed statement follows, sent in another chunk than the
# client's unnamed Parse (``raw``, of request ``parsed``): a server that did not get that
# Parse in this link gets it first, its reply hidden (see ClientStatements.unnamed).
_UNNAMED: Final = 4
# The client's simple Query ``DEALLOCATE name`` of a mapped name: rewritten (see
# _DEALLOCATE_MESSAGES) so that the server answers it in its place, whichever statements
# it has.
_DEALLOCATE: Final = 5
# The client's simple Query ``PREPARE name … AS statement``: the statement is prepared
# here under pgproxy's name (if missing) and the Query rewritten (see _PREPARE_MESSAGES).
_SQL_PREPARE: Final = 6
# The client's simple Query ``EXECUTE name …`` of a mapped name: the statement is prepared
# here if missing and the Query (``raw``: rewritten to pgproxy's name) is run through the
# extended protocol (see _execute_messages), so that its errors come in their place.
_SQL_EXECUTE: Final = 7


class StatementCounters:
    """The counters the statements bump; pgproxy.stats' PoolStats (SHOW STATS) is one.

    A base class rather than a ``typing.Protocol``: compiled, its fields are native slots,
    where a Protocol's attribute is a lookup by name and an in-place add on objects, three
    per named Bind.
    """

    __slots__ = ("bind_count", "client_parse_count", "server_parse_count")

    def __init__(self) -> None:
        # (PgBouncer's ps_* counters: the clients' Parse and Bind messages, and the Parses
        # pgproxy sent to servers for them.)
        self.client_parse_count = 0
        self.server_parse_count = 0
        self.bind_count = 0


class Op:
    """A plan item whose bytes depend on the server: ``batch`` (the client's request count
    before it) and ``index`` (its place among the batch's Parse/Bind/Close) name it."""

    __slots__ = ("batch", "index", "kind", "name", "parsed", "raw", "statement")

    def __init__(self, kind: int, batch: int, index: int, statement: Statement | None,
                 name: bytes = b"", raw: bytes = b"", parsed: int = -1) -> None:  # fmt: skip
        self.kind = kind
        self.batch = batch
        self.index = index
        self.statement = statement
        self.name = name
        self.raw = raw
        self.parsed = parsed


Plan = list[bytes | Op]

# Ledger entry kinds.
_CLIENT_PARSE: Final = 0  # a client's Parse: undone (name forgotten) if the server skipped it
_CLIENT_PARSE_HERE: Final = 6  # likewise, of a statement the server already had (stand-in Parse)
_INJECTED: Final = 1  # pgproxy's Parse before a Bind/Describe: hidden
_EVICTED: Final = 2  # pgproxy's Close of the least recently used statement: hidden
_SKIP_CLOSE: Final = 3  # Close of the stand-in Parse (statement already here): hidden
_STRAY: Final = 4  # the empty Parse that makes a duplicate name collide: hidden
_CLIENT_CLOSE: Final = 5  # a client's Close: undone (name restored) if the server skipped it
_UNNAMED_PARSE: Final = 7  # pgproxy's Parse of a client's unnamed statement: hidden
_HIDE: Final = 8  # another message of pgproxy's own: hidden, nothing to settle
_CLIENT_DEALLOCATE: Final = 9  # the Bind of a rewritten DEALLOCATE: hidden, else as _CLIENT_CLOSE
_CLIENT_SQL_PREPARE: Final = (
    10  # the Bind of a rewritten PREPARE: hidden, else as _CLIENT_PARSE_HERE
)
_SQL_EXECUTE_BIND: Final = 11  # the Bind of a rewritten EXECUTE: hidden, and the NoData after it

_HIDDEN_KINDS: Final = frozenset(
    (_INJECTED, _EVICTED, _SKIP_CLOSE, _STRAY, _UNNAMED_PARSE, _HIDE, _CLIENT_DEALLOCATE,
     _CLIENT_SQL_PREPARE, _SQL_EXECUTE_BIND)
)  # fmt: skip

# A client Parse of a statement this server already has is answered by a Parse of an empty
# query under this name (and its Close right after): the client's ParseComplete then comes
# from the server in its exact place in the pipeline, and so does any error.
_STAND_IN: Final = b"PGPROXY_STAND_IN"


def parse_message(name: bytes, body: bytes) -> bytes:
    """A Parse message for statement ``name`` with ``body`` (query, parameter types)."""
    return header(b"P", 4 + len(name) + 1 + len(body)) + name + b"\0" + body


def close_message(name: bytes) -> bytes:
    """A Close message for statement ``name``."""
    return _statement_message(b"C", name)


def describe_message(name: bytes) -> bytes:
    """A Describe message for statement ``name``."""
    return _statement_message(b"D", name)


def _statement_message(type_byte: bytes, name: bytes) -> bytes:
    # Close and Describe of a statement: 'S', the name, its NUL.
    return header(type_byte, 4 + 1 + len(name) + 1) + b"S" + name + b"\0"


_EMPTY_QUERY: Final = b"\0\0\0"  # query '' and no parameter types
_STAND_IN_PARSE: Final = parse_message(_STAND_IN, _EMPTY_QUERY) + close_message(_STAND_IN)
# Bind, Execute and Close of the unnamed statement and portal, and Sync, for the rewrites
# of a client's SQL DEALLOCATE, PREPARE and EXECUTE below.
_BIND_UNNAMED: Final = header(b"B", 12) + b"\0\0" + b"\0\0" + b"\0\0" + b"\0\0"  # no parameters
_EXECUTE_UNNAMED: Final = header(b"E", 9) + b"\0" + b"\0\0\0\0"  # every row
_SYNC: Final = header(b"S", 4)

# A client's ``DEALLOCATE name`` (a simple Query) of a name pgproxy maps: the server may
# not have the statement, and has it under another name anyway. What it gets instead
# deallocates a statement of pgproxy's own, prepared for the purpose in the same batch, so
# that the client's CommandComplete "DEALLOCATE", or PostgreSQL's error where DEALLOCATE
# would fail (in an aborted transaction: the Parse of "DEALLOCATE ..." fails as the Query
# would, and the rest is skipped), comes from the server in its place: Close of the
# helper's name (in case an earlier one was left prepared; closing nothing is no error),
# Parse of the DEALLOCATE into the unnamed statement, Parse of the helper (an empty query),
# Bind, Execute, Close of the unnamed statement (which a simple Query destroys too), Sync.
# Their replies but CommandComplete and ReadyForQuery are hidden; the Bind's settles the
# client's name (restored if it was skipped).
_DEALLOCATE_NAME: Final = b"PGPROXY_DEALLOCATE"
_DEALLOCATE_MESSAGES: Final = (
    close_message(_DEALLOCATE_NAME)
    + parse_message(b"", b'DEALLOCATE "' + _DEALLOCATE_NAME + b'"\0\0\0')
    + parse_message(_DEALLOCATE_NAME, _EMPTY_QUERY)
    + _BIND_UNNAMED
    + _EXECUTE_UNNAMED
    + close_message(b"")
    + _SYNC
)
# Their Parse/Bind/Close replies: CloseComplete, ParseComplete, ParseComplete, BindComplete
# (the Bind's is the third from 0), CloseComplete.
_DEALLOCATE_REPLIES: Final = 5
_DEALLOCATE_BIND: Final = 3


# A client's ``PREPARE name … AS statement`` (a simple Query): the statement itself is
# prepared by a Parse under pgproxy's name (like a protocol-level one: the same Statement
# and server caches), and what the server gets in place of the Query makes it answer
# CommandComplete "PREPARE" (or PostgreSQL's error) in its place: it prepares a helper
# statement of pgproxy's own and closes it in the same batch. Parse of the helper's
# PREPARE into the unnamed statement, Bind, Execute, Close of the helper, Close of the
# unnamed statement, Sync. The replies but CommandComplete and ReadyForQuery are hidden;
# the Bind's settles the client's name (forgotten if it was skipped).
_PREPARE_NAME: Final = b"PGPROXY_PREPARE"
_PREPARE_MESSAGES: Final = (
    parse_message(b"", b'PREPARE "' + _PREPARE_NAME + b'" AS SELECT\0\0\0')
    + _BIND_UNNAMED
    + _EXECUTE_UNNAMED
    + close_message(_PREPARE_NAME)
    + close_message(b"")
    + _SYNC
)
_PREPARE_BIND: Final = 1  # ParseComplete, BindComplete, CloseComplete, CloseComplete
_PREPARE_REPLIES: Final = 4
_DESCRIBE_PORTAL: Final = header(b"D", 6) + b"P\0"


def _execute_messages(text: bytes) -> bytes:
    """What the server gets for a client's ``EXECUTE`` Query rewritten to ``text``: the
    Query's own replies come from it in their place (RowDescription from the Describe,
    or a NoData that is hidden), and the rest is hidden: ParseComplete, BindComplete,
    CloseComplete."""
    return (
        parse_message(b"", text + b"\0\0\0")
        + _BIND_UNNAMED
        + _DESCRIBE_PORTAL
        + _EXECUTE_UNNAMED
        + close_message(b"")
        + _SYNC
    )


_EXECUTE_REPLIES: Final = 3  # ParseComplete, BindComplete (its NoData too), CloseComplete
_EXECUTE_BIND: Final = 1


# SQL-level statements on prepared statements, in a simple Query of their own: what the
# readers below take of PostgreSQL's lexer (white space, unquoted and quoted names).
_SQL_SPACE: Final = frozenset(b" \t\n\r\f\v")
_IDENTIFIER_START: Final = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_")
_IDENTIFIER_PART: Final = _IDENTIFIER_START | frozenset(b"0123456789$")
_MAX_IDENTIFIER: Final = 63  # NAMEDATALEN - 1: PostgreSQL truncates longer names
# The longest Query text the readers take (a PREPARE of a longer statement, or anything
# else that long, is passed through unread), and the shortest (``EXECUTE x``).
MAX_SQL_QUERY: Final = 64 * 1024
MIN_SQL_QUERY: Final = len(b"EXECUTE x")

# PREPARE's parameter types as the Parse message gives them (OIDs): the built-in types by
# the names PostgreSQL's grammar accepts for them. A type list with any other type (a
# user-defined one, an array, a type modifier) leaves the PREPARE unmapped.
_TYPE_OIDS: Final = {
    b"bool": 16, b"boolean": 16, b"bytea": 17, b"char": 18, b"name": 19,
    b"int8": 20, b"bigint": 20, b"int2": 21, b"smallint": 21,
    b"int4": 23, b"int": 23, b"integer": 23, b"text": 25, b"oid": 26,
    b"json": 114, b"float4": 700, b"real": 700, b"float8": 701, b"double precision": 701,
    b"varchar": 1043, b"character varying": 1043, b"date": 1082, b"time": 1083,
    b"timestamp": 1114, b"timestamp without time zone": 1114,
    b"timestamptz": 1184, b"timestamp with time zone": 1184, b"interval": 1186,
    b"numeric": 1700, b"decimal": 1700, b"uuid": 2950, b"jsonb": 3802,
}  # fmt: skip
_TYPE_OID: Final = struct.Struct("!I")
_TYPE_COUNT: Final = struct.Struct("!H")


def _skip_space(text: bytes, position: int) -> int:
    size = len(text)
    while position < size and text[position] in _SQL_SPACE:
        position += 1
    return position


def _word(text: bytes, position: int) -> tuple[bytes, bool, int] | None:
    """The name or keyword at ``position`` (after white space): (the name as PostgreSQL
    reads it, whether it was quoted, the offset after it); None if there is none.

    An unquoted name is folded to lower case, a quoted one kept as written ("" for a
    quote). Rarer forms (U&"..." names, non-ASCII unquoted names, which fold by the
    server's encoding, names PostgreSQL would truncate, zero-length ones) give None."""
    size = len(text)
    position = _skip_space(text, position)
    if position >= size:
        return None
    byte = text[position]
    if byte in _IDENTIFIER_START:
        end = position + 1
        while end < size and text[end] in _IDENTIFIER_PART:
            end += 1
        if end < size and text[end] >= 0x80:
            return None
        word = text[position:end].lower()
        if len(word) > _MAX_IDENTIFIER or (word == b"u" and text[end : end + 1] == b"&"):
            return None
        return word, False, end
    if byte != 0x22:  # "
        return None
    quoted = bytearray()
    end = position + 1
    while True:
        quote = text.find(b'"', end)
        if quote < 0:
            return None  # unterminated: PostgreSQL's error, from the server
        quoted += text[end:quote]
        if text[quote + 1 : quote + 2] != b'"':
            break
        quoted += b'"'
        end = quote + 2
    if not quoted or len(quoted) > _MAX_IDENTIFIER:
        return None
    return bytes(quoted), True, quote + 1


def _keyword(text: bytes, position: int, keyword: bytes) -> int:
    """The offset after ``keyword`` (unquoted, any case) at ``position``; -1 if not there."""
    word = _word(text, position)
    if word is None or word[1] or word[0] != keyword:
        return -1
    return word[2]


def _one_statement(text: bytes, position: int) -> bool:
    """Whether nothing but white space follows a semicolon in text[position:] (a
    conservative test that it holds one statement: a semicolon in a string or a
    comment says no too)."""
    semicolon = text.find(b";", position)
    return semicolon < 0 or _skip_space(text, semicolon + 1) == len(text)


def deallocate_name(text: bytes) -> bytes | None:
    """The statement name if ``text`` (a simple Query's, without its NUL) is exactly one
    ``DEALLOCATE [PREPARE] name`` (keywords in any case, an optional semicolon, white
    space anywhere between); None for anything else, ``DEALLOCATE ALL`` included."""
    position = _keyword(text, 0, b"deallocate")
    if position < 0:
        return None
    word = _word(text, position)
    if word is not None and word[:2] == (b"prepare", False):
        following = _word(text, word[2])
        if following is not None:
            word = following
    if word is None or (not word[1] and word[0] in (b"all", b"prepare")):
        return None
    name, _, position = word
    position = _skip_space(text, position)
    if position < len(text) and text[position] == 0x3B:  # ;
        position = _skip_space(text, position + 1)
    return name if position == len(text) else None


def prepare_statement(text: bytes) -> tuple[bytes, bytes] | None:
    """(name, the Parse body: query and parameter types) if ``text`` is exactly one
    ``PREPARE name [ ( type [, ...] ) ] AS statement`` whose parameter types are all
    built-in ones (see _TYPE_OIDS); None for anything else."""
    position = _keyword(text, 0, b"prepare")
    word = _word(text, position) if position >= 0 else None
    if word is None or (not word[1] and word[0] == b"as"):
        return None
    name, _, position = word
    position = _skip_space(text, position)
    oids: list[int] = []
    if text[position : position + 1] == b"(":
        position += 1
        while True:
            words: list[bytes] = []
            while (word := _word(text, position)) is not None and not word[1]:
                words.append(word[0])
                position = word[2]
            oid = _TYPE_OIDS.get(b" ".join(words))
            position = _skip_space(text, position)
            delimiter = text[position : position + 1]
            if oid is None or delimiter not in (b",", b")"):
                return None
            oids.append(oid)
            position += 1
            if delimiter == b")":
                break
    position = _keyword(text, position, b"as")
    if position < 0:
        return None
    start = _skip_space(text, position)
    if start == len(text) or not _one_statement(text, start):
        return None
    types = _TYPE_COUNT.pack(len(oids)) + b"".join(_TYPE_OID.pack(oid) for oid in oids)
    return name, text[start:] + b"\0" + types


def execute_statement(text: bytes) -> tuple[bytes, bytes] | None:
    """(name, what follows it: the parameters in parentheses, if any) if ``text`` is
    exactly one ``EXECUTE name [ ( parameter [, ...] ) ]``; None for anything else."""
    position = _keyword(text, 0, b"execute")
    word = _word(text, position) if position >= 0 else None
    if word is None:
        return None
    name, _, position = word
    following = _skip_space(text, position)
    if following < len(text) and text[following] not in b"(;":
        return None
    if not _one_statement(text, position):
        return None
    return name, text[position:]


def _last_unnamed_parse(chunk: bytes) -> bytes:
    """The last whole unnamed Parse in ``chunk`` (which starts with a message header and
    has one), the chunk itself if that is all it is."""
    size = len(chunk)
    position = start = 0
    end = size
    while position + 5 <= size:
        type_byte, length = _HEADER.unpack_from(chunk, position)
        following = position + 1 + length
        if type_byte == b"P" and following <= size and length >= 6 and not chunk[position + 5]:
            start, end = position, following
        position = following
    if start == 0 and end == size:
        return chunk  # the same object (said, not left to slicing: compiled code copies)
    return chunk[start:end]


class StatementError(Exception):
    """A malformed statement message (PostgreSQL's wording, for a 08P01 error)."""


class Statement:
    """One distinct statement: its name on every server, the Parse that prepares it, and
    the rewritten pieces of the client messages that name it, made once: a Bind into the
    unnamed portal up to the statement name (``bind_head``: the portal's NUL and the name)
    and the Describe of the statement."""

    __slots__ = ("bind_head", "body", "describe", "name", "parse", "refs")

    def __init__(self, name: bytes, body: bytes) -> None:
        self.name = name
        self.body = body
        self.parse = parse_message(name, body)
        self.bind_head = b"\0" + name
        self.describe = describe_message(name)
        self.refs = 0


class Registry:
    """Proxy-wide: one Statement per distinct Parse body (query text + parameter types)."""

    def __init__(self) -> None:
        self.by_body: dict[bytes, Statement] = {}
        self._next = 0

    def acquire(self, body: bytes) -> Statement:
        """The statement for ``body`` (a new one if none is in use), with one more ref."""
        statement = self.by_body.get(body)
        if statement is None:
            self._next += 1
            statement = Statement(b"PGPROXY_%d" % self._next, body)
            self.by_body[body] = statement
        statement.refs += 1
        return statement

    def release(self, statement: Statement) -> None:
        """Drop one ref; a statement nobody refers to is forgotten."""
        statement.refs -= 1
        if statement.refs <= 0 and self.by_body.get(statement.body) is statement:
            del self.by_body[statement.body]


# Statement and portal names are short (pgbench's P_0, a driver's s1 or a hash): compiled,
# reading them byte by byte costs a few instructions a byte, where bytes.find with bounds
# is a method call that parses its arguments (about 1,400 instructions, twice per Bind).
# Past this many bytes, find takes over.
_SCAN_LIMIT: Final = 32


def _string_end(data: bytes, start: i64, end: i64) -> i64:
    """The offset of the NUL that ends the string starting at ``start``, before ``end``.

    (The offsets are native integers, ``i64``: compiled, the loop's index arithmetic
    and comparisons are machine instructions rather than tagged-int operations.)"""
    stop = start + _SCAN_LIMIT
    if stop > end:
        stop = end
    size: i64 = len(data)
    if stop > size:
        stop = size
    position = start
    while position < stop:
        if data[position] == 0:
            return position
        position += 1
    found: i64 = data.find(b"\0", position, end)
    if found < 0:
        raise StatementError("invalid string in message")
    return found


class ClientStatements:
    """A client's statement names, and the plan pieces for its named statement messages.

    The unnamed statement: some drivers (pg8000's run() with parameters) send Parse of
    the unnamed statement and its Sync, then Bind (or Describe) of it in a later
    batch. Outside a transaction the first Sync may free the client's server, and the Bind
    reach another one. So the scanner records the client's last unnamed Parse (``unnamed``:
    the message, or the chunk whose last unnamed Parse it is, which the quick walk keeps
    rather than copy the message; sent in request ``unnamed_batch``), and a Bind or
    Describe of the unnamed statement in
    a chunk without that Parse becomes an ``_UNNAMED`` op: a server that did not get the
    Parse in the current link (which began at request ``link_start``, set by the pool)
    gets it first, its ParseComplete hidden (``reparsed``: the Parse pgproxy sent so in
    request ``reparsed_batch``, so that it is sent once per link).
    """

    __slots__ = (
        "closed",
        "last_name",
        "link_start",
        "names",
        "registry",
        "reparsed",
        "reparsed_batch",
        "stats",
        "unnamed",
        "unnamed_batch",
    )

    def __init__(self, registry: Registry, stats: StatementCounters) -> None:
        self.registry = registry
        self.stats = stats
        self.names: dict[bytes, Statement] = {}
        # The name the last Bind or Describe looked up: the same bytes object again when
        # the next one names it too, so that neither a copy nor a hash is made (a bytes
        # object keeps its hash).
        self.last_name = b""
        self.closed = False
        self.unnamed: bytes | None = None
        self.unnamed_batch = -1
        self.link_start = 0
        self.reparsed: bytes | None = None
        self.reparsed_batch = -1

    # Each method appends to ``plan`` what stands for the message data[position:end],
    # up to the offset it returns: the message's own bytes from there on are forwarded
    # as written, with what follows them in the chunk (one copy for all). ``batch`` (the
    # client's request count before it) and ``index`` (its place among the batch's
    # Parse/Bind/Close) name it in the ledger.

    def parse(self, data: bytes, position: int, end: int, batch: int, index: int,
              plan: Plan) -> int:  # fmt: skip
        name_end = _string_end(data, position + 5, end)
        name = data[position + 5 : name_end]
        self.stats.client_parse_count += 1
        if name in self.names:
            plan.append(Op(_DUPLICATE, batch, index, None, name, data[position:end]))
            return end
        statement = self.registry.acquire(data[name_end + 1 : end])
        self.names[name] = statement
        plan.append(Op(_PARSE, batch, index, statement, name))
        return end

    def bind(self, data: bytes, position: int, end: int, batch: int, index: int,
             plan: Plan) -> int:  # fmt: skip
        portal_end = _string_end(data, position + 5, end)
        name_end = _string_end(data, portal_end + 1, end)
        name = self._name(data, portal_end + 1, name_end)
        statement = self.names.get(name)
        if statement is None:  # PostgreSQL will say it does not exist
            if not name:  # the unnamed statement, into a named portal
                self.use_unnamed(batch, index, plan)
            return position
        self.stats.bind_count += 1
        plan.append(Op(_USE, batch, index, statement))
        # The header and the message up to the statement name are rewritten; from the
        # name's NUL on it is the client's.
        portal_size = portal_end - position - 5
        length = 4 + portal_size + 1 + len(statement.name) + end - name_end
        plan.append(header(b"B", length))
        if portal_size:
            plan.append(data[position + 5 : portal_end + 1] + statement.name)
        else:
            plan.append(statement.bind_head)
        return name_end

    def describe(self, data: bytes, position: int, end: int, batch: int, index: int,
                 plan: Plan) -> int:  # fmt: skip
        statement = self.names.get(
            self._name(data, position + 6, _string_end(data, position + 6, end))
        )
        if statement is None:
            return position
        plan.append(Op(_USE, batch, index, statement))
        plan.append(statement.describe)
        return end

    def close(self, data: bytes, position: int, end: int, batch: int, index: int,
              plan: Plan) -> int:  # fmt: skip
        name = data[position + 6 : _string_end(data, position + 6, end)]
        statement = self.names.pop(name, None)
        if statement is not None:
            plan.append(Op(_CLOSE, batch, index, statement, name))
        # Forwarded as written: the server has no statement by the client's name, and
        # closing one that does not exist is no error, so the client's CloseComplete (or
        # the skip after an earlier error) comes from the server in its place.
        return position

    def _name(self, data: bytes, start: i64, stop: i64) -> bytes:
        """data[start:stop], as ``last_name`` if it holds the same bytes."""
        last = self.last_name
        size = stop - start
        if size == len(last) and size <= _SCAN_LIMIT:
            offset: i64 = 0
            while offset < size and data[start + offset] == last[offset]:
                offset += 1
            if offset == size:
                return last
        name = self.last_name = data[start:stop]
        return name

    def use_unnamed(self, batch: int, index: int, plan: Plan) -> None:
        """A Bind or Describe of the unnamed statement follows in ``plan``, and the
        client's last unnamed Parse was not earlier in its chunk: the server may lack it."""
        unnamed = self.unnamed_parse()
        if unnamed is not None:
            plan.append(Op(_UNNAMED, batch, index, None, raw=unnamed, parsed=self.unnamed_batch))

    def unnamed_parse(self) -> bytes | None:
        """The client's last unnamed Parse message (None: it sent none), taken out of its
        chunk once, so that it is the same object until the next one."""
        unnamed = self.unnamed
        if unnamed is not None:
            unnamed = self.unnamed = _last_unnamed_parse(unnamed)
        return unnamed

    def sql(self, message: bytes, batch: int, index: int) -> Op | None:
        """The op that stands for ``message``, a whole simple Query, if it is one SQL
        ``PREPARE``, ``EXECUTE`` or ``DEALLOCATE`` that pgproxy maps; None if the Query is
        to be sent as it is (any other Query, or a name the client does not have: then
        PostgreSQL's own error comes from the server)."""
        text = message[5:-1]
        verb = _word(text, 0)
        if verb is None or verb[1]:
            return None
        if verb[0] == b"deallocate":
            name = deallocate_name(text)
            if name is None or name not in self.names:
                return None
            return Op(_DEALLOCATE, batch, index, self.names.pop(name), name)
        if verb[0] == b"execute":
            executed = execute_statement(text)
            statement = None if executed is None else self.names.get(executed[0])
            if executed is None or statement is None:
                return None
            self.stats.bind_count += 1
            rewritten = b'EXECUTE "' + statement.name + b'"' + executed[1]
            return Op(_SQL_EXECUTE, batch, index, statement, raw=rewritten)
        if verb[0] == b"prepare":
            prepared = prepare_statement(text)
            if prepared is None:
                return None
            name, body = prepared
            self.stats.client_parse_count += 1
            if name in self.names:  # PostgreSQL's "already exists", from the server
                return Op(_DUPLICATE, batch, index, None, name, message)
            statement = self.registry.acquire(body)
            self.names[name] = statement
            return Op(_SQL_PREPARE, batch, index, statement, name)
        return None

    def forget_all(self) -> None:
        """DEALLOCATE ALL / DISCARD ALL, or the client left: drop every name."""
        for statement in self.names.values():
            self.registry.release(statement)
        self.names.clear()

    def release(self, unsent: list[Plan]) -> None:
        """The client is gone; ``unsent`` are the plans no server got (their Closes hold
        the refs their names had)."""
        self.closed = True
        self.forget_all()
        for plan in unsent:
            for item in plan:
                if (
                    isinstance(item, Op)
                    and item.kind in (_CLOSE, _DEALLOCATE)
                    and item.statement is not None
                ):
                    self.registry.release(item.statement)


class Pending:
    """A ledger entry: a Parse/Bind/Close in flight whose reply pgproxy must act on
    (``name``: the client's statement name; for _UNNAMED_PARSE, the Parse message)."""

    __slots__ = ("batch", "client", "hide", "hide_no_data", "index", "kind", "name", "statement")

    def __init__(self, kind: int, batch: int, index: int, statement: Statement | None,
                 client: ClientStatements | None = None, name: bytes = b"") -> None:  # fmt: skip
        self.kind = kind
        self.batch = batch
        self.index = index
        self.hide = kind in _HIDDEN_KINDS
        # The reply to a Describe of the portal follows: a NoData is pgproxy's, to hide.
        self.hide_no_data = kind == _SQL_EXECUTE_BIND
        self.statement = statement
        self.client = client
        self.name = name


class ServerStatements:
    """What one server has prepared, and the ledger of its replies in flight."""

    __slots__ = (
        "batch_offset",
        "cached",
        "capacity",
        "extra",
        "extra_batch",
        "last_used",
        "ledger",
        "registry",
        "stats",
        "strays",
    )  # fmt: skip

    def __init__(self, registry: Registry, stats: StatementCounters, capacity: int) -> None:
        self.registry = registry
        self.stats = stats
        self.capacity = capacity
        self.cached: dict[Statement, None] = {}  # prepared here, least recently used first
        # The statement put last in ``cached`` (used again, it needs no move: a Bind of
        # the same statement transaction after transaction is the common case).
        self.last_used: Statement | None = None
        self.ledger: deque[Pending] = deque()  # shared with the server's BackendScanner
        # Server batch number = client request number + batch_offset (see align).
        self.batch_offset = 0
        # Parse/Close messages pgproxy added to the batch numbered extra_batch.
        self.extra = 0
        self.extra_batch = -1
        self.strays: list[bytes] = []  # client names left prepared by a duplicate Parse

    def align(self, batches_done: int, hidden: int, client_requests: int,
              client_owed: int) -> None:  # fmt: skip
        """Tie the client's request numbers to this server's batches: the next batch the
        server answers (after ``hidden`` queries of pgproxy's own) is the oldest request
        the client is still owed a reply for."""
        self.batch_offset = batches_done + hidden - (client_requests - client_owed)

    def render(self, plan: Plan, client: ClientStatements) -> bytes:
        """The bytes this server gets for ``plan``; ledger entries for what needs them."""
        parts: list[bytes] = []
        for item in plan:
            if isinstance(item, bytes):
                parts.append(item)
                continue
            kind = item.kind
            batch = self.batch_offset + item.batch
            if batch != self.extra_batch:
                self.extra_batch = batch
                self.extra = 0
            index = item.index + self.extra
            statement = item.statement
            if kind == _USE:
                assert statement is not None
                self._ensure_prepared(parts, statement, batch, index)
            elif kind == _PARSE:
                assert statement is not None
                if statement in self.cached:
                    self._touch(statement)
                    parts.append(_STAND_IN_PARSE)
                    self._note(_CLIENT_PARSE_HERE, batch, index, statement, client, item.name)
                    self._note(_SKIP_CLOSE, batch, index + 1, None)
                    self.extra += 1
                else:
                    index = self._make_room(parts, batch, index)
                    self._prepare(parts, statement)
                    self._note(_CLIENT_PARSE, batch, index, statement, client, item.name)
            elif kind == _CLOSE:
                self._note(_CLIENT_CLOSE, batch, index, statement, client, item.name)
            elif kind == _UNNAMED:
                link_start = client.link_start
                raw = item.raw
                if item.parsed < link_start and (
                    client.reparsed is not raw or client.reparsed_batch < link_start
                ):
                    # Parsed in an earlier link, maybe on another server, and not sent
                    # here since: its unnamed statement may be anyone's, or none.
                    parts.append(raw)
                    self._note(_UNNAMED_PARSE, batch, index, None, client, raw)
                    self.extra += 1
                    client.reparsed = raw
                    client.reparsed_batch = item.batch
            elif kind == _SQL_PREPARE:
                assert statement is not None
                index = self._ensure_prepared(parts, statement, batch, index)
                self._replace_query(
                    parts, _PREPARE_MESSAGES, batch, index, _PREPARE_REPLIES,
                    _PREPARE_BIND, _CLIENT_SQL_PREPARE, statement, client, item.name,
                )  # fmt: skip
            elif kind == _SQL_EXECUTE:
                assert statement is not None
                index = self._ensure_prepared(parts, statement, batch, index)
                self._replace_query(
                    parts, _execute_messages(item.raw), batch, index, _EXECUTE_REPLIES,
                    _EXECUTE_BIND, _SQL_EXECUTE_BIND, None, None, b"",
                )  # fmt: skip
            elif kind == _DEALLOCATE:
                self._replace_query(
                    parts, _DEALLOCATE_MESSAGES, batch, index, _DEALLOCATE_REPLIES,
                    _DEALLOCATE_BIND, _CLIENT_DEALLOCATE, statement, client, item.name,
                )  # fmt: skip
            else:  # _DUPLICATE
                parts.append(parse_message(item.name, _EMPTY_QUERY))
                self._note(_STRAY, batch, index, None, None, item.name)
                self.extra += 1
                parts.append(item.raw)
        return b"".join(parts)

    def _note(self, kind: int, batch: int, index: int, statement: Statement | None,
              client: ClientStatements | None = None, name: bytes = b"") -> None:  # fmt: skip
        self.ledger.append(Pending(kind, batch, index, statement, client, name))

    def _ensure_prepared(
        self, parts: list[bytes], statement: Statement, batch: int, index: int
    ) -> int:
        """Prepare ``statement`` here first if this server lacks it (its ParseComplete
        hidden); the index of the next Parse/Bind/Close."""
        if statement in self.cached:
            if statement is not self.last_used:
                self._touch(statement)
            return index
        index = self._make_room(parts, batch, index)
        self._prepare(parts, statement)
        self._note(_INJECTED, batch, index, statement)
        self.extra += 1
        return index + 1

    def _replace_query(
        self, parts: list[bytes], messages: bytes, batch: int, index: int, replies: int,
        key: int, key_kind: int, statement: Statement | None,
        client: ClientStatements | None, name: bytes,
    ) -> None:  # fmt: skip
        """A client's simple Query sent as ``messages`` (extended protocol, ending in a
        Sync): of their ``replies`` Parse/Bind/Close replies, the one at ``key`` is
        settled as ``key_kind``, the others are hidden."""
        parts.append(messages)
        for offset in range(replies):
            if offset == key:
                self._note(key_kind, batch, index + offset, statement, client, name)
            else:
                self._note(_HIDE, batch, index + offset, None)
        self.extra += replies

    def _touch(self, statement: Statement) -> None:
        del self.cached[statement]
        self.cached[statement] = None
        self.last_used = statement

    def _prepare(self, parts: list[bytes], statement: Statement) -> None:
        parts.append(statement.parse)
        self.cached[statement] = None
        self.last_used = statement
        statement.refs += 1
        self.stats.server_parse_count += 1

    def _make_room(self, parts: list[bytes], batch: int, index: int) -> int:
        """Close the least recently used statements over capacity; the next index."""
        while self.cached and len(self.cached) >= max(self.capacity, 1):
            oldest = next(iter(self.cached))
            del self.cached[oldest]
            parts.append(close_message(oldest.name))
            self._note(_EVICTED, batch, index, oldest)
            self.extra += 1
            index += 1
        return index

    def settle(self, entry: Pending, done: bool) -> None:
        """The reply to ``entry`` came (``done``) or the server skipped it after an error."""
        kind = entry.kind
        statement = entry.statement
        if kind in (_CLIENT_PARSE, _CLIENT_PARSE_HERE, _CLIENT_SQL_PREPARE):
            if not done:
                client = entry.client
                if (
                    client is not None
                    and not client.closed
                    and statement is not None
                    and client.names.get(entry.name) is statement
                ):
                    del client.names[entry.name]
                    self.registry.release(statement)
                if kind == _CLIENT_PARSE:
                    self._uncache(statement)
        elif kind == _INJECTED:
            if not done:
                self._uncache(statement)
        elif kind == _EVICTED:
            assert statement is not None
            if done:
                self.registry.release(statement)
            else:  # still prepared here: back into the cache, oldest
                self.cached = {statement: None, **self.cached}
        elif kind == _STRAY:
            if done:
                self.strays.append(entry.name)
        elif kind == _UNNAMED_PARSE:
            client = entry.client
            if not done and client is not None and client.reparsed is entry.name:
                client.reparsed = None  # skipped after an error: not prepared after all
        elif kind in (_CLIENT_CLOSE, _CLIENT_DEALLOCATE):
            assert statement is not None
            client = entry.client
            if done or client is None or client.closed or entry.name in client.names:
                self.registry.release(statement)
            else:
                client.names[entry.name] = statement

    def _uncache(self, statement: Statement | None) -> None:
        # Its Parse was skipped: the server does not have it after all.
        if statement is not None and statement in self.cached:
            del self.cached[statement]
            self.registry.release(statement)

    def batch_ended(self, batch: int) -> None:
        """ReadyForQuery of ``batch``: what is still pending in it was skipped; undo it
        (latest first, so that a name closed and prepared again comes back right)."""
        ledger = self.ledger
        skipped: list[Pending] = []
        while ledger and ledger[0].batch <= batch:
            skipped.append(ledger.popleft())
        for entry in reversed(skipped):
            self.settle(entry, False)

    def cleanup(self) -> bytes:
        """Close messages for stray names, and a Sync: sent hidden at the next link."""
        names, self.strays = self.strays, []
        return b"".join(close_message(name) for name in names) + b"S\0\0\0\x04"

    def forget_all(self) -> None:
        """DEALLOCATE ALL / DISCARD ALL ran on this server, or it closed."""
        for statement in self.cached:
            self.registry.release(statement)
        self.cached.clear()

    def release(self) -> None:
        """The server is gone: settle what was in flight, forget what it had."""
        while self.ledger:
            self.settle(self.ledger.popleft(), False)
        self.forget_all()
