"""wsserver.worker, in-process: its thread pool, ThreadPoolExecutor's behaviour with daemon
threads, so that starting the N-th connection's thread does not cost O(N) on Python < 3.13
(see the module docstring). The worker under gunicorn, and each attacker it cuts off:
``e2e/test_worker.py``."""

from __future__ import annotations

import threading

import pytest
from support import wait_for

from wsserver.worker import DaemonThreadPool

WAIT = 10


def test_results_and_exceptions_reach_the_future():
    pool = DaemonThreadPool(max_workers=2)
    try:
        assert pool.submit(lambda a, b=0: a + b, 2, b=3).result(WAIT) == 5
        failed = pool.submit(lambda: 1 / 0)
        assert isinstance(failed.exception(WAIT), ZeroDivisionError)
        done = []
        future = pool.submit(lambda: "x")
        future.add_done_callback(done.append)
        future.result(WAIT)
        wait_for(lambda: done == [future], timeout=WAIT)
    finally:
        pool.shutdown()


def test_threads_are_daemons_reused_when_idle_and_capped():
    pool = DaemonThreadPool(max_workers=3)
    try:
        for i in range(20):  # one at a time: the idle thread takes each, no new thread
            assert pool.submit(lambda i=i: i).result(WAIT) == i
        assert pool.thread_count == 1

        release = threading.Event()
        running = threading.Semaphore(0)

        def block() -> str:
            running.release()
            release.wait(WAIT)
            return threading.current_thread().name

        blocked = [pool.submit(block) for _ in range(5)]
        for _ in range(3):
            assert running.acquire(timeout=WAIT), "three tasks run at once"
        assert not running.acquire(timeout=0.2), "a fourth runs only when one of three ends"
        assert pool.thread_count == 3
        assert all(t.daemon for t in pool._threads)
        release.set()
        names = {f.result(WAIT) for f in blocked}
        assert names <= {t.name for t in pool._threads}
    finally:
        pool.shutdown()


def test_shutdown_joins_and_refuses_new_work():
    pool = DaemonThreadPool(max_workers=4)
    futures = [pool.submit(threading.Event().wait, 0.05) for _ in range(4)]
    pool.shutdown(wait=True)
    assert all(f.done() for f in futures)
    assert not any(t.is_alive() for t in pool._threads)
    with pytest.raises(RuntimeError):
        pool.submit(print)


def test_shutdown_can_cancel_queued_work():
    pool = DaemonThreadPool(max_workers=1)
    gate = threading.Event()
    first = pool.submit(gate.wait, WAIT)
    queued = [pool.submit(print) for _ in range(3)]
    pool.shutdown(wait=False, cancel_futures=True)
    gate.set()
    assert first.result(WAIT) is True
    assert all(f.cancelled() for f in queued)


def test_idle_threads_retire_and_the_pool_grows_again():
    """A burst of connections must not leave its threads behind for good (the one-hour soak's
    thread and RSS creep)."""
    pool = DaemonThreadPool(max_workers=8, idle_timeout=0.2)
    try:
        release = threading.Event()
        burst = [pool.submit(release.wait, WAIT) for _ in range(6)]
        wait_for(lambda: pool.thread_count == 6, timeout=WAIT)
        threads = set(pool._threads)
        release.set()
        assert all(f.result(WAIT) for f in burst)
        wait_for(lambda: pool.thread_count == 0, timeout=WAIT)
        for thread in threads:
            thread.join(WAIT)
            assert not thread.is_alive()
        assert pool.submit(lambda: "again").result(WAIT) == "again"
        assert pool.thread_count == 1
        assert next(iter(pool._threads)).name not in {t.name for t in threads}
    finally:
        pool.shutdown()


def test_no_work_is_stranded_when_submits_race_retirement():
    """Submits land just as the only idle thread times out: every item must still run. A
    thread may leave only by taking an unpromised idle permit, so a queued item keeps a thread.
    (Letting the thread leave regardless strands an item within a few hundred rounds here.)"""
    pool = DaemonThreadPool(max_workers=1, idle_timeout=0.001)
    try:
        gap = threading.Event()
        for n in range(1500):
            assert pool.submit(lambda n=n: n).result(2) == n, f"round {n}"
            gap.wait(0.001)  # about the idle timeout: the thread is leaving as the next comes
        assert pool.thread_count <= 1
    finally:
        pool.shutdown()


def test_a_busy_requests_thread_keeps_no_start_event_of_its_own():
    """A WebSocket's request stays on its thread for the connection's life: the thread's
    "started" Event is the shared one (docs/performance.md, "where the KB go"), and the
    thread still reports alive, then joins."""
    pool = DaemonThreadPool(max_workers=4)
    release = threading.Event()
    threads: list[threading.Thread] = []

    def hold() -> str:
        threads.append(threading.current_thread())
        release.wait(10)
        return "held"

    try:
        held = pool.submit(hold)
        other = pool.submit(hold)
        wait_for(lambda: len(threads) == 2)
        for thread in threads:
            assert thread.is_alive() and "started" in repr(thread)
            assert thread._started is threads[0]._started  # type: ignore[attr-defined]
        release.set()
        assert held.result(timeout=5) == other.result(timeout=5) == "held"
    finally:
        release.set()
        pool.shutdown(wait=True)
    for thread in threads:
        assert not thread.is_alive()
        thread.join(1)
