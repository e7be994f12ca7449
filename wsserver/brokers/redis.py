"""The Redis broker: any number of workers on any number of hosts form one service.

Publishing is one Lua script, atomic in Redis: for each target audience it appends the message
to that audience's stream (``XADD``, capped at ``WSSERVER_HISTORY_SIZE`` entries and trimmed to
``WSSERVER_HISTORY_TTL``; the stream id *is* the message id), then ``PUBLISH``es it on one
channel every worker listens to. One channel and an atomic script mean every worker sees
messages in the order the streams numbered them: in order per room, on every worker.

Each worker runs a listener thread (``wsserver-redis-listener``, a redis-py ``PubSub`` read
with :func:`~wsserver.brokers.rediswire.drain`, each wait at most 0.2 s, which bounds how long
a stop waits) that hands messages to its broadcaster, what arrived together as one queue item,
reconnects with backoff and re-subscribes after Redis restarts. The publish script is sent as
a hand-packed ``EVALSHA`` (:class:`~wsserver.brokers.rediswire.PackedScript`): the two paths
every notification takes skip redis-py's client layer, not its connections or its parser.

Several workers are one service to every observer: a reporter thread
(``wsserver-redis-reporter``) writes this worker's counts (clients, per room, per user, its
budget) every ``_REPORT_EVERY`` (0.25 s) under a key that expires after ``_REPORT_TTL_MS``
(1.5 s), and in the same round reads every other worker's report into a local view
(:meth:`RedisBroker.peers`), which ``GET /``, ``GET /rooms`` and ``POST /notify`` add to this
worker's live counts without a Redis call of their own. A peer's numbers are therefore at
most two periods old (0.5 s, plus the round trips); a stopped worker deletes its report at
once; a killed one's expires within the TTL and leaves every view within TTL + one period
(1.75 s). The big fields (rooms, users) are rewritten, and read by the others, only when the
worker's hub changed (``gen``); otherwise a round only refreshes the expiry. Liveness is
the report key's own expiry, kept by Redis's clock, so hosts' clocks need not agree.

While Redis is down, ``publish`` raises :class:`BrokerUnavailable` (``POST /notify`` answers
503: nothing is accepted that cannot be delivered), ``ready`` is False (``/readyz`` 503).
While Redis hangs (a slow command, ``DEBUG SLEEP``, a stopped process), a publish times out
after 2 s (:class:`~wsserver.exceptions.BrokerTimedOut`, also 503) but stays queued in Redis,
which runs it when it wakes: the notification *is* published then, live delivery included.
So a 503 ``broker_unavailable`` may have been published; a retry carrying the same idempotency
key is answered with the first ids and publishes nothing (see ``_IDEMPOTENT_HEAD``).

A Redis that hangs (the connection stays up, nothing answers) is caught as soon as: ``ready``
turns False when any Redis call fails or times out (for ``_DEGRADED_FOR``, 2 s, after the
last failure, or until a report round that began after it succeeds), and while the
reporter's round has been waiting for Redis longer than ``_STALLED_AFTER`` (0.4 s): within
~0.7 s of a hang's start, not after the first 2 s ``socket_timeout``.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import random
import socket
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any, Callable

import redis

from .. import metrics
from ..broadcaster import Broadcast
from ..codes import CLOSE_INTERNAL_ERROR, REASON_MISSED_MESSAGES
from ..control import WAIT, Control, ControlTask, Outcome
from ..exceptions import BrokerTimedOut
from ..presence import (
    LEAVE,
    RESET,
    bus_payload,
    parse_payload,
    presence_frame,
    rooms_of_payloads,
)
from . import (
    Broker,
    BrokerUnavailable,
    Census,
    Deferred,
    Idempotency,
    Outgoing,
    Recovery,
    Repeated,
    RoomHistory,
    WouldBlock,
    audience_key,
    envelope_frame,
    key_reused,
    order_of,
    page_of,
    rediswire,
)

if TYPE_CHECKING:
    from ..broadcaster import Broadcaster, QueueItem
    from ..config import Settings
    from ..hub import Hub

__all__ = ["RedisBroker", "check_redis"]

log = logging.getLogger(__name__)

# a message's meta ([room, user, prefix]) as json.dumps(..., ensure_ascii=False) writes it,
# without building an encoder per call
_encode_meta = json.JSONEncoder(ensure_ascii=False).encode

# KEYS: one stream per message, then the bus log (last). ARGV: channel, maxlen, ttl_ms, then a
# meta string per message. Returns the ids. A message on the channel is "<bus id> <id> <meta>"
# (the bus id: that message's entry in the bus log); a relayed raw frame is "!<frame>".
_PUBLISH = """
local channel, maxlen, ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local bus = KEYS[#KEYS]
local now = redis.call('TIME')
local horizon = (tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)) - ttl
local ids = {}
for i = 1, #KEYS - 1 do
  local key, meta = KEYS[i], ARGV[3 + i]
  local id = redis.call('XADD', key, 'MAXLEN', maxlen, '*', 'm', meta)
  redis.call('XTRIM', key, 'MINID', horizon)
  redis.call('PEXPIRE', key, ttl)
  local seq = redis.call('XADD', bus, 'MAXLEN', '~', %d, '*', 'k', key, 'i', id)
  redis.call('PUBLISH', channel, seq .. ' ' .. id .. ' ' .. meta)
  ids[i] = id
end
return ids
"""

# the bus log: one compact entry (stream key, id) per message published, in publish order
# across every audience, kept for the last _BUS_LENGTH messages (at least: trimmed with '~').
# A worker whose subscription dropped replays from it what it missed (see _catch_up).
_BUS_LENGTH = 10_000
# a catch-up reads the log this many entries at a time, and gives up (a gap: its clients are
# closed to resume) when it has not caught up within _REPLAY_BUDGET seconds
_REPLAY_PAGE = 500
_REPLAY_BUDGET = 2.0
# the listener's reconnect delay: starts at _BACKOFF_MIN, doubles up to _BACKOFF_MAX; each wait
# is drawn from [half, all] of it so that workers cut off together do not come back together
_BACKOFF_MIN = 0.1
_BACKOFF_MAX = 2.0
# every Redis command's bound (connect, reply): a publish past it is answered 503
_SOCKET_TIMEOUT = 2.0
# -- idempotency (h-idem): a second script, composed of a head, _PUBLISH untouched (run as a
# closure) and a tail; _PUBLISH itself does not change. The caller appends the idempotency
# record's key to KEYS and the fingerprint and TTL (ms) to ARGV; the head removes them before
# _PUBLISH reads KEYS and ARGV. A recorded key: {'=', first ids...} (nothing published) or
# {'!'} (recorded for another fingerprint). Otherwise _PUBLISH runs and the key is recorded
# ("<fingerprint> <id> <id>...") in the same atomic script, so a publish that timed out on
# our side and ran later in Redis is found by the retry.
_IDEMPOTENT_HEAD = """
local idem_ttl = tonumber(table.remove(ARGV))
local idem_fp = table.remove(ARGV)
local idem_key = table.remove(KEYS)
local idem_seen = redis.call('GET', idem_key)
if idem_seen then
  local first = {}
  for word in string.gmatch(idem_seen, '%S+') do first[#first + 1] = word end
  if first[1] ~= idem_fp then return {'!'} end
  first[1] = '='
  return first
end
local idem_ids = (function()
"""
_IDEMPOTENT_TAIL = """
end)()
redis.call('SET', idem_key, idem_fp .. ' ' .. table.concat(idem_ids, ' '), 'PX', idem_ttl, 'NX')
return idem_ids
"""
_PUBLISH_IDEMPOTENT = _IDEMPOTENT_HEAD + (_PUBLISH % _BUS_LENGTH) + _IDEMPOTENT_TAIL
# -- end of idempotency

# -- presence (wsserver.presence). Each worker keeps the presence members it holds in a hash,
# <prefix>:presence:<worker>, field "<room>\n<member>" -> the leave event's payload, refreshed by
# the reporter with a longer expiry than its report (_PRESENCE_TTL_MS): a worker is live while
# its report key exists, and a killed worker's hash outlives its report long enough for a
# survivor to announce its members' leaves (_REAP). A member is cluster-wide present while
# some live worker's hash holds it; join and leave are decided in one script against every
# live worker's hash, so two tabs joining on two workers at once announce one join (the
# scripts run one after the other), and the last tab leaving announces the leave. Events go
# on the bus channel as "@<payload>" (no id, no history: see docs/protocol.md, "Presence").
# KEYS: this worker's hash, the workers set. ARGV: channel, prefix, worker, field, payload,
# action, stored (the leave payload), ttl_ms. Returns 1 when the event was published.
_ANNOUNCE = """
local hash, workers = KEYS[1], KEYS[2]
local channel, prefix, me, field = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
if ARGV[6] == 'join' then
  redis.call('HSET', hash, field, ARGV[7])
  redis.call('PEXPIRE', hash, tonumber(ARGV[8]))
else
  redis.call('HDEL', hash, field)
end
for _, w in ipairs(redis.call('ZRANGE', workers, 0, -1)) do
  if w ~= me and redis.call('EXISTS', prefix .. ':worker:' .. w) == 1
     and redis.call('HEXISTS', prefix .. ':presence:' .. w, field) == 1 then
    return 0
  end
end
redis.call('PUBLISH', channel, '@' .. ARGV[5])
return 1
"""
# A dead worker's members (or, with ARGV[4] '1', a stopping worker's own): the leave of each
# that no other live worker holds. Run by whichever survivor's reporter sees the worker's
# report gone; atomic, and the hash is deleted in the same step, so exactly one survivor
# announces. -1 when the worker is live after all (a stall that ended). KEYS: the workers set.
# ARGV: channel, prefix, worker, force.
_REAP = """
local channel, prefix, dead, force = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
if force ~= '1' and redis.call('EXISTS', prefix .. ':worker:' .. dead) == 1 then return -1 end
local hash = prefix .. ':presence:' .. dead
local held = redis.call('HGETALL', hash)
redis.call('DEL', hash)
redis.call('ZREM', KEYS[1], dead)
local workers = redis.call('ZRANGE', KEYS[1], 0, -1)
local told = 0
for i = 1, #held, 2 do
  local kept = false
  for _, w in ipairs(workers) do
    if w ~= dead and redis.call('EXISTS', prefix .. ':worker:' .. w) == 1
       and redis.call('HEXISTS', prefix .. ':presence:' .. w, held[i]) == 1 then
      kept = true
      break
    end
  end
  if not kept then
    redis.call('PUBLISH', channel, '@' .. held[i + 1])
    told = told + 1
  end
end
return told
"""
# every live worker's members (their stored leave payloads): a roster's snapshot.
# KEYS: the workers set. ARGV: prefix.
_MEMBERS = """
local out = {}
for _, w in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  if redis.call('EXISTS', ARGV[1] .. ':worker:' .. w) == 1 then
    for _, v in ipairs(redis.call('HVALS', ARGV[1] .. ':presence:' .. w)) do
      out[#out + 1] = v
    end
  end
end
return out
"""
# a worker's presence hash outlives its report (1.5 s) by this much: the time survivors have
# to see the report gone and announce the dead worker's leaves
_PRESENCE_TTL_MS = 10_000
# -- end of presence
# -- control messages (POST /disconnect, POST /unsubscribe; wsserver.control). KEYS: the bus
# log, the workers set. ARGV: channel, the control message's JSON. Logged in the bus log (field
# 'c', no stream: it is in no room's history) so a worker whose subscription dropped replays it
# with the notifications around it, and published as "<bus id> ?<json>" on the one channel, so
# every worker sees it in order with the notifications. Returns the live workers, who are
# expected to report their counts.
_CONTROL = """
local seq = redis.call('XADD', KEYS[1], 'MAXLEN', '~', %d, '*', 'c', ARGV[2])
redis.call('PUBLISH', ARGV[1], seq .. ' ?' .. ARGV[2])
return redis.call('ZRANGE', KEYS[2], 0, -1)
"""
# a worker's count goes to the requester's reply list ("<worker> <count>"), which expires
# after this long however the request ended (a late reply, a catch-up's replay)
_REPLY_TTL_MS = 10_000
# each wait for a reply (BLPOP) is below the client's 2 s socket timeout
_REPLY_POLL = 0.5

# how long the listener waits for a message before checking whether it should stop: it bounds
# how long shutdown waits for this thread (a 1 s poll made every stop take a second)
_POLL = 0.2
# the listener queues the messages it finds already received together, up to this many in
# one queue item (the broadcaster's own batch size)
_OUTBOX_MAX = 64
# with sentinels: how often the listener asks them which server is the master. A master that
# is paused (SIGSTOP, a frozen VM) keeps its sockets open: the sentinels promote a replica and
# publishing moves there, while a subscription to the old one would wait, deaf, for as long as
# the pause lasts (messages answered 200 meanwhile never delivered live: seen by scripts/soak)
_MASTER_CHECK = 0.5
# counts: written and read every _REPORT_EVERY seconds; a report lives _REPORT_TTL_MS, so a
# killed worker's numbers are gone from every view within TTL + one period (1.75 s < 2 s),
# and a worker may stall for TTL - period (1.25 s) before the others stop counting it
_REPORT_EVERY = 0.25
_REPORT_TTL_MS = 1500
# a view of the others older than this is not shown (Redis unreachable, reporter stalled)
_VIEW_STALE = 2.0
# health: not ready for this long after a failed Redis call (a round that began after it and
# succeeded ends it sooner), and while a report round has waited for Redis this long (a round
# takes a millisecond; a hung Redis answers nothing until its 2 s socket timeout)
_DEGRADED_FOR = 2.0
_STALLED_AFTER = 0.4


def check_redis(url: str, timeout: float = 2.0) -> None:
    """Raise ``redis.RedisError``/``OSError`` unless Redis at ``url`` answers a PING."""
    client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    try:
        client.ping()
    finally:
        client.close()


class RedisBroker(Broker):
    """Thread-safety: redis-py clients are thread-safe (a connection pool), and so is the
    publish scripts' connection stack (``rediswire.Connections``); the listener's PubSub
    object, its outbox and its bus position are the listener thread's only."""

    kind = "redis"

    def __init__(self, settings: Settings) -> None:
        self._url = settings.redis_url
        self._sentinels = settings.redis_sentinels
        self._master = settings.redis_sentinel_master
        self._prefix = settings.redis_prefix
        self._channel = f"{self._prefix}:bus"
        # one entry more than the history size: a client that missed exactly history_size
        # messages resumes from the entry before them, which must still be there to vouch
        self._maxlen = settings.history_size + 1
        self._ttl_ms = max(int(settings.history_ttl * 1000), 1)
        self._redis = self._client()
        self._register_scripts()
        self._bus = f"{self._prefix}:log"
        self._presence = bool(settings.presence_prefix)
        # called (reporter thread) when Redis no longer had our report: what we announced
        # may be gone with it (wsserver.presence.Presence.reannounce)
        self.on_report_lost: Callable[[], None] | None = None
        # (reply list, count) from this worker's control tasks, pushed by the replier thread
        self._replies: queue.Queue[tuple[str, int]] = queue.Queue()
        self._replier: threading.Thread | None = None
        self._worker = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._stop = threading.Event()
        self._connected = threading.Event()  # set while subscribed: publishing is open
        # the listener's own connection, named so an operator (or a test) can find it in
        # CLIENT LIST: "<prefix>:listener:<worker>"
        self._listener_redis = self._client(
            client_name="".join(c if c.isprintable() and not c.isspace() else "_"
                                for c in f"{self._prefix}:listener:{self._worker}"),
        )
        # the listener thread's own: the bus id of the last message it handed on (or the
        # log's end when it first subscribed), and the log's end at the last catch-up (a
        # message at or before it came by the catch-up: its live copy is skipped)
        self._position: str | None = None
        self._replayed_to: tuple | None = None
        # messages read but not queued yet, and the bus id of the last of them that has one
        self._outbox: list[Broadcast] = []
        self._outbox_position: str | None = None
        self.replayed = 0  # messages a catch-up delivered (tests, logs)
        self.gaps = 0  # catch-ups that could not replay everything (their clients closed)
        self._thread: threading.Thread | None = None
        self._reporter: threading.Thread | None = None
        self._broadcaster: Broadcaster | None = None
        self._hub: Hub | None = None
        self._reported: int | None = None  # the hub version our report holds
        self._ever_reported = False  # a report was written once: its absence is news
        self._known: dict[str, tuple[bytes, Census]] = {}  # peer -> (gen, counts); reporter's
        self._view: tuple[float, Census] | None = None  # (monotonic time read, peers' sum)
        self._total = Census()  # the peers' sum, recomputed when one of them changed
        # health bookkeeping (monotonic times; plain floats, written by any thread)
        self._failed_at = float("-inf")  # the last Redis call that failed or timed out
        self._round_started: float | None = None  # the reporter's round waiting for Redis

    def _register_scripts(self) -> None:
        """The Lua scripts, on the publish client. The two publishes (every notification's)
        are ``EVALSHA`` packed by hand on connections of their own (:mod:`.rediswire`), with
        redis-py's ``Script`` as the fallback that loads a script when Redis answers
        ``NOSCRIPT``; the rest go through redis-py's ``Script``."""
        client = self._redis
        self._connections = rediswire.Connections(client.connection_pool)
        encoder = client.connection_pool.get_encoder()

        def packed(source: str) -> rediswire.PackedScript:
            return rediswire.PackedScript(client.register_script(source), self._connections,
                                          encoder.encoding, encoder.encoding_errors)

        self._script = packed(_PUBLISH % _BUS_LENGTH)
        pool = client.connection_pool
        self._pipeline = (
            rediswire.Pipeline(self._connections, _SOCKET_TIMEOUT)
            if rediswire.Pipeline.supported(pool)
            else None
        )
        self._idempotent = packed(_PUBLISH_IDEMPOTENT)
        self._announce = client.register_script(_ANNOUNCE)
        self._reap = client.register_script(_REAP)
        self._members = client.register_script(_MEMBERS)
        self._control = client.register_script(_CONTROL % _BUS_LENGTH)

    def _client(self, **options: Any) -> redis.Redis:
        """A client of the configured Redis: the URL's, or the sentinels' current master
        (every connection it opens asks them, so each follows a failover). Both the publish
        client (which the reporter shares) and the listener's are made here."""
        from ..config import redis_client

        return redis_client(self._url, self._sentinels, self._master,
                            socket_timeout=_SOCKET_TIMEOUT,
                            socket_connect_timeout=_SOCKET_TIMEOUT, **options)

    def describe(self) -> str:
        """``redis 127.0.0.1:6379/0 prefix wsserver``, or ``redis sentinel master mymaster/0
        via 10.0.0.1:26379,10.0.0.2:26379 prefix wsserver``: where, never who (no password)."""
        pool = self._redis.connection_pool
        kwargs = pool.connection_kwargs
        tls = " (TLS)" if issubclass(pool.connection_class, redis.SSLConnection) else ""
        db = kwargs.get("db", 0)
        if self._sentinels:
            via = ",".join(self._sentinels)
            return f"redis sentinel master {self._master}/{db}{tls} via {via} prefix {self._prefix}"
        if kwargs.get("path"):
            where = f"unix:{kwargs['path']}"
        else:
            where = f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"
        return f"redis {where}/{db}{tls} prefix {self._prefix}"

    # -- lifecycle -------------------------------------------------------------------------

    def start(self, broadcaster: Broadcaster, hub: Hub) -> None:
        self._broadcaster, self._hub = broadcaster, hub
        # daemon: a hung Redis socket must not keep the worker from exiting; stop() ends it
        self._thread = threading.Thread(
            target=self._listen, name="wsserver-redis-listener", daemon=True
        )
        self._thread.start()
        self._reporter = threading.Thread(
            target=self._reporting, name="wsserver-redis-reporter", daemon=True
        )
        self._reporter.start()
        # daemon for the same reason; it only pushes control counts (see _replying)
        self._replier = threading.Thread(
            target=self._replying, name="wsserver-redis-replier", daemon=True
        )
        self._replier.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in (self._thread, self._reporter, self._replier):
            if thread is not None and thread is not threading.current_thread():
                thread.join(3.0)
        try:
            self._redis.delete(self._worker_key)
            if self._presence:  # our members leave now, not when our hash expires
                self._reap(keys=[self._workers_key],
                           args=[self._channel, self._prefix, self._worker, "1"])
            self._redis.zrem(self._workers_key, self._worker)
        except (redis.RedisError, OSError):
            pass
        self._connections.close()
        self._redis.close()
        self._listener_redis.close()

    @property
    def ready(self) -> bool:
        return self._connected.is_set() and self.alive and not self.degraded

    @property
    def degraded(self) -> bool:
        """A Redis call failed or timed out within ``_DEGRADED_FOR`` (and no report round
        that began after it has succeeded), or the reporter has waited on Redis longer
        than ``_STALLED_AFTER``: publishing would fail or take seconds. No I/O."""
        now = time.monotonic()
        started = self._round_started
        if started is not None and now - started > _STALLED_AFTER:
            return True
        return now - self._failed_at < _DEGRADED_FOR

    def _failed(self) -> None:
        """A Redis call failed: count it, and say not ready for a while."""
        self._failed_at = time.monotonic()
        metrics.BROKER_ERRORS.inc()

    @property
    def alive(self) -> bool:
        threads = (self._thread, self._reporter)
        return all(t is not None and t.is_alive() for t in threads)

    def wait_ready(self, timeout: float) -> bool:
        return self._connected.wait(timeout) and self.ready

    # -- publishing ------------------------------------------------------------------------

    def publish(
        self,
        messages: tuple[Outgoing, ...],
        timeout: float,
        idempotency: Idempotency | None = None,
    ) -> list[str] | None:
        """One script call. A timeout is :class:`BrokerTimedOut`: the script was sent and
        may still run (with ``idempotency``, a retry with the same key is then answered
        with its ids); a connection error is :class:`BrokerUnavailable`."""
        if not self._connected.is_set():
            # this worker's listener is not subscribed: it would miss its own message
            raise BrokerUnavailable("redis: not subscribed yet")
        script, keys, args = self._script_call(messages, idempotency)
        try:
            reply = script(keys=keys, args=args)
        except (redis.RedisError, OSError) as exc:
            reply = exc
        return self._published(reply)

    @property
    def publishes_nowait(self) -> bool:  # type: ignore[override]
        """True where the publish scripts can go through a :class:`rediswire.Pipeline`
        (``hiredis``, no TLS): :meth:`publish_nowait` then raises :class:`Deferred`."""
        return self._pipeline is not None

    @property
    def pipeline(self) -> rediswire.Pipeline | None:
        """The pipeline :meth:`publish_nowait` publishes through; its owner's thread drives
        it (sets ``watch``, calls ``on_ready``/``expire``): the worker's main thread."""
        return self._pipeline

    def publish_nowait(
        self, messages: tuple[Outgoing, ...], idempotency: Idempotency | None = None
    ) -> list[str]:
        """Raises :class:`Deferred` with the script call packed for the pipeline, whose
        ``finish(reply)`` answers as :meth:`publish` would (:class:`WouldBlock` on
        ``NOSCRIPT``: the script did not run; the caller publishes where it may wait, and
        redis-py's ``Script`` loads it). :class:`WouldBlock` when the pipeline cannot take a
        command now (no connected connection idle yet, too many in flight, the listener not
        subscribed, stopping): the caller publishes where it may wait, as before."""
        pipeline = self._pipeline
        if (
            pipeline is None
            or not self._connected.is_set()
            or self._stop.is_set()
            or not pipeline.can_send()
        ):
            raise WouldBlock("redis: the pipeline cannot take a publish now")
        script, keys, args = self._script_call(messages, idempotency)
        raise Deferred(pipeline, script.pack(keys, args), self._pipelined)

    def _pipelined(self, reply: Any) -> list[str]:
        if isinstance(reply, redis.ResponseError) and str(reply).startswith("NOSCRIPT"):
            raise WouldBlock("redis: NOSCRIPT (the script is loaded where waiting is allowed)")
        return self._published(reply)

    def _script_call(
        self, messages: tuple[Outgoing, ...], idempotency: Idempotency | None
    ) -> tuple[rediswire.PackedScript, list[str], list[Any]]:
        keys = [self._stream(audience_key(m.room, m.user)) for m in messages]
        keys.append(self._bus)
        metas = [_encode_meta([m.room, m.user, m.prefix]) for m in messages]
        args: list[Any] = [self._channel, self._maxlen, self._ttl_ms, *metas]
        script = self._script
        if idempotency is not None:
            script = self._idempotent
            keys.append(f"{self._prefix}:idem:{idempotency.key}")
            args += [idempotency.fingerprint, self._ttl_ms]
        return script, keys, args

    def _published(self, reply: Any) -> list[str]:
        """The ids of a publish script's ``reply`` (or the error it got), or its refusal."""
        if isinstance(reply, (redis.TimeoutError, TimeoutError)):
            metrics.BROKER_ERRORS.inc()
            raise BrokerTimedOut(f"redis: {reply.__class__.__name__}") from None
        if isinstance(reply, (redis.RedisError, OSError)):
            self._failed()
            raise BrokerUnavailable(f"redis: {reply.__class__.__name__}") from None
        ids = [_text(i) for i in reply]
        if ids and ids[0] == "=":
            return Repeated(ids[1:])
        if ids == ["!"]:
            raise key_reused()
        return ids

    def relay(self, frame: bytes, timeout: float) -> bool:
        if not self._connected.is_set():
            return False
        try:
            self._redis.publish(self._channel, b"!" + frame)
        except (redis.RedisError, OSError):
            self._failed()
            return False
        return True

    def announce(self, room: str, action: str, member: str, user: str | None) -> bool:
        """Record (join) or forget (leave) ``member`` in ``room`` for this worker, and
        publish the event when no other live worker holds it (see ``_ANNOUNCE``)."""
        if not self._connected.is_set() or self._reported is None:
            # not subscribed (we would miss the event), or not in the workers set yet (the
            # others could not see what we hold)
            raise BrokerUnavailable("redis: not ready for presence yet")
        field = f"{room}\n{member}"
        try:
            told = self._announce(
                keys=[self._presence_key(self._worker), self._workers_key],
                args=[self._channel, self._prefix, self._worker, field,
                      bus_payload(room, action, member, user), action,
                      bus_payload(room, LEAVE, member, user), _PRESENCE_TTL_MS],
            )
        except (redis.RedisError, OSError) as exc:
            self._failed()
            raise BrokerUnavailable(f"redis: {exc.__class__.__name__}") from None
        return bool(told)

    def _presence_key(self, worker: str) -> str:
        return f"{self._prefix}:presence:{worker}"

    def _presence_snapshot(self) -> None:
        """Listener thread, once subscribed: every live worker's members, queued as a
        roster reset in bus order (a roster then sends the joins and leaves it missed)."""
        if not self._presence:
            return
        payloads = self._members(keys=[self._workers_key], args=[self._prefix])
        rooms = rooms_of_payloads(payloads)
        self._submit(Broadcast(b"", time.monotonic(), presence=(RESET, rooms)))

    def history(self, room: str, since: str) -> Recovery:
        if order_of(since) is None or "-" not in since:
            return Recovery(False)
        key = self._stream(audience_key(room, None))
        try:
            pipe = self._redis.pipeline(transaction=True)
            pipe.xrange(key, since, since)
            pipe.xrange(key, "(" + since, "+")
            pipe.xinfo_stream(key)
            exact, after, info = pipe.execute()
        except redis.ResponseError:  # no such stream (expired, or Redis restarted)
            return Recovery(False)
        except (redis.RedisError, OSError) as exc:
            self._failed()
            raise BrokerUnavailable(f"redis: {exc.__class__.__name__}") from None
        last_order = order_of(_text(info.get("last-generated-id", b"")))
        wanted = order_of(since)
        if last_order is None or wanted is None or wanted > last_order:
            return Recovery(False)  # an id this stream never gave out
        # trimming removes entries from the head, in order: while `since` itself is still
        # there, everything after it is too (a stream id says nothing of its successor, so a
        # trimmed `since` cannot vouch for the next entry, unless it was the last one)
        lost = not exact and wanted != last_order
        if lost:
            return Recovery(False)
        frames: list[tuple[tuple, bytes]] = []
        for entry_id, fields in after:
            mid = entry_id.decode()
            _room, _user, prefix = json.loads(fields[b"m"])
            frames.append((order_of(mid) or (), envelope_frame(prefix, mid)))
        return Recovery(True, frames)

    def room_history(
        self, room: str, since: str | None, limit: int, timeout: float
    ) -> RoomHistory:
        """One transaction: without ``since`` the newest ``limit`` entries (``XREVRANGE``);
        with it, ``since``'s own entry, at most ``limit`` + 1 after it (the one more says
        whether there are more) and the stream's last id, judged as :meth:`history` judges
        a resume. Bounded by the client's 2 s socket timeout (``timeout`` is the memory
        broker's lock wait; a Redis call cannot be cut shorter than its socket timeout)."""
        key = self._stream(audience_key(room, None))
        wanted = order_of(since) if since is not None else None
        try:
            pipe = self._redis.pipeline(transaction=True)
            if since is None:
                pipe.xrevrange(key, "+", "-", count=limit)
                (entries,) = pipe.execute()
                entries = list(reversed(entries))
            else:
                pipe.xrange(key, since, since)
                pipe.xrange(key, "(" + since, "+", count=limit + 1)
                pipe.xinfo_stream(key)
                exact, entries, info = pipe.execute()
        except redis.ResponseError:  # no such stream (nothing kept, expired, Redis restarted)
            return RoomHistory(since is None)
        except (redis.RedisError, OSError) as exc:
            self._failed()
            raise BrokerUnavailable(f"redis: {exc.__class__.__name__}") from None
        kept = []
        for entry_id, fields in entries:
            mid = _text(entry_id)
            _room, _user, prefix = json.loads(fields[b"m"])
            kept.append((order_of(mid) or (), prefix + mid + '"}'))
        if since is None:
            return RoomHistory(True, *page_of(kept, None, limit))
        last = order_of(_text(info.get("last-generated-id", b"")))
        complete = (
            wanted is not None and last is not None and wanted <= last
            and (bool(exact) or wanted == last)
        )
        return RoomHistory(complete, *page_of(kept, wanted or (), limit))

    # -- control messages ------------------------------------------------------------------

    def control(self, control: Control, timeout: float) -> Outcome | None:
        """Log and publish ``control`` (one script), then wait up to ``control.WAIT`` for
        the counts of the workers that were live when it was published: each pushes
        ``"<worker> <count>"`` to a reply list of this request's own. Counts that arrive
        later are not counted (``unanswered`` says how many workers were missing); a
        worker that was not in the set yet (it just started) is counted if it answers in
        time. Raises :class:`BrokerUnavailable` when Redis does not take it (a timeout
        included: the message may have gone out; both actions are safe to repeat)."""
        if not self._connected.is_set():
            raise BrokerUnavailable("redis: not subscribed yet")
        reply_to = f"{self._prefix}:reply:{uuid.uuid4().hex}"
        message = Control(control.action, control.user, control.room, reply_to)
        try:
            members = self._control(
                keys=[self._bus, self._workers_key], args=[self._channel, message.encode()]
            )
        except (redis.RedisError, OSError) as exc:
            self._failed()
            raise BrokerUnavailable(f"redis: {exc.__class__.__name__}") from None
        expected = {_text(m) for m in members} | {self._worker}
        answered: dict[str, int] = {}
        deadline = time.monotonic() + WAIT
        try:
            while not expected <= answered.keys():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                got = self._redis.blpop([reply_to], timeout=max(min(left, _REPLY_POLL), 0.01))
                if got is not None:
                    worker, _, count = _text(got[1]).rpartition(" ")
                    answered[worker] = int(count)
        except (redis.RedisError, OSError, ValueError) as exc:
            log.warning("redis: waiting for control replies failed (%s)", exc.__class__.__name__)
        finally:
            try:
                self._redis.delete(reply_to)
            except (redis.RedisError, OSError):
                pass
        missing = len(expected - answered.keys())
        return Outcome(sum(answered.values()), len(answered), missing)

    def _control_task(self, data: bytes | str) -> ControlTask:
        """The task of a control message read off the channel or the bus log: it acts on
        this worker's connections, then hands its count to the replier."""
        assert self._hub is not None
        control = Control.decode(data)

        def done(count: int) -> None:
            if control.reply_to is not None:
                self._replies.put((control.reply_to, count))

        return ControlTask(control, self._hub, done)

    def _replying(self) -> None:
        """The replier thread: pushes the counts of this worker's control tasks to their
        requesters' reply lists (the broadcaster, which runs the tasks, never talks to
        Redis). A count that cannot be pushed is dropped: its requester answers without it
        and says so (``unanswered``)."""
        while not self._stop.is_set():
            try:
                reply_to, count = self._replies.get(timeout=_POLL)
            except queue.Empty:
                continue
            try:
                pipe = self._redis.pipeline(transaction=False)
                pipe.rpush(reply_to, f"{self._worker} {count}")
                pipe.pexpire(reply_to, _REPLY_TTL_MS)
                pipe.execute()
            except (redis.RedisError, OSError) as exc:
                self._failed()
                log.warning("redis: a control reply was not sent (%s)", exc.__class__.__name__)

    def peers(self) -> Census | None:
        """The other workers' counts as the reporter last read them (at most 0.25 s ago,
        each at most 0.25 s old when read); None when that read is over 2 s old."""
        view = self._view
        if view is None or time.monotonic() - view[0] > _VIEW_STALE:
            return None
        return view[1]

    # -- the listener thread ---------------------------------------------------------------

    def _stream(self, key: str) -> str:
        return f"{self._prefix}:h:{key}"

    @property
    def _worker_key(self) -> str:
        return self._key_of(self._worker)

    @property
    def _workers_key(self) -> str:
        return f"{self._prefix}:workers"

    def _listen(self) -> None:
        pubsub: Any = None
        backoff = _BACKOFF_MIN
        next_master_check = 0.0
        while not self._stop.is_set():
            try:
                if pubsub is None:
                    pubsub = self._listener_redis.pubsub()
                    pubsub.subscribe(self._channel)
                if self._sentinels and time.monotonic() >= next_master_check:
                    next_master_check = time.monotonic() + _MASTER_CHECK
                    if self._master_moved(pubsub):
                        # reconnect (to the master they name) and catch up from the bus log
                        raise redis.ConnectionError("the sentinels name another master")
                # wait up to _POLL for a reply, then read every one already received,
                # the messages queued together (one queue item per _OUTBOX_MAX, not one each)
                if rediswire.drain(pubsub, self._deliver, self._received, timeout=_POLL):
                    self._flush()
                    if self._connected.is_set():  # subscribed (again)
                        backoff = _BACKOFF_MIN
            except (redis.RedisError, OSError) as exc:
                self._flush()
                if self._connected.is_set():
                    log.warning("redis: connection lost (%s); reconnecting", exc.__class__.__name__)
                self._connected.clear()
                metrics.BROKER_ERRORS.inc()
                _close_quietly(pubsub)
                pubsub = None
                metrics.BROKER_RECONNECTS.inc()
                self._stop.wait(random.uniform(backoff / 2, backoff))
                backoff = min(backoff * 2, _BACKOFF_MAX)
            except Exception:  # a bad message must not kill the listener
                self._flush()
                log.exception("redis: listener error")
        _close_quietly(pubsub)

    def _received(self, message: dict | None) -> None:
        """A reply other than a message (``drain`` hands those to :meth:`_deliver`), as
        redis-py's ``handle_message`` returns it: the confirmation of our subscription is
        acted on."""
        kind = message.get("type") if message is not None else None
        if kind == "subscribe":
            # subscribed (again): first replay what was missed while not, then open
            # publishing (a 200 before this would precede a lost message)
            self._flush()
            self._connections.reset()  # the server may have changed: reconnect to it
            self._subscribed()

    def _master_moved(self, pubsub: Any) -> bool:
        """Whether the sentinels now name a master other than the server ``pubsub`` is
        connected to (False while they name none: a failover is under way)."""
        pool: Any = self._listener_redis.connection_pool  # a SentinelConnectionPool
        connection = pubsub.connection
        if connection is None or not hasattr(pool, "sentinel_manager"):
            return False
        try:
            host, port = pool.sentinel_manager.discover_master(pool.service_name)
        except redis.RedisError:  # MasterNotFoundError among them: nobody to move to yet
            return False
        return (str(connection.host), int(connection.port)) != (str(host), int(port))

    def _subscribed(self) -> None:
        """The channel's subscription is confirmed: from now on every message reaches us.
        The first time, delivery starts here (the bus log's end); after a drop, everything
        published since the last message delivered is replayed first, or the gap told."""
        if self._position is None:
            self._position = self._bus_end()
            self._replayed_to = None
        else:
            self._catch_up()
        self._presence_snapshot()
        log.info("redis: listening on %s", self._channel)
        self._connected.set()

    def _bus_end(self) -> str:
        """The bus log's last id, creating the log (with a marker entry) when it is missing,
        so that a later catch-up can tell "nothing published since" from "history lost"."""
        try:
            info = self._redis.xinfo_stream(self._bus)
        except redis.ResponseError:  # no such key: nothing ever published, or Redis lost it
            return _text(self._redis.xadd(self._bus, {"s": "1"}, maxlen=_BUS_LENGTH))
        return _text(info["last-generated-id"])

    def _catch_up(self) -> None:
        """Replay, in bus order, every message published after ``_position`` up to the log's
        end now (later ones arrive live), in pages, within ``_REPLAY_BUDGET``. When that is
        not possible (the log or an audience's history no longer reaches back, Redis lost
        them, or the budget ran out) close this worker's clients so that they resume."""
        deadline = time.monotonic() + _REPLAY_BUDGET
        position = self._position
        assert position is not None
        try:
            end = _text(self._redis.xinfo_stream(self._bus)["last-generated-id"])
        except redis.ResponseError:
            return self._gap("the bus log is gone (Redis restarted or was flushed)")
        replayed = 0
        while position != end:
            if time.monotonic() > deadline:
                return self._gap(f"catch-up over {_REPLAY_BUDGET:g} s ({replayed} replayed)")
            page = self._page(position, end)
            if page is None:
                return self._gap(f"history no longer reaches back to {position}")
            for bus_id, item in page:
                if item is not None:
                    self._submit(item)
                    replayed += 1
                self._position = position = bus_id
            if not page:
                break
        self._replayed_to = order_of(end)
        self.replayed += replayed
        if replayed:
            log.info("redis: resubscribed; replayed %d missed message(s)", replayed)
        return None

    def _page(self, position: str, end: str) -> list[tuple[str, QueueItem | None]] | None:
        """The next log entries after ``position`` (up to ``end``) as (bus id, broadcast or
        control task; None for a marker), read with ``position``'s own entry in one
        transaction: None when that entry is gone (trimmed, or Redis lost it) or a message's
        payload is."""
        pipe = self._redis.pipeline(transaction=True)
        pipe.xrange(self._bus, position, position)
        pipe.xrange(self._bus, "(" + position, end, count=_REPLAY_PAGE)
        exact, entries = pipe.execute()
        if not exact:
            return None
        wanted: dict[str, list[str]] = {}  # stream key -> message ids, in order
        for _bus_id, fields in entries:
            if b"k" in fields:
                wanted.setdefault(_text(fields[b"k"]), []).append(_text(fields[b"i"]))
        pipe = self._redis.pipeline(transaction=False)
        for key, ids in wanted.items():
            pipe.xrange(key, ids[0], ids[-1])
        metas: dict[tuple[str, str], bytes] = {}
        for key, found in zip(wanted, pipe.execute() if wanted else []):
            for mid, fields in found:
                metas[(key, _text(mid))] = fields[b"m"]
        page: list[tuple[str, QueueItem | None]] = []
        for bus_id, fields in entries:
            item: QueueItem | None = None
            if b"c" in fields:  # a control message: acted on here too, never shown
                try:
                    item = self._control_task(fields[b"c"])
                except ValueError:
                    log.warning("redis: skipped a malformed control message in the bus log")
            elif b"k" in fields:
                mid = _text(fields[b"i"])
                meta = metas.get((_text(fields[b"k"]), mid))
                if meta is None:
                    return None  # its audience's history was trimmed past it
                item = _broadcast(mid, meta)
            page.append((_text(bus_id), item))
        return page

    def _gap(self, why: str) -> None:
        """Messages were missed and cannot be replayed: close every client of this worker
        with 1011 "missed messages; resume", so each reconnects and resumes its rooms with
        ``since`` (recovery then says what history still holds); go on from the log's end."""
        self.gaps += 1
        assert self._hub is not None
        clients = self._hub.snapshot()
        log.warning("redis: resubscribed but %s; closing %d client(s) to resume",
                    why, len(clients))
        for conn in clients:
            conn.close(CLOSE_INTERNAL_ERROR, REASON_MISSED_MESSAGES)
        self._position = self._bus_end()
        self._replayed_to = order_of(self._position)

    def _deliver(self, data: bytes) -> None:
        """One message off the channel: a broadcast goes to the outbox (queued by
        :meth:`_flush`), a control task is queued at once, after the outbox."""
        if data[:1] == b"!":
            self._post(Broadcast(data[1:], time.monotonic()), None)
            return
        if data[:1] == b"@":  # a presence event: no id, not in the bus log
            self._post(_presence_broadcast(data[1:]), None)
            return
        head, _, rest = data.partition(b" ")
        if rest[:1] == b"[":  # "<id> <meta>": from a worker that keeps no bus log
            self._post(_broadcast(head.decode(), rest), None)
            return
        bus_id = head.decode()
        if self._replayed_to is not None:
            order = order_of(bus_id)
            if order is not None and order <= self._replayed_to:
                return  # the catch-up delivered it already
        if rest[:1] == b"?":  # "<bus id> ?<control>": a task, in order with the messages
            self._submit(self._control_task(rest[1:]))
            self._position = bus_id
            return
        mid, _, meta = rest.partition(b" ")
        self._post(_broadcast(mid.decode(), meta), bus_id)

    def _post(self, item: Broadcast, bus_id: str | None) -> None:
        """Listener thread: ``item`` joins the outbox; a full outbox is queued."""
        self._outbox.append(item)
        if bus_id is not None:
            self._outbox_position = bus_id
        if len(self._outbox) >= _OUTBOX_MAX:
            self._flush()

    def _flush(self) -> None:
        """Listener thread: queue the outbox as one item (its broadcasts in order; the
        broadcaster fans them out as it would the same messages queued one by one), then
        record the last bus id in it as handed on."""
        outbox = self._outbox
        if not outbox:
            return
        self._outbox = []
        self._submit_now(outbox[0] if len(outbox) == 1 else tuple(outbox))
        if self._outbox_position is not None:
            self._position = self._outbox_position
            self._outbox_position = None

    def _submit(self, item: QueueItem) -> None:
        """Listener thread: queue ``item`` after whatever the outbox holds."""
        self._flush()
        self._submit_now(item)

    def _submit_now(self, item: QueueItem) -> None:
        assert self._broadcaster is not None
        # never drop what Redis accepted: wait for room in the local queue
        while not self._broadcaster.submit(item, 1.0):
            if self._stop.is_set():
                return

    # -- the reporter thread ---------------------------------------------------------------

    def _reporting(self) -> None:
        """Every period: write this worker's counts, read the others'. Errors only make the
        view stale (the listener reports the outage); the next round tries again."""
        while True:
            started = self._round_started = time.monotonic()
            try:
                members = self._report()
                self._view = (time.monotonic(), self._read_peers(members))
                if self._failed_at < started:  # Redis answered a whole round since
                    self._failed_at = float("-inf")
            except (redis.RedisError, OSError):
                self._failed_at = time.monotonic()
                self._reported = None  # Redis may have lost our report: write it whole
            except Exception:  # a bug must not silently freeze the counts
                log.exception("redis: reporter error")
            self._round_started = None
            if self._stop.wait(_REPORT_EVERY):
                return

    def _report(self, rewrite: bool = False) -> list[str]:
        """Refresh this worker's report (rewritten only when the hub changed, or with
        ``rewrite``) and its place in the workers set; the members of that set."""
        assert self._hub is not None
        version = self._hub.version()
        key = self._worker_key
        pipe = self._redis.pipeline(transaction=False)
        pipe.exists(key)
        if self._presence:  # outlives the report: see _PRESENCE_TTL_MS
            pipe.pexpire(self._presence_key(self._worker), _PRESENCE_TTL_MS)
        if rewrite or version != self._reported:
            census = self._hub.census()
            pipe.hset(key, mapping={
                "gen": version,
                "clients": census.clients,
                "capacity": census.capacity,
                "rooms": json.dumps(census.rooms, ensure_ascii=False),
                "users": json.dumps(census.users, ensure_ascii=False),
            })
        pipe.pexpire(key, _REPORT_TTL_MS)
        pipe.zadd(self._workers_key, {self._worker: int(time.time() * 1000)})
        pipe.pexpire(self._workers_key, _REPORT_TTL_MS)  # gone with the last live worker
        pipe.zrange(self._workers_key, 0, -1)
        existed, *results, members = pipe.execute()
        if not existed and self._ever_reported and not rewrite:
            # our report had expired (a stall over the TTL, or Redis restarted): the others
            # took us for dead, and may have announced our presence members' leaves
            log.warning("redis: this worker's report had expired (a stall over %g s, or Redis "
                        "lost it): written again", _REPORT_TTL_MS / 1000)
            if self.on_report_lost is not None:
                self.on_report_lost()
        if not results[-3]:  # expired, and this round did not rewrite it: write it whole
            return self._report(rewrite=True)
        self._reported = version
        self._ever_reported = True
        return [_text(m) for m in members]

    def _read_peers(self, members: list[str]) -> Census:
        """The other live workers' counts added up: their ``gen`` first, the counts only of
        those whose ``gen`` changed. Members whose report expired are dropped from the set."""
        others = [m for m in members if m != self._worker]
        pipe = self._redis.pipeline(transaction=False)
        for worker in others:
            pipe.hget(self._key_of(worker), "gen")
        gens = pipe.execute() if others else []
        live = {w: g for w, g in zip(others, gens) if g is not None}
        dead = [w for w, g in zip(others, gens) if g is None]
        changed = [w for w, g in live.items() if self._known.get(w, (None,))[0] != g]
        if changed or dead:
            pipe = self._redis.pipeline(transaction=False)
            for worker in changed:
                pipe.hmget(self._key_of(worker), "gen", "clients", "capacity", "rooms", "users")
            if dead and not self._presence:
                pipe.zrem(self._workers_key, *dead)
            fetched = pipe.execute()
            for worker in dead if self._presence else ():
                # their members leave (the script also takes them out of the workers set)
                self._reap(keys=[self._workers_key],
                           args=[self._channel, self._prefix, worker, "0"])
            for worker, fields in zip(changed, fetched):
                if fields[0] is not None:  # not expired between the two reads
                    self._known[worker] = (fields[0], _census(fields))
        gone = [w for w in self._known if w not in live]
        for worker in gone:
            del self._known[worker]
        if changed or gone or self._view is None:
            self._total = Census()
            for _gen, census in self._known.values():
                self._total = self._total + census
        return self._total

    def _key_of(self, worker: str) -> str:
        return f"{self._prefix}:worker:{worker}"


def _census(fields: list) -> Census:
    """A peer's report (``HMGET gen clients capacity rooms users``) as counts."""
    _gen, clients, capacity, rooms, users = fields
    return Census(
        int(clients or 0),
        json.loads(rooms or b"{}"),
        json.loads(users or b"{}"),
        int(capacity or 0),
        1,
    )


def _broadcast(mid: str, meta: bytes) -> Broadcast:
    """A published message (its id and its meta ``[room, user, prefix]``) as a broadcast."""
    room, user, prefix = json.loads(meta)
    return Broadcast(envelope_frame(prefix, mid), time.monotonic(), room, user, order_of(mid))


def _presence_broadcast(payload: bytes) -> Broadcast:
    """A presence event from the bus as a broadcast to its room (the roster filters it)."""
    room, action, member, user = parse_payload(payload)
    return Broadcast(presence_frame(room, action, user), time.monotonic(), room,
                     presence=(action, member, user))


def _close_quietly(pubsub: Any) -> None:
    if pubsub is not None:
        try:
            pubsub.close()
        except (redis.RedisError, OSError):
            pass


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
