"""A lean poster for the publish-path scenario (``publish100``): one thread, raw keep-alive
sockets in a selector, each with one ``POST /notify`` in flight, the next written as soon as
the answer is in.

Why not :mod:`benchlib.poster`: its ``http.client`` threads cost ~100 µs of CPU per POST in
the load generator, on the same 2 cores as the server, so past ~2,000 POST/s the bench
measured its own poster. Here a POST costs one ``send``, one ``recv`` and a header scan.

Each request carries ``batch`` notifications (1: a single JSON object; more: a JSON list),
with the same ``{"event": "bench", "data": {"t", "seq"}}`` shape as the other poster, and the
result dict has the same fields, so :func:`run_broadcast` checks the deliveries as for the
other scenarios. Every answer must be a 200 (a 503 is retried after ``retry_sleep``); any
other status or a transport error counts the request's notifications as failed.
"""

from __future__ import annotations

import math
import resource
import selectors
import socket
import time
from array import array
from collections import Counter


def raw_poster_main(ctrl, host, port, seq0, count, conns, batch, pad_bytes, timeout, deadline,
                    retry_sleep):
    t_sent = array("d", [math.nan]) * count
    http_ms = array("d")
    status = Counter()
    errors = Counter()
    retries = failed = 0
    first_send = math.inf
    last_done = 0.0
    pad = ',"pad":"' + "x" * pad_bytes + '"' if pad_bytes else ""
    head = (f"POST /notify HTTP/1.1\r\nHost: {host}:{port}\r\n"
            "Content-Type: application/json\r\nContent-Length: %d\r\n\r\n")
    sel = selectors.DefaultSelector()
    next_k = 0
    # per socket: [first k, n, t sent, buffer]
    state: dict[socket.socket, list] = {}

    def build(k, n, t):
        items = ['{"event":"bench","data":{"t":%r,"seq":%d%s}}' % (t, seq0 + i, pad)
                 for i in range(k, k + n)]
        body = (items[0] if batch == 1 else "[" + ",".join(items) + "]").encode()
        return (head % len(body)).encode() + body

    def send_next(sock, st, k=None, n=None):
        nonlocal next_k, first_send
        if k is None:
            if next_k >= count or time.time() > deadline:
                sel.unregister(sock)
                sock.close()
                del state[sock]
                return
            k, n = next_k, min(batch, count - next_k)
            next_k += n
        t = time.time()
        first_send = min(first_send, t)
        st[0], st[1], st[2], st[3] = k, n, t, b""
        sock.sendall(build(k, n, t))

    def connect():
        s = socket.create_connection((host, port), timeout=timeout)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        st = [0, 0, 0.0, b""]
        state[s] = st
        sel.register(s, selectors.EVENT_READ)
        send_next(s, st)

    for _ in range(conns):
        connect()
    while state:
        events = sel.select(timeout)
        if not events:
            errors["timeout"] += 1
            for s, st in list(state.items()):
                failed += st[1]
                sel.unregister(s)
                s.close()
            state.clear()
            break
        for key, _ in events:
            sock = key.fileobj
            st = state[sock]
            try:
                data = sock.recv(65536)
            except OSError as exc:
                data = b""
                errors[type(exc).__name__] += 1
            if not data:
                failed += st[1]
                sel.unregister(sock)
                sock.close()
                del state[sock]
                continue
            buf = st[3] + data
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                st[3] = buf
                continue
            hd = buf[:end].lower()
            i = hd.find(b"content-length:")
            length = int(hd[i + 15:hd.find(b"\r\n", i) if hd.find(b"\r\n", i) > 0 else None]) \
                if i >= 0 else 0
            if len(buf) < end + 4 + length:
                st[3] = buf
                continue
            done = time.time()
            code = int(buf[9:12])
            status[code] += 1
            k, n, t = st[0], st[1], st[2]
            if code == 200:
                t_sent[k:k + n] = array("d", [t]) * n
                http_ms.append((done - t) * 1000.0)
                last_done = done
                send_next(sock, st)
            elif code == 503 and done < deadline:
                retries += 1
                time.sleep(retry_sleep)
                send_next(sock, st, k, n)
            else:
                failed += n
                send_next(sock, st)
    ru = resource.getrusage(resource.RUSAGE_SELF)
    ctrl.send({
        "seq0": seq0,
        "t_sent": t_sent.tobytes(),
        "http_ms": http_ms.tobytes(),
        "lag_ms": b"",
        "status": dict(status),
        "errors": dict(errors),
        "retries_503": retries,
        "failed": failed,
        "first_send": first_send,
        "last_done": last_done,
        "cpu_s": ru.ru_utime + ru.ru_stime,
        "t0": first_send,
        "rate": None,
        "mode": "fast",
        "requests": sum(status.values()),
    })
