"""What the worker's main thread keeps about sockets that are not (or no longer) requests:
where a request ends in the bytes read so far, the connections still sending theirs, and the
connections being closed politely. No gunicorn here: :mod:`wsserver.worker` drives these.

Why apart from the worker: each piece is a small rule with a limit a hostile client tries to
get past (a head that never ends, a thousand connections from one address, a peer that never
closes), and each can be tested over socketpairs in microseconds, without a server.

Thread-safety: none. The worker's main thread owns every instance (its poller calls back on
that thread); nothing here may block on a peer.
"""

from __future__ import annotations

import re
import selectors
import socket
import time
from typing import Generic, Hashable, TypeVar

__all__ = ["LingeringCloses", "PendingConnections", "request_end"]

K = TypeVar("K", bound=Hashable)

_HEAD_END = b"\r\n\r\n"
_CONTENT_LENGTH = re.compile(rb"^content-length[ \t]*:[ \t]*([0-9]{1,15})[ \t]*\r?$", re.I | re.M)
# a body we cannot size from the head (chunked), or one the client sends only once told to
_NO_PREREAD = re.compile(rb"^(?:transfer-encoding|expect)[ \t]*:", re.I | re.M)


def request_end(buf: bytes | bytearray, max_body: int, start: int = 0) -> tuple[int, int] | None:
    """Where the request in ``buf`` ends, as ``(end of head, end of what to read first)``, or
    None while the head (request line and headers, up to the empty line) is incomplete.

    The second index adds the body when the head gives one ``Content-Length`` of at most
    ``max_body`` and no ``Transfer-Encoding``/``Expect``: such a body is read in the poller
    too, so a body that trickles in holds no thread. Anything else is left to the request's
    thread (under the worker's request deadline). This only decides how much to read before
    handing over: every byte read goes to gunicorn's parser, which alone interprets them, so
    a head we size differently from gunicorn costs a blocking read, never a wrong request.

    ``start``: how many bytes were already searched (the search resumes 3 bytes before)."""
    head_end = buf.find(_HEAD_END, max(start - 3, 0))
    if head_end < 0:
        return None
    head_end += len(_HEAD_END)
    head = bytes(buf[:head_end])
    if _NO_PREREAD.search(head):
        return head_end, head_end
    lengths = _CONTENT_LENGTH.findall(head)
    if len(lengths) != 1 or int(lengths[0]) > max_body:
        return head_end, head_end
    return head_end, head_end + int(lengths[0])


class PendingConnections(Generic[K]):
    """Connections accepted whose request has not arrived complete, oldest first, with a
    deadline each and an index by client address.

    Two caps, each evicting the OLDEST pending connection rather than refusing the newest:
    a well-behaved client completes its request head within milliseconds, so it is almost
    never the oldest, and it gets in even when the same address (a NAT, or an attacker
    sharing it) holds hundreds of connections that send their heads a byte at a time.

    Every connection gets the same ``timeout``, so arrival order is deadline order and the
    expired ones are always at the front (O(1) per expiry, no heap).
    """

    def __init__(self, max_total: int, max_per_address: int, timeout: float) -> None:
        if max_total < 1 or max_per_address < 1:
            raise ValueError("the caps must be at least 1")
        self.max_total = max_total
        self.max_per_address = max_per_address
        self.timeout = timeout
        self._deadlines: dict[K, float] = {}  # insertion order = deadline order
        self._address: dict[K, str] = {}
        self._by_address: dict[str, dict[K, None]] = {}

    def __len__(self) -> int:
        return len(self._deadlines)

    def __contains__(self, key: object) -> bool:
        return key in self._deadlines

    def count(self, address: str) -> int:
        return len(self._by_address.get(address, ()))

    def deadline(self, key: K) -> float:
        return self._deadlines[key]

    def add(self, key: K, address: str, now: float | None = None) -> list[tuple[K, str]]:
        """Track ``key`` until ``now + timeout``. Returns what the caps evicted, oldest
        first, each with the cap that evicted it (``"per_address"`` or ``"total"``); the
        evicted are no longer tracked, the caller cuts them."""
        now = time.monotonic() if now is None else now
        self.discard(key)
        self._deadlines[key] = now + self.timeout
        self._address[key] = address
        self._by_address.setdefault(address, {})[key] = None
        evicted: list[tuple[K, str]] = []
        same = self._by_address[address]
        while len(same) > self.max_per_address:
            oldest = next(iter(same))
            self.discard(oldest)
            evicted.append((oldest, "per_address"))
        while len(self._deadlines) > self.max_total:
            oldest = next(iter(self._deadlines))
            self.discard(oldest)
            evicted.append((oldest, "total"))
        return evicted

    def discard(self, key: K) -> bool:
        """Stop tracking ``key`` (its request arrived, or it is gone); False if untracked."""
        if self._deadlines.pop(key, None) is None:
            return False
        address = self._address.pop(key)
        same = self._by_address[address]
        del same[key]
        if not same:
            del self._by_address[address]
        return True

    def oldest(self) -> K | None:
        return next(iter(self._deadlines), None)

    def expired(self, now: float) -> list[K]:
        """Untrack and return every connection whose deadline is at or before ``now``."""
        out: list[K] = []
        for key, deadline in self._deadlines.items():
            if deadline > now:
                break
            out.append(key)
        for key in out:
            self.discard(key)
        return out


class LingeringCloses:
    """Close sockets the way RFC 9112 section 9.6 asks, without waiting on the caller's
    thread: half-close (our FIN follows the answer), read and discard what the peer still
    sends, close at its FIN, after ``max_drain`` bytes, or at ``timeout``.

    Why: closing with unread input makes the kernel send a reset, which can destroy the
    answer still in flight; gunicorn therefore drains before closing, but blocking on its one
    main thread for up to 2 s per socket, so a client that sends ``Connection: close`` and
    then neither reads nor closes froze every accept. Here the socket waits in the poller.

    At most ``cap`` sockets linger; past it the oldest is closed at once (a reset at worst:
    the peer that has not closed after seconds is not reading its answer anyway).
    """

    def __init__(
        self,
        poller: selectors.BaseSelector,
        cap: int = 128,
        timeout: float = 2.0,
        max_drain: int = 64 * 1024,
    ) -> None:
        self._poller = poller
        self.cap = cap
        self.timeout = timeout
        self.max_drain = max_drain
        self._socks: dict[socket.socket, list[float]] = {}  # sock -> [deadline, drained]

    def __len__(self) -> int:
        return len(self._socks)

    def add(self, sock: socket.socket, now: float | None = None) -> None:
        """Half-close ``sock`` and let it linger; it must not be registered in the poller."""
        try:
            sock.setblocking(False)
            # the plain socket's shutdown, also for TLS: no close_notify, as gunicorn does
            socket.socket.shutdown(sock, socket.SHUT_WR)
        except (OSError, ValueError):
            _close(sock)
            return
        while len(self._socks) >= self.cap:
            self._close(next(iter(self._socks)))
        now = time.monotonic() if now is None else now
        try:
            self._poller.register(sock, selectors.EVENT_READ, self._readable)
        except (OSError, ValueError, KeyError):
            _close(sock)
            return
        self._socks[sock] = [now + self.timeout, 0]

    def _readable(self, sock: socket.socket) -> None:
        state = self._socks.get(sock)
        if state is None:
            return
        while True:
            try:
                # the raw socket's recv: TLS records are discarded undecrypted
                data = socket.socket.recv(sock, 65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            state[1] += len(data)
            if not data or state[1] >= self.max_drain:
                self._close(sock)
                return

    def reap(self, now: float | None = None) -> int:
        """Close every socket past its deadline; returns how many."""
        now = time.monotonic() if now is None else now
        due = []
        for sock, (deadline, _) in self._socks.items():
            if deadline > now:
                break
            due.append(sock)
        for sock in due:
            self._close(sock)
        return len(due)

    def close_all(self) -> None:
        for sock in list(self._socks):
            self._close(sock)

    def _close(self, sock: socket.socket) -> None:
        self._socks.pop(sock, None)
        try:
            self._poller.unregister(sock)
        except (KeyError, ValueError, OSError, RuntimeError):
            pass
        _close(sock)


def _close(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass
