"""Reading a console query into a command: PgBouncer's grammar, sans I/O.

A command is one word with an optional argument word (``SHOW POOLS``, ``PAUSE mydb``,
``KILL_CLIENT 12``), or ``SET key = value`` / ``SET key TO value``; words are
case-insensitive, may be double-quoted, and a trailing semicolon is allowed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_WORD = r'("(?:[^"]|"")+"|[0-9A-Za-z_]+)'
_STRING = r"('(?:[^']|'')*')"
_END = r"\s*(?:;\s*)?$"
_COMMAND = re.compile(r"^\s*" + _WORD + r"(?:\s+" + _WORD + r")?" + _END)
_SET = re.compile(
    r"^\s*set\s+" + _WORD + r"\s*(?:=|\s[tT][oO]\s)\s*(?:" + _WORD + "|" + _STRING + ")" + _END,
    re.IGNORECASE,
)


class ConsoleSyntaxError(Exception):
    """The query is not a console command."""


@dataclass(frozen=True, slots=True)
class Command:
    """A console command: ``verb`` lower-cased, ``arg`` as given (unquoted) or ''."""

    verb: str
    arg: str = ""


@dataclass(frozen=True, slots=True)
class SetCommand:
    """``SET key = value``: ``key`` lower-cased, ``value`` unquoted."""

    key: str
    value: str


def _unquote(word: str, quote: str) -> str:
    if len(word) >= 2 and word[0] == quote and word[-1] == quote:
        return word[1:-1].replace(quote * 2, quote)
    return word


def parse_command(query: str) -> Command | SetCommand:
    """Parse one console query; raise ConsoleSyntaxError if it is none."""
    match = _SET.match(query)
    if match is not None:
        key, word, string = match.groups()
        value = _unquote(word, '"') if word is not None else _unquote(string, "'")
        return SetCommand(_unquote(key, '"').lower(), value)
    match = _COMMAND.match(query)
    if match is None:
        raise ConsoleSyntaxError(query)
    verb, arg = match.groups()
    return Command(_unquote(verb, '"').lower(), _unquote(arg, '"') if arg else "")
