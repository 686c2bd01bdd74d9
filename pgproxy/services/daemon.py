"""The running proxy: the parts every connection shares, put together, and their life
cycle (start, signals, reload, shutdown).

``Daemon`` is the composition root: it builds the pause state, the credentials, the pool
registry and the console's control over them, hands them to each client connection (it
is the clients' ``ClientHost``) and to the console and /metrics (``DaemonView``), and
runs the listeners, the janitor and the metrics endpoint.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time

from pgproxy import __version__, logs
from pgproxy.config import RESTART_ONLY, ConfigError, Settings, changed_setting
from pgproxy.config_file import load_settings
from pgproxy.core import params as tracked
from pgproxy.core.client import ClientServices, LoginSettings
from pgproxy.core.janitor import Janitor
from pgproxy.protocol import codes
from pgproxy.services import sdnotify
from pgproxy.services.admin import CONSOLE_DATABASES
from pgproxy.services.admin.console import ConsoleDoor
from pgproxy.services.control import ConsoleControl
from pgproxy.services.credentials import Credentials
from pgproxy.services.http import MetricsServer
from pgproxy.services.listener import listen_on, remove_unix_socket, start_listeners
from pgproxy.services.pause_state import PauseState, ShutdownMode
from pgproxy.services.registry import PoolRegistry
from pgproxy.services.workers import WorkerContext, evict_for_other_workers
from pgproxy.sockopts import keepalive_from, set_listener_keepalive
from pgproxy.stats import CONSOLE_STATS_KEY, PoolStats, StatsWindow, Totals, set_connection_id_base

log = logging.getLogger("pgproxy")
# The periodic stats line is logged at INFO whatever -v says, as PgBouncer's log_stats.
stats_log = logging.getLogger("pgproxy.stats")
stats_log.setLevel(logging.INFO)

POLL = 0.05  # seconds between checks while a shutdown waits
WORKER_ID_RANGE = 1_000_000_000  # connection ids of worker i start at (i + 1) * this


class Daemon:
    """The running proxy: its settings, its parts, its listeners and maintenance."""

    def __init__(
        self, settings: Settings, config_path: str | None = None,
        worker: WorkerContext | None = None,
    ) -> None:  # fmt: skip
        """Read the files the settings name (raise ConfigError) and build the parts;
        nothing listens before ``start``."""
        # With workers = N: this process is one of them (its settings adjusted to it).
        self.worker = worker
        if worker is not None:
            settings = worker.apply(settings)
            set_connection_id_base((worker.index + 1) * WORKER_ID_RANGE)
        self.settings = settings
        tracked.configure(settings.track_extra_parameters)  # (read at start only)
        logs.set_verbose(settings.verbose)
        self.keepalive = keepalive_from(settings)  # set on the TCP listeners
        self.config_path = config_path
        self.pauses = PauseState()
        self.credentials = Credentials(settings, self.pauses)  # secrets, TLS, hba rules
        self.registry = PoolRegistry(settings, worker, self.pauses, self.credentials)
        self.control = ConsoleControl(self.registry, self.pauses)
        self.consoles = ConsoleDoor(self)
        # What the clients read of this daemon (the listeners' factory takes it).
        self.client_services = ClientServices(self, LoginSettings(settings, CONSOLE_DATABASES))
        self.stats_window = StatsWindow(0.0)  # restarted by start()
        self.console_stats = PoolStats()  # the console's queries (SHOW STATS 'pgbouncer')
        self._metrics: MetricsServer | None = None
        self._listeners: list[asyncio.Server] = []
        self._stopped: asyncio.Event | None = None
        self._janitor: Janitor | None = None
        self._drain_task: asyncio.Task[None] | None = None

    def loop_time(self) -> float:
        """The clock every timestamp in pgproxy is taken with: time.monotonic (uvloop's
        loop.time() only has millisecond steps, too coarse for query times)."""
        return time.monotonic()

    # -- configuration -----------------------------------------------------------------

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

    def _apply_settings(self, settings: Settings, *, one_tls_key: str | None = None) -> None:
        # (Raises ConfigError before anything changes.)
        self.credentials.reload(settings, one_tls_key=one_tls_key)
        self.settings = settings
        self.client_services.login_settings = LoginSettings(settings, CONSOLE_DATABASES)
        self.keepalive = keepalive_from(settings)
        self._set_listener_keepalive()  # (for the clients accepted from now on)
        logs.set_verbose(settings.verbose)
        self.registry.reconfigure(settings)

    # -- shutdown ----------------------------------------------------------------------

    def begin_shutdown(self, mode: ShutdownMode) -> None:
        """SHUTDOWN: now, or once servers are free / clients are gone. New clients are
        refused meanwhile (the console still answers); asked twice, it exits now."""
        if self._speaks_for_systemd:
            sdnotify.stopping()
        if mode == "immediate" or self.pauses.shutdown_mode is not None:
            log.info("shutting down now")
            self.stop()
            return
        self.pauses.shutdown_mode = mode
        log.info(
            "shutting down once %s",
            "no server is in use" if mode == "servers" else "every client has left",
        )
        self._stop_listening_on_tcp()
        self.control.apply_pauses()
        if mode == "servers":
            for pool in self.registry.pools.values():
                pool.shut_down()
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
                done = not any(pool.linked for pool in self.registry.pools.values())
            else:
                done = not any(client.console is None for client in self.registry.clients)
            if done:
                self.stop()
                return
            await asyncio.sleep(POLL)

    def maintain(self, now: float) -> None:
        """The janitor's pass over the daemon: statistics snapshots and the stats line."""
        if self.worker is not None:
            evict_for_other_workers(list(self.registry.pools.values()))
        if self.stats_window.due(now, self.settings.stats_period):
            self.stats_window.snapshot(
                now,
                [
                    (CONSOLE_STATS_KEY, self.console_stats),
                    *((key, p.stats) for key, p in self.registry.pools.items()),
                ],
            )
            if self.settings.log_stats:
                self._log_stats(now)

    def _log_stats(self, now: float) -> None:
        # PgBouncer's periodic line: rates and mean times over the last period, all pools.
        window = self.stats_window
        live, older = Totals(), Totals()
        for key, pool in self.registry.pools.items():
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
        if self.pauses.shutdown_mode is not None:
            problems.append("shutting down")
        if not self._listeners:
            problems.append("not listening")
        for name, entry in self.settings.databases.items():
            if name == "*":
                continue
            pools = self.registry.pools_of(name)
            if any(pool.servers for pool in pools):
                continue
            failed = next((p.reconnect.last_error for p in pools if p.reconnect.last_error), None)
            if failed is not None:
                problems.append(f"database {name}: {failed}")
            elif not await _reachable(entry.host, entry.port, reach_timeout):
                problems.append(f"database {name}: {entry.host}:{entry.port} unreachable")
        return problems

    def _set_listener_keepalive(self) -> None:
        # TCP clients inherit the keepalive options of the socket that accepted them.
        for listener in self._listeners:
            for sock in listener.sockets:
                set_listener_keepalive(sock, self.keepalive)

    # -- life cycle --------------------------------------------------------------------

    async def start(self) -> None:
        """Bind the listeners and start maintenance; raise OSError if binding fails."""
        if self._stopped is None:
            self._stopped = asyncio.Event()
        self.stats_window = StatsWindow(self.loop_time())
        self._listeners = await start_listeners(self.client_services)
        if self.worker is not None and self.worker.unix_socket is not None:
            # The public Unix socket, bound once by the supervisor for every worker.
            self._listeners.append(await listen_on(self.client_services, self.worker.unix_socket))
        self._set_listener_keepalive()
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
            lambda: list(self.registry.pools.values()),
            lambda: list(self.registry.clients),
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
                pool = self.registry.pool_for(name, entry.user)
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
        if self.pauses.pause_mode == "none":
            self.control.pause(None)

    def _signal_resume(self) -> None:
        if self.pauses.pause_mode != "none" and self.pauses.shutdown_mode is None:
            self.control.resume(None)

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
        for client in list(self.registry.clients):
            client.fatal(codes.ADMIN_SHUTDOWN, "database is shutting down")
        for pool in self.registry.pools.values():
            pool.close_all()
        if self._metrics is not None:
            self._metrics.close()  # scrapeable until here, through the drain
        await asyncio.sleep(0)  # let transports flush their goodbyes


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
