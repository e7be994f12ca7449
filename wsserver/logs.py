"""Logging set-up: standard ``logging``, as text lines or JSON lines (``WSSERVER_LOG_FORMAT``).

Why here: the app factory configures the ``wsserver`` loggers and the gunicorn config
configures gunicorn's (error and access), and both must agree on the format. In text, one
line shape and one timestamp for both: ``[2026-11-30 09:39:32.057 +0000] [pid] [LEVEL]
logger: message`` (:class:`TextFormatter`); gunicorn's own error-log formatter (seconds, no
logger name) is replaced by :class:`GunicornLogger`, the ``logger_class`` the shipped config
names.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from gunicorn.glogging import Logger as _GunicornLogger

__all__ = [
    "GunicornLogger",
    "JsonFormatter",
    "TEXT_FORMAT",
    "TextFormatter",
    "configure",
    "gunicorn_logconfig",
]

TEXT_FORMAT = "[%(asctime)s] [%(process)d] [%(levelname)s] %(name)s: %(message)s"


class TextFormatter(logging.Formatter):
    """:data:`TEXT_FORMAT` with one timestamp shape: local time to the millisecond with its UTC
    offset (``2026-11-30 09:39:32.057 +0000``), gunicorn's offset and our milliseconds."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        local = time.localtime(record.created)
        return (
            time.strftime("%Y-%m-%d %H:%M:%S", local)
            + f".{int(record.msecs):03d}"
            + time.strftime(" %z", local)
        )


class GunicornLogger(_GunicornLogger):
    """gunicorn's logger with its error log in :class:`TextFormatter`'s lines (in JSON mode the
    ``logconfig_dict`` has already replaced that handler). ``setup`` runs again on every config
    reload (SIGHUP), so the formatter follows."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        handler = self._get_gunicorn_handler(self.error_log)
        if handler is not None:
            handler.setFormatter(TextFormatter())


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, pid, message (and exc when any)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def _formatter(fmt: str) -> logging.Formatter:
    return JsonFormatter() if fmt == "json" else TextFormatter()


def configure(level: str, fmt: str) -> None:
    """Give the ``wsserver`` loggers a stderr handler (gunicorn configures only its own),
    unless the host application already set logging up."""
    logger = logging.getLogger("wsserver")
    logger.setLevel(level.upper())
    if logger.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(_formatter(fmt))
    logger.addHandler(handler)


def gunicorn_logconfig(level: str, fmt: str) -> dict[str, Any] | None:
    """gunicorn's ``logconfig_dict`` for JSON lines (None: gunicorn's own text format)."""
    if fmt != "json":
        return None
    handler = {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": "wsserver.logs.JsonFormatter"}},
        "handlers": {"error": handler, "access": {**handler, "stream": "ext://sys.stdout"}},
        "root": {"level": "INFO", "handlers": ["error"]},
        "loggers": {
            "gunicorn.error": {"level": level.upper(), "handlers": ["error"], "propagate": False},
            "gunicorn.access": {"level": "INFO", "handlers": ["access"], "propagate": False},
        },
    }
