"""Test support: a real wsserver under gunicorn on a free loopback port, and small clients.

Nothing here is mocked: ``GunicornServer`` runs ``gunicorn -c python:wsserver.gunicorn_conf
'wsserver:create_app()'`` as a subprocess with ``WSSERVER_*`` variables, waits for its
health endpoint, and stops it by PID. Every wait has a deadline. The raw WebSocket client
(``RawClient``, ``close_code``) lives in :mod:`rawws`; it is re-exported here.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import requests
import websocket
from rawws import RawClient, close_code

__all__ = [
    "ROOT",
    "GunicornServer",
    "RawClient",
    "close_code",
    "connect",
    "free_port",
    "recv_json",
    "serving",
    "thread_count",
    "wait_for",
]

ROOT = Path(__file__).resolve().parents[1]


def delete_redis_keys(url: str, prefix: str) -> None:
    """Delete every key under ``prefix`` (a test's own prefix, never a shared one)."""
    import redis

    client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _parent_of(pid: int) -> int | None:
    """The parent pid of ``pid`` (None if it is gone or not readable)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


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
    """One gunicorn master + worker serving wsserver on 127.0.0.1.

    ``app``: the WSGI app gunicorn loads (``wsserver:create_app()``, or a Flask app with
    ``Realtime`` inside, then ``prefix`` is its ``url_prefix``: ``health``, ``notify``,
    ``ws_url`` and the start-up check use it)."""

    def __init__(self, env: dict[str, str] | None = None, args: list[str] | None = None,
                 threads: int = 64, port: int | None = None,
                 app: str = "wsserver:create_app()", prefix: str = "",
                 nofile: int | None = None) -> None:
        # ``port``: reuse a known port (a restart test); by default a free one
        # ``nofile``: the open-files limit (soft and hard) the server starts under
        self.nofile = nofile
        self._chosen_port = port is None  # free_port()'s: may race another test process
        self.port = port or free_port()
        self.app, self.prefix = app, prefix
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
        self.log_path = _server_log(self.port)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}{self.prefix}/ws"

    def start(self, timeout: float = 20.0) -> GunicornServer:
        for _attempt in range(3):
            self._foreign = False
            try:
                return self._start(timeout)
            except AssertionError:
                # another test process's server took the port free_port() gave us between
                # our pick and our bind (seen once in CI): it answered our readiness check
                # and ours exited on the taken port; a new port, once more
                if not (self._foreign and self._chosen_port):
                    raise
                self.port = free_port()
                self.env["WSSERVER_PORT"] = str(self.port)
                self.log_path = _server_log(self.port)
        raise AssertionError("server did not start: its port was taken three times")

    def _start(self, timeout: float) -> GunicornServer:
        cmd = [sys.executable, "-m", "gunicorn", "-c", "python:wsserver.gunicorn_conf",
               *self.args, self.app]
        self._log = open(self.log_path, "wb")
        limit = self.nofile
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
            preexec_fn=None if limit is None else (
                lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))),
        )
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
            answer = requests.get(f"{self.url}{self.prefix}/", timeout=1)
        except requests.RequestException:
            return False
        if answer.status_code != 200:
            return False
        pid = answer.json().get("pid") if "json" in answer.headers.get("Content-Type", "") \
            else None
        if isinstance(pid, int) and _parent_of(pid) not in (None, self.proc.pid if self.proc
                                                                 else None):
            self._foreign = True  # another server on this port: not ours, not ready
            return False
        return True

    def health(self) -> dict:
        return requests.get(f"{self.url}{self.prefix}/", timeout=5).json()

    def worker_pid(self) -> int:
        return int(self.health()["pid"])

    def notify(self, body: Any, timeout: float = 5) -> requests.Response:
        return requests.post(f"{self.url}{self.prefix}/notify", json=body, timeout=timeout)

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

    def stop(self, graceful: bool = True) -> None:
        """SIGTERM, gunicorn's graceful stop (clients get 1001, then up to the close timeout
        to answer), and wait. ``graceful=False``: SIGQUIT, its quick stop, for fixtures'
        teardown, where nothing is checked any more: a client a test left open then costs no
        close timeout. Idempotent."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM if graceful else signal.SIGQUIT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc is not None:
            self._log.close()

    def __enter__(self) -> GunicornServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def serving(env: dict[str, str] | None = None, **kwargs: Any) -> Iterator[GunicornServer]:
    """A started server for a fixture: stopped quickly (``stop(graceful=False)``) at its
    teardown. Tests that check the graceful stop call ``stop()`` or ``terminate()``."""
    server = GunicornServer(env=env, **kwargs).start()
    try:
        yield server
    finally:
        server.stop(graceful=False)


def connect(server: GunicornServer, timeout: float = 10.0, **kwargs: Any) -> websocket.WebSocket:
    """A real WebSocket client (websocket-client) with a receive timeout."""
    return websocket.create_connection(server.ws_url, timeout=timeout, **kwargs)


def recv_json(ws: websocket.WebSocket) -> dict:
    return json.loads(ws.recv())


def thread_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def _server_log(port: int) -> Path:
    """A server's log file, named by its port and a token of its own: a later server on the
    same port (another test's) must not overwrite the log of one that failed."""
    return Path(f"/tmp/wsserver-test-{port}-{uuid.uuid4().hex[:8]}.log")


class RedisProcess:
    """A redis-server of a test's own on a free loopback port (never the shared 6379, which
    other tests use), stopped by PID. ``persistent``: it keeps its data across a SIGKILL
    (append-only file, fsync on every write, in a folder of its own), as a production Redis
    would; otherwise it comes back empty. ``hang``/``resume``: SIGSTOP/SIGCONT, a Redis that
    is connected and answers nothing."""

    def __init__(self, persistent: bool = False) -> None:
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.log_path = Path(f"/tmp/wstest-redis-{self.port}.log")
        self.data_dir = (Path(tempfile.mkdtemp(prefix=f"wstest-redis-{self.port}-"))
                         if persistent else None)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisProcess:
        """Start (again, on the same port) and wait until it answers a PING."""
        import redis

        persistence = (["--appendonly", "yes", "--appendfsync", "always",
                        "--dir", str(self.data_dir)] if self.data_dir else ["--appendonly", "no"])
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                 *persistence, "--daemonize", "no"],
                stdout=log, stderr=subprocess.STDOUT,
            )
        client = redis.Redis(port=self.port, socket_timeout=1, socket_connect_timeout=1)

        def up() -> bool:
            assert self.proc is not None and self.proc.poll() is None, self.log_path.read_text()
            try:
                return bool(client.ping())
            except (redis.RedisError, OSError):
                return False

        try:
            wait_for(up, timeout=10, interval=0.05, message="redis-server to answer")
        finally:
            client.close()
        return self

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()  # SIGKILL
        self.proc.wait(5)

    def hang(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.resume()
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log_path.unlink(missing_ok=True)
        if self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)


def node_with_websocket() -> list[str]:
    """The ``node`` command line with its own WebSocket (undici, what browsers' rules look
    like): global in node 22+, behind a flag in 20; the test is skipped without one."""
    import pytest

    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    for flags in ([], ["--experimental-websocket"]):
        probe = subprocess.run([node, *flags, "-e", "process.exit(typeof WebSocket === "
                                "'function' ? 0 : 1)"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return [node, *flags]
    pytest.skip("this node has no WebSocket (node 22+, or 20 with --experimental-websocket)")
