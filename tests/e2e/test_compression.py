"""permessage-deflate end to end under gunicorn, with real clients: clients that negotiate it
(the ``websockets`` library, which offers it by default, node's own WebSocket (undici, which
does as browsers do) and the suite's raw client) and
clients that do not (websocket-client) receive the same notifications from one fan-out;
the 101 always says ``server_no_context_takeover``; a compressed decompression bomb from a
hostile client is cut with 1009 while a polite client is still served; with
``WSSERVER_COMPRESSION=off`` nothing is negotiated.
"""

from __future__ import annotations

import json
import subprocess
import zlib

import pytest
from rawws import OP_CLOSE, OP_TEXT, RawClient, close_code
from support import connect, node_with_websocket, recv_json, serving
from websockets.sync.client import connect as websockets_connect

pytestmark = pytest.mark.timeout(60)

OFFER = {"Sec-WebSocket-Extensions": "permessage-deflate; client_max_window_bits"}


@pytest.fixture(scope="module")
def server():
    # production defaults, with a 64 KiB message limit and compression on (the defaults)
    with serving(env={"WSSERVER_ENV": "production"}) as srv:
        yield srv


def _notification(n: int, size: int) -> dict:
    """A JSON notification of about ``size`` bytes (a list of order lines)."""
    lines = [{"sku": f"SKU-{i:05d}", "qty": i % 7 + 1, "price": "19.90"} for i in range(size // 48)]
    return {"event": "order", "message": f"n{n}", "data": {"seq": n, "lines": lines}}


def test_deflate_and_plain_clients_get_the_same_notifications(server):
    with websockets_connect(server.ws_url, open_timeout=10) as websockets_client:
        _same_notifications(server, websockets_client)


def _same_notifications(server, websockets_client) -> None:
    plain = connect(server)
    raw = RawClient(server, headers=OFFER)
    try:
        assert raw.status == 101 and raw.deflate
        assert raw.response_head.lower().endswith(
            "\r\nsec-websocket-extensions: permessage-deflate; client_no_context_takeover; "
            "server_no_context_takeover"
        )
        [extension] = websockets_client.protocol.extensions
        assert extension.name == "permessage-deflate"
        assert extension.remote_no_context_takeover and extension.local_no_context_takeover
        assert "sec-websocket-extensions" not in str(plain.getheaders()).lower()
        sent = [_notification(0, 4096), _notification(1, 100), _notification(2, 60_000)]
        for body in sent:
            response = server.notify(body)
            assert response.status_code == 200, response.text
        got_websockets = [json.loads(websockets_client.recv(timeout=10)) for _ in sent]
        got_plain = [recv_json(plain) for _ in sent]
        got_raw = [json.loads(raw.recv_until(OP_TEXT)[1]) for _ in sent]
        assert got_websockets == got_plain == got_raw
        assert [m["data"] for m in got_plain] == [b["data"] for b in sent]
        # the 4 KB and 60 KB notifications came compressed, the small one plain
        assert raw.compressed == 2
    finally:
        plain.close()
        raw.close()


def test_a_deflate_client_may_send_compressed_commands(server):
    with websockets_connect(server.ws_url, open_timeout=10, compression="deflate") as ws:
        ws.send(json.dumps({"type": "subscribe", "room": "compressed-" + "x" * 100}))
        assert json.loads(ws.recv(timeout=10))["type"] == "subscribed"


def test_a_decompression_bomb_is_cut_with_1009_and_the_server_keeps_answering(server):
    """9 KB on the wire that would inflate to 8 MiB, against the 64 KiB message limit."""
    squeezer = zlib.compressobj(9, zlib.DEFLATED, -15)
    bomb = squeezer.compress(b"[" * (8 << 20)) + squeezer.flush(zlib.Z_SYNC_FLUSH)[:-4]
    polite = connect(server)
    hostile = RawClient(server, headers=OFFER)
    try:
        assert hostile.deflate
        hostile.send_frame(OP_TEXT, bomb, rsv=4)
        _, payload = hostile.recv_until(OP_CLOSE)
        assert close_code(payload) == 1009 and b"65536" in payload
        polite.send(json.dumps({"type": "ping"}))
        assert recv_json(polite) == {"type": "pong"}
        assert server.health()["status"] == "ok"
    finally:
        polite.close()
        hostile.close()


def test_with_compression_off_no_extension_is_negotiated(make_server):
    srv = make_server(env={"WSSERVER_ENV": "development", "WSSERVER_COMPRESSION": "off"})
    client = RawClient(srv, headers=OFFER)
    try:
        assert client.status == 101
        assert "sec-websocket-extensions" not in client.response_head.lower()
        response = srv.notify(_notification(0, 4096))
        assert response.status_code == 200
        assert json.loads(client.recv_until(OP_TEXT)[1])["data"]["seq"] == 0
        assert client.compressed == 0
    finally:
        client.close()


_NODE_CLIENT = r"""
const ws = new WebSocket(process.argv[1]);
ws.onopen = () => console.log(JSON.stringify({extensions: ws.extensions}));
ws.onmessage = (e) => { console.log(e.data); ws.close(); };
ws.onclose = () => process.exit(0);
setTimeout(() => process.exit(2), 20000);
"""


def test_nodes_websocket_negotiates_deflate_and_reads_the_compressed_frame(server):
    node = node_with_websocket()  # skips without node
    client = subprocess.Popen([*node, "-e", _NODE_CLIENT, server.ws_url],
                              stdout=subprocess.PIPE, text=True)
    try:
        opened = json.loads(client.stdout.readline())
        assert opened["extensions"] == (
            "permessage-deflate; client_no_context_takeover; server_no_context_takeover"
        )
        sent = _notification(7, 4096)
        assert server.notify(sent).status_code == 200
        out, _ = client.communicate(timeout=30)
        assert client.returncode == 0
        assert json.loads(out.splitlines()[-1])["data"] == sent["data"]
    finally:
        if client.poll() is None:
            client.kill()
            client.wait(5)
