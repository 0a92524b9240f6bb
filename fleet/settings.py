"""The fleet tools' broker settings: the node's `BrokerSettings`, read from `IMU_FLEET_*`.

Every `imu-fleet` command that talks to the broker takes the same connection flags (`--broker`,
`--username`, `--password-file`, `--ca-file`, `--cert-file`, `--key-file`, `--config`), and the
same values from `IMU_FLEET_*` variables (`IMU_FLEET_PASSWORD` for the password) or a TOML file.
"""

from __future__ import annotations

import argparse

from pydantic_settings import SettingsConfigDict

from common.mqtt.connection import BrokerSettings, add_broker_arguments

ENV_PREFIX = "IMU_FLEET_"


class FleetBrokerSettings(BrokerSettings):
    """How the fleet tools reach the broker."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="forbid", frozen=True, validate_default=True
    )


def broker_options(parser: argparse.ArgumentParser) -> None:
    """Add the connection flags every broker-facing `imu-fleet` command takes."""
    add_broker_arguments(parser, ENV_PREFIX)
