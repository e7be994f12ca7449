"""The gunicorn worker class wsserver ships: gthread, with a thread pool of daemon threads.

Why not gthread's own pool: it is a ``concurrent.futures.ThreadPoolExecutor``, whose threads
are non-daemon, and on Python before 3.13 every non-daemon thread that starts scans a set
holding the lock of every other live non-daemon thread (``threading._maintain_shutdown_locks``,
bpo-37788). A WebSocket holds its pool thread for life, so the thread for the N-th
connection costs O(N): measured here, starting a thread with 10,000 others alive took
1.7 ms of CPU with non-daemon threads and 0.19 ms with daemon ones, and connecting 10,000
clients to one worker spent about a third of its time in that scan. gthread documents
``get_thread_pool`` as the place to change the pool; :class:`DaemonThreadPool` is the
same pool with daemon threads.

Daemon threads are safe here: gunicorn itself waits for open connections (up to
``graceful_timeout``) before the worker exits, and wsserver's SIGTERM hook has closed every
WebSocket by then; nothing relies on the interpreter joining pool threads at exit.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Executor, Future
from typing import Any, Callable

from gunicorn.workers.gthread import ThreadWorker as _GthreadWorker

__all__ = ["DaemonThreadPool", "ThreadWorker"]


class DaemonThreadPool(Executor):
    """``ThreadPoolExecutor``'s behaviour (a thread is added only when none is idle, up to
    ``max_workers``; idle threads are kept) with daemon threads.

    Thread-safety: ``submit`` and ``shutdown`` may be called from any thread.
    """

    def __init__(self, max_workers: int, thread_name_prefix: str = "wsserver-pool") -> None:
        if max_workers <= 0:
            raise ValueError("max_workers must be greater than 0")
        self._max_workers = max_workers
        self._prefix = thread_name_prefix
        self._work: queue.SimpleQueue[tuple | None] = queue.SimpleQueue()
        self._idle = threading.Semaphore(0)
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._shutdown = False

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            future: Future = Future()
            self._work.put((future, fn, args, kwargs))
            if not self._idle.acquire(blocking=False) and len(self._threads) < self._max_workers:
                thread = threading.Thread(
                    target=self._run, name=f"{self._prefix}-{len(self._threads)}", daemon=True
                )
                thread.start()
                self._threads.append(thread)
            return future

    def _run(self) -> None:
        work = self._work
        while True:
            item = work.get()
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


class ThreadWorker(_GthreadWorker):
    """gunicorn's gthread worker with :class:`DaemonThreadPool` (see the module docstring).
    ``gunicorn -k gthread`` still works; connecting thousands of clients is just slower."""

    def get_thread_pool(self) -> Executor:
        return DaemonThreadPool(max_workers=self.cfg.threads)
