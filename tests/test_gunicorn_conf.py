"""wsserver.gunicorn_conf, what can be tried without starting gunicorn: the settings it hands
gunicorn and its metrics directory (in a subprocess, since importing it sets
``PROMETHEUS_MULTIPROC_DIR``), and its hooks and helpers in-process (imported with that
variable already set, so it owns no directory), with a real gunicorn ``Config`` in a small
stand-in for the arbiter. The hooks' effect on a running server is in tests/e2e/.
"""

from __future__ import annotations

import importlib
import logging
import os
import resource
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
from gunicorn.config import Config
from tlscerts import self_signed, test_cert

from wsserver import create_app
from wsserver.config import load_settings

pytestmark = pytest.mark.timeout(30)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def conf(monkeypatch, tmp_path):
    """The module, imported with a metrics directory of the test's (so it creates none), its
    settings replaced by ``conf.settings(**overrides)``."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    module = importlib.import_module("wsserver.gunicorn_conf")

    def settings(**overrides) -> None:
        monkeypatch.setattr(module, "_settings", load_settings({}, overrides))

    settings()
    monkeypatch.setattr(module, "settings", settings, raising=False)
    return module


class Arbiter:
    """What ``on_starting`` reads of gunicorn's arbiter: ``cfg`` (a real gunicorn Config,
    as the command line left it) and ``log``."""

    def __init__(self, **cfg) -> None:
        self.cfg = Config()
        for name, value in {"worker_class": "wsserver.worker.ThreadWorker", "threads": 100,
                            "worker_connections": 1100, "bind": ["127.0.0.1:0"],
                            **cfg}.items():
            self.cfg.set(name, value)
        self.log = logging.getLogger("test.gunicorn_conf.arbiter")


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "test.gunicorn_conf.arbiter" and r.levelno == logging.WARNING]


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items()
               if not k.startswith("WSSERVER_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    environ.update(env, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True,
                          text=True, timeout=20, cwd=ROOT)


# -- what importing it does (subprocess) -------------------------------------------------------


def test_the_settings_it_hands_gunicorn_and_a_metrics_directory_it_removes():
    result = _run(
        "import os, wsserver.gunicorn_conf as c;"
        "print(c.bind, c.threads, c.worker_connections, c.graceful_timeout, c.workers);"
        "d = os.environ['PROMETHEUS_MULTIPROC_DIR']; print(d, os.path.isdir(d))",
        WSSERVER_HOST="::1", WSSERVER_PORT="9001", WSSERVER_THREADS="50",
        WSSERVER_SHUTDOWN_TIMEOUT="3",
    )
    assert result.returncode == 0, result.stderr
    settings_line, dir_line = result.stdout.splitlines()
    assert settings_line == "['[::1]:9001'] 50 1050 8 1"
    directory, existed = dir_line.split()
    assert existed == "True" and "wsserver-metrics-" in directory
    assert not Path(directory).exists(), "the master removes its metrics directory at exit"


def test_a_metrics_directory_given_is_left_alone(tmp_path):
    result = _run("import wsserver.gunicorn_conf as c; print(c._METRICS_DIR_OWNED)",
                  PROMETHEUS_MULTIPROC_DIR=str(tmp_path))
    assert result.stdout.strip() == "False" and tmp_path.is_dir()


def test_a_bad_setting_stops_the_start_with_exit_2_and_one_line():
    result = _run("import wsserver.gunicorn_conf", WSSERVER_PORT="not-a-port")
    assert result.returncode == 2
    assert result.stderr == (
        "wsserver: WSSERVER_PORT must be an integer from 0 to 65535, got 'not-a-port'\n"
    )
    assert "Traceback" not in result.stderr


# -- on_starting: the refusals and warnings ----------------------------------------------------


def test_several_workers_without_redis_are_refused(conf, capsys):
    with pytest.raises(SystemExit) as stopped:
        conf.on_starting(Arbiter(workers=2))
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("wsserver: refusing to start 2 workers") and "REDIS_URL" in err
    conf.on_starting(Arbiter(workers=1))  # one worker: fine


def test_an_unreachable_redis_is_refused_without_its_password(conf, capsys):
    conf.settings(redis_url="redis://:s3cret@127.0.0.1:1/0")  # port 1: refused at once
    with pytest.raises(SystemExit) as stopped:
        conf.on_starting(Arbiter(workers=2))
    assert stopped.value.code == 3
    err = capsys.readouterr().err
    assert "Redis at WSSERVER_REDIS_URL is unreachable" in err and "s3cret" not in err


def test_sentinels_count_as_redis_and_are_asked_before_the_workers_start(conf, capsys):
    conf.settings(redis_sentinels=("127.0.0.1:1",), redis_sentinel_master="m",
                  redis_url="redis://:s3cret@/0")
    with pytest.raises(SystemExit) as stopped:
        conf.on_starting(Arbiter(workers=2))  # not refused as "2 workers without Redis"
    assert stopped.value.code == 3
    err = capsys.readouterr().err
    assert "Redis master 'm' of WSSERVER_REDIS_SENTINELS (127.0.0.1:1) is unknown" in err
    assert "s3cret" not in err


@pytest.mark.parametrize(
    "cfg, expected",
    [
        pytest.param({}, [], id="ours"),
        pytest.param({"worker_class": "gthread"}, ["is not wsserver.worker.ThreadWorker"],
                     id="gthread"),
        # gunicorn itself runs "sync" with --threads over 1 as gthread
        pytest.param({"worker_class": "sync", "threads": 2}, ["is not wsserver.worker"],
                     id="sync-threads"),
        pytest.param({"worker_class": "sync", "threads": 1},
                     ["is not gthread", "is not wsserver.worker"], id="sync"),
        pytest.param({"worker_connections": 100}, ["turns HTTP keep-alive off"],
                     id="keepalive-off"),
    ],
)
def test_a_configuration_that_weakens_the_server_is_warned_about(conf, caplog, cfg, expected):
    with caplog.at_level(logging.WARNING, logger="test.gunicorn_conf.arbiter"):
        conf.on_starting(Arbiter(**cfg))
    warnings = [w for w in _warnings(caplog) if "open-files limit" not in w]
    assert len(warnings) == len(expected), warnings
    for warning, text in zip(warnings, expected):
        assert text in warning


@pytest.mark.parametrize("bind, exposed", [
    ("0.0.0.0:8080", "listening on 0.0.0.0:8080, not loopback only"),
    ("127.0.0.1:8080", None),
])
def test_development_says_once_what_it_leaves_open(conf, caplog, monkeypatch, bind, exposed):
    """One WARNING from the master's hook (so one per server, whatever the workers), on the
    binds gunicorn will really use (a ``-b`` flag included); none in production."""
    monkeypatch.setattr(conf, "bind_problem", lambda address: None)  # 8080 may be taken here
    conf.settings(env="development")
    with caplog.at_level(logging.WARNING, logger="test.gunicorn_conf.arbiter"):
        conf.on_starting(Arbiter(bind=[bind]))
    warnings = [w for w in _warnings(caplog) if "development mode" in w]
    assert len(warnings) == 1, _warnings(caplog)
    for item in ("any origin", "POST /notify from any address without a key",
                 "without a connection token", "rebroadcast on"):
        assert item in warnings[0]
    assert (exposed in warnings[0]) if exposed else ("listening on" not in warnings[0])

    caplog.clear()
    conf.settings(env="production")
    with caplog.at_level(logging.WARNING, logger="test.gunicorn_conf.arbiter"):
        conf.on_starting(Arbiter(bind=[bind]))
    assert not [w for w in _warnings(caplog) if "development mode" in w]


# -- helpers -----------------------------------------------------------------------------------


def test_a_taken_port_stops_plain_gunicorn_in_one_line_before_it_retries(conf, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit) as stopped:
            conf.on_starting(Arbiter(bind=[f"127.0.0.1:{port}"]))
    assert stopped.value.code == 1
    assert capsys.readouterr().err == (
        f"wsserver: cannot listen on 127.0.0.1:{port}: address already in use\n"
    )
    conf.on_starting(Arbiter(bind=[f"127.0.0.1:{port}"]))  # free again: fine


@pytest.fixture
def nofile():
    """The open-files limit, restored after the test (lowering the soft limit is always
    allowed; this process then raises it back to where it was)."""
    saved = resource.getrlimit(resource.RLIMIT_NOFILE)
    yield saved
    resource.setrlimit(resource.RLIMIT_NOFILE, saved)


def test_the_open_files_limit_is_raised_towards_what_the_worker_may_hold(conf, nofile, caplog):
    soft, hard = nofile
    if hard != resource.RLIM_INFINITY and hard < 512:
        pytest.skip(f"hard open-files limit {hard} leaves no room to raise")
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    log = logging.getLogger("test.gunicorn_conf.arbiter")
    with caplog.at_level(logging.WARNING, logger=log.name):
        conf._raise_open_files_limit(512, log)
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == 512
    assert not _warnings(caplog)
    conf._raise_open_files_limit(300, log)  # never lowered
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == 512


def test_a_limit_the_hard_cap_keeps_too_low_is_warned_about(conf, nofile, caplog):
    soft, hard = nofile
    if hard == resource.RLIM_INFINITY:
        pytest.skip("no hard open-files limit here")
    log = logging.getLogger("test.gunicorn_conf.arbiter")
    with caplog.at_level(logging.WARNING, logger=log.name):
        conf._raise_open_files_limit(hard + 1, log)
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == hard
    (warning,) = _warnings(caplog)
    assert f"open-files limit {hard} is below the {hard + 1} sockets" in warning


def test_request_reads_are_bounded_on_every_listener(conf):
    listener = socket.socket()
    error_log = logging.getLogger("test.gunicorn_conf.error_log")
    worker = SimpleNamespace(sockets=[SimpleNamespace(sock=listener)],
                             log=SimpleNamespace(error_log=error_log, warning=print))
    try:
        conf._bound_request_reads(worker, 2.5)
        value = listener.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.calcsize("ll"))
        assert struct.unpack("ll", value) == (2, 500_000)
        assert any(isinstance(f, conf._ReadTimeoutFilter) for f in error_log.filters)
    finally:
        listener.close()
        for f in list(error_log.filters):
            error_log.removeFilter(f)


def test_a_read_timeout_is_logged_as_one_info_line_other_errors_untouched(conf):
    def record(msg: str, exc: BaseException) -> logging.LogRecord:
        return logging.LogRecord("gunicorn.error", logging.ERROR, __file__, 1, msg, (),
                                 (type(exc), exc, None))

    timed_out = record("Socket error processing request.", BlockingIOError(11, "again"))
    assert conf._ReadTimeoutFilter().filter(timed_out)
    assert (timed_out.levelno, timed_out.exc_info) == (logging.INFO, None)
    assert "WSSERVER_HANDSHAKE_TIMEOUT" in timed_out.getMessage()
    other = record("Socket error processing request.", ConnectionResetError())
    assert conf._ReadTimeoutFilter().filter(other)
    assert other.levelno == logging.ERROR and other.exc_info is not None


def test_the_service_is_found_through_the_workers_wrapper(conf):
    app = create_app({"env": "development"})
    service = app.extensions["wsserver"]
    assert conf._find_service(app) is service
    assert conf._find_service(SimpleNamespace(__wrapped__=app)) is service
    assert conf._find_service(lambda environ, start_response: []) is None


def test_post_fork_shrinks_the_thread_stack(conf):
    previous = threading.stack_size()
    try:
        conf.post_fork(None, None)
    finally:
        assert threading.stack_size(previous) == 512 * 1024


def test_child_exit_drops_the_dead_workers_live_gauges(conf, tmp_path):
    dead = tmp_path / "gauge_livesum_424242.db"
    dead.write_bytes(b"")
    kept = tmp_path / "counter_424242.db"
    kept.write_bytes(b"")
    conf.child_exit(None, SimpleNamespace(pid=424242))
    assert not dead.exists() and kept.exists(), "counters outlive the worker, live gauges not"


# -- TLS --------------------------------------------------------------------------------------


def test_the_tls_settings_become_gunicorns_certfile_and_keyfile():
    crt, key = test_cert()
    result = _run("import wsserver.gunicorn_conf as c; print(c.certfile, c.keyfile)",
                  WSSERVER_TLS_CERT=str(crt), WSSERVER_TLS_KEY=str(key))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(crt), str(key)]
    plain = _run("import wsserver.gunicorn_conf as c; print(c.certfile, c.keyfile)")
    assert plain.stdout.split() == ["None", "None"]
    alone = _run("import wsserver.gunicorn_conf", WSSERVER_TLS_CERT=str(crt))
    assert alone.returncode == 2 and "WSSERVER_TLS_KEY is not" in alone.stderr


def test_one_ssl_context_per_worker_until_the_files_change(conf, tmp_path):
    import ssl

    crt, key = self_signed(tmp_path)
    cfg = Config()
    cfg.set("certfile", str(crt))
    cfg.set("keyfile", str(key))
    built = []

    def factory():
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(str(crt), str(key))
        built.append(context)
        return context

    first = conf.ssl_context(cfg, factory)
    assert conf.ssl_context(cfg, factory) is first and len(built) == 1
    assert first.options & ssl.OP_NO_RENEGOTIATION
    self_signed(tmp_path)  # a renewal: new files in place
    os.utime(crt, ns=(0, os.stat(crt).st_mtime_ns + 1_000_000))
    renewed = conf.ssl_context(cfg, factory)
    assert renewed is not first and len(built) == 2
