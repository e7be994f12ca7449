"""In-process wiring for the service's parts: a real started ``NotificationService`` (hub,
memory broker, broadcaster and flusher threads) with real ``Connection`` objects on
``socket.socketpair()``, the test holding the client's end; and a check that a test leaves
no thread running.

No session thread runs here: the test calls the part under test (``ClientCommands``,
``Recovery``, ``Hub``...) directly on its own thread, and reads what the server wrote from
the peer socket. ``tests/test_session.py`` runs whole sessions.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from typing import Any

from rawws import FrameParser

from wsserver.auth import Identity
from wsserver.config import load_settings
from wsserver.connection import Connection
from wsserver.service import NotificationService

__all__ = ["Peer", "Served", "assert_no_new_threads"]


def assert_no_new_threads(before: set[threading.Thread], timeout: float = 5.0) -> None:
    """Every thread started since ``before`` was taken has ended (waiting up to ``timeout``
    for those already told to stop)."""
    deadline = time.monotonic() + timeout
    while True:
        left = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        if not left or time.monotonic() >= deadline:
            break
        left[0].join(max(deadline - time.monotonic(), 0.01))
    assert not left, f"threads left running: {[t.name for t in left]}"


class Peer:
    """The client's end of a socketpair: reads the server's frames."""

    def __init__(self, sock: socket.socket, deflate: bool = False) -> None:
        """``deflate``: the client negotiated permessage-deflate (compressed frames are
        inflated; :attr:`compressed` counts them)."""
        self.sock = sock
        self._parser = FrameParser(deflate)
        self._frames: list[tuple[int, bytes]] = []

    def frames(self, count: int, timeout: float = 5.0) -> list[tuple[int, bytes]]:
        """The next ``count`` frames; fewer only if the server closes the socket first."""
        deadline = time.monotonic() + timeout
        while len(self._frames) < count:
            left = deadline - time.monotonic()
            assert left > 0, f"timed out with {len(self._frames)} of {count} frames"
            self.sock.settimeout(left)
            data = self.sock.recv(1 << 20)
            if not data:
                break
            self._frames += self._parser.feed(data)
        out, self._frames = self._frames[:count], self._frames[count:]
        return out

    @property
    def compressed(self) -> int:
        return self._parser.compressed

    def messages(self, count: int, timeout: float = 5.0) -> list[Any]:
        """The next ``count`` frames as JSON documents."""
        return [json.loads(payload) for _, payload in self.frames(count, timeout)]

    def nothing_pending(self, wait: float = 0.2) -> bool:
        """Whether no further frame arrives within ``wait`` seconds."""
        if self._frames:
            return False
        self.sock.settimeout(wait)
        try:
            data = self.sock.recv(1 << 20)
        except socket.timeout:
            return True
        self._frames += self._parser.feed(data)
        return not self._frames


class Served:
    """A started service (memory broker) and connections registered in its hub."""

    def __init__(self, **overrides: Any) -> None:
        base = {"env": "development", "shutdown_timeout": 1.0, "close_timeout": 1.0}
        self.service = NotificationService(load_settings({}, {**base, **overrides}))
        self.service.ensure_started()
        self.sockets: list[socket.socket] = []
        self.conns: list[Connection] = []

    def connect(
        self, remote: str = "192.0.2.1", identity: Identity | None = None
    ) -> tuple[Connection, Peer]:
        ours, theirs = socket.socketpair()
        self.sockets += [ours, theirs]
        conn = self.service.new_connection(ours, remote, identity)
        assert self.service.hub.add(conn) is None
        self.conns.append(conn)
        return conn, Peer(theirs)

    def close(self) -> None:
        """Take the connections out (no session thread would), stop the service."""
        for conn in self.conns:
            self.service.hub.remove(conn)
            conn.detach()
        self.service.shutdown()
        for sock in self.sockets:
            sock.close()
