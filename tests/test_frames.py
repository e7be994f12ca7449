"""wsserver.frames: server frames (RFC 6455 section 5.2), checked byte by byte and against
wsproto's own parser (a client-side wsproto connection reads what we encode)."""

from __future__ import annotations

import struct

import pytest
from wsproto import ConnectionType
from wsproto.connection import Connection as WsprotoConnection
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage

from wsserver.frames import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_TEXT,
    close_frame,
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
