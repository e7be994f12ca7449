"""wsserver.client, in-process: the close-code policy, URL mapping, and the Publisher's retry
logic (503 + Retry-After, dropped connections) against a tiny local HTTP server that answers
exactly what each test scripts: a real 503 needs the broadcast queue full at the right
instant, which load cannot produce deterministically, and here it is the client that is under
test. Publisher and Subscriber against the real server: ``e2e/test_client.py``. Every wait is
bounded.
"""

from __future__ import annotations

import http.server
import json
import socket
import threading
import time
import uuid

import pytest
from support import free_port, wait_for

from wsserver.client import (
    AuthError,
    InvalidNotification,
    Publisher,
    PublishError,
    Unavailable,
    _should_reconnect,
    http_to_ws_url,
)


@pytest.mark.parametrize(
    "code, reason, renewable, reconnect",
    [
        (1001, "server shutting down", False, True),
        (1006, "", False, True),
        (1011, "keepalive ping timeout", False, True),
        (1013, "server full or restarting", False, True),
        (1008, "slow consumer", False, True),
        (1008, "too many invalid commands", False, False),
        (1002, "", False, False),
        (1007, "", False, False),
        (1009, "message over 65536 bytes", False, False),
        (4001, "token expired", False, False),
        (4001, "token expired", True, True),
        (4002, "disconnected by the server", False, False),
        (4002, "disconnected by the server", True, True),
    ],
)
def test_close_code_policy(code, reason, renewable, reconnect):
    assert _should_reconnect(code, reason, renewable) is reconnect


@pytest.mark.parametrize(
    "http, ws",
    [
        ("http://127.0.0.1:8080", "ws://127.0.0.1:8080/ws"),
        ("https://example.com/", "wss://example.com/ws"),
        ("https://example.com/notify-svc", "wss://example.com/notify-svc/ws"),
        ("ws://h:1/ws", "ws://h:1/ws"),
    ],
)
def test_http_to_ws_url(http, ws):
    assert http_to_ws_url(http) == ws


class ScriptedServer:
    """A local HTTP server answering POST /notify from a script, one step per request: a
    (status, headers, body) triple, or "drop" to close the connection without an answer.
    The last step repeats. Records when each request came and what it carried. Leaving, it
    ends the kept-alive connections too, so no handler thread outlives it."""

    def __init__(self, *script) -> None:
        self.script = list(script)
        self.requests: list[tuple[float, dict, bytes]] = []
        self.connections: list[socket.socket] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                outer.connections.append(self.connection)

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.requests.append((time.monotonic(), dict(self.headers), body))
                step = outer.script[min(len(outer.requests), len(outer.script)) - 1]
                if step == "drop":
                    self.close_connection = True
                    return
                status, headers, payload = step
                data = json.dumps(payload).encode()
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> ScriptedServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)
        for conn in self.connections:  # a handler waiting for the next request sees EOF
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def gaps(self) -> list[float]:
        times = [t for t, _, _ in self.requests]
        return [b - a for a, b in zip(times, times[1:])]


FULL = (503, {"Retry-After": "1"}, {"error": "the broadcast queue is full; retry shortly",
                                    "code": "queue_full"})


OK = (200, {}, {"status": "ok", "id": "9", "clients": 2})


def test_publisher_retries_503_after_retry_after():
    with ScriptedServer(FULL, OK) as fake, Publisher(fake.url, api_key="k1") as pub:
        assert pub.publish("e", "m", data={"a": 1}, room="r") == OK[2]
    assert len(fake.requests) == 2
    assert fake.gaps()[0] >= 0.95  # waited the server's Retry-After, 1 s
    _, headers, body = fake.requests[1]
    assert headers["Authorization"] == "Bearer k1"
    assert json.loads(body) == {"event": "e", "message": "m", "data": {"a": 1}, "room": "r"}


def test_publisher_caps_retry_after_and_gives_up_with_unavailable():
    long_wait = (503, {"Retry-After": "3600"}, FULL[2])
    with ScriptedServer(long_wait) as fake:
        with Publisher(fake.url, retries=2, max_retry_wait=0.1) as pub:
            started = time.monotonic()
            with pytest.raises(Unavailable) as exhausted:
                pub.publish("e")
            assert time.monotonic() - started < 10  # not an hour
    assert len(fake.requests) == 3  # the first try and two retries, no more
    assert all(gap >= 0.09 for gap in fake.gaps())
    err = exhausted.value
    assert (err.status, err.code, err.retry_after) == (503, "queue_full", 3600)
    assert isinstance(err, PublishError)


def test_publisher_retries_a_dropped_connection_and_503_without_hint():
    bare_503 = (503, {}, {"error": "busy", "code": "queue_full"})
    with ScriptedServer("drop", bare_503, OK) as fake:
        with Publisher(fake.url, backoff_initial=0.01, backoff_max=0.05) as pub:
            assert pub.publish_batch([{"event": "a"}, {"event": "b"}]) == OK[2]
    assert len(fake.requests) == 3
    assert json.loads(fake.requests[2][2]) == [{"event": "a"}, {"event": "b"}]


def test_publisher_sends_one_idempotency_key_per_call_and_reuses_it_on_retries():
    bare_503 = (503, {}, {"error": "busy", "code": "broker_unavailable"})
    with ScriptedServer("drop", bare_503, OK) as fake:
        with Publisher(fake.url, backoff_initial=0.01, backoff_max=0.05) as pub:
            pub.publish("e", room="r")
            pub.publish_batch([{"event": "a"}])
            pub.publish("e", idempotency_key="mine-7")
    keys = [headers.get("Idempotency-Key") for _, headers, _ in fake.requests]
    assert len(keys) == 5
    assert keys[0] == keys[1] == keys[2], "the retries of one call send its key"
    assert str(uuid.UUID(keys[0], version=4)) == keys[0]
    assert keys[3] != keys[0] and str(uuid.UUID(keys[3], version=4)) == keys[3]
    assert keys[4] == "mine-7"


def test_publisher_retries_a_read_timeout_with_the_same_key_and_says_which_key():
    slow = ScriptedServer(OK)
    with slow as fake:
        gate = threading.Event()
        original = fake.httpd.RequestHandlerClass.do_POST

        def late(handler) -> None:  # the first two requests are answered too late
            if len(fake.requests) < 2:
                gate.wait(1.0)
            original(handler)

        fake.httpd.RequestHandlerClass.do_POST = late
        with Publisher(fake.url, timeout=0.2, retries=1, backoff_initial=0.01) as pub:
            with pytest.raises(Unavailable) as err:
                pub.publish("e")
        gate.set()
        wait_for(lambda: len(fake.requests) >= 2, timeout=5, message="both attempts")
    assert err.value.code == "timeout" and err.value.idempotency_key
    keys = {headers["Idempotency-Key"] for _, headers, _ in fake.requests}
    assert keys == {err.value.idempotency_key}


def test_publisher_unreachable_server_is_unavailable():
    port = free_port()  # nothing listens there
    with Publisher(f"http://127.0.0.1:{port}", retries=2, backoff_initial=0.01) as pub:
        with pytest.raises(Unavailable) as err:
            pub.publish("e")
    assert err.value.status is None and err.value.code == "unreachable"


@pytest.mark.parametrize(
    "status, kind",
    [(400, InvalidNotification), (413, InvalidNotification), (401, AuthError),
     (403, AuthError), (500, PublishError)],
)
def test_publisher_does_not_retry_client_errors(status, kind):
    answer = (status, {}, {"error": "nope", "code": f"code_{status}"})
    with ScriptedServer(answer) as fake, Publisher(fake.url) as pub:
        with pytest.raises(kind) as err:
            pub.publish("e")
    assert type(err.value) is kind
    expected = (status, f"code_{status}", "nope")
    assert (err.value.status, err.value.code, err.value.reason) == expected
    assert len(fake.requests) == 1


def test_subscriber_forgets_a_room_the_server_takes_away_without_losing_its_place():
    """``unsubscribed`` with a ``code`` answers no command: the in-flight command queue (which
    attributes replies) is left alone, the room is forgotten (no rejoin on reconnect) and
    reported to on_error."""
    from wsserver.client import Subscriber

    errors = []
    sub = Subscriber("ws://127.0.0.1:1/ws", rooms=["private-a", "lobby"], since={"private-a": "7"},
                     on_error=errors.append)
    sub._inflight.append(("subscribe", "lobby", False))
    sub._on_reply({"type": "unsubscribed", "room": "private-a", "code": "room_forbidden",
                   "reason": "the refreshed token no longer grants this room"})
    assert sub.rooms == ["lobby"] and sub.last_ids == {}
    assert list(sub._inflight) == [("subscribe", "lobby", False)]
    (err,) = errors
    assert (err.code, err.room) == ("room_forbidden", "private-a")
    sub._on_reply({"type": "unsubscribed", "room": "lobby"})  # the answer to a command
    assert not sub._inflight


def test_subscriber_keeps_a_presence_rooms_members_from_the_reply_and_the_events():
    """The ``subscribed`` reply of a presence room sets the member list (and answers the
    in-flight subscribe); each ``presence`` event after it changes it; ``on_presence`` sees
    both with the list after them."""
    from wsserver.client import Members, Subscriber

    seen = []
    sub = Subscriber("ws://127.0.0.1:1/ws", rooms=["presence-x"],
                     on_presence=lambda event, members: seen.append((event["type"], members)))
    sub._on_reply({"type": "presence", "room": "presence-x", "action": "join", "user": "z"})
    assert sub.members("presence-x") is None and not seen  # before the reply: counted in it
    sub._inflight.append(("subscribe", "presence-x", False))
    sub._on_reply({"type": "subscribed", "room": "presence-x", "users": ["bob"], "anonymous": 1})
    assert not sub._inflight
    assert sub.members("presence-x") == Members("presence-x", ["bob"], 1)
    for action, user in (("join", "alice"), ("leave", None), ("leave", "bob"),
                         ("leave", "nobody")):
        sub._on_reply({"type": "presence", "room": "presence-x", "action": action, "user": user})
    assert sub.members("presence-x") == Members("presence-x", ["alice"], 0)
    assert [kind for kind, _ in seen] == ["subscribed"] + ["presence"] * 4
    assert seen[1][1].users == ["alice", "bob"]
    sub._inflight.append(("unsubscribe", "presence-x", False))
    sub._on_reply({"type": "unsubscribed", "room": "presence-x"})
    assert sub.members("presence-x") is None

# -- the server API (Publisher.history/disconnect/unsubscribe; 4002 in the Subscriber) -------


@pytest.fixture
def http_app(make_app):
    """The real app (memory broker) behind werkzeug's threaded HTTP server on a free port;
    stopped after the test (the app's service by ``make_app``)."""
    from werkzeug.serving import make_server

    app = make_app(env="development")
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, name="test-http", daemon=True)
    thread.start()
    yield app, f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_publisher_reads_history_and_calls_the_server_api(http_app):
    app, url = http_app
    with Publisher(url) as pub:
        ids = [pub.publish("e", data=i, room="team/7")["id"] for i in range(4)]
        page = pub.history("team/7", since=ids[0], limit=2)
        assert [m["id"] for m in page["messages"]] == ids[1:3]
        assert page["complete"] is True and page["more"] is True and page["room"] == "team/7"
        assert [m["data"] for m in pub.history("team/7")["messages"]] == [0, 1, 2, 3]
        assert pub.disconnect("alice") == {"status": "ok", "closed": 0, "workers": 1,
                                           "unanswered": 0}
        answer = pub.unsubscribe("alice", "team/7")
        assert answer["status"] == "ok" and answer["unsubscribed"] == 0
        with pytest.raises(InvalidNotification) as bad:
            pub.history("team/7", limit=5000)
        assert bad.value.code == "invalid_limit"
        with pytest.raises(InvalidNotification) as bad:
            pub.unsubscribe("alice", "not a room")
        assert bad.value.code == "invalid_room"


def test_server_api_calls_retry_a_503():
    with ScriptedServer(FULL, (200, {}, {"status": "ok", "closed": 1})) as fake:
        with Publisher(fake.url, max_retry_wait=0.05) as pub:
            assert pub.disconnect("alice")["closed"] == 1
    assert [json.loads(body) for _, _, body in fake.requests] == [{"user": "alice"}] * 2
    assert all("Idempotency-Key" not in headers for _, headers, _ in fake.requests)


def test_subscriber_never_reconnects_with_the_token_a_4002_closed():
    """A publisher's disconnect: a fixed token stops the subscriber with the close code; a
    token function is asked again, and one that returns the same token stops it too."""
    import struct

    from wsserver.client import Subscriber, SubscriptionError, _Retry

    close = struct.pack("!H", 4002) + b"disconnected by the server"
    fixed = Subscriber("ws://127.0.0.1:1/ws", token="t1")
    fixed._token_used = "t1"
    with pytest.raises(SubscriptionError) as stopped:
        fixed._closed_by_server(close)
    assert stopped.value.close_code == 4002 and fixed.last_close == (4002,
                                                                     "disconnected by the server")
    tokens = iter(["t1", "t2"])
    renewing = Subscriber("ws://127.0.0.1:1/ws", token=lambda: "t1")
    renewing._token_used = "t1"
    with pytest.raises(_Retry):
        renewing._closed_by_server(close)
    with pytest.raises(SubscriptionError) as spent:
        renewing._connect()
    assert spent.value.code == "token_spent" and spent.value.close_code == 4002
    fresh = Subscriber("ws://127.0.0.1:1/ws", token=lambda: next(tokens), connect_timeout=1)
    fresh._token_used = next(tokens)
    with pytest.raises(_Retry):
        fresh._closed_by_server(close)
    with pytest.raises(_Retry) as refused:  # "t2": offered (nobody listens on port 1)
        fresh._connect()
    assert "cannot connect" in str(refused.value)
