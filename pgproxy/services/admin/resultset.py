"""Encoding console answers: RowDescription, DataRow, CommandComplete (sans I/O)."""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pgproxy.protocol import messages

# PostgreSQL type OIDs, as PgBouncer declares its columns.
TEXT = 25
INT4 = 23
INT8 = 20
NUMERIC = 1700

_TYPE_SIZE = {TEXT: -1, INT4: 4, INT8: 8, NUMERIC: -1}
_FIELD = struct.Struct("!IhIhih")
_INT16 = struct.Struct("!h")
_INT32 = struct.Struct("!i")

Value = str | int | None


@dataclass(frozen=True, slots=True)
class Column:
    """A result column: its name and type OID."""

    name: str
    type_oid: int = TEXT


def columns(spec: str, *names: str) -> list[Column]:
    """Columns from PgBouncer-style type letters: s text, i int4, q int8, N numeric."""
    types = {"s": TEXT, "i": INT4, "q": INT8, "N": NUMERIC}
    if len(spec) != len(names):
        raise ValueError("one type letter per column")
    return [Column(name, types[letter]) for letter, name in zip(spec, names, strict=True)]


def row_description(cols: Sequence[Column]) -> bytes:
    """A RowDescription for text-format columns."""
    parts = [_INT16.pack(len(cols))]
    for col in cols:
        parts.append(messages.cstring(col.name))
        parts.append(_FIELD.pack(0, 0, col.type_oid, _TYPE_SIZE[col.type_oid], -1, 0))
    return messages.message(b"T", b"".join(parts))


def data_row(values: Sequence[Value]) -> bytes:
    """A DataRow; None is NULL, everything else its text form."""
    parts = [_INT16.pack(len(values))]
    for value in values:
        if value is None:
            parts.append(_INT32.pack(-1))
        else:
            encoded = messages.wire(str(value))  # (a client's bytes as it sent them)
            parts.append(_INT32.pack(len(encoded)))
            parts.append(encoded)
    return messages.message(b"D", b"".join(parts))


def command_complete(tag: str) -> bytes:
    """CommandComplete with ``tag``."""
    return messages.message(b"C", messages.cstring(tag))


def result(cols: Sequence[Column], rows: Iterable[Sequence[Value]], tag: str = "SHOW") -> bytes:
    """A whole result set, without the ReadyForQuery."""
    parts = [row_description(cols)]
    parts.extend(data_row(row) for row in rows)
    parts.append(command_complete(tag))
    return b"".join(parts)
