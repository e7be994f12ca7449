"""Throw-away TLS material for tests: a self-signed certificate for ``localhost`` and
``127.0.0.1`` (made with ``cryptography``, valid for a day), SSL contexts that trust it, and a
connected pair of SSL sockets (``socket.socketpair`` with a real TLS handshake).

Nothing is mocked: every TLS test handshakes for real against this certificate.
"""

from __future__ import annotations

import datetime
import functools
import ipaddress
import socket
import ssl
import tempfile
import threading
from pathlib import Path

__all__ = ["client_context", "self_signed", "server_context", "ssl_socketpair", "test_cert"]


def self_signed(directory: Path | str, name: str = "localhost") -> tuple[Path, Path]:
    """Write ``cert.pem`` and ``key.pem`` (unencrypted) into ``directory``; their paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    names = [x509.DNSName(name), x509.DNSName("localhost"),
             x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .sign(key, hashes.SHA256()))
    directory = Path(directory)
    crt, pem = directory / "cert.pem", directory / "key.pem"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    return crt, pem


@functools.lru_cache(maxsize=1)
def test_cert() -> tuple[Path, Path]:
    """One certificate and key for the whole test run (in a temporary directory)."""
    return self_signed(tempfile.mkdtemp(prefix="wsserver-tls-"))


test_cert.__test__ = False  # type: ignore[attr-defined]  # not a test, despite its name


def server_context() -> ssl.SSLContext:
    crt, key = test_cert()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(crt, key)
    return context


def client_context() -> ssl.SSLContext:
    """Verifies the server against the test certificate (hostname included)."""
    return ssl.create_default_context(cafile=str(test_cert()[0]))


def ssl_socketpair(sndbuf: int | None = None,
                   rcvbuf: int | None = None) -> tuple[ssl.SSLSocket, ssl.SSLSocket]:
    """(server end, client end) of a socketpair, both wrapped in TLS and handshaken; the
    kernel buffers are set before the handshake when given."""
    a, b = socket.socketpair()
    if sndbuf:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    if rcvbuf:
        b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    a.settimeout(10)
    b.settimeout(10)
    client: list[ssl.SSLSocket] = []
    # both contexts before the thread: the certificate is made once, on first use
    server_side, client_side = server_context(), client_context()
    thread = threading.Thread(
        target=lambda: client.append(client_side.wrap_socket(b, server_hostname="localhost"))
    )
    thread.start()
    server = server_side.wrap_socket(a, server_side=True)
    thread.join(10)
    assert client, "the TLS handshake did not complete"
    return server, client[0]
