"""A minimal Redis client (RESP2 over one socket, standard library only) for the bench's
Redis scenarios: check that Redis answers, read its CPU counters (``INFO cpu``), and delete
the keys of one run's ``WSSERVER_REDIS_PREFIX`` afterwards. Loopback only: the URL must
point at 127.0.0.1/localhost.
"""

from __future__ import annotations

import socket
from urllib.parse import urlsplit


class RedisError(Exception):
    pass


def parse_url(url: str):
    """(host, port, db, password) of a ``redis://`` URL."""
    u = urlsplit(url)
    if u.scheme != "redis":
        raise ValueError(f"only redis:// URLs are supported, not {url!r}")
    host = u.hostname or "127.0.0.1"
    if host not in ("127.0.0.1", "localhost"):
        raise ValueError(f"the bench talks to 127.0.0.1 only, not {host!r}")
    db = int(u.path.strip("/") or 0)
    return "127.0.0.1", u.port or 6379, db, u.password


class MiniRedis:
    def __init__(self, url: str, timeout: float = 5.0):
        host, port, db, password = parse_url(url)
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buf = bytearray()
        if password:
            self.command("AUTH", password)
        if db:
            self.command("SELECT", db)

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def command(self, *args):
        out = bytearray(b"*%d\r\n" % len(args))
        for a in args:
            b = a if isinstance(a, bytes) else str(a).encode()
            out += b"$%d\r\n%s\r\n" % (len(b), b)
        self.sock.sendall(out)
        return self._reply()

    def _line(self) -> bytes:
        while True:
            i = self.buf.find(b"\r\n")
            if i >= 0:
                line = bytes(self.buf[:i])
                del self.buf[:i + 2]
                return line
            self._fill()

    def _fill(self):
        chunk = self.sock.recv(65536)
        if not chunk:
            raise RedisError("connection closed by Redis")
        self.buf += chunk

    def _reply(self):
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RedisError(rest.decode(errors="replace"))
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            while len(self.buf) < n + 2:
                self._fill()
            data = bytes(self.buf[:n])
            del self.buf[:n + 2]
            return data
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self._reply() for _ in range(n)]
        raise RedisError(f"unexpected reply {line[:50]!r}")

    # -- helpers used by the bench ---------------------------------------------------------

    def info(self, section: str) -> dict:
        raw = self.command("INFO", section).decode(errors="replace")
        out = {}
        for line in raw.splitlines():
            if ":" in line and not line.startswith("#"):
                k, _, v = line.partition(":")
                out[k] = v
        return out

    def cpu_s(self) -> float:
        """redis-server's own user+sys CPU seconds (every client's work, not only ours)."""
        i = self.info("cpu")
        return float(i.get("used_cpu_user", 0)) + float(i.get("used_cpu_sys", 0))

    def keys(self, prefix: str) -> list[bytes]:
        """Every key under ``prefix:`` (SCAN, bounded to 1000 rounds)."""
        if any(ch in prefix for ch in "*?[]\\"):
            raise ValueError(f"prefix {prefix!r} has glob characters")
        cursor, found = b"0", []
        for _ in range(1000):
            cursor, batch = self.command("SCAN", cursor, "MATCH", prefix + ":*", "COUNT", 1000)
            found.extend(batch)
            if cursor == b"0":
                break
        return sorted(set(found))

    def delete_prefix(self, prefix: str) -> tuple[int, int]:
        """Delete every key under ``prefix:``. Returns (deleted, still there afterwards)."""
        keys = self.keys(prefix)
        deleted = 0
        for i in range(0, len(keys), 500):
            deleted += self.command("DEL", *keys[i:i + 500])
        return deleted, len(self.keys(prefix))
