"""Origins and Host names compared as parsed (wsserver.origins): default ports, whole-label
wildcards, and the Host check that stops DNS rebinding when an allow-list is configured."""

from __future__ import annotations

import pytest

from wsserver.config import SettingsError, load_settings
from wsserver.origins import Origin, OriginRules, parse_host, parse_origin, parse_pattern


def rules(allowed: str = "", development: bool = False, host: str = "0.0.0.0") -> OriginRules:
    return OriginRules(tuple(a for a in allowed.split(",") if a), development, host)


def test_origins_are_parsed_with_the_schemes_default_port():
    assert parse_origin("https://A.com") == parse_origin("https://a.com:443/") == Origin(
        "https", "a.com", 443
    )
    assert parse_origin("http://a.com") == Origin("http", "a.com", 80)
    assert parse_origin("http://a.com.") == Origin("http", "a.com", 80)
    assert parse_origin("https://[::1]:8443") == Origin("https", "::1", 8443)
    assert parse_origin("chrome-extension://abc") == Origin("chrome-extension", "abc", None)
    for bad in ("null", "https://evil.com/.example.com", "https://evil.com%2f.example.com",
                "https://a@b.com", "https://a.com?x", "https://a.com:99999", "https://a..com",
                "//a.com", "https://"):
        assert parse_origin(bad) is None, bad
    assert parse_host("a.com") == ("a.com", None)
    assert parse_host("[::1]:8080") == ("::1", 8080)
    for bad in (None, "", "a.com/x", "a@b", "a.com:99999", "[::1"):
        assert parse_host(bad) is None, bad


def test_listed_origins_match_with_or_without_the_default_port():
    r = rules("https://a.com,http://b.com:8080")
    for origin in ("https://a.com", "https://a.com:443", "HTTPS://A.COM/", "http://b.com:8080"):
        assert r.allowed(origin, "ws.a.com") and r.cors_origin(origin) == origin, origin
    for origin in ("http://a.com", "https://a.com:8443", "http://b.com", "https://b.com:8080"):
        assert not r.allowed(origin, "ws.a.com") and r.cors_origin(origin) is None, origin
    assert rules("https://a.com:443").allowed("https://a.com", "x")


@pytest.mark.parametrize("origin,ok", [
    ("https://a.example.com", True),
    ("https://b.a.example.com", True),
    ("https://a.example.com:443", True),
    ("https://example.com", False),  # the wildcard needs a label before the suffix
    ("https://xexample.com", False),
    ("https://evil.com/.example.com", False),
    ("https://evil.com?.example.com", False),
    ("https://evil.com#.example.com", False),
    ("https://evil.com%2f.example.com", False),
    ("https://a.example.com.evil.com", False),
    ("http://a.example.com", False),  # scheme matters
    ("https://a.example.com:8443", False),  # so does the port
])
def test_a_wildcard_matches_whole_labels_only(origin, ok):
    r = rules("https://*.example.com")
    assert r.allowed(origin, "127.0.0.1:8080") is ok
    assert (r.cors_origin(origin) == origin) is ok


@pytest.mark.parametrize("entry", ["https://*evil.example.com", "https://a.*.example.com",
                                   "https://*", "https://evil.com/.example.com", "example.com",
                                   "https://a.com:99999"])
def test_allow_list_entries_that_are_not_origins_stop_the_start(entry):
    assert parse_pattern(entry) is None
    with pytest.raises(SettingsError, match="not an origin"):
        load_settings({"WSSERVER_ALLOWED_ORIGINS": entry})


def test_same_origin_compares_ports_even_when_host_has_none():
    r = rules()  # production, no allow-list: same origin only
    assert r.allowed("https://ws.example.com", "ws.example.com")
    assert r.allowed("http://ws.example.com", "ws.example.com")
    assert r.allowed("https://ws.example.com:443", "ws.example.com")
    assert r.allowed("http://ws.example.com:8080", "ws.example.com:8080")
    assert r.allowed("https://ws.example.com:8080", "ws.example.com:8080")  # TLS at a proxy
    assert not r.allowed("https://ws.example.com:8443", "ws.example.com")  # any port passed
    assert not r.allowed("http://ws.example.com:8080", "ws.example.com")
    assert not r.allowed("ftp://ws.example.com", "ws.example.com")
    assert not r.allowed("https://ws.example.com", None)


def test_with_an_allow_list_host_must_be_one_of_the_servers_names():
    """DNS rebinding: the page's name points at this server, so Origin and Host agree."""
    r = rules("https://app.example.com,https://*.example.org", host="ws.internal")
    assert not r.allowed("http://evil.com", "evil.com")
    assert not r.allowed("http://evil.com:8080", "evil.com:8080")
    assert r.allowed("https://a.example.org", "a.example.org")  # a listed host
    assert r.allowed("http://localhost:8080", "localhost:8080")
    assert r.allowed("http://127.0.0.1:8080", "127.0.0.1:8080")  # no rebinding to an address
    assert r.allowed("http://[::1]:8080", "[::1]:8080")
    assert r.allowed("http://ws.internal:8080", "ws.internal:8080")  # WSSERVER_HOST
    # a listed origin is the operator's page, never an attacker's: any Host goes
    assert r.allowed("https://app.example.com", "ws.example.com")
    assert r.host_header_known("x.example.org:443") and not r.host_header_known("evil.com")
    assert not r.host_header_known("evil.com/x")


def test_development_without_a_list_allows_any_origin_and_any_host():
    r = rules(development=True)
    assert r.allowed("http://evil.com", "evil.com") and r.allowed("null", "x")
    assert r.cors_origin("http://evil.com") == "http://evil.com"
    assert not r.allowed("http://[::1", "x")
    # with a list, development applies it as production does
    listed = rules("https://app.example.com", development=True)
    assert not listed.allowed("http://evil.com", "evil.com")
    assert listed.allowed("https://app.example.com", "evil.com")
