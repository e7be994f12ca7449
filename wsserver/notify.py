"""``/notify``, the publish endpoint, served as plain WSGI in front of the Flask app.

Why not a Flask route: publishing is the hot HTTP path (scripts and backends POST in loops,
and the fan-out benchmark is bounded by how fast ``POST /notify`` answers). Under gunicorn a
Flask request costs measurably more worker CPU than the same work done on the WSGI environ
(request context, URL matching, hooks, the response object; the figures are in
docs/design.md, "Publishing over HTTP", and docs/performance.md). That CPU is shared with the
fan-out (one GIL), so it is throughput.

Everything about ``/notify`` lives here: method routing (POST; OPTIONS for CORS preflights;
anything else 405 with ``Allow``), the publisher check, the body limit (413, chunked bodies
included), CORS headers from the same policy, single and batch publishing. Every refusal is
a :class:`~wsserver.exceptions.Refusal` answered by :func:`wsserver.errors.wsgi_refusal`, the
WSGI side of the mapping the Flask app uses, so the bodies, headers and audit lines are the
same; a batch item refused for the same reason carries the same code and text. Every other
path goes to Flask untouched.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from functools import partial
from typing import Any, Callable

from flask import Flask
from werkzeug.http import parse_options_header

from .auth import AccessPolicy
from .brokers import Deferred
from .codes import ErrorCode
from .errors import error_document, wsgi_json, wsgi_refusal
from .exceptions import BadRequest, PublishRefused, Refusal
from .protocol import idempotency_key, parse_notification, parse_notify_body
from .proxies import ClientAddress
from .service import NotificationService, Published, WouldBlock

__all__ = [
    "METHODS",
    "NOWAIT",
    "PATH",
    "TOGETHER_MAX_BYTES",
    "NotifyEndpoint",
    "body_too_large",
    "check_json",
    "check_origin",
    "nowait_app",
    "nowait_pipeline",
    "read_body",
]

log = logging.getLogger(__name__)

PATH = "/notify"
JSON = "application/json"  # the one Content-Type a notification may be posted with
METHODS = ("POST", "OPTIONS")
_ALLOW = ", ".join(METHODS)

# a batch body up to this size may be published in one broker call; a bigger one goes item by
# item, so that its envelopes and frames are not all alive at once (one call held every
# item's envelope and frame together: 30 batches of 1,000 x 20 KB then left the worker's RSS
# 200 MB up after their history expired, tests/e2e/test_brokers.py)
TOGETHER_MAX_BYTES = 256 * 1024

#: environ key: True when the server calls the endpoint on a thread that must never wait (the
#: worker's main thread, :mod:`wsserver.worker`). The publish is then tried without waiting
#: and :class:`~wsserver.brokers.WouldBlock` escapes the endpoint, nothing published, where it
#: would wait (a busy lock, a full queue, Redis without its pipeline, a batch that goes item by
#: item); the server then serves the request again where waiting is allowed. With Redis,
#: :class:`~wsserver.brokers.Deferred` escapes instead: the server sends its command and
#: calls its ``finish`` with the reply for the answer.
NOWAIT = "wsserver.nowait"

WSGIApp = Callable[[dict, Callable], Iterable[bytes]]
Headers = list  # [(name, value), ...]


class NotifyEndpoint:
    """WSGI middleware: answers ``/notify`` itself, hands every other request to ``app``.

    Thread-safety: no state of its own; each request touches only the service, whose
    ``publish`` is thread-safe.
    """

    def __init__(self, app: WSGIApp, service: NotificationService) -> None:
        self._app = app
        self._service = service

    @property
    def service(self) -> NotificationService:
        return self._service

    @property
    def publishes_nowait(self) -> bool:
        """Whether a :data:`NOWAIT` request can be published here, rather than always
        raise :class:`WouldBlock`."""
        return self._service.publishes_nowait

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != PATH:
            return self._app(environ, start_response)
        method = environ.get("REQUEST_METHOD")
        policy = self._service.policy
        headers = policy.cors_headers(environ.get("HTTP_ORIGIN"), preflight=method == "OPTIONS")
        return self._answer(environ, start_response, headers, partial(self._dispatch, environ))

    def _dispatch(self, environ: dict) -> tuple[int, dict | None, Headers]:
        """(status, document, headers to add); raises a :class:`Refusal`."""
        method = environ.get("REQUEST_METHOD")
        if method == "POST":
            try:
                status, document = self._post(environ)
            except Deferred as deferred:
                raise deferred.wrap(lambda finish, reply: (*finish(reply), [])) from None
            return status, document, []
        if method == "OPTIONS":
            # a preflight is answered for allowed origins only
            check_origin(self._service.policy, environ)
            return 200, None, [("Allow", _ALLOW)]
        raise BadRequest(
            405,
            ErrorCode.METHOD_NOT_ALLOWED,
            f"method {method} is not allowed here; use POST",
            headers=[("Allow", _ALLOW)],
        )

    def _answer(
        self,
        environ: dict,
        start_response: Callable,
        headers: Headers,
        produce: Callable[[], tuple[int, dict | None, Headers]],
    ) -> Iterable[bytes]:
        """The WSGI answer to what ``produce`` returns or raises. A :class:`Deferred` publish
        (Redis, on the worker's main thread) goes on with this answer as its ``finish``."""
        try:
            status, document, more = produce()
        except Refusal as exc:
            return wsgi_refusal(exc, environ, start_response, headers)
        except WouldBlock:
            raise  # not an answer: the server serves the request again (NOWAIT)
        except Deferred as deferred:  # not an answer yet: the server sends, then finishes
            raise deferred.wrap(
                lambda finish, reply: self._answer(
                    environ, start_response, headers, partial(finish, reply)
                )
            ) from None
        except Exception:  # a bug must still get a JSON answer, and a log line
            log.exception("unhandled error in POST /notify")
            status = 500
            document = error_document(ErrorCode.INTERNAL_ERROR, "internal server error")
            more = []
        return wsgi_json(start_response, status, document, headers + more)

    def _post(self, environ: dict) -> tuple[int, dict]:
        """Raises a :class:`Refusal` (AccessDenied, BadRequest, PublishRefused) for a refusal.

        Before the body: the Origin (a browser page may publish only from an allowed origin),
        the publisher (:class:`wsserver.proxies.Publishers`), then the body's declared type.
        A cross-site form or ``fetch`` without a preflight can only send a "simple" request,
        whose Content-Type is never ``application/json``: the 415 is what keeps such a page
        from publishing even where its Origin would not be checked (no Origin sent)."""
        service = self._service
        wait = not environ.get(NOWAIT)
        if not wait and not service.publishes_nowait:
            raise WouldBlock(service.broker.kind)  # before any check: none is done twice
        check_origin(service.policy, environ)
        service.publishers.check(environ)
        check_json(environ.get("CONTENT_TYPE"))
        header = environ.get("HTTP_IDEMPOTENCY_KEY")
        key = None if header is None else idempotency_key(header)
        raw = read_body(environ, service.settings.max_body_size)
        body = parse_notify_body(raw)
        if isinstance(body, list):
            return _publish_batch(service, body, key, len(raw), wait)
        try:
            return 200, _accepted(service.publish(parse_notification(body), key, wait))
        except Deferred as deferred:
            raise deferred.wrap(lambda finish, reply: (200, _accepted(finish(reply)))) from None


def nowait_app(app: Any) -> WSGIApp | None:
    """The WSGI callable a server may call with :data:`NOWAIT` for ``POST /notify``: the
    Flask app's ``wsgi_app`` when everything between it and the :class:`NotifyEndpoint` is
    wsserver's own (nothing, or :class:`~wsserver.proxies.ClientAddress`) and the broker
    can publish without waiting (memory; Redis through its pipeline, see
    :func:`nowait_pipeline`). None otherwise: a user's middleware could not tell
    :class:`WouldBlock` or :class:`Deferred` from a bug, and would see a request served
    twice."""
    endpoint = _own_endpoint(app)
    if endpoint is None or not endpoint.publishes_nowait:
        return None
    return app.wsgi_app  # type: ignore[no-any-return]


def nowait_pipeline(app: Any) -> Any | None:
    """The broker's :class:`~wsserver.brokers.rediswire.Pipeline` that the server calling
    :func:`nowait_app` must drive (a :class:`Deferred` publish is sent on it), or None."""
    endpoint = _own_endpoint(app)
    if endpoint is None or not endpoint.publishes_nowait:
        return None
    return getattr(endpoint.service.broker, "pipeline", None)


def _own_endpoint(app: Any) -> NotifyEndpoint | None:
    if not isinstance(app, Flask) or type(app).__call__ is not Flask.__call__:
        return None
    chain = app.wsgi_app
    endpoint = chain._app if isinstance(chain, ClientAddress) else chain
    return endpoint if isinstance(endpoint, NotifyEndpoint) else None


def check_origin(policy: AccessPolicy, environ: dict) -> None:
    """403 for a browser page whose origin may not publish (no Origin: not a browser). The
    server API (:mod:`wsserver.serverapi`) refuses the same way."""
    policy.origins.check(environ.get("HTTP_ORIGIN"), environ.get("HTTP_HOST"), "publish")


def check_json(content_type: str | None) -> None:
    """415 unless the body is declared JSON: ``application/json``, parameters (``charset``)
    allowed; parsed by werkzeug, as Flask parses it."""
    mimetype, _ = parse_options_header(content_type or "")
    if mimetype.lower() != JSON:
        raise BadRequest(
            415,
            ErrorCode.UNSUPPORTED_MEDIA_TYPE,
            f"send the notification as JSON, with Content-Type: {JSON}",
            "Content-Type",
            headers=[("Accept-Post", JSON)],
        )


def read_body(environ: dict, limit: int) -> bytes:
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
            raise BadRequest(400, ErrorCode.BAD_REQUEST, "Content-Length is not a number") from None
        if size > limit:
            raise body_too_large(limit)
        want = size
    elif environ.get("wsgi.input_terminated"):
        want = limit + 1
    else:
        return b""
    try:
        data = stream.read(want)
    except Exception as exc:  # noqa: BLE001 - a reset, a malformed chunk: the body's fault
        reason = f"the request body could not be read ({exc.__class__.__name__})"
        raise BadRequest(400, ErrorCode.BAD_REQUEST, reason) from None
    if len(data) > limit:
        raise body_too_large(limit)
    if length and len(data) < want:
        raise BadRequest(
            400, ErrorCode.BAD_REQUEST, "the request body ended before Content-Length"
        )
    return data


def body_too_large(limit: int) -> BadRequest:
    """The 413 for a notification over ``WSSERVER_MAX_BODY_SIZE`` (``Realtime.publish`` raises
    it too, for what would be a body over the limit)."""
    return BadRequest(
        413,
        ErrorCode.BODY_TOO_LARGE,
        f"request body is over the {limit}-byte limit",
        f"WSSERVER_MAX_BODY_SIZE={limit}",
    )


def _publish_batch(
    service: NotificationService,
    items: list,
    key: str | None = None,
    size: int = 0,
    wait: bool = True,
) -> tuple[int, dict]:
    """A JSON list: each item published on its own and answered in ``results``, an item
    refused with the same code and text as a single notification would be. A batch of which
    nothing was published, every item for the same server-side reason (a full queue, the
    broker down), is answered as that refusal (503).

    Idempotency is per item: an item's ``idempotency_key`` field, else the request's
    ``Idempotency-Key`` with ``/<index>`` appended; so a retried batch publishes exactly
    the items that were not published before, and answers the others' first ids.

    ``wait`` False (:data:`NOWAIT`): only a batch published in one call is tried; one that
    goes item by item raises :class:`WouldBlock` before publishing any (a later item could
    not be undone if it then had to wait)."""
    if not items:
        raise BadRequest(400, ErrorCode.EMPTY_BATCH, "a batch needs at least one notification")
    if len(items) > service.settings.max_batch:
        limit = service.settings.max_batch
        raise BadRequest(
            413,
            ErrorCode.BATCH_TOO_LARGE,
            f"at most {limit} notifications per batch",
            f"WSSERVER_MAX_BATCH={limit}",
        )
    if key is None and size <= TOGETHER_MAX_BYTES:
        together = _publish_together(service, items, wait)
        if together is not None:
            return 200, together
    if not wait:
        raise WouldBlock("a batch published item by item")
    results: list[dict] = []
    refusals: list[PublishRefused] = []
    for index, item in enumerate(items):
        try:
            item_key = None if key is None else f"{key}/{index}"
            results.append(_accepted(service.publish(parse_notification(item), item_key)))
        except (BadRequest, PublishRefused) as exc:
            if isinstance(exc, PublishRefused):
                refusals.append(exc)
            results.append({"status": "error", "code": str(exc.code), "error": exc.reason})
    if refusals and len(refusals) == len(items) and len({r.code for r in refusals}) == 1:
        raise refusals[0]
    accepted = sum(1 for r in results if r["status"] == "ok")
    status = "ok" if accepted == len(results) else ("error" if not accepted else "partial")
    return 200, {"status": status, "accepted": accepted, "results": results}


def _publish_together(
    service: NotificationService, items: list, wait: bool = True
) -> dict | None:
    """A batch whose items are all valid and none has an idempotency key, published in one
    broker call (:meth:`NotificationService.publish_many`): the answer, or None when the
    batch must go item by item (an invalid item is answered in its place; a key makes each
    item its own atomic step). A refusal refuses every item for the same reason, which is
    answered as that refusal (503), as when each item was refused on its own."""
    notifications = []
    for item in items:
        try:
            notification = parse_notification(item)
        except BadRequest:
            return None
        if notification.idempotency_key is not None:
            return None
        notifications.append(notification)
    results = [_accepted(published) for published in service.publish_many(notifications, wait)]
    return {"status": "ok", "accepted": len(results), "results": results}


def _accepted(published: Published) -> dict[str, Any]:
    """One accepted notification: its id (the first target's), per-room ids, and how many
    clients its audience has across every worker (``clients``) and on this one."""
    ids = published.ids
    body: dict[str, Any] = {
        "status": "ok",
        "id": next(iter(ids.values())),
        "clients": published.clients,
        "worker_clients": published.worker_clients,
    }
    if None not in ids:
        body["ids"] = ids
    if published.repeated:
        body["repeated"] = True
    return body
