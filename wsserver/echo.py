"""Echo ordering: a client's pongs and close frame never overtake the echo of a message it
sent before them. Used only when the server relays client messages (``WSSERVER_REBROADCAST``).

Why it is needed: a client's own message comes back to it through the broadcaster, on another
thread, some time after the client's session handed it over. A pong or a close reply written
right away would go out before the echo of the message that preceded the ping or close (and a
close would make the echo be dropped, or, once the client has left the hub, be delivered to
whoever connects next). Autobahn's conformance cases check exactly this order.

How: the session registers each message it hands over for relay (:meth:`EchoOrder.expect`,
*before* handing it over: the echo can come back at once) and withdraws the registration when
the message was not relayed after all (:meth:`EchoOrder.cancel`). Pongs
(:meth:`EchoOrder.send`) and the session's close frame (``Connection.close(...,
in_order=True)``) wait behind the echoes still out; the connection's write path hands every
broadcast through :meth:`EchoOrder.relay_locked` while any is, which releases what waited
right after the matching echo, in the same ``sendmsg``. A message that is never relayed must
not hold anything for long: an echo that matches releases everything queued before it (the
broadcast queue is first in, first out, so earlier echoes were not relayed), and whatever
waits is released after ``hold_limit`` (:attr:`EchoOrder.deadline`, :meth:`EchoOrder.release`,
driven by the session loop).

No I/O here: frames go to the connection through the narrow :class:`Outbox` it implements.
"""

from __future__ import annotations

import threading
import time
import weakref
from typing import Protocol, Sequence, Union

from .frames import OP_BINARY, OP_TEXT, frame_header

__all__ = ["EchoOrder", "Expected", "Outbox"]

_SAMPLE = 32  # payload bytes (or characters) Expected compares at each end

# until the session sets its own (WSSERVER_CLOSE_TIMEOUT): how long a frame may wait for an echo
DEFAULT_HOLD_LIMIT = 5.0


class Expected:
    """The frame :func:`~wsserver.frames.encode_frame` makes of one relayed message,
    recognized without keeping a copy of it.

    Why not the whole frame: the session only needs to know when *that* frame is written to
    its socket, so it keeps the frame's length, its header and the payload bytes at both ends
    (``_SAMPLE`` each): enough to tell it from other traffic at the cost of two short
    comparisons, and cheap even for a 16 MiB message. Another client sending the same bytes
    at the same moment can match instead; that only changes which of two identical frames the
    ordering waits for. Immutable once built.
    """

    __slots__ = ("length", "head", "tail")

    def __init__(self, message: str | bytes, size: int | None = None) -> None:
        """``size``: the UTF-8 length of a text ``message`` when the caller knows it."""
        if isinstance(message, str):
            opcode = OP_TEXT
            if size is None:
                size = len(message.encode("utf-8"))
            head = message[:_SAMPLE].encode("utf-8")
            tail = message[-_SAMPLE:].encode("utf-8") if size > _SAMPLE else b""
        else:
            opcode = OP_BINARY
            size = len(message)
            head = bytes(message[:_SAMPLE])
            tail = bytes(message[-_SAMPLE:]) if size > _SAMPLE else b""
        header = frame_header(opcode, size)
        self.length = len(header) + size
        self.head = header + head
        self.tail = tail

    def matches(self, frame: bytes) -> bool:
        return (
            len(frame) == self.length and frame.startswith(self.head) and frame.endswith(self.tail)
        )


class Outbox(Protocol):
    """What :class:`EchoOrder` needs of its connection. Every method is called with the
    connection's lock held (the lock :class:`EchoOrder` was given)."""

    def is_open_locked(self) -> bool:
        """Nothing final is queued or held: new frames may be sent."""
        ...

    def is_closed_locked(self) -> bool:
        """The socket is gone or detached: nothing will be written any more."""
        ...

    def queue_locked(self, frame: bytes) -> None:
        """Append ``frame`` to the outbound queue (not written yet)."""
        ...

    def queue_close_locked(self, frame: bytes) -> None:
        """Append our held close frame: the last frame the connection sends."""
        ...

    def write_locked(self) -> object:
        """Write what the socket takes now and police the byte cap (counting held bytes)."""
        ...

    def flush_locked(self) -> None:
        """Write what the socket takes now, unless the flusher owns the next write."""
        ...


_Entry = Union[Expected, bytes]


class EchoOrder:
    """The echoes one connection waits for, and the frames (pongs, the close) held behind them.

    Owned by its :class:`~wsserver.connection.Connection` (``conn.echoes``); the session
    thread registers, withdraws and sends in order, the broadcaster thread delivers echoes
    through the connection's write path.

    Thread-safety: everything here is guarded by the *connection's* lock, because holding a
    frame and releasing it must be atomic with the connection's outbound queue (a released
    pong goes out in the same write as the echo it waited for). :meth:`expect`,
    :meth:`cancel`, :meth:`send`, :meth:`release`, :meth:`release_if_due` and :meth:`settle`
    take that lock and may be called from any thread; the ``*_locked`` methods are the write
    path's and assert it is held. :attr:`deadline` and :attr:`held` may be read without it
    (a stale answer only moves a wake-up). ``hold_limit`` is set once, by the session, before
    its first :meth:`expect`.
    """

    __slots__ = (
        "hold_limit",
        "held",
        "_lock",
        "_outbox",
        "_held_bytes",
        "_since",
        "_close",
        "_settled",
    )

    def __init__(
        self, lock: threading.Lock, outbox: Outbox, hold_limit: float = DEFAULT_HOLD_LIMIT
    ) -> None:
        self.hold_limit = hold_limit
        # echoes awaited (Expected) and the frames waiting behind them, in order; read by the
        # write path's fast check ("is anything awaited?") without a method call
        # (a list: it is empty for nearly every connection's whole life and holds a few entries
        # at most, and an empty deque costs a 0.5 KB block per idle connection)
        self.held: list[_Entry] = []
        self._lock = lock
        # a weak proxy: the outbox (the Connection) owns this object, and a strong reference
        # back would make every connection a reference cycle, freed only by the cyclic GC's
        # full collections, which under churn come minutes apart (docs/reliability.md)
        self._outbox = weakref.proxy(outbox)
        self._held_bytes = 0  # bytes of the frames in ``held``: they count against the cap
        self._since: float | None = None  # when the oldest frame still held was queued
        self._close: bytes | None = None  # our close frame, waiting behind ``held``
        # notified when ``held`` empties; made by the first settle() that has to wait (a
        # condition is ~1.4 KB, and most connections never wait on one)
        self._settled: threading.Condition | None = None

    # -- the session's side (any thread) ---------------------------------------------------

    def expect(self, message: str | bytes, size: int | None = None) -> Expected:
        """``message`` is about to be handed over for relay: frames sent in order from now on
        wait for its echo. Call it *before* handing the message over. A connection already
        closing registers nothing (the returned handle is then inert)."""
        expected = Expected(message, size)
        with self._lock:
            if self._outbox.is_open_locked():
                self.held.append(expected)
        return expected

    def cancel(self, expected: Expected) -> None:
        """The message was not relayed after all: stop waiting for it. Idempotent."""
        with self._lock:
            try:
                self.held.remove(expected)
            except ValueError:
                return  # came back already (or was given up)
            self._release_ready_locked()
            self._outbox.flush_locked()

    def send(self, frame: bytes) -> bool:
        """Send ``frame`` (a pong) behind the echoes still awaited, or now if none is.
        False (nothing sent) when the connection is closing."""
        with self._lock:
            outbox = self._outbox
            if not outbox.is_open_locked():
                return False
            if self.held:
                self.held.append(frame)
                self._held_bytes += len(frame)
                if self._since is None:
                    self._since = time.monotonic()
            else:
                outbox.queue_locked(frame)
            outbox.write_locked()
            return True

    @property
    def deadline(self) -> float | None:
        """When the frames held now must go out whether or not their echo came (monotonic),
        or None when nothing is held."""
        since = self._since
        return None if since is None else since + self.hold_limit

    def release_if_due(self, now: float) -> None:
        """:meth:`release` once :attr:`deadline` has passed (the echo is late or lost)."""
        deadline = self.deadline
        if deadline is not None and now >= deadline:
            self.release()

    def release(self) -> None:
        """Stop waiting for echoes: write what was held now."""
        with self._lock:
            if self._outbox.is_closed_locked():
                return
            self._release_all_locked()
            self._outbox.flush_locked()

    def settle(self, deadline: float) -> None:
        """Block until no echo is awaited, giving up (and releasing what was held) at
        ``deadline``: the connection drains this before it leaves, because what is held is
        owed to the client and an echo still queued when it leaves the hub would go to nobody."""
        with self._lock:
            while self.held and not self._outbox.is_closed_locked():
                left = deadline - time.monotonic()
                if left <= 0:
                    self._release_all_locked()
                    break
                if self._settled is None:
                    self._settled = threading.Condition(self._lock)
                self._settled.wait(left)

    # -- the write path's side (the connection's lock held) --------------------------------

    @property
    def held_bytes(self) -> int:
        return self._held_bytes

    def hold_close_locked(self, frame: bytes) -> bool:
        """Hold our close ``frame`` behind the echoes awaited: True if held, False when none
        is awaited (the caller sends it now)."""
        assert self._lock.locked()
        if not self.held:
            return False
        self._close = frame
        if self._since is None:
            self._since = time.monotonic()
        return True

    def relay_locked(
        self, frames: Sequence[bytes], plain: Sequence[bytes] | None = None
    ) -> None:
        """Queue broadcast ``frames`` while echoes are awaited: when one of them is an echo,
        what was held before that echo goes first (echoes before it were not relayed: the
        queue is first in, first out), then the echo, then what waited for exactly that echo.
        Frames after a released close are not sent. ``plain``: the uncompressed frames
        ``frames`` stand for (permessage-deflate), which the echoes are recognized by."""
        assert self._lock.locked()
        held, outbox = self.held, self._outbox
        for n, frame in enumerate(frames):
            seen = frame if plain is None else plain[n]
            index = -1
            for i, entry in enumerate(held):
                if isinstance(entry, Expected) and entry.matches(seen):
                    index = i
                    break
            if index < 0:
                outbox.queue_locked(frame)
                continue
            for _ in range(index):
                entry = held.pop(0)
                if not isinstance(entry, Expected):
                    self._held_bytes -= len(entry)
                    outbox.queue_locked(entry)
            held.pop(0)
            outbox.queue_locked(frame)
            if self._release_ready_locked():
                break  # our close went out: nothing follows it

    def clear_locked(self) -> None:
        """Drop the bookkeeping and what waited behind it (the connection is ending)."""
        assert self._lock.locked()
        self.held.clear()
        self._held_bytes = 0
        self._since = None
        self._close = None
        self._notify_settled_locked()

    def _release_ready_locked(self) -> bool:
        """Queue the held frames no echo is awaited before; the close once nothing is.
        True when the close was queued."""
        held, outbox = self.held, self._outbox
        while held and not isinstance(held[0], Expected):
            frame = held.pop(0)
            assert isinstance(frame, bytes)
            self._held_bytes -= len(frame)
            outbox.queue_locked(frame)
        if held:
            if not self._held_bytes and self._close is None:
                self._since = None  # only echoes are awaited: nothing is kept waiting
            return False
        self._since = None
        self._notify_settled_locked()
        if self._close is None:
            return False
        frame, self._close = self._close, None
        outbox.queue_close_locked(frame)
        return True

    def _release_all_locked(self) -> None:
        """Give up on the echoes still out: queue every held frame, then the close."""
        self.held[:] = [entry for entry in self.held if not isinstance(entry, Expected)]
        self._release_ready_locked()

    def _notify_settled_locked(self) -> None:
        if self._settled is not None:
            self._settled.notify_all()
