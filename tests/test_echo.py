"""Echo ordering (wsserver.echo), over real sockets (socketpair) and real threads: a pong or
close frame sent in order waits behind the echo of an earlier message, for at most the hold
limit; a cancelled expectation releases; a lost echo releases at the deadline; and the
broadcaster's thread and the session's thread can race without a pong overtaking its echo."""

from __future__ import annotations

import gc
import socket
import struct
import threading
import time
import weakref

import pytest
import rawws

from wsserver.connection import Connection, SendResult, WriteState
from wsserver.echo import Expected
from wsserver.frames import (
    OP_BINARY,
    OP_CLOSE,
    OP_PONG,
    OP_TEXT,
    close_frame,
    deflate_frame,
    encode_frame,
)

pytestmark = pytest.mark.timeout(30)

QUIET = 0.2  # how long "nothing arrives" is watched for


class Peer:
    """The client's end of the socketpair: reads server frames with a bounded wait."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.parser = rawws.FrameParser()
        self.frames: list[tuple[int, bytes]] = []

    def read(self, count: int, timeout: float = 5.0) -> list[tuple[int, bytes]]:
        """The next ``count`` frames; fails if they do not all come within ``timeout``."""
        deadline = time.monotonic() + timeout
        while len(self.frames) < count:
            left = deadline - time.monotonic()
            assert left > 0, f"only {self.frames} arrived"
            self.sock.settimeout(left)
            data = self.sock.recv(65536)
            assert data, f"connection ended after {self.frames}"
            self.frames += self.parser.feed(data)
        got, self.frames = self.frames[:count], self.frames[count:]
        return got

    def nothing(self, quiet: float = QUIET) -> None:
        """Assert that no frame arrives within ``quiet`` seconds."""
        self.sock.settimeout(quiet)
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            return
        self.frames += self.parser.feed(data)
        assert not self.frames, f"unexpected {self.frames}"


@pytest.fixture
def conn_and_peer(flusher):
    made = []

    def make(hold_limit: float = 5.0, buffer_limit: int = 1 << 20) -> tuple[Connection, Peer]:
        ours, theirs = socket.socketpair()
        conn = Connection(len(made) + 1, ours, "test", buffer_limit, flusher)
        conn.echoes.hold_limit = hold_limit
        made.append((conn, ours, theirs))
        return conn, Peer(theirs)

    yield make
    for conn, ours, theirs in made:
        conn.detach()
        ours.close()
        theirs.close()


def text(payload: str) -> bytes:
    return encode_frame(OP_TEXT, payload.encode())


def pong(payload: bytes = b"p") -> bytes:
    return encode_frame(OP_PONG, payload)


def broadcast(conn: Connection, *frames: bytes) -> SendResult:
    """Deliver ``frames`` from another thread, as the broadcaster does."""
    result: list[SendResult] = []
    thread = threading.Thread(target=lambda: result.append(conn.send_frames(list(frames))))
    thread.start()
    thread.join(5)
    assert not thread.is_alive() and result, "send_frames blocked"
    return result[0]


def test_a_pong_waits_behind_the_echo_of_an_earlier_message(conn_and_peer):
    conn, peer = conn_and_peer()
    conn.echoes.expect("hello")
    assert conn.echoes.send(pong(b"1")) is True
    peer.nothing()  # held: the echo of "hello" is still out
    assert conn.echoes.deadline is not None
    assert broadcast(conn, text("other"), text("hello"), text("after")) == SendResult.OK
    assert peer.read(4) == [
        (OP_TEXT, b"other"), (OP_TEXT, b"hello"), (OP_PONG, b"1"), (OP_TEXT, b"after")
    ]
    assert conn.echoes.deadline is None and not conn.echoes.held


def test_a_compressed_echo_is_recognized_by_the_plain_frame_it_stands_for(conn_and_peer):
    """permessage-deflate: the broadcaster hands a deflate client the compressed twins and
    the plain frames they stand for; the echo is recognized by its plain frame, what goes
    out is the twin, and the pong follows it at once."""
    conn, peer = conn_and_peer()
    peer.parser = rawws.FrameParser(deflate=True)
    message = "hello " * 400
    conn.echoes.expect(message)
    assert conn.echoes.send(pong(b"1")) is True
    plain = [text("other"), text(message)]
    twins = [plain[0], deflate_frame(plain[1])]
    assert twins[1] != plain[1]
    result: list[SendResult] = []
    thread = threading.Thread(target=lambda: result.append(conn.send_frames(twins, None, plain)))
    thread.start()
    thread.join(5)
    assert result == [SendResult.OK]
    assert peer.read(3) == [(OP_TEXT, b"other"), (OP_TEXT, message.encode()), (OP_PONG, b"1")]
    assert peer.parser.compressed == 1 and not conn.echoes.held


def test_a_pong_with_no_echo_awaited_goes_out_at_once(conn_and_peer):
    conn, peer = conn_and_peer()
    conn.echoes.send(pong(b"now"))
    assert peer.read(1) == [(OP_PONG, b"now")]
    assert conn.echoes.deadline is None


def test_an_in_order_close_waits_behind_the_echo_and_ends_the_stream(conn_and_peer):
    conn, peer = conn_and_peer()
    conn.echoes.expect(b"\x00\x01bin")
    assert conn.close(1000, "bye", in_order=True) is True
    assert conn.state is WriteState.CLOSE_HELD and conn.closing and not conn.close_sent
    assert conn.close(1001, "again", in_order=True) is False, "one close only"
    assert conn.echoes.send(pong()) is False, "nothing new once closing"
    peer.nothing()
    broadcast(conn, encode_frame(OP_BINARY, b"\x00\x01bin"), text("after the close"))
    assert peer.read(2) == [
        (OP_BINARY, b"\x00\x01bin"), (OP_CLOSE, struct.pack("!H", 1000) + b"bye")
    ]
    assert conn.state is WriteState.CLOSE_SENT
    peer.nothing()  # the frame after the echo in the same batch is not sent after the close
    assert conn.send(text("late")) == SendResult.CLOSED


def test_a_cancelled_expectation_releases_what_waited_for_it(conn_and_peer):
    conn, peer = conn_and_peer()
    expected = conn.echoes.expect("queue was full")
    conn.echoes.send(pong(b"x"))
    peer.nothing()
    conn.echoes.cancel(expected)
    assert peer.read(1) == [(OP_PONG, b"x")]
    conn.echoes.cancel(expected)  # idempotent
    broadcast(conn, text("queue was full"))  # a copy arriving anyway is just a frame
    assert peer.read(1) == [(OP_TEXT, b"queue was full")]


def test_a_cancelled_expectation_releases_a_held_close(conn_and_peer):
    conn, peer = conn_and_peer()
    expected = conn.echoes.expect("m")
    conn.close(1008, "rate", in_order=True)
    peer.nothing()
    conn.echoes.cancel(expected)
    assert peer.read(1) == [(OP_CLOSE, struct.pack("!H", 1008) + b"rate")]
    assert conn.close_sent


def test_a_lost_echo_releases_at_the_deadline(conn_and_peer):
    conn, peer = conn_and_peer(hold_limit=0.3)
    conn.echoes.expect("never relayed")
    before = time.monotonic()
    conn.echoes.send(pong(b"late"))
    deadline = conn.echoes.deadline
    assert deadline is not None and before + 0.3 <= deadline <= time.monotonic() + 0.3
    conn.echoes.release_if_due(deadline - 0.1)
    peer.nothing(0.05)  # not due yet
    conn.echoes.release_if_due(deadline)
    assert peer.read(1) == [(OP_PONG, b"late")]
    assert conn.echoes.deadline is None and not conn.echoes.held


def test_only_echoes_awaited_keep_no_deadline(conn_and_peer):
    """An expectation with nothing behind it holds nothing back: no deadline to wake for."""
    conn, _ = conn_and_peer()
    conn.echoes.expect("a")
    assert conn.echoes.held and conn.echoes.deadline is None


def test_an_echo_releases_what_waited_for_earlier_echoes_that_never_came(conn_and_peer):
    """The broadcast queue is first in, first out: once the echo of "b" arrives, the echo of
    "a" (sent before it) is not coming, so what waited for it goes first."""
    conn, peer = conn_and_peer()
    conn.echoes.expect("a")
    conn.echoes.send(pong(b"1"))
    conn.echoes.expect("b")
    conn.echoes.send(pong(b"2"))
    peer.nothing()
    broadcast(conn, text("b"))
    assert peer.read(3) == [(OP_PONG, b"1"), (OP_TEXT, b"b"), (OP_PONG, b"2")]


def test_settle_waits_for_the_echo_then_drain_writes_what_was_held(conn_and_peer):
    conn, peer = conn_and_peer()
    conn.echoes.expect("last words")
    conn.close(1000, "", in_order=True)
    timer = threading.Timer(0.2, lambda: conn.send_frames([text("last words")]))
    timer.start()
    try:
        started = time.monotonic()
        assert conn.drain(5.0) is True
        assert time.monotonic() - started >= 0.15, "drain waited for the echo"
    finally:
        timer.join(5)
    assert peer.read(2) == [(OP_TEXT, b"last words"), (OP_CLOSE, struct.pack("!H", 1000))]


def test_settle_gives_up_on_a_lost_echo_at_its_deadline(conn_and_peer):
    conn, peer = conn_and_peer()
    conn.echoes.expect("lost")
    conn.close(1000, "", in_order=True)
    started = time.monotonic()
    assert conn.drain(0.3) is True
    assert 0.25 <= time.monotonic() - started < 2.0
    assert peer.read(1) == [(OP_CLOSE, struct.pack("!H", 1000))]


def test_a_shutdown_close_drops_what_was_held(conn_and_peer):
    conn, peer = conn_and_peer()
    conn.echoes.expect("x")
    conn.echoes.send(pong())
    assert conn.close(1001, "server shutting down") is True
    assert peer.read(1) == [(OP_CLOSE, struct.pack("!H", 1001) + b"server shutting down")]
    assert not conn.echoes.held and conn.echoes.deadline is None


def test_nothing_is_expected_once_closing(conn_and_peer):
    conn, _ = conn_and_peer()
    conn.close(1000, "")
    conn.echoes.expect("after")
    assert not conn.echoes.held


def test_held_bytes_count_against_the_cap(conn_and_peer):
    """A frame that fits the cap alone but not with the pongs held behind an echo makes the
    client a slow consumer: what is held is memory the client costs too."""
    limit = 1 << 20
    conn, peer = conn_and_peer(buffer_limit=limit)
    conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    filler = encode_frame(OP_TEXT, b"f" * 8000)
    while conn.pending_bytes == 0:  # the peer does not read: fill the socket, then a backlog
        assert conn.send_frames([filler]) == SendResult.OK
    backlog = conn.pending_bytes
    conn.echoes.expect("x")
    for _ in range(3):
        conn.echoes.send(pong(b"p" * 125))
    assert conn.echoes.held_bytes == 3 * 127 and not conn.slow
    big = encode_frame(OP_TEXT, b"y" * (limit - backlog - 110))  # fits alone, by 100 bytes
    assert backlog + len(big) <= limit < backlog + len(big) + conn.echoes.held_bytes
    assert broadcast(conn, big) == SendResult.SLOW
    assert conn.slow and not conn.echoes.held and conn.echoes.held_bytes == 0
    frames: list[tuple[int, bytes]] = []
    while not frames or frames[-1][0] != OP_CLOSE:
        frames += peer.read(1)
    assert frames[-1][1][:2] == struct.pack("!H", 1008)
    assert all(op == OP_TEXT and p == filler[4:] for op, p in frames[:-1]), "no pong, no torn frame"


@pytest.mark.parametrize(
    "message",
    ["short", "é" * 40, "x" * 70_000, b"\x00" * 3, bytes(range(256)) * 300],
    ids=["short", "multibyte", "long-text", "binary", "long-binary"],
)
def test_expected_matches_the_frame_of_its_message_and_not_a_lookalike(message):
    expected = Expected(message)
    if isinstance(message, str):
        frame = encode_frame(OP_TEXT, message.encode())
        other = encode_frame(OP_BINARY, message.encode())
    else:
        frame = encode_frame(OP_BINARY, message)
        other = encode_frame(OP_TEXT, message)
    assert expected.matches(frame)
    assert not expected.matches(other), "the opcode is part of the frame"
    assert not expected.matches(frame[:-1] + bytes([frame[-1] ^ 1])), "the tail is compared"
    assert not expected.matches(frame + b"x")
    assert not expected.matches(close_frame(1000))


def test_pongs_never_overtake_their_echo_under_a_racing_broadcaster(conn_and_peer):
    """The session thread relays a message and sends a pong right after it, 200 times, while
    the broadcaster thread delivers each echo when it gets to it (with other traffic): every
    pong arrives after its echo and nothing is lost."""
    conn, peer = conn_and_peer()
    rounds = 200
    relayed: list[str] = []
    ready = threading.Condition()
    done = threading.Event()

    def broadcaster() -> None:
        sent = 0
        while sent < rounds:
            with ready:
                ready.wait_for(lambda: len(relayed) > sent, timeout=5)
                batch = relayed[sent:]
            assert batch, "the session stopped relaying"
            frames = []
            for message in batch:
                frames += [text("noise"), text(message)]
            conn.send_frames(frames)
            sent += len(batch)
        done.set()

    thread = threading.Thread(target=broadcaster, name="test-broadcaster")
    thread.start()
    try:
        for i in range(rounds):
            message = f"m{i:04d}"
            conn.echoes.expect(message)
            with ready:
                relayed.append(message)
                ready.notify()
            conn.echoes.send(pong(message.encode()))
        assert done.wait(10)
    finally:
        thread.join(10)
    got = peer.read(3 * rounds)
    data = [(op, p) for op, p in got if p != b"noise"]
    for i in range(rounds):
        message = f"m{i:04d}".encode()
        assert data.index((OP_TEXT, message)) < data.index((OP_PONG, message)), message
    assert len(data) == 2 * rounds
    assert conn.echoes.deadline is None and not conn.echoes.held


def test_a_connection_that_ended_is_freed_at_once_not_by_the_cyclic_gc(flusher):
    """The connection owns its EchoOrder; a strong reference back made every connection a
    cycle that only a full collection frees, minutes apart under churn (the one-hour
    soak's RSS climb). With the collector off, an ended connection that held an echo,
    queued frames and a close must still be gone when its last reference goes."""
    gc.collect()
    gc.disable()
    try:
        refs = []
        for n in range(50):
            ours, theirs = socket.socketpair()
            conn = Connection(n + 1, ours, "test", 1 << 20, flusher)
            expected = conn.echoes.expect("hello")
            conn.send(text("queued behind the echo"))
            conn.send(close_frame(1000, "bye"))
            conn.echoes.cancel(expected)
            conn.detach()
            refs.append(weakref.ref(conn))
            del conn, expected
            ours.close()
            theirs.close()
        alive = sum(ref() is not None for ref in refs)
    finally:
        gc.enable()
    assert alive == 0, f"{alive} of 50 ended connections wait for the cyclic GC"
