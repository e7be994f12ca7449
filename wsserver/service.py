"""The notification service: one object per app that owns the hub, the broadcaster and the
flusher, and knows how to start them (after gunicorn forks) and stop them (on SIGTERM).

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

from .auth import AccessDenied, AccessPolicy, Identity
from .broadcaster import Broadcast, Broadcaster
from .config import Settings
from .connection import Connection
from .flusher import Flusher
from .frames import OP_BINARY, OP_TEXT, encode_frame
from .hub import Hub, RoomLimitReached
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

__all__ = ["NotificationService", "Published"]

log = logging.getLogger(__name__)


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
    threads; counters are guarded by ``_lock``; start/shutdown are idempotent.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.hub = Hub(
            settings.connection_budget,
            settings.max_rooms_per_connection,
            settings.max_connections_per_ip,
        )
        self.policy = AccessPolicy(settings)
        self.flusher: Flusher | None = None
        self.broadcaster: Broadcaster | None = None
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._seq: dict[str | None, int] = {}  # last message id per room (None: everybody)
        self._publish_lock = threading.Lock()
        self._shutdown_started = False
        self.started_at = time.time()
        self.slow_consumers = 0
        self.rejected_full = 0
        self.connections_total = 0

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

    def limit_connections(self, worker_threads: int) -> None:
        """Size the connection budget from the threads the worker really has (a user's
        ``--threads`` flag may differ from ``WSSERVER_THREADS``)."""
        room = max(worker_threads - self.settings.http_threads, 1)
        cap = self.settings.max_connections
        self.hub.set_capacity(min(cap, room) if cap else room)

    @property
    def healthy(self) -> bool:
        """Liveness: the delivery threads run (or have not been needed yet)."""
        if self._pid != os.getpid():
            return True
        b, f = self.broadcaster, self.flusher
        return bool(b and b.alive and f)

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
        """Queue ``notification`` for its audience: one message per target room, each with
        the next id of that room. None when the queue stayed full for ``enqueue_timeout``:
        nothing was accepted (answer 503) and no id was used up.

        Why a lock around numbering and queueing: ids must reach clients in increasing
        order per room, so a later id may not overtake an earlier one into the queue."""
        self.ensure_started()
        assert self.broadcaster is not None
        targets: tuple[str | None, ...] = notification.rooms or (None,)
        user = notification.user
        timeout = self.settings.enqueue_timeout
        deadline = time.monotonic() + timeout
        if not self._publish_lock.acquire(timeout=timeout):
            return self._rejected()
        try:
            # ids count per audience: per room, per user ("user:<sub>"), or the everybody stream
            keys = {room: (f"user:{user}" if user is not None else room) for room in targets}
            ids = {room: str(self._seq.get(keys[room], 0) + 1) for room in targets}
            now_ms = int(time.time() * 1000)
            queued_at = time.monotonic()
            items = tuple(
                Broadcast(
                    encode_json_frame(notification.envelope(ids[room], room, now_ms)),
                    queued_at,
                    room,
                    user,
                )
                for room in targets
            )
            left = max(deadline - time.monotonic(), 0.0)
            if not self.broadcaster.submit(items[0] if len(items) == 1 else items, left):
                return self._rejected()
            for room in targets:
                self._seq[keys[room]] = int(ids[room])
        finally:
            self._publish_lock.release()
        if user is not None:
            clients = len(self.hub.user_connections(user))
        elif notification.rooms is None:
            clients = self.hub.count()
        else:
            counts = self.hub.room_counts()
            clients = sum(counts.get(room, 0) for room in notification.rooms)
        return Published(ids, clients)

    def _rejected(self) -> None:
        with self._lock:
            self.rejected_full += 1
        return None

    def _submit(self, frame: bytes) -> bool:
        assert self.broadcaster is not None
        if self.broadcaster.submit(Broadcast(frame, time.monotonic()), self.settings.enqueue_timeout):
            return True
        self._rejected()
        return False

    def rooms(self) -> dict[str, int]:
        return self.hub.room_counts()

    @property
    def queue_depth(self) -> int:
        return self.broadcaster.queue.qsize() if self.broadcaster else 0

    # -- connection callbacks --------------------------------------------------------------

    def new_connection(self, sock, remote: str, identity: Identity | None = None) -> Connection:  # type: ignore[no-untyped-def]
        self.ensure_started()
        assert self.flusher is not None
        with self._lock:
            self.connections_total += 1
        if self.settings.send_buffer:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.settings.send_buffer)
        conn = Connection(self.hub.next_id(), sock, remote, self.settings.client_buffer, self.flusher)
        if identity is not None:
            conn.identity, conn.user = identity, identity.user
        return conn

    def on_client_message(self, conn: Connection, payload: Union[str, bytes]) -> None:
        """A complete message from a client: a command (a JSON object with a ``type``), or
        the original's free-form message, rebroadcast to everybody if enabled."""
        if isinstance(payload, str):
            try:
                command = parse_command(payload)
            except CommandError as exc:
                self._command_failed(conn, exc.code, exc.reason)
                return
            if command is not None:
                conn.invalid_commands = 0
                self._run_command(conn, command)
                return
        if not self.settings.rebroadcast:
            conn.send(
                error_frame("rebroadcast_disabled", "this server does not relay client messages")
            )
            return
        if isinstance(payload, str):
            frame = encode_frame(OP_TEXT, payload.encode("utf-8"))
        else:
            frame = encode_frame(OP_BINARY, payload)
        if not self._submit(frame):
            conn.send(error_frame("queue_full", "server busy; message not relayed"))

    def subscribe(self, conn: Connection, room: str) -> None:
        """Join ``room`` (idempotent); raises :class:`CommandError` for a private room the
        connection's token does not grant, or past the room limit."""
        if not self.policy.may_join(conn.identity, room):
            raise CommandError("room_forbidden", f"joining {room!r} needs a token that grants it")
        try:
            self.hub.subscribe(conn, room)
        except RoomLimitReached:
            raise CommandError(
                "too_many_rooms",
                f"a connection may be in at most {self.settings.max_rooms_per_connection} rooms",
            ) from None

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
            conn.send(encode_json_frame({"type": "refreshed", "exp": int(conn.identity.expires_at)}))
            return
        room = command.room
        assert room is not None
        if command.type == "subscribe":
            try:
                self.subscribe(conn, room)
            except CommandError as exc:
                self._command_failed(conn, exc.code, exc.reason)
                return
            reply: dict = {"type": "subscribed", "room": room}
            if command.since is not None:
                # no history is kept yet: nothing can be replayed, say so
                reply.update(recovered=False, missed=0)
            conn.send(encode_json_frame(reply))
        else:
            self.hub.unsubscribe(conn, room)
            conn.send(encode_json_frame({"type": "unsubscribed", "room": room}))

    def _command_failed(self, conn: Connection, code: str, reason: str) -> None:
        """Answer a bad command with an error frame; a client that keeps sending bad
        commands (past ``max_invalid_commands`` in a row) is closed with 1008."""
        conn.invalid_commands += 1
        if conn.invalid_commands > self.settings.max_invalid_commands:
            conn.close(CLOSE_POLICY_VIOLATION, "too many invalid commands")
            return
        conn.send(error_frame(code, reason))

    def _drop_slow(self, conn: Connection) -> None:
        """Broadcaster callback: ``conn`` passed its buffer cap and has close 1008 queued."""
        if self.hub.remove(conn):
            with self._lock:
                self.slow_consumers += 1
            log.warning(
                "client %d (%s) dropped as a slow consumer: over %d bytes behind",
                conn.id,
                conn.remote,
                self.settings.client_buffer,
            )
        conn.wake()
