"""The same broker contract, against both backends: the in-memory one and Redis (the real
server on 127.0.0.1:6379). Ids increase per audience; history answers recovery the same
way; publishing is all-or-nothing."""

from __future__ import annotations

import time
import uuid

import pytest
import redis
from support import wait_for

from wsserver.broadcaster import Broadcaster
from wsserver.brokers import Outgoing, make_broker, order_of
from wsserver.config import load_settings
from wsserver.hub import Hub
from wsserver.protocol import Notification

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture(params=["memory", "redis"])
def make(request):
    prefix = f"wstest-{uuid.uuid4().hex[:10]}"
    made = []

    def build(size: int = 5, ttl: float = 300.0):
        env = {"WSSERVER_HISTORY_SIZE": str(size), "WSSERVER_HISTORY_TTL": str(ttl)}
        if request.param == "redis":
            env.update(WSSERVER_REDIS_URL=REDIS_URL, WSSERVER_REDIS_PREFIX=prefix)
        settings = load_settings(env)
        hub = Hub(10)
        broadcaster = Broadcaster(hub, 64, on_slow=lambda conn: None)
        broadcaster.start()
        broker = make_broker(settings)
        broker.start(broadcaster, hub)
        made.append((broker, broadcaster))
        wait_for(lambda: broker.ready, message="broker ready")
        return broker

    yield build
    for broker, broadcaster in made:
        broker.stop()
        broadcaster.stop(2)
    if request.param == "redis":
        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(f"{prefix}*"))
        if keys:
            client.delete(*keys)
        client.close()


def message(room: str | None = "r", user: str | None = None, data: int = 0) -> Outgoing:
    return Outgoing(room, user, Notification("e", "", data).envelope_prefix(room, int(time.time() * 1000)))


def test_ids_increase_per_audience(make):
    broker = make()
    ids = [broker.publish((message("a"),), 1)[0] for _ in range(5)]
    orders = [order_of(i) for i in ids]
    assert orders == sorted(orders) and len(set(ids)) == 5
    other = broker.publish((message("b"),), 1)[0]
    assert order_of(other) is not None
    both = broker.publish((message("a"), message("b")), 1)
    assert order_of(both[0]) > orders[-1] and order_of(both[1]) > order_of(other)


def test_history_replays_everything_after_since_in_order(make):
    broker = make(size=50)
    ids = [broker.publish((message("r", data=i),), 1)[0] for i in range(10)]
    recovery = broker.history("r", ids[3])
    assert recovery.recovered
    assert [o for o, _ in recovery.frames] == [order_of(i) for i in ids[4:]]
    assert all(f'"id":"{i}"'.encode() in frame for (_, frame), i in zip(recovery.frames, ids[4:]))
    up_to_date = broker.history("r", ids[-1])
    assert up_to_date.recovered and up_to_date.frames == []


def test_history_says_when_it_no_longer_reaches_back(make):
    broker = make(size=3)
    ids = [broker.publish((message("r"),), 1)[0] for _ in range(8)]
    assert not broker.history("r", ids[0]).recovered
    assert broker.history("r", ids[-3]).recovered  # ids[-2:] are still kept
    assert not broker.history("r", "999999999999999-0").recovered
    assert not broker.history("r", "not-an-id").recovered
    assert not broker.history("never-used", ids[0]).recovered


def test_history_expires(make):
    broker = make(size=10, ttl=1.0)
    first = broker.publish((message("t"),), 1)[0]
    broker.publish((message("t"),), 1)
    assert broker.history("t", first).recovered
    wait_for(lambda: not broker.history("t", first).recovered, timeout=5, message="history expiry")


def test_user_and_everybody_audiences_have_their_own_ids(make):
    broker = make()
    a = broker.publish((message(None, "u1"),), 1)[0]
    b = broker.publish((message(None, None),), 1)[0]
    c = broker.publish((message(None, "u1"),), 1)[0]
    assert order_of(c) > order_of(a) and b
