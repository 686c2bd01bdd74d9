"""``workers = N``: a supervisor and N worker processes that act as one pgproxy.

The supervisor reads the configuration, binds the Unix socket (the workers inherit it),
creates the shared budgets, then forks the workers and does nothing else: it restarts a
worker that dies (logged and counted), passes signals on to every worker (SIGHUP reload,
SIGTERM/SIGINT drain, SIGQUIT, SIGUSR1/2) and exits once they have all exited after a
shutdown. It runs no event loop, so forking is safe.

Each worker is an ordinary Daemon with three differences: its TCP listener has
SO_REUSEPORT (the kernel spreads new connections over the workers); it is peer ``i + 1``
of a group whose members listen on private Unix sockets, so a cancel request landing on
the wrong worker reaches the owner (pgproxy/cancel.py); and its server budgets are shared.

Shared budgets keep pool_size, max_db_connections and max_user_connections global: a
budget is a slot in shared memory holding one count per worker (each worker writes only
its own cell; the total is their sum), and taking a place is a check-and-increment under
one lock. That lock is taken only on the slow path (before opening a server), never per
query. A worker whose clients wait while it holds less than its share of a full budget
raises the slot's eviction flag; the janitor of a worker with an idle server there closes
one. A dead worker's cells are zeroed by the supervisor (its servers are gone).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.sharedctypes import RawArray
from typing import TYPE_CHECKING, Any

from pgproxy.core.pool import ServerBudget
from pgproxy.protocol.messages import wire

if TYPE_CHECKING:
    from pgproxy.config import Settings
    from pgproxy.core.pool import Pool

log = logging.getLogger("pgproxy.workers")

SLOTS = 4096  # budgets (pools, databases, users) the shared table can hold
MAX_WORKERS = 64
LOCK_TIMEOUT = 2.0  # seconds; a worker that died holding the lock must not stall others
RESTART_DELAY = 1.0  # seconds before restarting a worker that died within its first second
MAX_QUICK_FAILURES = 3  # a worker that fails this often right at start is not restarted
FORWARDED_SIGNALS = (
    signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1,
    signal.SIGUSR2,
)  # fmt: skip
STOPPING_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)


class SharedBudgets:
    """Counters in shared memory, created before the workers are forked."""

    def __init__(self, workers: int) -> None:
        if not 1 <= workers <= MAX_WORKERS:
            raise ValueError(f"workers must be between 1 and {MAX_WORKERS}")
        self.workers = workers
        self._keys: Any = RawArray(ctypes.c_uint64, SLOTS)  # 0: a free slot
        self._used: Any = RawArray(ctypes.c_int32, SLOTS * MAX_WORKERS)
        self._evict: Any = RawArray(ctypes.c_int32, SLOTS)
        # Per slot and worker: 1 while that worker has clients waiting and holds less than
        # its share of the budget. Each worker writes only its own cells.
        self._needy: Any = RawArray(ctypes.c_int8, SLOTS * MAX_WORKERS)
        self._lock = multiprocessing.get_context("fork").Lock()
        self._slots: dict[str, int] = {}  # this process's cache of name → slot

    def slot(self, name: str) -> int:
        """The slot of budget ``name`` (found, or claimed, in the shared table)."""
        cached = self._slots.get(name)
        if cached is not None:
            return cached
        key = int.from_bytes(hashlib.blake2b(wire(name), digest_size=8).digest(), "big")
        key = key or 1
        index = key % SLOTS
        with self._locked():
            for _ in range(SLOTS):
                if self._keys[index] in (0, key):
                    self._keys[index] = key
                    self._slots[name] = index
                    return index
                index = (index + 1) % SLOTS
        raise RuntimeError("shared budget table full")

    def total(self, slot: int) -> int:
        """Places taken in ``slot`` by all workers."""
        base = slot * MAX_WORKERS
        return int(sum(self._used[base : base + self.workers]))

    def take(self, slot: int, worker: int, limit: int) -> bool:
        """Take one place for ``worker`` if the total stays within ``limit`` (0: none)."""
        cell = slot * MAX_WORKERS + worker
        if limit <= 0:  # nothing to check: only this worker writes its cell
            self._used[cell] += 1
            return True
        if self.total(slot) >= limit:  # full already: no need for the lock to say so
            return False
        with self._locked():
            if limit <= self.total(slot):
                return False
            self._used[cell] += 1
            return True

    def give_back(self, slot: int, worker: int, count: int = 1) -> None:
        """Return places (a single writer per cell: no lock needed)."""
        self._used[slot * MAX_WORKERS + worker] -= count

    def set_mine(self, slot: int, worker: int, value: int) -> None:
        """Publish ``worker``'s own count (a single writer per cell: no lock needed)."""
        self._used[slot * MAX_WORKERS + worker] = value

    def mine(self, slot: int, worker: int) -> int:
        """Places ``worker`` holds in ``slot``."""
        return int(self._used[slot * MAX_WORKERS + worker])

    def forget_worker(self, worker: int) -> None:
        """A worker died: its servers are gone, and so are its places."""
        with self._locked():
            for slot in range(SLOTS):
                self._used[slot * MAX_WORKERS + worker] = 0
                self._needy[slot * MAX_WORKERS + worker] = 0

    def set_needy(self, slot: int, worker: int, needy: bool) -> None:
        """Say whether ``worker`` waits for places in ``slot`` below its share."""
        self._needy[slot * MAX_WORKERS + worker] = needy

    def needy(self, slot: int, worker: int) -> bool:
        """Whether ``worker`` said it waits for places in ``slot``."""
        return bool(self._needy[slot * MAX_WORKERS + worker])

    def others_needy(self, slot: int, worker: int) -> bool:
        """Whether a worker other than ``worker`` waits for places in ``slot``."""
        base = slot * MAX_WORKERS
        return any(self._needy[base + other] for other in range(self.workers) if other != worker)

    def ask_eviction(self, slot: int) -> None:
        """Ask whichever worker has an idle server under ``slot`` to close one."""
        self._evict[slot] = 1

    def take_eviction(self, slot: int) -> bool:
        """Claim a pending eviction request for ``slot`` (at most one worker gets it)."""
        if not self._evict[slot]:
            return False
        with self._locked():
            if self._evict[slot]:
                self._evict[slot] = 0
                return True
        return False

    def _locked(self) -> _Held:
        return _Held(self._lock)


class _Held:
    def __init__(self, lock: Any) -> None:
        self.lock = lock
        self.held = False

    def __enter__(self) -> None:
        # A worker killed while holding the lock would stall the others for ever: past the
        # timeout, go on without it (a rare overshoot beats a stuck daemon).
        self.held = bool(self.lock.acquire(timeout=LOCK_TIMEOUT))
        if not self.held:
            log.error("shared budget lock not released in %.0fs; going on", LOCK_TIMEOUT)

    def __exit__(self, *exc_info: object) -> None:
        if self.held:
            self.lock.release()


@dataclass(frozen=True)
class WorkerContext:
    """What a worker needs from its supervisor."""

    index: int
    count: int
    budgets: SharedBudgets
    peer_root: str  # private Unix socket directories: peer_root/worker-<i>
    unix_socket: socket.socket | None  # the public Unix listener, inherited
    restarted: bool = False  # replaces a worker that died (reads the config file again)

    def socket_dir(self, index: int) -> str:
        return os.path.join(self.peer_root, f"worker-{index}")

    def apply(self, settings: Settings) -> Settings:
        """``settings`` as this worker runs them: SO_REUSEPORT, its peer id and the group,
        its private Unix socket (the public one is inherited)."""
        from pgproxy.config import PeerConfig

        peers = {
            index + 1: PeerConfig(host=self.socket_dir(index), port=settings.listen_port)
            for index in range(self.count)
        }
        return settings.model_copy(
            update={
                "so_reuseport": True,
                "peer_id": self.index + 1,
                "peers": peers,
                "unix_socket_dir": self.socket_dir(self.index),
                "pidfile": None,
            }
        )


def worker_count(settings: Settings) -> int:
    """``workers`` resolved (``auto``: the CPUs this process may use)."""
    if settings.workers == "auto":
        return max(1, len(os.sched_getaffinity(0)))
    return int(settings.workers)


def bind_unix_socket(settings: Settings) -> socket.socket | None:
    """The public Unix listener, bound once for all workers."""
    from pgproxy.services.listener import (
        BACKLOG,
        claim_unix_socket,
        set_socket_access,
        unix_socket_path,
    )

    if not settings.unix_socket_dir:
        return None
    path = unix_socket_path(settings.unix_socket_dir, settings.listen_port)
    claim_unix_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        set_socket_access(path, settings)
        sock.listen(BACKLOG)
    except OSError:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    sock.setblocking(False)
    return sock


def supervise(settings: Settings, run_worker: Callable[[WorkerContext], int]) -> int:
    """Fork the workers, keep them running, pass signals on; the exit status."""
    count = worker_count(settings)
    budgets = SharedBudgets(count)
    peer_root = tempfile.mkdtemp(prefix="pgproxy-workers-")
    for index in range(count):
        os.mkdir(os.path.join(peer_root, f"worker-{index}"), 0o700)
    unix_socket = bind_unix_socket(settings)
    children: dict[int, tuple[int, float]] = {}  # pid → (worker index, started at)
    stopping = False
    restarts = 0
    quick_failures: dict[int, int] = {}  # worker → failures within a second of starting

    def spawn(index: int, restarted: bool = False) -> None:
        context = WorkerContext(index, count, budgets, peer_root, unix_socket, restarted)
        pid = os.fork()
        if pid == 0:  # the worker
            for signum in FORWARDED_SIGNALS:
                signal.signal(signum, signal.SIG_DFL)
            status = 1
            try:
                status = run_worker(context)
            except BaseException:
                log.exception("worker %d failed", index)
            finally:
                logging.shutdown()
                os._exit(status)
        children[pid] = (index, time.monotonic())

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        if signum in STOPPING_SIGNALS:
            stopping = True
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    for signum in FORWARDED_SIGNALS:
        signal.signal(signum, forward)
    for index in range(count):
        spawn(index)
    log.warning(
        "supervisor %d: %d workers on port %d (their own sockets in %s)",
        os.getpid(), count, settings.listen_port, peer_root,
    )  # fmt: skip
    status = 0
    while children:
        try:
            pid, wait_status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        index, started = children.pop(pid, (-1, 0.0))
        if index < 0:
            continue
        code = os.waitstatus_to_exitcode(wait_status)
        budgets.forget_worker(index)
        if stopping:
            status = status or (code if code > 0 else 0)
            continue
        quick = time.monotonic() - started < RESTART_DELAY
        quick_failures[index] = quick_failures.get(index, 0) + 1 if quick else 0
        if quick_failures[index] > MAX_QUICK_FAILURES:
            # It cannot start (the port is taken, say): stop the others and give up.
            log.error("worker %d keeps failing at start (exit %s); stopping", index, code)
            stopping = True
            status = code if code > 0 else 1
            forward(signal.SIGQUIT, None)
            continue
        restarts += 1
        log.error(
            "worker %d (pid %d) exited with %s; restarting it (%d restarts so far)",
            index, pid, code, restarts,
        )  # fmt: skip
        if quick:
            time.sleep(RESTART_DELAY)
        spawn(index, restarted=True)
    shutil.rmtree(peer_root, ignore_errors=True)
    if unix_socket is not None and settings.unix_socket_dir:
        from pgproxy.services.listener import unix_socket_path

        with contextlib.suppress(OSError):
            os.unlink(unix_socket_path(settings.unix_socket_dir, settings.listen_port))
    return status


class SharedServerBudget(ServerBudget):
    """A ServerBudget counted over all workers: max_db_connections, max_user_connections,
    or (``per_pool``) its one pool's pool_size, plus its reserve for reserve servers."""

    def __init__(
        self, shared: SharedBudgets, worker: int, name: str, limit: int, *, per_pool: bool = False
    ) -> None:
        super().__init__(limit)
        self.shared = shared
        self.worker = worker
        self.slot = shared.slot(name)
        self.per_pool = per_pool
        self.asked = False  # needy said again since the janitor's last pass

    @property
    def used(self) -> int:
        """Servers under this budget in every worker."""
        return self.shared.total(self.slot)

    def _limit(self, reserve: bool) -> int:
        if self.per_pool and self.pools:
            return self.pools[0].size_limit(reserve)
        return self.limit

    @property
    def full(self) -> bool:
        return 0 < self._limit(False) <= self.shared.total(self.slot)

    @property
    def share(self) -> int:
        """This worker's fair part of the budget (the limit split evenly; 0: no limit)."""
        return self._limit(False) // self.shared.workers

    def take(self, reserve: bool) -> bool:
        # (Queued requests do not ask again for a moment after a refusal: pool.BUDGET_RETRY.)
        # At or past its share, a worker leaves freed places to one that waits below its
        # share: else the busier worker would take back every place it gives up.
        if (
            self._limit(False) > 0
            and self.shared.others_needy(self.slot, self.worker)
            and self.shared.mine(self.slot, self.worker) >= self.share
        ):
            return False
        return self.shared.take(self.slot, self.worker, self._limit(reserve))

    def give_back(self) -> None:
        self.shared.give_back(self.slot, self.worker)

    def evict_idle(self, needy: Pool) -> None:
        """An idle server of this worker makes room if there is one; else, if this worker
        holds less than its share of the budget, ask the others to close an idle one.
        (Under its share only: two busy workers must not close each other's servers.)"""
        if not self.evicting and self._close_idle_of_another(needy):
            return
        if self.shared.mine(self.slot, self.worker) < self.share:
            self.shared.ask_eviction(self.slot)
            self.shared.set_needy(self.slot, self.worker, True)
            self.asked = True

    def balance(self) -> int:
        """The janitor's pass over this budget: stop saying we wait once we hold our share
        or nothing asked again since the last pass (queued requests ask at every pass, a
        login waiting for a server every 50 ms); return how many servers to give back (at
        the ends of transactions): what we hold past our share while another worker waits
        below its own."""
        mine = self.shared.mine(self.slot, self.worker)
        share = self.share
        if self.shared.needy(self.slot, self.worker) and (mine >= share or not self.asked):
            self.shared.set_needy(self.slot, self.worker, False)
        self.asked = False
        excess = mine - share
        if share > 0 and excess > 0 and self.shared.others_needy(self.slot, self.worker):
            return excess
        return 0


def evict_for_other_workers(pools: list[Pool]) -> None:
    """The janitor's share of balancing the workers: how many servers each pool gives
    back as its transactions end (past this worker's share of a budget another worker
    waits for), and an idle server closed under a budget another worker asked room in
    (one per request)."""
    for pool in pools:
        pool.give_back = 0
    balanced: set[int] = set()
    for pool in pools:
        for budget in pool.budgets:
            if isinstance(budget, SharedServerBudget) and id(budget) not in balanced:
                balanced.add(id(budget))  # (a database's budget covers several pools)
                excess = budget.balance()
                for owner in budget.pools:  # spread over this worker's pools under it
                    if excess <= 0:
                        break
                    part = min(excess, len(owner.servers))
                    owner.give_back = max(owner.give_back, part)
                    excess -= part
    for pool in pools:
        if not pool.idle:
            continue
        for budget in pool.budgets:
            if isinstance(budget, SharedServerBudget) and budget.shared.take_eviction(budget.slot):
                log.info("pool %s: closing an idle server for another worker", pool.name)
                pool.retire(pool.idle[0])
                break
