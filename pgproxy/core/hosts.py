"""A database's hosts: which one is the primary, which are standbys, how far behind each is.

libpq's ``target_session_attrs`` for a pool: a ``Topology`` per host list (shared by the
entries that name the same hosts, such as a database and its read-only twin) keeps what
was last seen of each host, from two sources: every server login (PostgreSQL 14 and later
report ``in_hot_standby`` and ``default_transaction_read_only`` at login, so that costs no
round trip) and a check of every host each ``server_check_delay`` (a short connection of
its own that also measures replication lag). A ``HostPolicy`` per pool ranks the hosts for
its entry's ``target_session_attrs`` and ``max_replica_lag``: new servers go to the best
host that answers, and when the ranking changes (a failover, a standby falling behind or
catching up) the servers on hosts that are no longer the best are closed as they come free.
While no host fits (the primary is gone and no standby has been promoted yet), a server
login fails with 57P03, which the pool retries every 0.1 s while its clients keep waiting
(up to query_wait_timeout): the first login after a promotion finds the new primary.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING

from pgproxy.config import DatabaseConfig, ReplicaLagLimit, replica_lag_limit
from pgproxy.core.server import CLOSED, ServerConn, ServerLoginError, connect_host
from pgproxy.protocol import codes, messages

if TYPE_CHECKING:
    from pgproxy.core.pool import Pool

log = logging.getLogger("pgproxy.hosts")

PRIMARY = "primary"
STANDBY = "standby"
UNKNOWN = "unknown"

# A host's rank for a policy: the best is served; FALLBACK only when nothing ranks BEST
# (prefer-standby's primary); UNTRIED: role not known yet; None: does not fit now.
BEST = 0
FALLBACK = 1
UNTRIED = 2

MIN_CHECK_INTERVAL = 1.0  # seconds between host checks when server_check_delay is shorter
CHECK_TIMEOUT = 5.0  # a host check that takes longer marks the host down
CHECK_APPLICATION_NAME = "pgproxy host check"
# One round trip: in recovery, read-only, WAL position (replayed on a standby, written on
# a primary), and seconds since the last replayed transaction when replay is behind what
# was received (0 when it has replayed everything it has).
CHECK_QUERY = (
    "SELECT pg_catalog.pg_is_in_recovery(), pg_catalog.current_setting('transaction_read_only'), "
    "pg_catalog.pg_wal_lsn_diff(CASE WHEN pg_catalog.pg_is_in_recovery() "
    "THEN pg_catalog.pg_last_wal_replay_lsn() ELSE pg_catalog.pg_current_wal_lsn() END, '0/0'), "
    "CASE WHEN NOT pg_catalog.pg_is_in_recovery() OR pg_catalog.pg_last_wal_receive_lsn() "
    "IS NOT DISTINCT FROM pg_catalog.pg_last_wal_replay_lsn() THEN 0 "
    "ELSE COALESCE(EXTRACT(EPOCH FROM pg_catalog.now() - "
    "pg_catalog.pg_last_xact_replay_timestamp()), 0) END"
)
_DATA_ROW = ord("D")


@dataclass(slots=True)
class HostState:
    """What was last seen of one host."""

    name: str
    port: int
    role: str = UNKNOWN
    read_only: bool = False  # transactions are read-only by default there
    up: bool | None = None  # None: never tried
    lag_seconds: float | None = None  # standbys, from the host checks
    lag_bytes: int | None = None
    seen_at: float = 0.0  # monotonic time of the last login or check
    error: str = ""  # why the last attempt failed


class Topology:
    """The hosts of one host list, and the pools that choose among them."""

    def __init__(self, hosts: tuple[str, ...], port: int) -> None:
        self.hosts = {name: HostState(name, port) for name in hosts}
        self.port = port
        self.primary: str | None = None  # the host last seen as primary
        self.failovers = 0  # times the primary moved to another host
        self.policies: dict[Pool, HostPolicy] = {}
        self.next_check_at = 0.0
        self._checking = False
        self._tasks: set[asyncio.Task[None]] = set()

    # -- what logins and checks saw ------------------------------------------------------

    def saw_role(self, host: HostState, in_recovery: bool, read_only: bool) -> bool:
        """Record ``host``'s role; True if it changed. A primary seen on another host than
        the last one is a failover: the old one's role is unknown until seen again."""
        role = STANDBY if in_recovery else PRIMARY
        changed = host.role != role or host.read_only != read_only
        host.role, host.read_only = role, read_only
        host.up, host.error, host.seen_at = True, "", time.monotonic()
        if role == PRIMARY:
            host.lag_seconds = host.lag_bytes = None
            old = self.primary
            if old != host.name:
                self.primary = host.name
                if old is not None:
                    self.failovers += 1
                    former = self.hosts[old]
                    if former.role == PRIMARY:
                        former.role = UNKNOWN
                    log.warning(
                        "%s: the primary moved from %s to %s", self.databases(), old, host.name
                    )
                changed = True
        elif self.primary == host.name:
            self.primary = None
            log.warning(
                "%s: host %s is no longer the primary (in recovery)", self.databases(), host.name
            )
        return changed

    def saw_login(self, host: HostState, server: ServerConn) -> bool:
        """A server logged in to ``host``: its role from the login's ParameterStatus
        (PostgreSQL 14+); True if the role changed."""
        params = dict(server.login_params)
        in_hot_standby = params.get("in_hot_standby")
        if in_hot_standby is None:  # older servers: the host checks tell
            host.up, host.error, host.seen_at = True, "", time.monotonic()
            return False
        read_only = params.get("default_transaction_read_only", "off") == "on"
        return self.saw_role(host, in_hot_standby == "on", read_only or in_hot_standby == "on")

    def saw_failure(self, host: HostState, error: str) -> bool:
        """A login or check of ``host`` failed; True if it was up before."""
        was_up = host.up is not False
        host.up, host.error, host.seen_at = False, error, time.monotonic()
        return was_up

    def databases(self) -> str:
        """The database entries on these hosts, for the log."""
        names = sorted({pool.database for pool in self.policies})
        return ("database " if len(names) == 1 else "databases ") + ", ".join(names)

    # -- changes -------------------------------------------------------------------------

    def rebalance(self) -> None:
        """The ranking may have changed: each pool closes what is no longer best."""
        for policy in list(self.policies.values()):
            policy.rebalance()

    # -- periodic checks -----------------------------------------------------------------

    @property
    def checked(self) -> bool:
        """Whether any pool on these hosts needs their roles checked periodically."""
        return any(policy.checked for policy in self.policies.values())

    def maintain(self, pool: Pool, now: float) -> None:
        """The janitor's pass: start a check of every host when one is due."""
        if self._checking or now < self.next_check_at or not self.checked:
            return
        self._checking = True
        delay = max(pool.settings.check_delay, MIN_CHECK_INTERVAL)
        self.next_check_at = now + delay
        task = asyncio.get_running_loop().create_task(self._check_all(pool))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def check_soon(self) -> None:
        """Check the hosts at the janitor's next pass."""
        self.next_check_at = 0.0

    async def _check_all(self, pool: Pool) -> None:
        try:
            hosts = list(self.hosts.values())
            found = await asyncio.gather(
                *(self._check(pool, host) for host in hosts), return_exceptions=True
            )
            positions: dict[str, int] = {}
            for host, outcome in zip(hosts, found, strict=True):
                if isinstance(outcome, BaseException):
                    log.error("host check of %s failed unexpectedly: %r", host.name, outcome)
                elif outcome is not None:
                    positions[host.name] = outcome
            # Bytes behind: the primary's WAL position and each standby's replay position,
            # both from this round.
            head = positions.get(self.primary) if self.primary else None
            for host in hosts:
                position = positions.get(host.name)
                if host.role == STANDBY and position is not None and head is not None:
                    host.lag_bytes = max(0, head - position)
            self.rebalance()
        finally:
            self._checking = False

    async def _check(self, pool: Pool, host: HostState) -> int | None:
        """Log in to ``host`` and ask its role and lag; its WAL position (bytes since 0/0:
        written on a primary, replayed on a standby), if it answered."""
        try:
            conn = await connect_host(
                pool, host.name, CHECK_TIMEOUT, HostCheckConn,
                {"application_name": CHECK_APPLICATION_NAME},
            )  # fmt: skip
        except ServerLoginError as exc:
            self.saw_failure(host, exc.message)
            return None
        assert isinstance(conn, HostCheckConn)
        try:
            async with asyncio.timeout(CHECK_TIMEOUT):
                row = await conn.ask(CHECK_QUERY)
        except (ServerLoginError, TimeoutError) as exc:
            self.saw_failure(host, getattr(exc, "message", "host check timed out"))
            return None
        finally:
            conn.close()
        if row is None or len(row) < 4 or None in row[:3]:
            self.saw_failure(host, "host check returned no row")
            return None
        in_recovery, read_only = row[0] == "t", row[1] == "on"
        self.saw_role(host, in_recovery, read_only)
        position = int(Decimal(row[2] or 0))
        if in_recovery:
            host.lag_seconds = max(0.0, float(row[3] or 0))
        return position


class HostPolicy:
    """One pool's choice among its topology's hosts (target_session_attrs, max_replica_lag)."""

    def __init__(self, pool: Pool, topology: Topology, entry: DatabaseConfig) -> None:
        self.pool = pool
        self.topology = topology
        self.attrs = entry.target_session_attrs
        self.max_lag: ReplicaLagLimit | None = replica_lag_limit(entry.max_replica_lag)
        # Periodic checks are needed to tell roles and lag apart: not for a single host
        # that any role may serve.
        self.checked = len(topology.hosts) > 1 or self.attrs != "any" or self.max_lag is not None

    def lagging(self, host: HostState) -> bool:
        """A standby further behind than max_replica_lag (as last measured)."""
        limit = self.max_lag
        if limit is None or host.role != STANDBY:
            return False
        if limit.seconds is not None and host.lag_seconds is not None:
            return host.lag_seconds > limit.seconds
        if limit.wal_bytes is not None and host.lag_bytes is not None:
            return host.lag_bytes > limit.wal_bytes
        return False

    def rank(self, host: HostState) -> int | None:
        """How well ``host`` fits this pool now (BEST, FALLBACK, UNTRIED or None)."""
        if self.lagging(host):
            return None
        attrs = self.attrs
        if attrs == "any":
            return BEST
        if host.role == UNKNOWN:
            return UNTRIED
        primary = host.role == PRIMARY
        fits = {
            "read-write": primary and not host.read_only,
            "read-only": host.read_only,
            "primary": primary,
            "standby": not primary,
        }.get(attrs)
        if fits is None:  # prefer-standby
            return BEST if not primary else FALLBACK
        return BEST if fits else None

    def best_rank(self) -> int | None:
        """The best rank among the hosts that are not known to be down."""
        ranks = [self.rank(host) for host in self.topology.hosts.values() if host.up is not False]
        known = [rank for rank in ranks if rank is not None and rank != UNTRIED]
        return min(known) if known else None

    def order(self) -> list[HostState]:
        """The hosts to try for a new server: best first, then untried, then fallbacks,
        then the ones that do not fit now (their role may have changed: that is how a
        promotion is found); the hosts whose last attempt failed after all the others (one
        that does not answer would spend the whole connect timeout). Equals keep the order
        of the host list from the pool's current host (load_balance_hosts)."""
        hosts = list(self.topology.hosts.values())
        start = self.pool.host_index % len(hosts)
        rotated = hosts[start:] + hosts[:start]
        order = {BEST: 0, UNTRIED: 1, FALLBACK: 2}

        def key(host: HostState) -> tuple[bool, int]:
            rank = self.rank(host)
            return (host.up is False, order.get(rank, 3) if rank is not None else 3)

        return sorted(rotated, key=key)

    async def connect(
        self, timeout: float, factory: type[ServerConn], startup: dict[str, str]
    ) -> ServerConn:
        """Open a server on the best host that answers; raise ServerLoginError (57P03,
        which the pool retries soon while its clients wait, when hosts answered but none
        fits)."""
        pool, topology = self.pool, self.topology
        names = list(topology.hosts)
        deadline = time.monotonic() + timeout
        fallback: ServerConn | None = None
        fallback_index = 0
        error: ServerLoginError | None = None
        answered: list[str] = []
        changed = False
        try:
            for host in self.order():
                rank_before = self.rank(host)
                if fallback is not None and (
                    rank_before is None or rank_before == FALLBACK or host.up is False
                ):
                    continue  # something that serves is in hand: no need to look further
                try:
                    server = await connect_host(
                        pool, host.name, max(0.001, deadline - time.monotonic()), factory,
                        startup,
                    )  # fmt: skip
                except ServerLoginError as exc:
                    # As libpq: any failure moves on to the next host (one shutting down
                    # may end a login with an error of its own).
                    changed |= topology.saw_failure(host, exc.message)
                    error = exc
                    continue
                changed |= topology.saw_login(host, server)
                rank = self.rank(host)
                if rank == UNTRIED:  # a server too old to say its role: the checks will
                    topology.check_soon()
                if rank == BEST:
                    self._chose(names.index(host.name))
                    return server
                if rank == FALLBACK and fallback is None:
                    fallback, fallback_index = server, names.index(host.name)
                    continue
                answered.append(f"{host.name} is {host.role}")
                server.close()
            if fallback is not None:
                server, fallback = fallback, None
                self._chose(fallback_index)
                return server
        finally:
            if fallback is not None:
                fallback.close()
            if changed:
                topology.rebalance()
        if not answered and error is not None:
            raise error
        raise ServerLoginError(
            codes.CANNOT_CONNECT_NOW,
            f"no host fits target_session_attrs={self.attrs}"
            + (f" ({', '.join(answered)})" if answered else ""),
            transient=True,
        )

    def _chose(self, index: int) -> None:
        pool = self.pool
        pool.host_index = index + 1 if pool.target.round_robin else index

    def rebalance(self) -> None:
        """Close, once free, the servers on hosts that are not the best any more (a
        failover, a lagging standby, a standby back in reach), and let waiting clients
        get servers on the best one."""
        best = self.best_rank()
        pool = self.pool
        hosts = self.topology.hosts
        stale = []
        for server in pool.servers:
            host = hosts.get(server.host)
            if host is None:
                continue
            rank = self.rank(host)
            if rank is None or (best is not None and rank > best):
                stale.append(server)
        for server in stale:
            if server.expires_at != 0.0:
                log.info(
                    "pool %s: server on %s is closed once free (target_session_attrs=%s)",
                    pool.name, server.host, self.attrs,
                )  # fmt: skip
            server.expires_at = 0.0
            if server in pool.idle:
                pool.retire(server)
        if pool.waiters:
            pool.grow()

    def servers_on(self, host: str) -> int:
        """This pool's servers on ``host``."""
        return sum(1 for server in self.pool.servers if server.host == host)

    def state_of(self, host: HostState) -> str:
        """What SHOW HOSTS says of ``host`` for this pool."""
        if host.up is None:
            return "unknown"
        if host.up is False:
            return "down"
        if self.lagging(host):
            return "lagging"
        rank = self.rank(host)
        best = self.best_rank()
        if rank is None:
            return "unfit"
        if rank == UNTRIED:
            return "unknown"
        return "serving" if best is None or rank <= best else "fallback"


class Topologies:
    """Every topology of the daemon, by host list and port."""

    def __init__(self) -> None:
        self.by_hosts: dict[tuple[tuple[str, ...], int], Topology] = {}

    def attach(self, pool: Pool, entry: DatabaseConfig) -> None:
        """Give ``pool`` its host policy for ``entry`` (at creation and at each reload); a
        plain entry (one host, any role, no lag limit) gets none and connects as before."""
        old = pool.host_policy
        if isinstance(old, HostPolicy):
            old.topology.policies.pop(pool, None)
            pool.host_policy = None
            if not old.topology.policies:  # (hosts changed by a reload: forgotten)
                self.by_hosts = {k: t for k, t in self.by_hosts.items() if t.policies}
        hosts = pool.target.hosts
        key = (hosts, pool.target.port)
        topology = self.by_hosts.get(key)
        if topology is None:
            topology = Topology(hosts, pool.target.port)
        policy = HostPolicy(pool, topology, entry)
        if not policy.checked:
            return
        self.by_hosts[key] = topology
        topology.policies[pool] = policy
        pool.host_policy = policy
        if not isinstance(old, HostPolicy) or old.topology is not topology:
            topology.check_soon()

    def __iter__(self) -> Iterator[Topology]:
        return iter(list(self.by_hosts.values()))


class HostCheckConn(ServerConn):
    """A short connection of a host check: after its login, every reply is read by ``ask``
    (never a pool's, never linked to a client)."""

    def data_received(self, data: bytes) -> None:
        if self.state is not CLOSED:
            self._login_buffer += data
            self._wake_login()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self.state = CLOSED
        self._wake_login()

    async def ask(self, sql: str) -> list[str | None] | None:
        """Run ``sql`` (simple query) and return its first row as text; raise
        ServerLoginError on an error or a lost connection."""
        self.transport.write(messages.query(sql))
        row: list[str | None] | None = None
        failure: str | None = None
        while True:
            type_byte, payload = await self._read_login_message()
            if type_byte == _DATA_ROW and row is None:
                row = messages.parse_data_row(payload, 0, len(payload))
            elif type_byte == messages.ERROR_RESPONSE:
                failure = messages.parse_error_fields(payload).get("M", "error")
            elif type_byte == messages.READY_FOR_QUERY:
                if failure is not None:
                    raise ServerLoginError(codes.CONNECTION_FAILURE, failure)
                return row
