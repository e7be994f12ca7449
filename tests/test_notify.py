"""wsserver.notify: ``/notify`` answered below Flask, through Flask's test client (the same
WSGI callable gunicorn calls): methods, the publisher check, the body limit, single and batch
publishing, JSON errors in the Flask app's shape, CORS from the same policy."""

from __future__ import annotations

import json

import pytest

API_KEY = "notify-test-key-77d0"


def test_a_notification_is_accepted_with_its_id(client):
    resp = client.post("/notify", json={"event": "e", "message": "m", "data": {"n": 1}})
    assert resp.status_code == 200 and resp.mimetype == "application/json"
    body = resp.get_json()
    assert body["status"] == "ok" and body["clients"] == 0 and body["id"]
    assert "ids" not in body  # everybody: one target, no per-room ids
    rooms = client.post("/notify", json={"event": "e", "rooms": ["a", "b"]}).get_json()
    assert set(rooms["ids"]) == {"a", "b"} and rooms["id"] == rooms["ids"]["a"]


def test_methods_other_than_post_and_options_get_405_with_allow(client):
    for method in ("get", "put", "delete"):
        resp = getattr(client, method)("/notify")
        assert resp.status_code == 405, method
        assert resp.headers["Allow"] == "POST, OPTIONS"
        assert resp.get_json()["code"] == "method_not_allowed"
    assert client.options("/notify").status_code == 200


@pytest.mark.parametrize("body, code", [
    (b"{not json", "invalid_json"),
    (b'{"message": "no event"}', "missing_event"),
    (b'{"event": 7}', "invalid_event"),
    (b"[]", "empty_batch"),
])
def test_bad_bodies_are_400_with_a_code(client, body, code):
    resp = client.post("/notify", data=body, content_type="application/json")
    assert resp.status_code == 400
    document = resp.get_json()
    assert document["code"] == code and document["error"]


def test_a_body_over_the_limit_is_413_before_it_is_parsed(make_app):
    client = make_app(env="development", max_body_size=100).test_client()
    big = client.post("/notify", data=b"x" * 101, content_type="application/json")
    assert big.status_code == 413 and big.get_json()["code"] == "body_too_large"
    fits = json.dumps({"event": "e", "message": "y" * 40}).encode()
    assert len(fits) <= 100
    assert client.post("/notify", data=fits, content_type="application/json").status_code == 200


def test_a_batch_answers_each_item(make_app):
    client = make_app(env="development", max_batch=3).test_client()
    resp = client.post("/notify", json=[{"event": "a"}, {"event": 7}, {"event": "c"}])
    assert resp.status_code == 200
    body = resp.get_json()
    assert body["status"] == "partial" and body["accepted"] == 2
    assert [r["status"] for r in body["results"]] == ["ok", "error", "ok"]
    assert body["results"][1]["code"] == "invalid_event"
    over = client.post("/notify", json=[{"event": "a"}] * 4)
    assert over.status_code == 413 and over.get_json()["code"] == "batch_too_large"


def test_publishing_needs_the_api_key_when_keys_are_set(make_app):
    client = make_app(env="production", api_keys=(API_KEY,)).test_client()
    missing = client.post("/notify", json={"event": "e"})
    assert missing.status_code == 401 and missing.get_json()["code"] == "missing_api_key"
    ok = client.post("/notify", json={"event": "e"},
                     headers={"Authorization": f"Bearer {API_KEY}"})
    assert ok.status_code == 200 and ok.get_json()["status"] == "ok"


def test_cors_preflight_from_an_allowed_origin(make_app):
    client = make_app(env="production", allowed_origins=("https://app.example",)).test_client()
    preflight = client.options("/notify", headers={"Origin": "https://app.example"})
    assert preflight.status_code == 200
    assert preflight.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert "Authorization" in preflight.headers["Access-Control-Allow-Headers"]
    foreign = client.options("/notify", headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in foreign.headers


def test_other_paths_go_to_flask(client):
    assert client.get("/notify/x").status_code == 404
    assert client.get("/").get_json()["service"] == "ws"
