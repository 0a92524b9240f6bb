"""Sensor-affine share groups: who owns each window (node/ingest/share.py), the windower's grid.

The end-to-end proof (three node processes, one killed) is in tests/test_share_group_e2e.py.
"""

from __future__ import annotations

import queue
import time
from collections import Counter

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.ingest.router import Ingest
from node.ingest.share import Mismatch, Reassigned, SensorShare, rendezvous_owner
from node.ingest.windower import SampleWindower
from node.metrics import NodeMetrics
from node.reporting import ErrorReporter
from node.work import WorkItem
from schemas.codec import encode
from schemas.messages import NodeState, NodeStatus

GROUP = "line-3"
HOP = 50
SENSORS = [f"imu-{i}" for i in range(300)]


def status(
    node_id: str,
    *,
    state: NodeState = NodeState.ONLINE,
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


# -- who owns each window ------------------------------------------------------------------


def member(node_id: str, share: SensorShare, **kwargs: object) -> list[object]:
    return list(share.status(node_id, status(node_id, **kwargs)))  # type: ignore[arg-type]


def group_of(node_id: str, others: list[str], ends: dict[str, int] | None = None) -> SensorShare:
    """A node that has seen the other members' statuses and then its own birth."""
    ends = ends if ends is not None else {}
    share = SensorShare(node_id, "me", GROUP, HOP, remember=64, stream_end=ends.get)
    for other in others:
        assert member(other, share) == []
    member(node_id, share, instance="me")
    assert share.ready
    return share


def test_a_lone_node_owns_every_window_once_its_birth_came_back() -> None:
    share = SensorShare("pi-a", "me", GROUP, HOP)
    share.seen("imu-1", 0)
    assert share.cut("imu-1", 0) is False  # not a member yet: its birth has not come back
    member("pi-a", share, instance="someone-else")  # another process with this node id
    assert not share.ready
    member("pi-a", share, instance="me")
    assert [share.cut("imu-1", start) for start in (50, 100)] == [True, True]


def test_members_split_the_windows_by_rendezvous_hash() -> None:
    a = group_of("pi-a", ["pi-b", "pi-c"])
    b = group_of("pi-b", ["pi-a", "pi-c"])
    for sensor in SENSORS:
        a.seen(sensor, 0)
        b.seen(sensor, 0)
        owner = rendezvous_owner(sensor, ["pi-a", "pi-b", "pi-c"])
        assert a.cut(sensor, 0) == (owner == "pi-a")
        assert b.cut(sensor, 0) == (owner == "pi-b")


def test_members_are_the_online_nodes_of_this_group_with_its_hop() -> None:
    share = group_of("pi-a", [])
    member("pi-b", share)
    member("pi-c", share, group="other")
    member("pi-d", share, state=NodeState.STOPPED)
    (note,) = member("pi-e", share, hop=25)
    assert isinstance(note, Mismatch)
    assert "hop 25" in note.reason
    assert share.live() == {"pi-a", "pi-b"}
    assert member("pi-e", share, hop=25) == []  # said once
    share.status("pi-b", None)  # retained status cleared
    assert share.live() == {"pi-a"}


def test_a_joiner_owns_no_window_begun_before_it_came_online() -> None:
    ends = {"imu-1": 1234}
    a = group_of("pi-a", [], ends)
    a.seen("imu-1", 0)
    joiner = next(
        n for n in (f"pi-{i}" for i in range(100)) if rendezvous_owner("imu-1", ["pi-a", n]) == n
    )
    member(joiner, a)  # online when a had samples up to 1233: it holds windows from 1250 on
    assert a.owner_of("imu-1", 1200) == "pi-a"
    assert a.owner_of("imu-1", 1250) == joiner
    assert [a.cut("imu-1", s) for s in (1150, 1200, 1250)] == [True, True, False]


def test_the_joiner_agrees_about_its_own_first_window() -> None:
    joiner = "pi-j"
    share = SensorShare(joiner, "me", GROUP, HOP)
    member("pi-a", share)
    member(joiner, share, instance="me")
    share.seen("imu-1", 1237)  # its first run of a sensor the others have followed for long
    assert share.owner_of("imu-1", 1250) == rendezvous_owner("imu-1", ["pi-a", joiner])
    assert share.owner_of("imu-1", 1200) == "pi-a"


def test_a_dead_members_windows_without_a_result_go_to_their_next_owner() -> None:
    a = group_of("pi-a", ["pi-b", "pi-c"])
    sensor = next(s for s in SENSORS if rendezvous_owner(s, ["pi-a", "pi-b", "pi-c"]) == "pi-b")
    heir = rendezvous_owner(sensor, ["pi-a", "pi-c"])
    a.seen(sensor, 0)
    for start in range(0, 500, 50):
        assert a.cut(sensor, start) is False
    a.result(sensor, 250, "pi-b")
    a.result(sensor, 200, "pi-b")  # older results never move the mark back
    a.result(sensor, 400, "pi-c")  # another node's results say nothing about b's
    notes = member("pi-b", a, state=NodeState.OFFLINE)
    if heir == "pi-a":
        assert notes == [Reassigned(sensor, [300, 350, 400, 450], "pi-b")]
    else:
        assert notes == []
    assert a.owner_of(sensor, 500) == heir


def test_a_member_stopping_serves_what_it_owns_and_hands_over_only_what_it_left() -> None:
    a = group_of("pi-a", ["pi-b"])
    sensor = next(s for s in SENSORS if rendezvous_owner(s, ["pi-a", "pi-b"]) == "pi-b")
    a.seen(sensor, 0)
    for start in (0, 50, 100):
        a.cut(sensor, start)
    assert member("pi-b", a, state=NodeState.STOPPING) == []  # b drains what it owns
    assert a.cut(sensor, 150) is True  # from here on, a's
    a.result(sensor, 50, "pi-b")
    notes = member("pi-b", a, state=NodeState.STOPPED)  # its drain did not finish window 100
    assert notes == [Reassigned(sensor, [100], "pi-b")]


def test_this_node_stopping_cuts_no_new_window_once_its_status_came_back() -> None:
    share = group_of("pi-a", [])
    share.seen("imu-1", 0)
    assert share.cut("imu-1", 0)
    member("pi-a", share, instance="me", state=NodeState.STOPPING)
    assert share.leaving
    assert share.cut("imu-1", 50) is False


def test_windows_older_than_remembered_are_counted() -> None:
    share = SensorShare("pi-a", "me", GROUP, HOP, remember=4)
    member("pi-b", share)
    member("pi-a", share, instance="me")
    sensor = next(s for s in SENSORS if rendezvous_owner(s, ["pi-a", "pi-b"]) == "pi-b")
    share.seen(sensor, 0)
    for start in range(0, 500, 50):
        share.cut(sensor, start)
    (note,) = member("pi-b", share, state=NodeState.OFFLINE)  # b published no result at all
    assert isinstance(note, Reassigned)
    assert note.starts == [300, 350, 400, 450]
    assert note.lost == 6  # windows 0-250: their owner is no longer remembered


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


def test_windows_from_before_a_node_joined_count_as_missing() -> None:
    windower = SampleWindower(HOP, keep=1000, align=True)
    windower.add("s", samples(130, 200), 130, cut=False)  # joined at sample 130
    recut = windower.recut("s", 50)
    assert [w.seq for w in recut.windows] == [150, 200]
    assert recut.missing == 2  # 50 and 100: their first samples went by before it subscribed


def test_a_sensor_that_restarts_starts_over_for_joins_and_owners() -> None:
    ends = {"imu-1": 1234}
    a = group_of("pi-a", [], ends)
    a.seen("imu-1", 0)
    member("pi-b", a)  # joined at 1250 of the old stream
    a.restarted("imu-1")  # seq went back to 0: b holds the new stream from its start
    a.seen("imu-1", 0)
    assert a.owner_of("imu-1", 0) == rendezvous_owner("imu-1", ["pi-a", "pi-b"])


def test_a_node_whose_will_came_back_owns_windows_again_after_its_new_birth() -> None:
    share = group_of("pi-a", [])
    share.seen("imu-1", 0)
    assert share.cut("imu-1", 0)
    member("pi-a", share, instance="me", state=NodeState.OFFLINE)  # its link was lost
    assert not share.cut("imu-1", 50)  # the group took its windows over meanwhile
    member("pi-a", share, instance="me")  # connected again: its birth
    assert share.cut("imu-1", 100)


def test_junk_results_and_statuses_change_nothing_and_the_node_serves_on() -> None:
    """What any client with write access could send: results with a forged or missing node id,
    wrong types, huge or broken payloads; statuses on another node's topic or not parsing."""
    windower = SampleWindower(HOP, keep=1000, align=True)
    share = SensorShare("pi-a", "me", GROUP, HOP, stream_end=windower.end)
    work: queue.Queue[WorkItem] = queue.Queue()
    metrics = NodeMetrics()
    reporter = ErrorReporter("pi-a", lambda *_args: True, metrics)
    ingest = Ingest(work, windower, reporter, metrics, share=share)

    def message(topic: str, payload: bytes) -> mqtt.MQTTMessage:
        msg = mqtt.MQTTMessage(topic=topic.encode())
        msg.payload = payload
        return msg

    ingest.on_member_status("pi-b", bytes(encode(status("pi-b"))))
    ingest.on_member_status("pi-a", bytes(encode(status("pi-a", instance="me"))))
    run = b'{"seq": 0, "samples": ' + str([[0.0] * 9] * 100).encode() + b"}"
    ingest.on_samples(message("imu/imu-1/samples", run))
    before = (share.live(), dict(share._sensors["imu-1"].last_by))
    for payload in (
        b"", b"not json", b"[1, 2]", b'{"seq": true, "node_id": "pi-b"}',
        b'{"seq": "9", "node_id": "pi-b"}', b'{"seq": 5}', b'{"seq": 5, "node_id": 7}',
        b'{"seq": 5, "node_id": "pi-b", "pad": "' + b"x" * 70_000 + b'"}',
    ):  # fmt: skip
        ingest.on_result(message("imu/imu-1/motifs", payload))
    ingest.on_result(message("not/a/result/topic", b'{"seq": 5, "node_id": "pi-b"}'))
    ingest.on_member_status("pi-c", b"{broken")
    ingest.on_member_status("pi-c", bytes(encode(status("pi-b"))))  # another's topic
    assert (share.live(), dict(share._sensors["imu-1"].last_by)) == before
    ingest.on_samples(message("imu/imu-1/samples", run.replace(b'"seq": 0', b'"seq": 100')))
    assert rendezvous_owner("imu-1", ["pi-a", "pi-b"]) == "pi-a"
    assert work.qsize() == 3  # windows 0, 50 and 100 of a sensor it owns: it serves on
