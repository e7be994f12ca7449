"""wsserver.intake, the pieces the worker's main thread drives, without a server: where a
request ends, the pending connections (per-address and total caps, deadlines) and lingering
closes, over socketpairs. Every wait is bounded."""

from __future__ import annotations

import selectors
import socket
import time

import pytest

from wsserver.intake import LingeringCloses, PendingConnections, request_end

WAIT = 10


def test_request_end_finds_the_head_and_a_small_body():
    assert request_end(b"GET / HTTP/1.1\r\nHost: x\r\n", 100) is None
    head = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    assert request_end(head, 100) == (len(head), len(head))
    assert request_end(head + b"GET /next", 100) == (len(head), len(head))
    post = b"POST /notify HTTP/1.1\r\nContent-Length: 50\r\n\r\n"
    assert request_end(post, 100) == (len(post), len(post) + 50)
    # resuming the search where the last read ended finds a terminator split across reads
    assert request_end(head, 100, start=len(head) - 2) == (len(head), len(head))


@pytest.mark.parametrize("head", [
    b"POST / HTTP/1.1\r\nContent-Length: 101\r\n\r\n",  # over the cap: the thread reads it
    b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
    b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n",  # waits for 100
    b"POST / HTTP/1.1\r\nContent-Length: 5\r\ncontent-length: 6\r\n\r\n",  # gunicorn's call
    b"POST / HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
])
def test_request_end_leaves_other_bodies_to_the_thread(head):
    assert request_end(head, 100) == (len(head), len(head))


def test_pending_evicts_the_oldest_of_an_address_then_the_oldest_overall():
    pending: PendingConnections[str] = PendingConnections(4, 2, timeout=10)
    assert pending.add("a1", "A", now=0) == []
    assert pending.add("a2", "A", now=1) == []
    assert pending.add("a3", "A", now=2) == [("a1", "per_address")]
    assert pending.count("A") == 2 and "a1" not in pending
    assert pending.add("b1", "B", now=3) == []
    assert pending.add("b2", "B", now=4) == []
    assert pending.add("c1", "C", now=5) == [("a2", "total")]
    assert len(pending) == 4 and pending.oldest() == "a3"
    assert pending.discard("b1") and not pending.discard("b1")
    assert pending.count("B") == 1


def test_pending_expires_at_the_deadline_in_arrival_order():
    pending: PendingConnections[str] = PendingConnections(10, 10, timeout=5)
    for i, key in enumerate("xyz"):
        pending.add(key, "A", now=i)
    assert pending.deadline("x") == 5
    assert pending.expired(4.9) == []
    assert pending.expired(6) == ["x", "y"]
    pending.add("x", "A", now=6)  # a kept-alive connection's next request: a new deadline
    assert pending.expired(7) == ["z"] and pending.oldest() == "x"


@pytest.fixture
def poller():
    sel = selectors.DefaultSelector()
    yield sel
    sel.close()


def _pump(sel: selectors.BaseSelector, until, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, "the poller never got there"
        for key, _ in sel.select(0.05):
            key.data(key.fileobj)


def test_lingering_close_half_closes_drains_and_closes_at_the_peer_fin(poller):
    ours, peer = socket.socketpair()
    lingering = LingeringCloses(poller)
    lingering.add(ours)
    assert peer.recv(10) == b"", "our FIN went out at once"
    peer.sendall(b"x" * 1000)  # the rest of a request nobody reads: drained
    _pump(poller, lambda: True)
    assert len(lingering) == 1 and ours.fileno() != -1
    peer.close()
    _pump(poller, lambda: len(lingering) == 0)
    assert ours.fileno() == -1


def test_lingering_close_cuts_at_the_deadline_the_byte_cap_and_the_count_cap(poller):
    pairs = [socket.socketpair() for _ in range(4)]
    try:
        lingering = LingeringCloses(poller, cap=2, timeout=5, max_drain=1000)
        lingering.add(pairs[0][0], now=0)
        lingering.add(pairs[1][0], now=1)
        assert lingering.reap(now=4) == 0 and lingering.reap(now=5) == 1
        assert pairs[0][0].fileno() == -1 and len(lingering) == 1
        lingering.add(pairs[2][0], now=2)
        lingering.add(pairs[3][0], now=3)  # over the cap: the oldest goes at once
        assert pairs[1][0].fileno() == -1 and len(lingering) == 2
        pairs[2][1].sendall(b"y" * 2000)  # a peer that streams: cut at max_drain
        _pump(poller, lambda: pairs[2][0].fileno() == -1)
        lingering.close_all()
        assert len(lingering) == 0 and pairs[3][0].fileno() == -1
    finally:
        for a, b in pairs:
            a.close()
            b.close()


def test_lingering_close_of_a_dead_socket_just_closes(poller):
    ours, peer = socket.socketpair()
    peer.close()
    ours.close()
    LingeringCloses(poller).add(ours)  # no error, nothing registered
    assert not poller.get_map()
