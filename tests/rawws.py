"""The suite's one raw WebSocket client, built on the package's own frame code.

websocket-client is polite: it cannot send garbage after the handshake, stop in the middle of
a frame, or vanish with a TCP reset. This module speaks RFC 6455 by hand over a plain socket so
tests can do exactly that. It is the only place in ``tests/`` that does a handshake or parses
server frames:

- :func:`handshake` / :func:`open_ws`: the upgrade request, once;
- :func:`client_frame`: masked client frames, headers from :func:`wsserver.frames.frame_header`;
- :class:`FrameParser`: server frames, each header checked to be exactly the one
  :func:`wsserver.frames.frame_header` makes (final, no RSV bits, unmasked, shortest length;
  RSV1 only for a parser told permessage-deflate was negotiated, which inflates those);
  cheap per frame, so one thread can read hundreds of connections;
- :class:`RawClient`: a connection object over those, for tests that talk back and forth.

Every wait has a timeout.
"""

from __future__ import annotations

import base64
import os
import select
import socket
import struct
import time
import zlib
from collections import deque
from typing import Any

from wsserver.frames import OP_BINARY, OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, frame_header

__all__ = [
    "OP_BINARY",
    "OP_CLOSE",
    "OP_PING",
    "OP_PONG",
    "OP_TEXT",
    "FrameParser",
    "HandshakeRefused",
    "RawClient",
    "client_frame",
    "close_code",
    "close_payload",
    "handshake",
    "open_ws",
    "read_frames",
    "reset",
]

_MASK_BIT = 0x80
_FIN = 0x80


class HandshakeRefused(Exception):
    """The server answered the upgrade with something other than 101."""

    def __init__(self, status: int, head: bytes, body: bytes) -> None:
        super().__init__(f"upgrade refused with HTTP {status}")
        self.status = status
        self.head = head
        self.body = body


def _port_of(server: Any) -> int:
    """A port number, or anything with a ``port`` (a ``GunicornServer``)."""
    return server if isinstance(server, int) else int(server.port)


def handshake(
    sock: socket.socket, port: int, path: str = "/ws", headers: dict[str, str] | None = None
) -> tuple[int, bytes, bytes]:
    """Send the upgrade request on a connected ``sock``; read the answer's head. A ``Host``
    in ``headers`` replaces ``127.0.0.1:<port>`` (a hostile client names any host).
    Returns (status, head, the bytes already received past the head)."""
    key = base64.b64encode(os.urandom(16)).decode()
    headers = dict(headers or {})
    host = headers.pop("Host", f"127.0.0.1:{port}")
    extra = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    sock.sendall(
        (
            f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: 13\r\n{extra}\r\n"
        ).encode()
    )
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError(f"connection closed during the handshake: {buf!r}")
        buf += chunk
        if len(buf) > 65536:
            raise ConnectionError("response head too large")
    head, _, rest = buf.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), head, rest


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return 0


def _read_body(sock: socket.socket, head: bytes, rest: bytes) -> bytes:
    length = _content_length(head)
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return rest[:length]


def _connect(port: int, timeout: float, rcvbuf: int | None) -> socket.socket:
    sock = socket.socket()
    if rcvbuf:  # before connect: the window is negotiated in the SYN
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(timeout)
    try:
        sock.connect(("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return sock


def open_ws(
    port: Any,
    timeout: float = 5.0,
    path: str = "/ws",
    headers: dict[str, str] | None = None,
) -> tuple[socket.socket, bytes]:
    """Connect and upgrade. Returns the socket (blocking, with ``timeout``) and any bytes the
    server already sent past the 101 head. Raises :class:`HandshakeRefused` on a non-101."""
    port = _port_of(port)
    sock = _connect(port, timeout, None)
    try:
        status, head, rest = handshake(sock, port, path, headers)
        if status != 101:
            raise HandshakeRefused(status, head, _read_body(sock, head, rest))
        return sock, rest
    except BaseException:
        sock.close()
        raise


def client_frame(
    opcode: int, payload: bytes = b"", fin: bool = True, rsv: int = 0, masked: bool = True
) -> bytes:
    """One masked client frame (clients must mask, RFC 6455 section 5.3): the server's header
    for that opcode and length, with FIN/RSV as asked and the mask bit set. ``masked=False``
    makes the frame a client must never send (a conformance test's)."""
    header = bytearray(frame_header(opcode, len(payload)))
    header[0] = (_FIN if fin else 0) | (rsv << 4) | opcode
    if not masked:
        return bytes(header) + payload
    header[1] |= _MASK_BIT
    mask = os.urandom(4)
    if not payload:
        return bytes(header) + mask
    # XOR with the mask repeated over the payload, as one big-int operation (fast for MiBs)
    repeated = (mask * (len(payload) // 4 + 1))[: len(payload)]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(
        len(payload), "big"
    )
    return bytes(header) + mask + masked


def close_payload(code: int, reason: str = "") -> bytes:
    """The payload of a close frame (not cut to 125 bytes: tests may send an oversized one)."""
    return struct.pack("!H", code) + reason.encode()


def close_code(payload: bytes) -> int | None:
    """The code of a close frame's payload; None for a bare close."""
    return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None


def reset(sock: socket.socket) -> None:
    """Vanish: close with SO_LINGER (1, 0), which sends a TCP RST instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class FrameParser:
    """Incremental parser for server frames.

    Each header must be byte for byte the one :func:`wsserver.frames.frame_header` makes for
    its opcode and length: final (wsserver never fragments), no RSV bits (nothing is
    negotiated), unmasked, and the shortest length encoding. Anything else fails the test.

    Thread-safety: none; one reader per parser.
    """

    def __init__(self, deflate: bool = False) -> None:
        self._buf = bytearray()
        self._deflate = deflate  # permessage-deflate negotiated: RSV1 frames are inflated
        self.compressed = 0  # frames that came compressed (RSV1)

    @property
    def pending(self) -> int:
        """Bytes received that do not complete a frame yet."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """Feed bytes; returns the frames they complete, as (opcode, payload)."""
        buf = self._buf
        buf += data
        frames = []
        pos = 0
        while len(buf) - pos >= 2:
            opcode = buf[pos] & 0x0F
            length = buf[pos + 1] & 0x7F
            head = 2
            if length == 126:
                if len(buf) - pos < 4:
                    break
                length, head = struct.unpack_from("!H", buf, pos + 2)[0], 4
            elif length == 127:
                if len(buf) - pos < 10:
                    break
                length, head = struct.unpack_from("!Q", buf, pos + 2)[0], 10
            header = bytes(buf[pos : pos + head])
            compressed = self._deflate and bool(buf[pos] & 0x40)
            assert header == frame_header(opcode, length, compressed), (
                f"not a frame wsserver.frames makes (fragmented, RSV, masked or long-coded "
                f"length): header {header.hex()}"
            )
            end = pos + head + length
            if len(buf) < end:
                break
            payload = bytes(buf[pos + head : end])
            if compressed:  # no context takeover: every message inflates on its own
                self.compressed += 1
                payload = zlib.decompressobj(-15).decompress(payload + b"\x00\x00\xff\xff")
            frames.append((opcode, payload))
            pos = end
        del buf[:pos]  # once per feed: many small frames per read stay cheap
        return frames


def read_frames(
    sock: socket.socket, until_close: bool = True, timeout: float = 10.0, initial: bytes = b""
) -> list[tuple[int, bytes]]:
    """Read frames until a close frame (included), or with ``until_close=False`` until the
    server ends the connection (EOF or reset); raises TimeoutError after ``timeout``."""
    parser = FrameParser()
    frames = parser.feed(initial)
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    deadline = time.monotonic() + timeout
    while not (until_close and frames and frames[-1][0] == OP_CLOSE):
        left = deadline - time.monotonic()
        if left <= 0:
            waited = "a close frame" if until_close else "the end of the connection"
            raise TimeoutError(f"no {waited} within {timeout}s; got {len(frames)} frames")
        if not poller.poll(left * 1000):
            continue
        try:
            data = sock.recv(1 << 20)
        except ConnectionResetError:
            break
        if not data:
            break
        frames.extend(parser.feed(data))
    return frames


class RawClient:
    """One connection on a bare socket: the handshake and frames done by hand, so a test
    controls exactly what is sent (or not read) and sees exactly what arrives.

    A refused upgrade does not raise: ``status`` and ``response_head`` say what came back and
    :meth:`http_body` reads the body. ``server`` is a port or anything with a ``port``.

    Thread-safety: one reader thread and one writer thread at most (a reader that answers
    pings counts as a writer too).
    """

    def __init__(
        self,
        server: Any,
        path: str = "/ws",
        rcvbuf: int | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 10.0,
    ) -> None:
        port = _port_of(server)
        self.sock = _connect(port, timeout, rcvbuf)
        try:
            self.status, self._head, rest = handshake(self.sock, port, path, headers)
        except BaseException:
            self.sock.close()
            raise
        self.response_head = self._head.decode("latin-1")
        self._body = rest  # a refused upgrade's body starts here; else the first frames
        # permessage-deflate, when the answer accepted an offer the test sent
        self.deflate = "permessage-deflate" in self.response_head.lower()
        self._parser = FrameParser(self.deflate)
        self._frames: deque[tuple[int, bytes]] = deque()
        if self.status == 101:
            self._frames.extend(self._parser.feed(rest))

    def http_body(self) -> bytes:
        """The body of a refused upgrade (a plain HTTP response), read to Content-Length."""
        return _read_body(self.sock, self._head, self._body)

    def send_frame(self, opcode: int, payload: bytes = b"", fin: bool = True, rsv: int = 0) -> None:
        self.sock.sendall(client_frame(opcode, payload, fin, rsv))

    @property
    def compressed(self) -> int:
        """How many frames so far came compressed (RSV1, permessage-deflate)."""
        return self._parser.compressed

    def send_text(self, text: str) -> None:
        self.send_frame(OP_TEXT, text.encode())

    def feed(self, data: bytes) -> None:
        """Bytes read elsewhere (a test's own selector loop): parsed, kept for
        :meth:`next_buffered` and :meth:`recv_frame`."""
        self._frames.extend(self._parser.feed(data))

    def next_buffered(self) -> tuple[int, bytes] | None:
        """The next frame already received, without reading the socket; None if none."""
        return self._frames.popleft() if self._frames else None

    def recv_frame(self) -> tuple[int, bytes]:
        """(opcode, payload) of the next server frame; EOFError if the server closed first."""
        while not self._frames:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("connection closed by server")
            self.feed(chunk)
        return self._frames.popleft()

    def recv_until(self, opcode: int) -> tuple[int, bytes]:
        """The next frame with ``opcode``; frames before it are dropped."""
        while True:
            op, payload = self.recv_frame()
            if op == opcode:
                return op, payload

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
