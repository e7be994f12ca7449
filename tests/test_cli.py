"""wsserver.cli, in-process through the ``runner`` fixture: ``check-config`` prints the
effective settings with secrets masked, every usage error exits 2 with a message before
anything is contacted, and ``serve`` (with or without ``--dev``) hands gunicorn the shipped
config, the flags after ``--`` and the settings in its environment. (The command against a
real server, and in a subprocess: ``e2e/test_cli.py``.)"""

from __future__ import annotations

import os
import sys

import pytest

from wsserver import __version__, cli
from wsserver.config import load_settings

SECRETS = {"WSSERVER_API_KEYS": "sk-alpha-91f3,sk-beta-77c2",
           "WSSERVER_JWT_SECRET": "jwt-secret-c0ffee-0123456789abcdef"}
NOWHERE = "http://127.0.0.1:9"  # never contacted: each case fails before


def test_check_config_prints_settings_and_masks_secrets(runner):
    done = runner.invoke("check-config", env={**SECRETS, "WSSERVER_QUEUE_SIZE": "77",
                                              "WSSERVER_THREADS": "40",
                                              "WSSERVER_HTTP_THREADS": "8"})
    assert done.exit_code == 0, done.stderr
    lines = {name: value.strip() for name, _, value in
             (line.partition(" ") for line in done.stdout.splitlines())
             if name.startswith("WSSERVER_")}
    assert lines["WSSERVER_QUEUE_SIZE"] == "77"
    assert lines["WSSERVER_API_KEYS"] == "(2 set, hidden)"
    assert lines["WSSERVER_JWT_SECRET"] == "(set, hidden)"
    assert done.stdout.rstrip().endswith("32")  # the WebSocket budget: 40 - 8
    for value in SECRETS.values():
        for part in value.split(","):
            assert part not in done.stdout + done.stderr


@pytest.mark.parametrize("command", ["check-config", "serve"])
def test_a_bad_setting_exits_2_naming_it(runner, command):
    done = runner.invoke(command, env={"WSSERVER_QUEUE_SIZE": "lots"})
    assert done.exit_code == 2
    assert "WSSERVER_QUEUE_SIZE" in done.stderr and done.stdout == ""


@pytest.mark.parametrize("args, stdin, message", [
    (["--event", "x", "--data", "{not json"], None, "--data is not valid JSON"),
    (["--message", "no event"], None, "--message needs --event"),
    ([], "not json", "stdin is not valid JSON"),
    ([], "", "stdin is empty"),
    ([], '"a string"', "stdin must hold a JSON object or a list"),
    ([], None, "give --event, or a JSON notification on stdin"),
])
def test_notify_usage_errors_exit_2(runner, args, stdin, message):
    done = runner.invoke("notify", "--url", NOWHERE, *args, input=stdin)
    assert done.exit_code == 2 and message in done.stderr
    assert done.stdout == ""


def test_notify_refuses_a_url_it_cannot_publish_to(runner):
    done = runner.invoke("notify", "--url", "ftp://nowhere", "--event", "x")
    assert done.exit_code == 2 and "wsserver notify: error:" in done.stderr


@pytest.mark.parametrize("args", [
    ["notify", "--retries"],
    ["listen", "--count", "0"],
    ["no-such-command"],
    [],
])
def test_argparse_errors_exit_2(runner, args):
    done = runner.invoke(*args)
    assert done.exit_code == 2 and "usage: wsserver" in done.stderr


def test_listen_since_needs_exactly_one_room(runner):
    done = runner.invoke("listen", "--url", NOWHERE, "--since", "3")
    assert done.exit_code == 2 and "--since" in done.stderr


# -- serve: the command line it hands gunicorn ---------------------------------------------------


class Exec:
    """Stands in for ``os.execve`` (which would replace the test process with gunicorn):
    records what ``serve`` would run, then ends the command as the exec would have."""

    def __init__(self) -> None:
        self.argv: list[str] = []
        self.env: dict[str, str] = {}

    def __call__(self, path: str, argv: list[str], env: dict[str, str]) -> None:
        assert path == argv[0]
        self.argv, self.env = list(argv), dict(env)
        raise SystemExit(0)

    def settings(self):
        return load_settings(self.env)


@pytest.fixture
def execve(monkeypatch) -> Exec:
    for name in list(os.environ):
        if name.startswith("WSSERVER_"):
            monkeypatch.delenv(name)
    recorder = Exec()
    monkeypatch.setattr(os, "execve", recorder)
    # these tests name ports others may hold; the probe itself: test_serve_refuses_a_taken_port
    monkeypatch.setattr(cli, "bind_problem", lambda address: None)
    return recorder


def test_serve_dev_runs_the_same_gunicorn_server_in_development_on_loopback(runner, execve):
    done = runner.invoke("serve", "--dev", "--port", "9001")
    assert done.exit_code == 0, done.stderr
    assert execve.argv == [sys.executable, cli.GUNICORN_MAIN, "-c",
                           "python:wsserver.gunicorn_conf", "wsserver:create_app()"]
    assert execve.env["WSSERVER_ENV"] == "development"
    settings = execve.settings()
    assert (settings.host, settings.port, settings.rebroadcast) == ("127.0.0.1", 9001, True)
    assert "WSSERVER_ENV" not in os.environ  # gunicorn's environment, not the caller's


def test_serve_without_dev_keeps_production_and_its_bind_address(runner, execve):
    assert runner.invoke("serve").exit_code == 0
    assert "WSSERVER_ENV" not in execve.env
    assert (execve.settings().env, execve.settings().host) == ("production", "0.0.0.0")


@pytest.mark.parametrize("args, env", [
    (["--dev", "--host", "0.0.0.0"], {}),
    (["--dev"], {"WSSERVER_HOST": "0.0.0.0"}),
    ([], {"WSSERVER_ENV": "development", "WSSERVER_HOST": "0.0.0.0"}),  # ./scripts/serve's way
])
def test_development_binds_elsewhere_only_when_told(runner, execve, args, env):
    assert runner.invoke("serve", *args, env=env).exit_code == 0
    assert (execve.settings().env, execve.settings().host) == ("development", "0.0.0.0")


def test_serve_dev_hands_gunicorn_the_flags_after_the_separator(runner, execve):
    done = runner.invoke("serve", "--dev", "--", "--certfile", "c.pem", "--keyfile", "k.pem",
                         "--reload")
    assert done.exit_code == 0, done.stderr
    assert execve.argv[2:] == ["-c", "python:wsserver.gunicorn_conf", "--certfile", "c.pem",
                               "--keyfile", "k.pem", "--reload", "wsserver:create_app()"]


def test_a_gunicorn_flag_without_the_separator_is_a_usage_error_not_ignored(runner, execve):
    done = runner.invoke("serve", "--dev", "--certfile", "c.pem")
    assert done.exit_code == 2 and "--certfile" in done.stderr
    assert execve.argv == []  # nothing was started


# -- issue 15: the command's own surface ---------------------------------------------------------


def test_version(runner):
    done = runner.invoke("--version")
    assert done.exit_code == 0 and done.stdout.strip() == f"wsserver {__version__}"


def _actions(parser):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from ((f"{name} {a}", h) for a, h in _actions(sub))
        else:
            yield "/".join(action.option_strings) or action.dest, action.help


def test_every_command_and_flag_has_help():
    parser = cli.build_parser()
    missing = [name for name, help_ in _actions(parser) if not help_]
    assert missing == []
    commands = next(a for a in parser._actions if a.choices and "serve" in a.choices)
    helps = {c.dest: c.help for c in commands._choices_actions}
    assert set(helps) == {"serve", "check-config", "notify", "listen", "history", "disconnect",
                          "unsubscribe"} and all(helps.values())


def test_check_config_names_the_variable_and_the_form(runner):
    done = runner.invoke("check-config", env={"WSSERVER_PORT": "abc"})
    assert done.exit_code == 2 and done.stdout == ""
    assert done.stderr.strip() == (
        "wsserver: WSSERVER_PORT must be an integer from 0 to 65535, got 'abc'"
    )


def test_check_config_warns_about_an_unknown_variable_with_the_closest_name(runner):
    done = runner.invoke("check-config", env={"WSSERVER_QUEUE_SIZ": "7"})
    assert done.exit_code == 0
    assert "WSSERVER_QUEUE_SIZ is not a wsserver variable" in done.stderr
    assert "did you mean WSSERVER_QUEUE_SIZE?" in done.stderr


def test_check_config_prints_values_as_the_environment_takes_them(runner):
    done = runner.invoke("check-config", env={
        "WSSERVER_ENV": "development", "WSSERVER_ALLOWED_ORIGINS": "https://a,https://b",
        "WSSERVER_CONSOLE": "no"})
    assert done.exit_code == 0, done.stderr
    lines = dict(line.split(None, 1) if " " in line else (line, "")
                 for line in done.stdout.splitlines() if line.startswith("WSSERVER_"))
    assert lines["WSSERVER_ALLOWED_ORIGINS"] == "https://a,https://b"
    assert lines["WSSERVER_REBROADCAST"].strip() == "on"
    assert lines["WSSERVER_CONSOLE"].strip() == "off"
    assert lines["WSSERVER_TLS_CERT"] == ""  # unset: empty, as an unset variable
    assert lines["WSSERVER_HISTORY_TTL"].strip() == "300"
    assert "()" not in done.stdout and "False" not in done.stdout and "('" not in done.stdout


@pytest.mark.parametrize("url, said", [
    ("http://x", "WSSERVER_REDIS_URL must be a URL redis://"),
    ("redis://127.0.0.1:6379/0?foo=bar", "no query parameter redis-py does not know ('foo')"),
    ("redis://127.0.0.1:6379/zero", "database number is a whole number"),
    ("redis://:s3cret@127.0.0.1:notaport/0", "port is a number"),
])
def test_check_config_refuses_a_malformed_redis_url_as_serve_does(runner, url, said):
    for command in ("check-config", "serve"):
        done = runner.invoke(command, env={"WSSERVER_REDIS_URL": url})
        assert done.exit_code == 2 and said in done.stderr, (command, done.stderr)
        assert "s3cret" not in done.stderr and "unreachable" not in done.stderr


def test_check_config_tells_an_unreachable_redis_from_a_refusing_one(runner):
    done = runner.invoke("check-config", env={"WSSERVER_REDIS_URL": "redis://:pw1@127.0.0.1:1/0"})
    assert done.exit_code == 3 and "unreachable" in done.stderr and "pw1" not in done.stderr
    assert runner.invoke("check-config", "--no-connect",
                         env={"WSSERVER_REDIS_URL": "redis://127.0.0.1:1/0"}).exit_code == 0


def test_check_config_asks_the_sentinels_and_refuses_half_a_sentinel_setup(runner):
    sentinels = {"WSSERVER_REDIS_SENTINELS": "127.0.0.1:1", "WSSERVER_REDIS_SENTINEL_MASTER": "m",
                 "WSSERVER_REDIS_URL": "redis://:pw2@/0", "WSSERVER_WORKERS": "2"}
    done = runner.invoke("check-config", env=sentinels)
    assert done.exit_code == 3 and "pw2" not in done.stderr + done.stdout
    assert "Redis master 'm' of WSSERVER_REDIS_SENTINELS (127.0.0.1:1) is unknown" in done.stderr
    assert runner.invoke("check-config", "--no-connect", env=sentinels).exit_code == 0
    for command in ("check-config", "serve"):
        done = runner.invoke(command, env={"WSSERVER_REDIS_SENTINEL_MASTER": "m"})
        assert done.exit_code == 2 and "WSSERVER_REDIS_SENTINELS is not" in done.stderr


def test_serve_refuses_a_taken_port_in_one_line_before_gunicorn(runner, monkeypatch):
    import socket

    started: list = []
    monkeypatch.setattr(os, "execve", lambda *a: started.append(a))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = runner.invoke("serve", "--host", "127.0.0.1", "--port", str(port))
    assert done.exit_code == 1 and started == []
    assert done.stderr == f"wsserver: cannot listen on 127.0.0.1:{port}: address already in use\n"


def test_notify_to_a_dead_port_says_so_in_one_sentence(runner):
    done = runner.invoke("notify", "--url", NOWHERE, "--event", "x", "--retries", "0")
    assert done.exit_code == 1
    assert done.stderr == f"wsserver: cannot reach {NOWHERE}: connection refused\n"


@pytest.mark.parametrize("command", [["notify", "--event", "x"], ["listen"]])
def test_client_commands_say_which_extra_to_install(runner, monkeypatch, command):
    monkeypatch.setitem(sys.modules, "requests", None)  # as if not installed
    monkeypatch.delitem(sys.modules, "wsserver.client", raising=False)
    done = runner.invoke(*command, "--url", NOWHERE)
    assert done.exit_code == 1
    assert f"wsserver {command[0]} needs the client extra" in done.stderr
    assert "pip install 'wsserver[client]'" in done.stderr


# -- the server API: history, disconnect, unsubscribe ----------------------------------------


@pytest.mark.parametrize("args", [
    ["disconnect"],
    ["disconnect", "--user"],
    ["unsubscribe", "--user", "u"],
    ["history"],
    ["history", "r", "--limit", "0"],
    ["history", "r", "--limit", "x"],
])
def test_server_api_usage_errors_exit_2(runner, args):
    done = runner.invoke(*args, "--url", NOWHERE)
    assert done.exit_code == 2 and done.stderr


def test_server_api_commands_refuse_a_url_they_cannot_call(runner):
    done = runner.invoke("disconnect", "--user", "u", "--url", "ftp://nowhere")
    assert done.exit_code == 2 and "wsserver disconnect: error:" in done.stderr


def test_server_api_to_a_dead_port_says_so_in_one_sentence(runner):
    done = runner.invoke("history", "r", "--url", NOWHERE, "--retries", "0")
    assert done.exit_code == 1 and done.stderr.startswith("wsserver: cannot reach")


@pytest.fixture
def http_url(make_app):
    """The real app (memory broker) behind werkzeug's threaded HTTP server."""
    import threading

    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", 0, make_app(env="development"), threaded=True)
    thread = threading.Thread(target=server.serve_forever, name="test-http", daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_server_api_commands_print_the_answer(runner, http_url):
    import json

    for i in range(3):
        assert runner.invoke("notify", "--url", http_url, "--event", "e", "--data", str(i),
                             "--room", "r").exit_code == 0
    done = runner.invoke("history", "r", "--limit", "2", "--url", http_url)
    assert done.exit_code == 0, done.stderr
    page = json.loads(done.stdout)
    assert [m["data"] for m in page["messages"]] == [1, 2] and page["complete"] is True
    since = page["messages"][0]["id"]
    later = json.loads(runner.invoke("history", "r", "--since", since, "--url", http_url).stdout)
    assert [m["data"] for m in later["messages"]] == [2]
    done = runner.invoke("disconnect", "--user", "alice", "--url", http_url)
    assert done.exit_code == 0 and json.loads(done.stdout)["closed"] == 0
    done = runner.invoke("unsubscribe", "--user", "alice", "--room", "r", "--url", http_url)
    assert done.exit_code == 0 and json.loads(done.stdout)["unsubscribed"] == 0
    refused = runner.invoke("unsubscribe", "--user", "alice", "--room", "a b", "--url", http_url)
    assert refused.exit_code == 1
    assert refused.stderr.startswith("wsserver unsubscribe: 400 invalid_room:")
    refused = runner.invoke("history", "r", "--since", "nope", "--url", http_url)
    assert refused.exit_code == 1 and "invalid_since" in refused.stderr
