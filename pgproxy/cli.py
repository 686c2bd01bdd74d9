"""Command line: ``pgproxy -c FILE [--check] [-v] [--version]``."""

from __future__ import annotations

import argparse
import logging
import sys

import uvloop

from pgproxy import __version__, logs
from pgproxy.config import ConfigError, load_settings
from pgproxy.daemon import Daemon, client_secrets
from pgproxy.hba import hba_rules


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (kept separate so tests and docs can inspect it)."""
    parser = argparse.ArgumentParser(
        prog="pgproxy", description="PostgreSQL pooling proxy (PgBouncer-compatible)."
    )
    parser.add_argument("-c", "--config", metavar="FILE", help="TOML configuration file")
    parser.add_argument(
        "--check", action="store_true", help="validate the configuration and exit (0 = valid)"
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    parser.add_argument("--version", action="version", version=f"pgproxy {__version__}")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``pgproxy`` console script and ``python -m pgproxy``."""
    args = build_parser().parse_args(argv)
    logs.configure(args.verbose)
    try:
        settings = load_settings(args.config)
        secrets = client_secrets(settings)
        hba_rules(settings)
    except ConfigError as exc:
        print(f"pgproxy: {exc}", file=sys.stderr)
        return 1
    logs.configure(args.verbose, settings.log_format)
    if args.check:
        print(f"pgproxy: configuration OK ({len(settings.databases)} database entries)")
        return 0
    if not settings.databases:
        logging.getLogger("pgproxy").warning("no [databases] configured: every login will fail")
    if settings.auth_type != "trust" and not secrets:
        logging.getLogger("pgproxy").warning(
            "auth_type = %s but no user has a secret (auth_file, [users.NAME] password): "
            "every login will fail",
            settings.auth_type,
        )
    daemon = Daemon(settings, config_path=args.config)
    try:
        uvloop.run(daemon.serve())
    except OSError as exc:
        print(f"pgproxy: cannot listen: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0
