"""The flusher thread: finishes writes the kernel could not take at once.

Why a thread of its own: writers never block (see :mod:`wsserver.connection`), so bytes a
socket refused must be written later, when it drains. One epoll set for the whole worker
watches exactly the sockets that have bytes pending (one-shot), and this thread writes their
backlog when they become writable. It costs one thread per worker instead of a writer
thread per connection, and a slow socket never holds up anyone else's writes.
"""

from __future__ import annotations

import logging
import os
import select
import threading
from typing import Protocol

__all__ = ["Flusher"]

log = logging.getLogger(__name__)

_EVENTS = select.EPOLLOUT | select.EPOLLONESHOT | select.EPOLLERR | select.EPOLLHUP


class Writable(Protocol):
    def on_writable(self) -> None: ...


class Flusher:
    """Owns an epoll set and the ``wsserver-flusher`` thread.

    Thread-safety: ``watch``/``forget`` may be called from any thread (epoll calls are
    thread-safe; ``_lock`` guards the fd map). ``stop`` is idempotent.
    """

    def __init__(self, poll_timeout: float = 0.5) -> None:
        self._epoll = select.epoll()
        # stop() writes here to end the poll at once, instead of after up to poll_timeout
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll.register(self._wake, select.EPOLLIN)
        self._targets: dict[int, Writable] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._poll_timeout = poll_timeout
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        # daemon: a stuck peer must never keep the worker process alive; shutdown stops
        # this thread explicitly first.
        self._thread = threading.Thread(target=self._run, name="wsserver-flusher", daemon=True)
        self._thread.start()

    def watch(self, fd: int, target: Writable) -> None:
        """Call ``target.on_writable()`` once ``fd`` can take bytes (one shot)."""
        with self._lock:
            self._targets[fd] = target
            try:
                self._epoll.modify(fd, _EVENTS)  # registered before: re-arm the one shot
            except FileNotFoundError:
                try:
                    self._epoll.register(fd, _EVENTS)
                except OSError:  # fd already closed: nothing left to flush
                    self._targets.pop(fd, None)
            except OSError:
                self._targets.pop(fd, None)

    def forget(self, fd: int) -> None:
        """Stop watching ``fd`` (its connection is closing). Idempotent."""
        with self._lock:
            if self._targets.pop(fd, None) is not None:
                try:
                    self._epoll.unregister(fd)
                except OSError:
                    pass

    def stop(self, timeout: float = 2.0) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        os.eventfd_write(self._wake, 1)
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        with self._lock:
            self._targets.clear()
        try:
            self._epoll.close()
        except OSError:
            pass
        os.close(self._wake)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                events = self._epoll.poll(self._poll_timeout, 256)
            except InterruptedError:
                continue
            except (OSError, ValueError):  # closed under us by stop()
                return
            for fd, _ in events:
                with self._lock:
                    target = self._targets.get(fd)
                if target is None:
                    continue
                try:
                    target.on_writable()
                except Exception:  # never let one socket's failure stop every flush
                    log.exception("flush failed for fd %d", fd)
