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
