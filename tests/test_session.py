"""wsserver.session: the limits inside an open WebSocket, tried as a hostile client would.

In-process tests run the real session loop (``ws.serve_connection``, wsproto, the real
service, broadcaster and flusher) over a ``socket.socketpair()``; the attacks that need the
whole worker (its memory, ``POST /notify`` latency, ``/metrics``) run against a real
gunicorn. Each attack lasts a few seconds at most.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import zlib

import pytest
import rawws
from rawws import OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, client_frame, close_code
from support import wait_for
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request

from wsserver import metrics
from wsserver.auth import Identity
from wsserver.config import load_settings
from wsserver.connection import Connection
from wsserver.flusher import Flusher
from wsserver.frames import deflate_payload, encode_frame
from wsserver.protocol import Notification
from wsserver.service import NotificationService
from wsserver.session import run_session
from wsserver.transport import inbound_protocol
from wsserver.ws import serve_connection

OP_CONT = 0x0


# -- in-process sessions over a socketpair ------------------------------------------------


class _Transport:
    """What ``ws.serve_connection`` needs from simple-websocket: the socket and a wsproto
    connection past its handshake (done here by hand, as simple-websocket would; no 101 is
    sent: the peer reads frames only)."""

    upgrade_response = None

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.protocol = WSConnection(ConnectionType.SERVER)
        self.protocol.receive_data(
            b"GET /ws HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        assert [type(e) for e in self.protocol.events()] == [Request]
        self.protocol.send(AcceptConnection())

    def release(self) -> None:
        pass


def _closes(reason: str) -> float:
    return metrics.SERVER_CLOSES.labels(reason)._value.get()


def _refusals(reason: str) -> float:
    return metrics.REFUSALS.labels(reason)._value.get()


class _Sessions:
    """One real NotificationService (broadcaster, flusher, memory broker) and sessions on
    socketpairs, each served by ``ws.serve_connection`` on its own thread."""

    def __init__(self, **overrides) -> None:
        base = {"env": "development", "shutdown_timeout": 1.0, "close_timeout": 1.0}
        self.service = NotificationService(load_settings({}, {**base, **overrides}))
        self.service.ensure_started()
        self.threads: list[threading.Thread] = []
        self.sockets: list[socket.socket] = []

    def open(self, remote: str = "192.0.2.1", identity=None,
             deflate: bool = False) -> tuple[socket.socket, threading.Thread]:
        """``deflate``: as if the client had negotiated permessage-deflate (window 15)."""
        ours, theirs = socket.socketpair()
        self.sockets += [ours, theirs]
        transport = _Transport(ours)
        if deflate:
            transport.protocol = inbound_protocol(True, self.service.settings.max_message_size)
        thread = threading.Thread(
            target=serve_connection,
            args=(self.service, transport, remote, (), identity, None,
                  15 if deflate else None), daemon=True)
        thread.start()
        self.threads.append(thread)
        theirs.settimeout(10)
        return theirs, thread

    def close(self) -> None:
        self.service.shutdown()
        for sock in self.sockets:
            sock.close()
        for thread in self.threads:
            thread.join(5)
        assert not any(t.is_alive() for t in self.threads), "a session thread was left running"


@pytest.fixture
def sessions():
    made: list[_Sessions] = []

    def make(**overrides) -> _Sessions:
        made.append(_Sessions(**overrides))
        return made[-1]

    yield make
    for s in made:
        s.close()


def _send(sock: socket.socket, *frames: bytes) -> None:
    sock.sendall(b"".join(frames))


def _text(obj) -> bytes:
    return client_frame(OP_TEXT, json.dumps(obj).encode())


def _read(sock: socket.socket, count: int, timeout: float = 5) -> list[tuple[int, bytes]]:
    """The next ``count`` frames (fewer if the connection ends first)."""
    parser = rawws.FrameParser()
    frames: list[tuple[int, bytes]] = []
    deadline = time.monotonic() + timeout
    while len(frames) < count:
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        data = sock.recv(65536)
        if not data:
            break
        frames += parser.feed(data)
    return frames


def _close_of(frames) -> tuple[int | None, bytes]:
    closes = [p for op, p in frames if op == OP_CLOSE]
    assert closes, f"no close frame in {frames[-3:]}"
    return close_code(closes[0]), closes[0][2:]


@pytest.mark.timeout(30)
def test_a_message_in_max_fragments_frames_passes_one_more_closes_1009(sessions):
    s = sessions(max_fragments=8)
    before = _closes("too_many_fragments")
    sock, thread = s.open()
    _send(sock, client_frame(OP_TEXT, b"a", fin=False),
          *(client_frame(OP_CONT, b"", fin=False) for _ in range(6)), client_frame(OP_CONT, b"b"))
    frames = _read(sock, 1)
    assert frames[0] == (OP_TEXT, b"ab"), "8 frames, 6 of them empty: one message, relayed"
    _send(sock, client_frame(OP_TEXT, b"a", fin=False),
          *(client_frame(OP_CONT, b"", fin=False) for _ in range(20)))
    code, reason = _close_of(rawws.read_frames(sock, timeout=5))
    assert code == 1009 and b"WSSERVER_MAX_FRAGMENTS" in reason and b"8" in reason
    _send(sock, client_frame(OP_CLOSE, rawws.close_payload(1000)))
    thread.join(5)
    assert not thread.is_alive()
    assert _closes("too_many_fragments") == before + 1


@pytest.mark.timeout(30)
def test_a_compressed_message_inflating_past_the_limit_closes_1009_others_still_answered(
    sessions,
):
    """A decompression bomb: 8 KB on the wire, 8 MiB inflated, against a 64 KiB limit. The
    session closes 1009 naming WSSERVER_MAX_MESSAGE_SIZE (the size limit's own close,
    counted as message_too_big) without inflating it; a polite client is served meanwhile."""
    s = sessions(max_message_size=65536)
    before = _closes("message_too_big")
    polite, polite_thread = s.open(deflate=True)
    sock, thread = s.open(deflate=True)
    squeezer = zlib.compressobj(9, zlib.DEFLATED, -15)
    bomb = squeezer.compress(b"{" * (8 << 20)) + squeezer.flush(zlib.Z_SYNC_FLUSH)[:-4]
    assert len(bomb) < 10_000
    _send(sock, client_frame(OP_TEXT, bomb, rsv=4))
    code, reason = _close_of(rawws.read_frames(sock, until_close=False, timeout=5))
    assert code == 1009 and b"65536" in reason
    thread.join(5)
    assert not thread.is_alive()
    assert _closes("message_too_big") == before + 1
    # the polite client's compressed command is inflated and answered
    _send(polite, client_frame(OP_TEXT, deflate_payload(b'{"type":"ping"}'), rsv=4))
    assert json.loads(_read(polite, 1)[0][1]) == {"type": "pong"}
    _send(polite, client_frame(OP_CLOSE, rawws.close_payload(1000)))
    polite_thread.join(5)
    assert not polite_thread.is_alive()


@pytest.mark.timeout(30)
def test_the_compressed_echo_of_a_clients_message_still_comes_before_its_pong(sessions):
    """Rebroadcast to a deflate client: its echo goes out compressed, and the pong it is owed
    for a ping sent after the message waits behind that echo (recognized by its plain
    frame), as for a plain client."""
    s = sessions(compression_min_size=100, close_timeout=6.0)
    sock, thread = s.open(deflate=True)
    message = b"m" * 5000
    started = time.monotonic()
    _send(sock, client_frame(OP_TEXT, deflate_payload(message), rsv=4),
          client_frame(OP_PING, b"after"))
    parser = rawws.FrameParser(deflate=True)
    frames: list = []
    sock.settimeout(8)
    while len(frames) < 2:
        frames += parser.feed(sock.recv(65536))
    assert frames[:2] == [(OP_TEXT, message), (OP_PONG, b"after")]
    assert parser.compressed == 1
    # released by the echo itself, not by the hold limit (close_timeout, 6 s): an echo
    # not recognized under its compressed form would hold the pong that long
    assert time.monotonic() - started < 3
    _send(sock, client_frame(OP_CLOSE, rawws.close_payload(1000)))
    assert close_code(rawws.read_frames(sock, timeout=5)[-1][1]) == 1000
    sock.shutdown(socket.SHUT_WR)  # our FIN: the session ends at once
    thread.join(5)
    assert not thread.is_alive()


# -- helpers for the end-to-end attacks -----------------------------------------------------


@pytest.mark.timeout(30)
def test_thousands_of_pings_in_one_read_are_cut_at_the_limit_not_answered_first(sessions):
    s = sessions(max_control_rate=10, close_timeout=10)
    before = _closes("control_rate")
    sock, thread = s.open()
    _send(sock, client_frame(OP_PING, b"p") * 5000)  # ~40 KB: one or two reads
    frames = rawws.read_frames(sock, timeout=5)
    code, reason = _close_of(frames)
    assert code == 1008 and b"WSSERVER_MAX_CONTROL_RATE" in reason
    pongs = [f for f in frames if f[0] == OP_PONG]
    assert len(pongs) <= 20, f"{len(pongs)} pongs: the burst is twice the rate"
    # it keeps flooding instead of answering the close: cut after what a closed peer may
    # still send (1 MiB), long before the 10 s close timeout
    began = time.monotonic()
    try:
        for _ in range(100):
            _send(sock, client_frame(OP_PING, b"") * 20000)
    except OSError:
        pass
    thread.join(5)
    assert not thread.is_alive() and time.monotonic() - began < 1.5
    assert _closes("control_rate") == before + 1


@pytest.mark.timeout(30)
def test_pongs_to_keepalive_pings_are_free_unsolicited_pongs_count(sessions):
    s = sessions(max_control_rate=1, ping_interval=0.05, ping_timeout=5)
    sock, thread = s.open()
    parser = rawws.FrameParser()
    answered = 0
    deadline = time.monotonic() + 1.0
    sock.settimeout(0.2)
    while time.monotonic() < deadline:  # answer the server's keepalive for one second
        try:
            data = sock.recv(65536)
        except socket.timeout:
            continue
        for op, payload in parser.feed(data):
            assert op == OP_PING, "not closed while answering keepalive pings"
            _send(sock, client_frame(OP_PONG, payload))
            answered += 1
    assert answered >= 5
    _send(sock, *(client_frame(OP_PONG, b"unsolicited") for _ in range(5)))
    code, reason = _close_of(rawws.read_frames(sock, timeout=5))
    assert code == 1008 and b"WSSERVER_MAX_CONTROL_RATE" in reason


@pytest.mark.timeout(30)
def test_commands_past_the_rate_close_1008_after_a_burst_that_fits_every_room(sessions):
    s = sessions(max_command_rate=5, max_rooms_per_connection=30)
    before = _closes("command_rate")
    sock, thread = s.open()
    # a client joining all its rooms at once, then a few more commands: within the burst
    # (5 x rooms + twice the rate = 160)
    _send(sock, *(_text({"type": "subscribe", "room": f"r{i}"}) for i in range(30)),
          *(_text({"type": "ping"}) for _ in range(8)))
    replies = [json.loads(p) for _, p in _read(sock, 38)]
    assert [r["type"] for r in replies] == ["subscribed"] * 30 + ["pong"] * 8
    _send(sock, *(_text({"type": "ping"}) for _ in range(200)))
    frames = rawws.read_frames(sock, timeout=5)
    code, reason = _close_of(frames)
    assert code == 1008 and b"WSSERVER_MAX_COMMAND_RATE" in reason
    assert len([f for f in frames if f[0] == OP_TEXT]) <= 122 + 5  # what was left, + refill
    _send(sock, client_frame(OP_CLOSE, rawws.close_payload(1000)))
    thread.join(5)
    assert _closes("command_rate") == before + 1


@pytest.mark.timeout(30)
def test_a_resume_counts_as_five_commands(sessions):
    """A subscribe with ``since`` replays history on the broadcaster thread: it costs five
    commands, so a client looping resumes is cut five times sooner than one looping pings."""
    s = sessions(max_command_rate=0.1, max_rooms_per_connection=2)  # burst 5 x 2 + 0.2
    before = _closes("command_rate")
    sock, thread = s.open()
    resume = _text({"type": "subscribe", "room": "r", "since": "1-1"})
    _send(sock, resume)
    assert json.loads(_read(sock, 1)[0][1])["type"] == "subscribed"
    _send(sock, resume)  # 10 of 10.2 tokens taken
    assert json.loads(_read(sock, 1)[0][1])["type"] == "subscribed"
    _send(sock, resume)
    code, reason = _close_of(rawws.read_frames(sock, timeout=5))
    assert code == 1008 and b"WSSERVER_MAX_COMMAND_RATE" in reason
    _send(sock, client_frame(OP_CLOSE, rawws.close_payload(1000)))
    thread.join(5)
    assert _closes("command_rate") == before + 1


@pytest.mark.timeout(30)
def test_free_form_messages_answered_with_an_error_count_as_commands(sessions):
    s = sessions(env="production", max_command_rate=5, max_rooms_per_connection=1)
    sock, thread = s.open(remote="127.0.0.1")
    _send(sock, *(client_frame(OP_TEXT, b"hello") for _ in range(200)))
    frames = rawws.read_frames(sock, timeout=5)
    code, reason = _close_of(frames)
    assert code == 1008 and b"WSSERVER_MAX_COMMAND_RATE" in reason
    errors = [json.loads(p)["code"] for op, p in frames if op == OP_TEXT]
    assert errors and set(errors) == {"rebroadcast_disabled"} and len(errors) <= 17  # burst 15


def _publish(service: NotificationService, room: str, count: int, size: int = 10) -> list[str]:
    ids = []
    for i in range(count):
        published = service.publish(Notification("h", "x" * size, i, rooms=(room,)))
        assert published is not None
        ids.append(published.ids[room])
    return ids


@pytest.mark.timeout(30)
def test_resume_without_a_slot_is_busy_names_the_setting_and_is_not_a_client_mistake(sessions):
    s = sessions(max_resumes=1, enqueue_timeout=0.05, max_invalid_commands=3)
    ids = _publish(s.service, "hist", 5)
    before = _refusals("resume_busy")
    sock, thread = s.open()
    assert s.service.recovery.slots.acquire(-1, timeout=0) is None  # the worker's one slot is taken
    resume = _text({"type": "subscribe", "room": "hist", "since": ids[0]})
    _send(sock, *([resume] * 5))
    replies = [json.loads(p) for _, p in _read(sock, 5)]
    assert all(r["type"] == "error" and r["code"] == "busy" for r in replies), replies
    assert "WSSERVER_MAX_RESUMES" in replies[0]["reason"] and replies[0]["room"] == "hist"
    assert _refusals("resume_busy") == before + 5
    s.service.recovery.slots.release(-1)
    _send(sock, resume)  # still open: busy is the server's state, not the client's mistake
    frames = _read(sock, 5)
    assert json.loads(frames[0][1]) == {"type": "subscribed", "room": "hist",
                                        "recovered": True, "missed": 4}
    assert [json.loads(p)["id"] for _, p in frames[1:]] == ids[1:]
    wait_for(lambda: s.service.recovery.slots.in_flight == 0, message="the slot given back")


@pytest.mark.timeout(30)
def test_a_client_dropped_as_slow_during_a_replay_is_removed_counted_and_closed(sessions):
    s = sessions(client_buffer=1024, send_buffer=4096)
    ids = _publish(s.service, "big", 50, size=2000)
    before = _closes("slow_consumer")
    slow_before = metrics.SLOW_CONSUMERS._value.get()
    sock, thread = s.open()
    wait_for(lambda: s.service.hub.count() == 1, message="registered")
    _send(sock, _text({"type": "subscribe", "room": "big", "since": ids[0]}))  # never reads
    wait_for(lambda: _closes("slow_consumer") == before + 1, message="dropped and counted")
    assert s.service.hub.count() == 0, "out of the hub: it gets nothing more"
    frames = rawws.read_frames(sock, timeout=5)
    code, reason = _close_of(frames)
    assert code == 1008 and reason == b"slow consumer"
    thread.join(5)
    assert _closes("slow_consumer") == before + 1, "counted once"
    assert metrics.SLOW_CONSUMERS._value.get() == slow_before + 1


@pytest.mark.timeout(30)
@pytest.mark.parametrize("case", ["message_too_big", "rate_limit", "protocol_error",
                                  "invalid_commands", "keepalive_timeout", "token_expired"])
def test_every_server_initiated_close_is_counted_once(sessions, case):
    settings = {"max_message_size": 100, "rate_limit": 1 if case == "rate_limit" else 0,
                "max_invalid_commands": 2,
                "ping_interval": 0.05 if case == "keepalive_timeout" else 25, "ping_timeout": 0.2}
    s = sessions(**settings)
    before = _closes(case)
    identity = Identity("u", time.time() + 0.3) if case == "token_expired" else None
    sock, thread = s.open(identity=identity)
    expected = {
        "message_too_big": (1009, [client_frame(OP_TEXT, b"x" * 101)]),
        "rate_limit": (1008, [client_frame(0x2, b"m")] * 5),
        "protocol_error": (1002, [client_frame(OP_TEXT, b"bad", rsv=1)]),
        "invalid_commands": (1008, [_text({"type": "nope"})] * 3),
        "keepalive_timeout": (1011, []),  # never answers the ping
        "token_expired": (4001, []),
    }[case]
    _send(sock, *expected[1])
    frames = rawws.read_frames(sock, timeout=5)
    code, _ = _close_of(frames)
    assert code == expected[0]
    if case not in ("protocol_error", "keepalive_timeout"):
        _send(sock, client_frame(OP_CLOSE, rawws.close_payload(1000)))
    thread.join(5)
    assert not thread.is_alive()
    assert _closes(case) == before + 1


@pytest.mark.timeout(30)
def test_losing_the_race_for_the_last_slot_is_a_counted_refusal(sessions):
    s = sessions(max_connections=1)
    before = _refusals("server_full")
    first, _ = s.open()
    wait_for(lambda: s.service.hub.count() == 1, message="the first takes the slot")
    second, thread = s.open()
    code, reason = _close_of(rawws.read_frames(second, timeout=5))
    assert code == 1013 and reason == b"server full"
    thread.join(5)
    assert _refusals("server_full") == before + 1


# -- the session's echo ordering (wsserver.echo), driven by what on_message says -----------


class _Relay:
    """A session run by ``session.run_session`` on its own thread over a socketpair, with a
    real Connection and Flusher; the test plays the broadcaster (it writes echoes through
    ``conn.send_frames`` from its own thread) and ``on_message`` is given by the test."""

    def __init__(self, on_message, close_timeout: float = 2.0) -> None:
        self.flusher = Flusher(poll_timeout=0.05)
        self.flusher.start()
        ours, self.peer = socket.socketpair()
        self.peer.settimeout(5)
        self.ours = ours
        self.conn = Connection(1, ours, "192.0.2.9", 1 << 20, self.flusher)
        settings = load_settings({}, {"env": "development", "rebroadcast": True,
                                      "close_timeout": close_timeout, "rate_limit": 0})
        self.delivered = threading.Event()
        self.result: list[str] = []

        def handler(conn, payload):
            try:
                return on_message(conn, payload)
            finally:
                self.delivered.set()

        self.thread = threading.Thread(
            target=lambda: self.result.append(
                run_session(_Transport(ours), self.conn, settings, handler)),
            name="test-session", daemon=True)
        self.thread.start()
        self.parser = rawws.FrameParser()

    def read(self, count: int) -> list[tuple[int, bytes]]:
        frames: list[tuple[int, bytes]] = []
        while len(frames) < count:
            data = self.peer.recv(65536)
            assert data, f"ended after {frames}"
            frames += self.parser.feed(data)
        assert len(frames) == count, frames
        return frames

    def quiet(self, seconds: float = 0.3) -> None:
        self.peer.settimeout(seconds)
        try:
            data = self.peer.recv(65536)
        except socket.timeout:
            return
        finally:
            self.peer.settimeout(5)
        raise AssertionError(f"unexpected {self.parser.feed(data)}")

    def end(self) -> None:
        if self.thread.is_alive():
            try:
                _send(self.peer, client_frame(OP_CLOSE, rawws.close_payload(1000)))
                self.peer.shutdown(socket.SHUT_WR)  # the TCP close the session waits for
            except OSError:
                pass
        self.thread.join(5)
        assert not self.thread.is_alive(), "the session did not end"
        self.conn.detach()
        self.flusher.stop()
        self.ours.close()
        self.peer.close()


@pytest.mark.timeout(30)
def test_a_reply_sent_on_another_thread_while_relaying_does_not_release_the_pong():
    """The defect of the replies counter: a reply written on another thread (a Resume's, on
    the broadcaster thread) while on_message relayed a message was taken for a direct answer,
    the echo was withdrawn and the pong overtook it. Now on_message's True says "relayed"."""
    reply = encode_frame(OP_TEXT, b'{"type":"subscribed"}')

    def on_message(conn, payload):
        other = threading.Thread(target=conn.send, args=(reply,))
        other.start()
        other.join(5)
        return True  # handed over for relay: the echo comes later

    r = _Relay(on_message)
    try:
        _send(r.peer, client_frame(OP_TEXT, b"relay me"), client_frame(OP_PING, b"p"))
        assert r.delivered.wait(5)
        assert r.read(1) == [(OP_TEXT, b'{"type":"subscribed"}')]
        r.quiet()  # the pong waits for the echo
        r.conn.send_frames([encode_frame(OP_TEXT, b"relay me")])  # the broadcaster's echo
        assert r.read(2) == [(OP_TEXT, b"relay me"), (OP_PONG, b"p")]
    finally:
        r.end()
    assert r.result and r.result[0].startswith("peer closed")


@pytest.mark.timeout(30)
@pytest.mark.parametrize("answer", [False, None])
def test_a_message_answered_directly_holds_nothing_back(answer):
    error = encode_frame(OP_TEXT, b'{"type":"error","code":"queue_full"}')

    def on_message(conn, payload):
        conn.send(error)
        return answer

    r = _Relay(on_message)
    try:
        started = time.monotonic()
        _send(r.peer, client_frame(OP_TEXT, b"not relayed"), client_frame(OP_PING, b"p"))
        assert r.read(2) == [(OP_TEXT, b'{"type":"error","code":"queue_full"}'), (OP_PONG, b"p")]
        assert time.monotonic() - started < 1.0, "the pong waited for an echo never coming"
    finally:
        r.end()


@pytest.mark.timeout(30)
def test_a_lost_echo_holds_the_pong_and_the_close_reply_for_close_timeout_at_most():
    r = _Relay(lambda conn, payload: True, close_timeout=0.4)  # "relayed", never echoed
    try:
        started = time.monotonic()
        _send(r.peer, client_frame(OP_TEXT, b"lost"), client_frame(OP_PING, b"p"))
        assert r.read(1) == [(OP_PONG, b"p")]
        waited = time.monotonic() - started
        assert 0.35 <= waited < 2.0, f"the pong waited {waited:.2f}s"
        started = time.monotonic()
        _send(r.peer, client_frame(OP_TEXT, b"lost too"),
              client_frame(OP_CLOSE, rawws.close_payload(1000)))
        assert r.read(1) == [(OP_CLOSE, rawws.close_payload(1000))]
        waited = time.monotonic() - started
        assert 0.35 <= waited < 2.0, f"the close reply waited {waited:.2f}s"
    finally:
        r.end()
