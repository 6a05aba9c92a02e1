"""Monitoring as shipped in ``deploy/``: the alert rules, the scrape configurations and the Grafana dashboard.

* ``deploy/prometheus/alerts.yml`` passes ``promtool check rules`` and the unit tests in
  ``deploy/prometheus/tests/`` (``promtool test rules``), and every alert has a case where it fires and
  one where it must not;
* both scrape configurations pass ``promtool check config``;
* a real Prometheus (Debian's package, the Makefile installs it) configured from
  ``deploy/prometheus/prometheus.yml`` scrapes a real ``m2fp-serve`` on loopback every second while
  the test drives parses, bad input, 503 refusals, a shadow candidate, a hot swap and a version that
  fails verification; then every PromQL expression of the dashboard (and every variable query) returns
  data through Prometheus' HTTP API, every metric the alerts use is really exported, and the alert for
  the failed version is active while the others stay quiet.

Prometheus runs as this test's own process, with its configuration and storage under ``tmp_path``.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from m2fpkit.runtime.bundle.store import BundleStore
from m2fpkit.runtime.bundle.writer import seal

pytest.register_assert_rewrite("server_fixtures")
pytest_plugins = ["server_fixtures"]
from server_fixtures import ServerProcess, copy_root, free_port, http_json, png_bytes  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
PROMETHEUS_DIR = DEPLOY / "prometheus"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "m2fp.json"


def tool(name: str) -> str:
    found = shutil.which(name) or (f"/usr/bin/{name}" if os.access(f"/usr/bin/{name}", os.X_OK) else None)
    if found is None:
        pytest.fail(f"{name} is not installed: apt-get install -y prometheus (make /usr/bin/promtool does this)")
    return found


def promtool(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([tool("promtool"), *map(str, args)], capture_output=True, text=True, timeout=120)


# ------------------------------------------------------------------------------------ rules
def test_alert_rules_are_valid_and_pass_their_unit_tests():
    check = promtool("check", "rules", ALERTS)
    assert check.returncode == 0, check.stdout + check.stderr
    tests = sorted((PROMETHEUS_DIR / "tests").glob("*.yml"))
    assert tests, "no rule unit tests in deploy/prometheus/tests/"
    run = promtool("test", "rules", *tests)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "SUCCESS" in run.stdout + run.stderr


def alert_names() -> list[str]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule["alert"] for group in groups for rule in group["rules"] if "alert" in rule]


def test_every_alert_has_a_case_that_fires_and_a_case_that_does_not():
    fires: set[str] = set()
    quiet: set[str] = set()
    for path in (PROMETHEUS_DIR / "tests").glob("*.yml"):
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = alert_names()
    assert {"M2FPVersionFailed", "M2FPErrorRatioHigh", "M2FPLatencyP99OverBudget", "M2FPQueueSaturated",
            "M2FPRefusing503", "M2FPShadowAgreementLow", "M2FPNoReadyVersion"} <= set(names), names
    assert [n for n in names if n not in fires] == [], "alerts never shown firing"
    assert [n for n in names if n not in quiet] == [], "alerts never shown quiet"


def test_scrape_configurations_are_valid():
    for config in ("prometheus.yml", "kubernetes.yml"):
        check = promtool("check", "config", PROMETHEUS_DIR / config)
        assert check.returncode == 0, f"{config}:\n{check.stdout}{check.stderr}"


def test_compose_mounts_what_the_monitoring_files_expect():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    prom_mounts = {v.split(":")[0]: v.split(":")[1] for v in compose["prometheus"]["volumes"]}
    assert prom_mounts["./prometheus/prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    assert prom_mounts["./prometheus/alerts.yml"] == "/etc/prometheus/alerts.yml"  # rule_files: [alerts.yml]
    grafana_mounts = {v.split(":")[0]: v.split(":")[1] for v in compose["grafana"]["volumes"]}
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/m2fp.yml").read_text())["providers"][0]
    assert grafana_mounts["./grafana/dashboards"] == provider["options"]["path"]
    assert grafana_mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    source = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert source["datasources"][0]["url"] == "http://prometheus:9090"
    k8s = yaml.safe_load((DEPLOY / "k8s/kustomization.yaml").read_text())["resources"]
    assert "service-metrics.yaml" in k8s


# -------------------------------------------------------------------------------- dashboard
def walk_targets(node: object) -> Iterator[dict]:
    if isinstance(node, dict):
        if "expr" in node:
            yield node
        for value in node.values():
            yield from walk_targets(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk_targets(value)


def dashboard_expressions() -> list[str]:
    return [t["expr"] for t in walk_targets(json.loads(DASHBOARD.read_text())["panels"])]


def dashboard_variable_queries() -> dict[str, str]:
    variables = json.loads(DASHBOARD.read_text())["templating"]["list"]
    return {v["name"]: v["query"]["query"] for v in variables if v["type"] == "query"}


def substitute(expr: str, values: dict[str, str]) -> str:
    """The PromQL Grafana sends for ``expr`` with the given variable values (``$name`` / ``${name}``)."""
    out = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values[m.group(1) or m.group(2)], expr)
    assert "$" not in out, out
    return out


def test_the_dashboard_covers_what_the_issue_asks_for():
    exprs = "\n".join(dashboard_expressions())
    for metric in ("m2fp_requests_total", "m2fp_request_seconds_bucket", "m2fp_queue_depth", "m2fp_in_flight",
                   "m2fp_version_loaded", "m2fp_version_failed", "process_resident_memory_bytes",
                   "m2fp_weight_bytes", "m2fp_version_events", "m2fp_version_load_seconds",
                   "m2fp_shadow_label_agreement_bucket", "m2fp_version_plan_info", "m2fp_version_plan_agreement"):
        assert metric in exprs, metric
    for q in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({q}, sum by (version, le) (rate(m2fp_request_seconds_bucket" in exprs
    panels = [p for p in json.loads(DASHBOARD.read_text())["panels"] if p["type"] != "row"]
    assert all(p["datasource"]["uid"] == "${datasource}" for p in panels)
    assert len({p["id"] for p in panels}) == len(panels)


# ------------------------------------------------------------------------------ integration
class Prometheus:
    """Debian's ``prometheus`` on 127.0.0.1 with the given configuration; storage under ``home``."""

    def __init__(self, home: Path, config: dict) -> None:
        self.home, self.port = home, free_port()
        home.mkdir(parents=True, exist_ok=True)
        self.config = home / "prometheus.yml"
        self.config.write_text(yaml.safe_dump(config, sort_keys=False))
        self.log_path = home / "prometheus.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Prometheus:
        check = promtool("check", "config", self.config)
        assert check.returncode == 0, check.stdout + check.stderr
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [tool("prometheus"), f"--config.file={self.config}", f"--storage.tsdb.path={self.home / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log_path.read_text(errors="replace")[-3000:]
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError("prometheus not ready within 60 s:\n" + self.log_path.read_text(errors="replace"))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def api(self, path: str, **params: str | list[str]) -> dict:
        status, body = http_json(f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params, doseq=True)}",
                                 timeout=10)
        assert status == 200 and body.get("status") == "success", (path, params, status, body)
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", (expr, data)
        return data["result"]


def scrape_config_for(server_ports: list[int], rule_file: Path) -> dict:
    """The shipped compose configuration with the targets on loopback, scraped and evaluated every second."""
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(rule_file)]
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "m2fp"]
    job.pop("dns_sd_configs")
    job["static_configs"] = [{"targets": [f"127.0.0.1:{port}" for port in server_ports]}]
    return config



def post(url: str, data: bytes, content_type: str = "image/png") -> int:
    request = urllib.request.Request(url, data=data, headers={"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as exc:
        exc.read()
        return exc.code


def scraped(text: str, name: str, **labels: str) -> float | None:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


def server_metrics(server: ServerProcess) -> str:
    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as r:
        return r.read().decode()


def poll(predicate, timeout: float, step: float = 0.5):
    """``predicate()``'s first truthy value within ``timeout`` seconds, else None (checked at least once)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value or None
        time.sleep(step)


def wait_until(predicate, timeout: float, what: str, step: float = 0.5):
    value = poll(predicate, timeout, step)
    if not value:
        raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
    return value


def scraped_after(prometheus: Prometheus, t: float, scrapes: int = 2) -> bool:
    """Prometheus scraped every m2fp target at least ``scrapes`` more times (1 s apart) since wall time ``t``."""
    last = prometheus.query('timestamp(up{job="m2fp"})')
    return bool(last) and all(float(r["value"][1]) >= t + scrapes for r in last)


def broken_copy(src: Path, store: BundleStore, version: str) -> None:
    """Publish ``src`` as ``version`` with one byte of its weights flipped (its manifest no longer matches)."""
    stage = store.dir / f".incoming-{version}"
    shutil.copytree(src, stage)
    data = stage / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    os.rename(stage, store.dir / version)


def republish(src: Path, store: BundleStore, version: str) -> None:
    """Replace ``version`` with the same model and new notes (a hot swap)."""
    with store.scratch(version) as tmp:
        stage = tmp / version
        shutil.copytree(src, stage)
        cfg = json.loads((stage / "config.json").read_text())
        cfg["notes"] = "republished for the monitoring test"
        (stage / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        seal(stage)
        store.publish(stage, version, force=True)


def finite(result: list[dict]) -> bool:
    return any(math.isfinite(float(r["value"][1])) for r in result)


def test_a_real_prometheus_scraping_m2fp_serve_answers_every_dashboard_query(demo_root: Path, tmp_path: Path):
    root = copy_root(demo_root, tmp_path / "bundles", versions=("v1.0", "v1.2"))
    store = BundleStore(root)
    broken_copy(demo_root / "m2fp" / "v1.1", store, "v1.1")
    routes = tmp_path / "routes.toml"
    routes.write_text('[weights]\n"v1.2" = 100\n\n[shadow]\nversion = "v1.0"\nfraction = 1.0\n')
    server = ServerProcess(root, tmp_path / "server.log", "--routes", str(routes), "--preload", "v1.0",
                           "--concurrency", "1", "--max-queue", "1", "--idle-ttl", "0")
    # a second server with nothing to serve (an empty root): the no-ready-version alert's case
    (idle_root := tmp_path / "empty").mkdir()
    idle = ServerProcess(idle_root, tmp_path / "idle.log")
    prometheus = Prometheus(tmp_path / "prometheus", scrape_config_for([server.port, idle.port], ALERTS))
    image, big = png_bytes(160, 120), png_bytes(640, 480, seed=3)
    try:
        server.start()
        idle.start(until="/healthz")
        prometheus.start()
        api = server.url + "/api"
        # parses on two versions (v1.2 also runs the shadow candidate v1.0 when a worker is idle)
        statuses = [post(f"{api}/auto/parse?visualization=0", image) for _ in range(6)]
        statuses += [post(f"{api}/v1.0/parse?visualization=0", image) for _ in range(3)]
        assert statuses == [200] * 9, statuses
        # bad input (400) and the broken version (fails verification or its load)
        assert post(f"{api}/v1.2/parse", image[:64]) == 400  # a truncated PNG
        assert post(f"{api}/v1.1/parse", image) in (404, 503)
        # bursts beyond one worker and one queue place: 503 + Retry-After. Repeated, a few scrapes apart,
        # until Prometheus itself sees the refusals grow: a counter series' first sample is no increase to
        # rate(), and on a loaded box a scrape can miss a burst (what the 503 alert evaluates is this rate)
        refused_rate = 'sum(rate(m2fp_requests_total{job="m2fp", status="503"}[5m])) > 0'
        with ThreadPoolExecutor(8) as pool:
            for _ in range(10):
                for _ in range(5):
                    burst = list(pool.map(lambda _: post(f"{api}/v1.2/parse", big), range(8)))
                    if 503 in burst:
                        break
                assert 503 in burst and 200 in burst, burst
                if poll(lambda: prometheus.query(refused_rate), 3):  # a few scrapes, else another burst
                    break
            assert prometheus.query(refused_rate), "Prometheus never saw the 503 refusals grow"
        # a hot swap of v1.0
        republish(demo_root / "m2fp" / "v1.0", store, "v1.0")
        wait_until(lambda: (scraped(server_metrics(server), "m2fp_version_events", event="swaps") or 0) >= 1, 90,
                   "v1.0 to be swapped")
        statuses = [post(f"{api}/{v}/parse?visualization=0", image) for v in ("auto", "v1.0", "auto", "latest")]
        assert statuses == [200] * 4, statuses
        metrics_text = server_metrics(server)
        assert scraped(metrics_text, "m2fp_version_failed", version="v1.1", scope="version") == 1.0, \
            "the broken v1.1 is not reported failed"
        assert (scraped(metrics_text, "m2fp_shadow_label_agreement_count", primary="v1.2", candidate="v1.0")
                or 0) >= 1, "no shadow comparison ran"

        # Prometheus has scraped all of that
        wait_until(lambda: prometheus.query('m2fp_version_events{job="m2fp", event="swaps"} >= 1')
                   and prometheus.query('sum(m2fp_requests_total{job="m2fp", status="503"}) > 0')
                   and prometheus.query('sum(m2fp_requests_total{job="m2fp"}) >= 20'), 60,
                   "Prometheus to scrape the traffic")
        # two more scrapes of every target: every rate() has two samples of every new series
        since = time.time()
        wait_until(lambda: scraped_after(prometheus, since), 30, "two more scrapes")

        values = {"job": "m2fp", "instance": f"127.0.0.1:{server.port}", "version": "v1.2|v1.0|v1.1",
                  "__rate_interval": "2m", "datasource": "m2fp-prometheus"}
        empty = []
        for expr in dashboard_expressions():
            result = prometheus.query(substitute(expr, values))
            if not finite(result):
                empty.append((expr, result))
        assert not empty, "dashboard queries without data:\n" + "\n".join(f"{e}\n  → {r}" for e, r in empty)

        # the variables' label_values(metric{…}, label) queries, through the label values API
        for name, query in dashboard_variable_queries().items():
            m = re.fullmatch(r"label_values\((.+), (\w+)\)", query)
            assert m, query
            got = prometheus.api(f"label/{m.group(2)}/values", **{"match[]": substitute(m.group(1), values)})
            assert got, f"variable {name}: no values for {query}"
        assert {"v1.0", "v1.1", "v1.2"} <= set(prometheus.api("label/version/values",
                                                               **{"match[]": "m2fp_version_loaded"}))

        # every metric the alerts use is exported under that name
        exprs = "\n".join(rule["expr"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for rule in g["rules"])
        used = set(re.findall(r"\b((?:m2fp|process)_[a-z0-9_]+|up)\b(?=[{\[)\s])", exprs))
        assert len(used) >= 8, used
        missing = [name for name in sorted(used) if not prometheus.query(f"group({name})")]
        assert not missing, f"alert rules use metrics nobody exports: {missing}"

        # the rules load and evaluate on real data: the failed version, the 503 refusals and the server with
        # nothing to serve make their alerts active (pending: their `for` has not passed), the others stay quiet
        groups = prometheus.api("rules")["groups"]
        rules = [r for g in groups for r in g["rules"]]
        assert {r["name"] for r in rules} == set(alert_names())
        assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]

        def active() -> set[tuple[str, str | None, str | None]]:
            """(alert, instance, version) of every pending or firing alert."""
            return {(a["labels"]["alertname"], a["labels"].get("instance"), a["labels"].get("version"))
                    for a in prometheus.api("alerts")["alerts"] if a["state"] in ("pending", "firing")}

        expected = {("M2FPVersionFailed", f"127.0.0.1:{server.port}", "v1.1"),
                    ("M2FPRefusing503", f"127.0.0.1:{server.port}", None),
                    ("M2FPNoReadyVersion", f"127.0.0.1:{idle.port}", None)}
        deadline = time.monotonic() + 30
        while not expected <= active() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert active() == expected, active()  # nothing else: the latency, queue, shadow and down alerts stay quiet
    finally:
        prometheus.stop()
        idle.stop()
        server.stop()
    log = server.log_path.read_text(errors="replace")
    assert "Traceback" not in log, log[-3000:]
