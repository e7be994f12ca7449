"""The application protocol, sans I/O: what a notification is, how it is validated, and the
JSON envelope every client receives.

Pure functions over bytes and dicts, so they are unit-testable in microseconds and the views
and the broadcaster share one definition. The wire contract is in docs/protocol.md.

Errors are split by who is at fault, in the style of wsproto: :class:`BadRequest` is the
client's (it carries the HTTP status and a machine-readable code); anything else is ours.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from .frames import OP_TEXT, encode_frame

__all__ = [
    "CLOSE_GOING_AWAY",
    "CLOSE_INTERNAL_ERROR",
    "CLOSE_MESSAGE_TOO_BIG",
    "CLOSE_NORMAL",
    "CLOSE_PROTOCOL_ERROR",
    "CLOSE_SLOW_CONSUMER",
    "CLOSE_TRY_AGAIN_LATER",
    "BadRequest",
    "Notification",
    "encode_json_frame",
    "parse_notification",
    "parse_notify_body",
]

# Close codes the server sends, with the reason text that goes with each (docs/protocol.md).
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001  # server shutting down: reconnect (with backoff)
CLOSE_PROTOCOL_ERROR = 1002  # the peer broke RFC 6455: fix the client
CLOSE_SLOW_CONSUMER = 1008  # reason "slow consumer": the client fell a buffer behind
CLOSE_MESSAGE_TOO_BIG = 1009  # inbound message over WSSERVER_MAX_MESSAGE_SIZE
CLOSE_INTERNAL_ERROR = 1011  # keepalive timeout or a server fault: reconnect
CLOSE_TRY_AGAIN_LATER = 1013  # server over capacity: reconnect later

EVENT_MAX_LENGTH = 256


class BadRequest(ValueError):
    """The publisher's request is wrong; ``status`` and ``code`` say how, ``str()`` says why."""

    def __init__(self, status: int, code: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.code = code
        self.reason = reason


@dataclass(frozen=True)
class Notification:
    """A validated notification, as a publisher sent it."""

    event: str
    message: str
    data: Any

    def envelope(self, message_id: str, room: str | None = None, ts: int | None = None) -> dict:
        """The object clients receive: the original's fields plus ``room``, ``id`` and ``ts``."""
        return {
            "event": self.event,
            "message": self.message,
            "data": self.data,
            "room": room,
            "id": message_id,
            "ts": int(time.time() * 1000) if ts is None else ts,
        }


def parse_notify_body(body: bytes) -> Any:
    """Decode a ``POST /notify`` body as JSON; raises :class:`BadRequest` (400) if it is not."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest(400, "invalid_json", "body is not UTF-8 text") from None
    if not text.strip():
        raise BadRequest(400, "invalid_json", "body is empty; expected a JSON object")
    try:
        return json.loads(text)
    except ValueError as exc:
        raise BadRequest(400, "invalid_json", f"body is not valid JSON: {exc}") from None


def parse_notification(obj: Any) -> Notification:
    """Validate one decoded notification object. Unknown fields are ignored, as the
    original (Go's ``json.Unmarshal``) ignored them, so existing publishers keep working."""
    if not isinstance(obj, dict):
        raise BadRequest(
            400, "not_an_object", f"expected a JSON object, got {_json_type(obj)}"
        )
    event = obj.get("event")
    if event is None:
        raise BadRequest(400, "missing_event", "field 'event' is required")
    if not isinstance(event, str):
        raise BadRequest(400, "invalid_event", f"field 'event' must be a string, got {_json_type(event)}")
    if not event or len(event) > EVENT_MAX_LENGTH:
        raise BadRequest(
            400, "invalid_event", f"field 'event' must be 1 to {EVENT_MAX_LENGTH} characters"
        )
    message = obj.get("message", "")
    if message is None:
        message = ""
    if not isinstance(message, str):
        raise BadRequest(
            400, "invalid_message", f"field 'message' must be a string, got {_json_type(message)}"
        )
    return Notification(event=event, message=message, data=obj.get("data"))


def encode_json_frame(obj: Any) -> bytes:
    """``obj`` as compact JSON in one text frame: the bytes every recipient is sent."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return encode_frame(OP_TEXT, text.encode("utf-8"))


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"
