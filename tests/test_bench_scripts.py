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
