"""wsserver.presence: presence rooms on a real started service (memory broker, broadcaster,
flusher, the ``wsserver-presence`` thread), commands run on the test's thread, what each
client is sent read from its end of a socketpair. The Redis broker's cluster-wide decisions
are tested against real gunicorn workers in tests/e2e/test_presence.py."""

from __future__ import annotations

import json
import time

import pytest
from inprocess import Peer, Served
from support import wait_for

from wsserver.auth import Identity
from wsserver.broadcaster import Broadcast
from wsserver.brokers import Broker
from wsserver.exceptions import BrokerUnavailable
from wsserver.presence import JOIN, LEAVE, RESET, Roster, bus_payload, parse_payload
from wsserver.protocol import parse_notification

ROOM = "presence-lobby"


def _say(s: Served, conn, obj) -> None:
    s.service.commands.on_message(conn, json.dumps(obj))


def _user(s: Served, name: str):
    identity = Identity(name, time.time() + 3600)
    return s.connect(identity=identity)


def _join(s: Served, conn, peer: Peer, room: str = ROOM) -> dict:
    _say(s, conn, {"type": "subscribe", "room": room})
    (reply,) = peer.messages(1)
    assert reply["type"] == "subscribed" and reply["room"] == room, reply
    return reply


def _event(action: str, user: str | None, room: str = ROOM) -> dict:
    return {"type": "presence", "room": room, "action": action, "user": user}


@pytest.mark.timeout(20)
def test_a_user_joins_and_leaves_once_however_many_tabs(served):
    s = served()
    a1, pa1 = _user(s, "alice")
    assert _join(s, a1, pa1) == {"type": "subscribed", "room": ROOM, "users": [],
                                 "anonymous": 0}
    assert pa1.messages(1) == [_event("join", "alice")]  # its own join follows the reply
    b, pb = _user(s, "bob")
    assert _join(s, b, pb)["users"] == ["alice"]
    assert pa1.messages(1) == [_event("join", "bob")] and pb.messages(1) == [_event("join", "bob")]
    # a second tab of alice: listed, announced to nobody
    a2, pa2 = _user(s, "alice")
    assert _join(s, a2, pa2)["users"] == ["alice", "bob"]
    assert pa1.nothing_pending() and pb.nothing_pending() and pa2.nothing_pending()
    # the first tab leaves: alice is still there
    _say(s, a1, {"type": "unsubscribe", "room": ROOM})
    assert pa1.messages(1) == [{"type": "unsubscribed", "room": ROOM}]
    assert pb.nothing_pending(0.3) and pa2.nothing_pending(0.01)
    # the last tab disconnects (its thread leaves the hub without the lock): the leave
    s.service.hub.depart(a2)
    assert pb.messages(1) == [_event("leave", "alice")]
    assert s.service.room(ROOM)["users"] == ["bob"]


@pytest.mark.timeout(20)
def test_without_tokens_each_connection_is_a_member_announced_with_user_null(served):
    s = served()
    c1, p1 = s.connect()
    assert _join(s, c1, p1)["anonymous"] == 0
    assert p1.messages(1) == [_event("join", None)]
    c2, p2 = s.connect()
    assert _join(s, c2, p2) == {"type": "subscribed", "room": ROOM, "users": [], "anonymous": 1}
    assert p1.messages(1) == [_event("join", None)] == p2.messages(1)
    assert s.service.room(ROOM)["anonymous"] == 2
    s.service.hub.remove(c1)
    assert p2.messages(1) == [_event("leave", None)]
    wait_for(lambda: s.service.room(ROOM)["anonymous"] == 1, timeout=5)


@pytest.mark.timeout(20)
def test_the_member_list_plus_the_events_after_it_is_always_exact(served):
    """A hostile churn: 30 connections of 6 users join and leave in a random order while an
    observer that joined in the middle applies every event to its member list; at the end
    its list is the room's, and nobody was announced twice in a row."""
    import random

    s = served()
    rng = random.Random(7)
    names = [f"u{i}" for i in range(6)]
    conns = []
    observer = None
    for step in range(60):
        if step == 20:
            observer = _user(s, "observer")
            reply = _join(s, *observer)
            members = set(reply["users"])
        if conns and rng.random() < 0.4:
            conn, _peer = conns.pop(rng.randrange(len(conns)))
            s.service.hub.remove(conn)
        else:
            conn, peer = _user(s, rng.choice(names))
            _say(s, conn, {"type": "subscribe", "room": ROOM})
            conns.append((conn, peer))
    assert observer is not None
    expected = sorted({c.user for c, _ in conns} | {"observer"})
    wait_for(lambda: s.service.room(ROOM)["users"] == expected, timeout=5)
    peer = observer[1]
    last: dict[str, str] = {}
    while not peer.nothing_pending(0.3):
        (event,) = peer.messages(1)
        assert event["type"] == "presence"
        assert last.get(event["user"]) != event["action"], f"twice in a row: {event}"
        last[event["user"]] = event["action"]
        (members.add if event["action"] == "join" else members.discard)(event["user"])
    assert sorted(members) == expected


@pytest.mark.timeout(20)
def test_presence_events_keep_their_place_among_notifications_and_have_no_id(served):
    s = served()
    a, pa = _user(s, "alice")
    _join(s, a, pa)
    assert pa.messages(1) == [_event("join", "alice")]
    s.service.publish(parse_notification({"event": "before", "room": ROOM}))
    b, pb = _user(s, "bob")
    _say(s, b, {"type": "subscribe", "room": ROOM})
    wait_for(lambda: s.service.room(ROOM)["users"] == ["alice", "bob"], timeout=5)
    s.service.publish(parse_notification({"event": "after", "room": ROOM}))
    got = pa.messages(3)
    assert [m.get("event") or m["type"] for m in got] == ["before", "presence", "after"]
    assert "id" not in got[1]
    # not in history: a resume from "before" replays "after" only
    since = got[0]["id"]
    c, pc = _user(s, "carol")
    _say(s, c, {"type": "subscribe", "room": ROOM, "since": since})
    reply, replayed = pc.messages(2)
    assert reply["recovered"] is True and reply["missed"] == 1
    assert reply["users"] == ["alice", "bob"]  # the resume's reply lists the members too
    assert replayed["event"] == "after"


@pytest.mark.timeout(20)
def test_other_rooms_and_a_disabled_prefix_are_untouched(served):
    s = served()
    a, pa = _user(s, "alice")
    assert _join(s, a, pa, "lobby") == {"type": "subscribed", "room": "lobby"}
    assert pa.nothing_pending()
    assert "users" not in s.service.room("lobby")
    off = served(presence_prefix="")
    b, pb = _user(off, "bob")
    assert _join(off, b, pb) == {"type": "subscribed", "room": ROOM}
    assert pb.nothing_pending()
    assert off.service.room(ROOM) == {"room": ROOM, "clients": 1, "worker_clients": 1,
                                      "scope": "worker", "presence": False}


@pytest.mark.timeout(20)
def test_subscribing_twice_and_leaving_a_room_never_joined_announce_nothing(served):
    s = served()
    a, pa = _user(s, "alice")
    _join(s, a, pa)
    assert pa.messages(1) == [_event("join", "alice")]
    assert _join(s, a, pa)["users"] == ["alice"]
    _say(s, a, {"type": "unsubscribe", "room": "presence-other"})
    assert pa.messages(1)[0]["type"] == "unsubscribed"
    assert pa.nothing_pending(0.3)
    assert s.service.presence.announced == 1


@pytest.mark.timeout(20)
def test_a_join_past_the_room_limit_is_refused_and_announces_nothing(served):
    s = served(max_rooms_per_connection=1)
    a, pa = _user(s, "alice")
    _join(s, a, pa, "lobby")
    _say(s, a, {"type": "subscribe", "room": ROOM})
    (reply,) = pa.messages(1)
    assert reply["type"] == "error" and reply["code"] == "too_many_rooms"
    assert pa.nothing_pending(0.3) and s.service.room(ROOM)["users"] == []


def test_get_rooms_room_needs_a_publisher_and_a_valid_name(make_app):
    app = make_app(env="production")
    http = app.test_client()
    outside = {"REMOTE_ADDR": "192.0.2.9"}
    assert http.get("/rooms/presence-x", environ_base=outside).status_code == 403
    answer = http.get("/rooms/presence-x")
    assert answer.status_code == 200
    assert answer.get_json() == {"room": "presence-x", "clients": 0, "worker_clients": 0,
                                 "scope": "worker", "presence": True, "users": [],
                                 "anonymous": 0}
    bad = http.get("/rooms/bad%20room")
    assert bad.status_code == 400 and bad.get_json()["code"] == "invalid_room"
    assert http.get("/rooms/team/7.chat").get_json()["presence"] is False


def test_the_roster_sends_only_what_changes_it():
    roster = Roster()

    def item(action, member, user, room=ROOM):
        return Broadcast(b"x", 0.0, room, presence=(action, member, user))

    note = Broadcast(b"n", 0.0, ROOM)
    batch = [item(JOIN, "u:a", "a"), note, item(JOIN, "u:a", "a"), item(LEAVE, "u:b", "b")]
    assert roster.filter(batch) == batch[:2]
    assert roster.members(ROOM) == (["a"], 0)
    # a snapshot replaces it: the differences become events
    reset = Broadcast(b"", 0.0, presence=(RESET, {ROOM: {"u:b": "b", "a:w:1": None}}))
    events = [json.loads(e.frame[2:]) for e in roster.filter([reset])]
    assert sorted(events, key=json.dumps) == sorted(
        [_event("leave", "a"), _event("join", "b"), _event("join", None)], key=json.dumps)
    assert roster.members(ROOM) == (["b"], 1)
    assert parse_payload(bus_payload(ROOM, JOIN, "u:é", "é")) == (ROOM, JOIN, "u:é", "é")


@pytest.mark.timeout(20)
def test_replies_keep_the_order_of_the_commands(served):
    """A presence join is answered from the broadcaster; the connection's thread waits for
    it, so the next command's reply (answered at once) never overtakes it: clients match
    replies to commands by their order."""
    s = served()
    a, pa = _user(s, "alice")
    for room in (ROOM, "lobby", "presence-two", "lobby2"):
        _say(s, a, {"type": "subscribe", "room": room})
    _say(s, a, {"type": "ping"})
    replies = [m for m in pa.messages(7) if m["type"] != "presence"]
    assert [(m["type"], m.get("room")) for m in replies] == [
        ("subscribed", ROOM), ("subscribed", "lobby"), ("subscribed", "presence-two"),
        ("subscribed", "lobby2"), ("pong", None)]


class _Recording(Broker):
    """A broker that records what it is told and refuses the first ``fail`` calls, as a
    Redis that is down would: what the announcer retries, and when."""

    def __init__(self, fail: int = 0) -> None:
        self.told: list[tuple[str, str, str | None]] = []
        self.fail = fail

    def announce(self, room, action, member, user):
        if self.fail:
            self.fail -= 1
            raise BrokerUnavailable("down")
        self.told.append((room, action, user))
        return True


def _presence(broker: Broker):
    from wsserver.hub import Hub
    from wsserver.presence import Presence

    hub = Hub(10)
    presence = Presence("presence-", hub)
    hub.watch("presence-", presence.changed)
    presence._broker = broker  # started by hand: the test runs the announcer's rounds
    return hub, presence


def _conn(hub, user):
    import socket as socket_module

    from wsserver.connection import Connection

    a, b = socket_module.socketpair()
    conn = Connection(hub.next_id(), a, "192.0.2.1", 1 << 20, None)
    conn.user = user
    assert hub.add(conn) is None
    return conn, (a, b)


def test_the_announcer_tells_the_broker_what_changed_and_coalesces_what_cancels_out():
    broker = _Recording()
    hub, presence = _presence(broker)
    conn, socks = _conn(hub, "alice")
    other, more = _conn(hub, "alice")
    try:
        hub.subscribe(conn, ROOM)
        hub.subscribe(other, ROOM)  # a second tab: nothing more to tell
        hub.subscribe(conn, "lobby")  # not a presence room
        assert presence._reconcile() is False
        assert broker.told == [(ROOM, "join", "alice")]
        # a tab closes and reopens before the next round: nothing to tell
        hub.unsubscribe(conn, ROOM)
        hub.unsubscribe(other, ROOM)
        hub.subscribe(other, ROOM)
        assert presence._reconcile() is False and len(broker.told) == 1
        hub.remove(other)
        assert presence._reconcile() is False
        assert broker.told[-1] == (ROOM, "leave", "alice")
    finally:
        for s in (*socks, *more):
            s.close()


def test_a_failed_announcement_is_retried_in_order_and_a_lost_broker_is_told_again():
    broker = _Recording(fail=2)
    hub, presence = _presence(broker)
    conn, socks = _conn(hub, "bob")
    try:
        hub.subscribe(conn, ROOM)
        hub.subscribe(conn, "presence-b")
        assert presence._reconcile() is True and presence._reconcile() is True
        assert presence._reconcile() is False
        assert broker.told == [(ROOM, "join", "bob"), ("presence-b", "join", "bob")]
        presence.reannounce()  # Redis lost our members (a stall, a restart)
        assert presence._reconcile() is False
        assert sorted(broker.told[2:]) == [("presence-b", "join", "bob"), (ROOM, "join", "bob")]
    finally:
        for s in socks:
            s.close()
