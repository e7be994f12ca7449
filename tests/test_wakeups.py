"""Mass wake-ups of connection threads (wsserver.session._Wakeups): while very many are awake
at once, e.g. thousands of peers leaving together, the GIL switch interval is raised so that
the threads waiting for the GIL do not wake every 5 ms each (see the class docstring for the
measurements); it is restored when the storm is over. In-process; 300 real clients leaving at
once: ``e2e/test_wakeups.py``."""

from __future__ import annotations

import sys

import pytest

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
