"""Who may do what: origins, publisher keys, connection tokens, room permissions.

Pure decisions over header values and claims, so the rules are tested without a server and
the views and the ``/ws`` hook share one definition. Every refusal is an
:class:`~wsserver.exceptions.AccessDenied` carrying the HTTP status and a machine-readable
code; its text never contains a secret or a token (they are never logged either).

Modes (``WSSERVER_ENV``):

* ``production`` (default): WebSocket upgrades only from the server's own origin unless
  ``WSSERVER_ALLOWED_ORIGINS`` lists more; ``POST /notify`` only from loopback unless API
  keys are configured (then only with a key);
* ``development``: any origin, ``/notify`` from anywhere; still, configured keys and token
  secrets are always enforced.
"""

from __future__ import annotations

import functools
import hmac
import ipaddress
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import jwt

from .config import Settings, load_public_key
from .exceptions import AccessDenied
from .origins import OriginRules

__all__ = [
    "AccessPolicy",
    "Identity",
    "token_from",
    "valid_origin",
]

# The latest time a token claim may name: 9999-12-31T23:59:59Z. Claims are JSON numbers, and a
# validly signed token may carry 1e400 or 10**400 (an int no float holds): past this the value
# is refused as out of range instead of overflowing where it is used as a deadline.
MAX_CLAIM_TIME = 253_402_300_799


@dataclass(frozen=True)
class Identity:
    """What a verified connection token says: the user, until when, and which private rooms
    (exact names, or prefixes written with a trailing ``*``) the user may join."""

    user: str
    expires_at: float  # epoch seconds
    rooms: tuple[str, ...] = ()

    def may_join(self, room: str) -> bool:
        for pattern in self.rooms:
            if pattern.endswith("*"):
                if room.startswith(pattern[:-1]):
                    return True
            elif room == pattern:
                return True
        return False


class AccessPolicy:
    """The access rules of one server, built once from its settings. Stateless; thread-safe."""

    def __init__(self, settings: Settings) -> None:
        self.development = settings.development
        self._origins = tuple(o.rstrip("/").lower() for o in settings.allowed_origins)
        self._any_origin = self.development and (not self._origins or "*" in self._origins)
        self.origins = OriginRules(settings.allowed_origins, self.development, settings.host)
        self._keys = tuple(k.encode("utf-8") for k in settings.api_keys)
        self._private_prefix = settings.private_room_prefix
        if settings.jwt_secret:
            self._jwt_key: Any = settings.jwt_secret
            self._jwt_algorithms = ["HS256"]
        elif settings.jwt_public_key:
            self._jwt_key = load_public_key(settings.jwt_public_key)
            from cryptography.hazmat.primitives.asymmetric import rsa

            self._jwt_algorithms = (
                ["RS256"] if isinstance(self._jwt_key, rsa.RSAPublicKey) else ["ES256"]
            )
        else:
            self._jwt_key = None
            self._jwt_algorithms = []
        self._issuer = settings.jwt_issuer or None
        self._audience = settings.jwt_audience or None

    # -- posture -----------------------------------------------------------------------------

    @property
    def token_setting(self) -> str:
        """The setting that makes tokens required, for audit details."""
        return "WSSERVER_JWT_SECRET" if self._jwt_algorithms == ["HS256"] else (
            "WSSERVER_JWT_PUBLIC_KEY"
        )

    def describe(self) -> str:
        """The effective security posture, for the start-up log: no secret in it."""
        origins = "any" if self._any_origin else ", ".join(("same origin",) + self._origins)
        if self._keys:
            publish = f"with an API key ({len(self._keys)} configured)"
        elif self.development:
            publish = "from anywhere (development, no API keys)"
        else:
            publish = "from loopback only (no API keys configured)"
        tokens = (
            f"required ({self._jwt_algorithms[0]})" if self._jwt_key is not None else "not required"
        )
        return f"WebSocket origins: {origins}; POST /notify: {publish}; connection tokens: {tokens}"

    # -- origins -----------------------------------------------------------------------------

    def origin_allowed(self, origin: str | None, host: str | None) -> bool:
        """May a browser page from ``origin`` use this server? Requests without an Origin
        header (scripts, servers) are not browsers and cannot be forged by a page. The rules,
        compared as parsed, and the Host check against DNS rebinding: :mod:`wsserver.origins`."""
        return self.origins.allowed(origin, host)

    def cors_origin(self, origin: str | None) -> str | None:
        """The value for Access-Control-Allow-Origin, or None for no CORS headers."""
        return self.origins.cors_origin(origin)

    def cors_headers(self, origin: str | None, preflight: bool = False) -> list[tuple[str, str]]:
        """CORS response headers for the HTTP API: none unless ``origin`` is allowed;
        a preflight (OPTIONS) also gets the methods and headers a publisher needs."""
        allowed = self.cors_origin(origin)
        if allowed is None:
            return []
        headers = [("Access-Control-Allow-Origin", allowed), ("Vary", "Origin")]
        if preflight:
            headers += [
                ("Access-Control-Allow-Methods", "GET, POST, OPTIONS"),
                ("Access-Control-Allow-Headers", "Authorization, Content-Type"),
                ("Access-Control-Max-Age", "600"),
            ]
        return headers

    # -- publishers --------------------------------------------------------------------------

    def check_publisher(self, authorization: str | None, remote_addr: str | None) -> None:
        """Raise :class:`AccessDenied` unless this request may publish."""
        if self._keys:
            presented = _bearer(authorization)
            if presented is None:
                raise AccessDenied(
                    401, "missing_api_key", "send Authorization: Bearer <api key>",
                    "WSSERVER_API_KEYS",
                )
            candidate = presented.encode("utf-8", "surrogateescape")
            # compare with every key, always: the time taken says nothing about which matched
            matched = False
            for key in self._keys:
                matched |= hmac.compare_digest(candidate, key)
            if not matched:
                raise AccessDenied(
                    401, "invalid_api_key", "the API key is not valid", "WSSERVER_API_KEYS"
                )
            return
        if self.development or _is_loopback(remote_addr):
            return
        raise AccessDenied(
            403,
            "publish_forbidden",
            "publishing is allowed from loopback only until API keys are configured "
            "(WSSERVER_API_KEYS)",
            "WSSERVER_ENV=production, WSSERVER_API_KEYS unset",
        )

    # -- connection tokens -------------------------------------------------------------------

    def authenticate(self, token: str | None) -> Identity | None:
        """Verify a connection token. None when tokens are not configured (anonymous
        connections); :class:`AccessDenied` (401) for a missing, malformed, badly signed or
        expired token."""
        if self._jwt_key is None:
            return None
        if not token:
            raise AccessDenied(
                401,
                "missing_token",
                "a token is required (subprotocol wsserver.token.<jwt>, Authorization: Bearer "
                "or ?token=)",
            )
        claims = self._decode(token)
        for claim in ("exp", "nbf", "iat"):
            if claim in claims and not _claim_time_ok(claims[claim]):
                raise AccessDenied(
                    401,
                    "invalid_token",
                    f"the token's '{claim}' claim must be a number of seconds up to year 9999",
                )
        sub, rooms = claims.get("sub"), claims.get("rooms", [])
        if not isinstance(sub, str) or not sub:
            raise AccessDenied(
                401, "invalid_token", "the token's 'sub' claim must be a non-empty string"
            )
        if not isinstance(rooms, list) or not all(isinstance(r, str) for r in rooms):
            raise AccessDenied(
                401, "invalid_token", "the token's 'rooms' claim must be a list of strings"
            )
        return Identity(user=sub, expires_at=float(claims["exp"]), rooms=tuple(rooms))

    def _decode(self, token: str) -> dict[str, Any]:
        """The claims of a validly signed token, checked by PyJWT (signature, ``exp``,
        ``nbf``, ``iat``; ``iss`` and ``aud`` when configured); 401 otherwise. Without
        ``WSSERVER_JWT_AUDIENCE``, ``aud`` is not checked (PyJWT would refuse every token that
        carries one: the server has no name of its own to compare it with)."""
        required = ["exp", "sub"] + (["iss"] if self._issuer else [])
        try:
            return jwt.decode(
                token,
                self._jwt_key,
                algorithms=self._jwt_algorithms,
                issuer=self._issuer,
                audience=self._audience,
                options={
                    "require": required + (["aud"] if self._audience else []),
                    "verify_aud": self._audience is not None,
                },
            )
        except jwt.ExpiredSignatureError:
            raise AccessDenied(401, "token_expired", "the token has expired") from None
        except jwt.InvalidSignatureError:
            raise AccessDenied(401, "invalid_token", "the token's signature is not valid") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AccessDenied(
                401, "invalid_token", f"the token has no '{exc.claim}' claim"
            ) from None
        except jwt.InvalidIssuerError:
            raise AccessDenied(
                401, "invalid_token", "the token's 'iss' is not this server's issuer",
                "WSSERVER_JWT_ISSUER",
            ) from None
        except jwt.InvalidAudienceError:
            raise AccessDenied(
                401, "invalid_token", "the token's 'aud' does not name this server",
                "WSSERVER_JWT_AUDIENCE",
            ) from None
        except jwt.PyJWTError:
            raise AccessDenied(
                401, "invalid_token", "the token is malformed or not valid"
            ) from None

    def refresh(self, identity: Identity | None, token: str | None) -> Identity:
        """A new token for the same user (the ``refresh`` command); AccessDenied otherwise."""
        if identity is None:
            raise AccessDenied(400, "tokens_not_used", "this server does not use connection tokens")
        renewed = self.authenticate(token)
        assert renewed is not None
        if renewed.user != identity.user:
            raise AccessDenied(403, "user_mismatch", "a refreshed token must be for the same user")
        return renewed

    def may_join(self, identity: Identity | None, room: str) -> bool:
        """Public rooms: anyone. Private rooms (the configured prefix): the token's claim."""
        if not room.startswith(self._private_prefix):
            return True
        return (
            identity is not None and identity.may_join(room) and identity.expires_at > time.time()
        )


def token_from(
    authorization: str | None, query_token: str | None, offered_token: str | None = None
) -> str | None:
    """A connection token from the subprotocol offer (``wsserver.token.<jwt>``), ``?token=``
    or ``Authorization: Bearer``. A token offered as a subprotocol and also sent another
    way is refused (400 ``ambiguous_token``): which one the client meant cannot be known,
    and checking one while the other is ignored would hide a client's bug."""
    if offered_token is not None:
        if query_token or _bearer(authorization):
            raise AccessDenied(
                400,
                "ambiguous_token",
                "send the token once: in the subprotocol offer, or as ?token= or "
                "Authorization: Bearer",
                "one token per upgrade (docs/protocol.md)",
            )
        return offered_token
    return query_token or _bearer(authorization)


def _bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


@functools.lru_cache(maxsize=1024)
def _is_loopback(addr: str | None) -> bool:
    """Cached (bounded): every POST /notify asks, almost always for the same few peers, and
    ``ipaddress`` parsing was a visible share of a publish (docs/performance.md)."""
    if not addr:
        return False
    try:
        return ipaddress.ip_address(addr.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def valid_origin(origin: str) -> bool:
    """Is ``origin`` an Origin header a browser could send: ``null`` (opaque origins), or
    ``scheme://host[:port]`` with a port from 0 to 65535? Anything else is refused with 403
    ``invalid_origin`` before any rule is applied to it (it matches no rule, and parsing it
    further, e.g. ``http://[::1`` or a port of 99999, raises)."""
    if origin == "null":
        return True
    try:
        parts = urlsplit(origin.rstrip("/"))
        parts.port  # noqa: B018 - raises ValueError for a port out of range or not a number
    except ValueError:
        return False
    return bool(parts.scheme and parts.hostname) and not (
        parts.path or parts.query or parts.fragment or parts.username is not None
    )


def _claim_time_ok(value: Any) -> bool:
    """A NumericDate claim (``exp``, ``nbf``, ``iat``): a JSON number, finite, from 0 to
    :data:`MAX_CLAIM_TIME` (PyJWT also takes strings of digits and huge integers)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return 0 <= value <= MAX_CLAIM_TIME  # False for nan; inf and 10**400 are out of range
