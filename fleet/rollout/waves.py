"""Driving a rollout: waves, soaks and health gates, the failure budget, rollback, commands.

`WaveDriver` is the half of the controller (fleet/rollout/controller.py) that runs a planned
rollout record to its end; every step is saved to the retained record first, so another
controller can take over from any point.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from common.cli import some_of
from common.errors import EdgeError
from common.mqtt.session import MqttSession
from common.signing import sign_desired, sign_message
from fleet.desired import clear_payload, desired_topic, scoped
from fleet.rollout.health import cohort_figures, judge
from fleet.rollout.presence import Presence
from fleet.rollout.records import RolloutBook, superseded
from fleet.rollout.view import FleetView, NodeView
from schemas import topics
from schemas.codec import encode
from schemas.control import DesiredModel, NodeRolloutState, RolloutRecord, RolloutState
from schemas.messages import ModelLifecycle

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

logger = logging.getLogger(__name__)

Progress = Callable[[RolloutRecord, str], None]
SITE_HOLD_S = 600.0
"""How long past the wave timeout a node behind a down site link is held (neither failed nor
done) when the record does not say: a site's uplink down for minutes is common, and a node
there has not failed anything."""
HEARTBEAT_S = 5.0
"""A running controller republishes its record at least this often."""
PROGRESS_SAVE_S = 1.0
"""A wave's progress (nodes reporting in) is written to its record at most this often: a record
names every node, and a wave of thousands would otherwise rewrite it thousands of times."""
SAVE_SHARE = 0.1
"""...and, for a large record, only once the last write's cost is this share of the time since
(a 10,000-node record takes ~0.4 s to sign and encode: progress then every ~4 s)."""
RECORD_OVERHEAD = 512
"""Bytes of a record's PUBLISH packet besides its payload (topic, header, properties), at most."""
PAUSE_POLL_S = 0.2
"""How often a paused controller looks for the operator's next command."""
BASELINE_S = 600.0
"""A moved node's own telemetry before the move, at most this far back, is its reference."""
SOAK_INTERVALS = 3
"""A wave soaks this many of its nodes' telemetry intervals unless told otherwise."""
MAX_DEFAULT_SOAK_S = 600.0
"""...and never longer than this, whatever a node says its interval is (`--soak` may)."""
_MOVED = (
    NodeRolloutState.UPDATING,
    NodeRolloutState.ACTIVE,
    NodeRolloutState.FAILED,
    NodeRolloutState.ROLLING_BACK,
)


class RolloutError(EdgeError):
    """A rollout cannot start or continue; the message says why."""


class WaveDriver:
    """Runs rollout records: the controller's waves, soaks, rollback and operator commands."""

    session: MqttSession
    presence: Presence
    controller_id: str
    view: FleetView
    book: RolloutBook
    _sign_key: Ed25519PrivateKey | None
    _progress: Progress | None
    _applied: dict[str, str | None]
    _watching_since: float
    _last_saved: dict[str, float]
    _save_cost: float
    """Seconds the last record write took (signing, encoding, handing to the session)."""

    def strict_nodes(self, node_ids: list[str] | Iterable[str]) -> list[str]:
        """The nodes among `node_ids` that take only signed bundles and desired states."""
        return sorted(
            n
            for n in node_ids
            if (v := self.view.get(n)) is not None
            and v.model is not None
            and v.model.signatures_required
        )

    def require_key_for(self, node_ids: list[str] | Iterable[str], action: str) -> None:
        """Refuse up front to send unsigned desired states to nodes that take only signed ones
        (they would refuse each, and a rollback would only look done)."""
        if self._sign_key is not None:
            return
        strict = self.strict_nodes(node_ids)
        if strict:
            msg = (
                f"cannot {action} {some_of(strict)} without signing: they take only signed desired "
                "states (trust_key); pass --sign-key with the fleet key"
            )
            raise RolloutError(msg)

    @property
    def _owner(self) -> str | None:
        """What this controller writes as a record's `controller` (None without presence)."""
        return self.controller_id if self.presence.announces else None

    def run(self, record: RolloutRecord) -> RolloutRecord:
        """Drive a rollout to its end; returns the final record."""
        while record.state in (RolloutState.RUNNING, RolloutState.PAUSED):
            record = self._obey(record)
            if record.state is RolloutState.PAUSED:  # wait for resume/abort, still heart-beating
                if self._due(record):
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
            return self._roll_back(
                record, f"rollback requested (taken over from {gone})", RolloutState.ROLLED_BACK
            )
        state = {"resume": RolloutState.RUNNING, "pause": RolloutState.PAUSED}.get(
            command, RolloutState.ABORTED
        )
        saved = self._save(
            record.model_copy(update={"state": state}), f"taken over from {gone} to {command}"
        )
        return self.run(saved) if state is RolloutState.RUNNING else saved

    def _run_wave(self, record: RolloutRecord) -> RolloutRecord:
        index = record.wave
        wave = record.waves[index]
        moving = [n for n in wave if record.nodes[n].state is NodeRolloutState.PENDING]
        if moving and record.gates is not None:
            record = self._await_baseline(record, moving)
            if record.state is not RolloutState.RUNNING:
                return record
        # the record names who moves, and what each goes back to, before any node is told
        record = self._mark_moving(record, moving)
        record = self._save(record, f"wave {index + 1}/{len(record.waves)}: {len(wave)} nodes")
        # every updating node is told (again): a controller that died between its record and
        # its desired states left some untold; telling a node twice changes nothing
        for node_id in [n for n in wave if record.nodes[n].state is NodeRolloutState.UPDATING]:
            self.session.publish(
                desired_topic("node", node_id),
                encode(scoped(record.desired, "node", node_id, self._sign_key)),
                retain=True,
            )
        deadline = time.monotonic() + record.wave_timeout_s
        hold_until = deadline + (
            record.site_hold_s if record.site_hold_s is not None else SITE_HOLD_S
        )
        last_save, unsaved = time.monotonic(), False
        released: dict[str, float] = {}  # held nodes whose link is back: their own deadline
        while True:
            record = self._obey(record)
            if record.state is not RolloutState.RUNNING:
                return record
            now = time.monotonic()
            record, changed = self._collect(
                record, wave, expired=now > deadline, hold_over=now > hold_until,
                released=released,
            )  # fmt: skip
            if record.failures > record.max_failures:
                reason = f"{record.failures} nodes failed (budget {record.max_failures})"
                return self._roll_back(record, reason, RolloutState.FAILED)
            pending = [n for n in wave if record.nodes[n].state is NodeRolloutState.UPDATING]
            if not pending:
                if record.gates is not None:
                    record = self._soak(record, wave)
                    if record.state is not RolloutState.RUNNING:
                        return record
                    if record.failures > record.max_failures:
                        reason = f"{record.failures} nodes failed (budget {record.max_failures})"
                        return self._roll_back(record, reason, RolloutState.FAILED)
                record = record.model_copy(update={"wave": index + 1, "soak_until": None})
                return self._save(record, f"wave {index + 1} passed")
            unsaved = unsaved or changed
            since = time.monotonic() - last_save
            every = max(PROGRESS_SAVE_S, self._save_cost / SAVE_SHARE)
            if (unsaved and since > every) or since > HEARTBEAT_S:  # the heartbeat stays
                record = self._save(record, f"wave {index + 1}: {len(pending)} nodes pending")
                last_save, unsaved = time.monotonic(), False
            self.view.wait_changed(0.5)

    def _soak(self, record: RolloutRecord, wave: list[str]) -> RolloutRecord:
        """Let the wave's active nodes serve for the soak, then judge each against its own
        numbers before the move and the nodes not moved yet (fleet/rollout/health.py)."""
        gates = record.gates
        assert gates is not None
        taken_mid_soak = (
            record.soak_until is not None
            and record.soak_until - gates.soak_s < self._watching_since
        )  # this controller did not see the soak's beginning: it soaks again
        if record.soak_until is None or taken_mid_soak:
            until = time.time() + gates.soak_s
            record = self._save(
                record.model_copy(update={"soak_until": until}),
                f"wave {record.wave + 1}: soaking {gates.soak_s:g} s",
            )
        assert record.soak_until is not None
        until, start = record.soak_until, record.soak_until - gates.soak_s
        record = self._wait(record, lambda: True, until, f"wave {record.wave + 1}: soaking")
        if record.state is not RolloutState.RUNNING:
            return record
        record = self._await_reports(record, wave, until)
        if record.state is not RolloutState.RUNNING:
            return record
        unmoved = [n for n, o in record.nodes.items() if o.state is NodeRolloutState.PENDING]
        cohort = cohort_figures([self.view.soak_reports(n, start)[1] for n in unmoved])
        nodes = dict(record.nodes)
        for node_id in wave:
            outcome = nodes[node_id]
            if outcome.state is not NodeRolloutState.ACTIVE:
                continue
            view = self.view.get(node_id)
            moved = outcome.moved_at or start
            prior, soak = self.view.soak_reports(node_id, start)
            verdict = judge(
                gates,
                before=self.view.telemetry_between(node_id, moved - BASELINE_S, moved),
                soak=soak,
                prior=prior,
                cohort=cohort,
                went_offline=view is None or view.last_offline >= start or not view.online,
            )
            update: dict[str, object] = {"health": verdict}
            if not verdict.passed:
                update.update(state=NodeRolloutState.FAILED, failed=True, error=verdict.reason)
            nodes[node_id] = outcome.model_copy(update=update)
        failed = sum(not o.health.passed for n in wave if (o := nodes[n]).health is not None)
        event = f"wave {record.wave + 1}: soak over, {failed} failed its gates"
        return self._save(record.model_copy(update={"nodes": nodes}), event)

    def _await_reports(self, record: RolloutRecord, wave: list[str], until: float) -> RolloutRecord:
        """Wait until each active node of the wave has reported on the whole soak (a report
        about time after its start, stamped after its end): a busy node, broker or controller
        delivers them late. At most another soak, or three of the wave's telemetry intervals
        (2 s or more); a node still silent then is judged on what it sent."""
        assert record.gates is not None
        start = until - record.gates.soak_s
        active = [n for n in wave if record.nodes[n].state is NodeRolloutState.ACTIVE]
        views = [self.view.get(n) for n in active]
        intervals = [v.telemetry.interval_s for v in views if v is not None and v.telemetry]
        deadline = until + max(record.gates.soak_s, 3 * max(intervals, default=0.0), 2.0)

        def late() -> bool:
            return any(
                not any(t.ts >= until for t in self.view.soak_reports(n, start)[1]) for n in active
            )

        return self._wait(record, late, deadline, f"wave {record.wave + 1}: waiting for reports")

    def _wait(
        self, record: RolloutRecord, busy: Callable[[], bool], deadline: float, event: str
    ) -> RolloutRecord:
        """Wait while `busy()` holds, until `deadline` (wall clock), obeying operator commands
        and writing the record's heartbeat (`event`); check the returned record's state: a
        command may have stopped the rollout."""
        while busy() and time.time() < deadline:
            record = self._obey(record)
            if record.state is not RolloutState.RUNNING:
                return record
            if self._due(record):
                record = self._save(record, event)
            self.view.wait_changed(min(0.5, max(0.0, deadline - time.time())))
        return record

    def _collect(
        self,
        record: RolloutRecord,
        wave: list[str],
        *,
        expired: bool,
        hold_over: bool = False,
        released: dict[str, float] | None = None,
    ) -> tuple[RolloutRecord, bool]:
        """The wave's nodes that reported active or failed.

        Past the wave timeout a node still updating fails, unless its site's link to this
        broker is down: it is then held (still updating, its `error` says why) until the hold
        runs out. When its link comes back it gets a wave timeout of its own (`released`: node
        -> monotonic deadline) to take the order the fleet broker queued for its site."""
        released = {} if released is None else released
        nodes = dict(record.nodes)
        changed = False
        target = record.desired.version
        now = time.monotonic()
        for node_id in wave:
            outcome = nodes[node_id]
            if outcome.state is not NodeRolloutState.UPDATING:
                continue
            view = self.view.get(node_id)
            state, error = _progress_of(view, target)
            if state is NodeRolloutState.UPDATING and expired:
                unreachable = view is not None and not self.view.reachable(view)
                site = view.site if view else None
                note: str | None = None
                if unreachable and not hold_over:
                    note = f"held: site {site} unreachable (link down)"
                    released.pop(node_id, None)
                elif (outcome.error or "").startswith(("held:", "released:")) and not hold_over:
                    due = released.setdefault(node_id, now + record.wave_timeout_s)
                    if now <= due:
                        note = (
                            f"released: site {site} is back; "
                            f"{record.wave_timeout_s:g} s to take the order"
                        )
                if note is not None:
                    if outcome.error != note:
                        nodes[node_id] = outcome.model_copy(update={"error": note})
                        changed = True
                    continue
                state = NodeRolloutState.FAILED
                error = (
                    f"site {site} stayed unreachable past the wave timeout and its hold"
                    if unreachable
                    else "no active report within the wave timeout"
                )
            if state is not NodeRolloutState.UPDATING:
                nodes[node_id] = outcome.model_copy(update={"state": state, "error": error})
                changed = True
        return record.model_copy(update={"nodes": nodes}), changed

    def _mark_moving(self, record: RolloutRecord, node_ids: list[str]) -> RolloutRecord:
        """The nodes as updating, each with the model to restore on a rollback."""
        nodes, now = dict(record.nodes), time.time()
        for node_id in node_ids:
            previous = self._previous_of(self.view.get(node_id), record)
            nodes[node_id] = nodes[node_id].model_copy(
                update={"state": NodeRolloutState.UPDATING, "previous": previous, "moved_at": now}
            )
        return record.model_copy(update={"nodes": nodes})

    def _await_baseline(self, record: RolloutRecord, node_ids: list[str]) -> RolloutRecord:
        """Before moving nodes, wait (three of their telemetry intervals, 2 s or more) until
        each has two reports: its own numbers are what the soak compares it with."""
        views = [self.view.get(n) for n in node_ids]
        intervals = [v.telemetry.interval_s for v in views if v is not None and v.telemetry]
        deadline = time.time() + max(2.0, 3 * max(intervals, default=0.0))

        def missing() -> bool:
            return any(len(self.view.telemetry_between(n, 0.0, math.inf)) < 2 for n in node_ids)

        event = f"wave {record.wave + 1}: reading the nodes' baseline"
        return self._wait(record, missing, deadline, event)

    def _previous_of(self, view: NodeView | None, record: RolloutRecord) -> DesiredModel | None:
        """What the node runs now, to restore on a rollback (None when unknown, or when it
        already runs the new version: a controller that died mid-wave moved it)."""
        state = view.model if view else None
        if state is None or state.active is None or state.active_sha256 is None:
            return None
        if state.active.version == record.desired.version:
            return None
        return DesiredModel(  # unsigned: `scoped` issues and signs it afresh when it is used
            name=state.active.name,
            version=state.active.version,
            bundle_sha256=state.active_sha256,
            bundle_size=state.active_size or 0,
            rollback=True,
            rollout_id=record.rollout_id,
            issued_at=time.time(),
        )

    def _finish(self, record: RolloutRecord) -> RolloutRecord:
        level, target = ("group", record.group) if record.group else ("fleet", "")
        self.session.publish(
            desired_topic(level, target or ""),
            encode(scoped(record.desired, level, target or "", self._sign_key)),
            retain=True,
        )
        kept_back = []
        for node_id, outcome in record.nodes.items():
            if (outcome.failed or outcome.state is NodeRolloutState.FAILED) and outcome.previous:
                # failed within the budget: it stays on what it ran, pinned (visible as a pin)
                payload = encode(scoped(outcome.previous, "node", node_id, self._sign_key))
                kept_back.append(node_id)
            else:
                payload = clear_payload("node", node_id, self._sign_key)
            self.session.publish(desired_topic("node", node_id), payload, retain=True)
        event = f"succeeded: {level} desired is now {record.desired.version}"
        update: dict[str, object] = {"state": RolloutState.SUCCEEDED, "scope_set": True}
        if kept_back:
            event += f"; {len(kept_back)} failed nodes pinned to their previous model: " + (
                ", ".join(sorted(kept_back))
            )
            update["reason"] = event
        return self._save(record.model_copy(update=update), event)

    def _roll_back(self, record: RolloutRecord, reason: str, state: RolloutState) -> RolloutRecord:
        """Restore every moved node's previous model, then wait (up to the wave timeout) until
        each reports it active again: only those count as rolled back; the record names the
        others. Refused up front when nodes take only signed states and there is no key."""
        moved = [n for n, o in record.nodes.items() if o.state in _MOVED]
        self.require_key_for(moved, "roll back")
        nodes = dict(record.nodes)
        for node_id in moved:
            outcome = record.nodes[node_id]
            if outcome.previous is not None:
                payload = encode(scoped(outcome.previous, "node", node_id, self._sign_key))
            else:  # nothing known to restore: drop the override
                payload = clear_payload("node", node_id, self._sign_key)
            self.session.publish(desired_topic("node", node_id), payload, retain=True)
            failed = outcome.failed or outcome.state is NodeRolloutState.FAILED
            nodes[node_id] = outcome.model_copy(
                update={"state": NodeRolloutState.ROLLING_BACK, "failed": failed}
            )
        restored = self._restore_scope(record)
        record = self._save(
            record.model_copy(update={"nodes": nodes, "state": state, "reason": reason}),
            f"stopped: {reason}; rolling {len(moved)} nodes back{restored}",
        )
        deadline = time.monotonic() + record.wave_timeout_s
        while True:
            record, waiting = self._confirm_rollback(record)
            if not waiting or time.monotonic() > deadline:
                break
            if self._due(record):
                record = self._save(record, f"rollback: {len(waiting)} nodes not back yet")
            self.view.wait_changed(0.5)
        back = len(moved) - len(waiting)
        summary = f"{reason}; rolled back {back} of {len(moved)} moved nodes"
        if waiting:
            summary += f"; not confirmed: {', '.join(sorted(waiting))}"
        return self._save(record.model_copy(update={"reason": summary}), f"stopped: {summary}")

    def _restore_scope(self, record: RolloutRecord) -> str:
        """A rollback after the rollout set its group's (or the fleet's) desired state puts
        back what was there before (or clears it): new nodes, replaced ones and unpinned ones
        then get the rolled-back-to version too. Returns what it did, for the record."""
        if not record.scope_set:
            return ""
        level, target = ("group", record.group) if record.group else ("fleet", "")
        before = record.scope_previous
        if before is None or before.cleared:
            payload = clear_payload(level, target or "", self._sign_key)
            done = f"; cleared the {level} desired state it had set"
        else:
            payload = encode(scoped(before, level, target or "", self._sign_key))
            done = f"; the {level} desired state is {before.version} again"
        self.session.publish(desired_topic(level, target or ""), payload, retain=True)
        return done

    def _confirm_rollback(self, record: RolloutRecord) -> tuple[RolloutRecord, list[str]]:
        """Mark as rolled back the nodes that report their previous model active again (or a
        model other than the new one, when none was known); returns the others. A node behind
        a down site link is not confirmed: what the fleet holds of it predates the order."""
        nodes, waiting = dict(record.nodes), []
        for node_id, outcome in record.nodes.items():
            if outcome.state is not NodeRolloutState.ROLLING_BACK:
                continue
            view = self.view.get(node_id)
            state = view.model if view else None
            active = state.active if state else None  # what it serves, also after a refusal
            heading = state.target if state and state.state is not ModelLifecycle.FAILED else None
            back = (
                active is not None
                and view is not None
                and self.view.reachable(view)  # a stale report is no confirmation
                and active.version != record.desired.version
                and (outcome.previous is None or active.version == outcome.previous.version)
                and (heading is None or heading.version != record.desired.version)
            )
            if back:
                nodes[node_id] = outcome.model_copy(update={"state": NodeRolloutState.ROLLED_BACK})
            else:
                waiting.append(node_id)
        return record.model_copy(update={"nodes": nodes}), waiting

    def _obey(self, record: RolloutRecord) -> RolloutRecord:
        """Apply a command an operator set on the retained record."""
        latest = self.book.get(record.rollout_id)
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
        if self.session.taken_over.is_set():  # another process logged in as us: stop driving
            msg = f"{record.rollout_id}: {self.session.counters.last_error}"
            raise RolloutError(msg)
        began = time.monotonic()
        record = record.model_copy(update={"updated_at": time.time(), "controller": self._owner})
        record, newer = self.book.save(record, self.controller_id)
        if newer is not None:
            self._hand_over(newer)
        if self._sign_key is not None:  # others act only on records a fleet key signed
            record = sign_message(record, self._sign_key)
            self.book.put(record)
        payload = encode(record)
        limit = self.session.max_packet_size
        if limit is not None and len(payload) + RECORD_OVERHEAD > limit:
            msg = (
                f"{record.rollout_id}: its record is now {len(payload):,} bytes and the broker "
                f"takes packets up to {limit:,} (its max_packet_size); it would close this "
                "connection. Raise max_packet_size on the fleet broker, then `imu-fleet resume "
                f"{record.rollout_id}`"
            )
            raise RolloutError(msg)
        self.book.sent(topics.rollout(record.rollout_id), payload)
        self.session.publish(topics.rollout(record.rollout_id), payload, retain=True)
        logger.info("%s: %s", record.rollout_id, event)
        if self._progress is not None:
            self._progress(record, event)
        self._last_saved[record.rollout_id] = time.monotonic()
        self._save_cost = self._last_saved[record.rollout_id] - began
        return record

    def _due(self, record: RolloutRecord) -> bool:
        """True when `record` needs its heartbeat write."""
        return time.monotonic() - self._last_saved.get(record.rollout_id, 0.0) > HEARTBEAT_S

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
