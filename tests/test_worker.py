"""The shipped gunicorn worker's thread pool (wsserver.worker): ThreadPoolExecutor's
behaviour with daemon threads, so that starting the N-th connection's thread does not cost
O(N) on Python < 3.13 (see the module docstring)."""

from __future__ import annotations

import json
import selectors
import socket
import threading
import time

import pytest
import requests
from support import GunicornServer, connect, wait_for

from wsserver.intake import LingeringCloses, PendingConnections, request_end
from wsserver.worker import DaemonThreadPool

WAIT = 10


def test_results_and_exceptions_reach_the_future():
    pool = DaemonThreadPool(max_workers=2)
    try:
        assert pool.submit(lambda a, b=0: a + b, 2, b=3).result(WAIT) == 5
        failed = pool.submit(lambda: 1 / 0)
        assert isinstance(failed.exception(WAIT), ZeroDivisionError)
        done = []
        future = pool.submit(lambda: "x")
        future.add_done_callback(done.append)
        future.result(WAIT)
        wait_for(lambda: done == [future], timeout=WAIT)
    finally:
        pool.shutdown()


def test_threads_are_daemons_reused_when_idle_and_capped():
    pool = DaemonThreadPool(max_workers=3)
    try:
        for i in range(20):  # one at a time: the idle thread takes each, no new thread
            assert pool.submit(lambda i=i: i).result(WAIT) == i
        assert len(pool._threads) == 1

        release = threading.Event()
        running = threading.Semaphore(0)

        def block() -> str:
            running.release()
            release.wait(WAIT)
            return threading.current_thread().name

        blocked = [pool.submit(block) for _ in range(5)]
        for _ in range(3):
            assert running.acquire(timeout=WAIT), "three tasks run at once"
        assert not running.acquire(timeout=0.2), "a fourth runs only when one of three ends"
        assert len(pool._threads) == 3
        assert all(t.daemon for t in pool._threads)
        release.set()
        names = {f.result(WAIT) for f in blocked}
        assert names <= {t.name for t in pool._threads}
    finally:
        pool.shutdown()


def test_shutdown_joins_and_refuses_new_work():
    pool = DaemonThreadPool(max_workers=4)
    futures = [pool.submit(threading.Event().wait, 0.05) for _ in range(4)]
    pool.shutdown(wait=True)
    assert all(f.done() for f in futures)
    assert not any(t.is_alive() for t in pool._threads)
    with pytest.raises(RuntimeError):
        pool.submit(print)


def test_shutdown_can_cancel_queued_work():
    pool = DaemonThreadPool(max_workers=1)
    gate = threading.Event()
    first = pool.submit(gate.wait, WAIT)
    queued = [pool.submit(print) for _ in range(3)]
    pool.shutdown(wait=False, cancel_futures=True)
    gate.set()
    assert first.result(WAIT) is True
    assert all(f.cancelled() for f in queued)


def test_shipped_config_runs_this_worker():
    """``gunicorn -c python:wsserver.gunicorn_conf`` runs wsserver.worker.ThreadWorker, and
    it serves WebSockets and HTTP."""
    with GunicornServer() as server:
        assert "Using worker: wsserver.worker.ThreadWorker" in server.log()
        ws = connect(server)
        try:
            wait_for(lambda: server.health()["clients"] == 1, timeout=WAIT)
        finally:
            ws.close()


# -- hostile clients against the accept / request-head / close path ------------------------
# Each attack runs a few seconds against a real gunicorn on default settings while a
# bystander opens a fresh connection every 100 ms for `GET /` and another for `POST /notify`:
# none may fail and the p99 must stay under 250 ms (issue 12, "Must hold" a, b, c).

PROBE_P99 = 0.25


class Bystander:
    """A well-behaved client probing the server from its own thread: fresh connections,
    `GET /` then `POST /notify`, every 100 ms, each with a 2 s timeout."""

    def __init__(self, server: GunicornServer) -> None:
        self.server = server
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bystander", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for method, path, body in (("GET", "/", None), ("POST", "/notify", NOTE)):
                start = time.monotonic()
                try:
                    r = requests.request(method, self.server.url + path, json=body, timeout=2)
                    if r.status_code != 200:
                        self.failures.append(f"{method} {path}: {r.status_code}")
                except requests.RequestException as exc:
                    self.failures.append(f"{method} {path}: {exc.__class__.__name__}")
                self.latencies.append(time.monotonic() - start)
            self._stop.wait(0.1)

    def __enter__(self) -> "Bystander":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(WAIT)

    def check(self) -> None:
        assert not self.failures, f"{len(self.failures)} probes failed: {self.failures[:5]}"
        assert len(self.latencies) >= 20, f"the probe ran only {len(self.latencies)} times"
        ordered = sorted(self.latencies)
        p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
        print(f"probe: {len(ordered)} requests, p50 {ordered[len(ordered) // 2] * 1000:.1f} ms, "
              f"p99 {p99 * 1000:.1f} ms, max {ordered[-1] * 1000:.1f} ms")
        worst = ", ".join(f"{t * 1000:.0f}" for t in ordered[-5:])
        assert p99 < PROBE_P99, f"probe p99 {p99 * 1000:.0f} ms (worst five: {worst} ms)"


NOTE = {"event": "probe", "message": "m"}


def _raw(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return sock


def _close_all(socks: list[socket.socket]) -> None:
    for sock in socks:
        try:
            sock.close()
        except OSError:
            pass


LINGERING_REQUESTS = (
    b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    b"GET / HTTP/1.0\r\n\r\n",
    b"GET / HTTP/9.9\r\n\r\n",
)


@pytest.mark.timeout(60)
def test_attack_a_lingering_closes_do_not_freeze_accept():
    """50 new sockets a second, each sending a request that ends in a close (Connection:
    close, HTTP/1.0, a malformed request line) and then neither reading nor closing."""
    with GunicornServer() as server, Bystander(server) as probe:
        held: list[socket.socket] = []
        try:
            end = time.monotonic() + 4
            while time.monotonic() < end:
                sock = _raw(server.port)
                sock.sendall(LINGERING_REQUESTS[len(held) % 3])
                held.append(sock)
                time.sleep(0.02)
        finally:
            probe.__exit__()
            _close_all(held)
        probe.check()


@pytest.mark.timeout(60)
def test_attack_b_slow_headers_do_not_pin_threads():
    """300 sockets from 127.0.0.1, each sending a request line and then one header line every
    2 s: more than the server's threads (64), and within the per-read idle timeout."""
    with GunicornServer() as server:
        held: list[socket.socket] = []
        try:
            for _ in range(300):
                sock = _raw(server.port)
                sock.sendall(b"GET / HTTP/1.1\r\n")
                held.append(sock)
            with Bystander(server) as probe:
                for round_ in range(3):
                    time.sleep(2)  # the attack's pace: one header line per socket every 2 s
                    for sock in held:
                        try:
                            sock.send(f"X-Slow-{round_}: 1\r\n".encode())
                        except OSError:
                            pass  # cut off by the server: that is the defence
        finally:
            _close_all(held)
        probe.check()


@pytest.mark.timeout(60)
def test_attack_c_silent_connections_hold_nothing():
    """300 sockets that connect and send nothing."""
    with GunicornServer() as server:
        held: list[socket.socket] = []
        try:
            with Bystander(server) as probe:
                for _ in range(300):
                    held.append(_raw(server.port))
                time.sleep(4)
        finally:
            _close_all(held)
        probe.check()


# -- the pieces the main thread drives (wsserver.intake), without a server ------------------


def test_request_end_finds_the_head_and_a_small_body():
    assert request_end(b"GET / HTTP/1.1\r\nHost: x\r\n", 100) is None
    head = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    assert request_end(head, 100) == (len(head), len(head))
    assert request_end(head + b"GET /next", 100) == (len(head), len(head))
    post = b"POST /notify HTTP/1.1\r\nContent-Length: 50\r\n\r\n"
    assert request_end(post, 100) == (len(post), len(post) + 50)
    # resuming the search where the last read ended finds a terminator split across reads
    assert request_end(head, 100, start=len(head) - 2) == (len(head), len(head))


@pytest.mark.parametrize("head", [
    b"POST / HTTP/1.1\r\nContent-Length: 101\r\n\r\n",  # over the cap: the thread reads it
    b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
    b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n",  # waits for 100
    b"POST / HTTP/1.1\r\nContent-Length: 5\r\ncontent-length: 6\r\n\r\n",  # gunicorn's call
    b"POST / HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
])
def test_request_end_leaves_other_bodies_to_the_thread(head):
    assert request_end(head, 100) == (len(head), len(head))


def test_pending_evicts_the_oldest_of_an_address_then_the_oldest_overall():
    pending: PendingConnections[str] = PendingConnections(4, 2, timeout=10)
    assert pending.add("a1", "A", now=0) == []
    assert pending.add("a2", "A", now=1) == []
    assert pending.add("a3", "A", now=2) == [("a1", "per_address")]
    assert pending.count("A") == 2 and "a1" not in pending
    assert pending.add("b1", "B", now=3) == []
    assert pending.add("b2", "B", now=4) == []
    assert pending.add("c1", "C", now=5) == [("a2", "total")]
    assert len(pending) == 4 and pending.oldest() == "a3"
    assert pending.discard("b1") and not pending.discard("b1")
    assert pending.count("B") == 1


def test_pending_expires_at_the_deadline_in_arrival_order():
    pending: PendingConnections[str] = PendingConnections(10, 10, timeout=5)
    for i, key in enumerate("xyz"):
        pending.add(key, "A", now=i)
    assert pending.deadline("x") == 5
    assert pending.expired(4.9) == []
    assert pending.expired(6) == ["x", "y"]
    pending.add("x", "A", now=6)  # a kept-alive connection's next request: a new deadline
    assert pending.expired(7) == ["z"] and pending.oldest() == "x"


@pytest.fixture
def poller():
    sel = selectors.DefaultSelector()
    yield sel
    sel.close()


def _pump(sel: selectors.BaseSelector, until, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, "the poller never got there"
        for key, _ in sel.select(0.05):
            key.data(key.fileobj)


def test_lingering_close_half_closes_drains_and_closes_at_the_peer_fin(poller):
    ours, peer = socket.socketpair()
    lingering = LingeringCloses(poller)
    lingering.add(ours)
    assert peer.recv(10) == b"", "our FIN went out at once"
    peer.sendall(b"x" * 1000)  # the rest of a request nobody reads: drained
    _pump(poller, lambda: True)
    assert len(lingering) == 1 and ours.fileno() != -1
    peer.close()
    _pump(poller, lambda: len(lingering) == 0)
    assert ours.fileno() == -1


def test_lingering_close_cuts_at_the_deadline_the_byte_cap_and_the_count_cap(poller):
    pairs = [socket.socketpair() for _ in range(4)]
    try:
        lingering = LingeringCloses(poller, cap=2, timeout=5, max_drain=1000)
        lingering.add(pairs[0][0], now=0)
        lingering.add(pairs[1][0], now=1)
        assert lingering.reap(now=4) == 0 and lingering.reap(now=5) == 1
        assert pairs[0][0].fileno() == -1 and len(lingering) == 1
        lingering.add(pairs[2][0], now=2)
        lingering.add(pairs[3][0], now=3)  # over the cap: the oldest goes at once
        assert pairs[1][0].fileno() == -1 and len(lingering) == 2
        pairs[2][1].sendall(b"y" * 2000)  # a peer that streams: cut at max_drain
        _pump(poller, lambda: pairs[2][0].fileno() == -1)
        lingering.close_all()
        assert len(lingering) == 0 and pairs[3][0].fileno() == -1
    finally:
        for a, b in pairs:
            a.close()
            b.close()


def test_lingering_close_of_a_dead_socket_just_closes(poller):
    ours, peer = socket.socketpair()
    peer.close()
    ours.close()
    LingeringCloses(poller).add(ours)  # no error, nothing registered
    assert not poller.get_map()


# -- each attacker is cut off, with a status, at a documented bound --------------------------


def _read_until_closed(sock: socket.socket, timeout: float = WAIT) -> tuple[bytes, float]:
    """Everything the server sends until it closes, and when the close came."""
    sock.settimeout(timeout)
    got = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            return got, time.monotonic()
        got += chunk


def _answer(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def _refusals(server: GunicornServer, reason: str) -> float:
    text = requests.get(server.url + "/metrics", timeout=5).text
    for line in text.splitlines():
        if line.startswith(f'wsserver_refusals_total{{reason="{reason}"}}'):
            return float(line.split()[-1])
    return 0.0


@pytest.fixture(scope="module")
def quick():
    """A server whose deadlines are short enough to measure in a test."""
    with GunicornServer(env={
        "WSSERVER_HANDSHAKE_TIMEOUT": "1.5",
        "WSSERVER_REQUEST_TIMEOUT": "2",
        "WSSERVER_MAX_PENDING_PER_IP": "20",
    }) as server:
        yield server


@pytest.mark.timeout(30)
@pytest.mark.parametrize("send", [
    b"",  # silent
    b"GET / HTTP/1.1\r\n",  # then a header line every 0.3 s, each within any idle timeout
    b"POST /notify HTTP/1.1\r\nContent-Length: 60\r\n\r\n{",  # a body that trickles in
])
def test_a_slow_request_is_cut_at_the_handshake_deadline_with_408(quick, send):
    before = _refusals(quick, "request_timeout")
    sock = _raw(quick.port)
    start = time.monotonic()
    try:
        sock.sendall(send)
        stop = threading.Event()

        def trickle() -> None:
            while send and not stop.wait(0.3):
                try:
                    sock.send(b"X-A: 1\r\n" if send.endswith(b"\r\n") else b" ")
                except OSError:
                    return

        threading.Thread(target=trickle, daemon=True).start()
        raw, closed_at = _read_until_closed(sock)
        stop.set()
    finally:
        sock.close()
    # the deadline, plus at most one turn of gthread's 1 s poll
    assert 1.5 <= closed_at - start < 3.0, f"cut after {closed_at - start:.2f} s"
    status, body = _answer(raw)
    assert (status, body["code"]) == (408, "request_timeout")
    assert "WSSERVER_HANDSHAKE_TIMEOUT=1.5" in body["error"]
    wait_for(lambda: _refusals(quick, "request_timeout") > before, timeout=WAIT)


@pytest.mark.timeout(30)
def test_a_chunked_body_that_trickles_is_cut_at_the_request_deadline(quick):
    """A body the poller cannot size holds a thread, but only until WSSERVER_REQUEST_TIMEOUT."""
    sock = _raw(quick.port)
    start = time.monotonic()
    try:
        sock.sendall(b"POST /notify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n1\r\n{\r\n")
        stop = threading.Event()

        def trickle() -> None:
            while not stop.wait(0.3):
                try:
                    sock.send(b"1\r\n \r\n")
                except OSError:
                    return

        threading.Thread(target=trickle, daemon=True).start()
        _, closed_at = _read_until_closed(sock)
        stop.set()
    finally:
        sock.close()
    assert 2.0 <= closed_at - start < 4.0, f"cut after {closed_at - start:.2f} s"


@pytest.mark.timeout(30)
def test_a_websocket_outlives_the_request_deadline(quick):
    ws = connect(quick)
    try:
        wait_for(lambda: quick.health()["clients"] == 1, timeout=WAIT)
        time.sleep(3.5)  # past WSSERVER_REQUEST_TIMEOUT=2 and one reaper turn: nothing to wait on
        assert quick.notify({"event": "still", "message": "here"}).status_code == 200
        assert json.loads(ws.recv())["event"] == "still"
    finally:
        ws.close()


@pytest.mark.timeout(30)
def test_an_address_full_of_slow_sockets_still_gets_its_good_request_in(quick):
    """100 silent sockets from 127.0.0.1 against WSSERVER_MAX_PENDING_PER_IP=20: the oldest
    are cut with 503, and a client from the same address that sends its request gets in."""
    held = [_raw(quick.port) for _ in range(100)]
    try:
        assert requests.get(quick.url + "/", timeout=2).status_code == 200
        raw, _ = _read_until_closed(held[0])
        status, body = _answer(raw)
        assert (status, body["code"]) == (503, "too_many_pending")
        assert "WSSERVER_MAX_PENDING_PER_IP=20" in body["error"]
        assert _refusals(quick, "too_many_pending") >= 80
    finally:
        _close_all(held)


@pytest.mark.timeout(30)
def test_a_head_over_the_cap_gets_431(quick):
    sock = _raw(quick.port)
    try:
        sock.sendall(b"GET / HTTP/1.1\r\n" + b"X-Big: " + b"a" * 40_000 + b"\r\n")
        status, body = _answer(_read_until_closed(sock)[0])
    finally:
        sock.close()
    assert (status, body["code"]) == (431, "request_head_too_large")
    assert "WSSERVER_MAX_REQUEST_HEAD=32768" in body["error"]


@pytest.mark.timeout(30)
def test_keep_alive_and_pipelined_requests_are_served(quick):
    with requests.Session() as session:
        for _ in range(5):
            assert session.get(quick.url + "/", timeout=5).status_code == 200
    sock = _raw(quick.port)
    try:
        one = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
        sock.sendall(one + one + b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        raw, _ = _read_until_closed(sock)
    finally:
        sock.close()
    assert raw.count(b"HTTP/1.1 200") == 3


@pytest.mark.timeout(60)
def test_gunicorn_gthread_still_serves_and_warns():
    with GunicornServer(args=["-k", "gthread"]) as server:
        assert requests.get(server.url + "/", timeout=5).status_code == 200
        ws = connect(server)
        ws.close()
        assert "Using worker: gthread" in server.log()
        assert "the defences against hostile clients are off" in server.log()
