"""A throwaway PostgreSQL cluster for tests, the demo and the benchmark.

:class:`EmbeddedPostgres` runs ``initdb`` into a fresh temporary directory, configures the
cluster for speed (no fsync) and for the authentication methods the proxy must handle
(trust, cleartext password, md5, SCRAM-SHA-256), starts it on 127.0.0.1 plus a private
unix socket directory, and removes everything again on :meth:`EmbeddedPostgres.stop`.

``initdb`` refuses to run as root, so when the current process is root every server-side
command (``initdb``, ``pg_ctl``) runs as the ``postgres`` OS user through ``runuser`` and
the temporary directory is handed to that user. Otherwise everything runs as the current
user. Client commands (``psql``) always run as the current user and connect as the
``postgres`` database superuser over the unix socket, which ``pg_hba.conf`` trusts.

Set ``PGPROXY_PG_BINDIR`` to force a particular PostgreSQL ``bin`` directory.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Collection
from types import TracebackType
from typing import Final

__all__ = [
    "EmbeddedPostgres",
    "find_pg_bindir",
    "free_port",
    "pid_running",
    "quote_ident",
    "quote_literal",
]

#: The OS user that owns the cluster when the current process is root.
OWNER_OS_USER: Final = "postgres"

_BINDIR_ENV: Final = "PGPROXY_PG_BINDIR"

_HBA_CONF: Final = """\
# Written by pgproxy.embedded: one role per client authentication method.
local all all trust
local replication all trust
host all md5user 127.0.0.1/32 md5
host all plainuser 127.0.0.1/32 password
host all trustuser 127.0.0.1/32 trust
host all all 127.0.0.1/32 scram-sha-256
"""

_PASSWORD_ENCRYPTIONS: Final = frozenset({"scram-sha-256", "md5"})

# Variables that would redirect libpq / pg_ctl away from the cluster we manage.
_PG_ENV_VARS: Final = frozenset(
    {
        "PGHOST",
        "PGHOSTADDR",
        "PGPORT",
        "PGDATABASE",
        "PGUSER",
        "PGPASSWORD",
        "PGPASSFILE",
        "PGSERVICE",
        "PGSERVICEFILE",
        "PGOPTIONS",
        "PGDATA",
        "PGSSLMODE",
        "PGREQUIRESSL",
        "PGCONNECT_TIMEOUT",
        "PGTARGETSESSIONATTRS",
        "PGCLUSTER",
        "PGSYSCONFDIR",
        "PGTZ",
        "PGDATESTYLE",
        "PGCLIENTENCODING",
        "PSQLRC",
    }
)


def _version_key(bindir: str) -> tuple[int, ...]:
    """Sort key for ``/usr/lib/postgresql/<version>/bin``: the version as integers."""
    version = os.path.basename(os.path.dirname(bindir))
    return tuple(int(part) for part in re.findall(r"\d+", version)) or (0,)


def find_pg_bindir() -> str:
    """Return the directory holding the PostgreSQL server binaries (``initdb``, ``pg_ctl``).

    Looks at ``$PGPROXY_PG_BINDIR`` first, then the newest ``/usr/lib/postgresql/*/bin``
    that contains ``initdb``, then the directory of ``initdb`` found on ``PATH``.

    Raises:
        RuntimeError: no PostgreSQL installation was found.
    """
    forced = os.environ.get(_BINDIR_ENV)
    if forced:
        if os.access(os.path.join(forced, "initdb"), os.X_OK):
            return forced
        raise RuntimeError(f"${_BINDIR_ENV}={forced!r} does not contain an executable initdb")
    candidates = [
        os.path.dirname(path)
        for path in glob.glob("/usr/lib/postgresql/*/bin/initdb")
        if os.access(path, os.X_OK)
    ]
    if candidates:
        return max(candidates, key=_version_key)
    on_path = shutil.which("initdb")
    if on_path is not None:
        bindir = os.path.dirname(on_path)
        if not os.access(os.path.join(bindir, "pg_ctl"), os.X_OK):
            # A symlink farm (e.g. /usr/local/bin): use the real installation directory.
            bindir = os.path.dirname(os.path.realpath(on_path))
        return bindir
    raise RuntimeError(
        "PostgreSQL server binaries not found: no initdb under /usr/lib/postgresql/*/bin "
        "nor on PATH. Run scripts/bootstrap.sh to install PostgreSQL "
        f"(or set ${_BINDIR_ENV} to the directory containing initdb)."
    )


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def quote_ident(name: str) -> str:
    """Quote ``name`` as an SQL identifier."""
    if "\x00" in name:
        raise ValueError("identifiers cannot contain NUL")
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    """Quote ``value`` as an SQL string literal (safe whatever standard_conforming_strings)."""
    if "\x00" in value:
        raise ValueError("string literals cannot contain NUL")
    escaped = value.replace("'", "''")
    if "\\" in value:
        return "E'" + escaped.replace("\\", "\\\\") + "'"
    return "'" + escaped + "'"


def _conninfo_value(value: str | int) -> str:
    text = str(value)
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _conninfo(**params: str | int) -> str:
    """Build a libpq ``key=value`` connection string, quoting every value."""
    return " ".join(f"{key}={_conninfo_value(value)}" for key, value in params.items())


def _conf_value(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def pid_running(pid: int) -> bool:
    """Tell whether process ``pid`` exists and is not a zombie.

    Processes reparented to a PID 1 that does not reap them linger as zombies; those count
    as gone.
    """
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat_line = f.read()
    except OSError:
        return True  # no procfs: trust kill(0)
    # Field 3, after the parenthesised command name (which may itself contain ')').
    state = stat_line.rpartition(")")[2].split()
    return not (state and state[0] in ("Z", "X"))


def _children_of(pid: int) -> list[int]:
    """Pids whose parent is ``pid`` (via /proc; empty when procfs is unavailable)."""
    children: list[int] = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return children
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        if len(fields) > 1 and fields[1] == str(pid):
            children.append(int(entry))
    return children


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while pid_running(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _clean_env() -> dict[str, str]:
    """The current environment without variables that would steer libpq or pg_ctl."""
    return {k: v for k, v in os.environ.items() if k not in _PG_ENV_VARS}


def _run(
    argv: list[str],
    *,
    env: dict[str, str],
    cwd: str | None = None,
    input: str | None = None,
    timeout: float | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` capturing text output; on timeout kill its whole process group."""
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=cwd,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise subprocess.TimeoutExpired(argv, timeout or 0.0, stdout, stderr) from None
    return subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)


class EmbeddedPostgres:
    """A private PostgreSQL cluster in a temporary directory.

    Use as a context manager, or call :meth:`start` and :meth:`stop` yourself::

        with EmbeddedPostgres() as pg:
            pg.create_role("app", "secret")
            pg.create_database("appdb", owner="app")
            print(pg.dsn("app", "secret", "appdb"))

    ``socket_dir`` and ``data_dir`` are empty strings until :meth:`start` creates them.
    """

    host: str = "127.0.0.1"
    superuser: str = "postgres"

    def __init__(
        self,
        port: int | None = None,
        *,
        password_encryption: str = "scram-sha-256",
        extra_conf: dict[str, str] | None = None,
        avoid: Collection[int] = (),
    ) -> None:
        """Prepare (but do not start) a cluster.

        Args:
            port: TCP port on 127.0.0.1; a free one is picked when ``None``, none of
                ``avoid`` (ports the caller chose for itself and has not bound yet: the
                OS may hand a free port out again until it is bound).
            password_encryption: the server's default ``password_encryption``.
            extra_conf: additional ``postgresql.conf`` settings (they win over the defaults).
        """
        if password_encryption not in _PASSWORD_ENCRYPTIONS:
            raise ValueError(f"unsupported password_encryption {password_encryption!r}")
        self.bindir: str = find_pg_bindir()
        self._auto_port = port is None
        self._avoid = frozenset(avoid)
        self.port: int = self._free_port() if port is None else port
        self.password_encryption = password_encryption
        self.extra_conf: dict[str, str] = dict(extra_conf or {})
        self.base_dir: str = ""
        self.data_dir: str = ""
        self.socket_dir: str = ""
        self.log_path: str = ""
        self.postmaster_pid: int | None = None
        self._as_root = os.geteuid() == 0
        self._started = False

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Create the temporary directory, ``initdb`` the cluster and start the server.

        Raises:
            RuntimeError: initdb or the server start failed (with the server log's tail).
        """
        self._start(self._new_cluster)

    def _new_cluster(self) -> None:
        self._initdb()
        self._write_hba()

    def _start(self, make_cluster: Callable[[], None]) -> None:
        """Create the directories, ``make_cluster`` in them, and start the server (on
        another free port if the chosen one was taken meanwhile); stopped on failure."""
        if self._started:
            raise RuntimeError("EmbeddedPostgres already started")
        self._started = True
        atexit.register(self.stop)
        try:
            self._create_dirs()
            make_cluster()
            for attempt in range(3):
                self._write_conf()
                try:
                    self._pg_ctl_start()
                    break
                except RuntimeError as exc:
                    port_taken = "could not bind" in str(exc) or "in use" in str(exc)
                    if not (self._auto_port and port_taken and attempt < 2):
                        raise
                    self.port = self._free_port()
        except BaseException:
            self.stop()
            raise

    def _free_port(self) -> int:
        for _ in range(100):
            port = free_port()
            if port not in self._avoid:
                return port
        raise RuntimeError(f"no free port outside {sorted(self._avoid)}")

    def stop(self) -> None:
        """Stop the server and remove the temporary directory. Safe to call repeatedly.

        Tries ``pg_ctl stop -m fast``; if the postmaster is still there, sends it SIGQUIT
        (immediate shutdown) and finally SIGKILL (with its children), each with a bounded wait.
        """
        atexit.unregister(self.stop)
        if not self.base_dir:
            return
        pid = self.postmaster_pid or self._read_postmaster_pid()
        if pid is not None and pid_running(pid):
            stop_argv = [self._bin("pg_ctl"), "-D", self.data_dir, "-m", "fast", "-w", "-t", "20"]
            with contextlib.suppress(subprocess.TimeoutExpired, OSError):
                self.run_as_owner([*stop_argv, "stop"], timeout=30)
            if not _wait_gone(pid, 5):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGQUIT)
                if not _wait_gone(pid, 5):
                    children = _children_of(pid)
                    for victim in (pid, *children):
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(victim, signal.SIGKILL)
                    _wait_gone(pid, 5)
        self.postmaster_pid = None
        shutil.rmtree(self.base_dir, ignore_errors=True)
        self.base_dir = ""

    def shut_down(self) -> None:
        """Stop the server (``pg_ctl stop -m fast``) but keep the cluster for start_again."""
        argv = [self._bin("pg_ctl"), "-D", self.data_dir, "-m", "fast", "-w", "-t", "30"]
        result = self.run_as_owner([*argv, "stop"], timeout=60)
        if result.returncode != 0:
            raise RuntimeError(f"pg_ctl stop failed: {result.stderr.strip()}")
        self.postmaster_pid = None

    def start_again(self) -> None:
        """Start the server of a cluster stopped by shut_down, on the same port."""
        self._pg_ctl_start()

    def restart(self) -> None:
        """``pg_ctl restart -m fast``: every backend is terminated, the server comes back
        on the same port."""
        argv = [self._bin("pg_ctl"), "-D", self.data_dir, "-l", self.log_path, "-m", "fast"]
        result = self.run_as_owner([*argv, "-w", "-t", "60", "restart"], timeout=90)
        if result.returncode != 0:
            raise RuntimeError(f"pg_ctl restart failed: {result.stderr.strip()}")
        self.postmaster_pid = self._read_postmaster_pid()

    def start_as_standby_of(self, primary: EmbeddedPostgres) -> None:
        """Make this (not yet started) cluster a streaming standby of ``primary``
        (``pg_basebackup -R`` over primary's unix socket) and start it.

        Raises:
            RuntimeError: the base backup or the server start failed.
        """
        self._start(lambda: self._base_backup(primary))

    def _base_backup(self, primary: EmbeddedPostgres) -> None:
        argv = [
            self._bin("pg_basebackup"), "-D", self.data_dir, "-R", "-X", "stream",
            "-c", "fast", "-h", primary.socket_dir, "-p", str(primary.port),
            "-U", primary.superuser, "--no-sync",
        ]  # fmt: skip
        result = self.run_as_owner(argv, timeout=180)
        if result.returncode != 0:
            raise RuntimeError(f"pg_basebackup failed: {result.stderr.strip()}")

    def promote(self) -> None:
        """``pg_ctl promote -w``: this standby becomes a primary (returns once it is)."""
        argv = [self._bin("pg_ctl"), "-D", self.data_dir, "-w", "-t", "60", "promote"]
        result = self.run_as_owner(argv, timeout=90)
        if result.returncode != 0:
            raise RuntimeError(f"pg_ctl promote failed: {result.stderr.strip()}")

    def __enter__(self) -> EmbeddedPostgres:
        """Start the cluster."""
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the cluster and remove its files."""
        self.stop()

    # ------------------------------------------------------------------ helpers for users

    def sql(self, query: str, dbname: str = "postgres") -> str:
        """Run ``query`` (one or more statements) through psql as the superuser.

        Each statement runs in its own transaction, so ``CREATE DATABASE`` works.

        Returns:
            psql's unaligned, tuples-only output, stripped.

        Raises:
            RuntimeError: psql failed (the message holds its stderr).
        """
        argv = [
            self._bin("psql"), "-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1",
            "-h", self.socket_dir, "-p", str(self.port), "-U", self.superuser, "-d", dbname,
            "-f", "-",
        ]  # fmt: skip
        result = _run(argv, env=self.env(), input=query, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(
                f"psql failed (exit {result.returncode}) running {query!r}: {result.stderr.strip()}"
            )
        return result.stdout.strip()

    def create_role(
        self,
        name: str,
        password: str | None,
        *,
        encryption: str = "scram-sha-256",
        superuser: bool = False,
    ) -> None:
        """Create a LOGIN role whose password is stored with ``encryption``.

        Args:
            name: role name (quoted, so case and special characters are kept).
            password: the password, or ``None`` for a role without one.
            encryption: ``"scram-sha-256"`` or ``"md5"``.
            superuser: make the role a superuser.
        """
        if encryption not in _PASSWORD_ENCRYPTIONS:
            raise ValueError(f"unsupported password encryption {encryption!r}")
        options = ["LOGIN", "SUPERUSER" if superuser else "NOSUPERUSER"]
        if password is None:
            options.append("PASSWORD NULL")
        else:
            options.append(f"PASSWORD {quote_literal(password)}")
        self.sql(
            f"SET password_encryption = {quote_literal(encryption)};\n"
            f"CREATE ROLE {quote_ident(name)} {' '.join(options)};\n"
        )

    def create_database(self, name: str, owner: str) -> None:
        """Create database ``name`` owned by role ``owner``."""
        self.sql(f"CREATE DATABASE {quote_ident(name)} OWNER {quote_ident(owner)};")

    def superuser_dsn(self, dbname: str = "postgres") -> str:
        """libpq conninfo for the superuser over the unix socket (no password needed)."""
        return _conninfo(host=self.socket_dir, port=self.port, user=self.superuser, dbname=dbname)

    def dsn(self, user: str, password: str, dbname: str) -> str:
        """libpq conninfo for ``user`` over TCP to 127.0.0.1:``port``."""
        return _conninfo(
            host=self.host, port=self.port, user=user, password=password, dbname=dbname
        )

    def env(self) -> dict[str, str]:
        """Environment for client binaries (psql, pgbench) aimed at this cluster as superuser.

        The cluster's ``bin`` directory comes first on ``PATH``; other libpq variables of the
        calling environment are removed.
        """
        env = _clean_env()
        env.update(
            PGHOST=self.socket_dir,
            PGPORT=str(self.port),
            PGUSER=self.superuser,
            PGDATABASE="postgres",
            PATH=os.pathsep.join(filter(None, (self.bindir, env.get("PATH", os.defpath)))),
        )
        return env

    def run_as_owner(
        self, argv: list[str], *, timeout: float | None = 120
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` as the cluster's OS user, capturing text output (never raises on exit).

        As root that is ``runuser -u postgres -- argv``; otherwise the current user.
        """
        if self._as_root:
            argv = ["runuser", "-u", OWNER_OS_USER, "--", *argv]
        cwd = self.base_dir if self.base_dir and os.path.isdir(self.base_dir) else "/"
        return _run(argv, env=_clean_env(), cwd=cwd, timeout=timeout)

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the server log (empty if there is none yet)."""
        if not self.log_path:
            return ""
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    # ------------------------------------------------------------------ internals

    def _bin(self, name: str) -> str:
        return os.path.join(self.bindir, name)

    def _owner_ids(self) -> tuple[int, int]:
        try:
            entry = pwd.getpwnam(OWNER_OS_USER)
        except KeyError:
            raise RuntimeError(
                f"running as root, but there is no {OWNER_OS_USER!r} OS user to own the "
                "cluster (initdb refuses to run as root); run scripts/bootstrap.sh or run "
                "as an unprivileged user"
            ) from None
        return entry.pw_uid, entry.pw_gid

    def _temp_parent(self) -> str | None:
        """Where to put the temporary directory: the owner must be able to traverse it."""
        parent = tempfile.gettempdir()
        if not self._as_root:
            return None
        path = os.path.realpath(parent)
        while True:
            if not os.stat(path).st_mode & stat.S_IXOTH:
                return "/tmp"
            if path == "/":
                return parent
            path = os.path.dirname(path)

    def _create_dirs(self) -> None:
        self.base_dir = tempfile.mkdtemp(prefix="pgproxy-pg-", dir=self._temp_parent())
        self.data_dir = os.path.join(self.base_dir, "data")
        self.socket_dir = os.path.join(self.base_dir, "sock")
        self.log_path = os.path.join(self.base_dir, "postgresql.log")
        os.mkdir(self.socket_dir, 0o755)
        if self._as_root:
            uid, gid = self._owner_ids()
            os.chmod(self.base_dir, 0o755)
            os.chown(self.base_dir, uid, gid)
            os.chown(self.socket_dir, uid, gid)
        if len(os.path.join(self.socket_dir, f".s.PGSQL.{self.port}.lock")) > 100:
            raise RuntimeError(
                f"unix socket path under {self.socket_dir!r} is too long; set TMPDIR shorter"
            )

    def _initdb(self) -> None:
        argv = [
            self._bin("initdb"), "-D", self.data_dir, "-U", self.superuser,
            "--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync",
        ]  # fmt: skip
        result = self.run_as_owner(argv, timeout=180)
        if result.returncode != 0:
            raise RuntimeError(
                f"initdb failed (exit {result.returncode}):\n{result.stdout}\n{result.stderr}"
            )

    def _write_hba(self) -> None:
        # Truncating the existing file keeps its owner (the cluster's OS user).
        with open(os.path.join(self.data_dir, "pg_hba.conf"), "w", encoding="utf-8") as f:
            f.write(_HBA_CONF)

    def _write_conf(self) -> None:
        settings: dict[str, str] = {
            "listen_addresses": self.host,
            "port": str(self.port),
            "unix_socket_directories": self.socket_dir,
            "password_encryption": self.password_encryption,
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "300",
            "shared_buffers": "128MB",
            "logging_collector": "off",
        }
        settings.update(self.extra_conf)
        conf_path = os.path.join(self.data_dir, "postgresql.conf")
        marker = "# --- pgproxy.embedded settings ---\n"
        with open(conf_path, encoding="utf-8") as f:
            original = f.read().split(marker, 1)[0]
        body = "".join(f"{key} = {_conf_value(value)}\n" for key, value in settings.items())
        # Rewriting in place keeps the file's owner.
        with open(conf_path, "w", encoding="utf-8") as f:
            f.write(original + marker + body)

    def _pg_ctl_start(self) -> None:
        try:
            argv = [self._bin("pg_ctl"), "-D", self.data_dir, "-l", self.log_path, "-w", "-t", "60"]
            result = self.run_as_owner([*argv, "start"], timeout=90)
        except subprocess.TimeoutExpired:
            raise RuntimeError(
                f"pg_ctl start timed out; server log tail:\n{self.log_tail()}"
            ) from None
        if result.returncode != 0:
            pid = self._read_postmaster_pid()
            if pid is not None and pid_running(pid):
                self.postmaster_pid = pid  # so stop() can still kill it
            raise RuntimeError(
                f"PostgreSQL failed to start (pg_ctl exit {result.returncode}): "
                f"{result.stderr.strip() or result.stdout.strip()}\n"
                f"server log tail:\n{self.log_tail()}"
            )
        self.postmaster_pid = self._read_postmaster_pid()
        if self.postmaster_pid is None:
            raise RuntimeError(
                f"PostgreSQL started but {self.data_dir}/postmaster.pid is unreadable; "
                f"server log tail:\n{self.log_tail()}"
            )

    def _read_postmaster_pid(self) -> int | None:
        if not self.data_dir:
            return None
        try:
            with open(os.path.join(self.data_dir, "postmaster.pid"), encoding="ascii") as f:
                first = f.readline().strip()
        except (OSError, UnicodeDecodeError):
            return None
        return int(first) if first.isdigit() else None
