"""Pydantic models of every message on the topic tree.

Inbound sensor messages (`WindowMessage`, `SamplesMessage`) ignore unknown fields so sensors can
add their own; everything the system itself publishes is frozen and forbids unknown fields.
Numbers in sensor data are strict (no strings, no booleans), finite and representable as float32.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal

from pydantic import (
    AllowInfNan,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    field_validator,
    model_validator,
)

from schemas import SCHEMA_VERSION
from schemas.limits import (
    CHANNEL_ORDER,
    CHANNELS,
    FLOAT32_MAX,
    LATENT_DIM,
    MAX_SAMPLES_PER_MESSAGE,
    MOTIF_COUNT,
    SENSOR_ID_PATTERN,
    WINDOW_LENGTH,
)
from schemas.manifest import MotifLabels

SampleValue = Annotated[float, Strict(), AllowInfNan(False), Field(ge=-FLOAT32_MAX, le=FLOAT32_MAX)]
"""One channel value: a JSON number, finite, within float32 range."""
SampleRow = list[SampleValue]
Timestamp = Annotated[float, Strict(), AllowInfNan(False), Field(ge=0)]
SequenceNumber = Annotated[int, Strict(), Field(ge=0, le=2**63 - 1)]
Identifier = Annotated[str, Field(pattern=SENSOR_ID_PATTERN)]

_CHANNELS_HELP = ",".join(CHANNEL_ORDER)


def _check_rows(rows: list[list[float]], what: str) -> None:
    for index, row in enumerate(rows):
        if len(row) != CHANNELS:
            msg = (
                f"{what} row {index} has {len(row)} values; every row needs {CHANNELS} "
                f"({_CHANNELS_HELP})"
            )
            raise ValueError(msg)


class _Inbound(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class _Outbound(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WindowMessage(_Inbound):
    """`imu/{sensor_id}/window`: one whole window (the EdgeInfer `/infer` body)."""

    x: list[SampleRow] = Field(
        description=f"{WINDOW_LENGTH} rows of {CHANNELS} values ({_CHANNELS_HELP})"
    )
    seq: SequenceNumber | None = Field(default=None, description="Window counter")
    t0: Timestamp | None = Field(default=None, description="Unix time of the first sample")

    @field_validator("x")
    @classmethod
    def _window_shape(cls, rows: list[list[float]]) -> list[list[float]]:
        if len(rows) != WINDOW_LENGTH:
            msg = f"x has {len(rows)} rows; a window needs exactly {WINDOW_LENGTH}"
            raise ValueError(msg)
        _check_rows(rows, "x")
        return rows


class SamplesMessage(_Inbound):
    """`imu/{sensor_id}/samples`: a run of consecutive samples for the node to window."""

    seq: SequenceNumber = Field(description="Sample index of the first sample in `samples`")
    t0: Timestamp | None = Field(default=None, description="Unix time of the first sample")
    rate_hz: Annotated[float, Strict(), AllowInfNan(False), Field(gt=0, le=10_000)] | None = Field(
        default=None, description="Sampling rate; with t0, gives each window's t0 and t1"
    )
    samples: list[SampleRow] = Field(
        min_length=1,
        max_length=MAX_SAMPLES_PER_MESSAGE,
        description=f"Rows of {CHANNELS} values ({_CHANNELS_HELP})",
    )

    @field_validator("samples")
    @classmethod
    def _row_shape(cls, rows: list[list[float]]) -> list[list[float]]:
        _check_rows(rows, "samples")
        return rows


class ModelRef(_Outbound):
    """Which model produced something: name and semantic version."""

    name: str
    version: str


class MotifResult(_Outbound):
    """`imu/{sensor_id}/motifs`: one result per window."""

    schema_version: Literal[1] = SCHEMA_VERSION
    sensor_id: str
    node_id: str
    seq: SequenceNumber | None
    t0: Timestamp | None = None
    t1: Timestamp | None = None
    model: ModelRef
    latent: Annotated[list[float], Field(min_length=LATENT_DIM, max_length=LATENT_DIM)]
    motif_scores: Annotated[
        list[Annotated[float, Field(ge=0, le=1)]],
        Field(min_length=MOTIF_COUNT, max_length=MOTIF_COUNT),
    ]
    top_motif: Annotated[int, Field(ge=0, lt=MOTIF_COUNT)]
    latency_ms: Annotated[float, Field(ge=0)] = Field(
        description="Receipt of the input to publication of this result, on the node"
    )
    ts: Timestamp = Field(description="Unix time the result was published")

    @model_validator(mode="after")
    def _scores_are_a_distribution(self) -> MotifResult:
        total = sum(self.motif_scores)
        if abs(total - 1.0) > 1e-3:
            msg = f"motif_scores sum to {total}, not 1"
            raise ValueError(msg)
        return self


class NodeState(StrEnum):
    """Lifecycle states on `fleet/nodes/{node_id}/status`."""

    ONLINE = "online"
    STOPPING = "stopping"
    """Takes no new work and finishes what it has (a share group's member leaving cleanly)."""
    OFFLINE = "offline"
    STOPPED = "stopped"


class NodeStatus(_Outbound):
    """`fleet/nodes/{node_id}/status` (retained): birth, will or clean stop."""

    schema_version: Literal[1] = SCHEMA_VERSION
    state: NodeState
    node_id: str
    instance: str = Field(description="Random id of this process run (tells two nodes apart)")
    ts: Timestamp
    started_at: Timestamp | None = Field(
        default=None,
        description="When this process started: of two live processes with one node id, the "
        "one started last serves and the other stops",
    )
    software_version: str | None = None
    backend: str | None = None
    backend_reason: str | None = Field(
        default=None, description="Why this backend (auto choice, fallback, or requested)"
    )
    device: dict[str, str | int | float] | None = Field(
        default=None, description="Accelerator identity: architecture, firmware, serial, ..."
    )
    model: ModelRef | None = None
    config_digest: str | None = None
    group: str | None = None
    share_group: str | None = Field(
        default=None,
        description="The share group whose sensors this node divides with the group's other live "
        "nodes (docs/scaling.md)",
    )
    hop: int | None = Field(
        default=None, ge=1, description="Samples between the windows this node cuts from `samples`"
    )
    host: str | None = None
    reason: str | None = Field(default=None, description="Why the node stopped or went away")


class LatencySummary(_Outbound):
    """Latency percentiles over one telemetry interval, in milliseconds."""

    count: int
    p50: float | None
    p95: float | None
    p99: float | None
    max: float | None


class Telemetry(_Outbound):
    """`fleet/nodes/{node_id}/telemetry`: periodic health and throughput."""

    schema_version: Literal[1] = SCHEMA_VERSION
    node_id: str
    ts: Timestamp
    interval_s: float = Field(
        ge=0, le=86_400, allow_inf_nan=False, description="Seconds this report covers"
    )
    uptime_s: float = Field(ge=0, allow_inf_nan=False)
    backend: str
    backend_reason: str | None = None
    device: dict[str, str | int | float] | None = None
    model: ModelRef | None
    windows_in: int = Field(description="Windows accepted into the queue since start")
    windows_done: int = Field(description="Windows inferred since start")
    results_published: int
    windows_per_s: float = Field(description="Inference rate over the last interval")
    latency_ms: LatencySummary
    batch_mean: float | None = Field(description="Mean micro-batch size in the interval")
    queue_depth: int
    queue_capacity: int
    dropped: dict[str, int] = Field(description="Windows dropped since start, by reason")
    redelivered: int = Field(
        default=0, description="Windows the broker re-sent after a reconnect, already served"
    )
    errors: dict[str, int] = Field(description="Errors reported since start, by kind")
    cpu_percent: float | None
    rss_mb: float
    peak_rss_mb: float
    temperature_c: float | None = Field(description="Board (SoC) temperature")
    accelerator_temperature_c: float | None = Field(
        default=None, description="Accelerator chip temperature (Hailo ts0 sensor)"
    )
    spooled: int | None = Field(
        default=None, description="Results waiting in the disk spool for the broker (null: off)"
    )
    spool_mb: float | None = Field(default=None, description="Disk the spool uses now")
    backend_healthy: bool = Field(
        default=True, description="False while the backend is down and being rebuilt"
    )
    backend_rebuilds: int = Field(
        default=0, description="Times the backend failed and was rebuilt (or fell back) since start"
    )
    watchdog_stalls: int = Field(
        default=0, description="Inference calls that ran past their deadline since start"
    )


class ErrorKind(StrEnum):
    """Kinds of problems a node reports on its errors topic."""

    MALFORMED = "malformed"
    """Payload is not valid JSON (or not a valid binary frame)."""
    INVALID = "invalid"
    """Valid JSON that breaks the schema: shape, types, ranges."""
    NON_FINITE = "non_finite"
    """NaN or infinity in sensor data."""
    OVERSIZED = "oversized"
    """Payload larger than the limit for its topic."""
    BAD_TOPIC = "bad_topic"
    """A message on a topic the node does not understand (e.g. an invalid sensor id)."""
    SEQUENCE_GAP = "sequence_gap"
    """Samples or windows missing between two messages of one sensor."""
    SEQUENCE_RESET = "sequence_reset"
    """A sensor's sequence went backwards (restart or duplicate); its buffer was reset."""
    QUEUE_FULL = "queue_full"
    """The node was over capacity and dropped a window."""
    SHUTTING_DOWN = "shutting_down"
    """A window arrived after the node stopped taking input for a clean stop."""
    INFERENCE = "inference"
    """The backend failed on a batch."""
    PUBLISH = "publish"
    """A result could not be queued for publication."""
    DUPLICATE_NODE_ID = "duplicate_node_id"
    """Another live process uses this node id."""
    MODEL = "model"
    """A desired model was refused (hash, signature, version, expiry, size, shape, golden)."""
    BACKEND_FALLBACK = "backend_fallback"
    """The accelerator kept failing and the node moved to its fallback backend."""
    DESIRED_REFUSED = "desired_refused"
    """A desired-state message was refused: unsigned, foreign key, moved to another topic,
    expired, or older than one already followed there (a replay)."""
    BACKEND_RECOVERY = "backend_recovery"
    """The backend failed and was rebuilt (with how long serving stopped), or could not be."""
    WATCHDOG = "watchdog"
    """An inference call ran past its deadline and was aborted (or could not be)."""
    SHARE_GROUP = "share_group"
    """A share group could not serve some windows (their samples were older than a node kept
    when it took them over), or a member does not fit the group (another hop)."""


class ErrorReport(_Outbound):
    """`fleet/nodes/{node_id}/errors`: one rejected input or failed step."""

    schema_version: Literal[1] = SCHEMA_VERSION
    node_id: str
    ts: Timestamp
    kind: ErrorKind
    reason: str = Field(description="What went wrong and what to do about it")
    topic: str | None = Field(default=None, description="Topic of the offending message")
    sensor_id: str | None = None
    seq: int | None = None
    suppressed: int = Field(
        default=0, description="Similar reports folded into this one by rate limiting"
    )


class ModelLifecycle(StrEnum):
    """States of `fleet/nodes/{node_id}/model`."""

    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    WARMING = "warming"
    ACTIVE = "active"
    FAILED = "failed"


class FollowedDesired(_Outbound):
    """Which desired-state message a node follows (pins are visible in `fleet/nodes/+/model`)."""

    scope: Literal["fleet", "group", "node"]
    target: str | None = None
    name: str
    version: str
    issued_at: Timestamp
    rollout_id: str | None = None
    key_id: str | None = Field(default=None, description="Signing key; null when unsigned")


class NodeModelState(_Outbound):
    """`fleet/nodes/{node_id}/model` (retained): the node's actual model state."""

    schema_version: Literal[1] = SCHEMA_VERSION
    node_id: str
    ts: Timestamp
    state: ModelLifecycle
    active: ModelRef | None
    previous: ModelRef | None = None
    target: ModelRef | None = Field(default=None, description="Model being fetched or loaded")
    active_sha256: str | None = Field(
        default=None, description="sha256 of the active bundle file (what a rollback names)"
    )
    active_size: int | None = None
    backend: str | None = None
    last_error: str | None = None
    following: FollowedDesired | None = Field(
        default=None,
        description="The desired state this node follows: which scope set it, when, signed by "
        "whom (null: none set, the node serves what it started with)",
    )
    motif_labels: MotifLabels | None = Field(
        default=None,
        # absent, not null, when the bundle names no motifs: readers that predate the field
        # (extra fields forbidden) still take the state of a node serving such a bundle
        exclude_if=lambda labels: labels is None,
        description="The active bundle's motif names (manifest `motif_labels`), in index order: "
        "a result's `top_motif` from this node and model is named by them",
    )
    signatures_required: bool = Field(
        default=False,
        exclude_if=lambda required: not required,  # absent when false: older readers take it
        description="True when the node has a trust key: it takes only signed desired states "
        "(a rollback without the fleet key would be refused)",
    )


class DesiredModel(_Outbound):
    """`fleet/models/desired`, `fleet/groups/{g}/desired`, `fleet/nodes/{id}/desired` (retained).

    The most specific one wins (node, then group, then fleet). An empty retained message clears
    an override. `rollback` lets a node go to an older version; the fleet signs it (Ed25519 over
    the canonical message, `signature` null) so that only the fleet can order a downgrade.

    Freshness (docs/security.md): `scope` and `target` bind a signed message to the one topic it
    was issued for, `issued_at` orders the messages of one scope (a node refuses one older than
    what it already followed or saw cleared there), and `expires_at` bounds a replay.
    """

    schema_version: Literal[1] = SCHEMA_VERSION
    name: str
    version: str
    bundle_sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    bundle_size: Annotated[int, Field(ge=0)]
    url: str | None = Field(
        default=None, description="file:// or http(s):// source instead of the artifact topics"
    )
    rollback: bool = False
    rollout_id: str | None = None
    issued_at: Timestamp
    expires_at: Timestamp | None = Field(
        default=None, description="Nodes refuse the message after this time (unix seconds)"
    )
    scope: Literal["fleet", "group", "node"] | None = Field(
        default=None, description="The level of the topic this message was issued for"
    )
    target: str | None = Field(
        default=None, description="The group name or node id of that topic (none for fleet)"
    )
    cleared: bool = Field(
        default=False,
        description="A signed clear: this scope sets no model any more and the node follows the "
        "next less specific one (name, version and hash are then placeholders). Nodes with a "
        "trust key take only signed clears; others also take an empty retained message",
    )
    signature: str | None = Field(default=None, description="Base64 Ed25519 signature")
    key_id: str | None = None

    @property
    def ref(self) -> ModelRef:
        """Name and version."""
        return ModelRef(name=self.name, version=self.version)


class ArtifactManifest(_Outbound):
    """`fleet/artifacts/{name}/{version}/manifest` (retained): how to reassemble a bundle.

    Chunks are retained raw bytes on `fleet/artifacts/{name}/{version}/chunks/{index}`.
    """

    schema_version: Literal[1] = SCHEMA_VERSION
    name: str
    version: str
    bundle_sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    bundle_size: Annotated[int, Field(ge=0)]
    chunk_size: Annotated[int, Field(gt=0)]
    chunks: list[Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]] = Field(
        description="sha256 of each chunk, in order"
    )
    url: str | None = None
    published_at: Timestamp


class RolloutState(StrEnum):
    """Lifecycle of a rollout."""

    RUNNING = "running"
    PAUSED = "paused"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    ABORTED = "aborted"
    ROLLED_BACK = "rolled_back"


class NodeRolloutState(StrEnum):
    """Where one node stands in a rollout."""

    PENDING = "pending"
    UPDATING = "updating"
    ACTIVE = "active"
    FAILED = "failed"
    ROLLING_BACK = "rolling_back"
    """Asked to return to its previous model; it has not reported it active (yet)."""
    ROLLED_BACK = "rolled_back"
    """Reported its previous model active again (or never left it)."""


class RolloutGates(_Outbound):
    """The health gates of a rollout: how long each wave soaks and what fails a node.

    A moved node's telemetry over the soak is compared with its own before the move and with the
    nodes not moved yet (fleet/rollout/health.py)."""

    soak_s: float = Field(ge=0, description="Seconds each wave soaks after its nodes are active")
    max_error_rate: float = Field(
        default=0.02, ge=0, description="Node-side errors per window allowed above the reference"
    )
    max_p95_ratio: float = Field(
        default=1.5, ge=1, description="p95 latency allowed, as a multiple of the reference"
    )
    p95_floor_ms: float = Field(
        default=10.0,
        ge=0,
        description="p95 below this always passes: well inside the 50 ms target, differences are "
        "noise (thread hand-overs, a busy moment)",
    )
    min_results_ratio: float = Field(
        default=0.95,
        ge=0,
        le=1,
        description="Results per window in, as a share of the node's own ratio before the move",
    )


class NodeHealth(_Outbound):
    """A gate's verdict on one moved node, with the figures it rests on."""

    passed: bool
    reason: str | None = None
    soak_samples: int = Field(description="Telemetry messages over the soak")
    windows: int = Field(description="Windows in over the soak")
    error_rate: float | None = None
    reference_error_rate: float | None = None
    p95_ms: float | None = None
    reference_p95_ms: float | None = None
    results_ratio: float | None = None
    reference_results_ratio: float | None = None


class NodeOutcome(_Outbound):
    """One node's part in a rollout."""

    wave: int
    state: NodeRolloutState = NodeRolloutState.PENDING
    error: str | None = None
    failed: bool = Field(
        default=False,
        description="It failed (activation or health gate); stays true through a rollback",
    )
    health: NodeHealth | None = Field(default=None, description="The soak's verdict")
    moved_at: Timestamp | None = Field(default=None, description="When it was asked to move")
    previous: DesiredModel | None = Field(
        default=None, description="What to restore on rollback (the node's model before)"
    )


class RolloutRecord(_Outbound):
    """`fleet/rollouts/{rollout_id}` (retained): the plan, progress and outcome of one rollout.

    A restarted controller resumes from it; `imu-fleet pause|resume|abort|rollback` set
    `command`, which the running controller obeys.
    """

    schema_version: Literal[1] = SCHEMA_VERSION
    rollout_id: str
    desired: DesiredModel
    group: str | None = None
    waves: list[list[str]] = Field(description="Node ids per wave; wave 0 is the canary")
    max_failures: int
    wave_timeout_s: float
    state: RolloutState = RolloutState.RUNNING
    wave: int = Field(default=0, description="Index of the wave in progress")
    nodes: dict[str, NodeOutcome]
    command: Literal["pause", "resume", "abort", "rollback"] | None = None
    controller: str | None = Field(
        default=None,
        description="Id of the controller driving it; alive while fleet/controllers/{id} is set",
    )
    epoch: int = Field(
        default=0,
        ge=0,
        description="Raised by each take-over; of two controllers, the higher (epoch, id) drives",
    )
    created_at: Timestamp
    updated_at: Timestamp
    reason: str | None = None
    gates: RolloutGates | None = Field(
        default=None, description="Health gates and soak (null: a wave passes on activation)"
    )
    soak_until: Timestamp | None = Field(
        default=None, description="End of the current wave's soak (a resumed controller waits)"
    )

    @property
    def failures(self) -> int:
        """Nodes that failed to take the new version or its health gates (also once rolled
        back)."""
        return sum(o.failed or o.state is NodeRolloutState.FAILED for o in self.nodes.values())


class ControllerPresence(_Outbound):
    """`fleet/controllers/{controller_id}` (retained) while a rollout controller runs.

    The controller's will is an empty retained message on the same topic, so the broker clears
    the presence the moment the controller dies; `imu-fleet resume` then takes over at once.
    """

    schema_version: Literal[1] = SCHEMA_VERSION
    controller_id: str
    host: str
    pid: int
    started_at: Timestamp


ALL_MESSAGES: tuple[type[BaseModel], ...] = (
    WindowMessage,
    SamplesMessage,
    MotifResult,
    NodeStatus,
    Telemetry,
    ErrorReport,
    NodeModelState,
    DesiredModel,
    ArtifactManifest,
    RolloutRecord,
    ControllerPresence,
)
"""Every message model, in topic-tree order (for JSON Schema export)."""

__all__ = [
    "ALL_MESSAGES",
    "ArtifactManifest",
    "ControllerPresence",
    "DesiredModel",
    "ErrorKind",
    "ErrorReport",
    "FollowedDesired",
    "Identifier",
    "LatencySummary",
    "ModelLifecycle",
    "ModelRef",
    "MotifResult",
    "NodeModelState",
    "NodeState",
    "NodeStatus",
    "RolloutRecord",
    "SamplesMessage",
    "Telemetry",
    "WindowMessage",
]
