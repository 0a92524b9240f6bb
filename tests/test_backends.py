"""Backend selection and the Hailo path's faults, through the hailo_platform stand-in."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
from test_node_e2e import window_json as window

from common.errors import ModelContractError
from hailo_standin import faults
from helpers.mqtt import Probe
from helpers.nodes import NodeFactory
from helpers.processes import stop_process
from helpers.programs import subprocess_env
from helpers.waiting import unique
from node.app import NodeApp
from node.config import load_config
from node.tools.local_broker import LocalBroker
from runtime.errors import BackendUnavailableError
from schemas import topics
from schemas.messages import NodeStatus

STANDIN_BIN = Path(__file__).resolve().parent / "hailo_standin" / "bin"
"""The stand-in `hailortcli`."""

# Tests that start nodes pick their backend themselves: run them once, not once per backend.
ONCE = pytest.mark.parametrize("backend", ["hailo"], indirect=True)


@pytest.fixture(autouse=True)
def healthy_device() -> None:
    """Every test starts with a healthy stand-in device."""
    faults.reset()


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "node.cli", *args], capture_output=True, timeout=60, env=env,
        check=False,
    )  # fmt: skip


def test_hailo_backend_without_hailo_platform_fails_with_what_to_install(
    broker: LocalBroker, hailo_bundle_path: Path
) -> None:
    completed = run_cli(
        "run", "--broker", broker.url, "--model", str(hailo_bundle_path), "--backend", "hailo",
        env=subprocess_env("onnx"),  # no stand-in on the path: like a machine without HailoRT
    )  # fmt: skip
    assert completed.returncode == 1
    assert b"hailo_platform" in completed.stderr
    assert b"hailo-all" in completed.stderr


def test_auto_without_hailo_platform_serves_on_onnx_and_says_why(
    broker: LocalBroker, hailo_bundle_path: Path, probe: Probe
) -> None:
    node_id = unique("auto")
    probe.subscribe(topics.node_status(node_id))
    process = subprocess.Popen(
        [sys.executable, "-m", "node.cli", "run", "--broker", broker.url, "--node-id", node_id,
         "--model", str(hailo_bundle_path), "--backend", "auto"],
        env=subprocess_env("onnx"), stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        birth = probe.wait_for(topics.node_status(node_id), timeout=30)[0]
    finally:
        stop_process(process, timeout=30)
    status = NodeStatus.model_validate_json(birth.payload)
    assert status.backend == "onnx"
    assert status.backend_reason == "auto: hailo_platform is not installed"


@ONCE
@pytest.mark.parametrize(
    ("bundle", "fault", "expected", "reason"),
    [
        ("hailo", {}, "hailo", "auto: Hailo device"),
        ("hailo", {"no_device": True}, "onnx", "auto: no Hailo device found"),
        ("onnx", {}, "onnx", "auto: the bundle has no HEF"),
    ],
)
def test_auto_backend_choice(
    start_node: NodeFactory,
    hailo_bundle_path: Path,
    reference_bundle_path: Path,
    bundle: str,
    fault: dict[str, bool],
    expected: str,
    reason: str,
) -> None:
    faults.set_faults(**fault)
    model = hailo_bundle_path if bundle == "hailo" else reference_bundle_path
    app = start_node(backend="auto", model=model)
    assert app.worker.pipeline.info.name == expected
    assert app.backend_reason.startswith(reason)


def test_busy_device_fails_clearly_or_falls_back_when_allowed(
    broker: LocalBroker, hailo_bundle_path: Path
) -> None:
    faults.set_faults(busy=True)
    config = load_config(broker=broker.url, model=hailo_bundle_path, backend="hailo")
    with pytest.raises(BackendUnavailableError, match="busy"):
        NodeApp.open(config)
    fallback = load_config(broker=broker.url, model=hailo_bundle_path, backend="hailo",
                           fallback="onnx")  # fmt: skip
    app = NodeApp.open(fallback)
    assert app.worker.pipeline.info.name == "onnx"
    assert "fallback from hailo" in app.backend_reason
    app.worker.pipeline.close()


def test_hef_for_hailo8_is_refused_on_a_hailo8l(
    broker: LocalBroker, hailo_bundle_path: Path, tmp_path: Path
) -> None:
    from common.bundle import read_bundle
    from fleet.bundles.builder import with_hef
    from schemas.manifest import HefInfo

    bundle = read_bundle(hailo_bundle_path)
    assert bundle.hef is not None
    eight_only = with_hef(bundle, bundle.hef, HefInfo(hw_arch="hailo8"), tmp_path / "b.tar")
    faults.set_faults(arch="hailo8l")
    config = load_config(broker=broker.url, model=eight_only.path, backend="hailo")
    with pytest.raises(ModelContractError, match="compiled for hailo8 but this device is HAILO8L"):
        NodeApp.open(config)


@ONCE
def test_device_timeouts_rebuild_the_backend_and_the_batch_is_served(
    start_node: NodeFactory, hailo_bundle_path: Path, probe: Probe
) -> None:
    app = start_node(backend="hailo", model=hailo_bundle_path, max_batch=1, hailo_timeout_ms=200)
    sensor = unique("imu")
    probe.subscribe(topics.motifs(sensor), topics.node_errors(app.node_id))
    faults.set_faults(timeouts=2)  # the first try and its retry of one batch both time out
    probe.publish(topics.window(sensor), window(0))
    report = probe.wait_for(topics.node_errors(app.node_id))[0].json()
    assert report["kind"] == "backend_recovery"
    assert "timed out" in report["reason"]
    assert "rebuilt the hailo backend" in report["reason"]
    for seq in (1, 2):
        probe.publish(topics.window(sensor), window(seq))
    results = probe.wait_for(topics.motifs(sensor), 3)
    assert [m.json()["seq"] for m in results] == [0, 1, 2]  # the failed batch ran again
    assert app.worker.pipeline.info.name == "hailo"
    assert app.metrics.totals()[3] == {}  # nothing dropped
    assert app.recovery.stats().rebuilds == 1
    assert app.readiness()["backend_healthy"]


@ONCE
def test_a_single_timeout_is_absorbed_by_the_retry(
    start_node: NodeFactory, hailo_bundle_path: Path, probe: Probe
) -> None:
    app = start_node(backend="hailo", model=hailo_bundle_path, hailo_timeout_ms=200)
    sensor = unique("imu")
    probe.subscribe(topics.motifs(sensor))
    faults.set_faults(timeouts=1)
    probe.publish(topics.window(sensor), window(0))
    assert probe.wait_for(topics.motifs(sensor))[0].json()["seq"] == 0
    assert not app.metrics.totals()[4]


@ONCE
def test_persistent_failures_fall_back_to_onnx_when_configured(
    start_node: NodeFactory, hailo_bundle_path: Path, probe: Probe
) -> None:
    app = start_node(backend="hailo", model=hailo_bundle_path, fallback="onnx", max_batch=1,
                     hailo_timeout_ms=100)  # fmt: skip
    sensor = unique("imu")
    probe.subscribe(topics.motifs(sensor), topics.node_errors(app.node_id),
                    topics.node_status(app.node_id))  # fmt: skip
    faults.set_faults(timeouts=1000)  # the device never answers again, rebuilt or not
    for seq in range(3):
        probe.publish(topics.window(sensor), window(seq))
    probe.wait_for(topics.node_errors(app.node_id),
                   where=lambda m: m.json()["kind"] == "backend_fallback", timeout=20)  # fmt: skip
    probe.publish(topics.window(sensor), window(3))
    results = probe.wait_for(topics.motifs(sensor), 4)
    assert sorted(m.json()["seq"] for m in results) == [0, 1, 2, 3]  # the failed batch ran too
    assert app.worker.pipeline.info.name == "onnx"
    status = probe.wait_for(topics.node_status(app.node_id),
                            where=lambda m: m.json()["backend"] == "onnx")[0].json()  # fmt: skip
    assert status["backend_reason"].startswith("fallback from hailo")
    assert app.manager.state.backend == "onnx"


@ONCE
def test_stop_releases_the_device(start_node: NodeFactory, hailo_bundle_path: Path) -> None:
    app = start_node(backend="hailo", model=hailo_bundle_path)
    app.stop()
    deadline = time.monotonic() + 5
    again = None
    while again is None and time.monotonic() < deadline:
        try:  # a second owner is refused while the first holds the device
            again = NodeApp.open(app.config)
        except BackendUnavailableError:
            time.sleep(0.1)
    assert again is not None
    assert again.worker.pipeline.info.name == "hailo"
    again.worker.pipeline.close()


def test_model_validate_prints_a_parity_table_for_both_backends(hailo_bundle_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "fleet.cli", "model", "validate", str(hailo_bundle_path)],
        capture_output=True, timeout=120, env=subprocess_env("hailo"), check=False,
    )  # fmt: skip
    out = completed.stdout.decode()
    assert completed.returncode == 0, out + completed.stderr.decode()
    rows = {line.split()[0]: line for line in out.splitlines()[2:]}
    assert rows["onnx"].split()[1] == "ok"
    assert rows["hailo"].split()[1] == "ok"
    assert "HAILO8" in rows["hailo"]


def test_doctor_reports_the_device_and_the_golden_check_on_hailo(
    broker: LocalBroker, hailo_bundle_path: Path
) -> None:
    env = subprocess_env("hailo")
    env["PATH"] = os.pathsep.join([str(STANDIN_BIN), env["PATH"]])  # Hailo's CLI, stand-in
    completed = run_cli("doctor", "--broker", broker.url, "--model", str(hailo_bundle_path),
                        "--node-id", "doc-1", env=env)  # fmt: skip
    out = completed.stdout.decode()
    assert completed.returncode == 0, out
    for expected in ("hailo_platform 4.23", "architecture", "chip temperature",
                     "HEF fits device", "golden check (hailo)", "golden check (onnx)",
                     "result spool", "[ ok ] hailortcli scan", "| [-] Device: 0000:01:00.0",
                     "[ ok ] hailortcli fw-control identify",
                     "| Device Architecture: HAILO8"):  # fmt: skip
        assert expected in out


def test_doctor_shows_what_hailortcli_says_when_the_device_is_gone(
    broker: LocalBroker, hailo_bundle_path: Path
) -> None:
    env = subprocess_env("hailo")
    env["PATH"] = os.pathsep.join([str(STANDIN_BIN), env["PATH"]])
    env[faults.ENV_VAR] = "no_device=1"
    completed = run_cli("doctor", "--broker", broker.url, "--model", str(hailo_bundle_path),
                        "--node-id", "doc-2", "--backend", "hailo", "--json", env=env)  # fmt: skip
    assert completed.returncode == 1
    rows = {row["check"]: row for row in orjson.loads(completed.stdout)}
    assert rows["hailortcli scan"]["level"] == "fail"
    assert rows["hailortcli scan"]["detail"] == "Hailo devices not found"
    assert rows["hailortcli fw-control identify"]["level"] == "fail"
    assert "Failed to create device" in rows["hailortcli fw-control identify"]["detail"]


def test_doctor_says_when_hailortcli_is_missing(
    broker: LocalBroker, hailo_bundle_path: Path
) -> None:
    env = subprocess_env("hailo")
    env["PATH"] = os.path.dirname(sys.executable)  # the venv only: no hailortcli
    completed = run_cli("doctor", "--broker", broker.url, "--node-id", "doc-3",
                        "--backend", "hailo", "--json", env=env)  # fmt: skip
    rows = {row["check"]: row for row in orjson.loads(completed.stdout)}
    assert rows["hailortcli"]["level"] == "warn"
    assert "hailo-all" in rows["hailortcli"]["fix"]


@ONCE
def test_hot_swap_on_hailo_holds_both_models_on_one_chip(
    broker: LocalBroker, start_node: NodeFactory, hailo_bundle_path: Path, probe: Probe,
    tmp_path: Path,
) -> None:  # fmt: skip
    from common.bundle import read_bundle
    from fleet.bundles.reference import build_reference_bundle
    from fleet.desired import desired_for, desired_topic
    from hailo_standin.bundles import hailo_bundle
    from schemas.codec import encode

    newer = read_bundle(build_reference_bundle(tmp_path / "v110.tar", version="1.1.0", seed=8))
    target = hailo_bundle(newer, tmp_path / "v110-hailo.tar")
    assert target.path is not None
    app = start_node(backend="hailo", model=hailo_bundle_path, cache_dir=tmp_path / "cache")
    sensor = unique("imu")
    probe.subscribe(topics.motifs(sensor), topics.node_model(app.node_id))
    desired = desired_for(target.path, url=target.path.as_uri())
    probe.publish(desired_topic("node", app.node_id), encode(desired), retain=True)
    probe.wait_for(topics.node_model(app.node_id), timeout=30,
                   where=lambda m: m.json()["state"] == "active"
                   and m.json()["active"]["version"] == "1.1.0")  # fmt: skip
    probe.publish(topics.window(sensor), window(1))
    result = probe.wait_for(topics.motifs(sensor))[0].json()
    assert result["model"]["version"] == "1.1.0"
    assert app.worker.pipeline.info.name == "hailo"
