"""The ``wsserver`` command.

``wsserver serve`` runs gunicorn with the shipped config (:mod:`wsserver.gunicorn_conf`);
flags override ``WSSERVER_*`` variables by being turned into them, so gunicorn's config
module, the app factory and ``check-config`` all see one set of values.
``wsserver check-config`` prints the effective settings, or the first bad one.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from .config import ENV_PREFIX, SettingsError, load_settings

__all__ = ["main"]

APP_FACTORY = "wsserver:create_app()"
GUNICORN_CONFIG = "python:wsserver.gunicorn_conf"


def _serve(args: argparse.Namespace) -> int:
    flags = {
        "host": args.host,
        "port": args.port,
        "threads": args.threads,
        "workers": args.workers,
        "log_level": args.log_level,
    }
    for name, value in flags.items():
        if value is not None:
            os.environ[ENV_PREFIX + name.upper()] = str(value)
    if args.dev:
        os.environ[ENV_PREFIX + "ENV"] = "development"
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"wsserver: {exc}", file=sys.stderr)
        return 2
    if args.dev:
        from .app import create_app

        app = create_app(settings)
        app.run(host=settings.host, port=settings.port, threaded=True)
        return 0
    argv = ["gunicorn", "-c", GUNICORN_CONFIG, *args.gunicorn_args, APP_FACTORY]
    os.execvp(sys.executable, [sys.executable, "-m", "gunicorn", *argv[1:]])
    return 0  # not reached


def _check_config(_: argparse.Namespace) -> int:
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"wsserver: {exc}", file=sys.stderr)
        return 2
    width = max(len(name) for name, _ in settings.public_items())
    for name, value in settings.public_items():
        print(f"{name:<{width}}  {value}")
    print(f"{'(WebSocket budget per worker)':<{width}}  {settings.connection_budget}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wsserver", description="Real-time notification service (WebSocket fan-out)."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    serve = sub.add_parser("serve", help="run the server under gunicorn (the shipped config)")
    serve.add_argument("--host", help=f"interface to bind ({ENV_PREFIX}HOST, default 0.0.0.0)")
    serve.add_argument("--port", type=int, help=f"port ({ENV_PREFIX}PORT, default 8080)")
    serve.add_argument("--threads", type=int, help=f"threads per worker ({ENV_PREFIX}THREADS)")
    serve.add_argument("--workers", type=int, help=f"worker processes ({ENV_PREFIX}WORKERS)")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    serve.add_argument(
        "--dev", action="store_true", help="Flask's development server, development mode"
    )
    serve.add_argument(
        "gunicorn_args", nargs=argparse.REMAINDER, help="after --: extra gunicorn flags"
    )
    serve.set_defaults(func=_serve)

    check = sub.add_parser("check-config", help="print the effective settings and exit")
    check.set_defaults(func=_check_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "gunicorn_args", None) and args.gunicorn_args[0] == "--":
        args.gunicorn_args = args.gunicorn_args[1:]
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
