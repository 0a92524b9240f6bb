"""Prometheus and Grafana as shipped (compose/prometheus, compose/grafana) against real programs.

- promtool checks the configuration and the rules, and runs the alerts' unit tests;
- the committed dashboard JSON is what `fleet.monitoring.grafana` generates;
- a real Prometheus scrapes a real node with the shipped jobs, relabeling and rules, and every
  query of every dashboard panel and every alert expression is run against it.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from test_node_e2e import raw_window

from common.mqtt.connection import Connection
from fleet.dashboard.app import Dashboard, DashboardSettings
from helpers.mqtt import Probe
from helpers.nodes import NodeFactory
from helpers.programs import require_program
from helpers.waiting import unique, wait_until
from node.tools.local_broker import LocalBroker, free_port
from schemas import topics
from schemas.codec import encode
from schemas.control import DesiredModel, NodeOutcome, RolloutRecord

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS_DIR = ROOT / "compose" / "prometheus"
GRAFANA_DIR = ROOT / "compose" / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "imu-fleet.json"
DATASOURCES = GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml"
RATE_INTERVAL = "1m"
"""What Grafana's $__rate_interval becomes in the live test (scrape interval 1 s)."""

SELECTOR = re.compile(r"(?<![\w:])((?:imu|process)_[a-z0-9_]+|up)(\{[^}]*\})?(?![\w(:])")
"""A metric selector in PromQL: a metric name of ours (not a function call), its matchers."""


def selectors(expr: str) -> set[str]:
    """Every metric selector `expr` uses, with its matchers as written."""
    found = set()
    for name, matchers in SELECTOR.findall(expr):
        found.add(name + re.sub(r"\s+", "", matchers) if matchers else name)
    return found


def dashboard_json() -> dict[str, Any]:
    """The committed dashboard."""
    return dict(json.loads(DASHBOARD.read_text()))


def dashboard_queries(board: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, expr) of every query of every panel, rows included."""
    found: list[tuple[str, str]] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            walk(panel.get("panels") or [])
            found.extend((panel["title"], t["expr"]) for t in panel.get("targets") or [])

    walk(board["panels"])
    return found


def alert_rules() -> list[dict[str, Any]]:
    """Every rule of the shipped alerts.yml."""
    groups = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


@dataclass
class Scraped:
    """A process Prometheus scrapes: its job in prometheus.yml, address and file_sd labels."""

    job: str
    address: str
    token: str
    labels: dict[str, str] = field(default_factory=dict)


def local_config(tmp_path: Path, scraped: list[Scraped], scrape_interval: str = "1s") -> Path:
    """The shipped prometheus.yml with only its paths and timing changed: file_sd and token
    files point at files in `tmp_path` listing `scraped`, rules at the shipped alerts.yml."""
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"].update(
        scrape_interval=scrape_interval, evaluation_interval=scrape_interval, scrape_timeout="1s"
    )
    config["rule_files"] = [str(PROMETHEUS_DIR / name) for name in config["rule_files"]]
    for job in config["scrape_configs"]:
        name = job["job_name"]
        mine = [s for s in scraped if s.job == name]
        token = tmp_path / f"{name}.token"
        token.write_text((mine[0].token if mine else "unused") + "\n")
        job["authorization"]["credentials_file"] = str(token)
        targets = tmp_path / f"{name}-targets.yml"
        targets.write_text(
            yaml.safe_dump([{"targets": [s.address], "labels": s.labels} for s in mine])
        )
        assert len(job["file_sd_configs"]) == 1
        job["file_sd_configs"][0]["files"] = [str(targets)]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run promtool; fails the test with its output when it does not exit 0."""
    done = subprocess.run(
        [require_program("promtool", "prometheus"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def test_dashboard_json_is_the_generators_output() -> None:
    from fleet.monitoring import grafana

    assert DASHBOARD.read_text() == grafana.render(), (
        "regenerate: python -m fleet.monitoring.grafana > compose/grafana/dashboards/imu-fleet.json"
    )


def test_dashboard_uses_the_provisioned_datasource_and_a_node_variable() -> None:
    board = dashboard_json()
    uid = yaml.safe_load(DATASOURCES.read_text())["datasources"][0]["uid"]
    queries = dashboard_queries(board)
    assert len(queries) > 20
    for panel in board["panels"]:
        for target in panel.get("targets") or []:
            assert target["datasource"]["uid"] == uid, panel["title"]
    (variable,) = board["templating"]["list"]
    assert variable["name"] == "node"
    assert variable["query"].startswith("label_values(imu_node_info")
    assert any('node_id="$node"' in expr for _, expr in queries)


def test_promtool_checks_the_shipped_config_and_rules(tmp_path: Path) -> None:
    promtool("check", "rules", str(PROMETHEUS_DIR / "alerts.yml"))
    node = Scraped("imu-node", "pi-0042.local:9108", "secret", {"node_id": "pi-0042"})
    out = promtool("check", "config", str(local_config(tmp_path, [node], "15s")))
    assert f"SUCCESS: {len(alert_rules())} rules found" in out.stdout
    for name in ("nodes.yml", "fleet.yml"):  # the shipped target lists parse as file_sd
        groups = yaml.safe_load((PROMETHEUS_DIR / name).read_text())
        assert all(isinstance(g["targets"], list) for g in groups), name


def test_the_shipped_config_checks_on_a_host_without_docker(tmp_path: Path) -> None:
    """The operator's report: `promtool check config` failed on a host because the file named
    container paths. Copied as a folder (as onto Debian's /etc/prometheus) with the two tokens
    in secrets/, the shipped file passes unchanged, checked from any folder."""
    host = tmp_path / "etc" / "prometheus"
    shutil.copytree(PROMETHEUS_DIR, host)
    (host / "secrets").mkdir()
    for token in ("imu-node-token", "imu-fleet-token"):
        (host / "secrets" / token).write_text("secret\n")
    out = promtool("check", "config", str(host / "prometheus.yml"), cwd=tmp_path)
    assert f"SUCCESS: {len(alert_rules())} rules found" in out.stdout


def test_every_alert_has_severity_for_and_a_runbook() -> None:
    rules = alert_rules()
    assert len(rules) == 16
    for rule in rules:
        assert rule["for"], rule["alert"]
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        annotations = rule["annotations"]
        assert annotations["summary"], rule["alert"]
        assert annotations["description"], rule["alert"]
        page, anchor = annotations["runbook_url"].split("#")
        assert page == "docs/operations.md", rule["alert"]
        assert anchor, rule["alert"]  # the section exists: tests/test_operations_doc.py
        assert annotations["runbook_url"] in annotations["description"], rule["alert"]


def test_alert_unit_tests_pass_in_promtool() -> None:
    out = promtool("test", "rules", "tests.yml", cwd=PROMETHEUS_DIR)
    assert "SUCCESS" in out.stdout
    tested = {
        case["alertname"]
        for test in yaml.safe_load((PROMETHEUS_DIR / "tests.yml").read_text())["tests"]
        for case in test["alert_rule_test"]
        if case["exp_alerts"]
    }
    assert tested == {rule["alert"] for rule in alert_rules()}  # each alert fires somewhere


class PrometheusProcess:
    """A real Prometheus on a free loopback port, storage in a temp folder."""

    def __init__(self, config: Path, storage: Path) -> None:
        self.port = free_port()
        self.log = storage.parent / "prometheus.log"
        command = [
            require_program("prometheus"),
            f"--config.file={config}",
            f"--storage.tsdb.path={storage}",
            f"--web.listen-address=127.0.0.1:{self.port}",
        ]
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not exit in 10 s."""
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)

    def ready(self) -> bool:
        """True once /-/ready answers 200 (the port opens before the storage is loaded)."""
        if self.process.poll() is not None:
            pytest.fail(f"prometheus exited: {self.log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as r:
                return bool(r.status == 200)
        except OSError:  # refused, or 503 while starting
            return False

    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/PATH; the `data` of a success answer."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}{query}"
        with urllib.request.urlopen(url, timeout=5) as response:
            answer = json.loads(response.read())
        assert answer["status"] == "success", answer
        return answer["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result vector (scalars as one sample)."""
        data = self.api("query", query=expr)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        return list(data["result"])

    def value(self, expr: str) -> float:
        """The one value `expr` gives now (NaN when it gives none)."""
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else math.nan


@pytest.fixture
def prometheus_at(tmp_path: Path) -> Iterator[list[PrometheusProcess]]:
    """Prometheus processes a test starts, stopped at its end."""
    started: list[PrometheusProcess] = []
    yield started
    for process in started:
        process.stop()


def scraped_processes(
    start_node: NodeFactory, broker: LocalBroker, tmp_path: Path, stack: ExitStack
) -> list[Scraped]:
    """Everything the live test scrapes: a node (job imu-node) and the fleet dashboard (job
    imu-fleet), with a running rollout on the broker for the fleet's rollout series."""
    token = "t-" + unique("tok")
    token_file = tmp_path / "node.token"
    token_file.write_text(token + "\n")
    port = free_port()
    app = start_node(
        node_id=unique("mon"), http_listen=f"127.0.0.1:{port}", http_token_file=token_file
    )
    rollout = RolloutRecord(
        rollout_id=unique("tcn-reference-1.1.0"),
        desired=DesiredModel(
            name="tcn-reference", version="1.1.0", bundle_sha256="0" * 64, bundle_size=1,
            url="mqtt://fleet/artifacts/tcn-reference/1.1.0", issued_at=time.time(),
        ),
        waves=[[app.node_id]], max_failures=0, wave_timeout_s=60,
        nodes={app.node_id: NodeOutcome(wave=0)}, created_at=time.time(), updated_at=time.time(),
    )  # fmt: skip
    publisher = stack.enter_context(closing(Probe(broker.url)))
    publisher.publish(topics.rollout(rollout.rollout_id), encode(rollout), retain=True)
    stack.callback(publisher.publish, topics.rollout(rollout.rollout_id), b"", retain=True)
    fleet_token_file = tmp_path / "fleet.token"
    fleet_token_file.write_text("f-" + token + "\n")
    dashboard = Dashboard(
        DashboardSettings(
            Connection.of(broker.url), listen="127.0.0.1:0", token_file=fleet_token_file
        )
    )
    dashboard.start()
    stack.callback(dashboard.stop)
    assert dashboard.session.wait_connected(10)
    host, fleet_port = dashboard.http.address
    return [
        Scraped("imu-node", f"127.0.0.1:{port}", token, {"node_id": app.node_id}),
        Scraped("imu-fleet", f"{host}:{fleet_port}", "f-" + token),
    ]


@pytest.mark.parametrize("backend", ["hailo"], indirect=True)  # the stand-in has a thermometer
def test_prometheus_scrapes_a_node_and_every_query_has_data(
    broker: LocalBroker,
    start_node: NodeFactory,
    probe: Probe,
    prometheus_at: list[PrometheusProcess],
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    require_program("prometheus")
    stack = ExitStack()
    request.addfinalizer(stack.close)
    scraped = scraped_processes(start_node, broker, tmp_path, stack)
    node_id = scraped[0].labels["node_id"]
    config = local_config(tmp_path, scraped)
    prometheus = PrometheusProcess(config, tmp_path / "tsdb")
    prometheus_at.append(prometheus)
    wait_until(prometheus.ready, timeout=15, what="Prometheus to be ready")

    def scraped_up() -> bool:
        return prometheus.value(f'sum(up{{node_id="{node_id}"}})') == 1

    wait_until(scraped_up, timeout=15, what=f"Prometheus to scrape {node_id} with its token")

    # traffic after the first scrape, so rates and quantiles see it
    sensor = unique("imu")
    probe.subscribe(topics.motifs(sensor), topics.node_errors(node_id))
    for seq in range(20):
        probe.publish(topics.window(sensor), orjson.dumps({"x": raw_window(seq).tolist()}))
    probe.publish(topics.window(sensor), b"{broken")
    probe.wait_for(topics.motifs(sensor), 20)
    probe.wait_for(topics.node_errors(node_id))

    def saw_traffic() -> bool:
        inferred = f'imu_node_windows_inferred_total{{node_id="{node_id}"}}'
        malformed = f'imu_node_errors_total{{node_id="{node_id}", kind="malformed"}}'
        return prometheus.value(inferred) >= 20 and prometheus.value(malformed) >= 1

    wait_until(saw_traffic, timeout=15, what="Prometheus to scrape the node's traffic")

    # the dashboard: the node variable resolves, and every panel query has a finite value
    variable = dashboard_json()["templating"]["list"][0]["query"]
    match = re.fullmatch(r"label_values\((.+), (\w+)\)", variable)
    assert match is not None
    assert node_id in prometheus.api(f"label/{match[2]}/values", **{"match[]": match[1]})
    without_data: dict[str, str] = {}
    used: set[str] = set()
    for title, expr in dashboard_queries(dashboard_json()):
        concrete = expr.replace("$node", node_id).replace("$__rate_interval", RATE_INTERVAL)
        used |= selectors(concrete.replace(node_id, "$node"))
        values = [float(sample["value"][1]) for sample in prometheus.query(concrete)]
        if not any(math.isfinite(v) for v in values):
            without_data[title] = expr

    # the alerts: each expression is valid, and Prometheus evaluates each rule without error
    for rule in alert_rules():
        prometheus.query(rule["expr"])  # a 400 (bad expression) fails here
        used |= selectors(rule["expr"])

    def rules_evaluated() -> bool:
        loaded = [r for g in prometheus.api("rules")["groups"] for r in g["rules"]]
        return len(loaded) == len(alert_rules()) and all(r["health"] == "ok" for r in loaded)

    wait_until(rules_evaluated, timeout=10, what="every alert rule to be evaluated cleanly")

    # every metric selector of the dashboard and the alerts has series, every panel has data
    def selectors_without_series() -> set[str]:
        return {s for s in used if not prometheus.query(f"count({s.replace('$node', node_id)})")}

    wait_until(lambda: not selectors_without_series(), timeout=15,
               what="series for every selector of the dashboard and the alerts")  # fmt: skip
    for title, expr in without_data.items():  # fleet series may have arrived since
        concrete = expr.replace("$node", node_id).replace("$__rate_interval", RATE_INTERVAL)
        values = [float(sample["value"][1]) for sample in prometheus.query(concrete)]
        assert any(math.isfinite(v) for v in values), f"panel {title!r} has no data: {expr}"
