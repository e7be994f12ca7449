"""The subprotocol offer end to end under gunicorn, with real clients: the server speaks
``wsserver.v1`` and selects it when offered; a token travels in the offer as
``wsserver.token.<jwt>``, checked as ``?token=`` is and never echoed or logged; a refresh
takes away the rooms its token no longer grants; ``iss`` / ``aud`` when configured.

Clients: websocket-client (``subprotocols=[...]``), the Python ``Subscriber``, the browser
client ``static/wsserver.js`` under node's own WebSocket (undici, the browsers' rules: it
fails a handshake whose 101 selects none of the offered subprotocols), ``websockets`` (sync
client), and the suite's raw client for what no library sends (50 entries, two tokens).
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
import uuid

import jwt
import pytest
import requests
import websocket
from support import ROOT, RawClient, node_with_websocket, recv_json, serving, wait_for

from wsserver.client import Subscriber

SECRET = "e2e-subprotocol-secret-0123456789abcdef"
API_KEY = "pk-subprotocol-0123456789"
ISSUER, AUDIENCE = "https://idp.example", "wsserver-e2e"
CLIENT_JS = ROOT / "wsserver" / "static" / "wsserver.js"

pytestmark = pytest.mark.timeout(60)


def token(sub: str = "alice", rooms: list | None = None, ttl: float = 120, **claims) -> str:
    body = {"sub": sub, "exp": int(time.time() + ttl), "iss": ISSUER, "aud": AUDIENCE,
            "rooms": rooms or [], "jti": uuid.uuid4().hex}  # each token unique: log searches
    body.update(claims)
    return jwt.encode({k: v for k, v in body.items() if v is not None}, SECRET, "HS256")


def offer(tok: str | None = None) -> list[str]:
    return ["wsserver.v1"] + ([f"wsserver.token.{tok}"] if tok else [])


@pytest.fixture(scope="module")
def secured():
    env = {
        "WSSERVER_ENV": "production",
        "WSSERVER_API_KEYS": API_KEY,
        "WSSERVER_JWT_SECRET": SECRET,
        "WSSERVER_JWT_ISSUER": ISSUER,
        "WSSERVER_JWT_AUDIENCE": AUDIENCE,
        "WSSERVER_LOG_LEVEL": "debug",  # the token must not be in even the debug lines
    }
    with serving(env=env) as srv:
        yield srv


def publish(server, body: dict) -> None:
    resp = requests.post(server.url + "/notify", json=body, timeout=5,
                         headers={"Authorization": f"Bearer {API_KEY}"})
    assert resp.status_code == 200, resp.text


def refusal(server, subprotocols: list[str], path: str = "/ws") -> tuple[int, dict]:
    with pytest.raises(websocket.WebSocketBadStatusException) as info:
        websocket.create_connection(server.ws_url.replace("/ws", path), timeout=10,
                                    subprotocols=subprotocols)
    return info.value.status_code, json.loads(info.value.resp_body)


def raw_refusal(server, offer_header: str, path: str = "/ws") -> tuple[int, dict]:
    client = RawClient(server, path=path, headers={"Sec-WebSocket-Protocol": offer_header})
    try:
        return client.status, json.loads(client.http_body() or b"{}")
    finally:
        client.close()


# -- 1. subprotocols -------------------------------------------------------------------------


def test_websocket_client_offering_wsserver_v1_gets_it_and_the_token_is_not_echoed(secured):
    tok = token(rooms=["private-a"])
    ws = websocket.create_connection(secured.ws_url + "?rooms=private-a", timeout=10,
                                     subprotocols=offer(tok))
    try:
        assert ws.subprotocol == "wsserver.v1"
        assert ws.getheaders()["sec-websocket-protocol"] == "wsserver.v1"
        assert tok not in json.dumps(ws.getheaders())
        publish(secured, {"event": "for-a", "room": "private-a"})
        assert recv_json(ws)["event"] == "for-a"
    finally:
        ws.close()
    assert tok not in secured.log()


def test_an_offer_without_wsserver_v1_is_400_naming_what_the_server_speaks(secured):
    for protocols in (["chat"], ["graphql-ws", "wsserver.v2"], [f"wsserver.token.{token()}"]):
        status, body = refusal(secured, protocols)
        assert status == 400 and body["code"] == "unsupported_subprotocol", protocols
        assert body["subprotocols"] == ["wsserver.v1"] and "wsserver.v1" in body["error"]


def test_no_offer_works_as_before(secured):
    ws = websocket.create_connection(f"{secured.ws_url}?token={token()}", timeout=10)
    try:
        assert ws.subprotocol is None
        assert "sec-websocket-protocol" not in ws.getheaders()
        ws.send(json.dumps({"type": "ping"}))
        assert recv_json(ws) == {"type": "pong"}
    finally:
        ws.close()


def test_the_websockets_library_with_its_token_in_the_offer(secured):
    """python-websockets (a test dependency: this test never skips) offers the token as the
    second entry; the 101 selects only ``wsserver.v1``."""
    from websockets.sync.client import connect

    tok = token("gina", rooms=["private-g"])
    with connect(secured.ws_url + "?rooms=private-g", subprotocols=offer(tok),
                 open_timeout=10, close_timeout=10) as ws:
        assert ws.subprotocol == "wsserver.v1"
        assert ws.response.headers["Sec-WebSocket-Protocol"] == "wsserver.v1"
        ws.send(json.dumps({"type": "ping"}))
        assert json.loads(ws.recv(timeout=10)) == {"type": "pong"}
        publish(secured, {"event": "for-g", "room": "private-g"})
        assert json.loads(ws.recv(timeout=10))["event"] == "for-g"
    assert ws.protocol.close_rcvd is not None and ws.protocol.close_rcvd.code == 1000
    assert tok not in secured.log()


# -- 2. tokens out of URLs: refusals and hostile offers -----------------------------------------


@pytest.mark.parametrize("make, status, code", [
    (lambda: offer(), 401, "missing_token"),
    (lambda: offer("garbage"), 401, "invalid_token"),
    (lambda: offer(token(ttl=-60)), 401, "token_expired"),
    (lambda: offer(token(aud="another-service")), 401, "invalid_token"),
    (lambda: offer(token(iss="https://evil.example")), 401, "invalid_token"),
    (lambda: offer(token(aud=None)), 401, "invalid_token"),
    (lambda: offer(token(exp="9999999999")), 401, "invalid_token"),
    (lambda: ["wsserver.v1", "wsserver.token."], 400, "invalid_subprotocol"),
    (lambda: ["wsserver.v1"] + [f"p{i}" for i in range(49)], 400, "invalid_subprotocol"),
])
def test_a_token_in_the_offer_is_refused_as_a_url_token_would_be(secured, make, status, code):
    protocols = make()
    got_status, body = refusal(secured, protocols)
    assert (got_status, body["code"]) == (status, code), body
    assert not any(p[len("wsserver.token."):] in json.dumps(body)
                   for p in protocols if len(p) > len("wsserver.token."))


def test_what_no_library_sends_is_refused_too(secured):
    two = f"wsserver.v1, wsserver.token.{token()}, wsserver.token.{token('bob')}"
    assert raw_refusal(secured, two)[1]["code"] == "invalid_subprotocol"
    assert raw_refusal(secured, "wsserver.v1, wsserver.token.a b")[1]["code"] == (
        "invalid_subprotocol")
    status, body = raw_refusal(secured, f"wsserver.v1, wsserver.token.{token()}",
                               path=f"/ws?token={token()}")
    assert (status, body["code"]) == (400, "ambiguous_token")


def test_tokens_offered_never_reach_the_log(secured):
    good, expired = token("carol"), token("carol", ttl=-60)
    ws = websocket.create_connection(secured.ws_url, timeout=10, subprotocols=offer(good))
    ws.close()
    refusal(secured, offer(expired))
    refusal(secured, ["chat", f"wsserver.token.{good}"])
    log = secured.log()
    assert "token_expired" in log, "the refusal is logged"
    for secret in (good, expired, good.split(".")[2], SECRET):
        assert secret not in log


def test_the_python_subscriber_sends_its_token_in_the_offer(secured):
    tok = token("dave", rooms=["private-d"])
    seen: list[dict] = []
    with Subscriber(secured.ws_url, rooms=["private-d"], token=tok, on_message=seen.append) as sub:
        assert sub.wait_ready(10)
        publish(secured, {"event": "for-d", "room": "private-d"})
        wait_for(lambda: seen, timeout=10, message="the notification")
    assert seen[0]["event"] == "for-d" and sub.error is None
    assert tok not in secured.log()


_JS_CLIENT = r"""
const WsserverClient = require(process.argv[1]);
const [url, token] = [process.argv[2], process.argv[3]];
const c = new WsserverClient(url, {rooms: ["private-js"], token: token, backoffInitial: 50});
const out = {replies: [], messages: [], protocol: null};
const done = () => { c.close(); console.log(JSON.stringify(out)); process.exit(0); };
c.on("open", () => { out.protocol = c._ws.protocol; });
c.on("reply", (r) => { out.replies.push(r); if (r.type === "subscribed") console.log("READY"); });
c.on("message", (n) => { out.messages.push(n.event); done(); });
c.on("state", (s) => { if (s === "closed") done(); });
setTimeout(done, 15000);
"""


def test_the_browser_client_under_node_websocket_connects_with_its_token_in_the_offer(secured):
    """undici's WebSocket, as a browser's: ``new WebSocket(url, ["wsserver.v1",
    "wsserver.token.<jwt>"])``; before wsserver.v1 the 101 selected nothing and it aborted."""
    cmd = node_with_websocket()
    tok = token("erin", rooms=["private-js"])
    proc = subprocess.Popen([*cmd, "-e", _JS_CLIENT, str(CLIENT_JS), secured.ws_url, tok],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready = threading.Event()

        def watch() -> None:
            assert proc.stdout is not None
            if proc.stdout.readline().strip() == "READY":
                ready.set()

        threading.Thread(target=watch, daemon=True).start()
        assert ready.wait(15), "the JS client never got its subscribed reply"
        publish(secured, {"event": "for-js", "room": "private-js"})
        stdout, stderr = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    out = json.loads(stdout.strip().splitlines()[-1])
    assert out["protocol"] == "wsserver.v1", stderr
    assert out["replies"][0] == {"type": "subscribed", "room": "private-js"}
    assert out["messages"] == ["for-js"]
    assert tok not in secured.log()


# -- 3. a refresh takes rooms away ---------------------------------------------------------------


def test_a_refresh_whose_token_no_longer_grants_a_room_leaves_it_at_once(secured):
    ws = websocket.create_connection(secured.ws_url + "?rooms=private-a,private-b,lobby",
                                     timeout=10,
                                     subprotocols=offer(token("frank", ["private-a", "private-b"])))
    try:
        ws.send(json.dumps({"type": "refresh", "token": token("frank", ["private-b"])}))
        assert recv_json(ws)["type"] == "refreshed"
        assert recv_json(ws) == {"type": "unsubscribed", "room": "private-a",
                                 "code": "room_forbidden",
                                 "reason": "the refreshed token no longer grants this room"}
        publish(secured, {"event": "leak", "room": "private-a"})
        publish(secured, {"event": "still-b", "room": "private-b"})
        assert recv_json(ws)["event"] == "still-b"  # and not "leak", published before it
        ws.send(json.dumps({"type": "subscribe", "room": "private-a"}))
        assert recv_json(ws)["code"] == "room_forbidden"
    finally:
        ws.close()


# -- 4. JWT settings at start ----------------------------------------------------------------------


def test_without_an_audience_setting_a_token_with_aud_connects():
    with serving(env={"WSSERVER_ENV": "production", "WSSERVER_JWT_SECRET": SECRET}) as server:
        ws = websocket.create_connection(server.ws_url, timeout=10,
                                         subprotocols=offer(token(aud="anyone")))
        assert ws.subprotocol == "wsserver.v1"
        ws.close()
