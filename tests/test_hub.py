"""wsserver.hub: the registry, its bounds and the refusals it reports (real connections on
socketpairs; no thread of its own)."""

from __future__ import annotations

import socket
import threading

import pytest
from inprocess import assert_no_new_threads

from wsserver.connection import Connection
from wsserver.exceptions import RoomLimitReached
from wsserver.flusher import Flusher
from wsserver.hub import Hub, HubRefusal


@pytest.fixture
def make_conn():
    before = set(threading.enumerate())
    flusher = Flusher(poll_timeout=0.05)
    flusher.start()
    sockets: list[socket.socket] = []
    made = iter(range(1, 1000))

    def make(remote: str = "192.0.2.1", user: str | None = None) -> Connection:
        ours, theirs = socket.socketpair()
        sockets.extend((ours, theirs))
        conn = Connection(next(made), ours, remote, 1 << 16, flusher)
        conn.user = user
        return conn

    yield make
    flusher.stop()
    for sock in sockets:
        sock.close()
    assert_no_new_threads(before)


def test_add_and_remove_keep_every_index_and_count(make_conn):
    hub = Hub(10)
    a, b = make_conn(user="alice"), make_conn(user="alice")
    assert hub.add(a) is None and hub.add(b) is None
    assert hub.count() == 2 and hub.has(a.id) and hub.opened == 0  # ids come from next_id
    assert set(hub.user_connections("alice")) == {a, b}
    assert hub.subscribe(a, "r") is True and hub.subscribe(a, "r") is False
    assert hub.members("r") == [a] and hub.room_counts() == {"r": 1}
    assert hub.totals() == (2, 1, 1)
    assert hub.remove(a) is True and hub.remove(a) is False
    assert a.rooms == set() and hub.members("r") == [] and hub.room_counts() == {}
    assert hub.user_connections("alice") == [b]


def test_snapshots_are_cached_until_membership_changes(make_conn):
    hub = Hub(10)
    a, b = make_conn(), make_conn()
    hub.add(a)
    first = hub.snapshot()
    assert hub.snapshot() is first, "no copy per message for a stable audience"
    hub.add(b)
    assert hub.snapshot() is not first and set(hub.snapshot()) == {a, b}
    hub.subscribe(a, "r")
    room = hub.members("r")
    assert hub.members("r") is room
    hub.subscribe(b, "r")
    assert set(hub.members("r")) == {a, b}


def test_a_departure_is_applied_by_the_next_locked_operation(make_conn):
    hub = Hub(10)
    a = make_conn()
    hub.add(a)
    hub.subscribe(a, "r")
    hub.depart(a)  # no lock taken
    assert hub.count() == 0 and hub.room_counts() == {} and a.rooms == set()


@pytest.mark.parametrize(
    "capacity, per_address, held, closing, expected",
    [
        (2, 0, 1, False, None),
        (1, 0, 1, False, HubRefusal.FULL),
        (5, 1, 1, False, HubRefusal.ADDRESS),
        (5, 0, 0, True, HubRefusal.CLOSING),
        # the order: the address's share first, then shutdown, then the worker's budget
        (1, 1, 1, True, HubRefusal.ADDRESS),
        (1, 0, 1, True, HubRefusal.CLOSING),
    ],
)
def test_refusal_and_add_apply_one_rule(make_conn, capacity, per_address, held, closing,
                                        expected):
    hub = Hub(capacity, max_per_address=per_address)
    for _ in range(held):
        assert hub.add(make_conn("192.0.2.1")) is None
    if closing:
        hub.stop_accepting()
    assert hub.refusal("192.0.2.1") is expected
    assert hub.add(make_conn("192.0.2.1")) is expected
    assert hub.count() == held + (expected is None)


def test_the_per_address_share_is_given_back_on_removal(make_conn):
    hub = Hub(10, max_per_address=1)
    first = make_conn("192.0.2.1")
    assert hub.add(first) is None
    assert hub.refusal("192.0.2.1") is HubRefusal.ADDRESS
    assert hub.refusal("192.0.2.2") is None, "another address is not affected"
    hub.remove(first)
    assert hub.refusal("192.0.2.1") is None


def test_room_limit_per_connection(make_conn):
    hub = Hub(10, max_rooms_per_connection=2)
    a = make_conn()
    hub.add(a)
    hub.subscribe(a, "r1")
    hub.subscribe(a, "r2")
    assert hub.subscribe(a, "r2") is False, "already in: not one more"
    with pytest.raises(RoomLimitReached):
        hub.subscribe(a, "r3")
    assert a.rooms == {"r1", "r2"}
    hub.unsubscribe(a, "r1")
    assert hub.subscribe(a, "r3") is True


def test_capacity_is_never_negative_and_stop_accepting_returns_who_is_connected(make_conn):
    hub = Hub(3)
    hub.set_capacity(-5)
    assert hub.capacity == 0 and hub.refusal("x") is HubRefusal.FULL
    hub.set_capacity(3)
    a = make_conn()
    hub.add(a)
    assert hub.stop_accepting() == [a] and not hub.accepting
