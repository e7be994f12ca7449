"""wsserver.cli, in-process through the ``runner`` fixture: ``check-config`` prints the
effective settings with secrets masked, every usage error exits 2 with a message before
anything is contacted, and ``serve`` (with or without ``--dev``) hands gunicorn the shipped
config, the flags after ``--`` and the settings in its environment. (The command against a
real server, and in a subprocess: ``e2e/test_cli.py``.)"""

from __future__ import annotations

import os
import sys

import pytest

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
    return recorder


def test_serve_dev_runs_the_same_gunicorn_server_in_development_on_loopback(runner, execve):
    done = runner.invoke("serve", "--dev", "--port", "9001")
    assert done.exit_code == 0, done.stderr
    assert execve.argv == [sys.executable, "-m", "gunicorn", "-c", "python:wsserver.gunicorn_conf",
                           "wsserver:create_app()"]
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
    assert execve.argv[3:] == ["-c", "python:wsserver.gunicorn_conf", "--certfile", "c.pem",
                               "--keyfile", "k.pem", "--reload", "wsserver:create_app()"]


def test_a_gunicorn_flag_without_the_separator_is_a_usage_error_not_ignored(runner, execve):
    done = runner.invoke("serve", "--dev", "--certfile", "c.pem")
    assert done.exit_code == 2 and "--certfile" in done.stderr
    assert execve.argv == []  # nothing was started
