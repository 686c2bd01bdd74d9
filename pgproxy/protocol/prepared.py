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
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pgproxy.stats import PoolStats

_HEADER = struct.Struct("!cI")
_S = ord("S")

# Plan op kinds.
_PARSE = 0  # the client prepares a name
_USE = 1  # a Bind/Describe of the statement follows: prepare it here first if missing
_CLOSE = 2  # the client's Close of a name follows
# The name is in use: a Parse of an empty query under the client's own name goes first (its
# reply hidden), so the client's Parse (``raw``) fails on the server with PostgreSQL's own
# error, where PostgreSQL would raise it, and aborts the transaction as it would. The
# stray name is closed at the next link.
_DUPLICATE = 3
# A Bind or Describe of the unnamed statement follows, sent in another chunk than the
# client's unnamed Parse (``raw``, of request ``parsed``): a server that did not get that
# Parse in this link gets it first, its reply hidden (see ClientStatements.unnamed).
_UNNAMED = 4
# The client's simple Query ``DEALLOCATE name`` of a mapped name: rewritten (see
# _DEALLOCATE_MESSAGES) so that the server answers it in its place, whichever statements
# it has.
_DEALLOCATE = 5


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
_CLIENT_PARSE = 0  # a client's Parse: undone (name forgotten) if the server skipped it
_CLIENT_PARSE_HERE = 6  # likewise, of a statement the server already had (stand-in Parse)
_INJECTED = 1  # pgproxy's Parse before a Bind/Describe: hidden
_EVICTED = 2  # pgproxy's Close of the least recently used statement: hidden
_SKIP_CLOSE = 3  # Close of the stand-in Parse (statement already here): hidden
_STRAY = 4  # the empty Parse that makes a duplicate name collide: hidden
_CLIENT_CLOSE = 5  # a client's Close: undone (name restored) if the server skipped it
_UNNAMED_PARSE = 7  # pgproxy's Parse of a client's unnamed statement: hidden
_HIDE = 8  # another message of pgproxy's own: hidden, nothing to settle
_CLIENT_DEALLOCATE = 9  # the Bind of a rewritten DEALLOCATE: hidden, else as _CLIENT_CLOSE

_HIDDEN_KINDS = frozenset(
    (_INJECTED, _EVICTED, _SKIP_CLOSE, _STRAY, _UNNAMED_PARSE, _HIDE, _CLIENT_DEALLOCATE)
)

# A client Parse of a statement this server already has is answered by a Parse of an empty
# query under this name (and its Close right after): the client's ParseComplete then comes
# from the server in its exact place in the pipeline, and so does any error.
_STAND_IN = b"PGPROXY_STAND_IN"


def parse_message(name: bytes, body: bytes) -> bytes:
    """A Parse message for statement ``name`` with ``body`` (query, parameter types)."""
    return _HEADER.pack(b"P", 4 + len(name) + 1 + len(body)) + name + b"\0" + body


def close_message(name: bytes) -> bytes:
    """A Close message for statement ``name``."""
    return _HEADER.pack(b"C", 4 + 1 + len(name) + 1) + b"S" + name + b"\0"


_EMPTY_QUERY = b"\0\0\0"  # query '' and no parameter types
_STAND_IN_PARSE = parse_message(_STAND_IN, _EMPTY_QUERY) + close_message(_STAND_IN)

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
_DEALLOCATE_NAME = b"PGPROXY_DEALLOCATE"
_DEALLOCATE_MESSAGES = (
    close_message(_DEALLOCATE_NAME)
    + parse_message(b"", b'DEALLOCATE "' + _DEALLOCATE_NAME + b'"\0\0\0')
    + parse_message(_DEALLOCATE_NAME, _EMPTY_QUERY)
    + _HEADER.pack(b"B", 12) + b"\0\0" + b"\0\0" + b"\0\0" + b"\0\0"  # no parameters
    + _HEADER.pack(b"E", 9) + b"\0" + b"\0\0\0\0"
    + close_message(b"")
    + _HEADER.pack(b"S", 4)
)  # fmt: skip
# Their Parse/Bind/Close replies: CloseComplete, ParseComplete, ParseComplete, BindComplete
# (the Bind's is the third from 0), CloseComplete.
_DEALLOCATE_REPLIES = 5
_DEALLOCATE_BIND = 3


# ``DEALLOCATE [PREPARE] name``: what deallocate_name reads (PostgreSQL's lexer, in part).
_SQL_SPACE = frozenset(b" \t\n\r\f\v")
_IDENTIFIER_START = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_")
_IDENTIFIER_PART = _IDENTIFIER_START | frozenset(b"0123456789$")
_MAX_IDENTIFIER = 63  # NAMEDATALEN - 1: PostgreSQL truncates longer names
# The longest Query text deallocate_name reads (a quoted name of 63 bytes, all quotes,
# with room for spaces); longer ones are passed through unread.
MAX_DEALLOCATE_QUERY = 256
MIN_DEALLOCATE_QUERY = len(b"DEALLOCATE x")


def deallocate_name(text: bytes) -> bytes | None:
    """The statement name if ``text`` (a simple Query's, without its NUL) is exactly one
    ``DEALLOCATE [PREPARE] name`` (keywords in any case, an optional semicolon, white
    space anywhere between); None for anything else, ``DEALLOCATE ALL`` included.

    The name as PostgreSQL reads it: an unquoted one is folded to lower case, a quoted one
    kept as written ("" for a quote). Rarer forms (comments, U&"..." names, non-ASCII
    unquoted names, which fold by the server's encoding, names PostgreSQL would truncate)
    give None: the Query then goes to the server as it is."""
    words: list[tuple[bytes, bool]] = []  # (word, quoted)
    size = len(text)
    position = 0
    semicolon = False
    while position < size:
        byte = text[position]
        if byte in _SQL_SPACE:
            position += 1
        elif semicolon:
            return None  # something after the semicolon
        elif byte == 0x3B:  # ;
            semicolon = True
            position += 1
        elif byte in _IDENTIFIER_START:
            end = position + 1
            while end < size and text[end] in _IDENTIFIER_PART:
                end += 1
            if end < size and text[end] >= 0x80:
                return None  # a non-ASCII unquoted name
            words.append((text[position:end].lower(), False))
            position = end
        elif byte == 0x22:  # "
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
            if not quoted:
                return None  # a zero-length name is an error
            words.append((bytes(quoted), True))
            position = quote + 1
        else:
            return None
    if len(words) == 3 and words[1] == (b"prepare", False):
        del words[1]
    if len(words) != 2 or words[0] != (b"deallocate", False):
        return None
    name, was_quoted = words[1]
    if (not was_quoted and name in (b"all", b"prepare")) or len(name) > _MAX_IDENTIFIER:
        return None
    return name


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
    """One distinct statement: its name on every server and the Parse that prepares it."""

    __slots__ = ("body", "name", "parse", "refs")

    def __init__(self, name: bytes, body: bytes) -> None:
        self.name = name
        self.body = body
        self.parse = parse_message(name, body)
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


def _string_end(data: bytes, start: int, end: int) -> int:
    position = data.find(b"\0", start, end)
    if position < 0:
        raise StatementError("invalid string in message")
    return position


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
        "link_start",
        "names",
        "registry",
        "reparsed",
        "reparsed_batch",
        "stats",
        "unnamed",
        "unnamed_batch",
    )

    def __init__(self, registry: Registry, stats: PoolStats) -> None:
        self.registry = registry
        self.stats = stats
        self.names: dict[bytes, Statement] = {}
        self.closed = False
        self.unnamed: bytes | None = None
        self.unnamed_batch = -1
        self.link_start = 0
        self.reparsed: bytes | None = None
        self.reparsed_batch = -1

    # Each method appends to ``plan`` what stands for the message data[position:end];
    # ``batch`` (the client's request count before it) and ``index`` (its place among the
    # batch's Parse/Bind/Close) name it in the ledger.

    def parse(self, data: bytes, position: int, end: int, batch: int, index: int,
              plan: Plan) -> None:  # fmt: skip
        name_end = _string_end(data, position + 5, end)
        name = data[position + 5 : name_end]
        self.stats.client_parse_count += 1
        if name in self.names:
            plan.append(Op(_DUPLICATE, batch, index, None, name, data[position:end]))
            return
        statement = self.registry.acquire(data[name_end + 1 : end])
        self.names[name] = statement
        plan.append(Op(_PARSE, batch, index, statement, name))

    def bind(self, data: bytes, position: int, end: int, batch: int, index: int,
             plan: Plan) -> None:  # fmt: skip
        portal_end = _string_end(data, position + 5, end)
        name_end = _string_end(data, portal_end + 1, end)
        name = data[portal_end + 1 : name_end]
        statement = self.names.get(name)
        if statement is None:  # PostgreSQL will say it does not exist
            if not name:  # the unnamed statement, into a named portal
                self.use_unnamed(batch, index, plan)
            plan.append(data[position:end])
            return
        self.stats.bind_count += 1
        plan.append(Op(_USE, batch, index, statement))
        head = data[position + 5 : portal_end + 1]  # the portal name and its NUL
        rest = data[name_end:end]  # from the statement name's NUL on
        length = 4 + len(head) + len(statement.name) + len(rest)
        plan.append(_HEADER.pack(b"B", length) + head + statement.name + rest)

    def describe(self, data: bytes, position: int, end: int, batch: int, index: int,
                 plan: Plan) -> None:  # fmt: skip
        name = data[position + 6 : _string_end(data, position + 6, end)]
        statement = self.names.get(name)
        if statement is None:
            plan.append(data[position:end])
            return
        plan.append(Op(_USE, batch, index, statement))
        plan.append(_HEADER.pack(b"D", 4 + 1 + len(statement.name) + 1)
                    + b"S" + statement.name + b"\0")  # fmt: skip

    def close(self, data: bytes, position: int, end: int, batch: int, index: int,
              plan: Plan) -> None:  # fmt: skip
        name = data[position + 6 : _string_end(data, position + 6, end)]
        statement = self.names.pop(name, None)
        if statement is not None:
            plan.append(Op(_CLOSE, batch, index, statement, name))
        # Forwarded as written: the server has no statement by the client's name, and
        # closing one that does not exist is no error, so the client's CloseComplete (or
        # the skip after an earlier error) comes from the server in its place.
        plan.append(data[position:end])

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

    def deallocate(self, name: bytes, batch: int, index: int, plan: Plan) -> None:
        """The client's simple Query ``DEALLOCATE name`` of a name it has: forgotten (and
        restored if the server skips it), the Query rewritten where it is rendered."""
        statement = self.names.pop(name)
        plan.append(Op(_DEALLOCATE, batch, index, statement, name))

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

    __slots__ = ("batch", "client", "hide", "index", "kind", "name", "statement")

    def __init__(self, kind: int, batch: int, index: int, statement: Statement | None,
                 client: ClientStatements | None = None, name: bytes = b"") -> None:  # fmt: skip
        self.kind = kind
        self.batch = batch
        self.index = index
        self.hide = kind in _HIDDEN_KINDS
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
        "ledger",
        "registry",
        "stats",
        "strays",
    )  # fmt: skip

    def __init__(self, registry: Registry, stats: PoolStats, capacity: int) -> None:
        self.registry = registry
        self.stats = stats
        self.capacity = capacity
        self.cached: dict[Statement, None] = {}  # prepared here, least recently used first
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
                if statement in self.cached:
                    self._touch(statement)
                else:
                    index = self._make_room(parts, batch, index)
                    self._prepare(parts, statement)
                    self._note(_INJECTED, batch, index, statement)
                    self.extra += 1
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
            elif kind == _DEALLOCATE:
                parts.append(_DEALLOCATE_MESSAGES)
                for offset in range(_DEALLOCATE_REPLIES):
                    if offset == _DEALLOCATE_BIND:
                        self._note(_CLIENT_DEALLOCATE, batch, index + offset, statement,
                                   client, item.name)  # fmt: skip
                    else:
                        self._note(_HIDE, batch, index + offset, None)
                self.extra += _DEALLOCATE_REPLIES
            else:  # _DUPLICATE
                parts.append(parse_message(item.name, _EMPTY_QUERY))
                self._note(_STRAY, batch, index, None, None, item.name)
                self.extra += 1
                parts.append(item.raw)
        return b"".join(parts)

    def _note(self, kind: int, batch: int, index: int, statement: Statement | None,
              client: ClientStatements | None = None, name: bytes = b"") -> None:  # fmt: skip
        self.ledger.append(Pending(kind, batch, index, statement, client, name))

    def _touch(self, statement: Statement) -> None:
        del self.cached[statement]
        self.cached[statement] = None

    def _prepare(self, parts: list[bytes], statement: Statement) -> None:
        parts.append(statement.parse)
        self.cached[statement] = None
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
        if kind in (_CLIENT_PARSE, _CLIENT_PARSE_HERE):
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
