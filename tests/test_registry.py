"""The registry's per-(database, user) client rules: resolved once, resolved again after a
settings change."""

from __future__ import annotations

from pgproxy.config import Settings
from pgproxy.services.daemon import Daemon
from pgproxy.services.registry import PairMemo


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


def test_pair_memo_keeps_values_by_database_and_user_up_to_its_limit() -> None:
    memo: PairMemo[int] = PairMemo(3)
    memo.put("db", "a", 1)
    memo.put("db", "b", 2)
    memo.put("db", "a", 10)  # (a pair kept again counts once)
    memo.put("other", "a", 3)
    assert [memo.get("db", "a"), memo.get("db", "b"), memo.get("other", "a")] == [10, 2, 3]
    assert memo.get("db", "c") is None and memo.get("nowhere", "a") is None
    memo.put("other", "b", 4)  # the fourth pair: the memo starts afresh
    assert memo.get("db", "a") is None and memo.get("other", "b") == 4


def test_client_rules_are_kept_per_pair_until_reconfigured() -> None:
    daemon = _daemon()
    registry = daemon.registry
    rules = registry.client_rules("appdb", "app")
    assert rules is not None and registry.client_rules("appdb", "app") is rules
    assert registry.pool_for("nosuchdb", "app") is None
    daemon.set_setting("query_timeout", "11")
    assert registry.client_rules("appdb", "app") is not rules
