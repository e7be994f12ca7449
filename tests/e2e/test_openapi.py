"""The HTTP API against its OpenAPI document, docs/openapi.yaml.

Schemathesis reads the spec and fuzzes a real server (gunicorn, development mode) with
generated requests, valid and invalid: every response must be documented (status code,
content type, body schema, required headers), no response may be a 5xx, valid data must be
accepted and invalid data rejected with a 4xx. ``GET /ws`` is documented but not fuzzed:
Schemathesis speaks HTTP, not WebSocket. Its refusals (plain HTTP, before any upgrade), and the
responses fuzzing cannot reach (401/403 with API keys and tokens, 429, 503), are checked against
the same spec with hand-made requests. (The spec's own checks, in-process:
``tests/test_openapi.py``.)

Bounded: a fixed number of examples per operation, a fixed seed, no example database, no
deadline (a noisy 2-core machine must not fail a test on timing).
"""

from __future__ import annotations

import time

import pytest

schemathesis = pytest.importorskip("schemathesis")

import jwt  # noqa: E402
import websocket  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.config import SchemathesisConfig  # noqa: E402
from support import ROOT, serving  # noqa: E402

SPEC = ROOT / "docs" / "openapi.yaml"
MAX_EXAMPLES = 60
SEED = 20240601
NOT_FUZZED = "/ws"
API_KEY = "test-publisher-key"
JWT_SECRET = "test-jwt-secret-that-is-long-enough-for-hs256"
ALLOWED_ORIGIN = "https://app.example"

# Statuses the API answers that Schemathesis' positive/negative data checks do not expect by
# default, and why they are right:
# - 413 for valid data: a schema cannot express the body's byte limit (WSSERVER_MAX_BODY_SIZE),
#   so a schema-valid batch of 100 large notifications is legitimately refused as too large.
# - 422 for valid data: the generator reuses an Idempotency-Key (or an item's
#   idempotency_key) across requests with different bodies; within WSSERVER_HISTORY_TTL that
#   is refused as idempotency_key_reused, as documented: state a schema cannot express.
# - 413 for invalid data: a batch over WSSERVER_MAX_BATCH items (the spec's maxItems) is
#   refused with 413 batch_too_large, as documented.
# - 415 for invalid data: a request without a body carries no Content-Type, and the body's
#   declared type is checked before the body (unsupported_media_type, as documented).
POSITIVE_OK = ["2xx", "413", "422"]
NEGATIVE_OK = ["400", "405", "413", "415"]


def _config() -> SchemathesisConfig:
    return SchemathesisConfig.from_dict(
        {
            "seed": SEED,
            # Generation speed depends on the machine's load; the server's speed is no concern
            # of a conformance test (Schemathesis already runs Hypothesis with deadline=None).
            "suppress-health-check": ["too_slow"],
            "request-timeout": 10,
            "generation": {
                "max-examples": MAX_EXAMPLES,
                "database": "none",
            },
            "checks": {
                "positive_data_acceptance": {"expected-statuses": POSITIVE_OK},
                "negative_data_rejection": {"expected-statuses": NEGATIVE_OK},
            },
        }
    )


def load_spec():
    return schemathesis.openapi.from_path(SPEC, config=_config())


# Loaded at import (a file, no server needed); requests go to a fixture's server through
# ``base_url``. Not ``schemathesis.pytest.from_fixture``: its lazy loader sets
# ``request.node._nodeid``, which pytest 9 no longer has (schemathesis 4.32.5).
FULL_SPEC = load_spec()
schema = FULL_SPEC.exclude(path=NOT_FUZZED)


@pytest.fixture(scope="module")
def api_server():
    """Development mode, as fuzzed; one WebSocket at most, so a test can fill it (503)."""
    with serving(env={"WSSERVER_ENV": "development", "WSSERVER_MAX_CONNECTIONS": "1"}) as srv:
        yield srv


@pytest.fixture(scope="module")
def secured_server():
    """Production with publisher API keys, connection tokens, an origin allow-list and one
    WebSocket per address: the 401/403/429 answers."""
    env = {
        "WSSERVER_ENV": "production",
        "WSSERVER_API_KEYS": API_KEY,
        "WSSERVER_JWT_SECRET": JWT_SECRET,
        "WSSERVER_ALLOWED_ORIGINS": ALLOWED_ORIGIN,
        "WSSERVER_MAX_CONNECTIONS_PER_IP": "1",
    }
    with serving(env=env) as srv:
        yield srv


@schema.parametrize()
def test_api_conforms_to_spec(case, api_server):
    # Every built-in check: not_a_server_error, status_code_conformance,
    # content_type_conformance, response_headers_conformance, response_schema_conformance,
    # positive_data_acceptance, negative_data_rejection, unsupported_method, ...
    case.call_and_validate(base_url=api_server.url, timeout=10)


# Bodies the generator cannot produce, sent as raw bytes: lone surrogates (it draws strings
# encodable as UTF-8, but JSON can carry a surrogate as a \\uXXXX escape), nesting deeper than
# Python's recursion limit, JSON's edges (NaN is not JSON).
EDGE_BODIES = [
    pytest.param(b'{"event":"e","room":null,"rooms":["a","a"],"user":null}', 200,
                 id="nulls-and-duplicate-rooms"),
    pytest.param(b'{"event":"e\\u0000","message":null,"data":null}', 200, id="nul-and-nulls"),
    pytest.param(('{"event":"%s","room":"%s"}' % ("\U0001f600" * 256, "A" * 128)).encode(), 200,
                 id="max-lengths"),
    pytest.param(b'{"event":"e","user":"%s"}' % (b"u" * 256), 200, id="max-user"),
    pytest.param(b"[" + b",".join([b'{"event":"e"}'] * 100) + b"]", 200, id="100-items"),
    pytest.param(b'[{"event":"e"},1,{"event":"e","room":"a","user":"u"}]', 200, id="mixed-batch"),
    pytest.param(b'{"event":"e","data":' + b"[" * 500 + b"]" * 500 + b"}", 200, id="nested-500"),
    pytest.param(b"[" * 500 + b"]" * 500, 200, id="nested-batch-500"),
    pytest.param(b'\xef\xbb\xbf{"event":"e"}', None, id="utf8-bom"),
    pytest.param(b'{"event":"e"} {"event":"f"}', 400, id="two-documents"),
    # lone surrogates cannot be sent on as UTF-8: the whole body is refused, nothing published
    pytest.param(b'{"event":"\\ud800"}', 400, id="surrogate-event"),
    pytest.param(b'{"event":"e","message":"\\udc00"}', 400, id="surrogate-message"),
    pytest.param(b'{"event":"e","data":{"\\ud800":1}}', 400, id="surrogate-data-key"),
    pytest.param(b'[{"event":"e"},{"event":"\\ud800"}]', 400, id="surrogate-batch-item"),
    pytest.param(b'{"event":"e","data":' + b"[" * 3000 + b"]" * 3000 + b"}", 400, id="nested-3000"),
    pytest.param(b"[" * 3000 + b"]" * 3000, 400, id="nested-batch-3000"),
    pytest.param(b'{"event":"e","data":[NaN,Infinity,-Infinity]}', 400, id="nan"),
    pytest.param(b'{"event":"e","data":1e400}', 400, id="out-of-range-number"),
]


@pytest.mark.parametrize("raw, status", EDGE_BODIES)
def test_notify_edge_bodies_conform(raw, status, api_server):
    """Hand-made bodies: each answered as documented (never a 5xx), with the expected status
    (None: any documented one)."""
    import requests

    response = requests.post(api_server.url + "/notify", data=raw, timeout=10,
                             headers={"Content-Type": "application/json"})
    case = schema["/notify"]["POST"].Case(body={"event": "e"}, media_type="application/json")
    case.validate_response(response)
    assert response.status_code < 500, response.text
    if status is not None:
        assert response.status_code == status, response.text


UPGRADE = {
    "Upgrade": "websocket",
    "Connection": "Upgrade",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
    "Sec-WebSocket-Version": "13",
}


def _token(sub: str = "alice", ttl: float = 60.0, **claims) -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time() + ttl), **claims}, JWT_SECRET, "HS256")


def _call(server, path: str, method: str, status: int, code: str | None,
          headers: dict | None = None, query: dict | None = None, body=None):
    """One hand-made request, validated against the spec's operation like a fuzzed one
    (a documented 503 is what these requests are after, so it is not a failure here)."""
    operation = FULL_SPEC[path]["POST" if path == "/notify" else "GET"]
    kwargs = {"method": method, "headers": headers or {}, "query": query or {}}
    if body is not None:
        kwargs.update(body=body, media_type="application/json")
    excluded = [not_a_server_error] if status == 503 else []
    response = operation.Case(**kwargs).call_and_validate(
        base_url=server.url, timeout=10, excluded_checks=excluded
    )
    assert response.status_code == status, response.text
    if code is not None:
        assert response.json()["code"] == code
    return response


@pytest.mark.parametrize(
    "method, headers, query, code",
    [
        pytest.param("GET", {}, {}, "bad_request", id="plain-get"),
        pytest.param("GET", UPGRADE, {"rooms": "ok,/bad"}, "invalid_room", id="bad-room"),
        pytest.param("GET", UPGRADE, {"rooms": "a,b", "since": "1"}, "invalid_since",
                     id="since-needs-one-room"),
        pytest.param("GET", UPGRADE, {"rooms": ",".join(f"r{i}" for i in range(101))},
                     "too_many_rooms", id="too-many-rooms"),
        pytest.param("GET", {**UPGRADE, "Sec-WebSocket-Key": "c2hvcnQ="}, {},
                     "invalid_websocket_key", id="bad-key"),
    ],
)
def test_ws_refusals_conform(method, headers, query, code, api_server):
    _call(api_server, "/ws", method, 400, code, headers, query)


def test_ws_unsupported_version_conforms(api_server):
    response = _call(api_server, "/ws", "GET", 426, "unsupported_websocket_version",
                     {**UPGRADE, "Sec-WebSocket-Version": "8"})
    assert response.headers["sec-websocket-version"] == ["13"]


def test_ws_method_not_allowed_conforms(api_server):
    _call(api_server, "/ws", "POST", 405, "method_not_allowed")


def test_ws_server_full_conforms(api_server):
    ws = websocket.create_connection(api_server.ws_url, timeout=10)
    try:
        response = _call(api_server, "/ws", "GET", 503, "server_full", UPGRADE)
        assert int(response.headers["retry-after"][0]) >= 1
    finally:
        ws.close()


@pytest.mark.parametrize(
    "path, headers, status, code",
    [
        pytest.param("/notify", {}, 401, "missing_api_key", id="notify-no-key"),
        pytest.param("/notify", {"Authorization": "Bearer wrong"}, 401, "invalid_api_key",
                     id="notify-wrong-key"),
        pytest.param("/notify", {"Authorization": f"Bearer {API_KEY}"}, 200, None,
                     id="notify-key"),
        pytest.param("/rooms", {}, 401, "missing_api_key", id="rooms-no-key"),
        pytest.param("/rooms", {"Authorization": f"Bearer {API_KEY}"}, 200, None, id="rooms-key"),
        pytest.param("/metrics", {}, 401, "missing_api_key", id="metrics-no-key"),
        pytest.param("/metrics", {"Authorization": f"Bearer {API_KEY}"}, 200, None,
                     id="metrics-key"),
        pytest.param("/notify", {"Authorization": f"Bearer {API_KEY}",
                                 "Origin": "https://evil.example"}, 403, "origin_forbidden",
                     id="notify-foreign-origin"),
    ],
)
def test_publisher_access_conforms(path, headers, status, code, secured_server):
    method = "POST" if path == "/notify" else "GET"
    body = {"event": "e"} if path == "/notify" else None
    _call(secured_server, path, method, status, code, headers, body=body)


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_notify_body_not_declared_json_conforms(content_type, api_server):
    """What a cross-site form or simple request can send: 415, as documented."""
    import requests

    headers = {"Content-Type": content_type} if content_type else {}
    response = requests.post(api_server.url + "/notify", data=b'{"event":"e"}', timeout=10,
                             headers=headers)
    assert response.status_code == 415, response.text
    case = schema["/notify"]["POST"].Case(body={"event": "e"}, media_type="application/json")
    case.validate_response(response)


@pytest.mark.parametrize(
    "headers, query, status, code",
    [
        pytest.param(UPGRADE, {}, 401, "missing_token", id="no-token"),
        pytest.param(UPGRADE, {"token": "not-a-jwt"}, 401, "invalid_token", id="bad-token"),
        pytest.param(UPGRADE, {"token": lambda: _token(ttl=-120)}, 401, "token_expired", id="expired"),
        pytest.param({**UPGRADE, "Origin": "https://evil.example"}, {"token": _token}, 403,
                     "origin_forbidden", id="origin"),
        pytest.param(UPGRADE, {"token": _token, "rooms": "private-x"}, 403, "room_forbidden",
                     id="private-room"),
    ],
)
def test_ws_access_refusals_conform(headers, query, status, code, secured_server):
    # tokens are made when the test runs (made at collection they could expire before it)
    query = {k: v() if callable(v) else v for k, v in query.items()}
    _call(secured_server, "/ws", "GET", status, code, headers, query)


def test_ws_too_many_connections_conforms(secured_server):
    ws = websocket.create_connection(f"{secured_server.ws_url}?token={_token()}", timeout=10)
    try:
        response = _call(secured_server, "/ws", "GET", 429, "too_many_connections", UPGRADE,
                         {"token": _token()})
        assert int(response.headers["retry-after"][0]) >= 1
    finally:
        ws.close()


SERVER_API = [
    ("/rooms/{room}/history", "GET", None),
    ("/disconnect", "POST", {"user": "alice"}),
    ("/unsubscribe", "POST", {"user": "alice", "room": "r"}),
]


@pytest.mark.parametrize("path, method, body", SERVER_API, ids=[p for p, _, _ in SERVER_API])
@pytest.mark.parametrize(
    "headers, status, code",
    [
        pytest.param({}, 401, "missing_api_key", id="no-key"),
        pytest.param({"Authorization": "Bearer wrong"}, 401, "invalid_api_key", id="wrong-key"),
        pytest.param({"Authorization": f"Bearer {API_KEY}"}, 200, None, id="key"),
        pytest.param({"Authorization": f"Bearer {API_KEY}", "Origin": "https://evil.example"},
                     403, "origin_forbidden", id="foreign-origin"),
    ],
)
def test_server_api_access_conforms(path, method, body, headers, status, code, secured_server):
    """The server API takes a publisher's credentials, as /notify does (production, keys)."""
    kwargs: dict = {"method": method, "headers": headers}
    if body is not None:
        kwargs.update(body=body, media_type="application/json")
    else:
        kwargs.update(path_parameters={"room": "team/7"})
    response = FULL_SPEC[path][method].Case(**kwargs).call_and_validate(
        base_url=secured_server.url, timeout=10
    )
    assert response.status_code == status, response.text
    if code is not None:
        assert response.json()["code"] == code
