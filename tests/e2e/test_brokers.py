"""End to end: the memory broker gives its history's memory back to the system (issue 12's
Must-hold on unbounded history), measured on a real gunicorn worker's RSS. The broker contract
itself is tested in-process in tests/test_brokers.py."""

from __future__ import annotations

import time

from support import wait_for


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_memory_history_gives_its_memory_back_end_to_end(make_server):
    """Must hold (issue 12): 30,000 distinct rooms x 20 KB with WSSERVER_HISTORY_TTL=5 leave
    the worker's RSS within 20 MB of where it started, 30 s later. Posted in batches of 1,000
    (a JSON list) to make it quick."""
    import requests

    server = make_server({"WSSERVER_HISTORY_TTL": "5", "WSSERVER_MAX_BATCH": "1000",
                          "WSSERVER_MAX_BODY_SIZE": str(32 * 1024 * 1024)})
    pid = server.worker_pid()
    session = requests.Session()
    assert session.post(server.url + "/notify", json={"event": "warm", "room": "w"},
                        timeout=10).status_code == 200
    start = _rss_mb(pid)
    message = "x" * 20_000
    began = time.monotonic()
    peak = start
    for batch in range(30):
        body = [{"event": "e", "room": f"rss-{batch}-{i}", "message": message}
                for i in range(1000)]
        r = session.post(server.url + "/notify", json=body, timeout=60)
        assert r.status_code == 200 and r.json()["accepted"] == 1000, r.text[:300]
        peak = max(peak, _rss_mb(pid))
    posted = time.monotonic()
    session.close()
    wait_for(lambda: _rss_mb(pid) <= start + 20, timeout=30, interval=0.25,
             message=f"RSS back within 20 MB of {start:.0f} MB (peak {peak:.0f} MB)")
    back = time.monotonic()
    print(f"RSS start {start:.1f} MB, peak {peak:.1f} MB, back to {_rss_mb(pid):.1f} MB; "
          f"posting {posted - began:.1f} s, back {back - posted:.1f} s after the last post")
    assert "Traceback" not in server.log()
