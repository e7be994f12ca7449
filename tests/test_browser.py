"""What users touch in a browser: the client library (/static/wsserver.js) and the live
console (/console).

* plain tests (no browser): the JS is served as JavaScript in every mode, ``/console`` is on
  in development and a JSON 404 in production, ``node --check`` parses the client, and the
  client's reconnect rules run under node against a fake WebSocket;
* one real-browser test: headless Chromium (Debian's ``chromium`` + ``chromium-driver``)
  driven by Selenium opens the console on a real gunicorn server, sees a notification posted
  with ``requests`` arrive, then sees the page reconnect to a server restarted on the same
  port, rejoin its room with ``since``, and show the next notification.

Selenium never downloads anything: the driver and browser paths are given explicitly (so
Selenium Manager is not run) and ``SE_OFFLINE`` is set should it be. Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import types
from pathlib import Path

import pytest
from support import ROOT, GunicornServer

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CLIENT_JS = ROOT / "wsserver" / "static" / "wsserver.js"
JS_TYPES = ("text/javascript", "application/javascript")


# -- plain tests ------------------------------------------------------------------------------


def _app(env: str, **overrides):
    from wsserver import create_app

    return create_app({"env": env, **overrides})


@pytest.mark.parametrize("env", ["development", "production"])
def test_client_js_is_served_as_javascript(env):
    """The client is served in every mode: production pages load it from the server too."""
    client = _app(env).test_client()
    resp = client.get("/static/wsserver.js")
    assert resp.status_code == 200
    assert resp.mimetype in JS_TYPES
    assert b"WsserverClient" in resp.data
    assert resp.data == CLIENT_JS.read_bytes()
    missing = client.get("/static/nope.js")
    assert missing.status_code == 404 and missing.is_json


def test_console_is_on_in_development():
    resp = _app("development").test_client().get("/console")
    assert resp.status_code == 200
    assert resp.mimetype == "text/html"
    page = resp.get_data(as_text=True)
    assert '<script src="/static/wsserver.js">' in page
    csp = resp.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "'unsafe-inline'" not in csp
    nonce = csp.split("'nonce-", 1)[1].split("'", 1)[0]
    assert f'<script nonce="{nonce}">' in page  # the page's own script may run
    assert "http://" not in page.replace("http://www.w3.org", "")  # no external asset


def test_console_is_off_in_production():
    resp = _app("production").test_client().get("/console")
    assert resp.status_code == 404
    assert resp.get_json()["code"] == "not_found"


def test_console_switch():
    """Development always; production only when the ``console`` setting is on (read with
    getattr, so settings without it mean off)."""
    from wsserver import console

    assert console.enabled(types.SimpleNamespace(env="development"))
    assert not console.enabled(types.SimpleNamespace(env="production"))
    assert not console.enabled(types.SimpleNamespace(env="production", console=False))
    assert console.enabled(types.SimpleNamespace(env="production", console=True))


def test_console_in_production_when_enabled():
    from wsserver.config import SETTINGS

    if "console" not in {s.name for s in SETTINGS}:
        pytest.skip("the WSSERVER_CONSOLE setting is not in config.SETTINGS yet")
    app = _app("production", console=True)
    assert app.test_client().get("/console").status_code == 200


def test_console_init_app_is_idempotent():
    from wsserver import console

    app = _app("development")
    console.init_app(app)  # a second call (create_app made the first) changes nothing
    assert app.test_client().get("/console").status_code == 200


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


# -- the real browser ---------------------------------------------------------------------------


def _chrome(profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                 "--window-size=1280,900", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    service = Service(executable_path=CHROMEDRIVER,
                      log_output=str(profile.parent / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(20)
    driver.set_script_timeout(10)
    return driver


def test_console_in_a_real_browser(tmp_path, monkeypatch):
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed "
                    "(apt-get install -y chromium chromium-driver)")
    # Selenium Manager is never needed (both paths are explicit); should it run, offline.
    monkeypatch.setenv("SE_OFFLINE", "true")
    monkeypatch.setenv("SE_AVOID_STATS", "true")
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    servers: list[GunicornServer] = []
    driver = None

    def page_text() -> str:
        try:
            state = driver.find_element(By.ID, "state")
            lines = driver.find_element(By.ID, "stream").text.splitlines()[-15:]
            return (f"state={state.get_attribute('data-state')} "
                    f"opens={state.get_attribute('data-opens')}\n" + "\n".join(lines))
        except Exception as exc:  # noqa: BLE001 - diagnostics only
            return f"(page unreadable: {exc})"

    def wait(what: str, predicate, timeout: float = 15.0):
        try:
            return WebDriverWait(driver, timeout, poll_frequency=0.1).until(
                lambda d: predicate(d))
        except TimeoutException:
            logs = "\n".join(s.log()[-2000:] for s in servers)
            raise AssertionError(f"timed out after {timeout}s waiting for {what}\n"
                                 f"page:\n{page_text()}\nserver log:\n{logs}") from None

    def one(css: str):
        found = driver.find_elements(By.CSS_SELECTOR, css)
        return found[-1] if found else None

    def state(d) -> str:
        return d.find_element(By.ID, "state").get_attribute("data-state")

    def opens(d) -> int:
        return int(d.find_element(By.ID, "state").get_attribute("data-opens"))

    try:
        first = GunicornServer(env={"WSSERVER_ENV": "development"})
        servers.append(first)
        first.start()
        driver = _chrome(tmp_path / "profile")
        driver.get(first.url + "/console")
        assert driver.title == "wsserver console"

        wait("the console to connect", lambda d: state(d) == "open")
        assert driver.find_element(By.ID, "state").text == "connected"
        # the page polls GET /: its own WebSocket is the one connection
        wait("the connection count", lambda d: d.find_element(By.ID, "clients").text == "1")

        # join a room from the page; GET /rooms (open in development) then lists it
        driver.find_element(By.ID, "room-input").send_keys("orders")
        driver.find_element(By.ID, "subscribe-button").click()
        wait("the subscribed reply", lambda d: one(
            'li[data-kind="reply"][data-type="subscribed"][data-room="orders"]'))
        wait("/rooms to list the room", lambda d: one('#rooms li[data-room="orders"]'))

        # a notification posted from outside the browser shows up with its room and id
        resp = first.notify({"event": "browser.before", "message": "before the restart",
                             "room": "orders", "data": {"n": 1}})
        assert resp.status_code == 200, resp.text
        first_id = resp.json()["id"]
        entry = wait("the first notification", lambda d: one(
            'li[data-kind="message"][data-event="browser.before"]'))
        assert entry.get_attribute("data-id") == first_id
        assert entry.get_attribute("data-room") == "orders"
        assert "before the restart" in entry.text and f"#{first_id}" in entry.text

        # the page's own form publishes too (to everybody: room left empty)
        event = driver.find_element(By.ID, "notify-event")
        event.clear()
        event.send_keys("browser.form")
        driver.find_element(By.ID, "notify-button").click()
        entry = wait("the form's notification", lambda d: one(
            'li[data-kind="message"][data-event="browser.form"]'))
        assert entry.get_attribute("data-room") == ""
        wait("the form's result",
             lambda d: "sent: id" in d.find_element(By.ID, "notify-result").text)

        # restart on the same port: the page sees 1001, then reconnects by itself
        port = first.port
        first.stop()
        wait("the shutdown close", lambda d: one('li[data-kind="sys"]') is not None
             and "closed 1001 server shutting down" in d.find_element(By.ID, "stream").text)
        wait("the page to notice", lambda d: state(d) != "open", timeout=5)
        second = GunicornServer(env={"WSSERVER_ENV": "development"}, port=port)
        servers.append(second)
        second.start()
        wait("the reconnect", lambda d: opens(d) >= 2 and state(d) == "open", timeout=20)

        # it rejoined "orders" on its own, resuming with since (the reply says whether the
        # new server could recover anything: it has no history of the old one)
        wait("the resumed subscription", lambda d: len(d.find_elements(
            By.CSS_SELECTOR, 'li[data-kind="reply"][data-type="subscribed"][data-room="orders"]'
        )) >= 2)
        resumed = one('li[data-kind="reply"][data-type="subscribed"][data-room="orders"]')
        assert resumed.get_attribute("data-recovered") is not None, resumed.text

        resp = second.notify({"event": "browser.after", "message": "after the restart",
                              "room": "orders"})
        assert resp.status_code == 200, resp.text
        second_id = resp.json()["id"]
        entry = wait("the notification after the restart", lambda d: one(
            'li[data-kind="message"][data-event="browser.after"]'))
        assert entry.get_attribute("data-id") == second_id
        assert entry.get_attribute("data-room") == "orders"
        assert "after the restart" in entry.text
    finally:
        if driver is not None:
            driver.quit()
        for srv in servers:
            srv.stop()
