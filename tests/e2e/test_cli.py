"""The ``wsserver`` command's client side: ``notify`` and ``listen`` against a real server,
and ``check-config``'s masking of secrets.

The exit codes and the stdin pipe are checked on the real command in a subprocess; the other
cases call ``wsserver.cli.main`` in-process (the same code path, without paying the
interpreter's start-up each time). Every wait is bounded.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import requests
import websocket
from support import GunicornServer, free_port, wait_for

from wsserver import cli

_script = shutil.which("wsserver", path=str(Path(sys.executable).parent))
WSSERVER = [_script] if _script else [sys.executable, "-m", "wsserver.cli"]
API_KEY = "cli-test-key-5b7d"


def room_name() -> str:
    return "cli-" + uuid.uuid4().hex[:10]


def run(*args: str, input: str | None = None, env: dict | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess:
    full_env = dict(os.environ)
    full_env.pop("WSSERVER_API_KEY", None)
    full_env.update(env or {})
    return subprocess.run([*WSSERVER, *args], input=input, capture_output=True, text=True, check=False,
                          timeout=timeout, env=full_env)


def subscribed_ws(server: GunicornServer, room: str) -> websocket.WebSocket:
    ws = websocket.create_connection(server.ws_url, timeout=30)
    ws.send(json.dumps({"type": "subscribe", "room": room}))
    assert json.loads(ws.recv()) == {"type": "subscribed", "room": room}
    return ws


def room_has_listener(server: GunicornServer, room: str) -> bool:
    rooms = requests.get(server.url + "/rooms", timeout=5).json()["rooms"]
    return any(r["room"] == room and r["clients"] >= 1 for r in rooms)


@pytest.fixture
def no_api_key_env(monkeypatch):
    monkeypatch.delenv("WSSERVER_API_KEY", raising=False)


# -- notify --------------------------------------------------------------------------------------


def test_notify_with_flags(server):
    room = room_name()
    ws = subscribed_ws(server, room)
    try:
        done = run("notify", "--url", server.url, "--event", "order.shipped", "--message", "hi",
                   "--data", '{"order": 7}', "--room", room)
        assert done.returncode == 0, done.stderr
        answer = json.loads(done.stdout)
        assert answer["status"] == "ok" and set(answer["ids"]) == {room}
        got = json.loads(ws.recv())
        assert {k: got[k] for k in ("event", "message", "data", "room", "id")} == {
            "event": "order.shipped", "message": "hi", "data": {"order": 7}, "room": room,
            "id": answer["id"],
        }
    finally:
        ws.close()


def test_notify_reads_json_from_stdin(server):
    room = room_name()
    ws = subscribed_ws(server, room)
    try:
        done = run("notify", "--url", server.url,
                   input=json.dumps({"event": "piped", "room": room, "data": [1, 2]}))
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["status"] == "ok"
        got = json.loads(ws.recv())
        assert (got["event"], got["data"], got["room"]) == ("piped", [1, 2], room)
    finally:
        ws.close()


def test_notify_stdin_batch_and_several_rooms(server, monkeypatch, capsys, no_api_key_env):
    a, b = room_name(), room_name()
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps([{"event": "one", "room": a},
                                                              {"event": 42}])))
    assert cli.main(["notify", "--url", server.url]) == 0
    out, err = capsys.readouterr()
    answer = json.loads(out)
    assert answer["status"] == "partial" and answer["accepted"] == 1
    assert "item 1: invalid_event" in err  # per-item errors are shown

    assert cli.main(["notify", "--url", server.url, "--event", "two", "--room", a,
                     "--room", b]) == 0
    assert set(json.loads(capsys.readouterr().out)["ids"]) == {a, b}


def test_notify_refused_exits_1_with_the_servers_error(make_server):
    srv = make_server({"WSSERVER_API_KEYS": API_KEY})
    refused = run("notify", "--url", srv.url, "--event", "x")
    assert refused.returncode == 1
    assert refused.stdout == ""
    assert "401 missing_api_key" in refused.stderr
    assert "Authorization: Bearer" in refused.stderr  # the server's explanation

    # the key from $WSSERVER_API_KEY, and from the flag
    assert run("notify", "--url", srv.url, "--event", "x",
               env={"WSSERVER_API_KEY": API_KEY}).returncode == 0
    assert cli.main(["notify", "--url", srv.url, "--api-key", API_KEY, "--event", "x"]) == 0


def test_notify_invalid_notification_exits_1(server, capsys):
    assert cli.main(["notify", "--url", server.url, "--event", ""]) == 1
    assert "400 invalid_event" in capsys.readouterr().err


def test_notify_usage_errors_exit_2(server, monkeypatch, capsys):
    bad_data = run("notify", "--url", server.url, "--event", "x", "--data", "{not json")
    assert bad_data.returncode == 2
    assert "--data is not valid JSON" in bad_data.stderr

    monkeypatch.setattr(sys, "stdin", io.StringIO("not json"))
    assert cli.main(["notify", "--url", server.url]) == 2
    assert "stdin is not valid JSON" in capsys.readouterr().err
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert cli.main(["notify", "--url", server.url]) == 2
    monkeypatch.setattr(sys, "stdin", io.StringIO('"a string"'))
    assert cli.main(["notify", "--url", server.url]) == 2
    assert cli.main(["notify", "--url", server.url, "--message", "no event"]) == 2
    assert "--message needs --event" in capsys.readouterr().err
    assert cli.main(["notify", "--url", "ftp://nowhere", "--event", "x"]) == 2
    with pytest.raises(SystemExit) as usage:
        cli.main(["notify", "--retries"])
    assert usage.value.code == 2


# -- listen --------------------------------------------------------------------------------------


class Lines:
    """Reads a subprocess's stream line by line on a thread, so tests can wait on lines."""

    def __init__(self, stream) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            self.lines.append(line.rstrip("\n"))

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


def start_listen(*args: str) -> tuple[subprocess.Popen, Lines, Lines]:
    proc = subprocess.Popen([*WSSERVER, "listen", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    return proc, Lines(proc.stdout), Lines(proc.stderr)


def test_listen_prints_count_notifications_and_exits(server):
    room = room_name()
    proc, out, err = start_listen("--url", server.url, "--room", room, "--count", "2",
                                  "--timeout", "60")
    try:
        wait_for(lambda: room_has_listener(server, room), timeout=30, message="listen subscribed")
        with requests.Session() as http:
            for body in ({"event": "elsewhere", "room": room_name()},
                         {"event": "first", "room": room, "data": {"n": 1}},
                         {"event": "second", "room": room}):
                assert http.post(server.url + "/notify", json=body, timeout=10).status_code == 200
        assert proc.wait(30) == 0
        out.join(10)
        err.join(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    notifications = [json.loads(line) for line in out.lines]
    assert [n["event"] for n in notifications] == ["first", "second"]
    assert notifications[0]["data"] == {"n": 1} and notifications[0]["room"] == room
    assert f"connected to {server.ws_url}, subscribed to {room}" in "\n".join(err.lines)


def test_listen_reports_unrecoverable_since_and_exits_0_on_ctrl_c(server):
    room = room_name()
    # a fresh room has no message 7: the server cannot resume, listen says so on stderr
    proc, out, err = start_listen("--url", server.url, "--room", room, "--since", "7")
    try:
        wait_for(lambda: room_has_listener(server, room), timeout=30, message="listen subscribed")
        wait_for(lambda: any("may have been missed since 7" in line for line in err.lines), timeout=30,
                 message="the gap warning")
        server.notify({"event": "ping-me", "room": room})
        wait_for(lambda: out.lines, timeout=30, message="the notification printed")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert json.loads(out.lines[0])["event"] == "ping-me"


def test_listen_timeout_and_usage(server, capsys):
    # --timeout before --count notifications: 1, saying so
    assert cli.main(["listen", "--url", server.url, "--room", room_name(), "--count", "5",
                     "--timeout", "0.5"]) == 1
    assert "timed out after 0.5s with 0 of 5" in capsys.readouterr().err
    # --timeout alone is a planned duration: 0
    assert cli.main(["listen", "--url", server.url, "--timeout", "0.5"]) == 0
    # ... unless it never got connected
    nowhere = f"http://127.0.0.1:{free_port()}"
    assert cli.main(["listen", "--url", nowhere, "--timeout", "0.5"]) == 1
    assert "could not connect" in capsys.readouterr().err
    assert cli.main(["listen", "--url", server.url, "--since", "3"]) == 2
    with pytest.raises(SystemExit) as usage:
        cli.main(["listen", "--count", "0"])
    assert usage.value.code == 2


# -- check-config --------------------------------------------------------------------------------


def test_check_config_masks_secrets():
    secrets = {"WSSERVER_API_KEYS": "sk-alpha-91f3,sk-beta-77c2",
               "WSSERVER_JWT_SECRET": "jwt-secret-c0ffee-0123456789abcdef"}
    done = run("check-config", env={**secrets, "WSSERVER_QUEUE_SIZE": "77"})
    assert done.returncode == 0, done.stderr
    output = done.stdout + done.stderr
    assert "WSSERVER_QUEUE_SIZE" in output and " 77" in output  # it does print settings
    assert "WSSERVER_API_KEYS" in output and "(2 set, hidden)" in output
    for name, value in secrets.items():
        for part in value.split(","):
            assert part not in output, f"{name} leaked"


# -- serve --dev ---------------------------------------------------------------------------------


def _listening_addresses(port: int) -> set[str]:
    """The local addresses listening on TCP ``port``, read from the kernel's tables
    (``/proc/net/tcp``, ``tcp6``: hex address, state 0A = LISTEN)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, _, port_hex = local.rpartition(":")
            if state == "0A" and int(port_hex, 16) == port:
                found.add(address)
    return found


def _non_loopback_address() -> str | None:
    """This machine's own address on its default route, if it has one (a UDP connect sends
    nothing: it only picks the source address)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 1))
        except OSError:
            return None
        address = probe.getsockname()[0]
    return None if address.startswith("127.") else address


@pytest.fixture
def dev_server(tmp_path):
    """``wsserver serve --dev`` as a user runs it (nothing but development mode, a port, small
    thread counts and a short handshake timeout to keep the test fast), with two workers on
    Redis so "once per server" is seen, and gunicorn flags after ``--``. Yields (process,
    port, log path); stopped by PID."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WSSERVER_")}
    env.update(WSSERVER_THREADS="16", WSSERVER_HTTP_THREADS="8", WSSERVER_HANDSHAKE_TIMEOUT="0.5",
               WSSERVER_REDIS_URL="redis://127.0.0.1:6379/0",
               WSSERVER_REDIS_PREFIX="test-dev-" + uuid.uuid4().hex[:8])
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([*WSSERVER, "serve", "--dev", "--port", str(port), "--workers",
                                 "2", "--", "--access-logfile", "-"],
                                env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert proc.poll() is None, log_path.read_text()
        try:
            return requests.get(url + "/", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    try:
        wait_for(ready, timeout=20, interval=0.05, message="wsserver serve --dev")
        wait_for(lambda: log_path.read_text().count("security:") == 2, timeout=10,
                 message="both workers started")
        yield proc, port, log_path
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGQUIT)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def test_serve_dev_is_the_gunicorn_server_on_loopback_saying_what_is_open(dev_server):
    proc, port, log_path = dev_server
    url = f"http://127.0.0.1:{port}"
    # gunicorn with the shipped config: the access log (a flag after --) never shows ?token=
    assert requests.get(url + "/?token=secret-token-5e7a", timeout=5).status_code == 200
    wait_for(lambda: '"GET / HTTP/1.1" 200' in log_path.read_text(), timeout=5,
             message="the access log line")
    log = log_path.read_text()
    assert "secret-token-5e7a" not in log and "Werkzeug" not in log
    assert f"Listening at: http://127.0.0.1:{port}" in log

    # loopback only: the kernel's listening sockets, and a connect to this host's other address
    assert _listening_addresses(port) == {"0100007F"}  # 127.0.0.1, nothing on tcp6
    other = _non_loopback_address()
    if other is not None:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((other, port), timeout=5).close()

    # one WARNING for the server (two workers), naming what is open
    warnings = [line for line in log.splitlines() if "development mode" in line]
    assert len(warnings) == 1 and "[WARNING]" in warnings[0], warnings
    for item in ("any origin", "POST /notify from any address without a key",
                 "without a connection token", "rebroadcast on"):
        assert item in warnings[0]
    assert "listening on" not in warnings[0]

    # our worker: a client that sends nothing is answered 408 after WSSERVER_HANDSHAKE_TIMEOUT
    with socket.create_connection(("127.0.0.1", port), timeout=10) as silent:
        assert silent.recv(4096).startswith(b"HTTP/1.1 408 ")


def test_serve_dev_says_goodbye_with_1001_on_sigterm(dev_server):
    proc, port, _ = dev_server
    ws = websocket.create_connection(f"ws://127.0.0.1:{port}/ws", timeout=10)
    try:
        ws.send(json.dumps({"type": "subscribe", "room": room_name()}))
        assert json.loads(ws.recv())["type"] == "subscribed"
        proc.send_signal(signal.SIGTERM)  # the PID `wsserver serve` started with: exec'd
        frame = ws.recv_frame()
        while frame.opcode != websocket.ABNF.OPCODE_CLOSE:
            frame = ws.recv_frame()
        assert int.from_bytes(frame.data[:2], "big") == 1001
    finally:
        ws.close()
    assert proc.wait(20) == 0


# -- issue 15: the command as a user meets it ----------------------------------------------------


def test_python_m_wsserver_and_version():
    done = subprocess.run([sys.executable, "-m", "wsserver", "--version"], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0 and done.stdout.startswith("wsserver ")
    for command in ("serve", "check-config", "notify", "listen"):
        helped = subprocess.run([sys.executable, "-m", "wsserver", command, "--help"],
                                capture_output=True, text=True, timeout=60, check=False)
        assert helped.returncode == 0 and f"usage: wsserver {command}" in helped.stdout


def _clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WSSERVER_")}
    env.update(extra)
    return env


@pytest.mark.serial  # "at once" is timed: 4.8 s for a Python start was seen on a busy host
@pytest.mark.parametrize("how", ["serve", "gunicorn"])
def test_a_taken_port_is_one_line_and_exit_1_at_once(how):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        if how == "serve":
            argv = [*WSSERVER, "serve", "--host", "127.0.0.1", "--port", str(port)]
        else:  # plain gunicorn with the shipped config: stopped by its on_starting hook
            argv = [sys.executable, "-m", "gunicorn", "-c", "python:wsserver.gunicorn_conf",
                    "-b", f"127.0.0.1:{port}", "wsserver:create_app()"]
        started = time.monotonic()
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False,
                              env=_clean_env(WSSERVER_THREADS="16", WSSERVER_HTTP_THREADS="8"))
        took = time.monotonic() - started
    assert done.returncode == 1, done.stderr
    said = f"wsserver: cannot listen on 127.0.0.1:{port}: address already in use"
    errors = [line for line in done.stderr.splitlines() if "[INFO]" not in line]
    assert errors == [said]  # gunicorn said ERROR "Connection in use" 5 times over 5 s
    assert "Retrying" not in done.stderr and took < 4, (took, done.stderr)


def test_check_config_into_a_closed_pipe_ends_quietly():
    """`wsserver check-config | head -1`: the reader leaves; no BrokenPipeError traceback."""
    proc = subprocess.Popen([*WSSERVER, "check-config"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=_clean_env())
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # before it writes: every write meets a closed pipe
    err = proc.stderr.read().decode()
    assert proc.wait(30) == 0
    assert "Traceback" not in err and "BrokenPipe" not in err and err == ""


def test_check_config_with_a_redis_url_serve_refuses(tmp_path):
    done = run("check-config", env={"WSSERVER_REDIS_URL": "http://x"})
    assert done.returncode == 2
    assert done.stderr.startswith("wsserver: WSSERVER_REDIS_URL must be a URL redis://")
    done = run("check-config", env={"WSSERVER_TYPO": "1"})
    assert done.returncode == 0
    assert "WSSERVER_TYPO is not a wsserver variable and is ignored; did you mean" in done.stderr


def test_listen_exits_1_saying_once_that_every_room_was_refused(server):
    started = time.monotonic()
    done = run("listen", "--url", server.url, "--room", "bad room", "--timeout", "20")
    assert done.returncode == 1
    assert time.monotonic() - started < 15  # it ended itself, not at --timeout
    assert done.stderr.count("invalid_room") == 1, done.stderr
    assert "the server refused the subscription" in done.stderr
    assert "reconnecting" not in done.stderr


def test_listen_with_one_good_room_of_two_keeps_listening(server):
    room = room_name()
    proc, out, err = start_listen("--url", server.url, "--room", "bad room", "--room", room,
                                  "--count", "1", "--timeout", "30")
    try:
        wait_for(lambda: room_has_listener(server, room), timeout=30, message="listen subscribed")
        server.notify({"event": "still-here", "room": room})
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    out.join(5)
    err.join(5)
    assert json.loads(out.lines[0])["event"] == "still-here"
    assert sum("invalid_room" in line for line in err.lines) == 1  # a warning, once


def test_notify_to_a_dead_port_is_one_sentence():
    dead = f"http://127.0.0.1:{free_port()}"
    done = run("notify", "--url", dead, "--event", "x", "--retries", "0")
    assert done.returncode == 1
    assert done.stderr == f"wsserver: cannot reach {dead}: connection refused\n"


def test_serve_does_not_depend_on_the_current_directory(tmp_path):
    """Run from a folder holding a ``wsserver/`` directory (here: an empty package), serve
    still runs the installed wsserver (it failed with "Failed to find attribute 'create_app'")."""
    (tmp_path / "wsserver").mkdir()
    (tmp_path / "wsserver" / "__init__.py").write_text("")
    port = free_port()
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([*WSSERVER, "serve", "--dev", "--port", str(port)], cwd=tmp_path,
                                env=_clean_env(WSSERVER_THREADS="16", WSSERVER_HTTP_THREADS="8"),
                                stdout=log, stderr=subprocess.STDOUT)

    def ready() -> bool:
        assert proc.poll() is None, log_path.read_text()
        try:
            return requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    try:
        wait_for(ready, timeout=20, interval=0.05, message="wsserver serve from another folder")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    assert "Failed to find attribute" not in log_path.read_text()
