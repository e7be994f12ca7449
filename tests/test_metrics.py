"""wsserver.metrics, in-process: the exposition parses with prometheus_client's own parser,
and the connection gauge and opened counter follow the hub's counts without counting twice.
(One and two gunicorn workers: ``e2e/test_metrics.py``.)"""

from __future__ import annotations

import os
import subprocess
import sys

from prometheus_client import CollectorRegistry, Histogram
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


def test_a_worker_file_still_being_created_is_skipped(tmp_path):
    """A booting worker's metric file exists empty for an instant: the others' /metrics must not 500."""
    worker = ("import prometheus_client as p; "
              "p.Counter('wsserver_deliveries', 'help').inc(7)")
    subprocess.run([sys.executable, "-c", worker], check=True, timeout=30,
                   env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)})
    (tmp_path / "counter_102.db").write_bytes(b"")  # created, not yet sized
    (tmp_path / "gauge_livesum_102.db").write_bytes(b"\x00\x00")
    families = {f.name: f for f in text_string_to_metric_families(
        metrics.render_directory(str(tmp_path)).decode())}
    assert families["wsserver_deliveries"].samples[0].value == 7.0


def test_observe_many_exposes_what_observe_one_by_one_does():
    registry = CollectorRegistry()
    buckets = (0.001, 0.01, 0.1)
    one = Histogram("one_by_one", "x", buckets=buckets, registry=registry)
    many = Histogram("all_at_once", "x", buckets=buckets, registry=registry)
    values = [0.0, 0.001, 0.0011, 0.01, 0.05, 0.1, 0.2, 7.0, 0.0005]
    for value in values:
        one.observe(value)
    metrics.observe_many(many, values)
    metrics.observe_many(many, [])  # nothing to observe: nothing changes

    def samples(name):
        [family] = [f for f in registry.collect() if f.name == name]
        return [(sample.name.removeprefix(name), sample.labels, sample.value)
                for sample in family.samples if not sample.name.endswith("_created")]

    assert samples("one_by_one") == samples("all_at_once")
    assert ("_count", {}, len(values)) in samples("all_at_once")
