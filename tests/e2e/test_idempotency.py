"""End to end: retries never duplicate (issue 14, point 2). A Redis hang makes publishes time
out (2 s, answered 503) that Redis still runs when it wakes; the ``Publisher`` retries them
with the same ``Idempotency-Key``, so each notification is stored and delivered once: to a
client connected throughout, and to one resuming from before the hang.

The hang is a private ``redis-server`` on a free port stopped with SIGSTOP for 6 s (the shared
Redis at 6379 is left alone: ``DEBUG SLEEP`` there would stall every other test). Processes are
stopped by PID; every wait is bounded.
"""

from __future__ import annotations

import threading
import time
from collections import Counter

from support import GunicornServer, wait_for

from wsserver.client import Publisher, Subscriber

HANG = 6.0  # seconds Redis is stopped: three 2 s publish timeouts in a row
PUBLISHERS = 3
EACH = 5  # notifications per publisher thread


class Collector:
    """A ``Subscriber`` to room ``r`` whose notifications are counted by ``data.n``."""

    def __init__(self, server: GunicornServer, since: str | None = None) -> None:
        self.seen: Counter[int] = Counter()
        self.ids: dict[int, set[str]] = {}
        self.lock = threading.Lock()
        ws_url = server.url.replace("http://", "ws://") + "/ws"
        self.sub = Subscriber(ws_url, rooms=["r"], since=since, on_message=self.on_message,
                              keepalive=60)
        self.sub.start()
        assert self.sub.wait_ready(10), "subscriber ready"

    def on_message(self, notification) -> None:
        n = notification["data"]["n"]
        with self.lock:
            self.seen[n] += 1
            self.ids.setdefault(n, set()).add(notification["id"])

    def count(self) -> int:
        with self.lock:
            return sum(self.seen.values())


def publish_all(url: str, first: int, answers: dict[int, dict], errors: list) -> None:
    with Publisher(url, timeout=10, retries=8, max_retry_wait=1.0) as pub:
        for n in range(first, first + EACH):
            try:
                answers[n] = pub.publish("tick", data={"n": n}, room="r")
            except Exception as exc:  # noqa: BLE001 - reported by the test
                errors.append((n, exc))
            time.sleep(0.3)  # spread the publishes over the hang


def test_a_redis_hang_with_retries_delivers_each_notification_once(private_redis, make_server):
    server = make_server({
        "WSSERVER_REDIS_URL": private_redis.url,
        "WSSERVER_REDIS_PREFIX": "idem",
        "WSSERVER_PING_INTERVAL": "600",
    }, args=["-w", "1"])
    live = Collector(server)
    with Publisher(server.url) as pub:
        marker = pub.publish("tick", data={"n": -1}, room="r")["id"]
    wait_for(lambda: live.count() == 1, timeout=10, message="the marker, live")

    answers: dict[int, dict] = {}
    errors: list = []
    threads = [threading.Thread(target=publish_all, args=(server.url, i * EACH, answers, errors))
               for i in range(PUBLISHERS)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)  # a few publishes go through before the hang
    started = time.monotonic()
    private_redis.hang()  # resumed HANG seconds later, from a timer thread
    timer = threading.Timer(HANG, private_redis.resume)
    timer.daemon = True
    timer.start()
    for thread in threads:
        thread.join(60)
    assert time.monotonic() - started >= HANG - 0.5, "the publishes outlasted the hang"
    assert not errors, errors
    total = PUBLISHERS * EACH
    repeated = sum(1 for a in answers.values() if a.get("repeated"))

    wait_for(lambda: live.count() >= total + 1, timeout=15, message="live deliveries")
    resumed = Collector(server, since=marker)
    wait_for(lambda: resumed.count() >= total, timeout=15, message="replayed deliveries")
    time.sleep(0.5)  # a duplicate would arrive right behind
    try:
        expected = Counter(range(total))
        assert resumed.seen == expected, f"resumed: {resumed.seen - expected} extra"
        live.seen.pop(-1)
        assert live.seen == expected, f"live: {live.seen - expected} extra"
        for n, answer in answers.items():  # each id is the one the publisher was answered
            assert live.ids[n] == resumed.ids[n] == {answer["id"]}, n
    finally:
        live.sub.stop()
        resumed.sub.stop()
    # the path under test ran: an attempt timed out (503), ran when Redis woke, and its
    # retry was answered with its ids
    assert repeated >= 1, "no publish was answered as a repeat: the hang did not bite"
