"""The server API for publishers: ``GET /rooms/<room>/history``, ``POST /disconnect`` and
``POST /unsubscribe``.

Why a module of its own: these endpoints act on (or read) what clients have, on behalf of a
publisher, which :mod:`wsserver.views` (health, probes, counts) never does. They take the
same credentials as ``POST /notify`` (:class:`wsserver.proxies.Publishers`) and the same
defences: an allowed ``Origin`` for a browser page, and for a POST a body declared JSON (a
cross-site form cannot send one, so it cannot disconnect anybody). Every refusal is a
:class:`~wsserver.exceptions.Refusal`, answered by :func:`wsserver.errors.refusal_response`.

* History is read on the request's own thread, never the broadcaster's, bounded in time:
  the memory broker's lock is waited for ``WSSERVER_ENQUEUE_TIMEOUT`` + 0.25 s at most,
  Redis by its client's 2 s socket timeout; a failure is 503 ``history_unavailable``.
* A disconnect or an unsubscribe is a control message (:mod:`wsserver.control`): through the
  broker to every worker, acted on by each worker's broadcaster in order with the
  notifications, each worker's count waited for at most ``control.WAIT`` (2 s).
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable

from flask import Blueprint, Response, current_app, request

from .control import DISCONNECT, UNSUBSCRIBE, Control, Outcome
from .errors import refusal_response, status_line
from .exceptions import (
    AccessDenied,
    BadRequest,
    BrokerUnavailable,
    CommandError,
    HistoryUnavailable,
    QueueFull,
    Refusal,
    ShuttingDown,
)

# /notify's own checks, so both refuse the same requests with the same answers
from .notify import check_json, check_origin, read_body
from .protocol import USER_MAX_LENGTH, parse_notify_body, validate_room
from .service import NotificationService

__all__ = ["HISTORY_LIMIT", "HISTORY_MAX_LIMIT", "bp"]

bp = Blueprint("serverapi", __name__)

HISTORY_LIMIT = 100  # messages per history answer when no limit is given
HISTORY_MAX_LIMIT = 1000  # the most one answer holds (a larger limit is a 400)
# a message id as both brokers make them ("<ms>-<n>"); 19 digits stay below 2**64
_MESSAGE_ID = re.compile(r"[0-9]{1,19}-[0-9]{1,19}\Z")
_DIGITS = re.compile(r"[0-9]{1,7}\Z")


def _service() -> NotificationService:
    return current_app.extensions["wsserver"]


def _answer(document: dict[str, Any] | str, status: int = 200) -> Response:
    body = document if isinstance(document, str) else json.dumps(document, separators=(",", ":"))
    return Response(body, status=status_line(status), mimetype="application/json")


def _refusals(view: Callable[..., Response]) -> Callable[..., Response]:
    """Answer any :class:`Refusal` the view raises as the one mapping does (a Refusal that
    reached Flask's handler for unexpected errors would be a 500)."""

    def wrapped(*args: Any, **kwargs: Any) -> Response:
        try:
            return view(*args, **kwargs)
        except Refusal as exc:
            return refusal_response(exc)

    wrapped.__name__ = view.__name__
    wrapped.__doc__ = view.__doc__
    return wrapped


@bp.before_request
def _check_publisher() -> Any:
    """A publisher, as for ``POST /notify``; a browser page's ``Origin`` must be allowed; a
    CORS preflight is answered for allowed origins only."""
    service = _service()
    try:
        check_origin(service.policy, request.environ)
        if request.method != "OPTIONS":
            service.publishers.check(request.environ)
    except AccessDenied as exc:
        return refusal_response(exc)
    return None


# -- GET /rooms/<room>/history ---------------------------------------------------------------


@bp.get("/rooms/<path:room>/history")
@_refusals
def history(room: str) -> Response:
    """``{"room", "messages": [envelopes, oldest first], "complete", "more"}``: without
    ``since`` the newest ``limit`` messages kept; with it the oldest ``limit`` after it,
    ``complete`` False when some after it may be gone (older than what is kept, an id of
    another run, a room with nothing kept), ``more`` True when kept messages follow the last
    one given (ask again with its id)."""
    room = _room(room)
    since = _since(request.args.get("since"))
    limit = _limit(request.args.get("limit"))
    service = _service()
    service.ensure_started()
    wait = service.settings.enqueue_timeout + 0.25
    try:
        page = service.broker.room_history(room, since, limit, wait)
    except BrokerUnavailable as exc:
        raise HistoryUnavailable(exc.cause or exc.detail) from None
    # the envelopes are kept as JSON text: joined, not decoded and encoded again
    head = json.dumps({"room": room}, ensure_ascii=False, separators=(",", ":"))[:-1]
    return _answer(
        f'{head},"messages":[{",".join(page.messages)}],'
        f'"complete":{json.dumps(page.complete)},"more":{json.dumps(page.more)}}}'
    )


def _room(room: str) -> str:
    try:
        return validate_room(room)
    except CommandError as exc:
        raise BadRequest(400, exc.code, exc.reason) from None


def _since(value: str | None) -> str | None:
    if value is None:
        return None
    if not _MESSAGE_ID.match(value):
        raise BadRequest(
            400, "invalid_since", "'since' is a message id as notifications carry it (\"<n>-<n>\")"
        )
    return value


def _limit(value: str | None) -> int:
    if value is None:
        return HISTORY_LIMIT
    if not _DIGITS.match(value) or not 1 <= int(value) <= HISTORY_MAX_LIMIT:
        raise BadRequest(
            400, "invalid_limit", f"'limit' is a whole number from 1 to {HISTORY_MAX_LIMIT}"
        )
    return int(value)


# -- POST /disconnect, POST /unsubscribe -----------------------------------------------------


@bp.post("/disconnect")
@_refusals
def disconnect() -> Response:
    """Close every connection of ``user``, on every worker, with 4002; ``closed`` counts
    them (the workers that answered within 2 s; ``unanswered`` says how many did not)."""
    body = _body()
    outcome = _control(Control(DISCONNECT, _user(body)))
    return _answer({"status": "ok", "closed": outcome.count, **_workers(outcome)})


@bp.post("/unsubscribe")
@_refusals
def unsubscribe() -> Response:
    """Take every connection of ``user`` out of ``room``, on every worker; each is sent an
    ``unsubscribed`` reply; ``unsubscribed`` counts them (as ``closed`` above)."""
    body = _body()
    user = _user(body)
    if body.get("room") is None:
        raise BadRequest(400, "missing_room", "field 'room' is required")
    room = _room(body["room"])
    outcome = _control(Control(UNSUBSCRIBE, user, room))
    return _answer({"status": "ok", "unsubscribed": outcome.count, **_workers(outcome)})


def _body() -> dict[str, Any]:
    environ = request.environ
    check_json(environ.get("CONTENT_TYPE"))
    body = parse_notify_body(read_body(environ, _service().settings.max_body_size))
    if not isinstance(body, dict):
        raise BadRequest(400, "not_an_object", "expected a JSON object")
    return body


def _user(body: dict[str, Any]) -> str:
    user = body.get("user")
    if user is None:
        raise BadRequest(400, "missing_user", "field 'user' is required")
    if not isinstance(user, str) or not 1 <= len(user) <= USER_MAX_LENGTH:
        raise BadRequest(
            400,
            "invalid_user",
            f"field 'user' must be a string of 1 to {USER_MAX_LENGTH} characters",
        )
    return user


def _control(control: Control) -> Outcome:
    service = _service()
    service.ensure_started()
    settings = service.settings
    outcome = service.broker.control(control, settings.enqueue_timeout)
    if outcome is None:
        if not service.hub.accepting:  # shutdown began: the broadcaster takes nothing more
            raise ShuttingDown("SIGTERM, WSSERVER_SHUTDOWN_TIMEOUT")
        raise QueueFull(
            f"WSSERVER_QUEUE_SIZE={settings.queue_size}, "
            f"WSSERVER_ENQUEUE_TIMEOUT={settings.enqueue_timeout:g}"
        )
    return outcome


def _workers(outcome: Outcome) -> dict[str, int]:
    return {"workers": outcome.workers, "unanswered": outcome.unanswered}

