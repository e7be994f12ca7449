"""Pure parts, in microseconds: frames, notification validation, settings."""

from __future__ import annotations

import json
import struct

import pytest

from wsserver.config import SettingsError, load_settings
from wsserver.exceptions import BadRequest
from wsserver.frames import OP_BINARY, OP_TEXT, close_frame, encode_frame
from wsserver.protocol import encode_json_frame, parse_notification, parse_notify_body


@pytest.mark.parametrize("size,header_len", [(0, 2), (125, 2), (126, 4), (65535, 4), (65536, 10)])
def test_frame_lengths(size, header_len):
    frame = encode_frame(OP_BINARY, b"a" * size)
    assert len(frame) == size + header_len
    assert frame[0] == 0x80 | OP_BINARY
    assert frame[1] & 0x80 == 0


def test_close_frame_reason_is_cut_on_a_character_boundary():
    frame = close_frame(1008, "é" * 100)
    payload = frame[2:]
    assert len(payload) <= 125
    assert struct.unpack("!H", payload[:2])[0] == 1008
    payload[2:].decode("utf-8")


def test_envelope_keeps_original_fields():
    n = parse_notification({"event": "e", "message": "m", "data": [1], "extra": "ignored"})
    env = json.loads(encode_json_frame(n.envelope("7", ts=5))[2:])
    assert env == {"event": "e", "message": "m", "data": [1], "room": None, "id": "7", "ts": 5}


@pytest.mark.parametrize("fields, room", [
    ({"event": "e"}, None),
    ({"event": "é \u2028 \"q\" \\", "message": "日本", "data": {"a": [1, 2.5, None, True]}}, "r"),
    ({"event": "e", "data": "\x00\x1f</script>", "user": "ü-1"}, None),
    ({"event": "e", "data": 1e300, "rooms": ["a"]}, "a"),
])
def test_the_envelope_prefix_is_the_text_json_dumps_gives(fields, room):
    """Built field by field (no json.dumps per notification): byte for byte what dumps of
    the envelope without its id gives, so every client and history reader sees the same."""
    n = parse_notification(fields)
    reference = n.envelope("", room, 1733600000123)
    del reference["id"]
    expected = json.dumps(reference, ensure_ascii=False, separators=(",", ":"))[:-1] + ',"id":"'
    prefix = n.envelope_prefix(room, 1733600000123)
    assert prefix == expected
    assert json.loads(prefix + '1-2"}')["id"] == "1-2"


@pytest.mark.parametrize("body,code", [
    (b"", "invalid_json"), (b"{", "invalid_json"), (b"\xff\xfe", "invalid_json"),
])
def test_bad_bodies(body, code):
    with pytest.raises(BadRequest) as info:
        parse_notify_body(body)
    assert info.value.status == 400 and info.value.code == code


@pytest.mark.parametrize("obj,code", [
    ([], "not_an_object"), ("x", "not_an_object"), ({}, "missing_event"),
    ({"event": 1}, "invalid_event"), ({"event": ""}, "invalid_event"),
    ({"event": "x" * 257}, "invalid_event"), ({"event": "e", "message": 5}, "invalid_message"),
])
def test_bad_notifications(obj, code):
    with pytest.raises(BadRequest) as info:
        parse_notification(obj)
    assert info.value.code == code


def test_text_frame_is_utf8():
    frame = encode_json_frame({"k": "ü"})
    assert frame[0] == 0x80 | OP_TEXT
    assert json.loads(frame[2:].decode("utf-8")) == {"k": "ü"}


def test_settings_from_environment_and_overrides():
    s = load_settings({"WSSERVER_PORT": "9000", "WSSERVER_ENV": "production"}, {"queue_size": 8})
    assert (s.port, s.env, s.queue_size, s.rebroadcast) == (9000, "production", 8, False)
    assert load_settings({}).env == "production" and load_settings({}).rebroadcast is False
    assert load_settings({"WSSERVER_ENV": "development"}).rebroadcast is True
    assert load_settings({"WSSERVER_ENV": "production", "WSSERVER_REBROADCAST": "on"}).rebroadcast


@pytest.mark.parametrize("env,name", [
    ({"WSSERVER_PORT": "abc"}, "WSSERVER_PORT"),
    ({"WSSERVER_QUEUE_SIZE": "0"}, "WSSERVER_QUEUE_SIZE"),
    ({"WSSERVER_ENV": "staging"}, "WSSERVER_ENV"),
    ({"WSSERVER_REBROADCAST": "maybe"}, "WSSERVER_REBROADCAST"),
    ({"WSSERVER_THREADS": "10", "WSSERVER_HTTP_THREADS": "10"}, "WSSERVER_HTTP_THREADS"),
])
def test_bad_settings_name_the_variable(env, name):
    with pytest.raises(SettingsError, match=name):
        load_settings(env)
