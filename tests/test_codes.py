"""wsserver.codes is the one list of protocol codes: the JS client declares the same values and
decides the same after every close, the Python client decides the same, docs/protocol.md's
close-code table says the same, and the module stays pure (the Python client imports it)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from wsserver import codes, protocol
from wsserver.client import _should_reconnect
from wsserver.codes import CloseAction, close_action

ROOT = Path(__file__).resolve().parent.parent
CLIENT_JS = ROOT / "wsserver" / "static" / "wsserver.js"
PROTOCOL_MD = ROOT / "docs" / "protocol.md"

# every code in the table, codes nobody declares, and every reason 1008 carries
CASES = sorted(
    {(code, "") for code in codes.CLOSE_ACTIONS}
    | {(code, "") for code in (1004, 1015, 3000, 3999, 4000, 4002, 4999, 2999)}
    | {
        (1008, reason)
        for reason in (
            codes.REASON_SLOW_CONSUMER,
            codes.REASON_INVALID_COMMANDS,
            codes.REASON_RATE_LIMIT,
            "commands over 20/s (WSSERVER_MAX_COMMAND_RATE)",
            "control frames over 20/s (WSSERVER_MAX_CONTROL_RATE)",
            "too many invalid commands, again",  # not the constant: whole reasons only
        )
    }
    | {(4001, codes.REASON_TOKEN_EXPIRED), (1001, codes.REASON_SHUTTING_DOWN)}
)


def _js_codes() -> dict:
    text = CLIENT_JS.read_text()
    match = re.search(r"const CODES = (\{.*?\n  \});", text, re.S)
    assert match, "wsserver.js declares no CODES object"
    return json.loads(match.group(1))


def test_js_constants_match_codes_py():
    assert _js_codes() == codes.js_constants()


def test_js_client_decides_as_codes_py_after_every_close():
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the JavaScript check needs it")
    script = (
        "const C = require(process.argv[1]);"
        "const cases = JSON.parse(process.argv[2]);"
        "console.log(JSON.stringify(cases.map(([c, r]) => C.closeAction(c, r))));"
    )
    result = subprocess.run(
        [node, "-e", script, str(CLIENT_JS), json.dumps(CASES)],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [str(close_action(c, r)) for c, r in CASES]


@pytest.mark.parametrize("code, reason", CASES)
def test_python_client_decides_as_codes_py(code, reason):
    action = close_action(code, reason)
    assert _should_reconnect(code, reason, renewable_token=True) is (action != CloseAction.GIVE_UP)
    assert _should_reconnect(code, reason, renewable_token=False) is (
        action == CloseAction.RECONNECT
    )


def test_the_decisions_that_used_to_disagree():
    assert close_action(1008, codes.REASON_RATE_LIMIT) == CloseAction.RECONNECT
    assert close_action(1008, codes.REASON_SLOW_CONSUMER) == CloseAction.RECONNECT
    assert close_action(1008, codes.REASON_INVALID_COMMANDS) == CloseAction.GIVE_UP
    assert close_action(4001, codes.REASON_TOKEN_EXPIRED) == CloseAction.NEW_TOKEN
    assert close_action(4123) == CloseAction.GIVE_UP and close_action(3123) == CloseAction.RECONNECT


def _protocol_table() -> list[tuple[int, list[str], str]]:
    """(code, reasons, action) of each row of protocol.md's "Close codes the server sends"."""
    text = PROTOCOL_MD.read_text().split("## Close codes the server sends", 1)[1]
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 5 or not cells[0].isdigit():
            continue
        reasons = re.findall(r"`([^`]*)`", cells[1]) or [""]
        rows.append((int(cells[0]), reasons, cells[4].strip("`")))
    return rows


def test_protocol_md_close_table_says_what_codes_py_says():
    rows = _protocol_table()
    assert {code for code, _, _ in rows} >= {1001, 1002, 1008, 1009, 1011, 1013, 4001}
    for code, reasons, action in rows:
        for reason in reasons:
            reason = reason.replace("N/s", "20/s").replace(" N ", " 65536 ")
            assert str(close_action(code, reason)) == action, (code, reason, action)


def test_protocol_md_names_every_reason_constant():
    text = PROTOCOL_MD.read_text()
    for name in dir(codes):
        if name.startswith("REASON_"):
            assert f"`{getattr(codes, name)}`" in text, name


def test_server_side_errors_are_one_set():
    # the server's own copy (service.py, or commands.py once it moves) must be the same set
    import importlib

    copies = []
    for module in ("wsserver.commands", "wsserver.service"):
        try:
            found = getattr(importlib.import_module(module), "SERVER_SIDE_ERRORS", None)
        except ImportError:
            continue
        if found is not None:
            copies.append(found)
    assert copies, "no server-side SERVER_SIDE_ERRORS found"
    for copy in copies:
        assert set(copy) == set(codes.SERVER_SIDE_ERRORS)


def test_protocol_reexports_are_the_codes():
    for name in dir(codes):
        if name.startswith("CLOSE_") and hasattr(protocol, name):
            assert getattr(protocol, name) == getattr(codes, name), name


def test_names_are_their_own_strings():
    assert json.dumps({"c": codes.ErrorCode.QUEUE_FULL}) == '{"c": "queue_full"}'
    assert str(CloseAction.GIVE_UP) == "give_up" and f"{CloseAction.RECONNECT}" == "reconnect"
    assert codes.ErrorCode.BUSY in codes.SERVER_SIDE_ERRORS and "busy" in codes.SERVER_SIDE_ERRORS


def test_codes_is_pure():
    out = subprocess.run(
        [sys.executable, "-c", "import sys, wsserver.codes; "
         "print(sorted(m for m in sys.modules if m.split('.')[0] in "
         "('flask', 'werkzeug', 'requests', 'websocket', 'prometheus_client', 'jwt')))"],
        capture_output=True, text=True, timeout=30, check=True, cwd=ROOT,
    )
    assert out.stdout.strip() == "[]"
