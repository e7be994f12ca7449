"""Hostile clients (issue 12's "Must hold") and the two probes that watch a server under them.

Each attack is an object with ``start()``, ``stop()`` and a ``result`` record
(:class:`AttackResult`): what it sent, and for every socket it opened how the server cut it
off (an HTTP status, a close code and reason, EOF or reset) and how many seconds after that
socket opened. ``stop()`` is idempotent: it stops the attack's one thread, joins it with a
timeout and closes every socket the attack opened. Every loop is bounded in count and time
(``max_seconds``, and a count per attack); traffic goes to 127.0.0.1 only.

The attacks:

* :class:`LingeringClose` (a): new sockets at ``rate``/s, each sending a ``Connection: close``
  request, an HTTP/1.0 request or a bad request line (``GET / HTTP/9.9``) in turn, then
  neither reading nor closing until ``stop()``;
* :class:`SlowHeaders` (b): ``n`` sockets, each a request line, then one header line every
  ``interval`` seconds, never the blank line;
* :class:`Silent` (c): ``n`` sockets that connect and send nothing;
* :class:`ContinuationFlood` (d): one WebSocket, a text frame with FIN=0, then empty
  continuation frames as fast as the socket takes them;
* :class:`PingFlood` (e): one WebSocket sending pings as fast as the socket takes them (and
  reading the pongs, so that it is cut off for the pings, not as a slow consumer);
* :class:`ResumeLoop` (f): ``n`` WebSockets looping ``{"type":"subscribe","room":R,
  "since":ID}`` (``depth`` commands in flight each).

The probes:

* :class:`Bystander`: ``GET /`` and ``POST /notify`` on a fresh connection every ``interval``
  seconds; every latency and failure recorded (``summary()`` gives p50/p99/max per kind);
* :class:`Receivers`: N raw WebSocket clients in ONE receiver process with one epoll loop
  (``wsload.ReceiverPool``), recording every bystander notification they get (the
  bystander's ``data.seq``, one to one with the ``id`` its POST got back), so a caller can
  check that each notification accepted with a 200 reached every receiver.

Why :class:`Isolated`: attacks that send "as fast as they can" are Python loops; in the
process that measures the bystander's latency they would take the GIL from it and the
numbers would be the load generator's, not the server's. ``Isolated`` runs any of these
objects in a forked child process (fork before starting threads) and brings their result
records back over a pipe on ``stop()``.

Attackers connect from ``ATTACKER`` (127.0.0.2, still loopback), the probes from 127.0.0.1:
as on a real network, the attacker is not the host whose requests must keep working.

Frames are built here (a few lines: masked client frames) and parsed with
``wsload.iter_frames``; the handshake is wsload's. Standard library only.
"""

from __future__ import annotations

import dataclasses
import errno
import http.client
import json
import math
import multiprocessing as mp
import resource
import selectors
import socket
import struct
import threading
import time
from collections import Counter
from typing import Any, Callable

from .wsload import (
    ReceiverPool,
    check_handshake,
    handshake_request,
    iter_frames,
    masked_frame,
    new_key,
)

__all__ = [
    "ATTACKER",
    "ATTACKS",
    "Attack",
    "AttackResult",
    "Bystander",
    "ContinuationFlood",
    "Cut",
    "Isolated",
    "LingeringClose",
    "PingFlood",
    "Receivers",
    "accepted_posts",
    "ResumeLoop",
    "SilentSockets",
    "SlowHeaders",
    "pct",
    "summarize_bystander",
]

HOST = "127.0.0.1"
# Attackers connect FROM another loopback address: on a real network the attacker is not the
# host the bystander probes from, and a per-address limit must be able to tell them apart.
ATTACKER = "127.0.0.2"
_TCP_CLOSE = 7  # tcp_info.tcpi_state values (linux/tcp_states.h)
_TCP_CLOSE_WAIT = 8
OP_CONT, OP_TEXT, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x8, 0x9, 0xA


# ----------------------------------------------------------------------------- records


@dataclasses.dataclass
class Cut:
    """How the server ended one attacking socket. ``how``: ``open`` (still open at stop),
    ``eof`` (FIN), ``reset``, ``close_frame`` (a WebSocket close), ``refused`` (connect
    failed), ``error`` (anything else). ``after_s``: seconds from this socket's connect to
    the cut (None while open, or when it was only seen at stop)."""

    how: str = "open"
    after_s: float | None = None
    status: int | None = None  # an HTTP status line seen before the end
    close_code: int | None = None
    reason: str = ""


@dataclasses.dataclass
class AttackResult:
    """What one attack did and what the server did to it (plain data: it crosses a pipe)."""

    name: str
    started_at: float = 0.0  # time.time()
    stopped_at: float = 0.0
    sockets: int = 0  # connected
    connect_failed: int = 0
    sent: dict = dataclasses.field(default_factory=dict)  # what was sent, by kind
    cuts: list = dataclasses.field(default_factory=list)  # one Cut per connected socket
    errors: list = dataclasses.field(default_factory=list)  # unexpected exceptions (text)
    extra: dict = dataclasses.field(default_factory=dict)  # attack-specific observations

    def summary(self) -> dict:
        """Counts by outcome: ``how``, HTTP status and close code; the slowest cut."""
        hows = Counter(c.how for c in self.cuts)
        after = [c.after_s for c in self.cuts if c.after_s is not None]
        return {
            "name": self.name,
            "seconds": round(self.stopped_at - self.started_at, 3) if self.stopped_at else None,
            "sockets": self.sockets,
            "connect_failed": self.connect_failed,
            "sent": dict(self.sent),
            "cut": dict(hows),
            "statuses": dict(Counter(c.status for c in self.cuts if c.status is not None)),
            "close_codes": dict(
                Counter(c.close_code for c in self.cuts if c.close_code is not None)
            ),
            "reasons": sorted({c.reason for c in self.cuts if c.reason})[:5],
            "cut_after_s": {"p50": _r3(pct(sorted(after), 50)), "max": _r3(max(after))}
            if after
            else None,
            "errors": self.errors[:5],
            **self.extra,
        }


def pct(sorted_vals: list[float], p: float) -> float | None:
    """Nearest-rank percentile of a sorted list (None if empty), as ``scripts/bench``."""
    n = len(sorted_vals)
    if not n:
        return None
    return sorted_vals[max(0, min(n - 1, math.ceil(p / 100.0 * n) - 1))]


def _r3(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def _closed_by_server(s: _Sock, payload: bytes) -> None:
    """The server's close frame: record its code and reason, and echo the code back (the
    close handshake) so the server ends the TCP connection cleanly."""
    code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
    s.end("close_frame", close_code=code, reason=payload[2:].decode("utf-8", "replace"))
    try:
        s.sock.send(masked_frame(OP_CLOSE, payload[:2]))
    except OSError:
        pass


def _loopback(host: str) -> str:
    if host != HOST:
        raise ValueError(f"attacks go to {HOST} only, not {host!r}")
    return host


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _tcp_state(sock: socket.socket) -> int | None:
    """The kernel's TCP state of ``sock`` (CLOSE_WAIT once the peer's FIN arrived), seen
    without reading from it: a client that does not read stays one."""
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
    except OSError:
        return None


class _Sock:
    __slots__ = ("sock", "t_open", "cut", "buf")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.t_open = time.monotonic()
        self.cut = Cut()
        self.buf = b""

    def end(self, how: str, **kw: Any) -> None:
        if self.cut.how != "open":
            return
        self.cut.how = how
        self.cut.after_s = round(time.monotonic() - self.t_open, 3)
        for k, v in kw.items():
            setattr(self.cut, k, v)


# ----------------------------------------------------------------------------- base


class Attack:
    """One attack on one thread (role name ``attack-<name>``).

    Thread-safety: ``start``/``stop`` from one controlling thread; the attack thread owns
    its sockets until ``stop`` has joined it (or given up after ``join_timeout``), then
    ``stop`` closes them. ``result`` is complete once ``stop`` returned.
    """

    name = "attack"

    def __init__(self, port: int, *, host: str = HOST, source: str | None = ATTACKER,
                 max_seconds: float = 60.0) -> None:
        self.host = _loopback(host)
        self.source = source
        self.port = port
        self.max_seconds = max_seconds
        self.result = AttackResult(self.name)
        self._socks: list[_Sock] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._t0 = 0.0

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> "Attack":
        _raise_nofile()
        self.result.started_at = time.time()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._main, name=f"attack-{self.name}",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self, join_timeout: float = 5.0) -> AttackResult:
        if self._stopped:
            return self.result
        self._stopped = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join(join_timeout)
            if self._thread.is_alive():
                self.result.errors.append(f"thread still running after {join_timeout}s")
        self.finish()
        for s in self._socks:
            try:
                s.sock.close()
            except OSError:
                pass
        self.result.cuts = [s.cut for s in self._socks]
        self.result.stopped_at = time.time()
        return self.result

    def record(self) -> dict:
        """The result as plain data (for a pipe): summary plus every cut."""
        return {"summary": self.result.summary(),
                "cuts": [dataclasses.asdict(c) for c in self.result.cuts]}

    def _main(self) -> None:
        try:
            self.run()
        except Exception as exc:  # noqa: BLE001 - reported in the result, never raised
            self.result.errors.append(f"{type(exc).__name__}: {exc}")

    # -- for subclasses ----------------------------------------------------------------------

    def run(self) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        """Runs in ``stop`` after the thread ended, before the sockets close."""

    def running(self) -> bool:
        return not self._stop.is_set() and time.monotonic() - self._t0 < self.max_seconds

    def count(self, kind: str, n: int = 1) -> None:
        self.result.sent[kind] = self.result.sent.get(kind, 0) + n

    def connect(self, timeout: float = 2.0) -> _Sock | None:
        """A new TCP connection from ``source`` (counted); None if it could not be made."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            if self.source:
                sock.bind((self.source, 0))
            sock.connect((self.host, self.port))
        except OSError as exc:
            sock.close()
            self.result.connect_failed += 1
            errs = self.result.extra.setdefault("connect_errors", {})
            key = type(exc).__name__
            errs[key] = errs.get(key, 0) + 1
            return None
        s = _Sock(sock)
        self._socks.append(s)
        self.result.sockets += 1
        return s

    def connect_ws(self, timeout: float = 5.0) -> _Sock | None:
        """A WebSocket (the handshake as wsload's clients do it), non-blocking once open;
        None (and the reason in ``errors``) if refused."""
        s = self.connect(timeout)
        if s is None:
            return None
        key = new_key()
        try:
            s.sock.sendall(handshake_request(self.host, self.port, "/ws", key))
            buf = b""
            while b"\r\n\r\n" not in buf and len(buf) < 65536:
                chunk = s.sock.recv(4096)
                if not chunk:
                    break
                buf += chunk
        except OSError as exc:
            buf = b""
            self.result.errors.append(f"handshake: {type(exc).__name__}")
        head, sep, rest = buf.partition(b"\r\n\r\n")
        ok, why = check_handshake(head, key) if sep else (False, "no response head")
        if not ok:
            s.end("error", reason=f"handshake: {why}")
            self.result.errors.append(f"handshake: {why}")
            return None
        s.buf = rest
        s.sock.setblocking(False)
        return s

    @staticmethod
    def read_http(s: _Sock) -> bool:
        """Read what a non-WebSocket attacker got: a status line, then EOF or reset.
        Returns True once the socket is finished."""
        try:
            data = s.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return False
        except ConnectionResetError:
            s.end("reset")
            return True
        except OSError as exc:
            s.end("error", reason=errno.errorcode.get(exc.errno or 0, str(exc)))
            return True
        if not data:
            s.end("eof")
            return True
        if s.cut.status is None and len(s.buf) < 64:
            s.buf += data
            if s.buf.startswith(b"HTTP/") and b" " in s.buf:
                try:
                    s.cut.status = int(s.buf.split(b" ", 2)[1][:3])
                except ValueError:
                    pass
        return False


# ----------------------------------------------------------------------------- (a)


class LingeringClose(Attack):
    """(a) Requests the server must close, from clients that then neither read nor close:
    gunicorn's graceful close waits for the peer's FIN. Whether the server's FIN came is
    seen in the socket's TCP state, without reading (``cut.how == "eof"``, with the time)."""

    name = "lingering_close"
    REQUESTS = (
        ("connection_close", b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"),
        ("http10", b"GET / HTTP/1.0\r\n\r\n"),
        ("bad_version", b"GET / HTTP/9.9\r\nHost: 127.0.0.1\r\n\r\n"),
    )

    def __init__(self, port: int, *, rate: float = 50.0, max_sockets: int = 2000,
                 **kw: Any) -> None:
        super().__init__(port, **kw)
        self.rate = rate
        self.max_sockets = max_sockets

    def run(self) -> None:
        k = 0
        next_check = time.monotonic()
        while self.running() and k < self.max_sockets:
            due = self._t0 + k / self.rate
            now = time.monotonic()
            if now >= next_check:
                self._watch_fins()
                next_check = now + 0.25
            if due > now:
                self._stop.wait(min(due - now, 0.05))
                continue
            kind, request = self.REQUESTS[k % len(self.REQUESTS)]
            k += 1
            s = self.connect()
            if s is None:
                continue
            try:
                s.sock.sendall(request)
                self.count(kind)
            except OSError as exc:
                s.end("error", reason=f"send: {type(exc).__name__}")

    def _watch_fins(self) -> None:
        for s in self._socks:
            if s.cut.how == "open" and _tcp_state(s.sock) in (_TCP_CLOSE_WAIT, _TCP_CLOSE):
                s.end("eof")

    def finish(self) -> None:
        self._watch_fins()
        for s in self._socks:  # only now read what came: the status line
            s.sock.setblocking(False)
            for _ in range(4):
                if self.read_http(s):
                    break


# ----------------------------------------------------------------------------- (b), (c)


class _Holders(Attack):
    """Shared by (b) and (c): open ``n`` sockets as fast as connect allows, then watch them
    in one selector for the server's answer and end."""

    def __init__(self, port: int, *, n: int = 300, **kw: Any) -> None:
        super().__init__(port, **kw)
        self.n = n
        self._sel = selectors.DefaultSelector()

    def opened(self, s: _Sock) -> None:
        """Right after connect (the socket is still blocking with a timeout)."""

    def tick(self) -> None:
        """Once per selector round."""

    def run(self) -> None:
        try:
            for _ in range(self.n):
                if not self.running():
                    break
                s = self.connect()
                if s is None:
                    continue
                self.opened(s)
                s.sock.setblocking(False)
                if s.cut.how == "open":
                    self._sel.register(s.sock, selectors.EVENT_READ, s)
                if len(self._socks) % 50 == 0:
                    self._poll(0)
            while self.running() and self._sel.get_map():
                self._poll(0.2)
                self.tick()
        finally:
            self._sel.close()

    def _poll(self, timeout: float) -> None:
        for key, _ev in self._sel.select(timeout):
            s = key.data
            if self.read_http(s):
                self._sel.unregister(s.sock)

    def live(self) -> list[_Sock]:
        return [s for s in self._socks if s.cut.how == "open"]


class SlowHeaders(_Holders):
    """(b) A request line, then one header line every ``interval`` seconds, never the end of
    the head: the slow-loris client. ``max_lines`` bounds the headers per socket."""

    name = "slow_headers"

    def __init__(self, port: int, *, n: int = 1000, interval: float = 3.0,
                 max_lines: int = 200, **kw: Any) -> None:
        super().__init__(port, n=n, **kw)
        self.interval = interval
        self.max_lines = max_lines
        self._next = 0.0
        self._lines = 0

    def opened(self, s: _Sock) -> None:
        try:
            s.sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            self.count("request_lines")
        except OSError as exc:
            s.end("error", reason=f"send: {type(exc).__name__}")
        self._next = time.monotonic() + self.interval

    def tick(self) -> None:
        now = time.monotonic()
        if now < self._next or self._lines >= self.max_lines:
            return
        self._next = now + self.interval
        self._lines += 1
        line = b"X-Slow-%d: x\r\n" % self._lines
        for s in self.live():
            try:
                s.sock.send(line)
                self.count("header_lines")
            except BlockingIOError:
                pass
            except ConnectionResetError:
                s.end("reset")
            except OSError as exc:
                s.end("error", reason=f"send: {type(exc).__name__}")


class SilentSockets(_Holders):
    """(c) Connect and send nothing."""

    name = "silent"


# ----------------------------------------------------------------------------- (d), (e)


class _WsFlood(Attack):
    """One WebSocket writing ``unit`` (whole frames, repeated) as fast as the socket takes
    it, reading whatever the server sends, until the server closes or ``stop``. The stream
    stays frame-aligned across partial sends (an offset into the repeated buffer)."""

    frame: bytes = b""
    first: bytes = b""
    max_frames = 50_000_000

    def __init__(self, port: int, **kw: Any) -> None:
        super().__init__(port, **kw)
        self.unit = self.frame * max(1, 65536 // len(self.frame))
        self.frames_received: Counter = Counter()

    def run(self) -> None:
        s = self.connect_ws()
        if s is None:
            return
        sock = s.sock
        pending = memoryview(self.first)
        unit = memoryview(self.unit)
        off = 0
        sent_bytes = 0
        sel = selectors.DefaultSelector()
        sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
        try:
            while self.running() and s.cut.how == "open":
                if sent_bytes // len(self.frame) >= self.max_frames:
                    break
                for _key, ev in sel.select(0.2):
                    if ev & selectors.EVENT_READ:
                        self._read(s)
                    if ev & selectors.EVENT_WRITE and s.cut.how == "open":
                        try:
                            if pending:
                                n = sock.send(pending)
                                pending = pending[n:]
                                continue
                            n = sock.send(unit[off:])
                        except BlockingIOError:
                            continue
                        except (BrokenPipeError, ConnectionResetError):
                            s.end("reset")
                            break
                        sent_bytes += n
                        off = (off + n) % len(self.unit)
            self.result.extra["closed_at_frames_sent"] = sent_bytes // len(self.frame)
            if s.cut.how == "close_frame":
                self._await_end(s, 2.0)
        finally:
            sel.close()
            self.count("frames", sent_bytes // len(self.frame))
            self.count("bytes", sent_bytes)
            self.result.extra["frames_received"] = dict(self.frames_received)

    def _read(self, s: _Sock) -> None:
        try:
            data = s.sock.recv(1 << 18)
        except BlockingIOError:
            return
        except ConnectionResetError:
            s.end("reset")
            return
        if not data:
            s.end("eof")
            return
        buf = s.buf + data
        # the common case under a ping flood: nothing but empty pongs, counted without a loop
        if buf.count(b"\x8a\x00") * 2 == len(buf):
            self.frames_received["pong"] += len(buf) // 2
            s.buf = b""
            return
        end = 0
        for _fin, op, payload, end in iter_frames(buf):
            if op == OP_CLOSE:
                _closed_by_server(s, payload)
                break
            self.frames_received[{OP_PONG: "pong", OP_PING: "ping", OP_TEXT: "text"}.get(
                op, str(op))] += 1
        s.buf = buf[end:]

    def _await_end(self, s: _Sock, timeout: float) -> None:
        """After the close frame: when does the server drop the TCP connection?"""
        t_end = time.monotonic() + timeout
        while time.monotonic() < t_end and not self._stop.is_set():
            try:
                data = s.sock.recv(65536)
            except BlockingIOError:
                time.sleep(0.02)
                continue
            except OSError:
                data = b""
            if not data:
                self.result.extra["tcp_closed_after_s"] = round(time.monotonic() - s.t_open, 3)
                return


class ContinuationFlood(_WsFlood):
    """(d) A text message that never ends: FIN=0 text frame, then empty continuation frames.
    Nothing counts toward a size limit (0 payload bytes) nor a message rate (no message
    finishes); the defence must count fragments."""

    name = "continuation_flood"
    first = masked_frame(OP_TEXT, b"x", fin=False, mask=b"\x01\x02\x03\x04")
    frame = masked_frame(OP_CONT, b"", fin=False, mask=b"\x01\x02\x03\x04")


class PingFlood(_WsFlood):
    """(e) Empty pings, as fast as the socket takes them; the pongs are read (and counted)."""

    name = "ping_flood"
    frame = masked_frame(OP_PING, b"", mask=b"\x01\x02\x03\x04")


# ----------------------------------------------------------------------------- (f)


class ResumeLoop(Attack):
    """(f) ``n`` WebSockets each sending ``subscribe`` with ``since`` again as soon as fewer
    than ``depth`` of its commands await a reply (``subscribed`` or an error frame). Each
    resume replays the room's history after ``since``: the point is the work and the queue
    slots it takes. Bounded by ``max_commands`` per socket."""

    name = "resume_loop"

    def __init__(self, port: int, *, room: str, since: str, n: int = 20, depth: int = 32,
                 max_commands: int = 100_000, **kw: Any) -> None:
        super().__init__(port, **kw)
        self.n = n
        self.depth = depth
        self.max_commands = max_commands
        payload = json.dumps({"type": "subscribe", "room": room, "since": since}).encode()
        self.command = masked_frame(OP_TEXT, payload)
        self.replies: Counter = Counter()

    def run(self) -> None:
        sel = selectors.DefaultSelector()
        state: dict[int, list[int]] = {}  # fd -> [in flight, sent]
        try:
            for _ in range(self.n):
                if not self.running():
                    return
                s = self.connect_ws()
                if s is None:
                    continue
                state[s.sock.fileno()] = [0, 0]
                sel.register(s.sock, selectors.EVENT_READ, s)
            while self.running() and sel.get_map():
                for s in self._socks:
                    st = state.get(s.sock.fileno()) if s.cut.how == "open" else None
                    while st is not None and st[0] < self.depth and st[1] < self.max_commands:
                        try:
                            s.sock.send(self.command)
                        except BlockingIOError:
                            break
                        except OSError:
                            s.end("reset")
                            break
                        st[0] += 1
                        st[1] += 1
                        self.count("subscribe")
                for key, _ev in sel.select(0.1):
                    s = key.data
                    if self._read(s, state[s.sock.fileno()]):
                        sel.unregister(s.sock)
        finally:
            sel.close()
            self.result.extra["replies"] = dict(self.replies)

    def _read(self, s: _Sock, st: list[int]) -> bool:
        try:
            data = s.sock.recv(1 << 18)
        except BlockingIOError:
            return False
        except ConnectionResetError:
            s.end("reset")
            return True
        if not data:
            s.end("eof")
            return True
        buf = s.buf + data
        end = 0
        for _fin, op, payload, end in iter_frames(buf):
            if op == OP_CLOSE:
                _closed_by_server(s, payload)
                return True
            if op == OP_PING:
                try:
                    s.sock.send(masked_frame(OP_PONG, payload))
                except OSError:
                    pass
                continue
            if op != OP_TEXT:
                continue
            if payload.startswith(b'{"type"'):
                try:
                    obj = json.loads(payload)
                except ValueError:
                    self.replies["unparsable"] += 1
                    continue
                kind = obj.get("type")
                if kind == "error":
                    self.replies["error:" + str(obj.get("code"))] += 1
                    st[0] = max(0, st[0] - 1)
                elif kind == "subscribed":
                    self.replies["subscribed"] += 1
                    st[0] = max(0, st[0] - 1)
                else:
                    self.replies[str(kind)] += 1
            else:
                self.replies["replayed"] += 1
        s.buf = buf[end:]
        return False


ATTACKS: dict[str, type[Attack]] = {
    "a": LingeringClose,
    "b": SlowHeaders,
    "c": SilentSockets,
    "d": ContinuationFlood,
    "e": PingFlood,
    "f": ResumeLoop,
}


# ----------------------------------------------------------------------------- probes


class Bystander:
    """A well-behaved client: every ``interval`` s a ``GET /`` then a ``POST /notify``, each
    on a fresh connection (``Connection: close``), each bounded by ``timeout``. A tick that
    comes late is not made up for (no pile-up of requests behind a stalled server).

    The POST body is ``{"event":"bystander","data":{"seq":K,"t":...}}`` (to everybody, or to
    ``room``): receivers count ``seq``. Samples: (kind, time.time() at start, latency ms,
    HTTP status or 0, error or "", seq or -1, id or "").

    Thread-safety: ``start``/``stop`` from one thread; ``samples`` is complete after ``stop``.
    """

    def __init__(self, port: int, *, host: str = HOST, interval: float = 0.1,
                 timeout: float = 2.0, room: str | None = None, seq0: int = 0,
                 max_seconds: float = 120.0) -> None:
        self.host = _loopback(host)
        self.port = port
        self.interval = interval
        self.timeout = timeout
        self.room = room
        self.seq = seq0
        self.max_seconds = max_seconds
        self.samples: list[tuple] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopped = False

    def start(self) -> "Bystander":
        self._thread = threading.Thread(target=self._run, name="bystander", daemon=True)
        self._thread.start()
        return self

    def stop(self, join_timeout: float | None = None) -> list[tuple]:
        if not self._stopped:
            self._stopped = True
            self._stop.set()
            if self._thread is not None:
                self._thread.join(join_timeout or 2 * self.timeout + 1)
        return self.samples

    def _run(self) -> None:
        t0 = time.monotonic()
        k = 0
        while not self._stop.is_set() and time.monotonic() - t0 < self.max_seconds:
            self._request("GET", "/", None)
            data: dict = {"seq": self.seq, "t": time.time()}
            body: dict = {"event": "bystander", "message": "", "data": data}
            if self.room:
                body["room"] = self.room
            self._request("POST", "/notify", body)
            self.seq += 1
            k += 1
            delay = max(t0 + k * self.interval, time.monotonic()) - time.monotonic()
            if delay > 0:
                self._stop.wait(delay)
            else:
                k = math.ceil((time.monotonic() - t0) / self.interval)

    def _request(self, method: str, path: str, body: dict | None) -> None:
        kind = "GET /" if method == "GET" else "POST /notify"
        seq = body["data"]["seq"] if body else -1
        t = time.time()
        t0 = time.monotonic()
        status, error, ident = 0, "", ""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            headers = {"Connection": "close"}
            payload = None
            if body is not None:
                payload = json.dumps(body)
                headers["Content-Type"] = "application/json"
            conn.request(method, path, payload, headers)
            resp = conn.getresponse()
            raw = resp.read()
            status = resp.status
            if status != 200:
                error = f"http {status}: {raw[:120]!r}"
            elif body is not None:
                ident = str(json.loads(raw).get("id", ""))
        except (OSError, http.client.HTTPException, ValueError) as exc:
            error = type(exc).__name__
        finally:
            conn.close()
        ms = (time.monotonic() - t0) * 1000.0
        self.samples.append((kind, t, round(ms, 3), status, error, seq, ident))

    def record(self) -> dict:
        return {"summary": self.summary(), "samples": list(self.samples)}

    def summary(self) -> dict:
        return summarize_bystander(self.samples)

    def accepted(self) -> list[tuple[int, str]]:
        """(seq, id) of every POST answered 200: what the receivers must all get."""
        return accepted_posts(self.samples)


def summarize_bystander(samples: list) -> dict:
    """Per kind: requests, failures (with the first few errors), p50/p99/max latency (ms)."""
    out: dict = {}
    for kind in ("GET /", "POST /notify"):
        rows = [s for s in samples if s[0] == kind]
        lat = sorted(s[2] for s in rows)
        fails = [s for s in rows if s[4]]
        out[kind] = {
            "requests": len(rows),
            "failed": len(fails),
            "errors": dict(Counter(s[4].split(":")[0] for s in fails)),
            "p50_ms": _r3(pct(lat, 50)),
            "p99_ms": _r3(pct(lat, 99)),
            "max_ms": _r3(lat[-1]) if lat else None,
        }
    return out


def accepted_posts(samples: list) -> list[tuple[int, str]]:
    return [(s[5], s[6]) for s in samples if s[0] == "POST /notify" and s[3] == 200]


class Receivers:
    """``n`` WebSocket clients (everybody's audience) in one receiver process, one epoll
    loop: ``wsload.ReceiverPool`` with ``procs=1``. A separate process so that the test's
    or bench's own Python does not delay their reads.

    ``check(accepted)`` waits (bounded) until every accepted seq reached every receiver, then
    reports ``lost`` = sum over accepted seqs of receivers that did not get it.
    """

    def __init__(self, port: int, *, n: int = 200, host: str = HOST) -> None:
        self.host = _loopback(host)
        self.n = n
        self.pool = ReceiverPool(self.host, port, n, procs=1, concurrency=50,
                                 handshake_timeout=20.0)
        self.connected: dict | None = None
        self._stopped = False

    def start(self, timeout: float = 30.0) -> "Receivers":
        self.pool.start()
        self.connected = self.pool.wait_connected(timeout)
        if self.connected["ok"] != self.n:
            raise RuntimeError(f"receivers: {self.connected['ok']} of {self.n} connected: "
                               f"{self.connected['fail_reasons']}")
        return self

    def check(self, accepted_seqs: list[int], quiet: float = 3.0,
              timeout: float = 15.0) -> dict:
        """Wait until the receivers hold ``n`` copies of each accepted seq (or nothing new
        came for ``quiet`` s), then count what is missing."""
        want = len(accepted_seqs) * self.n
        t_end = time.monotonic() + timeout
        last, last_change = -1, time.monotonic()
        while time.monotonic() < t_end:
            got = self.pool.received()
            if got >= want:
                break
            if got != last:
                last, last_change = got, time.monotonic()
            elif time.monotonic() - last_change > quiet:
                break
            time.sleep(0.05)
        from array import array

        results = self.pool.collect(timeout=30.0)
        counts: Counter = Counter()
        closed: Counter = Counter()
        alive = 0
        for r in results:
            seqs = array("q")
            seqs.frombytes(r["seqs"])
            counts.update(seqs)
            closed.update(r["closed"])
            alive += r["alive"]
        missing = {seq: self.n - counts.get(seq, 0) for seq in accepted_seqs
                   if counts.get(seq, 0) < self.n}
        return {
            "receivers": self.n,
            "alive": alive,
            "closed": dict(closed),
            "accepted": len(accepted_seqs),
            "lost": sum(missing.values()),
            "missing_examples": dict(list(missing.items())[:5]),
        }

    def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            self.pool.close()


# ----------------------------------------------------------------------------- isolation


def _isolated_main(ctrl: Any, factories: list[Callable[[], Any]], max_seconds: float) -> None:
    _raise_nofile()
    objs = []
    try:
        for make in factories:
            objs.append(make().start())
        ctrl.send(("started", len(objs)))
        ctrl.poll(max_seconds)  # until "stop" (or the bound)
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        ctrl.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        records = []
        for obj in objs:
            obj.stop()
            records.append(obj.record())
        try:
            ctrl.send(("records", records))
        except OSError:
            pass


class Isolated:
    """Run attacks or a bystander (anything with ``start()``, ``stop()`` and ``record()``)
    in a forked child process, so their Python does not share a GIL with the measurement.
    ``stop()`` returns each object's ``record()``; the child is joined, and killed by its
    PID if it does not exit. Fork this before the calling process starts threads."""

    def __init__(self, *factories: Callable[[], Any], max_seconds: float = 120.0) -> None:
        ctx = mp.get_context("fork")
        self._pipe, child = ctx.Pipe()
        self._proc = ctx.Process(target=_isolated_main, args=(child, list(factories),
                                                              max_seconds), daemon=True)
        self._records: list[dict] | None = None

    def start(self, timeout: float = 30.0) -> "Isolated":
        self._proc.start()
        if not self._pipe.poll(timeout):
            self.stop()
            raise RuntimeError(f"isolated process did not start within {timeout}s")
        kind, value = self._pipe.recv()
        if kind != "started":
            self.stop()
            raise RuntimeError(f"isolated process failed to start: {value}")
        return self

    def stop(self, timeout: float = 20.0) -> list[dict]:
        if self._records is not None:
            return self._records
        self._records = []
        if self._proc.pid is None:
            return self._records
        try:
            self._pipe.send(("stop",))
        except OSError:
            pass
        t_end = time.monotonic() + timeout
        while time.monotonic() < t_end:
            if self._pipe.poll(0.1):
                try:
                    kind, value = self._pipe.recv()
                except EOFError:
                    break
                if kind == "records":
                    self._records = value
                    break
            elif not self._proc.is_alive():
                break
        self._proc.join(max(0.1, t_end - time.monotonic()))
        if self._proc.is_alive():
            self._proc.kill()  # this child's PID only
            self._proc.join(5)
        self._pipe.close()
        return self._records
