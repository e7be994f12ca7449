"""Property-based, end to end: whatever bytes or JSON are posted to /notify, the server never
answers 5xx. (The parsers' own properties, in-process: ``tests/test_properties.py``.)"""

from __future__ import annotations

import json

import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=20,
)
notificationish = st.fixed_dictionaries(
    {}, optional={"event": json_values | st.text(max_size=300), "message": json_values, "data": json_values,
                  "room": json_values, "rooms": json_values, "user": json_values},
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=300), notificationish.map(lambda o: json.dumps(o).encode()),
                 st.lists(notificationish, max_size=4).map(lambda o: json.dumps(o).encode())))
def test_notify_endpoint_never_answers_5xx(server, body):
    r = requests.post(server.url + "/notify", data=body, timeout=10,
                      headers={"Content-Type": "application/json"})
    assert r.status_code in (200, 400, 413), r.text
    assert "error" in r.json() or r.json()["status"] in ("ok", "partial", "error")
