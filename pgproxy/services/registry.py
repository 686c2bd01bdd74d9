"""The pools of the running proxy, the server budgets they share, and client admission.

One ``PoolRegistry`` per process: it makes each (database, user) pool when its first
client logs in, with its database's and user's server budgets (shared by every worker
with workers = N), counts clients in against the client caps, and keeps the cancel keys
it gave out. It is what the login asks for a pool; the console and /metrics read it.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING, Generic, TypeVar

from pgproxy import cancel
from pgproxy.client_rules import ClientRules
from pgproxy.config import DatabaseConfig, Settings
from pgproxy.core.client import ClientRegistry
from pgproxy.core.histograms import PoolHistograms
from pgproxy.core.hosts import Topologies
from pgproxy.core.pool import LocalServerBudget, Pool, ServerBudget
from pgproxy.core.server import ServerTarget, cancel_backend
from pgproxy.protocol.prepared import Registry
from pgproxy.services.pause_state import PauseState
from pgproxy.services.workers import SharedServerBudget, WorkerContext
from pgproxy.stats import LoginFailureReason

if TYPE_CHECKING:
    from pgproxy.core.client import ClientConn
    from pgproxy.services.credentials import Credentials

log = logging.getLogger("pgproxy")

# Resolved client rules kept at most (one per database and user that logged in); beyond,
# the cache starts again rather than grow with every user name a trust setup lets in.
CLIENT_RULES_KEPT = 10_000

T = TypeVar("T")


class PairMemo(Generic[T]):
    """Values kept by (database, user), in dictionaries by database, then user: compiled, a
    (str, str) tuple key is built and hashed at every lookup (about 900 instructions with
    its comparison), where two lookups by string use each string's kept hash (and a login
    whose startup packet was seen before has the same string objects). At most ``limit``
    pairs; a full memo starts afresh."""

    def __init__(self, limit: int) -> None:
        self._by_database: dict[str, dict[str, T]] = {}
        self._size = 0
        self._limit = limit

    def get(self, database: str, user: str) -> T | None:
        users = self._by_database.get(database)
        return None if users is None else users.get(user)

    def put(self, database: str, user: str, value: T) -> None:
        if self._size >= self._limit:
            self.clear()
        users = self._by_database.get(database)
        if users is None:
            users = self._by_database[database] = {}
        if user not in users:
            self._size += 1
        users[user] = value

    def clear(self) -> None:
        self._by_database.clear()
        self._size = 0


class PoolRegistry(ClientRegistry):
    """Pools by (database, server user), their budgets, the clients and their cancel keys."""

    def __init__(
        self, settings: Settings, worker: WorkerContext | None, pauses: PauseState,
        credentials: Credentials,
    ) -> None:  # fmt: skip
        self.settings = settings  # (the daemon's, replaced on reload)
        self.worker = worker  # with workers = N: this process is one of them
        self.pauses = pauses
        self.credentials = credentials
        self.pools: dict[tuple[str, str], Pool] = {}
        self.topologies = Topologies()  # roles and lag of the databases' hosts
        # Server budgets shared across pools: per database and per (server) user.
        self.db_budgets: dict[str, ServerBudget] = {}
        self.user_budgets: dict[str, ServerBudget] = {}
        self.statement_registry = Registry()  # named prepared statements, proxy-wide
        self.clients: set[ClientConn] = set()
        # Logged-in clients per database and per user (max_db/user_client_connections).
        # Plain dicts read with .get(name, 0): compiled, a Counter's item access is a
        # generic call through its Python class.
        self.db_clients: dict[str, int] = {}
        self.user_clients: dict[str, int] = {}
        self.login_failures: Counter[LoginFailureReason] = Counter()  # failed logins, by reason
        self.login_timeouts = 0  # of which client_login_timeout
        self.cancel_keys: dict[bytes, ClientConn] = {}  # by key (cancel.new_key)
        # client_rules' and pool_for's answers under the current settings (each login
        # asks for both; pool_for's own lookup goes through the settings model, interpreted).
        self._client_rules: PairMemo[ClientRules] = PairMemo(CLIENT_RULES_KEPT)
        self._login_pools: PairMemo[Pool] = PairMemo(CLIENT_RULES_KEPT)
        self._peer_id = settings.peer_id  # (cancel keys)
        self._cancel_tasks: set[asyncio.Future[None]] = set()  # forwards to peers

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

    def pools_of(self, database: str | None) -> list[Pool]:
        """The pools of ``database``, or every pool."""
        return [p for p in self.pools.values() if database is None or p.database == database]

    def pool_for(self, database: str, user: str) -> Pool | None:
        """The pool serving ``user`` on ``database``; None if no entry serves the database."""
        pool = self._login_pools.get(database, user)
        if pool is not None:
            return pool
        entry = self.settings.database(database)
        if entry is None:
            return None
        # A database entry with a forced user has one pool for all its clients.
        server_user = entry.user or user
        key = (database, server_user)
        pool = self.pools.get(key)
        if pool is None:
            pool = self.pools[key] = self._new_pool(entry, database, server_user)
        self._login_pools.put(database, user, pool)
        return pool

    def _new_pool(self, entry: DatabaseConfig, database: str, server_user: str) -> Pool:
        settings = self.settings
        db_budget = self.db_budgets.get(database)
        if db_budget is None:
            db_budget = self.db_budgets[database] = self._budget(
                f"db:{database}", settings.max_db_connections_for(entry)
            )
        user_budget = self.user_budgets.get(server_user)
        if user_budget is None:
            user_budget = self.user_budgets[server_user] = self._budget(
                f"user:{server_user}", settings.max_user_connections_for(server_user)
            )
        budgets: tuple[ServerBudget, ...] = (db_budget, user_budget)
        if self.worker is not None:
            # pool_size caps the sum over workers: a shared budget of its own, asked
            # first (the one most often full).
            pool_budget = self._budget(f"pool:{database}/{server_user}", 0, per_pool=True)
            budgets = (pool_budget, *budgets)
        query_wait_timeout = settings.client_timeouts(entry, server_user).query_wait
        pool = Pool(
            database,
            server_user,
            server_target(entry, database, server_user),
            settings.pool_settings(entry, server_user),
            budgets,
            paused=self.pauses.is_paused(database),
            server_tls=self.credentials.server_tls,
            credential_for=self.credentials.server_credential,
            statement_registry=self.statement_registry,
            query_wait_timeout=query_wait_timeout,
            histograms=PoolHistograms(query_wait_timeout) if settings.metrics_port else None,
        )
        self.topologies.attach(pool, entry)
        return pool

    def _budget(self, name: str, limit: int, *, per_pool: bool = False) -> ServerBudget:
        """A server budget: this process's, or with workers one shared by all of them
        (``per_pool``: the limit is its pool's size, summed over the workers)."""
        if self.worker is None:
            return LocalServerBudget(limit)
        return SharedServerBudget(
            self.worker.budgets, self.worker.index, name, limit, per_pool=per_pool
        )

    def client_rules(self, database: str, user: str) -> ClientRules | None:
        """The rules for a client of ``user`` on ``database`` (None: no entry serves the
        database), resolved once per pair and settings: every login asks."""
        rules = self._client_rules.get(database, user)
        if rules is None:
            settings = self.settings
            entry = settings.database(database)
            if entry is None:
                return None
            rules = settings.client_rules(entry, user)
            self._client_rules.put(database, user, rules)
        return rules

    def reconfigure(self, settings: Settings) -> None:
        """New settings (RELOAD, SET): resize and retarget every pool in place. When the
        server TLS settings changed, every server is closed once free (PgBouncer's
        "obsolete connection"), so that none keeps the old ones."""
        tls_changed = _server_tls_settings(self.settings) != _server_tls_settings(settings)
        self.settings = settings
        self._client_rules.clear()
        self._login_pools.clear()
        self._peer_id = settings.peer_id
        for client in self.logged_in_clients():
            console = client.console is not None
            rules = None if console else self.client_rules(client.database, client.user)
            if rules is not None:
                client.timeouts = rules.timeouts
        for pool in self.pools.values():
            entry = settings.database(pool.database)
            if entry is None:
                log.info("database %s is no longer configured; it drains", pool.database)
                continue
            pool.query_wait_timeout = settings.client_timeouts(entry, pool.user).query_wait
            pool.server_tls = self.credentials.server_tls
            self.db_budgets[pool.database].limit = settings.max_db_connections_for(entry)
            self.user_budgets[pool.user].limit = settings.max_user_connections_for(pool.user)
            pool.reconfigure(
                settings.pool_settings(entry, pool.user),
                server_target(entry, pool.database, pool.user),
            )
            if tls_changed and pool.servers:
                log.info(
                    "pool %s: server TLS settings changed: obsolete connections are closed "
                    "once free", pool.name,
                )  # fmt: skip
                pool.reconnect_all()
            self.topologies.attach(pool, entry)
        for client in self.logged_in_clients():
            if client.pool is not None:
                client.statements_setting_changed()

    # -- client admission --------------------------------------------------------------

    def admit_client(
        self, database: str, user: str, rules: ClientRules | None, *, console: bool = False,
        exempt: bool = False,
    ) -> str | None:  # fmt: skip
        """Count a client in, or say which client cap (PgBouncer's words) refuses it.

        ``rules``: client_rules(database, user), which the login has asked already (None
        for the console). ``console``: a console login (``database`` is then the console's
        name). It counts under the global caps, and an admin_users member (or ``exempt``:
        the local pgbouncer user) is counted but never refused, as in PgBouncer, so that an
        operator can always get in."""
        settings = self.settings
        if rules is not None:
            db_limit, user_limit = rules.db_limit, rules.user_limit
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
            if 0 < db_limit <= self.db_clients.get(database, 0):
                return "client connections exceeded (max_db_client_connections)"
            if 0 < user_limit <= self.user_clients.get(user, 0):
                return "client connections exceeded (max_user_client_connections)"
        self.db_clients[database] = self.db_clients.get(database, 0) + 1
        self.user_clients[user] = self.user_clients.get(user, 0) + 1
        return None

    def client_left(self, database: str, user: str) -> None:
        """Count out a client that admit_client counted in."""
        # (Not ``-= 1``: compiled, that is a generic in-place subtraction on objects.)
        self.db_clients[database] = self.db_clients[database] - 1
        self.user_clients[user] = self.user_clients[user] - 1
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

    # -- cancel keys -------------------------------------------------------------------

    def register_cancel_key(self, client: ClientConn) -> bytes:
        """A fresh random key (process id and secret: cancel.new_key) for ``client``;
        never a server's key."""
        while True:
            key = cancel.new_key(self._peer_id)
            if key not in self.cancel_keys:
                self.cancel_keys[key] = client
                return key

    def forget_cancel_key(self, key: bytes) -> None:
        """The client that held ``key`` has left."""
        # (Not ``pop(key, None)``: compiled, dict.pop with a default is a method call by
        # name, these are two native dict operations; the key's hash is kept in it.)
        if key in self.cancel_keys:
            del self.cancel_keys[key]

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
                task := asyncio.ensure_future(cancel_backend(target, route.process_id, secret_key))
            )
            task.add_done_callback(self._cancel_tasks.discard)
            return
        client = self.cancel_keys.get(cancel.key_of(route.process_id, secret_key))
        server = client.server if client is not None else None
        if server is None or not server.backend_key:
            return
        server.pool.cancel_running_query(server)


def server_target(entry: DatabaseConfig, database: str, server_user: str) -> ServerTarget:
    """Where ``entry``'s pool for ``server_user`` connects, and as whom."""
    return ServerTarget(
        host=entry.host,
        port=entry.port,
        dbname=entry.dbname or database,
        user=server_user,
        password=entry.password.get_secret_value() if entry.password else None,
        round_robin=entry.load_balance_hosts == "round-robin",
    )


def _server_tls_settings(settings: Settings) -> tuple[object, ...]:
    """The settings that decide how servers are asked for TLS (server_tls_*)."""
    return tuple(
        getattr(settings, name) for name in type(settings).model_fields
        if name.startswith("server_tls_")
    )  # fmt: skip
