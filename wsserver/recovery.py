"""Recovery: a client that reconnects with the id of the last message it saw (``subscribe``
with ``since``, or ``?since=`` at connect time) is sent what it missed, then the live
stream, with no gap and no duplicate.

How, in two steps, so that a history read (a Redis call: 2 s when Redis hangs) never holds
the broadcaster thread, which every client of the worker waits on:

1. **The read, off the delivery thread**: the connection's own thread (a retry: a short-lived
   ``wsserver-resume-retry`` thread) notes the time, reads the room's history after
   ``since``, and queues a :class:`Resume` task.
2. **The join, on the broadcaster thread**, between two fan-outs (see
   :class:`wsserver.broadcaster.Task`): no I/O but the client's own non-blocking writes. A
   message published after the read and already delivered by then (the client was not a
   member yet) is found in the broadcaster's :class:`RecentMessages`, a short ring of what it
   delivered to rooms, and replayed after the history read; messages still queued behind
   the task reach the client live, minus those it was replayed (:class:`ReplayMarks`).

Why the ring bridges exactly the gap: a message missing from the read was stored after the
read began (the memory broker reads and publishes under one lock; Redis reads in one
``MULTI`` and numbers and publishes in one script), so it reached the broadcaster after the
read's start time, and the ring keeps everything delivered since then unless it already
dropped an entry delivered after that time. It then says so, and the resume reads again
(at most :data:`MAX_ATTEMPTS` reads; after that the client is told ``history_unavailable``
and retries).

Why slots (:class:`Recovery`): a resume is work on the broadcast queue, which publishers
need; a client looping resumes could otherwise fill it. Each connection has at most one
resume in flight and the worker ``WSSERVER_MAX_RESUMES``; the wait for a slot and the
history read happen on the connection's own thread, so a client that asks faster than its
replays run is simply not read meanwhile.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

from . import audit
from .brokers import BrokerUnavailable, order_of
from .brokers import Recovery as History
from .connection import SendResult
from .exceptions import AccessDenied, CommandError
from .limits import Slots
from .protocol import encode_json_frame, error_frame

if TYPE_CHECKING:
    from .broadcaster import Broadcast, Broadcaster
    from .connection import Connection
    from .service import NotificationService

__all__ = ["MAX_ATTEMPTS", "RECENT_MAX_AGE", "RecentMessages", "Recovery", "ReplayMarks", "Resume"]

# history reads per resume: a second (and third) only when the ring could not bridge the time
# between the previous read and the join (a burst of over RECENT_ITEMS room messages)
MAX_ATTEMPTS = 3
# what the broadcaster keeps of the room messages it delivered: enough for the queue
# (WSSERVER_QUEUE_SIZE 256, each item up to a few rooms) and what arrives during one read
RECENT_ITEMS = 1024
RECENT_BYTES = 4 * 1024 * 1024
# ... and for at most this long: a resume reads and queues in a couple of seconds at most
# (WSSERVER_ENQUEUE_TIMEOUT twice, 0.5 s by default); one that took longer reads again, as
# after a burst. Without it the last 4 MiB of messages stayed for good once traffic stopped
# (tests/e2e/test_brokers.py: 20 KB messages, history expired, RSS 4 MB above the start).
RECENT_MAX_AGE = 10.0
_UNAVAILABLE = "history cannot be read now; retry"


class RecentMessages:
    """The room messages the broadcaster delivered last (at most ``max_items`` and
    ``max_bytes`` of frames), with the time each went out: what a :class:`Resume` replays
    of the messages stored after its history read and delivered before it joined.

    Owned by the broadcaster. Thread-safety: broadcaster thread only, so no lock.
    """

    def __init__(
        self,
        max_items: int = RECENT_ITEMS,
        max_bytes: int = RECENT_BYTES,
        max_age: float = RECENT_MAX_AGE,
    ) -> None:
        self._ring: deque[tuple[float, Broadcast]] = deque()
        self._max_items, self._max_bytes, self._max_age = max_items, max_bytes, max_age
        self._bytes = 0
        # when the newest entry dropped so far had gone out: the ring holds every room
        # message delivered after this time
        self.dropped_at = float("-inf")

    def record(self, items: Iterable[Broadcast], now: float) -> None:
        """``items`` went out at ``now`` (those without a room and an id are not kept)."""
        ring = self._ring
        for item in items:
            if item.room is None or item.order is None:
                continue
            ring.append((now, item))
            self._bytes += len(item.frame)
        while ring and (len(ring) > self._max_items or self._bytes > self._max_bytes):
            self._drop_oldest()

    def expire(self, now: float) -> int:
        """Drop what went out over ``max_age`` before ``now`` (the broadcaster calls it
        while idle, so the last messages are not kept for good once traffic stops); the
        bytes of frames dropped."""
        ring = self._ring
        horizon = now - self._max_age
        dropped = 0
        while ring and ring[0][0] < horizon:
            dropped += self._drop_oldest()
        return dropped

    def _drop_oldest(self) -> int:
        """Forget the oldest entry (the ring then vouches only for what went out after it);
        its frame's size."""
        at, old = self._ring.popleft()
        self._bytes -= len(old.frame)
        self.dropped_at = at
        return len(old.frame)

    def after(self, room: str, order: tuple, since: float) -> list[Broadcast] | None:
        """``room``'s messages after ``order`` delivered at or after monotonic time
        ``since``, in order; None when the ring dropped some of those already."""
        if self.dropped_at >= since:
            return None
        found = []
        for at, item in reversed(self._ring):
            if at < since:
                break
            if item.room == room and item.order is not None and item.order > order:
                found.append(item)
        found.reverse()
        return found




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
    """Starts resumes: takes a slot, reads history, queues the :class:`Resume` task.

    Owned by the service; the client commands call :meth:`resume`. It reads the service's
    broker and broadcaster at each use (both are replaced when a worker starts after a
    fork) and uses only the service's public surface.
    Thread-safety: :meth:`resume` may be called from any connection thread, :meth:`retry`
    from the broadcaster thread; ``slots`` locks itself.
    """

    def __init__(self, service: NotificationService) -> None:
        self._service = service
        self._settings = service.settings
        # history replays queued or running: they share the broadcast queue with publishers
        self.slots = Slots(self._settings.max_resumes)

    def resume(self, conn: Connection, room: str, since: str) -> None:
        """Read what ``conn`` missed in ``room`` since id ``since`` (on this thread), then
        queue the replay and its joining the room; the task sends the reply. The caller has
        checked that ``conn`` may join ``room``. Raises :class:`CommandError` ``busy`` when
        no slot frees up within ``WSSERVER_ENQUEUE_TIMEOUT`` or the queue stays full that
        long; a history read that fails is answered ``history_unavailable`` here."""
        wait = self._settings.enqueue_timeout
        blocked = self.slots.acquire(conn.id, wait)
        if blocked is not None:
            raise self._busy(conn, blocked)
        queued = False
        try:
            queued = self._attempt(conn, room, since, 1)
        finally:
            if not queued:
                self.slots.release(conn.id)

    def retry(self, conn: Connection, room: str, since: str, attempt: int) -> None:
        """Read again, on a thread of its own (called by a :class:`Resume` on the
        broadcaster thread, which must not wait on the broker); the slot stays taken."""

        def run() -> None:
            queued = False
            try:
                queued = self._attempt(conn, room, since, attempt)
            except CommandError as exc:
                conn.send(error_frame(exc.code, exc.reason, room))
            finally:
                if not queued:
                    self.slots.release(conn.id)

        threading.Thread(target=run, name="wsserver-resume-retry", daemon=True).start()

    def _attempt(self, conn: Connection, room: str, since: str, attempt: int) -> bool:
        """One history read and the task that joins after it: True once queued; False
        when the read failed (the client was told). Raises :class:`CommandError` ``busy``
        when the queue stayed full."""
        broadcaster = self._service.broadcaster
        assert broadcaster is not None, "the service is started before connections"
        started = time.monotonic()
        try:
            found = self._service.broker.history(room, since)
        except BrokerUnavailable:
            conn.send(error_frame("history_unavailable", _UNAVAILABLE, room))
            return False
        task = Resume(self._service, conn, room, since, found, started, attempt)
        if not broadcaster.submit(task, self._settings.enqueue_timeout):
            queue_size = self._settings.queue_size
            audit.refused("queue_full", conn.remote, f"WSSERVER_QUEUE_SIZE={queue_size}")
            raise CommandError("busy", "the server is too busy to resume now; retry")
        return True

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
    """Replay a history read (and what the broadcaster delivered to the room since it
    began) to one client, then join it to the room (a
    :class:`wsserver.broadcaster.Task`).

    Run by the broadcaster thread, after the batch it was drained with: every message
    delivered before it (the client was not yet a member, so it got none of them) is either
    in the read or was delivered after the read began, and then is in the broadcaster's
    :class:`RecentMessages`; messages still queued reach the client live. A message both
    replayed and still queued (Redis: stored before the read, not yet handed over by the
    listener) is marked replayed so the broadcaster skips its live copy for this client.
    When the ring cannot bridge, the task asks :meth:`Recovery.retry` for a new read. The
    resume's slot is given back however it ends."""

    def __init__(
        self,
        service: NotificationService,
        conn: Connection,
        room: str,
        since: str,
        found: History,
        started: float,
        attempt: int = 1,
    ) -> None:
        self.service, self.conn, self.room, self.since = service, conn, room, since
        self.found, self.started, self.attempt = found, started, attempt

    def run(self, broadcaster: Broadcaster) -> None:
        retrying = False
        try:
            retrying = self._replay(broadcaster)
        finally:
            recovery = self.service.recovery
            if retrying:
                recovery.retry(self.conn, self.room, self.since, self.attempt + 1)
            else:
                recovery.slots.release(self.conn.id)

    def _frames(self, broadcaster: Broadcaster) -> list[tuple[tuple, bytes]] | None:
        """What to replay: the read, then what went out to the room after it began; None
        when the ring no longer holds all of that."""
        frames = list(self.found.frames)
        last = frames[-1][0] if frames else order_of(self.since)
        if last is None:
            return frames
        later = broadcaster.recent.after(self.room, last, self.started)
        if later is None:
            return None
        return frames + [(item.order or (), item.frame) for item in later]

    def _replay(self, broadcaster: Broadcaster) -> bool:
        """The join; True when a new read is needed first."""
        service, conn, room = self.service, self.conn, self.room
        if not service.hub.has(conn.id):
            return False
        recovered = self.found.recovered
        frames: list[tuple[tuple, bytes]] = []
        if recovered:
            bridged = self._frames(broadcaster)
            if bridged is None:
                if self.attempt < MAX_ATTEMPTS:
                    return True
                conn.send(error_frame("history_unavailable", _UNAVAILABLE, room))
                return False
            frames = bridged
        try:
            # checked again: a refresh since the resume was asked may have taken the room away
            service.admission.join(conn, room)
        except AccessDenied as exc:  # that, or the room limit, reached since then
            conn.send(error_frame(exc.code, exc.reason, room))
            return False
        reply = {"type": "subscribed", "room": room, "recovered": recovered, "missed": len(frames)}
        if service.presence.enabled_for(room):  # joined here: the roster is exact now
            reply["users"], reply["anonymous"] = broadcaster.roster.members(room)
        result = conn.send(encode_json_frame(reply))
        if frames and result == SendResult.OK:
            result = conn.send_frames([frame for _, frame in frames])
            broadcaster.replays.mark(conn.id, room, frames[-1][0])
        if result == SendResult.SLOW:
            # fell its buffer behind on the replay: dropped like any slow consumer
            service.drop_slow(conn)
        return False
