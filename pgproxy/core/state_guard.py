"""transaction_state_guard: session state a transaction-mode client leaves on a server.

In transaction (and statement) mode the next client of a server inherits whatever the last
one left in the session outside a transaction: settings changed by ``SET``, ``LISTEN``
channels, SQL ``PREPARE``d statements, ``WITH HOLD`` cursors, temporary tables, session
advisory locks. Detection costs the hot path nothing beyond the header walk it already
does: the BackendScanner flags a transaction whose replies carry a CommandComplete tag that
may leave such state (``suspect``; see pgproxy/protocol/stream.py), and only then, once the
transaction is over, the pool runs the *state check* below on that server before anyone
else gets it. The check reports what the session holds now; what grew since the server's
last check (or its login) is what this client left. The janitor also runs the check, at
most once per ``transaction_state_check_period`` on an idle server that has served since
its last one: it finds what no tag shows (advisory locks, ``CREATE TEMP TABLE … AS``,
``SET`` inside ``BEGIN``/``COMMIT``, ``set_config``), blamed on the last client of the
server.

Settings pgproxy carries per client (the tracked parameters) are left out: they are no leak.
"""

from __future__ import annotations

import json
import re
import struct
from collections import OrderedDict
from dataclasses import dataclass, field

from pgproxy.config import TransactionStateGuard
from pgproxy.core import params as tracked
from pgproxy.protocol import messages

Guard = TransactionStateGuard
# The ``kind`` label of pgproxy_session_state_leaks_total, and of SHOW LEAKS rows.
SET = "set"
COUNTED_KINDS = ("listen", "prepare", "cursor", "temp_table", "advisory_lock")
KINDS = (SET, *COUNTED_KINDS)

# Timeouts the check turns off for itself (SET LOCAL): a client may have left
# statement_timeout = 1. Their values are read first, in a statement of their own.
_OVERRIDDEN = ("statement_timeout", "lock_timeout", "transaction_timeout")
_TRANSACTION_TIMEOUT_SINCE = 17  # (PostgreSQL major version)
# Settings pg_settings does not show (GUC_NO_SHOW_ALL), read by name.
_HIDDEN_SETTINGS = ("role", "session_authorization")

# How many leaks SHOW LEAKS keeps per pool (the most recent (client, kind) pairs).
RECENT_LEAKS = 100

_INT32 = struct.Struct("!i")


def _literal(text: str) -> str:
    escaped = text.replace("'", "''")
    if "\\" in escaped:
        return "E'" + escaped.replace("\\", "\\\\") + "'"
    return "'" + escaped + "'"


_queries: dict[tuple[int, tuple[str, ...]], str] = {}


def check_query(server_version: str) -> str:
    """The state check for a server reporting ``server_version`` (its ParameterStatus):
    two result rows, the overridden timeouts, then the counts and the settings."""
    match = re.match(r"\d+", server_version)
    major = int(match.group()) if match else 0
    key = (major, tracked.TRACKED)
    query = _queries.get(key)
    if query is None:
        query = _queries[key] = _build(major)
    return query


def _build(major: int) -> str:
    capture = ", ".join(f"pg_catalog.current_setting('{name}', true)" for name in _OVERRIDDEN)
    overrides = "".join(
        f"SET LOCAL {name} = 0; "
        for name in _OVERRIDDEN
        if name != "transaction_timeout" or major >= _TRANSACTION_TIMEOUT_SINCE
    )
    skipped = ", ".join(
        _literal(name) for name in (*(name.lower() for name in tracked.TRACKED), *_OVERRIDDEN)
    )
    hidden = " ".join(
        f"UNION ALL SELECT '{name}', pg_catalog.current_setting('{name}')"
        for name in _HIDDEN_SETTINGS
    )
    return (
        f"SELECT {capture}; {overrides}"
        "SELECT "
        "(SELECT pg_catalog.count(*) FROM pg_catalog.pg_listening_channels()), "
        "(SELECT pg_catalog.count(*) FROM pg_catalog.pg_prepared_statements WHERE from_sql), "
        "(SELECT pg_catalog.count(*) FROM pg_catalog.pg_cursors WHERE is_holdable), "
        "CASE WHEN pg_catalog.pg_my_temp_schema() = 0 THEN 0 ELSE "
        "(SELECT pg_catalog.count(*) FROM pg_catalog.pg_class WHERE relnamespace = "
        "pg_catalog.pg_my_temp_schema() AND relkind NOT IN ('i', 'I', 't')) END, "
        "(SELECT pg_catalog.count(*) FROM pg_catalog.pg_locks WHERE locktype = 'advisory' "
        "AND pid = pg_catalog.pg_backend_pid()), "
        "(SELECT pg_catalog.json_object_agg(name, setting) FROM ("
        "SELECT name, setting FROM pg_catalog.pg_settings WHERE source = 'session' "
        "AND setting IS DISTINCT FROM reset_val "
        f"AND pg_catalog.lower(name) <> ALL (ARRAY[{skipped}]) {hidden}) AS s)"
    )


@dataclass(frozen=True, slots=True)
class SessionState:
    """What the state check found: counts in COUNTED_KINDS order, and the settings that
    differ from their defaults (name → value)."""

    counts: tuple[int, ...]
    settings: dict[str, str] = field(default_factory=dict)


def parse_check(reply: bytes) -> SessionState | str:
    """The state check's replies (up to its ReadyForQuery) as a SessionState, or the
    reason it failed."""
    rows: list[list[str | None]] = []
    position = 0
    size = len(reply)
    while position + 5 <= size:
        type_byte = reply[position]
        length = _INT32.unpack_from(reply, position + 1)[0]
        end = position + 1 + length
        if length < 4 or end > size:
            return "malformed reply"
        if type_byte == ord("E"):
            fields = messages.parse_error_fields(reply[position + 5 : end])
            return fields.get("M", "error")
        if type_byte == ord("D"):
            rows.append(messages.parse_data_row(reply, position + 5, end))
        position = end
    if len(rows) != 2 or len(rows[0]) != len(_OVERRIDDEN) or len(rows[1]) != 6:
        return "unexpected reply"
    timeouts, found = rows
    try:
        counts = tuple(int(value or 0) for value in found[:5])
        settings: dict[str, str] = json.loads(found[5]) if found[5] else {}
    except ValueError:
        return "unexpected reply"
    for name, value in zip(_OVERRIDDEN, timeouts, strict=True):
        if value is not None:
            settings[name] = value
    return SessionState(counts, settings)


def changes(
    before: SessionState, after: SessionState, clean: SessionState
) -> list[tuple[str, str]]:
    """(kind, detail) for each kind of state that ``after`` holds and ``before`` did not:
    settings with another value, unless it is the value they had on the ``clean`` server
    (its login, or its last reset: a client that undoes an earlier client's SET leaks
    nothing; detail: their names), more of a counted kind (detail: how many more, and how
    many there are)."""
    found: list[tuple[str, str]] = []
    names = sorted(
        name
        for name in before.settings.keys() | after.settings.keys()
        if after.settings.get(name) not in (before.settings.get(name), clean.settings.get(name))
    )
    if names:
        found.append((SET, ", ".join(names)))
    for kind, old, new in zip(COUNTED_KINDS, before.counts, after.counts, strict=True):
        if new > old:
            found.append((kind, f"{new - old} more, {new} on the server"))
    return found


@dataclass(slots=True)
class StateLeak:
    """One client's leaks of one kind, for SHOW LEAKS."""

    client_id: int
    user: str
    database: str
    application_name: str
    peer: object  # the client's peername (an address tuple, or a Unix socket's name)
    kind: str
    detail: str
    action: str  # "kept" (warn: the next client inherits it) or "reset"
    first_seen: float
    last_seen: float
    count: int = 1


class RecentLeaks:
    """The most recent leaks, one entry per (client, kind), the oldest dropped first."""

    def __init__(self, limit: int = RECENT_LEAKS) -> None:
        self.limit = limit
        self.entries: OrderedDict[tuple[int, str], StateLeak] = OrderedDict()

    def add(self, leak: StateLeak) -> bool:
        """Record ``leak``; True when it is this client's first of its kind."""
        key = (leak.client_id, leak.kind)
        known = self.entries.pop(key, None)
        if known is not None:
            known.count += 1
            known.detail, known.action, known.last_seen = leak.detail, leak.action, leak.last_seen
            self.entries[key] = known
            return False
        self.entries[key] = leak
        while len(self.entries) > self.limit:
            self.entries.popitem(last=False)
        return True
