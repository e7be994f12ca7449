"""Every command and config block in README.md and docs/*.md is run by a test.

The blocks are read from the files (fenced ```sh, ```bash, ```python, ```js, ```ini, ```nginx),
and :data:`TESTED` names the test that runs each, keyed by file and first line:
:func:`test_every_command_and_config_block_has_a_test` fails when a block is added, changed at
its first line, or removed without this list following. Untyped and ```json blocks are wire
examples (frames, answers), not commands; docs/protocol.md's are checked by the protocol tests.

How a block runs: shell lines through ``bash`` with the test virtualenv's ``bin`` first on
``PATH`` (where the README says bare ``wsserver``/``gunicorn`` come from) and this checkout on
``PYTHONPATH``; ports (8080, 443, 9000) become a free port and ``0.0.0.0`` becomes 127.0.0.1.
A line that starts a server is started, must answer ``GET /``, must not log the keep-alive
warning or a traceback, and is stopped by its process group's id."""

from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
import requests
import urllib3
import websocket
from support import ROOT, free_port, serving, wait_for

pytestmark = pytest.mark.timeout(120)

VENV_BIN = Path(sys.executable).parent
COMMAND_LANGUAGES = {"sh", "bash", "python", "js", "ini", "nginx"}
KEEPALIVE_WARNING = "turns HTTP keep-alive off"

#: (file, first line of the block) -> the test(s) that run it
TESTED = {
    ("README.md", "./scripts/serve   #"): ["test_readme_scripts"],
    ("README.md", ".venv/bin/wsserver listen --room orders"): ["test_readme_tour"],
    ("README.md", "curl -s localhost:8080/"): ["test_readme_tour"],
    ("README.md", 'const ws = new WebSocket("ws://localhost:8080/ws");'): ["test_readme_browser"],
    ("README.md", "from wsserver.client import Publisher, Subscriber"): ["test_readme_python"],
    ("README.md", "wsserver serve --host 0.0.0.0 --port 8080"): ["test_server_blocks"],
    ("README.md", "WSSERVER_TLS_CERT=/etc/ssl/ws.pem"): ["test_server_blocks"],
    ("docs/deploy.md", "python3 -m venv /opt/wsserver/venv"): ["test_deploy_install"],
    ("docs/deploy.md", "WSSERVER_HOST=127.0.0.1 WSSERVER_PORT=8080 wsserver serve"):
        ["test_server_blocks"],
    ("docs/deploy.md", "WSSERVER_TLS_CERT=/etc/ssl/certs/ws.example.com.pem \\"):
        ["test_server_blocks"],
    ("docs/deploy.md", "# no query string in the access log"):
        ["test_deploy.py::test_nginx_accepts_the_documented_config",
         "test_deploy.py::test_websocket_and_http_through_the_documented_nginx"],
    ("docs/deploy.md", "# /etc/systemd/system/wsserver.service"):
        ["test_deploy.py::test_systemd_analyze_verifies_the_documented_unit",
         "test_deploy.py::test_the_documented_unit_runs_a_server"],
    ("docs/deploy.md", "WSSERVER_REDIS_URL=redis://127.0.0.1:6379/0 wsserver serve --workers 2"):
        ["test_server_blocks"],
    ("docs/deploy.md", "WSSERVER_REDIS_SENTINELS="): ["test_sentinel_block"],
    ("docs/performance.md", ".venv/bin/python scripts/bench"): ["test_bench_block"],
    ("README.md", "from flask import Flask, request"): ["test_readme_flask_extension"],
    ("README.md", "# from the directory that holds myapp.py"): ["test_readme_flask_extension"],
}


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def blocks() -> list[tuple[str, str, str]]:
    """Every fenced block as (file relative to the root, language, text)."""
    found = []
    for path in doc_files():
        text = path.read_text()
        for match in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M):
            found.append((str(path.relative_to(ROOT)), match.group(1), match.group(2)))
    return found


def block(file: str, first: str) -> str:
    """The one block of ``file`` whose first line starts with ``first``."""
    matches = [t for f, _, t in blocks() if f == file and t.startswith(first)]
    assert len(matches) == 1, f"{file}: {len(matches)} blocks start with {first!r}"
    return matches[0]


def commands(text: str) -> list[str]:
    """The shell commands of a block: comment lines dropped, continuations joined."""
    joined = text.replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_every_command_and_config_block_has_a_test():
    found = {(f, t) for f, lang, t in blocks() if lang in COMMAND_LANGUAGES}
    keyed = {key: [t for f, t in found if f == key[0] and t.startswith(key[1])] for key in TESTED}
    assert all(len(v) == 1 for v in keyed.values()), {k: len(v) for k, v in keyed.items()}
    untested = found - {(k[0], v[0]) for k, v in keyed.items()}
    assert not untested, f"blocks no test runs (add them to TESTED): {sorted(untested)}"
    here = Path(__file__).read_text()
    deploy = (Path(__file__).parent / "test_deploy.py").read_text()
    for names in TESTED.values():
        for name in names:
            source, _, func = name.rpartition("::")
            assert f"def {func}(" in (deploy if source else here), f"no test {name}"


def test_blocks_of_other_kinds_are_only_examples():
    """A block without a language or in JSON is not a command: keep it that way (a ```sh
    block mislabelled as plain text would escape the list above)."""
    for file, lang, text in blocks():
        if lang in COMMAND_LANGUAGES:
            continue
        assert lang in ("", "json"), f"{file}: a ```{lang} block: run it in a test"
        first = text.lstrip().split()[0] if text.strip() else ""
        assert first in ("GET", "{") or first.startswith("{"), f"{file}: {text[:60]!r}"


# -- running shell lines ---------------------------------------------------------------------


def shell_env(port: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WSSERVER_")}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(ROOT)
    env["WSSERVER_PORT"] = str(port)  # for lines that name no port
    env.update(extra)
    return env


def localize(line: str, port: int) -> str:
    line = re.sub(r"\b(8080|443|9000)\b", str(port), line)
    line = line.replace("0.0.0.0", "127.0.0.1")
    return line.replace(".venv/bin/", f"{VENV_BIN}/")


def run(line: str, env: dict, cwd: Path = ROOT, timeout: float = 60) -> str:
    result = subprocess.run(["bash", "-c", line], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, f"{line}\n{result.stdout}\n{result.stderr}"
    return result.stdout


@contextlib.contextmanager
def started(line: str, env: dict, cwd: Path, log: Path, scheme: str = "http") -> Iterator[str]:
    """Run a line that serves, wait until ``GET /`` answers 200; stop its process group."""
    url = f"{scheme}://127.0.0.1:{env['WSSERVER_PORT']}"
    with open(log, "wb") as out:
        proc = subprocess.Popen(["bash", "-c", line], cwd=cwd, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def up() -> bool:
            assert proc.poll() is None, f"{line} exited:\n{log.read_text()}"
            try:
                return requests.get(url + "/", timeout=1, verify=False).status_code == 200
            except requests.RequestException:
                return False

        wait_for(up, timeout=30, interval=0.1, message=f"{line} to serve")
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def assert_clean(log: Path, line: str) -> None:
    text = log.read_text(errors="replace")
    assert KEEPALIVE_WARNING not in text, f"{line}:\n{text}"
    assert "Traceback" not in text, f"{line}:\n{text}"


def self_signed(directory: Path) -> tuple[Path, Path]:
    from .test_deploy import self_signed as make

    crt, key = make(directory)
    return crt, key


SERVER_BLOCKS = [
    ("README.md", "wsserver serve --host 0.0.0.0 --port 8080"),
    ("README.md", "WSSERVER_TLS_CERT=/etc/ssl/ws.pem"),
    ("docs/deploy.md", "WSSERVER_HOST=127.0.0.1 WSSERVER_PORT=8080 wsserver serve"),
    ("docs/deploy.md", "WSSERVER_TLS_CERT=/etc/ssl/certs/ws.example.com.pem \\"),
    ("docs/deploy.md", "WSSERVER_REDIS_URL=redis://127.0.0.1:6379/0 wsserver serve --workers 2"),
]


@pytest.mark.parametrize("file, first", SERVER_BLOCKS,
                         ids=[f"{f}:{t[:24]}" for f, t in SERVER_BLOCKS])
def test_server_blocks(file, first, tmp_path):
    """Each line of each block serves, as written (ports and paths aside), in production
    mode, without the keep-alive warning (README's ``--threads 5000`` once turned it off)."""
    crt, key = self_signed(tmp_path)
    shutil.copy(crt, tmp_path / "ws.pem")  # the relative --certfile ws.pem --keyfile ws.key
    shutil.copy(key, tmp_path / "ws.key")
    urllib3.disable_warnings()
    for n, line in enumerate(commands(block(file, first))):
        port = free_port()
        line = localize(line, port)
        for path in re.findall(r"/etc/ssl/\S+", line):
            line = line.replace(path, str(key if path.endswith(".key") else crt))
        tls = "TLS" in line or "--certfile" in line
        env = shell_env(port, WSSERVER_REDIS_PREFIX=f"wsserver-docs-{port}")
        log = tmp_path / f"server-{n}.log"
        with started(line, env, tmp_path, log, "https" if tls else "http") as url:
            health = requests.get(url + "/", timeout=5, verify=False).json()
            assert health["status"] == "ok", health
            if "--workers 2" in line:
                wait_for(lambda: "Booting worker" in log.read_text()
                         and log.read_text().count("Booting worker") >= 2, timeout=10)
        assert_clean(log, line)


def test_sentinel_block(tmp_path):
    """The Sentinel block serves as written, against a master, a replica and three sentinels
    of the test's own (tests/e2e/test_sentinel.py): their addresses and master name for the
    documented ones, and no password (the test's Redis has none)."""
    from .test_sentinel import MASTER, RedisGroup, redis_server_missing

    if redis_server_missing():
        pytest.skip("redis-server is not installed")
    group = RedisGroup(tmp_path).start()
    try:
        (line,) = commands(block("docs/deploy.md", "WSSERVER_REDIS_SENTINELS="))
        line = re.sub(r"(WSSERVER_REDIS_SENTINELS=)\S+", rf"\g<1>{group.sentinels()}", line)
        line = line.replace("=mymaster", f"={MASTER}").replace(":the-password@", "@")
        port = free_port()
        env = shell_env(port, WSSERVER_REDIS_PREFIX=f"wsserver-docs-{port}")
        log = tmp_path / "server.log"
        with started(line, env, tmp_path, log) as url:
            assert requests.get(url + "/", timeout=5).json()["status"] == "ok"
            wait_for(lambda: log.read_text().count("broker: redis sentinel master") >= 2,
                     timeout=10, message="both workers' start-up lines")
        assert f"sentinel master {MASTER}/0 via {group.sentinels()} prefix" in log.read_text()
        assert_clean(log, line)
    finally:
        group.stop()


def test_readme_scripts(tmp_path):
    """``./scripts/serve --port N`` serves in development mode and ``./scripts/test`` runs
    pytest with its arguments, with a virtualenv already set up (the "fast when run again"
    path; setting one up is ``pip install``, run by test_deploy_install)."""
    text = block("README.md", "./scripts/serve   #")
    lines = [c.split("#")[0].strip() for c in commands(text)]
    assert lines == ["./scripts/serve", "./scripts/test"]
    venv = tmp_path / "venv"
    venv.mkdir()
    shutil.copy(VENV_BIN.parent / "pyvenv.cfg", venv / "pyvenv.cfg")
    for name in ("bin", "lib", "include"):
        if (VENV_BIN.parent / name).exists():
            (venv / name).symlink_to(VENV_BIN.parent / name)
    # every stamp scripts/_venv.sh looks for (serve asks for the client extra): a missing one
    # makes it pip install -e into this venv, whose bin and lib are the test venv's own
    for stamp in (".wsserver-installed", ".wsserver-installed-test",
                  ".wsserver-installed-client"):
        (venv / stamp).touch()
    port = free_port()
    # the port: --port says it too; one process for the nested suite (it runs 3 tests)
    env = shell_env(port, WSSERVER_VENV=str(venv), WSSERVER_TEST_PROCESSES="0")
    log = tmp_path / "serve.log"
    with started(f"./scripts/serve --port {port}", env, ROOT, log) as url:
        assert requests.get(url + "/", timeout=5).status_code == 200
    assert "development" in log.read_text()
    out = run("./scripts/test -q -p no:cacheprovider tests/test_docs.py", env, ROOT, timeout=120)
    assert " passed" in out


def test_readme_tour(tmp_path):
    """``listen`` first, then the curl and CLI lines: outputs have the documented keys, and
    the listening terminal prints both notifications."""
    listen_line = commands(block("README.md", ".venv/bin/wsserver listen --room orders"))
    publish = block("README.md", "curl -s localhost:8080/")
    with serving(env={"WSSERVER_ENV": "development"}) as server:
        url = f"--url http://127.0.0.1:{server.port}"
        env = shell_env(server.port)
        (line,) = listen_line
        listener = subprocess.Popen(["bash", "-c", f"{localize(line, server.port)} {url}"],
                                    cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            wait_for(lambda: server.health()["subscriptions"] == 1, message="listen to subscribe")
            lines = publish.splitlines()
            for n, cmd in enumerate(lines):
                if not cmd.strip() or cmd.startswith("#"):
                    continue
                cmd = localize(cmd, server.port)
                out = run(cmd + (f" {url}" if "wsserver notify" in cmd else ""), env, tmp_path)
                documented = json.loads(lines[n + 1].lstrip("# "))
                assert set(json.loads(out)) == set(documented), (cmd, out)
                if "notify" in cmd:
                    assert json.loads(out)["clients"] == 1, out
            got = [json.loads(listener.stdout.readline()) for _ in range(2)]
        finally:
            os.killpg(listener.pid, signal.SIGTERM)
            _, err = listener.communicate(timeout=10)
    assert [g["message"] for g in got] == ["Order 7 is on its way", "Order 7"]
    assert all(g["room"] == "orders" for g in got)
    said = listen_line_comment("README.md").split("   (on stderr)")[0]
    assert localize(said, server.port).replace("localhost", "127.0.0.1") in err, err


def listen_line_comment(file: str) -> str:
    text = block(file, ".venv/bin/wsserver listen --room orders")
    return [line for line in text.splitlines() if line.startswith("# ")][0][2:]


def test_readme_browser(tmp_path):
    """The browser snippet under Node's WebSocket (the browser's API): it prints a
    notification POSTed for everybody."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    with serving(env={"WSSERVER_ENV": "development"}) as server:
        script = tmp_path / "tour.mjs"
        script.write_text(block("README.md", "const ws = new WebSocket").replace(
            "ws://localhost:8080", f"ws://127.0.0.1:{server.port}"))
        proc = subprocess.Popen([node, "--experimental-websocket", str(script)], cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            wait_for(lambda: server.health()["clients"] == 1, message="node to connect")
            answer = server.notify({"event": "order.shipped", "message": "Order 7 is on its way",
                                    "data": {"order": 7}})
            assert answer.status_code == 200, answer.text
            out = ""
            for _ in range(30):  # Node prints an object over several lines
                out += proc.stdout.readline()
                if "Order 7 is on its way" in out:
                    break
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.communicate(timeout=10)
    assert "order.shipped" in out and "Order 7 is on its way" in out, out


def test_readme_python(capsys):
    code = block("README.md", "from wsserver.client import Publisher, Subscriber")
    with serving(env={"WSSERVER_ENV": "development"}) as server:
        code = code.replace("127.0.0.1:8080", f"127.0.0.1:{server.port}")
        scope: dict = {}
        exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the README's own code
        try:
            wait_for(lambda: "order.shipped" in capsys.readouterr().out, timeout=10,
                     message="the subscriber to print the notification")
        finally:
            assert scope["sub"].stop()


def test_deploy_install(tmp_path):
    """docs/deploy.md's install block, into a temporary directory, from this checkout: a new
    virtualenv, ``pip install`` (pip's configured index), and ``check-config``."""
    text = block("docs/deploy.md", "python3 -m venv /opt/wsserver/venv")
    lines = [c.replace("/opt/wsserver", str(tmp_path)).replace("/path/to/wsserver", str(ROOT))
             for c in commands(text)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WSSERVER_", "PYTHON"))}
    started_at = time.monotonic()
    out = run("set -e\n" + "\n".join(lines), env, tmp_path, timeout=300)
    assert "WSSERVER_PORT" in out and "8080" in out, out
    print(f"install block: {time.monotonic() - started_at:.1f} s")


def _bench_module():
    loader = importlib.machinery.SourceFileLoader("wsserver_bench", str(ROOT / "scripts" / "bench"))
    spec = importlib.util.spec_from_loader("wsserver_bench", loader)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    return module


def test_bench_block(tmp_path):
    """docs/performance.md's bench lines: ``--help`` runs; the others are parsed by the
    bench's own argument parser (scenario and server names checked), not run: a run takes
    minutes and the machine is shared."""
    bench = _bench_module()
    for line in commands(block("docs/performance.md", ".venv/bin/python scripts/bench")):
        line = line.split("#")[0].strip()
        assert line.startswith(".venv/bin/python scripts/bench"), line
        argv = line.split()[2:]
        if argv == ["--help"]:
            out = run(localize(line, 0), shell_env(0), ROOT)
            assert "--scenario" in out
            continue
        args = bench.parse_args([*argv, "--log-dir", str(tmp_path)])
        assert args.scenarios and args.servers, line


def test_bench_scaling_plan(tmp_path):
    """The documented defaults of ``--scenario scaling``: one session per N of 100, 1,000,
    5,000 and 10,000 (``--clients`` overrides them, and the idle default stays 1000,5000),
    fewer fan-out notifications at large N, the paced phase at the largest N only and at
    10/s unless ``--rate`` says otherwise (latency1000 keeps its 50/s)."""
    bench = _bench_module()

    def parse(*argv):
        return bench.parse_args([*argv, "--log-dir", str(tmp_path)])

    args = parse("--scenario", "scaling,idle")
    assert args.scaling_clients == [100, 1000, 5000, 10000]
    assert args.idle_clients == [1000, 5000]
    assert bench.rate_or(args, bench.SCALING_RATE) == 10.0
    assert bench.rate_or(args, bench.DEFAULT_RATE) == 50.0
    groups = [g for g in bench.plan_groups(args) if g[1][0][1] == "scaling"]
    assert [(n, members[0][0]) for n, members, _v in groups] == [
        (100, "scaling100"), (1000, "scaling1000"), (5000, "scaling5000"),
        (10000, "scaling10000")]
    assert [bench.scaling_messages(args, n) for n, _m, _v in groups] == [2000, 2000, 800, 400]

    args = parse("--scenario", "scaling", "--clients", "1000,100", "--rate", "5",
                 "--messages", "300")
    assert args.scaling_clients == [100, 1000]
    assert bench.rate_or(args, bench.SCALING_RATE) == 5.0
    assert [bench.scaling_messages(args, n) for n in args.scaling_clients] == [300, 300]
    with pytest.raises(SystemExit):
        parse("--scenario", "scaling", "--clients", "0,100")

    rows = [{"clients": 1000, "server": "wsserver", "messages": 2000, "deliveries_per_s": 5e5,
             "cpu_us_per_delivery": 0.7, "latency_ms": {"p50": 1.0, "p99": 2.0}, "lost": 0,
             "paced_rate": 10.0, "paced_latency_ms": {"p50": 3.0, "p99": 4.0, "max": 5.0},
             "paced_lost": 0, "runs": 3},
            {"clients": 100, "server": "naive", "error": "session: RuntimeError: boom"},
            {"clients": 5000, "clients_open": 4990, "server": "wsserver", "lost": 0}]
    table = bench.scaling_table(rows).splitlines()
    assert len({line.count("|") for line in table}) == 1, table
    assert table[2].startswith("| 100 | naive | error: session: RuntimeError: boom")
    assert "| 1,000 | wsserver | 2,000 | 500,000 | 0.70 | 1.0 / 2.0 | 0 | 10 | 3.0 / 4.0 / 5.0" \
        in table[3]
    assert table[4].startswith("| 5,000 (4,990 open) | wsserver | - | - |")


def test_readme_flask_extension(tmp_path):
    """The README's Flask app is docs/examples/myapp.py's code (tests/e2e/test_extension.py
    runs that file, on Redis with two workers too); here the README's own text is saved as
    myapp.py and served by the README's line from its directory: the app's route, wsserver's
    health under the prefix, and a client on /realtime/ws that gets what the route
    published."""
    code = block("README.md", "from flask import Flask, request")
    example = (ROOT / "docs" / "examples" / "myapp.py").read_text()
    assert example.split('"""', 2)[2].lstrip("\n") == code, "README and the example differ"
    (tmp_path / "myapp.py").write_text(code)
    (line,) = commands(block("README.md", "# from the directory that holds myapp.py"))
    port = free_port()
    env = shell_env(port, WSSERVER_ENV="development")
    log = tmp_path / "server.log"
    with started(localize(line, port), env, tmp_path, log) as url:
        assert requests.get(url + "/", timeout=5).json()["app"] == "orders"
        assert requests.get(url + "/realtime/", timeout=5).json()["service"] == "ws"
        ws = websocket.create_connection(f"ws://127.0.0.1:{port}/realtime/ws?rooms=orders",
                                         timeout=10)
        try:
            wait_for(lambda: requests.get(url + "/realtime/", timeout=5).json()[
                "subscriptions"] == 1, message="the client to join orders")
            created = requests.post(url + "/orders", json={"id": 12}, timeout=5).json()
            got = json.loads(ws.recv())
        finally:
            ws.close()
    assert (got["event"], got["message"], got["id"]) == ("order.created", "Order 12",
                                                         created["id"])
    assert_clean(log, line)
