"""The application factory.

``create_app(config=None)``: defaults, then ``WSSERVER_*`` environment variables, then the
``config`` mapping (tests, the CLI). All state lives in ``app.extensions["wsserver"]``; no
thread is started here (see :mod:`wsserver.service` for why).
"""

from __future__ import annotations

from typing import Any, Mapping

from flask import Flask

from . import console, errors, logs, serverapi, views, ws
from .config import Settings, load_settings
from .notify import NotifyEndpoint
from .proxies import ClientAddress, TrustedProxies
from .service import NotificationService

__all__ = ["create_app"]


def create_app(config: Mapping[str, Any] | Settings | None = None) -> Flask:
    """Build the WSGI app. ``config`` is a :class:`Settings` or a mapping of setting names
    (``{"queue_size": 16}``) applied over the environment."""
    settings = config if isinstance(config, Settings) else load_settings(overrides=config)
    app = Flask("wsserver")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_size
    app.config["WSSERVER_SETTINGS"] = settings
    logs.configure(settings.log_level, settings.log_format)
    service = app.extensions["wsserver"] = NotificationService(settings)
    errors.init_app(app)
    app.register_blueprint(views.bp)
    app.register_blueprint(serverapi.bp)
    ws.init_app(app)
    console.init_app(app)
    # POST /notify is answered below Flask (wsserver.notify: why); everything else is Flask's
    app.wsgi_app = NotifyEndpoint(app.wsgi_app, service)  # type: ignore[method-assign]
    if settings.trusted_proxies:
        # outermost: every part of the app (limits, audit, publishers) reads one client address
        proxies = TrustedProxies(settings.trusted_proxies)
        app.wsgi_app = ClientAddress(app.wsgi_app, proxies)  # type: ignore[method-assign]
    return app
