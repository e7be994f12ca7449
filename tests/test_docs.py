"""What users read stays true: the README's settings table is the settings table."""

from __future__ import annotations

from support import ROOT

from wsserver.config import settings_markdown


def test_readme_settings_table_matches_the_code():
    readme = (ROOT / "README.md").read_text()
    assert settings_markdown() in readme, (
        "README.md's settings table is stale: replace it with the output of "
        "python -c 'from wsserver.config import settings_markdown; print(settings_markdown())'"
    )


def test_readme_says_a_token_needs_sub_and_exp_and_auth_agrees():
    """README, "Closed by default": a token needs ``sub`` and ``exp``; without ``exp`` it is
    refused with 401 ``invalid_token``."""
    import time

    import jwt
    import pytest

    from wsserver.auth import AccessPolicy
    from wsserver.config import load_settings
    from wsserver.exceptions import AccessDenied

    readme = (ROOT / "README.md").read_text()
    assert "two claims: `sub`" in readme and "`exp`, its expiry" in readme
    secret = "readme-hs256-secret-0123456789abcdef"
    policy = AccessPolicy(load_settings({"WSSERVER_JWT_SECRET": secret}))
    good = {"sub": "bob", "exp": int(time.time()) + 60}
    assert policy.authenticate(jwt.encode(good, secret)).user == "bob"
    for missing in ("exp", "sub"):
        claims = {k: v for k, v in good.items() if k != missing}
        with pytest.raises(AccessDenied) as refused:
            policy.authenticate(jwt.encode(claims, secret))
        assert (refused.value.status, refused.value.code) == (401, "invalid_token")
        assert missing in refused.value.reason


def test_the_readme_production_section_names_the_virtualenv():
    readme = (ROOT / "README.md").read_text()
    production = readme.split("## Running it in production", 1)[1].split("```sh", 1)[0]
    assert ".venv" in production and "/opt/wsserver/venv/bin/" in production
