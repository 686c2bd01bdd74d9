"""The benchmark scripts that need no PostgreSQL still run (they import pgproxy's internals,
so a refactoring would otherwise break them silently)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def test_hotpath_prints_a_figure_per_scenario() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH / "hotpath.py"), "--transactions", "400", "--repeat", "1"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    figures = dict(re.findall(r"^\| (\w+) \| ([0-9.]+) \|$", done.stdout, re.MULTILINE))
    assert set(figures) == {"select16", "select100", "extended16", "tpcb16"}, done.stdout
    assert all(0 < float(value) < 1000 for value in figures.values()), figures


def test_paired_ratio_pairs_runs_of_the_same_round() -> None:
    sys.path.insert(0, str(BENCH.parent))
    from bench import run

    def result(round_no: int, target: str, tps: float | None) -> run.RunResult:
        r = run.RunResult("select16", target, round_no, [])
        r.tps, r.exit_code, r.transactions = tps, 0, 1
        return r

    results = [
        result(1, run.PGBOUNCER, 100.0), result(1, run.PGPROXY, 90.0),
        result(2, run.PGBOUNCER, 200.0), result(2, run.PGPROXY, 220.0),
        result(3, run.PGBOUNCER, 50.0), result(3, run.PGPROXY, 40.0),
        result(4, run.PGBOUNCER, None), result(4, run.PGPROXY, 10.0),  # no pair: left out
    ]  # fmt: skip
    middle, ratios = run.paired_ratio(results, "select16", run.PGPROXY, run.PGBOUNCER)
    assert ratios == [0.9, 1.1, 0.8]
    assert middle == 0.9


def test_cpu_ratio_pairs_the_machine_cpu_per_transaction_of_a_round() -> None:
    sys.path.insert(0, str(BENCH.parent))
    from bench import run

    def result(round_no: int, target: str, busy: float, transactions: int) -> run.RunResult:
        r = run.RunResult("connect8", target, round_no, [])
        r.tps, r.exit_code, r.transactions = 1.0, 0, transactions
        r.machine_busy_seconds, r.machine_steal_seconds = busy, 0.0
        return r

    results = [
        # Round 1: PgBouncer 30 µs of machine CPU per transaction, pgproxy 40: 0.75.
        result(1, run.PGBOUNCER, 3.0, 100_000), result(1, run.PGPROXY, 3.2, 80_000),
        # Round 2: 20 against 25 µs: 0.8; round 3: 10 against 10: 1.0.
        result(2, run.PGBOUNCER, 2.0, 100_000), result(2, run.PGPROXY, 2.5, 100_000),
        result(3, run.PGBOUNCER, 1.0, 100_000), result(3, run.PGPROXY, 0.5, 50_000),
        result(4, run.PGPROXY, 9.0, 1_000),  # no PgBouncer run in round 4: left out
    ]  # fmt: skip
    by_cpu = run.paired_cpu_ratio(results, "connect8", run.PGPROXY, run.PGBOUNCER)
    assert by_cpu is not None and round(by_cpu, 6) == 0.8
    summary = run.summarise(results)["connect8"][run.PGPROXY]
    assert summary.machine_us_per_txn is not None
    assert round(summary.machine_us_per_txn, 6) == round(15.2e6 / 231_000, 6)
    assert summary.steal_share == 0.0
    busy, steal = run.machine_cpu()
    assert busy > 0 and steal >= 0


def test_workers_run_the_compiled_build_when_the_run_measures_it() -> None:
    sys.path.insert(0, str(BENCH.parent))
    from bench import run

    assert run.workers_python(["pure", "compiled"], "/pure/python") == str(run.COMPILED_PYTHON)
    assert run.workers_python(["compiled"], "/pure/python") == str(run.COMPILED_PYTHON)
    assert run.workers_python(["pure"], "/pure/python") == "/pure/python"


def test_added_latency_is_paired_with_direct_by_round() -> None:
    sys.path.insert(0, str(BENCH.parent))
    from bench import run

    def result(round_no: int, target: str, latency_ms: float) -> run.RunResult:
        r = run.RunResult("single", target, round_no, [])
        r.tps, r.exit_code, r.transactions, r.latency_ms = 1.0, 0, 1, latency_ms
        return r

    results = [
        result(1, run.DIRECT, 0.100), result(1, run.PGPROXY_COMPILED, 0.130),
        result(2, run.DIRECT, 0.200), result(2, run.PGPROXY_COMPILED, 0.250),
        result(3, run.PGPROXY_COMPILED, 0.900),  # no direct run in round 3: left out
    ]  # fmt: skip
    added = run.added_latency_us(results, "single", run.PGPROXY_COMPILED)
    assert added is not None and round(added) == 40  # the median of 30 and 50 µs


@pytest.mark.e2e
def test_login_flood_keeps_the_victim_served_and_salts_stable() -> None:
    """bench/login_flood.py against a real PostgreSQL and pgproxy, briefly: under a flood
    of SCRAM openings (an existing, an unknown and a plain-password user) the victim's
    queries all go through and its latency is reported; every kind of user keeps one salt
    (the timing figures themselves are the benchmark's to report, not a test's)."""
    done = subprocess.run(
        [sys.executable, str(BENCH / "login_flood.py"), "--threads", "3", "--duration", "1",
         "--samples", "20"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr + done.stdout
    flood = re.findall(
        r"^\| (\w+) \(\w+\) \| (\d+) \| (\d+) \| ([0-9.]+) \| ([0-9.]+) \| (\d+) \|$",
        done.stdout, re.MULTILINE,
    )  # fmt: skip
    assert {row[0] for row in flood} == {"scram", "unknown", "plain"}, done.stdout
    for _kind, exchanges, failed, p50, _p99, queries in flood:
        assert int(exchanges) > 0 and int(failed) == 0 and int(queries) > 0
        assert 0 < float(p50) < 1000
    salts = re.findall(r"^\| (\w+) \(\w+\) \| [0-9.]+ \| [0-9.]+ \| (\d+) \|$", done.stdout,
                       re.MULTILINE)  # fmt: skip
    assert sorted(salts) == [("plain", "1"), ("scram", "1"), ("unknown", "1")], done.stdout
