"""/metrics: Prometheus text that prometheus_client's own parser reads, with counters that
move when messages flow, under one worker and (Redis) two."""

from __future__ import annotations

import uuid

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from support import GunicornServer, connect, recv_json, wait_for


def scrape(server) -> dict[str, float]:
    r = requests.get(server.url + "/metrics", timeout=5)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/plain")
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            key = sample.name + ("" if not sample.labels else str(sorted(sample.labels.items())))
            values[key] = values.get(key, 0.0) + sample.value
    return values


@pytest.mark.parametrize("workers", [1, 2])
def test_counters_move_when_messages_flow(workers):
    env = {"WSSERVER_ENV": "development"}
    if workers > 1:
        env.update(WSSERVER_REDIS_URL="redis://127.0.0.1:6379/0",
                   WSSERVER_REDIS_PREFIX=f"wstest-{uuid.uuid4().hex[:8]}")
    with GunicornServer(env=env, args=["-w", str(workers)]) as server:
        before = scrape(server)
        clients = [connect(server) for _ in range(6)]
        wait_for(lambda: scrape(server).get("wsserver_connections", 0) == 6, message="gauge = 6")
        # every worker answers with the sum of all workers (multiprocess mode)
        assert [scrape(server).get("wsserver_connections") for _ in range(6)] == [6.0] * 6
        for i in range(5):
            assert server.notify({"event": "m", "data": i}).status_code == 200
        for c in clients:
            assert [recv_json(c)["data"] for _ in range(5)] == list(range(5))
        clients[0].send("hello")  # a free-form message, relayed
        for c in clients:
            c.recv()

        def moved():
            after = scrape(server)
            return (after.get("wsserver_deliveries_total", 0) - before.get("wsserver_deliveries_total", 0) >= 36
                    and after.get("wsserver_messages_out_total", 0) - before.get("wsserver_messages_out_total", 0) >= 6
                    and after.get("wsserver_messages_in_total", 0) - before.get("wsserver_messages_in_total", 0) >= 1
                    and after.get("wsserver_connections_opened_total", 0) >= 6
                    and after.get("wsserver_bytes_out_total", 0) > before.get("wsserver_bytes_out_total", 0)
                    and after.get("wsserver_delivery_latency_seconds_count", 0) >= 6)

        wait_for(moved, message="counters moved")
        for c in clients:
            c.close()
        wait_for(lambda: scrape(server).get("wsserver_connections", 0) == 0, message="gauge back to 0")
