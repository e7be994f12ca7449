"""Who the client is: the TCP peer, or, behind a trusted reverse proxy, the address that proxy
forwarded the request for; and why a forwarded request is never "from loopback".

Why one module: the client's address decides the per-address connection cap
(:mod:`wsserver.admission`, through the hub), the address in audit lines and logs
(:mod:`wsserver.audit`, gunicorn's access log) and the loopback rule for publishers. Behind
nginx on the same host every TCP peer is 127.0.0.1: the cap would count every client as one,
the log would name the proxy, and without API keys ``POST /notify`` and ``GET /rooms`` would be
open to whoever reaches the proxy.

* :class:`ClientAddress` (WSGI middleware, installed only when ``WSSERVER_TRUSTED_PROXIES`` is
  set): when the TCP peer is a trusted proxy, ``REMOTE_ADDR`` becomes the client's address,
  read from ``X-Forwarded-For`` (the rightmost hop that is not a trusted proxy), or from
  ``Forwarded`` (RFC 7239 ``for=``) when there is no ``X-Forwarded-For``; the peer is kept in
  ``environ["wsserver.peer_addr"]``. Every part of the app then reads one address. A request
  from any other peer keeps its peer: its forwarding headers are the client's own words.
* :class:`Publishers`: the publisher check ``POST /notify``, ``GET /rooms`` and ``GET /metrics``
  call. Without API keys in production, a request carrying ``X-Forwarded-For``, ``X-Real-IP``
  or ``Forwarded`` is refused (403, naming ``WSSERVER_API_KEYS``; one WARNING the first time),
  whatever its address: a proxy on the same host makes every request look local.

The worker's pending-connection caps (``WSSERVER_MAX_PENDING_PER_IP``) apply before the request
head is parsed, so they stay on the TCP peer (docs/security.md).

Thread-safety: immutable after construction, except :class:`Publishers`' warn-once flag,
under its lock.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING, Callable, Union

from .exceptions import AccessDenied

if TYPE_CHECKING:
    from .auth import AccessPolicy
    from .config import Settings

__all__ = [
    "FORWARDING_HEADERS",
    "PEER_ADDR",
    "ClientAddress",
    "Publishers",
    "TrustedProxies",
    "forwarding_headers",
]

log = logging.getLogger(__name__)

Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
WSGIApp = Callable[[dict, Callable], Iterable[bytes]]

PEER_ADDR = "wsserver.peer_addr"  # the TCP peer, when ClientAddress replaced REMOTE_ADDR

# environ key -> header name, for messages
FORWARDING_HEADERS = {
    "HTTP_X_FORWARDED_FOR": "X-Forwarded-For",
    "HTTP_X_REAL_IP": "X-Real-IP",
    "HTTP_FORWARDED": "Forwarded",
}


def forwarding_headers(environ: dict) -> list[str]:
    """The forwarding headers this request carries (their names)."""
    return [name for key, name in FORWARDING_HEADERS.items() if key in environ]


def _address(text: str) -> Address | None:
    """One hop: ``1.2.3.4``, ``1.2.3.4:80``, ``::1``, ``[::1]:80``, ``"[::1]:80"``; an
    IPv4-mapped IPv6 address as its IPv4 address. None for ``unknown``, ``_hidden``, junk."""
    text = text.strip().strip('"')
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _forwarded_for(value: str) -> list[str]:
    """The ``for=`` of each element of a ``Forwarded`` header, in order (RFC 7239)."""
    hops = []
    for element in value.split(","):
        for pair in element.split(";"):
            name, _, text = pair.partition("=")
            if name.strip().lower() == "for":
                hops.append(text)
                break
        else:
            hops.append("")  # an element without for=: a hop we cannot read
    return hops


class TrustedProxies:
    """``WSSERVER_TRUSTED_PROXIES`` as networks, and the client address they imply."""

    def __init__(self, networks: Iterable[str]) -> None:
        self._networks = tuple(ipaddress.ip_network(n, strict=False) for n in networks)

    def __bool__(self) -> bool:
        return bool(self._networks)

    def trusted(self, address: Address | None) -> bool:
        return address is not None and any(address in net for net in self._networks)

    def client_address(self, environ: dict) -> str:
        """The client's address: the TCP peer unless it is a trusted proxy; then, walking the
        forwarded hops from the right (the nearest first), the first hop that is not a
        trusted proxy. A hop that is not an address (``unknown``, junk a client wrote) ends
        the walk at the last address read; when every hop is trusted, the leftmost is it."""
        peer = environ.get("REMOTE_ADDR") or ""
        current = _address(peer)
        if not self.trusted(current):
            return peer
        if environ.get("HTTP_X_FORWARDED_FOR"):
            hops = environ["HTTP_X_FORWARDED_FOR"].split(",")
        else:
            hops = _forwarded_for(environ.get("HTTP_FORWARDED", ""))
        for hop in reversed(hops):
            address = _address(hop)
            if address is None:
                break
            current = address
            if not self.trusted(address):
                break
        return str(current)


class ClientAddress:
    """WSGI middleware: ``REMOTE_ADDR`` is the client's address as :class:`TrustedProxies`
    reads it; the TCP peer is kept in ``environ[PEER_ADDR]``."""

    def __init__(self, app: WSGIApp, proxies: TrustedProxies) -> None:
        self._app = app
        self._proxies = proxies

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        environ[PEER_ADDR] = environ.get("REMOTE_ADDR")
        environ["REMOTE_ADDR"] = self._proxies.client_address(environ)
        return self._app(environ, start_response)


class Publishers:
    """Who may publish and read the operator endpoints: :meth:`AccessPolicy.check_publisher`
    (an API key when keys are set, else loopback in production), after two rules that only
    the whole request can tell. Without API keys in production, a loopback grant is refused
    when the request carries forwarding headers (it came through a proxy, whatever its
    address), or when its Host is a name the server does not know (a browser page whose name
    was re-pointed at 127.0.0.1: DNS rebinding; see :mod:`wsserver.origins`)."""

    def __init__(self, settings: Settings, policy: AccessPolicy) -> None:
        self._policy = policy
        self._loopback_rule = not settings.api_keys and not settings.development
        self._warned = False
        self._lock = threading.Lock()

    def check(self, environ: dict) -> None:
        """Raise :class:`AccessDenied` unless this request may publish."""
        if self._loopback_rule:
            headers = forwarding_headers(environ)
            if headers:
                self._warn_once(environ, headers)
                raise AccessDenied(
                    403,
                    "publish_forbidden",
                    f"this request came through a proxy ({', '.join(headers)}): without API "
                    "keys only a local client that is not proxied may publish; set "
                    "WSSERVER_API_KEYS and send Authorization: Bearer <key>",
                    "WSSERVER_API_KEYS unset, forwarded request",
                )
        self._policy.check_publisher(environ.get("HTTP_AUTHORIZATION"), environ.get("REMOTE_ADDR"))
        host = environ.get("HTTP_HOST")
        if self._loopback_rule and host is not None and not self._policy.origins.host_header_known(
            host
        ):
            raise AccessDenied(
                403,
                "publish_forbidden",
                "without API keys, publishing from loopback needs a Host that is an address, "
                "localhost, WSSERVER_HOST or a host of WSSERVER_ALLOWED_ORIGINS; or set "
                "WSSERVER_API_KEYS",
                "WSSERVER_API_KEYS unset, unknown Host",
            )

    def _warn_once(self, environ: dict, headers: list[str]) -> None:
        with self._lock:
            if self._warned:
                return
            self._warned = True
        log.warning(
            "refused %s %s: it carries %s, so it came through a proxy, and without "
            "WSSERVER_API_KEYS publishing is for local, unproxied clients only. Behind a proxy "
            "set WSSERVER_API_KEYS (and WSSERVER_TRUSTED_PROXIES for client addresses); "
            "further such requests get 403 without this warning",
            environ.get("REQUEST_METHOD"),
            environ.get("PATH_INFO"),
            ", ".join(headers),
        )
