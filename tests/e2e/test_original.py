"""The Go original's behaviour, which existing clients rely on, end to end under gunicorn."""

from __future__ import annotations

import json

import requests
import websocket
from support import connect, recv_json, wait_for


def test_health_shape(server):
    r = requests.get(server.url + "/", timeout=5)
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith("application/json")
    body = r.json()
    assert body["status"] == "ok" and body["service"] == "ws"
    assert isinstance(body["clients"], int)


def test_connect(server):
    ws = connect(server)
    assert ws.connected
    ws.close()


def test_notify_reaches_connected_client(server):
    ws = connect(server)
    try:
        wait_for(lambda: server.health()["clients"] >= 1, message="client registered")
        r = server.notify({"event": "order", "message": "shipped", "data": {"id": 7}})
        assert r.status_code == 200
        body = r.json()
        assert body["status"] == "ok" and body["clients"] >= 1 and body["id"]
        got = recv_json(ws)
        assert (got["event"], got["message"], got["data"]) == ("order", "shipped", {"id": 7})
        assert got["id"] == body["id"] and got["room"] is None and isinstance(got["ts"], int)
    finally:
        ws.close()


def test_three_clients_receive_same_message(server):
    clients = [connect(server) for _ in range(3)]
    try:
        wait_for(lambda: server.health()["clients"] == 3, message="3 clients")
        assert server.notify({"event": "e", "message": "to all"}).status_code == 200
        frames = [c.recv() for c in clients]
        assert len(set(frames)) == 1
        assert json.loads(frames[0])["message"] == "to all"
    finally:
        for c in clients:
            c.close()


def test_health_counts_clients(server):
    wait_for(lambda: server.health()["clients"] == 0, message="no clients left")
    clients = [connect(server) for _ in range(4)]
    wait_for(lambda: server.health()["clients"] == 4, message="4 clients")
    clients.pop().close()
    clients.pop().close()
    wait_for(lambda: server.health()["clients"] == 2, message="2 clients")
    for c in clients:
        c.close()
    wait_for(lambda: server.health()["clients"] == 0, message="0 clients")


def test_optional_fields_default_like_the_original(server):
    ws = connect(server)
    try:
        wait_for(lambda: server.health()["clients"] >= 1)
        assert server.notify({"event": "bare"}).status_code == 200
        got = recv_json(ws)
        assert got["event"] == "bare" and got["message"] == "" and got["data"] is None
    finally:
        ws.close()


def test_rebroadcast_keeps_type_and_reaches_sender(server):
    a, b = connect(server), connect(server)
    try:
        wait_for(lambda: server.health()["clients"] == 2)
        a.send("plain text")
        for c in (a, b):
            opcode, data = c.recv_data()
            assert opcode == websocket.ABNF.OPCODE_TEXT and data == b"plain text"
        b.send_binary(b"\x00\xffbin")
        for c in (a, b):
            opcode, data = c.recv_data()
            assert opcode == websocket.ABNF.OPCODE_BINARY and data == b"\x00\xffbin"
    finally:
        a.close()
        b.close()


def test_many_clients_get_every_message_in_order(server):
    clients = [connect(server, timeout=30) for _ in range(50)]
    try:
        wait_for(lambda: server.health()["clients"] == 50, message="50 clients")
        session = requests.Session()
        for i in range(200):
            r = session.post(server.url + "/notify", json={"event": "seq", "data": i}, timeout=10)
            assert r.status_code == 200, r.text
        for c in clients:
            seen = [recv_json(c)["data"] for _ in range(200)]
            assert seen == list(range(200))
    finally:
        for c in clients:
            c.close()
