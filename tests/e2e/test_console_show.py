"""The admin console's SHOW side and its access control, end to end: psql, psycopg and raw
protocol messages against a real pgproxy in front of a real PostgreSQL.

The column lists below are PgBouncer 1.25.2's, in wire order (see
``/work/shared/pgbouncer-console.md``): tools written for PgBouncer read them by name or by
position, so the names, the order and the type OIDs must match exactly.

Console sessions go through ``conn.pgconn.exec_()``: libpq's ``PQexec`` always sends one
simple Query ('Q') message, and its result keeps the raw text of every value and the type
OID of every column. (psycopg's ``ClientCursor`` also sends 'Q'; the default cursor sends
Parse/Bind/Execute as soon as a query has parameters or is prepared, which the console
refuses, as PgBouncer does.)

One proxy serves the whole module. Each test that measures counters or pool states uses a
database entry of its own (all of them PostgreSQL's ``appdb``), so the tests do not see
each other's traffic.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import struct
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import pq

from pgproxy import __version__
from pgproxy.embedded import EmbeddedPostgres
from tests.support import ProxyFactory, ProxyProcess, conninfo, proxy_config, psql

ADMIN = "admin"
STATS = "stats"
STRANGER = "app"  # a real role, but in neither admin_users nor stats_users
#: A password that only the configuration holds: no console answer may contain it.
GHOST_PASSWORD = "ghost-Pw-7f3a9c"
APP_PASSWORD = "app-secret"
#: Upper bound of every wait for something that should happen promptly.
PROMPT = 10.0
STATS_PERIOD = 1

TEXT, INT4, NUMERIC = 25, 23, 1700

# -- PgBouncer 1.25.2's columns, in wire order (/work/shared/pgbouncer-console.md) ----------

POOLS_COLUMNS = [
    "database", "user", "cl_active", "cl_waiting", "cl_active_cancel_req",
    "cl_waiting_cancel_req", "sv_active", "sv_active_cancel", "sv_being_canceled", "sv_idle",
    "sv_used", "sv_tested", "sv_login", "maxwait", "maxwait_us", "pool_mode",
    "load_balance_hosts",
]  # fmt: skip
STATS_COLUMNS = [
    "database", "total_server_assignment_count", "total_xact_count", "total_query_count",
    "total_received", "total_sent", "total_xact_time", "total_query_time", "total_wait_time",
    "total_client_parse_count", "total_server_parse_count", "total_bind_count",
    "avg_server_assignment_count", "avg_xact_count", "avg_query_count", "avg_recv",
    "avg_sent", "avg_xact_time", "avg_query_time", "avg_wait_time", "avg_client_parse_count",
    "avg_server_parse_count", "avg_bind_count",
]  # fmt: skip
STATS_TOTALS_COLUMNS = [
    "database", "server_assignment_count", "xact_count", "query_count", "bytes_received",
    "bytes_sent", "xact_time", "query_time", "wait_time", "client_parse_count",
    "server_parse_count", "bind_count",
]  # fmt: skip
STATS_AVERAGES_COLUMNS = [
    "database", "server_assignment_count", "xact_count", "query_count", "bytes_received",
    "bytes_sent", "xact_time", "query_time", "wait_time", "avg_client_parse_count",
    "avg_server_parse_count", "avg_bind_count",
]  # fmt: skip
TOTALS_COLUMNS = ["name", "value"]
_TOTALS_FIGURES = [
    "server_assignment_count", "xact_count", "query_count", "client_bytes", "server_bytes",
    "xact_time", "query_time", "wait_time", "ps_client_parse_count", "ps_server_parse_count",
    "ps_bind_count",
]  # fmt: skip
TOTALS_ROWS = ["total_" + name for name in _TOTALS_FIGURES] + [
    "avg_" + name for name in _TOTALS_FIGURES
]
SOCKET_COLUMNS = [
    "type", "user", "database", "replication", "state", "addr", "port", "local_addr",
    "local_port", "connect_time", "request_time", "wait", "wait_us", "close_needed", "ptr",
    "link", "remote_pid", "tls", "application_name", "prepared_statements", "id",
]  # fmt: skip
CLIENTS_COLUMNS = SERVERS_COLUMNS = SOCKET_COLUMNS
#: SHOW SOCKETS / ACTIVE_SOCKETS: the CLIENTS columns plus PgBouncer's buffer positions.
DEBUG_SOCKET_COLUMNS = [
    *SOCKET_COLUMNS,
    "recv_pos", "pkt_pos", "pkt_remain", "send_pos", "send_remain", "pkt_avail", "send_avail",
]  # fmt: skip
DATABASES_COLUMNS = [
    "name", "host", "port", "database", "force_user", "pool_size", "min_pool_size",
    "reserve_pool_size", "server_lifetime", "pool_mode", "load_balance_hosts",
    "max_connections", "current_connections", "max_client_connections",
    "current_client_connections", "paused", "disabled",
]  # fmt: skip
USERS_COLUMNS = [
    "name", "pool_size", "reserve_pool_size", "pool_mode", "max_user_connections",
    "current_connections", "max_user_client_connections", "current_client_connections",
]  # fmt: skip
LISTS_COLUMNS = ["list", "items"]
LISTS_ROWS = [
    "databases", "users", "peers", "pools", "peer_pools", "free_clients", "used_clients",
    "login_clients", "free_servers", "used_servers", "dns_names", "dns_zones", "dns_queries",
    "dns_pending",
]  # fmt: skip
STATE_COLUMNS = ["key", "value"]
CONFIG_COLUMNS = ["key", "value", "default", "changeable"]
PEERS_COLUMNS = ["peer_id", "host", "port", "pool_size"]
PEER_POOLS_COLUMNS = [
    "peer_id", "cl_active_cancel_req", "cl_waiting_cancel_req", "sv_active_cancel", "sv_login",
]  # fmt: skip
VERSION_COLUMNS = ["version"]
MEM_COLUMNS = ["name", "size", "used", "free", "memtotal"]
DNS_HOSTS_COLUMNS = ["hostname", "ttl", "addrs"]
DNS_ZONES_COLUMNS = ["zonename", "serial", "count"]
POOL_STATS_KEYS = [
    "pool_min", "pool_max", "pool_size", "pool_available", "requests_waiting", "usage_ms",
    "requests_num", "requests_queued", "requests_wait_ms", "requests_errors", "returns_bad",
    "connections_num", "connections_ms", "connections_errors", "connections_lost",
]  # fmt: skip
POOL_STATS_COLUMNS = ["database", "user", *POOL_STATS_KEYS]

#: Column types, one letter per column as PgBouncer writes them: s text, i int4, N numeric.
TYPE_LETTERS = {"s": TEXT, "i": INT4, "N": NUMERIC}
SOCKET_TYPES = "ssssssisissiiississii"
COLUMN_TYPES: dict[str, str] = {
    "POOLS": "ss" + "i" * 13 + "ss",
    "STATS": "s" + "N" * 22,
    "STATS_TOTALS": "s" + "N" * 11,
    "STATS_AVERAGES": "s" + "N" * 11,
    "TOTALS": "sN",
    "CLIENTS": SOCKET_TYPES,
    "SERVERS": SOCKET_TYPES,
    "DATABASES": "ssissiiiissiiiiii",
    "USERS": "ssssiiii",
    "LISTS": "si",
    "STATE": "ss",
    "CONFIG": "ssss",
    "VERSION": "s",
    "PEERS": "isii",
}

#: Every SHOW command of the spec with its columns.
SHOW_COLUMNS: dict[str, list[str]] = {
    "POOLS": POOLS_COLUMNS,
    "STATS": STATS_COLUMNS,
    "STATS_TOTALS": STATS_TOTALS_COLUMNS,
    "STATS_AVERAGES": STATS_AVERAGES_COLUMNS,
    "TOTALS": TOTALS_COLUMNS,
    "CLIENTS": CLIENTS_COLUMNS,
    "SERVERS": SERVERS_COLUMNS,
    "DATABASES": DATABASES_COLUMNS,
    "USERS": USERS_COLUMNS,
    "CONFIG": CONFIG_COLUMNS,
    "LISTS": LISTS_COLUMNS,
    "STATE": STATE_COLUMNS,
    "VERSION": VERSION_COLUMNS,
    "SOCKETS": DEBUG_SOCKET_COLUMNS,
    "ACTIVE_SOCKETS": DEBUG_SOCKET_COLUMNS,
    "PEERS": PEERS_COLUMNS,
    "PEER_POOLS": PEER_POOLS_COLUMNS,
    "MEM": MEM_COLUMNS,
    "DNS_HOSTS": DNS_HOSTS_COLUMNS,
    "DNS_ZONES": DNS_ZONES_COLUMNS,
    "POOL_STATS": POOL_STATS_COLUMNS,
}
#: SHOW commands that answer with no rows in pgproxy (no peers, no DNS cache).
EMPTY_SHOWS = ["PEERS", "PEER_POOLS", "DNS_HOSTS", "DNS_ZONES"]

DATE = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2} [A-Za-z0-9+:-]+$")
POINTER = re.compile(r"^(0x)?[0-9a-fA-F]+$")


# -- the proxy --------------------------------------------------------------------------------


def _entry(pg: EmbeddedPostgres, **extra: Any) -> dict[str, Any]:
    """A database entry for PostgreSQL's appdb, logging in as ``app``."""
    return {
        "host": "127.0.0.1",
        "port": pg.port,
        "dbname": "appdb",
        "user": "app",
        "password": APP_PASSWORD,
        **extra,
    }


@pytest.fixture(scope="module")
def socket_dir() -> Iterator[Path]:
    """A short temp dir for the proxy's Unix socket (socket paths are limited to ~100 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="pgproxy-show-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def proxy(
    pg: EmbeddedPostgres, module_proxy_factory: ProxyFactory, socket_dir: Path
) -> ProxyProcess:
    """Transaction mode, stats every second, one database entry per test that counts."""
    databases = {
        "appdb": _entry(pg),
        "statsdb": _entry(pg),  # the counter workload
        "avgdb": _entry(pg),  # the averages workload
        "waitdb": _entry(pg, pool_size=1),  # a client waits for the one server
        "usersdb": _entry(pg, pool_mode="session"),  # clients of the user "reporting"
        # Never used: it holds a password that must not show anywhere.
        "ghostdb": _entry(
            pg,
            password=GHOST_PASSWORD,
            pool_size=3,
            reserve_pool_size=2,
            server_lifetime=1234,
            max_db_connections=6,
            max_db_client_connections=8,
        ),
    }
    config = proxy_config(
        pg,
        pool_mode="transaction",
        admin_users=[ADMIN],
        stats_users=[STATS],
        stats_period=STATS_PERIOD,
        unix_socket_dir=str(socket_dir),
        databases=databases,
        users={
            "reporting": {
                "pool_mode": "session",
                "pool_size": 4,
                "reserve_pool_size": 2,
                "max_user_connections": 9,
                "max_user_client_connections": 7,
            }
        },
    )
    return module_proxy_factory(config)


# -- console helpers --------------------------------------------------------------------------


@dataclass
class Result:
    """One console answer: raw text values exactly as sent, and the column type OIDs."""

    columns: list[str]
    types: list[int]
    rows: list[list[str | None]]
    tag: str

    def dicts(self) -> list[dict[str, str | None]]:
        return [dict(zip(self.columns, row, strict=True)) for row in self.rows]

    def keyed(self, *keys: str) -> dict[Any, dict[str, str | None]]:
        """Rows by the value of ``keys`` (one key: the value; several: a tuple)."""
        out: dict[Any, dict[str, str | None]] = {}
        for row in self.dicts():
            key = row[keys[0]] if len(keys) == 1 else tuple(row[k] for k in keys)
            assert key not in out, f"two rows for {key!r}: {self.rows}"
            out[key] = row
        return out


class ConsoleError(Exception):
    """An ErrorResponse from the console."""

    def __init__(self, sqlstate: str, message: str, severity: str) -> None:
        super().__init__(f"{severity} {sqlstate} {message}")
        self.sqlstate = sqlstate
        self.message = message
        self.severity = severity


def _field(res: pq.PGresult, field: pq.DiagnosticField) -> str:
    value = res.error_field(field)
    return value.decode() if value is not None else ""


def console_connect(
    proxy: ProxyProcess, user: str = ADMIN, dbname: str = "pgbouncer", **kwargs: Any
) -> psycopg.Connection[Any]:
    """A psycopg console session (autocommit: psycopg sends nothing on its own)."""
    kwargs.setdefault("connect_timeout", 5)
    return psycopg.connect(proxy.dsn(dbname=dbname, user=user), autocommit=True, **kwargs)


def run(conn: psycopg.Connection[Any], sql: str) -> Result:
    """``sql`` as one simple Query message; raises ConsoleError for an ErrorResponse."""
    res = conn.pgconn.exec_(sql.encode())
    if res.status == pq.ExecStatus.FATAL_ERROR:
        raise ConsoleError(
            _field(res, pq.DiagnosticField.SQLSTATE),
            _field(res, pq.DiagnosticField.MESSAGE_PRIMARY),
            _field(res, pq.DiagnosticField.SEVERITY_NONLOCALIZED),
        )
    assert res.status in (pq.ExecStatus.TUPLES_OK, pq.ExecStatus.COMMAND_OK), res.status
    columns = [(res.fname(i) or b"").decode() for i in range(res.nfields)]
    types = [res.ftype(i) for i in range(res.nfields)]
    rows: list[list[str | None]] = []
    for r in range(res.ntuples):
        row: list[str | None] = []
        for c in range(res.nfields):
            value = res.get_value(r, c)
            row.append(None if value is None else value.decode())
        rows.append(row)
    return Result(columns, types, rows, (res.command_status or b"").decode())


def console_rows(
    proxy: ProxyProcess, sql: str, user: str = ADMIN
) -> tuple[list[str], list[int], list[list[str | None]]]:
    """(columns, type OIDs, rows) of ``sql`` in a fresh console session of ``user``."""
    with console_connect(proxy, user) as conn:
        result = run(conn, sql)
    return result.columns, result.types, result.rows


def console_error(conn: psycopg.Connection[Any], sql: str) -> ConsoleError:
    """The error ``sql`` answers with; the session must still be usable afterwards."""
    with pytest.raises(ConsoleError) as failed:
        run(conn, sql)
    assert run(conn, "SHOW VERSION").rows, f"the session broke after {sql!r}"
    return failed.value


@pytest.fixture(scope="module")
def admin(proxy: ProxyProcess) -> Iterator[psycopg.Connection[Any]]:
    """One admin console session for the module."""
    with console_connect(proxy) as conn:
        yield conn


def _num(value: str | None) -> Decimal:
    assert value is not None
    return Decimal(value)


def _int(value: str | None) -> int:
    assert value is not None
    return int(value)


def wait_for(
    probe: Callable[[], Any], what: str, seconds: float = PROMPT, interval: float = 0.05
) -> Any:
    """Call ``probe`` until it returns something true; return that (bounded)."""
    deadline = time.monotonic() + seconds
    while True:
        value = probe()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {seconds:g}s waiting for {what}"
        time.sleep(interval)


def client(proxy: ProxyProcess, dbname: str, **kwargs: Any) -> psycopg.Connection[Any]:
    """A pool client (autocommit unless told; never prepares a statement)."""
    user = kwargs.pop("user", "app")
    kwargs.setdefault("autocommit", True)
    kwargs.setdefault("connect_timeout", 5)
    kwargs.setdefault("prepare_threshold", None)
    return psycopg.connect(proxy.dsn(dbname=dbname, user=user), **kwargs)


def _fetch(conn: psycopg.Connection[Any], sql: str) -> Any:
    row = conn.execute(sql).fetchone()
    assert row is not None
    return row[0]


def _local_port(conn: psycopg.Connection[Any]) -> int:
    """The client-side TCP port of a psycopg connection."""
    with socket.fromfd(conn.pgconn.socket, socket.AF_INET, socket.SOCK_STREAM) as sock:
        port: int = sock.getsockname()[1]
    return port


# -- raw protocol (for SQLSTATEs of login errors and for the closing of the session) --------


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def _read(sock: socket.socket) -> tuple[bytes, bytes]:
    header = _recv_exact(sock, 5)
    length = struct.unpack("!I", header[1:])[0]
    return header[:1], _recv_exact(sock, length - 4)


def _error_fields(body: bytes) -> dict[str, str]:
    return {chr(part[0]): part[1:].decode() for part in body.split(b"\0") if part}


def _startup(sock: socket.socket, user: str, dbname: str) -> None:
    params = f"user\0{user}\0database\0{dbname}\0\0".encode()
    sock.sendall(struct.pack("!II", 8 + len(params), 196608) + params)


def _login(port: int, user: str, dbname: str) -> tuple[socket.socket, dict[str, str] | None]:
    """Log in; (socket, None) at ReadyForQuery, or (socket, fields of the ErrorResponse)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=PROMPT)
    _startup(sock, user, dbname)
    while True:
        kind, body = _read(sock)
        if kind == b"E":
            return sock, _error_fields(body)
        if kind == b"Z":
            return sock, None


# -- access -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dbname", ["pgbouncer", "pgproxy"])
def test_admin_user_may_show_and_control(proxy: ProxyProcess, dbname: str) -> None:
    with console_connect(proxy, ADMIN, dbname) as conn:
        assert run(conn, "SHOW POOLS").columns == POOLS_COLUMNS
        assert run(conn, "ENABLE ghostdb").tag == "ENABLE"  # a control command: admin only
        # The welcome a console login gets.
        assert conn.info.parameter_status("server_version") == f"{__version__}/pgproxy"
        assert conn.info.parameter_status("client_encoding") == "UTF8"


@pytest.mark.parametrize("dbname", ["pgbouncer", "pgproxy"])
def test_stats_user_may_show_but_not_control(
    proxy: ProxyProcess, admin: psycopg.Connection[Any], dbname: str
) -> None:
    with console_connect(proxy, STATS, dbname) as conn:
        for what in SHOW_COLUMNS:
            assert run(conn, f"SHOW {what}").columns == SHOW_COLUMNS[what], what
        for command in (
            "PAUSE",
            "PAUSE appdb",
            "RESUME",
            "RELOAD",
            "DISABLE appdb",
            "KILL_CLIENT 1",
            "SET default_pool_size = 1",
            "SET default_pool_size TO '2'",
        ):
            error = console_error(conn, command)
            assert (error.sqlstate, error.message) == ("08P01", "admin access needed"), command
            assert error.severity == "ERROR", command
    # Nothing happened.
    state = run(admin, "SHOW STATE").keyed("key")
    assert {key: row["value"] for key, row in state.items()} == {
        "active": "yes",
        "paused": "no",
        "suspended": "no",
    }
    appdb = run(admin, "SHOW DATABASES").keyed("name")["appdb"]
    assert (appdb["paused"], appdb["disabled"]) == ("0", "0")
    config = run(admin, "SHOW CONFIG").keyed("key")
    assert config["default_pool_size"]["value"] == "5"


@pytest.mark.parametrize("dbname", ["pgbouncer", "pgproxy"])
@pytest.mark.parametrize("user", [STRANGER, "pgbouncer", "nosuchuser"])
def test_other_users_are_refused_at_login(proxy: ProxyProcess, dbname: str, user: str) -> None:
    # (The user "pgbouncer" is admin only over the Unix socket: over TCP it is nobody.)
    sock, error = _login(proxy.port, user, dbname)
    sock.close()
    assert error is not None, f"{user} logged in to {dbname}"
    assert (error.get("S"), error.get("C"), error.get("M")) == ("FATAL", "28000", "not allowed")


def test_psql_is_refused_for_an_unlisted_user(proxy: ProxyProcess) -> None:
    result = psql(["-c", "SHOW VERSION"], port=proxy.port, dbname="pgbouncer", user=STRANGER)
    assert result.returncode != 0
    assert "not allowed" in result.stderr
    assert result.stdout == ""


def test_pgbouncer_user_over_the_unix_socket_is_admin(
    proxy: ProxyProcess, socket_dir: Path
) -> None:
    assert (socket_dir / f".s.PGSQL.{proxy.port}").exists()

    def over_unix(user: str) -> psycopg.Connection[Any]:
        dsn = conninfo(host=str(socket_dir), port=proxy.port, dbname="pgbouncer", user=user)
        return psycopg.connect(dsn, autocommit=True, connect_timeout=5)

    with over_unix("pgbouncer") as conn:
        assert run(conn, "SHOW VERSION").rows[0][0] == f"PgBouncer 1.25.2 (pgproxy {__version__})"
        assert run(conn, "DISABLE ghostdb").tag == "DISABLE"
        assert run(conn, "SHOW DATABASES").keyed("name")["ghostdb"]["disabled"] == "1"
        assert run(conn, "ENABLE ghostdb").tag == "ENABLE"
        assert run(conn, "SHOW DATABASES").keyed("name")["ghostdb"]["disabled"] == "0"
        # Its client row: user pgbouncer over the Unix socket, with this process's pid
        # (PgBouncer's remote_pid of a Unix socket client).
        mine = [
            row
            for row in run(conn, "SHOW CLIENTS").dicts()
            if row["user"] == "pgbouncer" and row["database"] == "pgbouncer"
        ]
        assert len(mine) == 1, mine
        assert mine[0]["addr"] == "unix"
        assert mine[0]["remote_pid"] == str(os.getpid())
    # Anyone else over the socket is still nobody.
    with pytest.raises(psycopg.OperationalError, match="not allowed"):
        over_unix("nosuchuser").close()
    # And an admin user may use the socket too.
    with over_unix(ADMIN) as conn:
        assert run(conn, "SHOW STATE").columns == STATE_COLUMNS


def test_extended_query_protocol_is_refused_and_the_session_closed(proxy: ProxyProcess) -> None:
    with console_connect(proxy) as conn:
        # A parameter makes psycopg's default cursor send Parse/Bind/Describe/Execute/Sync.
        with pytest.raises(psycopg.Error) as refused:
            conn.execute("SHOW %s", ["pools"])
        assert refused.value.diag.sqlstate == "08P01"
        assert (
            refused.value.diag.message_primary
            == "extended query protocol not supported by admin console"
        )
        with pytest.raises(psycopg.OperationalError):
            run(conn, "SHOW VERSION")
    # The same with raw messages: the ErrorResponse, then the server closes the connection.
    sock, error = _login(proxy.port, ADMIN, "pgbouncer")
    with sock:
        assert error is None, error
        query = b"\0SHOW POOLS\0\0\0"  # unnamed statement, no parameter types
        sock.sendall(b"P" + struct.pack("!I", 4 + len(query)) + query + b"S" + struct.pack("!I", 4))
        kind, body = _read(sock)
        assert kind == b"E", (kind, body)
        fields = _error_fields(body)
        assert fields["C"] == "08P01"
        assert fields["M"] == "extended query protocol not supported by admin console"
        kinds = []
        with pytest.raises((EOFError, ConnectionResetError)):
            for _ in range(10):  # at most a FATAL copy of the error before the close
                kinds.append(_read(sock)[0])
        assert set(kinds) <= {b"E"}, kinds


def test_client_cursor_and_exec_send_simple_queries(proxy: ProxyProcess) -> None:
    with console_connect(proxy, cursor_factory=psycopg.ClientCursor) as conn:
        for _ in range(10):  # more than prepare_threshold: never prepared
            cursor = conn.execute("SHOW VERSION")
            assert cursor.fetchall() == [(f"PgBouncer 1.25.2 (pgproxy {__version__})",)]
        assert cursor.description is not None
        assert [(col.name, col.type_code) for col in cursor.description] == [("version", TEXT)]
        assert run(conn, "SHOW STATE").tag == "SHOW"


@pytest.mark.parametrize(
    "command", ["FOO", "FOO BAR", "SHOW NOSUCHTHING", "SHOW POOLS EXTRA WORDS", "select 1"]
)
def test_unknown_command_errors_and_the_session_goes_on(
    admin: psycopg.Connection[Any], command: str
) -> None:
    error = console_error(admin, command)
    assert error.sqlstate == "08P01"
    assert error.severity == "ERROR"
    assert error.message == f"invalid command '{command}', use SHOW HELP;"


def test_unknown_command_through_a_client_cursor(proxy: ProxyProcess) -> None:
    with console_connect(proxy, cursor_factory=psycopg.ClientCursor) as conn:
        with pytest.raises(psycopg.errors.ProtocolViolation) as failed:
            conn.execute("FROB")
        assert failed.value.diag.message_primary == "invalid command 'FROB', use SHOW HELP;"
        assert not conn.closed
        assert conn.execute("SHOW STATE").fetchall()[0] == ("active", "yes")


def test_show_help_through_psql(proxy: ProxyProcess) -> None:
    for user in (ADMIN, STATS):
        result = psql(["-c", "SHOW HELP"], port=proxy.port, dbname="pgbouncer", user=user)
        assert result.returncode == 0, result.stderr
        assert "NOTICE:  Console usage" in result.stderr
        detail = result.stderr.split("DETAIL:", 1)[1]
        for word in ("SHOW", "POOLS", "CLIENTS", "PAUSE", "RESUME", "RELOAD", "KILL"):
            assert word in detail, (word, result.stderr)


def test_show_help_through_psycopg(proxy: ProxyProcess) -> None:
    # (A Diagnostic is only readable inside the handler: keep its fields.)
    notices: list[tuple[str | None, str | None, str | None, str | None]] = []

    def on_notice(diag: psycopg.errors.Diagnostic) -> None:
        notices.append(
            (diag.severity_nonlocalized, diag.sqlstate, diag.message_primary, diag.message_detail)
        )

    with console_connect(proxy, cursor_factory=psycopg.ClientCursor) as conn:
        conn.add_notice_handler(on_notice)
        cursor = conn.execute("SHOW HELP")
        assert cursor.statusmessage == "SHOW"
        assert cursor.description is None  # no rows, no RowDescription
    assert len(notices) == 1, notices
    severity, sqlstate, message, detail = notices[0]
    assert (severity, sqlstate, message) == ("NOTICE", "00000", "Console usage")
    for word in ("SHOW", "POOLS", "STATS", "PAUSE", "RESUME", "KILL_CLIENT", "SET"):
        assert word in (detail or ""), (word, detail)


def test_commands_are_case_insensitive_with_select_alias_and_semicolon(
    admin: psycopg.Connection[Any],
) -> None:
    for query in ("show pools", "SHOW POOLS;", "Show Pools ;", "SELECT POOLS", "select pools;"):
        assert run(admin, query).columns == POOLS_COLUMNS, query
    assert run(admin, "select version").rows == [[f"PgBouncer 1.25.2 (pgproxy {__version__})"]]


def test_fake_parameters(admin: psycopg.Connection[Any]) -> None:
    result = run(admin, "SHOW client_encoding")
    assert result.columns == ["client_encoding"]
    assert len(result.rows) == 1
    notices: list[str] = []

    def on_notice(diag: psycopg.errors.Diagnostic) -> None:
        notices.append(diag.message_primary or "")

    admin.add_notice_handler(on_notice)
    try:
        assert run(admin, "SET client_encoding = 'UTF8'").tag == "SET"
    finally:
        admin.remove_notice_handler(on_notice)
    assert notices == ["SET ignored"]


# -- columns and types of every SHOW -----------------------------------------------------------


@pytest.mark.parametrize("what", list(SHOW_COLUMNS))
def test_show_columns_in_pgbouncer_order(admin: psycopg.Connection[Any], what: str) -> None:
    result = run(admin, f"SHOW {what}")
    assert result.columns == SHOW_COLUMNS[what]
    assert result.tag == "SHOW"
    assert all(len(row) == len(result.columns) for row in result.rows)
    if what in COLUMN_TYPES:
        expected = [TYPE_LETTERS[letter] for letter in COLUMN_TYPES[what]]
        assert dict(zip(result.columns, result.types, strict=True)) == dict(
            zip(result.columns, expected, strict=True)
        )
    if what in EMPTY_SHOWS:
        assert result.rows == []


def test_psql_reads_the_same_columns(proxy: ProxyProcess) -> None:
    result = psql(
        ["--csv", "-c", "SHOW POOLS", "-c", "SHOW STATS", "-c", "SHOW CLIENTS"],
        port=proxy.port,
        dbname="pgbouncer",
        user=STATS,
    )
    assert result.returncode == 0, result.stderr
    headers = [
        line.split(",")
        for line in result.stdout.splitlines()
        if line.startswith("database,") or line.startswith("type,")
    ]
    assert headers[:2] == [POOLS_COLUMNS, STATS_COLUMNS]
    assert headers[2] == CLIENTS_COLUMNS
    result = psql(
        ["-A", "-t", "-F|", "-c", "SHOW VERSION"], port=proxy.port, dbname="pgproxy", user=ADMIN
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"PgBouncer 1.25.2 (pgproxy {__version__})"


def test_no_answer_shows_a_password(proxy: ProxyProcess, admin: psycopg.Connection[Any]) -> None:
    with client(proxy, "appdb") as conn:
        assert _fetch(conn, "select 1") == 1
        for what in SHOW_COLUMNS:
            result = run(admin, f"SHOW {what}")
            for row in result.rows:
                for value in row:
                    assert value is None or (
                        GHOST_PASSWORD not in value and APP_PASSWORD not in value
                    ), (what, row)
    assert GHOST_PASSWORD not in proxy.log_text()
    assert APP_PASSWORD not in proxy.log_text()


# -- SHOW CONFIG, STATE, VERSION ---------------------------------------------------------------


def test_show_config(proxy: ProxyProcess, admin: psycopg.Connection[Any]) -> None:
    result = run(admin, "SHOW CONFIG")
    config = result.keyed("key")  # one row per key
    assert config["default_pool_size"] == {
        "key": "default_pool_size",
        "value": "5",  # the running value (the test config), not the default
        "default": "20",
        "changeable": "yes",
    }
    assert config["pool_mode"]["value"] == "transaction"
    assert config["pool_mode"]["default"] == "session"
    assert config["stats_period"]["value"] == str(STATS_PERIOD)
    assert config["listen_port"]["value"] == str(proxy.port)
    assert config["listen_port"]["changeable"] == "no"
    assert config["max_client_conn"]["value"] == "100"
    assert ADMIN in (config["admin_users"]["value"] or "")
    assert STATS in (config["stats_users"]["value"] or "")
    for row in result.dicts():
        assert row["changeable"] in ("yes", "no"), row


def test_show_state(admin: psycopg.Connection[Any]) -> None:
    result = run(admin, "SHOW STATE")
    assert result.rows == [["active", "yes"], ["paused", "no"], ["suspended", "no"]]


@pytest.mark.parametrize("user", [ADMIN, STATS])
def test_show_version(proxy: ProxyProcess, user: str) -> None:
    columns, types, rows = console_rows(proxy, "SHOW VERSION", user=user)
    assert (columns, types) == (VERSION_COLUMNS, [TEXT])
    assert len(rows) == 1
    version = rows[0][0] or ""
    assert version.startswith("PgBouncer 1.25.2 (pgproxy ")
    assert version == f"PgBouncer 1.25.2 (pgproxy {__version__})"


# -- SHOW DATABASES, USERS, LISTS, POOLS --------------------------------------------------------


def test_show_databases(
    pg: EmbeddedPostgres, proxy: ProxyProcess, admin: psycopg.Connection[Any]
) -> None:
    with client(proxy, "usersdb") as first, client(proxy, "usersdb") as second:
        assert _fetch(first, "select 1") == 1
        assert _fetch(second, "select 2") == 2
        databases = run(admin, "SHOW DATABASES").keyed("name")
        assert set(databases) >= {
            "pgbouncer", "appdb", "statsdb", "avgdb", "waitdb", "usersdb", "ghostdb",
        }  # fmt: skip
        console_db = databases["pgbouncer"]
        assert console_db["port"] == str(proxy.port)
        assert console_db["pool_mode"] == "statement"
        assert console_db["database"] == "pgbouncer"
        ghost = databases["ghostdb"]
        assert (ghost["host"], ghost["port"], ghost["database"], ghost["force_user"]) == (
            "127.0.0.1",
            str(pg.port),
            "appdb",
            "app",
        )
        assert ghost["pool_size"] == "3"
        # The entry's own settings, each in its column.
        assert ghost["min_pool_size"] == "0"
        assert ghost["reserve_pool_size"] == "2"
        assert ghost["server_lifetime"] == "1234"
        assert ghost["max_connections"] == "6"
        assert ghost["max_client_connections"] == "8"
        assert databases["waitdb"]["pool_size"] == "1"
        assert databases["appdb"]["pool_size"] == "5"  # default_pool_size of the config
        assert (ghost["current_connections"], ghost["current_client_connections"]) == ("0", "0")
        assert (ghost["paused"], ghost["disabled"]) == ("0", "0")
        users_db = databases["usersdb"]
        assert users_db["pool_mode"] == "session"
        assert users_db["current_client_connections"] == "2"
        # Session mode: each client holds a server of its own.
        assert users_db["current_connections"] == "2"
        # Session mode: a client linked to its server is active, and so is the server.
        pool = _pool(admin, "usersdb")
        assert (pool["cl_active"], pool["cl_waiting"], pool["sv_active"]) == ("2", "0", "2")
        assert pool["pool_mode"] == "session"
        states = [
            row["state"]
            for row in run(admin, "SHOW CLIENTS").dicts()
            if row["database"] == "usersdb"
        ]
        assert states == ["active", "active"]
    wait_for(
        lambda: (
            run(admin, "SHOW DATABASES").keyed("name")["usersdb"]["current_client_connections"]
            == "0"
        ),
        "the clients of usersdb to be gone from SHOW DATABASES",
    )


def test_show_users(proxy: ProxyProcess, admin: psycopg.Connection[Any]) -> None:
    with client(proxy, "usersdb", user="reporting") as conn:
        assert _fetch(conn, "select current_user") == "app"  # the database's forced user
        users = run(admin, "SHOW USERS").keyed("name")
        reporting = users["reporting"]
        assert (reporting["pool_size"] or "").strip() == "4"  # text, as in PgBouncer
        assert reporting["pool_mode"] == "session"
        assert reporting["max_user_connections"] == "9"
        assert reporting["max_user_client_connections"] == "7"
        assert reporting["current_client_connections"] == "1"
    wait_for(
        lambda: (
            run(admin, "SHOW USERS").keyed("name")["reporting"]["current_client_connections"] == "0"
        ),
        "the client of reporting to be gone from SHOW USERS",
    )

    # app is the server user of every pool: its server count is SHOW SERVERS' row count.
    def app_counts_match() -> bool:
        servers = [row for row in run(admin, "SHOW SERVERS").dicts() if row["user"] == "app"]
        app = run(admin, "SHOW USERS").keyed("name")["app"]
        return app["current_connections"] == str(len(servers))

    wait_for(app_counts_match, "SHOW USERS current_connections of app to match SHOW SERVERS")
    unset = run(admin, "SHOW USERS").keyed("name")["app"]
    assert unset["pool_size"] is None  # not set for this user: NULL
    assert unset["reserve_pool_size"] is None


def test_show_users_reserve_pool_size(admin: psycopg.Connection[Any]) -> None:
    # users.reporting.reserve_pool_size = 2 in the config: PgBouncer shows a user's own
    # setting in this text column (NULL only when the user has none).
    reporting = run(admin, "SHOW USERS").keyed("name")["reporting"]
    assert reporting["reserve_pool_size"] is not None, "reserve_pool_size of reporting is NULL"
    assert reporting["reserve_pool_size"].strip() == "2"


def test_show_lists_counts(proxy: ProxyProcess, admin: psycopg.Connection[Any]) -> None:
    with client(proxy, "appdb") as conn:
        assert _fetch(conn, "select 1") == 1

        def snapshot() -> tuple[dict[str, int], Result, Result, Result, Result] | None:
            lists = run(admin, "SHOW LISTS")
            databases = run(admin, "SHOW DATABASES")
            pools = run(admin, "SHOW POOLS")
            servers = run(admin, "SHOW SERVERS")
            clients = run(admin, "SHOW CLIENTS")
            again = run(admin, "SHOW LISTS")
            if again.rows != lists.rows:
                return None  # something moved meanwhile
            items = {row[0] or "": _int(row[1]) for row in lists.rows}
            return items, databases, pools, servers, clients

        items, databases, pools, servers, clients = wait_for(snapshot, "a stable SHOW LISTS")
        assert list(items) == LISTS_ROWS
        assert items["databases"] == len(databases.rows)
        assert items["pools"] == len(pools.rows)
        assert items["used_servers"] == len(servers.rows) >= 1
        assert items["used_clients"] >= len(clients.rows) >= 2  # this client and the console
        assert items["users"] >= 1
        for name in ("peers", "peer_pools", "dns_names", "dns_zones", "dns_queries"):
            assert items[name] == 0, name
        assert all(count >= 0 for count in items.values())


def _pool(admin: psycopg.Connection[Any], database: str) -> dict[str, str | None]:
    return run(admin, "SHOW POOLS").keyed("database", "user")[(database, "app")]


def _clients_by_app(admin: psycopg.Connection[Any]) -> dict[str, dict[str, str | None]]:
    return {
        row["application_name"] or "": row
        for row in run(admin, "SHOW CLIENTS").dicts()
        if row["database"] != "pgbouncer"
    }


def test_pools_clients_and_servers_while_a_client_waits(
    proxy: ProxyProcess, admin: psycopg.Connection[Any]
) -> None:
    tag = uuid.uuid4().hex[:8]
    holder_name, waiter_name = f"holder-{tag}", f"waiter-{tag}"
    pools = run(admin, "SHOW POOLS").keyed("database", "user")
    console_pool = pools[("pgbouncer", "pgbouncer")]
    assert console_pool["pool_mode"] == "statement"
    assert _int(console_pool["cl_active"]) >= 1  # this console session
    with (
        client(proxy, "waitdb", autocommit=False, application_name=holder_name) as holder,
        client(proxy, "waitdb", application_name=waiter_name) as waiter,
    ):
        backend_pid = _fetch(holder, "select pg_backend_pid()")  # its transaction stays open
        pool = _pool(admin, "waitdb")
        assert pool["pool_mode"] == "transaction"
        assert (pool["cl_active"], pool["cl_waiting"]) == ("2", "0")
        assert (pool["sv_active"], pool["sv_idle"]) == ("1", "0")
        assert (pool["maxwait"], pool["maxwait_us"]) == ("0", "0")
        clients = _clients_by_app(admin)
        assert clients[holder_name]["state"] == "active"
        assert clients[waiter_name]["state"] == "idle"
        (server,) = [
            row for row in run(admin, "SHOW SERVERS").dicts() if row["database"] == "waitdb"
        ]
        assert server["type"] == "S"
        assert server["user"] == "app"
        assert server["state"] == "active"
        assert server["remote_pid"] == str(backend_pid)
        # Linked: each side's link is the other's ptr.
        assert server["link"] == clients[holder_name]["ptr"]
        assert clients[holder_name]["link"] == server["ptr"]
        assert POINTER.match(server["ptr"] or ""), server["ptr"]

        answer: list[Any] = []
        thread = threading.Thread(
            target=lambda: answer.append(_fetch(waiter, "select 42")), daemon=True
        )
        thread.start()
        stats_before = _stats(admin, "waitdb")
        pool = wait_for(
            lambda: (row := _pool(admin, "waitdb"))["cl_waiting"] == "1" and row,
            "SHOW POOLS cl_waiting = 1",
        )
        seen_waiting_at = time.monotonic()
        assert pool["cl_active"] == "1"
        assert (pool["sv_active"], pool["sv_idle"]) == ("1", "0")

        def maxwait_us() -> int:
            row = _pool(admin, "waitdb")
            return _int(row["maxwait"]) * 1_000_000 + _int(row["maxwait_us"])

        first = wait_for(maxwait_us, "maxwait > 0")
        wait_for(lambda: maxwait_us() > first, "maxwait to grow while the client waits")
        waiting = _clients_by_app(admin)[waiter_name]
        assert waiting["state"] == "waiting"
        assert _int(waiting["wait"]) * 1_000_000 + _int(waiting["wait_us"]) > 0
        assert not waiting["link"]
        assert thread.is_alive()

        holder.commit()
        committed_at = time.monotonic()
        thread.join(PROMPT)
        assert answer == [42]

        def settled() -> dict[str, str | None] | None:
            row = _pool(admin, "waitdb")
            done = (row["cl_active"], row["cl_waiting"], row["sv_active"], row["sv_idle"])
            return row if done == ("2", "0", "0", "1") else None

        pool = wait_for(settled, "the pool to settle: 2 idle clients, 1 idle server")
        assert (pool["maxwait"], pool["maxwait_us"]) == ("0", "0")
        clients = _clients_by_app(admin)
        assert clients[holder_name]["state"] == "idle"
        assert clients[waiter_name]["state"] == "idle"
        assert not clients[holder_name]["link"]
        (server,) = [
            row for row in run(admin, "SHOW SERVERS").dicts() if row["database"] == "waitdb"
        ]
        assert server["state"] == "idle"
        assert server["remote_pid"] == str(backend_pid)  # the pool's one server, reused
        assert not server["link"]
    # The waiter waited at least from when SHOW POOLS first saw it waiting until the commit,
    # and the holder's transaction lasted at least as long (µs).
    waited_us = int((committed_at - seen_waiting_at) * 1_000_000)
    stats_after = wait_for(
        lambda: (
            (row := _stats(admin, "waitdb"))["total_xact_count"]
            >= stats_before["total_xact_count"] + 2
            and row
        ),
        "the two transactions in SHOW STATS",
    )
    assert stats_after["total_xact_count"] - stats_before["total_xact_count"] == 2
    assert stats_after["total_wait_time"] - stats_before["total_wait_time"] >= waited_us > 0
    assert stats_after["total_xact_time"] - stats_before["total_xact_time"] >= waited_us


def test_show_clients(proxy: ProxyProcess, admin: psycopg.Connection[Any]) -> None:
    tag = uuid.uuid4().hex[:8]
    names = [f"app-{tag}-{index}" for index in range(3)]
    conns = [client(proxy, "appdb", application_name=name) for name in names]
    try:
        for conn in conns:
            assert _fetch(conn, "select 1") == 1
        result = run(admin, "SHOW CLIENTS")
        rows = result.dicts()
        ids = [row["id"] for row in rows]
        assert len(set(ids)) == len(ids), ids
        assert all(re.fullmatch(r"\d+", id_ or "") for id_ in ids), ids
        ptrs = [row["ptr"] for row in rows]
        assert len(set(ptrs)) == len(ptrs), ptrs
        by_app = {row["application_name"]: row for row in rows}
        for conn, name in zip(conns, names, strict=True):
            row = by_app[name]
            assert row["type"] == "C"
            assert (row["user"], row["database"]) == ("app", "appdb")
            assert row["state"] == "idle"
            assert row["addr"] == "127.0.0.1"
            assert row["port"] == str(_local_port(conn))
            assert (row["local_addr"], row["local_port"]) == ("127.0.0.1", str(proxy.port))
            assert DATE.match(row["connect_time"] or ""), row["connect_time"]
            assert DATE.match(row["request_time"] or ""), row["request_time"]
            assert not row["link"]
        consoles = [row for row in rows if row["database"] == "pgbouncer"]
        assert any(row["user"] == ADMIN for row in consoles)
        # application_name follows a SET.
        conns[0].execute(f"set application_name = 'renamed-{tag}'")
        wait_for(
            lambda: f"renamed-{tag}" in _clients_by_app(admin),
            "SHOW CLIENTS to show the new application_name",
        )
        # A client that leaves is gone from the list.
        conns.pop().close()
        wait_for(
            lambda: names[2] not in _clients_by_app(admin),
            "the closed client to leave SHOW CLIENTS",
        )
        assert names[1] in _clients_by_app(admin)
    finally:
        for conn in conns:
            conn.close()


def test_show_servers_remote_pid(proxy: ProxyProcess, admin: psycopg.Connection[Any]) -> None:
    with client(proxy, "appdb", autocommit=False, application_name="pid-check") as conn:
        backend_pid = _fetch(conn, "select pg_backend_pid()")
        me = _clients_by_app(admin)["pid-check"]
        (server,) = [row for row in run(admin, "SHOW SERVERS").dicts() if row["link"] == me["ptr"]]
        assert server["remote_pid"] == str(backend_pid)
        assert (server["type"], server["state"], server["database"]) == ("S", "active", "appdb")
        assert (server["addr"], server["port"]) == (
            "127.0.0.1",
            str(proxy.config["databases"]["appdb"]["port"]),
        )
        assert DATE.match(server["connect_time"] or ""), server["connect_time"]
        conn.commit()
    remote_pids = [row["remote_pid"] for row in run(admin, "SHOW SERVERS").dicts()]
    assert str(backend_pid) in remote_pids
    assert len(set(remote_pids)) == len(remote_pids)


# -- statistics -------------------------------------------------------------------------------

SIMPLE = 20  # single-statement transactions over the simple query protocol
EXTENDED = 5  # single-statement transactions over Parse/Bind/Execute
SLEEP = 0.05  # one of the simple ones sleeps this long on the server


def _stats(admin: psycopg.Connection[Any], database: str) -> dict[str, Decimal]:
    row = run(admin, "SHOW STATS").keyed("database")[database]
    return {key: _num(value) for key, value in row.items() if key != "database"}


def test_counters_after_a_known_workload(
    proxy: ProxyProcess, admin: psycopg.Connection[Any]
) -> None:
    with client(proxy, "statsdb") as conn:
        assert _fetch(conn, "select 0") == 0  # warm: the pool has its server
        before = wait_for(
            lambda: (
                (row := _stats(admin, "statsdb"))["total_xact_count"] >= 1
                and row["total_query_count"] >= 1
                and row
            ),
            "the warm-up transaction in SHOW STATS",
        )
        pool_before = run(admin, "SHOW POOL_STATS").keyed("database", "user")[("statsdb", "app")]
        for index in range(SIMPLE - 1):
            assert _fetch(conn, "select 1") == 1, index
        conn.execute(f"select pg_sleep({SLEEP})")
        conn.prepare_threshold = 0  # a named prepared statement: one Parse, then Binds
        for index in range(EXTENDED):
            row = conn.execute("select %s::int", [index]).fetchone()
            assert row == (index,)
        conn.prepare_threshold = None
        xacts = SIMPLE + EXTENDED + 1  # (psycopg prepares in a round trip of its own)
        after = wait_for(
            lambda: (
                (row := _stats(admin, "statsdb"))["total_xact_count"]
                >= before["total_xact_count"] + xacts
                and row
            ),
            f"{xacts} more transactions in SHOW STATS",
        )
    delta = {key: after[key] - before[key] for key in after}
    assert delta["total_xact_count"] == xacts
    assert delta["total_query_count"] == xacts
    # PgBouncer's prepared-statement counters: the client's one Parse, its Binds, and a
    # Parse on each server it used (the same one, mostly: the pool hands out the warmest).
    assert delta["total_client_parse_count"] == 1
    assert delta["total_bind_count"] == EXTENDED
    assert 1 <= delta["total_server_parse_count"] <= 2
    assert 1 <= delta["total_server_assignment_count"] <= xacts
    # Lower bounds: each 'select 1' is a 14-byte Query message, each answer (RowDescription,
    # DataRow, CommandComplete, ReadyForQuery) well over 30 bytes.
    assert delta["total_received"] >= 14 * SIMPLE
    assert delta["total_sent"] >= 30 * SIMPLE
    assert delta["total_query_time"] >= SLEEP * 1_000_000
    assert delta["total_xact_time"] >= SLEEP * 1_000_000
    assert delta["total_wait_time"] >= 0
    # The other views of the same counters agree once nothing moves.
    totals = run(admin, "SHOW STATS_TOTALS").keyed("database")["statsdb"]
    assert _num(totals["xact_count"]) == after["total_xact_count"]
    assert _num(totals["query_count"]) == after["total_query_count"]
    assert _num(totals["bytes_received"]) == after["total_received"]
    assert _num(totals["bytes_sent"]) == after["total_sent"]
    assert _num(totals["bind_count"]) == after["total_bind_count"]
    everything = {row[0]: _num(row[1]) for row in run(admin, "SHOW TOTALS").rows}
    assert list(everything) == TOTALS_ROWS
    assert everything["total_xact_count"] >= after["total_xact_count"]
    assert everything["total_client_bytes"] >= after["total_received"]
    # psycopg_pool's keys for the same pool.
    pool_after = run(admin, "SHOW POOL_STATS").keyed("database", "user")[("statsdb", "app")]
    assert _int(pool_after["requests_num"]) > _int(pool_before["requests_num"])
    assert _int(pool_after["connections_num"]) >= 1
    assert _int(pool_after["pool_max"]) == 5
    assert _int(pool_after["pool_min"]) == 0
    assert 1 <= _int(pool_after["pool_size"]) <= 5
    assert 0 <= _int(pool_after["pool_available"]) <= _int(pool_after["pool_size"])
    assert _int(pool_after["requests_waiting"]) == 0
    assert _int(pool_after["requests_errors"]) == 0
    assert _int(pool_after["connections_errors"]) == 0
    for key in POOL_STATS_KEYS:
        assert _int(pool_after[key]) >= 0, key


def test_averages_after_a_workload(proxy: ProxyProcess, admin: psycopg.Connection[Any]) -> None:
    burst = 40
    with client(proxy, "avgdb") as conn:
        for _ in range(burst):
            assert _fetch(conn, "select 1") == 1

    def averages() -> tuple[dict[str, Decimal], dict[str, Decimal], dict[str, Decimal]] | None:
        stats = _stats(admin, "avgdb")
        row = run(admin, "SHOW STATS_AVERAGES").keyed("database")["avgdb"]
        per_db = {key: _num(value) for key, value in row.items() if key != "database"}
        totals = {row[0] or "": _num(row[1]) for row in run(admin, "SHOW TOTALS").rows}
        if stats["avg_xact_count"] > 0 and per_db["xact_count"] > 0:
            return stats, per_db, totals
        return None

    # Averages are per second over the last stats_period (1 s): at most two periods to show.
    stats, per_db, totals = wait_for(averages, "avg_xact_count > 0", seconds=4 * STATS_PERIOD + 2)
    for figures in (
        (stats["avg_xact_count"], stats["avg_query_count"]),
        (per_db["xact_count"], per_db["query_count"]),
    ):
        xacts, queries = figures
        assert 0 < xacts <= burst  # per second, over at least one second
        assert 0 < queries <= burst
    assert stats["avg_recv"] > 0 and stats["avg_sent"] > 0
    assert per_db["bytes_received"] > 0 and per_db["bytes_sent"] > 0
    assert stats["avg_xact_time"] > 0 and stats["avg_query_time"] > 0
    assert totals["avg_xact_count"] > 0
    # With no more traffic the window moves past the burst: the rates fall back to zero.
    wait_for(
        lambda: _stats(admin, "avgdb")["avg_xact_count"] == 0,
        "avg_xact_count to fall back to 0 once idle",
        seconds=4 * STATS_PERIOD + 2,
    )
    assert _stats(admin, "avgdb")["total_xact_count"] >= burst  # the totals stay


@pytest.mark.parametrize("what", ["STATS", "STATS_TOTALS", "STATS_AVERAGES"])
def test_stats_have_a_row_for_the_console_database(
    admin: psycopg.Connection[Any], what: str
) -> None:
    # PgBouncer's console database has a pool (the row of SHOW POOLS), and its SHOW STATS*
    # have a row for every database with a pool: 'pgbouncer' included (stats.c iterates
    # pool_list, which holds admin_pool).
    assert ("pgbouncer", "pgbouncer") in run(admin, "SHOW POOLS").keyed("database", "user")
    assert "pgbouncer" in run(admin, f"SHOW {what}").keyed("database")


def test_pool_stats_rows(proxy: ProxyProcess, admin: psycopg.Connection[Any]) -> None:
    with client(proxy, "appdb") as conn:
        before = run(admin, "SHOW POOL_STATS").keyed("database", "user").get(("appdb", "app"))
        for _ in range(3):
            assert _fetch(conn, "select 1") == 1
        after = wait_for(
            lambda: (
                (row := run(admin, "SHOW POOL_STATS").keyed("database", "user")[("appdb", "app")])
                and _int(row["requests_num"]) >= (_int(before["requests_num"]) if before else 0) + 3
                and row
            ),
            "requests_num to count 3 more requests",
        )
    assert _int(after["connections_num"]) >= 1
    assert _int(after["pool_max"]) == 5
    pools = {key for key in run(admin, "SHOW POOLS").keyed("database", "user")}
    pool_stats = set(run(admin, "SHOW POOL_STATS").keyed("database", "user"))
    assert pool_stats <= pools  # a row per pool (the console's own has no psycopg stats)
    assert ("appdb", "app") in pool_stats


def test_no_internal_error_was_logged(proxy: ProxyProcess) -> None:
    # Runs last: nothing above may have hit a bug path of the console or the pools.
    log = proxy.log_text()
    assert proxy.alive(), log[-4000:]
    assert "Traceback" not in log, log[-4000:]
    assert "internal error" not in log, log[-4000:]
