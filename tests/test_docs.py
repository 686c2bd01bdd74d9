"""The README's configuration reference and the example config stay true to the model."""

from __future__ import annotations

from pathlib import Path

from pgproxy.config import DatabaseConfig, Settings, UserConfig
from pgproxy.config_file import load_settings

ROOT = Path(__file__).resolve().parent.parent


def _documented_keys() -> set[str]:
    keys = set()
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("| `"):
            keys.add(line.split("`")[1])
    return keys


def test_every_setting_is_in_the_readme_reference() -> None:
    expected = set(Settings.model_fields)
    expected |= {f"databases.NAME.{name}" for name in DatabaseConfig.model_fields}
    expected |= {f"users.NAME.{name}" for name in UserConfig.model_fields}
    documented = _documented_keys()
    assert expected <= documented, sorted(expected - documented)


def test_example_config_is_valid() -> None:
    settings = load_settings(str(ROOT / "config" / "pgproxy.toml"))
    appdb = settings.databases["appdb"]
    assert appdb.password is not None and appdb.password.get_secret_value() == "change-me"
    assert settings.pool_mode_for(appdb, "reporting") == "session"
    assert settings.pool_mode_for(appdb, "someone") == "transaction"
