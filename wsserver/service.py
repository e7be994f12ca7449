"""The notification service: one object per app that owns the hub, the broker, the broadcaster
and the flusher, and knows how to start them (after gunicorn forks) and stop them (on SIGTERM).
It publishes, makes each new connection, and owns the parts that serve open connections: the
admission rules (:mod:`wsserver.admission`), the client commands (:mod:`wsserver.commands`)
and the resumes (:mod:`wsserver.recovery`).

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
from functools import partial
from typing import Any, Callable

from . import audit, metrics
from .admission import Admission
from .auth import AccessPolicy, Identity
from .broadcaster import Broadcaster
from .brokers import (
    Broker,
    BrokerUnavailable,
    Census,
    Deferred,
    Idempotency,
    Outgoing,
    Repeated,
    WouldBlock,
    make_broker,
)
from .codes import CLOSE_GOING_AWAY, REASON_SHUTTING_DOWN, ErrorCode
from .commands import ClientCommands
from .config import Settings
from .connection import Connection, connection_class
from .exceptions import QueueFull, ShuttingDown
from .flusher import Flusher
from .hub import Hub
from .presence import Presence
from .protocol import Notification
from .proxies import Publishers
from .recovery import Recovery

__all__ = ["BrokerUnavailable", "NotificationService", "Published", "WouldBlock"]

log = logging.getLogger(__name__)


class Published:
    """What ``publish`` accepted: the message id per target (``None`` is everybody) and how
    many clients its audience has (a client in two target rooms counts twice): ``clients``
    across every worker (fresh within a second; this worker's alone with one process),
    ``worker_clients`` on this worker."""

    __slots__ = ("ids", "clients", "worker_clients", "repeated")

    def __init__(
        self,
        ids: dict[str | None, str],
        clients: int,
        worker_clients: int | None = None,
        repeated: bool = False,
    ) -> None:
        self.ids = ids
        self.clients = clients
        self.worker_clients = clients if worker_clients is None else worker_clients
        # True: the idempotency key was used before; ``ids`` are the first publish's and
        # nothing was published now
        self.repeated = repeated


class NotificationService:
    """Per-app state (``app.extensions["wsserver"]``).

    Thread-safety: ``publish`` and the connection callbacks are called from many request
    threads; ``_lock`` guards start and shutdown, which are idempotent. ``broadcaster``,
    ``flusher`` and ``broker`` are replaced when the service starts in a new process: read
    them at each use, never keep them.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.hub = Hub(
            settings.connection_budget,
            settings.max_rooms_per_connection,
            settings.max_connections_per_ip,
        )
        self.policy = AccessPolicy(settings)
        self.admission = Admission(settings, self.policy, self.hub)
        self.publishers = Publishers(settings, self.policy)
        self.recovery = Recovery(self)
        self.presence = Presence(settings.presence_prefix, self.hub)
        self.hub.watch(settings.presence_prefix, self.presence.changed)
        self.commands = ClientCommands(self)
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
            self.broadcaster = Broadcaster(
                self.hub,
                self.settings.queue_size,
                self.drop_slow,
                compress_min_size=self.settings.compression_min_size,
            )
            self.flusher.start()
            self.broadcaster.start()
            if self._pid is not None:  # forked after a start: the broker is the parent's
                self.broker = make_broker(self.settings)
            self.broker.start(self.broadcaster, self.hub)
            self.broker.on_report_lost = self.presence.reannounce
            self.presence.start(self.broker)
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
                self.broker.describe(),
                self.settings.history_size,
                self.settings.history_ttl,
            )

    def limit_connections(self, worker_threads: int) -> None:
        """Size the connection budget from the threads the worker really has (a user's
        ``--threads`` flag may differ from ``WSSERVER_THREADS``)."""
        self.hub.set_capacity(self.settings.connection_budget_for(worker_threads))

    @property
    def healthy(self) -> bool:
        """Liveness: the delivery threads (and the broker's listener) run, or have not been
        needed yet. A worker whose Redis listener died is not healthy: it would serve a deaf
        audience."""
        if self._pid != os.getpid():
            return True
        b, f = self.broadcaster, self.flusher
        return bool(b and b.alive and f and self.broker.alive and self.presence.alive)

    @property
    def ready(self) -> bool:
        """Readiness: healthy, taking clients (not shutting down, not full), and the broker
        connected."""
        return self.not_ready() is None

    @property
    def broker_ready(self) -> bool:
        """The broker delivers (or has not been needed yet in this process)."""
        return self._pid != os.getpid() or self.broker.ready

    def not_ready(self) -> str | None:
        """Why a load balancer should send no traffic here now (None: ready): ``unhealthy``,
        ``shutting_down``, ``server_full`` (upgrades would be refused with that code) or
        ``broker_unavailable`` (publishing would be)."""
        if not self.healthy:
            return "unhealthy"
        if not self.hub.accepting:
            return str(ErrorCode.SHUTTING_DOWN)
        if self.hub.full:
            return str(ErrorCode.SERVER_FULL)
        if not self.broker_ready:
            return str(ErrorCode.BROKER_UNAVAILABLE)
        return None

    def census(self) -> tuple[Census, Census | None]:
        """(this worker's counts, every worker's added up): the second is None when the
        broker has no view of other workers (memory; Redis unreachable)."""
        mine = self.hub.census()
        peers = self.broker.peers()
        return mine, (mine + peers if peers is not None else None)

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop taking clients, deliver what is queued, close every client with 1001, wait
        (bounded: ``timeout``, else ``WSSERVER_SHUTDOWN_TIMEOUT``) for them to go, and cut
        the rest. Idempotent; safe from any thread."""
        with self._lock:
            if self._shutdown_started:
                return
            self._shutdown_started = True
        budget = self.settings.shutdown_timeout if timeout is None else timeout
        deadline = time.monotonic() + budget
        clients = self.hub.stop_accepting()
        log.info("shutting down: flushing the queue, then closing %d clients", len(clients))
        self.presence.stop()  # the broker announces our members' leaves as it stops
        self.broker.stop()
        if self.broadcaster is not None:
            if not self.broadcaster.stop(max(deadline - time.monotonic(), 0.1) / 2):
                log.warning("broadcast queue not flushed in time")
        clients = self.hub.snapshot()
        closed = sum(conn.close(CLOSE_GOING_AWAY, REASON_SHUTTING_DOWN) for conn in clients)
        audit.closed_all("shutting_down", closed, "SIGTERM, WSSERVER_SHUTDOWN_TIMEOUT")
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

    def publish(
        self, notification: Notification, idempotency_key: str | None = None, wait: bool = True
    ) -> Published:
        """Publish ``notification`` to its audience through the broker: one message per
        target room, each numbered by that room's history. Raises a
        :class:`~wsserver.exceptions.PublishRefused` (503):
        :class:`~wsserver.exceptions.QueueFull` when the local queue stayed full for
        ``enqueue_timeout`` (nothing was accepted), :class:`~wsserver.exceptions.ShuttingDown`
        when it refused during shutdown (the broadcaster takes no more messages),
        :class:`BrokerUnavailable` when the broker cannot take it
        (:class:`~wsserver.exceptions.BrokerTimedOut`: it may have).

        The notification's own ``idempotency_key``, else ``idempotency_key``: a key already
        used within ``WSSERVER_HISTORY_TTL`` publishes nothing and answers the first ids
        (``repeated``); used for another notification, a 422 :class:`BadRequest`.

        ``wait`` False: never wait (the worker's main thread publishes this way): raises
        :class:`WouldBlock`, having published nothing, where it would wait for a lock, queue
        room, the broker's network or the service's start; with Redis, :class:`Deferred`
        (nothing sent yet), whose ``finish(reply)`` answers what this would have."""
        self._can_start(wait)
        key = notification.idempotency_key or idempotency_key
        idempotency = None if key is None else Idempotency(key, notification.fingerprint())
        targets: tuple[str | None, ...] = notification.rooms or (None,)
        now_ms = int(time.time() * 1000)
        messages = tuple(
            Outgoing(room, notification.user, notification.envelope_prefix(room, now_ms))
            for room in targets
        )
        try:
            ids = self._broker_publish(messages, idempotency, 1, wait)
        except Deferred as deferred:  # Redis on the worker's main thread: the rest comes later
            raise deferred.wrap(
                lambda finish, reply: self._published(notification, targets, finish(reply))
            ) from None
        return self._published(notification, targets, ids)

    def _published(
        self, notification: Notification, targets: tuple[str | None, ...], ids: list[str]
    ) -> Published:
        mine = self.hub.audience(notification.rooms, notification.user)
        peers = self.broker.peers()
        clients = mine + (peers.audience(notification.rooms, notification.user) if peers else 0)
        return Published(dict(zip(targets, ids)), clients, mine, isinstance(ids, Repeated))

    def publish_many(
        self, notifications: list[Notification], wait: bool = True
    ) -> list[Published]:
        """Publish a batch of notifications without idempotency keys in one broker call
        (one lock, one queue item; with Redis one script round trip instead of one per
        notification), atomically: all are published or none (the refusals of
        :meth:`publish`). Answers one :class:`Published` per notification, in order.

        Why: a batch of 50 paid 50 broker calls, each a Redis round trip, which made the
        Redis broker 2.5-3.5x the memory broker per notification (docs/performance.md,
        "Publish path"). ``wait``: as for :meth:`publish`."""
        self._can_start(wait)
        now_ms = int(time.time() * 1000)
        messages: list[Outgoing] = []
        targets: list[tuple[str | None, ...]] = []
        for notification in notifications:
            rooms: tuple[str | None, ...] = notification.rooms or (None,)
            targets.append(rooms)
            messages.extend(
                Outgoing(room, notification.user, notification.envelope_prefix(room, now_ms))
                for room in rooms
            )
        try:
            ids = self._broker_publish(tuple(messages), None, len(notifications), wait)
        except Deferred:  # nothing was sent: a batch is published where it may wait
            raise WouldBlock("a batch is not published through a pipeline") from None
        peers = self.broker.peers()
        out: list[Published] = []
        audiences: dict[tuple, tuple[int, int]] = {}  # the same audience, counted once
        start = 0
        for notification, rooms in zip(notifications, targets):
            audience = (notification.rooms, notification.user)
            counts = audiences.get(audience)
            if counts is None:
                mine = self.hub.audience(notification.rooms, notification.user)
                others = peers.audience(notification.rooms, notification.user) if peers else 0
                counts = audiences[audience] = (mine + others, mine)
            end = start + len(rooms)
            out.append(Published(dict(zip(rooms, ids[start:end])), counts[0], counts[1]))
            start = end
        return out

    @property
    def publishes_nowait(self) -> bool:
        """Whether ``publish(..., wait=False)`` can ever publish (the memory broker) or
        raise :class:`Deferred` (Redis through its pipeline), rather than always raise
        :class:`WouldBlock`."""
        return self.broker.publishes_nowait

    def _can_start(self, wait: bool) -> None:
        if wait:
            self.ensure_started()
        elif self._pid != os.getpid():
            raise WouldBlock("the service has not started in this process")

    def _broker_publish(
        self,
        messages: tuple[Outgoing, ...],
        idempotency: Idempotency | None,
        count: int = 1,
        wait: bool = True,
    ) -> list[str]:
        """The broker's publish with :meth:`publish`'s refusals, each counted once per
        notification refused (``count`` of them) in ``wsserver_publish_rejected``; ``wait``
        False: :meth:`Broker.publish_nowait` (:class:`WouldBlock` is not a refusal)."""
        if not wait:
            try:
                return self.broker.publish_nowait(messages, idempotency)
            except Deferred as deferred:
                raise deferred.wrap(partial(self._finish_publish, count=count)) from None
        try:
            ids = self.broker.publish(messages, self.settings.enqueue_timeout, idempotency)
        except BrokerUnavailable:
            metrics.PUBLISH_REJECTED.labels("broker_unavailable").inc(count)
            raise
        if ids is None:
            if not self.hub.accepting:  # shutdown began: the broadcaster takes nothing more
                metrics.PUBLISH_REJECTED.labels("shutting_down").inc(count)
                raise ShuttingDown("SIGTERM, WSSERVER_SHUTDOWN_TIMEOUT")
            self._rejected(count)
            settings = self.settings
            raise QueueFull(
                f"WSSERVER_QUEUE_SIZE={settings.queue_size}, "
                f"WSSERVER_ENQUEUE_TIMEOUT={settings.enqueue_timeout:g}"
            )
        return ids

    @staticmethod
    def _finish_publish(finish: Callable[[Any], list[str]], reply: Any, count: int) -> list[str]:
        """A deferred publish's ids, its broker refusal counted as :meth:`_broker_publish`
        counts it."""
        try:
            return finish(reply)
        except BrokerUnavailable:
            metrics.PUBLISH_REJECTED.labels("broker_unavailable").inc(count)
            raise

    def _rejected(self, count: int = 1) -> None:
        metrics.PUBLISH_REJECTED.labels("queue_full").inc(count)
        return None

    def rooms(self) -> tuple[dict[str, int], dict[str, int] | None]:
        """(this worker's subscribers per room, every worker's; None without a view)."""
        mine = self.hub.room_counts()
        peers = self.broker.peers()
        if peers is None:
            return mine, None
        return mine, (Census(rooms=mine) + peers).rooms

    def room(self, room: str) -> dict:
        """``GET /rooms/<room>``: its subscribers (every worker's, fresh within a second,
        and this worker's), and for a presence room its members, cluster-wide, as the
        presence events delivered here say (``users`` sorted; ``anonymous``: members
        without a token, one per connection)."""
        mine, cluster = self.rooms()
        counts = cluster if cluster is not None else mine
        body: dict = {
            "room": room,
            "clients": counts.get(room, 0),
            "worker_clients": mine.get(room, 0),
            "scope": "cluster" if cluster is not None else "worker",
            "presence": self.presence.enabled_for(room),
        }
        if body["presence"]:
            broadcaster = self.broadcaster
            users, anonymous = broadcaster.roster.members(room) if broadcaster else ([], 0)
            body["users"], body["anonymous"] = users, anonymous
        return body

    @property
    def queue_depth(self) -> int:
        return self.broadcaster.queue.qsize() if self.broadcaster else 0

    # -- connection callbacks --------------------------------------------------------------

    def new_connection(  # type: ignore[no-untyped-def]
        self, sock, remote: str, identity: Identity | None = None, opening: bool = False
    ) -> Connection:
        """A connection for ``sock``; ``opening``: its 101 is not sent yet, writes queue until
        :meth:`Connection.open`."""
        self.ensure_started()
        assert self.flusher is not None
        if self.settings.send_buffer:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.settings.send_buffer)
        conn = connection_class(sock)(
            self.hub.next_id(), sock, remote, self.settings.client_buffer, self.flusher, opening
        )
        if identity is not None:
            conn.identity, conn.user = identity, identity.user
        conn.commands = self.commands.rate_limiter()
        return conn

    def drop_slow(self, conn: Connection) -> None:
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

