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
from collections.abc import Callable
from pathlib import Path

from common.mqtt.connection import Connection
from common.mqtt.session import MqttSession
from common.signing import load_private_key, sign_desired
from fleet.desired import clear_payload, desired_topic, scoped
from fleet.rollout.presence import Presence, presence_session
from fleet.rollout.records import RolloutBook, superseded
from fleet.rollout.view import FleetView, NodeView
from node.errors import NodeError
from schemas import topics
from schemas.codec import encode
from schemas.messages import (
    ArtifactManifest,
    DesiredModel,
    ModelLifecycle,
    NodeOutcome,
    NodeRolloutState,
    RolloutRecord,
    RolloutState,
)

logger = logging.getLogger(__name__)

Progress = Callable[[RolloutRecord, str], None]
HEARTBEAT_S = 5.0
"""A running controller republishes its record at least this often."""
PAUSE_POLL_S = 0.2
"""How often a paused controller looks for the operator's next command."""
STALE_S = 3 * HEARTBEAT_S
"""A running record not updated for this long has lost its controller."""
_MOVED = (NodeRolloutState.UPDATING, NodeRolloutState.ACTIVE, NodeRolloutState.FAILED)


class RolloutError(NodeError):
    """A rollout cannot start or continue; the message says why."""


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


class Controller:
    """Runs rollouts over one MQTT session.

    Make one with `Controller.connect` (which sets the presence will) and `close` it when done.
    """

    def __init__(
        self,
        session: MqttSession,
        *,
        sign_key: Path | None = None,
        progress: Progress | None = None,
    ) -> None:
        self.session = session
        self.presence = Presence(session)
        self.controller_id = self.presence.controller_id
        self.view = FleetView(session)
        self._sign_key = load_private_key(sign_key) if sign_key else None
        self._progress = progress
        self.book = RolloutBook(session)
        self._applied: dict[str, str | None] = {}
        self._last_saved = 0.0

    @classmethod
    def connect(
        cls,
        broker: str | Connection,
        *,
        protocol: str = "5",
        client_id: str | None = None,
        sign_key: Path | None = None,
        progress: Progress | None = None,
        timeout_s: float = 10.0,
    ) -> Controller:
        """A controller on its own connected session, announcing itself with a presence will."""
        session = presence_session(broker, protocol=protocol, client_id=client_id)
        controller = cls(session, sign_key=sign_key, progress=progress)
        session.start()
        if not session.wait_connected(timeout_s):
            session.stop()
            msg = f"cannot connect to {broker} within {timeout_s:g} s"
            raise ConnectionError(msg)
        return controller

    def close(self) -> None:
        """Withdraw the presence, deliver what is queued and disconnect."""
        self.presence.withdraw()
        self.session.wait_published(10)
        self.session.stop()

    # -- what the broker knows --------------------------------------------------------------

    @property
    def _owner(self) -> str | None:
        """What this controller writes as a record's `controller` (None without presence)."""
        return self.controller_id if self.presence.announces else None

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
    ) -> RolloutRecord:
        """Plan a rollout of a published version over the online nodes (of a group)."""
        artifact = self.book.artifact(name, version)
        if artifact is None:
            msg = f"{name} {version} is not published: run `imu-fleet publish BUNDLE` first"
            raise RolloutError(msg)
        targets = [
            n.node_id for n in self.view.nodes() if n.online and (group is None or n.group == group)
        ]
        if not targets:
            where = f"group {group}" if group else "the fleet"
            msg = f"no online node in {where} (see `imu-fleet nodes`)"
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
        plan = plan_waves(targets, canary, waves or [10, 50, 100])
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
        )
        return self._save(record, f"planned {len(targets)} nodes in {len(plan)} waves")

    # -- running ----------------------------------------------------------------------------

    def run(self, record: RolloutRecord) -> RolloutRecord:
        """Drive a rollout to its end; returns the final record."""
        while record.state in (RolloutState.RUNNING, RolloutState.PAUSED):
            record = self._obey(record)
            if record.state is RolloutState.PAUSED:  # wait for resume/abort, still heart-beating
                if time.monotonic() - self._last_saved > HEARTBEAT_S:
                    record = self._save(record, "paused")
                time.sleep(PAUSE_POLL_S)
                continue
            if record.state is not RolloutState.RUNNING:
                continue
            if record.wave >= len(record.waves):
                record = self._finish(record)
                break
            record = self._run_wave(record)
        return record

    def take_over(self, record: RolloutRecord, command: str) -> RolloutRecord:
        """Act on a rollout whose controller is gone: resume, pause, abort or roll back here.

        The take-over and the command go out as one write: a write of the old controller that
        lands late can then only be replaced by this one, never by an earlier state of ours.
        """
        self._applied[record.rollout_id] = command  # the old controller's last command is spent
        gone = record.controller or "a controller without presence"
        update = {"command": command, "epoch": record.epoch + 1, "controller": self._owner}
        record = record.model_copy(update=update)
        self.book.put(record)
        if command == "rollback":
            return self._roll_back(record, f"rollback requested (taken over from {gone})",
                                   RolloutState.ROLLED_BACK)  # fmt: skip
        state = {"resume": RolloutState.RUNNING, "pause": RolloutState.PAUSED}.get(
            command, RolloutState.ABORTED
        )
        saved = self._save(record.model_copy(update={"state": state}),
                           f"taken over from {gone} to {command}")  # fmt: skip
        return self.run(saved) if state is RolloutState.RUNNING else saved

    def _run_wave(self, record: RolloutRecord) -> RolloutRecord:
        index = record.wave
        wave = record.waves[index]
        for node_id in wave:
            if record.nodes[node_id].state is NodeRolloutState.PENDING:
                record = self._move(record, node_id)
        record = self._save(record, f"wave {index + 1}/{len(record.waves)}: {len(wave)} nodes")
        deadline = time.monotonic() + record.wave_timeout_s
        last_save = time.monotonic()
        while True:
            record = self._obey(record)
            if record.state is not RolloutState.RUNNING:
                return record
            record, changed = self._collect(record, wave, expired=time.monotonic() > deadline)
            if record.failures > record.max_failures:
                reason = f"{record.failures} nodes failed (budget {record.max_failures})"
                return self._roll_back(record, reason, RolloutState.FAILED)
            pending = [n for n in wave if record.nodes[n].state is NodeRolloutState.UPDATING]
            if not pending:
                record = record.model_copy(update={"wave": index + 1})
                return self._save(record, f"wave {index + 1} passed")
            if changed or time.monotonic() - last_save > HEARTBEAT_S:
                record = self._save(record, f"wave {index + 1}: {len(pending)} nodes pending")
                last_save = time.monotonic()
            self.view.wait_changed(0.5)

    def _collect(
        self, record: RolloutRecord, wave: list[str], *, expired: bool
    ) -> tuple[RolloutRecord, bool]:
        nodes = dict(record.nodes)
        changed = False
        target = record.desired.version
        for node_id in wave:
            outcome = nodes[node_id]
            if outcome.state is not NodeRolloutState.UPDATING:
                continue
            view = self.view.get(node_id)
            state, error = _progress_of(view, target)
            if state is NodeRolloutState.UPDATING and expired:
                state, error = NodeRolloutState.FAILED, "no active report within the wave timeout"
            if state is not NodeRolloutState.UPDATING:
                nodes[node_id] = outcome.model_copy(update={"state": state, "error": error})
                changed = True
        return record.model_copy(update={"nodes": nodes}), changed

    def _move(self, record: RolloutRecord, node_id: str) -> RolloutRecord:
        previous = self._previous_of(self.view.get(node_id), record.rollout_id)
        self.session.publish(
            desired_topic("node", node_id),
            encode(scoped(record.desired, "node", node_id, self._sign_key)),
            retain=True,
        )
        outcome = record.nodes[node_id].model_copy(
            update={"state": NodeRolloutState.UPDATING, "previous": previous}
        )
        return record.model_copy(update={"nodes": {**record.nodes, node_id: outcome}})

    def _previous_of(self, view: NodeView | None, rollout_id: str) -> DesiredModel | None:
        state = view.model if view else None
        if state is None or state.active is None or state.active_sha256 is None:
            return None
        return self._sign(
            DesiredModel(
                name=state.active.name,
                version=state.active.version,
                bundle_sha256=state.active_sha256,
                bundle_size=state.active_size or 0,
                rollback=True,
                rollout_id=rollout_id,
                issued_at=time.time(),
            )
        )

    def _finish(self, record: RolloutRecord) -> RolloutRecord:
        level, target = ("group", record.group) if record.group else ("fleet", "")
        self.session.publish(
            desired_topic(level, target or ""),
            encode(scoped(record.desired, level, target or "", self._sign_key)),
            retain=True,
        )
        for node_id in record.nodes:
            clear = clear_payload("node", node_id, self._sign_key)
            self.session.publish(desired_topic("node", node_id), clear, retain=True)
        record = record.model_copy(update={"state": RolloutState.SUCCEEDED})
        return self._save(record, f"succeeded: {level} desired is now {record.desired.version}")

    def _roll_back(self, record: RolloutRecord, reason: str, state: RolloutState) -> RolloutRecord:
        nodes = dict(record.nodes)
        for node_id, outcome in record.nodes.items():
            if outcome.state not in _MOVED:
                continue
            if outcome.previous is not None:
                payload = encode(scoped(outcome.previous, "node", node_id, self._sign_key))
            else:  # nothing known to restore: drop the override
                payload = clear_payload("node", node_id, self._sign_key)
            self.session.publish(desired_topic("node", node_id), payload, retain=True)
            nodes[node_id] = outcome.model_copy(update={"state": NodeRolloutState.ROLLED_BACK})
        update = {"nodes": nodes, "state": state, "reason": f"{reason}; moved nodes rolled back"}
        return self._save(record.model_copy(update=update), f"stopped: {reason}; rolled back")

    def _obey(self, record: RolloutRecord) -> RolloutRecord:
        """Apply a command an operator set on the retained record."""
        latest = self.record(record.rollout_id)
        if latest is not None and superseded(latest, record, self.controller_id):
            self._hand_over(latest)
        command = latest.command if latest else None
        if command is None or command == self._applied.get(record.rollout_id):
            return record
        self._applied[record.rollout_id] = command
        record = record.model_copy(update={"command": command})
        if command == "pause":
            return self._save(record.model_copy(update={"state": RolloutState.PAUSED}), "paused")
        if command == "resume":
            return self._save(record.model_copy(update={"state": RolloutState.RUNNING}), "resumed")
        if command == "abort":
            return self._save(record.model_copy(update={"state": RolloutState.ABORTED}), "aborted")
        return self._roll_back(record, "rollback requested", RolloutState.ROLLED_BACK)

    # -- publishing -------------------------------------------------------------------------

    def _save(self, record: RolloutRecord, event: str) -> RolloutRecord:
        record = record.model_copy(update={"updated_at": time.time(), "controller": self._owner})
        record, newer = self.book.save(record, self.controller_id)
        if newer is not None:
            self._hand_over(newer)
        self.session.publish(topics.rollout(record.rollout_id), encode(record), retain=True)
        logger.info("%s: %s", record.rollout_id, event)
        if self._progress is not None:
            self._progress(record, event)
        self._last_saved = time.monotonic()
        return record

    def _hand_over(self, latest: RolloutRecord) -> None:
        """Stop driving: republish the newer record (a late write of ours must not stay the
        retained state) and raise."""
        self.session.publish(topics.rollout(latest.rollout_id), encode(latest), retain=True)
        msg = f"{latest.rollout_id} was taken over by {latest.controller}; stopping here"
        raise RolloutError(msg)

    def _sign(self, desired: DesiredModel) -> DesiredModel:
        return sign_desired(desired, self._sign_key) if self._sign_key else desired


def _progress_of(view: NodeView | None, version: str) -> tuple[NodeRolloutState, str | None]:
    """Where a node stands on the way to `version`, from its own reports."""
    state = view.model if view else None
    if state is None:
        return NodeRolloutState.UPDATING, None
    if state.state is ModelLifecycle.ACTIVE and state.active and state.active.version == version:
        online = view is not None and view.online
        return (NodeRolloutState.ACTIVE, None) if online else (NodeRolloutState.UPDATING, None)
    if state.state is ModelLifecycle.FAILED and state.target and state.target.version == version:
        return NodeRolloutState.FAILED, state.last_error
    return NodeRolloutState.UPDATING, None


def send_command(session: MqttSession, record: RolloutRecord, command: str) -> None:
    """Ask the running controller to pause, resume, abort or roll back (retained record).

    Stamped now, so that the controller takes it even if it wrote the record again after
    `record` was read (it keeps only the command from it; its own state wins).
    """
    updated = record.model_copy(update={"command": command, "updated_at": time.time()})
    session.publish(topics.rollout(record.rollout_id), encode(updated), retain=True)


def is_stale(record: RolloutRecord, now: float | None = None) -> bool:
    """True when a running record's controller stopped heart-beating."""
    return (now or time.time()) - record.updated_at > STALE_S
