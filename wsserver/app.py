"""The application factory: the standalone server, a thin user of :class:`Realtime`.

``create_app(config=None)``: defaults, then ``WSSERVER_*`` environment variables, then the
``config`` mapping (tests, the CLI). The app is ``Flask("wsserver")`` (its static folder is
the package's: ``/static/wsserver.js``) with the extension installed at the root
(``url_prefix=""``, :func:`wsserver.extension.install`), so the standalone server and a
user's app with ``Realtime(app, url_prefix=...)`` are wired by the same code. All state lives
in ``app.extensions["wsserver"]``; no thread is started here (see :mod:`wsserver.service`).
"""

from __future__ import annotations

from typing import Any, Mapping

from flask import Flask

from .config import Settings, load_settings
from .extension import Realtime

__all__ = ["create_app"]


def create_app(config: Mapping[str, Any] | Settings | None = None) -> Flask:
    """Build the WSGI app. ``config`` is a :class:`Settings` or a mapping of setting names
    (``{"queue_size": 16}``) applied over the environment."""
    settings = config if isinstance(config, Settings) else load_settings(overrides=config)
    app = Flask("wsserver")
    Realtime(app, settings=settings)
    return app
