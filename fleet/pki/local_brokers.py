"""Configurations for a fleet's brokers run as processes on one machine (tests and benches).

`fleet_broker_conf` is the shipped compose/mosquitto-secure.conf with only its listener ports
and file paths changed, so what is measured or tested is the configuration operators run.
`site_broker_conf` is a site broker as a bench or test runs it: a loopback listener for the
site's own clients, the shipped queue and packet limits, and the `connection` block
`imu-fleet pki bridge` wrote.
"""

from __future__ import annotations

import os
import pwd
import re
from pathlib import Path
from typing import Final

from fleet.pki.errors import PkiError
from fleet.pki.registry import Layout


def _as_this_user() -> str:
    """As root, mosquitto switches to a `mosquitto` user that cannot read the 0600 keys."""
    return f"user {pwd.getpwuid(os.geteuid()).pw_name}\n"


def fleet_broker_conf(shipped: str, ports: dict[str, int], site: Layout, data: Path) -> str:
    """`shipped` (the secure configuration's text) with its listeners on `ports` (standard port
    -> port here), its files in `site`'s folder and its persistence in `data`."""
    local = re.sub(
        r"^listener (\d+)",
        lambda m: f"listener {ports[m.group(1)]}",
        shipped,
        flags=re.MULTILINE,
    )
    for standard, actual in (
        ("/mosquitto/config/", site.broker_config),
        ("/mosquitto/certs/", site.broker_certs),
        ("/mosquitto/data/", data),
    ):
        local = local.replace(standard, f"{actual}/")
    settings = [line for line in local.splitlines() if not line.startswith("#")]
    if [line for line in settings if "/mosquitto/" in line]:
        msg = "a /mosquitto/ path of the shipped configuration was not substituted"
        raise PkiError(msg)
    return local + "\n" + _as_this_user()


LIMITS: Final = (
    "set_tcp_nodelay",
    "autosave_interval",
    "persistent_client_expiration",
    "max_queued_messages",
    "max_inflight_messages",
    "max_packet_size",
)
"""Settings of the shipped configuration a site broker keeps: its queue and packet limits (a
bridge is one of its clients, and mosquitto's defaults queue only 1,000 messages for it)."""


def site_broker_conf(port: int, data: Path, bridge_block: str, shipped: str) -> str:
    """A site broker: an open loopback listener for its own clients, persistence in `data`,
    `shipped`'s limits (`LIMITS`), and the bridge's `connection` block."""
    limits = [
        line for line in shipped.splitlines() if line.split(" ", 1)[0] in LIMITS and " " in line
    ]
    return (
        f"listener {port} 127.0.0.1\nallow_anonymous true\n"
        f"persistence true\npersistence_location {data}/\n"
        + "\n".join(limits)
        + "\n"
        + _as_this_user()
        + "log_dest stdout\nlog_type error\nlog_type warning\nlog_type notice\n\n"
        + bridge_block
    )
