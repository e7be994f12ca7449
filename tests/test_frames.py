"""wsserver.frames: server frames (RFC 6455 section 5.2), checked byte by byte and against
wsproto's own parser (a client-side wsproto connection reads what we encode)."""

from __future__ import annotations

import os
import struct
import zlib

import pytest
from wsproto import ConnectionType
from wsproto.connection import Connection as WsprotoConnection
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage
from wsproto.extensions import PerMessageDeflate

from wsserver.frames import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_TEXT,
    close_frame,
    deflate_frame,
    deflate_payload,
    encode_frame,
    frame_header,
)

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize(
    "length, header",
    [
        (0, b"\x81\x00"),
        (125, b"\x81\x7d"),
        (126, b"\x81\x7e\x00\x7e"),
        (65535, b"\x81\x7e\xff\xff"),
        (65536, b"\x81\x7f" + struct.pack("!Q", 65536)),
    ],
)
def test_header_uses_the_shortest_length_form(length, header):
    assert frame_header(OP_TEXT, length) == header


def _parsed(data: bytes) -> list:
    client = WsprotoConnection(ConnectionType.CLIENT)
    client.receive_data(data)
    return list(client.events())


def test_wsproto_reads_what_we_encode():
    text = "héllo " * 30_000  # over 64 KiB: the 8-byte length
    events = _parsed(
        encode_frame(OP_TEXT, text.encode())
        + encode_frame(OP_BINARY, b"\x00\xff")
        + encode_frame(OP_PING, b"p")
        + close_frame(1001, "bye")
    )
    assert isinstance(events[0], TextMessage) and events[0].data == text
    assert isinstance(events[1], BytesMessage) and events[1].data == b"\x00\xff"
    assert isinstance(events[2], Ping) and events[2].payload == b"p"
    assert isinstance(events[3], CloseConnection)
    assert (events[3].code, events[3].reason) == (1001, "bye")


def test_close_reason_is_cut_to_the_control_frame_limit_on_a_character_boundary():
    frame = close_frame(1008, "é" * 100)  # 200 bytes of UTF-8
    payload = frame[2:]
    assert frame[0] == 0x80 | OP_CLOSE and frame[1] == len(payload) <= 125
    assert payload[:2] == struct.pack("!H", 1008)
    reason = payload[2:].decode("utf-8")  # no half character left at the cut
    assert reason == "é" * 61


def test_close_without_reason_is_the_code_alone():
    assert close_frame(1000) == b"\x88\x02\x03\xe8"


# -- permessage-deflate: the compressed twin of a frame ------------------------------------------


def _inflate(payload: bytes, bits: int = 15) -> bytes:
    return zlib.decompressobj(-bits).decompress(payload + b"\x00\x00\xff\xff")


@pytest.mark.parametrize("size", [200, 4000, 70_000])
@pytest.mark.parametrize("bits", [9, 12, 15])
def test_a_compressed_twin_has_rsv1_and_inflates_alone_to_the_payload(size, bits):
    """No context takeover: each twin inflates with a fresh inflater of the window the
    client allowed (a window-9 twin read with a window-9 inflater)."""
    payload = (b'{"event":"order","data":{"id":%d,"items":["a","b","c"]}},' * size)[:size]
    frame = encode_frame(OP_TEXT, payload)
    twin = deflate_frame(frame, bits)
    assert twin[0] == 0xC1  # FIN, RSV1, text
    length = twin[1] & 0x7F
    start = 2 if length < 126 else 4 if length == 126 else 10
    assert twin[:start] == frame_header(OP_TEXT, len(twin) - start, compressed=True)
    assert _inflate(twin[start:], bits) == payload
    assert len(twin) < len(frame) / 3


def test_wsprotos_client_reads_a_compressed_twin_as_the_message():
    deflate = PerMessageDeflate()
    deflate.finalize("permessage-deflate; server_no_context_takeover")
    client = WsprotoConnection(ConnectionType.CLIENT, [deflate])
    for text in ("é" * 3000, "second, same parser: " + "x" * 3000):
        client.receive_data(deflate_frame(encode_frame(OP_TEXT, text.encode())))
        [event] = client.events()
        assert isinstance(event, TextMessage) and event.data == text


@pytest.mark.parametrize(
    "frame, min_size",
    [
        pytest.param(encode_frame(OP_TEXT, b"a" * 1023), 1024, id="under-the-threshold"),
        pytest.param(encode_frame(OP_PING, b"a" * 100), 0, id="control-frame"),
        pytest.param(close_frame(1000, "a" * 100), 0, id="close-frame"),
        pytest.param(encode_frame(OP_BINARY, os.urandom(2048)), 0, id="does-not-shrink"),
    ],
)
def test_a_frame_not_worth_compressing_is_returned_itself(frame, min_size):
    """The same object: a client that negotiated deflate is then sent the plain frame every
    other client gets (RSV1 clear: uncompressed, allowed per message)."""
    assert deflate_frame(frame, 15, min_size) is frame


def test_the_threshold_counts_payload_bytes():
    frame = encode_frame(OP_TEXT, b"a" * 1024)
    assert deflate_frame(frame, 15, 1024) is not frame
    assert deflate_frame(frame, 15, 1025) is frame


def test_an_empty_payload_compresses_to_one_byte():
    assert _inflate(deflate_payload(b"")) == b""
    assert deflate_payload(b"") == b"\x00"
