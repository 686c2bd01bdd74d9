"""auth_query: a client's secret looked up in PostgreSQL itself, as auth_user.

For a user with no secret in the config or the auth_file, pgproxy connects to the database
(the client's, or ``auth_dbname``) as ``auth_user`` with psycopg and runs ``auth_query``
with the user name as ``$1``. The default query is PgBouncer's, with schema-qualified names
so that a search_path cannot redirect it; it returns NULL for a role whose VALID UNTIL has
passed, which then fails like a wrong password; a user it returns no row for gets
PgBouncer's "no such user". Answers are cached for
``auth_cache_timeout`` seconds; concurrent logins of one user share one query.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

import psycopg

from pgproxy.protocol.client_auth import BadSecret, Secret, parse_secret
from pgproxy.protocol.messages import is_utf8

if TYPE_CHECKING:
    from pgproxy.config import DatabaseConfig, Settings

log = logging.getLogger("pgproxy.auth")


class AuthQueryError(Exception):
    """The lookup itself failed (server down, bad query, no permission). What the client
    is told, as PgBouncer: the server's own error when auth_user's login failed (a
    database that does not exist, a wrong auth_user password), else "bouncer config
    error" (the query failed: a configuration problem, in the log)."""

    def __init__(self, reason: str, client_message: str = "bouncer config error") -> None:
        super().__init__(reason)
        self.client_message = client_message


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _server_message(exc: psycopg.Error) -> tuple[str, str]:
    """The severity and message of the server's error in a failed connection's error
    ("... failed: FATAL:  database "x" does not exist"); no severity and the error's own
    first line when it has none."""
    line = _first_line(exc)
    _, found, message = line.rpartition("FATAL:")
    return ("FATAL ", message.strip()) if found else ("", line)


# What a lookup answers for a user the query returned no row for (compared by identity;
# as a secret it matches no password).
UNKNOWN_USER = Secret("md5", "md5-unknown-user")


class AuthQuery:
    """Runs and caches auth_query lookups."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, str], tuple[float, Secret | None]] = {}
        self._running: dict[tuple[str, str], asyncio.Future[Secret | None]] = {}

    def clear(self) -> None:
        """Forget every cached answer (RELOAD)."""
        self._cache.clear()

    async def lookup(
        self, settings: Settings, database: str, user: str, auth_password: str | None
    ) -> Secret | None:
        """``user``'s secret; None for an expired one (NULL secret), UNKNOWN_USER when no
        row came back; raise AuthQueryError."""
        target = settings.auth_dbname_for(database)
        key = (target, user)
        cached = self._cache.get(key)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        running = self._running.get(key)
        if running is None:
            running = asyncio.get_running_loop().create_future()
            self._running[key] = running
            try:
                secret = await self._query(settings, target, user, auth_password)
            except AuthQueryError as exc:
                running.set_exception(exc)
                running.exception()  # read: other waiters may have gone
                raise
            finally:
                self._running.pop(key, None)
            running.set_result(secret)
            if settings.auth_cache_timeout > 0:
                self._cache[key] = (time.monotonic() + settings.auth_cache_timeout, secret)
            return secret
        return await asyncio.shield(running)

    async def _query(
        self, settings: Settings, database: str, user: str, auth_password: str | None
    ) -> Secret | None:
        entry = settings.database(database)
        auth_user = settings.auth_user_for(database)
        if entry is None or auth_user is None:
            return None
        if not is_utf8(user):
            # A name with bytes that are not UTF-8 names no role of a UTF-8 database, and
            # psycopg sends its parameters as UTF-8: no row, as for any unknown name.
            return UNKNOWN_USER
        query = (entry.auth_query or settings.auth_query).encode()
        try:
            conn = await psycopg.AsyncConnection.connect(
                **_conninfo(settings, entry, database, auth_user, auth_password)
            )
        except (psycopg.Error, UnicodeEncodeError) as exc:  # (the latter: a database name)
            severity, message = (
                _server_message(exc) if isinstance(exc, psycopg.Error) else ("", str(exc))
            )
            log.warning(
                "auth_query for a %s login: server login failed: %s%s", database, severity, message
            )
            raise AuthQueryError(message, message) from None
        try:
            async with conn:
                cursor = psycopg.AsyncRawCursor(conn)
                await cursor.execute(query, (user,))
                row = await cursor.fetchone()
        except psycopg.Error as exc:
            reason = _first_line(exc)
            log.warning("auth_query for a %s login failed: %s", database, reason)
            raise AuthQueryError(reason) from None
        if row is None:
            return UNKNOWN_USER
        if len(row) < 2 or row[1] is None:
            return None
        try:
            return parse_secret(str(row[1]))
        except BadSecret:
            log.warning("auth_query returned a malformed SCRAM secret for user %s", user)
            return None


def _conninfo(
    settings: Settings,
    entry: DatabaseConfig,
    database: str,
    user: str,
    password: str | None,
) -> dict[str, Any]:
    mode = settings.server_tls_sslmode
    params: dict[str, Any] = {
        "host": entry.host,
        "port": entry.port,
        "dbname": entry.dbname or database,
        "user": user,
        "autocommit": True,
        "connect_timeout": max(int(settings.server_connect_timeout), 1),
        "sslmode": mode,
        "application_name": "pgproxy auth_query",
    }
    if password is not None:
        params["password"] = password
    if settings.server_tls_ca_file:
        params["sslrootcert"] = settings.server_tls_ca_file
    return params
