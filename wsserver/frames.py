"""WebSocket frame encoding for the server side (RFC 6455 section 5.2), sans I/O.

Why not wsproto for outbound frames: a broadcast is encoded **once** and the same bytes go to
every connection, whereas a wsproto connection object encodes per connection (and would
compress per connection if permessage-deflate were negotiated). Server frames are never
masked, so the encoding is a header and the payload. Inbound parsing stays with wsproto.
"""

from __future__ import annotations

import struct

__all__ = [
    "OP_BINARY",
    "OP_CLOSE",
    "OP_PING",
    "OP_PONG",
    "OP_TEXT",
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
