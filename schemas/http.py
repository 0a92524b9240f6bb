"""Pydantic models of the node's HTTP answers, beside the window and result it shares with MQTT.

The node's own endpoints (`/livez`, `/readyz`) sit next to the ones a client of the original
FastAPI "HailoRT TCN inference sidecar" calls (`/`, `/healthz`, `/status`, `POST /test`,
`POST /infer`), with the sidecar's field names where it had them. `schemas.openapi` builds the
OpenAPI document from these models, and the node builds every answer through them, so the
document cannot drift from what is served.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from schemas.messages import ModelRef, Outbound

HTTP_API_VERSION = "1.0.0"
"""Version of the HTTP contract (the sidecar's endpoints and the node's own)."""

HealthState = Literal["ok", "waiting", "starting", "degraded", "stopping"]


class ApiError(Outbound):
    """Every refusal: a short machine-readable `error` and a `reason` that says what to do."""

    error: str = Field(description="e.g. unauthorized, invalid, busy, no_model, not_found")
    reason: str


class ServiceIndex(Outbound):
    """`GET /`: what this service is and where its endpoints and docs are."""

    service: Literal["imu-node"] = "imu-node"
    description: str
    version: str = Field(description="Installed software version")
    api_version: str = Field(description="Version of this HTTP contract")
    endpoints: dict[str, str] = Field(description="`METHOD /path` -> what it does")
    docs: str = Field(description="Path of the human-readable API page (works offline)")
    openapi: str = Field(description="Path of the OpenAPI document")


class Liveness(Outbound):
    """`GET /livez`: the process answers. 200 whatever the model's state: for systemd and
    container health checks, which must not restart a node that waits for its first model."""

    alive: Literal[True] = True
    node_id: str
    status: HealthState
    uptime_s: int


class Health(Outbound):
    """`GET /healthz`: can this node infer? 200 with `ok: true` only while a model serves;
    503 with `ok: false` and the reason while there is none, it starts, stops or its backend
    is rebuilt. The first eight fields are the sidecar's."""

    ok: bool
    model: str | None = Field(description="Name of the model served (the sidecar's `model`)")
    uptime_s: int
    config_version: str | None = Field(description="Version of the model bundle served")
    hef_sha256: str | None = Field(description="sha256 of the HEF served (null on the CPU)")
    version: str = Field(description="Installed software version")
    device: str | None = Field(description="e.g. hailo8, hailo8l, cpu")
    latency_ms: float | None = Field(description="Latency of the last window served")
    status: HealthState
    reason: str | None = Field(description="Why `ok` is false")
    node_id: str
    backend: str | None = Field(description="hailo or onnx")
    model_version: str | None


class Readiness(Outbound):
    """`GET /readyz`: should traffic come here now? 503 names the checks that fail."""

    ready: bool
    checks: dict[str, bool]


class ModelStatus(Outbound):
    """The model part of `/status`."""

    loaded: bool
    name: str | None
    version: str | None
    backend: str | None
    quantized: bool | None
    hef_sha256: str | None
    onnx_sha256: str | None


class DeviceStatus(Outbound):
    """The device part of `/status`: what serves the model, and how it fares."""

    name: str | None = Field(description="e.g. hailo8, cpu")
    identity: str | None = Field(description="The backend's description of its device")
    healthy: bool
    temperature_celsius: float | None = Field(description="Where the device has a sensor")
    utilization_percent: float | None = Field(
        description="Share of the last minute a backend call ran, per worker"
    )
    rebuilds: int
    watchdog_stalls: int


class QueueStatus(Outbound):
    """The inference queue."""

    depth: int
    capacity: int


class ServiceStatus(Outbound):
    """`GET /status`: the model and device state, and which endpoints can answer now."""

    service: Literal["imu-node"] = "imu-node"
    version: str
    api_version: str
    node_id: str
    group: str | None
    uptime_s: int
    status: HealthState
    hailort_available: bool = Field(description="Whether HailoRT (hailo_platform) is installed")
    model: ModelStatus
    device: DeviceStatus
    endpoint_status: dict[str, Literal["ok", "unavailable"]]
    broker_connected: bool
    queue: QueueStatus
    windows_inferred: int


class SelfTest(Outbound):
    """`POST /test`: a 100 x 9 window of zeros through the node's queue and model."""

    test_status: Literal["passed"] = "passed"
    latent_shape: list[int]
    motif_shape: list[int]
    latent_range: tuple[float, float] = Field(description="Smallest and largest latent value")
    motif_range: tuple[float, float] = Field(description="Smallest and largest motif score")
    inference_time_ms: float = Field(description="Request in to result out, on the node")
    model: ModelRef
