"""Property-based: whatever bytes or JSON arrive, the command parser and the /notify validator
answer with their own error types (never a crash), and the server never answers 5xx."""

from __future__ import annotations

import json

import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import GunicornServer

from wsserver.protocol import (
    BadRequest,
    CommandError,
    parse_command,
    parse_notification,
    parse_notify_body,
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=20,
)
commandish = st.fixed_dictionaries(
    {"type": st.sampled_from(["subscribe", "unsubscribe", "ping", "refresh", "x"]) | json_values},
    optional={"room": json_values | st.text(max_size=200), "since": json_values, "token": json_values},
)
notificationish = st.fixed_dictionaries(
    {}, optional={"event": json_values | st.text(max_size=300), "message": json_values, "data": json_values,
                  "room": json_values, "rooms": json_values, "user": json_values},
)


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.text(max_size=200), commandish.map(json.dumps), json_values.map(json.dumps)))
def test_command_parser_never_crashes(text):
    try:
        command = parse_command(text)
    except CommandError as exc:
        assert exc.code and exc.reason
        return
    assert command is None or command.type in ("subscribe", "unsubscribe", "ping", "refresh")


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.binary(max_size=200), notificationish.map(lambda o: json.dumps(o).encode()),
                 json_values.map(lambda o: json.dumps(o).encode())))
def test_notify_validator_never_crashes(body):
    try:
        parsed = parse_notify_body(body)
        notification = parse_notification(parsed)
    except BadRequest as exc:
        assert exc.status == 400 and exc.code and exc.reason
        return
    assert isinstance(notification.event, str) and notification.event


_server: GunicornServer | None = None


def setup_module() -> None:
    global _server
    _server = GunicornServer(env={"WSSERVER_ENV": "development"}).start()


def teardown_module() -> None:
    if _server is not None:
        _server.stop()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=300), notificationish.map(lambda o: json.dumps(o).encode()),
                 st.lists(notificationish, max_size=4).map(lambda o: json.dumps(o).encode())))
def test_notify_endpoint_never_answers_5xx(body):
    assert _server is not None
    r = requests.post(_server.url + "/notify", data=body, timeout=10)
    assert r.status_code in (200, 400, 413), r.text
    assert "error" in r.json() or r.json()["status"] in ("ok", "partial", "error")
