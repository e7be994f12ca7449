"""Logging set-up: standard ``logging``, as text lines or JSON lines (``WSSERVER_LOG_FORMAT``).

Why here: the app factory configures the ``wsserver`` loggers and the gunicorn config
configures gunicorn's (error and access), and both must agree on the format.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

__all__ = ["JsonFormatter", "TEXT_FORMAT", "configure", "gunicorn_logconfig"]

TEXT_FORMAT = "[%(asctime)s] [%(process)d] [%(levelname)s] %(name)s: %(message)s"


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
    return JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT)


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
