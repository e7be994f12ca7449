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
