#!/usr/bin/env bash
# Lint, type-check and test. Extra arguments go to pytest (both runs below).
#
# The tests run twice (scripts/bootstrap.sh installs both builds):
#   1. the compiled build, as `pip install .` makes it (.venv-compiled, hot modules compiled
#      by mypyc): the whole suite;
#   2. the pure-Python build (.venv, editable), the fallback where no compiler is: the unit
#      tests and a smoke end-to-end module (compiled code rejects type errors that Python
#      lets through, so the suite meets both).
# tests/conftest.py stops a run that imports another build than EXPECT_PGPROXY_BUILD.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

echo "==> bootstrap"
bash scripts/bootstrap.sh

echo "==> ruff check"
.venv/bin/ruff check .

echo "==> ruff format --check"
.venv/bin/ruff format --check .

echo "==> mypy"
.venv/bin/mypy

# Unit tests: everything not marked e2e (tests/conftest.py marks what starts PostgreSQL or
# pgproxy). The smoke module drives the pooling modes, the simple and extended protocols
# and named prepared statements through a proxy.
SMOKE=(tests/e2e/test_pooling.py)

failed=0
run_pytest() {  # run_pytest NAME EXPECTED_BUILD PYTHON [PYTEST ARGS...]
    local name=$1 expected=$2 python=$3 status=0 started=$SECONDS
    shift 3
    echo "==> pytest: $name"
    # PYTHONSAFEPATH: `python -m pgproxy` (the suite starts proxies so) and pytest itself put
    # no working directory on sys.path, and --import-mode=append puts the repository after
    # site-packages: `import pgproxy` finds the installed build, `import tests` the checkout.
    env EXPECT_PGPROXY_BUILD="$expected" PYTHONSAFEPATH=1 "$python" -m pytest -q \
        -p no:cacheprovider --import-mode=append "$@" || status=$?
    echo "==> pytest: $name: exit $status after $((SECONDS - started)) s"
    if [ "$status" -eq 5 ]; then
        echo "test.sh: pytest collected no tests; treating that as a failure" >&2
    fi
    [ "$status" -eq 0 ] || failed=1
}

compiled=compiled
if [ -n "${PURE_PGPROXY:-}" ] && [ "$PURE_PGPROXY" != 0 ]; then
    compiled=pure  # bootstrap built .venv-compiled pure, as asked
fi
# PYTHONPATH would put a source tree ahead of the installed package.
if [ "$#" -gt 0 ]; then
    PYTHONPATH= run_pytest "the $compiled build" "$compiled" .venv-compiled/bin/python "$@"
    run_pytest "the pure build" pure .venv/bin/python "$@"
else
    PYTHONPATH= run_pytest "the $compiled build, every test" "$compiled" \
        .venv-compiled/bin/python
    run_pytest "the pure build, unit tests" pure .venv/bin/python -m "not e2e"
    run_pytest "the pure build, ${SMOKE[*]}" pure .venv/bin/python "${SMOKE[@]}"
fi
exit "$failed"
