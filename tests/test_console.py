"""wsserver.console: ``/console`` is on in development, off (a JSON 404) in production unless
``WSSERVER_CONSOLE`` turns it on; its page loads only its own assets under a nonce CSP; the
client library it uses is served as JavaScript in every mode; ``POST /console/check`` answers
what ``GET /ws`` would (the page's explanation of a refused connection), unaudited; the page's
words (``static/console.js``) under node. In-process (Flask's test client); the console in a
real browser is ``e2e/test_browser.py``."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import types

import jwt
import pytest
from support import ROOT

from wsserver import console, metrics
from wsserver.config import SETTINGS

CLIENT_JS = ROOT / "wsserver" / "static" / "wsserver.js"
CONSOLE_JS = ROOT / "wsserver" / "static" / "console.js"
JS_TYPES = ("text/javascript", "application/javascript")
SECRET = "a-console-test-secret-long-enough-for-hs256"
UPGRADE = {
    "Upgrade": "websocket",
    "Connection": "Upgrade",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
    "Sec-WebSocket-Version": "13",
}


def _token(sub: str = "alice", ttl: float = 600, secret: str = SECRET) -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time() + ttl)}, secret, algorithm="HS256")


def _refusals(code: str) -> float:
    return metrics.REFUSALS.labels(code)._value.get()


@pytest.mark.parametrize("env", ["development", "production"])
def test_client_js_is_served_as_javascript(make_app, env):
    """The client is served in every mode: production pages load it from the server too."""
    client = make_app(env=env).test_client()
    resp = client.get("/static/wsserver.js")
    assert resp.status_code == 200
    assert resp.mimetype in JS_TYPES
    assert b"WsserverClient" in resp.data
    assert resp.data == CLIENT_JS.read_bytes()
    missing = client.get("/static/nope.js")
    assert missing.status_code == 404 and missing.is_json


def test_console_is_on_in_development(client):
    resp = client.get("/console")
    assert resp.status_code == 200
    assert resp.mimetype == "text/html"
    page = resp.get_data(as_text=True)
    assert '<script src="/static/wsserver.js">' in page
    assert '<script src="/static/console.js">' in page  # loaded from 'self', as the CSP allows
    # the fields: a token for the WebSocket and a key for publishing, both password fields
    assert 'id="token-input" name="token" type="password"' in page
    assert 'id="api-key" name="api-key" type="password"' in page
    csp = resp.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "'unsafe-inline'" not in csp
    nonce = csp.split("'nonce-", 1)[1].split("'", 1)[0]
    assert f'<script nonce="{nonce}">' in page  # the page's own script may run
    assert "http://" not in page.replace("http://www.w3.org", "")  # no external asset


def test_console_is_off_in_production(make_app):
    resp = make_app(env="production").test_client().get("/console")
    assert resp.status_code == 404
    assert resp.get_json()["code"] == "not_found"


def test_console_switch():
    """Development always; production only when the ``console`` setting is on (read with
    getattr, so settings without it mean off)."""
    assert console.enabled(types.SimpleNamespace(env="development"))
    assert not console.enabled(types.SimpleNamespace(env="production"))
    assert not console.enabled(types.SimpleNamespace(env="production", console=False))
    assert console.enabled(types.SimpleNamespace(env="production", console=True))


def test_console_in_production_when_enabled(make_app):
    if "console" not in {s.name for s in SETTINGS}:
        pytest.skip("the WSSERVER_CONSOLE setting is not in config.SETTINGS yet")
    app = make_app(env="production", console=True)
    assert app.test_client().get("/console").status_code == 200


def test_console_init_app_is_idempotent(app):
    console.init_app(app)  # a second call (create_app made the first) changes nothing
    assert app.test_client().get("/console").status_code == 200


# -- POST /console/check: what GET /ws would answer ----------------------------------------------

# (settings, headers, status, code): each refusal a browser cannot see on its WebSocket
CHECKS = [
    pytest.param({"jwt_secret": SECRET}, {}, 401, "missing_token", id="401-missing"),
    pytest.param({"jwt_secret": SECRET}, {"Authorization": "Bearer not.a.jwt"}, 401,
                 "invalid_token", id="401-malformed"),
    pytest.param({"jwt_secret": SECRET},
                 {"Authorization": "Bearer " + _token(secret="another-secret-long-enough-0123456")},
                 401, "invalid_token", id="401-forged"),
    pytest.param({"jwt_secret": SECRET}, {"Authorization": "Bearer " + _token(ttl=-60)}, 401,
                 "token_expired", id="401-expired"),
    pytest.param({"allowed_origins": ("https://app.example",)},
                 {"Origin": "https://evil.example"}, 403, "origin_forbidden", id="403-origin"),
    pytest.param({}, {"Origin": "https://evil.example/path"}, 403, "invalid_origin",
                 id="403-invalid-origin"),
    pytest.param({}, "full", 503, "server_full", id="503-full"),
]


@pytest.mark.parametrize("settings, headers, status, code", CHECKS)
def test_check_answers_what_ws_answers_and_is_not_a_refusal(make_app, settings, headers, status,
                                                            code):
    """The check runs /ws's own checks: the same status, body and headers (WWW-Authenticate,
    Retry-After); but nothing was refused, so no audit line and no refusal counted."""
    app = make_app(env="production", console=True, **settings)
    service = app.extensions["wsserver"]
    service.ensure_started()
    if headers == "full":
        service.hub.set_capacity(0)
        headers = {}
    client = app.test_client()
    before = _refusals(code)
    checked = client.post("/console/check", headers=headers)
    assert _refusals(code) == before, "the check is not audited as a refusal"
    refused = client.get("/ws", headers={**UPGRADE, **headers})
    assert _refusals(code) == before + 1  # /ws's own refusal is
    assert refused.status_code == status, refused.data
    assert checked.status_code == status, checked.data
    assert checked.get_json() == refused.get_json()
    assert checked.get_json()["code"] == code
    for name in ("WWW-Authenticate", "Retry-After"):
        assert checked.headers.get(name) == refused.headers.get(name), name


def test_check_accepts_a_good_token_and_says_whose(make_app):
    app = make_app(env="production", console=True, jwt_secret=SECRET,
                   allowed_origins=("http://localhost",))
    client = app.test_client()
    token = _token("alice")
    resp = client.post("/console/check", headers={"Authorization": "Bearer " + token,
                                                  "Origin": "http://localhost"})
    assert resp.status_code == 200, resp.data
    body = resp.get_json()
    assert body["accepted"] is True and body["user"] == "alice"
    assert body["exp"] == jwt.decode(token, SECRET, algorithms=["HS256"])["exp"]
    assert token not in resp.get_data(as_text=True)  # the token is not echoed
    assert resp.headers["Cache-Control"] == "no-store"
    assert app.extensions["wsserver"].hub.count() == 0  # nothing was registered


def test_check_without_tokens_accepts_anonymous(client):
    resp = client.post("/console/check")
    assert resp.status_code == 200 and resp.get_json() == {"accepted": True, "user": None}


def test_check_reads_the_token_as_ws_does(make_app):
    """A token as ``?token=`` and as ``Authorization`` (the page sends only the header): /ws's
    old rule, ``?token=`` wins, holds for the check too, so garbage in the query is refused
    however good the header is, exactly as /ws refuses it."""
    app = make_app(env="production", console=True, jwt_secret=SECRET)
    client = app.test_client()
    headers = {"Authorization": "Bearer " + _token()}
    checked = client.post("/console/check?token=garbage", headers=headers)
    refused = client.get("/ws?token=garbage", headers={**UPGRADE, **headers})
    assert checked.status_code == refused.status_code == 401
    assert checked.get_json() == refused.get_json()
    assert client.post("/console/check?token=" + _token(), headers={"Authorization": "Bearer x"}
                       ).get_json()["user"] == "alice"


def test_check_is_post_only_and_off_with_the_console(make_app, client):
    assert client.get("/console/check").status_code == 405
    off = make_app(env="production").test_client().post("/console/check")
    assert off.status_code == 404 and off.get_json()["code"] == "not_found"


# -- the page's words under node (static/console.js) ---------------------------------------------

_WORDS_SCRIPT = r"""
const C = require(process.argv[1]);
const out = {
  missing: C.explainRefusal(401, {code: "missing_token", error: "a token is required"}),
  expired: C.explainRefusal(401, {code: "token_expired", error: "the token has expired"}),
  invalid: C.explainRefusal(401, {code: "invalid_token"}),
  origin: C.explainRefusal(403, {code: "origin_forbidden"}, "https://ws.example.com"),
  full: C.explainRefusal(503, {code: "server_full", error: "no room"}),
  share: C.explainRefusal(429, {code: "too_many_connections"}),
  unknown: C.explainRefusal(400, {code: "something_new", error: "new words"}),
  nobody: C.explainRefusal(502, null),
  hostile: C.explainRefusal(401, {code: "__proto__", error: {toString: null}}),
  close4001: C.explainClose(4001, "token expired", true),
  close1013: C.explainClose(1013, "server full", true),
  close1008: C.explainClose(1008, "too many invalid commands", true),
  close1006open: C.explainClose(1006, "", true),
  close1006refused: C.explainClose(1006, "", false),
  close1000: C.explainClose(1000, "", true),
  room: C.audience({room: "orders", id: "1"}),
  user: C.audience({room: null, user: "alice", id: "2"}),
  all: C.audience({room: null, id: "3"}),
  health: C.healthFigures({clients: 7, rooms: 2, queue: 0, cluster: {workers: 3}}),
  local: C.healthFigures({clients: 7, rooms: {a: 1, b: 2}, worker: {clients: 2, rooms: 1}}),
  junk: C.healthFigures("not an object"),
};
console.log(JSON.stringify(out));
"""


def _node() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the JavaScript checks need it")
    return node


def test_console_js_words_under_node():
    result = subprocess.run([_node(), "-e", _WORDS_SCRIPT, str(CONSOLE_JS)], check=False,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    w = json.loads(result.stdout)
    assert w["missing"]["text"].startswith("token missing") and not w["missing"]["retry"]
    assert w["missing"]["text"].endswith("(401 missing_token)")
    assert "a token is required" in w["missing"]["text"]  # the server's own words too
    assert w["expired"]["text"].startswith("token expired") and "(401 token_expired)" in \
        w["expired"]["text"]
    assert w["invalid"]["text"].startswith("token invalid")
    assert w["origin"]["text"].startswith(
        "origin not allowed: add https://ws.example.com to WSSERVER_ALLOWED_ORIGINS")
    assert "(403 origin_forbidden)" in w["origin"]["text"] and not w["origin"]["retry"]
    assert w["full"]["text"].startswith("server full") and w["full"]["retry"]
    assert "(503 server_full)" in w["full"]["text"]
    assert w["share"]["retry"] and "(429 too_many_connections)" in w["share"]["text"]
    assert w["unknown"]["text"] == "refused: new words (400 something_new)"
    assert w["nobody"]["retry"] and w["nobody"]["text"].endswith("(502)")
    assert w["hostile"]["text"].endswith("(401 __proto__)")  # no prototype lookup, no crash
    assert w["close4001"].startswith("token expired while connected")
    assert w["close1013"].endswith("(1013 server full)")
    assert w["close1008"].startswith("closed for invalid commands")
    assert w["close1006open"].startswith("connection lost")
    assert w["close1006refused"] is None and w["close1000"] is None  # the check explains
    assert w["room"] == {"kind": "room", "text": "orders"}
    assert w["user"] == {"kind": "user", "text": "@alice"}  # not the "*" of everybody
    assert w["all"] == {"kind": "all", "text": "*"}
    assert w["health"] == {"clients": 7, "rooms": 2, "queue": 0, "workers": 3, "worker": None}
    assert w["local"]["rooms"] == 2 and w["local"]["worker"] == {"clients": 2, "rooms": 1}
    assert w["junk"] == {"clients": None, "rooms": None, "queue": None, "workers": None,
                         "worker": None}


_PRESENCE_WORDS = r"""
const C = require(process.argv[1]);
console.log(JSON.stringify({
  both: C.membersText({users: ["alice", "bob"], anonymous: 2}),
  users: C.membersText({users: ["alice"], anonymous: 0}),
  anonymous: C.membersText({users: [], anonymous: 3}),
  nobody: C.membersText({users: [], anonymous: 0}),
  junk: C.membersText(null),
  hostile: C.membersText({users: [{toString: null}], anonymous: "7"}),
  joined: C.presenceText({type: "presence", room: "presence-x", action: "join", user: "alice"}),
  left: C.presenceText({type: "presence", room: "presence-x", action: "leave", user: null}),
}));
"""


def test_console_js_says_who_is_in_a_presence_room():
    result = subprocess.run([_node(), "-e", _PRESENCE_WORDS, str(CONSOLE_JS)], check=False,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "both": "alice, bob + 2 anonymous", "users": "alice", "anonymous": "3 anonymous",
        "nobody": "nobody", "junk": "nobody", "hostile": '{"toString":null}',
        "joined": "alice joined",
        "left": "anonymous left"}
