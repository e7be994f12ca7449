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
  constructor(url) { this.url = url; this.readyState = 0; this.sent = []; sockets.push(this);
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
  const c = new WsserverClient("ws://x/ws", {rooms: ["a"], token: "t k", backoffInitial: 5,
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
  const r = {url: first.url, firstSent: first.sent, sockets: sockets.length, states,
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
                                [4001, "token expired"], [1008, "too many invalid commands"]]) {
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
        assert run["url"] == "ws://x/ws?token=t%20k"
        assert run["firstSent"] == [{"type": "subscribe", "room": "a"}]
        assert run["messages"] == ["7", "3"] and run["replies"] == ["subscribed"]
        assert run["lastIds"] == {"a": "7"}  # rooms only: the "everybody" stream has no since
        assert run["states"][:2] == ["connecting", "open"]
        assert run["finalState"] == "closed"
        code = int(key.split()[0])
        fatal = code in (1002, 1007, 1009, 4001) or key == "1008 too many invalid commands"
        if fatal:
            assert run["sockets"] == 1, key
            assert run["states"] == ["connecting", "open", "closed"], key
        else:
            assert run["sockets"] == 2, key
            assert run["states"][2:] == ["reconnecting", "open", "closed"], key
            assert run["secondSent"] == [{"type": "subscribe", "room": "a", "since": "7"}], key
