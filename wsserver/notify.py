"""``/notify``, the publish endpoint, served as plain WSGI in front of the Flask app.

Why not a Flask route: publishing is the hot HTTP path (scripts and backends POST in loops,
and the fan-out benchmark is bounded by how fast ``POST /notify`` answers). Under gunicorn a
Flask request costs ~300 µs of worker CPU more than the same work done on the WSGI environ:
request context, URL matching, hooks, the response object. Measured with 8 keep-alive
posters and no clients (``docs/performance.md``): 1.35 ms of worker CPU per POST through
Flask, 1.03 ms here. That CPU is shared with the fan-out (one GIL), so it is throughput.

Everything about ``/notify`` lives here: method routing (POST; OPTIONS for CORS preflights;
anything else 405 with ``Allow``), the publisher check, the body limit (413, chunked bodies
included), JSON errors in the same shape as the Flask app's
(:func:`wsserver.errors.error_document`), CORS headers from the same policy, single and batch
publishing. Every other path goes to
Flask untouched.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from http import HTTPStatus
from typing import Any, Callable

from . import audit
from .auth import AccessDenied
from .errors import error_document
from .protocol import BadRequest, parse_notification, parse_notify_body
from .service import BrokerUnavailable, NotificationService, Published

__all__ = ["METHODS", "PATH", "NotifyEndpoint"]

log = logging.getLogger(__name__)

PATH = "/notify"
METHODS = ("POST", "OPTIONS")
_ALLOW = ", ".join(METHODS)

WSGIApp = Callable[[dict, Callable], Iterable[bytes]]
Headers = list  # [(name, value), ...]

class _Answer(Exception):
    """Ends a request early with an error answer (raised from helpers, caught once, where it
    is also reported to :mod:`wsserver.audit`: the success path never pays for that).
    ``detail`` names the setting behind the refusal, for the audit line."""

    def __init__(
        self,
        status: int,
        code: str,
        reason: str,
        headers: Headers | None = None,
        detail: str = "",
    ):
        super().__init__(reason)
        self.status, self.code, self.reason = status, code, reason
        self.headers = headers or []
        self.detail = detail


class NotifyEndpoint:
    """WSGI middleware: answers ``/notify`` itself, hands every other request to ``app``.

    Thread-safety: no state of its own; each request touches only the service, whose
    ``publish`` is thread-safe.
    """

    def __init__(self, app: WSGIApp, service: NotificationService) -> None:
        self._app = app
        self._service = service

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != PATH:
            return self._app(environ, start_response)
        method = environ.get("REQUEST_METHOD")
        headers = self._service.policy.cors_headers(
            environ.get("HTTP_ORIGIN"), preflight=method == "OPTIONS"
        )
        try:
            if method == "POST":
                status, document = self._post(environ)
            elif method == "OPTIONS":
                headers.append(("Allow", _ALLOW))
                return _respond(start_response, 200, None, headers)
            else:
                headers.append(("Allow", _ALLOW))
                raise _Answer(
                    405, "method_not_allowed", f"method {method} is not allowed here; use POST"
                )
        except _Answer as answer:
            audit.refused(answer.code, environ.get("REMOTE_ADDR") or "?", answer.detail)
            headers.extend(answer.headers)
            status, document = answer.status, error_document(answer.code, answer.reason)
        except Exception:  # a bug must still get a JSON answer, and a log line
            log.exception("unhandled error in POST /notify")
            status, document = 500, error_document("internal_error", "internal server error")
        return _respond(start_response, status, document, headers)

    def _post(self, environ: dict) -> tuple[int, dict]:
        service = self._service
        try:
            service.policy.check_publisher(
                environ.get("HTTP_AUTHORIZATION"), environ.get("REMOTE_ADDR")
            )
        except AccessDenied as exc:
            raise _Answer(exc.status, exc.code, exc.reason, exc.headers, exc.detail) from None
        try:
            body = parse_notify_body(_read_body(environ, service.settings.max_body_size))
            if isinstance(body, list):
                return _publish_batch(service, body)
            notification = parse_notification(body)
        except BadRequest as exc:
            raise _Answer(exc.status, exc.code, exc.reason, detail=exc.detail) from None
        try:
            published = service.publish(notification)
        except BrokerUnavailable:
            raise _broker_down() from None
        if published is None:
            raise _queue_full(service)
        return 200, _accepted(published)


def _respond(
    start_response: Callable, status: int, document: dict | None, headers: Headers
) -> list[bytes]:
    body = b"" if document is None else json.dumps(document, separators=(",", ":")).encode()
    if document is not None:
        headers.append(("Content-Type", "application/json"))
    headers.append(("Content-Length", str(len(body))))
    start_response(f"{status} {HTTPStatus(status).phrase}", headers)
    return [body]


def _read_body(environ: dict, limit: int) -> bytes:
    """The request body; over ``limit`` bytes is a 413.

    A Content-Length over the limit is refused before anything is read. A chunked body (no
    Content-Length; gunicorn de-chunks it and sets ``wsgi.input_terminated``) is read up to
    one byte past the limit, which tells "exactly the limit" from "over it": a body is never
    silently cut and then parsed. A body the HTTP layer could not read (cut off mid-way, a
    malformed chunk) is a 400 ``bad_request``, as docs/openapi.yaml says.
    """
    stream = environ["wsgi.input"]
    length = environ.get("CONTENT_LENGTH")
    if length:
        try:
            size = int(length)
        except ValueError:
            raise _Answer(400, "bad_request", "Content-Length is not a number") from None
        if size > limit:
            raise _too_large(limit)
        want = size
    elif environ.get("wsgi.input_terminated"):
        want = limit + 1
    else:
        return b""
    try:
        data = stream.read(want)
    except Exception as exc:  # noqa: BLE001 - a reset, a malformed chunk: the body's fault
        reason = f"the request body could not be read ({exc.__class__.__name__})"
        raise _Answer(400, "bad_request", reason) from None
    if len(data) > limit:
        raise _too_large(limit)
    if length and len(data) < want:
        raise _Answer(400, "bad_request", "the request body ended before Content-Length")
    return data


def _too_large(limit: int) -> _Answer:
    return _Answer(
        413,
        "body_too_large",
        f"request body is over the {limit}-byte limit",
        detail=f"WSSERVER_MAX_BODY_SIZE={limit}",
    )


def _publish_batch(service: NotificationService, items: list) -> tuple[int, dict]:
    """A JSON list: each item published on its own and answered in ``results``."""
    if not items:
        raise _Answer(400, "empty_batch", "a batch needs at least one notification")
    if len(items) > service.settings.max_batch:
        limit = service.settings.max_batch
        raise _Answer(
            413,
            "batch_too_large",
            f"at most {limit} notifications per batch",
            detail=f"WSSERVER_MAX_BATCH={limit}",
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
        raise _queue_full(service)
    if accepted == 0 and all(r["code"] == "broker_unavailable" for r in results):
        raise _broker_down()
    status = "ok" if accepted == len(results) else ("error" if not accepted else "partial")
    return 200, {"status": status, "accepted": accepted, "results": results}


def _accepted(published: Published) -> dict[str, Any]:
    """One accepted notification: its id (the first target's), per-room ids, deliveries."""
    ids = published.ids
    body: dict[str, Any] = {
        "status": "ok",
        "id": next(iter(ids.values())),
        "clients": published.clients,
    }
    if None not in ids:
        body["ids"] = ids
    return body


def _queue_full(service: NotificationService) -> _Answer:
    settings = service.settings
    return _Answer(
        503,
        "queue_full",
        "the broadcast queue is full; retry shortly",
        [("Retry-After", "1")],
        f"WSSERVER_QUEUE_SIZE={settings.queue_size}, "
        f"WSSERVER_ENQUEUE_TIMEOUT={settings.enqueue_timeout:g}",
    )


def _broker_down() -> _Answer:
    return _Answer(
        503,
        "broker_unavailable",
        "the message broker is unreachable; nothing was published",
        [("Retry-After", "1")],
        "WSSERVER_REDIS_URL",
    )
