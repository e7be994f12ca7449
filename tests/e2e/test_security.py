"""Security end to end under gunicorn: every refusal path, answered before the handshake with
a plain HTTP status, and the production defaults."""

from __future__ import annotations

import json
import time

import jwt
import pytest
import requests
import websocket
from support import RawClient, close_code, connect, recv_json, serving, wait_for

SECRET = "a-test-secret-that-is-long-enough-for-hs256"
API_KEY = "pk-test-0123456789"


def token(sub: str = "alice", ttl: float = 60, rooms: list | None = None, key: str = SECRET) -> str:
    claims = {"sub": sub, "exp": int(time.time() + ttl)}
    if rooms is not None:
        claims["rooms"] = rooms
    return jwt.encode(claims, key, algorithm="HS256")


@pytest.fixture(scope="module")
def secured():
    """Production mode with every protection configured."""
    env = {
        "WSSERVER_ENV": "production",
        "WSSERVER_ALLOWED_ORIGINS": "https://app.example.com,https://*.example.org",
        "WSSERVER_API_KEYS": f"old-key-000,{API_KEY}",
        "WSSERVER_JWT_SECRET": SECRET,
        "WSSERVER_MAX_CONNECTIONS_PER_IP": "6",
    }
    with serving(env=env) as srv:
        yield srv


def refused(server, path: str = "/ws", headers: dict | None = None) -> tuple[int, dict, str]:
    client = RawClient(server, path=path, headers=headers)
    try:
        return client.status, json.loads(client.http_body() or b"{}"), client.response_head
    finally:
        client.close()


def publish(server, body, key: str | None = API_KEY) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.post(server.url + "/notify", json=body, headers=headers, timeout=5)


def test_foreign_origin_gets_403_before_the_handshake(secured):
    status, body, _ = refused(secured, f"/ws?token={token()}", {"Origin": "https://evil.example.com"})
    assert status == 403 and body["code"] == "origin_forbidden"
    for origin in ("https://app.example.com", "https://x.example.org", f"http://127.0.0.1:{secured.port}"):
        client = RawClient(secured, path=f"/ws?token={token()}", headers={"Origin": origin})
        assert client.status == 101, origin
        client.close()


@pytest.mark.parametrize("make,code", [
    (lambda: None, "missing_token"),
    (lambda: token(ttl=-10), "token_expired"),
    (lambda: token(key="some-other-secret-some-other-secret"), "invalid_token"),
    (lambda: token()[:-4] + "AAAA", "invalid_token"),
    (lambda: "not.a.jwt", "invalid_token"),
])
def test_bad_tokens_get_401_before_the_handshake(secured, make, code):
    tok = make()
    status, body, head = refused(secured, "/ws" + (f"?token={tok}" if tok else ""))
    assert status == 401 and body["code"] == code
    assert "www-authenticate: bearer" in head.lower()
    if tok:
        assert tok not in json.dumps(body)


def test_token_in_query_or_header_and_room_grants(secured):
    by_header = RawClient(secured, headers={"Authorization": f"Bearer {token('bob')}"})
    assert by_header.status == 101
    by_header.close()
    status, body, _ = refused(secured, f"/ws?token={token()}&rooms=private-ops")
    assert status == 403 and body["code"] == "room_forbidden"
    ws = websocket.create_connection(
        f"{secured.ws_url}?token={token(rooms=['private-team-*'])}&rooms=private-team-1", timeout=10)
    try:
        ws.send(json.dumps({"type": "subscribe", "room": "private-ops"}))
        reply = recv_json(ws)
        assert reply["type"] == "error" and reply["code"] == "room_forbidden"
        ws.send(json.dumps({"type": "subscribe", "room": "private-team-2"}))
        assert recv_json(ws) == {"type": "subscribed", "room": "private-team-2"}
        ws.send(json.dumps({"type": "subscribe", "room": "lobby"}))
        assert recv_json(ws) == {"type": "subscribed", "room": "lobby"}
        assert publish(secured, {"event": "t", "room": "private-team-1"}).status_code == 200
        assert recv_json(ws)["room"] == "private-team-1"
    finally:
        ws.close()


def test_notify_to_a_user_reaches_all_and_only_their_connections(secured):
    alice = [websocket.create_connection(f"{secured.ws_url}?token={token('alice')}", timeout=10) for _ in range(2)]
    bob = websocket.create_connection(f"{secured.ws_url}?token={token('bob')}", timeout=3)
    try:
        wait_for(lambda: secured.health()["clients"] >= 3)
        r = publish(secured, {"event": "dm", "message": "for alice", "user": "alice"})
        assert r.status_code == 200 and r.json()["clients"] == 2
        for ws in alice:
            got = recv_json(ws)
            assert got["user"] == "alice" and got["message"] == "for alice" and got["room"] is None
        assert publish(secured, {"event": "all"}).status_code == 200
        assert recv_json(bob)["event"] == "all", "bob got nothing before the broadcast"
    finally:
        for ws in alice + [bob]:
            ws.close()


def test_publisher_keys(secured):
    for key, code in ((None, "missing_api_key"), ("wrong", "invalid_api_key")):
        r = publish(secured, {"event": "x"}, key=key)
        assert r.status_code == 401 and r.json()["code"] == code
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert publish(secured, {"event": "x"}).status_code == 200
    assert publish(secured, {"event": "x"}, key="old-key-000").status_code == 200, "rotation"
    assert requests.get(secured.url + "/rooms", timeout=5).status_code == 401
    assert requests.get(secured.url + "/", timeout=5).status_code == 200, "health stays open"


def test_cors_for_allowed_origins_only(secured):
    pre = requests.options(secured.url + "/notify", headers={
        "Origin": "https://app.example.com", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"}, timeout=5)
    assert pre.status_code in (200, 204)
    assert pre.headers["Access-Control-Allow-Origin"] == "https://app.example.com"
    assert "authorization" in pre.headers["Access-Control-Allow-Headers"].lower()
    assert "POST" in pre.headers["Access-Control-Allow-Methods"]
    evil = requests.options(secured.url + "/notify", headers={
        "Origin": "https://evil.com", "Access-Control-Request-Method": "POST"}, timeout=5)
    assert "Access-Control-Allow-Origin" not in evil.headers
    r = requests.post(secured.url + "/notify", json={"event": "c"},
                      headers={"Origin": "https://app.example.com", "Authorization": f"Bearer {API_KEY}"}, timeout=5)
    assert r.headers["Access-Control-Allow-Origin"] == "https://app.example.com"


def test_connections_per_address_limit(secured):
    wait_for(lambda: secured.health()["clients"] == 0)
    held = [RawClient(secured, path=f"/ws?token={token()}") for _ in range(6)]
    try:
        assert all(c.status == 101 for c in held)
        # registered once the handshake is answered: wait until all six count
        wait_for(lambda: secured.health()["clients"] == 6, message="six registered")
        status, body, head = refused(secured, f"/ws?token={token()}")
        assert status == 429 and body["code"] == "too_many_connections"
        assert "retry-after" in head.lower()
    finally:
        for c in held:
            c.close()
    wait_for(lambda: secured.health()["clients"] == 0)
    again = RawClient(secured, path=f"/ws?token={token()}")
    assert again.status == 101
    again.close()


def test_secrets_and_tokens_never_reach_the_log(secured):
    tok = token("carol")
    refused(secured, f"/ws?token={tok}x")
    publish(secured, {"event": "x"}, key="leaked-candidate-key")
    log = secured.log()
    assert "security:" in log, "the posture is logged at start"
    for secret in (SECRET, API_KEY, "old-key-000", tok, "leaked-candidate-key"):
        assert secret not in log


def test_production_defaults_without_configuration(make_server):
    server = make_server({"WSSERVER_ENV": "production"})
    assert server.notify({"event": "from loopback"}).status_code == 200
    status, body, _ = refused(server, "/ws", {"Origin": "https://elsewhere.example"})
    assert status == 403
    ws = connect(server)  # websocket-client sends this server's own origin
    try:
        ws.send("free text")
        reply = recv_json(ws)
        if "type" not in reply:  # the notification above: accepted (200) before this client
            assert reply["event"] == "from loopback"  # connected, broadcast as it came in
            reply = recv_json(ws)
        assert reply["type"] == "error" and reply["code"] == "rebroadcast_disabled"
    finally:
        ws.close()
    assert "rebroadcast off" in server.log()


def test_inbound_rate_limit_closes_with_1008(make_server):
    server = make_server({"WSSERVER_ENV": "development", "WSSERVER_RATE_LIMIT": "5"})
    client = RawClient(server)
    try:
        for _ in range(40):  # a burst far over 2 s worth at 5/s
            client.send_text(json.dumps({"type": "ping"}))
        frames = []
        while not frames or frames[-1][0] != 0x8:
            frames.append(client.recv_frame())
        pongs = [p for op, p in frames if op == 0x1]
        assert 5 <= len(pongs) <= 12, len(pongs)
        assert close_code(frames[-1][1]) == 1008 and b"rate limit" in frames[-1][1]
    finally:
        client.close()


def test_token_expiry_closes_with_4001_unless_refreshed(make_server):
    server = make_server({"WSSERVER_ENV": "development", "WSSERVER_JWT_SECRET": SECRET})
    refreshed = websocket.create_connection(f"{server.ws_url}?token={token('dave', ttl=2)}", timeout=10)
    expiring = RawClient(server, path=f"/ws?token={token('erin', ttl=2)}")
    try:
        refreshed.send(json.dumps({"type": "refresh", "token": token("dave", ttl=120)}))
        reply = recv_json(refreshed)
        assert reply["type"] == "refreshed" and reply["exp"] > time.time() + 60
        refreshed.send(json.dumps({"type": "refresh", "token": token("mallory", ttl=120)}))
        assert recv_json(refreshed)["code"] == "user_mismatch"
        started = time.monotonic()
        op, payload = expiring.recv_until(0x8)
        assert close_code(payload) == 4001 and b"token expired" in payload
        assert time.monotonic() - started < 6
        # the refreshed connection outlives the first token
        assert server.notify({"event": "after"}).status_code == 200
        assert recv_json(refreshed)["event"] == "after"
    finally:
        refreshed.close()
        expiring.close()


def test_a_silent_half_sent_request_is_dropped_and_http_still_answers(make_server):
    server = make_server({"WSSERVER_ENV": "development", "WSSERVER_HANDSHAKE_TIMEOUT": "1"})
    import socket

    loris = socket.create_connection(("127.0.0.1", server.port), timeout=15)
    try:
        loris.sendall(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n")  # and never more
        started = time.monotonic()
        assert requests.get(server.url + "/", timeout=5).status_code == 200
        # cut at WSSERVER_HANDSHAKE_TIMEOUT (a total deadline) with 408, then closed
        answer = b""
        while chunk := loris.recv(4096):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        assert time.monotonic() - started < 8
    finally:
        loris.close()
    assert "Traceback" not in server.log()


# -- malformed handshakes: a JSON refusal and at most one log line, never a 500 ----------------


def raw_upgrade(server, lines: list[str], path: str = "/ws") -> tuple[int, str, dict]:
    """Send an upgrade request made of exactly ``lines`` (no Host unless listed) and read the
    whole answer: (status, head, JSON body)."""
    import socket

    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        request = "\r\n".join([f"GET {path} HTTP/1.1", *lines]) + "\r\n\r\n"
        sock.sendall(request.encode("latin-1"))
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, f"closed without an answer: {data!r}"
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:")))
        while len(body) < length:
            chunk = sock.recv(65536)
            assert chunk, "closed in the body"
            body += chunk
    return int(head.split()[1]), head.decode("latin-1"), json.loads(body)


def _handshake(port: int, **override: str | None) -> list[str]:
    headers = {"Host": f"127.0.0.1:{port}", "Upgrade": "websocket", "Connection": "Upgrade",
               "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version": "13"}
    headers.update(override)
    return [f"{k}: {v}" for k, v in headers.items() if v is not None]


@pytest.mark.parametrize("override, status, code", [
    ({"Sec-WebSocket-Version": "8"}, 426, "unsupported_websocket_version"),
    ({"Sec-WebSocket-Version": None}, 400, "invalid_handshake"),
    ({"Sec-WebSocket-Key": None}, 400, "invalid_websocket_key"),
    ({"Sec-WebSocket-Key": "c2hvcnQ="}, 400, "invalid_websocket_key"),
    ({"Host": None}, 400, "invalid_host"),
    ({"Host": "[::1"}, 400, "invalid_host"),
    ({"Host": "xn--a"}, 400, "invalid_host"),
    ({"Connection": "Upgrade, \xe9"}, 400, "invalid_handshake"),
    ({"Origin": "http://127.0.0.1:99999"}, 403, "invalid_origin"),
    ({"Origin": "http://[::1"}, 403, "invalid_origin"),
], ids=lambda v: str(v)[:40])
def test_malformed_handshakes_are_refused_with_json_and_one_log_line(secured, override, status, code):
    before = secured.log().splitlines()
    # with a good token: the handshake is what is wrong
    got, head, body = raw_upgrade(secured, _handshake(secured.port, **override),
                                  f"/ws?token={token()}")
    assert (got, body["code"]) == (status, code), (got, body)
    assert set(body) == {"error", "code"} and body["error"]
    assert "content-type: application/json" in head.lower()
    if status == 426:
        assert "\r\nsec-websocket-version: 13" in head.lower()
    # the audit line is written before the answer: wait for it, then for nothing more
    wait_for(lambda: any(code in line for line in secured.log().splitlines()[len(before):]),
             timeout=5, message="the audit line")
    requests.get(secured.url + "/", timeout=5)  # a later request: anything logged is in by now
    new = secured.log().splitlines()[len(before):]
    assert len(new) == 1, new
    assert "127.0.0.1" in new[0] and code in new[0]


def test_out_of_range_token_claims_are_401_at_connect_and_in_refresh(secured):
    huge = jwt.encode({"sub": "alice", "exp": 10**400}, SECRET, algorithm="HS256")
    status, body, head = refused(secured, f"/ws?token={huge}")
    assert status == 401 and body["code"] == "invalid_token"
    assert "www-authenticate: bearer" in head.lower()
    ws = websocket.create_connection(f"{secured.ws_url}?token={token()}", timeout=10,
                                     origin="https://app.example.com")
    try:
        for bad in (huge, jwt.encode({"sub": "alice", "exp": 1e300}, SECRET, algorithm="HS256"),
                    jwt.encode({"sub": "alice", "exp": time.time() + 60, "nbf": 10**400}, SECRET,
                               algorithm="HS256")):
            ws.send(json.dumps({"type": "refresh", "token": bad}))
            reply = recv_json(ws)
            assert reply["type"] == "error" and reply["code"] == "invalid_token", reply
        ws.send(json.dumps({"type": "ping"}))
        assert recv_json(ws)["type"] == "pong", "the connection lives on"
    finally:
        ws.close()
    assert "Traceback" not in secured.log()


def _refusal_counts(server) -> dict[str, float]:
    import re

    text = requests.get(server.url + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"},
                        timeout=5).text
    return {m.group(1): float(m.group(2)) for m in
            re.finditer(r'^wsserver_refusals_total\{reason="([^"]+)"\} (\S+)$', text, re.M)}


def test_refusals_show_in_metrics_and_the_log_under_gunicorn(secured):
    """The same refusals, counted across gunicorn's multiprocess metrics and logged with the
    client's address and the reason."""
    wait_for(lambda: secured.health()["clients"] == 0)
    before = _refusal_counts(secured)
    log_before = len(secured.log().splitlines())
    refused(secured, f"/ws?token={token()}", {"Origin": "https://evil.example.com"})
    refused(secured, "/ws")
    raw_upgrade(secured, _handshake(secured.port, **{"Sec-WebSocket-Version": "7"}))
    publish(secured, {"event": "x"}, key=None)
    requests.get(secured.url + "/rooms", timeout=5)
    held = [RawClient(secured, path=f"/ws?token={token()}") for _ in range(6)]
    try:
        wait_for(lambda: secured.health()["clients"] == 6, message="six registered")
        refused(secured, f"/ws?token={token()}")
    finally:
        for c in held:
            c.close()
    expected = {"origin_forbidden": 1, "missing_token": 1, "unsupported_websocket_version": 1,
                "missing_api_key": 2, "too_many_connections": 1}
    after = _refusal_counts(secured)
    for reason, n in expected.items():
        assert after.get(reason, 0) == before.get(reason, 0) + n, (reason, before, after)
    lines = secured.log().splitlines()[log_before:]
    for reason in expected:
        assert any(f"refused 127.0.0.1: {reason}" in line for line in lines), (reason, lines)
    assert any("WSSERVER_MAX_CONNECTIONS_PER_IP=6" in line for line in lines)
