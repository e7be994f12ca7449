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

Order: the client's own messages come back to it through the broadcaster thread, so a pong
or close frame written straight away could overtake the echo of a message the client sent
before its ping or close (and a close would make that echo be dropped, or be delivered to
the next client to connect once this one has left the hub). Each relayed message is
therefore registered with the connection before it is handed over
(:meth:`~wsserver.connection.Connection.expect_echo`), and pongs and close frames are sent
*in order*: behind those echoes, for at most ``close_timeout`` each.
"""

from __future__ import annotations

import logging
import select
import socket
import sys
import threading
import time
from typing import TYPE_CHECKING, Callable, NamedTuple, Union

from wsproto.connection import ConnectionState
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage
from wsproto.utilities import LocalProtocolError

from . import audit
from .connection import Connection
from .frames import OP_CLOSE, OP_PING, OP_PONG, FrameMatch, encode_frame
from .limits import TokenBucket
from .protocol import (
    CLOSE_INTERNAL_ERROR,
    CLOSE_MESSAGE_TOO_BIG,
    CLOSE_POLICY_VIOLATION,
    CLOSE_TOKEN_EXPIRED,
    is_command,
)

if TYPE_CHECKING:
    from wsproto import WSConnection

    from .config import Settings
    from .transport import Transport

__all__ = ["run_session"]

log = logging.getLogger(__name__)

_RECV_BYTES = 65536


class _Wakeups:
    """Counts connection threads awake at once, and raises the GIL switch interval while
    very many are.

    Why: when thousands of peers leave within the same second (a network blip, a proxy
    restart, the benchmark closing 10,000 clients), every connection thread returns from
    ``poll`` at once and waits for the GIL, and CPython's GIL waiters wake on a timer every
    switch interval (5 ms) to ask for it: N waiters make N/0.005 wake-ups a second. Measured
    with 5,000 clients closed together: ~9 ms of worker CPU per connection (8.3 ms of it in
    the kernel), 13-25 s before all were gone, ``GET /`` timing out meanwhile, and once the
    worker missed gunicorn's heartbeat and was killed. With the interval at 0.5 s while the
    storm lasts, 10,000 cost 0.41 ms each and were gone in 3.3 s. In normal traffic a handful
    of threads are awake at once and the interval stays as it was; it only changes how long
    a thread that never blocks may keep the GIL when others want it, and ours all block
    (on a socket) within milliseconds. The first thread to go back to ``poll`` after ``HOLD``
    restores it; with no connection traffic at all it stays raised, which costs nothing while
    nothing contends for the GIL.
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
# frame (about 10 us each), so a peer still flooding tiny frames is cut after ~40 ms of it
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


class _Inbound:
    """What the peer sends and the limits on it: the message being reassembled (its bytes
    and its frames, ``max_message_size`` and ``max_fragments``), complete messages per
    second (``rate_limit``), and pings and unsolicited pongs per second
    (``max_control_rate``).

    Why count frames and not only bytes: an unfinished message followed by empty
    continuation frames adds no bytes, and without a frame count a peer could send those
    for ever (each one cost a list entry and parse time). Why count control frames: every
    ping costs a pong; unbounded, a peer had the worker answer a million of them in 5 s.
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
        self._too_big = _Limit(
            CLOSE_MESSAGE_TOO_BIG,
            f"message over {self._max_size} bytes",
            "message_too_big",
            f"WSSERVER_MAX_MESSAGE_SIZE={self._max_size}",
        )
        self._too_many_frames = _Limit(
            CLOSE_MESSAGE_TOO_BIG,
            f"message over {self._max_frames} frames (WSSERVER_MAX_FRAGMENTS)",
            "too_many_fragments",
            f"WSSERVER_MAX_FRAGMENTS={self._max_frames}",
        )
        self._too_fast = _Limit(
            CLOSE_POLICY_VIOLATION,
            "rate limit exceeded",
            "rate_limit",
            f"WSSERVER_RATE_LIMIT={rate:g}",
        )
        self._control_flood = _Limit(
            CLOSE_POLICY_VIOLATION,
            f"control frames over {control:g}/s (WSSERVER_MAX_CONTROL_RATE)",
            "control_rate",
            f"WSSERVER_MAX_CONTROL_RATE={control:g}",
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
                return self._too_big
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


def run_session(
    transport: Transport,
    conn: Connection,
    settings: Settings,
    on_message: Callable[[Connection, Payload], None],
) -> str:
    """Serve ``conn`` until it ends; returns why it ended (for the log)."""
    sock = transport.sock
    proto = transport.protocol
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    inbound = _Inbound(settings)
    relayed = settings.rebroadcast
    # how long a pong or close frame may wait for the echo of an earlier message
    hold_limit = settings.close_timeout

    now = time.monotonic()
    next_ping = now + settings.ping_interval
    life_deadline: float | None = None  # set when a ping is out: show life by then
    close_deadline: float | None = None
    after_close = 0  # bytes the peer sent once we were closing
    peer_unresponsive = False
    why = "closed"
    awake = False  # counted in _WAKEUPS: between a poll that returned and the next poll

    try:
        while True:
            if awake:
                _WAKEUPS.leave()
                awake = False
            now = time.monotonic()
            held_since = conn.held_since
            if held_since is not None and now >= held_since + hold_limit:
                conn.release_held()  # the echo is late or lost: stop holding frames for it
                held_since = None
            if conn.closing and close_deadline is None:
                close_deadline = now + settings.close_timeout
                if not conn.close_sent:
                    close_deadline += hold_limit  # our close waits for an echo first
            if close_deadline is not None and now >= close_deadline:
                why, peer_unresponsive = "no close reply", True
                break
            if life_deadline is not None and now >= life_deadline:
                _close_for(conn, _keepalive_timeout(settings))
                why, peer_unresponsive = "keepalive timeout", True
                break
            token_deadline = _token_deadline(conn, now)
            if token_deadline is not None and now >= token_deadline and not conn.closing:
                _close_for(conn, _TOKEN_EXPIRED)
                continue
            if now >= next_ping and close_deadline is None:
                conn.send(_PING)
                inbound.pings_out += 1
                next_ping = now + settings.ping_interval
                if life_deadline is None:
                    life_deadline = now + settings.ping_timeout
            hold_deadline = None if held_since is None else held_since + hold_limit
            wake_at = min(
                t
                for t in (next_ping, life_deadline, close_deadline, hold_deadline, token_deadline)
                if t is not None
            )
            if not poller.poll(max(wake_at - now, 0.0) * 1000 + 1):
                continue
            _WAKEUPS.enter()
            awake = True
            try:
                data = sock.recv(_RECV_BYTES)
            except OSError:
                why = "reset"
                break
            if not data:
                why = "slow consumer" if conn.slow else "eof"
                break
            life_deadline = None  # any bytes prove the peer is there
            if conn.closing:
                after_close += len(data)
                if after_close > _LINGER_BYTES:  # still flooding after our close: cut it
                    why, peer_unresponsive = "no close reply", True
                    break
            try:
                proto.receive_data(data)
            except LocalProtocolError:
                why = "data after close"
                break
            ended = _handle_events(proto, conn, inbound, relayed, on_message)
            if ended is not None:
                why, peer_unresponsive = ended
                break
    finally:
        drained = conn.drain(settings.close_timeout)
        transport.release()
        if peer_unresponsive or conn.slow or not drained:
            # no graceful half-close for a peer that is not listening (or has failed the
            # protocol): gunicorn would linger on it
            _discard_pending_input(sock)
            conn.abort()
        elif not _await_peer_close(sock, settings.close_timeout):
            conn.abort()  # the peer keeps its side open: cut it here, not in gunicorn
        if awake:
            _WAKEUPS.leave()
    return why


def _handle_events(
    proto: WSConnection,
    conn: Connection,
    inbound: _Inbound,
    relayed: bool,
    on_message: Callable[[Connection, Payload], None],
) -> tuple[str, bool] | None:
    """Act on what wsproto parsed, frame by frame. Returns why the session ends and whether
    the peer is to be cut without waiting (a close handshake done or failed), or None to go
    on reading. Once a limit is broken the connection is closing: what the peer sent after
    the frame that broke it is parsed only to find its close reply, and discarded."""
    for event in proto.events():
        if isinstance(event, CloseConnection):
            if proto.state is ConnectionState.OPEN:
                # wsproto could not parse the peer's bytes: fail the connection
                code = event.code
                text = event.reason or "protocol error"
                _close_for(conn, _Limit(code, text, "protocol_error", f"close {code}"))
                # RFC 6455 7.1.7: fail the connection, do not wait for the peer
                return f"protocol error {event.code}", True
            if not conn.closing:
                _reply_to_close(conn, event.code)
                return f"peer closed {event.code}", False
            return "closed", False
        if conn.closing:  # what the peer still sends is discarded ...
            inbound.discarded += 1
            if inbound.discarded > _DISCARD_FRAMES:  # ... but a flood of it is not parsed
                return "no close reply", True
            continue
        if isinstance(event, (TextMessage, BytesMessage)):
            outcome = inbound.data(event)
            if outcome is None:
                continue
            if isinstance(outcome, _Limit):
                _close_for(conn, outcome)
                continue
            message, size = outcome
            _deliver(conn, message, size, relayed, on_message)
        elif isinstance(event, (Ping, Pong)):
            broken = inbound.ping() if isinstance(event, Ping) else inbound.pong()
            if broken is not None:
                _close_for(conn, broken)
                continue
            if isinstance(event, Ping):
                conn.send_in_order(encode_frame(OP_PONG, bytes(event.payload)))
    return None


_TOKEN_EXPIRED = _Limit(CLOSE_TOKEN_EXPIRED, "token expired", "token_expired", "token exp passed")


def _keepalive_timeout(settings: Settings) -> _Limit:
    return _Limit(
        CLOSE_INTERNAL_ERROR,
        "keepalive ping timeout",
        "keepalive_timeout",
        f"WSSERVER_PING_TIMEOUT={settings.ping_timeout:g}",
    )


def _discard_pending_input(sock: socket.socket) -> None:
    """Read away what already arrived, without waiting: closing a socket with unread input
    makes the kernel send a reset, which can destroy our close frame still in flight. At
    most ``_LINGER_BYTES``: a peer still flooding would otherwise keep this loop going for
    as long as it sends."""
    discarded = 0
    try:
        while discarded < _LINGER_BYTES:
            data = sock.recv(_RECV_BYTES, socket.MSG_DONTWAIT)
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
    this, gunicorn's drain sees end of input at once (or a cut socket)."""
    try:
        sock.shutdown(socket.SHUT_WR)
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
            data = sock.recv(_RECV_BYTES)
        except OSError:
            return True
        if not data:
            return True
        drained += len(data)
    return False


def _deliver(
    conn: Connection,
    message: Payload,
    size: int,
    relayed: bool,
    on_message: Callable[[Connection, Payload], None],
) -> None:
    """Hand a complete message to the service, registering its echo first when it may be
    relayed back to this client.

    ``on_message`` either relays the message (its frame comes back to us through the
    broadcaster, maybe before this call returns, hence registering first) or answers this
    client directly with ``conn.send`` (a command, relay off, queue full): a direct answer
    means no echo is coming, so the expectation is withdrawn. Commands are never relayed
    (and a resume is answered from the broadcaster thread), so they register nothing."""
    if not relayed or (isinstance(message, str) and is_command(message)):
        on_message(conn, message)
        return
    match = FrameMatch(message, size)
    conn.expect_echo(match)
    replies = conn.replies
    try:
        on_message(conn, message)
    finally:
        if conn.replies != replies:
            conn.cancel_echo(match)


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
