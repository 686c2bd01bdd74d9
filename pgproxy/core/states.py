"""The states of pooled connections, as SHOW SERVERS, SHOW CLIENTS and /metrics name them.

Each state names where its pool keeps the connections in it, and a pool's
``change_server_state`` and ``change_client_state`` are the only ways in or out: each sets
the state and moves the connection in one step, so that the two cannot disagree (PgBouncer
keeps one list per state the same way). A link joins a client and a server: the server's
change makes it and ends it, so a client is ACTIVE exactly while its server is. The
members are strings equal to the names printed, so counts keyed by state read as before.
"""

from __future__ import annotations

from enum import StrEnum


class ServerState(StrEnum):
    """What a server connection is doing, and where its pool keeps it."""

    LOGIN = "login"  # connecting and logging in: counted in Pool.connecting, on no list
    IDLE = "idle"  # Pool.idle, the longest idle first
    ACTIVE = "active"  # linked to a client (server.client), which holds it: on no list
    RESET = "reset"  # Pool.used: running server_reset_query (SHOW SERVERS says 'used')
    TESTED = "tested"  # Pool.tested: running server_check_query or the state check
    BEING_CANCELED = "being_canceled"  # Pool.being_canceled: free, a cancel is under way
    CLOSED = "closed"  # on no list: closing or closed, never used again


class ClientState(StrEnum):
    """What a logged-in pool client is doing, as its pool sees it (PgBouncer's names)."""

    IDLE = "idle"  # no server and not queued: on none of the pool's lists
    WAITING = "waiting"  # Pool.waiters, first come first served
    ACTIVE = "active"  # linked to a server (client.server), made ACTIVE with it
