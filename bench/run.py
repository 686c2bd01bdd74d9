"""Throughput benchmark: direct PostgreSQL vs PgBouncer vs pgproxy, driven by pgbench.

    .venv/bin/python bench/run.py [--quick] [--duration S] [--rounds N] [--scenarios a,b]
                                  [--profile] [--pgbouncer PATH] [--builds pure,compiled]

Starts a throwaway PostgreSQL (``pgbench -i -s 10`` as role ``bench``), PgBouncer (when
installed) and pgproxy, all in transaction mode with a pool of 20 server connections, then
runs every scenario against every target in rotated rounds and prints a Markdown table of the
median tps, ratios to PgBouncer and to direct PostgreSQL paired by round, the poolers' user
and kernel CPU time per transaction (from /proc/PID/stat) and latencies. pgproxy runs as
both builds when both are installed: pure Python (.venv) and compiled by mypyc
(.venv-compiled, see scripts/bootstrap.sh). PgBouncer is the one given, else the 1.25.2
that ../shared/tools/build-pgbouncer builds, else the installed one. The table and the raw
per-run data go to ``bench/results/<timestamp>.md/.json``. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import pwd
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from types import FrameType
from typing import IO, Any, Final

from pgproxy.embedded import EmbeddedPostgres, free_port, pid_running

BENCH_DIR: Final = Path(__file__).resolve().parent
REPO_DIR: Final = BENCH_DIR.parent
RESULTS_DIR: Final = BENCH_DIR / "results"

DB_NAME: Final = "bench"
DB_USER: Final = "bench"
DB_PASSWORD: Final = "bench-secret"
SCALE: Final = 10
POOL_SIZE: Final = 20
MAX_CLIENT_CONN: Final = 1000
PG_MAX_CONNECTIONS: Final = 400
PGBOUNCER_OS_USER: Final = "postgres"

DIRECT: Final = "direct"
PGBOUNCER: Final = "pgbouncer"
PGPROXY: Final = "pgproxy"  # the pure-Python build
PGPROXY_COMPILED: Final = "pgproxy-compiled"  # the hot modules compiled by mypyc
PGPROXY_NO_METRICS: Final = "pgproxy-nometrics"  # only with --metrics-cost
PGPROXY_WORKERS: Final = "pgproxy-workers"  # only with --workers N
# Only with --relay N[,M]: bench/relay.py with N processes, the floor for a Python proxy.
RELAYS: Final = tuple(f"relay-{n}" for n in range(1, 9))
TARGETS: Final = (
    DIRECT,
    PGBOUNCER,
    PGPROXY,
    PGPROXY_COMPILED,
    PGPROXY_NO_METRICS,
    PGPROXY_WORKERS,
    *RELAYS,
)
TARGET_LABELS: Final = {
    DIRECT: "direct",
    PGBOUNCER: "PgBouncer",
    PGPROXY: "pgproxy (pure)",
    PGPROXY_COMPILED: "pgproxy (compiled)",
    PGPROXY_NO_METRICS: "pgproxy (metrics off)",
    PGPROXY_WORKERS: "pgproxy (workers)",
    **{relay: f"zero-logic relay, {relay[6:]} process(es)" for relay in RELAYS},
}

CLK_TCK: Final = os.sysconf("SC_CLK_TCK")
START_TIMEOUT: Final = 20.0  # seconds for a pooler to accept connections
STOP_TIMEOUT: Final = 10.0  # seconds for a child to exit after SIGTERM
RUN_GRACE: Final = 60.0  # seconds a pgbench run may exceed its -T before it counts as hung
LOG_TAIL_LINES: Final = 40


def pgbouncer_too_old(version: tuple[int, int], scenario: Scenario) -> bool:
    """Whether a PgBouncer of ``version`` cannot run ``scenario``."""
    return version < scenario.min_pgbouncer


@dataclass(frozen=True)
class Scenario:
    """One pgbench workload."""

    name: str
    args: tuple[str, ...]
    description: str
    # The oldest PgBouncer that can run it (protocol-level prepared statements in
    # transaction mode came in 1.21); an older one is left out of the scenario, said so.
    min_pgbouncer: tuple[int, int] = (0, 0)

    @property
    def relay_comparable(self) -> bool:
        """Whether bench/relay.py (a backend per client at once) loads PostgreSQL as a
        pooler does: no more clients than the pool has servers."""
        args = list(self.args)
        clients = int(args[args.index("-c") + 1]) if "-c" in args else 1
        return clients <= POOL_SIZE


SCENARIOS: Final = (
    Scenario("select16", ("-S", "-c", "16", "-j", "2"), "select-only, 16 clients"),
    Scenario("select100", ("-S", "-c", "100", "-j", "2"), "select-only, 100 clients"),
    Scenario("tpcb16", ("-c", "16", "-j", "2"), "TPC-B-like read/write, 16 clients"),
    Scenario(
        "extended16",
        ("-S", "-M", "extended", "-c", "16", "-j", "2"),
        "select-only, extended query protocol, 16 clients",
    ),
    Scenario(
        "prepared16",
        ("-S", "-M", "prepared", "-c", "16", "-j", "2"),
        "select-only, named prepared statements (-M prepared), 16 clients",
        min_pgbouncer=(1, 21),
    ),
    Scenario(
        "connect8",
        ("-S", "-C", "-c", "8", "-j", "2"),
        "select-only, a new connection per transaction, 8 clients",
    ),
    Scenario("single", ("-S", "-c", "1", "-j", "1"), "select-only, 1 client (latency)"),
)
SCENARIO_BY_NAME: Final = {s.name: s for s in SCENARIOS}
PROFILE_SCENARIO: Final = "select16"

RE_TPS: Final = re.compile(r"^tps = ([0-9.]+) \(([^)]*)\)", re.MULTILINE)
RE_LATENCY: Final = re.compile(r"^latency average = ([0-9.]+) ms", re.MULTILINE)
RE_TXNS: Final = re.compile(r"^number of transactions actually processed: (\d+)", re.MULTILINE)
RE_FAILED: Final = re.compile(r"^number of failed transactions: (\d+)", re.MULTILINE)
RE_PGBENCH_ERROR: Final = re.compile(r"^pgbench: (error|fatal):", re.MULTILINE)


class BenchError(RuntimeError):
    """A set-up step failed; the message says which and why."""


# --------------------------------------------------------------------------- utilities


def log(message: str) -> None:
    """Progress output (stderr, so stdout holds only the report)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def tail(path: Path | None, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of a text file ('' if unreadable)."""
    if path is None:
        return ""
    try:
        with path.open(encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def text_tail(text: str, lines: int = 15) -> str:
    """The last ``lines`` lines of ``text``."""
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


def _stat_fields(pid: int | str) -> list[str] | None:
    try:
        data = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    # Fields after the parenthesised command name start at field 3 (state): the parent
    # pid is field 4 (index 1), utime field 14 and stime field 15 (indexes 11 and 12).
    return data.rpartition(")")[2].split()


def child_pids(pid: int) -> list[int]:
    """The live children of ``pid`` (pgproxy's workers, the relay's forks), from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and entry != str(pid):
            fields = _stat_fields(entry)
            if fields is not None and fields[1] == str(pid):
                found.append(int(entry))
    return found


def cpu_times(pid: int) -> tuple[float, float] | None:
    """(utime, stime) in seconds of ``pid`` and its live children (pgproxy's workers),
    all their threads, from /proc/PID/stat."""
    fields = _stat_fields(pid)
    if fields is None:
        return None
    user, system = int(fields[11]), int(fields[12])
    for child in child_pids(pid):
        child_fields = _stat_fields(child)
        if child_fields is not None:
            user += int(child_fields[11])
            system += int(child_fields[12])
    return user / CLK_TCK, system / CLK_TCK


def machine_cpu() -> tuple[float, float]:
    """(busy, steal) seconds of the whole machine since boot, summed over its CPUs, from
    /proc/stat: busy is user, nice, system, irq and softirq time (guest time is inside
    user); steal is time the hypervisor gave to others while this VM wanted to run."""
    with open("/proc/stat", encoding="ascii") as stat:
        fields = [int(value) for value in stat.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq) / CLK_TCK, steal / CLK_TCK


def port_open(port: int) -> bool:
    """Tell whether something accepts TCP connections on 127.0.0.1:``port``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


def command_output(argv: Sequence[str], timeout: float = 30.0) -> str:
    """First line of a command's output, or a short note why there is none."""
    try:
        result = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc.__class__.__name__})"
    out = (result.stdout or result.stderr).strip().splitlines()
    return out[0] if out else "unknown"


def base_env(bindir: str) -> dict[str, str]:
    """The environment for client binaries: no libpq variables, PostgreSQL's bin first."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PATH"] = os.pathsep.join([bindir, env.get("PATH", os.defpath)])
    env["PGCONNECT_TIMEOUT"] = "15"
    return env


# Where ../shared/tools/build-pgbouncer installs the newest release (Debian 12 has 1.18).
BUILT_PGBOUNCER: Final = "/tmp/pgbouncer-pgbouncer_1_25_2/bin/pgbouncer"


def find_pgbouncer(given: str | None = None) -> str | None:
    """Path of the PgBouncer binary: ``given``, else the built 1.25.2, else the installed
    one; None if there is none."""
    if given:
        return given
    for path in (BUILT_PGBOUNCER, "/usr/sbin/pgbouncer"):
        if os.access(path, os.X_OK):
            return path
    return shutil.which("pgbouncer")


def stop_popen(proc: subprocess.Popen[Any], name: str, signum: int = signal.SIGTERM) -> None:
    """Signal ``proc`` by pid and wait (bounded); SIGKILL if it does not exit."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signum)
    try:
        proc.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        log(f"{name} (pid {proc.pid}) ignored signal {signum}; sending SIGKILL")
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(STOP_TIMEOUT)


# --------------------------------------------------------------------------- poolers


class Pooler:
    """A pooler child process: its launcher Popen, the pid doing the work, its log."""

    def __init__(self, name: str, port: int, log_path: Path) -> None:
        self.name = name
        self.port = port
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid: int | None = None  # the process whose CPU time is measured
        self.version = ""
        self._log_file: IO[bytes] | None = None

    def _spawn(self, argv: list[str], cwd: Path) -> None:
        self._log_file = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            start_new_session=True,  # Ctrl-C reaches only us; we stop children ourselves
        )

    def command(self) -> list[str]:
        """The command line that starts it (PgProxy and Relay)."""
        raise NotImplementedError

    def start_under(self, wrapper: Sequence[str], timeout: float) -> None:
        """Start ``command()`` under ``wrapper`` (valgrind: bench/instructions.py), and wait
        up to ``timeout`` seconds for it to accept connections."""
        self._spawn([*wrapper, *self.command()], REPO_DIR)
        self._wait_ready(timeout=timeout)

    def _wait_ready(self, pid_source: Path | None = None, timeout: float = START_TIMEOUT) -> None:
        """Wait (bounded) until the port accepts connections and the worker pid is known."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(
                    f"{self.name} exited with status {self.proc.returncode} during start-up; "
                    f"log tail ({self.log_path}):\n{tail(self.log_path)}"
                )
            if self.pid is None:
                if pid_source is None:
                    self.pid = self.proc.pid
                else:
                    with contextlib.suppress(OSError, ValueError):
                        self.pid = int(pid_source.read_text().strip())
            if self.pid is not None and port_open(self.port):
                return
            time.sleep(0.1)
        raise BenchError(
            f"{self.name} did not accept connections on 127.0.0.1:{self.port} within "
            f"{timeout:.0f} s; log tail:\n{tail(self.log_path)}"
        )

    def alive(self) -> bool:
        """Tell whether the worker process is still running."""
        return self.pid is not None and pid_running(self.pid)

    def stop(self) -> None:
        """SIGTERM the worker (and the launcher), bounded waits, SIGKILL as a last resort."""
        if self.pid is not None and self.proc is not None and self.pid != self.proc.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            deadline = time.monotonic() + STOP_TIMEOUT
            while pid_running(self.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if pid_running(self.pid):
                log(f"{self.name} (pid {self.pid}) ignored SIGTERM; sending SIGKILL")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
        if self.proc is not None:
            stop_popen(self.proc, self.name)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


class PgBouncer(Pooler):
    """PgBouncer in the foreground as the ``postgres`` OS user (it refuses to run as root)."""

    def __init__(self, binary: str, workdir: Path, pg_port: int) -> None:
        self.binary = binary
        self.conf_dir = workdir / "pgbouncer"
        super().__init__("PgBouncer", free_port(), self.conf_dir / "stderr.log")
        self.pg_port = pg_port
        self.pidfile = self.conf_dir / "pgbouncer.pid"
        self.logfile = self.conf_dir / "pgbouncer.log"
        self.ini = self.conf_dir / "pgbouncer.ini"

    def start(self) -> None:
        """Write the configuration (owned by postgres) and start PgBouncer."""
        self.version = command_output([self.binary, "--version"])
        as_root = os.geteuid() == 0
        self.conf_dir.mkdir(mode=0o700)
        userlist = self.conf_dir / "userlist.txt"
        userlist.write_text(f'"{DB_USER}" ""\n')
        self.ini.write_text(
            f"""\
[databases]
{DB_NAME} = host=127.0.0.1 port={self.pg_port} dbname={DB_NAME} user={DB_USER} \
password={DB_PASSWORD}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {self.port}
unix_socket_dir =
auth_type = trust
auth_file = {userlist}
pool_mode = transaction
default_pool_size = {POOL_SIZE}
max_client_conn = {MAX_CLIENT_CONN}
logfile = {self.logfile}
pidfile = {self.pidfile}
log_connections = 0
log_disconnections = 0
"""
        )
        self.log_path.touch()
        argv = [self.binary, str(self.ini)]
        if as_root:
            try:
                owner = pwd.getpwnam(PGBOUNCER_OS_USER)
            except KeyError:
                raise BenchError(
                    f"running as root but there is no {PGBOUNCER_OS_USER!r} OS user to run "
                    "PgBouncer as (it refuses to run as root)"
                ) from None
            for path in (self.conf_dir, userlist, self.ini, self.log_path):
                os.chown(path, owner.pw_uid, owner.pw_gid)
            argv = ["runuser", "-u", PGBOUNCER_OS_USER, "--", *argv]
        self._spawn(argv, self.conf_dir)
        # runuser forks: the pidfile names the real PgBouncer process.
        self._wait_ready(self.pidfile)

    def stop(self) -> None:
        """Stop PgBouncer; keep its logfile if its stderr (the usual copy) stayed empty."""
        super().stop()
        extra = tail(self.logfile, 10_000)
        if extra and not tail(self.log_path):
            with self.log_path.open("a", encoding="utf-8") as f:
                f.write(extra)


class PgProxy(Pooler):
    """pgproxy as a child process of this script."""

    def __init__(
        self,
        python: str,
        workdir: Path,
        pg_port: int,
        *,
        metrics: bool = True,
        workers: int = 1,
        name: str = "",
    ) -> None:
        name = name or ("pgproxy" if metrics else "pgproxy-nometrics")
        if workers > 1:
            name = f"pgproxy-{workers}-workers"
        self.workers = workers
        super().__init__(name, free_port(), workdir / f"{name}.log")
        self.python = python
        self.config = workdir / f"{name}.toml"
        self.pg_port = pg_port
        # Metrics on (the default config, histograms observed) or off (metrics_port = 0).
        self.metrics_port = free_port() if metrics else 0

    def start(self) -> None:
        """Write the TOML configuration and start ``python -m pgproxy``."""
        self._spawn(self.command(), REPO_DIR)
        # Its version line and the build line (compiled or pure).
        self.version = subprocess.run(
            [self.python, "-P", "-m", "pgproxy", "--version"],
            capture_output=True, text=True, timeout=30, check=False,
        ).stdout.strip()  # fmt: skip
        self._wait_ready()

    def command(self) -> list[str]:
        """Write the TOML configuration; the command line of ``python -m pgproxy``."""
        self.config.write_text(
            f"""\
listen_addr = "127.0.0.1"
listen_port = {self.port}
pool_mode = "transaction"
default_pool_size = {POOL_SIZE}
max_client_conn = {MAX_CLIENT_CONN}
metrics_port = {self.metrics_port}
workers = {self.workers}
# As PgBouncer's log_connections = 0 and log_disconnections = 0 above: a log line per
# login is a measurable share of a -C run's CPU.
log_connections = false
log_disconnections = false

[databases.{DB_NAME}]
host = "127.0.0.1"
port = {self.pg_port}
user = "{DB_USER}"
password = "{DB_PASSWORD}"
"""
        )
        # -P: the working directory (the checkout) is not put on sys.path, so the venv's
        # installed build runs, not the source tree.
        return [self.python, "-P", "-m", "pgproxy", "-c", str(self.config)]


class Relay(Pooler):
    """bench/relay.py: forwards bytes, a PostgreSQL connection per client at a time."""

    def __init__(self, python: str, workdir: Path, pg_port: int, processes: int) -> None:
        super().__init__(f"relay-{processes}", free_port(), workdir / f"relay-{processes}.log")
        self.python = python
        self.pg_port = pg_port
        self.processes = processes

    def start(self) -> None:
        """Start the relay (its CPU time is that of the first process and its forks)."""
        self._spawn(self.command(), REPO_DIR)
        self._wait_ready()

    def command(self) -> list[str]:
        """The relay's command line."""
        return [
            self.python, str(BENCH_DIR / "relay.py"), "--port", str(self.port),
            "--server-port", str(self.pg_port), "--processes", str(self.processes),
        ]  # fmt: skip


# --------------------------------------------------------------------------- pgbench runs


@dataclass
class RunResult:
    """One pgbench run against one target."""

    scenario: str
    target: str
    round: int
    argv: list[str]
    exit_code: int | None = None
    tps: float | None = None
    tps_kind: str = ""
    latency_ms: float | None = None
    transactions: int | None = None
    failed_transactions: int = 0
    error_lines: int = 0
    hung: bool = False
    pooler_crashed: bool = False
    cpu_seconds: float | None = None  # pooler utime + stime during the run
    cpu_user_seconds: float | None = None
    cpu_sys_seconds: float | None = None
    cpu_us_per_txn: float | None = None
    # The whole machine during the run (pgbench, PostgreSQL, the pooler, anything else).
    machine_busy_seconds: float | None = None
    machine_steal_seconds: float | None = None
    wall_seconds: float = 0.0
    stdout: str = ""
    stderr: str = ""
    pooler_log_tail: str = ""
    note: str = ""

    @property
    def machine_us_per_txn(self) -> float | None:
        """The whole machine's busy CPU time per transaction, in µs."""
        if self.machine_busy_seconds is None or not self.transactions:
            return None
        return self.machine_busy_seconds * 1e6 / self.transactions

    @property
    def ok(self) -> bool:
        """No failed transactions, no errors, exit status 0, no hang."""
        return (
            self.exit_code == 0
            and self.failed_transactions == 0
            and self.error_lines == 0
            and not self.hung
            and not self.pooler_crashed
            and self.tps is not None
        )

    def problem(self) -> str:
        """A one-line description of what went wrong ('' if nothing)."""
        parts: list[str] = []
        if self.note:
            parts.append(self.note)
        if self.hung:
            parts.append("pgbench hung (killed after timeout)")
        if self.pooler_crashed:
            parts.append("pooler process died")
        if self.exit_code not in (0, None):
            parts.append(f"pgbench exit {self.exit_code}")
        if self.failed_transactions:
            parts.append(f"{self.failed_transactions} failed transactions")
        if self.error_lines:
            parts.append(f"{self.error_lines} pgbench error lines")
        if self.tps is None and not parts:
            parts.append("no tps in pgbench output")
        return "; ".join(parts)


class Runner:
    """Runs pgbench against the targets and keeps the results."""

    def __init__(self, pg: EmbeddedPostgres, poolers: dict[str, Pooler]) -> None:
        self.pg = pg
        self.poolers = poolers
        self.pgbench = os.path.join(pg.bindir, "pgbench")
        self.active: subprocess.Popen[str] | None = None
        self.results: list[RunResult] = []

    def port_of(self, target: str) -> int:
        """The TCP port pgbench connects to for ``target``."""
        return self.pg.port if target == DIRECT else self.poolers[target].port

    def env_for(self, target: str) -> dict[str, str]:
        """pgbench's environment: the password for the targets that pass authentication on."""
        env = base_env(self.pg.bindir)
        if target == DIRECT or target in RELAYS:
            env["PGPASSWORD"] = DB_PASSWORD
        return env

    def argv(self, target: str, args: Sequence[str], duration: int) -> list[str]:
        """The pgbench command line (``-n``: the poolers cannot VACUUM for us)."""
        return [
            self.pgbench, "-h", "127.0.0.1", "-p", str(self.port_of(target)), "-U", DB_USER,
            "-n", *args, "-T", str(duration), DB_NAME,
        ]  # fmt: skip

    def prepare(self, scenario: Scenario) -> None:
        """What ``pgbench`` would do itself without ``-n``: vacuum and empty the history."""
        if "-S" not in scenario.args:
            self.pg.sql(
                "VACUUM pgbench_branches; VACUUM pgbench_tellers; TRUNCATE pgbench_history;",
                dbname=DB_NAME,
            )

    def run(
        self,
        scenario: Scenario,
        target: str,
        round_no: int,
        duration: int,
        *,
        during: Callable[[int], Callable[[], None]] | None = None,
    ) -> RunResult:
        """Run pgbench once; measure the pooler's CPU time around it.

        ``during``, if given, is called with the pooler's pid right after pgbench starts and
        must return a callable that is invoked after pgbench finished (used for profiling).
        """
        argv = self.argv(target, scenario.args, duration)
        result = RunResult(scenario.name, target, round_no, argv)
        pooler = self.poolers.get(target)
        if pooler is not None and not pooler.alive():
            result.pooler_crashed = True
            result.note = "pooler not running before the run"
            result.pooler_log_tail = tail(pooler.log_path)
            self.results.append(result)
            return result
        self.prepare(scenario)
        cpu_before = cpu_times(pooler.pid) if pooler is not None and pooler.pid else None
        machine_before = machine_cpu()
        started = time.monotonic()
        finish_hook: Callable[[], None] | None = None
        self.active = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self.env_for(target),
            start_new_session=True,
        )
        try:
            if during is not None and pooler is not None and pooler.pid is not None:
                finish_hook = during(pooler.pid)
            try:
                out, err = self.active.communicate(timeout=duration + RUN_GRACE)
            except subprocess.TimeoutExpired:
                result.hung = True
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.active.pid, signal.SIGKILL)
                out, err = self.active.communicate(timeout=STOP_TIMEOUT)
            result.exit_code = self.active.returncode
        finally:
            if self.active.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.active.pid, signal.SIGKILL)
                self.active.wait(STOP_TIMEOUT)
            self.active = None
            if finish_hook is not None:
                finish_hook()
        result.wall_seconds = time.monotonic() - started
        machine_after = machine_cpu()
        result.machine_busy_seconds = machine_after[0] - machine_before[0]
        result.machine_steal_seconds = machine_after[1] - machine_before[1]
        if pooler is not None and pooler.pid is not None:
            cpu_after = cpu_times(pooler.pid)
            if cpu_before is not None and cpu_after is not None:
                result.cpu_user_seconds = cpu_after[0] - cpu_before[0]
                result.cpu_sys_seconds = cpu_after[1] - cpu_before[1]
                result.cpu_seconds = result.cpu_user_seconds + result.cpu_sys_seconds
            if not pooler.alive():
                result.pooler_crashed = True
        result.stdout, result.stderr = out, err
        self._parse(result)
        if not result.ok and pooler is not None:
            result.pooler_log_tail = tail(pooler.log_path)
        self.results.append(result)
        return result

    @staticmethod
    def _parse(result: RunResult) -> None:
        out = result.stdout
        if m := RE_TPS.search(out):
            result.tps = float(m.group(1))
            result.tps_kind = m.group(2)
        if m := RE_LATENCY.search(out):
            result.latency_ms = float(m.group(1))
        if m := RE_TXNS.search(out):
            result.transactions = int(m.group(1))
        if m := RE_FAILED.search(out):
            result.failed_transactions = int(m.group(1))
        result.error_lines = len(RE_PGBENCH_ERROR.findall(result.stderr))
        if result.cpu_seconds is not None and result.transactions:
            result.cpu_us_per_txn = result.cpu_seconds * 1e6 / result.transactions

    def stop_active(self) -> None:
        """Kill a pgbench that is still running (Ctrl-C, error)."""
        if self.active is not None:
            stop_popen(self.active, "pgbench", signal.SIGKILL)
            self.active = None


# --------------------------------------------------------------------------- profiling


class PySpy:
    """``py-spy record --format raw`` attached to pgproxy for one run."""

    def __init__(self, binary: str, output: Path, duration: int) -> None:
        self.binary = binary
        self.output = output
        self.duration = duration
        self.proc: subprocess.Popen[str] | None = None
        self.stderr = ""

    def attach(self, pid: int) -> Callable[[], None]:
        """Start recording ``pid``; return the function that waits for the recording."""
        self.output.unlink(missing_ok=True)
        argv = [
            self.binary, "record", "--pid", str(pid), "--duration", str(self.duration),
            "--rate", "200", "--native", "--format", "raw", "--output", str(self.output),
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        return self.finish

    def finish(self) -> None:
        """Wait (bounded) for py-spy to write its output."""
        if self.proc is None:
            return
        try:
            out, _ = self.proc.communicate(timeout=self.duration + 30)
        except subprocess.TimeoutExpired:
            stop_popen(self.proc, "py-spy", signal.SIGINT)
            out = ""
        self.stderr = out
        self.proc = None

    def stop(self) -> None:
        """Stop py-spy if it is still running."""
        if self.proc is not None:
            stop_popen(self.proc, "py-spy", signal.SIGINT)
            self.proc = None


RE_FRAME: Final = re.compile(r"^(.*) \(([^()]*?)(?::\d+)?\)$")
#: Leaf frames that mean "waiting for I/O", not work: such samples are counted apart.
IDLE_LEAVES: Final = frozenset(
    {"epoll_wait", "epoll_pwait", "epoll_pwait2", "poll", "ppoll", "select", "pselect6"}
)


def function_name(frame: str) -> str:
    """``func (path/file.py:123)`` -> ``func (path/file.py)``: one entry per function."""
    m = RE_FRAME.match(frame)
    if m is None:
        return frame
    return f"{m.group(1)} ({m.group(2)})"


def is_python_frame(name: str) -> bool:
    """Tell a Python frame (``f (x.py)``, ``f (<frozen runpy>)``) from a native one."""
    m = RE_FRAME.match(name)
    return m is not None and (m.group(2).endswith(".py") or m.group(2).startswith("<"))


@dataclass
class Profile:
    """Samples from py-spy's collapsed (raw) output, aggregated per function."""

    total: int = 0  # every sample
    idle: int = 0  # samples whose leaf is an I/O wait (epoll_wait & co.)
    own: Counter[str] = field(default_factory=Counter)  # leaf frame
    inclusive: Counter[str] = field(default_factory=Counter)  # anywhere in the stack
    python_own: Counter[str] = field(default_factory=Counter)  # innermost Python frame

    @property
    def busy(self) -> int:
        """Samples doing work."""
        return self.total - self.idle


def parse_collapsed(collapsed: str) -> Profile:
    """Parse ``frame;frame;...;leaf COUNT`` lines; I/O-wait samples are only counted."""
    prof = Profile()
    for line in collapsed.splitlines():
        stack, _, count_text = line.rstrip().rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [function_name(f) for f in stack.split(";") if f]
        if not frames:
            continue
        prof.total += count
        leaf = frames[-1]
        if leaf.partition(" (")[0] in IDLE_LEAVES:
            prof.idle += count
            continue
        prof.own[leaf] += count
        for name in set(frames):
            prof.inclusive[name] += count
        python_frames = [f for f in frames if is_python_frame(f)]
        if python_frames:
            prof.python_own[python_frames[-1]] += count
    return prof


def format_profile(collapsed: str, limit: int = 15) -> str:
    """Markdown: the top functions by own (leaf) samples, then by Python-level own time."""
    prof = parse_collapsed(collapsed)
    if prof.busy == 0:
        return f"(no busy samples; {prof.total} samples in all)"

    def pct(n: int) -> str:
        return f"{100 * n / prof.busy:.1f}"

    def md(name: str) -> str:
        return "`" + name.replace("|", "\\|").replace("`", "'") + "`"

    lines = [
        f"{prof.total} samples; {prof.idle} ({100 * prof.idle / prof.total:.0f}%) idle in "
        f"epoll_wait & co. are left out; percentages are of the {prof.busy} busy samples.",
        "",
        f"Top {limit} functions by own time (leaf frame, native frames included):",
        "",
        "| # | own % | total % | function (file) |",
        "|--:|------:|--------:|:----------------|",
    ]
    for i, (name, n) in enumerate(prof.own.most_common(limit), 1):
        lines.append(f"| {i} | {pct(n)} | {pct(prof.inclusive[name])} | {md(name)} |")
    lines += [
        "",
        f"Top {limit} Python functions by own time including the native code they call "
        "(innermost Python frame of each sample):",
        "",
        "| # | own+native % | total % | function (file) |",
        "|--:|-------------:|--------:|:----------------|",
    ]
    for i, (name, n) in enumerate(prof.python_own.most_common(limit), 1):
        lines.append(f"| {i} | {pct(n)} | {pct(prof.inclusive[name])} | {md(name)} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- report


def fmt(value: float | None, spec: str) -> str:
    """Format a number or show '-'."""
    return "-" if value is None else format(value, spec)


def median_or_none(values: Sequence[float | None]) -> float | None:
    """Median of the present values."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


@dataclass
class Summary:
    """Medians for one (scenario, target)."""

    tps: float | None = None
    latency_ms: float | None = None
    cpu_us_per_txn: float | None = None
    runs: int = 0
    bad_runs: int = 0
    tps_per_round: list[float | None] = field(default_factory=list)
    cpu_sys_share: float | None = None  # stime / (utime + stime) over all rounds
    # Over all rounds: user and kernel CPU microseconds per transaction.
    cpu_user_us_per_txn: float | None = None
    cpu_sys_us_per_txn: float | None = None
    # Over all rounds: the whole machine's busy CPU µs per transaction, and the share of
    # the run's CPU time stolen by the hypervisor.
    machine_us_per_txn: float | None = None
    steal_share: float | None = None


def summarise(results: Sequence[RunResult]) -> dict[str, dict[str, Summary]]:
    """Per scenario, per target: medians over rounds."""
    out: dict[str, dict[str, Summary]] = {}
    for r in results:
        out.setdefault(r.scenario, {}).setdefault(r.target, Summary())
    for scenario, by_target in out.items():
        for target, summary in by_target.items():
            runs = sorted(
                (r for r in results if r.scenario == scenario and r.target == target),
                key=lambda r: r.round,
            )
            summary.runs = len(runs)
            summary.bad_runs = sum(not r.ok for r in runs)
            summary.tps_per_round = [r.tps for r in runs]
            summary.tps = median_or_none([r.tps for r in runs])
            summary.latency_ms = median_or_none([r.latency_ms for r in runs])
            summary.cpu_us_per_txn = median_or_none([r.cpu_us_per_txn for r in runs])
            user = sum(r.cpu_user_seconds or 0.0 for r in runs)
            system = sum(r.cpu_sys_seconds or 0.0 for r in runs)
            if user + system > 0:
                summary.cpu_sys_share = system / (user + system)
                transactions = sum(r.transactions or 0 for r in runs if r.cpu_seconds)
                if transactions:
                    summary.cpu_user_us_per_txn = user * 1e6 / transactions
                    summary.cpu_sys_us_per_txn = system * 1e6 / transactions
            measured = [r for r in runs if r.machine_us_per_txn is not None]
            busy = sum(r.machine_busy_seconds or 0.0 for r in measured)
            transactions = sum(r.transactions or 0 for r in measured)
            if transactions:
                summary.machine_us_per_txn = busy * 1e6 / transactions
                steal = sum(r.machine_steal_seconds or 0.0 for r in measured)
                summary.steal_share = steal / (busy + steal) if busy + steal > 0 else None
    return out


def paired_ratio(
    results: Sequence[RunResult], scenario: str, target: str, reference: str
) -> tuple[float | None, list[float]]:
    """The median over rounds of ``target``'s tps / ``reference``'s in the same round, and
    the per-round ratios. Runs of one round follow each other within a minute, so their
    ratio is less moved by the machine's slow drift than a ratio of medians."""
    by_round: dict[int, dict[str, float]] = {}
    for r in results:
        if r.scenario == scenario and r.tps is not None and r.ok:
            by_round.setdefault(r.round, {})[r.target] = r.tps
    ratios = [
        tps[target] / tps[reference]
        for _, tps in sorted(by_round.items())
        if target in tps and tps.get(reference)
    ]
    return (statistics.median(ratios) if ratios else None), ratios


def paired_cpu_ratio(
    results: Sequence[RunResult], scenario: str, target: str, reference: str
) -> float | None:
    """The median over rounds of ``reference``'s machine CPU per transaction / ``target``'s
    in the same round: the tps ratio the two would have if both kept the machine equally
    busy. The tps ratio moves with the CPU each transaction costs (pgbench and PostgreSQL
    included) and with how idle the machine stays; this one only with the first. (The
    host's noise moves both: a slow round also spends more CPU per transaction.)"""
    by_round: dict[int, dict[str, float]] = {}
    for r in results:
        cost = r.machine_us_per_txn
        if r.scenario == scenario and cost and r.ok:
            by_round.setdefault(r.round, {})[r.target] = cost
    ratios = [
        cost[reference] / cost[target]
        for _, cost in sorted(by_round.items())
        if target in cost and reference in cost
    ]
    return statistics.median(ratios) if ratios else None


def added_latency_us(results: Sequence[RunResult], scenario: str, target: str) -> float | None:
    """The median over rounds of ``target``'s average latency minus direct PostgreSQL's in
    the same round, in µs: what the pooler adds to a round trip (telling with one client)."""
    by_round: dict[int, dict[str, float]] = {}
    for r in results:
        if r.scenario == scenario and r.latency_ms is not None and r.ok:
            by_round.setdefault(r.round, {})[r.target] = r.latency_ms
    added = [
        (latency[target] - latency[DIRECT]) * 1000
        for _, latency in sorted(by_round.items())
        if target in latency and DIRECT in latency
    ]
    return statistics.median(added) if added else None


def ratio(a: float | None, b: float | None) -> str:
    """a/b with two decimals, '-' if either is missing."""
    if a is None or b is None or b == 0:
        return "-"
    return f"{a / b:.2f}"


def build_report(
    header: list[str],
    scenarios: Sequence[Scenario],
    results: Sequence[RunResult],
    pgbouncer_status: str,
    pgproxy_status: str,
    profile_text: str | None,
) -> str:
    """The Markdown report: header, table, per-round tps, failures with evidence."""
    summary = summarise(results)

    def cell(scenario: str, target: str, status: str) -> Summary | str:
        if status:
            return status
        s = summary.get(scenario, {}).get(target)
        return s if s is not None else "not run"

    def tps_cell(value: Summary | str) -> str:
        if isinstance(value, str):
            return value
        mark = " ⚠" if value.bad_runs else ""
        return fmt(value.tps, ",.0f") + mark

    lines = [*header, ""]
    lines.append(
        "| scenario | target | tps | vs PgBouncer | vs direct | user µs/txn | kernel µs/txn "
        "| latency ms | added latency µs |"
    )
    lines.append("|:--|:--|--:|--:|--:|--:|--:|--:|--:|")
    statuses = {PGBOUNCER: pgbouncer_status, PGPROXY: pgproxy_status}
    for sc in scenarios:
        for target in TARGETS:
            value = cell(sc.name, target, statuses.get(target, ""))
            if isinstance(value, str):
                if target in statuses and value != "not run":
                    lines.append(f"| {sc.name} | {TARGET_LABELS[target]} | {value} |||||||")
                continue
            to_bouncer = paired_ratio(results, sc.name, target, PGBOUNCER)[0]
            to_direct = paired_ratio(results, sc.name, target, DIRECT)[0]
            added = added_latency_us(results, sc.name, target)
            lines.append(
                f"| {sc.name} | {TARGET_LABELS[target]} | {tps_cell(value)} "
                f"| {'' if target == PGBOUNCER else fmt(to_bouncer, '.2f')} "
                f"| {'' if target == DIRECT else fmt(to_direct, '.2f')} "
                f"| {fmt(value.cpu_user_us_per_txn, '.1f')} "
                f"| {fmt(value.cpu_sys_us_per_txn, '.1f')} "
                f"| {fmt(value.latency_ms, '.3f')} "
                f"| {'' if target == DIRECT else fmt(added, '.0f')} |"
            )
    for sc in scenarios:
        several = summary.get(sc.name, {}).get(PGPROXY_WORKERS)
        bouncer = summary.get(sc.name, {}).get(PGBOUNCER)
        if several is not None:
            lines.append(
                f"\nWorkers, {sc.name}: {fmt(several.tps, ',.0f')} tps = "
                f"{ratio(several.tps, bouncer.tps if bouncer else None)} PgBouncer, CPU µs/txn "
                f"{fmt(several.cpu_us_per_txn, '.1f')} (all processes)"
            )
    for sc in scenarios:
        bouncer = summary.get(sc.name, {}).get(PGBOUNCER)
        for relay in RELAYS:
            floor = summary.get(sc.name, {}).get(relay)
            if floor is not None:
                lines.append(
                    f"\nZero-logic relay (bench/relay.py), {relay[6:]} process(es), {sc.name}: "
                    f"{fmt(floor.tps, ',.0f')} tps = "
                    f"{ratio(floor.tps, bouncer.tps if bouncer else None)} PgBouncer, CPU µs/txn "
                    f"{fmt(floor.cpu_us_per_txn, '.1f')} (all processes)"
                )
    for sc in scenarios:
        off = summary.get(sc.name, {}).get(PGPROXY_NO_METRICS)
        on = summary.get(sc.name, {}).get(PGPROXY)
        if off is not None and on is not None:
            lines.append(
                f"\nMetrics cost, {sc.name}: pgproxy with metrics / without = "
                f"{ratio(on.tps, off.tps)} tps, CPU µs/txn {fmt(on.cpu_us_per_txn, '.1f')} vs "
                f"{fmt(off.cpu_us_per_txn, '.1f')}"
            )
    paired = []
    for sc in scenarios:
        for target in TARGETS:
            if target in (DIRECT, PGBOUNCER):
                continue
            middle, ratios = paired_ratio(results, sc.name, target, PGBOUNCER)
            if middle is not None:
                each = ", ".join(f"{value:.2f}" for value in ratios)
                by_cpu = paired_cpu_ratio(results, sc.name, target, PGBOUNCER)
                paired.append(
                    f"| {sc.name} | {TARGET_LABELS[target]} | {middle:.2f} "
                    f"| {fmt(by_cpu, '.2f')} | {each} |"
                )
    if paired:
        lines += [
            "",
            "Paired ratios to PgBouncer (tps of the target / PgBouncer's in the same round; "
            "median over rounds). By CPU: PgBouncer's machine CPU per transaction / the "
            "target's in the same round (median over rounds), the tps ratio if both left "
            "the machine equally idle:",
            "",
            "| scenario | target | median ratio | by CPU | per round |",
            "|:--|:--|--:|--:|:--|",
            *paired,
        ]
    lines += [
        "",
        "tps and latency: medians over rounds; vs PgBouncer and vs direct: the median over "
        "rounds of the target's tps / theirs in the same round; user and kernel µs/txn: the "
        "pooler process's CPU time over all rounds / the transactions (none for direct); "
        "added latency: the median over rounds of the target's average latency minus direct "
        "PostgreSQL's in the same round. ⚠ = at least one run had failed transactions, "
        "pgbench errors, a non-zero exit, a hang or a pooler crash (details below).",
        "",
        "tps per round (in round order); the whole machine's busy CPU µs per transaction "
        "over all rounds (pgbench, PostgreSQL and the pooler; with the hypervisor's steal "
        "share when there was any); for the poolers also their user and kernel CPU time per "
        "transaction over all rounds, and the kernel (stime) share:",
        "",
    ]
    for sc in scenarios:
        for target in TARGETS:
            s = summary.get(sc.name, {}).get(target)
            if s is None:
                continue
            rounds = ", ".join(fmt(v, ".0f") for v in s.tps_per_round)
            share = ""
            if s.cpu_sys_share is not None:
                split = ""
                if s.cpu_user_us_per_txn is not None and s.cpu_sys_us_per_txn is not None:
                    split = (
                        f"user {s.cpu_user_us_per_txn:.1f} + kernel "
                        f"{s.cpu_sys_us_per_txn:.1f} µs/txn, "
                    )
                share = f" ({split}sys {100 * s.cpu_sys_share:.0f}%)"
            machine = ""
            if s.machine_us_per_txn is not None:
                machine = f"; machine {s.machine_us_per_txn:.1f} µs/txn"
                if s.steal_share:
                    machine += f", steal {100 * s.steal_share:.1f}%"
            lines.append(f"- {sc.name} / {TARGET_LABELS[target]}: {rounds}{machine}{share}")
    bad = [r for r in results if not r.ok]
    lines += ["", f"## Problems ({len(bad)} of {len(results)} runs)", ""]
    if not bad:
        lines.append("None: every run exited 0 with no failed transactions or errors.")
    for r in bad:
        lines += [
            f"### {r.scenario} / {TARGET_LABELS.get(r.target, r.target)} / round {r.round}: "
            f"{r.problem()}",
            "",
            f"`{shlex.join(r.argv)}`",
            "",
            "pgbench stdout (tail):",
            "```",
            text_tail(r.stdout) or "(empty)",
            "```",
            "pgbench stderr (tail):",
            "```",
            text_tail(r.stderr, 25) or "(empty)",
            "```",
        ]
        if r.pooler_log_tail:
            lines += ["pooler log (tail):", "```", r.pooler_log_tail.rstrip(), "```"]
        lines.append("")
    if profile_text is not None:
        lines += ["", "## py-spy profile of pgproxy", "", profile_text]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command line."""
    parser = argparse.ArgumentParser(
        description="pgbench: direct PostgreSQL vs PgBouncer vs pgproxy (see bench/README.md)"
    )
    parser.add_argument("--quick", action="store_true", help="3 s runs, 1 round")
    parser.add_argument("--duration", type=int, help="seconds per pgbench run (default 10)")
    parser.add_argument("--rounds", type=int, help="rounds per scenario and target (default 3)")
    parser.add_argument(
        "--scenarios",
        default=",".join(s.name for s in SCENARIOS),
        help="comma-separated subset of: " + ", ".join(s.name for s in SCENARIOS),
    )
    parser.add_argument(
        "--metrics-cost",
        action="store_true",
        help="also run a pgproxy with metrics off (metrics_port = 0) and report the ratio",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        metavar="N",
        help="also run a pgproxy with workers = N (N > 1) and report it against PgBouncer",
    )
    parser.add_argument(
        "--relay",
        default="",
        metavar="N[,M]",
        help="also run bench/relay.py (a zero-logic uvloop byte relay) with N (and M ...) "
        "processes, in the scenarios with at most as many clients as the pool has servers",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="after the rounds, one extra run (--profile-scenario) against the pure pgproxy "
        "under py-spy (it cannot see compiled code); print the top 15 functions by own time",
    )
    parser.add_argument(
        "--profile-scenario",
        default=PROFILE_SCENARIO,
        choices=[s.name for s in SCENARIOS],
        help=f"the scenario --profile runs (default {PROFILE_SCENARIO})",
    )
    parser.add_argument(
        "--pgbouncer",
        metavar="PATH",
        help=f"the PgBouncer binary (default: {BUILT_PGBOUNCER} if built, else the installed one)",
    )
    parser.add_argument(
        "--builds",
        default="",
        metavar="pure,compiled",
        help="the pgproxy builds to run: pure (.venv) and/or compiled (.venv-compiled); "
        "default both, or pure alone when there is no .venv-compiled",
    )
    args = parser.parse_args(argv)
    builds = [b.strip() for b in args.builds.split(",") if b.strip()]
    if not builds:
        builds = ["pure", "compiled"] if COMPILED_PYTHON.exists() else ["pure"]
    if set(builds) - {"pure", "compiled"}:
        parser.error(f"--builds takes pure and/or compiled, not {args.builds!r}")
    if "compiled" in builds and not COMPILED_PYTHON.exists():
        parser.error(f"no compiled build: {COMPILED_PYTHON} is missing (scripts/bootstrap.sh)")
    if args.profile and "pure" not in builds:
        parser.error("--profile profiles the pure build: add it to --builds")
    args.build_list = builds
    if args.duration is None:
        args.duration = 3 if args.quick else 10
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.duration < 1 or args.rounds < 1:
        parser.error("--duration and --rounds must be at least 1")
    names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIO_BY_NAME]
    if unknown or not names:
        parser.error(
            f"unknown scenario(s) {', '.join(unknown) or '(none given)'}; choose from "
            + ", ".join(SCENARIO_BY_NAME)
        )
    args.scenario_list = [SCENARIO_BY_NAME[n] for n in names]
    try:
        args.relay_processes = sorted({int(n) for n in args.relay.split(",") if n.strip()})
    except ValueError:
        parser.error(f"--relay takes process counts such as 1,2, not {args.relay!r}")
    if any(f"relay-{n}" not in RELAYS for n in args.relay_processes):
        parser.error(f"--relay: process counts from 1 to {len(RELAYS)}")
    return args


def proxy_python() -> str:
    """The interpreter that runs the pure pgproxy: the project's venv, else this one."""
    venv = REPO_DIR / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


# The venv with pgproxy compiled by mypyc (scripts/bootstrap.sh makes it).
COMPILED_PYTHON: Final = REPO_DIR / ".venv-compiled" / "bin" / "python"


def workers_python(builds: Sequence[str], pure_python: str) -> str:
    """The interpreter of the pgproxy with ``workers = N``: the compiled build when this run
    measures it (what ``pip install .`` gives), else the pure one."""
    return str(COMPILED_PYTHON) if "compiled" in builds else pure_python


def header_lines(
    started: datetime.datetime, pg: EmbeddedPostgres, pgbouncer_version: str, python: str
) -> list[str]:
    """Date, machine, versions and the exact command."""
    now = started.isoformat(timespec="seconds")
    cpu_model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    py_version = command_output([python, "-c", "import platform; print(platform.python_version())"])
    try:
        uvloop_version = metadata.version("uvloop")
    except metadata.PackageNotFoundError:
        uvloop_version = "?"
    pg_version = pg.sql("SHOW server_version;")
    pgbench_version = command_output([os.path.join(pg.bindir, "pgbench"), "--version"])
    nproc = len(os.sched_getaffinity(0))
    command = shlex.join([sys.executable, *sys.argv])
    return [
        f"# pgproxy benchmark, {now}",
        "",
        f"- machine: nproc={nproc}, {cpu_model}, Linux {platform.release()}",
        f"- Python {py_version} (uvloop {uvloop_version}); {pgbouncer_version}; "
        f"PostgreSQL {pg_version}; {pgbench_version}",
        f"- command: `{command}`",
        f"- settings: transaction pooling, pool size {POOL_SIZE}, max_client_conn "
        f"{MAX_CLIENT_CONN}, pgbench -i -s {SCALE}, pgbench -n over TCP 127.0.0.1, "
        "client auth trust at both poolers, SCRAM for direct",
    ]


class Interrupted(Exception):
    """SIGTERM/SIGHUP received."""


def on_signal(signum: int, frame: FrameType | None) -> None:
    """Turn SIGTERM/SIGHUP into an exception so the finally blocks clean up."""
    raise Interrupted(f"received signal {signal.Signals(signum).name}")


@contextlib.contextmanager
def workdir() -> Iterator[Path]:
    """A temporary directory the postgres OS user can traverse; removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="pgproxy-bench-", dir="/tmp"))
    try:
        path.chmod(0o755)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def save_log(source: Path, dest: Path) -> Path | None:
    """Copy a pooler log into bench/results (they are deleted with the temp dir)."""
    try:
        if source.stat().st_size == 0:
            return None
        shutil.copyfile(source, dest)
        return dest
    except OSError:
        return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; 0 if every run succeeded, 1 if some failed, 2 on set-up errors."""
    args = parse_args(argv)
    # Ctrl-C raises KeyboardInterrupt even if SIGINT was ignored when we were started (as in
    # background jobs of non-interactive shells); SIGTERM/SIGHUP raise Interrupted.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, on_signal)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now().astimezone()
    stamp = started.strftime("%Y%m%d-%H%M%S")
    python = proxy_python()
    pgbouncer_bin = find_pgbouncer(args.pgbouncer)
    scenarios: list[Scenario] = args.scenario_list
    poolers: dict[str, Pooler] = {}
    runner: Runner | None = None
    pg = EmbeddedPostgres(
        extra_conf={"max_connections": str(PG_MAX_CONNECTIONS), "shared_buffers": "256MB"}
    )
    exit_code = 0
    with workdir() as tmp:
        try:
            log(f"starting PostgreSQL (max_connections={PG_MAX_CONNECTIONS})")
            pg.start()
            pg.create_role(DB_USER, DB_PASSWORD)
            pg.create_database(DB_NAME, DB_USER)
            log(f"pgbench -i -s {SCALE} as {DB_USER}")
            init_argv = [
                os.path.join(pg.bindir, "pgbench"), "-i", "-s", str(SCALE), "-q",
                "-h", "127.0.0.1", "-p", str(pg.port), "-U", DB_USER, DB_NAME,
            ]  # fmt: skip
            init = subprocess.run(
                init_argv,
                env={**base_env(pg.bindir), "PGPASSWORD": DB_PASSWORD},
                capture_output=True,
                text=True,
                timeout=600,
                check=False,
            )
            if init.returncode != 0:
                raise BenchError(f"pgbench -i failed:\n{init.stdout}\n{init.stderr}")
            pg.sql("VACUUM ANALYZE;", dbname=DB_NAME)

            pgbouncer_status = ""
            pgbouncer_version = "PgBouncer not installed"
            bouncer_version = (0, 0)
            if pgbouncer_bin is None:
                pgbouncer_status = "not installed"
                log("PgBouncer not installed: its columns say so")
            else:
                bouncer = PgBouncer(pgbouncer_bin, tmp, pg.port)
                poolers[PGBOUNCER] = bouncer
                log(f"starting PgBouncer on port {bouncer.port}")
                bouncer.start()
                pgbouncer_version = bouncer.version
                found = re.search(r"(\d+)\.(\d+)", pgbouncer_version)
                bouncer_version = (int(found[1]), int(found[2])) if found else (0, 0)
            builds = {
                "pure": (PGPROXY, python),
                "compiled": (PGPROXY_COMPILED, str(COMPILED_PYTHON)),
            }
            for build in args.build_list:
                target, build_python = builds[build]
                proxy = PgProxy(build_python, tmp, pg.port, name=target)
                poolers[target] = proxy
                log(f"starting pgproxy ({build}) on port {proxy.port}")
                proxy.start()
                log(f"{target}: {' / '.join(proxy.version.splitlines())}")
            pgproxy_status = ""
            if args.workers > 1:
                several_python = workers_python(args.build_list, python)
                several = PgProxy(several_python, tmp, pg.port, workers=args.workers)
                poolers[PGPROXY_WORKERS] = several
                log(f"starting pgproxy with {args.workers} workers on port {several.port}")
                several.start()
                log(f"{PGPROXY_WORKERS}: {' / '.join(several.version.splitlines())}")
            for processes in args.relay_processes:
                relay = Relay(python, tmp, pg.port, processes)
                poolers[f"relay-{processes}"] = relay
                log(f"starting the zero-logic relay ({processes} processes) on {relay.port}")
                relay.start()
            if args.metrics_cost:
                bare = PgProxy(python, tmp, pg.port, metrics=False)
                poolers[PGPROXY_NO_METRICS] = bare
                log(f"starting pgproxy without metrics on port {bare.port}")
                bare.start()

            header = header_lines(started, pg, pgbouncer_version, python)
            for target in (PGPROXY, PGPROXY_COMPILED, PGPROXY_WORKERS):
                if target in poolers:
                    header.append(
                        f"- {TARGET_LABELS[target]}: "
                        + "; ".join(poolers[target].version.splitlines())
                    )
            header.insert(
                4,
                f"- runs: {args.rounds} round(s) x {len(scenarios)} scenario(s) x "
                f"-T {args.duration} s; target order rotated each round",
            )
            runner = Runner(pg, poolers)
            targets = [t for t in TARGETS if t == DIRECT or t in poolers]

            log("warm-up (2 s per target, not recorded)")
            warm = Scenario("warmup", ("-S", "-c", str(POOL_SIZE), "-j", "2"), "warm-up")
            for target in targets:
                r = runner.run(warm, target, 0, 2)
                runner.results.remove(r)
                if not r.ok:
                    log(f"warm-up against {target} had problems: {r.problem()}")
                    log(text_tail(r.stderr))

            total = args.rounds * len(scenarios) * len(targets)
            done = 0
            for round_no in range(1, args.rounds + 1):
                shift = (round_no - 1) % len(targets)
                order = targets[shift:] + targets[:shift]
                for sc in scenarios:
                    for target in order:
                        done += 1
                        if target == PGBOUNCER and pgbouncer_too_old(bouncer_version, sc):
                            log(
                                f"[{done}/{total}] round {round_no} {sc.name:<10} {target:<9} "
                                f"skipped: {pgbouncer_version} is older than "
                                f"{'.'.join(map(str, sc.min_pgbouncer))}"
                            )
                            continue
                        if target in RELAYS and not sc.relay_comparable:
                            continue  # (a backend per client: not the load a pooler puts)
                        r = runner.run(sc, target, round_no, args.duration)
                        status = "ok" if r.ok else f"PROBLEM: {r.problem()}"
                        log(
                            f"[{done}/{total}] round {round_no} {sc.name:<10} {target:<9} "
                            f"tps={fmt(r.tps, '.0f')} lat={fmt(r.latency_ms, '.3f')}ms "
                            f"cpu/txn={fmt(r.cpu_us_per_txn, '.1f')}us {status}"
                        )
                        if not r.ok:
                            log("pgbench stderr tail:\n" + text_tail(r.stderr))

            profile_text: str | None = None
            if args.profile:
                profile_text = run_profile(runner, args.duration, args.profile_scenario)

            report = build_report(
                header, scenarios, runner.results, pgbouncer_status, pgproxy_status, profile_text
            )
            md_path = RESULTS_DIR / f"{stamp}.md"
            json_path = RESULTS_DIR / f"{stamp}.json"
            md_path.write_text(report, encoding="utf-8")
            raw = {
                "header": header,
                "args": {
                    "duration": args.duration,
                    "rounds": args.rounds,
                    "scenarios": [s.name for s in scenarios],
                    "profile": args.profile,
                },
                "scenarios": {s.name: list(s.args) for s in scenarios},
                "summary": {
                    sc: {t: asdict(s) for t, s in by_t.items()}
                    for sc, by_t in summarise(runner.results).items()
                },
                "runs": [{**asdict(r), "ok": r.ok} for r in runner.results],
            }
            json_path.write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")
            print(report)
            log(f"wrote {md_path} and {json_path}")
            if any(not r.ok for r in runner.results):
                exit_code = 1
        except BenchError as exc:
            print(f"bench/run.py: {exc}", file=sys.stderr)
            exit_code = 2
        except (KeyboardInterrupt, Interrupted) as exc:
            why = str(exc) or "Ctrl-C"
            print(f"bench/run.py: interrupted ({why}); cleaning up", file=sys.stderr)
            exit_code = 130
        finally:
            # Ignore further Ctrl-C/SIGTERM while cleaning up so nothing is left behind.
            for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(signum, signal.SIG_IGN)
            if runner is not None:
                runner.stop_active()
            for name, pooler in poolers.items():
                log(f"stopping {name}")
                pooler.stop()
                saved = save_log(pooler.log_path, RESULTS_DIR / f"{stamp}-{name}.log")
                if saved is not None:
                    log(f"{name} log saved to {saved}")
            log("stopping PostgreSQL")
            pg.stop()
    return exit_code


def run_profile(runner: Runner, duration: int, scenario: str = PROFILE_SCENARIO) -> str:
    """One extra run of ``scenario`` against the pure pgproxy under py-spy; the top-15
    table."""
    binary = REPO_DIR / ".venv" / "bin" / "py-spy"
    py_spy = str(binary) if binary.exists() else shutil.which("py-spy")
    if py_spy is None:
        return "py-spy not found (install the dev extra)"
    output = RESULTS_DIR / f"pyspy-{scenario}.txt"
    spy = PySpy(py_spy, output, max(1, duration - 1))
    log(f"profiling pgproxy with py-spy during an extra {scenario} run ({duration} s)")
    try:
        r = runner.run(SCENARIO_BY_NAME[scenario], PGPROXY, 0, duration, during=spy.attach)
    finally:
        spy.stop()
    runner.results.remove(r)  # profiled runs are slower: keep them out of the medians
    try:
        collapsed = output.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return f"py-spy wrote no output; its messages:\n```\n{spy.stderr.strip()}\n```"
    table = format_profile(collapsed)
    text = (
        f"Extra {scenario} run against the pure pgproxy under `py-spy record` "
        f"(not counted above): tps={fmt(r.tps, '.0f')}"
        f"{'' if r.ok else ' PROBLEM: ' + r.problem()}; raw stacks in {output}. "
        "Samples are wall-clock (a loopback write(2) runs the receiver's wake-up): compare "
        "with the user/kernel split of pgproxy's CPU time above, and see bench/hotpath.py "
        "for its own Python.\n\n"
        f"{table}"
    )
    print(text, file=sys.stderr)
    return text


if __name__ == "__main__":
    sys.exit(main())
