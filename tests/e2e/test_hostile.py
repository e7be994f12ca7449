"""Issue 12's "Must hold", each attack against a real server with the settings as shipped.

While one attack (a-f, ``scripts/benchlib/attacks.py``) runs, a bystander does ``GET /`` and
``POST /notify`` on a fresh connection every 100 ms and 200 receivers hold WebSockets open.
Every test asserts, together (one failure message with every number):

* the bystander never fails and answers within 250 ms at p99, for each kind separately;
* every notification the bystander got a 200 for reached all 200 receivers (0 lost);
* the attacker is cut off as documented in docs/security.md, within its bound.

The server: one worker, ``WSSERVER_ENV=production`` and every limit at its shipped default
(``WSSERVER_THREADS`` 1100, ``WSSERVER_HTTP_THREADS`` 32, read from ``wsserver.config``, not
the suite's test-sized values). Attackers connect from 127.0.0.2, the probes from 127.0.0.1.

Fairness: the attack and the bystander each run in their own forked process
(``attacks.Isolated``) and the receivers in a third (one epoll loop), so a flooding Python
loop never holds the GIL the bystander's timing needs. Select with ``-k hostile``.
"""

from __future__ import annotations

import http.client
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest
from support import GunicornServer

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

from benchlib.attacks import (  # noqa: E402
    Bystander,
    ContinuationFlood,
    Isolated,
    LingeringClose,
    PingFlood,
    Receivers,
    ResumeLoop,
    SilentSockets,
    SlowHeaders,
    accepted_posts,
)

from wsserver.config import SETTINGS  # noqa: E402

# the bystander's 250 ms p99 is a promise about this server, not about a host the other test
# processes keep busy: these run alone, after the parallel part (scripts/test)
pytestmark = pytest.mark.serial

DEFAULTS = {s.name: s.default for s in SETTINGS}
RECEIVERS = 200
P99_MS = 250.0
# (b), (c): a request head must be complete within WSSERVER_HANDSHAKE_TIMEOUT of connecting;
# the server's sweep and our 0.2 s polling get this much on top
HEAD_SLACK_S = 3.0


@pytest.fixture
def shipped_server():
    """A server as shipped: production, one worker, default threads (not the suite's 64/8)."""
    srv = GunicornServer(
        env={
            "WSSERVER_ENV": "production",
            "WSSERVER_HTTP_THREADS": str(DEFAULTS["http_threads"]),
        },
        threads=DEFAULTS["threads"],
    )
    srv.start()
    try:
        yield srv
    finally:
        srv.stop(graceful=False)


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def under_attack(srv: GunicornServer, make_attack: Callable[[], Any], seconds: float) -> dict:
    """Receivers connected, then the attack, then the bystander; ``seconds`` of attack (the
    attack's duration is what is being tested: the wait is not synchronisation); then the
    bystander's, the attack's and the receivers' records."""
    receivers = Receivers(srv.port, n=RECEIVERS).start()
    attack = bystander = None
    try:
        attack = Isolated(make_attack, max_seconds=seconds + 30).start()
        bystander = Isolated(lambda: Bystander(srv.port, max_seconds=seconds + 10),
                             max_seconds=seconds + 30).start()
        time.sleep(seconds)
        by = bystander.stop()[0]
        att = attack.stop()[0]
        seqs = [seq for seq, _id in accepted_posts(by["samples"])]
        rec = receivers.check(seqs)
    finally:
        for obj in (bystander, attack, receivers):
            if obj is not None:
                obj.stop()
    return {"bystander": by["summary"], "attack": att["summary"], "cuts": att["cuts"],
            "receivers": rec}


def well_behaved_problems(out: dict, seconds: float) -> list[str]:
    """What the bystander and the receivers saw that the issue says must not happen."""
    problems = []
    for kind, s in out["bystander"].items():
        if s["failed"]:
            problems.append(f"{kind}: {s['failed']} of {s['requests']} failed {s['errors']}")
        if s["p99_ms"] is None or s["p99_ms"] > P99_MS:
            problems.append(f"{kind}: p99 {s['p99_ms']} ms > {P99_MS} (max {s['max_ms']} ms)")
        if s["requests"] < seconds * 10 * 0.5:
            problems.append(f"{kind}: only {s['requests']} requests in {seconds}s (10/s asked)")
    r = out["receivers"]
    if not r["accepted"]:
        problems.append("receivers: nothing to check, no POST /notify was accepted")
    elif r["lost"] or r["alive"] != RECEIVERS:
        problems.append(
            f"receivers: {r['lost']} deliveries lost of {r['accepted']} accepted x {RECEIVERS}"
            f", {r['alive']} still open, closed {r['closed']}, missing e.g. "
            f"{r['missing_examples']}"
        )
    return problems


def report(out: dict, problems: list[str]) -> str:
    """The problems, then every number (also printed: ``-rP`` shows it for a pass)."""
    text = "\n".join(problems) + "\n" + json.dumps(
        {k: v for k, v in out.items() if k != "cuts"}, default=str
    )
    print(text)
    return text


def head_cut_problems(out: dict, n: int) -> list[str]:
    """(b), (c): every socket the attacker got was cut within the handshake deadline."""
    limit = DEFAULTS["handshake_timeout"] + HEAD_SLACK_S
    a = out["attack"]
    cuts = out["cuts"]
    problems = []
    if a["sockets"] + a["connect_failed"] != n:
        problems.append(f"attacker tried {a['sockets'] + a['connect_failed']} of {n} sockets")
    still_open = sum(1 for c in cuts if c["how"] == "open")
    late = sorted(c["after_s"] for c in cuts if c["after_s"] is not None and c["after_s"] > limit)
    if still_open or late:
        problems.append(
            f"attacker: {still_open} of {len(cuts)} sockets never cut, {len(late)} cut after "
            f"{limit}s (latest {late[-1] if late else None}s); cut {a['cut']}, "
            f"statuses {a['statuses']}"
        )
    return problems


# ----------------------------------------------------------------------------- a-f


@pytest.mark.timeout(75)
def test_hostile_a_lingering_close(shipped_server):
    """(a) 50 new sockets a second for 15 s: Connection: close / HTTP/1.0 / HTTP/9.9, then
    neither read nor close. Each gets its answer (200, or 400 for the bad version) and the
    server's FIN within 2 s of connecting; the accept loop never waits for them."""
    seconds = 15.0
    port = shipped_server.port
    out = under_attack(
        shipped_server, lambda: LingeringClose(port, rate=50, max_seconds=seconds + 5), seconds
    )
    problems = well_behaved_problems(out, seconds)
    a = out["attack"]
    if a["sockets"] < 50 * seconds * 0.9:
        problems.append(f"attacker opened only {a['sockets']} sockets (750 asked)")
    judged = [c for c in out["cuts"] if c["how"] != "error"]
    slow = [c for c in judged if c["how"] == "open" or (c["after_s"] or 0) > 2.0]
    # sockets opened in the last 2 s may not have been looked at since their FIN: allow 100
    if len(slow) > 100:
        problems.append(
            f"attacker: {len(slow)} of {len(judged)} sockets without the server's FIN within "
            f"2 s (cut {a['cut']}, FIN after {a['cut_after_s']})"
        )
    if set(a["statuses"]) - {200, 400}:
        problems.append(f"attacker: statuses {a['statuses']}, expected 200 and 400 only")
    text = report(out, problems)
    assert not problems, text


@pytest.mark.timeout(75)
def test_hostile_b_slow_headers(shipped_server):
    """(b) 1,000 sockets from one address, a request line and then a header line every 3 s:
    each is cut (408, or simply closed) within WSSERVER_HANDSHAKE_TIMEOUT of connecting."""
    n = 1000
    seconds = DEFAULTS["handshake_timeout"] + HEAD_SLACK_S + 2.0
    port = shipped_server.port
    out = under_attack(
        shipped_server,
        lambda: SlowHeaders(port, n=n, interval=3.0, max_seconds=seconds + 5),
        seconds,
    )
    problems = well_behaved_problems(out, seconds) + head_cut_problems(out, n)
    text = report(out, problems)
    assert not problems, text


@pytest.mark.timeout(75)
def test_hostile_c_silent_sockets(shipped_server):
    """(c) 300 sockets that connect and send nothing: each closed within
    WSSERVER_HANDSHAKE_TIMEOUT of connecting."""
    n = 300
    seconds = DEFAULTS["handshake_timeout"] + HEAD_SLACK_S + 2.0
    port = shipped_server.port
    out = under_attack(
        shipped_server, lambda: SilentSockets(port, n=n, max_seconds=seconds + 5), seconds
    )
    problems = well_behaved_problems(out, seconds) + head_cut_problems(out, n)
    text = report(out, problems)
    assert not problems, text


def ws_cut_problems(out: dict, codes: tuple[int, ...], within: float) -> list[str]:
    a, cuts = out["attack"], out["cuts"]
    if a["sockets"] != 1 or not cuts:
        return [f"attacker did not connect: {a['errors']}"]
    c = cuts[0]
    if c["how"] != "close_frame" or c["close_code"] not in codes or c["after_s"] > within:
        return [
            f"attacker: expected a close {codes} within {within}s, got {c['how']} "
            f"code={c['close_code']} reason={c['reason']!r} after {c['after_s']}s; "
            f"sent {a['sent']}, received {a.get('frames_received')}"
        ]
    return []


@pytest.mark.timeout(60)
def test_hostile_d_continuation_flood(shipped_server):
    """(d) An unfinished text message, then empty continuation frames as fast as possible:
    closed 1009 or 1008 within 3 s, and the worker's memory is back (within 32 MB)."""
    seconds = 6.0
    port = shipped_server.port
    pid = shipped_server.worker_pid()
    rss0 = rss_kb(pid)
    out = under_attack(
        shipped_server, lambda: ContinuationFlood(port, max_seconds=seconds + 5), seconds
    )
    grown_mb = (rss_kb(pid) - rss0) / 1024.0
    out["worker_rss_growth_mb"] = round(grown_mb, 1)
    problems = well_behaved_problems(out, seconds) + ws_cut_problems(out, (1008, 1009), 3.0)
    if grown_mb > 32:
        problems.append(f"worker RSS grew {grown_mb:.1f} MB during the attack and stayed")
    text = report(out, problems)
    assert not problems, text


@pytest.mark.timeout(60)
def test_hostile_e_ping_flood(shipped_server):
    """(e) Pings as fast as possible (pongs read): closed 1008 within 3 s."""
    seconds = 6.0
    port = shipped_server.port
    out = under_attack(shipped_server, lambda: PingFlood(port, max_seconds=seconds + 5), seconds)
    problems = well_behaved_problems(out, seconds) + ws_cut_problems(out, (1008,), 3.0)
    text = report(out, problems)
    assert not problems, text


def post_history(port: int, room: str, count: int) -> list[str]:
    """``count`` notifications to ``room``; their ids, in order."""
    ids = []
    for k in range(count):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            conn.request("POST", "/notify",
                         json.dumps({"event": "history", "message": f"m{k}", "room": room}),
                         {"Content-Type": "application/json"})
            resp = conn.getresponse()
            body = json.loads(resp.read())
            assert resp.status == 200, body
            ids.append(body["id"])
        finally:
            conn.close()
    return ids


@pytest.mark.timeout(60)
def test_hostile_f_resume_loop(shipped_server):
    """(f) 20 WebSockets looping subscribe-with-since on a room with 100 messages of history:
    they get error frames ``busy`` or are closed 1008; publishers never see a 503 (the
    bystander's checks)."""
    seconds = 8.0
    port = shipped_server.port
    room = "hostile-history"
    ids = post_history(port, room, 100)
    out = under_attack(
        shipped_server,
        lambda: ResumeLoop(port, room=room, since=ids[0], n=20, max_seconds=seconds + 5),
        seconds,
    )
    problems = well_behaved_problems(out, seconds)
    a = out["attack"]
    busy = a["replies"].get("error:busy", 0)
    closed_1008 = a["close_codes"].get(1008, 0)
    if a["sockets"] != 20:
        problems.append(f"attacker: {a['sockets']} of 20 loopers connected ({a['errors']})")
    if not busy and not closed_1008:
        problems.append(
            f"attacker: no 'busy' error frame and no close 1008 for {a['sent']} subscribes "
            f"(replies {a['replies']}, cut {a['cut']})"
        )
    text = report(out, problems)
    assert not problems, text
