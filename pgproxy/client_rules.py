"""What the settings say of the clients of one user on one database: their timeouts and
client caps. ``pgproxy.config`` resolves them, the registry keeps them per pair, and every
login reads them: this module is compiled (``pgproxy.compiled``), so a login reads their
fields from native slots, not by name from an interpreted object. (Their generated
``__init__`` stays interpreted: they are made once per pair and configuration.)"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ClientTimeouts:
    """A client's timeouts in seconds (0: none), resolved at login: the user's setting,
    then the database's (query_wait_timeout only), then the global one, as PgBouncer."""

    query_wait: float = 120.0
    query: float = 0.0
    idle_transaction: float = 0.0
    transaction: float = 0.0
    client_idle: float = 0.0


@dataclass(frozen=True)
class ClientRules:
    """A client's timeouts and client caps (max_db_client_connections,
    max_user_client_connections; 0: none)."""

    timeouts: ClientTimeouts
    db_limit: int
    user_limit: int
