"""Client authentication to pgproxy (auth_type plain, md5, scram-sha-256) with secrets from
[users.NAME] and from an auth_file copied from PostgreSQL's own pg_authid, driven by psql and
psycopg against a real PostgreSQL."""

from __future__ import annotations

import base64
import socket
import struct
from pathlib import Path
from typing import Any

import psycopg
import pytest
import scramp

from pgproxy.embedded import EmbeddedPostgres
from tests.support import ProxyFactory, ProxyProcess, assert_healthy, connect, proxy_config, psql

PASSWORD = "client-secret"


def _stored(pg: EmbeddedPostgres, role: str) -> str:
    """The secret PostgreSQL stores for ``role`` (SCRAM verifier or md5 hash)."""
    return pg.sql(f"SELECT rolpassword FROM pg_authid WHERE rolname = '{role}'").strip()


@pytest.fixture(scope="module")
def auth_file(pg: EmbeddedPostgres, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A userlist.txt as PgBouncer users write it: secrets copied from pg_authid."""
    path = tmp_path_factory.mktemp("auth") / "userlist.txt"
    path.write_text(
        "; copied from pg_authid\n"
        f'"app" "{_stored(pg, "app")}"\n'  # SCRAM verifier of app-secret
        f'"md5user" "{_stored(pg, "md5user")}"\n'  # md5 hash of md5-secret
        f'"plainuser" "plain-secret"\n'
        '"quoted""user" "x"\n'
    )
    return path


def _proxy(pg: EmbeddedPostgres, factory: ProxyFactory, **overrides: Any) -> ProxyProcess:
    return factory(proxy_config(pg, **overrides))


def _login(proxy: ProxyProcess, user: str, password: str) -> tuple[int, str]:
    result = psql(
        ["-A", "-t", "-c", "select current_user"], port=proxy.port, user=user, password=password
    )
    return result.returncode, (result.stdout + result.stderr).strip()


@pytest.mark.parametrize("auth_type", ["plain", "md5", "scram-sha-256"])
def test_auth_file_secrets_of_every_kind(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory, auth_file: Path, auth_type: str
) -> None:
    proxy = _proxy(pg, proxy_factory, auth_type=auth_type, auth_file=str(auth_file))
    # The server login is the database entry's forced user (app), whoever the client is.
    cases = [("app", "app-secret"), ("plainuser", "plain-secret")]
    if auth_type != "scram-sha-256":
        cases.append(("md5user", "md5-secret"))  # an md5 hash cannot answer SCRAM
    for user, password in cases:
        assert _login(proxy, user, password) == (0, "app"), (user, auth_type)
    # Wrong password, unknown user: the same error after the same kind of exchange.
    for user, password in [("app", "wrong"), ("nobody", "app-secret"), ("md5user", "bad")]:
        code, output = _login(proxy, user, password)
        assert code != 0
        assert f'password authentication failed for user "{user}"' in output, output
    if auth_type == "scram-sha-256":
        code, output = _login(proxy, "md5user", "md5-secret")
        assert code != 0 and "password authentication failed" in output
    assert _login(proxy, "app", "app-secret") == (0, "app")  # still serving
    log = proxy.log_text()
    for secret in ("app-secret", "plain-secret", "md5-secret", _stored(pg, "app")[20:40]):
        assert secret not in log


def test_psycopg_with_config_passwords(pg: EmbeddedPostgres, proxy_factory: ProxyFactory) -> None:
    proxy = _proxy(
        pg,
        proxy_factory,
        auth_type="scram-sha-256",
        scram_iterations=5000,
        users={"trustuser": {"password": PASSWORD}, "md5user": {"password": "md5-secret"}},
    )
    with connect(proxy, user="trustuser", password=PASSWORD) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    with pytest.raises(psycopg.OperationalError) as failed:
        connect(proxy, user="trustuser", password="nope")
    with pytest.raises(psycopg.OperationalError) as unknown:
        connect(proxy, user="ghost", password="nope")
    assert 'password authentication failed for user "ghost"' in str(unknown.value)
    assert 'password authentication failed for user "trustuser"' in str(failed.value)
    assert_healthy(proxy, user="trustuser", password=PASSWORD)


def _cleartext_login_error(proxy: ProxyProcess, user: str, password: str) -> dict[str, str]:
    """Log in by hand (auth_type plain) and return the ErrorResponse's fields."""
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        params = f"user\0{user}\0database\0appdb\0\0".encode()
        sock.sendall(struct.pack("!II", 8 + len(params), 196608) + params)
        reader = sock.makefile("rb")
        kind, body = reader.read(1), reader.read(struct.unpack("!I", reader.read(4))[0] - 4)
        assert (kind, body) == (b"R", struct.pack("!I", 3)), (kind, body)  # cleartext
        secret = password.encode() + b"\0"
        sock.sendall(b"p" + struct.pack("!I", 4 + len(secret)) + secret)
        kind, body = reader.read(1), reader.read(struct.unpack("!I", reader.read(4))[0] - 4)
        assert kind == b"E"
        return {field[:1].decode(): field[1:].decode() for field in body.split(b"\0") if field}


def _read(reader: Any) -> tuple[bytes, bytes]:
    """One backend message (type byte, payload); (b"", b"") at EOF."""
    kind = reader.read(1)
    if not kind:
        return b"", b""
    return kind, reader.read(struct.unpack("!I", reader.read(4))[0] - 4)


def _scram_opening(
    proxy: ProxyProcess, user: str, client_first: str = "n,,n=,r=fyko+d2lbbFgONRv9qkxdawL"
) -> tuple[bytes, bytes]:
    """A StartupMessage and a SASLInitialResponse sent by hand (at once, as a flood of
    logins would); the reply to the client-first message: (b"R", the SASLContinue payload)
    or (b"E", the ErrorResponse payload)."""
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        params = f"user\0{user}\0database\0appdb\0\0".encode()
        first = client_first.encode()
        body = b"SCRAM-SHA-256\0" + struct.pack("!i", len(first)) + first
        sock.sendall(
            struct.pack("!II", 8 + len(params), 196608) + params
            + b"p" + struct.pack("!I", 4 + len(body)) + body
        )  # fmt: skip
        reader = sock.makefile("rb")
        kind, payload = _read(reader)
        assert kind == b"R" and payload.startswith(struct.pack("!I", 10)), (kind, payload)
        kind, payload = _read(reader)
        if kind == b"E":
            assert _read(reader) == (b"", b"")  # then the proxy closes
        return kind, payload


def _salt(proxy: ProxyProcess, user: str) -> tuple[str, str]:
    """(salt, iterations) of the server-first message pgproxy sends ``user``."""
    kind, payload = _scram_opening(proxy, user)
    assert kind == b"R" and payload[:4] == struct.pack("!I", 11), (kind, payload)
    attributes = dict(part.split("=", 1) for part in payload[4:].decode().split(","))
    return attributes["s"], attributes["i"]


def test_salts_are_stable_for_every_kind_of_user(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory, auth_file: Path
) -> None:
    """A salt that changed from one attempt to the next (a plain password's used to), or
    that behaved differently for unknown user names, would tell which users exist."""
    proxy = _proxy(pg, proxy_factory, auth_type="scram-sha-256", auth_file=str(auth_file))
    salts = {user: [_salt(proxy, user) for _ in range(2)] for user in
             ("app", "plainuser", "nobody", "ghost", "md5user")}  # fmt: skip
    for user, (first, second) in salts.items():
        assert first == second, user
        assert first[1] == "4096", user  # PostgreSQL's (and scram_iterations') default
        assert len(base64.b64decode(first[0])) == 16, user
    assert len({attempts[0][0] for attempts in salts.values()}) == len(salts)
    assert salts["app"][0][0] in _stored(pg, "app")  # app's is PostgreSQL's own
    assert _login(proxy, "plainuser", "plain-secret") == (0, "app")  # the cached keys work


def test_an_authorization_identity_is_refused(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory, auth_file: Path
) -> None:
    """'n,a=OTHER,' asks to act as another user: FATAL 0A000 as from PostgreSQL, then a
    clean close, for a known user and an unknown one alike."""
    proxy = _proxy(pg, proxy_factory, auth_type="scram-sha-256", auth_file=str(auth_file))
    for user in ("app", "plainuser", "nobody"):
        kind, payload = _scram_opening(proxy, user, "n,a=app,n=,r=fyko+d2lbbFgONRv9qkxdawL")
        assert kind == b"E", (kind, payload)
        fields = {f[:1].decode(): f[1:].decode() for f in payload.split(b"\0") if f}
        assert (fields["S"], fields["C"]) == ("FATAL", "0A000"), fields
        assert fields["M"] == "client uses authorization identity, but it is not supported"
    assert _login(proxy, "app", "app-secret") == (0, "app")


def test_plain_and_the_error_on_the_wire(pg: EmbeddedPostgres, proxy_factory: ProxyFactory) -> None:
    proxy = _proxy(
        pg, proxy_factory, auth_type="plain", users={"trustuser": {"password": PASSWORD}}
    )
    for user in ("trustuser", "ghost"):
        fields = _cleartext_login_error(proxy, user, "wrong")
        assert fields["S"] == "FATAL"
        assert fields["C"] == "28P01"
        assert fields["M"] == f'password authentication failed for user "{user}"'
    assert_healthy(proxy, user="trustuser", password=PASSWORD)


def test_the_console_asks_for_a_password_too(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory, auth_file: Path
) -> None:
    proxy = _proxy(
        pg, proxy_factory, auth_type="md5", auth_file=str(auth_file), admin_users=["plainuser"]
    )
    shown = psql(
        ["-A", "-t", "-c", "SHOW STATE"],
        port=proxy.port,
        dbname="pgbouncer",
        user="plainuser",
        password="plain-secret",
    )
    assert shown.returncode == 0, shown.stderr
    refused = psql(
        ["-c", "SHOW STATE"], port=proxy.port, dbname="pgbouncer", user="plainuser", password="x"
    )
    assert refused.returncode != 0
    assert "password authentication failed" in refused.stderr


def test_a_broken_auth_file_fails_fast(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    broken = tmp_path / "userlist.txt"
    broken.write_text('"app" "SCRAM-SHA-256$not-a-verifier"\n')
    with pytest.raises(RuntimeError) as failed:
        _proxy(pg, proxy_factory, auth_type="md5", auth_file=str(broken))
    assert "line 1: malformed SCRAM-SHA-256 secret" in str(failed.value)
    assert "not-a-verifier" not in str(failed.value)


# -- auth_query -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def auth_roles(pg: EmbeddedPostgres) -> None:
    """authq: a superuser for the default query; authfn: a plain role that may only call a
    SECURITY DEFINER lookup function; expired: a role whose VALID UNTIL has passed; cached:
    a role whose password the cache test changes."""
    pg.create_role("authq", "authq-secret", superuser=True)
    pg.create_role("authfn", "authfn-secret")
    pg.create_role("expired", "expired-secret")
    pg.create_role("cached", "cached-old")
    pg.sql("ALTER ROLE expired VALID UNTIL '2000-01-01'")
    pg.sql(
        "CREATE FUNCTION public.pgproxy_lookup(name text, OUT usename text, OUT passwd text)\n"
        "  RETURNS record LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog AS\n"
        "  $$ SELECT rolname::text, rolpassword FROM pg_authid\n"
        "     WHERE rolname = name AND rolcanlogin $$;\n"
        "REVOKE ALL ON FUNCTION public.pgproxy_lookup(text) FROM PUBLIC;\n"
        "GRANT EXECUTE ON FUNCTION public.pgproxy_lookup(text) TO authfn;\n",
        dbname="appdb",
    )


def test_auth_query_with_the_default_query(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory, auth_roles: None
) -> None:
    proxy = _proxy(
        pg,
        proxy_factory,
        auth_type="md5",
        auth_user="authq",
        users={"authq": {"password": "authq-secret"}},
    )
    # SCRAM-stored and md5-stored roles, looked up in pg_authid.
    assert _login(proxy, "plainuser", "plain-secret") == (0, "app")
    assert _login(proxy, "md5user", "md5-secret") == (0, "app")
    for user, password in [("plainuser", "wrong"), ("expired", "expired-secret")]:
        code, output = _login(proxy, user, password)
        assert code != 0
        assert f'password authentication failed for user "{user}"' in output, output
    # A user the query does not know: PgBouncer's answer, before any password exchange.
    code, output = _login(proxy, "nobody", "x")
    assert code != 0 and "no such user" in output, output
    assert "expired-secret" not in proxy.log_text()


def test_auth_query_through_a_security_definer_function(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory, auth_roles: None
) -> None:
    proxy = _proxy(
        pg,
        proxy_factory,
        auth_type="scram-sha-256",
        auth_user="authfn",
        auth_query="SELECT usename, passwd FROM public.pgproxy_lookup($1)",
        users={"authfn": {"password": "authfn-secret"}},
    )
    with connect(proxy, user="plainuser", password="plain-secret") as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    # The wrong auth_user password: the lookup fails, the client gets the server's error
    # (PgBouncer's behaviour), others go on.
    broken = _proxy(
        pg,
        proxy_factory,
        auth_type="scram-sha-256",
        auth_user="authfn",
        users={"authfn": {"password": "not-it"}, "trustuser": {"password": PASSWORD}},
    )
    code, output = _login(broken, "plainuser", "plain-secret")
    assert code != 0 and 'password authentication failed for user "authfn"' in output
    assert "not-it" not in broken.log_text()
    assert _login(broken, "trustuser", PASSWORD) == (0, "app")


@pytest.mark.parametrize("cache", [60, 0])
def test_auth_query_answers_are_cached(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory, auth_roles: None, cache: int
) -> None:
    pg.sql("ALTER ROLE cached PASSWORD 'cached-old'")
    proxy = _proxy(
        pg,
        proxy_factory,
        auth_type="scram-sha-256",
        auth_user="authq",
        auth_cache_timeout=cache,
        users={"authq": {"password": "authq-secret"}},
    )
    assert _login(proxy, "cached", "cached-old") == (0, "app")
    pg.sql("ALTER ROLE cached PASSWORD 'cached-new'")
    old_works = _login(proxy, "cached", "cached-old")[0] == 0
    new_works = _login(proxy, "cached", "cached-new")[0] == 0
    assert (old_works, new_works) == ((True, False) if cache else (False, True))


# -- passthrough: no plaintext password anywhere ------------------------------------------


def _no_forced_user(pg: EmbeddedPostgres) -> dict[str, Any]:
    return {"appdb": {"host": "127.0.0.1", "port": pg.port}}  # no user, no password


def test_scram_and_md5_passthrough_from_an_auth_file(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory, auth_file: Path
) -> None:
    """The auth_file holds only PostgreSQL's own verifiers; pgproxy logs in to PostgreSQL
    as the client with the ClientKey recovered from the client's SCRAM proof, or with the
    md5 hash."""
    for auth_type, user, password in [
        ("scram-sha-256", "app", "app-secret"),
        ("md5", "md5user", "md5-secret"),
    ]:
        proxy = _proxy(
            pg,
            proxy_factory,
            auth_type=auth_type,
            auth_file=str(auth_file),
            databases=_no_forced_user(pg),
        )
        assert _login(proxy, user, password) == (0, user), proxy.log_tail()
        with connect(proxy, user=user, password=password) as conn:
            assert conn.execute("select current_user").fetchone() == (user,)
        proxy.cleanup()


def test_scram_passthrough_through_auth_query(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory, auth_roles: None
) -> None:
    proxy = _proxy(
        pg,
        proxy_factory,
        auth_type="scram-sha-256",
        auth_user="authq",
        users={"authq": {"password": "authq-secret"}},
        databases=_no_forced_user(pg),
    )
    assert _login(proxy, "app", "app-secret") == (0, "app"), proxy.log_tail()


def test_impossible_passthrough_says_why(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    # A verifier of the right password but with another salt than PostgreSQL's, and a
    # server that asks plainuser for a cleartext password pgproxy does not have.
    other_salt = tmp_path / "userlist.txt"
    salt, stored, server, iterations = scramp.ScramMechanism().make_auth_info(
        "app-secret", iteration_count=4096
    )
    b64 = [base64.b64encode(value).decode() for value in (salt, stored, server)]
    other_salt.write_text(
        f'"app" "SCRAM-SHA-256${iterations}:{b64[0]}${b64[1]}:{b64[2]}"\n'
        f'"plainuser" "{_stored(pg, "plainuser")}"\n'
    )
    proxy = _proxy(
        pg,
        proxy_factory,
        auth_type="scram-sha-256",
        auth_file=str(other_salt),
        databases=_no_forced_user(pg),
    )
    code, output = _login(proxy, "app", "app-secret")
    assert code != 0
    assert "SCRAM passthrough impossible" in output + proxy.log_text()
    code, output = _login(proxy, "plainuser", "plain-secret")
    assert code != 0
    assert "only has SCRAM keys" in output + proxy.log_text()


# -- auth_type = hba ---------------------------------------------------------------------------


def test_hba_rules(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory, auth_file: Path, tmp_path: Path
) -> None:
    hba = tmp_path / "hba.conf"
    hba.write_text(
        "# pgproxy's own pg_hba.conf\n"
        "hostssl appdb   app        127.0.0.1/32           scram-sha-256\n"
        "host    appdb   md5user    127.0.0.1 255.255.255.255 md5\n"
        "host    appdb   plainuser  127.0.0.0/8            password\n"
        "host    appdb   trustuser  all                    trust\n"
        "host    all     rejected   all                    reject\n"
    )
    proxy = _proxy(
        pg, proxy_factory, auth_type="hba", auth_hba_file=str(hba), auth_file=str(auth_file)
    )
    # trust asks no password, but (as in PgBouncer) the user must be in the auth_file:
    code, output = _login(proxy, "trustuser", "")
    assert code != 0 and '"trust" authentication failed' in output, output
    trusted = tmp_path / "userlist.txt"
    trusted.write_text(auth_file.read_text() + '"trustuser" ""\n')
    known = _proxy(
        pg, proxy_factory, auth_type="hba", auth_hba_file=str(hba), auth_file=str(trusted)
    )
    assert _login(known, "trustuser", "")[0] == 0
    assert _login(proxy, "md5user", "md5-secret") == (0, "app")
    assert _login(proxy, "plainuser", "plain-secret") == (0, "app")
    code, output = _login(proxy, "plainuser", "wrong")
    assert code != 0 and 'password authentication failed for user "plainuser"' in output
    # app only over TLS (hostssl): this TCP client has none.
    code, output = _login(proxy, "app", "app-secret")
    assert code != 0
    assert (
        'no pg_hba.conf entry for host "127.0.0.1", user "app", database "appdb", no encryption'
        in output
    )
    code, output = _login(proxy, "rejected", "x")
    assert code != 0 and "pg_hba.conf rejects connection" in output
    assert _login(proxy, "nobody", "x")[0] != 0  # no line at all
    assert proxy.alive()


def test_a_broken_hba_file_fails_fast(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    hba = tmp_path / "hba.conf"
    hba.write_text("host all all samehost trust\n")
    with pytest.raises(RuntimeError, match="line 1: address 'samehost' not supported"):
        _proxy(pg, proxy_factory, auth_type="hba", auth_hba_file=str(hba))
