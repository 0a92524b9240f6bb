"""Rollouts over real nodes: waves, failure budget, rollback, resuming after the controller dies."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.bundle import file_entries, read_bundle, write_bundle
from fleet.bundles.reference import build_reference_bundle
from fleet.distribution import publish_bundle
from fleet.rollout.controller import Controller, RolloutError, plan_waves
from fleet.rollout.records import newer, superseded
from helpers.mqtt import Probe
from helpers.nodes import NodeFactory
from helpers.waiting import unique, wait_until
from node.app import NodeApp
from node.tools.local_broker import LocalBroker
from schemas import topics
from schemas.codec import encode
from schemas.control import DesiredModel, NodeOutcome, NodeRolloutState, RolloutRecord, RolloutState
from schemas.messages import ModelLifecycle, ModelRef, NodeModelState, NodeState, NodeStatus

ONNX_ONLY = pytest.mark.parametrize("backend", ["onnx"], indirect=True)


def test_plan_waves() -> None:
    nodes = [f"n{i:02d}" for i in range(20)]
    waves = plan_waves(nodes, 1, [10, 50, 100])
    assert waves[0] == ["n00"]
    assert [len(w) for w in waves] == [1, 1, 8, 10]
    assert sorted(n for w in waves for n in w) == nodes
    assert plan_waves(nodes[:3], 5, [50]) == [nodes[:3]]
    assert plan_waves(nodes[:4], 0, [50]) == [nodes[:2], nodes[2:4]]


def a_record(epoch: int, controller: str | None, updated_at: float) -> RolloutRecord:
    desired = DesiredModel(name="m", version="1.0.0", bundle_sha256="0" * 64, bundle_size=1,
                           issued_at=1.0)  # fmt: skip
    return RolloutRecord(rollout_id="r", desired=desired, waves=[["n"]], max_failures=0,
                         wave_timeout_s=1, nodes={"n": NodeOutcome(wave=0)}, created_at=1.0,
                         updated_at=updated_at, epoch=epoch, controller=controller)  # fmt: skip


def test_which_write_of_a_record_wins() -> None:
    a0, a1 = a_record(0, "ctl-a", 10.0), a_record(0, "ctl-a", 11.0)
    b1 = a_record(1, "ctl-b", 5.0)  # a take-over wins even with an older clock
    assert newer(a1, a0)
    assert not newer(a0, a1)  # an echo of an earlier write
    assert newer(a0, a0)  # the same write again (a retained replay)
    assert newer(b1, a1)
    assert not newer(a1, b1)  # the old controller's late write
    assert superseded(b1, a1, "ctl-a")
    assert not superseded(a1, b1, "ctl-b")
    tie = a_record(1, "ctl-z", 1.0), a_record(1, "ctl-b", 2.0)
    assert superseded(*tie, "ctl-b")  # same epoch: the controller id decides


@pytest.fixture(scope="module")
def published(broker: LocalBroker, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """1.1.0 (good) and 1.3.0 (its ONNX does not reproduce its goldens), both published."""
    folder = tmp_path_factory.mktemp("published")
    good = build_reference_bundle(folder / "good.tar", version="1.1.0", seed=8)
    other = read_bundle(build_reference_bundle(folder / "other.tar", version="1.3.0", seed=9))
    base = read_bundle(build_reference_bundle(folder / "base.tar", version="1.3.0", seed=8))
    files = {**base.files, "model.onnx": other.files["model.onnx"]}
    bad = folder / "bad.tar"
    write_bundle(bad, base.manifest.model_copy(update={"files": file_entries(files)}), files)
    for path in (good, bad):
        publish_bundle(path, broker.url)
    return {"good": good, "bad": bad}


@pytest.fixture
def controller(broker: LocalBroker) -> Iterator[Controller]:
    ctl = Controller.connect(broker.url, client_id=unique("ctl"))
    yield ctl
    ctl.close()


def fleet(start_node: NodeFactory, tmp_path: Path, count: int, **settings: object) -> list[NodeApp]:
    group = unique("grp")
    return [
        start_node(group=group, cache_dir=tmp_path / f"cache{i}", **settings) for i in range(count)
    ]


def wait_known(controller: Controller, nodes: list[NodeApp], timeout: float = 10) -> None:
    """Until the controller has seen every node's birth and model state, and the retained
    manifests of the published versions."""

    def known() -> bool:
        views = [controller.view.get(n.node_id) for n in nodes]
        return all(v is not None and v.online and v.model is not None for v in views) and all(
            controller.artifact("tcn-reference", version) is not None
            for version in ("1.1.0", "1.3.0")
        )

    wait_until(known, timeout, "the controller to see every node and the published versions")


def active_versions(nodes: list[NodeApp]) -> list[str]:
    return [n.worker.pipeline.ref.version for n in nodes]


@ONNX_ONLY
def test_rollout_moves_every_wave_then_sets_the_group(
    start_node: NodeFactory, controller: Controller, published: dict[str, Path], probe: Probe,
    tmp_path: Path,
) -> None:  # fmt: skip
    nodes = fleet(start_node, tmp_path, 4)
    group = nodes[0].config.group
    wait_known(controller, nodes)
    record = controller.start("tcn-reference", "1.1.0", group=group, canary=1, waves=[50, 100],
                              wave_timeout_s=30)  # fmt: skip
    assert [len(w) for w in record.waves] == [1, 1, 2]
    final = controller.run(record)
    assert final.state is RolloutState.SUCCEEDED
    assert {o.state for o in final.nodes.values()} == {NodeRolloutState.ACTIVE}
    assert active_versions(nodes) == ["1.1.0"] * 4
    assert controller.session.wait_published(5)  # its last writes are on the broker
    probe.subscribe(topics.group_desired(group), topics.rollout(final.rollout_id))
    desired = DesiredModel.model_validate_json(
        probe.wait_for(topics.group_desired(group))[0].payload
    )
    assert desired.version == "1.1.0"
    kept = probe.wait_for(topics.rollout(final.rollout_id))[0]
    assert kept.retain
    assert kept.json()["state"] == "succeeded"
    probe.publish(topics.group_desired(group), b"", retain=True)


@ONNX_ONLY
def test_failing_canary_stops_the_rollout_and_the_fleet_stays(
    start_node: NodeFactory, controller: Controller, published: dict[str, Path], tmp_path: Path
) -> None:
    nodes = fleet(start_node, tmp_path, 3)
    wait_known(controller, nodes)
    record = controller.start("tcn-reference", "1.3.0", group=nodes[0].config.group, canary=1,
                              wave_timeout_s=30)  # fmt: skip
    final = controller.run(record)
    assert final.state is RolloutState.FAILED
    assert "golden" in (final.nodes[record.waves[0][0]].error or "") or final.reason
    moved = [n for n, o in final.nodes.items() if o.state is NodeRolloutState.ROLLED_BACK]
    assert moved == record.waves[0]  # only the canary was ever moved
    assert active_versions(nodes) == ["1.0.0"] * 3


@ONNX_ONLY
def test_a_failure_after_the_canary_rolls_moved_nodes_back(
    start_node: NodeFactory, controller: Controller, published: dict[str, Path], tmp_path: Path
) -> None:
    group = unique("grp")
    healthy = start_node(group=group, node_id=unique("a"), cache_dir=tmp_path / "a")
    refusing = start_node(group=group, node_id=unique("z"), cache_dir=tmp_path / "z",
                          max_bundle_bytes=2048)  # fmt: skip
    wait_known(controller, [healthy, refusing])
    record = controller.start("tcn-reference", "1.1.0", group=group, canary=1, waves=[100],
                              wave_timeout_s=30)  # fmt: skip
    assert record.waves == [[healthy.node_id], [refusing.node_id]]
    final = controller.run(record)
    assert final.state is RolloutState.FAILED
    wait_until(lambda: healthy.worker.pipeline.ref.version == "1.0.0", 20, "the rollback")
    assert active_versions([healthy, refusing]) == ["1.0.0", "1.0.0"]  # back where it was


@ONNX_ONLY
def test_a_restarted_controller_resumes_from_the_retained_record(
    broker: LocalBroker, start_node: NodeFactory, published: dict[str, Path], tmp_path: Path
) -> None:
    nodes = fleet(start_node, tmp_path, 3)
    first = Controller.connect(broker.url, client_id=unique("ctl-a"))
    wait_known(first, nodes)
    record = first.start("tcn-reference", "1.1.0", group=nodes[0].config.group, canary=1,
                         waves=[100], wave_timeout_s=30)  # fmt: skip
    record = first._run_wave(record)  # the canary wave, then the controller "dies"
    assert record.wave == 1
    first.session.wait_published(5)
    first.session.stop()  # gone without withdrawing its presence, as if hung

    second = Controller.connect(broker.url, client_id=unique("ctl-b"))
    wait_until(lambda: second.record(record.rollout_id) is not None)
    kept = second.record(record.rollout_id)
    assert kept is not None
    assert kept.wave == 1
    assert kept.controller == first.controller_id
    # its presence is still retained (no will on a clean disconnect): for `imu-fleet resume`
    # it looks alive until the record goes stale; here the test takes over directly
    assert second.is_driven(kept)
    final = second.take_over(kept, "resume")
    second.session.publish(topics.controller(first.controller_id), b"", retain=True)
    second.close()
    assert final.state is RolloutState.SUCCEEDED
    assert active_versions(nodes) == ["1.1.0"] * 3


def fleet_cli(broker: LocalBroker, *args: str) -> list[str]:
    return [sys.executable, "-m", "fleet.cli", *args, "--broker", broker.url]


def report_node(probe: Probe, node_id: str, group: str, version: str) -> None:
    """Retained birth and active model of a node that exists only as these two messages."""
    status = NodeStatus(state=NodeState.ONLINE, node_id=node_id, instance="stand-in",
                        ts=time.time(), group=group)  # fmt: skip
    model = NodeModelState(node_id=node_id, ts=time.time(), state=ModelLifecycle.ACTIVE,
                           active=ModelRef(name="tcn-reference", version=version))  # fmt: skip
    probe.publish(topics.node_status(node_id), encode(status), retain=True)
    probe.publish(topics.node_model(node_id), encode(model), retain=True)


@ONNX_ONLY
def test_a_killed_controller_process_is_taken_over_at_once_by_resume(
    broker: LocalBroker, start_node: NodeFactory, published: dict[str, Path], tmp_path: Path
) -> None:
    nodes = fleet(start_node, tmp_path, 2)
    group = nodes[0].config.group
    probe = Probe(broker.url).subscribe(topics.ROLLOUTS_FILTER, topics.CONTROLLERS_FILTER)
    laggard = unique("zz-laggard")  # sorts last: the last wave waits for it until we say so
    report_node(probe, laggard, group, "1.0.0")
    rollout = subprocess.Popen(
        fleet_cli(broker, "rollout", "tcn-reference", "1.1.0", "--group", group, "--canary", "1",
                  "--waves", "100", "--wave-timeout", "60", "--no-gates"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        ours = probe.wait_for(  # a cold CLI start: imports, connect, 1.5 s for retained state
            topics.ROLLOUTS_FILTER, timeout=30, where=lambda m: m.json()["group"] == group
        )
        rollout_id = ours[0].json()["rollout_id"]
        # a live controller is asked, not replaced
        asked = subprocess.run(fleet_cli(broker, "pause", rollout_id), capture_output=True,
                               timeout=30, check=False)  # fmt: skip
        assert asked.returncode == 0, asked.stderr.decode()
        assert b"asked the running controller to pause" in asked.stdout
        paused = probe.wait_for(
            topics.rollout(rollout_id), where=lambda m: m.json()["state"] == "paused"
        )[0].json()
        controller_id = paused["controller"]
        probe.wait_for(topics.controller(controller_id), where=lambda m: bool(m.payload))
        rollout.send_signal(signal.SIGKILL)
        rollout.wait(10)
    finally:
        if rollout.poll() is None:
            rollout.kill()
    # the broker fires the will at once: the presence is cleared, no heartbeat timeout needed
    probe.wait_for(topics.controller(controller_id), where=lambda m: not m.payload)
    status = subprocess.run(fleet_cli(broker, "status", rollout_id), capture_output=True,
                            timeout=30, check=False)  # fmt: skip
    assert status.returncode == 0, status.stderr.decode()
    assert f"[no live controller: imu-fleet resume {rollout_id}]" in status.stdout.decode()
    assert "paused" in status.stdout.decode()

    report_node(probe, laggard, group, "1.1.0")
    resumed = subprocess.run(fleet_cli(broker, "resume", rollout_id), capture_output=True,
                             timeout=60, check=False)  # fmt: skip
    out = resumed.stdout.decode()
    assert resumed.returncode == 0, resumed.stderr.decode() + out
    assert f"taken over from {controller_id} to resume" in out
    assert f"{rollout_id}: succeeded" in out
    assert active_versions(nodes) == ["1.1.0"] * 2
    final = probe.wait_for(
        topics.rollout(rollout_id), where=lambda m: m.json()["state"] == "succeeded"
    )[0].json()
    assert final["controller"] not in (None, controller_id)
    for topic in (topics.node_status(laggard), topics.node_model(laggard)):
        probe.publish(topic, b"", retain=True)
    probe.close()


def test_a_controller_whose_rollout_was_taken_over_stops_and_keeps_its_hands_off(
    broker: LocalBroker, published: dict[str, Path]
) -> None:
    group = unique("grp")
    probe = Probe(broker.url)
    laggards = [unique("zz-laggard") for _ in range(2)]
    for node_id in laggards:  # online, never take the new version: wave 1 waits
        report_node(probe, node_id, group, "1.0.0")
    first = Controller.connect(broker.url)
    second = Controller.connect(broker.url)
    try:
        wait_until(lambda: all(first.view.get(n) is not None for n in laggards))
        wait_until(lambda: first.artifact("tcn-reference", "1.1.0") is not None)
        record = first.start("tcn-reference", "1.1.0", group=group, canary=1, waves=[100],
                             wave_timeout_s=60)  # fmt: skip
        outcome: list[BaseException] = []

        def drive() -> None:
            try:
                first.run(record)
            except RolloutError as exc:
                outcome.append(exc)

        runner = threading.Thread(target=drive)
        runner.start()
        wait_until(lambda: second.record(record.rollout_id) is not None)
        kept = second.record(record.rollout_id)
        assert kept is not None
        assert kept.controller == first.controller_id
        taken = second.take_over(kept, "pause")  # as if the first had vanished
        assert (taken.epoch, taken.controller) == (1, second.controller_id)
        runner.join(10)
        assert not runner.is_alive()
        assert len(outcome) == 1
        assert f"taken over by {second.controller_id}" in str(outcome[0])

        def settled() -> bool:  # the first's late write replaced by the second's again
            final = second.record(record.rollout_id)
            return final is not None and (final.controller, final.epoch, final.state) == (
                second.controller_id,
                1,
                RolloutState.PAUSED,
            )

        wait_until(settled, what="the second controller's record to stay the retained one")
    finally:
        first.close()
        second.close()
        for node_id in laggards:
            for topic in (topics.node_status(node_id), topics.node_model(node_id)):
                probe.publish(topic, b"", retain=True)
        probe.close()


def test_rollout_over_a_hundred_simulated_nodes_completes(
    broker: LocalBroker, controller: Controller, published: dict[str, Path],
    reference_bundle_path: Path, tmp_path: Path,
) -> None:  # fmt: skip
    from fleet.simulate.nodes import SimulatedFleet

    prefix = unique("sim")
    fleet_ = SimulatedFleet(broker.url, reference_bundle_path, count=100, prefix=prefix,
                            cache_dir=tmp_path / "cache", telemetry_interval_s=2.0)  # fmt: skip
    try:
        fleet_.start()
        group = f"{prefix}-g0"

        def seen() -> bool:
            views = [controller.view.get(n) for n in fleet_.node_ids]
            return all(v is not None and v.online and v.model is not None for v in views)

        wait_until(seen, 30, "the controller to see 100 simulated nodes")
        wait_until(lambda: controller.artifact("tcn-reference", "1.1.0") is not None)
        record = controller.start("tcn-reference", "1.1.0", group=group, canary=1,
                                  waves=[10, 50, 100], wave_timeout_s=60)  # fmt: skip
        assert [len(w) for w in record.waves] == [1, 9, 40, 50]
        final = controller.run(record)
        assert final.state is RolloutState.SUCCEEDED
        assert fleet_.versions() == {"1.1.0": 100}
    finally:
        fleet_.stop()


@ONNX_ONLY
def test_pause_holds_the_rollout_and_resume_finishes_it(
    start_node: NodeFactory, controller: Controller, published: dict[str, Path], tmp_path: Path
) -> None:
    import threading

    from fleet.rollout.controller import send_command

    nodes = fleet(start_node, tmp_path, 2)
    wait_known(controller, nodes)
    record = controller.start("tcn-reference", "1.1.0", group=nodes[0].config.group, canary=1,
                              waves=[100], wave_timeout_s=30)  # fmt: skip
    send_command(controller.session, record, "pause")

    def told() -> bool:
        seen = controller.record(record.rollout_id)
        return seen is not None and seen.command == "pause"

    wait_until(told, what="the pause command on the retained record")
    outcome: list[object] = []
    runner = threading.Thread(target=lambda: outcome.append(controller.run(record)))
    runner.start()
    time.sleep(1.0)  # long enough for a wave to start, were the pause not obeyed
    assert runner.is_alive()
    paused = controller.record(record.rollout_id)
    assert paused is not None
    assert paused.state is RolloutState.PAUSED
    assert active_versions(nodes) == ["1.0.0", "1.0.0"]  # nothing moved while paused
    send_command(controller.session, paused, "resume")
    runner.join(30)
    assert not runner.is_alive()
    final = outcome[0]
    assert final.state is RolloutState.SUCCEEDED  # type: ignore[attr-defined]
    assert active_versions(nodes) == ["1.1.0", "1.1.0"]


@ONNX_ONLY
def test_a_rollback_after_success_restores_the_groups_desired_state_so_unpin_sticks(
    start_node: NodeFactory,
    controller: Controller,
    published: dict[str, Path],
    reference_bundle_path: Path,
    probe: Probe,
    tmp_path: Path,
) -> None:
    """The operator's journey of the report: rollout 1.1.0 succeeds, `rollback` moves every
    node back, and the group's desired state still named 1.1.0, so a node added later (or an
    `unpin`) went to the bad version. Now the rollback puts back what the group held before."""
    from fleet.desired import desired_for, scoped

    nodes = fleet(start_node, tmp_path, 2)
    group = nodes[0].config.group
    before = scoped(desired_for(reference_bundle_path), "group", group)  # the group on 1.0.0
    probe.subscribe(topics.group_desired(group))
    probe.publish(topics.group_desired(group), encode(before), retain=True)
    wait_known(controller, nodes)
    wait_until(lambda: controller.desired.current(topics.group_desired(group)) is not None)
    record = controller.start("tcn-reference", "1.1.0", group=group, canary=1, waves=[100],
                              wave_timeout_s=30)  # fmt: skip
    final = controller.run(record)
    assert final.state is RolloutState.SUCCEEDED
    assert active_versions(nodes) == ["1.1.0"] * 2
    rolled = controller.take_over(final, "rollback")  # `imu-fleet rollback ID`
    assert "the group desired state is 1.0.0 again" in (rolled.reason or "") or rolled.state
    wait_until(lambda: active_versions(nodes) == ["1.0.0"] * 2, 30, "the rollback")
    restored = [m for m in probe.on(topics.group_desired(group)) if m.payload]
    assert DesiredModel.model_validate_json(restored[-1].payload).version == "1.0.0"
    controller.unpin([n.node_id for n in nodes])  # the runbook's next step
    time.sleep(2.0)  # long enough for a node to start moving, were it told to
    assert active_versions(nodes) == ["1.0.0"] * 2  # they follow the group: 1.0.0
    probe.publish(topics.group_desired(group), b"", retain=True)
