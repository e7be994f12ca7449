"""End to end: several workers and servers sharing one Redis, recovery with ``since``, a Redis
outage and the start-up refusals. Real gunicorn, real Redis, real WebSocket clients.

Redis runs at 127.0.0.1:6379; every test uses its own key prefix (``wstest-<uuid>``) and
deletes its keys afterwards. The outage test runs its own ``redis-server`` on a free port,
killed and restarted by PID. Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterable
from typing import Any, Callable

import pytest
import requests
from support import (
    ROOT,
    GunicornServer,
    RawClient,
    RedisProcess,
    delete_redis_keys,
    free_port,
    wait_for,
)

REDIS_URL = "redis://127.0.0.1:6379/0"
# clients here are read only when a test checks them: no keepalive ping may close them first
QUIET = {"WSSERVER_PING_INTERVAL": "600"}
# the audiences a client may be in (None: everybody, i.e. no room at all)
CLIENT_ROOMS: tuple[tuple[str, ...], ...] = (
    (), ("a",), ("b",), ("c",), ("a", "b"), ("a", "b", "c"), ("b", "c"),
)
# what a notification may target: None is room-less (everybody)
TARGETS: tuple[tuple[str, ...] | None, ...] = (
    None, ("a",), ("b",), ("c",), ("a", "b"), ("b", "c"),
)


# -- helpers ---------------------------------------------------------------------------------


def id_key(message_id: str) -> tuple[int, ...]:
    """An id as a comparable key: "42" (memory) or "1700000000000-3" (Redis stream id)."""
    return tuple(int(part) for part in message_id.split("-"))


@pytest.fixture
def prefix(redis_prefix):
    """A Redis key prefix of this test's own; its keys are deleted afterwards."""
    return redis_prefix


@pytest.fixture
def servers(prefix):
    """Start servers; each is stopped (by PID) after the test, before ``prefix`` cleans up."""
    started: list[GunicornServer] = []

    def start(env: dict | None = None, **kwargs: Any) -> GunicornServer:
        srv = GunicornServer(env={**QUIET, **(env or {})}, **kwargs)
        started.append(srv)
        return srv.start()

    yield start
    for srv in started:
        srv.stop()


def redis_env(prefix: str, url: str = REDIS_URL, **extra: str) -> dict[str, str]:
    return {"WSSERVER_REDIS_URL": url, "WSSERVER_REDIS_PREFIX": prefix, **extra}


class Client:
    """A WebSocket client (the suite's bare-socket ``RawClient``: buffered reads, so reading
    thousands of frames stays cheap) and the rooms it is in."""

    def __init__(self, server: GunicornServer, path: str, rooms: tuple[str, ...],
                 name: str) -> None:
        self.raw = RawClient(server, path, timeout=10)
        assert self.raw.status == 101, f"{name}: handshake answered {self.raw.status}"
        self.rooms, self.name = rooms, name

    @property
    def audiences(self) -> set[str | None]:
        return {None, *self.rooms}

    def recv(self) -> dict:
        """The next text frame as JSON (pings answered); each read waits at most 10 s."""
        while True:
            opcode, payload = self.raw.recv_frame()
            if opcode == 0x1:
                return json.loads(payload)
            if opcode == 0x9:
                self.raw.send_frame(0xA, payload)
            elif opcode == 0x8:
                raise AssertionError(f"{self.name}: closed by the server: {payload!r}")

    def subscribe(self, room: str, since: str | None = None) -> dict:
        command: dict = {"type": "subscribe", "room": room}
        if since is not None:
            command["since"] = since
        self.raw.send_text(json.dumps(command))
        return self.recv()

    def notifications_until(self, event: str) -> list[dict]:
        """Every notification received before the one with ``event`` (which is consumed)."""
        got = []
        while True:
            message = self.recv()
            if message.get("event") == event:
                return got
            assert "type" not in message, f"{self.name}: unexpected frame {message}"
            got.append(message)

    def close(self) -> None:
        self.raw.close()


def open_client(server: GunicornServer, rooms: tuple[str, ...], name: str,
                by_command: bool = False) -> Client:
    """Connect; join ``rooms`` with ``?rooms=`` or (``by_command``) one subscribe each, whose
    replies are awaited. ``?rooms=`` joins right after the handshake: callers wait for the
    server's counts before relying on it."""
    query = f"?rooms={','.join(rooms)}" if rooms and not by_command else ""
    client = Client(server, "/ws" + query, rooms, name)
    if by_command:
        for room in rooms:
            assert client.subscribe(room) == {"type": "subscribed", "room": room}
    return client


class Worker:
    """A keep-alive HTTP connection known to be served by one worker (pid): its ``GET /``
    shows that worker's own counts under ``worker`` (the top-level ones are the cluster's). Every answer is checked to come from the same worker,
    so a silent reconnect to another worker would fail the test rather than mislead it."""

    def __init__(self, server: GunicornServer, session: requests.Session, pid: int) -> None:
        self.server, self.session, self.pid = server, session, pid
        self.posts = 0

    def health(self) -> dict:
        body = self.session.get(self.server.url + "/", timeout=5).json()
        assert body["pid"] == self.pid, "the keep-alive connection moved to another worker"
        return body

    def post(self, body: Any) -> requests.Response:
        """POST /notify on this worker; every 50th also checks the connection stayed here."""
        answer = self.session.post(self.server.url + "/notify", json=body, timeout=10)
        self.posts += 1
        if self.posts % 50 == 0:
            self.health()
        return answer


def distinct_workers(server: GunicornServer, count: int, attempts: int = 200) -> list[Worker]:
    """Open keep-alive connections until ``count`` of them are served by distinct workers."""
    found: dict[int, Worker] = {}
    spare: list[requests.Session] = []
    try:
        for _ in range(attempts):
            session = requests.Session()
            pid = session.get(server.url + "/", timeout=5).json()["pid"]
            if pid in found:
                spare.append(session)
                continue
            found[pid] = Worker(server, session, pid)
            if len(found) == count:
                return list(found.values())
    finally:
        for session in spare:
            session.close()
    raise AssertionError(f"only {len(found)} distinct workers answered {attempts} connections")


def connect_balanced(server: GunicornServer, workers: list[Worker], plans: list[tuple],
                     attempts: int = 400) -> list[Client]:
    """Connect one client per plan ((rooms, by_command)), as many on each worker: a client
    that lands on a worker that already has its share is closed and retried."""
    share = -(-len(plans) // len(workers))
    clients: list[Client] = []
    counts = {w.pid: 0 for w in workers}

    def local() -> dict[int, int]:
        return {w.pid: w.health()["worker"]["clients"] for w in workers}

    def counted() -> dict[int, int] | None:
        now = local()
        return now if sum(now.values()) == len(clients) + 1 else None

    tries = 0
    try:
        for i, (rooms, by_command) in enumerate(plans):
            while True:
                tries += 1
                assert tries <= attempts, "could not spread the clients over the workers"
                client = open_client(server, rooms, f"client{i}", by_command)
                try:
                    now = wait_for(counted, timeout=10, message="the new client to be counted")
                except BaseException:
                    client.close()
                    raise
                landed = next(pid for pid in now if now[pid] > counts[pid])
                if now[landed] <= share:
                    counts = now
                    clients.append(client)
                    break
                client.close()
                wait_for(lambda: sum(local().values()) == len(clients), timeout=10,
                         message="the surplus client to be gone")
    except BaseException:
        for client in clients:
            client.close()
        raise
    return clients


def plan_clients(n: int) -> list[tuple[tuple[str, ...], bool]]:
    """``n`` clients in various rooms (some in none), joined by URL or by command."""
    return [(CLIENT_ROOMS[i % len(CLIENT_ROOMS)], i % 2 == 1) for i in range(n)]


def expected_rooms(plans: Iterable[tuple[tuple[str, ...], bool]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for rooms, _ in plans:
        for room in rooms:
            counts[room] = counts.get(room, 0) + 1
    return counts


def wait_cluster(ask: list[Callable[[], dict]], workers: int, clients: int,
                 rooms: dict[str, int]) -> None:
    """Wait until ``GET /`` reports the whole cluster on every one of ``ask`` in one round
    (each worker reports every 0.25 s and reads the others' reports as often, so one worker
    may see a change up to half a second before another)."""
    last: list[dict] = []

    def matches() -> bool:
        last[:] = [health().get("cluster") or {} for health in ask]
        return all(c.get("workers") == workers and c.get("clients") == clients
                   and c.get("rooms") == rooms for c in last)

    try:
        wait_for(matches, timeout=15, interval=0.1, message="the cluster counts")
    except AssertionError:
        raise AssertionError(f"cluster counts never matched: {last}")


def notification(seq: int, targets: tuple[str, ...] | None) -> dict:
    body: dict = {"event": "n", "data": {"seq": seq}}
    if targets is not None:
        if len(targets) == 1:
            body["room"] = targets[0]
        else:
            body["rooms"] = list(targets)
    return body


class Accepted:
    """The notifications the server accepted (200), as (audience, id, seq), per audience."""

    def __init__(self) -> None:
        self.by_audience: dict[str | None, list[tuple[str, int]]] = {}
        # seqs answered 503 broker_unavailable: "may have been published" (docs/protocol.md,
        # "Retries and idempotency keys"): Redis may have run the script before the answer was
        # lost (killed mid-reply), so each may arrive, once, or not at all
        self.maybe: set[int] = set()
        self._lock = threading.Lock()

    def add(self, seq: int, targets: tuple[str, ...] | None, answer: dict) -> None:
        assert answer["status"] == "ok", answer
        with self._lock:
            if targets is None:
                assert "ids" not in answer, answer
                self.by_audience.setdefault(None, []).append((answer["id"], seq))
            else:
                assert sorted(answer["ids"]) == sorted(targets), answer
                assert answer["id"] == answer["ids"][targets[0]], answer
                for room in targets:
                    self.by_audience.setdefault(room, []).append((answer["ids"][room], seq))

    def expected(self, audience: str | None) -> list[tuple[str, int]]:
        """The audience's messages in id order; ids unique within an audience."""
        entries = sorted(self.by_audience.get(audience, []), key=lambda e: id_key(e[0]))
        ids = [i for i, _ in entries]
        assert len(set(ids)) == len(ids), f"the server gave one id twice in {audience!r}"
        return entries


def check_received(client: Client, got: list[dict], accepted: Accepted) -> None:
    """``client`` got exactly the accepted messages of its audiences, each once, in id order
    per audience, with the id and payload the POST answers said."""
    by_audience: dict[str | None, list[tuple[str, int]]] = {}
    for message in got:
        assert message["event"] == "n", message
        by_audience.setdefault(message["room"], []).append((message["id"], message["data"]["seq"]))
    stray = set(by_audience) - client.audiences
    assert not stray, f"{client.name} (rooms {client.rooms}) got messages of {stray}"
    for audience in client.audiences:
        want = accepted.expected(audience)
        have = by_audience.get(audience, [])
        ids = [i for i, _ in have]
        dups = len(ids) - len(set(ids))
        have_set, want_set = set(have), set(want)
        missing = [e for e in want if e not in have_set]
        extra = [e for e in have if e not in want_set and e[1] not in accepted.maybe]
        keys = [id_key(i) for i in ids]
        disorder = sum(1 for x, y in zip(keys, keys[1:]) if not x < y)
        assert (dups, missing[:5], extra[:5], disorder) == (0, [], [], 0), (
            f"{client.name} in {audience!r}: {len(have)} received, {len(want)} accepted; "
            f"{dups} duplicates, {len(missing)} missing (first {missing[:5]}), "
            f"{len(extra)} unexpected (first {extra[:5]}), {disorder} out of order"
        )
        # in order and whole, once the messages answered "may have been published" (503) that
        # did arrive are set aside (the checks above allow each of those at most once)
        assert [e for e in have if e in want_set] == want


def post_all(posters: list[Callable[[Any], requests.Response]], count: int,
             seed: int) -> Accepted:
    """POST ``count`` notifications (rooms, several rooms, room-less), spread over
    ``posters`` (one thread each, posting items i, i+len, ...); every answer must be 200."""
    rng = random.Random(seed)
    plan = [(seq, rng.choice(TARGETS)) for seq in range(count)]
    accepted = Accepted()
    failures: list[str] = []

    def run(k: int) -> None:
        try:
            for seq, targets in plan[k::len(posters)]:
                answer = posters[k](notification(seq, targets))
                if answer.status_code != 200:
                    failures.append(f"seq {seq}: {answer.status_code} {answer.text}")
                    return
                accepted.add(seq, targets, answer.json())
        except Exception as exc:  # noqa: BLE001 - reported by the main thread
            failures.append(f"poster {k}: {exc!r}")

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(posters))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "posting did not finish within 60 s"
    assert not failures, failures[:5]
    assert sum(len(v) for v in accepted.by_audience.values()) >= count
    return accepted


def collect_and_check(clients: list[Client], accepted: Accepted,
                      post_end: Callable[[Any], requests.Response]) -> None:
    """Post a room-less end marker (published after every accepted message, so it reaches
    each client after all of them), read every client up to it, and check what each got."""
    assert post_end({"event": "end"}).status_code == 200
    for client in clients:
        check_received(client, client.notifications_until("end"), accepted)


# -- 1 and 2: one audience over several workers / servers ------------------------------------


def test_two_workers_share_one_audience(prefix, servers):
    srv = servers(redis_env(prefix), args=["-w", "2"])
    workers = distinct_workers(srv, 2)
    plans = plan_clients(20)
    clients = connect_balanced(srv, workers, plans)
    try:
        assert sorted(w.health()["worker"]["clients"] for w in workers) == [10, 10]
        wait_cluster([w.health for w in workers], workers=2, clients=20,
                     rooms=expected_rooms(plans))
        for w in workers:  # whichever worker answers, it reports the whole cluster
            assert w.health()["cluster"]["clients"] == w.health()["clients"] == 20

        accepted = post_all([w.post for w in workers], 1000, seed=1)
        assert [w.posts for w in workers] == [500, 500]  # each checked its worker every 50
        collect_and_check(clients, accepted, workers[1].post)
    finally:
        for client in clients:
            client.close()


def test_two_servers_share_one_redis(prefix, servers):
    first = servers(redis_env(prefix), args=["-w", "1"])
    second = servers(redis_env(prefix), args=["-w", "1"])
    plans = plan_clients(20)
    clients = [open_client(first if i % 2 == 0 else second, rooms, f"client{i}", by_command)
               for i, (rooms, by_command) in enumerate(plans)]
    try:
        for srv in (first, second):
            wait_for(lambda s=srv: s.health()["worker"]["clients"] == 10, timeout=10,
                     message="clients counted")
        wait_cluster([first.health, second.health], workers=2, clients=20,
                     rooms=expected_rooms(plans))
        assert second.health()["cluster"]["clients"] == 20

        sessions = [requests.Session(), requests.Session()]
        posters = [
            lambda body, s=sessions[0]: s.post(first.url + "/notify", json=body, timeout=10),
            lambda body, s=sessions[1]: s.post(second.url + "/notify", json=body, timeout=10),
        ]
        accepted = post_all(posters, 1000, seed=2)
        collect_and_check(clients, accepted, posters[0])
    finally:
        for client in clients:
            client.close()


# -- several workers are one service to every observer ----------------------------------------

# POST /notify audiences whose ``clients`` an observer reads
AUDIENCES = {
    "everybody": {"event": "count"},
    "orders": {"event": "count", "room": "orders"},
    "both": {"event": "count", "rooms": ["orders", "news"]},
}


def observed(worker: Worker) -> dict:
    """What one worker tells an observer: ``GET /``'s totals, ``GET /rooms``, and the
    ``clients`` of a ``POST /notify`` to each audience."""
    health = worker.health()
    listed = worker.session.get(worker.server.url + "/rooms", timeout=5).json()
    assert listed["scope"] == health["scope"] == "cluster", (listed, health)
    return {
        "clients": health["clients"],
        "rooms": health["rooms"],
        "subscriptions": health["subscriptions"],
        "listed": {r["room"]: r["clients"] for r in listed["rooms"]},
        "posts": {name: worker.post(body).json()["clients"] for name, body in AUDIENCES.items()},
    }


def agree_within(observers: list[Worker], want: dict, limit: float) -> float:
    """Read every observer in rounds until one round shows ``want`` everywhere; fail unless
    that round started within ``limit`` s. Returns when it started (seconds from now)."""
    start = time.monotonic()
    last: list[dict] = []
    while True:
        began = time.monotonic() - start
        last = [observed(w) for w in observers]
        if all(seen == want for seen in last):
            return began
        assert began <= limit, f"not every worker said {want} within {limit}s: {last}"
        time.sleep(0.02)


def stable_parts(seen: dict) -> tuple:
    return (seen["listed"].get("orders"), seen["listed"].get("news"),
            seen["posts"]["orders"], seen["posts"]["both"])


class Churn(threading.Thread):
    """Clients joining room ``churn`` (or none) and leaving, on both servers, until stopped;
    every one is closed when it ends."""

    def __init__(self, targets: list[GunicornServer]) -> None:
        super().__init__(daemon=True)
        self.targets, self.stop, self.errors, self.cycles = targets, threading.Event(), [], 0

    def run(self) -> None:
        open_now: list[Client] = []
        try:
            while not self.stop.is_set():
                server = self.targets[self.cycles % len(self.targets)]
                rooms = ("churn",) if self.cycles % 3 else ()
                open_now.append(open_client(server, rooms, f"churn{self.cycles}"))
                if len(open_now) > 6:
                    open_now.pop(0).close()
                self.cycles += 1
        except Exception as exc:  # noqa: BLE001 - reported by the test
            self.errors.append(repr(exc))
        finally:
            for client in open_now:
                client.close()


def test_two_servers_of_two_workers_are_one_service(prefix, servers):
    """Issue 15: whichever of 4 workers (2 servers x 2) answers, ``GET /``, ``GET /rooms``
    and ``POST /notify``'s ``clients`` give the cluster's numbers, exact within 1 s of a
    change, and rooms nobody joins or leaves stay exact while others churn."""
    first = servers(redis_env(prefix), args=["-w", "2"])
    second = servers(redis_env(prefix), args=["-w", "2"])
    plans = [(("orders",), False)] * 20 + [(("news",), False)] * 10 + [((), False)] * 4
    clients: list[Client] = []
    churn = Churn([first, second])
    try:
        observers = distinct_workers(first, 2) + distinct_workers(second, 2)
        clients += connect_balanced(first, observers[:2], plans[0::2])
        clients += connect_balanced(second, observers[2:], plans[1::2])
        assert all(w.health()["worker"]["clients"] >= 8 for w in observers)
        want = {"clients": 34, "rooms": 2, "subscriptions": 30,
                "listed": {"orders": 20, "news": 10},
                "posts": {"everybody": 34, "orders": 20, "both": 30}}
        agree_within(observers, want, 1.0)

        churn.start()
        readings = 0
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline or churn.cycles < 20:
            for worker in observers:
                seen = observed(worker)
                assert stable_parts(seen) == (20, 10, 20, 30), seen
                assert seen["clients"] >= 34, seen
                readings += 1
            assert not churn.errors, churn.errors
        churn.stop.set()
        churn.join(15)
        assert not churn.is_alive() and not churn.errors, churn.errors
        took = agree_within(observers, want, 1.0)
        print(f"{churn.cycles} churn cycles, {readings} readings; exact {took:.2f}s after")
    finally:
        churn.stop.set()
        for client in clients:
            client.close()


def test_a_killed_workers_clients_leave_the_count_within_two_seconds(prefix, servers):
    srv = servers(redis_env(prefix), args=["-w", "2"])
    workers = distinct_workers(srv, 2)
    clients = connect_balanced(srv, workers, [(("k",), False)] * 4)
    try:
        survivor, victim = workers
        wait_for(lambda: survivor.health()["clients"] == 4, timeout=5, message="4 counted")
        os.kill(victim.pid, signal.SIGKILL)
        killed = time.monotonic()
        wait_for(lambda: survivor.health()["clients"] == 2, timeout=5, interval=0.02,
                 message="the killed worker's clients to leave the count")
        took = time.monotonic() - killed
        assert took <= 2.0, f"a killed worker was counted {took:.2f}s after its death"
        print(f"a killed worker's clients left the count {took:.2f}s after its death")
        listed = survivor.session.get(srv.url + "/rooms", timeout=5).json()["rooms"]
        assert listed == [{"room": "k", "clients": 2, "worker_clients": 2}]
    finally:
        for client in clients:
            client.close()


# -- 3: recovery with "since", on both brokers -----------------------------------------------


BROKERS = ["memory", "redis"]


def _recovery_server(kind: str, **extra: str):
    prefix = f"wstest-{uuid.uuid4().hex[:12]}"
    env = {**QUIET, **extra}
    if kind == "redis":
        env.update(redis_env(prefix))
    srv = GunicornServer(env=env).start()
    try:
        yield srv
    finally:
        srv.stop(graceful=False)
        if kind == "redis":
            delete_redis_keys(REDIS_URL, prefix)


@pytest.fixture(scope="module", params=BROKERS)
def recovery_server(request):
    """A one-worker server per broker, with the default history (100 messages per room);
    each test uses rooms of its own."""
    yield from _recovery_server(request.param)


@pytest.fixture(scope="module", params=BROKERS)
def trimmed_server(request):
    yield from _recovery_server(request.param, WSSERVER_HISTORY_SIZE="10")


def fresh_room() -> str:
    return f"r-{uuid.uuid4().hex[:10]}"


def post_to(server: GunicornServer, room: str, seqs: Iterable[int],
            session: requests.Session) -> list[str]:
    ids = []
    for seq in seqs:
        answer = session.post(server.url + "/notify", json=notification(seq, (room,)), timeout=10)
        assert answer.status_code == 200, answer.text
        ids.append(answer.json()["id"])
    keys = [id_key(i) for i in ids]
    assert keys == sorted(keys) and len(set(keys)) == len(keys), ids
    return ids


def read_notifications(client: Client, n: int) -> list[tuple[str, int]]:
    """The next ``n`` frames, each a notification: (id, seq)."""
    out = []
    for _ in range(n):
        message = client.recv()
        assert message.get("event") == "n", f"expected a notification, got {message}"
        out.append((message["id"], message["data"]["seq"]))
    return out


def seen_then_gone(server: GunicornServer, room: str, session: requests.Session,
                   count: int = 5) -> str:
    """A client joins ``room``, receives ``count`` messages, leaves; the last id it saw."""
    def members() -> int:
        listing = session.get(server.url + "/rooms", timeout=5).json()["rooms"]
        return next((r["clients"] for r in listing if r["room"] == room), 0)

    client = open_client(server, (room,), "first", by_command=True)
    try:
        ids = post_to(server, room, range(count), session)
        assert read_notifications(client, count) == list(zip(ids, range(count)))
        before = members()
    finally:
        client.close()
    wait_for(lambda: members() == before - 1, timeout=10,
             message="the first client to leave the room")
    return ids[-1]


def resume(server: GunicornServer, room: str, since: str, how: str) -> tuple[Client, dict]:
    """Reconnect and resume ``room`` after ``since``: by command or by URL. The reply."""
    if how == "command":
        client = open_client(server, (), "resumed")
        return client, client.subscribe(room, since=since)
    client = Client(server, f"/ws?rooms={room}&since={since}", (room,), "resumed")
    return client, client.recv()


@pytest.mark.parametrize("how", ["command", "query"])
def test_resume_replays_what_was_missed_then_goes_live(recovery_server, how):
    """100 missed with the default history of 100 messages: exactly what history holds."""
    srv, room, session = recovery_server, fresh_room(), requests.Session()
    last = seen_then_gone(srv, room, session)
    missed = post_to(srv, room, range(100, 200), session)

    client, reply = resume(srv, room, last, how)
    try:
        assert reply == {"type": "subscribed", "room": room, "recovered": True, "missed": 100}
        assert read_notifications(client, 100) == list(zip(missed, range(100, 200)))
        live = post_to(srv, room, range(200, 220), session)
        assert read_notifications(client, 20) == list(zip(live, range(200, 220)))
        # nothing else follows: the next frame is the next message
        end = post_to(srv, room, [999], session)
        assert read_notifications(client, 1) == [(end[0], 999)]
    finally:
        client.close()


@pytest.mark.parametrize("how", ["command", "query"])
def test_resume_while_messages_keep_coming(recovery_server, how):
    """Messages published during the resume itself: the replay and the live stream meet
    with no gap and no duplicate."""
    srv, room, session = recovery_server, fresh_room(), requests.Session()
    last = seen_then_gone(srv, room, session)
    before = post_to(srv, room, range(100, 130), session)

    posted: list[tuple[str, int]] = list(zip(before, range(100, 130)))
    stop = threading.Event()
    errors: list[str] = []

    def keep_posting() -> None:
        s = requests.Session()
        try:
            for seq in range(130, 190):  # at most 90 after `last`: history (100) holds them
                if stop.is_set():
                    return
                posted.append((post_to(srv, room, [seq], s)[0], seq))
                stop.wait(0.01)  # spread the posts over the resume
        except Exception as exc:  # noqa: BLE001
            errors.append(repr(exc))

    poster = threading.Thread(target=keep_posting)
    poster.start()
    try:
        wait_for(lambda: len(posted) >= 35, timeout=10, message="posting under way")
        client, reply = resume(srv, room, last, how)
    except BaseException:
        stop.set()
        raise
    finally:
        poster.join(30)
    assert not poster.is_alive() and not errors, errors
    try:
        assert reply["type"] == "subscribed" and reply["recovered"] is True, reply
        assert 35 <= reply["missed"] <= len(posted), reply
        assert read_notifications(client, len(posted)) == posted
        end = post_to(srv, room, [999], session)
        assert read_notifications(client, 1) == [(end[0], 999)]
    finally:
        client.close()


def delivered_up_to(watcher: Client, message_id: str) -> None:
    """Read ``watcher`` (a member of the room all along) up to ``message_id``: the worker has
    then fanned out everything published before it. With Redis a 200 comes back before the
    worker's listener has the message, so a client subscribing right after a POST may still
    get that message live; waiting here makes "nothing was replayed" exact."""
    while True:
        message = watcher.recv()
        assert message.get("event") == "n", message
        if message["id"] == message_id:
            return


@pytest.mark.parametrize("how", ["command", "query"])
def test_resume_past_the_history_recovers_nothing(trimmed_server, how):
    srv, room, session = trimmed_server, fresh_room(), requests.Session()
    watcher = open_client(srv, (room,), "watcher", by_command=True)
    client = None
    try:
        last = seen_then_gone(srv, room, session)
        away = post_to(srv, room, range(100, 150), session)  # 50 while away; 10 kept
        delivered_up_to(watcher, away[-1])

        client, reply = resume(srv, room, last, how)
        assert reply == {"type": "subscribed", "room": room, "recovered": False, "missed": 0}
        live = post_to(srv, room, [200], session)
        assert read_notifications(client, 1) == [(live[0], 200)]  # nothing was replayed
    finally:
        watcher.close()
        if client is not None:
            client.close()


def test_resume_from_an_id_never_issued(recovery_server):
    srv, room, session = recovery_server, fresh_room(), requests.Session()
    watcher = open_client(srv, (room,), "watcher", by_command=True)
    try:
        last = seen_then_gone(srv, room, session)
        latest = post_to(srv, room, range(100, 110), session)[-1]
        head, *rest = last.split("-")
        future = "-".join([str(int(head) + 10**6), *rest])  # later than anything issued
        other_kind = "5" if rest else "1000-0"  # the other broker's id form

        for since in (future, other_kind):
            delivered_up_to(watcher, latest)
            client, reply = resume(srv, room, since, "command")
            try:
                assert reply == {"type": "subscribed", "room": room, "recovered": False,
                                 "missed": 0}
                latest = post_to(srv, room, [200], session)[0]
                assert read_notifications(client, 1) == [(latest, 200)]  # nothing replayed
            finally:
                client.close()
    finally:
        watcher.close()


# -- 4: Redis goes away and comes back -------------------------------------------------------


@pytest.fixture
def own_redis():
    # it keeps its data across the SIGKILL, so the workers replay what they missed; a Redis
    # that comes back empty makes them close their clients to resume instead
    # (tests/test_brokers.py::test_a_lost_bus_log_closes_clients_to_resume)
    server = RedisProcess(persistent=True)
    server.start()
    yield server
    server.stop()


class Poster(threading.Thread):
    """POSTs notifications in a loop until stopped; records every answer."""

    def __init__(self, server: GunicornServer) -> None:
        super().__init__(daemon=True)
        self.server = server
        self.stop = threading.Event()
        self.answers: list[tuple[int, tuple | None, float, int, dict, dict]] = []
        self.errors: list[str] = []

    def run(self) -> None:
        session = requests.Session()
        seq = 0
        while not self.stop.is_set():
            targets = TARGETS[seq % len(TARGETS)]
            try:
                answer = session.post(self.server.url + "/notify",
                                      json=notification(seq, targets), timeout=10)
                body = answer.json()
            except Exception as exc:  # noqa: BLE001 - reported by the test
                self.errors.append(f"seq {seq}: {exc!r}")
                return
            self.answers.append((seq, targets, time.monotonic(), answer.status_code, body,
                                 dict(answer.headers)))
            seq += 1
            self.stop.wait(0.005)  # pace the loop

    def count(self, status: int, after: float = 0.0) -> int:
        return sum(1 for a in list(self.answers) if a[3] == status and a[2] > after)


def test_redis_outage_refuses_then_recovers_without_loss(prefix, servers, own_redis):
    srv = servers(redis_env(prefix, own_redis.url))
    pid = srv.worker_pid()
    plans = plan_clients(7)
    clients = [open_client(srv, rooms, f"client{i}", by_command)
               for i, (rooms, by_command) in enumerate(plans)]
    subscriptions = sum(len(rooms) for rooms, _ in plans)
    poster = Poster(srv)
    try:
        wait_for(lambda: (h := srv.health())["clients"] == 7 and h["subscriptions"] == subscriptions,
                 timeout=10, message="clients and subscriptions counted")
        poster.start()
        wait_for(lambda: poster.count(200) >= 50, timeout=20, message="50 accepted")

        own_redis.kill()
        killed = time.monotonic()
        wait_for(lambda: poster.count(503, after=killed) >= 20, timeout=20,
                 message="POSTs refused while Redis is down")
        # while it is down: refused with a reason and a retry delay; not ready; degraded;
        # alive, and the same worker
        refused = [a for a in list(poster.answers) if a[3] == 503]
        assert refused
        for _, _, _, _, body, headers in refused:
            assert body["code"] == "broker_unavailable", body
            assert headers.get("Retry-After"), headers
        ready = requests.get(srv.url + "/readyz", timeout=5)
        assert ready.status_code == 503 and ready.json()["broker"] is False, ready.text
        health = requests.get(srv.url + "/", timeout=5)
        assert health.status_code == 200, health.text
        assert health.json()["status"] == "degraded" and health.json()["pid"] == pid
        assert health.json()["broker"]["connected"] is False
        assert requests.get(srv.url + "/healthz", timeout=5).status_code == 200

        own_redis.start()  # same port
        restarted = time.monotonic()
        wait_for(lambda: requests.get(srv.url + "/readyz", timeout=5).status_code == 200,
                 timeout=15, interval=0.05, message="/readyz 200 after Redis is back")
        wait_for(lambda: poster.count(200, after=restarted) >= 50, timeout=20,
                 message="POSTs accepted again")
        poster.stop.set()
        poster.join(15)
        assert not poster.is_alive() and not poster.errors, poster.errors

        statuses = {a[3] for a in poster.answers}
        assert statuses <= {200, 503}, statuses
        health = srv.health()
        assert health["status"] == "ok" and health["pid"] == pid
        assert requests.get(srv.url + "/healthz", timeout=5).status_code == 200

        accepted = Accepted()
        for seq, targets, _, status, body, _ in poster.answers:
            if status == 200:
                accepted.add(seq, targets, body)
            elif body.get("code") == "broker_unavailable":
                accepted.maybe.add(seq)
        collect_and_check(clients, accepted, lambda body: srv.notify(body))
        assert srv.worker_pid() == pid
    finally:
        poster.stop.set()
        if poster.is_alive():
            poster.join(15)
        for client in clients:
            client.close()


# -- 5: start-up refusals --------------------------------------------------------------------


def run_master(env: dict[str, str], args: list[str]) -> tuple[int, str, float]:
    """Run the gunicorn master as the suite does; its exit code, output and run time."""
    srv = GunicornServer(env=env, args=args)
    for name in ("WSSERVER_REDIS_URL", "WSSERVER_WORKERS"):
        if name not in env:
            srv.env.pop(name, None)
    cmd = [sys.executable, "-m", "gunicorn", "-c", "python:wsserver.gunicorn_conf", *args,
           "wsserver:create_app()"]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=srv.env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        out, _ = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate(timeout=5)
        raise AssertionError("the master did not exit within 20 s:\n" + out.decode(errors="replace"))
    return proc.returncode, out.decode(errors="replace"), time.monotonic() - started


def test_unreachable_redis_stops_the_start():
    dead = free_port()  # nothing listens there
    code, out, took = run_master({"WSSERVER_REDIS_URL": f"redis://127.0.0.1:{dead}/0"}, [])
    assert code != 0, out
    assert took < 15, f"took {took:.1f}s"
    assert "Redis" in out and "unreachable" in out, out
    assert "Traceback" not in out, out
    assert "Booting worker" not in out, out


@pytest.mark.parametrize("how", ["flag", "setting"])
def test_several_workers_without_redis_are_refused(how):
    env, args = ({}, ["-w", "2"]) if how == "flag" else ({"WSSERVER_WORKERS": "2"}, [])
    code, out, took = run_master(env, args)
    assert code != 0, out
    assert took < 15, f"took {took:.1f}s"
    assert "WSSERVER_REDIS_URL" in out, out
    assert "Traceback" not in out, out
    assert "Booting worker" not in out, out
