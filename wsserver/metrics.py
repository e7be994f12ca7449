"""Prometheus metrics (prometheus_client), served at ``GET /metrics``.

Why module-level objects: a prometheus_client metric registers itself in the process-wide
registry when created and may be created only once per process, whatever the number of apps;
the metric objects are the one place where process state is the right model. Under several
gunicorn workers, prometheus_client's multiprocess mode adds every worker's values up: the
shipped gunicorn config points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory before any
worker starts, and marks dead workers' files.

Hot paths pay one ``inc``/``observe`` per batch or per client message, not per delivery.
Connection counts are not touched per connection at all: in multiprocess mode every update
takes one process-wide lock, and thousands of connection threads ending at once (a network
blip, a load balancer draining) queued on it for seconds. The broadcaster thread copies the
hub's counts into the metrics a few times a second instead (:func:`sync_connections`), and
``/metrics`` does just before it renders.
"""

from __future__ import annotations

import bisect
import glob
import os
import threading
from collections.abc import Iterable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

__all__ = [
    "BROKER_ERRORS",
    "BROKER_RECONNECTS",
    "BYTES_OUT",
    "CONNECTIONS",
    "CONNECTIONS_OPENED",
    "CONTENT_TYPE_LATEST",
    "DELIVERIES",
    "DELIVERY_LATENCY",
    "MESSAGES_IN",
    "MESSAGES_OUT",
    "PUBLISH_REJECTED",
    "QUEUE_DEPTH",
    "REFUSALS",
    "SERVER_CLOSES",
    "SLOW_CONSUMERS",
    "render",
    "observe_many",
    "render_directory",
    "sync_connections",
]

# prometheus_client chose its storage when imported (just above): follow the same choice
_MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))

CONNECTIONS = Gauge(
    "wsserver_connections", "Open WebSocket connections", multiprocess_mode="livesum"
)
CONNECTIONS_OPENED = Counter("wsserver_connections_opened", "WebSocket connections accepted")
MESSAGES_IN = Counter("wsserver_messages_in", "Complete messages received from clients")
MESSAGES_OUT = Counter("wsserver_messages_out", "Messages fanned out by the broadcaster")
DELIVERIES = Counter("wsserver_deliveries", "Messages written to clients (message x client)")
BYTES_OUT = Counter(
    "wsserver_bytes_out",
    "Bytes of broadcast frames queued to clients (compressed ones counted as compressed)",
)
QUEUE_DEPTH = Gauge(
    "wsserver_queue_depth", "Messages waiting in the broadcast queue", multiprocess_mode="livesum"
)
SLOW_CONSUMERS = Counter("wsserver_slow_consumers", "Clients dropped as slow consumers (1008)")
REFUSALS = Counter(
    "wsserver_refusals",
    "Requests and sockets refused, by reason (see wsserver.audit)",
    ["reason"],
)
SERVER_CLOSES = Counter(
    "wsserver_server_closes",
    "WebSockets closed by the server on its own initiative, by reason (see wsserver.audit)",
    ["reason"],
)
PUBLISH_REJECTED = Counter("wsserver_publish_rejected", "Publishes refused with 503", ["reason"])
BROKER_ERRORS = Counter("wsserver_broker_errors", "Broker (Redis) operations that failed")
BROKER_RECONNECTS = Counter("wsserver_broker_reconnects", "Broker listener reconnections")
DELIVERY_LATENCY = Histogram(
    "wsserver_delivery_latency_seconds",
    "Time from a message being queued to its frames being written to every client",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)


def observe_many(histogram: Histogram, values: Iterable[float]) -> None:
    """``histogram.observe(v)`` for every value, as one update per bucket touched and one
    for the sum: in multiprocess mode each update takes the process-wide lock and writes the
    mmap, and the broadcaster observed every message of a batch one by one (with 50 per
    POST, a visible share of the publish path; docs/performance.md, "Publish path"). The
    exposed values are the same as with ``observe``; a histogram without prometheus_client's
    internals (another version) is observed one value at a time."""
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if bounds is None or buckets is None or total is None:
        for value in values:
            histogram.observe(value)
        return
    counts: dict[int, int] = {}
    amount = 0.0
    for value in values:
        amount += value
        index = bisect.bisect_left(bounds, value)  # the first bound >= value, as observe
        counts[index] = counts.get(index, 0) + 1
    if not counts:
        return
    total.inc(amount)
    for index, count in counts.items():
        buckets[index].inc(count)


_sync_lock = threading.Lock()
_opened_reported = 0


def sync_connections(open_now: int, opened_total: int) -> None:
    """Copy the hub's counts into ``wsserver_connections`` and ``..._opened_total``."""
    global _opened_reported
    with _sync_lock:
        CONNECTIONS.set(open_now)
        if opened_total > _opened_reported:
            CONNECTIONS_OPENED.inc(opened_total - _opened_reported)
            _opened_reported = opened_total


def render() -> bytes:
    """The exposition text: this process's metrics, or every worker's in multiprocess mode."""
    if _MULTIPROCESS:
        return render_directory(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    return generate_latest()


def render_directory(path: str) -> bytes:
    """Every worker's metrics from a multiprocess directory, skipping files still being created.

    A worker that is booting creates each of its ``<type>_<pid>.db`` files empty and only then
    sizes it; prometheus_client's collector reads such a file as corrupt and ``/metrics`` in
    every other worker answered 500 for that instant (seen in CI with two workers). A file
    shorter than its 8-byte header holds no values yet, so leaving it out loses nothing.
    """
    from prometheus_client import multiprocess

    class SettledFilesCollector(multiprocess.MultiProcessCollector):
        def collect(self) -> Iterable:  # type: ignore[override]
            files = [f for f in glob.glob(os.path.join(path, "*.db")) if _past_creation(f)]
            return self.merge(files, accumulate=True)

    registry = CollectorRegistry()
    SettledFilesCollector(registry, path=path)
    return generate_latest(registry)


def _past_creation(file: str) -> bool:
    try:
        return os.path.getsize(file) >= 8
    except FileNotFoundError:  # a dead worker's live gauge, removed since the glob
        return False
