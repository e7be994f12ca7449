"""The HTTP API: ``GET /`` (health) and ``POST /notify`` (publish).

Both keep the original Go service's shapes so its clients keep working; fields are only
added, never renamed. Validation lives in :mod:`wsserver.protocol`; views translate.
"""

from __future__ import annotations

import os
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request
from werkzeug.exceptions import ClientDisconnected, RequestEntityTooLarge

from . import metrics
from .auth import AccessDenied
from .errors import json_error
from .protocol import BadRequest, parse_notification, parse_notify_body
from .service import BrokerUnavailable, NotificationService, Published

__all__ = ["bp"]

bp = Blueprint("api", __name__)


_PUBLISHER_ENDPOINTS = {"api.notify", "api.rooms"}


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


def _read_body(limit: int) -> bytes:
    """The request body; over ``limit`` bytes raises 413 (``RequestEntityTooLarge``).

    Why not ``request.get_data()`` alone: a Content-Length over the limit is refused by
    Werkzeug before anything is read, but a chunked body (no Content-Length) is read through
    a stream capped at exactly ``limit`` bytes that stops there *without* an error. The body
    was silently cut and parsed: a 400 "not valid JSON" instead of 413, or, when the first
    ``limit`` bytes happen to be a valid object, an oversized notification accepted. gunicorn
    terminates chunked input itself (``wsgi.input_terminated``), so reading one byte past
    the limit from the raw stream tells "exactly the limit" from "over it". A body cut off
    or malformed mid-way is a 400, as Werkzeug's own stream reports it.
    """
    if request.content_length is None and request.environ.get("wsgi.input_terminated"):
        try:
            data = request.input_stream.read(limit + 1)
        except (OSError, ValueError):
            raise ClientDisconnected() from None
        if len(data) > limit:
            raise RequestEntityTooLarge()
        return data
    return request.get_data(cache=False)


@bp.before_request
def _check_publisher() -> Any:
    """Write endpoints, and the room listing (room names can say who is active), need a
    publisher: an API key when keys are configured, else loopback in production."""
    if request.method == "OPTIONS" or request.endpoint not in _PUBLISHER_ENDPOINTS:
        return None
    try:
        _service().policy.check_publisher(request.headers.get("Authorization"), request.remote_addr)
    except AccessDenied as exc:
        response = json_error(exc.status, exc.code, exc.reason)
        if exc.status == 401:
            response.headers["WWW-Authenticate"] = 'Bearer realm="wsserver"'
        return response
    return None


@bp.after_app_request
def _cors(response: Response) -> Response:
    """CORS for the HTTP API, for allowed origins only (WSSERVER_ALLOWED_ORIGINS; any origin
    in development). Preflights (OPTIONS) get the methods and headers a publisher needs."""
    allowed = _service().policy.cors_origin(request.headers.get("Origin"))
    if allowed is not None and request.endpoint != "websocket":
        response.headers["Access-Control-Allow-Origin"] = allowed
        response.vary.add("Origin")
        if request.method == "OPTIONS":
            response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
            response.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type"
            response.headers["Access-Control-Max-Age"] = "600"
    return response


@bp.post("/notify")
def notify() -> Any:
    """Publish one notification (a JSON object) or a batch (a JSON list, answered per item)."""
    service = _service()
    try:
        body = parse_notify_body(_read_body(service.settings.max_body_size))
        if isinstance(body, list):
            return _notify_batch(service, body)
        notification = parse_notification(body)
    except BadRequest as exc:
        return json_error(exc.status, exc.code, exc.reason)
    try:
        published = service.publish(notification)
    except BrokerUnavailable:
        return _broker_down()
    if published is None:
        return _queue_full()
    return jsonify(_accepted(published))


def _notify_batch(service: NotificationService, items: list) -> Any:
    if not items:
        raise BadRequest(400, "empty_batch", "a batch needs at least one notification")
    if len(items) > service.settings.max_batch:
        raise BadRequest(
            413, "batch_too_large", f"at most {service.settings.max_batch} notifications per batch"
        )
    results: list[dict] = []
    for item in items:
        try:
            published = service.publish(parse_notification(item))
        except BadRequest as exc:
            results.append({"status": "error", "code": exc.code, "error": exc.reason})
            continue
        except BrokerUnavailable:
            results.append(
                {
                    "status": "error",
                    "code": "broker_unavailable",
                    "error": "the broker is unreachable",
                }
            )
            continue
        if published is None:
            results.append(
                {"status": "error", "code": "queue_full", "error": "the broadcast queue is full"}
            )
        else:
            results.append(_accepted(published))
    accepted = sum(1 for r in results if r["status"] == "ok")
    if accepted == 0 and all(r["code"] == "queue_full" for r in results):
        return _queue_full()
    if accepted == 0 and all(r["code"] == "broker_unavailable" for r in results):
        return _broker_down()
    status = "ok" if accepted == len(results) else ("error" if not accepted else "partial")
    return jsonify({"status": status, "accepted": accepted, "results": results})


def _accepted(published: Published) -> dict:
    """One accepted notification: its id (the first target's), per-room ids, deliveries."""
    ids = published.ids
    body: dict = {"status": "ok", "id": next(iter(ids.values())), "clients": published.clients}
    if None not in ids:
        body["ids"] = ids
    return body


def _queue_full() -> Response:
    response = json_error(503, "queue_full", "the broadcast queue is full; retry shortly")
    response.headers["Retry-After"] = "1"
    return response


def _broker_down() -> Response:
    response = json_error(
        503, "broker_unavailable", "the message broker is unreachable; nothing was published"
    )
    response.headers["Retry-After"] = "1"
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
