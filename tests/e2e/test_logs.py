"""Logs: JSON lines when asked, for gunicorn's and wsserver's own loggers."""

from __future__ import annotations

import json

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
