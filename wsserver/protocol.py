"""The application protocol, sans I/O: what a notification is, how it is validated, and the
JSON envelope every client receives.

Pure functions over bytes and dicts, so they are unit-testable in microseconds and the views
and the broadcaster share one definition. The wire contract is in docs/protocol.md.

Errors are split by who is at fault, in the style of wsproto: :class:`BadRequest` and
:class:`CommandError` (from :mod:`wsserver.exceptions`) are the client's and carry a
machine-readable code; anything else is ours. Close codes live in :mod:`wsserver.codes`.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass
from typing import Any

from .exceptions import BadRequest, CommandError
from .frames import OP_TEXT, encode_frame

__all__ = [
    "Command",
    "Notification",
    "encode_json_frame",
    "error_frame",
    "idempotency_key",
    "is_command",
    "parse_command",
    "parse_notification",
    "parse_notify_body",
    "parse_room_list",
    "validate_room",
]

EVENT_MAX_LENGTH = 256
ROOM_MAX_LENGTH = 128
USER_MAX_LENGTH = 256
ROOMS_PER_NOTIFICATION = 100
IDEMPOTENCY_KEY_MAX_LENGTH = 200
# visible ASCII only: a UUID, a hash, "order-7/shipped"; never spaces, controls or Unicode
_IDEMPOTENCY_KEY_RE = re.compile(r"[\x21-\x7e]+\Z")
# letters, digits and _ . : @ / - ; must start with a letter or digit
_ROOM_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@/-]*\Z")
# the envelope's encoding (json.dumps(..., ensure_ascii=False, separators=(",", ":"))), made
# once; JSONEncoder.encode is thread-safe (no state kept between calls)
_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


@dataclass(frozen=True)
class Notification:
    """A validated notification, as a publisher sent it. ``rooms`` is None for everybody
    (the original behaviour), else the rooms whose subscribers receive it."""

    event: str
    message: str
    data: Any
    rooms: tuple[str, ...] | None = None
    user: str | None = None
    idempotency_key: str | None = None

    def fingerprint(self) -> str:
        """What a repeat with the same idempotency key must match: a hash of the fields
        clients receive (not the time it was sent), so a retry of the same notification
        matches and a key reused for another one is told apart."""
        text = json.dumps(
            [self.event, self.message, self.data, self.rooms, self.user],
            ensure_ascii=False,
            sort_keys=True,
            separators=(",", ":"),
        )
        return hashlib.blake2b(text.encode("utf-8"), digest_size=12).hexdigest()

    def envelope(self, message_id: str, room: str | None = None, ts: int | None = None) -> dict:
        """The object clients receive: the original's fields plus ``room``, ``id`` and ``ts``
        (and ``user`` when it was sent to one user's connections)."""
        env = {
            "event": self.event,
            "message": self.message,
            "data": self.data,
            "room": room,
            "id": message_id,
            "ts": int(time.time() * 1000) if ts is None else ts,
        }
        if self.user is not None:
            env["user"] = self.user
        return env

    def envelope_prefix(self, room: str | None, ts: int) -> str:
        """The envelope's JSON text up to the id's value: ``prefix + id + '"}'`` is the whole
        envelope. Brokers number messages after this is built (Redis stream ids are made in
        Redis), so the id is the only part left to fill in.

        Written field by field with one shared encoder: the text ``json.dumps`` gives for
        :meth:`envelope` without its id (compact, non-ASCII kept, keys in that order), but
        without ``json.dumps`` building an encoder per call, which was most of a batched
        notification's envelope cost (docs/performance.md, "Publish path")."""
        parts = [
            '{"event":', _encode(self.event),
            ',"message":', _encode(self.message),
            ',"data":', _encode(self.data),
            ',"room":', "null" if room is None else _encode(room),
            ',"ts":', str(int(ts)),
        ]
        if self.user is not None:
            parts.append(',"user":')
            parts.append(_encode(self.user))
        parts.append(',"id":"')
        return "".join(parts)


@dataclass(frozen=True)
class Command:
    """A client command over /ws: ``subscribe``, ``unsubscribe`` or ``ping``."""

    type: str
    room: str | None = None
    since: str | None = None
    token: str | None = None


def validate_room(room: Any) -> str:
    """A room name, or :class:`CommandError` (``invalid_room``) saying what is wrong."""
    if not isinstance(room, str):
        raise CommandError("invalid_room", f"a room name is a string, got {_json_type(room)}")
    if not 1 <= len(room) <= ROOM_MAX_LENGTH or not _ROOM_RE.match(room):
        raise CommandError(
            "invalid_room",
            f"room names are 1 to {ROOM_MAX_LENGTH} characters: letters, digits and _ . : @ / -, "
            "starting with a letter or digit",
        )
    return room


def parse_room_list(text: str) -> tuple[str, ...]:
    """The ``rooms`` query parameter of /ws (``a,b``): validated, duplicates removed."""
    rooms = [r for r in (part.strip() for part in text.split(",")) if r]
    return tuple(dict.fromkeys(validate_room(r) for r in rooms))


def parse_command(text: str) -> Command | None:
    """A client text frame as a command, or None when it is not one (then it is the
    original's free-form message, rebroadcast if enabled).

    A command is a JSON object with a ``type``; anything else is not a command. A command
    that is malformed raises :class:`CommandError` (the client gets an error frame)."""
    if not text.startswith("{"):
        stripped = text.lstrip()
        if not stripped.startswith("{"):
            return None
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, dict) or "type" not in obj:
        return None
    kind = obj["type"]
    if kind == "ping":
        return Command("ping")
    if kind == "refresh":
        token = obj.get("token")
        if not isinstance(token, str) or not token:
            raise CommandError("missing_token", "'refresh' needs a 'token' string")
        return Command("refresh", token=token)
    if kind in ("subscribe", "unsubscribe"):
        if "room" not in obj:
            raise CommandError("missing_room", f"'{kind}' needs a 'room'")
        room = validate_room(obj["room"])
        since = obj.get("since")
        if since is not None and not isinstance(since, str):
            raise CommandError("invalid_since", "'since' is a message id string")
        return Command(kind, room, since if kind == "subscribe" else None)
    if not isinstance(kind, str):
        raise CommandError("invalid_command", "'type' must be a string")
    raise CommandError(
        "unknown_command",
        f"unknown command type {kind[:64]!r}; expected subscribe, unsubscribe, ping or refresh",
    )


def is_command(text: str) -> bool:
    """Whether a client text frame is a command (valid or not), i.e. never rebroadcast."""
    try:
        return parse_command(text) is not None
    except CommandError:
        return True


def error_frame(code: str, reason: str, room: str | None = None) -> bytes:
    """The error frame a client gets for a bad command (the connection stays open); it names
    the room when the command named one, so a client can tell which command failed."""
    frame: dict = {"type": "error", "code": code, "reason": reason}
    if room is not None:
        frame["room"] = room
    return encode_json_frame(frame)


def parse_notify_body(body: bytes) -> Any:
    """Decode a ``POST /notify`` body as JSON; raises :class:`BadRequest` (400) if it is not."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest(400, "invalid_json", "body is not UTF-8 text") from None
    if not text.strip():
        raise BadRequest(400, "invalid_json", "body is empty; expected a JSON object")
    try:
        if text.startswith("\ufeff"):  # as json.loads, which the shared decoder skips
            raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
        obj = _decode_body(text)
        # the envelope must encode back to UTF-8 JSON: refuse lone surrogates ("\ud800"),
        # and numbers JSON cannot carry (1e400 parses as infinity)
        _check_body(obj).encode("utf-8")
    except RecursionError:
        raise BadRequest(400, "invalid_json", "body is nested too deeply") from None
    except UnicodeEncodeError:
        raise BadRequest(
            400, "invalid_json", "body has a string that is not valid Unicode (a lone surrogate)"
        ) from None
    except ValueError as exc:
        raise BadRequest(400, "invalid_json", f"body is not valid JSON: {exc}") from None
    return obj


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# json.loads / json.dumps with options build a decoder or encoder per call; these are made
# once (both keep no state between calls, so threads may share them)
_decode_body = json.JSONDecoder(parse_constant=_reject_constant).decode
_check_body = json.JSONEncoder(ensure_ascii=False, allow_nan=False).encode


def parse_notification(obj: Any) -> Notification:
    """Validate one decoded notification object. Unknown fields are ignored, as the
    original (Go's ``json.Unmarshal``) ignored them, so existing publishers keep working."""
    if not isinstance(obj, dict):
        raise BadRequest(400, "not_an_object", f"expected a JSON object, got {_json_type(obj)}")
    event = obj.get("event")
    if event is None:
        raise BadRequest(400, "missing_event", "field 'event' is required")
    if not isinstance(event, str):
        raise BadRequest(
            400, "invalid_event", f"field 'event' must be a string, got {_json_type(event)}"
        )
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
    rooms, user = _rooms_of(obj), obj.get("user")
    if user is not None:
        if not isinstance(user, str) or not 1 <= len(user) <= USER_MAX_LENGTH:
            raise BadRequest(
                400,
                "invalid_user",
                f"field 'user' must be a string of 1 to {USER_MAX_LENGTH} characters",
            )
        if rooms is not None:
            raise BadRequest(400, "invalid_user", "give 'user' or 'room'/'rooms', not both")
    key = obj.get("idempotency_key")
    return Notification(
        event=event,
        message=message,
        data=obj.get("data"),
        rooms=rooms,
        user=user,
        idempotency_key=None if key is None else idempotency_key(key, "field 'idempotency_key'"),
    )


def idempotency_key(value: Any, where: str = "Idempotency-Key") -> str:
    """A valid idempotency key (the ``Idempotency-Key`` header or an item's
    ``idempotency_key`` field), or :class:`BadRequest` (400 ``invalid_idempotency_key``).
    Bounded because each key is kept for ``WSSERVER_HISTORY_TTL``."""
    if (
        not isinstance(value, str)
        or not 1 <= len(value) <= IDEMPOTENCY_KEY_MAX_LENGTH
        or not _IDEMPOTENCY_KEY_RE.match(value)
    ):
        raise BadRequest(
            400,
            "invalid_idempotency_key",
            f"{where} must be 1 to {IDEMPOTENCY_KEY_MAX_LENGTH} visible ASCII characters "
            "(no spaces), e.g. a UUID",
        )
    return value


def _rooms_of(obj: dict) -> tuple[str, ...] | None:
    room, rooms = obj.get("room"), obj.get("rooms")
    if room is not None and rooms is not None:
        raise BadRequest(400, "invalid_room", "give 'room' or 'rooms', not both")
    try:
        if room is not None:
            return (validate_room(room),)
        if rooms is None:
            return None
        if not isinstance(rooms, list) or not rooms:
            raise BadRequest(400, "invalid_room", "'rooms' must be a non-empty list of room names")
        if len(rooms) > ROOMS_PER_NOTIFICATION:
            raise BadRequest(
                400, "invalid_room", f"at most {ROOMS_PER_NOTIFICATION} rooms per notification"
            )
        return tuple(dict.fromkeys(validate_room(r) for r in rooms))
    except CommandError as exc:
        raise BadRequest(400, exc.code, exc.reason) from None


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
