"""Shared fixtures: one PostgreSQL cluster per session, proxies per test or per module.

Roles in the ``pg`` cluster (all may log into ``appdb`` and use table ``t``):

========== ============== ======================= ====================================
role       password       stored as               method the server asks over TCP
========== ============== ======================= ====================================
app        app-secret     SCRAM-SHA-256           scram-sha-256 (owns appdb and t)
md5user    md5-secret     md5                     md5
plainuser  plain-secret   SCRAM-SHA-256           password (cleartext)
trustuser  (none)         -                       trust
========== ============== ======================= ====================================
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import pgproxy
from pgproxy.embedded import EmbeddedPostgres, quote_ident
from tests import support
from tests.support import (
    LEAKED_SECRETS,
    ProxyFactory,
    ProxyProcess,
    proxy_config,
    psql,
    start_proxy,
)

__all__ = ["ProxyProcess", "proxy_config", "psql", "start_proxy"]

#: (role, password, stored encryption)
ROLES: list[tuple[str, str | None, str]] = [
    ("app", "app-secret", "scram-sha-256"),
    ("md5user", "md5-secret", "md5"),
    ("plainuser", "plain-secret", "scram-sha-256"),
    ("trustuser", None, "scram-sha-256"),
]
OTHER_ROLES = [name for name, _, _ in ROLES if name != "app"]


def _setup_cluster(pg: EmbeddedPostgres) -> None:
    for name, password, encryption in ROLES:
        pg.create_role(name, password, encryption=encryption)
    pg.create_database("appdb", owner="app")
    everyone = ", ".join(quote_ident(name) for name, _, _ in ROLES)
    others = ", ".join(quote_ident(name) for name in OTHER_ROLES)
    pg.sql(f"GRANT ALL ON DATABASE appdb TO {everyone};")
    pg.sql(
        f"GRANT ALL ON SCHEMA public TO {everyone};\n"
        "SET ROLE app;\n"
        "CREATE TABLE t (id serial PRIMARY KEY, v text);\n"
        f"GRANT ALL ON TABLE t TO {others};\n"
        f"GRANT ALL ON SEQUENCE t_id_seq TO {others};\n"
        "RESET ROLE;\n",
        dbname="appdb",
    )


E2E_DIR = Path(__file__).parent / "e2e"
# Fixtures that start PostgreSQL or a pgproxy process: a test that uses one (directly or
# through another fixture) is end to end.
E2E_FIXTURES = frozenset(
    {"pg", "proxy_factory", "module_proxy_factory", "proxy_tx", "proxy_session",
     "proxy_statement"}
)  # fmt: skip


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark ``e2e`` every test under tests/e2e/ and every test that uses a fixture that
    starts PostgreSQL or pgproxy, so that ``pytest -m "not e2e"`` runs the in-process
    part alone (tests that start such processes by other means carry the mark
    themselves)."""
    for item in items:
        in_e2e_dir = E2E_DIR in Path(str(item.path)).parents
        fixtures = set(getattr(item, "fixturenames", ()))
        if in_e2e_dir or fixtures & E2E_FIXTURES:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(autouse=True)
def no_processes_outside_e2e(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A test not marked ``e2e`` fails if it starts PostgreSQL or a pgproxy process: the
    mark is what keeps ``-m "not e2e"`` fast and free of them."""
    if request.node.get_closest_marker("e2e") is not None:
        return

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"{request.node.nodeid} starts PostgreSQL or pgproxy: mark it e2e")

    monkeypatch.setattr(EmbeddedPostgres, "start", refuse)
    monkeypatch.setattr(support, "launch_proxy", refuse)


@pytest.fixture(scope="session", autouse=True)
def no_secret_in_any_proxy_log() -> Iterator[None]:
    """After the whole session: no proxy's log held any test password (see TEST_SECRETS)."""
    yield
    assert not LEAKED_SECRETS, "passwords in proxy logs:\n" + "\n".join(LEAKED_SECRETS)


@pytest.fixture(scope="session")
def pg() -> Iterator[EmbeddedPostgres]:
    """A PostgreSQL cluster for the whole session, with the roles above and ``appdb``."""
    with EmbeddedPostgres() as cluster:
        _setup_cluster(cluster)
        yield cluster


@pytest.fixture
def proxy_factory() -> Iterator[ProxyFactory]:
    """``proxy_factory(config) -> ProxyProcess``; every proxy is stopped after the test."""
    factory = ProxyFactory()
    yield factory
    factory.close()


@pytest.fixture(scope="module")
def module_proxy_factory() -> Iterator[ProxyFactory]:
    """Like ``proxy_factory`` but the proxies live until the end of the module."""
    factory = ProxyFactory()
    yield factory
    factory.close()


@pytest.fixture(scope="module")
def proxy_tx(pg: EmbeddedPostgres, module_proxy_factory: ProxyFactory) -> ProxyProcess:
    """A proxy with the default config in transaction pooling mode (module-scoped)."""
    return module_proxy_factory(proxy_config(pg, pool_mode="transaction"))


@pytest.fixture(scope="module")
def proxy_session(pg: EmbeddedPostgres, module_proxy_factory: ProxyFactory) -> ProxyProcess:
    """A proxy with the default config in session pooling mode (module-scoped)."""
    return module_proxy_factory(proxy_config(pg, pool_mode="session"))


@pytest.fixture(scope="module")
def proxy_statement(pg: EmbeddedPostgres, module_proxy_factory: ProxyFactory) -> ProxyProcess:
    """A proxy with the default config in statement pooling mode (module-scoped)."""
    return module_proxy_factory(proxy_config(pg, pool_mode="statement"))


# -- which build is under test ------------------------------------------------------------------
# scripts/test.sh runs the suite against the compiled build (installed in .venv-compiled)
# and against the pure one (.venv, editable), and says which it expects in
# EXPECT_PGPROXY_BUILD. A repository on sys.path ahead of the installed package would
# silently test the source tree instead; this stops the run if so.


def pytest_report_header() -> str:
    return f"pgproxy build under test: {pgproxy.BUILD}, from {Path(pgproxy.__file__).parent}"


def pytest_sessionstart(session: pytest.Session) -> None:
    expected = os.environ.get("EXPECT_PGPROXY_BUILD")
    if expected is not None and expected != pgproxy.BUILD:
        raise pytest.UsageError(
            f"expected the {expected} build of pgproxy, imported the {pgproxy.BUILD} one "
            f"from {pgproxy.__file__}"
        )
    source = Path(__file__).resolve().parent.parent / "pgproxy"
    if pgproxy.BUILD != "pure" and Path(pgproxy.__file__).resolve().parent == source:
        raise pytest.UsageError(
            f"compiled modules in the source tree ({source}) run stale code after an edit: "
            "remove them (only an installed package is compiled)"
        )
