"""TLS for the bench's ``--tls`` rows: a throw-away self-signed certificate for 127.0.0.1 (made
with ``cryptography``, in a temporary directory removed after the run) and the client side's
SSL context (no verification: loopback only, the certificate is our own).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import ssl
import tempfile

__all__ = ["TempCert", "client_context"]


def client_context() -> ssl.SSLContext:
    """The receivers' and the poster's context: TLS 1.2+, no certificate or hostname check
    (the server is ours, on 127.0.0.1)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class TempCert:
    """``cert.pem`` and ``key.pem`` (EC P-256, valid a day) in a new temporary directory;
    ``remove()`` deletes the directory. Made once per bench run, shared by its TLS servers."""

    def __init__(self):
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self.dir = tempfile.mkdtemp(prefix="wsbench-tls-")
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
        now = datetime.datetime.now(datetime.timezone.utc)
        san = x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(san, critical=False)
                .sign(key, hashes.SHA256()))
        self.cert = os.path.join(self.dir, "cert.pem")
        self.key = os.path.join(self.dir, "key.pem")
        with open(self.cert, "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
        with open(self.key, "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))

    def env(self) -> dict:
        """The wsserver settings that make gunicorn serve https/wss with this certificate."""
        return {"WSSERVER_TLS_CERT": self.cert, "WSSERVER_TLS_KEY": self.key}

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
