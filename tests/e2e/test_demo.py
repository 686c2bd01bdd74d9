"""The README's demo command starts, answers a query and removes everything on Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

from pgproxy.embedded import free_port
from tests.support import psql


def test_demo_answers_a_query_and_cleans_up() -> None:
    port = free_port()
    demo = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pgproxy.demo",
            "--port",
            str(port),
            "--metrics-port",
            str(free_port()),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output: list[str] = []
    try:
        assert demo.stdout is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = demo.stdout.readline()
            if not line:
                break
            output.append(line)
            if "listening on" in line:
                break
        text = "".join(output)
        assert f"-p {port} -U demo demo" in text, text
        result = psql(
            ["-A", "-t", "-c", "select current_user"], port=port, dbname="demo", user="demo"
        )
        # (On failure: whether the demo is still running, and what it printed so far.)
        assert result.returncode == 0, f"{result.stderr}demo exit: {demo.poll()}\n{text}"
        assert result.stdout.strip() == "demo"
        console = psql(["-A", "-t", "-c", "SHOW STATE"], port=port, dbname="pgbouncer", user="demo")
        assert console.returncode == 0, console.stderr
        assert "paused|no" in console.stdout
    finally:
        demo.send_signal(signal.SIGINT)
        rest, _ = demo.communicate(timeout=30)
    text = "".join(output) + rest
    assert demo.returncode == 0, text
    assert "PostgreSQL removed" in text
    data_dir = re.search(r"data in (\S+)\)", text)
    assert data_dir is not None
    assert not os.path.exists(data_dir.group(1))
