"""wsserver.proxies: the client's address behind trusted proxies (rightmost untrusted hop of
X-Forwarded-For, or Forwarded), and only when the TCP peer is one of them."""

from __future__ import annotations

import logging

import pytest

from wsserver import audit
from wsserver.proxies import PEER_ADDR, TrustedProxies, forwarding_headers

PROXIES = TrustedProxies(["127.0.0.1", "10.0.0.0/8", "::1"])


def address(peer: str, **headers: str) -> str:
    environ = {"REMOTE_ADDR": peer}
    environ.update({"HTTP_" + k.upper(): v for k, v in headers.items()})
    return PROXIES.client_address(environ)


@pytest.mark.parametrize("peer,headers,expected", [
    # the direct peer is not a proxy: its headers are its own words
    ("203.0.113.5", {"x_forwarded_for": "1.2.3.4"}, "203.0.113.5"),
    ("203.0.113.5", {"forwarded": "for=1.2.3.4"}, "203.0.113.5"),
    # a trusted peer: the rightmost hop that is not trusted, whatever the client prepended
    ("127.0.0.1", {"x_forwarded_for": "203.0.113.9"}, "203.0.113.9"),
    ("127.0.0.1", {"x_forwarded_for": "6.6.6.6, 203.0.113.9"}, "203.0.113.9"),
    ("127.0.0.1", {"x_forwarded_for": "6.6.6.6, 203.0.113.9, 10.1.1.1"}, "203.0.113.9"),
    ("::1", {"x_forwarded_for": "2001:db8::7"}, "2001:db8::7"),
    ("127.0.0.1", {"x_forwarded_for": "[2001:db8::7]:4711"}, "2001:db8::7"),
    ("127.0.0.1", {"x_forwarded_for": "203.0.113.9:4711"}, "203.0.113.9"),
    ("127.0.0.1", {"x_forwarded_for": "::ffff:203.0.113.9"}, "203.0.113.9"),
    # every hop trusted: the leftmost
    ("127.0.0.1", {"x_forwarded_for": "10.0.0.2, 10.0.0.3"}, "10.0.0.2"),
    # junk ends the walk at the last address read (never the junk, never further left)
    ("127.0.0.1", {"x_forwarded_for": "1.2.3.4, junk, 10.0.0.3"}, "10.0.0.3"),
    ("127.0.0.1", {"x_forwarded_for": "1.2.3.4,,"}, "127.0.0.1"),
    ("127.0.0.1", {"x_forwarded_for": "unknown"}, "127.0.0.1"),
    # Forwarded (RFC 7239) when there is no X-Forwarded-For
    ("127.0.0.1", {"forwarded": 'for=6.6.6.6, for="[2001:db8::7]:80";proto=https'},
     "2001:db8::7"),
    ("127.0.0.1", {"forwarded": "For=203.0.113.9;by=10.0.0.1"}, "203.0.113.9"),
    ("127.0.0.1", {"forwarded": "for=_hidden"}, "127.0.0.1"),
    ("127.0.0.1", {"forwarded": "proto=https"}, "127.0.0.1"),
    ("127.0.0.1", {"x_forwarded_for": "203.0.113.9", "forwarded": "for=6.6.6.6"}, "203.0.113.9"),
    # X-Real-IP is not read (a proxy writes it whole; a client can too)
    ("127.0.0.1", {"x_real_ip": "6.6.6.6"}, "127.0.0.1"),
    ("127.0.0.1", {}, "127.0.0.1"),
])
def test_the_client_is_the_rightmost_untrusted_hop_behind_a_trusted_peer(peer, headers, expected):
    assert address(peer, **headers) == expected


def test_no_trusted_proxies_means_the_peer_always():
    none = TrustedProxies([])
    assert not none
    assert none.client_address({"REMOTE_ADDR": "127.0.0.1", "HTTP_X_FORWARDED_FOR": "1.2.3.4"}) \
        == "127.0.0.1"


def test_forwarding_headers_are_named():
    assert forwarding_headers({"HTTP_X_REAL_IP": "", "HTTP_FORWARDED": "x"}) == [
        "X-Real-IP", "Forwarded"]
    assert forwarding_headers({"HTTP_HOST": "x"}) == []


UPGRADE = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
           "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}


def test_the_app_reads_one_client_address_everywhere(make_app, caplog, monkeypatch):
    """The audit line and the publisher rule see the forwarded address; the peer is kept."""
    monkeypatch.setattr(audit, "_LIMITER", audit.LogLimiter())
    app = make_app(env="production", trusted_proxies=("127.0.0.1",),
                   allowed_origins=("https://app.example",))
    seen = {}

    @app.get("/_peer")
    def _peer():
        from flask import request
        seen.update(remote=request.remote_addr, peer=request.environ[PEER_ADDR])
        return "ok"

    client = app.test_client()
    client.get("/_peer", headers={"X-Forwarded-For": "6.6.6.6, 203.0.113.9"})
    assert seen == {"remote": "203.0.113.9", "peer": "127.0.0.1"}
    with caplog.at_level(logging.INFO, logger="wsserver.audit"):
        resp = client.get("/ws", headers={**UPGRADE, "Origin": "https://evil.example",
                                          "X-Forwarded-For": "203.0.113.9"})
    assert resp.status_code == 403
    assert any("refused 203.0.113.9: origin_forbidden" in r.getMessage() for r in caplog.records)
