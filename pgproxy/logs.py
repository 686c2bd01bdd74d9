"""Log output: PgBouncer-like text lines, or one JSON object per line (log_format = json)."""

from __future__ import annotations

import json
import logging
import re
import time

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Control characters (C0, DEL, C1) and the Unicode line breaks: a client's user name,
# database or application_name holding one must not start a forged log line. Also the
# bytes of such a name that were not UTF-8 (surrogate escapes, protocol/startup.py), which
# a log file cannot hold: written as \xNN, the byte the client sent.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\udc80-\udcff]")


def _escape_char(match: re.Match[str]) -> str:
    code = ord(match.group())
    if code < 0x100:
        return f"\\x{code:02x}"
    if 0xDC80 <= code <= 0xDCFF:
        return f"\\x{code - 0xDC00:02x}"
    return f"\\u{code:04x}"


def escape_controls(text: str) -> str:
    """``text`` with every control character written as a backslash escape."""
    return _CONTROL.sub(_escape_char, text) if _CONTROL.search(text) else text


class EscapeControls(logging.Filter):
    """Writes each record's message with control characters escaped (one record is one
    line; a traceback is added by the formatter afterwards and stays as it is)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        escaped = escape_controls(message)
        if escaped is not message:
            record.msg = escaped
            record.args = None
        return True


class JsonFormatter(logging.Formatter):
    """``{"time", "level", "logger", "message"}`` (plus ``exception``) per record."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure(
    verbosity: int, log_format: str = "text", logfile: str | None = None, quiet: bool = False
) -> None:
    """Log at INFO (PgBouncer's LOG: routine operations, logins, disconnections, stats;
    problems at WARNING and above), pgproxy's own DEBUG detail too with -v (the life of
    each server connection, the console's sessions), and every library's DEBUG with -vv;
    as text or JSON, to stderr (unless ``quiet``, PgBouncer's -q) and to ``logfile`` if
    set. Called again on reload, which reopens the file (after a rotation, as
    PgBouncer's HUP does)."""
    formatter = JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    handlers: list[logging.Handler] = [] if quiet else [logging.StreamHandler()]
    if logfile:
        handlers.append(logging.FileHandler(logfile, encoding="utf-8"))
    for handler in handlers:
        handler.setFormatter(formatter)
        handler.addFilter(_ESCAPE)
    if not handlers:
        handlers.append(logging.NullHandler())  # (else logging's last resort is stderr)
    root = logging.getLogger()
    held: list[logging.LogRecord] = []
    for old in root.handlers:
        if isinstance(old, _Holding):
            held.extend(old.records)
        if old not in handlers:
            old.close()
    root.handlers[:] = handlers
    _current.update(verbosity=verbosity, quiet=quiet)
    root_level, own_level = _apply_levels()
    for record in held:  # what was logged before the destination was known
        own = record.name == "pgproxy" or record.name.startswith("pgproxy.")
        if record.levelno >= (own_level if own else root_level):
            root.handle(record)


_ESCAPE = EscapeControls()


class _Holding(logging.Handler):
    """Keeps records until ``configure`` knows where logs go (the config names the file)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def hold() -> None:
    """Keep what is logged (at any level) until the next ``configure``."""
    root = logging.getLogger()
    root.handlers[:] = [_Holding()]
    root.setLevel(logging.DEBUG)
    logging.getLogger("pgproxy").setLevel(logging.NOTSET)


_current: dict[str, int | bool] = {"verbosity": 0, "quiet": False, "setting": 0}


def _apply_levels() -> tuple[int, int]:
    """Set the root logger's level (the libraries') and pgproxy's from the command line's
    -v count and the ``verbose`` setting, the larger of the two: 0 INFO, 1 pgproxy's DEBUG,
    2 everyone's. Returns (root level, pgproxy's level)."""
    verbosity = max(int(_current["verbosity"]), int(_current["setting"]))
    root_level = logging.DEBUG if verbosity >= 2 else logging.INFO
    own_level = logging.DEBUG if verbosity >= 1 else logging.INFO
    logging.getLogger().setLevel(root_level)
    logging.getLogger("pgproxy").setLevel(own_level)
    return root_level, own_level


def set_verbose(setting: int) -> None:
    """The ``verbose`` setting (file, SET verbose): on top of the command line's -v."""
    _current["setting"] = setting
    root = logging.getLogger()
    if not any(isinstance(handler, _Holding) for handler in root.handlers):
        _apply_levels()


def reopen(log_format: str, logfile: str | None) -> None:
    """Reload: the same verbosity and stderr choice, the (re)opened ``logfile``."""
    configure(int(_current["verbosity"]), log_format, logfile, bool(_current["quiet"]))
