"""The Redis broker's two hot paths, written against redis-py's connection objects directly.

Every notification costs the Redis broker one script call on a request thread (``EVALSHA``)
and one pub/sub message read by its listener thread. Through redis-py's client API the call
goes Script -> ``evalsha`` -> ``execute_command`` -> a retry wrapper -> the connection pool
(a lock, a non-blocking read to check the connection is clean, observability hooks) ->
``pack_command``, and each pub/sub message through ``get_message`` -> ``parse_response`` ->
a readiness poll -> ``handle_message`` (a dict per message). Measured on this project's
publish path, that bookkeeping was more than half of the broker's CPU per notification
(docs/performance.md, "Publish path"). This module keeps the parts that matter — redis-py's
connections (TLS, sentinels, AUTH, its parser, ``hiredis`` when installed) and its error
classes — and drops the rest:

- :class:`PackedScript`: ``EVALSHA`` packed here in one ``bytes`` and sent on a connection of
  :class:`Connections`, a stack of connections kept out of the pool. ``NOSCRIPT`` (Redis
  restarted, ``SCRIPT FLUSH``, a failover to a server that never saw the script) falls back to
  redis-py's ``Script``, which loads the script and runs it; later calls are lean again.
- :func:`drain`: every pub/sub message already received, read without a readiness poll
  between them and without building redis-py's message dicts.
- :class:`Pipeline`: the same packed calls written on one non-blocking connection and their
  replies read in order as they come, for a thread that must never wait (the worker's main
  thread, whose poller drives it): many calls in flight, none waited for.

Errors are redis-py's own (``redis.TimeoutError``, ``redis.ConnectionError``,
``redis.ResponseError``): the broker maps them exactly as it did through the client API.
"""

from __future__ import annotations

import logging
import selectors
import socket
import threading
import time
from collections import deque
from typing import Any, Callable, Iterator, Sequence, Union

import redis

try:  # redis-py's C parser; the Pipeline parses with it, and is not offered without it
    import hiredis
except ImportError:  # pragma: no cover - an install_requires dependency
    hiredis = None  # type: ignore[assignment]

__all__ = ["Connections", "PackedScript", "Pipeline", "drain"]

log = logging.getLogger(__name__)

# a connection idle in the stack this long is checked (a non-blocking read) before it is
# used: the server may have closed it meanwhile (its `timeout` setting is whole seconds, at
# least 1). One used more recently is trusted as the pool would not: that check is a system
# call per command, the cost this module exists to remove.
_CHECK_IDLE_AFTER = 0.25

Arg = Union[str, bytes, int]


class Connections:
    """Connections made by a redis-py pool (so each is configured as the client's are, and
    with sentinels asks them for the master when it connects), kept in a stack of their own:
    taking one is a ``list.pop``, not the pool's lock and clean-connection check.

    Thread-safety: ``take``/``give`` from any thread (a list's ``pop`` and ``append`` are
    atomic); a connection taken belongs to its taker until given back. ``reset`` from any
    thread. A connection is given back only with no reply pending: after an error other
    than an error reply it is disconnected first (``take`` connects it again)."""

    def __init__(self, pool: Any) -> None:
        self._pool = pool
        # (connection, monotonic time given back, generation when given back)
        self._idle: list[tuple[Any, float, int]] = []
        self._generation = 0
        self._made: list[Any] = []  # every connection made, for close()
        self._lock = threading.Lock()  # only around making one and closing

    def take(self) -> Any:
        try:
            conn, since, generation = self._idle.pop()
        except IndexError:
            with self._lock:
                conn = self._pool.make_connection()
                self._made.append(conn)
            return self._connected(conn)
        if generation != self._generation:
            conn.disconnect()  # made before a reconnect: reconnect (to the current master)
        elif time.monotonic() - since > _CHECK_IDLE_AFTER:
            try:
                stale = conn.can_read()  # data nobody asked for, or the server's close
            except (redis.ConnectionError, redis.TimeoutError, OSError):
                stale = True  # closed by the server meanwhile
            if stale:
                conn.disconnect()
        return self._connected(conn)

    def _connected(self, conn: Any) -> Any:
        """``conn``, connected (a no-op when it is). Not left to ``send_packed_command``,
        which connects a disconnected connection itself but, in redis-py 8, around the
        connection class's ``connect()``: a sentinel-managed one would then skip asking the
        sentinels for the master and connect to its default address (seen in
        tests/e2e/test_sentinel.py). When it cannot connect it goes back to the stack."""
        try:
            conn.connect()
        except BaseException:
            self.give(conn)
            raise
        return conn

    def give(self, conn: Any) -> None:
        self._idle.append((conn, time.monotonic(), self._generation))

    def take_connected(self) -> Any | None:
        """A connection already connected to the current server, without waiting: None when
        none is idle (the next :meth:`take` on a thread that may wait makes one), or the one
        on top was made before a reconnect or went stale (it is disconnected and given
        back). Its idle check is a readiness poll with no timeout. Held for long by one
        thread's poller (:class:`Pipeline`), it is left out of :meth:`close`, which runs on
        another thread, until :meth:`give_taken`."""
        try:
            conn, since, generation = self._idle.pop()
        except IndexError:
            return None
        if generation != self._generation or getattr(conn, "_sock", None) is None:
            self._idle.append((conn, since, generation))
            return None
        if time.monotonic() - since > _CHECK_IDLE_AFTER:
            try:
                stale = conn.can_read(timeout=0)
            except (redis.ConnectionError, redis.TimeoutError, OSError):
                stale = True
            if stale:
                conn.disconnect()
                self.give(conn)
                return None
        with self._lock:  # the taker's now: close() from another thread leaves it alone
            self._made.remove(conn)
        return conn

    def give_taken(self, conn: Any) -> None:
        """Give back a connection :meth:`take_connected` handed out."""
        with self._lock:
            self._made.append(conn)
        self.give(conn)

    @property
    def generation(self) -> int:
        """Bumped by :meth:`reset`: a connection taken before it may talk to an old server."""
        return self._generation

    def reset(self) -> None:
        """The server may have changed (the listener reconnected): every connection idle now
        reconnects before its next command."""
        self._generation += 1

    def close(self) -> None:
        with self._lock:
            made, self._made = self._made, []
        self._idle.clear()
        for conn in made:
            try:
                conn.disconnect()
            except (redis.RedisError, OSError):
                pass


class PackedScript:
    """One Lua script called as ``EVALSHA`` packed by hand on :class:`Connections`: the same
    command, reply and errors as calling ``script(keys=..., args=...)`` (redis-py's
    ``Script``, which stays the fallback on ``NOSCRIPT``). Thread-safe (see
    :class:`Connections`)."""

    def __init__(self, script: Any, connections: Connections, encoding: str = "utf-8",
                 errors: str = "strict") -> None:
        self._script = script
        self._connections = connections
        self._encoding = encoding
        self._errors = errors
        sha = script.sha.encode() if isinstance(script.sha, str) else script.sha
        self._head = b"$7\r\nEVALSHA\r\n$%d\r\n%s\r\n" % (len(sha), sha)

    def pack(self, keys: Sequence[Arg], args: Sequence[Arg]) -> bytes:
        """The RESP of ``EVALSHA <sha> <number of keys> <keys...> <args...>``, each value
        encoded as redis-py's encoder would (str in the client's encoding, int in decimal)."""
        nkeys = b"%d" % len(keys)
        parts = [b"*%d\r\n" % (len(keys) + len(args) + 3), self._head,
                 b"$%d\r\n%s\r\n" % (len(nkeys), nkeys)]
        for value in _values(keys, args, self._encoding, self._errors):
            parts.append(b"$%d\r\n%s\r\n" % (len(value), value))
        return b"".join(parts)

    def __call__(self, keys: Sequence[Arg], args: Sequence[Arg]) -> Any:
        command = self.pack(keys, args)
        connections = self._connections
        conn = connections.take()
        try:
            conn.send_packed_command([command], check_health=False)
            reply = conn.read_response()
        except redis.exceptions.NoScriptError:
            connections.give(conn)  # the error reply was read whole: the connection is clean
            return self._script(keys=list(keys), args=list(args))
        except redis.ResponseError:
            connections.give(conn)
            raise
        except BaseException:
            # a timeout or a dropped connection (redis-py disconnected it already, or the
            # reply is unread): nothing may be left to the next command on it
            conn.disconnect()
            connections.give(conn)
            raise
        connections.give(conn)
        return reply


def _values(keys: Sequence[Arg], args: Sequence[Arg], encoding: str,
            errors: str) -> Iterator[bytes]:
    for seq in (keys, args):
        for value in seq:
            if isinstance(value, bytes):
                yield value
            elif isinstance(value, str):
                yield value.encode(encoding, errors)
            elif isinstance(value, int) and not isinstance(value, bool):
                yield b"%d" % value
            else:  # redis-py would refuse a bool and encode a float with repr: not needed here
                raise redis.DataError(f"invalid script argument of type {type(value).__name__}")


def drain(pubsub: Any, on_data: Callable[[bytes], None],
          on_other: Callable[[Any], object], timeout: float = 0.0, limit: int = 1000) -> int:
    """Wait up to ``timeout`` seconds for a reply on ``pubsub``'s connection, then hand
    every pub/sub message already received (in the parser's buffer or the socket's) to
    ``on_data`` (its payload), in order, without waiting for more; anything else (a
    subscribe confirmation, a pong) goes through redis-py's ``handle_message`` (which keeps
    ``pubsub``'s state) to ``on_other``. At most ``limit`` replies, so a stop or a sentinel
    check is never held off for long. Returns how many were read. Errors are redis-py's (the
    caller reconnects); a reply cut in the middle is read to its end within the
    connection's socket timeout. This replaces ``get_message``, which per message went
    through a retry wrapper, a readiness poll and a dict."""
    conn = pubsub.connection
    if conn is None:
        return 0
    read = 0
    while read < limit and conn.can_read(timeout=timeout if not read else 0):
        reply = conn.read_response(disconnect_on_error=False, push_request=True)
        read += 1
        if isinstance(reply, list) and len(reply) == 3 and reply[0] in (b"message", "message"):
            on_data(reply[2])
        else:
            on_other(pubsub.handle_message(reply))
    return read


Watch = Callable[[socket.socket, int], None]
OnReply = Callable[[Any], None]


class Pipeline:
    """Packed commands written on one non-blocking connection and their replies handed
    back in order, by a thread that never waits for Redis: the worker's main thread, whose
    poller tells :meth:`on_ready` when the socket is readable (or writable, while a write is
    unfinished). Each :meth:`send` is answered exactly once, on that thread, through its
    ``on_reply``: with the reply (an error reply as a ``redis.ResponseError`` instance), or
    with a ``redis.TimeoutError``/``redis.ConnectionError`` instance when the reply did not
    come within ``timeout`` (:meth:`expire`), the connection failed, or :meth:`close`.

    Why: a publish through :class:`PackedScript` needs a pool thread that waits for the
    round trip, and the hand-off to that thread and back was most of what a Redis publish
    cost more than a memory one (docs/performance.md, "Publish path"). Here nothing waits,
    and replies that arrive together are read in one system call.

    The connection is one of :class:`Connections`' already connected (never made here:
    connecting waits), plain TCP or Unix socket only (TLS reads cannot be driven this way);
    it goes back to the stack, disconnected (``take`` reconnects it), when it fails, on
    :meth:`close` and, once nothing is in flight, after :meth:`Connections.reset`. After a
    timeout or a failure it is dropped with everything in flight: a late reply can never be
    matched to a later command. ``watch(sock, events)`` (the owner's poller: ``selectors``
    event bits, 0 to unregister) is called whenever what the socket should be watched for
    changes; until the owner sets it, :meth:`can_send` answers False.

    Thread-safety: none; every method on the owner's thread."""

    def __init__(self, connections: Connections, timeout: float, limit: int = 1000) -> None:
        self._connections = connections
        self._timeout = timeout
        self._limit = limit
        self.watch: Watch | None = None
        self._conn: Any = None
        self._sock: socket.socket | None = None
        self._generation = -1
        self._reader: Any = None
        self._out = bytearray()
        self._waiting: deque[tuple[float, OnReply]] = deque()
        self._events = 0  # what the watcher watches for now

    @staticmethod
    def supported(pool: Any) -> bool:
        """Whether connections of ``pool`` can be driven this way: ``hiredis`` importable,
        no TLS, RESP2 (the replies :meth:`on_ready` expects)."""
        kwargs = pool.connection_kwargs
        return (
            hiredis is not None
            and not issubclass(pool.connection_class, redis.SSLConnection)
            and kwargs.get("protocol") in (None, 2, "2")
        )

    @property
    def in_flight(self) -> int:
        return len(self._waiting)

    def can_send(self) -> bool:
        """Whether :meth:`send` may be called now: a connection is held (or one connected is
        idle in the stack) and fewer than ``limit`` commands are in flight. No I/O but the
        stack's idle check."""
        if self._conn is not None and self._generation != self._connections.generation:
            if self._waiting:
                return False  # the old server's replies first
            self._release()
        if self.watch is None:
            return False  # nobody would tell on_ready
        if self._conn is None:
            conn = self._connections.take_connected()
            if conn is None:
                return False
            sock = conn._sock
            if type(sock) is not socket.socket:  # TLS (or a wrapper): not driven here
                self._connections.give_taken(conn)
                return False
            sock.setblocking(False)
            self._conn, self._sock = conn, sock
            self._generation = self._connections.generation
            self._reader = hiredis.Reader(replyError=redis.ResponseError)
            self._set_events(selectors.EVENT_READ)
        return len(self._waiting) < self._limit

    def send(self, command: bytes, on_reply: OnReply) -> None:
        """Queue ``command`` for the next :meth:`flush` and call ``on_reply`` with its reply
        later. Only after :meth:`can_send` answered True on this turn."""
        assert self._sock is not None, "send() without can_send()"
        self._waiting.append((time.monotonic() + self._timeout, on_reply))
        self._out += command

    def flush(self) -> None:
        """Write what :meth:`send` queued, as much as the socket takes now (the rest when the
        poller says writable). The owner calls it once per turn of its loop, after the
        turn's callbacks: the publishes of one turn go out in one system call, and their
        replies tend to come back in one."""
        if self._out and not self._events & selectors.EVENT_WRITE:
            self._write()

    def on_ready(self) -> None:
        """The poller's callback: write what is left, read what came, answer in order."""
        if self._sock is None:
            return
        if self._out:
            self._write()
        self._read()

    def expire(self, now: float) -> None:
        """The oldest command waited past ``timeout``: every one in flight is answered with
        ``redis.TimeoutError`` and the connection dropped (a reply may still come, to
        nobody). Called by the owner now and then (the worker: after every poll)."""
        if self._waiting and self._waiting[0][0] <= now:
            self._fail(redis.TimeoutError("Timeout reading from socket"))

    def close(self) -> None:
        """Answer everything in flight with ``redis.ConnectionError`` and give the connection
        back."""
        self._fail(redis.ConnectionError("the pipeline closed"))

    def _write(self) -> None:
        sock = self._sock
        assert sock is not None
        try:
            sent = sock.send(self._out)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._fail(redis.ConnectionError(f"Error writing to socket: {exc}"))
            return
        del self._out[:sent]
        self._set_events(selectors.EVENT_READ | (selectors.EVENT_WRITE if self._out else 0))

    def _read(self) -> None:
        sock, reader = self._sock, self._reader
        assert sock is not None
        while sock is self._sock:
            try:
                data = sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._fail(redis.ConnectionError(f"Error reading from socket: {exc}"))
                return
            if not data:
                self._fail(redis.ConnectionError("Connection closed by server."))
                return
            reader.feed(data)
            try:
                self._answer(reader)
            except hiredis.ProtocolError as exc:
                self._fail(redis.ConnectionError(f"Protocol error: {exc}"))
                return

    def _answer(self, reader: Any) -> None:
        while True:
            reply = reader.gets()
            if reply is False:
                return
            if not self._waiting:
                raise hiredis.ProtocolError("a reply nobody asked for")
            _call(self._waiting.popleft()[1], reply)

    def _fail(self, error: Exception) -> None:
        waiting, self._waiting = self._waiting, deque()
        self._release()
        for _deadline, on_reply in waiting:
            _call(on_reply, error)

    def _release(self) -> None:
        """Give the connection back, disconnected: a reply may still be on its way to it
        (``take`` connects it again, on a thread that may wait)."""
        conn = self._conn
        if conn is None:
            return
        self._set_events(0)
        self._conn = self._sock = self._reader = None
        self._out.clear()
        conn.disconnect()
        self._connections.give_taken(conn)

    def _set_events(self, events: int) -> None:
        if events != self._events and self._sock is not None and self.watch is not None:
            self.watch(self._sock, events)
        self._events = events if self._sock is not None else 0


def _call(on_reply: OnReply, reply: Any) -> None:
    try:
        on_reply(reply)
    except Exception:  # noqa: BLE001 - one caller's bug must not take the others' replies
        log.exception("error handling a Redis reply")
