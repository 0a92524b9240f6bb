"""The journal of results in flight (node/mqtt/journal.py): what a restart finds in it."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from node.mqtt.journal import Journal


def result(seq: int) -> tuple[str, bytes]:
    return "imu/s1/motifs", b'{"seq":%d,"pad":"%s"}' % (seq, b"x" * 200)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.journal"))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 40)), min_size=1, max_size=120))
def test_a_restart_republishes_exactly_what_is_unsettled(
    tmp_path_factory: object, steps: list[tuple[bool, int]]
) -> None:
    """Results settled in any order, across many segments: a crash (no close) leaves every
    unsettled result to publish again, and none the broker acknowledged."""
    folder = tmp_path_factory.mktemp("journal")  # type: ignore[attr-defined]
    journal = Journal(folder, segment_bytes=700, keep_bytes=1400)
    settles = {}
    for seq, (settle_one, pick) in enumerate(steps):
        settles[seq] = journal.append(*result(seq))
        if settle_one and settles:
            key = sorted(settles)[pick % len(settles)]
            settles.pop(key)()
    left = Journal(folder).leftovers()
    assert sorted(left.in_flight) == sorted(result(seq) for seq in settles)
    assert not set(left.settled) & set(left.in_flight)
    assert not list(folder.glob("*.journal")), "read once, then forgotten"


def test_the_newest_settled_results_stay_to_mark_windows_served(tmp_path: Path) -> None:
    """A window's own PUBACK can die with the link after its result settled: the newest settled
    results stay, so a restart skips the window's re-sent copy; older ones are deleted."""
    journal = Journal(tmp_path, segment_bytes=2000, keep_bytes=8000)
    for seq in range(500):
        journal.append(*result(seq))()
    assert 8000 <= folder_bytes(tmp_path) <= 8000 + 2 * 2000
    left = Journal(tmp_path).leftovers()
    assert left.in_flight == []
    seqs = [int(payload.split(b",")[0].split(b":")[1]) for _, payload in left.settled]
    assert seqs == list(range(seqs[0], 500)), "the newest, all of them"
    assert len(seqs) >= 8000 // (len(result(0)[1]) + 64), "at least keep_bytes of them"


def test_an_old_result_in_flight_keeps_newer_markers(tmp_path: Path) -> None:
    """Markers live in newer segments than their results: with an old result still in flight,
    no newer segment (and its markers) is deleted, so settled results are not republished."""
    journal = Journal(tmp_path, segment_bytes=600, keep_bytes=0)
    stuck = journal.append(*result(0))
    for seq in range(1, 60):
        journal.append(*result(seq))()
    left = Journal(tmp_path).leftovers()
    assert left.in_flight == [result(0)]
    del stuck


def test_the_folder_is_bounded_and_counts_what_it_drops(tmp_path: Path) -> None:
    """Results never acknowledged cannot grow the folder past its bound: the oldest go, counted."""
    journal = Journal(tmp_path, segment_bytes=1000, keep_bytes=0, max_bytes=5000)
    for seq in range(200):
        journal.append(*result(seq))
    assert folder_bytes(tmp_path) <= 5000 + 1000 + 300
    assert journal.dropped > 150
    left = Journal(tmp_path).leftovers()
    assert len(left.in_flight) == 200 - journal.dropped
    assert left.in_flight[-1] == result(199), "the newest are kept"


class FailingOnce:
    """A segment file whose next write stores a few bytes and then fails, as a full disk does."""

    def __init__(self, real: Any) -> None:
        self.real, self.armed = real, True

    def write(self, data: bytes) -> int:
        if self.armed:
            self.armed = False
            self.real.write(data[:7])
            raise OSError(errno.ENOSPC, "No space left on device")
        return int(self.real.write(data))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def test_a_failed_write_leaves_no_trace_that_shifts_later_records(tmp_path: Path) -> None:
    """A full disk mid-record: that result goes out unjournaled, the partial bytes are cut
    off, and the records after it keep their places (markers name records by index)."""
    journal = Journal(tmp_path)
    settle_first = journal.append(*result(0))
    journal._current = FailingOnce(journal._current)  # type: ignore[assignment]
    journal.append(*result(1))  # not journaled: the disk is full
    journal.append(*result(2))
    settle_first()
    left = Journal(tmp_path).leftovers()
    assert left.in_flight == [result(2)]
    assert left.settled == [result(0)]
