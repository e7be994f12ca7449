"""wsserver.extension: ``Realtime`` in a user's Flask app (Flask's test client, real services).

The user's routes, error handlers, 404 pages, body limit and client addresses are untouched;
every route under the prefix answers exactly as the standalone server's (compared answer by
answer with ``create_app``'s); ``rt.publish`` delivers through the same service as
``POST <prefix>/notify`` and raises the refusal ``/notify`` answers with.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
from flask import Flask, abort, request
from inprocess import Peer

from wsserver import Realtime, create_app
from wsserver.exceptions import BadRequest, BrokerUnavailable, QueueFull, ShuttingDown
from wsserver.extension import PrefixMount, _prefix

PREFIX = "/realtime"


@pytest.fixture
def make_user_app() -> Iterator[Any]:
    """``make_user_app(prefix, **settings)``: a user's Flask app (its own routes, 404 page and
    error handler) with a Realtime; every service is shut down after the test."""
    made: list[Flask] = []

    def make(prefix: str = PREFIX, **settings: Any) -> tuple[Flask, Realtime]:
        app = Flask("userapp")
        app.config["TESTING"] = True
        rt = Realtime(app, url_prefix=prefix, **{"env": "development", **settings})

        @app.get("/")
        def index() -> Any:
            return {"app": "user"}

        @app.post("/orders")
        def create_order() -> Any:
            return {"id": rt.publish("order.created", "Order 7", {"id": 7}, room="orders")}

        @app.post("/echo")
        def echo() -> Any:
            return {"size": len(request.get_data()), "remote": request.remote_addr}

        @app.get("/teapot")
        def teapot() -> Any:
            abort(418)

        @app.errorhandler(404)
        def not_found(exc: Exception) -> Any:
            return "my own 404 page", 404

        made.append(app)
        return app, rt

    yield make
    for app in made:
        app.extensions["wsserver"].shutdown()


# -- the user's app stays the user's ---------------------------------------------------------


def test_the_users_routes_error_pages_and_limits_are_untouched(make_user_app):
    app, _ = make_user_app(max_body_size=100, trusted_proxies="127.0.0.1/32")
    client = app.test_client()
    assert client.get("/").get_json() == {"app": "user"}
    missing = client.get("/nope")
    assert (missing.status_code, missing.data) == (404, b"my own 404 page")
    # a path that only starts like the prefix is the user's
    assert client.get(PREFIX + "s").data == b"my own 404 page"
    # Flask's own HTML error page and status phrase, not wsserver's JSON and "418 I'm a Teapot"
    teapot = client.get("/teapot")
    assert teapot.status == "418 I'M A TEAPOT" and teapot.mimetype == "text/html"
    # wsserver's body limit and forwarded-address rule are for its routes only
    echoed = client.post("/echo", data=b"x" * 1000,
                         headers={"X-Forwarded-For": "203.0.113.9"}).get_json()
    assert echoed == {"size": 1000, "remote": "127.0.0.1"}
    assert app.config.get("MAX_CONTENT_LENGTH") is None
    # no CORS headers on the user's routes (wsserver's after_request is not theirs)
    answer = client.get("/", headers={"Origin": "http://example.com"})
    assert "Access-Control-Allow-Origin" not in answer.headers
    # and POST /notify outside the prefix is the user's 404
    assert client.post("/notify", json={"event": "e"}).data == b"my own 404 page"


def test_a_users_catch_all_error_handler_keeps_seeing_its_errors():
    app = Flask("userapp")
    seen: list[int] = []

    @app.errorhandler(Exception)
    def everything(exc: Exception) -> Any:
        seen.append(getattr(exc, "code", 500))
        return "handled by the user", 599

    rt = Realtime(app, url_prefix=PREFIX, env="development")
    try:
        client = app.test_client()
        assert client.get("/nope").status_code == 599 and seen == [404]
        assert client.get(PREFIX + "/nope").get_json()["code"] == "not_found"
        assert seen == [404]  # wsserver's own 404 never reached the user's handler
    finally:
        rt.service.shutdown()


# -- under the prefix: the standalone server's answers ---------------------------------------


UPGRADE = {
    "Upgrade": "websocket",
    "Connection": "Upgrade",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
    "Sec-WebSocket-Version": "13",
    "Sec-WebSocket-Protocol": "wsserver.v1",
}

ANSWERS = [
    ("get", "/", {}),
    ("get", "/healthz", {}),
    ("get", "/readyz", {}),
    ("get", "/rooms", {}),
    ("post", "/rooms", {}),
    ("get", "/nope", {}),
    ("get", "/ws", {}),  # a plain GET where an upgrade is expected
    ("get", "/notify", {}),
    ("options", "/notify", {"headers": {"Origin": "http://example.com"}}),
    ("post", "/notify", {"data": "x"}),
    ("post", "/notify", {"json": {"event": ""}}),
    ("post", "/notify", {"json": []}),
    ("post", "/notify", {"data": b"x" * 70000, "content_type": "application/json"}),
    ("post", "/console/check", {}),
    ("get", "/console/check", {}),
    ("get", "/static/wsserver.js", {}),
    ("get", "/rooms", {"headers": {"Origin": "http://example.com"}}),
    # upgrades refused before simple-websocket answers (a test client cannot complete one)
    ("get", "/ws", {"headers": {**UPGRADE, "Sec-WebSocket-Version": "8"}}),
    ("get", "/ws", {"headers": {**UPGRADE, "Sec-WebSocket-Protocol": "chat"}}),
    ("get", "/ws?rooms=bad%20room", {"headers": UPGRADE}),
    ("get", "/ws?since=1-1&rooms=a,b", {"headers": UPGRADE}),
    # the server API (issue 17.3, 17.4)
    ("get", "/rooms/team/7/history", {}),
    ("get", "/rooms/r/history?limit=0", {}),
    ("post", "/disconnect", {"json": {"user": "alice"}}),
    ("post", "/disconnect", {"data": "x"}),
    ("post", "/unsubscribe", {"json": {"user": "alice"}}),
]


def _comparable(response: Any) -> tuple:
    body = response.get_json(silent=True)
    if isinstance(body, dict):
        for volatile in ("pid", "worker"):
            body.pop(volatile, None)
    headers = sorted((k, v) for k, v in response.headers.items() if k not in ("Date",))
    return response.status, headers, body if body is not None else response.data


@pytest.mark.parametrize("method, path, options", ANSWERS,
                         ids=[f"{m} {p} {sorted(o)}" for m, p, o in ANSWERS])
def test_every_prefixed_route_answers_as_the_standalone_servers(make_user_app, make_app,
                                                                method, path, options):
    app, _ = make_user_app(max_body_size=65536)
    standalone = make_app(env="development", max_body_size=65536)
    mounted = getattr(app.test_client(), method)(PREFIX + path, **options)
    alone = getattr(standalone.test_client(), method)(path, **options)
    assert _comparable(mounted) == _comparable(alone)


def test_production_answers_match_too_console_off_and_publishers_checked(make_user_app,
                                                                         make_app):
    app, _ = make_user_app(env="production", api_keys="k" * 32,
                           jwt_secret="s" * 32, allowed_origins="https://app.example.com")
    standalone = make_app(env="production", api_keys=("k" * 32,), jwt_secret="s" * 32,
                          allowed_origins=("https://app.example.com",))
    evil = {"Origin": "https://evil.example"}
    for method, path, headers in (("get", "/console", {}), ("get", "/rooms", {}),
                                  ("get", "/metrics", {}), ("get", "/ws", UPGRADE),
                                  ("get", "/ws", {**UPGRADE, **evil}),
                                  ("get", "/ws?token=nope", UPGRADE),
                                  ("post", "/notify", evil), ("post", "/disconnect", {}),
                                  ("get", "/rooms/r/history", {})):
        mounted = getattr(app.test_client(), method)(PREFIX + path, headers=headers)
        alone = getattr(standalone.test_client(), method)(path, headers=headers)
        assert _comparable(mounted) == _comparable(alone), (path, headers)
        assert mounted.status_code in (401, 403, 404), (path, mounted.status_code)
    refused = app.test_client().post(PREFIX + "/notify", json={"event": "e"})
    assert refused.status_code == 401 and refused.get_json()["code"] == "missing_api_key"


def test_the_console_and_its_scripts_use_the_prefix(make_user_app):
    app, _ = make_user_app()
    page = app.test_client().get(PREFIX + "/console").get_data(as_text=True)
    assert 'const BASE = "/realtime";' in page
    assert 'src="/realtime/static/wsserver.js"' in page
    assert 'src="/realtime/static/console.js"' in page
    for fetched in ('location.host + BASE + "/ws"', 'fetch(BASE + "/console/check"',
                    'fetch(BASE + "/notify"', 'getJson(BASE + "/")', 'getJson(BASE + "/rooms"'):
        assert fetched in page, fetched
    assert "fetch(\"/" not in page and "getJson(\"/" not in page  # no route left unprefixed
    # the standalone console: no base, the same page
    standalone = create_app({"env": "development"})
    try:
        assert 'const BASE = "";' in standalone.test_client().get("/console").get_data(True)
    finally:
        standalone.extensions["wsserver"].shutdown()


def test_the_prefix_alone_is_the_health_answer_not_a_redirect(make_user_app):
    app, _ = make_user_app()
    assert app.test_client().get(PREFIX).get_json()["service"] == "ws"


def test_a_nested_prefix_under_a_script_name(make_user_app):
    """The app itself mounted at /shop by a proxy (SCRIPT_NAME): the console's base is
    /shop/rt, the routes answer at /rt/... of the app's paths."""
    app, _ = make_user_app("/rt/")  # the trailing slash is dropped
    client = app.test_client()
    page = client.get("/rt/console", base_url="http://localhost/shop").get_data(True)
    assert 'const BASE = "/shop/rt";' in page
    assert client.get("/rt/healthz").get_json() == {"status": "ok"}


# -- publish ---------------------------------------------------------------------------------


def test_publish_from_a_route_reaches_a_client_as_notify_does(make_user_app):
    """A real connection (a socketpair) in the room: it gets the route's ``rt.publish`` and
    ``POST <prefix>/notify``, numbered by one history."""
    app, rt = make_user_app()
    service = rt.service
    service.ensure_started()
    ours, theirs = socket.socketpair()
    conn = service.new_connection(ours, "192.0.2.1")
    try:
        assert service.hub.add(conn) is None
        service.commands.subscribe(conn, "orders")
        peer = Peer(theirs)
        published = app.test_client().post("/orders").get_json()["id"]
        notified = app.test_client().post(PREFIX + "/notify",
                                          json={"event": "shipped", "room": "orders"})
        first, second = peer.messages(2)
        assert (first["event"], first["message"], first["data"], first["room"], first["id"]) == (
            "order.created", "Order 7", {"id": 7}, "orders", published)
        assert (second["event"], second["id"]) == ("shipped", notified.get_json()["id"])
        seq = [int(message["id"].rpartition("-")[2]) for message in (first, second)]
        assert seq[1] == seq[0] + 1  # one room history numbers both
    finally:
        service.hub.remove(conn)
        conn.detach()
        ours.close()
        theirs.close()


@pytest.mark.parametrize("call, body", [
    ({"event": ""}, {"event": ""}),
    ({"event": "e" * 1000}, {"event": "e" * 1000}),
    ({"event": 7}, {"event": 7}),
    ({"event": "e", "message": 3}, {"event": "e", "message": 3}),
    ({"event": "e", "room": "bad room"}, {"event": "e", "room": "bad room"}),
    ({"event": "e", "rooms": []}, {"event": "e", "rooms": []}),
    ({"event": "e", "rooms": "orders"}, {"event": "e", "rooms": "orders"}),
    ({"event": "e", "room": "a", "rooms": ["b"]}, {"event": "e", "room": "a", "rooms": ["b"]}),
    ({"event": "e", "room": "a", "user": "u"}, {"event": "e", "room": "a", "user": "u"}),
    ({"event": "e", "user": ""}, {"event": "e", "user": ""}),
    ({"event": "e", "idempotency_key": "has space"},
     {"event": "e", "idempotency_key": "has space"}),
    ({"event": "e", "data": math.nan}, '{"event": "e", "data": NaN}'),
    ({"event": "e", "data": "\ud800"}, '{"event": "e", "data": "\\ud800"}'),
])
def test_a_bad_publish_raises_the_refusal_notify_answers(make_user_app, call, body):
    app, rt = make_user_app()
    kwargs = dict(call)
    event = kwargs.pop("event")
    with pytest.raises(BadRequest) as info:
        rt.publish(event, **kwargs)
    client = app.test_client()
    if isinstance(body, str):
        answer = client.post(PREFIX + "/notify", data=body, content_type="application/json")
    else:
        answer = client.post(PREFIX + "/notify", json=body)
    assert answer.status_code == info.value.status == 400
    assert answer.get_json() == {"error": info.value.reason, "code": info.value.code}


def test_data_json_cannot_carry_is_invalid_json(make_user_app):
    _, rt = make_user_app()
    for data in ({1, 2}, object(), b"bytes"):
        with pytest.raises(BadRequest) as info:
            rt.publish("e", data=data)
        assert (info.value.status, info.value.code) == (400, "invalid_json")
    looped: list = []
    looped.append(looped)
    with pytest.raises(BadRequest, match="Circular"):
        rt.publish("e", data=looped)


def test_publish_returns_the_first_rooms_id_and_an_idempotent_repeat_returns_it_again(
        make_user_app):
    app, rt = make_user_app()
    first = rt.publish("e", rooms=["a", "b"], idempotency_key="order-7")
    assert rt.publish("e", rooms=["a", "b"], idempotency_key="order-7") == first
    with pytest.raises(BadRequest) as info:  # the same key for another notification
        rt.publish("other", rooms=["a", "b"], idempotency_key="order-7")
    reused = app.test_client().post(PREFIX + "/notify",
                                    json={"event": "other", "rooms": ["a", "b"]},
                                    headers={"Idempotency-Key": "order-7"})
    assert reused.status_code == info.value.status == 422
    assert reused.get_json()["code"] == info.value.code
    assert rt.publish("to.everybody")
    assert rt.publish("to.one.user", user="alice")


@pytest.mark.timeout(30)
def test_a_full_queue_raises_queue_full(make_user_app):
    app, rt = make_user_app(enqueue_timeout=0.0, queue_size=1)
    rt.service.ensure_started()
    assert rt.service.broadcaster.stop(2)  # nothing is taken off the queue any more
    with pytest.raises(QueueFull) as info:
        for _ in range(3):  # the first may still fit the one free slot
            rt.publish("e")
    answer = app.test_client().post(PREFIX + "/notify", json={"event": "e"})
    assert answer.status_code == info.value.status == 503
    assert answer.get_json()["code"] == info.value.code == "queue_full"


@pytest.mark.timeout(30)
def test_a_broker_that_is_down_raises_broker_unavailable(make_user_app):
    app, rt = make_user_app(redis_url="redis://127.0.0.1:1/0")
    with pytest.raises(BrokerUnavailable) as info:
        rt.publish("e")
    answer = app.test_client().post(PREFIX + "/notify", json={"event": "e"})
    assert answer.status_code == info.value.status == 503
    assert answer.get_json()["code"] == info.value.code == "broker_unavailable"


def test_publishing_after_shutdown_raises_shutting_down(make_user_app):
    _, rt = make_user_app()
    rt.publish("e")
    rt.service.shutdown()
    with pytest.raises(ShuttingDown):
        rt.publish("e")


# -- set-up ----------------------------------------------------------------------------------


def test_settings_come_from_the_environment_and_keywords_win(monkeypatch):
    monkeypatch.setenv("WSSERVER_QUEUE_SIZE", "99")
    monkeypatch.setenv("WSSERVER_MAX_BODY_SIZE", "2048")
    rt = Realtime(queue_size=16)
    assert (rt.settings.queue_size, rt.settings.max_body_size) == (16, 2048)
    with pytest.raises(Exception, match="unknown setting"):
        Realtime(no_such_setting=1)
    with pytest.raises(TypeError):
        Realtime(settings=rt.settings, queue_size=1)


def test_init_app_later_and_no_thread_before_first_use(make_user_app):
    import threading

    before = set(threading.enumerate())
    app = Flask("late")
    rt = Realtime(env="development")
    with pytest.raises(RuntimeError, match="before init_app"):
        rt.publish("e")
    rt.init_app(app, url_prefix="/live")
    try:
        assert set(threading.enumerate()) == before
        assert rt.service.broadcaster is None
        assert app.test_client().get("/live/healthz").get_json() == {"status": "ok"}
        assert isinstance(app.wsgi_app, PrefixMount) and app.wsgi_app.prefix == "/live"
    finally:
        rt.service.shutdown()


def test_a_second_realtime_on_the_same_app_is_a_clear_error(make_user_app):
    app, rt = make_user_app()
    with pytest.raises(RuntimeError, match="already serves wsserver.*one Realtime per app"):
        Realtime(app, url_prefix="/other")
    with pytest.raises(RuntimeError, match="one Realtime per app"):
        rt.init_app(app)
    standalone = create_app({"env": "development"})
    try:
        with pytest.raises(RuntimeError, match="one Realtime per app"):
            Realtime(standalone, url_prefix="/x")
    finally:
        standalone.extensions["wsserver"].shutdown()


def test_one_realtime_on_two_apps_publishes_to_the_current_ones_service():
    rt = Realtime(env="development")
    first, second = Flask("first"), Flask("second")
    rt.init_app(first, url_prefix="/rt")
    rt.init_app(second, url_prefix="/rt")
    try:
        one, two = first.extensions["wsserver"], second.extensions["wsserver"]
        assert one is not two
        with first.app_context():
            assert rt.service is one
        with second.app_context():
            assert rt.service is two
        assert rt.service is two  # outside any app: the last one given
    finally:
        first.extensions["wsserver"].shutdown()
        second.extensions["wsserver"].shutdown()


def test_the_gunicorn_hooks_find_the_service_in_the_users_app(make_user_app, monkeypatch,
                                                              tmp_path):
    """What post_worker_init reads (the lazy start, the budget, SIGTERM's 1001: run for real
    by tests/e2e/test_extension.py). Imported as tests/test_gunicorn_conf.py imports it, with a
    metrics directory of the test's."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    _find_service = importlib.import_module("wsserver.gunicorn_conf")._find_service
    app, rt = make_user_app()

    def worker_wrapper(environ: dict, start_response: Any) -> Any:  # as wsserver.worker wraps
        return app(environ, start_response)

    worker_wrapper.__wrapped__ = app  # type: ignore[attr-defined]
    assert _find_service(worker_wrapper) is rt.service
    assert _find_service(app) is rt.service


def test_url_prefix_is_normalised_or_refused():
    assert [_prefix(p) for p in ("", "/", "rt", "/rt/", "/a/b")] == ["", "", "/rt", "/rt", "/a/b"]
    for bad in ("/a//b", "/a/../b", "/./a", "/a?b", "/a#b", "/a b", "/a%2fb"):
        with pytest.raises(ValueError, match="url_prefix"):
            _prefix(bad)
    with pytest.raises(TypeError):
        _prefix(None)  # type: ignore[arg-type]


def test_an_empty_prefix_makes_any_app_the_standalone_server(make_app):
    """``url_prefix=""`` on an app that is not ``Flask("wsserver")``: wired in place (JSON
    errors for all of it, as create_app's), the browser client served from wsserver's own
    static folder."""
    app = Flask("userapp")
    rt = Realtime(app, env="development")
    try:
        client = app.test_client()
        assert client.get("/nope").get_json()["code"] == "not_found"
        assert client.get("/").get_json()["service"] == "ws"
        script = client.get("/static/wsserver.js")
        assert script.status_code == 200 and b"WsserverClient" in script.data
        script.close()
        assert client.get("/static/console.js").status_code == 200
        assert client.get("/static/other.js").status_code == 404
    finally:
        rt.service.shutdown()


def test_a_notification_over_the_body_limit_raises_413_as_notify_answers(make_user_app):
    """Measured as the UTF-8 JSON body a client would POST: ``é`` counts two bytes, not the
    six of its escape."""
    app, rt = make_user_app(max_body_size=1024)
    client = app.test_client()

    def body(data: str) -> dict:
        return {"event": "e", "message": "", "data": data}

    def size(data: str) -> int:
        return len(json.dumps(body(data), ensure_ascii=False).encode())

    fits = "x" * (1024 - size(""))
    assert size(fits) == 1024
    assert rt.publish("e", data=fits)
    with pytest.raises(BadRequest) as info:
        rt.publish("e", data=fits + "x")
    answer = client.post(PREFIX + "/notify", content_type="application/json",
                         data=json.dumps(body(fits + "x")).encode())
    assert answer.status_code == info.value.status == 413
    assert answer.get_json() == {"error": info.value.reason, "code": "body_too_large"}
    assert rt.publish("e", data="é" * 400)  # 6 * 400 escaped, 2 * 400 as UTF-8
    with pytest.raises(BadRequest, match="1024-byte limit"):
        rt.publish("e", data="é" * 600)


@pytest.mark.parametrize("path, whose", [
    ("/realtime", "wsserver"),
    ("/realtime/", "wsserver"),
    ("/realtime/../nope", "wsserver"),  # under the prefix: wsserver's JSON 404, never the app's
    ("/realtime/%2e%2e/nope", "wsserver"),
    ("/realtimes", "user"),
    ("/realtime.json", "user"),
    ("/Realtime/", "user"),
    ("/x/realtime/", "user"),
])
def test_the_prefix_matches_whole_segments_only(make_user_app, path, whose):
    app, _ = make_user_app()
    answer = app.test_client().get(path)
    if whose == "user":
        assert answer.data == b"my own 404 page", path
    else:
        assert answer.is_json, (path, answer.data[:80])


def test_a_prefix_that_would_hide_the_apps_own_routes_is_refused_or_warned_about(caplog):
    app = Flask("userapp")
    app.add_url_rule("/realtime/stats", "stats", lambda: "mine")
    with pytest.raises(ValueError, match="would hide the app's own routes /realtime/stats"):
        Realtime(app, url_prefix="/realtime", env="development")
    assert "wsserver" not in app.extensions and not isinstance(app.wsgi_app, PrefixMount)
    rt = Realtime(app, url_prefix="/rt", env="development")  # another prefix is fine
    try:
        app.add_url_rule("/rt/late", "late", lambda: "mine too")  # added after: never reached
        client = app.test_client()
        with caplog.at_level(logging.WARNING, logger="wsserver.extension"):
            assert client.get("/rt/late").get_json()["code"] == "not_found"
            assert client.get("/realtime/stats").data == b"mine"
        warned = [r.getMessage() for r in caplog.records if r.name == "wsserver.extension"]
        assert len(warned) == 1 and "/rt/late" in warned[0], warned  # once, at the first request
    finally:
        rt.service.shutdown()


def test_realtime_is_exported_lazily_and_the_gunicorn_config_stays_import_light(tmp_path):
    """``from wsserver import Realtime`` works, and importing the package or the gunicorn
    config imports neither Flask nor prometheus_client (the config sets the metrics directory
    before prometheus_client's first import)."""
    code = (
        "import sys, wsserver, wsserver.gunicorn_conf\n"
        "heavy = ('flask', 'prometheus_client', 'wsserver.extension', 'wsserver.app')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
        "from wsserver import Realtime\n"
        "print(Realtime.__module__)\n"
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path),
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=60, check=True).stdout.splitlines()
    assert out == ["[]", "wsserver.extension"], out
