"""HTTP errors as JSON: every error the HTTP API answers has a body ``{"error": ..., "code": ...}``.

Why a module: Flask's default error pages are HTML; scripts and REST clients that POST
notifications need a status they can branch on and a reason they can log. One handler turns
every ``HTTPException`` (404, 405, 413, ...) and every unexpected exception into that shape.

:func:`refusal_answer` is the one place a :class:`~wsserver.exceptions.Refusal` becomes an
answer: status, headers (``Retry-After``, ``WWW-Authenticate``, ``Sec-WebSocket-Version``,
``Allow``), the JSON body, and the :func:`wsserver.audit.refused` line. Flask code (the ``/ws``
hook, the views, the handler here) answers with :func:`refusal_response`; plain WSGI code
(``POST /notify``, served below Flask) with :func:`wsgi_refusal`. Both call it.

One shape on the wire, whoever answers (Flask routes, ``/notify``, the worker's own 408/431/503
and gunicorn's parser errors, see :func:`http_error_bytes`): the status line with Python's
reason phrase (``401 Unauthorized``, not werkzeug's ``401 UNAUTHORIZED``), and a compact JSON
body ``{"error":...,"code":...}`` in that order, a refusal's extra fields after them, no
trailing newline (:func:`encode_document`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException
from werkzeug.routing import WebsocketMismatch

from . import audit
from .exceptions import Refusal

__all__ = [
    "encode_document",
    "error_document",
    "http_error_bytes",
    "init_app",
    "json_error",
    "refusal_answer",
    "refusal_response",
    "status_line",
    "wsgi_json",
    "wsgi_refusal",
]

Header = tuple[str, str]

log = logging.getLogger(__name__)

_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    415: "unsupported_media_type",
    500: "internal_error",
    503: "unavailable",
}


# Errors of the request's own socket: a client that resets or closes while we read or write
# it is not a server fault, so it must not log a traceback at ERROR level (one per client
# that vanishes during the WebSocket handshake buries real errors in the log).
_CLIENT_GONE = (BrokenPipeError, ConnectionAbortedError, ConnectionResetError)


def error_document(code: str, reason: str) -> dict[str, str]:
    """The body of every error answer: ``reason`` for people, ``code`` for programs."""
    return {"error": reason, "code": code}


def encode_document(document: dict[str, Any]) -> bytes:
    """The bytes of a JSON error body: compact, keys in the order given, no newline."""
    return _encode_compact(document).encode()


# json.dumps(document, separators=(",", ":")), its encoder made once (it keeps no state
# between calls: threads share it)
_encode_compact = json.JSONEncoder(separators=(",", ":")).encode


def status_line(status: int) -> str:
    """``"401 Unauthorized"``: the status with Python's reason phrase (``http.HTTPStatus``),
    the style of every answer wsserver or its worker writes."""
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return f"{status} Unknown"


def http_error_bytes(status: int, code: str, reason: str) -> bytes:
    """A whole HTTP/1.1 error answer that closes the connection, for the worker's answers
    written before any WSGI app runs (a pending request cut, a parser error)."""
    body = encode_document(error_document(code, reason))
    head = (
        f"HTTP/1.1 {status_line(status)}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body


def _flask_json(status: int, document: dict[str, Any]) -> Response:
    return Response(
        encode_document(document), status=status_line(status), mimetype="application/json"
    )


def json_error(status: int, code: str, reason: str) -> Response:
    """An error answer that is not a refusal (a server fault, a client gone)."""
    return _flask_json(status, error_document(code, reason))


def refusal_answer(
    exc: Refusal, remote: str | None, audited: bool = True
) -> tuple[int, list[Header], dict[str, Any]]:
    """Any refusal as (status, headers, JSON body), reported to :mod:`wsserver.audit` unless
    ``audited`` is False (a 404 is a miss, not a refusal). The one mapping: every answer to a
    refused request, in Flask or plain WSGI, is built here."""
    if audited:
        audit.refused(str(exc.code), remote or "?", exc.detail)
    document = error_document(str(exc.code), exc.reason)
    document.update((k, v) for k, v in exc.fields.items() if k not in document)
    return exc.status, exc.headers, document


def refusal_response(exc: Refusal, audited: bool = True) -> Response:
    """:func:`refusal_answer` as a Flask response, for the request being served."""
    status, headers, document = refusal_answer(exc, request.remote_addr, audited)
    response = _flask_json(status, document)
    response.headers.extend(headers)
    return response


def wsgi_refusal(
    exc: Refusal, environ: dict, start_response: Callable, headers: list[Header]
) -> list[bytes]:
    """:func:`refusal_answer` as a plain WSGI answer; ``headers`` (CORS, say) go first."""
    status, implied, document = refusal_answer(exc, environ.get("REMOTE_ADDR"))
    return wsgi_json(start_response, status, document, headers + implied)


def wsgi_json(
    start_response: Callable, status: int, document: dict | None, headers: list[Header]
) -> list[bytes]:
    """A WSGI answer with a compact JSON body (none when ``document`` is None)."""
    body = b"" if document is None else encode_document(document)
    if document is not None:
        headers.append(("Content-Type", "application/json"))
    headers.append(("Content-Length", str(len(body))))
    start_response(status_line(status), headers)
    return [body]


def init_app(app: Flask) -> None:
    @app.after_request
    def _status_phrase(response: Response) -> Response:
        # werkzeug writes "401 UNAUTHORIZED"; every other answer says "401 Unauthorized"
        response.status = status_line(response.status_code)
        return response

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        reason = exc.description or exc.name
        detail = ""
        if isinstance(exc, WebsocketMismatch):
            reason = (
                "this endpoint takes a WebSocket upgrade (Upgrade: websocket), not a plain request"
            )
        elif status == 413:
            limit = app.config.get("MAX_CONTENT_LENGTH")
            reason = f"request body is over the {limit}-byte limit"
            detail = f"WSSERVER_MAX_BODY_SIZE={limit}"
        allow = [(n, v) for n, v in exc.get_headers() if n.lower() == "allow"]
        refusal = Refusal(status, _CODES.get(status, "http_error"), reason, detail, allow)
        # an unknown path is a miss, not a refusal
        return refusal_response(refusal, audited=status != 404)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        if isinstance(exc, _CLIENT_GONE):
            # the client vanished mid-request (e.g. a TCP reset while simple-websocket writes
            # the 101): nothing failed on our side, and nobody is left to read an answer
            log.debug("client went away mid-request: %s", exc)
            return json_error(400, "client_disconnected", "the client closed the connection")
        log.exception("unhandled error")
        return json_error(500, "internal_error", "internal server error")
