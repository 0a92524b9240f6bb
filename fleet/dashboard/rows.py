"""What the dashboard holds and shows: the kinds of message it reads, why it refuses one, its
limits, and the rows the page draws (nodes, rollouts, sensors), each cut to display length."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final

from pydantic import BaseModel

from schemas import topics
from schemas.control import RolloutRecord, RolloutState
from schemas.messages import ErrorReport, MotifResult, NodeModelState, NodeStatus, Telemetry

ACTIVE_ROLLOUT_STATES: Final = frozenset({RolloutState.RUNNING, RolloutState.PAUSED})
TIMELINE_EVENTS: Final = 24
"""Timeline entries kept per rollout (the newest)."""
HISTORY_POINTS: Final = 120
HISTORY_STEP_S: Final = 30.0
"""Per-node sparklines: at most one point per 30 s, over the last hour."""
SUBSCRIPTIONS: Final = (
    topics.NODES_STATUS_FILTER,
    topics.NODES_MODEL_FILTER,
    topics.NODES_TELEMETRY_FILTER,
    topics.node_errors("+"),
    topics.ROLLOUTS_FILTER,
    topics.MOTIFS_FILTER,
    topics.SITE_LINKS_FILTER,
)
"""Every topic filter the dashboard reads: all within the read-only dashboard role's grants."""


class Kind(StrEnum):
    """What a subscribed topic carries."""

    STATUS = "status"
    MODEL = "model"
    TELEMETRY = "telemetry"
    ERRORS = "errors"
    ROLLOUT = "rollout"
    RESULT = "result"
    LINK = "link"
    """A site bridge's link state (`fleet/sites/{site}/link`: `1` up, `0` down)."""


class Reject(StrEnum):
    """Why a message was dropped (the `reason` label of the rejected-payloads counter)."""

    BAD_TOPIC = "bad_topic"
    """A topic not of a subscribed shape, or whose id is not a valid id."""
    OVERSIZED = "oversized"
    MALFORMED = "malformed"
    """Not JSON."""
    INVALID = "invalid"
    """JSON that breaks the message's schema."""
    MISMATCH = "mismatch"
    """The id inside the payload differs from the one in the topic."""
    STALE = "stale"
    """A rollout record older than the one held (a superseded controller's late write)."""
    OVER_CAPACITY = "over_capacity"
    """A new node or rollout while every slot holds a live one."""
    RETAINED = "retained"
    """A result published retained: not a live result of any window."""


SCHEMAS: Final[dict[Kind, type[BaseModel]]] = {
    Kind.STATUS: NodeStatus,
    Kind.MODEL: NodeModelState,
    Kind.TELEMETRY: Telemetry,
    Kind.ERRORS: ErrorReport,
    Kind.ROLLOUT: RolloutRecord,
    Kind.RESULT: MotifResult,
}


@dataclass(frozen=True, slots=True)
class Limits:
    """How much the dashboard holds at most."""

    max_nodes: int = 1000
    max_sensors: int = 500
    max_rollouts: int = 50
    ethogram_length: int = 120
    """Results kept per sensor (the ethogram's span: 120 windows at 2/s is one minute)."""
    max_payload_bytes: int = 64 * 1024
    """Largest node report or result read; a result is ~1.5 KB, telemetry ~1 KB."""
    max_rollout_bytes: int = 16 * 1024 * 1024
    """Largest rollout record read: a record names every node of its rollout, up to ~700 bytes
    each once judged (docs/scaling.md), so 16 MiB holds a 20,000-node rollout."""
    max_sites: int = 1000
    """Site links held (a site whose link message was cleared frees its slot)."""
    max_rollout_nodes: int = 2000
    """Nodes of one rollout shown; the rest are counted."""
    max_pending_results: int = 5000
    """Results held between two updates of the pages; older ones are dropped from the update
    (they stay in the ethograms)."""
    label_cache: int = 64
    """(model name, version) -> motif names remembered from model states."""
    text_chars: int = 200
    """Longest string kept from a message (ids are at most 64 by their pattern)."""


def classify(topic: str) -> tuple[Kind, str] | None:
    """The kind of a subscribed topic and the node, sensor or rollout id in it."""
    parts = topic.split("/")
    if len(parts) == 3 and parts[0] == "imu" and parts[2] == "motifs":
        kind, ident = Kind.RESULT, parts[1]
    elif len(parts) == 4 and parts[:2] == ["fleet", "nodes"] and parts[3] in _NODE_KINDS:
        kind, ident = _NODE_KINDS[parts[3]], parts[2]
    elif len(parts) == 3 and parts[:2] == ["fleet", "rollouts"]:
        kind, ident = Kind.ROLLOUT, parts[2]
    elif len(parts) == 4 and parts[:2] == ["fleet", "sites"] and parts[3] == "link":
        kind, ident = Kind.LINK, parts[2]
    else:
        return None
    return (kind, ident) if topics.is_valid_id(ident) else None


_NODE_KINDS: Final = {
    "status": Kind.STATUS,
    "model": Kind.MODEL,
    "telemetry": Kind.TELEMETRY,
    "errors": Kind.ERRORS,
}


def motif_name(labels: tuple[str, ...] | None, index: int) -> str:
    """The name of motif `index`: the bundle's label, else `motif N`."""
    return labels[index] if labels is not None else f"motif {index}"


def cut(value: object, limit: int) -> str | None:
    if value is None:
        return None
    text = str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def num(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(float(value), digits)


@dataclass(slots=True)
class NodeRow:
    """What the page shows of one node (strings already cut to display length)."""

    node_id: str
    seen: float = 0.0
    state: str | None = None
    """online, stopping, offline, stopped; None before a status arrived."""
    status_ts: float | None = None
    group: str | None = None
    site: str | None = None
    """The site whose broker the node uses (sites bridged to the fleet broker)."""
    host: str | None = None
    software_version: str | None = None
    reason: str | None = None
    backend: str | None = None
    model_name: str | None = None
    model_version: str | None = None
    model_state: str | None = None
    model_target: str | None = None
    model_error: str | None = None
    model_ts: float | None = None
    """When the node reported its model state (a failed move fades from the page after a while)."""
    labels: tuple[str, ...] | None = None
    telemetry_ts: float | None = None
    interval_s: float | None = None
    windows_per_s: float | None = None
    p95_ms: float | None = None
    queue_depth: int | None = None
    queue_capacity: int | None = None
    temperature_c: float | None = None
    accelerator_temperature_c: float | None = None
    rss_mb: float | None = None
    dropped: int | None = None
    errors: int | None = None
    last_error: dict[str, Any] | None = None
    history: deque[tuple[float, float | None, float | None, int]] = field(
        default_factory=lambda: deque(maxlen=HISTORY_POINTS)
    )
    """(ts, windows/s, p95 ms, errors since the point before) for the sparklines."""
    errors_base: int | None = None

    def record(self, ts: float, windows_per_s: float | None, p95_ms: float | None) -> None:
        """Add a sparkline point from the telemetry just read (at most one per step; errors
        that came between two points count in the later one)."""
        total = self.errors or 0
        if self.history and ts - self.history[-1][0] < HISTORY_STEP_S:
            return
        new = 0 if self.errors_base is None else max(0, total - self.errors_base)
        self.errors_base = total
        self.history.append((round(ts, 1), windows_per_s, p95_ms, new))

    @property
    def online(self) -> bool:
        """True while the node's retained status says online."""
        return self.state == "online"

    def as_json(self, *, full_history: bool = False) -> dict[str, Any]:
        """The row as the page reads it: with the whole sparkline history, or (in a delta) its
        newest point, which the page appends."""
        shown = self.history if full_history else list(self.history)[-1:]
        return {
            "history": [list(point) for point in shown],
            "node_id": self.node_id,
            "state": self.state,
            "status_ts": self.status_ts,
            "group": self.group,
            "site": self.site,
            "host": self.host,
            "software_version": self.software_version,
            "reason": self.reason,
            "backend": self.backend,
            "model": {
                "name": self.model_name,
                "version": self.model_version,
                "state": self.model_state,
                "target": self.model_target,
                "error": self.model_error,
                "ts": self.model_ts,
                "labels": list(self.labels) if self.labels else None,
            },
            "telemetry_ts": self.telemetry_ts,
            "interval_s": self.interval_s,
            "windows_per_s": self.windows_per_s,
            "p95_ms": self.p95_ms,
            "queue_depth": self.queue_depth,
            "queue_capacity": self.queue_capacity,
            "temperature_c": self.temperature_c,
            "accelerator_temperature_c": self.accelerator_temperature_c,
            "rss_mb": self.rss_mb,
            "dropped": self.dropped,
            "errors": self.errors,
            "last_error": self.last_error,
        }


@dataclass(slots=True)
class RolloutRow:
    """What the page shows of one rollout."""

    head: RolloutRecord
    """The record without its per-node parts: what `newer` needs to order two writes."""
    waves: list[list[dict[str, str | None]]]
    hidden_nodes: int
    failures: int
    timeline: list[tuple[float, str]] = field(default_factory=list)
    """What happened, as this dashboard saw the record change (waves, soaks, verdicts)."""

    def followed_by(
        self, head: RolloutRecord, waves: list[list[dict[str, str | None]]], hidden: int,
        failures: int,
    ) -> RolloutRow:  # fmt: skip
        """The next version of this row, its timeline extended by what changed."""
        events = rollout_events(self.head, self.failures, head, failures, len(waves))
        timeline = (self.timeline + events)[-TIMELINE_EVENTS:]
        return RolloutRow(head, waves, hidden, failures, timeline)

    @property
    def active(self) -> bool:
        """Running or paused."""
        return self.head.state in ACTIVE_ROLLOUT_STATES

    @property
    def current_wave(self) -> int:
        """The wave in progress, 1-based (the last one once the rollout is over)."""
        return max(1, min(self.head.wave + 1, len(self.waves)))

    def as_json(self, limit: int) -> dict[str, Any]:
        """The rollout as the page reads it (wave 1-based)."""
        h = self.head
        return {
            "rollout_id": h.rollout_id,
            "name": cut(h.desired.name, limit),
            "version": cut(h.desired.version, limit),
            "group": cut(h.group, limit),
            "state": h.state.value,
            "wave": self.current_wave,
            "waves_total": len(self.waves),
            "waves": self.waves,
            "hidden_nodes": self.hidden_nodes,
            "failures": self.failures,
            "max_failures": h.max_failures,
            "command": h.command,
            "created_at": h.created_at,
            "updated_at": h.updated_at,
            "reason": cut(h.reason, limit),
            "timeline": [[ts, cut(text, limit)] for ts, text in self.timeline],
        }


def wave_name(wave: int) -> str:
    """`canary` for wave 0, else `wave N` (1-based, as the page counts)."""
    return "canary" if wave == 0 else f"wave {wave + 1}"


def rollout_events(
    before: RolloutRecord | None,
    failures_before: int,
    after: RolloutRecord,
    failures: int,
    waves: int,
) -> list[tuple[float, str]]:
    """The timeline entries between two versions of a rollout record (`before` None: the first
    one this dashboard sees)."""
    at = after.updated_at
    if before is None:
        if after.state is RolloutState.RUNNING and after.wave == 0:
            return [
                (
                    after.created_at,
                    f"started: canary of {len(after.waves[0]) if after.waves else 0}",
                )
            ]
        return [(at, f"first seen {after.state.value}, {wave_name(after.wave)}")]
    events: list[tuple[float, str]] = []
    if after.wave != before.wave and after.wave < waves:  # past the last one: the verdict
        events.append((at, f"{wave_name(after.wave)} started"))
    if after.soak_until is not None and after.soak_until != before.soak_until:
        events.append((at, f"{wave_name(after.wave)} soaks {max(0, after.soak_until - at):.0f} s"))
    if failures > failures_before:
        events.append((at, f"{failures} failed of {after.max_failures} allowed"))
    if after.state != before.state:
        reason = (
            f": {after.reason}" if after.reason and after.state not in ACTIVE_ROLLOUT_STATES else ""
        )
        events.append((at, f"{after.state.value}{reason}"))
    return events


@dataclass(slots=True)
class SensorRow:
    """One sensor's recent results: (n, ts, motif, confidence, name) per window."""

    sensor_id: str
    node_id: str
    model: str
    ethogram: deque[tuple[int, float, int, float, str]]
    results: int = 0


@dataclass
class Counters:
    """What the view has seen and refused since start."""

    messages: dict[str, int] = field(default_factory=lambda: dict.fromkeys(Kind, 0))
    rejected: dict[str, int] = field(default_factory=lambda: dict.fromkeys(Reject, 0))
    evicted: dict[str, int] = field(
        default_factory=lambda: {"node": 0, "sensor": 0, "rollout": 0, "result": 0}
    )
