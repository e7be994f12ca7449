"""The console (/console) in a real browser: headless Chromium (Debian's ``chromium`` +
``chromium-driver``) driven by Selenium opens the console on a real gunicorn server, sees a
notification posted with ``requests`` arrive, then sees the page reconnect to a server
restarted on the same port, rejoin its room with ``since``, and show the next notification.
(The console's and the JS client's in-process tests: ``tests/test_console.py``,
``tests/test_wsserver_js.py``.)

Over TLS: the console served by a wss server, and a page script's ``new WebSocket(wss://...,
["wsserver.v1"])`` (the certificate is the test's self-signed one).

Selenium never downloads anything: the driver and browser paths are given explicitly (so
Selenium Manager is not run) and ``SE_OFFLINE`` is set should it be. Every wait is bounded.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from support import GunicornServer

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


# -- the real browser ---------------------------------------------------------------------------


def _chrome(profile: Path, *extra_flags: str):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                 "--window-size=1280,900", f"--user-data-dir={profile}", *extra_flags):
        options.add_argument(flag)
    service = Service(executable_path=CHROMEDRIVER,
                      log_output=str(profile.parent / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(20)
    driver.set_script_timeout(10)
    return driver


def _need_chromium(monkeypatch) -> None:
    """Skip unless Debian's chromium and chromedriver are there; keep Selenium offline."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed "
                    "(apt-get install -y chromium chromium-driver)")
    # Selenium Manager is never needed (both paths are explicit); should it run, offline.
    monkeypatch.setenv("SE_OFFLINE", "true")
    monkeypatch.setenv("SE_AVOID_STATS", "true")


def test_console_in_a_real_browser(tmp_path, monkeypatch):
    _need_chromium(monkeypatch)
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


# -- over TLS ------------------------------------------------------------------------------------

_OPEN_WSS = """
const done = arguments[arguments.length - 1];
const ws = new WebSocket(arguments[0], ["wsserver.v1"]);
window.probe = {messages: []};
ws.onmessage = (event) => window.probe.messages.push(JSON.parse(event.data));
ws.onopen = () => done(ws.protocol);
ws.onerror = () => done("error");
"""


def test_a_page_served_over_https_connects_over_wss_with_wsserver_v1(tmp_path, monkeypatch):
    """The console served by the TLS server (the test's self-signed certificate, hence
    ``--ignore-certificate-errors``): its own connection goes over wss, and a page script's
    ``new WebSocket("wss://...", ["wsserver.v1"])`` gets the subprotocol and a notification."""
    _need_chromium(monkeypatch)
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from e2e.test_tls import TlsServer, tls_env

    server = TlsServer(env=tls_env()).start()
    driver = None
    try:
        driver = _chrome(tmp_path / "profile", "--ignore-certificate-errors")
        driver.get(server.url + "/console")
        assert driver.title == "wsserver console"
        WebDriverWait(driver, 15, poll_frequency=0.1).until(
            lambda d: d.find_element(By.ID, "state").get_attribute("data-state") == "open")
        assert driver.execute_async_script(_OPEN_WSS, server.ws_url) == "wsserver.v1"
        resp = server.notify({"event": "browser.tls", "message": "over wss"})
        assert resp.status_code == 200 and resp.json()["clients"] == 2, resp.text
        events = WebDriverWait(driver, 10, poll_frequency=0.1).until(
            lambda d: d.execute_script(
                "return window.probe.messages.map((m) => m.event)") or None)
        assert events == ["browser.tls"]
        WebDriverWait(driver, 10, poll_frequency=0.1).until(lambda d: d.find_elements(
            By.CSS_SELECTOR, 'li[data-kind="message"][data-event="browser.tls"]'))
    finally:
        if driver is not None:
            driver.quit()
        server.stop(graceful=False)


# -- the console in production: a JWT, API keys, an origin allow-list --------------------------

SECRET = "console-e2e-secret-0123456789abcdefghij"  # >= 32 bytes (RFC 7518 3.2)
API_KEY = "console-e2e-key"


def _token(sub: str, ttl: float = 600, secret: str = SECRET) -> str:
    import time

    import jwt

    return jwt.encode({"sub": sub, "exp": int(time.time() + ttl)}, secret, algorithm="HS256")


class _Console:
    """The console page in a browser: bounded waits that say what the page showed."""

    def __init__(self, driver, servers: list[GunicornServer]) -> None:
        from selenium.webdriver.common.by import By

        self.driver, self.servers, self.by = driver, servers, By

    def find(self, id_: str):
        return self.driver.find_element(self.by.ID, id_)

    def text(self, id_: str) -> str:
        return self.find(id_).text

    def state(self) -> str:
        return self.find("state").get_attribute("data-state")

    def describe(self) -> str:
        try:
            lines = self.text("stream").splitlines()[-12:]
            return (f"state={self.state()} explain={self.text('explain')!r} "
                    f"clients={self.text('clients')!r} result={self.text('notify-result')!r}\n"
                    + "\n".join(lines))
        except Exception as exc:  # noqa: BLE001 - diagnostics only
            return f"(page unreadable: {exc})"

    def wait(self, what: str, predicate, timeout: float = 15.0):
        from selenium.common.exceptions import TimeoutException
        from selenium.webdriver.support.ui import WebDriverWait

        try:
            return WebDriverWait(self.driver, timeout, poll_frequency=0.1).until(
                lambda d: predicate())
        except TimeoutException:
            logs = "\n".join(s.log()[-2000:] for s in self.servers)
            raise AssertionError(f"timed out after {timeout}s waiting for {what}\n"
                                 f"page:\n{self.describe()}\nserver log:\n{logs}") from None

    def type(self, id_: str, value: str) -> None:
        field = self.find(id_)
        field.clear()
        if value:
            field.send_keys(value)

    def connect(self, token: str) -> None:
        self.type("token-input", token)
        self.find("connect-button").click()

    def explained(self, words: str, status: str) -> str:
        """Wait for the refusal's explanation (and the badge to say refused); return it."""
        self.wait(f"the explanation {words!r}", lambda: words in self.text("explain")
                  and status in self.text("explain") and self.state() == "refused")
        return self.text("explain")

    def in_viewport(self, id_: str) -> dict:
        return self.driver.execute_script(
            "const r = document.getElementById(arguments[0]).getBoundingClientRect();"
            "return {top: r.top, bottom: r.bottom, height: window.innerHeight,"
            " width: window.innerWidth, scrollY: window.scrollY};", id_)


def _production(port: int, origins: str, **env: str) -> GunicornServer:
    return GunicornServer(port=port, env={
        "WSSERVER_ENV": "production", "WSSERVER_CONSOLE": "on",
        "WSSERVER_JWT_SECRET": SECRET, "WSSERVER_API_KEYS": API_KEY,
        "WSSERVER_ALLOWED_ORIGINS": origins, "WSSERVER_LOG_LEVEL": "debug", **env,
    })


def test_console_in_production_with_a_token_and_a_key(tmp_path, monkeypatch):
    """``/console`` on a production server (JWT, API keys, an allow-list naming its own origin)
    at 1280x800: refusals explained in words (no token, a bad one, an expired one), then the
    typed token connects, the count says 1, the typed key sends a notification to the token's
    user, which shows that user (not ``*``), and the send result is in the viewport."""
    _need_chromium(monkeypatch)
    from support import free_port

    port = free_port()
    server = _production(port, f"http://127.0.0.1:{port}")
    servers, driver = [server], None
    try:
        server.start()
        driver = _chrome(tmp_path / "profile")
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
            "width": 1280, "height": 800, "deviceScaleFactor": 1, "mobile": False})
        page = _Console(driver, servers)
        driver.get(server.url + "/console")
        assert driver.title == "wsserver console"

        # no token yet: the browser sees only 1006; the page asks the server why, says it
        # in words and stops retrying what would fail the same way
        text = page.explained("token missing", "401")
        assert "missing_token" in text
        page.connect("not.a.jwt")
        assert "401 invalid_token" in page.explained("token invalid", "401")
        page.connect(_token("alice", secret="some-other-secret-0123456789abcdefgh"))
        assert "401 invalid_token" in page.explained("token invalid", "401")
        page.connect(_token("alice", ttl=-30))
        assert "401 token_expired" in page.explained("token expired", "401")

        good = _token("alice")
        page.type("api-key", API_KEY)
        page.connect(good)
        page.wait("the console to connect", lambda: page.state() == "open")
        assert page.text("state") == "connected"
        # once connected, GET / is read again after the pong (the server registered the
        # connection by then): that read already says 1, no stale 0 until the next poll
        page.wait("the read after the open", lambda: page.find("clients").get_attribute(
            "data-read-after-open") == page.find("state").get_attribute("data-opens"), timeout=3)
        assert page.text("clients") == "1"
        # the key reads GET /rooms (a publisher endpoint)
        page.wait("the rooms list", lambda: page.text("rooms") == "none")

        # a notification to the token's user, sent with the typed API key
        page.type("notify-event", "console.user")
        page.type("notify-user", "alice")
        page.find("notify-button").click()
        page.wait("the send result", lambda: "sent: id" in page.text("notify-result"))
        assert "1 client(s)" in page.text("notify-result")
        box = page.in_viewport("notify-result")
        assert box["height"] == 800 and box["width"] == 1280, box
        assert box["scrollY"] == 0 and 0 <= box["top"] and box["bottom"] <= box["height"], box
        entry = page.wait("the user's notification", lambda: (driver.find_elements(
            page.by.CSS_SELECTOR, 'li[data-kind="message"][data-event="console.user"]')
            or [None])[-1])
        assert entry.get_attribute("data-audience") == "user"
        assert entry.get_attribute("data-user") == "alice"
        assert "@alice" in entry.text and "*" not in entry.text, entry.text
        shot = tmp_path / "console-1280x800.png"
        assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 0
        print(f"screenshot: {shot}")

        # the token never travelled in a URL (the access log has every request line), and
        # the key and token stay out of the address bar
        log = server.log()
        assert good not in log and API_KEY not in log
        assert "token" not in driver.current_url
    finally:
        if driver is not None:
            driver.quit()
        for srv in servers:
            srv.stop()


def test_console_explains_a_forbidden_origin(tmp_path, monkeypatch):
    """An allow-list that forgets the console's own origin: the page says so, naming it. The
    browser reaches the server by a name (``console.test``, mapped to 127.0.0.1 in Chromium
    alone) that is not one of the server's names, as a deployment behind a DNS name is: an
    IP literal or ``localhost`` would pass the same-origin rule (docs/security.md)."""
    _need_chromium(monkeypatch)
    from support import free_port

    port = free_port()
    server = _production(port, "https://app.example.com")
    servers, driver = [server], None
    try:
        server.start()
        driver = _chrome(tmp_path / "profile", "--host-resolver-rules=MAP console.test 127.0.0.1")
        page = _Console(driver, servers)
        origin = f"http://console.test:{port}"
        driver.get(origin + "/console#token=" + _token("bob"))
        assert driver.current_url == origin + "/console"  # the fragment left the address bar
        text = page.explained("origin not allowed", "403")
        assert f"add {origin} to WSSERVER_ALLOWED_ORIGINS" in text and "origin_forbidden" in text
        driver.save_screenshot(str(tmp_path / "console-origin.png"))
    finally:
        if driver is not None:
            driver.quit()
        for srv in servers:
            srv.stop()


def test_console_explains_a_full_server_and_keeps_trying(tmp_path, monkeypatch):
    """A worker whose one WebSocket slot is taken: the page says "server full (503 ...)" and,
    unlike a token refusal, keeps reconnecting; it connects by itself once the slot is free."""
    _need_chromium(monkeypatch)
    import websocket
    from support import free_port

    port = free_port()
    server = _production(port, f"http://127.0.0.1:{port}", WSSERVER_MAX_CONNECTIONS="1")
    servers, driver, holder = [server], None, None
    try:
        server.start()
        holder = websocket.create_connection(
            server.ws_url, timeout=5, header=[f"Authorization: Bearer {_token('holder')}"])
        driver = _chrome(tmp_path / "profile")
        page = _Console(driver, servers)
        driver.get(server.url + "/console#token=" + _token("carol"))
        page.wait("the explanation", lambda: "(503 server_full)" in page.text("explain"))
        assert page.text("explain").startswith("server full")
        assert page.state() in ("reconnecting", "connecting"), page.describe()
        holder.close()
        holder = None
        page.wait("the reconnect once the slot is free", lambda: page.state() == "open",
                  timeout=20)
        page.wait("the connection count", lambda: page.text("clients") == "1", timeout=3)
        assert page.text("explain") == "connected with the token"
    finally:
        if holder is not None:
            holder.close()
        if driver is not None:
            driver.quit()
        for srv in servers:
            srv.stop()


# -- presence ------------------------------------------------------------------------------------


def test_the_console_shows_who_is_in_a_presence_room(tmp_path, monkeypatch):
    """The console joined to a presence room (its token from ``#token=``) lists its members
    under the room, and logs who joins and leaves: another user's WebSocket comes and goes."""
    _need_chromium(monkeypatch)
    import json

    import websocket
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from e2e.test_security import SECRET, token

    room = "presence-lobby"
    server = GunicornServer(env={"WSSERVER_ENV": "development", "WSSERVER_JWT_SECRET": SECRET})
    driver = None
    other = None

    def wait(what: str, css: str, timeout: float = 15.0):
        try:
            return WebDriverWait(driver, timeout, poll_frequency=0.1).until(
                lambda d: (d.find_elements(By.CSS_SELECTOR, css) or [None])[-1])
        except TimeoutException:
            raise AssertionError(f"timed out waiting for {what} ({css})\npage:\n"
                                 f"{driver.find_element(By.TAG_NAME, 'body').text[-2000:]}"
                                 f"\nserver log:\n{server.log()[-2000:]}") from None

    try:
        server.start()
        driver = _chrome(tmp_path / "profile")
        driver.get(f"{server.url}/console?rooms={room}#token={token('walter', ttl=600)}")
        wait("the console in the room", f'#my-rooms li[data-room="{room}"][data-members="walter"]')
        other = websocket.create_connection(f"{server.ws_url}?token={token('olga', ttl=600)}",
                                            timeout=10)
        other.send(json.dumps({"type": "subscribe", "room": room}))
        assert json.loads(other.recv())["users"] == ["walter"]
        item = wait("olga listed", f'#my-rooms li[data-room="{room}"][data-members="olga,walter"]')
        assert "here: olga, walter" in item.text
        joined = wait("olga's join logged",
                      'li[data-kind="presence"][data-action="join"][data-user="olga"]')
        assert "olga joined" in joined.text
        other.close()
        other = None
        wait("olga's leave logged",
             'li[data-kind="presence"][data-action="leave"][data-user="olga"]')
        wait("olga gone", f'#my-rooms li[data-room="{room}"][data-members="walter"]')
    finally:
        if other is not None:
            other.close()
        if driver is not None:
            driver.quit()
        server.stop()
