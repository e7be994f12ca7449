"""wsserver.transport: the one adapter to simple-websocket. The deflate offer is removed
before the handshake, a request simple-websocket's parser would reject is recognised before
the route runs, no reader thread is started, and ``Transport`` hands the session the socket
and the wsproto connection (a real simple-websocket ``Server`` over a socketpair)."""

from __future__ import annotations

import socket
import threading
from typing import Any

import pytest
import simple_websocket
from rawws import OP_TEXT, client_frame
from wsproto.events import TextMessage

from wsserver.transport import (
    Transport,
    handshake_rejection,
    server_options,
    strip_compression_offer,
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


# -- strip_compression_offer -------------------------------------------------------------------


def test_the_deflate_offer_is_removed_and_nothing_else():
    environ = {**GOOD, "HTTP_SEC_WEBSOCKET_EXTENSIONS": OFFER}
    strip_compression_offer(environ)
    assert environ == GOOD
    strip_compression_offer(environ)  # no offer: nothing to do, no error
    assert environ == GOOD


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


def test_stripping_the_offer_keeps_deflate_out_of_the_answer(accept):
    """The reference: left in, simple-websocket accepts the offer (every client's bytes would
    then differ); stripped, the answer negotiates no extension."""
    offered = accept({**GOOD, "HTTP_SEC_WEBSOCKET_EXTENSIONS": OFFER})
    assert b"permessage-deflate" in offered.answer.lower()
    environ = {**GOOD, "HTTP_SEC_WEBSOCKET_EXTENSIONS": OFFER}
    strip_compression_offer(environ)
    stripped = accept(environ)
    assert stripped.answer.startswith(b"HTTP/1.1 101")
    assert b"sec-websocket-extensions" not in stripped.answer.lower()


def test_transport_holds_the_socket_and_a_parser_of_the_clients_frames(accept):
    accepted = accept(GOOD)
    transport = Transport(accepted.ws)
    assert transport.sock is accepted.ours
    transport.protocol.receive_data(client_frame(OP_TEXT, b'{"type":"ping"}'))
    events = list(transport.protocol.events())
    assert len(events) == 1 and isinstance(events[0], TextMessage)
    assert events[0].data == '{"type":"ping"}'


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
