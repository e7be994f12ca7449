"""TLS served by gunicorn itself, end to end: ``WSSERVER_TLS_CERT``/``WSSERVER_TLS_KEY`` (and
gunicorn's own ``--certfile``/``--keyfile``) make the server answer https:// and wss://, and
every third-party WebSocket client in the environment connects, gets a notification POSTed
over https, pings, and closes cleanly; a 1 MiB broadcast goes through the SSL write path's
partial writes. Real handshakes against a throw-away self-signed certificate
(:mod:`tlscerts`); the clients verify it.

Clients: websocket-client, trio-websocket, simple-websocket's client, python-websockets (sync
and asyncio) and aiohttp (all in the project's environment; the last three offer
``wsserver.v1`` and check it is selected); Node's own WebSocket (undici, the browsers' API)
when ``node`` is there, trusting the certificate through ``NODE_EXTRA_CA_CERTS``; Node's ``ws``
only when it is installed already (nothing is downloaded). Headless Chromium over wss:
``test_browser.py``.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import textwrap
from typing import Any

import pytest
import requests
import websocket
from support import ROOT, GunicornServer, free_port, node_with_websocket, wait_for
from tlscerts import client_context, test_cert

pytestmark = pytest.mark.timeout(60)

MiB = 1 << 20


class TlsServer(GunicornServer):
    """A :class:`GunicornServer` whose URLs are https:// and wss://; requests verify the
    test certificate."""

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"wss://127.0.0.1:{self.port}/ws"

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log()}")
        try:
            return self.get("/", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return requests.get(self.url + path, verify=str(test_cert()[0]), **kwargs)

    def notify(self, body: Any, timeout: float = 5) -> requests.Response:
        return requests.post(self.url + "/notify", json=body, timeout=timeout,
                             verify=str(test_cert()[0]))


def tls_env(**extra: str) -> dict[str, str]:
    crt, key = test_cert()
    return {"WSSERVER_TLS_CERT": str(crt), "WSSERVER_TLS_KEY": str(key),
            "WSSERVER_MAX_BODY_SIZE": str(2 * MiB), **extra}


@pytest.fixture(scope="module")
def tls_server():
    server = TlsServer(env=tls_env()).start()
    try:
        yield server
    finally:
        server.stop(graceful=False)


def wss(server: TlsServer, **kwargs: Any) -> websocket.WebSocket:
    return websocket.create_connection(server.ws_url, timeout=10,
                                       sslopt={"ca_certs": str(test_cert()[0])}, **kwargs)


def posted(server: TlsServer, message: str) -> None:
    answer = server.notify({"event": "tls", "message": message})
    assert answer.status_code == 200, answer.text
    assert answer.json()["clients"] >= 1


# -- https ------------------------------------------------------------------------------------


def test_get_root_over_https_and_plain_http_is_not_served(tls_server):
    health = tls_server.get("/", timeout=5)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    with pytest.raises(requests.RequestException):
        requests.get(f"http://127.0.0.1:{tls_server.port}/", timeout=3)


def test_an_untrusted_certificate_is_refused_by_a_verifying_client(tls_server):
    """The clients below verify for real: without the test CA the handshake fails."""
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(tls_server.url + "/", timeout=5)


# -- wss with every client at hand -------------------------------------------------------------


def test_websocket_client_over_wss(tls_server):
    ws = wss(tls_server)
    try:
        posted(tls_server, "to websocket-client")
        assert json.loads(ws.recv())["message"] == "to websocket-client"
        ws.ping(b"are you there")
        opcode, frame = ws.recv_data_frame(control_frame=True)
        assert opcode == websocket.ABNF.OPCODE_PONG and frame.data == b"are you there"
        ws.send_close(1000, b"bye")
        opcode, frame = ws.recv_data_frame(control_frame=True)
        assert opcode == websocket.ABNF.OPCODE_CLOSE and frame.data[:2] == b"\x03\xe8"
        # then the FIN (no close_notify, as gunicorn): the end of the stream
        ws.sock.settimeout(5)
        assert ws.sock.recv(1) == b""
    finally:
        ws.shutdown()


def test_trio_websocket_over_wss(tls_server):
    trio = pytest.importorskip("trio")
    trio_websocket = pytest.importorskip("trio_websocket")

    async def session() -> tuple[str, bool, Any]:
        async with trio_websocket.open_websocket_url(
            tls_server.ws_url, client_context(), connect_timeout=10, disconnect_timeout=10
        ) as ws:
            posted(tls_server, "to trio-websocket")  # blocking is fine: the kernel buffers
            with trio.fail_after(10):
                message = await ws.get_message()
                await ws.ping(b"trio")  # returns once the matching pong came
                pong = True
        return message, pong, ws.closed

    message, pong, closed = trio.run(session)
    assert json.loads(message)["message"] == "to trio-websocket" and pong
    assert closed.code == 1000, closed  # the server answered our close


def test_simple_websocket_client_over_wss(tls_server):
    simple_websocket = pytest.importorskip("simple_websocket")
    ws = simple_websocket.Client.connect(tls_server.ws_url, ssl_context=client_context())
    try:
        posted(tls_server, "to simple-websocket")
        assert json.loads(ws.receive(timeout=10))["message"] == "to simple-websocket"
    finally:
        ws.close(1000)  # this client sends its close and drops the socket without a reply
        # ... while its reader thread may still be in a read on that descriptor: a socket
        # opened now can get the same number, and that thread then reads (and answers in)
        # another connection's TLS stream, so it must be gone before the next request
        ws.thread.join(10)
        assert not ws.thread.is_alive()
    wait_for(lambda: tls_server.get("/", timeout=5).json()["clients"] == 0, timeout=10,
             message="the server ended the connection")


SUBPROTOCOL = "wsserver.v1"


def test_websockets_sync_client_over_wss(tls_server):
    from websockets.sync.client import connect

    with connect(tls_server.ws_url, ssl=client_context(), subprotocols=[SUBPROTOCOL],
                 open_timeout=10, close_timeout=10) as ws:
        assert ws.subprotocol == SUBPROTOCOL
        posted(tls_server, "to websockets (sync)")
        assert json.loads(ws.recv(timeout=10))["message"] == "to websockets (sync)"
        assert ws.ping(b"sync").wait(10), "no pong"
        ws.close(1000, "bye")
    _closed_by_our_close_and_the_servers_reply(ws.protocol)


def test_websockets_asyncio_client_over_wss(tls_server):
    from websockets.asyncio.client import connect

    async def session() -> Any:
        async with connect(tls_server.ws_url, ssl=client_context(), subprotocols=[SUBPROTOCOL],
                           open_timeout=10, close_timeout=10) as ws:
            assert ws.subprotocol == SUBPROTOCOL
            await asyncio.to_thread(posted, tls_server, "to websockets (asyncio)")
            message = await asyncio.wait_for(ws.recv(), 10)
            assert json.loads(message)["message"] == "to websockets (asyncio)"
            await asyncio.wait_for(await ws.ping(b"asyncio"), 10)  # the pong came
            await ws.close(1000, "bye")
        return ws.protocol

    _closed_by_our_close_and_the_servers_reply(asyncio.run(session()))


def _closed_by_our_close_and_the_servers_reply(protocol: Any) -> None:
    """websockets' sans-I/O state: we closed first and the server's close frame answered."""
    assert protocol.close_sent is not None and protocol.close_sent.code == 1000
    assert protocol.close_rcvd is not None and protocol.close_rcvd.code == 1000
    assert protocol.close_rcvd_then_sent is False


def test_aiohttp_ws_connect_over_wss(tls_server):
    import aiohttp

    async def session() -> tuple[Any, ...]:
        async with aiohttp.ClientSession() as http:
            # autoping off: the pong is handed to us instead of being swallowed
            # (bounded by wait_for: the float timeouts of ws_connect are deprecated since
            # 3.11, and ClientWSTimeout is not in 3.9)
            async with http.ws_connect(tls_server.ws_url, ssl=client_context(),
                                       protocols=[SUBPROTOCOL], autoping=False) as ws:
                protocol = ws.protocol
                await asyncio.to_thread(posted, tls_server, "to aiohttp")
                message = await ws.receive_json()
                await ws.ping(b"aiohttp")
                pong = await ws.receive()
                closed = await ws.close(code=1000, message=b"bye")
                return protocol, message, pong, closed, ws.close_code

    protocol, message, pong, closed, code = asyncio.run(asyncio.wait_for(session(), 20))
    assert protocol == SUBPROTOCOL
    assert message["message"] == "to aiohttp"
    assert (pong.type, pong.data) == (aiohttp.WSMsgType.PONG, b"aiohttp")
    # close() waits for the server's close frame: the code it reports is the server's
    assert closed is True and code == 1000


NODE_CLIENT = textwrap.dedent("""
    const WebSocket = require('ws');
    const [url, ca] = process.argv.slice(1);
    const ws = new WebSocket(url, ['wsserver.v1'], {ca: require('fs').readFileSync(ca)});
    ws.on('open', () => console.log('open ' + ws.protocol));
    ws.on('message', (data) => { console.log('message ' + data); ws.ping('node'); });
    ws.on('pong', (data) => { console.log('pong ' + data); ws.close(1000); });
    ws.on('close', (code) => { console.log('close ' + code); process.exit(0); });
    ws.on('error', (err) => { console.log('error ' + err.message); process.exit(1); });
""")


# where .ci/run installs Node's ws package (npm install --prefix), outside the repository
NODE_MODULES = os.environ.get(
    "WSSERVER_NODE_MODULES", os.path.expanduser("~/.cache/wsserver-node/node_modules"))
NODE_ENV = {**os.environ, "NODE_PATH": NODE_MODULES}


def _node_ws() -> bool:
    node = shutil.which("node")
    return bool(node) and subprocess.run(
        [node, "-e", "require('ws')"], capture_output=True, cwd=ROOT, timeout=20, env=NODE_ENV
    ).returncode == 0


@pytest.mark.skipif(not _node_ws(), reason=f"Node's ws package is not installed (.ci/run: "
                    f"npm install --prefix {os.path.dirname(NODE_MODULES)} ws@8)")
def test_node_ws_over_wss(tls_server):
    proc = subprocess.Popen(["node", "-e", NODE_CLIENT, tls_server.ws_url, str(test_cert()[0])],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True, env=NODE_ENV)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "open wsserver.v1"
        posted(tls_server, "to node")
        lines = [proc.stdout.readline().strip() for _ in range(3)]
        assert json.loads(lines[0].split(" ", 1)[1])["message"] == "to node"
        assert lines[1:] == ["pong node", "close 1000"]
    finally:
        proc.kill()
        proc.wait(10)


NODE_BUILTIN_CLIENT = textwrap.dedent("""
    const ws = new WebSocket(process.argv[1], ["wsserver.v1"]);
    const say = (line) => console.log(line);
    ws.onopen = () => say("open " + ws.protocol);
    ws.onmessage = (event) => {
        if (JSON.parse(event.data).type === "pong") {
            say("pong");
            ws.close(1000, "bye");
        } else {
            say("message " + event.data);
            ws.send(JSON.stringify({type: "ping"}));  // the browser API has no ping frames
        }
    };
    ws.onclose = (event) => { say(`close ${event.code} ${event.wasClean}`); process.exit(0); };
    // (node 20 fires no close event after a failed handshake)
    ws.onerror = (event) => { say("error " + event.message); process.exit(1); };
    setTimeout(() => { say("timeout"); process.exit(2); }, 15000);
""")


def test_node_builtin_websocket_over_wss(tls_server):
    """undici's WebSocket, with the browsers' API and rules, trusting the test certificate
    through NODE_EXTRA_CA_CERTS (its SAN names 127.0.0.1); without it the handshake fails."""
    cmd = [*node_with_websocket(), "-e", NODE_BUILTIN_CLIENT, tls_server.ws_url]
    untrusted = subprocess.run(cmd, capture_output=True, text=True, timeout=20,
                               env={k: v for k, v in os.environ.items()
                                    if k != "NODE_EXTRA_CA_CERTS"})
    assert untrusted.returncode == 1 and untrusted.stdout.startswith("error "), untrusted.stdout
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "NODE_EXTRA_CA_CERTS": str(test_cert()[0])})
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "open wsserver.v1"
        posted(tls_server, "to node's WebSocket")
        stdout, stderr = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    lines = stdout.strip().splitlines()
    assert json.loads(lines[0].split(" ", 1)[1])["message"] == "to node's WebSocket", stderr
    # wasClean: our close was answered by the server's before the TCP connection ended
    assert lines[1:] == ["pong", "close 1000 true"], stdout + stderr


# -- the SSL write path under load -------------------------------------------------------------


def test_a_1_mib_broadcast_reaches_every_wss_client_whole(tls_server):
    """1 MiB per client is more than the kernel takes at once: SSL_write stops short, the
    retry and the flusher finish it, and nothing in between is torn."""
    clients = [wss(tls_server) for _ in range(3)]
    try:
        big = "".join(chr(ord("a") + i % 26) for i in range(MiB))
        posted(tls_server, big)
        posted(tls_server, "after")
        for ws in clients:
            assert json.loads(ws.recv())["message"] == big
            assert json.loads(ws.recv())["message"] == "after"
    finally:
        for ws in clients:
            ws.close()


# -- how TLS is switched on -------------------------------------------------------------------


def test_gunicorns_own_certfile_and_keyfile_flags_serve_tls(make_server):
    crt, key = test_cert()
    server = TlsServer(args=["--certfile", str(crt), "--keyfile", str(key)]).start()
    try:
        ws = wss(server)
        try:
            posted(server, "flags")
            assert json.loads(ws.recv())["message"] == "flags"
        finally:
            ws.close()
    finally:
        server.stop(graceful=False)


def test_wsserver_serve_with_the_tls_settings(tmp_path):
    port = free_port()
    server = TlsServer(env=tls_env(), port=port)
    env = dict(server.env, PYTHONPATH=str(ROOT))
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "wsserver.cli", "serve"], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: proc.poll() is not None or server._ready(), timeout=30,
                 message="wsserver serve over TLS")
        assert proc.poll() is None, (tmp_path / "serve.log").read_text()
        assert server.get("/", timeout=5).json()["status"] == "ok"
    finally:
        proc.terminate()
        proc.wait(20)
        log.close()


@pytest.mark.parametrize("given", ["WSSERVER_TLS_CERT", "WSSERVER_TLS_KEY"])
def test_one_of_the_pair_alone_stops_the_start_naming_both(given):
    env = {k: v for k, v in GunicornServer().env.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env[given] = tls_env()[given]
    env["PYTHONPATH"] = str(ROOT)
    result = subprocess.run(
        [sys.executable, "-m", "gunicorn", "-c", "python:wsserver.gunicorn_conf",
         "wsserver:create_app()"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert "WSSERVER_TLS_CERT" in result.stderr and "WSSERVER_TLS_KEY" in result.stderr
    assert "Traceback" not in result.stderr


def test_libcurl_over_wss(tls_server):
    """libcurl's WebSocket client (curl_cffi bundles a libcurl built with it: Debian's curl
    7.88 has none), verifying the test certificate."""
    from curl_cffi.const import CurlWsFlag
    from curl_cffi.requests import Session

    with Session() as session:
        ws = session.ws_connect(tls_server.ws_url, verify=str(test_cert()[0]), timeout=10,
                                headers={"Sec-WebSocket-Protocol": SUBPROTOCOL})
        try:
            posted(tls_server, "to libcurl")
            data, flags = ws.recv()
            assert flags & CurlWsFlag.TEXT
            assert json.loads(data)["message"] == "to libcurl"
            ws.send(b'{"type": "ping"}', CurlWsFlag.TEXT)
            data, _ = ws.recv()
            assert json.loads(data) == {"type": "pong"}
        finally:
            ws.close(1000)
    # the server saw the close: the connection is gone from its count
    wait_for(lambda: tls_server.get("/", timeout=5).json()["clients"] == 0, timeout=10,
             message="the server let the libcurl client go")
