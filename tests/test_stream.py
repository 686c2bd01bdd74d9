"""FrontendScanner and BackendScanner: incremental header walks over arbitrary chunk splits.

The scanners are fed the chunks exactly as a socket delivers them, so every observable
result must be independent of where the chunk boundaries fall. The property tests below
build realistic message sequences, compute the expected totals from the message list
itself, and check that feeding the stream whole, byte by byte, or cut at arbitrary points
all give those totals.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pgproxy.protocol import messages
from pgproxy.protocol.messages import message
from pgproxy.protocol.prepared import ClientStatements, Registry, ServerStatements
from pgproxy.protocol.stream import (
    STATUS_FAILED,
    STATUS_IDLE,
    STATUS_IN_TRANSACTION,
    BackendScanner,
    FrontendScanner,
)
from pgproxy.stats import PoolStats

LIMIT = 1 << 16  # max_packet_size used by the property tests

PROPERTY = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def header(type_byte: bytes, length: int) -> bytes:
    """A raw message header with an arbitrary (possibly invalid) length field."""
    return type_byte + struct.pack("!I", length)


def cuts_near(boundaries: list[int]) -> st.SearchStrategy[list[int]]:
    """Cut points, many of them within a few bytes of a message boundary (so that headers
    and short messages get split), the rest anywhere."""
    near = st.tuples(st.sampled_from(boundaries), st.integers(-5, 5)).map(sum)
    return st.lists(st.one_of(near, st.integers(0, boundaries[-1])), max_size=25)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at the given points (ignoring 0, len and duplicates): no empty chunks."""
    points = sorted({cut for cut in cuts if 0 < cut < len(data)})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


# -- realistic frontend traffic ---------------------------------------------------------

SQL = st.sampled_from(
    [
        "select 1",
        "BEGIN",
        "COMMIT",
        "insert into t values ($1)",
        "",
        "DEALLOCATE a",
        " deallocate b;",
    ]
)
SMALL_PAYLOAD = st.binary(max_size=24)
BIG_PAYLOAD = st.integers(min_value=100, max_value=6000).map(lambda n: b"\xab" * n)
PAYLOAD = st.one_of(SMALL_PAYLOAD, SMALL_PAYLOAD, BIG_PAYLOAD)

FRONTEND_MESSAGE = st.one_of(
    SQL.map(lambda sql: (b"Q", messages.cstring(sql))),
    st.tuples(st.sampled_from([b"F", b"S", b"P", b"B", b"E", b"D", b"C", b"H"]), PAYLOAD),
    st.tuples(st.just(b"S"), st.just(b"")),  # Sync has an empty payload in practice
    st.tuples(st.sampled_from([b"d", b"c", b"f"]), PAYLOAD),  # COPY data / done / fail
    # Well-formed statement messages: named (DEALLOCATE a can find them) and unnamed.
    st.sampled_from(
        [
            (b"P", b"a\0select 1\0\0\0"),
            (b"P", b"\0select 2\0\0\0"),
            (b"B", b"\0\0\0\0\0\0\0\0"),
            (b"D", b"S\0"),
        ]
    ),
)

# Malformed headers: each triple is (raw header, expected error prefix).
BAD_HEADER = st.one_of(
    st.tuples(
        st.sampled_from([b"\x00", b"Z", b"p", b"x", b"!", b"\xff", b"T", b"A"]),
        st.integers(min_value=4, max_value=100),
    ).map(lambda t: (header(t[0], t[1]), "invalid frontend message type")),
    st.tuples(st.sampled_from([b"Q", b"S", b"P", b"d", b"X"]), st.integers(0, 3)).map(
        lambda t: (header(t[0], t[1]), "invalid message length")
    ),
    st.tuples(st.sampled_from([b"Q", b"B", b"d"]), st.integers(LIMIT + 1, 2**32 - 1)).map(
        lambda t: (header(t[0], t[1]), f"message of {t[1]} bytes exceeds max_packet_size")
    ),
)


@dataclass
class FrontendExpectation:
    data: bytes
    requests: int  # requests before the stream ends (or before Terminate / a bad message)
    batch_open: bool
    requests_after_copy_end: int
    terminate_at: int | None = None  # absolute offset of Terminate
    error_at: int | None = None  # absolute offset of the malformed header
    error: str | None = None
    boundaries: list[int] = field(default_factory=lambda: [0])  # message starts, and the end


@st.composite
def frontend_streams(draw: st.DrawFn) -> FrontendExpectation:
    """A sequence of client messages, optionally ended by Terminate or a malformed header
    (followed by junk that must be ignored), with the totals it must produce."""
    msgs = draw(st.lists(FRONTEND_MESSAGE, max_size=30))
    data = bytearray()
    requests = 0
    batch_open = False
    at_copy_end: int | None = None
    boundaries = [0]
    for type_byte, payload in msgs:
        data += message(type_byte, payload)
        boundaries.append(len(data))
        if type_byte in (b"Q", b"F"):
            requests += 1
        elif type_byte == b"S":
            requests += 1
            batch_open = False
        elif type_byte in (b"P", b"B", b"E", b"D", b"C", b"H"):
            batch_open = True
        elif type_byte in (b"c", b"f") and at_copy_end is None:
            at_copy_end = requests
    after_copy = 0 if at_copy_end is None else requests - at_copy_end
    expected = FrontendExpectation(b"", requests, batch_open, after_copy)
    ending = draw(st.sampled_from(["none", "terminate", "bad"]))
    if ending == "terminate":
        expected.terminate_at = len(data)
        data += messages.TERMINATE
    elif ending == "bad":
        raw, reason = draw(BAD_HEADER)
        expected.error_at = len(data)
        expected.error = reason
        data += raw
    if ending != "none":  # whatever follows is never walked
        boundaries.append(len(data))
        data += draw(st.binary(max_size=16)) + messages.query("select 'after'")
        boundaries.append(len(data))
    expected.data = bytes(data)
    expected.boundaries = boundaries
    return expected


@dataclass
class FrontendRun:
    requests: int = 0
    batch_open: bool = False
    holds_server: bool = False
    requests_after_copy_end: int = 0
    terminate_at: int | None = None
    terminate_chunk: tuple[int, int] | None = None  # (start, end) of the reporting chunk
    error_at: int | None = None
    error_chunk: tuple[int, int] | None = None
    error: str | None = None


def run_frontend(chunks: list[bytes], limit: int = LIMIT) -> FrontendRun:
    """Feed ``chunks`` as ClientConn.data_received does: stop at Terminate or an error."""
    scan = FrontendScanner(limit)
    run = FrontendRun()
    start = 0
    for chunk in chunks:
        scan.feed(chunk)
        assert scan.requests >= 0
        assert scan.remaining >= 0
        assert len(scan.carry) < 5
        run.requests += scan.requests
        assert scan.requests_total == run.requests
        run.batch_open = scan.batch_open
        run.holds_server = scan.holds_server
        run.requests_after_copy_end = scan.requests_after_copy_end()
        end = start + len(chunk)
        if scan.error is not None:
            run.error = scan.error
            run.error_at = start + scan.error_at
            run.error_chunk = (start, end)
            return run
        if scan.terminate_at != -1:
            assert 0 <= scan.terminate_at < len(chunk)
            run.terminate_at = start + scan.terminate_at
            run.terminate_chunk = (start, end)
            return run
        start = end
    return run


def check_frontend(expected: FrontendExpectation, run: FrontendRun) -> None:
    assert run.requests == expected.requests
    assert run.batch_open == expected.batch_open
    assert run.requests_after_copy_end == expected.requests_after_copy_end
    if expected.error is not None:
        assert run.error is not None and run.error.startswith(expected.error)
        assert run.error_at == expected.error_at
        # Reported by the chunk where the header became complete.
        assert run.error_chunk is not None
        assert run.error_chunk[0] <= expected.error_at + 4 < run.error_chunk[1]
        assert run.terminate_at is None
        assert run.holds_server  # a partly walked message: the server is not clean
        return
    assert run.error is None
    if expected.terminate_at is None:
        assert run.terminate_at is None
        assert run.holds_server == expected.batch_open
        return
    # Terminate is reported by the chunk holding its last header byte; when the header
    # began in an earlier chunk (already forwarded), the offset is clamped to 0 and the
    # server, which holds part of a message, must not serve anyone else.
    assert run.terminate_chunk is not None
    chunk_start, chunk_end = run.terminate_chunk
    position = expected.terminate_at
    assert chunk_start <= position + 4 < chunk_end
    assert run.terminate_at == max(position, chunk_start)
    assert run.holds_server == (expected.batch_open or position < chunk_start)


@PROPERTY
@given(stream=frontend_streams(), data=st.data())
def test_frontend_totals_do_not_depend_on_chunking(
    stream: FrontendExpectation, data: st.DataObject
) -> None:
    check_frontend(stream, run_frontend([stream.data]))
    cuts = data.draw(cuts_near(stream.boundaries), label="cuts")
    check_frontend(stream, run_frontend(split(stream.data, cuts)))


FRONTEND_STATE = (
    "requests", "requests_total", "remaining", "carry", "batch_open", "holds_server",
    "open_pbc", "terminate_at", "error", "error_at", "held", "copy_end_seen",
    "requests_at_copy_end", "at_boundary", "named_parse",
)  # fmt: skip


@PROPERTY
@given(stream=frontend_streams(), data=st.data(), named=st.booleans())
def test_frontend_quick_walk_leaves_the_state_of_the_full_walk(
    stream: FrontendExpectation, data: st.DataObject, named: bool
) -> None:
    """feed's quick walk (taken at a message boundary) either declines or leaves exactly
    what the full walk would: fed the same chunks, a scanner kept off the quick walk
    agrees after every chunk, with and without named statements in use."""
    cuts = data.draw(cuts_near(stream.boundaries), label="cuts")
    quick, full = FrontendScanner(LIMIT), FrontendScanner(LIMIT)
    if named:
        quick.statements = ClientStatements(Registry(), PoolStats())
        full.statements = ClientStatements(Registry(), PoolStats())
    for chunk in [stream.data, *split(stream.data, cuts)]:
        full.at_boundary = False  # (the full walk still computes it)
        quick.feed(chunk)
        full.feed(chunk)
        for name in FRONTEND_STATE:
            assert getattr(quick, name) == getattr(full, name), name
        assert (quick.plan is None) == (full.plan is None)
        if named:
            assert quick.statements is not None and full.statements is not None
            assert quick.statements.unnamed_parse() == full.statements.unnamed_parse()
            assert quick.statements.unnamed_batch == full.statements.unnamed_batch
            assert list(quick.statements.names) == list(full.statements.names)
        if quick.error is not None or quick.terminate_at != -1:
            break


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream=frontend_streams())
def test_frontend_totals_byte_by_byte(stream: FrontendExpectation) -> None:
    assume(len(stream.data) <= 4000)
    check_frontend(stream, run_frontend(bytewise(stream.data)))


@PROPERTY
@given(
    data=st.binary(max_size=3000),
    cuts=st.lists(st.integers(0, 3000), max_size=30),
    limit=st.sampled_from([16, 1024, 2**31 - 1]),
)
def test_frontend_random_bytes_never_raise(data: bytes, cuts: list[int], limit: int) -> None:
    scan = FrontendScanner(limit)
    started = time.perf_counter()
    for chunk in split(data, cuts):
        scan.feed(chunk)  # must return normally: problems are reported, not raised
        assert scan.requests >= 0 and scan.remaining >= 0 and len(scan.carry) < 5
        if scan.error is not None:
            assert -5 < scan.error_at < len(chunk)
            break
        if scan.terminate_at != -1:
            assert 0 <= scan.terminate_at < len(chunk)
            break
    assert time.perf_counter() - started < 1.0


# -- FrontendScanner: single cases -------------------------------------------------------

EXTENDED_BATCH = (
    message(b"P", b"\0select $1\0\0\0")
    + message(b"B", b"\0\0\0\0\0\0\0\0\0\0")
    + message(b"D", b"P\0")
    + message(b"E", b"\0\0\0\0\0")
)
SYNC = message(b"S")


def test_query_and_function_call_are_requests() -> None:
    scan = FrontendScanner(LIMIT)
    scan.feed(messages.query("select 1") + message(b"F", b"\0\0\0\x01") + messages.query(""))
    assert scan.requests == 3
    assert scan.requests_total == 3
    assert not scan.batch_open
    assert not scan.holds_server
    assert scan.terminate_at == -1
    assert scan.error is None


def test_extended_messages_open_a_batch_and_sync_closes_it() -> None:
    scan = FrontendScanner(LIMIT)
    scan.feed(EXTENDED_BATCH)
    assert scan.requests == 0
    assert scan.batch_open
    assert scan.holds_server  # Parse/Bind/Execute without Sync pin the server
    scan.feed(SYNC)
    assert scan.requests == 1
    assert not scan.batch_open
    assert not scan.holds_server
    assert scan.requests_total == 1


@pytest.mark.parametrize("type_byte", [b"P", b"B", b"E", b"D", b"C", b"H"])
def test_each_extended_message_opens_a_batch(type_byte: bytes) -> None:
    scan = FrontendScanner(LIMIT)
    scan.feed(message(type_byte, b"\0\0"))
    assert scan.batch_open
    assert scan.requests == 0
    scan.feed(SYNC + messages.query("select 1"))
    assert not scan.batch_open
    assert scan.requests == 2


def test_pipelined_batches_count_one_request_per_sync() -> None:
    scan = FrontendScanner(LIMIT)
    scan.feed((EXTENDED_BATCH + SYNC) * 3 + EXTENDED_BATCH)
    assert scan.requests == 3
    assert scan.batch_open


def test_requests_reset_per_chunk_and_batch_state_persists() -> None:
    scan = FrontendScanner(LIMIT)
    scan.feed(messages.query("a") + messages.query("b"))
    assert scan.requests == 2
    scan.feed(message(b"H"))
    assert scan.requests == 0
    assert scan.batch_open
    scan.feed(message(b"d", b"copy row"))
    assert scan.batch_open
    assert scan.requests_total == 2


def test_copy_data_is_plain() -> None:
    scan = FrontendScanner(LIMIT)
    scan.feed(message(b"d", b"1\tone\n") * 5)
    assert scan.requests == 0
    assert not scan.batch_open
    assert not scan.holds_server


def test_requests_after_copy_end() -> None:
    # libpq's COPY FROM STDIN: Parse/Bind/Execute/Sync, CopyData..., CopyDone, Sync.
    scan = FrontendScanner(LIMIT)
    scan.feed(EXTENDED_BATCH + SYNC)
    assert scan.requests_after_copy_end() == 0
    scan.copy_end_seen = False  # what the server side does at CopyInResponse
    scan.feed(message(b"d", b"row\n") * 2 + message(b"c") + SYNC)
    assert scan.copy_end_seen
    assert scan.requests_after_copy_end() == 1
    scan.feed(messages.query("select 1"))
    assert scan.requests_after_copy_end() == 2
    # A later CopyFail does not move the mark until the server clears copy_end_seen.
    scan.feed(message(b"f", b"oops\0"))
    assert scan.requests_after_copy_end() == 2
    scan.copy_end_seen = False
    scan.feed(message(b"f", b"oops\0") + SYNC)
    assert scan.requests_after_copy_end() == 1


def test_terminate_offset_and_what_follows_is_ignored() -> None:
    first = messages.query("insert into t values (1)")
    scan = FrontendScanner(LIMIT)
    scan.feed(first + messages.TERMINATE + messages.query("select 2") + b"\x00garbage")
    assert scan.terminate_at == len(first)
    assert scan.requests == 1  # only the query before Terminate
    assert scan.error is None


def test_terminate_alone() -> None:
    scan = FrontendScanner(LIMIT)
    scan.feed(messages.TERMINATE)
    assert scan.terminate_at == 0
    assert scan.requests == 0
    scan2 = FrontendScanner(LIMIT)
    scan2.feed(messages.query("x"))
    assert scan2.terminate_at == -1  # reset at every feed


@pytest.mark.parametrize("cut", [1, 2, 3, 4])
def test_terminate_header_split_between_chunks_is_reported(cut: int) -> None:
    # The client's code tests ``terminate_at >= 0``: a split Terminate must still be seen,
    # and the server, which already got the first bytes of it, must not be reused.
    scan = FrontendScanner(LIMIT)
    scan.feed(messages.query("x") + messages.TERMINATE[:cut])
    assert scan.terminate_at == -1
    assert scan.holds_server
    scan.feed(messages.TERMINATE[cut:])
    assert scan.terminate_at >= 0
    assert scan.holds_server


def test_invalid_type_reports_error_and_offset() -> None:
    good = messages.query("select 1") + EXTENDED_BATCH
    scan = FrontendScanner(LIMIT)
    scan.feed(good + message(b"Z", b"I") + messages.query("never"))
    assert scan.error == f"invalid frontend message type {ord('Z')}"
    assert scan.error_at == len(good)
    assert scan.requests == 1  # the requests before the bad message still count
    assert scan.holds_server


def test_nul_type_byte_is_invalid() -> None:
    scan = FrontendScanner(LIMIT)
    scan.feed(b"\x00\x00\x00\x00\x08abcd")
    assert scan.error == "invalid frontend message type 0"
    assert scan.error_at == 0


@pytest.mark.parametrize("length", [0, 1, 2, 3])
def test_length_below_four_is_an_error(length: int) -> None:
    scan = FrontendScanner(LIMIT)
    scan.feed(messages.query("a") + header(b"Q", length) + b"rest")
    assert scan.error == f"invalid message length {length}"
    assert scan.error_at == len(messages.query("a"))


def test_length_above_max_packet_size_is_an_error() -> None:
    scan = FrontendScanner(1024)
    scan.feed(message(b"Q", b"x" * 1020))  # length 1024: exactly the limit is accepted
    assert scan.error is None
    assert scan.requests == 1
    big = header(b"Q", 1025)
    scan.feed(SYNC + big)
    assert scan.error == "message of 1025 bytes exceeds max_packet_size"
    assert scan.error_at == len(SYNC)


def test_length_field_is_unsigned() -> None:
    scan = FrontendScanner(2**31 - 1)
    scan.feed(header(b"d", 0xFFFFFFFF))
    assert scan.error == f"message of {0xFFFFFFFF} bytes exceeds max_packet_size"


def test_large_message_payload_is_skipped_across_chunks() -> None:
    big = message(b"Q", b"x" * 200_000 + b"\0")
    data = big + SYNC
    scan = FrontendScanner(LIMIT * 16)
    scan.feed(data[:1000])
    assert scan.requests == 1  # counted when its header is seen
    assert scan.holds_server  # the rest of the message must reach the same server
    assert scan.remaining == len(big) - 1000
    scan.feed(data[1000:150_000])
    assert scan.requests == 0
    assert scan.holds_server
    scan.feed(data[150_000:])
    assert scan.requests == 1
    assert scan.remaining == 0
    assert not scan.holds_server


def test_header_split_one_byte_at_a_time() -> None:
    data = messages.query("select 1") + EXTENDED_BATCH + SYNC + messages.query("x")
    scan = FrontendScanner(LIMIT)
    total = 0
    for chunk in bytewise(data):
        scan.feed(chunk)
        assert scan.error is None
        total += scan.requests
    assert total == 3
    assert not scan.holds_server


# -- realistic backend traffic ----------------------------------------------------------

TEXT = st.text(
    alphabet=st.characters(exclude_categories=("Cs",), exclude_characters="\0"), max_size=20
)


def data_row(payload_size: int) -> bytes:
    return message(b"D", b"\0\x01" + struct.pack("!i", payload_size) + b"v" * payload_size)


# CommandComplete tags: common ones, those the walks act on (DEALLOCATE ALL, DISCARD ALL,
# the state guard's), and others of the same lengths and first letters (COMMIT is as long
# as LISTEN; CREATE INDEX, CLOSE CURSOR and DISCARD TEMP share theirs with guarded ones).
TAGS = [
    "SELECT 1", "SELECT 1000", "INSERT 0 1", "BEGIN", "COMMIT", "DEALLOCATE ALL",
    "DISCARD ALL", "SET", "LISTEN", "PREPARE", "DECLARE CURSOR", "CREATE TABLE",
    "CREATE INDEX", "CLOSE CURSOR", "SHOW", "LOCK TABLE",
]  # fmt: skip
STATE_TAGS = {"SET", "LISTEN", "PREPARE", "DECLARE CURSOR", "CREATE TABLE"}

# Each backend message: (kind, raw bytes, detail) where detail is the RFQ status, the
# ParameterStatus pair or the CommandComplete tag.
BACKEND_MESSAGE = st.one_of(
    st.sampled_from([b"I", b"T", b"E"]).map(lambda s: ("Z", messages.ready_for_query(s), s[0])),
    st.tuples(TEXT, TEXT).map(lambda p: ("S", messages.parameter_status(*p), p)),
    st.sampled_from(["42P01", "57014"]).map(
        lambda code: ("E", messages.error_response(code, "oops"), None)
    ),
    st.sampled_from(TAGS).map(lambda tag: ("C", message(b"C", messages.cstring(tag)), tag)),
    st.integers(0, 20_000).map(lambda n: ("D", data_row(n), None)),
    st.just(("T", message(b"T", b"\0\x01a\0" + b"\0" * 18), None)),
    st.just(("N", messages.notice_response("hello"), None)),
    st.sampled_from([b"1", b"2", b"3", b"n", b"I", b"s"]).map(
        lambda t: ("other", message(t), None)
    ),
    st.just(("K", messages.backend_key_data(42, b"abcd"), None)),
    st.just(("A", message(b"A", b"\0\0\0\x01chan\0payload\0"), None)),
)


@dataclass
class BackendExpectation:
    data: bytes
    hidden: int
    ready: int
    status: int
    params: list[tuple[str, str]]
    forwarded: bytes
    hidden_at: int | None  # absolute offset just after the last hidden ReadyForQuery
    hidden_failed: bool
    hidden_left: int
    boundaries: list[int]
    suspect: bool  # with the state guard on


@st.composite
def backend_streams(draw: st.DrawFn) -> BackendExpectation:
    msgs = draw(st.lists(BACKEND_MESSAGE, max_size=30))
    hidden = draw(st.integers(0, 3))
    data = bytearray()
    left = hidden
    ready = 0
    status = STATUS_IDLE
    params: list[tuple[str, str]] = []
    hidden_at: int | None = 0 if hidden == 0 else None
    failed = False
    suspect = False
    boundaries = [0]
    for kind, raw, detail in msgs:
        data += raw
        boundaries.append(len(data))
        if kind == "C" and not left and detail in STATE_TAGS:
            # SET only outside a transaction block: the last ReadyForQuery said idle.
            suspect = suspect or detail != "SET" or status == STATUS_IDLE
        if kind == "Z":
            status = detail
            if left:
                left -= 1
                if left == 0:
                    hidden_at = len(data)
            else:
                ready += 1
        elif kind == "S":
            params.append(detail)
        elif kind == "E" and left:
            failed = True
    forwarded = b"" if hidden_at is None else bytes(data[hidden_at:])
    return BackendExpectation(
        bytes(data), hidden, ready, status, params, forwarded, hidden_at, failed, left,
        boundaries, suspect,
    )  # fmt: skip


@dataclass
class BackendRun:
    ready: int = 0
    status: int = STATUS_IDLE
    params: list[tuple[str, str]] = field(default_factory=list)
    forwarded: bytearray = field(default_factory=bytearray)
    hidden_at: int | None = None
    hidden_failed: bool = False
    hidden_left: int = 0
    suspect: bool = False


def run_backend(chunks: list[bytes], hidden: int, guarded: bool = False) -> BackendRun:
    """Feed ``chunks`` as ServerConn.data_received does, collecting what reaches the client
    (``guarded``: with the state guard on)."""
    scan = BackendScanner()
    scan.guard(guarded)
    scan.hidden = hidden
    run = BackendRun(hidden_at=0 if hidden == 0 else None)
    start = 0
    for chunk in chunks:
        before = scan.hidden
        scan.feed(chunk)
        assert scan.error is None
        assert 0 <= scan.forward_from <= len(chunk)
        run.ready += scan.ready
        if scan.params is not None:
            assert scan.params  # None, never an empty list
            run.params += scan.params
        run.forwarded += chunk[scan.forward_from :]
        if before and not scan.hidden:
            run.hidden_at = start + scan.forward_from
        elif not before:
            assert scan.forward_from == 0
        start += len(chunk)
    run.status = scan.status
    run.hidden_failed = scan.hidden_failed
    run.hidden_left = scan.hidden
    run.suspect = scan.suspect
    return run


def check_backend(
    expected: BackendExpectation, run: BackendRun, guarded: bool = False
) -> None:  # fmt: skip
    assert run.suspect == (guarded and expected.suspect)
    assert run.ready == expected.ready
    assert run.status == expected.status
    assert run.params == expected.params
    assert bytes(run.forwarded) == expected.forwarded
    assert run.hidden_at == expected.hidden_at
    assert run.hidden_failed == expected.hidden_failed
    assert run.hidden_left == expected.hidden_left


BACKEND_STATE = (
    "ready", "status", "remaining", "carry", "forward_from", "params", "error", "hidden",
    "hidden_failed", "copy_in", "copy_started", "copy_finished", "batches_done", "replies",
    "out", "withheld", "deallocated", "suspect",
)  # fmt: skip


def feed_fully(scan: BackendScanner, chunk: bytes) -> None:
    """``scan.feed`` kept off its quick walk: the outputs reset, then the full walk."""
    if scan.remaining >= len(chunk) or scan.hidden or scan.carry or scan.copy_in:
        scan.feed(chunk)  # (feed takes the full walk, or none, by itself)
        return
    scan.ready = 0
    scan.params = scan.out = None
    scan.copy_started = scan.copy_finished = False
    scan._walk(chunk, scan.remaining, 0)


@PROPERTY
@given(
    msgs=st.lists(BACKEND_MESSAGE.filter(lambda m: m[0] != "S"), max_size=30),
    data=st.data(),
    named=st.booleans(),
    guarded=st.booleans(),
)
def test_backend_quick_walk_leaves_the_state_of_the_full_walk(
    msgs: list[tuple[str, bytes, object]], data: st.DataObject, named: bool, guarded: bool
) -> None:
    """feed's quick walk (nothing hidden, carried or copied; it stops at ParameterStatus,
    left out here so that it goes far) leaves exactly what the full walk would, chunk
    after chunk, with and without named statements in use (then it also counts
    ParseComplete/BindComplete/CloseComplete and looks for DEALLOCATE ALL), with and
    without the state guard (then it looks at CommandComplete tags too)."""
    stream = b"".join(raw for _, raw, _ in msgs)
    boundaries = [0]
    for _, raw, _ in msgs:
        boundaries.append(boundaries[-1] + len(raw))
    cuts = data.draw(cuts_near(boundaries), label="cuts")
    quick, full = BackendScanner(), BackendScanner()
    quick.guard(guarded)
    full.guard(guarded)
    if named:
        for scan in (quick, full):
            statements = ServerStatements(Registry(), PoolStats(), 10)
            scan.statements, scan.ledger = statements, statements.ledger
    for chunk in [stream, *split(stream, cuts)]:
        quick.feed(chunk)
        feed_fully(full, chunk)
        for name in BACKEND_STATE:
            assert getattr(quick, name) == getattr(full, name), name
        if quick.error is not None:
            break
        quick.deallocated = full.deallocated = False  # (as ServerConn does after a chunk)


@PROPERTY
@given(stream=backend_streams(), data=st.data())
def test_backend_totals_do_not_depend_on_chunking(
    stream: BackendExpectation, data: st.DataObject
) -> None:
    check_backend(stream, run_backend([stream.data], stream.hidden))
    cuts = data.draw(cuts_near(stream.boundaries), label="cuts")
    check_backend(stream, run_backend(split(stream.data, cuts), stream.hidden))
    chunks = split(stream.data, cuts)
    check_backend(stream, run_backend(chunks, stream.hidden, guarded=True), guarded=True)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream=backend_streams())
def test_backend_totals_byte_by_byte(stream: BackendExpectation) -> None:
    assume(len(stream.data) <= 4000)
    check_backend(stream, run_backend(bytewise(stream.data), stream.hidden))
    chunks = bytewise(stream.data)
    check_backend(stream, run_backend(chunks, stream.hidden, guarded=True), guarded=True)


@PROPERTY
@given(
    data=st.binary(max_size=3000),
    cuts=st.lists(st.integers(0, 3000), max_size=30),
    hidden=st.integers(0, 2),
)
def test_backend_random_bytes_never_raise(data: bytes, cuts: list[int], hidden: int) -> None:
    scan = BackendScanner()
    scan.hidden = hidden
    started = time.perf_counter()
    for chunk in split(data, cuts):
        scan.feed(chunk)  # must return normally: problems are reported, not raised
        assert scan.ready >= 0 and 0 <= scan.forward_from <= len(chunk)
        assert scan.status in range(256)
        if scan.error is not None:
            # The reports the scanner makes: a bad length, a ReadyForQuery that is not 5
            # bytes, a ParameterStatus past the cap (both added with the scanner's fixes).
            assert scan.error.startswith(
                ("invalid message length", "invalid ReadyForQuery length", "ParameterStatus of")
            )
            break  # ServerConn closes the server here
    assert time.perf_counter() - started < 1.0


# -- BackendScanner: single cases --------------------------------------------------------

CC = message(b"C", b"SELECT 1\0")
RFQ_I = messages.ready_for_query(b"I")
RFQ_T = messages.ready_for_query(b"T")
RFQ_E = messages.ready_for_query(b"E")


def test_ready_count_and_last_status() -> None:
    scan = BackendScanner()
    assert scan.status == STATUS_IDLE
    scan.feed(CC + RFQ_T + CC + RFQ_E)
    assert scan.ready == 2
    assert scan.status == STATUS_FAILED
    assert scan.forward_from == 0
    scan.feed(data_row(10) + CC)  # no ReadyForQuery: ready resets, status persists
    assert scan.ready == 0
    assert scan.status == STATUS_FAILED
    scan.feed(RFQ_I)
    assert scan.ready == 1
    assert scan.status == STATUS_IDLE
    scan.feed(RFQ_T)
    assert scan.status == STATUS_IN_TRANSACTION


def test_status_constants_are_the_protocol_bytes() -> None:
    assert bytes([STATUS_IDLE, STATUS_IN_TRANSACTION, STATUS_FAILED]) == b"ITE"


def test_parameter_status_pairs() -> None:
    scan = BackendScanner()
    scan.feed(
        messages.parameter_status("TimeZone", "Europe/Paris")
        + CC
        + messages.parameter_status("application_name", "café")
        + RFQ_I
    )
    assert scan.params == [("TimeZone", "Europe/Paris"), ("application_name", "café")]
    assert scan.ready == 1
    scan.feed(RFQ_I)
    assert scan.params is None  # reset at every feed


def test_parameter_status_split_is_reported_once_complete() -> None:
    ps = messages.parameter_status("DateStyle", "ISO, MDY")
    scan = BackendScanner()
    scan.feed(CC + ps[:7])
    assert scan.params is None
    scan.feed(ps[7:-1])
    assert scan.params is None
    scan.feed(ps[-1:] + RFQ_I)
    assert scan.params == [("DateStyle", "ISO, MDY")]
    assert scan.ready == 1


def test_ready_for_query_split_before_status_byte() -> None:
    scan = BackendScanner()
    scan.feed(CC + RFQ_T[:5])
    assert scan.ready == 0
    scan.feed(RFQ_T[5:])
    assert scan.ready == 1
    assert scan.status == STATUS_IN_TRANSACTION


def test_hidden_reply_forward_from_after_hidden_ready() -> None:
    hidden_part = CC + CC + RFQ_I
    client_part = data_row(3) + CC + RFQ_T
    scan = BackendScanner()
    scan.hidden = 1
    scan.feed(hidden_part + client_part)
    assert scan.hidden == 0
    assert scan.forward_from == len(hidden_part)
    assert scan.ready == 1  # only the client's ReadyForQuery
    assert scan.status == STATUS_IN_TRANSACTION
    assert not scan.hidden_failed
    scan.feed(RFQ_I)
    assert scan.forward_from == 0


def test_hidden_reply_not_reached_hides_everything() -> None:
    scan = BackendScanner()
    scan.hidden = 1
    scan.feed(CC + messages.notice_response("n"))
    assert scan.forward_from == len(CC) + len(messages.notice_response("n"))
    assert scan.ready == 0
    assert scan.hidden == 1
    scan.feed(RFQ_I + RFQ_T)
    assert scan.forward_from == len(RFQ_I)
    assert scan.ready == 1
    assert scan.hidden == 0


def test_hidden_large_message_chunks_are_hidden() -> None:
    row = data_row(100_000)
    scan = BackendScanner()
    scan.hidden = 1
    scan.feed(row[:10])
    assert scan.forward_from == 10
    scan.feed(row[10:50_000])  # pure payload: the skip path
    assert scan.forward_from == 50_000 - 10
    scan.feed(row[50_000:] + RFQ_I + CC)
    assert scan.forward_from == len(row) - 50_000 + len(RFQ_I)


def test_hidden_ready_for_query_split_across_chunks() -> None:
    scan = BackendScanner()
    scan.hidden = 1
    scan.feed(CC + RFQ_I[:5])
    assert scan.forward_from == len(CC) + 5
    scan.feed(RFQ_I[5:] + CC)
    assert scan.forward_from == 1
    assert scan.hidden == 0


def test_two_hidden_replies() -> None:
    scan = BackendScanner()
    scan.hidden = 2
    first = CC + RFQ_I
    scan.feed(first + CC)
    assert scan.hidden == 1
    assert scan.forward_from == len(first) + len(CC)
    scan.feed(RFQ_I + CC + RFQ_I)
    assert scan.hidden == 0
    assert scan.forward_from == len(RFQ_I)
    assert scan.ready == 1


def test_hidden_failed_when_error_among_hidden_replies() -> None:
    error = messages.error_response("22023", "invalid value for parameter")
    scan = BackendScanner()
    scan.hidden = 1
    scan.feed(error + RFQ_I)
    assert scan.hidden_failed
    assert scan.forward_from == len(error) + len(RFQ_I)


def test_error_after_hidden_replies_is_the_clients() -> None:
    error = messages.error_response("42P01", "relation does not exist")
    scan = BackendScanner()
    scan.hidden = 1
    scan.feed(CC + RFQ_I + error + RFQ_E)
    assert not scan.hidden_failed
    assert scan.ready == 1


def test_large_data_row_payload_is_skipped_not_carried() -> None:
    row = data_row(4_000_000)
    scan = BackendScanner()
    chunk = 65536
    started = time.perf_counter()
    for start in range(0, len(row), chunk):
        scan.feed(row[start : start + chunk])
        assert scan.error is None
        assert scan.ready == 0
        assert scan.forward_from == 0
        assert len(scan.carry) < 5  # payload bytes are never kept
    scan.feed(CC + RFQ_I)
    assert scan.ready == 1
    assert scan.remaining == 0
    assert time.perf_counter() - started < 1.0


def test_copy_in_start_and_end() -> None:
    copy_in = message(b"G", b"\0\0\x01\0\0")
    scan = BackendScanner()
    scan.feed(copy_in)
    assert scan.copy_in and scan.copy_started and not scan.copy_finished
    scan.feed(message(b"N", b"Mnotice\0\0"))
    assert scan.copy_in and not scan.copy_started
    scan.feed(RFQ_I + message(b"C", b"COPY 2\0") + RFQ_I)
    assert not scan.copy_in
    assert scan.copy_finished
    assert scan.ready == 1  # only the ReadyForQuery after the end of the COPY


def test_copy_in_ended_by_error() -> None:
    scan = BackendScanner()
    scan.feed(message(b"G", b"\0\0\0") + messages.error_response("22P02", "bad") + RFQ_E)
    assert scan.copy_started and scan.copy_finished and not scan.copy_in
    assert scan.ready == 1
    assert scan.status == STATUS_FAILED


def test_copy_both_response_starts_copy() -> None:
    scan = BackendScanner()
    scan.feed(message(b"W", b"\0\0\0"))
    assert scan.copy_in and scan.copy_started


@pytest.mark.parametrize("length", [0, 1, 3])
def test_backend_invalid_length_is_an_error(length: int) -> None:
    scan = BackendScanner()
    scan.feed(RFQ_I + header(b"D", length) + b"xxxx")
    assert scan.error == f"invalid message length {length} from server"
    assert scan.ready == 1


# A ReadyForQuery header declaring length 4: no status byte.
RFQ_WITHOUT_STATUS = header(b"Z", 4)


def test_ready_for_query_without_status_byte_is_reported_not_raised() -> None:
    scan = BackendScanner()
    scan.feed(RFQ_WITHOUT_STATUS)
    assert scan.error is not None


def test_ready_for_query_with_wrong_length_mid_chunk_is_an_error() -> None:
    scan = BackendScanner()
    scan.feed(RFQ_WITHOUT_STATUS + CC)
    assert scan.status != ord("C")  # CommandComplete's type byte is not a status
    assert scan.error is not None


def test_fresh_frontend_scanner_does_not_hold_the_server() -> None:
    assert FrontendScanner(LIMIT).holds_server is False


# -- BackendScanner: the state guard's tags ----------------------------------------------


def tag(text: str) -> bytes:
    return message(b"C", messages.cstring(text))


def guarded_scanner() -> BackendScanner:
    scan = BackendScanner()
    scan.guard(True)
    return scan


@pytest.mark.parametrize("text", ["LISTEN", "PREPARE", "DECLARE CURSOR", "CREATE TABLE", "SET"])
def test_a_tag_that_may_leave_session_state_is_suspect(text: str) -> None:
    scan = guarded_scanner()
    scan.feed(tag(text) + RFQ_I)
    assert scan.suspect and scan.ready == 1
    assert not scan.quick  # (left to the full walk, where ServerConn sees it)


@pytest.mark.parametrize("text", ["SELECT 1", "COMMIT", "CREATE INDEX", "CLOSE CURSOR", "SHOW"])
def test_other_tags_are_not_suspect_and_stay_on_the_quick_walk(text: str) -> None:
    scan = guarded_scanner()
    scan.feed(tag(text) + RFQ_I)
    assert not scan.suspect and scan.ready == 1
    if text in ("SELECT 1", "COMMIT", "SHOW"):  # (other length, or other first letter)
        assert scan.quick


def test_set_inside_a_transaction_block_is_not_suspect() -> None:
    """SET LOCAL and SET in BEGIN ... COMMIT share the tag SET: only a SET run while the
    server was idle (the last ReadyForQuery said 'I') is suspect."""
    scan = guarded_scanner()
    scan.feed(tag("BEGIN") + RFQ_T)
    scan.feed(tag("SET") + RFQ_T)
    scan.feed(tag("COMMIT") + RFQ_I)
    assert not scan.suspect
    scan.feed(tag("BEGIN") + RFQ_T + tag("SET") + RFQ_T + tag("ROLLBACK") + RFQ_I)
    assert not scan.suspect
    scan.feed(tag("SET") + RFQ_I)
    assert scan.suspect


def test_other_state_tags_count_inside_a_transaction_block_too() -> None:
    scan = guarded_scanner()
    scan.feed(tag("BEGIN") + RFQ_T + tag("LISTEN") + RFQ_T)
    assert scan.suspect  # (the pool checks at the release: after COMMIT)


def test_hidden_replies_are_never_suspect() -> None:
    scan = guarded_scanner()
    scan.hidden = 1  # (pgproxy's own SETs: parameter sync)
    scan.feed(tag("SET") + RFQ_I + CC + RFQ_I)
    assert not scan.suspect and scan.ready == 1


def test_a_suspect_tag_split_between_chunks() -> None:
    scan = guarded_scanner()
    data = CC + RFQ_I + tag("LISTEN") + RFQ_I
    for cut in range(len(CC + RFQ_I) + 1, len(data)):
        scan = guarded_scanner()
        scan.feed(data[:cut])
        scan.feed(data[cut:])
        assert scan.suspect, cut


def test_without_the_guard_nothing_is_suspect() -> None:
    scan = BackendScanner()
    scan.feed(tag("LISTEN") + RFQ_I + tag("SET") + RFQ_I)
    assert not scan.suspect and scan.quick
    scan = guarded_scanner()
    scan.feed(tag("LISTEN") + RFQ_I)
    scan.guard(False)
    assert not scan.suspect


def test_a_malformed_command_complete_is_reported_by_the_quick_walks_too() -> None:
    for guarded, named in ((True, False), (False, True), (True, True)):
        scan = BackendScanner()
        scan.guard(guarded)
        if named:
            statements = ServerStatements(Registry(), PoolStats(), 10)
            scan.statements, scan.ledger = statements, statements.ledger
        scan.feed(RFQ_I + header(b"C", 2) + b"xxxxxx")
        assert scan.error == "invalid message length 2 from server", (guarded, named)
