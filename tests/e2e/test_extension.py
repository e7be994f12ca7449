"""End to end: the example app of docs/examples/ (a Flask app with ``Realtime`` mounted at
``/realtime``) under gunicorn with the shipped worker and config.

Its own routes answer as a Flask app's; ``/realtime/...`` answers as the standalone server;
a client on ``/realtime/ws`` gets what the app's route published in-process (``rt.publish``)
and what ``POST /realtime/notify`` sent; the gunicorn hooks find the service in the user's
app (SIGTERM closes clients with 1001). On Redis with two workers, a publish in either worker
reaches clients on both. Real gunicorn, real Redis (a key prefix of the test's own), real
sockets; every wait bounded.
"""

from __future__ import annotations

import json
import time
from typing import Any, Iterator

import pytest
import requests
from support import ROOT, GunicornServer, RawClient, close_code, wait_for

from wsserver.client import Publisher

pytestmark = pytest.mark.timeout(90)

EXAMPLES = ROOT / "docs" / "examples"
PREFIX = "/realtime"
REDIS_URL = "redis://127.0.0.1:6379/0"
QUIET = {"WSSERVER_PING_INTERVAL": "600"}  # clients are read only when a test checks them


def example_server(env: dict[str, str] | None = None, args: list[str] | None = None
                   ) -> GunicornServer:
    """The example app, as docs/examples/myapp.py's docstring serves it (the example's
    directory on the path instead of the current directory)."""
    return GunicornServer(env={**QUIET, **(env or {})}, app="myapp:app", prefix=PREFIX,
                          args=["--pythonpath", str(EXAMPLES), *(args or [])])


@pytest.fixture
def servers() -> Iterator[Any]:
    started: list[GunicornServer] = []

    def start(env: dict[str, str] | None = None, args: list[str] | None = None
              ) -> GunicornServer:
        srv = example_server(env, args)
        started.append(srv)
        return srv.start()

    yield start
    for srv in started:
        srv.stop(graceful=False)


def subscriber(server: GunicornServer, room: str = "orders") -> RawClient:
    client = RawClient(server, f"{PREFIX}/ws?rooms={room}", timeout=10)
    assert client.status == 101, client.response_head
    return client


def next_message(client: RawClient) -> dict:
    """The next text frame as JSON (pings answered); each read waits at most 10 s."""
    while True:
        opcode, payload = client.recv_frame()
        if opcode == 0x1:
            return json.loads(payload)
        if opcode == 0x9:
            client.send_frame(0xA, payload)
        elif opcode == 0x8:
            raise AssertionError(f"closed by the server: {payload!r}")


def test_the_example_app_serves_its_routes_and_wsserver_under_the_prefix(servers):
    # a short request deadline: the WebSocket must tell the worker it was upgraded through
    # the mount (environ[WEBSOCKET_STARTED]), or the worker cuts it as a slow request
    server = servers({"WSSERVER_REQUEST_TIMEOUT": "1"})
    url, api = server.url, server.url + PREFIX
    # the app's own routes, and its own (HTML) 404: wsserver's JSON errors stay under /realtime
    assert requests.get(url + "/", timeout=5).json()["app"] == "orders"
    missing = requests.get(url + "/nope", timeout=5)
    assert missing.status_code == 404 and "json" not in missing.headers["Content-Type"]
    # wsserver's, as the standalone server answers them
    health = requests.get(api + "/", timeout=5).json()
    assert health["service"] == "ws" and health["status"] == "ok"
    assert requests.get(api + "/healthz", timeout=5).json() == {"status": "ok"}
    assert requests.get(api + "/readyz", timeout=5).json()["status"] == "ready"
    assert "wsserver_" in requests.get(api + "/metrics", timeout=5).text
    assert requests.get(api + "/static/wsserver.js", timeout=5).status_code == 200
    console = requests.get(api + "/console", timeout=5)  # development, as the suite's servers
    assert 'const BASE = "/realtime";' in console.text
    assert 'src="/realtime/static/wsserver.js"' in console.text
    assert requests.post(api + "/console/check", timeout=5).json()["accepted"] is True
    wrong = requests.get(api + "/nope", timeout=5)
    assert wrong.status_code == 404 and wrong.json()["code"] == "not_found"
    refused = requests.post(api + "/notify", data="x", timeout=5)
    assert refused.status_code == 415 and refused.json()["code"] == "unsupported_media_type"
    assert requests.get(api + "/notify", timeout=5).headers["Allow"] == "POST, OPTIONS"
    # a client on /realtime/ws gets the app route's publish and POST /realtime/notify's
    client = subscriber(server)
    try:
        wait_for(lambda: server.health()["subscriptions"] == 1, message="the client to join")
        time.sleep(2.5)  # past WSSERVER_REQUEST_TIMEOUT=1 and a reaper turn: nothing to wait on
        assert server.health()["clients"] == 1
        assert requests.get(api + "/rooms", timeout=5).json()["rooms"][0]["room"] == "orders"
        created = requests.post(url + "/orders", json={"id": 8}, timeout=5).json()
        assert created["ok"] is True
        got = next_message(client)
        assert (got["event"], got["message"], got["data"], got["room"], got["id"]) == (
            "order.created", "Order 8", {"id": 8}, "orders", created["id"])
        notified = server.notify({"event": "order.shipped", "room": "orders"})
        assert notified.status_code == 200 and notified.json()["clients"] == 1
        got = next_message(client)
        assert (got["event"], got["id"]) == ("order.shipped", notified.json()["id"])
        # the Python client takes the prefix as its base URL, as a proxy path
        with Publisher(api) as publisher:
            answer = publisher.publish("order.paid", room="orders")
        assert next_message(client)["id"] == answer["id"]
        # the hooks found the service in the user's app: SIGTERM says goodbye with 1001
        assert server.terminate() == 0
        opcode, payload = client.recv_frame()
        assert opcode == 0x8 and close_code(payload) == 1001
    finally:
        client.close()
    assert "the app has no wsserver service" not in server.log()
    assert "Traceback" not in server.log()


def test_a_publish_in_either_of_two_workers_reaches_clients_on_both(servers, redis_prefix):
    server = servers({"WSSERVER_REDIS_URL": REDIS_URL, "WSSERVER_REDIS_PREFIX": redis_prefix},
                     ["-w", "2"])
    api = server.url + PREFIX
    # keep-alive connections pinned to each worker (a connection stays with its worker)
    sessions: dict[int, requests.Session] = {}
    for _ in range(200):
        session = requests.Session()
        pid = session.get(api + "/", timeout=5).json()["pid"]
        if pid in sessions:
            session.close()
        else:
            sessions[pid] = session
        if len(sessions) == 2:
            break
    assert len(sessions) == 2, "only one worker answered"

    def own_clients() -> dict[int, int]:
        counts = {}
        for pid, session in sessions.items():
            body = session.get(api + "/", timeout=5).json()
            assert body["pid"] == pid, "the keep-alive connection moved to another worker"
            counts[pid] = body["worker"]["clients"]
        return counts

    clients: list[RawClient] = []
    try:
        while min(own_clients().values()) == 0:  # until both workers hold a client
            assert len(clients) < 30, f"the clients all landed on one worker: {own_clients()}"
            clients.append(subscriber(server))
            wait_for(lambda: sum(own_clients().values()) == len(clients),
                     message="the new client to be counted")
        first, second = sessions.values()
        created = first.post(server.url + "/orders", json={"id": 9}, timeout=5)
        assert created.status_code == 200 and created.json()["ok"] is True, created.text
        notified = second.post(api + "/notify", json={"event": "order.shipped", "room": "orders"},
                               timeout=5)
        assert notified.status_code == 200, notified.text
        for client in clients:
            got = [next_message(client), next_message(client)]
            assert sorted((g["event"], g["id"]) for g in got) == sorted(
                [("order.created", created.json()["id"]),
                 ("order.shipped", notified.json()["id"])])
    finally:
        for client in clients:
            client.close()
        for session in sessions.values():
            session.close()
    assert "Traceback" not in server.log()
