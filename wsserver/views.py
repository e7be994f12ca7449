"""The HTTP API served by Flask: ``GET /`` (health), probes, ``/metrics`` and ``/rooms``.

``POST /notify`` is not here: it is the hot path and is served below Flask, by
:mod:`wsserver.notify`. Both keep the original Go service's shapes so its clients keep
working; fields are only added, never renamed.
"""

from __future__ import annotations

import os
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request

from . import metrics
from .errors import refusal_response
from .exceptions import AccessDenied
from .service import NotificationService

__all__ = ["bp"]

bp = Blueprint("api", __name__)


_PUBLISHER_ENDPOINTS = {"api.rooms"}
_METRICS_ENDPOINT = "api.prometheus_metrics"


def _service() -> NotificationService:
    return current_app.extensions["wsserver"]


@bp.get("/")
def health() -> Any:
    """The original's health shape plus totals. ``status``: ``ok``; ``degraded`` while the
    broker is unreachable (200: the worker lives, but publishing answers 503); ``unhealthy``
    (503) when a delivery thread died."""
    service = _service()
    healthy = service.healthy
    clients, rooms, subscriptions = service.hub.totals()
    status = "ok" if service.ready or not service.hub.accepting else "degraded"
    body: dict = {
        "status": status if healthy else "unhealthy",
        "service": "ws",
        "clients": clients,
        "rooms": rooms,
        "subscriptions": subscriptions,
        "capacity": service.hub.capacity,
        "queue": service.queue_depth,
        "accepting": service.hub.accepting,
        "pid": os.getpid(),
        "broker": {"kind": service.broker.kind, "connected": service.broker.ready},
    }
    cluster = service.broker.cluster()
    if cluster is not None:
        body["cluster"] = cluster
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
    """Readiness, for a load balancer: send traffic here only when 200."""
    service = _service()
    ready = service.ready
    body = {
        "status": "ready" if ready else "not_ready",
        "accepting": service.hub.accepting,
        "broker": service.broker.ready,
    }
    return jsonify(body), 200 if ready else 503


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
    """Rooms with subscribers and their counts, read at one instant."""
    counts = _service().rooms()
    return jsonify(
        {
            "rooms": [{"room": name, "clients": n} for name, n in sorted(counts.items())],
            "count": len(counts),
        }
    )
