"""Reading pgbouncer.ini: the format, the conversion, and `pgproxy --from-pgbouncer`."""

from __future__ import annotations

import os
import stat
import tomllib
from pathlib import Path

import pytest

from pgproxy.cli import main
from pgproxy.config import ConfigError, Settings
from pgproxy.config_file import load_settings
from pgproxy.pgbouncer_ini import convert, is_pgbouncer_ini, parse_connstr, read_ini

# Every [pgbouncer] setting pgproxy carries over, with a value that is not its default.
EVERY_SETTING = """\
[pgbouncer]
logfile = {tmp}/pgbouncer.log
pidfile = {tmp}/pgbouncer.pid
listen_addr = 127.0.0.1
listen_port = 7432
unix_socket_dir = {tmp}
pool_mode = transaction
max_client_conn = 321
default_pool_size = 7
min_pool_size = 2
reserve_pool_size = 3
reserve_pool_timeout = 4
max_db_connections = 40
max_db_client_connections = 41
max_user_connections = 42
max_user_client_connections = 43
ignore_startup_parameters = extra_float_digits, geqo
stats_period = 30
max_prepared_statements = 50
scram_iterations = 8192
auth_type = md5
auth_hba_file = {tmp}/hba.conf
auth_file = {tmp}/userlist.txt
auth_user = lookup
auth_query = SELECT usename, passwd FROM pg_shadow WHERE usename=$1
auth_dbname = postgres
log_stats = 0
admin_users = admin, ops
stats_users = watcher
server_reset_query = DISCARD ALL; SELECT 1
server_check_delay = 12
server_check_query = select 2
server_lifetime = 1800
server_idle_timeout = 300
server_connect_timeout = 9
server_login_retry = 5
client_login_timeout = 45
client_tls_sslmode = disable
server_tls_sslmode = prefer
query_timeout = 60
query_wait_timeout = 30
client_idle_timeout = 900
idle_transaction_timeout = 120
transaction_timeout = 600
max_packet_size = 1048576
so_reuseport = 1
peer_id = 3
unix_socket_mode = 0750
tcp_keepalive = 0
tcp_keepcnt = 4
tcp_keepidle = 30
tcp_keepintvl = 5
tcp_user_timeout = 9000
log_connections = 0
log_disconnections = 0
log_pooler_errors = 0
server_reset_query_always = 1
track_extra_parameters = search_path, IntervalStyle
metrics_port = 0
leak_detection_threshold = 2.5
transaction_state_guard = reset
transaction_state_check_period = 30
"""

APPDB = " ".join((
    "host=db1.internal port=5433 dbname=app user=app password='it\\'s \"quoted\"'",
    "pool_size=11 min_pool_size=1 reserve_pool=2 pool_mode=session max_db_connections=20",
    "max_db_client_connections=30 server_lifetime=100 query_wait_timeout=5",
    "auth_user=lookup auth_dbname=postgres connect_query='SET x = 1' load_balance_hosts=disable",
))  # fmt: skip
APP_USER = " ".join((
    "pool_mode=statement pool_size=4 max_user_connections=6 query_timeout=7",
    "idle_transaction_timeout=8 client_idle_timeout=9 transaction_timeout=10",
))  # fmt: skip
DATABASES_AND_USERS = (
    f"[databases]\nappdb = {APPDB}\n"
    '"quoted ""name"" " = port=5434\n'
    "* = host=fallback.internal\n"
    f"[users]\napp = {APP_USER}\n"
)


def _ini(tmp_path: Path, text: str, name: str = "pgbouncer.ini") -> Path:
    path = tmp_path / name
    path.write_text(text.format(tmp=tmp_path), encoding="utf-8")
    return path


def test_connection_strings() -> None:
    assert parse_connstr("host=a  port = 5 dbname='x y'", "here") == {
        "host": "a", "port": "5", "dbname": "x y"
    }  # fmt: skip
    assert parse_connstr(r"password='it\'s \\ ok'", "here") == {"password": "it's \\ ok"}
    with pytest.raises(ConfigError, match="here: unterminated"):
        parse_connstr("password='open", "here")
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_connstr("lonely", "here")


def test_format_comments_repeats_includes_and_quoted_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _ini(tmp_path, "[pgbouncer]\nmax_client_conn = 500\n[databases]\nb = port=2\n", "more.ini")
    path = _ini(
        tmp_path,
        "; comment\n# another\n[PgBouncer]\nLISTEN_PORT = 1\nlisten_port = 2\n"
        '[databases]\n"we""ird" = port=1\n%include more.ini\nmax_client_conn = 600\n',
    )
    monkeypatch.chdir("/")  # (not found from here: found beside the including file)
    sections = read_ini(str(path))
    assert sections["pgbouncer"]["listen_port"][0] == "2"  # the last one wins
    assert sections["databases"]['we"ird'][0] == "port=1"
    assert sections["databases"]["b"][0] == "port=2"
    # After the include the section is the included file's last one ([databases]).
    assert "max_client_conn" in sections["databases"]
    assert sections["pgbouncer"]["max_client_conn"][0] == "500"
    assert is_pgbouncer_ini(path.read_text())
    assert not is_pgbouncer_ini('listen_port = 1\n[databases.pgbouncer]\nhost = "x"\n')


def test_every_supported_setting_converts_and_loads(tmp_path: Path) -> None:
    path = _ini(tmp_path, EVERY_SETTING + DATABASES_AND_USERS)
    conversion = convert(str(path))
    settings = Settings(**conversion.data)
    expected = {
        "logfile": f"{tmp_path}/pgbouncer.log", "pidfile": f"{tmp_path}/pgbouncer.pid",
        "listen_addr": "127.0.0.1", "listen_port": 7432, "unix_socket_dir": str(tmp_path),
        "pool_mode": "transaction", "max_client_conn": 321, "default_pool_size": 7,
        "min_pool_size": 2, "reserve_pool_size": 3, "reserve_pool_timeout": 4.0,
        "max_db_connections": 40, "max_db_client_connections": 41,
        "max_user_connections": 42, "max_user_client_connections": 43,
        "ignore_startup_parameters": ["extra_float_digits", "geqo"], "stats_period": 30.0,
        "max_prepared_statements": 50, "scram_iterations": 8192, "auth_type": "md5",
        "auth_hba_file": f"{tmp_path}/hba.conf", "auth_file": f"{tmp_path}/userlist.txt",
        "auth_user": "lookup", "auth_dbname": "postgres", "log_stats": False,
        "admin_users": ["admin", "ops"], "stats_users": ["watcher"],
        "server_reset_query": "DISCARD ALL; SELECT 1", "server_check_delay": 12.0,
        "server_check_query": "select 2", "server_lifetime": 1800.0,
        "server_idle_timeout": 300.0, "server_connect_timeout": 9.0,
        "server_login_retry": 5.0, "client_login_timeout": 45.0,
        "client_tls_sslmode": "disable", "server_tls_sslmode": "prefer",
        "query_timeout": 60.0, "query_wait_timeout": 30.0, "client_idle_timeout": 900.0,
        "idle_transaction_timeout": 120.0, "transaction_timeout": 600.0,
        "max_packet_size": 1048576, "so_reuseport": True, "peer_id": 3,
        "unix_socket_mode": 0o750, "tcp_keepalive": False, "tcp_keepcnt": 4,
        "tcp_keepidle": 30, "tcp_keepintvl": 5, "tcp_user_timeout": 9000,
        "log_connections": False, "log_disconnections": False, "log_pooler_errors": False,
        "server_reset_query_always": True,
        "track_extra_parameters": ["search_path", "IntervalStyle"],
        # pgproxy's own settings, in an ini too:
        "metrics_port": 0, "leak_detection_threshold": 2.5,
        "transaction_state_guard": "reset", "transaction_state_check_period": 30.0,
    }  # fmt: skip
    for key, value in expected.items():
        assert getattr(settings, key) == value, key
    assert settings.auth_query == "SELECT usename, passwd FROM pg_shadow WHERE usename=$1"
    app = settings.databases["appdb"]
    assert (app.host, app.port, app.dbname, app.user) == ("db1.internal", 5433, "app", "app")
    assert app.password is not None and app.password.get_secret_value() == 'it\'s "quoted"'
    assert (app.pool_size, app.min_pool_size, app.reserve_pool_size) == (11, 1, 2)
    assert (app.pool_mode, app.max_db_connections, app.max_db_client_connections) == (
        "session",
        20,
        30,
    )
    assert (app.server_lifetime, app.query_wait_timeout) == (100.0, 5.0)
    assert (app.auth_user, app.auth_dbname) == ("lookup", "postgres")
    assert (app.connect_query, app.load_balance_hosts) == ("SET x = 1", "disable")
    # No host: PgBouncer's unix_socket_dir, where it would look for the server.
    quoted = settings.databases['quoted "name" ']
    assert (quoted.host, quoted.port) == (str(tmp_path), 5434)
    assert settings.databases["*"].host == "fallback.internal"
    user = settings.users["app"]
    assert (user.pool_mode, user.pool_size, user.max_user_connections) == ("statement", 4, 6)
    assert (user.query_timeout, user.idle_transaction_timeout) == (7.0, 8.0)
    assert (user.client_idle_timeout, user.transaction_timeout) == (9.0, 10.0)
    assert conversion.warnings == []


def test_pgbouncer_defaults_and_what_is_not_carried_over(tmp_path: Path) -> None:
    path = _ini(
        tmp_path,
        "[pgbouncer]\nauth_type = any\ndisable_pqexec = 1\nserver_round_robin = 1\n"
        "[databases]\nappdb = host=a,b\n[peers]\n1 = host=x pool_size=3\n2 = host=/run/b port=7\n"
        "[extra]\nk = v\n",
    )
    conversion = convert(str(path))
    settings = Settings(**conversion.data)
    assert settings.listen_addr == ""  # PgBouncer without listen_addr: the socket only
    assert settings.unix_socket_dir == "/tmp"
    assert settings.auth_type == "trust"
    assert settings.server_round_robin is True  # (PgBouncer's 1)
    assert settings.databases["appdb"].host == "a,b"  # both, in turn (load_balance_hosts)
    assert (settings.peers[1].host, settings.peers[1].port) == ("x", 6432)
    assert (settings.peers[2].host, settings.peers[2].port) == ("/run/b", 7)
    assert [warning.split(": ", 1)[1] for warning in conversion.warnings] == [
        "auth_type = any: converted to trust (the user name is not ignored)",
        "disable_pqexec not carried over: multi-statement simple queries are always allowed",
        "peer 1: pool_size not carried over",
        "unknown section [extra]: ignored",
    ]
    empty = _ini(tmp_path, "[pgbouncer]\nunix_socket_dir =\n", "empty.ini")
    assert "unix_socket_dir" not in convert(str(empty)).data
    # PgBouncer's default auth_type, not pgproxy's: an ini without one asks for passwords.
    assert Settings(**convert(str(empty)).data).auth_type == "md5"
    for bad, message in (
        ("auth_type = pam", "auth_type = pam: not supported"),
        ("listen_port = many", "listen_port = 'many'"),
        ("no equals sign", "expected 'key = value'"),
        # An unknown key stops the start, as in PgBouncer (a typo must not go unnoticed).
        ("frobnicate = 2", "broken.ini:2: unknown setting frobnicate"),
        ("unix_socket_mode = 999", "unix_socket_mode = '999': not octal"),
    ):
        broken = _ini(tmp_path, f"[pgbouncer]\n{bad}\n", "broken.ini")
        with pytest.raises(ConfigError, match=message):
            convert(str(broken))


def test_load_settings_reads_an_ini(tmp_path: Path) -> None:
    path = _ini(tmp_path, "[databases]\nappdb = port=5999\n[pgbouncer]\npool_mode = statement\n")
    settings = load_settings(str(path))
    assert settings.pool_mode == "statement"
    assert settings.databases["appdb"].port == 5999


def test_from_pgbouncer_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _ini(tmp_path, EVERY_SETTING + DATABASES_AND_USERS)
    assert main(["--from-pgbouncer", str(path)]) == 0
    out, err = capsys.readouterr()
    printed = tomllib.loads(out)
    assert "password" not in printed["databases"]["appdb"]  # never on stdout
    assert "password" not in out and "1 password(s) left out" in err
    assert "server_round_robin" not in err  # (nothing in EVERY_SETTING is left behind)
    target = tmp_path / "converted.toml"
    assert main(["--from-pgbouncer", str(path), "-o", str(target)]) == 0
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o600
    settings = load_settings(str(target))
    password = settings.databases["appdb"].password
    assert password is not None and password.get_secret_value() == 'it\'s "quoted"'
    assert settings.default_pool_size == 7
    capsys.readouterr()
    missing = tmp_path / "missing.ini"
    assert main(["--from-pgbouncer", str(missing)]) == 1
    assert "cannot read config file" in capsys.readouterr().err
