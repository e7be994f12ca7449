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

from wsproto import WSConnection

__all__ = ["Transport", "server_options", "strip_compression_offer"]


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
    pings (ours are in :mod:`wsserver.session`)."""
    return {"thread_class": _NoReaderThread, "ping_interval": None, "max_message_size": None}


def strip_compression_offer(environ: dict[str, Any]) -> None:
    """Drop the client's permessage-deflate offer so broadcasts can be encoded once.

    Compression is not negotiated: frames are shared by every client (docs/design.md).
    """
    environ.pop("HTTP_SEC_WEBSOCKET_EXTENSIONS", None)


class Transport:
    """Our hold on an accepted simple-websocket ``Server``: its socket and its wsproto
    connection (used only for parsing inbound bytes)."""

    __slots__ = ("sock", "protocol", "_ws")

    def __init__(self, ws: Any) -> None:
        self._ws = ws
        self.sock: socket.socket = ws.sock
        self.protocol: WSConnection = ws.ws

    def release(self) -> None:
        """Tell simple-websocket the connection is over, so flask-sock's ``close()`` after our
        route returns writes nothing: we already sent (or received) the close frame, and
        gunicorn half-closes and drains the socket itself."""
        self._ws.connected = False
