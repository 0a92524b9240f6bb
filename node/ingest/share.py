"""Sensor-affine share groups: the nodes of one group divide the sensors among themselves.

A broker's shared subscription splits a topic's messages between nodes one by one, which tears a
`samples` stream apart (every node sees pieces of every sensor and cuts no window). In a share
group instead, every node subscribes to every sensor's samples and follows each stream cheaply
(no window is copied out for a sensor it does not serve), and each sensor is *held* by one node.
The holder is chosen by rendezvous hashing of the sensor id over the group's live nodes, read from
the retained status topics: when a node joins, leaves or dies, only the sensors it gains or loses
move, and every node computes the same answer from the same statuses.

A sensor moves without a window lost or served twice:

- **Hand-off.** The node that holds a sensor and sees that another one owns it now (a node joined)
  still serves every window whose first sample it has received: the new owner may have
  subscribed after those samples went by. Once those windows are cut, it publishes a hand-off
  naming the next window's first sample index (`next_seq`), and the receiver serves the windows
  from there on, cutting any already passed again from the samples it kept. A node that stops
  cleanly hands its sensors over at once, from its next window.
- **A node dies.** Its will (`offline`) reaches every node after every result it had published.
  Each result names its window, so the new owner serves the windows after the last result it saw
  for that sensor, again from the samples it kept.
- **Waiting.** A node that owns a sensor but was not handed it (it just joined, or the previous
  owner is still live) follows the stream and waits for the hand-off, or for a *sync* from the
  node it expects it from: after every change of the group each node sends each other member a
  sync naming the group as it sees it, once it has handed over what it had to. A sync for the
  same group means "nothing more is coming from me": the waiting node serves from the last
  result seen. Past `timeout_s` without either, it does the same and reports it.

All nodes of a group cut windows on one grid (sample indices that are multiples of the hop), so a
window is the same window on every node. This module is the decision logic only: no MQTT, no
samples. `node.ingest.router.Ingest` feeds it and carries its actions out.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import NamedTuple

from schemas.messages import Handoff, NodeState, NodeStatus


class Holding(StrEnum):
    """What a node does with one sensor of its share group."""

    SERVING = "serving"
    """This node holds the sensor: its windows are served here."""
    HANDING = "handing"
    """Another node owns the sensor now: this node serves the windows it has begun, then hands
    the sensor over."""
    WAITING = "waiting"
    """This node owns the sensor but has not been handed it yet: it follows the stream."""
    IDLE = "idle"
    """Another node owns the sensor: this node follows the stream in case it is handed it."""


@dataclass(frozen=True, slots=True)
class Give:
    """Publish a hand-off of `sensor_id` to `to_node`; `next_seq` is the first window the
    receiver serves, or None for "the stream's next window" (the caller knows it)."""

    sensor_id: str
    to_node: str
    next_seq: int | None = None
    forwarded: bool = False
    """A hand-off this node received for a sensor it does not own, passed on unchanged."""


@dataclass(frozen=True, slots=True)
class HandOver:
    """Start handing `sensor_id` to `to_node`: the caller, who knows the stream, says where the
    windows this node has begun end (`SensorShare.hand_over`)."""

    sensor_id: str
    to_node: str


@dataclass(frozen=True, slots=True)
class Sync:
    """Tell `to_node` this node has handed it everything it owns in `view` (after a change)."""

    to_node: str
    view: frozenset[str]


@dataclass(frozen=True, slots=True)
class Take:
    """Start serving `sensor_id`: first cut again the passed windows with starts in
    [first, before) (None: unbounded) from the kept samples."""

    sensor_id: str
    first: int | None
    before: int | None = None
    warning: str | None = None
    """Set when the take-over was not a clean hand-off (reported on the errors topic)."""


@dataclass(frozen=True, slots=True)
class Note:
    """Something to report on the errors topic (kind `handoff`)."""

    sensor_id: str | None
    reason: str


Action = Give | HandOver | Sync | Take | Note


class Admission(NamedTuple):
    """Which windows of a sensor's run to serve: those starting in [first, until) (None:
    unbounded) when `serving`; and actions to carry out before."""

    serving: bool
    first: int | None
    until: int | None
    actions: list[Action]


def rendezvous_owner(sensor_id: str, nodes: Iterable[str]) -> str | None:
    """The node that owns `sensor_id` among `nodes` (highest hash of node and sensor id)."""
    best: tuple[int, str] | None = None
    for node in nodes:
        digest = hashlib.blake2b(f"{node}\x00{sensor_id}".encode(), digest_size=8).digest()
        score = (int.from_bytes(digest, "big"), node)
        if best is None or score > best:
            best = score
    return None if best is None else best[1]


_SERVES = (Holding.SERVING, Holding.HANDING)


@dataclass(slots=True)
class _Sensor:
    holding: Holding = Holding.IDLE
    first: int | None = None
    """While serving: serve windows that start at or after this sample index (None: all)."""
    deadline: float = 0.0
    """While waiting: when to stop waiting for a hand-off; while handing: when to hand the
    sensor over even if its stream went quiet."""
    waiting_for: str | None = None
    """While waiting: the node expected to hand the sensor over."""
    handing_to: str | None = None
    """While handing: the node that gets it."""
    until: int | None = None
    """While handing: serve only the windows that start before this sample index."""
    given_by: tuple[str, int | None] | None = None
    """While serving after a hand-off: (sender, its next_seq), to fill in what the sender left
    unserved if it dies before publishing the results of its last windows."""
    last_result: int | None = None
    """Start of the latest window of this sensor with a result seen on the broker."""


class SensorShare:
    """One node's view of its share group and of which sensors it serves."""

    def __init__(
        self,
        node_id: str,
        instance: str,
        share_group: str,
        hop: int,
        *,
        timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.node_id = node_id
        self.instance = instance
        self.share_group = share_group
        self.hop = hop
        self.timeout_s = timeout_s
        self._clock = clock
        self._members: set[str] = set()
        self._mismatched: set[str] = set()
        self._sensors: dict[str, _Sensor] = {}
        self._synced: dict[str, frozenset[str]] = {}
        """The group as each member saw it in its latest sync to this node."""
        self._syncs_due: set[str] = set()
        """Members owed a sync once the hand-overs to them complete."""
        self._ready = False
        self._leaving = False
        self._joined_at = 0.0

    # -- the group --------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """True once this node's own birth came back (the retained statuses arrived before)."""
        return self._ready

    def live(self) -> frozenset[str]:
        """The group's live nodes as this node sees them (itself included unless leaving)."""
        nodes = set(self._members)
        if self._ready and not self._leaving:
            nodes.add(self.node_id)
        return frozenset(nodes)

    def owner(self, sensor_id: str) -> str | None:
        """The node that owns `sensor_id` in this node's view."""
        return rendezvous_owner(sensor_id, self.live())

    def holding(self, sensor_id: str) -> Holding:
        """What this node does with `sensor_id` now."""
        state = self._sensors.get(sensor_id)
        return Holding.IDLE if state is None else state.holding

    def served(self) -> list[str]:
        """The sensors this node serves (handing over included)."""
        return [s for s, state in self._sensors.items() if state.holding in _SERVES]

    def reset(self) -> None:
        """A new connection: hold nothing until this node's birth comes back (while it was away
        the group may have taken its sensors over)."""
        self._ready = False
        self._members.clear()
        self._synced.clear()
        self._syncs_due.clear()
        for state in self._sensors.values():
            self._idle(state)

    def status(self, node_id: str, status: NodeStatus | None) -> list[Action]:
        """A retained status arrived (None: cleared); returns what the change means here."""
        if node_id == self.node_id:
            if (
                status is not None
                and status.instance == self.instance
                and status.state is NodeState.ONLINE
                and not self._ready
            ):
                self._ready = True
                self._joined_at = self._clock()
                return self._first_view()
            return []
        before = self.live()
        member = (
            status is not None
            and status.state is NodeState.ONLINE
            and status.share_group == self.share_group
        )
        actions: list[Action] = []
        if member and status is not None and status.hop is not None and status.hop != self.hop:
            member = False
            if node_id not in self._mismatched:
                self._mismatched.add(node_id)
                actions.append(
                    Note(
                        None,
                        f"node {node_id} is in share group {self.share_group} with hop "
                        f"{status.hop}, this node has hop {self.hop}: windows would not line up, "
                        "so it is not counted as a member. Give every node of a group one hop",
                    )
                )
        if member:
            self._members.add(node_id)
        else:
            self._members.discard(node_id)
        if not self._ready:
            return actions
        return actions + self._view_changed(before, self.live())

    # -- sensors ----------------------------------------------------------------------------

    def admit(self, sensor_id: str) -> Admission:
        """A run of samples of `sensor_id` arrived: which of its windows to serve, and actions
        to carry out first."""
        state = self._sensors.get(sensor_id)
        actions: list[Action] = []
        if state is None:
            state = self._sensors[sensor_id] = _Sensor()
            if self._ready and not self._leaving:
                actions += self._new_sensor(sensor_id, state)
        elif state.holding is Holding.WAITING and self._clock() >= state.deadline:
            actions.append(self._stop_waiting(sensor_id, state))
        if state.holding not in _SERVES:
            return Admission(False, None, None, actions)
        return Admission(True, state.first, state.until, actions)

    def progressed(self, sensor_id: str, next_start: int | None) -> list[Action]:
        """The sensor's stream moved on to `next_start`: a hand-over whose windows are all cut
        completes."""
        state = self._sensors.get(sensor_id)
        if state is None or state.holding is not Holding.HANDING or state.until is None:
            return []
        if next_start is None or next_start < state.until:
            return []
        return self._handed(sensor_id, state, state.until)

    def hand_over(self, sensor_id: str, to_node: str, until: int | None) -> list[Action]:
        """Carry a `HandOver` on: this node serves the windows that start before `until` (the
        first window none of whose samples it has yet), then gives the sensor to `to_node`."""
        state = self._sensors[sensor_id]
        state.holding = Holding.HANDING
        state.handing_to = to_node
        state.until = until
        if until is None:  # no sample yet: nothing begun
            return self._handed(sensor_id, state, None)
        return []

    def tick(self) -> list[Action]:
        """Stop waiting for overdue hand-offs; finish hand-overs of sensors that went quiet
        (called every second or so)."""
        now = self._clock()
        actions: list[Action] = []
        for sensor_id, state in self._sensors.items():
            if now < state.deadline:
                continue
            if state.holding is Holding.WAITING:
                actions.append(self._stop_waiting(sensor_id, state))
            elif state.holding is Holding.HANDING:
                actions += self._handed(sensor_id, state, None)  # from its next window
        return actions

    def result(self, sensor_id: str, seq: int) -> None:
        """A result for window `seq` of `sensor_id` was published by some node of the site."""
        state = self._sensors.get(sensor_id)
        if state is not None and (state.last_result is None or seq > state.last_result):
            state.last_result = seq

    def handoff(self, message: Handoff) -> list[Action]:
        """A hand-off addressed to this node arrived (the caller checked sender and group)."""
        sensor_id = message.sensor_id
        if sensor_id is None:
            return self._sync(message.from_node, frozenset(message.view))
        state = self._sensors.setdefault(sensor_id, _Sensor())
        if state.holding in _SERVES:
            return [
                Note(
                    sensor_id,
                    f"node {message.from_node} handed over sensor {sensor_id} (from seq "
                    f"{message.next_seq}), which this node already serves: the two held it at "
                    "once, so some of its windows may have been served twice",
                )
            ]
        if self._leaving:  # pass it on, never back to a sender that may be leaving too
            to = rendezvous_owner(sensor_id, self._members - {message.from_node})
            if to is None:
                return [
                    Note(
                        sensor_id,
                        f"node {message.from_node} handed sensor {sensor_id} to this node as it "
                        "stops, and no other node of the group is live to take it",
                    )
                ]
            return [Give(sensor_id, to, message.next_seq, forwarded=True)]
        owner = self.owner(sensor_id) if self._ready else None
        if owner is not None and owner not in (self.node_id, message.from_node):
            return [Give(sensor_id, owner, message.next_seq, forwarded=True)]
        # the owner here, or the sender's view is ahead of this one (it is leaving, or saw a
        # change this node has not yet): hold it; a later change of view passes it on
        state.given_by = (message.from_node, message.next_seq)
        return [self._serve(sensor_id, state, message.next_seq)]

    def leave(self) -> list[Action]:
        """This node stops: give every sensor it serves to its next owner, from its next
        window (the others have followed the streams: they hold the samples)."""
        self._leaving = True
        actions: list[Action] = []
        for sensor_id, state in self._sensors.items():
            serves = state.holding in _SERVES
            self._idle(state)
            to = rendezvous_owner(sensor_id, self._members)
            if serves and to is not None:  # else the last node of the group: nobody takes it
                actions.append(Give(sensor_id, to))
        return actions

    # -- inside ---------------------------------------------------------------------------

    def _sync(self, sender: str, view: frozenset[str]) -> list[Action]:
        self._synced[sender] = view
        if not self._ready or view != self.live():
            return []  # kept: it counts once this node sees the group the same way
        return [
            self._serve(sensor_id, state, self._after_last_result(state))
            for sensor_id, state in self._sensors.items()
            if state.holding is Holding.WAITING and state.waiting_for == sender
        ]

    def _syncs(self) -> list[Action]:
        """A sync to every member this node is not still handing a sensor to (those get
        theirs when the hand-over completes)."""
        self._syncs_due = set(self._members)
        return self._due_syncs()

    def _due_syncs(self) -> list[Action]:
        busy = {state.handing_to for state in self._sensors.values() if state.handing_to}
        ready = sorted(self._syncs_due - busy)
        self._syncs_due -= set(ready)
        view = self.live()
        return [Sync(member, view) for member in ready]

    def _first_view(self) -> list[Action]:
        actions: list[Action] = []
        others = frozenset(self._members)
        for sensor_id, state in self._sensors.items():
            owner = self.owner(sensor_id)
            if state.holding in _SERVES:
                if owner != self.node_id and owner is not None:
                    actions.append(self._start_hand_over(sensor_id, state, owner))
            elif owner == self.node_id:
                if others:
                    expected = rendezvous_owner(sensor_id, others)
                    actions += self._wait(sensor_id, state, expected, self._joined_at)
                else:
                    actions.append(self._serve(sensor_id, state, None))
        return actions + self._syncs()

    def _new_sensor(self, sensor_id: str, state: _Sensor) -> list[Action]:
        if self.owner(sensor_id) != self.node_id:
            return []
        others = frozenset(self._members)
        if others and self._clock() < self._joined_at + self.timeout_s:
            # just joined: a node that served this sensor before may still hand it over
            expected = rendezvous_owner(sensor_id, others)
            return self._wait(sensor_id, state, expected, self._joined_at)
        state.holding = Holding.SERVING
        state.first = None
        return []

    def _view_changed(self, before: frozenset[str], after: frozenset[str]) -> list[Action]:
        if before == after:
            return []
        gone = before - after
        actions: list[Action] = []
        for sensor_id, state in self._sensors.items():
            old = rendezvous_owner(sensor_id, before)
            new = rendezvous_owner(sensor_id, after)
            if state.holding is Holding.HANDING:
                if new == self.node_id:  # it came back before the hand-over completed
                    state.holding = Holding.SERVING
                    state.handing_to = state.until = None
                elif new is not None:
                    state.handing_to = new
                continue
            if state.holding is Holding.SERVING:
                if new != self.node_id and new is not None:
                    actions.append(self._start_hand_over(sensor_id, state, new))
                elif state.given_by is not None and state.given_by[0] in gone:
                    actions += self._refill(sensor_id, state)
                continue
            if new != self.node_id:
                self._idle(state)
                continue
            if old is None or old == self.node_id or old not in after:
                # its previous owner is gone: serve what it left without a result
                actions.append(self._serve(sensor_id, state, self._after_last_result(state)))
            elif state.holding is not Holding.WAITING:
                actions += self._wait(sensor_id, state, old, self._clock())
        return actions + self._syncs()

    def _refill(self, sensor_id: str, state: _Sensor) -> list[Action]:
        """The node that handed this sensor over died: serve the windows before its hand-off
        that it left without a result."""
        assert state.given_by is not None
        sender, next_seq = state.given_by
        state.given_by = None
        first = self._after_last_result(state)
        if next_seq is None:
            return []
        grid_first = 0 if first is None else -(-first // self.hop) * self.hop
        if grid_first >= next_seq:
            return []  # every window before the hand-off has a result
        return [
            Take(
                sensor_id,
                first,
                next_seq,
                f"node {sender} went away before publishing the results of its last windows of "
                f"sensor {sensor_id} (from seq {grid_first}): serving them here",
            )
        ]

    def _start_hand_over(self, sensor_id: str, state: _Sensor, to: str) -> HandOver:
        state.holding = Holding.HANDING
        state.handing_to = to
        state.until = None  # until the caller says where the windows begun end
        state.deadline = self._clock() + self.timeout_s / 2
        return HandOver(sensor_id, to)

    def _handed(self, sensor_id: str, state: _Sensor, next_seq: int | None) -> list[Action]:
        """The hand-over is complete: give the sensor (None: from its next window)."""
        to = state.handing_to
        self._idle(state)
        actions: list[Action] = [] if to is None else [Give(sensor_id, to, next_seq)]
        return actions + self._due_syncs()

    def _after_last_result(self, state: _Sensor) -> int | None:
        return None if state.last_result is None else state.last_result + 1

    @staticmethod
    def _idle(state: _Sensor) -> None:
        state.holding = Holding.IDLE
        state.given_by = None
        state.handing_to = None
        state.until = None

    def _serve(self, sensor_id: str, state: _Sensor, first: int | None) -> Take:
        state.holding = Holding.SERVING
        state.first = first
        state.handing_to = state.until = None
        return Take(sensor_id, first)

    def _wait(
        self, sensor_id: str, state: _Sensor, expected: str | None, since: float
    ) -> list[Action]:
        """Wait for `expected` to hand the sensor over, unless it already said it will not."""
        if expected is not None and self._synced.get(expected) == self.live():
            return [self._serve(sensor_id, state, self._after_last_result(state))]
        state.holding = Holding.WAITING
        state.waiting_for = expected
        state.deadline = since + self.timeout_s
        return []

    def _stop_waiting(self, sensor_id: str, state: _Sensor) -> Take:
        first = self._after_last_result(state)
        take = self._serve(sensor_id, state, first)
        if state.waiting_for is None or state.waiting_for not in self._members:
            return take
        since = "the start" if first is None else f"seq {first}"
        return Take(
            sensor_id,
            first,
            warning=f"no hand-off of sensor {sensor_id} from node {state.waiting_for} within "
            f"{self.timeout_s:g} s: serving it from {since} (after the last result seen); "
            f"windows node {state.waiting_for} still had in work may be served twice",
        )
