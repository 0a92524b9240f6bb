"""Rollouts an operator can trust: health-gated waves, an honest rollback, visible pins, and a
controller service that finishes a rollout when its controller dies.

Simulated nodes (fleet/simulate/nodes.py) run the real model manager over real MQTT; a version
can be made to degrade once active (errors, latency, crash) as a bad model would.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.bundle import read_bundle
from common.signing import generate_keys
from fleet.bundles.builder import sign_bundle
from fleet.bundles.reference import build_reference_bundle
from fleet.desired import desired_for, publish_desired
from fleet.distribution import publish_bundle
from fleet.rollout.controller import Controller, RolloutError
from fleet.simulate.nodes import Degradation, SimulatedFleet
from helpers.mqtt import Probe
from helpers.processes import stop_process
from helpers.waiting import unique, wait_until
from node.tools.local_broker import LocalBroker
from schemas import topics
from schemas.codec import encode
from schemas.control import NodeRolloutState, RolloutGates, RolloutRecord, RolloutState
from schemas.messages import ModelLifecycle, ModelRef, NodeModelState, NodeState, NodeStatus

NEW = "1.4.0"
INTERVAL_S = 0.3
"""Telemetry interval of the simulated nodes: a soak of 1.5 s sees five reports."""


@pytest.fixture(scope="module")
def new_bundle(broker: LocalBroker, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tcn-reference 1.4.0 (a good model by its checks), published on the broker."""
    path = build_reference_bundle(tmp_path_factory.mktemp("gates") / "new.tar", version=NEW,
                                  seed=8)  # fmt: skip
    publish_bundle(path, broker.url)
    return path


@pytest.fixture
def controller(broker: LocalBroker) -> Iterator[Controller]:
    ctl = Controller.connect(broker.url, client_id=unique("ctl"))
    yield ctl
    ctl.close()


def start_fleet(
    broker: LocalBroker, bundle: Path, tmp_path: Path, count: int, **options: object
) -> SimulatedFleet:
    fleet = SimulatedFleet(broker.url, bundle, count=count, prefix=unique("sim"),
                           cache_dir=tmp_path / "cache", telemetry_interval_s=INTERVAL_S,
                           **options)  # type: ignore[arg-type]  # fmt: skip
    fleet.start()
    return fleet


def wait_seen(controller: Controller, fleet: SimulatedFleet, *, telemetry: int = 2) -> None:
    """Until the controller knows every node: online, model state, `telemetry` reports."""

    def known() -> bool:
        views = [controller.view.get(n) for n in fleet.node_ids]
        return all(
            v is not None and v.online and v.model is not None and len(v.history) >= telemetry
            for v in views
        )

    wait_until(known, timeout=60, what="the controller to see every simulated node")


def gates(soak_s: float = 1.5) -> RolloutGates:
    return RolloutGates(soak_s=soak_s)


@pytest.mark.parametrize(
    ("mode", "reason"),
    [("errors", "error rate"), ("latency", "p95"), ("crash", "restarted")],
)
def test_a_version_that_degrades_after_activation_fails_its_gate_and_is_rolled_back(
    broker: LocalBroker, reference_bundle_path: Path, new_bundle: Path, controller: Controller,
    tmp_path: Path, mode: Degradation, reason: str,
) -> None:  # fmt: skip
    fleet = start_fleet(broker, reference_bundle_path, tmp_path, 6, degrade={NEW: mode})
    try:
        wait_seen(controller, fleet)
        record = controller.start("tcn-reference", NEW, group=fleet.groups[0], canary=1,
                                  waves=[50, 100], wave_timeout_s=30, gates=gates())  # fmt: skip
        final = controller.run(record)
        canary = record.waves[0][0]
        outcome = final.nodes[canary]
        print(f"\n{mode}: {outcome.health}")
        assert final.state is RolloutState.FAILED
        assert final.failures == 1  # counted, also after the rollback
        assert outcome.failed
        assert outcome.state is NodeRolloutState.ROLLED_BACK  # it reported 1.0.0 active again
        assert outcome.health is not None
        assert not outcome.health.passed
        assert reason in (outcome.health.reason or "")
        assert all(o.state is NodeRolloutState.PENDING for n, o in final.nodes.items()
                   if n != canary)  # fmt: skip
        assert "rolled back 1 of 1 moved nodes" in (final.reason or "")
        wait_until(lambda: fleet.versions() == {"1.0.0": 6}, timeout=20, what="all on 1.0.0")
    finally:
        fleet.stop()


def test_a_healthy_version_passes_every_gate_with_the_figures_recorded(
    broker: LocalBroker, reference_bundle_path: Path, new_bundle: Path, controller: Controller,
    tmp_path: Path,
) -> None:  # fmt: skip
    fleet = start_fleet(broker, reference_bundle_path, tmp_path, 4)
    try:
        wait_seen(controller, fleet)
        record = controller.start("tcn-reference", NEW, group=fleet.groups[0], canary=1,
                                  waves=[100], wave_timeout_s=30, gates=gates())  # fmt: skip
        final = controller.run(record)
        assert final.state is RolloutState.SUCCEEDED, final.reason
        assert final.failures == 0
        for outcome in final.nodes.values():
            assert outcome.health is not None
            assert outcome.health.passed
            assert outcome.health.soak_samples >= 3
            assert outcome.health.reference_p95_ms is not None
        assert fleet.versions() == {NEW: 4}
    finally:
        fleet.stop()


def test_a_healthy_rollout_over_a_thousand_simulated_nodes_with_a_soak_succeeds(
    broker: LocalBroker, reference_bundle_path: Path, new_bundle: Path, controller: Controller,
    tmp_path: Path,
) -> None:  # fmt: skip
    """The 1,000 nodes run in their own process (`imu-fleet simulate nodes`), as a fleet runs
    apart from its controller; the controller judges every one of them."""
    prefix = unique("k")
    log = (tmp_path / "sim.log").open("wb")
    simulator = subprocess.Popen(
        fleet_cli(broker, "simulate", "nodes", "--count", "1000", "--bundle",
                  str(reference_bundle_path), "--prefix", prefix, "--telemetry-interval", "1"),
        stdout=log, stderr=log,
    )  # fmt: skip
    node_ids = [f"{prefix}-{i:04d}" for i in range(1000)]
    try:

        def ready() -> bool:
            views = [controller.view.get(n) for n in node_ids]
            return all(v is not None and v.online and v.model and len(v.history) >= 2
                       for v in views)  # fmt: skip

        wait_until(ready, timeout=90, what="1,000 simulated nodes with telemetry")
        began = time.monotonic()
        record = controller.start("tcn-reference", NEW, group=f"{prefix}-g0", canary=1,
                                  waves=[10, 50, 100], wave_timeout_s=60,
                                  gates=gates(soak_s=2.0))  # fmt: skip
        final = controller.run(record)
        took = time.monotonic() - began
        judged = [o.health for o in final.nodes.values() if o.health is not None]
        failed = [h.reason for h in judged if not h.passed]
        print(f"\n1,000 nodes, waves {[len(w) for w in record.waves]}, soak 2 s: {took:.1f} s, "
              f"{len(judged)} judged, {len(failed)} failed {failed[:3]}")  # fmt: skip
        assert final.state is RolloutState.SUCCEEDED, final.reason
        assert len(judged) == 1000
        running = {v.model.active.version for n in node_ids
                   if (v := controller.view.get(n)) and v.model and v.model.active}  # fmt: skip
        assert running == {NEW}  # the time it took is a figure of bench.rollout, not a test
    finally:
        stop_process(simulator, signal.SIGINT, 60)
        log.close()


def fleet_cli(broker: LocalBroker, *args: str) -> list[str]:
    return [sys.executable, "-m", "fleet.cli", *args, "--broker", broker.url]


def test_a_killed_controller_service_hands_the_rollout_to_another_with_no_command(
    broker: LocalBroker, reference_bundle_path: Path, new_bundle: Path, controller: Controller,
    tmp_path: Path,
) -> None:  # fmt: skip
    fleet = start_fleet(broker, reference_bundle_path, tmp_path, 8)
    names = [unique("svc-a"), unique("svc-b")]
    logs = [(tmp_path / f"{name}.log").open("wb") for name in names]
    services = [
        subprocess.Popen(fleet_cli(broker, "controller", "--name", name, "--listen",
                                   "127.0.0.1:0", "--poll", "0.3"), stdout=log, stderr=log)
        for name, log in zip(names, logs, strict=True)
    ]  # fmt: skip
    probe = Probe(broker.url).subscribe(topics.ROLLOUTS_FILTER)
    try:
        wait_seen(controller, fleet)
        record = controller.start("tcn-reference", NEW, group=fleet.groups[0], canary=1,
                                  waves=[25, 50, 75, 100], wave_timeout_s=30,
                                  gates=gates(1.0))  # fmt: skip
        controller.close()  # as `imu-fleet rollout --detach` does: its presence goes
        rollout = topics.rollout(record.rollout_id)
        driving = probe.wait_for(rollout, timeout=20, where=lambda m: "controller-" in str(
            m.json().get("controller")) and m.json()["wave"] >= 1)[-1].json()  # fmt: skip
        first = driving["controller"]
        victim = next(s for s, n in zip(services, names, strict=True) if n in first)
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        done = probe.wait_for(rollout, timeout=60, where=lambda m: m.json()["state"] == "succeeded")
        final = done[-1].json()
        print(f"\ntaken over: {first} -> {final['controller']} at wave {driving['wave'] + 1}")
        assert final["controller"] not in (None, first)
        assert final["command"] in (None, "resume")  # no operator command: its own take-over
        assert final["epoch"] >= 2  # taken over twice: from the planner, then from the victim
        assert fleet.versions() == {NEW: 8}
    finally:
        for service in services:
            if service.poll() is None:
                stop_process(service, signal.SIGTERM, 20)
        for log in logs:
            log.close()
        probe.close()
        fleet.stop()


SIGNED = "1.6.0"


def signed_site(broker: LocalBroker, reference: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A fleet key, the reference bundle signed with it (what the nodes start on), and a
    signed 1.6.0 published on the broker."""
    keys = tmp_path / "keys"
    generate_keys(keys)
    start = sign_bundle(read_bundle(reference), keys / "fleet.key", tmp_path / "start.tar")
    new = build_reference_bundle(tmp_path / "signed.tar", version=SIGNED, seed=8)
    sign_bundle(read_bundle(new), keys / "fleet.key", new)
    publish_bundle(new, broker.url, sign_key=keys / "fleet.key")  # what a keyed controller takes
    assert start.manifest.signature is not None
    return keys, tmp_path / "start.tar"


def stand_in(probe: Probe, node_id: str, group: str, version: str) -> None:
    """A node that exists only as retained messages, requires signatures, and never moves."""
    status = NodeStatus(state=NodeState.ONLINE, node_id=node_id, instance="stand-in",
                        ts=time.time(), group=group)  # fmt: skip
    model = NodeModelState(node_id=node_id, ts=time.time(), state=ModelLifecycle.ACTIVE,
                           active=ModelRef(name="tcn-reference", version=version),
                           signatures_required=True)  # fmt: skip
    probe.publish(topics.node_status(node_id), encode(status), retain=True)
    probe.publish(topics.node_model(node_id), encode(model), retain=True)


def test_a_rollback_without_the_key_is_refused_up_front_and_with_it_names_who_did_not_confirm(
    broker: LocalBroker, reference_bundle_path: Path, tmp_path: Path,
) -> None:  # fmt: skip
    keys, start = signed_site(broker, reference_bundle_path, tmp_path)
    fleet = start_fleet(broker, start, tmp_path, 3, trust_key=keys / "fleet.pub")
    probe = Probe(broker.url)
    stuck = unique("zz-stuck")
    try:
        stand_in(probe, stuck, fleet.groups[0], SIGNED)  # reports the new version, never goes back
        signer = Controller.connect(broker.url, client_id=unique("ctl"),
                                    sign_key=keys / "fleet.key")  # fmt: skip
        try:
            wait_seen(signer, fleet)
            wait_until(lambda: signer.view.get(stuck) is not None, what="the stand-in")
            record = signer.start("tcn-reference", SIGNED, group=fleet.groups[0], canary=1,
                                  waves=[100], wave_timeout_s=5)  # fmt: skip
            final = signer.run(record)
        finally:
            signer.close()
        assert final.state is RolloutState.SUCCEEDED
        assert fleet.versions() == {SIGNED: 3}

        refused = subprocess.run(fleet_cli(broker, "rollback", record.rollout_id),
                                 capture_output=True, timeout=60, check=False)  # fmt: skip
        assert refused.returncode == 1
        assert b"without signing" in refused.stderr
        assert b"--sign-key" in refused.stderr
        time.sleep(0.5)
        assert fleet.versions() == {SIGNED: 3}  # nothing was sent

        done = subprocess.run(
            fleet_cli(broker, "rollback", record.rollout_id, "--sign-key", str(keys / "fleet.key")),
            capture_output=True, timeout=60, check=False,
        )  # fmt: skip
        out = done.stdout.decode()
        print(out)
        assert done.returncode == 1, out  # one node did not confirm
        assert "rolled back (each node reported its previous model active): 3" in out
        assert f"NOT confirmed (1), still asked to go back: {stuck}" in out
        wait_until(lambda: fleet.versions() == {"1.0.0": 3}, timeout=20, what="all on 1.0.0")
        status = subprocess.run(fleet_cli(broker, "status", record.rollout_id, "--json"),
                                capture_output=True, timeout=60, check=True)  # fmt: skip
        (kept,) = json.loads(status.stdout)
        assert kept["nodes"][stuck]["state"] == "rolling_back"
        assert sum(o["state"] == "rolled_back" for o in kept["nodes"].values()) == 3
    finally:
        for topic in (topics.node_status(stuck), topics.node_model(stuck),
                      topics.node_desired(stuck)):  # fmt: skip
            probe.publish(topic, b"", retain=True)
        probe.close()
        fleet.stop()


def test_pins_are_listed_and_cleared(
    broker: LocalBroker, reference_bundle_path: Path, new_bundle: Path, controller: Controller,
    tmp_path: Path,
) -> None:  # fmt: skip
    fleet = start_fleet(broker, reference_bundle_path, tmp_path, 3)
    try:
        wait_seen(controller, fleet)
        pinned = fleet.node_ids[1]
        publish_desired(controller.session, desired_for(new_bundle), "node", pinned)

        def pin_seen() -> bool:
            view = controller.view.get(pinned)
            following = view.model.following if view and view.model else None
            return following is not None and following.scope == "node"

        wait_until(pin_seen, timeout=20, what="the node to follow its pin")
        assert set(controller.pins(fleet.groups[0])) == {pinned}
        listed = subprocess.run(fleet_cli(broker, "nodes", "--json", "--wait", "0.5"),
                                capture_output=True, timeout=60, check=True)  # fmt: skip
        rows = {row["node_id"]: row for row in json.loads(listed.stdout)}
        assert rows[pinned]["pinned"]
        assert rows[pinned]["follows"]["version"] == NEW
        assert not rows[fleet.node_ids[0]]["pinned"]
        table = subprocess.run(fleet_cli(broker, "nodes", "--wait", "0.5"), capture_output=True,
                               timeout=60, check=True).stdout.decode()  # fmt: skip
        (row,) = [line for line in table.splitlines() if line.startswith(pinned)]
        assert f"node: {NEW} unsigned, set " in row  # what it follows, who set it, when
        assert "s ago" in row

        cleared = subprocess.run(fleet_cli(broker, "unpin", "--all", "--group", fleet.groups[0]),
                                 capture_output=True, timeout=60, check=True)  # fmt: skip
        assert pinned in cleared.stdout.decode()
        wait_until(lambda: not pin_seen(), timeout=20, what="the pin to be gone")
        assert controller.pins(fleet.groups[0]) == {}
    finally:
        fleet.stop()


def test_a_rollout_refuses_to_start_unsigned_towards_nodes_that_require_signatures(
    broker: LocalBroker, reference_bundle_path: Path, new_bundle: Path, controller: Controller,
    tmp_path: Path,
) -> None:  # fmt: skip
    keys, start = signed_site(broker, reference_bundle_path, tmp_path)
    fleet = start_fleet(broker, start, tmp_path, 2, trust_key=keys / "fleet.pub")
    try:
        wait_seen(controller, fleet)
        with pytest.raises(RolloutError, match="without signing"):
            controller.start("tcn-reference", SIGNED, group=fleet.groups[0])
        assert not [r for r in controller.records() if r.group == fleet.groups[0]]
    finally:
        fleet.stop()


def test_status_counts_the_failures_of_a_failed_rollout(
    broker: LocalBroker, reference_bundle_path: Path, new_bundle: Path, controller: Controller,
    tmp_path: Path,
) -> None:  # fmt: skip
    fleet = start_fleet(broker, reference_bundle_path, tmp_path, 3, degrade={NEW: "errors"})
    try:
        wait_seen(controller, fleet)
        record = controller.start("tcn-reference", NEW, group=fleet.groups[0], canary=1,
                                  waves=[100], wave_timeout_s=30, gates=gates())  # fmt: skip
        final = controller.run(record)
        assert final.state is RolloutState.FAILED
        command = fleet_cli(broker, "status", record.rollout_id)
        shown = subprocess.run(command, capture_output=True, timeout=60, check=True).stdout.decode()
        print(shown)
        assert "failures 1/0 allowed" in shown
        assert "gates failed" in shown
        assert "errors/window 1.000" in shown
        listed = subprocess.run(fleet_cli(broker, "status", record.rollout_id, "--json"),
                                capture_output=True, timeout=60, check=True)  # fmt: skip
        (row,) = json.loads(listed.stdout)
        assert row["failures"] == 1
        (no_site,) = row["sites"].values()  # these nodes name no site: one group, no link
        assert no_site["link"] is None
        assert sum(no_site["nodes"].values()) == len(row["nodes"])
        summary = {"failures", "sites"}  # what --json adds to the record
        record_of_row = RolloutRecord.model_validate(
            {k: v for k, v in row.items() if k not in summary}
        )
        assert record_of_row.failures == 1
    finally:
        fleet.stop()


@pytest.mark.parametrize(
    ("state", "command", "expected"),
    [
        (RolloutState.RUNNING, None, "resume"),
        (RolloutState.RUNNING, "rollback", "rollback"),  # asked, never carried out: carried out
        (RolloutState.RUNNING, "abort", "abort"),
        (RolloutState.RUNNING, "pause", "pause"),
        (RolloutState.PAUSED, None, "pause"),
        (RolloutState.PAUSED, "pause", "pause"),
        (RolloutState.PAUSED, "resume", "resume"),
        (RolloutState.PAUSED, "rollback", "rollback"),
    ],
)
def test_a_service_taking_over_carries_out_what_the_operator_asked(
    state: RolloutState, command: str | None, expected: str
) -> None:
    from fleet.rollout.service import take_over_command
    from schemas.control import DesiredModel, NodeOutcome

    desired = DesiredModel(name="m", version="1.0.0", bundle_sha256="0" * 64, bundle_size=1,
                           issued_at=1.0)  # fmt: skip
    record = RolloutRecord(rollout_id="r", desired=desired, waves=[["n"]], max_failures=0,
                           wave_timeout_s=1, nodes={"n": NodeOutcome(wave=0)}, created_at=1.0,
                           updated_at=1.0, state=state, command=command)  # fmt: skip
    assert take_over_command(record) == expected


def test_the_controller_service_serves_metrics_behind_its_token(broker: LocalBroker) -> None:
    import urllib.error
    import urllib.request

    from fleet.rollout.service import ControllerService, ServiceHttp

    service = ControllerService(broker.url, name=unique("m"))
    try:
        with pytest.raises(ValueError, match="--token-file"):
            ServiceHttp("0.0.0.0:0", service, None)  # beyond loopback without a token
        http = ServiceHttp("127.0.0.1:0", service, "s3cret")
        http.start()
        host, port = http.address
        base = f"http://{host}:{port}"
        try:
            with urllib.request.urlopen(f"{base}/healthz", timeout=5) as answer:
                assert json.loads(answer.read())["broker_connected"] is True
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(f"{base}/metrics", timeout=5)
            assert refused.value.code == 401
            request = urllib.request.Request(
                f"{base}/metrics", headers={"Authorization": "Bearer s3cret"}
            )
            with urllib.request.urlopen(request, timeout=5) as answer:
                text = answer.read().decode()
            assert "imu_fleet_controller_takeovers_total 0.0" in text
            assert 'imu_fleet_controller_rollouts_finished_total{state="succeeded"}' in text
        finally:
            http.stop()
    finally:
        service.close()


def test_nodes_recorded_as_moving_but_never_told_are_told_by_the_next_controller(
    broker: LocalBroker, reference_bundle_path: Path, new_bundle: Path, tmp_path: Path
) -> None:
    """A controller dies after writing the wave's nodes as updating, before publishing their
    desired states: the controller that takes over tells them, and the rollout finishes."""
    fleet = start_fleet(broker, reference_bundle_path, tmp_path, 3)
    first = Controller.connect(broker.url, client_id=unique("ctl-a"))
    try:
        wait_seen(first, fleet)
        record = first.start("tcn-reference", NEW, group=fleet.groups[0], canary=1,
                             waves=[100], wave_timeout_s=20)  # fmt: skip
        record = first._save(first._mark_moving(record, record.waves[0]), "then it died")
        first.session.wait_published(5)
    finally:
        first.close()  # its presence goes: the rollout has no live controller
    second = Controller.connect(broker.url, client_id=unique("ctl-b"))
    try:
        wait_until(lambda: second.record(record.rollout_id) is not None, what="the record")
        kept = second.record(record.rollout_id)
        assert kept is not None
        assert kept.nodes[record.waves[0][0]].state is NodeRolloutState.UPDATING
        final = second.take_over(kept, "resume")
        assert final.state is RolloutState.SUCCEEDED, final.reason
        assert fleet.versions() == {NEW: 3}
    finally:
        second.close()
        fleet.stop()


def test_an_unsigned_bundle_is_refused_at_publish_and_at_rollout_when_nodes_require_signatures(
    broker: LocalBroker, reference_bundle_path: Path, tmp_path: Path
) -> None:
    """The operator's report: `publish` said nothing and `rollout` burnt the canary on a bundle
    every node refuses. Both now refuse before anything moves, naming the command that fixes it."""
    from common.errors import BundleError

    keys, _ = signed_site(broker, reference_bundle_path, tmp_path)
    probe = Probe(broker.url)
    node_id, group = unique("strict"), unique("grp")
    stand_in(probe, node_id, group, "1.0.0")
    unsigned = build_reference_bundle(tmp_path / "unsigned.tar", version="1.7.0", seed=8)
    try:
        with pytest.raises(BundleError, match="imu-fleet bundle sign"):
            publish_bundle(unsigned, broker.url)
        # published all the same (by a tool that did not check): the rollout still refuses
        probe.publish(topics.node_status(node_id), b"", retain=True)  # nobody online: it goes
        publish_bundle(unsigned, broker.url, sign_key=keys / "fleet.key")
        stand_in(probe, node_id, group, "1.0.0")
        controller = Controller.connect(broker.url, sign_key=keys / "fleet.key")
        try:
            wait_until(lambda: controller.view.get(node_id) is not None)
            wait_until(lambda: controller.artifact("tcn-reference", "1.7.0") is not None)
            with pytest.raises(RolloutError, match=r"unsigned bundle.*imu-fleet bundle sign"):
                controller.start("tcn-reference", "1.7.0", group=group)
            assert not [r for r in controller.records() if r.group == group]
        finally:
            controller.close()
    finally:
        for topic in (topics.node_status(node_id), topics.node_model(node_id)):
            probe.publish(topic, b"", retain=True)
        probe.close()
