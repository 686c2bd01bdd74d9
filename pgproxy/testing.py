"""In-memory transports: the pooling core driven without sockets or PostgreSQL.

``bench/hotpath.py`` times the real ``ClientConn``, ``ServerConn`` and ``Pool`` over
``CountingTransport`` (it only counts writes, so the figure is pgproxy's own time), and the
in-process tests of the pool (``tests/test_pool.py``) use ``MemoryTransport``, which keeps
what was written and whether reading is paused or the connection closed, so that a test
can check which bytes reached which peer.
"""

from __future__ import annotations

import asyncio


class CountingTransport(asyncio.Transport):
    """Counts writes and nothing more; flow control is never asked for (the benchmark)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes += 1

    def pause_reading(self) -> None:
        raise AssertionError("no back-pressure expected")

    def resume_reading(self) -> None:
        raise AssertionError("no back-pressure expected")

    def is_closing(self) -> bool:
        return False


class MemoryTransport(asyncio.Transport):
    """A transport that keeps everything written to it, for tests to read back.

    ``close`` reports the loss to ``protocol`` (when one is attached) on the next loop
    iteration, as a socket transport does.
    """

    def __init__(self, peername: tuple[str, int] = ("127.0.0.1", 40000)) -> None:
        super().__init__()
        self.written = bytearray()
        self.paused = False
        self.closed = False
        self.eof_written = False
        self.protocol: asyncio.BaseProtocol | None = None
        self._peername = peername

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def take(self) -> bytes:
        """What was written since the last ``take``."""
        out = bytes(self.written)
        self.written.clear()
        return out

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def is_reading(self) -> bool:
        return not self.paused

    def is_closing(self) -> bool:
        return self.closed

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof_written = True

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.protocol is not None:
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    def abort(self) -> None:
        self.close()

    def get_extra_info(self, name: str, default: object = None) -> object:
        if name == "peername":
            return self._peername
        if name == "sockname":
            return ("127.0.0.1", 6432)
        return default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0
