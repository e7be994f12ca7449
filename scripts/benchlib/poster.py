"""The notification poster: a separate process with several threads, each on its own
keep-alive ``http.client`` connection, POSTing ``{"event": "bench", "data": {"t", "seq"}}``.

Modes:
* ``fast``: every thread takes the next sequence number as soon as its previous POST is
  answered (saturates the server's ``/notify``);
* ``paced``: sequence number k is due at ``t0 + k / rate``; a thread sleeps until it is due,
  so a slow POST on one thread does not delay the others' schedule (``lag`` reports how late
  sends were anyway).

``data.t`` is ``time.time()`` taken right before the request is written; it is also
recorded here per sequence number (for the accepted attempt), which is what the parent uses
to compute delivery latency (identical to the ``data.t`` the clients receive; the receivers
spot-check that). A 503 is retried after a short sleep with a fresh ``t``; a transport error
(refused/reset) is retried up to ``max_attempts`` times on a new connection, then the
message counts as failed; a timeout is not retried (the server may have queued it).
With ``tls`` the connections are https (one TLS handshake per connection, kept alive).
"""

from __future__ import annotations

import http.client
import itertools
import math
import resource
import threading
import time
from array import array
from collections import Counter


def poster_main(ctrl, host, port, seq0, count, mode, rate, threads, pad_bytes, timeout,
                deadline, t0, retry_sleep, max_attempts=3, tls=False):
    """``tls``: POST over https (keep-alive as over http; certificate not verified)."""
    if tls:
        from benchlib.tlsutil import client_context

        ctx = client_context()

        def connect():
            return http.client.HTTPSConnection(host, port, timeout=timeout, context=ctx)
    else:
        def connect():
            return http.client.HTTPConnection(host, port, timeout=timeout)
    t_sent = array("d", [math.nan]) * count
    http_ms = array("d")
    lag_ms = array("d")
    status = Counter()
    errors = Counter()
    counters = Counter()  # retries_503, failed
    first_send = [math.inf]
    last_done = [0.0]
    lock = threading.Lock()
    claim = itertools.count()
    pad = ',"pad":"' + "x" * pad_bytes + '"' if pad_bytes else ""
    headers = {"Content-Type": "application/json"}

    def worker():
        conn = connect()
        local_http = []
        local_lag = []
        local_status = Counter()
        local_err = Counter()
        retries = 0
        failed = 0
        my_first = math.inf
        my_last = 0.0
        while True:
            k = next(claim)
            if k >= count:
                break
            if mode == "paced":
                due = t0 + k / rate
                delay = due - time.time()
                if delay > 0:
                    time.sleep(delay)
            if time.time() > deadline:
                break
            seq = seq0 + k
            attempts = 0
            backoff = retry_sleep
            while True:
                t = time.time()
                body = '{"event":"bench","data":{"t":%r,"seq":%d%s}}' % (t, seq, pad)
                try:
                    conn.request("POST", "/notify", body, headers)
                    resp = conn.getresponse()
                    resp.read()
                    code = resp.status
                except (OSError, http.client.HTTPException) as exc:
                    local_err[type(exc).__name__] += 1
                    conn.close()
                    conn = connect()
                    attempts += 1
                    # a timeout may have been queued by the server: do not send it twice
                    if (attempts >= max_attempts or time.time() > deadline
                            or not isinstance(exc, ConnectionError)):
                        failed += 1
                        break
                    time.sleep(backoff)
                    continue
                done = time.time()
                local_status[code] += 1
                if code == 503:
                    retries += 1
                    if time.time() > deadline:
                        failed += 1
                        break
                    time.sleep(backoff)
                    backoff = min(backoff * 2, 0.05)
                    continue
                if code == 200:
                    t_sent[k] = t
                    local_http.append((done - t) * 1000.0)
                    if mode == "paced":
                        local_lag.append((t - (t0 + k / rate)) * 1000.0)
                    if t < my_first:
                        my_first = t
                    my_last = done
                else:
                    failed += 1
                break
        conn.close()
        with lock:
            http_ms.extend(local_http)
            lag_ms.extend(local_lag)
            status.update(local_status)
            errors.update(local_err)
            counters["retries_503"] += retries
            counters["failed"] += failed
            first_send[0] = min(first_send[0], my_first)
            last_done[0] = max(last_done[0], my_last)

    ths = [threading.Thread(target=worker, daemon=True) for _ in range(threads)]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    ctrl.send({
        "seq0": seq0,
        "t_sent": t_sent.tobytes(),
        "http_ms": http_ms.tobytes(),
        "lag_ms": lag_ms.tobytes(),
        "status": dict(status),
        "errors": dict(errors),
        "retries_503": counters["retries_503"],
        "failed": counters["failed"],
        "first_send": first_send[0],
        "last_done": last_done[0],
        "cpu_s": _cpu_s(),
        "t0": t0,
        "rate": rate,
        "mode": mode,
    })


def _cpu_s():
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime
