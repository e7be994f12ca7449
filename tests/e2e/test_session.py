"""End-to-end halves of the session limits (attacks d, e and f of issue 12 against a real
gunicorn): the flooders are cut with the documented close code and their memory freed, and
resume loops do not crowd publishers out. The in-process tests are in tests/test_session.py."""

from __future__ import annotations

import json
import multiprocessing
import socket
import threading
import time

import pytest
import rawws
import requests
from rawws import OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, client_frame, close_code
from support import RawClient, wait_for

OP_CONT = 0x0

def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _server_closes(server) -> dict[str, float]:
    """``wsserver_server_closes_total`` by reason, from /metrics."""
    text = requests.get(server.url + "/metrics", timeout=5).text
    out = {}
    for line in text.splitlines():
        if line.startswith("wsserver_server_closes_total{"):
            labels, _, value = line.rpartition(" ")
            reason = labels.split('reason="', 1)[1].split('"', 1)[0]
            out[reason] = float(value)
    return out


class _Flood:
    """Send ``chunk`` over ``sock`` as fast as the kernel takes it (after ``first``), on a
    thread, while the caller reads what the server answers. Stops at ``stop()``, when the
    server cuts the connection, or after ``seconds``."""

    def __init__(self, sock: socket.socket, first: bytes, chunk: bytes, seconds: float) -> None:
        self.sock, self.first, self.chunk, self.seconds = sock, first, chunk, seconds
        self.sent = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "_Flood":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        deadline = time.monotonic() + self.seconds
        try:
            self.sock.sendall(self.first)
            while not self._stop.is_set() and time.monotonic() < deadline:
                self.sock.sendall(self.chunk)
                self.sent += 1
        except OSError as exc:  # the server cut us off (or our send timed out)
            self.error = exc


def _read_until_cut(sock: socket.socket, timeout: float) -> tuple[list, float | None, float]:
    """Read the server's frames until it ends the connection (EOF/reset) or ``timeout``.
    Returns the frames, when the close frame arrived and when the connection ended
    (monotonic), the end being ``inf`` if it never did."""
    parser = rawws.FrameParser()
    frames: list[tuple[int, bytes]] = []
    closed_at = None
    deadline = time.monotonic() + timeout
    sock.settimeout(0.2)
    while time.monotonic() < deadline:
        try:
            data = sock.recv(1 << 20)
        except socket.timeout:
            continue
        except OSError:
            return frames, closed_at, time.monotonic()
        if not data:
            return frames, closed_at, time.monotonic()
        for frame in parser.feed(data):
            frames.append(frame)
            if frame[0] == OP_CLOSE and closed_at is None:
                closed_at = time.monotonic()
    return frames, closed_at, float("inf")


# -- attack d: empty continuation frames ----------------------------------------------------


@pytest.mark.timeout(90)
def test_continuation_flooder_is_closed_1009_within_seconds_and_its_memory_freed(make_server):
    server = make_server({"WSSERVER_ENV": "development"})
    pid = server.worker_pid()
    before = _server_closes(server).get("too_many_fragments", 0)
    start_rss = _rss_kib(pid)
    rss_after = []
    empty_continuations = client_frame(OP_CONT, b"", fin=False) * 2000
    for _round in range(2):
        sock, _ = rawws.open_ws(server.port)
        began = time.monotonic()
        with _Flood(sock, client_frame(OP_TEXT, b"x", fin=False), empty_continuations, 5.0):
            frames, closed_at, ended_at = _read_until_cut(sock, timeout=8)
            assert requests.get(server.url + "/", timeout=2).status_code == 200  # bystander
        sock.close()
        closes = [p for op, p in frames if op == OP_CLOSE]
        assert closes, "the flooder was never sent a close frame"
        assert close_code(closes[0]) == 1009
        assert b"WSSERVER_MAX_FRAGMENTS" in closes[0][2:]
        assert closed_at - began < 2.0, "closed within 2 s"
        assert ended_at - began < 4.0, "and cut off within 4 s"
        rss_after.append(_rss_kib(pid))
    # what the flooder made the worker hold is returned: neither round leaves it bigger
    assert max(rss_after) - start_rss < 8 * 1024, (start_rss, rss_after)
    wait_for(lambda: _server_closes(server).get("too_many_fragments", 0) == before + 2,
             message="both closes counted in /metrics")


# -- attack e: pings as fast as possible ----------------------------------------------------


@pytest.mark.timeout(60)
def test_ping_flooder_is_closed_1008_and_most_of_its_pings_never_answered(make_server):
    server = make_server({"WSSERVER_ENV": "development"})
    sock, _ = rawws.open_ws(server.port)
    began = time.monotonic()
    with _Flood(sock, b"", client_frame(OP_PING, b"") * 2000, 5.0) as flood:
        frames, closed_at, ended_at = _read_until_cut(sock, timeout=8)
    sock.close()
    closes = [p for op, p in frames if op == OP_CLOSE]
    assert closes and close_code(closes[0]) == 1008, frames[-3:]
    assert b"WSSERVER_MAX_CONTROL_RATE" in closes[0][2:]
    assert closed_at - began < 2.0 and ended_at - began < 4.0
    pongs = sum(1 for op, _ in frames if op == OP_PONG)
    assert flood.sent >= 1 and pongs <= 100, f"{pongs} pongs answered before the close"
    assert _server_closes(server).get("control_rate", 0) == 1


# -- attack f: resume loops crowding publishers out ----------------------------------------


def _resume_attack(port: int, room: str, since: str, seconds: float, out) -> None:
    """Child process: 20 raw WebSockets loop ``subscribe`` with ``since`` as fast as the
    server takes them, reading (and discarding) what comes back; a connection the server
    closes is replaced, so the pressure lasts ``seconds``."""
    import selectors

    command = client_frame(OP_TEXT, json.dumps(
        {"type": "subscribe", "room": room, "since": since}).encode()) * 10
    sel = selectors.DefaultSelector()
    stats = {"connections": 0, "commands": 0, "closed": 0}

    def connect() -> None:
        sock, _ = rawws.open_ws(port, timeout=5)
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, [command, 0])
        stats["connections"] += 1

    deadline = time.monotonic() + seconds
    for _ in range(20):
        connect()
    while time.monotonic() < deadline:
        for key, events in sel.select(0.1):
            sock, state = key.fileobj, key.data
            alive = True
            try:
                if events & selectors.EVENT_READ:
                    alive = bool(sock.recv(1 << 20))
                if alive and events & selectors.EVENT_WRITE:
                    sent = sock.send(state[0][state[1]:])
                    state[1] += sent
                    if state[1] == len(state[0]):
                        state[1] = 0
                        stats["commands"] += 10
            except BlockingIOError:
                pass
            except OSError:
                alive = False
            if not alive:
                sel.unregister(sock)
                sock.close()
                stats["closed"] += 1
                if time.monotonic() < deadline:
                    try:
                        connect()
                    except (OSError, rawws.HandshakeRefused):
                        pass
    out.put(stats)


@pytest.mark.timeout(90)
@pytest.mark.serial
def test_resume_loops_do_not_crowd_publishers_out(make_server):
    server = make_server({"WSSERVER_ENV": "development"}, threads=96)
    ids = [server.notify({"event": "h", "room": "hist", "data": i}).json()["id"]
           for i in range(100)]
    # the bystander: a well-behaved client in room "live", reading everything
    live = RawClient(server, timeout=10)
    live.send_text(json.dumps({"type": "subscribe", "room": "live"}))
    assert json.loads(live.recv_until(OP_TEXT)[1])["type"] == "subscribed"
    received: list[str] = []
    reader_done = threading.Event()

    def read_live() -> None:
        try:
            while not reader_done.is_set():
                op, payload = live.recv_frame()
                if op == OP_TEXT:
                    received.append(json.loads(payload)["id"])
                elif op == OP_PING:
                    live.send_frame(OP_PONG, payload)
        except (OSError, EOFError):
            pass

    reader = threading.Thread(target=read_live, daemon=True)
    reader.start()
    out = multiprocessing.get_context("fork").Queue()
    attack = multiprocessing.get_context("fork").Process(
        target=_resume_attack, args=(server.port, "hist", ids[0], 5.0, out), daemon=True)
    attack.start()
    statuses, latencies, posted = [], [], []
    try:
        time.sleep(0.5)  # let the attack build up before probing (pacing, not syncing)
        next_at = time.monotonic()
        while attack.is_alive() and len(statuses) < 45:
            began = time.monotonic()
            r = requests.post(server.url + "/notify", json={"event": "probe", "room": "live"},
                              headers={"Connection": "close"}, timeout=5)
            latencies.append(time.monotonic() - began)
            statuses.append(r.status_code)
            if r.status_code == 200:
                posted.append(r.json()["id"])
            next_at += 0.1
            time.sleep(max(next_at - time.monotonic(), 0))
        stats = out.get(timeout=20)
        attack.join(10)
    finally:
        if attack.is_alive():
            attack.kill()
    assert len(statuses) >= 30
    assert stats["commands"] > 1000, stats  # the attack really ran
    assert statuses.count(200) == len(statuses), statuses
    p99 = sorted(latencies)[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    assert p99 < 0.25, f"POST /notify p99 {p99 * 1000:.0f} ms"
    wait_for(lambda: set(posted) <= set(received), timeout=10,
             message="the well-behaved client got every notification")
    reader_done.set()
    live.close()
    closes = _server_closes(server)
    assert closes.get("command_rate", 0) + closes.get("slow_consumer", 0) >= 1, closes
