"""The embedded broker: one process, nothing to install.

Ids are ``<boot>-<n>``: ``n`` counts up by one per audience (a jump shows a gap) and ``boot``
is the broker's start time in milliseconds, so an id from before a restart is never mistaken
for one of this run (and ids still increase across restarts). History is a ring buffer per
audience (the last ``WSSERVER_HISTORY_SIZE`` messages, each kept ``WSSERVER_HISTORY_TTL``
seconds). Publishing numbers the message, hands it to this worker's broadcaster and records
it, all under one lock, so ids reach clients in order and a recovery (which reads history
under the same lock) sees every message that is already queued.

Bounded memory. Publishers choose the audiences, so what is kept must not grow with how many
rooms were ever published to:

* an audience nobody published to for ``WSSERVER_HISTORY_TTL`` seconds holds only expired
  messages: it is forgotten whole (ring and id counter) when the next publish comes or, if
  none comes, by the sweeper thread a little later;
* at most ``WSSERVER_HISTORY_MAX_ROOMS`` audiences and ``WSSERVER_HISTORY_MAX_BYTES`` bytes
  of messages are kept; past either, the least recently published audience is forgotten.

Audiences live in an ``OrderedDict`` in the order they were last published to, so both
expiry and eviction pop from its front: O(1) per audience, no scan.

A forgotten audience's ids must not start again from 1 (a client holding ``<boot>-7`` would
take a new ``<boot>-3`` for old news): ``_forgotten_high`` is the highest ``n`` any forgotten
audience reached, and an audience created afresh numbers from there. Resuming an audience that
was forgotten answers ``recovered: false``: what it held is gone, so whether anything after
``since`` was missed cannot be told.

Idempotency keys live in another ``OrderedDict`` (key → expiry, fingerprint, ids), in the
order they were recorded, which is their expiry order (one TTL for all): expiry pops from
the front, and past ``WSSERVER_IDEMPOTENCY_MAX_KEYS`` the oldest is forgotten early. A key is
recorded only when the publish succeeded, under the same lock: a 503 from this broker means
nothing was published.

Freed memory is given back to the system. A sweep that empties the broker, or after which
over 4 MiB were forgotten since the last time, calls ``malloc_trim(0)``
(:func:`wsserver.allocator.trim`): it returns the free pages inside every malloc arena
(messages are allocated by many request threads, in as many arenas). A dict never shrinks
as entries go, so the audiences' and the keys' ``OrderedDict`` are rebuilt after a sweep left
them under a quarter of the most they held (100,000 keys, the default cap: 6 MB of table
otherwise kept for good, measured empty). The rest is the worker's
(:mod:`wsserver.allocator`: glibc's thresholds fixed, so each arena's free top goes back by
itself).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from typing import TYPE_CHECKING

from .. import allocator
from ..broadcaster import Broadcast
from ..control import WAIT, Control, ControlTask, Outcome, Reply
from ..presence import presence_frame
from . import (
    Broker,
    BrokerUnavailable,
    Idempotency,
    Outgoing,
    Recovery,
    Repeated,
    RoomHistory,
    WouldBlock,
    audience_key,
    envelope_frame,
    envelope_of,
    key_reused,
    order_of,
    page_of,
)

if TYPE_CHECKING:
    from ..broadcaster import Broadcaster
    from ..config import Settings
    from ..hub import Hub

__all__ = ["MemoryBroker"]

log = logging.getLogger(__name__)

# Audiences forgotten per hold of the lock by the sweeper: publishers wait at most this many
# small deallocations for it.
_SWEEP_BATCH = 500
# Freed bytes after which a sweep asks the C allocator to return free memory (malloc_trim
# walks every arena: a few milliseconds, not worth it for a few messages).
_TRIM_AFTER = 4 * 1024 * 1024
# A dict that held at least this many entries and is down to a quarter of that is rebuilt
# after a sweep (copying a few hundred entries under the lock is cheap; below that, the table
# is small anyway).
_COMPACT_FROM = 1024


class _Audience:
    """One audience's id counter, when it was last published to, and its ring of
    (n, frame, monotonic time) (None while ``WSSERVER_HISTORY_SIZE`` is 0)."""

    __slots__ = ("last", "at", "ring", "size")

    def __init__(self, first: int, keep: bool) -> None:
        self.last = first - 1
        self.at = 0.0
        self.ring: deque[tuple[int, bytes, float]] | None = deque() if keep else None
        self.size = 0  # bytes of frames in ring


class MemoryBroker(Broker):
    """Thread-safety: ``_lock`` guards ``_audiences``, ``_bytes``, ``_forgotten_high`` and
    ``_keys``;
    the sweeper thread (``wsserver-history-sweeper``, a daemon so a worker that skips
    ``stop`` still exits) takes it in short holds."""

    kind = "memory"

    def __init__(self, settings: Settings) -> None:
        self._size = settings.history_size
        self._ttl = settings.history_ttl
        self._max_audiences = settings.history_max_rooms
        self._max_bytes = settings.history_max_bytes or float("inf")
        self._lock = threading.Lock()
        self._audiences: OrderedDict[str, _Audience] = OrderedDict()
        self._bytes = 0
        self._forgotten_high = 0
        # idempotency key -> (monotonic expiry, fingerprint, ids), in expiry order
        self._keys: OrderedDict[str, tuple[float, str, tuple[str, ...]]] = OrderedDict()
        self._max_keys = settings.idempotency_max_keys
        # the most entries each dict held since it was last rebuilt (_compact)
        self._audiences_high = 0
        self._keys_high = 0
        self._untrimmed = 0  # bytes forgotten by sweeps since the last malloc_trim
        self._broadcaster: Broadcaster | None = None
        self._hub: Hub | None = None
        self._boot = int(time.time() * 1000)
        self._stopping = threading.Event()
        self._sweeper: threading.Thread | None = None
        # a sweep a few times per TTL: memory is back within ~1.25 TTL of the last publish
        self.sweep_interval = min(max(self._ttl / 4, 0.2), 10.0)

    def start(self, broadcaster: Broadcaster, hub: Hub) -> None:
        self._broadcaster, self._hub = broadcaster, hub
        if self._sweeper is None:
            self._stopping.clear()
            self._sweeper = threading.Thread(
                target=self._sweep_loop, name="wsserver-history-sweeper", daemon=True
            )
            self._sweeper.start()

    def stop(self) -> None:
        self._stopping.set()
        sweeper, self._sweeper = self._sweeper, None
        if sweeper is not None:
            sweeper.join(5)

    @property
    def ready(self) -> bool:
        return True

    @property
    def alive(self) -> bool:
        return self._sweeper is None or self._sweeper.is_alive()

    publishes_nowait = True

    def publish(
        self,
        messages: tuple[Outgoing, ...],
        timeout: float,
        idempotency: Idempotency | None = None,
    ) -> list[str] | None:
        deadline = time.monotonic() + timeout
        # other publishers hold the lock briefly, or for at most their own `timeout` while the
        # queue is full: waiting a little longer than ours never turns contention into a 503
        if not self._lock.acquire(timeout=timeout + 0.25):
            return None
        return self._publish_held(messages, idempotency, deadline)

    def publish_nowait(
        self, messages: tuple[Outgoing, ...], idempotency: Idempotency | None = None
    ) -> list[str]:
        """:meth:`publish` if the lock is free and the queue has room now, else
        :class:`WouldBlock` (nothing published). The lock is held by another publisher for
        at most its own enqueue timeout, and never across I/O."""
        if not self._lock.acquire(blocking=False):
            raise WouldBlock("memory: the broker's lock is busy")
        ids = self._publish_held(messages, idempotency, None)
        if ids is None:
            raise WouldBlock("memory: the broadcast queue is full or busy")
        return ids

    def _publish_held(
        self,
        messages: tuple[Outgoing, ...],
        idempotency: Idempotency | None,
        deadline: float | None,
    ) -> list[str] | None:
        """Holds ``_lock``, and releases it. The publish; None when the broadcaster did not
        take the messages by ``deadline`` (None: at once, without waiting)."""
        broadcaster = self._broadcaster
        assert broadcaster is not None
        forgotten: list[_Audience] = []  # deallocated after the lock is released
        try:
            now = time.monotonic()
            if idempotency is not None:
                first = self._seen(idempotency, now)
                if first is not None:
                    return first
            self._expire(now - self._ttl, forgotten, len(messages) + 1)
            keys = [audience_key(m.room, m.user) for m in messages]
            numbers = []
            last: dict[str, int] = {}  # a batch may publish to one audience several times
            for key in keys:
                n = last.get(key)
                if n is None:
                    audience = self._audiences.get(key)
                    n = audience.last if audience else self._forgotten_high
                last[key] = n = n + 1
                numbers.append(n)
            frames = [envelope_frame(m.prefix, self._id(n)) for m, n in zip(messages, numbers)]
            items = tuple(
                Broadcast(frame, now, m.room, m.user, (self._boot, n))
                for m, n, frame in zip(messages, numbers, frames)
            )
            item = items[0] if len(items) == 1 else items
            if deadline is None:
                if not broadcaster.submit_nowait(item):
                    return None
            elif not broadcaster.submit(item, max(deadline - time.monotonic(), 0.0)):
                return None
            for key, n, frame in zip(keys, numbers, frames):
                self._record(key, n, frame, now)
            self._evict(forgotten)
            ids = [self._id(n) for n in numbers]
            if idempotency is not None:
                self._remember(idempotency, ids, now)
            return ids
        finally:
            self._lock.release()
            del forgotten

    def announce(self, room: str, action: str, member: str, user: str | None) -> bool:
        """One process: this worker's members are the service's, so every change is an
        event. Queued behind what is already queued (waiting for room: an event dropped
        would leave every roster wrong); False while shutting down."""
        assert self._broadcaster is not None
        item = Broadcast(presence_frame(room, action, user), time.monotonic(), room,
                         presence=(action, member, user))
        for _attempt in range(10):
            if self._broadcaster.submit(item, 1.0):
                return True
            if self._stopping.is_set():
                return False
        raise BrokerUnavailable("the broadcast queue stayed full")

    def _seen(self, idempotency: Idempotency, now: float) -> Repeated | None:
        """Holds ``_lock``. The first ids of a recorded key (expired keys forgotten first);
        raises the 422 when the key was recorded for another notification."""
        self._expire_keys(now, len(self._keys))
        entry = self._keys.get(idempotency.key)
        if entry is None:
            return None
        if entry[1] != idempotency.fingerprint:
            raise key_reused()
        return Repeated(entry[2])

    def _expire_keys(self, now: float, limit: int) -> int:
        """Holds ``_lock``. Forget at most ``limit`` expired idempotency keys, oldest
        first; how many were forgotten."""
        keys = self._keys
        done = 0
        while keys and done < limit:
            oldest = next(iter(keys))
            if keys[oldest][0] > now:
                break
            del keys[oldest]
            done += 1
        return done

    def _remember(self, idempotency: Idempotency, ids: list[str], now: float) -> None:
        """Holds ``_lock``. Record a key that was just published with, within the cap."""
        keys = self._keys
        keys[idempotency.key] = (now + self._ttl, idempotency.fingerprint, tuple(ids))
        while len(keys) > self._max_keys:
            keys.popitem(last=False)
        if len(keys) > self._keys_high:
            self._keys_high = len(keys)

    def _record(self, key: str, n: int, frame: bytes, now: float) -> None:
        """Holds ``_lock``. Count ``n`` for ``key`` and keep ``frame`` in its ring."""
        audience = self._audiences.get(key)
        if audience is None:
            audience = self._audiences[key] = _Audience(n, self._size > 0)
            if len(self._audiences) > self._audiences_high:
                self._audiences_high = len(self._audiences)
        else:
            self._audiences.move_to_end(key)
        audience.last, audience.at = n, now
        ring = audience.ring
        if ring is None:
            return
        ring.append((n, frame, now))
        audience.size += len(frame)
        self._bytes += len(frame)
        horizon = now - self._ttl
        while len(ring) > self._size or ring[0][2] < horizon:
            _, old, _ = ring.popleft()
            audience.size -= len(old)
            self._bytes -= len(old)

    def _expire(self, horizon: float, out: list[_Audience], limit: int | None = None) -> None:
        """Holds ``_lock``. Forget audiences last published to before ``horizon`` (all
        their messages have expired), oldest first, at most ``limit``."""
        audiences = self._audiences
        while audiences and (limit is None or len(out) < limit):
            key = next(iter(audiences))
            if audiences[key].at >= horizon:
                return
            out.append(self._forget(key))

    def _evict(self, out: list[_Audience]) -> None:
        """Holds ``_lock``. Forget the least recently published audiences while over either
        cap; the audience published last always keeps its newest message."""
        audiences = self._audiences
        while len(audiences) > self._max_audiences or (
            self._bytes > self._max_bytes and len(audiences) > 1
        ):
            out.append(self._forget(next(iter(audiences))))
        if self._bytes > self._max_bytes and audiences:
            last = audiences[next(reversed(audiences))]
            ring = last.ring
            while ring is not None and len(ring) > 1 and self._bytes > self._max_bytes:
                _, old, _ = ring.popleft()
                last.size -= len(old)
                self._bytes -= len(old)

    def _forget(self, key: str) -> _Audience:
        """Holds ``_lock``. Drop ``key`` and remember how far its ids went."""
        audience = self._audiences.pop(key)
        self._bytes -= audience.size
        if audience.last > self._forgotten_high:
            self._forgotten_high = audience.last
        return audience

    def sweep(self) -> int:
        """Forget every audience whose messages have all expired; the bytes freed. Called
        by the sweeper thread; in short holds of the lock, deallocating outside it. Then
        the dicts are rebuilt if they shrank a lot (:meth:`_compact`)."""
        freed = 0
        while not self._stopping.is_set():
            batch: list[_Audience] = []
            with self._lock:
                now = time.monotonic()
                self._expire(now - self._ttl, batch, _SWEEP_BATCH)
                keys = self._expire_keys(now, _SWEEP_BATCH)
                done = len(batch) < _SWEEP_BATCH and keys < _SWEEP_BATCH
                old = self._compact() if done else ()
            freed += sum(a.size for a in batch)
            del batch, old
            if done:
                break
        return freed

    def _compact(self) -> tuple[OrderedDict, ...]:
        """Holds ``_lock``. Rebuild a dict that shrank under a quarter of the most it held:
        a dict's table (and an ``OrderedDict``'s node index) never shrinks as entries are
        deleted: 100,000 keys gone keep 6 MB, 10,000 audiences 0.3 MB. The old dicts are
        returned, to be deallocated after the lock is released."""
        old: list[OrderedDict] = []
        high = self._audiences_high
        if high >= _COMPACT_FROM and len(self._audiences) * 4 <= high:
            old.append(self._audiences)
            self._audiences = OrderedDict(self._audiences)
            self._audiences_high = len(self._audiences)
        if self._keys_high >= _COMPACT_FROM and len(self._keys) * 4 <= self._keys_high:
            old.append(self._keys)
            self._keys = OrderedDict(self._keys)
            self._keys_high = len(self._keys)
        return tuple(old)

    def _sweep_loop(self) -> None:
        while not self._stopping.wait(self.sweep_interval):
            try:
                self._untrimmed += self.sweep()
                if self._untrimmed >= _TRIM_AFTER or (self._untrimmed and self.empty()):
                    allocator.trim()
                    self._untrimmed = 0
            except Exception:  # noqa: BLE001 - the sweeper must outlive a bug; say so
                log.exception("history sweep failed")

    def empty(self) -> bool:
        """Nothing kept: no audience, no idempotency key."""
        with self._lock:
            return not self._audiences and not self._keys

    def idempotency_keys(self) -> int:
        """Idempotency keys remembered now, for tests and diagnostics."""
        with self._lock:
            return len(self._keys)

    def stats(self) -> tuple[int, int]:
        """(audiences, bytes of messages) kept now, for tests and diagnostics."""
        with self._lock:
            return len(self._audiences), self._bytes

    def relay(self, frame: bytes, timeout: float) -> bool:
        assert self._broadcaster is not None
        return self._broadcaster.submit(Broadcast(frame, time.monotonic()), timeout)

    def _id(self, n: int) -> str:
        return f"{self._boot}-{n}"

    def history(self, room: str, since: str) -> Recovery:
        order = order_of(since)
        if order is None or len(order) != 2 or order[0] != self._boot:
            return Recovery(False)  # not an id of this run (an earlier run's, or made up)
        wanted = order[1]
        key = audience_key(room, None)
        with self._lock:
            audience = self._audiences.get(key)
            if audience is None:
                return Recovery(False)  # never published, or forgotten: nothing to vouch for
            last = audience.last
            if wanted == last:
                return Recovery(True)  # nothing was published since
            if wanted > last:
                return Recovery(False)  # an id from before a restart, or made up
            ring = audience.ring
            if not ring:
                return Recovery(False)
            horizon = time.monotonic() - self._ttl
            kept = [(n, frame) for n, frame, at in ring if at >= horizon]
            if not kept or kept[0][0] > wanted + 1:
                return Recovery(False)  # the message after `since` is gone already
            return Recovery(True, [((self._boot, n), frame) for n, frame in kept if n > wanted])

    def room_history(
        self, room: str, since: str | None, limit: int, timeout: float
    ) -> RoomHistory:
        """Read under the lock publishers take (held briefly, or for their enqueue timeout
        while the queue is full): waited for at most ``timeout``, then
        :class:`BrokerUnavailable`. The frames are copied out under it, decoded after."""
        order = order_of(since) if since is not None else None
        mine = order is not None and len(order) == 2 and order[0] == self._boot
        key = audience_key(room, None)
        if not self._lock.acquire(timeout=timeout):
            raise BrokerUnavailable("memory: history lock busy", "WSSERVER_ENQUEUE_TIMEOUT")
        try:
            audience = self._audiences.get(key)
            ring = audience.ring if audience is not None else None
            horizon = time.monotonic() - self._ttl
            kept = [(n, frame) for n, frame, at in ring if at >= horizon] if ring else []
            last = audience.last if audience is not None else None
        finally:
            self._lock.release()
        if since is None:
            complete = True
        elif not mine or last is None:
            complete = False  # an id of another run, or nothing kept to vouch for it
        else:
            wanted = order[1]  # type: ignore[index]
            # as history(): the message right after `since` must still be kept
            complete = wanted == last or (wanted < last and bool(kept) and kept[0][0] <= wanted + 1)
        # ids compare across runs ("<boot>-<n>"): an earlier run's id has everything kept
        # after it, a later (made-up) one nothing
        after = None if since is None else (order or ())
        frames, more = page_of([((self._boot, n), frame) for n, frame in kept], after, limit)
        return RoomHistory(complete, [envelope_of(frame) for frame in frames], more)

    def control(self, control: Control, timeout: float) -> Outcome | None:
        """One worker: the task goes on this broadcaster's queue (behind every notification
        already published) and the count comes back within ``control.WAIT``."""
        assert self._broadcaster is not None and self._hub is not None
        reply = Reply()
        if not self._broadcaster.submit(ControlTask(control, self._hub, reply.set), timeout):
            return None
        count = reply.wait(WAIT)
        if count is None:
            return Outcome(0, 0, 1)
        return Outcome(count, 1)
