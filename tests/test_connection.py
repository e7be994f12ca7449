"""The one write path, over real sockets (socketpair): partial writes are finished by the
flusher in order, a stalled reader becomes a slow consumer with close 1008 after the frame
in progress, and closing is idempotent."""

from __future__ import annotations

import socket
import struct

import pytest
from rawws import OP_CLOSE, FrameParser
from support import wait_for

from wsserver.connection import Connection, SendResult, WriteState
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
