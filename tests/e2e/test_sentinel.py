"""End to end: Redis Sentinel failover under publishing load (issue 14, high-availability Redis).

The test starts its own Redis group on free loopback ports: a master, one replica and three
sentinels (``redis-server --sentinel``, quorum 2, ``down-after-milliseconds`` 500,
``failover-timeout`` 2000), then a two-worker wsserver that knows only the sentinels
(``WSSERVER_REDIS_SENTINELS`` + ``WSSERVER_REDIS_SENTINEL_MASTER``). ``Subscriber`` clients
(some on each worker) record the ids they receive; a ``Publisher`` (retries 503s, one
Idempotency-Key per call) posts 20 notifications a second; the master is SIGKILLed
mid-stream.

What is asserted, and why exactly this:

* the workers follow the promotion: POSTs are answered 503 while no master is known (at least
  one, so the outage was seen), 200 again within 10 s of the kill, and the health page names
  the promoted replica's data afterwards (publishing works there);
* nothing answered 200 is lost at the clients *unless Redis itself lost it*: replication to the
  replica is asynchronous, so a write the master acknowledged in the last instant before the
  SIGKILL may never reach the replica. Such a message is absent from the promoted master's
  history; a client that did not get it live cannot get it from anyone. So: every 200-answered
  id that the promoted master's history holds reached every client, once, in order; 200-answered
  ids missing from that history are counted ("lost by Redis"), must all have been answered
  before the kill, and are at most 2 (one publish in flight at 20/s; on loopback replication
  takes microseconds, so it is 0 nearly always). Nothing answered 200 after the kill is lost.
  (Should that instant ever hit a message a worker had delivered as its last, its clients
  are closed to resume and told ``recovered: false``, and this test fails showing it: the
  second test makes exactly that happen on purpose and checks it.)

Every process is stopped by its PID. Skipped when ``redis-server`` is not installed.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from support import GunicornServer, free_port, wait_for

from wsserver.client import Publisher, Subscriber, WsserverError
from wsserver.codes import CLOSE_INTERNAL_ERROR, REASON_MISSED_MESSAGES
from wsserver.config import redis_problem


def redis_server_missing() -> bool:
    return shutil.which("redis-server") is None


pytestmark = pytest.mark.skipif(
    redis_server_missing(), reason="redis-server is not installed (Sentinel test)"
)

MASTER = "wsmaster"
ROOM = "ha"
RATE = 20.0


class RedisGroup:
    """A master, a replica and three sentinels on loopback, each a process of this test."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.procs: dict[str, subprocess.Popen] = {}
        self.master_port, self.replica_port = free_port(), free_port()
        self.sentinel_ports = [free_port() for _ in range(3)]

    def start(self) -> RedisGroup:
        # no 5 s wait before the replica's first sync (the default diskless sync delay)
        self._run("master", ["--port", str(self.master_port), "--repl-diskless-sync-delay", "0"])
        self._run("replica", ["--port", str(self.replica_port),
                              "--replicaof", "127.0.0.1", str(self.master_port)])
        replica = self.client(self.replica_port)
        wait_for(lambda: replica.info("replication").get("master_link_status") == "up",
                 timeout=10, message="the replica's link to the master")
        # each sentinel's id given, and the others and the replica named up front, as a
        # sentinel's own rewritten config does: no 2 s rounds of discovery before a failover
        ids = [uuid.uuid4().hex + uuid.uuid4().hex[:8] for _ in self.sentinel_ports]
        for i, port in enumerate(self.sentinel_ports):
            conf = self.base / f"sentinel{i}.conf"
            others = "".join(f"sentinel known-sentinel {MASTER} 127.0.0.1 {p} {ids[j]}\n"
                             for j, p in enumerate(self.sentinel_ports) if j != i)
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\nprotected-mode no\ndir {self.base}\n"
                f"sentinel myid {ids[i]}\n"
                f"sentinel monitor {MASTER} 127.0.0.1 {self.master_port} 2\n"
                f"sentinel down-after-milliseconds {MASTER} 500\n"
                f"sentinel failover-timeout {MASTER} 2000\n"
                f"sentinel parallel-syncs {MASTER} 1\n"
                f"sentinel known-replica {MASTER} 127.0.0.1 {self.replica_port}\n" + others
            )
            self._run(f"sentinel{i}", [str(conf), "--sentinel"], config=False)
        # a failover needs each sentinel to know the replica and the two others (hello
        # messages every 2 s): wait for that before anything else
        for port in self.sentinel_ports:
            sentinel = self.client(port)
            wait_for(lambda s=sentinel: _knows_all(s), timeout=15,
                     message=f"sentinel {port} to see the replica and 2 other sentinels")
        return self

    def _run(self, name: str, args: list[str], config: bool = True) -> None:
        persistence = ["--save", "", "--appendonly", "no", "--bind", "127.0.0.1",
                       "--dir", str(self.base)] if config else []
        with open(self.base / f"{name}.log", "wb") as log:
            self.procs[name] = subprocess.Popen(["redis-server", *args, *persistence],
                                                stdout=log, stderr=subprocess.STDOUT)
        if config:
            client = self.client(int(args[1]))
            wait_for(lambda: _pings(client), timeout=10, message=f"{name} to answer")

    @staticmethod
    def client(port: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=2,
                           socket_connect_timeout=2)

    def sentinels(self) -> str:
        return ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)

    def kill(self, name: str) -> None:
        """SIGKILL one of ours, by its PID: no shutdown, no last replication."""
        proc = self.procs[name]
        proc.kill()
        proc.wait(5)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


def _knows_all(sentinel: redis.Redis) -> bool:
    try:
        state = sentinel.sentinel_master(MASTER)
    except redis.RedisError:
        return False
    return int(state["num-slaves"]) == 1 and int(state["num-other-sentinels"]) == 2


@pytest.fixture
def group(tmp_path: Path) -> Iterator[RedisGroup]:
    started = RedisGroup(tmp_path)
    try:
        try:
            started.start()
        except AssertionError as exc:  # say which process did what
            logs = "".join(f"\n--- {p.name}\n" + p.read_text(errors="replace")[-1500:]
                           for p in sorted(tmp_path.glob("*.log")))
            raise AssertionError(f"{exc}{logs}") from None
        yield started
    finally:
        started.stop()


class Record:
    """What the publisher saw: per call, the id answered 200 and when; every HTTP answer's
    status and when (the Publisher's own retries included, read by a response hook)."""

    def __init__(self) -> None:
        self.accepted: list[tuple[float, str]] = []  # (answered at, id)
        self.answers: list[tuple[float, int]] = []  # (at, HTTP status), retries included
        self.failures: list[str] = []


def publish_until(publisher: Publisher, record: Record, stop: threading.Event) -> None:
    """``RATE`` calls a second; after a call that took long (retrying through the failover)
    the pace goes on from now, without a burst to make up for it."""
    seq, next_at = 0, time.monotonic()
    while not stop.is_set():
        try:
            answer = publisher.publish("tick", message=str(seq), room=ROOM)
            record.accepted.append((time.monotonic(), str(answer["id"])))
        except (WsserverError, OSError) as exc:  # gave up: it promised nothing, but say so
            record.failures.append(f"seq {seq}: {exc!r}")
        seq += 1
        next_at = max(next_at + 1 / RATE, time.monotonic())
        stop.wait(next_at - time.monotonic())


def worker_clients(admin: redis.Redis, prefix: str) -> list[int]:
    """Each live worker's client count, from the reports the workers write to Redis."""
    keys = admin.keys(f"{prefix}:worker:*")
    return [int(admin.hget(k, "clients") or 0) for k in keys]


def listeners(admin: redis.Redis, prefix: str) -> int:
    """The workers' listener connections (named ``<prefix>:listener:<worker>``) on ``admin``."""
    try:
        return sum(1 for c in admin.client_list() if c["name"].startswith(f"{prefix}:listener:"))
    except redis.RedisError:
        return 0


@pytest.mark.parametrize("fault", ["kill", "pause"])
def test_workers_follow_a_sentinel_failover_and_lose_nothing_redis_kept(group, tmp_path, fault):
    """The master SIGKILLed, or paused (SIGSTOP: its sockets stay open, so a subscription to
    it would wait, deaf, while publishing moves to the promoted replica; the listener asks the
    sentinels which server is the master and moves)."""
    sentinels = tuple(group.sentinels().split(","))
    assert redis_problem("", sentinels=sentinels, master=MASTER) is None  # check-config's
    unknown = redis_problem("", sentinels=sentinels, master="other")
    assert unknown is not None and "'other'" in unknown and "is unknown" in unknown
    prefix = f"wstest-{uuid.uuid4().hex[:12]}"
    env = {"WSSERVER_REDIS_SENTINELS": group.sentinels(),
           "WSSERVER_REDIS_SENTINEL_MASTER": MASTER,
           "WSSERVER_REDIS_PREFIX": prefix,
           "WSSERVER_HISTORY_SIZE": "1000"}
    server = GunicornServer(env=env, args=["-w", "2"]).start()
    received: list[list[str]] = []
    subscribers: list[Subscriber] = []
    record, stop = Record(), threading.Event()
    publisher = Publisher(server.url, retries=40, max_retry_wait=0.25, backoff_max=0.25)
    # a new connection per POST: the kernel hands them to both workers, so both workers'
    # publish clients go through the failover (a kept-alive one would stay with one worker)
    publisher._session.headers["Connection"] = "close"
    publisher._session.hooks["response"].append(
        lambda resp, *a, **k: record.answers.append((time.monotonic(), resp.status_code)))
    poster = threading.Thread(target=publish_until, args=(publisher, record, stop), daemon=True)
    master = group.client(group.master_port)
    try:
        assert f"sentinel master {MASTER}/0 via {group.sentinels()}" in server.log()
        # clients in bursts of 4 (connecting at once, so that one worker cannot accept them
        # all) until each of the two workers has some
        while len(subscribers) < 4 or min(worker_clients(master, prefix) or [0]) == 0:
            assert len(subscribers) < 16, "the kernel gave every client to one worker"
            burst = []
            for _ in range(4):
                got: list[str] = []
                burst.append(Subscriber(server.ws_url, rooms=[ROOM], backoff_initial=0.05,
                                        backoff_max=0.5,
                                        on_message=lambda n, got=got: got.append(str(n["id"]))))
                received.append(got)
            subscribers += burst
            for sub in burst:
                sub.start()
            assert all(sub.wait_ready(10) for sub in burst)
            count = len(subscribers)
            wait_for(lambda n=count: sum(worker_clients(master, prefix)) == n
                     and len(worker_clients(master, prefix)) == 2, timeout=5,
                     message="the workers' reports to count the clients")
        spread = worker_clients(master, prefix)
        poster.start()
        wait_for(lambda: len(record.accepted) >= 30, timeout=10, message="30 published")
        killed_at = time.monotonic()
        if fault == "kill":
            group.kill("master")
        else:
            os.kill(group.procs["master"].pid, signal.SIGSTOP)  # SIGKILLed by group.stop()
        wait_for(lambda: any(t > killed_at and s == 200 for t, s in record.answers),
                 timeout=15, message="a 200 after the kill")
        back_at = min(t for t, s in record.answers if t > killed_at and s == 200)
        promoted = group.client(group.replica_port)
        wait_for(lambda: listeners(promoted, prefix) == 2, timeout=10,
                 message="both workers' listeners on the promoted replica")
        wait_for(lambda: len([1 for t, _ in record.accepted if t > back_at]) >= 30, timeout=10,
                 message="30 published after the failover")
        stop.set()
        poster.join(15)
        assert promoted.info("replication")["role"] == "master"
        kept = {_text(i) for i, _ in promoted.xrange(f"{prefix}:h:r:{ROOM}")}
        accepted = [mid for _, mid in record.accepted]
        lost_by_redis = [(t, mid) for t, mid in record.accepted if mid not in kept]
        expected = [mid for mid in accepted if mid in kept]
        wait_for(lambda: all(set(expected) <= set(got) for got in received), timeout=10,
                 message="every client to have every message Redis kept")
    finally:
        stop.set()
        for sub in subscribers:
            sub.stop()
        publisher.close()
        server.stop(graceful=False)
    refused = [t for t, s in record.answers if s == 503]
    print(f"\nsentinel failover: 200 again {back_at - killed_at:.2f} s after the kill; "
          f"{len(refused)} answers 503; {len(accepted)} accepted; "
          f"{len(lost_by_redis)} lost by Redis; lost at clients: 0; gaps closed: "
          f"{sum(len(s.gaps) for s in subscribers)}; clients per worker {spread}")
    assert not record.failures, record.failures
    assert refused and all(t > killed_at for t in refused), "503s exactly while no master"
    assert back_at - killed_at < 10
    assert all(t < killed_at for t, _ in lost_by_redis) and len(lost_by_redis) <= 2, lost_by_redis
    for got in received:
        mine = [mid for mid in got if mid in set(expected)]
        assert mine == expected, "each client: every kept message once, in publish order"


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def test_writes_the_replica_never_got_are_told_to_clients_not_silently_lost(group):
    """The limit, made to happen: the replica's link is cut (a wrong ``masterauth`` keeps it
    from coming back) and 3 notifications are answered 200 by the master alone; then the
    master is SIGKILLed and the replica, which never got them, promoted. Those 3 are lost by
    Redis. The clients got them live; the worker's catch-up finds its last delivered entry
    missing on the new master and closes them with 1011 "missed messages; resume"; each
    resume from a lost id answers ``recovered: false`` (the client's gap); what is published
    afterwards reaches them."""
    prefix = f"wstest-{uuid.uuid4().hex[:12]}"
    env = {"WSSERVER_REDIS_SENTINELS": group.sentinels(),
           "WSSERVER_REDIS_SENTINEL_MASTER": MASTER, "WSSERVER_REDIS_PREFIX": prefix}
    server = GunicornServer(env=env, args=["-w", "1"]).start()
    received: list[list[str]] = [[], []]
    subscribers = [Subscriber(server.ws_url, rooms=[ROOM], backoff_initial=0.05, backoff_max=0.5,
                              on_message=lambda n, got=got: got.append(str(n["id"])))
                   for got in received]
    publisher = Publisher(server.url, retries=40, max_retry_wait=0.25, backoff_max=0.25)
    master, replica = group.client(group.master_port), group.client(group.replica_port)
    try:
        for sub in subscribers:
            assert sub.start().wait_ready(10)
        kept = [publisher.publish("tick", message=str(i), room=ROOM)["id"] for i in range(5)]
        wait_for(lambda: master.info("replication")["master_repl_offset"]
                 == replica.info("replication")["master_repl_offset"], timeout=5,
                 message="the replica to have the first 5")
        replica.config_set("masterauth", "not-the-password")  # it cannot come back
        master.client_kill_filter(_type="slave")  # "replica" is refused by redis-py < 6
        wait_for(lambda: master.info("replication")["connected_slaves"] == 0, timeout=5,
                 message="the replica's link cut")
        lost = [publisher.publish("tick", message=f"lost {i}", room=ROOM)["id"] for i in range(3)]
        wait_for(lambda: all(got[-3:] == lost for got in received), timeout=5,
                 message="the clients to get the 3 live")
        group.kill("master")
        wait_for(lambda: all(len(s.gaps) == 1 and s.state == "ready" for s in subscribers),
                 timeout=15, message="every client closed, resumed, and told of its gap")
        closes = {s.last_close for s in subscribers}
        after = [publisher.publish("tick", message=f"after {i}", room=ROOM)["id"]
                 for i in range(5)]
        wait_for(lambda: all(got[-5:] == after for got in received), timeout=5,
                 message="the clients to get what was published after the failover")
        history = {_text(i) for i, _ in replica.xrange(f"{prefix}:h:r:{ROOM}")}
    finally:
        for sub in subscribers:
            sub.stop()
        publisher.close()
        server.stop(graceful=False)
    assert set(kept) <= history and not set(lost) & history, "Redis lost exactly the 3"
    for sub, got in zip(subscribers, received):
        assert got == kept + lost + after, "each once, in order; nothing after lost"
        (room, info), = sub.gaps
        assert room == ROOM and info["recovered"] is False and info["since"] == lost[-1]
    assert closes == {(CLOSE_INTERNAL_ERROR, REASON_MISSED_MESSAGES)}
    assert "no longer reaches back" in server.log() and "closing 2 client(s)" in server.log()
