"""A site broker's bridge to the fleet broker: mosquitto's own `connection` bridge, configured.

`write_bridge_kit` registers `bridge-SITE` on the fleet broker's site folder (a certificate from
the fleet CA; its ACL block from `roles.bridge_grants`), then writes what the site broker needs
into one folder: the `connection` block to add to its mosquitto.conf, the fleet CA, and the
bridge's certificate and key. The bridge carries, per direction:

- down, fleet -> site: desired state (fleet-wide, every group's, its own nodes') and
  artifacts (retained at the site: each crosses the link once, however many nodes fetch it);
  not rollout records, which no node reads;
- up, site -> fleet: its own nodes' status, telemetry, model and errors, and results only for
  the sensors the site chose;
- never: sensor windows and samples, which stay on the site.

Its link state is mosquitto's bridge notification on `fleet/sites/SITE/link`: retained `1` on
both brokers while up, and `0` (the bridge's will on the fleet broker) when the link drops.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Final

from fleet.pki.certs import LEAF_DAYS
from fleet.pki.errors import PkiError
from fleet.pki.files import write_atomic
from fleet.pki.registry import Layout
from fleet.pki.roles import Client, bridge_routes
from fleet.pki.site import add_client
from schemas import topics

FLEET_TLS_PORT: Final = 8883
"""The fleet broker's client-certificate listener (compose/mosquitto-secure.conf)."""
DEFAULT_FILES_DIR: Final = "/mosquitto/config/bridge"
"""Where the kit's files sit on the site broker (mounted with its config in the container)."""


@dataclass(frozen=True, slots=True)
class BridgeKit:
    """What `write_bridge_kit` wrote: the bridge client and its files."""

    client: Client
    conf: Path
    files: tuple[Path, ...]


def render_bridge_conf(client: Client, fleet_address: str, files_dir: str) -> str:
    """The `connection` block for the site broker's mosquitto.conf."""
    site, username = client.name, client.username
    lines = [
        f"# Bridge of site {site!r} to the fleet broker: written by `imu-fleet pki bridge`.",
        "# Down: desired state, artifacts. Up: this site's nodes' reports"
        + (" and the chosen sensors' results." if client.sensors else "."),
        "# Sensor windows stay on the site. The fleet broker's ACL for this login grants the",
        "# same topics and nothing else. Add this block to the site broker's mosquitto.conf.",
        f"connection {username}",
        f"address {fleet_address}",
        "bridge_protocol_version mqttv311",
        f"remote_clientid {username}",
        f"local_clientid {username}-local",
        "cleansession false",
        "try_private true",
        "start_type automatic",
        "restart_timeout 2 60",
        f"bridge_cafile {files_dir}/fleet-ca.crt",
        f"bridge_certfile {files_dir}/{username}.crt",
        f"bridge_keyfile {files_dir}/{username}.key",
        "bridge_insecure false",
        "notifications true",
        "notifications_local_only false",
        f"notification_topic {topics.site_link(site)}",
    ]
    down, up = bridge_routes(client)
    lines += [f"topic {pattern} in {qos}" for pattern, qos in down]
    lines += [f"topic {pattern} out {qos}" for pattern, qos in up]
    return "\n".join(lines) + "\n"


def write_bridge_kit(
    fleet_root: Path,
    site: str,
    out: Path,
    *,
    fleet_host: str,
    nodes: tuple[str, ...],
    sensors: tuple[str, ...] = (),
    files_dir: str = DEFAULT_FILES_DIR,
    days: int = LEAF_DAYS,
) -> BridgeKit:
    """Register `bridge-SITE` on the fleet broker's site folder and write the site's kit.

    `fleet_host` is `HOST` or `HOST:PORT` of the fleet broker's certificate listener (8883 when
    no port is given); HOST must be one of the fleet broker certificate's names.
    """
    if not nodes:
        msg = (
            f"a bridge speaks for the site's nodes: give them with --node or --nodes-file "
            f"(site {site!r})"
        )
        raise PkiError(msg)
    host, sep, port = fleet_host.rpartition(":")
    if not sep or not port.isdigit():
        host, port = fleet_host, str(FLEET_TLS_PORT)
    address = f"{host}:{port}"
    added = add_client(fleet_root, "bridge", site, nodes=nodes, sensors=sensors, days=days)
    client = added.client
    layout = Layout(fleet_root)
    out.mkdir(parents=True, exist_ok=True)
    username = client.username
    copies = {
        out / "fleet-ca.crt": (layout.ca_cert, 0o644),
        out / f"{username}.crt": (layout.client_file(username, "crt"), 0o644),
        out / f"{username}.key": (layout.client_file(username, "key"), 0o600),
    }
    for target, (source, mode) in copies.items():
        write_atomic(target, source.read_bytes(), mode)
    conf = out / f"{username}.conf"
    write_atomic(conf, render_bridge_conf(client, address, files_dir).encode(), 0o644)
    return BridgeKit(client, conf, (conf, *copies))
