"""The ``wsserver`` command.

``wsserver serve`` runs gunicorn with the shipped config (:mod:`wsserver.gunicorn_conf`);
flags override ``WSSERVER_*`` variables by being turned into them, so gunicorn's config
module, the app factory and ``check-config`` all see one set of values. ``--dev`` is the
same gunicorn server in development mode: there is no second server for development (the
Werkzeug one it used to run logged ``?token=``, had no handshake timeout and no 1001 on
SIGTERM, and ignored the gunicorn flags).
``wsserver check-config`` prints the effective settings, or the first bad one.
``wsserver notify`` and ``wsserver listen`` publish and subscribe from a shell, through
:mod:`wsserver.client` (imported only by them: the server does not need requests).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Sequence

from .config import ENV_PREFIX, SettingsError, load_settings

__all__ = ["main"]

APP_FACTORY = "wsserver:create_app()"
GUNICORN_CONFIG = "python:wsserver.gunicorn_conf"


def _serve(args: argparse.Namespace) -> int:
    """Replace this process with gunicorn running the shipped config (so signals, the exit
    status and the PID are gunicorn's). ``--dev`` is the same server in development mode:
    the flags become ``WSSERVER_*`` variables of gunicorn's environment, not of ours."""
    environ = dict(os.environ)
    flags = {
        "host": args.host,
        "port": args.port,
        "threads": args.threads,
        "workers": args.workers,
        "log_level": args.log_level,
        "env": "development" if args.dev else None,
    }
    for name, value in flags.items():
        if value is not None:
            environ[ENV_PREFIX + name.upper()] = str(value)
    try:
        load_settings(environ)  # a bad value stops here, with the same message gunicorn's would
    except SettingsError as exc:
        print(f"wsserver: {exc}", file=sys.stderr)
        return 2
    argv = [sys.executable, "-m", "gunicorn", "-c", GUNICORN_CONFIG, *args.gunicorn_args]
    os.execve(sys.executable, [*argv, APP_FACTORY], environ)
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


# -- client commands: notify and listen (wsserver.client) ------------------------------------

DEFAULT_CLIENT_URL = "http://127.0.0.1:8080"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("expected a whole number of 1 or more")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("expected a number of seconds above 0")
    return value


def _add_client_commands(sub: argparse._SubParsersAction) -> None:
    notify = sub.add_parser(
        "notify",
        help="publish a notification (POST /notify)",
        description="Publish one notification given by flags, or, without --event, the JSON "
        'object or list (a batch) read from stdin: echo \'{"event":"x"}\' | wsserver notify. '
        "Prints the server's JSON answer. Exit status: 0 accepted (a batch may still hold "
        "per-item errors, listed on stderr), 1 refused or unreachable (code and reason on "
        "stderr), 2 usage error.",
    )
    notify.add_argument("--url", default=DEFAULT_CLIENT_URL, help="server base URL (%(default)s)")
    notify.add_argument(
        "--api-key",
        default=os.environ.get("WSSERVER_API_KEY") or None,
        help="publisher key, sent as Authorization: Bearer (default: $WSSERVER_API_KEY)",
    )
    notify.add_argument(
        "--event", help="event name; without it the notification is read from stdin"
    )
    notify.add_argument("--message", help="human-readable text")
    notify.add_argument("--data", metavar="JSON", help="any JSON value, passed through to clients")
    notify.add_argument(
        "--room",
        action="append",
        dest="rooms",
        metavar="ROOM",
        help="target room (repeat for several); none: everybody",
    )
    notify.add_argument("--user", help="target one user's connections (token subject)")
    notify.add_argument(
        "--timeout", type=_positive_float, default=5.0, help="seconds per request (%(default)s)"
    )
    notify.add_argument(
        "--retries",
        type=int,
        default=5,
        help="retries on 503 (after Retry-After) and connection errors (%(default)s)",
    )
    notify.set_defaults(func=_notify)

    listen = sub.add_parser(
        "listen",
        help="print notifications as JSON lines (GET /ws)",
        description="Connect to the server's WebSocket, subscribe to the rooms and print each "
        "notification as one JSON line on stdout; progress goes to stderr. Reconnects (with "
        "backoff) and resumes after disconnects. Runs until --count notifications, --timeout "
        "seconds or Ctrl-C. Exit status: 0 done (or interrupted), 1 the server refused the "
        "subscription, or --timeout passed before --count notifications or before any "
        "connection, 2 usage error.",
    )
    listen.add_argument(
        "--url",
        default=DEFAULT_CLIENT_URL,
        help="server base URL (%(default)s); http->ws, https->wss, path /ws",
    )
    listen.add_argument(
        "--room",
        action="append",
        dest="rooms",
        default=[],
        metavar="ROOM",
        help="room to subscribe to (repeat for several); notifications to everybody always arrive",
    )
    listen.add_argument(
        "--token",
        default=os.environ.get("WSSERVER_TOKEN") or None,
        help="connection token (JWT), sent as Authorization: Bearer (default: $WSSERVER_TOKEN)",
    )
    listen.add_argument("--since", metavar="ID", help="resume the one --room after this message id")
    listen.add_argument("--count", type=_positive_int, help="exit after this many notifications")
    listen.add_argument("--timeout", type=_positive_float, help="exit after this many seconds")
    listen.set_defaults(func=_listen)


def _usage_error(command: str, message: str) -> int:
    print(f"wsserver {command}: error: {message}", file=sys.stderr)
    return 2


class _Usage(ValueError):
    """A usage error found while reading a command's input: exit 2 with this message."""


def _notify(args: argparse.Namespace) -> int:
    from .client import Publisher, PublishError, WsserverError

    try:
        body = _stdin_notification(args) if args.event is None else None
        data = _json_flag("--data", args.data)
        publisher = Publisher(
            args.url, api_key=args.api_key, timeout=args.timeout, retries=max(args.retries, 0)
        )
    except ValueError as exc:  # _Usage, or a URL the Publisher refuses
        return _usage_error("notify", str(exc))
    try:
        with publisher:
            if body is not None:
                answer = publisher.publish_body(body)
            else:
                rooms = list(dict.fromkeys(args.rooms or ()))
                answer = publisher.publish(
                    args.event,
                    message=args.message,
                    data=data,
                    room=rooms[0] if len(rooms) == 1 else None,
                    rooms=rooms if len(rooms) > 1 else None,
                    user=args.user,
                )
    except PublishError as exc:
        status = exc.status if exc.status is not None else "no answer"
        print(f"wsserver notify: {status} {exc.code}: {exc.reason}", file=sys.stderr)
        return 1
    except WsserverError as exc:
        print(f"wsserver notify: {exc}", file=sys.stderr)
        return 1
    _print_answer(answer)
    return 0


def _stdin_notification(args: argparse.Namespace) -> object:
    """The whole notification (or batch) from stdin, for ``notify`` without ``--event``."""
    import json

    given = [f for f in ("message", "data", "rooms", "user") if getattr(args, f) is not None]
    if given:
        raise _Usage(f"--{given[0]} needs --event (or give the whole notification on stdin)")
    if sys.stdin is None or sys.stdin.isatty():
        raise _Usage("give --event, or a JSON notification on stdin")
    text = sys.stdin.read()
    if not text.strip():
        raise _Usage("stdin is empty: expected a JSON object or list")
    try:
        body = json.loads(text)
    except ValueError as exc:
        raise _Usage(f"stdin is not valid JSON: {exc}") from None
    if not isinstance(body, (dict, list)):
        raise _Usage("stdin must hold a JSON object or a list of objects")
    return body


def _json_flag(flag: str, text: str | None) -> object:
    import json

    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise _Usage(f"{flag} is not valid JSON: {exc}") from None


def _print_answer(answer: dict) -> None:
    """The server's answer on stdout; each refused item of a batch also on stderr."""
    import json

    print(json.dumps(answer))
    for i, result in enumerate(answer.get("results") or ()):
        if isinstance(result, dict) and result.get("status") != "ok":
            print(
                f"wsserver notify: item {i}: {result.get('code')}: {result.get('error')}",
                file=sys.stderr,
            )


class _ListenReport:
    """What ``listen`` says on stderr as the subscriber's state changes. Its callbacks run on
    the subscriber's thread; ``stopping`` is set by the main thread once it stops reading
    (a bool read without a lock: at worst one last "reconnecting" line)."""

    def __init__(self, ws_url: str) -> None:
        self.ws_url = ws_url
        self.subscriber: Any = None  # set once built (the callbacks need it)
        self.stopping = False

    @staticmethod
    def say(text: str) -> None:
        print(f"wsserver listen: {text}", file=sys.stderr, flush=True)

    def on_state(self, state: str) -> None:
        subscriber = self.subscriber
        if state == "connecting":
            if subscriber.last_failure is None:
                self.say(f"connecting to {self.ws_url}")
            else:
                self.say(f"reconnecting to {self.ws_url} ({subscriber.last_failure})")
        elif state == "ready":
            where = ", ".join(subscriber.rooms) or "no rooms (notifications to everybody only)"
            self.say(f"connected to {self.ws_url}, subscribed to {where}")
        elif state == "closed" and not self.stopping:
            close = subscriber.last_close
            why = f" ({close[0]} {close[1]})".rstrip() if close else ""
            self.say(f"disconnected{why}; reconnecting")

    def on_gap(self, room: str | None, reply: dict) -> None:
        import json

        what = f"room {room}" if room is not None else "notifications to everybody"
        self.say(
            f"warning: {what}: notifications may have been missed "
            f"(not recoverable: {json.dumps(reply)})"
        )

    def on_error(self, err: Any) -> None:
        if err.room is not None:  # one room refused; fatal errors are reported by _listen
            self.say(f"warning: {err}")


def _listen(args: argparse.Namespace) -> int:
    from .client import Subscriber, http_to_ws_url

    try:
        ws_url = http_to_ws_url(args.url)
    except ValueError as exc:
        return _usage_error("listen", str(exc))
    rooms = list(dict.fromkeys(args.rooms))
    if args.since is not None and len(rooms) != 1:
        return _usage_error("listen", "--since resumes one room: give exactly one --room")
    report = _ListenReport(ws_url)
    try:
        report.subscriber = Subscriber(
            ws_url,
            rooms=rooms,
            token=args.token,
            since=args.since,
            on_state=report.on_state,
            on_gap=report.on_gap,
            on_error=report.on_error,
        )
    except ValueError as exc:
        return _usage_error("listen", str(exc))
    try:
        ended, received = _print_notifications(report, args)
    except KeyboardInterrupt:
        return 0
    if ended is not None:
        return ended
    if args.count is not None and received < args.count:
        report.say(f"timed out after {args.timeout}s with {received} of {args.count} notifications")
        return 1
    if report.subscriber.connects == 0:
        report.say(f"gave up after {args.timeout}s: could not connect to {ws_url}")
        return 1
    return 0


def _print_notifications(report: _ListenReport, args: argparse.Namespace) -> tuple[int | None, int]:
    """Print notifications until ``--count`` or ``--timeout``; then stop the subscriber.
    Returns (exit code if the run already ended one way, notifications printed)."""
    import json

    from .client import SubscriptionError

    subscriber, received = report.subscriber, 0
    try:
        for notification in subscriber.messages(timeout=args.timeout):
            print(json.dumps(notification, ensure_ascii=False), flush=True)
            received += 1
            if args.count is not None and received >= args.count:
                break
    except SubscriptionError as exc:
        report.say(f"the server refused the subscription: {exc}")
        return 1, received
    except BrokenPipeError:  # `wsserver listen | head -1`: the reader left, a normal end
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0, received
    finally:
        report.stopping = True
        subscriber.stop()
    return None, received


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wsserver", description="Real-time notification service (WebSocket fan-out)."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    serve = sub.add_parser(
        "serve",
        help="run the server under gunicorn (the shipped config)",
        description="Run gunicorn with the shipped config (python:wsserver.gunicorn_conf). "
        "Flags after -- go to gunicorn as they are: wsserver serve --dev -- --reload.",
    )
    serve.add_argument(
        "--host",
        help=f"interface to bind ({ENV_PREFIX}HOST; default 127.0.0.1 in development, "
        "0.0.0.0 in production)",
    )
    serve.add_argument("--port", type=int, help=f"port ({ENV_PREFIX}PORT, default 8080)")
    serve.add_argument("--threads", type=int, help=f"threads per worker ({ENV_PREFIX}THREADS)")
    serve.add_argument("--workers", type=int, help=f"worker processes ({ENV_PREFIX}WORKERS)")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    serve.add_argument(
        "--dev",
        action="store_true",
        help=f"development mode ({ENV_PREFIX}ENV=development): open defaults, loopback only; "
        "the same gunicorn server",
    )
    serve.add_argument(
        "gunicorn_args", nargs=argparse.REMAINDER, help="after --: extra gunicorn flags"
    )
    serve.set_defaults(func=_serve)

    check = sub.add_parser("check-config", help="print the effective settings and exit")
    check.set_defaults(func=_check_config)
    _add_client_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "gunicorn_args", None) and args.gunicorn_args[0] == "--":
        args.gunicorn_args = args.gunicorn_args[1:]
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
