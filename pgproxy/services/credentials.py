"""What clients are checked against and what pgproxy logs in with: secrets (auth_file,
[users] passwords, auth_query, passthrough), hba rules and the TLS contexts.

Everything is read from the files the settings name, all at once: a broken file raises
ConfigError before anything in force changes.
"""

from __future__ import annotations

import logging
import ssl

from pgproxy.auth_query import AuthQuery
from pgproxy.config import RESERVED_AUTH_DBNAMES, ConfigError, Settings
from pgproxy.core.client import LoginCredentials
from pgproxy.hba import HbaRules, hba_rules
from pgproxy.protocol.client_auth import BadSecret, Secret, parse_secret
from pgproxy.protocol.server_login import Credential, Md5Hash
from pgproxy.services.pause_state import PauseState
from pgproxy.tls import ServerTls, certificate_hash, client_context, server_tls
from pgproxy.userlist import read_userlist

log = logging.getLogger("pgproxy")


class Credentials(LoginCredentials):
    """Client secrets, proven credentials for server logins, hba rules, TLS contexts."""

    def __init__(self, settings: Settings, pauses: PauseState) -> None:
        """Read the files ``settings`` names; raise ConfigError."""
        self.settings = settings
        self.pauses = pauses  # (a disabled auth database stops auth_query)
        self.auth_query = AuthQuery()
        # Passthrough: what each user's last successful login proved (password, md5 hash
        # or SCRAM keys), for server logins that have no configured password.
        self.passthrough: dict[str, Credential] = {}
        self.secrets: dict[str, Secret] = client_secrets(settings)
        self.client_tls: ssl.SSLContext | None = client_context(settings)  # None: no TLS
        self.client_tls_binding = _binding(settings, self.client_tls)
        self.server_tls: ServerTls = server_tls(settings)
        self.hba: HbaRules | None = hba_rules(settings)
        self._known_users = _known_users(settings)

    def reload(self, settings: Settings, *, one_tls_key: str | None = None) -> None:
        """Read what the settings point at: client secrets (the auth_file's, then each
        [users.NAME] password over them), TLS contexts (None: no TLS for clients) and hba
        rules. Everything is read before anything is kept, so a ConfigError changes
        nothing; certificates read again serve new connections only.

        ``one_tls_key``: the console SET of that client_tls_* key. The files are set one
        SET at a time (key, then certificate, then CA), so in between they may not match:
        as in PgBouncer, the SET is taken, the TLS settings in force stay until a complete
        set loads, and the reason is logged."""
        secrets = client_secrets(settings)
        try:
            tls_for_clients = client_context(settings)
            binding = _binding(settings, tls_for_clients)
        except ConfigError as exc:
            if one_tls_key is None:
                raise
            log.warning("SET %s: client TLS not reloaded yet: %s", one_tls_key, exc)
            tls_for_clients, binding = self.client_tls, self.client_tls_binding
        tls_for_servers, hba = server_tls(settings), hba_rules(settings)
        self.secrets, self.client_tls, self.server_tls = secrets, tls_for_clients, tls_for_servers
        self.client_tls_binding, self.hba = binding, hba
        self.settings = settings
        self._known_users = _known_users(settings)
        self.auth_query.clear()

    def secret_for(self, user: str) -> Secret | None:
        """What ``user``'s password is checked against, from the config or auth_file."""
        return self.secrets.get(user)

    def remember(self, user: str, credential: Credential) -> None:
        """What ``user``'s login just proved, for server logins without a password."""
        self.passthrough[user] = credential

    def server_credential(self, user: str) -> Credential | None:
        """What pgproxy logs in to PostgreSQL with as ``user`` when the database entry has
        no password: a client's proven credential, else a plain or md5 stored secret."""
        credential = self.passthrough.get(user)
        if credential is not None:
            return credential
        secret = self.secrets.get(user)
        if secret is None or secret.kind == "scram":
            return None  # a verifier alone cannot log in: a SCRAM client login must come first
        return secret.value if secret.kind == "plain" else Md5Hash(secret.value)

    def auth_database_problem(self, database: str) -> str | None:
        """Why auth_query cannot run for a client of ``database`` now (PgBouncer's words),
        or None."""
        target = self.settings.auth_dbname_for(database)
        if target in RESERVED_AUTH_DBNAMES:  # (the console: auth_query cannot run there)
            log.error('cannot use the reserved "%s" database as an auth_dbname', target)
            return "bouncer config error"
        if target != database and self.settings.database(target) is None:
            log.error('authentication database "%s" is not configured', target)
            return "bouncer config error"
        if self.pauses.is_disabled(target):
            return f'authentication database "{target}" is disabled'
        return None

    def knows_user(self, database: str, user: str) -> bool | None:
        """Under auth_type = trust, as PgBouncer: True for a user with a secret (auth_file,
        [users]) or a database's forced user; None when auth_query must tell; False for
        anyone else. Without an auth_file or auth_user, every user is known (pgproxy
        lets any user name in then; PgBouncer would know none)."""
        known = self._known_users
        if user in self.secrets or known is None or user in known:
            return True
        return None if self.settings.auth_user_for(database) is not None else False

    async def lookup_secret(self, database: str, user: str) -> Secret | None:
        """``user``'s secret through auth_query; None for an expired user, UNKNOWN_USER
        for one the query does not know."""
        auth_user = self.settings.auth_user_for(database)
        auth_secret = self.secrets.get(auth_user) if auth_user else None
        password = auth_secret.value if auth_secret and auth_secret.kind == "plain" else None
        return await self.auth_query.lookup(self.settings, database, user, password)


def _known_users(settings: Settings) -> frozenset[str] | None:
    """Besides the users with a secret, who ``knows_user`` knows: the databases' forced
    users; None for everyone (no auth_file and no auth_user)."""
    if not settings.auth_file and not settings.auth_user:
        return None
    return frozenset(entry.user for entry in settings.databases.values() if entry.user)


def client_secrets(settings: Settings) -> dict[str, Secret]:
    """The secrets clients' passwords are checked against; raise ConfigError."""
    secrets = read_userlist(settings.auth_file) if settings.auth_file else {}
    for name, entry in settings.users.items():
        if entry.password is not None:
            try:
                secrets[name] = parse_secret(entry.password.get_secret_value())
            except BadSecret as exc:
                raise ConfigError(f"users.{name}.password: {exc}") from None
    return secrets


def _binding(settings: Settings, context: ssl.SSLContext | None) -> bytes | None:
    """SCRAM-SHA-256-PLUS channel binding data for TLS clients (None without TLS)."""
    if context is None or not settings.client_tls_cert_file:
        return None
    return certificate_hash(settings.client_tls_cert_file)
