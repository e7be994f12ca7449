"""wsserver.config: defaults, then ``WSSERVER_*`` variables, then typed overrides; a bad value
names its variable; secrets never printed; the WebSocket budget is what the threads allow."""

from __future__ import annotations

import pytest

from wsserver.config import SettingsError, load_settings


def test_defaults_variables_then_overrides():
    default = load_settings({})
    assert default.env == "production" and default.rebroadcast is False
    env = load_settings({"WSSERVER_QUEUE_SIZE": "77", "WSSERVER_ENV": "development"})
    assert env.queue_size == 77 and env.rebroadcast is True  # development's default
    both = load_settings({"WSSERVER_QUEUE_SIZE": "77"}, {"queue_size": 5, "rebroadcast": None})
    assert both.queue_size == 5  # an override beats the variable; None means "not given"
    assert load_settings({"WSSERVER_QUEUE_SIZE": "  "}).queue_size == default.queue_size


@pytest.mark.parametrize("name, value", [
    ("WSSERVER_QUEUE_SIZE", "many"),
    ("WSSERVER_PORT", "-1"),
    ("WSSERVER_ENV", "staging"),
])
def test_a_bad_value_names_its_variable(name, value):
    with pytest.raises(SettingsError) as refused:
        load_settings({name: value})
    assert name in str(refused.value)


def test_an_unknown_override_is_refused():
    with pytest.raises(SettingsError, match="unknown setting 'queue'"):
        load_settings({}, {"queue": 1})


def test_public_items_mask_secrets():
    settings = load_settings({"WSSERVER_API_KEYS": "sk-a-1,sk-b-2",
                              "WSSERVER_JWT_SECRET": "jwt-secret-0123456789abcdef0123"})
    shown = dict(settings.public_items())
    assert shown["WSSERVER_API_KEYS"] == "(2 set, hidden)"
    assert shown["WSSERVER_JWT_SECRET"] == "(set, hidden)"
    assert "sk-a-1" not in repr(shown) and "jwt-secret" not in repr(shown)
    assert settings.api_keys == ("sk-a-1", "sk-b-2")  # the values themselves are kept


def test_the_connection_budget_is_the_threads_left_after_http():
    settings = load_settings({"WSSERVER_THREADS": "64", "WSSERVER_HTTP_THREADS": "8"})
    assert settings.connection_budget == 56
    capped = load_settings({"WSSERVER_THREADS": "64", "WSSERVER_HTTP_THREADS": "8",
                            "WSSERVER_MAX_CONNECTIONS": "10"})
    assert capped.connection_budget == 10
