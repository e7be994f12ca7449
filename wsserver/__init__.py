"""wsserver: a real-time notification service.

Backends ``POST /notify``; every client holding ``GET /ws`` open receives the notification.
Flask + flask-sock for the routes, gunicorn's threaded worker for the sockets, one
broadcaster thread for the fan-out. ``create_app`` is the WSGI application factory.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .app import create_app

__all__ = ["__version__", "create_app"]
