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
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from pgproxy.client_rules import ClientRules, ClientTimeouts
from pgproxy.sockopts import TcpKeepalive, keepalive_from

PoolMode = Literal["session", "transaction", "statement"]
SslMode = Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"]
TransactionStateGuard = Literal["off", "warn", "reset"]
# libpq's target_session_attrs: which of a database's hosts its server connections go to.
TargetSessionAttrs = Literal[
    "any", "read-write", "read-only", "primary", "standby", "prefer-standby"
]

# PgBouncer's default auth_query, schema-qualified so that no search_path can redirect it.
DEFAULT_AUTH_QUERY = (
    "SELECT rolname, CASE WHEN rolvaliduntil < pg_catalog.now() THEN NULL ELSE rolpassword "
    "END FROM pg_catalog.pg_authid WHERE rolname = $1 AND rolcanlogin"
)
# A list of names: a TOML array, or PgBouncer's comma-separated string (also from the env).
NameList = Annotated[list[str], NoDecode]
AuthType = Literal["trust", "plain", "md5", "scram-sha-256", "cert", "hba"]

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
    # server_round_robin: the server idle longest is taken first, not the warmest.
    round_robin: bool = False
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
    log_connections: bool = True  # a new server connection is logged (INFO)
    log_disconnections: bool = True  # a server login PostgreSQL refused is logged (INFO)
    # transaction_state_guard (transaction and statement mode), and the period of its
    # checks of idle servers (0: none).
    state_guard: TransactionStateGuard = "warn"
    state_check_period: float = 60.0


class ConfigError(Exception):
    """The configuration cannot be used; the message names every offending key."""


# What a read-only twin (replica_of) takes from the entry it names, unless set itself.
_TWIN_INHERITS = ("host", "port", "dbname", "user", "password", "load_balance_hosts")
_LAG_TIME_UNITS = {"ms": 0.001, "s": 1.0, "min": 60.0}
_LAG_SIZE_UNITS = {"b": 1, "kb": 1024, "mb": 1024**2, "gb": 1024**3}


@dataclass(frozen=True, slots=True)
class ReplicaLagLimit:
    """max_replica_lag read: in seconds, or in bytes of WAL (one of the two is set)."""

    seconds: float | None = None
    wal_bytes: int | None = None


def replica_lag_limit(value: float | str | None) -> ReplicaLagLimit | None:
    """Read max_replica_lag (None: no limit); raise ValueError for a malformed one."""
    if value is None:
        return None
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("must not be negative")
        return ReplicaLagLimit(seconds=float(value))
    text = value.strip().lower().replace(" ", "")
    number = text.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = text[len(number) :]
    try:
        amount = float(number)
    except ValueError:
        amount = -1.0
    if amount >= 0 and unit in _LAG_TIME_UNITS:
        return ReplicaLagLimit(seconds=amount * _LAG_TIME_UNITS[unit])
    if amount >= 0 and (unit in _LAG_SIZE_UNITS or unit == ""):
        if unit == "":  # a bare number in a string: seconds, as a number is
            return ReplicaLagLimit(seconds=amount)
        return ReplicaLagLimit(wal_bytes=int(amount * _LAG_SIZE_UNITS[unit]))
    raise ValueError(
        "expected seconds ('5s', '500ms', '1min', a number) or WAL bytes ('16MB', '1GB')"
    )


class DatabaseConfig(BaseModel):
    """One ``[databases.NAME]`` entry: where the server is and how pgproxy logs in to it."""

    model_config = ConfigDict(extra="forbid")

    host: str = Field(
        default=DEFAULT_UNIX_SOCKET_HOST,
        description="Server host name or address; a path starting with `/` is a Unix socket "
        "directory; several separated by commas (see `load_balance_hosts`).",
    )
    port: int = Field(default=5432, ge=1, le=65535, description="Server port.")
    dbname: str | None = Field(
        default=None, description="Database name on the server; unset: the entry's name."
    )
    user: str | None = Field(
        default=None,
        description="User pgproxy logs in to PostgreSQL as (forces one pool for the database); "
        "unset: the client's user name.",
    )
    password: SecretStr | None = Field(
        default=None,
        description="Password for the server login: cleartext, md5 or "
        "SCRAM-SHA-256, whichever the server asks for. Never logged or shown.",
    )
    pool_size: int | None = Field(
        default=None, ge=1, description="Overrides `default_pool_size` for this database."
    )
    reserve_pool_size: int | None = Field(
        default=None, ge=0, description="Overrides `reserve_pool_size` for this database."
    )
    max_db_connections: int | None = Field(
        default=None, ge=0, description="Overrides `max_db_connections` for this database."
    )
    max_db_client_connections: int | None = Field(
        default=None, ge=0, description="Overrides `max_db_client_connections` for this database."
    )
    pool_mode: PoolMode | None = Field(
        default=None,
        description="Overrides `pool_mode` for this database.",
    )
    min_pool_size: int | None = Field(
        default=None, ge=0, description="Overrides `min_pool_size` for this database."
    )
    server_lifetime: float | None = Field(
        default=None, ge=0, description="Overrides `server_lifetime` for this database."
    )
    null_pool: bool | None = Field(
        default=None, description="Overrides `null_pool` for this database."
    )
    query_wait_timeout: float | None = Field(
        default=None,
        ge=0,
        description="Overrides `query_wait_timeout` for this database's clients.",
    )
    auth_user: str | None = Field(
        default=None,
        description="Overrides `auth_user` for this database.",
    )
    auth_query: str | None = Field(
        default=None,
        description="Overrides `auth_query` for this database.",
    )
    auth_dbname: str | None = Field(
        default=None,
        description="Overrides `auth_dbname` for this database.",
    )
    connect_query: str | None = Field(
        default=None,
        description="SQL run on each new server connection right after its login; an error closes "
        "that connection.",
    )
    load_balance_hosts: Literal["disable", "round-robin"] = Field(
        default="round-robin",
        description="With several hosts in `host` (comma-separated): `round-robin` starts each "
        "new server connection at the next host; `disable` stays on one host until a connection "
        "to it fails. A host that cannot be reached is skipped for the next one.",
    )
    target_session_attrs: TargetSessionAttrs = Field(
        default="any",
        description="Which of the hosts new server connections go to, as libpq's "
        "`target_session_attrs`: `any`; `read-write` or `read-only` (hot standby or "
        "`default_transaction_read_only`); `primary` or `standby` (hot standby); "
        "`prefer-standby` (a standby, else the primary). Each host's role is checked at "
        "every server login and every `server_check_delay`; servers on a host that no "
        "longer fits are closed once free (docs/high-availability.md).",
    )
    max_replica_lag: float | str | None = Field(
        default=None,
        description="A standby further behind its primary than this gets no new servers, "
        "and its servers are closed once free, until it catches up: seconds (a number, or "
        "`'500ms'`, `'5s'`, `'1min'`) or bytes of WAL (`'16MB'`, `'1GB'`). Unset: no limit.",
    )
    replica_of: str | None = Field(
        default=None,
        description="Makes this entry the read-only twin of the entry it names: that "
        "entry's `host`, `port`, `dbname`, `user`, `password` and `load_balance_hosts` "
        "unless set here, and `target_session_attrs` `prefer-standby` unless set here.",
    )

    @field_validator("max_replica_lag")
    @classmethod
    def _check_replica_lag(cls, value: float | str | None) -> float | str | None:
        replica_lag_limit(value)  # (raises ValueError naming the expected forms)
        return value


class PeerConfig(BaseModel):
    """One ``[peers.ID]`` entry: where another pgproxy of the group takes cancel requests."""

    model_config = ConfigDict(extra="forbid")

    host: str = Field(
        description="Its host name or address, or (starting with `/`) its `unix_socket_dir`."
    )
    port: int = Field(default=6432, ge=1, le=65535, description="Its `listen_port`.")


class UserConfig(BaseModel):
    """One ``[users.NAME]`` entry: settings that follow a client user across databases."""

    model_config = ConfigDict(extra="forbid")

    password: SecretStr | None = Field(
        default=None,
        description="The user's secret for client authentication (password, `md5…` hash or "
        "`SCRAM-SHA-256$…` verifier); wins over `auth_file`. Never logged or shown.",
    )

    pool_mode: PoolMode | None = Field(
        default=None, description="Overrides the database's and the global `pool_mode`."
    )
    pool_size: int | None = Field(
        default=None, ge=1, description="Overrides the database's and the default pool size."
    )
    max_user_connections: int | None = Field(
        default=None, ge=0, description="Overrides `max_user_connections` for this user."
    )
    max_user_client_connections: int | None = Field(
        default=None, ge=0, description="Overrides `max_user_client_connections` for this user."
    )
    reserve_pool_size: int | None = Field(
        default=None,
        ge=0,
        description="Overrides the database's and the global `reserve_pool_size`.",
    )
    query_timeout: float | None = Field(
        default=None, ge=0, description="Overrides `query_timeout` for this user's clients."
    )
    query_wait_timeout: float | None = Field(
        default=None,
        ge=0,
        description="Overrides the database's and the global `query_wait_timeout`.",
    )
    idle_transaction_timeout: float | None = Field(
        default=None,
        ge=0,
        description="Overrides `idle_transaction_timeout` for this user's clients.",
    )
    transaction_timeout: float | None = Field(
        default=None, ge=0, description="Overrides `transaction_timeout` for this user's clients."
    )
    client_idle_timeout: float | None = Field(
        default=None, ge=0, description="Overrides `client_idle_timeout` for this user's clients."
    )


class Settings(BaseSettings):
    """The whole configuration. Top-level keys may be overridden by ``PGPROXY_<KEY>``."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid")

    listen_addr: str = Field(
        default="127.0.0.1",
        description="Address(es) to accept TCP clients on, comma-separated; `*` for all; empty "
        "for no TCP listener.",
    )
    listen_port: int = Field(
        default=6432,
        ge=1,
        le=65535,
        description="TCP port, and the number in the Unix socket's name.",
    )
    unix_socket_dir: str | None = Field(
        default=None,
        description="Directory for the Unix socket `.s.PGSQL.<port>`; no socket if unset.",
    )
    unix_socket_mode: int = Field(
        default=0o777,
        ge=0,
        le=0o7777,
        description="Permission bits of the Unix socket (an integer in TOML, e.g. `0o777`; octal "
        "text in a pgbouncer.ini).",
    )
    unix_socket_group: str | None = Field(
        default=None, description="Group the Unix socket file is given."
    )
    tcp_keepalive: bool = Field(
        default=True,
        description="TCP keepalive on client and server sockets, as PgBouncer.",
    )
    tcp_keepcnt: int = Field(
        default=0,
        ge=0,
        description="`TCP_KEEPCNT`; 0 keeps the system default (as do the next three).",
    )
    tcp_keepidle: int = Field(default=0, ge=0, description="`TCP_KEEPIDLE`, seconds.")
    tcp_keepintvl: int = Field(default=0, ge=0, description="`TCP_KEEPINTVL`, seconds.")
    tcp_user_timeout: int = Field(default=0, ge=0, description="`TCP_USER_TIMEOUT`, milliseconds.")
    log_connections: bool = Field(
        default=True, description="Log each login (`C-<id> db/user@addr login: ...`) at INFO."
    )
    log_disconnections: bool = Field(
        default=True,
        description="Log each disconnection with its reason and age at INFO "
        "(clients that never sent a startup packet, such as port probes, are not logged).",
    )
    log_pooler_errors: bool = Field(
        default=True,
        description="Log at WARNING each error pgproxy itself sends to a client, with the "
        "client's address.",
    )
    logfile: str | None = Field(
        default=None,
        description="Also log to this file (appended); reopened on reload, so rotate it, then "
        "`RELOAD`/SIGHUP.",
    )
    pidfile: str | None = Field(
        default=None,
        description="Write the process id here at start (refused while the pid in "
        "an existing file lives); removed at exit.",
    )
    pool_mode: PoolMode = Field(
        default="session",
        description="`session`, `transaction` or `statement` (see "
        "[Pool modes](operations.md#pool-modes)).",
    )
    default_pool_size: int = Field(
        default=20,
        ge=1,
        description="Server connections per (database, user) pool unless set per database or user.",
    )
    min_pool_size: int = Field(
        default=0,
        ge=0,
        description="Servers each pool keeps open, opened in the background; pools of databases "
        "with a forced `user` are prewarmed at start.",
    )
    server_idle_timeout: float = Field(
        default=600.0,
        ge=0,
        description="Seconds an idle server above `min_pool_size` is kept; the longest-idle one "
        "is closed, one per maintenance pass (3 a second); 0 disables.",
    )
    server_lifetime: float = Field(
        default=3600.0,
        ge=0,
        description="Seconds after which a server is closed once free; each server's limit is "
        "0-10% earlier so a pool never recycles all at once; 0: a server serves one client (one "
        "transaction in transaction mode) and is closed, as in PgBouncer.",
    )
    null_pool: bool = Field(
        default=False,
        description="Keep no idle servers: a freed server goes to a waiting client or is closed, "
        "while `pool_size` still caps concurrency (psycopg_pool's NullConnectionPool).",
    )
    server_login_retry: float = Field(
        default=15.0,
        ge=0,
        description="After a failed server connect or login the pool waits before trying again: "
        "0.25 s, doubling (±10% jitter) up to this many seconds; attempts that were already in "
        "flight together count as one. While PostgreSQL answers that it is starting up or "
        "shutting down (57P03) the pool retries every 0.1 s instead, so a restart costs clients "
        "about 0.1 s once PostgreSQL is back. Until a login works again a new "
        "client whose login needs a server gets `server login has been failing, cached error: … "
        "(server_login_retry)` at once (PgBouncer's fast fail); logins already waiting, and "
        "clients already queued, keep waiting for a server that cannot be reached or is "
        "restarting (up to `client_login_timeout` / `query_wait_timeout`), while a refusal (wrong "
        "password, unknown database) reaches them at once.",
    )
    reconnect_timeout: float = Field(
        default=300.0,
        ge=0,
        description="Seconds of failed server logins after which `reconnect_failed` runs (once "
        "per outage; attempts go on); 0 disables it.",
    )
    reconnect_failed: str | None = Field(
        default=None,
        description="Command (split like a shell would, not run by one) run when "
        "`reconnect_timeout` passes, with `PGPROXY_DATABASE`, `PGPROXY_USER`, `PGPROXY_POOL` and "
        "`PGPROXY_ERROR` (PostgreSQL's message, never a password) in its environment.",
    )
    reserve_pool_size: int = Field(
        default=0,
        ge=0,
        description="Extra servers a pool may open, one per maintenance pass, once its first "
        "waiting client has waited `reserve_pool_timeout`; 0 disables.",
    )
    reserve_pool_timeout: float = Field(
        default=5.0, ge=0, description="Seconds a client waits before the reserve is used."
    )
    max_db_connections: int = Field(
        default=0,
        ge=0,
        description="Most server connections of all pools of one database; a pool with waiting "
        "clients then takes the place of an idle server of another pool of that database "
        "(PgBouncer waits for that server's idle timeout instead); 0: no limit.",
    )
    max_user_connections: int = Field(
        default=0,
        ge=0,
        description="The same across all pools of one server user.",
    )
    max_db_client_connections: int = Field(
        default=0,
        ge=0,
        description="Most client connections to one database; more get `client "
        "connections exceeded (max_db_client_connections)`; 0: no limit.",
    )
    max_user_client_connections: int = Field(
        default=0,
        ge=0,
        description="Most client connections of one user; more get `client "
        "connections exceeded (max_user_client_connections)`; 0: no limit.",
    )
    max_client_conn: int = Field(
        default=100,
        ge=1,
        description="Client connections accepted at once; more get `no more connections allowed "
        "(max_client_conn)`.",
    )
    max_waiting: int = Field(
        default=0,
        ge=0,
        description="Most clients queued for a server per pool; one more gets `too many clients "
        "waiting (max_waiting)` (53300); 0: no limit. Beyond PgBouncer.",
    )
    client_login_timeout: float = Field(
        default=60.0,
        ge=0,
        description="Seconds a client has to finish logging in (startup packet, authentication, "
        "the pool's first server login) before FATAL `client_login_timeout` "
        "(`client_login_timeout (server down)` while waiting for a server); 0 disables.",
    )
    client_idle_timeout: float = Field(
        default=0.0,
        ge=0,
        description="Seconds a logged-in client without a server may send nothing before FATAL "
        "`client_idle_timeout`; 0 disables.",
    )
    query_timeout: float = Field(
        default=0.0,
        ge=0,
        description="Seconds a request may run without a reply before pgproxy cancels it on the "
        "server; the client gets PostgreSQL's `canceling statement due to user request` (57014) "
        "and keeps its session (PgBouncer disconnects instead); 0 disables.",
    )
    transaction_timeout: float = Field(
        default=0.0,
        ge=0,
        description="Transaction and statement mode: seconds a client may hold a server in one "
        "transaction before FATAL `transaction timeout` (its server is closed); 0 disables.",
    )
    idle_transaction_timeout: float = Field(
        default=0.0,
        ge=0,
        description="Seconds a client may sit idle inside a transaction before FATAL `idle "
        "transaction timeout`; its server is closed (PostgreSQL rolls back); 0 disables.",
    )
    server_check_query: str = Field(
        default=EMPTY_CHECK_QUERY,
        description="Run in the background on a server idle for `server_check_delay` (it leaves "
        "the idle list meanwhile); a server whose check fails is closed. `<empty>` (PgBouncer's "
        "default) sends an empty query, the cheapest round trip; an empty value disables checks.",
    )
    server_check_delay: float = Field(
        default=30.0,
        ge=0,
        description="Seconds of idleness before a server is checked (and between checks); `0`: "
        "every idle server is checked right before a client gets it, as in PgBouncer.",
    )
    query_wait_timeout: float = Field(
        default=120.0,
        ge=0,
        description="Seconds a client may wait for a free server before "
        "FATAL `query_wait_timeout` (08P01); 0 waits forever.",
    )
    query_wait_notify: float = Field(
        default=5.0,
        ge=0,
        description="Seconds a client waits for a server before a NOTICE (`No server connection "
        "available in DB backend, client being queued`) tells it, once per wait; 0 disables.",
    )
    server_reset_query: str = Field(
        default="DISCARD ALL",
        description="Session mode (and every mode with `server_reset_query_always`): run on a "
        "server when its client leaves, before anyone else gets it; empty skips it.",
    )
    server_reset_query_always: bool = Field(
        default=False,
        description="Run `server_reset_query` in transaction and statement mode too, after every "
        "transaction.",
    )
    server_round_robin: bool = Field(
        default=False,
        description="Hand clients the server that has been idle longest (round robin) instead "
        "of the one used last (LIFO), so that every server of a pool takes an even share of "
        "the load: better when several hosts or a balancer are behind one database entry. The "
        "default keeps the load on as few servers as it can (PgBouncer's default too).",
    )
    transaction_state_guard: TransactionStateGuard = Field(
        default="warn",
        description="Transaction and statement mode: what to do about session state a client "
        "leaves on its server outside a transaction — settings changed by `SET`, `LISTEN`, SQL "
        "`PREPARE`, `WITH HOLD` cursors, temporary tables, session advisory locks — which that "
        "server's next client would inherit. `off`: not looked for. `warn`: each leak is logged "
        "(once per client and kind), counted in `pgproxy_session_state_leaks_total{kind}` and "
        "listed by `SHOW LEAKS`; the state stays. `reset`: the same, and `server_reset_query` "
        "(`DISCARD ALL`) runs on that server before anyone else gets it (without a "
        "`server_reset_query` the server is closed). The tracked parameters are no leak. How "
        "leaks are found, and what is not: see [Session state left on a "
        "server](operations.md#session-state-left-on-a-server).",
    )
    transaction_state_check_period: float = Field(
        default=60.0,
        ge=0,
        description="With `transaction_state_guard` on: seconds between the checks of an idle "
        "server that has served a client since its last check; they find what no command tag "
        "shows (session advisory locks, `CREATE TEMP TABLE … AS`, a `SET` inside `BEGIN` … "
        "`COMMIT`), blamed on the server's last client. 0 disables them.",
    )
    track_extra_parameters: NameList = Field(
        default_factory=lambda: ["IntervalStyle"],
        description="Parameters tracked per client (kept across servers) besides "
        "`client_encoding`, `DateStyle`, `TimeZone`, `standard_conforming_strings` and "
        "`application_name`; only parameters PostgreSQL reports to clients can be tracked.",
    )
    max_prepared_statements: int = Field(
        default=200,
        ge=0,
        description="Transaction and statement mode: protocol-level named prepared statements are "
        "tracked per client and prepared on whichever server the client gets, under pgproxy's own "
        "names (`PGPROXY_n`, one per distinct query text and parameter types), as PgBouncer ≥ "
        "1.21 does. The value is how many stay prepared on each server (least recently used are "
        "closed); `0` turns the mapping off (named statements then pass through, and break when "
        "the client changes server). SQL-level `PREPARE`/`EXECUTE`/`DEALLOCATE name` are mapped "
        "too, and the client's last "
        "unnamed Parse is sent again to a new server that needs it (see [Prepared statements in "
        "transaction mode](operations.md#prepared-statements-in-transaction-mode)); `DEALLOCATE "
        "ALL` and `DISCARD ALL` clear the client's names.",
    )
    max_packet_size: int = Field(
        default=2147483647,
        ge=1024,
        le=2147483647,
        description="Largest protocol message "
        "accepted from a client; larger gets an 08P01 error and a close.",
    )
    server_connect_timeout: float = Field(
        default=15.0, gt=0, description="Seconds for a server connection and login."
    )
    ignore_startup_parameters: NameList = Field(
        default_factory=list,
        description="Startup parameters accepted and ignored (JDBC's `extra_float_digits`, say). "
        "Any other parameter that is not tracked (`client_encoding`, `DateStyle`, `TimeZone`, "
        "`IntervalStyle`, `standard_conforming_strings`, `application_name`) ends the login with "
        "PgBouncer's `unsupported startup parameter: NAME`, so a setting the client relies on is "
        "never dropped silently. `options` may carry `-c name=value` / `--name=value` for tracked "
        "settings; `options` in this list ignores unknown ones there. (Console logins are not "
        "checked.)",
    )
    admin_users: NameList = Field(
        default_factory=list,
        description="Users who may run every console command (a TOML list, or names separated by "
        "commas as in `pgbouncer.ini`).",
    )
    stats_users: NameList = Field(
        default_factory=list,
        description="Users who may run the console's read-only `SHOW` commands.",
    )
    stats_period: float = Field(
        default=60.0,
        ge=1,
        description="Seconds between statistics snapshots; the `avg_*` figures of `SHOW STATS` "
        "cover the window since the snapshot before the last.",
    )
    client_tls_sslmode: SslMode = Field(
        default="disable",
        description="TLS for clients: `disable`; `allow`/`prefer` (TLS when the client asks); "
        "`require` (TCP clients without TLS get `SSL required`; Unix-socket clients need none); "
        "`verify-ca`/`verify-full` (a client certificate signed by `client_tls_ca_file` too).",
    )
    client_tls_cert_file: str | None = Field(
        default=None,
        description="pgproxy's certificate for clients (PEM); re-read on RELOAD "
        "(new connections use it; an unreadable file fails the RELOAD).",
    )
    client_tls_key_file: str | None = Field(default=None, description="Its private key (PEM).")
    client_tls_ca_file: str | None = Field(
        default=None, description="CA that client certificates must be signed by."
    )
    server_tls_sslmode: SslMode = Field(
        default="prefer",
        description="TLS to PostgreSQL: `disable`/`allow` (never asked), `prefer` (used when the "
        "server has it), `require` (refuse a server without it), `verify-ca` (certificate checked "
        "against `server_tls_ca_file`, or the system's CAs), `verify-full` (and the host name). "
        "TLS 1.2 at least, both sides.",
    )
    server_tls_ca_file: str | None = Field(
        default=None,
        description="CA for PostgreSQL's certificate in the verify modes.",
    )
    server_tls_cert_file: str | None = Field(
        default=None, description="A client certificate pgproxy presents to PostgreSQL (PEM)."
    )
    server_tls_key_file: str | None = Field(default=None, description="Its private key (PEM).")
    metrics_addr: str = Field(
        default="127.0.0.1",
        description="Address of the HTTP listener for `/metrics`, `/healthz` and `/readyz`; `*` "
        "for all (containers).",
    )
    metrics_port: int = Field(
        default=9433,
        ge=0,
        le=65535,
        description="Its port; `0` turns metrics off (no listener, no histograms observed). When "
        "the default port is taken (a second pgproxy on the host), pgproxy logs a warning and "
        "runs without the endpoint; a port set in the file or the environment that is taken stops "
        "the start with `metrics_port N: Address already in use`.",
    )
    leak_detection_threshold: float = Field(
        default=0.0,
        ge=0,
        description="Seconds a client may hold a server (transaction mode: one transaction; "
        "session mode: a transaction left open while idle) before a warning is logged, "
        "`pgproxy_leaks_total` counts it and `SHOW LEAKS` lists it; nothing is killed; 0 "
        "disables.",
    )
    verbose: int = Field(
        default=0,
        ge=0,
        description="More logging, as `-v`: 1 adds pgproxy's DEBUG detail, 2 every library's "
        "DEBUG too (the higher of this and the command line's applies); `SET verbose = N` on "
        "the console changes it at once.",
    )
    log_format: Literal["text", "json"] = Field(
        default="text",
        description="`text`, or `json`: one object per line with `time`, `level`, "
        "`logger`, `message`.",
    )
    log_stats: bool = Field(
        default=True,
        description="Log PgBouncer's periodic stats line (xacts/s, queries/s, bytes/s, mean "
        "xact/query/wait µs) every `stats_period`.",
    )
    auth_type: AuthType = Field(
        default="trust",
        description="How clients authenticate to pgproxy: `trust`, `plain` (cleartext), `md5` "
        "(users stored with a SCRAM secret are asked for SCRAM, as PgBouncer does), "
        "`scram-sha-256`, `cert` (a TLS client certificate, verified against "
        "`client_tls_ca_file`, whose CN is the user name), or `hba` (per connection, from "
        "`auth_hba_file`). With an `auth_file` or `auth_user`, `trust` still requires the user to "
        "be known, as in PgBouncer: in the auth_file, a database's forced `user`, or found by "
        "`auth_query` (`no such user` otherwise); without either, any user name is let in. In a "
        "pgbouncer.ini that does not set it the default is `md5`, as in PgBouncer. See [Client "
        "authentication](operations.md#client-authentication).",
    )
    auth_hba_file: str | None = Field(
        default=None,
        description="pg_hba.conf rules for `auth_type = hba`: PgBouncer's subset "
        "(`local`/`host`/`hostssl`/`hostnossl`; databases `all`, `sameuser`, `replication`, "
        "`@file`, names; users `all`, `@file`, names; addresses `all`, CIDR or address + mask; "
        "methods `trust`, `reject`, `md5`, `scram-sha-256`, `password`, `cert` (the client "
        "certificate's CN is the user), `peer` (Unix socket: the OS user is the user)). Anything "
        "else is refused at start, naming the line.",
    )
    auth_file: str | None = Field(
        default=None,
        description='PgBouncer\'s `userlist.txt`: `"user" "secret"` per line, the secret a '
        "password, an md5 hash or a SCRAM-SHA-256 verifier. Re-read on RELOAD.",
    )
    auth_user: str | None = Field(
        default=None,
        description="User that runs `auth_query` (in the client's database) for users with no "
        "secret in the config or `auth_file`; its own secret there must be a plain password, or "
        "it needs none.",
    )
    auth_query: str = Field(
        default=DEFAULT_AUTH_QUERY,
        description="Query returning (name, secret) for the user name `$1`; a NULL secret (the "
        "default query gives one for an expired `VALID UNTIL`) fails the login. The default is "
        "PgBouncer's query, schema-qualified so that no `search_path` can redirect it.",
    )
    auth_dbname: str | None = Field(
        default=None,
        description="Database entry `auth_query` runs in instead of the client's.",
    )
    auth_cache_timeout: float = Field(
        default=0.0,
        ge=0,
        description="Seconds an `auth_query` answer is reused; 0 (PgBouncer's behaviour): every "
        "login asks, so a changed password or `VALID UNTIL` holds at once. Concurrent logins of a "
        "user share one query either way.",
    )
    scram_iterations: int = Field(
        default=4096,
        ge=4096,  # RFC 7677's minimum (and scramp's)
        description="SCRAM iterations for users whose stored secret is a plain password (at least "
        "4096).",
    )
    databases: dict[str, DatabaseConfig] = Field(
        default_factory=dict,
        description="The database entries, `[databases.NAME]`; "
        '`[databases."*"]` serves any other name. Unknown names get `no such database: NAME`.',
    )
    users: dict[str, UserConfig] = Field(
        default_factory=dict,
        description="Per-user settings, `[users.NAME]`.",
    )
    workers: Annotated[int, Field(ge=1, le=64)] | Literal["auto"] = Field(
        default=1,
        description='Worker processes under one supervisor (`"auto"`: one per CPU this process '
        "may use), all on the port and the Unix socket, acting as one pgproxy: shared limits, "
        "cancel routing, one console. See [Several processes on one "
        "port](operations.md#several-processes-on-one-port). `peer_id` cannot be combined with "
        "it.",
    )
    so_reuseport: bool = Field(
        default=False,
        description="Set `SO_REUSEPORT` on the TCP listener so several pgproxy processes share "
        "the port (the kernel spreads new connections; each process needs its own "
        "`unix_socket_dir`, `pidfile` and `logfile`). See [Several processes on one "
        "port](operations.md#several-processes-on-one-port).",
    )
    peer_id: int = Field(
        default=0,
        ge=0,
        le=16383,
        description="This process's id (1-16383) in a group of pgproxy processes behind one port "
        "or load balancer; its cancel keys carry it, so a CancelRequest that reaches another "
        "process of the group is forwarded here. `0`: no peering.",
    )
    peers: dict[int, PeerConfig] = Field(
        default_factory=dict,
        description="`[peers.ID]` tables with `host` (a name, an address, "
        "or this process's `unix_socket_dir`) and `port` (default 6432): where each process of "
        "the group takes cancel requests. An entry for the process's own id is ignored, so every "
        "process can share one list.",
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

    @field_validator("auth_dbname")
    @classmethod
    def _not_the_console(cls, value: str | None) -> str | None:
        if value in RESERVED_AUTH_DBNAMES:
            raise ValueError(f'cannot use the reserved "{value}" database as an auth_dbname')
        return value

    @field_validator(
        "admin_users",
        "stats_users",
        "ignore_startup_parameters",
        "track_extra_parameters",
        mode="before",
    )
    @classmethod
    def _split_names(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [name.strip() for name in value.split(",") if name.strip()]
        return value

    @model_validator(mode="after")
    def _resolve_twins(self) -> Settings:
        # A read-only twin (replica_of) takes its server's address and login from the
        # entry it names, unless it sets them itself.
        for name, entry in list(self.databases.items()):
            if entry.replica_of is None:
                continue
            source = self.databases.get(entry.replica_of)
            if source is None or entry.replica_of == name:
                raise ValueError(
                    f"databases.{name}.replica_of: no other database entry "
                    f"named {entry.replica_of!r}"
                )
            if source.replica_of is not None:
                raise ValueError(
                    f"databases.{name}.replica_of: {entry.replica_of!r} is itself a read-only twin"
                )
            inherited = {
                key: getattr(source, key)
                for key in _TWIN_INHERITS
                if key not in entry.model_fields_set
            }
            if "dbname" in inherited and inherited["dbname"] is None:
                inherited["dbname"] = entry.replica_of
            if "target_session_attrs" not in entry.model_fields_set:
                inherited["target_session_attrs"] = "prefer-standby"
            if inherited:
                self.databases[name] = entry.model_copy(update=inherited)
        return self

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
            round_robin=self.server_round_robin,
            reserve_size=self.reserve_pool_size_for(database, user),
            reserve_timeout=self.reserve_pool_timeout,
            max_prepared_statements=0 if mode == "session" else self.max_prepared_statements,
            connect_query=database.connect_query or None,
            keepalive=keepalive_from(self),
            log_connections=self.log_connections,
            log_disconnections=self.log_disconnections,
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

    def client_rules(self, database: DatabaseConfig, user: str) -> ClientRules:
        """The timeouts and client caps of a client of ``user`` on ``database``."""
        return ClientRules(
            self.client_timeouts(database, user), *self.client_limits_for(database, user)
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


# The console's database names (pgproxy.services.admin's; repeated here, below it in the
# layers): auth_query cannot run there, so neither can be an auth_dbname.
_CONSOLE_NAMES = RESERVED_AUTH_DBNAMES = frozenset({"pgbouncer", "pgproxy"})
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
        "listen_addr",
        "listen_port",
        "unix_socket_dir",
        "metrics_addr",
        "metrics_port",
        "log_format",
        "pidfile",
        "so_reuseport",
        "peer_id",
        "workers",
        "track_extra_parameters",
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
