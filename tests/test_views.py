"""wsserver.views: health, probes, /metrics and /rooms through Flask's test client (the whole
WSGI stack, no sockets); the publisher check on /rooms and CORS for allowed origins only."""

from __future__ import annotations

import os

import pytest
from prometheus_client.parser import text_string_to_metric_families

API_KEY = "views-test-key-41c9"


def test_health_keeps_the_original_shape_plus_totals(client):
    resp = client.get("/")
    assert resp.status_code == 200
    body = resp.get_json()
    assert body["status"] == "ok" and body["service"] == "ws"
    assert (body["clients"], body["rooms"], body["subscriptions"], body["queue"]) == (0, 0, 0, 0)
    assert body["accepting"] is True and body["capacity"] > 0
    assert body["pid"] == os.getpid()
    assert body["broker"] == {"kind": "memory", "connected": True}


def test_probes_before_and_after_the_service_runs(client, app):
    assert client.get("/healthz").get_json() == {"status": "ok"}
    assert client.get("/readyz").get_json() == {"status": "ready", "accepting": True,
                                                "broker": True}
    app.extensions["wsserver"].ensure_started()  # the delivery threads now run
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200


def test_readyz_is_503_once_shutdown_stops_accepting(client, app):
    app.extensions["wsserver"].shutdown()
    resp = client.get("/readyz")
    assert resp.status_code == 503
    assert resp.get_json()["status"] == "not_ready" and resp.get_json()["accepting"] is False
    assert client.get("/").get_json()["accepting"] is False


def test_metrics_is_prometheus_text(client):
    resp = client.get("/metrics")
    assert resp.status_code == 200 and resp.mimetype == "text/plain"
    names = {family.name for family in text_string_to_metric_families(resp.get_data(True))}
    assert {"wsserver_connections", "wsserver_deliveries", "wsserver_refusals"} <= names


def test_rooms_lists_nothing_before_anyone_joins(client):
    assert client.get("/rooms").get_json() == {"rooms": [], "count": 0}


@pytest.fixture
def keyed(make_app):
    return make_app(env="production", api_keys=(API_KEY,)).test_client()


def test_rooms_needs_a_publisher_when_keys_are_set(keyed):
    refused = keyed.get("/rooms")
    assert refused.status_code == 401 and refused.get_json()["code"] == "missing_api_key"
    wrong = keyed.get("/rooms", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code in (401, 403)
    ok = keyed.get("/rooms", headers={"Authorization": f"Bearer {API_KEY}"})
    assert ok.status_code == 200 and ok.get_json()["count"] == 0
    assert keyed.get("/").status_code == 200  # health stays open


def test_cors_headers_for_allowed_origins_only(make_app):
    client = make_app(env="production", allowed_origins=("https://app.example",)).test_client()
    allowed = client.get("/", headers={"Origin": "https://app.example"})
    assert allowed.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert "Origin" in allowed.headers["Vary"]
    foreign = client.get("/", headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in foreign.headers
    preflight = client.options("/rooms", headers={"Origin": "https://app.example"})
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
    foreign_preflight = client.options("/rooms", headers={"Origin": "https://evil.example"})
    assert foreign_preflight.status_code == 403
    assert foreign_preflight.get_json()["code"] == "origin_forbidden"
    assert "Access-Control-Allow-Methods" not in foreign_preflight.headers


def test_metrics_needs_a_publisher_key_when_keys_are_set(keyed, make_app):
    refused = keyed.get("/metrics")
    assert refused.status_code == 401 and refused.get_json()["code"] == "missing_api_key"
    assert keyed.get("/metrics", headers={"Authorization": "Bearer nope"}).status_code == 401
    ok = keyed.get("/metrics", headers={"Authorization": f"Bearer {API_KEY}"})
    assert ok.status_code == 200 and ok.mimetype == "text/plain"
    public = make_app(env="production", api_keys=(API_KEY,), metrics_public=True).test_client()
    assert public.get("/metrics").status_code == 200
    assert public.get("/rooms").status_code == 401, "WSSERVER_METRICS_PUBLIC opens /metrics only"


def test_without_keys_a_proxied_request_is_never_loopback(make_app, caplog):
    """nginx on the same host: every request's TCP peer is 127.0.0.1. Its forwarding headers
    say it came through a proxy: without API keys, 403 naming WSSERVER_API_KEYS, and one
    WARNING for the first such request only."""
    for trusted in ((), ("127.0.0.1",)):
        client = make_app(env="production", trusted_proxies=trusted).test_client()
        assert client.get("/rooms").status_code == 200  # a local client, not proxied
        caplog.clear()
        for header in ({"X-Forwarded-For": "127.0.0.1"}, {"X-Real-IP": "127.0.0.1"},
                       {"Forwarded": "for=127.0.0.1"}, {"X-Forwarded-For": "203.0.113.7"}):
            resp = client.get("/rooms", headers=header)
            assert resp.status_code == 403, (trusted, header)
            body = resp.get_json()
            assert body["code"] == "publish_forbidden" and "WSSERVER_API_KEYS" in body["error"]
            posted = client.post("/notify", json={"event": "e"}, headers=header)
            assert posted.status_code == 403 and "WSSERVER_API_KEYS" in posted.get_json()["error"]
        warnings = [r for r in caplog.records if r.levelname == "WARNING"]
        assert len(warnings) == 1 and "WSSERVER_API_KEYS" in warnings[0].getMessage()
    # /metrics stays public without keys, proxied or not
    assert client.get("/metrics", headers={"X-Forwarded-For": "203.0.113.7"}).status_code == 200
    # development keeps the original's openness
    dev = make_app(env="development").test_client()
    assert dev.get("/rooms", headers={"X-Forwarded-For": "203.0.113.7"}).status_code == 200
