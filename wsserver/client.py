"""Python clients for wsserver: :class:`Publisher` (``POST /notify``) and :class:`Subscriber`
(``GET /ws``).

Why a library and not "just use requests": every publisher needs the same four things done
right and they are easy to get subtly wrong: keep one HTTP connection alive instead of a
handshake per notification, wait out a 503 for as long as the server asks (``Retry-After``)
but not forever, retry a connection that dropped, and tell "fix your request" (4xx) apart
from "try again later" (503) with exception types a REST API can branch on. Subscribers need
reconnection with backoff and jitter (so a restarted server is not hit by every client in the
same millisecond), resumption from the last id seen per room, and a clear line between close
codes that mean "reconnect" and those that mean "fix the client".

Both are synchronous and use threads, not asyncio, so they drop into Flask/Django code and
scripts as they are. The wire contract is ``docs/protocol.md``.

Exceptions (all importable from this module)::

    WsserverError                        anything this module raises on purpose
     ├── PublishError(status, code, reason)   POST /notify was not accepted
     │    ├── AuthError                  401 / 403: the API key is missing or wrong
     │    ├── InvalidNotification        400 / 413 / 422: the notification (or batch) is
     │    │                              invalid, or its idempotency key was used for another
     │    └── Unavailable                503 after every retry, or no answer at all
     │                                   (status None, code "unreachable" / "timeout")
     └── SubscriptionError(reason, close_code, status, code, room)
                                         the server refused a subscription for a reason
                                         reconnecting will not fix (or refused one room)

Typical use::

    with Publisher("http://127.0.0.1:8080", api_key=KEY) as pub:
        pub.publish("order.shipped", "Order 7 is on its way", data={"order": 7}, room="orders")

    with Subscriber("ws://127.0.0.1:8080/ws", rooms=["orders"]) as sub:
        for notification in sub.messages(timeout=60):
            print(notification["event"], notification["id"])
"""

from __future__ import annotations

import email.utils
import json
import logging
import queue
import random
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Callable, Union
from urllib.parse import quote, urlsplit, urlunsplit

import requests
import websocket

from .codes import (
    CLOSE_DISCONNECTED,
    SERVER_SIDE_ERRORS,
    SUBPROTOCOL,
    TOKEN_SUBPROTOCOL_PREFIX,
    CloseAction,
    close_action,
)

__all__ = [
    "AuthError",
    "InvalidNotification",
    "Members",
    "PublishError",
    "Publisher",
    "Subscriber",
    "SubscriptionError",
    "Unavailable",
    "WsserverError",
    "http_to_ws_url",
]

log = logging.getLogger("wsserver.client")

DEFAULT_HTTP_URL = "http://127.0.0.1:8080"
DEFAULT_WS_URL = "ws://127.0.0.1:8080/ws"

Notification = dict[str, Any]
Token = Union[str, Callable[[], str], None]  # a runtime alias: Union for Python 3.9


class Members:
    """Who is in a presence room (docs/protocol.md, "Presence"): ``users`` (the tokens'
    ``sub``, sorted) and ``anonymous`` (members without a token, one per connection). A
    snapshot: the :class:`Subscriber` hands out a new one after each change."""

    __slots__ = ("room", "users", "anonymous")

    def __init__(self, room: str, users: Iterable[str] = (), anonymous: int = 0) -> None:
        self.room = room
        self.users: list[str] = sorted(set(users))
        self.anonymous = anonymous

    def applied(self, event: dict) -> Members:
        """The members after a ``presence`` event."""
        user, joined = event.get("user"), event.get("action") == "join"
        users = set(self.users)
        anonymous = self.anonymous
        if user is None:
            anonymous = anonymous + 1 if joined else max(anonymous - 1, 0)
        elif joined:
            users.add(user)
        else:
            users.discard(user)
        return Members(self.room, users, anonymous)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Members):
            return NotImplemented
        return (self.room, self.users, self.anonymous) == (other.room, other.users,
                                                           other.anonymous)

    def __repr__(self) -> str:
        return f"Members({self.room!r}, {self.users!r}, anonymous={self.anonymous})"


# -- errors --------------------------------------------------------------------------------------


class WsserverError(Exception):
    """Base class: ``except WsserverError`` catches every failure this module reports."""


class PublishError(WsserverError):
    """The server did not accept a publish. ``status`` is the HTTP status (None when no
    answer came), ``code`` the server's machine-readable code, ``reason`` its explanation;
    both come from the error body ``{"error": ..., "code": ...}`` so callers can branch on
    ``code`` and log ``reason`` without parsing text."""

    def __init__(self, status: int | None, code: str, reason: str) -> None:
        super().__init__(f"{status if status is not None else 'no answer'} {code}: {reason}")
        self.status = status
        self.code = code
        self.reason = reason


class AuthError(PublishError):
    """401 or 403: the API key is missing, wrong, or publishing is not allowed from here.
    Retrying will not help; fix the configuration."""


class InvalidNotification(PublishError):
    """400 or 413: the notification (or batch) is malformed or too large; 422: its
    idempotency key was used for another notification. Retrying the same body (and key)
    will fail the same way."""


class Unavailable(PublishError):
    """The server could not take the notification now: 503 after every retry (``status``
    503, ``retry_after`` the server's last hint), or no answer at all (``status`` None,
    ``code`` ``"unreachable"``, or ``"timeout"`` when the request was sent but the answer did
    not come in time: then it may or may not have been published). Try again later, with
    ``idempotency_key`` (the key every attempt sent) if it must not be published twice."""

    def __init__(
        self,
        status: int | None,
        code: str,
        reason: str,
        retry_after: float | None = None,
        idempotency_key: str | None = None,
    ) -> None:
        super().__init__(status, code, reason)
        self.retry_after = retry_after
        self.idempotency_key = idempotency_key


class SubscriptionError(WsserverError):
    """The server refused the subscription for a reason reconnecting will not fix.

    Fatal (the subscriber stops; ``room`` is None): a close code that means "fix the client"
    (``close_code`` 1002, 1003, 1007, 1008 "too many invalid commands", 1009, 1010, an
    unknown 4xxx, 4001 with a fixed token: :func:`wsserver.codes.close_action`), a publisher's
    disconnect (4002) with a fixed token, or with a token function that returned the same
    token again (``code`` ``token_spent``), or a refused handshake (``status`` 400, 401, 403,
    404...). Not fatal (``room`` is set, the other rooms
    carry on): the server answered one ``subscribe`` with an error frame
    (``code`` such as ``invalid_room``, ``room_forbidden``, ``too_many_rooms``)."""

    def __init__(
        self,
        reason: str,
        *,
        close_code: int | None = None,
        status: int | None = None,
        code: str | None = None,
        room: str | None = None,
    ) -> None:
        where = (
            f"close {close_code}"
            if close_code is not None
            else f"HTTP {status}"
            if status is not None
            else f"room {room!r}"
            if room is not None
            else "subscription"
        )
        super().__init__(f"{where}{' ' + code if code else ''}: {reason}")
        self.reason = reason
        self.close_code = close_code
        self.status = status
        self.code = code
        self.room = room


# -- helpers -------------------------------------------------------------------------------------


def http_to_ws_url(url: str) -> str:
    """The WebSocket URL of a server given by its HTTP base URL: http→ws, https→wss, path
    ``<base path>/ws``. A ws:// or wss:// URL is returned unchanged. Why: users configure one
    server URL; the CLI and apps derive both endpoints from it (a base path behind a reverse
    proxy, ``https://host/notify-svc``, is kept)."""
    parts = urlsplit(url)
    if parts.scheme in ("ws", "wss"):
        return url
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"expected an http://, https://, ws:// or wss:// URL, got {url!r}")
    scheme = "wss" if parts.scheme == "https" else "ws"
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + "/ws", parts.query, ""))


def _backoff(attempt: int, initial: float, maximum: float) -> float:
    """Exponential backoff with full jitter (uniform in [0, min(max, initial * 2**attempt)]):
    after a restart, thousands of clients spread their reconnects instead of arriving together."""
    return random.uniform(0.0, min(maximum, initial * (2 ** min(attempt, 32))))


def _connection_failure(exc: BaseException) -> str:
    """Why a connection could not be made, in a few words ("connection refused"): the
    operating system's reason, found under the layers requests and urllib3 wrap it in."""
    seen: set[int] = set()
    stack: list[Any] = [exc]
    while stack:
        err = stack.pop()
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        if isinstance(err, socket.gaierror):
            return f"the host name does not resolve ({err.strerror or err})"
        if isinstance(err, socket.timeout):
            return "timed out connecting"
        if isinstance(err, OSError) and err.errno:
            return (err.strerror or str(err)).lower()
        stack.extend([err.__cause__, err.__context__, getattr(err, "reason", None)])
        stack.extend(a for a in getattr(err, "args", ()) if isinstance(a, BaseException))
    return str(exc) or exc.__class__.__name__


def _retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date); None if absent
    or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(when.timestamp() - time.time(), 0.0)


def _error_body(resp: requests.Response) -> tuple[str, str]:
    """(code, reason) from an error answer; falls back to the status when the body is not
    the server's JSON (a proxy's HTML page, say)."""
    try:
        body = resp.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("code"), str):
        return body["code"], str(body.get("error") or resp.reason or "")
    text = (resp.text or "").strip()
    return f"http_{resp.status_code}", (text[:200] or resp.reason or "")


# -- Publisher -----------------------------------------------------------------------------------


class Publisher:
    """Publishes notifications with ``POST /notify`` over one kept-alive HTTP connection.

    Retries: a 503 (queue full, broker unavailable) is retried after the server's
    ``Retry-After`` (capped at ``max_retry_wait`` seconds); a connection that could not be
    made or dropped is retried after an exponential backoff with jitter. At most ``retries``
    retries per call, so a call takes bounded time. 4xx answers are never retried.

    Exactly once: every call sends an ``Idempotency-Key`` (a new uuid4, or the
    ``idempotency_key`` given) and every retry of that call sends the same one, so a 503
    whose notification was published after all (Redis answered late), or a dropped
    connection, is answered on retry with the first ids and nothing is published twice
    (within ``WSSERVER_HISTORY_TTL``). A batch's items get ``<key>/<index>``. An answer
    with ``"repeated": true`` is such a retry.

    Thread-safety: the usual requests practice applies: one Publisher shared by threads works
    (the connection pool is thread-safe and no cookies are used), one per thread is stricter.
    """

    def __init__(
        self,
        url: str = DEFAULT_HTTP_URL,
        api_key: str | None = None,
        timeout: float = 5,
        retries: int = 5,
        *,
        max_retry_wait: float = 30.0,
        backoff_initial: float = 0.2,
        backoff_max: float = 5.0,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"expected an http:// or https:// URL, got {url!r}")
        if retries < 0:
            raise ValueError("retries must be 0 or more")
        self.url = url.rstrip("/")
        self.notify_url = self.url + "/notify"
        self.timeout = timeout
        self.retries = retries
        self.max_retry_wait = max_retry_wait
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self._closed = threading.Event()
        self._session = requests.Session()
        self._session.headers.update(
            {"Content-Type": "application/json", "Accept": "application/json"}
        )
        if api_key:
            self._session.headers["Authorization"] = f"Bearer {api_key}"

    def publish(
        self,
        event: str,
        message: str | None = None,
        data: Any = None,
        room: str | None = None,
        rooms: Iterable[str] | None = None,
        user: str | None = None,
        idempotency_key: str | None = None,
    ) -> dict:
        """Publish one notification; returns the server's answer
        (``{"status": "ok", "id": "42", "clients": 3}``, plus ``ids`` per room).

        ``idempotency_key``: give your own (up to 200 visible ASCII characters) to make a
        publish you repeat later, e.g. after this call raised, a no-op; by default each call
        gets a fresh uuid4, which only its own retries share.

        ``room``/``rooms`` target rooms, ``user`` one user's connections; none of them:
        everybody. The server validates (``room`` and ``rooms`` together is a 400), so the
        rules live in one place. ``data`` must be JSON-serialisable (TypeError otherwise,
        before anything is sent)."""
        body: dict[str, Any] = {"event": event}
        if message is not None:
            body["message"] = message
        if data is not None:
            body["data"] = data
        if room is not None:
            body["room"] = room
        if rooms is not None:
            if isinstance(rooms, str):
                raise TypeError("rooms is a list of room names; use room= for one room")
            body["rooms"] = list(rooms)
        if user is not None:
            body["user"] = user
        return self.publish_body(body, idempotency_key)

    def publish_batch(
        self, notifications: Iterable[Mapping[str, Any]], idempotency_key: str | None = None
    ) -> dict:
        """Publish several notifications in one request (the server's limit is
        ``WSSERVER_MAX_BATCH``, 100 by default). Returns the per-item answer
        (``status`` ``ok``/``partial``/``error``, ``accepted``, ``results``): items are
        validated one by one, so check ``status``; only a batch of which nothing could be
        queued is a 503 (retried like any 503; a retry publishes only the items that were
        not published before)."""
        items = [dict(n) for n in notifications]
        return self.publish_body(items, idempotency_key)

    # -- the server API (docs/protocol.md, "The server API") ---------------------------------

    def disconnect(self, user: str) -> dict:
        """Close every connection of ``user`` (a token's ``sub``), on every worker, with close
        4002: clients stop, or reconnect only with a fresh token. Returns the server's answer
        (``{"status": "ok", "closed": 2, "workers": 2, "unanswered": 0}``); ``closed`` counts
        the connections of the workers that answered within the server's wait. Safe to repeat
        (a 503 is retried like a publish)."""
        return self._call("POST", "/disconnect", {"user": user})

    def unsubscribe(self, user: str, room: str) -> dict:
        """Take every connection of ``user`` out of ``room``, on every worker; each gets an
        ``unsubscribed`` reply with ``code`` ``unsubscribed_by_server`` and does not rejoin
        on reconnect. Returns ``{"status": "ok", "unsubscribed": N, ...}``. Not a ban: a
        client may subscribe again (private rooms and tokens decide who may)."""
        return self._call("POST", "/unsubscribe", {"user": user, "room": room})

    def history(self, room: str, since: str | None = None, limit: int | None = None) -> dict:
        """``GET /rooms/<room>/history``: ``{"room", "messages", "complete", "more"}``, the
        envelopes oldest first. Without ``since`` the newest ``limit`` kept (server default
        100, at most 1000); with it the oldest ``limit`` after that id, ``complete`` False
        when some after it may be gone, ``more`` True when more follow (ask again with the
        last id)."""
        params: dict[str, Any] = {}
        if since is not None:
            params["since"] = since
        if limit is not None:
            params["limit"] = str(limit)
        return self._call("GET", "/rooms/" + quote(room, safe="/") + "/history", None, params)

    def _call(
        self, method: str, path: str, body: Any, params: dict[str, Any] | None = None
    ) -> dict:
        """One server-API request, retried as a publish is (503, connection errors)."""
        payload = None if body is None else json.dumps(body, ensure_ascii=False).encode("utf-8")
        return self._post(payload, None, method, self.url + path, params)

    def publish_body(self, body: Any, idempotency_key: str | None = None) -> dict:
        """POST an already-built body (an object or a list) as-is, with an
        ``Idempotency-Key`` (``idempotency_key``, else a new uuid4) kept across retries.
        Used by the CLI for JSON read from stdin; fields the server does not know are
        passed through."""
        payload = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        return self._post(payload, idempotency_key or str(uuid.uuid4()))

    def _post(
        self,
        payload: bytes | None,
        key: str | None,
        method: str = "POST",
        url: str | None = None,
        params: dict[str, Any] | None = None,
    ) -> dict:
        """Send (POST /notify by default, with ``key`` as its ``Idempotency-Key``) and retry
        503s and connection failures; the answer, or an exception."""
        headers = {"Idempotency-Key": key} if key is not None else {}
        attempts = self.retries + 1
        for attempt in range(attempts):
            last = attempt + 1 == attempts
            if self._closed.is_set():
                raise WsserverError("the publisher is closed")
            try:
                resp = self._session.request(
                    method,
                    url or self.notify_url,
                    data=payload,
                    headers=headers,
                    params=params,
                    timeout=self.timeout,
                )
            except requests.exceptions.SSLError as exc:  # configuration: retrying cannot help
                raise PublishError(None, "tls_error", str(exc)) from exc
            except requests.exceptions.ConnectionError as exc:  # also ConnectTimeout
                if last:
                    tries = f" ({attempts} attempts)" if attempts > 1 else ""
                    raise Unavailable(
                        None,
                        "unreachable",
                        f"cannot reach {self.url}: {_connection_failure(exc)}{tries}",
                        idempotency_key=key,
                    ) from exc
                self._wait(_backoff(attempt, self.backoff_initial, self.backoff_max))
                continue
            except requests.exceptions.Timeout as exc:
                # sent, but no answer: it may have been published; the key makes a retry safe
                if last:
                    raise Unavailable(
                        None,
                        "timeout",
                        f"no answer within {self.timeout}s; the notification may have been "
                        "published: retry with the same idempotency_key",
                        idempotency_key=key,
                    ) from exc
                self._wait(_backoff(attempt, self.backoff_initial, self.backoff_max))
                continue
            answer = self._answer(resp, attempt, last, key)
            if answer is not None:
                return answer
        raise AssertionError("not reached")  # pragma: no cover

    def _answer(
        self, resp: requests.Response, attempt: int, last: bool, key: str | None
    ) -> dict | None:
        """The server's answer (2xx), or None after waiting out a 503 to retry; raises for
        every other answer and for the last 503."""
        status = resp.status_code
        if 200 <= status < 300:
            try:
                answer = resp.json()
            except ValueError:
                raise PublishError(status, "invalid_response", "the answer is not JSON") from None
            return answer if isinstance(answer, dict) else {"result": answer}
        code, reason = _error_body(resp)
        if status == 503:
            hint = _retry_after(resp.headers.get("Retry-After"))
            if last:
                raise Unavailable(status, code, reason, hint, idempotency_key=key)
            if hint is None:
                wait = _backoff(attempt, self.backoff_initial, self.backoff_max)
            else:
                wait = min(hint, self.max_retry_wait)
            log.debug("503 %s; retrying in %.2fs", code, wait)
            self._wait(wait)
            return None
        if status in (401, 403):
            raise AuthError(status, code, reason)
        if status in (400, 413, 422):
            raise InvalidNotification(status, code, reason)
        raise PublishError(status, code, reason)

    def _wait(self, seconds: float) -> None:
        if self._closed.wait(seconds):
            raise WsserverError("the publisher was closed while waiting to retry")

    def close(self) -> None:
        """Close the kept-alive connection (idempotent); a retry wait in progress ends."""
        self._closed.set()
        self._session.close()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- Subscriber ----------------------------------------------------------------------------------

# HTTP statuses of a refused handshake worth retrying (with Retry-After when given)
_RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})

_STOPPED = object()  # end-of-stream marker in the message queue


def _should_reconnect(code: int, reason: str, renewable_token: bool) -> bool:
    """Whether a close with ``code``/``reason`` is worth a reconnect: the protocol's table
    (:func:`wsserver.codes.close_action`, shared with the server and the JS client), where
    "reconnect after a new token" (4001) holds only when ``token`` is a callable."""
    action = close_action(code, reason)
    if action is CloseAction.NEW_TOKEN:
        return renewable_token
    return action is CloseAction.RECONNECT


class _Retry(Exception):
    """Internal: this connection attempt failed in a way worth retrying (after ``delay``)."""

    def __init__(self, why: str, delay: float | None = None) -> None:
        super().__init__(why)
        self.delay = delay


class Subscriber:
    """A WebSocket subscription that survives disconnects and resumes where it left off.

    It connects, sends ``subscribe`` for each room (with ``since`` = the last id seen in that
    room once it has one), and remembers the last ``id`` per room (key ``None`` for
    notifications sent to everybody or to a user). On any disconnect it reconnects after an
    exponential backoff with full jitter and subscribes again with ``since``, so a server
    that keeps history can replay what was missed; one that cannot answers
    ``"recovered": false``, which is reported to ``on_gap(room, info)`` and kept in
    :attr:`gaps`: ``info`` is the server's reply with ``"since"`` (the id sent) and
    ``"missed": None`` (unknown: none or many may be lost; the server's ``0`` there says
    nothing). Every resume, recovered or not, is kept in :attr:`resumes` as (room, info); a
    recovered one has ``"recovered": True`` and ``"missed"`` = the number replayed (0: nothing
    was lost). Room-less notifications have no resume: after a reconnect, ``on_gap(None,
    {"type": "reconnected", "room": None, "recovered": False, "missed": None, "since": id})``
    says some may have been missed. Close codes that mean "fix the client" (1002, 1007,
    1008 "too many invalid commands", 1009, 4001 with a fixed token; the table is
    :data:`wsserver.codes.CLOSE_ACTIONS`), a publisher's disconnect (4002: never again with
    the same token; a token function is asked for another) and refused handshakes
    (401, 403, ...) stop it with a :class:`SubscriptionError` (:attr:`error`, ``on_error``,
    and raised by :meth:`messages`).

    Two ways to consume, both fed by one background thread named ``wsserver-subscriber``:

    * callbacks: ``on_message(notification)`` runs on that thread (keep it quick: while it
      runs nothing is read, and a client that falls a buffer behind is dropped by the server
      as a slow consumer, then reconnects and reports the gap);
    * iteration (when ``on_message`` is None): ``for n in subscriber`` or
      ``subscriber.messages(timeout=...)``; notifications are queued (at most ``max_pending``,
      then reading pauses, which is the same back-pressure).

    Other callbacks, all on the background thread: ``on_state(state)`` with ``"connecting"``,
    ``"open"`` (handshake done), ``"ready"`` (every subscribe answered), ``"closed"``
    (connection ended; a reconnect follows unless stopped), ``"stopped"`` (for good);
    ``on_error(SubscriptionError)``. An exception in a callback is logged, never fatal.

    ``token`` (a string, or a callable returning a fresh one at every connect, which also
    makes an expired-token close 4001 reconnectable) is sent in the subprotocol offer
    (``Sec-WebSocket-Protocol: wsserver.v1, wsserver.token.<token>``, as the browser client
    does) rather than as ``?token=``, so it stays out of access logs; the server selects
    ``wsserver.v1`` and never echoes the token. The offer names ``wsserver.v1`` with or
    without a token, and the handshake fails unless the server selects it. No Origin header
    is sent: this is not a browser.

    A room the server takes away (``unsubscribed`` with a ``code``, e.g. after a ``refresh``
    whose token no longer grants it) is dropped from :attr:`rooms` and reported to
    ``on_error`` as a :class:`SubscriptionError` with that code and room.

    Presence rooms (``presence-*``): :meth:`members` is who is in the room now (a
    :class:`Members`), set by the ``subscribed`` reply, which lists them, and kept by the
    ``presence`` events after it; ``on_presence(event, members)`` runs (on the background
    thread) for that reply (``event["type"]`` is ``"subscribed"``) and for each event
    (``"presence"``, with ``action`` ``join`` or ``leave`` and ``user``), ``members`` being
    the list after it. Each reconnect's reply replaces the list.
    """

    # the current connection's token, and the token of a connection a publisher disconnected
    # (4002), never offered again: set by the subscriber's thread only
    _token_used: str | None = None
    _spent_token: str | None = None

    def __init__(
        self,
        url: str = DEFAULT_WS_URL,
        rooms: Iterable[str] = (),
        token: Token = None,
        since: Mapping[str, str] | str | None = None,
        on_message: Callable[[Notification], Any] | None = None,
        backoff_initial: float = 0.5,
        backoff_max: float = 30,
        *,
        on_gap: Callable[[str | None, dict], Any] | None = None,
        on_state: Callable[[str], Any] | None = None,
        on_error: Callable[[SubscriptionError], Any] | None = None,
        on_presence: Callable[[dict, Members], Any] | None = None,
        connect_timeout: float = 10.0,
        keepalive: float = 30.0,
        max_pending: int = 10_000,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("ws", "wss") or not parts.netloc:
            raise ValueError(f"expected a ws:// or wss:// URL, got {url!r} (see http_to_ws_url)")
        if isinstance(rooms, str):
            raise TypeError("rooms is a list of room names, not a string")
        self.url = url
        self._rooms: list[str] = list(dict.fromkeys(rooms))
        self._last_ids: dict[str | None, str] = {}
        if isinstance(since, str):
            if len(self._rooms) != 1:
                raise ValueError("since as a string needs exactly one room; pass a dict room->id")
            self._last_ids[self._rooms[0]] = since
        elif since is not None:
            self._last_ids.update({room: str(i) for room, i in since.items()})
        self.token = token
        self.on_message, self.on_gap, self.on_state = on_message, on_gap, on_state
        self.on_error, self.on_presence = on_error, on_presence
        self._members: dict[str, Members] = {}  # presence rooms; the background thread's
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.connect_timeout = connect_timeout
        self.keepalive = keepalive
        self.state = "new"
        self.error: SubscriptionError | None = None
        self.last_close: tuple[int, str] | None = None  # (code, reason) of the last close seen
        self.resumes: deque[tuple[str | None, dict]] = deque(maxlen=100)
        self.gaps: deque[tuple[str | None, dict]] = deque(maxlen=100)
        self.connects = 0  # successful handshakes so far
        self.last_failure: str | None = None  # why the last connection attempt or connection ended

        # guards _ws, _rooms, _last_ids, _outbox, _inflight, _retrying
        self._lock = threading.Lock()
        self._ws: websocket.WebSocket | None = None
        self._outbox: deque[tuple[str, str]] = deque()  # (command, room) not sent yet
        self._inflight: deque[tuple[str, str, bool]] = deque()  # (command, room, since?) sent
        self._retrying: dict[str, int] = {}  # room -> attempts, while a retry timer runs
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max_pending)
        self._stopping = threading.Event()
        self._ready = threading.Event()
        self._done = threading.Event()
        self._healthy = False  # this connection got as far as "ready"
        self._thread: threading.Thread | None = None

    # -- public API ------------------------------------------------------------------------

    @property
    def rooms(self) -> list[str]:
        with self._lock:
            return list(self._rooms)

    def members(self, room: str) -> Members | None:
        """Who is in presence room ``room`` as this subscriber last heard (None: not a
        presence room, or not joined yet)."""
        return self._members.get(room)

    @property
    def last_ids(self) -> dict[str | None, str]:
        """The last id seen per room (``None``: room-less), a copy: pass it as ``since`` to a
        new Subscriber to resume after a process restart."""
        with self._lock:
            return dict(self._last_ids)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> Subscriber:
        """Start the background thread (idempotent while running). Returns self."""
        with self._lock:
            if self._done.is_set() or (self._thread is None and self._stopping.is_set()):
                raise RuntimeError("a stopped Subscriber cannot be restarted; make a new one")
            if self._thread is not None:
                return self
            self._thread = threading.Thread(
                target=self._run, name="wsserver-subscriber", daemon=True
            )
            self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> bool:
        """Close the connection (1000) and end the thread, waiting at most ``timeout``
        seconds. Idempotent; safe from any thread, including a callback. True if the thread
        has ended."""
        self._stopping.set()
        with self._lock:
            ws, thread = self._ws, self._thread
        if ws is not None:
            try:
                if ws.connected:
                    ws.send_close(1000, b"client stopping")
            except (OSError, websocket.WebSocketException):
                self._abort(ws)  # already broken: cut it so the reader wakes up
        if thread is None:
            self._finish()
            return True
        if thread is threading.current_thread():
            return False  # called from a callback: the thread ends when the callback returns
        deadline = time.monotonic() + timeout
        # a healthy server answers a close in milliseconds; do not let a slow one hold us
        thread.join(min(timeout / 2, 1.0))
        if thread.is_alive() and ws is not None:
            self._abort(ws)  # no close reply in time: cut the socket to wake the reader
        thread.join(max(deadline - time.monotonic(), 0.0))
        return not thread.is_alive()

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until connected and every subscribe has been answered (True), or until
        ``timeout`` or the subscriber stopped for good (False). Publish after this to be sure
        the notification is delivered."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._ready.is_set():
                return True
            if self._done.is_set():
                return False
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            self._ready.wait(0.05 if left is None else min(left, 0.05))

    def subscribe(self, room: str, since: str | None = None) -> None:
        """Join ``room`` now (if connected) and on every reconnect."""
        with self._lock:
            if since is not None:
                self._last_ids[room] = since
            if room not in self._rooms:
                self._rooms.append(room)
            if self._ws is not None and self._ws.connected:
                self._outbox.append(("subscribe", room))
                self._pump_locked(self._ws)

    def unsubscribe(self, room: str) -> None:
        """Leave ``room`` now and stop joining it on reconnect."""
        with self._lock:
            if room in self._rooms:
                self._rooms.remove(room)
            self._retrying.pop(room, None)
            if self._ws is not None and self._ws.connected:
                self._outbox.append(("unsubscribe", room))
                self._pump_locked(self._ws)

    def messages(self, timeout: float | None = None) -> Iterator[Notification]:
        """Iterate over notifications (starting the subscriber if needed) for at most
        ``timeout`` seconds in total (None: until :meth:`stop`). Raises the
        :class:`SubscriptionError` that stopped the subscriber, after the ones queued before
        it. Only when there is no ``on_message`` callback."""
        if self.on_message is not None:
            raise RuntimeError("messages() is for subscribers without an on_message callback")
        if self._thread is None and not self._stopping.is_set():
            self.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return
            try:
                item = self._queue.get(timeout=0.2 if left is None else min(left, 0.2))
            except queue.Empty:
                if self._done.is_set() and self._queue.empty():
                    item = _STOPPED
                else:
                    continue
            if item is _STOPPED:
                if self.error is not None:
                    raise self.error
                return
            yield item

    def __iter__(self) -> Iterator[Notification]:
        return self.messages()

    def __enter__(self) -> Subscriber:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the background thread -------------------------------------------------------------

    def _run(self) -> None:
        attempt = 0
        try:
            while not self._stopping.is_set():
                self._set_state("connecting")
                hint: float | None = None
                self._healthy = False
                try:
                    ws = self._connect()
                    self._session(ws, reconnect=self.connects > 1)
                except _Retry as retry:
                    log.info("wsserver subscriber: %s", retry)
                    self.last_failure = str(retry)
                    hint = retry.delay
                except SubscriptionError as fatal:
                    self._fail(fatal)
                    return
                finally:
                    with self._lock:
                        current, self._ws = self._ws, None
                    if current is not None:
                        self._abort(current)
                        current.shutdown()
                    self._ready.clear()
                    if self.state not in ("connecting",):
                        self._set_state("closed")
                if self._stopping.is_set():
                    return
                # a connection that got subscribed starts the backoff again; one refused or
                # closed before that (1013, say) keeps growing it
                attempt = 0 if self._healthy else attempt + 1
                delay = _backoff(attempt, self.backoff_initial, self.backoff_max)
                if hint is not None:
                    delay = max(delay, min(hint, self.backoff_max))
                if self._stopping.wait(delay):
                    return
        except Exception:
            log.exception("wsserver subscriber thread failed")
            self._fail(SubscriptionError("internal error in the subscriber (see the log)"))
        finally:
            self._finish()

    def _connect(self) -> websocket.WebSocket:
        """One handshake. Raises _Retry (transient) or SubscriptionError (fatal)."""
        token: str | None
        if callable(self.token):
            try:
                token = self.token()
            except Exception as exc:  # noqa: BLE001 - the token service may be down: retry
                raise _Retry(f"the token callable failed: {exc!r}") from None
        else:
            token = self.token
        if token is not None and token == self._spent_token:
            closed_with = self.last_close[0] if self.last_close else None
            raise SubscriptionError(
                "the token function returned the token the server closed this subscription "
                "for; the server said not to reconnect with it",
                close_code=closed_with,
                code="token_spent",
            )
        self._token_used = token
        offer = [SUBPROTOCOL] + ([TOKEN_SUBPROTOCOL_PREFIX + token] if token else [])
        ws = websocket.WebSocket(enable_multithread=True)
        with self._lock:
            self._ws = ws
        if self._stopping.is_set():
            raise _Retry("stopping")
        try:
            ws.connect(
                self.url, timeout=self.connect_timeout, subprotocols=offer, suppress_origin=True
            )
        except websocket.WebSocketBadStatusException as exc:
            status = exc.status_code
            code, reason = self._refusal(exc)
            if status in _RETRY_STATUSES or (status == 401 and callable(self.token)):
                headers_in = {k.lower(): v for k, v in (exc.resp_headers or {}).items()}
                raise _Retry(
                    f"handshake refused with {status} {code}: {reason}",
                    _retry_after(headers_in.get("retry-after")),
                ) from None
            raise SubscriptionError(reason, status=status, code=code) from None
        except (OSError, websocket.WebSocketException) as exc:
            # websocket-client names the whole offer when the server selects no subprotocol
            # of it (a server older than wsserver.v1): the token must not reach a log line
            text = str(exc).replace(token, "<token>") if token else str(exc)
            raise _Retry(f"cannot connect to {self.url}: {text}") from None
        self.connects += 1
        return ws

    @staticmethod
    def _refusal(exc: websocket.WebSocketBadStatusException) -> tuple[str | None, str]:
        try:
            body = json.loads(exc.resp_body or b"")
        except ValueError:
            body = None
        if isinstance(body, dict) and "error" in body:
            return body.get("code"), str(body["error"])
        return None, f"HTTP {exc.status_code} {exc.status_message or ''}".strip()

    def _session(self, ws: websocket.WebSocket, reconnect: bool) -> None:
        """Serve one connection until it ends: raises _Retry or SubscriptionError for how
        it ended; returns only when stopping."""
        ws.settimeout(self.keepalive)
        self._set_state("open")
        with self._lock:
            self._inflight.clear()
            self._retrying.clear()
            self._outbox = deque(("subscribe", room) for room in self._rooms)
            self._pump_locked(ws)
            no_resume = self._last_ids.get(None) if reconnect else None
        if no_resume is not None:
            self._gap(
                None,
                {
                    "type": "reconnected",
                    "room": None,
                    "recovered": False,
                    "missed": None,
                    "since": no_resume,
                },
            )
        self._check_ready()
        ping_out = False
        while True:
            try:
                opcode, frame = ws.recv_data_frame(control_frame=True)
            except websocket.WebSocketTimeoutException:
                if self._stopping.is_set():
                    return
                if ping_out:
                    raise _Retry(f"no sign of life for {2 * self.keepalive:.0f}s") from None
                ping_out = True
                try:
                    ws.ping()
                except (OSError, websocket.WebSocketException):
                    pass  # the next read reports it
                continue
            except (OSError, websocket.WebSocketException) as exc:
                if self._stopping.is_set():
                    return
                self.last_close = (1006, str(exc) or exc.__class__.__name__)
                raise _Retry(f"connection lost: {exc or exc.__class__.__name__}") from None
            ping_out = False
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                self._closed_by_server(frame.data)
                return  # only when stopping (otherwise _closed_by_server raised)
            if opcode == websocket.ABNF.OPCODE_TEXT:
                self._on_text(frame.data)
                self._check_ready()
            # binary frames are other clients' rebroadcasts; pings/pongs are handled by the library

    def _closed_by_server(self, data: bytes) -> None:
        code = int.from_bytes(data[:2], "big") if len(data) >= 2 else 1005
        reason = data[2:].decode("utf-8", "replace")
        self.last_close = (code, reason)
        if self._stopping.is_set():
            return
        if code == CLOSE_DISCONNECTED:  # a publisher's disconnect: never again with this token
            self._spent_token = self._token_used
            log.warning("wsserver subscriber: disconnected by the server (%d %s)", code, reason)
        if _should_reconnect(code, reason, callable(self.token)):
            raise _Retry(f"closed by the server: {code} {reason}".rstrip())
        raise SubscriptionError(reason or "closed by the server", close_code=code)

    def _on_text(self, data: bytes) -> None:
        try:
            obj = json.loads(data)
        except ValueError:
            return  # another client's free-form message (development rebroadcast)
        if not isinstance(obj, dict):
            return
        if "event" in obj and "id" in obj:
            self._on_notification(obj)
        elif "type" in obj:
            self._on_reply(obj)

    def _on_notification(self, n: Notification) -> None:
        # ids are opaque (docs/protocol.md: "<boot ms>-<n>" in memory, stream ids with Redis):
        # the last one is kept to be sent back as ``since``; gaps are the server's to report
        room, msg_id = n.get("room"), n.get("id")
        if isinstance(msg_id, str):
            with self._lock:
                self._last_ids[room] = msg_id
        if self.on_message is not None:
            self._call(self.on_message, n)
            return
        while not self._stopping.is_set():
            try:
                self._queue.put(n, timeout=0.2)
                return
            except queue.Full:
                continue  # back-pressure: stop reading until the consumer catches up

    def _on_presence(self, reply: dict) -> None:
        """A presence room's ``subscribed`` reply (the member list) or a ``presence`` event
        (applied to it; one before the room's reply is already counted in it)."""
        room = reply.get("room")
        if not isinstance(room, str):
            return
        if reply.get("type") == "subscribed":
            users = [u for u in reply.get("users") or () if isinstance(u, str)]
            anonymous = reply.get("anonymous")
            members = Members(room, users, anonymous if isinstance(anonymous, int) else 0)
        else:
            current = self._members.get(room)
            if current is None:
                return
            members = current.applied(reply)
        self._members[room] = members
        if self.on_presence is not None:
            self._call(self.on_presence, reply, members)

    def _on_reply(self, reply: dict) -> None:
        kind = reply.get("type")
        if kind == "presence" or (kind == "subscribed" and "users" in reply):
            self._on_presence(reply)
        elif kind == "unsubscribed":
            self._members.pop(str(reply.get("room")), None)
        if kind not in ("subscribed", "unsubscribed", "error"):
            return  # pong, refreshed, presence, future replies
        if kind == "unsubscribed" and "code" in reply:
            self._taken_away(reply)
            return
        room = reply.get("room")
        with self._lock:
            since = self._last_ids.get(room) if isinstance(room, str) else None
            # replies come in command order (see _pump_locked), so the oldest in-flight
            # command is the one answered; error frames carry no room, hence the order
            command = self._inflight.popleft() if self._inflight else None
            if command is not None and kind != "error" and command[1] != room:
                log.debug("wsserver subscriber: reply %r while %r was expected", reply, command)
            failed = command[1] if (kind == "error" and command is not None) else None
            transient = kind == "error" and reply.get("code") in SERVER_SIDE_ERRORS
            if failed is not None and command is not None and command[0] == "subscribe":
                if transient and failed in self._rooms:
                    self._retry_subscribe_locked(failed)
                elif failed in self._rooms:
                    self._rooms.remove(failed)  # would fail the same way on every reconnect
            if kind == "subscribed" and isinstance(room, str):
                self._retrying.pop(room, None)
            ws = self._ws
            if ws is not None:
                self._pump_locked(ws)
        if kind == "subscribed" and "recovered" in reply:
            self._resumed(room, since, reply)
        elif kind == "error" and not transient:
            err = SubscriptionError(
                str(reply.get("reason", "")), code=reply.get("code"), room=failed or "?"
            )
            log.warning("wsserver subscriber: %s", err)
            if self.on_error is not None:
                self._call(self.on_error, err)

    def _taken_away(self, reply: dict) -> None:
        """The server left a room on its own: ``unsubscribed`` with a ``code`` (a refreshed
        token no longer grants it, docs/protocol.md). It answers no command of ours, so no
        in-flight command is popped; the room is forgotten, so no reconnect asks for it."""
        room = reply.get("room")
        with self._lock:
            if room in self._rooms:
                self._rooms.remove(room)
            self._last_ids.pop(room, None)
        err = SubscriptionError(
            str(reply.get("reason", "")), code=str(reply.get("code")), room=str(room)
        )
        log.warning("wsserver subscriber: %s", err)
        if self.on_error is not None:
            self._call(self.on_error, err)

    def _pump_locked(self, ws: websocket.WebSocket) -> None:
        """Send what the outbox holds, keeping replies attributable (holds ``_lock``).

        Replies to plain commands come back in the order sent, but a ``subscribe`` with
        ``since`` is answered later, from the server's broadcaster (after reading history),
        and error frames do not say which command they answer. So a ``since`` subscribe is
        sent only when nothing else is in flight, and nothing else is sent while it is: at
        any time the oldest in-flight command is the one the next reply answers. Costs one
        round trip per resumed room on reconnect."""
        while self._outbox and not self._stopping.is_set():
            kind, room = self._outbox[0]
            since = self._last_ids.get(room) if kind == "subscribe" else None
            if self._inflight and (since is not None or self._inflight[-1][2]):
                return
            self._outbox.popleft()
            command: dict[str, Any] = {"type": kind, "room": room}
            if since is not None:
                command["since"] = since
            self._inflight.append((kind, room, since is not None))
            try:
                ws.send(json.dumps(command))
            except (OSError, websocket.WebSocketException):
                return  # the reader sees the broken connection and reconnects

    def _retry_subscribe_locked(self, room: str) -> None:
        """The server was busy (or its history store down): subscribe again after a backoff,
        on this connection if it is still the current one."""
        attempt = self._retrying.get(room, 0)
        self._retrying[room] = attempt + 1
        ws = self._ws
        delay = max(0.05, _backoff(attempt, self.backoff_initial, self.backoff_max))

        def again() -> None:
            with self._lock:
                if self._ws is ws and ws is not None and ws.connected and room in self._retrying:
                    self._outbox.append(("subscribe", room))
                    self._pump_locked(ws)

        timer = threading.Timer(delay, again)
        timer.name, timer.daemon = "wsserver-subscriber-retry", True
        timer.start()

    def _check_ready(self) -> bool:
        with self._lock:
            ready = not (self._outbox or self._inflight or self._retrying)
        if ready and not self._ready.is_set():
            self._healthy = True
            self._ready.set()
            self._set_state("ready")
        return ready

    # -- plumbing --------------------------------------------------------------------------

    def _resumed(self, room: str | None, since: str | None, reply: dict) -> None:
        """A resume answered: kept in :attr:`resumes`; a gap when history could not vouch.
        The server says ``"missed": 0`` with ``"recovered": false`` (docs/protocol.md), but
        then nothing is known of what was missed, none or many: reported as ``None``."""
        recovered = reply.get("recovered") is True
        missed = reply.get("missed") if recovered else None
        info = {**reply, "since": since, "missed": missed}
        self.resumes.append((room, info))
        if not recovered:
            self._gap(room, info)

    def _gap(self, room: str | None, info: dict) -> None:
        self.gaps.append((room, info))
        log.info(
            "wsserver subscriber: possible gap in %s: %s",
            "the room-less stream" if room is None else f"room {room!r}",
            info,
        )
        if self.on_gap is not None:
            self._call(self.on_gap, room, info)

    def _set_state(self, state: str) -> None:
        self.state = state
        if self.on_state is not None:
            self._call(self.on_state, state)

    def _fail(self, error: SubscriptionError) -> None:
        self.error = error
        log.error("wsserver subscriber stopped: %s", error)
        if self.on_error is not None:
            self._call(self.on_error, error)

    def _finish(self) -> None:
        if self._done.is_set():
            return
        self._done.set()
        self._stopping.set()
        self._set_state("stopped")
        try:
            self._queue.put_nowait(_STOPPED)  # wakes an iterator at once
        except queue.Full:
            pass  # an iterator notices _done when it has drained the queue

    @staticmethod
    def _abort(ws: websocket.WebSocket) -> None:
        sock = ws.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    @staticmethod
    def _call(fn: Callable[..., Any], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:
            log.exception("wsserver subscriber: callback %r failed", fn)
