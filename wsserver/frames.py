"""WebSocket frame encoding for the server side (RFC 6455 section 5.2), sans I/O.

Why not wsproto for outbound frames: a broadcast is encoded **once** and the same bytes go to
every connection, whereas a wsproto connection object encodes per connection (and would
compress per connection if permessage-deflate were negotiated). Server frames are never
masked, so the encoding is a header and the payload. Inbound parsing stays with wsproto.

:class:`FrameMatch` recognizes the frame a client's own message comes back as when it is
relayed, so that client's session can order its pongs and close frame after that echo.
"""

from __future__ import annotations

import struct

__all__ = [
    "OP_BINARY",
    "OP_CLOSE",
    "OP_PING",
    "OP_PONG",
    "OP_TEXT",
    "FrameMatch",
    "close_frame",
    "encode_frame",
    "frame_header",
]

OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

_FIN = 0x80


_MATCH_SAMPLE = 32  # payload bytes (or characters) FrameMatch compares at each end


def frame_header(opcode: int, length: int) -> bytes:
    """The header of one final, unmasked frame with a ``length``-byte payload."""
    first = _FIN | opcode
    if length < 126:
        return struct.pack("!BB", first, length)
    if length < 65536:
        return struct.pack("!BBH", first, 126, length)
    return struct.pack("!BBQ", first, 127, length)


def encode_frame(opcode: int, payload: bytes) -> bytes:
    """One final, unmasked frame carrying ``payload`` (already UTF-8 for text frames)."""
    return frame_header(opcode, len(payload)) + payload


class FrameMatch:
    """Recognizes the frame :func:`encode_frame` makes of a message, without keeping a copy.

    Why: a client's message is relayed through the broadcaster, which encodes it on its own
    thread. The client's session only needs to know when *that* frame is written to its
    socket, so it keeps the frame's length, header and the payload bytes at both ends
    (``_MATCH_SAMPLE`` each): enough to tell it from other traffic at the cost of two short
    comparisons, and cheap even for a 16 MiB message. Another client sending the same bytes
    at the same moment can match instead; that only changes which of two identical frames
    the ordering waits for.
    """

    __slots__ = ("length", "head", "tail")

    def __init__(self, message: str | bytes, size: int | None = None) -> None:
        """``size``: the UTF-8 length of a text ``message`` when the caller knows it."""
        if isinstance(message, str):
            opcode = OP_TEXT
            if size is None:
                size = len(message.encode("utf-8"))
            head = message[:_MATCH_SAMPLE].encode("utf-8")
            tail = message[-_MATCH_SAMPLE:].encode("utf-8") if size > _MATCH_SAMPLE else b""
        else:
            opcode = OP_BINARY
            size = len(message)
            head = bytes(message[:_MATCH_SAMPLE])
            tail = bytes(message[-_MATCH_SAMPLE:]) if size > _MATCH_SAMPLE else b""
        header = frame_header(opcode, size)
        self.length = len(header) + size
        self.head = header + head
        self.tail = tail

    def matches(self, frame: bytes) -> bool:
        return (
            len(frame) == self.length and frame.startswith(self.head) and frame.endswith(self.tail)
        )


def close_frame(code: int, reason: str = "") -> bytes:
    """A close frame; the reason is cut to fit the 125-byte control-frame limit."""
    encoded = reason.encode("utf-8")[:123]
    while encoded:
        try:
            encoded.decode("utf-8")
            break
        except UnicodeDecodeError:  # cut inside a multi-byte character
            encoded = encoded[:-1]
    return encode_frame(OP_CLOSE, struct.pack("!H", code) + encoded)
