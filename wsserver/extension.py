"""``Realtime``: wsserver as an extension of an existing Flask app.

::

    app = Flask(__name__)
    rt = Realtime(app, url_prefix="/realtime")   # or Realtime(**settings); rt.init_app(app, ...)

    @app.post("/orders")
    def create_order():
        rt.publish("order.created", "Order 7", {"id": 7}, room="orders")
        return {"ok": True}

Why a mounted app rather than blueprints in the user's app: under a prefix, the extension's
routes must answer exactly as the standalone server's do (JSON errors for every status, CORS,
the ``401 Unauthorized`` status phrase, ``/notify`` below Flask, the body limit), and the
user's routes must answer exactly as before (their error pages, their ``MAX_CONTENT_LENGTH``,
their JSON settings, their client addresses). Flask's error handlers, ``after_request`` hooks,
config and JSON provider are per app, and a 404 or 405 under the prefix reaches no blueprint
handler, so scoping them inside one app would be a copy of each with a path test. Instead the
extension builds wsserver's own app (``Flask("wsserver")``, wired by :func:`install`, the same
function ``create_app`` uses) and :class:`PrefixMount` hands it every request under the
prefix, with the prefix moved to ``SCRIPT_NAME`` (so ``url_for`` and the console build
prefixed URLs); every other request goes to the user's app untouched. This is how
Flask-SocketIO mounts too (a WSGI middleware on a path). The price: the user's
``before_request`` hooks and error handlers do not run for the extension's routes (they are
wsserver's, with wsserver's checks).

With ``url_prefix=""`` there is nothing to mount: :func:`install` wires the parts into the
given app itself, which becomes the standalone server (JSON errors and CORS for all of it).
That is what ``create_app`` does.

The gunicorn hooks (:mod:`wsserver.gunicorn_conf`) find the service in
``app.extensions["wsserver"]`` of the app gunicorn loads, in both cases, so the user's app gets
the lazy start after fork, the connection budget from ``--threads`` and the 1001 goodbye on
SIGTERM. Settings come from ``WSSERVER_*`` with keyword overrides; the gunicorn config reads
its own (bind, workers, threads, TLS, the Redis URL that allows ``-w`` > 1) from the
environment only, since the master never imports the app.

:meth:`Realtime.publish` is ``POST /notify`` without HTTP: the same validation (the
notification goes through :func:`wsserver.protocol.parse_notify_body` and
:func:`~wsserver.protocol.parse_notification`), the same :meth:`NotificationService.publish`
(broker, idempotency, delivery to every worker and host on Redis), and the same refusals, raised
as the :class:`~wsserver.exceptions.Refusal` whose answer ``/notify`` would send. The
publisher check (API keys, loopback) does not apply: the caller is the app's own code.

Thread-safety: ``init_app`` runs once per app at set-up; ``publish`` may be called from any
thread (the service's ``publish`` is thread-safe).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from typing import Any, Callable

from flask import Flask, current_app, has_app_context, send_from_directory

from . import console, errors, logs, serverapi, views, ws
from .config import SETTINGS, Settings, SettingsError, load_settings
from .exceptions import BadRequest
from .notify import NotifyEndpoint, body_too_large
from .protocol import parse_notification, parse_notify_body
from .proxies import ClientAddress, TrustedProxies
from .service import NotificationService

__all__ = ["EXTENSION", "PrefixMount", "Realtime", "install"]

EXTENSION = "wsserver"  # app.extensions key of the service (what gunicorn_conf's hooks read)
_REALTIME = "wsserver.realtime"  # app.extensions key of the Realtime that owns it

log = logging.getLogger(__name__)

_STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")

WSGIApp = Callable[[dict, Callable], Iterable[bytes]]


class PrefixMount:
    """WSGI middleware: a request whose path is ``prefix`` or under ``prefix/`` goes to
    ``server`` with the prefix moved from ``PATH_INFO`` to ``SCRIPT_NAME``; every other request
    goes to ``app`` unchanged. The match is on whole path segments: ``/realtimes`` is not under
    ``/realtime``; ``/realtime`` itself is ``/realtime/`` (the health answer, not a redirect
    page in HTML).

    ``hidden``, when given, names the app's own routes under the prefix (which can never be
    reached): asked once, at the first request (Flask takes no route after it), and logged
    as a WARNING. Thread-safety: that flag is the only state; a race logs it twice at most.
    """

    def __init__(
        self,
        app: WSGIApp,
        prefix: str,
        server: WSGIApp,
        hidden: Callable[[], list[str]] | None = None,
    ) -> None:
        self._app = app
        self.prefix = prefix
        self.server = server
        self._hidden = hidden

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        if self._hidden is not None:
            hidden, self._hidden = self._hidden(), None
            if hidden:
                log.warning(
                    "the app's routes %s are under url_prefix %r, which wsserver serves: they "
                    "are never reached; choose another prefix",
                    ", ".join(hidden),
                    self.prefix,
                )
        path = environ.get("PATH_INFO") or ""
        prefix = self.prefix
        if path.startswith(prefix) and (len(path) == len(prefix) or path[len(prefix)] == "/"):
            environ["SCRIPT_NAME"] = environ.get("SCRIPT_NAME", "") + prefix
            environ["PATH_INFO"] = path[len(prefix):] or "/"
            return self.server(environ, start_response)
        return self._app(environ, start_response)


def install(app: Flask, service: NotificationService) -> None:
    """Wire wsserver's parts into ``app``, which becomes the standalone server: its settings
    and body limit, JSON errors for every status, the HTTP API, ``/ws``, the console,
    ``/notify`` below Flask and, with trusted proxies, the client address outermost. The
    state is ``app.extensions["wsserver"]``; no thread is started (:mod:`wsserver.service`)."""
    settings = service.settings
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_size
    app.config["WSSERVER_SETTINGS"] = settings
    app.extensions[EXTENSION] = service
    errors.init_app(app)
    app.register_blueprint(views.bp)
    app.register_blueprint(serverapi.bp)
    ws.init_app(app)
    console.init_app(app)
    if os.path.realpath(app.static_folder or "") != os.path.realpath(_STATIC):
        _serve_client_scripts(app)
    # POST /notify is answered below Flask (wsserver.notify: why); everything else is Flask's
    app.wsgi_app = NotifyEndpoint(app.wsgi_app, service)  # type: ignore[method-assign]
    if settings.trusted_proxies:
        # outermost: every part of the app (limits, audit, publishers) reads one client address
        proxies = TrustedProxies(settings.trusted_proxies)
        app.wsgi_app = ClientAddress(app.wsgi_app, proxies)  # type: ignore[method-assign]


def _serve_client_scripts(app: Flask) -> None:
    """``/static/wsserver.js`` (and the console's script) for an app whose own static folder
    is not wsserver's: a fixed rule, which wins over the app's ``/static/<path>``."""

    @app.get("/static/<any('wsserver.js', 'console.js'):filename>", endpoint="wsserver_static")
    def wsserver_static(filename: str) -> Any:
        return send_from_directory(_STATIC, filename)


def _routes_under(app: Flask, prefix: str) -> list[str]:
    """The app's URL rules that a mount at ``prefix`` would hide."""
    return sorted(
        rule.rule
        for rule in app.url_map.iter_rules()
        if rule.rule == prefix or rule.rule.startswith(prefix + "/")
    )


def _utf8_size(body: dict[str, Any]) -> int:
    """The size of ``body`` as the UTF-8 JSON a client would POST (lone surrogates counted as
    their three bytes; they are refused after)."""
    return len(json.dumps(body, ensure_ascii=False).encode("utf-8", "surrogatepass"))


def _keyword_settings(overrides: dict[str, Any]) -> dict[str, Any]:
    """Keyword overrides as :func:`load_settings` takes them (typed values). A string given
    for a setting that is not a string (``trusted_proxies="10.0.0.0/8"``, ``api_keys="a,b"``,
    ``queue_size="16"``) is read as its ``WSSERVER_*`` variable would be; a list for a tuple
    becomes a tuple. Unknown names are left for ``load_settings`` to refuse."""
    by_name = {s.name: s for s in SETTINGS}
    typed: dict[str, Any] = {}
    for name, value in overrides.items():
        setting = by_name.get(name)
        if setting is not None and isinstance(value, str) and not isinstance(setting.default, str):
            try:
                value = setting.parse(value)
            except ValueError as exc:
                raise SettingsError(f"{name}= must be {exc}, got {value!r}") from None
        elif setting is not None and isinstance(value, list) and isinstance(setting.default, tuple):
            value = tuple(value)
        typed[name] = value
    return typed


def _prefix(value: str) -> str:
    """``""`` or ``/a/b``: one leading slash, no trailing one; a prefix with a query, a
    fragment or a dot segment is refused (it could never match a request path)."""
    if not isinstance(value, str):
        raise TypeError(f"url_prefix must be a string, got {type(value).__name__}")
    prefix = value.rstrip("/")
    if not prefix:
        return ""
    if not prefix.startswith("/"):
        prefix = "/" + prefix
    segments = prefix.split("/")[1:]
    if any(s in ("", ".", "..") for s in segments) or any(c in prefix for c in "?#% "):
        raise ValueError(f"url_prefix {value!r} is not a URL path like /realtime")
    return prefix


class Realtime:
    """wsserver in a Flask app: ``Realtime(app, url_prefix="/realtime", **settings)``, or
    ``Realtime(**settings)`` then :meth:`init_app`.

    ``settings`` (a complete :class:`Settings`) or keyword overrides of ``WSSERVER_*``
    (``queue_size=16``, ``redis_url=...``), as ``create_app``'s mapping; a string for a
    setting that is not one is read as its variable would be (``api_keys="k1,k2"``).

    One Realtime per app: a second ``init_app`` on an app that already has one raises
    :class:`RuntimeError`.
    One Realtime may serve several apps (an app factory in tests), each with a service of its
    own; :meth:`publish` uses the current app's when called inside one of them, else the
    last app's it was given.
    """

    def __init__(
        self,
        app: Flask | None = None,
        *,
        url_prefix: str = "",
        settings: Settings | None = None,
        **overrides: Any,
    ) -> None:
        if settings is not None and overrides:
            raise TypeError("give settings or keyword overrides, not both")
        self.settings = (
            settings
            if settings is not None
            else load_settings(overrides=_keyword_settings(overrides))
        )
        self.url_prefix = _prefix(url_prefix)
        self.app: Flask | None = None
        self._service: NotificationService | None = None
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask, url_prefix: str | None = None) -> None:
        """Serve wsserver in ``app`` under ``url_prefix`` (default: the constructor's): a new
        service for this app, in ``app.extensions["wsserver"]``, and its routes mounted (or,
        with ``""``, wired into ``app`` itself). Starts no thread."""
        prefix = self.url_prefix if url_prefix is None else _prefix(url_prefix)
        if EXTENSION in app.extensions:
            owner = app.extensions.get(_REALTIME)
            raise RuntimeError(
                f"the Flask app {app.name!r} already serves wsserver"
                + (f" (under {owner.url_prefix!r})" if owner is not None and owner.url_prefix
                   else "")
                + ": one Realtime per app; publish through that one"
            )
        hidden = _routes_under(app, prefix) if prefix else []
        if hidden:
            raise ValueError(
                f"url_prefix {prefix!r} would hide the app's own routes {', '.join(hidden)}: "
                "wsserver answers every path under it; choose another prefix"
            )
        settings = self.settings
        logs.configure(settings.log_level, settings.log_format)
        service = NotificationService(settings)
        if prefix:
            server = Flask("wsserver")
            install(server, service)
            app.wsgi_app = PrefixMount(  # type: ignore[method-assign]
                app.wsgi_app, prefix, server, lambda: _routes_under(app, prefix)
            )
            app.extensions[EXTENSION] = service
        else:
            install(app, service)
        app.extensions[_REALTIME] = self
        self.app = app
        self._service = service
        if url_prefix is not None:
            self.url_prefix = prefix

    @property
    def service(self) -> NotificationService:
        """The service :meth:`publish` uses now (see the class docstring); RuntimeError before
        ``init_app``."""
        if has_app_context() and current_app.extensions.get(_REALTIME) is self:
            service: NotificationService = current_app.extensions[EXTENSION]
            return service
        if self._service is None:
            raise RuntimeError("Realtime.publish before init_app: give the extension an app")
        return self._service

    def publish(
        self,
        event: str,
        message: str = "",
        data: Any = None,
        *,
        room: str | None = None,
        rooms: Iterable[str] | None = None,
        user: str | None = None,
        idempotency_key: str | None = None,
    ) -> str:
        """Publish as ``POST <prefix>/notify`` would, and return the message's id (the first
        room's, with several rooms). ``room``/``rooms`` for their subscribers, ``user`` for
        that user's connections, none of them for everybody; ``idempotency_key``: a repeat
        within ``WSSERVER_HISTORY_TTL`` publishes nothing and returns the first id.

        Raises what ``/notify`` answers with: :class:`~wsserver.exceptions.BadRequest` (400,
        its ``code`` ``invalid_event``, ``invalid_room``, ``invalid_json`` for data JSON cannot
        carry...; 413 ``body_too_large`` over ``WSSERVER_MAX_BODY_SIZE`` as JSON; 422 for a
        reused idempotency key),
        :class:`~wsserver.exceptions.PublishRefused` (503: ``QueueFull``, ``ShuttingDown``,
        ``BrokerUnavailable``, ``BrokerTimedOut``)."""
        body: dict[str, Any] = {"event": event, "message": message, "data": data}
        if room is not None:
            body["room"] = room
        if rooms is not None:
            body["rooms"] = rooms if isinstance(rooms, str) else list(rooms)
        if user is not None:
            body["user"] = user
        if idempotency_key is not None:
            body["idempotency_key"] = idempotency_key
        try:
            # the body /notify would have read: the same checks (NaN, lone surrogates, depth)
            text = json.dumps(body)
        except (TypeError, ValueError, RecursionError) as exc:
            raise BadRequest(
                400, "invalid_json", f"the notification cannot be sent as JSON: {exc}"
            ) from None
        service = self.service
        limit = service.settings.max_body_size
        # the escaped text is never shorter than the UTF-8 body a client would send: measure
        # that one only when it matters
        if len(text) > limit and _utf8_size(body) > limit:
            raise body_too_large(limit)
        notification = parse_notification(parse_notify_body(text.encode("ascii")))
        published = service.publish(notification)
        return next(iter(published.ids.values()))
