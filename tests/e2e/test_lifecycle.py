"""Connection and process lifecycle, end to end under gunicorn.

* Clients that misbehave (garbage after the handshake, a frame cut off, a TCP reset) are
  removed from the registry at once and leave no thread, socket or registry entry behind.
* SIGTERM: every client gets close 1001 after everything accepted before it, no new
  WebSocket is accepted, and the master exits 0 well within gunicorn's graceful timeout.
* Startup: a bad setting or ``-w 2`` stops the server with a message naming the problem;
  the user's own gunicorn flags work with the shipped config; ``wsserver serve`` runs.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import rawws
import requests
import websocket
from support import ROOT, GunicornServer, connect, free_port, serving, wait_for

CLOSE = {"Connection": "close"}  # no kept-alive sockets: they make gunicorn linger on stop

# gunicorn's graceful timeout is WSSERVER_SHUTDOWN_TIMEOUT + 5 = 10 s by default; a clean stop
# takes about one second (a few on a loaded machine), so "well under" is this:
SHUTDOWN_BOUND = 6.0

# "At once" for a client that is gone or broke the protocol: far below the close timeout of
# the module's server (8 s) and the keepalive timeouts, with room for a loaded machine.
AT_ONCE = 3.0


def clients(srv: GunicornServer) -> int:
    return requests.get(srv.url + "/", headers=CLOSE, timeout=5).json()["clients"]


def proc_count(pid: int, what: str) -> int:
    return len(os.listdir(f"/proc/{pid}/{what}"))


@pytest.fixture(scope="module")
def lserver():
    """This module's shared server. A long close timeout makes "removed at once" unambiguous:
    a client that is only removed after the close timeout shows up as an 8 s delay."""
    with serving(env={"WSSERVER_CLOSE_TIMEOUT": "8"}) as srv:
        yield srv


# -- misbehaving clients -----------------------------------------------------------------------

ABRUPT_KINDS = [
    "garbage_then_close",
    "garbage_then_reset",
    "midframe_then_close",
    "midframe_then_reset",
    "reset",
]


def misbehave(sock: socket.socket, kind: str) -> None:
    if kind.startswith("garbage"):
        sock.sendall(os.urandom(256))
    elif kind.startswith("midframe"):
        frame = rawws.client_frame(rawws.OP_TEXT, b"x" * 2000)
        sock.sendall(frame[:700])
    if kind.endswith("reset"):
        rawws.reset(sock)
    else:
        sock.close()


def reset_during_handshake(port: int) -> None:
    """Send the upgrade request and vanish before the 101 arrives."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(
        (f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
         "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
         "Sec-WebSocket-Version: 13\r\n\r\n").encode()
    )
    rawws.reset(sock)


@pytest.mark.parametrize("kind", ABRUPT_KINDS)
def test_abrupt_client_is_removed_at_once(lserver, kind):
    wait_for(lambda: clients(lserver) == 0, message="no clients")
    sock, _ = rawws.open_ws(lserver.port)
    wait_for(lambda: clients(lserver) == 1, timeout=5, message="client registered")
    misbehave(sock, kind)
    wait_for(lambda: clients(lserver) == 0, timeout=AT_ONCE, message=f"{kind} client removed")


@pytest.mark.parametrize(
    "garbage",
    [b"\x87\x85" + os.urandom(4) + b"hello", b"\x81\x05hello"],
    ids=["bad-opcode", "unmasked-frame"],
)
def test_garbage_fails_the_connection_at_once(lserver, garbage):
    """A peer that breaks RFC 6455 is failed (section 7.1.7): close 1002, the TCP connection
    dropped and the client removed at once, even though this one keeps its socket open and
    reads nothing back. The server does not wait for it, and nothing else waits either."""
    wait_for(lambda: clients(lserver) == 0, message="no clients")
    sock, _ = rawws.open_ws(lserver.port)
    try:
        wait_for(lambda: clients(lserver) == 1, timeout=5, message="client registered")
        sock.sendall(garbage)
        started = time.monotonic()
        frames = rawws.read_frames(sock, until_close=False, timeout=AT_ONCE)  # to the server's EOF
        assert frames and frames[-1][0] == rawws.OP_CLOSE
        assert rawws.close_code(frames[-1][1]) == 1002
        wait_for(lambda: clients(lserver) == 0, timeout=AT_ONCE, message="garbage client removed")
        elapsed = time.monotonic() - started
        assert elapsed < AT_ONCE, (
            f"the garbage client was counted, or GET / did not answer, for {elapsed:.2f}s")
    finally:
        sock.close()


def test_http_not_stalled_by_clients_that_keep_their_socket_after_close(lserver):
    """Three clients complete the close handshake but keep their TCP connection open (they
    wait for the server to close it, or their application is busy). HTTP must not stall
    (gunicorn's own graceful close would wait up to 2 s for each one's FIN on its main
    thread, one after the other)."""
    wait_for(lambda: clients(lserver) == 0, message="no clients")
    socks = [rawws.open_ws(lserver.port)[0] for _ in range(3)]
    try:
        wait_for(lambda: clients(lserver) == 3, timeout=5, message="clients registered")
        for sock in socks:
            sock.sendall(rawws.client_frame(rawws.OP_CLOSE, rawws.close_payload(1000)))
        for sock in socks:
            frames = rawws.read_frames(sock, timeout=5)
            assert rawws.close_code(frames[-1][1]) == 1000
        started = time.monotonic()
        r = requests.get(lserver.url + "/", headers=CLOSE, timeout=10)
        elapsed = time.monotonic() - started
        assert r.status_code == 200
        assert elapsed < AT_ONCE, f"GET / took {elapsed:.2f}s while closed clients kept their sockets"
    finally:
        for sock in socks:
            sock.close()


def busy_threads(pid: int) -> list[str]:
    """Threads of ``pid`` not parked on a futex (an idle pool thread waits on one), with what
    they wait on: a leaked connection thread would sit in poll or recv."""
    busy = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/wchan") as f:
                wchan = f.read().strip()
        except OSError:
            continue
        if "futex" not in wchan:
            busy.append(wchan)
    return sorted(busy)


def test_200_abrupt_cycles_leak_no_thread_socket_or_registry_entry(lserver):
    """200 connect/abrupt-close cycles of mixed kinds: the count returns to 0 after each
    round, and the worker's threads and open files return to their warmed-up baseline."""
    kinds = ABRUPT_KINDS + ["reset_during_handshake"]  # 6 kinds, one of each per round
    registered = [k for k in kinds if k != "reset_during_handshake"]
    pid = lserver.worker_pid()
    log_start = len(lserver.log())

    def one_round() -> None:
        socks = [rawws.open_ws(lserver.port)[0] for _ in registered]
        wait_for(lambda: clients(lserver) == len(socks), timeout=5, message="round registered")
        for sock, kind in zip(socks, registered):
            misbehave(sock, kind)
        reset_during_handshake(lserver.port)
        wait_for(lambda: clients(lserver) == 0, timeout=AT_ONCE, message="round removed")

    # Warm-up. gthread's pool keeps idle threads, and adds one whenever a request arrives
    # while every thread is busy or just finishing (a race that load makes likelier). Open
    # 24 clients at once first: the pool then holds more idle threads than this test ever
    # needs at the same time, so a later rise can only be a thread that did not come back.
    wait_for(lambda: clients(lserver) == 0, message="no clients")
    crowd = [rawws.open_ws(lserver.port)[0] for _ in range(24)]
    wait_for(lambda: clients(lserver) == 24, timeout=10, message="24 clients")
    for sock in crowd:
        rawws.reset(sock)
    for _ in range(3):
        one_round()
    wait_for(lambda: clients(lserver) == 0)
    threads_before = proc_count(pid, "task")
    fds_before = proc_count(pid, "fd")
    busy_before = busy_threads(pid)

    cycles = 0
    while cycles < 200:
        one_round()
        cycles += len(kinds)

    wait_for(lambda: clients(lserver) == 0)
    wait_for(lambda: proc_count(pid, "task") <= threads_before, timeout=5,
             message=f"threads back to {threads_before} (now {proc_count(pid, 'task')}; "
                     f"busy before {busy_before}, now {busy_threads(pid)})")
    wait_for(lambda: proc_count(pid, "fd") <= fds_before, timeout=5,
             message=f"open files back to {fds_before} (now {proc_count(pid, 'fd')})")
    health = lserver.health()
    assert health["status"] == "ok" and health["clients"] == 0
    new_log = lserver.log()[log_start:]
    assert "Traceback" not in new_log and "[ERROR]" not in new_log, new_log[-3000:]


# -- SIGTERM -----------------------------------------------------------------------------------


class CloseReader:
    """Reads one websocket-client connection to its close frame on a thread: the ids of the
    notifications before it, and its code. Then drops the socket, as a client does once the
    close handshake is done."""

    def __init__(self, ws: websocket.WebSocket) -> None:
        self.ws = ws
        self.ids: list[str] = []
        self.code: int | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while True:
                opcode, data = self.ws.recv_data(control_frame=True)
                if opcode == websocket.ABNF.OPCODE_CLOSE:
                    self.code = rawws.close_code(data)
                    return
                if opcode == websocket.ABNF.OPCODE_TEXT:
                    self.ids.append(json.loads(data)["id"])
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            self.ws.shutdown()


def test_sigterm_delivers_accepted_notifications_then_closes_1001_and_exits_0(make_server):
    srv = make_server()
    socks = [connect(srv, timeout=15) for _ in range(5)]
    wait_for(lambda: clients(srv) == 5, message="5 clients")
    readers = [CloseReader(ws) for ws in socks]

    # publishers keep posting while SIGTERM lands: every 200 must reach every client first
    accepted: list[str] = []
    lock = threading.Lock()
    enough = threading.Event()
    pad = "p" * 2000

    def publisher(k: int) -> None:
        for i in range(10_000):
            try:
                r = requests.post(srv.url + "/notify", headers=CLOSE, timeout=10,
                                  json={"event": "e", "message": pad, "data": [k, i]})
            except requests.RequestException:
                return
            if r.status_code != 200:
                return
            with lock:
                accepted.append(r.json()["id"])
                if len(accepted) >= 30:
                    enough.set()

    publishers = [threading.Thread(target=publisher, args=(k,), daemon=True) for k in range(4)]
    for t in publishers:
        t.start()
    assert enough.wait(15), "publishers did not get 30 notifications accepted"
    started = time.monotonic()
    rc = srv.terminate(timeout=30)
    elapsed = time.monotonic() - started
    for t in publishers:
        t.join(15)
    for r in readers:
        r.thread.join(10)

    assert rc == 0, srv.log()[-2000:]
    assert elapsed < SHUTDOWN_BOUND, f"master took {elapsed:.1f}s to exit"
    assert not any(t.is_alive() for t in publishers)
    with lock:
        want = set(accepted)
    assert len(want) >= 30
    for r in readers:
        assert r.error is None, repr(r.error)
        assert r.code == 1001
        missing = want - set(r.ids)
        assert not missing, f"{len(missing)} accepted notifications not delivered before 1001"


def test_sigterm_refuses_new_websockets_and_cuts_silent_clients(make_server):
    srv = make_server({"WSSERVER_SHUTDOWN_TIMEOUT": "2"})
    polite = connect(srv, timeout=15)
    silent, _ = rawws.open_ws(srv.port)  # never reads, never answers the close
    wait_for(lambda: clients(srv) == 2, message="2 clients")

    outcome: dict = {}

    def stop() -> None:
        started = time.monotonic()
        outcome["rc"] = srv.terminate(timeout=30)
        outcome["elapsed"] = time.monotonic() - started

    stopper = threading.Thread(target=stop, daemon=True)
    stopper.start()
    try:
        opcode, data = polite.recv_data(control_frame=True)
        assert opcode == websocket.ABNF.OPCODE_CLOSE and rawws.close_code(data) == 1001
        polite.shutdown()

        # shutdown has begun (the 1001 went out): a new WebSocket must not be accepted
        try:
            sock, rest = rawws.open_ws(srv.port, timeout=3)
        except rawws.HandshakeRefused as exc:
            assert exc.status == 503, exc.status
        except (OSError, ConnectionError):
            pass  # refused, reset or timed out: not accepted either
        else:
            sock.close()
            pytest.fail("a WebSocket was accepted after SIGTERM")

        stopper.join(30)
        assert outcome.get("rc") == 0, srv.log()[-2000:]
        # the silent client is cut after WSSERVER_SHUTDOWN_TIMEOUT (2 s), well before gunicorn's
        # graceful timeout (7 s here) would end the worker
        assert outcome["elapsed"] < 5.5, f"master took {outcome['elapsed']:.1f}s to exit"
        frames = rawws.read_frames(silent, until_close=False, timeout=5)
        assert frames and rawws.close_code(frames[-1][1]) == 1001
    finally:
        silent.close()


def test_sigterm_exits_promptly_when_clients_keep_their_socket_after_close(make_server):
    """Clients answer the 1001 but keep their TCP connection open a while (a client that
    waits for the server to close it, or is busy elsewhere). The master must still exit
    well within the graceful timeout, not some seconds per client (gunicorn's own graceful
    close waits up to 2 s for each one's FIN, one after the other, on its main thread)."""
    srv = make_server({"WSSERVER_CLOSE_TIMEOUT": "1"})  # how long we wait for a peer's FIN
    socks = [connect(srv, timeout=15) for _ in range(4)]
    wait_for(lambda: clients(srv) == 4, message="4 clients")
    codes: list = []

    def answer_close(ws: websocket.WebSocket) -> None:
        opcode, data = ws.recv_data(control_frame=True)  # replies to the close itself
        codes.append(rawws.close_code(data) if opcode == 8 else opcode)

    readers = [threading.Thread(target=answer_close, args=(ws,), daemon=True) for ws in socks]
    for t in readers:
        t.start()
    try:
        started = time.monotonic()
        rc = srv.terminate(timeout=30)
        elapsed = time.monotonic() - started
        assert rc == 0
        assert codes == [1001] * 4
        assert elapsed < SHUTDOWN_BOUND, f"master took {elapsed:.1f}s to exit"
    finally:
        for ws in socks:
            ws.shutdown()


def exited(pid: int) -> bool:
    """Gone, or a zombie nobody reaped yet (its parent, the master, is dead)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def port_free(port: int) -> bool:
    """A listener can bind the port again, as gunicorn's does (SO_REUSEADDR)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen()
        except OSError:
            return False
        return True


def test_sigkill_of_the_master_closes_clients_1001_and_frees_the_port(make_server):
    """Issue 15: a worker that loses its master (SIGKILL, OOM killer) used to hold the port
    ~10 s ("Parent changed, shutting down") while it waited for its WebSockets, so the
    immediate restart failed. It must see the loss within about a second, close its
    listeners, say goodbye with 1001 as on SIGTERM, and exit within 2 s, even with a client
    that never answers the close."""
    srv = make_server()
    socks = [connect(srv, timeout=15) for _ in range(3)]
    silent, _ = rawws.open_ws(srv.port)  # never reads, never answers the close
    wait_for(lambda: clients(srv) == 4, message="4 clients")
    pid = srv.worker_pid()
    readers = [CloseReader(ws) for ws in socks]
    assert srv.proc is not None
    srv.proc.kill()  # SIGKILL the master
    srv.proc.wait(5)
    killed = time.monotonic()
    wait_for(lambda: port_free(srv.port), timeout=3, interval=0.02, message="the port free")
    freed = time.monotonic() - killed
    wait_for(lambda: exited(pid), timeout=5, interval=0.02, message="the orphan to exit")
    gone = time.monotonic() - killed
    for r in readers:
        r.thread.join(5)
        assert r.error is None and r.code == 1001, (r.error, r.code)
    silent.close()
    assert gone <= 2.0, f"the orphaned worker exited {gone:.2f}s after its master died"
    print(f"port free after {freed:.2f}s, worker gone after {gone:.2f}s")
    # and a new server starts on that port at once
    again = make_server(port=srv.port)
    assert again.health()["clients"] == 0


# -- startup: settings, flags, the wsserver command --------------------------------------------


def clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WSSERVER_")}
    env.update({"WSSERVER_HOST": "127.0.0.1", "WSSERVER_PORT": str(free_port())})
    env.update(extra)
    return env


def gunicorn_cmd(*flags: str) -> list:
    return [sys.executable, "-m", "gunicorn", "-c", "python:wsserver.gunicorn_conf", *flags,
            "wsserver:create_app()"]


WSSERVER = str(Path(sys.executable).parent / "wsserver")

BAD_SETTINGS = [("WSSERVER_PORT", "abc"), ("WSSERVER_QUEUE_SIZE", "0"), ("WSSERVER_ENV", "staging"),
                ("WSSERVER_JWT_SECRET", "a-31-byte-secret-is-too-short!!")]


@pytest.mark.parametrize("name,value", BAD_SETTINGS)
def test_bad_setting_stops_the_server_at_start(name, value):
    result = subprocess.run(gunicorn_cmd(), env=clean_env(**{name: value}), cwd=ROOT,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert name in result.stderr, result.stderr[-2000:]
    assert "Booting worker" not in result.stderr


@pytest.mark.parametrize("name,value", BAD_SETTINGS)
def test_check_config_names_the_bad_setting(name, value):
    result = subprocess.run([WSSERVER, "check-config"], env=clean_env(**{name: value}),
                            capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert name in result.stderr, result.stderr


def test_check_config_accepts_good_settings():
    result = subprocess.run([WSSERVER, "check-config"], env=clean_env(WSSERVER_QUEUE_SIZE="7"),
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "WSSERVER_QUEUE_SIZE" in result.stdout and "7" in result.stdout


@pytest.mark.parametrize("flags", [["-w", "2"], ["--workers=3"]], ids=["-w 2", "--workers=3"])
def test_several_workers_on_the_command_line_are_refused(flags):
    port = free_port()
    result = subprocess.run(gunicorn_cmd(*flags, "-b", f"127.0.0.1:{port}"), env=clean_env(),
                            cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert "worker" in result.stderr.lower() and "refus" in result.stderr.lower(), result.stderr
    assert "Booting worker" not in result.stderr


def test_users_own_bind_and_threads_flags_work():
    srv = GunicornServer()  # WSSERVER_HTTP_THREADS=8
    unused = free_port()
    srv.env["WSSERVER_PORT"] = str(unused)  # -b on the command line must win over it
    srv.args = ["-b", f"127.0.0.1:{srv.port}", "--threads", "40"]
    try:
        srv.start()
        health = srv.health()
        assert health["status"] == "ok"
        assert health["capacity"] == 40 - 8
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", unused), timeout=2).close()
    finally:
        srv.stop()


def test_wsserver_serve_starts_and_stops_on_sigterm(tmp_path):
    port = free_port()
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([WSSERVER, "serve", "--host", "127.0.0.1", "--port", str(port)],
                            env=clean_env(), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)

    def healthy() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"wsserver serve exited with {proc.returncode}")
        try:
            return requests.get(f"http://127.0.0.1:{port}/", headers=CLOSE, timeout=1).ok
        except requests.RequestException:
            return False

    try:
        wait_for(healthy, timeout=30, interval=0.1, message="wsserver serve healthy")
        body = requests.get(f"http://127.0.0.1:{port}/", headers=CLOSE, timeout=5).json()
        assert body["status"] == "ok" and body["service"] == "ws" and body["clients"] == 0
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert time.monotonic() - started < SHUTDOWN_BOUND
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()
