"""In-process tests of :mod:`wsserver.config`: every setting parses from its environment
variable, a bad value stops the start naming the variable, the rules that span several
settings, and the README table generated from the one declaration."""

from __future__ import annotations

import ast
import dataclasses
import typing
from pathlib import Path

import pytest
import redis
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from tlscerts import self_signed, test_cert

from wsserver import config
from wsserver.config import (
    SETTINGS,
    Settings,
    SettingsError,
    check_workers,
    load_public_key,
    load_settings,
    settings_markdown,
)

pytestmark = pytest.mark.timeout(30)

BY_NAME = {s.name: s for s in SETTINGS}
REDIS = {"WSSERVER_REDIS_URL": "redis://127.0.0.1:6379/0"}


def _public_pem() -> str:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


PEM = _public_pem()
CERT, KEY = (str(path) for path in test_cert())

# name: (environment text, parsed value, other variables the value needs to be consistent)
GOOD: dict[str, tuple[str, object, dict[str, str]]] = {
    "host": (" ::1 ", "::1", {}),
    "port": ("0", 0, {}),
    "tls_cert": (f" {CERT} ", CERT, {"WSSERVER_TLS_KEY": KEY}),
    "tls_key": (KEY, KEY, {"WSSERVER_TLS_CERT": CERT}),
    "env": (" Development ", "development", {}),
    "rebroadcast": ("off", False, {"WSSERVER_ENV": "development"}),
    "allowed_origins": (
        "https://a.example, ,https://*.b.example",
        ("https://a.example", "https://*.b.example"),
        {},
    ),
    "api_keys": ("k1,k2", ("k1", "k2"), {}),
    "trusted_proxies": (" 127.0.0.1, 10.1.2.3/8 ,::1", ("127.0.0.1/32", "10.0.0.0/8", "::1/128"),
                        {}),
    "metrics_public": ("on", True, {}),
    "jwt_secret": ("s" * 32, "s" * 32, {}),
    "jwt_public_key": (PEM, PEM.strip(), {}),
    "jwt_issuer": (" https://idp.example ", "https://idp.example",
                   {"WSSERVER_JWT_PUBLIC_KEY": PEM}),
    "jwt_audience": ("wsserver", "wsserver", {"WSSERVER_JWT_PUBLIC_KEY": PEM}),
    "private_room_prefix": ("vip-", "vip-", {}),
    "presence_prefix": ("who-", "who-", {}),
    "max_connections_per_ip": ("1000000", 1_000_000, {}),
    "rate_limit": ("0.5", 0.5, {}),
    "max_fragments": ("1", 1, {}),
    "max_control_rate": ("0", 0.0, {}),
    "max_command_rate": ("1e3", 1000.0, {}),
    "max_resumes": ("100000", 100_000, {}),
    "redis_url": ("redis://h:1/2", "redis://h:1/2", {}),
    "redis_sentinels": (" 10.0.0.1:26379, [::1]:26380,s3:1 ",
                        ("10.0.0.1:26379", "[::1]:26380", "s3:1"),
                        {"WSSERVER_REDIS_SENTINEL_MASTER": "m"}),
    "redis_sentinel_master": (" mymaster ", "mymaster",
                              {"WSSERVER_REDIS_SENTINELS": "127.0.0.1:26379"}),
    "redis_prefix": ("app1", "app1", {}),
    "history_size": ("0", 0, {}),
    "history_ttl": ("1", 1.0, {}),
    "history_max_rooms": ("7", 7, {}),
    "history_max_bytes": ("0", 0, {}),
    "idempotency_max_keys": ("1", 1, {}),
    "handshake_timeout": ("0.5", 0.5, {}),
    "request_timeout": ("3600", 3600.0, {}),
    "max_pending": ("1", 1, {}),
    "max_pending_per_ip": ("2", 2, {}),
    "max_request_head": ("1024", 1024, {}),
    "queue_size": ("1", 1, {}),
    "enqueue_timeout": ("0", 0.0, {}),
    "max_body_size": ("64", 64, {}),
    "max_message_size": ("16", 16, {}),
    "compression": ("off", False, {}),
    "compression_min_size": (" 0 ", 0, {}),
    "client_buffer": ("1024", 1024, {}),
    "send_buffer": ("0", 0, {}),
    "max_rooms_per_connection": ("3", 3, {}),
    "max_invalid_commands": ("1", 1, {}),
    "max_batch": ("10000", 10_000, {}),
    "ping_interval": ("0.05", 0.05, {}),
    "ping_timeout": ("3600", 3600.0, {}),
    "close_timeout": ("60", 60.0, {}),
    "shutdown_timeout": ("0.1", 0.1, {}),
    "threads": ("4", 4, {"WSSERVER_HTTP_THREADS": "3"}),
    "http_threads": ("1", 1, {}),
    "max_connections": ("5", 5, {}),
    "workers": ("64", 64, REDIS),
    "console": ("YES", True, {}),
    "log_format": ("json", "json", {}),
    "log_level": ("DEBUG", "debug", {}),
}

# name: a value its parser refuses (settings of free text have none)
BAD: dict[str, str] = {
    "host": "two words",
    "port": "65536",
    "tls_cert": "/nonexistent/cert.pem",
    "tls_key": "/nonexistent/key.pem",
    "env": "staging",
    "rebroadcast": "maybe",
    "trusted_proxies": "10.0.0.0/33",
    "metrics_public": "public",
    "jwt_public_key": "/nonexistent/key.pem",
    "max_connections_per_ip": "-1",
    "rate_limit": "fast",
    "max_fragments": "0",
    "max_control_rate": "-0.1",
    "max_command_rate": "1e7",
    "max_resumes": "0",
    "redis_sentinels": "10.0.0.1",
    "redis_sentinel_master": "my master",
    "history_size": "1.5",
    "history_ttl": "0.5",
    "history_max_rooms": "0",
    "history_max_bytes": "-1",
    "idempotency_max_keys": "0",
    "handshake_timeout": "0.4",
    "request_timeout": "0.9",
    "max_pending": "0",
    "max_pending_per_ip": "0",
    "max_request_head": "1023",
    "queue_size": "0",
    "enqueue_timeout": "31",
    "max_body_size": "63",
    "max_message_size": "15",
    "compression": "gzip",
    "compression_min_size": "-1",
    "client_buffer": "1023",
    "send_buffer": "-1",
    "max_rooms_per_connection": "0",
    "max_invalid_commands": "0",
    "max_batch": "10001",
    "ping_interval": "0.01",
    "ping_timeout": "0",
    "close_timeout": "61",
    "shutdown_timeout": "0.09",
    "threads": "3",
    "http_threads": "0",
    "max_connections": "1000001",
    "workers": "65",
    "console": "2",
    "log_format": "xml",
    "log_level": "trace",
}
FREE_TEXT = {"allowed_origins", "api_keys", "jwt_secret", "jwt_issuer", "jwt_audience",
             "private_room_prefix", "presence_prefix", "redis_url", "redis_prefix"}


def test_settings_are_declared_once_as_the_fields_of_settings():
    fields = dataclasses.fields(Settings)
    assert [s.name for s in SETTINGS] == [f.name for f in fields]
    assert {f.name for f in fields} == set(GOOD)  # a new setting needs a sample here
    assert set(BAD) | FREE_TEXT == set(GOOD)
    for setting in SETTINGS:
        assert setting.env == "WSSERVER_" + setting.name.upper()
        assert setting.doc.strip() and callable(setting.parse)


def test_the_defaults_load_and_are_what_each_setting_declares():
    settings = load_settings({})
    for setting in SETTINGS:
        assert getattr(settings, setting.name) == setting.default, setting.name  # production


def test_development_has_its_own_defaults_for_the_bind_address_and_rebroadcast():
    settings = load_settings({"WSSERVER_ENV": "development"})
    for setting in SETTINGS:
        expected = setting.development_default
        expected = setting.default if expected is None else expected
        if setting.name == "env":
            continue
        assert getattr(settings, setting.name) == expected, setting.name
    assert (settings.host, settings.rebroadcast) == ("127.0.0.1", True)


@pytest.mark.parametrize("env", ["production", "development"])
def test_the_bind_address_given_wins_in_either_mode(env):
    assert load_settings({"WSSERVER_ENV": env, "WSSERVER_HOST": "0.0.0.0"}).host == "0.0.0.0"
    assert load_settings({"WSSERVER_ENV": env}, {"host": "::1"}).host == "::1"
    # the mode may come from an override too (a flag): its defaults follow it
    assert load_settings({}, {"env": "development"}).host == "127.0.0.1"


@pytest.mark.parametrize("name", sorted(GOOD))
def test_each_setting_parses_from_its_variable(name):
    text, expected, extra = GOOD[name]
    settings = load_settings({BY_NAME[name].env: text, **extra})
    value = getattr(settings, name)
    assert value == expected
    hint = typing.get_type_hints(Settings)[name]
    assert isinstance(value, typing.get_origin(hint) or hint), (name, hint, value)


@pytest.mark.parametrize("name", sorted(BAD))
def test_a_bad_value_raises_settings_error_naming_the_variable(name):
    env = BY_NAME[name].env
    with pytest.raises(SettingsError) as info:
        load_settings({env: BAD[name]})
    # the variable, the form it takes, and what it got (a secret's value never shown)
    assert str(info.value).startswith(f"{env} must be "), str(info.value)
    shown = "a value (hidden: it is a secret)" if BY_NAME[name].secret else repr(BAD[name])
    if name != "redis_url":
        assert str(info.value).endswith(f", got {shown}"), str(info.value)


def test_a_bad_integer_says_the_form_not_pythons_words():
    with pytest.raises(SettingsError) as info:
        load_settings({"WSSERVER_PORT": "abc"})
    assert str(info.value) == "WSSERVER_PORT must be an integer from 0 to 65535, got 'abc'"
    with pytest.raises(SettingsError) as info:
        load_settings({"WSSERVER_HISTORY_TTL": "nan"})
    assert str(info.value) == "WSSERVER_HISTORY_TTL must be a number from 1 to 2592000, got 'nan'"


@pytest.mark.parametrize("url, said", [
    ("http://x", "must be a URL redis://host:port/db, rediss://... or unix:///path?db=N"),
    ("redis://h/0?foo=bar", "no query parameter redis-py does not know ('foo')"),
    ("redis://h/x", "database number is a whole number (not 'x')"),
    ("redis://h/0?socket_timeout=soon", "redis-py can read"),
    ("unix://", "naming the socket's path"),
    ("redis://:pw9@h:port/0", "port is a number"),
])
def test_a_redis_url_is_checked_for_form(url, said):
    with pytest.raises(SettingsError) as info:
        load_settings({"WSSERVER_REDIS_URL": url})
    assert said in str(info.value) and "pw9" not in str(info.value)


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/0", "redis://h/99", "rediss://h:1/2",
                                 "unix:///run/redis.sock?db=3", "redis://h?socket_timeout=2"])
def test_a_well_formed_redis_url_passes_whether_or_not_it_answers(url):
    assert load_settings({"WSSERVER_REDIS_URL": url}).redis_url == url


def test_redis_problem_tells_unreachable_from_refusing_without_the_password():
    from wsserver.config import redis_problem

    down = redis_problem("redis://:pw7@127.0.0.1:1/0", timeout=1)
    assert down is not None and "unreachable" in down and "pw7" not in down
    refusing = redis_problem("redis://127.0.0.1:6379/99", timeout=1)  # Redis has 16 databases
    if refusing is not None and "unreachable" in refusing:
        pytest.skip("no Redis at 127.0.0.1:6379")
    assert refusing is not None and "refused to serve" in refusing and "DB index" in refusing


@pytest.mark.parametrize("text", ["h", "h:", ":26379", "h:0", "h:65536", "h:2x", "::1:26379",
                                  "[::1]", "a b:1", "h:１２"])
def test_a_sentinel_address_must_be_host_and_port(text):
    with pytest.raises(SettingsError) as info:
        load_settings({"WSSERVER_REDIS_SENTINELS": f"127.0.0.1:26379,{text}",
                       "WSSERVER_REDIS_SENTINEL_MASTER": "m"})
    assert str(info.value).startswith("WSSERVER_REDIS_SENTINELS must be host:port addresses")


@pytest.mark.parametrize("env, said", [
    ({"WSSERVER_REDIS_SENTINELS": "127.0.0.1:26379"},
     "WSSERVER_REDIS_SENTINELS is set but WSSERVER_REDIS_SENTINEL_MASTER is not"),
    ({"WSSERVER_REDIS_SENTINEL_MASTER": "m"},
     "WSSERVER_REDIS_SENTINEL_MASTER is set but WSSERVER_REDIS_SENTINELS is not"),
    ({"WSSERVER_REDIS_SENTINELS": "127.0.0.1:26379", "WSSERVER_REDIS_SENTINEL_MASTER": "m",
      "WSSERVER_REDIS_URL": "redis://:pw5@127.0.0.1:6379/0"}, "names a host"),
    ({"WSSERVER_REDIS_SENTINELS": "127.0.0.1:26379", "WSSERVER_REDIS_SENTINEL_MASTER": "m",
      "WSSERVER_REDIS_URL": "redis://:pw5@:6379/0"}, "names a host"),
    ({"WSSERVER_REDIS_SENTINELS": "127.0.0.1:26379", "WSSERVER_REDIS_SENTINEL_MASTER": "m",
      "WSSERVER_REDIS_URL": "unix:///run/redis.sock"}, "names a host"),
])
def test_sentinel_settings_come_together_and_the_url_names_no_host(env, said):
    with pytest.raises(SettingsError) as info:
        load_settings(env)
    assert said in str(info.value) and "pw5" not in str(info.value)


def test_with_sentinels_the_url_gives_password_db_and_tls_and_workers_may_be_several():
    from wsserver.config import redis_client

    env = {"WSSERVER_REDIS_SENTINELS": "127.0.0.1:1,[::1]:2",
           "WSSERVER_REDIS_SENTINEL_MASTER": "m", "WSSERVER_WORKERS": "4"}
    settings = load_settings(env)
    assert settings.uses_redis and settings.redis_url == ""
    settings = load_settings({**env, "WSSERVER_REDIS_URL": "rediss://u:pw@/3"})
    client = redis_client(settings.redis_url, settings.redis_sentinels,
                          settings.redis_sentinel_master, socket_timeout=1.0)
    pool = client.connection_pool
    assert issubclass(pool.connection_class, redis.SSLConnection)
    assert {k: pool.connection_kwargs[k] for k in ("username", "password", "db")} == {
        "username": "u", "password": "pw", "db": 3}
    hosts = [c.connection_pool.connection_kwargs["host"] for c in pool.sentinel_manager.sentinels]
    assert hosts == ["127.0.0.1", "::1"]
    client.close()
    assert not load_settings({}).uses_redis


def test_redis_problem_with_sentinels_says_no_sentinel_named_the_master():
    from wsserver.config import redis_problem

    problem = redis_problem("redis://:pw8@/0", timeout=1, sentinels=("127.0.0.1:1",),
                            master="m")
    assert problem is not None and "pw8" not in problem
    assert problem.startswith("Redis master 'm' of WSSERVER_REDIS_SENTINELS (127.0.0.1:1) is "
                              "unknown: no sentinel answered with its address")


def test_unknown_variables_are_named_with_the_closest_known_one():
    from wsserver.config import unknown_variables

    warnings = unknown_variables({"WSSERVER_TYPO": "1", "WSSERVER_QUEUESIZE": "3",
                                  "WSSERVER_API_KEY": "k", "WSSERVER_TOKEN": "t",
                                  "WSSERVER_URL": "u", "WSSERVER_PORT": "1", "OTHER": "x"})
    assert len(warnings) == 2, warnings
    assert warnings[0] == ("WSSERVER_QUEUESIZE is not a wsserver variable and is ignored; "
                           "did you mean WSSERVER_QUEUE_SIZE?")
    assert warnings[1].startswith("WSSERVER_TYPO is not a wsserver variable")


def test_a_secret_never_appears_in_an_error_or_in_public_items():
    settings = load_settings(
        {"WSSERVER_API_KEYS": "key-one,key-two", "WSSERVER_JWT_SECRET": "hush-" * 8,
         "WSSERVER_REDIS_URL": "redis://:pw@h/0"}
    )
    shown = dict(settings.public_items())
    assert shown["WSSERVER_API_KEYS"] == "(2 set, hidden)"
    assert shown["WSSERVER_JWT_SECRET"] == "(set, hidden)"
    assert shown["WSSERVER_REDIS_URL"] == "(set, hidden)"
    assert shown["WSSERVER_PORT"] == 8080
    assert [name for name, _ in settings.public_items()] == [s.env for s in SETTINGS]
    assert "key-one" not in str(shown) and "hush" not in str(shown) and "pw" not in str(shown)


def test_empty_variables_mean_the_default_and_overrides_win():
    settings = load_settings({"WSSERVER_PORT": "  ", "WSSERVER_QUEUE_SIZE": "9"},
                             {"queue_size": 3, "port": None})
    assert settings.port == 8080  # blank: the default; an override of None: not given
    assert settings.queue_size == 3
    with pytest.raises(SettingsError, match="unknown setting 'queue'"):
        load_settings({}, {"queue": 3})


def test_settings_are_frozen():
    settings = load_settings({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    "env,rebroadcast", [("production", False), ("development", True)]
)
def test_rebroadcast_follows_the_mode_unless_set(env, rebroadcast):
    assert load_settings({"WSSERVER_ENV": env}).rebroadcast is rebroadcast
    assert load_settings({"WSSERVER_ENV": env, "WSSERVER_REBROADCAST": "on"}).rebroadcast


# -- rules over several settings -------------------------------------------------------------


def test_any_origin_only_in_development():
    with pytest.raises(SettingsError, match="ALLOWED_ORIGINS='\\*' is allowed only"):
        load_settings({"WSSERVER_ALLOWED_ORIGINS": "*"})
    assert load_settings(
        {"WSSERVER_ALLOWED_ORIGINS": "*", "WSSERVER_ENV": "development"}
    ).allowed_origins == ("*",)


def test_an_origin_needs_a_scheme():
    with pytest.raises(SettingsError, match="'app.example.com' is not an origin"):
        load_settings({"WSSERVER_ALLOWED_ORIGINS": "https://ok.example,app.example.com"})


def test_one_kind_of_token_key():
    with pytest.raises(SettingsError, match="JWT_SECRET or WSSERVER_JWT_PUBLIC_KEY, not both"):
        load_settings({"WSSERVER_JWT_SECRET": "s" * 32, "WSSERVER_JWT_PUBLIC_KEY": PEM})


def test_a_public_key_that_is_not_one_is_refused_by_name():
    not_a_key = "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----"
    with pytest.raises(SettingsError, match="^WSSERVER_JWT_PUBLIC_KEY: not a PEM public key"):
        load_settings({"WSSERVER_JWT_PUBLIC_KEY": not_a_key})
    with pytest.raises(ValueError, match="not a PEM public key"):
        load_public_key(not_a_key)
    assert isinstance(load_public_key(PEM), ec.EllipticCurvePublicKey)


@pytest.mark.parametrize("given,missing", [("CERT", "KEY"), ("KEY", "CERT")])
def test_tls_needs_both_the_certificate_and_its_key(given, missing):
    value = CERT if given == "CERT" else KEY
    with pytest.raises(SettingsError) as info:
        load_settings({f"WSSERVER_TLS_{given}": value})
    text = str(info.value)
    assert text.startswith(f"WSSERVER_TLS_{given} is set but WSSERVER_TLS_{missing} is not")
    assert "set both WSSERVER_TLS_CERT and WSSERVER_TLS_KEY" in text


def test_a_certificate_and_key_that_do_not_load_together_are_refused(tmp_path):
    _, other_key = self_signed(tmp_path)  # a key, but not this certificate's
    with pytest.raises(SettingsError, match="do not load as a certificate chain"):
        load_settings({"WSSERVER_TLS_CERT": CERT, "WSSERVER_TLS_KEY": str(other_key)})
    with pytest.raises(SettingsError, match="do not load as a certificate chain"):
        load_settings({"WSSERVER_TLS_CERT": KEY, "WSSERVER_TLS_KEY": KEY})  # a key as the cert
    settings = load_settings({"WSSERVER_TLS_CERT": CERT, "WSSERVER_TLS_KEY": KEY})
    assert (settings.tls_cert, settings.tls_key) == (CERT, KEY)


def test_http_threads_must_leave_threads_for_websockets():
    with pytest.raises(SettingsError, match="HTTP_THREADS=32 must be below WSSERVER_THREADS=32"):
        load_settings({"WSSERVER_THREADS": "32"})
    assert load_settings({"WSSERVER_THREADS": "33"}).threads == 33


def test_several_workers_need_redis():
    with pytest.raises(SettingsError) as info:
        load_settings({"WSSERVER_WORKERS": "2"})
    text = str(info.value)
    assert text.startswith("refusing to start 2 workers") and "WSSERVER_REDIS_URL" in text
    assert load_settings({"WSSERVER_WORKERS": "2", **REDIS}).workers == 2
    # the same rule, the same words, for the count gunicorn's -w gives the master
    with pytest.raises(SettingsError) as again:
        check_workers(2, "")
    assert str(again.value) == text
    check_workers(1, "")
    check_workers(3, REDIS["WSSERVER_REDIS_URL"])


def test_the_gunicorn_config_applies_the_same_rule():
    """gunicorn_conf's on_starting calls config.check_workers rather than its own copy (read
    from the source: importing the module would set up prometheus' multiprocess mode)."""
    source = (Path(config.__file__).parent / "gunicorn_conf.py").read_text(encoding="utf-8")
    tree = ast.parse(source)
    hook = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "on_starting")
    called = {n.func.id for n in ast.walk(hook)
              if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    assert "check_workers" in called
    assert "audience" not in ast.get_source_segment(source, hook)  # no second text


# -- the README table ------------------------------------------------------------------------


def test_the_markdown_table_has_one_row_per_setting_in_order():
    lines = settings_markdown().splitlines()
    assert lines[:2] == ["| variable | default | meaning |", "| --- | --- | --- |"]
    rows = lines[2:]
    assert [row.split(" | ")[0] for row in rows] == [f"| `{s.env}`" for s in SETTINGS]
    shown = {s.name: row.split(" | ")[1] for s, row in zip(SETTINGS, rows)}
    assert shown["port"] == "`8080`"
    assert shown["history_ttl"] == "`300`"  # a whole float shown as an integer
    assert shown["enqueue_timeout"] == "`0.5`"
    assert shown["api_keys"] == shown["redis_url"] == "(unset)"
    assert shown["rebroadcast"] == "on in development, off in production"
    assert shown["host"] == "`127.0.0.1` in development, `0.0.0.0` in production"
    for setting, row in zip(SETTINGS, rows):
        assert row.endswith(f" | {setting.doc} |")


def test_the_module_exports_what_it_documents():
    assert set(config.__all__) <= set(vars(config))
