"""wsserver.admission: the room and connection rules, written once for the upgrade, the
registration and the commands (a real ``Hub``, an ``AccessPolicy`` built from real settings,
real connections on socketpairs; no thread of its own besides the flusher the connections need).

``tests/test_commands.py`` checks that a command and the upgrade give the same answer; here
each rule is checked on its own: its order, its status, its text and the setting it names.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import pytest
from inprocess import assert_no_new_threads

from wsserver.admission import Admission, RegistrationRefused
from wsserver.auth import AccessPolicy, Identity
from wsserver.codes import (
    REASON_SERVER_FULL,
    REASON_SERVER_RESTARTING,
    REASON_TOO_MANY_CONNECTIONS,
    ErrorCode,
)
from wsserver.config import load_settings
from wsserver.connection import Connection
from wsserver.exceptions import AccessDenied
from wsserver.flusher import Flusher
from wsserver.hub import Hub, HubRefusal

pytestmark = pytest.mark.timeout(10)

GRANTED = ("private-team", "private-ops-*")


def _identity(rooms: tuple[str, ...] = GRANTED, ttl: float = 60.0) -> Identity:
    return Identity("alice", time.time() + ttl, rooms)


class Rig:
    """An ``Admission`` over its real collaborators, as ``NotificationService`` builds it."""

    def __init__(
        self, flusher: Flusher, sockets: list[socket.socket], capacity: int, **overrides: Any
    ) -> None:
        self.settings = load_settings({}, {"env": "development", **overrides})
        self.hub = Hub(
            capacity,
            self.settings.max_rooms_per_connection,
            self.settings.max_connections_per_ip,
        )
        self.admission = Admission(self.settings, AccessPolicy(self.settings), self.hub)
        self._flusher = flusher
        self._sockets = sockets

    def conn(self, remote: str = "192.0.2.1", identity: Identity | None = None) -> Connection:
        ours, theirs = socket.socketpair()
        self._sockets += [ours, theirs]
        conn = Connection(self.hub.next_id(), ours, remote, 1 << 16, self._flusher)
        conn.identity = identity
        return conn


@pytest.fixture
def rig():
    before = set(threading.enumerate())
    flusher = Flusher(poll_timeout=0.05)
    flusher.start()
    sockets: list[socket.socket] = []

    def make(capacity: int = 10, **overrides: Any) -> Rig:
        return Rig(flusher, sockets, capacity, **overrides)

    yield make
    flusher.stop()
    for sock in sockets:
        sock.close()
    assert_no_new_threads(before)


# -- rooms -----------------------------------------------------------------------------------


def test_public_rooms_are_open_to_anyone_private_ones_to_the_tokens_grant(rig):
    admission = rig().admission
    admission.check_rooms(None, ("news", "sports"))  # public: no token needed
    admission.check_rooms(_identity(), ("private-team", "private-ops-eu", "news"))
    for identity, room in [
        (None, "private-team"),
        (_identity(), "private-other"),
        (_identity(), "private-ops"),  # "private-ops-*" is a prefix with its dash
        (_identity(ttl=-1), "private-team"),  # granted, but the token has expired
    ]:
        with pytest.raises(AccessDenied) as refused:
            admission.check_join(identity, room)
        denied = refused.value
        assert (denied.status, denied.code) == (403, ErrorCode.ROOM_FORBIDDEN)
        assert denied.reason == f"joining {room!r} needs a token that grants it"
        assert denied.detail == "WSSERVER_PRIVATE_ROOM_PREFIX=private-"


def test_the_private_prefix_is_the_settings(rig):
    admission = rig(private_room_prefix="staff:").admission
    admission.check_join(None, "private-team")  # no longer private
    with pytest.raises(AccessDenied) as refused:
        admission.check_join(None, "staff:payroll")
    assert refused.value.detail == "WSSERVER_PRIVATE_ROOM_PREFIX=staff:"


def test_the_room_count_is_checked_before_any_room(rig):
    """Too many rooms is a 400 even when one of them would also be forbidden: the cheap,
    identity-free rule answers first, the same order a command's checks run in."""
    admission = rig(max_rooms_per_connection=2).admission
    admission.check_rooms(None, ("a", "b"))  # at the limit: fine
    with pytest.raises(AccessDenied) as refused:
        admission.check_rooms(None, ("private-x", "b", "c"))
    denied = refused.value
    assert (denied.status, denied.code) == (400, ErrorCode.TOO_MANY_ROOMS)
    assert denied.reason == "a connection may be in at most 2 rooms"
    assert denied.detail == "WSSERVER_MAX_ROOMS_PER_CONNECTION=2"
    with pytest.raises(AccessDenied) as forbidden:
        admission.check_rooms(None, ("a", "private-x"))
    assert forbidden.value.status == 403


def test_join_puts_the_connection_in_the_room_only_when_allowed(rig):
    r = rig()
    anonymous, member = r.conn(), r.conn(identity=_identity())
    for conn in (anonymous, member):
        assert r.hub.add(conn) is None
    r.admission.join(anonymous, "news")
    r.admission.join(anonymous, "news")  # idempotent
    r.admission.join(member, "private-team")
    with pytest.raises(AccessDenied):
        r.admission.join(anonymous, "private-team")
    assert r.hub.members("news") == [anonymous]
    assert r.hub.members("private-team") == [member]
    assert anonymous.rooms == {"news"} and member.rooms == {"private-team"}


def test_the_hubs_room_limit_reads_as_the_upgrades_refusal(rig):
    """``enter`` turns the hub's ``RoomLimitReached`` into the same ``AccessDenied`` as
    ``too_many_rooms`` (the text of the upgrade's 400), with no chained hub exception."""
    r = rig(max_rooms_per_connection=2)
    conn = r.conn()
    r.hub.add(conn)
    r.admission.join(conn, "a")
    r.admission.enter(conn, "b")
    with pytest.raises(AccessDenied) as refused:
        r.admission.join(conn, "c")
    expected = r.admission.too_many_rooms()
    denied = refused.value
    assert (denied.status, denied.code, denied.reason, denied.detail) == (
        expected.status, expected.code, expected.reason, expected.detail,
    )
    assert denied.__cause__ is None and denied.__suppress_context__
    assert conn.rooms == {"a", "b"}


def test_enter_leaves_the_permission_to_the_earlier_check(rig):
    """A resume checks the room when it is asked and joins later on the broadcaster thread,
    by which time the token may have expired: ``enter`` applies only the room limit."""
    r = rig()
    conn = r.conn(identity=_identity(ttl=-1))
    r.hub.add(conn)
    r.admission.enter(conn, "private-team")
    assert r.hub.members("private-team") == [conn]


# -- connections ------------------------------------------------------------------------------


def test_an_address_over_its_share_is_a_429_naming_the_setting(rig):
    r = rig(max_connections_per_ip=2)
    r.admission.check_connection("192.0.2.1")
    for _ in range(2):
        assert r.hub.add(r.conn("192.0.2.1")) is None
    with pytest.raises(AccessDenied) as refused:
        r.admission.check_connection("192.0.2.1")
    denied = refused.value
    assert (denied.status, denied.code) == (429, ErrorCode.TOO_MANY_CONNECTIONS)
    assert denied.detail == "WSSERVER_MAX_CONNECTIONS_PER_IP=2"
    assert ("Retry-After", "5") in denied.implied_headers()
    r.admission.check_connection("192.0.2.2")


def test_a_full_worker_is_a_503_naming_its_capacity(rig):
    r = rig(capacity=2)
    for remote in ("192.0.2.1", "192.0.2.2"):
        r.admission.check_connection(remote)
        r.hub.add(r.conn(remote))
    with pytest.raises(AccessDenied) as refused:
        r.admission.check_connection("192.0.2.3")
    denied = refused.value
    assert (denied.status, denied.code) == (503, ErrorCode.SERVER_FULL)
    assert denied.detail.startswith("2 per worker (WSSERVER_MAX_CONNECTIONS")
    assert ("Retry-After", "5") in denied.implied_headers()


def test_shutting_down_is_a_503_that_says_so(rig):
    r = rig()
    r.hub.stop_accepting()
    with pytest.raises(AccessDenied) as refused:
        r.admission.check_connection("192.0.2.1")
    denied = refused.value
    assert (denied.status, denied.code, denied.detail) == (
        503, ErrorCode.SERVER_FULL, "shutting down",
    )


def test_the_address_refusal_comes_before_the_shutdown(rig):
    """The hub's order (address, closing, full) is the answer's: a client over its share
    hears 429 (its own doing), not 503, even while the worker shuts down."""
    r = rig(max_connections_per_ip=1)
    r.hub.add(r.conn("192.0.2.1"))
    r.hub.stop_accepting()
    with pytest.raises(AccessDenied) as refused:
        r.admission.check_connection("192.0.2.1")
    assert refused.value.status == 429


@pytest.mark.parametrize(
    "refusal, expected",
    [
        (HubRefusal.CLOSING, (REASON_SERVER_RESTARTING, ErrorCode.SHUTTING_DOWN, "")),
        (HubRefusal.FULL, (REASON_SERVER_FULL, ErrorCode.SERVER_FULL,
                           "WSSERVER_MAX_CONNECTIONS")),
        (HubRefusal.ADDRESS, (REASON_TOO_MANY_CONNECTIONS, ErrorCode.TOO_MANY_CONNECTIONS,
                              "WSSERVER_MAX_CONNECTIONS_PER_IP")),
    ],
)
def test_a_lost_registration_race_closes_with_the_shared_reason(refusal, expected):
    refused = Admission.registration_refused(refusal)
    assert isinstance(refused, RegistrationRefused)
    assert tuple(refused) == expected
    assert len(refused.close_reason.encode()) <= 123, "fits a close frame"


def test_every_hub_refusal_has_a_registration_answer():
    assert {Admission.registration_refused(r).audit_reason for r in HubRefusal} == {
        ErrorCode.SHUTTING_DOWN, ErrorCode.SERVER_FULL, ErrorCode.TOO_MANY_CONNECTIONS,
    }


def test_the_answer_before_the_upgrade_and_at_registration_agree_on_the_code(rig):
    """What the HTTP refusal's ``code`` says and what the audit line of a lost race says are
    the same code for an address over its share and for a full worker."""
    r = rig(capacity=1, max_connections_per_ip=1)
    r.hub.add(r.conn("192.0.2.1"))
    for remote in ("192.0.2.1", "192.0.2.2"):
        with pytest.raises(AccessDenied) as refused:
            r.admission.check_connection(remote)
        lost = r.hub.add(r.conn(remote))
        assert lost is not None
        assert Admission.registration_refused(lost).audit_reason == refused.value.code
