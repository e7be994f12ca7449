"""Logs: JSON lines when asked, text lines of one shape otherwise, for gunicorn's and
wsserver's own loggers; the keep-alive warning only when the user's flags earn it."""

from __future__ import annotations

import json
import re

import requests
from support import connect, wait_for


def test_json_log_lines(make_server):
    server = make_server({"WSSERVER_ENV": "development", "WSSERVER_LOG_FORMAT": "json"})
    ws = connect(server)
    wait_for(lambda: server.health()["clients"] == 1)
    ws.close()
    lines = [line for line in server.log().splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines]  # every line parses
    loggers = {e["logger"] for e in entries}
    assert {"gunicorn.error", "wsserver.service"} <= loggers
    assert all({"ts", "level", "logger", "pid", "message"} <= e.keys() for e in entries)


# one shape for every text line, gunicorn's and wsserver's (tests/test_logs.py: TEXT_LINE)
TEXT_LINE = re.compile(
    r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} [+-]\d{4}\] \[\d+\] \[[A-Z]+\] [\w.]+: "
)


def test_text_log_lines_share_one_timestamp_and_threads_keeps_keepalive(make_server):
    """A server started with ``--threads`` on gunicorn's command line: every line of its log,
    gunicorn's and ours, has the one text shape; and ``worker_connections`` followed the
    threads (no keep-alive warning, and a kept-alive connection serves two requests)."""
    server = make_server({"WSSERVER_ENV": "development"}, args=["--threads", "1500"])
    ws = connect(server)
    wait_for(lambda: server.health()["clients"] == 1)
    ws.close()
    with requests.Session() as session:
        first = session.get(server.url + "/healthz", timeout=5)
        second = session.get(server.url + "/healthz", timeout=5)
    assert first.headers.get("Connection", "").lower() != "close", first.headers
    assert second.status_code == 200
    lines = [line for line in server.log().splitlines() if line.strip()]
    loggers = {m.group(1) for m in map(re.compile(r"\] ([\w.]+): ").search, lines) if m}
    assert {"gunicorn.error", "wsserver.service"} <= loggers, lines
    odd = [line for line in lines if not TEXT_LINE.match(line)]
    assert not odd, odd
    assert "keep-alive off" not in server.log()


def test_worker_connections_given_below_threads_still_warns(make_server):
    server = make_server(args=["--threads", "200", "--worker-connections", "150"])
    assert "--worker-connections (150) <= --threads (200) turns HTTP keep-alive off" in server.log()
