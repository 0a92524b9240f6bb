"""A whole site on the locked-down broker: every client logs in the way it is meant to.

The broker runs exactly compose/mosquitto-secure.conf with the credentials and ACL `imu-fleet
pki` makes (the module fixture of test_broker_security). A node presents its client certificate
on 8883 and serves a sensor that presents its own; a dashboard reads the results with a password
on 8884; the fleet CLI logs in with a password file or the environment. Nobody is anonymous.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from test_broker_security import SecureBroker, broker  # noqa: F401 (the secure broker fixture)
from test_node_e2e import raw_window

from fleet import pki
from helpers.programs import subprocess_env
from helpers.waiting import wait_until
from node.app import NodeApp
from node.config import load_config
from node.errors import ConfigError
from schemas import topics


def node_config(site: SecureBroker, node: str, reference: Path, **extra: object) -> dict:
    username = f"node-{node}"
    return {
        "broker": f"mqtts://localhost:{site.ports['8883']}",
        "node_id": node,
        "model": reference,
        "backend": "onnx",
        "ca_file": site.site.ca_cert,
        "cert_file": site.site.client_file(username, "crt"),
        "key_file": site.site.client_file(username, "key"),
        "telemetry_interval_s": 0.5,
        **extra,
    }


def test_a_node_with_its_certificate_serves_a_sensor_with_its_own(
    broker: SecureBroker,  # noqa: F811
    reference_bundle_path: Path,
) -> None:
    dashboard = broker.session("dashboard-d1")
    dashboard.client.subscribe(topics.motifs("s1"), qos=1)
    dashboard.client.subscribe(topics.node_status("n1"), qos=1)
    app = NodeApp.open(load_config(**node_config(broker, "n1", reference_bundle_path)))
    app.start()
    try:
        wait_until(
            lambda: any(t == topics.node_status("n1") for t, _ in dashboard.messages),
            what="the node's birth, seen by the dashboard",
        )
        sensor = broker.session("sensor-s1")
        window = orjson.dumps({"x": raw_window(3).tolist(), "seq": 3})
        sensor.client.publish(topics.window("s1"), window, qos=1).wait_for_publish(5)
        wait_until(
            lambda: any(t == topics.motifs("s1") for t, _ in dashboard.messages),
            what="the result, seen by the dashboard",
        )
        result = next(orjson.loads(p) for t, p in dashboard.messages if t == topics.motifs("s1"))
        assert (result["seq"], result["node_id"]) == (3, "n1")
        assert app.session.is_connected
        assert not app.metrics.totals()[4]  # nothing refused, nothing failed
    finally:
        app.stop()


def fleet_nodes(site: SecureBroker, *extra: str, env: dict[str, str] | None = None) -> str:
    command = [
        sys.executable, "-m", "fleet.cli", "nodes", "--wait", "1",
        "--broker", f"mqtts://localhost:{site.ports['8884']}", "--ca-file", str(site.site.ca_cert),
        "--username", "fleet-ops", *extra,
    ]  # fmt: skip
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=60, env=env or subprocess_env("onnx"),
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_fleet_cli_logs_in_with_a_password_file_or_the_environment(
    broker: SecureBroker,  # noqa: F811
    reference_bundle_path: Path,
    tmp_path: Path,
) -> None:
    app = NodeApp.open(load_config(**node_config(broker, "n2", reference_bundle_path)))
    app.start()
    try:
        secret = broker.site.client_file("fleet-ops", "password")
        wait_until(lambda: "n2" in fleet_nodes(broker, "--password-file", str(secret)))
        env = {**subprocess_env("onnx"), "IMU_FLEET_PASSWORD": broker.password("fleet-ops")}
        assert "n2" in fleet_nodes(broker, env=env)
        toml = tmp_path / "fleet.toml"
        toml.write_text(f'password_file = "{secret}"\n')
        assert "n2" in fleet_nodes(broker, "--config", str(toml))
    finally:
        app.stop()


def test_a_password_on_the_command_line_is_not_accepted() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "fleet.cli", "nodes", "--password", "hunter2"],
        capture_output=True, text=True, timeout=60, env=subprocess_env("onnx"), check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert "--password is not accepted" in done.stderr
    assert "hunter2" not in done.stderr


def test_connection_settings_are_checked_before_anything_starts(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cert_file and key_file go together"):
        load_config(broker="mqtts://h:8883", cert_file=tmp_path / "c.pem")
    with pytest.raises(ConfigError, match="need an mqtts:// broker URL"):
        load_config(broker="mqtt://h:1883", ca_file=tmp_path / "ca.pem")
    with pytest.raises(ConfigError, match="cannot read the password from"):
        load_config(password_file=tmp_path / "missing")
    with pytest.raises(ConfigError, match="carries credentials") as raised:
        load_config(broker="mqtt://user:secret@h:1883")
    assert "secret" not in str(raised.value)
    os.environ["IMU_NODE_PASSWORD"] = "from-env"
    try:
        with pytest.raises(ConfigError, match="either in password_file or in the environment"):
            load_config(password_file=tmp_path / "p")
    finally:
        del os.environ["IMU_NODE_PASSWORD"]


def test_a_publish_the_broker_refuses_is_a_failure_not_a_success(
    broker: SecureBroker,  # noqa: F811
    reference_bundle_path: Path,
) -> None:
    """A dashboard identity may not write artifacts: PUBACK 135, and the CLI says so."""
    env = {**subprocess_env("onnx"), "IMU_FLEET_PASSWORD": broker.password("dashboard-d1")}
    done = subprocess.run(
        [sys.executable, "-m", "fleet.cli", "publish", str(reference_bundle_path),
         "--broker", f"mqtts://localhost:{broker.ports['8884']}",
         "--ca-file", str(broker.site.ca_cert), "--username", "dashboard-d1"],
        capture_output=True, text=True, timeout=60, env=env, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    assert "the broker refused" in done.stderr
    assert "Not authorized" in done.stderr


@pytest.mark.parametrize(("sensor_id", "refused"), [("s2", False), ("s1", True)])
def test_a_simulated_sensor_logs_in_with_its_certificate_and_a_refusal_fails_it(
    broker: SecureBroker,  # noqa: F811
    sensor_id: str,
    refused: bool,
) -> None:
    """The operator's report: simulated sensors could not take a certificate's id, and a sensor
    the broker refused every publish of still exited 0."""
    spy = broker.session("fleet-ops")
    spy.client.subscribe(topics.window(sensor_id), qos=1)
    done = subprocess.run(
        [sys.executable, "-m", "fleet.cli", "simulate", "sensors", "--sensor-id", sensor_id,
         "--mode", "window", "--hop", "50", "--duration", "2",
         "--broker", f"mqtts://localhost:{broker.ports['8883']}",
         "--ca-file", str(broker.site.ca_cert),
         "--cert-file", str(broker.site.client_file("sensor-s2", "crt")),
         "--key-file", str(broker.site.client_file("sensor-s2", "key"))],
        capture_output=True, text=True, timeout=60, env=subprocess_env("onnx"), check=False,
    )  # fmt: skip
    assert "Traceback" not in done.stderr
    if refused:
        assert done.returncode == 1, done.stderr
        assert "refused" in done.stderr
        assert "--sensor-id" in done.stderr
        assert not [p for t, p in spy.messages if t == topics.window(sensor_id)]
    else:
        assert done.returncode == 0, done.stderr
        assert "0 refused by the broker" in done.stderr
        wait_until(lambda: any(t == topics.window(sensor_id) for t, _ in spy.messages))


def test_imu_node_check_runs_on_a_secured_site_with_a_check_login(
    broker: SecureBroker,  # noqa: F811
    reference_bundle_path: Path,
) -> None:
    """The operator's report: `imu-node check` could not log in to a secured site at all. A
    check login (`imu-fleet pki add site/ check NAME`) plays its one sensor, `check-NAME`, taken
    from its certificate; it reads those results and the nodes' telemetry, nothing more."""
    app = NodeApp.open(load_config(**node_config(broker, "n1", reference_bundle_path)))
    app.start()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "node.cli", "check", "--rate", "5", "--duration", "2",
             "--grace", "10", "--node", "n1", "--json", "--no-progress",
             "--broker", f"mqtts://localhost:{broker.ports['8883']}",
             "--ca-file", str(broker.site.ca_cert),
             "--cert-file", str(broker.site.client_file("check-c1", "crt")),
             "--key-file", str(broker.site.client_file("check-c1", "key"))],
            capture_output=True, text=True, timeout=120, env=subprocess_env("onnx"), check=False,
        )  # fmt: skip
        assert done.returncode in (0, 1), done.stderr  # 1: a target missed on a busy machine
        report = orjson.loads(done.stdout)
        assert report["sent"] >= 10
        assert (report["results"], report["lost"], report["nodes"]) == (report["sent"], 0, ["n1"])
    finally:
        app.stop()


def test_a_retired_node_is_forgotten_through_the_acl_and_a_live_one_is_not(
    broker: SecureBroker,  # noqa: F811
    reference_bundle_path: Path,
) -> None:
    """The operator's report: a retired node could never be removed, and its offline alert fired
    forever. `nodes forget` clears its retained status, model state and pin: the first two as the
    node itself (only it may write them), the pin with the operator's fleet login."""
    spy = broker.session("fleet-ops")
    spy.client.subscribe("fleet/nodes/n2/#", qos=1)
    app = NodeApp.open(load_config(**node_config(broker, "n2", reference_bundle_path)))
    app.start()
    wait_until(lambda: any(t == topics.node_model("n2") for t, _ in spy.messages))
    command = [
        sys.executable, "-m", "fleet.cli", "nodes", "forget", "n2",
        "--node-credentials", str(broker.site.client_file("node-n2", "crt").parent),
        "--node-broker", f"mqtts://localhost:{broker.ports['8883']}",
        "--broker", f"mqtts://localhost:{broker.ports['8884']}", "--ca-file",
        str(broker.site.ca_cert), "--username", "fleet-ops",
        "--password-file", str(broker.site.client_file("fleet-ops", "password")),
    ]  # fmt: skip

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(command, capture_output=True, text=True, timeout=120,
                              env=subprocess_env("onnx"), check=False)  # fmt: skip

    try:
        online = run()  # a live node keeps its state: it would publish it again
        assert online.returncode == 1, online.stdout + online.stderr
        assert "left as is: n2: online" in online.stdout
    finally:
        app.stop("retired")
    done = run()
    assert done.returncode == 0, done.stdout + done.stderr
    assert "forgotten: n2" in done.stdout
    assert "Traceback" not in done.stderr
    reader = broker.session("dashboard-d1")  # a fresh subscriber: no retained state is left
    reader.client.subscribe("fleet/nodes/n2/#", qos=1)
    _, mid = reader.client.unsubscribe("fleet/nodes/n2/#")  # retained ones come before its ack
    wait_until(lambda: mid in reader.acks, what="the UNSUBACK")
    assert not [t for t, p in reader.messages if t.startswith("fleet/nodes/n2/") and p]
    again = run()  # forgotten: nothing left to clear, and it says so instead of "forgotten"
    assert again.returncode == 1, again.stdout
    assert "left as is: n2: no state of it on the broker" in again.stdout


def test_one_process_plays_many_sensors_each_with_its_own_certificate(
    broker: SecureBroker,  # noqa: F811
) -> None:
    """The operator's report: N simulated sensors needed N certificates and N processes."""
    spy = broker.session("fleet-ops")
    spy.client.subscribe("imu/+/window", qos=1)
    done = subprocess.run(
        [sys.executable, "-m", "fleet.cli", "simulate", "sensors", "--sensor-id", "s1",
         "--sensor-id", "s2", "--mode", "window", "--hop", "50", "--duration", "2",
         "--broker", f"mqtts://localhost:{broker.ports['8883']}",
         "--sensor-credentials", str(broker.site.client_file("sensor-s1", "crt").parent)],
        capture_output=True, text=True, timeout=60, env=subprocess_env("onnx"), check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "0 refused by the broker" in done.stderr
    wait_until(lambda: {t for t, _ in spy.messages} >= {"imu/s1/window", "imu/s2/window"})


def test_simulated_nodes_log_in_as_themselves_on_a_secured_site(
    broker: SecureBroker,  # noqa: F811
    reference_bundle_path: Path,
) -> None:
    """The operator's report: `simulate nodes` could not log in to a secured site at all. Each
    simulated node logs in with its own certificate (`pki add site/ node PREFIX-0000`, ...), so
    the ACL gives it its own topics and nothing else."""
    for name in ("simsec-0000", "simsec-0001"):
        pki.add_client(broker.site.root, "node", name)
    broker.process.send_signal(signal.SIGHUP)  # the broker re-reads the ACL
    spy = broker.session("fleet-ops")
    spy.client.subscribe("fleet/nodes/+/status", qos=1)
    done = subprocess.run(
        [sys.executable, "-m", "fleet.cli", "simulate", "nodes", "--count", "2",
         "--prefix", "simsec", "--bundle", str(reference_bundle_path), "--duration", "3",
         "--telemetry-interval", "1", "--give-up-after", "20",
         "--broker", f"mqtts://localhost:{broker.ports['8883']}",
         "--node-credentials", str(broker.site.client_file("node-simsec-0000", "crt").parent)],
        capture_output=True, text=True, timeout=120, env=subprocess_env("onnx"), check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    births = {
        orjson.loads(p)["node_id"]
        for t, p in spy.messages
        if t.startswith("fleet/nodes/simsec-") and p and orjson.loads(p)["state"] == "online"
    }
    assert births == {"simsec-0000", "simsec-0001"}
    assert "Traceback" not in done.stderr
