"""Recovery: a client that reconnects with the id of the last message it saw (``subscribe``
with ``since``, or ``?since=`` at connect time) is sent what it missed, then the live
stream, with no gap and no duplicate.

How: the replay runs as a :class:`Resume` task on the broadcaster thread, between two
fan-outs (see :class:`wsserver.broadcaster.Task`), so no live message can slip between the
history read and the client's joining the room. A message both in the history read and
still in the queue behind the task is recorded in the broadcaster's :class:`ReplayMarks`,
and the broadcaster skips its live copy for that client.

Why slots (:class:`Recovery`): a resume is work on the broadcast queue, which publishers
need; a client looping resumes could otherwise fill it. Each connection has at most one
resume in flight and the worker ``WSSERVER_MAX_RESUMES``; the wait for a slot happens on the
connection's own thread, so a client that asks faster than its replays run is simply not
read meanwhile.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

from . import audit
from .brokers import BrokerUnavailable
from .connection import SendResult
from .exceptions import AccessDenied, CommandError
from .limits import Slots
from .protocol import encode_json_frame, error_frame

if TYPE_CHECKING:
    from .broadcaster import Broadcast, Broadcaster
    from .connection import Connection
    from .service import NotificationService

__all__ = ["Recovery", "ReplayMarks", "Resume"]


class ReplayMarks:
    """Per connection and room, the order of the last message a resume replayed: the live
    copies of messages up to it, still queued behind the resume, are not sent again.

    Owned by the broadcaster, which consults it for every client it writes to.
    Thread-safety: broadcaster thread only (resumes run there), so no lock.
    """

    def __init__(self) -> None:
        self._marks: dict[int, dict[str, tuple]] = {}

    def __bool__(self) -> bool:
        return bool(self._marks)

    def __contains__(self, conn_id: object) -> bool:
        return conn_id in self._marks

    def mark(self, conn_id: int, room: str, order: tuple) -> None:
        """``conn_id`` was sent ``room``'s history up to ``order``."""
        self._marks.setdefault(conn_id, {})[room] = order

    def unsent(self, conn_id: int, items: Sequence[Broadcast]) -> list[bytes]:
        """The frames of ``items`` that ``conn_id`` was not replayed. A room's mark is
        forgotten at its first later message (ids increase per room, so nothing after it
        can be a duplicate), and the connection's entry once no mark is left."""
        marks = self._marks[conn_id]
        keep = []
        for item in items:
            room = item.room
            mark = marks.get(room) if room is not None else None
            if room is not None and mark is not None and item.order is not None:
                if item.order <= mark:
                    continue
                del marks[room]
            keep.append(item.frame)
        if not marks:
            del self._marks[conn_id]
        return keep

    def forget_departed(self, registered: Callable[[int], bool]) -> None:
        """Drop the marks of connections that left before a later message reached them."""
        for conn_id in [c for c in self._marks if not registered(c)]:
            del self._marks[conn_id]


class Recovery:
    """Starts resumes: takes a slot, queues the :class:`Resume` task.

    Owned by the service; the client commands call :meth:`resume`. It reads the service's
    broker and broadcaster at each use (both are replaced when a worker starts after a
    fork) and uses only the service's public surface.
    Thread-safety: :meth:`resume` may be called from any connection thread; ``slots``
    locks itself.
    """

    def __init__(self, service: NotificationService) -> None:
        self._service = service
        self._settings = service.settings
        # history replays queued or running: they share the broadcast queue with publishers
        self.slots = Slots(self._settings.max_resumes)

    def resume(self, conn: Connection, room: str, since: str) -> None:
        """Queue the replay of what ``conn`` missed in ``room`` since id ``since``, then its
        joining the room; the task sends the reply. The caller has checked that ``conn``
        may join ``room``. Raises :class:`CommandError` ``busy`` when no slot frees up
        within ``WSSERVER_ENQUEUE_TIMEOUT`` or the queue stays full that long."""
        broadcaster = self._service.broadcaster
        assert broadcaster is not None, "the service is started before connections"
        wait = self._settings.enqueue_timeout
        blocked = self.slots.acquire(conn.id, wait)
        if blocked is not None:
            raise self._busy(conn, blocked)
        if not broadcaster.submit(Resume(self._service, self.slots, conn, room, since), wait):
            self.slots.release(conn.id)
            queue_size = self._settings.queue_size
            audit.refused("queue_full", conn.remote, f"WSSERVER_QUEUE_SIZE={queue_size}")
            raise CommandError("busy", "the server is too busy to resume now; retry")

    def _busy(self, conn: Connection, blocked: str) -> CommandError:
        limit = self._settings.max_resumes
        if blocked == "owner":
            reason = "this connection's previous resume is still running; retry"
            detail = "one resume at a time per connection"
        else:
            reason = f"{limit} resumes are running (WSSERVER_MAX_RESUMES); retry"
            detail = f"WSSERVER_MAX_RESUMES={limit}"
        audit.refused("resume_busy", conn.remote, detail)
        return CommandError("busy", reason)


class Resume:
    """Replay a room's history after ``since`` to one client, then join it to the room (a
    :class:`wsserver.broadcaster.Task`).

    Run by the broadcaster thread, after the batch it was drained with: every message
    delivered before it (the client was not yet a member, so it got none of them) was in
    history before it was queued, so the history read here contains all of them; messages
    still queued reach the client live. A message both in history and still queued (published
    between the two) is marked replayed so the broadcaster skips its live copy for this
    client. The resume's slot is given back however the task ends."""

    def __init__(
        self, service: NotificationService, slots: Slots, conn: Connection, room: str, since: str
    ) -> None:
        self.service, self.slots = service, slots
        self.conn, self.room, self.since = conn, room, since

    def run(self, broadcaster: Broadcaster) -> None:
        try:
            self._replay(broadcaster)
        finally:
            self.slots.release(self.conn.id)

    def _replay(self, broadcaster: Broadcaster) -> None:
        service, conn, room = self.service, self.conn, self.room
        if not service.hub.has(conn.id):
            return
        try:
            recovery = service.broker.history(room, self.since)
        except BrokerUnavailable:
            conn.send(error_frame("history_unavailable", "history cannot be read now; retry", room))
            return
        try:
            # checked again: a refresh since the resume was asked may have taken the room away
            service.admission.join(conn, room)
        except AccessDenied as exc:  # that, or the room limit, reached since then
            conn.send(error_frame(exc.code, exc.reason, room))
            return
        missed = len(recovery.frames) if recovery.recovered else 0
        reply = {"type": "subscribed", "room": room, "recovered": recovery.recovered}
        result = conn.send(encode_json_frame({**reply, "missed": missed}))
        if missed and result == SendResult.OK:
            result = conn.send_frames([frame for _, frame in recovery.frames])
            broadcaster.replays.mark(conn.id, room, recovery.frames[-1][0])
        if result == SendResult.SLOW:
            # fell its buffer behind on the replay: dropped like any slow consumer
            service.drop_slow(conn)
