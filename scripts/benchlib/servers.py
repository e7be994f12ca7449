"""Start/stop the servers under test under gunicorn and read their numbers from /proc.

Every process is started by us and stopped by PID: SIGTERM to the gunicorn master, wait,
then SIGKILL to the master and to every worker PID we saw (only if that PID still is a
gunicorn process whose parent is our master, or was one of our workers).
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


def free_port(host: str = "127.0.0.1") -> int:
    s = socket.socket()
    s.bind((host, 0))
    port = s.getsockname()[1]
    s.close()
    return port


def machine_cpu():
    """Jiffies from the first line of /proc/stat: (busy, idle+iowait, steal, total)."""
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    vals += [0] * (8 - len(vals))
    user, nice, system, idle, iowait, irq, softirq, steal = vals[:8]
    busy = user + nice + system + irq + softirq
    return busy, idle + iowait, steal, busy + idle + iowait + steal


def machine_cpu_delta(a, b):
    """{busy_pct, steal_pct} of all CPUs between two machine_cpu() samples (100 = all CPUs)."""
    total = b[3] - a[3]
    if total <= 0:
        return {"busy_pct": None, "steal_pct": None}
    return {"busy_pct": round((b[0] - a[0]) * 100.0 / total, 1),
            "steal_pct": round((b[2] - a[2]) * 100.0 / total, 1)}


def proc_stat(pid: int):
    """(ppid, utime+stime seconds, num_threads, starttime) from /proc/<pid>/stat, or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    fields = raw[raw.rindex(b")") + 2:].split()
    # fields[0] is state (field 3 in proc(5)); utime=14, stime=15, num_threads=20
    if fields[0] in (b"Z", b"X"):  # zombie/dead: no longer a running process
        return None
    return (int(fields[1]), (int(fields[11]) + int(fields[12])) / CLK_TCK, int(fields[17]),
            int(fields[19]))


def proc_status_kb(pid: int, key: str):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def proc_children(pid: int) -> list[int]:
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    out.extend(int(x) for x in f.read().split())
            except OSError:
                pass
    except OSError:
        pass
    return sorted(set(out))


def http_get_json(host, port, path="/", timeout=2.0, errors=None, ssl_context=None):
    """GET and parse JSON; None on any failure (then ``errors`` gets a reason appended).
    With ``ssl_context``: over https."""
    if ssl_context is not None:
        conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=ssl_context)
    else:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            if errors is not None:
                errors.append(f"http {resp.status}")
            return None
        return json.loads(body)
    except (OSError, http.client.HTTPException, ValueError) as exc:
        if errors is not None:
            errors.append(type(exc).__name__)
        return None
    finally:
        conn.close()


class ServerProc:
    """One gunicorn master (+ worker(s)) running either wsserver or the naive app."""

    def __init__(self, kind, repo, venv_bin, threads, log_path, host="127.0.0.1",
                 extra_env=None, log=print, nworkers=1, drop_env=(), ssl_context=None):
        self.kind = kind
        # wsserver serving TLS itself (WSSERVER_TLS_CERT/KEY in extra_env): GET / over https
        self.ssl_context = ssl_context
        # wsserver with nworkers > 1 (`-w N`, needs WSSERVER_REDIS_URL): clients() is then
        # the cluster's count (``cluster.clients`` of GET /, the sum of every worker's report)
        self.nworkers = nworkers
        self.drop_env = tuple(drop_env)
        self.repo = repo
        self.venv_bin = venv_bin
        self.threads = threads
        self.host = host
        self.port = free_port(host)
        self.log_path = log_path
        self.extra_env = dict(extra_env or {})
        self.log = log
        self.proc = None
        self.logf = None
        self.seen_workers: dict[int, int] = {}  # pid -> starttime (guards against PID reuse)
        self.stop_s = None
        self.last_health_error = None

    def command(self):
        gunicorn = os.path.join(self.venv_bin, "gunicorn")
        if self.kind == "wsserver":
            extra = ["-w", str(self.nworkers)] if self.nworkers != 1 else []
            return [gunicorn, "-c", "python:wsserver.gunicorn_conf", "--no-control-socket",
                    *extra, "wsserver:create_app()"]
        return [gunicorn, "-k", "gthread", "-w", "1", "--threads", str(self.threads),
                "--worker-connections", str(self.threads + 1000), "--no-control-socket",
                "--timeout", "120", "--graceful-timeout", "5", "--backlog", "4096",
                "--log-level", "warning",
                "-b", f"{self.host}:{self.port}", "--chdir", os.path.join(self.repo, "scripts"),
                "bench_naive_app:app"]

    def start(self, timeout=30.0):
        env = dict(os.environ)
        env.update({
            "WSSERVER_HOST": self.host,
            "WSSERVER_PORT": str(self.port),
            "WSSERVER_THREADS": str(self.threads),
            "PYTHONUNBUFFERED": "1",
        })
        env.update(self.extra_env)
        for k in self.drop_env:
            env.pop(k, None)
        self.logf = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.command(), cwd=self.repo, env=env,
                                     stdin=subprocess.DEVNULL, stdout=self.logf,
                                     stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} exited with {self.proc.returncode} during "
                                   f"start; see {self.log_path}")
            h = self.health(timeout=1.0)
            if h is not None and len(self.workers()) >= self.nworkers:
                return h
            time.sleep(0.1)
        raise RuntimeError(f"{self.kind} did not answer GET / within {timeout}s; "
                           f"see {self.log_path}")

    def health(self, timeout=2.0):
        errors = []
        h = http_get_json(self.host, self.port, "/", timeout=timeout, errors=errors,
                          ssl_context=self.ssl_context)
        self.last_health_error = errors[0] if errors else None
        return h

    def clients(self):
        h = self.health()
        if h is None:
            return None
        if self.nworkers > 1:
            # one worker's GET / counts its own clients; the cluster sum comes from the
            # workers' reports in Redis, refreshed every 2 s
            return (h.get("cluster") or {}).get("clients")
        return h.get("clients")

    def per_worker(self, timeout=10.0):
        """GET / (a new connection each time, so any worker may answer) until every worker
        has answered once. Returns {pid: its GET / body}; bounded by ``timeout``."""
        seen = {}
        t_end = time.time() + timeout
        want = set(self.workers())
        while time.time() < t_end:
            h = self.health(timeout=1.0)
            if h is not None and isinstance(h.get("pid"), int):
                seen[h["pid"]] = h
            if want and want <= set(seen):
                break
            time.sleep(0.01)
        return seen

    def workers(self) -> list[int]:
        if self.proc is None:
            return []
        kids = proc_children(self.proc.pid)
        for pid in kids:
            if pid not in self.seen_workers:
                st = proc_stat(pid)
                if st:
                    self.seen_workers[pid] = st[3]
        return kids

    def worker(self):
        """The (first) worker's PID."""
        w = self.workers()
        return w[0] if w else None

    def cpu_s(self) -> float:
        total = 0.0
        for pid in self.workers():
            st = proc_stat(pid)
            if st:
                total += st[1]
        return total

    def cpu_by_worker(self) -> dict[int, float]:
        out = {}
        for pid in self.workers():
            st = proc_stat(pid)
            if st:
                out[pid] = st[1]
        return out

    def hwm_by_worker(self) -> dict[int, int]:
        return {p: proc_status_kb(p, "VmHWM") or 0 for p in self.workers()}

    def rss_kb(self) -> int:
        return sum(proc_status_kb(p, "VmRSS") or 0 for p in self.workers())

    def hwm_kb(self) -> int:
        return sum(proc_status_kb(p, "VmHWM") or 0 for p in self.workers())

    def threads_count(self) -> int:
        total = 0
        for pid in self.workers():
            try:
                total += len(os.listdir(f"/proc/{pid}/task"))
            except OSError:
                pass
        return total

    def wait_clients(self, n, timeout, exact=True):
        """Poll GET / until clients == n (>= n if not exact). Returns (count, seconds)."""
        t0 = time.time()
        count = None
        while time.time() - t0 < timeout:
            count = self.clients()
            if count is not None and (count == n or (not exact and count >= n)):
                break
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} died; see {self.log_path}")
            time.sleep(0.05)
        return count, time.time() - t0

    def stop(self, timeout=15.0):
        if self.proc is None:
            return
        t0 = time.time()
        self.workers()
        try:
            if self.proc.poll() is None:
                if self.kind == "wsserver":
                    # its real shutdown path (1001 to clients, flush), timed: server_stop_s
                    self.proc.send_signal(signal.SIGTERM)
                else:
                    # the baseline's shutdown is not under test: its worker would wait out
                    # --graceful-timeout on WebSocket threads (and exit joins pool threads)
                    self.proc.send_signal(signal.SIGINT)
                    for pid in list(self.seen_workers):
                        if self._still_worker(pid):
                            try:
                                os.kill(pid, signal.SIGKILL)
                            except OSError:
                                pass
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.log(f"[bench] {self.kind} master {self.proc.pid} ignored SIGTERM for "
                             f"{timeout}s: SIGKILL")
                    self.proc.kill()
                    self.proc.wait(5)
        finally:
            for pid in sorted(self.seen_workers):
                t_wait = time.time() + 2.0  # the master just reaped or killed it, usually
                while self._still_worker(pid) and time.time() < t_wait:
                    time.sleep(0.05)
                if self._still_worker(pid):
                    self.log(f"[bench] killing leftover {self.kind} worker {pid}")
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass
            self.stop_s = time.time() - t0
            if self.logf:
                self.logf.close()
                self.logf = None

    def _still_worker(self, pid) -> bool:
        st = proc_stat(pid)
        return st is not None and st[3] == self.seen_workers.get(pid)

    def log_problems(self, max_lines=20):
        """Lines of the server log that look like errors (tracebacks, ERROR, CRITICAL)."""
        out = []
        try:
            with open(self.log_path, "r", errors="replace") as f:
                for line in f:
                    low = line.lower()
                    if self.kind == "naive" and "was sent sigkill" in low:
                        continue  # our own quick stop of the baseline
                    if ("traceback" in low or "[error]" in low or "[critical]" in low
                            or "exception" in low or " error " in low):
                        out.append(line.rstrip()[:300])
        except OSError:
            pass
        return len(out), out[:max_lines]
