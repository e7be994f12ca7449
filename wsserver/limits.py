"""The bookkeeping behind the per-client limits: a token bucket for rates, and counted slots
for work in flight.

Why one module: the session limits a connection's messages, control frames and commands
per second, and the service limits history replays in flight; written inline each time, the
same few lines of refill arithmetic drifted (bursts measured in different units, clocks read
twice). These two small objects are the one definition, with deterministic tests
(``now`` can be passed in).
"""

from __future__ import annotations

import threading
import time

__all__ = ["Slots", "TokenBucket"]


class TokenBucket:
    """``rate`` events a second on average, ``burst`` at once: it starts full, each event
    takes one token, tokens come back at ``rate`` a second up to ``burst``.

    A ``rate`` of 0 means no limit (every :meth:`take` succeeds): the settings use 0 for
    "off".

    Thread-safety: none; a bucket belongs to one thread (a connection's own thread counts
    that connection's frames), so it costs no lock on the hot path.
    """

    __slots__ = ("rate", "burst", "_tokens", "_at")

    def __init__(self, rate: float, burst: float, now: float | None = None) -> None:
        self.rate = rate
        self.burst = float(max(burst, 1.0))
        self._tokens = self.burst
        self._at = time.monotonic() if now is None else now

    def take(self, now: float | None = None, cost: float = 1.0) -> bool:
        """Take ``cost`` tokens (one event, weighted): False (and nothing taken) when the
        bucket holds fewer."""
        if not self.rate:
            return True
        if now is None:
            now = time.monotonic()
        tokens = self._tokens + (now - self._at) * self.rate
        self._at = now
        if tokens > self.burst:
            tokens = self.burst
        if tokens < cost:
            self._tokens = tokens
            return False
        self._tokens = tokens - cost
        return True


class Slots:
    """At most ``limit`` pieces of work in flight overall, and one per owner (a connection).

    Why both: one client looping a costly command must not keep more than one of them
    queued, and all clients together must not fill a queue others need (the broadcaster's:
    resumes share it with publishers). A caller waits, bounded, for a slot; a second
    request from the same owner waits for its first to finish, which also slows a client
    that sends faster than its work is done (its thread is not reading meanwhile).

    Thread-safety: every method may be called from any thread; ``_cond`` guards ``_owners``.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._cond = threading.Condition(threading.Lock())
        self._owners: set[int] = set()

    def acquire(self, owner: int, timeout: float) -> str | None:
        """Take a slot for ``owner``, waiting at most ``timeout`` seconds. None when taken;
        otherwise which limit stood in the way: ``"owner"`` (its previous one is still in
        flight) or ``"total"`` (``limit`` are in flight)."""
        with self._cond:
            if not self._cond.wait_for(
                lambda: owner not in self._owners and len(self._owners) < self.limit, timeout
            ):
                return "owner" if owner in self._owners else "total"
            self._owners.add(owner)
            return None

    def release(self, owner: int) -> None:
        """Give ``owner``'s slot back (idempotent)."""
        with self._cond:
            if owner in self._owners:
                self._owners.discard(owner)
                # waiters wait for different things (their own slot, any slot): wake them all
                self._cond.notify_all()

    @property
    def in_flight(self) -> int:
        with self._cond:
            return len(self._owners)
