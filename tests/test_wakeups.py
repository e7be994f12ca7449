"""Mass wake-ups of connection threads (wsserver.session._Wakeups): while very many are awake
at once, e.g. thousands of peers leaving together, the GIL switch interval is raised so that
the threads waiting for the GIL do not wake every 5 ms each (see the class docstring for the
measurements); it is restored when the storm is over."""

from __future__ import annotations

import sys

import pytest
import rawws
from support import GunicornServer, wait_for

from wsserver.session import _Wakeups


@pytest.fixture
def restore_interval():
    before = sys.getswitchinterval()
    yield before
    sys.setswitchinterval(before)


def test_interval_raised_at_high_and_restored_at_low(restore_interval):
    wakeups = _Wakeups()
    wakeups.HOLD = 0.0
    for _ in range(wakeups.HIGH - 1):
        wakeups.enter()
    assert not wakeups.raised and sys.getswitchinterval() == restore_interval
    wakeups.enter()
    assert wakeups.raised and sys.getswitchinterval() == wakeups.STORM_INTERVAL
    for _ in range(wakeups.HIGH - wakeups.LOW - 1):
        wakeups.leave()
    assert wakeups.raised, "still above LOW"
    wakeups.leave()
    assert not wakeups.raised and sys.getswitchinterval() == restore_interval


def test_raised_interval_lasts_at_least_hold(restore_interval):
    wakeups = _Wakeups()
    wakeups.HOLD = 3600.0
    for _ in range(wakeups.HIGH):
        wakeups.enter()
    for _ in range(wakeups.HIGH):
        wakeups.leave()
    assert wakeups.raised, "a storm's tail (threads still on their way out) keeps it raised"
    wakeups.HOLD = 0.0
    wakeups.enter()
    wakeups.leave()
    assert not wakeups.raised and sys.getswitchinterval() == restore_interval


def test_mass_disconnect_every_thread_ends_and_http_answers():
    """300 clients leave within a moment: every connection ends and ``GET /`` keeps
    answering meanwhile. (Whether 32 threads are awake at once here depends on timing, so the
    interval change itself is checked above; the benchmark's idle scenario at 10,000 clients
    shows its effect: ``server_disconnect_s``.)"""
    with GunicornServer(env={"WSSERVER_THREADS": "400"}) as server:
        socks = [rawws.open_ws(server.port)[0] for _ in range(300)]
        wait_for(lambda: server.health()["clients"] == 300, timeout=30, message="all registered")
        for sock in socks:
            rawws.reset(sock)  # a TCP reset each: the peers are gone at once
        # health() has a 5 s timeout: a worker stalled by the storm fails this
        wait_for(lambda: server.health()["clients"] == 0, timeout=30, message="all gone")

