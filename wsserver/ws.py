"""The ``/ws`` endpoint: checks before the upgrade, then one session per connection.

simple-websocket answers the handshake before a flask-sock route body runs, so anything that
must be refused with a plain HTTP status (capacity now; origin and auth later) is checked in
a ``before_request`` hook on this endpoint.
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, current_app, g, request
from flask_sock import Sock

from .errors import json_error
from .protocol import CLOSE_TRY_AGAIN_LATER, CommandError, parse_room_list
from .service import NotificationService
from .session import run_session
from .transport import Transport, server_options, strip_compression_offer

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
        service.ensure_started()
        if not service.hub.has_room():
            response = json_error(
                503,
                "server_full",
                "no room for another WebSocket on this worker; retry later",
            )
            response.headers["Retry-After"] = "5"
            return response
        try:
            rooms = parse_room_list(request.args.get("rooms", ""))
        except CommandError as exc:
            return json_error(400, exc.code, f"?rooms=: {exc.reason}")
        if len(rooms) > service.settings.max_rooms_per_connection:
            return json_error(
                400,
                "too_many_rooms",
                f"a connection may be in at most {service.settings.max_rooms_per_connection} rooms",
            )
        g.wsserver_rooms = rooms
        strip_compression_offer(request.environ)
        return None

    @sock.route("/ws", endpoint=WS_ENDPOINT)
    def websocket(ws: Any) -> None:
        service: NotificationService = current_app.extensions["wsserver"]
        rooms = g.get("wsserver_rooms", ())
        serve_connection(service, Transport(ws), request.remote_addr or "?", rooms)


def serve_connection(
    service: NotificationService, transport: Transport, remote: str, rooms: tuple[str, ...] = ()
) -> None:
    """Register the client (in its connect-time rooms), run its session on this thread,
    and always clean up."""
    conn = service.new_connection(transport.sock, remote)
    if not service.hub.add(conn):
        # lost a race for the last slot (or shutting down): refuse politely
        conn.close(CLOSE_TRY_AGAIN_LATER, "server full or restarting")
        conn.drain(service.settings.close_timeout)
        transport.release()
        conn.detach()
        return
    log.debug("client %d connected from %s", conn.id, remote)
    why = "error"
    try:
        for room in rooms:
            service.subscribe(conn, room)
        why = run_session(transport, conn, service.settings, service.on_client_message)
    except Exception:
        log.exception("client %d: session failed", conn.id)
        conn.abort()
    finally:
        service.hub.remove(conn)
        conn.detach()
        log.debug("client %d disconnected: %s", conn.id, why)
