"""wsserver.views: health, probes, /metrics and /rooms through Flask's test client (the whole
WSGI stack, no sockets); the publisher check on /rooms and CORS for allowed origins only."""

from __future__ import annotations

import os
import socket

import pytest
from prometheus_client.parser import text_string_to_metric_families

API_KEY = "views-test-key-41c9"
UPGRADE = {"Upgrade": "websocket", "Connection": "Upgrade",
           "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version": "13",
           "Sec-WebSocket-Protocol": "wsserver.v1"}


@pytest.fixture
def register(app):
    """``register(rooms=())``: a connection (over a socketpair) in the app's hub, joined to
    ``rooms``; every one is taken out and closed after the test."""
    service = app.extensions["wsserver"]
    made = []

    def add(rooms=()):
        ours, theirs = socket.socketpair()
        conn = service.new_connection(ours, "192.0.2.9")
        assert service.hub.add(conn) is None
        for room in rooms:
            service.hub.subscribe(conn, room)
        made.append((conn, ours, theirs))
        return conn

    yield add
    for conn, ours, theirs in made:
        service.hub.remove(conn)
        conn.detach()
        ours.close()
        theirs.close()


def test_health_keeps_the_original_shape_plus_totals(client):
    resp = client.get("/")
    assert resp.status_code == 200
    body = resp.get_json()
    assert body["status"] == "ok" and body["service"] == "ws"
    assert (body["clients"], body["rooms"], body["subscriptions"], body["queue"]) == (0, 0, 0, 0)
    assert body["accepting"] is True and body["capacity"] > 0
    assert body["pid"] == os.getpid()
    assert body["broker"] == {"kind": "memory", "connected": True}
    # one process: the numbers are this worker's, and say so
    assert body["scope"] == "worker" and "cluster" not in body
    assert body["worker"] == {"pid": os.getpid(), "clients": 0, "rooms": 0, "subscriptions": 0,
                              "capacity": body["capacity"], "queue": 0, "accepting": True}


def test_health_rooms_and_notify_count_this_worker_with_the_memory_broker(client, register):
    register(("a",))
    register(("a", "b"))
    register()
    body = client.get("/").get_json()
    assert (body["clients"], body["rooms"], body["subscriptions"]) == (3, 2, 3)
    assert (body["worker"]["clients"], body["worker"]["rooms"]) == (3, 2)
    assert client.get("/rooms").get_json() == {
        "rooms": [{"room": "a", "clients": 2, "worker_clients": 2},
                  {"room": "b", "clients": 1, "worker_clients": 1}],
        "count": 2, "scope": "worker"}
    for post, clients in (({"event": "e"}, 3), ({"event": "e", "room": "a"}, 2),
                          ({"event": "e", "rooms": ["a", "b"]}, 3)):
        answer = client.post("/notify", json=post).get_json()
        assert (answer["clients"], answer["worker_clients"]) == (clients, clients), answer


def test_probes_before_and_after_the_service_runs(client, app):
    assert client.get("/healthz").get_json() == {"status": "ok"}
    assert client.get("/readyz").get_json() == {"status": "ready", "accepting": True,
                                                "full": False, "broker": True}
    app.extensions["wsserver"].ensure_started()  # the delivery threads now run
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200


def test_readyz_is_503_once_shutdown_stops_accepting(client, app):
    app.extensions["wsserver"].shutdown()
    resp = client.get("/readyz")
    assert resp.status_code == 503
    assert resp.get_json()["status"] == "not_ready" and resp.get_json()["accepting"] is False
    assert resp.get_json()["reason"] == "shutting_down"
    assert client.get("/").get_json()["accepting"] is False


@pytest.mark.parametrize("settings_overrides", [{"max_connections": 2}])
def test_readyz_is_503_server_full_while_upgrades_are_refused(client, app, register):
    """A load balancer must stop sending clients to a worker that refuses them: /readyz says
    ``server_full`` exactly while an upgrade would get 503 ``server_full``."""
    app.extensions["wsserver"].ensure_started()
    first = register()
    assert client.get("/readyz").status_code == 200
    register()
    ready = client.get("/readyz")
    assert ready.status_code == 503, ready.get_json()
    assert ready.get_json()["reason"] == "server_full" and ready.get_json()["full"] is True
    refused = client.get("/ws", headers=UPGRADE)  # a client trying anyway
    assert refused.status_code == 503 and refused.get_json()["code"] == "server_full"
    assert client.get("/").status_code == 200  # full is not unhealthy, nor degraded
    assert client.get("/").get_json()["status"] == "ok"
    app.extensions["wsserver"].hub.remove(first)  # a slot frees up: ready again
    assert client.get("/readyz").status_code == 200


def test_metrics_is_prometheus_text(client):
    resp = client.get("/metrics")
    assert resp.status_code == 200 and resp.mimetype == "text/plain"
    names = {family.name for family in text_string_to_metric_families(resp.get_data(True))}
    assert {"wsserver_connections", "wsserver_deliveries", "wsserver_refusals"} <= names


def test_rooms_lists_nothing_before_anyone_joins(client):
    assert client.get("/rooms").get_json() == {"rooms": [], "count": 0, "scope": "worker"}


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
