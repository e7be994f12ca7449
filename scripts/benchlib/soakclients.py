"""The soak's clients: WebSocket clients that keep every notification id they receive.

Unlike ``wsload`` (built to count sequence numbers at the highest rate), these clients parse
every frame, because the soak checks *which* messages arrived: each client joins one room,
keeps the ids (Redis stream ids ``ms-seq``, encoded as ``ms * 1_000_000 + seq``) in the order
received, and counts a duplicate whenever an id is not greater than the last one it saw.
They behave like a careful application: on any disconnect they reconnect after a jittered
backoff and resume with ``?rooms=<room>&since=<last id>``; ``busy`` / ``history_unavailable``
error frames are retried with a ``subscribe`` command. Options:

* churn: every receiver process closes (1000) a random open client that has received a
  message at ``churn_rate`` per second; it comes back at once with ``since``;
* stalled readers: the first ``stalled`` clients of every process stop reading for
  ``stall_s`` seconds every ``stall_every_s`` seconds (small SO_RCVBUF, so the server notices).

Per process there is one epoll loop (non-blocking connects and handshakes, as in ``wsload``,
whose handshake and frame helpers are reused). Each process also keeps, per message id, how
many of its clients got it and when the last one did: the parent derives the recovery time
after each fault from that.
"""

from __future__ import annotations

import errno
import heapq
import json
import random
import select
import socket
import time
from array import array
from collections import Counter, deque

from benchlib.wsload import (
    _raise_nofile,
    check_handshake,
    handshake_request,
    iter_frames,
    masked_frame,
    new_key,
    stop_processes,
)

__all__ = ["encode_id", "decode_id", "SoakPool", "soak_receiver_main"]

RETRY_CODES = ("busy", "history_unavailable")


def encode_id(s: str) -> int:
    """``"1795814651497-3"`` -> one sortable int (ms * 10**6 + seq)."""
    ms, _, seq = s.partition("-")
    return int(ms) * 1_000_000 + int(seq or 0)


def decode_id(n: int) -> str:
    return f"{n // 1_000_000}-{n % 1_000_000}"


class _Client:
    __slots__ = ("idx", "sock", "state", "key", "buf", "last", "ids", "dups", "t_state",
                 "stalled", "reconnects", "unrecovered", "events")

    def __init__(self, idx):
        self.idx = idx
        self.sock = None
        self.state = "idle"  # idle | connecting | handshake | open | waiting
        self.key = ""
        self.buf = b""
        self.last = 0  # encoded id of the last message (0: none yet)
        self.ids = array("q")
        self.dups = 0
        self.t_state = 0.0
        self.stalled = False
        self.reconnects = 0
        self.unrecovered = array("q")  # c.last at each resume answered recovered: false
        self.events: deque = deque(maxlen=40)  # (time, what, last id): explains a loss


class _Loop:
    """One receiver process's clients and their epoll loop."""

    def __init__(self, ctrl, host, port, room, n, opts):
        self.ctrl = ctrl
        self.host = host
        self.port = port
        self.room = room
        self.opts = opts
        self.ep = select.epoll()
        self.clients = [_Client(i) for i in range(n)]
        self.by_fd: dict[int, _Client] = {}
        self.timers: list = []  # (due, seq, kind, idx)
        self.tseq = 0
        self.stats: Counter = Counter()
        self.per_id: dict[int, list] = {}  # id -> [clients that got it, last receive time]
        self.rng = random.Random()

    # -- timers ----------------------------------------------------------------------------

    def later(self, delay, kind, idx):
        self.tseq += 1
        heapq.heappush(self.timers, (time.time() + delay, self.tseq, kind, idx))

    def run_timers(self, now):
        while self.timers and self.timers[0][0] <= now:
            _due, _s, kind, idx = heapq.heappop(self.timers)
            c = self.clients[idx] if idx >= 0 else None
            if kind == "connect" and c.state == "waiting":
                self.connect(c)
            elif kind == "resubscribe" and c.state == "open":
                self.send_text(c, {"type": "subscribe", "room": self.room,
                                   **({"since": decode_id(c.last)} if c.last else {})})
            elif kind == "hs_timeout" and c.state in ("connecting", "handshake") \
                    and now - c.t_state >= self.opts["handshake_timeout"] - 0.01:
                self.drop(c, "handshake timeout")
            elif kind == "churn":
                self.churn_one()
                self.later(self.rng.expovariate(self.opts["churn_rate"]), "churn", -1)
            elif kind == "stall":
                self.set_stall(c, True)
                self.later(self.opts["stall_s"], "unstall", idx)
            elif kind == "unstall":
                self.set_stall(c, False)
                self.later(self.opts["stall_every_s"], "stall", idx)

    # -- connections -----------------------------------------------------------------------

    def path(self, c):
        p = f"/ws?rooms={self.room}"
        if c.last:
            p += f"&since={decode_id(c.last)}"
        return p

    def connect(self, c):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if c.idx < self.opts["stalled"]:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 1460)
        s.setblocking(False)
        err = s.connect_ex((self.host, self.port))
        if err not in (0, errno.EINPROGRESS):
            s.close()
            self.stats["connect " + errno.errorcode.get(err, str(err))] += 1
            self.schedule_reconnect(c)
            return
        c.sock, c.state, c.key, c.buf, c.t_state = s, "connecting", new_key(), b"", time.time()
        c.events.append((c.t_state, "connect " + self.path(c), c.last))
        self.by_fd[s.fileno()] = c
        self.ep.register(s.fileno(), select.EPOLLOUT)
        self.later(self.opts["handshake_timeout"], "hs_timeout", c.idx)

    def schedule_reconnect(self, c):
        c.state = "waiting"
        c.reconnects += 1
        self.later(self.rng.uniform(0.05, self.opts["reconnect_s"]), "connect", c.idx)

    def drop(self, c, why, close_code=None):
        """Close ``c`` (sending a close frame with ``close_code``) and schedule its return."""
        self.stats[why] += 1
        c.events.append((time.time(), why, c.last))
        if c.sock is not None:
            fd = c.sock.fileno()
            self.by_fd.pop(fd, None)
            try:
                self.ep.unregister(fd)
            except OSError:
                pass
            if close_code is not None:
                try:
                    c.sock.send(masked_frame(0x8, close_code.to_bytes(2, "big")))
                except OSError:
                    pass
            c.sock.close()
            c.sock = None
        c.stalled = False
        self.schedule_reconnect(c)

    def churn_one(self):
        # only clients that have an id to resume from: one churned before its first message
        # would come back without ``since`` and miss what was published meanwhile
        open_ = [c for c in self.clients
                 if c.state == "open" and c.last and c.idx >= self.opts["stalled"]]
        if open_:
            self.drop(self.rng.choice(open_), "churned", 1000)

    def set_stall(self, c, on):
        if c.state != "open":
            return
        c.stalled = on
        self.ep.modify(c.sock.fileno(), 0 if on else select.EPOLLIN)
        if not on:
            self.on_readable(c)

    def send_text(self, c, obj):
        try:
            c.sock.send(masked_frame(0x1, json.dumps(obj).encode()))
        except OSError as exc:
            self.drop(c, "send " + type(exc).__name__)

    # -- events ----------------------------------------------------------------------------

    def on_event(self, c):
        if c.state == "connecting":
            err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.drop(c, "connect " + errno.errorcode.get(err, str(err)))
                return
            try:
                c.sock.send(handshake_request(self.host, self.port, self.path(c), c.key))
            except OSError as exc:
                self.drop(c, "send " + type(exc).__name__)
                return
            c.state = "handshake"
            self.ep.modify(c.sock.fileno(), select.EPOLLIN)
            return
        self.on_readable(c)

    def on_readable(self, c):
        try:
            data = c.sock.recv(1 << 16)
        except BlockingIOError:
            return
        except OSError as exc:
            self.drop(c, "reset " + errno.errorcode.get(exc.errno or 0, str(exc)))
            return
        if not data:
            self.drop(c, "eof" if c.state == "open" else "eof during handshake")
            return
        c.buf += data
        if c.state == "handshake":
            i = c.buf.find(b"\r\n\r\n")
            if i < 0:
                return
            ok, reason = check_handshake(c.buf[:i], c.key)
            if not ok:
                self.drop(c, f"handshake {reason}")
                return
            c.buf = c.buf[i + 4:]
            c.state = "open"
            self.stats["handshakes"] += 1
            if c.stalled is False and c.idx < self.opts["stalled"] and not any(
                    t[3] == c.idx and t[2] in ("stall", "unstall") for t in self.timers):
                self.later(self.opts["stall_every_s"], "stall", c.idx)
        self.on_frames(c, time.time())

    def on_frames(self, c, now):
        end = 0
        for fin, op, payload, e in iter_frames(c.buf):
            end = e
            if op == 0x9:
                try:
                    c.sock.send(masked_frame(0xA, payload))
                except OSError:
                    pass
            elif op == 0x8:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
                c.buf = b""
                self.drop(c, f"close {code}", 1000)
                return
            elif op == 0x1 and fin:
                self.on_message(c, payload, now)
                if c.state != "open":
                    return
        c.buf = c.buf[end:]

    def on_message(self, c, payload, now):
        obj = json.loads(payload)
        if "type" in obj:
            t = obj["type"]
            if t == "subscribed":
                rec = obj.get("recovered")
                self.stats["subscribed" if rec is None else f"resumed recovered={rec}"] += 1
                if rec is False:
                    c.unrecovered.append(c.last)
                c.events.append((time.time(), json.dumps(obj), c.last))
            elif t == "error":
                self.stats[f"error {obj.get('code')}"] += 1
                c.events.append((time.time(), json.dumps(obj), c.last))
                if obj.get("code") in RETRY_CODES:
                    self.later(self.rng.uniform(0.2, 1.0), "resubscribe", c.idx)
            return
        mid = obj.get("id")
        if not isinstance(mid, str):
            self.stats["message without id"] += 1
            return
        n = encode_id(mid)
        if n <= c.last:
            c.dups += 1
            c.events.append((now, f"duplicate {mid}", c.last))
            return
        c.last = n
        c.ids.append(n)
        rec = self.per_id.get(n)
        if rec is None:
            self.per_id[n] = [1, now]
        else:
            rec[0] += 1
            rec[1] = now

    # -- main loop -------------------------------------------------------------------------

    def results(self):
        states = Counter(c.state for c in self.clients)
        return {
            "ids": [c.ids.tobytes() for c in self.clients],
            "dups": [c.dups for c in self.clients],
            "unrecovered": [c.unrecovered.tobytes() for c in self.clients],
            "events": [list(c.events) for c in self.clients],
            "reconnects": sum(c.reconnects for c in self.clients),
            "states": dict(states),
            "stats": dict(self.stats),
            "per_id": self.per_id,
        }

    def run(self):
        _raise_nofile()
        for i, c in enumerate(self.clients):  # spread the first connects over ~1 s
            c.state = "waiting"
            self.later(i * 1.0 / max(1, len(self.clients)), "connect", i)
        if self.opts["churn_rate"] > 0:
            self.later(self.rng.expovariate(self.opts["churn_rate"]), "churn", -1)
        ctrl_fd = self.ctrl.fileno()
        self.ep.register(ctrl_fd, select.EPOLLIN)
        while True:
            timeout = 0.2
            if self.timers:
                timeout = max(0.0, min(timeout, self.timers[0][0] - time.time()))
            for fd, _ev in self.ep.poll(timeout):
                if fd == ctrl_fd:
                    cmd = self.ctrl.recv()
                    if cmd[0] == "status":
                        target = cmd[1] if len(cmd) > 1 else 0
                        self.ctrl.send(("status", {
                            "open": sum(c.state == "open" for c in self.clients),
                            "caught_up": sum(c.last >= target for c in self.clients)}))
                    elif cmd[0] == "collect":
                        self.ctrl.send(("results", self.results()))
                    elif cmd[0] == "exit":
                        return
                    continue
                c = self.by_fd.get(fd)
                if c is not None and not c.stalled:
                    self.on_event(c)
            self.run_timers(time.time())


def soak_receiver_main(ctrl, host, port, room, n, opts):
    """Process target: run one receiver process's clients until told to exit."""
    loop = _Loop(ctrl, host, port, room, n, opts)
    try:
        loop.run()
    finally:
        for c in loop.clients:
            if c.sock is not None:
                c.sock.close()


class SoakPool:
    """Parent-side handle on the soak's receiver processes (fork)."""

    def __init__(self, host, port, room, n_clients, procs, churn_rate=0.0, stalled=0,
                 stall_s=5.0, stall_every_s=30.0, reconnect_s=1.0, handshake_timeout=15.0):
        import multiprocessing as mp

        ctx = mp.get_context("fork")
        procs = max(1, min(procs, n_clients))
        share = [n_clients // procs + (1 if i < n_clients % procs else 0) for i in range(procs)]
        opts = {"churn_rate": churn_rate / procs, "stalled": stalled, "stall_s": stall_s,
                "stall_every_s": stall_every_s, "reconnect_s": reconnect_s,
                "handshake_timeout": handshake_timeout}
        self.procs, self.pipes = [], []
        for n in share:
            parent, child = ctx.Pipe()
            self.procs.append(ctx.Process(target=soak_receiver_main,
                                          args=(child, host, port, room, n, opts), daemon=True))
            self.pipes.append(parent)

    def start(self):
        for p in self.procs:
            p.start()

    def _ask(self, cmd, kind, timeout, *args):
        for pipe in self.pipes:
            pipe.send((cmd, *args))
        out = []
        for pipe, p in zip(self.pipes, self.procs):
            if not pipe.poll(timeout):
                raise TimeoutError(f"soak receiver {p.pid} did not answer {cmd!r}")
            msg = pipe.recv()
            if msg[0] != kind:
                raise RuntimeError(f"unexpected {msg[0]!r} from soak receiver {p.pid}")
            out.append(msg[1])
        return out

    def open_count(self, timeout=10.0) -> int:
        return sum(i["open"] for i in self._ask("status", "status", timeout))

    def caught_up(self, target: int, timeout=10.0) -> int:
        """How many clients have received the message ``target`` (an encoded id) or later."""
        return sum(i["caught_up"] for i in self._ask("status", "status", timeout, target))

    def collect(self, timeout=120.0):
        return self._ask("collect", "results", timeout)

    def close(self, timeout=10.0):
        stop_processes(self.pipes, self.procs, timeout)
