"""WebSocket frame encoding for the server side (RFC 6455 section 5.2), sans I/O.

Why not wsproto for outbound frames: a broadcast is encoded **once** and the same bytes go to
every connection, whereas a wsproto connection object encodes per connection (and would
compress per connection if permessage-deflate were negotiated). Server frames are never
masked, so the encoding is a header and the payload. Inbound parsing stays with wsproto.

Compression (permessage-deflate, RFC 7692) is negotiated with ``server_no_context_takeover``
(:mod:`wsserver.handshake`), so a compressed message depends on nothing sent before it:
:func:`deflate_frame` turns one of our plain data frames into its compressed twin once, and
that one frame serves every client that negotiated the same window size. Control frames are
never compressed (RFC 7692 section 6.1).
"""

from __future__ import annotations

import struct
import zlib

__all__ = [
    "OP_BINARY",
    "OP_CLOSE",
    "OP_PING",
    "OP_PONG",
    "OP_TEXT",
    "close_frame",
    "deflate_frame",
    "deflate_payload",
    "encode_frame",
    "frame_header",
]

OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

_FIN = 0x80
_RSV1 = 0x40  # permessage-deflate: "this message is compressed"
# RFC 7692 7.2.1: a compressed message ends with an empty stored block the sender removes
_SYNC_TAIL = b"\x00\x00\xff\xff"
# zlib's fastest level: on JSON envelopes of a few KB it compressed about as well as the
# default (6) in under half the time (measured: 4 KB of JSON, 30-50 against ~130 us)
_LEVEL = 1


def frame_header(opcode: int, length: int, compressed: bool = False) -> bytes:
    """The header of one final, unmasked frame with a ``length``-byte payload; RSV1 set when
    the payload is ``compressed`` (permessage-deflate)."""
    first = _FIN | opcode | (_RSV1 if compressed else 0)
    if length < 126:
        return struct.pack("!BB", first, length)
    if length < 65536:
        return struct.pack("!BBH", first, 126, length)
    return struct.pack("!BBQ", first, 127, length)


def encode_frame(opcode: int, payload: bytes) -> bytes:
    """One final, unmasked frame carrying ``payload`` (already UTF-8 for text frames)."""
    return frame_header(opcode, len(payload)) + payload


def deflate_payload(payload: bytes | memoryview, window_bits: int = 15) -> bytes:
    """``payload`` compressed as one permessage-deflate message without context takeover: a
    fresh compressor (``window_bits``, 9-15, at most what the client allowed), flushed with
    ``Z_SYNC_FLUSH`` and the trailing ``00 00 ff ff`` removed (RFC 7692 section 7.2.1)."""
    compressor = zlib.compressobj(_LEVEL, zlib.DEFLATED, -window_bits)
    data = compressor.compress(payload) + compressor.flush(zlib.Z_SYNC_FLUSH)
    return data[:-4] if data.endswith(_SYNC_TAIL) else data


def deflate_frame(frame: bytes, window_bits: int = 15, min_size: int = 0) -> bytes:
    """The frame a client that negotiated permessage-deflate is sent for our plain ``frame``:
    its compressed twin (RSV1 set), or ``frame`` itself (the same object) when it is a
    control frame, its payload is under ``min_size`` bytes, or compressing does not make
    it smaller. Only for frames :func:`encode_frame` made (final, unmasked)."""
    opcode = frame[0] & 0x0F
    if opcode not in (OP_TEXT, OP_BINARY) or frame[0] & _RSV1:
        return frame
    length = frame[1] & 0x7F
    start = 2 if length < 126 else 4 if length == 126 else 10
    size = len(frame) - start
    if size < min_size:
        return frame
    compressed = deflate_payload(memoryview(frame)[start:], window_bits)
    if len(compressed) >= size:
        return frame
    return frame_header(opcode, len(compressed), compressed=True) + compressed


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
