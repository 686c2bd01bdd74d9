#!/bin/sh
# pgproxy's container entrypoint. Arguments go to pgproxy as given. Without any, the config
# file is used if one is mounted (PGPROXY_CONFIG_FILE, default /etc/pgproxy/pgproxy.toml),
# else the PGPROXY_* environment alone configures pgproxy (PGPROXY_DATABASES as JSON) and
# then, unless it says otherwise, pgproxy listens on every address of the container.
set -eu
if [ "$#" -gt 0 ]; then
    exec pgproxy "$@"
fi
config="${PGPROXY_CONFIG_FILE:-/etc/pgproxy/pgproxy.toml}"
if [ -f "$config" ]; then
    exec pgproxy -c "$config"
fi
export PGPROXY_LISTEN_ADDR="${PGPROXY_LISTEN_ADDR:-*}"
export PGPROXY_METRICS_ADDR="${PGPROXY_METRICS_ADDR:-*}"
exec pgproxy
