"""End to end: a worker whose Redis subscription drops loses nothing (issue 14).

Two servers (one worker each) share a Redis prefix; 12 clients, half on each, in the rooms and
room-less audiences of tests/e2e/test_cluster.py. While notifications are posted at 20/s to
both, one worker's listener connection is killed 10 times (``CLIENT KILL ID``, found by the
listener's client name ``<prefix>:listener:<worker>``: never another process's connection).
Every notification answered 200 must reach every client of its audiences once, in order.
"""

from __future__ import annotations

import random
import threading
import time

import pytest
import redis
import requests
from support import wait_for

from .test_cluster import (
    CLIENT_ROOMS,
    REDIS_URL,
    TARGETS,
    Accepted,
    check_received,
    notification,
    open_client,
    redis_env,
    servers,  # noqa: F401 - a fixture
)


@pytest.fixture
def prefix(redis_prefix):
    """A Redis key prefix of this test's own; its keys are deleted afterwards."""
    return redis_prefix


def listener_ids(admin: redis.Redis, name: str) -> list[int]:
    return [c["id"] for c in admin.client_list() if c["name"] == name]


def post_at(rate: float, seconds: float, posters: list, accepted: Accepted,
            refused: list[int], failures: list[str]) -> None:
    """Post ``rate`` notifications a second for ``seconds``, alternating ``posters``. A 503
    (the answering worker is resubscribing) promised nothing and is counted, not recorded."""
    rng = random.Random(14)
    start = time.monotonic()
    seq = 0
    while time.monotonic() - start < seconds:
        targets = rng.choice(TARGETS)
        answer = posters[seq % len(posters)](notification(seq, targets))
        if answer.status_code == 200:
            accepted.add(seq, targets, answer.json())
        elif answer.status_code == 503:
            refused.append(seq)
        else:
            failures.append(f"seq {seq}: {answer.status_code} {answer.text}")
        seq += 1
        time.sleep(max(0.0, start + seq / rate - time.monotonic()))


def test_a_dropped_subscription_loses_nothing(prefix, servers):  # noqa: F811
    first = servers(redis_env(prefix), args=["-w", "1"])
    second = servers(redis_env(prefix), args=["-w", "1"])
    clients = [open_client(first if i % 2 == 0 else second, CLIENT_ROOMS[i % len(CLIENT_ROOMS)],
                           f"client{i}", by_command=True) for i in range(12)]
    admin = redis.Redis.from_url(REDIS_URL, socket_timeout=5)
    sessions = [requests.Session(), requests.Session()]
    posters = [lambda body, s=sessions[0]: s.post(first.url + "/notify", json=body, timeout=10),
               lambda body, s=sessions[1]: s.post(second.url + "/notify", json=body, timeout=10)]
    try:
        for srv in (first, second):
            wait_for(lambda s=srv: s.health()["worker"]["clients"] == 6, message="clients")
        names = sorted({c["name"] for c in admin.client_list()
                        if c["name"].startswith(f"{prefix}:listener:")})
        assert len(names) == 2, names
        victim = names[0]
        accepted, refused, failures = Accepted(), [], []
        poster = threading.Thread(target=post_at,
                                  args=(20, 6.0, posters, accepted, refused, failures))
        poster.start()
        kills = 0
        for _ in range(10):
            wait_for(lambda: listener_ids(admin, victim), message="the listener back")
            time.sleep(0.45)  # let messages flow live between drops (20/s: ~9 of them)
            kills += wait_for(lambda: sum(admin.client_kill_filter(_id=i)
                                          for i in listener_ids(admin, victim)),
                              message="the listener killed")
        poster.join(30)
        assert not poster.is_alive() and not failures, failures[:5]
        assert kills >= 10
        wait_for(lambda: listener_ids(admin, victim), message="the listener back")
        end = wait_for(lambda: posters[0]({"event": "end"}).status_code == 200,
                       message="the end marker accepted")
        assert end
        for client in clients:
            check_received(client, client.notifications_until("end"), accepted)
        logs = first.log_path.read_text() + second.log_path.read_text()
        replayed = logs.count("replayed")
        total = sum(len(v) for v in accepted.by_audience.values())
        print(f"{total} accepted, {len(refused)} answered 503, {kills} drops, "
              f"{replayed} catch-ups replayed messages")
        assert replayed >= 1, "some drops fell between messages: the catch-up must have run"
        assert "missed messages; resume" not in logs and "closing" not in logs
    finally:
        for client in clients:
            client.close()
        admin.close()
