"""Private redis-server processes for the soak: one plain Redis, or a Sentinel group (a master,
one replica and three sentinels), each on a free 127.0.0.1 port in its own temp dir, with no
persistence, started and stopped by PID (never the shared 6379).

The Sentinel group follows tests/e2e/test_sentinel.py (quorum 2, ``down-after-milliseconds``
500, ``failover-timeout`` 2000; the sentinels' ids, each other and the replica written into
their configs so that no 2 s discovery rounds come before a failover), on the standard
library client of ``redisutil`` instead of redis-py, so the harness needs nothing installed.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid

from .redisutil import MiniRedis, RedisError
from .servers import free_port

__all__ = ["RedisProc", "SentinelGroup"]

HOST = "127.0.0.1"


def _wait(cond, timeout: float, what: str, step: float = 0.05) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(step)
    if not cond():
        raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")


def _ask(port: int, *cmd, timeout: float = 1.0):
    """One command to 127.0.0.1:port on a new connection; None when it does not answer."""
    try:
        with MiniRedis(f"redis://{HOST}:{port}/0", timeout=timeout) as r:
            return r.command(*cmd)
    except (OSError, RedisError):
        return None


class RedisProc:
    """One redis-server of ours (``extra`` arguments appended); killed, stopped with SIGSTOP,
    restarted by PID. ``sentinel=True`` runs ``redis-server <conf> --sentinel`` instead."""

    def __init__(self, binary: str = "redis-server", port: int | None = None,
                 dir: str | None = None, name: str = "redis", extra=(),
                 sentinel_conf: str | None = None):
        self.binary = shutil.which(binary) or binary
        self.port = port or free_port(HOST)
        self.own_dir = dir is None
        self.dir = dir or tempfile.mkdtemp(prefix="wsserver-soak-redis-")
        self.name, self.extra, self.sentinel_conf = name, list(extra), sentinel_conf
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def argv(self) -> list[str]:
        if self.sentinel_conf:
            return [self.binary, self.sentinel_conf, "--sentinel"]
        return [self.binary, "--port", str(self.port), "--bind", HOST, "--save", "",
                "--appendonly", "no", "--dir", self.dir, "--daemonize", "no",
                "--loglevel", "warning", *self.extra]

    def start(self, timeout: float = 10.0) -> RedisProc:
        with open(os.path.join(self.dir, f"{self.name}.log"), "ab") as log:
            self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT)
        _wait(lambda: _ask(self.port, "PING") == "PONG", timeout,
              f"{self.name} (redis-server on port {self.port}) to answer")
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig) -> None:
        if self.alive():
            os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL: no shutdown, no last replication."""
        self.signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None:
            self.signal(signal.SIGCONT)  # in case a fault left it stopped
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)


class SentinelGroup:
    """A master, one replica and three sentinels (quorum 2). ``nodes`` are the two data
    nodes by port; which of them is master is the sentinels' answer (``master_port``)."""

    def __init__(self, binary: str = "redis-server", master_name: str = "soakmaster",
                 down_after_ms: int = 500, failover_timeout_ms: int = 2000):
        self.binary, self.master_name = binary, master_name
        self.down_after_ms, self.failover_timeout_ms = down_after_ms, failover_timeout_ms
        self.dir = tempfile.mkdtemp(prefix="wsserver-soak-sentinel-")
        first, second = free_port(HOST), free_port(HOST)
        self.nodes = {first: RedisProc(binary, first, self.dir, "node0",
                                       ["--repl-diskless-sync-delay", "0"]),
                      second: RedisProc(binary, second, self.dir, "node1",
                                        ["--repl-diskless-sync-delay", "0",
                                         "--replicaof", HOST, str(first)])}
        self.first_master = first
        self.sentinels: list[RedisProc] = []

    @property
    def addresses(self) -> str:
        """WSSERVER_REDIS_SENTINELS."""
        return ",".join(f"{HOST}:{s.port}" for s in self.sentinels)

    def start(self) -> SentinelGroup:
        for node in self.nodes.values():
            node.start()
        replica = next(p for p in self.nodes if p != self.first_master)
        _wait(lambda: self.role(replica, "master_link_status") == "up", 10,
              "the replica's link to the master")
        ports = [free_port(HOST) for _ in range(3)]
        ids = [uuid.uuid4().hex + uuid.uuid4().hex[:8] for _ in ports]
        for i, port in enumerate(ports):
            conf = os.path.join(self.dir, f"sentinel{i}.conf")
            with open(conf, "w") as f:
                f.write(self._sentinel_conf(port, ids[i], replica,
                                            [(p, ids[j]) for j, p in enumerate(ports) if j != i]))
            self.sentinels.append(RedisProc(self.binary, port, self.dir, f"sentinel{i}",
                                            sentinel_conf=conf).start())
        for s in self.sentinels:
            _wait(lambda s=s: self._knows_all(s.port), 15,
                  f"sentinel {s.port} to see the replica and 2 other sentinels")
        return self

    def _sentinel_conf(self, port, myid, replica, others) -> str:
        name = self.master_name
        return (f"port {port}\nbind {HOST}\nprotected-mode no\ndir {self.dir}\n"
                f"sentinel myid {myid}\n"
                f"sentinel monitor {name} {HOST} {self.first_master} 2\n"
                f"sentinel down-after-milliseconds {name} {self.down_after_ms}\n"
                f"sentinel failover-timeout {name} {self.failover_timeout_ms}\n"
                f"sentinel parallel-syncs {name} 1\n"
                f"sentinel known-replica {name} {HOST} {replica}\n"
                + "".join(f"sentinel known-sentinel {name} {HOST} {p} {sid}\n"
                          for p, sid in others))

    def _knows_all(self, port: int) -> bool:
        raw = _ask(port, "SENTINEL", "MASTER", self.master_name)
        if not isinstance(raw, list):
            return False
        state = {raw[i].decode(): raw[i + 1].decode() for i in range(0, len(raw) - 1, 2)}
        return state.get("num-slaves") == "1" and state.get("num-other-sentinels") == "2"

    @staticmethod
    def role(port: int, field: str = "role") -> str | None:
        """One field of the node's ``INFO replication`` (None when it does not answer)."""
        raw = _ask(port, "INFO", "replication")
        if not isinstance(raw, bytes):
            return None
        for line in raw.decode(errors="replace").splitlines():
            if line.startswith(field + ":"):
                return line.split(":", 1)[1].strip()
        return None

    def master_port(self) -> int | None:
        """The master's port as the first sentinel that answers names it."""
        for s in self.sentinels:
            raw = _ask(s.port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name)
            if isinstance(raw, list) and len(raw) == 2:
                return int(raw[1])
        return None

    def master(self) -> RedisProc:
        port = self.master_port()
        if port not in self.nodes:
            raise RuntimeError(f"no sentinel names a master of ours (answer: {port})")
        return self.nodes[port]

    def wait_promoted(self, old_port: int, timeout: float = 30.0) -> int:
        """Wait until every sentinel names another node as master and that node says it is
        one; returns its port."""
        def promoted():
            answers = {self._ask_master(s.port) for s in self.sentinels}
            if len(answers) != 1:
                return False
            (port,) = answers
            return port not in (None, old_port) and self.role(port) == "master"
        _wait(promoted, timeout, f"the sentinels to promote a replica of :{old_port}", 0.02)
        return self.master_port()  # type: ignore[return-value]

    def _ask_master(self, port: int) -> int | None:
        raw = _ask(port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name)
        return int(raw[1]) if isinstance(raw, list) and len(raw) == 2 else None

    def rejoin(self, port: int, master_port: int) -> None:
        """Restart the (killed) node on ``port`` as a replica of ``master_port``: the group is
        a master and a replica again, ready for the next failover."""
        node = self.nodes[port]
        node.extra = ["--repl-diskless-sync-delay", "0", "--replicaof", HOST, str(master_port)]
        node.start()

    def restart_plain(self, port: int) -> None:
        """Restart the (killed) node on ``port`` as a process supervisor would: empty, with
        no ``replicaof`` (the sentinels turn it into a replica if they promoted the other)."""
        node = self.nodes[port]
        node.extra = ["--repl-diskless-sync-delay", "0"]
        node.start()

    def stop(self) -> None:
        for proc in [*self.sentinels, *self.nodes.values()]:
            try:
                proc.stop()
            except Exception:  # stop the others anyway
                pass
        shutil.rmtree(self.dir, ignore_errors=True)
