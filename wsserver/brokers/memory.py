"""The embedded broker: one process, nothing to install.

Ids are ``<boot>-<n>``: ``n`` counts up by one per audience (a jump shows a gap) and ``boot``
is the broker's start time in milliseconds, so an id from before a restart is never mistaken
for one of this run (and ids still increase across restarts). History is a ring buffer per
audience (the last
``WSSERVER_HISTORY_SIZE`` messages, each kept ``WSSERVER_HISTORY_TTL`` seconds). Publishing
numbers the message, hands it to this worker's broadcaster and records it, all under one lock,
so ids reach clients in order and a recovery (which reads history under the same lock) sees
every message that is already queued.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import TYPE_CHECKING

from ..broadcaster import Broadcast
from . import Broker, Outgoing, Recovery, audience_key, envelope_frame, order_of

if TYPE_CHECKING:
    from ..broadcaster import Broadcaster
    from ..config import Settings
    from ..hub import Hub

__all__ = ["MemoryBroker"]


class MemoryBroker(Broker):
    """Thread-safety: ``_lock`` guards ``_seq`` and ``_history``."""

    kind = "memory"

    def __init__(self, settings: Settings) -> None:
        self._size = settings.history_size
        self._ttl = settings.history_ttl
        self._lock = threading.Lock()
        self._seq: dict[str, int] = {}
        self._history: dict[str, deque[tuple[int, bytes, float]]] = {}
        self._broadcaster: Broadcaster | None = None
        self._boot = int(time.time() * 1000)

    def start(self, broadcaster: Broadcaster, hub: Hub) -> None:
        self._broadcaster = broadcaster

    def stop(self) -> None:
        pass

    @property
    def ready(self) -> bool:
        return True

    @property
    def alive(self) -> bool:
        return True

    def publish(self, messages: tuple[Outgoing, ...], timeout: float) -> list[str] | None:
        assert self._broadcaster is not None
        deadline = time.monotonic() + timeout
        # other publishers hold the lock briefly, or for at most their own `timeout` while the
        # queue is full: waiting a little longer than ours never turns contention into a 503
        if not self._lock.acquire(timeout=timeout + 0.25):
            return None
        try:
            now = time.monotonic()
            keys = [audience_key(m.room, m.user) for m in messages]
            numbers = [self._seq.get(k, 0) + 1 for k in keys]
            frames = [envelope_frame(m.prefix, self._id(n)) for m, n in zip(messages, numbers)]
            items = tuple(
                Broadcast(frame, now, m.room, m.user, (self._boot, n))
                for m, n, frame in zip(messages, numbers, frames)
            )
            left = max(deadline - time.monotonic(), 0.0)
            if not self._broadcaster.submit(items[0] if len(items) == 1 else items, left):
                return None
            for key, n, frame in zip(keys, numbers, frames):
                self._seq[key] = n
                if self._size:
                    ring = self._history.get(key)
                    if ring is None:
                        ring = self._history[key] = deque(maxlen=self._size)
                    ring.append((n, frame, now))
            return [self._id(n) for n in numbers]
        finally:
            self._lock.release()

    def relay(self, frame: bytes, timeout: float) -> bool:
        assert self._broadcaster is not None
        return self._broadcaster.submit(Broadcast(frame, time.monotonic()), timeout)

    def _id(self, n: int) -> str:
        return f"{self._boot}-{n}"

    def history(self, room: str, since: str) -> Recovery:
        order = order_of(since)
        if order is None or len(order) != 2 or order[0] != self._boot:
            return Recovery(False)  # not an id of this run (an earlier run's, or made up)
        wanted = order[1]
        key = audience_key(room, None)
        with self._lock:
            last = self._seq.get(key, 0)
            if wanted == last:
                return Recovery(True)  # nothing was published since
            if wanted > last:
                return Recovery(False)  # an id from before a restart, or made up
            ring = self._history.get(key)
            if not ring:
                return Recovery(False)
            horizon = time.monotonic() - self._ttl
            kept = [(n, frame) for n, frame, at in ring if at >= horizon]
            if not kept or kept[0][0] > wanted + 1:
                return Recovery(False)  # the message after `since` is gone already
            return Recovery(True, [((self._boot, n), frame) for n, frame in kept if n > wanted])
