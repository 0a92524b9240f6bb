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


class Inbound(BaseModel):
    """A message sensors send: unknown fields are ignored (sensors may add their own)."""

    model_config = ConfigDict(extra="ignore", frozen=True)


class Outbound(BaseModel):
    """A message the system publishes: frozen, unknown fields refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class WindowMessage(Inbound):
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


class SamplesMessage(Inbound):
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


class ModelRef(Outbound):
    """Which model produced something: name and semantic version."""

    name: str
    version: str


class MotifResult(Outbound):
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


class NodeStatus(Outbound):
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
    site: str | None = Field(
        default=None,
        description="The site whose broker this node uses, when sites are bridged to a fleet "
        "broker (docs/scaling.md)",
    )
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


class LatencySummary(Outbound):
    """Latency percentiles over one telemetry interval, in milliseconds."""

    count: int
    p50: float | None
    p95: float | None
    p99: float | None
    max: float | None


class Telemetry(Outbound):
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
    CONTROL_PLANE_STALE = "control_plane_stale"
    """The signed desired state this node follows expired without a renewal, or the one on a
    topic was too old to take: the fleet's controller service is not renewing it (a freeze, or
    it is down). The node keeps serving what it has."""
    RETAINED_INPUT = "retained_input"
    """A window or sample run published retained: every node subscribing later would serve it
    again, so it is ignored (clear it with an empty retained message)."""
    MODEL_OUTPUT = "model_output"
    """The model returned a non-finite latent or motif score for a window: refused, never
    published."""


class ErrorReport(Outbound):
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

    WAITING = "waiting"
    """A node with no model yet (first boot from the fleet): it waits for a desired state."""
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    WARMING = "warming"
    ACTIVE = "active"
    FAILED = "failed"


class FollowedDesired(Outbound):
    """Which desired-state message a node follows (pins are visible in `fleet/nodes/+/model`)."""

    scope: Literal["fleet", "group", "node"]
    target: str | None = None
    name: str
    version: str
    issued_at: Timestamp
    rollout_id: str | None = None
    key_id: str | None = Field(default=None, description="Signing key; null when unsigned")


class NodeModelState(Outbound):
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
    stale_since: Timestamp | None = Field(
        default=None,
        exclude_if=lambda since: since is None,  # absent while fresh: older readers take it
        description="Since when the node's control plane is stale: the signed desired state it "
        "follows expired without a renewal, or a current one was too old to take (null: fresh)",
    )
    stale_reason: str | None = Field(default=None, exclude_if=lambda reason: reason is None)
    signatures_required: bool = Field(
        default=False,
        exclude_if=lambda required: not required,  # absent when false: older readers take it
        description="True when the node has a trust key: it takes only signed desired states "
        "(a rollback without the fleet key would be refused)",
    )
