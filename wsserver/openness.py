"""What a development server leaves open, said once at start as one WARNING.

Why: development (``WSSERVER_ENV=development``, ``wsserver serve --dev``, ``./scripts/serve``)
is as open as the original: anyone who reaches the port may publish, any page may connect,
and with rebroadcast on one client can forge events to others
(``{"event":"password.reset","user":"bob"}`` reaches bob). The per-worker INFO posture line
(:meth:`wsserver.auth.AccessPolicy.describe`) says so among other start-up lines; this says it
once per server, from gunicorn's master (``on_starting`` in :mod:`wsserver.gunicorn_conf`),
at WARNING. The master must not import the app, so this module imports only the settings and
the access rules.

Each item is asked of the real :class:`~wsserver.auth.AccessPolicy` with what a stranger
would send (a page from an unknown origin, a publisher from a non-loopback address without a
key, a connection without a token), so the warning cannot drift from the rules in force.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Callable, Iterable

from .auth import AccessPolicy
from .config import Settings
from .exceptions import AccessDenied

__all__ = ["development_warning", "is_loopback_host", "open_in_development"]

# .invalid is never a real site (RFC 2606); 192.0.2.1 is a documentation address, not
# loopback (RFC 5737): a page and a publisher no configuration can have meant to let in
_STRANGER_ORIGIN = "http://stranger.invalid"
_STRANGER_ADDR = "192.0.2.1"


def open_in_development(settings: Settings, binds: Iterable[object] = ()) -> list[str]:
    """What this development server lets a stranger do, one item each; empty in production.

    ``binds`` are the addresses the server listens on as gunicorn parses them (``cfg.address``:
    ``(host, port)`` tuples, a path for a unix socket, an int for a file descriptor); only the
    network ones not on loopback are listed."""
    if not settings.development:
        return []
    policy = AccessPolicy(settings)
    found = []
    if policy.origin_allowed(_STRANGER_ORIGIN, None):
        found.append("WebSockets from any origin (WSSERVER_ALLOWED_ORIGINS empty or *)")
    if _allowed(lambda: policy.check_publisher(None, _STRANGER_ADDR)):
        found.append("POST /notify from any address without a key (WSSERVER_API_KEYS unset)")
    if _allowed(lambda: policy.authenticate(None)):
        found.append("/ws without a connection token (no WSSERVER_JWT_SECRET or _PUBLIC_KEY)")
    if settings.rebroadcast:
        found.append(
            "rebroadcast on: what a client sends goes to every client, so one client can forge "
            "events to others (WSSERVER_REBROADCAST=off stops it)"
        )
    exposed = [
        _shown(host, port) for host, port in _network_binds(binds) if not is_loopback_host(host)
    ]
    if exposed:
        found.append(f"listening on {', '.join(exposed)}, not loopback only (WSSERVER_HOST)")
    return found


def development_warning(settings: Settings, binds: Iterable[object] = ()) -> str | None:
    """The one start-up WARNING line of a development server, or None when nothing is open."""
    found = open_in_development(settings, binds)
    if not found:
        return None
    return (
        "wsserver: development mode (WSSERVER_ENV=development) leaves open: "
        + "; ".join(found)
        + ". Never expose it; WSSERVER_ENV=production closes these by default."
    )


def is_loopback_host(host: str) -> bool:
    """Does binding ``host`` listen on loopback only? An IP literal says so itself; a name
    (``localhost``) is resolved, and counts only if every address it has is loopback. The
    empty host (gunicorn's ``:8080``) is every interface."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    if not host:
        return False
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return False
    return bool(infos) and all(
        ipaddress.ip_address(str(info[4][0]).split("%")[0]).is_loopback for info in infos
    )


def _allowed(attempt: Callable[[], object]) -> bool:
    """Did the policy let ``attempt`` through (no :class:`AccessDenied`)?"""
    try:
        attempt()
    except AccessDenied:
        return False
    return True


def _network_binds(binds: Iterable[object]) -> list[tuple[str, int]]:
    return [(str(b[0]), int(b[1])) for b in binds if isinstance(b, tuple) and len(b) == 2]


def _shown(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
