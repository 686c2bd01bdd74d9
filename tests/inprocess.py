"""Helpers for in-process tests of the pooling core: the real Pool, ServerConn and
ClientConn over in-memory transports (pgproxy.testing), a connector that logs servers in
without PostgreSQL, and the messages the tests send and answer with."""

from __future__ import annotations

import asyncio
import struct
import time

from pgproxy.config import Settings
from pgproxy.core import params as tracked
from pgproxy.core.client import READY, ClientConn
from pgproxy.core.pool import Pool, ServerBudget, ServerTarget
from pgproxy.core.server import ServerConn, ServerLoginError
from pgproxy.protocol import messages
from pgproxy.services.daemon import Daemon
from pgproxy.testing import MemoryTransport

QUERY = messages.query("SELECT 1")
ROWS = (
    messages.message(b"T", b"\0\x01n\0" + b"\0" * 18)
    + messages.message(b"D", b"\0\x01\0\0\0\x011")
    + messages.message(b"C", b"SELECT 1\0")
    + messages.ready_for_query()
)
BEGIN = messages.query("BEGIN")
IN_TRANSACTION = messages.message(b"C", b"BEGIN\0") + messages.ready_for_query(b"T")
WELCOME = [("client_encoding", "UTF8"), ("server_version", "17.0")]


def split(data: bytes) -> list[tuple[bytes, bytes]]:
    """The messages in ``data``: (type byte, payload)."""
    out = []
    offset = 0
    while offset < len(data):
        length = struct.unpack_from("!I", data, offset + 1)[0]
        out.append((data[offset : offset + 1], data[offset + 5 : offset + 1 + length]))
        offset += 1 + length
    return out


def error_of(data: bytes) -> tuple[str, str]:
    """(SQLSTATE, message) of the one ErrorResponse in ``data``."""
    errors = [payload for kind, payload in split(data) if kind == b"E"]
    assert len(errors) == 1, data
    fields = messages.parse_error_fields(errors[0])
    return fields["C"], fields["M"]


class MemoryPostgres:
    """Opens servers for pools over memory transports: each login succeeds at once,
    unless ``refuse`` is set (every login fails with it) or ``hold`` is set (logins wait
    until it is released)."""

    def __init__(self) -> None:
        self.opened: list[ServerConn] = []
        self.refuse: ServerLoginError | None = None
        self.hold: asyncio.Event | None = None

    async def connect(self, pool: Pool, timeout: float) -> ServerConn:
        if self.hold is not None:
            await self.hold.wait()
        if self.refuse is not None:
            raise self.refuse
        server = ServerConn(pool)
        transport = MemoryTransport(("127.0.0.1", 5432))
        transport.protocol = server
        server.connection_made(transport)
        server.connected_at = time.monotonic()
        server.login_params = list(WELCOME)
        server.params = tracked.from_pairs(dict(WELCOME))
        server.backend_pid = 1000 + len(self.opened)
        self.opened.append(server)
        return server

    @staticmethod
    def backend_exits(server: ServerConn) -> None:
        """PostgreSQL ends the backend (after our Terminate, or on its own)."""
        server.connection_lost(None)


def writes(server: ServerConn) -> bytes:
    transport = server.transport
    assert isinstance(transport, MemoryTransport)
    return transport.take()


def received(client: ClientConn) -> bytes:
    transport = client.transport
    assert isinstance(transport, MemoryTransport)
    return transport.take()


def terminated(server: ServerConn) -> bool:
    transport = server.transport
    assert isinstance(transport, MemoryTransport)
    return bytes(transport.written).endswith(messages.TERMINATE)


class Setup:
    """A daemon (never started), a memory PostgreSQL, and pools and clients made on them."""

    def __init__(self, **settings: object) -> None:
        self.settings = Settings.model_validate(
            {"databases": {"db": {"host": "127.0.0.1"}}, "pool_mode": "transaction", **settings}
        )
        self.daemon = Daemon(self.settings)
        self.postgres = MemoryPostgres()

    def pool(
        self, database: str = "db", user: str = "app", budgets: tuple[ServerBudget, ...] = ()
    ) -> Pool:
        entry = self.settings.database("db")
        assert entry is not None
        settings = self.settings.pool_settings(entry, user)
        target = ServerTarget("127.0.0.1", 5432, database, user, None)
        return Pool(database, user, target, settings, budgets, connect=self.postgres.connect)

    def client(self, pool: Pool) -> ClientConn:
        """A logged-in client of ``pool``."""
        client = ClientConn(self.daemon.client_services)
        transport = MemoryTransport()
        transport.protocol = client
        client.connection_made(transport)
        client.state = READY
        client.pool = pool
        client.user, client.database = pool.user, pool.database
        client.params = tracked.from_pairs(dict(WELCOME))
        client.timeouts = self.settings.client_timeouts(
            self.settings.database(pool.database) or self.settings.databases["db"], pool.user
        )
        return client


async def settle() -> None:
    """Let background openings and reported closes run (a bounded number of turns)."""
    for _ in range(20):
        await asyncio.sleep(0)
