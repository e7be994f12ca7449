"""wsserver.fastpath: which requests the worker may serve without gunicorn's parser (only
plain, complete, unambiguous ``POST /notify``), the environ it builds, the answer it writes.
Pure functions: no server. A hostile request must never be served here differently from how
gunicorn would read it, so every doubtful shape must fall back (None)."""

from __future__ import annotations

import email.utils
import time

import pytest

from wsserver.fastpath import (
    GUNICORN_ONLY,
    environ_for,
    http_date,
    parse_notify_request,
    response_bytes,
)
from wsserver.intake import request_end

BODY = b'{"event":"x","data":{"n":1}}'


def request(head_fields: bytes, body: bytes = BODY, line: bytes = b"POST /notify HTTP/1.1"):
    return line + b"\r\n" + head_fields + b"\r\n" + body


def parse(data: bytes, fields: int = 100, size: int = 8190):
    found = request_end(data, 65536)
    if found is None:
        return None
    return parse_notify_request(data, found[0], found[1], fields, size)


PLAIN = b"Host: 127.0.0.1:8000\r\nContent-Type: application/json\r\nContent-Length: %d\r\n" % len(
    BODY
)


def test_a_plain_post_is_parsed_as_gunicorn_lists_it():
    got = parse(request(PLAIN + b"User-Agent:  curl/8  \r\nIdempotency-Key: k-1\r\n"))
    assert got is not None
    assert got.body == BODY
    assert not got.close
    assert got.headers == [
        ("HOST", "127.0.0.1:8000"),
        ("CONTENT-TYPE", "application/json"),
        ("CONTENT-LENGTH", str(len(BODY))),
        ("USER-AGENT", "curl/8"),
        ("IDEMPOTENCY-KEY", "k-1"),
    ]


def test_connection_close_and_keep_alive():
    assert parse(request(PLAIN + b"Connection: close\r\n")).close
    assert not parse(request(PLAIN + b"Connection: Keep-Alive\r\n")).close
    assert parse(request(PLAIN + b"Connection: upgrade\r\n")) is None


def test_only_the_bytes_of_this_request_are_its_body():
    data = request(PLAIN) + b"POST /notify HTTP/1.1\r\n"  # the next request, pipelined
    assert parse(data).body == BODY


@pytest.mark.parametrize(
    "data",
    [
        request(PLAIN, line=b"POST /notify?x=1 HTTP/1.1"),  # a query
        request(PLAIN, line=b"POST /notify/ HTTP/1.1"),
        request(PLAIN, line=b"POST /notify HTTP/1.0"),  # 1.0: gunicorn's keep-alive rules
        request(PLAIN, line=b"post /notify HTTP/1.1"),
        request(PLAIN, line=b"PUT /notify HTTP/1.1"),
        request(PLAIN, line=b"POST  /notify HTTP/1.1"),
        request(PLAIN, line=b"POST http://x/notify HTTP/1.1"),
        request(b"Host: x\r\nContent-Type: application/json\r\n", b""),  # no Content-Length
        request(PLAIN + b"Transfer-Encoding: chunked\r\n"),
        request(PLAIN + b"Expect: 100-continue\r\n"),
        request(PLAIN + b"Upgrade: h2c\r\nHTTP2-Settings: AAA\r\n"),
        request(PLAIN + b"X-Forwarded-Proto: https\r\n"),  # the scheme is gunicorn's call
        request(PLAIN + b"Forwarded: for=1.2.3.4\r\n"),
        request(PLAIN + b"Host: other\r\n"),  # a header twice
        request(PLAIN + b"X_Custom: 1\r\n"),  # "_": gunicorn drops or refuses it
        request(PLAIN + b"Script-Name: /x\r\n"),
        request(PLAIN + b"X-A: 1\r\n folded\r\n"),  # obs-fold
        request(PLAIN + b"X-A : 1\r\n"),  # whitespace before the colon
        request(PLAIN + b"X-A: caf\xc3\xa9\r\n"),  # not ASCII
        request(PLAIN + b"X-A: a\x00b\r\n"),  # a control character
        request(PLAIN + b"X-A: a\x7fb\r\n"),
        request(PLAIN + b"\x00: 1\r\n"),
        request(PLAIN + b"X-A\r\n"),  # no colon
        request(b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(BODY)),  # no Host
        request(PLAIN.replace(b"Content-Length: %d" % len(BODY), b"Content-Length: +28")),
    ],
)
def test_anything_doubtful_is_left_to_gunicorn(data):
    assert parse(data) is None


def test_a_configured_scheme_header_is_left_to_gunicorn():
    data = request(PLAIN + b"X-Scheme: https\r\n")
    found = request_end(data, 65536)
    assert parse_notify_request(data, *found, 100, 8190) is not None
    only = GUNICORN_ONLY | {"X-SCHEME"}
    assert parse_notify_request(data, *found, 100, 8190, only) is None


def test_gunicorns_limits_are_left_to_gunicorn():
    many = PLAIN + b"".join(b"X-H%d: v\r\n" % i for i in range(10))
    assert parse(request(many), fields=12) is None
    assert parse(request(many), fields=13) is not None
    long = PLAIN + b"X-Long: " + b"v" * 100 + b"\r\n"
    assert parse(request(long), size=100) is None
    assert parse(request(long), size=108) is not None


def test_a_body_shorter_or_longer_than_content_length_is_not_served_here():
    data = request(PLAIN)
    found = request_end(data, 65536)
    assert found is not None
    assert parse_notify_request(data, found[0], found[1] - 1, 100, 8190) is None
    assert parse_notify_request(data + b"x", found[0], found[1] + 1, 100, 8190) is None


def test_the_environ_is_gunicorns():
    got = parse(request(PLAIN + b"Accept: a\r\nIdempotency-Key: k\r\n"))
    environ = environ_for(got, ("127.0.0.1", 5555), ("127.0.0.1", 8000), {"base": 1})
    assert environ["base"] == 1
    assert environ["CONTENT_TYPE"] == "application/json"
    assert environ["CONTENT_LENGTH"] == str(len(BODY))
    assert "HTTP_CONTENT_TYPE" not in environ and "HTTP_CONTENT_LENGTH" not in environ
    assert environ["HTTP_HOST"] == "127.0.0.1:8000"
    assert environ["HTTP_IDEMPOTENCY_KEY"] == "k"
    assert environ["REMOTE_ADDR"] == "127.0.0.1" and environ["REMOTE_PORT"] == "5555"
    assert environ["SERVER_NAME"] == "127.0.0.1" and environ["SERVER_PORT"] == "8000"
    assert environ["wsgi.input"].read() == BODY
    # each request its own input stream; the base is not touched
    again = environ_for(got, "unix", "sock", {"base": 1})
    assert again["wsgi.input"] is not environ["wsgi.input"]
    assert again["REMOTE_ADDR"] == "unix" and "REMOTE_PORT" not in again


def test_the_answer_has_gunicorns_head():
    out = response_bytes(
        "200 OK", [("Content-Type", "application/json"), ("Content-Length", "2")], b"{}",
        False, "gunicorn",
    )
    head, _, body = out.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 200 OK"
    assert lines[1] == "Server: gunicorn"
    assert lines[2].startswith("Date: ") and lines[2].endswith(" GMT")
    assert lines[3] == "Connection: keep-alive"
    assert lines[4:] == ["Content-Type: application/json", "Content-Length: 2"]
    assert body == b"{}"
    closing = response_bytes("503 Service Unavailable", [], b"", True, "gunicorn")
    assert b"\r\nConnection: close\r\n" in closing


def test_http_date_is_now():
    parsed = email.utils.parsedate_to_datetime(http_date()).timestamp()
    assert abs(parsed - time.time()) < 2
