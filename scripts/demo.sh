#!/usr/bin/env bash
# Run the pgproxy demo (arguments go to `python -m pgproxy.demo`).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/bootstrap.sh"
exec "$ROOT/.venv/bin/python" -m pgproxy.demo "$@"
