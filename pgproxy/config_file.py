"""Reading the configuration file: TOML, or a pgbouncer.ini converted on the way."""

from __future__ import annotations

import logging
import tomllib
from typing import Any

from pgproxy import pgbouncer_ini
from pgproxy.config import ConfigError, Settings, settings_from


def load_settings(path: str | None, *, log_overrides: bool = False) -> Settings:
    """Read ``path`` (TOML or pgbouncer.ini; None for defaults only) and ``PGPROXY_*``;
    raise ConfigError. ``log_overrides``: log which settings the environment sets (done
    once, at start)."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, encoding="utf-8", errors="replace") as config_file:
                text = config_file.read()
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        if pgbouncer_ini.is_pgbouncer_ini(text):
            conversion = pgbouncer_ini.convert(path)
            for warning in conversion.warnings:
                logging.getLogger("pgproxy.config").warning("%s", warning)
            data = conversion.data
        else:
            try:
                data = tomllib.loads(text)
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    return settings_from(data, log_overrides=log_overrides)
