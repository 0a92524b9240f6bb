"""Client roles, their usernames (`{role}-{name}`) and the mosquitto ACL they expand to.

`render_acl` writes one `user` block per client, its role's grants expanded for its name, and no
`pattern` line (a pattern applies to every client and cannot strip the role prefix from `%u`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final, Literal

from fleet.pki.errors import PkiError
from schemas import topics

Access = Literal["read", "write", "readwrite"]
Auth = Literal["cert", "password", "both"]
AUTH_CHOICES: Final = ("cert", "password", "both")


@dataclass(frozen=True, slots=True)
class Grant:
    """One ACL line: `topic ACCESS TOPIC_FILTER`."""

    access: Access
    topic: str


@dataclass(frozen=True, slots=True)
class Role:
    """A kind of client: what it may do, and how it logs in unless told otherwise."""

    name: str
    summary: str
    default_auth: Auth
    grants: Callable[[Client], tuple[Grant, ...]]


def sensor_grants(sensor_id: str) -> tuple[Grant, ...]:
    """A sensor publishes its own windows and samples, and reads nothing."""
    return (
        Grant("write", topics.window(sensor_id)),
        Grant("write", topics.samples(sensor_id)),
    )


def node_grants(node_id: str) -> tuple[Grant, ...]:
    """A node reads sensor data and desired state, and writes results and its own reports.

    Shared subscriptions (`$share/GROUP/imu/+/window`) need no line of their own: mosquitto 2.0
    checks read access per delivered message, on the message's topic (`imu/s1/window`). A node of
    a share group (docs/scaling.md) reads every node's status (the group's members) and every
    result (where a gone member's windows had got to).
    """
    return (
        Grant("read", topics.window("+")),
        Grant("read", topics.samples("+")),
        Grant("readwrite", topics.motifs("+")),
        Grant("readwrite", topics.node_status(node_id)),
        Grant("read", topics.NODES_STATUS_FILTER),
        Grant("write", topics.node_telemetry(node_id)),
        Grant("write", topics.node_model(node_id)),
        Grant("write", topics.node_errors(node_id)),
        Grant("read", topics.FLEET_DESIRED),
        Grant("read", topics.group_desired("+")),
        Grant("read", topics.node_desired(node_id)),
        Grant("read", topics.artifact("+", "+", "#")),
    )


def fleet_grants(_name: str) -> tuple[Grant, ...]:
    """The fleet role alone writes desired state, artifacts, rollouts and controller presence.

    It reads the whole `fleet/` tree, sensor data (recording) and results, and `$SYS` (the only
    role that does: broker load is for operators, not for dashboards or devices).
    """
    return (
        Grant("write", topics.FLEET_DESIRED),
        Grant("write", topics.group_desired("+")),
        Grant("write", topics.node_desired("+")),
        Grant("write", "fleet/artifacts/#"),
        Grant("write", topics.rollout("#")),
        Grant("write", topics.controller("#")),
        Grant("read", "fleet/#"),
        Grant("read", topics.motifs("+")),
        Grant("read", topics.window("+")),
        Grant("read", topics.samples("+")),
        Grant("read", "$SYS/#"),
    )


def check_grants(name: str) -> tuple[Grant, ...]:
    """`imu-node check` on a secured site: it plays one sensor of its own (`check-NAME`, a name
    no sensor login can take: sensors are `sensor-ID`), reads that sensor's results and the
    nodes' telemetry, and nothing else."""
    sensor = f"check-{name}"
    return (
        Grant("write", topics.window(sensor)),
        Grant("read", topics.motifs(sensor)),
        Grant("read", topics.node_telemetry("+")),
    )


def bridge_routes(client: Client) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """What a site's bridge carries, (down, up) as (topic filter, QoS): the one list both its
    ACL block and its `connection` block (fleet/pki/bridges.py) are made from.

    Down to the site: desired state (fleet-wide, every group's, its own nodes'), which is how a
    rollout controls nodes, and artifacts. Up to the fleet: its own nodes' status, telemetry,
    model and errors, and results only of the sensors the site chose. Sensor windows and
    samples never leave a site. Rollout records stay at the fleet too: no node reads one, and
    the controller rewrites a record (hundreds of bytes per node) every few seconds.
    """
    down = [
        (topics.FLEET_DESIRED, 1),
        (topics.group_desired("+"), 1),
        *((topics.node_desired(node), 1) for node in client.nodes),
        (topics.artifact("+", "+", "#"), 1),
    ]
    up: list[tuple[str, int]] = []
    for node in client.nodes:
        up += [
            (topics.node_status(node), 1),
            (topics.node_telemetry(node), 0),
            (topics.node_model(node), 1),
            (topics.node_errors(node), 1),
        ]
    up += [(topics.motifs(sensor), 1) for sensor in client.sensors]
    return down, up


def bridge_grants(client: Client) -> tuple[Grant, ...]:
    """A site broker's bridge to the fleet broker (`bridge-SITE`), on the fleet broker: it reads
    what goes down, and writes what goes up and its link state (`bridge_routes`). A
    compromised site cannot speak for another site's nodes."""
    down, up = bridge_routes(client)
    return (
        *(Grant("read", topic) for topic, _ in down),
        Grant("write", topics.site_link(client.name)),
        *(Grant("write", topic) for topic, _ in up),
    )


def dashboard_grants(_name: str) -> tuple[Grant, ...]:
    """A dashboard reads results, node reports, rollout records and site links; it writes
    nothing."""
    return (
        Grant("read", topics.motifs("+")),
        Grant("read", topics.node_status("+")),
        Grant("read", topics.node_telemetry("+")),
        Grant("read", topics.node_model("+")),
        Grant("read", topics.node_errors("+")),
        Grant("read", topics.rollout("#")),
        Grant("read", topics.SITE_LINKS_FILTER),
    )


ROLES: Final[dict[str, Role]] = {
    role.name: role
    for role in (
        Role(
            "sensor",
            "publishes imu/{id}/window|samples only",
            "cert",
            lambda c: sensor_grants(c.name),
        ),
        Role(
            "node",
            "sensor data in, results and its own fleet/nodes/{id}/* out",
            "cert",
            lambda c: node_grants(c.name),
        ),
        Role(
            "fleet",
            "controller/operators: desired state, artifacts, rollouts",
            "cert",
            lambda c: fleet_grants(c.name),
        ),
        Role(
            "check",
            "imu-node check: one test sensor check-NAME, its results, node telemetry",
            "cert",
            lambda c: check_grants(c.name),
        ),
        Role(
            "dashboard",
            "read-only: results, node reports, rollout records, site links",
            "password",
            lambda c: dashboard_grants(c.name),
        ),
        Role(
            "bridge",
            "a site broker's bridge: desired state down, its own nodes' reports up",
            "cert",
            bridge_grants,
        ),
    )
}


@dataclass(frozen=True, slots=True)
class Client:
    """One registered client: `{role}-{name}` with a certificate, a password or both."""

    role: str
    name: str
    cert: bool
    password: bool
    nodes: tuple[str, ...] = ()
    """A bridge's site nodes: the only nodes it may speak for on the fleet broker."""
    sensors: tuple[str, ...] = ()
    """A bridge's sensors whose results go up to the fleet (none: results stay on the site)."""

    @property
    def username(self) -> str:
        """The MQTT username, which is also the certificate's CN."""
        return username_for(self.role, self.name)

    def grants(self) -> tuple[Grant, ...]:
        """The ACL lines of this client, its role's grants expanded for its name."""
        return ROLES[self.role].grants(self)


def username_for(role: str, name: str) -> str:
    """`sensor-imu-17` for role `sensor` and name `imu-17`, after checking both."""
    if role not in ROLES:
        msg = f"unknown role {role!r}; choose one of {', '.join(ROLES)}"
        raise PkiError(msg)
    if not topics.is_valid_id(name):
        msg = (
            f"name {name!r} must be one topic level: letters, digits and _.:- "
            "(at most 64, starting with a letter or digit)"
        )
        raise PkiError(msg)
    return f"{role}-{name}"


def render_acl(site: str, clients: Iterable[Client]) -> str:
    """The mosquitto acl_file for `clients`: a header, then one `user` block per client."""
    ordered = sorted(clients, key=lambda c: (list(ROLES).index(c.role), c.name))
    lines = [
        f"# mosquitto ACL of IMU site {site!r}: generated by `imu-fleet pki`; do not edit.",
        "# Regenerate with `imu-fleet pki acl SITE_DIR`, then send the broker SIGHUP.",
        "#",
        "# One `user` block per client (username = certificate CN = `{role}-{name}`); no",
        "# `pattern` lines, because a pattern applies to every client and cannot strip the role",
        "# prefix from %u. Whatever no line grants is denied; a client without a block (revoked,",
        "# unknown, anonymous) may neither publish nor receive anything. mosquitto 2.0 grants",
        "# every SUBSCRIBE and checks `read` per delivered message, on the message's topic: a",
        "# `$share/GROUP/imu/+/window` subscription is governed by `topic read imu/+/window`.",
        "#",
        "# roles:",
        *(f"#   {role.name:<10} {role.summary}" for role in ROLES.values()),
    ]
    for client in ordered:
        lines += ["", f"# {client.role} {client.name}", f"user {client.username}"]
        lines += [f"topic {grant.access} {grant.topic}" for grant in client.grants()]
    return "\n".join(lines) + "\n"
