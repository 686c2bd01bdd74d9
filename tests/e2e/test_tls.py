"""TLS on both sides: clients to pgproxy (client_tls_*) and pgproxy to PostgreSQL
(server_tls_*), with certificates the test makes with openssl and a PostgreSQL that has
ssl = on. Clients: psql (sslmode up to verify-full) and psycopg."""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import socket
import ssl
import struct
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from pgproxy.embedded import EmbeddedPostgres
from tests.conftest import _setup_cluster
from tests.support import ProxyFactory, ProxyProcess, connect, proxy_config, psql


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _issue(directory: Path, name: str, subject: str, ca: str, san: str | None) -> None:
    _openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
             "-out", f"{name}.csr", "-subj", subject, cwd=directory)  # fmt: skip
    extensions = directory / f"{name}.ext"
    extensions.write_text(f"subjectAltName = {san}\n" if san else "basicConstraints = CA:FALSE\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-days", "2", "-out", f"{name}.crt", "-extfile", extensions.name,
             cwd=directory)  # fmt: skip
    os.chmod(directory / f"{name}.key", 0o600)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a certificate for 127.0.0.1/localhost, a client certificate for 'app', and a
    second CA that signed nothing here."""
    directory = tmp_path_factory.mktemp("certs")
    for ca in ("ca", "other-ca"):
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{ca}.key",
                 "-out", f"{ca}.crt", "-days", "2", "-subj", f"/CN=pgproxy test {ca}",
                 cwd=directory)  # fmt: skip
    _issue(directory, "server", "/CN=localhost", "ca", "IP:127.0.0.1,DNS:localhost")
    _issue(directory, "client", "/CN=app", "ca", None)
    _issue(directory, "certuser", "/CN=certuser", "ca", None)
    return directory


@pytest.fixture(scope="module")
def tls_pg(certs: Path) -> Iterator[EmbeddedPostgres]:
    """A PostgreSQL with ssl = on. Its key must be readable by the cluster's OS user only,
    in a directory that user can reach (pytest's tmp dirs are private to the test's user)."""
    keys = Path(tempfile.mkdtemp(prefix="pgproxy-pgssl-"))
    try:
        for name in ("server.crt", "server.key", "ca.crt"):
            shutil.copy(certs / name, keys / name)
        os.chmod(keys / "server.key", 0o600)
        if os.geteuid() == 0:
            owner = pwd.getpwnam("postgres")
            for path in (keys, *keys.iterdir()):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        conf = {
            "ssl": "on",
            "ssl_cert_file": str(keys / "server.crt"),
            "ssl_key_file": str(keys / "server.key"),
            "ssl_ca_file": str(keys / "ca.crt"),
        }
        with EmbeddedPostgres(extra_conf=conf) as cluster:
            _setup_cluster(cluster)
            # certuser may only log in with a client certificate (CN=certuser).
            cluster.create_role("certuser", None)
            cluster.sql("GRANT ALL ON DATABASE appdb TO certuser")
            hba = Path(cluster.data_dir) / "pg_hba.conf"
            rules = hba.read_text()
            with open(hba, "w", encoding="utf-8") as rewritten:  # keeps the file's owner
                rewritten.write("hostssl all certuser 127.0.0.1/32 cert\n" + rules)
            cluster.sql("SELECT pg_reload_conf()")
            yield cluster
    finally:
        shutil.rmtree(keys, ignore_errors=True)


def _client_tls(certs: Path, mode: str = "require") -> dict[str, Any]:
    return {
        "client_tls_sslmode": mode,
        "client_tls_cert_file": str(certs / "server.crt"),
        "client_tls_key_file": str(certs / "server.key"),
        "client_tls_ca_file": str(certs / "ca.crt"),
    }


def _server_ssl_in_use(pg: EmbeddedPostgres) -> list[bool]:
    output = pg.sql(
        "SELECT ssl FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) WHERE usename = 'app'"
    )
    return [line.strip() == "t" for line in output.splitlines() if line.strip()]


def test_clients_over_tls_up_to_verify_full(
    tls_pg: EmbeddedPostgres, proxy_factory: ProxyFactory, certs: Path
) -> None:
    proxy = proxy_factory(proxy_config(tls_pg, **_client_tls(certs)))
    root = f"sslrootcert={certs / 'ca.crt'}"
    for mode in ("require", "verify-ca", "verify-full"):
        result = psql(
            ["-A", "-t", "-c", "select 1"],
            port=proxy.port,
            env={"PGSSLMODE": mode, "PGSSLROOTCERT": str(certs / "ca.crt")},
        )
        assert result.returncode == 0, (mode, result.stderr, root)
        assert result.stdout.strip() == "1"
    with connect(proxy, sslmode="verify-full", sslrootcert=str(certs / "ca.crt")) as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("select 2").fetchone() == (2,)
    # require: a client that does not ask for TLS is refused ...
    plain = psql(["-c", "select 1"], port=proxy.port, env={"PGSSLMODE": "disable"})
    assert plain.returncode != 0
    assert "SSL required" in plain.stderr
    # ... and one that trusts another CA refuses pgproxy.
    wrong = psql(
        ["-c", "select 1"],
        port=proxy.port,
        env={"PGSSLMODE": "verify-ca", "PGSSLROOTCERT": str(certs / "other-ca.crt")},
    )
    assert wrong.returncode != 0
    assert "certificate verify failed" in wrong.stderr
    assert psql(["-A", "-t", "-c", "select 3"], port=proxy.port).stdout.strip() == "3"


def test_client_certificates(
    tls_pg: EmbeddedPostgres, proxy_factory: ProxyFactory, certs: Path
) -> None:
    proxy = proxy_factory(proxy_config(tls_pg, **_client_tls(certs, "verify-ca")))
    with_cert = {
        "PGSSLMODE": "require",
        "PGSSLCERT": str(certs / "client.crt"),
        "PGSSLKEY": str(certs / "client.key"),
    }
    result = psql(["-A", "-t", "-c", "select 1"], port=proxy.port, env=with_cert)
    assert result.returncode == 0, result.stderr
    without = psql(
        ["-c", "select 1"],
        port=proxy.port,
        env={"PGSSLMODE": "require", "PGSSLCERT": "/nonexistent", "PGSSLKEY": "/nonexistent"},
    )
    assert without.returncode != 0
    assert proxy.alive()


def test_server_side_tls_modes(
    tls_pg: EmbeddedPostgres, pg: EmbeddedPostgres, proxy_factory: ProxyFactory, certs: Path
) -> None:
    # prefer (the default) and verify-full against a PostgreSQL with TLS: encrypted.
    for mode in ("prefer", "verify-full"):
        proxy = proxy_factory(
            proxy_config(tls_pg, server_tls_sslmode=mode, server_tls_ca_file=str(certs / "ca.crt"))
        )
        with connect(proxy) as conn:
            assert conn.execute(
                "select ssl from pg_stat_ssl where pid = pg_backend_pid()"
            ).fetchone() == (True,)
        proxy.cleanup()
    # disable: plain.
    proxy = proxy_factory(proxy_config(tls_pg, server_tls_sslmode="disable"))
    with connect(proxy) as conn:
        assert conn.execute(
            "select ssl from pg_stat_ssl where pid = pg_backend_pid()"
        ).fetchone() == (False,)
    # verify-ca with the wrong CA, and require against a PostgreSQL without TLS: refused,
    # with the reason, and the proxy keeps running.
    wrong = proxy_factory(
        proxy_config(
            tls_pg, server_tls_sslmode="verify-ca", server_tls_ca_file=str(certs / "other-ca.crt")
        )
    )
    with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
        connect(wrong)
    no_tls = proxy_factory(proxy_config(pg, server_tls_sslmode="require"))
    with pytest.raises(psycopg.OperationalError, match="server does not support TLS"):
        connect(no_tls)
    assert wrong.alive() and no_tls.alive()


def test_certificates_reload_without_dropping_clients(
    tls_pg: EmbeddedPostgres, proxy_factory: ProxyFactory, certs: Path, tmp_path: Path
) -> None:
    live_cert = tmp_path / "live.crt"
    live_key = tmp_path / "live.key"
    shutil.copy(certs / "server.crt", live_cert)
    shutil.copy(certs / "server.key", live_key)
    config = proxy_config(tls_pg, **_client_tls(certs))
    config.update(client_tls_cert_file=str(live_cert), client_tls_key_file=str(live_key))
    proxy: ProxyProcess = proxy_factory(config)
    with connect(proxy, sslmode="require") as kept:
        # A certificate pgproxy cannot read makes RELOAD fail and changes nothing.
        live_key.write_text("not a key")
        os.kill(proxy.pid, 1)  # SIGHUP
        deadline = 50
        while "reload failed" not in proxy.log_text() and deadline:
            deadline -= 1
            subprocess.run(["sleep", "0.1"], check=True)
        assert "reload failed" in proxy.log_text()
        assert "client_tls_cert_file" in proxy.log_text()
        assert kept.execute("select 1").fetchone() == (1,)
        with connect(proxy, sslmode="require") as fresh:
            assert fresh.execute("select 2").fetchone() == (2,)


def test_asyncpg_with_scram_over_tls(
    tls_pg: EmbeddedPostgres, proxy_factory: ProxyFactory, certs: Path
) -> None:
    """asyncpg (its own protocol code, not libpq): SCRAM to pgproxy over verified TLS,
    passthrough SCRAM to a PostgreSQL over TLS."""
    verifier = tls_pg.sql("SELECT rolpassword FROM pg_authid WHERE rolname = 'app'").strip()
    proxy = proxy_factory(
        proxy_config(
            tls_pg,
            pool_mode="session",  # asyncpg's statement cache needs named statements (#8)
            auth_type="scram-sha-256",
            users={"app": {"password": verifier}},
            databases={"appdb": {"host": "127.0.0.1", "port": tls_pg.port}},
            **_client_tls(certs),
        )
    )
    context = ssl.create_default_context(cafile=str(certs / "ca.crt"))

    async def run() -> list[object]:
        conn = await asyncpg.connect(
            host="127.0.0.1", port=proxy.port, user="app", password="app-secret",
            database="appdb", ssl=context, timeout=10,
        )  # fmt: skip
        try:
            return [
                await conn.fetchval("select current_user"),
                await conn.fetchval("select ssl from pg_stat_ssl where pid = pg_backend_pid()"),
                await conn.fetchval("select $1::int + 1", 41),
            ]
        finally:
            await conn.close()

    assert asyncio.run(asyncio.wait_for(run(), 30)) == ["app", True, 42]

    async def wrong() -> None:
        await asyncpg.connect(
            host="127.0.0.1", port=proxy.port, user="app", password="nope",
            database="appdb", ssl=context, timeout=10,
        )  # fmt: skip

    with pytest.raises(asyncpg.InvalidPasswordError):
        asyncio.run(asyncio.wait_for(wrong(), 30))


def test_scram_channel_binding(
    tls_pg: EmbeddedPostgres, proxy_factory: ProxyFactory, certs: Path
) -> None:
    """SCRAM-SHA-256-PLUS (tls-server-end-point) over TLS: libpq's channel_binding=require
    succeeds only when pgproxy binds the exchange to its certificate."""
    config = proxy_config(
        tls_pg,
        auth_type="scram-sha-256",
        users={"app": {"password": "app-secret"}},
        **_client_tls(certs, "prefer"),
    )
    proxy = proxy_factory(config)
    bound = psql(
        ["-A", "-t", "-c", "select 1"],
        port=proxy.port,
        password="app-secret",
        env={"PGSSLMODE": "require", "PGCHANNELBINDING": "require"},
    )
    assert bound.returncode == 0, bound.stderr
    # Without TLS there is nothing to bind to: libpq refuses to go on.
    unbound = psql(
        ["-c", "select 1"],
        port=proxy.port,
        password="app-secret",
        env={"PGSSLMODE": "disable", "PGCHANNELBINDING": "require"},
    )
    assert unbound.returncode != 0
    assert "channel binding" in unbound.stderr
    # A client that does not ask for binding still logs in over TLS.
    plain = psql(
        ["-A", "-t", "-c", "select 2"],
        port=proxy.port,
        password="app-secret",
        env={"PGSSLMODE": "require", "PGCHANNELBINDING": "disable"},
    )
    assert plain.returncode == 0, plain.stderr


def _direct_tls_query(proxy: ProxyProcess, certs: Path, alpn: list[str] | None) -> bytes:
    """PostgreSQL 17's sslnegotiation=direct by hand (libpq 15 here cannot): a TLS
    ClientHello first, then the startup packet and a query inside TLS. Returns what
    came back after the query (b'' if pgproxy closed the connection)."""
    context = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    if alpn:
        context.set_alpn_protocols(alpn)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as raw:
        try:
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                params = b"user\0app\0database\0appdb\0\0"
                tls.sendall(struct.pack("!II", 8 + len(params), 196608) + params)
                reply = b""
                while not reply.endswith(b"Z\0\0\0\5I"):
                    chunk = tls.recv(65536)
                    if not chunk:
                        return b""
                    reply += chunk
                query = b"select 42\0"
                tls.sendall(b"Q" + struct.pack("!I", 4 + len(query)) + query)
                answer = b""
                while not answer.endswith(b"Z\0\0\0\5I"):
                    chunk = tls.recv(65536)
                    if not chunk:
                        break
                    answer += chunk
                return answer
        except (ssl.SSLError, ConnectionError):
            return b""


def test_direct_tls(tls_pg: EmbeddedPostgres, proxy_factory: ProxyFactory, certs: Path) -> None:
    proxy = proxy_factory(proxy_config(tls_pg, **_client_tls(certs)))
    answer = _direct_tls_query(proxy, certs, ["postgresql"])
    assert b"D\0\0\0\x0c\0\1\0\0\0\x0242" in answer  # the DataRow of "42"
    # Without ALPN 'postgresql' (PostgreSQL's rule against cross-protocol attacks): closed.
    assert _direct_tls_query(proxy, certs, None) == b""
    assert psql(["-A", "-t", "-c", "select 1"], port=proxy.port).stdout.strip() == "1"


def test_hba_cert_method(
    tls_pg: EmbeddedPostgres, proxy_factory: ProxyFactory, certs: Path, tmp_path: Path
) -> None:
    """hostssl ... cert: the client certificate's CN is the user name; no password."""
    hba = tmp_path / "hba.conf"
    hba.write_text("hostssl appdb all 127.0.0.1/32 cert\n")
    proxy = proxy_factory(
        proxy_config(
            tls_pg, auth_type="hba", auth_hba_file=str(hba), **_client_tls(certs, "prefer")
        )
    )
    as_app = {
        "PGSSLMODE": "require",
        "PGSSLCERT": str(certs / "client.crt"),  # CN=app
        "PGSSLKEY": str(certs / "client.key"),
    }
    result = psql(["-A", "-t", "-c", "select 1"], port=proxy.port, user="app", env=as_app)
    assert result.returncode == 0, result.stderr
    other = psql(["-c", "select 1"], port=proxy.port, user="trustuser", env=as_app)
    assert other.returncode != 0
    assert 'certificate authentication failed for user "trustuser"' in other.stderr


def test_pgproxy_presents_a_client_certificate_to_postgres(
    tls_pg: EmbeddedPostgres, proxy_factory: ProxyFactory, certs: Path
) -> None:
    """server_tls_cert_file/key_file: PostgreSQL's cert method accepts pgproxy's login."""
    entry = {"host": "127.0.0.1", "port": tls_pg.port, "user": "certuser"}
    with_cert = proxy_factory(
        proxy_config(
            tls_pg,
            databases={"appdb": entry},
            server_tls_sslmode="verify-full",
            server_tls_ca_file=str(certs / "ca.crt"),
            server_tls_cert_file=str(certs / "certuser.crt"),
            server_tls_key_file=str(certs / "certuser.key"),
        )
    )
    with connect(with_cert) as conn:
        assert conn.execute("select current_user").fetchone() == ("certuser",)
    without = proxy_factory(
        proxy_config(tls_pg, databases={"appdb": entry}, server_tls_sslmode="require")
    )
    with pytest.raises(psycopg.OperationalError, match="certificate"):
        connect(without)
