"""The one adapter between wsserver and simple-websocket (through flask-sock).

flask-sock routes ``/ws`` and simple-websocket performs the RFC 6455 handshake with wsproto.
Past the handshake we take over the socket, because simple-websocket leaves us what a
production fan-out cannot have:

* a reader thread per connection (two threads per socket under gunicorn) that writes pongs
  and close replies with a bare ``sock.send`` no lock of ours covers;
* ``send`` instead of ``sendall`` and no write timeout;
* permessage-deflate accepted with whatever the client offered (context takeover: every
  client's bytes different, one compression per client per broadcast), and inflated without
  a bound (a 1 KB frame may inflate to 1 MB, a 64 KB read to 64 MB).

So the reader thread is never started (:class:`_NoReaderThread`), the connection's own
request thread reads (:mod:`wsserver.session`), every write goes through
:class:`~wsserver.connection.Connection`, and the deflate offer simple-websocket sees is the
one :func:`wsserver.handshake.negotiate_compression` accepted (always without context
takeover). Inbound frames are parsed by a wsproto connection of our own
(:attr:`Transport.protocol`), which for a client that negotiated compression carries
:class:`InboundDeflate`: it inflates a message at most to ``WSSERVER_MAX_MESSAGE_SIZE`` + 1
bytes and fails it with 1009 there, never inflating the rest. Nothing else in the package
imports simple_websocket.
"""

from __future__ import annotations

import re
import socket
import zlib
from typing import Any, Union

from wsproto import ConnectionType, WSConnection
from wsproto.connection import Connection as WsprotoConnection
from wsproto.events import AcceptConnection, Request
from wsproto.extensions import Extension, PerMessageDeflate
from wsproto.frame_protocol import CloseReason, FrameDecoder, FrameProtocol, Opcode, RsvBits
from wsproto.handshake import H11Handshake

from .codes import SUBPROTOCOL

__all__ = [
    "InboundDeflate",
    "Transport",
    "defer_upgrade_response",
    "handshake_rejection",
    "inbound_protocol",
    "server_options",
]

_Proto = Union[FrameDecoder, FrameProtocol]
_RSV1 = RsvBits(True, False, False)  # what InboundDeflate lets a frame carry


class _NoReaderThread:
    """Stands in for simple-websocket's reader thread, which we do not run: the request
    thread gunicorn gave the connection does the reading, so a connection costs one thread."""

    __slots__ = ("name",)

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
        self.response: bytearray | None = bytearray()

    def send(self, data: bytes) -> int:
        assert self.response is not None, "the held 101 was handed over already"
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


# what _plainly_acceptable lets through without the replay (a subset of what h11 takes):
# a header name rebuilt from ``HTTP_A_B`` as ``A-B`` of letters and digits, a value of
# visible ASCII with single spaces or tabs inside, no leading or trailing blank
_NAME_RE = re.compile(r"[A-Z0-9]+(?:_[A-Z0-9]+)*")
_VALUE_RE = re.compile(r"(?:[\x21-\x7e]+(?:[ \t]+[\x21-\x7e]+)*)?")
_PLAIN_HEAD_MAX = 8192  # h11 refuses heads past 16 KiB: longer ones take the replay
# the deflate answers wsserver.handshake.negotiate_compression writes into the environ
_DEFLATE_ANSWERS = frozenset(
    ["permessage-deflate; client_no_context_takeover; server_no_context_takeover"]
    + [
        "permessage-deflate; client_no_context_takeover; server_no_context_takeover; "
        f"server_max_window_bits={bits}"
        for bits in range(8, 16)
    ]
)


def _plainly_acceptable(environ: dict[str, Any]) -> bool:
    """True when :func:`handshake_rejection`'s replay could only accept this request: every
    header is plain ASCII in the narrow form above, nothing h11 treats specially (a body's
    length, a transfer coding), the fields wsproto insists on present in the form it
    compares them in (``Connection`` listing ``upgrade``, ``Upgrade: websocket``,
    ``Sec-WebSocket-Version: 13``, a key, a Host IDNA reads), and any extension offer one
    of our own deflate answers. Anything else takes the replay, which names the fault.

    Why: the replay costs what simple-websocket's handshake costs (~0.15-0.2 ms, ~12 % of
    a connection's worker CPU, docs/performance.md), for requests that are nearly always
    plain. That this check only ever says True where the replay says "accepted" is tested
    against the replay itself (tests/test_transport.py)."""
    size = 0
    for key, value in environ.items():
        if not key.startswith("HTTP_"):
            continue
        if (
            type(value) is not str
            or _NAME_RE.fullmatch(key, 5) is None
            or _VALUE_RE.fullmatch(value) is None
        ):
            return False
        size += len(key) + len(value)
    if size > _PLAIN_HEAD_MAX:
        return False
    get = environ.get
    if "HTTP_TRANSFER_ENCODING" in environ or "HTTP_CONTENT_LENGTH" in environ:
        return False
    if get("HTTP_SEC_WEBSOCKET_VERSION") != "13" or not get("HTTP_SEC_WEBSOCKET_KEY"):
        return False
    if get("HTTP_UPGRADE", "").lower() != "websocket":
        return False
    if not any(t.strip().lower() == "upgrade" for t in get("HTTP_CONNECTION", "").split(",")):
        return False
    extensions = get("HTTP_SEC_WEBSOCKET_EXTENSIONS")
    if extensions is not None and extensions not in _DEFLATE_ANSWERS:
        return False
    host = get("HTTP_HOST")
    if not host:
        return False
    try:
        host.encode("ascii").decode("idna")
    except UnicodeError:
        return False
    return True


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
    share of a connection's CPU is in docs/performance.md); a 500 costs a traceback. A
    request :func:`_plainly_acceptable` vouches for skips the replay."""
    if _plainly_acceptable(environ):
        return None
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


class InboundDeflate(Extension):
    """permessage-deflate for what a client sends (RFC 7692), as negotiated by
    :func:`wsserver.handshake.negotiate_compression`: client messages without context
    takeover, a window of up to 15 bits.

    Why not wsproto's ``PerMessageDeflate``: it inflates whatever a frame holds, without a
    bound (a decompression bomb of a few KB fills the worker's memory before any limit of
    ours sees a byte), keeps a decompressor per connection, and forgets a fragmented
    message is compressed when a ping arrives between its frames. Here each chunk is
    inflated to at most what is left of ``max_size`` plus one byte: one byte over and the
    message fails with 1009 (``CloseReason.MESSAGE_TOO_BIG``, which the session reports as
    ``WSSERVER_MAX_MESSAGE_SIZE``), the rest never inflated. The decompressor exists only
    while a compressed message is being received.

    Thread-safety: none; it belongs to the connection's own thread (its wsproto parser).
    Outbound frames never pass through it: :func:`wsserver.frames.deflate_frame` makes them.
    """

    name = "permessage-deflate"

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._inflater: Any = None  # zlib decompressobj of the message being received
        self._message_compressed = False
        self._frame_compressed = False
        self._inflated = 0  # bytes of the current message inflated so far

    def enabled(self) -> bool:
        return True

    def offer(self) -> bool:  # a server never offers
        return False

    def frame_inbound_header(
        self, proto: _Proto, opcode: Opcode, rsv: RsvBits, payload_length: int
    ) -> CloseReason | RsvBits:
        if opcode.iscontrol() or opcode is Opcode.CONTINUATION:
            if rsv.rsv1:  # RFC 7692 6.1: only a message's first frame says "compressed"
                return CloseReason.PROTOCOL_ERROR
            # a control frame between a message's fragments leaves the message as it was
            self._frame_compressed = self._message_compressed and not opcode.iscontrol()
            return _RSV1
        self._message_compressed = self._frame_compressed = rsv.rsv1
        self._inflated = 0
        self._inflater = zlib.decompressobj(-15) if rsv.rsv1 else None
        return _RSV1

    def frame_inbound_payload_data(self, proto: _Proto, data: bytes) -> bytes | CloseReason:
        if not self._frame_compressed:
            return data
        return self._inflate(data)

    def frame_inbound_complete(self, proto: _Proto, fin: bool) -> bytes | CloseReason | None:
        if not (fin and self._frame_compressed):
            return None
        # RFC 7692 7.2.2: the sender removed the sync flush's empty block; put it back
        data = self._inflate(b"\x00\x00\xff\xff")
        self._inflater = None
        self._message_compressed = self._frame_compressed = False
        return data

    def _inflate(self, data: bytes) -> bytes | CloseReason:
        inflater = self._inflater
        if inflater is None:  # failed already
            return CloseReason.INVALID_FRAME_PAYLOAD_DATA
        budget = self.max_size - self._inflated
        try:
            # at most one byte past the limit (max_length 0 would mean "no limit": the
            # budget is never negative, so this asks for one byte at least)
            out = inflater.decompress(data, budget + 1)
        except zlib.error:
            self._inflater = None
            return CloseReason.INVALID_FRAME_PAYLOAD_DATA
        self._inflated += len(out)
        if self._inflated > self.max_size:
            self._inflater = None
            return CloseReason.MESSAGE_TOO_BIG
        return out


def inbound_protocol(deflate: bool, max_message_size: int) -> WsprotoConnection:
    """The wsproto connection that parses what one client sends, after the handshake:
    with :class:`InboundDeflate` when the client negotiated permessage-deflate."""
    extensions: list[Extension] = [InboundDeflate(max_message_size)] if deflate else []
    return WsprotoConnection(ConnectionType.SERVER, extensions)


def _forget_handshake(ws: Any) -> Any:
    """Drop what simple-websocket keeps of the handshake once it is answered, and return the
    wsproto connection it opened (the frame parser of the connection's life).

    ``ws.ws`` is a ``wsproto.WSConnection``: past the handshake it only forwards ``send``,
    ``receive_data`` and ``events`` to the ``wsproto.connection.Connection`` the handshake
    opened (``ws.ws.connection``), yet keeps the whole ``H11Handshake`` alive: an h11
    connection with its state and receive buffer, the parsed request and its headers, an
    event deque. ``ws.event`` (a ``threading.Event``: a condition, a lock and a deque) is
    only used by ``receive()`` and the reader thread, neither of which runs here. flask-sock
    holds the ``Server`` for the connection's life, so these would cost every idle
    connection ~4 KB (docs/performance.md, "where the KB go"). Replacing ``ws.ws`` by the
    opened connection keeps simple-websocket's own ``close()`` (which flask-sock calls after
    the route) writing the same bytes as before, should it ever still be connected."""
    opened = ws.ws
    if isinstance(opened, WSConnection):  # else forgotten already
        opened = ws.ws = opened.connection
    ws.event = None
    return opened


class Transport:
    """Our hold on an accepted simple-websocket ``Server``: its socket, the wsproto
    connection that parses inbound bytes and, when :func:`defer_upgrade_response` held it,
    the 101 still to be sent (``upgrade_response``; None: already sent).

    With ``deflate`` (the client negotiated permessage-deflate) the parser is a wsproto
    connection of our own carrying :class:`InboundDeflate`; simple-websocket's (which would
    inflate without bound) is not used. Without, simple-websocket's is (nothing to swap)."""

    __slots__ = ("sock", "protocol", "upgrade_response", "_ws")

    def __init__(self, ws: Any, deflate: bool = False, max_message_size: int = 0) -> None:
        self._ws = ws
        self.upgrade_response: bytes | None = None
        sock = ws.sock
        if isinstance(sock, _HeldUpgradeResponse):
            self.upgrade_response = bytes(sock.response or b"")
            sock.response = None  # the held object stays in the environ: keep nothing in it
            sock = ws.sock = sock.sock
        self.sock: socket.socket = sock
        opened = _forget_handshake(ws)
        self.protocol: Any = inbound_protocol(True, max_message_size) if deflate else opened

    def detach_library(self) -> None:
        """Let go of simple-websocket's ``Server`` (and through it the request's environ):
        the session will run after the request returned. flask-sock's ``close()`` then
        writes nothing."""
        self._ws.connected = False
        self._ws = None

    def release(self) -> None:
        """Tell simple-websocket the connection is over, so flask-sock's ``close()`` after our
        route returns writes nothing: we already sent (or received) the close frame, and
        gunicorn half-closes and drains the socket itself."""
        if self._ws is not None:
            self._ws.connected = False
