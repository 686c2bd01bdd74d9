"""pgproxy.core.state_guard without a server: the check's SQL, reading its replies, comparing."""

from __future__ import annotations

import json

from pgproxy.core import params as tracked
from pgproxy.core.state_guard import (
    COUNTED_KINDS,
    KINDS,
    RecentLeaks,
    SessionState,
    StateLeak,
    changes,
    check_query,
    parse_check,
)
from pgproxy.protocol import messages
from pgproxy.protocol.messages import message


def data_row(*values: str | None) -> bytes:
    parts = [len(values).to_bytes(2, "big")]
    for value in values:
        if value is None:
            parts.append((-1).to_bytes(4, "big", signed=True))
        else:
            raw = value.encode()
            parts.append(len(raw).to_bytes(4, "big") + raw)
    return message(b"D", b"".join(parts))


def reply(timeouts: tuple[str | None, ...], counts: tuple[str, ...], settings: str | None) -> bytes:
    description = message(b"T", b"\0\x01x\0" + b"\0" * 18)
    return (
        description + data_row(*timeouts) + message(b"C", b"SELECT 1\0")
        + message(b"C", b"SET\0") + message(b"C", b"SET\0")
        + description + data_row(*counts, settings) + message(b"C", b"SELECT 1\0")
        + messages.ready_for_query(b"I")
    )  # fmt: skip


def test_the_check_reads_the_timeouts_first_then_turns_them_off() -> None:
    sql = check_query("15.18 (Debian 15.18-0+deb12u1)")
    first, rest = sql.split(";", 1)
    assert "current_setting('statement_timeout', true)" in first
    assert "SET LOCAL statement_timeout = 0;" in rest
    assert "SET LOCAL lock_timeout = 0;" in rest
    assert "transaction_timeout = 0" not in rest  # (PostgreSQL 17 and later only)
    assert "SET LOCAL transaction_timeout = 0;" in check_query("17.2")
    for name in tracked.TRACKED:  # pgproxy carries them: no leak
        assert f"'{name.lower()}'" in sql
    assert "pg_catalog.pg_advisory" not in sql and "locktype = 'advisory'" in sql


def test_parse_check() -> None:
    found = parse_check(
        reply(("1ms", "0", None), ("1", "0", "2", "0", "1"), json.dumps({"search_path": "x"}))
    )
    assert isinstance(found, SessionState)
    assert found.counts == (1, 0, 2, 0, 1)
    assert found.settings == {"search_path": "x", "statement_timeout": "1ms", "lock_timeout": "0"}
    empty = parse_check(reply(("0", "0", None), ("0",) * 5, None))
    assert isinstance(empty, SessionState) and empty.counts == (0,) * 5


def test_parse_check_failures() -> None:
    error = messages.error_response("42501", "permission denied for view pg_settings")
    assert parse_check(error + messages.ready_for_query(b"I")) == (
        "permission denied for view pg_settings"
    )
    assert parse_check(messages.ready_for_query(b"I")) == "unexpected reply"
    assert parse_check(b"D\0\0\0\x40short") == "malformed reply"
    bad = reply(("0", "0", None), ("x",) * 5, None)
    assert parse_check(bad) == "unexpected reply"


def state(counts: tuple[int, ...] = (0,) * 5, **settings: str) -> SessionState:
    return SessionState(counts, {"statement_timeout": "0", **settings})


def test_changes_reports_what_grew_or_changed() -> None:
    clean = state()
    assert changes(clean, clean, clean) == []
    left = changes(clean, state((1, 0, 0, 2, 0), search_path="x", work_mem="8MB"), clean)
    assert left == [("set", "search_path, work_mem"), ("listen", "1 more, 1 on the server"),
                    ("temp_table", "2 more, 2 on the server")]  # fmt: skip
    # Fewer (UNLISTEN, DEALLOCATE, a dropped table) is no leak.
    assert changes(state((2, 1, 1, 1, 1)), state((1, 0, 0, 0, 0)), clean) == []


def test_undoing_an_earlier_leak_is_no_leak() -> None:
    clean = state(search_path="app")  # (connect_query's)
    before = state(search_path="x", statement_timeout="1ms")
    assert changes(before, state(search_path="app"), clean) == []  # back to clean
    assert changes(before, state(search_path="y"), clean) == [("set", "search_path")]
    # Taking away what connect_query set changes what the next client gets: a leak.
    assert changes(clean, state(), clean) == [("set", "search_path")]


def test_kinds() -> None:
    assert tuple(KINDS) == ("set", *COUNTED_KINDS)
    assert COUNTED_KINDS == ("listen", "prepare", "cursor", "temp_table", "advisory_lock")


def test_recent_leaks_one_entry_per_client_and_kind() -> None:
    recent = RecentLeaks(limit=2)

    def leak(client: int, kind: str, at: float) -> StateLeak:
        return StateLeak(client, "u", "db", "app", None, kind, "d", "kept", at, at)

    assert recent.add(leak(1, "set", 1.0))
    assert not recent.add(leak(1, "set", 2.0))
    entry = recent.entries[(1, "set")]
    assert (entry.count, entry.first_seen, entry.last_seen) == (2, 1.0, 2.0)
    assert recent.add(leak(2, "set", 3.0))
    assert recent.add(leak(3, "listen", 4.0))  # the oldest goes
    assert list(recent.entries) == [(2, "set"), (3, "listen")]
