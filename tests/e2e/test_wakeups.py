"""Mass wake-ups of connection threads (wsserver.session._Wakeups): while very many are awake
at once, e.g. thousands of peers leaving together, the GIL switch interval is raised so that
the threads waiting for the GIL do not wake every 5 ms each (see the class docstring for the
measurements); it is restored when the storm is over. Here: 300 real clients leave at once.
(The interval's rules, in-process: ``tests/test_wakeups.py``.)"""

from __future__ import annotations

import rawws
from support import GunicornServer, wait_for


def test_mass_disconnect_every_thread_ends_and_http_answers():
    """300 clients leave within a moment: every connection ends and ``GET /`` keeps
    answering meanwhile. (Whether 32 threads are awake at once here depends on timing, so the
    interval change itself is checked above; the benchmark's idle scenario at 10,000 clients
    shows its effect: ``server_disconnect_s``.)"""
    with GunicornServer(env={"WSSERVER_THREADS": "400"}) as server:
        socks = [rawws.open_ws(server.port)[0] for _ in range(300)]
        wait_for(lambda: server.health()["clients"] == 300, timeout=30, message="all registered")
        for sock in socks:
            rawws.reset(sock)  # a TCP reset each: the peers are gone at once
        # health() has a 5 s timeout: a worker stalled by the storm fails this
        wait_for(lambda: server.health()["clients"] == 0, timeout=30, message="all gone")

