"""The WebSocket opening handshake, checked in the ``/ws`` hook before simple-websocket answers
it: malformed upgrades get 400 / 403 / 426 with the JSON error body and one audit line, never
a 500 with a traceback. In-process (Flask test client); the same cases against a real gunicorn
are in tests/test_security.py."""

from __future__ import annotations

import json
import logging
import socket

import pytest
import simple_websocket
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from werkzeug.test import EnvironBuilder, run_wsgi_app
from werkzeug.wrappers import Response

from wsserver import audit, codes, create_app
from wsserver.exceptions import HandshakeRefused
from wsserver.handshake import (
    DeflateOffer,
    negotiate_compression,
    negotiate_subprotocol,
    parse_extensions,
)
from wsserver.transport import server_options

KEY = "dGhlIHNhbXBsZSBub25jZQ=="
UPGRADE = {
    "Host": "127.0.0.1:8080",
    "Upgrade": "websocket",
    "Connection": "Upgrade",
    "Sec-WebSocket-Key": KEY,
    "Sec-WebSocket-Version": "13",
}


@pytest.fixture(scope="module")
def app():
    app = create_app({"env": "production"})
    yield app
    app.extensions["wsserver"].shutdown()


@pytest.fixture(autouse=True)
def fresh_log_limiter(monkeypatch):
    """A full token bucket for each test: earlier floods must not hide this test's line."""
    monkeypatch.setattr(audit, "_LIMITER", audit.LogLimiter())


def upgrade(app, headers: dict, drop: tuple[str, ...] = (), path: str = "/ws"):
    """GET ``path`` with exactly ``headers`` (minus ``drop``, Host included), through the
    whole app. The request carries one end of a socketpair whose other end is closed: an
    upgrade the hook lets through reaches simple-websocket and the session, whose 101 goes
    into a broken pipe; the session ends at once, and the route returns flask-sock's empty
    200 (what the werkzeug server would be given, instead of a refusal)."""
    builder = EnvironBuilder(path=path, headers={k: v for k, v in headers.items() if k != "Host"})
    environ = builder.get_environ()
    environ.pop("HTTP_HOST", None)
    if "Host" in headers and "Host" not in drop:
        environ["HTTP_HOST"] = headers["Host"]
    for name in drop:
        environ.pop("HTTP_" + name.upper().replace("-", "_"), None)
    ours, peer = socket.socketpair()
    peer.close()
    environ["werkzeug.socket"] = ours
    try:
        # the WSGI call itself: the test client would parse the URL again afterwards (for its
        # cookies), which fails on some of these Host values on the client side
        body, status, headers = run_wsgi_app(app, environ, buffered=True)
        return Response(b"".join(body), status, headers)
    finally:
        ours.close()


MALFORMED = [
    pytest.param({**UPGRADE, "Sec-WebSocket-Version": "8"}, (), 426,
                 "unsupported_websocket_version", id="version-8"),
    pytest.param({**UPGRADE, "Sec-WebSocket-Version": "13, 8"}, (), 426,
                 "unsupported_websocket_version", id="version-list"),
    pytest.param(UPGRADE, ("Sec-WebSocket-Version",), 400, "invalid_handshake", id="no-version"),
    pytest.param(UPGRADE, ("Sec-WebSocket-Key",), 400, "invalid_websocket_key", id="no-key"),
    pytest.param({**UPGRADE, "Sec-WebSocket-Key": "short"}, (), 400, "invalid_websocket_key",
                 id="key-not-16-bytes"),
    pytest.param({**UPGRADE, "Sec-WebSocket-Key": "!!!!!!!!!!!!!!!!!!!!!!!="}, (), 400,
                 "invalid_websocket_key", id="key-not-base64"),
    pytest.param(UPGRADE, ("Host",), 400, "invalid_host", id="no-host"),
    pytest.param({**UPGRADE, "Host": "[::1"}, (), 400, "invalid_host", id="host-bad-ipv6"),
    pytest.param({**UPGRADE, "Host": "127.0.0.1:99999"}, (), 400, "invalid_host",
                 id="host-bad-port"),
    pytest.param({**UPGRADE, "Connection": "Upgrade, \xe9"}, (), 400, "invalid_handshake",
                 id="connection-not-ascii"),
    pytest.param({**UPGRADE, "Host": "xn--a"}, (), 400, "invalid_host", id="host-bad-idna"),
    pytest.param({**UPGRADE, "Origin": "http://127.0.0.1:99999"}, (), 403, "invalid_origin",
                 id="origin-bad-port"),
    pytest.param({**UPGRADE, "Origin": "http://[::1"}, (), 403, "invalid_origin",
                 id="origin-bad-ipv6"),
    pytest.param({**UPGRADE, "Origin": "not an origin"}, (), 403, "invalid_origin",
                 id="origin-garbage"),
]


@pytest.mark.parametrize("headers, drop, status, code", MALFORMED)
def test_malformed_upgrades_get_a_json_refusal_and_one_log_line(
    app, caplog, headers, drop, status, code
):
    app.extensions["wsserver"].ensure_started()  # its start-up lines are not this request's
    with caplog.at_level(logging.DEBUG):
        caplog.clear()
        response = upgrade(app, headers, drop)
    assert response.status_code == status, response.data
    assert response.is_json
    body = response.get_json()
    assert body["code"] == code and isinstance(body["error"], str) and body["error"]
    if status == 426:
        assert response.headers["Sec-WebSocket-Version"] == "13"
    lines = [r for r in caplog.records if r.levelno >= logging.INFO]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert lines[0].name == "wsserver.audit" and code in lines[0].getMessage()
    assert not any(r.exc_info for r in caplog.records), "no traceback"


def test_a_well_formed_upgrade_passes_the_hook(app):
    """The reference: the same request, well formed, is handed to simple-websocket and the
    session (which here find the peer gone): the checks do not refuse a good handshake."""
    for headers in (UPGRADE, {**UPGRADE, "Origin": "http://127.0.0.1:8080"},
                    {**UPGRADE, "Host": "[::1]:8080", "Origin": "http://[::1]:8080"},
                    {**UPGRADE, "Connection": "keep-alive, Upgrade", "Upgrade": "WebSocket",
                     "Sec-WebSocket-Version": " 13 "}):
        response = upgrade(app, headers)
        assert (response.status_code, response.data) == (200, b""), response.data


# -- the subprotocol offer ---------------------------------------------------------------------

JWT_LIKE = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhIn0.c2lnbmF0dXJlLV8"  # base64url + dots


@pytest.mark.parametrize("offer, token, kept", [
    ("wsserver.v1", None, "wsserver.v1"),
    (f"wsserver.v1, wsserver.token.{JWT_LIKE}", JWT_LIKE, "wsserver.v1"),
    (f"wsserver.token.{JWT_LIKE},wsserver.v1", JWT_LIKE, "wsserver.v1"),  # any order
    (f"chat, wsserver.v1, wsserver.token.{JWT_LIKE}", JWT_LIKE, "chat, wsserver.v1"),
    ("wsserver.v1,, ,", None, "wsserver.v1"),  # empty list elements (RFC 7230 7)
    ("", None, None),  # an empty header is no offer
    (" , ", None, None),
])
def test_an_offer_naming_wsserver_v1_passes_and_loses_its_token_entry(offer, token, kept):
    environ = {"HTTP_SEC_WEBSOCKET_PROTOCOL": offer}
    assert negotiate_subprotocol(environ) == token
    assert environ.get("HTTP_SEC_WEBSOCKET_PROTOCOL") == kept
    assert negotiate_subprotocol({}) is None  # no offer at all: as before


@pytest.mark.parametrize("offer, code", [
    ("chat", "unsupported_subprotocol"),
    ("wsserver.v2, graphql-ws", "unsupported_subprotocol"),
    ("WSSERVER.V1", "unsupported_subprotocol"),  # subprotocol names are case-sensitive
    (f"wsserver.token.{JWT_LIKE}", "unsupported_subprotocol"),  # a token alone is no protocol
    (", ".join(["wsserver.v1"] + [f"p{i}" for i in range(49)]), "invalid_subprotocol"),  # 50
    (",".join(["wsserver.v1"] * 9), "invalid_subprotocol"),  # one over MAX_SUBPROTOCOLS
    ("wsserver.v1, wsserver.token.", "invalid_subprotocol"),  # the prefix with no token
    ("wsserver.v1, wsserver.token.a, wsserver.token.b", "invalid_subprotocol"),  # two tokens
    ("wsserver.v1, wsserver.token.a b", "invalid_subprotocol"),  # not a token: a space
    ('wsserver.v1, "quoted"', "invalid_subprotocol"),
    ("wsserver.v1; q=1", "invalid_subprotocol"),
    ("wsserver.v1, wsserver.token.\xe9", "invalid_subprotocol"),
    ("wsserver.v1, wsserver.token.a/b=", "invalid_subprotocol"),  # base64, not base64url
])
def test_an_offer_the_server_cannot_select_is_refused_with_400(offer, code):
    environ = {"HTTP_SEC_WEBSOCKET_PROTOCOL": offer}
    with pytest.raises(HandshakeRefused) as info:
        negotiate_subprotocol(environ)
    assert (info.value.status, info.value.code) == (400, code)
    assert JWT_LIKE not in info.value.reason and "wsserver.token.a" not in info.value.reason
    assert (info.value.fields == {"subprotocols": ["wsserver.v1"]}) == (
        code == "unsupported_subprotocol"
    )


def test_max_subprotocols_entries_pass():
    offer = ", ".join(["wsserver.v1", "wsserver.token.t"] + [f"p{i}" for i in range(6)])
    assert negotiate_subprotocol({"HTTP_SEC_WEBSOCKET_PROTOCOL": offer}) == "t"
    assert len(offer.split(",")) == codes.MAX_SUBPROTOCOLS


def test_an_unsupported_offer_is_a_json_400_naming_what_the_server_speaks(app, caplog):
    """Before the origin and token checks (it is the handshake), with the JSON body and one
    audit line; the body's ``subprotocols`` is what the client could offer instead."""
    app.extensions["wsserver"].ensure_started()
    with caplog.at_level(logging.INFO):
        caplog.clear()
        response = upgrade(app, {**UPGRADE, "Sec-WebSocket-Protocol": "chat",
                                 "Origin": "https://evil.example"})
    assert response.status_code == 400
    assert response.get_json() == {
        "code": "unsupported_subprotocol", "subprotocols": ["wsserver.v1"],
        "error": "this server speaks the subprotocol wsserver.v1 only: offer it, or offer none",
    }
    assert "Sec-WebSocket-Protocol" not in response.headers
    (line,) = [r for r in caplog.records if r.levelno >= logging.INFO]
    assert "unsupported_subprotocol" in line.getMessage()


@pytest.mark.parametrize("offer, selected", [
    (None, None),
    ("wsserver.v1", "wsserver.v1"),
    (f"wsserver.v1, wsserver.token.{JWT_LIKE}", "wsserver.v1"),
    (f"chat, wsserver.token.{JWT_LIKE}, wsserver.v1", "wsserver.v1"),
])
def test_the_101_selects_wsserver_v1_and_never_echoes_the_token(offer, selected):
    """What simple-websocket answers, with our options, to the offer the hook leaves it."""
    environ = {f"HTTP_{k.upper().replace('-', '_')}": v for k, v in UPGRADE.items()}
    if offer is not None:
        environ["HTTP_SEC_WEBSOCKET_PROTOCOL"] = offer
    negotiate_subprotocol(environ)
    ours, peer = socket.socketpair()
    try:
        peer.settimeout(5)
        simple_websocket.Server({**environ, "werkzeug.socket": ours}, **server_options())
        head = b""
        while b"\r\n\r\n" not in head:
            head += peer.recv(4096)
    finally:
        ours.close()
        peer.close()
    lines = head.decode().lower().split("\r\n")
    assert lines[0].startswith("http/1.1 101")
    chosen = [line.split(":", 1)[1].strip() for line in lines
              if line.startswith("sec-websocket-protocol:")]
    assert chosen == ([selected] if selected else [])
    assert JWT_LIKE not in head.decode() and "wsserver.token" not in head.decode()


# -- the extension offer: permessage-deflate ---------------------------------------------------

_BOTH = "permessage-deflate; client_no_context_takeover; server_no_context_takeover"


def test_extension_offers_are_parsed_with_parameters_and_quoted_values():
    assert parse_extensions(
        'x-foo; a="b,c"; d, permessage-deflate;client_max_window_bits ,'
        ' permessage-deflate; server_max_window_bits="10", bad name, z; q="unterminated'
    ) == [
        ("x-foo", [("a", "b,c"), ("d", None)]),
        ("permessage-deflate", [("client_max_window_bits", None)]),
        ("permessage-deflate", [("server_max_window_bits", "10")]),
        None,
        None,
    ]


@pytest.mark.parametrize(
    "offer, accepted",
    [
        ("permessage-deflate", DeflateOffer()),
        ("permessage-deflate; client_max_window_bits", DeflateOffer()),
        ("permessage-deflate; client_max_window_bits=10", DeflateOffer()),
        ("permessage-deflate; client_no_context_takeover", DeflateOffer()),
        ("permessage-deflate; server_no_context_takeover", DeflateOffer()),
        ("PerMessage-Deflate; Server_Max_Window_Bits=15", DeflateOffer(15, True)),
        ('permessage-deflate; server_max_window_bits="9"', DeflateOffer(9, True)),
        # the first offer we can honour wins, in the client's order
        ("permessage-deflate; server_max_window_bits=8, permessage-deflate; "
         "server_max_window_bits=12, permessage-deflate", DeflateOffer(12, True)),
        ("x-webkit-deflate-frame, permessage-deflate; foo, permessage-deflate", DeflateOffer()),
    ],
)
def test_a_deflate_offer_we_can_honour_is_accepted_and_left_alone_in_the_environ(
    offer, accepted
):
    environ = {"HTTP_SEC_WEBSOCKET_EXTENSIONS": offer}
    assert negotiate_compression(environ, True) == accepted
    expected = _BOTH + (
        f"; server_max_window_bits={accepted.window_bits}" if accepted.window_named else ""
    )
    assert environ["HTTP_SEC_WEBSOCKET_EXTENSIONS"] == accepted.answer() == expected


@pytest.mark.parametrize(
    "offer",
    [
        pytest.param("permessage-deflate; server_max_window_bits=8", id="window-8-zlib-cannot"),
        pytest.param("permessage-deflate; server_max_window_bits", id="window-without-value"),
        pytest.param("permessage-deflate; server_max_window_bits=16", id="window-16"),
        pytest.param("permessage-deflate; server_max_window_bits=09", id="window-leading-zero"),
        pytest.param("permessage-deflate; client_max_window_bits=7", id="client-window-7"),
        pytest.param("permessage-deflate; server_no_context_takeover=1", id="flag-with-value"),
        pytest.param("permessage-deflate; client_no_context_takeover; client_no_context_takeover",
                     id="repeated"),
        pytest.param("permessage-deflate; x=1", id="unknown-parameter"),
        pytest.param('permessage-deflate; server_max_window_bits="1 0"', id="quoted-not-token"),
        pytest.param("x-webkit-deflate-frame", id="another-extension"),
        pytest.param("", id="empty"),
        pytest.param(",,;", id="punctuation"),
    ],
)
def test_an_offer_we_cannot_honour_is_declined_and_removed_never_refused(offer):
    environ = {"HTTP_SEC_WEBSOCKET_EXTENSIONS": offer, "HTTP_HOST": "h"}
    assert negotiate_compression(environ, True) is None
    assert environ == {"HTTP_HOST": "h"}


def test_with_compression_off_even_a_good_offer_is_removed():
    environ = {"HTTP_SEC_WEBSOCKET_EXTENSIONS": "permessage-deflate"}
    assert negotiate_compression(environ, False) is None
    assert environ == {}
    assert negotiate_compression({}, True) is None


@pytest.mark.parametrize("compression, expected", [
    (True, _BOTH + "; server_max_window_bits=10"),
    (False, None),
])
def test_the_101_accepts_deflate_as_negotiated_and_compression_off_accepts_none(
    compression, expected
):
    """What simple-websocket answers, with our options, to the offer negotiation leaves it:
    exactly the parameters negotiated, or no extension at all."""
    environ = {f"HTTP_{k.upper().replace('-', '_')}": v for k, v in UPGRADE.items()}
    environ["HTTP_SEC_WEBSOCKET_EXTENSIONS"] = (
        "permessage-deflate; server_max_window_bits=10; client_max_window_bits"
    )
    negotiate_compression(environ, compression)
    ours, peer = socket.socketpair()
    try:
        peer.settimeout(5)
        simple_websocket.Server({**environ, "werkzeug.socket": ours}, **server_options())
        head = b""
        while b"\r\n\r\n" not in head:
            head += peer.recv(4096)
    finally:
        ours.close()
        peer.close()
    text = head.decode("latin-1").lower()
    if expected is None:
        assert "sec-websocket-extensions" not in text
    else:
        assert f"sec-websocket-extensions: {expected}\r\n" in text


# -- property: no header value makes the upgrade answer 500 ------------------------------------

_latin1 = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF), max_size=40
)
_values = {
    "Host": st.sampled_from(["127.0.0.1:8080", "localhost", "[::1]:80", "[::1", "a:99999", "",
                             ":", "xn--a", "h\xe9te", "a b"]) | _latin1,
    "Upgrade": st.sampled_from(["websocket", "WebSocket", "h2c", ""]) | _latin1,
    "Connection": st.sampled_from(["Upgrade", "upgrade, keep-alive", "close", "Upgrade, \xe9"])
    | _latin1,
    "Sec-WebSocket-Key": st.sampled_from([KEY, "", "x", "====", KEY + "AAAA"]) | _latin1,
    "Sec-WebSocket-Version": st.sampled_from(["13", "8", "", "13,8", " 13", "١٣"]) | _latin1,
    "Origin": st.sampled_from(["http://127.0.0.1:8080", "null", "http://[::1", "https://x:0",
                               "http://127.0.0.1:99999", "file://", "http://"]) | _latin1,
    "Sec-WebSocket-Extensions": st.sampled_from(
        ["permessage-deflate", "x; y=\xe9", "permessage-deflate; server_max_window_bits=8",
         'permessage-deflate; server_max_window_bits="9"', "permessage-deflate; a=\"", ";;,,",
         "permessage-deflate; client_max_window_bits=99, permessage-deflate"]
    ) | _latin1,
    "Sec-WebSocket-Protocol": st.sampled_from(
        ["chat", "a,b", "", "wsserver.v1", "wsserver.v1, wsserver.token.x.y.z", "wsserver.token.",
         "wsserver.v1, wsserver.token.a, wsserver.token.b", ",".join(["wsserver.v1"] * 50)]
    ) | _latin1,
    "Authorization": st.sampled_from(["Bearer x", "Bearer", ""]) | _latin1,
}
_headers = st.fixed_dictionaries(
    {}, optional={name: st.one_of(st.just(UPGRADE.get(name, "")), s) for name, s in _values.items()}
)


_queries = st.sampled_from(
    ["", "?rooms=a", "?rooms=%ff", "?since=1-1&rooms=a", "?token=x", "?rooms=" + "a," * 200]
)


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(headers=_headers, query=_queries)
def test_no_header_value_makes_the_upgrade_answer_500(app, headers, query):
    response = upgrade(app, headers, path="/ws" + query)
    if response.status_code == 200:  # a valid upgrade: the hook let it through (see upgrade)
        assert response.data == b"", (headers, response.data)
        return
    assert response.status_code in (400, 401, 403, 426, 429, 503), (headers, response.data)
    assert response.is_json
    body = json.loads(response.data)
    assert set(body) - {"subprotocols"} == {"error", "code"}
    assert ("subprotocols" in body) == (body["code"] == "unsupported_subprotocol")
    if response.status_code == 426:
        assert response.headers["Sec-WebSocket-Version"] == "13"
