"""Origins and Host names, compared as parsed: which browser pages may use this server, and
whether a request's ``Host`` is one of this server's names.

Why parsed: comparing text let ``https://a.com`` differ from ``https://a.com:443``, let a
``Host`` without a port accept an ``Origin`` with any port and scheme, and let the wildcard
``https://*.example.com`` match the raw suffix (``https://evil.com/.example.com``). Here an
origin is ``(scheme, host, port)`` with the scheme's default port filled in, and a wildcard
matches whole DNS labels only.

Why ``Host`` is checked: the same-origin rule compares ``Origin`` with ``Host``, and both come
from the browser. A page at ``http://evil.com`` whose name the attacker re-points at this
server (DNS rebinding) sends ``Origin: http://evil.com`` and ``Host: evil.com``: "same origin".
When an allow-list is configured the server knows its names, and the same-origin grant holds
only for a ``Host`` that is one of them (see :meth:`OriginRules.host_known`). A listed origin
needs no such check: a rebinding page's origin is the attacker's, never a listed one.

Pure functions and an immutable object: thread-safe. Standard library only (``config``
validates the allow-list with :func:`parse_pattern`; ``codes`` and ``exceptions`` are pure).
"""

from __future__ import annotations

import ipaddress
import re
from typing import NamedTuple
from urllib.parse import urlsplit

from .codes import ErrorCode
from .exceptions import AccessDenied

__all__ = [
    "DEFAULT_PORTS",
    "Origin",
    "OriginPattern",
    "OriginRules",
    "parse_host",
    "parse_origin",
    "parse_pattern",
]

DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}

# a DNS name as browsers send it in Origin and Host (IDNs in punycode), lower-cased
_NAME_RE = re.compile(r"[a-z0-9_-]+(?:\.[a-z0-9_-]+)*\Z")
_LOCAL_NAMES = frozenset({"localhost"})


class Origin(NamedTuple):
    """A parsed origin; ``port`` is the scheme's default when the text names none."""

    scheme: str
    host: str
    port: int | None


class OriginPattern(NamedTuple):
    """An allow-list entry: an origin, or ``scheme://*.suffix[:port]`` (``wildcard``), which
    matches hosts with one or more whole labels before ``suffix``."""

    scheme: str
    host: str
    port: int | None
    wildcard: bool

    def matches_host(self, host: str) -> bool:
        if self.wildcard:
            return host.endswith("." + self.host)
        return host == self.host

    def matches(self, origin: Origin) -> bool:
        return (
            origin.scheme == self.scheme
            and origin.port == self.port
            and self.matches_host(origin.host)
        )


def _host_name(hostname: str | None) -> str | None:
    """A host as urlsplit returns it (lower-case, no brackets): a DNS name or an IP literal,
    without a trailing dot; None for anything else (``%2f``, spaces, an empty label)."""
    if not hostname:
        return None
    name = hostname[:-1] if hostname.endswith(".") else hostname
    if _NAME_RE.match(name):
        return name
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        return None


def parse_origin(text: str) -> Origin | None:
    """``scheme://host[:port]`` (a trailing ``/`` tolerated) as an :class:`Origin`; None for
    ``null``, a path, a query, userinfo, a port out of range, or a host that is not a DNS
    name or an IP literal."""
    try:
        parts = urlsplit(text.strip().rstrip("/"))
        port = parts.port
    except ValueError:
        return None
    if parts.path or parts.query or parts.fragment or parts.username is not None:
        return None
    host = _host_name(parts.hostname)
    scheme = parts.scheme.lower()
    if not scheme or host is None:
        return None
    return Origin(scheme, host, port if port is not None else DEFAULT_PORTS.get(scheme))


def parse_pattern(text: str) -> OriginPattern | None:
    """An allow-list entry as an :class:`OriginPattern`; None if it is not an origin, or has
    a ``*`` anywhere but as the whole first label."""
    wildcard = "://*." in text
    origin = parse_origin(text.replace("://*.", "://wildcard.", 1) if wildcard else text)
    if origin is None or "*" in text.replace("://*.", "", 1):
        return None
    host = origin.host.partition(".")[2] if wildcard else origin.host
    return OriginPattern(origin.scheme, host, origin.port, wildcard)


_HOSTS_CACHED = 256


def parse_host(text: str | None) -> tuple[str, int | None] | None:
    """A ``Host`` header as (host, port or None); None when missing or malformed."""
    if not text:
        return None
    try:
        parts = urlsplit("//" + text.strip())
        port = parts.port
    except ValueError:
        return None
    if parts.path or parts.query or parts.fragment or parts.username is not None:
        return None
    host = _host_name(parts.hostname)
    return None if host is None else (host, port)


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class OriginRules:
    """The origin rules of one server: its allow-list, whether any origin goes (development
    without a list, or ``*``), and its own names. Immutable (but for a bounded cache of
    :meth:`host_header_known` answers, whose races are benign); thread-safe."""

    def __init__(self, allowed: tuple[str, ...], development: bool, own_host: str = "") -> None:
        self.patterns = tuple(p for p in map(parse_pattern, allowed) if p is not None)
        self.any_origin = development and (not allowed or "*" in allowed)
        # with an allow-list the server knows its names, and checks Host against them
        self.checks_host = bool(self.patterns) and not self.any_origin
        own = _host_name(own_host.lower()) if own_host else None
        self._own = frozenset(_LOCAL_NAMES | ({own} if own else set()))
        self._hosts: dict[str, bool] = {}  # host_header_known's answers, bounded

    def allowed(self, origin: str | None, host: str | None) -> bool:
        """May a page from ``origin`` use this server (``host`` is the request's Host)?
        No Origin (a script, a server) is not a browser: allowed. ``null`` only when any
        origin is."""
        if origin is None:
            return True
        if self.any_origin:
            return origin.strip() == "null" or parse_origin(origin) is not None
        parsed = parse_origin(origin)
        if parsed is None:
            return False
        return self.listed(parsed) or self.same_origin(parsed, host)

    def check(self, origin: str | None, host: str | None, what: str) -> None:
        """Raise :class:`AccessDenied` (403) unless a page from ``origin`` may ``what`` here
        (``"publish"``, ``"read this"``): ``invalid_origin`` for an Origin header no browser
        sends, ``origin_forbidden`` for one the rules refuse."""
        if origin is None or self.allowed(origin, host):
            return
        if origin.strip() != "null" and parse_origin(origin) is None:
            raise AccessDenied(
                403,
                ErrorCode.INVALID_ORIGIN,
                "the Origin header is not scheme://host[:port]",
                "RFC 6454",
            )
        raise AccessDenied(
            403,
            ErrorCode.ORIGIN_FORBIDDEN,
            f"a page from this origin may not {what} here",
            "WSSERVER_ALLOWED_ORIGINS",
        )

    def listed(self, origin: Origin) -> bool:
        return any(pattern.matches(origin) for pattern in self.patterns)

    def cors_origin(self, origin: str | None) -> str | None:
        """The Access-Control-Allow-Origin value for ``origin``: itself when any origin is
        allowed or it is listed, else None (no CORS headers)."""
        if not origin:
            return None
        if self.any_origin:
            return origin
        parsed = parse_origin(origin)
        return origin if parsed is not None and self.listed(parsed) else None

    def same_origin(self, origin: Origin, host: str | None) -> bool:
        """``origin`` names the host the request was sent to. ``Host`` carries no scheme
        (behind a TLS-terminating proxy the server sees plain http), so either http or https
        goes, with the Host's port, or the scheme's default port when Host names none. With
        an allow-list, the Host must also be one of this server's names."""
        parsed = parse_host(host)
        if parsed is None or origin.scheme not in ("http", "https"):
            return False
        name, port = parsed
        if origin.host != name:
            return False
        if origin.port != (port if port is not None else DEFAULT_PORTS[origin.scheme]):
            return False
        return not self.checks_host or self.host_known(name)

    def host_known(self, host: str) -> bool:
        """Is ``host`` (parsed, no port) a name this server answers to: an IP literal (DNS
        rebinding needs a name), ``localhost``, ``WSSERVER_HOST``, or a host of the
        allow-list (a wildcard covers its subdomains)?"""
        return (
            host in self._own
            or _is_address(host)
            or any(p.matches_host(host) for p in self.patterns)
        )

    def host_header_known(self, host: str | None) -> bool:
        """:meth:`host_known` for a raw ``Host`` header (False when malformed).

        Every ``POST /notify`` without API keys asks, with the same few headers: the answers
        are remembered (the rules never change), at most ``_HOSTS_CACHED`` of them, so a
        client sending a new Host each time costs a parse, never memory."""
        if host is None:
            return False
        known = self._hosts.get(host)
        if known is None:
            parsed = parse_host(host)
            known = parsed is not None and self.host_known(parsed[0])
            if len(self._hosts) >= _HOSTS_CACHED:
                self._hosts.clear()
            self._hosts[host] = known
        return known
