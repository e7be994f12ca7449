"""Issue 13's edge cases end to end, under gunicorn with real clients: a proxy on the same
host (every peer is 127.0.0.1), cross-site publishing, DNS rebinding, wildcard origins and
/metrics behind API keys."""

from __future__ import annotations

import json

import pytest
import requests
from rawws import RawClient
from support import wait_for

API_KEY = "proxies-e2e-key-5b1d"


def upgrade(server, headers: dict, path: str = "/ws") -> tuple[int, dict]:
    client = RawClient(server, path=path, headers=headers)
    try:
        body = client.http_body() if client.status != 101 else b""
        return client.status, json.loads(body or b"{}")
    finally:
        client.close()


@pytest.fixture(scope="module")
def behind_nginx(request):
    """Production as deployed behind a proxy on this host, without API keys (the issue's
    set-up): the proxy's address is trusted, a per-address cap of 2."""
    from support import serving

    env = {"WSSERVER_ENV": "production", "WSSERVER_TRUSTED_PROXIES": "127.0.0.1",
           "WSSERVER_MAX_CONNECTIONS_PER_IP": "2"}
    with serving(env=env) as srv:
        yield srv


def test_the_per_address_cap_counts_forwarded_clients_not_the_proxy(behind_nginx):
    one, two = ({"X-Forwarded-For": "203.0.113.1"}, {"X-Forwarded-For": "6.6.6.6, 203.0.113.2"})
    held = [RawClient(behind_nginx, headers=one) for _ in range(2)]
    try:
        assert [c.status for c in held] == [101, 101]
        wait_for(lambda: behind_nginx.health()["clients"] == 2, message="both registered")
        status, body = upgrade(behind_nginx, one)
        assert (status, body["code"]) == (429, "too_many_connections")
        # another client behind the same proxy, whatever it prepended, has its own share
        other = RawClient(behind_nginx, headers=two)
        held.append(other)
        assert other.status == 101
        # a client cannot pick another share by prepending: the rightmost hop is what the
        # proxy saw
        status, _ = upgrade(behind_nginx, {"X-Forwarded-For": "203.0.113.9, 203.0.113.1"})
        assert status == 429
        wait_for(lambda: "refused 203.0.113.1: too_many_connections" in behind_nginx.log(),
                 message="the audit line names the forwarded client")
    finally:
        for c in held:
            c.close()


def test_without_keys_proxied_publishing_is_refused_with_one_warning(behind_nginx):
    for _ in range(3):
        r = requests.post(behind_nginx.url + "/notify", json={"event": "e"}, timeout=5,
                          headers={"X-Forwarded-For": "127.0.0.1"})
        assert r.status_code == 403 and "WSSERVER_API_KEYS" in r.json()["error"]
        rooms = requests.get(behind_nginx.url + "/rooms", timeout=5, headers={"X-Real-IP": "1.2.3.4"})
        assert rooms.status_code == 403 and "WSSERVER_API_KEYS" in rooms.json()["error"]
    assert requests.post(behind_nginx.url + "/notify", json={"event": "local"},
                         timeout=5).status_code == 200, "a local, unproxied publisher still may"
    warnings = [line for line in behind_nginx.log().splitlines()
                if "WARNING" in line and "WSSERVER_API_KEYS" in line]
    assert len(warnings) == 1, warnings


def test_cross_site_publishing_is_refused(make_server):
    """The issue's curl: production, no keys, from loopback, Origin evil.com, text/plain."""
    server = make_server({"WSSERVER_ENV": "production"})
    csrf = requests.post(server.url + "/notify", data='{"event":"csrf"}', timeout=5,
                         headers={"Origin": "https://evil.com", "Content-Type": "text/plain"})
    assert csrf.status_code == 403 and csrf.json()["code"] == "origin_forbidden"
    no_origin = requests.post(server.url + "/notify", data='{"event":"csrf"}', timeout=5,
                              headers={"Content-Type": "text/plain"})
    assert no_origin.status_code == 415 and no_origin.json()["code"] == "unsupported_media_type"
    assert "application/json" in no_origin.json()["error"]
    form = requests.post(server.url + "/notify", data={"event": "csrf"}, timeout=5)
    assert form.status_code == 415
    preflight = requests.options(server.url + "/notify", timeout=5, headers={
        "Origin": "https://evil.com", "Access-Control-Request-Method": "POST"})
    assert preflight.status_code == 403 and "Access-Control-Allow-Origin" not in preflight.headers
    assert server.notify({"event": "fine"}).status_code == 200


def test_dns_rebinding_and_wildcards_with_raw_handshakes(make_server):
    server = make_server({"WSSERVER_ENV": "production",
                          "WSSERVER_ALLOWED_ORIGINS": "https://*.example.com"})
    port = server.port
    refused = [
        {"Origin": "http://evil.com", "Host": "evil.com"},  # rebinding: "same origin"
        {"Origin": f"http://evil.com:{port}", "Host": f"evil.com:{port}"},
        {"Origin": "https://evil.com/.example.com"},  # the raw suffix
        {"Origin": "https://xexample.com"},
        {"Origin": "https://example.com"},
        {"Origin": "http://a.example.com"},
        {"Origin": "https://a.example.com:8443"},
        {"Origin": f"http://127.0.0.1:{port + 1}"},
    ]
    for headers in refused:
        status, body = upgrade(server, headers)
        assert status == 403 and body["code"] in ("origin_forbidden", "invalid_origin"), headers
    allowed = [
        {"Origin": "https://a.example.com"},
        {"Origin": "https://b.a.example.com:443"},
        {"Origin": "https://a.example.com", "Host": "ws.elsewhere.test"},  # listed: any Host
        {"Origin": f"http://127.0.0.1:{port}"},  # same origin at an address
        {"Origin": f"http://localhost:{port}", "Host": f"localhost:{port}"},
        {"Origin": "https://ws.example.com", "Host": "ws.example.com"},  # a listed host
    ]
    for headers in allowed:
        status, _ = upgrade(server, headers)
        assert status == 101, headers
    rebound = requests.post(server.url + "/notify", json={"event": "e"}, timeout=5,
                            headers={"Origin": "http://evil.com", "Host": "evil.com"})
    assert rebound.status_code == 403


def test_metrics_needs_a_key_when_keys_are_set(make_server):
    server = make_server({"WSSERVER_ENV": "production", "WSSERVER_API_KEYS": API_KEY})
    assert requests.get(server.url + "/metrics", timeout=5).status_code == 401
    ok = requests.get(server.url + "/metrics", timeout=5,
                      headers={"Authorization": f"Bearer {API_KEY}"})
    assert ok.status_code == 200 and "wsserver_connections" in ok.text
    public = make_server({"WSSERVER_ENV": "production", "WSSERVER_API_KEYS": API_KEY,
                          "WSSERVER_METRICS_PUBLIC": "on"})
    assert requests.get(public.url + "/metrics", timeout=5).status_code == 200
    assert requests.get(public.url + "/rooms", timeout=5).status_code == 401
