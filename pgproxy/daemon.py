"""Start-up, the objects every connection shares, signals and shutdown."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
from collections import Counter
from typing import TYPE_CHECKING

from pgproxy import __version__
from pgproxy.config import ConfigError, DatabaseConfig, Settings, load_settings
from pgproxy.janitor import Janitor
from pgproxy.listener import start_listeners
from pgproxy.pool import Pool, ServerBudget, ServerTarget
from pgproxy.protocol import codes

if TYPE_CHECKING:
    from pgproxy.client import ClientConn

log = logging.getLogger("pgproxy")


class Daemon:
    """The running proxy: settings, pools, clients, cancel keys, listeners."""

    def __init__(self, settings: Settings, config_path: str | None = None) -> None:
        self.settings = settings
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
        self._listeners: list[asyncio.Server] = []
        self._stopped: asyncio.Event | None = None
        self._janitor: Janitor | None = None

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
            db_budget = self.db_budgets.setdefault(
                database, ServerBudget(self.settings.max_db_connections_for(entry))
            )
            user_budget = self.user_budgets.setdefault(
                server_user, ServerBudget(self.settings.max_user_connections_for(server_user))
            )
            pool = Pool(
                database,
                server_user,
                target,
                self.settings.pool_settings(entry, server_user),
                (db_budget, user_budget),
            )
            self.pools[key] = pool
        return pool

    def admit_client(self, database: str, user: str) -> str | None:
        """Count a client in, or say which client cap (PgBouncer's words) refuses it."""
        entry = self.settings.database(database)
        if entry is not None:
            db_limit, user_limit = self.settings.client_limits_for(entry, user)
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

    def reload(self) -> bool:
        """Re-read the configuration (SIGHUP); resize and retarget the pools in place.

        Clients stay connected. An invalid file is logged and changes nothing. A pool's
        mode is fixed at creation: a new pool_mode applies to pools created afterwards.
        """
        try:
            settings = load_settings(self.config_path)
        except ConfigError as exc:
            log.error("reload failed, configuration unchanged: %s", exc)
            return False
        self.settings = settings
        for pool in self.pools.values():
            entry = settings.database(pool.database)
            if entry is None:
                log.warning("reload: database %s is no longer configured", pool.database)
                continue
            self.db_budgets[pool.database].limit = settings.max_db_connections_for(entry)
            self.user_budgets[pool.user].limit = settings.max_user_connections_for(pool.user)
            pool.reconfigure(
                settings.pool_settings(entry, pool.user), _target(entry, pool.database, pool.user)
            )
        log.warning("configuration reloaded")
        return True

    def register_cancel_key(self, client: ClientConn) -> tuple[int, bytes]:
        """A fresh random (process id, secret) for ``client``; never a server's key."""
        while True:
            key = (secrets.randbits(31), secrets.token_bytes(4))
            if key not in self.cancel_keys:
                self.cancel_keys[key] = client
                return key

    def forward_cancel(self, process_id: int, secret_key: bytes) -> None:
        """Cancel what the owner of this key is running now, if anything; else nothing."""
        client = self.cancel_keys.get((process_id, secret_key))
        server = client.server if client is not None else None
        if server is None or not server.backend_key:
            return
        server.pool.cancel_running_query(server)

    # -- life cycle --------------------------------------------------------------------

    async def start(self) -> None:
        """Bind the listeners and start maintenance; raise OSError if binding fails."""
        self._stopped = asyncio.Event()
        self._listeners = await start_listeners(self)
        self._prewarm()
        self._janitor = Janitor(
            lambda: list(self.pools.values()), lambda: list(self.clients), lambda: self.settings
        )
        self._janitor.start()
        where = [f"{self.settings.listen_addr}:{self.settings.listen_port}"]
        if self.settings.unix_socket_dir:
            where.append(f"{self.settings.unix_socket_dir}/.s.PGSQL.{self.settings.listen_port}")
        log.info("pgproxy %s listening on %s (pid %d)", __version__, ", ".join(where), os.getpid())

    def _prewarm(self) -> None:
        # A database with a forced user has a single pool known before any client comes:
        # open its min_pool_size servers now, in the background (PgBouncer does the same).
        for name, entry in self.settings.databases.items():
            if name != "*" and entry.user:
                pool = self.pool_for(name, entry.user)
                if pool is not None and pool.min_size:
                    pool.grow()

    async def serve(self) -> None:
        """Run until a stop signal, then shut down."""
        await self.start()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self.stop)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        assert self._stopped is not None
        await self._stopped.wait()
        await self.shutdown()

    def stop(self) -> None:
        """Ask ``serve`` to shut down."""
        if self._stopped is not None:
            self._stopped.set()

    async def shutdown(self) -> None:
        """Close listeners, clients and servers."""
        log.info("shutting down")
        if self._janitor is not None:
            self._janitor.stop()
        for listener in self._listeners:
            listener.close()
        for client in list(self.clients):
            client.fatal(codes.ADMIN_SHUTDOWN, "database is shutting down")
        for pool in self.pools.values():
            pool.close_all()
        await asyncio.sleep(0)  # let transports flush their goodbyes


def _target(entry: DatabaseConfig, database: str, server_user: str) -> ServerTarget:
    return ServerTarget(
        host=entry.host,
        port=entry.port,
        dbname=entry.dbname or database,
        user=server_user,
        password=entry.password.get_secret_value() if entry.password else None,
    )
