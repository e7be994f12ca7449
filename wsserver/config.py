"""Settings: one frozen object built from defaults, then ``WSSERVER_*`` environment
variables, then explicit overrides (command-line flags, test fixtures).

Why one declaration: the same settings are read by the gunicorn config module (bind,
threads), by the app factory and by ``wsserver check-config``. Each setting is declared
once, as a field of :class:`Settings` carrying its parser, default and documentation;
:data:`SETTINGS` (the table the environment loader, ``check-config`` and the README's
table read) is derived from those fields, so none of them can drift from the typed object
the code reads. A bad value raises :class:`SettingsError` naming the variable, so the
server refuses to start instead of running with a surprise.

Rules that span several settings live here too (:func:`check_workers` is also what the
gunicorn master applies to its final ``-w``), so each is written once.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Mapping

from .exceptions import SettingsError  # defined with every other exception
from .origins import parse_pattern

__all__ = [
    "ENV_PREFIX",
    "MIN_HS256_SECRET_BYTES",
    "SETTINGS",
    "Setting",
    "Settings",
    "SettingsError",
    "CLIENT_VARIABLES",
    "check_workers",
    "environment_text",
    "load_public_key",
    "load_settings",
    "redis_client",
    "redis_problem",
    "settings_markdown",
    "unknown_variables",
]

ENV_PREFIX = "WSSERVER_"


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("one of on/off, true/false, yes/no, 1/0")


def _int_in(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            value = low - 1  # not an integer: the same message as out of range
        if not low <= value <= high:
            raise ValueError(f"an integer from {low} to {high}")
        return value

    return parse


def _float_in(low: float, high: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text.strip())
        except ValueError:
            value = math.nan  # not a number: the same message as out of range
        if not low <= value <= high:  # also refuses nan
            raise ValueError(f"a number from {_number(low)} to {_number(high)}")
        return value

    return parse


def _choice(*options: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in options:
            raise ValueError("one of " + ", ".join(options))
        return value

    return parse


def _host(text: str) -> str:
    value = text.strip()
    if not value or any(c.isspace() for c in value):
        raise ValueError("a host name or IP address")
    return value


def _list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _networks(text: str) -> tuple[str, ...]:
    """Addresses or CIDR networks (``10.0.0.0/8``, ``::1``), each normalised by ``ipaddress``
    (a host address becomes a /32 or /128 network)."""
    networks = []
    for part in _list(text):
        try:
            networks.append(str(ipaddress.ip_network(part, strict=False)))
        except ValueError:
            raise ValueError(
                f"IP addresses or CIDR networks, comma-separated ({part!r} is neither)"
            ) from None
    return tuple(networks)


def _pem(text: str) -> str:
    value = text.strip()
    if value.startswith("-----BEGIN"):
        return value
    try:
        with open(value, encoding="ascii") as f:
            pem = f.read().strip()
    except OSError as exc:
        raise ValueError(f"PEM text or the path of a readable PEM file ({exc.strerror})") from None
    if not pem.startswith("-----BEGIN"):
        raise ValueError("PEM text or the path of a PEM file (that file holds no PEM key)")
    return pem


def _readable_file(text: str) -> str:
    value = text.strip()
    try:
        with open(value, "rb"):
            pass
    except OSError as exc:
        raise ValueError(f"the path of a readable file ({exc.strerror})") from None
    return value


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


_REDIS_SCHEMES = ("redis", "rediss", "unix")


def _redis_url(text: str) -> str:
    """A Redis URL checked for form only (reaching it is :func:`redis_problem`'s job):
    scheme ``redis``/``rediss``/``unix``, a port and database number that are numbers, and
    no query parameter redis-py does not know (redis-py would pass it on to the connection
    and fail only when the server starts)."""
    from urllib.parse import parse_qs, unquote, urlsplit

    value = text.strip()
    parts = urlsplit(value)
    if parts.scheme.lower() not in _REDIS_SCHEMES or "://" not in value:
        raise ValueError("a URL redis://host:port/db, rediss://... or unix:///path?db=N")
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        raise ValueError("a URL whose port is a number from 0 to 65535") from None
    query = parse_qs(parts.query, keep_blank_values=True)
    unknown = sorted(set(query) - _redis_query_names(parts.scheme.lower()))
    if unknown:
        raise ValueError(f"a URL with no query parameter redis-py does not know ({unknown[0]!r})")
    db = unquote(parts.path).strip("/") if parts.scheme.lower() != "unix" else ""
    db = query["db"][0] if "db" in query else db
    if db and not (db.isdigit() and db.isascii()):
        raise ValueError(f"a URL whose database number is a whole number (not {db!r})")
    if parts.scheme.lower() == "unix" and not parts.path:
        raise ValueError("a unix:// URL naming the socket's path (unix:///run/redis.sock)")
    try:
        import redis.connection

        redis.connection.parse_url(value)  # the values of known parameters, as redis-py reads them
    except ValueError as exc:
        raise ValueError(f"a URL redis-py can read ({exc})") from None
    return value


def _redis_query_names(scheme: str) -> set[str]:
    import inspect

    import redis.connection

    names = set(redis.connection.URL_QUERY_ARGUMENT_PARSERS) | {"client_name", "username"}
    if scheme == "rediss":
        ssl_names = inspect.signature(redis.connection.SSLConnection).parameters
        names |= {n for n in ssl_names if n.startswith("ssl_")}
    return names


def _host_port(text: str) -> tuple[str, int]:
    """``host:port`` (``[::1]:26379`` for an IPv6 address) as (host, port)."""
    host, sep, port = text.strip().rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    host = host[1:-1] if bracketed else host
    if (not sep or not host or any(c.isspace() for c in host) or (":" in host and not bracketed)
            or not (port.isdigit() and port.isascii() and 0 < int(port) < 65536)):
        raise ValueError(
            f"host:port addresses, comma-separated, e.g. 10.0.0.1:26379,[::1]:26379 "
            f"({text.strip()!r} is not one)"
        )
    return host, int(port)


def _sentinels(text: str) -> tuple[str, ...]:
    addresses = _list(text)
    for address in addresses:
        _host_port(address)
    return addresses


def _master_name(text: str) -> str:
    value = text.strip()
    if any(c.isspace() for c in value) or not value.isprintable():
        raise ValueError("a master name as the sentinels know it (no spaces)")
    return value


def redis_client(url: str = "", sentinels: tuple[str, ...] = (), master: str = "",
                 **options: Any) -> Any:
    """A redis-py client for the configured Redis: ``url`` itself, or (``sentinels`` given)
    the master named ``master`` as those sentinels tell it now, followed across failovers
    (redis-py's ``Sentinel.master_for``: each new connection asks the sentinels; ``url``,
    when set, gives only its password, username, database and TLS). The one reading of the
    Redis settings, for the broker's every connection and for :func:`redis_problem`."""
    import redis

    if not sentinels:
        return redis.Redis.from_url(url, **options)
    from redis.connection import parse_url
    from redis.sentinel import Sentinel

    kwargs: dict[str, Any] = parse_url(url) if url else {}
    if kwargs.pop("connection_class", None) is redis.SSLConnection:
        kwargs["ssl"] = True  # rediss://: the sentinel pool picks its TLS connection class
    kwargs.update(options)
    timeouts = {k: v for k, v in options.items() if k.startswith("socket_")}
    manager = Sentinel([_host_port(s) for s in sentinels], sentinel_kwargs=timeouts)
    return manager.master_for(master, **kwargs)


def redis_problem(url: str, timeout: float = 2.0, sentinels: tuple[str, ...] = (),
                  master: str = "") -> str | None:
    """Why the configured Redis (``url``, or the ``master`` of ``sentinels``; already checked
    for form) cannot serve, in one sentence, or ``None`` when it answers a PING. Unreachable
    and refusing (a database number past the server's, a wrong password) are told apart: the
    fixes differ; with sentinels, so is "no sentinel names a master". The password never
    shows."""
    import redis
    from redis.sentinel import MasterNotFoundError

    client = redis_client(url, sentinels, master, socket_timeout=timeout,
                          socket_connect_timeout=timeout)
    where = (f"Redis master {master!r} of {ENV_PREFIX}REDIS_SENTINELS ({','.join(sentinels)})"
             if sentinels else f"Redis at {ENV_PREFIX}REDIS_URL")
    try:
        client.ping()
    except MasterNotFoundError as exc:
        why = _redact_url_password(str(exc) or exc.__class__.__name__, url)
        return f"{where} is unknown: no sentinel answered with its address: {why}"
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        why = _redact_url_password(str(exc) or exc.__class__.__name__, url)
        return f"{where} is unreachable: {why}"
    except redis.RedisError as exc:
        why = _redact_url_password(str(exc) or exc.__class__.__name__, url)
        return f"{where} answered but refused to serve: {why}"
    finally:
        client.close()
    return None


def _redact_url_password(text: str, url: str) -> str:
    from urllib.parse import urlsplit

    password = urlsplit(url).password
    return text.replace(password, "***") if password else text


def load_public_key(pem: str) -> Any:
    """The verification key from PEM text; ValueError if it is not an RSA or EC public key.

    Here, beside the PEM setting's parser, so that a bad key stops the start as a
    :class:`SettingsError` and ``auth`` builds its verifier with the same check (``auth``
    imports ``config``, never the other way round)."""
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        key = load_pem_public_key(pem.encode("ascii"))
    except (ValueError, TypeError, UnicodeEncodeError) as exc:
        raise ValueError(f"not a PEM public key ({exc.__class__.__name__})") from None
    if not isinstance(key, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey)):
        raise ValueError("only RSA (RS256) and EC (ES256) public keys are supported")
    return key


@dataclass(frozen=True)
class Setting:
    """One setting: its attribute name, how to parse its environment text, its default, its
    doc, whether its value is a secret (never printed, never logged), and its default in
    development when that differs (``None``: the same). Built from the fields of
    :class:`Settings`; immutable, so shared freely between threads."""

    name: str
    parse: Callable[[str], Any]
    default: Any
    doc: str
    secret: bool = False
    development_default: Any = None

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


MiB = 1024 * 1024


def _setting(
    parse: Callable[[str], Any],
    default: Any,
    doc: str,
    secret: bool = False,
    development_default: Any = None,
) -> Any:
    """A :class:`Settings` field declared with what :class:`Setting` needs. The default lives
    in the metadata, not in the dataclass, so ``Settings`` is only built complete, by
    :func:`load_settings` (typed ``Any`` so each field keeps its own annotation for mypy).
    ``default`` is production's; ``development_default``, when given, is development's."""
    return field(
        metadata={
            "parse": parse,
            "default": default,
            "doc": doc,
            "secret": secret,
            "development_default": development_default,
        }
    )


@dataclass(frozen=True)
class Settings:
    """The effective, validated settings. Frozen: built once at start by
    :func:`load_settings`, then shared by every thread without a lock.

    Each field is one setting (``WSSERVER_<NAME>``), in the order of the README's table.
    """

    host: str = _setting(
        _host,
        "0.0.0.0",
        "Interface to listen on (`0.0.0.0`: every interface). Behind a proxy on the same host: "
        "`127.0.0.1`.",
        development_default="127.0.0.1",
    )
    port: int = _setting(_int_in(0, 65535), 8080, "TCP port (0 picks a free one).")
    tls_cert: str = _setting(
        _readable_file,
        "",
        "TLS certificate chain (path to a PEM file), with WSSERVER_TLS_KEY: gunicorn itself "
        "serves https:// and wss:// (as its `--certfile`). Unset: plain HTTP, TLS ending at a "
        "proxy such as nginx.",
    )
    tls_key: str = _setting(
        _readable_file,
        "",
        "The certificate's private key (path to a PEM file, unencrypted): set with "
        "WSSERVER_TLS_CERT (as gunicorn's `--keyfile`).",
    )
    env: str = _setting(
        _choice("development", "production"),
        "production",
        "`production`: closed defaults (same-origin WebSockets, `/notify` from loopback or with "
        "an API key, no rebroadcast). `development`: the original's openness.",
    )
    rebroadcast: bool = _setting(
        _parse_bool,
        False,
        "Rebroadcast what a client sends to every client, as the original did. "
        "Default: on in development, off in production.",
        development_default=True,
    )
    allowed_origins: tuple[str, ...] = _setting(
        _list,
        (),
        "Origins allowed to open WebSockets and call the API from a browser (comma-separated; "
        "`https://*.example.com` matches subdomains; `*` only in development). Empty: same "
        "origin only (production), any (development).",
    )
    api_keys: tuple[str, ...] = _setting(
        _list,
        (),
        "Publisher keys (comma-separated, several for rotation): when set, `POST /notify`, "
        "`GET /rooms`, the server API (`GET /rooms/<room>/history`, `POST /disconnect`, "
        "`POST /unsubscribe`) and `GET /metrics` need `Authorization: Bearer <key>`. Unset: "
        "production takes `/notify`, `/rooms` and the server API from loopback only, never "
        "from a request carrying forwarding headers (a proxy).",
        secret=True,
    )
    trusted_proxies: tuple[str, ...] = _setting(
        _networks,
        (),
        "Addresses or CIDR networks of the reverse proxies in front (comma-separated, e.g. "
        "`127.0.0.1,10.0.0.0/8`). Only a request whose TCP peer is one of them has its client "
        "address read from `X-Forwarded-For` (the rightmost hop not listed here; `Forwarded` "
        "when there is none), for the per-address limits, the logs and the loopback rule. "
        "Unset: forwarding headers are ignored.",
    )
    metrics_public: bool = _setting(
        _parse_bool,
        False,
        "Serve `GET /metrics` without an API key even when WSSERVER_API_KEYS is set (off: it "
        "needs a publisher key then, as `GET /rooms` does).",
    )
    jwt_secret: str = _setting(
        str,
        "",
        "HS256 secret, at least 32 bytes: when set, `/ws` needs a token (subprotocol "
        "`wsserver.token.<jwt>`, `Authorization: Bearer`, or `?token=`).",
        secret=True,
    )
    jwt_public_key: str = _setting(
        _pem,
        "",
        "RS256/ES256 public key (PEM text, or a path to a PEM file): as WSSERVER_JWT_SECRET.",
    )
    jwt_issuer: str = _setting(
        str.strip,
        "",
        "When set, a token must carry this `iss` claim. Unset: `iss` is not checked.",
    )
    jwt_audience: str = _setting(
        str.strip,
        "",
        "When set, a token must carry this `aud` (a string, or a list naming it). Unset: `aud` "
        "is not checked; set it when the issuer signs tokens for other services too.",
    )
    private_room_prefix: str = _setting(
        str,
        "private-",
        "Rooms named with this prefix need the token's `rooms` claim to join.",
    )
    presence_prefix: str = _setting(
        str,
        "presence-",
        "Rooms named with this prefix tell their members who joins and leaves (a `presence` "
        "event per user, cluster-wide) and list them in `GET /rooms/<room>`; empty: no presence.",
    )
    max_connections_per_ip: int = _setting(
        _int_in(0, 1_000_000),
        0,
        "WebSockets one client address may hold in this worker (0: no limit); over it: HTTP 429.",
    )
    rate_limit: float = _setting(
        _float_in(0.0, 1_000_000.0),
        0.0,
        "Messages per second one connection may send (bursts of twice that); over it: close "
        "1008. 0: no limit.",
    )
    max_fragments: int = _setting(
        _int_in(1, 1_000_000),
        128,
        "Frames one message may arrive in (empty continuation frames count too); over it: close "
        "1009.",
    )
    max_control_rate: float = _setting(
        _float_in(0.0, 1_000_000.0),
        20.0,
        "Pings and unsolicited pongs per second one connection may send (bursts of twice that); "
        "over it: close 1008. 0: no limit.",
    )
    max_command_rate: float = _setting(
        _float_in(0.0, 1_000_000.0),
        20.0,
        "Commands (and free-form messages a production server answers with an error) per second "
        "one connection may send; a `subscribe` with `since` (a history replay) counts as 5. "
        "Bursts of 5 x WSSERVER_MAX_ROOMS_PER_CONNECTION plus twice the rate (a client may "
        "resume all its rooms at once); over it: close 1008. 0: no limit.",
    )
    max_resumes: int = _setting(
        _int_in(1, 100_000),
        8,
        "History replays (`subscribe` with `since`) queued or running at once in this worker, "
        "one per connection; one that finds no slot within WSSERVER_ENQUEUE_TIMEOUT gets the "
        "error frame `busy`. Keeps the broadcast queue free for publishers.",
    )
    redis_url: str = _setting(
        _redis_url,
        "",
        "Redis for several workers/hosts and durable-ish history (e.g. redis://127.0.0.1:6379/0). "
        "Unset: the embedded in-memory broker (one worker). With WSSERVER_REDIS_SENTINELS it "
        "names no host and gives only the master's password, database and TLS "
        "(`redis://:password@/0`, `rediss://...`).",
        secret=True,
    )
    redis_sentinels: tuple[str, ...] = _setting(
        _sentinels,
        (),
        "Redis Sentinel addresses (`host:port`, comma-separated; `[::1]:26379`), set with "
        "WSSERVER_REDIS_SENTINEL_MASTER: every Redis connection asks them for the master's "
        "address and follows a failover to the promoted replica.",
    )
    redis_sentinel_master: str = _setting(
        _master_name,
        "",
        "The master's name the sentinels monitor (`sentinel monitor <name> ...`); set with "
        "WSSERVER_REDIS_SENTINELS.",
    )
    redis_prefix: str = _setting(
        str,
        "wsserver",
        "Prefix of every Redis key and channel wsserver uses.",
    )
    history_size: int = _setting(
        _int_in(0, 1_000_000),
        100,
        "Messages kept per room (and per user, and for everybody) for recovery; 0: none.",
    )
    history_ttl: float = _setting(
        _float_in(1.0, 30 * 86400.0),
        300.0,
        "Seconds a message stays in history.",
    )
    history_max_rooms: int = _setting(
        _int_in(1, 10_000_000),
        10_000,
        "Audiences (rooms, users) whose history and ids the in-memory broker keeps; past it the "
        "least recently published is forgotten (a resume there answers `recovered: false`).",
    )
    history_max_bytes: int = _setting(
        _int_in(0, 64 * 1024 * MiB),
        64 * MiB,
        "Bytes of messages the in-memory broker keeps for recovery, all audiences together; "
        "past it the least recently published audiences are forgotten. 0: no byte limit.",
    )
    idempotency_max_keys: int = _setting(
        _int_in(1, 10_000_000),
        100_000,
        "Idempotency keys (`POST /notify`) the in-memory broker remembers, each for "
        "WSSERVER_HISTORY_TTL; past it the oldest is forgotten early (a retry with it would "
        "publish again). Redis keeps every key for the TTL.",
    )
    handshake_timeout: float = _setting(
        _float_in(0.5, 300.0),
        10.0,
        "Seconds a client has, from connecting (or from its kept-alive connection turning "
        "readable), to send its whole request head, and a `Content-Length` body of up to "
        "WSSERVER_MAX_BODY_SIZE: a deadline, not an idle timeout. Until then the request holds "
        "no thread; past it: 408 and close.",
    )
    request_timeout: float = _setting(
        _float_in(1.0, 3600.0),
        30.0,
        "Seconds a request that is not a WebSocket may hold a thread once it arrived (a body "
        "still trickling in, an answer the client does not read); past it its socket is shut "
        "down. A WebSocket is exempt once upgraded.",
    )
    max_pending: int = _setting(
        _int_in(1, 1_000_000),
        256,
        "Connections whose request has not arrived complete yet (all addresses); past it the "
        "oldest is cut with 503.",
    )
    max_pending_per_ip: int = _setting(
        _int_in(1, 1_000_000),
        64,
        "Connections from one address whose request has not arrived complete yet; past it "
        "that address's oldest is cut with 503, so a client that sends its request at once "
        "gets in.",
    )
    max_request_head: int = _setting(
        _int_in(1024, 1 * MiB),
        32 * 1024,
        "Largest request head (request line and headers, bytes); over it: 431 and close.",
    )
    queue_size: int = _setting(_int_in(1, 1_000_000), 256, "Broadcast queue capacity (messages).")
    enqueue_timeout: float = _setting(
        _float_in(0.0, 30.0),
        0.5,
        "Seconds `POST /notify` waits for room in a full queue before answering 503.",
    )
    max_body_size: int = _setting(
        _int_in(64, 64 * MiB),
        64 * 1024,
        "Largest `POST /notify` body (bytes); over it: 413.",
    )
    max_message_size: int = _setting(
        _int_in(16, 1024 * MiB),
        64 * 1024,
        "Largest message a client may send (bytes); over it the connection is closed with 1009.",
    )
    compression: bool = _setting(
        _parse_bool,
        True,
        "Negotiate permessage-deflate (RFC 7692) with clients that offer it, always with "
        "`server_no_context_takeover`: each notification is compressed once and the same "
        "frame goes to every such client. Off: every client gets the plain frame.",
    )
    compression_min_size: int = _setting(
        _int_in(0, 1024 * MiB),
        1024,
        "Smallest message payload (bytes) compressed for clients that negotiated "
        "permessage-deflate; smaller ones go to them plain.",
    )
    client_buffer: int = _setting(
        _int_in(1024, 1024 * MiB),
        1 * MiB,
        "Bytes queued for one client before it is dropped as a slow consumer (close 1008).",
    )
    send_buffer: int = _setting(
        _int_in(0, 64 * MiB),
        256 * 1024,
        "Kernel send buffer per WebSocket (SO_SNDBUF, bytes); 0 leaves the kernel's autotuning. "
        "Bounds what a stalled client holds in the kernel, on top of WSSERVER_CLIENT_BUFFER.",
    )
    max_rooms_per_connection: int = _setting(
        _int_in(1, 100_000),
        100,
        "Rooms one connection may be in; past it: error frame `too_many_rooms`.",
    )
    max_invalid_commands: int = _setting(
        _int_in(1, 1_000_000),
        20,
        "Invalid commands in a row a client may send (each gets an error frame) before close 1008.",
    )
    max_batch: int = _setting(
        _int_in(1, 10_000),
        100,
        "Notifications in one `POST /notify` batch (a JSON list); more: 413.",
    )
    ping_interval: float = _setting(
        _float_in(0.05, 3600.0),
        25.0,
        "Seconds between keepalive pings.",
    )
    ping_timeout: float = _setting(
        _float_in(0.05, 3600.0),
        20.0,
        "Seconds a peer has to show life after a ping before it is closed (1011).",
    )
    close_timeout: float = _setting(
        _float_in(0.05, 60.0),
        2.0,
        "Seconds to wait for a peer's close reply (and for our last bytes to drain).",
    )
    shutdown_timeout: float = _setting(
        _float_in(0.1, 300.0),
        5.0,
        "Seconds SIGTERM may spend flushing the queue and closing clients with 1001.",
    )
    threads: int = _setting(
        _int_in(4, 100_000),
        1100,
        "gunicorn threads per worker: each open WebSocket holds one for its life.",
    )
    http_threads: int = _setting(
        _int_in(1, 10_000),
        32,
        "Threads kept back from WebSockets so `GET /` and `POST /notify` always answer.",
    )
    max_connections: int = _setting(
        _int_in(0, 1_000_000),
        0,
        "WebSockets per worker; 0 means `threads - http_threads`. "
        "Over it: HTTP 503 before the upgrade.",
    )
    workers: int = _setting(
        _int_in(1, 64),
        1,
        "gunicorn worker processes (more than 1 needs WSSERVER_REDIS_URL or _SENTINELS).",
    )
    console: bool = _setting(
        _parse_bool,
        False,
        "Serve the live console page at `/console` in production too (always on in development).",
    )
    log_format: str = _setting(
        _choice("text", "json"),
        "text",
        "`text` lines, or `json`: one JSON object per line (ts, level, logger, pid, message), "
        "for the server's and gunicorn's logs.",
    )
    log_level: str = _setting(
        _choice("debug", "info", "warning", "error"),
        "info",
        "Log level of the server's own loggers and gunicorn's error log.",
    )

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
    def uses_redis(self) -> bool:
        """The Redis broker is configured: a URL, or sentinels (with their master's name)."""
        return bool(self.redis_url or self.redis_sentinels)

    @property
    def development(self) -> bool:
        return self.env == "development"

    def environment_items(self) -> list[tuple[str, str]]:
        """(environment name, value as the variable takes it) pairs, secrets masked: what
        ``wsserver check-config`` prints, so a line can be pasted back as a variable."""
        return [(name, environment_text(value)) for name, value in self.public_items()]

    def public_items(self) -> list[tuple[str, Any]]:
        """(environment name, value) pairs for display, secrets masked."""
        return [(s.env, _masked(s, getattr(self, s.name))) for s in SETTINGS]


SETTINGS: tuple[Setting, ...] = tuple(
    Setting(name=f.name, **f.metadata) for f in fields(Settings)
)

_BY_NAME = {s.name: s for s in SETTINGS}


def _masked(setting: Setting, value: Any) -> Any:
    if not setting.secret or not value:
        return value
    if isinstance(value, tuple):
        return f"({len(value)} set, hidden)"
    return "(set, hidden)"


def _shown_raw(setting: Setting, raw: str) -> str:
    """A refused value as an error may show it: a secret never, a Redis URL without its
    password."""
    if setting.name == "redis_url":
        return repr(_redact_url_password(raw, raw))
    return "a value (hidden: it is a secret)" if setting.secret else repr(raw)


def environment_text(value: Any) -> str:
    """A setting's value written the way its variable takes it: ``on``/``off``, comma lists,
    ``300`` rather than ``300.0``, empty for unset."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return ",".join(value)
    if isinstance(value, float):
        return _number(value)
    return str(value)


# variables of the ``wsserver notify``/``listen`` commands and the repository's scripts: not
# server settings, but not typos either
CLIENT_VARIABLES = ("API_KEY", "TOKEN", "URL")
TOOL_VARIABLES = (
    "PYTHON", "VENV", "UV_VENV", "LOWEST_VENV", "CONFORMANCE_VENV", "CONFORMANCE_BOOTSTRAP",
)


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[str]:
    """One warning per ``WSSERVER_*`` variable that nothing reads, naming the closest known
    one: a misspelt setting would otherwise be silently ignored, its default used."""
    environ = os.environ if environ is None else environ
    known = [s.env for s in SETTINGS] + [ENV_PREFIX + n for n in CLIENT_VARIABLES]
    ignored = set(known) | {ENV_PREFIX + n for n in TOOL_VARIABLES}
    warnings = []
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or name in ignored:
            continue
        close = difflib.get_close_matches(name.upper(), known, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close else ""
        warnings.append(f"{name} is not a wsserver variable and is ignored{hint}")
    return warnings


def settings_markdown() -> str:
    """The README's settings table, generated from :data:`SETTINGS` (a test keeps them equal)."""
    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for setting in SETTINGS:
        shown = _shown_default(setting.default)
        if setting.development_default is not None:
            shown = (
                f"{_shown_default(setting.development_default)} in development, "
                f"{shown} in production"
            )
        rows.append(f"| `{setting.env}` | {shown} | {setting.doc} |")
    return "\n".join(rows) + "\n"


def _shown_default(default: Any) -> str:
    if isinstance(default, bool):
        return "on" if default else "off"
    if default in ((), ""):
        return "(unset)"
    if isinstance(default, float) and default.is_integer():
        default = int(default)
    return f"`{default}`"


def load_settings(
    environ: Mapping[str, str] | None = None, overrides: Mapping[str, Any] | None = None
) -> Settings:
    """Build :class:`Settings` from defaults, ``WSSERVER_*`` variables, then ``overrides``.

    Overrides are already-typed values (flags, tests) keyed by attribute name; ``None`` means
    "not given". Raises :class:`SettingsError` naming the first bad variable.
    """
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        raw = environ.get(setting.env)
        if raw is None or raw.strip() == "":
            continue
        try:
            values[setting.name] = setting.parse(raw)
        except ValueError as exc:
            shown = _shown_raw(setting, raw)
            raise SettingsError(f"{setting.env} must be {exc}, got {shown}") from None
    for name, value in (overrides or {}).items():
        if name not in _BY_NAME:
            raise SettingsError(f"unknown setting {name!r}")
        if value is not None:
            values[name] = value
    development = values.get("env", _BY_NAME["env"].default) == "development"
    for setting in SETTINGS:  # what was not given: the mode's default
        if setting.name not in values:
            mode_default = setting.development_default if development else None
            values[setting.name] = setting.default if mode_default is None else mode_default
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
        if origin != "*" and ("://" not in origin or parse_pattern(origin) is None):
            raise SettingsError(
                f"{ENV_PREFIX}ALLOWED_ORIGINS entry {origin!r} is not an origin "
                "(scheme://host[:port], e.g. https://app.example.com; a wildcard is a whole "
                "first label: https://*.example.com)"
            )
    _check_tls(settings.tls_cert, settings.tls_key)
    if settings.jwt_secret and settings.jwt_public_key:
        raise SettingsError(f"set {ENV_PREFIX}JWT_SECRET or {ENV_PREFIX}JWT_PUBLIC_KEY, not both")
    if settings.jwt_public_key:
        try:
            load_public_key(settings.jwt_public_key)
        except ValueError as exc:
            raise SettingsError(f"{ENV_PREFIX}JWT_PUBLIC_KEY: {exc}") from None
    _check_jwt(settings)
    if settings.http_threads >= settings.threads:
        raise SettingsError(
            f"{ENV_PREFIX}HTTP_THREADS={settings.http_threads} must be below "
            f"{ENV_PREFIX}THREADS={settings.threads}: no thread would be left for WebSockets"
        )
    _check_redis(settings)
    check_workers(settings.workers, settings.uses_redis)


def _check_redis(settings: Settings) -> None:
    """Sentinels and their master's name together; beside them the URL names no host (it
    would be a second, contradicting, answer to "where is Redis")."""
    sentinels, master = settings.redis_sentinels, settings.redis_sentinel_master
    if bool(sentinels) != bool(master):
        given, missing = ("SENTINELS", "SENTINEL_MASTER") if sentinels else (
            "SENTINEL_MASTER", "SENTINELS")
        raise SettingsError(
            f"{ENV_PREFIX}REDIS_{given} is set but {ENV_PREFIX}REDIS_{missing} is not: set "
            f"both {ENV_PREFIX}REDIS_SENTINELS (host:port,...) and "
            f"{ENV_PREFIX}REDIS_SENTINEL_MASTER (the monitored master's name), or neither"
        )
    if sentinels and settings.redis_url:
        from urllib.parse import urlsplit

        parts = urlsplit(settings.redis_url)
        if parts.scheme.lower() == "unix" or parts.hostname or parts.port:
            raise SettingsError(
                f"{ENV_PREFIX}REDIS_URL names a host while {ENV_PREFIX}REDIS_SENTINELS is set: "
                "the sentinels say where the master is; with them the URL gives only the "
                "password, database and TLS, with no host (redis://:password@/0, "
                "rediss://user:password@/0), or leave it unset"
            )


# RFC 7518 3.2: an HS256 key must be at least as long as the hash output (256 bits)
MIN_HS256_SECRET_BYTES = 32


def _check_jwt(settings: Settings) -> None:
    """A short HS256 secret can be brute-forced offline from any one token a client shows
    (a log, a browser's devtools): refuse to start with one. Issuer and audience rules are
    refused without a key to verify tokens with: they would silently check nothing."""
    size = len(settings.jwt_secret.encode("utf-8"))
    if settings.jwt_secret and size < MIN_HS256_SECRET_BYTES:
        raise SettingsError(
            f"{ENV_PREFIX}JWT_SECRET is {size} bytes: an HS256 secret must be at least "
            f"{MIN_HS256_SECRET_BYTES} bytes (RFC 7518 3.2); generate one with "
            "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )
    tokens = settings.jwt_secret or settings.jwt_public_key
    for name in ("jwt_issuer", "jwt_audience"):
        if getattr(settings, name) and not tokens:
            raise SettingsError(
                f"{ENV_PREFIX}{name.upper()} is set but tokens are not: set "
                f"{ENV_PREFIX}JWT_SECRET or {ENV_PREFIX}JWT_PUBLIC_KEY too"
            )


def _check_tls(cert: str, key: str) -> None:
    """Both or neither, and a pair that loads: refused here, the server would start and then
    fail every TLS handshake in its worker."""
    if bool(cert) != bool(key):
        given, missing = ("TLS_CERT", "TLS_KEY") if cert else ("TLS_KEY", "TLS_CERT")
        raise SettingsError(
            f"{ENV_PREFIX}{given} is set but {ENV_PREFIX}{missing} is not: set both "
            f"{ENV_PREFIX}TLS_CERT and {ENV_PREFIX}TLS_KEY (TLS served by gunicorn), or neither"
        )
    if cert:
        import ssl

        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
        except (ssl.SSLError, OSError) as exc:
            raise SettingsError(
                f"{ENV_PREFIX}TLS_CERT={cert!r} and {ENV_PREFIX}TLS_KEY={key!r} do not load as a "
                f"certificate chain and its private key: {exc}"
            ) from None


def check_workers(workers: int, redis_url: str | bool) -> None:
    """Refuse several workers without Redis: each would hold a part of the audience and a
    notification would reach only that part. Applied to ``WSSERVER_WORKERS`` here and, by
    ``gunicorn_conf.on_starting``, to the final count a ``-w`` flag may have set."""
    if workers > 1 and not redis_url:
        raise SettingsError(
            f"refusing to start {workers} workers ({ENV_PREFIX}WORKERS, -w) without "
            f"{ENV_PREFIX}REDIS_URL or {ENV_PREFIX}REDIS_SENTINELS: each would hold a part of "
            f"the audience and a notification would reach only that part. Set "
            f"{ENV_PREFIX}REDIS_URL (workers then share one audience through Redis), or run one "
            f"worker and raise {ENV_PREFIX}THREADS for more connections."
        )
