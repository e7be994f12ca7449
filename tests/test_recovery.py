"""wsserver.recovery: the replay marks, and a resume over real sockets that meets the live
stream with no gap and no duplicate (real service, memory broker, broadcaster thread)."""

from __future__ import annotations

import threading

import pytest
from inprocess import Served
from support import wait_for

from wsserver.broadcaster import Broadcast, Broadcaster
from wsserver.protocol import Notification
from wsserver.recovery import ReplayMarks


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
def test_messages_published_while_a_resume_waits_are_replayed_once_not_sent_live_again(served):
    """The case the marks exist for: messages published after the resume was queued but
    before it ran are both in the history it reads and still queued behind it."""
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
    ids += [_publish(s, "r", n) for n in range(3, 5)]  # in history and queued behind the task
    between.release.set()
    assert peer.messages(1)[0] == {"type": "subscribed", "room": "r", "recovered": True,
                                   "missed": 4}
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
