"""The console's control verbs over the pools: PAUSE, RESUME, SUSPEND, KILL, KILL_CLIENT,
RECONNECT, WAIT_CLOSE; and what the console and /metrics see of the running daemon.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Protocol

from pgproxy.protocol import codes
from pgproxy.services.pause_state import PauseState, ShutdownMode
from pgproxy.services.registry import PoolRegistry

if TYPE_CHECKING:
    from pgproxy.config import Settings
    from pgproxy.services.credentials import Credentials
    from pgproxy.services.workers import WorkerContext
    from pgproxy.stats import PoolStats, StatsWindow

log = logging.getLogger("pgproxy")

POLL = 0.05  # seconds between checks while a console command waits


class ConsoleControl:
    """Pause, resume, kill and reconnect the pools of one database or of all."""

    def __init__(self, registry: PoolRegistry, pauses: PauseState) -> None:
        self.registry = registry
        self.pauses = pauses

    def apply_pauses(self) -> None:
        """Pause or resume each pool as the pause state now says."""
        for pool in self.registry.pools.values():
            paused = self.pauses.is_paused(pool.database)
            if paused and not pool.paused:
                pool.pause()
            elif pool.paused and not paused:
                pool.resume()

    def pause(self, database: str | None, *, suspend: bool = False) -> None:
        """PAUSE (or SUSPEND): hand out no server; close each once free."""
        if database is None:
            self.pauses.pause_mode = "suspend" if suspend else "pause"
        else:
            self.pauses.db_flags(database).paused = True
        log.info("paused %s", database or "all databases")
        self.apply_pauses()

    def resume(self, database: str | None) -> None:
        """RESUME: clients that waited meanwhile are served."""
        if database is None:
            self.pauses.pause_mode = "none"
        else:
            self.pauses.db_flags(database).paused = False
        log.info("resumed %s", database or "all databases")
        self.apply_pauses()

    async def wait_for_no_servers(self, database: str | None) -> None:
        """Until the pools of ``database`` (or all) have no server left, open or opening."""
        while any(pool.servers or pool.connecting for pool in self.registry.pools_of(database)):
            await asyncio.sleep(POLL)

    def reconnect(self, database: str | None) -> None:
        """RECONNECT: every server is closed once free; new ones open as needed."""
        for pool in self.registry.pools_of(database):
            pool.reconnect_all()

    async def wait_close(self, database: str | None) -> None:
        """WAIT_CLOSE: until the servers RECONNECT or RELOAD marked are closed."""
        while any(pool.close_needed for pool in self.registry.pools_of(database)):
            await asyncio.sleep(POLL)

    def kill(self, database: str | None) -> None:
        """KILL: drop the clients and servers of ``database`` (or all) now; pause it."""
        if database is None:
            self.pauses.pause_mode = "pause"
        else:
            self.pauses.db_flags(database).paused = True
        log.info("KILL %s", database or "all databases")
        self.apply_pauses()
        for client in list(self.registry.clients):
            if client.console is None and (database is None or client.database == database):
                client.fatal(codes.PROTOCOL_VIOLATION, "database removed")
        for pool in self.registry.pools_of(database):
            for server in list(pool.servers):
                pool.retire(server)

    def kill_client(self, client_id: int) -> bool:
        """KILL_CLIENT: drop one client; False if no client has that id."""
        for client in self.registry.clients:
            if client.id == client_id and not client.closed:
                client.fatal(codes.PROTOCOL_VIOLATION, "admin forced disconnect")
                return True
        return False


class DaemonView(Protocol):
    """What the console, SHOW and /metrics use of the running daemon (pgproxy.services.daemon)."""

    settings: Settings
    worker: WorkerContext | None
    registry: PoolRegistry
    credentials: Credentials
    pauses: PauseState
    control: ConsoleControl
    stats_window: StatsWindow
    console_stats: PoolStats  # the console's queries (SHOW STATS 'pgbouncer')

    def loop_time(self) -> float: ...

    def reload(self) -> bool: ...

    def set_setting(self, key: str, value: str) -> None: ...

    def begin_shutdown(self, mode: ShutdownMode) -> None: ...

    async def readiness_problems(self, reach_timeout: float) -> list[str]: ...
