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

Errors are redis-py's own (``redis.TimeoutError``, ``redis.ConnectionError``,
``redis.ResponseError``): the broker maps them exactly as it did through the client API.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Iterator, Sequence, Union

import redis

__all__ = ["Connections", "PackedScript", "drain"]

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
