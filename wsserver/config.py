"""Settings: one frozen object built from defaults, then ``WSSERVER_*`` environment
variables, then explicit overrides (command-line flags, test fixtures).

Why one table: the same settings are read by the gunicorn config module (bind, threads),
by the app factory and by ``wsserver check-config``; declaring each setting once, with its
parser and its documentation, keeps the three (and the README table) from drifting apart.
A bad value raises :class:`SettingsError` naming the variable, so the server refuses to
start instead of running with a surprise.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from .exceptions import SettingsError  # defined with every other exception

__all__ = [
    "ENV_PREFIX",
    "SETTINGS",
    "Setting",
    "Settings",
    "SettingsError",
    "load_settings",
    "settings_markdown",
]

ENV_PREFIX = "WSSERVER_"


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected one of on/off, true/false, yes/no, 1/0")


def _int_in(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text.strip())
        if not low <= value <= high:
            raise ValueError(f"expected an integer from {low} to {high}")
        return value

    return parse


def _float_in(low: float, high: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        value = float(text.strip())
        if not low <= value <= high:
            raise ValueError(f"expected a number from {low} to {high}")
        return value

    return parse


def _choice(*options: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in options:
            raise ValueError("expected one of " + ", ".join(options))
        return value

    return parse


def _host(text: str) -> str:
    value = text.strip()
    if not value or any(c.isspace() for c in value):
        raise ValueError("expected a host name or IP address")
    return value


def _list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _pem(text: str) -> str:
    value = text.strip()
    if value.startswith("-----BEGIN"):
        return value
    try:
        with open(value, encoding="ascii") as f:
            pem = f.read().strip()
    except OSError as exc:
        raise ValueError(f"neither PEM text nor a readable PEM file ({exc.strerror})") from None
    if not pem.startswith("-----BEGIN"):
        raise ValueError("the file does not hold a PEM key")
    return pem


@dataclass(frozen=True)
class Setting:
    """One setting: its attribute name, how to parse its environment text, its doc, and
    whether its value is a secret (never printed, never logged)."""

    name: str
    parse: Callable[[str], Any]
    default: Any
    doc: str
    secret: bool = False

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


MiB = 1024 * 1024

SETTINGS: tuple[Setting, ...] = (
    Setting("host", _host, "0.0.0.0", "Interface to listen on."),
    Setting("port", _int_in(0, 65535), 8080, "TCP port (0 picks a free one)."),
    Setting(
        "env",
        _choice("development", "production"),
        "production",
        "`production`: closed defaults (same-origin WebSockets, `/notify` from loopback or with "
        "an API key, no rebroadcast). `development`: the original's openness.",
    ),
    Setting(
        "rebroadcast",
        _parse_bool,
        None,
        "Rebroadcast what a client sends to every client, as the original did. "
        "Default: on in development, off in production.",
    ),
    Setting(
        "allowed_origins",
        _list,
        (),
        "Origins allowed to open WebSockets and call the API from a browser (comma-separated; "
        "`https://*.example.com` matches subdomains; `*` only in development). Empty: same "
        "origin only (production), any (development).",
    ),
    Setting(
        "api_keys",
        _list,
        (),
        "Publisher keys (comma-separated, several for rotation): when set, `POST /notify` needs "
        "`Authorization: Bearer <key>`. Unset: production takes `/notify` from loopback only.",
        secret=True,
    ),
    Setting(
        "jwt_secret",
        str,
        "",
        "HS256 secret: when set, `/ws` needs a token (`?token=` or `Authorization: Bearer`).",
        secret=True,
    ),
    Setting(
        "jwt_public_key",
        _pem,
        "",
        "RS256/ES256 public key (PEM text, or a path to a PEM file): as WSSERVER_JWT_SECRET.",
    ),
    Setting(
        "private_room_prefix",
        str,
        "private-",
        "Rooms named with this prefix need the token's `rooms` claim to join.",
    ),
    Setting(
        "max_connections_per_ip",
        _int_in(0, 1_000_000),
        0,
        "WebSockets one client address may hold in this worker (0: no limit); over it: HTTP 429.",
    ),
    Setting(
        "rate_limit",
        _float_in(0.0, 1_000_000.0),
        0.0,
        "Messages per second one connection may send (bursts of twice that); over it: close "
        "1008. 0: no limit.",
    ),
    Setting(
        "max_fragments",
        _int_in(1, 1_000_000),
        128,
        "Frames one message may arrive in (empty continuation frames count too); over it: close "
        "1009.",
    ),
    Setting(
        "max_control_rate",
        _float_in(0.0, 1_000_000.0),
        20.0,
        "Pings and unsolicited pongs per second one connection may send (bursts of twice that); "
        "over it: close 1008. 0: no limit.",
    ),
    Setting(
        "max_command_rate",
        _float_in(0.0, 1_000_000.0),
        20.0,
        "Commands (and free-form messages a production server answers with an error) per second "
        "one connection may send; a `subscribe` with `since` (a history replay) counts as 5. "
        "Bursts of 5 x WSSERVER_MAX_ROOMS_PER_CONNECTION plus twice the rate (a client may "
        "resume all its rooms at once); over it: close 1008. 0: no limit.",
    ),
    Setting(
        "max_resumes",
        _int_in(1, 100_000),
        8,
        "History replays (`subscribe` with `since`) queued or running at once in this worker, "
        "one per connection; one that finds no slot within WSSERVER_ENQUEUE_TIMEOUT gets the "
        "error frame `busy`. Keeps the broadcast queue free for publishers.",
    ),
    Setting(
        "redis_url",
        str,
        "",
        "Redis for several workers/hosts and durable-ish history (e.g. redis://127.0.0.1:6379/0). "
        "Unset: the embedded in-memory broker (one worker).",
        secret=True,
    ),
    Setting(
        "redis_prefix", str, "wsserver", "Prefix of every Redis key and channel wsserver uses."
    ),
    Setting(
        "history_size",
        _int_in(0, 1_000_000),
        100,
        "Messages kept per room (and per user, and for everybody) for recovery; 0: none.",
    ),
    Setting(
        "history_ttl",
        _float_in(1.0, 30 * 86400.0),
        300.0,
        "Seconds a message stays in history.",
    ),
    Setting(
        "history_max_rooms",
        _int_in(1, 10_000_000),
        10_000,
        "Audiences (rooms, users) whose history and ids the in-memory broker keeps; past it the "
        "least recently published is forgotten (a resume there answers `recovered: false`).",
    ),
    Setting(
        "history_max_bytes",
        _int_in(0, 64 * 1024 * MiB),
        64 * MiB,
        "Bytes of messages the in-memory broker keeps for recovery, all audiences together; "
        "past it the least recently published audiences are forgotten. 0: no byte limit.",
    ),
    Setting(
        "handshake_timeout",
        _float_in(0.5, 300.0),
        10.0,
        "Seconds a client has, from connecting (or from its kept-alive connection turning "
        "readable), to send its whole request head, and a `Content-Length` body of up to "
        "WSSERVER_MAX_BODY_SIZE: a deadline, not an idle timeout. Until then the request holds "
        "no thread; past it: 408 and close.",
    ),
    Setting(
        "request_timeout",
        _float_in(1.0, 3600.0),
        30.0,
        "Seconds a request that is not a WebSocket may hold a thread once it arrived (a body "
        "still trickling in, an answer the client does not read); past it its socket is shut "
        "down. A WebSocket is exempt once upgraded.",
    ),
    Setting(
        "max_pending",
        _int_in(1, 1_000_000),
        256,
        "Connections whose request has not arrived complete yet (all addresses); past it the "
        "oldest is cut with 503.",
    ),
    Setting(
        "max_pending_per_ip",
        _int_in(1, 1_000_000),
        64,
        "Connections from one address whose request has not arrived complete yet; past it "
        "that address's oldest is cut with 503, so a client that sends its request at once "
        "gets in.",
    ),
    Setting(
        "max_request_head",
        _int_in(1024, 1 * MiB),
        32 * 1024,
        "Largest request head (request line and headers, bytes); over it: 431 and close.",
    ),
    Setting("queue_size", _int_in(1, 1_000_000), 256, "Broadcast queue capacity (messages)."),
    Setting(
        "enqueue_timeout",
        _float_in(0.0, 30.0),
        0.5,
        "Seconds `POST /notify` waits for room in a full queue before answering 503.",
    ),
    Setting(
        "max_body_size",
        _int_in(64, 64 * MiB),
        64 * 1024,
        "Largest `POST /notify` body (bytes); over it: 413.",
    ),
    Setting(
        "max_message_size",
        _int_in(16, 1024 * MiB),
        64 * 1024,
        "Largest message a client may send (bytes); over it the connection is closed with 1009.",
    ),
    Setting(
        "client_buffer",
        _int_in(1024, 1024 * MiB),
        1 * MiB,
        "Bytes queued for one client before it is dropped as a slow consumer (close 1008).",
    ),
    Setting(
        "send_buffer",
        _int_in(0, 64 * MiB),
        256 * 1024,
        "Kernel send buffer per WebSocket (SO_SNDBUF, bytes); 0 leaves the kernel's autotuning. "
        "Bounds what a stalled client holds in the kernel, on top of WSSERVER_CLIENT_BUFFER.",
    ),
    Setting(
        "max_rooms_per_connection",
        _int_in(1, 100_000),
        100,
        "Rooms one connection may be in; past it: error frame `too_many_rooms`.",
    ),
    Setting(
        "max_invalid_commands",
        _int_in(1, 1_000_000),
        20,
        "Invalid commands in a row a client may send (each gets an error frame) before close 1008.",
    ),
    Setting(
        "max_batch",
        _int_in(1, 10_000),
        100,
        "Notifications in one `POST /notify` batch (a JSON list); more: 413.",
    ),
    Setting("ping_interval", _float_in(0.05, 3600.0), 25.0, "Seconds between keepalive pings."),
    Setting(
        "ping_timeout",
        _float_in(0.05, 3600.0),
        20.0,
        "Seconds a peer has to show life after a ping before it is closed (1011).",
    ),
    Setting(
        "close_timeout",
        _float_in(0.05, 60.0),
        2.0,
        "Seconds to wait for a peer's close reply (and for our last bytes to drain).",
    ),
    Setting(
        "shutdown_timeout",
        _float_in(0.1, 300.0),
        5.0,
        "Seconds SIGTERM may spend flushing the queue and closing clients with 1001.",
    ),
    Setting(
        "threads",
        _int_in(4, 100_000),
        1100,
        "gunicorn threads per worker: each open WebSocket holds one for its life.",
    ),
    Setting(
        "http_threads",
        _int_in(1, 10_000),
        32,
        "Threads kept back from WebSockets so `GET /` and `POST /notify` always answer.",
    ),
    Setting(
        "max_connections",
        _int_in(0, 1_000_000),
        0,
        "WebSockets per worker; 0 means `threads - http_threads`. "
        "Over it: HTTP 503 before the upgrade.",
    ),
    Setting(
        "workers",
        _int_in(1, 64),
        1,
        "gunicorn worker processes (more than 1 needs WSSERVER_REDIS_URL).",
    ),
    Setting(
        "console",
        _parse_bool,
        False,
        "Serve the live console page at `/console` in production too (always on in development).",
    ),
    Setting(
        "log_format",
        _choice("text", "json"),
        "text",
        "`text` lines, or `json`: one JSON object per line (ts, level, logger, pid, message), "
        "for the server's and gunicorn's logs.",
    ),
    Setting(
        "log_level",
        _choice("debug", "info", "warning", "error"),
        "info",
        "Log level of the server's own loggers and gunicorn's error log.",
    ),
)

_BY_NAME = {s.name: s for s in SETTINGS}


@dataclass(frozen=True)
class Settings:
    """The effective, validated settings. Frozen: built once at start, shared by every thread.

    Fields mirror :data:`SETTINGS` one to one (defaults and docs live there).
    """

    host: str
    port: int
    env: str
    rebroadcast: bool
    allowed_origins: tuple[str, ...]
    api_keys: tuple[str, ...]
    jwt_secret: str
    jwt_public_key: str
    private_room_prefix: str
    max_connections_per_ip: int
    rate_limit: float
    max_fragments: int
    max_control_rate: float
    max_command_rate: float
    max_resumes: int
    handshake_timeout: float
    request_timeout: float
    max_pending: int
    max_pending_per_ip: int
    max_request_head: int
    redis_url: str
    redis_prefix: str
    history_size: int
    history_ttl: float
    history_max_rooms: int
    history_max_bytes: int
    queue_size: int
    enqueue_timeout: float
    max_body_size: int
    max_message_size: int
    client_buffer: int
    send_buffer: int
    max_rooms_per_connection: int
    max_invalid_commands: int
    max_batch: int
    ping_interval: float
    ping_timeout: float
    close_timeout: float
    shutdown_timeout: float
    threads: int
    http_threads: int
    max_connections: int
    workers: int
    console: bool
    log_level: str
    log_format: str

    @property
    def connection_budget(self) -> int:
        """WebSockets a worker with ``WSSERVER_THREADS`` threads accepts."""
        return self.connection_budget_for(self.threads)

    def connection_budget_for(self, threads: int) -> int:
        """WebSockets a worker with ``threads`` pool threads accepts: the threads left after
        HTTP's share (each open WebSocket holds one for its life), capped by
        ``WSSERVER_MAX_CONNECTIONS``. At least one: a ``--threads`` flag at or below
        ``WSSERVER_HTTP_THREADS`` (the settings themselves cannot be) still serves a
        WebSocket rather than refusing every one. The one rule: the hub's first capacity and
        the one gunicorn's real thread count sets (``NotificationService.limit_connections``)."""
        room = max(threads - self.http_threads, 1)
        return min(self.max_connections, room) if self.max_connections else room

    @property
    def development(self) -> bool:
        return self.env == "development"

    def public_items(self) -> list[tuple[str, Any]]:
        """(environment name, value) pairs for display, secrets masked."""
        return [(s.env, _masked(s, getattr(self, s.name))) for s in SETTINGS]


def _masked(setting: Setting, value: Any) -> Any:
    if not setting.secret or not value:
        return value
    if isinstance(value, tuple):
        return f"({len(value)} set, hidden)"
    return "(set, hidden)"


def settings_markdown() -> str:
    """The README's settings table, generated from :data:`SETTINGS` (a test keeps them equal)."""
    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for setting in SETTINGS:
        default = setting.default
        if setting.name == "rebroadcast":
            shown = "on in development, off in production"
        elif default in ((), ""):
            shown = "(unset)"
        else:
            if isinstance(default, float) and default.is_integer():
                default = int(default)
            shown = f"`{default}`"
        rows.append(f"| `{setting.env}` | {shown} | {setting.doc} |")
    return "\n".join(rows) + "\n"


def load_settings(
    environ: Mapping[str, str] | None = None, overrides: Mapping[str, Any] | None = None
) -> Settings:
    """Build :class:`Settings` from defaults, ``WSSERVER_*`` variables, then ``overrides``.

    Overrides are already-typed values (flags, tests) keyed by attribute name; ``None`` means
    "not given". Raises :class:`SettingsError` naming the first bad variable.
    """
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {s.name: s.default for s in SETTINGS}
    for setting in SETTINGS:
        raw = environ.get(setting.env)
        if raw is None or raw.strip() == "":
            continue
        try:
            values[setting.name] = setting.parse(raw)
        except ValueError as exc:
            raise SettingsError(f"{setting.env}={raw!r} is not valid: {exc}") from None
    for name, value in (overrides or {}).items():
        if name not in _BY_NAME:
            raise SettingsError(f"unknown setting {name!r}")
        if value is not None:
            values[name] = value
    if values.get("rebroadcast") is None:
        values["rebroadcast"] = values["env"] == "development"
    settings = Settings(**values)
    _check_consistency(settings)
    return settings


def _check_consistency(settings: Settings) -> None:
    if "*" in settings.allowed_origins and not settings.development:
        raise SettingsError(
            f"{ENV_PREFIX}ALLOWED_ORIGINS='*' is allowed only with {ENV_PREFIX}ENV=development: "
            "in production list the origins (wildcards like https://*.example.com are fine)"
        )
    for origin in settings.allowed_origins:
        if origin != "*" and "://" not in origin:
            raise SettingsError(
                f"{ENV_PREFIX}ALLOWED_ORIGINS entry {origin!r} is not an origin "
                "(scheme://host[:port], e.g. https://app.example.com)"
            )
    if settings.jwt_secret and settings.jwt_public_key:
        raise SettingsError(f"set {ENV_PREFIX}JWT_SECRET or {ENV_PREFIX}JWT_PUBLIC_KEY, not both")
    if settings.jwt_public_key:
        from .auth import load_public_key

        try:
            load_public_key(settings.jwt_public_key)
        except ValueError as exc:
            raise SettingsError(f"{ENV_PREFIX}JWT_PUBLIC_KEY: {exc}") from None
    if settings.http_threads >= settings.threads:
        raise SettingsError(
            f"{ENV_PREFIX}HTTP_THREADS={settings.http_threads} must be below "
            f"{ENV_PREFIX}THREADS={settings.threads}: no thread would be left for WebSockets"
        )
    if settings.workers > 1 and not settings.redis_url:
        raise SettingsError(
            f"{ENV_PREFIX}WORKERS={settings.workers}: several workers would each hold a part of "
            "the audience and a notification would reach only one part; configure "
            f"{ENV_PREFIX}REDIS_URL or run one worker"
        )
