"""Simulated nodes: real MQTT clients running the node's ModelManager, against a real mosquitto."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import fleet.simulate.shared_models as sim
from common.bundle import file_entries, read_bundle, write_bundle
from fleet.bundles.reference import build_reference_bundle
from fleet.desired import desired_for, desired_topic
from fleet.distribution import publish_bundle
from fleet.simulate.nodes import SIMULATED, SimulatedFleet, simulate_nodes
from helpers.mqtt import Probe, Received
from helpers.processes import stop_process
from helpers.waiting import unique, wait_until
from node.tools.local_broker import LocalBroker, free_port
from node.updates import fetch
from schemas import topics
from schemas.codec import encode
from schemas.control import DesiredModel
from schemas.messages import Telemetry

COUNT = 20
FleetFactory = Callable[..., SimulatedFleet]


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Reference-model bundles 1.1.0 and 1.2.0 (other weights, so other latents)."""
    folder = tmp_path_factory.mktemp("sim-versions")
    return {
        v: build_reference_bundle(folder / f"ref-{v}.tar", version=v, seed=seed)
        for v, seed in (("1.1.0", 8), ("1.2.0", 9))
    }


@pytest.fixture
def start_fleet(
    broker: LocalBroker, reference_bundle_path: Path, tmp_path: Path
) -> Iterator[FleetFactory]:
    """Start simulated fleets on 1.0.0 with a fresh prefix; each is stopped at the end."""
    fleets: list[SimulatedFleet] = []

    def start(**options: Any) -> SimulatedFleet:
        options.setdefault("count", COUNT)
        options.setdefault("prefix", unique("sim"))
        options.setdefault("cache_dir", tmp_path / "cache")
        options.setdefault("file_url_root", tmp_path)
        fleet = SimulatedFleet(broker.url, reference_bundle_path, **options)
        fleets.append(fleet)
        fleet.start(timeout_s=20)
        return fleet

    yield start
    for fleet in fleets:
        fleet.stop()


def ours(fleet: SimulatedFleet) -> Callable[[Received], bool]:
    """Messages from this fleet's nodes (the session broker keeps other tests' retained ones)."""
    ids = set(fleet.node_ids)
    return lambda m: m.topic.split("/")[2] in ids


def latest(probe: Probe, fleet: SimulatedFleet, kind: str) -> dict[str, dict[str, Any]]:
    """The last message of `kind` (status, model, telemetry) per node of `fleet`."""
    found: dict[str, dict[str, Any]] = {}
    for message in probe.on(f"fleet/nodes/+/{kind}"):
        if ours(fleet)(message):
            found[message.topic.split("/")[2]] = message.json()
    return found


def wait_all(
    probe: Probe, fleet: SimulatedFleet, kind: str, where: Callable[[dict[str, Any]], bool],
    nodes: list[str] | None = None, timeout: float = 15,
) -> None:  # fmt: skip
    """Block until the last `kind` message of every node in `nodes` (default: all) matches."""
    wanted = set(nodes or fleet.node_ids)
    deadline = time.monotonic() + timeout
    while missing := wanted - {n for n, b in latest(probe, fleet, kind).items() if where(b)}:
        if time.monotonic() > deadline:
            pytest.fail(f"after {timeout} s, {len(missing)} nodes lack a matching {kind} message")
        time.sleep(0.05)


def active(version: str) -> Callable[[dict[str, Any]], bool]:
    return lambda s: s["state"] == "active" and s["active"]["version"] == version


def set_group(probe: Probe, group: str, desired: DesiredModel | None) -> None:
    payload = encode(desired) if desired is not None else b""
    probe.publish(desired_topic("group", group), payload, retain=True)


def count_calls(monkeypatch: pytest.MonkeyPatch, owner: object, name: str) -> list[object]:
    """Record every call of `owner.name` (the original still runs)."""
    calls: list[object] = []
    original = getattr(owner, name)

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counting)
    return calls


def test_nodes_come_online_with_group_births_and_telemetry(
    broker: LocalBroker, start_fleet: FleetFactory, probe: Probe
) -> None:
    prefix = unique("sim")
    fleet = start_fleet(groups=2, telemetry_interval_s=0.5, prefix=prefix, site="farm-x")
    assert fleet.node_ids[:2] == [f"{prefix}-0000", f"{prefix}-0001"]
    assert fleet.groups == [f"{prefix}-g0", f"{prefix}-g1"]
    probe.subscribe("fleet/nodes/+/status", "fleet/nodes/+/model", "fleet/nodes/+/telemetry")
    wait_all(probe, fleet, "status", lambda s: s["state"] == "online")
    late = Probe(broker.url).subscribe("fleet/nodes/+/status")  # births are retained
    wait_all(late, fleet, "status", lambda s: s["state"] == "online")
    assert all(m.retain for m in late.on("fleet/nodes/+/status") if ours(fleet)(m))
    late.close()
    status = latest(probe, fleet, "status")
    assert len({s["instance"] for s in status.values()}) == COUNT
    for index, node_id in enumerate(fleet.node_ids):
        body = status[node_id]
        assert body["group"] == fleet.groups[index % 2]
        assert body["site"] == "farm-x"
        assert (body["backend"], body["model"]["version"]) == ("onnx", "1.0.0")
        assert body["backend_reason"] == SIMULATED
    wait_all(probe, fleet, "model", active("1.0.0"))
    wait_all(probe, fleet, "telemetry", lambda t: t["windows_done"] >= 1)
    for body in latest(probe, fleet, "telemetry").values():
        telemetry = Telemetry.model_validate(body)  # one golden window per interval, measured
        assert telemetry.latency_ms.count == 1
        assert telemetry.latency_ms.p50 is not None
        assert telemetry.windows_per_s > 0
        assert telemetry.model is not None
        assert telemetry.model.version == "1.0.0"
    assert fleet.versions() == {"1.0.0": COUNT}


def test_group_desired_state_rolls_every_node_to_1_1_0(
    broker: LocalBroker, start_fleet: FleetFactory, probe: Probe, versions: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    downloads = count_calls(monkeypatch, fetch._ArtifactCollector, "collect")
    loads = count_calls(monkeypatch, sim, "load_model")
    fleet = start_fleet(groups=2)
    probe.subscribe("fleet/nodes/+/model")
    publish_bundle(versions["1.1.0"], broker.url, chunk_size=16 * 1024)
    desired = desired_for(versions["1.1.0"])
    first = fleet.node_ids[0::2]  # group g0
    set_group(probe, fleet.groups[0], desired)
    wait_all(probe, fleet, "model", active("1.1.0"), nodes=first)
    assert fleet.versions() == {"1.1.0": COUNT // 2, "1.0.0": COUNT // 2}
    set_group(probe, fleet.groups[1], desired)
    wait_all(probe, fleet, "model", active("1.1.0"))
    assert fleet.versions() == {"1.1.0": COUNT}
    for state in latest(probe, fleet, "model").values():
        assert state["previous"]["version"] == "1.0.0"
        assert state["active_sha256"] == desired.bundle_sha256
    steps = [m.json()["state"] for m in probe.on(topics.node_model(fleet.node_ids[0]))]
    assert steps[-4:] == ["downloading", "verifying", "warming", "active"]
    assert len(downloads) == 1  # one node fetched the chunks, the others found it in the cache
    assert len(loads) == 2  # 1.0.0 and 1.1.0 each opened and golden-checked once
    for group in fleet.groups:
        set_group(probe, group, None)


def test_bad_hash_is_refused_by_every_node_and_the_old_version_serves(
    broker: LocalBroker, start_fleet: FleetFactory, probe: Probe, versions: dict[str, Path]
) -> None:
    fleet = start_fleet()
    probe.subscribe("fleet/nodes/+/model", "fleet/nodes/+/errors")
    publish_bundle(versions["1.1.0"], broker.url)
    wrong = desired_for(versions["1.1.0"]).model_copy(update={"bundle_sha256": "0" * 64})
    set_group(probe, fleet.groups[0], wrong)
    because = "not the bundle the desired state names"

    def refused(state: dict[str, Any]) -> bool:
        return state["state"] == "failed" and because in (state["last_error"] or "")

    wait_all(probe, fleet, "model", refused)
    assert all(s["active"]["version"] == "1.0.0" for s in latest(probe, fleet, "model").values())
    wait_all(probe, fleet, "errors", lambda r: r["kind"] == "model" and because in r["reason"])
    assert fleet.versions() == {"1.0.0": COUNT}
    set_group(probe, fleet.groups[0], None)


def test_golden_mismatch_is_refused_by_every_node_after_one_check(
    start_fleet: FleetFactory, probe: Probe, versions: dict[str, Path], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    bundle, other = read_bundle(versions["1.1.0"]), read_bundle(versions["1.2.0"])
    files = {**bundle.files, "model.onnx": other.files["model.onnx"]}  # goldens of 1.1.0
    out = tmp_path / "golden.tar"
    write_bundle(out, bundle.manifest.model_copy(update={"files": file_entries(files)}), files)
    fleet = start_fleet()
    loads = count_calls(monkeypatch, sim, "load_model")
    probe.subscribe("fleet/nodes/+/model")
    set_group(probe, fleet.groups[0], desired_for(out, url=out.as_uri()))
    wait_all(probe, fleet, "model", lambda s: "golden check" in (s["last_error"] or ""))
    assert len(loads) == 1
    assert fleet.versions() == {"1.0.0": COUNT}
    set_group(probe, fleet.groups[0], None)


def test_stop_publishes_stopped_and_no_will(start_fleet: FleetFactory, probe: Probe) -> None:
    fleet = start_fleet()
    probe.subscribe("fleet/nodes/+/status")
    wait_all(probe, fleet, "status", lambda s: s["state"] == "online")
    instances = {n: s["instance"] for n, s in latest(probe, fleet, "status").items()}
    fleet.stop()
    fleet.stop()  # idempotent
    wait_all(probe, fleet, "status", lambda s: s["state"] == "stopped")
    final = latest(probe, fleet, "status")
    assert {n: s["instance"] for n, s in final.items()} == instances
    assert not any(m.json()["state"] == "offline" for m in probe.on("fleet/nodes/+/status")
                   if ours(fleet)(m))  # fmt: skip


def test_simulate_nodes_runs_for_a_duration(
    broker: LocalBroker, reference_bundle_path: Path, probe: Probe, tmp_path: Path
) -> None:
    prefix = unique("sim")
    progress: list[tuple[int, int]] = []
    code = simulate_nodes(
        broker.url,
        reference_bundle_path,
        3,
        prefix=prefix,
        groups=2,
        duration=0.3,
        progress=lambda done, total: progress.append((done, total)),
    )
    assert code == 0
    assert progress[-1] == (3, 3)
    probe.subscribe(*(topics.node_status(f"{prefix}-{i:04d}") for i in range(3)))
    stopped = probe.wait_for("fleet/nodes/+/status", 3, where=lambda m: m.retain)
    assert {m.json()["state"] for m in stopped} == {"stopped"}


def test_start_times_out_without_a_broker_and_stops_cleanly(reference_bundle_path: Path) -> None:
    fleet = SimulatedFleet(f"mqtt://127.0.0.1:{free_port()}", reference_bundle_path, count=2)
    with pytest.raises(TimeoutError, match="0/2 nodes connected"):
        fleet.start(timeout_s=1)
    fleet.stop()


def test_nodes_reconnect_and_announce_again_after_a_broker_restart(
    reference_bundle_path: Path, tmp_path: Path
) -> None:
    own = LocalBroker("mosquitto").start()
    port = own.port
    fleet = SimulatedFleet(own.url, reference_bundle_path, count=5, cache_dir=tmp_path / "c")
    try:
        fleet.start(timeout_s=10)
        own.stop()
        wait_until(lambda: not any(n.session.is_connected for n in fleet._nodes), 5)
        own = LocalBroker("mosquitto", port=port).start()  # empty: no retained births
        probe = Probe(own.url).subscribe("fleet/nodes/+/status")
        wait_all(probe, fleet, "status", lambda s: s["state"] == "online")
        assert {n.session.counters.connects for n in fleet._nodes} == {2}
        probe.close()
    finally:
        fleet.stop()
        own.stop()


def simulator(broker_url: str, bundle: Path, prefix: str, *extra: str) -> subprocess.Popen[bytes]:
    """`imu-fleet simulate nodes` as an operator runs it, in its own process."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fleet.cli",
            "simulate",
            "nodes",
            "--count",
            "10",
            "--bundle",
            str(bundle),
            "--prefix",
            prefix,
            "--broker",
            broker_url,
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_simulate_nodes_stops_cleanly_on_a_signal(
    broker: LocalBroker, reference_bundle_path: Path, sig: int
) -> None:
    prefix = unique("sig")
    probe = Probe(broker.url).subscribe(f"fleet/nodes/{prefix}-0009/status")
    process = simulator(broker.url, reference_bundle_path, prefix)
    try:
        probe.wait_for(
            "fleet/nodes/+/status", timeout=60, where=lambda m: m.json()["state"] == "online"
        )
        process.send_signal(sig)
        output, _ = process.communicate(timeout=60)  # bounded: the fixture kills it otherwise
        assert process.returncode == 0, output.decode()
        probe.wait_for("fleet/nodes/+/status", where=lambda m: m.json()["state"] == "stopped")
    finally:
        stop_process(process, signal.SIGKILL, 10)
        probe.close()


def test_simulate_nodes_gives_up_on_a_broker_that_stays_gone(
    reference_bundle_path: Path,
) -> None:
    own = LocalBroker("mosquitto").start()
    prefix = unique("gone")
    probe = Probe(own.url).subscribe(f"fleet/nodes/{prefix}-0009/status")
    process = simulator(own.url, reference_bundle_path, prefix, "--give-up-after", "2")
    try:
        probe.wait_for(
            "fleet/nodes/+/status", timeout=60, where=lambda m: m.json()["state"] == "online"
        )
        probe.close()
        own.stop()
        output, _ = process.communicate(timeout=90)  # it exits by itself
        assert process.returncode == 1, output.decode()
        assert b"giving up" in output
    finally:
        stop_process(process, signal.SIGKILL, 10)
        own.stop()
