"""The life of one WebSocket connection, run on the gunicorn thread that accepted it.

This thread is the connection's only thread: it reads and parses inbound frames (wsproto),
answers pings, sends keepalive pings and enforces their timeout, enforces the inbound size
limit, runs the close handshake, and hands complete messages to the service. It writes only
through :class:`~wsserver.connection.Connection` (the one write path).

Every wait has a timeout: the next keepalive ping, the ping deadline, or the close deadline.
The thread returns, and the gunicorn thread is freed, when:

* the peer closes (we reply, drain, return);
* we close (slow consumer, shutdown, size limit, protocol error) and the peer replies or
  ``close_timeout`` passes;
* the peer shows no sign of life for ``ping_timeout`` after a ping (half-open TCP);
* the socket fails or ends (reset, EOF).

Order: when client messages are relayed, the session expects the echo of each one it hands
over, and sends its pongs and close frames *in order*, behind those echoes, for at most
``close_timeout`` each (:mod:`wsserver.echo`, ``conn.echoes``).

The loop is :class:`Session`; :func:`run_session` is the entry point :mod:`wsserver.ws` calls.
"""

from __future__ import annotations

import functools
import logging
import select
import socket
import sys
import threading
import time
from typing import TYPE_CHECKING, Callable, NamedTuple, Optional, Union

from wsproto.connection import ConnectionState
from wsproto.events import BytesMessage, CloseConnection, Event, Ping, Pong, TextMessage
from wsproto.utilities import LocalProtocolError

from . import audit
from .codes import (
    CLOSE_INTERNAL_ERROR,
    CLOSE_MESSAGE_TOO_BIG,
    CLOSE_POLICY_VIOLATION,
    CLOSE_TOKEN_EXPIRED,
    REASON_KEEPALIVE_TIMEOUT,
    REASON_RATE_LIMIT,
    REASON_SLOW_CONSUMER,
    REASON_TOKEN_EXPIRED,
)
from .connection import Connection, TlsConnection
from .frames import OP_CLOSE, OP_PING, OP_PONG, encode_frame
from .limits import TokenBucket
from .protocol import is_command

if TYPE_CHECKING:
    from .config import Settings
    from .transport import Transport

__all__ = ["OnMessage", "Session", "run_session"]

log = logging.getLogger(__name__)

_RECV_BYTES = 65536


class _Wakeups:
    """Counts connection threads awake at once, and raises the GIL switch interval while
    very many are.

    Why: when thousands of peers leave within the same second (a network blip, a proxy
    restart, the benchmark closing 10,000 clients), every connection thread returns from
    ``poll`` at once and waits for the GIL, and CPython's GIL waiters wake on a timer every
    switch interval (5 ms) to ask for it: N waiters make N/0.005 wake-ups a second, enough
    to stall the worker (``GET /`` unanswered, gunicorn's heartbeat missed); what it cost
    before and after this guard is measured in docs/performance.md ("Mass disconnects").
    In normal traffic a handful of threads are awake at once and the interval stays as it
    was; it only changes how long a thread that never blocks may keep the GIL when others
    want it, and ours all block (on a socket) within milliseconds. The first thread to go
    back to ``poll`` after ``HOLD`` restores it; with no connection traffic at all it stays
    raised, which costs nothing while nothing contends for the GIL.
    """

    HIGH = 32  # awake threads from which the interval is raised (128 reacted too late)
    LOW = 8  # ... and at or below which it is restored,
    HOLD = 2.0  # ... once it has lasted this long since the last wake-up
    STORM_INTERVAL = 0.5

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._awake = 0
        self._normal: float | None = None  # the interval to restore while raised
        self._raised_at = 0.0

    def enter(self) -> None:
        with self._lock:
            self._awake += 1
            if self._awake >= self.HIGH and self._normal is None:
                self._normal = sys.getswitchinterval()
                sys.setswitchinterval(max(self._normal, self.STORM_INTERVAL))
                log.info(
                    "%d connection threads awake at once: GIL switch interval %.1f s for now",
                    self._awake,
                    sys.getswitchinterval(),
                )
            if self._normal is not None:
                self._raised_at = time.monotonic()

    def leave(self) -> None:
        with self._lock:
            self._awake -= 1
            if (
                self._awake <= self.LOW
                and self._normal is not None
                and time.monotonic() - self._raised_at >= self.HOLD
            ):
                sys.setswitchinterval(self._normal)
                self._normal = None

    @property
    def raised(self) -> bool:
        return self._normal is not None


_WAKEUPS = _Wakeups()
_LINGER_BYTES = 1 << 20  # what a closed peer may still send before we cut the connection
# ... and the frames it may still send while we wait for its close reply: parsing costs per
# frame, so a peer still flooding tiny frames is cut after this many
_DISCARD_FRAMES = 4096
_PING = encode_frame(OP_PING, b"")

Payload = Union[str, bytes]


class _Limit(NamedTuple):
    """A limit the peer broke: the close it gets, and how the close is reported (a fixed
    ``audit`` reason and the setting involved)."""

    code: int
    text: str
    reason: str
    detail: str


def _close_for(conn: Connection, limit: _Limit) -> None:
    """Close ``conn`` for ``limit`` (in order, behind its echoes) and report it, once: a
    connection already closing is neither closed nor counted again."""
    if conn.close(limit.code, limit.text, in_order=True):
        audit.closed(limit.reason, conn.remote, limit.detail)


@functools.lru_cache(maxsize=16)
def _limits(
    max_size: int, max_frames: int, rate: float, control: float
) -> tuple[_Limit, _Limit, _Limit, _Limit]:
    """The closes of :class:`_Inbound`'s limits, made once per set of settings: every
    connection's own copies (four tuples, seven formatted strings) were ~0.8 KB of each idle
    connection (docs/performance.md, "where the KB go")."""
    return (
        _Limit(
            CLOSE_MESSAGE_TOO_BIG,
            f"message over {max_size} bytes",
            "message_too_big",
            f"WSSERVER_MAX_MESSAGE_SIZE={max_size}",
        ),
        _Limit(
            CLOSE_MESSAGE_TOO_BIG,
            f"message over {max_frames} frames (WSSERVER_MAX_FRAGMENTS)",
            "too_many_fragments",
            f"WSSERVER_MAX_FRAGMENTS={max_frames}",
        ),
        _Limit(
            CLOSE_POLICY_VIOLATION, REASON_RATE_LIMIT, "rate_limit", f"WSSERVER_RATE_LIMIT={rate:g}"
        ),
        _Limit(
            CLOSE_POLICY_VIOLATION,
            f"control frames over {control:g}/s (WSSERVER_MAX_CONTROL_RATE)",
            "control_rate",
            f"WSSERVER_MAX_CONTROL_RATE={control:g}",
        ),
    )


class _Inbound:
    """What the peer sends and the limits on it: the message being reassembled (its bytes
    and its frames, ``max_message_size`` and ``max_fragments``), complete messages per
    second (``rate_limit``), and pings and unsolicited pongs per second
    (``max_control_rate``).

    Why count frames and not only bytes: an unfinished message followed by empty
    continuation frames adds no bytes, and without a frame count a peer could send those
    for ever (each one cost a list entry and parse time). Why count control frames: every
    ping costs a pong; unbounded, a flooding peer kept the worker answering
    (docs/security.md, ping floods).
    Each frame is counted as wsproto yields it, so one read holding thousands of pings is
    cut at the limit, not answered first.

    Thread-safety: none needed; the connection's own thread owns it.
    """

    def __init__(self, settings: Settings) -> None:
        self._max_size = settings.max_message_size
        self._max_frames = settings.max_fragments
        self._parts: list[Payload] = []
        self._size = 0
        self._frames = 0
        rate, control = settings.rate_limit, settings.max_control_rate
        self._messages = TokenBucket(rate, 2 * rate)
        self._controls = TokenBucket(control, 2 * control)
        self.pings_out = 0  # our keepalive pings not answered yet: their pongs are free
        self.discarded = 0  # frames parsed and dropped while closing
        self.too_big, self._too_many_frames, self._too_fast, self._control_flood = _limits(
            self._max_size, self._max_frames, rate, control
        )

    def data(self, event: TextMessage | BytesMessage) -> _Limit | tuple[Payload, int] | None:
        """One data frame: the complete message and its size when it ends one, the limit
        it breaks, or None (more frames to come)."""
        self._frames += 1
        if self._frames > self._max_frames:
            self._reset()
            return self._too_many_frames
        raw = event.data
        chunk: Payload = bytes(raw) if isinstance(raw, bytearray) else raw
        if chunk:
            self._size += _size_of(chunk)
            if self._size > self._max_size:
                self._reset()
                return self.too_big
            self._parts.append(chunk)
        if not event.message_finished:
            return None
        empty: Payload = "" if isinstance(event, TextMessage) else b""
        message = _join(self._parts) if self._parts else empty
        size = self._size
        self._reset()
        if not self._messages.take():
            return self._too_fast
        return message, size

    def ping(self) -> _Limit | None:
        return None if self._controls.take() else self._control_flood

    def pong(self) -> _Limit | None:
        if self.pings_out:
            self.pings_out = 0  # the answer to our keepalive (one answers them all)
            return None
        return self.ping()

    def _reset(self) -> None:
        self._parts, self._size, self._frames = [], 0, 0


OnMessage = Callable[[Connection, Payload], Optional[bool]]
"""The service's handler of a complete client message. It returns True when it handed the
message over for relay, so that the message's echo will come back to this client through the
broadcaster; anything else (False, None) says it was not relayed (a command, an answer sent
directly, a refusal). The session withdraws the echo it expected on anything but True."""


def run_session(
    transport: Transport, conn: Connection, settings: Settings, on_message: OnMessage
) -> str:
    """Serve ``conn`` until it ends; returns why it ended (for the log)."""
    return Session(transport, conn, settings, on_message).run()


class Session:
    """One connection's life on its own thread: the read loop and its deadlines.

    Each turn of :meth:`run` checks the deadlines (:meth:`_check_deadlines`: echoes held too
    long, the close handshake, keepalive, token expiry, the next ping), waits for input until
    the nearest one (:meth:`_wait`, counted in the mass wake-up guard), then parses what came
    (:meth:`_receive`) and acts on it frame by frame (:meth:`_on_event`); inbound assembly and
    its limits are :class:`_Inbound`'s, message rates a :class:`~wsserver.limits.TokenBucket`'s.
    :meth:`_finish` drains and ends the TCP connection.

    Thread-safety: a Session belongs to the connection's own thread; nothing in it is shared.
    Other threads reach the client only through its :class:`~wsserver.connection.Connection`.
    """

    def __init__(
        self, transport: Transport, conn: Connection, settings: Settings, on_message: OnMessage
    ) -> None:
        self.conn = conn
        self._transport = transport
        self._sock = transport.sock
        # TLS: the connection reads (decrypts) under its write lock; None means "not yet"
        self._recv: Callable[[int], bytes | None] = (
            conn.recv if isinstance(conn, TlsConnection) else transport.sock.recv
        )
        self._proto = transport.protocol
        self._settings = settings
        self._on_message = on_message
        self._poller = select.poll()
        self._poller.register(self._sock, select.POLLIN)
        self._inbound = _Inbound(settings)
        self._relayed = settings.rebroadcast
        # how long a pong or close frame may wait for the echo of an earlier message
        conn.echoes.hold_limit = settings.close_timeout
        self._next_ping = time.monotonic() + settings.ping_interval
        self._life_deadline: float | None = None  # set when a ping is out: show life by then
        self._close_deadline: float | None = None  # set once we close: the reply is due by then
        self._after_close = 0  # bytes the peer sent once we were closing
        self._unresponsive = False  # end without a graceful half-close
        self._awake = False  # counted in _WAKEUPS: between a poll that returned and the next

    def run(self) -> str:
        """Serve the connection until it ends; returns why it ended (for the log)."""
        why: str | None = None
        try:
            while why is None:
                self._sleep()
                now = time.monotonic()
                why = self._check_deadlines(now)
                if why is None and self._wait(now):
                    why = self._receive()
        finally:
            self._finish()
        return why or "closed"

    # -- deadlines ---------------------------------------------------------------------------

    def _check_deadlines(self, now: float) -> str | None:
        """Act on every deadline passed by ``now``: why the session ends, or None."""
        conn = self.conn
        conn.echoes.release_if_due(now)  # an echo late or lost holds nothing any longer
        self._start_close_wait(now)
        if self._close_deadline is not None and now >= self._close_deadline:
            self._unresponsive = True
            return "no close reply"
        if self._life_deadline is not None and now >= self._life_deadline:
            _close_for(conn, _keepalive_timeout(self._settings))
            self._unresponsive = True
            return "keepalive timeout"
        token_deadline = _token_deadline(conn, now)
        if token_deadline is not None and now >= token_deadline and not conn.closing:
            _close_for(conn, _TOKEN_EXPIRED)
            self._start_close_wait(now)
        if now >= self._next_ping and self._close_deadline is None:
            self._ping(now)
        return None

    def _start_close_wait(self, now: float) -> None:
        """Once we are closing, the peer's reply is due within ``close_timeout`` (plus the
        time our close may wait behind an echo)."""
        conn = self.conn
        if conn.closing and self._close_deadline is None:
            self._close_deadline = now + self._settings.close_timeout
            if not conn.close_sent:
                self._close_deadline += conn.echoes.hold_limit

    def _ping(self, now: float) -> None:
        """Keepalive: a ping every ``ping_interval``; the peer must show life (any bytes)
        within ``ping_timeout`` of the first one not answered."""
        self.conn.send(_PING)
        self._inbound.pings_out += 1
        self._next_ping = now + self._settings.ping_interval
        if self._life_deadline is None:
            self._life_deadline = now + self._settings.ping_timeout

    def _wait(self, now: float) -> bool:
        """Wait for input until the nearest deadline. True when there is some (this thread
        is then counted awake until its next wait)."""
        wake_at = min(
            t
            for t in (
                self._next_ping,
                self._life_deadline,
                self._close_deadline,
                self.conn.echoes.deadline,
                _token_deadline(self.conn, now),
            )
            if t is not None
        )
        if not self._poller.poll(max(wake_at - now, 0.0) * 1000 + 1):
            return False
        _WAKEUPS.enter()
        self._awake = True
        return True

    def _sleep(self) -> None:
        """About to wait again: no longer counted awake."""
        if self._awake:
            _WAKEUPS.leave()
            self._awake = False

    # -- input -------------------------------------------------------------------------------

    def _receive(self) -> str | None:
        """Read what arrived and act on it: why the session ends, or None."""
        conn = self.conn
        try:
            data = self._recv(_RECV_BYTES)
        except OSError:
            return "reset"
        if data is None:  # TLS: part of a record came, nothing to parse yet
            return None
        if not data:
            return REASON_SLOW_CONSUMER if conn.slow else "eof"
        self._life_deadline = None  # any bytes prove the peer is there
        if conn.closing:
            self._after_close += len(data)
            if self._after_close > _LINGER_BYTES:  # still flooding after our close: cut it
                self._unresponsive = True
                return "no close reply"
        try:
            self._proto.receive_data(data)
        except LocalProtocolError:
            return "data after close"
        for event in self._proto.events():
            ended = self._on_event(event)
            if ended is not None:
                why, self._unresponsive = ended
                return why
        return None

    def _on_event(self, event: Event) -> tuple[str, bool] | None:
        """Act on one parsed frame. Returns why the session ends and whether the peer is to
        be cut without waiting (a close handshake done or failed), or None to go on. Once a
        limit is broken the connection is closing: what the peer sent after the frame that
        broke it is parsed only to find its close reply, and discarded."""
        conn = self.conn
        if isinstance(event, CloseConnection):
            return self._on_close(event)
        if conn.closing:  # what the peer still sends is discarded ...
            self._inbound.discarded += 1
            if self._inbound.discarded > _DISCARD_FRAMES:  # ... but a flood of it is not parsed
                return "no close reply", True
            return None
        if isinstance(event, (TextMessage, BytesMessage)):
            outcome = self._inbound.data(event)
            if isinstance(outcome, _Limit):
                _close_for(conn, outcome)
            elif outcome is not None:
                self._deliver(*outcome)
        elif isinstance(event, Ping):
            broken = self._inbound.ping()
            if broken is not None:
                _close_for(conn, broken)
            else:
                conn.echoes.send(encode_frame(OP_PONG, bytes(event.payload)))
        elif isinstance(event, Pong):
            broken = self._inbound.pong()
            if broken is not None:
                _close_for(conn, broken)
        return None

    def _on_close(self, event: CloseConnection) -> tuple[str, bool]:
        """The peer's close frame: answer it (in order, behind the echoes of what the peer
        sent before it), or fail the connection when wsproto could not parse its bytes."""
        conn = self.conn
        if self._proto.state is ConnectionState.OPEN:
            # wsproto could not parse the peer's bytes: fail the connection
            code = event.code
            if code == CLOSE_MESSAGE_TOO_BIG:
                # only a compressed message inflated past WSSERVER_MAX_MESSAGE_SIZE makes
                # the parser say so (transport.InboundDeflate): the size limit's own close
                _close_for(conn, self._inbound.too_big)
                return "message too big (inflated)", True
            text = event.reason or "protocol error"
            _close_for(conn, _Limit(code, text, "protocol_error", f"close {code}"))
            # RFC 6455 7.1.7: fail the connection, do not wait for the peer
            return f"protocol error {event.code}", True
        if not conn.closing:
            _reply_to_close(conn, event.code)
            return f"peer closed {event.code}", False
        return "closed", False

    def _deliver(self, message: Payload, size: int) -> None:
        """Hand a complete message to the service, expecting its echo first when it may be
        relayed back to this client.

        The echo can come back through the broadcaster before ``on_message`` returns, hence
        expecting it first; the handler's return value says whether it relayed the message
        (see :data:`OnMessage`), and a message not relayed holds nothing back. Commands are
        never relayed, so they expect nothing."""
        conn = self.conn
        if not self._relayed or (isinstance(message, str) and is_command(message)):
            self._on_message(conn, message)
            return
        expected = conn.echoes.expect(message, size)
        relayed = False
        try:
            relayed = self._on_message(conn, message) is True
        finally:
            if not relayed:
                conn.echoes.cancel(expected)

    # -- the end -----------------------------------------------------------------------------

    def _finish(self) -> None:
        """Drain what is owed to the peer, hand the socket back, and end the TCP connection:
        gracefully (half-close, await the peer's FIN) for a peer that is listening, cut for
        one that is not (or has failed the protocol): gunicorn would linger on it."""
        conn, sock = self.conn, self._sock
        try:
            drained = conn.drain(self._settings.close_timeout)
            self._transport.release()
            if self._unresponsive or conn.slow or not drained:
                _discard_pending_input(sock)
                conn.abort()
            elif not _await_peer_close(sock, self._settings.close_timeout):
                conn.abort()  # the peer keeps its side open: cut it here, not in gunicorn
        finally:
            self._sleep()

_TOKEN_EXPIRED = _Limit(
    CLOSE_TOKEN_EXPIRED, REASON_TOKEN_EXPIRED, "token_expired", "token exp passed"
)


def _keepalive_timeout(settings: Settings) -> _Limit:
    return _Limit(
        CLOSE_INTERNAL_ERROR,
        REASON_KEEPALIVE_TIMEOUT,
        "keepalive_timeout",
        f"WSSERVER_PING_TIMEOUT={settings.ping_timeout:g}",
    )


def _discard_pending_input(sock: socket.socket) -> None:
    """Read away what already arrived, without waiting: closing a socket with unread input
    makes the kernel send a reset, which can destroy our close frame still in flight. At
    most ``_LINGER_BYTES``: a peer still flooding would otherwise keep this loop going for
    as long as it sends. The plain socket's ``recv``, also for TLS (which takes no flags):
    what is discarded need not be decrypted."""
    discarded = 0
    try:
        while discarded < _LINGER_BYTES:
            data = socket.socket.recv(sock, _RECV_BYTES, socket.MSG_DONTWAIT)
            if not data:
                return
            discarded += len(data)
    except OSError:
        pass


def _await_peer_close(sock: socket.socket, timeout: float) -> bool:
    """End the TCP connection the way RFC 6455 section 7.1.1 asks, on this thread: half-close
    (our FIN follows our last frame), then read and discard until the peer's FIN. True when
    it came (or the socket is gone); False after ``timeout`` or ``_LINGER_BYTES``.

    Why here: gunicorn does the same half-close and drain once the route returns, but on its
    main thread, blocking for up to two seconds, so a peer that answers the close handshake
    and keeps its side open would stall every accept and keep-alive request meanwhile. After
    this, gunicorn's drain sees end of input at once (or a cut socket).

    The plain socket's calls, also for TLS: ``SSLSocket.shutdown`` would drop the SSL object
    another thread may still hold, and what the peer sends now is discarded undecrypted."""
    try:
        socket.socket.shutdown(sock, socket.SHUT_WR)
    except OSError:
        return True
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    deadline = time.monotonic() + timeout
    drained = 0
    while drained < _LINGER_BYTES:
        left = deadline - time.monotonic()
        if left <= 0 or not poller.poll(left * 1000 + 1):
            return False
        try:
            data = socket.socket.recv(sock, _RECV_BYTES)
        except (BlockingIOError, InterruptedError):  # a TLS socket is non-blocking
            continue
        except OSError:
            return True
        if not data:
            return True
        drained += len(data)
    return False


def _token_deadline(conn: Connection, now: float) -> float | None:
    """When the connection's token expires, on the monotonic clock (None: no token)."""
    identity = conn.identity
    if identity is None:
        return None
    return now + (identity.expires_at - time.time())


def _reply_to_close(conn: Connection, code: int | None) -> None:
    """Echo the peer's close code (RFC 6455 section 5.5.1); none for a bare close. The reply
    follows the echoes of the messages the peer sent before its close."""
    if code is None or code == 1005:
        conn.send_close_frame(encode_frame(OP_CLOSE, b""), in_order=True)
    else:
        conn.send_close_frame(encode_frame(OP_CLOSE, code.to_bytes(2, "big")), in_order=True)


def _size_of(chunk: Payload) -> int:
    if isinstance(chunk, str):
        return len(chunk) if chunk.isascii() else len(chunk.encode("utf-8"))
    return len(chunk)


def _join(parts: list[Payload]) -> Payload:
    if len(parts) == 1:
        first = parts[0]
        return bytes(first) if isinstance(first, bytearray) else first
    if isinstance(parts[0], str):
        return "".join(parts)  # type: ignore[arg-type]
    return b"".join(parts)  # type: ignore[arg-type]
