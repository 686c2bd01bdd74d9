"""The HTTP listener: /metrics (Prometheus), /healthz and /readyz.

It runs in the event loop like everything else, so a scrape reads the pools without locks.
h11 parses the requests; one request per connection (Connection: close), bounded in size
and in time, so a slow or hostile HTTP client costs nothing but its socket.
"""

from __future__ import annotations

import asyncio
import json
import logging
from http import HTTPStatus
from typing import TYPE_CHECKING

import h11

from pgproxy.services.admin.gather import METRICS_TEXT, peer_rows, silent_peers
from pgproxy.services.metrics import merge_expositions, registry_for, render

if TYPE_CHECKING:
    from pgproxy.services.control import DaemonView

log = logging.getLogger("pgproxy.http")

REQUEST_TIMEOUT = 10.0  # seconds to send a request
MAX_REQUEST = 16 * 1024
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
JSON_TYPE = "application/json"
REACH_TIMEOUT = 1.0  # seconds for a readiness probe's TCP connect to a database


class MetricsServer:
    """Serves the daemon's metrics and health on ``metrics_addr:metrics_port``."""

    def __init__(self, daemon: DaemonView) -> None:
        self.daemon = daemon
        self.registry = registry_for(daemon)
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        """Bind; raise OSError if the port is taken."""
        settings = self.daemon.settings
        host = None if settings.metrics_addr in ("*", "") else settings.metrics_addr
        self._server = await asyncio.start_server(
            self._serve, host, settings.metrics_port, limit=MAX_REQUEST
        )

    def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST)
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                request = await _read_request(connection, reader)
            if request is None:
                return
            status, content_type, body = await self._answer(request)
        except (TimeoutError, h11.RemoteProtocolError, ConnectionError):
            status, content_type, body = 400, "text/plain", b"bad request\n"
            if connection.our_state is not h11.SEND_RESPONSE:
                writer.close()
                return
        except Exception:
            log.exception("http: internal error")
            status, content_type, body = 500, "text/plain", b"internal error\n"
        headers = [
            ("content-type", content_type),
            ("content-length", str(len(body))),
            ("connection", "close"),
        ]
        try:
            # The reason phrase ("200 OK", "503 Service Unavailable"): h11 leaves it empty,
            # and some probes and people read the status line rather than the code.
            response = h11.Response(
                status_code=status, headers=headers, reason=HTTPStatus(status).phrase
            )
            writer.write(connection.send(response))
            writer.write(connection.send(h11.Data(data=body)) or b"")
            writer.write(connection.send(h11.EndOfMessage()) or b"")
            await writer.drain()
        except (ConnectionError, h11.LocalProtocolError):
            pass
        finally:
            writer.close()

    async def _answer(self, request: h11.Request) -> tuple[int, str, bytes]:
        path = request.target.split(b"?", 1)[0]
        if request.method not in (b"GET", b"HEAD"):
            return 405, "text/plain", b"method not allowed\n"
        if path == b"/metrics":
            worker = self.daemon.worker
            if worker is None:
                return 200, METRICS_TYPE, render(self.registry)
            # workers = N: every worker's figures, as one process would show them.
            port = self.daemon.settings.listen_port
            texts = [render(self.registry).decode()]
            for rows in await peer_rows(worker, f"SHOW {METRICS_TEXT}", port):
                texts.extend(str(row[0]) for row in rows)
            return 200, METRICS_TYPE, merge_expositions(texts)
        if path == b"/healthz":
            return 200, JSON_TYPE, _json({"status": "ok"})
        if path == b"/readyz":
            reasons = await self.daemon.readiness_problems(REACH_TIMEOUT)
            worker = self.daemon.worker
            if worker is not None:  # workers = N: ready when every worker answers too
                port = self.daemon.settings.listen_port
                reasons += [f"worker {index} not answering"
                            for index in await silent_peers(worker, port)]  # fmt: skip
            if reasons:
                return 503, JSON_TYPE, _json({"status": "not ready", "reasons": reasons})
            return 200, JSON_TYPE, _json({"status": "ready"})
        return 404, "text/plain", b"not found\n"


async def _read_request(
    connection: h11.Connection, reader: asyncio.StreamReader
) -> h11.Request | None:
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            data = await reader.read(4096)
            connection.receive_data(data)
            if not data and connection.their_state is h11.IDLE:
                return None  # connected and left without asking anything
            continue
        if isinstance(event, h11.Request):
            return event
        if isinstance(event, h11.ConnectionClosed):
            return None


def _json(value: object) -> bytes:
    return json.dumps(value).encode() + b"\n"
