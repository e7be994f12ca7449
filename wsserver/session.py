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
"""

from __future__ import annotations

import logging
import select
import time
from typing import TYPE_CHECKING, Callable, Union

from wsproto.connection import ConnectionState
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage
from wsproto.utilities import LocalProtocolError

from .connection import Connection
from .frames import OP_CLOSE, OP_PING, OP_PONG, encode_frame
from .protocol import CLOSE_INTERNAL_ERROR, CLOSE_MESSAGE_TOO_BIG

if TYPE_CHECKING:
    from .config import Settings
    from .transport import Transport

__all__ = ["run_session"]

log = logging.getLogger(__name__)

_RECV_BYTES = 65536
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

    now = time.monotonic()
    next_ping = now + settings.ping_interval
    life_deadline: float | None = None  # set when a ping is out: show life by then
    close_deadline: float | None = None
    parts: list[Payload] = []
    size = 0
    peer_unresponsive = False
    why = "closed"

    try:
        while True:
            now = time.monotonic()
            if conn.close_sent and close_deadline is None:
                close_deadline = now + settings.close_timeout
            if close_deadline is not None and now >= close_deadline:
                why, peer_unresponsive = "no close reply", True
                break
            if life_deadline is not None and now >= life_deadline:
                conn.close(CLOSE_INTERNAL_ERROR, "keepalive ping timeout")
                why, peer_unresponsive = "keepalive timeout", True
                break
            if now >= next_ping and close_deadline is None:
                conn.send(_PING)
                next_ping = now + settings.ping_interval
                if life_deadline is None:
                    life_deadline = now + settings.ping_timeout
            wake_at = min(
                t for t in (next_ping, life_deadline, close_deadline) if t is not None
            )
            if not poller.poll(max(wake_at - now, 0.0) * 1000 + 1):
                continue
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
                    if conn.close_sent:
                        continue  # closing: what the peer still sends is discarded
                    chunk = event.data
                    size += _size_of(chunk)
                    if size > max_size:
                        conn.close(CLOSE_MESSAGE_TOO_BIG, f"message over {max_size} bytes")
                        parts, size = [], 0
                        continue
                    parts.append(chunk)
                    if event.message_finished:
                        message = _join(parts)
                        parts, size = [], 0
                        on_message(conn, message)
                elif isinstance(event, Ping):
                    conn.send(encode_frame(OP_PONG, bytes(event.payload)))
                elif isinstance(event, CloseConnection):
                    if proto.state is ConnectionState.OPEN:
                        # wsproto could not parse the peer's bytes: fail the connection
                        conn.close(event.code, event.reason or "protocol error")
                        why = f"protocol error {event.code}"
                    elif not conn.close_sent:
                        _reply_to_close(conn, event.code)
                        why = f"peer closed {event.code}"
                    else:
                        why = "closed"
                    done = True
                    break
            if done:
                break
    finally:
        conn.drain(settings.close_timeout)
        transport.release()
        if peer_unresponsive or conn.slow:
            # no graceful half-close for a peer that is not listening: gunicorn would linger
            conn.abort()
    return why


def _reply_to_close(conn: Connection, code: int | None) -> None:
    """Echo the peer's close code (RFC 6455 section 5.5.1); none for a bare close."""
    if code is None or code == 1005:
        conn.send_close_frame(encode_frame(OP_CLOSE, b""))
    else:
        conn.send_close_frame(encode_frame(OP_CLOSE, code.to_bytes(2, "big")))


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
