"""LoginSettings: what logins derive from a startup packet, kept for the next client that
sends the same bytes."""

from __future__ import annotations

import pytest

from pgproxy.config import Settings
from pgproxy.core import params as tracked
from pgproxy.core.client import _KEPT_STARTUPS, LoginSettings
from pgproxy.protocol.messages import startup_message
from pgproxy.protocol.startup import StartupMessage, parse_startup


def login_settings(**values: object) -> LoginSettings:
    return LoginSettings(Settings.model_validate(values), frozenset({"pgbouncer"}))


def parsed(params: dict[str, str]) -> StartupMessage:
    result = parse_startup(startup_message(params))
    assert result is not None and isinstance(result[0], StartupMessage)
    return result[0]


def test_settings_of_a_packet_are_derived_once() -> None:
    settings = login_settings()
    startup = parsed({"user": "u", "database": "d", "application_name": "app"})
    first = settings.settings_of(startup)
    assert first == {"application_name": "app"}
    same = parsed({"user": "u", "database": "d", "application_name": "app"})
    assert settings.settings_of(same) is first
    # A packet not parsed from bytes (no key) is derived each time, and kept under none.
    loose = StartupMessage(0, dict(startup.params))
    assert settings.settings_of(loose) == first
    assert settings.settings_of(loose) is not first


def test_a_refused_parameter_is_refused_every_time() -> None:
    settings = login_settings()
    startup = parsed({"user": "u", "search_path": "x"})
    for _ in range(2):
        with pytest.raises(tracked.UnsupportedParameter):
            settings.settings_of(startup)
    # Ignored in another configuration (a new LoginSettings, as each reload makes).
    assert login_settings(ignore_startup_parameters=["search_path"]).settings_of(startup) == {}


def test_params_of_follow_the_pools_welcome_values() -> None:
    settings = login_settings()
    startup = parsed({"user": "u", "application_name": "app"})
    chosen = settings.settings_of(startup)
    welcome = tracked.from_pairs({"client_encoding": "UTF8", "TimeZone": "UTC"})
    values = settings.params_of(startup.key, chosen, welcome)
    assert values == tracked.from_pairs(chosen, welcome)
    assert settings.params_of(startup.key, chosen, welcome) is values
    # The pool learned other values from its server: made again from those.
    relearned = tracked.from_pairs({"client_encoding": "UTF8", "TimeZone": "Europe/Paris"})
    again = settings.params_of(startup.key, chosen, relearned)
    assert again == tracked.from_pairs(chosen, relearned) != values


def test_kept_packets_are_bounded() -> None:
    settings = login_settings()
    welcome = tracked.from_pairs({"client_encoding": "UTF8"})
    for number in range(_KEPT_STARTUPS + 10):
        startup = parsed({"user": f"u{number}", "application_name": f"a{number}"})
        chosen = settings.settings_of(startup)
        settings.params_of(startup.key, chosen, welcome)
        assert len(settings._settings_by_key) <= _KEPT_STARTUPS
        assert len(settings._params_by_key) <= _KEPT_STARTUPS
