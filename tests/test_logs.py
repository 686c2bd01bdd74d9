"""Log levels: INFO by default, pgproxy's own DEBUG with -v, every library's with -vv."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from pgproxy import logs


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    own_level = logging.getLogger("pgproxy").level
    yield
    logs.set_verbose(0)
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger("pgproxy").setLevel(own_level)


def _written(tmp_path: Path, verbosity: int, setting: int = 0) -> str:
    logfile = tmp_path / f"v{verbosity}-{setting}.log"
    logs.hold()
    logging.getLogger("pgproxy.server").debug("held own debug")
    logs.configure(verbosity, logfile=str(logfile), quiet=True)
    logs.set_verbose(setting)
    logging.getLogger("pgproxy.pool").info("own info")
    logging.getLogger("pgproxy.server").debug("own debug")
    logging.getLogger("a_library").debug("library debug")
    logging.getLogger("a_library").warning("library warning")
    for handler in logging.getLogger().handlers:
        handler.flush()
    return logfile.read_text()


@pytest.mark.usefixtures("restore_logging")
def test_levels_by_verbosity(tmp_path: Path) -> None:
    quiet = _written(tmp_path, 0)
    assert "own info" in quiet and "library warning" in quiet
    assert "own debug" not in quiet and "library debug" not in quiet
    one = _written(tmp_path, 1)
    assert "own debug" in one and "held own debug" in one and "library debug" not in one
    two = _written(tmp_path, 2)
    assert "own debug" in two and "library debug" in two
    by_setting = _written(tmp_path, 0, setting=1)  # the verbose setting (SET verbose)
    assert "own debug" in by_setting and "library debug" not in by_setting
