"""Node configuration: defaults < TOML file < environment (`IMU_NODE_*`) < command-line flags.

Every setting has a title and a description; `imu-node config --show` prints the effective
configuration and `docs/configuration.md` documents each field.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from node.errors import ConfigError
from node.inference.backend import BackendOptions
from schemas.errors import describe_validation_error
from schemas.topics import is_valid_id

ENV_PREFIX = "IMU_NODE_"


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    """A parsed `mqtt://host:port` or `mqtts://host:port` URL."""

    host: str
    port: int
    tls: bool

    @classmethod
    def parse(cls, url: str) -> BrokerAddress:
        """Parse a broker URL; raises ValueError saying what a valid one looks like."""
        parts = urlsplit(url if "://" in url else f"mqtt://{url}")
        if parts.scheme not in {"mqtt", "mqtts", "tcp", "ssl"} or not parts.hostname:
            msg = f"broker URL {url!r} must look like mqtt://HOST:PORT or mqtts://HOST:PORT"
            raise ValueError(msg)
        tls = parts.scheme in {"mqtts", "ssl"}
        try:
            port = parts.port
        except ValueError as exc:
            msg = f"broker URL {url!r} has an invalid port"
            raise ValueError(msg) from exc
        if port is None:
            port = 8883 if tls else 1883
        elif port == 0:
            msg = f"broker URL {url!r} has port 0; give the broker's port (1883, 8883, ...)"
            raise ValueError(msg)
        return cls(host=parts.hostname, port=port, tls=tls)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'mqtts' if self.tls else 'mqtt'}://{host}:{self.port}"


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "imu-edge" / "bundles"


def parse_listen(value: str) -> tuple[str, int]:
    """`HOST:PORT` (or `[V6]:PORT`; `:PORT` for every interface) to a bind address."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        msg = f"{value!r} is not HOST:PORT (e.g. 0.0.0.0:9108, or 127.0.0.1:0 for any free port)"
        raise ValueError(msg)
    return host.strip("[]") or "0.0.0.0", int(port)  # noqa: S104 (':PORT' asks for all)


def default_spool_dir(node_id: str) -> Path:
    """`$XDG_STATE_HOME/imu-edge/spool/{node_id}` (state, not cache: it holds undelivered data)."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "imu-edge" / "spool" / node_id


class NodeConfig(BaseSettings):
    """Everything a node can be told. Unknown keys are errors (typos must not pass silently)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="forbid", frozen=True, validate_default=True
    )

    broker: str = Field(
        "mqtt://127.0.0.1:1883", title="Broker URL", description="mqtt:// or mqtts://"
    )
    username: str | None = Field(None, description="MQTT user name")
    password: SecretStr | None = Field(None, description="MQTT password (never logged)")
    ca_file: Path | None = Field(None, description="CA bundle for mqtts:// brokers")
    node_id: str | None = Field(None, description="Defaults to a stable id derived from hardware")
    group: str = Field("default", description="Fleet group this node belongs to")
    model: Path | None = Field(None, description="Model bundle to serve")
    trust_key: Path | None = Field(
        None, description="Fleet public key (PEM): refuse bundles not signed with it"
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
    mqtt_protocol: Literal["5", "3.1.1"] = Field("5", description="MQTT protocol version")
    keepalive_s: int = Field(30, ge=5, le=3600, description="MQTT keepalive")
    share_group: str | None = Field(
        None, description="Subscribe to sensor topics as $share/GROUP/... (MQTT 5 load sharing)"
    )
    sensors: str = Field("+", description="Sensor id (or + for all) whose topics to consume")
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
        description="HOST:PORT for /healthz, /readyz, /metrics and POST /infer "
        "(e.g. 0.0.0.0:9108); off when unset",
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

    @field_validator("broker")
    @classmethod
    def _broker(cls, url: str) -> str:
        BrokerAddress.parse(url)
        return url

    @field_validator("node_id", "group", "share_group")
    @classmethod
    def _identifier(cls, value: str | None) -> str | None:
        if value is not None and not is_valid_id(value):
            msg = f"{value!r} is not a valid id (letters, digits, '_', '.', ':', '-'; max 64)"
            raise ValueError(msg)
        return value

    @field_validator("http_listen")
    @classmethod
    def _http_listen(cls, value: str | None) -> str | None:
        if value is not None:
            parse_listen(value)
        return value

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

    @property
    def broker_address(self) -> BrokerAddress:
        """The parsed broker URL."""
        return BrokerAddress.parse(self.broker)

    def digest(self) -> str:
        """Short sha256 of the effective configuration (secrets excluded), for the birth message."""
        body = self.model_dump_json(exclude={"password"}).encode()
        return hashlib.sha256(body).hexdigest()[:12]


def load_config(config_file: Path | None = None, **overrides: Any) -> NodeConfig:
    """Merge defaults, the TOML file, `IMU_NODE_*` variables and `overrides` (flags, highest)."""
    if config_file is not None and not config_file.is_file():
        msg = f"config file {config_file} does not exist"
        raise ConfigError(msg)

    class _Layered(NodeConfig):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            if config_file is None:
                return (init_settings, env_settings)
            return (
                init_settings,
                env_settings,
                TomlConfigSettingsSource(settings_cls, config_file),
            )

    clean = {key: value for key, value in overrides.items() if value is not None}
    try:
        layered = _Layered(**clean)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, "configuration")) from None
    return NodeConfig.model_validate(layered.model_dump())


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
