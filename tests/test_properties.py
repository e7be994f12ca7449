"""Property-based: whatever bytes or JSON arrive, the command parser and the /notify validator
answer with their own error types, never a crash. (The server never answering 5xx to such
bodies: ``e2e/test_properties.py``.)"""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from wsserver.protocol import (
    BadRequest,
    CommandError,
    parse_command,
    parse_notification,
    parse_notify_body,
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda children: (st.lists(children, max_size=5)
                      | st.dictionaries(st.text(max_size=10), children, max_size=5)),
    max_leaves=20,
)
commandish = st.fixed_dictionaries(
    {"type": st.sampled_from(["subscribe", "unsubscribe", "ping", "refresh", "x"]) | json_values},
    optional={"room": json_values | st.text(max_size=200), "since": json_values,
              "token": json_values},
)
notificationish = st.fixed_dictionaries(
    {}, optional={"event": json_values | st.text(max_size=300), "message": json_values,
                  "data": json_values, "room": json_values, "rooms": json_values,
                  "user": json_values},
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
