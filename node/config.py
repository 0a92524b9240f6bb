"""Node configuration: defaults < TOML file < environment (`IMU_NODE_*`) < command-line flags.

Every setting has a title and a description; `imu-node config --show` prints the effective
configuration and `docs/configuration.md` documents each field.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import (
    SettingsConfigDict,
)

from common.http import is_loopback, parse_listen
from common.mqtt.connection import BrokerSettings, load_layered
from node.errors import ConfigError
from runtime.backend import BackendOptions
from schemas.topics import is_valid_id

ENV_PREFIX = "IMU_NODE_"


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "imu-edge" / "bundles"


def default_state_dir(node_id: str) -> Path:
    """`$XDG_STATE_HOME/imu-edge/state/{node_id}`: what the node must not forget on a restart."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "imu-edge" / "state" / node_id


def default_spool_dir(node_id: str) -> Path:
    """`$XDG_STATE_HOME/imu-edge/spool/{node_id}` (state, not cache: it holds undelivered data)."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "imu-edge" / "spool" / node_id


class NodeConfig(BrokerSettings):
    """Everything a node can be told. Unknown keys are errors (typos must not pass silently).

    The broker connection fields (broker, mqtt_protocol, username, password, password_file,
    ca_file, cert_file, key_file) are the shared `BrokerSettings` the fleet tools use too."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="forbid", frozen=True, validate_default=True
    )

    node_id: str | None = Field(None, description="Defaults to a stable id derived from hardware")
    group: str = Field("default", description="Fleet group this node belongs to")
    site: str | None = Field(
        None,
        description="The site this node is at, when site brokers are bridged to a fleet broker "
        "(its status says it; fleet tools group nodes by site)",
    )
    model: Path | None = Field(
        None,
        description="Model bundle to serve (unset: the bundle served last, else the node waits "
        "for the fleet's first order)",
    )
    trust_key: Path | None = Field(
        None,
        description="Fleet public key (PEM), or a folder of *.pub keys (rotation): refuse "
        "bundles and desired states not signed by one of them",
    )
    file_url_root: Path | None = Field(
        None,
        description="Folder file:// bundle URLs may point into (off when unset: desired states "
        "with file:// URLs are refused)",
    )
    state_dir: Path | None = Field(
        None,
        description="Where the node keeps what must survive restarts, e.g. the desired-state "
        "history that refuses replays (default: $XDG_STATE_HOME/imu-edge/state/NODE_ID)",
    )
    follow_desired: bool = Field(
        True, description="Follow the fleet's desired-model topics and hot-swap models"
    )
    cache_dir: Path = Field(
        default_factory=_default_cache_dir,
        description="Where fetched, verified bundles are kept (rollbacks need no download)",
    )
    max_bundle_bytes: int = Field(
        256 * 1024 * 1024, ge=1024, description="Largest bundle this node accepts"
    )
    fetch_timeout_s: float = Field(
        120.0, gt=0, le=3600, description="Longest a bundle download (URL or artifact) may take"
    )
    desired_fresh_s: float = Field(
        900.0,
        ge=60,
        le=7 * 86400,
        description="With a trust key: a signed desired state on a topic this node has no record "
        "of (new, re-imaged) is taken only when issued within this many seconds; the controller "
        "service renews current ones more often than that",
    )
    backend: Literal["auto", "hailo", "onnx"] = Field(
        "auto",
        description="hailo, onnx, or auto: Hailo when the bundle has a HEF and a device is found",
    )
    fallback: Literal["none", "onnx"] = Field(
        "none",
        description="onnx: serve on ONNX Runtime when the Hailo device cannot be opened or keeps "
        "failing (none: report and keep retrying the device)",
    )
    threads: int = Field(1, ge=1, le=64, description="CPU threads for the ONNX Runtime backend")
    workers: int | Literal["auto"] = Field(
        "auto",
        description="Inference threads, each sensor pinned to one (its results stay in order). "
        "auto: one per CPU core, at most 4 (divided by `threads`) on ONNX Runtime; 1 on Hailo, "
        "whose backend keeps its own jobs in flight",
    )
    hailo_timeout_ms: int = Field(1000, ge=10, le=60_000, description="Hailo: per-call timeout")
    hailo_max_jobs: int = Field(
        4, ge=1, le=64, description="Hailo: most async jobs in flight (the device's queue caps it)"
    )
    hailo_frames_per_job: int = Field(
        8, ge=1, le=256, description="Hailo: most frames per async job (the device's queue caps it)"
    )
    hailo_batch_size: int = Field(
        0, ge=0, le=256, description="Hailo: device batch (burst) size; 0 lets HailoRT choose"
    )
    inference_deadline_ms: int = Field(
        0,
        ge=0,
        le=600_000,
        description="Watchdog: a backend call running longer is aborted and the backend rebuilt "
        "(0: derived from the model's measured cost, at least 1 s)",
    )
    keepalive_s: int = Field(30, ge=5, le=3600, description="MQTT keepalive")
    share_group: str | None = Field(
        None,
        description="Divide the sensors with the other live nodes of this group: each sensor's "
        "`samples` are served by one node (rendezvous hashing), `window` topics are shared as "
        "$share/GROUP/... (docs/scaling.md)",
    )
    sensors: str = Field("+", description="Sensor id (or + for all) whose topics to consume")
    results_qos: Literal[0, 1] = Field(
        1,
        description="QoS of results: 1 (acknowledged, spooled while the broker is away; a window "
        "is acknowledged once its result is safe) or 0 (cheaper; a result is lost with the "
        "connection, and counted as dropped when there is none)",
    )
    hop: int = Field(50, ge=1, le=100, description="Samples between windows cut from `samples`")
    queue_size: int = Field(512, ge=1, le=100_000, description="Windows waiting for inference")
    max_batch: int = Field(8, ge=1, le=256, description="Largest micro-batch per inference call")
    batch_wait_ms: float = Field(
        0.0,
        ge=0,
        le=1000,
        description="How long the worker waits to fill a micro-batch (0: take what is queued)",
    )
    telemetry_interval_s: float = Field(10.0, gt=0, le=3600, description="Telemetry period")
    max_pending_publishes: int = Field(
        10_000,
        ge=10,
        description="Messages paho holds in memory until the broker acknowledges them",
    )
    http_listen: str | None = Field(
        None,
        description="HOST:PORT for the HTTP side: /healthz, /livez, /readyz, /status, /metrics, "
        "POST /infer, POST /test, /, /docs, /openapi.json (e.g. 0.0.0.0:9108); off when unset",
    )
    http_token_file: Path | None = Field(
        None,
        description="File holding the bearer token POST /infer, POST /test, /status and /metrics "
        "require (`Authorization: Bearer TOKEN`); /, /healthz, /livez, /readyz, /docs and "
        "/openapi.json stay open",
    )
    http_metrics_token_file: Path | None = Field(
        None,
        description="File holding the bearer token /metrics requires instead (the scrape role: "
        "Prometheus then cannot run POST /infer, and an /infer client cannot read metrics); "
        "unset: http_token_file guards /metrics too",
    )
    http_tls_cert: Path | None = Field(None, description="HTTPS: certificate (PEM) for http_listen")
    http_tls_key: Path | None = Field(None, description="HTTPS: private key (PEM) of http_tls_cert")
    http_open: bool = Field(
        False,
        description="Allow http_listen on a non-loopback address without http_token_file (POST "
        "/infer and /metrics then open to the network: a deliberate choice)",
    )
    http_infer_timeout_s: float = Field(
        5.0, gt=0, description="POST /infer: longest wait for a result before 504"
    )
    spool_dir: Path | None = Field(
        None,
        description="Where results wait on disk while the broker is away "
        "(default: $XDG_STATE_HOME/imu-edge/spool/NODE_ID)",
    )
    spool_max_mb: int = Field(
        256, ge=0, description="Disk the spool may use; results past it are dropped and counted"
    )
    error_reports_per_s: float = Field(
        5.0, gt=0, description="Errors-topic rate per sensor and kind; the rest are counted"
    )
    drain_timeout_s: float = Field(10.0, ge=0, description="SIGTERM: time to finish in-flight work")
    switch_interval_ms: float = Field(
        0.5, gt=0, le=10, description="Python thread switch interval (lower = tighter tail)"
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Log threshold (JSON lines on stderr)"
    )

    @field_validator("node_id", "group", "share_group", "site")
    @classmethod
    def _identifier(cls, value: str | None) -> str | None:
        if value is not None and not is_valid_id(value):
            msg = f"{value!r} is not a valid id (letters, digits, '_', '.', ':', '-'; max 64)"
            raise ValueError(msg)
        return value

    @field_validator("workers", mode="before")
    @classmethod
    def _workers_not_bool(cls, value: object) -> object:
        if isinstance(value, bool):  # TOML `workers = true` must not mean 1
            msg = "workers must be 1-64 or 'auto', not a boolean"
            raise ValueError(msg)
        return value

    @field_validator("workers")
    @classmethod
    def _workers(cls, value: int | str) -> int | str:
        if isinstance(value, int) and not 1 <= value <= 64:
            msg = f"workers must be 1-64 or 'auto', not {value}"
            raise ValueError(msg)
        return value

    @field_validator("http_listen")
    @classmethod
    def _http_listen(cls, value: str | None) -> str | None:
        if value is not None:
            parse_listen(value)
        return value

    @model_validator(mode="after")
    def _http_security(self) -> NodeConfig:
        if (self.http_tls_cert is None) != (self.http_tls_key is None):
            msg = "http_tls_cert and http_tls_key go together: give both or neither"
            raise ValueError(msg)
        if self.http_listen is None:
            return self
        host, _ = parse_listen(self.http_listen)
        if not is_loopback(host) and self.http_token_file is None and not self.http_open:
            msg = (
                f"http_listen {self.http_listen} reaches beyond this machine: set http_token_file "
                "(a bearer token for /infer and /metrics), or http_open = true to serve them "
                "unauthenticated on purpose"
            )
            raise ValueError(msg)
        return self

    @model_validator(mode="after")
    def _certificate_names_this_node(self) -> NodeConfig:
        """A site certificate is made for one node (`node-ID`): another node id would connect
        and then have every publish refused by the ACL, with nothing but 'not authorized'."""
        if self.cert_file is None or self.node_id is None:
            return self
        name = certificate_name(Path(self.cert_file))
        if name is not None and name.startswith("node-") and name != f"node-{self.node_id}":
            msg = (
                f"node_id is {self.node_id!r} but cert_file {self.cert_file} was made for "
                f"{name!r}: set node_id = {name.removeprefix('node-')!r}, or use the "
                f"certificate made for node-{self.node_id} (`imu-fleet pki add SITE node "
                f"{self.node_id}`)"
            )
            raise ValueError(msg)
        return self

    @model_validator(mode="after")
    def _share_group_results(self) -> NodeConfig:
        if self.share_group and self.results_qos == 0:
            msg = (
                "share_group needs results_qos = 1: the group reads results to know which "
                "windows a member that went away left, and a QoS 0 result can overtake the "
                "member's will"
            )
            raise ValueError(msg)
        return self

    @field_validator("sensors")
    @classmethod
    def _sensors(cls, value: str) -> str:
        if value != "+" and not is_valid_id(value):
            msg = f"sensors must be '+' or one sensor id, not {value!r}"
            raise ValueError(msg)
        return value

    def backend_options(self) -> BackendOptions:
        """The backend tuning knobs of this configuration."""
        return BackendOptions(
            threads=self.threads,
            timeout_ms=self.hailo_timeout_ms,
            max_jobs=self.hailo_max_jobs,
            frames_per_job=self.hailo_frames_per_job,
            batch_size=self.hailo_batch_size,
        )

    def digest(self) -> str:
        """Short sha256 of the effective configuration (secrets excluded), for the birth message."""
        body = self.model_dump_json(exclude={"password", "password_file"}).encode()
        return hashlib.sha256(body).hexdigest()[:12]


def load_config(config_file: Path | None = None, **overrides: Any) -> NodeConfig:
    """Merge defaults, the TOML file, `IMU_NODE_*` variables and `overrides` (flags, highest)."""
    try:
        return load_layered(NodeConfig, config_file, **overrides)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def settings_reference() -> str:
    """The settings table of docs/configuration.md, generated from the model."""
    rows = [
        "| setting | environment | type | default | meaning |",
        "|---|---|---|---|---|",
    ]
    for name, field in NodeConfig.model_fields.items():
        default = "(per user cache)" if field.default_factory else field.default
        shown = "" if default is None else f"`{default}`"
        kind = (
            str(field.annotation)
            .replace("typing.", "")
            .replace("<class '", "")
            .replace("'>", "")
            .replace("pathlib.", "")
            .replace("pydantic.types.", "")
            .replace("Literal", "one of ")
            .replace(" | None", " (optional)")
        )
        env = f"{ENV_PREFIX}{name.upper()}"
        rows.append(f"| `{name}` | `{env}` | {kind} | {shown} | {field.description or ''} |")
    return "\n".join(rows) + "\n"


def certificate_name(path: Path) -> str | None:
    """The common name of a PEM certificate (None when it cannot be read: the connection then
    says why)."""
    from cryptography import x509  # noqa: PLC0415 (only with a client certificate)
    from cryptography.x509.oid import NameOID  # noqa: PLC0415

    try:
        certificate = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return None
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else None
