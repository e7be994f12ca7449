"""A Redis that hangs (SIGSTOP: the connection stays up, nothing answers), seen from a real
server: health tells the truth within a second, ``GET /`` never waits on Redis, and resumes
asked during the hang wait on their own threads, not on the broadcaster every client of the
worker waits on. Each test runs its own ``redis-server`` on a free port (never the shared
one), stopped by PID."""

from __future__ import annotations

import json
import threading
import time
import uuid
from typing import Iterator

import pytest
import requests
from support import GunicornServer, RedisProcess, connect, recv_json, wait_for

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def hung() -> Iterator[tuple[RedisProcess, GunicornServer]]:
    """A private Redis and a one-worker server on it; Redis running (hang it in the test)."""
    private = RedisProcess().start()
    server = GunicornServer(env={"WSSERVER_REDIS_URL": private.url,
                                 "WSSERVER_REDIS_PREFIX": f"t{uuid.uuid4().hex[:8]}"},
                            args=["-w", "1"])
    try:
        server.start()
        wait_for(lambda: requests.get(server.url + "/readyz", timeout=2).status_code == 200,
                 message="ready on Redis")
        yield private, server
    finally:
        private.resume()
        server.stop(graceful=False)
        private.stop()


def _timed_get(url: str) -> tuple[float, requests.Response]:
    start = time.monotonic()
    answer = requests.get(url, timeout=5)
    return time.monotonic() - start, answer


@pytest.mark.serial
def test_health_says_degraded_within_a_second_of_a_hang_and_get_root_never_waits(hung):
    private, server = hung
    private.hang()
    hung_at = time.monotonic()
    seen: dict[str, float] = {}
    slowest = 0.0
    while time.monotonic() - hung_at < 3.0 and len(seen) < 2:
        took, root = _timed_get(server.url + "/")
        slowest = max(slowest, took)
        if root.json()["status"] == "degraded":
            seen.setdefault("root", time.monotonic() - hung_at)
        took, ready = _timed_get(server.url + "/readyz")
        if ready.status_code == 503 and ready.json()["reason"] == "broker_unavailable":
            seen.setdefault("readyz", time.monotonic() - hung_at)
        time.sleep(0.05)
    assert set(seen) == {"root", "readyz"}, f"still ok 3 s into the hang: {seen}"
    assert max(seen.values()) < 1.0, f"health lagged the hang: {seen}"
    # a publish that times out keeps it so; GET / still answers at once meanwhile
    posted = threading.Thread(target=lambda: server.notify({"event": "e", "room": "x"}),
                              name="test-post")
    posted.start()
    for _ in range(10):
        took, root = _timed_get(server.url + "/")
        slowest = max(slowest, took)
        assert root.json()["status"] == "degraded"
        time.sleep(0.1)
    posted.join(10)
    assert slowest < 0.5, f"GET / waited {slowest:.2f}s on a hung Redis"
    private.resume()
    back = wait_for(lambda: requests.get(server.url + "/readyz", timeout=2).status_code == 200,
                    timeout=5, message="ready again once Redis answers")
    assert back and server.health()["status"] == "ok"


def test_resumes_during_a_hang_wait_on_their_own_threads_not_on_delivery(hung):
    """Four clients resume during a hang. Before, their reads ran one after another
    on the broadcaster thread (2 s timeout each: answers at 2, 4, 6 s... and no delivery to
    anybody meanwhile); now each read times out on its own connection's thread at once, and
    a message published the moment Redis answers again reaches a bystander at once."""
    private, server = hung
    posted = server.notify({"event": "e", "room": "hist", "data": 0}).json()
    since = posted["ids"]["hist"] if "ids" in posted else posted["id"]
    bystander = connect(server)
    bystander.send(json.dumps({"type": "subscribe", "room": "live"}))
    assert recv_json(bystander)["type"] == "subscribed"
    resumers = [connect(server) for _ in range(4)]
    private.hang()
    try:
        asked = time.monotonic()
        for ws in resumers:
            ws.send(json.dumps({"type": "subscribe", "room": "hist", "since": since}))
        answered = []
        for ws in resumers:
            reply = recv_json(ws)
            answered.append(time.monotonic() - asked)
            assert (reply["type"], reply["code"]) == ("error", "history_unavailable"), reply
        assert max(answered) < 3.5, f"reads waited on each other: {answered}"
    finally:
        private.resume()
    start = time.monotonic()
    wait_for(lambda: server.notify({"event": "e", "room": "live", "data": 1},
                                   timeout=5).status_code == 200,
             timeout=5, message="publishing again")
    assert recv_json(bystander)["data"] == 1
    assert time.monotonic() - start < 1.0
    resumers[0].send(json.dumps({"type": "subscribe", "room": "hist", "since": since}))
    assert recv_json(resumers[0]) == {"type": "subscribed", "room": "hist", "recovered": True,
                                      "missed": 0}
    for ws in [bystander, *resumers]:
        ws.close()


@pytest.mark.serial
def test_publishes_in_flight_to_a_hung_redis_hold_no_thread_and_each_gets_its_503(hung):
    """Single POSTs are published from the worker's main thread through a non-blocking
    pipeline (wsserver.brokers.rediswire.Pipeline): with Redis hung, several in flight at
    once must neither hold up ``GET /`` nor go unanswered: each gets a 503 within the Redis
    timeout (2 s) and a second, and once Redis answers again publishing works and delivers."""
    private, server = hung
    sessions = [requests.Session() for _ in range(8)]
    try:
        for session in sessions:  # keep-alive connections; the pipeline has its connection
            assert session.post(server.url + "/notify", json={"event": "warm"},
                                timeout=5).status_code == 200
        private.hang()
        answers: list[tuple[float, int, str]] = []

        def post(session: requests.Session) -> None:
            started = time.monotonic()
            answer = session.post(server.url + "/notify", json={"event": "hung"}, timeout=10)
            answers.append((time.monotonic() - started, answer.status_code,
                            answer.json().get("code", "")))

        posters = [threading.Thread(target=post, args=(s,), name="test-post") for s in sessions]
        for thread in posters:
            thread.start()
        slowest = 0.0
        while any(t.is_alive() for t in posters):
            took, root = _timed_get(server.url + "/")
            slowest = max(slowest, took)
            time.sleep(0.05)
        for thread in posters:
            thread.join(10)
        assert slowest < 0.5, f"GET / waited {slowest:.2f}s while publishes waited on Redis"
        assert len(answers) == len(sessions)
        assert all(status == 503 and code == "broker_unavailable" for _, status, code in answers)
        assert max(took for took, _, _ in answers) < 3.0, answers
        private.resume()
        wait_for(lambda: requests.get(server.url + "/readyz", timeout=2).status_code == 200,
                 timeout=10, message="ready again once Redis answers")
        ws = connect(server)
        try:
            for i, session in enumerate(sessions):
                answer = session.post(server.url + "/notify",
                                      json={"event": "after", "data": i}, timeout=5)
                assert answer.status_code == 200
            # a 503 for a timeout says "may have been published": the hung ones ran when
            # Redis resumed and may still arrive here; every accepted one must
            delivered = []
            while len(delivered) < len(sessions):
                message = recv_json(ws)
                if message["event"] == "after":
                    delivered.append(message["data"])
            assert delivered == list(range(len(sessions)))
        finally:
            ws.close()
    finally:
        for session in sessions:
            session.close()
