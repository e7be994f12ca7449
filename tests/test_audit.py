"""wsserver.audit: every refusal and server-initiated close is counted by reason and logged
once, and a flood of them cannot flood the log."""

from __future__ import annotations

import logging

from wsserver import audit, metrics


def _count(counter, reason: str) -> float:
    return counter.labels(reason)._value.get()


def test_refusals_and_closes_are_counted_by_reason(caplog):
    before_r = _count(metrics.REFUSALS, "test_refusal")
    before_c = _count(metrics.SERVER_CLOSES, "test_close")
    with caplog.at_level(logging.INFO, logger="wsserver.audit"):
        audit.refused("test_refusal", "192.0.2.7", "WSSERVER_SOME_LIMIT")
        audit.closed("test_close", "192.0.2.8")
    assert _count(metrics.REFUSALS, "test_refusal") == before_r + 1
    assert _count(metrics.SERVER_CLOSES, "test_close") == before_c + 1
    lines = [r.getMessage() for r in caplog.records if r.name == "wsserver.audit"]
    assert any("192.0.2.7" in m and "test_refusal" in m and "WSSERVER_SOME_LIMIT" in m for m in lines)
    assert any("192.0.2.8" in m and "test_close" in m for m in lines)


def test_a_flood_is_logged_at_a_bounded_rate_and_says_what_it_held_back():
    limiter = audit.LogLimiter(rate=1.0, burst=5)
    passed = [limiter.take() for _ in range(1000)]
    assert sum(p is not None for p in passed) <= 6  # the burst, and at most one refill
    assert passed[:5] == [0, 0, 0, 0, 0]
    limiter._at -= 2.0  # two seconds later: tokens again
    assert limiter.take() >= 990  # the next line says how many were suppressed
    assert limiter.take() == 0


# -- every HTTP refusal is visible: counted in /metrics by reason and logged once --------------

import re  # noqa: E402
import socket  # noqa: E402

import pytest  # noqa: E402

from wsserver import create_app  # noqa: E402

UPGRADE = {"Upgrade": "websocket", "Connection": "Upgrade",
           "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version": "13"}


def refusals(client, reason: str) -> float:
    # with API keys /metrics needs one (the cases' servers use k1), without keys the header is ignored
    text = client.get("/metrics", headers={"Authorization": "Bearer k1"}).get_data(as_text=True)
    match = re.search(rf'^wsserver_refusals_total{{reason="{reason}"}} (\S+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


@pytest.fixture
def apps():
    made = []

    def make(**config):
        app = create_app({"env": "production", **config})
        made.append(app)
        return app

    yield make
    for app in made:
        app.extensions["wsserver"].shutdown()


def _hold_connections(app, remote: str, n: int) -> list[socket.socket]:
    """Register ``n`` real connections from ``remote`` in the app's hub (socketpairs)."""
    service = app.extensions["wsserver"]
    service.ensure_started()
    held = []
    for _ in range(n):
        ours, peer = socket.socketpair()
        held += [ours, peer]
        assert service.hub.add(service.new_connection(ours, remote)) is None
    return held


def _full(app) -> None:
    service = app.extensions["wsserver"]
    service.ensure_started()
    service.hub.set_capacity(0)


def _stopped_broadcaster(app) -> None:
    service = app.extensions["wsserver"]
    service.ensure_started()
    service.broadcaster.stop(2)  # nothing is taken off the queue: the next publish is refused


SECRET = "a-test-secret-that-is-long-enough-for-hs256"
REMOTE = "10.9.8.7"

# (app settings, setup, method, path, headers, body, status, reason, detail that must be named)
CASES = [
    pytest.param({}, None, "GET", "/ws", {**UPGRADE, "Sec-WebSocket-Version": "8"}, None, 426,
                 "unsupported_websocket_version", "RFC 6455", id="ws-426"),
    pytest.param({}, None, "GET", "/ws", {k: v for k, v in UPGRADE.items()
                                           if k != "Sec-WebSocket-Key"}, None, 400,
                 "invalid_websocket_key", "", id="ws-400-key"),
    pytest.param({}, None, "GET", "/ws", {**UPGRADE, "Origin": "https://evil.example"}, None, 403,
                 "origin_forbidden", "WSSERVER_ALLOWED_ORIGINS", id="ws-403-origin"),
    pytest.param({}, None, "GET", "/ws", {**UPGRADE, "Origin": "http://[::1"}, None, 403,
                 "invalid_origin", "", id="ws-403-bad-origin"),
    pytest.param({"jwt_secret": SECRET}, None, "GET", "/ws", UPGRADE, None, 401,
                 "missing_token", "WSSERVER_JWT_SECRET", id="ws-401-token"),
    pytest.param({}, None, "GET", "/ws?rooms=%2Fbad", UPGRADE, None, 400, "invalid_room", "",
                 id="ws-400-room"),
    pytest.param({"max_rooms_per_connection": 2}, None, "GET", "/ws?rooms=a,b,c", UPGRADE, None,
                 400, "too_many_rooms", "WSSERVER_MAX_ROOMS_PER_CONNECTION=2", id="ws-400-rooms"),
    # no session serves the held connections: shutdown would wait its whole timeout for them
    pytest.param({"max_connections_per_ip": 2, "shutdown_timeout": 0.1},
                 lambda app: _hold_connections(app, REMOTE, 2),
                 "GET", "/ws", UPGRADE, None, 429, "too_many_connections",
                 "WSSERVER_MAX_CONNECTIONS_PER_IP=2", id="ws-429"),
    pytest.param({}, _full, "GET", "/ws", UPGRADE, None, 503, "server_full",
                 "WSSERVER_MAX_CONNECTIONS", id="ws-503"),
    pytest.param({}, None, "GET", "/ws", {}, None, 400, "bad_request", "", id="ws-plain-get"),
    pytest.param({"api_keys": ("k1",)}, None, "POST", "/notify", {}, {"event": "e"}, 401,
                 "missing_api_key", "WSSERVER_API_KEYS", id="notify-401"),
    pytest.param({}, None, "POST", "/notify", {}, {"event": "e"}, 403, "publish_forbidden",
                 "WSSERVER_API_KEYS", id="notify-403"),
    pytest.param({}, None, "POST", "/notify", {"X-Forwarded-For": "203.0.113.9"}, {"event": "e"},
                 403, "publish_forbidden", "WSSERVER_API_KEYS unset, forwarded request",
                 id="notify-403-forwarded"),
    pytest.param({"allowed_origins": ("https://app.example.com",)}, None, "POST", "/notify",
                 {"Origin": "https://evil.example"}, {"event": "e"}, 403, "origin_forbidden",
                 "WSSERVER_ALLOWED_ORIGINS", id="notify-403-origin"),
    pytest.param({"env": "development"}, None, "POST", "/notify",
                 {"Content-Type": "text/plain"}, {"event": "e"}, 415, "unsupported_media_type",
                 "Content-Type", id="notify-415"),
    pytest.param({"env": "development", "max_body_size": 100}, None, "POST", "/notify", {},
                 {"event": "e", "message": "x" * 200}, 413, "body_too_large",
                 "WSSERVER_MAX_BODY_SIZE=100", id="notify-413"),
    pytest.param({"env": "development", "max_batch": 2}, None, "POST", "/notify", {},
                 [{"event": "e"}] * 3, 413, "batch_too_large", "WSSERVER_MAX_BATCH=2",
                 id="notify-413-batch"),
    pytest.param({"env": "development"}, None, "POST", "/notify", {}, {"message": "no event"},
                 400, "missing_event", "", id="notify-400"),
    pytest.param({"env": "development"}, None, "PUT", "/notify", {}, None, 405,
                 "method_not_allowed", "", id="notify-405"),
    pytest.param({"env": "development", "enqueue_timeout": 0.0}, _stopped_broadcaster, "POST",
                 "/notify", {}, {"event": "e"}, 503, "queue_full", "WSSERVER_QUEUE_SIZE=",
                 id="notify-503-queue"),
    pytest.param({"env": "development", "redis_url": "redis://127.0.0.1:1/0"}, None, "POST",
                 "/notify", {}, {"event": "e"}, 503, "broker_unavailable", "WSSERVER_REDIS_URL",
                 id="notify-503-broker"),
    pytest.param({"api_keys": ("k1",)}, None, "GET", "/rooms", {}, None, 401, "missing_api_key",
                 "WSSERVER_API_KEYS", id="rooms-401"),
    pytest.param({"api_keys": ("k1",)}, None, "GET", "/metrics", {}, None, 401,
                 "missing_api_key", "WSSERVER_API_KEYS", id="metrics-401"),
    pytest.param({}, None, "POST", "/", {}, None, 405, "method_not_allowed", "", id="health-405"),
]


@pytest.mark.parametrize("config, setup, method, path, headers, body, status, reason, detail",
                         CASES)
def test_each_http_refusal_is_counted_by_reason_and_logged_once(
    apps, caplog, monkeypatch, config, setup, method, path, headers, body, status, reason, detail
):
    monkeypatch.setattr(audit, "_LIMITER", audit.LogLimiter())
    app = apps(**config)
    held = setup(app) if setup else None
    client = app.test_client()
    before = refusals(client, reason)
    with caplog.at_level(logging.INFO, logger="wsserver.audit"):
        caplog.clear()
        response = client.open(path, method=method, headers=headers, json=body,
                               environ_base={"REMOTE_ADDR": REMOTE})
    assert response.status_code == status, response.data
    assert response.get_json()["code"] == reason
    assert refusals(client, reason) == before + 1
    lines = [r.getMessage() for r in caplog.records if r.name == "wsserver.audit"]
    assert len(lines) == 1, lines
    assert REMOTE in lines[0] and reason in lines[0] and detail in lines[0], lines[0]
    for sock in held or ():
        sock.close()


def test_a_successful_publish_and_a_miss_are_not_refusals(apps, caplog):
    app = apps(env="development")
    client = app.test_client()
    with caplog.at_level(logging.INFO, logger="wsserver.audit"):
        assert client.post("/notify", json={"event": "ok"}).status_code == 200
        assert client.get("/nope").status_code == 404
    assert not [r for r in caplog.records if r.name == "wsserver.audit"]


def test_a_mass_close_is_counted_whole_and_logged_once(caplog):
    before = _count(metrics.SERVER_CLOSES, "test_mass_close")
    with caplog.at_level(logging.INFO, logger="wsserver.audit"):
        audit.closed_all("test_mass_close", 1000, "SIGTERM")
        audit.closed_all("test_mass_close", 0)
    assert _count(metrics.SERVER_CLOSES, "test_mass_close") == before + 1000
    lines = [r.getMessage() for r in caplog.records if "test_mass_close" in r.getMessage()]
    assert lines == ["closed 1000 clients: test_mass_close (SIGTERM)"]
