"""wsserver.worker, in-process: its thread pool, ThreadPoolExecutor's behaviour with daemon
threads, so that starting the N-th connection's thread does not cost O(N) on Python < 3.13
(see the module docstring). The worker under gunicorn, and each attacker it cuts off:
``e2e/test_worker.py``."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import selectors
import socket
import sys
import threading
import time
import traceback
from typing import Any, Iterator

import pytest
import redis
from gunicorn.config import Config
from gunicorn.glogging import Logger
from rawws import OP_CLOSE, client_frame
from support import wait_for

from wsserver.broadcaster import Broadcaster
from wsserver.intake import LingeringCloses
from wsserver.worker import INLINE_MAX_BODY, DaemonThreadPool, ThreadWorker, _Conn

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
        assert pool.thread_count == 1

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
        assert pool.thread_count == 3
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


def test_idle_threads_retire_and_the_pool_grows_again():
    """A burst of connections must not leave its threads behind for good (the one-hour soak's
    thread and RSS creep)."""
    pool = DaemonThreadPool(max_workers=8, idle_timeout=0.2)
    try:
        release = threading.Event()
        burst = [pool.submit(release.wait, WAIT) for _ in range(6)]
        wait_for(lambda: pool.thread_count == 6, timeout=WAIT)
        threads = set(pool._threads)
        release.set()
        assert all(f.result(WAIT) for f in burst)
        wait_for(lambda: pool.thread_count == 0, timeout=WAIT)
        for thread in threads:
            thread.join(WAIT)
            assert not thread.is_alive()
        assert pool.submit(lambda: "again").result(WAIT) == "again"
        assert pool.thread_count == 1
        assert next(iter(pool._threads)).name not in {t.name for t in threads}
    finally:
        pool.shutdown()


def test_no_work_is_stranded_when_submits_race_retirement():
    """Submits land just as the only idle thread times out: every item must still run. A
    thread may leave only by taking an unpromised idle permit, so a queued item keeps a thread.
    (Letting the thread leave regardless strands an item within a few hundred rounds here.)"""
    pool = DaemonThreadPool(max_workers=1, idle_timeout=0.001)
    try:
        gap = threading.Event()
        for n in range(1500):
            assert pool.submit(lambda n=n: n).result(2) == n, f"round {n}"
            gap.wait(0.001)  # about the idle timeout: the thread is leaving as the next comes
        assert pool.thread_count <= 1
    finally:
        pool.shutdown()


def test_a_busy_requests_thread_keeps_no_start_event_of_its_own():
    """A WebSocket's request stays on its thread for the connection's life: the thread's
    "started" Event is the shared one (docs/performance.md, "where the KB go"), and the
    thread still reports alive, then joins."""
    pool = DaemonThreadPool(max_workers=4)
    release = threading.Event()
    threads: list[threading.Thread] = []

    def hold() -> str:
        threads.append(threading.current_thread())
        release.wait(10)
        return "held"

    try:
        held = pool.submit(hold)
        other = pool.submit(hold)
        wait_for(lambda: len(threads) == 2)
        for thread in threads:
            assert thread.is_alive() and "started" in repr(thread)
            assert thread._started is threads[0]._started  # type: ignore[attr-defined]
        release.set()
        assert held.result(timeout=5) == other.result(timeout=5) == "held"
    finally:
        release.set()
        pool.shutdown(wait=True)
    for thread in threads:
        assert not thread.is_alive()
        thread.join(1)


# -- POST /notify on the main thread -------------------------------------------------------


class _Gate:
    """A broadcaster task that holds its thread until released, so the queue fills."""

    def __init__(self) -> None:
        self.entered, self.release = threading.Event(), threading.Event()

    def run(self, broadcaster: Broadcaster) -> None:
        self.entered.set()
        self.release.wait(WAIT)


class _App:
    """What gunicorn hands a worker: an object whose ``wsgi()`` is the app."""

    def __init__(self, app: Any) -> None:
        self._app = app

    def wsgi(self) -> Any:
        return self._app


class _CountingPool(DaemonThreadPool):
    def __init__(self) -> None:
        super().__init__(max_workers=4)
        self.submitted: list[str] = []

    def submit(self, fn, /, *args, **kwargs):  # noqa: ANN001, ANN201
        self.submitted.append(getattr(fn, "__name__", repr(fn)))
        return super().submit(fn, *args, **kwargs)


@pytest.fixture
def worker(make_app: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> Iterator[Any]:
    """A ThreadWorker in this process, its loop not running: the test drives the main
    thread's callbacks itself (``_await_request`` as the poller would call them)."""
    monkeypatch.setenv("WSSERVER_ENV", "development")
    yield from _worker(make_app(env="development", queue_size=4, enqueue_timeout=5.0), tmp_path)


def _worker(app: Any, tmp_path: Any) -> Iterator[Any]:
    service = app.extensions["wsserver"]
    service.ensure_started()
    cfg = Config()
    cfg.set("threads", 4)
    cfg.set("worker_tmp_dir", str(tmp_path))
    log = Logger(cfg)
    w = ThreadWorker(0, os.getpid(), [], _App(app), 30, cfg, log)
    w.tpool = _CountingPool()
    w.poller = selectors.DefaultSelector()
    w.method_queue.init()
    w.load_wsgi()
    w._lingering = LingeringCloses(w.poller)
    w.service = service
    yield w
    w._lingering.close_all()
    w.tpool.shutdown(wait=True)
    w.method_queue.close()
    w.poller.close()
    w.tmp.close()


def _notify(body: bytes, extra: bytes = b"") -> bytes:
    return (
        b"POST /notify HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nContent-Type: application/json\r\n"
        + extra
        + b"Content-Length: %d\r\n\r\n" % len(body)
        + body
    )


def _connect(w: Any, data: bytes) -> tuple[socket.socket, Any]:
    """A client socket with ``data`` sent, and the worker's side as accepted."""
    client, server = socket.socketpair()
    client.settimeout(WAIT)
    conn = _Conn(w.cfg, server, ("127.0.0.1", 40000), ("127.0.0.1", 8000))
    w.nr_conns += 1
    client.sendall(data)
    return client, conn


def _answer(client: socket.socket) -> tuple[bytes, dict]:
    data = b""
    while b"\r\n\r\n" not in data:
        data += client.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"Content-Length: (\d+)", head).group(1))
    while len(body) < length:
        body += client.recv(65536)
    return head, json.loads(body)


def _run_callbacks(w: Any) -> None:
    """One turn of the loop's method queue (what the poller would run)."""
    w.method_queue.run_callbacks(None)


def test_a_plain_notify_is_answered_on_the_main_thread_without_the_pool(worker):
    assert worker._inline_app is not None  # memory broker, wsserver's own app
    client, conn = _connect(worker, _notify(b'{"event":"e"}'))
    try:
        worker._await_request(conn, b"")
        client.settimeout(0)  # answered before _await_request returned: no waiting here
        head, body = _answer(client)
        assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"Connection: keep-alive" in head
        assert body["status"] == "ok" and body["id"]
        assert worker.tpool.submitted == []
        assert conn in worker.keepalived_conns  # kept alive, its next request read in the poller
        # a refusal is answered here too
        client.settimeout(WAIT)
        worker.keepalived_conns.remove(conn)
        worker.poller.unregister(conn.sock)
        client.sendall(_notify(b'{"no":"event"}'))
        worker._await_request(conn, b"")
        head, body = _answer(client)
        assert head.startswith(b"HTTP/1.1 400 ") and body["code"] == "missing_event"
        assert worker.tpool.submitted == []
    finally:
        client.close()


def test_a_batch_or_a_big_body_goes_to_the_pool(worker):
    """A batch's parsing and publishing would hold up every other connection's request on
    the main thread; so would a big body."""
    client, conn = _connect(worker, _notify(b' [{"event":"a"},{"event":"b"}]'))
    try:
        worker._await_request(conn, b"")
        head, body = _answer(client)
        assert body["accepted"] == 2 and worker.tpool.submitted == ["_serve_notify"]
    finally:
        client.close()
    big = b'{"event":"e","data":"%s"}' % (b"x" * INLINE_MAX_BODY)
    client, conn = _connect(worker, _notify(big))
    try:
        worker._await_request(conn, b"")
        head, body = _answer(client)
        assert body["status"] == "ok" and worker.tpool.submitted[-1] == "_serve_notify"
    finally:
        client.close()


@pytest.mark.timeout(30)
def test_a_busy_broker_lock_sends_the_notify_to_the_pool_and_the_main_thread_never_waits(
    worker,
):
    """Another publisher holds the broker's lock (it waits for queue room): the main thread
    must not wait for it. The request goes to the pool, which waits as before, and is
    published once the lock is free: once, not twice."""
    broker = worker.service.broker
    broker._lock.acquire()
    client, conn = _connect(worker, _notify(b'{"event":"e","rooms":["r"]}'))
    try:
        started = time.monotonic()
        worker._await_request(conn, b"")
        assert time.monotonic() - started < 0.5
        assert worker.tpool.submitted == ["_serve_notify"]
        broker._lock.release()
        head, body = _answer(client)
        assert body["status"] == "ok" and body["id"].endswith("-1")
    finally:
        if broker._lock.locked():
            broker._lock.release()
        client.close()


@pytest.mark.timeout(30)
def test_a_full_queue_sends_the_notify_to_the_pool_where_it_waits_for_room(worker):
    """The broadcast queue is full (its thread held by a task): the main thread tries once,
    publishes nothing and hands the request to the pool, which waits up to
    WSSERVER_ENQUEUE_TIMEOUT for room, as before the main-thread path; the single id shows
    nothing was published twice."""
    broadcaster = worker.service.broadcaster
    gate = _Gate()
    assert broadcaster.submit(gate, 1)
    assert gate.entered.wait(WAIT)
    while broadcaster.submit_nowait(_Gate()):
        pass  # the queue is full now (its gates open as soon as they run: released below)
    client, conn = _connect(worker, _notify(b'{"event":"e","rooms":["full"]}'))
    try:
        started = time.monotonic()
        worker._await_request(conn, b"")
        assert time.monotonic() - started < 0.5
        assert worker.tpool.submitted == ["_serve_notify"]
        client.settimeout(0.3)
        with pytest.raises(socket.timeout):
            client.recv(1)  # the pool thread is waiting for room
        client.settimeout(WAIT)
        gate.release.set()
        while not broadcaster.queue.empty():
            item = broadcaster.queue.get_nowait()
            if isinstance(item, _Gate):
                item.release.set()
        head, body = _answer(client)
        assert body["status"] == "ok" and body["id"].endswith("-1")
    finally:
        gate.release.set()
        client.close()


def test_an_item_by_item_batch_goes_to_the_pool_before_anything_is_published(worker):
    """A batch with an idempotency key goes item by item: a later item could not be undone
    if it had to wait, so nothing is tried on the main thread."""
    client, conn = _connect(
        worker, _notify(b'[{"event":"a","rooms":["k"]},{"event":"b","rooms":["k"]}]',
                        b"Idempotency-Key: batch-1\r\n")
    )
    try:
        worker._await_request(conn, b"")
        assert worker.tpool.submitted == ["_serve_notify"]
        head, body = _answer(client)
        assert [r["id"].split("-")[1] for r in body["results"]] == ["1", "2"]
    finally:
        client.close()


def test_an_answer_the_socket_cannot_take_at_once_is_finished_by_the_pool(worker):
    """A client that does not read: its send buffer is full, so the main thread writes what
    fits and a pool thread the rest; the main thread never blocks on a peer."""
    client, conn = _connect(worker, _notify(b'{"event":"e"}'))
    conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    filler = b"x" * 65536
    try:
        while True:
            try:
                conn.sock.send(filler)
            except BlockingIOError:
                break
        started = time.monotonic()
        worker._await_request(conn, b"")
        assert time.monotonic() - started < 0.5
        assert worker.tpool.submitted == ["_send_rest"]
        received = b""
        while b'"status":"ok"' not in received and b'"status": "ok"' not in received:
            received += client.recv(65536)
    finally:
        client.close()


_UPGRADE = (
    b"GET /ws?rooms=news HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n\r\n"
)
# frames of the request that must be gone from a WebSocket's thread while its session runs
_REQUEST_FRAMES = {"handle_request", "wsgi_app", "full_dispatch_request", "websocket_route"}


def test_a_websocket_session_runs_on_its_thread_once_the_request_has_returned(worker):
    """The upgrade is an ordinary request on a pool thread; its session then runs on that
    thread from :meth:`ThreadWorker.handle`, after gunicorn's, Flask's and flask-sock's
    frames returned (they held the parsed request, the environ and Flask's contexts for the
    connection's life: ~7 KB per idle connection). The parser, which keeps the last request
    it parsed, is dropped too. Closing the WebSocket ends the connection as before."""
    client, conn = _connect(worker, _UPGRADE)
    done = worker.tpool.submit(worker.handle, conn)
    head = b""
    while b"\r\n\r\n" not in head:
        head += client.recv(4096)
    assert head.startswith(b"HTTP/1.1 101")
    hub = worker.service.hub
    wait_for(lambda: hub.audience(("news",), None) == 1, timeout=WAIT)
    stacks = [traceback.extract_stack(f) for f in sys._current_frames().values()]
    serving = [s for s in stacks if any(f.name == "serve_connection" for f in s)]
    assert len(serving) == 1, "one thread serves the WebSocket"
    names = [f.name for f in serving[0]]
    assert "handle" in names and not _REQUEST_FRAMES & set(names), names
    assert conn.parser is None
    client.sendall(client_frame(OP_CLOSE, (1000).to_bytes(2, "big")))
    assert not done.result(WAIT)  # the connection is closed, not kept alive
    assert hub.audience(("news",), None) == 0
    client.close()


def test_pipelined_requests_are_read_on_later_turns_of_the_loop(worker):
    """Two requests in one write: the first is answered, the second waits for the next turn
    of the loop (method queue), so a client streaming requests cannot keep the main thread."""
    one = _notify(b'{"event":"first"}')
    client, conn = _connect(worker, one + _notify(b'{"event":"second"}'))
    try:
        worker._await_request(conn, b"")
        _, first = _answer(client)
        assert first["status"] == "ok"
        client.settimeout(0.2)
        with pytest.raises(socket.timeout):
            client.recv(1)
        client.settimeout(WAIT)
        _run_callbacks(worker)
        _, second = _answer(client)
        assert second["status"] == "ok" and worker.tpool.submitted == []
    finally:
        client.close()


def test_a_failure_on_the_main_thread_closes_that_connection_only(worker, monkeypatch):
    """Whatever fails while a request is served on the main thread (a bug) must not escape
    into the loop: the connection is closed, as a failed pool request's is."""
    monkeypatch.setattr(worker, "_notify_done", lambda *args: 1 / 0)
    client, conn = _connect(worker, _notify(b'{"event":"e"}'))
    conns = worker.nr_conns
    try:
        worker._await_request(conn, b"")
        assert worker.nr_conns == conns - 1
        assert client.recv(1) == b""  # closed
    finally:
        client.close()


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_running_out_of_descriptors_pauses_accepting_instead_of_ending_the_worker(
    worker: Any,
) -> None:
    """accept() failing with EMFILE (the open-files limit reached, e.g. by a flood of
    connections) must not escape into gthread's loop, which would end the worker and every
    client on it: the listener leaves the poller for a moment, the operator is told once, and
    accepting resumes by itself, the waiting connection then accepted."""
    listener = socket.create_server(("127.0.0.1", 0))
    worker.sockets = [listener]
    worker._accepting = False
    worker.set_accept_enabled(True)
    client = socket.create_connection(listener.getsockname(), timeout=WAIT)

    class _Full:
        def accept(self) -> Any:
            raise OSError(errno.EMFILE, "Too many open files")

        def getsockname(self) -> Any:
            return listener.getsockname()

    # gunicorn's own error log (some versions do not propagate it to the root logger)
    said = _Records()
    worker.log.error_log.addHandler(said)
    try:
        worker.accept(_Full())  # no exception
        worker.accept(_Full())
        assert not worker._accepting
        assert listener.fileno() not in worker.poller.get_map()
        warned = [r for r in said.records if "cannot accept new connections" in r.getMessage()]
        assert len(warned) == 1, "said once, not per failed accept"
        worker.set_accept_enabled(True)  # what gthread's loop does at once: still paused
        assert not worker._accepting
        wait_for(lambda: time.monotonic() >= worker._accept_paused_until, timeout=WAIT)
        worker.set_accept_enabled(True)
        assert worker._accepting
        conns = worker.nr_conns
        worker.accept(listener)  # the connection that waited in the backlog
        assert worker.nr_conns == conns + 1
    finally:
        worker.log.error_log.removeHandler(said)
        client.close()
        worker.set_accept_enabled(False)
        listener.close()


# -- POST /notify with Redis: published through the broker's pipeline in the poller ----------


@pytest.fixture
def redis_worker(make_app: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Any,
                 request: pytest.FixtureRequest) -> Iterator[Any]:
    """The worker of ``worker`` with the Redis broker: the shared Redis under the test's
    prefix, or, when the test asks for ``private_redis``, that one."""
    monkeypatch.setenv("WSSERVER_ENV", "development")
    if "private_redis" in request.fixturenames:
        url = request.getfixturevalue("private_redis").url
    else:
        url = "redis://127.0.0.1:6379/0"
    prefix = request.getfixturevalue("redis_prefix")
    app = make_app(env="development", redis_url=url, redis_prefix=prefix)
    yield from _worker(app, tmp_path)


def _turn(w: Any, until: Any, timeout: float = WAIT) -> float:
    """Run the poller's callbacks and the worker's deadlines until ``until()``; seconds taken."""
    started = time.monotonic()
    while not until():
        assert time.monotonic() - started < timeout, "answered in time"
        w.wait_for_and_dispatch_events(0.05)
        w.murder_pending()
    return time.monotonic() - started


def _readable(client: socket.socket) -> bool:
    return bool(selectors.select.select([client], [], [], 0)[0])


def _warm(w: Any) -> None:
    """The first publish goes to the pool (no Redis connection is connected yet; making one
    waits) and leaves its connection for the pipeline."""
    client, conn = _connect(w, _notify(b'{"event":"warm"}'))
    try:
        w._await_request(conn, b"")
        head, body = _answer(client)
        assert body["status"] == "ok" and w.tpool.submitted == ["_serve_notify"]
    finally:
        client.close()


def test_with_redis_a_notify_is_published_through_the_pipeline_on_the_main_thread(
    redis_worker,
):
    w = redis_worker
    assert w.service.broker.wait_ready(WAIT)
    assert w._inline_app is not None and w._pipeline is not None
    _warm(w)
    key = b"Idempotency-Key: pipelined-1\r\n"
    client, conn = _connect(w, _notify(b'{"event":"e","rooms":["r"]}', key))
    try:
        w._await_request(conn, b"")
        assert w._pipeline.in_flight == 1 and not _readable(client)  # sent, not waited for
        _turn(w, lambda: _readable(client))
        head, body = _answer(client)
        assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"keep-alive" in head
        assert body["status"] == "ok" and body["id"] and "repeated" not in body
        assert conn in w.keepalived_conns
        # the same key again: Redis' script answers the first id (through the pipeline too)
        w.keepalived_conns.remove(conn)
        w.poller.unregister(conn.sock)
        client.sendall(_notify(b'{"event":"e","rooms":["r"]}', key))
        w._await_request(conn, b"")
        _turn(w, lambda: _readable(client))
        _, again = _answer(client)
        assert again["id"] == body["id"] and again["repeated"] is True
        assert w.tpool.submitted == ["_serve_notify"]  # only the warm-up's
    finally:
        client.close()


@pytest.mark.timeout(60)
def test_with_redis_hung_the_main_thread_never_waits_and_each_publish_in_flight_gets_503(
    redis_worker, private_redis
):
    w = redis_worker
    assert w.service.broker.wait_ready(WAIT)
    _warm(w)
    clients = []
    try:
        private_redis.hang()
        started = time.monotonic()
        for i in range(3):
            client, conn = _connect(w, _notify(b'{"event":"e%d"}' % i))
            clients.append(client)
            w._await_request(conn, b"")
        assert time.monotonic() - started < 0.5  # three publishes sent, none waited for
        assert w._pipeline.in_flight == 3
        _turn(w, lambda: all(_readable(c) for c in clients))
        waited = time.monotonic() - started
        assert 1.5 < waited < 5.0, waited  # the Redis socket timeout (2 s)
        for client in clients:
            head, body = _answer(client)
            assert head.startswith(b"HTTP/1.1 503 ") and body["code"] == "broker_unavailable"
        assert w.tpool.submitted == ["_serve_notify"]
        private_redis.resume()  # (the broker says "degraded" for a while: not waited for)
        wait_for(w.service.broker._connected.is_set, timeout=WAIT, message="subscribed")
        # the dropped connection is reconnected on the pool, then the pipeline takes it again
        client, conn = _connect(w, _notify(b'{"event":"after"}'))
        clients.append(client)
        w._await_request(conn, b"")
        _, body = _answer(client)
        assert body["status"] == "ok"
    finally:
        private_redis.resume()
        for client in clients:
            client.close()


def test_with_redis_noscript_sends_the_notify_to_the_pool_which_loads_the_script(
    redis_worker, private_redis
):
    w = redis_worker
    assert w.service.broker.wait_ready(WAIT)
    _warm(w)
    admin = redis.Redis.from_url(private_redis.url)
    admin.script_flush()
    admin.close()
    client, conn = _connect(w, _notify(b'{"event":"e"}', b"Idempotency-Key: after-flush\r\n"))
    try:
        w._await_request(conn, b"")
        assert w._pipeline.in_flight == 1
        _turn(w, lambda: w._pipeline.in_flight == 0)
        head, body = _answer(client)  # answered by the pool thread
        assert body["status"] == "ok" and "repeated" not in body  # published once, there
        assert w.tpool.submitted == ["_serve_notify", "_serve_notify"]
    finally:
        client.close()
