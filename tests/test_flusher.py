"""wsserver.flusher: one epoll thread finishes the writes the kernel could not take at once,
over real sockets; it calls each target once per watch, survives a failing target, and stops
(idempotently) without leaving its thread behind."""

from __future__ import annotations

import select
import socket
import ssl
import threading
import time

import pytest
from tlscerts import ssl_socketpair

from wsserver.flusher import Flusher

pytestmark = pytest.mark.timeout(30)


class Target:
    def __init__(self, fail: bool = False) -> None:
        self.calls = 0
        self.called = threading.Event()
        self.fail = fail

    def on_writable(self) -> None:
        self.calls += 1
        self.called.set()
        if self.fail:
            raise RuntimeError("this socket's flush failed")


@pytest.fixture
def full_pair():
    """A socketpair whose first end cannot take another byte until the second reads."""
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    a.setblocking(False)
    try:
        while True:
            a.send(b"x" * 4096)
    except BlockingIOError:
        pass
    yield a, b
    a.close()
    b.close()


def test_a_watched_socket_is_reported_once_when_it_drains(flusher, full_pair):
    a, b = full_pair
    target = Target()
    flusher.watch(a.fileno(), target)
    assert not target.called.wait(0.2), "still full: not writable yet"
    b.setblocking(False)
    try:
        while True:
            b.recv(65536)
    except BlockingIOError:
        pass
    assert target.called.wait(5)
    assert not _called_again(target), "one shot: reported once per watch"
    target.called.clear()
    flusher.watch(a.fileno(), target)  # re-armed
    assert target.called.wait(5) and target.calls == 2


def test_a_forgotten_socket_is_not_reported(flusher, full_pair):
    a, b = full_pair
    target = Target()
    flusher.watch(a.fileno(), target)
    flusher.forget(a.fileno())
    flusher.forget(a.fileno())  # idempotent
    b.recv(65536)
    assert not target.called.wait(0.3)


def test_one_failing_target_does_not_stop_the_others(flusher):
    pairs = [socket.socketpair() for _ in range(2)]
    try:
        failing, healthy = Target(fail=True), Target()
        flusher.watch(pairs[0][0].fileno(), failing)
        assert failing.called.wait(5)
        flusher.watch(pairs[1][0].fileno(), healthy)
        assert healthy.called.wait(5), "the flusher thread survived the failure"
    finally:
        for x, y in pairs:
            x.close()
            y.close()


def _called_again(target: Target) -> bool:
    target.called.clear()
    return target.called.wait(0.2)


def test_stop_is_idempotent_and_ends_the_thread():
    f = Flusher(poll_timeout=0.05)
    f.start()
    assert "wsserver-flusher" in {t.name for t in threading.enumerate()}
    f.stop()
    f.stop()  # idempotent
    assert "wsserver-flusher" not in {t.name for t in threading.enumerate()}


def test_a_full_tls_socket_is_reported_when_its_reader_catches_up(flusher):
    """Over TLS (a real handshake): the socket is full once SSL_write would block, and the
    flusher reports it when the peer has read what reached the kernel; the retry of the same
    bytes then goes through."""
    a, b = ssl_socketpair(sndbuf=4096, rcvbuf=4096)
    try:
        a.setblocking(False)
        chunk = b"x" * 16384
        with pytest.raises(ssl.SSLWantWriteError):
            for _ in range(1000):
                a.send(chunk)
        target = Target()
        flusher.watch(a.fileno(), target)
        assert not target.called.wait(0.2), "still full: not writable yet"
        b.setblocking(False)
        _read_until(b, target.called.is_set)
        assert target.called.is_set(), "reported once the kernel took the backlog"
        sent: list[int] = []

        def retry() -> bool:  # the same bytes again: taken, or would block again, never refused
            try:
                sent.append(a.send(chunk))
            except ssl.SSLWantWriteError:
                return False
            return True

        _read_until(b, retry)
        assert sent == [len(chunk)]
    finally:
        a.close()
        b.close()


def _read_until(sock: ssl.SSLSocket, done, timeout: float = 5.0) -> None:
    """Read what ``sock`` has (non-blocking) until ``done()``; at most ``timeout``."""
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        select.select([sock], [], [], 0.05)
        try:
            sock.recv(65536)
        except ssl.SSLWantReadError:
            pass
