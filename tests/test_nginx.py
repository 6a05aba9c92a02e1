"""The compose topology on loopback: Nginx (Debian's package) in front of two ``m2fp-serve`` processes.

Checks the seed's version-path routing through Nginx, failover when a backend is killed, and a rolling
restart (stop A, start A, wait ready, then B) under a steady stream of requests with zero failures.
The figures go to the test's temporary directory, or to ``$M2FP_NGINX_RESULTS`` (the recorded run is
``benchmarks/results/nginx_rolling_restart.json``). Nginx runs as this test's own
process (``daemon off``), with every path under the test's temporary directory.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from reference.bundles import clone_bundle
from server_fixtures import ServerProcess, free_port, http_json, png_bytes

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
FAST = {"short_edge": 160}
IMAGE = png_bytes(160, 120, seed=5)
SERVE_ARGS = ("--preload", "v1.0", "--preload", "v1.2", "--idle-ttl", "0", "--drain-timeout", "15")


def nginx_binary() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)
    if found is None:
        pytest.fail("nginx is not installed: apt-get install -y nginx (the Makefile's test set-up does this)")
    return found


def shared_block(text: str) -> str:
    m = re.search(r"# BEGIN shared.*?# END shared", text, re.S)
    assert m, "no BEGIN/END shared markers"
    return m.group(0)


class Nginx:
    def __init__(self, prefix: Path, backends: tuple[int, int]) -> None:
        self.prefix, self.port = prefix, free_port()
        prefix.mkdir(parents=True, exist_ok=True)
        conf = (DEPLOY / "nginx-test.conf.template").read_text()
        for key, value in {"USER": "user root;" if os.geteuid() == 0 else "", "PREFIX": str(prefix),
                           "PORT": str(self.port), "BACKEND_A": str(backends[0]),
                           "BACKEND_B": str(backends[1])}.items():
            conf = conf.replace(f"@@{key}@@", value)
        assert not re.search(r"@@[A-Z_]+@@", conf), conf
        self.conf = prefix / "nginx.conf"
        self.conf.write_text(conf)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Nginx:
        cmd = [nginx_binary(), "-p", str(self.prefix), "-c", str(self.conf), "-e", str(self.prefix / "error.log")]
        check = subprocess.run([*cmd, "-t"], capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stderr
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.prefix / "error.log").read_text()
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.1)
        raise AssertionError("nginx did not start listening")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: fast shutdown of this master and its workers
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def access_log(self) -> list[str]:
        path = self.prefix / "access.log"
        return path.read_text().splitlines() if path.exists() else []


@pytest.fixture(scope="module")
def topology(ms_multi, tmp_path_factory):
    """One bundle root (the shared volume) with v1.0 and v1.2, two servers on it, Nginx in front."""
    base = tmp_path_factory.mktemp("nginx_topology")
    root = base / "bundles"
    clone_bundle(ms_multi.bundle_dir, root, "v1.0", preprocess=FAST)
    clone_bundle(ms_multi.bundle_dir, root, "v1.2", preprocess=FAST)
    a = ServerProcess(root, base / "a.log", *SERVE_ARGS)
    b = ServerProcess(root, base / "b.log", *SERVE_ARGS)
    nginx = Nginx(base / "nginx", (a.port, b.port))
    try:
        a.start()
        b.start()
        nginx.start()
        yield a, b, nginx
    finally:
        nginx.stop()
        a.stop()
        b.stop()


def post(url: str, data: bytes = IMAGE, timeout: float = 60.0) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "image/png"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


# ------------------------------------------------------------------------------------- config
def test_the_tested_config_is_the_deployed_one():
    deployed = (DEPLOY / "nginx.conf").read_text()
    tested = (DEPLOY / "nginx-test.conf.template").read_text()
    assert shared_block(deployed) == shared_block(tested)
    for text in (deployed, tested):
        assert "proxy_next_upstream error timeout http_502 http_503" in text
        assert re.search(r"max_fails=\d+ fail_timeout=\d+s", text) and "keepalive 32;" in text
        assert r"location ~ ^/api/(v[0-9]+\.[0-9]+[^/]*)/" in text
        assert "location /api/latest/" in text and "location /api/auto/" in text
    # the body limit matches the server's default --max-body-mb
    from m2fpkit.server.config import ServerConfig

    limit = int(re.search(r"client_max_body_size (\d+)m;", deployed).group(1))
    assert limit * 2**20 == ServerConfig().max_body_bytes


# ------------------------------------------------------------------------------------ routing
def test_version_path_routing_through_nginx(topology):
    _, _, nginx = topology
    for path, version in (("/api/v1.0/parse", "v1.0"), ("/api/v1.2/parse", "v1.2"), ("/api/latest/parse", "v1.2")):
        status, headers, body = post(nginx.url + path + "?visualization=0")
        assert status == 200, body[:300]
        assert headers["X-Model-Version"] == version, path
        assert json.loads(body)["version"] == version
    status, headers, body = post(nginx.url + "/api/auto/parse?visualization=0")
    assert status == 200 and headers["X-Model-Version"] in ("v1.0", "v1.2")
    status, _, body = post(nginx.url + "/api/v2.0-beta/parse")  # the regex location, unknown to the servers
    assert status == 404 and json.loads(body)["error"] == "unknown_version"
    status, body = http_json(nginx.url + "/api/versions")
    assert status == 200 and {v["version"] for v in body["versions"]} == {"v1.0", "v1.2"}
    assert http_json(nginx.url + "/readyz")[0] == 200
    assert http_json(nginx.url + "/admin/routes")[0] == 403  # admin reaches one replica only: closed
    assert http_json(nginx.url + "/metrics")[0] == 403
    asked = [line for line in nginx.access_log() if "asked=v1.0" in line and "served=v1.0" in line]
    assert asked, nginx.access_log()[-5:]


def test_bodies_over_the_server_limit_are_refused_by_nginx(topology):
    _, _, nginx = topology
    status, _, _ = post(nginx.url + "/api/v1.0/parse", data=b"\0" * (21 * 2**20))
    assert status == 413


# ---------------------------------------------------------------------- failover and restarts
@dataclass
class Stream:
    """Clients sending parse requests through Nginx, back to back, until stopped."""

    url: str
    clients: int = 2
    results: list[tuple[float, str, int, float, str]] = field(default_factory=list)
    phase: str = "baseline"
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _run(self, i: int) -> None:
        paths = ("/api/v1.0/parse?visualization=0", "/api/latest/parse?visualization=0")
        n = 0
        while not self._stop.is_set():
            path = paths[(n + i) % 2]
            n += 1
            t0 = time.perf_counter()
            try:
                status, headers, _ = post(self.url + path, timeout=60)
                served = headers.get("X-Model-Version", "")
            except OSError as exc:  # connection-level failure: counted as a failed request
                status, served = 0, type(exc).__name__
            with self._lock:
                self.results.append((time.monotonic(), self.phase, status, time.perf_counter() - t0, served))

    def start(self) -> Stream:
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(self.clients)]
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(90)

    def count(self, phase: str) -> int:
        with self._lock:
            return sum(1 for r in self.results if r[1] == phase)

    def wait_for(self, phase: str, n: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.count(phase) < n:
            assert time.monotonic() < deadline, f"fewer than {n} requests in phase {phase}"
            time.sleep(0.05)


def summary(rows: list) -> dict:
    lat = sorted(r[3] * 1000 for r in rows)
    failed = [r for r in rows if r[2] != 200]

    def pct(p: float) -> float | None:
        return round(lat[min(len(lat) - 1, int(p * len(lat)))], 1) if lat else None

    return {"requests": len(rows), "failed": len(failed), "p50_ms": pct(0.50), "p99_ms": pct(0.99),
            "max_ms": round(lat[-1], 1) if lat else None,
            "failures": sorted({f"{r[2]} {r[4]}".strip() for r in failed})}


def test_failover_and_rolling_restart_lose_no_request(topology, tmp_path):
    a, b, nginx = topology
    log_start = len(nginx.access_log())
    stream = Stream(nginx.url).start()
    timeline = []

    def mark(phase: str) -> None:
        stream.phase = phase
        timeline.append((phase, round(time.monotonic(), 2)))

    def back_in_rotation(server: ServerProcess) -> None:
        """Ready is not enough: Nginx's passive check takes a failed backend back only after fail_timeout,
        so the next backend may stop only once Nginx has sent this one traffic again."""
        seen = len(nginx.access_log())
        deadline = time.monotonic() + 60
        while not any(re.search(rf"upstream=(?:\S+, )*127\.0\.0\.1:{server.port} ustatus=(?:\S+, )*200 ", line)
                      for line in nginx.access_log()[seen:]):
            assert time.monotonic() < deadline, f"Nginx sent no request to :{server.port} within 60 s"
            time.sleep(0.05)

    try:
        stream.wait_for("baseline", 20)
        # failover: backend A dies without warning; Nginx sends its requests to B
        mark("a_killed")
        a.proc.kill()
        a.stop()  # reaps it and closes its log
        stream.wait_for("a_killed", 20)
        mark("a_restarting")
        a.start()
        back_in_rotation(a)
        # rolling restart: A, then B, each stopped gracefully (SIGTERM: drain, exit), started again, and
        # back in Nginx's rotation before the next one stops
        mark("rolling_a_stopping")
        assert a.stop() == 0, a.log_tail()
        mark("rolling_a_starting")
        a.start()
        back_in_rotation(a)
        mark("rolling_b_stopping")
        assert b.stop() == 0, b.log_tail()
        mark("rolling_b_starting")
        b.start()
        back_in_rotation(b)
        mark("after")
        stream.wait_for("after", 20)
    finally:
        stream.stop()
    rows = list(stream.results)
    phases = [p for p, _ in timeline]
    by_phase = {p: summary([r for r in rows if r[1] == p]) for p in ["baseline", *phases]}
    rolling = [r for r in rows if r[1].startswith("rolling")]
    log = nginx.access_log()[log_start:]
    upstreams = [m.group(1) for line in log if (m := re.search(r"upstream=(\S+(?:, \S+)*) ustatus", line))]
    result = {
        "what": "Nginx (Debian package) in front of two m2fp-serve processes on loopback; 2 clients sending "
                "parse requests back to back through Nginx (alternating /api/v1.0/ and /api/latest/); "
                "backend A killed (SIGKILL) and restarted, then a rolling restart: A then B stopped "
                "gracefully (SIGTERM) and started again, each back in Nginx's rotation (ready, then a request "
                "answered through Nginx) before the next step",
        "nginx": subprocess.run([nginx_binary(), "-v"], capture_output=True, text=True).stderr.strip(),
        "upstream": "max_fails=1 fail_timeout=3s, keepalive 32; proxy_next_upstream error timeout http_502 "
                    "http_503 non_idempotent",
        "total": summary(rows),
        "failover_a_killed": by_phase["a_killed"],
        "rolling_restart": summary(rolling),
        "phases": by_phase,
        "retried_on_the_other_backend": sum(1 for u in upstreams if "," in u),
        "answered_by": {f"backend_{name}": sum(1 for u in upstreams if u.split(", ")[-1].endswith(f":{port}"))
                        for name, port in (("a", a.port), ("b", b.port))},
        "served_versions": sorted({r[4] for r in rows if r[2] == 200}),
        "cpu_cores": os.cpu_count(),
        "note": "2 shared cores, other jobs running: latencies are indicative only",
    }
    out = Path(os.environ.get("M2FP_NGINX_RESULTS") or tmp_path / "nginx_rolling_restart.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    assert result["failover_a_killed"]["requests"] >= 20
    assert result["rolling_restart"]["requests"] > 0
    assert result["total"]["failed"] == 0, json.dumps(result, indent=2)
    assert result["served_versions"] == ["v1.0", "v1.2"]
    assert result["answered_by"]["backend_a"] > 0 and result["answered_by"]["backend_b"] > 0
