"""wsserver.console: ``/console`` is on in development, off (a JSON 404) in production unless
``WSSERVER_CONSOLE`` turns it on; its page loads only its own assets under a nonce CSP; the
client library it uses is served as JavaScript in every mode. In-process (Flask's test
client); the console in a real browser is ``e2e/test_browser.py``."""

from __future__ import annotations

import types

import pytest
from support import ROOT

from wsserver import console
from wsserver.config import SETTINGS

CLIENT_JS = ROOT / "wsserver" / "static" / "wsserver.js"
JS_TYPES = ("text/javascript", "application/javascript")


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
