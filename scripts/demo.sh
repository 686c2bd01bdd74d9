#!/usr/bin/env bash
# Run the pgproxy demo (arguments go to `python -m pgproxy.demo`).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/bootstrap.sh"
# The compiled build (.venv-compiled), as `pip install .` makes it.
exec "$ROOT/.venv-compiled/bin/python" -P -m pgproxy.demo "$@"
