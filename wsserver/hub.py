"""The hub: the registry of connected clients, and nothing else.

A dict guarded by a ``threading.RLock``, as the design card asks. Readers never iterate the
dict itself: they take a snapshot (a list copied under the lock) and do their socket I/O
after releasing it, so no write, however slow, is ever done while holding the lock.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .connection import Connection

__all__ = ["Hub"]


class Hub:
    """Connected clients by id.

    Thread-safety: every method takes ``_lock`` (re-entrant, so a caller holding it for a
    compound read may call back in). No method does I/O.
    """

    def __init__(self, capacity: int) -> None:
        self._lock = threading.RLock()
        self._clients: dict[int, Connection] = {}
        self._capacity = capacity
        self._accepting = True
        self._next_id = 0
        self._snapshot: list[Connection] | None = None

    def next_id(self) -> int:
        with self._lock:
            self._next_id += 1
            return self._next_id

    def add(self, conn: Connection) -> bool:
        """Register ``conn``; False when full or shutting down (the caller refuses it)."""
        with self._lock:
            if not self._accepting or len(self._clients) >= self._capacity:
                return False
            self._clients[conn.id] = conn
            self._snapshot = None
            return True

    def remove(self, conn: Connection) -> bool:
        """Forget ``conn``; True if it was registered. Idempotent."""
        with self._lock:
            if self._clients.pop(conn.id, None) is None:
                return False
            self._snapshot = None
            return True

    def snapshot(self) -> list[Connection]:
        """The connected clients now, as a list the caller may use without the lock.

        Cached until the next add/remove: a fan-out of many messages to a stable audience
        copies the dict once, not once per message. Callers must not mutate the list.
        """
        with self._lock:
            snap = self._snapshot
            if snap is None:
                snap = self._snapshot = list(self._clients.values())
            return snap

    def count(self) -> int:
        with self._lock:
            return len(self._clients)

    def has_room(self) -> bool:
        """Whether another client would be accepted now (checked before the upgrade)."""
        with self._lock:
            return self._accepting and len(self._clients) < self._capacity

    @property
    def capacity(self) -> int:
        return self._capacity

    def set_capacity(self, capacity: int) -> None:
        with self._lock:
            self._capacity = max(capacity, 0)

    def stop_accepting(self) -> list[Connection]:
        """Refuse new clients from now on; returns who is connected (for shutdown)."""
        with self._lock:
            self._accepting = False
            return list(self._clients.values())

    @property
    def accepting(self) -> bool:
        with self._lock:
            return self._accepting
