"""wsserver.notify: ``/notify`` answered below Flask, through Flask's test client (the same
WSGI callable gunicorn calls): methods, the publisher check, the body limit, single and batch
publishing, JSON errors in the Flask app's shape, CORS from the same policy."""

from __future__ import annotations

import io
import json

import pytest

from wsserver.brokers import WouldBlock, order_of
from wsserver.notify import NOWAIT, TOGETHER_MAX_BYTES, nowait_app

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


def test_a_valid_batch_without_keys_is_one_broker_call_with_the_same_answer(make_app):
    """A batch whose items are all valid and carry no idempotency key is published in one
    broker call (one queue item, one Redis round trip); the answer is item by item as
    before: ids in order per audience, multi-room ids, audience counts."""
    app = make_app(env="development", max_body_size=1 << 20)
    client = app.test_client()
    broker = app.extensions["wsserver"].broker
    calls = []
    publish = broker.publish

    def counting(messages, timeout, idempotency=None):  # noqa: ANN001, ANN202
        calls.append(len(messages))
        return publish(messages, timeout, idempotency)

    broker.publish = counting
    batch = [{"event": "a"}, {"event": "b", "rooms": ["x", "y"]}, {"event": "c"}]
    body = client.post("/notify", json=batch).get_json()
    assert calls == [4]
    assert body["status"] == "ok" and body["accepted"] == 3
    first, multi, last = body["results"]
    assert all(r["status"] == "ok" and r["clients"] == 0 for r in body["results"])
    assert order_of(last["id"]) > order_of(first["id"])
    assert set(multi["ids"]) == {"x", "y"} and multi["id"] == multi["ids"]["x"]
    # an invalid item or an idempotency key: item by item, as before
    calls.clear()
    client.post("/notify", json=[{"event": "a"}, {"event": 7}])
    client.post("/notify", json=[{"event": "a"}, {"event": "b", "idempotency_key": "k1"}])
    client.post(
        "/notify", json=[{"event": "a"}, {"event": "b"}], headers={"Idempotency-Key": "k2"}
    )
    assert calls == [1, 1, 1, 1, 1]
    # a big body: item by item, so its envelopes and frames are not all alive at once
    calls.clear()
    big = "x" * (TOGETHER_MAX_BYTES // 2)
    answer = client.post("/notify", json=[{"event": "a", "message": big}] * 3)
    assert answer.status_code == 200 and answer.get_json()["accepted"] == 3
    assert calls == [1, 1, 1]


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
    foreign = client.options("/notify", headers={"Origin": "https://evil.example",
                                                  "Access-Control-Request-Method": "POST"})
    assert foreign.status_code == 403 and foreign.get_json()["code"] == "origin_forbidden"
    assert "Access-Control-Allow-Origin" not in foreign.headers


@pytest.mark.parametrize("env", ["production", "development"])
@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "application/jsonx",
                                          "text/json", "application/json-patch+json"])
def test_a_body_not_declared_json_is_415_in_every_mode(make_app, env, content_type):
    """What a cross-site form or simple fetch can send is never application/json."""
    client = make_app(env=env).test_client()
    headers = {"Content-Type": content_type} if content_type else {}
    resp = client.post("/notify", data=b'{"event":"csrf"}', headers=headers)
    assert resp.status_code == 415, resp.data
    body = resp.get_json()
    assert body["code"] == "unsupported_media_type" and "application/json" in body["error"]
    assert resp.headers["Accept-Post"] == "application/json"


@pytest.mark.parametrize("content_type", ["application/json", "Application/JSON",
                                          "application/json; charset=utf-8",
                                          "application/json;charset=UTF-8"])
def test_json_with_parameters_is_accepted(client, content_type):
    resp = client.post("/notify", data=b'{"event":"e"}', headers={"Content-Type": content_type})
    assert resp.status_code == 200, resp.data


def test_a_foreign_origin_may_not_publish_even_with_a_key(make_app):
    client = make_app(env="production", api_keys=(API_KEY,),
                      allowed_origins=("https://app.example",)).test_client()
    key = {"Authorization": f"Bearer {API_KEY}"}
    for origin, code in (("https://evil.example", "origin_forbidden"),
                         ("https://app.example:8443", "origin_forbidden"),
                         ("http://[::1", "invalid_origin")):
        resp = client.post("/notify", json={"event": "e"}, headers={**key, "Origin": origin})
        assert resp.status_code == 403 and resp.get_json()["code"] == code, origin
    ok = client.post("/notify", json={"event": "e"}, headers={**key, "Origin": "https://app.example"})
    assert ok.status_code == 200
    assert ok.headers["Access-Control-Allow-Origin"] == "https://app.example"


def test_csrf_without_keys_is_refused_by_origin_and_by_content_type(make_app):
    """The issue's request: from loopback, production, no keys, Origin evil.com, text/plain."""
    client = make_app(env="production").test_client()
    csrf = client.post("/notify", data=b'{"event":"csrf"}',
                       headers={"Origin": "https://evil.com", "Content-Type": "text/plain"})
    assert csrf.status_code == 403 and csrf.get_json()["code"] == "origin_forbidden"
    # no Origin (a browser may omit it, e.g. some redirects): the type still stops a simple request
    plain = client.post("/notify", data=b'{"event":"csrf"}', headers={"Content-Type": "text/plain"})
    assert plain.status_code == 415
    assert client.post("/notify", json={"event": "local"}).status_code == 200


def test_a_dns_rebound_page_may_not_publish_from_loopback(make_app):
    """Host names the attacker's domain re-pointed at 127.0.0.1: not an address, not a name
    the server knows, so the loopback grant does not apply (no Origin needed to refuse it)."""
    client = make_app(env="production").test_client()
    resp = client.post("/notify", json={"event": "e"}, headers={"Host": "evil.com:8080"})
    assert resp.status_code == 403 and resp.get_json()["code"] == "publish_forbidden"
    assert "Host" in resp.get_json()["error"]
    for host in ("127.0.0.1:8080", "localhost:8080", "[::1]:8080"):
        assert client.post("/notify", json={"event": "e"}, headers={"Host": host}).status_code == 200
    # with a key the Host does not matter: a rebound page has no key
    keyed = make_app(env="production", api_keys=(API_KEY,)).test_client()
    assert keyed.post("/notify", json={"event": "e"}, headers={
        "Host": "ws.example.com", "Authorization": f"Bearer {API_KEY}"}).status_code == 200


def test_other_paths_go_to_flask(client):
    assert client.get("/notify/x").status_code == 404
    assert client.get("/").get_json()["service"] == "ws"


# -- idempotency keys ---------------------------------------------------------------------------


def _n(message_id: str) -> int:
    """The counter of a memory-broker id (``<boot>-<n>``): consecutive per audience."""
    return int(message_id.split("-")[1])


def test_a_repeated_idempotency_key_answers_the_first_ids_and_publishes_nothing(client):
    headers = {"Idempotency-Key": "order-7/shipped"}
    body = {"event": "e", "rooms": ["a", "b"], "data": {"n": 1}}
    first = client.post("/notify", json=body, headers=headers).get_json()
    assert "repeated" not in first
    again = client.post("/notify", json=body, headers=headers)
    assert again.status_code == 200
    repeated = again.get_json()
    assert repeated["repeated"] is True
    assert (repeated["id"], repeated["ids"]) == (first["id"], first["ids"])
    after = client.post("/notify", json={"event": "e", "room": "a"}).get_json()
    assert _n(after["id"]) == _n(first["ids"]["a"]) + 1, "the repeat published nothing"


def test_an_idempotency_key_reused_for_another_notification_is_422(client):
    headers = {"Idempotency-Key": "k-422"}
    first = client.post("/notify", json={"event": "e", "room": "r"}, headers=headers).get_json()
    for other in ({"event": "e", "room": "r", "data": 1}, {"event": "e", "room": "s"},
                  {"event": "f", "room": "r"}, {"event": "e", "room": "r", "message": "x"}):
        resp = client.post("/notify", json=other, headers=headers)
        assert resp.status_code == 422, other
        assert resp.get_json()["code"] == "idempotency_key_reused"
    after = client.post("/notify", json={"event": "e", "room": "r"}).get_json()
    assert _n(after["id"]) == _n(first["id"]) + 1, "nothing was published by the 422s"


@pytest.mark.parametrize("key", ["", " ", "a b", "x" * 201, "caf\u00e9", "tab\there"])
def test_an_invalid_idempotency_key_header_is_400(client, key):
    resp = client.post("/notify", json={"event": "e"},
                       headers={"Idempotency-Key": key.encode("utf-8").decode("latin-1")})
    assert resp.status_code == 400
    assert resp.get_json()["code"] == "invalid_idempotency_key"


def test_the_longest_idempotency_key_is_accepted(client):
    key = "~" * 200
    first = client.post("/notify", json={"event": "e"}, headers={"Idempotency-Key": key})
    assert first.status_code == 200
    again = client.post("/notify", json={"event": "e"}, headers={"Idempotency-Key": key})
    assert again.get_json()["repeated"] and again.get_json()["id"] == first.get_json()["id"]


@pytest.mark.parametrize("key", [7, "", "x" * 201, "a b", ["k"]])
def test_an_invalid_idempotency_key_field_is_an_item_error(client, key):
    resp = client.post("/notify", json=[{"event": "e", "idempotency_key": key}, {"event": "e"}])
    assert resp.status_code == 200
    results = resp.get_json()["results"]
    assert results[0]["code"] == "invalid_idempotency_key" and results[1]["status"] == "ok"
    single = client.post("/notify", json={"event": "e", "idempotency_key": key})
    assert single.status_code == 400 and single.get_json()["code"] == "invalid_idempotency_key"


def test_a_retried_batch_publishes_only_what_was_not_published(client):
    headers = {"Idempotency-Key": "batch-1"}
    items = [{"event": "a", "room": "q"}, {"event": 7}, {"event": "c", "room": "q"}]
    first = client.post("/notify", json=items, headers=headers).get_json()
    assert [r["status"] for r in first["results"]] == ["ok", "error", "ok"]
    items[1] = {"event": "b", "room": "q"}  # fixed, retried with the same key
    again = client.post("/notify", json=items, headers=headers).get_json()
    results = again["results"]
    assert [r.get("repeated", False) for r in results] == [True, False, True]
    assert results[0]["id"] == first["results"][0]["id"]
    assert results[2]["id"] == first["results"][2]["id"]
    assert _n(results[1]["id"]) == _n(first["results"][2]["id"]) + 1, "only the new item"


def test_an_item_key_wins_over_the_header(client):
    body = [{"event": "a", "idempotency_key": "own"}, {"event": "b"}]
    first = client.post("/notify", json=body, headers={"Idempotency-Key": "h"}).get_json()
    alone = client.post("/notify", json={"event": "a", "idempotency_key": "own"}).get_json()
    assert alone["repeated"] and alone["id"] == first["results"][0]["id"]
    derived = client.post("/notify", json={"event": "b"}, headers={"Idempotency-Key": "h/1"})
    assert derived.get_json()["id"] == first["results"][1]["id"]


# -- NOWAIT: the worker's main thread -----------------------------------------------------


def _nowait_post(chain, body: bytes, **headers: str):  # noqa: ANN001, ANN202
    """The endpoint called as the worker's main thread calls it (``nowait_app``, NOWAIT)."""
    environ = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": "/notify",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8000",
        "REMOTE_ADDR": "127.0.0.1",
        "HTTP_HOST": "127.0.0.1:8000",
        "CONTENT_TYPE": "application/json",
        "CONTENT_LENGTH": str(len(body)),
        "wsgi.input": io.BytesIO(body),
        NOWAIT: True,
    }
    environ.update(headers)
    statuses = []
    chunks = chain(environ, lambda status, headers: statuses.append(status))
    return statuses[0], json.loads(b"".join(chunks))


def test_nowait_app_is_the_endpoint_chain_of_wsserver_apps_only(make_app):
    app = make_app(env="development")
    assert nowait_app(app) is app.wsgi_app
    proxied = make_app(env="development", trusted_proxies=("10.0.0.0/8",))
    assert nowait_app(proxied) is proxied.wsgi_app  # ClientAddress, then the endpoint
    wrapped = make_app(env="development")
    inner = wrapped.wsgi_app
    wrapped.wsgi_app = lambda environ, start_response: inner(environ, start_response)
    assert nowait_app(wrapped) is None  # a user's middleware: never served twice through it
    assert nowait_app(object()) is None


def test_nowait_publishes_when_nothing_is_busy(make_app):
    app = make_app(env="development")
    app.extensions["wsserver"].ensure_started()
    chain = nowait_app(app)
    status, body = _nowait_post(chain, b'{"event":"e","rooms":["a"]}')
    assert status.startswith("200") and _n(body["id"]) == 1
    status, body = _nowait_post(chain, b'[{"event":"e","rooms":["a"]},{"event":"f","rooms":["a"]}]')
    assert [_n(r["id"]) for r in body["results"]] == [2, 3]
    status, body = _nowait_post(chain, b'{"event":7}')
    assert status.startswith("400")  # refusals are answered, not deferred


def test_nowait_raises_would_block_and_publishes_nothing_where_it_would_wait(
    make_app, monkeypatch
):
    app = make_app(env="development")
    service = app.extensions["wsserver"]
    chain = nowait_app(app)
    with pytest.raises(WouldBlock):  # not started in this process: starting takes a lock
        _nowait_post(chain, b'{"event":"e","rooms":["a"]}')
    service.ensure_started()
    broker = service.broker
    with broker._lock:  # another publisher holds it (waiting for queue room, say)
        with pytest.raises(WouldBlock):
            _nowait_post(chain, b'{"event":"e","rooms":["a"]}')
    monkeypatch.setattr(service.broadcaster, "submit_nowait", lambda item: False)
    with pytest.raises(WouldBlock):  # the queue is full
        _nowait_post(chain, b'[{"event":"e","rooms":["a"]}]')
    monkeypatch.undo()
    with pytest.raises(WouldBlock):  # an item-by-item batch: tried nowhere but the pool
        _nowait_post(chain, b'[{"event":"e","rooms":["a"]},{"event":7}]')
    with pytest.raises(WouldBlock):
        _nowait_post(chain, b'[{"event":"e","rooms":["a"]}]', HTTP_IDEMPOTENCY_KEY="k1")
    monkeypatch.setattr(broker, "publishes_nowait", False)  # as Redis
    with pytest.raises(WouldBlock):
        _nowait_post(chain, b'{"event":"e","rooms":["a"]}')
    monkeypatch.undo()
    # nothing of the above was published: the next id is the first
    assert _n(app.test_client().post("/notify", json={"event": "e", "rooms": ["a"]})
              .get_json()["id"]) == 1
