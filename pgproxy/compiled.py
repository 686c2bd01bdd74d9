"""Which modules mypyc compiles when pgproxy is installed, and which build is running.

``setup.py`` reads ``HOT_MODULES`` (without importing pgproxy) and compiles them to C
extension modules; everything else stays Python. These are the modules a transaction
passes through (``bench/hotpath.py`` drives them): compiled, they take about half the CPU.
Installed with ``PURE_PGPROXY=1`` in the environment, or where no C compiler is found, the
same package runs as pure Python.
"""

from __future__ import annotations

from importlib.machinery import EXTENSION_SUFFIXES
from importlib.util import find_spec

HOT_MODULES = (
    "pgproxy.protocol.stream",
    "pgproxy.protocol.prepared",
    "pgproxy.core.client",
    "pgproxy.core.server",
    "pgproxy.core.pool",
    "pgproxy.core.states",
    "pgproxy.core.histograms",
    "pgproxy.core.params",
    "pgproxy.client_rules",
    "pgproxy.stats",
    # The login: a connection per transaction (pgbench -C) passes through these for every
    # client.
    "pgproxy.protocol.client_login",
    "pgproxy.protocol.startup",
    "pgproxy.protocol.messages",
    "pgproxy.protocol.framing",
    # What each login asks of the daemon (its pool and client caps, the database's state,
    # the user's secret, a cancel key): interpreted, every call from compiled code into
    # them builds a Python frame.
    "pgproxy.services.registry",
    "pgproxy.services.pause_state",
    "pgproxy.services.credentials",
    "pgproxy.cancel",
    # Not hot, but they subclass ServerConn (ReplicationServerConn, HostCheckConn): a
    # compiled class takes no Python subclass unless it allows them, which would slow
    # every call on ServerConn.
    "pgproxy.core.replication",
    "pgproxy.core.hosts",
)


def compiled_modules() -> list[str]:
    """The hot modules that import as C extensions here (Python prefers an extension module
    to the .py file beside it)."""
    compiled = []
    for name in HOT_MODULES:
        spec = find_spec(name)
        origin = spec.origin if spec is not None else None
        if origin is not None and origin.endswith(tuple(EXTENSION_SUFFIXES)):
            compiled.append(name)
    return compiled


def build_kind() -> str:
    """``compiled`` (every hot module is a C extension), ``pure``, or ``partial``: the value
    of ``pgproxy_build_info{build}`` and of ``pgproxy --version``'s build line."""
    count = len(compiled_modules())
    if count == len(HOT_MODULES):
        return "compiled"
    return "pure" if count == 0 else "partial"
