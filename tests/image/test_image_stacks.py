"""compose/edge.yml and compose/fleet.yml, up under podman-compose, checked from outside.

The order is the operator's: the containers are locked down as the files say, the broker
refuses what it must, real windows go through the node container, the HTTP side and the health
checks answer, the results reach the dashboard, and SIGTERM drains the node to exit 0.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import os
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from helpers.podman import (
    CHECK,
    DASHBOARD,
    DASHBOARD_TOKEN,
    EDGE,
    EDGE_PROJECT,
    FLEET,
    FLEET_PROJECT,
    HTTP_TOKEN,
    NODE_ID,
    Site,
    compose,
    image_healthcheck,
    inspect,
    logs,
    podman,
    wait_healthy,
)
from helpers.waiting import wait_until

NODE = f"{EDGE_PROJECT}_node_1"
BROKER = f"{EDGE_PROJECT}_mosquitto_1"
DASH = f"{FLEET_PROJECT}_fleet-dashboard_1"
SENSOR = f"check-{CHECK}"
CHECK_SECONDS = 10


def _report(line: str) -> None:
    """A measured figure, for scripts/test-image to print at the end."""
    path = os.environ.get("IMU_IMAGE_REPORT")
    if path:
        with open(path, "a", encoding="utf-8") as report:
            report.write(line + "\n")


def _mqtt(tool: str, site: Site, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool, "-h", "127.0.0.1", "--cafile", str(site.ca), *args],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip


def _tls(site: Site, role: str, name: str) -> list[str]:
    return ["-p", "8883", "--cert", str(site.client(role, name, "crt")),
            "--key", str(site.client(role, name, "key"))]  # fmt: skip


def _dashboard_login(site: Site) -> list[str]:
    password = site.client("dashboard", DASHBOARD, "password").read_text().strip()
    return ["-p", "8884", "-u", f"dashboard-{DASHBOARD}", "-P", password]


def _rss_mb(container: str) -> float:
    status = podman("exec", container, "cat", "/proc/1/status").stdout
    kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    return kb / 1024


@pytest.fixture(scope="module")
def checked(stacks: Site) -> dict[str, Any]:
    """`imu-node check` from this host, as the site's check login, through the published TLS
    listener: real windows through the node container."""
    _report(f"node RSS at idle, before any window: {_rss_mb(NODE):.1f} MB")
    done = subprocess.run(
        ["imu-node", "check", "--broker", "mqtts://127.0.0.1:8883", "--ca-file", str(stacks.ca),
         "--cert-file", str(stacks.client("check", CHECK, "crt")),
         "--key-file", str(stacks.client("check", CHECK, "key")),
         "--node", NODE_ID, "--rate", "20", "--duration", str(CHECK_SECONDS), "--json",
         "--no-progress"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.stdout.strip(), f"imu-node check printed nothing: {done.stderr[-2000:]}"
    report: dict[str, Any] = json.loads(done.stdout)
    _report(
        f"imu-node check through the container: sent {report['sent']}, results "
        f"{report['results']}, lost {report['lost']}, p95 {report['latency_ms'].get('p95')} ms"
    )
    return report


def test_containers_are_locked_down_as_the_files_say(stacks: Site) -> None:
    for name, memory, pids in [(NODE, 768, 256), (BROKER, 256, 64), (DASH, 256, 128)]:
        host = inspect(name)["HostConfig"]
        assert host["ReadonlyRootfs"] is True, name
        assert not inspect(name)["EffectiveCaps"], f"{name} keeps capabilities"
        assert any("no-new-privileges" in opt for opt in host["SecurityOpt"] or []), name
        assert host["Memory"] == memory * 2**20, name
        assert host["PidsLimit"] == pids, name
    node = inspect(NODE)
    assert node["Config"]["User"] in {"10001:10001", "10001"}
    secrets = {m["Destination"] for m in node["Mounts"]} & {
        "/run/secrets/node-key", "/run/secrets/http-token", "/run/secrets/metrics-token"
    }  # fmt: skip
    assert len(secrets) == 3, node["Mounts"]
    environment = "\n".join(node["Config"]["Env"])
    assert HTTP_TOKEN not in environment
    assert "PRIVATE KEY" not in environment
    ports = {p for p, bound in inspect(BROKER)["NetworkSettings"]["Ports"].items() if bound}
    assert ports == {"8883/tcp", "8884/tcp"}, "only the TLS listeners leave the container"


def test_broker_refuses_anonymous_and_unknown_clients_from_outside(stacks: Site) -> None:
    anonymous = _mqtt("mosquitto_sub", stacks, "-p", "8884", "-t", "x", "-E", "-W", "10",
                      "-V", "mqttv311")  # fmt: skip
    assert anonymous.returncode == 5, f"anonymous login not refused: {anonymous.stderr}"
    wrong = _mqtt("mosquitto_sub", stacks, "-p", "8884", "-u", "dashboard-ops", "-P", "guess",
                  "-t", "x", "-E", "-W", "10", "-V", "mqttv311")  # fmt: skip
    assert wrong.returncode == 5, f"a wrong password was not refused: {wrong.stderr}"
    no_certificate = _mqtt("mosquitto_sub", stacks, "-p", "8883", "-t", "x", "-E", "-W", "10")
    assert no_certificate.returncode != 0, "TLS listener took a client without a certificate"
    known = _mqtt("mosquitto_sub", stacks, *_dashboard_login(stacks), "-t", "fleet/#", "-E",
                  "-W", "10", "-V", "mqttv311")  # fmt: skip
    assert known.returncode == 0, f"the dashboard login was refused: {known.stderr}"


def test_acl_keeps_a_login_to_its_own_topics(stacks: Site) -> None:
    """The check login may play a sensor, not a node: it cannot publish a node's status, and
    the dashboard's read-only login cannot publish at all (MQTT 5 answers "not authorized")."""
    for login, topic in [
        (_tls(stacks, "check", CHECK), f"fleet/nodes/{NODE_ID}/status"),
        (_dashboard_login(stacks), f"imu/{SENSOR}/window"),
    ]:
        done = _mqtt("mosquitto_pub", stacks, *login, "-V", "mqttv5", "-q", "1", "-t", topic,
                     "-m", "{}")  # fmt: skip
        # mosquitto_pub exits 0 and warns: "Publish 1 failed: Not authorized."
        assert "not authorized" in done.stderr.lower(), f"{topic} was accepted: {done.stderr}"


def test_node_serves_real_windows_through_the_broker(checked: dict[str, Any]) -> None:
    assert checked["nodes"] == [NODE_ID]
    assert checked["sent"] >= CHECK_SECONDS * 20 * 0.9
    assert checked["lost"] == 0, checked
    assert checked["results"] == checked["sent"]


def test_serving_node_compiles_nothing(checked: dict[str, Any]) -> None:
    """Every module the node loaded, at start and while serving, came with its bytecode: the
    root is read-only, and compiling at run time cost 9 MB of RSS (the Dockerfile's warm-up
    imports name what to compile)."""
    compiled = sorted(
        {
            line.split("code object from ", 1)[1].strip("'")
            for line in logs(NODE).splitlines()
            if line.startswith("# code object from") and "site-packages" in line
            and "__pycache__" not in line
        }
    )  # fmt: skip
    assert not compiled, f"compiled at run time (add them to the Dockerfile's warm-up): {compiled}"


def _request(
    port: int, method: str, path: str, body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any]]:  # fmt: skip
    """One HTTP request to a published port on this host: the status and the JSON answer."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.request(method, path, body=body, headers=headers or {})
    answer = connection.getresponse()
    data = answer.read()
    connection.close()
    return answer.status, json.loads(data) if data.startswith(b"{") else {}


def test_http_side_answers_on_the_published_port(stacks: Site) -> None:
    def request(method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:  # fmt: skip
        return _request(9108, method, path, body, headers)

    # healthy (/livez) comes as soon as HTTP answers; /healthz once the model serves
    wait_until(lambda: request("GET", "/healthz")[0] == 200, timeout=60, what="/healthz 200")
    status, health = request("GET", "/healthz")
    assert status == 200
    assert (health["ok"], health["node_id"], health["backend"]) == (True, NODE_ID, "onnx")
    assert request("GET", "/livez")[0] == 200
    assert request("GET", "/status")[0] == 401, "/status without the token"
    status, test = request("POST", "/test", None, {"Authorization": f"Bearer {HTTP_TOKEN}"})
    assert (status, test.get("latent_shape")) == (200, [64]), test
    status, ready = request("GET", "/readyz")
    assert status == 200, ready
    assert ready["ready"] is True
    window = json.dumps({"x": np.linspace(-1, 1, 900).reshape(100, 9).round(4).tolist()})
    status, _ = request("POST", "/infer", window.encode(), {"Content-Type": "application/json"})
    assert status == 401, "POST /infer without the token"
    status, result = request("POST", "/infer", window.encode(), {
        "Content-Type": "application/json", "Authorization": f"Bearer {HTTP_TOKEN}"})  # fmt: skip
    assert status == 200, result
    assert len(result["latent"]) == 64
    assert len(result["motif_scores"]) == 12


def test_health_checks_of_the_files_and_of_the_image_pass(stacks: Site) -> None:
    for container in (BROKER, NODE, DASH):
        done = podman("healthcheck", "run", container, check=False)
        assert done.returncode == 0, f"{container}: {done.stdout}{done.stderr}"
    image_check = image_healthcheck(inspect(NODE)["Image"])
    assert image_check[:1] == ["CMD"]
    done = podman("exec", NODE, *image_check[1:], check=False)
    assert done.returncode == 0, f"the image's HEALTHCHECK failed in the node: {done.stderr}"


def _events(token: str) -> Iterator[dict[str, Any]]:
    """The dashboard's server-sent events, as JSON documents."""
    connection = http.client.HTTPConnection("127.0.0.1", 8090, timeout=10)
    connection.request("GET", "/events", headers={"Authorization": f"Bearer {token}"})
    answer = connection.getresponse()
    assert answer.status == 200, answer.read()[:300]
    try:
        while True:
            line = answer.readline()
            if not line:
                return
            if line.startswith(b"data:"):
                yield json.loads(line[5:])
    finally:
        connection.close()


def test_node_results_reach_the_dashboard(stacks: Site, checked: dict[str, Any]) -> None:
    deadline = time.monotonic() + 60
    seen: list[str] = []
    for event in _events(DASHBOARD_TOKEN):
        text = json.dumps(event)
        seen.append(text[:300])
        if NODE_ID in text and SENSOR in text:
            break
        assert time.monotonic() < deadline, f"no result of {SENSOR} from {NODE_ID}: {seen[-3:]}"
    _report(f"dashboard event with the node's results: {seen[-1][:160]}")


def test_sigterm_drains_the_node_to_exit_0(stacks: Site) -> None:
    _report(f"node RSS after the check: {_rss_mb(NODE):.1f} MB")
    podman("stop", "-t", "30", NODE, timeout=60)
    state = inspect(NODE)["State"]
    assert state["ExitCode"] == 0, state
    lines = [json.loads(line) for line in logs(NODE).splitlines() if line.startswith("{")]
    said = [line["msg"] for line in lines if line.get("logger") == "node.app"]
    assert any(f"node {NODE_ID} stopped" in msg for msg in said), said[-5:]


def test_the_fleet_stack_comes_up_with_its_own_broker(stacks: Site) -> None:
    """Last: compose/fleet.yml as a whole (its broker from compose/broker.yml, the dashboard on
    it), once the edge stack is down (both publish the broker's ports)."""
    compose(stacks, *EDGE, "down", "-t", "30")
    site_broker = {k: v for k, v in stacks.env.items() if k != "IMU_SITE_BROKER"}
    compose(dataclasses.replace(stacks, env=site_broker), *FLEET, "up", "-d", "--no-build")
    wait_healthy(f"{FLEET_PROJECT}_mosquitto_1")
    wait_healthy(DASH)
    assert inspect(DASH)["Config"]["Cmd"][2] == "mqtts://mosquitto:8884"

    def connected() -> bool:
        status, health = _request(8090, "GET", "/healthz")
        return status == 200 and health["broker_connected"] is True

    wait_until(connected, timeout=60, what="the dashboard to reach its stack's broker")
