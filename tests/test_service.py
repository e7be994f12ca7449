"""wsserver.service: lifecycle (threads started once, stopped on shutdown), publishing, the
connection budget, and slow consumers counted once; in-process over socketpairs."""

from __future__ import annotations

import threading
import time

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
