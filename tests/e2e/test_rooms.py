"""Rooms, targeted notifications, commands and introspection, end to end under gunicorn."""

from __future__ import annotations

import json
import random
import threading

import pytest
import requests
from support import RawClient, close_code, connect, recv_json, wait_for


@pytest.fixture(scope="module")
def server():
    from support import serving

    with serving(env={"WSSERVER_ENV": "development", "WSSERVER_MAX_ROOMS_PER_CONNECTION": "5",
                     "WSSERVER_MAX_INVALID_COMMANDS": "5", "WSSERVER_MAX_BATCH": "10"},
                 threads=96) as srv:
        yield srv


def command(ws, obj) -> dict:
    ws.send(json.dumps(obj))
    return recv_json(ws)


def test_subscribe_unsubscribe_and_ping_replies(server):
    ws = connect(server)
    try:
        assert command(ws, {"type": "subscribe", "room": "orders"}) == {"type": "subscribed", "room": "orders"}
        assert command(ws, {"type": "subscribe", "room": "orders"}) == {"type": "subscribed", "room": "orders"}
        assert server.health()["subscriptions"] >= 1
        assert command(ws, {"type": "ping"}) == {"type": "pong"}
        assert command(ws, {"type": "unsubscribe", "room": "orders"}) == {"type": "unsubscribed", "room": "orders"}
        r = server.notify({"event": "e", "room": "orders"})
        assert r.status_code == 200 and r.json()["clients"] == 0
    finally:
        ws.close()


def test_room_isolation_over_mixed_messages(server):
    a = connect(server, timeout=30)
    b = connect(server, timeout=30)
    both = connect(server, timeout=30)
    nobody = connect(server, timeout=30)
    for ws, rooms in ((a, ["A"]), (b, ["B"]), (both, ["A", "B"])):
        for room in rooms:
            assert command(ws, {"type": "subscribe", "room": room})["type"] == "subscribed"
    rng = random.Random(7)
    targets = [rng.choice(["A", "B", None]) for _ in range(1000)]
    session = requests.Session()
    ids: dict = {"A": [], "B": [], None: []}
    for i, room in enumerate(targets):
        body = {"event": "mixed", "data": i}
        if room:
            body["room"] = room
        r = session.post(server.url + "/notify", json=body, timeout=10)
        assert r.status_code == 200, r.text
        ids[room].append(r.json()["id"])
    sentinel = server.notify({"event": "end"})
    assert sentinel.status_code == 200

    def received(ws) -> list[tuple]:
        out = []
        while True:
            msg = recv_json(ws)
            if msg["event"] == "end":
                return out
            out.append((msg["room"], msg["data"], msg["id"]))

    expect = {
        "a": [(t, i) for i, t in enumerate(targets) if t in ("A", None)],
        "b": [(t, i) for i, t in enumerate(targets) if t in ("B", None)],
        "both": [(t, i) for i, t in enumerate(targets)],
        "nobody": [(t, i) for i, t in enumerate(targets) if t is None],
    }
    for name, ws in (("a", a), ("b", b), ("both", both), ("nobody", nobody)):
        got = received(ws)
        assert [(room, data) for room, data, _ in got] == expect[name]
    # ids increase by one within each room, and the client sees the ids POST answered
    for room in ("A", "B"):
        counts = [int(x.split("-")[1]) for x in ids[room]]
        assert counts == list(range(counts[0], counts[0] + len(counts)))
    for ws in (a, b, both, nobody):
        ws.close()


def test_notify_to_several_rooms_and_connect_time_rooms(server):
    client = RawClient(server, path="/ws?rooms=r1,r2")
    assert client.status == 101
    wait_for(lambda: server.health()["subscriptions"] >= 2, message="connect-time rooms")
    r = server.notify({"event": "multi", "rooms": ["r1", "r2", "r3"]})
    body = r.json()
    assert r.status_code == 200 and set(body["ids"]) == {"r1", "r2", "r3"} and body["clients"] == 2
    got = []
    for _ in range(2):
        op, payload = client.recv_frame()
        got.append(json.loads(payload))
    assert sorted(m["room"] for m in got) == ["r1", "r2"]
    assert all(m["id"] == body["ids"][m["room"]] for m in got)
    client.close()


@pytest.mark.parametrize("query,code", [("rooms=bad%20room", "invalid_room"),
                                        ("rooms=a,b,c,d,e,f", "too_many_rooms")])
def test_bad_connect_time_rooms_are_refused_before_the_upgrade(server, query, code):
    client = RawClient(server, path="/ws?" + query)
    try:
        assert client.status == 400
        assert json.loads(client.http_body())["code"] == code
    finally:
        client.close()


@pytest.mark.parametrize("cmd,code", [
    ({"type": "subscribe"}, "missing_room"),
    ({"type": "subscribe", "room": ""}, "invalid_room"),
    ({"type": "subscribe", "room": 5}, "invalid_room"),
    ({"type": "subscribe", "room": "has space"}, "invalid_room"),
    ({"type": "subscribe", "room": "x" * 129}, "invalid_room"),
    ({"type": "subscribe", "room": "ok", "since": 5}, "invalid_since"),
    ({"type": "unsubscribe"}, "missing_room"),
    ({"type": "bogus"}, "unknown_command"),
    ({"type": 5}, "invalid_command"),
])
def test_malformed_commands_get_error_frames_and_keep_the_connection(server, cmd, code):
    ws = connect(server)
    try:
        reply = command(ws, cmd)
        assert reply["type"] == "error" and reply["code"] == code and reply["reason"]
        assert command(ws, {"type": "ping"}) == {"type": "pong"}
    finally:
        ws.close()


def test_room_limit_per_connection(server):
    ws = connect(server)
    try:
        for i in range(5):
            assert command(ws, {"type": "subscribe", "room": f"lim{i}"})["type"] == "subscribed"
        reply = command(ws, {"type": "subscribe", "room": "lim5"})
        assert reply["type"] == "error" and reply["code"] == "too_many_rooms"
    finally:
        ws.close()


def test_a_client_that_keeps_sending_bad_commands_is_closed(server):
    client = RawClient(server)
    try:
        for _ in range(6):
            client.send_text(json.dumps({"type": "nope"}))
        frames = []
        while not frames or frames[-1][0] != 0x8:
            frames.append(client.recv_frame())
        errors = [json.loads(p) for op, p in frames if op == 0x1]
        assert len(errors) == 5 and all(e["code"] == "unknown_command" for e in errors)
        assert close_code(frames[-1][1]) == 1008
    finally:
        client.close()


def test_batch_publish_answers_per_item(server):
    ws = connect(server)
    try:
        wait_for(lambda: server.health()["clients"] >= 1)
        r = requests.post(server.url + "/notify", json=[
            {"event": "one"}, {"message": "no event"}, {"event": "two", "room": "bad room"}, {"event": "three"},
        ], timeout=5)
        assert r.status_code == 200
        body = r.json()
        assert body["status"] == "partial" and body["accepted"] == 2
        assert [x["status"] for x in body["results"]] == ["ok", "error", "error", "ok"]
        assert [x.get("code") for x in body["results"]][1:3] == ["missing_event", "invalid_room"]
        assert [recv_json(ws)["event"] for _ in range(2)] == ["one", "three"]
        assert requests.post(server.url + "/notify", json=[], timeout=5).status_code == 400
        too_many = requests.post(server.url + "/notify", json=[{"event": "x"}] * 11, timeout=5)
        assert too_many.status_code == 413 and too_many.json()["code"] == "batch_too_large"
    finally:
        ws.close()


def test_room_counts_are_exact_under_concurrent_churn(server):
    """16 threads subscribe, unsubscribe and disconnect at random; the counts /rooms reports
    at the end match what each client holds, and fall to zero when they leave."""
    rooms = [f"churn{i}" for i in range(4)]
    final: dict[int, set] = {}
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        rng = random.Random(index)
        try:
            for _cycle in range(3):
                ws = connect(server, timeout=20)
                held: set = set()
                for _ in range(30):
                    room = rng.choice(rooms)
                    if room in held and rng.random() < 0.5:
                        assert command(ws, {"type": "unsubscribe", "room": room})["type"] == "unsubscribed"
                        held.discard(room)
                    else:
                        assert command(ws, {"type": "subscribe", "room": room})["type"] == "subscribed"
                        held.add(room)
                if _cycle < 2:
                    ws.close()  # disconnect with subscriptions held
                else:
                    final[index] = held
                    keep.append(ws)
        except BaseException as exc:
            errors.append(exc)

    keep: list = []
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[:3]
    expected = {room: sum(1 for held in final.values() if room in held) for room in rooms}
    expected = {room: n for room, n in expected.items() if n}

    def counts():
        listed = requests.get(server.url + "/rooms", timeout=5).json()["rooms"]
        return {r["room"]: r["clients"] for r in listed if r["room"].startswith("churn")}

    wait_for(lambda: counts() == expected, message=f"room counts {expected}")
    for ws in keep:
        ws.close()
    wait_for(lambda: counts() == {}, message="rooms emptied")
