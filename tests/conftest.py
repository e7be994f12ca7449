"""Fixtures for the in-process tests, the way Flask's tutorial lays them out: ``app`` (a real
``create_app``), ``client`` (its test client), ``runner`` (the ``wsserver`` command, run
in-process); and a check, on every test, that no thread it started is left running.

End-to-end fixtures (a real gunicorn: ``server``, ``make_server``) live in ``e2e/conftest.py``.
"""

from __future__ import annotations

import io
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Iterator

import pytest
from flask import Flask
from flask.testing import FlaskClient
from support import RedisProcess, delete_redis_keys

from wsserver import audit, cli, create_app

# threads that outlive a test by design: multiprocessing.Queue's feeder (it ends when the queue
# is collected, not when the test ends)
PERSISTENT_THREADS = ("QueueFeederThread",)

# the threads a wsserver service starts on first use (broadcaster, flusher, history sweeper,
# Redis listener): allowed to outlive a test when the app is a module- or session-scoped
# fixture's, which shuts it down at its own teardown
SERVICE_THREADS = "wsserver-"

# how long a thread that is on its way out gets to finish before it counts as leaked
LEAK_GRACE = 2.0


#: the machine's Redis, which tests share: each uses a key prefix of its own (``redis_prefix``)
REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A Redis key prefix of this test's own; its keys are deleted afterwards."""
    value = f"wstest-{uuid.uuid4().hex[:12]}"
    yield value
    delete_redis_keys(REDIS_URL, value)


@pytest.fixture
def private_redis() -> Iterator[RedisProcess]:
    """A redis-server of this test's own on a free loopback port (for a test that hangs,
    kills or flushes it, which the shared one must never see), stopped after the test."""
    server = RedisProcess().start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def fresh_audit_log_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with the audit log's full burst (wsserver.audit rate-limits its lines
    process-wide): otherwise a test that checks for an audit line fails after one that used
    the burst up, depending on which tests its process ran before it."""
    monkeypatch.setattr(audit, "_LIMITER", audit.LogLimiter())


@pytest.fixture(autouse=True)
def no_leaked_threads(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test that leaves a thread running that was not running before it.

    Why: a test that forgets to stop a connection, a service or a reader thread passes on its
    own and breaks (or slows) the tests after it. Threads that are stopping get
    ``LEAK_GRACE`` seconds; ``@pytest.mark.leaks_threads`` opts a test out (say why there).
    """
    before = set(threading.enumerate())
    yield
    if request.node.get_closest_marker("leaks_threads"):
        return
    shared_app = _uses_a_shared_app(request)
    deadline = time.monotonic() + LEAK_GRACE
    leaked = _new_threads(before, shared_app)
    for thread in leaked:
        thread.join(max(deadline - time.monotonic(), 0))
    leaked = _new_threads(before, shared_app)
    if leaked:
        names = ", ".join(sorted(t.name for t in leaked))
        pytest.fail(f"threads left running by this test: {names}", pytrace=False)


def _new_threads(before: set[threading.Thread], shared_app: bool) -> list[threading.Thread]:
    return [
        t
        for t in threading.enumerate()
        if t not in before
        and t.is_alive()
        and not t.name.startswith(PERSISTENT_THREADS)
        and not (shared_app and t.name.startswith(SERVICE_THREADS))
    ]


def _uses_a_shared_app(request: pytest.FixtureRequest) -> bool:
    """Whether the test got a Flask app (or a service) from a fixture wider than a test:
    that app's service threads start on first use, in whichever test comes first."""
    item = request.node
    definitions = getattr(item, "_fixtureinfo", None)
    for name, value in getattr(item, "funcargs", {}).items():
        defs = definitions.name2fixturedefs.get(name) if definitions else None
        if not defs or defs[-1].scope == "function":
            continue
        if isinstance(value, Flask) and "wsserver" in value.extensions:
            return True
        if type(value).__name__ == "NotificationService":
            return True
    return False


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "leaks_threads: the test leaves threads running on purpose (say why)"
    )
    config.addinivalue_line(
        "markers",
        "serial: asserts latency (a p99, a bound in ms) that other test processes sharing the "
        "CPU would distort: scripts/test runs these alone, after the parallel part",
    )


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    """What ``app`` passes to ``create_app`` over the environment; override this fixture
    (or ask for ``make_app``) for other settings."""
    return {"env": "development"}


@pytest.fixture
def make_app() -> Iterator[Any]:
    """``make_app(**settings)``: a real app; every service it started is shut down after the
    test (its broadcaster and flusher threads end, which the leak check then confirms)."""
    made: list[Flask] = []

    def make(**overrides: Any) -> Flask:
        app = create_app(overrides)
        app.config["TESTING"] = True
        made.append(app)
        return app

    yield make
    for app in made:
        app.extensions["wsserver"].shutdown()


@pytest.fixture
def app(make_app: Any, settings_overrides: dict[str, Any]) -> Flask:
    """A development-mode app (as ``./scripts/serve``), built by ``create_app``."""
    return make_app(**settings_overrides)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    """Flask's test client: the whole WSGI stack (``/notify`` included), no sockets."""
    return app.test_client()


@dataclass
class Result:
    """What one run of the ``wsserver`` command did."""

    exit_code: int
    stdout: str
    stderr: str


class CliRunner:
    """Runs ``wsserver.cli.main`` in-process, the argparse counterpart of Flask's
    ``app.test_cli_runner()``: environment variables set for the run, stdin given as text,
    stdout and stderr captured, argparse's ``SystemExit`` turned into the exit code."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
        self._monkeypatch = monkeypatch
        self._capsys = capsys

    def invoke(
        self, *args: str, input: str | None = None, env: dict[str, str] | None = None
    ) -> Result:
        with self._monkeypatch.context() as patch:
            for name, value in (env or {}).items():
                patch.setenv(name, value)
            patch.setattr(sys, "stdin", io.StringIO(input) if input is not None else None)
            self._capsys.readouterr()  # what came before is not this run's
            try:
                code = cli.main(list(args))
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            out, err = self._capsys.readouterr()
        return Result(code, out, err)


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> CliRunner:
    """The ``wsserver`` command, in-process (see :class:`CliRunner`)."""
    monkeypatch.delenv("WSSERVER_API_KEY", raising=False)
    return CliRunner(monkeypatch, capsys)


@pytest.fixture
def served() -> Iterator[Any]:
    """``served(**settings)``: a started service on the memory broker with connections on
    socketpairs (:class:`inprocess.Served`), stopped after the test."""
    from inprocess import Served

    made: list[Served] = []

    def make(**overrides: Any) -> Served:
        made.append(Served(**overrides))
        return made[-1]

    yield make
    for s in made:
        s.close()


@pytest.fixture
def flusher() -> Iterator[Any]:
    """A started :class:`wsserver.flusher.Flusher` with a short poll, stopped after the test
    (the autouse leaked-thread check then sees its thread gone)."""
    from wsserver.flusher import Flusher

    f = Flusher(poll_timeout=0.05)
    f.start()
    yield f
    f.stop()

