"""Command line: ``pgproxy [-c] FILE [--check] [-q] [-v] [-V]``, and
``pgproxy --from-pgbouncer pgbouncer.ini [-o FILE]``.

FILE is pgproxy's TOML or a PgBouncer ``pgbouncer.ini`` (told apart by its ``[pgbouncer]``
section); PgBouncer's own flags (-q, -v, -V, -h) mean the same here, so scripts written
for PgBouncer can start pgproxy unchanged."""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import platform
import resource
import sys
from collections.abc import Sequence
from typing import Any

import uvloop

from pgproxy import BUILD, VERSION_LINE, logs
from pgproxy.compiled import HOT_MODULES, compiled_modules
from pgproxy.config import ConfigError, Settings
from pgproxy.config_file import load_settings
from pgproxy.hba import hba_rules
from pgproxy.services.credentials import client_secrets
from pgproxy.services.daemon import Daemon
from pgproxy.services.workers import WorkerContext, supervise, worker_count

#: Middle-generation collections between two full ones (CPython's default is 10).
FULL_COLLECTION_EVERY = 100


def version_text() -> str:
    """What -V prints: PgBouncer's first line (tools parse it), then the build that runs."""
    compiled = f"{len(compiled_modules())} of {len(HOT_MODULES)} hot modules compiled by mypyc"
    return f"{VERSION_LINE}\nbuild: {BUILD} ({compiled}), Python {platform.python_version()}"


class _VersionAction(argparse.Action):
    """-V: print version_text() and exit (argparse's own version action rewraps lines)."""

    def __init__(self, option_strings: Sequence[str], dest: str, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        print(version_text())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (kept separate so tests and docs can inspect it)."""
    parser = argparse.ArgumentParser(
        prog="pgproxy", description="PostgreSQL pooling proxy (PgBouncer-compatible)."
    )
    parser.add_argument(
        "-c", "--config", metavar="FILE", help="TOML configuration file, or a pgbouncer.ini"
    )
    parser.add_argument("file", nargs="?", metavar="FILE", help="the same, as PgBouncer takes it")
    parser.add_argument(
        "--check", action="store_true", help="validate the configuration and exit (0 = valid)"
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no logging to stderr")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    parser.add_argument(
        "-V", "--version", action=_VersionAction, help="show the version and build, and exit"
    )
    parser.add_argument(
        "--from-pgbouncer",
        metavar="INI",
        help="convert a PgBouncer configuration to pgproxy TOML and exit "
        "(warnings on stderr for what cannot be carried over)",
    )
    parser.add_argument(
        "-o", "--output", metavar="FILE", help="with --from-pgbouncer: write here (mode 0600)"
    )
    return parser


def _raise_open_files_limit() -> None:
    """Every client and server is a file descriptor: use the hard limit, not the (often
    1024) soft one, as PgBouncer users otherwise have to with ulimit -n."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _tune_gc() -> None:
    """Keep CPython's full garbage collections out of the way of running clients.

    A full collection walks every tracked object, some ten per connected client: with
    6,000 idle clients logging in, one took 40-50 ms, during which no request moved
    (bench/scale.py). The objects built at start (modules, settings, the daemon) are
    frozen out of every collection, and a full collection comes after 100 middle ones
    instead of 10 (CPython also waits until a quarter of the old objects are new), so a
    login storm passes without one. Connections that close are freed by their reference
    counts; the rarer full collections only find cycles later.
    """
    gc.freeze()
    threshold, middle, _full = gc.get_threshold()
    gc.set_threshold(threshold, middle, FULL_COLLECTION_EVERY)


def _serve(settings: Settings, config_path: str | None, worker: WorkerContext | None) -> int:
    """Run one daemon (the only one, or a worker) until it stops; its exit status."""
    if worker is not None and worker.restarted and config_path is not None:
        # A replacement worker runs what a RELOAD would have given the others by now.
        try:
            settings = load_settings(config_path)
        except ConfigError as exc:
            logging.getLogger("pgproxy").error("worker %d: %s", worker.index, exc)
    daemon = Daemon(settings, config_path=config_path, worker=worker)
    _tune_gc()
    try:
        uvloop.run(daemon.serve())
    except OSError as exc:
        print(f"pgproxy: cannot listen: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


def convert_command(ini: str, output: str | None) -> int:
    """``--from-pgbouncer``: the TOML to a file, or to stdout with passwords left out."""
    import tomli_w

    from pgproxy.pgbouncer_ini import convert

    conversion = convert(ini)
    for warning in conversion.warnings:
        print(f"pgproxy: warning: {warning}", file=sys.stderr)
    data = conversion.data
    if output is None:
        data, hidden = _without_passwords(data)
        if hidden:
            print(
                f"pgproxy: warning: {hidden} password(s) left out of stdout; "
                "use -o FILE to write them",
                file=sys.stderr,
            )
        sys.stdout.write(tomli_w.dumps(data))
        return 0
    descriptor = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as out:
        out.write(tomli_w.dumps(data))
    print(f"pgproxy: wrote {output}", file=sys.stderr)
    return 0


def _without_passwords(data: dict[str, Any]) -> tuple[dict[str, Any], int]:
    hidden = 0
    copy = dict(data)
    for section in ("databases", "users"):
        if section in copy:
            entries = {}
            for name, entry in copy[section].items():
                if "password" in entry:
                    entry = {key: value for key, value in entry.items() if key != "password"}
                    hidden += 1
                entries[name] = entry
            copy[section] = entries
    return copy, hidden


def _write_pidfile(path: str) -> None:
    """PgBouncer's rule: refuse to start over a live process's pidfile."""
    with contextlib.suppress(FileNotFoundError, ValueError):
        with open(path, encoding="ascii") as existing:
            pid = int(existing.read().strip())
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            pass  # stale: its process is gone
        except PermissionError:
            raise ConfigError(f"pidfile {path} exists, another instance running?") from None
        else:
            if pid != os.getpid():
                raise ConfigError(f"pidfile {path} exists, another instance running?")
    with open(path, "w", encoding="ascii") as pidfile:
        pidfile.write(f"{os.getpid()}\n")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``pgproxy`` console script and ``python -m pgproxy``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.from_pgbouncer is not None:
        try:
            return convert_command(args.from_pgbouncer, args.output)
        except (ConfigError, OSError) as exc:
            print(f"pgproxy: {exc}", file=sys.stderr)
            return 1
    if args.config is not None and args.file is not None:
        parser.error("give the configuration file once (-c FILE or FILE)")
    config_path = args.config if args.config is not None else args.file
    logs.hold()  # until the configuration says where logs go
    try:
        settings = load_settings(config_path, log_overrides=True)
        secrets = client_secrets(settings)
        hba_rules(settings)
    except ConfigError as exc:
        logs.configure(args.verbose, quiet=args.quiet)
        print(f"pgproxy: {exc}", file=sys.stderr)
        return 1
    try:
        logs.configure(args.verbose, settings.log_format, settings.logfile, args.quiet)
    except OSError as exc:
        logs.configure(args.verbose, quiet=args.quiet)
        print(f"pgproxy: cannot open logfile {settings.logfile}: {exc.strerror}", file=sys.stderr)
        return 1
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
    if worker_count(settings) > 1 and settings.peer_id:
        print(
            "pgproxy: workers: a supervisor's workers are their own peer group; "
            "peer_id (and peers) cannot be set with workers > 1",
            file=sys.stderr,
        )
        return 1
    try:
        if settings.pidfile:
            _write_pidfile(settings.pidfile)
    except (ConfigError, OSError) as exc:
        print(f"pgproxy: {exc}", file=sys.stderr)
        return 1
    _raise_open_files_limit()
    try:
        if worker_count(settings) > 1:
            return supervise(settings, lambda worker: _serve(settings, config_path, worker))
        return _serve(settings, config_path, None)
    finally:
        if settings.pidfile:
            with contextlib.suppress(OSError):
                os.unlink(settings.pidfile)
    return 0
