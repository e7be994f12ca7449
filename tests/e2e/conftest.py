"""Fixtures that start the real server: gunicorn on a free loopback port (``support``)."""

from __future__ import annotations

from typing import Any, Iterator

import pytest
from support import GunicornServer, serving

__all__ = ["make_server", "server"]


@pytest.fixture(scope="module")
def server() -> Iterator[GunicornServer]:
    """A development-mode server shared by a test module (rebroadcast on)."""
    with serving(env={"WSSERVER_ENV": "development"}) as srv:
        yield srv


@pytest.fixture
def make_server() -> Iterator[Any]:
    """Start servers with custom settings; each is stopped (by PID) after the test."""
    started: list[GunicornServer] = []

    def make(env: dict | None = None, **kwargs: Any) -> GunicornServer:
        srv = GunicornServer(env=env, **kwargs).start()
        started.append(srv)
        return srv

    yield make
    for srv in started:
        srv.stop(graceful=False)  # a graceful stop is checked in tests, not here
