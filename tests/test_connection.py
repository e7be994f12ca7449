"""The one write path, over real sockets (socketpair): partial writes are finished by the
flusher in order, a stalled reader becomes a slow consumer with close 1008 after the frame
in progress, and closing is idempotent."""

from __future__ import annotations

import select
import socket
import ssl
import struct

import pytest
from rawws import OP_CLOSE, FrameParser
from support import wait_for
from tlscerts import ssl_socketpair

from wsserver.connection import (
    Connection,
    SendResult,
    TlsConnection,
    WriteState,
    connection_class,
)
from wsserver.frames import OP_TEXT, encode_frame


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
    b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    yield a, b
    a.close()
    b.close()


def read_frames(sock: socket.socket, count: int, timeout: float = 10) -> list[tuple[int, bytes]]:
    """Up to ``count`` frames (fewer if a close frame or the end of the stream comes first),
    parsed by the suite's one raw client parser."""
    sock.settimeout(timeout)
    parser = FrameParser()
    frames: list[tuple[int, bytes]] = []
    while len(frames) < count and not (frames and frames[-1][0] == OP_CLOSE):
        chunk = sock.recv(65536)
        if not chunk:
            break
        frames += parser.feed(chunk)
    return frames


def test_backlog_is_flushed_in_order_when_the_reader_catches_up(pair, flusher):
    a, b = pair
    conn = Connection(1, a, "test", buffer_limit=10 * 1024 * 1024, flusher=flusher)
    frames = [encode_frame(OP_TEXT, (f"{i:05d}" + "x" * 995).encode()) for i in range(300)]
    for i in range(0, 300, 30):  # batches, as the broadcaster sends them
        assert conn.send_frames(frames[i:i + 30]) == SendResult.OK
    assert conn.pending_bytes > 0, "the socket buffer is small: some bytes must wait"
    got = read_frames(b, 300)
    assert [p[:5] for _, p in got] == [f"{i:05d}".encode() for i in range(300)]
    wait_for(lambda: conn.pending_bytes == 0, message="backlog flushed")
    conn.detach()


@pytest.mark.parametrize("kind", ["plain", "tls"])
def test_an_opening_connection_queues_until_its_101_is_sent(pair, tls_pair, flusher, kind):
    """A connection registered before its upgrade's 101 is out (``ws.serve_connection``):
    frames for it, however many, wait; ``open`` sends the 101 first, then them, in order."""
    a, b = pair if kind == "plain" else tls_pair
    cls = Connection if kind == "plain" else TlsConnection
    conn = cls(1, a, "test", buffer_limit=10 * 1024 * 1024, flusher=flusher, opening=True)
    frames = [encode_frame(OP_TEXT, (f"{i:05d}" + "x" * 995).encode()) for i in range(50)]
    for i in range(0, 50, 10):
        assert conn.send_frames(frames[i:i + 10]) == SendResult.OK
    assert conn.send(frames[0]) == SendResult.OK
    b.setblocking(False)
    with pytest.raises((BlockingIOError, ssl.SSLWantReadError)):
        b.recv(1)  # nothing on the wire before the 101
    b.setblocking(True)
    response = b"HTTP/1.1 101 Switching Protocols\r\n\r\n"
    conn.open(response)
    b.settimeout(10)
    head = b""
    while len(head) < len(response):
        head += b.recv(len(response) - len(head))
    assert head == response
    got = read_frames(b, 51)
    assert [p[:5] for _, p in got] == [f"{i:05d}".encode() for i in range(50)] + [b"00000"]
    wait_for(lambda: conn.pending_bytes == 0, message="backlog flushed")
    conn.detach()


def test_over_the_cap_is_a_slow_consumer_closed_with_1008(pair, flusher):
    a, b = pair
    conn = Connection(2, a, "test", buffer_limit=64 * 1024, flusher=flusher)
    frame = encode_frame(OP_TEXT, b"y" * 4000)
    results = [conn.send_frames([frame]) for _ in range(100)]
    assert SendResult.SLOW in results
    first_slow = results.index(SendResult.SLOW)
    assert all(r == SendResult.CLOSED for r in results[first_slow + 1:]), "no writes after"
    got = read_frames(b, 1000, timeout=3)
    assert got[-1][0] == 0x8
    assert struct.unpack("!H", got[-1][1][:2])[0] == 1008 and got[-1][1][2:] == b"slow consumer"
    assert all(op == OP_TEXT and len(p) == 4000 for op, p in got[:-1]), "no torn frame"
    conn.detach()


def test_close_is_idempotent_and_last(pair, flusher):
    a, b = pair
    conn = Connection(3, a, "test", buffer_limit=1 << 20, flusher=flusher)
    assert conn.close(1001, "bye") is True
    assert conn.close(1000, "again") is False
    assert conn.send(encode_frame(OP_TEXT, b"late")) == SendResult.CLOSED
    got = read_frames(b, 1)
    assert got == [(0x8, struct.pack("!H", 1001) + b"bye")]
    conn.detach()
    conn.detach()


def test_write_to_a_vanished_peer_does_not_raise(pair, flusher):
    a, b = pair
    b.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    b.close()
    conn = Connection(4, a, "test", buffer_limit=1 << 20, flusher=flusher)
    for _ in range(3):
        conn.send(encode_frame(OP_TEXT, b"x" * 100))
    assert conn.send(encode_frame(OP_TEXT, b"x")) == SendResult.CLOSED
    conn.detach()


def test_write_state_only_moves_forward(pair, flusher):
    a, b = pair
    conn = Connection(5, a, "test", buffer_limit=1 << 20, flusher=flusher)
    assert conn.state is WriteState.OPEN and not conn.closing and not conn.close_sent
    assert conn.send(encode_frame(OP_TEXT, b"x")) is SendResult.OK
    assert conn.close(1000, "") is True
    assert conn.state is WriteState.CLOSE_SENT and conn.closing and conn.close_sent
    conn.detach()
    assert conn.state is WriteState.CLOSED
    assert conn.close(1000, "") is False and conn.state is WriteState.CLOSED
    assert read_frames(b, 2) == [(OP_TEXT, b"x"), (0x8, struct.pack("!H", 1000))]


def test_a_failed_write_closes_the_stream(pair, flusher):
    a, b = pair
    b.close()
    conn = Connection(6, a, "test", buffer_limit=1 << 20, flusher=flusher)
    conn.send(encode_frame(OP_TEXT, b"x"))  # EPIPE: the peer is gone
    assert conn.state is WriteState.CLOSED and conn.closing
    assert conn.send(encode_frame(OP_TEXT, b"y")) is SendResult.CLOSED
    conn.detach()


def test_locked_helpers_refuse_to_run_without_the_lock(pair, flusher):
    a, _ = pair
    conn = Connection(7, a, "test", buffer_limit=1 << 20, flusher=flusher)
    frame = encode_frame(OP_TEXT, b"x")
    for call in (lambda: conn.queue_locked(frame), conn.write_locked, conn.flush_locked,
                 conn.is_open_locked, lambda: conn.echoes.relay_locked([frame]),
                 conn.echoes.clear_locked):
        with pytest.raises(AssertionError):
            call()
    with conn._lock:  # the same calls under the lock are fine
        conn.queue_locked(frame)
        assert conn.write_locked() is SendResult.OK
    assert conn.pending_bytes == 0
    conn.detach()


# -- over TLS: the same guarantees through SSL_write (a real handshake on a socketpair) ------


@pytest.fixture
def tls_pair():
    """(server end, client end), TLS over small kernel buffers: writes stop short often."""
    a, b = ssl_socketpair(sndbuf=8192, rcvbuf=8192)
    yield a, b
    a.close()
    b.close()


def test_a_tls_socket_gets_the_tls_write_path_and_a_plain_one_keeps_its_own(tls_pair, pair):
    assert connection_class(tls_pair[0]) is TlsConnection
    assert connection_class(pair[0]) is Connection
    # the plain fast path is the base class's own: TLS overrides it, adds nothing to it
    assert TlsConnection.send_frames is not Connection.send_frames
    assert "ssl" not in Connection.send_frames.__code__.co_names


def test_a_tls_backlog_is_flushed_in_order_when_the_reader_catches_up(tls_pair, flusher):
    a, b = tls_pair
    conn = TlsConnection(11, a, "test", buffer_limit=10 * 1024 * 1024, flusher=flusher)
    assert a.gettimeout() == 0.0, "a TLS socket is made non-blocking (SSL takes no flags)"
    frames = [encode_frame(OP_TEXT, (f"{i:05d}" + "x" * 995).encode()) for i in range(300)]
    owed = []
    for i in range(0, 300, 30):  # batches, as the broadcaster sends them
        assert conn.send_frames(frames[i:i + 30]) == SendResult.OK
        owed.append(conn._owed)
    assert conn.pending_bytes > 0, "the socket buffer is small: some bytes must wait"
    assert any(owed), "an SSL_write would block: OpenSSL took bytes the retry must present"
    got = read_frames(b, 300)
    assert [p[:5] for _, p in got] == [f"{i:05d}".encode() for i in range(300)]
    wait_for(lambda: conn.pending_bytes == 0, message="backlog flushed")
    assert conn._owed == 0 and conn.state is WriteState.OPEN
    conn.detach()


def test_a_big_frame_goes_out_over_tls_in_chunks(tls_pair, flusher):
    a, b = tls_pair
    conn = TlsConnection(12, a, "test", buffer_limit=4 * 1024 * 1024, flusher=flusher)
    payload = bytes(range(256)) * 4096  # 1 MiB
    assert conn.send(encode_frame(OP_TEXT, payload)) is SendResult.OK
    assert conn.pending_bytes > 0
    assert read_frames(b, 1) == [(OP_TEXT, payload)]
    wait_for(lambda: conn.pending_bytes == 0, message="the frame written")
    conn.detach()


def test_a_tls_slow_consumer_keeps_what_openssl_took_and_closes_cleanly(tls_pair, flusher):
    """The drop keeps every frame an SSL_write that would block took part of: the retry
    must present those bytes again, or OpenSSL fails the connection ("bad length") and the
    client never sees its close frame."""
    a, b = tls_pair
    conn = TlsConnection(13, a, "test", buffer_limit=64 * 1024, flusher=flusher)
    frame = encode_frame(OP_TEXT, b"y" * 4000)
    results = [conn.send_frames([frame] * 4) for _ in range(40)]
    assert SendResult.SLOW in results
    first_slow = results.index(SendResult.SLOW)
    assert all(r == SendResult.CLOSED for r in results[first_slow + 1:]), "no writes after"
    assert conn.slow and conn.pending_bytes >= conn._owed
    got = read_frames(b, 1000, timeout=5)
    assert got[-1][0] == OP_CLOSE
    assert struct.unpack("!H", got[-1][1][:2])[0] == 1008 and got[-1][1][2:] == b"slow consumer"
    assert all(op == OP_TEXT and len(p) == 4000 for op, p in got[:-1]), "no torn frame"
    assert conn.state is WriteState.CLOSE_SENT, "the stream did not fail"
    conn.detach()


def test_waking_a_tls_connection_keeps_its_ssl_object(tls_pair, flusher):
    """SSLSocket.shutdown drops the SSL object, after which writes would go out unencrypted;
    wake() and abort() shut the plain socket down instead."""
    a, b = tls_pair
    conn = TlsConnection(14, a, "test", buffer_limit=1 << 20, flusher=flusher)
    conn.wake()
    assert conn.send(encode_frame(OP_TEXT, b"still encrypted")) is SendResult.OK
    assert read_frames(b, 1) == [(OP_TEXT, b"still encrypted")]
    assert conn.recv(100) == b"", "after wake the session's read sees the end of input"
    conn.detach()


def test_tls_reads_wait_for_a_whole_record(tls_pair, flusher):
    a, b = tls_pair
    conn = TlsConnection(15, a, "test", buffer_limit=1 << 20, flusher=flusher)
    assert conn.recv(100) is None, "nothing yet: not an error, not the end"
    b.sendall(b"x" * 40000)  # three TLS records
    got = b""
    wait_for(lambda: select.select([a], [], [], 0.05)[0], message="readable")
    while len(got) < 40000:
        data = conn.recv(65536)
        if data is None:
            select.select([a], [], [], 1)
            continue
        got += data
    assert got == b"x" * 40000
    conn.close(1000, "")
    assert read_frames(b, 1) == [(OP_CLOSE, struct.pack("!H", 1000))]
    conn.abort()
    assert b.recv(10) == b"", "the end of the stream"
    conn.detach()
