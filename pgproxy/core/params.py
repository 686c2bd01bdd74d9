"""Tracked parameters: the session settings each client keeps while servers change under it.

A client's values and a server's values are tuples in ``TRACKED`` order, so the check at
link time is one tuple comparison; the SETs that make a server match a client are built
only when they differ.
"""

from __future__ import annotations

import re
from typing import Final

# Tracked by default, in this order: PgBouncer's five and IntervalStyle (the default of
# track_extra_parameters); ``configure`` adds the rest of track_extra_parameters.
TRACKED: tuple[str, ...] = (
    "client_encoding",
    "DateStyle",
    "TimeZone",
    "IntervalStyle",
    "standard_conforming_strings",
    "application_name",
)
_ALWAYS: Final = frozenset(name for name in TRACKED if name != "IntervalStyle")
# Parameters PostgreSQL reports (ParameterStatus): their values are always known.
_REPORTED: Final = frozenset(name.lower() for name in TRACKED)
_INDEX = {name.lower(): index for index, name in enumerate(TRACKED)}
_DEFAULT_ORDER: Final = TRACKED

ParamValues = tuple[str, ...]
EMPTY: ParamValues = ("",) * len(TRACKED)


# One tuple object per distinct set of values, so that the check at link time is most
# often an identity test: clients and servers with the same settings share it. Bounded:
# past the limit it starts again (only the sharing is lost).
_CANONICAL: Final[dict[ParamValues, ParamValues]] = {EMPTY: EMPTY}
_CANONICAL_LIMIT: Final = 4096


def _canonical(values: ParamValues) -> ParamValues:
    found = _CANONICAL.get(values)
    if found is None:
        if len(_CANONICAL) >= _CANONICAL_LIMIT:
            _CANONICAL.clear()
        _CANONICAL[values] = found = values
    return found


def configure(extra: list[str]) -> None:
    """Track ``extra`` besides PgBouncer's five (track_extra_parameters). Called once, at
    start, before any client or server exists: every tuple of values has this length."""
    global TRACKED, _INDEX, EMPTY
    wanted = {name.lower() for name in extra}
    names = [name for name in _DEFAULT_ORDER if name in _ALWAYS or name.lower() in wanted]
    for name in extra:
        if name.lower() not in {known.lower() for known in names}:
            names.append(name)
    TRACKED = tuple(names)
    _INDEX = {name.lower(): index for index, name in enumerate(TRACKED)}
    EMPTY = ("",) * len(TRACKED)
    _CANONICAL.clear()
    _CANONICAL[EMPTY] = EMPTY


def tracked_index(name: str) -> int | None:
    """Position of ``name`` in TRACKED (GUC names are case-insensitive), or None."""
    return _INDEX.get(name.lower())


def with_value(values: ParamValues, name: str, value: str) -> ParamValues:
    """``values`` with ``name`` set to ``value``; the same tuple if ``name`` is not tracked."""
    index = _INDEX.get(name.lower())
    if index is None or values[index] == value:
        return values
    return _canonical((*values[:index], value, *values[index + 1 :]))


def from_pairs(pairs: dict[str, str], base: ParamValues = EMPTY) -> ParamValues:
    """``base`` updated with every tracked name found in ``pairs``."""
    values = base
    for name, value in pairs.items():
        values = with_value(values, name, value)
    return _canonical(values)


# Bytes of a client's startup value that were not UTF-8 (surrogate escapes, see
# protocol/startup.py). Built with chr(): mypyc cannot compile surrogates in a literal.
_NOT_UTF8: Final = re.compile(f"[{chr(0xDC80)}-{chr(0xDCFF)}]")


def _byte_escape(match: re.Match[str]) -> str:
    return f"\\x{ord(match.group()) - 0xDC00:02x}"


def _literal(value: str) -> str:
    if not value.isascii() and _NOT_UTF8.search(value):
        # PostgreSQL refuses SQL text that is not valid in its encoding (22021): the
        # whole sync would fail and the server keep the last client's values. Such a
        # byte goes as the four
        # characters \xNN instead: what PostgreSQL 16 and later itself make of it in an
        # application_name from a startup packet (pg_clean_ascii; 15 and older write '?').
        value = _NOT_UTF8.sub(_byte_escape, value)
    if "\\" in value:
        return "E'" + value.replace("\\", "\\\\").replace("'", "''") + "'"
    return "'" + value.replace("'", "''") + "'"


def sync_sql(client_values: ParamValues, server_values: ParamValues) -> str | None:
    """The SETs that give a server the client's values, or None when they already match."""
    # An empty value of a parameter PostgreSQL does not report (a track_extra_parameters
    # entry such as search_path) is one nobody set: the server's default, by RESET.
    statements = [
        f"SET {name} TO {_literal(wanted)}"
        if wanted or name.lower() in _REPORTED
        else f"RESET {name}"
        for name, wanted, current in zip(TRACKED, client_values, server_values, strict=True)
        if wanted != current
    ]
    return ";".join(statements) if statements else None


class UnsupportedParameter(Exception):
    """A startup parameter pgproxy cannot honour; the message is PgBouncer's."""


_OPTIONS_ONLY: Final = (
    "unsupported options startup parameter: only '-c config=val' and '--config=val' are allowed"
)
# Startup parameters that are not settings.
_STARTUP_KEYS: Final = frozenset({"user", "database", "options"})


def startup_settings(params: dict[str, str], ignored: frozenset[str]) -> dict[str, str]:
    """The tracked settings a startup packet asks for, from its parameters and from
    ``-c name=value`` / ``--name=value`` in ``options`` (PgBouncer's rules). A parameter
    pgproxy cannot keep across servers raises UnsupportedParameter unless it is listed
    (lower-cased) in ``ignored`` — ``options`` there ignores every unknown option."""
    settings: dict[str, str] = {}
    for name, value in params.items():
        if name in _STARTUP_KEYS:
            continue
        if tracked_index(name) is not None:
            settings[name] = value
        elif name.lower() not in ignored:
            raise UnsupportedParameter(f"unsupported startup parameter: {name}")
    options = params.get("options")
    for name, value in _parse_options(options) if options else ():
        if tracked_index(name) is not None:
            settings[name] = value
        elif name.lower() not in ignored and "options" not in ignored:
            raise UnsupportedParameter(f"unsupported startup parameter in options: {name}")
    return settings


def _parse_options(options: str) -> list[tuple[str, str]]:
    """``-c a=b --c-d=e`` → [('a', 'b'), ('c_d', 'e')]; a backslash escapes the next
    character (PostgreSQL's rule for spaces in values)."""
    words: list[str] = []
    current: list[str] = []
    escaped = False
    for char in options:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char.isspace():
            if current:
                words.append("".join(current))
                current = []
        else:
            current.append(char)
    if current:
        words.append("".join(current))
    pairs = []
    position = 0
    while position < len(words):
        word = words[position]
        if word == "-c" and position + 1 < len(words):
            setting = words[position + 1]
            position += 2
        elif word[:2] in ("-c", "--") and len(word) > 2:  # -cname=value, --name=value
            setting, position = word[2:], position + 1
        else:
            raise UnsupportedParameter(_OPTIONS_ONLY)
        name, equals, value = setting.partition("=")
        if not equals or not name:
            raise UnsupportedParameter(_OPTIONS_ONLY)
        pairs.append((name.replace("-", "_"), value))
    return pairs
