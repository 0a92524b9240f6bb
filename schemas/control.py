"""Pydantic models of the control plane: desired states, artifacts, rollout records, controller
presence (the retained `fleet/models|groups|nodes/.../desired`, `fleet/artifacts/...` and
`fleet/rollouts/...` topics). The node's own reports are in schemas/messages.py."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import Field, SerializationInfo, SerializerFunctionWrapHandler, model_serializer

from schemas import SCHEMA_VERSION
from schemas.codec import WIRE
from schemas.messages import ModelRef, Outbound, Timestamp


class DesiredModel(Outbound):
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


class ArtifactManifest(Outbound):
    """`fleet/artifacts/{name}/{version}/manifest` (retained): how to reassemble a bundle.

    Chunks are retained raw bytes on `fleet/artifacts/{name}/{version}/chunks/{index}`. Signed
    by the fleet key at `imu-fleet publish --sign-key`: a controller with the key signs desired
    states only from a manifest it verified (docs/security.md).
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
    bundle_key_id: str | None = Field(
        default=None,
        exclude_if=lambda value: value is None,
        description="The key that signed the bundle's own manifest (null: an unsigned bundle, "
        "which nodes with a trust key refuse)",
    )
    signature: str | None = Field(
        default=None,
        exclude_if=lambda value: value is None,  # absent when unsigned: older readers take it
        description="Base64 Ed25519 signature by a fleet key over the canonical message",
    )
    key_id: str | None = Field(default=None, exclude_if=lambda value: value is None)


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


class RolloutGates(Outbound):
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


class NodeHealth(Outbound):
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


class NodeOutcome(Outbound):
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

    @model_serializer(mode="wrap")
    def _compact_on_the_wire(
        self, handler: SerializerFunctionWrapHandler, info: SerializationInfo
    ) -> dict[str, Any]:
        """On the wire (`schemas.codec.encode`), fields at their default are left out: a record
        names every node of a rollout, and at 10,000 nodes the defaults alone were 1 MB. Parsing
        fills them in again, so a signature (over the full form) is unchanged."""
        body: dict[str, Any] = handler(self)
        if not (info.context or {}).get(WIRE):
            return body
        fields = type(self).model_fields
        return {
            name: value
            for name, value in body.items()
            if fields[name].is_required() or getattr(self, name) != fields[name].default
        }


class RolloutRecord(Outbound):
    """`fleet/rollouts/{rollout_id}` (retained): the plan, progress and outcome of one rollout.

    A restarted controller resumes from it; `imu-fleet pause|resume|abort|rollback` set
    `command`, which the running controller obeys. Every write is signed by the fleet key when
    the writer has it, and a controller with the key acts only on records it verified.
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
    scope_previous: DesiredModel | None = Field(
        default=None,
        exclude_if=lambda value: value is None,
        description="What the rollout's scope (its group, else the fleet-wide desired state) "
        "held before it, a fleet-signed state (null: nothing): a rollback restores it",
    )
    scope_set: bool = Field(
        default=False,
        exclude_if=lambda value: not value,
        description="True once the rollout set its scope's desired state (on success)",
    )
    site_hold_s: float | None = Field(
        default=None,
        ge=0,
        exclude_if=lambda value: value is None,
        description="How long past the wave timeout a node whose site link is down is held, "
        "neither failed nor done (null: the controller's default, 600 s)",
    )
    signature: str | None = Field(
        default=None,
        exclude_if=lambda value: value is None,  # absent when unsigned: older readers take it
        description="Base64 Ed25519 signature by a fleet key over the canonical message",
    )
    key_id: str | None = Field(default=None, exclude_if=lambda value: value is None)

    @property
    def failures(self) -> int:
        """Nodes that failed to take the new version or its health gates (also once rolled
        back)."""
        return sum(o.failed or o.state is NodeRolloutState.FAILED for o in self.nodes.values())


class ControllerPresence(Outbound):
    """`fleet/controllers/{controller_id}` (retained) while a rollout controller runs.

    The controller's will is an empty retained message on the same topic, so the broker clears
    the presence the moment the controller dies; `imu-fleet resume` then takes over at once.
    """

    schema_version: Literal[1] = SCHEMA_VERSION
    controller_id: str
    host: str
    pid: int
    started_at: Timestamp
