"""wsserver.cli, in-process through the ``runner`` fixture: ``check-config`` prints the
effective settings with secrets masked, and every usage error exits 2 with a message before
anything is contacted. (The command against a real server, and in a subprocess:
``e2e/test_cli.py``.)"""

from __future__ import annotations

import pytest

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
