"""The hub: the registry of connected clients and of their rooms, and nothing else.

A dict guarded by a ``threading.RLock``, as the design card asks, plus a dict per room.
Readers never iterate the dicts themselves: they take a snapshot (a list copied under the
lock, cached until membership changes) and do their socket I/O after releasing it, so no
write, however slow, is ever done while holding the lock. All counts are read under the
lock, so they are exact at the moment they are read.

The hub keeps its bounds (connections per worker, per address, rooms per connection)
because they must be checked and taken in one locked step: two clients racing for the last
slot must not both get it. Which bound was hit is reported as a value (:class:`HubRefusal`,
:class:`RoomLimitReached`); what to answer, and which checks run before the upgrade, is
:mod:`wsserver.admission`'s business.
"""

from __future__ import annotations

import threading
from collections import deque
from contextlib import contextmanager
from enum import Enum
from typing import TYPE_CHECKING, Callable, Iterator

from .brokers import Census
from .exceptions import RoomLimitReached  # defined with every other exception

if TYPE_CHECKING:
    from .connection import Connection

__all__ = ["Hub", "HubRefusal"]


class HubRefusal(Enum):
    """Why the hub will not register another connection. Checked in this order (the first
    that holds is the answer), the same before the upgrade and at registration."""

    ADDRESS = "address"  # the address holds its share (WSSERVER_MAX_CONNECTIONS_PER_IP)
    CLOSING = "closing"  # shutdown began: no new clients
    FULL = "full"  # the worker's connection budget is taken


class Hub:
    """Connected clients by id, and room members by room.

    Thread-safety: every method takes ``_lock`` (re-entrant, so a caller holding it for a
    compound read may call back in). No method does I/O. A connection's ``rooms`` set is
    only changed here, under the lock.
    """

    def __init__(
        self, capacity: int, max_rooms_per_connection: int = 100, max_per_address: int = 0
    ) -> None:
        self._lock = threading.RLock()
        self._departures: deque[Connection] = deque()
        self._clients: dict[int, Connection] = {}
        self._rooms: dict[str, dict[int, Connection]] = {}
        self._users: dict[str, dict[int, Connection]] = {}
        self._per_address: dict[str, int] = {}
        self._max_per_address = max_per_address
        self._capacity = capacity
        self._max_rooms = max_rooms_per_connection
        self._accepting = True
        self._next_id = 0
        self._version = 0  # changes whenever a count does (census reports skip the rest)
        self._snapshot: list[Connection] | None = None
        self._room_snapshots: dict[str, list[Connection]] = {}
        # presence rooms (names starting with _watched): told of every entry and exit, under
        # the lock, so no path (command, refresh, disconnect, slow consumer) is missed
        self._watched = ""
        self._watcher: Callable[[Connection, str, bool], None] | None = None

    def watch(self, prefix: str, watcher: Callable[[Connection, str, bool], None]) -> None:
        """Call ``watcher(conn, room, entered)`` whenever a connection enters or leaves a
        room named with ``prefix`` (an empty prefix: never). It runs under the hub's lock:
        it must only do bookkeeping (:meth:`wsserver.presence.Presence.changed`)."""
        with self._locked():
            self._watched, self._watcher = prefix, watcher

    def settle(self) -> None:
        """Apply pending departures now (a no-op without any): their leaving rooms is
        reported to the watcher at once rather than at the next locked operation."""
        if self._departures:
            with self._locked():
                pass

    def next_id(self) -> int:
        with self._locked():
            self._next_id += 1
            return self._next_id

    def add(self, conn: Connection) -> HubRefusal | None:
        """Register ``conn`` (and index it by user and address). None when added, else why
        not (the caller refuses it)."""
        with self._locked():
            refused = self._refusal_locked(conn.remote)
            if refused is not None:
                return refused
            self._clients[conn.id] = conn
            self._per_address[conn.remote] = self._per_address.get(conn.remote, 0) + 1
            if conn.user is not None:
                self._users.setdefault(conn.user, {})[conn.id] = conn
            self._snapshot = None
            self._version += 1
            return None

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold ``_lock`` with every pending departure applied."""
        with self._lock:
            departures = self._departures
            while departures:
                self._remove_locked(departures.popleft())
            yield

    def depart(self, conn: Connection) -> None:
        """Forget ``conn`` without taking the lock: for the connection's own thread on its
        way out. Why: when thousands of connections end at once (a network blip, a proxy
        restart), thousands of threads queueing on one lock hand it over one GIL switch at a
        time, and the worker stalled for seconds. ``deque.append`` needs no lock; the next
        locked operation applies every departure first, so counts and snapshots never
        include a departed connection."""
        self._departures.append(conn)

    def remove(self, conn: Connection) -> bool:
        """Forget ``conn`` and its subscriptions now; True if it was registered. Idempotent."""
        with self._locked():
            return self._remove_locked(conn)

    def _remove_locked(self, conn: Connection) -> bool:
        for room in list(conn.rooms):
            self._leave_locked(conn, room)
        if self._clients.pop(conn.id, None) is None:
            return False
        held = self._per_address.get(conn.remote, 1) - 1
        if held > 0:
            self._per_address[conn.remote] = held
        else:
            self._per_address.pop(conn.remote, None)
        if conn.user is not None:
            mine = self._users.get(conn.user)
            if mine is not None:
                mine.pop(conn.id, None)
                if not mine:
                    del self._users[conn.user]
        self._snapshot = None
        self._version += 1
        return True

    def refusal(self, address: str) -> HubRefusal | None:
        """Why a connection from ``address`` would be refused now (None: it would be taken).
        The same rule :meth:`add` applies; asked before the upgrade, so most refusals are an
        HTTP answer, and :meth:`add` only refuses the losers of a race."""
        with self._locked():
            return self._refusal_locked(address)

    def _refusal_locked(self, address: str) -> HubRefusal | None:
        if self._max_per_address and self._per_address.get(address, 0) >= self._max_per_address:
            return HubRefusal.ADDRESS
        if not self._accepting:
            return HubRefusal.CLOSING
        if len(self._clients) >= self._capacity:
            return HubRefusal.FULL
        return None

    def user_connections(self, user: str) -> list[Connection]:
        """The connections of ``user`` now (a fresh list)."""
        with self._locked():
            mine = self._users.get(user)
            return list(mine.values()) if mine else []

    def subscribe(self, conn: Connection, room: str) -> bool:
        """Add ``conn`` to ``room``; False if it was already in it. Raises
        :class:`RoomLimitReached`; ignored for a connection no longer registered."""
        with self._locked():
            if conn.id not in self._clients or room in conn.rooms:
                return False
            if len(conn.rooms) >= self._max_rooms:
                raise RoomLimitReached(room)
            conn.rooms.add(room)
            self._rooms.setdefault(room, {})[conn.id] = conn
            self._room_snapshots.pop(room, None)
            self._version += 1
            if self._watched and self._watcher is not None and room.startswith(self._watched):
                self._watcher(conn, room, True)
            return True

    def unsubscribe(self, conn: Connection, room: str) -> bool:
        """Take ``conn`` out of ``room``; False if it was not in it."""
        with self._locked():
            if room not in conn.rooms:
                return False
            self._leave_locked(conn, room)
            return True

    def _leave_locked(self, conn: Connection, room: str) -> None:
        conn.rooms.discard(room)
        members = self._rooms.get(room)
        if members is not None:
            members.pop(conn.id, None)
            if not members:
                del self._rooms[room]
        self._room_snapshots.pop(room, None)
        self._version += 1
        if self._watched and self._watcher is not None and room.startswith(self._watched):
            self._watcher(conn, room, False)

    def rooms_of(self, conn: Connection) -> list[str]:
        """The rooms ``conn`` is in now, sorted (a copy: other threads join and leave)."""
        with self._locked():
            return sorted(conn.rooms)

    def snapshot(self) -> list[Connection]:
        """The connected clients now, as a list the caller may use without the lock.

        Cached until the next add/remove: a fan-out of many messages to a stable audience
        copies the dict once, not once per message. Callers must not mutate the list.
        """
        with self._locked():
            snap = self._snapshot
            if snap is None:
                snap = self._snapshot = list(self._clients.values())
            return snap

    def members(self, room: str) -> list[Connection]:
        """The subscribers of ``room`` now (cached like :meth:`snapshot`; do not mutate)."""
        with self._locked():
            snap = self._room_snapshots.get(room)
            if snap is None:
                members = self._rooms.get(room)
                snap = list(members.values()) if members else []
                if members:
                    self._room_snapshots[room] = snap
            return snap

    @property
    def opened(self) -> int:
        """Connections ever given an id (accepted handshakes), for the metrics."""
        with self._locked():
            return self._next_id

    def has(self, conn_id: int) -> bool:
        with self._locked():
            return conn_id in self._clients

    def count(self) -> int:
        with self._locked():
            return len(self._clients)

    def room_counts(self) -> dict[str, int]:
        """Subscribers per room, all read at one instant."""
        with self._locked():
            return {room: len(members) for room, members in self._rooms.items()}

    def audience(self, rooms: tuple[str, ...] | None, user: str | None) -> int:
        """How many of this worker's clients a notification to ``rooms``/``user`` reaches
        (everybody when both are None; a client in two of the rooms counts twice)."""
        with self._locked():
            if user is not None:
                return len(self._users.get(user, ()))
            if rooms is None:
                return len(self._clients)
            return sum(len(self._rooms.get(room, ())) for room in rooms)

    def totals(self) -> tuple[int, int, int]:
        """(clients, rooms, subscriptions), read at one instant."""
        with self._locked():
            subs = sum(len(m) for m in self._rooms.values())
            return len(self._clients), len(self._rooms), subs

    def census(self) -> Census:
        """Clients, per room and per user, and the budget, all read at one instant: what
        this worker reports to the others (:mod:`wsserver.brokers.redis`)."""
        with self._locked():
            return Census(
                len(self._clients),
                {room: len(members) for room, members in self._rooms.items()},
                {user: len(mine) for user, mine in self._users.items()},
                self._capacity,
                1,
            )

    def version(self) -> int:
        """A number that changes whenever :meth:`census` would (pending departures applied
        first): a reporter rewrites its counts only when it moved."""
        with self._locked():
            return self._version

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def full(self) -> bool:
        """The connection budget is taken (readiness: send no more clients here)."""
        with self._locked():
            return len(self._clients) >= self._capacity

    def set_capacity(self, capacity: int) -> None:
        with self._locked():
            self._capacity = max(capacity, 0)
            self._version += 1

    def stop_accepting(self) -> list[Connection]:
        """Refuse new clients from now on; returns who is connected (for shutdown)."""
        with self._locked():
            self._accepting = False
            return list(self._clients.values())

    @property
    def accepting(self) -> bool:
        with self._locked():
            return self._accepting
