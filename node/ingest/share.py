"""Sensor-affine share groups: the nodes of one group divide the sensors' windows among themselves.

A broker's shared subscription splits a topic's messages between nodes one by one, which tears a
`samples` stream apart (every node sees pieces of every sensor and cuts no window). In a share
group instead, every node subscribes to every sensor's samples, to every node's retained status
and to every result, and follows each stream cheaply. Each window is served by one node, and
every node works out which one by itself, the same way:

- **One order.** The broker puts every message it routes to a subscriber in that subscriber's
  queue in the order it processed them (mosquitto does, for one broker: docs/scaling.md). So every
  node of the group sees statuses, samples and results in the same relative order, and a
  decision taken "when window w is cut" is taken at the same point everywhere.
- **The window's owner.** When a window is cut (its last sample arrived), its owner is the
  highest rendezvous hash of node id and sensor id among the *live members that hold every
  sample of it*: a member that came online after the window's first sample went by does not.
  Membership comes from the retained status topics (`online`, same share group, same hop); a
  node counts itself once its own birth comes back.
- **A member goes away.** Its will (`offline`) or its final `stopped` status comes after every
  result it published. Each node remembers the owners of its recent windows, and gives the
  windows the gone member owned and left without a result to their next owner, who cuts them
  again from the samples it kept.
- **A member stops cleanly.** It publishes `stopping` first and keeps cutting until that status
  comes back to it: every window cut before it is its own to serve (it drains them), every
  window after is another's. Its final `stopped` hands over whatever the drain did not finish.

There is no hand-off message, no waiting and no timeout: ownership is a function of what every
node has seen, in the same order. This module is that function and its memory; no MQTT, no
samples. `node.ingest.router.Ingest` feeds it and carries its answers out.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from schemas.messages import NodeState, NodeStatus


def rendezvous_owner(sensor_id: str, nodes: Iterable[str]) -> str | None:
    """The node that owns `sensor_id` among `nodes` (highest hash of node and sensor id)."""
    best: tuple[int, str] | None = None
    for node in nodes:
        digest = hashlib.blake2b(f"{node}\x00{sensor_id}".encode(), digest_size=8).digest()
        score = (int.from_bytes(digest, "big"), node)
        if best is None or score > best:
            best = score
    return None if best is None else best[1]


@dataclass(frozen=True, slots=True)
class Reassigned:
    """Windows of `sensor_id` (by first sample index) that a gone member owned and left without
    a result, now this node's; `lost` more were older than the owners it remembers."""

    sensor_id: str
    starts: list[int]
    gone: str
    lost: int = 0


@dataclass(frozen=True, slots=True)
class Mismatch:
    """A node claims the share group with another hop (reported once; not counted)."""

    node_id: str
    reason: str


@dataclass(slots=True)
class _Sensor:
    joined: dict[str, int] = field(default_factory=dict)
    """Members that came online while this node followed the sensor: the first window start
    they hold every sample of. Absent: they hold what this node holds."""
    owners: deque[tuple[int, str | None]] = field(default_factory=deque)
    """(window start, owner) of the latest windows cut, oldest first."""
    last_by: dict[str, int] = field(default_factory=dict)
    """Start of the latest window with a result, per node that published it."""


class SensorShare:
    """One node's view of its share group: who is live, and who owns each window."""

    def __init__(
        self,
        node_id: str,
        instance: str,
        share_group: str,
        hop: int,
        *,
        remember: int = 64,
        stream_end: Callable[[str], int | None] = lambda _sensor_id: None,
    ) -> None:
        self.node_id = node_id
        self.instance = instance
        self.share_group = share_group
        self.hop = hop
        self.remember = remember
        """Windows per sensor whose owner is remembered (cover the samples the node keeps)."""
        self._stream_end = stream_end
        """Where a sensor's stream has got to here (the windower's end), for join points."""
        self._live: set[str] = set()
        self._mismatched: set[str] = set()
        self._sensors: dict[str, _Sensor] = {}
        self._leaving = False

    # -- the group --------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """True while this node counts itself a member (its own birth came back)."""
        return self.node_id in self._live

    @property
    def leaving(self) -> bool:
        """True once this node's own `stopping` status came back: it owns no new window."""
        return self._leaving

    def live(self) -> frozenset[str]:
        """The group's live members as this node has seen them so far."""
        return frozenset(self._live)

    def status(self, node_id: str, status: NodeStatus | None) -> list[Reassigned | Mismatch]:
        """A retained status arrived (None: cleared): the group may have changed here."""
        member = (
            status is not None
            and status.state is NodeState.ONLINE
            and status.share_group == self.share_group
        )
        notes: list[Reassigned | Mismatch] = []
        if node_id == self.node_id:
            if status is None or status.instance != self.instance:
                return []  # another process with this node id: node/app.py deals with it
            if status.state is NodeState.ONLINE:  # a birth: also after its will (a lost link)
                self._leaving = False
            elif status.state is NodeState.STOPPING:
                self._leaving = True  # it serves what it owns until it stops
        elif member and status is not None and status.hop not in (None, self.hop):
            member = False
            if node_id not in self._mismatched:
                self._mismatched.add(node_id)
                notes.append(
                    Mismatch(
                        node_id,
                        f"node {node_id} is in share group {self.share_group} with hop "
                        f"{status.hop}, this node has hop {self.hop}: windows would not line up, "
                        "so it is not counted as a member. Give every node of a group one hop",
                    )
                )
        if member and node_id not in self._live:
            self._live.add(node_id)
            self._record_join(node_id)
        elif not member:
            self._live.discard(node_id)
            if status is None or status.state is not NodeState.STOPPING:
                notes += self._reassign(node_id)  # it serves no more: what it left is others'
        return notes

    # -- windows ------------------------------------------------------------------------------

    def owner_of(self, sensor_id: str, start: int) -> str | None:
        """Who serves window `start` of `sensor_id` if it is cut now: among the live members
        that hold every sample of it."""
        state = self._sensors.get(sensor_id)
        joined = state.joined if state is not None else {}
        holders = [m for m in self._live if joined.get(m, -1) <= start]
        return rendezvous_owner(sensor_id, holders)

    def seen(self, sensor_id: str, seq: int) -> None:
        """A run of `sensor_id` from sample `seq` arrived (before it is windowed)."""
        if sensor_id in self._sensors:
            return
        state = self._sensors[sensor_id] = _Sensor()
        if self.node_id in self._live:  # the others saw this node come online before this run
            state.joined[self.node_id] = -(-seq // self.hop) * self.hop

    def restarted(self, sensor_id: str) -> None:
        """The sensor's sample index went back (it restarted): the old stream's join points,
        owners and results say nothing about the new one."""
        if sensor_id in self._sensors:
            self._sensors[sensor_id] = _Sensor()

    def cut(self, sensor_id: str, start: int) -> bool:
        """Window `start` of `sensor_id` was cut here: remember its owner; True when it is this
        node."""
        owner = self.owner_of(sensor_id, start)
        owners = self._sensors.setdefault(sensor_id, _Sensor()).owners
        owners.append((start, owner))
        if len(owners) > self.remember:
            owners.popleft()
        return owner == self.node_id and not self._leaving

    def result(self, sensor_id: str, seq: int, node_id: str) -> None:
        """A result for window `seq` of `sensor_id` was published by `node_id`."""
        state = self._sensors.get(sensor_id)
        if state is not None and seq > state.last_by.get(node_id, -1):
            state.last_by[node_id] = seq

    # -- inside ---------------------------------------------------------------------------

    def _record_join(self, node_id: str) -> None:
        """`node_id` came online now: it holds no sample of the windows already begun."""
        for sensor_id, state in self._sensors.items():
            end = self._stream_end(sensor_id)
            if end is not None:
                state.joined[node_id] = -(-end // self.hop) * self.hop

    def _reassign(self, gone: str) -> list[Reassigned]:
        """`gone` left the group: its windows without a result go to their next owners."""
        notes: list[Reassigned] = []
        for sensor_id, state in self._sensors.items():
            done = state.last_by.get(gone, -1)
            mine: list[int] = []
            remembered = list(state.owners)
            for index, (start, owner) in enumerate(remembered):
                if owner != gone or start <= done:
                    continue
                heir = self.owner_of(sensor_id, start)
                state.owners[index] = (start, heir)
                if heir == self.node_id:
                    mine.append(start)
            lost = 0
            if len(remembered) >= self.remember and remembered[0][1] == gone:
                # its unserved windows may reach back before what is remembered
                first_unserved = -(-(done + 1) // self.hop) * self.hop
                lost = max(0, (remembered[0][0] - first_unserved) // self.hop)
            if mine or (lost and self.owner_of(sensor_id, remembered[0][0]) == self.node_id):
                notes.append(Reassigned(sensor_id, mine, gone, lost))
        return notes
