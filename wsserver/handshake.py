"""The WebSocket opening handshake (RFC 6455 section 4.2.1), checked before anything answers it.

Why a module of its own: simple-websocket performs the handshake inside the ``/ws`` route and
raises on a request it cannot accept, which Flask turns into a 500 and a 25-line traceback per
request: a malformed upgrade (a scanner, an old client, a broken proxy) must instead get a
plain HTTP refusal it can act on, with the JSON error body, and cost one audit line. The
``/ws`` before-request hook (:mod:`wsserver.ws`) calls :func:`check_handshake` first, before
the origin and token checks: a request that is not a valid handshake is refused for what it
is, whoever sends it.

Answers (each a :class:`~wsserver.exceptions.HandshakeRefused`):

* 426 ``unsupported_websocket_version`` with ``Sec-WebSocket-Version: 13``: a version other
  than 13 (section 4.2.2: the client may retry with one we speak);
* 400 ``invalid_handshake``: no ``Sec-WebSocket-Version``, or anything else wsproto would
  refuse (:func:`wsserver.transport.handshake_rejection` replays the request through it);
* 400 ``invalid_websocket_key``: ``Sec-WebSocket-Key`` missing, or not 16 bytes in base64;
* 400 ``invalid_host``: ``Host`` missing, or not ``host[:port]`` (port 0-65535).

A missing ``Upgrade: websocket`` / ``Connection: Upgrade`` never gets here: the router treats
such a request as plain HTTP, answered 400 ``bad_request`` by :mod:`wsserver.errors`.

:func:`negotiate_subprotocol` then reads the subprotocol offer (``Sec-WebSocket-Protocol``):
the server speaks ``wsserver.v1``, and an offer may carry the connection token as an entry
``wsserver.token.<jwt>`` (a browser cannot set ``Authorization`` on a WebSocket, and a
``?token=`` is written to every proxy's access log). A client that offers subprotocols
aborts unless the 101 selects one of them, so an offer without ``wsserver.v1`` is refused
here, 400 ``unsupported_subprotocol`` naming what the server speaks, instead of a 101 the
client would drop.

:func:`negotiate_compression` reads the extension offer (``Sec-WebSocket-Extensions``,
RFC 6455 9.1) and picks the first permessage-deflate offer (RFC 7692) the server can
honour; the answer always carries ``server_no_context_takeover`` (each message we send is
compressed on its own, so one compressed frame serves every client with the same window)
and ``client_no_context_takeover`` (a client's message depends on none before it, so a
connection keeps no inflate state between messages: no 32 KiB window per idle client). An
offer we cannot honour (``server_max_window_bits=8``: zlib writes 9-bit windows at least;
an unknown, repeated or malformed parameter) is declined, never refused: the connection
then goes on uncompressed. The offer is rewritten in the environ to exactly the one
accepted, so wsproto (inside simple-websocket) answers with those parameters, or removed.
Pure functions of the WSGI environ; thread-safe.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any, NamedTuple

from .codes import MAX_SUBPROTOCOLS, SUBPROTOCOL, TOKEN_SUBPROTOCOL_PREFIX, WEBSOCKET_VERSION
from .exceptions import HandshakeRefused
from .transport import handshake_rejection

__all__ = [
    "DeflateOffer",
    "check_handshake",
    "negotiate_compression",
    "negotiate_subprotocol",
    "parse_extensions",
]

_RULE = "RFC 6455 4.2.1"

# host: a bracketed IPv6 literal, or a name / IPv4 address without the characters that would
# make it something else (a path, a userinfo, a second port); then an optional port
_HOST_RE = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[^\s/?#@\[\]:]+)(?::(\d{1,5}))?\Z")

# RFC 6455 4.1 / RFC 7230 3.2.6: each offered subprotocol is a token
_TOKEN_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")


# RFC 7230 3.2.6 quoted-string (its backslash escapes are undone by parse_extensions)
_QUOTED_RE = re.compile(r'"((?:[^"\\]|\\.)*)"')
DEFLATE = "permessage-deflate"
_BITS = range(8, 16)  # what RFC 7692 allows in an offer
_SERVER_BITS = range(9, 16)  # what zlib can write (it turns a raw 8-bit window into 9)


class DeflateOffer(NamedTuple):
    """A permessage-deflate offer the server accepted: the window it compresses with
    (``server_max_window_bits`` when the client asked for one, else 15) and whether the
    answer names that window (it must when the offer did)."""

    window_bits: int = 15
    window_named: bool = False

    def answer(self) -> str:
        """The ``Sec-WebSocket-Extensions`` element of the 101 for this offer."""
        text = f"{DEFLATE}; client_no_context_takeover; server_no_context_takeover"
        if self.window_named:
            text += f"; server_max_window_bits={self.window_bits}"
        return text


def parse_extensions(header: str) -> list[tuple[str, list[tuple[str, str | None]]] | None]:
    """``Sec-WebSocket-Extensions`` as a list of ``(name, [(param, value or None)])``, one
    per offer in the client's order; None for an element that is not a valid extension
    (RFC 6455 9.1: tokens, ``;``-separated parameters, values a token or a quoted string)."""
    offers: list[tuple[str, list[tuple[str, str | None]]] | None] = []
    for element in _split_outside_quotes(header, ","):
        element = element.strip()
        if not element:
            continue
        name, *parts = [part.strip() for part in _split_outside_quotes(element, ";")]
        params: list[tuple[str, str | None]] = []
        valid = bool(_TOKEN_RE.match(name))
        for part in parts:
            key, eq, value = part.partition("=")
            key, value = key.strip(), value.strip()
            if not _TOKEN_RE.match(key):
                valid = False
            elif not eq:
                params.append((key, None))
            elif _TOKEN_RE.match(value):
                params.append((key, value))
            else:
                quoted = _QUOTED_RE.fullmatch(value)
                if quoted is None:
                    valid = False
                else:
                    params.append((key, re.sub(r"\\(.)", r"\1", quoted.group(1))))
        offers.append((name, params) if valid else None)
    return offers


def _split_outside_quotes(text: str, separator: str) -> list[str]:
    parts, start, quoted, escaped = [], 0, False, False
    for i, char in enumerate(text):
        if escaped:
            escaped = False
        elif quoted and char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == separator and not quoted:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def _accept_deflate(params: list[tuple[str, str | None]]) -> DeflateOffer | None:
    """The offer as accepted, or None to decline it (RFC 7692 7.1: an unknown or repeated
    parameter, a bad value; or a server window zlib cannot keep to)."""
    seen: set[str] = set()
    window: int | None = None
    for key, value in params:
        key = key.lower()
        if key in seen:
            return None
        seen.add(key)
        if key in ("server_no_context_takeover", "client_no_context_takeover"):
            if value is not None:
                return None
        elif key == "server_max_window_bits":
            bits = _window_bits(value)
            if bits is None or bits not in _SERVER_BITS:
                return None
            window = bits
        elif key == "client_max_window_bits":
            # the client lets us cap its window; we do not (its messages are inflated one at
            # a time, without context), so the answer leaves it out
            if value is not None and _window_bits(value) is None:
                return None
        else:
            return None
    return DeflateOffer(window, True) if window is not None else DeflateOffer()


def _window_bits(value: str | None) -> int | None:
    """RFC 7692 7.1.2: a decimal integer from 8 to 15 without leading zeroes (ASCII digits:
    ``isdigit`` also takes other scripts' digits)."""
    if value is None or not value.isascii() or not value.isdigit() or value[0] == "0":
        return None
    bits = int(value)
    return bits if bits in _BITS else None


def negotiate_compression(environ: dict[str, Any], enabled: bool) -> DeflateOffer | None:
    """Pick the first permessage-deflate offer the server can honour (None: no compression)
    and leave exactly that offer in the environ, in the form wsproto answers with
    :meth:`DeflateOffer.answer`; without one (or with ``enabled`` false, the setting
    ``WSSERVER_COMPRESSION``) remove the header, so the 101 names no extension. Other
    extensions are never accepted."""
    header = environ.pop("HTTP_SEC_WEBSOCKET_EXTENSIONS", None)
    if header is None or not enabled:
        return None
    for offer in parse_extensions(header):
        if offer is None or offer[0].lower() != DEFLATE:
            continue
        accepted = _accept_deflate(offer[1])
        if accepted is not None:
            environ["HTTP_SEC_WEBSOCKET_EXTENSIONS"] = accepted.answer()
            return accepted
    return None


def check_handshake(environ: dict[str, Any]) -> None:
    """Raise :class:`HandshakeRefused` unless simple-websocket can accept this upgrade."""
    version = environ.get("HTTP_SEC_WEBSOCKET_VERSION")
    if version is None:
        raise HandshakeRefused(
            400, "invalid_handshake", "the upgrade has no Sec-WebSocket-Version header", _RULE
        )
    if version.strip() != WEBSOCKET_VERSION:
        raise HandshakeRefused(
            426,
            "unsupported_websocket_version",
            "this server speaks WebSocket version 13 only (Sec-WebSocket-Version: 13)",
            "RFC 6455 4.2.2",
        )
    if not _valid_key(environ.get("HTTP_SEC_WEBSOCKET_KEY")):
        raise HandshakeRefused(
            400,
            "invalid_websocket_key",
            "Sec-WebSocket-Key must be 16 random bytes in base64 (24 characters)",
            _RULE,
        )
    if not _valid_host(environ.get("HTTP_HOST")):
        raise HandshakeRefused(
            400, "invalid_host", "the upgrade needs a Host header of the form host[:port]", _RULE
        )
    if handshake_rejection(environ) is not None:
        raise HandshakeRefused(
            400, "invalid_handshake", "the request is not a valid WebSocket handshake", _RULE
        )


def _valid_key(key: str | None) -> bool:
    if key is None:
        return False
    try:
        return len(base64.b64decode(key.strip().encode("ascii"), validate=True)) == 16
    except (binascii.Error, UnicodeEncodeError):
        return False


def _valid_host(host: str | None) -> bool:
    """``host[:port]`` with a port from 0 to 65535, and a name IDNA can read (wsproto
    decodes it so; a name it cannot decode would fail the handshake later)."""
    if not host:
        return False
    match = _HOST_RE.match(host)
    if match is None or (match.group(1) is not None and int(match.group(1)) > 65535):
        return False
    try:
        host.encode().decode("idna")
    except UnicodeError:
        return False
    return True


def negotiate_subprotocol(environ: dict[str, Any]) -> str | None:
    """Check the subprotocol offer and take the token out of it; returns the offered token
    (None when the offer carries none, or there is no offer).

    Raises :class:`HandshakeRefused` 400 ``invalid_subprotocol`` for an offer that is not a
    list of at most :data:`MAX_SUBPROTOCOLS` tokens with at most one non-empty token entry,
    and 400 ``unsupported_subprotocol`` for one without ``wsserver.v1``. The token entry is
    removed from the environ, so simple-websocket, which selects ``wsserver.v1``, never sees
    it, and nothing downstream (a traceback's environ, a debug dump) can show it."""
    offer = environ.get("HTTP_SEC_WEBSOCKET_PROTOCOL")
    if offer is None:
        return None
    entries = [entry.strip() for entry in offer.split(",") if entry.strip()]
    if len(entries) > MAX_SUBPROTOCOLS or not all(_TOKEN_RE.match(e) for e in entries):
        raise _invalid_offer(
            f"Sec-WebSocket-Protocol must list at most {MAX_SUBPROTOCOLS} subprotocols, each a "
            "token (RFC 6455 4.1)"
        )
    tokens = [e[len(TOKEN_SUBPROTOCOL_PREFIX):] for e in entries if _is_token_entry(e)]
    protocols = [e for e in entries if not _is_token_entry(e)]
    if len(tokens) > 1 or (tokens and not tokens[0]):
        raise _invalid_offer(f"offer one {TOKEN_SUBPROTOCOL_PREFIX}<token> entry, with a token")
    if entries and SUBPROTOCOL not in protocols:
        refused = HandshakeRefused(
            400,
            "unsupported_subprotocol",
            f"this server speaks the subprotocol {SUBPROTOCOL} only: offer it, or offer none",
            "RFC 6455 4.2.2",
        )
        refused.fields["subprotocols"] = [SUBPROTOCOL]
        raise refused
    if protocols:
        environ["HTTP_SEC_WEBSOCKET_PROTOCOL"] = ", ".join(protocols)
    else:  # an empty header: no offer
        del environ["HTTP_SEC_WEBSOCKET_PROTOCOL"]
    return tokens[0] if tokens else None


def _is_token_entry(entry: str) -> bool:
    return entry.startswith(TOKEN_SUBPROTOCOL_PREFIX)


def _invalid_offer(reason: str) -> HandshakeRefused:
    return HandshakeRefused(400, "invalid_subprotocol", reason, "RFC 6455 4.1")
