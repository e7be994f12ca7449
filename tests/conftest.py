from __future__ import annotations

import pytest
from support import GunicornServer


@pytest.fixture(scope="module")
def server():
    """A development-mode server shared by a test module (rebroadcast on)."""
    with GunicornServer(env={"WSSERVER_ENV": "development"}) as srv:
        yield srv


@pytest.fixture
def make_server(request):
    """Start servers with custom settings; each is stopped (by PID) after the test."""
    started: list[GunicornServer] = []

    def make(env: dict | None = None, **kwargs) -> GunicornServer:
        srv = GunicornServer(env=env, **kwargs).start()
        started.append(srv)
        return srv

    yield make
    for srv in started:
        srv.stop()
