"""The delivery engine end to end: one writer per socket, slow consumers isolated,
keepalive, one thread per connection (compression: tests/e2e/test_compression.py)."""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import threading
import time

import pytest
import requests
import websocket
from rawws import OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, RawClient, close_code
from support import connect, thread_count, wait_for


def _post_many(server, count: int, payload_size: int = 0, start: int = 0,
               rate: float = 0) -> list[float]:
    """POST ``count`` notifications in order (``rate`` per second if given); returns the
    send times."""
    session = requests.Session()
    pad = "x" * payload_size
    sent = []
    began = time.monotonic()
    for i in range(start, start + count):
        if rate:
            delay = began + (i - start) / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)  # pacing the publisher, not waiting for a result
        t = time.time()
        r = session.post(server.url + "/notify",
                         json={"event": "n", "data": {"seq": i, "t": t, "pad": pad}}, timeout=10)
        assert r.status_code == 200, r.text
        sent.append(t)
    return sent


def test_frames_never_interleave_with_pongs_under_constant_pings(make_server):
    """20 clients ping the server as fast as it answers while 5,000 broadcasts flow: every
    frame parses (RawClient asserts the framing) and every broadcast arrives, in order."""
    # pings back to back are what this test is about, not the control-frame rate limit
    server = make_server({"WSSERVER_ENV": "development", "WSSERVER_ENQUEUE_TIMEOUT": "20",
                          "WSSERVER_MAX_CONTROL_RATE": "0"})
    clients = [RawClient(server, timeout=60) for _ in range(20)]
    publisher = RawClient(server, timeout=60)  # broadcasts via the original's rebroadcast
    wait_for(lambda: server.health()["clients"] == 21, message="21 clients")
    total = 5000
    stop = threading.Event()
    results: dict[int, tuple[list[int], int]] = {}
    errors: list[BaseException] = []

    def run(index: int, client: RawClient) -> None:
        seqs: list[int] = []
        pongs = 0
        pings_out = 0
        try:
            while len(seqs) < total:
                if pings_out == pongs:  # a ping in flight the whole time
                    client.send_frame(OP_PING, f"p{pings_out}".encode())
                    pings_out += 1
                op, payload = client.recv_frame()
                if op == OP_PONG:
                    assert payload == f"p{pongs}".encode(), "pongs answer pings in order"
                    pongs += 1
                elif op == OP_TEXT:
                    seqs.append(json.loads(payload)["seq"])
                elif op == OP_PING:  # the server's own keepalive
                    client.send_frame(OP_PONG, payload)
                else:
                    raise AssertionError(f"unexpected opcode {op}")
        except BaseException as exc:  # reported to the main thread
            errors.append(exc)
        results[index] = (seqs, pongs)

    threads = [threading.Thread(target=run, args=(i, c), daemon=True) for i, c in enumerate(clients)]
    for t in threads:
        t.start()
    try:
        for i in range(total):
            publisher.send_text(json.dumps({"seq": i}))
        for t in threads:
            t.join(120)
    finally:
        stop.set()
        for c in clients:
            c.close()
        publisher.close()
    assert not errors, errors[:3]
    for seqs, pongs in results.values():
        assert seqs == list(range(total))
        assert pongs > 0


def _receipts(clients: list[RawClient], count: int, timeout: float) -> list[tuple[int, float]]:
    """Read ``count`` notifications on every client (one selector loop); return
    (seq, receive time) for each delivery. Cheap per frame, so the reader keeps up."""
    import selectors

    sel = selectors.DefaultSelector()
    remaining = {}
    for c in clients:
        c.sock.setblocking(False)
        sel.register(c.sock, selectors.EVENT_READ, c)
        remaining[c] = count
    out: list[tuple[int, float]] = []
    deadline = time.monotonic() + timeout
    while any(remaining.values()):
        assert time.monotonic() < deadline, "deliveries did not all arrive in time"
        for key, _ in sel.select(0.5):
            c: RawClient = key.data
            try:
                c.feed(c.sock.recv(1 << 20))
            except BlockingIOError:
                continue
            now = time.time()
            while remaining[c]:
                frame = c.next_buffered()
                if frame is None:
                    break
                op, payload = frame
                if op == OP_TEXT:
                    at = payload.index(b'"seq":') + 6
                    out.append((int(payload[at:payload.index(b",", at)]), now))
                    remaining[c] -= 1
    sel.close()
    return out


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[int(len(ordered) * 0.99) - 1]


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.serial
def test_stalled_client_is_dropped_and_does_not_slow_the_others(make_server):
    """100 readers + 1 client that never reads: while 3,600 notifications flow the readers'
    p99 latency stays within 2x of the runs without it, the stalled client is dropped as a
    slow consumer, and the worker's memory stays bounded.

    Runs without the stalled client come before *and* after the run with it: on a shared
    2-core machine one run's p99 can move by 2x on its own, so the bound is taken against
    the slower of the two runs around it, which samples the machine's noise at that time.
    A run is 1,200 notifications: every reader gets each one, so its p99 is the worst 1 % of
    the messages; at 700 a single 30 ms stall of the host (8 messages at 250/s) was that 1 %,
    and failed the bound once in CI (14 / 10 ms alone, 33 ms with the stalled client)."""
    # a generous close timeout: the stalled client resumes reading once it sees it was
    # dropped, and must then find the close frame behind the data already in flight
    server = make_server({"WSSERVER_ENV": "development", "WSSERVER_CLIENT_BUFFER": "65536",
                          "WSSERVER_SEND_BUFFER": "65536", "WSSERVER_CLOSE_TIMEOUT": "15"},
                         threads=160)
    readers = [RawClient(server, timeout=30) for _ in range(100)]
    wait_for(lambda: server.health()["clients"] == 100, message="100 readers")
    pid = server.worker_pid()
    per_run, pad = 1200, 300  # 3 runs x 1,200 = 3,600 notifications of ~400 bytes

    def measured_run(start: int, count: int = per_run) -> float:
        # readers in a child process and a paced publisher, so the figure is the server's
        # delivery latency, not this process's GIL or a queue of our own making
        ctx = multiprocessing.get_context("fork")
        parent_end, child_end = ctx.Pipe()

        def read() -> None:
            child_end.send(_receipts(readers, count, 60))

        proc = ctx.Process(target=read, daemon=True)
        proc.start()
        try:
            sent = _post_many(server, count, payload_size=pad, start=start, rate=250)
            assert parent_end.poll(90), "readers did not finish"
            latencies = [t - sent[seq - start] for seq, t in parent_end.recv()]
        finally:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
        assert len(latencies) == count * len(readers)
        return _p99(latencies)

    # warm-up, not measured: the first few seconds of traffic on fresh connections are slower
    # (p99 60-90 ms here, then 10-20 ms; TCP windows growing), which would skew the baseline
    measured_run(10_000, 700)
    baseline_p99 = measured_run(0)
    rss_before = _rss_kb(pid)
    stalled = RawClient(server, rcvbuf=4096, timeout=30)
    wait_for(lambda: server.health()["clients"] == 101, message="stalled client registered")
    stalled_p99 = measured_run(per_run)
    rss_after = _rss_kb(pid)

    # dropped as a slow consumer: out of the registry, then sent close 1008 "slow consumer"
    wait_for(lambda: server.health()["clients"] == 100, timeout=10, message="stalled client dropped")
    stalled.sock.settimeout(10)
    frames = []
    try:
        while True:
            frames.append(stalled.recv_frame())
    except (EOFError, ConnectionError, socket.timeout):
        pass
    closes = [p for op, p in frames if op == OP_CLOSE]
    assert closes and close_code(closes[-1]) == 1008 and b"slow consumer" in closes[-1]
    assert all(op == OP_TEXT for op, _ in frames[:-1]), "whole frames, then the close"
    stalled.close()
    after_p99 = measured_run(2 * per_run)
    print(f"readers' p99: {baseline_p99 * 1000:.1f} / {after_p99 * 1000:.1f} ms alone (before / after), "
          f"{stalled_p99 * 1000:.1f} ms with a stalled client")
    alone_p99 = max(baseline_p99, after_p99)
    assert stalled_p99 <= 2 * alone_p99 + 0.002, (baseline_p99, stalled_p99, after_p99)
    assert rss_after - rss_before < 20 * 1024, "worker memory grew by more than 20 MiB"
    for c in readers + [stalled]:
        c.close()


def test_keepalive_closes_a_peer_that_never_answers(make_server):
    """A half-open peer (never answers pings, never sends FIN) is closed and removed; a
    live client (websocket-client answers pings) stays connected over the same time."""
    server = make_server({"WSSERVER_ENV": "development", "WSSERVER_PING_INTERVAL": "0.2",
                          "WSSERVER_PING_TIMEOUT": "0.3", "WSSERVER_CLOSE_TIMEOUT": "0.5"})
    pid = server.worker_pid()
    live = connect(server)
    received: list[dict] = []

    def keep_reading() -> None:  # websocket-client answers pings only inside recv()
        try:
            while True:
                received.append(json.loads(live.recv()))
        except Exception:
            pass

    reader = threading.Thread(target=keep_reading, daemon=True)
    reader.start()
    wait_for(lambda: server.health()["clients"] == 1)
    threads_after: list[int] = []
    for _cycle in range(3):
        deaf = RawClient(server, timeout=10)  # reads nothing until the end, answers nothing
        wait_for(lambda: server.health()["clients"] == 2)
        started = time.monotonic()
        wait_for(lambda: server.health()["clients"] == 1, timeout=5, message="deaf peer removed")
        assert time.monotonic() - started < 3
        threads_after.append(thread_count(pid))
        if _cycle < 2:
            deaf.close()
    # each deaf peer's thread went back to gunicorn's pool and served the next one: the
    # worker's thread count does not grow from one cycle to the next
    assert threads_after[2] <= threads_after[0] + 1, threads_after
    frames = []
    try:
        while True:
            frames.append(deaf.recv_frame())
    except (EOFError, ConnectionError, socket.timeout):
        pass
    assert [op for op, _ in frames if op == OP_PING], "the server pinged"
    closes = [p for op, p in frames if op == OP_CLOSE]
    assert closes and close_code(closes[-1]) == 1011
    deaf.close()
    # the live client answered every ping and is still served
    assert server.notify({"event": "still-here"}).status_code == 200
    wait_for(lambda: any(m.get("event") == "still-here" for m in received), message="live client served")
    live.close()
    reader.join(5)


def test_one_thread_per_idle_connection(make_server):
    server = make_server({"WSSERVER_ENV": "development"}, threads=120)
    pid = server.worker_pid()
    warm = [connect(server) for _ in range(5)]
    wait_for(lambda: server.health()["clients"] == 5)
    base = thread_count(pid)
    clients = [connect(server) for _ in range(60)]
    wait_for(lambda: server.health()["clients"] == 65, message="65 clients")
    added = thread_count(pid) - base
    assert 55 <= added <= 62, f"{added} threads for 60 idle connections"
    for c in clients + warm:
        c.close()
    wait_for(lambda: server.health()["clients"] == 0)
    # every connection's thread returned to gunicorn's pool (pool threads stay, idle)
    assert thread_count(pid) <= base + 62
    assert os.path.exists(f"/proc/{pid}")


def test_a_notification_posted_right_after_the_101_always_arrives(server):
    """A script connects and POSTs the moment its WebSocket is open: the 101 is sent only
    once the client is in the hub and its rooms (``transport.defer_upgrade_response``), so a
    200 after the client's 101 always reaches it. Four threads, 25 rounds each, each round a
    new connection and a POST at once; under load the old order lost some (a test waited
    10 s for a message that had been delivered to nobody)."""
    failures: list[str] = []

    def rounds(worker: int) -> None:
        with requests.Session() as session:
            for n in range(25):
                room = f"first-{worker}-{n}"
                ws = websocket.create_connection(f"{server.ws_url}?rooms={room}", timeout=10)
                try:
                    answer = session.post(server.url + "/notify", timeout=10,
                                          json={"event": "first", "room": room})
                    if answer.status_code != 200 or answer.json().get("clients") != 1:
                        failures.append(f"{room}: {answer.status_code} {answer.text}")
                        continue
                    got = json.loads(ws.recv())
                    if got.get("event") != "first" or got.get("room") != room:
                        failures.append(f"{room}: got {got}")
                except Exception as exc:  # noqa: BLE001 - reported below
                    failures.append(f"{room}: {exc!r}")
                finally:
                    ws.close()

    threads = [threading.Thread(target=rounds, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    assert not failures, failures[:5]
