"""The states of pooled connections, as SHOW SERVERS, SHOW CLIENTS and /metrics name them.

Each state names the collection of the pool that holds the connections in it, and a
pool's ``change_server_state`` and ``change_client_state`` are the only writers of a
state: they set it and move the connection between those collections in one step, so that
the two cannot disagree (PgBouncer keeps one list per state the same way). The members
are strings equal to the names printed, so counts keyed by state read as before.
"""

from __future__ import annotations

from enum import StrEnum


class ServerState(StrEnum):
    """What a server connection is doing, and where its pool keeps it."""

    LOGIN = "login"  # connecting and logging in: counted in Pool.connecting, on no list
    IDLE = "idle"  # Pool.idle, the longest idle first
    ACTIVE = "active"  # Pool.active: linked to a client
    RESET = "reset"  # Pool.used: running server_reset_query (SHOW SERVERS says 'used')
    TESTED = "tested"  # Pool.tested: running server_check_query or the state check
    BEING_CANCELED = "being_canceled"  # Pool.being_canceled: free, a cancel is under way
    CLOSED = "closed"  # on no list: closing or closed, never used again


class ClientState(StrEnum):
    """What a logged-in pool client is doing, as its pool sees it (PgBouncer's names)."""

    IDLE = "idle"  # no server and not queued: on none of the pool's lists
    WAITING = "waiting"  # Pool.waiters, first come first served
    ACTIVE = "active"  # linked: the client of one of Pool.active's servers
