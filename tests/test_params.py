"""Tracked parameters: values per client/server and the SETs that reconcile them."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgproxy.core import params
from pgproxy.core.params import EMPTY, TRACKED, from_pairs, sync_sql, tracked_index, with_value
from pgproxy.protocol.messages import from_wire


def test_tracked_names_and_empty_values() -> None:
    assert TRACKED == (
        "client_encoding",
        "DateStyle",
        "TimeZone",
        "IntervalStyle",
        "standard_conforming_strings",
        "application_name",
    )
    assert len(EMPTY) == len(TRACKED)
    assert set(EMPTY) == {""}


@pytest.mark.parametrize("name", ["DateStyle", "datestyle", "DATESTYLE", "dAtEsTyLe"])
def test_tracked_index_is_case_insensitive(name: str) -> None:
    assert tracked_index(name) == 1


def test_tracked_index_of_untracked_names() -> None:
    assert tracked_index("search_path") is None
    assert tracked_index("") is None
    assert tracked_index("DateStyle ") is None


@pytest.mark.parametrize("name", ["TimeZone", "timezone", "TIMEZONE"])
def test_with_value_is_case_insensitive(name: str) -> None:
    values = with_value(EMPTY, name, "UTC")
    assert values[TRACKED.index("TimeZone")] == "UTC"
    assert sum(1 for value in values if value) == 1


def test_with_value_returns_the_same_tuple_when_nothing_changes() -> None:
    values = with_value(EMPTY, "application_name", "psql")
    assert with_value(values, "APPLICATION_NAME", "psql") is values
    assert with_value(values, "search_path", "public") is values
    changed = with_value(values, "application_name", "other")
    assert changed is not values
    assert changed[5] == "other"
    assert values[5] == "psql"  # tuples are immutable: the original is untouched


def test_from_pairs() -> None:
    base = with_value(EMPTY, "client_encoding", "UTF8")
    values = from_pairs(
        {
            "user": "alice",
            "database": "appdb",
            "datestyle": "ISO, DMY",
            "Application_Name": "app",
            "options": "-c work_mem=64MB",
        },
        base,
    )
    assert values == ("UTF8", "ISO, DMY", "", "", "", "app")
    assert from_pairs({}) == EMPTY
    assert from_pairs({"user": "x"}, base) is base


def test_from_pairs_later_spelling_wins() -> None:
    assert from_pairs({"TimeZone": "UTC", "timezone": "Europe/Paris"})[2] == "Europe/Paris"


def test_sync_sql_none_when_equal() -> None:
    values = from_pairs({"TimeZone": "UTC", "application_name": "x"})
    assert sync_sql(values, values) is None
    assert sync_sql(EMPTY, EMPTY) is None
    assert sync_sql(values, tuple(values)) is None


def test_sync_sql_only_differences_in_tracked_order() -> None:
    client = from_pairs({"application_name": "app", "TimeZone": "UTC", "DateStyle": "ISO"})
    server = from_pairs({"application_name": "other", "TimeZone": "UTC"})
    assert sync_sql(client, server) == "SET DateStyle TO 'ISO';SET application_name TO 'app'"


def test_sync_sql_single_quotes_are_doubled() -> None:
    client = with_value(EMPTY, "application_name", "O'Brien's app")
    assert sync_sql(client, EMPTY) == "SET application_name TO 'O''Brien''s app'"


def test_sync_sql_backslashes_use_escape_string() -> None:
    client = with_value(EMPTY, "application_name", "C:\\tmp\\it's")
    # E'' syntax means the same whatever standard_conforming_strings is.
    assert sync_sql(client, EMPTY) == "SET application_name TO E'C:\\\\tmp\\\\it''s'"


def test_sync_sql_writes_bytes_that_are_not_utf8_as_hex_escapes() -> None:
    """A startup value's bytes that are not UTF-8 cannot go into SQL (PostgreSQL checks
    query text against its encoding): each goes as the characters \\xNN, which is what
    PostgreSQL 16 and later make of them in an application_name themselves."""
    value = from_wire(b"caf\xe9 \xff'")
    client = with_value(EMPTY, "application_name", value)
    sql = sync_sql(client, EMPTY)
    assert sql == r"SET application_name TO E'caf\\xe9 \\xff'''"
    assert sql.isascii()
    # Valid UTF-8 is sent as it is (PostgreSQL cleans an application_name itself).
    assert sync_sql(with_value(EMPTY, "application_name", "café"), EMPTY) == (
        "SET application_name TO 'café'"
    )


def test_sync_sql_empty_value() -> None:
    server = with_value(EMPTY, "application_name", "old")
    assert sync_sql(EMPTY, server) == "SET application_name TO ''"


def test_sync_sql_needs_full_tuples() -> None:
    with pytest.raises(ValueError):
        sync_sql(EMPTY, EMPTY[:-1])


def decode_literal(literal: str) -> str:
    """PostgreSQL's lexer for one '...' (standard) or E'...' (escape) string literal."""
    escape = literal.startswith("E'")
    body = literal[2:] if escape else literal[1:]
    out: list[str] = []
    i = 0
    while True:
        char = body[i]
        if escape and char == "\\":
            out.append(body[i + 1])  # sync_sql only ever escapes '\' itself
            i += 2
        elif char == "'":
            if body[i + 1 : i + 2] == "'":
                out.append("'")
                i += 2
            else:
                assert i == len(body) - 1, "the literal ends before the statement does"
                return "".join(out)
        else:
            out.append(char)
            i += 1


VALUE = st.text(
    alphabet=st.characters(exclude_categories=("Cs",), exclude_characters="\0"), max_size=30
) | st.sampled_from(["\\", "'", "\\'", "''", "\\\\", "it's \\n"])


@settings(max_examples=200, deadline=None)
@given(name=st.sampled_from(TRACKED), value=VALUE)
def test_sync_sql_literal_reads_back_as_the_value(name: str, value: str) -> None:
    client = with_value(EMPTY, name, value)
    server = with_value(EMPTY, name, value + "x")
    sql = sync_sql(client, server)
    prefix = f"SET {name} TO "
    assert sql is not None and sql.startswith(prefix)
    assert decode_literal(sql[len(prefix) :]) == value


@settings(max_examples=100, deadline=None)
@given(
    pairs=st.lists(
        st.tuples(
            st.sampled_from([*TRACKED, *(n.upper() for n in TRACKED), "search_path", "user"]),
            st.text(max_size=5),
        ),
        max_size=12,
    )
)
def test_with_value_then_sync_reaches_the_client_values(pairs: list[tuple[str, str]]) -> None:
    client = EMPTY
    for name, value in pairs:
        client = with_value(client, name, value)
    expected = {}
    for name, value in pairs:
        index = tracked_index(name)
        if index is not None:
            expected[index] = value
    assert client == tuple(expected.get(i, "") for i in range(len(TRACKED)))
    sql = sync_sql(client, EMPTY)
    assert (sql is None) == (client == EMPTY)
    for index, name in enumerate(TRACKED):
        assert (sql is not None and f"SET {name} TO " in sql) == (client[index] != "")
    assert params.sync_sql(client, client) is None


def test_startup_settings_follow_pgbouncer() -> None:
    from pgproxy.core.params import UnsupportedParameter, startup_settings

    none: frozenset[str] = frozenset()
    params = {
        "user": "u",
        "database": "d",
        "application_name": "app",
        "TimeZone": "UTC",
        "options": r"-c DateStyle=ISO,\ DMY --intervalstyle=iso_8601 -cclient_encoding=LATIN1",
    }
    assert startup_settings(params, none) == {
        "application_name": "app",
        "TimeZone": "UTC",
        "DateStyle": "ISO, DMY",
        "intervalstyle": "iso_8601",
        "client_encoding": "LATIN1",
    }
    with pytest.raises(
        UnsupportedParameter, match="unsupported startup parameter: extra_float_digits"
    ):
        startup_settings({"extra_float_digits": "3"}, none)
    assert startup_settings({"Extra_Float_Digits": "3"}, frozenset({"extra_float_digits"})) == {}
    with pytest.raises(UnsupportedParameter, match="in options: search_path"):
        startup_settings({"options": "-c search_path=x"}, none)
    assert startup_settings({"options": "-c search_path=x"}, frozenset({"options"})) == {}
    for bad in ("-x", "-c", "--nothing", "-c =v"):
        with pytest.raises(UnsupportedParameter, match="only '-c config=val'"):
            startup_settings({"options": bad}, frozenset({"options"}))
