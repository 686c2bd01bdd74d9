"""The SHOW tables: PgBouncer's columns, in the order PgBouncer 1.25 sends them.

Each function reads the daemon's live objects and returns (columns, rows); nothing here
writes. pgproxy's own extra columns, if any, come after PgBouncer's.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from pgproxy import VERSION_LINE
from pgproxy.config import Settings
from pgproxy.core import params as tracked
from pgproxy.services.admin import CONSOLE_DATABASES
from pgproxy.services.admin.resultset import Column, Value, columns
from pgproxy.stats import CONSOLE_STATS_KEY, USEC, Totals

if TYPE_CHECKING:
    # (The daemon as the console and /metrics see it: an interface pgproxy.services.daemon meets.)
    from pgproxy.core.client import ClientConn
    from pgproxy.core.hosts import HostPolicy
    from pgproxy.core.server import ServerConn
    from pgproxy.services.control import DaemonView as Daemon

Table = tuple[list[Column], list[list[Value]]]

# What SHOW VERSION's first words say: the PgBouncer release whose console this follows,
# so that tools parsing "PgBouncer X.Y.Z" keep working.
VERSION = VERSION_LINE
ADMIN_DB = "pgbouncer"
ADMIN_DB_NAMES = CONSOLE_DATABASES

_APPLICATION_NAME = tracked.tracked_index("application_name")


def _clock(daemon: Daemon) -> tuple[float, float]:
    """(loop time, wall time) now, to turn loop times into dates."""
    return daemon.loop_time(), time.time()


def _date(loop_time: float, clock: tuple[float, float]) -> str:
    loop_now, wall_now = clock
    moment = wall_now - (loop_now - loop_time)
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(moment))


def _ptr(obj: object | None) -> str:
    return "" if obj is None else f"{id(obj):#x}"


def _split_time(seconds: float) -> tuple[int, int]:
    micros = max(int(seconds * USEC), 0)
    return micros // USEC, micros % USEC


# -- pools and connections ------------------------------------------------------------------


def show_pools(daemon: Daemon) -> Table:
    cols = columns(
        "ssiiiiiiiiiiiiiss",
        "database", "user", "cl_active", "cl_waiting", "cl_active_cancel_req",
        "cl_waiting_cancel_req", "sv_active", "sv_active_cancel", "sv_being_canceled",
        "sv_idle", "sv_used", "sv_tested", "sv_login", "maxwait", "maxwait_us", "pool_mode",
        "load_balance_hosts",
    )  # fmt: skip
    now = daemon.loop_time()
    census, consoles = daemon.registry.client_census()
    rows: list[list[Value]] = [
        [ADMIN_DB, ADMIN_DB, consoles, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, "statement", None]
    ]
    for pool, clients in census.items():
        servers = pool.server_states()
        oldest = pool.oldest_waiter()
        seconds, micros = _split_time(now - oldest.wait_started_at if oldest else 0.0)
        rows.append([
            pool.database, pool.user, clients["active"] + clients["idle"], clients["waiting"],
            0, 0, servers["active"], 0, 0, servers["idle"], servers["reset"], servers["tested"],
            servers["login"], seconds, micros, pool.mode, None,
        ])  # fmt: skip
    return cols, rows


_SOCKET_COLUMNS = columns(
    "ssssssisissiiississii",
    "type", "user", "database", "replication", "state", "addr", "port", "local_addr",
    "local_port", "connect_time", "request_time", "wait", "wait_us", "close_needed", "ptr",
    "link", "remote_pid", "tls", "application_name", "prepared_statements", "id",
)  # fmt: skip


def _address(info: object) -> tuple[str, int]:
    """(address, port) of a socket name; a Unix socket is 'unix' and the port 0."""
    if isinstance(info, tuple) and len(info) >= 2:
        return str(info[0]), int(info[1])
    return "unix", 0


def _tls_info(transport: object) -> str:
    """PgBouncer's tls column: protocol and cipher of an encrypted connection, else ''."""
    get = getattr(transport, "get_extra_info", None)
    ssl_object = get("ssl_object") if get is not None else None
    if ssl_object is None:
        return ""
    cipher = ssl_object.cipher()
    return f"{ssl_object.version()}/{cipher[0] if cipher else ''}"


def _client_row(client: ClientConn, clock: tuple[float, float], now: float) -> list[Value]:
    addr, port = _address(client.transport.get_extra_info("peername"))
    local_addr, local_port = _address(client.transport.get_extra_info("sockname"))
    server = client.server
    requested = server.query_started if server is not None else client.request_at
    waited = now - client.wait_started_at if client.wait_started_at else 0.0
    seconds, micros = _split_time(waited)
    database = client.database if client.console is None else ADMIN_DB
    return [
        "C", client.user, database, "none", client.pool_state, addr, port, local_addr,
        local_port, _date(client.connected_at, clock),
        _date(requested or client.connected_at, clock), seconds, micros, 0, _ptr(client),
        _ptr(server), client.peer_pid, _tls_info(client.transport), client.application_name,
        len(client.scan.statements.names) if client.scan.statements is not None else 0,
        client.id,
    ]  # fmt: skip


def _server_row(server: ServerConn, clock: tuple[float, float], now: float) -> list[Value]:
    transport = server.transport
    addr, port = _address(transport.get_extra_info("peername") if transport else None)
    local_addr, local_port = _address(transport.get_extra_info("sockname") if transport else None)
    state = {"reset": "used"}.get(server.state, server.state)
    app = server.params[_APPLICATION_NAME] if _APPLICATION_NAME is not None else ""
    requested = server.query_started or server.connected_at
    return [
        "S", server.pool.user, server.pool.database, "none", state, addr, port, local_addr,
        local_port, _date(server.connected_at, clock), _date(requested, clock), 0, 0,
        1 if server.expires_at == 0.0 else 0, _ptr(server), _ptr(server.client),
        server.backend_pid, _tls_info(transport), app or "",
        len(server.statements.cached) if server.statements is not None else 0, server.id,
    ]  # fmt: skip


def show_clients(daemon: Daemon) -> Table:
    clock = _clock(daemon)
    rows = [_client_row(client, clock, clock[0]) for client in daemon.registry.logged_in_clients()]
    return list(_SOCKET_COLUMNS), rows


def _servers(daemon: Daemon) -> Iterator[ServerConn]:
    for pool in daemon.registry.pools.values():
        yield from pool.servers


def show_servers(daemon: Daemon) -> Table:
    clock = _clock(daemon)
    rows = [_server_row(server, clock, clock[0]) for server in _servers(daemon)]
    return list(_SOCKET_COLUMNS), rows


_DEBUG_COLUMNS = columns(
    "iiiiiii", "recv_pos", "pkt_pos", "pkt_remain", "send_pos", "send_remain", "pkt_avail",
    "send_avail",
)  # fmt: skip


def show_sockets(daemon: Daemon) -> Table:
    """PgBouncer's debug view: clients and servers with buffer positions (zeros here:
    pgproxy forwards chunks as they come and keeps no buffers to report)."""
    clock = _clock(daemon)
    rows: list[list[Value]] = []
    for client in daemon.registry.logged_in_clients():
        row = _client_row(client, clock, clock[0])
        row[4] = "cl_" + str(row[4])
        rows.append(row + [0] * 7)
    for server in _servers(daemon):
        row = _server_row(server, clock, clock[0])
        row[4] = "sv_" + str(row[4])
        rows.append(row + [0] * 7)
    return list(_SOCKET_COLUMNS) + _DEBUG_COLUMNS, rows


# -- configuration objects ------------------------------------------------------------------


def show_databases(daemon: Daemon) -> Table:
    cols = columns(
        "ssissiiiissiiiiii",
        "name", "host", "port", "database", "force_user", "pool_size", "min_pool_size",
        "reserve_pool_size", "server_lifetime", "pool_mode", "load_balance_hosts",
        "max_connections", "current_connections", "max_client_connections",
        "current_client_connections", "paused", "disabled",
    )  # fmt: skip
    settings = daemon.settings
    rows: list[list[Value]] = [
        [ADMIN_DB, None, settings.listen_port, ADMIN_DB, "pgbouncer", 2, 0, 0,
         int(settings.server_lifetime), "statement", None, 0, 0,
         settings.max_db_client_connections, daemon.registry.db_clients.get(ADMIN_DB, 0), 0, 0]
    ]  # fmt: skip
    names = [name for name in settings.databases if name != "*"]
    # Databases served through the '*' entry appear once a client used them (PgBouncer).
    names += sorted({pool.database for pool in daemon.registry.pools.values()} - set(names))
    for name in names:
        entry = settings.database(name)
        if entry is None:
            continue  # removed by a reload; its pools drain
        budget = daemon.registry.db_budgets.get(name)
        flags = daemon.pauses.db_flags(name)
        lifetime = entry.server_lifetime if entry.server_lifetime is not None else None
        rows.append([
            name, entry.host, entry.port, entry.dbname or name, entry.user,
            entry.pool_size if entry.pool_size is not None else settings.default_pool_size,
            entry.min_pool_size if entry.min_pool_size is not None else settings.min_pool_size,
            entry.reserve_pool_size if entry.reserve_pool_size is not None
            else settings.reserve_pool_size,
            int(lifetime if lifetime is not None else settings.server_lifetime),
            entry.pool_mode, entry.load_balance_hosts if "," in entry.host else None,
            settings.max_db_connections_for(entry),
            budget.used if budget else 0, settings.client_limits_for(entry, "")[0],
            daemon.registry.db_clients.get(name, 0), int(flags.paused), int(flags.disabled),
        ])  # fmt: skip
    return cols, rows


def show_users(daemon: Daemon) -> Table:
    cols = columns(
        "ssssiiii",
        "name", "pool_size", "reserve_pool_size", "pool_mode", "max_user_connections",
        "current_connections", "max_user_client_connections", "current_client_connections",
    )  # fmt: skip
    settings = daemon.settings
    names = set(settings.users) | {pool.user for pool in daemon.registry.pools.values()}
    names |= {user for user, count in daemon.registry.user_clients.items() if count > 0}
    names.add(ADMIN_DB)  # PgBouncer's console user, always listed
    rows: list[list[Value]] = []
    for name in sorted(names):
        entry = settings.users.get(name)
        pool_size = entry.pool_size if entry is not None else None
        reserve = entry.reserve_pool_size if entry is not None else None
        budget = daemon.registry.user_budgets.get(name)
        client_limit = (
            entry.max_user_client_connections
            if entry is not None and entry.max_user_client_connections is not None
            else settings.max_user_client_connections
        )
        rows.append([
            name, f"{pool_size:9d}" if pool_size is not None else None,
            f"{reserve:9d}" if reserve is not None else None,
            entry.pool_mode if entry is not None else None,
            settings.max_user_connections_for(name), budget.used if budget else 0,
            client_limit, daemon.registry.user_clients.get(name, 0),
        ])  # fmt: skip
    return cols, rows


def _config_text(value: object) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, list):
        return ",".join(str(item) for item in value)
    return "" if value is None else str(value)


def show_config(daemon: Daemon) -> Table:
    from pgproxy.config import RESTART_ONLY

    cols = columns("ssss", "key", "value", "default", "changeable")
    rows: list[list[Value]] = []
    settings = daemon.settings
    for name, field in sorted(Settings.model_fields.items()):
        if name in ("databases", "users"):
            continue  # SHOW DATABASES / SHOW USERS
        value = getattr(settings, name)
        default = field.get_default(call_default_factory=True)
        if "password" in name:  # never shown, whatever it holds
            value = default = "********" if value else ""
        rows.append([
            name, _config_text(value), _config_text(default),
            "no" if name in RESTART_ONLY else "yes",
        ])  # fmt: skip
    return cols, rows


# -- statistics ------------------------------------------------------------------------------

_STAT_NAMES = (
    "server_assignment_count", "xact_count", "query_count", "received", "sent", "xact_time",
    "query_time", "wait_time", "client_parse_count", "server_parse_count", "bind_count",
)  # fmt: skip


def _database_totals(daemon: Daemon) -> list[tuple[str, Totals, Totals]]:
    """(database, live totals, totals at the older snapshot) per database, in pool order."""
    window = daemon.stats_window
    # The console's own pool comes first, as in PgBouncer (its queries, no server traffic).
    by_db: dict[str, tuple[Totals, Totals]] = {
        ADMIN_DB: (Totals.of(daemon.console_stats), window.older_totals(CONSOLE_STATS_KEY))
    }
    for key, pool in daemon.registry.pools.items():
        live, older = by_db.setdefault(pool.database, (Totals(), Totals()))
        live.add(Totals.of(pool.stats))
        older.add(window.older_totals(key))
    return [(name, live, older) for name, (live, older) in by_db.items()]


def _window_seconds(daemon: Daemon) -> float:
    return daemon.loop_time() - daemon.stats_window.older_at


def show_stats(daemon: Daemon) -> Table:
    names = ["total_" + name for name in _STAT_NAMES]
    names += ["avg_recv" if n == "received" else "avg_" + n for n in _STAT_NAMES]
    cols = columns("s" + "N" * len(names), "database", *names)
    seconds = _window_seconds(daemon)
    rows: list[list[Value]] = [
        [name, *live.figures(), *live.averages(older, seconds)]
        for name, live, older in _database_totals(daemon)
    ]
    return cols, rows


_TOTALS_NAMES = (
    "server_assignment_count", "xact_count", "query_count", "bytes_received", "bytes_sent",
    "xact_time", "query_time", "wait_time",
)  # fmt: skip


def show_stats_totals(daemon: Daemon) -> Table:
    names = [*_TOTALS_NAMES, "client_parse_count", "server_parse_count", "bind_count"]
    cols = columns("s" + "N" * len(names), "database", *names)
    rows: list[list[Value]] = [
        [name, *live.figures()] for name, live, _ in _database_totals(daemon)
    ]
    return cols, rows


def show_stats_averages(daemon: Daemon) -> Table:
    names = [*_TOTALS_NAMES, "avg_client_parse_count", "avg_server_parse_count", "avg_bind_count"]
    cols = columns("s" + "N" * len(names), "database", *names)
    seconds = _window_seconds(daemon)
    rows: list[list[Value]] = [
        [name, *live.averages(older, seconds)] for name, live, older in _database_totals(daemon)
    ]
    return cols, rows


def show_totals(daemon: Daemon) -> Table:
    live, older = Totals(), Totals()
    for _, db_live, db_older in _database_totals(daemon):
        live.add(db_live)
        older.add(db_older)
    names = (
        "server_assignment_count", "xact_count", "query_count", "client_bytes", "server_bytes",
        "xact_time", "query_time", "wait_time", "ps_client_parse_count",
        "ps_server_parse_count", "ps_bind_count",
    )  # fmt: skip
    rows: list[list[Value]] = [
        ["total_" + name, value] for name, value in zip(names, live.figures(), strict=True)
    ]
    averages = live.averages(older, _window_seconds(daemon))
    rows += [["avg_" + name, value] for name, value in zip(names, averages, strict=True)]
    return columns("sN", "name", "value"), rows


def show_leaks(daemon: Daemon) -> Table:
    """pgproxy's own: clients holding a server past leak_detection_threshold now (kind
    ``held``), then the recent session state leaks (transaction_state_guard), one row per
    client and kind: ``state`` says whether the state was ``kept`` on the server or
    ``reset``, ``detail`` what was found, ``count`` how many times, ``seen_at`` the last."""
    from pgproxy.core.janitor import held_for

    cols = columns(
        "issssisqssssis", "id", "user", "database", "application_name", "addr", "port",
        "state", "held_us", "held_since", "kind", "detail", "first_seen", "count", "seen_at",
    )  # fmt: skip
    threshold = daemon.settings.leak_detection_threshold
    rows: list[list[Value]] = []
    clock = _clock(daemon)
    now = clock[0]
    for pool in daemon.registry.pools.values() if threshold > 0 else ():
        for server in pool.servers:
            client = server.client
            held = held_for(pool, server, now)
            if client is None or held < threshold:
                continue
            addr, port = _address(client.transport.get_extra_info("peername"))
            state = "active" if client.outstanding > 0 else "idle in transaction"
            since = _date(now - held, clock)
            rows.append([
                client.id, client.user, client.database, client.application_name, addr, port,
                state, int(held * USEC), since, "held", f"over {threshold:g} s", since, 1,
                _date(now, clock),
            ])  # fmt: skip
    pools = daemon.registry.pools.values()
    leaks = [leak for pool in pools for leak in pool.state_leaks.entries.values()]
    for leak in sorted(leaks, key=lambda leak: leak.last_seen):
        addr, port = _address(leak.peer)
        rows.append([
            leak.client_id, leak.user, leak.database, leak.application_name, addr, port,
            leak.action, None, None, leak.kind, leak.detail, _date(leak.first_seen, clock),
            leak.count, _date(leak.last_seen, clock),
        ])  # fmt: skip
    return cols, rows


def show_pool_stats(daemon: Daemon) -> Table:
    """pgproxy's own: psycopg_pool's get_stats() keys for each pool."""
    names = (
        "pool_min", "pool_max", "pool_size", "pool_available", "requests_waiting", "usage_ms",
        "requests_num", "requests_queued", "requests_wait_ms", "requests_errors", "returns_bad",
        "connections_num", "connections_ms", "connections_errors", "connections_lost",
    )  # fmt: skip
    cols = columns("ss" + "q" * len(names), "database", "user", *names)
    census, _ = daemon.registry.client_census()
    rows: list[list[Value]] = []
    for pool in daemon.registry.pools.values():
        stats = pool.stats
        waiting = census[pool]["waiting"]
        served_at_once = stats.server_assignment_count - stats.waiters_served
        rows.append([
            pool.database, pool.user, pool.min_size, pool.size,
            len(pool.servers) + pool.connecting, len(pool.idle), waiting,
            int(stats.xact_time * 1000), served_at_once + stats.requests_queued,
            stats.requests_queued, int(stats.wait_time * 1000), stats.requests_errors,
            stats.returns_bad, stats.connections_num, int(stats.connections_time * 1000),
            stats.connections_errors, stats.connections_lost,
        ])  # fmt: skip
    return cols, rows


def show_hosts(daemon: Daemon) -> Table:
    """pgproxy's own: the hosts of each database entry with target_session_attrs, several
    hosts or max_replica_lag, as its pools see them (role, state, lag, servers)."""
    cols = columns(
        "ssisssNqiss",
        "database", "host", "port", "role", "read_only", "state", "lag", "lag_bytes",
        "servers", "target_session_attrs", "last_error",
    )  # fmt: skip
    rows: list[list[Value]] = []
    for topology in daemon.registry.topologies:
        by_database: dict[str, list[HostPolicy]] = {}
        for pool, policy in topology.policies.items():
            by_database.setdefault(pool.database, []).append(policy)
        for database, policies in sorted(by_database.items()):
            policy = policies[0]  # (the entry's pools share its ranking)
            for host in topology.hosts.values():
                lag = f"{host.lag_seconds:.3f}" if host.lag_seconds is not None else None
                rows.append([
                    database, host.name, host.port, host.role,
                    "yes" if host.read_only else "no", policy.state_of(host), lag,
                    host.lag_bytes, sum(p.servers_on(host.name) for p in policies),
                    policy.attrs, host.error or None,
                ])  # fmt: skip
    return cols, rows


# -- the daemon ------------------------------------------------------------------------------


def show_lists(daemon: Daemon) -> Table:
    clients = list(daemon.registry.clients)
    logged_in = sum(1 for client in daemon.registry.logged_in_clients())
    users = set(daemon.settings.users) | {pool.user for pool in daemon.registry.pools.values()}
    users |= {user for user, count in daemon.registry.user_clients.items() if count > 0}
    users.add(ADMIN_DB)
    rows: list[list[Value]] = [
        ["databases", len(show_databases(daemon)[1])],
        ["users", len(users)],
        ["peers", len(show_peers(daemon)[1])],
        ["pools", len(daemon.registry.pools) + 1],
        ["peer_pools", 0],
        ["free_clients", 0],
        ["used_clients", len(clients)],
        ["login_clients", len(clients) - logged_in],
        ["free_servers", 0],
        [
            "used_servers",
            sum(len(pool.servers) + pool.connecting for pool in daemon.registry.pools.values()),
        ],
        ["dns_names", 0],
        ["dns_zones", 0],
        ["dns_queries", 0],
        ["dns_pending", 0],
    ]
    return columns("si", "list", "items"), rows


def show_state(daemon: Daemon) -> Table:
    mode = daemon.pauses.pause_mode
    rows: list[list[Value]] = [
        ["active", "yes" if mode == "none" else "no"],
        ["paused", "yes" if mode == "pause" else "no"],
        ["suspended", "yes" if mode == "suspend" else "no"],
    ]
    return columns("ss", "key", "value"), rows


def show_version(daemon: Daemon) -> Table:
    return columns("s", "version"), [[VERSION]]


def show_mem(daemon: Daemon) -> Table:
    """PgBouncer's slab allocator caches; Python has none to report."""
    return columns("siiii", "name", "size", "used", "free", "memtotal"), []


def show_peers(daemon: Daemon) -> Table:
    """The peer group cancel requests are forwarded in (PgBouncer's [peers]); with
    workers = N, the workers themselves. pool_size: no cap on forwards in flight (0)."""
    settings = daemon.settings
    rows: list[list[Value]] = [
        [peer_id, peer.host, peer.port, 0]
        for peer_id, peer in sorted(settings.peers.items())
        if peer_id != settings.peer_id
    ]
    return columns("isii", "peer_id", "host", "port", "pool_size"), rows


def show_peer_pools(daemon: Daemon) -> Table:
    cols = columns(
        "iiiii", "peer_id", "cl_active_cancel_req", "cl_waiting_cancel_req",
        "sv_active_cancel", "sv_login",
    )  # fmt: skip
    return cols, []


def show_dns_hosts(daemon: Daemon) -> Table:
    return columns("sqs", "hostname", "ttl", "addrs"), []


def show_dns_zones(daemon: Daemon) -> Table:
    return columns("sqi", "zonename", "serial", "count"), []


SHOW_TABLES: dict[str, Callable[[Daemon], Table]] = {
    "active_sockets": show_sockets,
    "clients": show_clients,
    "config": show_config,
    "databases": show_databases,
    "dns_hosts": show_dns_hosts,
    "dns_zones": show_dns_zones,
    "hosts": show_hosts,
    "leaks": show_leaks,
    "lists": show_lists,
    "mem": show_mem,
    "peer_pools": show_peer_pools,
    "peers": show_peers,
    "pool_stats": show_pool_stats,
    "pools": show_pools,
    "servers": show_servers,
    "sockets": show_sockets,
    "state": show_state,
    "stats": show_stats,
    "stats_averages": show_stats_averages,
    "stats_totals": show_stats_totals,
    "totals": show_totals,
    "users": show_users,
    "version": show_version,
}

HELP = (
    "\n\tSHOW HELP|CONFIG|DATABASES|POOLS|CLIENTS|SERVERS|USERS|VERSION\n"
    "\tSHOW PEERS|PEER_POOLS\n"
    "\tSHOW SOCKETS|ACTIVE_SOCKETS|LISTS|MEM|STATE\n"
    "\tSHOW DNS_HOSTS|DNS_ZONES\n"
    "\tSHOW HOSTS\n"
    "\tSHOW STATS|STATS_TOTALS|STATS_AVERAGES|TOTALS|POOL_STATS|LEAKS\n"
    "\tSET key = arg\n"
    "\tRELOAD\n"
    "\tPAUSE [<db>]\n"
    "\tRESUME [<db>]\n"
    "\tDISABLE <db>\n"
    "\tENABLE <db>\n"
    "\tRECONNECT [<db>]\n"
    "\tKILL [<db>]\n"
    "\tKILL_CLIENT <client_id>\n"
    "\tSUSPEND\n"
    "\tSHUTDOWN\n"
    "\tSHUTDOWN WAIT_FOR_SERVERS|WAIT_FOR_CLIENTS\n"
    "\tWAIT_CLOSE [<db>]"
)
