"""The HTTP API served by Flask: ``GET /`` (health), probes, ``/metrics`` and ``/rooms``.

``POST /notify`` is not here: it is the hot path and is served below Flask, by
:mod:`wsserver.notify`. Both keep the original Go service's shapes so its clients keep
working; fields are only added, never renamed.
"""

from __future__ import annotations

import os
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request
from flask.blueprints import BlueprintSetupState
from werkzeug.routing import PathConverter

from . import metrics
from .errors import refusal_response
from .exceptions import AccessDenied, BadRequest, CommandError
from .protocol import validate_room
from .service import NotificationService

__all__ = ["bp"]

bp = Blueprint("api", __name__)


class _AnyText(PathConverter):
    """What follows ``/rooms/``, whatever it holds (``/``, newlines): a name that is not a
    room name is the view's 400 ``invalid_room``, not the router's 404."""

    regex = r"[\s\S]+"
    part_isolating = False  # it spans "/" (werkzeug would guess otherwise from the regex)


@bp.record_once
def _converters(state: BlueprintSetupState) -> None:
    state.app.url_map.converters.setdefault("anytext", _AnyText)


_PUBLISHER_ENDPOINTS = {"api.rooms", "api.room"}
_METRICS_ENDPOINT = "api.prometheus_metrics"


def _service() -> NotificationService:
    return current_app.extensions["wsserver"]


@bp.get("/")
def health() -> Any:
    """The original's health shape plus totals. ``status``: ``ok``; ``degraded`` while the
    broker is unreachable (200: the worker lives, but publishing answers 503); ``unhealthy``
    (503) when a delivery thread died.

    Several workers are one service: ``clients``, ``rooms``, ``subscriptions`` and
    ``capacity`` are every worker's added up (fresh within a second; ``scope`` says
    ``cluster``), whichever worker answers; ``worker`` holds this worker's own. With one
    process, or while the broker has no view of the others, both are this worker's
    (``scope``: ``worker``). ``queue``, ``accepting`` and ``pid`` are this worker's."""
    service = _service()
    healthy = service.healthy
    accepting = service.hub.accepting
    status = "ok" if service.broker_ready or not accepting else "degraded"
    mine, cluster = service.census()
    shown = cluster or mine
    body: dict = {
        "status": status if healthy else "unhealthy",
        "service": "ws",
        "scope": "cluster" if cluster is not None else "worker",
        "clients": shown.clients,
        "rooms": len(shown.rooms),
        "subscriptions": shown.subscriptions,
        "capacity": shown.capacity,
        "queue": service.queue_depth,
        "accepting": accepting,
        "pid": os.getpid(),
        "broker": {"kind": service.broker.kind, "connected": service.broker.ready},
        "worker": {
            "pid": os.getpid(),
            "clients": mine.clients,
            "rooms": len(mine.rooms),
            "subscriptions": mine.subscriptions,
            "capacity": mine.capacity,
            "queue": service.queue_depth,
            "accepting": accepting,
        },
    }
    if cluster is not None:
        body["cluster"] = {
            "workers": cluster.workers,
            "clients": cluster.clients,
            "rooms": cluster.rooms,
        }
    return jsonify(body), 200 if healthy else 503


@bp.get("/metrics")
def prometheus_metrics() -> Response:
    """Prometheus exposition (every worker's values added up under several workers)."""
    hub = _service().hub
    metrics.sync_connections(hub.count(), hub.opened)
    return Response(metrics.render(), mimetype=metrics.CONTENT_TYPE_LATEST)


@bp.get("/healthz")
def healthz() -> Any:
    """Liveness, for an orchestrator: restart this worker when 503."""
    healthy = _service().healthy
    return jsonify({"status": "ok" if healthy else "unhealthy"}), 200 if healthy else 503


@bp.get("/readyz")
def readyz() -> Any:
    """Readiness, for a load balancer: send traffic here only when 200. 503 with
    ``reason`` (``server_full``, ``shutting_down``, ``broker_unavailable``, ``unhealthy``)
    while this worker would refuse what it is sent."""
    service = _service()
    reason = service.not_ready()
    body: dict = {
        "status": "ready" if reason is None else "not_ready",
        "accepting": service.hub.accepting,
        "full": service.hub.full,
        "broker": service.broker.ready,
    }
    if reason is not None:
        body["reason"] = reason
    return jsonify(body), 200 if reason is None else 503


def _needs_publisher(endpoint: str | None) -> bool:
    """The room listing (room names can say who is active) always; ``/metrics`` (which counts
    clients, refusals and rooms' traffic) when API keys are set, unless
    ``WSSERVER_METRICS_PUBLIC``: a scraper then sends a key, as ``/rooms`` readers do."""
    if endpoint in _PUBLISHER_ENDPOINTS:
        return True
    settings = _service().settings
    return endpoint == _METRICS_ENDPOINT and bool(settings.api_keys) and not settings.metrics_public


@bp.before_request
def _check_publisher() -> Any:
    """The operator endpoints need a publisher, as ``POST /notify`` does
    (:class:`wsserver.proxies.Publishers`: an API key when keys are configured, else loopback in
    production). A CORS preflight is answered for allowed origins only."""
    service = _service()
    try:
        if request.method == "OPTIONS":
            service.policy.origins.check(request.headers.get("Origin"), request.host, "read this")
        elif _needs_publisher(request.endpoint):
            service.publishers.check(request.environ)
    except AccessDenied as exc:
        return refusal_response(exc)
    return None


@bp.after_app_request
def _cors(response: Response) -> Response:
    """CORS for the HTTP API, for allowed origins only (WSSERVER_ALLOWED_ORIGINS; any origin
    in development). Preflights (OPTIONS) get the methods and headers a publisher needs."""
    if request.endpoint == "websocket":
        return response
    policy = _service().policy
    preflight = request.method == "OPTIONS"
    for name, value in policy.cors_headers(request.headers.get("Origin"), preflight):
        if name == "Vary":
            response.vary.add(value)
        else:
            response.headers[name] = value
    return response


@bp.get("/rooms")
def rooms() -> Any:
    """Rooms with subscribers: ``clients`` across every worker (fresh within a second;
    ``scope`` ``cluster``), ``worker_clients`` on the worker that answered. With one
    process, or no view of the others, both are this worker's (``scope``: ``worker``)."""
    mine, cluster = _service().rooms()
    counts = cluster if cluster is not None else mine
    return jsonify(
        {
            "rooms": [
                {"room": name, "clients": n, "worker_clients": mine.get(name, 0)}
                for name, n in sorted(counts.items())
            ],
            "count": len(counts),
            "scope": "cluster" if cluster is not None else "worker",
        }
    )


@bp.get("/rooms/<anytext:room>")
def room(room: str) -> Any:
    """One room: ``clients`` across every worker (``scope`` as for ``/rooms``), and for a
    presence room (``WSSERVER_PRESENCE_PREFIX``) its members cluster-wide: ``users`` (the
    tokens' ``sub``, sorted) and ``anonymous`` (members without a token). A room nobody is
    in answers 0 and no members; a name that is not a room name is a 400."""
    try:
        validate_room(room)
    except CommandError as exc:
        return refusal_response(BadRequest(400, exc.code, exc.reason))
    return jsonify(_service().room(room))
