"""The dashboard process against a real mosquitto: the token gate, events, and floods."""

from __future__ import annotations

import http.client
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as mqtt
import psutil
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from test_dashboard_view import model_state, result, rollout, status, telemetry

from common.mqtt.address import BrokerAddress
from fleet.dashboard.auth import check_listen
from helpers.mqtt import Probe
from helpers.waiting import unique, wait_until
from node.tools.local_broker import LocalBroker
from schemas import topics

TOKEN = "s3cret-token-for-tests"
PIDS: dict[str, int] = {}
"""Process id of the dashboard serving each URL."""


@pytest.fixture(scope="module")
def dashboard(broker: LocalBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`imu-fleet dashboard` as a subprocess (the real CLI), with a token; yields its URL."""
    token_file = tmp_path_factory.mktemp("dash") / "token"
    token_file.write_text(TOKEN + "\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "fleet.cli", "dashboard", "--broker", broker.url,
         "--listen", "127.0.0.1:0", "--token-file", str(token_file)],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stderr is not None
    url = ""
    deadline = time.monotonic() + 20
    while not url and time.monotonic() < deadline:
        line = proc.stderr.readline()
        if "dashboard on http://" in line:
            url = line.split("dashboard on ", 1)[1].split()[0]
    assert url, "the dashboard did not start"
    os.set_blocking(proc.stderr.fileno(), False)
    PIDS[url] = proc.pid
    wait_until(lambda: get(url, "/healthz")[1]["broker_connected"], what="broker connection")
    yield url
    proc.terminate()
    assert proc.wait(10) == 0


def get(url: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, Any, Any]:
    address = BrokerAddress.parse(url.replace("http://", "mqtt://").rstrip("/"))
    conn = http.client.HTTPConnection(address.host, address.port, timeout=10)
    conn.request("GET", path, headers=headers or {})
    response = conn.getresponse()
    body = response.read()
    conn.close()
    is_json = response.getheader("Content-Type", "").startswith("application/json")
    return response.status, orjson.loads(body) if is_json else body, response


def bearer(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.parametrize("path", ["/", "/events", "/metrics", "/static/app.js", "/nope"])
@pytest.mark.parametrize(
    "headers",
    [{}, bearer("wrong"), bearer(TOKEN + "x"), {"Authorization": TOKEN},
     {"Cookie": "imu_fleet_session=" + "0" * 43}],
    ids=["missing", "wrong", "longer", "no-scheme", "forged-cookie"],
)  # fmt: skip
def test_without_the_token_everything_but_healthz_is_refused(
    dashboard: str, path: str, headers: dict[str, str]
) -> None:
    code, body, response = get(dashboard, path, headers)
    assert code == 401
    assert body["error"] == "unauthorized"
    assert response.getheader("WWW-Authenticate", "").startswith("Bearer")
    assert get(dashboard, "/healthz")[0] == 200


def test_bearer_and_the_one_time_link_open_it(dashboard: str) -> None:
    code, body, response = get(dashboard, "/", bearer())
    assert code == 200
    assert b'<script src="/static/app.js"' in body
    assert "script-src 'self'" in response.getheader("Content-Security-Policy")
    assert response.getheader("X-Content-Type-Options") == "nosniff"
    assert get(dashboard, f"/?token={TOKEN}")[0] == 400  # the token never travels in a URL
    assert get(dashboard, "/?code=made-up")[0] == 401
    link = new_link(dashboard)
    code, _, response = get(dashboard, link)
    assert code == 303
    assert response.getheader("Location") == "/"
    cookie = response.getheader("Set-Cookie")
    assert "HttpOnly" in cookie
    assert "SameSite=Strict" in cookie
    assert TOKEN not in cookie
    session = {"Cookie": cookie.split(";", 1)[0]}
    assert get(dashboard, "/", session)[0] == 200
    assert get(dashboard, "/metrics", session)[0] == 200
    assert get(dashboard, "/metrics", bearer())[0] == 200
    assert get(dashboard, link)[0] == 401  # a link works once
    other = get(dashboard, new_link(dashboard))[2].getheader("Set-Cookie")
    assert other.split(";", 1)[0] != session["Cookie"]  # each login its own session


def new_link(url: str, token: str = TOKEN) -> str:
    """`POST /login` with the bearer token: the path of a new one-time link."""
    address = BrokerAddress.parse(url.replace("http://", "mqtt://").rstrip("/"))
    conn = http.client.HTTPConnection(address.host, address.port, timeout=10)
    conn.request("POST", "/login", headers=bearer(token))
    response = conn.getresponse()
    body = orjson.loads(response.read())
    conn.close()
    assert response.status == 200, body
    return str(body["path"])


def test_dashboard_link_prints_a_link_only_for_the_token(dashboard: str, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    done = subprocess.run(
        [sys.executable, "-m", "fleet.cli", "dashboard-link", dashboard, "--token-file",
         str(token_file)], capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    link = done.stdout.strip()
    assert link.startswith(dashboard.rstrip("/") + "/?code=")
    assert get(dashboard, link.removeprefix(dashboard.rstrip("/")))[0] == 303
    token_file.write_text("wrong")
    refused = subprocess.run(
        [sys.executable, "-m", "fleet.cli", "dashboard-link", dashboard, "--token-file",
         str(token_file)], capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert refused.returncode == 1
    assert "HTTP 401" in refused.stderr


def test_only_get_without_a_body(dashboard: str) -> None:
    address = BrokerAddress.parse(dashboard.replace("http://", "mqtt://").rstrip("/"))
    conn = http.client.HTTPConnection(address.host, address.port, timeout=10)
    conn.request("POST", "/", body=b"x" * 1000, headers=bearer())
    assert conn.getresponse().status == 405
    conn.close()
    assert get(dashboard, "/" + "a" * 5000, bearer())[0] == 414


def test_a_token_is_needed_beyond_loopback() -> None:
    with pytest.raises(ValueError, match="reaches beyond this machine"):
        check_listen("0.0.0.0", token=False, open_=False)
    check_listen("0.0.0.0", token=False, open_=True)
    check_listen("0.0.0.0", token=True, open_=False)
    check_listen("127.0.0.1", token=False, open_=False)


def read_events(url: str, until: Any, timeout: float = 10.0) -> list[tuple[str, Any]]:
    """Read /events until `until(events)` is true."""
    address = BrokerAddress.parse(url.replace("http://", "mqtt://").rstrip("/"))
    conn = http.client.HTTPConnection(address.host, address.port, timeout=timeout)
    conn.request("GET", "/events", headers=bearer())
    response = conn.getresponse()
    assert response.status == 200
    assert response.getheader("Content-Type").startswith("text/event-stream")
    events: list[tuple[str, Any]] = []
    name = ""
    deadline = time.monotonic() + timeout
    while not until(events):
        assert time.monotonic() < deadline, f"events so far: {[e for e, _ in events]}"
        line = response.fp.readline().decode().rstrip("\n")
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            events.append((name, orjson.loads(line[6:])))
    conn.close()
    return events


def test_events_start_with_a_snapshot_then_carry_results(dashboard: str, probe: Probe) -> None:
    node, sensor = unique("node"), unique("sensor")
    probe.publish(topics.node_model(node), model_state(node), retain=True)
    wait_until(lambda: any(n["node_id"] == node for n in
                           read_events(dashboard, lambda e: e)[0][1]["nodes"]))  # fmt: skip
    sent = [0.0]

    def got_it(events: list[tuple[str, Any]]) -> bool:
        if events and not sent[0]:  # the snapshot is in: publish once
            sent[0] = time.time()
            probe.publish(topics.motifs(sensor), result(sensor, node, 4, seq=7))
        return any(
            r["sensor_id"] == sensor for _, d in events if _ == "delta" for r in d["results"]
        )

    events = read_events(dashboard, got_it)
    assert events[0][0] == "snapshot"
    (res,) = [r for name, d in events if name == "delta" for r in d["results"]
              if r["sensor_id"] == sensor]  # fmt: skip
    assert (res["label"], res["motif"], res["seq"], res["node_id"]) == ("stairs", 4, 7, node)
    assert time.time() - sent[0] < 2.0  # published to delivered on the page's stream
    probe.publish(topics.node_model(node), b"", retain=True)


def _publisher(url: str) -> mqtt.Client:
    address = BrokerAddress.parse(url)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, unique("flood"),
                         protocol=MQTTProtocolVersion.MQTTv5)  # fmt: skip
    client.max_queued_messages_set(0)
    client.connect(address.host, address.port)
    client.loop_start()
    return client


def test_floods_of_junk_and_of_sensor_ids_leave_it_bounded_and_serving(
    dashboard: str, broker: LocalBroker
) -> None:
    process = psutil.Process(PIDS[dashboard])
    client = _publisher(broker.url)
    before = get(dashboard, "/metrics", bearer())[1].decode()
    rss_before = process.memory_info().rss
    junk = [b"", b"{", b"\xff\xfe", b"[]", b'{"state": 1}', b"null", b"<script>x</script>",
            b'{"node_id": "x", "ts": -1}', b"9" * 5000, b"{" * 10000]  # fmt: skip
    node = unique("node")
    filters = [
        topics.node_status(node),
        topics.node_model(node),
        topics.node_telemetry(node),
        topics.node_errors(node),
        topics.rollout(unique("r")),
        topics.motifs(unique("s")),
    ]
    info = None
    for topic in filters:
        for payload in [*junk, b"x" * (2 * 1024 * 1024)]:
            info = client.publish(topic, payload, qos=1)
    for i in range(10_000):  # distinct, valid sensor ids: the sensor cap must hold
        sensor = f"flood-{i:05d}"
        info = client.publish(topics.motifs(sensor), result(sensor, node, i % 12), qos=1)
    assert info is not None
    info.wait_for_publish(60)
    marker = unique("s")
    client.publish(topics.motifs(marker), result(marker, node, 0), qos=1).wait_for_publish(10)
    results_before = _value(before, 'imu_fleet_dashboard_messages_total{kind="result"}')

    def taken() -> float:
        text = get(dashboard, "/metrics", bearer())[1].decode()
        return _value(text, 'imu_fleet_dashboard_messages_total{kind="result"}') - results_before

    wait_until(lambda: taken() >= 10_001, timeout=60, what="the flood to be read")
    code, health, _ = get(dashboard, "/healthz")
    assert code == 200
    assert health["sensors"] <= 500
    assert health["ethogram_entries"] <= 500 * 120
    text = get(dashboard, "/metrics", bearer())[1].decode()
    for reason in ("oversized", "malformed", "invalid"):
        name = f'imu_fleet_dashboard_rejected_total{{reason="{reason}"}}'
        assert _value(text, name) > _value(before, name), reason
    growth_mb = (process.memory_info().rss - rss_before) / 2**20
    if os.environ.get("DASHBOARD_FIGURES"):
        sys.stderr.write(f"\nflood: RSS {rss_before / 2**20:.1f} -> "
                         f"{process.memory_info().rss / 2**20:.1f} MB\n")  # fmt: skip
    assert growth_mb < 80, f"RSS grew {growth_mb:.1f} MB under the flood"
    assert get(dashboard, "/", bearer())[0] == 200
    client.publish(topics.rollout(filters[4].rsplit("/", 1)[1]), b"", qos=1, retain=True)
    client.disconnect()
    client.loop_stop()


def _value(text: str, name: str) -> float:
    line = next((x for x in text.splitlines() if x.startswith(name + " ")), None)
    return float(line.split()[-1]) if line else 0.0


def test_the_cli_has_help_with_an_example() -> None:
    out = subprocess.run([sys.executable, "-m", "fleet.cli", "dashboard", "--help"],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert "--token-file" in out
    assert "--open" in out
    assert "imu-fleet dashboard --broker" in out


def test_telemetry_status_and_rollout_reach_the_page(dashboard: str, probe: Probe) -> None:
    node, rid = unique("node"), unique("r")
    probe.publish(topics.node_status(node), status(node), retain=True)
    probe.publish(topics.node_telemetry(node), telemetry(node, 12.5))
    probe.publish(topics.rollout(rid), rollout(rid), retain=True)

    def seen(events: list[tuple[str, Any]]) -> bool:
        nodes = [n for _, d in events for n in d.get("nodes", []) if n["node_id"] == node]
        rollouts = [r for _, d in events for r in d.get("rollouts", []) if r["rollout_id"] == rid]
        return any(n["windows_per_s"] == 12.5 for n in nodes) and bool(rollouts)

    read_events(dashboard, seen)
    text = get(dashboard, "/metrics", bearer())[1].decode()
    assert f'imu_fleet_node_online{{node_id="{node}"}} 1.0' in text
    assert f'imu_fleet_rollout_wave{{rollout_id="{rid}"}} 2.0' in text
    for topic in (topics.node_status(node), topics.rollout(rid)):
        probe.publish(topic, b"", retain=True)
