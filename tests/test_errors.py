"""wsserver.errors: every HTTP error the app answers is JSON ``{"error", "code"}``; an
unexpected exception is a 500 logged once with its traceback; a client that vanished
mid-request is not a server fault (no traceback). In-process, through the real app (the
``app``/``client`` fixtures of conftest.py) with test routes added to it.

``tests/test_exceptions.py`` covers ``refusal_answer`` / ``refusal_response`` /
``wsgi_refusal`` for every refusal class; here: the Flask handlers (``init_app``) and
``wsgi_json`` on their own.
"""

from __future__ import annotations

import json
import logging

import pytest
from flask import abort, request
from werkzeug.exceptions import HTTPException

from wsserver import errors, metrics

pytestmark = pytest.mark.timeout(10)


def _refusals(code: str) -> float:
    return metrics.REFUSALS.labels(code)._value.get()


def _add_route(app, rule: str, view, **options) -> None:
    app.add_url_rule(rule, view.__name__, view, **options)


# -- HTTPExceptions ----------------------------------------------------------------------------


def test_a_405_on_a_flask_route_is_json_with_its_allow_header_and_is_audited(client):
    before = _refusals("method_not_allowed")
    response = client.delete("/healthz")
    assert response.status_code == 405 and response.is_json
    assert response.get_json()["code"] == "method_not_allowed"
    assert "GET" in response.headers["Allow"]
    assert _refusals("method_not_allowed") == before + 1


def test_a_413_on_a_flask_route_names_the_limit(make_app, caplog):
    app = make_app(env="development", max_body_size=100)

    def read_body():
        return {"size": len(request.get_data())}

    _add_route(app, "/t/body", read_body, methods=["POST"])
    client = app.test_client()
    assert client.post("/t/body", data=b"x" * 100).get_json() == {"size": 100}
    with caplog.at_level(logging.INFO, logger="wsserver.audit"):
        response = client.post("/t/body", data=b"x" * 101)
    assert response.status_code == 413
    assert response.get_json() == {
        "error": "request body is over the 100-byte limit", "code": "body_too_large",
    }
    lines = [r.getMessage() for r in caplog.records if r.name == "wsserver.audit"]
    assert len(lines) == 1 and "WSSERVER_MAX_BODY_SIZE=100" in lines[0], lines


@pytest.mark.parametrize(
    "status, code", [(400, "bad_request"), (415, "unsupported_media_type"), (418, "http_error")]
)
def test_any_http_exception_is_json_with_its_description(app, status, code):
    def fail():
        abort(status, description=f"described {status}")

    _add_route(app, "/t/abort", fail)
    response = app.test_client().get("/t/abort")
    assert response.status_code == status and response.is_json
    assert response.get_json() == {"error": f"described {status}", "code": code}


def test_a_plain_get_of_the_websocket_endpoint_says_it_needs_an_upgrade(client):
    """werkzeug's ``WebsocketMismatch`` (a 400 whose own text says nothing useful) is
    answered with what the client has to do."""
    response = client.get("/ws")
    assert response.status_code == 400 and response.is_json
    assert "Upgrade: websocket" in response.get_json()["error"]


# -- unexpected exceptions ---------------------------------------------------------------------


def test_an_unexpected_exception_is_a_500_logged_once_without_leaking_its_text(app, caplog):
    def broken():
        raise RuntimeError("secret internals")

    _add_route(app, "/t/broken", broken)
    with caplog.at_level(logging.DEBUG):
        response = app.test_client().get("/t/broken")
    assert response.status_code == 500
    assert response.get_json() == {"error": "internal server error", "code": "internal_error"}
    assert b"secret internals" not in response.data
    logged = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(logged) == 1 and logged[0].name == "wsserver.errors"
    assert logged[0].exc_info and logged[0].exc_info[0] is RuntimeError


@pytest.mark.parametrize("gone", [BrokenPipeError, ConnectionAbortedError, ConnectionResetError])
def test_a_client_gone_mid_request_is_answered_without_a_traceback(app, caplog, gone):
    def vanished():
        raise gone("peer reset")

    _add_route(app, "/t/gone", vanished)
    # the app's logging setup gives wsserver's loggers their own level: lower this one's
    with caplog.at_level(logging.DEBUG), caplog.at_level(logging.DEBUG, "wsserver.errors"):
        response = app.test_client().get("/t/gone")
    assert response.status_code == 400
    assert response.get_json()["code"] == "client_disconnected"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not any(r.exc_info for r in caplog.records), "no traceback"
    debug = [r for r in caplog.records if r.name == "wsserver.errors"]
    assert len(debug) == 1 and "peer reset" in debug[0].getMessage()


def test_other_os_errors_are_server_faults(app, caplog):
    """Only the request's own socket going away is excused: any other ``OSError`` (a full
    disk, a refused connection to a backend) is a 500 with its traceback."""

    def backend_down():
        raise ConnectionRefusedError("backend")

    _add_route(app, "/t/backend", backend_down)
    with caplog.at_level(logging.ERROR):
        response = app.test_client().get("/t/backend")
    assert response.status_code == 500
    assert [r.exc_info[0] for r in caplog.records if r.exc_info] == [ConnectionRefusedError]


# -- the building blocks -----------------------------------------------------------------------


def test_json_error_is_a_response_with_the_error_document(app):
    with app.test_request_context("/"):
        response = errors.json_error(502, "upstream", "the upstream failed")
    assert response.status_code == 502
    assert response.get_json() == errors.error_document("upstream", "the upstream failed")
    assert errors.error_document("c", "r") == {"error": "r", "code": "c"}


def test_wsgi_json_writes_a_compact_body_with_its_length():
    started: list = []
    body = errors.wsgi_json(
        lambda status, headers: started.append((status, headers)),
        503, {"error": "full", "code": "server_full"}, [("Vary", "Origin")],
    )
    (status, headers), = started
    data = b"".join(body)
    assert status == "503 Service Unavailable"
    assert data == b'{"error":"full","code":"server_full"}'
    assert json.loads(data) == {"error": "full", "code": "server_full"}
    assert headers == [("Vary", "Origin"), ("Content-Type", "application/json"),
                       ("Content-Length", str(len(data)))]


def test_wsgi_json_without_a_document_sends_an_empty_body():
    started: list = []
    body = errors.wsgi_json(lambda s, h: started.append((s, h)), 204, None, [])
    assert body == [b""]
    assert started == [("204 No Content", [("Content-Length", "0")])]


def test_the_http_handler_is_registered_for_every_http_exception(app):
    """``init_app`` covers the base class, so an ``HTTPException`` raised anywhere (by
    werkzeug's routing, by ``abort``, by a request body check) gets the JSON shape."""
    handlers = app.error_handler_spec[None][None]
    assert HTTPException in handlers and Exception in handlers


# -- one shape on the wire (the same from /notify, the worker and gunicorn's parser errors:
# e2e/test_errors.py reads them off raw sockets) ------------------------------------------------


@pytest.mark.parametrize("path, method, status, phrase", [
    ("/nowhere", "get", 404, "Not Found"),
    ("/healthz", "delete", 405, "Method Not Allowed"),
    ("/rooms", "get", 401, "Unauthorized"),
])
def test_flask_errors_have_python_reason_phrases_and_compact_ordered_bodies(
        make_app, path, method, status, phrase):
    client = make_app(env="production", api_keys="k" * 32).test_client()
    response = getattr(client, method)(path)
    assert response.status == f"{status} {phrase}"  # not werkzeug's "401 UNAUTHORIZED"
    body = response.get_data()
    assert body.startswith(b'{"error":"') and not body.endswith(b"\n"), body
    assert list(json.loads(body)) == ["error", "code"]


def test_a_success_has_the_same_status_line_style(client):
    assert client.get("/healthz").status == "200 OK"


def test_a_refusals_extra_fields_come_after_error_and_code():
    from wsserver.exceptions import Refusal

    refusal = Refusal(400, "bad_request", "no")
    refusal.fields = {"supported": ["wsserver.v1"], "code": "not this one"}
    _, _, document = errors.refusal_answer(refusal, "127.0.0.1", audited=False)
    assert list(document) == ["error", "code", "supported"] and document["code"] == "bad_request"


def test_http_error_bytes_is_a_whole_closing_answer():
    raw = errors.http_error_bytes(431, "request_head_too_large", 'a "quoted" reason')
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 431 Request Header Fields Too Large"
    assert "Connection: close" in lines and "Content-Type: application/json" in lines
    assert f"Content-Length: {len(body)}" in lines
    assert body == b'{"error":"a \\"quoted\\" reason","code":"request_head_too_large"}'
    assert errors.status_line(599) == "599 Unknown"
