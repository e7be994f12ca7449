"""wsserver.service: lifecycle (threads started once, stopped on shutdown), publishing, the
connection budget, and slow consumers counted once; in-process over socketpairs."""

from __future__ import annotations

import gc
import threading
import time
import weakref

import pytest
from rawws import OP_CLOSE, close_code

from wsserver import metrics
from wsserver.auth import Identity
from wsserver.config import load_settings
from wsserver.protocol import Notification
from wsserver.service import NotificationService


@pytest.mark.parametrize(
    "threads, http_threads, max_connections, budget",
    [
        (100, 32, 0, 68),  # the threads left after HTTP's share
        (100, 32, 10, 10),  # capped by WSSERVER_MAX_CONNECTIONS
        (100, 32, 500, 68),  # never more than the threads
        (32, 32, 0, 1),  # a --threads flag at HTTP's share still serves one
        (8, 32, 0, 1),
    ],
)
def test_the_connection_budget_is_one_rule(threads, http_threads, max_connections, budget):
    settings = load_settings({}, {"threads": 100, "http_threads": http_threads,
                                  "max_connections": max_connections})
    assert settings.connection_budget_for(threads) == budget
    service = NotificationService(settings)
    assert service.hub.capacity == settings.connection_budget == \
        settings.connection_budget_for(100)
    service.limit_connections(threads)  # what gunicorn's real thread count sets
    assert service.hub.capacity == budget


@pytest.mark.timeout(20)
def test_started_once_per_process_with_named_threads_and_shutdown_stops_them():
    service = NotificationService(load_settings({}, {"shutdown_timeout": 1.0}))
    assert service.healthy and service.broadcaster is None, "nothing started before needed"
    service.ensure_started()
    broadcaster = service.broadcaster
    service.ensure_started()
    assert service.broadcaster is broadcaster, "started once"
    names = {t.name for t in threading.enumerate()}
    assert {"wsserver-broadcaster", "wsserver-history-sweeper"} <= names
    assert service.healthy and service.ready
    service.shutdown()
    service.shutdown()  # idempotent
    assert not service.hub.accepting and not service.ready
    # the autouse fixture checks that every thread it started has ended


@pytest.mark.timeout(20)
def test_shutdown_closes_every_client_with_1001(served):
    s = served()
    conn, peer = s.connect()
    other, other_peer = s.connect()
    closes = metrics.SERVER_CLOSES.labels("shutting_down")
    before = closes._value.get()
    started = time.monotonic()
    s.service.shutdown()  # no session thread answers: cut after WSSERVER_SHUTDOWN_TIMEOUT
    assert time.monotonic() - started < 3
    for client in (peer, other_peer):
        op, payload = client.frames(1)[0]
        assert op == OP_CLOSE and close_code(payload) == 1001
    assert not s.service.hub.accepting
    assert closes._value.get() == before + 2, "every 1001 is counted in /metrics"


@pytest.mark.timeout(20)
def test_publish_counts_the_deliveries_it_queued(served):
    s = served()
    a, _ = s.connect()
    b, _ = s.connect(identity=Identity("bob", time.time() + 60))
    s.service.commands.subscribe(a, "r")
    s.service.commands.subscribe(b, "r")
    s.service.commands.subscribe(a, "q")
    everyone = s.service.publish(Notification("e", "m", None))
    assert everyone is not None and everyone.clients == 2 and list(everyone.ids) == [None]
    rooms = s.service.publish(Notification("e", "m", None, rooms=("r", "q")))
    assert rooms is not None and rooms.clients == 3, "a client in two target rooms counts twice"
    assert set(rooms.ids) == {"r", "q"}
    user = s.service.publish(Notification("e", "m", None, user="bob"))
    assert user is not None and user.clients == 1


@pytest.mark.timeout(30)
def test_connections_that_joined_got_messages_and_left_are_freed_without_the_cyclic_gc(served):
    """Churn: 200 clients join a room, get a message, and leave. With the collector off none
    of them may stay in memory: a cycle per connection is freed only by full collections,
    and under churn the dead connections piled up between them (the soak's RSS climb)."""
    s = served()
    s.conns.clear()
    gc.collect()
    gc.disable()
    try:
        refs = []
        for _ in range(200):
            conn, peer = s.connect()
            s.conns.remove(conn)
            s.service.commands.subscribe(conn, "r")
            assert s.service.publish(Notification("e", "m", None, rooms=("r",))).clients == 1
            assert peer.messages(1)[0]["event"] == "e"
            s.service.hub.remove(conn)
            conn.detach()
            refs.append(weakref.ref(conn))
            del conn, peer
        s.service.hub.settle()
        alive = sum(ref() is not None for ref in refs)
    finally:
        gc.enable()
    # the broadcaster may still hold the last one or two for a moment
    assert alive <= 2, f"{alive} of 200 departed connections wait for the cyclic GC"


@pytest.mark.timeout(20)
def test_a_slow_consumer_is_dropped_and_counted_once(served):
    s = served()
    conn, _ = s.connect()
    before = metrics.SLOW_CONSUMERS._value.get()
    s.service.drop_slow(conn)
    s.service.report_slow(conn)  # its own thread, on the way out
    assert not s.service.hub.has(conn.id)
    assert metrics.SLOW_CONSUMERS._value.get() == before + 1


def test_a_new_connection_carries_its_identity_and_command_bucket(served):
    s = served(max_command_rate=3, max_rooms_per_connection=4)
    identity = Identity("carol", time.time() + 60)
    conn, _ = s.connect(identity=identity)
    assert conn.identity is identity and conn.user == "carol"
    assert conn.commands.rate == 3 and conn.commands.burst == 4 * 5 + 2 * 3


# -- several workers are one service (Redis) -------------------------------------------------

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture
def redis_workers(served, redis_prefix):
    """``workers(n)``: n started services ("workers") on one Redis and one key prefix of this
    test's own, deleted afterwards."""
    return lambda n: [served(redis_url=REDIS_URL, redis_prefix=redis_prefix) for _ in range(n)]


def _census(s) -> tuple:
    _mine, cluster = s.service.census()
    return None if cluster is None else (cluster.workers, cluster.clients, cluster.rooms,
                                         cluster.users)


def _wait_within(predicate, limit: float, what: str) -> float:
    """Wait (at most 5 s) for ``predicate``; fail unless it held within ``limit`` s."""
    from support import wait_for

    start = time.monotonic()
    wait_for(predicate, timeout=5, interval=0.01, message=what)
    took = time.monotonic() - start
    assert took <= limit, f"{what}: took {took:.2f}s, more than {limit}s"
    return took


@pytest.mark.timeout(30)
def test_workers_on_one_redis_count_as_one_service(redis_workers):
    a, b = redis_workers(2)
    for s in (a, b):
        s.service.broker.wait_ready(5)
    u1 = Identity("u1", time.time() + 600)
    conns_a = [a.connect(identity=u1)[0], a.connect()[0], a.connect()[0]]
    conns_b = [b.connect(identity=u1)[0], b.connect()[0]]
    for conn in conns_a[:2]:
        a.service.hub.subscribe(conn, "x")
    b.service.hub.subscribe(conns_b[0], "x")
    want = (2, 5, {"x": 3}, {"u1": 2})
    _wait_within(lambda: _census(a) == want and _census(b) == want, 1.0, "both see 5 clients")

    # POST /notify's clients: the audience across both workers, this worker's beside it
    for note, total, mine in ((Notification("e", "", 1), 5, 3),
                              (Notification("e", "", 1, rooms=("x",)), 3, 2),
                              (Notification("e", "", 1, user="u1"), 2, 1)):
        published = a.service.publish(note)
        assert (published.clients, published.worker_clients) == (total, mine), note
    mine, rooms = b.service.rooms()
    assert mine == {"x": 1} and rooms == {"x": 3}

    # churn on b: a sees each change within a second
    b.service.hub.remove(conns_b[0])
    _wait_within(lambda: _census(a) == (2, 4, {"x": 2}, {"u1": 1}), 1.0, "a sees b's leaver")
    b.service.hub.subscribe(conns_b[1], "y")
    _wait_within(lambda: _census(a) == (2, 4, {"x": 2, "y": 1}, {"u1": 1}), 1.0, "a sees a join")

    # a stopped worker's numbers go at once
    b.close()
    _wait_within(lambda: _census(a) == (1, 3, {"x": 2}, {"u1": 1}), 0.5, "b gone")


@pytest.mark.timeout(30)
def test_a_dead_workers_numbers_expire_within_two_seconds(redis_workers):
    a, b = redis_workers(2)
    b.connect()
    _wait_within(lambda: _census(a) == (2, 1, {}, {}), 1.5, "a sees b's client")
    broker = b.service.broker
    # what a SIGKILL leaves: b's threads stop without deleting its report
    broker._stop.set()
    for thread in (broker._thread, broker._reporter):
        thread.join(5)
    took = _wait_within(lambda: _census(a) == (1, 0, {}, {}), 2.0, "b's report expired")
    assert took > 0.5, "expiry, not a stop, removed it"


def test_without_a_view_of_the_others_a_worker_shows_its_own(served):
    s = served()  # memory: one process
    s.connect()
    mine, cluster = s.service.census()
    assert cluster is None and mine.clients == 1 and mine.workers == 1
    published = s.service.publish(Notification("e", "", 1))
    assert (published.clients, published.worker_clients) == (1, 1)


def test_the_start_log_names_the_redis_host_port_and_db_never_the_password(served, caplog):
    from wsserver.brokers import make_broker

    caplog.set_level("INFO", "wsserver.service")
    s = served(redis_url=REDIS_URL, redis_prefix="wstest-log")
    assert "broker: redis 127.0.0.1:6379/0 prefix wstest-log; history" in caplog.text
    s.service.broker.wait_ready(5)
    secret = make_broker(load_settings({}, {"redis_url": "redis://me:s3cret@10.1.2.3:6380/4",
                                             "redis_prefix": "p"}))
    assert secret.describe() == "redis 10.1.2.3:6380/4 prefix p"


@pytest.mark.timeout(20)
def test_publishing_after_shutdown_is_a_503_that_says_shutting_down_not_queue_full(app, client):
    """The broadcaster refuses everything once stopped: the queue is not busy, the worker is
    leaving, and the answer must say which (a single notification and a whole batch)."""
    assert client.post("/notify", json={"event": "e"}).status_code == 200
    service = app.extensions["wsserver"]
    rejected = metrics.PUBLISH_REJECTED.labels("shutting_down")
    before = rejected._value.get()
    service.shutdown()
    for body in ({"event": "e", "room": "r"}, [{"event": "e"}, {"event": "f", "room": "r"}]):
        answer = client.post("/notify", json=body)
        assert answer.status_code == 503
        assert answer.get_json()["code"] == "shutting_down", answer.get_json()
        assert answer.headers["Retry-After"] == "1"
    assert rejected._value.get() == before + 3
