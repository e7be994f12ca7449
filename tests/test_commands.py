"""wsserver.commands and wsserver.admission: a client's commands, run on the test's thread
against a real started service (memory broker, broadcaster, flusher), answers read from the
client's end of a socketpair."""

from __future__ import annotations

import json
import time

import pytest
from inprocess import Served
from rawws import OP_CLOSE, OP_TEXT, close_code

from wsserver.auth import Identity
from wsserver.exceptions import AccessDenied
from wsserver.protocol import parse_notification


def _say(s: Served, conn, obj) -> None:
    s.service.commands.on_message(conn, json.dumps(obj))


@pytest.mark.timeout(20)
def test_ping_subscribe_unsubscribe(served):
    s = served()
    conn, peer = s.connect()
    _say(s, conn, {"type": "ping"})
    _say(s, conn, {"type": "subscribe", "room": "r"})
    assert s.service.hub.members("r") == [conn]
    _say(s, conn, {"type": "unsubscribe", "room": "r"})
    assert s.service.hub.members("r") == []
    assert peer.messages(3) == [{"type": "pong"}, {"type": "subscribed", "room": "r"},
                                {"type": "unsubscribed", "room": "r"}]


@pytest.mark.timeout(20)
def test_invalid_commands_in_a_row_close_1008_a_valid_one_resets_the_count(served):
    s = served(max_invalid_commands=2)
    conn, peer = s.connect()
    for _ in range(2):
        _say(s, conn, {"type": "nope"})
    _say(s, conn, {"type": "ping"})  # resets the count
    for _ in range(2):
        _say(s, conn, {"type": "nope"})
    replies = peer.messages(5)
    assert [r["type"] for r in replies] == ["error", "error", "pong", "error", "error"]
    _say(s, conn, {"type": "nope"})
    op, payload = peer.frames(1)[0]
    assert op == OP_CLOSE and close_code(payload) == 1008
    assert payload[2:] == b"too many invalid commands"


@pytest.mark.timeout(20)
def test_commands_past_the_rate_close_1008_naming_the_setting(served):
    s = served(max_command_rate=1, max_rooms_per_connection=1)  # burst 5 x 1 + 2
    conn, peer = s.connect()
    for _ in range(8):
        _say(s, conn, {"type": "ping"})
    frames = peer.frames(8)
    assert [op for op, _ in frames[:7]] == [OP_TEXT] * 7
    assert frames[7][0] == OP_CLOSE and close_code(frames[7][1]) == 1008
    assert b"WSSERVER_MAX_COMMAND_RATE" in frames[7][1]


@pytest.mark.timeout(20)
def test_free_form_messages_are_relayed_to_everybody_or_refused_in_production(served):
    dev = served()
    conn, peer = dev.connect()
    other, other_peer = dev.connect()
    dev.service.commands.on_message(conn, "hello")
    assert other_peer.frames(1) == [(OP_TEXT, b"hello")]
    assert peer.frames(1) == [(OP_TEXT, b"hello")]
    prod = served(env="production")
    conn, peer = prod.connect(remote="127.0.0.1")
    prod.service.commands.on_message(conn, "hello")
    reply = peer.messages(1)[0]
    assert reply["type"] == "error" and reply["code"] == "rebroadcast_disabled"


@pytest.mark.timeout(20)
def test_a_private_room_needs_a_token_that_grants_it(served):
    s = served()
    anonymous, peer = s.connect()
    _say(s, anonymous, {"type": "subscribe", "room": "private-team"})
    reply = peer.messages(1)[0]
    assert reply["code"] == "room_forbidden" and reply["room"] == "private-team"
    granted = Identity("u", time.time() + 60, ("private-*",))
    member, member_peer = s.connect(identity=granted)
    _say(s, member, {"type": "subscribe", "room": "private-team"})
    assert member_peer.messages(1) == [{"type": "subscribed", "room": "private-team"}]


@pytest.mark.timeout(20)
def test_the_room_limit_answers_the_same_at_the_upgrade_and_as_a_command(served):
    """Admission rules written once: the connect-time check and the command give the same
    code and text."""
    s = served(max_rooms_per_connection=2)
    conn, peer = s.connect()
    for room in ("a", "b", "c"):
        _say(s, conn, {"type": "subscribe", "room": room})
    replies = peer.messages(3)
    assert [r["type"] for r in replies] == ["subscribed", "subscribed", "error"]
    with pytest.raises(AccessDenied) as upgrade:
        s.service.admission.check_rooms(None, ("a", "b", "c"))
    assert upgrade.value.status == 400
    assert (replies[2]["code"], replies[2]["reason"]) == (upgrade.value.code,
                                                          upgrade.value.reason)
    with pytest.raises(AccessDenied) as forbidden:
        s.service.admission.check_rooms(None, ("private-x",))
    assert forbidden.value.status == 403 and forbidden.value.code == "room_forbidden"
    assert "WSSERVER_PRIVATE_ROOM_PREFIX" in forbidden.value.detail


@pytest.mark.timeout(20)
def test_a_busy_resume_is_the_servers_state_not_the_clients_mistake(served):
    s = served(max_resumes=1, enqueue_timeout=0.05, max_invalid_commands=1)
    conn, peer = s.connect()
    assert s.service.recovery.slots.acquire(-1, timeout=0) is None  # the one slot taken
    for _ in range(3):
        _say(s, conn, {"type": "subscribe", "room": "r", "since": "1-1"})
    replies = peer.messages(3)
    assert {r["code"] for r in replies} == {"busy"}, "not closed after one invalid command"
    s.service.recovery.slots.release(-1)


@pytest.mark.timeout(20)
def test_the_connection_budget_refusals_before_the_upgrade(served):
    s = served(max_connections_per_ip=1)
    s.connect(remote="192.0.2.9")
    with pytest.raises(AccessDenied) as address:
        s.service.admission.check_connection("192.0.2.9")
    assert (address.value.status, address.value.code) == (429, "too_many_connections")
    s.service.admission.check_connection("192.0.2.10")  # another address: admitted
    s.service.hub.set_capacity(1)
    with pytest.raises(AccessDenied) as full:
        s.service.admission.check_connection("192.0.2.10")
    assert (full.value.status, full.value.code) == (503, "server_full")
    assert "WSSERVER_MAX_CONNECTIONS" in full.value.detail


SECRET = "test-hs256-secret-0123456789abcdef"


def _jwt(rooms: list[str], sub: str = "u", ttl: float = 600) -> str:
    import jwt

    return jwt.encode({"sub": sub, "exp": time.time() + ttl, "rooms": rooms}, SECRET, "HS256")


def _joined(s: Served, identity_rooms: list[str], rooms: list[str]):
    """A connection authenticated with a token granting ``identity_rooms``, in ``rooms``."""
    identity = s.service.policy.authenticate(_jwt(identity_rooms))
    conn, peer = s.connect(identity=identity)
    for room in rooms:
        _say(s, conn, {"type": "subscribe", "room": room})
    assert [r["type"] for r in peer.messages(len(rooms))] == ["subscribed"] * len(rooms)
    return conn, peer


@pytest.mark.timeout(20)
def test_a_refresh_leaves_at_once_the_rooms_the_new_token_no_longer_grants(served):
    s = served(jwt_secret=SECRET)
    conn, peer = _joined(s, ["private-a", "private-b", "private-team-*"],
                         ["private-a", "private-b", "private-team-7", "lobby"])
    _say(s, conn, {"type": "refresh", "token": _jwt(["private-b"])})
    replies = peer.messages(3)
    assert replies[0]["type"] == "refreshed"
    reason = "the refreshed token no longer grants this room"
    assert replies[1:] == [
        {"type": "unsubscribed", "room": room, "code": "room_forbidden", "reason": reason}
        for room in ("private-a", "private-team-7")
    ]
    assert s.service.hub.rooms_of(conn) == ["lobby", "private-b"]  # public rooms stay
    assert s.service.hub.members("private-a") == []
    # what is published there from now on does not reach it; a granted room still does
    s.service.publish(parse_notification({"event": "secret", "room": "private-a"}))
    s.service.publish(parse_notification({"event": "ok", "room": "private-b"}))
    (delivered,) = peer.messages(1)
    assert delivered["event"] == "ok" and peer.nothing_pending()
    # and it cannot join again with the new token
    _say(s, conn, {"type": "subscribe", "room": "private-a"})
    assert peer.messages(1)[0]["code"] == "room_forbidden"


@pytest.mark.timeout(20)
def test_a_refresh_that_grants_the_same_or_more_leaves_nothing(served):
    s = served(jwt_secret=SECRET)
    conn, peer = _joined(s, ["private-a"], ["private-a"])
    _say(s, conn, {"type": "refresh", "token": _jwt(["private-*"])})
    assert peer.messages(1)[0]["type"] == "refreshed" and peer.nothing_pending()
    assert s.service.hub.rooms_of(conn) == ["private-a"]


@pytest.mark.timeout(20)
def test_a_refused_refresh_keeps_the_old_token_and_its_rooms(served):
    s = served(jwt_secret=SECRET)
    conn, peer = _joined(s, ["private-a"], ["private-a"])
    for token, code in ((_jwt([], sub="mallory"), "user_mismatch"), ("garbage", "invalid_token"),
                        (_jwt([], ttl=-60), "token_expired")):
        _say(s, conn, {"type": "refresh", "token": token})
        assert peer.messages(1)[0]["code"] == code
    assert s.service.hub.rooms_of(conn) == ["private-a"]


@pytest.mark.timeout(20)
def test_a_resume_queued_before_a_refresh_cannot_enter_a_room_the_refresh_took_away(served):
    """The resume was checked against the old token when asked; it joins later, on the
    broadcaster thread: it checks the token the connection holds then."""
    from wsserver.brokers import Recovery as History
    from wsserver.recovery import Resume

    s = served(jwt_secret=SECRET)
    conn, peer = _joined(s, ["private-a"], [])
    # the history was read when the resume was asked (off the broadcaster thread)
    resume = Resume(s.service, conn, "private-a", "1-1", History(False), time.monotonic())
    assert s.service.recovery.slots.acquire(conn.id, 0) is None  # as Recovery.resume does
    _say(s, conn, {"type": "refresh", "token": _jwt([])})
    assert peer.messages(1)[0]["type"] == "refreshed"
    resume.run(s.service.broadcaster)
    reply = peer.messages(1)[0]
    assert (reply["type"], reply["code"], reply["room"]) == ("error", "room_forbidden",
                                                             "private-a")
    assert s.service.hub.members("private-a") == []
