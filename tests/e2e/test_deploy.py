"""docs/deploy.md's nginx config is real: `nginx -t` accepts it, and a real nginx built from it
proxies WebSockets and HTTP to a real wsserver (over TLS, with a throw-away certificate)."""

from __future__ import annotations

import contextlib
import datetime
import http.client
import json
import re
import shutil
import signal
import ssl
import subprocess

import pytest
import requests
import websocket
from support import ROOT, free_port, wait_for

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
pytestmark = pytest.mark.skipif(not shutil.which("nginx") and not __import__("os").path.exists(NGINX),
                                reason="nginx is not installed (.ci/run installs nginx-light)")


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
