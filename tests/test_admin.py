"""Unit tests for the console's sans-I/O parts: the command grammar, result encoding, and
the statistics arithmetic behind SHOW STATS."""

from __future__ import annotations

import struct

import pytest

from pgproxy.config import ConfigError, Settings, changed_setting
from pgproxy.services.admin.parse import Command, ConsoleSyntaxError, SetCommand, parse_command
from pgproxy.services.admin.resultset import INT4, NUMERIC, TEXT, columns, data_row, result
from pgproxy.stats import PoolStats, StatsWindow, Totals


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("SHOW POOLS", Command("show", "POOLS")),
        ("  show pools ;  ", Command("show", "pools")),
        ("select stats;", Command("select", "stats")),
        ("KILL_CLIENT 12", Command("kill_client", "12")),
        ('PAUSE "my ""odd"" db"', Command("pause", 'my "odd" db')),
        ("RELOAD", Command("reload", "")),
        ("SHUTDOWN WAIT_FOR_CLIENTS", Command("shutdown", "WAIT_FOR_CLIENTS")),
        ("set default_pool_size = 5", SetCommand("default_pool_size", "5")),
        ("SET Default_Pool_Size TO 7;", SetCommand("default_pool_size", "7")),
        (
            "SET server_reset_query = 'DISCARD ''ALL'''",
            SetCommand("server_reset_query", "DISCARD 'ALL'"),
        ),
        ("SET server_check_query = ''", SetCommand("server_check_query", "")),
    ],
)
def test_commands_parse_as_pgbouncer_reads_them(query: str, expected: object) -> None:
    assert parse_command(query) == expected


@pytest.mark.parametrize(
    "query",
    ["", ";", "SHOW POOLS; SHOW STATS", "SHOW POOLS extra", "PAUSE my-db", "SET = 5"],
)
def test_non_commands_are_syntax_errors(query: str) -> None:
    with pytest.raises(ConsoleSyntaxError):
        parse_command(query)


def test_result_set_encoding() -> None:
    cols = columns("siN", "name", "count", "total")
    assert [(c.name, c.type_oid) for c in cols] == [
        ("name", TEXT),
        ("count", INT4),
        ("total", NUMERIC),
    ]
    row = data_row(["a", 5, None])
    assert row[:1] == b"D"
    assert struct.unpack_from("!Ih", row, 1) == (len(row) - 1, 3)
    # "a" (len 1), "5" (len 1), NULL (-1)
    assert row[7:] == b"\x00\x00\x00\x01a\x00\x00\x00\x015\xff\xff\xff\xff"
    whole = result(cols, [["a", 5, 1]])
    assert whole.startswith(b"T") and whole.endswith(b"C\x00\x00\x00\x09SHOW\x00")
    with pytest.raises(ValueError):
        columns("s", "a", "b")


def test_averages_follow_pgbouncer() -> None:
    stats = PoolStats()
    window = StatsWindow(100.0)  # an empty snapshot at 99 and at 100
    stats.xact_count = stats.query_count = stats.server_assignment_count = 20
    stats.received_bytes = 2000
    stats.xact_time = 0.5  # seconds over 20 transactions: 25 ms each
    stats.query_time = 0.25
    stats.wait_time = 0.02
    stats.bind_count = 10
    live = Totals.of(stats)
    assert live.figures() == [20, 20, 20, 2000, 0, 500000, 250000, 20000, 0, 0, 10]
    older = window.older_totals("pool")
    # 10 seconds since the older snapshot: rates per second, times per transaction/query.
    assert live.averages(older, 10.0) == [2, 2, 2, 200, 0, 25000, 12500, 1000, 0, 0, 1]
    assert Totals().averages(Totals(), 0.0) == [0] * 11
    window.snapshot(101.0, [("pool", stats)])
    assert window.older_at == 100.0 and window.newer_at == 101.0
    assert window.older_totals("pool") == Totals()  # the empty snapshot is now the older
    window.snapshot(161.0, [("pool", stats)])
    assert window.older_totals("pool") == live
    assert window.due(221.0, 60.0) and not window.due(200.0, 60.0)


def test_changed_setting_validates_like_the_file() -> None:
    settings = Settings(databases={"db": {"password": "secret"}})
    changed = changed_setting(settings, "DEFAULT_POOL_SIZE", "3")
    assert changed.default_pool_size == 3
    assert changed.databases["db"].password is not None
    assert changed.databases["db"].password.get_secret_value() == "secret"
    assert changed_setting(settings, "admin_users", "a, b").admin_users == ["a", "b"]
    for key, value, message in [
        ("default_pool_size", "many", "default_pool_size"),
        ("no_such_key", "1", "no_such_key: unknown setting"),
        ("listen_port", "7000", "listen_port: cannot be changed without a restart"),
        ("databases", "x", "databases: unknown setting"),
    ]:
        with pytest.raises(ConfigError, match=message):
            changed_setting(settings, key, value)
