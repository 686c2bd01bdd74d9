"""Real drivers with their default settings through transaction mode on small pools.

asyncpg (its statement cache names every statement), pgbench -M prepared, node-postgres
named queries: each client's named statements must follow it to whichever server it gets.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import asyncpg
import pg8000.native
import pytest

from pgproxy.embedded import EmbeddedPostgres
from tests.support import ProxyFactory, ProxyProcess, proxy_config

ROOT = Path(__file__).resolve().parents[2]
NODE_MODULES = ROOT / ".venv" / "node" / "node_modules"


@pytest.fixture(scope="module")
def proxy_small(pg: EmbeddedPostgres, module_proxy_factory: ProxyFactory) -> ProxyProcess:
    """Transaction mode, three servers for many clients, default max_prepared_statements."""
    return module_proxy_factory(proxy_config(pg, default_pool_size=3))


def _dsn(proxy: ProxyProcess) -> str:
    return f"postgresql://app:app-secret@127.0.0.1:{proxy.port}/appdb"


# -- asyncpg -------------------------------------------------------------------------------------


async def test_asyncpg_default_cache_many_connections(proxy_small: ProxyProcess) -> None:
    async def worker(number: int) -> set[int]:
        conn = await asyncpg.connect(_dsn(proxy_small))
        backends: set[int] = set()
        try:
            for index in range(25):
                # Five distinct statements, each prepared once per connection by asyncpg.
                query = f"select $1::int + $2::int + {index % 5}"
                assert await conn.fetchval(query, index, number) == index + number + index % 5
                backends.add(await conn.fetchval("select pg_backend_pid()"))
            rows = await conn.fetch("select x from generate_series(1, $1::int) as x", 4)
            assert [row["x"] for row in rows] == [1, 2, 3, 4]
            async with conn.transaction():
                await conn.executemany(
                    "insert into t (v) values ($1)",
                    [(f"asyncpg-{number}-{item}",) for item in range(30)],
                )
            count = await conn.fetchval(
                "select count(*) from t where v like $1", f"asyncpg-{number}-%"
            )
            assert count == 30
        finally:
            await conn.close()
        return backends

    results = await asyncio.wait_for(
        asyncio.gather(*(worker(number) for number in range(12))), timeout=90
    )
    # Twelve connections shared three servers, and their statements went with them.
    assert len(set().union(*results)) <= 3
    assert any(len(backends) > 1 for backends in results)


async def test_asyncpg_prepared_statement_on_another_server(proxy_small: ProxyProcess) -> None:
    conn = await asyncpg.connect(_dsn(proxy_small))
    holder = await asyncpg.connect(_dsn(proxy_small))
    try:
        statement = await conn.prepare("select $1::text || '!' as shout, pg_backend_pid()")
        shout, first = await statement.fetchrow("hey")
        assert shout == "hey!"
        # Another client holds the statement's server in a transaction: the statement runs
        # on a server where pgproxy has to prepare it first.
        moved = False
        for attempt in range(20):
            transaction = holder.transaction()
            await transaction.start()
            if await holder.fetchval("select pg_backend_pid()") == first:
                shout, backend = await statement.fetchrow(f"moved{attempt}")
                assert shout == f"moved{attempt}!"
                assert backend != first
                moved = True
            await transaction.rollback()
            if moved:
                break
        assert moved, "the other client never got the statement's server"
        assert (await statement.fetchrow("back"))[0] == "back!"
    finally:
        await holder.close()
        await conn.close()


# -- pgbench -M prepared -------------------------------------------------------------------------


def _pgbench(pg: EmbeddedPostgres, port: int, *args: str) -> subprocess.CompletedProcess[str]:
    command = [os.path.join(pg.bindir, "pgbench"), *args, "-h", "127.0.0.1", "-p", str(port)]
    env = {**os.environ, "PGPASSWORD": "app-secret"}
    return subprocess.run(
        [*command, "-U", "app", "appdb"], capture_output=True, text=True, timeout=120, env=env
    )


@pytest.mark.parametrize("options", [["-S"], []], ids=["select-only", "tpcb"])
def test_pgbench_prepared_many_clients_small_pool(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory, options: list[str]
) -> None:
    proxy = proxy_factory(proxy_config(pg, default_pool_size=3, pool_mode="session"))
    init = _pgbench(pg, proxy.port, "-i", "-s", "1", "-q", "--foreign-keys")
    assert init.returncode == 0, init.stderr
    tx_proxy = proxy_factory(proxy_config(pg, default_pool_size=3))
    # One thread per client: pgbench prepares each statement with a blocking PQprepare
    # on first use, which stalls every other client of its thread. With several clients
    # per thread, the stalled prepare can wait for a server that the thread's own
    # clients hold mid-transaction, for ever (through any transaction-mode pooler).
    result = _pgbench(
        pg, tx_proxy.port, *options, "-M", "prepared", "-c", "12", "-j", "12", "-T", "3"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "number of failed transactions: 0" in result.stdout
    processed = [line for line in result.stdout.splitlines() if "actually processed" in line]
    assert processed and int(processed[0].split(":")[1].split("/")[0]) > 100


# -- node-postgres -------------------------------------------------------------------------------

NODE_SCRIPT = r"""
const { Client } = require("pg");
const port = Number(process.argv[2]);

async function worker(number) {
  const client = new Client({ host: "127.0.0.1", port, user: "app",
                              password: "app-secret", database: "appdb" });
  await client.connect();
  const backends = new Set();
  try {
    for (let index = 0; index < 20; index++) {
      const result = await client.query({
        name: `add-${index % 4}`,
        text: `select $1::int + $2::int + ${index % 4} as v, pg_backend_pid() as pid`,
        values: [index, number],
      });
      if (result.rows[0].v !== index + number + (index % 4)) {
        throw new Error(`wrong answer ${JSON.stringify(result.rows)}`);
      }
      backends.add(result.rows[0].pid);
    }
    await client.query("begin");
    await client.query({ name: "ins", text: "insert into t (v) values ($1)",
                         values: [`node-${number}`] });
    await client.query({ name: "ins", text: "insert into t (v) values ($1)",
                         values: [`node-${number}`] });
    await client.query("commit");
    const count = await client.query({
      name: "count", text: "select count(*)::int as n from t where v = $1",
      values: [`node-${number}`] });
    if (count.rows[0].n !== 2) throw new Error(`count ${count.rows[0].n}`);
  } finally {
    await client.end();
  }
  return [...backends];
}

Promise.all(Array.from({ length: 10 }, (_, number) => worker(number)))
  .then((results) => { console.log(JSON.stringify(results)); })
  .catch((error) => { console.error(error); process.exit(1); });
"""


def test_node_postgres_named_queries(proxy_small: ProxyProcess, tmp_path: Path) -> None:
    node = shutil.which("node")
    assert node is not None, "Node.js is installed by scripts/bootstrap.sh"
    assert (NODE_MODULES / "pg").is_dir(), "node-postgres is installed by scripts/bootstrap.sh"
    script = tmp_path / "named.js"
    script.write_text(NODE_SCRIPT)
    result = subprocess.run(
        [node, str(script), str(proxy_small.port)],
        capture_output=True, text=True, timeout=90,
        env={**os.environ, "NODE_PATH": str(NODE_MODULES)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    backends: list[list[Any]] = json.loads(result.stdout)
    assert len(backends) == 10
    assert len({pid for pids in backends for pid in pids}) <= 3


# -- pg8000: the unnamed statement across two Syncs ------------------------------------------


def test_pg8000_unnamed_statement_outside_transactions(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory
) -> None:
    """pg8000's run() with parameters sends Parse/Sync, Describe/Sync and Bind/Execute/Sync
    of the unnamed statement: in autocommit each Sync ends the transaction, and the next
    message may reach another server, where pgproxy must prepare the statement again."""
    proxy = proxy_factory(proxy_config(pg, default_pool_size=4))
    clients, rounds = 60, 15
    start = threading.Barrier(clients)

    def worker(number: int) -> list[tuple[int, int]]:
        conn = pg8000.native.Connection(
            "app", host="127.0.0.1", port=proxy.port, database="appdb", password="app-secret"
        )
        try:
            start.wait(timeout=60)
            results = []
            for index in range(rounds):
                value = number * 1000 + index
                rows = conn.run("select :v::int, pg_backend_pid()", v=value)
                results.append((value, rows[0][0]))
                backends.add(rows[0][1])
            return results
        finally:
            conn.close()

    backends: set[int] = set()
    with ThreadPoolExecutor(max_workers=clients) as executor:
        outcomes = list(executor.map(worker, range(clients), timeout=120))
    assert sum(len(results) for results in outcomes) == clients * rounds
    assert all(value == got for results in outcomes for value, got in results)
    assert len(backends) <= 4


# -- DBD::Pg: server-side prepares, deallocated with SQL DEALLOCATE ---------------------------

# Each client (a forked process with its own connection) prepares statements server-side
# (pg_switch_prepared => 1: from the first execute on), runs them, and lets them go: DBD::Pg
# then sends `DEALLOCATE dbdpg_p<pid>_<n>` as a simple Query, in autocommit and inside a
# transaction, where a failure would abort the transaction.
PERL_SCRIPT = r"""
use strict;
use warnings;
use DBI;

my ($port, $clients, $rounds) = @ARGV;
my @children;
for my $client (1 .. $clients) {
    my $pid = fork();
    die "fork: $!" unless defined $pid;
    if ($pid == 0) {
        my $dbh = DBI->connect(
            "dbi:Pg:dbname=appdb;host=127.0.0.1;port=$port", "app", "app-secret",
            { AutoCommit => 1, RaiseError => 1, PrintError => 0, PrintWarn => 0,
              pg_server_prepare => 1, pg_switch_prepared => 1 },
        );
        for my $round (1 .. $rounds) {
            my $sth = $dbh->prepare("select ?::int + $client");
            for my $value (1 .. 3) {
                $sth->execute($value);
                my ($sum) = $sth->fetchrow_array;
                die "client $client: $sum" unless $sum == $value + $client;
            }
            $sth->finish;
            undef $sth;  # DEALLOCATE, in autocommit
            $dbh->begin_work;
            my $insert = $dbh->prepare("insert into t (v) values (?)");
            $insert->execute("dbdpg-$client-$round");
            undef $insert;  # DEALLOCATE, in the transaction
            my $count = $dbh->prepare("select count(*) from t where v = ?");
            $count->execute("dbdpg-$client-$round");
            my ($rows) = $count->fetchrow_array;
            die "client $client: $rows rows" unless $rows == 1;
            undef $count;
            $dbh->commit;
        }
        $dbh->disconnect;
        exit 0;
    }
    push @children, $pid;
}
my $failed = 0;
for my $pid (@children) {
    waitpid($pid, 0);
    $failed++ if $? != 0;
}
print $failed ? "failed: $failed clients\n" : "success\n";
exit($failed ? 1 : 0);
"""


def test_dbd_pg_deallocates_its_server_side_statements(
    pg: EmbeddedPostgres, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    perl = shutil.which("perl")
    assert perl is not None
    check = subprocess.run([perl, "-MDBD::Pg", "-e", "1"], capture_output=True, text=True)
    assert check.returncode == 0, "DBD::Pg (libdbd-pg-perl) is installed by scripts/bootstrap.sh"
    pg.sql("delete from t where v like 'dbdpg-%'", dbname="appdb")
    proxy = proxy_factory(proxy_config(pg, default_pool_size=3))
    script = tmp_path / "dbdpg.pl"
    script.write_text(PERL_SCRIPT)
    result = subprocess.run(
        [perl, str(script), str(proxy.port), "12", "10"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "success"
    count = pg.sql("select count(*) from t where v like 'dbdpg-%'", dbname="appdb")
    assert count.strip() == "120"
