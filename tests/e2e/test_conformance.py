"""RFC 6455 conformance of ``/ws``, checked byte by byte against a real server.

These are the behaviours the Autobahn|Testsuite checks (docs/conformance.md), written as
hand-built masked client frames over a raw socket, so each one is fast, deterministic and
says exactly which frames must come back in which order. With one client connected, the
development server's rebroadcast makes ``/ws`` an echo server.

Every read has a socket timeout; "nothing more arrives" is a bounded read that times out.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import rawws
import requests
from support import ROOT, serving

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA

TIMEOUT = 5.0  # any single read; generous for a loaded machine
QUIET = 0.3  # how long "nothing more" is watched for

# "κόσμε" followed by a UTF-16 surrogate (U+D800 as UTF-8), then "edited": Autobahn 6.x
INVALID_UTF8 = b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80edited"

CONFORMANCE = Path(__file__).resolve().parents[2] / "scripts" / "conformance"
WSTEST = Path(os.environ.get("WSSERVER_CONFORMANCE_VENV", "/tmp/conf-venv")) / "bin" / "wstest"


@pytest.fixture(scope="module")
def server():
    """Development server (rebroadcast on) with the default 64 KiB message limit."""
    with serving(env={"WSSERVER_ENV": "development"}) as srv:
        yield srv


# -- a raw client -----------------------------------------------------------------------


def frame(opcode: int, payload: bytes = b"", fin: bool = True, rsv: int = 0,
          masked: bool = True) -> bytes:
    """One client frame; masked unless told otherwise (RFC 6455 section 5.3)."""
    return rawws.client_frame(opcode, payload, fin=fin, rsv=rsv, masked=masked)


def close_body(code: int, reason: bytes = b"") -> bytes:
    return struct.pack("!H", code) + reason


class Client:
    """A raw WebSocket client (the suite's one, :mod:`rawws`): sends bytes as given, parses
    the server's frames, which must be exactly what ``wsserver.frames`` makes (final, no RSV
    bit since no extension is negotiated, unmasked)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        status, head, rest = rawws.handshake(self.sock, port)
        assert status == 101, head
        assert b"sec-websocket-extensions" not in head.lower(), "no extension is negotiated"
        self.parser = rawws.FrameParser()
        self.frames = list(self.parser.feed(rest))

    @property
    def unread(self) -> bool:
        """Whether anything arrived that was not read: frames parsed and not taken, or part
        of one."""
        return bool(self.frames) or self.parser.pending > 0

    def send(self, *frames: bytes) -> None:
        """All frames in one write: the server sees them in one read, as Autobahn's chops."""
        self.sock.sendall(b"".join(frames))

    def _fill(self, timeout: float) -> bool:
        """Read more bytes; False at EOF. Raises socket.timeout after ``timeout``."""
        self.sock.settimeout(timeout)
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            return False
        self.frames += self.parser.feed(chunk)
        return True

    def recv_frame(self, timeout: float = TIMEOUT) -> tuple[int, bytes]:
        """The next frame as (opcode, payload); the server only sends final frames."""
        deadline = time.monotonic() + timeout
        while not self.frames:
            left = deadline - time.monotonic()
            if left <= 0 or not self._fill(left):
                raise AssertionError(f"no complete frame ({self.parser.pending} bytes of one)")
        return self.frames.pop(0)

    def expect_close(self, code: int | None) -> bytes:
        """The next frame is a close with ``code`` (None: no payload); returns the reason."""
        opcode, payload = self.recv_frame()
        assert opcode == OP_CLOSE, (opcode, payload[:80])
        if code is None:
            assert payload == b""
            return b""
        assert len(payload) >= 2
        assert struct.unpack("!H", payload[:2])[0] == code, payload
        reason = payload[2:]
        reason.decode("utf-8")  # a close reason is valid UTF-8
        return reason

    def expect_eof(self, timeout: float = TIMEOUT) -> None:
        """The server ends the TCP connection cleanly (FIN, not RST) and sends nothing more."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            assert left > 0, "the server did not end the TCP connection"
            try:
                more = self._fill(left)
            except ConnectionResetError:
                raise AssertionError("the TCP connection was reset, not closed") from None
            assert not self.unread, f"bytes after the close frame: {self.frames[:3]!r}"
            if not more:
                return

    def expect_quiet(self, quiet: float = QUIET) -> None:
        """Nothing arrives for ``quiet`` seconds."""
        try:
            got = self._fill(quiet)
        except socket.timeout:
            return
        assert not got or not self.unread, f"unexpected bytes: {self.frames[:3]!r}"

    def close_cleanly(self, code: int = 1000) -> None:
        self.send(frame(OP_CLOSE, close_body(code)))
        self.expect_close(code)
        self.expect_eof()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def client(server):
    c = Client(server.port)
    yield c
    c.close()


# -- echo, fragmentation, control frames ------------------------------------------------


@pytest.mark.parametrize(
    "opcode,payload",
    [
        (OP_TEXT, b""),
        (OP_TEXT, "Hello, κόσμε!".encode()),
        (OP_TEXT, b"x" * 125),
        (OP_TEXT, b"y" * 126),
        (OP_TEXT, b"z" * 65535),
        (OP_BINARY, b""),
        (OP_BINARY, bytes(range(256)) * 200),
    ],
    ids=["text-empty", "text-utf8", "text-125", "text-126", "text-65535", "binary-empty",
         "binary-51200"],
)
def test_message_echoed_with_same_opcode_and_payload(client, opcode, payload):
    client.send(frame(opcode, payload))
    assert client.recv_frame() == (opcode, payload)
    client.close_cleanly()


def test_ping_answered_with_same_payload_before_following_echo(client):
    # Autobahn 2.x/5.6: the pong for a ping must not come after the echo of what follows it
    client.send(frame(OP_PING, b"ping payload \x00\xff"), frame(OP_TEXT, b"after the ping"))
    assert client.recv_frame() == (OP_PONG, b"ping payload \x00\xff")
    assert client.recv_frame() == (OP_TEXT, b"after the ping")
    client.close_cleanly()


def test_pong_follows_echo_of_earlier_message(client):
    # the echo comes back through the broadcaster thread; the pong must not overtake it
    for i in range(20):
        client.send(frame(OP_TEXT, b"before the ping %d" % i), frame(OP_PING, b"%d" % i))
        assert client.recv_frame() == (OP_TEXT, b"before the ping %d" % i)
        assert client.recv_frame() == (OP_PONG, b"%d" % i)
    client.close_cleanly()


def test_ten_pings_ten_pongs_in_order(client):
    # Autobahn 2.10
    client.send(*(frame(OP_PING, b"payload-%d" % i) for i in range(10)))
    for i in range(10):
        assert client.recv_frame() == (OP_PONG, b"payload-%d" % i)
    client.close_cleanly()


def test_ping_with_125_byte_payload_answered(client):
    client.send(frame(OP_PING, b"\xfe" * 125))
    assert client.recv_frame() == (OP_PONG, b"\xfe" * 125)
    client.close_cleanly()


def test_unsolicited_pong_ignored(client):
    client.send(frame(OP_PONG, b"unsolicited"), frame(OP_TEXT, b"still here"))
    assert client.recv_frame() == (OP_TEXT, b"still here")
    client.close_cleanly()


def test_fragmented_text_reassembled_and_echoed_as_one_frame(client):
    client.send(
        frame(OP_TEXT, b"frag", fin=False),
        frame(OP_CONT, b"", fin=False),
        frame(OP_CONT, "ment κό".encode()[:-1], fin=False),  # split inside a character
        frame(OP_CONT, "ment κό".encode()[-1:] + b"!", fin=True),
    )
    assert client.recv_frame() == (OP_TEXT, "fragment κό!".encode())
    client.close_cleanly()


def test_fragmented_binary_reassembled(client):
    parts = [os.urandom(1000) for _ in range(5)]
    client.send(frame(OP_BINARY, parts[0], fin=False),
                *(frame(OP_CONT, p, fin=False) for p in parts[1:-1]),
                frame(OP_CONT, parts[-1]))
    assert client.recv_frame() == (OP_BINARY, b"".join(parts))
    client.close_cleanly()


def test_pings_inside_fragmented_message_answered_first(client):
    # Autobahn 5.6-5.9, 5.19-5.20: control frames may be interleaved with fragments
    client.send(frame(OP_TEXT, b"fragment1", fin=False), frame(OP_PING, b"a"))
    assert client.recv_frame() == (OP_PONG, b"a")
    client.send(frame(OP_CONT, b"fragment2", fin=False), frame(OP_PING, b"b"),
                frame(OP_CONT, b"fragment3"))
    assert client.recv_frame() == (OP_PONG, b"b")
    assert client.recv_frame() == (OP_TEXT, b"fragment1fragment2fragment3")
    client.close_cleanly()


# -- the close handshake ----------------------------------------------------------------


@pytest.mark.parametrize("code", [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000,
                                  3999, 4000, 4999])
def test_close_echoes_the_code_and_the_tcp_connection_ends_cleanly(client, code):
    client.send(frame(OP_CLOSE, close_body(code, b"bye")))
    client.expect_close(code)
    client.expect_eof()


def test_bare_close_answered_with_bare_close(client):
    client.send(frame(OP_CLOSE))
    client.expect_close(None)
    client.expect_eof()


def test_peer_keeping_tcp_open_after_close_does_not_stall_http(server):
    # RFC 6455 7.1.1: the server closes TCP first, then waits for the client's FIN; that
    # wait must not happen on gunicorn's main thread, where it would block accepts
    lingering = []
    try:
        for _ in range(4):
            c = Client(server.port)
            lingering.append(c)
            c.send(frame(OP_CLOSE, close_body(1000)))
            c.expect_close(1000)  # and we keep our side of the TCP connection open
        started = time.monotonic()
        assert requests.get(server.url + "/", timeout=10).status_code == 200
        assert time.monotonic() - started < 1.0, "HTTP waited for lingering WebSockets"
        for c in lingering:
            c.expect_eof(timeout=1.0)  # the server's FIN came right after its close frame
    finally:
        for c in lingering:
            c.close()


def test_message_before_close_echoed_before_close_reply(client):
    # Autobahn 7.1.1 sends them apart; in one write the close must still wait for the echo
    client.send(frame(OP_TEXT, b"last words"), frame(OP_CLOSE, close_body(1000)))
    assert client.recv_frame() == (OP_TEXT, b"last words")
    client.expect_close(1000)
    client.expect_eof()


def test_nothing_answered_after_close(client):
    # Autobahn 7.1.2-7.1.5: after the peer's close, no pong and no echo
    client.send(frame(OP_CLOSE, close_body(1000)), frame(OP_PING, b"late"),
                frame(OP_TEXT, b"late"))
    client.expect_close(1000)
    client.expect_eof()


@pytest.mark.parametrize(
    "body",
    [
        b"\x03",  # one byte: a code needs two
        close_body(0), close_body(999), close_body(1004), close_body(1005), close_body(1006),
        close_body(1012 + 4), close_body(1100), close_body(2000), close_body(2999),
        close_body(5000), close_body(65535),
    ],
    ids=["1-byte", "0", "999", "1004", "1005", "1006", "1016", "1100", "2000", "2999", "5000",
         "65535"],
)
def test_invalid_close_code_closes_1002(client, body):
    # Autobahn 7.3.2, 7.9.x: codes that may not be sent on the wire
    client.send(frame(OP_CLOSE, body))
    client.expect_close(1002)
    client.expect_eof()


def test_close_reason_with_invalid_utf8_closes_1007(client):
    # Autobahn 7.5.1
    client.send(frame(OP_CLOSE, close_body(1000, INVALID_UTF8)))
    client.expect_close(1007)
    client.expect_eof()


# -- failing the connection ---------------------------------------------------------------


def test_invalid_utf8_text_closes_1007(client):
    client.send(frame(OP_TEXT, INVALID_UTF8))
    client.expect_close(1007)
    client.expect_eof()


def test_invalid_utf8_detected_in_first_fragment(client):
    # Autobahn 6.4.x "fail fast": the server must not wait for the rest of the message
    client.send(frame(OP_TEXT, b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xf4\x90\x80\x80",
                      fin=False))
    client.expect_close(1007)
    client.expect_eof()


@pytest.mark.parametrize(
    "bad",
    [
        frame(OP_TEXT, b"rsv1", rsv=1),
        frame(OP_BINARY, b"rsv2", rsv=2),
        frame(OP_PING, b"rsv6", rsv=6),
        frame(OP_CLOSE, close_body(1000), rsv=7),
        frame(0x3, b"reserved data opcode"),
        frame(0x7, b"reserved data opcode"),
        frame(0xB, b"reserved control opcode"),
        frame(0xF, b"reserved control opcode"),
        frame(OP_PING, b"x" * 126),  # control payloads are at most 125 bytes
        frame(OP_PING, b"fragmented ping", fin=False),  # control frames are never fragmented
        frame(OP_CONT, b"nothing to continue"),
        frame(OP_TEXT, b"unmasked", masked=False),
    ],
    ids=["rsv1", "rsv2", "rsv6-ping", "rsv7-close", "opcode3", "opcode7", "opcode11",
         "opcode15", "ping-126", "ping-fragmented", "lone-continuation", "unmasked"],
)
def test_protocol_violation_closes_1002(client, bad):
    client.send(bad, frame(OP_PING, b"must not be answered"))
    client.expect_close(1002)
    client.expect_eof()


def test_new_message_inside_fragmented_message_closes_1002(client):
    # Autobahn 5.17/5.18: a data frame must be a continuation while a message is open
    client.send(frame(OP_TEXT, b"fragment1", fin=False), frame(OP_TEXT, b"fragment2"))
    client.expect_close(1002)
    client.expect_eof()


def test_valid_message_before_violation_echoed_before_close(client):
    # Autobahn 3.2, 4.1.3, 5.15: RFC-strict order (the echo is not lost in the failure)
    client.send(frame(OP_TEXT, b"Hello, world!"), frame(OP_TEXT, b"Hello, world!", rsv=2),
                frame(OP_PING))
    assert client.recv_frame() == (OP_TEXT, b"Hello, world!")
    client.expect_close(1002)
    client.expect_eof()


def test_echo_of_a_leaving_client_never_reaches_the_next(server):
    # Autobahn runs cases one connection after another: a message relayed after its sender
    # left would land in the next case (this failed 3.7 before the fix)
    for i in range(25):
        a = Client(server.port)
        a.send(frame(OP_TEXT, b"from A %d" % i), frame(OP_BINARY, b"bad", rsv=4))
        opcode, payload = a.recv_frame()
        if opcode == OP_CLOSE:  # allowed by the RFC, though this server echoes first
            assert payload[:2] == close_body(1002)
        else:
            assert (opcode, payload) == (OP_TEXT, b"from A %d" % i)
            a.expect_close(1002)
        a.expect_eof()
        a.close()
        b = Client(server.port)
        try:
            b.expect_quiet(0.1)
            b.close_cleanly()
        finally:
            b.close()


def test_message_over_limit_closes_1009(client):
    # the server's limit is WSSERVER_MAX_MESSAGE_SIZE, 64 KiB by default
    client.send(frame(OP_BINARY, b"\x00" * (64 * 1024 + 1)))
    client.expect_close(1009)
    client.send(frame(OP_CLOSE, close_body(1000)))
    client.expect_eof()


def test_fragmented_message_over_limit_closes_1009(client):
    client.send(frame(OP_TEXT, b"a" * 40000, fin=False), frame(OP_CONT, b"b" * 40000))
    client.expect_close(1009)
    client.send(frame(OP_CLOSE, close_body(1000)))
    client.expect_eof()


def test_message_at_limit_echoed(client):
    client.send(frame(OP_TEXT, b"m" * (64 * 1024)))
    assert client.recv_frame() == (OP_TEXT, b"m" * (64 * 1024))
    client.close_cleanly()


# -- messages that are not relayed must not delay anything -----------------------------


def test_command_reply_then_close_without_waiting(client):
    # a command is answered directly, never relayed: the close must not wait for an echo
    client.send(frame(OP_TEXT, b'{"type": "ping"}'), frame(OP_PING, b"p"),
                frame(OP_CLOSE, close_body(1000)))
    started = time.monotonic()
    opcode, payload = client.recv_frame()
    assert opcode == OP_TEXT and b"pong" in payload
    assert client.recv_frame() == (OP_PONG, b"p")
    client.expect_close(1000)
    client.expect_eof()
    assert time.monotonic() - started < 1.0, "the close waited for an echo that never comes"


def test_no_rebroadcast_close_without_waiting(make_server):
    srv = make_server({"WSSERVER_ENV": "development", "WSSERVER_REBROADCAST": "false"})
    c = Client(srv.port)
    try:
        c.send(frame(OP_TEXT, b"not relayed"), frame(OP_PING, b"p"),
               frame(OP_CLOSE, close_body(1000)))
        started = time.monotonic()
        opcode, payload = c.recv_frame()
        assert opcode == OP_TEXT and b"rebroadcast_disabled" in payload
        assert c.recv_frame() == (OP_PONG, b"p")
        c.expect_close(1000)
        c.expect_eof()
        assert time.monotonic() - started < 1.0
    finally:
        c.close()


# -- the real suite -----------------------------------------------------------------------


@pytest.mark.timeout(420)
@pytest.mark.skipif(not WSTEST.exists(),
                    reason="Autobahn|Testsuite not installed (scripts/conformance install)")
def test_autobahn_quick_mode(make_server, tmp_path):
    """MODE=quick of the Autobahn fuzzingclient (247 cases, ~10-20 s): 0 failed."""
    srv = make_server({
        "WSSERVER_ENV": "development",
        "WSSERVER_MAX_MESSAGE_SIZE": str(32 * 1024 * 1024),
        "WSSERVER_CLIENT_BUFFER": str(32 * 1024 * 1024),
    })
    result = subprocess.run(
        [sys.executable, str(CONFORMANCE), "run", "--mode", "quick", "--url", srv.ws_url,
         "--out", str(tmp_path), "--timeout", "300"],
        capture_output=True, text=True, timeout=360, check=False,
    )
    summary = result.stdout.strip().splitlines()
    assert result.returncode == 0, result.stdout + result.stderr
    assert summary and summary[-1].startswith("autobahn: ") and " 0 failed" in summary[-1]
    assert not any(line.startswith("unclean close") for line in summary), result.stdout


@pytest.mark.timeout(420)
@pytest.mark.skipif(not WSTEST.exists(),
                    reason="Autobahn|Testsuite not installed (scripts/conformance install)")
def test_autobahn_quick_mode_over_tls(tmp_path):
    """The same over wss://, TLS served by gunicorn (``--tls``: the script starts the server
    with a throw-away certificate): the SSL write path keeps every case's frames and closes
    (~10 s)."""
    env = dict(os.environ, WSSERVER_PYTHON=sys.executable, PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, str(CONFORMANCE), "run", "--tls", "--mode", "quick",
         "--out", str(tmp_path), "--timeout", "300"],
        capture_output=True, text=True, timeout=360, check=False, env=env,
    )
    summary = result.stdout.strip().splitlines()
    assert "against wss://" in result.stderr, result.stderr
    assert result.returncode == 0, result.stdout + result.stderr
    assert summary and summary[-1].startswith("autobahn: ") and " 0 failed" in summary[-1]
    assert " 0 non-strict" in summary[-1]
    assert not any(line.startswith("unclean close") for line in summary), result.stdout


def test_resume_in_development_does_not_hold_the_next_pong(make_server):
    """A subscribe with since is answered from the broadcaster thread; it must not make the
    session wait for an echo that never comes (pongs and close replies would lag)."""
    import time as _time

    from support import RawClient

    server = make_server({"WSSERVER_ENV": "development", "WSSERVER_CLOSE_TIMEOUT": "2"})
    client = RawClient(server)
    try:
        client.send_frame(0x1, json.dumps({"type": "subscribe", "room": "r", "since": "1-1"}).encode())
        op, payload = client.recv_frame()
        assert json.loads(payload)["type"] == "subscribed"
        started = _time.monotonic()
        client.send_frame(0x9, b"hi")
        op, payload = client.recv_until(0xA)
        assert payload == b"hi"
        assert _time.monotonic() - started < 1.0, "the pong waited for a phantom echo"
    finally:
        client.close()
