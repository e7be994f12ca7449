"""wsserver.metrics, in-process: the exposition parses with prometheus_client's own parser,
and the connection gauge and opened counter follow the hub's counts without counting twice.
(One and two gunicorn workers: ``e2e/test_metrics.py``.)"""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from wsserver import metrics


def _samples() -> dict[str, float]:
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            if not sample.labels:
                values[sample.name] = sample.value
    return values


def test_render_is_prometheus_text_with_every_family():
    names = {f.name for f in text_string_to_metric_families(metrics.render().decode())}
    assert {"wsserver_connections", "wsserver_connections_opened", "wsserver_messages_in",
            "wsserver_deliveries", "wsserver_delivery_latency_seconds"} <= names


def test_sync_connections_sets_the_gauge_and_adds_only_new_openings():
    start = metrics._opened_reported
    metrics.sync_connections(3, start + 5)
    before = _samples()
    assert before["wsserver_connections"] == 3
    metrics.sync_connections(1, start + 5)  # the same total again: nothing added
    metrics.sync_connections(2, start + 4)  # a total that went back (a new hub): nothing
    after = _samples()
    assert after["wsserver_connections"] == 2
    assert after["wsserver_connections_opened_total"] == before["wsserver_connections_opened_total"]
    metrics.sync_connections(2, start + 7)
    assert _samples()["wsserver_connections_opened_total"] == (
        before["wsserver_connections_opened_total"] + 2)


def test_counters_move():
    before = _samples().get("wsserver_messages_in_total", 0.0)
    metrics.MESSAGES_IN.inc()
    assert _samples()["wsserver_messages_in_total"] == before + 1
