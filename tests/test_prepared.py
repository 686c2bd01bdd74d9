"""The sans-I/O side of named prepared statements: plans, rendering, the ledger, splits."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgproxy.protocol import messages
from pgproxy.protocol.prepared import (
    _DEALLOCATE_MESSAGES,
    _PREPARE_MESSAGES,
    ClientStatements,
    Registry,
    ServerStatements,
    StatementError,
    _execute_messages,
    _string_end,
    close_message,
    deallocate_name,
    execute_statement,
    parse_message,
    prepare_statement,
)
from pgproxy.protocol.stream import BackendScanner, FrontendScanner
from pgproxy.stats import PoolStats

SYNC = b"S\0\0\0\x04"
EXECUTE = b"E\0\0\0\x09\0\0\0\0\0"
PARSE_COMPLETE = b"1\0\0\0\x04"
BIND_COMPLETE = b"2\0\0\0\x04"
CLOSE_COMPLETE = b"3\0\0\0\x04"
READY = b"Z\0\0\0\x05I"
COMPLETE = b"C\0\0\0\x0dSELECT 1\0"


@given(st.binary(max_size=80), st.integers(0, 90), st.integers(0, 90))
def test_string_end_is_the_first_nul_in_bounds(data: bytes, start: int, end: int) -> None:
    # (Short strings are read byte by byte, longer ones with find: one answer either way.)
    found = data.find(b"\0", start, end)
    if found < 0:
        with pytest.raises(StatementError):
            _string_end(data, start, end)
    else:
        assert _string_end(data, start, end) == found


@pytest.mark.parametrize("length", [0, 1, 31, 32, 33, 200])
def test_string_end_of_names_either_side_of_the_byte_scan(length: int) -> None:
    data = b"B" + b"x" * length + b"\0rest\0"
    assert _string_end(data, 1, len(data)) == 1 + length
    with pytest.raises(StatementError):
        _string_end(data, 1, 1 + length)  # the NUL is past the message's end


def bind(name: bytes) -> bytes:
    body = b"\0" + name + b"\0" + b"\0\0" + b"\0\0" + b"\0\0"
    return b"B" + struct.pack("!I", 4 + len(body)) + body


def parse(name: bytes, query: bytes) -> bytes:
    return parse_message(name, query + b"\0\0\0")


def error(code: bytes) -> bytes:
    body = b"SERROR\0C" + code + b"\0Mboom\0\0"
    return b"E" + struct.pack("!I", 4 + len(body)) + body


class Link:
    """A client scanner and a server's statements and scanner, as one link ties them."""

    def __init__(self, capacity: int = 10, registry: Registry | None = None) -> None:
        self.stats = PoolStats()
        self.registry = registry or Registry()
        self.client = ClientStatements(self.registry, self.stats)
        self.front = FrontendScanner(1 << 20)
        self.front.statements = self.client
        self.server = ServerStatements(self.registry, self.stats, capacity)
        self.back = BackendScanner()
        self.back.statements = self.server
        self.back.ledger = self.server.ledger

    def move_to_new_server(self) -> None:
        """Linked to another server (idle, nothing owed), as Pool._link does."""
        self.server = ServerStatements(self.registry, self.stats, self.server.capacity)
        self.back = BackendScanner()
        self.back.statements, self.back.ledger = self.server, self.server.ledger
        self.server.align(0, 0, self.front.requests_total, 0)
        self.client.link_start = self.front.requests_total

    def send(self, *chunks: bytes) -> bytes:
        """What the server gets for ``chunks`` sent by the client."""
        out = []
        for chunk in chunks:
            self.front.feed(chunk)
            assert self.front.error is None, self.front.error
            plan = self.front.plan
            out.append(chunk if plan is None else self.server.render(plan, self.client))
        return b"".join(out)

    def reply(self, *chunks: bytes) -> bytes:
        """What the client gets for ``chunks`` sent by the server."""
        out = []
        for chunk in chunks:
            self.back.feed(chunk)
            if self.back.out is not None:
                out.append(self.back.out)
            else:
                out.append(chunk[self.back.forward_from :])
        return b"".join(out)


def test_unnamed_statements_pass_untouched() -> None:
    link = Link()
    stream = parse(b"", b"select 1") + bind(b"") + EXECUTE + SYNC
    assert link.send(stream) == stream
    assert link.front.plan is None
    assert link.stats.client_parse_count == 0


def test_names_are_mapped_and_prepared_where_missing() -> None:
    link = Link()
    sent = link.send(parse(b"a", b"select 1") + bind(b"a") + EXECUTE + SYNC)
    assert sent == parse(b"PGPROXY_1", b"select 1") + bind(b"PGPROXY_1") + EXECUTE + SYNC
    assert link.reply(PARSE_COMPLETE + BIND_COMPLETE + COMPLETE + READY) == (
        PARSE_COMPLETE + BIND_COMPLETE + COMPLETE + READY
    )
    # The same name on a new server: prepared there first, its ParseComplete hidden.
    link.move_to_new_server()
    assert link.send(bind(b"a") + EXECUTE + SYNC) == (
        parse(b"PGPROXY_1", b"select 1") + bind(b"PGPROXY_1") + EXECUTE + SYNC
    )
    replies = PARSE_COMPLETE + BIND_COMPLETE + COMPLETE + READY
    assert link.reply(replies) == BIND_COMPLETE + COMPLETE + READY
    assert link.stats.server_parse_count == 2 and link.stats.bind_count == 2


def test_a_second_client_parse_of_a_prepared_statement_uses_a_stand_in() -> None:
    link = Link()
    link.send(parse(b"a", b"select 1") + SYNC)
    link.reply(PARSE_COMPLETE + READY)
    sent = link.send(parse(b"b", b"select 1") + SYNC)  # same query, another name
    assert b"PGPROXY_STAND_IN" in sent and b"select 1" not in sent
    assert link.reply(PARSE_COMPLETE + CLOSE_COMPLETE + READY) == PARSE_COMPLETE + READY


def test_a_skipped_parse_is_undone() -> None:
    link = Link()
    link.send(parse(b"bad", b"selec 1") + SYNC)
    assert b"bad" in link.client.names
    assert link.reply(error(b"42601") + READY) == error(b"42601") + READY
    assert b"bad" not in link.client.names and not link.server.cached
    assert not link.registry.by_body


def test_a_close_skipped_after_an_error_is_undone() -> None:
    link = Link()
    link.send(parse(b"keep", b"select 1") + SYNC)
    link.reply(PARSE_COMPLETE + READY)
    link.send(parse(b"", b"selec") + close_message(b"keep") + SYNC)
    assert b"keep" not in link.client.names
    link.reply(error(b"42601") + READY)
    assert b"keep" in link.client.names


def test_eviction_closes_the_least_recently_used() -> None:
    link = Link(capacity=2)
    for name in (b"a", b"b", b"c"):
        link.send(parse(name, b"select '" + name + b"'") + SYNC)
    sent = link.send(bind(b"a") + SYNC)
    # 'a' was evicted by 'c': 'b' (now the oldest) is closed to make room for 'a' again.
    assert sent.startswith(close_message(b"PGPROXY_2") + parse(b"PGPROXY_1", b"select 'a'"))
    replies = (PARSE_COMPLETE + READY) * 2 + CLOSE_COMPLETE + PARSE_COMPLETE + READY
    replies += CLOSE_COMPLETE + PARSE_COMPLETE + BIND_COMPLETE + READY
    assert link.reply(replies) == (PARSE_COMPLETE + READY) * 3 + BIND_COMPLETE + READY


def bind_into(portal: bytes, name: bytes, parameters: bytes) -> bytes:
    """A Bind of statement ``name`` into ``portal`` with ``parameters`` (the bytes from
    the parameter format codes on)."""
    body = portal + b"\0" + name + b"\0" + parameters
    return b"B" + struct.pack("!I", 4 + len(body)) + body


def test_a_bind_is_rewritten_up_to_the_name_and_forwarded_from_there() -> None:
    link = Link()
    link.send(parse(b"s1", b"select $1::int") + parse(b"s2", b"select 2") + SYNC)
    link.reply(PARSE_COMPLETE * 2 + READY)
    # One text parameter ('42'), one result format; into a named portal and the unnamed
    # one, each followed by more messages in the chunk.
    parameters = b"\0\0" + b"\0\1" + b"\0\0\0\x0242" + b"\0\1\0\0"
    describe_portal = b"D\0\0\0\x09Pcur\0"
    chunk = (
        bind_into(b"cur", b"s1", parameters) + describe_portal + EXECUTE
        + bind_into(b"", b"s2", b"\0\0\0\0\0\0") + EXECUTE + SYNC
    )  # fmt: skip
    assert link.send(chunk) == (
        bind_into(b"cur", b"PGPROXY_1", parameters) + describe_portal + EXECUTE
        + bind_into(b"", b"PGPROXY_2", b"\0\0\0\0\0\0") + EXECUTE + SYNC
    )  # fmt: skip
    # Names of one length that differ, one after the other: each its own statement.
    for name, mapped in ((b"s1", b"PGPROXY_1"), (b"s2", b"PGPROXY_2"), (b"s1", b"PGPROXY_1")):
        assert link.send(bind(name) + EXECUTE + SYNC) == bind(mapped) + EXECUTE + SYNC
    # An unknown name of the same length is forwarded as the client wrote it.
    assert link.send(bind(b"s3") + EXECUTE + SYNC) == bind(b"s3") + EXECUTE + SYNC
    describe = b"D\0\0\0\x08Ss2\0"
    assert link.send(describe + SYNC) == b"D\0\0\0\x0fSPGPROXY_2\0" + SYNC
    # The chunk split anywhere (a Bind held back until whole): the same bytes.
    expected = link.send(chunk + describe + SYNC)
    for cut in range(1, len(chunk) + len(describe)):
        split = Link()
        split.send(parse(b"s1", b"select $1::int") + parse(b"s2", b"select 2") + SYNC)
        split.reply(PARSE_COMPLETE * 2 + READY)
        whole = chunk + describe + SYNC
        assert split.send(whole[:cut], whole[cut:]) == expected, cut


def test_a_statement_used_again_stays_the_most_recently_used() -> None:
    link = Link(capacity=2)
    link.send(parse(b"a", b"select 'a'") + parse(b"b", b"select 'b'") + SYNC)
    link.reply(PARSE_COMPLETE * 2 + READY)
    for _ in range(2):  # 'a' moves to the end once, then stays there
        assert link.send(bind(b"a") + EXECUTE + SYNC) == bind(b"PGPROXY_1") + EXECUTE + SYNC
        link.reply(BIND_COMPLETE + COMPLETE + READY)
    # A third statement evicts the least recently used: 'b'.
    sent = link.send(parse(b"c", b"select 'c'") + SYNC)
    assert sent == close_message(b"PGPROXY_2") + parse(b"PGPROXY_3", b"select 'c'") + SYNC


def test_split_anywhere_gives_the_same_bytes() -> None:
    client_stream = (
        parse(b"s1", b"select $1::int") + bind(b"s1") + EXECUTE + SYNC
        + close_message(b"s1") + parse(b"s1", b"select 2") + bind(b"s1") + EXECUTE + SYNC
    )  # fmt: skip
    server_stream = (
        PARSE_COMPLETE + BIND_COMPLETE + COMPLETE + READY
        + CLOSE_COMPLETE + PARSE_COMPLETE + BIND_COMPLETE + COMPLETE + READY
    )  # fmt: skip
    whole = Link()
    expected_sent = whole.send(client_stream)
    expected_replies = whole.reply(server_stream)
    assert expected_replies == server_stream
    for cut in range(1, len(client_stream)):
        link = Link()
        sent = link.send(client_stream[:cut], client_stream[cut:])
        assert sent == expected_sent, cut
    # A server on which the statement must be prepared first: hidden replies, split.
    registry = Registry()
    seed = Link(registry=registry)
    seed.send(parse(b"x", b"select 9") + SYNC)
    hidden_stream = PARSE_COMPLETE + BIND_COMPLETE + COMPLETE + READY
    for cut in range(1, len(hidden_stream)):
        link = Link(registry=registry)
        link.client.names[b"x"] = seed.client.names[b"x"]
        seed.client.names[b"x"].refs += 1
        link.send(bind(b"x") + EXECUTE + SYNC)
        got = link.reply(hidden_stream[:cut], hidden_stream[cut:])
        assert got == BIND_COMPLETE + COMPLETE + READY, cut


def test_deallocate_all_is_reported() -> None:
    scanner = BackendScanner()
    scanner.statements = ServerStatements(Registry(), PoolStats(), 10)
    scanner.ledger = scanner.statements.ledger
    tag = b"DEALLOCATE ALL\0"
    scanner.feed(b"C" + struct.pack("!I", 4 + len(tag)) + tag + READY)
    assert scanner.deallocated


def test_a_name_without_its_end_is_a_protocol_error() -> None:
    front = FrontendScanner(1 << 20)
    front.statements = ClientStatements(Registry(), PoolStats())
    front.feed(b"P\0\0\0\x07abc")
    assert front.error == "invalid string in message"


# -- the unnamed statement across batches (pg8000's run() with parameters) -----------------

DESCRIBE_STATEMENT = b"D\0\0\0\x06S\0"
PARAMETERS = b"t\0\0\0\x0a\0\x01\0\0\0\x17"  # ParameterDescription: one int4
NO_DATA = b"n\0\0\0\x04"


def bind_values(name: bytes, *values: bytes) -> bytes:
    body = b"\0" + name + b"\0" + b"\0\0" + struct.pack("!H", len(values))
    for value in values:
        body += struct.pack("!I", len(value)) + value
    body += b"\0\0"
    return b"B" + struct.pack("!I", 4 + len(body)) + body


def test_an_unnamed_statement_follows_its_client_to_another_server() -> None:
    """pg8000's run(): Parse/Sync, Describe/Sync, Bind/Execute/Sync of the unnamed
    statement, each batch on another server (autocommit frees it at every Sync)."""
    link = Link()
    unnamed = parse(b"", b"select $1::int")
    assert link.send(unnamed + SYNC) == unnamed + SYNC  # (the quick walk: untouched)
    assert link.front.plan is None and link.client.unnamed_parse() == unnamed
    assert link.reply(PARSE_COMPLETE + READY) == PARSE_COMPLETE + READY
    link.move_to_new_server()
    assert link.send(DESCRIBE_STATEMENT + SYNC) == unnamed + DESCRIBE_STATEMENT + SYNC
    described = PARAMETERS + NO_DATA + READY
    assert link.reply(PARSE_COMPLETE + described) == described  # (hidden: not the client's)
    link.move_to_new_server()
    stream = bind_values(b"", b"42") + EXECUTE + SYNC
    assert link.send(stream) == unnamed + stream
    assert link.reply(PARSE_COMPLETE + BIND_COMPLETE + COMPLETE + READY) == (
        BIND_COMPLETE + COMPLETE + READY
    )
    # Still linked to that server: it has the statement now, from pgproxy.
    assert link.send(stream) == stream
    assert link.reply(BIND_COMPLETE + COMPLETE + READY) == BIND_COMPLETE + COMPLETE + READY
    assert not link.server.ledger and not link.registry.by_body


def test_an_unnamed_statement_parsed_in_the_same_link_is_not_sent_again() -> None:
    link = Link()
    unnamed = parse(b"", b"select $1::int")
    link.send(unnamed + SYNC)
    link.reply(PARSE_COMPLETE + READY)
    stream = bind_values(b"", b"7") + EXECUTE + SYNC
    assert link.send(stream) == stream  # (a transaction: the same server throughout)
    # A new Parse in a later link is the one that counts.
    link.move_to_new_server()
    other = parse(b"", b"select $1::text")
    assert link.send(other + bind_values(b"", b"x") + EXECUTE + SYNC) == (
        other + bind_values(b"", b"x") + EXECUTE + SYNC
    )
    assert link.front.plan is None and link.client.unnamed_parse() == other
    link.move_to_new_server()
    assert link.send(stream) == other + stream


def test_an_unnamed_parse_skipped_after_an_error_is_sent_again() -> None:
    link = Link()
    unnamed = parse(b"", b"select $1::int")
    link.send(unnamed + SYNC)
    link.reply(PARSE_COMPLETE + READY)
    link.move_to_new_server()
    # A pipeline: the first batch fails before pgproxy's Parse, which is skipped.
    failing = parse(b"x", b"selec") + SYNC
    stream = bind_values(b"", b"1") + EXECUTE + SYNC
    assert link.send(failing + stream) == (parse(b"PGPROXY_1", b"selec") + SYNC + unnamed + stream)
    link.reply(error(b"42601") + READY)
    assert link.reply(PARSE_COMPLETE + BIND_COMPLETE + COMPLETE + READY) == (
        BIND_COMPLETE + COMPLETE + READY
    )
    link.move_to_new_server()
    both = parse(b"", b"selec") + bind_values(b"", b"1") + EXECUTE + SYNC
    link.send(both)
    link.reply(error(b"42601") + READY)
    # (Recorded all the same: PostgreSQL would keep the previous unnamed statement.)
    assert link.client.unnamed_parse() == parse(b"", b"selec")


def test_a_skipped_reparse_is_sent_again_in_the_same_link() -> None:
    link = Link()
    unnamed = parse(b"", b"select $1::int")
    link.send(unnamed + SYNC)
    link.reply(PARSE_COMPLETE + READY)
    link.move_to_new_server()
    # No Sync between the failing message and the Bind: pgproxy's Parse is skipped too.
    failing = bind(b"nonexistent") + EXECUTE
    stream = bind_values(b"", b"1") + EXECUTE + SYNC
    assert link.send(failing + stream) == failing + unnamed + stream
    assert link.reply(error(b"26000") + READY) == error(b"26000") + READY
    assert link.client.reparsed is None
    assert link.send(stream) == unnamed + stream
    assert link.reply(PARSE_COMPLETE + BIND_COMPLETE + COMPLETE + READY) == (
        BIND_COMPLETE + COMPLETE + READY
    )


def test_an_unnamed_bind_split_anywhere_gives_the_same_bytes() -> None:
    unnamed = parse(b"", b"select $1::int")
    stream = bind_values(b"", b"42") + DESCRIBE_STATEMENT + EXECUTE + SYNC
    for cut in range(1, len(stream)):
        link = Link()
        link.send(unnamed + SYNC)
        link.reply(PARSE_COMPLETE + READY)
        link.move_to_new_server()
        assert link.send(stream[:cut], stream[cut:]) == unnamed + stream, cut
        replies = PARSE_COMPLETE + BIND_COMPLETE + PARAMETERS + NO_DATA + COMPLETE + READY
        got = link.reply(replies[: cut % 12], replies[cut % 12 :])
        assert got == BIND_COMPLETE + PARAMETERS + NO_DATA + COMPLETE + READY, cut


def test_an_unnamed_statement_into_a_named_portal() -> None:
    link = Link()
    unnamed = parse(b"", b"select 1")
    link.send(unnamed + SYNC)
    link.reply(PARSE_COMPLETE + READY)
    link.move_to_new_server()
    body = b"cur\0" + b"\0" + b"\0\0" * 3  # portal "cur", the unnamed statement
    portal = b"B" + struct.pack("!I", 4 + len(body)) + body
    assert link.send(portal + SYNC) == unnamed + portal + SYNC


def test_a_client_without_an_unnamed_parse_binds_as_it_wrote() -> None:
    link = Link()
    stream = bind_values(b"", b"1") + EXECUTE + SYNC
    assert link.send(stream) == stream
    assert link.front.plan is None


# -- DEALLOCATE name (a simple Query) of a mapped name --------------------------------------

DEALLOCATE_COMPLETE = b"C\0\0\0\x0fDEALLOCATE\0"
HIDDEN_DEALLOCATE = CLOSE_COMPLETE + PARSE_COMPLETE + PARSE_COMPLETE + BIND_COMPLETE


def deallocate_replies(status: bytes = b"I") -> bytes:
    """The server's replies to a rewritten DEALLOCATE that succeeds."""
    return HIDDEN_DEALLOCATE + DEALLOCATE_COMPLETE + CLOSE_COMPLETE + b"Z\0\0\0\x05" + status


@pytest.mark.parametrize(
    ("text", "name"),
    [
        (b"DEALLOCATE a", b"a"),
        (b"deallocate prepare a;", b"a"),
        (b"  DeAllocate\n\tPREPARE   dbdpg_p123_4 ; \n", b"dbdpg_p123_4"),
        (b'DEALLOCATE "Mixed Case"', b"Mixed Case"),
        (b'DEALLOCATE "say ""hi"""', b'say "hi"'),
        (b'deallocate"x"', b"x"),
        (b"DEALLOCATE MiXeD", b"mixed"),
        (b'DEALLOCATE "ALL"', b"ALL"),
        (b'DEALLOCATE PREPARE "prepare"', b"prepare"),
        (b"DEALLOCATE _pg3_0", b"_pg3_0"),
        (b"DEALLOCATE a$1", b"a$1"),
    ],
)
def test_deallocate_name(text: bytes, name: bytes) -> None:
    assert deallocate_name(text) == name


@pytest.mark.parametrize(
    "text",
    [
        b"DEALLOCATE ALL",
        b"deallocate prepare all;",
        b"DEALLOCATE",
        b"DEALLOCATE prepare",
        b"DEALLOCATE a b",
        b"DEALLOCATE a; DEALLOCATE b",
        b"DEALLOCATE a;;",
        b"DEALLOCATE a -- why",
        b"/* c */ DEALLOCATE a",
        b'DEALLOCATE ""',
        b'DEALLOCATE "open',
        b'DEALLOCATE U&"a"',
        b"DEALLOCATE caf\xc3\xa9",
        b"DEALLOCATE " + b"x" * 64,
        b"PREPARE a AS SELECT 1",
        b"EXECUTE a",
        b"select 1",
        b"DEALLOCATE 1a",
    ],
)
def test_not_a_deallocate_name(text: bytes) -> None:
    assert deallocate_name(text) is None


def test_deallocate_of_a_mapped_name_is_answered_by_the_server() -> None:
    link = Link()
    link.send(parse(b"Mine", b"select 1") + SYNC)
    link.reply(PARSE_COMPLETE + READY)
    statement = link.client.names[b"Mine"]
    assert statement.refs == 2  # the client's name and the server's cache
    link.move_to_new_server()  # (a server that never had it: nothing to deallocate there)
    query = messages.query('DEALLOCATE "Mine"')
    assert link.send(query) == _DEALLOCATE_MESSAGES
    assert b"Mine" not in link.client.names
    assert link.reply(deallocate_replies()) == DEALLOCATE_COMPLETE + READY
    assert statement.refs == 1 and not link.server.ledger
    # The name is free again, as in PostgreSQL.
    assert link.send(parse(b"Mine", b"select 2") + SYNC) == parse(b"PGPROXY_2", b"select 2") + SYNC


def test_deallocate_that_fails_keeps_the_name() -> None:
    link = Link()
    link.send(parse(b"a", b"select 1") + SYNC)
    link.reply(PARSE_COMPLETE + READY)
    # In an aborted transaction the Parse of "DEALLOCATE ..." fails, as the Query would.
    link.send(messages.query("deallocate a"))
    aborted = b"Z\0\0\0\x05E"
    assert link.reply(CLOSE_COMPLETE + error(b"25P02") + aborted) == error(b"25P02") + aborted
    assert b"a" in link.client.names and not link.server.ledger


def test_deallocate_pipelined_between_other_requests() -> None:
    link = Link()
    link.send(parse(b"a", b"select 1") + SYNC)
    link.reply(PARSE_COMPLETE + READY)
    sent = link.send(
        messages.query("select 1") + messages.query("DEALLOCATE a;") + bind(b"a") + SYNC
    )
    assert sent == (
        messages.query("select 1") + _DEALLOCATE_MESSAGES + bind(b"a") + SYNC
    )  # (the name is gone: the Bind goes as written, and PostgreSQL says so)
    replies = COMPLETE + READY + deallocate_replies()
    assert link.reply(replies + error(b"26000") + READY) == (
        COMPLETE + READY + DEALLOCATE_COMPLETE + READY + error(b"26000") + READY
    )


@pytest.mark.parametrize(
    "sql", ["DEALLOCATE b", "DEALLOCATE ALL", "deallocate  a  a", "select 'DEALLOCATE a'"]
)
def test_other_queries_pass_untouched(sql: str) -> None:
    link = Link()
    link.send(parse(b"a", b"select 1") + SYNC)
    link.reply(PARSE_COMPLETE + READY)
    query = messages.query(sql)
    assert link.send(query) == query
    assert b"a" in link.client.names


def test_deallocate_split_anywhere_gives_the_same_bytes() -> None:
    query = messages.query("DEALLOCATE a")
    stream = messages.query("select 1") + query + messages.query("select 2")
    expected = messages.query("select 1") + _DEALLOCATE_MESSAGES + messages.query("select 2")
    for cut in range(1, len(stream)):
        link = Link()
        link.send(parse(b"a", b"select 1") + SYNC)
        link.reply(PARSE_COMPLETE + READY)
        assert link.send(stream[:cut], stream[cut:]) == expected, cut
        assert link.front.requests_total == 4
    link = Link()
    link.send(parse(b"a", b"select 1") + SYNC)
    assert link.send(*bytewise(stream)) == expected


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


# -- SQL PREPARE / EXECUTE (simple Queries) --------------------------------------------------

PREPARE_COMPLETE = b"C\0\0\0\x0cPREPARE\0"
NO_DATA = b"n\0\0\0\x04"
ROW_DESCRIPTION = b"T\0\0\0\x06\0\0"  # (no columns: enough for the walk)
DATA_ROW = b"D\0\0\0\x06\0\0"


def prepare_replies(status: bytes = b"I") -> bytes:
    """The server's replies to a rewritten PREPARE that succeeds (the statement prepared)."""
    return (
        PARSE_COMPLETE + BIND_COMPLETE + PREPARE_COMPLETE + CLOSE_COMPLETE + CLOSE_COMPLETE
        + b"Z\0\0\0\x05" + status
    )  # fmt: skip


@pytest.mark.parametrize(
    ("text", "name", "body"),
    [
        (b"PREPARE a AS SELECT 1", b"a", b"SELECT 1\0\0\0"),
        (b"prepare A as select $1;", b"a", b"select $1;\0\0\0"),
        (b' PREPARE "Q x"\n AS\tselect 2 ; ', b"Q x", b"select 2 ; \0\0\0"),
        (
            b"PREPARE p (int, text) AS SELECT $1, $2",
            b"p", b"SELECT $1, $2\0\0\x02\0\0\0\x17\0\0\0\x19",
        ),
        (
            b"PREPARE p(double precision,TIMESTAMP WITH TIME ZONE)AS SELECT $1",
            b"p", b"SELECT $1\0\0\x02\0\0\x02\xbd\0\0\x04\xa0",
        ),
    ],
)  # fmt: skip
def test_prepare_statement(text: bytes, name: bytes, body: bytes) -> None:
    assert prepare_statement(text) == (name, body)


@pytest.mark.parametrize(
    "text",
    [
        b"PREPARE a AS SELECT 1; SELECT 2",  # two statements: passed through
        b"PREPARE a AS SELECT ';'",  # (a semicolon in a string: conservatively too)
        b"PREPARE a (mytype) AS SELECT $1",  # a type that is not built in
        b"PREPARE a (int[]) AS SELECT $1",
        b"PREPARE a (varchar(10)) AS SELECT $1",
        b"PREPARE a () AS SELECT 1",
        b"PREPARE a AS",
        b"PREPARE AS SELECT 1",
        b"PREPARE a SELECT 1",
        b"PREPARE TRANSACTION 'x'",
        b"select 1",
    ],
)
def test_not_a_prepare_statement(text: bytes) -> None:
    assert prepare_statement(text) is None


@pytest.mark.parametrize(
    ("text", "name", "rest"),
    [
        (b"EXECUTE a", b"a", b""),
        (b"execute A(1, 'x');", b"a", b"(1, 'x');"),
        (b'EXECUTE "Q x" ( 2 ) ', b"Q x", b" ( 2 ) "),
    ],
)
def test_execute_statement(text: bytes, name: bytes, rest: bytes) -> None:
    assert execute_statement(text) == (name, rest)


@pytest.mark.parametrize(
    "text",
    [b"EXECUTE a; select 1", b"EXECUTE a b", b"EXECUTE", b"EXECUTE a(';')", b"EXPLAIN EXECUTE a"],
)
def test_not_an_execute_statement(text: bytes) -> None:
    assert execute_statement(text) is None


def test_sql_prepare_maps_the_name_like_a_parse() -> None:
    link = Link()
    sent = link.send(messages.query("PREPARE p (int) AS SELECT $1 + 1"))
    statement = link.client.names[b"p"]
    assert statement.name == b"PGPROXY_1"
    assert sent == statement.parse + _PREPARE_MESSAGES
    assert link.reply(PARSE_COMPLETE + prepare_replies()) == PREPARE_COMPLETE + READY
    assert not link.server.ledger and statement in link.server.cached
    # The same text prepared by the protocol shares the statement.
    link.send(parse_message(b"q", b"SELECT $1 + 1\0\0\x01\0\0\0\x17") + SYNC)
    assert link.client.names[b"q"] is statement


def test_sql_execute_runs_on_a_server_that_lacks_the_statement() -> None:
    link = Link()
    link.send(messages.query("PREPARE p AS SELECT 1"))
    link.reply(PARSE_COMPLETE + prepare_replies())
    statement = link.client.names[b"p"]
    link.move_to_new_server()
    sent = link.send(messages.query("EXECUTE p;"))
    assert sent == statement.parse + _execute_messages(b'EXECUTE "PGPROXY_1";')
    rows = ROW_DESCRIPTION + DATA_ROW + COMPLETE
    replies = PARSE_COMPLETE + PARSE_COMPLETE + BIND_COMPLETE + rows + CLOSE_COMPLETE + READY
    assert link.reply(replies) == rows + READY
    # Again on the same server: not prepared twice; a command without rows has NoData cut.
    sent = link.send(messages.query("execute P"))
    assert sent == _execute_messages(b'EXECUTE "PGPROXY_1"')
    insert = b"C\0\0\0\x0fINSERT 0 1\0"
    replies = PARSE_COMPLETE + BIND_COMPLETE + NO_DATA + insert + CLOSE_COMPLETE + READY
    assert link.reply(replies) == insert + READY
    assert not link.server.ledger and not link.back.cut_no_data


def test_sql_execute_that_fails_shows_the_error_and_keeps_the_name() -> None:
    link = Link()
    link.send(messages.query("PREPARE p AS SELECT 1"))
    link.reply(PARSE_COMPLETE + prepare_replies())
    link.move_to_new_server()
    link.send(messages.query("EXECUTE p"))
    aborted = b"Z\0\0\0\x05E"
    # In an aborted transaction pgproxy's Parse of the statement fails first.
    assert link.reply(error(b"25P02") + aborted) == error(b"25P02") + aborted
    assert b"p" in link.client.names and not link.server.cached and not link.back.cut_no_data
    # The client's own Describe later gets its NoData.
    stream = parse(b"", b"begin") + b"D\0\0\0\x06S\0" + SYNC
    link.send(stream)
    reply = PARSE_COMPLETE + b"t\0\0\0\x06\0\0" + NO_DATA + READY
    assert link.reply(reply) == reply


def test_sql_prepare_that_fails_forgets_the_name() -> None:
    link = Link()
    link.send(messages.query("PREPARE p AS SELEC 1"))
    assert link.reply(error(b"42601") + READY) == error(b"42601") + READY
    assert b"p" not in link.client.names and not link.server.cached
    assert not link.registry.by_body


def test_sql_prepare_of_a_name_in_use_gets_postgresql_s_error() -> None:
    link = Link()
    link.send(messages.query("PREPARE p AS SELECT 1"))
    link.reply(PARSE_COMPLETE + prepare_replies())
    query = messages.query("PREPARE p AS SELECT 2")
    assert link.send(query) == parse(b"p", b"") + query
    assert link.reply(PARSE_COMPLETE + error(b"42P05") + READY) == error(b"42P05") + READY
    assert link.client.names[b"p"].body == b"SELECT 1\0\0\0"


def test_sql_execute_and_deallocate_of_unknown_names_pass_through() -> None:
    link = Link()
    for sql in ("EXECUTE nope", "DEALLOCATE nope", "PREPARE TRANSACTION 'x'"):
        query = messages.query(sql)
        assert link.send(query) == query


def test_sql_prepare_split_anywhere_gives_the_same_bytes() -> None:
    stream = messages.query("select 1") + messages.query("PREPARE p AS SELECT 1")
    stream += messages.query("EXECUTE p")
    expected = None
    for cut in range(1, len(stream)):
        link = Link()
        sent = link.send(stream[:cut], stream[cut:])
        expected = expected or sent
        assert sent == expected, cut
        assert link.front.requests_total == 3
    assert expected is not None and _PREPARE_MESSAGES in expected
    assert Link().send(*bytewise(stream)) == expected


_SQL_PIECES = [
    b"PREPARE",
    b"EXECUTE",
    b"DEALLOCATE",
    b"prepare",
    b" ",
    b"\t",
    b"p",
    b'"',
    b'""',
    b"(",
    b")",
    b",",
    b";",
    b"AS",
    b"as",
    b"int",
    b"double precision",
    b"select 1",
    b"$1",
    b"U&",
    b"\xc3\xa9",
    b"all",
    b"x" * 64,
]


@given(st.binary(max_size=80) | st.lists(st.sampled_from(_SQL_PIECES)).map(b"".join))
def test_the_sql_readers_take_any_bytes(text: bytes) -> None:
    for reader in (prepare_statement, execute_statement, deallocate_name):
        reader(text)  # (no exception, whatever the text)
    link = Link()
    link.send(messages.query(text.replace(b"\0", b" ").decode("latin-1")))
