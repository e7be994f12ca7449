"""Every exception the server raises on purpose, in one tree.

Why one module: a refusal (a request, an upgrade or a command the server will not serve) was
modelled five ways in five modules, and turned into an answer four times over. Now each is a
:class:`Refusal` carrying what its answer needs (``status``, ``code``, ``reason``, ``detail``
and ``headers``), and :func:`wsserver.errors.refusal_answer` is the one function that turns any
of them into an HTTP answer (and the audit line). Pure: no I/O, no Flask, so the sans-I/O
modules (:mod:`wsserver.protocol`, :mod:`wsserver.auth`) raise them too.

The tree::

    Exception
    ├── SettingsError (ValueError)     a setting the server cannot run with (start-up, not a
    │                                  request: the message names the variable)
    └── Refusal(status, code, reason, detail, headers)
        │                              a request, upgrade or command the server refuses
        ├── BadRequest (ValueError)    400/405/413: the HTTP request is wrong (body, method, size)
        ├── HandshakeRefused           400/426: not a WebSocket handshake this server accepts
        │                              (426 carries Sec-WebSocket-Version: 13)
        ├── AccessDenied               401/403 for who or where a request comes from, and the
        │                              upgrade's 400/429/503 (401 carries WWW-Authenticate,
        │                              429/503 Retry-After: 5)
        ├── CommandError (ValueError)  a client command is wrong or cannot run now: answered by
        │   │                          an error frame on /ws (400 where it is answered in HTTP)
        │   └── RoomLimitReached       the connection is in as many rooms as it may join
        ├── HistoryUnavailable         503, Retry-After: 1: history cannot be read now (the
        │                              broker failed, or did not answer within its bound)
        └── PublishRefused             503, Retry-After: 1; nothing was published, except:
            ├── QueueFull              the broadcast queue stayed full for the enqueue timeout
            ├── ShuttingDown           the worker stopped taking messages (it is shutting down)
            └── BrokerUnavailable      the broker cannot take the message (or read history)
                └── BrokerTimedOut     Redis took the publish but did not answer in time: it
                                       may run later (retry with the same idempotency key)

``code`` is machine-readable (:class:`wsserver.codes.ErrorCode` names the shared ones);
``reason`` is for people and safe to show (never a secret, never client input beyond a room
name); ``detail`` is for the audit log only: the setting or rule behind the refusal.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .codes import WEBSOCKET_VERSION, ErrorCode

__all__ = [
    "AccessDenied",
    "BadRequest",
    "BrokerTimedOut",
    "BrokerUnavailable",
    "CommandError",
    "HandshakeRefused",
    "HistoryUnavailable",
    "PublishRefused",
    "QueueFull",
    "Refusal",
    "RoomLimitReached",
    "SettingsError",
    "ShuttingDown",
]

Header = tuple[str, str]


class SettingsError(ValueError):
    """A setting has a value the server cannot run with; the message names it."""


class Refusal(Exception):
    """A request refused with an HTTP ``status``, a machine-readable ``code`` and a ``reason``
    safe to show. ``detail`` is for the audit log only (:func:`wsserver.audit.refused`): the
    setting that made the refusal (``"WSSERVER_MAX_CONNECTIONS_PER_IP=10"``) or the rule it
    applies; it is never client input. ``headers`` are what the answer carries besides the
    body: the ones given (e.g. ``Allow``) and the ones the refusal implies (a subclass says
    which). ``retry_after`` (seconds), when set, is sent as ``Retry-After`` with a 429 or 503.
    ``fields`` are added to the JSON body beside ``error`` and ``code`` (e.g. the subprotocols
    a refused offer could have named).

    Instances are built and raised on one thread; nothing is shared."""

    retry_after: int | None = None

    def __init__(
        self,
        status: int,
        code: str,
        reason: str,
        detail: str = "",
        headers: Iterable[Header] = (),
    ) -> None:
        super().__init__(reason)
        self.status = status
        self.code = code
        self.reason = reason
        self.detail = detail
        self.extra_headers: list[Header] = list(headers)
        self.fields: dict[str, Any] = {}

    @property
    def headers(self) -> list[Header]:
        """Every header of the answer besides the body's: the given ones, then the implied."""
        return self.extra_headers + self.implied_headers()

    def implied_headers(self) -> list[Header]:
        """``Retry-After`` with a 429 or 503 (refused for load: later may work)."""
        if self.retry_after is not None and self.status in (429, 503):
            return [("Retry-After", str(self.retry_after))]
        return []


class BadRequest(Refusal, ValueError):
    """The HTTP request is wrong; ``status`` and ``code`` say how, ``str()`` says why."""


class HandshakeRefused(Refusal):
    """The request is not a WebSocket handshake this server can accept (400, 426)."""

    def implied_headers(self) -> list[Header]:
        """RFC 6455 4.2.2: a 426 names the versions the server speaks."""
        if self.status == 426:
            return [("Sec-WebSocket-Version", WEBSOCKET_VERSION)]
        return []


class AccessDenied(Refusal):
    """A request is refused for who or where it comes from (401/403, and the upgrade's
    400/429/503): ``status``, ``code``, and a reason safe to show."""

    retry_after = 5

    def implied_headers(self) -> list[Header]:
        """The Bearer challenge with a 401; ``Retry-After`` with a 429 or 503."""
        if self.status == 401:
            return [("WWW-Authenticate", 'Bearer realm="wsserver"')]
        return super().implied_headers()


class CommandError(Refusal, ValueError):
    """A client command is wrong, or cannot run now: the client gets an error frame with
    ``code`` and ``reason`` and the connection stays open. Where the same check answers in
    HTTP (``?rooms=`` on the upgrade) it is a 400."""

    def __init__(self, code: str, reason: str, detail: str = "") -> None:
        super().__init__(400, code, reason, detail)


class RoomLimitReached(CommandError):
    """The connection is already in as many rooms as it may join (``limit``, when known)."""

    def __init__(self, room: str, limit: int | None = None) -> None:
        reason = (
            f"a connection may be in at most {limit} rooms"
            if limit is not None
            else "the connection is in as many rooms as it may join"
        )
        detail = f"WSSERVER_MAX_ROOMS_PER_CONNECTION={limit}" if limit is not None else ""
        super().__init__(ErrorCode.TOO_MANY_ROOMS, reason, detail)
        self.room = room
        self.limit = limit


class HistoryUnavailable(Refusal):
    """``GET /rooms/<room>/history`` could not read the room's history now (Redis down or
    hanging, the memory broker's lock held past the read's bound): 503, retry after a
    second. ``detail`` says what failed, for the audit log."""

    retry_after = 1

    def __init__(self, detail: str = "") -> None:
        super().__init__(
            503, ErrorCode.HISTORY_UNAVAILABLE, "history cannot be read now; retry", detail
        )


class PublishRefused(Refusal):
    """Nothing was published, for a reason of the server's (503): retry after a second."""

    retry_after = 1
    CODE: str = ""  # each subclass names its code and its one text
    REASON = ""

    def __init__(self, detail: str = "") -> None:
        super().__init__(503, self.CODE, self.REASON, detail)


class QueueFull(PublishRefused):
    """The broadcast queue stayed full for ``WSSERVER_ENQUEUE_TIMEOUT``: nothing was accepted."""

    CODE = ErrorCode.QUEUE_FULL
    REASON = "the broadcast queue is full; retry shortly"


class ShuttingDown(PublishRefused):
    """The worker is shutting down and its broadcaster has stopped taking messages: nothing
    was accepted. Not ``queue_full``: the queue is not busy, and waiting for it is pointless;
    another worker (or the restarted server) takes the retry."""

    CODE = ErrorCode.SHUTTING_DOWN
    REASON = "the server is shutting down; nothing was published; retry"


class BrokerUnavailable(PublishRefused):
    """The broker cannot take the message now (or read history): nothing was published, unless
    it is a :class:`BrokerTimedOut`. ``cause`` says what failed, for logs
    (``"redis: ConnectionError"``); it is not sent."""

    CODE = ErrorCode.BROKER_UNAVAILABLE
    REASON = "the message broker is unreachable; nothing was published"

    def __init__(self, cause: str = "", detail: str = "WSSERVER_REDIS_URL") -> None:
        super().__init__(detail)
        self.cause = cause


class BrokerTimedOut(BrokerUnavailable):
    """The publish was sent to Redis, which did not answer within its socket timeout: Redis
    may still run it when it wakes (published, live delivery included). Answered 503 like
    any ``broker_unavailable``; a retry with the same idempotency key finds it recorded and
    publishes nothing (docs/protocol.md, "Retries and idempotency keys")."""

    REASON = (
        "the message broker did not answer in time; the notification may have been "
        "published: retry with the same Idempotency-Key"
    )
