"""The ``compress4k`` scenario: what permessage-deflate saves on the wire and costs the worker,
for a 4 KB JSON notification, with and without it, measured in the same run.

One wsserver (compression on, the default threshold), two groups of raw-socket clients
connected for the whole run, each in its own room and its own receiver process: ``plain``
clients offer no extension, ``deflate`` clients offer permessage-deflate (and get it, with
``server_no_context_takeover``). Each run has three phases, in a rotating order: the same
notifications posted to an empty room (``none``: the publish path alone), to the plain room,
to the deflate room. Per phase: the worker's CPU (utime + stime of its process) and the
bytes the clients received (WebSocket frames: TCP/IP headers not counted), divided by the
deliveries. ``fanout_cpu_us_per_delivery`` subtracts the publish path's CPU (the ``none``
phase of the same run) so the two kinds compare on fan-out alone. Medians of ``--runs``.

Notifications are posted in batches (as many as the default 64 KiB body limit takes) over one
keep-alive connection, the cheapest publish there is, so the fan-out dominates the worker's
CPU. The receivers only walk frame headers
(compressed payloads are not inflated, except each connection's first, checked as JSON), so
a deflate client costs the load generator no more than a plain one.
"""

from __future__ import annotations

import base64
import http.client
import json
import multiprocessing as mp
import os
import select
import socket
import statistics
import time
import zlib

from benchlib.wsload import accept_for

__all__ = ["NOTIFICATION_BYTES", "run"]

OFFER = "permessage-deflate; client_max_window_bits"
NOTIFICATION_BYTES = 4096
BATCH = 14  # notifications per POST: 14 x 4 KB stays under the default 64 KiB body limit
KINDS = ("plain", "deflate")


def notification(seq: int, room: str) -> dict:
    """A JSON notification whose envelope is about 4 KB: an order with its lines, the kind of
    document a notification service carries (repetitive keys, varied values)."""
    lines = [
        {"sku": f"SKU-{(seq * 31 + i * 7) % 100000:05d}", "name": f"Item {i} of order {seq}",
         "qty": (seq + i) % 9 + 1, "price": f"{(i * 137 + seq) % 5000 / 100:.2f}",
         "warehouse": ("eu-west", "us-east", "ap-south")[i % 3]}
        for i in range(41)
    ]
    return {"event": "order.updated", "message": f"order {seq} updated", "room": room,
            "data": {"seq": seq, "order": f"ORD-{seq:08d}", "customer": f"cust-{seq % 977}",
                     "status": "packed", "lines": lines}}


def _handshake(host: str, port: int, room: str, deflate: bool) -> socket.socket:
    key = base64.b64encode(os.urandom(16)).decode()
    sock = socket.create_connection((host, port), timeout=30)
    request = (f"GET /ws?rooms={room} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
               f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
               + (f"Sec-WebSocket-Extensions: {OFFER}\r\n" if deflate else "") + "\r\n")
    sock.sendall(request.encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed during the handshake")
        head += chunk
    head, _, rest = head.partition(b"\r\n\r\n")
    accept = accept_for(key)
    lower = head.lower()
    if not head.startswith(b"HTTP/1.1 101") or accept.lower() not in lower:
        raise ConnectionError(head[:200].decode("latin-1"))
    if deflate != (b"permessage-deflate" in lower):
        raise ConnectionError(f"deflate {'not ' if deflate else ''}negotiated: {head!r}")
    if deflate and b"server_no_context_takeover" not in lower:
        raise ConnectionError("no server_no_context_takeover")
    if rest:
        raise ConnectionError("frames before any notification")
    sock.setblocking(False)
    return sock


def _receiver(ctrl, host: str, port: int, room: str, n: int, deflate: bool) -> None:
    """Child process: ``n`` clients of one kind; counts frames and bytes until told to stop.
    Protocol over ``ctrl``: sends ("ready", n); then ("count",) -> (frames, bytes, errors);
    ("reset",) zeroes the counts; ("exit",) ends."""
    socks = [_handshake(host, port, room, deflate) for _ in range(n)]
    ep = select.epoll()
    rem = {}
    for s in socks:
        ep.register(s.fileno(), select.EPOLLIN)
        rem[s.fileno()] = b""
    by_fd = {s.fileno(): s for s in socks}
    checked: set[int] = set()
    frames = nbytes = errors = 0
    ctrl.send(("ready", n))
    while True:
        if ctrl.poll():
            msg = ctrl.recv()
            if msg[0] == "count":
                ctrl.send((frames, nbytes, errors))
            elif msg[0] == "reset":
                frames = nbytes = errors = 0
                ctrl.send(("reset",))
            else:
                break
        for fd, _ in ep.poll(0.05):
            try:
                data = by_fd[fd].recv(1 << 20)
            except BlockingIOError:
                continue
            if not data:
                errors += 1
                ep.unregister(fd)
                continue
            nbytes += len(data)
            buf = rem[fd] + data
            pos, size = 0, len(buf)
            while size - pos >= 2:
                length, head = buf[pos + 1] & 0x7F, 2
                if length == 126:
                    if size - pos < 4:
                        break
                    length, head = int.from_bytes(buf[pos + 2:pos + 4], "big"), 4
                elif length == 127:
                    if size - pos < 10:
                        break
                    length, head = int.from_bytes(buf[pos + 2:pos + 10], "big"), 10
                end = pos + head + length
                if end > size:
                    break
                if fd not in checked:  # each connection's first frame: really the message?
                    checked.add(fd)
                    payload = buf[pos + head:end]
                    compressed = bool(buf[pos] & 0x40)
                    if compressed:
                        payload = zlib.decompressobj(-15).decompress(payload + b"\0\0\xff\xff")
                    if compressed != deflate or "seq" not in json.loads(payload)["data"]:
                        errors += 1
                frames += 1
                pos = end
            rem[fd] = buf[pos:]
    for s in socks:
        s.close()


def _post_all(host: str, port: int, room: str, count: int) -> float:
    """POST ``count`` notifications to ``room`` in batches of ``BATCH``; returns the seconds
    taken."""
    conn = http.client.HTTPConnection(host, port, timeout=30)
    started = time.monotonic()
    try:
        for first in range(0, count, BATCH):
            body = json.dumps([notification(seq, room)
                               for seq in range(first, min(first + BATCH, count))],
                              separators=(",", ":"))
            conn.request("POST", "/notify", body, {"Content-Type": "application/json"})
            response = conn.getresponse()
            answer = response.read()
            if response.status != 200:
                raise RuntimeError(f"POST /notify: {response.status} {answer[:200]!r}")
    finally:
        conn.close()
    return time.monotonic() - started


def _counts(pipe) -> tuple[int, int, int]:
    pipe.send(("count",))
    return pipe.recv()


def run(args, start_server, log) -> int:
    """Run the scenario; prints one JSON line per kind (medians) and a ratio line."""
    n, messages = args.compress_clients, args.compress_messages
    srv = start_server(2 * n + 64, "compress4k")
    ctx = mp.get_context("fork")
    pipes, procs = {}, {}
    sample = json.dumps(notification(0, "plain"), separators=(",", ":")).encode()
    per_kind: dict[str, list[dict]] = {k: [] for k in KINDS}
    code = 0
    try:
        for kind in KINDS:
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=_receiver, daemon=True,
                               args=(theirs, "127.0.0.1", srv.port, kind, n, kind == "deflate"))
            proc.start()
            pipes[kind], procs[kind] = ours, proc
        for kind in KINDS:
            if not pipes[kind].poll(120):
                raise RuntimeError(f"{kind} clients did not connect")
            log(f"[compress4k] {pipes[kind].recv()[1]} {kind} clients connected")
        srv.wait_clients(2 * n, 60)
        _post_all("127.0.0.1", srv.port, "plain", BATCH)  # warm-up, both kinds
        _post_all("127.0.0.1", srv.port, "deflate", BATCH)
        time.sleep(1)
        for run_no in range(args.runs):
            order = ["none", *KINDS]
            order = order[run_no % 3:] + order[:run_no % 3]  # rotate: no kind always first
            cpu: dict[str, float] = {}
            for phase in order:
                for pipe in pipes.values():
                    pipe.send(("reset",))
                    pipe.recv()
                cpu0 = srv.cpu_s()
                _post_all("127.0.0.1", srv.port, "empty" if phase == "none" else phase, messages)
                if phase != "none":
                    deadline = time.monotonic() + 60
                    while _counts(pipes[phase])[0] < n * messages:
                        if time.monotonic() > deadline:
                            raise RuntimeError(f"{phase}: not every delivery arrived in 60 s")
                        time.sleep(0.02)
                cpu[phase] = srv.cpu_s() - cpu0
                if phase == "none":
                    continue
                frames, nbytes, errors = _counts(pipes[phase])
                deliveries = n * messages
                rec = {
                    "kind": phase, "run": run_no + 1, "clients": n, "messages": messages,
                    "errors": errors,
                    "bytes_per_delivery": round(nbytes / deliveries, 1),
                    "cpu_us_per_delivery": round(cpu[phase] / deliveries * 1e6, 3),
                }
                per_kind[phase].append(rec)
                log(f"[compress4k] run {run_no + 1} {json.dumps(rec)}")
                if errors or frames != deliveries:
                    code = 1
            publish_us = cpu["none"] / messages * 1e6
            for kind in KINDS:
                rec = per_kind[kind][-1]
                rec["publish_cpu_us_per_notification"] = round(publish_us, 1)
                rec["fanout_cpu_us_per_delivery"] = round(
                    (cpu[kind] - cpu["none"]) / (n * messages) * 1e6, 3)
        medians = {}
        for kind in KINDS:
            recs = per_kind[kind]
            med = {key: statistics.median(r[key] for r in recs) for key in (
                "bytes_per_delivery", "cpu_us_per_delivery", "fanout_cpu_us_per_delivery",
                "publish_cpu_us_per_notification")}
            medians[kind] = med
            print(json.dumps({"scenario": "compress4k", "server": "wsserver", "kind": kind,
                              "clients": n, "messages": messages, "runs": len(recs),
                              "notification_json_bytes": len(sample), **med,
                              "date": time.strftime("%Y-%m-%d %H:%M:%S")}), flush=True)
        plain, deflate = medians["plain"], medians["deflate"]
        print(json.dumps({"ratio": "deflate/plain", "scenario": "compress4k", **{
            key: round(deflate[key] / plain[key], 3) for key in (
                "bytes_per_delivery", "cpu_us_per_delivery", "fanout_cpu_us_per_delivery")}}),
            flush=True)
    finally:
        for kind, pipe in pipes.items():
            try:
                pipe.send(("exit",))
            except OSError:
                pass
            procs[kind].join(10)
            if procs[kind].is_alive():
                procs[kind].kill()
        srv.stop()
    return code
