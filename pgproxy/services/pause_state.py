"""What the console and the signals set on databases: paused, disabled, shutting down.

Plain state with no pools in it: the pool registry asks it whether a new pool starts
paused, the login whether a database takes clients; the console's verbs change it
(pgproxy.services.control) and then apply it to the pools.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pgproxy.core.client import DatabaseGate

PauseMode = Literal["none", "pause", "suspend"]
# SHUTDOWN's modes: exit now, once no server is linked, once no client is left.
ShutdownMode = Literal["immediate", "servers", "clients"]


@dataclass(slots=True)
class DatabaseFlags:
    """What the console set on one database: PAUSE/KILL and DISABLE."""

    paused: bool = False
    disabled: bool = False


class PauseState(DatabaseGate):
    """The proxy-wide pause mode, the shutdown under way, and each database's flags."""

    def __init__(self) -> None:
        self.pause_mode: PauseMode = "none"
        self.shutdown_mode: ShutdownMode | None = None
        self.database_flags: dict[str, DatabaseFlags] = {}

    @property
    def shutting_down(self) -> bool:
        """A SHUTDOWN (or a stop signal) is waiting for servers or clients to finish."""
        return self.shutdown_mode is not None

    def db_flags(self, database: str) -> DatabaseFlags:
        """The console flags of ``database`` (created clear)."""
        flags = self.database_flags.get(database)
        if flags is None:
            flags = self.database_flags[database] = DatabaseFlags()
        return flags

    def is_paused(self, database: str) -> bool:
        """Whether pools of ``database`` may hand out servers now."""
        if self.pause_mode != "none" or self.shutdown_mode == "servers":
            return True
        flags = self.database_flags.get(database)
        return flags is not None and flags.paused

    def is_disabled(self, database: str) -> bool:
        """DISABLE: ``database`` takes no new client."""
        flags = self.database_flags.get(database)
        return flags is not None and flags.disabled
