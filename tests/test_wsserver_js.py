"""The JavaScript client (wsserver/static/wsserver.js) under node: it parses, and its
reconnect rules hold against a fake WebSocket (no server: the rules are the client's own)."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from support import ROOT

CLIENT_JS = ROOT / "wsserver" / "static" / "wsserver.js"


def _node() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the JavaScript checks need it")
    return node


def test_client_js_parses():
    result = subprocess.run([_node(), "--check", str(CLIENT_JS)], check=False, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, result.stderr


# The client's rules, run under node with a fake WebSocket: rooms joined on open, the last id
# of a room sent as "since" after a reconnect, reconnect after 1001/1006/1008 "slow consumer",
# never after the close codes that mean "fix the client".
_NODE_SCRIPT = r"""
const sockets = [];
class FakeWebSocket {
  constructor(url, protocols) { this.url = url; this.protocols = protocols; this.readyState = 0;
                                this.sent = []; sockets.push(this);
                     setTimeout(() => { if (this.readyState === 0) { this.readyState = 1;
                                                                     this.onopen(); } }, 1); }
  send(data) { this.sent.push(JSON.parse(data)); }
  close(code, reason) { this.serverClose(code || 1000, reason || ""); }
  serverClose(code, reason) { this.readyState = 3; this.onclose({code, reason}); }
  deliver(obj) { this.onmessage({data: JSON.stringify(obj)}); }
}
global.WebSocket = FakeWebSocket;
const WsserverClient = require(process.argv[1]);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
async function until(predicate, ms) {  // bounded: gives up after ms
  for (const end = Date.now() + ms; !predicate() && Date.now() < end;) await sleep(5);
}
const out = {};

async function scenario(code, reason) {
  sockets.length = 0;
  const c = new WsserverClient("ws://x/ws", {rooms: ["a"], token: "h.p.s-_", backoffInitial: 5,
                                             backoffMax: 20});
  const states = [], messages = [], replies = [];
  c.on("state", (s) => states.push(s)).on("message", (m) => messages.push(m.id))
   .on("reply", (r) => replies.push(r.type));
  await until(() => sockets.length && sockets[0].sent.length, 2000);
  const first = sockets[0];
  first.deliver({type: "subscribed", room: "a"});
  first.deliver({event: "e", message: "", data: null, room: "a", id: "7", ts: 1});
  first.deliver({event: "e", message: "", data: null, room: null, id: "3", ts: 1});
  first.serverClose(code, reason);
  // a reconnect (backoff 5 ms) subscribes again; a fatal code leaves it at one socket
  await until(() => sockets.length > 1 && sockets[1].sent.length, 300);
  const r = {url: first.url, protocols: first.protocols, firstSent: first.sent, sockets: sockets.length, states,
             messages, replies, lastIds: c.lastIds,
             secondSent: sockets[1] ? sockets[1].sent : null};
  c.close();
  await sleep(5);
  r.finalState = c.state;
  return r;
}

(async () => {
  for (const [code, reason] of [[1001, "server shutting down"], [1006, ""],
                                [1008, "slow consumer"], [1002, ""], [1007, ""], [1009, "big"],
                                [4001, "token expired"], [1008, "too many invalid commands"],
                                [4002, "disconnected by the server"]]) {
    out[code + " " + reason] = await scenario(code, reason);
  }
  console.log(JSON.stringify(out));
})();
"""


def test_client_reconnect_rules_under_node():
    result = subprocess.run([_node(), "-e", _NODE_SCRIPT, str(CLIENT_JS)], check=False,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    runs = json.loads(result.stdout)
    for key, run in runs.items():
        assert run["url"] == "ws://x/ws"  # the token is never in the URL
        assert run["protocols"] == ["wsserver.v1", "wsserver.token.h.p.s-_"]
        assert run["firstSent"] == [{"type": "subscribe", "room": "a"}]
        assert run["messages"] == ["7", "3"] and run["replies"] == ["subscribed"]
        assert run["lastIds"] == {"a": "7"}  # rooms only: the "everybody" stream has no since
        assert run["states"][:2] == ["connecting", "open"]
        assert run["finalState"] == "closed"
        code = int(key.split()[0])
        fatal = code in (1002, 1007, 1009, 4001, 4002) or key == "1008 too many invalid commands"
        if fatal:
            assert run["sockets"] == 1, key
            assert run["states"] == ["connecting", "open", "closed"], key
        else:
            assert run["sockets"] == 2, key
            assert run["states"][2:] == ["reconnecting", "open", "closed"], key
            assert run["secondSent"] == [{"type": "subscribe", "room": "a", "since": "7"}], key


# What the client offers, how it treats a room the server takes away, and a token that cannot
# travel in the offer (not a JWT): refused on the client's side, never put in the URL.
_OFFER_SCRIPT = r"""
const sockets = [];
class FakeWebSocket {
  constructor(url, protocols) { this.url = url; this.protocols = protocols; this.readyState = 0;
                                this.sent = []; sockets.push(this);
                                setTimeout(() => { this.readyState = 1; this.onopen(); }, 1); }
  send(data) { this.sent.push(JSON.parse(data)); }
  close(code, reason) { this.readyState = 3; this.onclose({code: code || 1000, reason: ""}); }
  deliver(obj) { this.onmessage({data: JSON.stringify(obj)}); }
}
global.WebSocket = FakeWebSocket;
const WsserverClient = require(process.argv[1]);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
async function until(predicate, ms) {
  for (const end = Date.now() + ms; !predicate() && Date.now() < end;) await sleep(5);
}
(async () => {
  const out = {};
  const anon = new WsserverClient("ws://x/ws", {});
  await until(() => sockets.length === 1, 2000);
  out.anonymous = sockets[0].protocols;
  anon.close();
  const c = new WsserverClient("ws://x/ws?rooms=z", {rooms: ["private-a", "lobby"],
                                                     token: () => "e.y.J", backoffInitial: 5});
  await until(() => sockets.length === 2 && sockets[1].sent.length === 2, 2000);
  const s = sockets[1];
  out.url = s.url;
  out.protocols = s.protocols;
  s.deliver({type: "subscribed", room: "private-a"});
  s.deliver({event: "e", message: "", data: null, room: "private-a", id: "9", ts: 1});
  out.refreshSent = c.refresh("n.e.w");
  s.deliver({type: "refreshed", exp: 2000000000});
  s.deliver({type: "unsubscribed", room: "private-a", code: "room_forbidden", reason: "r"});
  out.rooms = Array.from(c.rooms);
  out.lastIds = c.lastIds;
  out.tokenIsStillAFunction = typeof c.token === "function";
  s.close(1006);
  await until(() => sockets.length === 3 && sockets[2].sent.length, 2000);
  out.resent = sockets[2].sent;
  c.close();
  const errors = [];
  const bad = new WsserverClient("ws://x/ws", {token: "not a jwt"});
  bad.on("error", (e) => errors.push(String(e.message)));
  await sleep(30);
  out.badSockets = sockets.length - 3;
  out.badState = bad.state;
  out.badErrors = errors;
  console.log(JSON.stringify(out));
})();
"""


def test_client_offers_wsserver_v1_with_its_token_and_forgets_rooms_taken_away():
    result = subprocess.run([_node(), "-e", _OFFER_SCRIPT, str(CLIENT_JS)], check=False,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["anonymous"] == ["wsserver.v1"]
    assert out["url"] == "ws://x/ws?rooms=z"
    assert out["protocols"] == ["wsserver.v1", "wsserver.token.e.y.J"]
    assert out["refreshSent"] is True
    assert out["rooms"] == ["lobby"] and out["lastIds"] == {}
    assert out["tokenIsStillAFunction"] is True
    assert out["resent"] == [{"type": "subscribe", "room": "lobby"}]  # not private-a again
    assert out["badSockets"] == 0 and out["badState"] == "closed"
    assert out["badErrors"] == ["the token has characters a subprotocol cannot carry"]


_LOCATION_SCRIPT = r"""
const WsserverClient = require(process.argv[1]);
const out = [];
for (const [search, hash] of [["?rooms=a&token=q.q.q", "#x=1"], ["", "#token=h.h.h"],
                              ["?token=q.q.q", "#token=h.h.h"], ["?rooms=a", ""]]) {
  const calls = [];
  const history = {replaceState: (state, title, url) => calls.push(url)};
  const token = WsserverClient.takeTokenFromLocation({pathname: "/console", search, hash},
                                                     history);
  out.push({token: token === undefined ? null : token, replaced: calls});
}
console.log(JSON.stringify(out));
"""


def test_the_console_takes_its_token_from_the_fragment_and_clears_the_address_bar():
    """``/console#token=<jwt>`` (no server sees a fragment), or an old ``?token=`` link: the
    console (templates/console.html) reads it with this helper, which removes it from the
    address bar."""
    result = subprocess.run([_node(), "-e", _LOCATION_SCRIPT, str(CLIENT_JS)], check=False,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [
        {"token": "q.q.q", "replaced": ["/console?rooms=a#x=1"]},
        {"token": "h.h.h", "replaced": ["/console"]},
        {"token": "h.h.h", "replaced": ["/console"]},  # the fragment wins
        {"token": None, "replaced": []},
    ]
    page = (ROOT / "wsserver" / "templates" / "console.html").read_text()
    assert "WsserverClient.takeTokenFromLocation(location, history)" in page
    assert 'params.get("token")' not in page


# Presence: the "subscribed" reply of a presence room sets client.members[room], each
# "presence" event after it changes it, onPresence (method and option) sees both; an event
# before the room's reply is not applied (the reply counts it); unsubscribe forgets the room.
_PRESENCE_SCRIPT = r"""
const sockets = [];
class FakeWebSocket {
  constructor(url, protocols) { this.readyState = 0; this.sent = []; sockets.push(this);
    setTimeout(() => { this.readyState = 1; this.onopen(); }, 1); }
  send(data) { this.sent.push(JSON.parse(data)); }
  close() { this.readyState = 3; this.onclose({code: 1000, reason: ""}); }
  deliver(obj) { this.onmessage({data: JSON.stringify(obj)}); }
}
global.WebSocket = FakeWebSocket;
const WsserverClient = require(process.argv[1]);
const seen = [], viaOption = [], replies = [];
const c = new WsserverClient("ws://x/ws", {rooms: ["presence-x"],
                                           onPresence: (e) => viaOption.push(e.type)});
c.onPresence((e, m) => seen.push([e.type, e.action || null, m.users, m.anonymous]));
c.on("reply", (r) => replies.push(r.type));
setTimeout(() => {
  const ws = sockets[0];
  const ev = (action, user) => ws.deliver({type: "presence", room: "presence-x", action, user});
  ev("join", "early");
  ws.deliver({type: "subscribed", room: "presence-x", users: ["bob", "alice"], anonymous: 1});
  ev("join", "carol"); ev("leave", null); ev("leave", "bob"); ev("join", null);
  const before = JSON.parse(JSON.stringify(c.members));
  c.unsubscribe("presence-x");
  ev("join", "late");
  console.log(JSON.stringify({seen, viaOption, replies, before, after: c.members}));
  c.close();
}, 20);
"""


def test_client_keeps_a_presence_rooms_members():
    result = subprocess.run([_node(), "-e", _PRESENCE_SCRIPT, str(CLIENT_JS)], check=False,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["seen"] == [
        ["subscribed", None, ["alice", "bob"], 1],
        ["presence", "join", ["alice", "bob", "carol"], 1],
        ["presence", "leave", ["alice", "bob", "carol"], 0],
        ["presence", "leave", ["alice", "carol"], 0],
        ["presence", "join", ["alice", "carol"], 1],
    ]
    assert out["viaOption"] == ["subscribed"] + ["presence"] * 4
    assert out["replies"] == ["subscribed"]  # presence events are not replies
    assert out["before"] == {"presence-x": {"users": ["alice", "carol"], "anonymous": 1}}
    assert out["after"] == {}

# A publisher's disconnect (4002): a token function is asked again, and the client reconnects
# only with another token; the same one stops it with an error. The app sees the close code.
_DISCONNECT_SCRIPT = r"""
const sockets = [];
class FakeWebSocket {
  constructor(url, protocols) { this.url = url; this.protocols = protocols; this.readyState = 0;
                                this.sent = []; sockets.push(this);
                                setTimeout(() => { this.readyState = 1; this.onopen(); }, 1); }
  send(data) { this.sent.push(JSON.parse(data)); }
  close(code, reason) { this.readyState = 3;
                        this.onclose({code: code || 1000, reason: reason || ""}); }
}
global.WebSocket = FakeWebSocket;
const WsserverClient = require(process.argv[1]);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
async function until(predicate, ms) {
  for (const end = Date.now() + ms; !predicate() && Date.now() < end;) await sleep(5);
}
(async () => {
  const out = {};
  for (const [name, tokens] of [["renewed", ["a.b.c", "d.e.f"]], ["same", ["a.b.c", "a.b.c"]]]) {
    sockets.length = 0;
    let i = 0;
    const closes = [], errors = [];
    const c = new WsserverClient("ws://x/ws", {token: () => tokens[Math.min(i++, 1)],
                                               backoffInitial: 5, backoffMax: 10});
    c.on("close", (code, reason) => closes.push([code, reason]))
     .on("error", (e) => errors.push(String(e.message)));
    await until(() => sockets.length === 1 && sockets[0].readyState === 1, 2000);
    sockets[0].close(4002, "disconnected by the server");
    await until(() => sockets.length === 2 || c.state === "closed", 2000);
    await sleep(30);
    out[name] = {sockets: sockets.length, offers: sockets.map((s) => s.protocols[1]),
                 closes: closes.slice(), errors: errors.slice(), state: c.state};
    c.close();
  }
  console.log(JSON.stringify(out));
})();
"""


def test_client_never_reconnects_with_the_token_a_4002_closed():
    result = subprocess.run([_node(), "-e", _DISCONNECT_SCRIPT, str(CLIENT_JS)], check=False,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    renewed, same = out["renewed"], out["same"]
    assert renewed["offers"] == ["wsserver.token.a.b.c", "wsserver.token.d.e.f"]
    assert renewed["closes"] == [[4002, "disconnected by the server"]]
    assert renewed["errors"] == [] and renewed["state"] == "open"
    assert same["sockets"] == 1 and same["state"] == "closed"
    assert same["closes"] == [[4002, "disconnected by the server"]]
    assert len(same["errors"]) == 1 and "same token" in same["errors"][0]
