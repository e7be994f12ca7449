"""wsserver.openness: the development start-up warning lists exactly what a stranger may do,
each item asked of the real access policy, and nothing in production. (Said once per server
by gunicorn's master: tests/test_gunicorn_conf.py; by the real command: e2e/test_cli.py.)"""

from __future__ import annotations

import pytest

from wsserver.config import load_settings
from wsserver.openness import development_warning, is_loopback_host, open_in_development

ALL_OPEN = ("any origin", "POST /notify", "connection token", "rebroadcast on")


def dev(**overrides):
    return load_settings({}, {"env": "development", **overrides})


def test_a_development_server_as_shipped_lists_everything_open():
    found = open_in_development(dev(), [("0.0.0.0", 8080)])
    assert len(found) == 5
    for item, text in zip(found, ALL_OPEN + ("listening on 0.0.0.0:8080",)):
        assert text in item
    assert "forge events to others" in found[3]
    warning = development_warning(dev(), [("0.0.0.0", 8080)])
    assert warning is not None and "\n" not in warning  # one line
    assert warning.startswith("wsserver: development mode") and all(f in warning for f in found)


@pytest.mark.parametrize("overrides, closed", [
    ({"allowed_origins": ("https://app.example.com",)}, "any origin"),
    ({"api_keys": ("k-1",)}, "POST /notify"),
    ({"jwt_secret": "s" * 32}, "connection token"),
    ({"rebroadcast": False}, "rebroadcast on"),
])
def test_each_item_goes_once_its_setting_closes_it(overrides, closed):
    found = open_in_development(dev(**overrides), [("127.0.0.1", 8080)])
    assert len(found) == 3 and not any(closed in item for item in found)


def test_a_wildcard_origin_is_still_any_origin():
    assert "any origin" in open_in_development(dev(allowed_origins=("*",)))[0]


def test_a_development_server_closed_everywhere_says_nothing():
    closed = dev(allowed_origins=("https://app.example.com",), api_keys=("k-1",),
                 jwt_secret="s" * 32, rebroadcast=False)
    assert open_in_development(closed, [("127.0.0.1", 8080), ("::1", 8080)]) == []
    assert development_warning(closed, [("127.0.0.1", 8080)]) is None


def test_production_says_nothing_however_open():
    production = load_settings({}, {"env": "production"})
    assert open_in_development(production, [("0.0.0.0", 8080)]) == []
    assert development_warning(production, [("0.0.0.0", 8080)]) is None


def test_only_network_binds_off_loopback_are_listed():
    binds = [("127.0.0.1", 1), ("::", 2), ("localhost", 3), ("", 4), "/tmp/ws.sock", 5]
    found = open_in_development(dev(), binds)[-1]
    assert found.startswith("listening on [::]:2, :4, not loopback only")


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("[::1]", True),
    ("localhost", True), ("0.0.0.0", False), ("::", False), ("", False), ("192.0.2.1", False),
    ("no-such-host.invalid", False),
])
def test_is_loopback_host(host, loopback):
    assert is_loopback_host(host) is loopback
