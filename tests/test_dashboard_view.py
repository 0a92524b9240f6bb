"""The dashboard's bounded fleet view, fed message by message (no broker)."""

from __future__ import annotations

import time

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from fleet.dashboard.metrics import DashboardCollector, metrics_registry, render
from fleet.dashboard.view import DashboardView, Limits, Reject, classify, motif_name
from schemas import topics
from schemas.codec import encode
from schemas.control import DesiredModel, NodeOutcome, NodeRolloutState, RolloutRecord, RolloutState
from schemas.messages import (
    ErrorKind,
    ErrorReport,
    LatencySummary,
    ModelLifecycle,
    ModelRef,
    MotifResult,
    NodeModelState,
    NodeState,
    NodeStatus,
    Telemetry,
)

LABELS = [
    "rest",
    "walk",
    "run",
    "turn",
    "stairs",
    "shake",
    "sit",
    "lie",
    "jump",
    "fall",
    "ride",
    "swim",
]
REF = ModelRef(name="tcn", version="1.1.0")


def status(node_id: str, state: NodeState = NodeState.ONLINE) -> bytes:
    return encode(NodeStatus(state=state, node_id=node_id, instance="i1", ts=time.time(),
                             backend="onnx", model=REF, group="line-3"))  # fmt: skip


def model_state(node_id: str, labels: list[str] | None = LABELS, ref: ModelRef = REF) -> bytes:
    return encode(NodeModelState(node_id=node_id, ts=time.time(), state=ModelLifecycle.ACTIVE,
                                 active=ref, backend="hailo", motif_labels=labels))  # fmt: skip


def telemetry(node_id: str, wps: float, p95: float = 3.5) -> bytes:
    return encode(Telemetry(
        node_id=node_id, ts=time.time(), interval_s=1.0, uptime_s=10.0, backend="hailo",
        model=REF, windows_in=10, windows_done=10, results_published=10, windows_per_s=wps,
        latency_ms=LatencySummary(count=10, p50=2.0, p95=p95, p99=4.0, max=5.0),
        batch_mean=1.0, queue_depth=2, queue_capacity=256, dropped={"queue_full": 3},
        errors={"invalid": 1}, cpu_percent=20.0, rss_mb=120.0, peak_rss_mb=130.0,
        temperature_c=51.5,
    ))  # fmt: skip


def result(sensor_id: str, node_id: str, top: int, ref: ModelRef = REF, seq: int = 0) -> bytes:
    scores = [0.02] * 12
    scores[top] = 1.0 - 0.02 * 11
    return encode(MotifResult(sensor_id=sensor_id, node_id=node_id, seq=seq, model=ref,
                              latent=[0.0] * 64, motif_scores=scores, top_motif=top,
                              latency_ms=2.0, ts=time.time()))  # fmt: skip


def rollout(
    rid: str,
    *,
    wave: int = 1,
    state: RolloutState = RolloutState.RUNNING,
    updated_at: float = 100.0,
    epoch: int = 0,
    controller: str = "ctl",
) -> bytes:
    desired = DesiredModel(name="tcn", version="1.2.0", bundle_sha256="a" * 64, bundle_size=10,
                           issued_at=1.0)  # fmt: skip
    waves = [["n0"], ["n1", "n2"], ["n3", "n4", "n5"]]
    nodes = {
        "n0": NodeOutcome(wave=0, state=NodeRolloutState.ACTIVE),
        "n1": NodeOutcome(wave=1, state=NodeRolloutState.UPDATING),
        "n2": NodeOutcome(wave=1, state=NodeRolloutState.FAILED, error="golden mismatch"),
        **{n: NodeOutcome(wave=2) for n in ("n3", "n4", "n5")},
    }
    return encode(RolloutRecord(rollout_id=rid, desired=desired, waves=waves, max_failures=1,
                                wave_timeout_s=60, state=state, wave=wave, nodes=nodes,
                                created_at=1.0, updated_at=updated_at, epoch=epoch,
                                controller=controller))  # fmt: skip


def test_classify_topics() -> None:
    assert classify("imu/s1/motifs") == ("result", "s1")
    assert classify("fleet/nodes/n1/telemetry") == ("telemetry", "n1")
    assert classify("fleet/rollouts/r1") == ("rollout", "r1")
    assert classify("fleet/nodes/n1/desired") is None
    assert classify("imu/<b>/motifs") is None  # not a valid id
    assert motif_name(None, 3) == "motif 3"
    assert motif_name(tuple(LABELS), 3) == "turn"


def test_a_node_row_gathers_status_model_telemetry_and_errors() -> None:
    view = DashboardView()
    assert view.ingest(topics.node_status("n1"), status("n1")) is None
    assert view.ingest(topics.node_model("n1"), model_state("n1")) is None
    assert view.ingest(topics.node_telemetry("n1"), telemetry("n1", 41.5)) is None
    report = ErrorReport(node_id="n1", ts=time.time(), kind=ErrorKind.INVALID, reason="x " * 500)
    assert view.ingest(topics.node_errors("n1"), encode(report)) is None
    (row,) = view.snapshot()["nodes"]
    assert row["state"] == "online"
    assert row["backend"] == "hailo"
    assert row["model"].pop("ts") > 0  # when it said so: a failed move fades after a while
    assert row["model"] == {"name": "tcn", "version": "1.1.0", "state": "active", "target": None,
                            "error": None, "labels": LABELS}  # fmt: skip
    assert [point[1:] for point in row["history"]] == [[41.5, 3.5, 0]]  # the sparkline's start
    assert (row["windows_per_s"], row["p95_ms"], row["queue_depth"]) == (41.5, 3.5, 2)
    assert row["temperature_c"] == 51.5
    assert row["dropped"] == 3
    assert row["errors"] == 1
    assert row["last_error"]["kind"] == "invalid"
    assert len(row["last_error"]["reason"]) <= Limits().text_chars  # cut to display length
    delta = view.drain()
    assert delta is not None
    assert [n["node_id"] for n in delta["nodes"]] == ["n1"]
    assert view.drain() is None  # nothing changed since


def test_results_are_named_by_the_producing_node_and_model() -> None:
    view = DashboardView()
    view.ingest(topics.node_model("n1"), model_state("n1"))
    view.ingest(topics.motifs("s1"), result("s1", "n1", 2))
    other = ModelRef(name="tcn", version="1.0.0")  # a result of the version before a swap
    view.ingest(topics.motifs("s1"), result("s1", "n1", 2, ref=other))
    view.ingest(topics.motifs("s2"), result("s2", "n9", 4))  # a node we have no state of
    sensors = {s["sensor_id"]: s for s in view.snapshot()["sensors"]}
    assert [e[4] for e in sensors["s1"]["ethogram"]] == ["run", "motif 2"]
    assert [e[4] for e in sensors["s2"]["ethogram"]] == ["stairs"]  # same model seen elsewhere
    assert sensors["s1"]["ethogram"][0][3] == 0.78


def test_old_model_states_without_labels_show_motif_numbers() -> None:
    view = DashboardView()
    view.ingest(topics.node_model("n1"), model_state("n1", labels=None))
    view.ingest(topics.motifs("s1"), result("s1", "n1", 11))
    assert view.snapshot()["sensors"][0]["ethogram"][0][4] == "motif 11"


def test_ethogram_and_sensor_caps_hold() -> None:
    view = DashboardView(Limits(max_sensors=5, ethogram_length=4))
    for i in range(20):
        view.ingest(topics.motifs(f"s{i % 7}"), result(f"s{i % 7}", "n1", i % 12, seq=i))
    snap = view.snapshot()
    assert len(snap["sensors"]) == 5
    assert all(len(s["ethogram"]) <= 4 for s in snap["sensors"])
    assert view.counts().evicted["sensor"] > 0
    assert snap["result_seq"] == 20


def test_rejects_are_counted_by_reason() -> None:
    view = DashboardView(Limits(max_payload_bytes=4096))
    assert view.ingest(topics.node_status("n1"), b"{not json") is Reject.MALFORMED
    assert view.ingest(topics.node_status("n1"), b'{"state": "online"}') is Reject.INVALID
    assert view.ingest(topics.node_status("n1"), b"x" * 5000) is Reject.OVERSIZED
    assert view.ingest(topics.node_status("n2"), status("n1")) is Reject.MISMATCH
    assert view.ingest("fleet/nodes/a b/status", status("n1")) is Reject.BAD_TOPIC
    assert view.ingest(topics.motifs("s2"), result("s1", "n1", 0)) is Reject.MISMATCH
    assert view.ingest(topics.node_telemetry("n1"), b"") is Reject.MALFORMED
    counts = view.counts().rejected
    assert counts[Reject.MALFORMED] == 2
    assert counts[Reject.INVALID] == 1
    assert counts[Reject.OVERSIZED] == 1
    assert counts[Reject.MISMATCH] == 2
    assert view.snapshot()["nodes"] == []


def test_rollout_waves_and_ordering_of_writes() -> None:
    view = DashboardView()
    assert view.ingest(topics.rollout("r1"), rollout("r1", updated_at=100)) is None
    (r,) = view.snapshot()["rollouts"]
    assert (r["wave"], r["waves_total"], r["failures"], r["state"]) == (2, 3, 1, "running")
    assert [[c["node_id"] for c in w] for w in r["waves"]] == [["n0"], ["n1", "n2"],
                                                              ["n3", "n4", "n5"]]  # fmt: skip
    assert r["waves"][1][1] == {"node_id": "n2", "state": "failed", "error": "golden mismatch"}
    # a superseded controller's late write is not shown (fleet.rollout.records.newer)
    late = rollout("r1", wave=0, updated_at=200, epoch=0, controller="ctl")
    view.ingest(topics.rollout("r1"), rollout("r1", wave=2, updated_at=150, epoch=1))
    assert view.ingest(topics.rollout("r1"), late) is Reject.STALE
    assert view.snapshot()["rollouts"][0]["wave"] == 3
    view.ingest(topics.rollout("r1"), b"")  # cleared
    assert view.snapshot()["rollouts"] == []
    assert view.drain() is not None


def test_a_rollout_timeline_records_waves_and_the_verdict_as_they_change() -> None:
    view = DashboardView()
    view.ingest(topics.rollout("r2"), rollout("r2", wave=1, updated_at=100))  # joined midway
    view.ingest(topics.rollout("r2"), rollout("r2", wave=2, updated_at=110))
    view.ingest(topics.rollout("r2"), rollout("r2", wave=3, updated_at=120,
                                              state=RolloutState.SUCCEEDED))  # fmt: skip
    view.ingest(topics.rollout("r2"), rollout("r2", wave=3, updated_at=120,
                                              state=RolloutState.SUCCEEDED))  # fmt: skip
    (r,) = view.snapshot()["rollouts"]
    assert r["timeline"] == [[100.0, "first seen running, wave 2"], [110.0, "wave 3 started"],
                             [120.0, "succeeded"]]  # fmt: skip


def test_a_full_view_keeps_running_rollouts_and_online_nodes() -> None:
    view = DashboardView(Limits(max_nodes=2, max_rollouts=2))
    view.ingest(topics.node_status("a"), status("a"))
    view.ingest(topics.node_status("b"), status("b", NodeState.OFFLINE))
    assert view.ingest(topics.node_status("c"), status("c")) is None  # b (offline) made room
    assert view.ingest(topics.node_status("d"), status("d")) is Reject.OVER_CAPACITY
    assert sorted(n["node_id"] for n in view.snapshot()["nodes"]) == ["a", "c"]
    view.ingest(topics.rollout("r1"), rollout("r1"))
    view.ingest(topics.rollout("r2"), rollout("r2", state=RolloutState.SUCCEEDED))
    view.ingest(topics.rollout("r3"), rollout("r3"))  # evicts the finished r2
    done = rollout("r4", state=RolloutState.SUCCEEDED)
    assert view.ingest(topics.rollout("r4"), done) is Reject.OVER_CAPACITY
    assert sorted(r["rollout_id"] for r in view.snapshot()["rollouts"]) == ["r1", "r3"]


def test_metrics_have_the_contract_names_and_values() -> None:
    view = DashboardView()
    view.ingest(topics.node_status("n1"), status("n1"))
    view.ingest(topics.node_model("n1"), model_state("n1"))
    view.ingest(topics.node_status("n2"), status("n2", NodeState.OFFLINE))
    view.ingest(topics.rollout("r1"), rollout("r1", updated_at=1234.5))
    view.ingest(topics.node_status("n1"), b"junk")
    text = render(metrics_registry(DashboardCollector(view, lambda: 3, lambda: True))).decode()
    for line in (
        'imu_fleet_node_online{node_id="n1"} 1.0',
        'imu_fleet_node_online{node_id="n2"} 0.0',
        'imu_fleet_node_info{backend="hailo",model_state="active",node_id="n1",version="1.1.0"} '
        "1.0",
        'imu_fleet_rollout_info{rollout_id="r1",state="running",version="1.2.0"} 1.0',
        'imu_fleet_rollout_wave{rollout_id="r1"} 2.0',
        'imu_fleet_rollout_waves{rollout_id="r1"} 3.0',
        'imu_fleet_rollout_updated_timestamp_seconds{rollout_id="r1"} 1234.5',
        'imu_fleet_rollout_failures{rollout_id="r1"} 1.0',
        'imu_fleet_dashboard_rejected_total{reason="malformed"} 1.0',
        'imu_fleet_dashboard_messages_total{kind="status"} 2.0',
        "imu_fleet_dashboard_sse_clients 3.0",
    ):
        assert line in text, line


_TOPICS = st.sampled_from(
    [
        "fleet/nodes/{}/status",
        "fleet/nodes/{}/model",
        "fleet/nodes/{}/telemetry",
        "fleet/nodes/{}/errors",
        "fleet/rollouts/{}",
        "imu/{}/motifs",
    ]
)
_IDS = st.text(st.characters(codec="utf-8"), min_size=0, max_size=80)
_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.floats(allow_nan=False)
    | st.integers(-(2**63), 2**63 - 1)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5)
    | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=20,
)  # fmt: skip


_PAYLOADS = st.one_of(_JSON.map(orjson.dumps), st.binary(max_size=300))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_TOPICS, _IDS, _PAYLOADS), max_size=40))
def test_any_stream_of_junk_leaves_the_view_bounded_and_serialisable(
    stream: list[tuple[str, str, bytes]],
) -> None:
    limits = Limits(max_nodes=3, max_sensors=3, max_rollouts=2, ethogram_length=5)
    view = DashboardView(limits)
    for pattern, ident, payload in stream:
        view.ingest(pattern.format(ident), payload)
        view.ingest(topics.motifs("s1"), result("s1", "n1", 1))  # valid traffic goes on
    sizes = view.sizes()
    assert sizes["nodes"] <= 3
    assert sizes["sensors"] <= 3
    assert sizes["rollouts"] <= 2
    assert sizes["ethogram_entries"] <= 15
    orjson.dumps(view.snapshot())
    orjson.dumps(view.drain())
    counted = sum(view.counts().rejected.values()) + sum(view.counts().messages.values())
    assert counted == 2 * len(stream)


def test_site_links_and_each_nodes_site_reach_the_page() -> None:
    view = DashboardView(Limits(max_sites=2))
    located = encode(NodeStatus(state=NodeState.ONLINE, node_id="a1", instance="i1",
                                ts=time.time(), site="farm-a"))  # fmt: skip
    assert view.ingest(topics.node_status("a1"), located) is None
    assert view.ingest(topics.site_link("farm-a"), b"1", retained=True) is None
    snapshot = view.snapshot()
    assert snapshot["sites"] == {"farm-a": True}
    assert next(n for n in snapshot["nodes"] if n["node_id"] == "a1")["site"] == "farm-a"
    view.drain()
    assert view.ingest(topics.site_link("farm-a"), b"0") is None
    assert view.drain()["sites"] == {"farm-a": False}  # type: ignore[index]
    assert view.drain() is None, "an unchanged map is not sent again"
    # only `1`, `0` or a clear; a bounded number of sites
    assert view.ingest(topics.site_link("farm-a"), b"up") is Reject.INVALID
    assert view.ingest(topics.site_link("farm-a"), b"1" * 100_000) is Reject.INVALID
    assert view.ingest(topics.site_link("farm-b"), b"1") is None
    assert view.ingest(topics.site_link("farm-c"), b"1") is Reject.OVER_CAPACITY
    assert view.ingest(topics.site_link("farm-b"), b"") is None  # retired: its slot is free
    assert view.ingest(topics.site_link("farm-c"), b"1") is None
    assert view.snapshot()["sites"] == {"farm-a": False, "farm-c": True}
    assert view.ingest("fleet/sites/farm-a/link/extra", b"1") is Reject.BAD_TOPIC
