"""End to end: the server API against real gunicorn, with the memory broker (one worker) and
with Redis and two workers: ``POST /disconnect`` closes a user's connections on every worker
(4002, counted right, the Python Subscriber does not come back), ``POST /unsubscribe`` takes
them out of a room on every worker (later notifications no longer reach them), and
``GET /rooms/<room>/history`` answers what clients received, ``complete`` false once history is
trimmed past ``since``. Redis at 127.0.0.1:6379 with a key prefix of each test's own (the
fixtures of test_cluster.py). Every wait is bounded."""

from __future__ import annotations

import json
import struct
import time

import jwt
import pytest
import requests
from support import GunicornServer, RawClient, wait_for

from wsserver.client import Subscriber
from wsserver.codes import CLOSE_DISCONNECTED, REASON_DISCONNECTED
from wsserver.control import unsubscribed_reply

from .test_cluster import (  # noqa: F401 - prefix and servers are fixtures
    distinct_workers,
    prefix,
    redis_env,
    servers,
)
from .test_redis_health import hung  # noqa: F401 - a fixture: a private Redis to SIGSTOP

SECRET = "server-api-e2e-secret-that-is-long-enough-0123"
BROKERS = ["memory", "redis"]


def token(user: str) -> str:
    return jwt.encode({"sub": user, "exp": int(time.time()) + 600}, SECRET, algorithm="HS256")


def start(servers, prefix: str, broker: str, **extra: str) -> GunicornServer:  # noqa: F811
    env = {"WSSERVER_JWT_SECRET": SECRET, **extra}
    if broker == "redis":
        return servers({**env, **redis_env(prefix)}, args=["-w", "2"])
    return servers(env)


class Conn:
    """A raw WebSocket client of ``user`` (token in ``?token=``), in ``rooms``."""

    def __init__(self, server: GunicornServer, user: str, rooms: tuple[str, ...] = ()) -> None:
        query = f"?token={token(user)}" + (f"&rooms={','.join(rooms)}" if rooms else "")
        self.raw = RawClient(server, "/ws" + query, timeout=10)
        assert self.raw.status == 101, self.raw.status
        self.user = user

    def next(self) -> tuple:
        """("text", object) or ("close", code, reason); pings answered; 10 s at most."""
        while True:
            opcode, payload = self.raw.recv_frame()
            if opcode == 0x1:
                return ("text", json.loads(payload))
            if opcode == 0x8:
                return ("close", struct.unpack("!H", payload[:2])[0], payload[2:].decode())
            if opcode == 0x9:
                self.raw.send_frame(0xA, payload)

    def close(self) -> None:
        self.raw.close()


def spread(server: GunicornServer, broker: str, user: str, rooms: tuple[str, ...] = (),
           attempts: int = 60) -> tuple[list[Conn], dict[int, int]]:
    """Connections of ``user``, at least one on each worker (two with Redis); returns them
    and how many each worker holds (from each worker's own ``GET /`` counts)."""
    workers = distinct_workers(server, 2 if broker == "redis" else 1)
    conns: list[Conn] = []

    def local() -> dict[int, int]:
        return {w.pid: w.health()["worker"]["clients"] for w in workers}

    before = local()
    for _ in range(attempts):
        conns.append(Conn(server, user, rooms))
        wait_for(lambda: sum(local().values()) - sum(before.values()) == len(conns),
                 message="the new connection counted")
        now = local()
        if all(now[pid] > before[pid] for pid in now):
            break
    counts = {pid: n - before[pid] for pid, n in local().items()}
    assert all(counts.values()), f"a worker has none of {user}'s connections: {counts}"
    for w in workers:
        w.session.close()
    return conns, counts


def post(server: GunicornServer, path: str, body: dict) -> requests.Response:
    return requests.post(server.url + path, json=body, timeout=10)


@pytest.mark.parametrize("broker", BROKERS)
def test_disconnect_closes_a_users_connections_on_every_worker(broker, servers, prefix):  # noqa: F811
    server = start(servers, prefix, broker)
    mine, counts = spread(server, broker, "alice")
    bob = Conn(server, "bob")
    sub = Subscriber(server.ws_url, token=token("alice"), backoff_initial=0.05)
    sub.start()
    try:
        assert sub.wait_ready(10)
        wait_for(lambda: server.health()["clients"] == len(mine) + 2, message="counted")
        before = post(server, "/notify", {"event": "before", "user": "alice"})
        assert before.status_code == 200
        answer = post(server, "/disconnect", {"user": "alice"})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["status"] == "ok" and body["closed"] == len(mine) + 1, (body, counts)
        assert body["workers"] == (2 if broker == "redis" else 1) and body["unanswered"] == 0
        for conn in mine:
            kind, frame = conn.next()
            assert kind == "text" and frame["event"] == "before", "published before: first"
            assert conn.next() == ("close", CLOSE_DISCONNECTED, REASON_DISCONNECTED)
        wait_for(lambda: sub.state == "stopped", message="the subscriber stops")
        assert sub.error is not None and sub.error.close_code == CLOSE_DISCONNECTED
        assert sub.connects == 1, "no reconnect with the same token"
        assert post(server, "/notify", {"event": "after", "user": "bob"}).status_code == 200
        assert bob.next()[1]["event"] == "after", "another user's connection stays"
        again = post(server, "/disconnect", {"user": "alice"}).json()
        assert again["closed"] == 0, again
        assert post(server, "/disconnect", {"user": "nobody"}).json()["closed"] == 0
        wait_for(lambda: server.health()["clients"] == 1, message="alice's connections gone")
    finally:
        sub.stop()
        for conn in [*mine, bob]:
            conn.close()


@pytest.mark.parametrize("broker", BROKERS)
def test_unsubscribe_takes_a_user_out_of_a_room_on_every_worker(broker, servers, prefix):  # noqa: F811
    server = start(servers, prefix, broker)
    mine, _counts = spread(server, broker, "alice", ("room1",))
    bob = Conn(server, "bob", ("room1",))
    try:
        wait_for(lambda: _room_clients(server, "room1") == len(mine) + 1, message="counted")
        answer = post(server, "/unsubscribe", {"user": "alice", "room": "room1"})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["unsubscribed"] == len(mine) and body["unanswered"] == 0, body
        for conn in mine:
            assert conn.next() == ("text", unsubscribed_reply("room1"))
        published = post(server, "/notify", {"event": "later", "room": "room1"})
        assert published.status_code == 200
        marker = post(server, "/notify", {"event": "marker", "user": "alice"})
        assert marker.status_code == 200
        for conn in mine:
            kind, frame = conn.next()
            assert kind == "text" and frame["event"] == "marker", "the room's did not come"
        assert bob.next()[1]["event"] == "later"
        wait_for(lambda: _room_clients(server, "room1") == 1, message="only bob left")
        assert post(server, "/unsubscribe",
                    {"user": "alice", "room": "room1"}).json()["unsubscribed"] == 0
    finally:
        for conn in [*mine, bob]:
            conn.close()


def _room_clients(server: GunicornServer, room: str) -> int:
    rooms = requests.get(server.url + "/rooms", timeout=5).json()["rooms"]
    return next((r["clients"] for r in rooms if r["room"] == room), 0)


@pytest.mark.parametrize("broker", BROKERS)
def test_history_is_what_clients_received_and_says_when_it_was_trimmed(broker, servers, prefix):  # noqa: F811
    server = start(servers, prefix, broker, WSSERVER_HISTORY_SIZE="5")
    listener = Conn(server, "carol", ("h",))
    try:
        wait_for(lambda: _room_clients(server, "h") == 1, message="joined")
        for i in range(8):
            sent = post(server, "/notify", {"event": "e", "data": i, "room": "h"})
            assert sent.status_code == 200
        received = [listener.next()[1] for _ in range(8)]
        assert [m["data"] for m in received] == list(range(8))
        pages = [requests.get(server.url + "/rooms/h/history", timeout=10).json()
                 for _ in range(4)]  # several connections: both workers with Redis
        for page in pages:
            kept = page["messages"]
            assert len(kept) >= 5 and kept == received[-len(kept):], "what the client got"
            assert page["complete"] is True and page["more"] is False
        old = requests.get(server.url + "/rooms/h/history",
                           params={"since": received[0]["id"]}, timeout=10).json()
        assert old["complete"] is False, "since is older than what is kept"
        recent = requests.get(server.url + "/rooms/h/history",
                              params={"since": received[-3]["id"], "limit": 1}, timeout=10).json()
        assert recent == {"room": "h", "messages": [received[-2]], "complete": True, "more": True}
        for query, code in (({"limit": "100000"}, "invalid_limit"),
                            ({"limit": "-5"}, "invalid_limit"),
                            ({"since": "latest"}, "invalid_since")):
            refused = requests.get(server.url + "/rooms/h/history", params=query, timeout=10)
            assert refused.status_code == 400 and refused.json()["code"] == code
        unknown = requests.get(server.url + "/rooms/nobody-here/history", timeout=10).json()
        assert unknown["messages"] == [] and unknown["complete"] is True
    finally:
        listener.close()


def test_a_stalled_worker_is_counted_unanswered_and_still_acts_when_it_wakes(servers, prefix):  # noqa: F811
    """What ``closed`` honestly counts: a worker that cannot answer within the 2 s wait (here
    SIGSTOPped, our own process) is reported in ``unanswered`` and its connections are not
    counted; the message still reaches it, and it closes them when it runs again."""
    import os
    import signal

    server = start(servers, prefix, "redis")
    mine, counts = spread(server, "redis", "alice")
    stalled, running = list(counts)
    started = time.monotonic()
    os.kill(stalled, signal.SIGSTOP)
    try:
        answer = post(server, "/disconnect", {"user": "alice"})  # the running worker answers
        waited = time.monotonic() - started
    finally:
        os.kill(stalled, signal.SIGCONT)
    body = answer.json()
    assert answer.status_code == 200, body
    assert body == {"status": "ok", "closed": counts[running], "workers": 1, "unanswered": 1}
    assert 1.9 <= waited < 6, f"bounded by the 2 s wait: {waited:.2f} s"
    try:
        for conn in mine:  # the stalled worker's too, once it runs again
            kind, *rest = conn.next()
            assert (kind, *rest) == ("close", CLOSE_DISCONNECTED, REASON_DISCONNECTED)
    finally:
        for conn in mine:
            conn.close()


def test_during_a_redis_hang_the_server_api_answers_503_within_its_bound(hung):  # noqa: F811
    """Redis connected but answering nothing (SIGSTOP): a history read and a disconnect each
    answer 503 after the client's 2 s socket timeout, not later, and the worker serves the
    next request at once."""
    private, server = hung
    assert post(server, "/notify", {"event": "e", "room": "r"}).status_code == 200
    private.hang()
    try:
        for method, path, body, code in (
            ("GET", "/rooms/r/history", None, "history_unavailable"),
            ("POST", "/disconnect", {"user": "alice"}, "broker_unavailable"),
        ):
            started = time.monotonic()
            answer = requests.request(method, server.url + path, json=body, timeout=15)
            took = time.monotonic() - started
            assert answer.status_code == 503 and answer.json()["code"] == code, answer.text
            assert answer.headers["Retry-After"] == "1"
            assert took < 4.0, f"{path}: {took:.2f} s"
            assert requests.get(server.url + "/", timeout=2).status_code == 200
    finally:
        private.resume()
    wait_for(lambda: requests.get(server.url + "/rooms/r/history", timeout=5).status_code == 200,
             message="history readable again")
