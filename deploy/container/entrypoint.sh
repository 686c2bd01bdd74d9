#!/bin/sh
# pgproxy's container entrypoint. Arguments go to pgproxy as given. Without any, the config
# file is used if one is mounted (PGPROXY_CONFIG_FILE, default /etc/pgproxy/pgproxy.toml),
# else the PGPROXY_* environment alone configures pgproxy (PGPROXY_DATABASES as JSON).
set -eu
if [ "$#" -gt 0 ]; then
    exec pgproxy "$@"
fi
config="${PGPROXY_CONFIG_FILE:-/etc/pgproxy/pgproxy.toml}"
if [ -f "$config" ]; then
    exec pgproxy -c "$config"
fi
exec pgproxy
