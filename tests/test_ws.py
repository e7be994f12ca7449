"""wsserver.ws: the ``/ws`` hook's refusals before the upgrade, each a JSON body with the
headers its status implies, in the documented order; and ``serve_connection`` over a real
simple-websocket ``Server`` on a socketpair (registration refused: 1013 with the shared
reason, counted; registered: its connect-time rooms joined, its session served and ended).

Counts and audit lines of each refusal are in tests/test_audit.py, malformed handshakes in
tests/test_handshake.py; here: what the client reads, and what decides which answer it gets.
"""

from __future__ import annotations

import gc
import json
import socket
import threading
import time
import weakref
from typing import Any

import jwt
import pytest
import rawws
import simple_websocket
from rawws import OP_CLOSE, OP_TEXT, client_frame, close_code

from wsserver import codes, metrics
from wsserver.frames import deflate_payload
from wsserver.handshake import negotiate_compression
from wsserver.protocol import Notification
from wsserver.transport import Transport, defer_upgrade_response, server_options
from wsserver.worker import RUN_AFTER_REQUEST
from wsserver.ws import check_upgrade, serve_connection

pytestmark = pytest.mark.timeout(15)

SECRET = "a-test-secret-that-is-long-enough-for-hs256"
REMOTE = "192.0.2.7"
UPGRADE = {
    "Host": "127.0.0.1:8080",
    "Upgrade": "websocket",
    "Connection": "Upgrade",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
    "Sec-WebSocket-Version": "13",
}
BEARER = 'Bearer realm="wsserver"'


def _token(ttl: float = 60, rooms: tuple[str, ...] = ()) -> str:
    claims = {"sub": "alice", "exp": int(time.time() + ttl), "rooms": list(rooms)}
    return jwt.encode(claims, SECRET, algorithm="HS256")


def _refusals(code: str) -> float:
    return metrics.REFUSALS.labels(code)._value.get()


class Held:
    """Real connections registered in an app's hub from socketpairs, closed after the test."""

    def __init__(self) -> None:
        self.sockets: list[socket.socket] = []
        self.registered: list[tuple[Any, Any]] = []

    def register(self, app, remote: str, n: int = 1) -> None:
        service = app.extensions["wsserver"]
        for _ in range(n):
            ours, peer = socket.socketpair()
            self.sockets += [ours, peer]
            conn = service.new_connection(ours, remote)
            assert service.hub.add(conn) is None
            self.registered.append((service, conn))

    def close(self) -> None:
        for service, conn in self.registered:
            service.hub.remove(conn)
            conn.detach()
        for sock in self.sockets:
            sock.close()


@pytest.fixture
def held():
    h = Held()
    yield h
    h.close()


def _upgrade(app, query: str = "", headers: dict[str, str] | None = None):
    return app.test_client().get(
        "/ws" + query, headers={**UPGRADE, **(headers or {})},
        environ_base={"REMOTE_ADDR": REMOTE},
    )


# -- the refusals before the upgrade: body and headers -----------------------------------------

# (settings, query, extra headers, status, code, error text (a prefix), headers implied)
REFUSALS = [
    pytest.param({}, "", {"Origin": "https://evil.example"}, 403, "origin_forbidden",
                 "this origin may not open WebSockets here", {}, id="403-origin"),
    pytest.param({"jwt_secret": SECRET}, "", {}, 401, "missing_token",
                 "a token is required", {"WWW-Authenticate": BEARER}, id="401-missing"),
    pytest.param({"jwt_secret": SECRET}, f"?token={_token(ttl=-60)}", {}, 401, "token_expired",
                 "the token has expired", {"WWW-Authenticate": BEARER}, id="401-expired"),
    pytest.param({"jwt_secret": SECRET}, "", {"Authorization": "Bearer not.a.jwt"}, 401,
                 "invalid_token", "the token is malformed", {"WWW-Authenticate": BEARER},
                 id="401-bearer-malformed"),
    pytest.param({}, "?rooms=%2Fbad", {}, 400, "invalid_room", "?rooms=: ", {},
                 id="400-room-name"),
    pytest.param({"max_rooms_per_connection": 1}, "?rooms=a,b", {}, 400, "too_many_rooms",
                 "a connection may be in at most 1 rooms", {}, id="400-room-count"),
    pytest.param({}, "?rooms=private-team", {}, 403, "room_forbidden",
                 "joining 'private-team' needs a token that grants it", {}, id="403-room"),
    pytest.param({}, "?since=1-1", {}, 400, "invalid_since",
                 "?since= resumes one room: give exactly one in ?rooms=", {}, id="400-since-none"),
    pytest.param({}, "?since=1-1&rooms=a,b", {}, 400, "invalid_since", "?since= resumes one",
                 {}, id="400-since-two"),
    pytest.param({"max_connections_per_ip": 1}, "held", {}, 429, "too_many_connections",
                 "too many WebSockets from this address", {"Retry-After": "5"}, id="429"),
    pytest.param({}, "full", {}, 503, "server_full", "no room for another WebSocket",
                 {"Retry-After": "5"}, id="503"),
    pytest.param({}, "", {"Sec-WebSocket-Version": "8"}, 426, "unsupported_websocket_version",
                 "", {"Sec-WebSocket-Version": "13"}, id="426"),
    pytest.param({}, "", {"Sec-WebSocket-Key": "short"}, 400, "invalid_websocket_key", "", {},
                 id="400-handshake"),
]


@pytest.mark.parametrize("settings, query, headers, status, code, text, implied", REFUSALS)
def test_each_refusal_before_the_upgrade_is_a_json_body_with_its_headers(
    make_app, held, settings, query, headers, status, code, text, implied
):
    app = make_app(env="production", **settings)
    service = app.extensions["wsserver"]
    service.ensure_started()
    if query == "held":
        held.register(app, REMOTE)
        query = ""
    elif query == "full":
        service.hub.set_capacity(0)
        query = ""
    before = _refusals(code)
    response = _upgrade(app, query, headers)
    assert response.status_code == status, response.data
    assert response.is_json and set(response.get_json()) == {"error", "code"}
    assert response.get_json()["code"] == code
    assert response.get_json()["error"].startswith(text), response.get_json()
    for name, value in implied.items():
        assert response.headers.get(name) == value, name
    if status not in (401, 429, 503):
        assert "Retry-After" not in response.headers
        assert "WWW-Authenticate" not in response.headers
    assert _refusals(code) == before + 1
    assert service.hub.count() == len(held.registered), "nothing registered"


@pytest.mark.parametrize(
    "settings, query, headers, setup, status",
    [
        # a forbidden origin is answered before the token is even looked at
        pytest.param({"jwt_secret": SECRET}, "", {"Origin": "https://evil.example"}, None,
                     403, id="origin-before-token"),
        # an anonymous client does not learn which rooms exist or how many it may join
        pytest.param({"jwt_secret": SECRET, "max_rooms_per_connection": 1}, "?rooms=a,b",
                     {}, None, 401, id="token-before-rooms"),
        # a bad request is the client's to fix, whatever the worker's state
        pytest.param({"max_rooms_per_connection": 1}, "?rooms=a,b", {}, "full", 400,
                     id="rooms-before-capacity"),
        pytest.param({"max_connections_per_ip": 1}, "", {}, "held+full", 429,
                     id="address-before-capacity"),
        # the handshake's own checks come before any access rule
        pytest.param({"jwt_secret": SECRET}, "", {"Sec-WebSocket-Version": "8"}, None, 426,
                     id="handshake-before-token"),
    ],
)
def test_a_request_wrong_on_several_counts_gets_the_first_refusal(
    make_app, held, settings, query, headers, setup, status
):
    app = make_app(env="production", **settings)
    service = app.extensions["wsserver"]
    service.ensure_started()
    if setup and "held" in setup:
        held.register(app, REMOTE)
    if setup and "full" in setup:
        service.hub.set_capacity(0)
    assert _upgrade(app, query, headers).status_code == status


def test_the_checks_return_the_identity_and_the_rooms(make_app):
    """A token from ``?token=`` or ``Authorization: Bearer`` is the same identity; the
    connect-time rooms come back parsed, a private one the token grants included."""
    app = make_app(env="production", jwt_secret=SECRET)
    service = app.extensions["wsserver"]
    token = _token(rooms=("private-team",))
    for query, headers in [(f"?token={token}&rooms=news,private-team", {}),
                           ("?rooms=news,private-team", {"Authorization": f"Bearer {token}"})]:
        with app.test_request_context("/ws" + query, headers={**UPGRADE, **headers},
                                      environ_base={"REMOTE_ADDR": REMOTE}):
            identity, rooms = check_upgrade(service)
        assert identity.user == "alice" and identity.rooms == ("private-team",)
        assert rooms == ("news", "private-team")


def test_a_token_in_the_subprotocol_offer_is_the_same_identity(make_app):
    app = make_app(env="production", jwt_secret=SECRET)
    service = app.extensions["wsserver"]
    token = _token(rooms=("private-team",))
    with app.test_request_context("/ws?rooms=private-team", headers=UPGRADE,
                                  environ_base={"REMOTE_ADDR": REMOTE}):
        identity, rooms = check_upgrade(service, token)
    assert identity.user == "alice" and rooms == ("private-team",)


def _offer(token: str) -> dict[str, str]:
    return {"Sec-WebSocket-Protocol": f"wsserver.v1, wsserver.token.{token}"}


# (query, headers, status, code): the offered token is checked exactly as ?token= is. These
# tokens are made when the module is collected, minutes before the test runs: they live an hour
LONG = 3600
OFFERED = [
    pytest.param("", {"Sec-WebSocket-Protocol": "wsserver.v1"}, 401, "missing_token",
                 id="401-offer-without-token"),
    pytest.param("", _offer(_token(ttl=-60)), 401, "token_expired", id="401-expired"),
    pytest.param("", _offer("garbage"), 401, "invalid_token", id="401-garbage"),
    pytest.param("", _offer("a.b.c"), 401, "invalid_token", id="401-three-garbage-parts"),
    pytest.param("", _offer(jwt.encode({"sub": "alice", "exp": int(time.time() + 60)},
                                       "another-secret-another-secret-42", algorithm="HS256")),
                 401, "invalid_token", id="401-other-key"),
    pytest.param("?rooms=private-x", _offer(_token(ttl=LONG)), 403, "room_forbidden", id="403-room"),
    pytest.param(f"?token={_token(ttl=LONG)}", _offer(_token(ttl=LONG)), 400, "ambiguous_token",
                 id="400-offer-and-query"),
    pytest.param("", {**_offer(_token(ttl=LONG)), "Authorization": f"Bearer {_token(ttl=LONG)}"}, 400,
                 "ambiguous_token", id="400-offer-and-bearer"),
    pytest.param("", {"Sec-WebSocket-Protocol": "wsserver.v1, wsserver.token."}, 400,
                 "invalid_subprotocol", id="400-empty-token-entry"),
]


@pytest.mark.parametrize("query, headers, status, code", OFFERED)
def test_a_token_in_the_offer_gets_the_refusals_of_a_token_in_the_url(
    make_app, query, headers, status, code
):
    app = make_app(env="production", jwt_secret=SECRET)
    response = _upgrade(app, query, headers)
    assert response.status_code == status, response.data
    assert response.get_json()["code"] == code
    assert ("WWW-Authenticate" in response.headers) == (status == 401)
    assert "Sec-WebSocket-Protocol" not in response.headers


def test_an_offered_token_is_ignored_like_a_url_token_when_tokens_are_off(make_app, held):
    """No token setting: anonymous connections; the offer is still checked as an offer."""
    app = make_app(env="production")
    service = app.extensions["wsserver"]
    with app.test_request_context("/ws", headers={**UPGRADE, **_offer("whatever")},
                                  environ_base={"REMOTE_ADDR": REMOTE}):
        assert check_upgrade(service, "whatever") == (None, ())
    assert _upgrade(app, "?token=x", _offer("y")).get_json()["code"] == "ambiguous_token"


def test_the_hook_only_guards_the_websocket_endpoint(make_app):
    app = make_app(env="production", jwt_secret=SECRET)
    app.extensions["wsserver"].hub.set_capacity(0)
    response = app.test_client().get("/healthz", headers={"Origin": "https://evil.example"})
    assert response.status_code == 200


# -- serve_connection over a socketpair --------------------------------------------------------


class Accepted:
    """A real simple-websocket ``Server`` (flask-sock's, with our options) on a socketpair:
    ``transport`` for ``serve_connection``, ``peer`` the client's end past the 101."""

    def __init__(self, offer: str | None = None) -> None:
        """``offer``: a Sec-WebSocket-Extensions offer, negotiated as the ``/ws`` hook does."""
        self.ours, self.peer = socket.socketpair()
        self.peer.settimeout(5)
        environ = {f"HTTP_{k.upper().replace('-', '_')}": v for k, v in UPGRADE.items()}
        if offer is not None:
            environ["HTTP_SEC_WEBSOCKET_EXTENSIONS"] = offer
        self.deflate = negotiate_compression(environ, True)
        self.ws = simple_websocket.Server({**environ, "werkzeug.socket": self.ours},
                                          **server_options())
        self.transport = Transport(self.ws, self.deflate is not None, 1 << 16)
        head = b""
        while b"\r\n\r\n" not in head:
            head += self.peer.recv(4096)
        assert head.startswith(b"HTTP/1.1 101")
        self.parser = rawws.FrameParser(self.deflate is not None)
        self.frames: list[tuple[int, bytes]] = []
        rest = head.split(b"\r\n\r\n", 1)[1]
        if rest:
            self.frames += self.parser.feed(rest)

    def read(self, count: int) -> list[tuple[int, bytes]]:
        deadline = time.monotonic() + 5
        while len(self.frames) < count and time.monotonic() < deadline:
            data = self.peer.recv(65536)
            if not data:
                break
            self.frames += self.parser.feed(data)
        out, self.frames = self.frames[:count], self.frames[count:]
        return out

    def close(self) -> None:
        self.ours.close()
        self.peer.close()


@pytest.fixture
def accept():
    made: list[Accepted] = []

    def make(offer: str | None = None) -> Accepted:
        made.append(Accepted(offer))
        return made[-1]

    yield make
    for accepted in made:
        accepted.close()


@pytest.mark.parametrize(
    "settings, setup, reason, code",
    [
        pytest.param({}, "full", codes.REASON_SERVER_FULL, codes.ErrorCode.SERVER_FULL,
                     id="full"),
        pytest.param({}, "closing", codes.REASON_SERVER_RESTARTING,
                     codes.ErrorCode.SHUTTING_DOWN, id="closing"),
        pytest.param({"max_connections_per_ip": 1}, "held", codes.REASON_TOO_MANY_CONNECTIONS,
                     codes.ErrorCode.TOO_MANY_CONNECTIONS, id="address"),
    ],
)
def test_a_registration_refused_closes_1013_with_the_shared_reason_and_is_counted(
    make_app, held, accept, settings, setup, reason, code
):
    """The connection passed the checks before the upgrade, then lost its slot: the hub's
    refusal at registration is a 1013 whose reason comes from ``wsserver.codes``."""
    app = make_app(env="development", close_timeout=1.0, **settings)
    service = app.extensions["wsserver"]
    service.ensure_started()
    if setup == "full":
        service.hub.set_capacity(0)
    elif setup == "held":
        held.register(app, REMOTE)
    accepted = accept()
    before = _refusals(code)
    if setup == "closing":
        service.hub.stop_accepting()
    serve_connection(service, accepted.transport, REMOTE, ("news",))
    (op, payload), = accepted.read(1)
    assert op == OP_CLOSE and close_code(payload) == codes.CLOSE_TRY_AGAIN_LATER == 1013
    assert payload[2:].decode() == reason
    assert _refusals(code) == before + 1
    assert service.hub.count() == len(held.registered) and service.hub.members("news") == []
    with pytest.raises(simple_websocket.ConnectionClosed):
        accepted.ws.close()  # released: flask-sock's close afterwards writes nothing
    accepted.peer.settimeout(0.2)
    with pytest.raises(socket.timeout):
        accepted.peer.recv(1)


def test_a_registered_client_is_in_its_rooms_until_its_session_ends(make_app, accept):
    app = make_app(env="development", close_timeout=1.0)
    service = app.extensions["wsserver"]
    service.ensure_started()
    accepted = accept()
    session = threading.Thread(
        target=serve_connection,
        args=(service, accepted.transport, REMOTE, ("a", "b")),
        name="test-session", daemon=True,
    )
    session.start()
    # connect-time rooms are joined silently, before the session reads: once it answers a
    # ping, the client is registered in both
    accepted.peer.sendall(client_frame(OP_TEXT, b'{"type":"ping"}'))
    assert [json.loads(p) for _, p in accepted.read(1)] == [{"type": "pong"}]
    assert service.hub.count() == 1
    (conn,) = service.hub.members("a")
    assert service.hub.members("b") == [conn] and conn.rooms == {"a", "b"}
    assert conn.remote == REMOTE
    accepted.peer.sendall(client_frame(OP_CLOSE, rawws.close_payload(1000)))
    (op, payload), = accepted.read(1)
    assert op == OP_CLOSE and close_code(payload) == 1000
    session.join(5)
    assert not session.is_alive()
    assert service.hub.count() == 0 and service.hub.members("a") == []


def test_the_101_goes_out_only_once_the_client_is_in_the_hub_and_its_rooms(make_app):
    """A client may publish the moment it reads its 101 (a script: connect, then POST). If
    the 101 went out before the connection was in the hub and its rooms, a notification
    answered 200 after the client's 101 could miss it (seen under load: a test that POSTed
    right after connecting waited 10 s for its message). So simple-websocket's 101 is held
    (``transport.defer_upgrade_response``) until ``serve_connection`` has registered the
    client (what is published meanwhile is queued behind the 101:
    ``test_connection.py::test_an_opening_connection_queues_until_its_101_is_sent``)."""
    app = make_app(env="development")
    service = app.extensions["wsserver"]
    service.ensure_started()
    ours, peer = socket.socketpair()
    environ = {f"HTTP_{k.upper().replace('-', '_')}": v for k, v in UPGRADE.items()}
    environ["werkzeug.socket"] = ours
    defer_upgrade_response(environ)
    transport = Transport(simple_websocket.Server(environ, **server_options()))
    assert transport.sock is ours and transport.upgrade_response.startswith(b"HTTP/1.1 101")
    peer.setblocking(False)
    with pytest.raises(BlockingIOError):
        peer.recv(1)  # nothing sent yet: without the hold, the 101 would be here already
    peer.setblocking(True)
    peer.settimeout(5)
    serving = threading.Thread(target=serve_connection,
                               args=(service, transport, REMOTE, ("news",)), daemon=True)
    serving.start()
    head = b""
    while b"\r\n\r\n" not in head:
        head += peer.recv(4096)
    # the moment the client can know it is connected, it is in its room
    assert service.hub.audience(("news",), None) == 1
    assert head.startswith(b"HTTP/1.1 101")
    service.publish(Notification("after", "", None, rooms=("news",)))
    parser = rawws.FrameParser()
    frames = parser.feed(head.split(b"\r\n\r\n", 1)[1])
    deadline = time.monotonic() + 5
    while len(frames) < 1 and time.monotonic() < deadline:
        frames += parser.feed(peer.recv(65536))
    assert [json.loads(p)["event"] for op, p in frames if op == OP_TEXT][-1:] == ["after"]
    peer.close()
    serving.join(5)
    assert not serving.is_alive()


class _Marker:
    """Something only the request's environ refers to (a dict takes no weak reference)."""


def test_under_wsserver_worker_the_session_runs_after_the_request_let_go_of_it(make_app):
    """With ``RUN_AFTER_REQUEST`` in the environ (wsserver's worker puts it there), the route
    hands over the session instead of running it: the request returns first, and with it
    go gunicorn's parsed request, the environ, Flask's contexts and simple-websocket's
    ``Server`` (~7 KB of every idle connection, docs/performance.md). Nothing the session
    keeps may still reach the environ; the session then serves the client as before."""
    app = make_app(env="development")
    service = app.extensions["wsserver"]
    service.ensure_started()
    ours, peer = socket.socketpair()
    peer.settimeout(5)
    handed: list = []
    marker = _Marker()
    environ_gone = weakref.ref(marker)
    answer = app.test_client().get(
        "/ws?rooms=news", headers=UPGRADE,
        environ_base={"REMOTE_ADDR": REMOTE, "werkzeug.socket": ours,
                      RUN_AFTER_REQUEST: handed.append, "test.marker": marker},
    )
    del answer, marker  # the test client's response keeps its request's environ
    gc.collect()
    assert len(handed) == 1, "the route ran the session itself"
    assert environ_gone() is None, [type(r).__name__ for r in gc.get_referrers(environ_gone())]
    peer.setblocking(False)
    with pytest.raises(BlockingIOError):
        peer.recv(1)  # the 101 is still held: the client is not registered yet
    peer.setblocking(True)
    serving = threading.Thread(target=handed.pop(), daemon=True)
    serving.start()
    head = b""
    while b"\r\n\r\n" not in head:
        head += peer.recv(4096)
    assert head.startswith(b"HTTP/1.1 101")
    assert service.hub.audience(("news",), None) == 1
    service.publish(Notification("after", "", None, rooms=("news",)))
    parser = rawws.FrameParser()
    frames = parser.feed(head.split(b"\r\n\r\n", 1)[1])
    deadline = time.monotonic() + 5
    while not any(op == OP_TEXT for op, _ in frames) and time.monotonic() < deadline:
        frames += parser.feed(peer.recv(65536))
    assert [json.loads(p)["event"] for op, p in frames if op == OP_TEXT] == ["after"]
    peer.sendall(client_frame(OP_CLOSE, (1000).to_bytes(2, "big")))
    serving.join(5)
    assert not serving.is_alive()
    assert service.hub.audience(("news",), None) == 0
    peer.close()
    ours.close()


def test_a_client_that_negotiated_deflate_gets_compressed_notifications_and_sends_them(
    make_app, accept
):
    """``serve_connection`` with the window the hook negotiated: the connection is marked
    (``conn.deflate``), a 4 KB notification reaches it compressed and a plain client plain,
    and its own compressed commands are inflated and answered."""
    app = make_app(env="development", close_timeout=1.0)
    service = app.extensions["wsserver"]
    service.ensure_started()
    clients = [accept("permessage-deflate; client_max_window_bits"), accept()]
    sessions = []
    for accepted in clients:
        bits = None if accepted.deflate is None else accepted.deflate.window_bits
        thread = threading.Thread(target=serve_connection, daemon=True,
                                  args=(service, accepted.transport, REMOTE, ("r",), None, None,
                                        bits))
        thread.start()
        sessions.append(thread)
    compressed = client_frame(OP_TEXT, deflate_payload(b'{"type":"ping"}'), rsv=4)
    clients[0].peer.sendall(compressed)
    assert [json.loads(p) for _, p in clients[0].read(1)] == [{"type": "pong"}]
    clients[1].peer.sendall(client_frame(OP_TEXT, b'{"type":"ping"}'))
    assert [json.loads(p) for _, p in clients[1].read(1)] == [{"type": "pong"}]
    assert sorted(c.deflate or 0 for c in service.hub.members("r")) == [0, 15]
    service.publish(Notification("big", "", {"pad": "x" * 4000}, rooms=("r",)))
    got = [json.loads(accepted.read(1)[0][1]) for accepted in clients]
    assert got[0] == got[1] and got[0]["data"] == {"pad": "x" * 4000}
    assert [accepted.parser.compressed for accepted in clients] == [1, 0]
    for accepted, thread in zip(clients, sessions):
        accepted.peer.sendall(client_frame(OP_CLOSE, rawws.close_payload(1000)))
        accepted.read(1)
        accepted.peer.shutdown(socket.SHUT_WR)
        thread.join(5)
        assert not thread.is_alive()
