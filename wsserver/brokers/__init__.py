"""Brokers: where a published message goes between ``POST /notify`` and the broadcaster.

* :class:`~wsserver.brokers.memory.MemoryBroker` (the embedded default): one process; ids,
  history and delivery all in this worker.
* :class:`~wsserver.brokers.redis.RedisBroker` (``WSSERVER_REDIS_URL``): every worker on every
  host publishes through Redis (a stream per audience for ids and history, one pub/sub channel
  for delivery), so a notification posted to any worker reaches every client, once, in order.

Both give each message an id that increases within its audience (a room, a user, or
everybody), keep the last ``WSSERVER_HISTORY_SIZE`` messages of each audience for
``WSSERVER_HISTORY_TTL`` seconds, and answer :meth:`Broker.history` the same way, so the
same test suite runs against both (tests/test_brokers.py).

With several workers, every observer must see one service: each worker's counts (a
:class:`Census`) reach the others through the broker (:meth:`Broker.peers`), and
``GET /``, ``GET /rooms`` and ``POST /notify`` add this worker's live counts to them.

Idempotency: a publish may carry an :class:`Idempotency` (the publisher's key and the
notification's fingerprint). The broker records the key with the ids in the same atomic step
that publishes (the memory broker's lock, the Redis script), for ``WSSERVER_HISTORY_TTL``;
a publish whose key is recorded publishes nothing and gets the first ids back
(:class:`Repeated`), or a 422 when the key was used for another notification. Because the
record and the publish are one step, a publish that timed out on our side but ran later in
Redis is found by the retry: "a 503 may have been published; retrying with the same key is
safe" (docs/protocol.md).

Both raise :class:`~wsserver.exceptions.BrokerUnavailable` (the message could not be stored or
published, history cannot be read: answer 503); it is defined with every other refusal in
:mod:`wsserver.exceptions` and re-exported here, where the brokers import it from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from ..exceptions import BadRequest, BrokerUnavailable
from ..frames import OP_TEXT, encode_frame

if TYPE_CHECKING:
    from ..broadcaster import Broadcaster
    from ..config import Settings
    from ..control import Control, Outcome
    from ..hub import Hub

T = TypeVar("T")

__all__ = [
    "Broker",
    "BrokerUnavailable",
    "Census",
    "Deferred",
    "Idempotency",
    "Outgoing",
    "Recovery",
    "Repeated",
    "RoomHistory",
    "WouldBlock",
    "audience_key",
    "envelope_frame",
    "envelope_of",
    "key_reused",
    "make_broker",
    "order_of",
    "page_of",
]


@dataclass(frozen=True)
class Outgoing:
    """One message to publish: its audience and its envelope up to (not including) the id,
    as produced by :meth:`wsserver.protocol.Notification.envelope_prefix`."""

    room: str | None
    user: str | None
    prefix: str


@dataclass(frozen=True)
class Idempotency:
    """A publish's idempotency key and its notification's fingerprint
    (:meth:`wsserver.protocol.Notification.fingerprint`)."""

    key: str
    fingerprint: str


class WouldBlock(Exception):
    """:meth:`Broker.publish_nowait` could not publish without waiting (a lock or the
    broadcast queue was busy, or the broker never publishes without a round trip). Nothing
    was published: the caller may do the whole request again where waiting is allowed.
    Not a refusal (nobody is answered with it); see :mod:`wsserver.worker`, which serves a
    ``POST /notify`` on its main thread only when publishing cannot block there."""


class Deferred(Exception):
    """:meth:`Broker.publish_nowait` can publish without waiting, but its answer comes later:
    the caller (a thread that drives ``pipeline``, :class:`~wsserver.brokers.rediswire.Pipeline`:
    the worker's main thread) writes ``command`` with ``pipeline.send(command, on_reply)``
    and, on that thread, once the reply is in, calls ``finish(reply)`` for what
    ``publish_nowait`` would have returned or raised (:class:`WouldBlock` included: nothing
    was published, serve the request again where waiting is allowed).

    Each layer between the broker and the caller that has work left after the publish adds
    it with :meth:`wrap` and lets the exception go on, so ``finish`` answers the whole
    request. Not a refusal and not an error: nothing has been sent when it is raised."""

    def __init__(self, pipeline: Any, command: bytes, finish: Callable[[Any], Any]) -> None:
        super().__init__("publish deferred to a pipeline")
        self.pipeline = pipeline
        self.command = command
        self.finish = finish

    def wrap(self, outer: Callable[[Callable[[Any], Any], Any], Any]) -> Deferred:
        """``finish`` becomes ``outer(previous finish, reply)``; returns self (re-raise it)."""
        inner = self.finish
        self.finish = lambda reply: outer(inner, reply)
        return self


class Repeated(list):
    """The ids a publish got the first time its idempotency key was used: this one
    published nothing."""


def key_reused() -> BadRequest:
    """The 422 for a key already used for a different notification (within the TTL)."""
    return BadRequest(
        422,
        "idempotency_key_reused",
        "this Idempotency-Key was already used for a different notification; "
        "use a new key for a new notification",
    )


@dataclass(frozen=True)
class Recovery:
    """What history can give a client resuming after ``since``: ``recovered`` is True only
    when nothing after ``since`` has been lost; then ``frames`` holds every message after it,
    in order, as (order, frame bytes). When False, nothing is replayed."""

    recovered: bool
    frames: list[tuple[tuple, bytes]] = field(default_factory=list)


@dataclass(frozen=True)
class RoomHistory:
    """A page of a room's history (``GET /rooms/<room>/history``): ``messages`` are the
    envelopes' JSON texts, oldest first. ``complete`` is False when messages after ``since``
    may be missing (the same test a resume's ``recovered`` makes); ``more`` is True when
    further kept messages follow the last one given (ask again with its id as ``since``)."""

    complete: bool
    messages: list[str] = field(default_factory=list)
    more: bool = False


@dataclass(frozen=True)
class Census:
    """Connected clients, per room and per user, and the connection budget: one worker's
    (:meth:`wsserver.hub.Hub.census`, ``workers`` 1) or several workers' added up."""

    clients: int = 0
    rooms: dict[str, int] = field(default_factory=dict)
    users: dict[str, int] = field(default_factory=dict)
    capacity: int = 0
    workers: int = 0

    def __add__(self, other: Census) -> Census:
        return Census(
            self.clients + other.clients,
            _added(self.rooms, other.rooms),
            _added(self.users, other.users),
            self.capacity + other.capacity,
            self.workers + other.workers,
        )

    @property
    def subscriptions(self) -> int:
        return sum(self.rooms.values())

    def audience(self, rooms: tuple[str, ...] | None, user: str | None) -> int:
        """How many clients a notification to ``rooms``/``user`` reaches (everybody when
        both are None; a client in two of the rooms counts twice, as it gets two messages)."""
        if user is not None:
            return self.users.get(user, 0)
        if rooms is None:
            return self.clients
        return sum(self.rooms.get(room, 0) for room in rooms)


def _added(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    if not b:
        return dict(a)
    total = dict(a)
    for key, n in b.items():
        total[key] = total.get(key, 0) + n
    return total


def audience_key(room: str | None, user: str | None) -> str:
    """The history/id stream a message belongs to."""
    if user is not None:
        return "u:" + user
    if room is not None:
        return "r:" + room
    return "*"


def envelope_frame(prefix: str, message_id: str) -> bytes:
    """The text frame of a finished envelope: the prefix, the id, the closing brace."""
    return encode_frame(OP_TEXT, (prefix + message_id + '"}').encode("utf-8"))


def envelope_of(frame: bytes) -> str:
    """The envelope's JSON text in a text frame made by :func:`envelope_frame` (server
    frames are unmasked: a 2-, 4- or 10-byte header, then the payload)."""
    length = frame[1] & 0x7F
    start = 2 if length < 126 else 4 if length == 126 else 10
    return frame[start:].decode("utf-8")


def page_of(kept: list[tuple[tuple, T]], since: tuple | None, limit: int) -> tuple[list[T], bool]:
    """The page both brokers answer from what they keep ((order, item), oldest first), and
    whether more follow it: without ``since`` the newest ``limit``; with it the oldest
    ``limit`` after it."""
    if since is None:
        return [item for _, item in kept[-limit:]], False
    after = [item for order, item in kept if order > since]
    return after[:limit], len(after) > limit


def order_of(message_id: str) -> tuple | None:
    """An id (``"<ms>-<n>"``, from either broker) as a comparable key: ``"1700-3"`` →
    (1700, 3). None for anything else."""
    parts = message_id.split("-")
    if not 1 <= len(parts) <= 2 or not all(p.isdigit() and len(p) < 20 for p in parts):
        return None
    return tuple(int(p) for p in parts)


class Broker:
    """The interface both brokers implement. Thread-safety: every method may be called from
    any thread; ``start``/``stop`` from the controlling thread."""

    kind = "abstract"
    # True: publish_nowait may publish (memory); False: it always raises WouldBlock (Redis:
    # every publish is a network round trip)
    publishes_nowait = False
    # called when the broker lost what this worker had announced (Redis: our report
    # expired); the service points it at wsserver.presence.Presence.reannounce
    on_report_lost: Callable[[], None] | None = None

    def start(self, broadcaster: Broadcaster, hub: Hub) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def publish(
        self,
        messages: tuple[Outgoing, ...],
        timeout: float,
        idempotency: Idempotency | None = None,
    ) -> list[str] | None:
        """Publish atomically (all or none); the ids, in order (several messages may share
        an audience: a batch; they are numbered in order). None when the local queue
        stayed full for ``timeout`` (memory); raises :class:`BrokerUnavailable`. With
        ``idempotency`` whose key is recorded: nothing is published, the first ids are
        returned as :class:`Repeated` (or :func:`key_reused` is raised if the fingerprint
        differs); otherwise the key is recorded with the ids, in the same atomic step."""
        raise NotImplementedError

    def publish_nowait(
        self, messages: tuple[Outgoing, ...], idempotency: Idempotency | None = None
    ) -> list[str]:
        """:meth:`publish` without waiting for anything: a lock another thread holds, room
        in the broadcast queue, a network. Raises :class:`WouldBlock` (nothing was published)
        when it would have to wait, and the refusals :meth:`publish` raises otherwise."""
        raise WouldBlock(self.kind)

    def relay(self, frame: bytes, timeout: float) -> bool:
        """A client's free-form message (already a frame) to every client everywhere."""
        raise NotImplementedError

    def history(self, room: str, since: str) -> Recovery:
        """Messages of ``room`` after id ``since``; raises :class:`BrokerUnavailable`."""
        raise NotImplementedError

    def announce(self, room: str, action: str, member: str, user: str | None) -> bool:
        """Presence (:mod:`wsserver.presence`): ``member`` (of ``user``) appeared on this
        worker in ``room`` (``action`` ``join``) or is gone from it (``leave``). The event
        reaches the room's members on every worker, in order with notifications, when it
        changes who is in the room cluster-wide; True when it was published. No id, no
        history. Raises :class:`BrokerUnavailable` (the caller retries)."""
        raise NotImplementedError

    def room_history(
        self, room: str, since: str | None, limit: int, timeout: float
    ) -> RoomHistory:
        """At most ``limit`` kept messages of ``room`` for ``GET /rooms/<room>/history``:
        after ``since`` (a valid id; its ``complete`` as a resume's ``recovered``), or the
        newest (``complete`` True). Read on the caller's thread, never the broadcaster's;
        raises :class:`BrokerUnavailable` when the read fails or takes over ``timeout``."""
        raise NotImplementedError

    def control(self, control: Control, timeout: float) -> Outcome | None:
        """Have every worker act on its connections of ``control.user``
        (:mod:`wsserver.control`), in order with the notifications published before, and
        wait (bounded) for their counts. None when this worker's queue stayed full for
        ``timeout`` (nothing was sent); raises :class:`BrokerUnavailable`."""
        raise NotImplementedError

    @property
    def ready(self) -> bool:
        """Connected and delivering (readiness)."""
        raise NotImplementedError

    def wait_ready(self, timeout: float) -> bool:
        """Block until :attr:`ready` (at most ``timeout`` seconds); True if it is."""
        return self.ready

    @property
    def alive(self) -> bool:
        """The broker's own threads run (liveness)."""
        raise NotImplementedError

    def peers(self) -> Census | None:
        """Every other worker's counts added up, fresh within a second, read without I/O
        (``POST /notify`` asks on every publish). None when there is nobody else to ask
        (one process) or the broker lost track of them (Redis unreachable): the caller then
        shows this worker's own counts."""
        return None

    def describe(self) -> str:
        """The broker for the start-up log line (never a password)."""
        return self.kind


def make_broker(settings: Settings) -> Broker:
    if settings.uses_redis:
        from .redis import RedisBroker

        return RedisBroker(settings)
    from .memory import MemoryBroker

    return MemoryBroker(settings)
