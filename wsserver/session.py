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
from typing import TYPE_CHECKING, Callable, Union

from wsproto.connection import ConnectionState
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage
from wsproto.utilities import LocalProtocolError

from .connection import Connection
from .frames import OP_CLOSE, OP_PING, OP_PONG, FrameMatch, encode_frame
from .protocol import (
    CLOSE_INTERNAL_ERROR,
    CLOSE_MESSAGE_TOO_BIG,
    CLOSE_POLICY_VIOLATION,
    CLOSE_TOKEN_EXPIRED,
    is_command,
)

if TYPE_CHECKING:
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
_PING = encode_frame(OP_PING, b"")

Payload = Union[str, bytes]


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
    max_size = settings.max_message_size
    # how long a pong or close frame may wait for the echo of an earlier message
    hold_limit = settings.close_timeout

    now = time.monotonic()
    next_ping = now + settings.ping_interval
    life_deadline: float | None = None  # set when a ping is out: show life by then
    close_deadline: float | None = None
    parts: list[Payload] = []
    size = 0
    # inbound rate limit: a token bucket of 2 s worth of messages, refilled at `rate` per second
    rate = settings.rate_limit
    allowance, refilled = 2 * rate, now
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
                conn.close(CLOSE_INTERNAL_ERROR, "keepalive ping timeout", in_order=True)
                why, peer_unresponsive = "keepalive timeout", True
                break
            token_deadline = _token_deadline(conn, now)
            if token_deadline is not None and now >= token_deadline and not conn.closing:
                conn.close(CLOSE_TOKEN_EXPIRED, "token expired", in_order=True)
                continue
            if now >= next_ping and close_deadline is None:
                conn.send(_PING)
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
            try:
                proto.receive_data(data)
            except LocalProtocolError:
                why = "data after close"
                break
            done = False
            for event in proto.events():
                if isinstance(event, (TextMessage, BytesMessage)):
                    if conn.closing:
                        continue  # closing: what the peer still sends is discarded
                    raw = event.data
                    chunk: Payload = bytes(raw) if isinstance(raw, bytearray) else raw
                    size += _size_of(chunk)
                    if size > max_size:
                        conn.close(
                            CLOSE_MESSAGE_TOO_BIG, f"message over {max_size} bytes", in_order=True
                        )
                        parts, size = [], 0
                        continue
                    parts.append(chunk)
                    if event.message_finished:
                        message, message_size = _join(parts), size
                        parts, size = [], 0
                        if rate:
                            arrived = time.monotonic()
                            allowance = min(2 * rate, allowance + (arrived - refilled) * rate)
                            refilled = arrived
                            if allowance < 1:
                                conn.close(
                                    CLOSE_POLICY_VIOLATION, "rate limit exceeded", in_order=True
                                )
                                continue
                            allowance -= 1
                        relayed = settings.rebroadcast
                        _deliver(conn, message, message_size, relayed, on_message)
                elif isinstance(event, Ping):
                    conn.send_in_order(encode_frame(OP_PONG, bytes(event.payload)))
                elif isinstance(event, CloseConnection):
                    if proto.state is ConnectionState.OPEN:
                        # wsproto could not parse the peer's bytes: fail the connection
                        conn.close(event.code, event.reason or "protocol error", in_order=True)
                        why = f"protocol error {event.code}"
                        # RFC 6455 7.1.7: fail the connection, do not wait for the peer
                        peer_unresponsive = True
                    elif not conn.closing:
                        _reply_to_close(conn, event.code)
                        why = f"peer closed {event.code}"
                    else:
                        why = "closed"
                    done = True
                    break
            if done:
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


def _discard_pending_input(sock: socket.socket) -> None:
    """Read away what already arrived, without waiting: closing a socket with unread input
    makes the kernel send a reset, which can destroy our close frame still in flight."""
    try:
        while sock.recv(_RECV_BYTES, socket.MSG_DONTWAIT):
            pass
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
