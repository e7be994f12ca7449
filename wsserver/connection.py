"""Server-side state of one WebSocket: its outbound buffer and the one path every write takes.

Why one write path: the broadcaster, the flusher, the connection's own thread (pongs, pings,
command replies, close replies) and shutdown all write to the same socket. Every write goes
through :meth:`Connection.send_frames` under ``_lock``, so frames never interleave and a
partially written frame is always finished before the next one starts.

Why never block: writes use ``MSG_DONTWAIT``. What the kernel does not take stays in
``_pending`` (whole frames, plus how far the first one got) and the :class:`~wsserver.flusher.Flusher`
finishes it when the socket becomes writable. All pending frames go out in one ``sendmsg``
call, which is what makes a batch of broadcasts cost one system call per client.

Why a byte cap: a client that stops reading must not grow our memory or slow anyone else.
Once ``_pending`` exceeds ``buffer_limit`` the client is a *slow consumer*: what is queued
is dropped (except the rest of a frame already half written), a close frame 1008
"slow consumer" is queued behind it, and the caller removes the client from the hub.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Sequence

from .frames import close_frame
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
        "slow",
        "frames_out",
        "bytes_out",
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
        self.slow = False
        self.frames_out = 0
        self.bytes_out = 0

    # -- the write path ------------------------------------------------------------------

    def send_frames(self, frames: Sequence[bytes], total: int | None = None) -> int:
        """Queue encoded frames and write what the socket takes now. Returns a SendResult."""
        if total is None:
            total = sum(len(f) for f in frames)
        with self._lock:
            if self._close_sent or self._closed:
                return SendResult.CLOSED
            self._pending.extend(frames)
            self._pending_bytes += total
            self.frames_out += len(frames)
            if self._watched:
                # the flusher owns the next write; we only append (and police the cap)
                if self._pending_bytes > self._buffer_limit:
                    self._drop_as_slow_locked()
                    return SendResult.SLOW
                return SendResult.OK
            self._flush_locked()
            if self._pending_bytes > self._buffer_limit:
                self._drop_as_slow_locked()
                return SendResult.SLOW
            return SendResult.OK

    def send(self, frame: bytes) -> int:
        """Queue one encoded frame (a reply, a pong); see :meth:`send_frames`."""
        return self.send_frames((frame,), len(frame))

    def close(self, code: int, reason: str) -> bool:
        """Queue a close frame behind what is pending. Idempotent: False if already closing."""
        return self.send_close_frame(close_frame(code, reason))

    def send_close_frame(self, frame: bytes) -> bool:
        """Queue an encoded close frame, the last thing this connection will send."""
        with self._lock:
            if self._close_sent or self._closed:
                return False
            self._pending.append(frame)
            self._pending_bytes += len(frame)
            self._close_sent = True
            if not self._watched:
                self._flush_locked()
            return True

    @property
    def close_sent(self) -> bool:
        return self._close_sent

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
        written or ``timeout`` passes. True if nothing is left."""
        deadline = time.monotonic() + timeout
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
                return
            self.bytes_out += sent
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
