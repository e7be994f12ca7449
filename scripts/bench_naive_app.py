"""Naive baseline for ``scripts/bench``: the same HTTP/WebSocket contract as wsserver, done
the plain flask-sock way.

* a module-level set of ``ws`` objects guarded by one lock;
* ``/ws`` adds itself to the set and loops ``ws.receive()`` until the peer goes away;
* ``POST /notify`` JSON-dumps the body (plus ``room``/``id``/``ts``) and calls
  ``ws.send(text)`` for every client in turn, catching errors and removing dead clients;
* ``GET /`` answers ``{"status": "ok", "service": "ws", "clients": N}``.

The broadcast holds the lock while it sends: simple-websocket's ``send`` is not safe to call
from two threads at once on the same socket, so this is what a straightforward
implementation has to do to keep frames from interleaving. It also means one client that
stops reading eventually blocks every broadcast (which the ``stalled1000`` scenario shows).

Run (from the repository root)::

    .venv/bin/gunicorn -k gthread --threads 1100 --worker-connections 2100 \
        --no-control-socket -b 127.0.0.1:8090 --chdir scripts bench_naive_app:app
"""

import json
import threading
import time
import uuid

from flask import Flask, jsonify, request
from flask_sock import Sock

app = Flask(__name__)
sock = Sock(app)

clients = set()
clients_lock = threading.Lock()


@app.get("/")
def health():
    with clients_lock:
        n = len(clients)
    return jsonify(status="ok", service="ws", clients=n, impl="naive")


@sock.route("/ws")
def ws_route(ws):
    with clients_lock:
        clients.add(ws)
    try:
        while True:
            ws.receive()  # raises ConnectionClosed when the peer goes away
    finally:
        with clients_lock:
            clients.discard(ws)


@app.post("/notify")
def notify():
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        return jsonify(status="error", error="expected a JSON object"), 400
    msg_id = uuid.uuid4().hex
    message = {
        "event": body.get("event", "message"),
        "message": body.get("message"),
        "data": body.get("data"),
        "room": None,
        "id": msg_id,
        "ts": int(time.time() * 1000),
    }
    text = json.dumps(message)
    sent = 0
    with clients_lock:
        dead = []
        for ws in clients:
            try:
                ws.send(text)
                sent += 1
            except Exception:
                dead.append(ws)
        for ws in dead:
            clients.discard(ws)
    return jsonify(status="ok", id=msg_id, delivered=sent)
