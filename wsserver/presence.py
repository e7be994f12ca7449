"""Presence: rooms whose names start with ``WSSERVER_PRESENCE_PREFIX`` (``presence-``) tell
their members who comes and goes, once per user, cluster-wide.

Three parts, each on the thread that owns it:

* :class:`Presence` (one per service): which members this worker holds, as local
  connection counts per (room, member). The hub calls :meth:`Presence.changed` under its
  lock whenever a connection enters or leaves a presence room (subscribe, unsubscribe, a
  refresh that revokes it, a disconnect, a slow consumer's drop), so no path is missed;
  that call only counts. Its thread, ``wsserver-presence``, then tells the broker when a
  member appears on, or disappears from, this worker (:meth:`Broker.announce`): the
  memory broker queues the event itself (one process: this worker's view is the cluster's),
  the Redis broker decides against every live worker's members in one script and publishes
  the event only when the member is new to, or gone from, the whole cluster. Broker calls
  are I/O, so they never run on a connection's thread or under a lock; a failed one is
  retried, and what is retried is "make the broker agree with what this worker holds now",
  so a tab that closes and reopens before the retry announces nothing.
* :class:`Roster` (one per broadcaster): the members of every presence room as the
  presence events delivered so far say. The broadcaster applies each event to it in queue
  order and sends the event to the room only when it changed the roster, so a member
  announced twice (a worker that stalled and re-announced, a snapshot that overlapped
  live events) is told once.
* :class:`PresenceJoin` (a broadcaster task): a connection joins a presence room *on the
  broadcaster thread*, and its ``subscribed`` reply carries the roster at that instant.
  Every event delivered before it is in ``users``; every later one reaches the client after
  the reply. The list is exact: a client that applies the events in order to it always
  knows the members.

Members: a user (the token's ``sub``) is one member however many connections it has, on
however many workers. Without tokens every connection is a member of its own, announced
with ``"user": null`` and counted in ``anonymous``.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from typing import TYPE_CHECKING, Iterable

from .exceptions import AccessDenied, BrokerUnavailable
from .protocol import encode_json_frame, error_frame

if TYPE_CHECKING:
    from .broadcaster import Broadcast, Broadcaster
    from .brokers import Broker
    from .connection import Connection
    from .hub import Hub
    from .service import NotificationService

__all__ = [
    "JOIN",
    "LEAVE",
    "Presence",
    "PresenceJoin",
    "Roster",
    "bus_payload",
    "parse_payload",
    "presence_frame",
]

log = logging.getLogger(__name__)

JOIN = "join"
LEAVE = "leave"
RESET = "reset"
# the announcer's wait between retries of a broker call that failed, doubling to the max
_RETRY_MIN = 0.05
_RETRY_MAX = 1.0
# how often the announcer applies the hub's pending departures when nothing else wakes it:
# a connection's thread leaves the hub without its lock (Hub.depart), so a disconnect reaches
# Presence.changed at the hub's next locked operation; this bounds that delay
_SETTLE_EVERY = 0.1


def presence_frame(room: str, action: str, user: str | None) -> bytes:
    """The event a presence room's members receive (docs/protocol.md, "Presence")."""
    return encode_json_frame({"type": "presence", "room": room, "action": action, "user": user})


def bus_payload(room: str, action: str, member: str, user: str | None) -> str:
    """An event as the brokers carry it: the member's key travels with it (it tells one
    anonymous connection from another), clients are sent :func:`presence_frame`."""
    return json.dumps([room, action, member, user], ensure_ascii=False, separators=(",", ":"))


def parse_payload(text: str | bytes) -> tuple[str, str, str, str | None]:
    """:func:`bus_payload` read back: (room, action, member, user)."""
    room, action, member, user = json.loads(text)
    return str(room), str(action), str(member), user


class Roster:
    """Members of every presence room as the delivered events say: room -> {member key:
    user or None}.

    Thread-safety: written by the broadcaster thread only (:meth:`filter`); read by HTTP
    threads (``GET /rooms/<room>``) and the broadcaster (:meth:`members`) under ``_lock``.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rooms: dict[str, dict[str, str | None]] = {}

    def members(self, room: str) -> tuple[list[str], int]:
        """(the users, sorted; how many anonymous members) of ``room`` now."""
        with self._lock:
            members = self._rooms.get(room)
            if not members:
                return [], 0
            users = sorted(u for u in members.values() if u is not None)
            return users, len(members) - len(users)

    def _apply(self, room: str, action: str, member: str, user: str | None) -> bool:
        """Holds ``_lock``. Apply one event; True when it changed the roster."""
        members = self._rooms.get(room)
        if action == JOIN:
            if members is None:
                members = self._rooms[room] = {}
            elif member in members:
                return False
            members[member] = user
            return True
        if members is None or member not in members:
            return False
        del members[member]
        if not members:
            del self._rooms[room]
        return True

    def filter(self, batch: list[Broadcast]) -> list[Broadcast]:
        """Broadcaster thread: apply the batch's presence events in order and keep those
        that changed the roster (a reset becomes the joins and leaves it implies); other
        messages pass untouched."""
        if not any(item.presence is not None for item in batch):
            return batch
        kept: list[Broadcast] = []
        with self._lock:
            for item in batch:
                event = item.presence
                if event is None:
                    kept.append(item)
                elif event[0] == RESET:
                    kept.extend(self._reset(item, event[1]))
                elif self._apply(item.room or "", event[0], event[1], event[2]):
                    kept.append(item)
        return kept

    def _reset(self, item: Broadcast, rooms: dict[str, dict[str, str | None]]) -> list[Broadcast]:
        """Holds ``_lock``. Replace the roster with a snapshot read from the broker
        (``item`` carried it); the differences become events, so members learn what they
        missed."""
        make = type(item)  # Broadcast, without importing the broadcaster (it imports us)
        events: list[Broadcast] = []
        for room in sorted(set(self._rooms) | set(rooms)):
            old, new = self._rooms.get(room, {}), rooms.get(room, {})
            for member, user in old.items():
                if member not in new:
                    events.append(make(presence_frame(room, LEAVE, user), item.queued_at, room))
            for member, user in new.items():
                if member not in old:
                    events.append(make(presence_frame(room, JOIN, user), item.queued_at, room))
        self._rooms = {room: dict(members) for room, members in rooms.items() if members}
        return events


class PresenceJoin:
    """Join ``conn`` to presence ``room`` and reply ``subscribed`` with the members (a
    :class:`wsserver.broadcaster.Task`). On the broadcaster thread, between two fan-outs:
    the roster then holds exactly the events this connection will not be sent."""

    def __init__(self, service: NotificationService, conn: Connection, room: str) -> None:
        self.service, self.conn, self.room = service, conn, room
        # set once it ran: the connection's thread waits for it before its next command, so
        # replies keep the order of the commands (clients match them that way)
        self.done = threading.Event()

    def run(self, broadcaster: Broadcaster) -> None:
        try:
            self._join(broadcaster)
        finally:
            self.done.set()

    def _join(self, broadcaster: Broadcaster) -> None:
        service, conn, room = self.service, self.conn, self.room
        if not service.hub.has(conn.id):
            return
        try:
            service.admission.join(conn, room)  # checked again: a refresh may have revoked it
        except AccessDenied as exc:
            conn.send(error_frame(exc.code, exc.reason, room))
            return
        users, anonymous = broadcaster.roster.members(room)
        reply = {"type": "subscribed", "room": room, "users": users, "anonymous": anonymous}
        conn.send(encode_json_frame(reply))


class Presence:
    """This worker's presence members and the ``wsserver-presence`` thread that announces
    them (see the module docstring).

    Thread-safety: :meth:`changed` is called by the hub under its lock, from any thread; it
    takes ``_lock`` (never the other way round) and does no I/O. Everything else of the
    announcer is its own thread's. ``start``/``stop`` from the controlling thread;
    ``stop`` is idempotent.
    """

    def __init__(self, prefix: str, hub: Hub) -> None:
        self.prefix = prefix
        self._hub = hub
        self._lock = threading.Lock()
        # (room, member) -> [connections here, the member's user]
        self._counts: dict[tuple[str, str], list] = {}
        # changed since told to the broker, in order -> the member's user
        self._dirty: dict[tuple[str, str], str | None] = {}
        self._announced: set[tuple[str, str]] = set()  # what the broker holds for us
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._broker: Broker | None = None
        self._tag = uuid.uuid4().hex[:12]  # anonymous members' keys: unique per worker run
        self.announced = 0  # broker calls made (tests, logs)

    def enabled_for(self, room: str) -> bool:
        return bool(self.prefix) and room.startswith(self.prefix)

    def member(self, conn: Connection) -> str:
        """``conn``'s member key: its user, or (no token) the connection itself."""
        if conn.user is not None:
            return "u:" + conn.user
        return f"a:{self._tag}:{conn.id}"

    # -- bookkeeping (any thread, under the hub's lock) --------------------------------------

    def changed(self, conn: Connection, room: str, joined: bool) -> None:
        """Hub callback: ``conn`` entered (``joined``) or left presence ``room``."""
        key = (room, self.member(conn))
        with self._lock:
            held = self._counts.get(key)
            n = (held[0] if held else 0) + (1 if joined else -1)
            if n > 0:
                if held is None:
                    self._counts[key] = [n, conn.user]
                else:
                    held[0] = n
            else:
                self._counts.pop(key, None)
            if (n == 1 and joined) or n <= 0:
                self._dirty[key] = conn.user
                self._wake.set()

    def reannounce(self) -> None:
        """The broker lost what it held for us (a stall past the report's expiry, Redis
        restarted): announce every member again (the broker tells the cluster only those it
        does not know; rosters drop any repeat)."""
        with self._lock:
            self._announced.clear()
            for key, held in self._counts.items():
                self._dirty[key] = held[1]
            self._wake.set()

    # -- the announcer thread ----------------------------------------------------------------

    def start(self, broker: Broker) -> None:
        self._broker = broker
        self._tag = uuid.uuid4().hex[:12]  # after a fork: not the parent's
        if not self.prefix or (self._thread is not None and self._thread.is_alive()):
            return  # (a thread started before a fork is not alive in the child)
        self._stop.clear()
        # daemon: a broker call hanging on a dead Redis must not keep the worker alive
        self._thread = threading.Thread(target=self._run, name="wsserver-presence", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 3.0) -> None:
        """Announce what is pending (the leaves of a shutdown's closes), then end."""
        self._stop.set()
        self._wake.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    @property
    def alive(self) -> bool:
        return not self.prefix or self._thread is None or self._thread.is_alive()

    def _run(self) -> None:
        retry = _RETRY_MIN
        while True:
            self._wake.wait(_SETTLE_EVERY)
            self._wake.clear()
            stopping = self._stop.is_set()
            self._hub.settle()  # disconnects queued by Hub.depart reach changed() now
            failed = self._reconcile()
            if stopping:
                return
            if failed:
                self._stop.wait(retry)
                retry = min(retry * 2, _RETRY_MAX)
                self._wake.set()
            else:
                retry = _RETRY_MIN

    def _reconcile(self) -> bool:
        """Tell the broker every change since the last call; True if one failed (it stays
        pending, with those after it)."""
        broker = self._broker
        if broker is None:
            return False
        while True:
            with self._lock:
                if not self._dirty:
                    return False
                key = next(iter(self._dirty))
                user = self._dirty.pop(key)
                want = key in self._counts
            have = key in self._announced
            if want == have:
                continue
            room, member = key
            try:
                broker.announce(room, JOIN if want else LEAVE, member, user)
            except BrokerUnavailable as exc:
                log.debug("presence: %s not announced yet (%s)", key, exc)
                with self._lock:  # first again: the changes after it wait behind it
                    self._dirty = {key: user, **self._dirty}
                return True
            except Exception:  # a bug must not end presence for the worker
                log.exception("presence: announcing %s failed", key)
                return True
            self.announced += 1
            if want:
                self._announced.add(key)
            else:
                self._announced.discard(key)


def rooms_of_payloads(values: Iterable[bytes | str]) -> dict[str, dict[str, str | None]]:
    """Members from stored leave payloads (what the Redis broker keeps per worker)."""
    rooms: dict[str, dict[str, str | None]] = {}
    for value in values:
        room, _action, member, user = parse_payload(value)
        rooms.setdefault(room, {})[member] = user
    return rooms
