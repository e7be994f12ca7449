"""wsserver.client: Publisher and Subscriber against a real server under gunicorn.

The retry logic against a scripted local HTTP server, the close-code policy and the URL
mapping are tested in-process: ``tests/test_client.py``. Every wait is bounded.
"""

from __future__ import annotations

import itertools
import socket
import threading
import time
import uuid
from pathlib import Path

import jwt
import pytest
from support import GunicornServer, free_port, serving, wait_for

from wsserver.client import (
    AuthError,
    InvalidNotification,
    Publisher,
    PublishError,
    Subscriber,
    SubscriptionError,
    WsserverError,
)

JWT_SECRET = "test-only-secret-0123456789abcdef0123456789"
API_KEY = "test-key-2f8e1c"


def room_name() -> str:
    return "r-" + uuid.uuid4().hex[:10]


def subscriber_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "wsserver-subscriber" and t.is_alive()]


@pytest.fixture(scope="module")
def strict_server():
    """API keys for /notify, tokens for /ws, and a short patience for bad commands."""
    env = {
        "WSSERVER_API_KEYS": f"other-key,{API_KEY}",
        "WSSERVER_JWT_SECRET": JWT_SECRET,
        "WSSERVER_MAX_INVALID_COMMANDS": "1",
    }
    with serving(env=env) as srv:
        yield srv


def token_for(user: str, ttl: int = 300) -> str:
    return jwt.encode({"sub": user, "exp": int(time.time()) + ttl}, JWT_SECRET, algorithm="HS256")


# -- Publisher and Subscriber on a real server ---------------------------------------------------


def test_published_notification_reaches_subscriber(server):
    room = room_name()
    got: list[dict] = []
    states: list[str] = []
    sub = Subscriber(server.ws_url, rooms=[room], on_message=got.append, on_state=states.append)
    with sub:
        assert sub.wait_ready(30), states
        assert [t.name for t in subscriber_threads()] == ["wsserver-subscriber"]
        with Publisher(server.url) as pub:
            answer = pub.publish("order.shipped", "Order 7 is on its way", data={"order": 7},
                                 room=room)
            assert answer["status"] == "ok" and set(answer["ids"]) == {room}
            everybody = pub.publish("maintenance")  # room-less: every connection gets it
            batch = pub.publish_batch([{"event": "b1", "room": room},
                                       {"event": "b2", "room": room_name()}])
            assert batch["status"] == "ok" and batch["accepted"] == 2
        wait_for(lambda: len(got) >= 3, timeout=30, message="three notifications")
        first = got[0]
        assert {k: first[k] for k in ("event", "message", "data", "room", "id")} == {
            "event": "order.shipped", "message": "Order 7 is on its way", "data": {"order": 7},
            "room": room, "id": answer["id"],
        }
        assert isinstance(first["ts"], int)
        assert [n["event"] for n in got] == ["order.shipped", "maintenance", "b1"]
        assert sub.last_ids == {room: batch["results"][0]["id"], None: everybody["id"]}
        assert not sub.gaps
    assert states[:3] == ["connecting", "open", "ready"] and states[-1] == "stopped"
    assert not sub.running and not subscriber_threads()
    assert sub.stop() is True  # idempotent


def test_iterator_api(server):
    room = room_name()
    with Subscriber(server.ws_url, rooms=[room]) as sub:
        assert sub.wait_ready(30)
        with Publisher(server.url) as pub:
            for i in range(3):
                pub.publish(f"n{i}", room=room)
        events = [n["event"] for n in itertools.islice(sub.messages(timeout=30), 3)]
        assert events == ["n0", "n1", "n2"]
    # stopped: the iterator ends at once instead of waiting for its timeout
    started = time.monotonic()
    assert list(sub.messages(timeout=10)) == []
    assert time.monotonic() - started < 5


def test_invalid_notifications_raise_typed_errors(server):
    with Publisher(server.url) as pub:
        with pytest.raises(InvalidNotification) as empty:
            pub.publish("")
        assert (empty.value.status, empty.value.code) == (400, "invalid_event")
        assert isinstance(empty.value, PublishError) and isinstance(empty.value, WsserverError)
        with pytest.raises(InvalidNotification) as both:
            pub.publish("x", room="a", rooms=["b"])
        assert both.value.code == "invalid_room" and "not both" in both.value.reason
        with pytest.raises(InvalidNotification) as big:
            pub.publish("big", message="x" * 70_000)
        assert big.value.status == 413
        with pytest.raises(TypeError):
            pub.publish("x", rooms="one-room-as-a-string")


def test_api_key_errors_and_success(strict_server):
    with Publisher(strict_server.url) as pub:
        with pytest.raises(AuthError) as missing:
            pub.publish("x")
        assert (missing.value.status, missing.value.code) == (401, "missing_api_key")
    with Publisher(strict_server.url, api_key="not-the-key") as pub:
        with pytest.raises(AuthError) as wrong:
            pub.publish("x")
        assert wrong.value.code == "invalid_api_key"
        assert "not-the-key" not in str(wrong.value)
    with Publisher(strict_server.url, api_key=API_KEY) as pub:
        assert pub.publish("x")["status"] == "ok"


def test_token_subscriber_gets_user_notifications(strict_server):
    # no token: the handshake is refused with 401, which reconnecting cannot fix
    refused = Subscriber(strict_server.ws_url, backoff_initial=0.01)
    with pytest.raises(SubscriptionError) as no_token:
        list(refused.messages(timeout=30))
    assert (no_token.value.status, no_token.value.code) == (401, "missing_token")
    assert refused.connects == 0 and not refused.running

    got: list[dict] = []
    # a callable token is asked for a fresh token at every connect
    with Subscriber(strict_server.ws_url, token=lambda: token_for("alice"),
                    on_message=got.append) as sub:
        assert sub.wait_ready(30)
        with Publisher(strict_server.url, api_key=API_KEY) as pub:
            pub.publish("dm", "for alice only", user="alice")
            pub.publish("dm", "for bob only", user="bob")
        wait_for(lambda: got, timeout=30, message="alice's notification")
        assert got[0]["user"] == "alice" and got[0]["message"] == "for alice only"


def test_fix_the_client_close_is_not_retried(strict_server):
    errors: list[SubscriptionError] = []
    sub = Subscriber(strict_server.ws_url, rooms=["not a room", "nor this!"],
                     token=token_for("carol"), on_error=errors.append, backoff_initial=0.01)
    with pytest.raises(SubscriptionError) as closed:
        list(sub.messages(timeout=30))
    assert closed.value.close_code == 1008
    assert "too many invalid commands" in closed.value.reason
    assert sub.connects == 1 and not sub.running
    # the first refusal is reported for its room, the close as the fatal error
    assert errors[0].room == "not a room" and errors[0].code == "invalid_room"
    assert errors[-1] is closed.value and sub.error is closed.value


# -- reconnect and resume ------------------------------------------------------------------------


def cut_connection(sub: Subscriber) -> None:
    """Simulate a network failure: the subscriber's socket dies without a close frame."""
    ws = sub._ws
    assert ws is not None and ws.sock is not None
    ws.sock.shutdown(socket.SHUT_RDWR)


def test_subscriber_resumes_without_gap_after_a_dropped_connection(server):
    room = room_name()
    got: list[dict] = []
    gaps: list[tuple] = []
    missed: list[str] = []
    publisher = Publisher(server.url)

    def on_state(state: str) -> None:
        # runs on the subscriber's thread before it reconnects: these two are published
        # while it is away, deterministically
        if state == "closed" and not missed and not sub._stopping.is_set():
            missed.extend(publisher.publish(f"missed-{i}", room=room)["id"] for i in range(2))

    sub = Subscriber(server.ws_url, rooms=[room], on_message=got.append, on_state=on_state,
                     on_gap=lambda r, reply: gaps.append((r, reply)), backoff_initial=0.05)
    with publisher, sub:
        assert sub.wait_ready(30)
        first = publisher.publish("live-0", room=room)["id"]
        wait_for(lambda: got, timeout=30, message="the first notification")
        cut_connection(sub)
        wait_for(lambda: len(got) == 3, timeout=30, message="the missed notifications, replayed")
        assert sub.connects == 2
        last = publisher.publish("live-1", room=room)["id"]
        wait_for(lambda: len(got) == 4, timeout=30, message="live again")
    assert [n["event"] for n in got] == ["live-0", "missed-0", "missed-1", "live-1"]
    assert [n["id"] for n in got] == [first, *missed, last]
    assert not gaps  # the server had it all in history: nothing was lost
    assert [info["recovered"] for _, info in sub.resumes] == [True]
    assert [info["missed"] for _, info in sub.resumes] == [2]


# -- reconnect across a restart ------------------------------------------------------------------


def server_on(port: int, env: dict[str, str] | None = None) -> GunicornServer:
    """A server on a given port (GunicornServer picks a free one by itself)."""
    srv = GunicornServer(env)
    srv.port = port
    srv.env["WSSERVER_PORT"] = str(port)
    srv.log_path = Path(f"/tmp/wsserver-test-{port}-{uuid.uuid4().hex[:6]}.log")
    return srv


def test_subscriber_reconnects_and_resumes_across_restart():
    port = free_port()
    first = server_on(port).start()
    second = None
    got: list[dict] = []
    gaps: list[tuple] = []
    closes: list = []
    sub = Subscriber(first.ws_url, rooms=["orders"], on_message=got.append,
                     on_gap=lambda room, reply: gaps.append((room, reply)),
                     on_state=lambda s: closes.append(sub.last_close) if s == "closed" else None,
                     backoff_initial=0.05, backoff_max=0.5)
    try:
        sub.start()
        assert sub.wait_ready(30)
        with Publisher(first.url) as pub:
            pub.publish("before-1", room="orders")
            last_before = pub.publish("before-2", room="orders")["id"]
            wait_for(lambda: len(got) == 2, timeout=30, message="notifications before restart")
            assert sub.last_ids == {"orders": last_before}

            first.stop()
            wait_for(lambda: closes, timeout=30, message="the subscriber to see the close")
            assert closes[0][0] == 1001  # "server shutting down": reconnect
            second = server_on(port).start()

            # it comes back by itself and subscribes again with since=<last id>; the new process
            # has no history, so the server says it cannot replay and the client reports it
            wait_for(lambda: gaps, timeout=30, message="the gap report after the restart")
            # the server's "missed": 0 there says nothing: reported as unknown, never as 0
            assert gaps == [("orders", {"type": "subscribed", "room": "orders",
                                        "recovered": False, "missed": None,
                                        "since": last_before})]
            assert sub.wait_ready(30)
            assert sub.connects == 2

            # the same Publisher: its kept-alive connection died with the old server
            answer = pub.publish("after", room="orders")
        wait_for(lambda: len(got) == 3, timeout=30, message="a notification after the restart")
        assert got[2]["event"] == "after" and got[2]["id"] == answer["id"] != last_before
        assert sub.last_ids == {"orders": answer["id"]}
        assert len(gaps) == 1
    finally:
        sub.stop()
        first.stop()
        if second is not None:
            second.stop()


def test_a_restart_that_lost_nothing_is_reported_recovered():
    """With Redis, history outlives the server process: after a restart the subscriber
    resumes with since=<last id> and reports ``recovered: True, missed: 0``: nothing was
    lost, and no gap is reported (the in-memory broker cannot tell: see
    test_subscriber_reconnects_and_resumes_across_restart, ``missed: None``)."""
    port = free_port()
    env = {"WSSERVER_REDIS_URL": "redis://127.0.0.1:6379/0",
           "WSSERVER_REDIS_PREFIX": "test-resume-" + uuid.uuid4().hex[:8]}
    first = server_on(port, env).start()
    second = None
    got: list[dict] = []
    sub = Subscriber(first.ws_url, rooms=["orders"], on_message=got.append,
                     backoff_initial=0.05, backoff_max=0.5)
    try:
        sub.start()
        assert sub.wait_ready(30)
        with Publisher(first.url) as pub:
            pub.publish("before", room="orders")
        wait_for(lambda: got, timeout=30, message="the notification before the restart")
        first.stop()
        second = server_on(port, env).start()
        wait_for(lambda: sub.resumes, timeout=30, message="the resume after the restart")
        room, info = sub.resumes[0]
        assert (room, info["recovered"], info["missed"]) == ("orders", True, 0)
        assert info["since"] == got[0]["id"]
        assert not sub.gaps
    finally:
        sub.stop()
        first.stop()
        if second is not None:
            second.stop()
