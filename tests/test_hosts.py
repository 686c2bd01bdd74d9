"""pgproxy.core.hosts without a network: ranking hosts by role and lag, failovers, attaching.

The end-to-end behaviour (a real primary, a real standby, a promotion) is in
tests/e2e/test_failover.py.
"""

from __future__ import annotations

from typing import Any

import pytest

from pgproxy.config import DatabaseConfig, PoolSettings, Settings, TargetSessionAttrs
from pgproxy.core.hosts import (
    BEST,
    FALLBACK,
    PRIMARY,
    STANDBY,
    UNKNOWN,
    UNTRIED,
    HostPolicy,
    HostState,
    Topologies,
    Topology,
)
from pgproxy.core.pool import Pool, ServerTarget
from pgproxy.core.server import ServerConn

HOSTS = ("db-1", "db-2", "db-3")


def _pool(host: str = ",".join(HOSTS), *, round_robin: bool = True) -> Pool:
    target = ServerTarget(host, 5432, "appdb", "app", None, round_robin=round_robin)
    return Pool("appdb", "app", target, PoolSettings(mode="transaction", size=2))


def _policy(attrs: TargetSessionAttrs, max_lag: Any = None, **pool: Any) -> HostPolicy:
    p = _pool(**pool)
    topology = Topology(p.target.hosts, 5432)
    entry = DatabaseConfig(target_session_attrs=attrs, max_replica_lag=max_lag)
    return HostPolicy(p, topology, entry)


def _set(policy: HostPolicy, name: str, role: str, *, read_only: bool = False) -> HostState:
    host = policy.topology.hosts[name]
    if role == UNKNOWN:
        host.role = UNKNOWN
    else:
        policy.topology.saw_role(host, role == STANDBY, read_only or role == STANDBY)
    return host


@pytest.mark.parametrize(
    ("attrs", "primary", "read_only_primary", "standby", "unknown"),
    [
        ("any", BEST, BEST, BEST, BEST),
        ("read-write", BEST, None, None, UNTRIED),
        ("read-only", None, BEST, BEST, UNTRIED),
        ("primary", BEST, BEST, None, UNTRIED),
        ("standby", None, None, BEST, UNTRIED),
        ("prefer-standby", FALLBACK, FALLBACK, BEST, UNTRIED),
    ],
)
async def test_rank_follows_libpq_target_session_attrs(
    attrs: TargetSessionAttrs, primary: int | None, read_only_primary: int | None,
    standby: int | None, unknown: int | None,
) -> None:  # fmt: skip
    policy = _policy(attrs)
    assert policy.rank(_set(policy, "db-1", PRIMARY)) == primary
    assert policy.rank(_set(policy, "db-1", PRIMARY, read_only=True)) == read_only_primary
    assert policy.rank(_set(policy, "db-2", STANDBY)) == standby
    assert policy.rank(_set(policy, "db-3", UNKNOWN)) == unknown


async def test_a_standby_past_max_replica_lag_is_skipped_until_it_catches_up() -> None:
    policy = _policy("prefer-standby", "2s")
    primary, standby = _set(policy, "db-1", PRIMARY), _set(policy, "db-2", STANDBY)
    standby.lag_seconds = 1.5
    assert policy.rank(standby) == BEST and policy.state_of(standby) == "serving"
    assert policy.state_of(primary) == "fallback"
    standby.lag_seconds = 2.5
    assert policy.rank(standby) is None and policy.state_of(standby) == "lagging"
    assert policy.best_rank() == FALLBACK and policy.state_of(primary) == "serving"
    standby.lag_seconds = 0.0
    assert policy.best_rank() == BEST


async def test_max_replica_lag_in_bytes_uses_the_wal_distance() -> None:
    policy = _policy("standby", "16MB")
    standby = _set(policy, "db-2", STANDBY)
    standby.lag_seconds = 600.0  # (not what a byte limit looks at)
    standby.lag_bytes = 16 * 1024 * 1024
    assert not policy.lagging(standby)
    standby.lag_bytes += 1
    assert policy.lagging(standby)
    # A primary has no lag to be behind with.
    assert not policy.lagging(_set(policy, "db-1", PRIMARY))


async def test_order_tries_the_best_first_and_the_unfit_last() -> None:
    policy = _policy("read-write")
    _set(policy, "db-1", STANDBY)
    _set(policy, "db-2", PRIMARY)
    assert [host.name for host in policy.order()] == ["db-2", "db-3", "db-1"]
    # A host that failed its last attempt comes after all that did not, and equals keep
    # the rotation from the pool's current host (load_balance_hosts).
    policy.topology.saw_failure(policy.topology.hosts["db-2"], "connection refused")
    assert [host.name for host in policy.order()] == ["db-3", "db-1", "db-2"]
    everyone = _policy("any")
    everyone.pool.host_index = 1
    assert [host.name for host in everyone.order()] == ["db-2", "db-3", "db-1"]
    everyone.topology.saw_failure(everyone.topology.hosts["db-2"], "connection refused")
    assert [host.name for host in everyone.order()] == ["db-3", "db-1", "db-2"]


async def test_a_primary_on_another_host_is_a_failover() -> None:
    policy = _policy("read-write")
    topology = policy.topology
    old, new = topology.hosts["db-1"], topology.hosts["db-2"]
    assert topology.saw_role(old, in_recovery=False, read_only=False)
    assert topology.primary == "db-1" and topology.failovers == 0
    assert topology.saw_role(new, in_recovery=True, read_only=True)
    assert not topology.saw_role(new, in_recovery=True, read_only=True)  # nothing new
    assert topology.saw_role(new, in_recovery=False, read_only=False)  # promoted
    assert topology.primary == "db-2" and topology.failovers == 1
    # The old primary is not trusted as one until it is seen again.
    assert old.role == UNKNOWN and policy.rank(old) == UNTRIED
    assert policy.rank(new) == BEST


async def test_a_login_tells_the_role_from_its_parameter_status() -> None:
    policy = _policy("read-write")
    topology = policy.topology
    server = ServerConn(policy.pool)
    server.login_params = [("in_hot_standby", "on"), ("default_transaction_read_only", "off")]
    host = topology.hosts["db-1"]
    assert topology.saw_login(host, server)
    assert (host.role, host.read_only, host.up) == (STANDBY, True, True)
    older = ServerConn(policy.pool)
    older.login_params = [("server_version", "13.9")]  # no in_hot_standby before 14
    other = topology.hosts["db-2"]
    assert not topology.saw_login(other, older)
    assert (other.role, other.up) == (UNKNOWN, True)


async def test_rebalance_marks_servers_on_hosts_that_are_no_longer_best() -> None:
    policy = _policy("read-write")
    pool = policy.pool
    on_old, on_new = ServerConn(pool), ServerConn(pool)
    on_old.host, on_new.host = "db-1", "db-2"
    pool.servers |= {on_old, on_new}
    _set(policy, "db-1", PRIMARY)
    _set(policy, "db-2", PRIMARY)  # the primary moved: db-1 is unknown now
    policy.rebalance()
    assert on_old.expires_at == 0.0  # closed once free
    assert on_new.expires_at != 0.0


async def test_only_entries_that_choose_among_hosts_get_a_policy() -> None:
    topologies = Topologies()
    plain = _pool("db-1")
    topologies.attach(plain, DatabaseConfig(host="db-1"))
    assert plain.host_policy is None and not list(topologies)
    writes, reads = _pool(), _pool()
    topologies.attach(writes, DatabaseConfig(target_session_attrs="read-write"))
    topologies.attach(reads, DatabaseConfig(target_session_attrs="prefer-standby"))
    assert writes.host_policy is not None and reads.host_policy is not None
    # Entries over the same hosts share what is known of them.
    assert writes.host_policy.topology is reads.host_policy.topology
    assert len(list(topologies)) == 1
    # A reload that makes the entry plain drops the policy (the daemon retargets the pool,
    # then attaches it again).
    reads.target = plain.target
    topologies.attach(reads, DatabaseConfig(host="db-1"))
    assert reads.host_policy is None


def test_a_twin_takes_the_address_and_login_of_the_entry_it_names() -> None:
    settings = Settings(
        databases={
            "appdb": {"host": "db-1,db-2", "port": 5433, "user": "app", "password": "pw"},
            "appdb_ro": {"replica_of": "appdb", "max_replica_lag": "5s", "pool_size": 3},
        }
    )
    twin = settings.databases["appdb_ro"]
    assert (twin.host, twin.port, twin.dbname, twin.user) == ("db-1,db-2", 5433, "appdb", "app")
    assert twin.password is not None and twin.password.get_secret_value() == "pw"
    assert twin.target_session_attrs == "prefer-standby" and twin.pool_size == 3
    # Its own settings win.
    own = Settings(
        databases={
            "appdb": {"host": "db-1,db-2", "dbname": "real"},
            "appdb_ro": {"replica_of": "appdb", "target_session_attrs": "standby"},
        }
    )
    assert own.databases["appdb_ro"].dbname == "real"
    assert own.databases["appdb_ro"].target_session_attrs == "standby"
