"""Tracked parameters: the session settings each client keeps while servers change under it.

A client's values and a server's values are tuples in ``TRACKED`` order, so the check at
link time is one tuple comparison; the SETs that make a server match a client are built
only when they differ.
"""

from __future__ import annotations

TRACKED: tuple[str, ...] = (
    "client_encoding",
    "DateStyle",
    "TimeZone",
    "IntervalStyle",
    "standard_conforming_strings",
    "application_name",
)
_INDEX = {name.lower(): index for index, name in enumerate(TRACKED)}

ParamValues = tuple[str, ...]
EMPTY: ParamValues = ("",) * len(TRACKED)


def tracked_index(name: str) -> int | None:
    """Position of ``name`` in TRACKED (GUC names are case-insensitive), or None."""
    return _INDEX.get(name.lower())


def with_value(values: ParamValues, name: str, value: str) -> ParamValues:
    """``values`` with ``name`` set to ``value``; the same tuple if ``name`` is not tracked."""
    index = _INDEX.get(name.lower())
    if index is None or values[index] == value:
        return values
    return (*values[:index], value, *values[index + 1 :])


def from_pairs(pairs: dict[str, str], base: ParamValues = EMPTY) -> ParamValues:
    """``base`` updated with every tracked name found in ``pairs``."""
    values = base
    for name, value in pairs.items():
        values = with_value(values, name, value)
    return values


def _literal(value: str) -> str:
    if "\\" in value:
        return "E'" + value.replace("\\", "\\\\").replace("'", "''") + "'"
    return "'" + value.replace("'", "''") + "'"


def sync_sql(client_values: ParamValues, server_values: ParamValues) -> str | None:
    """The SETs that give a server the client's values, or None when they already match."""
    statements = [
        f"SET {name} TO {_literal(wanted)}"
        for name, wanted, current in zip(TRACKED, client_values, server_values, strict=True)
        if wanted != current
    ]
    return ";".join(statements) if statements else None
