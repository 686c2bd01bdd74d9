"""PgBouncer's auth_file (userlist.txt): ``"user" "secret"`` per line.

Double quotes inside a field are doubled (``""``). Empty lines and lines starting with ``;``
or ``#`` are skipped. Errors name the line, never its content: it holds secrets.
"""

from __future__ import annotations

from pgproxy.config import ConfigError
from pgproxy.protocol.client_auth import BadSecret, Secret, parse_secret


def _fields(line: str) -> list[str] | None:
    fields: list[str] = []
    position = 0
    while position < len(line):
        if line[position].isspace():
            position += 1
            continue
        if line[position] != '"':
            return None
        value = []
        position += 1
        while True:
            if position >= len(line):
                return None  # unterminated
            char = line[position]
            if char == '"':
                if line[position + 1 : position + 2] == '"':
                    value.append('"')
                    position += 2
                    continue
                position += 1
                break
            value.append(char)
            position += 1
        fields.append("".join(value))
    return fields


def read_userlist(path: str) -> dict[str, Secret]:
    """The secrets in ``path``; raise ConfigError (naming the line) if it is unreadable."""
    try:
        with open(path, encoding="utf-8") as userlist:
            lines = userlist.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8"
        raise ConfigError(f"auth_file: cannot read {path}: {reason}") from None
    secrets: dict[str, Secret] = {}
    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        if not stripped or stripped[0] in ";#":
            continue
        fields = _fields(stripped)
        if fields is None or len(fields) < 2:
            raise ConfigError(f'auth_file: {path} line {number}: expected "user" "secret"')
        try:
            secrets[fields[0]] = parse_secret(fields[1])
        except BadSecret as exc:
            raise ConfigError(f"auth_file: {path} line {number}: {exc}") from None
    return secrets
