"""The broadcaster thread over real sockets: where tasks run relative to the messages drained
with them, and the replay marks it consults."""

from __future__ import annotations

import json
import socket
import threading

import pytest
from inprocess import Peer

from wsserver.broadcaster import Broadcast, Broadcaster, Task
from wsserver.connection import Connection
from wsserver.flusher import Flusher
from wsserver.frames import OP_TEXT, encode_frame
from wsserver.hub import Hub


class _Recording(Task):
    """Notes what the client had received when the task ran (read without waiting)."""

    def __init__(self, sock: socket.socket, seen: list) -> None:
        self.sock, self.seen = sock, seen
        self.ran = threading.Event()

    def run(self, broadcaster: Broadcaster) -> None:
        try:
            self.seen.append(self.sock.recv(1 << 16, socket.MSG_DONTWAIT))
        except BlockingIOError:
            self.seen.append(b"")
        self.ran.set()


class _Gate(Task):
    """Holds the broadcaster thread until released, so the queue fills behind it."""

    def __init__(self) -> None:
        self.entered, self.release = threading.Event(), threading.Event()

    def run(self, broadcaster: Broadcaster) -> None:
        self.entered.set()
        self.release.wait(10)


@pytest.mark.timeout(20)
def test_a_task_runs_after_the_batch_it_was_drained_with_not_between_its_messages():
    """[m1, task, m2] queued together go out as one batch (one write per client), then the
    task runs: a recovery between them would split the write, and a replay is safe after
    both because every queued message is in history already."""
    flusher = Flusher(poll_timeout=0.05)
    flusher.start()
    ours, theirs = socket.socketpair()
    hub = Hub(10)
    broadcaster = Broadcaster(hub, 64, on_slow=lambda conn: None)
    broadcaster.start()
    try:
        conn = Connection(1, ours, "test", 1 << 20, flusher)
        assert hub.add(conn) is None
        gate = _Gate()
        assert broadcaster.submit(gate, 1)
        assert gate.entered.wait(5)
        seen: list = []
        task = _Recording(theirs, seen)
        for item in (Broadcast(encode_frame(OP_TEXT, b"m1"), 0.0), task,
                     Broadcast(encode_frame(OP_TEXT, b"m2"), 0.0)):
            assert broadcaster.submit(item, 1)
        gate.release.set()
        assert task.ran.wait(5)
        # both messages were written before the task ran: the client had them both then
        assert seen == [encode_frame(OP_TEXT, b"m1") + encode_frame(OP_TEXT, b"m2")]
    finally:
        broadcaster.stop(5)
        flusher.stop()
        ours.close()
        theirs.close()


class _Mark(Task):
    """Records a replay mark, on the broadcaster thread as a resume does."""

    def __init__(self, conn_id: int, room: str, order: tuple) -> None:
        self.conn_id, self.room, self.order = conn_id, room, order
        self.done = threading.Event()

    def run(self, broadcaster: Broadcaster) -> None:
        broadcaster.replays.mark(self.conn_id, self.room, self.order)
        self.done.set()


@pytest.mark.timeout(20)
def test_live_copies_of_replayed_messages_are_skipped_for_that_client_only():
    flusher = Flusher(poll_timeout=0.05)
    flusher.start()
    hub = Hub(10)
    broadcaster = Broadcaster(hub, 64, on_slow=lambda conn: None)
    broadcaster.start()
    pairs = [socket.socketpair() for _ in range(2)]
    try:
        resumed, other = (Connection(i + 1, ours, "test", 1 << 20, flusher)
                          for i, (ours, _) in enumerate(pairs))
        for conn in (resumed, other):
            assert hub.add(conn) is None
            hub.subscribe(conn, "r")
        mark = _Mark(resumed.id, "r", (1, 2))
        assert broadcaster.submit(mark, 1)
        assert mark.done.wait(5)  # alone in its batch: marked before the messages are drained
        for n in range(1, 5):
            item = Broadcast(encode_frame(OP_TEXT, b"m%d" % n), 0.0, room="r", order=(1, n))
            assert broadcaster.submit(item, 1)
        got = {conn.id: [p for _, p in Peer(theirs).frames(count)]
               for conn, (_, theirs), count in ((resumed, pairs[0], 2), (other, pairs[1], 4))}
        assert got == {resumed.id: [b"m3", b"m4"], other.id: [b"m1", b"m2", b"m3", b"m4"]}
        assert not broadcaster.replays, "forgotten once the room moved past the mark"
    finally:
        broadcaster.stop(5)
        flusher.stop()
        for pair in pairs:
            for sock in pair:
                sock.close()


# -- compress once: one frame object per kind of client ----------------------------------------


class _Seen(Connection):
    """A real connection that also notes the frame list each write was handed (to check
    which objects, not only which bytes, the fan-out shares)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.handed: list = []

    def send_frames(self, frames, total=None, plain=None):
        self.handed.append(frames)
        return super().send_frames(frames, total, plain)


class _Counting(Broadcaster):
    """The real broadcaster, counting the compressions it makes."""

    compressions = 0

    def compressed(self, frames, window_bits):
        self.compressions += 1
        return super().compressed(frames, window_bits)


@pytest.mark.timeout(20)
def test_each_kind_of_client_gets_the_identical_frame_objects_compressed_once_per_kind():
    """Plain clients get the queued frame itself; clients that negotiated permessage-deflate
    get its compressed twin, one bytes object shared by every client with the same window
    (made once, when the first of them is reached); a frame under the threshold goes to
    them as the plain object. Every client reads the same messages."""
    flusher = Flusher(poll_timeout=0.05)
    flusher.start()
    hub = Hub(20)
    broadcaster = _Counting(hub, 64, on_slow=lambda conn: None, compress_min_size=1024)
    broadcaster.start()
    kinds = [None] * 3 + [15] * 3 + [9] * 2
    pairs = [socket.socketpair() for _ in kinds]
    try:
        conns = []
        for n, ((ours, _), bits) in enumerate(zip(pairs, kinds)):
            conn = _Seen(n + 1, ours, "test", 1 << 20, flusher)
            conn.deflate = bits
            assert hub.add(conn) is None
            conns.append(conn)
        big = json.dumps({"event": "e", "data": [{"id": i, "name": "item"} for i in range(200)]})
        items = (Broadcast(encode_frame(OP_TEXT, big.encode()), 0.0),
                 Broadcast(encode_frame(OP_TEXT, b'{"small":1}'), 0.0))
        gate = _Gate()
        assert broadcaster.submit(gate, 1)
        assert gate.entered.wait(5)
        for item in items:  # queued behind the gate: one batch, one write per client
            assert broadcaster.submit(item, 1)
        gate.release.set()
        for conn, (_, theirs), bits in zip(conns, pairs, kinds):
            peer = Peer(theirs, deflate=bits is not None)
            assert [p for _, p in peer.frames(2)] == [big.encode(), b'{"small":1}']
            assert peer.compressed == (0 if bits is None else 1)
        handed = {bits: [c.handed[0] for c, b in zip(conns, kinds) if b == bits]
                  for bits in (None, 15, 9)}
        for frames in handed[None]:
            assert all(f is item.frame for f, item in zip(frames, items))
        for bits in (15, 9):
            first = handed[bits][0]
            assert all(frames is first for frames in handed[bits]), "one list per window"
            assert first[0] is not items[0].frame and first[0][0] == 0xC1  # compressed
            assert first[1] is items[1].frame  # under the threshold: the plain object
        assert handed[15][0][0] != handed[9][0][0]
        assert broadcaster.compressions == 2, "once per window size, not per client"
        # a fan-out reaching no client that negotiated deflate compresses nothing
        for conn in conns[3:]:
            hub.remove(conn)
        assert broadcaster.submit(items[0], 1)
        Peer(pairs[0][1]).frames(1)
        assert broadcaster.compressions == 2
    finally:
        broadcaster.stop(5)
        flusher.stop()
        for pair in pairs:
            for sock in pair:
                sock.close()
