"""Configuration: TOML file, PGPROXY_* overrides, PgBouncer defaults, error messages, CLI."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pgproxy import BUILD, __version__
from pgproxy.compiled import HOT_MODULES, compiled_modules
from pgproxy.config import ConfigError, DatabaseConfig, Settings, UserConfig, replica_lag_limit
from pgproxy.config_file import load_settings

REPO_ROOT = Path(__file__).resolve().parent.parent
SECRET = "s3cr3t-Hunter2-do-not-print"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No PGPROXY_* variable from the calling environment leaks into these tests."""
    for key in list(os.environ):
        if key.upper().startswith("PGPROXY_"):
            monkeypatch.delenv(key)
    yield


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "pgproxy.toml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def config_error(path: str | None) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    return str(info.value)


# -- defaults and loading ---------------------------------------------------------------


def test_defaults_match_pgbouncer() -> None:
    settings = load_settings(None)
    assert settings.listen_port == 6432
    assert settings.pool_mode == "session"
    assert settings.default_pool_size == 20
    assert settings.max_client_conn == 100
    assert settings.query_wait_timeout == 120
    assert settings.server_reset_query == "DISCARD ALL"
    assert settings.max_packet_size == 2147483647
    assert settings.server_connect_timeout == 15
    assert settings.auth_type == "trust"
    assert settings.databases == {}
    assert settings.users == {}


def test_database_entry_defaults() -> None:
    entry = DatabaseConfig()
    assert entry.host == "/var/run/postgresql"
    assert entry.port == 5432
    assert entry.dbname is None and entry.user is None and entry.password is None
    assert entry.pool_size is None and entry.pool_mode is None


def test_toml_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""
listen_addr = "*"
listen_port = 7432
pool_mode = "transaction"
default_pool_size = 5
query_wait_timeout = 2.5
server_reset_query = ""

[databases.appdb]
host = "db.internal"
port = 5433
dbname = "real_app"
user = "app"
password = "{SECRET}"
pool_size = 3

[databases."*"]
host = "/tmp"

[users.report]
pool_mode = "session"
""",
    )
    settings = load_settings(path)
    assert settings.listen_addr == "*"
    assert settings.listen_port == 7432
    assert settings.pool_mode == "transaction"
    assert settings.default_pool_size == 5
    assert settings.query_wait_timeout == 2.5
    assert settings.server_reset_query == ""
    app = settings.databases["appdb"]
    assert (app.host, app.port, app.dbname, app.user, app.pool_size) == (
        "db.internal",
        5433,
        "real_app",
        "app",
        3,
    )
    assert app.password is not None
    assert app.password.get_secret_value() == SECRET
    assert SECRET not in repr(settings)
    assert SECRET not in str(app)
    assert settings.databases["*"].host == "/tmp"
    assert settings.users["report"].pool_mode == "session"


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, 'listen_port = 7000\npool_mode = "statement"\n')
    assert load_settings(path).listen_port == 7000
    monkeypatch.setenv("PGPROXY_LISTEN_PORT", "7100")
    monkeypatch.setenv("PGPROXY_POOL_MODE", "transaction")
    settings = load_settings(path)
    assert settings.listen_port == 7100
    assert settings.pool_mode == "transaction"


def test_environment_without_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGPROXY_MAX_CLIENT_CONN", "250")
    monkeypatch.setenv("PGPROXY_LISTEN_ADDR", "*")
    settings = load_settings(None)
    assert settings.max_client_conn == 250
    assert settings.listen_addr == "*"


def test_environment_json_for_databases(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGPROXY_DATABASES", '{"appdb": {"host": "h", "port": 6000}}')
    assert load_settings(None).databases["appdb"].port == 6000


def test_bad_environment_value_names_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGPROXY_LISTEN_PORT", "not-a-port")
    message = config_error(None)
    assert "listen_port" in message
    assert "not-a-port" not in message


def test_unknown_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGPROXY_LISTEN_PROT", "7000")
    monkeypatch.setenv("PGPROXY_POOLMODE", "session")
    assert config_error(None) == (
        "unknown environment setting(s): PGPROXY_LISTEN_PROT, PGPROXY_POOLMODE"
    )


# -- error messages ---------------------------------------------------------------------


def test_unknown_keys_are_named(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'listen_prot = 1\n[databases.x]\nprot = 5432\n[users.bob]\npool_mod = "session"\n',
    )
    message = config_error(path)
    assert message.startswith("invalid configuration:")
    assert "listen_prot: unknown setting" in message
    assert "databases.x.prot: unknown setting" in message
    assert "users.bob.pool_mod: unknown setting" in message


@pytest.mark.parametrize(
    "toml, key",
    [
        ("listen_port = 0", "listen_port"),
        ("listen_port = 65536", "listen_port"),
        ('pool_mode = "transactions"', "pool_mode"),
        ("default_pool_size = 0", "default_pool_size"),
        ("max_client_conn = -1", "max_client_conn"),
        ("query_wait_timeout = -1", "query_wait_timeout"),
        ("max_packet_size = 100", "max_packet_size"),
        ("server_connect_timeout = 0", "server_connect_timeout"),
        ('auth_type = "kerberos"', "auth_type"),
        ('transaction_state_guard = "on"', "transaction_state_guard"),
        ("transaction_state_check_period = -1", "transaction_state_check_period"),
        ("[databases.x]\nport = 70000", "databases.x.port"),
        ('[databases.x]\nport = "abc"', "databases.x.port"),
        ("[databases.x]\npool_size = 0", "databases.x.pool_size"),
        ('[databases.x]\npool_mode = "tx"', "databases.x.pool_mode"),
        ('[databases.x]\ntarget_session_attrs = "master"', "databases.x.target_session_attrs"),
        ('[databases.x]\nmax_replica_lag = "5 parsecs"', "databases.x.max_replica_lag"),
        ("[databases.x]\nmax_replica_lag = -1", "databases.x.max_replica_lag"),
        ('[users."bob"]\npool_size = 0', "users.bob.pool_size"),
        ("databases = 5", "databases"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, toml: str, key: str) -> None:
    message = config_error(write(tmp_path, toml + "\n"))
    assert message.startswith("invalid configuration:\n  ")
    assert f"  {key}: " in message


def test_transaction_state_guard_reaches_the_pools() -> None:
    settings = Settings(databases={"appdb": DatabaseConfig()})
    assert settings.transaction_state_guard == "warn"
    assert settings.transaction_state_check_period == 60.0
    settings = Settings(
        databases={"appdb": DatabaseConfig()},
        transaction_state_guard="reset",
        transaction_state_check_period=5,
    )
    resolved = settings.pool_settings(settings.databases["appdb"], "app")
    assert (resolved.state_guard, resolved.state_check_period) == ("reset", 5.0)


@pytest.mark.parametrize(
    "toml, problem",
    [
        ('[databases.ro]\nreplica_of = "nowhere"', "databases.ro.replica_of: no other"),
        ('[databases.ro]\nreplica_of = "ro"', "databases.ro.replica_of: no other"),
        (
            '[databases.a]\n[databases.b]\nreplica_of = "a"\n[databases.c]\nreplica_of = "b"',
            "databases.c.replica_of: 'b' is itself a read-only twin",
        ),
    ],
)
def test_replica_of_must_name_another_plain_entry(tmp_path: Path, toml: str, problem: str) -> None:
    assert problem in config_error(write(tmp_path, toml + "\n"))


def test_max_replica_lag_units() -> None:
    def read(value: float | str) -> tuple[float | None, int | None]:
        limit = replica_lag_limit(value)
        assert limit is not None
        return limit.seconds, limit.wal_bytes

    assert read(5) == (5.0, None)
    assert read("2.5") == (2.5, None)
    assert read("500ms") == (0.5, None)
    assert read("1 min") == (60.0, None)
    assert read("16MB") == (None, 16 * 1024 * 1024)
    assert read("1GB") == (None, 1024**3)
    assert read("8192B") == (None, 8192)
    assert replica_lag_limit(None) is None


def test_every_problem_is_listed(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, "listen_port = 0\ndefault_pool_size = 0\n"))
    assert message.count("\n  ") == 2


@pytest.mark.parametrize(
    "password_line",
    [
        "password = 12345678901",  # not a string
        f'password = ["{SECRET}"]',
        f'password = {{ value = "{SECRET}" }}',
        f'passwrd = "{SECRET}"',  # misspelt key: the value still must not be echoed
    ],
)
def test_bad_password_value_is_never_echoed(tmp_path: Path, password_line: str) -> None:
    path = write(tmp_path, f"[databases.x]\nport = 0\n{password_line}\n")
    message = config_error(path)
    assert "databases.x.port" in message
    assert "databases.x.pass" in message
    assert SECRET not in message
    assert "12345678901" not in message


def test_toml_syntax_error_does_not_echo_the_password(tmp_path: Path) -> None:
    path = write(tmp_path, f'[databases.x]\npassword = "{SECRET}" trailing\n')
    message = config_error(path)
    assert "invalid TOML" in message
    assert path in message
    assert SECRET not in message


def test_bad_password_in_environment_is_never_echoed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGPROXY_DATABASES", f'{{"x": {{"password": ["{SECRET}"], "port": 0}}}}')
    message = config_error(None)
    assert "databases.x.password" in message
    assert "databases.x.port" in message
    assert SECRET not in message


def test_missing_file(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.toml")
    assert config_error(missing) == f"cannot read config file {missing}: No such file or directory"


def test_non_json_environment_value_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGPROXY_DATABASES", "appdb=host=db")
    with pytest.raises(ConfigError, match="databases"):
        load_settings(None)


def test_pg_bindir_variable_does_not_break_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGPROXY_PG_BINDIR", "/usr/lib/postgresql/16/bin")
    assert load_settings(None).listen_port == 6432


# -- lookups and precedence -------------------------------------------------------------


def test_database_lookup_and_star_fallback() -> None:
    settings = Settings(
        databases={"appdb": DatabaseConfig(host="a"), "*": DatabaseConfig(host="any")}
    )
    entry = settings.database("appdb")
    assert entry is not None and entry.host == "a"
    other = settings.database("other")
    assert other is not None and other.host == "any"
    assert settings.database("*") is other
    assert Settings(databases={"appdb": DatabaseConfig()}).database("other") is None
    assert Settings().database("appdb") is None


@pytest.mark.parametrize(
    "user_mode, db_mode, expected",
    [
        ("statement", "transaction", "statement"),
        (None, "transaction", "transaction"),
        (None, None, "session"),
        ("transaction", None, "transaction"),
    ],
)
def test_pool_mode_precedence(user_mode: str | None, db_mode: str | None, expected: str) -> None:
    settings = Settings(pool_mode="session", users={"bob": UserConfig(pool_mode=user_mode)})
    entry = DatabaseConfig(pool_mode=db_mode)
    assert settings.pool_mode_for(entry, "bob") == expected
    # Another user has no entry: the database's setting, else the global one.
    assert settings.pool_mode_for(entry, "alice") == (db_mode or "session")


@pytest.mark.parametrize(
    "user_size, db_size, expected",
    [(2, 7, 2), (None, 7, 7), (None, None, 20), (3, None, 3)],
)
def test_pool_size_precedence(user_size: int | None, db_size: int | None, expected: int) -> None:
    settings = Settings(users={"bob": UserConfig(pool_size=user_size)})
    entry = DatabaseConfig(pool_size=db_size)
    assert settings.pool_size_for(entry, "bob") == expected
    assert settings.pool_size_for(entry, "alice") == (db_size or 20)


def test_precedence_from_a_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
pool_mode = "transaction"
default_pool_size = 10
[databases.appdb]
pool_mode = "statement"
pool_size = 4
[databases."*"]
[users.admin]
pool_mode = "session"
pool_size = 1
""",
    )
    settings = load_settings(path)
    appdb = settings.database("appdb")
    anydb = settings.database("whatever")
    assert appdb is not None and anydb is not None
    assert (settings.pool_mode_for(appdb, "admin"), settings.pool_size_for(appdb, "admin")) == (
        "session",
        1,
    )
    assert (settings.pool_mode_for(appdb, "app"), settings.pool_size_for(appdb, "app")) == (
        "statement",
        4,
    )
    assert (settings.pool_mode_for(anydb, "app"), settings.pool_size_for(anydb, "app")) == (
        "transaction",
        10,
    )


# -- command line -----------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("PGPROXY_")}
    return subprocess.run(
        [sys.executable, "-m", "pgproxy", *args],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=env,
        timeout=60,
        check=False,
    )


@pytest.mark.e2e
def test_cli_check_valid_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[databases.appdb]\nhost = "127.0.0.1"\nport = 5432\n')
    result = run_cli("--check", "-c", path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "pgproxy: configuration OK (1 database entries)"


@pytest.mark.e2e
def test_cli_check_invalid_file(tmp_path: Path) -> None:
    path = write(tmp_path, f'[databases.x]\nport = 99999\npassword = ["{SECRET}"]\n')
    result = run_cli("--check", "-c", path)
    assert result.returncode == 1
    assert "databases.x.port" in result.stderr
    assert "databases.x.password" in result.stderr
    assert SECRET not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


@pytest.mark.e2e
def test_cli_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0
    first, build = result.stdout.splitlines()
    assert first == f"PgBouncer 1.25.2 (pgproxy {__version__})"  # PgBouncer's, for tools
    compiled = len(compiled_modules())
    assert build == (
        f"build: {BUILD} ({compiled} of {len(HOT_MODULES)} hot modules compiled by mypyc), "
        f"Python {platform.python_version()}"
    )
    assert ("compiled" if compiled == len(HOT_MODULES) else "pure") == BUILD


@pytest.mark.parametrize("name", ["pgbouncer", "pgproxy"])
def test_the_console_cannot_be_the_global_auth_dbname(tmp_path: Path, name: str) -> None:
    message = config_error(write(tmp_path, f'auth_dbname = "{name}"\n'))
    assert "auth_dbname" in message
    assert f'cannot use the reserved "{name}" database as an auth_dbname' in message
