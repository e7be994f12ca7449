"""wsserver.serverapi through Flask's test client (the whole WSGI stack, the memory broker, real
connections on socketpairs in the app's hub): GET /rooms/<room>/history, POST /disconnect and
POST /unsubscribe, their answers, their validation (attacked as a hostile publisher would),
the publisher check and the defences /notify has. Redis and several workers:
tests/e2e/test_server_api.py."""

from __future__ import annotations

import json
import socket
import struct

import pytest
from rawws import FrameParser

from wsserver.auth import Identity
from wsserver.codes import CLOSE_DISCONNECTED
from wsserver.control import unsubscribed_reply
from wsserver.frames import OP_CLOSE, OP_TEXT
from wsserver.serverapi import HISTORY_LIMIT, HISTORY_MAX_LIMIT

API_KEY = "serverapi-test-key-7e1d"


@pytest.fixture
def register(app):
    """``register(user, rooms=())``: a connection of ``user`` (over a socketpair) in the
    app's hub; returns (conn, the client's socket). Taken out and closed after the test."""
    service = app.extensions["wsserver"]
    service.ensure_started()
    made = []

    def add(user: str | None, rooms=()):
        ours, theirs = socket.socketpair()
        identity = Identity(user=user, expires_at=2**40) if user is not None else None
        conn = service.new_connection(ours, "192.0.2.9", identity)
        assert service.hub.add(conn) is None
        for room in rooms:
            service.hub.subscribe(conn, room)
        made.append((conn, ours, theirs))
        return conn, theirs

    yield add
    for conn, ours, theirs in made:
        service.hub.remove(conn)
        conn.detach()
        ours.close()
        theirs.close()


def read_frames(sock: socket.socket, count: int) -> list[tuple[int, bytes]]:
    parser, frames = FrameParser(), []
    sock.settimeout(5)
    while len(frames) < count:
        frames += parser.feed(sock.recv(65536))
    return frames


def publish(client, room: str, n: int) -> list[str]:
    ids = []
    for i in range(n):
        resp = client.post("/notify", json={"event": "e", "data": i, "room": room})
        assert resp.status_code == 200
        ids.append(resp.get_json()["id"])
    return ids


# -- GET /rooms/<room>/history ---------------------------------------------------------------


def test_history_answers_the_envelopes_clients_received(client, register):
    _conn, sock = register("u", ("orders",))
    ids = publish(client, "orders", 3)
    received = [json.loads(p) for _, p in read_frames(sock, 3)]
    resp = client.get("/rooms/orders/history")
    assert resp.status_code == 200 and resp.mimetype == "application/json"
    body = resp.get_json()
    assert body == {"room": "orders", "messages": received, "complete": True, "more": False}
    assert [m["id"] for m in body["messages"]] == ids


def test_history_pages_after_since(client):
    ids = publish(client, "r", 7)
    page = client.get(f"/rooms/r/history?since={ids[1]}&limit=2").get_json()
    assert [m["id"] for m in page["messages"]] == ids[2:4]
    assert page["complete"] and page["more"]
    last = client.get(f"/rooms/r/history?since={ids[4]}&limit=2").get_json()
    assert [m["id"] for m in last["messages"]] == ids[5:] and not last["more"]
    newest = client.get("/rooms/r/history?limit=2").get_json()
    assert [m["id"] for m in newest["messages"]] == ids[-2:]


@pytest.mark.parametrize("settings_overrides", [{"env": "development", "history_size": 3}])
def test_history_is_incomplete_once_since_is_trimmed(client, settings_overrides):
    ids = publish(client, "r", 6)
    old = client.get(f"/rooms/r/history?since={ids[0]}").get_json()
    assert old["complete"] is False and [m["id"] for m in old["messages"]] == ids[-3:]
    kept = client.get(f"/rooms/r/history?since={ids[2]}").get_json()
    assert kept["complete"] is True and [m["id"] for m in kept["messages"]] == ids[3:]
    earlier_run = client.get("/rooms/r/history?since=1-5").get_json()
    assert earlier_run["complete"] is False and len(earlier_run["messages"]) == 3


def test_history_of_rooms_nobody_published_to(client):
    assert client.get("/rooms/empty/history").get_json() == {
        "room": "empty", "messages": [], "complete": True, "more": False}
    unknown = client.get("/rooms/empty/history?since=1-1").get_json()
    assert unknown["messages"] == [] and unknown["complete"] is False
    slashed = client.get("/rooms/team/7:chat/history").get_json()
    assert slashed["room"] == "team/7:chat", "room names may hold /"


@pytest.mark.parametrize("query, code", [
    ("limit=0", "invalid_limit"),
    ("limit=-1", "invalid_limit"),
    (f"limit={HISTORY_MAX_LIMIT + 1}", "invalid_limit"),
    ("limit=99999999999999999999999", "invalid_limit"),
    ("limit=1e3", "invalid_limit"),
    ("limit=", "invalid_limit"),
    ("limit=%201", "invalid_limit"),
    ("since=abc", "invalid_since"),
    ("since=12", "invalid_since"),
    ("since=-1-1", "invalid_since"),
    ("since=1-2-3", "invalid_since"),
    ("since=", "invalid_since"),
    ("since=99999999999999999999-0", "invalid_since"),
    ("since=1-1%0A", "invalid_since"),
])
def test_history_refuses_bad_parameters_with_a_json_400(client, query, code):
    resp = client.get(f"/rooms/r/history?{query}")
    assert resp.status_code == 400 and resp.get_json()["code"] == code
    assert resp.get_json()["error"]


def test_history_limits_default_and_maximum(client):
    ids = publish(client, "big", HISTORY_LIMIT + 5)
    assert len(client.get("/rooms/big/history").get_json()["messages"]) == HISTORY_LIMIT
    everything = client.get(f"/rooms/big/history?limit={HISTORY_MAX_LIMIT}").get_json()
    assert [m["id"] for m in everything["messages"]] == ids[-100:], "history keeps 100"


@pytest.mark.parametrize("path", ["/rooms/-bad/history", "/rooms/a%20b/history",
                                  "/rooms/" + "x" * 129 + "/history", "/rooms/ü/history"])
def test_history_refuses_bad_room_names(client, path):
    resp = client.get(path)
    assert resp.status_code == 400 and resp.get_json()["code"] == "invalid_room"


def test_history_lock_held_past_its_bound_is_a_503(make_app):
    """The memory broker's lock held (a publisher waiting on a full queue): the read waits
    WSSERVER_ENQUEUE_TIMEOUT + 0.25 s at most, then 503 history_unavailable."""
    app = make_app(env="development", enqueue_timeout=0.0)
    client = app.test_client()
    service = app.extensions["wsserver"]
    service.ensure_started()
    broker = service.broker
    with broker._lock:
        resp = client.get("/rooms/r/history")
    assert resp.status_code == 503 and resp.get_json()["code"] == "history_unavailable"
    assert resp.headers["Retry-After"] == "1"


# -- POST /disconnect, POST /unsubscribe ----------------------------------------------------


def test_disconnect_closes_the_users_connections_and_counts_them(client, register):
    mine = [register("alice"), register("alice", ("r",))]
    _other, other_sock = register("bob")
    resp = client.post("/disconnect", json={"user": "alice"})
    assert resp.status_code == 200
    assert resp.get_json() == {"status": "ok", "closed": 2, "workers": 1, "unanswered": 0}
    for _conn, sock in mine:
        [(opcode, payload)] = read_frames(sock, 1)
        assert opcode == OP_CLOSE and struct.unpack("!H", payload[:2])[0] == CLOSE_DISCONNECTED
    other_sock.settimeout(0.2)
    with pytest.raises(socket.timeout):
        other_sock.recv(1)
    assert client.post("/disconnect", json={"user": "alice"}).get_json()["closed"] == 0
    assert client.post("/disconnect", json={"user": "nobody"}).get_json()["closed"] == 0


def test_unsubscribe_replies_to_each_connection_and_counts_them(client, register):
    (a, sock_a), (b, sock_b) = register("alice", ("r", "s")), register("alice", ("r",))
    (c, _sock_c) = register("carol", ("r",))
    resp = client.post("/unsubscribe", json={"user": "alice", "room": "r"})
    assert resp.get_json() == {"status": "ok", "unsubscribed": 2, "workers": 1, "unanswered": 0}
    for sock in (sock_a, sock_b):
        [(opcode, payload)] = read_frames(sock, 1)
        assert opcode == OP_TEXT and json.loads(payload) == unsubscribed_reply("r")
    service = client.application.extensions["wsserver"]
    assert service.hub.rooms_of(a) == ["s"] and service.hub.rooms_of(b) == []
    assert service.hub.rooms_of(c) == ["r"]
    publish(client, "r", 1)
    [(_, payload)] = read_frames(_sock_c, 1)
    assert json.loads(payload)["room"] == "r"
    sock_b.settimeout(0.2)
    with pytest.raises(socket.timeout):
        sock_b.recv(1)


@pytest.mark.parametrize("path, body, code", [
    ("/disconnect", {}, "missing_user"),
    ("/disconnect", {"user": None}, "missing_user"),
    ("/disconnect", {"user": ""}, "invalid_user"),
    ("/disconnect", {"user": 7}, "invalid_user"),
    ("/disconnect", {"user": ["a"]}, "invalid_user"),
    ("/disconnect", {"user": "x" * 257}, "invalid_user"),
    ("/disconnect", ["alice"], "not_an_object"),
    ("/disconnect", "alice", "not_an_object"),
    ("/unsubscribe", {"user": "alice"}, "missing_room"),
    ("/unsubscribe", {"user": "alice", "room": ""}, "invalid_room"),
    ("/unsubscribe", {"user": "alice", "room": "a b"}, "invalid_room"),
    ("/unsubscribe", {"user": "alice", "room": 5}, "invalid_room"),
    ("/unsubscribe", {"room": "r"}, "missing_user"),
])
def test_bad_bodies_are_a_json_400(client, path, body, code):
    resp = client.post(path, json=body)
    assert resp.status_code == 400 and resp.get_json()["code"] == code, resp.get_json()


@pytest.mark.parametrize("path", ["/disconnect", "/unsubscribe"])
def test_bodies_that_are_not_json_objects(client, path):
    assert client.post(path, data="{", content_type="application/json").get_json()["code"] == (
        "invalid_json")
    assert client.post(path, data=b"\xff", content_type="application/json").status_code == 400
    form = client.post(path, data="user=alice")  # a cross-site form cannot send JSON
    assert form.status_code == 415 and form.get_json()["code"] == "unsupported_media_type"
    huge = client.post(path, data=b" " * (64 * 1024 + 1), content_type="application/json")
    assert huge.status_code == 413
    wrong = client.get(path)
    assert wrong.status_code == 405 and wrong.get_json()["code"] == "method_not_allowed"


@pytest.fixture
def keyed(make_app):
    return make_app(env="production", api_keys=(API_KEY,),
                    allowed_origins=("https://app.example",)).test_client()


@pytest.mark.parametrize("method, path, body", [
    ("get", "/rooms/r/history", None),
    ("post", "/disconnect", {"user": "alice"}),
    ("post", "/unsubscribe", {"user": "alice", "room": "r"}),
])
def test_the_server_api_needs_a_publisher(keyed, method, path, body):
    call = getattr(keyed, method)
    refused = call(path, json=body)
    assert refused.status_code == 401 and refused.get_json()["code"] == "missing_api_key"
    wrong = call(path, json=body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code in (401, 403)
    auth = {"Authorization": f"Bearer {API_KEY}"}
    assert call(path, json=body, headers=auth).status_code == 200
    foreign = call(path, json=body, headers={**auth, "Origin": "https://evil.example"})
    assert foreign.status_code == 403 and foreign.get_json()["code"] == "origin_forbidden"
    allowed = call(path, json=body, headers={**auth, "Origin": "https://app.example"})
    assert allowed.headers["Access-Control-Allow-Origin"] == "https://app.example"
    preflight = keyed.options(path, headers={"Origin": "https://evil.example"})
    assert preflight.status_code == 403


def test_a_full_queue_is_a_503_and_nothing_is_sent(make_app, register):
    app = make_app(env="development", queue_size=1, enqueue_timeout=0.0)
    client = app.test_client()
    service = app.extensions["wsserver"]
    service.ensure_started()
    broadcaster = service.broadcaster
    broadcaster.stop(1)  # takes nothing more: as a queue that stays full
    resp = client.post("/disconnect", json={"user": "alice"})
    assert resp.status_code == 503 and resp.get_json()["code"] == "queue_full"
    assert resp.headers["Retry-After"] == "1"


def test_during_shutdown_the_answer_is_shutting_down(make_app):
    app = make_app(env="development", enqueue_timeout=0.0)
    client = app.test_client()
    service = app.extensions["wsserver"]
    service.ensure_started()
    service.shutdown()
    resp = client.post("/unsubscribe", json={"user": "alice", "room": "r"})
    assert resp.status_code == 503 and resp.get_json()["code"] == "shutting_down"
