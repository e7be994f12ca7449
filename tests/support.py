"""Test support: a real wsserver under gunicorn on a free loopback port, and small clients.

Nothing here is mocked: ``GunicornServer`` runs ``gunicorn -c python:wsserver.gunicorn_conf
'wsserver:create_app()'`` as a subprocess with ``WSSERVER_*`` variables, waits for its
health endpoint, and stops it by PID. Every wait has a deadline.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import requests
import websocket

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02,
             message: str = "condition") -> Any:
    """Poll ``predicate`` until it returns a truthy value; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


class GunicornServer:
    """One gunicorn master + worker serving wsserver on 127.0.0.1."""

    def __init__(self, env: dict[str, str] | None = None, args: list[str] | None = None,
                 threads: int = 64, port: int | None = None) -> None:
        # ``port``: reuse a known port (a restart test); by default a free one
        self.port = port or free_port()
        self.env = dict(os.environ)
        self.env.update({
            "WSSERVER_HOST": "127.0.0.1",
            "WSSERVER_PORT": str(self.port),
            "WSSERVER_THREADS": str(threads),
            "WSSERVER_HTTP_THREADS": "8",
            "WSSERVER_LOG_LEVEL": "info",
            # the suite's default, as ./scripts/serve's; production tests say so explicitly
            "WSSERVER_ENV": "development",
        })
        self.env.update(env or {})
        self.args = args or []
        self.proc: subprocess.Popen | None = None
        self.log_path = Path(f"/tmp/wsserver-test-{self.port}.log")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def start(self, timeout: float = 20.0) -> "GunicornServer":
        cmd = [sys.executable, "-m", "gunicorn", "-c", "python:wsserver.gunicorn_conf",
               *self.args, "wsserver:create_app()"]
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=self._log,
                                     stderr=subprocess.STDOUT)
        try:
            wait_for(self._ready, timeout=timeout, interval=0.05, message="server start")
        except AssertionError:
            self.stop()
            raise AssertionError("server did not start:\n" + self.log())
        return self

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log()}")
        try:
            return requests.get(self.url + "/", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    def health(self) -> dict:
        return requests.get(self.url + "/", timeout=5).json()

    def worker_pid(self) -> int:
        return int(self.health()["pid"])

    def notify(self, body: Any, timeout: float = 5) -> requests.Response:
        return requests.post(self.url + "/notify", json=body, timeout=timeout)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def terminate(self, timeout: float = 20.0) -> int:
        """SIGTERM the master and wait for it: returns its exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self._log.close()

    def __enter__(self) -> "GunicornServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def connect(server: GunicornServer, timeout: float = 10.0, **kwargs: Any) -> websocket.WebSocket:
    """A real WebSocket client (websocket-client) with a receive timeout."""
    return websocket.create_connection(server.ws_url, timeout=timeout, **kwargs)


def recv_json(ws: websocket.WebSocket) -> dict:
    return json.loads(ws.recv())


def thread_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


class RawClient:
    """A WebSocket client on a bare socket: the handshake and frames done by hand, so tests
    control exactly what is sent (or not read) and see exactly what arrives."""

    def __init__(self, server: GunicornServer, path: str = "/ws", rcvbuf: int | None = None,
                 headers: dict[str, str] | None = None, timeout: float = 10.0) -> None:
        import base64

        self.sock = socket.socket()
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect(("127.0.0.1", server.port))
        key = base64.b64encode(os.urandom(16)).decode()
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self.sock.sendall(
            (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nUpgrade: websocket\r\n"
             f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
             f"Sec-WebSocket-Version: 13\r\n{extra}\r\n").encode())
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("closed during handshake")
            self.buf += chunk
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        self.response_head = head.decode("latin-1")
        self.status = int(self.response_head.split()[1])

    def http_body(self) -> bytes:
        """The body of a refused upgrade (a plain HTTP response), read to Content-Length."""
        length = 0
        for line in self.response_head.split("\r\n")[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value.strip())
        self._need(length)
        body, self.buf = self.buf[:length], self.buf[length:]
        return body

    def send_frame(self, opcode: int, payload: bytes = b"", fin: bool = True,
                   rsv: int = 0) -> None:
        from rawws import client_frame

        self.sock.sendall(client_frame(opcode, payload, fin, rsv))

    def send_text(self, text: str) -> None:
        self.send_frame(0x1, text.encode())

    def _need(self, n: int) -> None:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("connection closed by server")
            self.buf += chunk

    def recv_frame(self) -> tuple[int, bytes]:
        """(opcode, payload) of the next server frame (server frames are never masked)."""
        import struct

        self._need(2)
        b0, b1 = self.buf[0], self.buf[1]
        assert b1 & 0x80 == 0, "server frames must not be masked"
        assert b0 & 0x70 == 0, "no RSV bits: nothing is negotiated"
        n, pos = b1 & 0x7F, 2
        if n == 126:
            self._need(4)
            n, pos = struct.unpack("!H", self.buf[2:4])[0], 4
        elif n == 127:
            self._need(10)
            n, pos = struct.unpack("!Q", self.buf[2:10])[0], 10
        self._need(pos + n)
        payload = self.buf[pos:pos + n]
        self.buf = self.buf[pos + n:]
        return b0 & 0x0F, payload

    def recv_until(self, opcode: int) -> tuple[int, bytes]:
        while True:
            op, payload = self.recv_frame()
            if op == opcode:
                return op, payload

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def close_code(payload: bytes) -> int | None:
    import struct

    return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
