"""The registry's per-(database, user) client rules: resolved once, resolved again after a
settings change."""

from __future__ import annotations

from pgproxy.config import Settings
from pgproxy.services.daemon import Daemon


def _daemon() -> Daemon:
    return Daemon(
        Settings.model_validate(
            {
                "databases": {"appdb": {"host": "127.0.0.1", "max_db_client_connections": 9}},
                "users": {"app": {"query_timeout": 3, "max_user_client_connections": 4}},
                "query_timeout": 7,
            }
        )
    )


def test_rules_follow_the_user_and_database_entries() -> None:
    registry = _daemon().registry
    app = registry.client_rules("appdb", "app")
    other = registry.client_rules("appdb", "other")
    assert app is not None and other is not None
    assert (app.timeouts.query, app.db_limit, app.user_limit) == (3, 9, 4)
    assert (other.timeouts.query, other.db_limit, other.user_limit) == (7, 9, 0)
    assert registry.client_rules("appdb", "app") is app  # (resolved once)
    assert registry.client_rules("nodb", "app") is None


def test_a_settings_change_resolves_them_again() -> None:
    daemon = _daemon()
    before = daemon.registry.client_rules("appdb", "other")
    daemon.set_setting("query_timeout", "11")
    after = daemon.registry.client_rules("appdb", "other")
    assert before is not None and after is not None
    assert (before.timeouts.query, after.timeouts.query) == (7, 11)


def test_admission_counts_against_the_resolved_caps() -> None:
    registry = _daemon().registry
    rules = registry.client_rules("appdb", "app")
    admitted = [registry.admit_client("appdb", "app", rules) for _ in range(5)]
    assert admitted[:4] == [None] * 4
    assert admitted[4] == "client connections exceeded (max_user_client_connections)"
