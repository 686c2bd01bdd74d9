"""pg_hba.conf rules for ``auth_type = hba``: the subset PgBouncer supports, sans I/O.

Record types ``local``, ``host``, ``hostssl``, ``hostnossl``; databases ``all``,
``sameuser``, ``replication``, ``@file`` and names; users ``all``, ``@file`` and names;
addresses ``all``, CIDR or address + netmask (IPv4 and IPv6); methods ``trust``,
``reject``, ``md5``, ``scram-sha-256``, ``password``, ``cert``, ``peer``, with ``key=value``
options. The first line that matches decides; none matching means the login is refused.
Everything else PostgreSQL accepts (``samehost``, host names, ``+group``, ``include``)
is refused when the file is read, naming the line.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from pgproxy.config import ConfigError, Settings

# The login a matching rule asks for: a password exchange, or none.
LoginMethod = Literal["trust", "plain", "md5", "scram-sha-256"]
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
METHODS = frozenset({"trust", "reject", "md5", "scram-sha-256", "password", "cert", "peer"})
TYPES = frozenset({"local", "host", "hostssl", "hostnossl"})


@dataclass(frozen=True, slots=True)
class Item:
    """One entry of a comma-separated field; a quoted keyword is a plain name."""

    text: str
    quoted: bool = False

    def keyword(self, word: str) -> bool:
        return not self.quoted and self.text == word


@dataclass(frozen=True, slots=True)
class HbaRule:
    """One line of the file."""

    line: int
    conn_type: str
    databases: tuple[Item, ...]
    users: tuple[Item, ...]
    network: IpNetwork | None  # None: any address (or a local line)
    method: str
    options: dict[str, str] = field(default_factory=dict)

    def matches(
        self, *, local: bool, tls: bool, database: str, user: str, address: IpAddress | None,
        replication: bool,
    ) -> bool:  # fmt: skip
        if not _type_matches(self.conn_type, local, tls):
            return False
        if self.network is not None and (address is None or address not in self.network):
            return False
        return _database_matches(self.databases, database, user, replication) and any(
            item.keyword("all") or item.text == user for item in self.users
        )


def _type_matches(conn_type: str, local: bool, tls: bool) -> bool:
    if conn_type == "local":
        return local
    if local:
        return False
    return {"host": True, "hostssl": tls, "hostnossl": not tls}[conn_type]


def _database_matches(items: tuple[Item, ...], database: str, user: str, replication: bool) -> bool:
    for item in items:
        if item.keyword("replication"):
            if replication:
                return True
        elif replication:
            continue  # only 'replication' matches a replication connection
        elif (
            item.keyword("all")
            or (item.keyword("sameuser") and database == user)
            or item.text == database
        ):
            return True
    return False


class HbaRules:
    """The rules of one file, in order."""

    def __init__(self, rules: list[HbaRule]) -> None:
        self.rules = rules

    def match(
        self, *, local: bool, tls: bool, database: str, user: str,
        address: IpAddress | None = None, replication: bool = False,
    ) -> HbaRule | None:  # fmt: skip
        """The first rule for this connection, or None (refused)."""
        for rule in self.rules:
            if rule.matches(
                local=local, tls=tls, database=database, user=user, address=address,
                replication=replication,
            ):  # fmt: skip
                return rule
        return None


@dataclass(frozen=True, slots=True)
class HbaRefusal:
    """The rules refuse the client; ``message`` (PostgreSQL's words) goes to it as 28000."""

    message: str


def login_method(
    rules: HbaRules, *, peer: str | None, tls: bool, database: str, user: str,
    replication: bool, certificate_names: Callable[[], Sequence[str]],
    os_user: Callable[[], str | None],
) -> LoginMethod | HbaRefusal:  # fmt: skip
    """auth_type = hba: the login the first matching rule asks of a client, after that
    rule's own checks (reject, cert, peer), or why it is refused.

    ``peer``: the client's IP address (None over the Unix socket). ``certificate_names``:
    the common names of the client's verified certificate; ``os_user``: the name of the
    OS user at the other end of the Unix socket (each asked only if a rule needs it)."""
    local = peer is None
    address = None if peer is None else ipaddress.ip_address(peer)
    rule = rules.match(
        local=local, tls=tls, database=database, user=user, address=address,
        replication=replication,
    )  # fmt: skip
    where = "local" if peer is None else f'host "{peer}"'
    encryption = "SSL encryption" if tls else "no encryption"
    if rule is None:
        return HbaRefusal(
            f'no pg_hba.conf entry for {where}, user "{user}", database "{database}", {encryption}'
        )
    if rule.method == "reject":
        return HbaRefusal(
            f'pg_hba.conf rejects connection for {where}, user "{user}", '
            f'database "{database}", {encryption}'
        )
    if rule.method == "cert":
        if user in certificate_names():
            return "trust"
        return HbaRefusal(f'certificate authentication failed for user "{user}"')
    if rule.method == "peer":
        if not local or os_user() != user:
            return HbaRefusal(f'Peer authentication failed for user "{user}"')
        return "trust"
    if rule.method == "trust":
        return "trust"
    if rule.method == "password":
        return "plain"
    assert rule.method in ("md5", "scram-sha-256")
    return "md5" if rule.method == "md5" else "scram-sha-256"


def _tokens(line: str, where: str) -> list[list[Item]]:
    """Whitespace-separated fields, each a comma-separated list of (possibly quoted) items."""
    fields: list[list[Item]] = []
    position, size = 0, len(line)
    while position < size:
        if line[position].isspace():
            position += 1
            continue
        if line[position] == "#":
            break
        items: list[Item] = []
        while True:
            if position < size and line[position] == '"':
                text = []
                while True:  # "" inside quotes is one quote character
                    end = line.find('"', position + 1)
                    if end < 0:
                        raise ConfigError(f"{where}: unterminated quote")
                    text.append(line[position + 1 : end])
                    position = end + 1
                    if position < size and line[position] == '"':
                        text.append('"')
                        continue
                    break
                items.append(Item("".join(text), quoted=True))
            else:
                start = position
                while (
                    position < size and not line[position].isspace() and line[position] not in ',#"'
                ):
                    position += 1
                items.append(Item(line[start:position]))
            # A comma continues the list, with blanks around it allowed (PgBouncer's
            # reading of "user2 , user3").
            after = position
            while after < size and line[after] in " \t":
                after += 1
            if after < size and line[after] == ",":
                position = after + 1
                while position < size and line[position] in " \t":
                    position += 1
                continue
            break
        fields.append(items)
    return fields


def _expand(items: list[Item], base: str, where: str) -> tuple[Item, ...]:
    """Replace @file entries by the names in that file (relative to the hba file)."""
    result: list[Item] = []
    for item in items:
        if item.text.startswith("@") and not item.quoted:
            path = os.path.join(base, item.text[1:])
            try:
                with open(path, encoding="utf-8") as names:
                    text = names.read()
            except OSError as exc:
                raise ConfigError(f"{where}: cannot read {path}: {exc.strerror}") from None
            for line in text.splitlines():
                for field_items in _tokens(line, f"{path}"):
                    result.extend(Item(i.text, quoted=True) for i in field_items if i.text)
        else:
            result.append(item)
    return tuple(result)


def _single(field_items: list[Item], what: str, where: str) -> str:
    if len(field_items) != 1 or field_items[0].quoted:
        raise ConfigError(f"{where}: bad {what}")
    return field_items[0].text


def _network(fields: list[list[Item]], where: str) -> tuple[IpNetwork | None, int]:
    """The address field (and a netmask field after it): (network, fields used)."""
    text = _single(fields[0], "address", where)
    if text == "all":
        return None, 1
    if text in ("samehost", "samenet") or not (
        text[:1].isdigit() or ":" in text  # (an IPv6 address may start with a letter)
    ):
        raise ConfigError(f"{where}: address {text!r} not supported (use all, CIDR or a mask)")
    try:
        if "/" in text:
            return ipaddress.ip_network(text, strict=False), 1
        if len(fields) > 2:
            mask = _single(fields[1], "netmask", where)
            if mask not in METHODS:
                return ipaddress.ip_network(f"{text}/{mask}", strict=False), 2
        address = ipaddress.ip_address(text)
        return ipaddress.ip_network(f"{address}/{address.max_prefixlen}"), 1
    except ValueError:
        raise ConfigError(f"{where}: bad address {text!r}") from None


def parse_hba(text: str, path: str) -> HbaRules:
    """Rules from the text of ``path`` (the path names errors and places @files)."""
    base = os.path.dirname(os.path.abspath(path))
    rules: list[HbaRule] = []
    lines = text.splitlines()
    number = 0
    while number < len(lines):
        start = number + 1
        line = lines[number]
        number += 1
        while line.endswith("\\") and number < len(lines):  # continuation
            line = line[:-1] + " " + lines[number]
            number += 1
        where = f"{path} line {start}"
        fields = _tokens(line, where)
        if not fields:
            continue
        conn_type = _single(fields[0], "connection type", where)
        if conn_type.startswith("include"):
            raise ConfigError(f"{where}: {conn_type} not supported")
        if conn_type not in TYPES:
            raise ConfigError(f"{where}: unknown connection type {conn_type!r}")
        if len(fields) < 4:
            raise ConfigError(f"{where}: too few fields")
        databases = _expand(fields[1], base, where)
        users = _expand(fields[2], base, where)
        for item in databases:
            if item.keyword("samerole") or item.keyword("samegroup"):
                raise ConfigError(f"{where}: {item.text} not supported")
        for item in users:
            if item.text.startswith("+") and not item.quoted:
                raise ConfigError(f"{where}: group names ({item.text}) not supported")
        rest = fields[3:]
        network: IpNetwork | None = None
        if conn_type != "local":
            network, used = _network(rest, where)
            rest = rest[used:]
        if not rest:
            raise ConfigError(f"{where}: no authentication method")
        method = _single(rest[0], "method", where)
        if method not in METHODS:
            raise ConfigError(f"{where}: authentication method {method!r} not supported")
        options: dict[str, str] = {}
        for option in rest[1:]:
            key, separator, value = _single(option, "option", where).partition("=")
            if not separator:
                raise ConfigError(f"{where}: bad option (expected key=value)")
            options[key] = value
        rules.append(HbaRule(start, conn_type, databases, users, network, method, options))
    return HbaRules(rules)


def load_hba(path: str) -> HbaRules:
    """Read and parse ``path``; raise ConfigError naming the file (and line)."""
    try:
        with open(path, encoding="utf-8") as hba:
            text = hba.read()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8"
        raise ConfigError(f"auth_hba_file: cannot read {path}: {reason}") from None
    return parse_hba(text, path)


def hba_rules(settings: Settings) -> HbaRules | None:
    """The auth_hba_file's rules when auth_type = hba (else None); raise ConfigError."""
    if settings.auth_type != "hba":
        return None
    if not settings.auth_hba_file:
        raise ConfigError("auth_type = hba needs auth_hba_file")
    return load_hba(settings.auth_hba_file)
