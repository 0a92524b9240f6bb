"""Sensor-affine share groups, the decision logic (node/ingest/share.py) and the windower's grid.

The end-to-end proof (three node processes, one killed) is in tests/test_share_group_e2e.py.
"""

from __future__ import annotations

import time
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.ingest.share import (
    Give,
    HandOver,
    Holding,
    Note,
    SensorShare,
    Sync,
    Take,
    rendezvous_owner,
)
from node.ingest.windower import SampleWindower
from schemas.messages import Handoff, NodeState, NodeStatus

GROUP = "line-3"
HOP = 50
SENSORS = [f"imu-{i}" for i in range(300)]


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def status(
    node_id: str,
    state: NodeState = NodeState.ONLINE,
    *,
    instance: str = "i",
    group: str | None = GROUP,
    hop: int = HOP,
) -> NodeStatus:
    return NodeStatus(
        state=state,
        node_id=node_id,
        instance=instance,
        ts=time.time(),
        share_group=group,
        hop=hop,
    )


def joined(node_id: str, others: list[str], clock: Clock, timeout_s: float = 5.0) -> SensorShare:
    """A node that has seen the other members' statuses and then its own birth."""
    share = SensorShare(node_id, "me", GROUP, HOP, timeout_s=timeout_s, clock=clock)
    for other in others:
        assert share.status(other, status(other)) == []
    share.status(node_id, status(node_id, instance="me"))
    assert share.ready
    return share


def handoff(give: Give, sender: str, next_seq: int | None) -> Handoff:
    return Handoff(
        share_group=GROUP,
        from_node=sender,
        to_node=give.to_node,
        sensor_id=give.sensor_id,
        next_seq=next_seq,
        ts=time.time(),
    )


# -- rendezvous hashing -----------------------------------------------------------------------


def test_rendezvous_spreads_sensors_and_agrees_everywhere() -> None:
    nodes = ["pi-a", "pi-b", "pi-c"]
    owners = Counter(rendezvous_owner(s, nodes) for s in SENSORS)
    assert set(owners) == set(nodes)
    assert min(owners.values()) > len(SENSORS) / 3 * 0.7  # within 30% of an even share
    assert all(rendezvous_owner(s, nodes) == rendezvous_owner(s, reversed(nodes)) for s in SENSORS)
    assert rendezvous_owner("imu-1", []) is None


def test_a_joining_node_takes_only_sensors_that_move_to_it() -> None:
    before = {s: rendezvous_owner(s, ["pi-a", "pi-b"]) for s in SENSORS}
    after = {s: rendezvous_owner(s, ["pi-a", "pi-b", "pi-c"]) for s in SENSORS}
    moved = [s for s in SENSORS if before[s] != after[s]]
    assert moved
    assert all(after[s] == "pi-c" for s in moved)  # nothing moves between a and b
    assert 0.2 < len(moved) / len(SENSORS) < 0.47  # about a third


# -- the state machine ------------------------------------------------------------------------


def test_a_lone_node_serves_every_sensor_at_once() -> None:
    share = joined("pi-a", [], Clock())
    assert share.admit("imu-1") == (True, None, None, [])


def test_nothing_is_served_before_the_nodes_own_birth_comes_back() -> None:
    clock = Clock()
    share = SensorShare("pi-a", "me", GROUP, HOP, timeout_s=5, clock=clock)
    assert share.admit("imu-1") == (False, None, None, [])
    share.status("pi-a", status("pi-a", instance="someone-else"))  # not this process
    assert not share.ready
    actions = share.status("pi-a", status("pi-a", instance="me"))
    assert actions == [Take("imu-1", None)]  # alone: what it followed is served
    assert share.holding("imu-1") is Holding.SERVING


def test_join_hand_off_moves_each_sensor_once() -> None:
    clock = Clock()
    a = joined("pi-a", [], clock)
    for sensor in SENSORS:
        assert a.admit(sensor).serving
    clock.now += 60
    b = joined("pi-b", ["pi-a"], clock)
    # a learns of b: hands b exactly the sensors b owns now, and syncs once that is done
    hand_overs = a.status("pi-b", status("pi-b"))
    owned_by_b = {s for s in SENSORS if rendezvous_owner(s, ["pi-a", "pi-b"]) == "pi-b"}
    assert hand_overs == [HandOver(s, "pi-b") for s in SENSORS if s in owned_by_b]
    # b, just joined, waits for them rather than serving at once
    sensor = sorted(owned_by_b)[0]
    assert b.admit(sensor) == (False, None, None, [])
    assert b.holding(sensor) is Holding.WAITING
    # a still serves the windows it has begun (b may lack their first samples) ...
    gives: list[object] = []
    for index, other in enumerate(sorted(owned_by_b)):
        gives += a.hand_over(other, "pi-b", 1300 + index)
    assert gives == []
    assert a.admit(sensor) == (True, None, 1300, [])
    assert a.progressed(sensor, 1250) == []
    # ... then gives it, from the first window b has every sample of
    assert a.progressed(sensor, 1300) == [Give(sensor, "pi-b", 1300)]
    assert a.admit(sensor).serving is False
    assert b.handoff(handoff(Give(sensor, "pi-b"), "pi-a", 1300)) == [Take(sensor, 1300)]
    assert b.admit(sensor) == (True, 1300, None, [])
    # the sync goes out once the last hand-over to b is done
    rest = sorted(owned_by_b)[1:]
    for index, other in enumerate(rest, start=1):
        actions = a.progressed(other, 1300 + index)
        assert actions[0] == Give(other, "pi-b", 1300 + index)
        if other != rest[-1]:
            assert len(actions) == 1
    assert actions[-1] == Sync("pi-b", frozenset({"pi-a", "pi-b"}))


def test_a_hand_over_of_a_quiet_sensor_completes_on_the_clock() -> None:
    clock = Clock()
    a = joined("pi-a", [], clock, timeout_s=4)
    sensor = next(s for s in SENSORS if rendezvous_owner(s, ["pi-a", "pi-x"]) == "pi-x")
    a.admit(sensor)
    clock.now += 60
    assert a.status("pi-x", status("pi-x")) == [HandOver(sensor, "pi-x")]  # sync: later
    a.hand_over(sensor, "pi-x", 500)
    assert a.tick() == []
    clock.now += 2.1
    assert a.tick() == [  # from its next window, and then the sync
        Give(sensor, "pi-x", None),
        Sync("pi-x", frozenset({"pi-a", "pi-x"})),
    ]


def test_a_sensor_that_comes_back_mid_hand_over_is_kept() -> None:
    clock = Clock()
    a = joined("pi-a", [], clock)
    sensor = next(s for s in SENSORS if rendezvous_owner(s, ["pi-a", "pi-x"]) == "pi-x")
    a.admit(sensor)
    a.status("pi-x", status("pi-x"))
    a.hand_over(sensor, "pi-x", 500)
    a.status("pi-x", status("pi-x", NodeState.OFFLINE))
    assert a.holding(sensor) is Holding.SERVING
    assert a.admit(sensor) == (True, None, None, [])
    assert a.progressed(sensor, 600) == []


def sync(sender: str, to: str, view: set[str]) -> Handoff:
    return Handoff(
        share_group=GROUP, from_node=sender, to_node=to, view=sorted(view), ts=time.time()
    )


def test_a_sync_ends_the_wait_at_once_and_only_for_the_same_group() -> None:
    clock = Clock()
    b = joined("pi-b", ["pi-a"], clock)
    mine = [s for s in SENSORS if rendezvous_owner(s, ["pi-a", "pi-b"]) == "pi-b"][:3]
    for sensor in mine:
        assert b.admit(sensor) == (False, None, None, [])
    b.result(mine[0], 200)
    assert b.handoff(sync("pi-a", "pi-b", {"pi-a"})) == []  # a saw another group: not yet
    assert b.handoff(sync("pi-a", "pi-b", {"pi-a", "pi-b"})) == [
        Take(mine[0], 201),
        Take(mine[1], None),
        Take(mine[2], None),
    ]
    owned = [s for s in SENSORS if rendezvous_owner(s, ["pi-a", "pi-b"]) == "pi-b"]
    later = owned[-1]
    assert later not in mine
    assert b.admit(later)[:3] == (True, None, None)  # a has synced: a new sensor is served at once


def test_a_sync_that_came_early_counts_once_the_group_matches() -> None:
    clock = Clock()
    a = joined("pi-a", ["pi-b"], clock)
    clock.now += 60
    moving = next(
        s
        for s in SENSORS
        if rendezvous_owner(s, ["pi-a", "pi-b"]) == "pi-b"
        and rendezvous_owner(s, ["pi-a"]) == "pi-a"
    )
    a.admit(moving)
    assert a.holding(moving) is Holding.IDLE
    # b leaves: its sync for the group without it may reach a before b's stopped status does
    assert a.handoff(sync("pi-b", "pi-a", {"pi-a"})) == []
    actions = a.status("pi-b", status("pi-b", NodeState.STOPPED))
    assert Take(moving, None) in actions


def test_a_dead_owners_sensors_are_served_after_the_last_result_seen() -> None:
    clock = Clock()
    a = joined("pi-a", ["pi-b"], clock)
    clock.now += 60
    b_sensors = [s for s in SENSORS if rendezvous_owner(s, ["pi-a", "pi-b"]) == "pi-b"]
    for sensor in b_sensors[:2]:
        a.admit(sensor)
    a.result(b_sensors[0], 400)
    a.result(b_sensors[0], 350)  # older results never move the mark back
    actions = a.status("pi-b", status("pi-b", NodeState.OFFLINE))
    assert actions == [Take(b_sensors[0], 401), Take(b_sensors[1], None)]
    assert a.admit(b_sensors[0]) == (True, 401, None, [])


def test_a_node_waits_for_a_live_owner_then_takes_over_and_says_so() -> None:
    clock = Clock()
    b = joined("pi-b", ["pi-a"], clock, timeout_s=5)
    sensor = next(s for s in SENSORS if rendezvous_owner(s, ["pi-a", "pi-b"]) == "pi-b")
    assert b.admit(sensor) == (False, None, None, [])
    b.result(sensor, 700)
    clock.now += 4.9
    assert b.tick() == []
    clock.now += 0.2
    (take,) = b.tick()
    assert isinstance(take, Take)
    assert (take.sensor_id, take.first) == (sensor, 701)
    assert take.warning is not None
    assert "pi-a" in take.warning
    assert b.holding(sensor) is Holding.SERVING


def test_a_new_sensor_long_after_joining_is_served_at_once() -> None:
    clock = Clock()
    b = joined("pi-b", ["pi-a"], clock)
    clock.now += 60
    sensor = next(s for s in SENSORS if rendezvous_owner(s, ["pi-a", "pi-b"]) == "pi-b")
    assert b.admit(sensor) == (True, None, None, [])


def test_leave_gives_every_served_sensor_to_its_next_owner() -> None:
    clock = Clock()
    a = joined("pi-a", ["pi-b", "pi-c"], clock)
    clock.now += 60
    mine = [s for s in SENSORS if a.admit(s).serving]
    assert mine
    gives = a.leave()
    assert {g.sensor_id for g in gives if isinstance(g, Give)} == set(mine)
    for give in gives:
        assert isinstance(give, Give)
        assert give.to_node == rendezvous_owner(give.sensor_id, ["pi-b", "pi-c"])
    assert not any(a.admit(s).serving for s in mine)


def test_a_hand_off_for_another_owner_is_passed_on_unchanged() -> None:
    clock = Clock()
    b = joined("pi-b", ["pi-a", "pi-c"], clock)
    sensor = next(s for s in SENSORS if rendezvous_owner(s, ["pi-a", "pi-b", "pi-c"]) == "pi-c")
    actions = b.handoff(handoff(Give(sensor, "pi-b"), "pi-a", 900))
    assert actions == [Give(sensor, "pi-c", 900, forwarded=True)]
    assert b.holding(sensor) is Holding.IDLE


def test_a_second_holder_is_reported() -> None:
    share = joined("pi-a", [], Clock())
    share.admit("imu-1")
    (note,) = share.handoff(handoff(Give("imu-1", "pi-a"), "pi-b", 100))
    assert isinstance(note, Note)
    assert "twice" in note.reason


def test_members_are_the_online_nodes_of_this_group_with_its_hop() -> None:
    share = joined("pi-a", [], Clock())
    share.status("pi-b", status("pi-b"))
    share.status("pi-c", status("pi-c", group="other"))
    share.status("pi-d", status("pi-d", NodeState.STOPPED))
    (note,) = share.status("pi-e", status("pi-e", hop=25))
    assert isinstance(note, Note)
    assert "hop 25" in note.reason
    assert share.live() == {"pi-a", "pi-b"}
    assert share.status("pi-e", status("pi-e", hop=25)) == []  # said once
    share.status("pi-b", None)  # retained status cleared
    assert share.live() == {"pi-a"}


def test_a_reconnect_holds_nothing_until_the_birth_comes_back() -> None:
    clock = Clock()
    share = joined("pi-a", [], clock)
    share.admit("imu-1")
    share.reset()
    assert share.admit("imu-1") == (False, None, None, [])
    share.status("pi-b", status("pi-b"))
    actions = share.status("pi-a", status("pi-a", instance="me"))
    owner = rendezvous_owner("imu-1", ["pi-a", "pi-b"])
    assert actions == [Sync("pi-b", frozenset({"pi-a", "pi-b"}))]  # it holds nothing to give
    expected = Holding.WAITING if owner == "pi-a" else Holding.IDLE
    assert share.holding("imu-1") is expected


# -- the windower's grid and history ----------------------------------------------------------


def samples(start: int, count: int) -> np.ndarray:
    index = np.arange(start, start + count, dtype=np.float32)
    return np.repeat(index[:, None], 9, axis=1)


def test_aligned_windows_start_on_multiples_of_the_hop() -> None:
    windower = SampleWindower(HOP, align=True)
    windows, _ = windower.add("imu-1", samples(37, 200), 37)
    assert [w.seq for w in windows] == [50, 100]
    assert windows[0].x[0, 0] == 50


@settings(max_examples=60, deadline=None)
@given(
    runs=st.lists(st.integers(1, 120), min_size=1, max_size=40),
    keep=st.integers(0, 600),
    hop=st.integers(1, 100),
    first=st.integers(0, 3000),
)
def test_recut_gives_back_exactly_the_windows_cut_before(
    runs: list[int], keep: int, hop: int, first: int
) -> None:
    served = SampleWindower(hop, align=True)
    followed = SampleWindower(hop, keep=keep, align=True)
    seq = 0
    cut: list[tuple[int, bytes]] = []
    for count in runs:
        windows, _ = served.add("s", samples(seq, count), seq)
        cut += [(w.seq, w.x.tobytes()) for w in windows]
        assert followed.add("s", samples(seq, count), seq, cut=False) == ([], None)
        seq += count
    recut = followed.recut("s", first)
    wanted = [(start, x) for start, x in cut if start >= first]
    got = [(w.seq, w.x.tobytes()) for w in recut.windows]
    assert got == wanted[recut.missing :]  # the oldest ones can be gone, nothing else
    if recut.missing:
        newest_missing = wanted[recut.missing - 1][0]  # gone only when older than `keep` allows
        assert newest_missing < followed.next_start("s") - keep  # type: ignore[operator]
    assert followed.next_start("s") == served.next_start("s")


def test_recut_honours_both_bounds() -> None:
    windower = SampleWindower(HOP, keep=1000, align=True)
    windower.add("s", samples(0, 400), 0, cut=False)
    assert [w.seq for w in windower.recut("s", 100, 250).windows] == [100, 150, 200]
    assert [w.seq for w in windower.recut("s", 101).windows] == [150, 200, 250, 300]
    assert windower.recut("missing", 0).windows == []


@pytest.mark.parametrize("keep", [0, 1, 99, 1000])
def test_memory_stays_bounded_by_keep(keep: int) -> None:
    windower = SampleWindower(HOP, keep=keep, align=True)
    for seq in range(0, 100_000, 10):
        windower.add("s", samples(seq, 10), seq, cut=False)
    stream = windower._streams["s"]
    assert len(stream.data) <= 2 * (100 + keep + 10)


def test_two_nodes_leaving_at_once_do_not_pass_a_sensor_back_and_forth() -> None:
    clock = Clock()
    a = joined("pi-a", ["pi-b"], clock)
    clock.now += 60
    sensor = next(s for s in SENSORS if rendezvous_owner(s, ["pi-a", "pi-b"]) == "pi-a")
    a.admit(sensor)
    a.leave()
    (note,) = a.handoff(handoff(Give(sensor, "pi-a"), "pi-b", 500))  # b leaves as well
    assert isinstance(note, Note)
    assert "no other node" in note.reason


def test_windows_from_before_a_node_joined_count_as_missing() -> None:
    windower = SampleWindower(HOP, keep=1000, align=True)
    windower.add("s", samples(130, 200), 130, cut=False)  # joined at sample 130
    recut = windower.recut("s", 50)
    assert [w.seq for w in recut.windows] == [150, 200]
    assert recut.missing == 2  # 50 and 100: their first samples went by before it subscribed
