"""The ``/ws`` endpoint: checks before the upgrade, then one session per connection.

simple-websocket answers the handshake before a flask-sock route body runs, so anything that
must be refused with a plain HTTP status (origin, token, rooms, limits) is checked in a
``before_request`` hook on this endpoint: the client gets a 4xx/503 and no WebSocket.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

from flask import Flask, current_app, g, request
from flask_sock import Sock

from . import audit
from .auth import Identity, token_from, valid_origin
from .codes import CLOSE_TRY_AGAIN_LATER
from .errors import refusal_response
from .exceptions import AccessDenied, CommandError, Refusal
from .handshake import check_handshake, negotiate_compression, negotiate_subprotocol
from .protocol import error_frame, parse_room_list
from .service import NotificationService
from .session import run_session
from .transport import Transport, defer_upgrade_response, server_options
from .worker import RUN_AFTER_REQUEST, WEBSOCKET_STARTED

__all__ = ["init_app"]

log = logging.getLogger(__name__)

WS_ENDPOINT = "websocket"


def init_app(app: Flask) -> None:
    app.config["SOCK_SERVER_OPTIONS"] = server_options()
    sock = Sock(app)

    @app.before_request
    def _before_upgrade() -> Any:
        if request.endpoint != WS_ENDPOINT:
            return None
        service: NotificationService = current_app.extensions["wsserver"]
        try:
            # first: what simple-websocket (and check_handshake's replay through wsproto)
            # then sees of the extension offer is the one offer we accept, or none
            g.wsserver_deflate = negotiate_compression(
                request.environ, service.settings.compression
            )
            defer_upgrade_response(request.environ)
            check_handshake(request.environ)
            offered_token = negotiate_subprotocol(request.environ)
            service.ensure_started()
            g.wsserver_identity, g.wsserver_rooms = check_upgrade(service, offered_token)
        except Refusal as exc:  # HandshakeRefused, AccessDenied
            return refusal_response(exc)
        return None

    @sock.route("/ws", endpoint=WS_ENDPOINT)
    def websocket(ws: Any) -> None:
        # the upgrade is done: tell wsserver's worker that its request deadline no longer
        # applies (WSSERVER_REQUEST_TIMEOUT bounds requests, not WebSockets)
        started = request.environ.get(WEBSOCKET_STARTED)
        if started is not None:
            started()
        service: NotificationService = current_app.extensions["wsserver"]
        deflate = g.get("wsserver_deflate")
        transport = Transport(ws, deflate is not None, service.settings.max_message_size)
        session = partial(
            serve_connection,
            service,
            transport,
            request.remote_addr or "?",
            g.get("wsserver_rooms", ()),
            g.get("wsserver_identity"),
            request.args.get("since") or None,
            None if deflate is None else deflate.window_bits,
        )
        run_after = request.environ.get(RUN_AFTER_REQUEST)
        if run_after is None:  # another server, a test client: on this request's frames
            session()
        else:  # wsserver's worker: once the request has returned (see RUN_AFTER_REQUEST)
            transport.detach_library()
            run_after(session)


def check_upgrade(
    service: NotificationService, offered_token: str | None = None
) -> tuple[Identity | None, tuple[str, ...]]:
    """Everything that can refuse a well-formed handshake, in order: origin (403), token
    (400 when sent twice, 401), rooms (400/403), this address's share (429), this worker's
    budget (503). ``offered_token`` is the one the subprotocol offer carried. Returns the
    verified identity and the connect-time rooms. Each refusal's ``detail`` names the
    setting behind it, for the audit line."""
    policy = service.policy
    origin = request.headers.get("Origin")
    if origin is not None and not valid_origin(origin):
        raise AccessDenied(
            403, "invalid_origin", "the Origin header is not scheme://host[:port]", "RFC 6454"
        )
    if not policy.origin_allowed(origin, request.host):
        raise AccessDenied(
            403,
            "origin_forbidden",
            "this origin may not open WebSockets here",
            "WSSERVER_ALLOWED_ORIGINS",
        )
    try:
        identity = policy.authenticate(
            token_from(
                request.headers.get("Authorization"), request.args.get("token"), offered_token
            )
        )
    except AccessDenied as exc:
        exc.detail = exc.detail or policy.token_setting
        raise
    try:
        rooms = parse_room_list(request.args.get("rooms", ""))
    except CommandError as exc:
        raise AccessDenied(400, exc.code, f"?rooms=: {exc.reason}") from None
    if request.args.get("since") and len(rooms) != 1:
        raise AccessDenied(
            400, "invalid_since", "?since= resumes one room: give exactly one in ?rooms="
        )
    service.admission.check_rooms(identity, rooms)
    service.admission.check_connection(request.remote_addr or "?")
    return identity, rooms


def serve_connection(
    service: NotificationService,
    transport: Transport,
    remote: str,
    rooms: tuple[str, ...] = (),
    identity: Identity | None = None,
    since: str | None = None,
    deflate: int | None = None,
) -> None:
    """Register the client (in its connect-time rooms), send its 101 if it waits (so the
    client is in its rooms before it can know it is connected), run its session on this
    thread, and always clean up. ``deflate``: the window bits of the permessage-deflate the
    client negotiated (None: plain frames)."""
    upgrade_response = transport.upgrade_response
    conn = service.new_connection(
        transport.sock, remote, identity, opening=upgrade_response is not None
    )
    conn.deflate = deflate
    refused = service.hub.add(conn)
    if upgrade_response is not None and (refused is not None or since is not None):
        conn.open(upgrade_response)  # refused: 101, then 1013; a resume replies after it
    if refused is not None:
        # lost a race for the last slot (or shutdown began) after the checks before the
        # upgrade: refuse politely, saying which
        text, reason, setting = service.admission.registration_refused(refused)
        conn.close(CLOSE_TRY_AGAIN_LATER, text)
        audit.refused(reason, remote, setting)
        conn.drain(service.settings.close_timeout)
        transport.release()
        conn.detach()
        return
    log.debug("client %d connected from %s", conn.id, remote)
    why = "error"
    try:
        commands = service.commands
        if since is not None:
            try:
                commands.resume(conn, rooms[0], since)  # replies subscribed, then replays
            except CommandError as exc:  # busy: the client retries the subscribe
                conn.send(error_frame(exc.code, exc.reason, rooms[0]))
        else:
            for room in rooms:
                commands.subscribe(conn, room)
            if upgrade_response is not None:
                conn.open(upgrade_response)
        why = run_session(transport, conn, service.settings, commands.on_message)
    except Exception:
        log.exception("client %d: session failed", conn.id)
        conn.abort()
    finally:
        if conn.slow:
            service.report_slow(conn)  # unless the broadcaster already did
        service.hub.depart(conn)
        conn.detach()
        log.debug("client %d disconnected: %s", conn.id, why)
