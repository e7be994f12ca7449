"""The ``wsserver`` command.

``wsserver serve`` runs gunicorn with the shipped config (:mod:`wsserver.gunicorn_conf`);
flags override ``WSSERVER_*`` variables by being turned into them, so gunicorn's config
module, the app factory and ``check-config`` all see one set of values. ``--dev`` is the
same gunicorn server in development mode: there is no second server for development (the
Werkzeug one it used to run logged ``?token=``, had no handshake timeout and no 1001 on
SIGTERM, and ignored the gunicorn flags).
``wsserver check-config`` prints the effective settings, or the first bad one.
``wsserver notify`` and ``wsserver listen`` publish and subscribe from a shell, through
:mod:`wsserver.client` (imported only by them: the server does not need requests);
``wsserver history``, ``disconnect`` and ``unsubscribe`` call the server API the same way.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Sequence

from . import __version__
from .config import (
    ENV_PREFIX,
    SettingsError,
    load_settings,
    redis_problem,
    unknown_variables,
)

__all__ = ["main"]

APP_FACTORY = "wsserver:create_app()"
GUNICORN_CONFIG = "python:wsserver.gunicorn_conf"
# run as a script, not `-m gunicorn`: the current directory must not decide which wsserver
GUNICORN_MAIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gunicorn_main.py")
CLIENT_EXTRA = "pip install 'wsserver[client]'"


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
        settings = load_settings(environ)  # a bad value stops here, as gunicorn's would
    except SettingsError as exc:
        print(f"wsserver: {exc}", file=sys.stderr)
        return 2
    # gunicorn's own -b or --reuse-port decide: then its on_starting hook probes the binds
    own = any(a.startswith(("-b", "--bind", "--reuse-port")) for a in args.gunicorn_args)
    problem = None if own else bind_problem((settings.host, settings.port))
    if problem:  # gunicorn would retry 5 times a second apart, an ERROR line each
        print(f"wsserver: {problem}", file=sys.stderr)
        return 1
    argv = [sys.executable, GUNICORN_MAIN, "-c", GUNICORN_CONFIG, *args.gunicorn_args]
    os.execve(sys.executable, [*argv, APP_FACTORY], environ)
    return 0  # not reached


def bind_problem(address: Any) -> str | None:
    """Why ``address`` (a (host, port) pair, as gunicorn parses ``-b``) cannot be bound, or
    ``None``. Binds with SO_REUSEADDR as gunicorn does, so a port in TIME_WAIT passes; port 0
    always binds. Used by ``serve`` before it execs gunicorn and by the shipped gunicorn
    config's ``on_starting`` (plain ``gunicorn -c python:wsserver.gunicorn_conf``)."""
    import socket

    if not isinstance(address, tuple):
        return None  # a unix socket path (gunicorn removes a stale one itself) or an fd
    host, port = address[0], address[1]
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    shown = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as exc:
        why = os.strerror(exc.errno).lower() if exc.errno else str(exc)
        return f"cannot listen on {shown}: {why}"
    return None


def _check_config(args: argparse.Namespace) -> int:
    """What ``serve`` would check before starting, in the same order and words: settings
    (exit 2), then Redis reachability (exit 3); unknown ``WSSERVER_*`` variables are warned
    about. Values are printed as the variables take them."""
    for warning in unknown_variables():
        print(f"wsserver: warning: {warning}", file=sys.stderr)
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"wsserver: {exc}", file=sys.stderr)
        return 2
    items = settings.environment_items()
    width = max(len(name) for name, _ in items)
    for name, value in items:
        print(f"{name:<{width}}  {value}".rstrip())
    print(f"{'(WebSocket budget per worker)':<{width}}  {settings.connection_budget}")
    sys.stdout.flush()  # here, where a closed pipe is handled, not at exit
    problem = None
    if settings.uses_redis:
        problem = redis_problem(settings.redis_url, sentinels=settings.redis_sentinels,
                                master=settings.redis_sentinel_master)
    if problem and not args.no_connect:
        print(f"wsserver: {problem}", file=sys.stderr)
        return 3
    return 0


# -- client commands: notify and listen (wsserver.client) ------------------------------------

DEFAULT_CLIENT_URL = "http://127.0.0.1:8080"
# the client commands' variables (flags win); config.CLIENT_VARIABLES lists them as known
URL_VARIABLE, API_KEY_VARIABLE, TOKEN_VARIABLE = (
    ENV_PREFIX + "URL",
    ENV_PREFIX + "API_KEY",
    ENV_PREFIX + "TOKEN",
)


def _client(command: str) -> Any:
    """:mod:`wsserver.client`, or ``None`` after saying which extra to install: the server
    does not need requests and websocket-client, so ``pip install wsserver`` leaves them out."""
    import importlib

    try:
        client = importlib.import_module(__package__ + ".client")
    except ImportError as exc:
        missing = getattr(exc, "name", None) or "a dependency"
        print(
            f"wsserver {command} needs the client extra ({missing} is not installed): "
            f"{CLIENT_EXTRA}",
            file=sys.stderr,
        )
        return None
    return client


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
    _add_publisher_options(notify)
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
        default=os.environ.get(URL_VARIABLE) or DEFAULT_CLIENT_URL,
        help=f"server base URL (default: ${URL_VARIABLE}, else {DEFAULT_CLIENT_URL}); "
        "http->ws, https->wss, path /ws",
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
        default=os.environ.get(TOKEN_VARIABLE) or None,
        help=f"connection token (JWT), sent as Authorization: Bearer (default: ${TOKEN_VARIABLE})",
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
    client = _client("notify")
    if client is None:
        return 1
    Publisher, PublishError, WsserverError = (
        client.Publisher,
        client.PublishError,
        client.WsserverError,
    )
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
        if exc.status is None:  # no answer: the reason is already one sentence
            print(f"wsserver: {exc.reason}", file=sys.stderr)
        else:
            print(f"wsserver notify: {exc.status} {exc.code}: {exc.reason}", file=sys.stderr)
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

    def __init__(self, ws_url: str, rooms: list[str]) -> None:
        self.ws_url = ws_url
        self.rooms = rooms
        self.subscriber: Any = None  # set once built (the callbacks need it)
        self.stopping = False
        self.refused: dict[str, Any] = {}  # room -> SubscriptionError

    @staticmethod
    def say(text: str) -> None:
        print(f"wsserver listen: {text}", file=sys.stderr, flush=True)

    def on_state(self, state: str) -> None:
        subscriber = self.subscriber
        if self.stopping:
            return
        if state == "connecting":
            if subscriber.last_failure is None:
                self.say(f"connecting to {self.ws_url}")
            else:
                self.say(f"reconnecting to {self.ws_url} ({subscriber.last_failure})")
        elif state == "ready":
            where = ", ".join(subscriber.rooms) or "no rooms (notifications to everybody only)"
            self.say(f"connected to {self.ws_url}, subscribed to {where}")
        elif state == "closed":
            close = subscriber.last_close
            why = f" ({close[0]} {close[1]})".rstrip() if close else ""
            self.say(f"disconnected{why}; reconnecting")

    def on_gap(self, room: str | None, info: dict) -> None:
        what = f"room {room}" if room is not None else "notifications to everybody"
        self.say(
            f"warning: {what}: notifications may have been missed since {info.get('since')} "
            "(history cannot tell how many)"
        )

    def on_error(self, err: Any) -> None:
        """One room refused: a warning, unless it was the last requested room still
        standing; then the subscriber stops and ``_listen`` reports it once, exit 1. Fatal
        errors are reported by ``_listen`` too."""
        if err.room is None:
            return
        self.refused[err.room] = err
        if self.all_refused:
            self.stopping = True
            self.subscriber.stop()  # from its own thread: it ends when this returns
        else:
            self.say(f"warning: {err}")

    @property
    def all_refused(self) -> bool:
        return bool(self.rooms) and all(room in self.refused for room in self.rooms)


def _listen(args: argparse.Namespace) -> int:
    import logging

    client = _client("listen")
    if client is None:
        return 1
    # what the subscriber logs, this command says itself on stderr: without a handler,
    # Python's last-resort one printed every refusal a second time
    logging.getLogger("wsserver.client").addHandler(logging.NullHandler())
    try:
        ws_url = client.http_to_ws_url(args.url)
    except ValueError as exc:
        return _usage_error("listen", str(exc))
    rooms = list(dict.fromkeys(args.rooms))
    if args.since is not None and len(rooms) != 1:
        return _usage_error("listen", "--since resumes one room: give exactly one --room")
    report = _ListenReport(ws_url, rooms)
    try:
        report.subscriber = client.Subscriber(
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
    if report.all_refused:
        why = "; ".join(str(err) for err in report.refused.values())
        report.say(f"the server refused the subscription: {why}")
        return 1
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
        _stdout_to_devnull()
        return 0, received
    finally:
        report.stopping = True
        subscriber.stop()
    return None, received


# -- the server API: history, disconnect, unsubscribe (wsserver.client.Publisher) ------------


def _add_server_api_commands(sub: argparse._SubParsersAction) -> None:
    status = (
        "Prints the server's JSON answer. Exit status: 0 done, 1 refused or unreachable "
        "(code and reason on stderr), 2 usage error."
    )
    history = sub.add_parser(
        "history",
        help="print a room's kept messages (GET /rooms/ROOM/history)",
        description="Print the messages a room's history keeps, oldest first: the newest "
        "--limit, or the oldest --limit after --since (\"complete\": false when some after it "
        "may be gone; \"more\": true when more follow). " + status,
    )
    history.add_argument("room", metavar="ROOM", help="the room")
    history.add_argument("--since", metavar="ID", help="only the messages after this id")
    history.add_argument(
        "--limit", type=_positive_int, help="at most this many messages (server: 100, max 1000)"
    )
    history.set_defaults(func=_history)
    disconnect = sub.add_parser(
        "disconnect",
        help="close a user's connections everywhere (POST /disconnect)",
        description="Close every connection of a user (the tokens' sub) on every worker, with "
        "close 4002: clients do not come back with the same token. " + status,
    )
    disconnect.add_argument("--user", required=True, help="the user (token subject)")
    disconnect.set_defaults(func=_disconnect)
    unsubscribe = sub.add_parser(
        "unsubscribe",
        help="take a user's connections out of a room (POST /unsubscribe)",
        description="Take every connection of a user out of a room on every worker; each "
        "gets an unsubscribed reply. " + status,
    )
    unsubscribe.add_argument("--user", required=True, help="the user (token subject)")
    unsubscribe.add_argument("--room", required=True, help="the room")
    unsubscribe.set_defaults(func=_unsubscribe)
    for command in (history, disconnect, unsubscribe):
        _add_publisher_options(command)


def _add_publisher_options(command: argparse.ArgumentParser) -> None:
    """What every publisher command (notify and the server API) takes: where, with which
    key, how long per request, how many retries."""
    command.add_argument(
        "--url",
        default=os.environ.get(URL_VARIABLE) or DEFAULT_CLIENT_URL,
        help=f"server base URL (default: ${URL_VARIABLE}, else {DEFAULT_CLIENT_URL})",
    )
    command.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_VARIABLE) or None,
        help=f"publisher key, sent as Authorization: Bearer (default: ${API_KEY_VARIABLE})",
    )
    command.add_argument(
        "--timeout", type=_positive_float, default=5.0, help="seconds per request (%(default)s)"
    )
    command.add_argument(
        "--retries",
        type=int,
        default=5,
        help="retries on 503 (after Retry-After) and connection errors (%(default)s)",
    )


def _history(args: argparse.Namespace) -> int:
    return _server_api("history", args, lambda p: p.history(args.room, args.since, args.limit))


def _disconnect(args: argparse.Namespace) -> int:
    return _server_api("disconnect", args, lambda p: p.disconnect(args.user))


def _unsubscribe(args: argparse.Namespace) -> int:
    return _server_api("unsubscribe", args, lambda p: p.unsubscribe(args.user, args.room))


def _server_api(command: str, args: argparse.Namespace, call: Any) -> int:
    """Run one server-API call through a :class:`~wsserver.client.Publisher` (retries 503s
    and dropped connections as ``notify`` does) and print its answer as one JSON line."""
    import json

    client = _client(command)
    if client is None:
        return 1
    try:
        publisher = client.Publisher(
            args.url, api_key=args.api_key, timeout=args.timeout, retries=max(args.retries, 0)
        )
    except ValueError as exc:
        return _usage_error(command, str(exc))
    try:
        with publisher:
            answer = call(publisher)
    except client.PublishError as exc:
        if exc.status is None:
            print(f"wsserver: {exc.reason}", file=sys.stderr)
        else:
            print(f"wsserver {command}: {exc.status} {exc.code}: {exc.reason}", file=sys.stderr)
        return 1
    except client.WsserverError as exc:
        print(f"wsserver {command}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(answer, ensure_ascii=False))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wsserver", description="Real-time notification service (WebSocket fan-out)."
    )
    parser.add_argument("--version", action="version", version=f"wsserver {__version__}")
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
    serve.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        help=f"log level of the server and gunicorn ({ENV_PREFIX}LOG_LEVEL, default info)",
    )
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

    check = sub.add_parser(
        "check-config",
        help="check the settings as serve would, print them, and exit",
        description="Check the WSSERVER_* settings as serve does before starting (each bad "
        "one named with the form it expects; unknown WSSERVER_* variables warned about), "
        "print the effective values as the variables take them (on/off, comma lists, empty "
        "for unset; secrets hidden), then check that Redis answers when WSSERVER_REDIS_URL "
        "or WSSERVER_REDIS_SENTINELS is set (with sentinels: the master they name). Exit "
        "status: 0 fine, 2 a bad setting, 3 Redis does not answer.",
    )
    check.add_argument(
        "--no-connect",
        action="store_true",
        help="check the settings only, without trying to reach Redis",
    )
    check.set_defaults(func=_check_config)
    _add_client_commands(sub)
    _add_server_api_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "gunicorn_args", None) and args.gunicorn_args[0] == "--":
        args.gunicorn_args = args.gunicorn_args[1:]
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # `wsserver check-config | head -1`: the reader left, a normal end
        _stdout_to_devnull()
        return 0


def _stdout_to_devnull() -> None:
    """After a closed pipe: send what is left (the flush at exit) nowhere, quietly."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


if __name__ == "__main__":
    sys.exit(main())
