"""Control messages: what a publisher does to one user's connections, cluster-wide
(``POST /disconnect``, ``POST /unsubscribe``; the endpoints are :mod:`wsserver.serverapi`).

Why they travel like notifications: a user's connections may be on any worker of any host, and
only the worker holding a connection may write to it. So a control message goes through the
broker exactly as a notification does (memory: straight onto this worker's broadcast queue;
Redis: the bus log and the one channel every worker listens to, see
:meth:`wsserver.brokers.redis.RedisBroker.control`), and each worker acts on its own
connections in a :class:`ControlTask`, run by its broadcaster thread between two fan-outs.
That gives the order a publisher expects: a notification published before the disconnect
reaches the user before the close frame, one published after an unsubscribe does not reach
the room's removed members. A control message is never a notification: it is stored in no
room's history, so no resume and no ``GET /rooms/<room>/history`` ever shows it.

The task does no I/O but the connections' own non-blocking writes (the broadcaster's rule);
it reports how many connections it acted on through a callback (``done``), which must not
block either: the memory broker wakes the waiting request, the Redis broker hands the count
to its replier thread, which pushes it to the requester's reply list.

What a connection sees: a disconnect is close :data:`~wsserver.codes.CLOSE_DISCONNECTED`
(4002, "disconnected by the server", behind what was already queued for it), then the end of
the TCP connection: its thread is woken and ends it without waiting for the client's close
reply, so the user is gone at once, whatever the client does; an unsubscribe
is the ``unsubscribed`` reply the client's own command gets, plus ``code``
(``unsubscribed_by_server``) and ``reason``, so clients forget the room (they do not rejoin
it on reconnect) and can tell it from the answer to their own command.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from . import audit
from .codes import CLOSE_DISCONNECTED, REASON_DISCONNECTED, REASON_UNSUBSCRIBED, ErrorCode
from .connection import SendResult
from .protocol import encode_json_frame

if TYPE_CHECKING:
    from .broadcaster import Broadcaster
    from .hub import Hub

__all__ = [
    "DISCONNECT",
    "UNSUBSCRIBE",
    "WAIT",
    "Control",
    "ControlTask",
    "Outcome",
    "Reply",
    "apply",
    "unsubscribed_reply",
]

# how long a request waits for the workers' counts: a task runs within milliseconds unless
# a worker's queue is backed up; past it the request answers with the counts it has
WAIT = 2.0

DISCONNECT = "disconnect"
UNSUBSCRIBE = "unsubscribe"
_ACTIONS = (DISCONNECT, UNSUBSCRIBE)


@dataclass(frozen=True)
class Control:
    """One control message: ``action`` on every connection of ``user`` (for an unsubscribe,
    in ``room``). ``reply_to`` is set by the Redis broker: the list each worker pushes its
    count to."""

    action: str
    user: str
    room: str | None = None
    reply_to: str | None = None

    def encode(self) -> str:
        """Compact JSON, as it travels on the Redis channel and in its bus log."""
        return json.dumps(
            {"a": self.action, "u": self.user, "r": self.room, "k": self.reply_to},
            ensure_ascii=False,
            separators=(",", ":"),
        )

    @classmethod
    def decode(cls, text: str | bytes) -> Control:
        """The inverse of :meth:`encode`; ValueError for anything else."""
        obj: Any = json.loads(text)
        if not isinstance(obj, dict) or obj.get("a") not in _ACTIONS:
            raise ValueError("not a control message")
        user, room, reply_to = obj.get("u"), obj.get("r"), obj.get("k")
        if not isinstance(user, str) or not (room is None or isinstance(room, str)):
            raise ValueError("not a control message")
        if obj["a"] == UNSUBSCRIBE and room is None:
            raise ValueError("an unsubscribe names a room")
        return cls(obj["a"], user, room, reply_to if isinstance(reply_to, str) else None)


@dataclass(frozen=True)
class Outcome:
    """What a control message did: ``count`` connections acted on by the ``workers`` that
    reported within the wait; ``unanswered`` workers that were expected to report and did not
    (they still act when the message reaches them; they are only not counted)."""

    count: int
    workers: int
    unanswered: int = 0


def unsubscribed_reply(room: str) -> dict[str, str]:
    """What a connection a publisher took out of ``room`` is sent: the reply to the client's
    own ``unsubscribe``, plus the ``code`` and ``reason`` that say the server did it."""
    return {
        "type": "unsubscribed",
        "room": room,
        "code": ErrorCode.UNSUBSCRIBED_BY_SERVER,
        "reason": REASON_UNSUBSCRIBED,
    }


def apply(control: Control, hub: Hub, on_slow: Callable[[Any], None] | None = None) -> int:
    """Act on this worker's connections of ``control.user``; how many were acted on
    (closed now, or taken out of the room). On the broadcaster thread: no I/O but the
    connections' non-blocking writes, and no hub lock held while writing."""
    connections = hub.user_connections(control.user)
    count = 0
    if control.action == DISCONNECT:
        for conn in connections:
            if conn.close(CLOSE_DISCONNECTED, REASON_DISCONNECTED):
                # its thread ends the connection now (the close frame is written first), as
                # for a slow consumer: a client that ignores the close is not kept until its
                # next keepalive ping
                conn.wake()
                count += 1
        if count:
            audit.closed_all("disconnected", count, "POST /disconnect")
        return count
    room = control.room
    assert room is not None
    frame = encode_json_frame(unsubscribed_reply(room))
    for conn in connections:
        if hub.unsubscribe(conn, room):
            count += 1
            if conn.send(frame) == SendResult.SLOW and on_slow is not None:
                on_slow(conn)
    return count


class ControlTask:
    """A control message's work on one worker (a :class:`wsserver.broadcaster.Task`): run by
    the broadcaster after the messages queued before it went out. ``done(count)`` is called
    exactly once, also when acting failed (count 0), and must not block."""

    def __init__(self, control: Control, hub: Hub, done: Callable[[int], None]) -> None:
        self.control, self._hub, self._done = control, hub, done

    def run(self, broadcaster: Broadcaster) -> None:
        count = 0
        try:
            count = apply(self.control, self._hub, broadcaster.drop_slow)
        finally:
            self._done(count)

    def __repr__(self) -> str:
        return f"ControlTask({self.control.action}, user={self.control.user!r})"


class Reply:
    """A count handed from the broadcaster thread to the request thread waiting for it.

    Thread-safety: :meth:`set` from one thread, :meth:`wait` from another; an Event orders
    the write before the read."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._count = 0

    def set(self, count: int) -> None:
        self._count = count
        self._event.set()

    def wait(self, timeout: float) -> int | None:
        """The count, or None when it did not come within ``timeout`` seconds."""
        return self._count if self._event.wait(timeout) else None
