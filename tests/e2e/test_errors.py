"""One error shape on the wire, whoever answers: Flask routes, ``POST /notify``, the worker's
own refusals (408/431/503, before any app code) and gunicorn's parser errors (400/414/431).
Each answer is read off a raw socket: the status line with Python's reason phrase
(``401 Unauthorized``) and the exact JSON bytes ``{"error":"...","code":"..."}``, compact, in
that key order, without a trailing newline."""

from __future__ import annotations

import json
import re
import socket
from http import HTTPStatus

import pytest
from support import serving

pytestmark = pytest.mark.timeout(60)

_SHAPE = re.compile(rb'\{"error":"(?:[^"\\]|\\.)*","code":"[a-z_]+"(?:,.*)?\}\Z', re.S)


@pytest.fixture(scope="module")
def server():
    env = {
        "WSSERVER_ENV": "production",
        "WSSERVER_API_KEYS": "k" * 32,
        "WSSERVER_HANDSHAKE_TIMEOUT": "1",
        "WSSERVER_MAX_REQUEST_HEAD": "16384",
    }
    with serving(env=env) as srv:
        yield srv


def exchange(server, data: bytes, timeout: float = 10.0) -> tuple[str, dict, bytes]:
    """Send ``data`` raw, read until the server closes or the body is complete: (status
    line, headers, body)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as sock:
        if data:
            sock.sendall(data)
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < _length(answer):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return lines[0], {k.lower(): v for k, v in headers.items()}, body


def _length(answer: bytes) -> int:
    found = re.search(rb"(?i)\r\ncontent-length: *(\d+)", answer)
    return int(found.group(1)) if found else 1 << 30


def assert_shape(answer: tuple[str, dict, bytes], status: int, code: str) -> dict:
    line, headers, body = answer
    assert line == f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", answer
    assert headers["content-type"] == "application/json", answer
    assert _SHAPE.match(body), body
    document = json.loads(body)
    assert list(document)[:2] == ["error", "code"] and document["code"] == code, document
    return document


def request(method: str, path: str, *headers: str, body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close", *headers]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@pytest.mark.parametrize(
    "data, status, code",
    [
        (request("GET", "/nowhere"), 404, "not_found"),
        (request("DELETE", "/healthz"), 405, "method_not_allowed"),
        (request("GET", "/rooms"), 401, "missing_api_key"),
        (request("GET", "/ws"), 400, "bad_request"),
    ],
    ids=["flask-404", "flask-405", "flask-401", "flask-400"],
)
def test_flask_routes(server, data, status, code):
    assert_shape(exchange(server, data), status, code)


@pytest.mark.parametrize(
    "headers, status, code",
    [
        (["Content-Type: application/json"], 401, "missing_api_key"),
        (["Content-Type: text/plain", "Authorization: Bearer " + "k" * 32], 415,
         "unsupported_media_type"),
    ],
    ids=["notify-401", "notify-415"],
)
def test_notify(server, headers, status, code):
    answer = exchange(server, request("POST", "/notify", *headers, body=b'{"event":"e"}'))
    assert_shape(answer, status, code)


def test_a_flask_401_matches_the_notify_401_byte_for_byte_in_its_status_line(server):
    flask = exchange(server, request("GET", "/rooms"))
    notify = exchange(server, request("POST", "/notify", "Content-Type: application/json",
                                      body=b"{}"))
    assert flask[0] == notify[0] == "HTTP/1.1 401 Unauthorized"
    assert not flask[2].endswith(b"\n") and not notify[2].endswith(b"\n")


def test_the_worker_408_when_the_request_never_completes(server):
    assert_shape(exchange(server, b"GET / HTTP/1.1\r\nHost: x\r\n"), 408, "request_timeout")


def test_the_worker_431_for_a_head_over_the_limit(server):
    data = b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"a" * 4000 + b"\r\n"
    assert_shape(exchange(server, data * 5 + b"\r\n"), 431, "request_head_too_large")


@pytest.mark.parametrize(
    "data, status, code",
    [
        (b"NOT A REQUEST LINE\r\n\r\n", 400, "bad_request"),
        (b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n", 400, "bad_request"),
        (b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "request_line_too_long"),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n", 431,
         "request_head_too_large"),
        (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(120))
         + b"\r\n", 431, "request_head_too_large"),
    ],
    ids=["bad-request-line", "bad-header", "uri-too-long", "header-too-large", "too-many-headers"],
)
def test_gunicorn_parser_errors_are_json(server, data, status, code):
    document = assert_shape(exchange(server, data), status, code)
    assert "<" not in document["error"]  # no HTML page, whatever gunicorn said


def test_the_log_says_nothing_about_failing_to_send(server):
    exchange(server, b"NOT A REQUEST LINE\r\n\r\n")
    assert "Failed to send error message" not in server.log()
    assert "Traceback" not in server.log()
