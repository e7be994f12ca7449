"""What the server refused and whom it cut off: one counter per reason in ``/metrics`` and one
INFO line per event with the client's address, rate-limited so a flood cannot flood the log.

Why one module: refusals happen in the worker's accept path (before any request reaches
Flask), in the ``/ws`` upgrade checks, in ``POST /notify`` and in the session loop. An
operator asking "why was this client refused?" or "is somebody attacking us?" needs one
place to look in each of the log and the metrics, with the same reason names in both.

Reasons are short ``snake_case`` names (the JSON ``code`` of the refusal where there is one,
e.g. ``origin_forbidden``, ``too_many_connections``; a close's cause otherwise, e.g.
``slow_consumer``, ``rate_limit``): they become the ``reason`` label, so they must come from
a fixed set, never from client input.

Thread-safety: :func:`refused` and :func:`closed` may be called from any thread; the rate
limiter holds ``_lock`` for a few arithmetic operations only, never while logging.
"""

from __future__ import annotations

import logging
import threading
import time

from . import metrics

__all__ = ["LogLimiter", "closed", "closed_all", "refused"]

log = logging.getLogger("wsserver.audit")


class LogLimiter:
    """A token bucket for log lines: ``rate`` lines a second, bursts of ``burst``.

    What it holds back is counted, and the next line that passes says how many were
    suppressed, so the log still shows that a flood happened and how large it was."""

    def __init__(self, rate: float = 10.0, burst: int = 50) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._tokens = float(burst)
        self._at = time.monotonic()
        self._suppressed = 0
        self._lock = threading.Lock()

    def take(self) -> int | None:
        """None: drop this line. Otherwise log it, with the number of lines suppressed
        since the last one that passed (0 for none)."""
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self._burst, self._tokens + (now - self._at) * self._rate)
            self._at = now
            if self._tokens < 1.0:
                self._suppressed += 1
                return None
            self._tokens -= 1.0
            suppressed, self._suppressed = self._suppressed, 0
            return suppressed


_LIMITER = LogLimiter()


def refused(reason: str, remote: str, detail: str = "") -> None:
    """A request or connection was refused (an HTTP 4xx/503 before the upgrade, or a socket
    the worker cut before it became a request): count it and say so once."""
    metrics.REFUSALS.labels(reason).inc()
    _log("refused", reason, remote, detail)


def closed(reason: str, remote: str, detail: str = "") -> None:
    """The server closed an open WebSocket on its own initiative (a limit, a slow consumer,
    a missed keepalive, an expired token): count it and say so once."""
    metrics.SERVER_CLOSES.labels(reason).inc()
    _log("closed", reason, remote, detail)


def closed_all(reason: str, count: int, detail: str = "") -> None:
    """The server closed ``count`` WebSockets at once for one reason (shutdown's 1001): count
    them all and say so in one line, not one per client."""
    if count <= 0:
        return
    metrics.SERVER_CLOSES.labels(reason).inc(count)
    log.info("closed %d clients: %s%s", count, reason, f" ({detail})" if detail else "")


def _log(what: str, reason: str, remote: str, detail: str) -> None:
    if not log.isEnabledFor(logging.INFO):
        return
    suppressed = _LIMITER.take()
    if suppressed is None:
        return
    more = f" ({suppressed} more refusals/closes not logged)" if suppressed else ""
    log.info("%s %s: %s%s%s", what, remote, reason, f" ({detail})" if detail else "", more)
