"""Shared budgets for workers = N (pgproxy/services/workers.py): exact across processes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pgproxy.cli import main
from pgproxy.services.workers import SharedBudgets, SharedServerBudget, evict_for_other_workers
from tests.inprocess import BEGIN, IN_TRANSACTION, Setup, settle


def test_take_give_back_and_forget() -> None:
    budgets = SharedBudgets(3)
    slot = budgets.slot("pool:appdb/app")
    assert budgets.slot("pool:appdb/app") == slot
    assert budgets.slot("db:appdb") != slot
    assert budgets.take(slot, 0, 2) and budgets.take(slot, 1, 2)
    assert not budgets.take(slot, 2, 2)  # the sum is at the limit
    assert budgets.take(slot, 2, 0)  # 0: no limit
    assert budgets.total(slot) == 3 and budgets.mine(slot, 1) == 1
    budgets.give_back(slot, 0)
    budgets.forget_worker(2)  # it died: its places are free
    assert budgets.total(slot) == 1


def test_eviction_requests_are_taken_once() -> None:
    budgets = SharedBudgets(2)
    slot = budgets.slot("db:appdb")
    assert not budgets.take_eviction(slot)
    budgets.ask_eviction(slot)
    budgets.ask_eviction(slot)
    assert budgets.take_eviction(slot)
    assert not budgets.take_eviction(slot)


async def test_a_worker_past_its_share_leaves_places_to_a_waiting_one() -> None:
    shared = SharedBudgets(2)
    busy = SharedServerBudget(shared, 0, "pool:appdb/app", 4)  # share: 2 each
    waiting = SharedServerBudget(shared, 1, "pool:appdb/app", 4)
    waiting_pool = Setup().pool(budgets=(waiting,))  # (worker 1's pool under it)
    assert all(busy.take(False) for _ in range(4))
    assert not waiting.take(False)
    assert busy.balance() == 0  # nobody waits yet: worker 0 may hold everything
    waiting.evict_idle(waiting_pool)  # its clients wait, it holds less than its share
    assert busy.balance() == 2  # give back what is past its share
    busy.give_back()
    assert not busy.take(False)  # a freed place is not taken back...
    assert waiting.take(False)  # ...it goes to the waiting worker
    assert busy.balance() == 1
    assert waiting.balance() == 0  # asked since the last pass: still waiting
    assert shared.others_needy(busy.slot, 0)
    assert waiting.balance() == 0  # asked no more: it says so no longer
    assert not shared.others_needy(busy.slot, 0)
    assert busy.balance() == 0 and busy.take(False) is False  # (the pool is full again)


async def test_the_janitor_spreads_a_give_back_over_the_pools_of_a_budget() -> None:
    setup = Setup()
    shared = SharedBudgets(2)
    database = SharedServerBudget(shared, 0, "db:appdb", 6)  # share: 3
    other = SharedServerBudget(shared, 1, "db:appdb", 6)
    pools = [setup.pool(user="a", budgets=(database,)), setup.pool(user="b", budgets=(database,))]
    other_pool = setup.pool(budgets=(other,))  # (the other worker's)
    for pool in pools:  # three busy servers in each pool: six places taken here
        for _ in range(3):
            setup.client(pool).data_received(BEGIN)
    await settle()
    for server in setup.postgres.opened:
        server.data_received(IN_TRANSACTION)
    assert [len(pool.servers) for pool in pools] == [3, 3] and database.used == 6
    other.evict_idle(other_pool)
    evict_for_other_workers(pools)
    assert [pool.give_back for pool in pools] == [3, 0]  # 3 past the share, once
    evict_for_other_workers(pools)  # the next pass counts afresh
    assert [pool.give_back for pool in pools] == [3, 0]


def test_limit_holds_across_processes() -> None:
    budgets = SharedBudgets(4)
    slot = budgets.slot("pool:x/y")
    children = []
    for worker in range(4):
        pid = os.fork()
        if pid == 0:  # each worker tries 50 times to take a place under a limit of 37
            taken = sum(budgets.take(slot, worker, 37) for _ in range(50))
            os._exit(0 if taken <= 37 else 1)
        children.append(pid)
    for pid in children:
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    assert budgets.total(slot) == 37


def test_peer_id_and_workers_conflict(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "pgproxy.toml"
    config.write_text("workers = 2\npeer_id = 3\n")
    assert main(["-c", str(config)]) == 1
    assert "cannot be set with workers > 1" in capsys.readouterr().err


def test_metrics_of_several_workers_merge() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from pgproxy.services.metrics import merge_expositions

    def worker(transactions: int, clients: int, bucket: int) -> str:
        return (
            "# HELP pgproxy_transactions_total Transactions pooled.\n"
            "# TYPE pgproxy_transactions_total counter\n"
            f'pgproxy_transactions_total{{database="a",user="u"}} {transactions}\n'
            "# HELP pgproxy_pool_max_size Configured pool size (the cap).\n"
            "# TYPE pgproxy_pool_max_size gauge\n"
            'pgproxy_pool_max_size{database="a",user="u"} 20\n'
            "# HELP pgproxy_client_connections Client connections.\n"
            "# TYPE pgproxy_client_connections gauge\n"
            f"pgproxy_client_connections {clients}\n"
            "# HELP pgproxy_wait_seconds Wait.\n"
            "# TYPE pgproxy_wait_seconds histogram\n"
            f'pgproxy_wait_seconds_bucket{{le="0.1"}} {bucket}\n'
            f'pgproxy_wait_seconds_bucket{{le="+Inf"}} {bucket + 1}\n'
            f"pgproxy_wait_seconds_count {bucket + 1}\n"
            f"pgproxy_wait_seconds_sum 0.5\n"
        )

    merged = merge_expositions([worker(3, 2, 4), worker(5, 1, 6)]).decode()
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(merged)
        for sample in family.samples
    }
    pool = (("database", "a"), ("user", "u"))
    assert samples[("pgproxy_transactions_total", pool)] == 8
    assert samples[("pgproxy_pool_max_size", pool)] == 20  # configuration: not added up
    assert samples[("pgproxy_client_connections", ())] == 3
    assert samples[("pgproxy_wait_seconds_bucket", (("le", "0.1"),))] == 10
    assert samples[("pgproxy_wait_seconds_count", ())] == 12
    assert samples[("pgproxy_wait_seconds_sum", ())] == 1.0


def test_process_and_limit_metrics_of_several_workers_merge() -> None:
    """What each worker's ProcessCollector and client caps export: memory, CPU and open
    files add up; the file limit, the start time and the configured caps do not."""
    from prometheus_client.parser import text_string_to_metric_families

    from pgproxy.services.metrics import merge_expositions

    def worker(rss: int, cpu: float, fds: int, started: float, clients: int) -> str:
        return (
            "# HELP process_resident_memory_bytes Resident memory size in bytes.\n"
            "# TYPE process_resident_memory_bytes gauge\n"
            f"process_resident_memory_bytes {rss}\n"
            "# HELP process_cpu_seconds_total Total user and system CPU time in seconds.\n"
            "# TYPE process_cpu_seconds_total counter\n"
            f"process_cpu_seconds_total {cpu}\n"
            "# HELP process_open_fds Number of open file descriptors.\n"
            "# TYPE process_open_fds gauge\n"
            f"process_open_fds {fds}\n"
            "# HELP process_max_fds Maximum number of open file descriptors.\n"
            "# TYPE process_max_fds gauge\n"
            "process_max_fds 1024\n"
            "# HELP process_start_time_seconds Start time of the process since unix epoch.\n"
            "# TYPE process_start_time_seconds gauge\n"
            f"process_start_time_seconds {started}\n"
            "# HELP pgproxy_build_info What runs.\n"
            "# TYPE pgproxy_build_info gauge\n"
            'pgproxy_build_info{build="pure",python="3.11.7",version="0.1.0"} 1\n'
            "# HELP pgproxy_max_client_conn The max_client_conn setting.\n"
            "# TYPE pgproxy_max_client_conn gauge\n"
            "pgproxy_max_client_conn 100\n"
            "# HELP pgproxy_database_client_connections Logged-in clients of a database.\n"
            "# TYPE pgproxy_database_client_connections gauge\n"
            f'pgproxy_database_client_connections{{database="a"}} {clients}\n'
            "# HELP pgproxy_database_max_client_connections The database's cap.\n"
            "# TYPE pgproxy_database_max_client_connections gauge\n"
            'pgproxy_database_max_client_connections{database="a"} 30\n'
            "# HELP pgproxy_user_client_connections Logged-in clients of a user.\n"
            "# TYPE pgproxy_user_client_connections gauge\n"
            f'pgproxy_user_client_connections{{user="u"}} {clients}\n'
            "# HELP pgproxy_user_max_client_connections The user's cap.\n"
            "# TYPE pgproxy_user_max_client_connections gauge\n"
            'pgproxy_user_max_client_connections{user="u"} 0\n'
            "# HELP pgproxy_client_login_failures_total Failed logins by reason.\n"
            "# TYPE pgproxy_client_login_failures_total counter\n"
            f'pgproxy_client_login_failures_total{{reason="auth_failed"}} {clients}\n'
        )

    texts = [
        worker(rss=40_000_000, cpu=1.5, fds=20, started=1_700_000_100.5, clients=3),
        worker(rss=50_000_000, cpu=2.25, fds=30, started=1_700_000_000.25, clients=4),
        worker(rss=45_000_000, cpu=0.5, fds=25, started=1_700_000_200.0, clients=0),
    ]
    merged = merge_expositions(texts).decode()
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(merged)
        for sample in family.samples
    }
    assert samples[("process_resident_memory_bytes", ())] == 135_000_000
    assert samples[("process_cpu_seconds_total", ())] == 4.25
    assert samples[("process_open_fds", ())] == 75
    assert samples[("process_max_fds", ())] == 1024  # each worker's limit, not 3 x 1024
    assert samples[("process_start_time_seconds", ())] == 1_700_000_000.25  # the oldest
    build = (("build", "pure"), ("python", "3.11.7"), ("version", "0.1.0"))
    assert samples[("pgproxy_build_info", build)] == 1
    assert samples[("pgproxy_max_client_conn", ())] == 100
    assert samples[("pgproxy_database_client_connections", (("database", "a"),))] == 7
    assert samples[("pgproxy_database_max_client_connections", (("database", "a"),))] == 30
    assert samples[("pgproxy_user_client_connections", (("user", "u"),))] == 7
    assert samples[("pgproxy_user_max_client_connections", (("user", "u"),))] == 0
    assert samples[("pgproxy_client_login_failures_total", (("reason", "auth_failed"),))] == 7
    # The HELP and TYPE lines survive the merge.
    assert "# TYPE process_cpu_seconds_total counter" in merged
    assert "# TYPE process_max_fds gauge" in merged


@pytest.mark.e2e
def test_workers_that_cannot_start_stop_the_supervisor(tmp_path: Path) -> None:
    import socket
    import subprocess
    import sys

    with socket.socket() as taken:  # the port is someone else's (no SO_REUSEPORT)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "pgproxy.toml"
        config.write_text(
            f'listen_addr = "127.0.0.1"\nlisten_port = {port}\nworkers = 2\nmetrics_port = 0\n'
        )
        result = subprocess.run(
            [sys.executable, "-m", "pgproxy", "-c", str(config)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert result.returncode != 0
    assert "keeps failing at start" in result.stderr
