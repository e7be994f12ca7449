"""Server-side state of one WebSocket: its outbound buffer and the one path every write takes.

Why one write path: the broadcaster, the flusher, the connection's own thread (pongs, pings,
command replies, close replies) and shutdown all write to the same socket. Every write goes
through :meth:`Connection.send_frames` under ``_lock``, so frames never interleave and a
partially written frame is always finished before the next one starts.

Why never block: writes use ``MSG_DONTWAIT``. What the kernel does not take stays in
``_pending`` (whole frames, plus how far the first one got) and the
:class:`~wsserver.flusher.Flusher` finishes it when the socket becomes writable. All
pending frames go out in one ``sendmsg`` call, which is what makes a batch of broadcasts
cost one system call per client.

Why a byte cap: a client that stops reading must not grow our memory or slow anyone else.
Once ``_pending`` exceeds ``buffer_limit`` the client is a *slow consumer*: what is queued
is dropped (except the rest of a frame already half written), a close frame 1008
"slow consumer" is queued behind it, and the caller removes the client from the hub.

Why ``_held``: a client's own message comes back to it through the broadcaster, on another
thread, some time after the client's session handed it over. The session's replies must not
overtake it: a pong or a close reply sent right away would go out before the echo of the
message that preceded the ping or close (and a close would make the echo be dropped, or,
once the client is gone, be delivered to whoever connects next). So the session registers
each relayed message (:meth:`expect_echo`) and sends its pongs and close frame *in order*
(:meth:`send_in_order`, ``send_close_frame(in_order=True)``): they wait in ``_held`` behind
the echoes still out, and the write path releases them right after the matching echo, in
the same ``sendmsg``. A message that is never relayed (queue full) must not hold anything
for long: an echo that matches releases everything queued before it, the session cancels
what the service answered directly, and :meth:`release_held` ends any wait after a bound.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Sequence

from .frames import FrameMatch, close_frame
from .limits import TokenBucket
from .protocol import CLOSE_SLOW_CONSUMER

if TYPE_CHECKING:
    from .flusher import Flusher

__all__ = ["Connection", "SendResult"]

log = logging.getLogger(__name__)

_IOV_MAX = 512  # buffers per sendmsg call; Linux allows 1024


class SendResult:
    """What happened to a write: the frames were taken, or the connection is gone/slow."""

    OK = 0
    CLOSED = 1
    SLOW = 2


class Connection:
    """One client's socket and outbound queue.

    Thread-safety: ``_lock`` guards ``_pending``, ``_head_offset``, ``_pending_bytes``,
    ``_watched`` and the closing state; every method here may be called from any thread.
    ``send_frames`` never blocks on the network.
    """

    __slots__ = (
        "id",
        "sock",
        "remote",
        "connected_at",
        "_fd",
        "_lock",
        "_pending",
        "_head_offset",
        "_pending_bytes",
        "_buffer_limit",
        "_flusher",
        "_watched",
        "_close_sent",
        "_closed",
        "_held",
        "_held_bytes",
        "_held_since",
        "_close_held",
        "_settled",
        "replies",
        "slow",
        "rooms",
        "user",
        "identity",
        "invalid_commands",
        "commands",
        "__weakref__",
    )

    def __init__(
        self,
        conn_id: int,
        sock: socket.socket,
        remote: str,
        buffer_limit: int,
        flusher: Flusher,
    ) -> None:
        self.id = conn_id
        self.sock = sock
        self.remote = remote
        self.connected_at = time.time()
        self._fd = sock.fileno()
        self._lock = threading.Lock()
        self._pending: deque[bytes] = deque()
        self._head_offset = 0
        self._pending_bytes = 0
        self._buffer_limit = buffer_limit
        self._flusher = flusher
        self._watched = False
        self._close_sent = False
        self._closed = False
        # own messages out for relay (FrameMatch) and the frames waiting behind them, in order
        self._held: deque[FrameMatch | bytes] = deque()
        self._held_bytes = 0
        self._held_since: float | None = None  # when the oldest held frame was queued
        self._close_held: bytes | None = None  # our close frame, waiting behind _held
        self._settled = threading.Condition(self._lock)  # notified when _held empties
        self.replies = 0  # frames written with send(): see wsserver.session
        self.slow = False
        self.rooms: set[str] = set()  # changed only by the Hub, under its lock
        self.user: str | None = None  # the token's subject; fixed before the Hub sees it
        self.identity: Any = None  # the verified token (auth.Identity); the own thread swaps it
        self.invalid_commands = 0  # touched only by the connection's own thread
        # commands per second (WSSERVER_MAX_COMMAND_RATE; the service sets it); own thread only
        self.commands = TokenBucket(0, 1)

    # -- the write path ------------------------------------------------------------------

    def send_frames(self, frames: Sequence[bytes], total: int | None = None) -> int:
        """Queue encoded frames and write what the socket takes now. Returns a SendResult."""
        if total is None:
            total = sum(len(f) for f in frames)
        with self._lock:
            if self._close_sent or self._closed:
                return SendResult.CLOSED
            if self._held:
                # rare: this client's own message is out for relay; its echo may be here
                self._relay_locked(frames)
                return self._write_locked()
            if not self._pending and not self._watched and len(frames) <= _IOV_MAX:
                # the common case, the fan-out's hot path: nothing is waiting, so write the
                # frames straight from the caller's list, queueing only what is left over
                try:
                    if len(frames) == 1:
                        sent = self.sock.send(frames[0], socket.MSG_DONTWAIT)
                    else:
                        sent = self.sock.sendmsg(frames, (), socket.MSG_DONTWAIT)
                except (BlockingIOError, InterruptedError):
                    sent = 0
                except OSError:
                    self._closed = True  # the peer is gone; its thread cleans up
                    return SendResult.OK
                if sent == total:
                    return SendResult.OK
                self._pending.extend(frames)
                self._pending_bytes += total - sent
                offset = sent
                pending = self._pending
                while offset >= len(pending[0]):
                    offset -= len(pending.popleft())
                self._head_offset = offset
                self._watched = True
                self._flusher.watch(self._fd, self)
                if self._pending_bytes > self._buffer_limit:
                    self._drop_as_slow_locked()
                    return SendResult.SLOW
                return SendResult.OK
            self._pending.extend(frames)
            self._pending_bytes += total
            return self._write_locked()

    def send(self, frame: bytes) -> int:
        """Queue one encoded frame (a reply); see :meth:`send_frames`."""
        self.replies += 1
        return self.send_frames((frame,), len(frame))

    def send_in_order(self, frame: bytes) -> int:
        """Queue ``frame`` (a pong) behind the echoes of this client's earlier messages."""
        with self._lock:
            if self._close_sent or self._closed or self._close_held is not None:
                return SendResult.CLOSED
            if self._held:
                self._hold_locked(frame)
            else:
                self._queue_locked(frame)
            return self._write_locked()

    def close(self, code: int, reason: str, in_order: bool = False) -> bool:
        """Queue a close frame behind what is pending. Idempotent: False if already closing.
        ``in_order``: see :meth:`send_close_frame`."""
        return self.send_close_frame(close_frame(code, reason), in_order)

    def send_close_frame(self, frame: bytes, in_order: bool = False) -> bool:
        """Queue an encoded close frame, the last thing this connection will send.

        ``in_order``: behind the echoes of this client's earlier messages too (the session's
        close frames). Otherwise (shutdown) now, and what was held for later is dropped.
        """
        with self._lock:
            if self._close_sent or self._closed or self._close_held is not None:
                return False
            if in_order and self._held:
                self._close_held = frame
                if self._held_since is None:
                    self._held_since = time.monotonic()
                return True
            self._clear_held_locked()
            self._queue_locked(frame)
            self._close_sent = True
            if not self._watched:
                self._flush_locked()
            return True

    @property
    def close_sent(self) -> bool:
        """Our close frame is queued (or written): nothing more will be."""
        return self._close_sent

    @property
    def closing(self) -> bool:
        """A close frame is queued or held: the session sends nothing new."""
        return self._close_sent or self._close_held is not None

    # -- ordering behind the client's own relayed messages (see the module docstring) -----

    def expect_echo(self, match: FrameMatch) -> None:
        """The client's message is about to be relayed: ordered sends wait for its frame.

        Call it before handing the message over: the echo can come back at once."""
        with self._lock:
            if not (self._close_sent or self._closed or self._close_held is not None):
                self._held.append(match)

    def cancel_echo(self, match: FrameMatch) -> None:
        """The message was not relayed after all: stop waiting for it. Idempotent."""
        with self._lock:
            try:
                self._held.remove(match)
            except ValueError:
                return  # came back already (or was given up)
            self._release_ready_locked()
            if self._pending and not self._watched and not self._closed:
                self._flush_locked()

    @property
    def held_since(self) -> float | None:
        """When the oldest frame still waiting for an echo was queued (monotonic), or None."""
        return self._held_since

    def release_held(self) -> None:
        """Stop waiting for echoes: write what was held now (the session's time bound)."""
        with self._lock:
            if self._closed:
                return
            self._release_all_locked()
            if self._pending and not self._watched:
                self._flush_locked()

    @property
    def pending_bytes(self) -> int:
        return self._pending_bytes

    def on_writable(self) -> None:
        """Called by the flusher thread once the socket can take more bytes."""
        with self._lock:
            self._watched = False
            if not self._closed:
                self._flush_locked()

    def drain(self, timeout: float) -> bool:
        """Block (the connection's own thread, before it returns) until everything queued is
        written or ``timeout`` passes. True if nothing is left.

        First wait for the echoes of the client's own messages: what is held behind them is
        owed to the client, and an echo still in the broadcaster's queue when the client
        leaves the hub would be sent to nobody, or to the next client to connect."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._held and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._release_all_locked()
                    break
                self._settled.wait(left)
        poller = None
        while True:
            with self._lock:
                if self._closed or not self._pending:
                    return not self._pending
                self._flush_locked(watch=False)
                if not self._pending:
                    return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if poller is None:
                import select

                poller = select.poll()
                poller.register(self._fd, select.POLLOUT)
            poller.poll(min(left, 0.05) * 1000)

    def detach(self) -> None:
        """Final: no more writes; forget the flusher registration. Idempotent."""
        with self._lock:
            self._closed = True
            self._pending.clear()
            self._pending_bytes = 0
            self._watched = False
            self._clear_held_locked()
        self._flusher.forget(self._fd)

    def wake(self) -> None:
        """Make the connection's thread return from its read wait (it sees end of input)."""
        try:
            self.sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass

    def abort(self) -> None:
        """Cut the TCP connection both ways: for peers that will not close politely."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # -- helpers that need _lock held ----------------------------------------------------

    def _queue_locked(self, frame: bytes) -> None:
        self._pending.append(frame)
        self._pending_bytes += len(frame)

    def _write_locked(self) -> int:
        """Write what the socket takes now (unless the flusher owns the next write), then
        police the cap. Returns a SendResult."""
        if not self._watched:
            self._flush_locked()
        if self._close_sent:
            # an in-order close was just released: the stream is complete, nothing to drop
            return SendResult.OK
        if self._pending_bytes + self._held_bytes > self._buffer_limit:
            self._drop_as_slow_locked()
            return SendResult.SLOW
        return SendResult.OK

    def _hold_locked(self, frame: bytes) -> None:
        self._held.append(frame)
        self._held_bytes += len(frame)
        if self._held_since is None:
            self._held_since = time.monotonic()

    def _relay_locked(self, frames: Sequence[bytes]) -> None:
        """Queue broadcast frames while the client's own messages are out for relay: when
        one of them is its echo, what was held before that echo goes first (echoes before it
        were not relayed: the queue is first in, first out), then the echo, then what waited
        for exactly that echo. Frames after a released close are not sent."""
        held = self._held
        for frame in frames:
            if self._close_sent:
                break
            index = -1
            for i, entry in enumerate(held):
                if isinstance(entry, FrameMatch) and entry.matches(frame):
                    index = i
                    break
            if index < 0:
                self._queue_locked(frame)
                continue
            for _ in range(index):
                entry = held.popleft()
                if not isinstance(entry, FrameMatch):
                    self._held_bytes -= len(entry)
                    self._queue_locked(entry)
            held.popleft()
            self._queue_locked(frame)
            self._release_ready_locked()

    def _release_ready_locked(self) -> None:
        """Queue the held frames no echo is awaited before; the close once nothing is."""
        held = self._held
        while held and not isinstance(held[0], FrameMatch):
            frame = held.popleft()
            self._held_bytes -= len(frame)  # type: ignore[arg-type]
            self._queue_locked(frame)  # type: ignore[arg-type]
        if held:
            if not self._held_bytes and self._close_held is None:
                self._held_since = None  # only echoes are awaited: nothing is kept waiting
            return
        self._held_since = None
        if self._close_held is not None:
            frame, self._close_held = self._close_held, None
            self._queue_locked(frame)
            self._close_sent = True
        self._settled.notify_all()

    def _release_all_locked(self) -> None:
        """Give up on the echoes still out: queue every held frame, then the close."""
        held = self._held
        frames = [entry for entry in held if not isinstance(entry, FrameMatch)]
        held.clear()
        held.extend(frames)
        self._release_ready_locked()

    def _clear_held_locked(self) -> None:
        """Drop the echo bookkeeping and what waited behind it (the connection is ending)."""
        self._held.clear()
        self._held_bytes = 0
        self._held_since = None
        self._close_held = None
        self._settled.notify_all()

    def _flush_locked(self, watch: bool = True) -> None:
        """Write as much of ``_pending`` as the socket takes now, in one ``sendmsg`` per
        ``_IOV_MAX`` frames. Holds ``_lock``. Arms the flusher if bytes are left."""
        pending = self._pending
        sock = self.sock
        while pending:
            if len(pending) == 1 and not self._head_offset:
                buffers: list = [pending[0]]
            else:
                buffers = [pending[i] for i in range(min(len(pending), _IOV_MAX))]
                if self._head_offset:
                    buffers[0] = memoryview(buffers[0])[self._head_offset :]
            want = len(buffers[0]) if len(buffers) == 1 else sum(map(len, buffers))
            try:
                if len(buffers) == 1:
                    sent = sock.send(buffers[0], socket.MSG_DONTWAIT)
                else:
                    sent = sock.sendmsg(buffers, (), socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                # the peer is gone; its thread will notice on read and clean up
                self._closed = True
                pending.clear()
                self._pending_bytes = 0
                self._clear_held_locked()
                return
            self._pending_bytes -= sent
            offset = self._head_offset + sent
            while pending and offset >= len(pending[0]):
                offset -= len(pending.popleft())
            self._head_offset = offset if pending else 0
            if sent < want:
                break
        if pending and watch and not self._watched:
            self._watched = True
            self._flusher.watch(self._fd, self)

    def _drop_as_slow_locked(self) -> None:
        """Holds ``_lock``. Keep only the unfinished frame, then queue close 1008."""
        self.slow = True
        self._clear_held_locked()
        pending = self._pending
        head = pending[0] if (pending and self._head_offset) else None
        pending.clear()
        self._pending_bytes = 0
        if head is not None:
            pending.append(head)
            self._pending_bytes = len(head) - self._head_offset
        else:
            self._head_offset = 0
        frame = close_frame(CLOSE_SLOW_CONSUMER, "slow consumer")
        pending.append(frame)
        self._pending_bytes += len(frame)
        self._close_sent = True
        if not self._watched:
            self._flush_locked()
