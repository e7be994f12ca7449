"""The live console: ``GET /console``, a page that watches the server in a browser.

It shows the connection count and the rooms (polling ``GET /`` and ``GET /rooms``), the
notifications arriving on a WebSocket opened with the shipped browser client, a field to join
rooms and a form that sends a test notification (``POST /notify``). Plain HTML, CSS and JS:
no external asset, so it works on a machine without internet.

On in development, off in production unless ``WSSERVER_CONSOLE`` is on: :func:`init_app`
registers the blueprint only then, so in production ``/console`` is the app's JSON 404.

A WebSocket refused before the upgrade (a 401 for a bad token, a 403 for an origin, a 503
when full) is invisible to a page: the browser reports close 1006 and nothing else. So the
console, after a connection that failed before it opened, asks ``POST /console/check``, which
runs the same checks as ``GET /ws`` (:func:`wsserver.ws.check_upgrade`) on this request and
answers what ``/ws`` would have answered: the same status and JSON body, or 200
``{"accepted": true, ...}``. The page sends its token there as ``Authorization: Bearer`` (a
``fetch`` cannot set ``Sec-WebSocket-Protocol``), to this same server only; POST so that the
browser sends ``Origin``, as it does on a WebSocket. It reveals nothing ``/ws`` does not tell
any non-browser client, changes nothing, and is not counted as a refusal (no audit line).

The page's URLs start with the request's script root (``BASE`` in its script): ``""`` for the
standalone server, the prefix when :class:`wsserver.extension.Realtime` mounts wsserver in a
user's app (``/realtime/ws``, ``/realtime/notify``...).

The browser client itself, ``/static/wsserver.js``, is not served from here: the app is
``Flask("wsserver")``, whose root is this package, so Flask's own static route serves
``wsserver/static/`` at ``/static/`` in every mode (under a prefix too: the mounted app is
that app; an app given ``url_prefix=""`` gets a route of its own for the two scripts). That
is on purpose: production pages may load the client from the server
(``<script src="https://notify.example.com/static/wsserver.js">``) while the console stays
off. A blueprint static folder at the same URL would be shadowed by the app's route anyway.
"""

from __future__ import annotations

import re
import secrets
from typing import Any

from flask import Blueprint, Flask, current_app, jsonify, render_template, request

from .errors import refusal_response
from .exceptions import AccessDenied
from .ws import check_upgrade

__all__ = ["bp", "check", "enabled", "init_app"]

bp = Blueprint("console", __name__, template_folder="templates")

_HOST_RE = re.compile(r"[A-Za-z0-9.:\[\]-]{1,255}")


def enabled(settings: Any) -> bool:
    """Is the console on for these settings? Development always; production only with
    ``WSSERVER_CONSOLE`` (read with getattr: the setting may not exist in older configs)."""
    return settings.env == "development" or bool(getattr(settings, "console", False))


def init_app(app: Flask) -> None:
    """Register ``GET /console`` when the app's settings enable it; otherwise do nothing.
    Calling it again on the same app does nothing either."""
    if enabled(app.config["WSSERVER_SETTINGS"]) and bp.name not in app.blueprints:
        app.register_blueprint(bp)


@bp.get("/console")
def page() -> Any:
    settings = current_app.config["WSSERVER_SETTINGS"]
    # A fresh nonce per response: the page's own inline script and style run, nothing else
    # does (a notification's text is only ever inserted as text, this is the second fence).
    nonce = secrets.token_urlsafe(16)
    response = current_app.make_response(
        render_template("console.html", env=settings.env, nonce=nonce)
    )
    host = request.host if _HOST_RE.fullmatch(request.host) else ""
    sockets = f" ws://{host} wss://{host}" if host else ""
    response.headers["Content-Security-Policy"] = (
        f"default-src 'none'; script-src 'self' 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
        f"connect-src 'self'{sockets}; img-src 'self' data:; base-uri 'none'; "
        "form-action 'none'; frame-ancestors 'none'"
    )
    response.headers["Cache-Control"] = "no-store"
    response.headers["Referrer-Policy"] = "no-referrer"
    return response


@bp.post("/console/check")
def check() -> Any:
    """What ``GET /ws`` would answer this browser now, for the page to explain a refused
    connection in words: the refusal's own status, headers and body (not audited: nothing was
    refused), or 200 with the token's user when it would be accepted."""
    service = current_app.extensions["wsserver"]
    service.ensure_started()
    try:
        identity, _rooms = check_upgrade(service)
    except AccessDenied as exc:
        return refusal_response(exc, audited=False)
    body: dict[str, Any] = {"accepted": True, "user": None}
    if identity is not None:
        body.update(user=identity.user, exp=identity.expires_at)
    response = jsonify(body)
    response.headers["Cache-Control"] = "no-store"
    return response
