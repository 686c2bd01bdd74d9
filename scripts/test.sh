#!/usr/bin/env bash
# Lint, type-check and test. Extra arguments go to pytest.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

echo "==> bootstrap"
bash scripts/bootstrap.sh

echo "==> ruff check"
.venv/bin/ruff check .

echo "==> mypy"
.venv/bin/mypy

echo "==> pytest"
status=0
.venv/bin/pytest -q -p no:cacheprovider "$@" || status=$?
if [ "$status" -eq 5 ]; then
    echo "test.sh: pytest collected no tests; treating that as a failure" >&2
    exit 1
fi
exit "$status"
