"""wsserver.exceptions and wsserver.errors.refusal_answer: one tree of refusals, drawn in the
module's docstring as it really is, and one mapping from any refusal to an HTTP answer (status,
headers, JSON body, the audit count), the same in Flask and in plain WSGI."""

from __future__ import annotations

import json
import re

import pytest

from wsserver import create_app, errors, exceptions, metrics
from wsserver.exceptions import (
    AccessDenied,
    BadRequest,
    BrokerTimedOut,
    BrokerUnavailable,
    CommandError,
    HandshakeRefused,
    PublishRefused,
    QueueFull,
    Refusal,
    RoomLimitReached,
    SettingsError,
)


def _tree() -> dict[str, str]:
    """Each class named in the docstring's drawing -> the class drawn as its parent."""
    drawing = exceptions.__doc__.split("The tree::", 1)[1]
    parents: dict[str, str] = {}
    stack: list[tuple[int, str]] = [(-1, "Exception")]
    for line in drawing.splitlines():
        match = re.search(r"[├└]── (\w+)", line)
        if match is None:
            continue
        depth = match.start()
        while stack[-1][0] >= depth:
            stack.pop()
        parents[match.group(1)] = stack[-1][1]
        stack.append((depth, match.group(1)))
    return parents


def test_the_drawn_tree_is_the_real_one():
    parents = _tree()
    assert set(parents) == set(exceptions.__all__), parents
    assert parents["Refusal"] == parents["SettingsError"] == "Exception"
    for name, parent in parents.items():
        cls = getattr(exceptions, name)
        ours = [b.__name__ for b in cls.__bases__ if b.__module__ == exceptions.__name__]
        assert ours == ([] if parent == "Exception" else [parent]), (name, parent, cls.__bases__)


def test_every_exception_but_the_settings_error_is_a_refusal():
    for name in exceptions.__all__:
        cls = getattr(exceptions, name)
        assert issubclass(cls, Refusal) is (cls is not SettingsError), name
    # the old import locations other modules still use are the same classes
    from wsserver import auth, brokers, config, hub, protocol

    assert auth.AccessDenied is AccessDenied and brokers.BrokerUnavailable is BrokerUnavailable
    assert protocol.BadRequest is BadRequest and protocol.CommandError is CommandError
    assert config.SettingsError is SettingsError and hub.RoomLimitReached is RoomLimitReached
    assert issubclass(BadRequest, ValueError) and issubclass(CommandError, ValueError)


BEARER = ("WWW-Authenticate", 'Bearer realm="wsserver"')

# one instance of every refusal class (and every status that implies a header), and the
# answer it must get: (refusal, status, headers, code, reason)
ANSWERS = [
    pytest.param(Refusal(404, "not_found", "no such path"), 404, [], "not_found",
                 "no such path", id="Refusal"),
    pytest.param(BadRequest(405, "method_not_allowed", "use POST", headers=[("Allow", "POST")]),
                 405, [("Allow", "POST")], "method_not_allowed", "use POST", id="BadRequest-405"),
    pytest.param(BadRequest(413, "body_too_large", "over", "WSSERVER_MAX_BODY_SIZE=1"), 413, [],
                 "body_too_large", "over", id="BadRequest-413"),
    pytest.param(HandshakeRefused(426, "unsupported_websocket_version", "13 only"), 426,
                 [("Sec-WebSocket-Version", "13")], "unsupported_websocket_version", "13 only",
                 id="HandshakeRefused-426"),
    pytest.param(HandshakeRefused(400, "invalid_host", "no host"), 400, [], "invalid_host",
                 "no host", id="HandshakeRefused-400"),
    pytest.param(AccessDenied(401, "missing_token", "a token"), 401, [BEARER], "missing_token",
                 "a token", id="AccessDenied-401"),
    pytest.param(AccessDenied(403, "origin_forbidden", "no"), 403, [], "origin_forbidden", "no",
                 id="AccessDenied-403"),
    pytest.param(AccessDenied(429, "too_many_connections", "many"), 429, [("Retry-After", "5")],
                 "too_many_connections", "many", id="AccessDenied-429"),
    pytest.param(AccessDenied(503, "server_full", "full"), 503, [("Retry-After", "5")],
                 "server_full", "full", id="AccessDenied-503"),
    pytest.param(CommandError("invalid_room", "bad name"), 400, [], "invalid_room", "bad name",
                 id="CommandError"),
    pytest.param(RoomLimitReached("r", 3), 400, [], "too_many_rooms",
                 "a connection may be in at most 3 rooms", id="RoomLimitReached"),
    pytest.param(QueueFull("WSSERVER_QUEUE_SIZE=1"), 503, [("Retry-After", "1")], "queue_full",
                 "the broadcast queue is full; retry shortly", id="QueueFull"),
    pytest.param(BrokerUnavailable("redis: ConnectionError"), 503, [("Retry-After", "1")],
                 "broker_unavailable", "the message broker is unreachable; nothing was published",
                 id="BrokerUnavailable"),
    pytest.param(BrokerTimedOut("redis: TimeoutError"), 503, [("Retry-After", "1")],
                 "broker_unavailable",
                 "the message broker did not answer in time; the notification may have been "
                 "published: retry with the same Idempotency-Key", id="BrokerTimedOut"),
]


def _refusals(code: str) -> float:
    return metrics.REFUSALS.labels(code)._value.get()


@pytest.mark.parametrize("refusal, status, headers, code, reason", ANSWERS)
def test_refusal_answer_maps_every_refusal(refusal, status, headers, code, reason):
    before = _refusals(code)
    assert errors.refusal_answer(refusal, "192.0.2.1") == (
        status, headers, {"error": reason, "code": code}
    )
    assert _refusals(code) == before + 1
    errors.refusal_answer(refusal, "192.0.2.1", audited=False)
    assert _refusals(code) == before + 1


@pytest.mark.parametrize("refusal, status, headers, code, reason", ANSWERS)
def test_flask_and_wsgi_answers_are_the_same_mapping(refusal, status, headers, code, reason):
    app = create_app({"env": "development"})
    with app.test_request_context("/", environ_base={"REMOTE_ADDR": "192.0.2.2"}):
        response = errors.refusal_response(refusal)
    assert response.status_code == status and response.get_json() == errors.error_document(
        code, reason
    )
    for name, value in headers:
        assert response.headers.get(name) == value
    started: list = []
    body = errors.wsgi_refusal(refusal, {"REMOTE_ADDR": "192.0.2.2"},
                               lambda s, h: started.append((s, h)), [("Vary", "Origin")])
    (line, sent), = started
    assert int(line.split()[0]) == status
    assert sent[: len(headers) + 1] == [("Vary", "Origin"), *headers]
    assert json.loads(b"".join(body)) == {"error": reason, "code": code}


def test_a_publish_refusal_carries_its_one_text():
    for cls in (QueueFull, BrokerUnavailable):
        exc = cls()
        assert isinstance(exc, PublishRefused) and exc.status == 503
        assert exc.reason == cls.REASON and str(exc) == cls.REASON
    assert BrokerUnavailable("redis: down").cause == "redis: down"


# -- publish raises for both refusals, and /notify answers a batch with the same texts ---------


@pytest.fixture
def apps():
    made = []

    def make(**config):
        app = create_app({"env": "development", **config})
        made.append(app)
        return app

    yield make
    for app in made:
        app.extensions["wsserver"].shutdown()


def _stop_broadcaster(app) -> None:
    service = app.extensions["wsserver"]
    service.ensure_started()
    assert service.broadcaster.stop(2)  # nothing is taken off the queue any more


@pytest.mark.timeout(30)
def test_publish_raises_queue_full_and_a_batch_item_says_the_same(apps):
    from wsserver.protocol import Notification

    app = apps(enqueue_timeout=0.0, queue_size=1)
    _stop_broadcaster(app)
    service = app.extensions["wsserver"]
    with pytest.raises(QueueFull) as info:
        for _ in range(3):  # the first may still fit the one free slot
            service.publish(Notification("e", "", None))
    assert "WSSERVER_QUEUE_SIZE=1" in info.value.detail
    client = app.test_client()
    single = client.post("/notify", json={"event": "e"})
    assert single.status_code == 503 and single.headers["Retry-After"] == "1"
    batch = client.post("/notify", json=[{"event": "e"}, {"nope": 1}])
    assert batch.status_code == 200
    full, invalid = batch.get_json()["results"]
    assert (full["code"], full["error"]) == ("queue_full", single.get_json()["error"])
    assert invalid["code"] == "missing_event"
    everything_full = client.post("/notify", json=[{"event": "e"}, {"event": "f"}])
    assert everything_full.status_code == 503
    assert everything_full.get_json() == single.get_json()


@pytest.mark.timeout(30)
def test_publish_raises_broker_unavailable_and_a_batch_item_says_the_same(apps):
    app = apps(redis_url="redis://127.0.0.1:1/0")
    client = app.test_client()
    single = client.post("/notify", json={"event": "e"})
    assert single.status_code == 503
    assert single.get_json() == {"error": BrokerUnavailable.REASON, "code": "broker_unavailable"}
    batch = client.post("/notify", json=[{"event": "e"}, {"nope": 1}])
    down, _ = batch.get_json()["results"]
    assert (down["code"], down["error"]) == ("broker_unavailable", BrokerUnavailable.REASON)
