"""docs/deploy.md's nginx config is real: `nginx -t` accepts it, and a real nginx built from it
proxies WebSockets and HTTP to a real wsserver (over TLS, with a throw-away certificate). Its
systemd unit is real too: `systemd-analyze verify` accepts it, and its environment, environment
file and `ExecStart` run a server that stops cleanly on the unit's `KillSignal`."""

from __future__ import annotations

import contextlib
import datetime
import http.client
import json
import os
import re
import resource
import shlex
import shutil
import signal
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
import requests
import websocket
from support import ROOT, free_port, wait_for

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
needs_nginx = pytest.mark.skipif(
    not shutil.which("nginx") and not os.path.exists(NGINX),
    reason="nginx is not installed (.ci/run installs nginx-light)",
)
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
VENV_BIN = Path(sys.executable).parent


def deploy_server_block() -> str:
    text = (ROOT / "docs" / "deploy.md").read_text()
    block = re.search(r"```nginx\n(.*?)```", text, re.S)
    assert block, "docs/deploy.md has an nginx block"
    return block.group(1)


def self_signed(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ws.example.com")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    crt, pem = tmp_path / "cert.pem", tmp_path / "key.pem"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    return crt, pem


def nginx_conf(tmp_path, upstream_port: int, listen_port: int) -> str:
    crt, key = self_signed(tmp_path)
    block = deploy_server_block()
    block = block.replace("server 127.0.0.1:8080;", f"server 127.0.0.1:{upstream_port};")
    block = block.replace("listen 443 ssl;", f"listen 127.0.0.1:{listen_port} ssl;")
    block = block.replace("/etc/ssl/certs/ws.example.com.pem", str(crt))
    block = block.replace("/etc/ssl/private/ws.example.com.key", str(key))
    block = block.replace("/var/log/nginx/wsserver.access.log", str(tmp_path / "access.log"))
    conf = tmp_path / "nginx.conf"
    conf.write_text(
        f"daemon off;\nworker_processes 1;\npid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\n"
        "events { worker_connections 256; }\n"
        f"http {{\naccess_log off;\nclient_body_temp_path {tmp_path}/body;\nproxy_temp_path {tmp_path}/proxy;\n"
        f"{block}\n}}\n")
    return str(conf)


@needs_nginx
def test_nginx_accepts_the_documented_config(tmp_path):
    conf = nginx_conf(tmp_path, 8080, free_port())
    result = subprocess.run([NGINX, "-t", "-c", conf, "-p", str(tmp_path)], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, result.stderr


@contextlib.contextmanager
def documented_nginx(server, tmp_path):
    """A real nginx from docs/deploy.md in front of ``server``; yields its https base URL."""
    tmp_path.mkdir(exist_ok=True)
    port = free_port()
    conf = nginx_conf(tmp_path, server.port, port)
    proc = subprocess.Popen([NGINX, "-c", conf, "-p", str(tmp_path)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        base = f"https://127.0.0.1:{port}"

        def up():
            try:
                return requests.get(base + "/", verify=False, timeout=2).status_code == 200
            except requests.RequestException:
                return False

        wait_for(up, timeout=15, message="nginx proxying")
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@needs_nginx
def test_websocket_and_http_through_the_documented_nginx(make_server, tmp_path):
    server = make_server({"WSSERVER_ENV": "development"})
    with documented_nginx(server, tmp_path) as base:
        url = base.replace("https://", "wss://") + "/ws?token=secret-in-the-query"
        ws = websocket.create_connection(url, timeout=10,
                                         sslopt={"cert_reqs": ssl.CERT_NONE, "check_hostname": False})
        try:
            wait_for(lambda: server.health()["clients"] == 1, message="client through nginx")
            r = requests.post(base + "/notify", json={"event": "via-nginx"}, verify=False, timeout=5)
            assert r.status_code == 200
            assert json.loads(ws.recv())["event"] == "via-nginx"
        finally:
            ws.close()
        log = tmp_path / "access.log"
        wait_for(lambda: log.exists() and "GET /ws HTTP/1.1" in log.read_text(),
                 message="the WebSocket's line in nginx's access log")
        text = log.read_text()
        assert "secret-in-the-query" not in text and "token" not in text, text


@needs_nginx
def test_behind_the_documented_nginx_the_readme_settings_hold(make_server, tmp_path):
    """Production behind nginx on the same host. Without API keys a proxied request is never
    loopback (403); with the README's settings (keys, the proxy trusted) a key publishes and
    the audit line names the address nginx saw, not nginx."""
    closed = make_server({"WSSERVER_ENV": "production"})
    with documented_nginx(closed, tmp_path / "a") as base:
        r = requests.post(base + "/notify", json={"event": "e"}, verify=False, timeout=5)
        assert r.status_code == 403 and "WSSERVER_API_KEYS" in r.json()["error"]
        assert requests.get(base + "/rooms", verify=False, timeout=5).status_code == 403
    key = "deploy-test-key-3c1e"
    server = make_server({"WSSERVER_ENV": "production", "WSSERVER_API_KEYS": key,
                          "WSSERVER_TRUSTED_PROXIES": "127.0.0.1"})
    with documented_nginx(server, tmp_path / "b") as base:
        auth = {"Authorization": f"Bearer {key}"}
        assert requests.post(base + "/notify", json={"event": "e"}, headers=auth, verify=False,
                             timeout=5).status_code == 200
        assert requests.get(base + "/metrics", verify=False, timeout=5).status_code == 401
        # a client at 127.0.0.2 (not the trusted proxy) writes its own X-Forwarded-For: nginx
        # appends the address it saw, and that is the one believed
        conn = http.client.HTTPSConnection("127.0.0.1", int(base.rsplit(":", 1)[1]), timeout=5,
                                           source_address=("127.0.0.2", 0),
                                           context=ssl._create_unverified_context())
        try:
            conn.request("POST", "/notify", b'{"event":"e"}', {
                "Content-Type": "application/json", "X-Forwarded-For": "198.51.100.7"})
            assert conn.getresponse().status == 401
        finally:
            conn.close()
        wait_for(lambda: "refused 127.0.0.2: missing_api_key" in server.log(),
                 message="the audit line names the address nginx saw")
        assert "refused 198.51.100.7" not in server.log()


# -- the systemd unit -------------------------------------------------------------------------


def documented_unit() -> str:
    text = (ROOT / "docs" / "deploy.md").read_text()
    block = re.search(r"```ini\n(.*?)```", text, re.S)
    assert block, "docs/deploy.md has a systemd unit (an ini block)"
    return block.group(1)


def unit_entries(unit: str) -> list[tuple[str, str, str]]:
    """(section, key, value) as systemd reads a unit: ``#`` and ``;`` start a comment only at
    the start of a line; a value is everything after ``=``, a trailing ``# ...`` included."""
    section, entries = "", []
    for raw in unit.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not a key=value line: {raw!r}"
        entries.append((section, key.strip(), value.strip()))
    return entries


def test_systemd_analyze_verifies_the_documented_unit(tmp_path):
    if SYSTEMD_ANALYZE is None:
        pytest.skip("systemd-analyze is not installed (Debian: the systemd package)")
    unit = tmp_path / "wsserver.service"
    # ExecStart must name an executable that exists; the rest is verified as written
    unit.write_text(documented_unit().replace("/opt/wsserver/venv/bin/", f"{VENV_BIN}/"))
    result = subprocess.run([SYSTEMD_ANALYZE, "verify", str(unit)], capture_output=True,
                            text=True, timeout=60)
    complaints = [line for line in (result.stdout + result.stderr).splitlines()
                  if "wsserver.service" in line]
    assert result.returncode == 0 and not complaints, result.stdout + result.stderr


def test_the_documented_unit_runs_a_server(tmp_path):
    """What systemd would run: the unit's Environment= values, its EnvironmentFile (whose
    whole value is the path: no room for a comment), its ExecStart (from a test virtualenv),
    its LimitNOFILE; then GET /, the API keys from the secrets file in force, no keep-alive
    warning, and a clean exit within TimeoutStopSec after KillSignal."""
    entries = unit_entries(documented_unit())
    service = [(k, v) for s, k, v in entries if s == "Service"]
    env = {"PATH": f"{VENV_BIN}:/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    for key, value in service:
        if key == "Environment":
            env.update(item.split("=", 1) for item in shlex.split(value))
    files = [v.removeprefix("-") for k, v in service if k == "EnvironmentFile"]
    assert files, "the unit reads its secrets from an EnvironmentFile"
    key = "k" * 32
    for path in files:
        assert os.path.isabs(path) and not re.search(r"\s", path), (
            f"EnvironmentFile={path!r}: systemd takes the whole value as the path")
        local = tmp_path / Path(path).name
        local.write_text(f"WSSERVER_API_KEYS={key}\nWSSERVER_JWT_SECRET={'s' * 40}\n")
        env.update(line.split("=", 1) for line in local.read_text().splitlines())
    port = free_port()
    env["WSSERVER_PORT"] = str(port)
    settings = dict(service)
    command = shlex.split(settings["ExecStart"].replace("/opt/wsserver/venv/bin/", f"{VENV_BIN}/"))
    nofile = int(settings["LimitNOFILE"])
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    limit = nofile if hard == resource.RLIM_INFINITY else min(nofile, hard)
    log = tmp_path / "unit.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            command, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard)),
        )
    try:
        base = f"http://127.0.0.1:{port}"

        def up() -> bool:
            assert proc.poll() is None, log.read_text()
            try:
                return requests.get(base + "/", timeout=1).status_code == 200
            except requests.RequestException:
                return False

        wait_for(up, timeout=30, message="the unit's server")
        body = {"event": "deployed"}
        assert requests.post(base + "/notify", json=body, timeout=5).status_code == 401
        answer = requests.post(base + "/notify", json=body, timeout=5,
                               headers={"Authorization": f"Bearer {key}"})
        assert answer.status_code == 200, answer.text
    finally:
        proc.send_signal(getattr(signal, settings["KillSignal"]))
        code = proc.wait(int(settings["TimeoutStopSec"]))
    text = log.read_text()
    assert code == 0, text
    assert "turns HTTP keep-alive off" not in text and "Traceback" not in text, text
