"""Instructions per transaction, counted by callgrind: pgproxy or the zero-logic relay
under pgbench, and where they go.

    .venv/bin/python bench/instructions.py [--scenario select16] [--targets pgproxy,relay]
                                           [--transactions N] [--top K] [--cache]

On a shared machine timings move by ±5% from run to run; instruction counts barely move,
so they tell whether a change to the code made a transaction cheaper. For each target
(pgproxy as compiled in .venv-compiled, or bench/relay.py on the same interpreter) this
starts it under ``valgrind --tool=callgrind`` with instrumentation off, warms it up with a
short pgbench run, switches instrumentation on (``callgrind_control -i on``), runs pgbench
``-t N`` with the scenario's options (bench/run.py's scenarios), switches it off and
stops the target. It prints the user-space instructions per transaction (system calls
are not counted: every target makes the same ones, as ``strace -c`` shows), less those of
server logins run in the window (a server opened in the background is the pool's cost,
not the transaction's), and the functions with the most instructions per transaction,
their callees' included. Valgrind runs the target about fifty times slower, so a run of
500 transactions per client takes a minute or two. With ``--cache``, callgrind also
simulates the caches and the L1 misses per transaction are printed: where two targets
run about as many instructions, their misses (about ten cycles each) tell them apart.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Final

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.run import (  # noqa: E402
    COMPILED_PYTHON,
    DB_NAME,
    DB_PASSWORD,
    DB_USER,
    SCALE,
    SCENARIO_BY_NAME,
    PgProxy,
    Pooler,
    Relay,
    base_env,
    workdir,
)
from pgproxy.embedded import EmbeddedPostgres  # noqa: E402

# A server login's instructions (the SCRAM key derivation most of all), left out: see above.
SERVER_LOGIN: Final = "CPyDef_server___login_ServerConn_gen_____mypyc_generator_helper__"
WARM_UP_TRANSACTIONS: Final = 20
START_TIMEOUT: Final = 120.0  # seconds: valgrind starts Python slowly


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", default="select16", choices=sorted(SCENARIO_BY_NAME))
    parser.add_argument("--targets", default="pgproxy,relay")
    parser.add_argument(
        "--transactions", type=int, default=500, help="pgbench -t: per client (default 500)"
    )
    parser.add_argument("--top", type=int, default=25, help="functions to list per target")
    parser.add_argument(
        "--cache", action="store_true",
        help="simulate the caches too (--cache-sim=yes) and print L1 misses per transaction",
    )  # fmt: skip
    return parser.parse_args()


def inclusive_costs(out_file: Path, event: str = "Ir") -> tuple[int, dict[str, int]]:
    """The total and, per function, the inclusive cost in ``event`` (Ir: instructions) of
    a callgrind output."""
    annotated = subprocess.run(
        ["callgrind_annotate", "--inclusive=yes", "--threshold=100", f"--show={event}",
         f"--sort={event}", str(out_file)],
        capture_output=True, text=True, check=True, timeout=300,
    ).stdout  # fmt: skip
    total = 0
    costs: dict[str, int] = {}
    for line in annotated.splitlines():
        found = re.match(r"\s*([\d,]+) \([\s\d.]+%\)\s+(.+)$", line)
        if found is None:
            continue
        count = int(found.group(1).replace(",", ""))
        where = found.group(2)
        if where.startswith("PROGRAM TOTALS"):
            total = count
            continue
        # "file:function [object]": the function's name, whatever its file.
        function = where.split(" [", 1)[0].rsplit(":", 1)[-1]
        costs[function] = max(costs.get(function, 0), count)
    return total, costs


def measure(target: Pooler, pg: EmbeddedPostgres, args: argparse.Namespace, out_file: Path) -> int:
    """Run the target under callgrind through the pgbench runs; the transactions counted."""
    scenario = SCENARIO_BY_NAME[args.scenario]
    env = {**base_env(pg.bindir), "PGPASSWORD": DB_PASSWORD}
    valgrind = [
        "valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out_file}",
        *(["--cache-sim=yes"] if args.cache else []),
    ]  # fmt: skip
    target.start_under(valgrind, START_TIMEOUT)
    assert target.proc is not None
    pid = target.proc.pid  # (valgrind runs the target in its own process)
    pgbench = [
        os.path.join(pg.bindir, "pgbench"), "-h", "127.0.0.1", "-p", str(target.port),
        "-U", DB_USER, "-n", *scenario.args,
    ]  # fmt: skip

    def bench(transactions: int) -> str:
        done = subprocess.run(
            [*pgbench, "-t", str(transactions), DB_NAME],
            env=env, capture_output=True, text=True, timeout=3600, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"pgbench failed:\n{done.stdout}\n{done.stderr}")
        return done.stdout

    def instrument(state: str) -> None:
        subprocess.run(
            ["callgrind_control", "-i", state, str(pid)],
            capture_output=True, timeout=60, check=True,
        )  # fmt: skip

    try:
        bench(WARM_UP_TRANSACTIONS)
        instrument("on")
        report = bench(args.transactions)
        instrument("off")
    finally:
        target.stop()  # (callgrind writes its output as the process exits)
    processed = re.search(r"actually processed: (\d+)", report)
    if processed is None:
        raise RuntimeError(f"no transaction count in pgbench's report:\n{report}")
    return int(processed.group(1))


def main() -> int:
    args = parse_args()
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("valgrind (with callgrind_control) is not installed", file=sys.stderr)
        return 2
    python = str(COMPILED_PYTHON)
    pg = EmbeddedPostgres(extra_conf={"max_connections": "200"})
    with workdir() as tmp, pg:
        pg.create_role(DB_USER, DB_PASSWORD)
        pg.create_database(DB_NAME, DB_USER)
        subprocess.run(
            [os.path.join(pg.bindir, "pgbench"), "-i", "-s", str(SCALE), "-q", "-h", "127.0.0.1",
             "-p", str(pg.port), "-U", DB_USER, DB_NAME],
            env={**base_env(pg.bindir), "PGPASSWORD": DB_PASSWORD},
            capture_output=True, timeout=600, check=True,
        )  # fmt: skip
        print(f"## {args.scenario}: instructions per transaction (callgrind, user space)\n")
        for name in args.targets.split(","):
            target: Pooler
            if name == "pgproxy":
                target = PgProxy(python, tmp, pg.port)
            elif name == "relay":
                target = Relay(python, tmp, pg.port, 1)
            else:
                print(f"unknown target {name!r}: pgproxy or relay", file=sys.stderr)
                return 2
            out_file = tmp / f"callgrind-{name}.out"
            transactions = measure(target, pg, args, out_file)
            total, costs = inclusive_costs(out_file)
            logins = costs.get(SERVER_LOGIN, 0)
            print(f"### {name}: {(total - logins) / transactions:,.0f} per transaction")
            print(f"({transactions} transactions; server logins left out: {logins:,})\n")
            if args.cache:
                print(cache_line(out_file, transactions) + "\n")
            if name == "pgproxy":
                print(function_table(costs, transactions, args.top))
    return 0


# Callgrind's simulated L1 misses: instruction fetches, data reads, data writes.
CACHE_EVENTS: Final = (("I1mr", "instruction"), ("D1mr", "data read"), ("D1mw", "data write"))


def cache_line(out_file: Path, transactions: int) -> str:
    """L1 misses per transaction (callgrind's simulated caches; server logins left out).
    An L1 miss served from L2 costs about ten cycles: where two targets run as many
    instructions, their misses tell them apart."""
    parts = []
    for event, label in CACHE_EVENTS:
        total, costs = inclusive_costs(out_file, event)
        parts.append(f"{label} {(total - costs.get(SERVER_LOGIN, 0)) / transactions:,.0f}")
    return "L1 misses per transaction: " + ", ".join(parts)


def function_table(costs: dict[str, int], transactions: int, top: int) -> str:
    """pgproxy's compiled functions with the most instructions per transaction, their
    callees' included (the relay's are interpreted: callgrind sees only the interpreter)."""
    lines = ["| per transaction | function (callees included) |", "|--:|:--|"]
    compiled = [(count, name) for name, count in costs.items() if name.startswith("CPyDef_")]
    for count, name in sorted(compiled, reverse=True)[:top]:
        # CPyDef_module___Class___method -> module.Class.method
        readable = name.removeprefix("CPyDef_").replace("___", ".")
        lines.append(f"| {count / transactions:,.0f} | `{readable}` |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
