"""Raw-socket WebSocket clients: the receiving side of the load generator.

Each receiver *process* owns a slice of the N client connections and runs one epoll loop
over them. The HTTP upgrade handshake is written by hand (and the Sec-WebSocket-Accept
checked); server frames are parsed in bulk straight out of each ``recv`` buffer:

* the hot path walks only the 2/4/10-byte frame headers to find where complete frames end,
  then pulls every ``"seq": K`` out of the completed region with one regex ``findall``;
* one receive timestamp is taken per ``recv`` call and stored once per batch, together with
  the number of frames in the batch; the sequence numbers go into an ``array``;
* anything unusual (control frames, fragments, masked frames, frames without a ``seq``,
  count mismatch between headers and regex) falls back to a per-frame slow path that parses
  the JSON;
* the first frame of every connection is JSON-parsed and checked against the message schema.

Aggregation (latency percentiles etc.) happens in the parent after the run, from the arrays.
Only the standard library is used.

With ``tls`` (wss://) the same loop drives non-blocking TLS: after the TCP connect the socket
is wrapped (``do_handshake_on_connect=False``) and ``do_handshake()`` is retried on the epoll
events its ``SSLWantReadError``/``SSLWantWriteError`` ask for; then the HTTP upgrade goes over
TLS as above, and a readable connection is read (``SSLSocket.recv``, one TLS record per call)
until ``SSLWantReadError``, so that nothing decrypted is left inside OpenSSL where epoll
cannot see it. The decrypted bytes go through the same frame parser. The plain path reads
with one ``recv`` per event as before.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import os
import re
import resource
import select
import socket
import ssl
import time
from array import array
from collections import Counter

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
SEQ_RE = re.compile(rb'"seq":\s*(\d+)')
RECV_BYTES = 1 << 18
TLS_READ_CAP = 1 << 20  # TLS: decrypted bytes per event at most (epoll reports the rest)
MESSAGE_KEYS = ("event", "message", "data", "room", "id", "ts")


# ----------------------------------------------------------------------------- handshake


def new_key() -> str:
    return base64.b64encode(os.urandom(16)).decode("ascii")


def accept_for(key: str) -> bytes:
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + WS_GUID).digest())


def handshake_request(host: str, port: int, path: str, key: str) -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\n"
        f"Host: {host}:{port}\r\n"
        "Upgrade: websocket\r\n"
        "Connection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n"
        "\r\n"
    ).encode("ascii")


def check_handshake(head: bytes, key: str):
    """``head`` is the response up to (not including) the blank line. Returns (ok, reason)."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/"):
        return False, "bad status line"
    try:
        code = int(parts[1])
    except ValueError:
        return False, "bad status line"
    if code != 101:
        return False, f"http {code}"
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    if headers.get(b"sec-websocket-accept") != accept_for(key):
        return False, "bad Sec-WebSocket-Accept"
    if headers.get(b"upgrade", b"").lower() != b"websocket":
        return False, "bad Upgrade header"
    if b"sec-websocket-extensions" in headers:
        return False, "unrequested extension"
    return True, None


def masked_frame(opcode: int, payload: bytes = b"", fin: bool = True,
                 mask: bytes | None = None) -> bytes:
    """A client frame (always masked, RFC 6455 5.3); ``fin=False`` for the first frames of a
    fragmented message, ``mask`` fixed for a frame sent many times."""
    mask = mask or os.urandom(4)
    n = len(payload)
    first = (0x80 if fin else 0) | opcode
    if n < 126:
        head = bytes((first, 0x80 | n))
    elif n < 65536:
        head = bytes((first, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((first, 0x80 | 127)) + n.to_bytes(8, "big")
    body = bytes(b ^ mask[i & 3] for i, b in enumerate(payload))
    return head + mask + body


def open_blocking_client(host: str, port: int, path: str = "/ws", rcvbuf: int | None = None,
                         mss: int | None = None, timeout: float = 10.0):
    """One blocking client, handshake done. Returns (socket, bytes read past the headers).

    ``rcvbuf`` and ``mss`` are applied before ``connect`` (used for the stalled client):
    a small SO_RCVBUF keeps the advertised window small from the start, and a small
    TCP_MAXSEG makes the client advertise an Internet-like MSS in its SYN. Without the
    latter, loopback's 64 KB MSS lets the *server's* socket send buffer autotune to ~3 MB,
    so a stalled loopback client would absorb megabytes before the server notices anything;
    with MSS 1460 the server's kernel buffer stays near 50 KB, as for a remote client."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    if mss:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, mss)
    s.settimeout(timeout)
    s.connect((host, port))
    key = new_key()
    s.sendall(handshake_request(host, port, path, key))
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(4096)
        if not chunk:
            s.close()
            raise ConnectionError("EOF during handshake")
        buf += chunk
        if len(buf) > 65536:
            s.close()
            raise ConnectionError("oversized handshake response")
    i = buf.index(b"\r\n\r\n")
    ok, reason = check_handshake(buf[:i], key)
    if not ok:
        s.close()
        raise ConnectionError(f"handshake failed: {reason}")
    return s, buf[i + 4:]


# ----------------------------------------------------------------------------- frames


def iter_frames(buf, pos: int = 0):
    """Yield (fin, opcode, payload, end) for each complete frame in ``buf`` from ``pos``."""
    n = len(buf)
    while n - pos >= 2:
        b0 = buf[pos]
        b1 = buf[pos + 1]
        ln = b1 & 0x7F
        h = 2
        if ln == 126:
            if n - pos < 4:
                return
            ln = (buf[pos + 2] << 8) | buf[pos + 3]
            h = 4
        elif ln == 127:
            if n - pos < 10:
                return
            ln = int.from_bytes(buf[pos + 2:pos + 10], "big")
            h = 10
        mask = None
        if b1 & 0x80:
            if n - pos < h + 4:
                return
            mask = buf[pos + h:pos + h + 4]
            h += 4
        end = pos + h + ln
        if end > n:
            return
        payload = bytes(buf[pos + h:end])
        if mask:
            payload = bytes(b ^ mask[i & 3] for i, b in enumerate(payload))
        yield bool(b0 & 0x80), b0 & 0x0F, payload, end
        pos = end


def check_message(payload: bytes):
    """Schema check of one server message. Returns (error or None, seq or None, t or None)."""
    try:
        obj = json.loads(payload)
    except ValueError as exc:
        return f"not JSON: {exc}", None, None
    if not isinstance(obj, dict):
        return "not a JSON object", None, None
    missing = [k for k in MESSAGE_KEYS if k not in obj]
    if missing:
        return f"missing keys {missing}", None, None
    if obj["room"] is not None:
        return f"room is {obj['room']!r}, expected null", None, None
    if not isinstance(obj["ts"], (int, float)):
        return "ts is not a number", None, None
    data = obj["data"]
    if not isinstance(data, dict) or "seq" not in data or "t" not in data:
        return None, None, None  # a valid message, just not one of ours
    return None, data["seq"], data["t"]


# ----------------------------------------------------------------------------- receiver


class _Conn:
    __slots__ = ("sock", "idx", "rem", "checked", "n", "frag")

    def __init__(self, sock, idx, rem):
        self.sock = sock
        self.idx = idx
        self.rem = rem
        self.checked = False
        self.n = 0
        self.frag = None


def _raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _cpu_s():
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _sys_s():
    return resource.getrusage(resource.RUSAGE_SELF).ru_stime


def receiver_main(*a):
    """Process target. WSBENCH_PROFILE=/tmp/prefix profiles each receiver with cProfile
    (written to /tmp/prefix.<index>) to check the load generator's own cost."""
    if os.environ.get("WSBENCH_PROFILE"):
        import cProfile
        cProfile.runctx("_receiver_main(*a)", globals(), {"a": a, "_receiver_main": _receiver_main},
                        f"{os.environ['WSBENCH_PROFILE']}.{a[1]}")
    else:
        _receiver_main(*a)


def _receiver_main(ctrl, proc_idx, host, port, path, n_clients, concurrency, rcvbuf,
                   handshake_timeout, progress, coalesce_s, tls=False):
    """Entry point of one receiver process (forked). Talks to the parent over ``ctrl``.

    Protocol: sends ("connected", info) once every handshake has finished or failed; then
    answers ("status",) -> ("status", info), ("reset", coalesce_s) -> ("reset", info),
    ("collect",) -> ("results", info) and exits on ("exit",) after closing its sockets.

    Established connections are read from the moment their handshake completes, also while
    others are still connecting: a server's pings must be answered during a long connect
    phase too (10k connections can take minutes).

    ``tls``: wss:// (see the module docstring); the certificate is not verified (loopback).
    """
    _raise_nofile()
    ep = select.epoll()
    conns: dict[int, _Conn] = {}
    fails: Counter = Counter()
    hs_times = array("d")

    # measurement state (replaced by "reset")
    seqs = array("q")
    batch_t = array("d")
    batch_n = array("l")
    per_conn: dict[int, int] = {}
    closed: Counter = Counter()
    stats = Counter()  # other_frames, schema_errors, pings, slow_batches, polls, recvs
    schema_example: list = []
    samples: list = []  # (seq, t) from JSON-parsed frames, checked by the parent
    total = 0
    findall = SEQ_RE.findall
    now_fn = time.time

    def close_conn(c, why, send_close=None):
        fd = c.sock.fileno()
        closed[why] += 1
        per_conn[c.idx] = c.n
        conns.pop(fd, None)
        try:
            ep.unregister(fd)
        except OSError:
            pass
        if send_close is not None:
            try:
                c.sock.send(masked_frame(0x8, send_close))
            except OSError:
                pass
        c.sock.close()

    def note_schema(err, payload):
        stats["schema_errors"] += 1
        if len(schema_example) < 3:
            schema_example.append(f"{err}: {payload[:200]!r}")

    def slow_path(c, data, end):
        """Per-frame parse of data[:end]. Returns (seq list, close payload or None)."""
        out = []
        close_payload = None
        for fin, op, payload, _e in iter_frames(memoryview(data)[:end]):
            if op == 0x9:
                stats["pings"] += 1
                try:
                    c.sock.send(masked_frame(0xA, payload))
                except OSError:
                    pass
                continue
            if op == 0xA:
                continue
            if op == 0x8:
                close_payload = payload
                break
            if op in (0x1, 0x2):
                if not fin:
                    c.frag = payload
                    continue
                msg = payload
            elif op == 0x0:
                c.frag = (c.frag or b"") + payload
                if not fin:
                    continue
                msg, c.frag = c.frag, None
            else:
                stats["unknown_opcode"] += 1
                continue
            err, seq, t = check_message(msg)
            if err:
                note_schema(err, msg)
            elif seq is None:
                stats["other_frames"] += 1
            else:
                out.append(seq)
                if len(samples) < 200:
                    samples.append((seq, t))
        return out, close_payload

    def on_readable(c):
        try:
            data = c.sock.recv(RECV_BYTES)
        except BlockingIOError:
            return
        except OSError as exc:
            close_conn(c, "reset " + errno.errorcode.get(exc.errno or 0, str(exc)))
            return
        if not data:
            close_conn(c, "eof")
            return
        stats["recvs"] += 1
        on_data(c, data, now_fn())

    def on_readable_tls(c):
        """Read decrypted data until OpenSSL wants more from the socket (or TLS_READ_CAP),
        then parse it in one go; EOF with or without close_notify is an "eof"."""
        sock = c.sock
        chunks = []
        size = 0
        gone = None
        while size < TLS_READ_CAP:
            try:
                d = sock.recv(RECV_BYTES)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                break
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                gone = "eof"
                break
            except OSError as exc:
                gone = "reset " + errno.errorcode.get(exc.errno or 0, str(exc))
                break
            if not d:
                gone = "eof"
                break
            chunks.append(d)
            size += len(d)
        stats["recvs"] += len(chunks)
        fd = sock.fileno()
        if chunks:
            on_data(c, chunks[0] if len(chunks) == 1 else b"".join(chunks), now_fn())
        if gone is not None and conns.get(fd) is c:
            close_conn(c, gone)

    def on_data(c, data, now):
        """Count the frames in ``data`` (bytes read from ``c`` at ``now``)."""
        nonlocal total
        if c.rem:
            data = c.rem + data
        n = len(data)
        pos = 0
        cnt = 0
        odd = False
        # hot path: walk the frame headers only
        while n - pos >= 2:
            b1 = data[pos + 1]
            ln = b1 & 0x7F
            if ln < 126:
                h = 2
            elif ln == 126:
                if n - pos < 4:
                    break
                ln = (data[pos + 2] << 8) | data[pos + 3]
                h = 4
            else:
                if n - pos < 10:
                    break
                ln = int.from_bytes(data[pos + 2:pos + 10], "big")
                h = 10
            if b1 & 0x80:
                h += 4
                odd = True
            end = pos + h + ln
            if end > n:
                break
            if data[pos] != 0x81:
                odd = True
            cnt += 1
            pos = end
        c.rem = data[pos:] if pos < n else b""
        if not cnt:
            return
        if not c.checked:
            c.checked = True
            for _fin, op, payload, _e in iter_frames(data[:pos]):
                if op == 0x1:
                    err, seq, t = check_message(payload)
                    if err:
                        note_schema(err, payload)
                    elif seq is not None and len(samples) < 200:
                        samples.append((seq, t))
                    break
        close_payload = None
        if not odd:
            found = findall(data, 0, pos)
            if len(found) != cnt:
                odd = True
        if odd:
            stats["slow_batches"] += 1
            found, close_payload = slow_path(c, data, pos)
            seqs.extend(found)
        else:
            seqs.extend(map(int, found))
        k = len(found)
        if k:
            batch_t.append(now)
            batch_n.append(k)
            c.n += k
            total += k
            progress[proc_idx] = total
        if close_payload is not None:
            code = int.from_bytes(close_payload[:2], "big") if len(close_payload) >= 2 else None
            close_conn(c, f"close {code}", close_payload[:2])

    # ---- connect phase: non-blocking connects, at most `concurrency` handshakes in flight
    t_begin = time.time()
    if tls:
        from benchlib.tlsutil import client_context

        tls_ctx = client_context()
    read_conn = on_readable_tls if tls else on_readable  # for every established client
    inflight: dict[int, list] = {}
    next_idx = 0
    last_sweep = t_begin

    def fail(fd, reason):
        st = inflight.pop(fd)
        fails[reason] += 1
        try:
            ep.unregister(fd)
        except OSError:
            pass
        st[0].close()

    def send_upgrade(fd, st):
        """Send the HTTP upgrade request (over TLS once its handshake is done); False if the
        connection failed."""
        try:
            st[0].send(handshake_request(host, port, path, st[1]))
        except OSError as exc:
            fail(fd, "send " + errno.errorcode.get(exc.errno or 0, str(exc)))
            return False
        st[4] = 1
        ep.modify(fd, select.EPOLLIN)
        return True

    def tls_step(fd, st):
        """One step of the non-blocking TLS handshake (state 2); sends the upgrade when done."""
        try:
            st[0].do_handshake()
        except ssl.SSLWantReadError:
            ep.modify(fd, select.EPOLLIN)
            return
        except ssl.SSLWantWriteError:
            ep.modify(fd, select.EPOLLOUT)
            return
        except OSError as exc:  # ssl.SSLError included
            fail(fd, "tls " + (getattr(exc, "reason", None) or type(exc).__name__))
            return
        send_upgrade(fd, st)

    while next_idx < n_clients or inflight:
        while next_idx < n_clients and len(inflight) < concurrency:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            if rcvbuf:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            s.setblocking(False)
            err = s.connect_ex((host, port))
            if err not in (0, errno.EINPROGRESS):
                fails["connect " + errno.errorcode.get(err, str(err))] += 1
                s.close()
                next_idx += 1
                continue
            fd = s.fileno()
            inflight[fd] = [s, new_key(), time.time(), b"", 0, next_idx]
            ep.register(fd, select.EPOLLOUT)
            next_idx += 1
        events = ep.poll(0.2)
        now = time.time()
        for fd, _ev in events:
            st = inflight.get(fd)
            if st is None:
                c = conns.get(fd)
                if c is not None:
                    read_conn(c)  # an established client: pings, early frames
                continue
            s = st[0]
            if st[4] == 0:  # TCP connect finished (or failed)
                err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    fail(fd, "connect " + errno.errorcode.get(err, str(err)))
                    continue
                if tls:  # same fd, now an SSLSocket
                    st[0] = tls_ctx.wrap_socket(s, do_handshake_on_connect=False)
                    st[4] = 2
                    tls_step(fd, st)
                else:
                    send_upgrade(fd, st)
                continue
            if st[4] == 2:
                tls_step(fd, st)
                continue
            try:
                data = s.recv(65536)
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                continue
            except OSError as exc:
                fail(fd, "recv " + errno.errorcode.get(exc.errno or 0, str(exc)))
                continue
            if not data:
                fail(fd, "EOF before 101")
                continue
            st[3] += data
            i = st[3].find(b"\r\n\r\n")
            if i < 0:
                if len(st[3]) > 65536:
                    fail(fd, "oversized handshake response")
                continue
            ok, reason = check_handshake(st[3][:i], st[1])
            if not ok:
                fail(fd, reason)
                continue
            del inflight[fd]  # stays registered for EPOLLIN: now an established client
            c = _Conn(s, st[5], st[3][i + 4:])
            conns[fd] = c
            per_conn[c.idx] = 0
            hs_times.append(now - st[2])
            if tls and s.pending():  # decrypted frames behind the 101 (epoll cannot tell)
                read_conn(c)
        if now - last_sweep > 0.5:
            last_sweep = now
            for fd in [fd for fd, st in inflight.items() if now - st[2] > handshake_timeout]:
                fail(fd, "handshake timeout")
    t_connected = time.time()
    ctrl.send(("connected", {
        "ok": len(conns),
        "failed": sum(fails.values()),
        "fail_reasons": dict(fails),
        "closed_while_connecting": dict(closed),
        "t_begin": t_begin,
        "t_end": t_connected,
        "hs_ms": [x * 1000.0 for x in sorted(hs_times)],
    }))

    # ---- receive phase
    # With coalesce_s the loop polls without blocking and sleeps between rounds: the process
    # never waits inside epoll_wait, so the server's send() does not have to wake it up (a
    # cross-CPU wakeup per frame is expensive, on a VM especially), and each round picks up
    # everything that arrived during the sleep. Without it, epoll blocks (exact timestamps).
    cpu0 = _cpu_s()
    sys0 = _sys_s()
    ctrl_fd = ctrl.fileno()
    ep.register(ctrl_fd, select.EPOLLIN)
    poll_timeout = 0 if coalesce_s else 1.0
    running = True
    while running:
        events = ep.poll(poll_timeout)
        stats["polls"] += 1
        for fd, _ev in events:
            if fd != ctrl_fd:
                c = conns.get(fd)
                if c is not None:
                    read_conn(c)
                continue
            cmd = ctrl.recv()
            if cmd[0] == "status":
                ctrl.send(("status", {"alive": len(conns), "closed": dict(closed),
                                      "received": total}))
            elif cmd[0] == "collect":
                for c in conns.values():
                    per_conn[c.idx] = c.n
                ctrl.send(("results", {
                    "seqs": seqs.tobytes(),
                    "batch_t": batch_t.tobytes(),
                    "batch_n": batch_n.tobytes(),
                    "per_conn": list(per_conn.values()),
                    "alive": len(conns),
                    "closed": dict(closed),
                    "stats": dict(stats),
                    "schema_example": list(schema_example),
                    "samples": list(samples),
                    "cpu_s": _cpu_s() - cpu0,
                    "sys_s": _sys_s() - sys0,
                    "received": total,
                }))
            elif cmd[0] == "reset":
                # a new measurement on the same connections
                del seqs[:]
                del batch_t[:]
                del batch_n[:]
                per_conn.clear()
                for c in conns.values():
                    c.n = 0
                    per_conn[c.idx] = 0
                closed.clear()
                stats.clear()
                del schema_example[:]
                del samples[:]
                cpu0 = _cpu_s()
                sys0 = _sys_s()
                coalesce_s = cmd[1]
                poll_timeout = 0 if coalesce_s else 1.0
                ctrl.send(("reset", {"alive": len(conns), "received": total}))
            elif cmd[0] == "exit":
                running = False
                break
        if coalesce_s:
            time.sleep(coalesce_s)

    for c in list(conns.values()):
        c.sock.close()
    ep.close()


# ----------------------------------------------------------------------------- parent side


def stop_processes(pipes, procs, timeout=10.0):
    """Ask each receiver process to exit over its pipe; SIGKILL (that PID only) any still
    alive after ``timeout``."""
    for pipe in pipes:
        try:
            pipe.send(("exit",))
        except OSError:
            pass
    deadline = time.time() + timeout
    for p in procs:
        if p.pid is None:
            continue
        p.join(max(0.1, deadline - time.time()))
        if p.is_alive():
            p.kill()  # SIGKILL to this PID only
            p.join(5)


class ReceiverPool:
    """Parent-side handle on the receiver processes (fork start method); ``tls``: wss://."""

    def __init__(self, host, port, n_clients, procs, path="/ws", concurrency=100, rcvbuf=None,
                 handshake_timeout=30.0, coalesce_s=0.0, tls=False):
        import multiprocessing as mp

        self.ctx = mp.get_context("fork")
        self.n_clients = n_clients
        procs = max(1, min(procs, n_clients))
        share = [n_clients // procs + (1 if i < n_clients % procs else 0) for i in range(procs)]
        self.progress = self.ctx.RawArray("q", procs)
        self.procs = []
        self.pipes = []
        for i, n in enumerate(share):
            parent, child = self.ctx.Pipe()
            p = self.ctx.Process(
                target=receiver_main,
                args=(child, i, host, port, path, n, concurrency, rcvbuf, handshake_timeout,
                      self.progress, coalesce_s, tls),
                daemon=True,
            )
            self.procs.append(p)
            self.pipes.append(parent)
        self.connect_info = None

    def start(self):
        for p in self.procs:
            p.start()

    def _recv_all(self, kind, timeout):
        deadline = time.time() + timeout
        out = []
        for pipe, p in zip(self.pipes, self.procs):
            while True:
                left = deadline - time.time()
                if left <= 0:
                    raise TimeoutError(f"receiver {p.pid} did not answer {kind!r} in {timeout}s")
                if pipe.poll(min(left, 0.5)):
                    msg = pipe.recv()
                    if msg[0] != kind:
                        raise RuntimeError(f"unexpected message {msg[0]!r} from receiver")
                    out.append(msg[1])
                    break
                if not p.is_alive():
                    raise RuntimeError(f"receiver {p.pid} died (exit code {p.exitcode})")
        return out

    def wait_connected(self, timeout):
        infos = self._recv_all("connected", timeout)
        fails = Counter()
        closed = Counter()
        hs = []
        for i in infos:
            fails.update(i["fail_reasons"])
            closed.update(i["closed_while_connecting"])
            hs.extend(i["hs_ms"])
        hs.sort()
        self.connect_info = {
            "ok": sum(i["ok"] for i in infos),
            "failed": sum(i["failed"] for i in infos),
            "fail_reasons": dict(fails),
            "closed_while_connecting": dict(closed),
            "t_begin": min(i["t_begin"] for i in infos),
            "t_end": max(i["t_end"] for i in infos),
            "hs_ms": hs,
        }
        return self.connect_info

    def received(self) -> int:
        return sum(self.progress)

    def status(self, timeout=10.0):
        for pipe in self.pipes:
            pipe.send(("status",))
        return self._recv_all("status", timeout)

    def reset(self, coalesce_ms, timeout=10.0):
        """New measurement on the same connections: clear the receivers' records and set
        their polling mode. Returns the number of connections still open."""
        for pipe in self.pipes:
            pipe.send(("reset", coalesce_ms / 1000.0))
        return sum(i["alive"] for i in self._recv_all("reset", timeout))

    def collect(self, timeout=60.0):
        for pipe in self.pipes:
            pipe.send(("collect",))
        return self._recv_all("results", timeout)

    def close(self, timeout=10.0):
        stop_processes(self.pipes, self.procs, timeout)
        for pipe in self.pipes:
            pipe.close()
