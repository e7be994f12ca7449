"""wsserver.audit: every refusal and server-initiated close is counted by reason and logged
once, and a flood of them cannot flood the log."""

from __future__ import annotations

import logging

from wsserver import audit, metrics


def _count(counter, reason: str) -> float:
    return counter.labels(reason)._value.get()


def test_refusals_and_closes_are_counted_by_reason(caplog):
    before_r = _count(metrics.REFUSALS, "test_refusal")
    before_c = _count(metrics.SERVER_CLOSES, "test_close")
    with caplog.at_level(logging.INFO, logger="wsserver.audit"):
        audit.refused("test_refusal", "192.0.2.7", "WSSERVER_SOME_LIMIT")
        audit.closed("test_close", "192.0.2.8")
    assert _count(metrics.REFUSALS, "test_refusal") == before_r + 1
    assert _count(metrics.SERVER_CLOSES, "test_close") == before_c + 1
    lines = [r.getMessage() for r in caplog.records if r.name == "wsserver.audit"]
    assert any("192.0.2.7" in m and "test_refusal" in m and "WSSERVER_SOME_LIMIT" in m for m in lines)
    assert any("192.0.2.8" in m and "test_close" in m for m in lines)


def test_a_flood_is_logged_at_a_bounded_rate_and_says_what_it_held_back():
    limiter = audit.LogLimiter(rate=1.0, burst=5)
    passed = [limiter.take() for _ in range(1000)]
    assert sum(p is not None for p in passed) <= 6  # the burst, and at most one refill
    assert passed[:5] == [0, 0, 0, 0, 0]
    limiter._at -= 2.0  # two seconds later: tokens again
    assert limiter.take() >= 990  # the next line says how many were suppressed
    assert limiter.take() == 0
