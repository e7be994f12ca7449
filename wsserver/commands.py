"""The client-command protocol: what a client's messages over ``/ws`` do.

A text message that is a JSON object with a ``type`` is a command (``subscribe``, with
``since`` a resume; ``unsubscribe``; ``ping``; ``refresh``), answered on the same socket; any
other message is the original's free-form message, relayed to everybody when rebroadcast is
on. The protocol's text is in docs/protocol.md; parsing is :func:`wsserver.protocol.parse_command`.

Why a module of its own: the service owns the delivery machinery (hub, broker, broadcaster)
and its lifecycle; the commands are one client's conversation with it, with their own
limits (commands per second, invalid commands in a row) and answers. Room rules are
:class:`wsserver.admission.Admission`'s, resumes :class:`wsserver.recovery.Recovery`'s.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Union

from . import audit, metrics
from .codes import (
    CLOSE_POLICY_VIOLATION,
    REASON_INVALID_COMMANDS,
    SERVER_SIDE_ERRORS,
    ErrorCode,
)
from .exceptions import AccessDenied, CommandError
from .frames import OP_BINARY, OP_TEXT, encode_frame
from .limits import TokenBucket
from .presence import PresenceJoin
from .protocol import Command, encode_json_frame, error_frame, parse_command

if TYPE_CHECKING:
    from .connection import Connection
    from .service import NotificationService

__all__ = ["REASON_ROOM_REVOKED", "RESUME_COST", "ClientCommands", "revoked_reply"]


# what a subscribe with ``since`` counts as against WSSERVER_MAX_COMMAND_RATE: it replays up
# to WSSERVER_HISTORY_SIZE messages on the broadcaster thread, which every client waits on
# (what resume loops cost other clients, and at which cost they stop mattering:
# docs/security.md, "(f) Resume loops", and docs/performance.md, "Hostile clients")
RESUME_COST = 5.0

Payload = Union[str, bytes]

REASON_ROOM_REVOKED = "the refreshed token no longer grants this room"

# how long a connection's thread waits for its presence join to run on the broadcaster (it
# waits behind the queue: up to WSSERVER_QUEUE_SIZE fan-outs, milliseconds each)
_PRESENCE_JOIN_WAIT = 5.0


def revoked_reply(room: str) -> dict[str, str]:
    """The ``unsubscribed`` reply for a room the server left on its own: told apart from the
    answer to an ``unsubscribe`` command by its ``code`` (clients forget the room)."""
    return {
        "type": "unsubscribed",
        "room": room,
        "code": ErrorCode.ROOM_FORBIDDEN,
        "reason": REASON_ROOM_REVOKED,
    }


class ClientCommands:
    """Runs the commands of every connection of one service.

    Owned by the service, which creates it; ``ws.serve_connection`` hands :meth:`on_message`
    to each session. Uses only the service's public surface (its settings, hub, broker,
    admission and recovery); the broker is read at each use, as a worker started after a
    fork replaces it.

    Thread-safety: :meth:`on_message` runs on the connection's own thread and is the only
    writer of that connection's command state (its ``commands`` bucket and
    ``invalid_commands`` count); what it shares (hub, broker, recovery) locks itself.
    """

    def __init__(self, service: NotificationService) -> None:
        self._service = service
        self._settings = service.settings

    def rate_limiter(self) -> TokenBucket:
        """A new connection's command bucket: ``WSSERVER_MAX_COMMAND_RATE`` a second, with a
        burst that lets a client that reconnects resume every room it may be in at once."""
        rate = self._settings.max_command_rate
        burst = self._settings.max_rooms_per_connection * RESUME_COST + 2 * rate
        return TokenBucket(rate, burst)

    def on_message(self, conn: Connection, payload: Payload) -> bool:
        """A complete message from a client: a command (a JSON object with a ``type``), or
        the original's free-form message, rebroadcast to everybody if enabled. True when the
        message was handed over for relay (its echo comes back to this client: see
        :data:`wsserver.session.OnMessage`); False when it was answered here or refused."""
        metrics.MESSAGES_IN.inc()
        if isinstance(payload, str):
            try:
                command = parse_command(payload)
            except CommandError as exc:
                if not self._over_rate(conn):
                    self._failed(conn, exc.code, exc.reason)
                return False
            if command is not None:
                resuming = command.type == "subscribe" and command.since is not None
                if not self._over_rate(conn, RESUME_COST if resuming else 1.0):
                    conn.invalid_commands = 0
                    self._run(conn, command)
                return False
        return self._free_form(conn, payload)

    def subscribe(self, conn: Connection, room: str) -> bool:
        """Join ``room`` (idempotent); raises :class:`~wsserver.auth.AccessDenied` for a
        private room the connection's token does not grant, or past the room limit. True
        when the join was queued and replies itself: a presence room is joined on the
        broadcaster thread, whose ``subscribed`` reply lists the members
        (:class:`wsserver.presence.PresenceJoin`); raises :class:`CommandError` ``busy``
        when the queue stays full."""
        service = self._service
        if not service.presence.enabled_for(room):
            service.admission.join(conn, room)
            return False
        service.admission.check_join(conn.identity, room)
        broadcaster = service.broadcaster
        assert broadcaster is not None, "the service is started before connections"
        task = PresenceJoin(service, conn, room)
        if not broadcaster.submit(task, self._settings.enqueue_timeout):
            raise CommandError("busy", "the server is too busy to join now; retry")
        # the reply comes from the broadcaster: wait for it, so that the answer to the next
        # command cannot overtake it (bounded: a stopping broadcaster never runs it)
        task.done.wait(_PRESENCE_JOIN_WAIT)
        return True

    def resume(self, conn: Connection, room: str, since: str) -> None:
        """Join ``room`` after replaying what ``conn`` missed since id ``since`` (see
        :mod:`wsserver.recovery`; the replay task replies). Raises
        :class:`~wsserver.auth.AccessDenied` if the room is forbidden, :class:`CommandError`
        ``busy`` when the server cannot take the resume now."""
        self._service.admission.check_join(conn.identity, room)
        self._service.recovery.resume(conn, room, since)

    def _free_form(self, conn: Connection, payload: Payload) -> bool:
        """Relay a free-form message (True), or answer why not (False)."""
        if not self._settings.rebroadcast:
            # answered like a command, so counted like one: a flood of them is not answered
            if not self._over_rate(conn):
                conn.send(
                    error_frame(
                        "rebroadcast_disabled", "this server does not relay client messages"
                    )
                )
            return False
        if isinstance(payload, str):
            frame = encode_frame(OP_TEXT, payload.encode("utf-8"))
        else:
            frame = encode_frame(OP_BINARY, payload)
        if not self._service.broker.relay(frame, self._settings.enqueue_timeout):
            metrics.PUBLISH_REJECTED.labels("queue_full").inc()
            conn.send(error_frame("queue_full", "server busy; message not relayed"))
            return False
        return True

    def _over_rate(self, conn: Connection, cost: float = 1.0) -> bool:
        """Count a command (``cost`` commands' worth) against the connection's
        ``max_command_rate``; past it, close the connection with 1008 (True: the command is
        not run)."""
        if conn.commands.take(cost=cost):
            return False
        rate = self._settings.max_command_rate
        text = f"commands over {rate:g}/s (WSSERVER_MAX_COMMAND_RATE)"
        if conn.close(CLOSE_POLICY_VIOLATION, text):
            audit.closed("command_rate", conn.remote, f"WSSERVER_MAX_COMMAND_RATE={rate:g}")
        return True

    def _run(self, conn: Connection, command: Command) -> None:
        if command.type == "ping":
            conn.send(encode_json_frame({"type": "pong"}))
        elif command.type == "refresh":
            self._refresh(conn, command.token)
        elif command.type == "subscribe":
            assert command.room is not None
            self._subscribe(conn, command.room, command.since)
        else:
            assert command.room is not None
            self._service.hub.unsubscribe(conn, command.room)
            conn.send(encode_json_frame({"type": "unsubscribed", "room": command.room}))

    def _refresh(self, conn: Connection, token: str | None) -> None:
        """Swap the connection's token for a new one of the same user; then leave, at once,
        every private room the new token no longer grants, each with an ``unsubscribed``
        reply carrying ``code`` and ``reason`` (docs/protocol.md, "Tokens expire")."""
        try:
            identity = self._service.policy.refresh(conn.identity, token)
        except AccessDenied as exc:
            self._failed(conn, exc.code, exc.reason)
            return
        left = self._service.admission.regrant(conn, identity)
        conn.send(encode_json_frame({"type": "refreshed", "exp": int(identity.expires_at)}))
        for room in left:
            conn.send(encode_json_frame(revoked_reply(room)))

    def _subscribe(self, conn: Connection, room: str, since: str | None) -> None:
        try:
            if since is not None:
                self.resume(conn, room, since)  # the task replies
                return
            if self.subscribe(conn, room):
                return  # the join task replies
        except (AccessDenied, CommandError) as exc:
            if exc.code in SERVER_SIDE_ERRORS:  # our overload, not the client's mistake
                conn.send(error_frame(exc.code, exc.reason, room))
            else:
                self._failed(conn, exc.code, exc.reason, room)
            return
        conn.send(encode_json_frame({"type": "subscribed", "room": room}))

    def _failed(self, conn: Connection, code: str, reason: str, room: str | None = None) -> None:
        """Answer a bad command with an error frame; a client that keeps sending bad
        commands (past ``max_invalid_commands`` in a row) is closed with 1008."""
        conn.invalid_commands += 1
        limit = self._settings.max_invalid_commands
        if conn.invalid_commands > limit:
            if conn.close(CLOSE_POLICY_VIOLATION, REASON_INVALID_COMMANDS):
                audit.closed(
                    "invalid_commands", conn.remote, f"WSSERVER_MAX_INVALID_COMMANDS={limit}"
                )
            return
        conn.send(error_frame(code, reason, room))
