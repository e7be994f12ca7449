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

The order of a client's pongs and close frame behind the echoes of its own relayed messages
is :mod:`wsserver.echo`'s job (``conn.echoes``); this module only hands it every broadcast
while it waits for one.

TLS (gunicorn's ``--certfile``, ``WSSERVER_TLS_CERT``): an ``ssl.SSLSocket`` takes no flags on
``send`` and has no ``sendmsg``, so :func:`connection_class` gives such a socket a
:class:`TlsConnection`, which makes the socket non-blocking and writes through ``SSL_write``
(see its docstring); the plain-TCP path above is untouched by it.
"""

from __future__ import annotations

import enum
import itertools
import logging
import select
import socket
import ssl
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Sequence

from .codes import CLOSE_SLOW_CONSUMER, REASON_SLOW_CONSUMER
from .echo import EchoOrder
from .frames import close_frame
from .limits import TokenBucket

if TYPE_CHECKING:
    from .flusher import Flusher

__all__ = ["Connection", "SendResult", "TlsConnection", "WriteState", "connection_class"]

log = logging.getLogger(__name__)

_IOV_MAX = 512  # buffers per sendmsg call; Linux allows 1024
_TLS_CHUNK = 64 * 1024  # bytes per SSL_write: four TLS records, joined from small frames
# what a non-blocking SSL call raises when the socket cannot go on yet ("would block"); a
# write may want a read during a TLS 1.2 renegotiation, which the gunicorn config refuses
_TLS_WOULD_BLOCK = (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError, InterruptedError)


class SendResult(enum.Enum):
    """What happened to a write."""

    OK = enum.auto()  # the frames were written or queued
    CLOSED = enum.auto()  # nothing was queued: the connection is closing or gone
    SLOW = enum.auto()  # the write took the client over its cap: close 1008 is queued


class WriteState(enum.Enum):
    """Where a connection's outbound stream is. It only moves down this list (to CLOSED from
    any state).

    Two facts stay outside it on purpose: whether the flusher is armed (``_watched``, which
    is true or false in OPEN, CLOSE_HELD and CLOSE_SENT alike) and whether the client was
    dropped as slow (``slow``, a verdict that must survive the move to CLOSED for the
    connection's thread to report it)."""

    OPEN = enum.auto()  # writes go out; nothing final is queued
    # the session's close frame waits behind the echoes of the client's own messages (see
    # wsserver.echo): broadcasts still go out (they carry those echoes), nothing new is sent
    CLOSE_HELD = enum.auto()
    CLOSE_SENT = enum.auto()  # our close frame is queued or written: the last frame we send
    CLOSED = enum.auto()  # the socket failed or the connection was detached: nothing is written


# module aliases: the hot path compares states and returns results without an Enum lookup
_OPEN, _CLOSE_HELD = WriteState.OPEN, WriteState.CLOSE_HELD
_CLOSE_SENT, _CLOSED = WriteState.CLOSE_SENT, WriteState.CLOSED
_OK, _SLOW, _REFUSED = SendResult.OK, SendResult.SLOW, SendResult.CLOSED


class Connection:
    """One client's socket and outbound queue.

    Thread-safety of the write path: ``_lock`` guards ``_pending``, ``_head_offset``,
    ``_pending_bytes``, ``_watched``, ``_state`` and :attr:`echoes` (which shares the lock);
    every public method may be called from any thread, and every ``*_locked`` method asserts
    that the lock is held. ``send_frames`` never blocks on the network.

    Per-client application state lives here too, so that every layer reaches it through the
    one object; each attribute has one owning thread (or lock), named where it is set in
    ``__init__``. Nothing here guards them.
    """

    __slots__ = (
        "id",
        "sock",
        "remote",
        "echoes",
        "_fd",
        "_lock",
        "_pending",
        "_head_offset",
        "_pending_bytes",
        "_buffer_limit",
        "_flusher",
        "_watched",
        "_state",
        "slow",
        "rooms",
        "user",
        "identity",
        "invalid_commands",
        "commands",
        "deflate",
        "__weakref__",
    )

    def __init__(
        self,
        conn_id: int,
        sock: socket.socket,
        remote: str,
        buffer_limit: int,
        flusher: Flusher,
        opening: bool = False,
    ) -> None:
        self.id = conn_id
        self.sock = sock
        self.remote = remote
        self._fd = sock.fileno()
        self._lock = threading.Lock()
        self._pending: deque[bytes] = deque()
        self._head_offset = 0
        self._pending_bytes = 0
        self._buffer_limit = buffer_limit
        self._flusher = flusher
        # someone else owns the next write: the flusher, which will call on_writable, or
        # (``opening``) the upgrade's 101, not sent yet: writes queue until :meth:`open`
        self._watched = opening
        self._state = _OPEN
        # the echoes of the client's own relayed messages and what waits for them (own lock)
        self.echoes = EchoOrder(self._lock, self)
        # set (once, never cleared) under _lock by whichever thread finds the client over
        # its cap; read by the connection's own thread on its way out
        self.slow = False
        # -- application state, one owner each --
        self.rooms: set[str] = set()  # changed only by the Hub, under the Hub's lock
        self.user: str | None = None  # the token's subject; fixed before the Hub sees it
        # the verified token (auth.Identity): set before the Hub sees the connection, then
        # replaced only by the connection's own thread (a refresh command); others read it
        self.identity: Any = None
        self.invalid_commands = 0  # bad commands in a row: the connection's own thread only
        # commands per second (WSSERVER_MAX_COMMAND_RATE; set by the service before the
        # session starts): the connection's own thread only
        self.commands = TokenBucket(0, 1)
        # permessage-deflate: the window (bits) the client negotiated for what we send, or
        # None (plain frames only); set before the Hub sees the connection, then read only.
        # The broadcaster picks this client's variant of each broadcast by it.
        self.deflate: int | None = None

    # -- the write path ------------------------------------------------------------------

    def send_frames(
        self,
        frames: Sequence[bytes],
        total: int | None = None,
        plain: Sequence[bytes] | None = None,
    ) -> SendResult:
        """Queue encoded frames and write what the socket takes now. ``plain``: when
        ``frames`` are compressed twins (permessage-deflate), the plain frames they stand
        for, in the same order (the echo ordering recognizes a client's echo by those)."""
        if total is None:
            total = sum(len(f) for f in frames)
        with self._lock:
            state = self._state
            if state is _CLOSE_SENT or state is _CLOSED:
                return _REFUSED
            if self.echoes.held:
                # rare: this client's own message is out for relay; its echo may be here
                self.echoes.relay_locked(frames, plain)
                return self._write_locked()
            if not self._pending and not self._watched and len(frames) <= _IOV_MAX:
                # the common case, the fan-out's hot path (inline: it runs once per client
                # per batch): nothing is waiting, so write the frames straight from the
                # caller's list, queueing only what is left over
                try:
                    if len(frames) == 1:
                        sent = self.sock.send(frames[0], socket.MSG_DONTWAIT)
                    else:
                        sent = self.sock.sendmsg(frames, (), socket.MSG_DONTWAIT)
                except (BlockingIOError, InterruptedError):
                    sent = 0
                except OSError:
                    self._state = _CLOSED  # the peer is gone; its thread cleans up
                    return _OK
                if sent == total:
                    return _OK
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
                    return _SLOW
                return _OK
            self._pending.extend(frames)
            self._pending_bytes += total
            return self._write_locked()

    def open(self, upgrade_response: bytes) -> None:
        """Send the upgrade's 101, then what was queued while it waited (a connection made
        with ``opening``: see ``transport._HeldUpgradeResponse`` for why). Once, by the
        connection's own thread, right after the hub registered it."""
        with self._lock:
            self._watched = False
            if self._state is _CLOSED:
                return
            self._pending.appendleft(upgrade_response)
            self._pending_bytes += len(upgrade_response)
            self._flush_locked()

    def send(self, frame: bytes) -> SendResult:
        """Queue one encoded frame (a reply); see :meth:`send_frames`."""
        return self.send_frames((frame,), len(frame))

    def close(self, code: int, reason: str, in_order: bool = False) -> bool:
        """Queue a close frame behind what is pending. Idempotent: False if already closing.
        ``in_order``: see :meth:`send_close_frame`."""
        return self.send_close_frame(close_frame(code, reason), in_order)

    def send_close_frame(self, frame: bytes, in_order: bool = False) -> bool:
        """Queue an encoded close frame, the last thing this connection will send. False
        (nothing done) when a close is already queued or held.

        ``in_order``: behind the echoes of this client's earlier messages too (the session's
        close frames, see :mod:`wsserver.echo`). Otherwise (shutdown) now, and what was held
        for later is dropped.
        """
        with self._lock:
            if self._state is not _OPEN:
                return False
            if in_order and self.echoes.hold_close_locked(frame):
                self._state = _CLOSE_HELD
                return True
            self.echoes.clear_locked()
            self.queue_close_locked(frame)
            if not self._watched:
                self._flush_locked()
            return True

    @property
    def state(self) -> WriteState:
        return self._state

    @property
    def close_sent(self) -> bool:
        """Our close frame is queued (or written), or the socket is gone: nothing more will be."""
        state = self._state
        return state is _CLOSE_SENT or state is _CLOSED

    @property
    def closing(self) -> bool:
        """A close frame is queued or held (or the socket is gone): the session sends nothing
        new."""
        return self._state is not _OPEN

    @property
    def pending_bytes(self) -> int:
        return self._pending_bytes

    def on_writable(self) -> None:
        """Called by the flusher thread once the socket can take more bytes."""
        with self._lock:
            self._watched = False
            if self._state is not _CLOSED:
                self._flush_locked()

    def drain(self, timeout: float) -> bool:
        """Block (the connection's own thread, before it returns) until everything queued is
        written or ``timeout`` passes. True if nothing is left.

        First wait for the echoes of the client's own messages (:meth:`EchoOrder.settle`)."""
        deadline = time.monotonic() + timeout
        self.echoes.settle(deadline)
        poller = None
        while True:
            with self._lock:
                if self._state is _CLOSED or not self._pending:
                    return not self._pending
                self._flush_locked(watch=False)
                if not self._pending:
                    return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if poller is None:
                poller = select.poll()
                poller.register(self._fd, select.POLLOUT)
            poller.poll(min(left, 0.05) * 1000)

    def detach(self) -> None:
        """Final: no more writes; forget the flusher registration. Idempotent."""
        with self._lock:
            self._state = _CLOSED
            self._pending.clear()
            self._pending_bytes = 0
            self._watched = False
            self.echoes.clear_locked()
        self._flusher.forget(self._fd)

    def wake(self) -> None:
        """Make the connection's thread return from its read wait (it sees end of input).

        ``socket.socket.shutdown`` also for TLS: ``SSLSocket.shutdown`` drops the socket's SSL
        object, and the other threads' writes would then go out unencrypted."""
        try:
            socket.socket.shutdown(self.sock, socket.SHUT_RD)
        except OSError:
            pass

    def abort(self) -> None:
        """Cut the TCP connection both ways: for peers that will not close politely (the
        plain socket's shutdown, as in :meth:`wake`)."""
        try:
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)
        except OSError:
            pass

    # -- wsserver.echo.Outbox: what the echo ordering may do (the lock held) ---------------

    def is_open_locked(self) -> bool:
        assert self._lock.locked()
        return self._state is _OPEN

    def is_closed_locked(self) -> bool:
        assert self._lock.locked()
        return self._state is _CLOSED

    def queue_locked(self, frame: bytes) -> None:
        assert self._lock.locked()
        self._pending.append(frame)
        self._pending_bytes += len(frame)

    def queue_close_locked(self, frame: bytes) -> None:
        """Queue our close frame (held or not): the last frame of the stream."""
        self.queue_locked(frame)
        self._state = _CLOSE_SENT

    def write_locked(self) -> SendResult:
        return self._write_locked()

    def flush_locked(self) -> None:
        assert self._lock.locked()
        if self._pending and not self._watched and self._state is not _CLOSED:
            self._flush_locked()

    # -- helpers that need _lock held ----------------------------------------------------

    def _write_locked(self) -> SendResult:
        """Write what the socket takes now (unless the flusher owns the next write), then
        police the cap, counting what :attr:`echoes` holds."""
        assert self._lock.locked()
        if not self._watched:
            self._flush_locked()
        if self._state is _CLOSE_SENT or self._state is _CLOSED:
            # an in-order close was just released: the stream is complete, nothing to drop
            # (or the socket failed while writing: nothing to police)
            return _OK
        if self._pending_bytes + self.echoes.held_bytes > self._buffer_limit:
            self._drop_as_slow_locked()
            return _SLOW
        return _OK

    def _flush_locked(self, watch: bool = True) -> None:
        """Write as much of ``_pending`` as the socket takes now, in one ``sendmsg`` per
        ``_IOV_MAX`` frames. Arms the flusher if bytes are left."""
        assert self._lock.locked()
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
                self._fail_locked()
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

    def _fail_locked(self) -> None:
        """The socket failed (the peer is gone): nothing more is written. Its thread notices
        on read and cleans up."""
        self._state = _CLOSED
        self._pending.clear()
        self._pending_bytes = 0
        self.echoes.clear_locked()

    def _drop_as_slow_locked(self) -> None:
        """Keep only the unfinished frame(s), then queue close 1008."""
        assert self._lock.locked()
        self.slow = True
        self.echoes.clear_locked()
        pending = self._pending
        kept = [pending.popleft() for _ in range(self._unfinished_locked())]
        pending.clear()
        pending.extend(kept)
        if kept:
            self._pending_bytes = sum(map(len, kept)) - self._head_offset
        else:
            self._pending_bytes = 0
            self._head_offset = 0
        self.queue_close_locked(close_frame(CLOSE_SLOW_CONSUMER, REASON_SLOW_CONSUMER))
        if not self._watched:
            self._flush_locked()

    def _unfinished_locked(self) -> int:
        """How many frames at the head of ``_pending`` must still be written whole: the one
        half written, if any."""
        return 1 if (self._pending and self._head_offset) else 0


class TlsConnection(Connection):
    """One client over TLS (an ``ssl.SSLSocket``): the same write path, through ``SSL_write``.

    Why a class of its own: ``SSLSocket`` refuses flags on ``send`` and has no ``sendmsg``,
    so the plain path's ``MSG_DONTWAIT`` gather write is not to be had. Instead:

    * the socket is made non-blocking for good (there is no per-call flag), and a write that
      would block raises ``SSLWantWriteError`` (``SSLWantReadError`` if TLS wants a read
      first), both taken as "would block": the bytes stay pending and the flusher is armed;
    * frames are joined into writes of at most ``_TLS_CHUNK`` bytes (no gather write in SSL;
      encryption copies every byte anyway), a big frame sliced without copying;
    * ``SSL_write`` is all or nothing, and a write that would block has already turned part
      of its buffer into TLS records: OpenSSL requires the retry to present the same bytes,
      at least as many (a shorter one fails with "bad length" and kills the connection).
      ``_owed`` is that length; ``_pending`` keeps those bytes from ``_head_offset`` on
      until a write succeeds (the next write is ``min(pending, _TLS_CHUNK)`` bytes from
      there, never fewer), and a slow consumer's drop keeps every frame they touch;
    * one thread at a time in the SSL object: OpenSSL does not allow a read and a write on
      one SSL object at once (a read may write: an alert, a TLS 1.3 key update), so the
      session reads through :meth:`recv`, under the same ``_lock`` as every write; a
      non-blocking read holds it for one record's decryption at most.

    The stream ends as gunicorn ends TLS connections: no close_notify, the TCP FIN after our
    close frame (clients read it as the end; sending close_notify with ``unwrap`` left
    OpenSSL errors that failed the next TLS request on the same pool thread).

    The plain :class:`Connection` keeps its own path; nothing here costs it anything.
    """

    __slots__ = ("_owed",)

    def __init__(
        self,
        conn_id: int,
        sock: socket.socket,
        remote: str,
        buffer_limit: int,
        flusher: Flusher,
        opening: bool = False,
    ) -> None:
        super().__init__(conn_id, sock, remote, buffer_limit, flusher, opening)
        self._owed = 0  # bytes an SSL_write that would block took: the retry presents them
        sock.setblocking(False)

    def send_frames(
        self,
        frames: Sequence[bytes],
        total: int | None = None,
        plain: Sequence[bytes] | None = None,
    ) -> SendResult:
        """Queue encoded frames and write what the socket takes now (see the class and
        :meth:`Connection.send_frames`)."""
        if total is None:
            total = sum(len(f) for f in frames)
        with self._lock:
            state = self._state
            if state is _CLOSE_SENT or state is _CLOSED:
                return _REFUSED
            if self.echoes.held:
                self.echoes.relay_locked(frames, plain)
            else:
                self._pending.extend(frames)
                self._pending_bytes += total
            return self._write_locked()

    def recv(self, size: int) -> bytes | None:
        """The session's read: what arrived, decrypted; ``b""`` at the end of the stream; None
        when nothing can be read yet (part of a TLS record). Raises ``OSError`` when the
        connection failed.

        Decrypted bytes left in OpenSSL's buffer do not make the socket readable to
        ``poll``, so they are taken now too."""
        with self._lock:
            sock: ssl.SSLSocket = self.sock  # type: ignore[assignment]
            try:
                data = sock.recv(size)
                while data and sock.pending():
                    data += sock.recv(sock.pending())
            except _TLS_WOULD_BLOCK:
                return None
        return data

    def _flush_locked(self, watch: bool = True) -> None:
        """Write as much of ``_pending`` as the socket takes now, ``_TLS_CHUNK`` bytes per
        ``SSL_write``. Arms the flusher if bytes are left."""
        assert self._lock.locked()
        pending = self._pending
        sock = self.sock
        while pending:
            chunk = self._chunk_locked()
            try:
                sent = sock.send(chunk)
            except _TLS_WOULD_BLOCK:
                self._owed = len(chunk)
                break
            except OSError:
                self._owed = 0
                self._fail_locked()
                return
            self._owed = 0
            self._pending_bytes -= sent
            offset = self._head_offset + sent
            while pending and offset >= len(pending[0]):
                offset -= len(pending.popleft())
            self._head_offset = offset if pending else 0
        if pending and watch and not self._watched:
            self._watched = True
            self._flusher.watch(self._fd, self)

    def _chunk_locked(self) -> bytes | memoryview:
        """The next write: ``min(pending bytes, _TLS_CHUNK)`` bytes from ``_head_offset``,
        which is never less than ``_owed`` (see the class)."""
        pending = self._pending
        head = pending[0]
        offset = self._head_offset
        if len(pending) == 1 or len(head) - offset >= _TLS_CHUNK:
            if not offset and len(head) <= _TLS_CHUNK:
                return head
            return memoryview(head)[offset : offset + _TLS_CHUNK]
        parts: list[bytes | memoryview] = [memoryview(head)[offset:] if offset else head]
        size = len(head) - offset
        for frame in itertools.islice(pending, 1, None):
            if size >= _TLS_CHUNK:
                break
            parts.append(frame)
            size += len(frame)
        data = b"".join(parts)
        return data if size <= _TLS_CHUNK else memoryview(data)[:_TLS_CHUNK]

    def _unfinished_locked(self) -> int:
        """The frame half written, and every frame an ``SSL_write`` that would block took
        part of: the retry must present those bytes again."""
        need = self._head_offset + self._owed
        count = 0
        for frame in self._pending:
            if need <= 0:
                break
            need -= len(frame)
            count += 1
        return count


def connection_class(sock: socket.socket) -> type[Connection]:
    """The connection class for ``sock``: :class:`TlsConnection` for a TLS socket."""
    return TlsConnection if isinstance(sock, ssl.SSLSocket) else Connection
