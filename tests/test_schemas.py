"""Tests for the wire contract: topic tree, message models, bundle manifest, JSON Schema export."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from schemas import SCHEMA_VERSION, topics
from schemas.export import (
    ALL_MESSAGES,
    OPENAPI_FILE,
    openapi_json,
    schema_documents,
    topics_document,
    write_schemas,
)
from schemas.export import main as export_main
from schemas.limits import (
    CHANNEL_ORDER,
    CHANNELS,
    LATENT_DIM,
    MOTIF_COUNT,
    SENSOR_ID_PATTERN,
    WINDOW_LENGTH,
)
from schemas.manifest import Manifest
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
    SamplesMessage,
    Telemetry,
    WindowMessage,
)

ROOT = Path(__file__).resolve().parent.parent
DOCS_SCHEMAS = ROOT / "docs" / "schemas"
VALID_IDS = st.from_regex(SENSOR_ID_PATTERN, fullmatch=True)

# ---------------------------------------------------------------------------------------------
# Topics (design.md section 2)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("built", "expected"),
    [
        (topics.window("s1"), "imu/s1/window"),
        (topics.samples("s1"), "imu/s1/samples"),
        (topics.motifs("s1"), "imu/s1/motifs"),
        (topics.node_status("n1"), "fleet/nodes/n1/status"),
        (topics.node_telemetry("n1"), "fleet/nodes/n1/telemetry"),
        (topics.node_model("n1"), "fleet/nodes/n1/model"),
        (topics.node_errors("n1"), "fleet/nodes/n1/errors"),
        (topics.node_desired("n1"), "fleet/nodes/n1/desired"),
        (topics.group_desired("g1"), "fleet/groups/g1/desired"),
        (topics.artifact("tcn", "1.2.0", "manifest"), "fleet/artifacts/tcn/1.2.0/manifest"),
        (topics.artifact("tcn", "1.2.0", "chunk/3"), "fleet/artifacts/tcn/1.2.0/chunk/3"),
        (topics.rollout("r-7"), "fleet/rollouts/r-7"),
        (topics.FLEET_DESIRED, "fleet/models/desired"),
        (topics.WINDOW_FILTER, "imu/+/window"),
        (topics.SAMPLES_FILTER, "imu/+/samples"),
        (topics.MOTIFS_FILTER, "imu/+/motifs"),
    ],
)
def test_topic_builders_match_design(built: str, expected: str) -> None:
    assert built == expected


BUILDERS: dict[str, Callable[..., str]] = {
    "imu/{sensor_id}/window": topics.window,
    "imu/{sensor_id}/samples": topics.samples,
    "imu/{sensor_id}/motifs": topics.motifs,
    "fleet/nodes/{node_id}/status": topics.node_status,
    "fleet/nodes/{node_id}/telemetry": topics.node_telemetry,
    "fleet/nodes/{node_id}/model": topics.node_model,
    "fleet/nodes/{node_id}/errors": topics.node_errors,
    "fleet/nodes/{node_id}/desired": topics.node_desired,
    "fleet/groups/{group}/desired": topics.group_desired,
    "fleet/rollouts/{rollout_id}": topics.rollout,
    "fleet/controllers/{controller_id}": topics.controller,
    "fleet/sites/{site}/link": topics.site_link,
}


def test_catalogue_covers_design_and_builders() -> None:
    patterns = [spec.pattern for spec in topics.CATALOGUE]
    assert len(patterns) == len(set(patterns))
    artifacts = {
        "fleet/artifacts/{name}/{version}/manifest",
        "fleet/artifacts/{name}/{version}/chunks/{index}",
    }
    assert set(BUILDERS) | {"fleet/models/desired"} | artifacts == set(patterns)
    assert topics.artifact_manifest("m", "1.0.0") == "fleet/artifacts/m/1.0.0/manifest"
    assert topics.artifact_chunk("m", "1.0.0", 3) == "fleet/artifacts/m/1.0.0/chunks/3"
    for pattern, build in BUILDERS.items():
        assert build("ID") == pattern.split("{")[0] + "ID" + pattern.split("}")[1]
    retained = {spec.pattern for spec in topics.CATALOGUE if spec.retained}
    assert retained == {
        "fleet/nodes/{node_id}/status",
        "fleet/nodes/{node_id}/model",
        "fleet/models/desired",
        "fleet/groups/{group}/desired",
        "fleet/nodes/{node_id}/desired",
        *artifacts,
        "fleet/rollouts/{rollout_id}",
        "fleet/controllers/{controller_id}",
        "fleet/sites/{site}/link",
    }
    for spec in topics.CATALOGUE:
        assert spec.qos in (0, 1, 2)
        assert spec.description


@given(sensor_id=VALID_IDS)
@settings(max_examples=100, deadline=None)
def test_parse_sensor_topic_round_trips(sensor_id: str) -> None:
    assert topics.is_valid_id(sensor_id)
    for build, kind in (
        (topics.window, topics.SensorTopicKind.WINDOW),
        (topics.samples, topics.SensorTopicKind.SAMPLES),
        (topics.motifs, topics.SensorTopicKind.MOTIFS),
    ):
        parsed = topics.parse_sensor_topic(build(sensor_id))
        assert parsed == topics.SensorTopic(sensor_id=sensor_id, kind=kind)
        assert parsed.kind == str(kind)


@pytest.mark.parametrize(
    "topic",
    [
        "imu/a/b/window",
        "foo/a/window",
        "imu/a/unknown",
        "imu/a",
        "imu",
        "",
        "/imu/a/window",
        "imu/a/window/",
        "IMU/a/window",
        "imu/a/Window",
        "imu/a/windows",
        "fleet/nodes/n1/status",
    ],
)
def test_parse_sensor_topic_rejects_other_shapes(topic: str) -> None:
    assert topics.parse_sensor_topic(topic) is None


@pytest.mark.parametrize(
    "topic", ["imu//window", "imu/+/window", "imu/#/samples", "imu/a b/motifs"]
)
def test_parse_sensor_topic_is_shape_only(topic: str) -> None:
    # Parsing checks the shape; the id itself is judged by is_valid_id.
    parsed = topics.parse_sensor_topic(topic)
    assert parsed is not None
    assert not topics.is_valid_id(parsed.sensor_id)


def test_shared_subscription() -> None:
    assert topics.shared(topics.WINDOW_FILTER, "g1") == "$share/g1/imu/+/window"
    assert topics.shared(topics.SAMPLES_FILTER, "pool") == "$share/pool/imu/+/samples"
    assert topics.shared(topics.WINDOW_FILTER, None) == "imu/+/window"
    assert topics.shared(topics.WINDOW_FILTER, "") == "imu/+/window"


@pytest.mark.parametrize("value", ["sensor-01", "a.b:c_d", "a", "0", "A" * 64, "X9_.:-"])
def test_is_valid_id_accepts(value: str) -> None:
    assert topics.is_valid_id(value)


@pytest.mark.parametrize(
    "value",
    [
        "a/b",
        "+",
        "#",
        "",
        "a" * 65,
        "-abc",
        ".abc",
        "_abc",
        "a b",
        "a+b",
        "a#",
        "sensor/+",
        "$share",
        "é",
        "a\tb",
        "\nsensor",
    ],
)
def test_is_valid_id_rejects(value: str) -> None:
    assert not topics.is_valid_id(value)


@pytest.mark.parametrize("value", ["sensor-01\n", "a" * 64 + "\n"])
def test_is_valid_id_rejects_trailing_newline(value: str) -> None:
    # BUG: `_ID.match` with a `$`-anchored pattern lets one trailing "\n" through, so
    # "imu/sensor-01\n/window" is routed as sensor "sensor-01\n" (and used in file names).
    # The pydantic `Identifier` type, with the same pattern, rejects it.
    assert not topics.is_valid_id(value)


@given(value=st.text(max_size=70))
@settings(max_examples=200, deadline=None)
def test_is_valid_id_is_a_single_safe_topic_level(value: str) -> None:
    if topics.is_valid_id(value):
        # (a trailing "\n" slips through today: see test_is_valid_id_rejects_trailing_newline)
        assert 1 <= len(value.rstrip("\n")) <= 64
        assert not set(value) & set("/+#$ \t\x00")


# ---------------------------------------------------------------------------------------------
# Message models
# ---------------------------------------------------------------------------------------------


def motif_result(**changes: Any) -> dict[str, Any]:
    scores = [1.0 / MOTIF_COUNT] * MOTIF_COUNT
    result: dict[str, Any] = {
        "sensor_id": "sensor-01",
        "node_id": "node-a",
        "seq": 3,
        "t0": 10.0,
        "t1": 10.99,
        "model": {"name": "tcn-vae", "version": "1.0.0"},
        "latent": [0.5] * LATENT_DIM,
        "motif_scores": scores,
        "top_motif": 0,
        "latency_ms": 1.5,
        "ts": 11.0,
    }
    result.update(changes)
    return result


def test_motif_result_valid() -> None:
    result = MotifResult.model_validate(motif_result())
    assert result.schema_version == SCHEMA_VERSION == 1
    assert result.model == ModelRef(name="tcn-vae", version="1.0.0")
    assert MotifResult.model_validate(motif_result(seq=None, t0=None, t1=None)).seq is None
    peaked = [0.0] * MOTIF_COUNT
    peaked[11] = 1.0
    assert MotifResult.model_validate(motif_result(motif_scores=peaked, top_motif=11))


@pytest.mark.parametrize(
    "changes",
    [
        {"motif_scores": [0.5 / MOTIF_COUNT] * MOTIF_COUNT},
        {"motif_scores": [0.1] * MOTIF_COUNT},
        {"motif_scores": [1.0] + [0.0] * (MOTIF_COUNT - 2) + [0.01]},
        {"motif_scores": [1.0 / 11] * 11},
        {"motif_scores": [1.0 / 13] * 13},
        {"motif_scores": [1.5, -0.5] + [0.0] * (MOTIF_COUNT - 2)},
        {"latent": [0.0] * 63},
        {"latent": [0.0] * 65},
        {"top_motif": 12},
        {"top_motif": -1},
        {"schema_version": 2},
        {"seq": -1},
        {"latency_ms": -0.1},
        {"ts": -1.0},
        {"model": {"name": "x"}},
        {"extra": 1},
    ],
)
def test_motif_result_rejects(changes: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        MotifResult.model_validate(motif_result(**changes))


def test_motif_result_scores_error_is_readable() -> None:
    with pytest.raises(ValidationError, match="motif_scores sum to"):
        MotifResult.model_validate(motif_result(motif_scores=[0.05] * MOTIF_COUNT))


@given(
    weights=st.lists(
        st.floats(0.0, 1.0, allow_nan=False), min_size=MOTIF_COUNT, max_size=MOTIF_COUNT
    ).filter(lambda w: sum(w) > 0.1)
)
@settings(max_examples=100, deadline=None)
def test_motif_result_accepts_any_distribution(weights: list[float]) -> None:
    scores = [w / sum(weights) for w in weights]
    if not all(0 <= s <= 1 for s in scores):  # rounding can push a lone score past 1
        return
    top = max(range(MOTIF_COUNT), key=scores.__getitem__)
    result = MotifResult.model_validate(motif_result(motif_scores=scores, top_motif=top))
    assert math.isclose(sum(result.motif_scores), 1.0, abs_tol=1e-3)


def node_status() -> dict[str, Any]:
    return {"state": "online", "node_id": "node-a", "instance": "abc123", "ts": 1.0}


def telemetry() -> dict[str, Any]:
    return {
        "node_id": "node-a",
        "ts": 1.0,
        "interval_s": 5.0,
        "uptime_s": 60.0,
        "backend": "onnx",
        "model": {"name": "tcn-vae", "version": "1.0.0"},
        "windows_in": 10,
        "windows_done": 9,
        "results_published": 9,
        "windows_per_s": 1.8,
        "latency_ms": {"count": 9, "p50": 1.0, "p95": 2.0, "p99": 2.5, "max": 3.0},
        "batch_mean": 1.0,
        "queue_depth": 1,
        "queue_capacity": 64,
        "dropped": {"queue_full": 0},
        "errors": {"invalid": 2},
        "cpu_percent": 12.5,
        "rss_mb": 80.0,
        "peak_rss_mb": 90.0,
        "temperature_c": None,
    }


def error_report() -> dict[str, Any]:
    return {"node_id": "node-a", "ts": 1.0, "kind": "invalid", "reason": "x has 99 rows"}


def node_model_state() -> dict[str, Any]:
    return {"node_id": "node-a", "ts": 1.0, "state": "active", "active": None}


OUTBOUND: list[tuple[type[BaseModel], Callable[[], dict[str, Any]]]] = [
    (NodeStatus, node_status),
    (Telemetry, telemetry),
    (ErrorReport, error_report),
    (NodeModelState, node_model_state),
    (MotifResult, motif_result),
]


@pytest.mark.parametrize(("model", "factory"), OUTBOUND, ids=lambda v: getattr(v, "__name__", ""))
def test_outbound_models_are_frozen_and_closed(
    model: type[BaseModel], factory: Callable[[], dict[str, Any]]
) -> None:
    message = model.model_validate(factory())
    assert message.model_dump()["schema_version"] == SCHEMA_VERSION
    field = next(iter(factory()))
    with pytest.raises(ValidationError, match="frozen"):
        setattr(message, field, getattr(message, field))
    with pytest.raises(ValidationError, match="extra"):
        model.model_validate({**factory(), "surprise": 1})
    # and they round-trip through JSON
    assert model.model_validate_json(message.model_dump_json()) == message


def test_outbound_enums() -> None:
    assert NodeStatus.model_validate(node_status()).state is NodeState.ONLINE
    assert {s.value for s in NodeState} == {"online", "stopping", "offline", "stopped"}
    assert {s.value for s in ModelLifecycle} == {
        "downloading",
        "verifying",
        "warming",
        "active",
        "failed",
        "waiting",
    }
    assert ErrorReport.model_validate(error_report()).kind is ErrorKind.INVALID
    assert ErrorReport.model_validate(error_report()).suppressed == 0
    with pytest.raises(ValidationError):
        NodeStatus.model_validate({**node_status(), "state": "sleeping"})
    with pytest.raises(ValidationError):
        NodeModelState.model_validate({**node_model_state(), "state": "asleep"})
    with pytest.raises(ValidationError):
        ErrorReport.model_validate({**error_report(), "kind": "oops"})
    summary = {"count": 0, "p50": None, "p95": None, "p99": None, "max": None}
    assert LatencySummary.model_validate(summary).count == 0
    with pytest.raises(ValidationError, match="extra"):
        LatencySummary.model_validate({**summary, "min": None})


def test_error_kinds_are_stable_wire_strings() -> None:
    assert {k.value for k in ErrorKind} >= {
        "malformed",
        "invalid",
        "non_finite",
        "oversized",
        "bad_topic",
        "queue_full",
        "inference",
    }


def window_rows() -> list[list[float]]:
    return [[float(i)] * CHANNELS for i in range(WINDOW_LENGTH)]


def test_window_message_ignores_extra_fields() -> None:
    message = WindowMessage.model_validate(
        {"x": window_rows(), "seq": 1, "sensor": "s", "meta": {"unit": "g"}}
    )
    assert message.seq == 1
    assert not hasattr(message, "sensor")
    assert "sensor" not in message.model_dump()
    samples = SamplesMessage.model_validate({"seq": 0, "samples": [[0.0] * 9], "other": True})
    assert "other" not in samples.model_dump()


def test_inbound_models_are_frozen() -> None:
    message = WindowMessage.model_validate({"x": window_rows()})
    with pytest.raises(ValidationError, match="frozen"):
        message.seq = 3  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------
# Bundle manifest (design.md section 3)
# ---------------------------------------------------------------------------------------------

SHA = "ab" * 32


def manifest() -> dict[str, Any]:
    """A valid manifest, built by hand from the contract."""
    return {
        "manifest_version": 1,
        "name": "tcn-vae",
        "version": "1.4.0",
        "created_at": "2026-01-02T03:04:05Z",
        "created_by": "ci",
        "description": "TCN-VAE encoder",
        "files": {
            "model.onnx": {"sha256": SHA, "size": 123_456},
            "golden_inputs.npy": {"sha256": SHA, "size": 14_528},
            "golden_latents.npy": {"sha256": SHA, "size": 1_152},
        },
        "input": {
            "name": "input",
            "shape": [1, WINDOW_LENGTH, CHANNELS],
            "layout": "NTC",
            "dtype": "float32",
            "window_length": WINDOW_LENGTH,
            "channels": CHANNELS,
            "channel_order": list(CHANNEL_ORDER),
        },
        "normalization": {
            "method": "z_score_per_channel",
            "mean": [0.0, 0.0, 9.81, 0.0, 0.0, 0.0, 20.0, -5.0, 40.0],
            "std": [2.0, 2.0, 2.0, 0.5, 0.5, 0.5, 10.0, 10.0, 10.0],
            "source": "calibration set",
        },
        "outputs": {"latent": {"name": "z", "dim": LATENT_DIM}},
        "motif_head": {
            "kind": "prototypes",
            "prototypes": [[float(k)] * LATENT_DIM for k in range(MOTIF_COUNT)],
            "temperature": 1.0,
        },
        "golden": {"count": 4},
    }


def test_manifest_valid() -> None:
    parsed = Manifest.model_validate(manifest())
    assert parsed.name == "tcn-vae"
    assert parsed.input.channel_order == CHANNEL_ORDER
    assert parsed.golden.inputs in parsed.files
    assert parsed.golden.latents in parsed.files
    assert parsed.signature is None
    again = Manifest.model_validate_json(orjson.dumps(manifest()))
    assert Manifest.model_validate_json(again.model_dump_json()) == again == parsed


def edited(path: str, value: Any) -> dict[str, Any]:
    """The valid manifest with one value set (`a/b/c` path); `...` deletes the key."""
    data = copy.deepcopy(manifest())
    *parents, last = path.split("/")
    node = data
    for key in parents:
        node = node[key]
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return data


LINEAR_HEAD = {
    "kind": "linear",
    "weight": [[0.01] * LATENT_DIM for _ in range(MOTIF_COUNT)],
    "bias": [0.0] * MOTIF_COUNT,
}


@pytest.mark.parametrize(
    "data",
    [
        edited("version", "1.4.0-rc.1+build.7"),
        edited("version", "0.0.0"),
        edited("name", "a"),
        edited("name", "tcn_vae.v2-small"),
        edited("input/shape", [None, WINDOW_LENGTH, CHANNELS]),
        edited("motif_head", LINEAR_HEAD),
        edited(
            "outputs",
            {"latent": {"name": "z", "dim": 64}, "motif_logits": {"name": "m", "dim": 12}},
        ),
        {
            **edited("motif_head", ...),
            "outputs": {
                "latent": {"name": "z", "dim": 64},
                "motif_logits": {"name": "m", "dim": 12},
            },
        },
        edited(
            "files",
            {
                "model.hef": {"sha256": SHA, "size": 1},
                "golden_inputs.npy": {"sha256": SHA, "size": 1},
                "golden_latents.npy": {"sha256": SHA, "size": 1},
            },
        )
        | {"hef": {"hw_arch": "hailo8l"}},
        edited("golden", {"count": 1, "inputs": "g/in.npy", "latents": "g/out.npy"})
        | {
            "files": {
                **manifest()["files"],
                "g/in.npy": {"sha256": SHA, "size": 0},
                "g/out.npy": {"sha256": SHA, "size": 0},
            }
        },
        edited("signature", {"algorithm": "ed25519", "key_id": "fleet-1", "value": "c2ln"}),
    ],
)
def test_manifest_valid_variants(data: dict[str, Any]) -> None:
    assert Manifest.model_validate(data)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (edited("version", "1.2"), "semantic"),
        (edited("version", "v1.2.0"), "semantic"),
        (edited("version", "1.2.3.4"), "semantic"),
        (edited("version", "01.2.3"), "semantic"),
        (edited("version", "1.2.3 "), "semantic"),
        (edited("name", "TCN-VAE"), "lowercase"),
        (edited("name", "Tcn"), "lowercase"),
        (edited("name", "-tcn"), "lowercase"),
        (edited("name", "tcn/vae"), "lowercase"),
        (edited("name", ""), "lowercase"),
        (edited("input/shape", [1, 100, 8]), "input shape"),
        (edited("input/shape", [1, 9, 100]), "input shape"),
        (edited("input/shape", [100, 9]), "input shape"),
        (edited("input/shape", [1, 1, 100, 9]), "input shape"),
        (edited("input/channel_order", list(reversed(CHANNEL_ORDER))), "channel_order"),
        (edited("input/channel_order", list(CHANNEL_ORDER[:8])), "channel_order"),
        (edited("input/layout", "NCT"), "layout"),
        (edited("input/dtype", "float16"), "dtype"),
        (edited("input/window_length", 128), "window_length"),
        (edited("normalization/std", [1.0] * 8 + [0.0]), "std must be > 0"),
        (edited("normalization/std", [-1.0] + [1.0] * 8), "std must be > 0"),
        (edited("normalization/std", [1.0] * 8), "std"),
        (edited("normalization/mean", [float("nan")] + [0.0] * 8), "finite"),
        (edited("outputs/latent/dim", 32), "latent output must have 64"),
        (edited("outputs/motif_logits", {"name": "m", "dim": 10}), "motif_logits output"),
        (edited("motif_head", None), "needs a motif_head"),
        (edited("motif_head", ...), "needs a motif_head"),
        (edited("motif_head/temperature", 0.0), "temperature"),
        (edited("motif_head/prototypes", [[0.0] * LATENT_DIM] * 11), "prototypes"),
        (edited("motif_head/prototypes", [[0.0] * 32] * MOTIF_COUNT), "prototypes"),
        (edited("motif_head", {**LINEAR_HEAD, "bias": [0.0] * 11}), "bias"),
        (edited("motif_head/kind", "mlp"), "kind"),
        (edited("files/golden_inputs.npy", ...), "golden file 'golden_inputs.npy'"),
        (edited("golden/latents", "other.npy"), "golden file 'other.npy'"),
        (edited("files/model.onnx", ...), "model.onnx and/or model.hef"),
        (
            edited(
                "files",
                {
                    "model.tflite": {"sha256": SHA, "size": 1},
                    **{k: v for k, v in manifest()["files"].items() if k != "model.onnx"},
                },
            ),
            "model.onnx and/or model.hef",
        ),
        (edited("files/model.onnx", {"sha256": SHA.upper(), "size": 1}), "sha256"),
        (edited("files/model.onnx", {"sha256": "ab" * 31, "size": 1}), "sha256"),
        (edited("files/model.onnx", {"sha256": SHA, "size": -1}), "size"),
        (edited("golden/count", 0), "count"),
        (edited("golden/min_cosine", 1.5), "min_cosine"),
        (edited("manifest_version", 2), "manifest_version"),
        (edited("surprise", True), "surprise"),
        (edited("input/surprise", True), "surprise"),
        (edited("version", ...), "version"),
        (edited("files/model.hef", {"sha256": SHA, "size": 1}), "come together"),
        (edited("hef", {"hw_arch": "hailo8"}), "come together"),
        (
            edited("files/model.hef", {"sha256": SHA, "size": 1}) | {"hef": {"hw_arch": "h10"}},
            "hw_arch",
        ),
    ],
)
def test_manifest_rejects(data: dict[str, Any], reason: str) -> None:
    with pytest.raises(ValidationError) as info:
        Manifest.model_validate(data)
    assert reason in str(info.value)


# ---------------------------------------------------------------------------------------------
# JSON Schema export
# ---------------------------------------------------------------------------------------------

EXPECTED_FILES = {f"{model.__name__}.schema.json" for model in (*ALL_MESSAGES, Manifest)}
STALE = "docs/schemas is stale: run `python -m schemas.export` and commit the result"


def test_schema_documents_one_file_per_model() -> None:
    documents = schema_documents()
    assert set(documents) == EXPECTED_FILES
    assert len(documents) == len(ALL_MESSAGES) + 1
    for name, body in documents.items():
        assert body.endswith(b"\n")
        schema = json.loads(body)
        assert schema["title"] == name.removesuffix(".schema.json")
        assert schema["type"] == "object"


def test_all_messages_lists_every_topic_payload() -> None:
    names = {model.__name__ for model in ALL_MESSAGES}
    payloads = {spec.payload for spec in topics.CATALOGUE}
    assert names <= payloads
    assert names == {
        "WindowMessage",
        "SamplesMessage",
        "MotifResult",
        "NodeStatus",
        "Telemetry",
        "ErrorReport",
        "NodeModelState",
        "DesiredModel",
        "ArtifactManifest",
        "RolloutRecord",
        "ControllerPresence",
    }
    assert payloads - names == {"bytes"}


def test_committed_schema_files_are_exactly_the_generated_set() -> None:
    committed = {p.name for p in DOCS_SCHEMAS.glob("*.schema.json")}
    assert committed == EXPECTED_FILES, STALE


@pytest.mark.parametrize("name", sorted(EXPECTED_FILES))
def test_committed_schema_is_up_to_date(name: str) -> None:
    path = DOCS_SCHEMAS / name
    assert path.is_file(), f"{path} is missing; {STALE}"
    assert path.read_bytes() == schema_documents()[name], f"{path} differs; {STALE}"


def test_export_writes_the_documents(tmp_path: Path) -> None:
    out = tmp_path / "nested" / "schemas"
    written = write_schemas(out)
    assert {p.name for p in written} == EXPECTED_FILES | {OPENAPI_FILE}
    documents = {**schema_documents(), OPENAPI_FILE: openapi_json()}
    for path in written:
        assert path.read_bytes() == documents[path.name]
    other = tmp_path / "cli"
    assert export_main(["--out", str(other)]) == 0
    assert {p.name: p.read_bytes() for p in other.iterdir()} == documents


def test_schema_documents_are_deterministic() -> None:
    assert schema_documents() == schema_documents()


def test_committed_topic_reference_is_up_to_date() -> None:
    path = Path(__file__).resolve().parents[1] / "docs" / "topics.md"
    assert path.read_text() == topics_document(), f"{path} differs; {STALE}"
