"""wsserver.logs, in-process: the JSON line format, the ``wsserver`` handler set up once and
only when the host has none, and gunicorn's logconfig for JSON. (gunicorn writing JSON lines
for real: ``e2e/test_logs.py``.)"""

from __future__ import annotations

import json
import logging
import sys

import pytest

from wsserver import logs


def _record(msg: str = "hello %s", args: tuple = ("world",), exc_info=None) -> logging.LogRecord:
    return logging.LogRecord("wsserver.test", logging.WARNING, __file__, 1, msg, args, exc_info)


def test_a_json_line_has_the_documented_keys():
    entry = json.loads(logs.JsonFormatter().format(_record()))
    assert set(entry) == {"ts", "level", "logger", "pid", "message"}
    assert (entry["level"], entry["logger"], entry["message"]) == ("warning", "wsserver.test",
                                                                   "hello world")
    assert entry["ts"].endswith("Z") and len(entry["ts"]) == len("2024-01-01T00:00:00.000Z")


def test_an_exception_goes_in_exc():
    try:
        raise ValueError("boom")
    except ValueError:
        entry = json.loads(logs.JsonFormatter().format(_record(exc_info=sys.exc_info())))
    assert "ValueError: boom" in entry["exc"]


@pytest.fixture
def bare_loggers(monkeypatch):
    """Makes the ``wsserver`` and root loggers handler-less when called (in the test body:
    pytest's log capture adds its handler to the root after fixtures); restored after."""
    ours, root = logging.getLogger("wsserver"), logging.getLogger()
    monkeypatch.setattr(ours, "level", ours.level)

    def bare() -> tuple[logging.Logger, logging.Logger]:
        monkeypatch.setattr(ours, "handlers", [])
        monkeypatch.setattr(root, "handlers", [])
        return ours, root

    return bare


def test_configure_adds_one_handler_in_the_asked_format(bare_loggers):
    ours, _ = bare_loggers()
    logs.configure("debug", "json")
    logs.configure("debug", "json")  # a second app: no second handler
    assert len(ours.handlers) == 1 and ours.level == logging.DEBUG
    assert isinstance(ours.handlers[0].formatter, logs.JsonFormatter)


def test_configure_leaves_a_host_apps_logging_alone(bare_loggers):
    ours, root = bare_loggers()
    root.handlers.append(logging.NullHandler())
    logs.configure("info", "text")
    assert ours.handlers == [] and ours.level == logging.INFO


def test_gunicorn_logconfig_only_for_json():
    assert logs.gunicorn_logconfig("info", "text") is None
    config = logs.gunicorn_logconfig("warning", "json")
    assert config["formatters"]["json"]["()"] == "wsserver.logs.JsonFormatter"
    assert config["loggers"]["gunicorn.error"]["level"] == "WARNING"
    assert config["version"] == 1


# -- one text line shape and timestamp, gunicorn's and ours ------------------------------------

TEXT_LINE = r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} [+-]\d{4}\] \[\d+\] \[[A-Z]+\] [\w.]+: "


def test_a_text_line_has_one_timestamp_shape():
    import re

    line = logs.TextFormatter().format(_record())
    assert re.match(TEXT_LINE + "hello world$", line), line


def test_gunicorn_logger_writes_its_error_log_in_our_text_lines(capsys):
    """gunicorn's own error-log handler is given :class:`logs.TextFormatter` (in text mode),
    and keeps it after a second ``setup`` (a config reload)."""
    import re

    from gunicorn.config import Config

    cfg = Config()
    cfg.set("errorlog", "-")
    logger = logs.GunicornLogger(cfg)
    try:
        logger.setup(cfg)
        logger.info("Listening at: %s", "http://127.0.0.1:1")
    finally:
        for log in (logger.error_log, logger.access_log):
            for handler in list(log.handlers):
                log.removeHandler(handler)
    err = capsys.readouterr().err.strip()
    assert re.match(TEXT_LINE + "Listening at: http://127.0.0.1:1$", err), err
    assert "gunicorn.error: " in err

