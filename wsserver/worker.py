"""The gunicorn worker class wsserver ships: gthread, with a thread pool of daemon threads, and
the accept, request-head and close path taken over so no client can capture the main loop or
hold threads (see :class:`ThreadWorker` and docs/design.md, "The worker").

Why not gthread's own pool: it is a ``concurrent.futures.ThreadPoolExecutor``, whose threads
are non-daemon, and on Python before 3.13 every non-daemon thread that starts scans a set
holding the lock of every other live non-daemon thread (``threading._maintain_shutdown_locks``,
bpo-37788). A WebSocket holds its pool thread for life, so the thread for the N-th
connection costs O(N), and with thousands of clients that scan became a large share of the
time spent connecting them (the figures are in docs/performance.md, "Connecting 10,000").
gthread documents ``get_thread_pool`` as the place to change the pool;
:class:`DaemonThreadPool` is the same pool with daemon threads.

Daemon threads are safe here: gunicorn itself waits for open connections (up to
``graceful_timeout``) before the worker exits, and wsserver's SIGTERM hook has closed every
WebSocket by then; nothing relies on the interpreter joining pool threads at exit.
"""

from __future__ import annotations

import errno
import itertools
import os
import queue
import selectors
import signal
import socket
import threading
import time
from concurrent.futures import Executor, Future
from datetime import datetime
from functools import partial
from http import HTTPStatus
from typing import Any, Callable

from gunicorn import SERVER, http
from gunicorn import util as gunicorn_util
from gunicorn.http import wsgi as gunicorn_wsgi
from gunicorn.workers.gthread import _DEFER, STOP_KEEPALIVE_LINGER, TConn
from gunicorn.workers.gthread import ThreadWorker as _GthreadWorker

from . import audit
from .brokers import Deferred
from .config import load_settings
from .errors import encode_document, error_document, http_error_bytes
from .fastpath import (
    GUNICORN_ONLY,
    NotifyRequest,
    environ_for,
    parse_notify_request,
    response_bytes,
)
from .intake import LingeringCloses, PendingConnections, request_end
from .notify import NOWAIT, nowait_app, nowait_pipeline
from .service import WouldBlock

__all__ = ["RUN_AFTER_REQUEST", "WEBSOCKET_STARTED", "DaemonThreadPool", "ThreadWorker"]

#: environ key of a callable the app calls once a request has become a WebSocket: from then on
#: the request deadline (WSSERVER_REQUEST_TIMEOUT) no longer applies to it. Absent under other
#: servers and under ``-k gthread``.
WEBSOCKET_STARTED = "wsserver.websocket_started"
# environ key: a callable taking the WebSocket's session (a no-argument callable), which runs
# it on this request's thread once the request has returned: an idle connection then keeps
# nothing of gunicorn's request, Flask's contexts or simple-websocket's Server (~7 KB each,
# docs/performance.md). Absent (another server, a test client): the route runs it itself.
RUN_AFTER_REQUEST = "wsserver.run_after_request"

_RECV_BYTES = 65536
# accept() failing for want of descriptors or kernel memory: accepting pauses this long
_OUT_OF_DESCRIPTORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_ACCEPT_PAUSE = 0.1
# how long the main loop polls at most: the parent check and the deadlines run after each poll
_POLL_CAP = 0.25
#: a fast-path ``POST /notify`` body this big at most may be served on the main thread
#: (:meth:`ThreadWorker._serve_inline`): parsing and publishing it is CPU the accepts and
#: every other connection's reads wait for, so a bigger one goes to the pool
INLINE_MAX_BODY = 16 * 1024


# stands in for a started thread's own "started" Event (see _drop_start_event)
_STARTED = threading.Event()
_STARTED.set()


def _drop_start_event(thread: threading.Thread) -> None:
    """Once ``start()`` has returned, a thread's ``_started`` Event is only ever asked
    ``is_set()`` (``is_alive``, ``join``, ``repr``, a second ``start``): answer it from one
    shared set Event, so that a connection's thread does not keep a condition of its own
    (~1.4 KB) for the connection's life. CPython's ``threading`` internals; where they
    differ, the thread keeps its own Event."""
    started = getattr(thread, "_started", None)
    if isinstance(started, threading.Event) and started.is_set():
        thread._started = _STARTED  # type: ignore[attr-defined]


class DaemonThreadPool(Executor):
    """``ThreadPoolExecutor``'s behaviour (a thread is added only when none is idle, up to
    ``max_workers``) with daemon threads, and idle threads retired.

    Why retire: a WebSocket holds its thread for life, so the pool grows to the largest number
    of connections seen at once; ``ThreadPoolExecutor`` keeps every thread it ever started, and
    under churn each burst of connections left threads (and their stacks) behind for good. The
    one-hour soak saw threads creep 1,011 -> 1,273 and RSS with them (docs/reliability.md). A
    thread idle for ``idle_timeout`` seconds now leaves, so the pool follows the load down.

    How idleness is counted: ``_idle`` holds one permit per idle thread not yet promised to a
    queued item. ``submit`` takes a permit (or starts a thread); a thread that finishes an item
    gives one back. A thread may retire only by taking a permit itself, so the threads left
    always cover every item already promised to an idle one.

    Thread-safety: ``submit`` and ``shutdown`` may be called from any thread.
    """

    def __init__(
        self,
        max_workers: int,
        thread_name_prefix: str = "wsserver-pool",
        idle_timeout: float = 60.0,
    ) -> None:
        if max_workers <= 0:
            raise ValueError("max_workers must be greater than 0")
        if idle_timeout <= 0:
            raise ValueError("idle_timeout must be greater than 0")
        self._max_workers = max_workers
        self._prefix = thread_name_prefix
        self._idle_timeout = idle_timeout
        self._work: queue.SimpleQueue[tuple | None] = queue.SimpleQueue()
        self._idle = threading.Semaphore(0)
        self._lock = threading.Lock()
        self._threads: set[threading.Thread] = set()
        self._numbers = itertools.count()
        self._shutdown = False

    @property
    def thread_count(self) -> int:
        """Threads alive in the pool now, busy or idle."""
        with self._lock:
            return len(self._threads)

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            future: Future = Future()
            self._work.put((future, fn, args, kwargs))
            if not self._idle.acquire(blocking=False) and len(self._threads) < self._max_workers:
                thread = threading.Thread(
                    target=self._run, name=f"{self._prefix}-{next(self._numbers)}", daemon=True
                )
                thread.start()
                _drop_start_event(thread)
                self._threads.add(thread)  # under the lock: it cannot retire before this
            return future

    def _run(self) -> None:
        work = self._work
        while True:
            try:
                item = work.get(timeout=self._idle_timeout)
            except queue.Empty:
                if self._retire():
                    return
                continue
            if item is None:
                work.put(None)  # pass the stop on to the next idle thread
                return
            future, fn, args, kwargs = item
            del item
            if future.set_running_or_notify_cancel():
                try:
                    result = fn(*args, **kwargs)
                except BaseException as exc:  # noqa: BLE001 - the future carries it
                    future.set_exception(exc)
                else:
                    future.set_result(result)
            del future, fn, args, kwargs  # hold nothing of a finished request while idle
            self._idle.release()

    def _retire(self) -> bool:
        """Leave the pool after an idle timeout, unless this thread's idleness is already
        promised to a queued item (then it stays and takes work)."""
        with self._lock:
            if not self._idle.acquire(blocking=False):
                return False
            self._threads.discard(threading.current_thread())
            return True

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
            if cancel_futures:
                while True:
                    try:
                        item = self._work.get_nowait()
                    except queue.Empty:
                        break
                    if item is not None:
                        item[0].cancel()
            self._work.put(None)
            threads = list(self._threads)
        if wait:
            for thread in threads:
                thread.join()


class _Conn(TConn):
    """gthread's connection with what this worker tracks about it (main thread only, except
    ``websocket``, which the request's thread sets once and the main thread reads)."""

    def __init__(self, cfg: Any, sock: socket.socket, client: Any, server: Any) -> None:
        super().__init__(cfg, sock, client, server)
        self.address = client[0] if isinstance(client, tuple) and client else "unix"
        self.head: bytearray | None = None  # bytes of the request read so far in the poller
        self.wanted: int | None = None  # how many to read before handing over, once known
        self.head_end: int | None = None  # where the head ends in ``head``, once known
        self.ahead = b""  # bytes of the next request read with a fast-path one (pool thread)
        self.polled = False  # registered in the poller while pending
        self.websocket = False  # the app said this request became a WebSocket
        self.reaped = False  # the request deadline shut its socket down


class ThreadWorker(_GthreadWorker):
    """gthread with :class:`DaemonThreadPool`, and the accept, request-head and close path
    taken over so that no client can capture the main loop or hold threads (issue 12):

    * request heads (and small ``Content-Length`` bodies) are read in the poller, under a
      total deadline (``WSSERVER_HANDSHAKE_TIMEOUT``) and a size cap
      (``WSSERVER_MAX_REQUEST_HEAD``), for new and kept-alive connections; only a complete
      request takes a pool thread, its bytes put back into gunicorn's parser;
    * connections still sending their request are capped per address
      (``WSSERVER_MAX_PENDING_PER_IP``) and in total (``WSSERVER_MAX_PENDING``), evicting the
      oldest, and never push ``nr_conns`` to ``worker_connections`` (which stops accepting);
    * a request on a pool thread that is not a WebSocket is cut (socket shut down) at
      ``WSSERVER_REQUEST_TIMEOUT``; the app marks an upgrade through
      ``environ[WEBSOCKET_STARTED]``;
    * closes after ``Connection: close``, HTTP/1.0, errors and refusals linger in the poller
      (:class:`~wsserver.intake.LingeringCloses`) instead of blocking the main thread.

    TLS (``--certfile``), uwsgi and HTTP/2 prior knowledge keep gthread's own path (its head
    is read on a pool thread after the TLS handshake), bounded by the request deadline and
    the lingering closes only. See docs/design.md, "The worker (`worker`)".

    Thread-safety: everything but ``handle`` and the WSGI wrapper runs on the main thread
    (gthread's poller callbacks and ``murder_*`` hooks); a pool thread only sets
    ``_Conn.websocket`` through the environ callable.
    """

    wsgi: Callable[..., Any]  # set by gunicorn's load_wsgi; load_wsgi below wraps it
    alive: bool  # gunicorn's: False once the worker is stopping

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        settings = load_settings()
        self.settings = settings
        self._pending: PendingConnections[_Conn] = PendingConnections(
            settings.max_pending, settings.max_pending_per_ip, settings.handshake_timeout
        )
        self._serving: dict[_Conn, float] = {}  # on a pool thread -> deadline, in that order
        self._lingering: LingeringCloses | None = None
        self._local = threading.local()
        self._stopping_at: float | None = None
        self._accept_paused_until = 0.0  # out of descriptors: no accept before this
        self._accept_warned_at = -60.0
        cfg = self.cfg
        self._preread = (
            not cfg.is_ssl
            and getattr(cfg, "protocol", "http") == "http"
            and getattr(cfg, "http2_cleartext", None) not in ("prior-knowledge", "both")
        )
        # POST /notify without gunicorn's parser (wsserver.fastpath), where nothing of
        # gunicorn's that the fast path skips can apply: its proxy protocol, a SCRIPT_NAME,
        # request hooks of the user's
        hooks = cfg.settings
        self._fast = (
            self._preread
            and str(getattr(cfg, "proxy_protocol", "off")).lower() in ("off", "false", "none")
            and not os.environ.get("SCRIPT_NAME")
            and hooks["pre_request"].value is hooks["pre_request"].default
            and hooks["post_request"].value is hooks["post_request"].default
        )
        self._fast_base: dict[str, Any] = {}
        # the app's WSGI callable for a POST /notify served on the main thread (memory
        # broker, wsserver's own middleware only: notify.nowait_app), set by load_wsgi
        self._inline_app: Callable[..., Any] | None = None
        # the Redis broker's pipeline (rediswire.Pipeline) when it publishes through this
        # poller (a Deferred from the inline app), set by load_wsgi
        self._pipeline: Any = None
        self._keepalive = bool(cfg.keepalive)  # read once: Config.__getattr__ is not free
        # a scheme header gunicorn is configured to read (from trusted peers) is its call
        self._gunicorn_only = GUNICORN_ONLY | {
            str(name).upper() for name in (getattr(cfg, "secure_scheme_headers", None) or {})
        }

    def get_thread_pool(self) -> Executor:
        return DaemonThreadPool(max_workers=self.cfg.threads)

    def load_wsgi(self) -> None:
        """Wrap the app so each request's environ carries :data:`WEBSOCKET_STARTED`."""
        super().load_wsgi()
        self._fast_base = {
            **gunicorn_wsgi.base_environ(self.cfg),
            "wsgi.multithread": True,
            "REQUEST_METHOD": "POST",
            "QUERY_STRING": "",
            "RAW_URI": "/notify",
            "SERVER_PROTOCOL": "HTTP/1.1",
            "wsgi.url_scheme": "http",
            "PATH_INFO": "/notify",
            "SCRIPT_NAME": "",
        }
        app = self.wsgi
        self._inline_app = nowait_app(app) if self._fast else None
        pipeline = nowait_pipeline(app) if self._inline_app is not None else None
        if pipeline is not None:  # Redis: its publishes go out and come back in this poller
            pipeline.watch = self._watch_pipeline
        self._pipeline = pipeline
        local = self._local

        def wsgi(environ: dict, start_response: Callable) -> Any:
            conn = getattr(local, "conn", None)
            if conn is not None:
                environ[WEBSOCKET_STARTED] = partial(_mark_websocket, conn)
                environ[RUN_AFTER_REQUEST] = partial(setattr, local, "after")
            return app(environ, start_response)

        # gunicorn_conf finds the app (and its wsserver service) through this
        wsgi.__wrapped__ = app  # type: ignore[attr-defined]
        self.wsgi = wsgi

    def run(self) -> None:
        self._lingering = LingeringCloses(self.poller)
        try:
            super().run()
        finally:
            self._lingering.close_all()

    def wait_for_and_dispatch_events(self, timeout: float) -> None:
        """gthread's poll, at most ``_POLL_CAP`` (0.25 s) instead of 1 s: the parent check
        (:meth:`is_parent_alive`) and the deadlines of ``murder_pending`` run after each.
        Then the Redis publishes its callbacks queued go out together (``Pipeline.flush``)."""
        super().wait_for_and_dispatch_events(min(timeout, _POLL_CAP))
        if self._pipeline is not None:
            self._pipeline.flush()  # this turn's Redis publishes, in one write

    def is_parent_alive(self) -> bool:
        """gthread asks after every poll (at most 0.25 s apart here). When the master is gone
        (SIGKILLed), gthread would stop accepting but keep the listeners bound while it
        waits ``graceful_timeout`` for open WebSockets, so a new server could not bind the
        port for seconds. An orphan closes its listeners at once (the port is free) and
        shuts down as on SIGTERM: wsserver's hook closes every client with 1001. Nobody
        waits for an orphan: its clients get 0.5 s to answer the close
        (``gunicorn_conf.ORPHAN_SHUTDOWN_TIMEOUT``; a live client answers in milliseconds), then
        are cut, and gthread's wait for their threads is capped at 1 s (``graceful_timeout``),
        so it is gone well within 2 s of its master, also on a loaded host."""
        if super().is_parent_alive():
            return True
        self.set_accept_enabled(False)
        for listener in self.sockets:
            listener.close()
        self.orphaned = True  # read by the SIGTERM hook (gunicorn_conf)
        self.cfg.set("graceful_timeout", 1)
        os.kill(os.getpid(), signal.SIGTERM)  # our SIGTERM hook, on this thread at once
        return False

    # -- accept and the request head, in the poller ------------------------------------------

    def accept(self, listener: socket.socket) -> None:
        try:
            sock, client = listener.accept()
        except OSError as exc:
            if exc.errno in _OUT_OF_DESCRIPTORS:
                self._pause_accepting(exc)
                return
            if exc.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        self.nr_conns += 1
        conn = _Conn(self.cfg, sock, client, listener.getsockname())  # non-blocking
        if self._preread:
            self._await_request(conn, b"")
        else:
            self.enqueue_req(conn)  # gthread's path (TLS): the head is read on a pool thread

    def _pause_accepting(self, exc: OSError) -> None:
        """Out of file descriptors (or kernel memory) for a new socket: gthread would let the
        error end the worker, and with it every client it serves; a poller that kept the
        listener registered would spin on it. Instead the listeners leave the poller for
        ``_ACCEPT_PAUSE`` (the waiting connections stay in the kernel's backlog until
        descriptors are free again) and the operator is told, at most once a minute."""
        now = time.monotonic()
        self._accept_paused_until = now + _ACCEPT_PAUSE
        self.set_accept_enabled(False)
        if now >= self._accept_warned_at + 60.0:
            self._accept_warned_at = now
            self.log.warning(
                "cannot accept new connections: %s (%d open in this worker); pausing accepts "
                "for %.1f s at a time until descriptors are free (raise the open-files limit "
                "or lower WSSERVER_THREADS)", exc.strerror or exc, self.nr_conns, _ACCEPT_PAUSE,
            )

    def set_accept_enabled(self, enabled: bool) -> None:
        """gthread's switch, except that accepting stays off while paused for descriptors
        (gthread's loop turns it back on as soon as it is under ``worker_connections``)."""
        if enabled and time.monotonic() < self._accept_paused_until:
            return
        super().set_accept_enabled(enabled)

    def on_client_socket_readable(self, conn: _Conn, client: socket.socket) -> None:
        """A kept-alive connection turned readable: its next request is read here too."""
        if not self._preread:
            return super().on_client_socket_readable(conn, client)
        self.poller.unregister(client)
        self.keepalived_conns.remove(conn)
        self._await_request(conn, b"")
        return None

    def _await_request(self, conn: _Conn, already: bytes) -> None:
        """Track ``conn`` as pending and read its request in the poller from now on."""
        conn.head = bytearray(already)
        conn.wanted = None
        evicted = self._pending.add(conn, conn.address)
        for victim, cap in evicted:
            self._cut_pending(victim, cap)
        # pending sockets must never be what takes gthread to worker_connections: at that
        # count it stops accepting, and a flood of silent sockets would lock everybody out
        while self.nr_conns >= self.worker_connections:
            oldest = self._pending.oldest()
            if oldest is None:
                break
            self._pending.discard(oldest)
            self._cut_pending(oldest, "connections")
        if conn in self._pending and already:
            self._advance(conn, 0)  # a request left over from the last one may be complete
        if conn in self._pending:
            self._head_readable(conn, conn.sock)  # often there already: no wait for a wake-up
        if conn in self._pending:
            # still arriving: the poller says when more comes (registered only now, so a
            # kept-alive request that is all there costs no register/unregister pair)
            self.poller.register(
                conn.sock, selectors.EVENT_READ, partial(self._head_readable, conn)
            )
            conn.polled = True

    def _head_readable(self, conn: _Conn, sock: socket.socket) -> None:
        if conn.head is None or conn not in self._pending:
            # an event from the same poller batch as the one that ended this connection's
            # wait (evicted by a newer connection, handed to the pool, expired): stale
            return
        try:
            data = sock.recv(_RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            if conn.head:
                # half-closed after part of a request (a body cut short, say): gunicorn's
                # parser meets the end of input at once and answers or drops it as it would
                conn.wanted = len(conn.head)
                conn.head_end = None  # cut short: gunicorn's parser decides
                self._advance(conn, len(conn.head))
                return
            # closed or reset before sending anything: nobody to answer
            self._forget_pending(conn)
            self.nr_conns -= 1
            conn.close()
            return
        start = len(conn.head)
        conn.head += data
        self._advance(conn, start)

    def _advance(self, conn: _Conn, start: int) -> None:
        """Hand ``conn`` to the pool once what it must send first is here."""
        head = conn.head
        assert head is not None
        if conn.wanted is None:
            found = request_end(head, self.settings.max_body_size, start)
            if found is None:
                if len(head) > self.settings.max_request_head:
                    self._refuse_head_too_large(conn)
                return
            if found[0] > self.settings.max_request_head:
                self._refuse_head_too_large(conn)
                return
            conn.head_end, conn.wanted = found
        if len(head) < conn.wanted:
            return  # a small Content-Length body is still arriving
        self._forget_pending(conn)
        conn.head = None
        if self._fast and conn.head_end is not None:
            cfg = self.cfg
            request = parse_notify_request(
                head, conn.head_end, conn.wanted,
                cfg.limit_request_fields, cfg.limit_request_field_size, self._gunicorn_only,
            )
            if request is not None:
                conn.ahead = bytes(head[conn.wanted:])
                if self._inline_app is not None and _inline(request.body):
                    self._serve_inline(conn, request)
                else:
                    self._submit(conn, self._serve_notify, conn, request)
                return
        if conn.parser is None:
            conn.parser = http.get_parser(self.cfg, conn.sock, conn.client)
        # the seam gthread itself uses for h2c: bytes read ahead go back into the parser,
        # which reads them before it reads the socket
        conn.parser.unreader.unread(bytes(head))
        conn.data_ready = True  # gthread's handle() then skips its own 5 s wait for data
        self.enqueue_req(conn)

    def _forget_pending(self, conn: _Conn) -> None:
        self._pending.discard(conn)
        if not conn.polled:
            # a request complete at once was never registered: no unregister, whose
            # KeyError formats the socket's repr (two syscalls) on the hot path
            return
        conn.polled = False
        try:
            self.poller.unregister(conn.sock)
        except (KeyError, ValueError):
            pass

    def _refuse_head_too_large(self, conn: _Conn) -> None:
        limit = f"WSSERVER_MAX_REQUEST_HEAD={self.settings.max_request_head}"
        self._forget_pending(conn)
        audit.refused("request_head_too_large", conn.address, limit)
        self._answer_and_close(
            conn, 431, "request_head_too_large", f"the request head is over {limit} bytes"
        )

    def _cut_pending(self, conn: _Conn, cap: str) -> None:
        """An evicted pending connection (already untracked): 503, then close."""
        conn.polled = False
        try:
            self.poller.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        detail = {
            "per_address": f"WSSERVER_MAX_PENDING_PER_IP={self.settings.max_pending_per_ip}",
            "total": f"WSSERVER_MAX_PENDING={self.settings.max_pending}",
            "connections": f"worker_connections={self.worker_connections}",
        }[cap]
        audit.refused("too_many_pending", conn.address, detail)
        self._answer_and_close(
            conn, 503, "too_many_pending",
            f"too many connections still sending their request ({detail}); retry",
        )

    def _expire_pending(self, now: float) -> None:
        limit = f"WSSERVER_HANDSHAKE_TIMEOUT={self.settings.handshake_timeout:g}"
        for conn in self._pending.expired(now):
            conn.polled = False
            try:
                self.poller.unregister(conn.sock)
            except (KeyError, ValueError):
                pass
            audit.refused("request_timeout", conn.address, limit)
            self._answer_and_close(
                conn, 408, "request_timeout", f"the request did not arrive within {limit} s"
            )

    def _answer_and_close(self, conn: _Conn, status: int, code: str, reason: str) -> None:
        """A short JSON answer, if the socket takes it at once, then a lingering close. The
        connection must be untracked and unregistered already."""
        self.nr_conns -= 1
        conn.head = None
        try:
            # non-blocking: a fresh socket's buffer takes it
            conn.sock.send(http_error_bytes(status, code, reason))
        except OSError:
            pass
        self._linger(conn)

    def _linger(self, conn: _Conn) -> None:
        if self._lingering is None:  # not running (yet): gthread's blocking close
            conn.close(graceful=True)
        else:
            self._lingering.add(conn.sock)

    def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        """gunicorn's error answer (a bad request line or header: 400, 414, 431, ...; an
        exception escaping the app: 500) as JSON in wsserver's shape instead of its HTML page.

        gunicorn's own ``handle_error`` still decides the status, logs and writes the access
        line; only the page it writes is caught (:class:`_Written`) and replaced."""
        written = _Written()
        super().handle_error(req, written, addr, exc)
        status = written.status()
        if status is None:
            return
        code, reason = _parser_error(status, exc)
        try:
            gunicorn_util.write_nonblock(client, http_error_bytes(status, code, reason))
        except Exception:  # noqa: BLE001 - as gunicorn: the client may be gone
            self.log.debug("Failed to send error message.")

    # -- requests on pool threads: the deadline --------------------------------------------

    def enqueue_req(self, conn: _Conn) -> None:
        self._submit(conn, self.handle, conn)

    def _submit(self, conn: _Conn, fn: Callable[..., Any], *args: Any) -> None:
        """gthread's ``enqueue_req`` for any function of the connection, under the request
        deadline; ``finish_request`` takes the connection back on the main thread."""
        self._serving.pop(conn, None)  # re-inserted last: dict order stays deadline order
        self._serving[conn] = time.monotonic() + self.settings.request_timeout
        fs = self.tpool.submit(fn, *args)
        fs.add_done_callback(lambda fut: self.method_queue.defer(self.finish_request, conn, fut))

    def _serve_notify(self, conn: _Conn, request: NotifyRequest) -> bool:
        """Runs on a pool thread: a fast-path ``POST /notify`` (:mod:`wsserver.fastpath`)
        through the same app, answered in one write. What gunicorn's ``handle_request`` does
        around the app is done here too: the request count (``max_requests``), the
        keep-alive decision, the access log line. True: keep the connection."""
        # no thread-local connection: WEBSOCKET_STARTED is for upgrades, and this is a POST
        done = self._notify_answer(conn, request, self.wsgi, False)
        conn.sock.setblocking(True)
        try:
            conn.sock.sendall(done.data)
            done.answer.sent = done.size
        finally:
            done.log(self.log, request)
        return not done.close

    def _serve_inline(self, conn: _Conn, request: NotifyRequest) -> None:
        """Main thread: a fast-path ``POST /notify`` served here, without the pool's
        hand-off (submit, wake a pool thread, ``method_queue``, back here: a third of a
        publish's GIL time, docs/performance.md "Publish path"), when nothing in it can
        wait. The app is called with :data:`~wsserver.notify.NOWAIT`: the memory broker's
        lock and the broadcast queue are tried without waiting, and where either is busy (or
        the request needs more than one publish) :class:`WouldBlock` comes back with nothing
        published and the request goes to the pool as before, where it may wait. With
        Redis, :class:`Deferred` comes back: its command goes out on the broker's pipeline,
        which this poller drives, and the answer is written when the reply is in
        (:meth:`_published`). The answer is written without blocking; what the socket does
        not take at once is written by a pool thread (under the request deadline). A
        pipelined next request is read on a later turn of the loop, so no client keeps the
        main thread to itself."""
        self._guarded(conn, self._start_inline, conn, request)

    def _start_inline(self, conn: _Conn, request: NotifyRequest) -> None:
        app = self._inline_app
        assert app is not None
        environ, answer, started = self._fast_environ(conn, request, True)
        done_with = partial(self._notify_done, request, answer, environ, started)
        self._answer_inline(conn, request, done_with,
                            partial(app, environ, answer.start_response))

    def _published(
        self,
        conn: _Conn,
        request: NotifyRequest,
        done_with: Callable[[Callable[[], Any], bool], _Done],
        finish: Callable[[Any], Any],
        reply: Any,
    ) -> None:
        """Main thread, from the pipeline: the reply to a :class:`Deferred` publish is in;
        answer it as :meth:`_serve_inline` would have (or serve the request again on the
        pool when the publish would block after all: ``NOSCRIPT``, nothing published)."""
        self._guarded(conn, self._answer_inline, conn, request, done_with, partial(finish, reply))

    def _guarded(self, conn: _Conn, serve: Callable[..., None], *args: Any) -> None:
        """``serve(*args)`` on the main thread: whatever fails in it (a bug) closes ``conn``,
        as a failed pool request's is, and never escapes into the loop."""
        try:
            serve(*args)
        except Exception:  # noqa: BLE001 - as finish_request: a bug must not stop the loop
            self.log.exception("Error serving /notify on the main thread")
            self.nr_conns -= 1
            conn.close()

    def _answer_inline(
        self,
        conn: _Conn,
        request: NotifyRequest,
        done_with: Callable[[Callable[[], Any], bool], _Done],
        call: Callable[[], Any],
    ) -> None:
        """Main thread: answer ``conn`` with what ``call`` (the app, or a deferred publish's
        ``finish``) gives; to the pool on :class:`WouldBlock`; a :class:`Deferred` is sent
        and comes back through :meth:`_published`."""
        try:
            done = done_with(call, True)
        except WouldBlock:
            self._submit(conn, self._serve_notify, conn, request)
            return
        except Deferred as deferred:  # Redis: the answer comes with the script's reply
            deferred.__traceback__ = None  # its frames are done with; let them go now
            deferred.pipeline.send(deferred.command, partial(
                self._published, conn, request, done_with, deferred.finish))
            return
        self._write_inline(conn, request, done)

    def _write_inline(self, conn: _Conn, request: NotifyRequest, done: _Done) -> None:
        data = done.data
        try:
            sent = conn.sock.send(data)  # non-blocking: a kept-alive socket's buffer has room
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            sent = -1
        if sent >= 0:
            done.answer.sent = done.size
        done.log(self.log, request)
        if sent < 0:  # the client is gone
            self.nr_conns -= 1
            conn.close()
        elif sent < len(data):
            self._submit(conn, self._send_rest, conn, memoryview(data)[sent:], done.close)
        elif done.close:
            self.nr_conns -= 1
            self._linger(conn)
        else:
            self._keep_alive(conn, defer=True)

    def _watch_pipeline(self, sock: socket.socket, events: int) -> None:
        """The pipeline's ``watch``: its socket in this poller, for ``events`` (0: out)."""
        poller = self.poller
        if not events:
            poller.unregister(sock)
        elif sock in poller.get_map():
            poller.modify(sock, events, self._pipeline_ready)
        else:
            poller.register(sock, events, self._pipeline_ready)

    def _pipeline_ready(self, _sock: socket.socket) -> None:
        self._pipeline.on_ready()

    @staticmethod
    def _send_rest(conn: _Conn, rest: memoryview, close: bool) -> bool:
        """Runs on a pool thread: the part of an answer the socket did not take at once."""
        conn.sock.setblocking(True)
        conn.sock.sendall(rest)
        return not close

    def _notify_answer(
        self, conn: _Conn, request: NotifyRequest, app: Callable[..., Any], nowait: bool
    ) -> _Done:
        """The answer to a fast-path ``POST /notify``: ``app`` called with gunicorn's
        environ (and :data:`~wsserver.notify.NOWAIT` when ``nowait``; then
        :class:`WouldBlock` or :class:`Deferred` escapes, and nothing of the request was
        counted), and what gunicorn's ``handle_request`` decides around it."""
        environ, answer, started = self._fast_environ(conn, request, nowait)
        return self._notify_done(request, answer, environ, started,
                                 partial(app, environ, answer.start_response), nowait)

    def _fast_environ(
        self, conn: _Conn, request: NotifyRequest, nowait: bool
    ) -> tuple[dict, _Answer, datetime | None]:
        timed = getattr(self.log, "access_log_enabled", True)
        started = datetime.now() if timed else None
        environ = environ_for(request, conn.client, conn.server, self._fast_base)
        environ["gunicorn.socket"] = conn.sock
        if nowait:
            environ[NOWAIT] = True
        return environ, _Answer(), started

    def _notify_done(
        self,
        request: NotifyRequest,
        answer: _Answer,
        environ: dict,
        started: datetime | None,
        call: Callable[[], Any],
        nowait: bool,
    ) -> _Done:
        """``call()`` (the app, or a :class:`Deferred`'s ``finish``) answered into
        ``answer``, and what gunicorn's ``handle_request`` decides around it: the request
        count (``max_requests``), keep-alive or close."""
        close = request.close
        try:
            chunks = call()
            try:
                body = b"".join(chunks)
            finally:
                if hasattr(chunks, "close"):
                    chunks.close()
        except (WouldBlock, Deferred):
            if nowait:
                raise
            close = self._internal_error(answer)  # a NOWAIT signal without NOWAIT: a bug
            body = _INTERNAL_ERROR
        except Exception:  # noqa: BLE001 - as gunicorn: a 500 in wsserver's shape, then close
            close = self._internal_error(answer)
            body = _INTERNAL_ERROR
        self.nr += 1
        if self.nr >= self.max_requests:
            if self.alive:
                self.log.info("Autorestarting worker after current request.")
                self.alive = False
            close = True
        if (
            not self.alive
            or not self._keepalive
            or len(self.keepalived_conns) >= self.max_keepalived
        ):
            close = True
        if answer.length is None:
            answer.headers.append(("Content-Length", str(len(body))))
        elif answer.length != len(body):
            close = True  # as gunicorn: never more than the declared length, then close
            body = body[: answer.length]
        data = response_bytes(answer.status, answer.headers, body, close, SERVER)
        return _Done(data, len(body), close, answer, environ, started)

    def _internal_error(self, answer: _Answer) -> bool:
        self.log.exception("Error handling request /notify")
        answer.status, answer.length = "500 Internal Server Error", None
        answer.headers = [("Content-Type", "application/json")]
        return True

    def handle(self, conn: _Conn) -> Any:
        """Runs on a pool thread: remember the connection for the WSGI wrapper; a WebSocket's
        session runs here once the request has returned (:data:`RUN_AFTER_REQUEST`)."""
        local = self._local
        local.conn = conn
        local.after = None
        try:
            result = super().handle(conn)
            after = local.after
        finally:
            local.conn = local.after = None
        if after is None:
            return result
        # a WebSocket: its session runs here, now that gunicorn's, Flask's and flask-sock's
        # frames have returned and let go of the request (RUN_AFTER_REQUEST)
        conn.parser = None  # it holds the upgrade's parsed request; never read again
        try:
            after()
        except Exception:  # noqa: BLE001 - as a route's error: logged, the connection goes
            self.log.exception("Error serving a WebSocket")
        return False

    def _cut_overdue(self, now: float) -> None:
        """Shut down the socket of every request past ``WSSERVER_REQUEST_TIMEOUT`` that did
        not become a WebSocket. Its thread's blocked read or write then fails at once, the
        request ends, and ``finish_request`` closes the connection."""
        while self._serving:
            conn, deadline = next(iter(self._serving.items()))
            if deadline > now:
                return
            del self._serving[conn]
            if conn.websocket:
                continue
            conn.reaped = True
            try:
                # the plain socket's shutdown, also for TLS: SSLSocket's would drop its SSL
                # object under the thread that is using it
                socket.socket.shutdown(conn.sock, socket.SHUT_RDWR)
            except (OSError, ValueError):
                continue  # already closed
            audit.refused(
                "request_timeout",
                conn.address,
                f"WSSERVER_REQUEST_TIMEOUT={self.settings.request_timeout:g}",
            )

    def finish_request(self, conn: _Conn, fs: Future) -> None:
        """gthread's, with closes that linger in the poller instead of blocking here, and a
        kept-alive connection's next request read in the poller."""
        self._serving.pop(conn, None)
        try:
            result = fs.result() if not fs.cancelled() else False
            if result is _DEFER:  # only gthread's own path (TLS) defers
                if self.alive:
                    super().finish_request(conn, fs)
                else:
                    self.nr_conns -= 1
                    conn.close()
                return
            if result and not conn.reaped:
                if not self._preread:
                    super().finish_request(conn, fs)
                    return
                conn.sock.setblocking(False)
                self._keep_alive(conn)
                return
            self.nr_conns -= 1
            self._linger(conn)
        except Exception:  # noqa: BLE001 - as gthread: whatever failed, the connection goes
            self.nr_conns -= 1
            conn.close()

    def _keep_alive(self, conn: _Conn, defer: bool = False) -> None:
        """Main thread: ``conn`` (non-blocking) was answered and stays open: its next
        request is read in the poller. ``defer``: bytes of it already read are looked at on
        the loop's next turn (after what else is ready), not now."""
        ahead = conn.ahead
        conn.ahead = b""
        if conn.parser is not None:
            ahead = conn.parser.unreader.take_buffered() + ahead
        if ahead:  # the client already sent (part of) its next request
            if defer:
                self.method_queue.defer(self._await_request, conn, ahead)
            else:
                self._await_request(conn, ahead)
            return
        conn.set_timeout()
        if not self.alive:
            conn.timeout = min(conn.timeout, time.monotonic() + STOP_KEEPALIVE_LINGER)
        self.keepalived_conns.append(conn)
        self.poller.register(
            conn.sock, selectors.EVENT_READ, partial(self.on_client_socket_readable, conn)
        )

    def murder_pending(self) -> None:
        """gthread calls this after every poll (also while stopping): expire what is due."""
        super().murder_pending()
        now = time.monotonic()
        horizon = now
        if not self.alive:
            # stopping: a request being sent gets what a kept-alive connection gets
            if self._stopping_at is None:
                self._stopping_at = now
            if now >= self._stopping_at + STOP_KEEPALIVE_LINGER:
                horizon = float("inf")
        self._expire_pending(horizon)
        self._cut_overdue(now)
        if self._pipeline is not None:
            self._pipeline.expire(now)
        if self._lingering is not None:
            self._lingering.reap(now)


_INTERNAL_ERROR = encode_document(error_document("internal_error", "internal server error"))


class _Done:
    """A fast-path answer ready to write: the bytes, the body's size, whether the
    connection closes after it, and what the access log line needs."""

    __slots__ = ("data", "size", "close", "answer", "environ", "started")

    def __init__(
        self,
        data: bytes,
        size: int,
        close: bool,
        answer: _Answer,
        environ: dict,
        started: datetime | None,
    ) -> None:
        self.data, self.size, self.close = data, size, close
        self.answer, self.environ, self.started = answer, environ, started

    def log(self, logger: Any, request: NotifyRequest) -> None:
        """gunicorn's access line, when the access log is on."""
        if self.started is not None:
            logger.access(self.answer, request, self.environ, datetime.now() - self.started)


class _Answer:
    """A fast-path answer: ``start_response``'s status and headers, and what gunicorn's
    access log reads of a response (``status``, ``headers``, ``sent``)."""

    def __init__(self) -> None:
        self.status = "500 Internal Server Error"
        self.headers: list[tuple[str, str]] = []
        self.length: int | None = None
        self.sent: int | None = None

    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: Any = None
    ) -> Callable[[bytes], None]:
        self.status = status
        self.headers = []
        for name, value in headers:
            value = value.strip(" \t")
            if name.lower() == "content-length":
                self.length = int(value)
            if gunicorn_util.is_hoppish(name):
                continue  # as gunicorn: hop-by-hop headers are the server's
            self.headers.append((name, value))
        return self._write

    @staticmethod
    def _write(data: bytes) -> None:
        raise RuntimeError("the fast path does not support write(); return the body")


class _Written:
    """Stands in for the client socket while gunicorn writes its HTML error page, to learn the
    status it chose (the page itself is dropped)."""

    def __init__(self) -> None:
        self.data = b""

    def gettimeout(self) -> float:
        return 0.0  # gunicorn's write_nonblock then writes without touching blocking mode

    def sendall(self, data: bytes) -> None:
        self.data += data

    def status(self) -> int | None:
        parts = self.data.split(b"\r\n", 1)[0].split(b" ", 2)
        return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None


_PARSER_CODES = {
    400: "bad_request",
    403: "forbidden",
    414: "request_line_too_long",
    417: "expectation_failed",
    431: "request_head_too_large",
    500: "internal_error",
    501: "not_implemented",
}


def _parser_error(status: int, exc: BaseException) -> tuple[str, str]:
    """(code, reason) for an error gunicorn answered before the app: the code by status, the
    reason gunicorn's exception gives (never a server fault's text)."""
    code = _PARSER_CODES.get(status, "http_error")
    if status >= 500:
        return code, "internal server error"
    return code, f"{HTTPStatus(status).phrase}: {exc}" if str(exc) else HTTPStatus(status).phrase


def _inline(body: bytes) -> bool:
    """Whether a fast-path ``POST /notify`` with this body may be tried on the main thread:
    one notification (a JSON object) of at most :data:`INLINE_MAX_BODY` bytes. A batch (a
    JSON list) goes to the pool: measured on the main thread, batches of 50 took 1.5x as
    long to answer (one batch's few milliseconds of parsing and publishing held up every
    other connection's request; on pool threads they interleave with the fan-out), while
    single notifications took less CPU each (docs/performance.md, "Publish path")."""
    return len(body) <= INLINE_MAX_BODY and body.lstrip(b" \t\r\n")[:1] == b"{"


def _mark_websocket(conn: _Conn) -> None:
    conn.websocket = True
