"""The topic tree (the public contract, docs/topics.md), in one place.

Build topic names with the functions here, never with string literals elsewhere, so that a change
to the tree is one change. `CATALOGUE` lists every topic with its publisher, QoS, retain flag and
payload model; `docs/topics.md` is generated from it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from schemas.limits import SENSOR_ID_PATTERN

_ID = re.compile(SENSOR_ID_PATTERN)


class SensorTopicKind(StrEnum):
    """The sensor-facing topic kinds under `imu/{sensor_id}/`."""

    WINDOW = "window"
    SAMPLES = "samples"
    MOTIFS = "motifs"


WINDOW_FILTER: Final = "imu/+/window"
SAMPLES_FILTER: Final = "imu/+/samples"
MOTIFS_FILTER: Final = "imu/+/motifs"
FLEET_DESIRED: Final = "fleet/models/desired"
NODES_STATUS_FILTER: Final = "fleet/nodes/+/status"
NODES_MODEL_FILTER: Final = "fleet/nodes/+/model"
NODES_TELEMETRY_FILTER: Final = "fleet/nodes/+/telemetry"
ROLLOUTS_FILTER: Final = "fleet/rollouts/+"
CONTROLLERS_FILTER: Final = "fleet/controllers/+"
SITE_LINKS_FILTER: Final = "fleet/sites/+/link"


def window(sensor_id: str) -> str:
    """Topic a sensor publishes whole windows to."""
    return f"imu/{sensor_id}/window"


def samples(sensor_id: str) -> str:
    """Topic a sensor publishes runs of consecutive samples to."""
    return f"imu/{sensor_id}/samples"


def motifs(sensor_id: str) -> str:
    """Topic a node publishes one result per window to."""
    return f"imu/{sensor_id}/motifs"


def node_status(node_id: str) -> str:
    """Retained birth/will/stopped status of a node."""
    return f"fleet/nodes/{node_id}/status"


def node_telemetry(node_id: str) -> str:
    """Periodic telemetry of a node."""
    return f"fleet/nodes/{node_id}/telemetry"


def node_model(node_id: str) -> str:
    """Retained actual model state of a node."""
    return f"fleet/nodes/{node_id}/model"


def node_errors(node_id: str) -> str:
    """One message per rejected input or failed step."""
    return f"fleet/nodes/{node_id}/errors"


def node_desired(node_id: str) -> str:
    """Retained desired model for one node (wave overrides)."""
    return f"fleet/nodes/{node_id}/desired"


def group_desired(group: str) -> str:
    """Retained desired model for a group of nodes."""
    return f"fleet/groups/{group}/desired"


def artifact(name: str, version: str, part: str) -> str:
    """Retained bundle chunk or manifest of a model version."""
    return f"fleet/artifacts/{name}/{version}/{part}"


def artifact_manifest(name: str, version: str) -> str:
    """Retained reassembly manifest of a published bundle."""
    return artifact(name, version, "manifest")


def artifact_chunk(name: str, version: str, index: int) -> str:
    """Retained chunk `index` of a published bundle."""
    return artifact(name, version, f"chunks/{index}")


def rollout(rollout_id: str) -> str:
    """Retained record of one rollout."""
    return f"fleet/rollouts/{rollout_id}"


def controller(controller_id: str) -> str:
    """Retained presence of a running rollout controller (cleared by its will)."""
    return f"fleet/controllers/{controller_id}"


def site_link(site: str) -> str:
    """Retained state of a site's bridge to the fleet broker: `1` up, `0` down (its will)."""
    return f"fleet/sites/{site}/link"


def shared(filter_: str, group: str | None) -> str:
    """Wrap a filter in an MQTT 5 shared subscription when a share group is given."""
    return f"$share/{group}/{filter_}" if group else filter_


def is_valid_id(value: str) -> bool:
    """True when `value` is usable as a sensor or node id (one safe topic level)."""
    return bool(_ID.fullmatch(value))


@dataclass(frozen=True, slots=True)
class SensorTopic:
    """A parsed `imu/{sensor_id}/{kind}` topic."""

    sensor_id: str
    kind: SensorTopicKind


def parse_sensor_topic(topic: str) -> SensorTopic | None:
    """Parse `imu/{sensor_id}/{kind}`; None when the topic is not of that shape."""
    parts = topic.split("/")
    if len(parts) != 3 or parts[0] != "imu":
        return None
    try:
        kind = SensorTopicKind(parts[2])
    except ValueError:
        return None
    return SensorTopic(sensor_id=parts[1], kind=kind)


def node_of(topic: str) -> str | None:
    """The node id in `fleet/nodes/{node_id}/...`, or None for other topics."""
    parts = topic.split("/")
    return parts[2] if len(parts) >= 4 and parts[:2] == ["fleet", "nodes"] else None


@dataclass(frozen=True, slots=True)
class TopicSpec:
    """One row of the topic catalogue."""

    pattern: str
    publisher: str
    qos: int
    retained: bool
    payload: str
    description: str


CATALOGUE: Final[tuple[TopicSpec, ...]] = (
    TopicSpec(
        "imu/{sensor_id}/window",
        "sensor",
        1,
        False,
        "WindowMessage",
        "One whole 100 x 9 window (JSON, or a 3600-byte float32 frame).",
    ),
    TopicSpec(
        "imu/{sensor_id}/samples",
        "sensor",
        1,
        False,
        "SamplesMessage",
        "A run of consecutive samples; the node cuts windows with its hop.",
    ),
    TopicSpec(
        "imu/{sensor_id}/motifs",
        "node",
        1,
        False,
        "MotifResult",
        "One result per window: latent, motif scores, model, latency.",
    ),
    TopicSpec(
        "fleet/nodes/{node_id}/status",
        "node + will",
        1,
        True,
        "NodeStatus",
        "Birth `online`; will `offline`; clean stop `stopped` (a share group's member "
        "says `stopping` first).",
    ),
    TopicSpec(
        "fleet/nodes/{node_id}/telemetry",
        "node",
        0,
        False,
        "Telemetry",
        "Periodic rates, latency percentiles, queue, drops, errors, CPU, RSS.",
    ),
    TopicSpec(
        "fleet/nodes/{node_id}/model",
        "node",
        1,
        True,
        "NodeModelState",
        "The node's actual model state.",
    ),
    TopicSpec(
        "fleet/nodes/{node_id}/errors",
        "node",
        1,
        False,
        "ErrorReport",
        "One message per rejected input or failed step.",
    ),
    TopicSpec(
        "fleet/models/desired", "fleet", 1, True, "DesiredModel", "Fleet-wide desired model."
    ),
    TopicSpec(
        "fleet/groups/{group}/desired",
        "fleet",
        1,
        True,
        "DesiredModel",
        "Group override of the desired model.",
    ),
    TopicSpec(
        "fleet/nodes/{node_id}/desired",
        "fleet",
        1,
        True,
        "DesiredModel",
        "Node override of the desired model (how waves are rolled).",
    ),
    TopicSpec(
        "fleet/artifacts/{name}/{version}/manifest",
        "fleet",
        1,
        True,
        "ArtifactManifest",
        "How to reassemble a bundle: size, sha256, chunk hashes.",
    ),
    TopicSpec(
        "fleet/artifacts/{name}/{version}/chunks/{index}",
        "fleet",
        1,
        True,
        "bytes",
        "The bundle in chunks, for nodes that only reach the broker.",
    ),
    TopicSpec(
        "fleet/rollouts/{rollout_id}",
        "fleet",
        1,
        True,
        "RolloutRecord",
        "Rollout record: plan, wave, per-node outcome, state.",
    ),
    TopicSpec(
        "fleet/controllers/{controller_id}",
        "controller + will",
        1,
        True,
        "ControllerPresence",
        "Retained while a controller runs; its empty will clears it when it dies.",
    ),
    TopicSpec(
        "fleet/sites/{site}/link",
        "site bridge + will",
        1,
        True,
        "bytes",
        "`1` while a site broker's bridge to the fleet broker is up, `0` when it went down "
        "(mosquitto's bridge notification).",
    ),
)
