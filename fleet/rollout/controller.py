"""The rollout controller: canary, growing waves, a failure budget, rollback, resumable.

State lives only in retained topics: the plan and every node's outcome in the rollout record
(`fleet/rollouts/{id}`), the nodes' own reports, and the desired-state topics. A wave moves its
nodes by setting their node-level desired state; it passes when each reports the new version
active (and stays online) within the wave timeout. More failures than allowed stop the rollout
and restore every moved node's previous model with a signed rollback desired state. On success
the group (or fleet-wide) desired state names the new version and the node overrides are
cleared. A controller that dies mid-rollout is replaced by `imu-fleet resume ID`, which picks
the record up where it stopped.

A record names its controller; one whose controller has no presence (`presence.py`) or that
stopped heart-beating can be taken over, and a controller that finds its rollout taken over by
another stops driving it.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING

from common.cli import some_of
from common.mqtt.connection import Connection
from common.mqtt.session import MqttSession
from common.signing import TrustStore, load_private_key, load_trust, sign_message, trust_of
from fleet.desired import clear_payload, desired_topic
from fleet.rollout.presence import Presence, presence_session
from fleet.rollout.records import RolloutBook
from fleet.rollout.renewal import DesiredBook
from fleet.rollout.view import SLACK_S, FleetView
from fleet.rollout.waves import (
    HEARTBEAT_S,
    MAX_DEFAULT_SOAK_S,
    RECORD_OVERHEAD,
    SOAK_INTERVALS,
    Progress,
    RolloutError,
    WaveDriver,
)
from schemas import topics
from schemas.codec import encode
from schemas.control import (
    ArtifactManifest,
    DesiredModel,
    NodeHealth,
    NodeOutcome,
    NodeRolloutState,
    RolloutGates,
    RolloutRecord,
)
from schemas.messages import FollowedDesired

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

logger = logging.getLogger(__name__)

STALE_S = 3 * HEARTBEAT_S
"""A running record not updated for this long has lost its controller."""
SOAK_LATENESS = 1.1
"""A soak is refused when a node's telemetry interval is longer than it by more than this
factor: a busy node's report comes a little late, and a soak of its nominal interval works."""


def plan_waves(node_ids: list[str], canary: int, percents: list[int]) -> list[list[str]]:
    """Canary wave first, then waves reaching each cumulative percentage of all nodes."""
    nodes = sorted(node_ids)
    total = len(nodes)
    waves = [nodes[: min(canary, total)]] if canary > 0 else []
    done = len(waves[0]) if waves else 0
    for percent in sorted(set(percents)):
        upto = min(total, max(done, math.ceil(percent / 100 * total)))
        if upto > done:
            waves.append(nodes[done:upto])
            done = upto
    if done < total:
        waves.append(nodes[done:])
    return waves


def plan_waves_by_site(sites: dict[str, list[str]], canary: int) -> list[list[str]]:
    """Canary nodes in the first site (by name), then the rest of that site, then each other
    site in turn (nodes that name no site last): a bad version meets one site before the
    others, and one site's link carries one wave's orders and reports at a time."""
    named = sorted(site for site in sites if site)
    order = [*named, *([""] if "" in sites else [])]
    if not order:
        return []
    first = sorted(sites[order[0]])
    waves = [first[: max(canary, 1)], first[max(canary, 1) :]]
    waves += [sorted(sites[site]) for site in order[1:]]
    return [wave for wave in waves if wave]


class Controller(WaveDriver):
    """Runs rollouts over one MQTT session.

    Make one with `Controller.connect` (which sets the presence will) and `close` it when done.
    """

    def __init__(
        self,
        session: MqttSession,
        *,
        sign_key: Path | None = None,
        trust_key: Path | None = None,
        progress: Progress | None = None,
    ) -> None:
        self.session = session
        self.presence = Presence(session)
        self.controller_id = self.presence.controller_id
        self.view = FleetView(session)
        self._sign_key = load_private_key(sign_key) if sign_key else None
        self.trust: TrustStore | None = None
        """Whose signatures this controller takes on artifact manifests and rollout records:
        its own key's and `trust_key`'s. None (no key): it signs nothing and checks nothing."""
        if self._sign_key is not None:
            self.trust = trust_of(self._sign_key, trust_key)
        elif trust_key is not None:
            self.trust = load_trust(trust_key)
        self._progress = progress
        self.book = RolloutBook(session, self.trust)
        self.desired = DesiredBook(session, self.trust)
        """The current group and fleet desired states (a rollback restores what it changed)."""
        self._applied: dict[str, str | None] = {}
        self._watching_since = time.time()
        """When this controller began to receive the fleet's telemetry."""
        self._last_saved: dict[str, float] = {}
        """Rollout id -> when this controller last wrote its record (monotonic)."""
        self._save_cost = 0.0

    @classmethod
    def connect(
        cls,
        broker: str | Connection,
        *,
        protocol: str = "5",
        client_id: str | None = None,
        sign_key: Path | None = None,
        trust_key: Path | None = None,
        progress: Progress | None = None,
        timeout_s: float = 10.0,
    ) -> Controller:
        """A controller on its own connected session, announcing itself with a presence will."""
        session = presence_session(broker, protocol=protocol, client_id=client_id)
        controller = cls(session, sign_key=sign_key, trust_key=trust_key, progress=progress)
        session.connect(timeout_s)
        return controller

    @property
    def signing_key(self) -> Ed25519PrivateKey | None:
        """The fleet key this controller signs with (None: it signs nothing)."""
        return self._sign_key

    def close(self) -> None:
        """Withdraw the presence, deliver what is queued and disconnect."""
        self.presence.withdraw()
        self.session.wait_published(10)
        self.session.stop()

    # -- what the broker knows --------------------------------------------------------------

    def is_driven(self, record: RolloutRecord) -> bool:
        """True while a live controller drives `record` (else anyone may take it over)."""
        if is_stale(record):
            return False
        if record.controller is None:  # written by a controller without presence
            return True
        return self.presence.is_live(record.controller)

    def artifact(self, name: str, version: str) -> ArtifactManifest | None:
        """The published manifest of a version, once its retained message has arrived."""
        return self.book.artifact(name, version)

    def records(self) -> list[RolloutRecord]:
        """Every rollout record on the broker, newest first."""
        return self.book.all()

    def record(self, rollout_id: str) -> RolloutRecord | None:
        """One rollout record."""
        return self.book.get(rollout_id)

    # -- starting ---------------------------------------------------------------------------

    def start(
        self,
        name: str,
        version: str,
        *,
        group: str | None = None,
        canary: int = 1,
        waves: list[int] | None = None,
        max_failures: int = 0,
        wave_timeout_s: float = 120.0,
        gates: RolloutGates | None = None,
        by_site: bool = False,
        site_hold_s: float | None = None,
    ) -> RolloutRecord:
        """Plan a rollout of a published version over the online nodes (of a group).

        `gates` (see `default_gates`) make every wave soak and judge its nodes' health; None
        passes a wave as soon as its nodes report the version active. `by_site` waves by the
        sites nodes name (`plan_waves_by_site`) instead of by percentages; `site_hold_s` is how
        long a node behind a down site link is held past the wave timeout (default 600 s)."""
        artifact = self.book.artifact(name, version)
        refused = self.book.refused(topics.artifact_manifest(name, version))
        if artifact is None and refused:
            msg = (
                f"{refused[0].reason}: this controller signs desired states only from a manifest "
                f"its key signed. Publish the bundle again with `imu-fleet publish BUNDLE "
                "--sign-key KEY`"
            )
            raise RolloutError(msg)
        if artifact is None:
            msg = f"{name} {version} is not published: run `imu-fleet publish BUNDLE` first"
            raise RolloutError(msg)
        targets = self.targets(group)
        if not targets:
            where = f"group {group}" if group else "the fleet"
            msg = f"no online node in {where} (see `imu-fleet nodes`)"
            raise RolloutError(msg)
        self.require_key_for(targets, "roll out to")
        strict = self.strict_nodes(targets)
        if strict and artifact.bundle_key_id is None:
            msg = (
                f"{name} {version} is an unsigned bundle and {len(strict)} of the nodes "
                f"({', '.join(strict[:5])}) take only signed ones: they would refuse it, the "
                "canary first. Sign it (`imu-fleet bundle sign BUNDLE --key fleet.key`), publish "
                "it again, then roll it out"
            )
            raise RolloutError(msg)
        now = time.time()
        stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(now))
        rollout_id = f"{name}-{version}-{stamp}-{secrets.token_hex(2)}"  # unique within a second
        desired = self._sign(
            DesiredModel(
                name=name,
                version=version,
                bundle_sha256=artifact.bundle_sha256,
                bundle_size=artifact.bundle_size,
                url=artifact.url,
                rollout_id=rollout_id,
                issued_at=now,
            )
        )
        if by_site:
            sites: dict[str, list[str]] = {}
            for node_id in targets:
                view = self.view.get(node_id)
                sites.setdefault((view.site if view else None) or "", []).append(node_id)
            plan = plan_waves_by_site(sites, canary)
        else:
            plan = plan_waves(targets, canary, waves or [10, 50, 100])
        level, target = ("group", group) if group else ("fleet", "")
        record = RolloutRecord(
            rollout_id=rollout_id,
            desired=desired,
            group=group,
            waves=plan,
            max_failures=max_failures,
            wave_timeout_s=wave_timeout_s,
            nodes={n: NodeOutcome(wave=i) for i, wave in enumerate(plan) for n in wave},
            created_at=now,
            updated_at=now,
            gates=gates,
            scope_previous=self.desired.current(desired_topic(level, target)),
            site_hold_s=site_hold_s,
        )
        self._check_soak_spans_a_report(targets, gates)
        self._check_record_fits(record)
        soak = f", soak {gates.soak_s:g} s per wave" if gates else ", no health gates"
        return self._save(record, f"planned {len(targets)} nodes in {len(plan)} waves{soak}")

    def _check_soak_spans_a_report(self, node_ids: list[str], gates: RolloutGates | None) -> None:
        """Refuse a soak shorter than a node's telemetry interval (that of its latest report):
        the gates judge the reports whose interval began inside the soak, so such a node would
        fail each time with "no telemetry during the soak" (seen: `--soak 2` on nodes reporting
        every 5 s)."""
        if gates is None:
            return
        slow = {
            n: v.telemetry.interval_s
            for n in node_ids
            if (v := self.view.get(n)) is not None
            and v.telemetry is not None
            and v.telemetry.interval_s > gates.soak_s * SOAK_LATENESS + SLACK_S
        }
        if slow:
            longest = max(slow.values())
            msg = (
                f"a {gates.soak_s:g} s soak is shorter than the telemetry interval of "
                f"{some_of(sorted(slow))} (up to {longest:.1f} s): no report of theirs would "
                f"fall inside it and each would fail its gates. Soak at least {math.ceil(longest)} "
                "s (leave --soak out for 3 intervals), or lower telemetry_interval_s on those nodes"
            )
            raise RolloutError(msg)

    def _check_record_fits(self, record: RolloutRecord) -> None:
        """Refuse a rollout whose record would outgrow the broker's packet limit once every node
        has moved and been judged: a record names each node with its outcome, and a broker
        closes the connection of a client that sends a larger packet."""
        limit = self.session.max_packet_size
        if limit is None or not record.nodes:
            return
        health = None
        if record.gates is not None:  # figures as wide as real ones
            health = NodeHealth(
                passed=True, soak_samples=99, windows=999_999, error_rate=0.012345,
                reference_error_rate=0.012345, p95_ms=123.45, reference_p95_ms=123.45,
                results_ratio=0.99, reference_results_ratio=0.99,
            )  # fmt: skip
        now = time.time()
        nodes = {
            node_id: outcome.model_copy(
                update={
                    "state": NodeRolloutState.ACTIVE,
                    "moved_at": now,
                    "previous": self._previous_of(self.view.get(node_id), record),
                    "health": health,
                }
            )
            for node_id, outcome in record.nodes.items()
        }
        full = record.model_copy(update={"nodes": nodes, "controller": self._owner})
        if self._sign_key is not None:
            full = sign_message(full, self._sign_key)
        size = len(encode(full)) + RECORD_OVERHEAD
        if size > limit:
            msg = (
                f"this rollout's record would reach {size:,} bytes once its {len(nodes):,} nodes "
                f"have moved (about {size // len(nodes):,} bytes per node), and the broker takes "
                f"packets up to {limit:,} (its max_packet_size). Roll out one group at a time "
                "(--group), or raise max_packet_size on the fleet broker (docs/scaling.md)"
            )
            raise RolloutError(msg)

    def targets(self, group: str | None = None) -> list[str]:
        """The online nodes a rollout of `group` (None: the fleet) would move."""
        return [
            n.node_id for n in self.view.nodes() if n.online and (group is None or n.group == group)
        ]

    def default_gates(self, node_ids: list[str] | None = None, **thresholds: float) -> RolloutGates:
        """Gates whose soak lasts `SOAK_INTERVALS` of the slowest telemetry interval among
        `node_ids` (all known nodes when None; 10 s when none reported one yet)."""
        views = [v for v in self.view.nodes() if node_ids is None or v.node_id in node_ids]
        intervals = [v.telemetry.interval_s for v in views if v.telemetry is not None]
        soak = thresholds.pop("soak_s", None)
        if soak is None:
            soak = min(MAX_DEFAULT_SOAK_S, SOAK_INTERVALS * max(intervals, default=10.0))
        return RolloutGates(soak_s=soak, **thresholds)

    # -- signatures and pins ------------------------------------------------------------------

    def pins(
        self, group: str | None = None, *, exclude: set[str] | None = None
    ) -> dict[str, FollowedDesired]:
        """Nodes (of `group`) that follow a node-level desired state, a pin: a later group or
        fleet-wide desired state does not reach them."""
        found: dict[str, FollowedDesired] = {}
        for view in self.view.nodes():
            following = view.model.following if view.model else None
            if following is None or following.scope != "node":
                continue
            if (group is None or view.group == group) and view.node_id not in (exclude or set()):
                found[view.node_id] = following
        return found

    def unpin(self, node_ids: list[str]) -> list[str]:
        """Clear the node-level desired state of `node_ids` (signed when the key is given);
        returns them. Nodes then follow their group's or the fleet's desired state."""
        self.require_key_for(node_ids, "unpin")
        for node_id in node_ids:
            self.session.publish(
                desired_topic("node", node_id),
                clear_payload("node", node_id, self._sign_key),
                retain=True,
            )
        self.session.wait_published(10)
        return node_ids


def send_command(
    session: MqttSession,
    record: RolloutRecord,
    command: str,
    key: Ed25519PrivateKey | None = None,
) -> None:
    """Ask the running controller to pause, resume, abort or roll back (retained record).

    Stamped now, so that the controller takes it even if it wrote the record again after
    `record` was read (it keeps only the command from it; its own state wins). Signed with the
    fleet `key`: a controller that has the key acts only on commands signed by it.
    """
    updated = record.model_copy(update={"command": command, "updated_at": time.time()})
    if key is not None:
        updated = sign_message(updated, key)
    session.publish(topics.rollout(record.rollout_id), encode(updated), retain=True)


def is_stale(record: RolloutRecord, now: float | None = None) -> bool:
    """True when a running record's controller stopped heart-beating."""
    return (now or time.time()) - record.updated_at > STALE_S


__all__ = ["Controller", "RolloutError", "is_stale", "plan_waves", "send_command"]
