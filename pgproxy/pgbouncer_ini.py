"""A PgBouncer configuration (pgbouncer.ini) read as pgproxy settings.

PgBouncer's format: ``[databases]``, ``[users]``, ``[peers]`` and ``[pgbouncer]`` sections
of ``key = value`` lines, ``;`` or ``#`` comments, ``%include FILE`` (relative to the
current directory, as PgBouncer; then to the including file's), repeated keys where the
last wins. Database and user entries are libpq-style ``key=value`` strings.

``convert`` returns the settings as pgproxy's TOML would hold them, typed by pgproxy's own
models, and a warning for every setting that cannot be carried over. Defaults that differ
between the two are written out so that the result behaves as PgBouncer would: without
``listen_addr`` PgBouncer listens on its Unix socket only, ``unix_socket_dir`` defaults to
``/tmp`` and ``auth_type`` to ``md5``. An unknown key is an error, as in PgBouncer.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, SecretStr, TypeAdapter, ValidationError

from pgproxy.config import ConfigError, DatabaseConfig, PeerConfig, Settings, UserConfig

MAX_INCLUDE_DEPTH = 10

_SECTION = re.compile(r"^\[\s*([^\]]*?)\s*\]$")
_PGBOUNCER_SECTION = re.compile(r"^\s*\[\s*pgbouncer\s*\]\s*$", re.IGNORECASE | re.MULTILINE)

# [pgbouncer] settings read under their own name: PgBouncer's that pgproxy has with the same
# meaning, and pgproxy's own (metrics_port, workers, ...), so that an ini can set them too.
_SAME = frozenset(Settings.model_fields) - {"auth_type", "databases", "users", "peers"}

# [pgbouncer] settings pgproxy does not have, and why that is harmless or what to do.
_NOT_CARRIED = {
    "user": "run pgproxy as that user instead (systemd User=, or the container's user)",
    "disable_pqexec": "multi-statement simple queries are always allowed",
    "application_name_add_host": "not supported",
    "conffile": "the file given on the command line is the configuration",
    "service_name": "Windows only",
    "job_name": "Windows only",
    "auth_ident_file": "ident maps are not supported",
    "auth_ldap_options": "LDAP authentication is not supported",
    "syslog": "pgproxy logs to stderr (and logfile)",
    "syslog_ident": "pgproxy logs to stderr (and logfile)",
    "syslog_facility": "pgproxy logs to stderr (and logfile)",
    "server_fast_close": "not supported",
    "autodb_idle_timeout": "pools made for '*' databases are kept",
    "pool_idle_timeout": "not supported",
    "dns_max_ttl": "names are resolved at each connect",
    "dns_nxdomain_ttl": "names are resolved at each connect",
    "dns_zone_check_period": "names are resolved at each connect",
    "resolv_conf": "the system resolver is used",
    "login_notify_message": "not supported",
    "client_tls_protocols": "Python's ssl defaults apply (TLS 1.2 and newer)",
    "client_tls_ciphers": "Python's ssl defaults apply",
    "client_tls13_ciphers": "Python's ssl defaults apply",
    "client_tls_ecdhcurve": "Python's ssl defaults apply",
    "client_tls_dheparams": "Python's ssl defaults apply",
    "server_tls_protocols": "Python's ssl defaults apply (TLS 1.2 and newer)",
    "server_tls_ciphers": "Python's ssl defaults apply",
    "server_tls13_ciphers": "Python's ssl defaults apply",
    "cancel_wait_timeout": "cancel requests are sent at once",
    "suspend_timeout": "SUSPEND is not supported",
    "pkt_buf": "pgproxy forwards the chunks as they arrive",
    "listen_backlog": "the system default applies",
    "sbuf_loopcnt": "not needed",
    "tcp_defer_accept": "not supported",
    "tcp_socket_buffer": "the system default applies",
}

# Keys of a [databases] entry, by pgproxy name (None: cannot be carried over, with why).
_DATABASE_KEYS: dict[str, str | None] = {
    **{name: name for name in DatabaseConfig.model_fields},
    "reserve_pool": "reserve_pool_size",  # PgBouncer's older name
}
_DATABASE_NOT_CARRIED = {
    "client_encoding": "set it for the role or database in PostgreSQL",
    "datestyle": "set it for the role or database in PostgreSQL",
    "timezone": "set it for the role or database in PostgreSQL",
    "application_name": "not supported",
}
_USER_KEYS = frozenset(UserConfig.model_fields) - {"password"}


@dataclass
class Conversion:
    """pgproxy settings (as TOML would hold them) and what could not be carried over."""

    data: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def is_pgbouncer_ini(text: str) -> bool:
    """Whether ``text`` is a PgBouncer configuration (it has a [pgbouncer] section)."""
    return _PGBOUNCER_SECTION.search(text) is not None


def read_ini(path: str) -> dict[str, dict[str, tuple[str, str]]]:
    """Sections → keys → (value, "file:line"); [pgbouncer] and [peers] keys lower-cased."""
    sections: dict[str, dict[str, tuple[str, str]]] = {}
    _read_into(path, sections, "pgbouncer", 0)
    return sections


def _read_into(path: str, sections: dict[str, dict[str, tuple[str, str]]], section: str,
               depth: int) -> str:  # fmt: skip
    if depth > MAX_INCLUDE_DEPTH:
        raise ConfigError(f"{path}: %include nested more than {MAX_INCLUDE_DEPTH} deep")
    try:
        with open(path, encoding="utf-8") as ini:
            lines = ini.read().splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        where = f"{path}:{number}"
        if not line or line[0] in ";#":
            continue
        if line.lower().startswith("%include"):
            included = line[len("%include") :].strip()
            if not os.path.exists(included) and not os.path.isabs(included):
                included = os.path.join(os.path.dirname(path), included)
            section = _read_into(included, sections, section, depth + 1)
            continue
        header = _SECTION.match(line)
        if header is not None:
            section = header.group(1).lower()
            sections.setdefault(section, {})
            continue
        key, equals, value = line.partition("=")
        if not equals:
            raise ConfigError(f"{where}: expected 'key = value', got {line!r}")
        key = key.strip()
        if section in ("pgbouncer", "peers"):
            key = key.lower()
        elif key.startswith('"') and key.endswith('"') and len(key) >= 2:
            key = key[1:-1].replace('""', '"')  # a quoted database or user name
        sections.setdefault(section, {})[key] = (value.strip(), where)
    return section


def parse_connstr(text: str, where: str) -> dict[str, str]:
    """libpq-style ``key=value`` pairs; values may be single-quoted (\\' and \\\\ escape)."""
    pairs: dict[str, str] = {}
    position = 0
    size = len(text)
    while True:
        while position < size and text[position].isspace():
            position += 1
        if position >= size:
            return pairs
        equals = text.find("=", position)
        if equals < 0:
            raise ConfigError(f"{where}: expected key=value in {text!r}")
        key = text[position:equals].strip().lower()
        position = equals + 1
        while position < size and text[position].isspace():
            position += 1
        value = []
        if position < size and text[position] == "'":
            position += 1
            while True:
                if position >= size:
                    raise ConfigError(f"{where}: unterminated quoted value for {key}")
                char = text[position]
                if char == "\\" and position + 1 < size:
                    value.append(text[position + 1])
                    position += 2
                elif char == "'":
                    position += 1
                    break
                else:
                    value.append(char)
                    position += 1
        else:
            while position < size and not text[position].isspace():
                value.append(text[position])
                position += 1
        pairs[key] = "".join(value)


def _typed(model: type[BaseModel], name: str, value: str, where: str) -> Any:
    """``value`` as pgproxy's model types ``name`` (ConfigError naming the key if bad)."""
    annotation = model.model_fields[name].annotation
    assert annotation is not None
    raw: Any = value
    if annotation == list[str]:  # admin_users and the like: comma lists in both
        raw = [part.strip() for part in value.split(",") if part.strip()]
    try:
        typed = TypeAdapter(annotation).validate_python(raw)
    except ValidationError as exc:
        reason = exc.errors(include_url=False, include_input=False)[0]["msg"]
        raise ConfigError(f"{where}: {name} = {value!r}: {reason}") from None
    return typed.get_secret_value() if isinstance(typed, SecretStr) else typed


def convert(path: str) -> Conversion:
    """Read the PgBouncer configuration at ``path`` as pgproxy settings."""
    sections = read_ini(path)
    result = Conversion()
    data = result.data
    general = sections.get("pgbouncer", {})
    # PgBouncer's defaults where pgproxy's differ.
    data["listen_addr"] = ""
    data["unix_socket_dir"] = "/tmp"
    data["auth_type"] = "md5"
    for key, (value, where) in general.items():
        if key in _SAME:
            if key == "unix_socket_dir" and value == "":
                data[key] = None
                continue
            if key == "unix_socket_mode":
                try:
                    data[key] = int(value, 8)
                except ValueError:
                    raise ConfigError(f"{where}: unix_socket_mode = {value!r}: not octal") from None
                continue
            data[key] = _typed(Settings, key, value, where)
        elif key == "auth_type":
            data[key] = _auth_type(value, where, result)
        elif key in _NOT_CARRIED:
            result.warnings.append(f"{where}: {key} not carried over: {_NOT_CARRIED[key]}")
        else:
            # As PgBouncer, which refuses to start on an unknown parameter: a typo must not
            # leave a setting silently at its default.
            raise ConfigError(f"{where}: unknown setting {key}")
    if data.get("unix_socket_dir") is None:
        data.pop("unix_socket_dir", None)
    databases: dict[str, Any] = {}
    for name, (value, where) in sections.get("databases", {}).items():
        entry = _database(value, where, result)
        if "host" not in entry and data.get("unix_socket_dir"):
            # PgBouncer reaches a server without a host through its own unix_socket_dir.
            entry["host"] = data["unix_socket_dir"]
        databases[name] = entry
    if databases:
        data["databases"] = databases
    for section, model, keys in (
        ("users", UserConfig, _USER_KEYS),
        ("peers", PeerConfig, frozenset(PeerConfig.model_fields)),
    ):
        entries = _entries(sections.get(section, {}), model, keys, section[:-1], result)
        if entries:
            data[section] = entries
    for section in sections:
        if section not in ("pgbouncer", "databases", "users", "peers"):
            result.warnings.append(f"{path}: unknown section [{section}]: ignored")
    return result


def _entries(lines: dict[str, tuple[str, str]], model: type[BaseModel], keys: frozenset[str],
             what: str, result: Conversion) -> dict[str, Any]:  # fmt: skip
    """[users] or [peers]: each line's key=value options typed by ``model``."""
    entries: dict[str, Any] = {}
    for name, (value, where) in lines.items():
        entry: dict[str, Any] = {}
        for key, setting in parse_connstr(value, where).items():
            if key in keys:
                entry[key] = _typed(model, key, setting, where)
            else:
                result.warnings.append(f"{where}: {what} {name}: {key} not carried over")
        entries[name] = entry
    return entries


def _auth_type(value: str, where: str, result: Conversion) -> str:
    method = value.strip().lower()
    if method == "any":
        result.warnings.append(
            f"{where}: auth_type = any: converted to trust (the user name is not ignored)"
        )
        return "trust"
    if method in ("trust", "plain", "md5", "scram-sha-256", "cert", "hba"):
        return method
    raise ConfigError(f"{where}: auth_type = {value}: not supported by pgproxy")


def _database(value: str, where: str, result: Conversion) -> dict[str, Any]:
    entry: dict[str, Any] = {}
    for key, setting in parse_connstr(value, where).items():
        target = _DATABASE_KEYS.get(key)
        if target is None:
            why = _DATABASE_NOT_CARRIED.get(key, "unknown database option")
            result.warnings.append(f"{where}: {key} not carried over: {why}")
            continue
        entry[target] = _typed(DatabaseConfig, target, setting, where)
    return entry
