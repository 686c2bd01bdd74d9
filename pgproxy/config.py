"""Configuration: pydantic-settings models read from a TOML file plus ``PGPROXY_*`` overrides.

Names and defaults follow PgBouncer's wherever PgBouncer has the concept, so that a
``pgbouncer.ini`` maps key for key. Validation errors name the offending key and never echo
the value (it may be a password).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from pgproxy.sockopts import TcpKeepalive, keepalive_from

PoolMode = Literal["session", "transaction", "statement"]
SslMode = Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"]
TransactionStateGuard = Literal["off", "warn", "reset"]

# PgBouncer's default auth_query, schema-qualified so that no search_path can redirect it.
DEFAULT_AUTH_QUERY = (
    "SELECT rolname, CASE WHEN rolvaliduntil < pg_catalog.now() THEN NULL ELSE rolpassword "
    "END FROM pg_catalog.pg_authid WHERE rolname = $1 AND rolcanlogin"
)
# A list of names: a TOML array, or PgBouncer's comma-separated string (also from the env).
NameList = Annotated[list[str], NoDecode]

ENV_PREFIX = "PGPROXY_"
# PgBouncer's server_check_query default: an empty query is sent.
EMPTY_CHECK_QUERY = "<empty>"
# PGPROXY_* variables that are not settings: read by the embedded PostgreSQL helper, and
# by the container's entrypoint (where the config file is).
_NOT_SETTINGS = frozenset({"PGPROXY_PG_BINDIR", "PGPROXY_CONFIG_FILE"})
DEFAULT_UNIX_SOCKET_HOST = "/var/run/postgresql"


@dataclass(frozen=True, slots=True)
class PoolSettings:
    """A pool's resolved settings (user > database > global, as PgBouncer resolves them)."""

    mode: PoolMode
    size: int
    min_size: int = 0
    reset_query: str = "DISCARD ALL"
    # server_reset_query_always: reset_query also runs in transaction and statement mode,
    # whenever a server is released (in session mode it always runs).
    reset_always: bool = False
    connect_timeout: float = 15.0
    idle_timeout: float = 600.0  # 0: never
    lifetime: float = 3600.0  # 0: one client only
    null_pool: bool = False
    login_retry: float = 15.0  # cap of the backoff between failed server logins
    reconnect_timeout: float = 300.0  # 0: never run the hook
    reconnect_failed: str | None = None
    max_waiting: int = 0  # 0: no limit
    check_query: str = "<empty>"
    check_delay: float = 30.0
    reserve_size: int = 0
    reserve_timeout: float = 5.0
    # Named prepared statements kept per server (transaction and statement mode; 0: off).
    max_prepared_statements: int = 0
    connect_query: str | None = None  # run on each new server after its login
    keepalive: TcpKeepalive | None = None  # for TCP server connections
    # transaction_state_guard (transaction and statement mode), and the period of its
    # checks of idle servers (0: none).
    state_guard: TransactionStateGuard = "warn"
    state_check_period: float = 60.0


@dataclass(frozen=True, slots=True)
class ClientTimeouts:
    """A client's timeouts in seconds (0: none), resolved at login: the user's setting,
    then the database's (query_wait_timeout only), then the global one, as PgBouncer."""

    query_wait: float = 120.0
    query: float = 0.0
    idle_transaction: float = 0.0
    transaction: float = 0.0
    client_idle: float = 0.0


class ConfigError(Exception):
    """The configuration cannot be used; the message names every offending key."""


class DatabaseConfig(BaseModel):
    """One ``[databases.NAME]`` entry: where the server is and how pgproxy logs in to it."""

    model_config = ConfigDict(extra="forbid")

    host: str = Field(
        default=DEFAULT_UNIX_SOCKET_HOST,
        description="Server host name or address; a path starting with '/' is a Unix "
        "socket directory; several separated by commas (see load_balance_hosts).",
    )
    port: int = Field(default=5432, ge=1, le=65535, description="Server port.")
    dbname: str | None = Field(
        default=None, description="Database name on the server; defaults to the entry's name."
    )
    user: str | None = Field(
        default=None,
        description="User name pgproxy logs in as; when absent the client's user name is used.",
    )
    password: SecretStr | None = Field(
        default=None, description="Password for the server login (never shown or logged)."
    )
    pool_size: int | None = Field(
        default=None, ge=1, description="Server connections per (database, user) pool."
    )
    reserve_pool_size: int | None = Field(
        default=None, ge=0, description="Overrides reserve_pool_size for this database."
    )
    max_db_connections: int | None = Field(
        default=None, ge=0, description="Overrides max_db_connections for this database."
    )
    max_db_client_connections: int | None = Field(
        default=None, ge=0, description="Overrides max_db_client_connections for this database."
    )
    pool_mode: PoolMode | None = Field(default=None, description="Overrides the global pool_mode.")
    min_pool_size: int | None = Field(
        default=None, ge=0, description="Overrides min_pool_size for this database's pools."
    )
    server_lifetime: float | None = Field(
        default=None, ge=0, description="Overrides server_lifetime for this database."
    )
    null_pool: bool | None = Field(
        default=None, description="Overrides null_pool for this database."
    )
    query_wait_timeout: float | None = Field(
        default=None, ge=0, description="Overrides query_wait_timeout for this database."
    )
    auth_user: str | None = Field(default=None, description="Overrides auth_user.")
    auth_query: str | None = Field(default=None, description="Overrides auth_query.")
    auth_dbname: str | None = Field(default=None, description="Overrides auth_dbname.")
    connect_query: str | None = Field(
        default=None,
        description="SQL run on each new server connection after its login (its results "
        "are discarded; an error closes that connection).",
    )
    load_balance_hosts: Literal["disable", "round-robin"] = Field(
        default="round-robin",
        description="With several hosts in host: round-robin starts each new connection at "
        "the next host; disable keeps the same host until a connection to it fails.",
    )


class PeerConfig(BaseModel):
    """One ``[peers.ID]`` entry: where another pgproxy of the group takes cancel requests."""

    model_config = ConfigDict(extra="forbid")

    host: str = Field(
        description="Its host name or address, or (starting with '/') its unix_socket_dir."
    )
    port: int = Field(default=6432, ge=1, le=65535, description="Its listen_port.")


class UserConfig(BaseModel):
    """One ``[users.NAME]`` entry: settings that follow a client user across databases."""

    model_config = ConfigDict(extra="forbid")

    password: SecretStr | None = Field(
        default=None,
        description="The user's secret for client authentication: a password, an md5 hash "
        "or a SCRAM-SHA-256 verifier (never shown or logged).",
    )

    pool_mode: PoolMode | None = Field(
        default=None, description="Overrides the database's and the global pool_mode."
    )
    pool_size: int | None = Field(
        default=None, ge=1, description="Overrides the database's and the default pool size."
    )
    max_user_connections: int | None = Field(
        default=None, ge=0, description="Overrides max_user_connections for this user."
    )
    max_user_client_connections: int | None = Field(
        default=None, ge=0, description="Overrides max_user_client_connections for this user."
    )
    reserve_pool_size: int | None = Field(
        default=None, ge=0, description="Overrides the database's and the global reserve."
    )
    query_timeout: float | None = Field(
        default=None, ge=0, description="Overrides query_timeout for this user's clients."
    )
    query_wait_timeout: float | None = Field(
        default=None,
        ge=0,
        description="Overrides the database's and the global query_wait_timeout.",
    )
    idle_transaction_timeout: float | None = Field(
        default=None, ge=0, description="Overrides idle_transaction_timeout for this user."
    )
    transaction_timeout: float | None = Field(
        default=None, ge=0, description="Overrides transaction_timeout for this user."
    )
    client_idle_timeout: float | None = Field(
        default=None, ge=0, description="Overrides client_idle_timeout for this user."
    )


class Settings(BaseSettings):
    """The whole configuration. Top-level keys may be overridden by ``PGPROXY_<KEY>``."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid")

    listen_addr: str = Field(
        default="127.0.0.1",
        description="Address to accept TCP clients on; '*' for all; '' for no TCP listener.",
    )
    listen_port: int = Field(default=6432, ge=1, le=65535, description="TCP (and socket) port.")
    unix_socket_dir: str | None = Field(
        default=None, description="Directory for the Unix socket '.s.PGSQL.<port>'; none if unset."
    )
    unix_socket_mode: int = Field(
        default=0o777,
        ge=0,
        le=0o7777,
        description="Permission bits of the Unix socket (octal in a pgbouncer.ini, e.g. 0777).",
    )
    unix_socket_group: str | None = Field(
        default=None, description="Group name the Unix socket is given; none: the process's."
    )
    tcp_keepalive: bool = Field(
        default=True,
        description="Turn on TCP keepalive for client and server sockets (the tcp_keep* "
        "settings tune it; 0 there: the system default).",
    )
    tcp_keepcnt: int = Field(default=0, ge=0, description="TCP_KEEPCNT; 0: system default.")
    tcp_keepidle: int = Field(
        default=0, ge=0, description="TCP_KEEPIDLE in seconds; 0: system default."
    )
    tcp_keepintvl: int = Field(
        default=0, ge=0, description="TCP_KEEPINTVL in seconds; 0: system default."
    )
    tcp_user_timeout: int = Field(
        default=0, ge=0, description="TCP_USER_TIMEOUT in milliseconds; 0: system default."
    )
    log_connections: bool = Field(
        default=True, description="Log each client login, with the client's address."
    )
    log_disconnections: bool = Field(
        default=True, description="Log each client disconnection, with the reason."
    )
    log_pooler_errors: bool = Field(
        default=True,
        description="Log at WARNING each error pgproxy itself sends to a client, with its address.",
    )
    logfile: str | None = Field(
        default=None,
        description="Also log to this file (appended; reopened on reload, as PgBouncer).",
    )
    pidfile: str | None = Field(
        default=None, description="Write the process id here at start; removed at exit."
    )
    pool_mode: PoolMode = Field(default="session", description="session, transaction or statement.")
    default_pool_size: int = Field(
        default=20, ge=1, description="Server connections per pool unless set per database/user."
    )
    min_pool_size: int = Field(
        default=0,
        ge=0,
        description="Servers each pool keeps open, opened in the background (prewarmed at "
        "start for databases with a forced user).",
    )
    server_idle_timeout: float = Field(
        default=600.0,
        ge=0,
        description="Seconds an idle server above min_pool_size is kept; closed one at a "
        "time; 0 disables.",
    )
    server_lifetime: float = Field(
        default=3600.0,
        ge=0,
        description="Seconds after which a server is closed once free (each server's limit "
        "is 0-10% earlier, so a pool never recycles all at once); 0: each server is used "
        "by one client only, then closed (as PgBouncer).",
    )
    null_pool: bool = Field(
        default=False,
        description="Keep no idle servers: a freed server goes to a waiting client or is "
        "closed; pool_size still caps concurrency (psycopg_pool's NullConnectionPool).",
    )
    server_login_retry: float = Field(
        default=15.0,
        ge=0,
        description="Longest wait between attempts after failed server logins (the wait "
        "doubles from 1 s up to this); meanwhile clients whose login needs a server get the "
        "last error at once.",
    )
    reconnect_timeout: float = Field(
        default=300.0,
        ge=0,
        description="Seconds of failed server logins after which reconnect_failed runs "
        "(once per outage; attempts go on); 0 disables.",
    )
    reconnect_failed: str | None = Field(
        default=None,
        description="Command run when reconnect_timeout passes, with PGPROXY_DATABASE, "
        "PGPROXY_USER, PGPROXY_POOL and PGPROXY_ERROR in its environment.",
    )
    reserve_pool_size: int = Field(
        default=0,
        ge=0,
        description="Extra servers a pool may open when a client has waited "
        "reserve_pool_timeout; 0 disables.",
    )
    reserve_pool_timeout: float = Field(
        default=5.0, ge=0, description="Seconds a client waits before the reserve is used."
    )
    max_db_connections: int = Field(
        default=0,
        ge=0,
        description="Most server connections of all pools of one database; 0: no limit.",
    )
    max_user_connections: int = Field(
        default=0,
        ge=0,
        description="Most server connections of all pools of one (server) user; 0: no limit.",
    )
    max_db_client_connections: int = Field(
        default=0, ge=0, description="Most client connections to one database; 0: no limit."
    )
    max_user_client_connections: int = Field(
        default=0, ge=0, description="Most client connections of one user; 0: no limit."
    )
    max_client_conn: int = Field(default=100, ge=1, description="Most client connections at once.")
    max_waiting: int = Field(
        default=0,
        ge=0,
        description="Most clients queued for a server per pool; more get 'too many clients "
        "waiting (max_waiting)'; 0: no limit (beyond PgBouncer).",
    )
    client_login_timeout: float = Field(
        default=60.0,
        ge=0,
        description="Seconds a client has to finish logging in (startup packet, "
        "authentication, first server login) before FATAL client_login_timeout; 0 disables.",
    )
    client_idle_timeout: float = Field(
        default=0.0,
        ge=0,
        description="Seconds a client without a server may send nothing before it is "
        "disconnected with client_idle_timeout; 0 disables.",
    )
    query_timeout: float = Field(
        default=0.0,
        ge=0,
        description="Seconds a request may run before pgproxy cancels it on the server (the "
        "client gets PostgreSQL's 57014 error and keeps its session); 0 disables.",
    )
    transaction_timeout: float = Field(
        default=0.0,
        ge=0,
        description="Transaction and statement mode: seconds a client may hold a server in "
        "one transaction before it is disconnected (transaction timeout); 0 disables.",
    )
    idle_transaction_timeout: float = Field(
        default=0.0,
        ge=0,
        description="Seconds a client may sit idle inside a transaction before it is "
        "disconnected (idle transaction timeout) and its server closed; 0 disables.",
    )
    server_check_query: str = Field(
        default=EMPTY_CHECK_QUERY,
        description="Run on a server idle for server_check_delay, in the background; a "
        "server whose check fails is closed; '<empty>' sends an empty query (the cheapest "
        "round trip); '' disables checks.",
    )
    server_check_delay: float = Field(
        default=30.0,
        ge=0,
        description="Seconds of idleness before a server is checked; 0: every idle server "
        "is checked right before a client gets it (as PgBouncer).",
    )
    query_wait_timeout: float = Field(
        default=120.0, ge=0, description="Seconds a client may wait for a server; 0 disables."
    )
    query_wait_notify: float = Field(
        default=5.0,
        ge=0,
        description="Seconds a client waits for a server before a NOTICE tells it it is "
        "queued; 0 disables.",
    )
    server_reset_query: str = Field(
        default="DISCARD ALL",
        description="Run on a server before another client gets it (session mode only); '' skips.",
    )
    server_reset_query_always: bool = Field(
        default=False,
        description="Run server_reset_query in transaction and statement mode too.",
    )
    transaction_state_guard: TransactionStateGuard = Field(
        default="warn",
        description="Transaction and statement mode: what to do about session state a client "
        "leaves on a server outside a transaction (SET, LISTEN, SQL PREPARE, WITH HOLD "
        "cursors, temporary tables, session advisory locks), which the server's next client "
        "would inherit: off (not looked for), warn (logged once per client, counted in "
        "pgproxy_session_state_leaks_total, listed in SHOW LEAKS), reset (the same, and "
        "server_reset_query runs on that server before anyone else gets it; without one the "
        "server is closed).",
    )
    transaction_state_check_period: float = Field(
        default=60.0,
        ge=0,
        description="With transaction_state_guard on: seconds between the checks of an idle "
        "server that served since its last check, which find the state no command tag shows "
        "(advisory locks, CREATE TEMP TABLE ... AS, SET inside a transaction block); 0 "
        "disables them.",
    )
    track_extra_parameters: NameList = Field(
        default_factory=lambda: ["IntervalStyle"],
        description="Parameters tracked per client besides client_encoding, DateStyle, "
        "TimeZone, standard_conforming_strings and application_name (only those PostgreSQL "
        "reports to clients can be tracked); read at start.",
    )
    max_prepared_statements: int = Field(
        default=200,
        ge=0,
        description="Protocol-level named prepared statements kept per server in transaction "
        "and statement mode, where pgproxy maps clients' names to its own; 0 turns that off.",
    )
    max_packet_size: int = Field(
        default=2147483647, ge=1024, le=2147483647, description="Largest protocol message accepted."
    )
    server_connect_timeout: float = Field(
        default=15.0, gt=0, description="Seconds allowed for a server connect and login."
    )
    ignore_startup_parameters: NameList = Field(
        default_factory=list,
        description="Startup parameters accepted and ignored (e.g. extra_float_digits); any "
        "other parameter that is not tracked ends the login with 'unsupported startup "
        "parameter'. 'options' here ignores every unknown option in options.",
    )
    admin_users: NameList = Field(
        default_factory=list,
        description="Users who may run every console command (a list, or names separated "
        "by commas).",
    )
    stats_users: NameList = Field(
        default_factory=list,
        description="Users who may run the console's read-only SHOW commands.",
    )
    stats_period: float = Field(
        default=60.0,
        ge=1,
        description="Seconds between statistics snapshots; SHOW STATS averages cover the "
        "last period.",
    )
    client_tls_sslmode: SslMode = Field(
        default="disable",
        description="TLS for clients: disable; allow/prefer (TLS when the client asks); "
        "require (plain clients refused); verify-ca/verify-full (a client certificate "
        "signed by client_tls_ca_file is required too).",
    )
    client_tls_cert_file: str | None = Field(
        default=None, description="pgproxy's certificate for clients (PEM)."
    )
    client_tls_key_file: str | None = Field(default=None, description="Its private key (PEM).")
    client_tls_ca_file: str | None = Field(
        default=None, description="CA that client certificates must be signed by."
    )
    server_tls_sslmode: SslMode = Field(
        default="prefer",
        description="TLS to PostgreSQL: disable/allow (never asked), prefer (used when the "
        "server has it), require (no server without it), verify-ca (its certificate "
        "checked against server_tls_ca_file), verify-full (and its host name).",
    )
    server_tls_ca_file: str | None = Field(
        default=None,
        description="CA for PostgreSQL's certificate (verify modes; default: the system's).",
    )
    server_tls_cert_file: str | None = Field(
        default=None, description="Client certificate pgproxy presents to PostgreSQL (PEM)."
    )
    server_tls_key_file: str | None = Field(default=None, description="Its private key (PEM).")
    metrics_addr: str = Field(
        default="127.0.0.1",
        description="Address of the HTTP listener for /metrics, /healthz and /readyz; '*' for all.",
    )
    metrics_port: int = Field(
        default=9433,
        ge=0,
        le=65535,
        description="Port of that listener; 0 turns metrics (and their histograms) off.",
    )
    leak_detection_threshold: float = Field(
        default=0.0,
        ge=0,
        description="Seconds a client may hold a server (transaction mode: one transaction; "
        "session mode: one transaction left open) before a leak is logged, counted and "
        "listed in SHOW LEAKS; nothing is killed; 0 disables.",
    )
    verbose: int = Field(
        default=0,
        ge=0,
        description="More logging, as -v on the command line (the higher of the two "
        "applies): 1 or more logs at DEBUG; the console's SET verbose changes it at once.",
    )
    log_format: Literal["text", "json"] = Field(
        default="text", description="Log lines as text or as one JSON object per line."
    )
    log_stats: bool = Field(
        default=True,
        description="Log a statistics line (rates and mean times) every stats_period.",
    )
    auth_type: Literal["trust", "plain", "md5", "scram-sha-256", "cert", "hba"] = Field(
        default="trust",
        description="How clients authenticate to pgproxy: trust (no password), plain "
        "(cleartext), md5 (SCRAM for users stored with a SCRAM secret), scram-sha-256, "
        "cert (a TLS client certificate whose CN is the user name), or hba (per "
        "connection, from auth_hba_file).",
    )
    auth_hba_file: str | None = Field(
        default=None,
        description="pg_hba.conf-style rules for auth_type = hba (PgBouncer's subset).",
    )
    auth_file: str | None = Field(
        default=None,
        description='PgBouncer\'s userlist.txt: one \'"user" "secret"\' per line; the secret '
        "is a password, an md5 hash or a SCRAM-SHA-256 verifier.",
    )
    auth_user: str | None = Field(
        default=None,
        description="User that runs auth_query for users with no secret in the config or "
        "auth_file (its own secret must be a plain password there, or it needs none).",
    )
    auth_query: str = Field(
        default=DEFAULT_AUTH_QUERY,
        description="Query returning (name, secret) for the user name $1; NULL secret: no login.",
    )
    auth_dbname: str | None = Field(
        default=None,
        description="Database entry auth_query runs in; default: the client's database.",
    )
    auth_cache_timeout: float = Field(
        default=0.0,
        ge=0,
        description="Seconds an auth_query answer is reused; 0 (as PgBouncer): every login "
        "asks, so a changed password or VALID UNTIL holds at once.",
    )
    scram_iterations: int = Field(
        default=4096,
        ge=4096,  # RFC 7677's minimum (and scramp's)
        description="SCRAM iterations for users whose stored secret is a plain password.",
    )
    databases: dict[str, DatabaseConfig] = Field(
        default_factory=dict, description="Database entries; the name '*' matches any other."
    )
    users: dict[str, UserConfig] = Field(default_factory=dict, description="Per-user settings.")
    workers: Annotated[int, Field(ge=1, le=64)] | Literal["auto"] = Field(
        default=1,
        description="Worker processes on the port, under one supervisor ('auto': one per "
        "CPU); limits are shared, each worker's TCP listener uses SO_REUSEPORT.",
    )
    so_reuseport: bool = Field(
        default=False,
        description="Set SO_REUSEPORT on the TCP listener: several pgproxy processes share "
        "the port (each with its own unix_socket_dir and pidfile).",
    )
    peer_id: int = Field(
        default=0,
        ge=0,
        le=16383,
        description="This process's id in a peered group (0: no peering); cancel keys carry "
        "it, so a cancel request reaching another process of the group is forwarded here.",
    )
    peers: dict[int, PeerConfig] = Field(
        default_factory=dict, description="The group: peer id → where that process listens."
    )

    @field_validator("unix_socket_mode", mode="before")
    @classmethod
    def _octal_mode(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                return int(value, 8)
            except ValueError:
                raise ValueError("expected an octal mode such as 0777") from None
        return value

    @field_validator(
        "admin_users", "stats_users", "ignore_startup_parameters", "track_extra_parameters",
        mode="before",
    )
    @classmethod
    def _split_names(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [name.strip() for name in value.split(",") if name.strip()]
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The TOML file arrives as init kwargs; the environment must win over it.
        return (env_settings, init_settings)

    def database(self, name: str) -> DatabaseConfig | None:
        """The entry serving database ``name``: its own, else the ``*`` fallback, else None."""
        entry = self.databases.get(name)
        if entry is None:
            entry = self.databases.get("*")
        return entry

    def pool_mode_for(self, database: DatabaseConfig, user: str) -> PoolMode:
        """PgBouncer's precedence: the user's setting, then the database's, then the global."""
        user_entry = self.users.get(user)
        if user_entry is not None and user_entry.pool_mode is not None:
            return user_entry.pool_mode
        if database.pool_mode is not None:
            return database.pool_mode
        return self.pool_mode

    def pool_settings(self, database: DatabaseConfig, user: str) -> PoolSettings:
        """Everything a pool for ``user`` on ``database`` needs, overrides resolved."""

        def pick(override: Any, default: Any) -> Any:
            return default if override is None else override

        mode = self.pool_mode_for(database, user)
        return PoolSettings(
            mode=mode,
            size=self.pool_size_for(database, user),
            min_size=pick(database.min_pool_size, self.min_pool_size),
            reset_query=self.server_reset_query,
            reset_always=self.server_reset_query_always,
            connect_timeout=self.server_connect_timeout,
            idle_timeout=self.server_idle_timeout,
            lifetime=pick(database.server_lifetime, self.server_lifetime),
            null_pool=pick(database.null_pool, self.null_pool),
            login_retry=self.server_login_retry,
            reconnect_timeout=self.reconnect_timeout,
            reconnect_failed=self.reconnect_failed,
            max_waiting=self.max_waiting,
            check_query=self.server_check_query,
            check_delay=self.server_check_delay,
            reserve_size=self.reserve_pool_size_for(database, user),
            reserve_timeout=self.reserve_pool_timeout,
            max_prepared_statements=0 if mode == "session" else self.max_prepared_statements,
            connect_query=database.connect_query or None,
            keepalive=keepalive_from(self),
            state_guard=self.transaction_state_guard,
            state_check_period=self.transaction_state_check_period,
        )

    def auth_dbname_for(self, database: str) -> str:
        """The database entry auth_query runs in for a client of ``database`` (of the
        console: the global auth_dbname, as PgBouncer)."""
        if database in _CONSOLE_NAMES:
            return self.auth_dbname or database
        entry = self.database(database)
        if entry is not None and entry.auth_dbname:
            return entry.auth_dbname
        return self.auth_dbname or database

    def auth_user_for(self, database: str) -> str | None:
        """Who runs auth_query for a client of ``database`` (None: no auth_query)."""
        entry = self.database(database)
        if entry is not None and entry.auth_user:
            return entry.auth_user
        return self.auth_user

    def reserve_pool_size_for(self, database: DatabaseConfig, user: str) -> int:
        """reserve_pool_size: the user's, then the database's, then the global one."""
        user_entry = self.users.get(user)
        if user_entry is not None and user_entry.reserve_pool_size is not None:
            return user_entry.reserve_pool_size
        if database.reserve_pool_size is not None:
            return database.reserve_pool_size
        return self.reserve_pool_size

    def client_timeouts(self, database: DatabaseConfig, user: str) -> ClientTimeouts:
        """The timeouts that apply to a client of ``user`` on ``database``."""
        # (Run at every login: no model built, no generator.)
        entry = self.users.get(user) or _NO_USER_ENTRY
        return ClientTimeouts(
            query_wait=_first(
                entry.query_wait_timeout, database.query_wait_timeout, self.query_wait_timeout
            ),
            query=_first(entry.query_timeout, self.query_timeout),
            idle_transaction=_first(entry.idle_transaction_timeout, self.idle_transaction_timeout),
            transaction=_first(entry.transaction_timeout, self.transaction_timeout),
            client_idle=_first(entry.client_idle_timeout, self.client_idle_timeout),
        )

    def max_db_connections_for(self, database: DatabaseConfig) -> int:
        """The database's own max_db_connections, else the global one (0: no limit)."""
        if database.max_db_connections is not None:
            return database.max_db_connections
        return self.max_db_connections

    def max_user_connections_for(self, user: str) -> int:
        """The user's own max_user_connections, else the global one (0: no limit)."""
        entry = self.users.get(user)
        if entry is not None and entry.max_user_connections is not None:
            return entry.max_user_connections
        return self.max_user_connections

    def client_limits_for(self, database: DatabaseConfig, user: str) -> tuple[int, int]:
        """(max_db_client_connections, max_user_client_connections) for this login."""
        db_limit = database.max_db_client_connections
        return (
            self.max_db_client_connections if db_limit is None else db_limit,
            self.max_user_client_connections_for(user),
        )

    def max_user_client_connections_for(self, user: str) -> int:
        """The user's own max_user_client_connections, else the global one (0: no limit)."""
        entry = self.users.get(user)
        if entry is not None and entry.max_user_client_connections is not None:
            return entry.max_user_client_connections
        return self.max_user_client_connections

    def pool_size_for(self, database: DatabaseConfig, user: str) -> int:
        """PgBouncer's precedence: the user's setting, then the database's, then the default."""
        user_entry = self.users.get(user)
        if user_entry is not None and user_entry.pool_size is not None:
            return user_entry.pool_size
        if database.pool_size is not None:
            return database.pool_size
        return self.default_pool_size


# The console's database names (pgproxy.services.admin's; repeated here, below it in the layers).
_CONSOLE_NAMES = frozenset({"pgbouncer", "pgproxy"})
_NO_USER_ENTRY = UserConfig()  # the settings of a user without a [users] entry


def _first(*candidates: float | None) -> float:
    """The first value that is set (the last candidate always is)."""
    for value in candidates:
        if value is not None:
            return value
    raise ValueError("no value set")


def _describe(error: Any) -> str:
    where = ".".join(str(part) for part in error["loc"]) or "(top level)"
    if error["type"] == "extra_forbidden":
        return f"{where}: unknown setting"
    return f"{where}: {error['msg']}"


def _unknown_env_keys() -> list[str]:
    known = {name.upper() for name in Settings.model_fields}
    return sorted(
        key
        for key in os.environ
        if key.upper().startswith(ENV_PREFIX)
        and key[len(ENV_PREFIX) :].upper() not in known
        and key.upper() not in _NOT_SETTINGS
    )


def _log_environment_overrides(file_keys: set[str]) -> None:
    """Name each setting taken from ``PGPROXY_*`` (never its value: it may be a secret)."""
    log = logging.getLogger("pgproxy.config")
    for key in sorted(os.environ):
        name = key[len(ENV_PREFIX) :].lower() if key.upper().startswith(ENV_PREFIX) else ""
        if name not in Settings.model_fields:
            continue
        if name in file_keys:
            log.warning("%s: set by %s, overriding the config file", name, key)
        else:
            log.info("%s: set by %s", name, key)


def settings_from(data: dict[str, Any], *, log_overrides: bool = False) -> Settings:
    """Settings from a config file's ``data`` and ``PGPROXY_*``; raise ConfigError.
    ``log_overrides``: log which settings the environment sets (done once, at start).
    (pgproxy.config_file reads the file, TOML or pgbouncer.ini.)"""
    unknown = _unknown_env_keys()
    if unknown:
        raise ConfigError("unknown environment setting(s): " + ", ".join(unknown))
    if log_overrides:
        _log_environment_overrides(set(data))
    try:
        return Settings(**data)
    except SettingsError as exc:
        # pydantic-settings cannot parse a complex value (JSON) from the environment.
        raise ConfigError(f"invalid environment setting: {exc}") from None
    except ValidationError as exc:
        problems = [
            _describe(error) for error in exc.errors(include_url=False, include_input=False)
        ]
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems)) from None


# Settings a running daemon cannot change: its sockets are bound once, at start.
RESTART_ONLY = frozenset(
    {
        "listen_addr", "listen_port", "unix_socket_dir", "metrics_addr", "metrics_port",
        "log_format", "pidfile", "so_reuseport", "peer_id", "workers", "track_extra_parameters",
    }
)


def changed_setting(current: Settings, key: str, value: str) -> Settings:
    """``current`` with top-level ``key`` set to ``value`` (text, as the console's SET gives
    it), validated as the file would be; raise ConfigError naming the key."""
    name = key.lower()
    field = Settings.model_fields.get(name)
    if field is None or name in ("databases", "users", "peers"):
        raise ConfigError(f"{key}: unknown setting")
    if name in RESTART_ONLY:
        raise ConfigError(f"{name}: cannot be changed without a restart")
    data = current.model_dump()
    data[name] = None if value == "" and field.default is None else value
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        problems = [
            _describe(error) for error in exc.errors(include_url=False, include_input=False)
        ]
        raise ConfigError("; ".join(problems)) from None
