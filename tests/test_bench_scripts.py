"""The benchmark scripts that need no PostgreSQL still run (they import pgproxy's internals,
so a refactoring would otherwise break them silently)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

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
    assert set(figures) == {"select16", "select100", "extended16"}, done.stdout
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
