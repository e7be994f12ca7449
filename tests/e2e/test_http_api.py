"""The HTTP API under bad input and overload, end to end under gunicorn.

Every bad request gets a clear JSON answer (status + ``{"error": ...}`` naming the problem),
nothing a publisher was told was accepted is lost, and nothing hangs: a full broadcast queue
answers 503 within ``WSSERVER_ENQUEUE_TIMEOUT``, and a worker whose WebSocket budget is used
up refuses the next upgrade with 503 while ``GET /`` and ``POST /notify`` keep answering.
"""

from __future__ import annotations

import json
import selectors
import socket
import threading
import time

import pytest
import rawws
import requests
import websocket
from support import connect, recv_json, wait_for

DEFAULT_LIMIT = 64 * 1024

# One request per connection: a kept-alive socket still referenced by a Response object would
# make gunicorn linger (up to 2 s) before it stops, slowing every server teardown.
CLOSE = {"Connection": "close"}


def post_raw(server, body, headers=None, timeout: float = 10, close: bool = True) -> requests.Response:
    """POST ``body`` as is. ``close=False`` for bodies the server refuses unread: with
    keep-alive gunicorn drains them before the next request, whereas after "Connection: close"
    it reads at most 64 KiB and a bigger unread rest turns its close into a reset."""
    h = {"Content-Type": "application/json", **(CLOSE if close else {})}
    h.update(headers or {})
    return requests.post(server.url + "/notify", data=body, headers=h, timeout=timeout)


def post_json(server, obj, timeout: float = 10) -> requests.Response:
    return requests.post(server.url + "/notify", json=obj, headers=CLOSE, timeout=timeout)


def chunked(body: bytes, size: int = 4096):
    """A generator body: requests sends it with Transfer-Encoding: chunked, no Content-Length."""
    for i in range(0, len(body), size):
        yield body[i : i + size]


def padded_notification(total: int, event: str = "pad") -> bytes:
    """A valid notification body of exactly ``total`` bytes."""
    head = json.dumps({"event": event, "message": ""})[:-2]  # ends with: "message": "
    return (head + "x" * (total - len(head) - 2) + '"}').encode()


def assert_json_error(r: requests.Response, status: int, *words: str) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["Content-Type"].startswith("application/json"), r.headers
    body = r.json()
    assert isinstance(body.get("error"), str) and body["error"], body
    for word in words:
        assert word.lower() in body["error"].lower(), (word, body)
    return body


# -- wrong method, unknown path ---------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH"])
def test_notify_wrong_method_is_405_json(server, method):
    r = requests.request(method, server.url + "/notify", headers=CLOSE, timeout=5)
    assert_json_error(r, 405, "method")
    assert "POST" in r.headers.get("Allow", ""), r.headers


def test_notify_options_answers_allow_and_head_is_405(server):
    r = requests.options(server.url + "/notify", headers=CLOSE, timeout=5)
    assert r.status_code == 200 and "POST" in r.headers["Allow"], (r.status_code, r.headers)
    r = requests.head(server.url + "/notify", headers=CLOSE, timeout=5)
    assert r.status_code == 405 and "POST" in r.headers["Allow"], (r.status_code, r.headers)


def raw_exchange(server, request: bytes, timeout: float = 10) -> tuple[int, dict]:
    """Write ``request``, half-close, read the whole answer: (status, JSON body)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_notify_body_cut_short_is_400_and_delivers_nothing(server):
    """The publisher promised 100 bytes and sent 16, then went quiet: a 400, not a hang or 500."""
    ws = connect(server)
    try:
        status, body = raw_exchange(server, b"POST /notify HTTP/1.1\r\nHost: x\r\n"
                                    b"Content-Type: application/json\r\n"
                                    b"Content-Length: 100\r\n\r\n" + b'{"event":"cut"}')
        assert status == 400 and body["code"] == "bad_request", (status, body)
        assert server.health()["status"] == "ok"
        post_json(server, {"event": "after"})
        assert recv_json(ws)["event"] == "after", "the cut-off notification was not delivered"
    finally:
        ws.close()


def test_notify_malformed_chunk_is_400(server):
    status, body = raw_exchange(server, b"POST /notify HTTP/1.1\r\nHost: x\r\n"
                                b"Content-Type: application/json\r\n"
                                b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n")
    assert status == 400 and body["code"] == "bad_request", (status, body)
    assert "error" in body


@pytest.mark.parametrize("method,path", [("GET", "/nope"), ("POST", "/notify/extra"), ("GET", "/ws/x")])
def test_unknown_path_is_404_json(server, method, path):
    r = requests.request(method, server.url + path, headers=CLOSE, timeout=5)
    assert_json_error(r, 404)


# -- bodies that are not a notification --------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [b"nope", b"{", b'{"event": "a"', b'{"event":"a"} trailing', b"", b"   ", b"\xef\xbb\xbf{}"],
    ids=["word", "brace", "unterminated", "trailing", "empty", "blank", "bom"],
)
def test_notify_body_not_json_is_400(server, body):
    assert_json_error(post_raw(server, body), 400, "JSON")


@pytest.mark.parametrize(
    "body",
    [b'{"event":"a","data":NaN}', b'{"event":"a","data":Infinity}', b'{"event":"a","data":-1e400}'],
    ids=["NaN", "Infinity", "overflow"],
)
def test_notify_non_standard_json_numbers_are_400(server, body):
    """NaN/Infinity are not JSON (RFC 8259); relayed as-is, every client's JSON.parse fails."""
    assert_json_error(post_raw(server, body), 400)


def test_notify_deeply_nested_json_is_400_not_500(server):
    """Valid JSON nested deeper than the parser's recursion limit, well under the body limit."""
    body = b'{"event":"a","data":' + b"[" * 30000 + b"]" * 30000 + b"}"
    assert len(body) < DEFAULT_LIMIT
    assert_json_error(post_raw(server, body), 400)


@pytest.mark.parametrize(
    "body", [b'{"event":"\\ud800"}', b'{"event":"a","message":"x\\udfffy"}'], ids=["event", "message"]
)
def test_notify_lone_surrogate_is_400_not_500(server, body):
    """A lone surrogate escape parses but cannot be sent as UTF-8 to anyone: the publisher's
    fault (400), not a server error (500)."""
    assert_json_error(post_raw(server, body), 400)


@pytest.mark.parametrize(
    "value,kind", [("s", "string"), (3, "number"), (None, "null"), (True, "boolean")]
)
def test_notify_body_not_an_object_is_400(server, value, kind):
    """(A JSON array is a batch of notifications, answered per item: see test_rooms.)"""
    body = assert_json_error(post_raw(server, json.dumps(value)), 400, "object")
    assert kind in body["error"], body


@pytest.mark.parametrize(
    "obj",
    [{}, {"message": "m"}, {"event": None}, {"event": 5}, {"event": ["a"]}, {"event": {"a": 1}},
     {"event": True}],
    ids=["empty", "message-only", "null", "number", "array", "object", "boolean"],
)
def test_notify_event_missing_or_not_a_string_is_400(server, obj):
    assert_json_error(post_json(server, obj), 400, "event")


@pytest.mark.parametrize("body", [b'{"event":"caf\xe9"}', b"\xff\xfe{}", b'{"event":"a\x80"}'])
def test_notify_non_utf8_body_is_400(server, body):
    assert_json_error(post_raw(server, body), 400, "UTF-8")


def test_bad_requests_deliver_nothing_and_lose_nothing(server):
    """A client sees no trace of refused requests, and the next good one arrives intact."""
    ws = connect(server, timeout=5)
    try:
        wait_for(lambda: server.health()["clients"] >= 1, message="client registered")
        for body in (b"nope", b"[]", b'{"event":5}', b"\xff", b'{"event":"' + b"x" * DEFAULT_LIMIT + b'"}'):
            assert post_raw(server, body, close=False).status_code in (400, 413)
        r = post_json(server, {"event": "after-bad", "message": "m", "data": [1, 2]})
        assert r.status_code == 200, r.text
        got = recv_json(ws)
        assert (got["event"], got["message"], got["data"], got["id"]) == (
            "after-bad", "m", [1, 2], r.json()["id"])
    finally:
        ws.close()


# -- body size limit ---------------------------------------------------------------------------


def test_notify_body_over_default_limit_is_413(server):
    r = post_raw(server, padded_notification(DEFAULT_LIMIT + 1), close=False)
    assert_json_error(r, 413, str(DEFAULT_LIMIT))
    # exactly at the limit is fine, and the connection's next request is unaffected
    assert post_raw(server, padded_notification(DEFAULT_LIMIT)).status_code == 200


def test_notify_much_larger_body_is_413_promptly(server):
    started = time.monotonic()
    r = post_raw(server, b"x" * (4 * 1024 * 1024), close=False)
    assert_json_error(r, 413)
    assert time.monotonic() - started < 5
    assert server.health()["status"] == "ok"


def test_notify_chunked_body_over_default_limit_is_413(server):
    """No Content-Length to refuse up front: the limit must hold while reading."""
    r = post_raw(server, chunked(padded_notification(DEFAULT_LIMIT + 1)), close=False)
    assert_json_error(r, 413, str(DEFAULT_LIMIT))


def test_notify_chunked_body_whose_prefix_is_valid_is_413_not_accepted(server):
    """An over-limit body whose first 64 KiB happen to be a valid object must not be cut and
    accepted: the publisher would never learn its body was truncated."""
    body = b'{"event":"prefix"}' + b" " * (DEFAULT_LIMIT - 18) + b" " * 100
    assert_json_error(post_raw(server, chunked(body), close=False), 413)


def test_notify_chunked_body_within_limit_is_accepted(server):
    assert post_raw(server, chunked(b'{"event":"chunked"}')).status_code == 200
    assert post_raw(server, chunked(padded_notification(DEFAULT_LIMIT))).status_code == 200


def test_custom_body_limit(make_server):
    srv = make_server({"WSSERVER_MAX_BODY_SIZE": "1024"})
    assert_json_error(post_raw(srv, padded_notification(1025)), 413, "1024")
    assert_json_error(post_raw(srv, chunked(padded_notification(2000), 256)), 413, "1024")
    assert_json_error(post_raw(srv, chunked(padded_notification(1025), 256)), 413, "1024")
    assert post_raw(srv, padded_notification(1024)).status_code == 200
    assert post_raw(srv, chunked(padded_notification(1024), 256)).status_code == 200
    assert post_raw(srv, b'{"event":"small"}').status_code == 200


# -- a full broadcast queue --------------------------------------------------------------------



class FanInReader:
    """One thread reading many raw WebSocket clients, recording each client's events."""

    def __init__(self, socks) -> None:
        self.socks = socks
        self.events: dict = {s: [] for s in socks}
        self.other: list = []
        self._parsers = {s: rawws.FrameParser() for s in socks}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "FanInReader":
        self._thread.start()
        return self

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        for s in self.socks:
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ)
        while not self._stop.is_set():
            for key, _ in sel.select(0.05):
                sock = key.fileobj
                try:
                    data = sock.recv(1 << 20)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    sel.unregister(sock)
                    self.other.append((sock, "eof"))
                    continue
                for opcode, payload in self._parsers[sock].feed(data):
                    event = json.loads(payload).get("event") if opcode == rawws.OP_TEXT else None
                    if isinstance(event, str) and event.startswith("p"):
                        self.events[sock].append(event)
                    else:
                        self.other.append((sock, opcode, payload[:40]))
        sel.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


@pytest.mark.parametrize("enqueue_timeout", [0.0, 0.05])
def test_queue_full_answers_503_quickly_and_loses_nothing(make_server, enqueue_timeout):
    # a one-slot queue and 16 concurrent posters: a post that finds the slot taken waits at
    # most enqueue_timeout (0: not at all) for the broadcaster to take it. The fan-out to 200
    # clients is fast, so the waits are short: they make the 503s certain, not the load
    n_clients, n_posters, size = 200, 16, 4000
    srv = make_server(
        {
            "WSSERVER_QUEUE_SIZE": "1",
            "WSSERVER_ENQUEUE_TIMEOUT": str(enqueue_timeout),
            "WSSERVER_MAX_BODY_SIZE": str(1024 * 1024),
            "WSSERVER_CLIENT_BUFFER": str(256 * 1024 * 1024),  # nobody is dropped as slow
            "WSSERVER_HTTP_THREADS": "40",
        },
        threads=n_clients + 60,
    )
    socks = []
    reader = None
    try:
        for _ in range(n_clients):
            sock, rest = rawws.open_ws(srv.port)
            assert not rest
            socks.append(sock)
        wait_for(lambda: srv.health()["clients"] == n_clients, message="clients registered")
        reader = FanInReader(socks).start()

        results: list = []
        lock = threading.Lock()
        first_503 = threading.Event()
        hard_deadline = time.monotonic() + 10
        pad = "x" * size

        def poster(k: int) -> None:
            session = requests.Session()
            i = 0
            try:
                while time.monotonic() < hard_deadline:
                    if first_503.is_set() and time.monotonic() > stop_after[0]:
                        return
                    event = f"p{k}-{i}"
                    i += 1
                    started = time.monotonic()
                    r = session.post(srv.url + "/notify", json={"event": event, "message": pad},
                                     timeout=10)
                    elapsed = time.monotonic() - started
                    with lock:
                        results.append((event, r.status_code, elapsed, r.headers.get("Retry-After"),
                                        r.text if r.status_code != 200 else ""))
                        if r.status_code == 503 and not first_503.is_set():
                            stop_after[0] = time.monotonic() + 0.5
                            first_503.set()
            finally:
                session.close()

        stop_after = [0.0]
        threads = [threading.Thread(target=poster, args=(k,)) for k in range(n_posters)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(15)
        assert not any(t.is_alive() for t in threads), "a POST /notify never returned"

        statuses = {status for _, status, _, _, _ in results}
        assert statuses <= {200, 503}, [r for r in results if r[1] not in (200, 503)][:3]
        refused = [r for r in results if r[1] == 503]
        accepted = [r[0] for r in results if r[1] == 200]
        assert refused, f"no 503 in {len(results)} posts: the queue never filled"
        for event, _, elapsed, retry_after, text in refused:
            assert retry_after is not None and int(retry_after) >= 1, (event, retry_after)
            assert json.loads(text)["error"], text
            # the request's own work on a busy worker, plus the bounded wait for room
            assert elapsed < enqueue_timeout + 1.5, f"503 for {event} took {elapsed:.2f}s"
        assert accepted

        # every accepted notification reaches every client, once, in each poster's order;
        # nothing that was refused is delivered
        def all_delivered() -> bool:
            return all(len(events) >= len(accepted) for events in reader.events.values())

        wait_for(all_delivered, timeout=20, interval=0.05, message="accepted notifications delivered")
        reader.stop()
        want = sorted(accepted)
        for sock, events in reader.events.items():
            assert sorted(events) == want, "a client missed or got extra notifications"
        per_poster = {}
        for event in next(iter(reader.events.values())):
            k, i = event[1:].split("-")
            per_poster.setdefault(k, []).append(int(i))
        assert all(seq == sorted(seq) for seq in per_poster.values())
        assert not reader.other, reader.other[:3]
        assert srv.health()["clients"] == n_clients
    finally:
        if reader is not None:
            reader.stop()
        for sock in socks:
            sock.close()


# -- WebSocket capacity ------------------------------------------------------------------------


def test_full_worker_refuses_upgrade_with_503_and_http_still_answers(make_server):
    srv = make_server(threads=16)  # WSSERVER_HTTP_THREADS=8: 8 WebSockets at most
    health = srv.health()
    assert health["capacity"] == 8
    clients = [connect(srv, timeout=5) for _ in range(8)]
    try:
        wait_for(lambda: srv.health()["clients"] == 8, message="8 clients")

        # the next upgrade: plain HTTP 503 with a JSON reason, before any handshake
        with pytest.raises(rawws.HandshakeRefused) as refused:
            rawws.open_ws(srv.port)
        assert refused.value.status == 503
        assert b"retry-after:" in refused.value.head.lower()
        assert json.loads(refused.value.body)["error"]
        with pytest.raises(websocket.WebSocketBadStatusException) as bad:
            connect(srv, timeout=5)
        assert bad.value.status_code == 503

        # a burst of upgrades while full: all refused, none sneaks in
        outcomes: list = []

        def attempt() -> None:
            try:
                sock, _ = rawws.open_ws(srv.port, timeout=5)
                sock.close()
                outcomes.append(101)
            except rawws.HandshakeRefused as exc:
                outcomes.append(exc.status)

        burst = [threading.Thread(target=attempt) for _ in range(20)]
        for t in burst:
            t.start()
        for t in burst:
            t.join(10)
        assert outcomes == [503] * 20

        # HTTP still answers promptly, one at a time and many at once (bounds leave room for
        # a loaded machine; the failure they catch is a request that waits for a WebSocket
        # to end, i.e. forever)
        for i in range(5):
            started = time.monotonic()
            assert srv.health()["clients"] == 8
            r = post_json(srv, {"event": "while-full", "data": i}, timeout=5)
            assert r.status_code == 200 and r.json()["clients"] == 8
            assert time.monotonic() - started < 2.0
        answers: list = []

        def http_call(i: int) -> None:
            started = time.monotonic()
            if i % 2:
                r = requests.get(srv.url + "/", headers=CLOSE, timeout=5)
            else:
                r = post_json(srv, {"event": "par", "data": i}, timeout=5)
            answers.append((r.status_code, time.monotonic() - started))

        calls = [threading.Thread(target=http_call, args=(i,)) for i in range(16)]
        for t in calls:
            t.start()
        for t in calls:
            t.join(10)
        assert len(answers) == 16 and all(status == 200 for status, _ in answers), answers
        assert max(elapsed for _, elapsed in answers) < 4.0, answers

        for c in clients:
            got = [recv_json(c) for _ in range(5 + 8)]
            assert [g["data"] for g in got[:5]] == list(range(5))

        # room comes back when a client leaves
        clients.pop().close()
        wait_for(lambda: srv.health()["clients"] == 7, message="one client left")
        clients.append(connect(srv, timeout=5))
        wait_for(lambda: srv.health()["clients"] == 8, message="slot reused")
    finally:
        for c in clients:
            c.close()


def test_max_connections_setting_caps_websockets_below_the_thread_budget(make_server):
    srv = make_server({"WSSERVER_MAX_CONNECTIONS": "3"})  # 64 threads: room for 56
    assert srv.health()["capacity"] == 3
    clients = [connect(srv, timeout=5) for _ in range(3)]
    try:
        wait_for(lambda: srv.health()["clients"] == 3, message="3 clients")
        with pytest.raises(rawws.HandshakeRefused) as refused:
            rawws.open_ws(srv.port)
        assert refused.value.status == 503
        assert json.loads(refused.value.body)["error"]
        r = post_json(srv, {"event": "capped"}, timeout=5)
        assert r.status_code == 200 and r.json()["clients"] == 3
        assert all(recv_json(c)["event"] == "capped" for c in clients)
    finally:
        for c in clients:
            c.close()
