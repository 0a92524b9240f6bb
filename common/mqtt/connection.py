"""How every client of the system reaches and logs in to the broker: one settings model.

The node (`imu-node`, `IMU_NODE_*`, its TOML file) and the fleet tools (`imu-fleet`,
`IMU_FLEET_*`, `--config`) read the same fields from flags, environment and TOML alike:

- `broker`: `mqtt://HOST:PORT` or `mqtts://HOST:PORT` (TLS);
- `mqtt_protocol`: "5" or "3.1.1";
- `username`, and the password from `password_file` (a file readable by the service only) or
  the environment (`IMU_NODE_PASSWORD`, `IMU_FLEET_PASSWORD`); never from a command-line flag,
  where every user of the machine could read it in the process list;
- `ca_file`: the site CA for mqtts:// (the system's CAs when unset);
- `cert_file` + `key_file`: a client certificate (the broker may take its CN as the username).

`Connection` is what the rest of the code passes around: a parsed broker address, the protocol
and the resolved credentials, turned into a session's settings with `session_settings`.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from common.mqtt.address import BrokerAddress
from common.mqtt.client import SessionSettings
from schemas.errors import describe_validation_error


@dataclass(frozen=True, slots=True)
class Credentials:
    """What a client presents to the broker (all optional: a loopback demo needs none)."""

    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


@dataclass(frozen=True, slots=True)
class Connection:
    """A broker to reach, the protocol to speak, and how to log in."""

    address: BrokerAddress
    protocol: str = "5"
    credentials: Credentials = Credentials()

    @classmethod
    def of(cls, broker: str | Connection, protocol: str = "5") -> Connection:
        """`broker` as a connection (a bare URL logs in with no credentials)."""
        if isinstance(broker, Connection):
            return broker
        return cls(BrokerAddress.parse(broker), protocol)

    def session_settings(self, client_id: str, **extra: Any) -> SessionSettings:
        """Settings for an `MqttSession` with this connection's address and credentials."""
        c = self.credentials
        return SessionSettings(
            address=self.address,
            client_id=client_id,
            protocol=extra.pop("protocol", self.protocol),
            username=c.username,
            password=c.password,
            ca_file=c.ca_file,
            cert_file=c.cert_file,
            key_file=c.key_file,
            **extra,
        )

    def __str__(self) -> str:
        who = f" as {self.credentials.username}" if self.credentials.username else ""
        cert = " with a client certificate" if self.credentials.cert_file else ""
        return f"{self.address}{who}{cert}"


class BrokerSettings(BaseSettings):
    """The broker connection fields every client configuration has (node and fleet tools)."""

    model_config = SettingsConfigDict(extra="forbid", frozen=True, validate_default=True)

    broker: str = Field(
        "mqtt://127.0.0.1:1883", title="Broker URL", description="mqtt:// or mqtts://"
    )
    mqtt_protocol: Literal["5", "3.1.1"] = Field("5", description="MQTT protocol version")
    username: str | None = Field(None, description="MQTT user name")
    password: SecretStr | None = Field(
        None, description="MQTT password, from the environment only (never logged)"
    )
    password_file: Path | None = Field(
        None, description="File holding the MQTT password (first line), readable by the service"
    )
    ca_file: Path | None = Field(None, description="CA bundle for mqtts:// brokers")
    cert_file: Path | None = Field(None, description="Client certificate (PEM) for mqtts://")
    key_file: Path | None = Field(None, description="Private key (PEM) of cert_file")

    @field_validator("broker")
    @classmethod
    def _broker(cls, url: str) -> str:
        BrokerAddress.parse(url)
        return url

    @model_validator(mode="after")
    def _pairs(self) -> BrokerSettings:
        if self.password is not None and self.password_file is not None:
            msg = "give the password either in password_file or in the environment, not both"
            raise ValueError(msg)
        if (self.cert_file is None) != (self.key_file is None):
            msg = "cert_file and key_file go together: give both or neither"
            raise ValueError(msg)
        tls_only = [n for n in ("ca_file", "cert_file") if getattr(self, n) is not None]
        if tls_only and not BrokerAddress.parse(self.broker).tls:
            msg = f"{' and '.join(tls_only)} need an mqtts:// broker URL, not {self.broker}"
            raise ValueError(msg)
        return self

    @property
    def broker_address(self) -> BrokerAddress:
        """The parsed broker URL."""
        return BrokerAddress.parse(self.broker)

    def connection(self) -> Connection:
        """Address, protocol and credentials; reads `password_file` (ValueError if unreadable)."""
        password = self.password.get_secret_value() if self.password else None
        if self.password_file is not None:
            try:
                password = self.password_file.read_text().splitlines()[0]
            except (OSError, IndexError) as exc:
                msg = f"cannot read the password from {self.password_file}: {exc}"
                raise ValueError(msg) from exc
        for name in ("ca_file", "cert_file", "key_file"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                msg = f"{name} {path} does not exist"
                raise ValueError(msg)
        credentials = Credentials(
            username=self.username,
            password=password,
            ca_file=str(self.ca_file) if self.ca_file else None,
            cert_file=str(self.cert_file) if self.cert_file else None,
            key_file=str(self.key_file) if self.key_file else None,
        )
        return Connection(self.broker_address, self.mqtt_protocol, credentials)


SettingsT = TypeVar("SettingsT", bound=BrokerSettings)


def load_layered(
    settings_cls: type[SettingsT], config_file: Path | None, /, **overrides: Any
) -> SettingsT:
    """Defaults < TOML file < environment (the model's prefix) < `overrides` (flags, not None).

    Checks what the connection needs to read (password file, CA, client certificate) too.
    Raises ValueError with one readable sentence per problem."""
    if config_file is not None and not config_file.is_file():
        msg = f"config file {config_file} does not exist"
        raise ValueError(msg)

    class _Layered(settings_cls):  # type: ignore[valid-type,misc]
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
        raise ValueError(describe_validation_error(exc, "configuration")) from None
    settings = settings_cls.model_validate(layered.model_dump())
    settings.connection()  # the password file, CA and client certificate must be readable
    return settings


class NoPasswordFlag(argparse.Action):
    """`--password` is refused outright (and would otherwise abbreviate --password-file)."""

    def __call__(self, parser: argparse.ArgumentParser, *_: Any, **__: Any) -> None:
        parser.error(
            "--password is not accepted: a password on the command line is visible to every "
            "user of this machine; use --password-file or the *_PASSWORD environment variable"
        )


def add_broker_arguments(parser: argparse.ArgumentParser, env_prefix: str) -> None:
    """The connection flags every client command takes (values also from env and --config)."""
    group = parser.add_argument_group(
        "broker connection",
        f"flags > {env_prefix}* environment > --config TOML > defaults; the password comes "
        f"from --password-file or {env_prefix}PASSWORD, never from a flag",
    )
    group.add_argument("--config", type=Path, default=None, help="TOML file with these settings")
    group.add_argument(
        "--broker", default=None, help="mqtt://HOST:PORT or mqtts://HOST:PORT (127.0.0.1:1883)"
    )
    group.add_argument("--mqtt-protocol", choices=["5", "3.1.1"], default=None, help="(5)")
    group.add_argument("--username", default=None, help="MQTT user name")
    group.add_argument("--password-file", type=Path, default=None, help="file with the password")
    group.add_argument("--password", action=NoPasswordFlag, help=argparse.SUPPRESS)
    group.add_argument("--ca-file", type=Path, default=None, help="site CA (PEM) for mqtts://")
    group.add_argument("--cert-file", type=Path, default=None, help="client certificate (PEM)")
    group.add_argument("--key-file", type=Path, default=None, help="its private key (PEM)")


def connection_from_args(
    args: argparse.Namespace, settings_cls: type[BrokerSettings]
) -> Connection:
    """The connection `add_broker_arguments` flags describe, layered over env and TOML."""
    settings = load_layered(
        settings_cls,
        args.config,
        broker=args.broker,
        mqtt_protocol=args.mqtt_protocol,
        username=args.username,
        password_file=args.password_file,
        ca_file=args.ca_file,
        cert_file=args.cert_file,
        key_file=args.key_file,
    )
    return settings.connection()
