"""The demo: a throwaway PostgreSQL with pgproxy in front of it, until Ctrl-C.

``python -m pgproxy.demo [--port 6432] [--pool-mode transaction]`` starts a PostgreSQL
cluster in a temporary directory (password login required, SCRAM-SHA-256), puts pgproxy on
127.0.0.1:PORT in front of it, prints the psql line to connect, and removes everything it
started when interrupted.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import sys

import uvloop

from pgproxy.config import Settings
from pgproxy.embedded import EmbeddedPostgres, find_pg_bindir
from pgproxy.services.daemon import Daemon


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the process exit code."""
    parser = argparse.ArgumentParser(prog="python -m pgproxy.demo", description=__doc__)
    parser.add_argument("--port", type=int, default=6432, help="pgproxy port (default 6432)")
    parser.add_argument(
        "--pool-mode", default="transaction", choices=["session", "transaction", "statement"]
    )
    parser.add_argument(
        "--metrics-port", type=int, default=9433, help="/metrics port (default 9433; 0: off)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    server_password = secrets.token_urlsafe(16)
    # (Not on pgproxy's ports, which the OS could hand out again until pgproxy binds them.)
    with EmbeddedPostgres(avoid=(args.port, args.metrics_port)) as postgres:
        postgres.create_role("demo", server_password)
        postgres.create_database("demo", owner="demo")
        settings = Settings(
            listen_addr="127.0.0.1",
            listen_port=args.port,
            pool_mode=args.pool_mode,
            default_pool_size=10,
            admin_users=["demo"],
            metrics_port=args.metrics_port,
            databases={
                "demo": {
                    "host": "127.0.0.1",
                    "port": postgres.port,
                    "user": "demo",
                    "password": server_password,
                }
            },
        )
        psql = os.path.join(find_pg_bindir(), "psql")
        metrics = (
            f"    curl http://127.0.0.1:{args.metrics_port}/metrics\n" if args.metrics_port else ""
        )
        print(
            f"\nPostgreSQL {postgres.port} (data in {postgres.data_dir}) requires SCRAM logins;"
            f"\npgproxy ({args.pool_mode} mode) logs in for you. Connect with:\n\n"
            f"    {psql} -h 127.0.0.1 -p {args.port} -U demo demo\n"
            f"    {psql} -h 127.0.0.1 -p {args.port} -U demo pgbouncer   # the admin console\n"
            f"{metrics}\nPress Ctrl-C to stop and remove everything.\n",
            flush=True,
        )
        try:
            uvloop.run(Daemon(settings).serve())
        except OSError as exc:
            print(f"pgproxy: cannot listen on 127.0.0.1:{args.port}: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            pass
    print("demo stopped; PostgreSQL removed.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
