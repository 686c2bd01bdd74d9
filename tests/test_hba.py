"""Unit tests for pg_hba.conf parsing and matching (auth_type = hba)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from pgproxy.config import ConfigError
from pgproxy.hba import HbaRefusal, load_hba, login_method, parse_hba

HERE = ipaddress.ip_address("127.0.0.1")


def _method(text: str, **connection: object) -> str | None:
    defaults: dict[str, object] = {"local": False, "tls": False, "database": "db", "user": "u"}
    defaults["address"] = HERE
    defaults.update(connection)
    rule = parse_hba(text, "/etc/hba.conf").match(**defaults)  # type: ignore[arg-type]
    return None if rule is None else rule.method


def test_first_matching_line_decides() -> None:
    text = """
    # comment
    host  db   u     127.0.0.1/32  reject
    host  all  all   0.0.0.0/0     md5   # trailing comment
    """
    assert _method(text) == "reject"
    assert _method(text, user="v") == "md5"
    assert _method(text, address=ipaddress.ip_address("::1")) is None  # no IPv6 line


def test_connection_types() -> None:
    text = "local all all peer\nhostssl all all all scram-sha-256\nhostnossl all all all md5\n"
    assert _method(text, local=True, address=None) == "peer"
    assert _method(text, tls=True) == "scram-sha-256"
    assert _method(text, tls=False) == "md5"
    assert _method("host all all all trust", tls=True) == "trust"
    assert _method("local all all trust") is None  # a TCP client


def test_database_and_user_fields(tmp_path: Path) -> None:
    (tmp_path / "admins").write_text("alice, bob\n# not carol\n")
    text = 'host sameuser,"all" @admins all password\nhost replication all all trust\n'
    rules = load_path(tmp_path, text)
    assert rules(database="alice", user="alice") == "password"  # sameuser
    assert rules(database="all", user="bob") == "password"  # quoted: a name
    assert rules(database="x", user="alice") is None
    assert rules(database="alice", user="carol") is None
    assert rules(database="x", user="u", replication=True) == "trust"


def load_path(directory: Path, text: str):  # type: ignore[no-untyped-def]
    path = directory / "hba.conf"
    path.write_text(text)
    hba = load_hba(str(path))

    def method(**connection: object) -> str | None:
        defaults: dict[str, object] = {"local": False, "tls": False, "address": HERE}
        defaults.update(connection)
        rule = hba.match(**defaults)  # type: ignore[arg-type]
        return None if rule is None else rule.method

    return method


def test_addresses_and_options() -> None:
    text = (
        "host all all 10.0.0.0 255.0.0.0 md5\n"
        "host all all ::1/128 trust\n"
        "host all all 192.168.1.5 cert map=office\n"
        "host all \\\n  all 127.0.0.0/8 scram-sha-256\n"
    )
    assert _method(text, address=ipaddress.ip_address("10.2.3.4")) == "md5"
    assert _method(text, address=ipaddress.ip_address("::1")) == "trust"
    assert _method(text, address=ipaddress.ip_address("192.168.1.5")) == "cert"
    assert _method(text, address=ipaddress.ip_address("192.168.1.6")) is None
    assert _method(text) == "scram-sha-256"  # the continued line
    rule = parse_hba(text, "x").rules[2]
    assert rule.options == {"map": "office"}
    assert rule.line == 3


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("hostgssenc all all all trust", "unknown connection type"),
        ("include other.conf", "include not supported"),
        ("host all all samehost trust", "not supported"),
        ("host all all db.example.com trust", "not supported"),
        ("host all +admins all trust", "group names"),
        ("host samerole all all trust", "samerole not supported"),
        ("host all all all ldap", "method 'ldap' not supported"),
        ("host all all 300.1.1.1/8 trust", "bad address"),
        ("host all all", "too few fields"),
        ('host "all all all trust', "unterminated quote"),
        ("host all all all trust nokeyvalue", "bad option"),
    ],
)
def test_refused_lines_name_the_line(line: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as error:
        parse_hba("# header\n" + line + "\n", "/etc/pgproxy/hba.conf")
    assert "/etc/pgproxy/hba.conf line 2" in str(error.value)


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_hba(str(tmp_path / "missing.conf"))
    (tmp_path / "hba.conf").write_text("host all @nobody all trust\n")
    with pytest.raises(ConfigError, match="line 1: cannot read"):
        load_hba(str(tmp_path / "hba.conf"))


def _login(text: str, *, peer: str | None = "127.0.0.1", user: str = "u", tls: bool = False,
           names: tuple[str, ...] = (), os_user: str | None = None) -> object:  # fmt: skip
    return login_method(
        parse_hba(text, "/etc/hba.conf"), peer=peer, tls=tls, database="db", user=user,
        replication=False, certificate_names=lambda: names, os_user=lambda: os_user,
    )  # fmt: skip


def test_login_method_maps_rules_to_logins() -> None:
    assert _login("host all all all password") == "plain"
    assert _login("host all all all md5") == "md5"
    assert _login("host all all all scram-sha-256") == "scram-sha-256"
    assert _login("host all all all trust") == "trust"


def test_login_method_refusals_use_postgresql_words() -> None:
    assert _login("local all all trust") == HbaRefusal(
        'no pg_hba.conf entry for host "127.0.0.1", user "u", database "db", no encryption'
    )
    assert _login("local all all reject", peer=None) == HbaRefusal(
        'pg_hba.conf rejects connection for local, user "u", database "db", no encryption'
    )
    assert _login("hostssl all all all reject", tls=True) == HbaRefusal(
        'pg_hba.conf rejects connection for host "127.0.0.1", user "u", database "db", '
        "SSL encryption"
    )


def test_login_method_checks_cert_and_peer() -> None:
    assert _login("hostssl all all all cert", tls=True, names=("u",)) == "trust"
    assert _login("hostssl all all all cert", tls=True, names=("v",)) == HbaRefusal(
        'certificate authentication failed for user "u"'
    )
    assert _login("local all all peer", peer=None, os_user="u") == "trust"
    assert _login("local all all peer", peer=None, os_user=None) == HbaRefusal(
        'Peer authentication failed for user "u"'
    )
