"""The HTTP API: ``GET /`` (health) and ``POST /notify`` (publish).

Both keep the original Go service's shapes so its clients keep working; fields are only
added, never renamed. Validation lives in :mod:`wsserver.protocol`; views translate.
"""

from __future__ import annotations

import os
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request

from .errors import json_error
from .protocol import BadRequest, parse_notification, parse_notify_body
from .service import NotificationService

__all__ = ["bp"]

bp = Blueprint("api", __name__)


def _service() -> NotificationService:
    return current_app.extensions["wsserver"]


@bp.get("/")
def health() -> Any:
    service = _service()
    healthy = service.healthy
    body = {
        "status": "ok" if healthy else "unhealthy",
        "service": "ws",
        "clients": service.hub.count(),
        "capacity": service.hub.capacity,
        "queue": service.queue_depth,
        "accepting": service.hub.accepting,
        "pid": os.getpid(),
    }
    return jsonify(body), 200 if healthy else 503


@bp.post("/notify")
def notify() -> Any:
    service = _service()
    try:
        notification = parse_notification(parse_notify_body(request.get_data(cache=False)))
    except BadRequest as exc:
        return json_error(exc.status, exc.code, exc.reason)
    published = service.publish(notification)
    if published is None:
        response: Response = json_error(
            503, "queue_full", "the broadcast queue is full; retry shortly"
        )
        response.headers["Retry-After"] = "1"
        return response
    return jsonify({"status": "ok", "id": published.id, "clients": published.clients})
