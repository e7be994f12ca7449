"""Control messages (wsserver.control): their wire form, what a worker does with one (on real
connections over socketpairs, through the started service's memory broker and broadcaster),
and the hand-over of the count. The broker contract for both brokers is in test_brokers.py."""

from __future__ import annotations

import json
import struct
import threading

import pytest

from wsserver.auth import Identity
from wsserver.codes import CLOSE_DISCONNECTED, REASON_DISCONNECTED, ErrorCode
from wsserver.control import (
    DISCONNECT,
    UNSUBSCRIBE,
    Control,
    ControlTask,
    Outcome,
    Reply,
    apply,
    unsubscribed_reply,
)
from wsserver.frames import OP_CLOSE, OP_TEXT
from wsserver.hub import Hub


def identity(user: str) -> Identity:
    return Identity(user=user, expires_at=2**40)


def test_a_control_message_round_trips_and_refuses_anything_else():
    for control in (Control(DISCONNECT, "alice"), Control(UNSUBSCRIBE, "bob", "r", "k:1"),
                    Control(DISCONNECT, "ünï \"q\"")):
        assert Control.decode(control.encode()) == control
        assert Control.decode(control.encode().encode()) == control
    for bad in ("[]", "{}", '{"a":"ban","u":"x"}', '{"a":"disconnect","u":7}',
                '{"a":"unsubscribe","u":"x"}', '{"a":"disconnect","u":"x","r":5}', "not json"):
        with pytest.raises(ValueError):
            Control.decode(bad)


def test_the_unsubscribed_reply_is_the_commands_reply_plus_who_did_it():
    reply = unsubscribed_reply("orders")
    assert reply["type"] == "unsubscribed" and reply["room"] == "orders"
    assert reply["code"] == ErrorCode.UNSUBSCRIBED_BY_SERVER and reply["reason"]


def test_disconnect_closes_only_that_users_connections_with_4002(served):
    s = served()
    mine = [s.connect(identity=identity("u")) for _ in range(2)]
    other_conn, other = s.connect(identity=identity("v"))
    anonymous_conn, anonymous = s.connect()
    assert apply(Control(DISCONNECT, "u"), s.service.hub) == 2
    for conn, peer in mine:
        [(opcode, payload)] = peer.frames(1)
        assert opcode == OP_CLOSE
        assert struct.unpack("!H", payload[:2])[0] == CLOSE_DISCONNECTED
        assert payload[2:].decode() == REASON_DISCONNECTED
        assert conn.closing
    assert other.nothing_pending() and anonymous.nothing_pending()
    assert apply(Control(DISCONNECT, "u"), s.service.hub) == 0, "already closing"
    assert apply(Control(DISCONNECT, "nobody"), s.service.hub) == 0


def test_unsubscribe_takes_the_user_out_of_one_room_with_a_reply(served):
    s = served()
    hub = s.service.hub
    (a, pa), (b, pb) = s.connect(identity=identity("u")), s.connect(identity=identity("u"))
    v, pv = s.connect(identity=identity("v"))
    for conn in (a, b, v):
        hub.subscribe(conn, "r")
    hub.subscribe(a, "other")
    assert apply(Control(UNSUBSCRIBE, "u", "r"), hub) == 2
    for peer in (pa, pb):
        [(opcode, payload)] = peer.frames(1)
        assert opcode == OP_TEXT and json.loads(payload) == unsubscribed_reply("r")
    assert hub.rooms_of(a) == ["other"] and hub.rooms_of(b) == [] and hub.rooms_of(v) == ["r"]
    assert pv.nothing_pending()
    assert apply(Control(UNSUBSCRIBE, "u", "r"), hub) == 0, "not in it any more: no reply"
    assert pa.nothing_pending()


def test_a_task_reports_its_count_once_even_when_acting_fails():
    counts: list[int] = []

    class Broken(Hub):
        def user_connections(self, user):  # noqa: ANN001, ANN202
            raise RuntimeError("a bug")

    class FakeBroadcaster:
        def drop_slow(self, conn):  # noqa: ANN001, ANN202
            raise AssertionError("not called")

    task = ControlTask(Control(DISCONNECT, "u"), Broken(10), counts.append)
    with pytest.raises(RuntimeError):
        task.run(FakeBroadcaster())  # type: ignore[arg-type]
    assert counts == [0], "the waiting request still hears back"


def test_the_service_queue_runs_a_disconnect_after_the_notifications_before_it(served):
    """Through the memory broker: the notification to the user, published first, is
    written before the close frame."""
    from wsserver.protocol import Notification

    s = served()
    conn, peer = s.connect(identity=identity("u"))
    s.service.publish(Notification("e", "m", None, user="u"))
    outcome = s.service.broker.control(Control(DISCONNECT, "u"), 1.0)
    assert outcome == Outcome(1, 1, 0)
    (op1, payload1), (op2, payload2) = peer.frames(2)
    assert op1 == OP_TEXT and json.loads(payload1)["event"] == "e"
    assert op2 == OP_CLOSE and struct.unpack("!H", payload2[:2])[0] == CLOSE_DISCONNECTED


def test_a_reply_waits_bounded_and_hands_the_count_across_threads():
    reply = Reply()
    assert reply.wait(0.01) is None
    threading.Thread(target=reply.set, args=(3,)).start()
    assert reply.wait(5) == 3
