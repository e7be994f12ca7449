"""The one adapter between wsserver and simple-websocket (through flask-sock).

flask-sock routes ``/ws`` and simple-websocket performs the RFC 6455 handshake with wsproto.
Past the handshake we take over the socket, because simple-websocket leaves us what a
production fan-out cannot have:

* a reader thread per connection (two threads per socket under gunicorn) that writes pongs
  and close replies with a bare ``sock.send`` no lock of ours covers;
* ``send`` instead of ``sendall`` and no write timeout;
* permessage-deflate accepted whenever offered, which would make every client's bytes
  different and cost one compression per client per broadcast.

So the reader thread is never started (:class:`_NoReaderThread`), the connection's own
request thread reads (:mod:`wsserver.session`), every write goes through
:class:`~wsserver.connection.Connection`, and the deflate offer is removed from the request
before simple-websocket sees it. Nothing else in the package imports simple_websocket.
"""

from __future__ import annotations

import socket
from typing import Any

from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request
from wsproto.extensions import PerMessageDeflate
from wsproto.handshake import H11Handshake

from .codes import SUBPROTOCOL

__all__ = [
    "Transport",
    "defer_upgrade_response",
    "handshake_rejection",
    "server_options",
    "strip_compression_offer",
]


class _NoReaderThread:
    """Stands in for simple-websocket's reader thread, which we do not run: the request
    thread gunicorn gave the connection does the reading, so a connection costs one thread."""

    def __init__(self, target: Any = None, **_: Any) -> None:
        self.name = "wsserver-connection"

    def start(self) -> None:
        pass

    def is_alive(self) -> bool:
        return False

    def join(self, timeout: float | None = None) -> None:
        pass


def server_options() -> dict[str, Any]:
    """``SOCK_SERVER_OPTIONS`` for flask-sock: no reader thread, no library-side limits or
    pings (ours are in :mod:`wsserver.session`); ``wsserver.v1`` selected when offered (the
    ``/ws`` hook has refused offers without it, see :mod:`wsserver.handshake`)."""
    return {
        "thread_class": _NoReaderThread,
        "ping_interval": None,
        "max_message_size": None,
        "subprotocols": [SUBPROTOCOL],
    }


class _HeldUpgradeResponse:
    """Stands in for the socket while simple-websocket answers the upgrade: the ``101
    Switching Protocols`` it writes is kept, not sent, and everything else goes to the socket.

    Why: a client may publish (or be published to) the moment it reads its 101. If the 101
    went out before the connection was in the hub and its rooms, a notification answered 200
    after the client's 101 could miss it. ``ws.serve_connection`` registers the connection
    first, then sends the kept 101 as the first bytes of the connection's own write path,
    ahead of anything queued for it meanwhile (:meth:`Connection.open`)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.response = bytearray()

    def send(self, data: bytes) -> int:
        self.response += data
        return len(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)


def defer_upgrade_response(environ: dict[str, Any]) -> None:
    """Make simple-websocket keep its 101 instead of sending it (see
    :class:`_HeldUpgradeResponse`); :class:`Transport` hands it over."""
    for key in ("werkzeug.socket", "gunicorn.socket"):  # simple-websocket's order
        if key in environ:
            environ[key] = _HeldUpgradeResponse(environ[key])
            return


def strip_compression_offer(environ: dict[str, Any]) -> None:
    """Drop the client's permessage-deflate offer so broadcasts can be encoded once.

    Compression is not negotiated: frames are shared by every client (docs/design.md).
    """
    environ.pop("HTTP_SEC_WEBSOCKET_EXTENSIONS", None)


def handshake_rejection(environ: dict[str, Any]) -> str | None:
    """Would simple-websocket's handshake fail on this request? Its complaint, or None.

    simple-websocket rebuilds the request from the environ's ``HTTP_*`` variables and feeds
    it to wsproto inside the route: whatever wsproto (or h11 below it) rejects there raises
    out of the route as a 500 with a traceback. This replays the same bytes through the same
    parser, without a socket, so the ``/ws`` hook refuses such a request with a 400 first.
    It backs up the explicit checks of :mod:`wsserver.handshake` (which give the clearer
    reasons) for everything they do not name: header bytes h11 refuses, a Connection header
    that is not ASCII, a Host that is not IDNA, a Transfer-Encoding h11 does not take. It
    costs what simple-websocket's own parse costs, once more per upgrade (the handshake's
    share of a connection's CPU is in docs/performance.md); a 500 costs a traceback."""
    head = b"GET / HTTP/1.1\r\n"
    try:
        for key, value in environ.items():
            if key.startswith("HTTP_"):
                name = "-".join(p.capitalize() for p in key[5:].split("_"))
                head += f"{name}: {value}\r\n".encode()
        head += b"\r\n"
        handshake = H11Handshake(ConnectionType.SERVER)
        handshake.receive_data(head)
        for event in handshake.events():
            if isinstance(event, Request):
                handshake.send(AcceptConnection(extensions=[PerMessageDeflate()]))
                return None
    except Exception as exc:  # noqa: BLE001 - any failure here is a failure there
        return str(exc) or exc.__class__.__name__
    return "incomplete request"


class Transport:
    """Our hold on an accepted simple-websocket ``Server``: its socket, its wsproto
    connection (used only for parsing inbound bytes) and, when :func:`defer_upgrade_response`
    held it, the 101 still to be sent (``upgrade_response``; None: already sent)."""

    __slots__ = ("sock", "protocol", "upgrade_response", "_ws")

    def __init__(self, ws: Any) -> None:
        self._ws = ws
        self.upgrade_response: bytes | None = None
        sock = ws.sock
        if isinstance(sock, _HeldUpgradeResponse):
            self.upgrade_response = bytes(sock.response)
            sock = ws.sock = sock.sock
        self.sock: socket.socket = sock
        self.protocol: WSConnection = ws.ws

    def release(self) -> None:
        """Tell simple-websocket the connection is over, so flask-sock's ``close()`` after our
        route returns writes nothing: we already sent (or received) the close frame, and
        gunicorn half-closes and drains the socket itself."""
        self._ws.connected = False
