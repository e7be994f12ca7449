"""Admission: whether a client may open a WebSocket here, and which rooms it may join.

Why one module: the same rules apply at three moments, and were written at each. Before
the upgrade (``ws.check_upgrade``: answered with an HTTP status, the client gets no
WebSocket), at registration (``ws.serve_connection``: a client that lost the race for the
last slot is closed with 1013) and on an open socket (a ``subscribe`` command or a resume:
answered with an error frame). Written twice, the texts and the order of the checks had
started to differ. Here each rule is written once, with its answer.

The bounds themselves are kept by the hub, which checks and takes them in one locked step
(see :mod:`wsserver.hub`); this module decides which checks run, in what order, and how each
refusal reads. Every refusal is an :class:`~wsserver.auth.AccessDenied`: its status is the
upgrade's answer, its code and reason are a command's error frame, its detail names the
setting behind it for the audit line.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, NamedTuple

from .auth import AccessPolicy, Identity
from .codes import (
    REASON_SERVER_FULL,
    REASON_SERVER_RESTARTING,
    REASON_TOO_MANY_CONNECTIONS,
    ErrorCode,
)
from .exceptions import AccessDenied, RoomLimitReached
from .hub import Hub, HubRefusal

if TYPE_CHECKING:
    from .config import Settings
    from .connection import Connection

__all__ = ["Admission", "RegistrationRefused"]


class RegistrationRefused(NamedTuple):
    """How a connection the hub would not register is closed (1013) and audited."""

    close_reason: str
    audit_reason: str
    setting: str


# why Hub.add refused -> how serve_connection closes the connection it had upgraded
_REGISTRATION_REFUSALS = {
    HubRefusal.CLOSING: RegistrationRefused(
        REASON_SERVER_RESTARTING, ErrorCode.SHUTTING_DOWN, ""
    ),
    HubRefusal.FULL: RegistrationRefused(
        REASON_SERVER_FULL, ErrorCode.SERVER_FULL, "WSSERVER_MAX_CONNECTIONS"
    ),
    HubRefusal.ADDRESS: RegistrationRefused(
        REASON_TOO_MANY_CONNECTIONS,
        ErrorCode.TOO_MANY_CONNECTIONS,
        "WSSERVER_MAX_CONNECTIONS_PER_IP",
    ),
}


class Admission:
    """The admission rules of one service: rooms (who may join which, how many per
    connection) and connections (per address, per worker, not while shutting down).

    Thread-safety: its one lock orders refreshes against joins (see :meth:`regrant`); the
    hub locks its own state, the policy is read-only. Called from request threads and the
    broadcaster thread (a resume joins its room there).
    """

    def __init__(self, settings: Settings, policy: AccessPolicy, hub: Hub) -> None:
        self._settings = settings
        self._policy = policy
        self._hub = hub
        # a connection's identity and its rooms change together (regrant) or are checked and
        # entered together (join): never a join checked against a token a refresh replaced.
        # Taken before the hub's lock, never inside it.
        self._grants = threading.Lock()

    # -- rooms -----------------------------------------------------------------------------

    def check_rooms(self, identity: Identity | None, rooms: tuple[str, ...]) -> None:
        """The connect-time rooms (``?rooms=``): not more than a connection may be in, and
        each one the identity may join."""
        if len(rooms) > self._settings.max_rooms_per_connection:
            raise self.too_many_rooms()
        for room in rooms:
            self.check_join(identity, room)

    def check_join(self, identity: Identity | None, room: str) -> None:
        """Raise ``room_forbidden`` (403) for a private room the token does not grant."""
        if not self._policy.may_join(identity, room):
            raise AccessDenied(
                403,
                "room_forbidden",
                f"joining {room!r} needs a token that grants it",
                f"WSSERVER_PRIVATE_ROOM_PREFIX={self._settings.private_room_prefix}",
            )

    def join(self, conn: Connection, room: str) -> None:
        """Put ``conn`` in ``room`` (idempotent) if its identity may join it and it is in
        fewer rooms than the limit; raises :class:`AccessDenied` otherwise."""
        with self._grants:
            self.check_join(conn.identity, room)
            self.enter(conn, room)

    def regrant(self, conn: Connection, identity: Identity) -> list[str]:
        """Give ``conn`` its refreshed ``identity`` and take it out of every room that
        identity no longer grants (a token whose ``rooms`` claim shrank); returns the rooms
        it left, sorted. One step under :attr:`_grants` with :meth:`join`'s check-and-enter:
        a resume joining on the broadcaster thread meanwhile either entered before (and is
        taken out here) or checks the new identity (and is refused)."""
        with self._grants:
            conn.identity = identity
            left = []
            for room in self._hub.rooms_of(conn):
                if not self._policy.may_join(identity, room) and self._hub.unsubscribe(conn, room):
                    left.append(room)
            return left

    def enter(self, conn: Connection, room: str) -> None:
        """Put ``conn`` in ``room``, already checked with :meth:`check_join` (a resume checks
        when it is asked, and joins later on the broadcaster thread): only the room limit,
        which the hub checks under its lock, is left."""
        try:
            self._hub.subscribe(conn, room)
        except RoomLimitReached:
            raise self.too_many_rooms() from None

    def too_many_rooms(self) -> AccessDenied:
        """The refusal of one room too many (400 before the upgrade, an error frame after)."""
        limit = self._settings.max_rooms_per_connection
        return AccessDenied(
            400,
            "too_many_rooms",
            f"a connection may be in at most {limit} rooms",
            f"WSSERVER_MAX_ROOMS_PER_CONNECTION={limit}",
        )

    # -- connections -----------------------------------------------------------------------

    def check_connection(self, address: str) -> None:
        """Before the upgrade: refuse a connection the hub would not register now, with 429
        (this address holds its share) or 503 (the worker is full or shutting down)."""
        refused = self._hub.refusal(address)
        if refused is HubRefusal.ADDRESS:
            raise AccessDenied(
                429,
                "too_many_connections",
                "too many WebSockets from this address",
                f"WSSERVER_MAX_CONNECTIONS_PER_IP={self._settings.max_connections_per_ip}",
            )
        if refused is not None:
            raise AccessDenied(
                503,
                "server_full",
                "no room for another WebSocket on this worker; retry later",
                f"{self._hub.capacity} per worker (WSSERVER_MAX_CONNECTIONS, WSSERVER_THREADS - "
                "WSSERVER_HTTP_THREADS)"
                if refused is HubRefusal.FULL
                else "shutting down",
            )

    @staticmethod
    def registration_refused(refused: HubRefusal) -> RegistrationRefused:
        """How to close (1013) and audit a connection that passed :meth:`check_connection`
        but lost a race for its slot when the hub came to register it."""
        return _REGISTRATION_REFUSALS[refused]
