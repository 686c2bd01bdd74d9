"""Start-up, the objects every connection shares, signals and shutdown."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import ssl
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from pgproxy import __version__, cancel, logs, sdnotify
from pgproxy import params as tracked
from pgproxy.auth_query import AuthQuery
from pgproxy.config import (
    RESTART_ONLY,
    ConfigError,
    DatabaseConfig,
    Settings,
    changed_setting,
    load_settings,
)
from pgproxy.hba import hba_rules
from pgproxy.histograms import PoolHistograms
from pgproxy.http import MetricsServer
from pgproxy.janitor import Janitor
from pgproxy.listener import listen_on, remove_unix_socket, start_listeners
from pgproxy.pool import Pool, ServerBudget, ServerTarget
from pgproxy.protocol import codes
from pgproxy.protocol.auth import Credential, Md5Hash
from pgproxy.protocol.client_auth import BadSecret, Secret, parse_secret
from pgproxy.protocol.prepared import Registry
from pgproxy.server import cancel_backend
from pgproxy.sockopts import keepalive_from
from pgproxy.stats import (
    CONSOLE_STATS_KEY,
    LoginFailureReason,
    PoolStats,
    StatsWindow,
    Totals,
    set_connection_id_base,
)
from pgproxy.tls import certificate_hash, client_context, server_tls
from pgproxy.userlist import read_userlist
from pgproxy.workers import SharedServerBudget, WorkerContext, evict_for_other_workers

if TYPE_CHECKING:
    from pgproxy.client import ClientConn

log = logging.getLogger("pgproxy")
# The periodic stats line is logged at INFO whatever -v says, as PgBouncer's log_stats.
stats_log = logging.getLogger("pgproxy.stats")
stats_log.setLevel(logging.INFO)

PauseMode = Literal["none", "pause", "suspend"]
# SHUTDOWN's modes: exit now, once no server is linked, once no client is left.
ShutdownMode = Literal["immediate", "servers", "clients"]
POLL = 0.05  # seconds between checks while a console command or a shutdown waits


@dataclass(slots=True)
class DatabaseFlags:
    """What the console set on one database: PAUSE/KILL and DISABLE."""

    paused: bool = False
    disabled: bool = False


WORKER_ID_RANGE = 1_000_000_000  # connection ids of worker i start at (i + 1) * this


class Daemon:
    """The running proxy: settings, pools, clients, cancel keys, listeners."""

    def __init__(
        self, settings: Settings, config_path: str | None = None,
        worker: WorkerContext | None = None,
    ) -> None:  # fmt: skip
        # With workers = N: this process is one of them (its settings adjusted to it).
        self.worker = worker
        if worker is not None:
            settings = worker.apply(settings)
            set_connection_id_base((worker.index + 1) * WORKER_ID_RANGE)
        self.settings = settings
        tracked.configure(settings.track_extra_parameters)  # (read at start only)
        logs.set_verbose(settings.verbose)
        self.keepalive = keepalive_from(settings)  # for TCP clients
        self.config_path = config_path
        self.pools: dict[tuple[str, str], Pool] = {}
        # Server budgets shared across pools: per database and per (server) user.
        self.db_budgets: dict[str, ServerBudget] = {}
        self.user_budgets: dict[str, ServerBudget] = {}
        self.clients: set[ClientConn] = set()
        # Logged-in clients per database and per user (max_db/user_client_connections).
        self.db_clients: Counter[str] = Counter()
        self.user_clients: Counter[str] = Counter()
        self.cancel_keys: dict[tuple[int, bytes], ClientConn] = {}
        self._cancel_tasks: set[asyncio.Future[None]] = set()  # forwards to peers
        self.statement_registry = Registry()  # named prepared statements, proxy-wide
        self.pause_mode: PauseMode = "none"
        self.database_flags: dict[str, DatabaseFlags] = {}
        self.shutdown_mode: ShutdownMode | None = None
        self.stats_window = StatsWindow(0.0)  # restarted by start()
        self.console_stats = PoolStats()  # the console's queries (SHOW STATS 'pgbouncer')
        self.login_failures: Counter[LoginFailureReason] = Counter()  # failed logins, by reason
        self.login_timeouts = 0  # of which client_login_timeout
        self._metrics: MetricsServer | None = None
        self.auth_query = AuthQuery()
        # Passthrough: what each user's last successful login proved (password, md5 hash
        # or SCRAM keys), for server logins that have no configured password.
        self.passthrough: dict[str, Credential] = {}
        self.client_tls: ssl.SSLContext | None = None  # (all set by _read_files)
        self.client_tls_binding: bytes | None = None
        self._read_files(settings)  # secrets, TLS contexts, hba rules
        self._listeners: list[asyncio.Server] = []
        self._stopped: asyncio.Event | None = None
        self._janitor: Janitor | None = None
        self._drain_task: asyncio.Task[None] | None = None

    def loop_time(self) -> float:
        """The clock every timestamp in pgproxy is taken with: time.monotonic (uvloop's
        loop.time() only has millisecond steps, too coarse for query times)."""
        return time.monotonic()

    def logged_in_clients(self) -> Iterator[ClientConn]:
        """Clients past their login: pool clients and console sessions."""
        return (client for client in self.clients if client.logged_in)

    def client_census(self) -> tuple[dict[Pool, Counter[str]], int]:
        """Logged-in pool clients per pool by ``pool_state``, and console sessions."""
        by_pool: dict[Pool, Counter[str]] = {pool: Counter() for pool in self.pools.values()}
        consoles = 0
        for client in self.logged_in_clients():
            if client.console is not None:
                consoles += 1
            elif client.pool in by_pool:
                by_pool[client.pool][client.pool_state] += 1
        return by_pool, consoles

    # -- shared objects ----------------------------------------------------------------

    def pool_for(self, database: str, user: str) -> Pool | None:
        """The pool serving ``user`` on ``database``; None if no entry serves the database."""
        entry = self.settings.database(database)
        if entry is None:
            return None
        # A database entry with a forced user has one pool for all its clients.
        server_user = entry.user or user
        key = (database, server_user)
        pool = self.pools.get(key)
        if pool is None:
            target = _target(entry, database, server_user)
            db_budget = self.db_budgets.get(database)
            if db_budget is None:
                db_budget = self.db_budgets[database] = self._budget(
                    f"db:{database}", self.settings.max_db_connections_for(entry)
                )
            user_budget = self.user_budgets.get(server_user)
            if user_budget is None:
                user_budget = self.user_budgets[server_user] = self._budget(
                    f"user:{server_user}", self.settings.max_user_connections_for(server_user)
                )
            budgets: tuple[ServerBudget, ...] = (db_budget, user_budget)
            pool_budget = None
            if self.worker is not None:
                # pool_size caps the sum over workers: a shared budget of its own, asked
                # first (the one most often full).
                pool_budget = self._budget(f"pool:{database}/{server_user}", 0)
                budgets = (pool_budget, *budgets)
            pool = Pool(
                database,
                server_user,
                target,
                self.settings.pool_settings(entry, server_user),
                budgets,
            )
            if isinstance(pool_budget, SharedServerBudget):
                pool_budget.limit_for = pool.size_limit
            pool.paused = self.is_paused(database)
            pool.server_tls = self.server_tls
            pool.credential_for = self.server_credential
            pool.statement_registry = self.statement_registry
            pool.query_wait_timeout = self.settings.client_timeouts(entry, server_user).query_wait
            if self.settings.metrics_port:
                pool.measure(PoolHistograms(pool.query_wait_timeout))
            self.pools[key] = pool
        return pool

    def admit_client(
        self, database: str, user: str, *, console: bool = False, exempt: bool = False
    ) -> str | None:
        """Count a client in, or say which client cap (PgBouncer's words) refuses it.

        ``console``: a console login (``database`` is then the console's name). It counts
        under the global caps, and an admin_users member (or ``exempt``: the local
        pgbouncer user) is counted but never refused, as in PgBouncer, so that an operator
        can always get in."""
        settings = self.settings
        entry = settings.database(database) if not console else None
        if entry is not None:
            db_limit, user_limit = settings.client_limits_for(entry, user)
        elif console and (exempt or user in settings.admin_users):
            db_limit, user_limit = 0, 0
        elif console:
            db_limit = settings.max_db_client_connections
            user_limit = settings.max_user_client_connections_for(user)
        else:
            db_limit, user_limit = 0, 0
        worker = self.worker
        if worker is not None:  # the caps hold for the sum over workers
            shared, index = worker.budgets, worker.index
            db_slot = shared.slot(f"clients-db:{database}")
            user_slot = shared.slot(f"clients-user:{user}")
            if not shared.take(db_slot, index, db_limit):
                return "client connections exceeded (max_db_client_connections)"
            if not shared.take(user_slot, index, user_limit):
                shared.give_back(db_slot, index)
                return "client connections exceeded (max_user_client_connections)"
        else:
            if 0 < db_limit <= self.db_clients[database]:
                return "client connections exceeded (max_db_client_connections)"
            if 0 < user_limit <= self.user_clients[user]:
                return "client connections exceeded (max_user_client_connections)"
        self.db_clients[database] += 1
        self.user_clients[user] += 1
        return None

    def client_left(self, database: str, user: str) -> None:
        """Count out a client that admit_client counted in."""
        self.db_clients[database] -= 1
        self.user_clients[user] -= 1
        worker = self.worker
        if worker is not None:
            shared = worker.budgets
            shared.give_back(shared.slot(f"clients-db:{database}"), worker.index)
            shared.give_back(shared.slot(f"clients-user:{user}"), worker.index)

    def client_count(self) -> int:
        """Client connections (max_client_conn): of every worker, with workers = N."""
        worker = self.worker
        if worker is None:
            return len(self.clients)
        shared = worker.budgets
        slot = shared.slot("clients")
        shared.set_mine(slot, worker.index, len(self.clients))
        return shared.total(slot)

    def clients_changed(self) -> None:
        """A client connected or left: publish the count the other workers check."""
        if self.worker is not None:
            self.client_count()

    def reload(self) -> bool:
        """Re-read the configuration (SIGHUP, RELOAD); resize and retarget pools in place.

        Clients stay connected. An invalid file is logged and changes nothing. Settings
        bound at start (the listening sockets) keep their running values, with a warning.
        A removed database refuses new clients while its connected ones finish. A pool's
        mode is fixed at creation: a new pool_mode applies to pools created afterwards.
        """
        if self._speaks_for_systemd:
            sdnotify.reloading()
        try:
            return self._reload()
        finally:
            if self._speaks_for_systemd:
                sdnotify.reloaded()

    def _reload(self) -> bool:
        try:
            settings = load_settings(self.config_path)
            if self.worker is not None:
                settings = self.worker.apply(settings)
            kept = {
                name: getattr(self.settings, name)
                for name in sorted(RESTART_ONLY)
                if getattr(settings, name) != getattr(self.settings, name)
            }
            # A broken auth_file, certificate or hba file fails here, before any change.
            self._apply_settings(settings.model_copy(update=kept) if kept else settings)
        except ConfigError as exc:
            log.error("reload failed, configuration unchanged: %s", exc)
            return False
        try:
            logs.reopen(self.settings.log_format, self.settings.logfile)
        except OSError as exc:
            log.error("reload: cannot open logfile %s: %s", self.settings.logfile, exc)
        for name in kept:
            log.warning("reload: %s changed; it takes effect after a restart", name)
        self._prewarm()  # a database with a forced user and min_pool_size may be new
        log.info("configuration reloaded")
        return True

    def set_setting(self, key: str, value: str) -> None:
        """The console's SET: change one running setting; raise ConfigError."""
        tls_key = key.lower() if key.lower().startswith("client_tls_") else None
        self._apply_settings(changed_setting(self.settings, key, value), one_tls_key=tls_key)

    def secret_for(self, user: str) -> Secret | None:
        """What ``user``'s password is checked against, from the config or auth_file."""
        return self.secrets.get(user)

    def server_credential(self, user: str) -> Credential | None:
        """What pgproxy logs in to PostgreSQL with as ``user`` when the database entry has
        no password: a client's proven credential, else a plain or md5 stored secret."""
        credential = self.passthrough.get(user)
        if credential is not None:
            return credential
        secret = self.secrets.get(user)
        if secret is None or secret.kind == "scram":
            return None  # a verifier alone cannot log in: a SCRAM client login must come first
        return secret.value if secret.kind == "plain" else Md5Hash(secret.value)

    def auth_database_problem(self, database: str) -> str | None:
        """Why auth_query cannot run for a client of ``database`` now (PgBouncer's words),
        or None."""
        target = self.settings.auth_dbname_for(database)
        if target != database and self.settings.database(target) is None:
            log.error('authentication database "%s" is not configured', target)
            return "bouncer config error"
        flags = self.database_flags.get(target)
        if flags is not None and flags.disabled:
            return f'authentication database "{target}" is disabled'
        return None

    def knows_user(self, database: str, user: str) -> bool | None:
        """Under auth_type = trust, as PgBouncer: True for a user with a secret (auth_file,
        [users]) or a database's forced user; None when auth_query must tell; False for
        anyone else. Without an auth_file or auth_user, every user is known (pgproxy
        lets any user name in then; PgBouncer would know none)."""
        settings = self.settings
        if user in self.secrets or (not settings.auth_file and not settings.auth_user):
            return True
        if any(entry.user == user for entry in settings.databases.values()):
            return True
        return None if settings.auth_user_for(database) is not None else False

    async def lookup_secret(self, database: str, user: str) -> Secret | None:
        """``user``'s secret through auth_query; None for an expired user, UNKNOWN_USER
        for one the query does not know."""
        auth_user = self.settings.auth_user_for(database)
        auth_secret = self.secrets.get(auth_user) if auth_user else None
        password = auth_secret.value if auth_secret and auth_secret.kind == "plain" else None
        return await self.auth_query.lookup(self.settings, database, user, password)

    def _read_files(self, settings: Settings, *, one_tls_key: str | None = None) -> None:
        """Read what the settings point at: client secrets (the auth_file's, then each
        [users.NAME] password over them), TLS contexts (None: no TLS for clients) and hba
        rules. Everything is read before anything is kept, so a ConfigError changes
        nothing; certificates read again serve new connections only.

        ``one_tls_key``: the console SET of that client_tls_* key. The files are set one
        SET at a time (key, then certificate, then CA), so in between they may not match:
        as in PgBouncer, the SET is taken, the TLS settings in force stay until a complete
        set loads, and the reason is logged."""
        secrets = client_secrets(settings)
        try:
            tls_for_clients = client_context(settings)
            binding = _binding(settings, tls_for_clients)
        except ConfigError as exc:
            if one_tls_key is None:
                raise
            log.warning("SET %s: client TLS not reloaded yet: %s", one_tls_key, exc)
            tls_for_clients, binding = self.client_tls, self.client_tls_binding
        tls_for_servers, hba = server_tls(settings), hba_rules(settings)
        self.secrets, self.client_tls, self.server_tls = secrets, tls_for_clients, tls_for_servers
        self.client_tls_binding, self.hba = binding, hba

    def _apply_settings(self, settings: Settings, *, one_tls_key: str | None = None) -> None:
        # (Raises ConfigError before anything changes.)
        self._read_files(settings, one_tls_key=one_tls_key)
        self.auth_query.clear()
        self.settings = settings
        self.keepalive = keepalive_from(settings)
        logs.set_verbose(settings.verbose)
        for client in self.logged_in_clients():
            entry = settings.database(client.database)
            if client.console is None and entry is not None:
                client.timeouts = settings.client_timeouts(entry, client.user)
        for pool in self.pools.values():
            entry = settings.database(pool.database)
            if entry is None:
                log.warning("database %s is no longer configured; it drains", pool.database)
                continue
            pool.query_wait_timeout = settings.client_timeouts(entry, pool.user).query_wait
            pool.server_tls = self.server_tls
            self.db_budgets[pool.database].limit = settings.max_db_connections_for(entry)
            self.user_budgets[pool.user].limit = settings.max_user_connections_for(pool.user)
            pool.reconfigure(
                settings.pool_settings(entry, pool.user), _target(entry, pool.database, pool.user)
            )
        for client in self.logged_in_clients():
            if client.pool is not None:
                client.statements_setting_changed()

    # -- console control ---------------------------------------------------------------

    def db_flags(self, database: str) -> DatabaseFlags:
        """The console flags of ``database`` (created clear)."""
        flags = self.database_flags.get(database)
        if flags is None:
            flags = self.database_flags[database] = DatabaseFlags()
        return flags

    def is_paused(self, database: str) -> bool:
        """Whether pools of ``database`` may hand out servers now."""
        if self.pause_mode != "none" or self.shutdown_mode == "servers":
            return True
        flags = self.database_flags.get(database)
        return flags is not None and flags.paused

    def _apply_pauses(self) -> None:
        for pool in self.pools.values():
            paused = self.is_paused(pool.database)
            if paused and not pool.paused:
                pool.pause()
            elif pool.paused and not paused:
                pool.resume()

    def pools_of(self, database: str | None) -> list[Pool]:
        """The pools of ``database``, or every pool."""
        return [p for p in self.pools.values() if database is None or p.database == database]

    def pause(self, database: str | None, *, suspend: bool = False) -> None:
        """PAUSE (or SUSPEND): hand out no server; close each once free."""
        if database is None:
            self.pause_mode = "suspend" if suspend else "pause"
        else:
            self.db_flags(database).paused = True
        log.warning("paused %s", database or "all databases")
        self._apply_pauses()

    def resume(self, database: str | None) -> None:
        """RESUME: clients that waited meanwhile are served."""
        if database is None:
            self.pause_mode = "none"
        else:
            self.db_flags(database).paused = False
        log.warning("resumed %s", database or "all databases")
        self._apply_pauses()

    async def wait_for_no_servers(self, database: str | None) -> None:
        """Until the pools of ``database`` (or all) have no server left, open or opening."""
        while any(pool.servers or pool.connecting for pool in self.pools_of(database)):
            await asyncio.sleep(POLL)

    def reconnect(self, database: str | None) -> None:
        """RECONNECT: every server is closed once free; new ones open as needed."""
        for pool in self.pools_of(database):
            pool.reconnect_all()

    async def wait_close(self, database: str | None) -> None:
        """WAIT_CLOSE: until the servers RECONNECT or RELOAD marked are closed."""
        while any(pool.close_needed for pool in self.pools_of(database)):
            await asyncio.sleep(POLL)

    def kill(self, database: str | None) -> None:
        """KILL: drop the clients and servers of ``database`` (or all) now; pause it."""
        if database is None:
            self.pause_mode = "pause"
        else:
            self.db_flags(database).paused = True
        log.warning("KILL %s", database or "all databases")
        self._apply_pauses()
        for client in list(self.clients):
            if client.console is None and (database is None or client.database == database):
                client.fatal(codes.PROTOCOL_VIOLATION, "database removed")
        for pool in self.pools_of(database):
            for server in list(pool.servers):
                pool.retire(server)

    def kill_client(self, client_id: int) -> bool:
        """KILL_CLIENT: drop one client; False if no client has that id."""
        for client in self.clients:
            if client.id == client_id and not client.closed:
                client.fatal(codes.PROTOCOL_VIOLATION, "admin forced disconnect")
                return True
        return False

    def begin_shutdown(self, mode: ShutdownMode) -> None:
        """SHUTDOWN: now, or once servers are free / clients are gone. New clients are
        refused meanwhile (the console still answers); asked twice, it exits now."""
        if self._speaks_for_systemd:
            sdnotify.stopping()
        if mode == "immediate" or self.shutdown_mode is not None:
            log.warning("shutting down now")
            self.stop()
            return
        self.shutdown_mode = mode
        log.warning(
            "shutting down once %s",
            "no server is in use" if mode == "servers" else "every client has left",
        )
        self._stop_listening_on_tcp()
        self._apply_pauses()
        self._drain_task = asyncio.get_running_loop().create_task(self._drain(mode))

    def _stop_listening_on_tcp(self) -> None:
        # As PgBouncer: no new TCP connection during a shutdown, so that with so_reuseport
        # the kernel hands new clients to the other processes on the port (a rolling
        # restart); the Unix socket stays open for the console (other logins are refused).
        for listener in list(self._listeners):
            if any(sock.family != socket.AF_UNIX for sock in listener.sockets):
                listener.close()
                self._listeners.remove(listener)

    async def _drain(self, mode: ShutdownMode) -> None:
        while True:
            if mode == "servers":
                done = not any(pool.linked for pool in self.pools.values())
            else:
                done = not any(client.console is None for client in self.clients)
            if done:
                self.stop()
                return
            await asyncio.sleep(POLL)

    def maintain(self, now: float) -> None:
        """The janitor's pass over the daemon: statistics snapshots and the stats line."""
        if self.worker is not None:
            evict_for_other_workers(list(self.pools.values()))
        if self.stats_window.due(now, self.settings.stats_period):
            self.stats_window.snapshot(
                now,
                [
                    (CONSOLE_STATS_KEY, self.console_stats),
                    *((key, p.stats) for key, p in self.pools.items()),
                ],
            )
            if self.settings.log_stats:
                self._log_stats(now)

    def _log_stats(self, now: float) -> None:
        # PgBouncer's periodic line: rates and mean times over the last period, all pools.
        window = self.stats_window
        live, older = Totals(), Totals()
        for key, pool in self.pools.items():
            live.add(Totals.of(pool.stats))
            older.add(window.older_totals(key))
        (_, xacts, queries, received, sent, xact_us, query_us, wait_us, *_) = live.averages(
            older, now - window.older_at
        )
        stats_log.info(
            "stats: %d xacts/s, %d queries/s, in %d B/s, out %d B/s, xact %d us, query %d us, "
            "wait %d us",
            xacts, queries, received, sent, xact_us, query_us, wait_us,
        )  # fmt: skip

    async def readiness_problems(self, reach_timeout: float) -> list[str]:
        """Why pgproxy should not get traffic now (empty: ready). Each configured database
        must be reachable: a logged-in server, else no failed login pending and its
        address accepting TCP connections."""
        problems = []
        if self.shutdown_mode is not None:
            problems.append("shutting down")
        if not self._listeners:
            problems.append("not listening")
        for name, entry in self.settings.databases.items():
            if name == "*":
                continue
            pools = self.pools_of(name)
            if any(pool.servers for pool in pools):
                continue
            failed = next((p.reconnect.last_error for p in pools if p.reconnect.last_error), None)
            if failed is not None:
                problems.append(f"database {name}: {failed}")
            elif not await _reachable(entry.host, entry.port, reach_timeout):
                problems.append(f"database {name}: {entry.host}:{entry.port} unreachable")
        return problems

    def _budget(self, name: str, limit: int) -> ServerBudget:
        """A server budget: this process's, or with workers one shared by all of them."""
        if self.worker is None:
            return ServerBudget(limit)
        return SharedServerBudget(self.worker.budgets, self.worker.index, name, limit)

    def register_cancel_key(self, client: ClientConn) -> tuple[int, bytes]:
        """A fresh random (process id, secret) for ``client``; never a server's key."""
        while True:
            key = cancel.new_key(self.settings.peer_id)
            if key not in self.cancel_keys:
                self.cancel_keys[key] = client
                return key

    def forward_cancel(self, process_id: int, secret_key: bytes) -> None:
        """Cancel what the owner of this key is running now, if anything; else nothing.
        A key another process of the group issued goes to that process (``peers``)."""
        route = cancel.route(process_id, self.settings.peer_id)
        if route is None:
            return
        if route.peer is not None:
            peer = self.settings.peers.get(route.peer)
            if peer is None:
                log.info("cancel request for unknown peer %d: dropped", route.peer)
                return
            target = ServerTarget(peer.host, peer.port, "", "", None)
            self._cancel_tasks.add(
                task := asyncio.ensure_future(
                    cancel_backend(target, route.process_id, secret_key)
                )
            )
            task.add_done_callback(self._cancel_tasks.discard)
            return
        client = self.cancel_keys.get((route.process_id, secret_key))
        server = client.server if client is not None else None
        if server is None or not server.backend_key:
            return
        server.pool.cancel_running_query(server)

    # -- life cycle --------------------------------------------------------------------

    async def start(self) -> None:
        """Bind the listeners and start maintenance; raise OSError if binding fails."""
        if self._stopped is None:
            self._stopped = asyncio.Event()
        self.stats_window = StatsWindow(self.loop_time())
        self._listeners = await start_listeners(self)
        if self.worker is not None and self.worker.unix_socket is not None:
            # The public Unix socket, bound once by the supervisor for every worker.
            self._listeners.append(await listen_on(self, self.worker.unix_socket))
        # With workers, one serves /metrics and the health endpoints (see README).
        if self.settings.metrics_port and (self.worker is None or self.worker.index == 0):
            self._metrics = MetricsServer(self)
            try:
                await self._metrics.start()
            except OSError as exc:
                self._metrics = None
                if "metrics_port" in self.settings.model_fields_set:
                    for listener in self._listeners:
                        listener.close()
                    if self.worker is None:
                        remove_unix_socket(self.settings)
                    reason = os.strerror(exc.errno) if exc.errno else str(exc)
                    raise OSError(f"metrics_port {self.settings.metrics_port}: {reason}") from None
                # The default port is a convenience: a second pgproxy on the host must start
                # where a second PgBouncer would, only without its own /metrics.
                log.warning(
                    "metrics_port %d (the default) cannot be bound (%s): running without "
                    "/metrics, /healthz and /readyz; set metrics_port to choose a port or 0 "
                    "to turn them off",
                    self.settings.metrics_port,
                    os.strerror(exc.errno) if exc.errno else exc,
                )
        self._prewarm()
        self._janitor = Janitor(
            lambda: list(self.pools.values()),
            lambda: list(self.clients),
            lambda: self.settings,
            self.maintain,
        )
        self._janitor.start()
        where = [f"{self.settings.listen_addr}:{self.settings.listen_port}"]
        if self.settings.unix_socket_dir:
            where.append(f"{self.settings.unix_socket_dir}/.s.PGSQL.{self.settings.listen_port}")
        if self._metrics is not None:
            where.append(f"metrics on {self.settings.metrics_addr}:{self.settings.metrics_port}")
        log.info("pgproxy %s listening on %s (pid %d)", __version__, ", ".join(where), os.getpid())
        if self._speaks_for_systemd:
            main_pid = os.getpid() if self.worker is None else os.getppid()
            sdnotify.ready(main_pid, "listening on " + ", ".join(where))

    @property
    def _speaks_for_systemd(self) -> bool:
        # (With workers, the first one speaks for the supervisor: NotifyAccess=all.)
        return self.worker is None or self.worker.index == 0

    def _prewarm(self) -> None:
        # A database with a forced user has a single pool known before any client comes:
        # open its min_pool_size servers now, in the background (PgBouncer does the same).
        settings = self.settings
        for name, entry in settings.databases.items():
            min_size = entry.min_pool_size
            if min_size is None:
                min_size = settings.min_pool_size
            if name != "*" and entry.user and min_size:
                pool = self.pool_for(name, entry.user)
                if pool is not None and pool.min_size:
                    pool.grow()

    async def serve(self) -> None:
        """Run until a stop signal, then shut down."""
        loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        # PgBouncer's meanings; a second SIGINT/SIGTERM exits at once. Installed before
        # the listeners open, so that anyone who can connect can also signal (a worker's
        # supervisor passes SIGHUP on as soon as it gets it).
        loop.add_signal_handler(signal.SIGTERM, self.begin_shutdown, "clients")
        loop.add_signal_handler(signal.SIGINT, self.begin_shutdown, "servers")
        loop.add_signal_handler(signal.SIGQUIT, self.begin_shutdown, "immediate")
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        loop.add_signal_handler(signal.SIGUSR1, self._signal_pause)
        loop.add_signal_handler(signal.SIGUSR2, self._signal_resume)
        await self.start()
        await self._stopped.wait()
        await self.shutdown()

    def _signal_pause(self) -> None:
        if self.pause_mode == "none":
            self.pause(None)

    def _signal_resume(self) -> None:
        if self.pause_mode != "none" and self.shutdown_mode is None:
            self.resume(None)

    def stop(self) -> None:
        """Ask ``serve`` to shut down."""
        if self._stopped is not None:
            self._stopped.set()

    async def shutdown(self) -> None:
        """Close listeners, clients and servers."""
        log.info("shutting down")
        if self._janitor is not None:
            self._janitor.stop()
        if self._drain_task is not None:
            self._drain_task.cancel()
        for listener in self._listeners:
            listener.close()
        if self.worker is None:  # (workers share the supervisor's socket; it removes it)
            remove_unix_socket(self.settings)
        for client in list(self.clients):
            client.fatal(codes.ADMIN_SHUTDOWN, "database is shutting down")
        for pool in self.pools.values():
            pool.close_all()
        if self._metrics is not None:
            self._metrics.close()  # scrapeable until here, through the drain
        await asyncio.sleep(0)  # let transports flush their goodbyes


def client_secrets(settings: Settings) -> dict[str, Secret]:
    """The secrets clients' passwords are checked against; raise ConfigError."""
    secrets = read_userlist(settings.auth_file) if settings.auth_file else {}
    for name, entry in settings.users.items():
        if entry.password is not None:
            try:
                secrets[name] = parse_secret(entry.password.get_secret_value())
            except BadSecret as exc:
                raise ConfigError(f"users.{name}.password: {exc}") from None
    return secrets


def _binding(settings: Settings, context: ssl.SSLContext | None) -> bytes | None:
    """SCRAM-SHA-256-PLUS channel binding data for TLS clients (None without TLS)."""
    if context is None or not settings.client_tls_cert_file:
        return None
    return certificate_hash(settings.client_tls_cert_file)


async def _reachable(host: str, port: int, timeout: float) -> bool:
    try:
        async with asyncio.timeout(timeout):
            if host.startswith("/"):
                _, writer = await asyncio.open_unix_connection(f"{host}/.s.PGSQL.{port}")
            else:
                _, writer = await asyncio.open_connection(host, port)
    except (OSError, TimeoutError):
        return False
    writer.close()
    return True


def _target(entry: DatabaseConfig, database: str, server_user: str) -> ServerTarget:
    return ServerTarget(
        host=entry.host,
        port=entry.port,
        dbname=entry.dbname or database,
        user=server_user,
        password=entry.password.get_secret_value() if entry.password else None,
        round_robin=entry.load_balance_hosts == "round-robin",
    )
