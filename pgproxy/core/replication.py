"""Replication connections (``replication=true`` or ``replication=database`` at startup).

PgBouncer (1.23+) passes them through: such a client gets a server connection of its own,
opened with its startup parameters, used by it alone and closed when it leaves; the
stream is relayed as it is (COPY BOTH carries the WAL), with nothing parsed. pgproxy does
the same. A pool's ``pool_size`` caps its replication connections too (they wait for a
place up to ``query_wait_timeout``); they are never pooled, so they do not count in the
pool's own servers or in ``max_db_connections``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Literal

from pgproxy.core.server import (
    LinkedClient,
    ServerConn,
    ServerLoginError,
    connect_server,
)
from pgproxy.protocol import codes, messages

if TYPE_CHECKING:
    from pgproxy.core.pool import Pool

log = logging.getLogger("pgproxy.replication")

ReplicationMode = Literal["none", "physical", "logical"]

# Startup parameters not passed on as the client sent them (the pool decides both).
_MAPPED = frozenset({"user", "database"})


def replication_mode(value: str | None) -> ReplicationMode:
    """PostgreSQL's reading of the ``replication`` startup parameter; ValueError if bad."""
    if value is None:
        return "none"
    lowered = value.lower()
    if lowered == "database":
        return "logical"
    if lowered in ("true", "on", "yes", "1"):
        return "physical"
    if lowered in ("false", "off", "no", "0"):
        return "none"
    raise ValueError(f'invalid value for parameter "replication": "{value}"')


class ReplicationServerConn(ServerConn):
    """A server connection that relays everything to its one client after the login."""

    def data_received(self, data: bytes) -> None:
        client = self.client
        if client is None:  # still logging in
            super().data_received(data)
            return
        client.send(data)

    def connection_lost(self, exc: Exception | None) -> None:
        # Never in a pool's lists (its state stays LOGIN until it closes): nothing to give
        # back there; a relaying client ends with it.
        client, self.client = self.client, None
        super().connection_lost(exc)  # (during the login: wakes it, and it fails)
        if client is not None:
            client.transport.close()


def slots_of(pool: Pool) -> asyncio.Semaphore:
    """The pool's places for replication connections (pool_size of them)."""
    slots = pool.replication_slots
    if slots is None:
        slots = pool.replication_slots = asyncio.Semaphore(pool.size)
    return slots


async def start_replication(client: LinkedClient, pool: Pool, params: dict[str, str]) -> None:
    """Give ``client`` a replication server of its own and relay between them.

    Runs as the client's login task: a failure ends the client with the server's error."""
    slots = slots_of(pool)
    wait = pool.query_wait_timeout or None
    try:
        async with asyncio.timeout(wait):
            await slots.acquire()
    except TimeoutError:
        client.fatal(codes.PROTOCOL_VIOLATION, "query_wait_timeout", reason="timeout")
        return
    client.replication_slot = slots
    extra = {name: value for name, value in params.items() if name not in _MAPPED}
    try:
        server = await connect_server(
            pool, pool.connect_timeout, factory=ReplicationServerConn, startup=extra
        )
    except ServerLoginError as exc:
        client.fatal(exc.sqlstate, exc.message, reason="server_login_failed")
        return
    if client.closed:
        server.transport.close()
        return
    server.client = client
    client.start_relay(server)
    welcome = [messages.AUTHENTICATION_OK]
    welcome += [messages.parameter_status(name, value) for name, value in server.login_params]
    assert client.cancel_key is not None
    welcome.append(messages.backend_key_data_of(client.cancel_key))
    welcome.append(messages.ready_for_query(chr(server.scan.status).encode()))
    client.transport.write(b"".join(welcome))
    log.debug("%s: replication connection to backend %d", client.describe(), server.backend_pid)
