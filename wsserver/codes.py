"""Protocol codes, one place: WebSocket close codes and reasons, the error codes of HTTP answers
and error frames, and what a client should do after each close code.

Why a module of its own: the server, the Python client (:mod:`wsserver.client`) and the
browser client (``static/wsserver.js``) must agree on these values, and when they were copied
into each they drifted apart (one client reconnected after a 1008 the other gave up on). This
module is pure (standard library only, no I/O), so the Python client imports it without the
server; ``tests/test_codes.py`` checks that the JS client's ``CODES`` object equals
:func:`js_constants` and that its decision agrees with :func:`close_action` for every code, and
that docs/protocol.md's close-code table says the same.

What a client does after a close (:class:`CloseAction`):

* ``reconnect``: the cause is transient (a restart, the network, load, a burst past a rate
  limit, a slow read): reconnect after an exponential backoff with jitter;
* ``new_token``: the connection's token expired (4001), or a publisher disconnected the user
  (4002, ``POST /disconnect``): reconnect once a fresh token is at hand (a client holding a
  fixed token gives up; after a 4002, one whose token function returns the token the closed
  connection had gives up too: the server said not to come back with it);
* ``give_up``: reconnecting the same way would fail the same way (the client broke the
  protocol, sent what the server will never take, or keeps sending invalid commands).

1008 (policy violation) carries several causes. All but one are transient and reconnect; the
one that means "fix the client" is told apart by its reason, which is exactly
:data:`REASON_INVALID_COMMANDS` (:data:`GIVE_UP_REASONS`): compared whole against this shared
constant, never searched for in free text.
"""

from __future__ import annotations

from enum import Enum

__all__ = [
    "CLOSE_ABNORMAL",
    "CLOSE_DISCONNECTED",
    "CLOSE_GOING_AWAY",
    "CLOSE_INTERNAL_ERROR",
    "CLOSE_MESSAGE_TOO_BIG",
    "CLOSE_NORMAL",
    "CLOSE_POLICY_VIOLATION",
    "CLOSE_PROTOCOL_ERROR",
    "CLOSE_SLOW_CONSUMER",
    "CLOSE_TOKEN_EXPIRED",
    "CLOSE_TRY_AGAIN_LATER",
    "WEBSOCKET_VERSION",
    "CLOSE_ACTIONS",
    "GIVE_UP_REASONS",
    "REASON_DISCONNECTED",
    "REASON_INVALID_COMMANDS",
    "REASON_KEEPALIVE_TIMEOUT",
    "REASON_MISSED_MESSAGES",
    "REASON_RATE_LIMIT",
    "REASON_SERVER_FULL",
    "REASON_SERVER_RESTARTING",
    "REASON_SHUTTING_DOWN",
    "REASON_SLOW_CONSUMER",
    "REASON_TOKEN_EXPIRED",
    "REASON_TOO_MANY_CONNECTIONS",
    "REASON_UNSUBSCRIBED",
    "MAX_SUBPROTOCOLS",
    "SERVER_SIDE_ERRORS",
    "SUBPROTOCOL",
    "TOKEN_SUBPROTOCOL_PREFIX",
    "CloseAction",
    "ErrorCode",
    "close_action",
    "js_constants",
]

WEBSOCKET_VERSION = "13"  # the only Sec-WebSocket-Version spoken (RFC 6455)

# -- the subprotocol offer (Sec-WebSocket-Protocol, docs/protocol.md "Connecting") -------------

SUBPROTOCOL = "wsserver.v1"  # the one application subprotocol spoken: selected when offered
# an offer's entry carrying the connection token (+ a JWT, whose characters are all header
# token characters): how a browser, which cannot set Authorization, keeps it out of the URL.
# Never selected, never echoed.
TOKEN_SUBPROTOCOL_PREFIX = "wsserver.token."
MAX_SUBPROTOCOLS = 8  # entries in one offer; more is refused (400 invalid_subprotocol)

# -- close codes the server sends (docs/protocol.md, "Close codes the server sends") -----------

CLOSE_NORMAL = 1000  # the client closed; the server echoes its code
CLOSE_GOING_AWAY = 1001  # server shutting down: reconnect (with backoff)
CLOSE_PROTOCOL_ERROR = 1002  # the peer broke RFC 6455: fix the client
CLOSE_ABNORMAL = 1006  # never sent: what a client sees when the connection ends without a close
CLOSE_POLICY_VIOLATION = 1008  # a limit or a rule; see GIVE_UP_REASONS
CLOSE_SLOW_CONSUMER = 1008  # reason REASON_SLOW_CONSUMER: the client fell a buffer behind
CLOSE_MESSAGE_TOO_BIG = 1009  # inbound message over WSSERVER_MAX_MESSAGE_SIZE / _FRAGMENTS
CLOSE_INTERNAL_ERROR = 1011  # keepalive timeout, missed messages or a server fault: reconnect
CLOSE_TRY_AGAIN_LATER = 1013  # server over capacity, or restarting: reconnect later
CLOSE_TOKEN_EXPIRED = 4001  # the connection token expired: get a new token, reconnect
# a publisher closed this user's connections (POST /disconnect): do not reconnect with the same
# token; a client that can get a fresh one may (the app's token service decides whether the
# user still gets one: the server revokes nothing)
CLOSE_DISCONNECTED = 4002

# -- close reasons (the text after the code; some carry a number and a setting's name) --------

REASON_SHUTTING_DOWN = "server shutting down"  # 1001
REASON_SLOW_CONSUMER = "slow consumer"  # 1008
REASON_INVALID_COMMANDS = "too many invalid commands"  # 1008, the one that means "give up"
REASON_RATE_LIMIT = "rate limit exceeded"  # 1008, WSSERVER_RATE_LIMIT
REASON_KEEPALIVE_TIMEOUT = "keepalive ping timeout"  # 1011
# 1011: this worker lost messages it cannot replay (a Redis subscription dropped and history no
# longer reaches back): reconnect and resume every room with since
REASON_MISSED_MESSAGES = "missed messages; resume"
REASON_SERVER_FULL = "server full"  # 1013
REASON_SERVER_RESTARTING = "server restarting"  # 1013
REASON_TOO_MANY_CONNECTIONS = "too many connections from this address"  # 1013
REASON_TOKEN_EXPIRED = "token expired"  # 4001
REASON_DISCONNECTED = "disconnected by the server"  # 4002
# the reason of the ``unsubscribed`` reply a connection gets when a publisher took it out of a
# room (POST /unsubscribe; its code is ErrorCode.UNSUBSCRIBED_BY_SERVER)
REASON_UNSUBSCRIBED = "a publisher removed this connection from the room"


class _Name(str, Enum):
    """A name that is also its own string (``StrEnum`` before Python 3.11, which the client
    still supports): it goes into JSON, logs and metric labels as its value."""

    def __str__(self) -> str:
        return str(self.value)


class CloseAction(_Name):
    """What a client does after the server closed its connection."""

    RECONNECT = "reconnect"  # after an exponential backoff with jitter
    NEW_TOKEN = "new_token"  # reconnect with a fresh token; give up with a fixed one
    GIVE_UP = "give_up"  # reconnecting the same way would fail the same way


_R, _T, _G = CloseAction.RECONNECT, CloseAction.NEW_TOKEN, CloseAction.GIVE_UP

# Every close code a client may see, and what to do after it. A code not listed: 4000-4999
# (an application's code this client does not know) gives up, anything else reconnects.
CLOSE_ACTIONS: dict[int, CloseAction] = {
    1000: _R,  # the server (or a proxy, idle) closed first: a subscriber wants to stay
    1001: _R,  # restart: another worker, or the restarted server, will answer
    1002: _G,  # protocol error
    1003: _G,  # unsupported data
    1005: _R,  # no status: the network or a proxy
    1006: _R,  # abnormal: no close frame (network, crash)
    1007: _G,  # a text message that is not UTF-8
    1008: _R,  # transient, except for the reasons in GIVE_UP_REASONS
    1009: _G,  # a message too big: resending it would be refused again
    1010: _G,  # the client required an extension the server does not offer
    1011: _R,  # keepalive timeout or a server fault
    1012: _R,  # service restart
    1013: _R,  # try again later
    1014: _R,  # bad gateway
    4001: _T,  # token expired
    4002: _T,  # disconnected by a publisher: never again with the same token
}

# Close reasons that turn a code's action into "give up": compared whole, never searched.
GIVE_UP_REASONS: dict[int, frozenset[str]] = {
    CLOSE_POLICY_VIOLATION: frozenset({REASON_INVALID_COMMANDS}),
}


def close_action(code: int, reason: str = "") -> CloseAction:
    """What a client does after a close with ``code`` and ``reason`` (the table above)."""
    if reason in GIVE_UP_REASONS.get(code, ()):
        return CloseAction.GIVE_UP
    action = CLOSE_ACTIONS.get(code)
    if action is not None:
        return action
    return CloseAction.GIVE_UP if 4000 <= code <= 4999 else CloseAction.RECONNECT


# -- error codes: the ``code`` of an HTTP error body and of an error frame ---------------------


class ErrorCode(_Name):
    """Machine-readable codes of refusals (HTTP ``{"error", "code"}`` bodies, error frames).
    Each member is its own string, so it goes into JSON, logs and metric labels as it is.
    Only the codes that more than one module names live here; validation codes
    (``invalid_event``, ``missing_room``...) stay where they are raised."""

    BAD_REQUEST = "bad_request"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    BODY_TOO_LARGE = "body_too_large"
    BATCH_TOO_LARGE = "batch_too_large"
    EMPTY_BATCH = "empty_batch"
    INTERNAL_ERROR = "internal_error"
    QUEUE_FULL = "queue_full"
    BROKER_UNAVAILABLE = "broker_unavailable"
    BUSY = "busy"
    HISTORY_UNAVAILABLE = "history_unavailable"
    TOO_MANY_ROOMS = "too_many_rooms"
    ROOM_FORBIDDEN = "room_forbidden"
    SERVER_FULL = "server_full"
    TOO_MANY_CONNECTIONS = "too_many_connections"
    SHUTTING_DOWN = "shutting_down"
    REBROADCAST_DISABLED = "rebroadcast_disabled"
    ORIGIN_FORBIDDEN = "origin_forbidden"
    INVALID_ORIGIN = "invalid_origin"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    # the ``code`` of the ``unsubscribed`` reply to a POST /unsubscribe (not to the client's
    # own command): the client forgets the room, as after a refresh that lost it
    UNSUBSCRIBED_BY_SERVER = "unsubscribed_by_server"


# Error frames that report the server's state, not a client mistake: they never count towards
# WSSERVER_MAX_INVALID_COMMANDS, and a client retries the command after a backoff.
SERVER_SIDE_ERRORS: frozenset[str] = frozenset(
    {ErrorCode.BUSY, ErrorCode.HISTORY_UNAVAILABLE, ErrorCode.QUEUE_FULL}
)


def js_constants() -> dict:
    """The ``CODES`` object the browser client declares (``static/wsserver.js``), as JSON
    would decode it: what tests/test_codes.py compares the JS file against."""
    return {
        "closeActions": {str(code): str(action) for code, action in sorted(CLOSE_ACTIONS.items())},
        "giveUpReasons": {
            str(code): sorted(reasons) for code, reasons in sorted(GIVE_UP_REASONS.items())
        },
        "closeDisconnected": CLOSE_DISCONNECTED,
        "serverSideErrors": sorted(SERVER_SIDE_ERRORS),
        "subprotocol": SUBPROTOCOL,
        "tokenSubprotocolPrefix": TOKEN_SUBPROTOCOL_PREFIX,
    }
