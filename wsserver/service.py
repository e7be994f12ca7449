"""The notification service: one object per app that owns the hub, the broker, the broadcaster
and the flusher, and knows how to start them (after gunicorn forks) and stop them (on SIGTERM).

Why lazy start: threads started in ``create_app`` would be started in gunicorn's master
under ``--preload`` and would not survive the fork. ``ensure_started`` runs in the worker
(from the gunicorn hook in :mod:`wsserver.gunicorn_conf`, or on the first request when the
app is served some other way) and restarts the threads if the process id changed.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Union

from . import audit, metrics
from .auth import AccessDenied, AccessPolicy, Identity
from .broadcaster import Broadcaster, Task
from .brokers import Broker, BrokerUnavailable, Outgoing, make_broker
from .config import Settings
from .connection import Connection, SendResult
from .flusher import Flusher
from .frames import OP_BINARY, OP_TEXT, encode_frame
from .hub import Hub, RoomLimitReached
from .limits import Slots, TokenBucket
from .protocol import (
    CLOSE_GOING_AWAY,
    CLOSE_POLICY_VIOLATION,
    Command,
    CommandError,
    Notification,
    encode_json_frame,
    error_frame,
    parse_command,
)

__all__ = ["BrokerUnavailable", "NotificationService", "Published"]

log = logging.getLogger(__name__)

# error codes that report the server's state, not a client mistake: they never count towards
# WSSERVER_MAX_INVALID_COMMANDS
SERVER_SIDE_ERRORS = frozenset({"busy", "history_unavailable", "queue_full"})


# what a subscribe with ``since`` counts as against WSSERVER_MAX_COMMAND_RATE: it replays up
# to WSSERVER_HISTORY_SIZE messages on the broadcaster thread, which every client waits on
# (measured: 20 clients looping resumes at 20/s each took delivery latency at 1,000 clients
# from p99 54 ms to 179 ms; at a fifth of that rate, see docs/security.md)
RESUME_COST = 5.0


class Published:
    """What ``publish`` accepted: the message id per target (``None`` is everybody) and how
    many deliveries were queued (a client in two target rooms counts twice)."""

    __slots__ = ("ids", "clients")

    def __init__(self, ids: dict[str | None, str], clients: int) -> None:
        self.ids = ids
        self.clients = clients


class NotificationService:
    """Per-app state (``app.extensions["wsserver"]``).

    Thread-safety: ``publish`` and the connection callbacks are called from many request
    threads; ``_lock`` guards start and shutdown, which are idempotent.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.hub = Hub(
            settings.connection_budget,
            settings.max_rooms_per_connection,
            settings.max_connections_per_ip,
        )
        self.policy = AccessPolicy(settings)
        # history replays queued or running: they share the broadcast queue with publishers
        self.resumes = Slots(settings.max_resumes)
        self.flusher: Flusher | None = None
        self.broadcaster: Broadcaster | None = None
        self._lock = threading.Lock()
        self._pid: int | None = None
        self.broker: Broker = make_broker(settings)
        self._shutdown_started = False

    # -- lifecycle -------------------------------------------------------------------------

    def ensure_started(self) -> None:
        """Start the flusher and broadcaster threads in this process, once."""
        pid = os.getpid()
        if self._pid == pid:
            return
        with self._lock:
            if self._pid == pid:
                return
            self.flusher = Flusher()
            self.broadcaster = Broadcaster(self.hub, self.settings.queue_size, self._drop_slow)
            self.flusher.start()
            self.broadcaster.start()
            if self._pid is not None:  # forked after a start: the broker is the parent's
                self.broker = make_broker(self.settings)
            self.broker.start(self.broadcaster, self.hub)
            self._pid = pid
            log.info(
                "wsserver started in pid %d: %d WebSocket connections at most, queue %d, "
                "rebroadcast %s, env %s",
                pid,
                self.hub.capacity,
                self.settings.queue_size,
                "on" if self.settings.rebroadcast else "off",
                self.settings.env,
            )
            log.info("security: %s", self.policy.describe())
            if self.settings.max_resumes * 2 > self.settings.queue_size:
                log.warning(
                    "WSSERVER_MAX_RESUMES=%d is over half of WSSERVER_QUEUE_SIZE=%d: history "
                    "replays can crowd publishers out of the broadcast queue",
                    self.settings.max_resumes,
                    self.settings.queue_size,
                )
            log.info(
                "broker: %s; history %d messages for %gs",
                self.broker.kind,
                self.settings.history_size,
                self.settings.history_ttl,
            )

    def limit_connections(self, worker_threads: int) -> None:
        """Size the connection budget from the threads the worker really has (a user's
        ``--threads`` flag may differ from ``WSSERVER_THREADS``)."""
        room = max(worker_threads - self.settings.http_threads, 1)
        cap = self.settings.max_connections
        self.hub.set_capacity(min(cap, room) if cap else room)

    @property
    def healthy(self) -> bool:
        """Liveness: the delivery threads (and the broker's listener) run, or have not been
        needed yet. A worker whose Redis listener died is not healthy: it would serve a deaf
        audience."""
        if self._pid != os.getpid():
            return True
        b, f = self.broadcaster, self.flusher
        return bool(b and b.alive and f and self.broker.alive)

    @property
    def ready(self) -> bool:
        """Readiness: healthy, taking clients, and the broker connected."""
        return (
            self.healthy and self.hub.accepting and (self._pid != os.getpid() or self.broker.ready)
        )

    def shutdown(self) -> None:
        """Stop taking clients, deliver what is queued, close every client with 1001, wait
        (bounded) for them to go. Idempotent; safe from any thread."""
        with self._lock:
            if self._shutdown_started:
                return
            self._shutdown_started = True
        deadline = time.monotonic() + self.settings.shutdown_timeout
        clients = self.hub.stop_accepting()
        log.info("shutting down: flushing the queue, then closing %d clients", len(clients))
        self.broker.stop()
        if self.broadcaster is not None:
            if not self.broadcaster.stop(max(deadline - time.monotonic(), 0.1) / 2):
                log.warning("broadcast queue not flushed in time")
        for conn in self.hub.snapshot():
            conn.close(CLOSE_GOING_AWAY, "server shutting down")
        while self.hub.count() and time.monotonic() < deadline:
            time.sleep(0.02)
        stragglers = self.hub.snapshot()
        for conn in stragglers:
            conn.abort()
        if stragglers:
            log.warning("%d clients did not answer the close in time; cut", len(stragglers))
        if self.flusher is not None:
            self.flusher.stop()

    # -- publishing ------------------------------------------------------------------------

    def publish(self, notification: Notification) -> Published | None:
        """Publish ``notification`` to its audience through the broker: one message per
        target room, each numbered by that room's history. None when the local queue stayed
        full for ``enqueue_timeout`` (nothing was accepted: answer 503); raises
        :class:`BrokerUnavailable` when the broker cannot take it (also a 503)."""
        self.ensure_started()
        targets: tuple[str | None, ...] = notification.rooms or (None,)
        now_ms = int(time.time() * 1000)
        messages = tuple(
            Outgoing(room, notification.user, notification.envelope_prefix(room, now_ms))
            for room in targets
        )
        try:
            ids = self.broker.publish(messages, self.settings.enqueue_timeout)
        except BrokerUnavailable:
            metrics.PUBLISH_REJECTED.labels("broker_unavailable").inc()
            raise
        if ids is None:
            self._rejected()
            return None
        if notification.user is not None:
            clients = len(self.hub.user_connections(notification.user))
        elif notification.rooms is None:
            clients = self.hub.count()
        else:
            counts = self.hub.room_counts()
            clients = sum(counts.get(room, 0) for room in notification.rooms)
        return Published(dict(zip(targets, ids)), clients)

    def _rejected(self) -> None:
        metrics.PUBLISH_REJECTED.labels("queue_full").inc()
        return None

    def rooms(self) -> dict[str, int]:
        return self.hub.room_counts()

    @property
    def queue_depth(self) -> int:
        return self.broadcaster.queue.qsize() if self.broadcaster else 0

    # -- connection callbacks --------------------------------------------------------------

    def new_connection(self, sock, remote: str, identity: Identity | None = None) -> Connection:  # type: ignore[no-untyped-def]
        self.ensure_started()
        assert self.flusher is not None
        if self.settings.send_buffer:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.settings.send_buffer)
        conn = Connection(
            self.hub.next_id(), sock, remote, self.settings.client_buffer, self.flusher
        )
        if identity is not None:
            conn.identity, conn.user = identity, identity.user
        rate = self.settings.max_command_rate
        # a client that reconnects may resume every room it may be in at once
        burst = self.settings.max_rooms_per_connection * RESUME_COST + 2 * rate
        conn.commands = TokenBucket(rate, burst)
        return conn

    def on_client_message(self, conn: Connection, payload: Union[str, bytes]) -> bool:
        """A complete message from a client: a command (a JSON object with a ``type``), or
        the original's free-form message, rebroadcast to everybody if enabled. True when the
        message was handed over for relay (its echo comes back to this client: see
        :data:`wsserver.session.OnMessage`); False when it was not (answered here, or refused)."""
        metrics.MESSAGES_IN.inc()
        if isinstance(payload, str):
            try:
                command = parse_command(payload)
            except CommandError as exc:
                if self._over_command_rate(conn):
                    return False
                self._command_failed(conn, exc.code, exc.reason)
                return False
            if command is not None:
                resuming = command.type == "subscribe" and command.since is not None
                if self._over_command_rate(conn, RESUME_COST if resuming else 1.0):
                    return False
                conn.invalid_commands = 0
                self._run_command(conn, command)
                return False
        if not self.settings.rebroadcast:
            # answered like a command, so counted like one: a flood of them is not answered
            if self._over_command_rate(conn):
                return False
            conn.send(
                error_frame("rebroadcast_disabled", "this server does not relay client messages")
            )
            return False
        if isinstance(payload, str):
            frame = encode_frame(OP_TEXT, payload.encode("utf-8"))
        else:
            frame = encode_frame(OP_BINARY, payload)
        if not self.broker.relay(frame, self.settings.enqueue_timeout):
            self._rejected()
            conn.send(error_frame("queue_full", "server busy; message not relayed"))
            return False
        return True

    def _over_command_rate(self, conn: Connection, cost: float = 1.0) -> bool:
        """Count a command (``cost`` commands' worth) against the connection's
        ``max_command_rate``; past it, close the connection with 1008 (True: the command is
        not run)."""
        if conn.commands.take(cost=cost):
            return False
        rate = self.settings.max_command_rate
        text = f"commands over {rate:g}/s (WSSERVER_MAX_COMMAND_RATE)"
        if conn.close(CLOSE_POLICY_VIOLATION, text):
            audit.closed("command_rate", conn.remote, f"WSSERVER_MAX_COMMAND_RATE={rate:g}")
        return True

    def subscribe(self, conn: Connection, room: str) -> None:
        """Join ``room`` (idempotent); raises :class:`CommandError` for a private room the
        connection's token does not grant, or past the room limit."""
        self._check_join(conn, room)
        try:
            self.hub.subscribe(conn, room)
        except RoomLimitReached:
            raise self._room_limit() from None

    def _check_join(self, conn: Connection, room: str) -> None:
        if not self.policy.may_join(conn.identity, room):
            raise CommandError("room_forbidden", f"joining {room!r} needs a token that grants it")

    def _room_limit(self) -> CommandError:
        return CommandError(
            "too_many_rooms",
            f"a connection may be in at most {self.settings.max_rooms_per_connection} rooms",
        )

    def resume(self, conn: Connection, room: str, since: str) -> None:
        """Join ``room`` after replaying what ``conn`` missed since id ``since``. Runs as a
        task in the broadcaster thread, between two fan-outs, so the replay and the live
        stream meet with no gap and no duplicate (see :class:`Resume`). Raises
        :class:`CommandError` if the room is forbidden, or ``busy`` when no resume slot
        frees up (``max_resumes`` in the worker, one per connection) or the queue stays full
        within ``enqueue_timeout``.

        Why the slots: a resume is a task on the broadcast queue, which publishers need; a
        client looping ``subscribe`` with ``since`` could otherwise fill it (POST /notify
        then answered 503). Waiting for a slot happens on the connection's own thread, so a
        client that sends faster than its replays run is simply not read meanwhile."""
        self._check_join(conn, room)
        assert self.broadcaster is not None
        wait = self.settings.enqueue_timeout
        blocked = self.resumes.acquire(conn.id, wait)
        if blocked is not None:
            raise self._resume_busy(conn, blocked)
        if not self.broadcaster.submit(Resume(self, conn, room, since), wait):
            self.resumes.release(conn.id)
            queue_size = self.settings.queue_size
            audit.refused("queue_full", conn.remote, f"WSSERVER_QUEUE_SIZE={queue_size}")
            raise CommandError("busy", "the server is too busy to resume now; retry")

    def _resume_busy(self, conn: Connection, blocked: str) -> CommandError:
        limit = self.settings.max_resumes
        if blocked == "owner":
            reason = "this connection's previous resume is still running; retry"
            detail = "one resume at a time per connection"
        else:
            reason = f"{limit} resumes are running (WSSERVER_MAX_RESUMES); retry"
            detail = f"WSSERVER_MAX_RESUMES={limit}"
        audit.refused("resume_busy", conn.remote, detail)
        return CommandError("busy", reason)

    def _run_command(self, conn: Connection, command: Command) -> None:
        if command.type == "ping":
            conn.send(encode_json_frame({"type": "pong"}))
            return
        if command.type == "refresh":
            try:
                conn.identity = self.policy.refresh(conn.identity, command.token)
            except AccessDenied as exc:
                self._command_failed(conn, exc.code, exc.reason)
                return
            conn.send(
                encode_json_frame({"type": "refreshed", "exp": int(conn.identity.expires_at)})
            )
            return
        room = command.room
        assert room is not None
        if command.type == "subscribe":
            try:
                if command.since is not None:
                    self.resume(conn, room, command.since)  # the task replies
                    return
                self.subscribe(conn, room)
            except CommandError as exc:
                if exc.code in SERVER_SIDE_ERRORS:  # our overload, not the client's mistake
                    conn.send(error_frame(exc.code, exc.reason, room))
                else:
                    self._command_failed(conn, exc.code, exc.reason, room)
                return
            conn.send(encode_json_frame({"type": "subscribed", "room": room}))
        else:
            self.hub.unsubscribe(conn, room)
            conn.send(encode_json_frame({"type": "unsubscribed", "room": room}))

    def _command_failed(
        self, conn: Connection, code: str, reason: str, room: str | None = None
    ) -> None:
        """Answer a bad command with an error frame; a client that keeps sending bad
        commands (past ``max_invalid_commands`` in a row) is closed with 1008."""
        conn.invalid_commands += 1
        limit = self.settings.max_invalid_commands
        if conn.invalid_commands > limit:
            if conn.close(CLOSE_POLICY_VIOLATION, "too many invalid commands"):
                audit.closed(
                    "invalid_commands", conn.remote, f"WSSERVER_MAX_INVALID_COMMANDS={limit}"
                )
            return
        conn.send(error_frame(code, reason, room))

    def _drop_slow(self, conn: Connection) -> None:
        """Broadcaster callback (and the resume's): ``conn`` passed its buffer cap and has
        close 1008 queued. Out of the hub at once, counted once, its thread woken."""
        self.report_slow(conn)
        conn.wake()

    def report_slow(self, conn: Connection) -> None:
        """Count and log a slow consumer once: the first caller that takes it out of the hub
        does. The connection's own thread calls it on the way out too, for a client that
        went over its cap on a reply (a pong, a command's answer) rather than a broadcast."""
        if self.hub.remove(conn):
            metrics.SLOW_CONSUMERS.inc()
            cap = self.settings.client_buffer
            audit.closed("slow_consumer", conn.remote, f"WSSERVER_CLIENT_BUFFER={cap}")


class Resume(Task):
    """Replay a room's history after ``since`` to one client, then join it to the room.

    Run by the broadcaster thread, after the batch it was drained with: every message
    delivered before it (the client was not yet a member, so it got none of them) was in
    history before it was queued, so the history read here contains all of them; messages
    still queued reach the client live. A message both in history and still queued (published
    between the two) is marked replayed so the broadcaster skips its live copy for this
    client."""

    def __init__(
        self, service: NotificationService, conn: Connection, room: str, since: str
    ) -> None:
        self.service, self.conn, self.room, self.since = service, conn, room, since

    def run(self, broadcaster: Broadcaster) -> None:
        try:
            self._replay(broadcaster)
        finally:
            self.service.resumes.release(self.conn.id)

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
            service.hub.subscribe(conn, room)
        except RoomLimitReached:
            exc = service._room_limit()
            conn.send(error_frame(exc.code, exc.reason, room))
            return
        missed = len(recovery.frames) if recovery.recovered else 0
        reply = {"type": "subscribed", "room": room, "recovered": recovery.recovered}
        result = conn.send(encode_json_frame({**reply, "missed": missed}))
        if missed and result == SendResult.OK:
            result = conn.send_frames([frame for _, frame in recovery.frames])
            broadcaster.mark_replayed(conn.id, room, recovery.frames[-1][0])
        if result == SendResult.SLOW:
            # fell its buffer behind on the replay: dropped like any slow consumer
            service._drop_slow(conn)
