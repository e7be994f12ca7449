"""wsserver.transport: the one adapter to simple-websocket. The deflate offer simple-websocket
answers is the one the handshake accepted, a request simple-websocket's parser would reject is
recognised before the route runs, no reader thread is started, ``Transport`` hands the session
the socket and a wsproto parser (a real simple-websocket ``Server`` over a socketpair), and
``InboundDeflate`` inflates a client's compressed messages with a bound."""

from __future__ import annotations

import gc
import random
import socket
import threading
import tracemalloc
import weakref
import zlib
from typing import Any

import pytest
import simple_websocket
import wsproto.connection
from rawws import OP_TEXT, client_frame
from wsproto import ConnectionType
from wsproto.connection import Connection as WsprotoConnection
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage

import wsserver.transport as transport_module
from wsserver.frames import OP_BINARY, OP_PING, deflate_payload
from wsserver.handshake import negotiate_compression
from wsserver.transport import (
    InboundDeflate,
    Transport,
    defer_upgrade_response,
    handshake_rejection,
    inbound_protocol,
    server_options,
)

pytestmark = pytest.mark.timeout(10)

KEY = "dGhlIHNhbXBsZSBub25jZQ=="
GOOD = {
    "REQUEST_METHOD": "GET",
    "PATH_INFO": "/ws",
    "REMOTE_ADDR": "192.0.2.1",
    "HTTP_HOST": "127.0.0.1:8080",
    "HTTP_UPGRADE": "websocket",
    "HTTP_CONNECTION": "Upgrade",
    "HTTP_SEC_WEBSOCKET_KEY": KEY,
    "HTTP_SEC_WEBSOCKET_VERSION": "13",
}
OFFER = "permessage-deflate; client_max_window_bits"


# -- the deflate offer simple-websocket sees ---------------------------------------------------


def test_the_offer_left_by_negotiation_is_answered_exactly_as_accepted(accept):
    """simple-websocket answers through wsproto's PerMessageDeflate: the offer the handshake
    leaves in the environ makes it answer exactly ``DeflateOffer.answer()``."""
    for offer in (OFFER, "permessage-deflate; server_max_window_bits=9; client_max_window_bits"):
        environ = {**GOOD, "HTTP_SEC_WEBSOCKET_EXTENSIONS": offer}
        accepted = negotiate_compression(environ, True)
        assert accepted is not None
        answer = accept(environ).answer.decode("latin-1")
        assert f"Sec-WebSocket-Extensions: {accepted.answer()}\r\n" in answer


# -- handshake_rejection -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "environ",
    [
        pytest.param(GOOD, id="plain"),
        pytest.param({**GOOD, "HTTP_SEC_WEBSOCKET_EXTENSIONS": OFFER}, id="deflate-offer"),
        pytest.param({**GOOD, "HTTP_ORIGIN": "http://127.0.0.1:8080", "wsgi.input": object()},
                     id="origin-and-non-http-keys"),
        pytest.param({**GOOD, "HTTP_CONNECTION": "keep-alive, Upgrade"}, id="connection-list"),
    ],
)
def test_a_good_handshake_is_not_rejected(environ):
    assert handshake_rejection(environ) is None


@pytest.mark.parametrize(
    "change, complaint",
    [
        pytest.param({"HTTP_SEC_WEBSOCKET_KEY": None}, "Sec-WebSocket-Key", id="no-key"),
        pytest.param({"HTTP_HOST": None}, "Bad HTTP message", id="no-host"),
        pytest.param({"HTTP_CONNECTION": "Upgrade, \xe9"}, "ascii", id="connection-not-ascii"),
        pytest.param({"HTTP_HOST": "xn--a"}, "idna", id="host-not-idna"),
        pytest.param({"HTTP_X_NUL": "a\x00b"}, "Bad HTTP message", id="nul-in-a-header"),
        pytest.param({"HTTP_TRANSFER_ENCODING": "gzip"}, "Bad HTTP message",
                     id="transfer-encoding"),
    ],
)
def test_what_simple_websockets_parser_rejects_is_named(change, complaint):
    environ = {k: v for k, v in {**GOOD, **change}.items() if v is not None}
    rejection = handshake_rejection(environ)
    assert rejection is not None and complaint in rejection


def test_an_environ_without_headers_is_rejected():
    assert handshake_rejection({}) is not None


_AWKWARD_VALUES = [
    "", " ", "a b", "a  b", "a\tb", " a", "a ", "\xe9", "a\x00b", "a\x7fb", "\u20ac", "x" * 9000,
    "keep-alive, Upgrade", "Upgrade", "upgrade", "UPGRADE , x", "keep-alive", "websocket",
    "WebSocket", "websocket ", "13", " 13", "8", "chunked", "gzip", "0", "12", "xn--a",
    "xn--", "a..b", "a." + "b" * 64, "127.0.0.1:8080", "[::1]:80", "example.com", "\u00e9.com",
    KEY, "not=base64", "permessage-deflate", "permessage-deflate; client_max_window_bits",
    "permessage-deflate; client_no_context_takeover; server_no_context_takeover",
    "permessage-deflate; client_no_context_takeover; server_no_context_takeover; "
    "server_max_window_bits=8",
    "permessage-deflate; client_no_context_takeover; server_no_context_takeover; "
    "server_max_window_bits=15",
    "wsserver.v1", "wsserver.v1, token.abc", '"quoted"', "a,b,,c", "(comment)",
]
_AWKWARD_NAMES = [
    "HTTP_HOST", "HTTP_CONNECTION", "HTTP_UPGRADE", "HTTP_SEC_WEBSOCKET_VERSION",
    "HTTP_SEC_WEBSOCKET_KEY", "HTTP_SEC_WEBSOCKET_EXTENSIONS", "HTTP_SEC_WEBSOCKET_PROTOCOL",
    "HTTP_TRANSFER_ENCODING", "HTTP_CONTENT_LENGTH", "HTTP_ORIGIN", "HTTP_X_A", "HTTP_X__A",
    "HTTP_X-A", "HTTP_", "HTTP_X.A", "HTTP_\xe9", "HTTP_EXPECT", "HTTP_X_1_2",
]


def test_the_replay_is_skipped_only_where_it_would_accept():
    """``_plainly_acceptable`` (which lets a request skip the replay) must never vouch for
    a request the replay would reject: checked against the replay on the good handshake
    with one, two or three headers replaced by awkward names and values."""
    rng = random.Random(1807)
    vouched = 0
    for n in range(6000):
        environ = dict(GOOD)
        for _ in range(1 + n % 3):
            name = rng.choice(_AWKWARD_NAMES)
            if rng.random() < 0.1:
                environ.pop(name, None)
            else:
                environ[name] = rng.choice(_AWKWARD_VALUES)
        if transport_module._plainly_acceptable(environ):
            vouched += 1
            assert replay_only(environ) is None, environ
    assert vouched > 500  # the check vouches for plain requests, not just for none


def replay_only(environ):
    saved = transport_module._plainly_acceptable
    transport_module._plainly_acceptable = lambda environ: False
    try:
        return handshake_rejection(environ)
    finally:
        transport_module._plainly_acceptable = saved


def test_plain_handshakes_skip_the_replay():
    assert transport_module._plainly_acceptable(GOOD)
    environ = {**GOOD, "HTTP_SEC_WEBSOCKET_EXTENSIONS": OFFER}
    assert not transport_module._plainly_acceptable(environ)  # a raw offer: replayed
    negotiate_compression(environ, True)
    assert transport_module._plainly_acceptable(environ)  # our own answer: plain


# -- server_options and Transport over a socketpair --------------------------------------------


def test_server_options_turn_off_the_librarys_thread_pings_and_limits():
    options = server_options()
    assert options["ping_interval"] is None and options["max_message_size"] is None
    reader = options["thread_class"](target=lambda: None)
    reader.start()
    assert not reader.is_alive() and reader.name == "wsserver-connection"
    reader.join(0)


class Accepted:
    """A real simple-websocket ``Server`` (as flask-sock builds it, with our options) on one
    end of a socketpair; the test holds the client's end."""

    def __init__(self, environ: dict[str, Any]) -> None:
        self.ours, self.peer = socket.socketpair()
        self.peer.settimeout(5)
        self.ws = simple_websocket.Server({**environ, "werkzeug.socket": self.ours},
                                          **server_options())
        self.answer = self._read_head()

    def _read_head(self) -> bytes:
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.peer.recv(4096)
            assert chunk, "closed before the handshake answer"
            head += chunk
        return head

    def nothing_more(self, wait: float = 0.2) -> bool:
        self.peer.settimeout(wait)
        try:
            return self.peer.recv(4096) == b""
        except socket.timeout:
            return True

    def close(self) -> None:
        self.ours.close()
        self.peer.close()


@pytest.fixture
def accept():
    made: list[Accepted] = []

    def make(environ: dict[str, Any]) -> Accepted:
        made.append(Accepted(environ))
        return made[-1]

    yield make
    for accepted in made:
        accepted.close()


def test_an_accepted_connection_runs_no_reader_thread(accept):
    before = set(threading.enumerate())
    accepted = accept(GOOD)
    assert accepted.answer.startswith(b"HTTP/1.1 101")
    assert accepted.ws.connected
    assert set(threading.enumerate()) == before, "one thread per connection: the request's"


def test_compression_off_keeps_deflate_out_of_the_answer(accept):
    """The reference: left in, simple-websocket accepts the offer as the client made it
    (context takeover: every client's bytes would differ); with WSSERVER_COMPRESSION off
    the offer is removed and the answer negotiates no extension."""
    offered = accept({**GOOD, "HTTP_SEC_WEBSOCKET_EXTENSIONS": OFFER})
    assert b"permessage-deflate" in offered.answer.lower()
    environ = {**GOOD, "HTTP_SEC_WEBSOCKET_EXTENSIONS": OFFER}
    assert negotiate_compression(environ, False) is None
    stripped = accept(environ)
    assert stripped.answer.startswith(b"HTTP/1.1 101")
    assert b"sec-websocket-extensions" not in stripped.answer.lower()


def test_a_deflate_transport_parses_with_its_own_bounded_inflater(accept):
    environ = {**GOOD, "HTTP_SEC_WEBSOCKET_EXTENSIONS": OFFER}
    negotiate_compression(environ, True)
    accepted = accept(environ)
    plain, deflate = Transport(accepted.ws), Transport(accepted.ws, True, 1000)
    assert plain.protocol is accepted.ws.ws  # nothing to swap without compression
    assert deflate.protocol is not accepted.ws.ws
    deflate.protocol.receive_data(client_frame(OP_TEXT, deflate_payload(b"x" * 500), rsv=4))
    [event] = deflate.protocol.events()
    assert isinstance(event, TextMessage) and event.data == "x" * 500


def test_transport_holds_the_socket_and_a_parser_of_the_clients_frames(accept):
    accepted = accept(GOOD)
    transport = Transport(accepted.ws)
    assert transport.sock is accepted.ours
    transport.protocol.receive_data(client_frame(OP_TEXT, b'{"type":"ping"}'))
    events = list(transport.protocol.events())
    assert len(events) == 1 and isinstance(events[0], TextMessage)
    assert events[0].data == '{"type":"ping"}'


def test_the_handshake_state_is_let_go_once_answered(accept):
    """An idle connection keeps no handshake: not wsproto's H11Handshake (its h11
    connection, parsed request and buffers), not the library's Event (docs/performance.md)."""
    accepted = accept(GOOD)
    handshake = weakref.ref(accepted.ws.ws.handshake)
    event = weakref.ref(accepted.ws.event)
    transport = Transport(accepted.ws)
    gc.collect()
    assert handshake() is None and event() is None
    assert accepted.ws.ws is transport.protocol  # the opened connection, no WSConnection
    assert isinstance(transport.protocol, wsproto.connection.Connection)
    assert transport.protocol.state is wsproto.connection.ConnectionState.OPEN


def test_an_unreleased_close_still_writes_the_close_frame_once_the_handshake_is_gone(accept):
    """flask-sock's ``ws.close()`` after the route reaches the opened connection directly:
    the same close frame as through the forgotten WSConnection."""
    accepted = accept(GOOD)
    Transport(accepted.ws)
    accepted.ws.close()
    accepted.peer.settimeout(5)
    assert accepted.peer.recv(4096) == b"\x88\x02\x03\xe8"  # close 1000, unmasked


def test_the_held_upgrade_response_keeps_no_copy(accept):
    environ = {**GOOD}
    ours, peer = socket.socketpair()
    try:
        environ["werkzeug.socket"] = ours
        defer_upgrade_response(environ)
        held = environ["werkzeug.socket"]
        ws = simple_websocket.Server(environ, **server_options())
        transport = Transport(ws)
        assert transport.upgrade_response.startswith(b"HTTP/1.1 101")
        assert held.response is None and transport.sock is ours and ws.sock is ours
    finally:
        ours.close()
        peer.close()


def test_release_makes_the_librarys_close_write_nothing(accept):
    """After our session sent its close frame, flask-sock calls ``ws.close()`` (and swallows
    any exception it raises): released, it must not write a second close frame."""
    unreleased = accept(GOOD)
    unreleased.ws.close()
    assert not unreleased.nothing_more(), "the reference: an unreleased close writes a frame"
    released = accept(GOOD)
    Transport(released.ws).release()
    assert not released.ws.connected
    with pytest.raises(simple_websocket.ConnectionClosed):
        released.ws.close()
    assert released.nothing_more()


def test_detaching_lets_go_of_the_library_and_its_close_writes_nothing(accept):
    """Before a session that runs after the request returned (``worker.RUN_AFTER_REQUEST``):
    the transport keeps no reference to simple-websocket's ``Server`` (which holds the
    request's environ), flask-sock's ``close()`` right after the route writes nothing, and
    the session's own ``release()`` at its end is harmless."""
    accepted = accept(GOOD)
    transport = Transport(accepted.ws)
    server = weakref.ref(accepted.ws)
    transport.detach_library()
    with pytest.raises(simple_websocket.ConnectionClosed):
        accepted.ws.close()
    assert accepted.nothing_more()
    del accepted.ws
    gc.collect()
    assert server() is None
    transport.release()
    assert transport.sock is accepted.ours


# -- InboundDeflate: a client's compressed messages ---------------------------------------------


def _events(data: bytes, max_size: int = 1 << 16) -> list:
    proto = inbound_protocol(True, max_size)
    proto.receive_data(data)
    return list(proto.events())


def _compressed(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    return client_frame(opcode, deflate_payload(payload), fin=fin, rsv=4)


def test_compressed_and_plain_messages_both_arrive_whole():
    text = '{"type":"subscribe","room":"r"}' * 40
    events = _events(_compressed(OP_TEXT, text.encode()) + client_frame(OP_TEXT, b"plain")
                     + _compressed(OP_BINARY, bytes(range(256)) * 8))
    assert [type(e) for e in events] == [TextMessage, TextMessage, BytesMessage]
    assert events[0].data == text and events[1].data == "plain"
    assert events[2].data == bytes(range(256)) * 8


def test_a_ping_between_the_fragments_of_a_compressed_message_leaves_it_compressed():
    """wsproto's own PerMessageDeflate forgets the message is compressed after a control
    frame in its middle; ours inflates the rest."""
    payload = deflate_payload(b"abc" * 1000)
    half = len(payload) // 2
    data = (client_frame(OP_TEXT, payload[:half], fin=False, rsv=4)
            + client_frame(OP_PING, b"p")
            + client_frame(0x0, payload[half:]))
    events = _events(data)
    assert isinstance(events[1], Ping)
    assert "".join(e.data for e in events if isinstance(e, TextMessage)) == "abc" * 1000


@pytest.mark.parametrize(
    "frame",
    [
        pytest.param(client_frame(OP_PING, b"x", rsv=4), id="rsv1-on-a-ping"),
        pytest.param(_compressed(OP_TEXT, b"a" * 50, fin=False) + client_frame(0x0, b"", rsv=4),
                     id="rsv1-on-a-continuation"),
        pytest.param(client_frame(OP_TEXT, b"a", rsv=2), id="rsv2"),
    ],
)
def test_reserved_bits_where_deflate_allows_none_fail_the_connection(frame):
    closes = [e for e in _events(frame) if isinstance(e, CloseConnection)]
    assert closes and closes[0].code == 1002


def test_a_corrupt_compressed_message_fails_with_1007():
    [event] = _events(client_frame(OP_TEXT, b"\xff\xff\xff\xff", rsv=4))
    assert isinstance(event, CloseConnection) and event.code == 1007


def test_a_message_inflating_to_exactly_the_limit_arrives():
    [event] = _events(_compressed(OP_BINARY, b"\0" * 4096), max_size=4096)
    assert isinstance(event, BytesMessage) and len(event.data) == 4096


def test_a_decompression_bomb_is_cut_at_the_limit_without_being_inflated():
    """30 KB of deflate that would inflate to 32 MB: 1009 after inflating at most
    max_size + 1 bytes (what Python allocated along the way stays far under the bomb)."""
    squeezer = zlib.compressobj(9, zlib.DEFLATED, -15)
    bomb = squeezer.compress(b"\0" * (32 << 20)) + squeezer.flush(zlib.Z_SYNC_FLUSH)[:-4]
    assert len(bomb) < 40_000
    frame = client_frame(OP_BINARY, bomb, rsv=4)
    tracemalloc.start()
    try:
        events = _events(frame, max_size=65536)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [type(e) for e in events] == [CloseConnection] and events[0].code == 1009
    assert peak < 2 << 20, f"{peak} bytes allocated while refusing a 32 MiB bomb"


def test_the_limit_counts_the_whole_fragmented_message_not_each_frame():
    payload = deflate_payload(b"y" * 3000)
    third = len(payload) // 3
    data = (client_frame(OP_TEXT, payload[:third], fin=False, rsv=4)
            + client_frame(0x0, payload[third:2 * third], fin=False)
            + client_frame(0x0, payload[2 * third:]))
    assert isinstance(_events(data, max_size=2999)[-1], CloseConnection)
    assert "".join(e.data for e in _events(data, max_size=3000)) == "y" * 3000


def test_no_inflater_is_kept_between_messages():
    """client_no_context_takeover: a connection holds no zlib window while idle."""
    ext = InboundDeflate(1 << 16)
    proto = WsprotoConnection(ConnectionType.SERVER, [ext])
    proto.receive_data(_compressed(OP_TEXT, b"z" * 2000))
    assert [e.data for e in proto.events()] == ["z" * 2000]
    assert ext._inflater is None  # noqa: SLF001 - the state this test is about
