"""The broadcaster thread: the thread-and-queue twin of the Go original's goroutine and channel.

Publishers (``POST /notify``, client rebroadcasts) put already-encoded frames on a bounded
``queue.Queue``; one thread, ``wsserver-broadcaster``, takes them off in order and writes
them to every client. Why it is fast:

* **encode once**: an item carries the frame bytes; every client is sent the same object;
* **batch**: when several items are waiting, they go out together, and each client gets
  the whole batch in one ``sendmsg`` (one system call per client per batch, not per message);
* **never wait on a client**: writes are non-blocking (see :mod:`wsserver.connection`); a
  client whose backlog passes its byte cap is dropped as a slow consumer, not waited for;
* **compress once**: clients that negotiated permessage-deflate (always without server
  context takeover) get the compressed twin of each frame
  (:func:`~wsserver.frames.deflate_frame`), made when the first such client of a fan-out
  is reached and then shared, one per window size; a fan-out with none compresses nothing.
  Frames under ``compress_min_size`` bytes of payload go to them plain, the same object as
  to every other client.

Order: one queue, one consumer, so every client sees messages in the order they were queued.

Tasks: work that must happen between two fan-outs (a resume's join, see
:mod:`wsserver.recovery`) is queued like a message and run by the same thread. Tasks do no
blocking I/O here (a resume reads history before it is queued): a slow task would stall
every client. For the resumes the broadcaster keeps the room messages it delivered last
(:class:`~wsserver.recovery.RecentMessages`) and the
:class:`~wsserver.recovery.ReplayMarks`, and skips what a client was already replayed.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Protocol, Tuple, Union

from . import allocator, metrics
from .connection import Connection, SendResult
from .frames import deflate_frame
from .hub import Hub
from .presence import Roster
from .recovery import RecentMessages, ReplayMarks

__all__ = ["Broadcast", "Broadcaster"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Broadcast:
    """One message to fan out: its frame bytes, encoded once, when it was queued, and who
    gets it: a room's subscribers, one user's connections, or (both None) every client."""

    frame: bytes
    queued_at: float
    room: str | None = None
    user: str | None = None
    order: tuple | None = None  # the message id as a comparable key (see brokers)
    # a presence event (wsserver.presence): (action, member, user), or ("reset", rooms); the
    # roster decides whether it is sent (only when it changes who is there)
    presence: tuple | None = None


class Task(Protocol):
    """Work that must happen in the broadcaster thread, between two fan-outs, so no live
    message slips between a recovery's replay and its joining the room. A task runs
    after the messages drained with it (queued before *or* just after it) have gone out,
    never in the middle of a batch, and must not block (every client waits). A protocol,
    so :mod:`wsserver.recovery` (which the broadcaster imports for its marks) need not
    import this module to define one."""

    def run(self, broadcaster: Broadcaster) -> None:  # pragma: no cover - interface
        ...


QueueItem = Union[Broadcast, Tuple[Broadcast, ...], Task]


class _Wake:
    """What :meth:`Broadcaster.stop` queues so the thread sees the stop now rather than at
    the end of its wait for the queue (every stop took a quarter of a second)."""

    def run(self, broadcaster: Broadcaster) -> None:
        pass


_WAKE = _Wake()
# bytes of frames the idle ring must drop for the broadcaster to ask the C allocator to return
# free memory (malloc_trim: a few milliseconds, spent while nothing is queued)
_TRIM_AFTER = 1024 * 1024


class Broadcaster:
    """Owns the broadcast queue and the ``wsserver-broadcaster`` thread.

    Thread-safety: ``submit`` may be called from any thread; ``start``/``stop`` from one
    controlling thread. ``stop`` is idempotent and joins with a timeout.
    """

    def __init__(
        self,
        hub: Hub,
        queue_size: int,
        on_slow: Callable[[Connection], None],
        max_batch: int = 64,
        compress_min_size: int = 1024,
    ) -> None:
        self.queue: queue.Queue[QueueItem] = queue.Queue(maxsize=queue_size)
        self._hub = hub
        self._on_slow = on_slow
        self._max_batch = max_batch
        self._compress_min_size = compress_min_size
        self._stop = threading.Event()
        # submit's "not stopped? then put" and the thread's "stopped and empty? then exit" are
        # each done under this lock, so nothing is accepted after the last look at the queue
        self._closing = threading.Lock()
        self._closed = False
        self._thread: threading.Thread | None = None
        # what resumes replayed: live copies still queued behind them are not sent again
        self.replays = ReplayMarks()
        # the room messages delivered last: what a resume replays of those that went out
        # between its history read and its join
        self.recent = RecentMessages()
        # the members of presence rooms as the events delivered so far say
        self.roster = Roster()

    def submit(self, item: QueueItem, timeout: float) -> bool:
        """Queue ``item`` (or several that must be accepted together: one notification to
        several rooms), waiting at most ``timeout`` seconds for room. False if still full
        (or stopping): the caller answers 503 and nothing was accepted."""
        with self._closing:
            if self._closed or self._stop.is_set():
                return False
            try:
                if timeout > 0:
                    self.queue.put(item, timeout=timeout)
                else:
                    self.queue.put_nowait(item)
            except queue.Full:
                return False
            return True

    def submit_nowait(self, item: QueueItem) -> bool:
        """:meth:`submit` that never waits, not even for ``_closing``, which another
        submitter holds while it waits for room: False when the queue is full, that lock is
        busy, or the broadcaster is stopping (nothing was accepted)."""
        if not self._closing.acquire(blocking=False):
            return False
        try:
            if self._closed or self._stop.is_set():
                return False
            try:
                self.queue.put_nowait(item)
            except queue.Full:
                return False
            return True
        finally:
            self._closing.release()

    def start(self) -> None:
        # daemon: the worker must be able to exit even if a stop() join timed out; normal
        # shutdown stops and joins this thread first, after flushing the queue.
        self._thread = threading.Thread(target=self._run, name="wsserver-broadcaster", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def drop_slow(self, conn: Connection) -> None:
        """For tasks: ``conn`` went over its buffer cap on a task's write (close 1008 is
        queued); out of the hub and woken, as after a fan-out's write."""
        self._on_slow(conn)

    def stop(self, timeout: float) -> bool:
        """Deliver what is queued, then end the thread. True if it ended within ``timeout``."""
        self._stop.set()
        try:  # wake the thread from its wait for the queue (a full queue is awake anyway)
            self.queue.put_nowait(_WAKE)
        except queue.Full:
            pass
        thread = self._thread
        if thread is None or thread is threading.current_thread():
            return True
        thread.join(timeout)
        return not thread.is_alive()

    def _run(self) -> None:
        q = self.queue
        next_sync = 0.0
        while True:
            now = time.monotonic()
            if now >= next_sync:
                metrics.sync_connections(self._hub.count(), self._hub.opened)
                next_sync = now + 0.5
            try:
                first = q.get(timeout=0 if self._stop.is_set() else 0.25)
            except queue.Empty:
                if self._stop.is_set():
                    with self._closing:
                        if self.queue.empty():
                            self._closed = True
                            return
                    continue
                if self.replays:  # marks of clients that left before going live
                    self.replays.forget_departed(self._hub.has)
                if self.recent.expire(time.monotonic()) >= _TRIM_AFTER:
                    # the last messages' frames, freed in the middle of some request
                    # thread's heap: given back now, not at the next trim (the memory broker's)
                    allocator.trim()
                continue
            batch: list[Broadcast] = []
            tasks: list[Task] = []
            item: QueueItem | None = first
            while item is not None:
                if isinstance(item, Broadcast):
                    batch.append(item)
                elif isinstance(item, tuple):
                    batch.extend(item)
                else:
                    tasks.append(item)
                if len(batch) >= self._max_batch or len(tasks) >= self._max_batch:
                    break
                try:
                    item = q.get_nowait()
                except queue.Empty:
                    item = None
            # tasks run after the batch they were drained with, not between its messages:
            # a recovery between two notifications would split one write per client into
            # two (what that cost: docs/performance.md, "Hostile clients"). Safe for Resume:
            # what the batch delivered before the client joined is in its history read or
            # in `recent`, and replayed
            self._deliver_safely(batch)
            for task in tasks:
                self._run_task(task)
            metrics.QUEUE_DEPTH.set(q.qsize())

    def _deliver_safely(self, batch: list[Broadcast]) -> None:
        batch = self.roster.filter(batch)
        if not batch:
            return
        try:
            self._deliver(batch)
        except Exception:  # a bug here must not silence every client
            log.exception("broadcast of %d messages failed", len(batch))
        self.recent.record(batch, time.monotonic())

    def _run_task(self, task: Task) -> None:
        try:
            task.run(self)
        except Exception:
            log.exception("broadcaster task %r failed", task)

    def _deliver(self, batch: list[Broadcast]) -> None:
        """Send a batch, grouping consecutive items with the same audience: each group is
        one shared frame list and one write per client, and groups go out in queue order."""
        start = 0
        while start < len(batch):
            room, user = batch[start].room, batch[start].user
            end = start + 1
            while end < len(batch) and batch[end].room == room and batch[end].user == user:
                end += 1
            if user is not None:
                clients = self._hub.user_connections(user)
            elif room is not None:
                clients = self._hub.members(room)
            else:
                clients = self._hub.snapshot()
            if clients:
                self._send(batch[start:end], clients)
            metrics.MESSAGES_OUT.inc(end - start)
            start = end
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "delivered %d messages, oldest queued %.1f ms ago",
                len(batch),
                (time.monotonic() - batch[0].queued_at) * 1000,
            )

    def _send(self, items: list[Broadcast], clients: list[Connection]) -> None:
        frames = [item.frame for item in items]
        total = sum(map(len, frames))
        slow = []
        replays = self.replays
        # permessage-deflate: window bits -> (the compressed twins of `frames`, their bytes),
        # made for the first client that negotiated that window, shared by the others
        packed: dict[int, tuple[list[bytes], int]] | None = None
        sent_bytes = 0
        for conn in clients:
            bits = conn.deflate
            if replays and conn.id in replays:
                keep = replays.unsent(conn.id, items)
                size = sum(map(len, keep))
                result = conn.send_frames(keep, size) if keep else SendResult.OK
            elif bits is None:
                size = total
                result = conn.send_frames(frames, total)
            else:
                if packed is None:
                    packed = {}
                variant = packed.get(bits)
                if variant is None:
                    variant = packed[bits] = self.compressed(frames, bits)
                size = variant[1]
                result = conn.send_frames(variant[0], size, frames)
            if result == SendResult.SLOW:
                slow.append(conn)
            else:
                sent_bytes += size
        delivered = len(clients) - len(slow)
        metrics.DELIVERIES.inc(len(items) * delivered)
        metrics.BYTES_OUT.inc(sent_bytes)
        written = time.monotonic()
        metrics.observe_many(metrics.DELIVERY_LATENCY, [written - item.queued_at for item in items])
        for conn in slow:
            self._on_slow(conn)

    def compressed(self, frames: list[bytes], window_bits: int) -> tuple[list[bytes], int]:
        """What a client that negotiated permessage-deflate with ``window_bits`` is sent for
        ``frames``: each frame's compressed twin, or the frame itself (the same object) when
        it is under the size threshold or does not shrink; and their total length."""
        minimum = self._compress_min_size
        twins = [deflate_frame(frame, window_bits, minimum) for frame in frames]
        return twins, sum(map(len, twins))
