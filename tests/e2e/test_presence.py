"""End to end: presence rooms against real gunicorn, with tokens: the memory broker (one
worker), and Redis with two workers, where a user's tabs on both workers are one member, two
tabs joining at once on two workers announce one join, and a SIGKILLed worker's members leave
within the documented bound (docs/protocol.md, "Presence"). Every wait is bounded."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time

import pytest
import requests
from support import GunicornServer, wait_for

from .test_cluster import (
    Client,
    Worker,
    distinct_workers,
    prefix,  # noqa: F401 - a fixture
    redis_env,
    servers,  # noqa: F401 - a fixture
)
from .test_security import SECRET, token

pytestmark = pytest.mark.timeout(120)

ROOM = "presence-lobby"
TOKENS = {"WSSERVER_JWT_SECRET": SECRET, "WSSERVER_PING_INTERVAL": "600"}
# the documented bound for a killed worker's members (docs/protocol.md, "Presence")
GHOST_BOUND = 2.5


def event(action: str, user: str | None, room: str = ROOM) -> dict:
    return {"type": "presence", "room": room, "action": action, "user": user}


def join(client: Client, room: str = ROOM) -> dict:
    reply = client.subscribe(room)
    assert reply["type"] == "subscribed" and reply["room"] == room, reply
    return reply


def quiet(client: Client, wait: float = 0.5) -> bool:
    """Nothing arrives on ``client`` within ``wait`` seconds (pings answered)."""
    client.raw.sock.settimeout(wait)
    try:
        while True:
            try:
                op, payload = client.raw.recv_frame()
            except socket.timeout:
                return True
            if op == 0x9:
                client.raw.send_frame(0xA, payload)
                continue
            raise AssertionError(f"{client.name}: unexpected frame {payload!r}")
    finally:
        client.raw.sock.settimeout(10)


def user_client(server: GunicornServer, user: str | None, name: str) -> Client:
    path = "/ws" if user is None else f"/ws?token={token(user, ttl=600)}"
    return Client(server, path, (), name)


def room_info(server: GunicornServer, worker: Worker | None = None, room: str = ROOM) -> dict:
    get = worker.session.get if worker is not None else requests.get
    answer = get(server.url + "/rooms/" + room, timeout=5)
    assert answer.status_code == 200, answer.text
    return answer.json()


# -- memory broker -----------------------------------------------------------------------------


def test_tabs_of_one_user_are_one_member_on_the_memory_broker(make_server):
    srv = make_server(TOKENS)
    bob = user_client(srv, "bob", "bob")
    tabs: list[Client] = []
    try:
        assert join(bob) == {"type": "subscribed", "room": ROOM, "users": [], "anonymous": 0}
        assert bob.recv() == event("join", "bob")
        tabs.append(user_client(srv, "alice", "alice-1"))
        assert join(tabs[0])["users"] == ["bob"]
        assert bob.recv() == event("join", "alice") == tabs[0].recv()
        tabs.append(user_client(srv, "alice", "alice-2"))
        assert join(tabs[1])["users"] == ["alice", "bob"]
        assert room_info(srv) == {"room": ROOM, "clients": 3, "worker_clients": 3,
                                  "scope": "worker", "presence": True,
                                  "users": ["alice", "bob"], "anonymous": 0}
        assert quiet(bob) and quiet(tabs[0], 0.05)
        tabs.pop(0).close()
        assert quiet(bob)
        tabs.pop().close()
        assert bob.recv() == event("leave", "alice")
        wait_for(lambda: room_info(srv)["users"] == ["bob"], timeout=5, message="alice gone")
    finally:
        for client in [bob, *tabs]:
            client.close()


def test_without_tokens_every_connection_is_an_anonymous_member(make_server):
    srv = make_server({"WSSERVER_PING_INTERVAL": "600"})
    first, second = user_client(srv, None, "first"), user_client(srv, None, "second")
    try:
        join(first)
        assert first.recv() == event("join", None)
        assert join(second) == {"type": "subscribed", "room": ROOM, "users": [], "anonymous": 1}
        assert first.recv() == event("join", None) == second.recv()
        assert room_info(srv)["anonymous"] == 2
        second.close()
        assert first.recv() == event("leave", None)
    finally:
        first.close()
        second.close()


# -- Redis, two workers --------------------------------------------------------------------------


def land(srv: GunicornServer, workers: list[Worker], on: Worker, user: str, name: str,
         attempts: int = 60) -> Client:
    """A client of ``user`` connected to worker ``on`` (others are closed and retried)."""
    for _ in range(attempts):
        before = {w.pid: w.health()["worker"]["clients"] for w in workers}
        client = user_client(srv, user, name)

        def counted() -> dict[int, int] | None:
            now = {w.pid: w.health()["worker"]["clients"] for w in workers}
            return now if sum(now.values()) == sum(before.values()) + 1 else None

        now = wait_for(counted, timeout=10, message="the new client counted")
        if now[on.pid] > before[on.pid]:
            return client
        client.close()
        wait_for(lambda: sum(w.health()["worker"]["clients"] for w in workers)
                 == sum(before.values()), timeout=10, message="the surplus client gone")
    raise AssertionError(f"{name} never landed on worker {on.pid}")


def test_a_users_tabs_on_two_workers_are_one_member_and_joins_race_to_one(prefix, servers):  # noqa: F811
    srv = servers({**redis_env(prefix), **TOKENS}, args=["-w", "2"])
    a, b = distinct_workers(srv, 2)
    opened: list[Client] = []
    try:
        bob = land(srv, [a, b], a, "bob", "bob")
        opened.append(bob)
        join(bob)
        assert bob.recv() == event("join", "bob")
        alice_a = land(srv, [a, b], a, "alice", "alice-a")
        alice_b = land(srv, [a, b], b, "alice", "alice-b")
        opened += [alice_a, alice_b]
        join(alice_a)
        assert bob.recv() == event("join", "alice") == alice_a.recv()
        # the second tab, on the other worker: listed, announced to nobody
        assert join(alice_b)["users"] == ["alice", "bob"]
        assert quiet(bob) and quiet(alice_a, 0.05)
        for w in (a, b):  # whichever worker answers
            wait_for(lambda w=w: room_info(srv, w)["users"] == ["alice", "bob"], timeout=5,
                     message="both members listed")
            assert room_info(srv, w)["clients"] == 3
        alice_a.close()
        assert quiet(bob, 1.0)  # alice is still there, on worker b
        alice_b.close()
        assert bob.recv() == event("leave", "alice")

        # two tabs of carol joining at once on two workers, then leaving at once: one join,
        # one leave, every round
        for round_ in range(5):
            tabs = [land(srv, [a, b], w, "carol", f"carol-{round_}-{w.pid}") for w in (a, b)]
            opened += tabs
            replies: list[dict] = []
            go = threading.Barrier(2)

            def subscribe(tab: Client) -> None:
                go.wait(5)
                replies.append(tab.subscribe(ROOM))

            threads = [threading.Thread(target=subscribe, args=(t,)) for t in tabs]
            for t in threads:
                t.start()
            for t in threads:
                t.join(15)
            assert [r["type"] for r in replies] == ["subscribed", "subscribed"]
            assert bob.recv() == event("join", "carol")
            assert quiet(bob, 0.5), f"round {round_}: carol announced twice"
            for tab in tabs:
                tab.close()
            assert bob.recv() == event("leave", "carol")
            assert quiet(bob, 0.3)
    finally:
        for client in opened:
            client.close()


def test_a_killed_workers_members_leave_within_the_bound(prefix, servers):  # noqa: F811
    srv = servers({**redis_env(prefix), **TOKENS}, args=["-w", "2"])
    survivor, victim = distinct_workers(srv, 2)
    opened: list[Client] = []
    try:
        bob = land(srv, [survivor, victim], survivor, "bob", "bob")
        opened.append(bob)
        join(bob)
        assert bob.recv() == event("join", "bob")
        for user in ("dave", "erin"):
            ghost = land(srv, [survivor, victim], victim, user, user)
            opened.append(ghost)
            join(ghost)
            assert bob.recv() == event("join", user)
        # erin also has a tab on the survivor: she stays
        erin = land(srv, [survivor, victim], survivor, "erin", "erin-survivor")
        opened.append(erin)
        join(erin)
        wait_for(lambda: room_info(srv, survivor)["users"] == ["bob", "dave", "erin"],
                 timeout=5, message="three members")
        os.kill(victim.pid, signal.SIGKILL)
        killed = time.monotonic()
        assert bob.recv() == event("leave", "dave")
        announced = time.monotonic() - killed
        wait_for(lambda: room_info(srv, survivor)["users"] == ["bob", "erin"], timeout=5,
                 interval=0.02, message="dave dropped from GET /rooms/<room>")
        dropped = time.monotonic() - killed
        print(f"a killed worker's member: leave announced {announced:.2f}s, "
              f"dropped from GET /rooms/<room> {dropped:.2f}s after its death")
        assert announced <= GHOST_BOUND and dropped <= GHOST_BOUND
        assert quiet(bob, 0.5)  # erin is not announced as leaving
        info = room_info(srv, survivor)
        assert info["users"] == ["bob", "erin"]
    finally:
        for client in opened:
            client.close()


def test_a_worker_that_stops_announces_its_members_leaves(prefix, servers):  # noqa: F811
    """SIGTERM on one server of two: its members leave at once (not after any expiry), and
    the other server's members hear it."""
    first = servers({**redis_env(prefix), **TOKENS})
    second = servers({**redis_env(prefix), **TOKENS})
    bob = user_client(first, "bob", "bob")
    frank = user_client(second, "frank", "frank")
    try:
        join(bob)
        assert bob.recv() == event("join", "bob")
        assert join(frank)["users"] in (["bob"], [])
        assert bob.recv() == event("join", "frank")
        assert second.proc is not None
        started = time.monotonic()
        second.proc.send_signal(signal.SIGTERM)
        assert bob.recv() == event("leave", "frank")
        took = time.monotonic() - started
        print(f"a stopped server's member left {took:.2f}s after SIGTERM")
        assert took < 1.5  # not the 1.5 s report expiry plus a reaper's round
        assert room_info(first)["users"] == ["bob"]
        assert second.proc.wait(20) == 0
    finally:
        bob.close()
        frank.close()


# -- the Python client ---------------------------------------------------------------------------


def test_the_python_subscriber_follows_a_presence_room(make_server):
    from wsserver.client import Members, Subscriber

    srv = make_server(TOKENS)
    seen: list[tuple[str, Members]] = []
    watcher = Subscriber(srv.ws_url, rooms=[ROOM, "lobby"], token=token("walter", ttl=600),
                         on_presence=lambda e, m: seen.append((e.get("action", e["type"]), m)))
    other = Subscriber(srv.ws_url, rooms=[ROOM], token=token("olga", ttl=600))
    try:
        watcher.start()
        assert watcher.wait_ready(30)
        wait_for(lambda: watcher.members(ROOM) == Members(ROOM, ["walter"]), timeout=10,
                 message="walter's own join")
        other.start()
        assert other.wait_ready(30)
        wait_for(lambda: watcher.members(ROOM) == Members(ROOM, ["olga", "walter"]),
                 timeout=10, message="olga's join")
        assert other.members(ROOM) is not None and "walter" in other.members(ROOM).users
        other.stop()
        wait_for(lambda: watcher.members(ROOM) == Members(ROOM, ["walter"]), timeout=10,
                 message="olga's leave")
        assert [kind for kind, _ in seen] == ["subscribed", "join", "join", "leave"]
    finally:
        other.stop()
        watcher.stop()


def test_a_stalled_worker_is_taken_for_dead_then_announces_its_members_again(prefix, servers):  # noqa: F811
    """SIGSTOP past the report's expiry: the survivors announce the stalled worker's members
    leaving; SIGCONT: it finds its report gone and announces them again."""
    srv = servers({**redis_env(prefix), **TOKENS}, args=["-w", "2"])
    survivor, stalled = distinct_workers(srv, 2)
    opened: list[Client] = []
    try:
        bob = land(srv, [survivor, stalled], survivor, "bob", "bob")
        opened.append(bob)
        join(bob)
        assert bob.recv() == event("join", "bob")
        gina = land(srv, [survivor, stalled], stalled, "gina", "gina")
        opened.append(gina)
        join(gina)
        assert bob.recv() == event("join", "gina")
        os.kill(stalled.pid, signal.SIGSTOP)
        try:
            assert bob.recv() == event("leave", "gina")
        finally:
            os.kill(stalled.pid, signal.SIGCONT)
        resumed = time.monotonic()
        assert bob.recv() == event("join", "gina")
        print(f"a stalled worker's member announced again {time.monotonic() - resumed:.2f}s "
              "after it resumed")
        wait_for(lambda: room_info(srv, survivor)["users"] == ["bob", "gina"], timeout=5,
                 message="gina listed again")
        assert quiet(bob, 0.5)
    finally:
        for client in opened:
            client.close()


def apply_events(client: Client, members: set, wait: float = 1.5) -> None:
    """Apply every presence event ``client`` receives to ``members`` until it is quiet for
    ``wait`` seconds; a join of a member already there, or a leave of one absent, fails."""
    client.raw.sock.settimeout(wait)
    try:
        while True:
            try:
                op, payload = client.raw.recv_frame()
            except socket.timeout:
                return
            if op == 0x9:
                client.raw.send_frame(0xA, payload)
                continue
            e = json.loads(payload)
            assert e["type"] == "presence", e
            if e["action"] == "join":
                assert e["user"] not in members, f"{e} while {sorted(members)}"
                members.add(e["user"])
            else:
                assert e["user"] in members, f"{e} while {sorted(members)}"
                members.discard(e["user"])
    finally:
        client.raw.sock.settimeout(10)


def test_a_worker_that_starts_late_or_loses_its_subscription_knows_the_members(prefix, servers):  # noqa: F811
    """A server started after members joined elsewhere lists them (its snapshot on
    subscribing); a server whose Redis subscription is killed again and again while members
    come and go on the other still tells its client exactly who is there (the snapshot after
    each resubscription gives the difference it missed), never a member twice."""
    import random

    import redis

    from .test_cluster import REDIS_URL
    from .test_redis_faults import listener_ids

    first = servers({**redis_env(prefix), **TOKENS})
    bob = user_client(first, "bob", "bob")
    opened = [bob]
    admin = redis.Redis.from_url(REDIS_URL, socket_timeout=5)
    try:
        join(bob)
        assert bob.recv() == event("join", "bob")
        second = servers({**redis_env(prefix), **TOKENS})
        watcher = user_client(second, "walt", "walt")
        opened.append(watcher)
        members = set(join(watcher)["users"])
        assert members == {"bob"}  # known from second's snapshot, not from an event
        victim = f"{prefix}:listener:"
        pid = second.worker_pid()
        victim = next(c["name"] for c in admin.client_list()
                      if c["name"].startswith(victim) and f":{pid}:" in c["name"])
        rng = random.Random(5)
        present: dict[str, Client] = {}
        kills = 0
        for step in range(40):
            if step % 3 == 0:
                ids = wait_for(lambda: listener_ids(admin, victim), timeout=10,
                               message="the listener back")
                kills += sum(admin.client_kill_filter(_id=i) for i in ids)
            name = rng.choice(["u1", "u2", "u3", "u4"])
            if name in present:
                present.pop(name).close()
            else:
                present[name] = user_client(first, name, name)
                opened.append(present[name])
                join(present[name])
        assert kills >= 5
        wait_for(lambda: listener_ids(admin, victim), timeout=10, message="the listener back")
        expected = sorted({"bob", "walt", *present})
        wait_for(lambda: room_info(second)["users"] == expected, timeout=10,
                 message="second's members right after the kills")
        assert room_info(first)["users"] == expected
        apply_events(watcher, members)
        assert sorted(members) == expected
    finally:
        for client in opened:
            client.close()
        admin.close()


def test_the_server_api_takes_members_out_and_the_room_hears_it(make_server):
    """POST /unsubscribe and POST /disconnect (the server API) take a user's connections out
    through the same hub: its leave is announced once, when its last connection goes."""
    srv = make_server(TOKENS)
    bob = user_client(srv, "bob", "bob")
    tabs = [user_client(srv, "mallory", f"mallory-{i}") for i in range(2)]
    eve = user_client(srv, "eve", "eve")
    try:
        join(bob)
        assert bob.recv() == event("join", "bob")
        for tab in tabs:
            join(tab)
        assert bob.recv() == event("join", "mallory")
        join(eve)
        assert bob.recv() == event("join", "eve")
        answer = requests.post(srv.url + "/unsubscribe", json={"user": "mallory", "room": ROOM},
                               timeout=10)
        assert answer.status_code == 200, answer.text
        assert bob.recv() == event("leave", "mallory")
        assert quiet(bob, 0.5)
        answer = requests.post(srv.url + "/disconnect", json={"user": "eve"}, timeout=10)
        assert answer.status_code == 200 and answer.json()["closed"] == 1, answer.text
        assert bob.recv() == event("leave", "eve")
        assert room_info(srv)["users"] == ["bob"]
    finally:
        for client in (bob, *tabs, eve):
            client.close()
