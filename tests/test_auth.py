"""Access rules, unit by unit (no server): origins, publisher keys, tokens, room grants."""

from __future__ import annotations

import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from wsserver.auth import AccessPolicy
from wsserver.config import SettingsError, load_settings
from wsserver.exceptions import AccessDenied

# HS256 secrets are at least 32 bytes (WSSERVER_JWT_SECRET refuses shorter ones)
K = "test-hs256-secret-0123456789abcdef"


def policy(**env: str) -> AccessPolicy:
    return AccessPolicy(load_settings({f"WSSERVER_{k.upper()}": v for k, v in env.items()}))


def test_production_origins_same_origin_and_listed_with_wildcards():
    p = policy(env="production", allowed_origins="https://app.example.com,https://*.example.org")
    assert p.origin_allowed(None, "ws.example.com")  # not a browser
    # same origin, but with an allow-list Host must be one of the server's names (DNS rebinding)
    assert not p.origin_allowed("https://ws.example.com", "ws.example.com")
    assert p.origin_allowed("https://a.example.org", "a.example.org")  # listed, and a known host
    assert p.origin_allowed("http://localhost:8080", "localhost:8080")
    assert p.origin_allowed("http://127.0.0.1:8080", "127.0.0.1:8080")
    assert not p.origin_allowed("http://127.0.0.1:9999", "127.0.0.1:8080")
    assert policy(env="production").origin_allowed("https://ws.example.com", "ws.example.com")
    assert p.origin_allowed("https://app.example.com", "ws.example.com")
    assert p.origin_allowed("https://a.b.example.org", "ws.example.com")
    assert not p.origin_allowed("https://example.org.evil.com", "ws.example.com")
    assert not p.origin_allowed("http://x.example.org", "ws.example.com"), "scheme matters"
    assert not p.origin_allowed("https://evil.com", "ws.example.com")
    assert p.cors_origin("https://app.example.com") == "https://app.example.com"
    assert p.cors_origin("https://evil.com") is None


def test_development_allows_any_origin_and_star_is_development_only():
    assert policy(env="development").origin_allowed("https://anything.test", "x")
    with pytest.raises(SettingsError, match="WSSERVER_ALLOWED_ORIGINS"):
        load_settings({"WSSERVER_ALLOWED_ORIGINS": "*"})
    with pytest.raises(SettingsError, match="not an origin"):
        load_settings({"WSSERVER_ALLOWED_ORIGINS": "example.com"})


def test_publishers_loopback_in_production_keys_when_configured():
    p = policy(env="production")
    p.check_publisher(None, "127.0.0.1")
    p.check_publisher(None, "::1")
    with pytest.raises(AccessDenied) as info:
        p.check_publisher(None, "10.1.2.3")
    assert info.value.status == 403
    keyed = policy(env="development", api_keys="old-key,new-key")
    keyed.check_publisher("Bearer new-key", "10.1.2.3")
    keyed.check_publisher("bearer old-key", "10.1.2.3")
    for header, code in ((None, "missing_api_key"), ("Bearer nope", "invalid_api_key"),
                         ("Basic new-key", "missing_api_key"), ("Bearer ", "missing_api_key")):
        with pytest.raises(AccessDenied) as info:
            keyed.check_publisher(header, "127.0.0.1")
        assert info.value.status == 401 and info.value.code == code
        assert "new-key" not in info.value.reason and "old-key" not in info.value.reason


def test_hs256_tokens():
    p = policy(jwt_secret=K)
    good = jwt.encode({"sub": "u1", "exp": time.time() + 60, "rooms": ["private-a", "private-team-*"]},
                      K, algorithm="HS256")
    ident = p.authenticate(good)
    assert ident.user == "u1"
    assert p.may_join(ident, "private-a") and p.may_join(ident, "private-team-7")
    assert not p.may_join(ident, "private-b") and p.may_join(ident, "public")
    assert not p.may_join(None, "private-a")
    cases = {
        "missing_token": None,
        "token_expired": jwt.encode({"sub": "u", "exp": time.time() - 5}, K, algorithm="HS256"),
        "invalid_token": jwt.encode({"sub": "u", "exp": time.time() + 60}, "x" * 40, "HS256"),
    }
    for code, token in cases.items():
        with pytest.raises(AccessDenied) as info:
            p.authenticate(token)
        assert info.value.status == 401 and info.value.code == code
    for bad in ("garbage", good[:-3] + "abc", jwt.encode({"sub": "u"}, K, algorithm="HS256"),
                jwt.encode({"exp": time.time() + 60}, K, algorithm="HS256"),
                jwt.encode({"sub": "u", "exp": time.time() + 60}, K * 2, algorithm="HS512")):
        with pytest.raises(AccessDenied) as info:
            p.authenticate(bad)
        assert info.value.code == "invalid_token"
        assert K not in info.value.reason


@pytest.mark.parametrize("kind", ["rsa", "ec"])
def test_public_key_tokens(kind, tmp_path):
    if kind == "rsa":
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        alg = "RS256"
    else:
        private = ec.generate_private_key(ec.SECP256R1())
        alg = "ES256"
    pem = private.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    key_file = tmp_path / "key.pem"
    key_file.write_text(pem)
    for value in (pem, str(key_file)):
        p = policy(jwt_public_key=value)
        token = jwt.encode({"sub": "u2", "exp": time.time() + 60}, private, algorithm=alg)
        assert p.authenticate(token).user == "u2"
        forged = jwt.encode({"sub": "u2", "exp": time.time() + 60}, "pem-as-secret" * 3,
                            algorithm="HS256")
        with pytest.raises(AccessDenied):
            p.authenticate(forged)
    with pytest.raises(SettingsError, match="WSSERVER_JWT_PUBLIC_KEY"):
        load_settings({"WSSERVER_JWT_PUBLIC_KEY": "/nonexistent.pem"})


def test_refresh_keeps_the_user():
    p = policy(jwt_secret=K)
    first = p.authenticate(jwt.encode({"sub": "u", "exp": time.time() + 5}, K, algorithm="HS256"))
    later = p.refresh(first, jwt.encode({"sub": "u", "exp": time.time() + 500}, K, algorithm="HS256"))
    assert later.expires_at > first.expires_at
    with pytest.raises(AccessDenied) as info:
        p.refresh(first, jwt.encode({"sub": "v", "exp": time.time() + 500}, K, algorithm="HS256"))
    assert info.value.code == "user_mismatch"


def test_secrets_are_masked_for_display():
    s = load_settings({"WSSERVER_API_KEYS": "abc,def", "WSSERVER_JWT_SECRET": K})
    shown = dict(s.public_items())
    assert "abc" not in str(shown) and K not in str(shown)
    assert policy(api_keys="abc").describe().count("abc") == 0


def _signed(claims: dict, key: str = K) -> str:
    """A validly signed HS256 token with exactly these claims (PyJWT's encoder writes
    10**400, inf and nan as JSON text: Python's json does)."""
    return jwt.encode(claims, key, algorithm="HS256")


OUT_OF_RANGE = [
    {"exp": 10**400},
    {"exp": 1e300},
    {"exp": float("inf")},
    {"exp": float("nan")},
    {"exp": "9999999999"},
    {"exp": True},
    {"exp": None},
    {"exp": [1]},
    {"nbf": 10**400},
    {"nbf": -(10**400)},
    {"nbf": "soon"},
    {"iat": 10**400},
    {"iat": float("-inf")},
    {"iat": -5},
]


@pytest.mark.parametrize("bad", OUT_OF_RANGE, ids=lambda c: repr(c)[:40])
def test_out_of_range_claims_are_401_at_connect_and_on_refresh(bad):
    """A token signed with the right key but with a time claim no clock can reach (or not a
    number) is refused as invalid (401), not an OverflowError turned into a 500."""
    p = policy(jwt_secret=K)
    claims = {"sub": "u", "exp": time.time() + 60, **bad}
    codes = ("invalid_token", "token_expired")  # PyJWT reads exp=true as 1: long expired
    with pytest.raises(AccessDenied) as info:
        p.authenticate(_signed(claims))
    assert info.value.status == 401 and info.value.code in codes
    first = p.authenticate(_signed({"sub": "u", "exp": time.time() + 60}))
    with pytest.raises(AccessDenied) as info:
        p.refresh(first, _signed(claims))
    assert info.value.status == 401 and info.value.code in codes


def test_claims_up_to_year_9999_are_accepted():
    p = policy(jwt_secret=K)
    far = p.authenticate(_signed({"sub": "u", "exp": 253_402_300_799, "iat": 0, "nbf": 1.5}))
    assert far.expires_at == 253_402_300_799.0


@pytest.mark.parametrize("origin", ["http://127.0.0.1:99999", "http://[::1", "not an origin",
                                    "http://", "http://a@b", "https://x/path", "http://x:port"])
def test_malformed_origins_are_never_allowed_and_never_raise(origin):
    from wsserver.auth import valid_origin

    assert not valid_origin(origin)
    for p in (policy(env="production"), policy(env="production", allowed_origins="http://x")):
        assert not p.origin_allowed(origin, "127.0.0.1:8080")
        assert not p.origin_allowed("http://127.0.0.1:8080", "127.0.0.1:99999")
        assert not p.origin_allowed("http://[::1]:8080", "[::1")
    assert not policy(env="development").origin_allowed(origin, "x")
    for good in ("null", "http://127.0.0.1:8080", "https://[::1]:443", "chrome-extension://abc"):
        assert valid_origin(good), good


def test_an_hs256_secret_under_32_bytes_stops_the_start_naming_the_setting():
    for short in ("k", "s3cret", "x" * 31, "é" * 15 + "x"):  # 31 bytes, whatever the characters
        with pytest.raises(SettingsError, match="WSSERVER_JWT_SECRET") as info:
            load_settings({"WSSERVER_JWT_SECRET": short})
        assert "at least 32 bytes" in str(info.value)
        assert len(short) < 3 or short not in str(info.value)  # the secret is never shown
    assert load_settings({"WSSERVER_JWT_SECRET": "x" * 32}).jwt_secret == "x" * 32
    assert load_settings({"WSSERVER_JWT_SECRET": "é" * 16}).jwt_secret  # 32 bytes in UTF-8


def test_issuer_and_audience_need_a_token_key():
    for name in ("WSSERVER_JWT_ISSUER", "WSSERVER_JWT_AUDIENCE"):
        with pytest.raises(SettingsError, match=name):
            load_settings({name: "https://idp.example"})


def _denied(p: AccessPolicy, claims: dict) -> AccessDenied:
    with pytest.raises(AccessDenied) as info:
        p.authenticate(_signed({"sub": "u", "exp": time.time() + 60, **claims}))
    assert info.value.status == 401
    return info.value


def test_issuer_and_audience_when_configured_are_required_and_must_match():
    p = policy(jwt_secret=K, jwt_issuer="https://idp.example", jwt_audience="wsserver")
    ok = {"iss": "https://idp.example", "aud": "wsserver"}
    assert p.authenticate(_signed({"sub": "u", "exp": time.time() + 60, **ok})).user == "u"
    listed = {**ok, "aud": ["billing", "wsserver"]}  # RFC 7519 4.1.3: a list naming us
    assert p.authenticate(_signed({"sub": "u", "exp": time.time() + 60, **listed})).user == "u"
    for claims, reason in (
        ({"aud": "wsserver"}, "no 'iss' claim"),
        ({"iss": "https://idp.example"}, "no 'aud' claim"),
        ({**ok, "iss": "https://evil.example"}, "'iss' is not"),
        ({**ok, "aud": "billing"}, "'aud' does not name"),
        ({**ok, "aud": ["billing"]}, "'aud' does not name"),
        ({**ok, "aud": "WSSERVER"}, "'aud' does not name"),  # case matters (StringOrURI)
    ):
        denied = _denied(p, claims)
        assert denied.code == "invalid_token" and reason in denied.reason, claims
    # the refresh command checks the same
    first = p.authenticate(_signed({"sub": "u", "exp": time.time() + 60, **ok}))
    with pytest.raises(AccessDenied) as info:
        p.refresh(first, _signed({"sub": "u", "exp": time.time() + 600, **ok, "aud": "billing"}))
    assert info.value.code == "invalid_token"


def test_without_an_audience_setting_aud_is_not_checked():
    """PyJWT alone refuses every token that carries ``aud`` when no audience is given: a token
    from an identity provider that always sets one could never connect. Unconfigured, the
    server has no name to compare it with, so it does not check it (docs/security.md)."""
    p = policy(jwt_secret=K)
    for aud in ("wsserver", ["a", "b"], "anything"):
        assert p.authenticate(_signed({"sub": "u", "exp": time.time() + 60, "aud": aud})).user
    issuer_only = policy(jwt_secret=K, jwt_issuer="https://idp.example")
    claims = {"sub": "u", "exp": time.time() + 60, "iss": "https://idp.example", "aud": "x"}
    assert issuer_only.authenticate(_signed(claims)).user == "u"


@pytest.mark.parametrize("claim", ["exp", "nbf", "iat"])
def test_numeric_claims_written_as_strings_are_invalid_tokens(claim):
    """RFC 7519 NumericDate is a JSON number; PyJWT would read "9999999999" with int()."""
    p = policy(jwt_secret=K)
    claims = {"sub": "u", "exp": time.time() + 60}
    claims[claim] = "9999999999" if claim == "exp" else "1"
    denied = _denied(p, claims)
    assert denied.code == "invalid_token", denied.reason
