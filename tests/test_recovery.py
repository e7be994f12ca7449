"""wsserver.recovery: the replay marks, the ring of recent messages, and a resume over real
sockets that meets the live stream with no gap and no duplicate (real service, memory broker,
broadcaster thread), including while its history read is held up (a memory broker whose
``history`` waits on an event: a slow broker, not a stand-in for the delivery path)."""

from __future__ import annotations

import threading
import time
from typing import Callable

import pytest
from inprocess import Served
from support import wait_for

from wsserver import allocator
from wsserver.broadcaster import Broadcast, Broadcaster
from wsserver.brokers import Recovery as History
from wsserver.brokers.memory import MemoryBroker
from wsserver.hub import Hub
from wsserver.protocol import Notification
from wsserver.recovery import MAX_ATTEMPTS, RecentMessages, ReplayMarks


def _item(room: str | None, n: int) -> Broadcast:
    return Broadcast(f"m{n}".encode(), 0.0, room=room, order=(1, n))


# -- the marks ------------------------------------------------------------------------------


def test_marks_skip_what_was_replayed_and_are_forgotten_at_the_first_later_message():
    marks = ReplayMarks()
    assert not marks and 7 not in marks
    marks.mark(7, "a", (1, 3))
    assert marks and 7 in marks
    items = [_item("a", 2), _item("a", 3), _item(None, 0), _item("a", 4), _item("a", 5)]
    assert marks.unsent(7, items) == [b"m0", b"m4", b"m5"]
    assert 7 not in marks and not marks, "past the mark: nothing left to skip"


def test_marks_are_per_room_and_kept_until_that_room_moves_on():
    marks = ReplayMarks()
    marks.mark(7, "a", (1, 3))
    marks.mark(7, "b", (1, 9))
    assert marks.unsent(7, [_item("a", 3), _item("b", 10)]) == [b"m10"]
    assert 7 in marks, "room a has not passed its mark yet"
    assert marks.unsent(7, [_item("a", 4)]) == [b"m4"]
    assert 7 not in marks


def test_marks_of_departed_connections_are_dropped():
    marks = ReplayMarks()
    marks.mark(1, "a", (1, 1))
    marks.mark(2, "a", (1, 1))
    marks.forget_departed(lambda conn_id: conn_id == 2)
    assert 1 not in marks and 2 in marks


# -- a resume over socketpairs --------------------------------------------------------------


class _Gate:
    """A broadcaster task that holds the thread until released."""

    def __init__(self) -> None:
        self.entered, self.release = threading.Event(), threading.Event()

    def run(self, broadcaster: Broadcaster) -> None:
        self.entered.set()
        self.release.wait(10)


def _publish(served: Served, room: str, n: int) -> str:
    published = served.service.publish(Notification("e", "m", n, rooms=(room,)))
    assert published is not None
    return published.ids[room]


@pytest.mark.timeout(30)
def test_messages_published_while_a_resume_waits_in_the_queue_arrive_live_once(served):
    """The history is read before the task is queued: messages published while the task
    waits behind others are not in that read; they reach the client live, after the replay."""
    s = served()
    broadcaster = s.service.broadcaster
    assert broadcaster is not None
    ids = [_publish(s, "r", n) for n in range(3)]
    conn, peer = s.connect()
    hold, between = _Gate(), _Gate()
    assert broadcaster.submit(hold, 1)
    assert hold.entered.wait(5)
    assert broadcaster.submit(between, 1)  # drained with the resume, runs just before it
    s.service.commands.resume(conn, "r", ids[0])
    hold.release.set()
    assert between.entered.wait(5)
    ids += [_publish(s, "r", n) for n in range(3, 5)]  # queued behind the task
    between.release.set()
    assert peer.messages(1)[0] == {"type": "subscribed", "room": "r", "recovered": True,
                                   "missed": 2}
    ids.append(_publish(s, "r", 5))  # after the resume: live
    received = [m["id"] for m in peer.messages(5)]
    assert received == ids[1:], "no gap, no duplicate, in order"
    assert peer.nothing_pending()
    wait_for(lambda: not broadcaster.replays, message="the marks forgotten once passed")
    wait_for(lambda: s.service.recovery.slots.in_flight == 0, message="the slot given back")


@pytest.mark.timeout(60)
def test_a_resume_under_a_steady_stream_is_gapless_and_without_duplicates(served):
    s = served(history_size=1000)  # the whole stream stays in history
    first = _publish(s, "r", 0)
    stop = threading.Event()
    published: list[str] = [first]

    def publisher() -> None:
        n = 1
        while not stop.is_set() and n < 400:
            published.append(_publish(s, "r", n))
            n += 1

    thread = threading.Thread(target=publisher, name="test-publisher")
    thread.start()
    try:
        wait_for(lambda: len(published) >= 20, message="the stream is flowing")
        conn, peer = s.connect()
        s.service.commands.resume(conn, "r", first)
        reply = peer.messages(1)[0]
        assert reply["type"] == "subscribed" and reply["recovered"] is True
    finally:
        stop.set()
        thread.join(10)
    expected = published[1:]
    received = [m["id"] for m in peer.messages(len(expected), timeout=20)]
    assert received == expected
    assert peer.nothing_pending()


@pytest.mark.timeout(30)
def test_a_resume_for_a_connection_gone_before_it_ran_sends_nothing_and_frees_its_slot(served):
    s = served()
    broadcaster = s.service.broadcaster
    assert broadcaster is not None
    first = _publish(s, "r", 0)
    conn, peer = s.connect()
    hold = _Gate()
    assert broadcaster.submit(hold, 1)
    assert hold.entered.wait(5)
    s.service.commands.resume(conn, "r", first)
    assert s.service.recovery.slots.in_flight == 1
    s.service.hub.remove(conn)
    hold.release.set()
    wait_for(lambda: s.service.recovery.slots.in_flight == 0, message="the slot given back")
    assert peer.nothing_pending()
    assert conn.rooms == set()


# -- the ring of recent messages ------------------------------------------------------------


def test_the_ring_gives_a_rooms_messages_after_an_id_delivered_since_a_time():
    recent = RecentMessages(max_items=4)
    recent.record([_item("a", 1), _item("b", 1)], 1.0)
    recent.record([_item("a", 2), _item(None, 0), _item("a", 3)], 2.0)
    assert [i.frame for i in recent.after("a", (1, 1), 2.0)] == [b"m2", b"m3"]
    assert [i.frame for i in recent.after("a", (1, 0), 0.5)] == [b"m1", b"m2", b"m3"]
    assert recent.after("a", (1, 3), 0.5) == []
    recent.record([_item("b", 2)], 3.0)  # a fifth room message: a@1 (sent at 1.0) dropped
    assert recent.after("a", (1, 0), 0.5) is None, "cannot vouch for what went out at 1.0"
    assert [i.frame for i in recent.after("a", (1, 1), 1.5)] == [b"m2", b"m3"]


def test_the_ring_is_bounded_in_bytes_too():
    recent = RecentMessages(max_items=100, max_bytes=10)
    recent.record([Broadcast(b"x" * 6, 0.0, room="a", order=(1, n)) for n in range(3)], 1.0)
    assert recent.after("a", (1, 0), 0.5) is None
    assert len(recent.after("a", (1, 1), 1.5) or []) == 0


def test_the_ring_forgets_what_went_out_over_max_age_ago():
    """Once traffic stops, the last messages are not kept for good: the broadcaster expires
    the ring while idle, and a resume from before the dropped ones reads again."""
    recent = RecentMessages(max_age=10.0)
    recent.record([_item("a", 1)], 1.0)
    recent.record([_item("a", 2)], 5.0)
    assert recent.expire(10.0) == 0
    assert [i.frame for i in recent.after("a", (1, 0), 0.5)] == [b"m1", b"m2"]
    assert recent.expire(12.0) == 2  # a@1 went out 11 s ago
    assert recent.after("a", (1, 0), 0.5) is None, "cannot vouch for what went out at 1.0"
    assert [i.frame for i in recent.after("a", (1, 1), 2.0)] == [b"m2"]
    recent.expire(20.0)
    assert recent.after("a", (1, 2), 19.0) == []
    assert recent._bytes == 0


def test_the_broadcaster_expires_its_ring_while_idle(monkeypatch):
    """... and, having dropped 1 MiB of frames, asks the C allocator to return them."""
    trims: list[float] = []
    monkeypatch.setattr(allocator, "trim", lambda: trims.append(time.monotonic()))
    hub = Hub(10)
    broadcaster = Broadcaster(hub, 16, on_slow=lambda conn: None)
    broadcaster.recent = RecentMessages(max_age=0.0)
    broadcaster.start()
    try:
        broadcaster.submit(Broadcast(b"m", time.monotonic(), room="a", order=(1, 1)), 1)
        wait_for(lambda: broadcaster.recent.after("a", (1, 0), 0.0) is None, timeout=5,
                 message="the idle broadcaster expiring its ring")
        assert not trims, "a few bytes dropped: no trim"
        big = Broadcast(b"x" * 1024 * 1024, time.monotonic(), room="a", order=(1, 2))
        broadcaster.submit(big, 1)
        wait_for(lambda: trims, timeout=5, message="the trim after 1 MiB dropped")
    finally:
        broadcaster.stop(2)


# -- history reads off the broadcaster thread -----------------------------------------------


class _SlowHistory(MemoryBroker):
    """The memory broker, with ``history`` held up after its read (while ``hold`` is set)
    until ``go`` is set: what a slow Redis does to the thread that reads. ``after_read``
    runs after each read (a publisher racing the resume)."""

    def __init__(self, settings) -> None:  # type: ignore[no-untyped-def]
        super().__init__(settings)
        self.hold, self.go, self.reading = threading.Event(), threading.Event(), threading.Event()
        self.hold.set()
        self.reads = 0
        self.after_read: Callable[[], None] | None = None

    def history(self, room: str, since: str) -> History:
        found = super().history(room, since)
        self.reads += 1
        if self.hold.is_set():
            self.reading.set()
            assert self.go.wait(10)
        if self.after_read is not None:
            self.after_read()
        return found


def _slow_history(s: Served) -> _SlowHistory:
    service = s.service
    assert service.broadcaster is not None
    slow = _SlowHistory(service.settings)
    service.broker.stop()
    slow.start(service.broadcaster, service.hub)
    service.broker = slow  # its history and ids from here on; stopped by the service
    return slow


@pytest.mark.timeout(30)
def test_a_blocked_history_read_does_not_stall_delivery_to_other_clients(served):
    s = served()
    slow = _slow_history(s)
    first = _publish(s, "r", 0)
    resumer, resumer_peer = s.connect()
    bystander, bystander_peer = s.connect()
    s.service.hub.subscribe(bystander, "live")
    reader = threading.Thread(target=s.service.commands.resume, args=(resumer, "r", first),
                              name="test-resume")
    reader.start()
    try:
        assert slow.reading.wait(5)
        for n in range(5):  # the resume's read is blocked meanwhile
            start = time.monotonic()
            _publish(s, "live", n)
            assert bystander_peer.messages(1)[0]["data"] == n
            assert time.monotonic() - start < 0.5, "live delivery waits for no history read"
    finally:
        slow.go.set()
        reader.join(10)
    assert resumer_peer.messages(1)[0]["recovered"] is True


@pytest.mark.timeout(30)
def test_messages_delivered_between_the_read_and_the_join_are_replayed_from_the_ring(served):
    """The gap the ring bridges: stored after the read, delivered before the join (the
    client was no member yet): replayed after the read's messages, once, then live."""
    s = served()
    slow = _slow_history(s)
    conn, peer = s.connect()
    member, member_peer = s.connect()
    s.service.hub.subscribe(member, "r")
    ids = [_publish(s, "r", n) for n in range(3)]
    assert [m["id"] for m in member_peer.messages(3)] == ids
    reader = threading.Thread(target=s.service.commands.resume, args=(conn, "r", ids[0]),
                              name="test-resume")
    reader.start()
    try:
        assert slow.reading.wait(5)  # read done (ids 1, 2), join not queued yet
        ids += [_publish(s, "r", n) for n in range(3, 5)]
        assert [m["id"] for m in member_peer.messages(2)] == ids[3:5], "delivered already"
    finally:
        slow.go.set()
        reader.join(10)
    assert peer.messages(1)[0] == {"type": "subscribed", "room": "r", "recovered": True,
                                   "missed": 4}
    ids.append(_publish(s, "r", 5))
    assert [m["id"] for m in peer.messages(5)] == ids[1:], "no gap, no duplicate, in order"
    assert peer.nothing_pending()
    assert slow.reads == 1
    wait_for(lambda: s.service.recovery.slots.in_flight == 0, message="the slot given back")


@pytest.mark.timeout(30)
def test_when_the_ring_cannot_bridge_the_resume_reads_again(served):
    s = served()
    slow = _slow_history(s)
    broadcaster = s.service.broadcaster
    assert broadcaster is not None
    broadcaster.recent = RecentMessages(max_items=2)
    ids = [_publish(s, "r", 0)]
    conn, peer = s.connect()
    reader = threading.Thread(target=s.service.commands.resume, args=(conn, "r", ids[0]),
                              name="test-resume")
    reader.start()
    try:
        assert slow.reading.wait(5)
        slow.hold.clear()  # the second read is not held up
        ids += [_publish(s, "r", n) for n in range(1, 5)]  # more than the ring keeps
        wait_for(lambda: broadcaster.queue.qsize() == 0, message="delivered")
    finally:
        slow.go.set()
        reader.join(10)
    assert peer.messages(1)[0]["missed"] == 4
    assert [m["id"] for m in peer.messages(4)] == ids[1:]
    assert peer.nothing_pending()
    wait_for(lambda: slow.reads == 2, message="read twice")
    wait_for(lambda: s.service.recovery.slots.in_flight == 0, message="the slot given back")


@pytest.mark.timeout(30)
def test_a_resume_that_never_catches_up_says_history_unavailable_and_frees_its_slot(served):
    """A hostile pace: a message delivered to the room during every read, past a ring that
    keeps none. Bounded: MAX_ATTEMPTS reads, then an error frame the client retries after."""
    s = served()
    slow = _slow_history(s)
    slow.hold.clear()
    broadcaster = s.service.broadcaster
    assert broadcaster is not None
    broadcaster.recent = RecentMessages(max_items=0)
    first = _publish(s, "r", 0)
    counter = iter(range(1, 100))

    def publish_and_deliver() -> None:
        _publish(s, "r", next(counter))
        wait_for(lambda: broadcaster.queue.qsize() == 0, message="delivered")

    slow.after_read = publish_and_deliver
    conn, peer = s.connect()
    s.service.commands.resume(conn, "r", first)
    error = peer.messages(1)[0]
    assert (error["type"], error["code"], error["room"]) == ("error", "history_unavailable", "r")
    assert slow.reads == MAX_ATTEMPTS
    assert conn.rooms == set()
    wait_for(lambda: s.service.recovery.slots.in_flight == 0, message="the slot given back")


@pytest.mark.timeout(30)
def test_a_failed_history_read_answers_history_unavailable_on_the_callers_thread(served):
    s = served()
    slow = _slow_history(s)
    slow.hold.clear()
    first = _publish(s, "r", 0)

    def fail() -> None:
        from wsserver.brokers import BrokerUnavailable

        raise BrokerUnavailable("test: the broker timed out")

    slow.after_read = fail
    conn, peer = s.connect()
    s.service.commands.resume(conn, "r", first)
    assert peer.messages(1)[0]["code"] == "history_unavailable"
    assert s.service.recovery.slots.in_flight == 0
    assert conn.rooms == set()
