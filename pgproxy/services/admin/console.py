"""A console session: simple queries in, result sets and PgBouncer's errors out.

A client whose database is ``pgbouncer`` (or ``pgproxy``) gets a ``Console`` instead of a
pool. Its queries run one at a time in a task (PAUSE and WAIT_CLOSE wait for the pools);
access is checked again on every command, since RELOAD or SET may change the user lists.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from typing import TYPE_CHECKING

from pgproxy.config import ConfigError
from pgproxy.protocol import codes, messages
from pgproxy.protocol.framing import MAX_CLIENT_MESSAGE, BadFrame, next_message
from pgproxy.services.admin import CONSOLE_DATABASE, show
from pgproxy.services.admin.gather import (
    MERGES,
    METRICS_TEXT,
    NAMED_MERGES,
    PEER_APPLICATION,
    merge_named_values,
    merge_table,
    peer_commands,
    peer_rows,
)
from pgproxy.services.admin.parse import Command, ConsoleSyntaxError, SetCommand, parse_command
from pgproxy.services.admin.resultset import columns, result
from pgproxy.services.metrics import registry_for, render

if TYPE_CHECKING:
    from pgproxy.core.client import ClientConn
    from pgproxy.services.control import DaemonView
    from pgproxy.services.pause_state import ShutdownMode

log = logging.getLogger("pgproxy.admin")

# Parameters some drivers ask about with SHOW/SET; the console answers for itself.
FAKE_PARAMS = {
    "client_encoding": "UTF-8",
    "default_transaction_isolation": "read committed",
    "standard_conforming_strings": "on",
    "datestyle": "ISO",
    "timezone": "GMT",
}
# What a console login is told (PgBouncer's set, with our version).
WELCOME_PARAMS = (
    ("client_encoding", "UTF8"),
    ("server_encoding", "UTF8"),
    ("DateStyle", "ISO"),
    ("TimeZone", "GMT"),
    ("standard_conforming_strings", "on"),
    ("is_superuser", "on"),
)
RELOAD_FAILED = "F0000"  # PgBouncer answers a failed RELOAD with config_file_error


class ConsoleError(Exception):
    """An ERROR for the console user; the session goes on."""

    def __init__(self, message: str, *, sqlstate: str = codes.PROTOCOL_VIOLATION,
                 detail: str | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.message = message
        self.sqlstate = sqlstate
        self.detail = detail


class ConsoleDoor:
    """The way in to the console for a client whose database is the console's name."""

    name = CONSOLE_DATABASE
    welcome_params = WELCOME_PARAMS

    def __init__(self, daemon: DaemonView) -> None:
        self.daemon = daemon

    def may_log_in(self, user: str, local_admin: bool) -> bool:
        """Whether ``user`` may open a console session at all."""
        settings = self.daemon.settings
        return local_admin or user in settings.admin_users or user in settings.stats_users

    def is_peer(self, application_name: str | None) -> bool:
        """Whether a local admin login is another worker's (admin.gather) asking for this
        worker's own rows."""
        return application_name == PEER_APPLICATION

    def open(self, client: ClientConn, *, local_admin: bool, peer: bool) -> Console:
        """The session of ``client``, logged in."""
        return Console(client, self.daemon, local_admin=local_admin, peer=peer)


class Console:
    """The console side of one client connection."""

    def __init__(
        self, client: ClientConn, daemon: DaemonView, *, local_admin: bool, peer: bool = False
    ) -> None:
        self.client = client
        self.peer = peer  # a worker's peer asking for this worker's rows only
        self.daemon = daemon
        # The 'pgbouncer' user over the Unix socket from our own OS user: always admin.
        self.local_admin = local_admin
        self._buffer = bytearray()
        self._task: asyncio.Task[None] | None = None

    # -- access ---------------------------------------------------------------------------

    @property
    def is_admin(self) -> bool:
        return self.local_admin or self.client.user in self.daemon.settings.admin_users

    def _require_admin(self) -> None:
        if not self.is_admin:
            raise ConsoleError("admin access needed")

    # -- input ----------------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Bytes from the client; whole messages are run in order, one at a time."""
        self._buffer += data
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    def stop(self) -> None:
        """The client is gone: drop what it asked and anything still waiting."""
        if self._task is not None and not self._task.done():
            self._task.cancel()

    def _next_message(self) -> tuple[int, bytes] | None:
        try:
            return next_message(self._buffer, MAX_CLIENT_MESSAGE)
        except BadFrame as exc:
            self.client.fatal(codes.PROTOCOL_VIOLATION, str(exc))
            return None

    async def _run(self) -> None:
        client = self.client
        try:
            while not client.closed:
                message = self._next_message()
                if message is None:
                    return
                type_byte, payload = message
                if type_byte == ord("Q"):
                    if not self.peer:  # (another worker's question is not a client's)
                        # PgBouncer counts console queries as the pgbouncer database's.
                        stats = self.daemon.console_stats
                        stats.xact_count += 1
                        stats.query_count += 1
                        stats.received_bytes += 1 + len(payload) + 4
                    query = payload.rstrip(b"\0").decode("utf-8", "replace")
                    client.transport.write(await self.execute(query) + messages.ready_for_query())
                elif type_byte == ord("X"):
                    client.transport.close()
                    return
                elif type_byte in b"PBE":
                    self._refuse("extended query protocol not supported by admin console")
                    return
                else:
                    self._refuse(f"unsupported packet type for admin console: {chr(type_byte)}")
                    return
        except Exception:
            log.exception("console: internal error")
            client.fatal(codes.INTERNAL_ERROR, "pgproxy internal error in the console")

    def _refuse(self, text: str) -> None:
        # PgBouncer answers with an ERROR and then closes the connection.
        self.client.transport.write(messages.error_response(codes.PROTOCOL_VIOLATION, text))
        self.client.fatal(codes.PROTOCOL_VIOLATION, text)

    # -- commands -------------------------------------------------------------------------

    async def execute(self, query: str) -> bytes:
        """The answer to one query, without its ReadyForQuery."""
        try:
            try:
                command = parse_command(query)
            except ConsoleSyntaxError:
                raise ConsoleError(f"invalid command '{query}', use SHOW HELP;") from None
            if isinstance(command, SetCommand):
                answer = self._set(command)
                if command.key not in FAKE_PARAMS:
                    await self._on_other_workers(query)
                return answer
            return await self._command(command, query)
        except ConsoleError as exc:
            log.info("console %s: %s", self.client.user, exc.message)
            return messages.error_response(exc.sqlstate, exc.message, detail=exc.detail)

    async def _command(self, command: Command, query: str) -> bytes:
        verb, arg = command.verb, command.arg
        if verb in ("show", "select"):
            return await self._show(arg.lower(), query)
        handler = _CONTROL.get(verb)
        if handler is None:
            raise ConsoleError(f"invalid command '{query}', use SHOW HELP;")
        self._require_admin()
        log.info("console %s: %s", self.client.user, query.strip())
        if self._fans_out and verb == "shutdown":
            return self._shutdown_all(arg)
        if self._fans_out and verb == "kill_client":
            return await self._kill_client_anywhere(arg, query)
        answer = await handler(self, arg)
        await self._on_other_workers(query)
        return answer

    # -- workers = N: one console for all of them ---------------------------------------------

    @property
    def _fans_out(self) -> bool:
        """This session speaks for every worker (not a peer asking for its worker only)."""
        return self.daemon.worker is not None and not self.peer

    async def _on_other_workers(self, query: str) -> None:
        worker = self.daemon.worker
        if worker is None or self.peer:
            return
        port = self.daemon.settings.listen_port
        for index, error in enumerate(await peer_commands(worker, query, port)):
            if error is not None:
                log.error("console: %r failed on another worker (%d): %s", query, index, error)

    def _shutdown_all(self, arg: str) -> bytes:
        # The supervisor passes the signal to every worker (this one included).
        signals = {"": signal.SIGQUIT, "wait_for_servers": signal.SIGINT,
                   "wait_for_clients": signal.SIGTERM}  # fmt: skip
        signum = signals.get(arg.lower())
        if signum is None:
            raise ConsoleError(f"invalid command 'SHUTDOWN {arg}', use SHOW HELP;")
        asyncio.get_running_loop().call_soon(os.kill, os.getppid(), signum)
        return _done("SHUTDOWN")

    async def _kill_client_anywhere(self, arg: str, query: str) -> bytes:
        if not arg.isdigit():
            raise ConsoleError("invalid client pointer supplied")
        if self.daemon.control.kill_client(int(arg)):
            return _done("KILL_CLIENT")
        worker = self.daemon.worker
        assert worker is not None
        answers = await peer_commands(worker, query, self.daemon.settings.listen_port)
        if any(error is None for error in answers):
            return _done("KILL_CLIENT")
        raise ConsoleError("client not found")

    async def _show(self, what: str, query: str) -> bytes:
        if what in FAKE_PARAMS:
            return result(columns("s", what), [[FAKE_PARAMS[what]]])
        if what == "help":
            notice = messages.notice_response("Console usage", detail=show.HELP)
            return notice + messages.message(b"C", messages.cstring("SHOW"))
        if what == "fds":
            raise ConsoleError("SHOW FDS is not supported: pgproxy has no online restart")
        if what == METRICS_TEXT and self.peer:
            text = render(registry_for(self.daemon)).decode()
            return result(columns("s", "metrics"), [[text]])
        table = show.SHOW_TABLES.get(what)
        if table is None:
            raise ConsoleError(f"invalid command '{query}', use SHOW HELP;")
        cols, rows = table(self.daemon)
        worker = self.daemon.worker
        if worker is not None and not self.peer and (what in MERGES or what in NAMED_MERGES):
            others = await peer_rows(worker, query, self.daemon.settings.listen_port)
            if what in NAMED_MERGES:
                rows = merge_named_values(NAMED_MERGES[what], [rows, *others])
            else:
                rows = merge_table(MERGES[what], cols, [rows, *others])
        return result(cols, rows)

    def _set(self, command: SetCommand) -> bytes:
        if command.key in FAKE_PARAMS:
            notice = messages.notice_response("SET ignored")
            return notice + messages.message(b"C", messages.cstring("SET"))
        self._require_admin()
        try:
            self.daemon.set_setting(command.key, command.value)
        except ConfigError as exc:
            raise ConsoleError("SET failed", detail=str(exc)) from None
        log.info("console %s: SET %s", self.client.user, command.key)
        return messages.message(b"C", messages.cstring(f"SET {command.key}={command.value}"))

    # -- control commands (admin only) ------------------------------------------------------

    def _database(self, name: str, action: str) -> str:
        """``name`` if it is a database pgproxy serves; PgBouncer's errors otherwise."""
        if name in show.ADMIN_DB_NAMES:
            raise ConsoleError(f"cannot {action} admin db: {name}")
        if self.daemon.settings.database(name) is None:
            raise ConsoleError(f"no such database: {name}")
        return name

    async def _pause(self, arg: str) -> bytes:
        daemon = self.daemon
        if daemon.pauses.pause_mode != "none":
            raise ConsoleError("already suspended/paused")
        database = self._database(arg, "pause") if arg else None
        daemon.control.pause(database)
        await daemon.control.wait_for_no_servers(database)
        return _done("PAUSE")

    async def _suspend(self, arg: str) -> bytes:
        daemon = self.daemon
        if arg:
            raise ConsoleError(f"invalid command 'SUSPEND {arg}', use SHOW HELP;")
        if daemon.pauses.pause_mode != "none":
            raise ConsoleError("already suspended/paused")
        if any(flags.paused for flags in daemon.pauses.database_flags.values()):
            raise ConsoleError("cannot suspend with paused databases")
        daemon.control.pause(None, suspend=True)
        await daemon.control.wait_for_no_servers(None)
        return _done("SUSPEND")

    async def _resume(self, arg: str) -> bytes:
        daemon = self.daemon
        if not arg:
            if daemon.pauses.shutdown_mode is not None:
                raise ConsoleError("pooler is shutting down")
            if daemon.pauses.pause_mode == "none":
                raise ConsoleError("pooler is not paused/suspended")
            daemon.control.resume(None)
        else:
            if daemon.settings.database(arg) is None:
                raise ConsoleError(f"no such database: {arg}")
            if not daemon.pauses.db_flags(arg).paused:
                raise ConsoleError(f"database {arg} is not paused")
            daemon.control.resume(arg)
        return _done("RESUME")

    async def _disable(self, arg: str) -> bytes:
        if not arg:
            raise ConsoleError("a database is required")
        self.daemon.pauses.db_flags(self._database(arg, "disable")).disabled = True
        return _done("DISABLE")

    async def _enable(self, arg: str) -> bytes:
        if not arg:
            raise ConsoleError("a database is required")
        self.daemon.pauses.db_flags(self._database(arg, "enable")).disabled = False
        return _done("ENABLE")

    async def _reconnect(self, arg: str) -> bytes:
        self.daemon.control.reconnect(self._database(arg, "reconnect") if arg else None)
        return _done("RECONNECT")

    async def _kill(self, arg: str) -> bytes:
        if self.daemon.pauses.pause_mode != "none":
            raise ConsoleError("already suspended/paused")
        self.daemon.control.kill(self._database(arg, "kill") if arg else None)
        return _done("KILL")

    async def _kill_client(self, arg: str) -> bytes:
        if not arg.isdigit():
            raise ConsoleError("invalid client pointer supplied")
        if not self.daemon.control.kill_client(int(arg)):
            raise ConsoleError("client not found")
        return _done("KILL_CLIENT")

    async def _wait_close(self, arg: str) -> bytes:
        database = self._database(arg, "wait in") if arg else None
        await self.daemon.control.wait_close(database)
        return _done("WAIT_CLOSE")

    async def _reload(self, arg: str) -> bytes:
        if arg:
            raise ConsoleError(f"invalid command 'RELOAD {arg}', use SHOW HELP;")
        if not self.daemon.reload():
            raise ConsoleError(
                "RELOAD failed, see logs for additional details", sqlstate=RELOAD_FAILED
            )
        return _done("RELOAD")

    async def _shutdown(self, arg: str) -> bytes:
        modes: dict[str, ShutdownMode] = {
            "": "immediate",
            "wait_for_servers": "servers",
            "wait_for_clients": "clients",
        }
        chosen = modes.get(arg.lower())
        if chosen is None:
            raise ConsoleError(f"invalid command 'SHUTDOWN {arg}', use SHOW HELP;")
        self.daemon.begin_shutdown(chosen)
        return _done("SHUTDOWN")


def _done(tag: str) -> bytes:
    return messages.message(b"C", messages.cstring(tag))


_CONTROL = {
    "disable": Console._disable,
    "enable": Console._enable,
    "kill": Console._kill,
    "kill_client": Console._kill_client,
    "pause": Console._pause,
    "reconnect": Console._reconnect,
    "reload": Console._reload,
    "resume": Console._resume,
    "shutdown": Console._shutdown,
    "suspend": Console._suspend,
    "wait_close": Console._wait_close,
}
