"""HTTP errors as JSON: every error the HTTP API answers has a body ``{"error": ..., "code": ...}``.

Why a module: Flask's default error pages are HTML; scripts and REST clients that POST
notifications need a status they can branch on and a reason they can log. One handler turns
every ``HTTPException`` (404, 405, 413, ...) and every unexpected exception into that shape.
"""

from __future__ import annotations

import logging

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException
from werkzeug.routing import WebsocketMismatch

from . import audit

__all__ = ["error_document", "init_app", "json_error"]

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


def json_error(status: int, code: str, reason: str) -> Response:
    response = jsonify(error_document(code, reason))
    response.status_code = status
    return response


def init_app(app: Flask) -> None:
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
        code = _CODES.get(status, "http_error")
        if status != 404:  # an unknown path is a miss, not a refusal
            audit.refused(code, request.remote_addr or "?", detail)
        response = json_error(status, code, reason)
        for name, value in exc.get_headers():
            if name.lower() == "allow":
                response.headers["Allow"] = value
        return response

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        if isinstance(exc, _CLIENT_GONE):
            # the client vanished mid-request (e.g. a TCP reset while simple-websocket writes
            # the 101): nothing failed on our side, and nobody is left to read an answer
            log.debug("client went away mid-request: %s", exc)
            return json_error(400, "client_disconnected", "the client closed the connection")
        log.exception("unhandled error")
        return json_error(500, "internal_error", "internal server error")
