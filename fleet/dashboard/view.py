"""The dashboard's picture of the fleet, built from broker messages, bounded in every dimension.

`DashboardView.ingest(topic, payload)` takes any message from the subscribed topics (node
status, model state, telemetry and errors; rollout records; motif results). Each is size-checked,
parsed against its schema and reduced to the few fields the page shows, with every string cut
to a display length; anything else is counted by reason and dropped. Caps: nodes, sensors,
rollouts, ethogram entries per sensor, results per update. Past a cap the least recently heard
entry of its kind goes (an online node or a running rollout only to make room for its own kind
when all are so; otherwise the newcomer is refused), so a flood of made-up ids can neither grow
memory nor push live entries off the page for long: they come back with their next message.

`snapshot()` is the whole picture (for a page that connects); `drain()` is what changed since
the last drain (for the pages already connected). Both are plain JSON-able dicts. Thread-safe.
"""

from __future__ import annotations

import copy
import threading
import time
from collections import OrderedDict, deque
from typing import Any

from pydantic import BaseModel, ValidationError

from fleet.dashboard.rows import (
    ACTIVE_ROLLOUT_STATES,
    SCHEMAS,
    SUBSCRIPTIONS,
    Counters,
    Kind,
    Limits,
    NodeRow,
    Reject,
    RolloutRow,
    SensorRow,
    classify,
    cut,
    motif_name,
    num,
    rollout_events,
)
from fleet.rollout.records import newer
from schemas.control import RolloutRecord
from schemas.messages import (
    ErrorReport,
    ModelRef,
    MotifResult,
    NodeModelState,
    NodeStatus,
    Telemetry,
)


class DashboardView:
    """The bounded fleet picture; `ingest` from the MQTT thread, read from any thread."""

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self.counters = Counters()
        self._lock = threading.Lock()
        self._nodes: OrderedDict[str, NodeRow] = OrderedDict()
        self._rollouts: OrderedDict[str, RolloutRow] = OrderedDict()
        self._sensors: OrderedDict[str, SensorRow] = OrderedDict()
        self._labels: OrderedDict[tuple[str, str], tuple[str, ...]] = OrderedDict()
        self._result_seq = 0
        self._dirty_nodes: set[str] = set()
        self._dirty_rollouts: set[str] = set()
        self._removed_nodes: set[str] = set()
        self._removed_rollouts: set[str] = set()
        self._removed_sensors: set[str] = set()
        self._pending: deque[dict[str, Any]] = deque(maxlen=self.limits.max_pending_results)
        self._links: dict[str, bool] = {}
        """Site -> its bridge's link is up."""
        self._dirty_links = False

    # -- input --------------------------------------------------------------------------------

    def ingest(
        self, topic: str, payload: bytes, now: float | None = None, *, retained: bool = False
    ) -> Reject | None:
        """Take one message; returns why it was dropped, or None when it was used. A retained
        result is nobody's live result (a node or anyone with write access left it there): it is
        never shown."""
        now = time.time() if now is None else now
        found = classify(topic)
        if retained and found is not None and found[0] is Kind.RESULT:
            reason: Reject | None = Reject.RETAINED
        elif found is not None and found[0] is Kind.LINK:
            reason = self._link(found[1], payload)
        else:
            reason = self._ingest(topic, payload, now)
        if reason is not None:
            with self._lock:
                self.counters.rejected[reason] += 1
        return reason

    def _ingest(self, topic: str, payload: bytes, now: float) -> Reject | None:
        found = classify(topic)
        if found is None:
            return Reject.BAD_TOPIC
        kind, ident = found
        limit = (
            self.limits.max_rollout_bytes if kind is Kind.ROLLOUT else self.limits.max_payload_bytes
        )
        if len(payload) > limit:
            return Reject.OVERSIZED
        if not payload:  # a cleared retained message
            if kind in (Kind.STATUS, Kind.MODEL, Kind.ROLLOUT):
                with self._lock:
                    self.counters.messages[kind] += 1
                    self._clear(kind, ident)
                return None
            return Reject.MALFORMED
        try:
            message = SCHEMAS[kind].model_validate_json(payload)
        except ValidationError as exc:
            errors = exc.errors(include_url=False, include_context=False, include_input=False)
            return Reject.MALFORMED if errors[0]["type"] == "json_invalid" else Reject.INVALID
        with self._lock:
            self.counters.messages[kind] += 1
            return self._apply(kind, ident, message, now)

    def _apply(self, kind: Kind, ident: str, message: BaseModel, now: float) -> Reject | None:
        if isinstance(message, MotifResult):
            return self._result(ident, message, now)
        if isinstance(message, RolloutRecord):
            return self._rollout(ident, message)
        node_id = getattr(message, "node_id", None)
        if node_id != ident:
            return Reject.MISMATCH
        row = self._node(ident)
        if row is None:
            return Reject.OVER_CAPACITY
        row.seen = now
        t = self.limits.text_chars
        if isinstance(message, NodeStatus):
            row.state, row.status_ts = message.state.value, message.ts
            row.group, row.host = cut(message.group, t), cut(message.host, t)
            row.site = cut(message.site, t)
            row.software_version = cut(message.software_version, t)
            row.reason = cut(message.reason, t)
            row.backend = cut(message.backend, t) or row.backend
            if message.model is not None and row.model_state is None:
                row.model_name, row.model_version = self._ref(message.model)
        elif isinstance(message, NodeModelState):
            self._model_state(row, message)
        elif isinstance(message, Telemetry):
            self._telemetry(row, message)
        elif isinstance(message, ErrorReport):
            row.last_error = {
                "ts": message.ts,
                "kind": message.kind.value,
                "reason": cut(message.reason, t),
                "sensor_id": cut(message.sensor_id, t),
                "suppressed": message.suppressed,
            }
        self._dirty_nodes.add(ident)
        return None

    def _link(self, site: str, payload: bytes) -> Reject | None:
        """A site bridge's notification: `1` up, `0` down, empty: the site was retired."""
        if payload not in (b"1", b"0", b""):
            return Reject.INVALID
        with self._lock:
            self.counters.messages[Kind.LINK] += 1
            if not payload:
                self._links.pop(site, None)
            elif site in self._links or len(self._links) < self.limits.max_sites:
                self._links[site] = payload == b"1"
            else:
                return Reject.OVER_CAPACITY
            self._dirty_links = True
        return None

    def _ref(self, ref: ModelRef) -> tuple[str | None, str | None]:
        t = self.limits.text_chars
        return cut(ref.name, t), cut(ref.version, t)

    def _model_state(self, row: NodeRow, message: NodeModelState) -> None:
        t = self.limits.text_chars
        row.model_state = message.state.value
        row.model_ts = message.ts
        row.model_name, row.model_version = (
            self._ref(message.active) if message.active else (None, None)
        )
        row.model_target = (
            f"{cut(message.target.name, t)} {cut(message.target.version, t)}"
            if message.target
            else None
        )
        row.model_error = cut(message.last_error, t)
        row.backend = cut(message.backend, t) or row.backend
        row.labels = tuple(message.motif_labels) if message.motif_labels else None
        if row.labels and message.active is not None:
            key = (message.active.name, message.active.version)
            self._labels[key] = row.labels
            self._labels.move_to_end(key)
            while len(self._labels) > self.limits.label_cache:
                self._labels.popitem(last=False)

    def _telemetry(self, row: NodeRow, message: Telemetry) -> None:
        row.telemetry_ts, row.interval_s = message.ts, num(message.interval_s)
        row.backend = cut(message.backend, self.limits.text_chars)
        row.windows_per_s = num(message.windows_per_s, 2)
        row.p95_ms = num(message.latency_ms.p95, 2)
        row.queue_depth, row.queue_capacity = message.queue_depth, message.queue_capacity
        row.temperature_c = num(message.temperature_c, 1)
        row.accelerator_temperature_c = num(message.accelerator_temperature_c, 1)
        row.rss_mb = num(message.rss_mb, 1)
        row.dropped = sum(message.dropped.values())
        row.errors = sum(message.errors.values())
        row.record(message.ts, row.windows_per_s, row.p95_ms)
        if row.model_state is None and message.model is not None:
            row.model_name, row.model_version = self._ref(message.model)

    def _node(self, node_id: str) -> NodeRow | None:
        row = self._nodes.get(node_id)
        if row is not None:
            self._nodes.move_to_end(node_id)
            return row
        if len(self._nodes) >= self.limits.max_nodes:
            victim = next((k for k, r in self._nodes.items() if not r.online), None)
            if victim is None:
                return None
            del self._nodes[victim]
            self._gone(self._dirty_nodes, self._removed_nodes, victim)
            self.counters.evicted["node"] += 1
        row = self._nodes[node_id] = NodeRow(node_id)
        self._removed_nodes.discard(node_id)
        return row

    @staticmethod
    def _gone(dirty: set[str], removed: set[str], ident: str) -> None:
        dirty.discard(ident)
        removed.add(ident)

    def _clear(self, kind: Kind, ident: str) -> None:
        if kind is Kind.ROLLOUT:
            if self._rollouts.pop(ident, None) is not None:
                self._gone(self._dirty_rollouts, self._removed_rollouts, ident)
            return
        row = self._nodes.get(ident)
        if row is None:
            return
        if kind is Kind.STATUS:
            row.state = row.status_ts = None
        else:
            row.model_state = row.model_error = row.model_target = None
            row.labels = None
        if row.state is None and row.model_state is None and row.telemetry_ts is None:
            del self._nodes[ident]
            self._gone(self._dirty_nodes, self._removed_nodes, ident)
        else:
            self._dirty_nodes.add(ident)

    def _rollout(self, ident: str, record: RolloutRecord) -> Reject | None:
        if record.rollout_id != ident:
            return Reject.MISMATCH
        head = record.model_copy(update={"nodes": {}, "waves": []})
        known = self._rollouts.get(ident)
        if known is not None and not newer(record, known.head):
            return Reject.STALE
        if known is None and len(self._rollouts) >= self.limits.max_rollouts:
            done = [(r.head.updated_at, k) for k, r in self._rollouts.items() if not r.active]
            if not done and record.state not in ACTIVE_ROLLOUT_STATES:
                return Reject.OVER_CAPACITY
            candidates = done or [(r.head.updated_at, k) for k, r in self._rollouts.items()]
            victim = min(candidates)[1]
            del self._rollouts[victim]
            self._gone(self._dirty_rollouts, self._removed_rollouts, victim)
            self.counters.evicted["rollout"] += 1
        t, shown, waves = self.limits.text_chars, 0, []
        for wave in record.waves:
            cells: list[dict[str, str | None]] = []
            for node_id in wave:
                if shown >= self.limits.max_rollout_nodes:
                    break
                outcome = record.nodes.get(node_id)
                cells.append(
                    {
                        "node_id": cut(node_id, 64),
                        "state": outcome.state.value if outcome else None,
                        "error": cut(outcome.error, t) if outcome else None,
                    }
                )
                shown += 1
            waves.append(cells)
        total = sum(len(w) for w in record.waves)
        if known is not None:
            row = known.followed_by(head, waves, total - shown, record.failures)
        else:
            events = rollout_events(None, 0, record, record.failures, len(waves))
            row = RolloutRow(head, waves, total - shown, record.failures, events)
        self._rollouts[ident] = row
        self._rollouts.move_to_end(ident)
        self._removed_rollouts.discard(ident)
        self._dirty_rollouts.add(ident)
        return None

    def _result(self, sensor_id: str, result: MotifResult, now: float) -> Reject | None:
        if result.sensor_id != sensor_id:
            return Reject.MISMATCH
        t = self.limits.text_chars
        labels = self._labels_for(result.node_id, result.model)
        motif = result.top_motif
        name = motif_name(labels, motif)
        confidence = round(result.motif_scores[motif], 4)
        model = f"{cut(result.model.name, t)} {cut(result.model.version, t)}"
        node_id = cut(result.node_id, 64) or ""
        row = self._sensors.get(sensor_id)
        if row is None:
            if len(self._sensors) >= self.limits.max_sensors:
                victim, _ = self._sensors.popitem(last=False)
                self._removed_sensors.add(victim)
                self.counters.evicted["sensor"] += 1
            row = self._sensors[sensor_id] = SensorRow(
                sensor_id, node_id, model, deque(maxlen=self.limits.ethogram_length)
            )
            self._removed_sensors.discard(sensor_id)
        else:
            self._sensors.move_to_end(sensor_id)
            row.node_id, row.model = node_id, model
        self._result_seq += 1
        n = self._result_seq
        row.results += 1
        row.ethogram.append((n, result.ts, motif, confidence, name))
        if len(self._pending) == self._pending.maxlen:
            self.counters.evicted["result"] += 1
        self._pending.append(
            {
                "n": n,
                "sensor_id": sensor_id,
                "node_id": node_id,
                "model": model,
                "ts": result.ts,
                "seq": result.seq,
                "motif": motif,
                "confidence": confidence,
                "label": name,
                "received": now,
            }
        )
        return None

    def _labels_for(self, node_id: str, model: ModelRef) -> tuple[str, ...] | None:
        """The motif names of the model that produced a result: from its node's model state
        when that node serves this very version, else from any node that served it."""
        node = self._nodes.get(node_id)
        if (
            node is not None
            and node.labels is not None
            and (node.model_name, node.model_version) == (model.name, model.version)
        ):
            return node.labels
        return self._labels.get((model.name, model.version))

    # -- output -------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The whole picture."""
        with self._lock:
            t = self.limits.text_chars
            return {
                "now": time.time(),
                "result_seq": self._result_seq,
                "nodes": [row.as_json(full_history=True) for row in self._nodes.values()],
                "rollouts": [row.as_json(t) for row in self._rollouts.values()],
                "sites": dict(sorted(self._links.items())),
                "sensors": [
                    {
                        "sensor_id": row.sensor_id,
                        "node_id": row.node_id,
                        "model": row.model,
                        "results": row.results,
                        "ethogram": [list(entry) for entry in row.ethogram],
                    }
                    for row in self._sensors.values()
                ],
                "limits": {
                    "ethogram_length": self.limits.ethogram_length,
                    "max_sensors": self.limits.max_sensors,
                },
                "stats": self._stats(),
            }

    def drain(self) -> dict[str, Any] | None:
        """What changed since the last drain, or None when nothing did."""
        with self._lock:
            if not (
                self._dirty_nodes
                or self._dirty_rollouts
                or self._removed_nodes
                or self._removed_rollouts
                or self._removed_sensors
                or self._pending
                or self._dirty_links
            ):
                return None
            t = self.limits.text_chars
            delta = {
                "now": time.time(),
                "nodes": [self._nodes[k].as_json() for k in sorted(self._dirty_nodes)],
                "removed_nodes": sorted(self._removed_nodes),
                "rollouts": [self._rollouts[k].as_json(t) for k in sorted(self._dirty_rollouts)],
                "removed_rollouts": sorted(self._removed_rollouts),
                "removed_sensors": sorted(self._removed_sensors),
                "results": list(self._pending),
                "stats": self._stats(),
            }
            if self._dirty_links:  # the whole map: sites are few, and one may have gone
                delta["sites"] = dict(sorted(self._links.items()))
                self._dirty_links = False
            self._dirty_nodes.clear()
            self._dirty_rollouts.clear()
            self._removed_nodes.clear()
            self._removed_rollouts.clear()
            self._removed_sensors.clear()
            self._pending.clear()
            return delta

    def _stats(self) -> dict[str, Any]:
        return {
            "messages": sum(self.counters.messages.values()),
            "rejected": sum(self.counters.rejected.values()),
            "nodes": len(self._nodes),
            "sensors": len(self._sensors),
            "rollouts": len(self._rollouts),
        }

    def node_rows(self) -> list[NodeRow]:
        """A copy of every node's row, as of one moment."""
        with self._lock:
            return [copy.copy(row) for row in self._nodes.values()]

    def rollout_rows(self) -> list[RolloutRow]:
        """Every rollout's row (rows are replaced whole, never changed in place)."""
        with self._lock:
            return list(self._rollouts.values())

    def counts(self) -> Counters:
        """A copy of the counters."""
        with self._lock:
            c = self.counters
            return Counters(dict(c.messages), dict(c.rejected), dict(c.evicted))

    def sizes(self) -> dict[str, int]:
        """How many nodes, sensors, rollouts and ethogram entries are held now."""
        with self._lock:
            return {
                "nodes": len(self._nodes),
                "sensors": len(self._sensors),
                "rollouts": len(self._rollouts),
                "ethogram_entries": sum(len(s.ethogram) for s in self._sensors.values()),
                "pending_results": len(self._pending),
            }


__all__ = ["SUBSCRIPTIONS", "DashboardView", "Limits", "Reject", "classify", "motif_name"]
