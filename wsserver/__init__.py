"""wsserver: a real-time notification service.

Backends ``POST /notify``; every client holding ``GET /ws`` open receives the notification.
Flask + flask-sock for the routes, gunicorn's threaded worker for the sockets, one
broadcaster thread for the fan-out. ``create_app`` is the WSGI application factory;
``Realtime`` serves the same inside an existing Flask app (``Realtime(app, url_prefix=...)``).

``create_app`` and ``Realtime`` are imported on first use (PEP 562): importing
``wsserver.gunicorn_conf`` must not import the app, because the config has to prepare the
environment (Prometheus multiprocess directory) before prometheus_client is first imported.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["Realtime", "__version__", "create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from .app import create_app

        return create_app
    if name == "Realtime":
        from .extension import Realtime

        return Realtime
    raise AttributeError(f"module 'wsserver' has no attribute {name!r}")
