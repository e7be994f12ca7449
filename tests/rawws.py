"""A minimal raw-socket WebSocket client for tests that must misbehave on purpose.

websocket-client is polite: it cannot send garbage after the handshake, stop in the middle of
a frame, or vanish with a TCP reset. These helpers speak RFC 6455 by hand over a plain
socket so tests can do exactly that, and parse the server's (unmasked) frames cheaply so
one thread can read hundreds of connections. Every wait has a timeout.
"""

from __future__ import annotations

import base64
import os
import select
import socket
import struct
import time

OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA


class HandshakeRefused(Exception):
    """The server answered the upgrade with something other than 101."""

    def __init__(self, status: int, head: bytes, body: bytes) -> None:
        super().__init__(f"upgrade refused with HTTP {status}")
        self.status = status
        self.head = head
        self.body = body


def _read_until(sock: socket.socket, marker: bytes, limit: int = 65536) -> bytes:
    buf = b""
    while marker not in buf:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError(f"connection closed before {marker!r}: {buf!r}")
        buf += chunk
        if len(buf) > limit:
            raise ConnectionError("response head too large")
    return buf


def open_ws(port: int, timeout: float = 5.0, path: str = "/ws") -> tuple[socket.socket, bytes]:
    """Connect and upgrade. Returns the socket (blocking, with ``timeout``) and any bytes the
    server already sent past the 101 head. Raises :class:`HandshakeRefused` on a non-101."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        key = base64.b64encode(os.urandom(16)).decode()
        sock.sendall(
            (
                f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        buf = _read_until(sock, b"\r\n\r\n")
        head, _, rest = buf.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        if status != 101:
            raise HandshakeRefused(status, head, _read_body(sock, head, rest))
        return sock, rest
    except BaseException:
        sock.close()
        raise


def _read_body(sock: socket.socket, head: bytes, rest: bytes) -> bytes:
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return rest[:length]


def client_frame(opcode: int, payload: bytes = b"", fin: bool = True, rsv: int = 0) -> bytes:
    """One masked client frame (clients must mask, RFC 6455 section 5.3)."""
    mask = os.urandom(4)
    length = len(payload)
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    if length < 126:
        header = struct.pack("!BB", first, 0x80 | length)
    elif length < 65536:
        header = struct.pack("!BBH", first, 0x80 | 126, length)
    else:
        header = struct.pack("!BBQ", first, 0x80 | 127, length)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return header + mask + masked


def close_payload(code: int, reason: str = "") -> bytes:
    return struct.pack("!H", code) + reason.encode()


def reset(sock: socket.socket) -> None:
    """Vanish: close with SO_LINGER (1, 0), which sends a TCP RST instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class FrameParser:
    """Incremental parser for server frames (never masked, never fragmented by wsserver)."""

    def __init__(self) -> None:
        self._buf = bytearray()

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
            end = pos + head + length
            if len(buf) < end:
                break
            frames.append((opcode, bytes(buf[pos + head : end])))
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


def close_code(payload: bytes) -> int | None:
    return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
