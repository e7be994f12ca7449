"""The gunicorn configuration wsserver ships: ``gunicorn -c python:wsserver.gunicorn_conf
'wsserver:create_app()'`` (this is what ``wsserver serve`` runs), or ``'myapp:app'`` for a
Flask app with :class:`wsserver.Realtime` inside (the hooks find its service the same way).

Why each choice (measured traps, see docs/design.md):

* gthread, as ``wsserver.worker.ThreadWorker`` (its pool threads are daemons, which start in
  constant time however many are alive): every WebSocket holds one pool thread for its life,
  so ``threads`` is the connection capacity plus ``WSSERVER_HTTP_THREADS`` kept for HTTP; the
  app refuses upgrades past that budget with 503, so ``GET /`` and ``POST /notify`` always
  find a thread;
* ``worker_connections`` well above ``threads``: at or below it gthread turns keep-alive off
  (``on_starting`` recomputes it from the final ``--threads`` unless it was given too);
  the worker keeps connections still sending their request (``WSSERVER_MAX_PENDING``) from
  ever taking the count to ``worker_connections``, where gthread stops accepting;
* no control socket: gunicorn 27 shares one path machine-wide, parallel servers collide;
* SIGTERM: gunicorn would wait ``graceful_timeout`` on open WebSockets and ``worker_exit``
  runs after that, too late; ``post_worker_init`` chains the signal to close clients with
  1001 first;
* one worker unless ``WSSERVER_REDIS_URL`` is set: without a shared broker a second worker
  would hold half the audience; with Redis unreachable at start, the master refuses to start;
* TLS when ``WSSERVER_TLS_CERT``/``WSSERVER_TLS_KEY`` are set (gunicorn's ``certfile`` and
  ``keyfile``; its own ``--certfile``/``--keyfile`` flags work too), with one SSL context per
  worker (:func:`ssl_context`) instead of gunicorn's one per connection.

Users may add their own flags (``-b``, ``--threads``, ``-w``...); hooks read the final
values from gunicorn's config, not from here.
"""

from __future__ import annotations

import atexit
import logging
import os
import resource
import shutil
import signal
import socket
import struct
import sys
import tempfile
import threading
from typing import Any

# what gunicorn reads from this module: its settings and its server hooks
__all__ = [
    "access_log_format",
    "bind",
    "certfile",
    "child_exit",
    "control_socket_disable",
    "errorlog",
    "graceful_timeout",
    "keepalive",
    "keyfile",
    "logconfig_dict",
    "logger_class",
    "loglevel",
    "on_starting",
    "post_fork",
    "post_worker_init",
    "ssl_context",
    "threads",
    "timeout",
    "worker_class",
    "worker_connections",
    "worker_exit",
    "workers",
]

# prometheus_client's multiprocess mode: every worker writes its metrics under this directory
# and /metrics in any worker adds them up. prometheus_client picks its mode when first
# imported, so this comes before importing wsserver (which imports it).
_METRICS_DIR_OWNED = "PROMETHEUS_MULTIPROC_DIR" not in os.environ
_MASTER_PID = os.getpid()
if _METRICS_DIR_OWNED:
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="wsserver-metrics-")

    @atexit.register
    def _remove_metrics_dir() -> None:
        """The master removes the directory however it exits (a refused start included);
        workers inherit this hook and must not."""
        if os.getpid() == _MASTER_PID:
            shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)

from wsserver import allocator  # noqa: E402
from wsserver.cli import bind_problem  # noqa: E402
from wsserver.config import (  # noqa: E402
    SettingsError,
    check_workers,
    load_settings,
    redis_problem,
    unknown_variables,
)
from wsserver.logs import gunicorn_logconfig  # noqa: E402
from wsserver.openness import development_warning  # noqa: E402

try:
    _settings = load_settings()
except SettingsError as _exc:
    sys.stderr.write(f"wsserver: {_exc}\n")
    raise SystemExit(2) from None

bind = [
    f"[{_settings.host}]:{_settings.port}"
    if ":" in _settings.host
    else f"{_settings.host}:{_settings.port}"
]
# TLS served by gunicorn itself (None: plain HTTP); gunicorn's flags override these
certfile = _settings.tls_cert or None
keyfile = _settings.tls_key or None
worker_class = "wsserver.worker.ThreadWorker"
workers = _settings.workers
threads = _settings.threads
worker_connections = _settings.threads + 1000
keepalive = 5
timeout = 30
graceful_timeout = int(_settings.shutdown_timeout) + 5
loglevel = _settings.log_level
logconfig_dict = gunicorn_logconfig(_settings.log_level, _settings.log_format) or {}
# gunicorn's error log in wsserver's text lines (one timestamp format in the whole log)
logger_class = "wsserver.logs.GunicornLogger"
control_socket_disable = True
errorlog = "-"
# the path without the query string: connection tokens travel in ?token= and must not be logged
access_log_format = '%(h)s "%(m)s %(U)s %(H)s" %(s)s %(b)s %(L)ss "%(a)s"'

_THREAD_STACK = 512 * 1024
_THREAD_WORKERS = (worker_class, "gthread", "gunicorn.workers.gthread.ThreadWorker")


def on_starting(server):  # noqa: ANN001 - gunicorn hook signature
    """Refuse a configuration that would silently lose messages or hang HTTP."""
    cfg = server.cfg
    try:
        check_workers(cfg.workers, _settings.uses_redis)  # -w may have raised the setting's count
    except SettingsError as exc:
        sys.stderr.write(f"wsserver: {exc}\n")
        raise SystemExit(2) from None
    for warning in unknown_variables():
        server.log.warning("wsserver: %s", warning)
    _refuse_taken_addresses(cfg)
    problem = None
    if _settings.uses_redis:
        problem = redis_problem(_settings.redis_url, sentinels=_settings.redis_sentinels,
                                master=_settings.redis_sentinel_master)
    if problem:
        sys.stderr.write(f"wsserver: {problem}; not starting. Start Redis or fix its settings.\n")
        raise SystemExit(3)
    if cfg.worker_class_str not in _THREAD_WORKERS:
        server.log.warning(
            "wsserver: worker class %r is not gthread; WebSockets need a thread each",
            cfg.worker_class_str,
        )
    if cfg.worker_class_str != worker_class:
        server.log.warning(
            "wsserver: worker class %r is not %s: the defences against hostile clients are "
            "off (request heads read without a thread under WSSERVER_HANDSHAKE_TIMEOUT, "
            "WSSERVER_REQUEST_TIMEOUT, WSSERVER_MAX_PENDING(_PER_IP), closes that do not block "
            "accepting); only a per-read timeout bounds slow clients",
            cfg.worker_class_str,
            worker_class,
        )
    _follow_threads(cfg)
    if cfg.worker_connections <= cfg.threads:
        server.log.warning(
            "wsserver: --worker-connections (%d) <= --threads (%d) turns HTTP keep-alive off",
            cfg.worker_connections,
            cfg.threads,
        )
    # worker_connections counts requests, WebSockets, kept-alive and pending connections;
    # closing ones linger outside it (wsserver.intake.LingeringCloses, 128 at most), and the
    # rest (listeners, logs, Redis, pipes) fits in the remainder
    _raise_open_files_limit(cfg.worker_connections + 384, server.log)
    # once per server, here in the master: what development leaves open, on the final binds
    warning = development_warning(_settings, cfg.address)
    if warning:
        server.log.warning("%s", warning)


def _follow_threads(cfg) -> None:  # noqa: ANN001
    """``worker_connections`` = the final ``threads`` + 1000, unless it was set on its own.

    Why here: this module computes it at import from ``WSSERVER_THREADS``, before gunicorn
    applies its command line, so ``--threads 5000`` alone would leave it at 2100 and turn
    keep-alive off. Hooks see the final values. A ``--worker-connections`` (or a value other
    than the one computed here) is the user's and stays."""
    if cfg.worker_connections == worker_connections and cfg.threads != threads:
        cfg.set("worker_connections", cfg.threads + 1000)


def post_fork(server, worker):  # noqa: ANN001
    # A WebSocket thread's stack stays shallow; a smaller reservation keeps thousands of
    # threads cheap in address space (resident memory is what they touch either way).
    threading.stack_size(_THREAD_STACK)
    # freed memory goes back to the system: glibc's thresholds stay put (wsserver.allocator)
    allocator.tune()


#: seconds an orphaned worker's clients get to answer its close before they are cut
ORPHAN_SHUTDOWN_TIMEOUT = 0.5


def post_worker_init(worker):  # noqa: ANN001
    """Start the delivery threads in the worker, bound request reads, and hook SIGTERM for
    a 1001 goodbye."""
    _bound_request_reads(worker, _settings.handshake_timeout)
    service = _find_service(worker.wsgi)
    if service is None:
        worker.log.warning(
            "wsserver: the app has no wsserver service (serve 'wsserver:create_app()', or a "
            "Flask app with wsserver.Realtime(app, url_prefix=...)); hooks not installed"
        )
        return
    service.limit_connections(worker.cfg.threads)
    service.ensure_started()
    # a worker serves once its broker delivers: with Redis, a POST it took before its
    # listener subscribed would be refused with 503 (bounded: a dead Redis shows in /readyz)
    if not service.broker.wait_ready(5.0):
        worker.log.warning("wsserver: the broker is not ready yet; /readyz says so until it is")
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum, frame):  # noqa: ANN001
        # an orphan (its master died: worker.ThreadWorker.is_parent_alive) has nobody waiting
        # for it; its clients get ORPHAN_SHUTDOWN_TIMEOUT to answer the close
        budget = ORPHAN_SHUTDOWN_TIMEOUT if getattr(worker, "orphaned", False) else None
        threading.Thread(
            target=service.shutdown, args=(budget,), name="wsserver-shutdown", daemon=True
        ).start()
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.siginterrupt(signal.SIGTERM, False)


_SSL_CONTEXTS: dict[tuple, Any] = {}
_SSL_LOCK = threading.Lock()


def ssl_context(config, default_ssl_context_factory):  # noqa: ANN001, ANN201 - gunicorn hook
    """gunicorn's SSL context, built once per worker instead of once per connection, and
    refusing TLS renegotiation.

    Why: gunicorn calls this for every TLS connection it accepts, and its default factory
    loads the certificate and key from disk each time (0.75 ms of worker CPU per connection
    measured with an EC key; more with RSA). A context is kept per certificate and key file
    state (path, size, modification time), so replacing the files (a renewal) takes effect
    for new connections without a restart. Renegotiation (TLS 1.2) is refused: a client
    could otherwise make a write wait for a read (``wsserver.connection.TlsConnection``)."""
    import ssl

    key = tuple(
        str(getattr(config, name, None))
        for name in ("certfile", "keyfile", "ca_certs", "cert_reqs", "ciphers", "http_protocols")
    ) + (_file_state(config.certfile), _file_state(config.keyfile))
    with _SSL_LOCK:
        context = _SSL_CONTEXTS.get(key)
        if context is None:
            context = default_ssl_context_factory()
            context.options |= ssl.OP_NO_RENEGOTIATION
            _SSL_CONTEXTS.clear()  # the files changed: the old context is not needed any more
            _SSL_CONTEXTS[key] = context
        return context


def _file_state(path: str | None) -> tuple | None:
    try:
        info = os.stat(path) if path else None
    except OSError:
        return None
    return (info.st_size, info.st_mtime_ns, info.st_ino) if info else None


def worker_exit(server, worker):  # noqa: ANN001
    """Runs in the worker, after gunicorn's own shutdown, as the process is about to exit.

    A clean exit then skips the interpreter's own shutdown: it joins every idle gthread pool
    thread one after the other, and with thousands of them (one per connection the worker
    held) that takes seconds (docs/design.md, "gunicorn"). Our threads are already stopped
    and the clients closed; only the logs need flushing. Any other exit goes the normal way."""
    exc = sys.exc_info()[1]
    if isinstance(exc, SystemExit) and exc.code in (None, 0) and threading.active_count() > 64:
        logging.shutdown()
        os._exit(0)


def child_exit(server, worker):  # noqa: ANN001
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def _refuse_taken_addresses(cfg) -> None:  # noqa: ANN001
    """Stop with one line when an address to bind is taken. gunicorn would try each bind 5
    times a second apart, logging an ERROR each time, then exit. Probed here, in the master
    before gunicorn binds (on_starting); skipped when gunicorn inherits its sockets (a
    re-exec on USR2: GUNICORN_FD, systemd: LISTEN_FDS) or shares the port (reuse_port)."""
    if os.environ.get("GUNICORN_FD") or os.environ.get("LISTEN_FDS") or cfg.reuse_port:
        return
    for address in cfg.address:
        problem = bind_problem(address)
        if problem:
            sys.stderr.write(f"wsserver: {problem}\n")
            raise SystemExit(1)


def _bound_request_reads(worker, seconds: float) -> None:  # noqa: ANN001
    """gunicorn's gthread (``-k gthread``) reads a request's head with blocking ``recv`` calls
    that have no timeout, so a client that stops half-way pins a pool thread for good.
    Accepted sockets inherit ``SO_RCVTIMEO`` from the listener: each read then gives up after
    ``seconds`` of silence and gunicorn drops the connection. Only an idle timeout: a client
    sending a byte now and then defeats it, which is why wsserver's worker reads heads in its
    poller under a total deadline instead; there it stays as a second bound on what a pool
    thread still reads (TLS heads, bodies the poller does not pre-read). Reads of an open
    WebSocket are unaffected: the session reads only what ``poll`` says has arrived."""
    whole = int(seconds)
    value = struct.pack("ll", whole, int((seconds - whole) * 1_000_000))
    for listener in worker.sockets:
        try:
            listener.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
        except (OSError, AttributeError) as exc:
            worker.log.warning("wsserver: cannot bound request reads: %s", exc)
    worker.log.error_log.addFilter(_ReadTimeoutFilter())


class _ReadTimeoutFilter(logging.Filter):
    """gunicorn logs a read that timed out as a socket error with a traceback; it is the
    handshake timeout doing its job, so say that in one line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, BlockingIOError) and "Socket error" in str(record.msg):
            record.msg = (
                "wsserver: a client sent nothing for WSSERVER_HANDSHAKE_TIMEOUT while its "
                "request was read; dropped"
            )
            record.args = ()
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def _find_service(app):  # noqa: ANN001, ANN202
    """The service in ``app.extensions["wsserver"]``: ``create_app``'s app, or a user's app
    that ``Realtime`` was given (its routes are mounted, its service is kept there too)."""
    app = getattr(app, "__wrapped__", app)  # wsserver's worker wraps the app (worker.py)
    extensions = getattr(app, "extensions", None)
    return extensions.get("wsserver") if isinstance(extensions, dict) else None


def _raise_open_files_limit(wanted: int, log) -> None:  # noqa: ANN001
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("wsserver: could not raise the open-files limit to %d: %s", target, exc)
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        log.warning(
            "wsserver: open-files limit %d is below the %d sockets this worker may hold; "
            "raise it (ulimit -n, LimitNOFILE=) for that many connections",
            soft,
            wanted,
        )
