"""wsserver.limits: the token bucket (deterministic: ``now`` is passed in) and the slots for
work in flight (real threads)."""

from __future__ import annotations

import threading

import pytest

from wsserver.limits import Slots, TokenBucket

pytestmark = pytest.mark.timeout(30)


def test_token_bucket_allows_the_burst_then_the_rate():
    bucket = TokenBucket(rate=4, burst=5, now=100.0)
    assert [bucket.take(100.0) for _ in range(6)] == [True] * 5 + [False]
    assert bucket.take(100.125) is False  # half a token back
    assert bucket.take(100.25) is True  # one token back after 1/rate seconds
    assert bucket.take(100.25) is False
    assert sum(bucket.take(1000.0) for _ in range(10)) == 5, "refills up to the burst only"
    unlimited = TokenBucket(rate=0, burst=1)
    assert all(unlimited.take() for _ in range(10_000))


def test_slots_one_per_owner_and_a_total():
    slots = Slots(limit=2)
    assert slots.acquire(1, timeout=0) is None
    assert slots.acquire(1, timeout=0.01) == "owner", "one in flight per owner"
    assert slots.acquire(2, timeout=0) is None
    assert slots.acquire(3, timeout=0.01) == "total"
    got: list = []
    waiter = threading.Thread(target=lambda: got.append(slots.acquire(3, timeout=5)))
    waiter.start()
    slots.release(1)
    waiter.join(5)
    assert got == [None] and slots.in_flight == 2
    slots.release(1)  # idempotent
    assert slots.in_flight == 2


def test_token_bucket_weighs_a_costly_event_and_takes_nothing_when_refused():
    bucket = TokenBucket(rate=1, burst=6, now=0.0)
    assert bucket.take(0.0, cost=5) is True
    assert bucket.take(0.0, cost=5) is False, "one token left"
    assert bucket.take(0.0) is True, "the refused take took nothing"
    assert bucket.take(0.0) is False


def test_slots_wait_is_bounded():
    slots = Slots(limit=1)
    assert slots.acquire(1, timeout=0) is None
    got: list = []
    waiter = threading.Thread(target=lambda: got.append(slots.acquire(2, timeout=0.1)))
    waiter.start()
    waiter.join(5)
    assert not waiter.is_alive() and got == ["total"]
    assert slots.in_flight == 1
